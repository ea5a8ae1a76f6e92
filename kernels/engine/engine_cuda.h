// engine_cuda.h: the CUDA twin of the CPU engine (distill/engine.h), callable from C. Same model (teacher or
// attention + Mamba-1 hybrid), same registry layout, same call sequence:
//   engine_cuda_forward -> engine_cuda_loss (head + loss streamed in row chunks) [-> add_hidden_grad]
//   -> engine_cuda_backward (fp32 gradients ADDED into a device buffer in registry layout)
//   -> engine_cuda_optim_step (grad norm, clipping, AdamW on the device; writes the bf16 compute copy).
// Built from kernels/train (GEMMs, norms, RoPE, SwiGLU, attention, losses, AdamW) and kernels/scan (conv1d +
// selective scan); design and limits in docs/CUDA_BACKEND.md ("engine_cuda").
//
// Precision. dt = DT_BF16 (training): bf16 compute copy of the weights and bf16 activations, fp32 master
// weights, gradients and moments. dt = DT_F32 (parity): everything fp32; only for models without Mamba
// layers, because the scan and conv kernels are bf16-only.
// Memory. Parameters: one device buffer each for the fp32 master and the compute copy (registry offsets).
// Activations: a table of named buffers (engine_cuda_print_memory) sized from (h, B, T, flags), in ONE
// allocation. Running out of memory prints the plan and what would fit, and engine_cuda_new returns NULL.
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
    ECU_NO_MASTER = 16,     // frozen bf16 model (a teacher): no fp32 master copy on the device
};

// params: host fp32 buffer in registry layout (uploaded; the host copy is not kept). dt: DT_BF16 or DT_F32.
// chunk_rows: rows of logits per loss chunk (0: about 16M logits). Prints the memory table to `log` (NULL:
// silent). Returns NULL with e filled on a bad shape, a Mamba-2 layer, or out of memory.
EngineCuda *engine_cuda_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t T,
                            int flags, DType dt, int64_t chunk_rows, FILE *log, DlError *e);
void engine_cuda_free(EngineCuda *e);
// Device memory of the engine in bytes: weights (master + compute copy), activations (the table).
void engine_cuda_memory(const EngineCuda *e, double *weights, double *activations);
void engine_cuda_print_memory(const EngineCuda *e, FILE *f);

// Re-uploads host params (fp32, registry layout) into the master and compute copies.
void engine_cuda_set_params(EngineCuda *e, const float *params);
// Downloads the fp32 master (or the compute copy when there is no master) into host params.
void engine_cuda_get_params(const EngineCuda *e, float *params);
float *engine_cuda_master(EngineCuda *e);  // device fp32 [r->numel] (NULL with ECU_NO_MASTER)

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

typedef struct {
    LossWeights w;
    double norm;                 // 0: number of counted rows
    const EngineCuda *teacher;   // teacher engine that ran forward on the same batch (same dt), or NULL
    const float *seq_weight;     // host [B] or NULL
} LossSpecCuda;

// Loss against host targets [N] / mask [N]. grads (device fp32, registry layout) != NULL: keeps d loss /
// d final hidden for the backward and adds the head's gradient (if trainable). seq_logprob host [B] optional.
LossParts engine_cuda_loss(EngineCuda *e, const int32_t *targets, const uint8_t *mask, const LossSpecCuda *spec,
                           float *grads, double *seq_logprob);
// Adds scale * dh (device, dt, [N, d]) to the gradient of hidden state i.
void engine_cuda_add_hidden_grad(EngineCuda *e, int i, const void *dh, float scale);
// Hidden-state MSE against target (device, dt, [N, d]; e.g. the teacher's hidden state): returns scale x the
// sum over rows with mask[r] != 0 (host [N], NULL: all) of |h_i - target|^2 (losses.c mse_rows), and with
// grad adds its gradient to hidden state i's gradient for the next backward. Hidden state i must be kept.
double engine_cuda_mse_hidden(EngineCuda *e, int i, const void *target, const uint8_t *mask, double scale, bool grad);
// Backward; grads (device fp32, registry layout) are ADDED into, for trainable tensors only; the pass stops
// below the lowest trainable layer.
void engine_cuda_backward(EngineCuda *e, float *grads);

// ---- optimizer on the device: optim_step's rules exactly (optim_decide: non-finite and outlier skips,
// global-norm clipping, the schedule; optim_tensor_k: per-tensor lr multipliers and weight decay), AdamW on
// the device over the engine's trainable tensors. The host Optim holds the configuration and the counters;
// the moments live on the device (fp32, or bf16 with stochastic rounding), compact per trainable tensor, and
// are copied into the host Optim's m, v (fp32, at mv_off) by pull — for a checkpoint — and back by push.
// The host Optim must own whole tensors (no ZeRO shard ranges) and have the engine's registry layout.
typedef struct EngineCudaOptim EngineCudaOptim;
EngineCudaOptim *engine_cuda_optim_attach(EngineCuda *e, Optim *host, DType mv_dt, DlError *err);
// The same with a host Optim of its own made from c (tests, benchmarks).
EngineCudaOptim *engine_cuda_optim_new(EngineCuda *e, const OptimConfig *c, DType mv_dt, DlError *err);
void engine_cuda_optim_free(EngineCudaOptim *o);
Optim *engine_cuda_optim_host(EngineCudaOptim *o);
void engine_cuda_optim_pull(EngineCudaOptim *o);  // device moments -> host Optim m, v
void engine_cuda_optim_push(EngineCudaOptim *o);  // host Optim m, v -> device moments
// Global L2 norm of grads (device fp32, registry layout) over the trainable tensors, times scale (fp64 sums).
double engine_cuda_grad_norm(EngineCudaOptim *o, const float *grads, double scale);
// grads: device fp32 registry layout, summed over grad_accum micro-batches. Updates the master and the compute
// copy. r gets lr, grad_norm, clip_scale, outcome (the host Optim's counters advance as optim_step's).
void engine_cuda_optim_step(EngineCudaOptim *o, const float *grads, double loss, OptimResult *r);

// Device helpers for programs (C code cannot call cudaMalloc without the runtime headers).
void *engine_cuda_alloc(size_t bytes);  // zeroed; exits with the memory hint on failure
void engine_cuda_dfree(void *p);
void engine_cuda_memset0(void *p, size_t bytes);
void engine_cuda_copy_to_host(void *dst, const void *src, size_t bytes);
void engine_cuda_copy_to_device(void *dst, const void *src, size_t bytes);
void *engine_cuda_stream(EngineCuda *e);  // the engine's cudaStream_t (its work is ordered on it)
void engine_cuda_sync(void);
// Zeroes the gradients of the engine's trainable tensors (enqueued on the engine's stream).
void engine_cuda_zero_trainable(EngineCuda *e, float *grads);

#ifdef __cplusplus
}
#endif
