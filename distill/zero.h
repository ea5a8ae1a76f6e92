// zero.h: ZeRO-1 / ZeRO-2 sharding arithmetic over the registry's parameters, the communication plan, and
// a CPU backend of "simulated ranks" (R ranks in one process) that the tests and the CPU trainer use.
//
// Flat space. The trainable tensors (registry order inside a bucket) are laid out in a compact "flat"
// buffer of flat_numel floats: gradients are reduced there and parameters gathered there (the CUDA
// backend keeps its gradient buffer in this layout; the CPU path packs/unpacks the registry layout).
// It is cut into buckets of about bucket_bytes, formed walking the registry BACKWARDS (the order in which
// backward finishes gradients: head, last layer, ..., embeddings), so bucket 0 can be reduced while
// backward still runs (overlap). A bucket holds whole tensors (a tensor bigger than bucket_bytes is a
// bucket of its own) and is padded to a multiple of world * align elements.
//
// Ownership. Rank r owns slice r of every bucket: [begin + r*S_b, begin + (r+1)*S_b) with S_b = size/world.
// One bucket (bucket_bytes <= 0) is exactly "world contiguous equal shards". Each reduction is then one
// plain reduce-scatter of the bucket and each parameter refresh one all-gather, with no copies. A rank's
// owned slices, concatenated in bucket order, form its compact shard (shard_numel floats: optimizer m and v,
// fp32 master weights on the GPU). Since a slice cuts a tensor at most once at each end, each tensor's
// owned part is one range [shard_begin, shard_end) (relative to the tensor; empty: 0, 0), which
// zero_apply_shards writes into the registry for optim.c.
//
// Stages (hardware.zero):
//   0  no sharding: all-reduce each bucket after the last micro-batch; every rank updates everything.
//   1  optimizer state sharded: micro-batch gradients accumulate in the full local gradient buffer; after
//      the last micro-batch each bucket is reduce-scattered; each rank updates its shard; all-gather.
//   2  gradients sharded too: after EVERY micro-batch each bucket is reduce-scattered and added into a
//      shard-sized accumulator, so the full gradient buffer is only a staging area for one micro-batch
//      (and one bucket at a time on the GPU). Same traffic as 1 with grad_accum = 1, accum x more otherwise.
// Reductions are SUMs: a rank's gradient must already carry its share of the global normalization (loss
// divided by the global token or row count). With grad_accum 1 all stages give bitwise the same result;
// stage 2 with accumulation sums in another order (ranks first, then micro-batches): equal within rounding.
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"
#include "distill/optim.h"
#include "distill/registry.h"

typedef struct {
    int tensor;           // registry index (trainable tensors only)
    int64_t reg_offset;   // TensorInfo.offset
    int64_t flat_offset;  // where the tensor starts in the flat space
    int64_t numel;
    int bucket;
} ZeroSeg;

typedef struct {
    int64_t flat_begin, flat_end;  // [begin, end) of the flat space; (end - begin) % (world * align) == 0
    int64_t slice;                 // S_b = (end - begin) / world: elements each rank owns in this bucket
    int64_t shard_offset;          // where the rank's slice sits in its compact shard
    int seg_begin, seg_end;        // segments [seg_begin, seg_end) lie in this bucket
} ZeroBucket;

typedef struct {
    int world, stage;
    int64_t align;            // elements (DL_TENSOR_ALIGN)
    int64_t bucket_bytes;     // requested bucket size (<= 0: one bucket)
    ZeroSeg *seg;
    int n_seg;
    ZeroBucket *bucket;       // in reduction order (backward order)
    int n_bucket;
    int64_t trainable_numel;  // sum of trainable numel
    int64_t flat_numel;       // padded; = world * shard_numel
    int64_t shard_numel;      // per rank
} ZeroLayout;

// Builds the layout for world ranks (1..65536) and stage 0..2 over reg's trainable tensors; buckets hold
// about bucket_bytes of fp32 gradient. Errors: bad world/stage, no trainable tensor.
int zero_layout_build(ZeroLayout *L, const Registry *reg, int world, int stage, int64_t bucket_bytes, DlError *e);
void zero_layout_free(ZeroLayout *L);
// Sets shard_begin/shard_end of every trainable tensor of reg to rank's owned part (stage 0: everything).
// reg must be the registry the layout was built from (or a copy of it).
void zero_apply_shards(const ZeroLayout *L, Registry *reg, int rank);
// Owned range of segment k on rank: [*b, *e) relative to the tensor (empty: b == e == 0). Stage-independent.
void zero_seg_owned(const ZeroLayout *L, int k, int rank, int64_t *b, int64_t *e);
// True if the stage reduce-scatters after every micro-batch (stage 2).
bool zero_reduce_every_micro(const ZeroLayout *L);
// Per-rank bytes of fp32 optimizer state (m, v) and gradient under the stage, for plans and logs.
void zero_memory(const ZeroLayout *L, int64_t *optim_bytes, int64_t *grad_bytes);
// The plan: buckets with their tensors and the collective of each, for `distill plan` and the docs.
void zero_plan_print(const ZeroLayout *L, const Registry *reg, FILE *f);

// ---- layout conversions (CPU path; the CUDA backend reduces in the flat layout directly)
// reg_buf [reg numel] (registry layout) <-> flat [flat_numel]; pack zeroes the padding.
void zero_pack(const ZeroLayout *L, const float *reg_buf, float *flat);
void zero_unpack(const ZeroLayout *L, const float *flat, float *reg_buf);
// The rank's owned elements of reg_buf <-> its compact shard [shard_numel] (padding zeroed by pack).
void zero_shard_pack(const ZeroLayout *L, int rank, const float *reg_buf, float *shard);
void zero_shard_unpack(const ZeroLayout *L, int rank, const float *shard, float *reg_buf);

// ---- simulated ranks: R = L->world buffers, one per rank; sums in rank order 0, 1, ..., R-1
// shard[r] (+)= sum_q flat[q][rank r's slices]; accumulate: add into shard instead of overwriting.
void zsim_reduce_scatter(const ZeroLayout *L, const float *const *flat, float *const *shard, bool accumulate);
// flat[r][every slice of rank q] = shard[q], for every r.
void zsim_all_gather(const ZeroLayout *L, const float *const *shard, float *const *flat);
// buf[r][0..n) = sum_q buf[q][0..n) for every r (one fixed order, the same result on every rank).
void zsim_all_reduce(int R, int64_t n, float *const *buf);
// The same for one double per rank (squared gradient norms).
double zsim_all_reduce_f64(int R, const double *x);

// ---- the same over real processes through dist.h's control channel (CPU runs of tiny models and tests:
// every rank receives every rank's buffer, world x the traffic of NCCL's ring; sums in rank order, so the
// results equal the simulated ranks' bit for bit)
typedef struct DistGroup DistGroup;
int zdist_reduce_scatter(DistGroup *g, const ZeroLayout *L, const float *flat, float *shard, bool accumulate, DlError *e);
int zdist_all_gather(DistGroup *g, const ZeroLayout *L, const float *shard, float *flat, DlError *e);
int zdist_all_reduce_f64(DistGroup *g, double x, double *sum, DlError *e);

// ---- compact buffers (the CUDA backend: its gradients and fp32 master hold the trained tensors in registry
// order, each at a multiple of align elements, with no padding between buckets). off[i]: where registry tensor i
// starts in such a buffer (-1: not in it); a bucket's tensors are then one contiguous run there, at zero.h's
// in-bucket offsets, and rank q's slice of the bucket is one range of the buffer (clipped to the run: the
// bucket's padding is not in the buffer). Collectives then work in place on these ranges: a reduction of each
// range to its owner (ncclReduce) and a broadcast of each owned piece from its owner (ncclBroadcast).
typedef struct {
    int64_t off, n;  // elements [off, off + n) of the buffer
    int root;        // the owning rank
} ZeroRange;
// Rank q's slice of every bucket in a compact gradient buffer: at most n_bucket * world ranges (empty ones
// left out), bucket by bucket in reduction order, ranks in order. -1 with e if the buffer's offsets do not
// match the layout (a bucket's tensors not contiguous or not at the layout's in-bucket offsets).
int zero_slice_ranges(const ZeroLayout *L, const int64_t *off, ZeroRange *out, int *n_out, DlError *e);
// Every rank's owned piece of every trainable tensor in a compact buffer at off[] (e.g. the fp32 master):
// at most n_seg + n_bucket * (world - 1) ranges, segment by segment, ranks in order. -1 with e if a trainable
// tensor has no offset.
int zero_piece_ranges(const ZeroLayout *L, const int64_t *off, ZeroRange *out, int *n_out, DlError *e);
// Upper bounds of the two counts, for allocating out.
int zero_slice_ranges_max(const ZeroLayout *L);
int zero_piece_ranges_max(const ZeroLayout *L);
// The same list with first[b] .. first[b + 1] - 1 the ranges of bucket b (first: n_bucket + 1 ints): each
// bucket's ranges are adjacent in the buffer, so [out[first[b]].off, end of out[first[b + 1] - 1]) is the
// bucket's data there (what a per-bucket all-reduce covers).
int zero_slice_ranges_split(const ZeroLayout *L, const int64_t *off, ZeroRange *out, int *n_out, int *first, DlError *e);

// ---- overlap of the reductions with the backward (CUDA, tm_dp_*): when each bucket's gradient is final.
// The backward reports how far it got as a LEVEL: n_layer once the head's and the final norm's gradients are
// written (the loss, then the backward's first step), l after decoder layer l's backward, -1 at its end (the
// embeddings, which also receive a tied head's gradient). A tensor's level is the one after which nothing
// writes its gradient any more: its layer for a decoder-layer tensor, -1 for the embeddings, n_layer for the
// other global tensors (final norm, untied head). A bucket's level is the lowest of its tensors'; since
// buckets are formed walking the registry backwards, levels never increase from one bucket to the next, and
// the buckets final at a level are a prefix of the reduction order.
int zero_tensor_level(const TensorInfo *t, int n_layer);
// level[b] for every bucket (n_bucket ints). reg: the registry the layout was built from.
void zero_bucket_levels(const ZeroLayout *L, const Registry *reg, int n_layer, int *level);
// How many leading buckets are final once the backward has reached `reached` (level[b] >= reached).
int zero_buckets_ready(const int *level, int n_bucket, int reached);

// ---- the sharded optimizer step (any backend)
// The global norm of the averaged gradient from the sum over ranks of the local squared norms (NaN when the
// loss is not finite, so optim_decide skips): sqrt(global_sq) * (1 / grad_accum), as the unsharded steps scale.
double zero_global_norm(const OptimConfig *c, double loss, double global_sq);
// Sum of squares of grads over the owned ranges of reg's trainable tensors (fixed order, float64).
double zero_local_sq_norm(const Registry *reg, const float *grads);
// Checks that o's config can run sharded over world ranks at stage (0..2); every option (clipping, the
// outlier skip) works sharded since the step takes the global norm.
int zero_optim_check(const OptimConfig *c, int world, int stage, DlError *e);
// One AdamW step of a rank that owns only its shard: optim_step_norm with the global norm
// sqrt(global_sq) / grad_accum. global_sq: sum over ranks of zero_local_sq_norm of the reduced, not yet
// 1/grad_accum-scaled gradient (identical on every rank, so every rank skips, clips and records the outlier
// window as one rank would); grad_accum counts micro-batches over all ranks. grads is read only. Results
// equal unsharded optim_step bitwise given the same norm (the norm's summation order differs: rounding).
void zero_optim_step(Optim *o, int world, float *params, float *grads, double loss, double global_sq, OptimResult *r);

// ---- ZeRO-2's gradient memory on CUDA (kernels/engine/grad_stage.h, opt-in): the compact gradient buffer keeps
// its addresses (the engine's backward writes it unchanged) but only some of its pages are backed by memory.
// Pages of `page` elements. A bucket's STAGED pages are the pages wholly inside its data that hold none of this
// rank's slice: at most two runs, before and after the slice. They get memory (one of K slots, round robin over
// the staged buckets) when the backward is about to write the bucket and lose it once the bucket's reduction
// onto its owners has completed. Every other page is PERMANENT (this rank's slices, pages shared by two buckets
// or by a slice and its neighbours, alignment gaps, and whole KEPT buckets: those holding a global tensor, whose
// gradient the loss writes before the backward reports anything). The reports (zero_buckets_ready) drive it: at
// the report of level lv every bucket that layer lv - 1's backward writes (its highest tensor level >= lv - 1) is
// mapped, in bucket order, and every final one launched as soon as it is mapped; so the buckets mapped and not yet
// launched are those with lowest level < lv <= highest level + 1, and K = 1 + the most of them at any report
// leaves a launched bucket's reduction one report to finish before its slot is needed again.
// The bucket size the training stages use (stage_common.c says 25 MiB too) and the page of the H100/H200's
// allocation granularity (2 MiB), for plans made without a GPU.
#define ZERO_BUCKET_BYTES ((int64_t)25 << 20)
#define ZERO_STAGE_PAGE_ELEMS ((int64_t)1 << 19)

typedef struct {
    int64_t a0, a1, b0, b1;  // staged page runs [a0, a1), [b0, b1) (empty: equal ends)
    int lo, hi;              // lowest and highest tensor level (zero_tensor_level)
    bool keep;               // kept whole (a global tensor in it): no staged pages
    int sidx;                // index among the staged buckets (-1: none staged), slot = sidx % slots
} ZeroStageBucket;

typedef struct {
    int64_t page, n_pages;      // elements per page; pages of the buffer (n_elems rounded up)
    int n_bucket;
    ZeroStageBucket *b;         // [n_bucket]
    int64_t *perm;              // permanent page runs, pairs [perm[2i], perm[2i+1]) in pages, ascending
    int n_perm;
    ZeroRange *clear;           // elements on permanent pages that this rank does not own (zeroed after each
    int n_clear;                //   micro-batch's reduction, as engine_cuda_optim_keep_owned): root unused
    int slots;                  // K
    int64_t slot_pages;         // the most staged pages of one bucket
    int64_t perm_pages, staged_pages;  // totals (staged: summed over the buckets)
} ZeroStagePlan;

// The plan for `rank` over a compact buffer of n_elems floats whose tensors lie at off[] (zero_slice_ranges'
// rule), reg: the layout's registry, n_layer: the model's layers. -1 with e on offsets that break the layout.
int zero_stage_plan(const ZeroLayout *L, const Registry *reg, const int64_t *off, int64_t n_elems, int n_layer,
                    int rank, int64_t page, ZeroStagePlan *P, DlError *e);
void zero_stage_plan_free(ZeroStagePlan *P);
// Bytes of gradient memory the plan backs: (permanent pages + slots x slot_pages) x page x 4.
double zero_stage_bytes(const ZeroStagePlan *P);

