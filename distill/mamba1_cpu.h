// mamba1_cpu.h: MambaInLlama's Mamba-1 mixer on the CPU, fp32 (shared/research/mambainllama.md §1a):
// forward, backward, prefill and decode step. Activations are token-major [B, L, features] row-major, so
// every projection is one GEMM (OpenBLAS) and the scan / conv are the CPU twins of kernels/scan.
//
// Per token u [d_model] (u is the mixer input, i.e. after input_layernorm):
//   z  = W_z u [d_inner]        x = W_x u [d_xb]        Bv = W_B u [d_xb]        Cv = W_C u [d_inner]
//   dt = W_dt (W_dd u) + b_dt [d_inner]                    (dt_proj is a Linear WITH bias)
//   xr = repeat_kv(x): channel c = g*N + n reads x[(g / rep)*N + n],  rep = d_inner / d_xb, N = d_state
//   xc = silu(causal_depthwise_conv_W(xr) + conv_b)        (conv over d_inner channels, width d_conv = 4)
//   delta = softplus(dt + b_dt)                            (the dt bias is applied a second time: "double bias")
//   h[c,n] = exp(delta*A[c,n]) h[c,n] + delta * Bv[(c/N)/rep * N + n] * xc[c],   A = -exp(A_log)
//   y[c] = (sum_n Cv[(c/N)*N + n] h[c,n] + D[c] xc[c]) * silu(z[c])
//   out = W_out y [d_model]
// Resets: reset[b,t] != 0 starts a new document at t: the SSM state is zeroed and the conv window does not
// reach before t, so packed sequences equal their documents run separately.
#pragma once
#include <stdint.h>

#include "distill/model.h"
#include "distill/registry.h"

// What backward needs from forward (sized for up to B*L tokens): the input, the projections z, x, B, C and
// dt_proj_down's output, and the scan output; dt (a rank-d/16 GEMM), the repeated x and the conv output are
// recomputed in backward. Per token: d_model + 3*d_inner + 2*d_xb + dt_rank floats.
typedef struct Mamba1Acts Mamba1Acts;
Mamba1Acts *mamba1_acts_new(const HybridConfig *h, int64_t B, int64_t L);
void mamba1_acts_free(Mamba1Acts *a);

// Forward of layer `layer` (must be a Mamba-1 layer of h; tensors looked up in r by their MambaInLlama names).
// x [B,L,d_model] in; out [B,L,d_model] written; reset [B,L] or NULL; acts NULL for inference, else filled
// for mamba1_backward (capacity >= B*L tokens). out may not alias x.
void mamba1_forward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba1Acts *acts);

// Backward of the last mamba1_forward that filled acts (same B, L, reset). dout [B,L,d_model] in;
// dx [B,L,d_model] written; grads (same layout as params) has this layer's gradients ADDED into it.
// grads NULL: a frozen layer (only dx); dx NULL: the lowest trained layer (no input gradient needed).
// Deterministic: every reduction runs in a fixed order independent of the thread count.
void mamba1_backward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                     const uint8_t *reset, const float *dout, float *dx, float *grads, Mamba1Acts *acts);

// Recurrent state for generation: one per Mamba layer.
typedef struct {
    float *conv;  // [B, d_conv-1, d_inner]: the last d_conv-1 repeated-x inputs (oldest first), zero before a document
    float *ssm;   // [B, d_inner, d_state]
    int64_t B, d_inner, d_state;
    int d_conv;
} Mamba1State;
Mamba1State mamba1_state_new(const HybridConfig *h, int64_t B);  // zeroed
void mamba1_state_free(Mamba1State *st);
// Zeroes sequence b's state (b < 0: all sequences), e.g. when a new conversation starts in that slot.
void mamba1_state_reset(Mamba1State *st, int64_t b);
// dst = src (same shape); used to roll back after rejected speculative tokens.
void mamba1_state_copy(Mamba1State *dst, const Mamba1State *src);

// Prefill / chunked prefill: like mamba1_forward (inference), but starts from the state in st and leaves
// the state after the last token there. With a fresh (zeroed) st this is a prompt prefill; with the state
// of a running sequence it processes L more tokens. Resets inside the chunk cut the state as in
// mamba1_forward.
void mamba1_prefill(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba1State *st);

// Multi-token step (speculative verification): K tokens per sequence from the state in st. x [B,K,d_model],
// out [B,K,d_model] (outputs of all K tokens). keep [B] (0 <= keep[b] <= K, clamped; NULL: all K): st is
// left at the state after the first keep[b] tokens of sequence b (the accepted prefix), computed by the
// scan directly, without storing the state of every token. No resets.
void mamba1_multistep(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t K,
                      const float *x, const int32_t *keep, float *out, Mamba1State *st);

// Decode one token per sequence: x [B,d_model] in, out [B,d_model] written, st advanced (O(1) in length).
void mamba1_step(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, const float *x,
                 Mamba1State *st, float *out);
