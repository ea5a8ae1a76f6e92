// selective_scan.h: the Mamba-1 selective scan and the causal depthwise conv1d as MambaInLlama's Mamba-1
// mixer uses them (shared/research/mambainllama.md §1a, kernels.md §1-3), in the layout the whole layer
// uses: token-major ("channel-last"), every activation [batch, seqlen, channels] row-major, exactly as the
// projections' GEMMs produce them, so no transposes are needed anywhere in the layer.
//
// Math, per batch b, channel d, state n (g = group of d):
//   delta = softplus(dt[b,t,d] + delta_bias[d])          (threshold 20, as F.softplus)
//   h[n]  = exp(delta*A[d,n]) * h[n] + delta * B[b,t,gB(d),n] * u[b,t,d]
//   y     = sum_n C[b,t,gC(d),n] * h[n] + D[d]*u[b,t,d];   out = y * silu(z[b,t,d])   (z optional)
// Groups: gC(d) = d / (dim/groups_c), gB(d) = d / (dim/groups_b)  (repeat_kv semantics: B group g serves
// C groups g*rep .. g*rep+rep-1).
// Resets: where reset[b,t] != 0 a new document starts at t: the state is zeroed before step t (and the conv
// window does not reach back before t). h0 (optional) is the state before t = 0.
//
// CPU twins are fp32 with fp32 accumulation; all offsets are 64-bit.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t batch, seqlen, dim, dstate;
    int64_t groups_c;  // number of C groups (dim % groups_c == 0)
    int64_t groups_b;  // number of B groups (groups_c % groups_b == 0)
} ScanShape;

// Forward. out [B,L,D]; h_last [B,D,N] (optional): the state after the last step.
void selective_scan_fwd_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                            const float *Cm, const float *Dskip, const float *z, const float *delta_bias,
                            const uint8_t *reset, const float *h0, float *out, float *h_last);

// Backward given dout [B,L,D] (and optionally dh_last [B,D,N], the gradient flowing into h_last).
// Writes (does not accumulate) every gradient: du, ddt [B,L,D]; dA [D,N]; dB [B,L,Gb,N]; dC [B,L,Gc,N];
// dD [D]; dz [B,L,D] (if z); ddelta_bias [D]; dh0 [B,D,N] (if h0 and dh0). Reductions over batch and
// time are done in a fixed order, so results are deterministic.
void selective_scan_bwd_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                            const float *Cm, const float *Dskip, const float *z, const float *delta_bias,
                            const uint8_t *reset, const float *h0, const float *dout, const float *dh_last,
                            float *du, float *ddt, float *dA, float *dB, float *dC, float *dD, float *dz,
                            float *ddelta_bias, float *dh0);

// Causal depthwise conv1d of width W (<= 4) over time, + bias, then SiLU if silu != 0.
// x [B,L,C], w [C,W] (w[c,W-1] multiplies x[t], w[c,0] multiplies x[t-W+1]), bias [C], out [B,L,C].
// x_prev [B,W-1,C] (optional): the inputs before t = 0 (decode / chunked prefill); resets cut the window.
void conv1d_silu_fwd_cpu(int64_t B, int64_t L, int64_t C, int W, const float *x, const float *w, const float *bias,
                         const uint8_t *reset, const float *x_prev, int silu, float *out);
// Backward: dx [B,L,C], dw [C,W], dbias [C] are written (not accumulated), in a fixed order.
void conv1d_silu_bwd_cpu(int64_t B, int64_t L, int64_t C, int W, const float *x, const float *w, const float *bias,
                         const uint8_t *reset, const float *x_prev, int silu, const float *dout, float *dx, float *dw,
                         float *dbias);

// ---- decode (speculative decoding) --------------------------------------------------------------------
// Multi-token step: K = s->seqlen new tokens per batch row, starting from the cached state h_in [B,D,N].
// u, dt, z, out [B,K,D]; Bm [B,K,Gb,N]; Cm [B,K,Gc,N] (the forward's layout with L = K; no resets).
// keep [B] (0 <= keep[b] <= K): h_keep [B,D,N] receives the state after the first keep[b] tokens, the
// accepted prefix of a draft; h_keep may alias h_in (the state is read before it is written). h_end
// (optional) receives the state after all K tokens. No intermediate state is stored.
void selective_scan_multi_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                              const float *Cm, const float *Dskip, const float *z, const float *delta_bias,
                              const float *h_in, const int32_t *keep, float *out, float *h_keep, float *h_end);
// One-token decode step: u, dt, z, out [B,D]; Bm [B,Gb,N]; Cm [B,Gc,N]; h [B,D,N] updated in place.
// s->seqlen is ignored. (The multi-token step with K = 1 and keep = 1.)
void selective_scan_step_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                             const float *Cm, const float *Dskip, const float *z, const float *delta_bias, float *h,
                             float *out);
// Conv decode: the conv1d forward with x_prev = conv_state [B,W-1,C] covers one or K tokens; this helper
// advances conv_state [B,W-1,C] past the first keep[b] tokens of x [B,K,C] (keep NULL: all K).
void conv1d_state_advance_cpu(int64_t B, int64_t K, int64_t C, int W, const float *x, const int32_t *keep,
                              float *conv_state);

// ---- float64 reference (tests only) -------------------------------------------------------------------
// The same functions in double precision, written as the plain sequential recurrence per (b, d) with the
// whole state history kept: the oracle for the fp32 twins and the CUDA kernels.
void selective_scan_fwd_ref64(const ScanShape *s, const double *u, const double *dt, const double *A,
                              const double *Bm, const double *Cm, const double *Dskip, const double *z,
                              const double *delta_bias, const uint8_t *reset, const double *h0, double *out,
                              double *h_last);
void selective_scan_bwd_ref64(const ScanShape *s, const double *u, const double *dt, const double *A,
                              const double *Bm, const double *Cm, const double *Dskip, const double *z,
                              const double *delta_bias, const uint8_t *reset, const double *h0, const double *dout,
                              const double *dh_last, double *du, double *ddt, double *dA, double *dB, double *dC,
                              double *dD, double *dz, double *ddelta_bias, double *dh0);
void conv1d_silu_fwd_ref64(int64_t B, int64_t L, int64_t C, int W, const double *x, const double *w,
                           const double *bias, const uint8_t *reset, const double *x_prev, int silu, double *out);
void conv1d_silu_bwd_ref64(int64_t B, int64_t L, int64_t C, int W, const double *x, const double *w,
                           const double *bias, const uint8_t *reset, const double *x_prev, int silu,
                           const double *dout, double *dx, double *dw, double *dbias);

#ifdef __cplusplus
}
#endif
