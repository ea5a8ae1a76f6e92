// attention.cu: causal GQA attention with document masks, forward and backward (twins of attention_fwd /
// attention_bwd, distill/layers_cpu.c). Hand-written flash-attention-style kernels with fp32 math on the
// CUDA cores (no tensor cores): this is the correct fallback while the cuDNN fused SDPA graph is not wired
// (docs/CUDA_BACKEND.md); it never stores [T, T] scores.
//
// Forward: a block owns 64 query rows of one (batch, head), one thread per row; key/value tiles of 32 rows
// are staged in shared memory and every thread keeps its running max, sum and output row in registers
// (online softmax). Backward recomputes probabilities from lse: one kernel gives dq (a thread per query row,
// keys in increasing order), one kernel per output gives dk and dv (a thread per key row, summing over the
// query heads of its KV group and then queries in increasing order: the CPU twin's order). No atomics.
//
// Document masks: query t sees keys [doc_start[b,t], t]; doc_start must be non-decreasing along t (as
// doc_positions produces), which lets a block bound its key range by its first query's document start.
#include "kernels/train/train_common.cuh"

#define ATT_BQ 64  // query rows per forward / dq block (threads)
#define ATT_BK 32  // key rows per shared-memory tile in the forward / dq kernels
#define ATT_BKV 64 // key rows per dk/dv block (threads)
#define ATT_BQB 16 // query rows per shared-memory tile in the dk/dv kernels

// stage rows [r0, r0 + R) (clamped to < T; missing rows are zero) of one head of a token-major tensor
// into shared memory as float: transposed ([HD][R]) or row-major ([R][HD])
template <typename T, int HD, int R, bool TRANS>
__device__ __forceinline__ void stage(float *dst, const T *src, int64_t b, int64_t T_, int64_t r0, int64_t stride,
                                      int head) {
    for (int e = threadIdx.x; e < R * HD; e += blockDim.x) {
        const int row = e / HD, d = e % HD;
        const int64_t t = r0 + row;
        const float x = t < T_ ? ld(src, (b * T_ + t) * stride + (int64_t)head * HD + d) : 0.f;
        if (TRANS) dst[d * R + row] = x;
        else dst[row * HD + d] = x;
    }
}

template <typename T, int HD>
__global__ void __launch_bounds__(ATT_BQ) attn_fwd_kernel(int64_t T_, int nh, int nkv, const T *q, const T *k, const T *v,
                                                          const int32_t *doc_start, T *out, float *lse, float scale) {
    extern __shared__ float smem[];
    float *qs = smem;                  // [HD][BQ]
    float *ks = qs + HD * ATT_BQ;      // [BK][HD]
    float *vs = ks + ATT_BK * HD;      // [BK][HD]
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int64_t b = blockIdx.z, t0 = (int64_t)blockIdx.x * ATT_BQ, i = t0 + threadIdx.x;
    const int64_t qst = (int64_t)nh * HD, kst = (int64_t)nkv * HD;
    const int64_t lo = doc_start ? doc_start[b * T_ + t0] : 0;  // smallest document start of the block
    const int64_t hi = min(T_ - 1, t0 + ATT_BQ - 1);
    const int64_t my_lo = i < T_ && doc_start ? doc_start[b * T_ + i] : 0;
    stage<T, HD, ATT_BQ, true>(qs, q, b, T_, t0, qst, h);
    float o[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) o[d] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int64_t j0 = lo - lo % ATT_BK; j0 <= hi; j0 += ATT_BK) {
        __syncthreads();  // previous tile consumed (and qs staged on the first pass)
        stage<T, HD, ATT_BK, false>(ks, k, b, T_, j0, kst, g);
        stage<T, HD, ATT_BK, false>(vs, v, b, T_, j0, kst, g);
        __syncthreads();
        float s[ATT_BK];
#pragma unroll
        for (int j = 0; j < ATT_BK; j++) s[j] = 0.f;
        for (int d = 0; d < HD; d += 4) {
            const float q0 = qs[d * ATT_BQ + threadIdx.x], q1 = qs[(d + 1) * ATT_BQ + threadIdx.x];
            const float q2 = qs[(d + 2) * ATT_BQ + threadIdx.x], q3 = qs[(d + 3) * ATT_BQ + threadIdx.x];
#pragma unroll
            for (int j = 0; j < ATT_BK; j++) {
                const float4 kv = *(const float4 *)&ks[j * HD + d];
                s[j] += q0 * kv.x + q1 * kv.y + q2 * kv.z + q3 * kv.w;
            }
        }
        float mt = -INFINITY;
#pragma unroll
        for (int j = 0; j < ATT_BK; j++) {
            const int64_t key = j0 + j;
            s[j] = (key >= my_lo && key <= i) ? s[j] * scale : -INFINITY;
            mt = fmaxf(mt, s[j]);
        }
        const float mn = fmaxf(m, mt);
        if (mn == -INFINITY) continue;  // nothing visible yet (every thread still reaches the barriers)
        const float alpha = expf(m - mn);
        m = mn;
        float psum = 0.f;
#pragma unroll
        for (int j = 0; j < ATT_BK; j++) {
            s[j] = expf(s[j] - m);
            psum += s[j];
        }
        l = l * alpha + psum;
#pragma unroll
        for (int d = 0; d < HD; d += 4) {
            float a0 = o[d] * alpha, a1 = o[d + 1] * alpha, a2 = o[d + 2] * alpha, a3 = o[d + 3] * alpha;
#pragma unroll
            for (int j = 0; j < ATT_BK; j++) {
                const float4 vv = *(const float4 *)&vs[j * HD + d];
                a0 += s[j] * vv.x, a1 += s[j] * vv.y, a2 += s[j] * vv.z, a3 += s[j] * vv.w;
            }
            o[d] = a0, o[d + 1] = a1, o[d + 2] = a2, o[d + 3] = a3;
        }
    }
    if (i >= T_) return;
    const float inv = 1.0f / l;
    T *orow = out + (b * T_ + i) * qst + (int64_t)h * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) st(orow, d, o[d] * inv);
    lse[((int64_t)b * nh + h) * T_ + i] = m + logf(l);
}

// Dsum[b, h, i] = dot(dout_i, out_i) over the head
template <typename T>
__global__ void attn_dsum_kernel(int64_t B, int64_t T_, int nh, int hd, const T *out, const T *dout, float *Dsum) {
    const int64_t rows = B * nh * T_;
    const int lane = threadIdx.x & 31;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows;
         r += (int64_t)gridDim.x * blockDim.x / 32) {
        const int64_t b = r / (nh * T_), h = (r / T_) % nh, t = r % T_;
        const int64_t off = (b * T_ + t) * nh * hd + h * hd;
        float s = 0.f;
        for (int d = lane; d < hd; d += 32) s += ld(dout, off + d) * ld(out, off + d);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) Dsum[(b * nh + h) * T_ + t] = s;
    }
}

template <typename T, int HD>
__global__ void __launch_bounds__(ATT_BQ) attn_dq_kernel(int64_t T_, int nh, int nkv, const T *q, const T *k, const T *v,
                                                         const int32_t *doc_start, const float *lse, const float *Dsum,
                                                         const T *dout, T *dq, float scale) {
    extern __shared__ float smem[];
    float *qs = smem;                  // [HD][BQ]
    float *dos = qs + HD * ATT_BQ;     // [HD][BQ]
    float *ks = dos + HD * ATT_BQ;     // [BK][HD]
    float *vs = ks + ATT_BK * HD;      // [BK][HD]
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int64_t b = blockIdx.z, t0 = (int64_t)blockIdx.x * ATT_BQ, i = t0 + threadIdx.x;
    const int64_t qst = (int64_t)nh * HD, kst = (int64_t)nkv * HD;
    const int64_t lo = doc_start ? doc_start[b * T_ + t0] : 0;
    const int64_t hi = min(T_ - 1, t0 + ATT_BQ - 1);
    const bool live = i < T_;
    const int64_t my_lo = live && doc_start ? doc_start[b * T_ + i] : 0;
    const float li = live ? lse[((int64_t)b * nh + h) * T_ + i] : 0.f;
    const float Di = live ? Dsum[((int64_t)b * nh + h) * T_ + i] : 0.f;
    stage<T, HD, ATT_BQ, true>(qs, q, b, T_, t0, qst, h);
    stage<T, HD, ATT_BQ, true>(dos, dout, b, T_, t0, qst, h);
    float acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    for (int64_t j0 = lo - lo % ATT_BK; j0 <= hi; j0 += ATT_BK) {
        __syncthreads();
        stage<T, HD, ATT_BK, false>(ks, k, b, T_, j0, kst, g);
        stage<T, HD, ATT_BK, false>(vs, v, b, T_, j0, kst, g);
        __syncthreads();
        float s[ATT_BK], dp[ATT_BK];
#pragma unroll
        for (int j = 0; j < ATT_BK; j++) s[j] = 0.f, dp[j] = 0.f;
        for (int d = 0; d < HD; d++) {
            const float qd = qs[d * ATT_BQ + threadIdx.x], dd = dos[d * ATT_BQ + threadIdx.x];
#pragma unroll
            for (int j = 0; j < ATT_BK; j++) {
                s[j] += qd * ks[j * HD + d];
                dp[j] += dd * vs[j * HD + d];
            }
        }
#pragma unroll
        for (int j = 0; j < ATT_BK; j++) {
            const int64_t key = j0 + j;
            const float p = (key >= my_lo && key <= i) ? expf(s[j] * scale - li) : 0.f;
            s[j] = p * (dp[j] - Di) * scale;  // ds
        }
#pragma unroll
        for (int d = 0; d < HD; d += 4) {
            float a0 = acc[d], a1 = acc[d + 1], a2 = acc[d + 2], a3 = acc[d + 3];
#pragma unroll
            for (int j = 0; j < ATT_BK; j++) {
                const float4 kv = *(const float4 *)&ks[j * HD + d];
                a0 += s[j] * kv.x, a1 += s[j] * kv.y, a2 += s[j] * kv.z, a3 += s[j] * kv.w;
            }
            acc[d] = a0, acc[d + 1] = a1, acc[d + 2] = a2, acc[d + 3] = a3;
        }
    }
    if (!live) return;
    T *row = dq + (b * T_ + i) * qst + (int64_t)h * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) st(row, d, acc[d]);
}

// WANT_DK: dk_j = sum_{h in group} sum_i ds_ij q_i; else dv_j = sum_h sum_i p_ij dout_i.
template <typename T, int HD, bool WANT_DK>
__global__ void __launch_bounds__(ATT_BKV) attn_dkv_kernel(int64_t T_, int nh, int nkv, const T *q, const T *k, const T *v,
                                                           const int32_t *doc_start, const float *lse, const float *Dsum,
                                                           const T *dout, T *dkv, float scale) {
    extern __shared__ float smem[];
    float *kts = smem;                 // [HD][BKV] own keys, transposed
    float *vts = kts + HD * ATT_BKV;   // [HD][BKV] own values (dk only)
    float *qs = vts + (WANT_DK ? HD * ATT_BKV : 0);  // [BQB][HD]
    float *dos = qs + ATT_BQB * HD;    // [BQB][HD]
    float *ls = dos + ATT_BQB * HD;    // [BQB] lse
    float *Ds = ls + ATT_BQB;          // [BQB] Dsum
    int *dst = (int *)(Ds + ATT_BQB);  // [BQB] doc_start
    const int g = blockIdx.y, rep = nh / nkv;
    const int64_t b = blockIdx.z, j0 = (int64_t)blockIdx.x * ATT_BKV, j = j0 + threadIdx.x;
    const int64_t qst = (int64_t)nh * HD, kst = (int64_t)nkv * HD;
    const int64_t jmax = min(T_ - 1, j0 + ATT_BKV - 1);
    stage<T, HD, ATT_BKV, true>(kts, k, b, T_, j0, kst, g);
    if (WANT_DK) stage<T, HD, ATT_BKV, true>(vts, v, b, T_, j0, kst, g);
    float acc[HD];
#pragma unroll
    for (int d = 0; d < HD; d++) acc[d] = 0.f;
    for (int h = g * rep; h < (g + 1) * rep; h++) {
        for (int64_t i0 = j0; i0 < T_; i0 += ATT_BQB) {
            // queries from i0 on start their documents after this block's last key: done with this head
            if (doc_start && doc_start[b * T_ + i0] > jmax) break;
            __syncthreads();
            stage<T, HD, ATT_BQB, false>(qs, q, b, T_, i0, qst, h);
            stage<T, HD, ATT_BQB, false>(dos, dout, b, T_, i0, qst, h);
            if (threadIdx.x < ATT_BQB) {
                const int64_t ii = i0 + threadIdx.x;
                const bool ok = ii < T_;
                ls[threadIdx.x] = ok ? lse[((int64_t)b * nh + h) * T_ + ii] : 0.f;
                Ds[threadIdx.x] = ok ? Dsum[((int64_t)b * nh + h) * T_ + ii] : 0.f;
                dst[threadIdx.x] = ok ? (doc_start ? doc_start[b * T_ + ii] : 0) : 0x7fffffff;
            }
            __syncthreads();
            float s[ATT_BQB], dp[ATT_BQB];
#pragma unroll
            for (int r = 0; r < ATT_BQB; r++) s[r] = 0.f, dp[r] = 0.f;
            for (int d = 0; d < HD; d++) {
                const float kd = kts[d * ATT_BKV + threadIdx.x];
                const float vd = WANT_DK ? vts[d * ATT_BKV + threadIdx.x] : 0.f;
#pragma unroll
                for (int r = 0; r < ATT_BQB; r++) {
                    s[r] += qs[r * HD + d] * kd;
                    if (WANT_DK) dp[r] += dos[r * HD + d] * vd;
                }
            }
#pragma unroll
            for (int r = 0; r < ATT_BQB; r++) {
                const int64_t ii = i0 + r;
                const bool vis = ii < T_ && j <= ii && dst[r] <= j && j < T_;
                const float p = vis ? expf(s[r] * scale - ls[r]) : 0.f;
                s[r] = WANT_DK ? p * (dp[r] - Ds[r]) * scale : p;
            }
            const float *src = WANT_DK ? qs : dos;
#pragma unroll
            for (int d = 0; d < HD; d += 4) {
                float a0 = acc[d], a1 = acc[d + 1], a2 = acc[d + 2], a3 = acc[d + 3];
#pragma unroll
                for (int r = 0; r < ATT_BQB; r++) {
                    const float4 x = *(const float4 *)&src[r * HD + d];
                    a0 += s[r] * x.x, a1 += s[r] * x.y, a2 += s[r] * x.z, a3 += s[r] * x.w;
                }
                acc[d] = a0, acc[d + 1] = a1, acc[d + 2] = a2, acc[d + 3] = a3;
            }
        }
    }
    if (j >= T_) return;
    T *row = dkv + (b * T_ + j) * kst + (int64_t)g * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) st(row, d, acc[d]);
}

static int attn_check(const char *fn, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, char *err, size_t errlen) {
    if (!dt_ok(dt)) return train_fail(err, errlen, "%s: dtype must be f32 or bf16", fn);
    if (hd != 64 && hd != 128) return train_fail(err, errlen, "%s: head_dim %d not supported (64 or 128)", fn, hd);
    if (nh < 1 || nkv < 1 || nh % nkv) return train_fail(err, errlen, "%s: %d query heads not a multiple of %d KV heads", fn, nh, nkv);
    if (B < 0 || T < 0 || B > 65535 || nh > 65535) return train_fail(err, errlen, "%s: batch %lld / heads %d too large", fn, (long long)B, nh);
    return 0;
}

template <typename T, int HD>
static void launch_fwd(int64_t B, int64_t T_, int nh, int nkv, const void *q, const void *k, const void *v,
                       const int32_t *doc_start, void *out, float *lse, dl_stream_t stream) {
    const size_t sm = (size_t)(HD * ATT_BQ + 2 * ATT_BK * HD) * sizeof(float);
    cudaCheck(cudaFuncSetAttribute(attn_fwd_kernel<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
    dim3 grid((unsigned)((T_ + ATT_BQ - 1) / ATT_BQ), nh, (unsigned)B);
    attn_fwd_kernel<T, HD><<<grid, ATT_BQ, sm, stream>>>(T_, nh, nkv, (const T *)q, (const T *)k, (const T *)v, doc_start,
                                                         (T *)out, lse, 1.0f / sqrtf((float)HD));
    kernelCheck("attn_fwd_kernel");
}

extern "C" int attention_fwd_cuda(DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, const void *q, const void *k,
                                  const void *v, const int32_t *doc_start, void *out, float *lse, dl_stream_t stream,
                                  char *err, size_t errlen) {
    if (attn_check("attention_fwd_cuda", dt, B, T, nh, nkv, hd, err, errlen)) return -1;
    if (!lse) return train_fail(err, errlen, "attention_fwd_cuda: lse [B, nh, T] is required");
    if (B == 0 || T == 0) return 0;
    DL_DISPATCH(dt, TT, {
        if (hd == 64) launch_fwd<TT, 64>(B, T, nh, nkv, q, k, v, doc_start, out, lse, stream);
        else launch_fwd<TT, 128>(B, T, nh, nkv, q, k, v, doc_start, out, lse, stream);
    });
    return 0;
}

extern "C" size_t attention_bwd_workspace(int64_t B, int64_t T, int nh) { return (size_t)(B * T * nh) * sizeof(float); }

template <typename T, int HD>
static void launch_bwd(int64_t B, int64_t T_, int nh, int nkv, const void *q, const void *k, const void *v,
                       const int32_t *doc_start, const float *lse, const float *Dsum, const void *dout, void *dq,
                       void *dk, void *dv, dl_stream_t stream) {
    const float scale = 1.0f / sqrtf((float)HD);
    const size_t sq = (size_t)(2 * HD * ATT_BQ + 2 * ATT_BK * HD) * sizeof(float);
    cudaCheck(cudaFuncSetAttribute(attn_dq_kernel<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sq));
    dim3 gq((unsigned)((T_ + ATT_BQ - 1) / ATT_BQ), nh, (unsigned)B);
    attn_dq_kernel<T, HD><<<gq, ATT_BQ, sq, stream>>>(T_, nh, nkv, (const T *)q, (const T *)k, (const T *)v, doc_start, lse,
                                                      Dsum, (const T *)dout, (T *)dq, scale);
    kernelCheck("attn_dq_kernel");
    const size_t tail = (size_t)(2 * ATT_BQB * HD + 3 * ATT_BQB) * sizeof(float);
    const size_t sk = (size_t)(2 * HD * ATT_BKV) * sizeof(float) + tail, sv = (size_t)(HD * ATT_BKV) * sizeof(float) + tail;
    cudaCheck(cudaFuncSetAttribute(attn_dkv_kernel<T, HD, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sk));
    cudaCheck(cudaFuncSetAttribute(attn_dkv_kernel<T, HD, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sv));
    dim3 gk((unsigned)((T_ + ATT_BKV - 1) / ATT_BKV), nkv, (unsigned)B);
    attn_dkv_kernel<T, HD, true><<<gk, ATT_BKV, sk, stream>>>(T_, nh, nkv, (const T *)q, (const T *)k, (const T *)v,
                                                              doc_start, lse, Dsum, (const T *)dout, (T *)dk, scale);
    kernelCheck("attn_dkv_kernel<dk>");
    attn_dkv_kernel<T, HD, false><<<gk, ATT_BKV, sv, stream>>>(T_, nh, nkv, (const T *)q, (const T *)k, (const T *)v,
                                                               doc_start, lse, Dsum, (const T *)dout, (T *)dv, scale);
    kernelCheck("attn_dkv_kernel<dv>");
}

extern "C" int attention_bwd_cuda(DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, const void *q, const void *k,
                                  const void *v, const int32_t *doc_start, const void *out, const float *lse,
                                  const void *dout, void *dq, void *dk, void *dv, void *workspace, dl_stream_t stream,
                                  char *err, size_t errlen) {
    if (attn_check("attention_bwd_cuda", dt, B, T, nh, nkv, hd, err, errlen)) return -1;
    if (!workspace) return train_fail(err, errlen, "attention_bwd_cuda: needs attention_bwd_workspace bytes of workspace");
    if (B == 0 || T == 0) return 0;
    float *Dsum = (float *)workspace;
    DL_DISPATCH(dt, TT, {
        attn_dsum_kernel<TT><<<grid_for(B * nh * T * 32, 256, 8192), 256, 0, stream>>>(B, T, nh, hd, (const TT *)out,
                                                                                       (const TT *)dout, Dsum);
        kernelCheck("attn_dsum_kernel");
        if (hd == 64) launch_bwd<TT, 64>(B, T, nh, nkv, q, k, v, doc_start, lse, Dsum, dout, dq, dk, dv, stream);
        else launch_bwd<TT, 128>(B, T, nh, nkv, q, k, v, doc_start, lse, Dsum, dout, dq, dk, dv, stream);
    });
    return 0;
}
