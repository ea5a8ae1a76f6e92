// conv1d_silu.cu: causal depthwise conv1d (width W <= 4) + bias + SiLU, token-major [B, L, C], bf16 activations,
// fp32 weights and arithmetic. One thread owns CONV_TT consecutive steps of one channel: consecutive threads take
// consecutive channels (coalesced rows), and each input is loaded once per thread window instead of W times.
// The backward writes per-(row, tile) partial sums of dw and dbias, summed in a fixed order by a second kernel:
// deterministic, no atomics.
#include "kernels/scan/scan_common.cuh"
#include "kernels/scan/selective_scan_cuda.h"

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
    const int64_t n = B * ((L + CONV_TT - 1) / CONV_TT) * C;
    const unsigned blocks = (unsigned)((n + CONV_THREADS - 1) / CONV_THREADS);
    cudaStream_t st = (cudaStream_t)stream;
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
    const int64_t ntile = (L + CONV_TT - 1) / CONV_TT, n = B * ntile * C;
    const unsigned blocks = (unsigned)((n + CONV_THREADS - 1) / CONV_THREADS);
    switch (W) {
        case 1: conv_bwd_kernel<1><<<blocks, CONV_THREADS, 0, st>>>(a); break;
        case 2: conv_bwd_kernel<2><<<blocks, CONV_THREADS, 0, st>>>(a); break;
        case 3: conv_bwd_kernel<3><<<blocks, CONV_THREADS, 0, st>>>(a); break;
        case 4: conv_bwd_kernel<4><<<blocks, CONV_THREADS, 0, st>>>(a); break;
    }
    if (scan_launch_check(err, errlen, "conv1d backward")) return -1;
    const int64_t M = C * (W + 1);
    conv_reduce_kernel<<<(unsigned)((M + 255) / 256), 256, 0, st>>>(a.part, B * ntile, C, W, dw, dbias);
    return scan_launch_check(err, errlen, "conv1d backward reduction");
}
