// layers_cpu.h: fp32 CPU forward/backward of the Llama decoder's layers (the reference every CUDA kernel is
// checked against). Activations are row-major [N, C] with N = B*T rows (token-major), exactly as the GEMMs
// produce them. Matmuls go to OpenBLAS sgemm; loops use OpenMP with static partitions over independent
// rows or columns, so every reduction has a fixed order and results do not depend on the thread count.
// Backward functions say for each output whether they write it or add into it.
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "distill/model.h"

// ---- Linear (nn.Linear without bias, HF layout W [O, In])
// out [N, O] = in [N, In] @ W^T  (accumulate: out += ...)
void linear_fwd(float *out, const float *in, const float *W, int64_t N, int64_t In, int64_t O, bool accumulate);
// din [N, In] (+)= dout [N, O] @ W  (if din; added when din_accumulate, else written);
// dW [O, In] += dout^T @ in (if dW).
void linear_bwd(float *din, bool din_accumulate, float *dW, const float *dout, const float *in, const float *W,
                int64_t N, int64_t In, int64_t O);

// ---- Token embedding: out [N, d] = wte[tokens[n]]; wte [V, d]
void embedding_fwd(float *out, const int32_t *tokens, const float *wte, int64_t N, int64_t d);
// dwte [V, d] += scatter of dout [N, d] (each thread owns a column range: deterministic)
void embedding_bwd(float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t d);

// ---- RMSNorm (HF LlamaRMSNorm): out = w * x / sqrt(mean(x^2) + eps). rstd [N] (optional) keeps 1/rms.
void rmsnorm_fwd(float *out, float *rstd, const float *in, const float *w, int64_t N, int64_t d, float eps);
// din [N, d] += ..., dw [d] += ... (if dw); rstd from the forward.
void rmsnorm_bwd(float *din, float *dw, const float *dout, const float *in, const float *w, const float *rstd,
                 int64_t N, int64_t d);

// ---- RoPE (HF rotate_half convention: pairs (i, i + hd/2)), with Llama-3.1 "llama3" frequency scaling
// when c->rope_factor > 0. inv_freq [hd/2].
void rope_inv_freq(const LlamaConfig *c, float *inv_freq);
// x [N, nheads, hd] rotated in place by angle pos[n]*inv_freq; inverse rotates by -angle (the backward).
void rope_apply(float *x, const int32_t *pos, const float *inv_freq, int64_t N, int nheads, int hd, bool inverse);
// Positions and document starts of packed rows: a document starts at t = 0 and wherever reset[b,t] != 0.
// pos [B*T] = t - start (positions restart per document, as HF position_ids of the documents run alone);
// doc_start [B*T] = start. reset may be NULL (one document per row).
void doc_positions(int64_t B, int64_t T, const uint8_t *reset, int32_t *pos, int32_t *doc_start);

// ---- Causal GQA attention with document masks (softmax in fp32, scale 1/sqrt(hd)).
// Queries: Tq rows per batch row, query t sits at key index q0 + t and sees keys [doc_start, q0 + t].
// Keys/values: rows of k/v hold Tk key positions per batch row (a KV cache has Tk = capacity).
// Query head h uses KV head h / (nh / nkv) (repeat_kv).
typedef struct {
    int64_t B, Tq, Tk, q0;
    int nh, nkv, hd;
} AttnShape;
// q [B*Tq, nh*hd], k/v [B*Tk, nkv*hd], doc_start [B*Tq] (absolute key index, NULL: 0);
// out [B*Tq, nh*hd]; lse [B, nh, Tq] (optional): log-sum-exp of the scaled scores, for the backward.
void attention_fwd(const AttnShape *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                   float *out, float *lse);
// attention_fwd's rounding of P (the softmax weights) to bf16 before P·V, as fused flash-attention kernels (cuDNN's)
// compute it in bf16 training: on for a reference of such a device path (gpu_test_engine's cuDNN cases, distill
// parity's floor). Off by default; the diagnostic DISTILL_CPU_ATTN_ROUND=p|o|po (p: P, o: the output) overrides it.
void attention_cpu_round_p(bool on);
// Training backward (q0 = 0, Tq = Tk): writes dq, dk, dv (same shapes as q, k, v). Scores are recomputed
// from lse (no [T, T] probabilities kept). Parallel over (batch, KV head), so dk/dv sums are race-free.
void attention_bwd(const AttnShape *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                   const float *out, const float *lse, const float *dout, float *dq, float *dk, float *dv);

// ---- SwiGLU: out [n] = silu(gate) * up; backward writes dgate, dup.
void swiglu_fwd(float *out, const float *gate, const float *up, int64_t n);
void swiglu_bwd(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n);

// Sets the OpenBLAS thread count, returning the previous one (to restore it). We link OpenBLAS's OpenMP
// build, in which this ALSO sets OpenMP's thread count for our own parallel loops, and a GEMM called inside
// an OpenMP parallel region runs single-threaded by itself: so never pin around parallel regions.
int blas_set_threads(int n);

// exp(x) to about 2 ulp for x in [-87, 88] (clamped outside: exp(-87) ~ 1.6e-38 instead of underflow), by
// Cody-Waite range reduction and a degree-6 polynomial, branch-free so loops over it vectorize (libm's
// expf does not, and softmax / logsumexp loops are dominated by it). Rounding to nearest uses the
// 1.5*2^23 shifter, whose low mantissa bits then hold the exponent n.
static inline float dl_expf(float x) {
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    const float shifter = 12582912.0f;
    float t = x * 1.44269504f + shifter, fn = t - shifter;
    float r = x - fn * 0.693145751953125f - fn * 1.428606765330187e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t ti, e;
    float sc;
    memcpy(&ti, &t, sizeof ti);
    e = (ti - 0x4B400000 + 127) << 23;
    memcpy(&sc, &e, sizeof sc);
    return p * sc;
}

// exp over an array, 4 lanes at a time (SSE2 baseline, GCC vector extensions; the same math as dl_expf):
// out[i] = scale * exp(a*x[i] - sub) (out may be NULL, or alias x), returns sum_i exp(a*x[i] - sub), summed in
// fp32 lanes over blocks of 256 and the blocks in double, in a fixed order.
double dl_exp_affine(float *out, const float *x, int64_t n, float a, float sub, float scale);

// y += x (n elements)
void vec_add(float *y, const float *x, int64_t n);
