// conv1d_silu.cu: causal depthwise conv1d (width W <= 4) + bias + SiLU, token-major [B, L, C], bf16 activations,
// fp32 weights and arithmetic. One thread owns CONV_TT consecutive steps of one channel: consecutive threads take
// consecutive channels (coalesced rows), and each input is loaded once per thread window instead of W times.
// The backward writes per-(row, tile) partial sums of dw and dbias, summed in a fixed order by a second kernel:
// deterministic, no atomics.
#include "kernels/scan/scan_common.cuh"
#include "kernels/scan/selective_scan_cuda.h"

#include <stdlib.h>
#include <string.h>

namespace {

constexpr int CONV_TT = 16;
constexpr int CONV_THREADS = 256;

struct ConvArgs {
    int64_t B, L, C;
    const bf16 *x, *x_prev, *dout;
    const float *w, *bias;
    const uint8_t *reset;
    int silu;
    bf16 *out, *dx;
    float *part;  // [B * ntile, C, W + 1] partial dw (W) and dbias (1)
};

// x at time tt (may be negative: x_prev, or zero without it)
template <int W>
__device__ __forceinline__ float conv_x(const ConvArgs &p, int64_t b, int64_t tt, int64_t c) {
    if (tt >= 0) return ldbf(p.x + (b * p.L + tt) * p.C + c);
    if (!p.x_prev) return 0.f;
    return ldbf(p.x_prev + (b * (W - 1) + (W - 1) + tt) * p.C + c);
}

// lowest time a tap of step t may read: the last reset at or before t, else -(W-1) with x_prev, else 0.
// Returns the running "last reset" after looking at step t.
__device__ __forceinline__ int64_t step_start(int64_t lr, int W, bool has_prev) {
    return lr >= 0 ? lr : (has_prev ? -(int64_t)(W - 1) : 0);
}

template <int W>
__device__ __forceinline__ int64_t initial_last_reset(const ConvArgs &p, int64_t b, int64_t t0) {
    int64_t lr = -1;
    if (p.reset)
        for (int64_t r = (t0 - (W - 2) > 0 ? t0 - (W - 2) : 0); r < t0; r++)
            if (p.reset[b * p.L + r]) lr = r;
    return lr;
}

template <int W>
__global__ void __launch_bounds__(CONV_THREADS) conv_fwd_kernel(const ConvArgs p) {
    const int64_t ntile = (p.L + CONV_TT - 1) / CONV_TT;
    const int64_t i = (int64_t)blockIdx.x * CONV_THREADS + threadIdx.x;
    if (i >= p.B * ntile * p.C) return;
    const int64_t c = i % p.C, tile = (i / p.C) % ntile, b = i / (p.C * ntile);
    const int64_t t0 = tile * CONV_TT;
    float w[W], xs[CONV_TT + W - 1];
#pragma unroll
    for (int k = 0; k < W; k++) w[k] = p.w[c * W + k];
    const float bias = p.bias ? p.bias[c] : 0.f;
#pragma unroll
    for (int k = 0; k < CONV_TT + W - 1; k++) {
        const int64_t tt = t0 - (W - 1) + k;
        xs[k] = tt < p.L ? conv_x<W>(p, b, tt, c) : 0.f;
    }
    int64_t lr = initial_last_reset<W>(p, b, t0);
#pragma unroll
    for (int s = 0; s < CONV_TT; s++) {
        const int64_t t = t0 + s;
        if (t >= p.L) break;
        if (p.reset && p.reset[b * p.L + t]) lr = t;
        const int64_t st = step_start(lr, W, p.x_prev != nullptr);
        float acc = bias;
#pragma unroll
        for (int k = 0; k < W; k++)
            if (t - (W - 1) + k >= st) acc += w[k] * xs[s + k];
        stbf(p.out + (b * p.L + t) * p.C + c, p.silu ? acc * sigmoid_dev(acc) : acc);
    }
}

template <int W>
__global__ void __launch_bounds__(CONV_THREADS) conv_bwd_kernel(const ConvArgs p) {
    constexpr int NG = CONV_TT + W - 1;  // steps whose output gradient reaches this tile's inputs
    const int64_t ntile = (p.L + CONV_TT - 1) / CONV_TT;
    const int64_t i = (int64_t)blockIdx.x * CONV_THREADS + threadIdx.x;
    if (i >= p.B * ntile * p.C) return;
    const int64_t c = i % p.C, tile = (i / p.C) % ntile, b = i / (p.C * ntile);
    const int64_t t0 = tile * CONV_TT;
    float w[W], xs[NG + W - 1], g[NG];
    int st[NG];  // window start of step t0+s, relative to t0 (clamped below at -(W+1): only compared with taps)
#pragma unroll
    for (int k = 0; k < W; k++) w[k] = p.w[c * W + k];
    const float bias = p.bias ? p.bias[c] : 0.f;
#pragma unroll
    for (int k = 0; k < NG + W - 1; k++) {
        const int64_t tt = t0 - (W - 1) + k;
        xs[k] = tt < p.L ? conv_x<W>(p, b, tt, c) : 0.f;
    }
    int64_t lr = initial_last_reset<W>(p, b, t0);
    float dw[W], db = 0.f;
#pragma unroll
    for (int k = 0; k < W; k++) dw[k] = 0.f;
#pragma unroll
    for (int s = 0; s < NG; s++) {
        const int64_t t = t0 + s;
        g[s] = 0.f;
        st[s] = 0;
        if (t >= p.L) continue;
        if (p.reset && p.reset[b * p.L + t]) lr = t;
        const int64_t st_abs = step_start(lr, W, p.x_prev != nullptr) - t0;
        st[s] = (int)(st_abs < -(W + 1) ? -(W + 1) : st_abs);
        float gg = ldbf(p.dout + (b * p.L + t) * p.C + c);
        if (p.silu) {
            float acc = bias;
#pragma unroll
            for (int k = 0; k < W; k++)
                if (s - (W - 1) + k >= st[s]) acc += w[k] * xs[s + k];
            const float sg = sigmoid_dev(acc);
            gg *= sg * (1.f + acc * (1.f - sg));
        }
        g[s] = gg;
        if (s < CONV_TT) {  // dw and dbias from the steps this tile owns
            db += gg;
#pragma unroll
            for (int k = 0; k < W; k++)
                if (s - (W - 1) + k >= st[s]) dw[k] += gg * xs[s + k];
        }
    }
    // dx[tt] = sum_k w[k] * g[tt + W-1-k] over the steps whose window reaches tt
#pragma unroll
    for (int s = 0; s < CONV_TT; s++) {
        const int64_t tt = t0 + s;
        if (tt >= p.L) break;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const int so = s + (W - 1) - k;  // the step reading tt through tap k
            if (t0 + so < p.L && s >= st[so]) acc += w[k] * g[so];
        }
        stbf(p.dx + (b * p.L + tt) * p.C + c, acc);
    }
    float *pp = p.part + ((b * ntile + tile) * p.C + c) * (W + 1);
#pragma unroll
    for (int k = 0; k < W; k++) pp[k] = dw[k];
    pp[W] = db;
}

// ---- v2 kernels: CPT channels per thread, vector rows, a rolling window; forward and backward ------------------
// Block = 32 lanes across 32 * CPT contiguous channels (one 8- or 16-byte load per thread and row) x 8 warps along
// time (tiles of CB_TT steps). A thread walks its tile once, keeping the last W input rows (and, backward, output
// gradients and window widths) in registers, so every row is loaded once per tile plus W - 1 halo rows. The
// block's reset bytes (with halo) are staged in shared memory. Backward dw and dbias: per thread over its tile, then
// over the block's 8 warps in warp order in shared memory, one partial per (row, 256 steps), summed in order by
// conv_reduce_kernel. Requires C % CPT == 0 and rows aligned to CPT * 2 bytes; otherwise v1 runs.
// CPT = 4: <= 111 registers, 2 blocks per SM; CPT = 8 (backward only) needs 1 block per SM (ptxas spills at 2).
constexpr int CB_TT = 32, CB_WARPS = 8, CB_THREADS = 32 * CB_WARPS, CB_STEPS = CB_TT * CB_WARPS;

template <int CPT>
__device__ __forceinline__ void ld_row(const bf16 *p, float (&v)[CPT]) {
    if constexpr (CPT == 4) {
        const uint2 r = __ldg(reinterpret_cast<const uint2 *>(p));
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&r);
        const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
        v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
    } else {
        const uint4 r = __ldg(reinterpret_cast<const uint4 *>(p));
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&r);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float2 a = __bfloat1622float2(h[k]);
            v[2 * k] = a.x, v[2 * k + 1] = a.y;
        }
    }
}
template <int CPT>
__device__ __forceinline__ void st_row(bf16 *p, const float (&v)[CPT]) {
    if constexpr (CPT == 4) {
        uint2 r;
        __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&r);
        h[0] = __floats2bfloat162_rn(v[0], v[1]), h[1] = __floats2bfloat162_rn(v[2], v[3]);
        *reinterpret_cast<uint2 *>(p) = r;
    } else {
        uint4 r;
        __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&r);
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4 *>(p) = r;
    }
}

// A thread's place in the v2 grid, its weights, and the tile's input rows and window widths.
template <int W, int CPT>
struct ConvTile2 {
    int64_t L, C, b, bt, nbt, cg, tb0, t0, c;
    int lane, warp;
    bool cval, has_prev;
    const uint8_t *srs;  // reset bytes of steps [tb0 - W, tb0 + CB_STEPS + W)
    float w[W][CPT], bias[CPT];

    // stages the block's reset bytes (all threads; one barrier) and loads the thread's weights
    __device__ __forceinline__ ConvTile2(const ConvArgs &p, uint8_t *srs_buf) {
        L = p.L, C = p.C;
        const int64_t CW = 32 * CPT, ncg = (C + CW - 1) / CW;
        nbt = (L + CB_STEPS - 1) / CB_STEPS;
        cg = blockIdx.x % ncg, bt = (blockIdx.x / ncg) % nbt, b = blockIdx.x / (ncg * nbt);
        lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        tb0 = bt * CB_STEPS, t0 = tb0 + (int64_t)warp * CB_TT;
        const int64_t c0 = cg * CW + lane * CPT;
        cval = c0 < C;
        c = cval ? c0 : C - CPT;  // lanes past C compute on real channels and store nothing
        has_prev = p.x_prev != nullptr;
        for (int i = threadIdx.x; i < CB_STEPS + 2 * W; i += CB_THREADS) {
            const int64_t t = tb0 - W + i;
            srs_buf[i] = (p.reset && t >= 0 && t < L) ? p.reset[b * L + t] : 0;
        }
        srs = srs_buf;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < CPT; i++) {
#pragma unroll
            for (int k = 0; k < W; k++) w[k][i] = p.w[(c + i) * W + k];
            bias[i] = p.bias ? p.bias[c + i] : 0.f;
        }
    }
    __device__ __forceinline__ bool rs_at(int64_t t) const { return srs[t - tb0 + W] != 0; }
    // x row tt (x_prev before 0, zero past the end or without x_prev)
    __device__ __forceinline__ void x_row(const ConvArgs &p, int64_t tt, float (&v)[CPT]) const {
        if (tt >= 0 && tt < L) {
            ld_row<CPT>(p.x + (b * L + tt) * C + c, v);
        } else if (tt < 0 && p.x_prev) {
            ld_row<CPT>(p.x_prev + (b * (W - 1) + (W - 1) + tt) * C + c, v);
        } else {
#pragma unroll
            for (int i = 0; i < CPT; i++) v[i] = 0.f;
        }
    }
    // fills window slots 1..W-1 with rows t0 - (W - 1) .. t0 - 1 (slot 0 is shifted out at the first step) and
    // returns the last reset before t0 that can still cut a window (within W - 2 steps), or -1
    __device__ __forceinline__ int64_t start(const ConvArgs &p, float (&xw)[W][CPT]) const {
#pragma unroll
        for (int k = 1; k < W; k++) x_row(p, t0 - W + k, xw[k]);
        int64_t lr = -1;
#pragma unroll
        for (int k = W - 2; k >= 1; k--)
            if (t0 - k >= 0 && rs_at(t0 - k)) lr = t0 - k;
        return lr;
    }
    // step t < L: updates the last reset and returns how many taps (the last ones) read inside the window
    __device__ __forceinline__ int width(int64_t t, int64_t &lr) const {
        if (rs_at(t)) lr = t;
        const int64_t st = lr >= 0 ? lr : (has_prev ? -(int64_t)(W - 1) : 0);  // lowest readable time
        const int64_t n = t - st + 1;
        return n < W ? (int)n : W;
    }
    // bias + the window's taps k >= W - nv, channel i
    __device__ __forceinline__ float acc(const float (&xw)[W][CPT], int i, int nv) const {
        float a = bias[i];
#pragma unroll
        for (int k = 0; k < W; k++)
            if (k >= W - nv) a = fmaf(w[k][i], xw[k][i], a);
        return a;
    }
};
template <int W, int CPT>
__device__ __forceinline__ void shift_rows(float (&v)[W][CPT]) {  // v[k] <- v[k + 1]
#pragma unroll
    for (int k = 0; k < W - 1; k++) {
#pragma unroll
        for (int i = 0; i < CPT; i++) v[k][i] = v[k + 1][i];
    }
}

template <int W, int CPT>
__global__ void __launch_bounds__(CB_THREADS, CPT == 8 ? 1 : 2) conv_bwd2_kernel(const ConvArgs p) {
    constexpr int NG = CB_TT + W - 1;  // steps whose output gradient reaches the tile's inputs
    __shared__ uint8_t srs[CB_STEPS + 2 * W];
    __shared__ float sred[CB_WARPS][W + 1][32 * CPT];
    const ConvTile2<W, CPT> tl(p, srs);
    const int64_t L = tl.L, C = tl.C, b = tl.b, t0 = tl.t0, c = tl.c;
    // window: xw[k] = x row t - (W - 1) + k; gw[k] = g of step t - k; nvw[k] = valid taps of step t - k
    float xw[W][CPT], gw[W][CPT], dw[W][CPT], db[CPT];
    int nvw[W];
#pragma unroll
    for (int k = 0; k < W; k++) {
        nvw[k] = 0;
#pragma unroll
        for (int i = 0; i < CPT; i++) gw[k][i] = 0.f, dw[k][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < CPT; i++) db[i] = 0.f;
    int64_t lr = tl.start(p, xw);
    // unrolled by W: the window rotation then needs no register moves, and loads are not all hoisted (registers)
#pragma unroll W
    for (int s = 0; s < NG; s++) {
        const int64_t t = t0 + s;
        shift_rows<W, CPT>(xw);
#pragma unroll
        for (int k = W - 1; k > 0; k--) {  // gw[k] <- gw[k - 1]: g of one step older
            nvw[k] = nvw[k - 1];
#pragma unroll
            for (int i = 0; i < CPT; i++) gw[k][i] = gw[k - 1][i];
        }
        tl.x_row(p, t, xw[W - 1]);
        float g[CPT];
        int nv = 0;
        if (t < L) {
            nv = tl.width(t, lr);
            float dv[CPT];
            ld_row<CPT>(p.dout + (b * L + t) * C + c, dv);
#pragma unroll
            for (int i = 0; i < CPT; i++) {
                float gg = dv[i];
                if (p.silu) {
                    const float acc = tl.acc(xw, i, nv), sg = sigmoid_dev(acc);
                    gg *= sg * (1.f + acc * (1.f - sg));
                }
                g[i] = gg;
            }
            if (s < CB_TT) {  // dw and dbias from the steps this tile owns
#pragma unroll
                for (int i = 0; i < CPT; i++) {
                    db[i] += g[i];
#pragma unroll
                    for (int k = 0; k < W; k++)
                        if (k >= W - nv) dw[k][i] = fmaf(g[i], xw[k][i], dw[k][i]);
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < CPT; i++) g[i] = 0.f;
        }
        nvw[0] = nv;
#pragma unroll
        for (int i = 0; i < CPT; i++) gw[0][i] = g[i];
        // dx of step tt = t - (W - 1): step t - k reads it through tap k, if that tap is inside its window
        const int64_t tt = t - (W - 1);
        if (s >= W - 1 && tt < L && tl.cval) {
            float dx[CPT];
#pragma unroll
            for (int i = 0; i < CPT; i++) {
                float a = 0.f;
#pragma unroll
                for (int k = 0; k < W; k++)
                    if (k >= W - nvw[k]) a = fmaf(tl.w[k][i], gw[k][i], a);
                dx[i] = a;
            }
            st_row<CPT>(p.dx + (b * L + tt) * C + c, dx);
        }
    }
    // the block's dw, dbias: warps' sums in warp order
#pragma unroll
    for (int i = 0; i < CPT; i++) {
#pragma unroll
        for (int k = 0; k < W; k++) sred[tl.warp][k][tl.lane * CPT + i] = dw[k][i];
        sred[tl.warp][W][tl.lane * CPT + i] = db[i];
    }
    __syncthreads();
    constexpr int CW = 32 * CPT;
    for (int e = threadIdx.x; e < (W + 1) * CW; e += CB_THREADS) {
        const int k = e / CW, ci = e % CW;
        float s2 = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < CB_WARPS; w2++) s2 += sred[w2][k][ci];
        const int64_t cc = tl.cg * CW + ci;
        if (cc < C) p.part[((b * tl.nbt + tl.bt) * C + cc) * (W + 1) + k] = s2;
    }
}

// forward v2 (the default; DISTILL_CONV_FWD=v1 for v1): one vector load and one vector store per row
template <int W, int CPT>
__global__ void __launch_bounds__(CB_THREADS, 2) conv_fwd2_kernel(const ConvArgs p) {
    __shared__ uint8_t srs[CB_STEPS + 2 * W];
    const ConvTile2<W, CPT> tl(p, srs);
    float xw[W][CPT];
    int64_t lr = tl.start(p, xw);
#pragma unroll W
    for (int s = 0; s < CB_TT; s++) {
        const int64_t t = tl.t0 + s;
        shift_rows<W, CPT>(xw);
        if (t < tl.L) {
            tl.x_row(p, t, xw[W - 1]);
            const int nv = tl.width(t, lr);
            float o[CPT];
#pragma unroll
            for (int i = 0; i < CPT; i++) {
                const float acc = tl.acc(xw, i, nv);
                o[i] = p.silu ? acc * sigmoid_dev(acc) : acc;
            }
            if (tl.cval) st_row<CPT>(p.out + (tl.b * tl.L + t) * tl.C + tl.c, o);
        }
    }
}

// dw[c, k] and dbias[c]: sums over the B*ntile partials, in order
__global__ void conv_reduce_kernel(const float *part, int64_t rows, int64_t C, int W, float *dw, float *dbias) {
    const int64_t m = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, M = C * (W + 1);
    if (m >= M) return;
    // rows are summed strictly in order; 16 loads are issued before they are added, so that the sum waits for
    // one memory latency per 16 rows instead of one per row
    float s = 0.f;
    int64_t r = 0;
    for (; r + 16 <= rows; r += 16) {
        float v[16];
#pragma unroll
        for (int k = 0; k < 16; k++) v[k] = part[(r + k) * M + m];
#pragma unroll
        for (int k = 0; k < 16; k++) s += v[k];
    }
    for (; r < rows; r++) s += part[r * M + m];
    const int64_t c = m / (W + 1), k = m % (W + 1);
    if (k < W) dw[c * W + k] = s;
    else if (dbias) dbias[c] = s;
}

int conv_check(int64_t B, int64_t L, int64_t C, int W, char *err, size_t errlen) {
    if (B < 1 || L < 0 || C < 1 || W < 1 || W > 4)
        return scan_fail(err, errlen, "conv1d (CUDA): bad shape B %lld L %lld C %lld W %d (W must be 1..4)",
                         (long long)B, (long long)L, (long long)C, W);
    return 0;
}

}  // namespace

extern "C" int conv1d_silu_fwd_cuda(int64_t B, int64_t L, int64_t C, int W, const uint16_t *x, const float *w,
                                    const float *bias, const uint8_t *reset, const uint16_t *x_prev, int silu,
                                    uint16_t *out, scan_stream_t stream, char *err, size_t errlen) {
    if (conv_check(B, L, C, W, err, errlen)) return -1;
    if (L == 0) return 0;
    ConvArgs a = {};
    a.B = B, a.L = L, a.C = C, a.x = (const bf16 *)x, a.x_prev = (const bf16 *)x_prev, a.w = w, a.bias = bias;
    a.reset = reset, a.silu = silu, a.out = (bf16 *)out;
    cudaStream_t st = (cudaStream_t)stream;
    // v2 (default): 4 channels per thread, 8-byte rows (C a multiple of 4, rows 8-byte aligned); DISTILL_CONV_FWD=v1
    // or other shapes: one channel per thread
    const char *ver = getenv("DISTILL_CONV_FWD");
    const uintptr_t al = (uintptr_t)x | (uintptr_t)out | (uintptr_t)x_prev;
    if (!(ver && !strcmp(ver, "v1")) && C % 4 == 0 && (al & 7) == 0) {
        const int64_t blocks = B * ((L + CB_STEPS - 1) / CB_STEPS) * ((C + 127) / 128);
        switch (W) {
            case 1: conv_fwd2_kernel<1, 4><<<(unsigned)blocks, CB_THREADS, 0, st>>>(a); break;
            case 2: conv_fwd2_kernel<2, 4><<<(unsigned)blocks, CB_THREADS, 0, st>>>(a); break;
            case 3: conv_fwd2_kernel<3, 4><<<(unsigned)blocks, CB_THREADS, 0, st>>>(a); break;
            case 4: conv_fwd2_kernel<4, 4><<<(unsigned)blocks, CB_THREADS, 0, st>>>(a); break;
        }
        return scan_launch_check(err, errlen, "conv1d forward");
    }
    const int64_t n = B * ((L + CONV_TT - 1) / CONV_TT) * C;
    const unsigned blocks = (unsigned)((n + CONV_THREADS - 1) / CONV_THREADS);
    switch (W) {
        case 1: conv_fwd_kernel<1><<<blocks, CONV_THREADS, 0, st>>>(a); break;
        case 2: conv_fwd_kernel<2><<<blocks, CONV_THREADS, 0, st>>>(a); break;
        case 3: conv_fwd_kernel<3><<<blocks, CONV_THREADS, 0, st>>>(a); break;
        case 4: conv_fwd_kernel<4><<<blocks, CONV_THREADS, 0, st>>>(a); break;
    }
    return scan_launch_check(err, errlen, "conv1d forward");
}

extern "C" size_t conv1d_silu_bwd_workspace(int64_t B, int64_t L, int64_t C) {
    return (size_t)(B * ((L + CONV_TT - 1) / CONV_TT) * C * 5) * sizeof(float);
}

extern "C" int conv1d_silu_bwd_cuda(int64_t B, int64_t L, int64_t C, int W, const uint16_t *x, const float *w,
                                    const float *bias, const uint8_t *reset, const uint16_t *x_prev, int silu,
                                    const uint16_t *dout, uint16_t *dx, float *dw, float *dbias, void *workspace,
                                    scan_stream_t stream, char *err, size_t errlen) {
    if (conv_check(B, L, C, W, err, errlen)) return -1;
    cudaStream_t st = (cudaStream_t)stream;
    if (L == 0) {
        cudaMemsetAsync(dw, 0, (size_t)(C * W) * sizeof(float), st);
        if (dbias) cudaMemsetAsync(dbias, 0, (size_t)C * sizeof(float), st);
        return scan_launch_check(err, errlen, "conv1d backward");
    }
    if (!workspace) return scan_fail(err, errlen, "conv1d backward: workspace required");
    ConvArgs a = {};
    a.B = B, a.L = L, a.C = C, a.x = (const bf16 *)x, a.x_prev = (const bf16 *)x_prev, a.w = w, a.bias = bias;
    a.reset = reset, a.silu = silu, a.dout = (const bf16 *)dout, a.dx = (bf16 *)dx, a.part = (float *)workspace;
    // DISTILL_CONV_BWD: v2 (the default: 4 channels per thread, 8-byte rows, 2 blocks per SM; H100: 0.40 vs v1's
    // 0.84 ms at 8 x 2048 x 4096), v2c8 (8 channels, 16-byte rows, 1 block per SM: ptxas spills at 2; 0.47 ms) or v1
    // (one channel per thread); v2 needs C a multiple of the channels per thread and rows aligned to their width,
    // else v1 runs
    const char *ver = getenv("DISTILL_CONV_BWD");
    const int cpt = !ver ? 4 : !strcmp(ver, "v1") ? 0 : !strcmp(ver, "v2c8") ? 8 : 4;
    const uintptr_t al = (uintptr_t)x | (uintptr_t)dout | (uintptr_t)dx | (uintptr_t)x_prev;
    int64_t rows;
    if (cpt && C % cpt == 0 && (al & (uintptr_t)(2 * cpt - 1)) == 0) {
        const int64_t nbt = (L + CB_STEPS - 1) / CB_STEPS, blocks = B * nbt * ((C + 32 * cpt - 1) / (32 * cpt));
        rows = B * nbt;
        auto go = [&](auto kern) { kern<<<(unsigned)blocks, CB_THREADS, 0, st>>>(a); };
        if (cpt == 8) {
            switch (W) {
                case 1: go(conv_bwd2_kernel<1, 8>); break;
                case 2: go(conv_bwd2_kernel<2, 8>); break;
                case 3: go(conv_bwd2_kernel<3, 8>); break;
                case 4: go(conv_bwd2_kernel<4, 8>); break;
            }
        } else {
            switch (W) {
                case 1: go(conv_bwd2_kernel<1, 4>); break;
                case 2: go(conv_bwd2_kernel<2, 4>); break;
                case 3: go(conv_bwd2_kernel<3, 4>); break;
                case 4: go(conv_bwd2_kernel<4, 4>); break;
            }
        }
    } else {
        const int64_t ntile = (L + CONV_TT - 1) / CONV_TT, n = B * ntile * C;
        const unsigned blocks = (unsigned)((n + CONV_THREADS - 1) / CONV_THREADS);
        rows = B * ntile;
        switch (W) {
            case 1: conv_bwd_kernel<1><<<blocks, CONV_THREADS, 0, st>>>(a); break;
            case 2: conv_bwd_kernel<2><<<blocks, CONV_THREADS, 0, st>>>(a); break;
            case 3: conv_bwd_kernel<3><<<blocks, CONV_THREADS, 0, st>>>(a); break;
            case 4: conv_bwd_kernel<4><<<blocks, CONV_THREADS, 0, st>>>(a); break;
        }
    }
    if (scan_launch_check(err, errlen, "conv1d backward")) return -1;
    const int64_t M = C * (W + 1);
    conv_reduce_kernel<<<(unsigned)((M + 255) / 256), 256, 0, st>>>(a.part, rows, C, W, dw, dbias);
    return scan_launch_check(err, errlen, "conv1d backward reduction");
}
