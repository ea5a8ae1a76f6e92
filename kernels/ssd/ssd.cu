// ssd.cu: CUDA kernels of the chunked Mamba-2 SSD scan (math and layouts: ssd.h; API: ssd_cuda.h).
//
// Chunks of Q = 64 tokens. Per (batch b, head h) and chunk, with delta_t, cum_m = sum_{j<=m} delta_j A (within
// the chunk), lastr_m = the last reset at a position <= m (-1: none):
//   Lm[m,k]  = exp(cum_m - cum_k) for lastr_m <= k <= m, else 0      (decay from token k to token m)
//   din_m    = exp(cum_m) if lastr_m < 0 else 0                      (decay of the incoming state)
//   w_k      = Lm[Q-1,k] delta_k,  dlast = din_{Q-1}                  (padded tokens: delta 0, x = B = C = 0)
//   y_m      = sum_k (C_m.B_k) Lm[m,k] delta_k x_k + din_m S_in C_m + D x_m
//   S_out    = dlast S_in + sum_k w_k x_k (x) B_k
// Exponents are clamped to <= 0 (kernels.md §8.4: a cum difference rounded above 0 must not grow a decay).
//
// Kernels (one block = 256 threads, contractions as register-blocked fp32 tiles over shared memory):
//   ssd_fwd_kernel<Y>     one block per (b, h, tile of PT rows of P), sequential over chunks, state tile [PT,N]
//                         in shared memory: y (if Y) and the state; optionally stores the state entering every
//                         chunk (the backward's recompute). No state ever goes through global memory in between.
//   ssd_dstate_kernel     the reverse pass of the state gradient, same decomposition: stores dS leaving every
//                         chunk; dS_in = dlast dS + sum_m din_m dy_m (x) C_m; dh0 at the end.
//   ssd_bwd_chunk_kernel  one block per (b, h, chunk), all of P and N: every gradient of the chunk's tokens from
//                         S_in and dS (both from the passes above), and per-block partials of dA, dD, ddt_bias.
//   ssd_param_reduce_kernel, ssd_group_reduce_kernel: fixed-order sums over (batch, chunk) and over the heads
//                         of a group (when G < H).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "kernels/scan/scan_common.cuh"
#include "kernels/ssd/ssd_cuda.h"

#define SSD_Q SSD_CUDA_CHUNK
#define SSD_THREADS 256

namespace {

// ---------------------------------------------------------------------------------------------- arguments
struct SsdDev {
    int64_t B, L, H, P, N, G, rep, nch;
    int softplus, PT;  // PT: rows of P per block in the sequential passes
    const bf16 *x, *dt, *Bm, *Cm, *dy;
    const float *A, *D, *bias, *h0, *dhl;
    const uint8_t *reset;
    bf16 *y, *dx, *ddt, *dBm, *dCm;  // dBm/dCm: bf16 [B,L,G,N] when rep == 1
    float *h_last, *Sin, *dSo;       // Sin, dSo: [B,H,nch,P,N]
    float *dBh, *dCh;                // rep > 1: fp32 per-head partials [B,L,H,N]
    float *pA, *pD, *pb;             // [B,H,nch] partial sums
    float *dh0;
};

__device__ __forceinline__ float bf(bf16 v) { return __bfloat162float(v); }

// ---------------------------------------------------------------------------------------------- shared layouts
// Row strides: bf16 rows of n + 2 (odd number of 4-byte words for n % 4 == 0), fp32 rows of n + 1: 16 threads reading
// 16 consecutive rows at one column hit 16 different banks.
__host__ __device__ inline int64_t al16(int64_t v) { return (v + 15) & ~(int64_t)15; }

struct PassLayout {  // ssd_fwd_kernel and ssd_dstate_kernel
    int64_t C, B, X, W, S, scal, total;
};
__host__ __device__ inline PassLayout pass_layout(int64_t N, int64_t PT) {
    PassLayout l;
    int64_t o = 0;
    l.C = o, o = al16(o + SSD_Q * (N + 2) * 2);
    l.B = o, o = al16(o + SSD_Q * (N + 2) * 2);
    l.X = o, o = al16(o + SSD_Q * (PT + 2) * 2);
    l.W = o, o = al16(o + SSD_Q * (SSD_Q + 1) * 4);
    l.S = o, o = al16(o + PT * (N + 1) * 4);
    l.scal = o, o = al16(o + 8 * SSD_Q * 4);
    l.total = o;
    return l;
}

struct ChunkLayout {  // ssd_bwd_chunk_kernel
    int64_t X, DY, B, C, CB, DG, E, S, R, scal, total;
};
__host__ __device__ inline ChunkLayout chunk_layout(int64_t P, int64_t N) {
    ChunkLayout l;
    const int64_t PN = P > N ? P : N;
    int64_t o = 0;
    l.X = o, o = al16(o + SSD_Q * (P + 2) * 2);
    l.DY = o, o = al16(o + SSD_Q * (P + 2) * 2);
    l.B = o, o = al16(o + SSD_Q * (N + 2) * 2);
    l.C = o, o = al16(o + SSD_Q * (N + 2) * 2);
    l.CB = o, o = al16(o + SSD_Q * (SSD_Q + 1) * 4);
    l.DG = o, o = al16(o + SSD_Q * (SSD_Q + 1) * 4);
    l.E = o, o = al16(o + SSD_Q * (SSD_Q + 1) * 4);
    l.S = o, o = al16(o + P * (N + 1) * 4);
    l.R = o, o = al16(o + SSD_Q * (PN + 1) * 4);
    l.scal = o, o = al16(o + 16 * SSD_Q * 4);
    l.total = o;
    return l;
}

// Per-chunk scalars in shared memory (float arrays of Q; lastr is int).
struct Scal {
    float *delta, *cum, *v, *din, *w, *xdsb, *tmp, *dd;
    int *lastr;
    float *red;  // 32 floats of reduction scratch
};
__device__ inline Scal scal_at(unsigned char *p, int n_arrays) {
    float *f = reinterpret_cast<float *>(p);
    Scal s;
    s.delta = f, s.cum = f + SSD_Q, s.v = f + 2 * SSD_Q, s.din = f + 3 * SSD_Q, s.w = f + 4 * SSD_Q;
    s.lastr = reinterpret_cast<int *>(f + 5 * SSD_Q);
    s.red = f + 6 * SSD_Q;  // 32 floats (6*Q + 32 < 8*Q)
    if (n_arrays > 8) {     // the chunk kernel's layout has 16 arrays
        s.xdsb = f + 7 * SSD_Q, s.tmp = f + 8 * SSD_Q, s.dd = f + 9 * SSD_Q;
    } else {
        s.xdsb = s.tmp = s.dd = nullptr;
    }
    return s;
}

// ---------------------------------------------------------------------------------------------- chunk scalars
__device__ __forceinline__ float softplus_acc(float v) { return v > 20.f ? v : log1pf(expf(v)); }

// Warp 0 only. delta, cum (inclusive prefix of delta*A over the chunk), lastr (last reset at a position <= m, -1 if
// none) and v = dt + dt_bias for positions 0..Q-1 of chunk t0 (q real tokens; the rest is padding: delta 0).
// Lane l owns positions 2l and 2l+1; the prefix sums are a fixed shuffle tree (deterministic).
__device__ void chunk_scalars(const SsdDev &a, int64_t b, int64_t h, int64_t t0, int q, const Scal &sc) {
    const int lane = threadIdx.x & 31;
    const float Ah = a.A[h], bias = a.bias ? a.bias[h] : 0.f;
    float d[2], av[2];
    int rp[2];
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int m = 2 * lane + e;
        d[e] = 0.f, av[e] = 0.f, rp[e] = -1;
        float v = 0.f;
        if (m < q) {
            const int64_t t = t0 + m;
            v = bf(a.dt[(b * a.L + t) * a.H + h]) + bias;
            d[e] = a.softplus ? softplus_acc(v) : v;
            av[e] = d[e] * Ah;
            if (a.reset && a.reset[b * a.L + t]) rp[e] = m;
        }
        sc.v[m] = v;
        sc.delta[m] = d[e];
    }
    float s = av[0] + av[1];
    int mx = rp[0] > rp[1] ? rp[0] : rp[1];
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        const float so = __shfl_up_sync(0xffffffffu, s, off);
        const int mo = __shfl_up_sync(0xffffffffu, mx, off);
        if (lane >= off) {
            s += so;
            mx = mo > mx ? mo : mx;
        }
    }
    float ex = __shfl_up_sync(0xffffffffu, s, 1);
    int exm = __shfl_up_sync(0xffffffffu, mx, 1);
    if (lane == 0) ex = 0.f, exm = -1;
    const float c0 = ex + av[0];
    sc.cum[2 * lane] = c0;
    sc.cum[2 * lane + 1] = c0 + av[1];
    const int l0 = exm > rp[0] ? exm : rp[0];
    sc.lastr[2 * lane] = l0;
    sc.lastr[2 * lane + 1] = l0 > rp[1] ? l0 : rp[1];
}

// decay from token k to token m of the chunk (0 when k > m or a reset lies in (k, m])
__device__ __forceinline__ float decay_mk(const Scal &sc, int m, int k) {
    return (k <= m && k >= sc.lastr[m]) ? expf(fminf(sc.cum[m] - sc.cum[k], 0.f)) : 0.f;
}

// After chunk_scalars and a barrier: din_m and w_k (threads 0..Q-1).
__device__ __forceinline__ void chunk_weights(const Scal &sc) {
    const int m = threadIdx.x;
    if (m < SSD_Q) {
        sc.din[m] = sc.lastr[m] < 0 ? expf(fminf(sc.cum[m], 0.f)) : 0.f;
        sc.w[m] = decay_mk(sc, SSD_Q - 1, m) * sc.delta[m];
    }
}

// ---------------------------------------------------------------------------------------------- block contraction
// out(i, j, sum_k fa1(i,k) fb1(j,k) + sum_k fa2(i,k) fb2(j,k)) for every i < M, j < Nc. 256 threads as 16 x 16, each
// holding TM x TN outputs at rows i0 + ty + 16r, columns j0 + tx + 16c; the k loops run in ascending order with one
// fma per term (so each output's rounding does not depend on the tiling). Reads only; no barrier inside.
template <int TM, int TN, typename FA1, typename FB1, typename FA2, typename FB2, typename FO>
__device__ __forceinline__ void block_mm2(int M, int Nc, int K1, FA1 fa1, FB1 fb1, int K2, FA2 fa2, FB2 fb2, FO out) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    for (int i0 = 0; i0 < M; i0 += 16 * TM)
        for (int j0 = 0; j0 < Nc; j0 += 16 * TN) {
            float acc[TM][TN];
            int ii[TM], jj[TN];
#pragma unroll
            for (int r = 0; r < TM; r++) {
                const int i = i0 + ty + 16 * r;
                ii[r] = i < M ? i : M - 1;
#pragma unroll
                for (int c = 0; c < TN; c++) acc[r][c] = 0.f;
            }
#pragma unroll
            for (int c = 0; c < TN; c++) {
                const int j = j0 + tx + 16 * c;
                jj[c] = j < Nc ? j : Nc - 1;
            }
#pragma unroll 4
            for (int k = 0; k < K1; k++) {
                float av[TM], bv[TN];
#pragma unroll
                for (int r = 0; r < TM; r++) av[r] = fa1(ii[r], k);
#pragma unroll
                for (int c = 0; c < TN; c++) bv[c] = fb1(jj[c], k);
#pragma unroll
                for (int r = 0; r < TM; r++)
#pragma unroll
                    for (int c = 0; c < TN; c++) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
            }
#pragma unroll 4
            for (int k = 0; k < K2; k++) {
                float av[TM], bv[TN];
#pragma unroll
                for (int r = 0; r < TM; r++) av[r] = fa2(ii[r], k);
#pragma unroll
                for (int c = 0; c < TN; c++) bv[c] = fb2(jj[c], k);
#pragma unroll
                for (int r = 0; r < TM; r++)
#pragma unroll
                    for (int c = 0; c < TN; c++) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
            }
#pragma unroll
            for (int r = 0; r < TM; r++)
#pragma unroll
                for (int c = 0; c < TN; c++) {
                    const int i = i0 + ty + 16 * r, j = j0 + tx + 16 * c;
                    if (i < M && j < Nc) out(i, j, acc[r][c]);
                }
        }
}
template <int TM, int TN, typename FA, typename FB, typename FO>
__device__ __forceinline__ void block_mm(int M, int Nc, int K, FA fa, FB fb, FO out) {
    block_mm2<TM, TN>(M, Nc, K, fa, fb, 0, fa, fb, out);
}

// Loads rows 0..Q-1 of a [rows, width] bf16 slice into shared memory (row stride width + 2); rows >= q are zero.
// src(m) points at row m's first element in global memory (only called for m < q).
template <typename FSrc>
__device__ __forceinline__ void load_rows(bf16 *dst, int width, int q, FSrc src) {
    const int stride = width + 2;
    for (int idx = threadIdx.x; idx < SSD_Q * width; idx += SSD_THREADS) {
        const int m = idx / width, n = idx - m * width;
        dst[m * stride + n] = m < q ? src(m)[n] : __float2bfloat16_rn(0.f);
    }
}

// Deterministic block sum of one float per thread (all 256 threads call; result valid in every thread).
__device__ float block_sum(float v, float *red) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < SSD_THREADS / 32; i++) s += red[i];
    return s;
}

// ---------------------------------------------------------------------------------------------- forward pass
template <bool Y>
__global__ void __launch_bounds__(SSD_THREADS) ssd_fwd_kernel(SsdDev a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int N = (int)a.N, PT = a.PT, sN = N + 2, sP = PT + 2, sQ = SSD_Q + 1, sS = N + 1;
    const PassLayout lay = pass_layout(N, PT);
    bf16 *Cs = reinterpret_cast<bf16 *>(smem + lay.C), *Bs = reinterpret_cast<bf16 *>(smem + lay.B);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X);
    float *Ws = reinterpret_cast<float *>(smem + lay.W), *Ss = reinterpret_cast<float *>(smem + lay.S);
    const Scal sc = scal_at(smem + lay.scal, 8);

    const int64_t npt = a.P / PT;
    const int64_t bh = (int64_t)blockIdx.x / npt, p0 = ((int64_t)blockIdx.x % npt) * PT;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, P = a.P, G = a.G;
    const float Dh = a.D ? a.D[h] : 0.f;

    for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
        const int p = i / N, n = i - p * N;
        Ss[p * sS + n] = a.h0 ? a.h0[(bh * P + p0 + p) * a.N + n] : 0.f;
    }
    for (int64_t c = 0; c < a.nch; c++) {
        const int64_t t0 = c * SSD_Q;
        const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
        __syncthreads();  // the previous chunk's readers of every buffer are done
        if (threadIdx.x < 32) chunk_scalars(a, b, h, t0, q, sc);
        load_rows(Bs, N, q, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * a.N; });
        load_rows(Xs, PT, q, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * P + p0; });
        if (Y) load_rows(Cs, N, q, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * a.N; });
        __syncthreads();
        chunk_weights(sc);
        __syncthreads();
        if (Y) {
            // W[m,k] = (C_m . B_k) Lm[m,k] delta_k
            block_mm<4, 4>(
                SSD_Q, SSD_Q, N, [&](int m, int n) { return bf(Cs[m * sN + n]); },
                [&](int k, int n) { return bf(Bs[k * sN + n]); },
                [&](int m, int k, float acc) { Ws[m * sQ + k] = acc * decay_mk(sc, m, k) * sc.delta[k]; });
            __syncthreads();
            // y[m,p] = sum_k W[m,k] x[k,p] + din_m sum_n C[m,n] S[p,n] + D x[m,p]
            block_mm2<4, 2>(
                SSD_Q, PT, SSD_Q, [&](int m, int k) { return Ws[m * sQ + k]; },
                [&](int p, int k) { return bf(Xs[k * sP + p]); }, N,
                [&](int m, int n) { return sc.din[m] * bf(Cs[m * sN + n]); },
                [&](int p, int n) { return Ss[p * sS + n]; },
                [&](int m, int p, float acc) {
                    if (m < q) a.y[((b * L + t0 + m) * H + h) * P + p0 + p] =
                                   __float2bfloat16_rn(acc + Dh * bf(Xs[m * sP + p]));
                });
            __syncthreads();  // y read the state; it is updated below
        }
        // S[p,n] = dlast S[p,n] + sum_k w_k x[k,p] B[k,n]; the state entering the chunk is stored first (backward)
        const float dlast = sc.din[SSD_Q - 1];
        float *st = a.Sin ? a.Sin + ((bh * a.nch + c) * P + p0) * a.N : nullptr;
        block_mm<2, 8>(
            PT, N, SSD_Q, [&](int p, int k) { return sc.w[k] * bf(Xs[k * sP + p]); },
            [&](int n, int k) { return bf(Bs[k * sN + n]); },
            [&](int p, int n, float acc) {
                const float old = Ss[p * sS + n];
                if (st) st[(int64_t)p * N + n] = old;
                Ss[p * sS + n] = fmaf(dlast, old, acc);
            });
    }
    __syncthreads();
    if (a.h_last)
        for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
            const int p = i / N, n = i - p * N;
            a.h_last[(bh * P + p0 + p) * a.N + n] = Ss[p * sS + n];
        }
}

// ---------------------------------------------------------------------------------------------- state gradient pass
// dS (gradient w.r.t. the state leaving chunk c) for c = nch-1 .. 0, stored to dSo; then dS_in = dlast dS +
// sum_m din_m dy_m (x) C_m becomes the next (earlier) chunk's dS. dh0 = the final dS.
__global__ void __launch_bounds__(SSD_THREADS) ssd_dstate_kernel(SsdDev a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int N = (int)a.N, PT = a.PT, sN = N + 2, sP = PT + 2, sS = N + 1;
    const PassLayout lay = pass_layout(N, PT);
    bf16 *Cs = reinterpret_cast<bf16 *>(smem + lay.C), *DYs = reinterpret_cast<bf16 *>(smem + lay.X);
    float *Ss = reinterpret_cast<float *>(smem + lay.S);
    const Scal sc = scal_at(smem + lay.scal, 8);

    const int64_t npt = a.P / PT;
    const int64_t bh = (int64_t)blockIdx.x / npt, p0 = ((int64_t)blockIdx.x % npt) * PT;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, P = a.P, G = a.G;

    for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
        const int p = i / N, n = i - p * N;
        Ss[p * sS + n] = a.dhl ? a.dhl[(bh * P + p0 + p) * a.N + n] : 0.f;
    }
    for (int64_t c = a.nch - 1; c >= 0; c--) {
        const int64_t t0 = c * SSD_Q;
        const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
        __syncthreads();
        if (threadIdx.x < 32) chunk_scalars(a, b, h, t0, q, sc);
        load_rows(Cs, N, q, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * a.N; });
        load_rows(DYs, PT, q, [&](int m) { return a.dy + ((b * L + t0 + m) * H + h) * P + p0; });
        __syncthreads();
        chunk_weights(sc);
        __syncthreads();
        const float dlast = sc.din[SSD_Q - 1];
        float *st = a.dSo + ((bh * a.nch + c) * P + p0) * a.N;
        block_mm<2, 8>(
            PT, N, SSD_Q, [&](int p, int m) { return sc.din[m] * bf(DYs[m * sP + p]); },
            [&](int n, int m) { return bf(Cs[m * sN + n]); },
            [&](int p, int n, float acc) {
                const float old = Ss[p * sS + n];
                st[(int64_t)p * N + n] = old;
                Ss[p * sS + n] = fmaf(dlast, old, acc);
            });
    }
    __syncthreads();
    if (a.dh0)
        for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
            const int p = i / N, n = i - p * N;
            a.dh0[(bh * P + p0 + p) * a.N + n] = Ss[p * sS + n];
        }
}

// ---------------------------------------------------------------------------------------------- chunk gradients
// One block per (b, h, chunk). S0 = state entering the chunk (Sin), dS = gradient w.r.t. the state leaving it (dSo).
//   CB = C B^T, dG = dy x^T                                  [Q,Q]
//   W = CB Lm delta_k, V = dG Lm delta_k, E = dG CB Lm       [Q,Q] (elementwise)
//   dx  = D dy + w_k (B dS^T)[k,p] + W^T dy
//   dB  = w_k (x dS)[k,n] + V^T C
//   dC  = V B + din_m (dy S0)[m,n]
//   ddelta_k = Lm[Q-1,k] x_k.(B_k dS^T) + sum_m E[m,k]
//   d(cum) terms: tmp_m = din_m C_m.(dy S0)_m, u = dlast <dS, S0>, M[m,k] = E[m,k] delta_k (k < m) and the state's
//   M[Q-1,k] = w_k x_k.(B_k dS^T): da_j = sum_{m>=j} tmp_m + u + sum_{m>=j} sum_{k<j} M[m,k].
__global__ void __launch_bounds__(SSD_THREADS) ssd_bwd_chunk_kernel(SsdDev a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int P = (int)a.P, N = (int)a.N, sP = P + 2, sN = N + 2, sQ = SSD_Q + 1, sS = N + 1;
    const int sR = (P > N ? P : N) + 1;
    const ChunkLayout lay = chunk_layout(P, N);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X), *DYs = reinterpret_cast<bf16 *>(smem + lay.DY);
    bf16 *Bs = reinterpret_cast<bf16 *>(smem + lay.B), *Cs = reinterpret_cast<bf16 *>(smem + lay.C);
    float *CBs = reinterpret_cast<float *>(smem + lay.CB), *DGs = reinterpret_cast<float *>(smem + lay.DG);
    float *Es = reinterpret_cast<float *>(smem + lay.E), *Ss = reinterpret_cast<float *>(smem + lay.S);
    float *Rs = reinterpret_cast<float *>(smem + lay.R);
    const Scal sc = scal_at(smem + lay.scal, 16);

    const int64_t c = (int64_t)blockIdx.x % a.nch, bh = (int64_t)blockIdx.x / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, G = a.G, t0 = c * SSD_Q;
    const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
    const float Dh = a.D ? a.D[h] : 0.f, Ah = a.A[h];
    const int tid = threadIdx.x;

    if (tid < 32) chunk_scalars(a, b, h, t0, q, sc);
    load_rows(Xs, P, q, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * a.P; });
    load_rows(DYs, P, q, [&](int m) { return a.dy + ((b * L + t0 + m) * H + h) * a.P; });
    load_rows(Bs, N, q, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * a.N; });
    load_rows(Cs, N, q, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * a.N; });
    const float *S0g = a.Sin + (bh * a.nch + c) * a.P * a.N;
    const float *dSg = a.dSo + (bh * a.nch + c) * a.P * a.N;
    // dS into shared memory; u = <dS, S0> (S0 read from global here, once)
    float up = 0.f;
    for (int i = tid; i < P * N; i += SSD_THREADS) {
        const int p = i / N, n = i - p * N;
        const float d = dSg[i];
        Ss[p * sS + n] = d;
        up = fmaf(d, S0g[i], up);
    }
    __syncthreads();
    chunk_weights(sc);
    // CB = C B^T and dG = dy x^T
    block_mm<4, 4>(
        SSD_Q, SSD_Q, N, [&](int m, int n) { return bf(Cs[m * sN + n]); }, [&](int k, int n) { return bf(Bs[k * sN + n]); },
        [&](int m, int k, float acc) { CBs[m * sQ + k] = acc; });
    block_mm<4, 4>(
        SSD_Q, SSD_Q, P, [&](int m, int p) { return bf(DYs[m * sP + p]); },
        [&](int k, int p) { return bf(Xs[k * sP + p]); }, [&](int m, int k, float acc) { DGs[m * sQ + k] = acc; });
    const float u_raw = block_sum(up, sc.red);  // contains barriers: CB, dG, din, w are complete after it
    const float dlast = sc.din[SSD_Q - 1];
    const float u = dlast * u_raw;
    // W, V, E in place
    for (int i = tid; i < SSD_Q * SSD_Q; i += SSD_THREADS) {
        const int m = i / SSD_Q, k = i - m * SSD_Q;
        const float l = decay_mk(sc, m, k), cb = CBs[m * sQ + k], dg = DGs[m * sQ + k];
        CBs[m * sQ + k] = cb * l * sc.delta[k];  // W
        DGs[m * sQ + k] = dg * l * sc.delta[k];  // V
        Es[m * sQ + k] = dg * cb * l;            // E
    }
    // R = B dS^T  [k,p]
    block_mm<4, 4>(
        SSD_Q, P, N, [&](int k, int n) { return bf(Bs[k * sN + n]); }, [&](int p, int n) { return Ss[p * sS + n]; },
        [&](int k, int p, float acc) { Rs[k * sR + p] = acc; });
    __syncthreads();
    // xdsb_k = x_k . R_k
    if (tid < SSD_Q) {
        float s = 0.f;
        for (int p = 0; p < P; p++) s = fmaf(bf(Xs[tid * sP + p]), Rs[tid * sR + p], s);
        sc.xdsb[tid] = s;
    }
    // dx[k,p] = D dy[k,p] + w_k R[k,p] + sum_m W[m,k] dy[m,p]
    block_mm<4, 4>(
        SSD_Q, P, SSD_Q, [&](int k, int m) { return CBs[m * sQ + k]; }, [&](int p, int m) { return bf(DYs[m * sP + p]); },
        [&](int k, int p, float acc) {
            if (k < q)
                a.dx[((b * L + t0 + k) * H + h) * a.P + p] =
                    __float2bfloat16_rn(acc + sc.w[k] * Rs[k * sR + p] + Dh * bf(DYs[k * sP + p]));
        });
    __syncthreads();
    // R = x dS  [k,n]
    block_mm<4, 4>(
        SSD_Q, N, P, [&](int k, int p) { return bf(Xs[k * sP + p]); }, [&](int n, int p) { return Ss[p * sS + n]; },
        [&](int k, int n, float acc) { Rs[k * sR + n] = acc; });
    __syncthreads();
    // dB[k,n] = w_k R[k,n] + sum_m V[m,k] C[m,n]
    block_mm<4, 4>(
        SSD_Q, N, SSD_Q, [&](int k, int m) { return DGs[m * sQ + k]; }, [&](int n, int m) { return bf(Cs[m * sN + n]); },
        [&](int k, int n, float acc) {
            if (k < q) {
                const float v = fmaf(sc.w[k], Rs[k * sR + n], acc);
                if (a.rep == 1) a.dBm[((b * L + t0 + k) * G + g) * a.N + n] = __float2bfloat16_rn(v);
                else a.dBh[((b * L + t0 + k) * H + h) * a.N + n] = v;
            }
        });
    __syncthreads();
    // S0 into shared memory, R = dy S0  [m,n]
    for (int i = tid; i < P * N; i += SSD_THREADS) {
        const int p = i / N, n = i - p * N;
        Ss[p * sS + n] = S0g[i];
    }
    __syncthreads();
    block_mm<4, 4>(
        SSD_Q, N, P, [&](int m, int p) { return bf(DYs[m * sP + p]); }, [&](int n, int p) { return Ss[p * sS + n]; },
        [&](int m, int n, float acc) { Rs[m * sR + n] = acc; });
    __syncthreads();
    // tmp_m = din_m C_m . R_m
    if (tid < SSD_Q) {
        float s = 0.f;
        for (int n = 0; n < N; n++) s = fmaf(bf(Cs[tid * sN + n]), Rs[tid * sR + n], s);
        sc.tmp[tid] = sc.din[tid] * s;
    }
    // dC[m,n] = sum_k V[m,k] B[k,n] + din_m R[m,n]
    block_mm<4, 4>(
        SSD_Q, N, SSD_Q, [&](int m, int k) { return DGs[m * sQ + k]; }, [&](int n, int k) { return bf(Bs[k * sN + n]); },
        [&](int m, int n, float acc) {
            if (m < q) {
                const float v = fmaf(sc.din[m], Rs[m * sR + n], acc);
                if (a.rep == 1) a.dCm[((b * L + t0 + m) * G + g) * a.N + n] = __float2bfloat16_rn(v);
                else a.dCh[((b * L + t0 + m) * H + h) * a.N + n] = v;
            }
        });
    // ddelta_k = Lm[Q-1,k] xdsb_k + sum_{m>=k} E[m,k]   (column sums; Es is rewritten only after the barrier)
    if (tid < SSD_Q) {
        const int k = tid;
        float s = 0.f;
        for (int m = k; m < SSD_Q; m++) s += Es[m * sQ + k];
        sc.dd[k] = decay_mk(sc, SSD_Q - 1, k) * sc.xdsb[k] + s;
    }
    __syncthreads();
    // row prefixes of M: Es[m][j] = sum_{k<j} E[m,k] delta_k for j <= m, 0 for j > m
    if (tid < SSD_Q) {
        const int m = tid;
        float pre = 0.f;
        for (int j = 0; j < SSD_Q; j++) {
            const float e = Es[m * sQ + j];
            Es[m * sQ + j] = j <= m ? pre : 0.f;
            if (j < m) pre = fmaf(e, sc.delta[j], pre);
        }
    }
    __syncthreads();
    // da_j, ddt, and this block's partials of dA, ddt_bias, dD
    float pa = 0.f, pb = 0.f, pd = 0.f;
    if (tid < SSD_Q) {
        const int j = tid;
        float da = u;
        for (int m = SSD_Q - 1; m >= j; m--) da += sc.tmp[m] + Es[m * sQ + j];
        for (int k = 0; k < j; k++) da = fmaf(sc.w[k], sc.xdsb[k], da);
        const float dd = fmaf(da, Ah, sc.dd[j]);
        pa = da * sc.delta[j];
        if (j < q) {
            const float v = sc.v[j];
            const float graw = a.softplus ? (v > 20.f ? dd : dd / (1.f + expf(-v))) : dd;
            a.ddt[(b * L + t0 + j) * H + h] = __float2bfloat16_rn(graw);
            pb = graw;
            for (int p = 0; p < P; p++) pd = fmaf(bf(DYs[j * sP + p]), bf(Xs[j * sP + p]), pd);
        }
    }
    const float sa = block_sum(pa, sc.red);
    const float sb = block_sum(pb, sc.red);
    const float sd = block_sum(pd, sc.red);
    if (tid == 0) {
        const int64_t o = bh * a.nch + c;
        a.pA[o] = sa, a.pb[o] = sb, a.pD[o] = sd;
    }
}

// dA[h], dD[h], ddt_bias[h]: sums over (batch, chunk) in order, in fp64.
__global__ void ssd_param_reduce_kernel(SsdDev a, float *dA, float *dD, float *dbias) {
    const int64_t h = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= a.H) return;
    double sa = 0, sd = 0, sb = 0;
    for (int64_t b = 0; b < a.B; b++)
        for (int64_t c = 0; c < a.nch; c++) {
            const int64_t o = (b * a.H + h) * a.nch + c;
            sa += a.pA[o], sd += a.pD[o], sb += a.pb[o];
        }
    dA[h] = (float)sa;
    if (dD) dD[h] = (float)sd;
    if (dbias) dbias[h] = (float)sb;
}

// dBm/dCm [B,L,G,N] = sums over the heads of each group, in head order, of the per-head partials [B,L,H,N].
__global__ void ssd_group_reduce_kernel(SsdDev a) {
    const int64_t total = a.B * a.L * a.G * a.N;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = i % a.N, rest = i / a.N, gi = rest % a.G, bt = rest / a.G;
        float sbv = 0.f, scv = 0.f;
        for (int64_t r = 0; r < a.rep; r++) {
            const int64_t o = (bt * a.H + gi * a.rep + r) * a.N + n;
            sbv += a.dBh[o], scv += a.dCh[o];
        }
        a.dBm[i] = __float2bfloat16_rn(sbv);
        a.dCm[i] = __float2bfloat16_rn(scv);
    }
}

// ---------------------------------------------------------------------------------------------- host side
int check_shape(const SsdShape *s, char *err, size_t errlen, const char *who) {
    if (!s) return scan_fail(err, errlen, "%s: shape is NULL", who);
    if (s->batch < 1 || s->seqlen < 1 || s->nheads < 1 || s->ngroups < 1)
        return scan_fail(err, errlen, "%s: batch %lld, seqlen %lld, nheads %lld, ngroups %lld must all be >= 1", who,
                         (long long)s->batch, (long long)s->seqlen, (long long)s->nheads, (long long)s->ngroups);
    if (s->nheads % s->ngroups)
        return scan_fail(err, errlen, "%s: nheads %lld is not a multiple of ngroups %lld", who, (long long)s->nheads,
                         (long long)s->ngroups);
    if (s->headdim < 16 || s->headdim > 128 || s->headdim % 16)
        return scan_fail(err, errlen, "%s: headdim %lld unsupported (expected a multiple of 16 in [16, 128])", who,
                         (long long)s->headdim);
    if (s->dstate < 16 || s->dstate > 128 || s->dstate % 16)
        return scan_fail(err, errlen, "%s: dstate %lld unsupported (expected a multiple of 16 in [16, 128])", who,
                         (long long)s->dstate);
    return 0;
}

// rows of P per block of the sequential passes: 32, or 16 when (b, h, 32-row tiles) would not fill 2 blocks per SM
int pick_pt(const SsdShape *s) {
    int dev = 0, sms = 132;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (s->headdim % 32) return 16;
    return s->batch * s->nheads * (s->headdim / 32) >= 2 * (int64_t)sms ? 32 : 16;
}

int smem_ok(int64_t bytes, char *err, size_t errlen, const char *who) {
    int dev = 0, maxopt = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&maxopt, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e != cudaSuccess) return scan_fail(err, errlen, "%s: cannot query the device: %s", who, cudaGetErrorString(e));
    if (bytes > maxopt)
        return scan_fail(err, errlen, "%s: needs %lld bytes of shared memory per block, the device allows %d", who,
                         (long long)bytes, maxopt);
    return 0;
}

template <typename K>
int set_smem(K kernel, int64_t bytes, char *err, size_t errlen, const char *who) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) return scan_fail(err, errlen, "%s: cudaFuncSetAttribute: %s", who, cudaGetErrorString(e));
    return 0;
}

SsdDev make_args(const SsdShape *s) {
    SsdDev a;
    memset(&a, 0, sizeof a);
    a.B = s->batch, a.L = s->seqlen, a.H = s->nheads, a.P = s->headdim, a.N = s->dstate, a.G = s->ngroups;
    a.rep = s->nheads / s->ngroups;
    a.nch = (s->seqlen + SSD_Q - 1) / SSD_Q;
    a.softplus = s->dt_softplus;
    a.PT = pick_pt(s);
    return a;
}

struct BwdWs {
    size_t Sin, dSo, pA, pD, pb, dBh, dCh, total;  // byte offsets
};
BwdWs bwd_ws(const SsdShape *s) {
    const size_t nch = (size_t)((s->seqlen + SSD_Q - 1) / SSD_Q);
    const size_t states = (size_t)s->batch * s->nheads * nch * s->headdim * s->dstate * 4;
    const size_t parts = (size_t)s->batch * s->nheads * nch * 4;
    const size_t heads = s->ngroups < s->nheads ? (size_t)s->batch * s->seqlen * s->nheads * s->dstate * 4 : 0;
    auto up = [](size_t v) { return (v + 255) & ~(size_t)255; };
    BwdWs w;
    size_t o = 0;
    w.Sin = o, o = up(o + states);
    w.dSo = o, o = up(o + states);
    w.pA = o, o = up(o + parts);
    w.pD = o, o = up(o + parts);
    w.pb = o, o = up(o + parts);
    w.dBh = o, o = up(o + heads);
    w.dCh = o, o = up(o + heads);
    w.total = o;
    return w;
}

}  // namespace

extern "C" int ssd_fwd_cuda(const SsdShape *s, const uint16_t *x, const uint16_t *dt, const float *A,
                            const uint16_t *Bm, const uint16_t *Cm, const float *D, const float *dt_bias,
                            const uint8_t *reset, const float *h0, uint16_t *y, float *h_last, ssd_stream_t stream,
                            char *err, size_t errlen) {
    const char *who = "ssd_fwd_cuda";
    if (check_shape(s, err, errlen, who)) return -1;
    if (!x || !dt || !A || !Bm || !(y || h_last))
        return scan_fail(err, errlen, "%s: x, dt, A, Bm and one of y / h_last are required", who);
    if (y && !Cm) return scan_fail(err, errlen, "%s: Cm is required for y", who);
    SsdDev a = make_args(s);
    a.x = (const bf16 *)x, a.dt = (const bf16 *)dt, a.Bm = (const bf16 *)Bm, a.Cm = (const bf16 *)Cm;
    a.A = A, a.D = D, a.bias = dt_bias, a.reset = reset, a.h0 = h0;
    a.y = (bf16 *)y, a.h_last = h_last;
    const int64_t blocks = a.B * a.H * (a.P / a.PT);
    if (blocks > 0x7fffffff) return scan_fail(err, errlen, "%s: %lld blocks exceed the grid limit", who, (long long)blocks);
    const int64_t smem = pass_layout(a.N, a.PT).total;
    if (smem_ok(smem, err, errlen, who)) return -1;
    cudaStream_t st = (cudaStream_t)stream;
    if (y) {
        if (set_smem(ssd_fwd_kernel<true>, smem, err, errlen, who)) return -1;
        ssd_fwd_kernel<true><<<(unsigned)blocks, SSD_THREADS, (size_t)smem, st>>>(a);
    } else {
        if (set_smem(ssd_fwd_kernel<false>, smem, err, errlen, who)) return -1;
        ssd_fwd_kernel<false><<<(unsigned)blocks, SSD_THREADS, (size_t)smem, st>>>(a);
    }
    return scan_launch_check(err, errlen, who);
}

extern "C" size_t ssd_bwd_cuda_workspace(const SsdShape *s) { return bwd_ws(s).total; }

extern "C" int ssd_bwd_cuda(const SsdShape *s, const uint16_t *x, const uint16_t *dt, const float *A,
                            const uint16_t *Bm, const uint16_t *Cm, const float *D, const float *dt_bias,
                            const uint8_t *reset, const float *h0, const uint16_t *dy, const float *dh_last,
                            uint16_t *dx, uint16_t *ddt, float *dA, uint16_t *dBm, uint16_t *dCm, float *dD,
                            float *ddt_bias, float *dh0, void *workspace, ssd_stream_t stream, char *err,
                            size_t errlen) {
    const char *who = "ssd_bwd_cuda";
    if (check_shape(s, err, errlen, who)) return -1;
    if (!x || !dt || !A || !Bm || !Cm || !dy || !dx || !ddt || !dA || !dBm || !dCm || !workspace)
        return scan_fail(err, errlen, "%s: x, dt, A, Bm, Cm, dy, dx, ddt, dA, dBm, dCm and workspace are required", who);
    if ((uintptr_t)workspace % 256) return scan_fail(err, errlen, "%s: workspace is not 256-byte aligned", who);
    SsdDev a = make_args(s);
    a.x = (const bf16 *)x, a.dt = (const bf16 *)dt, a.Bm = (const bf16 *)Bm, a.Cm = (const bf16 *)Cm;
    a.dy = (const bf16 *)dy;
    a.A = A, a.D = D, a.bias = dt_bias, a.reset = reset, a.h0 = h0, a.dhl = dh_last;
    a.dx = (bf16 *)dx, a.ddt = (bf16 *)ddt, a.dBm = (bf16 *)dBm, a.dCm = (bf16 *)dCm;
    a.dh0 = h0 ? dh0 : nullptr;
    const BwdWs w = bwd_ws(s);
    char *ws = (char *)workspace;
    a.Sin = (float *)(ws + w.Sin), a.dSo = (float *)(ws + w.dSo);
    a.pA = (float *)(ws + w.pA), a.pD = (float *)(ws + w.pD), a.pb = (float *)(ws + w.pb);
    if (a.rep > 1) a.dBh = (float *)(ws + w.dBh), a.dCh = (float *)(ws + w.dCh);

    const int64_t pass_blocks = a.B * a.H * (a.P / a.PT), chunk_blocks = a.B * a.H * a.nch;
    if (chunk_blocks > 0x7fffffff)
        return scan_fail(err, errlen, "%s: %lld blocks exceed the grid limit", who, (long long)chunk_blocks);
    const int64_t smem_pass = pass_layout(a.N, a.PT).total, smem_chunk = chunk_layout(a.P, a.N).total;
    if (smem_ok(smem_pass > smem_chunk ? smem_pass : smem_chunk, err, errlen, who)) return -1;
    if (set_smem(ssd_fwd_kernel<false>, smem_pass, err, errlen, who) ||
        set_smem(ssd_dstate_kernel, smem_pass, err, errlen, who) ||
        set_smem(ssd_bwd_chunk_kernel, smem_chunk, err, errlen, who))
        return -1;
    cudaStream_t st = (cudaStream_t)stream;
    // 1. states entering every chunk (forward recompute, no y)
    ssd_fwd_kernel<false><<<(unsigned)pass_blocks, SSD_THREADS, (size_t)smem_pass, st>>>(a);
    if (scan_launch_check(err, errlen, "ssd_bwd_cuda: state pass")) return -1;
    // 2. state gradients leaving every chunk, dh0
    ssd_dstate_kernel<<<(unsigned)pass_blocks, SSD_THREADS, (size_t)smem_pass, st>>>(a);
    if (scan_launch_check(err, errlen, "ssd_bwd_cuda: state-gradient pass")) return -1;
    // 3. per-chunk gradients
    ssd_bwd_chunk_kernel<<<(unsigned)chunk_blocks, SSD_THREADS, (size_t)smem_chunk, st>>>(a);
    if (scan_launch_check(err, errlen, "ssd_bwd_cuda: chunk gradients")) return -1;
    // 4. fixed-order reductions
    ssd_param_reduce_kernel<<<(unsigned)((a.H + 127) / 128), 128, 0, st>>>(a, dA, D ? dD : nullptr,
                                                                           dt_bias ? ddt_bias : nullptr);
    if (scan_launch_check(err, errlen, "ssd_bwd_cuda: parameter reduction")) return -1;
    if (a.rep > 1) {
        const int64_t total = a.B * a.L * a.G * a.N;
        int64_t blocks = (total + 255) / 256;
        if (blocks > 65536) blocks = 65536;
        ssd_group_reduce_kernel<<<(unsigned)blocks, 256, 0, st>>>(a);
        if (scan_launch_check(err, errlen, "ssd_bwd_cuda: group reduction")) return -1;
    }
    return 0;
}
