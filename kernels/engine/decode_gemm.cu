// decode_gemm.cu: the decoder's batch-invariant bf16 GEMM (decode_gemm.h). y [M, N] = x [M, K] @ W [N, K]^T.
//
// One block = 4 warps = the 4 fixed K-slices of an (m16*MT) x (n8*NT) output tile. Warp s streams its slice
// of the tile's weight rows and token rows chunk by chunk (32 k per chunk, 16 bytes per lane and row: lane
// (g, t) reads k = 32c + 8t .. +7 of A rows g, g+8 and of weight row g), two MMAs per chunk and tile:
//   mma 1: k-slots (2t, 2t+1) <- elements (8t, 8t+1), slots (2t+8, 2t+9) <- (8t+2, 8t+3)
//   mma 2: the same slots      <- elements (8t+4, 8t+5)    and            (8t+6, 8t+7)
// (A and B use the same mapping, so each product pairs matching k; the order of slots inside an MMA is the
// hardware's, fixed). The 4 slice partials meet in shared memory and are added in slice order. Nothing in
// this depends on M: MT / NT / U (loads in flight) only choose how many tiles a warp carries at once.
#include <cuda_bf16.h>
#include <stdio.h>

#include "kernels/engine/decode_gemm.h"
#include "kernels/train/train_check.cuh"  // train_fail

typedef __nv_bfloat16 bf16;

#define GEMM_SLICES 4  // part of the arithmetic: changing it changes bits (never make it depend on the shape)
#define GEMM_THREADS (32 * GEMM_SLICES)
#define GEMM_CHUNK 32

// c += A (16 x 16, rows g / g+8 in a01 / a23 halves as below) * B (16 x 8), fp32 accumulate.
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float out_load(const float *p) { return *p; }
__device__ __forceinline__ float out_load(const bf16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void out_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void out_store(bf16 *p, float v) { *p = __float2bfloat16_rn(v); }

// grid (ceil(N / (8 NT)), ceil(M / (16 MT))), GEMM_THREADS threads.
template <typename OutT, int MT, int NT, int U>
__global__ void __launch_bounds__(GEMM_THREADS)
    decode_gemm_kernel(OutT *__restrict__ y, const bf16 *__restrict__ x, const bf16 *__restrict__ W,
                       const bf16 *__restrict__ bias, int64_t M, int64_t N, int64_t K, int accumulate) {
    __shared__ float red[GEMM_SLICES][MT * NT * 4][32];
    const int lane = threadIdx.x & 31, s = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t n0 = (int64_t)blockIdx.x * (8 * NT), m0 = (int64_t)blockIdx.y * (16 * MT);
    const int64_t nch = (K + GEMM_CHUNK - 1) / GEMM_CHUNK;
    const int64_t c0 = s * nch / GEMM_SLICES, c1 = (s + 1) * nch / GEMM_SLICES;  // this warp's slice of chunks
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mt][nt][i] = 0.0f;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int64_t c = c0; c < c1; c += U) {
        uint4 a[U][MT][2], b[U][NT];  // U chunks' operands loaded before any of their MMAs
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t k = (c + u) * GEMM_CHUNK + t * 8;
            const bool kv = c + u < c1 && k < K;  // K % 8 == 0: a lane's 8 elements are all in or all out
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const int64_t r = m0 + mt * 16 + g;
                a[u][mt][0] = kv && r < M ? __ldg((const uint4 *)(x + r * K + k)) : zero;
                a[u][mt][1] = kv && r + 8 < M ? __ldg((const uint4 *)(x + (r + 8) * K + k)) : zero;
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const int64_t n = n0 + nt * 8 + g;
                b[u][nt] = kv && n < N ? __ldg((const uint4 *)(W + n * K + k)) : zero;
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c + u >= c1) break;  // warp-uniform: no MMA past the slice (not even one adding zeros)
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const uint4 &lo = a[u][mt][0], &hi = a[u][mt][1], &bw = b[u][nt];
                    mma_bf16_16816(acc[mt][nt], lo.x, hi.x, lo.y, hi.y, bw.x, bw.y);
                    mma_bf16_16816(acc[mt][nt], lo.z, hi.z, lo.w, hi.w, bw.z, bw.w);
                }
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) red[s][(mt * NT + nt) * 4 + i][lane] = acc[mt][nt][i];
    __syncthreads();
    // epilogue: element (idx, ln) is accumulator i of tile (mt, nt) in lane ln: row g (+8 for i >= 2), column
    // 2t + (i & 1) of the tile
    for (int e = threadIdx.x; e < MT * NT * 4 * 32; e += GEMM_THREADS) {
        const int idx = e >> 5, ln = e & 31, i = idx & 3, tile = idx >> 2, mt = tile / NT, nt = tile % NT;
        const int64_t row = m0 + mt * 16 + (ln >> 2) + (i >= 2 ? 8 : 0), col = n0 + nt * 8 + (ln & 3) * 2 + (i & 1);
        if (row >= M || col >= N) continue;
        float v = red[0][idx][ln];
#pragma unroll
        for (int q = 1; q < GEMM_SLICES; q++) v = __fadd_rn(v, red[q][idx][ln]);  // slice order
        if (bias) v = __fadd_rn(v, __bfloat162float(bias[col]));
        OutT *yp = y + row * N + col;
        if (accumulate) v = __fadd_rn(v, out_load(yp));
        out_store(yp, v);
    }
}

template <typename OutT>
static void launch(int variant, OutT *y, const bf16 *x, const bf16 *W, const bf16 *bias, int64_t M, int64_t N,
                   int64_t K, int accumulate, cudaStream_t st) {
    switch (variant) {
        case 0: {  // decode: m16 x n8 per block, 4 chunks in flight per warp (weight streaming)
            dim3 grid((unsigned)((N + 7) / 8), (unsigned)((M + 15) / 16));
            decode_gemm_kernel<OutT, 1, 1, 4><<<grid, GEMM_THREADS, 0, st>>>(y, x, W, bias, M, N, K, accumulate);
            break;
        }
        case 1: {
            dim3 grid((unsigned)((N + 15) / 16), (unsigned)((M + 31) / 32));
            decode_gemm_kernel<OutT, 2, 2, 2><<<grid, GEMM_THREADS, 0, st>>>(y, x, W, bias, M, N, K, accumulate);
            break;
        }
        default: {  // prefill: m64 x n32 per block (each operand read once per block)
            dim3 grid((unsigned)((N + 31) / 32), (unsigned)((M + 63) / 64));
            decode_gemm_kernel<OutT, 4, 4, 1><<<grid, GEMM_THREADS, 0, st>>>(y, x, W, bias, M, N, K, accumulate);
            break;
        }
    }
}

extern "C" int decode_gemm_variant(int64_t M) { return M <= 16 ? 0 : M <= 64 ? 1 : 2; }

extern "C" int decode_gemm_with(int variant, DType out_dt, void *y, const void *x, const void *W, const void *bias,
                                int64_t M, int64_t N, int64_t K, int accumulate, cudaStream_t stream, char *err,
                                size_t errlen) {
    if (out_dt != DT_BF16 && out_dt != DT_F32) return train_fail(err, errlen, "decode_gemm: the output must be bf16 or f32");
    if (M < 0 || N < 8 || K < 8 || N % 8 || K % 8)
        return train_fail(err, errlen, "decode_gemm: M %lld, N %lld, K %lld: need M >= 0 and N, K positive multiples of 8",
                         (long long)M, (long long)N, (long long)K);
    if (((uintptr_t)y | (uintptr_t)x | (uintptr_t)W) & 15 || ((uintptr_t)bias & 1))
        return train_fail(err, errlen, "decode_gemm: x, W and y must be 16-byte aligned (bias 2-byte)");
    if (variant < 0 || variant > 2) return train_fail(err, errlen, "decode_gemm: variant %d outside 0..2", variant);
    if (N / 8 > 0x7fffffffll || (M + 15) / 16 > 65535ll * (variant == 0 ? 1 : variant == 1 ? 2 : 4))
        return train_fail(err, errlen, "decode_gemm: M %lld x N %lld exceeds the grid", (long long)M, (long long)N);
    if (M == 0) return 0;
    if (out_dt == DT_BF16)
        launch<bf16>(variant, (bf16 *)y, (const bf16 *)x, (const bf16 *)W, (const bf16 *)bias, M, N, K, accumulate, stream);
    else
        launch<float>(variant, (float *)y, (const bf16 *)x, (const bf16 *)W, (const bf16 *)bias, M, N, K, accumulate, stream);
    const cudaError_t ce = cudaGetLastError();
    if (ce != cudaSuccess) return train_fail(err, errlen, "decode_gemm: launch failed: %s", cudaGetErrorString(ce));
    return 0;
}

extern "C" int decode_gemm(DType out_dt, void *y, const void *x, const void *W, const void *bias, int64_t M, int64_t N,
                           int64_t K, int accumulate, cudaStream_t stream, char *err, size_t errlen) {
    return decode_gemm_with(decode_gemm_variant(M), out_dt, y, x, W, bias, M, N, K, accumulate, stream, err, errlen);
}
