// layers.cu: RMSNorm (+ residual), RoPE, SwiGLU, embedding and dtype conversion kernels of the training
// backend; twins of rmsnorm_fwd/bwd, rope_apply, swiglu_fwd/bwd, embedding_fwd/bwd (distill/layers_cpu.c).
// All are memory-bound: one pass over their inputs and outputs (RMSNorm with residual re-reads the row it
// just wrote, from L2).
#include <stdlib.h>
#include <string.h>

#include "kernels/train/train_common.cuh"

// ---------------------------------------------------------------- RMSNorm

#define NORM_THREADS 256
#define NORM_PARTS 256  // fixed number of row groups of the dw reduction (independent of the GPU)

// one block per row. h = x (+ res_in), written to res_out when fused; out = w * h * rstd.
template <typename T>
__global__ void rmsnorm_fwd_kernel(T *out, float *rstd, T *res_out, const T *x, const T *res_in, const T *w,
                                   int64_t d, float eps) {
    __shared__ float sh[32];
    const int64_t row = blockIdx.x;
    const T *xr = x + row * d;
    float ss = 0.f;
    if (res_in) {
        const T *rr = res_in + row * d;
        T *hr = res_out + row * d;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            st(hr, i, ld(xr, i) + ld(rr, i));
            const float h = ld(hr, i);  // the rounded value: what the backward will see
            ss += h * h;
        }
        xr = hr;  // each thread re-reads only the elements it wrote
    } else {
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            const float h = ld(xr, i);
            ss += h * h;
        }
    }
    ss = block_sum(ss, sh);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    if (rstd && threadIdx.x == 0) rstd[row] = r;
    T *o = out + row * d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) st(o, i, ld(w, i) * (ld(xr, i) * r));
}

// block b handles rows [b*per, (b+1)*per): din rows, and partial dw over its rows into part [NORM_PARTS, d]
template <typename T>
__global__ void rmsnorm_bwd_kernel(T *din, float *part, const T *dout, const T *in, const T *w, const float *rstd,
                                   int64_t N, int64_t d, int64_t per) {
    __shared__ float sh[32];
    const int64_t r0 = blockIdx.x * per, r1 = min(N, r0 + per);
    float *pb = part ? part + (int64_t)blockIdx.x * d : nullptr;
    if (pb)
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) pb[i] = 0.f;
    for (int64_t n = r0; n < r1; n++) {
        const T *x = in + n * d, *dy = dout + n * d;
        const float r = rstd[n];
        float dot = 0.f;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) dot += ld(w, i) * ld(dy, i) * ld(x, i);
        dot = block_sum(dot, sh);
        const float c = dot * r * r * r / (float)d;
        T *dx = din + n * d;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            const float xi = ld(x, i), dyi = ld(dy, i);
            st(dx, i, ld(dx, i) + (r * ld(w, i) * dyi - c * xi));
            if (pb) pb[i] += dyi * (xi * r);  // same thread owns column i for all rows: no race
        }
    }
}

// dw[c] += sum over parts in order
__global__ void colsum_add_kernel(float *dw, const float *part, int nparts, int64_t d) {
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < d; c += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int p = 0; p < nparts; p++) s += part[(int64_t)p * d + c];
        dw[c] += s;
    }
}

// ---- bf16 fast paths: 16-byte accesses (8 elements per load) when rows are multiples of 8 elements and
// pointers 16-byte aligned; same arithmetic per element as the scalar kernels.
static inline bool al16(const void *p) { return !((uintptr_t)p & 15); }

__global__ void rmsnorm_fwd_vec_kernel(bf16 *out, float *rstd, bf16 *res_out, const bf16 *x, const bf16 *res_in,
                                       const bf16 *w, int64_t d, float eps) {
    __shared__ float sh[32];
    const int64_t row = blockIdx.x, d8 = d / 8;
    const uint4 *xr = (const uint4 *)(x + row * d);
    float ss = 0.f;
    if (res_in) {
        const uint4 *rr = (const uint4 *)(res_in + row * d);
        uint4 *hr = (uint4 *)(res_out + row * d);
        for (int64_t i = threadIdx.x; i < d8; i += blockDim.x) {
            float a[8], b[8];
            unpack8(xr[i], a);
            unpack8(rr[i], b);
#pragma unroll
            for (int j = 0; j < 8; j++) a[j] += b[j];
            const uint4 hv = pack8(a);
            hr[i] = hv;
            unpack8(hv, a);  // the rounded value, as the backward sees it
#pragma unroll
            for (int j = 0; j < 8; j++) ss += a[j] * a[j];
        }
        xr = hr;
    } else {
        for (int64_t i = threadIdx.x; i < d8; i += blockDim.x) {
            float a[8];
            unpack8(xr[i], a);
#pragma unroll
            for (int j = 0; j < 8; j++) ss += a[j] * a[j];
        }
    }
    ss = block_sum(ss, sh);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    if (rstd && threadIdx.x == 0) rstd[row] = r;
    uint4 *o = (uint4 *)(out + row * d);
    const uint4 *wv = (const uint4 *)w;
    for (int64_t i = threadIdx.x; i < d8; i += blockDim.x) {
        float a[8], ww[8];
        unpack8(xr[i], a);
        unpack8(wv[i], ww);
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] = ww[j] * (a[j] * r);
        o[i] = pack8(a);
    }
}

// 8 elements of the backward's two passes, shared by the block and the warp kernels: w.dy.x for the row's dot,
// then dx += r w dy - c x and (pw != NULL) the dw terms dy x r added to the fp32 partial row pw (16-byte accesses).
__device__ __forceinline__ float rms_bwd_dot8(uint4 x, uint4 dy, uint4 w) {
    float a[8], g[8], ww[8], dot = 0.f;
    unpack8(x, a);
    unpack8(dy, g);
    unpack8(w, ww);
#pragma unroll
    for (int j = 0; j < 8; j++) dot += ww[j] * g[j] * a[j];
    return dot;
}
__device__ __forceinline__ void rms_bwd_dx8(uint4 *dx, uint4 x, uint4 dy, uint4 w, float r, float c, float *pw) {
    float a[8], g[8], ww[8], o[8];
    unpack8(x, a);
    unpack8(dy, g);
    unpack8(w, ww);
    unpack8(*dx, o);
#pragma unroll
    for (int j = 0; j < 8; j++) o[j] = o[j] + (r * ww[j] * g[j] - c * a[j]);
    *dx = pack8(o);
    if (pw) {
        float4 *p4 = (float4 *)pw;
        float4 u = p4[0], v = p4[1];
        u.x += g[0] * (a[0] * r), u.y += g[1] * (a[1] * r), u.z += g[2] * (a[2] * r), u.w += g[3] * (a[3] * r);
        v.x += g[4] * (a[4] * r), v.y += g[5] * (a[5] * r), v.z += g[6] * (a[6] * r), v.w += g[7] * (a[7] * r);
        p4[0] = u, p4[1] = v;
    }
}

__global__ void rmsnorm_bwd_vec_kernel(bf16 *din, float *part, const bf16 *dout, const bf16 *in, const bf16 *w,
                                       const float *rstd, int64_t N, int64_t d, int64_t per) {
    __shared__ float sh[32];
    const int64_t r0 = blockIdx.x * per, r1 = min(N, r0 + per), d8 = d / 8;
    float *pb = part ? part + (int64_t)blockIdx.x * d : nullptr;
    if (pb)
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) pb[i] = 0.f;
    __syncthreads();  // the zeroing above uses another thread-to-column mapping than the loop below
    const uint4 *wv = (const uint4 *)w;
    for (int64_t n = r0; n < r1; n++) {
        const uint4 *x = (const uint4 *)(in + n * d), *dy = (const uint4 *)(dout + n * d);
        const float r = rstd[n];
        float dot = 0.f;
        for (int64_t i = threadIdx.x; i < d8; i += blockDim.x) dot += rms_bwd_dot8(x[i], dy[i], wv[i]);
        dot = block_sum(dot, sh);
        const float c = dot * r * r * r / (float)d;
        uint4 *dx = (uint4 *)(din + n * d);
        for (int64_t i = threadIdx.x; i < d8; i += blockDim.x)
            rms_bwd_dx8(dx + i, x[i], dy[i], wv[i], r, c, pb ? pb + 8 * i : nullptr);
    }
}

// Warp per row (bf16, d % 8 == 0): the block kernel above walks its rows one at a time with two block barriers
// per row, so at d 576 (SmolLM2) 72 of its 256 threads have work and a row costs ~1.4 us of latency (93 us for
// 16384 rows on an H100, 4x the bytes' time). Here each of a block's 8 warps owns rows r0 + w, r0 + w + 8, ...
// of the block's range and reduces with shuffles only. With dw, each warp sums its rows' dw terms into its own
// shared-memory row (lane-owned columns: no race) and the block adds the 8 rows in warp order into its part:
// deterministic, a function of the shape only.
#define NORM_WARPS 8
__global__ void __launch_bounds__(NORM_WARPS * 32)
    rmsnorm_bwd_warp_kernel(bf16 *din, float *part, const bf16 *dout, const bf16 *in, const bf16 *w, const float *rstd,
                            int64_t N, int64_t d, int64_t per) {
    extern __shared__ float wpart[];  // [NORM_WARPS][d] when part != NULL
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t r0 = blockIdx.x * per, r1 = min(N, r0 + per), d8 = d / 8;
    float *wp = part ? wpart + (int64_t)warp * d : nullptr;
    if (wp)
        for (int64_t i = lane; i < d; i += 32) wp[i] = 0.f;
    const uint4 *wv = (const uint4 *)w;
    for (int64_t n = r0 + warp; n < r1; n += NORM_WARPS) {
        const uint4 *x = (const uint4 *)(in + n * d), *dy = (const uint4 *)(dout + n * d);
        const float r = rstd[n];
        float dot = 0.f;
        for (int64_t i = lane; i < d8; i += 32) dot += rms_bwd_dot8(x[i], dy[i], wv[i]);
#pragma unroll
        for (int o = 16; o; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        const float c = dot * r * r * r / (float)d;
        uint4 *dx = (uint4 *)(din + n * d);
        for (int64_t i = lane; i < d8; i += 32)  // shared memory: a warp's 32 x 32 bytes in conflict-free phases
            rms_bwd_dx8(dx + i, x[i], dy[i], wv[i], r, c, wp ? wp + 8 * i : nullptr);
    }
    if (!part) return;
    __syncthreads();
    float *pb = part + (int64_t)blockIdx.x * d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < NORM_WARPS; q++) s += wpart[(int64_t)q * d + i];
        pb[i] = s;
    }
}
// the warp kernel's shared memory with dw; above this (d > 2048) the block kernel runs (occupancy)
#define NORM_WARP_SMEM_MAX (NORM_WARPS * 2048 * 4)

static int norm_parts(int64_t N) { return (int)(N < NORM_PARTS ? (N > 0 ? N : 1) : NORM_PARTS); }

extern "C" int rmsnorm_fwd_cuda(DType dt, void *out, float *rstd, void *res_out, const void *x, const void *res_in,
                                const void *w, int64_t N, int64_t d, float eps, dl_stream_t stream, char *err,
                                size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "rmsnorm_fwd_cuda: dtype must be f32 or bf16");
    if (d < 1 || d > 16384 || N < 0) return train_fail(err, errlen, "rmsnorm_fwd_cuda: d = %lld outside 1..16384", (long long)d);
    if (res_in && !res_out) return train_fail(err, errlen, "rmsnorm_fwd_cuda: res_in given without res_out");
    if (N == 0) return 0;
    if (N > 0x7fffffff) return train_fail(err, errlen, "rmsnorm_fwd_cuda: N = %lld rows > 2^31-1", (long long)N);
    if (dt == DT_BF16 && d % 8 == 0 && al16(out) && al16(x) && al16(w) && (!res_in || (al16(res_in) && al16(res_out)))) {
        rmsnorm_fwd_vec_kernel<<<(unsigned)N, NORM_THREADS, 0, stream>>>((bf16 *)out, rstd, (bf16 *)res_out, (const bf16 *)x,
                                                                          (const bf16 *)res_in, (const bf16 *)w, d, eps);
        kernelCheck("rmsnorm_fwd_vec_kernel");
        return 0;
    }
    DL_DISPATCH(dt, T,
                rmsnorm_fwd_kernel<T><<<(unsigned)N, NORM_THREADS, 0, stream>>>(
                    (T *)out, rstd, (T *)res_out, (const T *)x, (const T *)res_in, (const T *)w, d, eps));
    kernelCheck("rmsnorm_fwd_kernel");
    return 0;
}

extern "C" size_t rmsnorm_bwd_workspace(int64_t N, int64_t d) { return (size_t)norm_parts(N) * (size_t)d * sizeof(float); }

extern "C" int rmsnorm_bwd_cuda(DType dt, void *din, float *dw, const void *dout, const void *in, const void *w,
                                const float *rstd, int64_t N, int64_t d, void *workspace, dl_stream_t stream,
                                char *err, size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "rmsnorm_bwd_cuda: dtype must be f32 or bf16");
    if (d < 1 || d > 16384 || N < 0) return train_fail(err, errlen, "rmsnorm_bwd_cuda: d = %lld outside 1..16384", (long long)d);
    if (dw && !workspace) return train_fail(err, errlen, "rmsnorm_bwd_cuda: dw needs a workspace of rmsnorm_bwd_workspace bytes");
    if (N == 0) return 0;
    const int parts = norm_parts(N);
    const int64_t per = (N + parts - 1) / parts;
    float *part = dw ? (float *)workspace : nullptr;
    const bool vec = dt == DT_BF16 && d % 8 == 0 && al16(din) && al16(dout) && al16(in) && al16(w) && (!part || al16(part));
    const size_t wsmem = part ? (size_t)NORM_WARPS * (size_t)d * sizeof(float) : 0;
    if (vec && wsmem <= NORM_WARP_SMEM_MAX) {
        if (wsmem > 48 * 1024)
            cudaFuncSetAttribute(rmsnorm_bwd_warp_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wsmem);
        rmsnorm_bwd_warp_kernel<<<parts, NORM_WARPS * 32, wsmem, stream>>>((bf16 *)din, part, (const bf16 *)dout,
                                                                          (const bf16 *)in, (const bf16 *)w, rstd, N, d, per);
        kernelCheck("rmsnorm_bwd_warp_kernel");
    } else if (vec) {
        rmsnorm_bwd_vec_kernel<<<parts, NORM_THREADS, 0, stream>>>((bf16 *)din, part, (const bf16 *)dout, (const bf16 *)in,
                                                                    (const bf16 *)w, rstd, N, d, per);
        kernelCheck("rmsnorm_bwd_vec_kernel");
    } else {
        DL_DISPATCH(dt, T,
                    rmsnorm_bwd_kernel<T><<<parts, NORM_THREADS, 0, stream>>>(
                        (T *)din, part, (const T *)dout, (const T *)in, (const T *)w, rstd, N, d, per));
        kernelCheck("rmsnorm_bwd_kernel");
    }
    if (dw) {
        colsum_add_kernel<<<grid_for(d, 256, 1024), 256, 0, stream>>>(dw, part, parts, d);
        kernelCheck("colsum_add_kernel (rmsnorm dw)");
    }
    return 0;
}

// ---------------------------------------------------------------- RoPE

// one thread per (row n, pair i): the angle is computed once (fp32 product as HF, cos/sin in double as the
// CPU twin) and applied to every head of x, then of x2 (when given: q and k in one launch).
template <typename T>
__global__ void rope_kernel(T *x, int nheads, T *x2, int nheads2, const int32_t *pos, const float *inv_freq, int64_t N,
                            int hd, float sgn) {
    const int half = hd / 2;
    const int64_t total = N * half;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = idx / half;
        const int i = (int)(idx - n * half);
        float cs, sn;
        rope_cs(pos[n], inv_freq[i], sgn, &cs, &sn);
        for (int t = 0; t < (x2 ? 2 : 1); t++) {
            const int nh = t ? nheads2 : nheads;
            T *row = (t ? x2 : x) + n * (int64_t)nh * hd;
            for (int h = 0; h < nh; h++) {
                T *v = row + (int64_t)h * hd;
                float o1, o2;
                rope_rot(ld(v, i), ld(v, i + half), cs, sn, &o1, &o2);
                st(v, i, o1);
                st(v, i + half, o2);
            }
        }
    }
}

extern "C" int rope2_cuda(DType dt, void *x, int nheads, void *x2, int nheads2, const int32_t *pos, const float *inv_freq,
                          int64_t N, int hd, int inverse, dl_stream_t stream, char *err, size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "rope_cuda: dtype must be f32 or bf16");
    if (hd < 2 || hd % 2 || hd > 1024 || nheads < 1 || (x2 && nheads2 < 1))
        return train_fail(err, errlen, "rope_cuda: head_dim %d must be even and <= 1024 (nheads %d, %d)", hd, nheads,
                          nheads2);
    if (N <= 0) return 0;
    const int64_t total = N * (hd / 2);
    DL_DISPATCH(dt, T,
                rope_kernel<T><<<grid_for(total, 256, 65535), 256, 0, stream>>>(
                    (T *)x, nheads, (T *)x2, nheads2, pos, inv_freq, N, hd, inverse ? -1.0f : 1.0f));
    kernelCheck("rope_kernel");
    return 0;
}

extern "C" int rope_cuda(DType dt, void *x, const int32_t *pos, const float *inv_freq, int64_t N, int nheads, int hd,
                         int inverse, dl_stream_t stream, char *err, size_t errlen) {
    return rope2_cuda(dt, x, nheads, NULL, 0, pos, inv_freq, N, hd, inverse, stream, err, errlen);
}

// ---------------------------------------------------------------- SwiGLU

template <typename T>
__global__ void swiglu_fwd_kernel(T *out, const T *gate, const T *up, int64_t rows, int64_t cols, int64_t ld_) {
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (int64_t)gridDim.x * blockDim.x) {
            const float g = ld(gate, r * ld_ + c);
            st(out, r * cols + c, swiglu_f(g, ld(up, r * ld_ + c)));
        }
}
template <typename T>
__global__ void swiglu_bwd_kernel(T *dgate, T *dup, const T *dout, const T *gate, const T *up, int64_t rows,
                                  int64_t cols, int64_t ld_) {
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (int64_t)gridDim.x * blockDim.x) {
            const int64_t j = r * ld_ + c;
            const float g = ld(gate, j), u = ld(up, j), dy = ld(dout, r * cols + c);
            const float sg = 1.0f / (1.0f + expf(-g)), silu = g * sg;
            st(dup, j, dy * silu);
            st(dgate, j, dy * u * sg * (1.0f + g * (1.0f - sg)));
        }
}

__global__ void swiglu_fwd_vec_kernel(bf16 *out, const bf16 *gate, const bf16 *up, int64_t rows, int64_t cols, int64_t ld_) {
    const int64_t c8 = cols / 8, total = rows * c8;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / c8, c = (idx - r * c8) * 8;
        float g[8], u[8];
        unpack8(*(const uint4 *)(gate + r * ld_ + c), g);
        unpack8(*(const uint4 *)(up + r * ld_ + c), u);
#pragma unroll
        for (int j = 0; j < 8; j++) g[j] = swiglu_f(g[j], u[j]);
        *(uint4 *)(out + r * cols + c) = pack8(g);
    }
}
__global__ void swiglu_bwd_vec_kernel(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate, const bf16 *up,
                                      int64_t rows, int64_t cols, int64_t ld_) {
    const int64_t c8 = cols / 8, total = rows * c8;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / c8, c = (idx - r * c8) * 8, j0 = r * ld_ + c;
        float g[8], u[8], dy[8], dg[8], du[8];
        unpack8(*(const uint4 *)(gate + j0), g);
        unpack8(*(const uint4 *)(up + j0), u);
        unpack8(*(const uint4 *)(dout + r * cols + c), dy);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float sg = 1.0f / (1.0f + expf(-g[j])), silu = g[j] * sg;
            du[j] = dy[j] * silu;
            dg[j] = dy[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
        }
        *(uint4 *)(dup + j0) = pack8(du);
        *(uint4 *)(dgate + j0) = pack8(dg);
    }
}

static int swiglu_check(const char *fn, DType dt, int64_t rows, int64_t cols, int64_t ld_, char *err, size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "%s: dtype must be f32 or bf16", fn);
    if (rows < 0 || cols < 0 || ld_ < cols) return train_fail(err, errlen, "%s: ld %lld < cols %lld", fn, (long long)ld_, (long long)cols);
    return 0;
}

extern "C" int swiglu_fwd_cuda(DType dt, void *out, const void *gate, const void *up, int64_t rows, int64_t cols,
                               int64_t ld_, dl_stream_t stream, char *err, size_t errlen) {
    if (swiglu_check("swiglu_fwd_cuda", dt, rows, cols, ld_, err, errlen)) return -1;
    if (!rows || !cols) return 0;
    if (dt == DT_BF16 && cols % 8 == 0 && ld_ % 8 == 0 && al16(out) && al16(gate) && al16(up)) {
        swiglu_fwd_vec_kernel<<<grid_for(rows * cols / 8, 256, 65535), 256, 0, stream>>>((bf16 *)out, (const bf16 *)gate,
                                                                                         (const bf16 *)up, rows, cols, ld_);
        kernelCheck("swiglu_fwd_vec_kernel");
        return 0;
    }
    dim3 grid(grid_for(cols, 256, 64), (unsigned)(rows < 65535 ? rows : 65535));
    DL_DISPATCH(dt, T,
                swiglu_fwd_kernel<T><<<grid, 256, 0, stream>>>((T *)out, (const T *)gate, (const T *)up, rows, cols, ld_));
    kernelCheck("swiglu_fwd_kernel");
    return 0;
}
extern "C" int swiglu_bwd_cuda(DType dt, void *dgate, void *dup, const void *dout, const void *gate, const void *up,
                               int64_t rows, int64_t cols, int64_t ld_, dl_stream_t stream, char *err, size_t errlen) {
    if (swiglu_check("swiglu_bwd_cuda", dt, rows, cols, ld_, err, errlen)) return -1;
    if (!rows || !cols) return 0;
    if (dt == DT_BF16 && cols % 8 == 0 && ld_ % 8 == 0 && al16(dgate) && al16(dup) && al16(dout) && al16(gate) && al16(up)) {
        swiglu_bwd_vec_kernel<<<grid_for(rows * cols / 8, 256, 65535), 256, 0, stream>>>(
            (bf16 *)dgate, (bf16 *)dup, (const bf16 *)dout, (const bf16 *)gate, (const bf16 *)up, rows, cols, ld_);
        kernelCheck("swiglu_bwd_vec_kernel");
        return 0;
    }
    dim3 grid(grid_for(cols, 256, 64), (unsigned)(rows < 65535 ? rows : 65535));
    DL_DISPATCH(dt, T,
                swiglu_bwd_kernel<T><<<grid, 256, 0, stream>>>((T *)dgate, (T *)dup, (const T *)dout, (const T *)gate,
                                                               (const T *)up, rows, cols, ld_));
    kernelCheck("swiglu_bwd_kernel");
    return 0;
}

// ---------------------------------------------------------------- embedding

template <typename T>
__global__ void embedding_fwd_kernel(T *out, const int32_t *tokens, const T *wte, int64_t N, int64_t V, int64_t d) {
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
        const int64_t tok = tokens[n];
        T *o = out + n * d;
        if (tok < 0 || tok >= V) {
            for (int64_t i = threadIdx.x; i < d; i += blockDim.x) st(o, i, NAN);
            continue;
        }
        const T *src = wte + tok * d;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = src[i];
    }
}

// block per distinct token (grid-stride): its rows summed in increasing row order, then added to dwte
template <typename T>
__global__ void embedding_bwd_kernel(float *dwte, const T *dout, const int32_t *order, const int32_t *seg,
                                     const int32_t *uniq, int64_t U, int64_t d) {
    for (int64_t u = blockIdx.x; u < U; u += gridDim.x) {
        const int32_t j0 = seg[u], j1 = seg[u + 1];
        float *dst = dwte + (int64_t)uniq[u] * d;
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
            float s = 0.f;
            for (int32_t j = j0; j < j1; j++) s += ld(dout, (int64_t)order[j] * d + c);
            dst[c] += s;
        }
    }
}

extern "C" int embedding_fwd_cuda(DType dt, void *out, const int32_t *tokens, const void *wte, int64_t N, int64_t V,
                                  int64_t d, dl_stream_t stream, char *err, size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "embedding_fwd_cuda: dtype must be f32 or bf16");
    if (N <= 0 || d <= 0) return 0;
    DL_DISPATCH(dt, T,
                embedding_fwd_kernel<T><<<grid_for(N, 1, 65535), 256, 0, stream>>>((T *)out, tokens, (const T *)wte, N, V, d));
    kernelCheck("embedding_fwd_kernel");
    return 0;
}

extern "C" int64_t embedding_bwd_plan(const int32_t *tokens, int64_t N, int64_t V, int32_t *order, int32_t *seg,
                                      int32_t *uniq, char *err, size_t errlen) {
    if (N < 0 || N > 0x7ffffffe) return train_fail(err, errlen, "embedding_bwd_plan: N = %lld outside 0..2^31-2", (long long)N);
    int32_t *count = (int32_t *)calloc((size_t)V + 1, sizeof(int32_t));
    if (!count) return train_fail(err, errlen, "embedding_bwd_plan: out of host memory (V = %lld)", (long long)V);
    for (int64_t n = 0; n < N; n++) {
        if (tokens[n] < 0 || tokens[n] >= V) {
            free(count);
            return train_fail(err, errlen, "embedding_bwd_plan: token %d at row %lld outside [0, %lld)", tokens[n],
                              (long long)n, (long long)V);
        }
        count[tokens[n] + 1]++;
    }
    for (int64_t v = 0; v < V; v++) count[v + 1] += count[v];  // count[v] = first slot of token v
    int64_t U = 0;
    for (int64_t v = 0; v < V; v++)
        if (count[v + 1] > count[v]) {
            uniq[U] = (int32_t)v;
            seg[U] = count[v];
            U++;
        }
    seg[U] = (int32_t)N;
    for (int64_t n = 0; n < N; n++) order[count[tokens[n]]++] = (int32_t)n;  // stable: rows in increasing order
    free(count);
    return U;
}

extern "C" int embedding_bwd_cuda(DType dt, float *dwte, const void *dout, const int32_t *order, const int32_t *seg,
                                  const int32_t *uniq, int64_t U, int64_t d, dl_stream_t stream, char *err,
                                  size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "embedding_bwd_cuda: dtype must be f32 or bf16");
    if (U <= 0 || d <= 0) return 0;
    DL_DISPATCH(dt, T,
                embedding_bwd_kernel<T><<<grid_for(U, 1, 1 << 20), 256, 0, stream>>>(dwte, (const T *)dout, order, seg,
                                                                                      uniq, U, d));
    kernelCheck("embedding_bwd_kernel");
    return 0;
}

// ---------------------------------------------------------------- conversion

template <typename D, typename S>
__global__ void convert_kernel(D *dst, const S *src, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        st(dst, i, ld(src, i));
}

extern "C" int convert_cuda(DType dst_dt, void *dst, DType src_dt, const void *src, int64_t n, dl_stream_t stream,
                            char *err, size_t errlen) {
    if (!dt_ok(dst_dt) || !dt_ok(src_dt)) return train_fail(err, errlen, "convert_cuda: dtypes must be f32 or bf16");
    if (n <= 0) return 0;
    const int g = grid_for(n, 256, 8192);
    DL_DISPATCH(dst_dt, D, DL_DISPATCH(src_dt, S, convert_kernel<D, S><<<g, 256, 0, stream>>>((D *)dst, (const S *)src, n)));
    kernelCheck("convert_kernel");
    return 0;
}
