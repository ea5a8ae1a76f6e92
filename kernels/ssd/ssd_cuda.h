// ssd_cuda.h: CUDA kernels of the chunked Mamba-2 SSD scan (forward and backward) for Hopper (sm_90). Same math,
// layout and argument meaning as the CPU twin in ssd.h (token-major x [B,L,H,P], dt [B,L,H], Bm/Cm [B,L,G,N],
// head h reads group h / (H/G); delta = softplus(dt + dt_bias) or dt + dt_bias; document resets zero the state
// before their token).
// Dtypes: activations (x, dt, Bm, Cm, y and their gradients) are bf16, passed as uint16_t bit patterns; A, D,
// dt_bias, states (h0, h_last, dh_last, dh0) and the per-head parameter gradients (dA, dD, ddt_bias) are fp32.
// All arithmetic and every accumulation is fp32 (the per-head parameter sums over batch and chunks: fp64), in a
// fixed order: results are bitwise repeatable (no atomics).
// Chunking: the kernels always use chunks of SSD_CUDA_CHUNK tokens; s->chunk is ignored (the twin's result does not
// depend on its chunk beyond rounding).
// Environment (docs/KERNELS.md): DISTILL_SSD=v1|v2|v3|v4 selects an earlier kernel generation, v5 the states stored
// every 128 tokens, v6 the per-chunk kernels' state loads issued earlier (default v7: v6 with the state passes on
// mma.sync).
// Every pointer is a device pointer; every function only enqueues work on `stream` and returns 0, or -1 with a
// message in err (which may be NULL) when the shape is outside what the kernels support:
//   P (headdim) and N (dstate) multiples of 16 in [16, 128]; H % G == 0; batch, seqlen >= 1.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "kernels/ssd/ssd.h"

typedef struct CUstream_st *ssd_stream_t;  // = cudaStream_t

#define SSD_CUDA_CHUNK 64

// Workspace of the forward in bytes: the fp32 state entering every chunk, B*H*ceil(L/64)*P*N floats, and one float
// per (b, h, chunk).
size_t ssd_fwd_cuda_workspace(const SsdShape *s);

// Forward. y [B,L,H,P] (bf16; may be NULL: only the state pass runs, e.g. to prefill a decode state),
// h0 [B,H,P,N] optional, h_last [B,H,P,N] optional (may alias h0: each entry of h0 is read before it is written).
// workspace: ssd_fwd_cuda_workspace(s) bytes, 256-byte aligned, for the chunk-parallel kernels (v2); NULL runs the
// first kernels (v1: sequential over chunks, no workspace, several times slower), as does DISTILL_SSD=v1.
int ssd_fwd_cuda(const SsdShape *s, const uint16_t *x, const uint16_t *dt, const float *A, const uint16_t *Bm,
                 const uint16_t *Cm, const float *D, const float *dt_bias, const uint8_t *reset, const float *h0,
                 uint16_t *y, float *h_last, void *workspace, ssd_stream_t stream, char *err, size_t errlen);

// Workspace of the backward in bytes (fp32 state entering and state gradient leaving every chunk,
// 2 * B*H*ceil(L/64)*P*N floats, per-chunk scalars, plus per-head dB/dC partials when heads share groups).
// DISTILL_SSD=v1 selects the first kernels here too (same workspace).
size_t ssd_bwd_cuda_workspace(const SsdShape *s);

// Backward given dy [B,L,H,P] (bf16) and optionally dh_last [B,H,P,N]. Writes (does not accumulate) dx [B,L,H,P],
// ddt [B,L,H] (w.r.t. the raw dt), dBm, dCm [B,L,G,N] (bf16), dA [H], dD [H] (if D and dD), ddt_bias [H]
// (if dt_bias and ddt_bias), dh0 [B,H,P,N] (if h0 and dh0) in fp32.
// workspace: at least ssd_bwd_cuda_workspace(s) bytes, 256-byte aligned (cudaMalloc).
// fwd_states: 0: the forward's states and chunk scalars are recomputed (the workspace's contents do not matter).
// 1: `workspace` is the one that the ssd_fwd_cuda call on the same inputs (x, dt, A, Bm, dt_bias, reset, h0; y may have
// been NULL) was given, on the same stream before this call and with nothing else written to it since, under the same
// kernel generation (v4-v6; DISTILL_SSD=v1..v3 refuse with a message). The forward's workspace is the first part of the
// backward's (same offsets), so its states and chunk scalars are read in place and only the state-gradient pass runs:
// it trades keeping that workspace from the forward to the backward (B*H*ceil(L/64)*P*N floats with v4 and v6,
// half that with v5) for the forward-state pass. Both give the same results, bit for bit.
int ssd_bwd_cuda(const SsdShape *s, const uint16_t *x, const uint16_t *dt, const float *A, const uint16_t *Bm,
                 const uint16_t *Cm, const float *D, const float *dt_bias, const uint8_t *reset, const float *h0,
                 const uint16_t *dy, const float *dh_last, uint16_t *dx, uint16_t *ddt, float *dA, uint16_t *dBm,
                 uint16_t *dCm, float *dD, float *ddt_bias, float *dh0, void *workspace, int fwd_states,
                 ssd_stream_t stream, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
