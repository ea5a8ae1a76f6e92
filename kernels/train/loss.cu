// loss.cu: cross-entropy, forward KL and reverse KL with temperature over the vocabulary, fused with the
// softmaxes and the gradient (twin of loss_rows in distill/losses.c). Two kernels:
// - cluster (bf16 rows of a multiple of 8, V <= 262144; DISTILL_LOSS_ROWS=cluster for now): a row is split over a cluster of
//   CL <= 8 blocks (sm_90 thread-block clusters) whose threads copy their slice of the student and teacher row
//   (U 16-byte words each) into shared memory. The row is read from memory once and dlogits written once (the
//   floor: 2 x 2 + 2 bytes per element with a teacher); the log-sum-exps and the KL sums are combined across
//   the cluster through distributed shared memory in rank order, so the result is deterministic.
// - block (fp32, unaligned or larger rows; the default): one block per row streams the
//   row twice or three times (log-sum-exps online, then the KL sums and the gradient).
// Nothing of size V is stored besides dlogits, which may overwrite the logits in place (each element is
// read and written by the same thread). Element math is fp32, sums fp64 (fp32 within a thread's 8 elements
// in the cluster kernel).
#include <cooperative_groups.h>
#include <cuda_pipeline.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/train/train_common.cuh"

namespace cg = cooperative_groups;

#define LOSS_THREADS 512

struct LossK {
    float wce, wkl, wrkl, T, invT;
    int need_ce, need_kl, need_rkl;
};

__device__ __forceinline__ void lse_push(float x, float &m, double &s) {
    if (x > m) {
        s = s * (double)expf(m - x) + 1.0;
        m = x;
    } else {
        s += (double)expf(x - m);
    }
}
// d loss / d s_i of one row, scaled by g (the loss scale x the row weight), given the row's log-sum-exps (lse1
// of s for CE; lseq, lsep of s/T and t/T for the KLs) and its reverse KL rklr (0 when it has no weight). same_q:
// at T = 1 with CE, q = softmax(s) is the CE's softmax too. Both loss kernels use it, so they agree element for element.
struct ElemGrad {
    LossK k;
    bool need_t, same_q;
    float wce, g, lse1, lseq, lsep;
    int64_t tgt;
    __device__ __forceinline__ float operator()(int64_t i, float si, float ti, float rklr) const {
        float d = 0.f, q = 0.f;
        if (need_t) {
            const float lq = si * k.invT - lseq, lp = ti * k.invT - lsep;
            q = expf(lq);
            if (k.need_rkl) d += k.wrkl * k.T * q * (lq - lp - rklr);
            if (k.need_kl) d += k.wkl * k.T * (q - expf(lp));
        }
        if (wce != 0.f) d += wce * ((same_q ? q : expf(si - lse1)) - (i == tgt ? 1.f : 0.f));
        return g * d;
    }
};

// combine every thread's (m, s) into the block's log-sum-exp
__device__ __forceinline__ float lse_block(float m, double s, float *shf, double *shd) {
    const float M = block_max(m, shf);
    const double part = m == -INFINITY ? 0.0 : s * (double)expf(m - M);
    const double S = block_sum(part, shd);
    return (float)((double)M + log(S));
}

// Row element loops: VEC (bf16 rows of a multiple of 8 elements, 16-byte aligned) reads 8 elements per
// 16-byte load, a thread taking 8 consecutive elements; otherwise one element per thread and step.
// f(i, s_i, t_i) reads; g(i, s_i, t_i) returns the gradient element to store at i.
template <typename T, bool VEC, typename F>
__device__ __forceinline__ void row_read(int64_t V, const T *s, const T *t, F f) {
    if constexpr (VEC) {
        const uint4 *s8 = (const uint4 *)s, *t8 = (const uint4 *)t;
        for (int64_t i8 = threadIdx.x; i8 < V / 8; i8 += blockDim.x) {
            float a[8], c[8];
            unpack8(s8[i8], a);
            if (t) unpack8(t8[i8], c);
            else
#pragma unroll
                for (int j = 0; j < 8; j++) c[j] = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) f(i8 * 8 + j, a[j], c[j]);
        }
    } else {
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) f(i, ld(s, i), t ? ld(t, i) : 0.f);
    }
}
template <typename T, bool VEC, typename G>
__device__ __forceinline__ void row_write(int64_t V, const T *s, const T *t, T *ds, G gfn) {
    if constexpr (VEC) {
        const uint4 *s8 = (const uint4 *)s, *t8 = (const uint4 *)t;
        uint4 *d8 = (uint4 *)ds;
        for (int64_t i8 = threadIdx.x; i8 < V / 8; i8 += blockDim.x) {
            float a[8], c[8], o[8];
            unpack8(s8[i8], a);
            if (t) unpack8(t8[i8], c);
            else
#pragma unroll
                for (int j = 0; j < 8; j++) c[j] = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) o[j] = gfn(i8 * 8 + j, a[j], c[j]);
            d8[i8] = pack8(o);
        }
    } else {
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) st(ds, i, gfn(i, ld(s, i), t ? ld(t, i) : 0.f));
    }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(LOSS_THREADS) loss_rows_kernel(LossK k, int64_t V, const T *logits, const T *teacher,
                                                                 const int32_t *targets, const uint8_t *mask,
                                                                 const float *row_weight, double scale, T *dlogits,
                                                                 double *rows_out, float *logp_target) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    const int64_t r = blockIdx.x;
    const T *s = logits + r * V;
    T *ds = dlogits ? dlogits + r * V : nullptr;
    const int32_t tgt = targets ? targets[r] : -1;
    const bool counted = !mask || mask[r];
    const bool has_tgt = tgt >= 0 && tgt < V;
    if (!counted) {
        if (ds)
            for (int64_t i = threadIdx.x; i < V; i += blockDim.x) st(ds, i, 0.f);
        if (threadIdx.x == 0) {
            for (int j = 0; j < 4; j++) rows_out[4 * r + j] = 0.0;
            if (logp_target) logp_target[r] = 0.f;
        }
        return;
    }
    // the target logit, read before any in-place gradient write (those come after the barriers of pass 1)
    const float s_tgt = k.need_ce && has_tgt && threadIdx.x == 0 ? ld(s, tgt) : 0.f;
    const bool need_t = k.need_kl || k.need_rkl;
    const T *t = need_t ? teacher + r * V : nullptr;
    // pass 1: log-sum-exps of s, s/T, t/T. At temperature 1 (the recipes' default) s/T is s: one sum serves CE
    // and the KLs, and below q = softmax(s) is the CE's softmax too (a third fewer exponentials per element).
    const bool t1 = need_t && k.need_ce && k.invT == 1.f;
    float m1 = -INFINITY, mq = -INFINITY, mp = -INFINITY;
    double s1 = 0, sq = 0, sp = 0;
    row_read<T, VEC>(V, s, t, [&](int64_t, float si, float ti) {
        if (k.need_ce) lse_push(si, m1, s1);
        if (need_t) {
            if (!t1) lse_push(si * k.invT, mq, sq);
            lse_push(ti * k.invT, mp, sp);
        }
    });
    const float lse1 = k.need_ce ? lse_block(m1, s1, shf, shd) : 0.f;
    const float lseq = t1 ? lse1 : need_t ? lse_block(mq, sq, shf, shd) : 0.f;
    const float lsep = need_t ? lse_block(mp, sp, shf, shd) : 0.f;
    const double rw = row_weight ? (double)row_weight[r] : 1.0;
    const float g = (float)(scale * rw);
    const float wce = k.wce != 0.f && has_tgt ? k.wce : 0.f;
    if (threadIdx.x == 0) {
        const double ce = k.need_ce && has_tgt ? (double)lse1 - (double)s_tgt : 0.0;
        rows_out[4 * r + 0] = wce != 0.f ? rw * ce : 0.0;
        if (logp_target) logp_target[r] = has_tgt ? (float)(-ce) : 0.f;
    }
    // pass 2: KL sums (and the gradient when it does not need them)
    double kl = 0, rkl = 0;
    const bool grad_in_2 = ds && !k.need_rkl;
    const ElemGrad grad{k, need_t, t1, wce, g, lse1, lseq, lsep, tgt};
    if (need_t) {
        if (grad_in_2) {
            row_write<T, VEC>(V, s, t, ds, [&](int64_t i, float si, float ti) {
                const float lq = si * k.invT - lseq, lp = ti * k.invT - lsep;
                kl += (double)expf(lp) * (double)(lp - lq);
                return grad(i, si, ti, 0.f);
            });
        } else {
            row_read<T, VEC>(V, s, t, [&](int64_t, float si, float ti) {
                const float lq = si * k.invT - lseq, lp = ti * k.invT - lsep;
                if (k.need_kl) kl += (double)expf(lp) * (double)(lp - lq);
                if (k.need_rkl) rkl += (double)expf(lq) * (double)(lq - lp);
            });
        }
        if (k.need_kl) kl = block_sum(kl, shd);
        if (k.need_rkl) rkl = block_sum(rkl, shd);
    } else if (grad_in_2) {
        row_write<T, VEC>(V, s, t, ds, [&](int64_t i, float si, float ti) { return grad(i, si, ti, 0.f); });
    }
    // pass 3: gradient with the reverse-KL term, which needs the row's rkl
    if (ds && k.need_rkl) {
        const float rklr = (float)rkl;
        row_write<T, VEC>(V, s, t, ds, [&](int64_t i, float si, float ti) { return grad(i, si, ti, rklr); });
    }
    if (threadIdx.x == 0) {
        const double T2 = (double)k.T * k.T;
        rows_out[4 * r + 1] = rw * T2 * kl;
        rows_out[4 * r + 2] = rw * T2 * rkl;
        rows_out[4 * r + 3] = 1.0;
    }
}

// ---------------------------------------------------------------- cluster kernel
#define LC_THREADS 512

// (m, s) <- the log-sum-exp pair of the union of (m, s) and (m2, s2): sums relative to their maxima
__device__ __forceinline__ void lse_merge(float &m, double &s, float m2, double s2) {
    const float M = fmaxf(m, m2);
    if (M == -INFINITY) return;  // both empty
    s = (m == -INFINITY ? 0.0 : s * (double)expf(m - M)) + (m2 == -INFINITY ? 0.0 : s2 * (double)expf(m2 - M));
    m = M;
}

// One cluster per row: block `rank` of CL holds 16-byte words j = rank * LC_THREADS + threadIdx.x + u * CL *
// LC_THREADS (u < U) of the student row s and the teacher row t.
template <int U>
__global__ void __launch_bounds__(LC_THREADS, 2) loss_rows_cluster_kernel(LossK k, int64_t V, const bf16 *logits,
                                                                       const bf16 *teacher, const int32_t *targets,
                                                                       const uint8_t *mask, const float *row_weight,
                                                                       double scale, bf16 *dlogits, double *rows_out,
                                                                       float *logp_target) {
    cg::cluster_group cluster = cg::this_cluster();
    const int CL = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
    const int64_t r = blockIdx.x / CL, V8 = V / 8, stride = (int64_t)CL * LC_THREADS;
    const int64_t j0 = (int64_t)rank * LC_THREADS + threadIdx.x;
    const uint4 *s8 = (const uint4 *)(logits + r * V);
    uint4 *d8 = dlogits ? (uint4 *)(dlogits + r * V) : nullptr;
    const int32_t tgt = targets ? targets[r] : -1;
    const bool counted = !mask || mask[r];
    const bool has_tgt = tgt >= 0 && tgt < V;
    if (!counted) {  // uniform over the cluster: every block leaves before any cluster barrier
        if (d8)
#pragma unroll
            for (int u = 0; u < U; u++)
                if (j0 + u * stride < V8) d8[j0 + u * stride] = make_uint4(0, 0, 0, 0);
        if (rank == 0 && threadIdx.x == 0) {
            for (int j = 0; j < 4; j++) rows_out[4 * r + j] = 0.0;
            if (logp_target) logp_target[r] = 0.f;
        }
        return;
    }
    const bool need_t = k.need_kl || k.need_rkl;
    // T = 1 with CE: the KL's student softmax is the CE's (one log-sum-exp and one exponential fewer)
    const bool same_q = need_t && k.need_ce && k.T == 1.f;
    const float s_tgt = k.need_ce && has_tgt && rank == 0 && threadIdx.x == 0 ? __bfloat162float(logits[r * V + tgt]) : 0.f;
    const uint4 *t8 = need_t ? (const uint4 *)(teacher + r * V) : nullptr;
    // the slice straight into shared memory (no registers held while the loads fly); each thread reads back
    // only the words it copied, so its own wait orders them
    extern __shared__ uint4 row_sm[];  // [U][LC_THREADS] student words, then [U][LC_THREADS] teacher words
    uint4 *sv = row_sm + threadIdx.x, *tv = row_sm + U * LC_THREADS + threadIdx.x;  // word u at [u * LC_THREADS]
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t j = j0 + u * stride;
        if (j < V8) {
            __pipeline_memcpy_async(sv + u * LC_THREADS, s8 + j, 16);
            if (need_t) __pipeline_memcpy_async(tv + u * LC_THREADS, t8 + j, 16);
        }
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
    // per thread: maxima, then sums of exponentials relative to them (fp32 over the thread's <= 8 U elements)
    float ms = -INFINITY, mt = -INFINITY;
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (j0 + u * stride >= V8) continue;
        float a[8], c[8];
        unpack8(sv[u * LC_THREADS], a);
#pragma unroll
        for (int e = 0; e < 8; e++) ms = fmaxf(ms, a[e]);
        if (need_t) {
            unpack8(tv[u * LC_THREADS], c);
#pragma unroll
            for (int e = 0; e < 8; e++) mt = fmaxf(mt, c[e]);
        }
    }
    // pairs: 0 = s (CE), 1 = s / T (KL student), 2 = t / T (KL teacher); the maxima scale with 1/T > 0 exactly
    float m[3] = {k.need_ce ? ms : -INFINITY, need_t && !same_q ? ms * k.invT : -INFINITY, need_t ? mt * k.invT : -INFINITY};
    float f[3] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (j0 + u * stride >= V8) continue;
        float a[8], c[8];
        unpack8(sv[u * LC_THREADS], a);
        if (need_t) unpack8(tv[u * LC_THREADS], c);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            if (k.need_ce) f[0] += expf(a[e] - m[0]);
            if (need_t && !same_q) f[1] += expf(a[e] * k.invT - m[1]);
            if (need_t) f[2] += expf(c[e] * k.invT - m[2]);
        }
    }
    double sd[3] = {f[0], f[1], f[2]};
    // block: warp trees, then thread 0 over the warps in order; cluster: every block over the ranks in order
    __shared__ float wm[3][32], xm[3], lse[3];
    __shared__ double wsum[3][32], xs[3], xk[2], rk;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
    for (int q = 0; q < 3; q++) {
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_down_sync(0xffffffffu, m[q], o);
            const double s2 = __shfl_down_sync(0xffffffffu, sd[q], o);
            lse_merge(m[q], sd[q], m2, s2);
        }
        if (lane == 0) wm[q][wid] = m[q], wsum[q][wid] = sd[q];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int q = 0; q < 3; q++) {
            float M = wm[q][0];
            double S = wsum[q][0];
            for (int w = 1; w < LC_THREADS / 32; w++) lse_merge(M, S, wm[q][w], wsum[q][w]);
            xm[q] = M, xs[q] = S;
        }
    }
    cluster.sync();
    if (threadIdx.x == 0) {
        float M[3] = {-INFINITY, -INFINITY, -INFINITY};
        double S[3] = {0, 0, 0};
        for (int b = 0; b < CL; b++) {
            const float *rm = cluster.map_shared_rank(xm, b);
            const double *rs = cluster.map_shared_rank(xs, b);
            for (int q = 0; q < 3; q++) lse_merge(M[q], S[q], rm[q], rs[q]);
        }
        for (int q = 0; q < 3; q++) lse[q] = M[q] == -INFINITY ? 0.f : (float)((double)M[q] + log(S[q]));
        if (same_q) lse[1] = lse[0];
    }
    __syncthreads();
    const float lse1 = lse[0], lseq = lse[1], lsep = lse[2];
    const double rw = row_weight ? (double)row_weight[r] : 1.0;
    const float g = (float)(scale * rw);
    const float wce = k.wce != 0.f && has_tgt ? k.wce : 0.f;
    const ElemGrad grad{k, need_t, same_q, wce, g, lse1, lseq, lsep, tgt};
    // KL sums (and the gradient when the reverse KL does not need them first)
    const bool grad_now = d8 && !k.need_rkl;
    double kl = 0, rkl = 0;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t j = j0 + u * stride;
        if (j >= V8) continue;
        float a[8], c[8], o[8], kl8 = 0.f, rkl8 = 0.f;
        unpack8(sv[u * LC_THREADS], a);
        if (need_t) unpack8(tv[u * LC_THREADS], c);
        else
#pragma unroll
            for (int e = 0; e < 8; e++) c[e] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            if (need_t && (k.need_kl || k.need_rkl) && !grad_now) {
                const float lq = a[e] * k.invT - lseq, lp = c[e] * k.invT - lsep;
                if (k.need_kl) kl8 += expf(lp) * (lp - lq);
                if (k.need_rkl) rkl8 += expf(lq) * (lq - lp);
            }
            if (grad_now) {
                if (need_t) {  // the KL term and the sum share the exponentials
                    const float lq = a[e] * k.invT - lseq, lp = c[e] * k.invT - lsep, q = expf(lq), p = expf(lp);
                    kl8 += p * (lp - lq);
                    float d = k.wkl * k.T * (q - p);
                    if (wce != 0.f) d += wce * ((same_q ? q : expf(a[e] - lse1)) - (j * 8 + e == tgt ? 1.f : 0.f));
                    o[e] = g * d;
                } else {
                    o[e] = grad(j * 8 + e, a[e], 0.f, 0.f);
                }
            }
        }
        if (grad_now) d8[j] = pack8(o);
        kl += (double)kl8, rkl += (double)rkl8;
    }
    if (need_t) {
        kl = block_sum(kl, wsum[0]);
        rkl = block_sum(rkl, wsum[1]);
        if (threadIdx.x == 0) xk[0] = kl, xk[1] = rkl;
    }
    cluster.sync();
    if (need_t && threadIdx.x == 0 && (rank == 0 || (d8 && k.need_rkl))) {
        double K = 0, R = 0;
        for (int b = 0; b < CL; b++) {
            const double *rx = cluster.map_shared_rank(xk, b);
            K += rx[0], R += rx[1];
        }
        kl = K, rkl = R, rk = R;
    }
    if (rank == 0 && threadIdx.x == 0) {
        const double ce = k.need_ce && has_tgt ? (double)lse1 - (double)s_tgt : 0.0;
        const double T2 = (double)k.T * k.T;
        rows_out[4 * r + 0] = wce != 0.f ? rw * ce : 0.0;
        rows_out[4 * r + 1] = rw * T2 * kl;
        rows_out[4 * r + 2] = rw * T2 * rkl;
        rows_out[4 * r + 3] = 1.0;
        if (logp_target) logp_target[r] = has_tgt ? (float)(-ce) : 0.f;
    }
    cluster.sync();  // the other blocks' reads of this block's xk are done: its shared memory may go
    if (d8 && k.need_rkl) {
        const float rklr = (float)rk;
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t j = j0 + u * stride;
            if (j >= V8) continue;
            float a[8], c[8], o[8];
            unpack8(sv[u * LC_THREADS], a);
            unpack8(tv[u * LC_THREADS], c);
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = grad(j * 8 + e, a[e], c[e], rklr);
            d8[j] = pack8(o);
        }
    }
}

template <int U>
static cudaError_t launch_cluster(int CL, const LossK &k, int64_t n, int64_t V, const bf16 *s, const bf16 *t,
                                  const int32_t *targets, const uint8_t *mask, const float *rw, double scale, bf16 *ds,
                                  double *rows, float *lp, dl_stream_t stream) {
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = dim3((unsigned)(n * CL));
    cfg.blockDim = dim3(LC_THREADS);
    cfg.dynamicSmemBytes = (size_t)(t ? 2 : 1) * U * LC_THREADS * 16;
    cfg.stream = stream;
    // the teacher's 2 x 8 U KiB exceed the default 48 KiB (set at every launch: the attribute is per device)
    cudaError_t e = cudaFuncSetAttribute(loss_rows_cluster_kernel<U>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         2 * U * LC_THREADS * 16);
    if (e != cudaSuccess) return e;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = (unsigned)CL, at[0].val.clusterDim.y = 1, at[0].val.clusterDim.z = 1;
    cfg.attrs = at, cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, loss_rows_cluster_kernel<U>, k, V, s, t, targets, mask, rw, scale, ds, rows, lp);
}

// The cluster kernel's shape for a row of V8 16-byte words: the fewest words per thread U, then the smallest
// cluster CL, with CL * LC_THREADS * U >= V8. false when the row is too long for it (V8 > 8 x 512 x 8).
static bool cluster_shape(int64_t V8, int *U, int *CL) {
    for (int u = 1; u <= 8; u *= 2) {
        if ((int64_t)8 * LC_THREADS * u < V8) continue;
        int c = 1;
        while ((int64_t)c * LC_THREADS * u < V8) c *= 2;
        *U = u, *CL = c;
        return true;
    }
    return false;
}

__global__ void loss_sum_kernel(const double *rows, int64_t n, double *acc) {
    __shared__ double sh[32];
    double a[4] = {0, 0, 0, 0};
    for (int64_t r = threadIdx.x; r < n; r += blockDim.x)
        for (int j = 0; j < 4; j++) a[j] += rows[4 * r + j];
    for (int j = 0; j < 4; j++) {
        const double s = block_sum(a[j], sh);
        if (threadIdx.x == 0) acc[j] += s;
    }
}

extern "C" int loss_rows_cuda(DType dt, const LossWeights *w, int64_t n, int64_t V, const void *logits,
                              const void *teacher, const int32_t *targets, const uint8_t *mask, const float *row_weight,
                              double scale, void *dlogits, double *rows_out, float *logp_target, dl_stream_t stream,
                              char *err, size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "loss_rows_cuda: dtype must be f32 or bf16");
    if (V < 1 || n < 0 || n > 0x7fffffff) return train_fail(err, errlen, "loss_rows_cuda: bad shape n %lld V %lld", (long long)n, (long long)V);
    if ((w->kl != 0 || w->rkl != 0) && !teacher) return train_fail(err, errlen, "loss_rows_cuda: kl/rkl weights need teacher logits");
    if (!rows_out) return train_fail(err, errlen, "loss_rows_cuda: rows_out [n, 4] is required");
    if (n == 0) return 0;
    LossK k;
    k.T = w->temperature > 0 ? w->temperature : 1.0f;
    k.invT = (float)(1.0 / (double)k.T);
    k.wce = w->ce, k.wkl = w->kl, k.wrkl = w->rkl;
    k.need_ce = w->ce != 0 || logp_target != nullptr;
    k.need_kl = w->kl != 0, k.need_rkl = w->rkl != 0;
    const bool vec = dt == DT_BF16 && V % 8 == 0 && !((uintptr_t)logits & 15) && !((uintptr_t)teacher & 15) &&
                     !((uintptr_t)dlogits & 15);
    // DISTILL_LOSS_ROWS=cluster|block picks the kernel where both apply (tests, benchmarks); the default is block
    // until the cluster kernel has passed gpu_test_train on a GPU
    const char *kenv = getenv("DISTILL_LOSS_ROWS");
    int U = 0, CL = 0;
    if (vec && kenv && !strcmp(kenv, "cluster") && n <= 0x7fffffff / 8 && cluster_shape(V / 8, &U, &CL)) {
        const bf16 *s = (const bf16 *)logits, *t = (const bf16 *)teacher;
        bf16 *ds = (bf16 *)dlogits;
        cudaError_t e = U == 1   ? launch_cluster<1>(CL, k, n, V, s, t, targets, mask, row_weight, scale, ds, rows_out, logp_target, stream)
                        : U == 2 ? launch_cluster<2>(CL, k, n, V, s, t, targets, mask, row_weight, scale, ds, rows_out, logp_target, stream)
                        : U == 4 ? launch_cluster<4>(CL, k, n, V, s, t, targets, mask, row_weight, scale, ds, rows_out, logp_target, stream)
                                 : launch_cluster<8>(CL, k, n, V, s, t, targets, mask, row_weight, scale, ds, rows_out, logp_target, stream);
        cuda_check_(e, "kernel loss_rows_cluster_kernel", __FILE__, __LINE__);
        return 0;
    }
    if (vec) {
        loss_rows_kernel<bf16, true><<<(unsigned)n, LOSS_THREADS, 0, stream>>>(
            k, V, (const bf16 *)logits, (const bf16 *)teacher, targets, mask, row_weight, scale, (bf16 *)dlogits, rows_out,
            logp_target);
        kernelCheck("loss_rows_kernel<vec>");
        return 0;
    }
    DL_DISPATCH(dt, T, {
        loss_rows_kernel<T, false><<<(unsigned)n, LOSS_THREADS, 0, stream>>>(k, V, (const T *)logits, (const T *)teacher,
                                                                             targets, mask, row_weight, scale, (T *)dlogits,
                                                                             rows_out, logp_target);
        kernelCheck("loss_rows_kernel");
    });
    return 0;
}

extern "C" int loss_sum_cuda(const double *rows, int64_t n, double *acc, dl_stream_t stream, char *err, size_t errlen) {
    if (n < 0) return train_fail(err, errlen, "loss_sum_cuda: n < 0");
    loss_sum_kernel<<<1, 256, 0, stream>>>(rows, n, acc);
    kernelCheck("loss_sum_kernel");
    return 0;
}
