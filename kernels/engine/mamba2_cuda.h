// mamba2_cuda.h: one MambaInLlama Mamba-2 mixer (shared/research/mambainllama.md §1b) on the device, forward and
// backward, for the CUDA engine. Exactly distill/mamba2_cpu.c's math (see mamba2_cpu.h), token-major [N, C]
// activations (N = B*L rows), bf16 storage with fp32 arithmetic:
//   z = u W_z^T, xBC = u W_xbc^T, dt = u W_dt^T     (the rows [z | x,B,C | dt] of in_proj.weight [n_in, d])
//   xBC = silu(causal_conv1d(xBC) + conv_b)           compact x/B/C, BEFORE the GQA repeat (resets cut the window)
//   ssd: head h reads x and B of KV head h/rep and its own C; delta = softplus(dt + dt_bias) (bias once),
//        A = -exp(A_log), y = ssd(x, delta, A, B, C) + D x (resets zero the state)
//   yn = rmsnorm_per_head(y * silu(z)) * norm_w       (RMSNormGated, norm_before_gate = False, eps = rms_eps)
//   out = yn W_out^T
// Kernels: three GEMMs for in_proj (its row count n_in = 2 di + 2 dxb + H is rarely a multiple of 8, which cuBLASLt's
// 16-byte rows need, and the conv wants xBC contiguous: z and xBC are row blocks of in_proj.weight read in place, xBC
// with an fp32 output, the H dt rows go through a zero-padded [Hp, d] copy refreshed by every call, Hp = H rounded up
// to 8); this file's causal conv + SiLU on the fp32 conv input (mamba2_cpu.c's conv math: a bf16 conv input is what
// amplifies the gradient error where the gated norm is ill-conditioned); ssd_fwd_cuda / ssd_bwd_cuda (kernels/ssd)
// with G = H groups: the SSD kernels
// give x one head each and share B and C per group, while MambaInLlama shares x and B per KV group and gives C one
// head each, so x and B are repeated to the H heads in a scratch buffer (and their gradients summed back per KV
// group, heads in order); the gated RMSNorm, the repeat and a few fp32 folds are this file's kernels.
// Gradients are fp32 and ADDED into the caller's buffers; every reduction has a fixed order (GEMMs through DlGemm's
// fixed algorithms, the SSD's and the conv's fixed-order sums, the norm weight's row-block partials): two runs give
// identical bits. Design, shapes and the engine hook-up: docs/MAMBA2_CUDA.md.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "distill/model.h"
#include "kernels/train/train_cuda.h"

// Dimensions of one call. di = H*P, dxb = kv*P, xbc = 2 dxb + di (conv channels), n_in = di + xbc + H.
typedef struct {
    int64_t B, L;   // rows, tokens per row (N = B*L)
    int64_t d;      // d_model
    int64_t H, P;   // heads (= n_head), head_dim (= d_state = P)
    int64_t kv;     // KV heads (n_kv_head); rep = H / kv
    int W;          // d_conv
    float eps;      // rms_eps of the gated norm
} Mamba2CudaShape;

// The shape of a Mamba-2 layer of h for B x L tokens, checked against what the kernels take: d_state = head_dim =
// P a multiple of 16 in [16, 128] (the SSD kernels), d_model a multiple of 8 (16-byte GEMM rows), n_head % n_kv_head
// == 0, d_inner = n_head*P, d_xb = n_kv_head*P, d_conv 1..4, B, L >= 1. Returns 0, or -1 with the reason in err.
int mamba2_cuda_shape(const HybridConfig *h, int64_t B, int64_t L, Mamba2CudaShape *s, char *err, size_t errlen);

// Device weights of one layer. The matrices and the norm weight are the bf16 compute copy; the per-channel tensors
// the conv and SSD kernels read in fp32 come from the fp32 master (the engine's f32read tensors).
typedef struct {
    const uint16_t *in_proj;   // [n_in, d] bf16, rows [z | x | B | C | dt]
    const float *conv_w;       // [xbc, W] fp32 (conv1d.weight [xbc, 1, W])
    const float *conv_b;       // [xbc] fp32
    const float *dt_bias;      // [H] fp32
    const float *A_log;        // [H] fp32
    const float *D;            // [H] fp32
    const uint16_t *norm_w;    // [di] bf16
    const uint16_t *out_proj;  // [d, di] bf16
} Mamba2CudaW;

// fp32 gradients, same shapes, ADDED into; NULL where a tensor is frozen.
typedef struct {
    float *in_proj, *conv_w, *conv_b, *dt_bias, *A_log, *D, *norm_w, *out_proj;
} Mamba2CudaG;

// What the forward saves for the backward (one set per layer when training; one shared set for inference).
typedef struct {
    void *z;      // [N, di] bf16     in_proj's z rows
    float *xraw;  // [N, xbc] fp32    in_proj's xBC rows (the conv input; fp32: see docs/MAMBA2_CUDA.md, "Accuracy")
    void *dt;     // [N, H] bf16      in_proj's dt rows (raw: the SSD adds dt_bias and applies softplus)
    void *y;      // [N, di] bf16     SSD output (with D x), before the gate
    float *rstd;  // [N, H] fp32      1/rms of each head group of y*silu(z)
} Mamba2CudaActs;

// Scratch shared by all layers (its contents never outlive one call). Forward entries (also used by the backward,
// which recomputes the conv output and the repeated heads):
typedef struct {
    void *xc;      // [N, xbc] bf16     conv output; backward: d conv output
    void *heads;   // [3, N, di] bf16   SSD inputs x, B (repeated per KV group), C; forward: then yn (slice 0);
                   //                   backward: yn (recomputed, slice 0), then d xBC raw [N, xbc] (xbc <= 3 di)
    void *dtp;     // [N, Hp] bf16      dt rows' GEMM output (padded); backward: d dt padded (zero columns)
    void *wdt;     // [Hp, d] bf16      in_proj's dt rows, zero-padded to Hp
    float *A;      // [H] fp32          -exp(A_log)
    void *ssd_fwd_ws;  // ssd_fwd_cuda_workspace bytes
    // backward only (NULL / 0 bytes for inference):
    void *dheads;  // [3, N, di] bf16   d out_proj input (slice 0, first), then dx, dB (per head), dC of the SSD
    void *dys;     // [N, di] bf16      d SSD output
    void *dz;      // [N, di] bf16      d z
    void *ddt;     // [N, H] bf16       d dt (raw)
    float *dpar;   // [3 H + xbc W + xbc] fp32: dA, dD, d dt_bias, d conv w, d conv b (written, then added)
    float *gwdt;   // [Hp, d] fp32      d of the padded dt rows
    float *gnorm;  // [nb, di] fp32: norm weight gradient partials per block of R = max(64, ceil(N/4096)) rows
    void *ssd_bwd_ws;   // ssd_bwd_cuda_workspace bytes
    float *conv_part;   // [nb, xbc W + xbc] fp32: conv weight and bias gradient partials per block of R rows
} Mamba2CudaScratch;

// A buffer of the engine's activation table: name, bytes and where its pointer goes (tab_add's slot).
typedef struct {
    const char *name;
    void **slot;
    size_t bytes;
} Mamba2CudaBuf;
#define MAMBA2_CUDA_MAX_BUFS 20

// The buffers of a (training: per layer) activation set and of the shared scratch (train = 0: forward only), with
// their byte counts for shape s; slots point into *a / *w. Returns the number of entries written into out
// (<= MAMBA2_CUDA_MAX_BUFS). Every buffer must be 16-byte aligned (the engine's table gives 256).
int mamba2_cuda_acts_bufs(const Mamba2CudaShape *s, Mamba2CudaActs *a, Mamba2CudaBuf *out);
int mamba2_cuda_scratch_bufs(const Mamba2CudaShape *s, int train, Mamba2CudaScratch *w, Mamba2CudaBuf *out);
// For callers without a table (tests): the bytes of n buffers placed at 256-byte boundaries, and their placement
// into one allocation of that size (each *slot = base + offset).
size_t mamba2_cuda_bufs_bytes(const Mamba2CudaBuf *b, int n);
void mamba2_cuda_bufs_place(const Mamba2CudaBuf *b, int n, void *base);

// Forward: u [N, d] bf16 (the mixer input; the backward reads it again), reset [B, L] (device, or NULL: one document
// per row), out [N, d] bf16 written (may not alias u). Fills a. Returns 0, or -1 with err on a refused shape.
int mamba2_cuda_fwd(DlGemm *g, const Mamba2CudaShape *s, const Mamba2CudaW *w, const void *u, const uint8_t *reset,
                    void *out, Mamba2CudaActs *a, Mamba2CudaScratch *ws, dl_stream_t stream, char *err,
                    size_t errlen);

// Backward of the forward that filled a (same u, reset). dout [N, d] bf16; dx [N, d] bf16 written (NULL: not
// needed, e.g. the lowest trained layer); gr's non-NULL gradients added into. ws must come from
// mamba2_cuda_scratch_bufs with train = 1.
int mamba2_cuda_bwd(DlGemm *g, const Mamba2CudaShape *s, const Mamba2CudaW *w, const Mamba2CudaG *gr, const void *u,
                    const uint8_t *reset, const void *dout, void *dx, const Mamba2CudaActs *a, Mamba2CudaScratch *ws,
                    dl_stream_t stream, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
