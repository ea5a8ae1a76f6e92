// selective_scan_cuda.h: CUDA kernels of the Mamba-1 selective scan and the causal conv1d (+SiLU), for
// Hopper (sm_90). Same math, layout and argument meaning as the CPU twins in selective_scan.h: token-major
// [batch, seqlen, channels] activations, B [B,L,Gb,N], C [B,L,Gc,N].
// Dtypes: activations (u, dt, B, C, z, out and their gradients) are bf16, passed as uint16_t bit patterns;
// A, D, delta_bias, states (h0, h_last, checkpoints) and the parameter gradients (dA, dD, ddelta_bias, dh0)
// are fp32. Arithmetic and the scan state are fp32.
// Every pointer is a device pointer; every function only enqueues work on `stream` and returns 0, or -1 with
// a message in err (which may be NULL) when the shape is outside what the kernels support:
//   N in {4, 8, 16, 32, 64}; channels per C group (dim/groups_c) dividing 64; conv width 1..4.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "kernels/scan/selective_scan.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *scan_stream_t;  // = cudaStream_t

// The forward writes the state before every SCAN_CKPT-th step to ckpt [B, ceil(L/SCAN_CKPT), D, N] (fp32)
// when ckpt != NULL; the backward needs it (one fp32 state per 64 steps: about 1 byte per token-channel at
// N = 16, far cheaper than a second forward sweep in the backward). With DISTILL_SCAN_BWD=v13 (backward v13,
// opt-in) the forward stores the state before every 8th step instead, [B, ceil(L/8), D, N] (8 bytes per
// token-channel), which v13 reads in place of its per-chunk sweep; the forward and backward of a pass must run
// with the same setting, and selective_scan_ckpt_elems returns the size for the setting at the time of the call.
#define SCAN_CKPT 64
size_t selective_scan_ckpt_elems(const ScanShape *s);

// Workspace for the forward (time segments) and backward (reductions) in bytes; pass a buffer of at least
// this size (or NULL when it is 0).
size_t selective_scan_fwd_workspace(const ScanShape *s, int nseg);
size_t selective_scan_bwd_workspace(const ScanShape *s);

// Forward. nseg >= 1 splits the time axis into nseg segments run in parallel (a pre-pass computes each
// segment's local end state, then every segment starts from the combined carry); 0 = choose from the shape.
int selective_scan_fwd_cuda(const ScanShape *s, const uint16_t *u, const uint16_t *dt, const float *A,
                            const uint16_t *Bm, const uint16_t *Cm, const float *Dskip, const uint16_t *z,
                            const float *delta_bias, const uint8_t *reset, const float *h0, uint16_t *out,
                            float *h_last, float *ckpt, int nseg, void *workspace, scan_stream_t stream,
                            char *err, size_t errlen);

// Backward (deterministic: fixed-order reductions, no atomics). ckpt from the forward. dout [B,L,D] bf16;
// dh_last optional. Writes du, ddt, dB, dC, dz (bf16) and dA [D,N], dD [D], ddelta_bias [D], dh0 [B,D,N]
// (fp32; dh0 only if h0 and dh0 are given, ddelta_bias only if given).
int selective_scan_bwd_cuda(const ScanShape *s, const uint16_t *u, const uint16_t *dt, const float *A,
                            const uint16_t *Bm, const uint16_t *Cm, const float *Dskip, const uint16_t *z,
                            const float *delta_bias, const uint8_t *reset, const float *h0, const float *ckpt,
                            const uint16_t *dout, const float *dh_last, uint16_t *du, uint16_t *ddt, float *dA,
                            uint16_t *dB, uint16_t *dC, float *dD, uint16_t *dz, float *ddelta_bias, float *dh0,
                            void *workspace, scan_stream_t stream, char *err, size_t errlen);

// Multi-token decode step (selective_scan_multi_cpu): K = s->seqlen tokens from h_in [B,D,N] (fp32); keep
// [B] int32 on the device; h_keep may alias h_in; h_end optional. One token: K = 1, keep = NULL.
int selective_scan_multi_cuda(const ScanShape *s, const uint16_t *u, const uint16_t *dt, const float *A,
                              const uint16_t *Bm, const uint16_t *Cm, const float *Dskip, const uint16_t *z,
                              const float *delta_bias, const float *h_in, const int32_t *keep, uint16_t *out,
                              float *h_keep, float *h_end, scan_stream_t stream, char *err, size_t errlen);

// Several layers' multi-token steps in one launch (a speculative decoder's replay of its Mamba layers): layer l
// reads u, dt, B, C, A, delta_bias, h_in and writes h_keep at the given pointers plus l times the element strides
// below (the other arguments are shared). With more than one layer only h_keep is produced (out, z, h_end NULL).
// When out and h_end are NULL the steps after each sequence's keep are not run (h_keep is all that is asked for).
typedef struct {
    int64_t layers;  // 1..65535 (0 reads as 1)
    int64_t u, dt, B, C, A, delta_bias, h, h_keep;
} ScanLayers;
int selective_scan_multi_layers_cuda(const ScanShape *s, const ScanLayers *ls, const uint16_t *u, const uint16_t *dt,
                                     const float *A, const uint16_t *Bm, const uint16_t *Cm, const float *Dskip,
                                     const uint16_t *z, const float *delta_bias, const float *h_in,
                                     const int32_t *keep, uint16_t *out, float *h_keep, float *h_end,
                                     scan_stream_t stream, char *err, size_t errlen);

// Causal depthwise conv1d (+bias, +SiLU): x, out [B,L,C] bf16; w [C,W], bias [C] fp32; x_prev [B,W-1,C] bf16
// (optional); resets cut the window. Backward writes dx (bf16), dw [C,W] and dbias [C] (fp32, fixed-order
// sums through a workspace of conv1d_silu_bwd_workspace bytes).
int conv1d_silu_fwd_cuda(int64_t B, int64_t L, int64_t C, int W, const uint16_t *x, const float *w,
                         const float *bias, const uint8_t *reset, const uint16_t *x_prev, int silu, uint16_t *out,
                         scan_stream_t stream, char *err, size_t errlen);
size_t conv1d_silu_bwd_workspace(int64_t B, int64_t L, int64_t C);
int conv1d_silu_bwd_cuda(int64_t B, int64_t L, int64_t C, int W, const uint16_t *x, const float *w,
                         const float *bias, const uint8_t *reset, const uint16_t *x_prev, int silu,
                         const uint16_t *dout, uint16_t *dx, float *dw, float *dbias, void *workspace,
                         scan_stream_t stream, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
