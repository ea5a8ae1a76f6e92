// optim.cu: AdamW update and the global gradient norm of the training backend (twins of optim_step's
// element math and optim_grad_norm, distill/optim.c). Memory-bound: AdamW reads p, g, m, v and writes p,
// m, v and the bf16 copy once.
#include "kernels/train/train_common.cuh"

// ---------------------------------------------------------------- gradient norm

#define SUMSQ_THREADS 256
#define SUMSQ_MAX_BLOCKS 1024

static int sumsq_blocks(int64_t n) { return grid_for(n, SUMSQ_THREADS, SUMSQ_MAX_BLOCKS); }

__global__ void sumsq_part_kernel(const float *g, int64_t n, double *part) {
    __shared__ double sh[32];
    double s = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const double x = g[i];
        s += x * x;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
__global__ void sumsq_final_kernel(const double *part, int nparts, double *acc) {
    __shared__ double sh[32];
    double s = 0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += part[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) *acc += s;
}

extern "C" size_t grad_sumsq_workspace(int64_t n) { return (size_t)sumsq_blocks(n) * sizeof(double); }

extern "C" int grad_sumsq_cuda(const float *g, int64_t n, double *acc, void *workspace, dl_stream_t stream, char *err,
                               size_t errlen) {
    if (n < 0) return train_fail(err, errlen, "grad_sumsq_cuda: n < 0");
    if (n == 0) return 0;
    if (!workspace) return train_fail(err, errlen, "grad_sumsq_cuda: needs a workspace of grad_sumsq_workspace bytes");
    const int nb = sumsq_blocks(n);
    sumsq_part_kernel<<<nb, SUMSQ_THREADS, 0, stream>>>(g, n, (double *)workspace);
    kernelCheck("sumsq_part_kernel");
    sumsq_final_kernel<<<1, SUMSQ_THREADS, 0, stream>>>((const double *)workspace, nb, acc);
    kernelCheck("sumsq_final_kernel");
    return 0;
}

__global__ void scale_kernel(float *g, int64_t n, float s) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) g[i] *= s;
}
extern "C" int grad_scale_cuda(float *g, int64_t n, float s, dl_stream_t stream, char *err, size_t errlen) {
    if (n < 0) return train_fail(err, errlen, "grad_scale_cuda: n < 0");
    if (n == 0) return 0;
    scale_kernel<<<grid_for(n, 256, 8192), 256, 0, stream>>>(g, n, s);
    kernelCheck("scale_kernel");
    return 0;
}

// ---------------------------------------------------------------- AdamW

__device__ __forceinline__ uint32_t mix32(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}
// fp32 -> bf16 rounded stochastically: adding 16 random bits below the kept mantissa before truncating
// rounds up with probability equal to the dropped fraction (unbiased). Non-finite values round to nearest.
__device__ __forceinline__ bf16 bf16_stochastic(float x, uint32_t rnd) {
    if (!isfinite(x)) return __float2bfloat16_rn(x);
    uint32_t b = __float_as_uint(x);
    b += rnd & 0xFFFFu;
    b &= 0xFFFF0000u;
    return __ushort_as_bfloat16((unsigned short)(b >> 16));
}

// MV: float or bf16 moments; CP: float or bf16 copy (unused when p_copy is NULL)
template <typename MV, typename CP>
__global__ void adamw_kernel(AdamWArgs a, int64_t n, float *p, const float *g, MV *m, MV *v, CP *p_copy) {
    const float omb1 = __fsub_rn(1.0f, a.b1), omb2 = __fsub_rn(1.0f, a.b2);
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x) {
        // the CPU's operation order, each op rounded separately (no FMA contraction)
        const float gj = __fmul_rn(g[j], a.gscale);
        const float mj = __fadd_rn(__fmul_rn(a.b1, ld(m, j)), __fmul_rn(omb1, gj));
        const float vj = __fadd_rn(__fmul_rn(a.b2, ld(v, j)), __fmul_rn(__fmul_rn(omb2, gj), gj));
        if constexpr (sizeof(MV) == 4) {
            m[j] = mj;
            v[j] = vj;
        } else {
            const uint64_t key = a.seed * 0xD1B54A32D192ED03ull + 2 * (uint64_t)j;
            m[j] = bf16_stochastic(mj, mix32(key));
            v[j] = bf16_stochastic(vj, mix32(key + 1));
        }
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vj), a.inv_sqrt_bc2), a.eps);
        const float pj = __fsub_rn(__fmul_rn(p[j], a.decay), __fdiv_rn(__fmul_rn(a.step_size, mj), denom));
        p[j] = pj;
        if (p_copy) st(p_copy, j, pj);
    }
}

extern "C" int adamw_cuda(const AdamWArgs *a, int64_t n, float *p, const float *g, DType mv_dt, void *m, void *v,
                          DType copy_dt, void *p_copy, dl_stream_t stream, char *err, size_t errlen) {
    if (!dt_ok(mv_dt) || (p_copy && !dt_ok(copy_dt)))
        return train_fail(err, errlen, "adamw_cuda: moment and copy dtypes must be f32 or bf16");
    if (n < 0) return train_fail(err, errlen, "adamw_cuda: n < 0");
    if (n == 0) return 0;
    const int nb = grid_for(n, 256, 16384);
    DL_DISPATCH(mv_dt, MV, DL_DISPATCH(copy_dt, CP, {
                    adamw_kernel<MV, CP><<<nb, 256, 0, stream>>>(*a, n, p, g, (MV *)m, (MV *)v, (CP *)p_copy);
                }));
    kernelCheck("adamw_kernel");
    return 0;
}
