// decode_gemm.cu: the decoder's batch-invariant bf16 GEMM (decode_gemm.h). y [M, N] = x [M, K] @ W [N, K]^T.
//
// One block = 4 warps = the 4 fixed K-slices of an (m16*MT) x (n8*NT) output tile. Warp s streams its slice
// of the tile's weight rows and token rows chunk by chunk (32 k per chunk, 16 bytes per lane and row: lane
// (g, t) reads k = 32c + 8t .. +7 of A rows g, g+8 and of weight row g), two MMAs per chunk and tile:
//   mma 1: k-slots (2t, 2t+1) <- elements (8t, 8t+1), slots (2t+8, 2t+9) <- (8t+2, 8t+3)
//   mma 2: the same slots      <- elements (8t+4, 8t+5)    and            (8t+6, 8t+7)
// (A and B use the same mapping, so each product pairs matching k; the order of slots inside an MMA is the
// hardware's, fixed). The 4 slice partials meet in shared memory and are added in slice order. Nothing in
// this depends on M: MT / NT / U (loads in flight) only choose how many tiles a warp carries at once, and MFAST
// (the order in which blocks walk the tiles) only which blocks run at the same time. decode_gemm_swiglu's tiles
// (PAIR) hold matching rows of two weights, so its epilogue sees a gate sum and its up sum side by side.
#include <cuda_bf16.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/engine/decode_gemm.h"
#include "kernels/train/train_common.cuh"  // train_fail, swiglu_f

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

// The products of one launch: output i is y_i [M, N_i] = x @ W_i^T (+ bias_i); its column tiles are the grid's
// column-tile indices [tiles_end[i-1], tiles_end[i]).
struct GemmSegs {
    void *y[DECODE_GEMM_MAX_OUTS];
    const bf16 *W[DECODE_GEMM_MAX_OUTS], *bias[DECODE_GEMM_MAX_OUTS];
    int64_t N[DECODE_GEMM_MAX_OUTS];
    unsigned tiles_end[DECODE_GEMM_MAX_OUTS];
    int n;
};

// GEMM_THREADS threads; grid (column tiles of all outputs, ceil(M / (16 MT))), or with MFAST one dimension of both
// counts' product, row tiles first: the blocks that share a weight tile run together, so a weight matrix larger than
// L2 (a 49152-row head) is read from memory once instead of once per row tile.
// PAIR (the MLP's gate and up with the SwiGLU as epilogue): a tile's first NT/2 column groups are rows of segs.W[0]
// (gate), its last NT/2 the same rows of segs.W[1] (up); each output element is swiglu(gate, up) of the two sums,
// each rounded to bf16 first as a separate bf16 GEMM output would be.
template <typename OutT, int MT, int NT, int U, bool MFAST, bool PAIR>
__global__ void __launch_bounds__(GEMM_THREADS)
    decode_gemm_kernel(GemmSegs segs, const bf16 *__restrict__ x, int64_t M, int64_t K, int accumulate) {
    // the slice partials pass through shared memory in rounds of at most 64 accumulators per lane (32 KB)
    constexpr int NACC = MT * NT * 4, ROUND = NACC < 64 ? NACC : 64;
    constexpr int NH = PAIR ? NT / 2 : NT;  // output column groups of 8 per tile
    static_assert(!PAIR || (NT % 2 == 0 && NACC <= 64), "PAIR: an even NT, and one round (gate and up meet in it)");
    __shared__ float red[GEMM_SLICES][ROUND][32];
    const int lane = threadIdx.x & 31, s = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    unsigned bm = blockIdx.y, bn = blockIdx.x;
    if (MFAST) {
        const unsigned gm = (unsigned)((M + 16 * MT - 1) / (16 * MT));  // the grid has < 2^31 blocks
        bm = blockIdx.x % gm, bn = blockIdx.x / gm;
    }
    // this block's output (static indices only: the parameter struct stays in constant memory)
    OutT *__restrict__ y = (OutT *)segs.y[0];
    const bf16 *__restrict__ W = segs.W[0];
    const bf16 *__restrict__ bias = segs.bias[0];
    int64_t N = segs.N[0];
    unsigned first = 0;  // the output's first column tile
#pragma unroll
    for (int i = 1; i < DECODE_GEMM_MAX_OUTS; i++)
        if (i < segs.n && bn >= segs.tiles_end[i - 1])
            y = (OutT *)segs.y[i], W = segs.W[i], bias = segs.bias[i], N = segs.N[i], first = segs.tiles_end[i - 1];
    bn -= first;
    const int64_t n0 = (int64_t)bn * (8 * NH), m0 = (int64_t)bm * (16 * MT);
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
                const int64_t n = n0 + (nt % NH) * 8 + g;
                const bf16 *Wt = PAIR && nt >= NH ? segs.W[1] : W;
                b[u][nt] = kv && n < N ? __ldg((const uint4 *)(Wt + n * K + k)) : zero;
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
    if constexpr (PAIR) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) red[s][(mt * NT + nt) * 4 + i][lane] = acc[mt][nt][i];
        __syncthreads();
        // element (idx, ln) of a gate column group (nt < NH) and its up partner at idx + 4 NH
        for (int e = threadIdx.x; e < NACC * 32; e += GEMM_THREADS) {
            const int idx = e >> 5, ln = e & 31, i = idx & 3, tile = idx >> 2, mt = tile / NT, nt = tile % NT;
            if (nt >= NH) continue;
            const int64_t row = m0 + mt * 16 + (ln >> 2) + (i >= 2 ? 8 : 0), col = n0 + nt * 8 + (ln & 3) * 2 + (i & 1);
            if (row >= M || col >= N) continue;
            float vg = red[0][idx][ln], vu = red[0][idx + 4 * NH][ln];
#pragma unroll
            for (int q = 1; q < GEMM_SLICES; q++)
                vg = __fadd_rn(vg, red[q][idx][ln]), vu = __fadd_rn(vu, red[q][idx + 4 * NH][ln]);  // slice order
            out_store(y + row * N + col, swiglu_f(__bfloat162float(__float2bfloat16_rn(vg)),
                                                  __bfloat162float(__float2bfloat16_rn(vu))));
        }
    } else {
#pragma unroll
        for (int r0 = 0; r0 < NACC; r0 += ROUND) {
            if (r0) __syncthreads();  // the previous round is read
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const int idx = (mt * NT + nt) * 4 + i;
                        if (idx >= r0 && idx < r0 + ROUND) red[s][idx - r0][lane] = acc[mt][nt][i];
                    }
            __syncthreads();
            // epilogue: element (idx, ln) is accumulator i of tile (mt, nt) in lane ln: row g (+8 for i >= 2), column
            // 2t + (i & 1) of the tile
            for (int e = threadIdx.x; e < ROUND * 32; e += GEMM_THREADS) {
                const int j = e >> 5, idx = r0 + j, ln = e & 31, i = idx & 3, tile = idx >> 2, mt = tile / NT, nt = tile % NT;
                const int64_t row = m0 + mt * 16 + (ln >> 2) + (i >= 2 ? 8 : 0), col = n0 + nt * 8 + (ln & 3) * 2 + (i & 1);
                if (row >= M || col >= N) continue;
                float v = red[0][j][ln];
#pragma unroll
                for (int q = 1; q < GEMM_SLICES; q++) v = __fadd_rn(v, red[q][j][ln]);  // slice order
                if (bias) v = __fadd_rn(v, __bfloat162float(bias[col]));
                OutT *yp = y + row * N + col;
                if (accumulate) v = __fadd_rn(v, out_load(yp));
                out_store(yp, v);
            }
        }
    }
}

// The variants: tile m(16 MT) x n(8 NT), U chunks in flight per warp, block order. 0, 1 and 3 are decode_gemm_variant's
// choices for M <= 16, <= 64, > 64; 3-7 are candidates for large M (gpu_bench_decode --gemm times them all). One list
// makes both the host table (grid checks, decode_gemm_variant_name) and the kernel instances, so the two cannot disagree.
//        variant, MT, NT, U, MFAST
#define GEMM_VARIANT_LIST(X)                                                                                      \
    X(0, 1, 1, 8, false) /* decode: m16 x n8, 8 chunks in flight per warp (weight streaming) */                    \
    X(1, 2, 2, 2, false) /* m32 x n16 */                                                                           \
    X(2, 4, 4, 1, false) /* prefill: m64 x n32 (each operand read once per block) */                               \
    X(3, 4, 4, 1, true)  /* = 2 with row tiles first (a large head's weights read once) */                         \
    X(4, 4, 4, 2, true)  /* = 3 with 2 chunks in flight */                                                         \
    X(5, 2, 4, 4, true)  /* m32 x n32, 4 chunks in flight: twice the blocks of 3 */                                \
    X(6, 4, 8, 1, true)  /* m64 x n64: a third less operand traffic through L2 than 3 */                           \
    X(7, 1, 4, 4, true)  /* m16 x n32, 4 chunks in flight: four times the blocks of 3 */
static const struct {
    int mt, nt, u, mfast;
} kVariants[] = {
#define GEMM_VARIANT_ROW(v, MT, NT, U, MFAST) {MT, NT, U, MFAST},
    GEMM_VARIANT_LIST(GEMM_VARIANT_ROW)
#undef GEMM_VARIANT_ROW
};
#define GEMM_VARIANTS ((int)(sizeof kVariants / sizeof kVariants[0]))

template <typename OutT, int MT, int NT, int U, bool MFAST, bool PAIR = false>
static void launch_t(const GemmSegs &segs, const bf16 *x, int64_t M, int64_t K, int accumulate, cudaStream_t st) {
    const int64_t gm = (M + 16 * MT - 1) / (16 * MT), gn = segs.tiles_end[segs.n - 1];
    const dim3 grid = MFAST ? dim3((unsigned)(gm * gn)) : dim3((unsigned)gn, (unsigned)gm);
    decode_gemm_kernel<OutT, MT, NT, U, MFAST, PAIR><<<grid, GEMM_THREADS, 0, st>>>(segs, x, M, K, accumulate);
}

template <typename OutT>
static void launch(int variant, const GemmSegs &segs, const bf16 *x, int64_t M, int64_t K, int accumulate, cudaStream_t st) {
    switch (variant) {  // gemm_run checked the range
#define GEMM_VARIANT_CASE(v, MT, NT, U, MFAST) \
    case v: launch_t<OutT, MT, NT, U, MFAST>(segs, x, M, K, accumulate, st); break;
        GEMM_VARIANT_LIST(GEMM_VARIANT_CASE)
#undef GEMM_VARIANT_CASE
    }
}

extern "C" int decode_gemm_variant_name(int variant, char *buf, size_t n) {
    if (variant < 0 || variant >= GEMM_VARIANTS) return -1;
    const int mt = kVariants[variant].mt, nt = kVariants[variant].nt;
    snprintf(buf, n, "m%dxn%d U%d%s", 16 * mt, 8 * nt, kVariants[variant].u, kVariants[variant].mfast ? " rows-first" : "");
    return 0;
}

// M > 64: variant 3 (m64 x n32, row tiles first). gpu_bench_decode --gemm at M 512, H100, f61e4c8 + this change,
// 2026-11-23: the head (N 49152, K 576, fp32 out) 244 us vs variant 2's 292; N 3072 / K 576 19.4 vs 21.3 us; N 576
// with K 576 or 1536 within 2% of the best (variants 1 and 5 by 0.4 / 0.2 us). DISTILL_DECODE_GEMM_LARGE=v picks
// another (variants never change bits, only speed); read once.
static int large_m_variant(void) {
    static int v = -2;
    if (v == -2) {
        const char *e = getenv("DISTILL_DECODE_GEMM_LARGE");
        char *end = NULL;
        const long x = e ? strtol(e, &end, 10) : 3;
        v = 3;
        if (e && (end == e || *end || x < 0 || x >= GEMM_VARIANTS))
            fprintf(stderr, "decode_gemm: DISTILL_DECODE_GEMM_LARGE=\"%s\" is not a variant 0..%d; using 3\n", e,
                    GEMM_VARIANTS - 1);
        else v = (int)x;
    }
    return v;
}
extern "C" int decode_gemm_variant(int64_t M) { return M <= 16 ? 0 : M <= 64 ? 1 : large_m_variant(); }

// Checks and launches the products of segs (n in 1..DECODE_GEMM_MAX_OUTS; N[i], y[i], W[i], bias[i] set; tiles_end
// filled here for the variant's tile width) with one variant.
static int gemm_run(int variant, DType out_dt, GemmSegs &segs, const void *x, int64_t M, int64_t K, int accumulate,
                    cudaStream_t stream, char *err, size_t errlen) {
    if (out_dt != DT_BF16 && out_dt != DT_F32) return train_fail(err, errlen, "decode_gemm: the output must be bf16 or f32");
    if (variant < 0 || variant >= GEMM_VARIANTS)
        return train_fail(err, errlen, "decode_gemm: variant %d outside 0..%d", variant, GEMM_VARIANTS - 1);
    const int64_t gm = (M + 16 * kVariants[variant].mt - 1) / (16 * kVariants[variant].mt);
    int64_t gn = 0;
    for (int i = 0; i < segs.n; i++) {
        const int64_t N = segs.N[i];
        if (M < 0 || N < 8 || K < 8 || N % 8 || K % 8)
            return train_fail(err, errlen, "decode_gemm: M %lld, N %lld, K %lld: need M >= 0 and N, K positive multiples of 8",
                             (long long)M, (long long)N, (long long)K);
        if (((uintptr_t)segs.y[i] | (uintptr_t)x | (uintptr_t)segs.W[i]) & 15 || ((uintptr_t)segs.bias[i] & 1))
            return train_fail(err, errlen, "decode_gemm: x, W and y must be 16-byte aligned (bias 2-byte)");
        gn += (N + 8 * kVariants[variant].nt - 1) / (8 * kVariants[variant].nt);
        segs.tiles_end[i] = (unsigned)(gn < 0xffffffffll ? gn : 0xffffffffll);  // (too many: refused below)
    }
    if (kVariants[variant].mfast ? gm * gn > 0x7fffffffll : gn > 0x7fffffffll || gm > 65535)
        return train_fail(err, errlen, "decode_gemm: M %lld x N %lld exceeds the grid", (long long)M, (long long)segs.N[0]);
    if (M == 0) return 0;
    if (out_dt == DT_BF16) launch<bf16>(variant, segs, (const bf16 *)x, M, K, accumulate, stream);
    else launch<float>(variant, segs, (const bf16 *)x, M, K, accumulate, stream);
    const cudaError_t ce = cudaGetLastError();
    if (ce != cudaSuccess) return train_fail(err, errlen, "decode_gemm: launch failed: %s", cudaGetErrorString(ce));
    return 0;
}

extern "C" int decode_gemm_with(int variant, DType out_dt, void *y, const void *x, const void *W, const void *bias,
                                int64_t M, int64_t N, int64_t K, int accumulate, cudaStream_t stream, char *err,
                                size_t errlen) {
    GemmSegs segs = {};
    segs.n = 1, segs.y[0] = y, segs.W[0] = (const bf16 *)W, segs.bias[0] = (const bf16 *)bias, segs.N[0] = N;
    return gemm_run(variant, out_dt, segs, x, M, K, accumulate, stream, err, errlen);
}

extern "C" int decode_gemm(DType out_dt, void *y, const void *x, const void *W, const void *bias, int64_t M, int64_t N,
                           int64_t K, int accumulate, cudaStream_t stream, char *err, size_t errlen) {
    return decode_gemm_with(decode_gemm_variant(M), out_dt, y, x, W, bias, M, N, K, accumulate, stream, err, errlen);
}

// The gate | up products with the SwiGLU epilogue, tiles by M: m16 x (n8 gate + n8 up) for decode, m32 x (16 + 16)
// and m64 x (16 + 16) rows first (one round of partials: at most 64 accumulators per lane). gpu_test_decode_inv checks the bits against the unfused path.
extern "C" int decode_gemm_swiglu(void *act, const void *x, const void *Wg, const void *Wu, int64_t M, int64_t F,
                                  int64_t K, cudaStream_t stream, char *err, size_t errlen) {
    if (M < 0 || F < 8 || K < 8 || F % 8 || K % 8)
        return train_fail(err, errlen, "decode_gemm_swiglu: M %lld, F %lld, K %lld: need M >= 0 and F, K positive multiples of 8",
                          (long long)M, (long long)F, (long long)K);
    if (((uintptr_t)act | (uintptr_t)x | (uintptr_t)Wg | (uintptr_t)Wu) & 15)
        return train_fail(err, errlen, "decode_gemm_swiglu: act, x and the weights must be 16-byte aligned");
    GemmSegs segs = {};
    segs.n = 1, segs.y[0] = act, segs.W[0] = (const bf16 *)Wg, segs.W[1] = (const bf16 *)Wu, segs.N[0] = F;
    const int mt = M <= 16 ? 1 : M <= 64 ? 2 : 4, tw = M <= 16 ? 8 : 16;  // tile: 16 mt rows, tw outputs (2 tw weights)
    const int64_t gn = (F + tw - 1) / tw, gm = (M + 16 * mt - 1) / (16 * mt);
    if (mt == 4 ? gm * gn > 0x7fffffffll : gn > 0x7fffffffll || gm > 65535)
        return train_fail(err, errlen, "decode_gemm_swiglu: M %lld x F %lld exceeds the grid", (long long)M, (long long)F);
    segs.tiles_end[0] = (unsigned)gn;
    if (M == 0) return 0;
    const bf16 *xb = (const bf16 *)x;
    if (M <= 16) launch_t<bf16, 1, 2, 8, false, true>(segs, xb, M, K, 0, stream);
    else if (M <= 64) launch_t<bf16, 2, 4, 2, false, true>(segs, xb, M, K, 0, stream);
    else launch_t<bf16, 4, 4, 1, true, true>(segs, xb, M, K, 0, stream);
    const cudaError_t ce = cudaGetLastError();
    if (ce != cudaSuccess) return train_fail(err, errlen, "decode_gemm_swiglu: launch failed: %s", cudaGetErrorString(ce));
    return 0;
}

extern "C" int decode_gemm_multi(DType out_dt, const DecodeGemmOut *outs, int n, const void *x, int64_t M, int64_t K,
                                 cudaStream_t stream, char *err, size_t errlen) {
    GemmSegs segs = {};
    if (n < 1 || n > DECODE_GEMM_MAX_OUTS)
        return train_fail(err, errlen, "decode_gemm_multi: %d outputs, expected 1..%d", n, DECODE_GEMM_MAX_OUTS);
    segs.n = n;
    for (int i = 0; i < n; i++)
        segs.y[i] = outs[i].y, segs.W[i] = (const bf16 *)outs[i].W, segs.bias[i] = (const bf16 *)outs[i].bias,
        segs.N[i] = outs[i].N;
    return gemm_run(decode_gemm_variant(M), out_dt, segs, x, M, K, 0, stream, err, errlen);
}
