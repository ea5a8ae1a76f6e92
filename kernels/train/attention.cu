// attention.cu: causal GQA attention with document masks, forward and backward (twins of attention_fwd /
// attention_bwd, distill/layers_cpu.c). Hand-written flash-attention-style kernels, in place of cuDNN's
// fused SDPA graph, which is not wired (docs/CUDA_BACKEND.md); they never store [T, T] scores. Two
// versions: fp32 math on the CUDA cores (any dtype: the parity mode), and bf16 on the tensor cores
// (mma.sync, further below), used for bf16 with 16-byte aligned pointers.
//
// CUDA-core forward: a block owns 64 query rows of one (batch, head), one thread per row; key/value tiles of 32 rows
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

// ---------------------------------------------------------------- tensor-core forward (bf16)
// The same tiling with the two matmuls on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate):
// a block of 4 warps owns 64 query rows (16 per warp), key tiles of 64 rows; K is staged row-major and V
// transposed, both padded by 8 elements per row so the fragment loads hit 32 distinct banks. S = Q K^T stays
// in the accumulator fragments, the online softmax runs on them (row max/sum across the 4 lanes that share
// a row), and P is re-packed in registers as the A operand of O += P V.
#define TC_BQ 64
#define TC_BK 64

__device__ __forceinline__ void mma_bf16(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    return *(uint32_t *)&v;
}
__device__ __forceinline__ uint32_t lds32(const bf16 *p) { return *(const uint32_t *)p; }
// B fragment (k = 16 rows, n = 8 columns) of a row-major [k][n] tile in shared memory, transposed on the way
// by ldmatrix: lanes 0-15 give the addresses of rows k0 .. k0+15 at column n0 (16-byte aligned).
__device__ __forceinline__ void ldsm_x2_trans(uint32_t &b0, uint32_t &b1, const bf16 *p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(a));
}

// out[n'] (HD/8 tiles) += P (16 x 64, accumulator fragments p) times a [64][HD] tile staged row-major
// (its B fragments transposed by ldmatrix)
template <int HD>
__device__ __forceinline__ void mma_pv(float (*out)[4], const float (*p)[4], const bf16 *rowm, int lane) {
    constexpr int QS = HD + 8;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        uint32_t pa[4];
        pa[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
        pa[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
        pa[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        pa[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            uint32_t b0, b1;
            ldsm_x2_trans(b0, b1, rowm + (kk * 16 + (lane & 15)) * QS + n * 8);
            mma_bf16(out[n], pa, b0, b1);
        }
    }
}

template <int HD>
__global__ void __launch_bounds__(128) attn_fwd_mma_kernel(int64_t T_, int nh, int nkv, const bf16 *q, const bf16 *k,
                                                           const bf16 *v, const int32_t *doc_start, bf16 *out,
                                                           float *lse, float scale) {
    constexpr int QS = HD + 8;  // padded row stride (elements): fragment loads hit 32 distinct banks
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16 *Qs = (bf16 *)smraw;   // [BQ][QS]
    bf16 *Ks = Qs + TC_BQ * QS; // [BK][QS]
    bf16 *Vs = Ks + TC_BK * QS; // [BK][QS]
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int64_t b = blockIdx.z, t0 = (int64_t)blockIdx.x * TC_BQ;
    const int64_t qst = (int64_t)nh * HD, kst = (int64_t)nkv * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tg = lane & 3;
    const int64_t lo = doc_start ? doc_start[b * T_ + t0] : 0;
    const int64_t hi = min(T_ - 1, t0 + TC_BQ - 1);
    // this thread's two rows: warp*16 + gr and + 8
    const int64_t i0 = t0 + warp * 16 + gr, i1 = i0 + 8;
    const int64_t lo0 = doc_start && i0 < T_ ? doc_start[b * T_ + i0] : 0;
    const int64_t lo1 = doc_start && i1 < T_ ? doc_start[b * T_ + i1] : 0;
    // stage Q (16-byte chunks)
    for (int e = threadIdx.x; e < TC_BQ * HD / 8; e += blockDim.x) {
        const int row = e / (HD / 8), c = (e % (HD / 8)) * 8;
        const int64_t t = t0 + row;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (t < T_) x = *(const uint4 *)(q + (b * T_ + t) * qst + (int64_t)h * HD + c);
        *(uint4 *)(Qs + row * QS + c) = x;
    }
    __syncthreads();
    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const bf16 *r0 = Qs + (warp * 16 + gr) * QS + kk * 16 + tg * 2, *r1 = r0 + 8 * QS;
        qa[kk][0] = lds32(r0), qa[kk][1] = lds32(r1), qa[kk][2] = lds32(r0 + 8), qa[kk][3] = lds32(r1 + 8);
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    for (int64_t j0 = lo - lo % TC_BK; j0 <= hi; j0 += TC_BK) {
        __syncthreads();  // previous tile consumed
        for (int e = threadIdx.x; e < TC_BK * HD / 8; e += blockDim.x) {
            const int row = e / (HD / 8), c = (e % (HD / 8)) * 8;
            const int64_t t = j0 + row;
            uint4 kx = make_uint4(0, 0, 0, 0), vx = make_uint4(0, 0, 0, 0);
            if (t < T_) {
                kx = *(const uint4 *)(k + (b * T_ + t) * kst + (int64_t)g * HD + c);
                vx = *(const uint4 *)(v + (b * T_ + t) * kst + (int64_t)g * HD + c);
            }
            *(uint4 *)(Ks + row * QS + c) = kx;
            *(uint4 *)(Vs + row * QS + c) = vx;
        }
        __syncthreads();
        float s[TC_BK / 8][4];
#pragma unroll
        for (int n = 0; n < TC_BK / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const bf16 *kr = Ks + (n * 8 + gr) * QS + kk * 16 + tg * 2;
                mma_bf16(s[n], qa[kk], lds32(kr), lds32(kr + 8));
            }
        }
        // mask, scale, row max
        float mt0 = -INFINITY, mt1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < TC_BK / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int64_t key = j0 + n * 8 + tg * 2 + e;
                s[n][e] = (key >= lo0 && key <= i0) ? s[n][e] * scale : -INFINITY;
                s[n][2 + e] = (key >= lo1 && key <= i1) ? s[n][2 + e] * scale : -INFINITY;
                mt0 = fmaxf(mt0, s[n][e]);
                mt1 = fmaxf(mt1, s[n][2 + e]);
            }
#pragma unroll
        for (int x = 1; x <= 2; x <<= 1) {
            mt0 = fmaxf(mt0, __shfl_xor_sync(0xffffffffu, mt0, x));
            mt1 = fmaxf(mt1, __shfl_xor_sync(0xffffffffu, mt1, x));
        }
        const float mn0 = fmaxf(m0, mt0), mn1 = fmaxf(m1, mt1);
        const float a0 = mn0 == -INFINITY ? 1.f : expf(m0 - mn0), a1 = mn1 == -INFINITY ? 1.f : expf(m1 - mn1);
        m0 = mn0, m1 = mn1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int n = 0; n < TC_BK / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                s[n][e] = s[n][e] == -INFINITY ? 0.f : expf(s[n][e] - m0);
                s[n][2 + e] = s[n][2 + e] == -INFINITY ? 0.f : expf(s[n][2 + e] - m1);
                ps0 += s[n][e], ps1 += s[n][2 + e];
            }
        l0 = l0 * a0 + ps0, l1 = l1 * a1 + ps1;  // per-lane partial sums; the 4 lanes are added at the end
#pragma unroll
        for (int n = 0; n < HD / 8; n++) o[n][0] *= a0, o[n][1] *= a0, o[n][2] *= a1, o[n][3] *= a1;
        // O += P V: P's accumulator fragments are the A fragments of the next product
        static_assert(TC_BK == 64, "mma_pv takes 64 keys");
        mma_pv<HD>(o, s, Vs, lane);
    }
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        const int c = n * 8 + tg * 2;
        if (i0 < T_)
            *(__nv_bfloat162 *)(out + (b * T_ + i0) * qst + (int64_t)h * HD + c) =
                __floats2bfloat162_rn(o[n][0] * inv0, o[n][1] * inv0);
        if (i1 < T_)
            *(__nv_bfloat162 *)(out + (b * T_ + i1) * qst + (int64_t)h * HD + c) =
                __floats2bfloat162_rn(o[n][2] * inv1, o[n][3] * inv1);
    }
    if (tg == 0) {
        if (i0 < T_) lse[((int64_t)b * nh + h) * T_ + i0] = m0 + logf(l0);
        if (i1 < T_) lse[((int64_t)b * nh + h) * T_ + i1] = m1 + logf(l1);
    }
}

// ---------------------------------------------------------------- tensor-core backward (bf16)
// Same fragments as the forward. dq: a block owns 64 query rows (16 per warp) and walks the key tiles:
// S = Q K^T and dP = dO V^T on the tensor cores, dS = P (dP - D) scale, dQ += dS K with K staged transposed.
// dk / dv: a block owns 64 key rows of one KV head and walks the query heads of its group and their query
// tiles: S^T = K Q^T, P^T = exp(S^T scale - lse[query]); dV += P^T dO (dO staged transposed); dP^T = V dO^T,
// dS^T = P^T (dP^T - D[query]) scale, dK += dS^T Q (Q staged transposed). dk and dv are two launches so that
// each keeps one accumulator tile in registers. Fixed tile order: deterministic, no atomics.

// rows [r0, r0 + 64) of one head (zero beyond T), row-major [64][HD + 8]
template <int HD>
__device__ __forceinline__ void stage_mma(bf16 *rowm, const bf16 *src, int64_t b, int64_t T_, int64_t r0, int64_t stride,
                                          int head) {
    constexpr int QS = HD + 8;
    for (int e = threadIdx.x; e < 64 * HD / 8; e += blockDim.x) {
        const int row = e / (HD / 8), c = (e % (HD / 8)) * 8;
        const int64_t t = r0 + row;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (t < T_) x = *(const uint4 *)(src + (b * T_ + t) * stride + (int64_t)head * HD + c);
        *(uint4 *)(rowm + row * QS + c) = x;
    }
}
// A fragments of this warp's 16 rows of a staged row-major tile
template <int HD>
__device__ __forceinline__ void load_afrag(uint32_t (*fa)[4], const bf16 *rowm, int warp, int gr, int tg) {
    constexpr int QS = HD + 8;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const bf16 *r0 = rowm + (warp * 16 + gr) * QS + kk * 16 + tg * 2, *r1 = r0 + 8 * QS;
        fa[kk][0] = lds32(r0), fa[kk][1] = lds32(r1), fa[kk][2] = lds32(r0 + 8), fa[kk][3] = lds32(r1 + 8);
    }
}
// acc[n] (16 x 8 tiles, n < 8: 64 columns) = this warp's rows (A fragments) times the rows of B^T staged
// row-major (column index n*8 + gr of the product is row n*8 + gr of bt)
template <int HD>
__device__ __forceinline__ void mma_rows(float (*acc)[4], const uint32_t (*fa)[4], const bf16 *bt, int gr, int tg) {
    constexpr int QS = HD + 8;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const bf16 *r = bt + (n * 8 + gr) * QS + kk * 16 + tg * 2;
            mma_bf16(acc[n], fa[kk], lds32(r), lds32(r + 8));
        }
    }
}

template <int HD>
__global__ void __launch_bounds__(128) attn_dq_mma_kernel(int64_t T_, int nh, int nkv, const bf16 *q, const bf16 *k,
                                                          const bf16 *v, const int32_t *doc_start, const float *lse,
                                                          const float *Dsum, const bf16 *dout, bf16 *dq, float scale) {
    constexpr int QS = HD + 8;
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16 *A = (bf16 *)smraw;     // [64][QS]: Q then dO (fragments go to registers)
    bf16 *Ks = A + 64 * QS;      // [64][QS]
    bf16 *Vs = Ks + 64 * QS;     // [64][QS]
    const int h = blockIdx.y, g = h / (nh / nkv);
    const int64_t b = blockIdx.z, t0 = (int64_t)blockIdx.x * TC_BQ;
    const int64_t qst = (int64_t)nh * HD, kst = (int64_t)nkv * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tg = lane & 3;
    const int64_t lo = doc_start ? doc_start[b * T_ + t0] : 0, hi = min(T_ - 1, t0 + TC_BQ - 1);
    const int64_t i0 = t0 + warp * 16 + gr, i1 = i0 + 8;
    const int64_t lo0 = doc_start && i0 < T_ ? doc_start[b * T_ + i0] : 0;
    const int64_t lo1 = doc_start && i1 < T_ ? doc_start[b * T_ + i1] : 0;
    const int64_t sb = ((int64_t)b * nh + h) * T_;
    const float L0 = i0 < T_ ? lse[sb + i0] : 0.f, L1 = i1 < T_ ? lse[sb + i1] : 0.f;
    const float D0 = i0 < T_ ? Dsum[sb + i0] : 0.f, D1 = i1 < T_ ? Dsum[sb + i1] : 0.f;
    uint32_t qa[HD / 16][4], da[HD / 16][4];
    stage_mma<HD>(A, q, b, T_, t0, qst, h);
    __syncthreads();
    load_afrag<HD>(qa, A, warp, gr, tg);
    __syncthreads();
    stage_mma<HD>(A, dout, b, T_, t0, qst, h);
    __syncthreads();
    load_afrag<HD>(da, A, warp, gr, tg);
    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    for (int64_t j0 = lo - lo % TC_BK; j0 <= hi; j0 += TC_BK) {
        __syncthreads();
        stage_mma<HD>(Ks, k, b, T_, j0, kst, g);
        stage_mma<HD>(Vs, v, b, T_, j0, kst, g);
        __syncthreads();
        float s[8][4], dp[8][4];
        mma_rows<HD>(s, qa, Ks, gr, tg);
        mma_rows<HD>(dp, da, Vs, gr, tg);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int64_t key = j0 + n * 8 + tg * 2 + e;
                const float p0 = (key >= lo0 && key <= i0) ? expf(s[n][e] * scale - L0) : 0.f;
                const float p1 = (key >= lo1 && key <= i1) ? expf(s[n][2 + e] * scale - L1) : 0.f;
                s[n][e] = p0 * (dp[n][e] - D0) * scale;
                s[n][2 + e] = p1 * (dp[n][2 + e] - D1) * scale;
            }
        mma_pv<HD>(acc, s, Ks, lane);
    }
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        const int c = n * 8 + tg * 2;
        if (i0 < T_) *(__nv_bfloat162 *)(dq + (b * T_ + i0) * qst + (int64_t)h * HD + c) = __floats2bfloat162_rn(acc[n][0], acc[n][1]);
        if (i1 < T_) *(__nv_bfloat162 *)(dq + (b * T_ + i1) * qst + (int64_t)h * HD + c) = __floats2bfloat162_rn(acc[n][2], acc[n][3]);
    }
}

template <int HD, bool WANT_DK>
__global__ void __launch_bounds__(128) attn_dkv_mma_kernel(int64_t T_, int nh, int nkv, const bf16 *q, const bf16 *k,
                                                           const bf16 *v, const int32_t *doc_start, const float *lse,
                                                           const float *Dsum, const bf16 *dout, bf16 *dkv, float scale) {
    constexpr int QS = HD + 8;
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16 *Qs = (bf16 *)smraw;    // [64][QS] Q (K, then V, staged here first for their fragments)
    bf16 *Xs = Qs + 64 * QS;     // [64][QS] dO
    float *ls = (float *)(Xs + 64 * QS), *Ds = ls + 64;
    int *dst = (int *)(Ds + 64);
    const int g = blockIdx.y, rep = nh / nkv;
    const int64_t b = blockIdx.z, j0 = (int64_t)blockIdx.x * TC_BK;
    const int64_t qst = (int64_t)nh * HD, kst = (int64_t)nkv * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, tg = lane & 3;
    const int64_t jmax = min(T_ - 1, j0 + TC_BK - 1);
    const int64_t k0 = j0 + warp * 16 + gr, k1 = k0 + 8;  // this thread's key rows
    uint32_t ka[HD / 16][4], va[WANT_DK ? HD / 16 : 1][4];
    stage_mma<HD>(Qs, k, b, T_, j0, kst, g);
    __syncthreads();
    load_afrag<HD>(ka, Qs, warp, gr, tg);
    if constexpr (WANT_DK) {
        __syncthreads();
        stage_mma<HD>(Qs, v, b, T_, j0, kst, g);
        __syncthreads();
        load_afrag<HD>(va, Qs, warp, gr, tg);
    }
    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    for (int h = g * rep; h < (g + 1) * rep; h++) {
        const int64_t sb = ((int64_t)b * nh + h) * T_;
        for (int64_t i0 = j0; i0 < T_; i0 += TC_BQ) {
            if (doc_start && doc_start[b * T_ + i0] > jmax) break;  // later queries start after our keys
            __syncthreads();
            stage_mma<HD>(Qs, q, b, T_, i0, qst, h);
            stage_mma<HD>(Xs, dout, b, T_, i0, qst, h);
            if (threadIdx.x < 64) {
                const int64_t ii = i0 + threadIdx.x;
                const bool ok = ii < T_;
                ls[threadIdx.x] = ok ? lse[sb + ii] : 0.f;
                Ds[threadIdx.x] = ok ? Dsum[sb + ii] : 0.f;
                dst[threadIdx.x] = ok ? (doc_start ? doc_start[b * T_ + ii] : 0) : 0x7fffffff;
            }
            __syncthreads();
            float s[8][4];
            mma_rows<HD>(s, ka, Qs, gr, tg);  // S^T: rows = keys, columns = queries
            float dp[WANT_DK ? 8 : 1][4];
            if constexpr (WANT_DK) mma_rows<HD>(dp, va, Xs, gr, tg);
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int c = n * 8 + tg * 2 + e;
                    const int64_t qi = i0 + c;
                    const bool ok0 = qi < T_ && k0 <= qi && dst[c] <= k0 && k0 < T_;
                    const bool ok1 = qi < T_ && k1 <= qi && dst[c] <= k1 && k1 < T_;
                    const float p0 = ok0 ? expf(s[n][e] * scale - ls[c]) : 0.f;
                    const float p1 = ok1 ? expf(s[n][2 + e] * scale - ls[c]) : 0.f;
                    if constexpr (WANT_DK) {
                        s[n][e] = p0 * (dp[n][e] - Ds[c]) * scale;
                        s[n][2 + e] = p1 * (dp[n][2 + e] - Ds[c]) * scale;
                    } else {
                        s[n][e] = p0, s[n][2 + e] = p1;
                    }
                }
            mma_pv<HD>(acc, s, WANT_DK ? Qs : Xs, lane);  // dK += dS^T Q, dV += P^T dO
        }
    }
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        const int c = n * 8 + tg * 2;
        if (k0 < T_) *(__nv_bfloat162 *)(dkv + (b * T_ + k0) * kst + (int64_t)g * HD + c) = __floats2bfloat162_rn(acc[n][0], acc[n][1]);
        if (k1 < T_) *(__nv_bfloat162 *)(dkv + (b * T_ + k1) * kst + (int64_t)g * HD + c) = __floats2bfloat162_rn(acc[n][2], acc[n][3]);
    }
}

template <int HD>
static void launch_bwd_mma(int64_t B, int64_t T_, int nh, int nkv, const void *q, const void *k, const void *v,
                           const int32_t *doc_start, const float *lse, const float *Dsum, const void *dout, void *dq,
                           void *dk, void *dv, dl_stream_t stream) {
    const float scale = 1.0f / sqrtf((float)HD);
    const size_t QS = HD + 8;
    const size_t sq = 3 * 64 * QS * sizeof(bf16);
    cudaCheck(cudaFuncSetAttribute(attn_dq_mma_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sq));
    dim3 gq((unsigned)((T_ + TC_BQ - 1) / TC_BQ), nh, (unsigned)B);
    attn_dq_mma_kernel<HD><<<gq, 128, sq, stream>>>(T_, nh, nkv, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, doc_start,
                                                    lse, Dsum, (const bf16 *)dout, (bf16 *)dq, scale);
    kernelCheck("attn_dq_mma_kernel");
    const size_t skv = 2 * 64 * QS * sizeof(bf16) + 3 * 64 * sizeof(float);
    cudaCheck(cudaFuncSetAttribute(attn_dkv_mma_kernel<HD, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)skv));
    cudaCheck(cudaFuncSetAttribute(attn_dkv_mma_kernel<HD, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)skv));
    dim3 gk((unsigned)((T_ + TC_BK - 1) / TC_BK), nkv, (unsigned)B);
    attn_dkv_mma_kernel<HD, true><<<gk, 128, skv, stream>>>(T_, nh, nkv, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v,
                                                            doc_start, lse, Dsum, (const bf16 *)dout, (bf16 *)dk, scale);
    kernelCheck("attn_dkv_mma_kernel<dk>");
    attn_dkv_mma_kernel<HD, false><<<gk, 128, skv, stream>>>(T_, nh, nkv, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v,
                                                             doc_start, lse, Dsum, (const bf16 *)dout, (bf16 *)dv, scale);
    kernelCheck("attn_dkv_mma_kernel<dv>");
}

static int use_mma = 1;
extern "C" void attention_use_tensor_cores(int on) { use_mma = on; }

template <int HD>
static void launch_fwd_mma(int64_t B, int64_t T_, int nh, int nkv, const void *q, const void *k, const void *v,
                           const int32_t *doc_start, void *out, float *lse, dl_stream_t stream) {
    const size_t sm = (size_t)(TC_BQ + 2 * TC_BK) * (HD + 8) * sizeof(bf16);
    cudaCheck(cudaFuncSetAttribute(attn_fwd_mma_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
    dim3 grid((unsigned)((T_ + TC_BQ - 1) / TC_BQ), nh, (unsigned)B);
    attn_fwd_mma_kernel<HD><<<grid, 128, sm, stream>>>(T_, nh, nkv, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v,
                                                       doc_start, (bf16 *)out, lse, 1.0f / sqrtf((float)HD));
    kernelCheck("attn_fwd_mma_kernel");
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
    // bf16 with 16-byte aligned rows: tensor cores; otherwise the fp32 CUDA-core kernel
    const bool aligned = !(((uintptr_t)q | (uintptr_t)k | (uintptr_t)v) & 15);
    if (dt == DT_BF16 && use_mma && aligned) {
        if (hd == 64) launch_fwd_mma<64>(B, T, nh, nkv, q, k, v, doc_start, out, lse, stream);
        else launch_fwd_mma<128>(B, T, nh, nkv, q, k, v, doc_start, out, lse, stream);
        return 0;
    }
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
        const bool aligned = !(((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)dout | (uintptr_t)dq |
                                (uintptr_t)dk | (uintptr_t)dv) & 15);
        if (dt == DT_BF16 && use_mma && aligned) {
            if (hd == 64) launch_bwd_mma<64>(B, T, nh, nkv, q, k, v, doc_start, lse, Dsum, dout, dq, dk, dv, stream);
            else launch_bwd_mma<128>(B, T, nh, nkv, q, k, v, doc_start, lse, Dsum, dout, dq, dk, dv, stream);
        } else if (hd == 64) {
            launch_bwd<TT, 64>(B, T, nh, nkv, q, k, v, doc_start, lse, Dsum, dout, dq, dk, dv, stream);
        } else {
            launch_bwd<TT, 128>(B, T, nh, nkv, q, k, v, doc_start, lse, Dsum, dout, dq, dk, dv, stream);
        }
    });
    return 0;
}
