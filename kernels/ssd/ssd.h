// ssd.h: the Mamba-2 state-space dual (SSD) scan, chunked, as mamba_ssm's `mamba_chunk_scan_combined`
// computes it (shared/research/kernels.md §4), in the token-major layout the whole mixer uses:
//   x [B,L,H,P]   dt [B,L,H]   A [H]   Bm, Cm [B,L,G,N]   D [H] (optional)   dt_bias [H] (optional)
// Heads share groups: head h reads group h / (H/G) of Bm and Cm.
//
// Math, per batch b and head h (g = its group), state S [P,N]:
//   delta_t = softplus(dt[t,h] + dt_bias[h])      (threshold 20 as F.softplus; or dt + dt_bias if !dt_softplus,
//                                                  which must then be >= 0, as A < 0: decays never grow)
//   S_t     = exp(delta_t*A[h]) * S_{t-1} + delta_t * x[t,h,:] ⊗ Bm[t,g,:]
//   y[t,h,p] = sum_n S_t[p,n] * Cm[t,g,n] + D[h] * x[t,h,p]
// Resets: where reset[b,t] != 0 a new document starts at t: the state is zeroed before step t (so h0 only
// matters up to the first reset). h0 [B,H,P,N] (optional) is the state before t = 0.
//
// Algorithm (chunk size Q, kernels.md §4.2): per chunk, the intra-chunk part is the quadratic form
// y_m += sum_{k<=m} (C_m·B_k) exp(sum_{j=k+1..m} dA_j) delta_k x_k, and the chunk's incoming state adds
// exp(sum_{j<=m} dA_j) S_in C_m; the state is then passed to the next chunk. Decays are exponentials of sums
// of dA = delta*A <= 0 over an interval, accumulated directly (never as a difference of two cumulative sums),
// so every exponent is <= 0 by construction (the overflow bug of kernels.md §8.4 cannot occur).
//
// CPU twin: fp32 storage, fp32 arithmetic with the sums over time that feed exponents in fp32 too; OpenMP
// over (batch, head); every reduction over batch, time or heads runs in a fixed order (deterministic);
// all offsets are 64-bit.
#pragma once
#include <stdint.h>

typedef struct {
    int64_t batch, seqlen;
    int64_t nheads, headdim;  // H, P
    int64_t ngroups, dstate;  // G (H % G == 0), N
    int64_t chunk;            // Q >= 1 (any value; results agree up to rounding)
    int dt_softplus;          // 1: delta = softplus(dt + dt_bias); 0: delta = dt + dt_bias
} SsdShape;

// Forward. y [B,L,H,P] written. h_last [B,H,P,N] (optional): the state after the last token.
// keep [B] with h_keep [B,H,P,N] (optional): h_keep receives the state after the first keep[b] tokens of row b
// (0 <= keep[b] <= L; 0 gives h0, or zeros), e.g. the accepted prefix of K speculative tokens, computed
// directly without storing every intermediate state. h_keep and h_last may alias h0 (each row's h0 is read
// before its outputs are written).
void ssd_fwd_cpu(const SsdShape *s, const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                 const float *D, const float *dt_bias, const uint8_t *reset, const float *h0, float *y, float *h_last,
                 const int32_t *keep, float *h_keep);

// Backward given dy [B,L,H,P] and optionally dh_last [B,H,P,N] (the gradient flowing into h_last).
// Writes (does not accumulate): dx [B,L,H,P], ddt [B,L,H] (w.r.t. the raw dt), dA [H], dBm, dCm [B,L,G,N],
// dD [H] (if D and dD), ddt_bias [H] (if dt_bias and ddt_bias), dh0 [B,H,P,N] (if h0 and dh0).
// Forward quantities are recomputed. Deterministic (fixed-order reductions).
void ssd_bwd_cpu(const SsdShape *s, const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                 const float *D, const float *dt_bias, const uint8_t *reset, const float *h0, const float *dy,
                 const float *dh_last, float *dx, float *ddt, float *dA, float *dBm, float *dCm, float *dD,
                 float *ddt_bias, float *dh0);
