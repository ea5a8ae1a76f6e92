// engine_ops.cu: element-wise kernels of engine_cuda (see engine_ops.cuh).
#include "kernels/engine/engine_ops.cuh"

#include <cuda_bf16.h>

#include "kernels/train/train_check.cuh"

template <typename T> __device__ __forceinline__ float ld(const T *p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float *p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16 *p, int64_t i) { return __bfloat162float(p[i]); }
template <typename T> __device__ __forceinline__ void st(T *p, int64_t i, float v);
template <> __device__ __forceinline__ void st<float>(float *p, int64_t i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16 *p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

static unsigned grid_for(int64_t n) { return (unsigned)((n + 255) / 256 < 65535 * 16 ? (n + 255) / 256 : 65535 * 16); }
#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

template <typename T>
__global__ void repeat_fwd_k(T *xr, const T *xs, int64_t T_, int64_t di, int64_t dxb, int64_t ds) {
    const int64_t rep = di / dxb;
    GRID_STRIDE(i, T_ * di) {
        int64_t t = i / di, c = i % di, g = c / ds, n = c % ds;
        xr[i] = xs[t * dxb + (g / rep) * ds + n];
    }
}
template <typename T>
__global__ void repeat_bwd_k(T *dxs, const T *dxr, int64_t T_, int64_t di, int64_t dxb, int64_t ds) {
    const int64_t rep = di / dxb;
    GRID_STRIDE(i, T_ * dxb) {
        int64_t t = i / dxb, c = i % dxb, j = c / ds, n = c % ds;
        float s = 0.0f;
        for (int64_t k = 0; k < rep; k++) s += ld(dxr, t * di + (j * rep + k) * ds + n);
        st(dxs, i, s);
    }
}
// bf16, ds a multiple of 8: 8 channels (16 bytes) per thread; the channel index math in 32 bits (di < 2^31)
__global__ void repeat_fwd_v8_k(uint4 *xr, const uint4 *xs, int64_t T_, int di8, int dxb8, int ds8, int rep) {
    GRID_STRIDE(i, T_ * di8) {
        const int64_t t = i / di8;
        const int c = (int)(i - t * di8), g = c / ds8, n = c - g * ds8;
        xr[i] = xs[t * dxb8 + (g / rep) * ds8 + n];
    }
}
__global__ void repeat_bwd_v8_k(uint4 *dxs, const uint4 *dxr, int64_t T_, int di8, int dxb8, int ds8, int rep) {
    GRID_STRIDE(i, T_ * dxb8) {
        const int64_t t = i / dxb8;
        const int c = (int)(i - t * dxb8), j = c / ds8, n = c - j * ds8;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < rep; k++) {  // the copies in order, as repeat_bwd_k
            const uint4 v = dxr[t * di8 + (j * rep + k) * ds8 + n];
            const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
            for (int e = 0; e < 4; e++) {
                const float2 f = __bfloat1622float2(h[e]);
                s[2 * e] += f.x, s[2 * e + 1] += f.y;
            }
        }
        uint4 o;
        __nv_bfloat162 *h = (__nv_bfloat162 *)&o;
        for (int e = 0; e < 4; e++) h[e] = __floats2bfloat162_rn(s[2 * e], s[2 * e + 1]);
        dxs[i] = o;
    }
}
__global__ void neg_exp_k(float *A, const float *alog, int64_t n) { GRID_STRIDE(i, n) A[i] = -expf(alog[i]); }
__global__ void add_mul_k(float *g, const float *a, const float *b, int64_t n) { GRID_STRIDE(i, n) g[i] += a[i] * b[i]; }
__global__ void add_f32_k(float *y, const float *x, float a, int64_t n) { GRID_STRIDE(i, n) y[i] += a * x[i]; }
template <typename T>
__global__ void axpy_k(T *y, const T *x, float s, int64_t n) { GRID_STRIDE(i, n) st(y, i, ld(y, i) + s * ld(x, i)); }
__global__ void add_cols_k(float *dst, int64_t dc, const float *src, int64_t sc, int64_t rows) {
    GRID_STRIDE(i, rows * dc) dst[i] += src[(i / dc) * sc + i % dc];
}

#define BF(p) ((__nv_bfloat16 *)(p))
#define CBF(p) ((const __nv_bfloat16 *)(p))

// the 16-byte path: bf16, 8 | ds (then 8 | di, dxb), 16-byte aligned buffers
static bool v8(DType dt, const void *a, const void *b, int64_t ds) {
    return dt == DT_BF16 && ds % 8 == 0 && !(((uintptr_t)a | (uintptr_t)b) & 15);
}
void eng_repeat_fwd(DType dt, void *xr, const void *xs, int64_t T, int64_t di, int64_t dxb, int64_t ds, cudaStream_t s) {
    if (v8(dt, xr, xs, ds))
        repeat_fwd_v8_k<<<grid_for(T * di / 8), 256, 0, s>>>((uint4 *)xr, (const uint4 *)xs, T, (int)(di / 8), (int)(dxb / 8),
                                                              (int)(ds / 8), (int)(di / dxb));
    else if (dt == DT_BF16) repeat_fwd_k<<<grid_for(T * di), 256, 0, s>>>(BF(xr), CBF(xs), T, di, dxb, ds);
    else repeat_fwd_k<<<grid_for(T * di), 256, 0, s>>>((float *)xr, (const float *)xs, T, di, dxb, ds);
    kernelCheck("repeat_fwd_k (Mamba x repeat over KV groups)");
}
void eng_repeat_bwd(DType dt, void *dxs, const void *dxr, int64_t T, int64_t di, int64_t dxb, int64_t ds, cudaStream_t s) {
    if (v8(dt, dxs, dxr, ds))
        repeat_bwd_v8_k<<<grid_for(T * dxb / 8), 256, 0, s>>>((uint4 *)dxs, (const uint4 *)dxr, T, (int)(di / 8), (int)(dxb / 8),
                                                               (int)(ds / 8), (int)(di / dxb));
    else if (dt == DT_BF16) repeat_bwd_k<<<grid_for(T * dxb), 256, 0, s>>>(BF(dxs), CBF(dxr), T, di, dxb, ds);
    else repeat_bwd_k<<<grid_for(T * dxb), 256, 0, s>>>((float *)dxs, (const float *)dxr, T, di, dxb, ds);
    kernelCheck("repeat_bwd_k (Mamba x repeat backward)");
}
void eng_neg_exp(float *A, const float *alog, int64_t n, cudaStream_t s) {
    neg_exp_k<<<grid_for(n), 256, 0, s>>>(A, alog, n);
    kernelCheck("neg_exp_k (A = -exp(A_log))");
}
void eng_add_mul(float *g, const float *a, const float *b, int64_t n, cudaStream_t s) {
    add_mul_k<<<grid_for(n), 256, 0, s>>>(g, a, b, n);
    kernelCheck("add_mul_k (A_log gradient)");
}
void eng_add_f32(float *y, const float *x, float a, int64_t n, cudaStream_t s) {
    add_f32_k<<<grid_for(n), 256, 0, s>>>(y, x, a, n);
    kernelCheck("add_f32_k (gradient add)");
}
void eng_axpy(DType dt, void *y, const void *x, float sc, int64_t n, cudaStream_t s) {
    if (dt == DT_BF16) axpy_k<<<grid_for(n), 256, 0, s>>>(BF(y), CBF(x), sc, n);
    else axpy_k<<<grid_for(n), 256, 0, s>>>((float *)y, (const float *)x, sc, n);
    kernelCheck("axpy_k (hidden-state gradient)");
}
void eng_add_cols(float *dst, int64_t dc, const float *src, int64_t sc, int64_t rows, cudaStream_t s) {
    add_cols_k<<<grid_for(rows * dc), 256, 0, s>>>(dst, dc, src, sc, rows);
    kernelCheck("add_cols_k (padded dt_proj gradient)");
}

// One block per row; each thread sums a strided slice in fp64, then a fixed-shape tree: deterministic.
template <typename T>
__global__ void mse_rows_k(int64_t d, const T *a, const T *b, const uint8_t *mask, float g2, T *da, double *rows) {
    __shared__ double red[256];
    const int64_t r = blockIdx.x;
    if (mask && !mask[r]) {
        if (threadIdx.x == 0) rows[r] = 0.0;
        return;
    }
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float e = ld(a, r * d + i) - ld(b, r * d + i);
        s += (double)e * e;
        if (da) st(da, r * d + i, ld(da, r * d + i) + g2 * e);
    }
    red[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if ((int)threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) rows[r] = red[0];
}
__global__ void sum_rows_k(const double *rows, int64_t n, double *acc) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += rows[i];
    acc[0] = s;
}

void eng_mse_rows(DType dt, int64_t n, int64_t d, const void *a, const void *b, const uint8_t *mask, double scale,
                  void *da, double *rows, cudaStream_t s) {
    if (n <= 0) return;
    const float g2 = (float)(2.0 * scale);
    if (dt == DT_BF16) mse_rows_k<<<(unsigned)n, 256, 0, s>>>(d, CBF(a), CBF(b), mask, g2, BF(da), rows);
    else mse_rows_k<<<(unsigned)n, 256, 0, s>>>(d, (const float *)a, (const float *)b, mask, g2, (float *)da, rows);
    cudaCheck(cudaGetLastError());
}
void eng_sum_rows(const double *rows, int64_t n, double *acc, cudaStream_t s) {
    sum_rows_k<<<1, 1, 0, s>>>(rows, n, acc);
    cudaCheck(cudaGetLastError());
}
