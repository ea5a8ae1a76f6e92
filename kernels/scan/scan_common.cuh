// scan_common.cuh: device helpers shared by the selective-scan and conv1d kernels: fast transcendental
// functions on the MUFU unit, bf16 loads/stores of small vectors, error plumbing for the host entry points.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#define SCAN_LOG2E 1.4426950408889634f
#define SCAN_LN2 0.6931471805599453f

typedef __nv_bfloat16 bf16;

// 2^x on the MUFU (one instruction; relative error ~2^-22)
__device__ __forceinline__ float ex2f(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float lg2f(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// softplus with F.softplus's threshold of 20, from y = e^x; small y uses the series, where log2(1 + y) would lose bits
__device__ __forceinline__ float softplus_of_exp(float x, float y) {
    const float small = y * (1.f - y * (0.5f - y * (1.f / 3.f)));
    const float r = y < 1e-3f ? small : lg2f(1.f + y) * SCAN_LN2;
    return x <= 20.f ? r : x;
}
__device__ __forceinline__ float softplus_dev(float x) { return softplus_of_exp(x, ex2f(x * SCAN_LOG2E)); }
// softplus(x) and its derivative sigmoid(x) from one exp
__device__ __forceinline__ void softplus_d(float x, float &sp, float &dsp) {
    const float y = ex2f(x * SCAN_LOG2E);
    sp = softplus_of_exp(x, y);
    dsp = x <= 20.f ? __fdividef(y, 1.f + y) : 1.f;
}
__device__ __forceinline__ float sigmoid_dev(float x) { return __fdividef(1.f, 1.f + ex2f(-x * SCAN_LOG2E)); }

__device__ __forceinline__ float ldbf(const bf16 *p) { return __bfloat162float(__ldg(p)); }
__device__ __forceinline__ void stbf(bf16 *p, float v) { *p = __float2bfloat16_rn(v); }

// loads R consecutive bf16 (R*2 bytes, aligned to that) into floats
template <int R>
__device__ __forceinline__ void load_vec(const bf16 *p, float (&v)[R]) {
    if constexpr (R == 1) {
        v[0] = ldbf(p);
    } else if constexpr (R == 2) {
        const __nv_bfloat162 x = __ldg(reinterpret_cast<const __nv_bfloat162 *>(p));
        v[0] = __low2float(x), v[1] = __high2float(x);
    } else if constexpr (R == 4) {
        const uint2 x = __ldg(reinterpret_cast<const uint2 *>(p));
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&x);
        v[0] = __low2float(h[0]), v[1] = __high2float(h[0]), v[2] = __low2float(h[1]), v[3] = __high2float(h[1]);
    } else {
        static_assert(R % 8 == 0, "R must be 1, 2, 4 or a multiple of 8");
#pragma unroll
        for (int i = 0; i < R; i += 8) {
            const uint4 x = __ldg(reinterpret_cast<const uint4 *>(p + i));
            const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&x);
#pragma unroll
            for (int k = 0; k < 4; k++) v[i + 2 * k] = __low2float(h[k]), v[i + 2 * k + 1] = __high2float(h[k]);
        }
    }
}

static inline int scan_fail(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}
static inline int scan_launch_check(char *err, size_t errlen, const char *what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return scan_fail(err, errlen, "%s: launch failed: %s", what, cudaGetErrorString(e));
    return 0;
}

// ---- asynchronous global -> shared copies (sm_80+) -----------------------------------------------------------
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

// loads R consecutive bf16 from shared memory (aligned to R*2 bytes) into floats
template <int R>
__device__ __forceinline__ void lds_vec(const bf16 *p, float (&v)[R]) {
    if constexpr (R == 1) {
        v[0] = __bfloat162float(*p);
    } else if constexpr (R == 2) {
        const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162 *>(p);
        v[0] = __low2float(x), v[1] = __high2float(x);
    } else if constexpr (R == 4) {
        const uint2 x = *reinterpret_cast<const uint2 *>(p);
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&x);
        v[0] = __low2float(h[0]), v[1] = __high2float(h[0]), v[2] = __low2float(h[1]), v[3] = __high2float(h[1]);
    } else {
#pragma unroll
        for (int i = 0; i < R; i += 8) {
            const uint4 x = *reinterpret_cast<const uint4 *>(p + i);
            const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&x);
#pragma unroll
            for (int k = 0; k < 4; k++) v[i + 2 * k] = __low2float(h[k]), v[i + 2 * k + 1] = __high2float(h[k]);
        }
    }
}

// loads R consecutive floats from shared memory (16-byte aligned, R a multiple of 4)
template <int R>
__device__ __forceinline__ void ldsf_vec(const float *p, float (&v)[R]) {
    static_assert(R % 4 == 0, "R must be a multiple of 4");
#pragma unroll
    for (int i = 0; i < R; i += 4) {
        const float4 x = *reinterpret_cast<const float4 *>(p + i);
        v[i] = x.x, v[i + 1] = x.y, v[i + 2] = x.z, v[i + 3] = x.w;
    }
}
