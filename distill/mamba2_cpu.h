// mamba2_cpu.h: MambaInLlama's Mamba-2 mixer on the CPU, fp32 (shared/research/mambainllama.md §1b).
// Same API shape as mamba1_cpu.h, so the engine dispatches on MixerKind with no special cases. Activations
// are token-major [B, L, features] row-major: every projection is one GEMM (OpenBLAS), the conv is the
// CPU twin of kernels/scan (conv1d_silu_*), the scan is the chunked SSD twin of kernels/ssd.
//
// Dims: H = n_head heads, P = N = head_dim (head_dim = d_state), d_inner = H*P, d_xb = n_kv_head*P,
// rep = n_head / n_kv_head, xbc = d_xb + d_xb + d_inner (conv channels), eps = rms_eps.
// Per token u [d_model] (the mixer input, i.e. after input_layernorm):
//   [z | xBC | dt] = W_in u           z [d_inner], xBC [xbc], dt [H]     (in_proj rows [z, x, B, C, dt], no bias)
//   xBC = silu(causal_depthwise_conv(xBC) + conv_b)   on the compact x/B/C, BEFORE the GQA repeat
//   x = xBC[0:d_xb], Bv = xBC[d_xb:2 d_xb], Cv = xBC[2 d_xb:]
//   head h uses x and Bv of KV head h / rep (repeat_kv), and its own C slice Cv[h*N:(h+1)*N]
//   delta_h = softplus(dt_h + dt_bias_h)   (bias applied once; threshold 20)     A_h = -exp(A_log_h)
//   S_h = exp(delta_h A_h) S_h + delta_h x_{h/rep} ⊗ Bv_{h/rep}        (a P x N state per head)
//   y_h = S_h Cv_h + D_h x_{h/rep}
//   g = y * silu(z);  yn = g / sqrt(mean_{group of P}(g^2) + eps) * norm_w   (RMSNormGated per head,
//                                                                           norm_before_gate = False)
//   out = W_out yn [d_model]
// Resets: reset[b,t] != 0 starts a new document at t: the SSM state is zeroed and the conv window does not
// reach before t, so packed sequences equal their documents run separately.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"
#include "distill/rng.h"

// Chunk size of the SSD scan on the CPU (results do not depend on it beyond rounding).
#define MAMBA2_CPU_CHUNK 64

// What backward needs from forward (sized for up to B*L tokens): the input, the projections, the conv
// output, the scan output and the norm's 1/rms; the repeated x/B and the gate are recomputed in backward.
typedef struct Mamba2Acts Mamba2Acts;
Mamba2Acts *mamba2_acts_new(const HybridConfig *h, int64_t B, int64_t L);
void mamba2_acts_free(Mamba2Acts *a);

// Forward of layer `layer` (must be a Mamba-2 layer of h; tensors looked up in r by their MambaInLlama names).
// x [B,L,d_model] in; out [B,L,d_model] written; reset [B,L] or NULL; acts NULL for inference, else filled
// for mamba2_backward (capacity >= B*L tokens). out may not alias x.
void mamba2_forward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba2Acts *acts);

// Backward of the last mamba2_forward that filled acts (same B, L, reset). dout [B,L,d_model] in;
// dx [B,L,d_model] written; grads (same layout as params) has this layer's gradients ADDED into it.
// grads NULL: a frozen layer (only dx); dx NULL: the lowest trained layer (no input gradient needed).
// Deterministic: every reduction runs in a fixed order independent of the thread count.
void mamba2_backward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                     const uint8_t *reset, const float *dout, float *dx, float *grads, Mamba2Acts *acts);

// Test hook: the CUDA mixer (kernels/engine/mamba2_cuda.cu) stores its intermediates in bf16 between kernels. On,
// this mixer rounds to bf16 at exactly those points: forward z, dt, the conv output, the SSD output y, the gated
// norm's output yn; backward d yn, d y, d z, the SSD's per-head d x, d B, d C and d dt, the KV-group sums of d x and
// d B, the conv's d xBC; and its own boundary as the engine holds it (input u, output, d out, d u). The conv input
// xBC, the norm's 1/rms and every weight gradient stay fp32 (the device keeps them so). Off by default: off, the
// bits are unchanged. DISTILL_CPU_M2_ROUND=i|b|ib (i: the intermediates, b: the boundary) overrides it, for
// diagnostics (docs/MAMBA2_CUDA.md "Accuracy").
void mamba2_cpu_round_storage(bool on);

// Recurrent state for generation: one per Mamba layer.
typedef struct {
    float *conv;  // [B, d_conv-1, xbc]: the last d_conv-1 raw xBC inputs (oldest first), zero before a document
    float *ssm;   // [B, H, P, N]
    int64_t B, xbc, nheads, headdim, d_state;
    int d_conv;
} Mamba2State;
Mamba2State mamba2_state_new(const HybridConfig *h, int64_t B);  // zeroed
void mamba2_state_free(Mamba2State *st);
// Zeroes sequence b's state (b < 0: all sequences), e.g. when a new conversation starts in that slot.
void mamba2_state_reset(Mamba2State *st, int64_t b);
// dst = src (same shape); used to roll back after rejected speculative tokens.
void mamba2_state_copy(Mamba2State *dst, const Mamba2State *src);

// Prefill / chunked prefill: like mamba2_forward (inference), but starts from the state in st and leaves
// the state after the last token there. Resets inside the chunk cut the state as in mamba2_forward.
void mamba2_prefill(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba2State *st);

// Multi-token step (speculative verification): K tokens per sequence from the state in st. x [B,K,d_model],
// out [B,K,d_model] (outputs of all K tokens). keep [B] (0 <= keep[b] <= K; NULL: all K): st is left at the
// state after the first keep[b] tokens of sequence b (the accepted prefix), computed directly by the scan
// without storing the state of every token. keep values out of range are clamped.
void mamba2_multistep(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t K,
                      const float *x, const int32_t *keep, float *out, Mamba2State *st);

// Decode one token per sequence: x [B,d_model] in, out [B,d_model] written, st advanced (O(1) in length).
void mamba2_step(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, const float *x,
                 Mamba2State *st, float *out);

// Initializes layer `layer`'s Mamba-2 tensors in hparams (hybrid registry hr) from the attention of the
// same layer in the source (registry tr, params tparams), as MambaInLlama's mamba2/hybrid_wrapper.py:
//   in_proj rows [z | x | B | C | dt]: x <- v_proj, B <- k_proj, C <- q_proj (exact copies);
//     z and dt rows ~ U(-1/sqrt(d_model), 1/sqrt(d_model))          (nn.Linear default init);
//   out_proj <- o_proj; dt_bias = softplus^-1(dt), dt = max(exp(U(log 1e-3, log 1e-1)), 1e-4);
//   A_log = log(U(1, 16)); D = 1; norm.weight = 1; conv1d weight, bias ~ U(-1/2, 1/2) (Conv1d default,
//   fan_in = 1 * d_conv).
// Draws one u64 from rng and derives one independent stream per random tensor from it, so each tensor's
// values depend only on that draw. Returns 0, or -1 with e naming the tensor and the expected shape.
int mamba2_init_layer_from_attention(const HybridConfig *h, const Registry *hr, float *hparams, const Registry *tr,
                                     const float *tparams, int layer, Rng *rng, DlError *e);
