// gpu_common.cuh: helpers for the GPU test and benchmark programs (not part of the library): checked CUDA calls,
// device-side random fills (so that multi-GB inputs need no host generation), bf16 host conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline void ck_(cudaError_t e, const char *file, int line, const char *what) {
    if (e != cudaSuccess) {
        fprintf(stderr, "%s:%d: CUDA error %s in %s (hint: out of memory? wrong GPU?)\n", file, line,
                cudaGetErrorString(e), what);
        exit(1);
    }
}
#define CK(call) ck_((call), __FILE__, __LINE__, #call)

// Median time in ms of reps calls of call(i) (i = 0, 1, ...: e.g. to rotate input sets), each between two CUDA
// events on the legacy stream, after 3 warm-up calls. The one timer of every benchmark program.
template <typename F>
static double gpu_median_ms(int reps, F &&call) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; i++) call(i);
    CK(cudaDeviceSynchronize());
    float *ts = (float *)malloc((size_t)(reps > 0 ? reps : 1) * sizeof(float));
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(a));
        call(i);
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&ts[i], a, b));
    }
    CK(cudaGetLastError());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    // insertion sort: reps is small
    for (int i = 1; i < reps; i++)
        for (int j = i; j > 0 && ts[j - 1] > ts[j]; j--) {
            float t = ts[j];
            ts[j] = ts[j - 1], ts[j - 1] = t;
        }
    const double m = reps > 0 ? ts[reps / 2] : 0.0;
    free(ts);
    return m;
}

__host__ __device__ inline uint64_t gmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__host__ __device__ inline float gunif(uint64_t seed, uint64_t i) {
    return (float)(gmix64(seed * 0x632BE59BD9B4E019ull + i) >> 40) * (1.0f / 16777216.0f);
}

// kind 0: uniform [a, b); kind 1: approximately normal (mean a, sd b; sum of 4 uniforms)
__global__ void fill_bf16_kernel(__nv_bfloat16 *p, int64_t n, uint64_t seed, int kind, float a, float b) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v;
        if (kind == 0) v = a + (b - a) * gunif(seed, i);
        else {
            float s = 0.f;
            for (int k = 0; k < 4; k++) s += gunif(seed, 4 * (uint64_t)i + k);
            v = a + b * (s - 2.0f) * 1.7320508f;
        }
        p[i] = __float2bfloat16_rn(v);
    }
}
__global__ void fill_u8_kernel(uint8_t *p, int64_t n, uint64_t seed, float prob, int64_t L) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i % L;
        p[i] = gunif(seed, i) < prob || (L > 6 && (t == 3 || t == 4)) || i == 0;
    }
}
static inline void fill_bf16(__nv_bfloat16 *p, int64_t n, uint64_t seed, int kind, float a, float b) {
    fill_bf16_kernel<<<4096, 256>>>(p, n, seed, kind, a, b);
    CK(cudaGetLastError());
}

static inline double bf2d(__nv_bfloat16 v) { return (double)__bfloat162float(v); }

// relative error of a bf16 / fp32 device-result copy against a double reference
static inline double rel_bf(const __nv_bfloat16 *x, const double *r, int64_t n) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = bf2d(x[i]) - r[i];
        a += e * e, b += r[i] * r[i];
    }
    return a != a ? NAN : sqrt(a / (b > 0 ? b : 1));
}
static inline double rel_f(const float *x, const double *r, int64_t n) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = (double)x[i] - r[i];
        a += e * e, b += r[i] * r[i];
    }
    return a != a ? NAN : sqrt(a / (b > 0 ? b : 1));
}
