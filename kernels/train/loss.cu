// loss.cu: cross-entropy, forward KL and reverse KL with temperature over the vocabulary, fused with the
// softmaxes and the gradient (twin of loss_rows in distill/losses.c). One block per row: pass 1 takes the
// needed log-sum-exps online (per-thread running max and sum, then a fixed-order block combine), pass 2 the
// KL sums, and the gradient is written in pass 2 (or pass 3 when reverse KL needs its row sum first).
// Nothing of size V is stored besides dlogits, which may overwrite the logits in place (each element is
// read and written by the same thread). Element math is fp32, sums fp64.
#include "kernels/train/train_common.cuh"

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
    // pass 1: log-sum-exps of s, s/T, t/T
    float m1 = -INFINITY, mq = -INFINITY, mp = -INFINITY;
    double s1 = 0, sq = 0, sp = 0;
    row_read<T, VEC>(V, s, t, [&](int64_t, float si, float ti) {
        if (k.need_ce) lse_push(si, m1, s1);
        if (need_t) {
            lse_push(si * k.invT, mq, sq);
            lse_push(ti * k.invT, mp, sp);
        }
    });
    const float lse1 = k.need_ce ? lse_block(m1, s1, shf, shd) : 0.f;
    const float lseq = need_t ? lse_block(mq, sq, shf, shd) : 0.f;
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
    auto grad = [&](int64_t i, float si, float ti, float rklr) {
        float d = 0.f;
        if (need_t) {
            const float lq = si * k.invT - lseq, lp = ti * k.invT - lsep, q = expf(lq);
            if (k.need_rkl) d += k.wrkl * k.T * q * (lq - lp - rklr);
            if (k.need_kl) d += k.wkl * k.T * (q - expf(lp));
        }
        if (wce != 0.f) d += wce * (expf(si - lse1) - (i == tgt ? 1.f : 0.f));
        return g * d;
    };
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
