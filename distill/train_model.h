// train_model.h: one model of a training loop (the student, the online teacher, DPO's frozen reference) on
// either device behind one set of calls, so the loop (train_loop.c) and custom losses (dpo.c) are written
// once. The CPU form is the fp32 reference engine (engine.h) over the caller's host parameters; the CUDA
// form is engine_cuda (kernels/engine/engine_cuda.h): bf16 compute copy, fp32 master weights, gradients and
// AdamW moments on the GPU, hidden states and the teacher's logits never leave it.
//
// Buffers: gradients (tm_grads_new) live where the model computes: host memory in registry layout on the CPU,
// device memory in the engine's compact layout on CUDA (the trained tensors only, tm_grads_numel floats);
// the loop only passes them back in. Parameters: the caller's host buffer is the
// truth on the CPU; on CUDA the device master is for the trained tensors, and tm_sync_host copies those (and
// the AdamW moments, into the host Optim) back before a checkpoint, leaving the frozen ones as they are;
// tm_load_host goes the other way after a resume.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/engine.h"  // LossParts
#include "distill/losses.h"
#include "distill/model.h"
#include "distill/optim.h"
#include "distill/registry.h"
#include "distill/zero.h"

typedef enum { TM_CPU = 0, TM_CUDA = 1 } TmDevice;

enum {
    TM_TRAIN = 1,          // keep activations for a backward
    TM_KEEP_HIDDEN = 2,    // keep every layer's hidden state (MSE targets, teacher forcing)
    TM_TEACHER_KL = 4,     // the student of a loss with an online teacher (CUDA reserves a logits chunk)
    TM_FROZEN = 8,         // never trained (a teacher, a reference): CUDA keeps no fp32 master
    TM_RECOMPUTE_MLP = 16, // CUDA: recompute the MLP activations in the backward instead of keeping them
    TM_FP32 = 32,          // CUDA: compute in fp32 instead of bf16 (parity checks; `distill parity --fp32`)
};

typedef struct TrainModel TrainModel;

// params: host fp32, registry layout. CPU: used in place (the optimizer updates it). CUDA: uploaded; the
// host copy is refreshed by tm_sync_host. log: where CUDA prints its memory table (NULL: silent).
TrainModel *tm_new(TmDevice dev, const HybridConfig *h, const Registry *r, float *params, int64_t B, int64_t T,
                   int flags, FILE *log, DlError *e);
// The frozen teacher sharded over the ranks of a data-parallel run (recipe hardware.teacher = "sharded"; kernels/
// engine/teacher_shard.h), CUDA bf16 only: the model of tm_new(TM_CUDA, ..., TM_FROZEN | flags) with bitwise the same
// hidden states and logits, whose GPU keeps rank's 1/world of each decoder layer (plus the global tensors and two
// layer buffers) and all-gathers each layer a layer ahead during the forward over c (world 1: c may be NULL, the
// gather is a device copy). flags: TM_KEEP_HIDDEN or 0. params: the whole teacher (host fp32), only read here.
struct NcclComm;
TrainModel *tm_new_sharded_teacher(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t T,
                                   int flags, int rank, int world, struct NcclComm *c, FILE *log, DlError *e);
void tm_free(TrainModel *m);
TmDevice tm_device(const TrainModel *m);

// Forward of a batch: tokens, reset host [B*T] (reset may be NULL).
int tm_forward(TrainModel *m, const int32_t *tokens, const uint8_t *reset, DlError *e);
// Teacher forcing: layer l of m alone, its input = hidden state l of src (a model on the same device that ran
// forward on the same batch with TM_KEEP_HIDDEN).
int tm_forward_layer_from(TrainModel *m, const int32_t *tokens, const uint8_t *reset, int l, const TrainModel *src,
                          DlError *e);

typedef struct {
    LossWeights w;
    double norm;                 // 0: number of counted rows
    const TrainModel *teacher;   // online teacher that ran forward on the same batch (same device), or NULL
    const float *teacher_logits; // host [B*T, V] teacher log-probs (a teacher cache; CPU only), or NULL
    const float *seq_weight;     // host [B] or NULL
} TmLoss;

// Loss of the last forward (engine_loss / engine_cuda_loss). grads != NULL: keeps d loss / d final hidden for
// tm_backward and adds the head's gradient. seq_logprob host [B] optional.
LossParts tm_loss(TrainModel *m, const int32_t *targets, const uint8_t *mask, const TmLoss *spec, float *grads,
                  double *seq_logprob);
// scale x sum over counted rows of |hidden_i(m) - hidden_i(t)|^2 (mask host [B*T]); adds its gradient to m's
// hidden state i for the next tm_backward. t ran forward on the same batch with TM_KEEP_HIDDEN.
double tm_mse_hidden(TrainModel *m, int i, const TrainModel *t, const uint8_t *mask, double scale);
// Logits of rows [r0, r1) of the last forward into host memory, fp32 [(r1-r0), V].
void tm_logits(const TrainModel *m, int64_t r0, int64_t r1, float *out);
// Backward into grads (ADDED; trainable tensors only).
void tm_backward(TrainModel *m, float *grads);

// ---- gradients and the optimizer
float *tm_grads_new(TrainModel *m);              // zeroed, where m computes: CPU registry layout, CUDA compact
int64_t tm_grads_numel(const TrainModel *m);     // floats in it (CUDA: the trained tensors, engine_cuda_grads_numel)
void tm_grads_free(TrainModel *m, float *grads);
void tm_grads_zero(TrainModel *m, float *grads);  // the trainable tensors' ranges
// host [r->numel] in registry layout <- grads (zeros for tensors not trained): for comparing the devices.
void tm_grads_to_host(const TrainModel *m, const float *grads, float *host);
// One optimizer step: o holds the configuration, counters and (CPU) the moments; on CUDA the moments live on
// the device (see the header comment).
int tm_optim_step(TrainModel *m, Optim *o, float *grads, double loss, OptimResult *r, DlError *e);
// CUDA: master weights -> the host params, device moments -> o's m, v (before a checkpoint). CPU: nothing.
void tm_sync_host(TrainModel *m, Optim *o);
// CUDA: host params -> device master and compute copy, o's m, v -> device moments (after a resume). CPU: nothing.
void tm_load_host(TrainModel *m, Optim *o);
// The CUDA stream of m (NULL on the CPU), for collectives enqueued in order with its work.
void *tm_stream(TrainModel *m);
// Device memory of m in bytes (0 on the CPU): weights, activations and gradients (not the AdamW moments).
double tm_device_bytes(const TrainModel *m);
// true when m's attention is a fused flash-attention kernel with a bf16 P·V (CUDA with cuDNN): a CPU reference of its
// numerics rounds P as well (attention_cpu_round_p)
bool tm_flash_attention(const TrainModel *m);

// ---- data parallel on CUDA: one process per GPU, NCCL (nccl_comm.h), ZeRO-0/1/2 over the model's compact
// device gradient buffer, whose buckets are zero.h's (the same owned ranges as the CPU path, so the sharded
// checkpoints are the same files). Used by train_loop.c; the CPU path sums through zero.h's zdist_* instead.
//   ZeRO-0: after the last micro-batch one all-reduce of the whole buffer; every rank takes the same step.
//   ZeRO-1: after the last micro-batch each bucket slice is reduced onto its owner (grouped in-place
//           ncclReduce: the slices are ranges of the buffer, no staging copy).
//   ZeRO-2: the same after EVERY micro-batch; each rank then zeroes what it does not own, so the next
//           micro-batch's backward adds onto its owned running sum only (the buffer itself stays whole: the
//           engine's backward writes every trained tensor).
//   1 and 2: the global gradient norm = sqrt(sum over ranks of the owned squared norms) (one all-reduce of a
//           double over the process group), AdamW on the owned elements only (the device moments hold the owned
//           ranges: 1/world), then each owned piece of the fp32 master is broadcast from its owner (grouped
//           ncclBroadcast in place) and every rank rounds the pieces it received into its bf16 compute copy.
// Every rank sums, decides and rounds in the same order: results depend only on the world size.
typedef struct NcclComm NcclComm;
typedef struct TmDp TmDp;
// m: the student on CUDA; o: its optimizer, whose registry carries rank's owned ranges of Z (zero_apply_shards;
// stage 0: whole tensors); Z: zero_layout_build over m's registry for g's world size (kept by the caller).
// NULL with e: not CUDA, no NCCL in this build, or owned ranges / gradient layout that do not match Z.
// overlap: the reductions overlapped with the backward (below; recipe hardware.overlap; DISTILL_DP_OVERLAP=1/0
// overrides it).
TmDp *tm_dp_new(TrainModel *m, Optim *o, const ZeroLayout *Z, int rank, DistGroup *g, NcclComm *c, bool overlap, DlError *e);
void tm_dp_free(TmDp *d);
// After each micro-batch's backward into grads (ZeRO-2: the reduction; otherwise nothing).
int tm_dp_micro(TmDp *d, float *grads, DlError *e);
// The step after the last micro-batch; loss is the global mean over every micro-batch of every rank.
int tm_dp_step(TmDp *d, float *grads, double loss, OptimResult *r, DlError *e);
// Device bytes of the AdamW moments this rank holds (8 per owned element).
double tm_dp_moment_bytes(const Optim *o);
// Overlap of the reductions with the backward (opt-in: tm_dp_new's overlap, or DISTILL_DP_OVERLAP=1 in its
// environment). Call tm_dp_before_backward before the backward that completes a micro-batch's
// gradient (last: the step's last micro-batch); with overlap on, when that backward's gradient is due for
// reduction (every micro-batch at ZeRO-2, the last one at ZeRO-0/1), the engine reports its progress
// (engine_cuda_set_grad_hook) and each bucket's reduction is enqueued on the communicator's stream
// (nccl_comm_stream) as soon as the backward has enqueued the bucket's last gradient, ordered after it by an
// event (zero.h's bucket levels say which buckets are final when). tm_dp_micro / tm_dp_step then make the
// compute stream wait for them instead of reducing. The operations are the unoverlapped ones, bucket by bucket:
// ZeRO-1/2 the same ncclReduce of each bucket slice onto its owner (grouped per bucket instead of all at once),
// ZeRO-0 an all-reduce per bucket instead of one of the whole buffer. With 2 ranks every element is a sum of two
// numbers, which IEEE addition gives identically in any order: bitwise the unoverlapped results; with more
// ranks NCCL's internal order may follow the operation's size (deterministic for a fixed world and layout).
// Off (default), or a backward not announced (teacher-forced layers, custom losses): the present path.
// ZeRO-2's gradient memory (opt-in: on, i.e. hardware.stage_grads, unless DISTILL_DP_STAGE_GRADS=1/0 says otherwise;
// ZeRO-2 only; turns overlap on): replaces *grads
// (from tm_grads_new, freed here) by a buffer with the same layout of which only this rank's slices, the pages
// it shares and K staging slots have memory (kernels/engine/grad_stage.h, zero.h zero_stage_plan): every bucket's
// other pages exist only between the backward writing them and its reduction onto the owners. Same numbers bit
// for bit. Every backward must then be announced (tm_dp_before_backward): a teacher-forced layerwise stage or a
// custom loss stops with an error naming the switch (train_loop.c passes on = false in teacher-forced layerwise
// stages). tm_grads_zero / tm_grads_free / tm_device_bytes know the buffer. 0 and *grads unchanged when off.
int tm_dp_stage_grads(TmDp *d, float **grads, bool on, DlError *e);
bool tm_dp_overlap(const TmDp *d);
int tm_dp_before_backward(TmDp *d, float *grads, bool last_micro, DlError *e);
