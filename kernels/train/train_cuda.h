// train_cuda.h: CUDA building blocks of the bf16 training backend (issue 7), callable from C.
// Each function is the GPU twin of an engine CPU function (distill/layers_cpu.h, losses.h, optim.h) with
// the same math, layout and argument meaning: token-major activations [N, C] (N = B*T rows), HF weight
// layout W [out, in], attention q [N, nh*hd], k/v [N, nkv*hd], lse [B, nh, T].
//
// Dtypes. `dt` selects the activation dtype of a call: DT_BF16 (the training mode: bf16 storage, fp32
// arithmetic and accumulation) or DT_F32 (the parity mode, checked against the CPU engine to ~1e-5).
// Pointers typed `void *` hold elements of dt; bf16 elements are uint16_t bit patterns on the C side.
// Small per-feature weights read by a kernel (RMSNorm w) have dtype dt too (the compute copy);
// weight gradients, RMSNorm rstd, attention lse, master weights and AdamW moments are fp32 unless a
// function says otherwise.
//
// Determinism: no float atomics anywhere; every reduction has a fixed partition and order, so two runs
// give identical bits. Every pointer is a device pointer unless marked host; every function only enqueues
// work on `stream` (NULL: the default stream) and returns 0, or -1 with a message in err (may be NULL)
// when the shape or dtype is outside what the kernels support (nothing is launched then).
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {  // the distill headers are C: their functions keep C linkage when included from CUDA C++
#endif

#include "distill/dtype.h"
#include "distill/losses.h"

typedef struct CUstream_st *dl_stream_t;  // = cudaStream_t

// ---------------------------------------------------------------- GEMM (cuBLASLt)
// One handle per device/stream user: owns the cuBLASLt handle, a workspace and a cache of descriptors and
// the algorithm chosen for each shape (the first heuristic result, or with DISTILL_GEMM_TUNE=1 the fastest of
// the first 8 as tuned once per process and cache file, gemm_lt.cu; fixed for the life of the handle, with
// split-K schemes that reduce in place excluded, so a shape always runs the same deterministic kernel).
typedef struct DlGemm DlGemm;
DlGemm *dl_gemm_new(size_t workspace_bytes, char *err, size_t errlen);  // 0: 32 MiB
void dl_gemm_free(DlGemm *g);
// Tests: forget the process-wide tuned choices; the next new shape reads DISTILL_GEMM_TUNE(_FILE) and the file
// again, as a new process would.
void dl_gemm_tune_reload(void);

// Row-major C [m, n] = alpha * op(A) @ op(B) + beta * C (+ bias [n] broadcast over rows).
// op(A) [m, k]: A stored [m, k], or [k, m] if transA. op(B) [k, n]: B stored [k, n], or [n, k] if transB.
// A and B have dtype ab_dt (DT_BF16 or DT_F32); C has c_dt (DT_BF16 or DT_F32; DT_F32 with bf16 inputs
// is the fp32 gradient accumulation). bias (optional, dtype c_dt) is fused as the epilogue.
// Arithmetic is fp32 (no TF32). Pointers must be 16-byte aligned and leading dimensions multiples of 8.
int dl_gemm(DlGemm *g, int m, int n, int k, DType ab_dt, const void *A, int transA, const void *B, int transB,
            DType c_dt, void *C, const void *bias, float alpha, float beta, dl_stream_t stream, char *err,
            size_t errlen);
// The three GEMMs of nn.Linear (W [O, In], x [N, In], y [N, O]), as linear_fwd / linear_bwd:
//   y  [N, O]  (+)= x @ W^T          (beta = accumulate; bias [O] optional)
//   dx [N, In] (+)= dy @ W
//   dW [O, In] (+)= dy^T @ x         (dW usually fp32 with accumulate = 1: gradient accumulation)
int dl_linear_fwd(DlGemm *g, DType dt, void *y, const void *x, const void *W, const void *bias, int64_t N,
                  int64_t In, int64_t O, int accumulate, dl_stream_t stream, char *err, size_t errlen);
int dl_linear_dgrad(DlGemm *g, DType dt, void *dx, const void *dy, const void *W, int64_t N, int64_t In, int64_t O,
                    int accumulate, dl_stream_t stream, char *err, size_t errlen);
int dl_linear_wgrad(DlGemm *g, DType dt, DType dw_dt, void *dW, const void *dy, const void *x, int64_t N, int64_t In,
                    int64_t O, int accumulate, dl_stream_t stream, char *err, size_t errlen);

// ---------------------------------------------------------------- RMSNorm (+ residual)
// Without residual (res_in NULL): out = w * x / rms(x), as rmsnorm_fwd. With residual: h = x + res_in is
// written to res_out (may alias x or res_in) and out = norm(h): the decoder's "h = x + mixer(..)" fused
// with the next norm. rstd [N] fp32 (optional). d <= 16384.
int rmsnorm_fwd_cuda(DType dt, void *out, float *rstd, void *res_out, const void *x, const void *res_in,
                     const void *w, int64_t N, int64_t d, float eps, dl_stream_t stream, char *err, size_t errlen);
// din [N, d] += dx (added, as rmsnorm_bwd: the residual gradient already in din passes through);
// dw [d] fp32 += sum over rows (if dw; deterministic through workspace of rmsnorm_bwd_workspace bytes).
// `in` is the normalized input (h of the forward).
size_t rmsnorm_bwd_workspace(int64_t N, int64_t d);
int rmsnorm_bwd_cuda(DType dt, void *din, float *dw, const void *dout, const void *in, const void *w,
                     const float *rstd, int64_t N, int64_t d, void *workspace, dl_stream_t stream, char *err,
                     size_t errlen);

// ---------------------------------------------------------------- RoPE
// x [N, nheads, hd] rotated in place by angle pos[n] * inv_freq[i] (HF rotate_half pairs (i, i + hd/2));
// inverse rotates by -angle (the backward). inv_freq [hd/2] fp32 from rope_inv_freq (llama3 scaling
// included), uploaded by the caller. hd even, <= 1024.
int rope_cuda(DType dt, void *x, const int32_t *pos, const float *inv_freq, int64_t N, int nheads, int hd,
              int inverse, dl_stream_t stream, char *err, size_t errlen);
// Two tensors at the same positions in one launch (q [N, nheads, hd] and k [N, nheads2, hd]): the same bits as a
// rope_cuda call for each. x2 NULL: x alone.
int rope2_cuda(DType dt, void *x, int nheads, void *x2, int nheads2, const int32_t *pos, const float *inv_freq,
               int64_t N, int hd, int inverse, dl_stream_t stream, char *err, size_t errlen);

// ---------------------------------------------------------------- SwiGLU
// out [rows, cols] = silu(gate) * up, where gate and up are [rows, cols] with leading dimension ld (>= cols:
// ld = 2*ff lets gate/up be the two halves of one fused [N, 2*ff] GEMM output). Backward writes dgate, dup
// with the same leading dimension ld (dgate/dup may alias gate/up).
int swiglu_fwd_cuda(DType dt, void *out, const void *gate, const void *up, int64_t rows, int64_t cols, int64_t ld,
                    dl_stream_t stream, char *err, size_t errlen);
int swiglu_bwd_cuda(DType dt, void *dgate, void *dup, const void *dout, const void *gate, const void *up,
                    int64_t rows, int64_t cols, int64_t ld, dl_stream_t stream, char *err, size_t errlen);

// ---------------------------------------------------------------- embedding
// out [N, d] = wte[tokens[n]] (wte [V, d] of dtype dt). Tokens are checked on the device: an id outside
// [0, V) writes a NaN row (the caller validates tokens on the host; this keeps a bad id visible).
int embedding_fwd_cuda(DType dt, void *out, const int32_t *tokens, const void *wte, int64_t N, int64_t V,
                       int64_t d, dl_stream_t stream, char *err, size_t errlen);
// Deterministic backward without atomics: a host-side stable counting sort of the batch's tokens gives, for
// each distinct token u, the rows that use it in increasing order; one block sums them in that order and
// adds into dwte[u] (fp32). plan arrays (host, filled by embedding_bwd_plan): order [N], seg [N+1],
// uniq [N]; returns the number U of distinct tokens (or -1 if a token is outside [0, V)).
int64_t embedding_bwd_plan(const int32_t *tokens_host, int64_t N, int64_t V, int32_t *order, int32_t *seg,
                           int32_t *uniq, char *err, size_t errlen);
// dwte [V, d] fp32 += rows of dout [N, d] (dt), with the plan uploaded to the device.
int embedding_bwd_cuda(DType dt, float *dwte, const void *dout, const int32_t *order, const int32_t *seg,
                       const int32_t *uniq, int64_t U, int64_t d, dl_stream_t stream, char *err, size_t errlen);

// ---------------------------------------------------------------- losses over the vocabulary
// loss_rows on the GPU, never storing probabilities: one block per row streams it three times at most, or (bf16
// rows, V % 8 == 0, 16-byte aligned, V <= 262144; DISTILL_LOSS_ROWS=cluster) a cluster of blocks reads it once. teacher [n, V] (dt) needed if kl or rkl != 0; targets
// [n] int32, mask [n] u8 (NULL: all), row_weight [n] fp32 (NULL: 1). dlogits [n, V] (dt; may alias logits;
// NULL: no gradient) gets scale * d(w.ce ce + w.kl kl + w.rkl rkl)/ds; rows with mask 0 get zeros.
// rows_out [n, 4] fp64 gets per row (ce, kl, rkl, counted) exactly as loss_rows sums them; logp_target [n]
// fp32 (optional) as in loss_rows. loss_sum_cuda then adds the rows in order into acc [4] (fp64).
int loss_rows_cuda(DType dt, const LossWeights *w, int64_t n, int64_t V, const void *logits, const void *teacher,
                   const int32_t *targets, const uint8_t *mask, const float *row_weight, double scale, void *dlogits,
                   double *rows_out, float *logp_target, dl_stream_t stream, char *err, size_t errlen);
int loss_sum_cuda(const double *rows, int64_t n, double *acc, dl_stream_t stream, char *err, size_t errlen);

// ---------------------------------------------------------------- attention (hand-written)
// Causal GQA attention with document masks, the twin of attention_fwd / attention_bwd (training shapes:
// Tq = Tk = T, q0 = 0). doc_start [B*T] int32 (absolute key index of the query's document start; NULL: 0).
// hd in {64, 128}. out [B*T, nh*hd] (dt), lse [B, nh, T] fp32 (needed by the backward).
int attention_fwd_cuda(DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, const void *q, const void *k,
                       const void *v, const int32_t *doc_start, void *out, float *lse, dl_stream_t stream, char *err,
                       size_t errlen);
// In bf16 with 16-byte aligned pointers, forward and backward run on the tensor cores (mma.sync m16n8k16,
// bf16 operands with P and dS rounded to bf16, fp32 accumulation and softmax statistics); otherwise, and
// when switched off here (tests, benchmarks), on the fp32 CUDA-core kernels.
void attention_use_tensor_cores(int on);
// Writes dq, dk, dv (dt). Scores are recomputed from lse; each output row is owned by one thread and summed
// in a fixed order (dk/dv over the query heads of its group in order). workspace: attention_bwd_workspace.
size_t attention_bwd_workspace(int64_t B, int64_t T, int nh);
int attention_bwd_cuda(DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, const void *q, const void *k,
                       const void *v, const int32_t *doc_start, const void *out, const float *lse, const void *dout,
                       void *dq, void *dk, void *dv, void *workspace, dl_stream_t stream, char *err, size_t errlen);

// ---------------------------------------------------------------- optimizer
// Sum of squares of g [n] (fp32) added into *acc (fp64, device), deterministic: a fixed grid of blocks
// writes partial sums to workspace (grad_sumsq_workspace bytes), one block adds them in order. The global
// norm is sqrt(sum over the trainable ranges) * scale (optim_grad_norm); clipping folds into gscale below.
size_t grad_sumsq_workspace(int64_t n);
int grad_sumsq_cuda(const float *g, int64_t n, double *acc, void *workspace, dl_stream_t stream, char *err,
                    size_t errlen);
// In-place scale of a gradient range (standalone clipping): g *= s.
int grad_scale_cuda(float *g, int64_t n, float s, dl_stream_t stream, char *err, size_t errlen);

// AdamW over one range with one set of hyper-parameters, the per-element math of optim_step in the same
// fp32 operation order (no fused multiply-adds), so fp32 moments give the CPU's bits:
//   g' = g * gscale; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2; p = p * decay - step_size * m / (sqrt(v) *
//   inv_sqrt_bc2 + eps), with decay = 1 - lr*wd, step_size = lr / (1 - b1^t), inv_sqrt_bc2 = 1/sqrt(1 - b2^t).
// p [n] fp32 master; m, v [n] of mv_dt: DT_F32, or DT_BF16 (moments rounded stochastically with a hash of
// (seed, index): unbiased and deterministic). p_copy [n] (optional) receives p in copy_dt (DT_BF16: the
// compute copy of the weights, rounded to nearest).
typedef struct {
    float gscale, b1, b2, eps, decay, step_size, inv_sqrt_bc2;
    uint64_t seed;  // for stochastic rounding of bf16 moments (vary per step)
} AdamWArgs;
int adamw_cuda(const AdamWArgs *a, int64_t n, float *p, const float *g, DType mv_dt, void *m, void *v,
               DType copy_dt, void *p_copy, dl_stream_t stream, char *err, size_t errlen);

// Plain conversions (uploading master weights to a compute copy, reading activations back).
int convert_cuda(DType dst_dt, void *dst, DType src_dt, const void *src, int64_t n, dl_stream_t stream, char *err,
                 size_t errlen);

#ifdef __cplusplus
}
#endif
