// decode_gemm.h: the decoder's batch-invariant bf16 GEMM (y = x @ W^T, nn.Linear's layout). Every output
// element is reduced in one fixed order that depends on K only, never on M (the number of token rows) nor on
// the other rows: so a token's projections, and in the end its logits, are bit-identical whether it is fed in a
// 1-token decode step, a (K+1)-token speculative verification, a prefill chunk of any length, or at any batch
// size. cuBLASLt cannot promise this: it picks a kernel (tile, split-K) per shape, and a different M is a
// different shape.
//
// The fixed order: K is cut into chunks of 32 (the last one zero-padded; K % 8 == 0), the chunks into 4
// contiguous slices ([s*nch/4, (s+1)*nch/4) for nch = ceil(K/32)); slice s is accumulated in fp32 chunk after
// chunk by tensor-core MMAs (mma.sync m16n8k16 bf16, two per chunk, fixed k-slot mapping), and the output is
// ((p0 + p1) + p2) + p3 (+ bias) (+ y if accumulating), rounded once to the output dtype. An MMA computes each
// output row from that row alone, and rows past M are zeros, so the tile shape (chosen from M for speed: m16 x
// n8 per block for decode, up to m64 x n32 for prefills) never changes a bit. Design and measurements:
// docs/DECODE_CUDA.md ("Batch invariance").
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "distill/dtype.h"

// y [M, N] (out_dt: DT_BF16 or DT_F32) = x [M, K] (bf16) @ W^T, W [N, K] (bf16), + bias [N] (bf16, optional),
// + y itself if accumulate. Pointers 16-byte aligned, N and K multiples of 8, M >= 0 (0: nothing). Enqueued on
// `stream`; returns 0, or -1 with a message in err when the shape, dtype or alignment is not supported.
int decode_gemm(DType out_dt, void *y, const void *x, const void *W, const void *bias, int64_t M, int64_t N,
                int64_t K, int accumulate, cudaStream_t stream, char *err, size_t errlen);

// Several products of one input in one launch (the decoder's q/k/v and Mamba input projections): output i is
// y_i [M, N_i] = x [M, K] @ W_i^T (+ bias_i), each element bit-identical to decode_gemm's for that output alone (the
// reduction order depends on K only). At most DECODE_GEMM_MAX_OUTS outputs, all of out_dt; the same shape rules.
#define DECODE_GEMM_MAX_OUTS 6
typedef struct {
    void *y;
    const void *W, *bias;  // bias NULL: none
    int64_t N;
} DecodeGemmOut;
int decode_gemm_multi(DType out_dt, const DecodeGemmOut *outs, int n, const void *x, int64_t M, int64_t K,
                      cudaStream_t stream, char *err, size_t errlen);

// The MLP's gate and up projections with the SwiGLU as their epilogue: act [M, F] (bf16) = swiglu(x @ Wg^T, x @ Wu^T),
// Wg and Wu [F, K] (bf16; the rows of a fused [2F, K] gate|up weight, or two tensors). Each gate and up sum is
// rounded to bf16 before the SwiGLU, so act is bit-identical to decode_gemm into a bf16 [M, 2F] gate|up buffer then
// swiglu_fwd_cuda, with one launch and the [M, 2F] round trip fewer. Same shape and alignment rules as decode_gemm.
int decode_gemm_swiglu(void *act, const void *x, const void *Wg, const void *Wu, int64_t M, int64_t F, int64_t K,
                       cudaStream_t stream, char *err, size_t errlen);

// The tile variant decode_gemm uses for M rows (0: m16 x n8, 1: m32 x n16, for M > 64 3: m64 x n32 rows first, or the
// variant DISTILL_DECODE_GEMM_LARGE names; 3-7: tiles and block orders for large M, see decode_gemm.cu), and
// decode_gemm forced to one variant (tests show the variants give identical bits).
int decode_gemm_variant(int64_t M);
// The tile of a variant as text ("m64xn32 U1 rows-first": rows x columns per block, chunks in flight, block order)
// into buf; -1 for a variant that does not exist.
int decode_gemm_variant_name(int variant, char *buf, size_t n);
int decode_gemm_with(int variant, DType out_dt, void *y, const void *x, const void *W, const void *bias, int64_t M,
                     int64_t N, int64_t K, int accumulate, cudaStream_t stream, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
