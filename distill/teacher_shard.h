// teacher_shard.h: the frozen teacher sharded across the data-parallel ranks (recipe `[hardware] teacher =
// "sharded"`, docs/MULTIGPU.md "Sharded teacher"). The arithmetic, on the host (no CUDA): which elements of each
// teacher layer a rank keeps, how big the gather buffers are, and the bytes per GPU the --dry-run plan counts.
// The device side (the shards on the GPU, the all-gather of layer l + 1 while layer l runs) is
// kernels/engine/teacher_shard.h; the NCCL all-gather it calls is tshard_nccl_gather below.
//
// Layout. The teacher's registry keeps each decoder layer's tensors contiguous (model_layout.c), so layer l is
// one span [lo, hi) of the registry layout (its tensors and their alignment gaps; lo and hi are multiples of
// DL_TENSOR_ALIGN). The span is cut into `world` equal pieces of `shard` elements (ceil(span / world) rounded
// up to DL_TENSOR_ALIGN, so each piece starts 16-element aligned and uneven spans leave zero padding at the end
// of the last ranks' pieces): rank q keeps elements [lo + q shard, lo + (q+1) shard) of the span, which is what
// an all-gather of every rank's piece puts, in rank order, into a buffer of world x shard elements ("slot"):
// slot[j] = registry element lo + j for j < hi - lo. A layer's tensors are then read from the slot at
// (offset - lo), 16-element aligned like the whole copy's. Each rank keeps its pieces of every layer one after
// the other (layer l's at shard_off[l]).
//
// Global tensors (the embedding, the final norm, an untied head): kept whole on every rank, compact (each at a
// multiple of DL_TENSOR_ALIGN). The embedding is read by token (a gather, not a GEMM) and the head chunk by
// chunk during the loss, after the forward, so gathering them would need a buffer as large as themselves for
// the whole loss; they are 2 x V x d of the 8B teacher's 8.03B parameters (13%).
//
// Memory per GPU (bf16, 2 bytes): 2 x (sum of shard + min(2, n_layer) x max(world x shard) + globals), against
// 2 x numel replicated; tshard_bytes gives both.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/registry.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t lo, hi;   // the layer's span of the registry layout [lo, hi), elements
    int64_t shard;    // elements each rank keeps of it (a multiple of DL_TENSOR_ALIGN, world x shard >= hi - lo)
    int64_t off;      // where this rank's piece of the layer starts in its shard buffer (sum of earlier shards)
} TShardLayer;

typedef struct {
    int world, n_layer;
    TShardLayer *layer;    // [n_layer]
    int64_t shard_total;   // elements of a rank's shard buffer (sum of shard)
    int64_t slot;          // elements of one gather buffer: max over layers of world x shard
    int n_slots;           // gather buffers: 2 (layer l computes from one while l + 1 arrives in the other), 1 for 1 layer
    int n_global;          // tensors outside every layer (layer < 0), kept whole
    int *global;           // [n_global] their registry indices
    int64_t *global_off;   // [n_global] their offsets in the compact global buffer
    int64_t global_numel;  // elements of that buffer
    int64_t numel;         // the registry's elements (a whole copy)
} TShardPlan;

// The plan over registry r (n_layer decoder layers; layer fields 0..n_layer-1 or -1) for `world` ranks.
// -1 with e: world < 1, no layers, a tensor outside 0..n_layer-1, or a layer whose span holds another tensor.
int tshard_plan(TShardPlan *p, const Registry *r, int n_layer, int world, DlError *e);
void tshard_plan_free(TShardPlan *p);

// Registry elements [*begin, *end) of layer l that rank q keeps (empty, begin == end, for a rank past the span's
// end on a tiny layer); elements shard - (end - begin) of its piece are zero padding.
void tshard_range(const TShardPlan *p, int l, int q, int64_t *begin, int64_t *end);
// The rank that keeps registry element x of layer l's span (lo <= x < hi).
int tshard_owner(const TShardPlan *p, int l, int64_t x);
// The layer whose span holds registry element x, or -1 (a global tensor or an alignment gap outside the spans).
int tshard_layer_of(const TShardPlan *p, int64_t x);

// Bytes per GPU for element size es: the shards, the gather buffers, the global tensors, and their sum; and a
// whole copy (es x numel) for comparison.
typedef struct {
    double shards, slots, globals, total, replicated;
} TShardBytes;
void tshard_bytes(const TShardPlan *p, size_t es, TShardBytes *b);

// Host packing, fp32: out[shard_total] = rank q's pieces of every layer from params (registry layout), zeros in
// the padding. The device side rounds these values to bf16 with the engine's own conversion kernel.
void tshard_pack(const TShardPlan *p, int q, const float *params, float *out);
// out[global_numel] = the global tensors at their compact offsets (zeros in the gaps).
void tshard_pack_globals(const TShardPlan *p, const Registry *r, const float *params, float *out);
// What an all-gather of layer l does, on the host (tests, simulated ranks): slot[q shard + i] = shards[q][off + i]
// for every rank q (shards: world buffers from tshard_pack).
void tshard_gather_host(const TShardPlan *p, int l, const float *const *shards, float *slot);

// The all-gather of one layer over NCCL (kernels/engine/teacher_shard.h's TeacherShardGather, ctx = the NcclComm):
// recv[q count ..] = rank q's send (bf16, count elements), enqueued on stream. -1 with e without NCCL in the build.
int tshard_nccl_gather(void *ctx, int layer, const void *send, void *recv, int64_t count, void *stream, DlError *e);

#ifdef __cplusplus
}
#endif
