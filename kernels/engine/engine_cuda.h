// engine_cuda.h: the CUDA twin of the CPU engine (distill/engine.h), callable from C. Same model (teacher or
// attention + Mamba-1 hybrid), same registry layout, same call sequence:
//   engine_cuda_forward -> engine_cuda_loss (head + loss streamed in row chunks) [-> add_hidden_grad]
//   -> engine_cuda_backward (fp32 gradients ADDED into a device buffer from engine_cuda_grads_new)
//   -> engine_cuda_optim_step (grad norm, clipping, AdamW on the device; writes the bf16 compute copy).
// Built from kernels/train (GEMMs, norms, RoPE, SwiGLU, attention, losses, AdamW) and kernels/scan (conv1d +
// selective scan); design and limits in docs/CUDA_BACKEND.md ("engine_cuda").
//
// Precision. dt = DT_BF16 (training): bf16 compute copy of the weights and bf16 activations, fp32 master
// weights, gradients and moments. dt = DT_F32 (parity): everything fp32; only for models without Mamba
// layers, because the scan and conv kernels are bf16-only.
// Memory. Parameters: the compute copy of every tensor (dt, registry offsets) and, in bf16 mode, a COMPACT fp32
// master holding only the tensors this engine trains (registry trainable, unless ECU_NO_MASTER) plus the Mamba
// tensors the kernels read in fp32 (conv1d weight and bias, A_log, D, dt_proj.bias); in fp32 mode the master is
// the compute copy. Gradients (and the device AdamW moments) hold the trained tensors only, compact, in
// registry order (engine_cuda_grads_*). Activations: a table of named buffers (engine_cuda_print_memory) sized
// from (h, B, T, flags), in ONE allocation. engine_cuda_plan gives all of these without a GPU (the --dry-run
// plan, distill/plan.c, models the same formula). Running out of memory prints the plan and what would fit,
// and engine_cuda_new returns NULL.
// Errors: a failing CUDA call exits with the call, file:line and a hint (kernels/train/train_check.cuh);
// shape limits are checked in engine_cuda_new and reported through DlError.
// Determinism: every kernel used is deterministic, so two runs give identical bits.
#pragma once
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
#ifndef _Noreturn
#define _Noreturn [[noreturn]]  // distill/common.h is C11; its dl_die keeps its meaning in CUDA C++
#endif
extern "C" {
#endif

#include "distill/common.h"
#include "distill/dtype.h"
#include "distill/engine.h"
#include "distill/model.h"
#include "distill/optim.h"
#include "distill/registry.h"

typedef struct EngineCuda EngineCuda;

enum {
    ECU_TRAIN = 1,          // keep activations for the backward (= ENGINE_TRAIN)
    ECU_KEEP_HIDDEN = 2,    // keep every hidden state (= ENGINE_KEEP_HIDDEN)
    ECU_RECOMPUTE_MLP = 4,  // do not keep the MLP's [N, 3 ff] activations: recompute them in the backward
    ECU_TEACHER_KL = 8,     // reserve a teacher-logits chunk (losses with a teacher engine)
    ECU_NO_MASTER = 16,     // frozen model (a teacher): trains nothing whatever the registry says; no fp32 master
                            // beyond the fp32-read Mamba tensors
    ECU_EXTERN_WEIGHTS = 32,  // no compute copy: the caller points every tensor at device memory it owns
                              // (engine_cuda_set_weight), e.g. per layer from a layer hook (kernels/engine/
                              // teacher_shard.h). Frozen bf16 models without Mamba layers only (with ECU_NO_MASTER);
                              // params of engine_cuda_new is then unused (may be NULL)
};

// Default rows of logits per loss chunk (chunk_rows = 0): max(1, ECU_CHUNK_LOGITS / vocab), at most B*T. 2^27
// logits (1046 rows at vocab 128256, 256 MiB of bf16 per chunk buffer): the head GEMMs need ~1k rows to run at the
// GEMM rate; at 2^24 (130 rows) the 8-layer Llama-3-8B-shaped step took 123.9 ms, at 1024 rows 106.0 and at 4096
// 105.9 (H100, bc76de5, docs/BENCHMARKS.md)
#define ECU_CHUNK_LOGITS (128 << 20)

// params: host fp32 buffer in registry layout (uploaded; the host copy is not kept). dt: DT_BF16 or DT_F32.
// chunk_rows: rows of logits per loss chunk (0: about 128M logits). Prints the memory table to `log` (NULL:
// silent). Returns NULL with e filled on a bad shape or out of memory.
EngineCuda *engine_cuda_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t T,
                            int flags, DType dt, int64_t chunk_rows, FILE *log, DlError *e);
void engine_cuda_free(EngineCuda *e);
// true when the engine's attention runs through cuDNN's fused SDPA (DISTILL_ATTN, default cudnn for bf16 engines):
// its P·V takes P in bf16, so a CPU reference of it rounds P too (attention_cpu_round_p)
bool engine_cuda_cudnn_attention(const EngineCuda *e);
// Device memory of the engine in bytes: weights (compute copy + master + padded copies), activations (the table).
void engine_cuda_memory(const EngineCuda *e, double *weights, double *activations);
void engine_cuda_print_memory(const EngineCuda *e, FILE *f);

// Memory by purpose, in bytes.
typedef struct {
    double compute;      // compute copy of every tensor (2 or 4 bytes x r->numel); in fp32 mode also the master
    double master;       // compact fp32 master (bf16 mode): trained tensors + the fp32-read Mamba tensors
    double padded;       // padded dt_proj_down / dt_proj copies (dt) and their fp32 gradient scratch
    double activations;  // the activation table, one allocation (logits chunks included)
    double logits;       // of which the logits chunk (and the teacher-logits chunk with ECU_TEACHER_KL)
    double grads;        // one buffer of engine_cuda_grads_new (allocated by the caller, not in the above)
} EngineCudaMemory;
void engine_cuda_memory_parts(const EngineCuda *e, EngineCudaMemory *m);
// What engine_cuda_new with these arguments would allocate, computed on the host by the same code (no CUDA
// call: runs on a machine without a GPU). Returns 0, or -1 with err filled where engine_cuda_new would refuse.
int engine_cuda_plan(const HybridConfig *h, const Registry *r, int64_t B, int64_t T, int flags, DType dt,
                     int64_t chunk_rows, EngineCudaMemory *m, DlError *err);

// Re-uploads host params (fp32, registry layout): every tensor into the compute copy, the master's tensors into
// the master. Call between steps (without memory for a staging buffer it stages through the activations).
void engine_cuda_set_params(EngineCuda *e, const float *params);
// Writes the master's tensors (fp32) at their registry offsets of host params and leaves every other element
// alone: a tensor without a master is never changed by the engine, so the host copy stays its truth (its
// device copy is only bf16). Nothing is written when the engine has no master.
void engine_cuda_get_params(const EngineCuda *e, float *params);
float *engine_cuda_master(EngineCuda *e);  // device fp32 [compact]; NULL when no tensor has a master
int64_t engine_cuda_master_offset(const EngineCuda *e, int tensor);  // element offset in it, -1: none

// ---- gradients: device fp32 in the engine's compact layout (the tensors it trains, registry order, each at a
// multiple of DL_TENSOR_ALIGN elements). Every grads argument below and above is such a buffer.
int64_t engine_cuda_grads_numel(const EngineCuda *e);
int64_t engine_cuda_grad_offset(const EngineCuda *e, int tensor);  // element offset, -1: not trained
float *engine_cuda_grads_new(EngineCuda *e);  // zeroed; free with engine_cuda_dfree
// host [r->numel] in registry layout <- grads (zeros for the tensors not trained and the padding)
void engine_cuda_grads_to_host(const EngineCuda *e, const float *grads, float *host);
// grads <- host [r->numel] in registry layout (its tensors not trained are ignored)
void engine_cuda_grads_from_host(const EngineCuda *e, float *grads, const float *host);

// Forward: tokens [B*T] and reset [B*T] (or NULL) are HOST arrays (validated: ids < vocab).
int engine_cuda_forward(EngineCuda *e, const int32_t *tokens, const uint8_t *reset, DlError *err);
// Layers [l0, l1) from hidden state x0 (device, dt, [N, d]) instead of the embeddings (x0 NULL: l0 == 0).
int engine_cuda_forward_range(EngineCuda *e, const int32_t *tokens, const uint8_t *reset, int l0, const void *x0,
                              int l1, DlError *err);
// Hidden state i (device, dt, [N, d]); NULL when not kept. Final norm output: engine_cuda_final_hidden.
const void *engine_cuda_hidden(const EngineCuda *e, int i);
const void *engine_cuda_final_hidden(const EngineCuda *e);
// Logits of rows [r0, r1) into out (device, dt, [(r1-r0), V]).
void engine_cuda_logits(const EngineCuda *e, int64_t r0, int64_t r1, void *out);
// The same into host memory as fp32 [(r1-r0), V] (through the engine's logits chunk; for evaluation).
void engine_cuda_logits_host(const EngineCuda *e, int64_t r0, int64_t r1, float *out);

typedef struct {
    LossWeights w;
    double norm;                 // 0: number of counted rows
    const EngineCuda *teacher;   // teacher engine that ran forward on the same batch (same dt), or NULL
    const float *seq_weight;     // host [B] or NULL
} LossSpecCuda;

// Loss against host targets [N] / mask [N]. grads (engine_cuda_grads_new) != NULL: keeps d loss /
// d final hidden for the backward and adds the head's gradient (if trainable). seq_logprob host [B] optional.
LossParts engine_cuda_loss(EngineCuda *e, const int32_t *targets, const uint8_t *mask, const LossSpecCuda *spec,
                           float *grads, double *seq_logprob);
// Adds scale * dh (device, dt, [N, d]) to the gradient of hidden state i.
void engine_cuda_add_hidden_grad(EngineCuda *e, int i, const void *dh, float scale);
// Hidden-state MSE against target (device, dt, [N, d]; e.g. the teacher's hidden state): returns scale x the
// sum over rows with mask[r] != 0 (host [N], NULL: all) of |h_i - target|^2 (losses.c mse_rows), and with
// grad adds its gradient to hidden state i's gradient for the next backward. Hidden state i must be kept.
double engine_cuda_mse_hidden(EngineCuda *e, int i, const void *target, const uint8_t *mask, double scale, bool grad);
// Backward; grads (engine_cuda_grads_new) are ADDED into, for the trained tensors; the pass stops below the
// lowest trained layer.
void engine_cuda_backward(EngineCuda *e, float *grads);

// Progress of the backward, for overlapping data-parallel reductions with it (distill/train_model.c, tm_dp_*):
// fn(ctx, level) is called on the host by engine_cuda_backward each time the work that finishes some gradients
// has been ENQUEUED on the engine's stream (an event recorded on that stream then marks their completion), with
// zero.h's levels: the highest layer the pass starts above + 1 (n_layer in a full pass: the head and the final
// norm are final), then l after decoder layer l's backward, then -1 at the end (embeddings): every gradient of a
// tensor whose level (zero_tensor_level) is >= the argument is final for this backward. NULL: no calls (default).
typedef void (*EngineCudaGradHook)(void *ctx, int level);
void engine_cuda_set_grad_hook(EngineCuda *e, EngineCudaGradHook fn, void *ctx);

// ---- weights held outside the engine (ECU_EXTERN_WEIGHTS; kernels/engine/teacher_shard.h)
// Registry tensor `tensor` is read from dev (device, the engine's dtype, the tensor's shape; 16-byte aligned) by the
// work enqueued from now on. -1 with err on an engine without ECU_EXTERN_WEIGHTS or a bad index.
int engine_cuda_set_weight(EngineCuda *e, int tensor, const void *dev, DlError *err);
// Forward layer hook: fn(ctx, l, l1, err) is called on the host just before decoder layer l of a forward pass over
// layers [.., l1) is enqueued on the engine's stream, so that it can point layer l's tensors at their weights
// (engine_cuda_set_weight) and make the stream wait for them; a nonzero return makes the forward return -1 with err.
// NULL: no calls (default). Without a hook an ECU_EXTERN_WEIGHTS forward needs every tensor set beforehand.
typedef int (*EngineCudaLayerHook)(void *ctx, int layer, int l1, DlError *err);
void engine_cuda_set_layer_hook(EngineCuda *e, EngineCudaLayerHook fn, void *ctx);

// ---- optimizer on the device: optim_step's rules exactly (optim_decide: non-finite and outlier skips,
// global-norm clipping, the schedule; optim_tensor_k: per-tensor lr multipliers and weight decay), AdamW on
// the device over the engine's trainable tensors. The host Optim holds the configuration and the counters;
// the moments live on the device (fp32, or bf16 with stochastic rounding), compact per trainable tensor, and
// are copied into the host Optim's m, v (fp32, at mv_off) by pull — for a checkpoint — and back by push.
// The host Optim has the engine's registry layout. If it carries ZeRO-1/2 shard ranges (optim.h: compact m, v
// over the owned ranges [shard_begin, shard_end)), the device moments mirror that compact layout (1/world of the
// state) and a step updates only the owned elements of the master and the compute copy; the data-parallel
// caller then sums the gradient onto each owner before the step and hands the updated master pieces to every
// rank after it (distill/train_model.c, over NCCL), and calls engine_cuda_optim_gathered.
typedef struct EngineCudaOptim EngineCudaOptim;
EngineCudaOptim *engine_cuda_optim_attach(EngineCuda *e, Optim *host, DType mv_dt, DlError *err);
// The same with a host Optim of its own made from c (tests, benchmarks).
EngineCudaOptim *engine_cuda_optim_new(EngineCuda *e, const OptimConfig *c, DType mv_dt, DlError *err);
void engine_cuda_optim_free(EngineCudaOptim *o);
double engine_cuda_optim_bytes(const EngineCudaOptim *o);  // device memory of the moments and workspaces
void engine_cuda_optim_pull(EngineCudaOptim *o);  // device moments -> host Optim m, v
void engine_cuda_optim_push(EngineCudaOptim *o);  // host Optim m, v -> device moments
// Global L2 norm of grads (engine_cuda_grads_new) over the trained tensors, times scale (fp64 sums).
double engine_cuda_grad_norm(EngineCudaOptim *o, const float *grads, double scale);
// grads (engine_cuda_grads_new) summed over grad_accum micro-batches. Updates the master and the compute
// copy. r gets lr, grad_norm, clip_scale, outcome (the host Optim's counters advance as optim_step's).
void engine_cuda_optim_step(EngineCudaOptim *o, const float *grads, double loss, OptimResult *r);
// ---- ZeRO-1/2 (a sharded host Optim)
// Sum of squares of grads over the owned ranges only (fp64, fixed order): a rank's share of the global norm.
double engine_cuda_optim_sq_norm(EngineCudaOptim *o, const float *grads);
// The step with the caller's global norm of the averaged gradient (NaN: skip, as optim_decide): updates the owned
// ranges of the master and of the compute copy. Unsharded, engine_cuda_optim_step is this with its own norm.
void engine_cuda_optim_step_norm(EngineCudaOptim *o, const float *grads, double loss, double norm, OptimResult *r);
// Zeroes the elements of grads outside the owned ranges (enqueued on the engine's stream): ZeRO-2 after each
// micro-batch's reduction, so the next micro-batch's gradient adds onto this rank's running sum only.
void engine_cuda_optim_keep_owned(EngineCudaOptim *o, float *grads);
// After the other ranks' updated master pieces were written into the master (engine_cuda_master): the compute
// copy of those elements (rounded to nearest, as the update rounds its own) and the padded dt weights.
void engine_cuda_optim_gathered(EngineCudaOptim *o);

// Device helpers for programs (C code cannot call cudaMalloc without the runtime headers).
void *engine_cuda_alloc(size_t bytes);  // zeroed; exits with the memory hint on failure
void engine_cuda_dfree(void *p);
void engine_cuda_memset0(void *p, size_t bytes);
void engine_cuda_copy_to_host(void *dst, const void *src, size_t bytes);
void *engine_cuda_stream(EngineCuda *e);  // the engine's cudaStream_t (its work is ordered on it)
void engine_cuda_sync(void);
// Zeroes a gradient buffer (engine_cuda_grads_new; enqueued on the engine's stream).
void engine_cuda_zero_trainable(EngineCuda *e, float *grads);

#ifdef __cplusplus
}
#endif
