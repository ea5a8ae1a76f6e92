// train_common.cuh: device helpers shared by the training kernels: element loads/stores for the two
// activation dtypes, fixed-order block reductions, and the dtype dispatch of a launch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/train/train_check.cuh"
#include "kernels/train/train_cuda.h"

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float ld(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16 *p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float *p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16 *p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// 8 bf16 <-> 8 floats through one 16-byte word (the vectorized bf16 paths)
__device__ __forceinline__ void unpack8(uint4 u, float *f) {
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 x = __bfloat1622float2(h[j]);
        f[2 * j] = x.x, f[2 * j + 1] = x.y;
    }
}
__device__ __forceinline__ uint4 pack8(const float *f) {
    uint4 u;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
    for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
    return u;
}

// SwiGLU of one element and RoPE's angle and rotation of one pair: one definition for the training kernels and the
// decoder's fused launches (the down projection that computes its input, the rope + KV-cache append), so both give
// the same bits.
__device__ __forceinline__ float swiglu_f(float g, float u) { return g / (1.0f + expf(-g)) * u; }
// the angle as an fp32 product (as HF), its cosine and sine in double (as the CPU twin); sgn -1 rotates back
__device__ __forceinline__ void rope_cs(int32_t pos, float inv_freq, float sgn, float *cs, float *sn) {
    const float ang = (float)pos * inv_freq;
    double sd, cd;
    sincos((double)ang, &sd, &cd);
    *cs = (float)cd, *sn = sgn * (float)sd;
}
__device__ __forceinline__ void rope_rot(float a, float b, float cs, float sn, float *o1, float *o2) {
    *o1 = a * cs - b * sn;
    *o2 = b * cs + a * sn;
}

// Sum over a block in a fixed order (warp butterflies, then warp 0 over the warps' partials): the result
// depends only on the values and blockDim, never on timing. Every thread gets the total. blockDim.x must be
// a multiple of 32 and <= 1024; `sh` is 32 elements of shared memory (reused: a barrier ends the call).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T *sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    T t = lane < nw ? sh[lane] : (T)0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}
__device__ __forceinline__ float block_max(float v, float *sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

static inline int dt_ok(DType dt) { return dt == DT_F32 || dt == DT_BF16; }
static inline int grid_for(int64_t n, int threads, int cap) {
    int64_t b = (n + threads - 1) / threads;
    return (int)(b < 1 ? 1 : b > cap ? cap : b);
}

// DL_DISPATCH(dt, T, body): runs body with T = float or bf16.
#define DL_DISPATCH(dt, T, ...)        \
    do {                               \
        if ((dt) == DT_F32) {          \
            typedef float T;           \
            __VA_ARGS__;               \
        } else {                       \
            typedef bf16 T;            \
            __VA_ARGS__;               \
        }                              \
    } while (0)
