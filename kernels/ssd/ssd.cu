// ssd.cu: CUDA kernels of the chunked Mamba-2 SSD scan (math and layouts: ssd.h; API: ssd_cuda.h).
//
// Chunks of Q = 64 tokens. Per (batch b, head h) and chunk, with delta_t, a_j = delta_j A, lastr_m = the last reset
// at a position <= m (-1: none):
//   Lm[m,k]  = exp(sum_{j=k+1..m} a_j) for lastr_m <= k <= m, else 0  (decay from token k to token m)
//   din_m    = exp(sum_{j<=m} a_j) if lastr_m < 0 else 0              (decay of the incoming state)
//   w_k      = Lm[Q-1,k] delta_k,  dlast = din_{Q-1}                  (padded tokens: delta 0, x = B = C = 0)
//   y_m      = sum_k (C_m.B_k) Lm[m,k] delta_k x_k + din_m S_in C_m + D x_m
//   S_out    = dlast S_in + sum_k w_k x_k (x) B_k
// Interval sums are formed from partial sums that each lie inside the interval (never as a difference of two chunk
// cumsums: kernels.md §8.4's overflow cannot occur, and a small interval after large steps keeps its precision).
//
// Kernels (one block = 256 threads = 8 warps; every contraction on tensor cores, WMMA 16x16x16 or mma.sync m16n8k16
// bf16 tiles with fp32 accumulation, fp32 operands split into bf16 hi + lo: see "tensor-core tiles" below). Seven
// generations, chosen by DISTILL_SSD (docs/KERNELS.md says why and what each costs); ssd_param_reduce_kernel and
// ssd_group_reduce_kernel serve all of them:
//   v4            v3's scalars kernel and state passes (the backward's two in one launch: ssd_state_pass_both_kernel),
//                 ssd_chunk_out4_kernel (y per (b, h, chunk)), and the chunk gradients split in ssd_bwd_bc_kernel (dB,
//                 dC) and ssd_bwd_dx_kernel (dx, ddt), all three on mma.sync with register-resident outputs.
//   v5            v4 with half the fp32 states: the passes (HALF) store the state every 128 tokens (entering even
//                 chunks; the state gradient leaving odd ones), and the per-chunk kernels (R5) rebuild the state at the
//                 64-token midpoint from the neighbouring chunk's tiles on tensor cores (recon16), inside the products
//                 that read it. Same per-chunk math as v4; the states move through HBM half as often.
//   v6            v4 with the fp32 state loads of ssd_chunk_out4_kernel and ssd_bwd_dx_kernel issued at the kernel's
//                 start and several k steps ahead (PF, StatePf), ssd_bwd_bc_kernel's first ones at its start (N = 128),
//                 and fewer barriers: none between chunk_weights and the Q x Q slabs (which need chunk_scalars only),
//                 dx/ddt's row sums in E's dead region (no barrier between tj and the products) and its dD partial
//                 before the xdsb barrier. Same operations in the same order: the same bits as v4.
//   v7 (default)  v6 with the state passes on mma.sync + ldmatrix (state_pass7: the fp32 weight split in registers
//                 inside the A fragments, one barrier per chunk, 3 blocks per SM where that saves a wave) at the
//                 compiled shapes (P 128, N 128 or 64); v6's per-chunk kernels. Not v6's bits (same precision).
//   v3            ssd_scalars_kernel (w, din, dlast per chunk position), ssd_state_pass_kernel (one block per
//                 (b, h, state tile) walking the chunks with the tile in accumulators, 4 chunks in flight; forward
//                 and, reversed, the state gradient), ssd_chunk_out_kernel (y per (b, h, chunk, 64 rows of P)).
//   v2            ssd_chunk_state_kernel (each chunk's own state contribution, in parallel) + ssd_scan_kernel (an
//                 in-place elementwise scan over the chunks) instead of the sequential pass; same y kernel.
//   v1            ssd_fwd_kernel<Y> (one block per (b, h, 16 rows of P), sequential over chunks, y inside) and
//                 ssd_dstate_kernel (the state-gradient walk), states in shared memory.
//   v1-v3         ssd_bwd_chunk_kernel: one block per (b, h, chunk), all of P and N: every gradient of the chunk's
//                 tokens from the state entering it and the gradient leaving it, and per-block partials of dA, dD,
//                 ddt_bias. The reductions: fixed-order sums over (batch, chunk) and over the heads of a group (G < H).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "kernels/scan/scan_common.cuh"
#include "kernels/ssd/ssd_cuda.h"

#define SSD_Q SSD_CUDA_CHUNK
#define SSD_THREADS 256
#define SSD_PT 16  // rows of P per block in the sequential passes
#define SSD_SCAL 18  // arrays of Q floats of per-chunk scalars

using namespace nvcuda;

namespace {

// ---------------------------------------------------------------------------------------------- arguments
struct SsdDev {
    int64_t B, L, H, P, N, G, rep, nch;
    int softplus, PT;  // PT: rows of P per block in the sequential passes
    int vec;           // x, dy, Bm, Cm 16-byte aligned: 16-byte loads
    const bf16 *x, *dt, *Bm, *Cm, *dy;
    const float *A, *D, *bias, *h0, *dhl;
    const uint8_t *reset;
    bf16 *y, *dx, *ddt, *dBm, *dCm;  // dBm/dCm: bf16 [B,L,G,N] when rep == 1
    float *h_last, *Sin, *dSo;       // Sin, dSo: [B,H,nch,P,N]
    float *dBh, *dCh;                // rep > 1: fp32 per-head partials [B,L,H,N]
    float *pA, *pD, *pb;             // [B,H,nch] partial sums
    float *dh0;
    float *dl;        // v2, v3: [B,H,nch] decay of the whole chunk (dlast)
    float *wv, *dv;   // v3: [B,H,nch,Q] w and din of every chunk position
    int yvec;   // v2: y 4-byte aligned: bf16 pairs
    int ovec;   // v4: dx, dBm, dCm 4-byte aligned: bf16 pairs
    float *tw, *uw;  // v4 backward: [B,H,nch,Q] tmp_m and [B,H,nch] u of every chunk (ssd_bwd_bc_kernel's)
};

__device__ __forceinline__ float bf(bf16 v) { return __bfloat162float(v); }

// ---------------------------------------------------------------------------------------------- shared layouts
// Row strides: bf16 rows of n + 8 elements (WMMA needs a multiple of 8; the extra 16 bytes stagger the rows over the
// banks), fp32 rows of n + 4 (WMMA needs a multiple of 4). Buffers start on 128-byte boundaries, so every 16 x 16
// tile starts on a 32-byte boundary as WMMA requires.
__host__ __device__ constexpr int64_t ld16(int64_t n) { return n + 8; }
__host__ __device__ constexpr int64_t ld32(int64_t n) { return n + 4; }
__host__ __device__ inline int64_t al128(int64_t v) { return (v + 127) & ~(int64_t)127; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
// Consecutive regions of a shared-memory buffer, each starting on a 128-byte boundary.
struct Carve {
    int64_t o = 0;
    __host__ __device__ int64_t take(int64_t bytes) {
        const int64_t at = o;
        o = al128(o + bytes);
        return at;
    }
};

struct FwdLayout {  // ssd_fwd_kernel; W* and WB* share one region (W is dead when WB is formed), Y1/Y2 and T another
    int64_t C, B, X, Wf, Wh, Wl, WBh, WBl, Sf, Sh, Sl, Y1, Y2, T, scal, total;
};
__host__ __device__ inline FwdLayout fwd_layout(int64_t N) {
    const int64_t Q = SSD_Q, PT = SSD_PT;
    FwdLayout l;
    int64_t o = 0;
    l.C = o, o = al128(o + Q * ld16(N) * 2);
    l.B = o, o = al128(o + Q * ld16(N) * 2);
    l.X = o, o = al128(o + Q * ld16(PT) * 2);
    const int64_t r1 = o;
    l.Wf = r1, l.Wh = al128(l.Wf + Q * ld32(Q) * 4), l.Wl = al128(l.Wh + Q * ld16(Q) * 2);
    l.WBh = r1, l.WBl = al128(l.WBh + Q * ld16(N) * 2);
    o = max64(al128(l.Wl + Q * ld16(Q) * 2), al128(l.WBl + Q * ld16(N) * 2));
    l.Sf = o, o = al128(o + PT * ld32(N) * 4);
    l.Sh = o, o = al128(o + PT * ld16(N) * 2);
    l.Sl = o, o = al128(o + PT * ld16(N) * 2);
    const int64_t r2 = o;
    l.Y1 = r2, l.Y2 = al128(l.Y1 + Q * ld32(PT) * 4);
    l.T = r2;
    o = max64(al128(l.Y2 + Q * ld32(PT) * 4), al128(l.T + PT * ld32(N) * 4));
    l.scal = o, o = al128(o + SSD_SCAL * Q * 4);
    l.total = o;
    return l;
}

struct DstLayout {  // ssd_dstate_kernel
    int64_t DY, DCh, DCl, Sf, T, scal, total;
};
__host__ __device__ inline DstLayout dst_layout(int64_t N) {
    const int64_t Q = SSD_Q, PT = SSD_PT;
    DstLayout l;
    Carve c;
    l.DY = c.take(Q * ld16(PT) * 2);
    l.DCh = c.take(Q * ld16(N) * 2);
    l.DCl = c.take(Q * ld16(N) * 2);
    l.Sf = c.take(PT * ld32(N) * 4);
    l.T = c.take(PT * ld32(N) * 4);
    l.scal = c.take(SSD_SCAL * Q * 4);
    l.total = c.o;
    return l;
}

struct ChunkLayout {  // ssd_bwd_chunk_kernel; CB (fp32) then W hi/lo share a region, as do dG and V; E lives in R
    int64_t X, DY, B, C, CB, Wh, Wl, DG, Vh, Vl, Sh, Sl, R, scal, total;
};
__host__ __device__ inline ChunkLayout chunk_layout(int64_t P, int64_t N) {
    const int64_t Q = SSD_Q, PN = max64(P, N);
    ChunkLayout l;
    int64_t o = 0;
    l.X = o, o = al128(o + Q * ld16(P) * 2);
    l.DY = o, o = al128(o + Q * ld16(P) * 2);
    l.B = o, o = al128(o + Q * ld16(N) * 2);
    l.C = o, o = al128(o + Q * ld16(N) * 2);
    const int64_t wv = max64(al128(Q * ld32(Q) * 4), 2 * al128(Q * ld16(Q) * 2));
    l.CB = o, l.Wh = o, l.Wl = o + al128(Q * ld16(Q) * 2), o += wv;
    l.DG = o, l.Vh = o, l.Vl = o + al128(Q * ld16(Q) * 2), o += wv;
    l.Sh = o, o = al128(o + P * ld16(N) * 2);
    l.Sl = o, o = al128(o + P * ld16(N) * 2);
    l.R = o, o = al128(o + max64(Q * ld32(PN), Q * (Q + 1) + 8 * Q) * 4);  // R, or E [Q, Q+1] and 2 x [4, Q]
    l.scal = o, o = al128(o + SSD_SCAL * Q * 4);
    l.total = o;
    return l;
}

// Per-chunk scalars in shared memory: SSD_SCAL arrays of Q floats (lastr: ints). a_j = delta_j A; the decay sums
// use sub-blocks of 8 tokens: pre_m = sum of a over m's sub-block up to m, suf_k = sum of a over k's sub-block after
// k, btw[kb*8 + mb] = sum of the sub-block totals strictly between kb and mb, bp[mb] = sum of the totals before mb.
struct Scal {
    float *delta, *v, *din, *w, *a, *pre, *suf, *btw, *bp, *xdsb, *tmp, *dd, *tj;
    float *epre, *esuf, *ebtw;  // exp of pre, suf, btw
    float *sc2;  // v5: the partner chunk's w (or din), for a state reconstructed at the 64-token midpoint
    int *lastr;
    float *red;  // 32 floats of reduction scratch
};
__device__ inline Scal scal_at(unsigned char *p) {
    float *f = reinterpret_cast<float *>(p);
    Scal s;
    s.delta = f, s.v = f + SSD_Q, s.din = f + 2 * SSD_Q, s.w = f + 3 * SSD_Q;
    s.lastr = reinterpret_cast<int *>(f + 4 * SSD_Q);
    s.red = f + 5 * SSD_Q, s.bp = s.red + 32;  // 32 + 9 floats
    s.a = f + 6 * SSD_Q, s.pre = f + 7 * SSD_Q, s.suf = f + 8 * SSD_Q, s.btw = f + 9 * SSD_Q;
    s.xdsb = f + 10 * SSD_Q, s.tmp = f + 11 * SSD_Q, s.dd = f + 12 * SSD_Q, s.tj = f + 13 * SSD_Q;
    s.epre = f + 14 * SSD_Q, s.esuf = f + 15 * SSD_Q, s.ebtw = f + 16 * SSD_Q;
    s.sc2 = f + 17 * SSD_Q;
    return s;
}

// ---------------------------------------------------------------------------------------------- chunk scalars
__device__ __forceinline__ float softplus_acc(float v) { return v > 20.f ? v : log1pf(expf(v)); }

// Warp 0 only. delta, a = delta*A, lastr (last reset at a position <= m, -1 if none), v = dt + dt_bias and the
// sub-block sums for positions 0..Q-1 of chunk t0 (q real tokens; the rest is padding: delta 0). Every decay is then
// the exp of a sum of terms that each cover part of its own interval (all <= 0): its rounding is relative to the
// interval's sum, never to a whole-chunk cumulative sum (a difference of two large cumsums would lose the small ones).
__device__ void chunk_scalars(const SsdDev &a, int64_t b, int64_t h, int64_t t0, int q, const Scal &sc) {
    const int lane = threadIdx.x & 31;
    const float Ah = a.A[h], bias = a.bias ? a.bias[h] : 0.f;
    int rp[2];
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int m = 2 * lane + e;
        float v = 0.f, d = 0.f;
        rp[e] = -1;
        if (m < q) {
            const int64_t t = t0 + m;
            v = bf(a.dt[(b * a.L + t) * a.H + h]) + bias;
            d = a.softplus ? softplus_acc(v) : v;
            if (a.reset && a.reset[b * a.L + t]) rp[e] = m;
        }
        sc.v[m] = v;
        sc.delta[m] = d;
        sc.a[m] = d * Ah;
    }
    int mx = rp[0] > rp[1] ? rp[0] : rp[1];
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        const int mo = __shfl_up_sync(0xffffffffu, mx, off);
        if (lane >= off) mx = mo > mx ? mo : mx;
    }
    int exm = __shfl_up_sync(0xffffffffu, mx, 1);
    if (lane == 0) exm = -1;
    const int l0 = exm > rp[0] ? exm : rp[0];
    sc.lastr[2 * lane] = l0;
    sc.lastr[2 * lane + 1] = l0 > rp[1] ? l0 : rp[1];
    __syncwarp();
    if (lane < SSD_Q / 8) {  // sub-block `lane`: prefix and suffix sums
        const int s0 = lane * 8;
        float p = 0.f, f = 0.f;
        for (int j = 0; j < 8; j++) p += sc.a[s0 + j], sc.pre[s0 + j] = p;
        for (int j = 7; j >= 0; j--) sc.suf[s0 + j] = f, f += sc.a[s0 + j];
    }
    __syncwarp();
    if (lane < SSD_Q / 8) {  // row kb = lane of btw
        float acc = 0.f;
        for (int mb = 0; mb < SSD_Q / 8; mb++) {
            sc.btw[lane * 8 + mb] = mb > lane ? acc : 0.f;
            if (mb > lane) acc += sc.pre[mb * 8 + 7];
        }
    } else if (lane == 31) {
        float acc = 0.f;
        for (int mb = 0; mb <= SSD_Q / 8; mb++) {
            sc.bp[mb] = acc;
            if (mb < SSD_Q / 8) acc += sc.pre[mb * 8 + 7];
        }
    }
    __syncwarp();
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int i = 2 * lane + e;
        sc.epre[i] = expf(sc.pre[i]);
        sc.esuf[i] = expf(sc.suf[i]);
        sc.ebtw[i] = expf(sc.btw[i]);
    }
}

// sum_{j=k+1..m} a_j for k <= m (<= 0)
__device__ __forceinline__ float interval_sum(const Scal &sc, int k, int m) {
    const int kb = k >> 3, mb = m >> 3;
    if (kb == mb) {
        float s = 0.f;
        for (int j = k + 1; j <= m; j++) s += sc.a[j];
        return s;
    }
    return sc.suf[k] + sc.btw[kb * 8 + mb] + sc.pre[m];
}

// decay from token k to token m of the chunk (0 when k > m or a reset lies in (k, m]). Across sub-blocks it is the
// product of the exps of the three partial sums (each <= 0, so a factor underflows only when the whole does).
__device__ __forceinline__ float decay_mk(const Scal &sc, int m, int k) {
    if (k > m || k < sc.lastr[m]) return 0.f;
    const int kb = k >> 3, mb = m >> 3;
    if (kb == mb) return expf(fminf(interval_sum(sc, k, m), 0.f));
    return sc.esuf[k] * sc.ebtw[kb * 8 + mb] * sc.epre[m];
}

// After chunk_scalars and a barrier: din_m = exp(sum_{j<=m} a_j) (0 after a reset) and w_k (threads 0..Q-1).
__device__ __forceinline__ void chunk_weights(const Scal &sc) {
    const int m = threadIdx.x;
    if (m < SSD_Q) {
        sc.din[m] = sc.lastr[m] < 0 ? expf(fminf(sc.bp[m >> 3] + sc.pre[m], 0.f)) : 0.f;
        sc.w[m] = decay_mk(sc, SSD_Q - 1, m) * sc.delta[m];
    }
}

// ---------------------------------------------------------------------------------------------- tensor-core tiles
// Every contraction multiplies an exact bf16 operand (x, dy, B, C: the inputs) by either another one (C B^T, dy x^T:
// exact products) or an fp32 operand v (decay-weighted matrices, states), which enters as two bf16 terms
// v = hi + lo (hi = bf16(v), lo = bf16(v - hi)): the product keeps ~16 bits of v, against bf16's 8 (~1e-5 relative),
// for twice the (cheap) MMAs. Accumulation is fp32.
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;

// (__fsub_rn: never fused with a product that forms v, so every kernel splits a value into the same bits)
__device__ __forceinline__ void split_bf(float v, bf16 *hi, bf16 *lo) {
    const bf16 hv = __float2bfloat16_rn(v);
    *hi = hv;
    *lo = __float2bfloat16_rn(__fsub_rn(v, __bfloat162float(hv)));
}

// bf16 fragment loads from shared memory through the PTX instruction with the .shared state space: the WMMA header's
// bf16 loads come out as generic 32-bit loads (4 LD per fragment and thread, through the generic-address path; seen
// in the SASS of the first kernels), while this gives shared-memory loads. Same fragment layout: it is the same PTX
// family as the wmma.mma the fragments feed.
template <typename Use, typename Layout>
__device__ __forceinline__ void ldfrag(wmma::fragment<Use, 16, 16, 16, bf16, Layout> &f, const bf16 *p, unsigned ld) {
    static_assert(sizeof(f.x) == 16, "bf16 16x16x16 operand fragments hold 4 registers");
    unsigned *r = reinterpret_cast<unsigned *>(&f.x[0]);
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    constexpr bool isa = std::is_same<Use, wmma::matrix_a>::value, row = std::is_same<Layout, wmma::row_major>::value;
    if (isa && row)
        asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld) : "memory");
    else if (isa)
        asm volatile("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld) : "memory");
    else if (row)
        asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld) : "memory");
    else
        asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a), "r"(ld) : "memory");
}

// acc += A[i0:i0+16, k0:k1] B[k0:k1, j0:j0+16], k0 and k1 multiples of 16. A row_major: element (i,k) at
// A[i*lda + k], col_major: at A[k*lda + i]; B row_major: (k,j) at B[k*ldb + j], col_major: at B[j*ldb + k].
// Triangular operands (W, V: zero for k > m) pass only the k range that can be nonzero.
template <typename LA, typename LB>
__device__ __forceinline__ void mma_k(Acc &acc, const bf16 *A, int lda, const bf16 *B, int ldb, int i0, int j0, int k0,
                                      int k1) {
    constexpr bool ra = std::is_same<LA, wmma::row_major>::value, rb = std::is_same<LB, wmma::row_major>::value;
    for (int k = k0; k < k1; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fb;
        ldfrag(fa, ra ? A + i0 * lda + k : A + k * lda + i0, lda);
        ldfrag(fb, rb ? B + k * ldb + j0 : B + j0 * ldb + k, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
    }
}

// Every 16 x 16 tile of an M x Nc fp32 row-major matrix C (ldc), dealt to the 8 warps in turn:
// C = terms (load = false) or C += terms (load = true: in place). Warp-uniform; no block barrier inside.
template <typename F>
__device__ __forceinline__ void block_tiles(int M, int Nc, float *C, int ldc, bool load, F terms) {
    const int warp = threadIdx.x >> 5, nt = Nc / 16, total = (M / 16) * nt;
    for (int t = warp; t < total; t += SSD_THREADS / 32) {
        const int i0 = (t / nt) * 16, j0 = (t % nt) * 16;
        Acc acc;
        if (load) wmma::load_matrix_sync(acc, C + i0 * ldc + j0, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(acc, 0.f);
        terms(acc, i0, j0);
        wmma::store_matrix_sync(C + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
    }
}

// C (M x Nc fp32, ldc; = or += as block_tiles) = A[:, 0:K] (Bh + Bl)[0:K, :]: an exact bf16 A times an fp32 operand
// given as hi + lo. When the tile columns divide the 8 warps, every warp's tiles share one column block j0, so the
// warp loads each B fragment (hi and lo) once per k step for all of its (up to 4) row tiles instead of once per tile;
// otherwise it falls back to block_tiles. (The hi and lo products alternate per k step.)
template <typename LA, typename LB>
__device__ __forceinline__ void block_tiles_hilo(int M, int Nc, float *C, int ldc, bool load, const bf16 *A, int lda,
                                                 const bf16 *Bh, const bf16 *Bl, int ldb, int K) {
    constexpr bool ra = std::is_same<LA, wmma::row_major>::value, rb = std::is_same<LB, wmma::row_major>::value;
    constexpr int W = SSD_THREADS / 32, MAXR = 4;
    const int warp = threadIdx.x >> 5, nt = Nc / 16, total = (M / 16) * nt;
    if (W % nt != 0 || total > W * MAXR) {
        block_tiles(M, Nc, C, ldc, load, [&](Acc &acc, int i0, int j0) {
            mma_k<LA, LB>(acc, A, lda, Bh, ldb, i0, j0, 0, K);
            mma_k<LA, LB>(acc, A, lda, Bl, ldb, i0, j0, 0, K);
        });
        return;
    }
    const int j0 = (warp % nt) * 16;  // t = warp + W r: column (t % nt) is the same for every r
    Acc acc[MAXR];
#pragma unroll
    for (int r = 0; r < MAXR; r++) {
        const int t = warp + W * r;
        if (t >= total) break;
        const int i0 = (t / nt) * 16;
        if (load) wmma::load_matrix_sync(acc[r], C + i0 * ldc + j0, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(acc[r], 0.f);
    }
    for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fh, fl;
        ldfrag(fh, rb ? Bh + k * ldb + j0 : Bh + j0 * ldb + k, ldb);
        ldfrag(fl, rb ? Bl + k * ldb + j0 : Bl + j0 * ldb + k, ldb);
#pragma unroll
        for (int r = 0; r < MAXR; r++) {
            const int t = warp + W * r;
            if (t >= total) break;
            const int i0 = (t / nt) * 16;
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
            ldfrag(fa, ra ? A + i0 * lda + k : A + k * lda + i0, lda);
            wmma::mma_sync(acc[r], fa, fh, acc[r]);
            wmma::mma_sync(acc[r], fa, fl, acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < MAXR; r++) {
        const int t = warp + W * r;
        if (t >= total) break;
        wmma::store_matrix_sync(C + ((t / nt) * 16) * ldc + j0, acc[r], ldc, wmma::mem_row_major);
    }
}

// Loads rows 0..Q-1 of a [rows, width] bf16 slice into shared memory (row stride ld); rows >= q are zero.
// src(m) points at row m's first element in global memory (only called for m < q). vec: 16-byte copies (width % 8
// == 0, ld % 8 == 0, rows 16-byte aligned in global memory: the host checks the base pointers).
// The loads of a batch are all issued before any of its shared-memory stores: the compiler cannot move a global load
// above a store through another generic pointer (they might alias), so a load-store loop would wait one full memory
// latency per iteration (measured: most of the first kernels' time).
template <typename FSrc>
__device__ __forceinline__ void load_rows(bf16 *dst, int width, int ld, int q, bool vec, FSrc src) {
    if (vec) {
        constexpr int U = 4;  // 16-byte loads in flight per thread (a [64, 128] tile: all of it)
        const int wv = width / 8, total = SSD_Q * wv;
        for (int base = threadIdx.x; base < total; base += U * SSD_THREADS) {
            uint4 v[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int idx = base + u * SSD_THREADS, m = idx / wv, n = (idx - m * wv) * 8;
                v[u] = make_uint4(0u, 0u, 0u, 0u);
                if (idx < total && m < q) v[u] = __ldg(reinterpret_cast<const uint4 *>(src(m) + n));
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int idx = base + u * SSD_THREADS, m = idx / wv, n = (idx - m * wv) * 8;
                if (idx < total) *reinterpret_cast<uint4 *>(dst + m * ld + n) = v[u];
            }
        }
    } else {
        for (int idx = threadIdx.x; idx < SSD_Q * width; idx += SSD_THREADS) {
            const int m = idx / width, n = idx - m * width;
            dst[m * ld + n] = m < q ? src(m)[n] : __float2bfloat16_rn(0.f);
        }
    }
}

// load_rows without registers: 16-byte cp.async copies (scan_common.cuh; rows >= q: zero stores) that stay in flight
// until cp_async_wait_all(), which the caller issues before the barrier that precedes the first read. Falls back to
// load_rows (complete on return) when the tensors are not 16-byte aligned.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
template <typename FSrc>
__device__ __forceinline__ void load_rows_async(bf16 *dst, int width, int ld, int q, bool vec, FSrc src) {
    if (!vec) {
        load_rows(dst, width, ld, q, false, src);
        return;
    }
    const int wv = width / 8, total = SSD_Q * wv;
    for (int idx = threadIdx.x; idx < total; idx += SSD_THREADS) {
        const int m = idx / wv, n = (idx - m * wv) * 8;
        if (m < q) cp_async16(dst + m * ld + n, src(m) + n);
        else *reinterpret_cast<uint4 *>(dst + m * ld + n) = make_uint4(0u, 0u, 0u, 0u);
    }
}

// An fp32 [rows, width] matrix in global memory (n4 = rows*width/4 float4s, 16-byte aligned) into shared memory as
// bf16 hi + lo (row stride ld), 8 loads in flight per thread (see load_rows).
__device__ __forceinline__ void split_rows4(bf16 *hi, bf16 *lo, int ld, const float4 *src, int n4, int width) {
    constexpr int U = 8;
    for (int i0 = threadIdx.x; i0 < n4; i0 += U * SSD_THREADS) {
        float4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * SSD_THREADS;
            if (i < n4) v[u] = __ldcs(src + i);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * SSD_THREADS;
            if (i >= n4) break;
            const int r = 4 * i / width, n = 4 * i - r * width;
            bf16 *hp = hi + r * ld + n, *lp = lo + r * ld + n;
            split_bf(v[u].x, hp, lp), split_bf(v[u].y, hp + 1, lp + 1), split_bf(v[u].z, hp + 2, lp + 2);
            split_bf(v[u].w, hp + 3, lp + 3);
        }
    }
}

// f(r, c) for every cell of an R x C grid, dealt to the block's threads in row-major order (as the loop
// i = tid, tid + SSD_THREADS, ... with r = i / C), stepping without integer divisions.
template <typename F>
__device__ __forceinline__ void grid_rc(int R, int C, F f) {
    int r = threadIdx.x / C, c = threadIdx.x - r * C;
    const int dr = SSD_THREADS / C, dc = SSD_THREADS - dr * C;
    while (r < R) {
        f(r, c);
        c += dc, r += dr;
        if (c >= C) c -= C, r++;
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
// One block per (b, h, 16 rows of P), sequential over chunks; the state tile S [16, N] stays in shared memory (fp32).
template <bool Y>
__global__ void __launch_bounds__(SSD_THREADS) ssd_fwd_kernel(SsdDev a) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int N = (int)a.N, PT = SSD_PT, Q = SSD_Q;
    const int lN = (int)ld16(N), lP = (int)ld16(PT), lQ = (int)ld16(Q), lQf = (int)ld32(Q), lPf = (int)ld32(PT);
    const int lNf = (int)ld32(N);
    const FwdLayout lay = fwd_layout(N);
    bf16 *Cs = reinterpret_cast<bf16 *>(smem + lay.C), *Bs = reinterpret_cast<bf16 *>(smem + lay.B);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X);
    float *Wf = reinterpret_cast<float *>(smem + lay.Wf);
    bf16 *Wh = reinterpret_cast<bf16 *>(smem + lay.Wh), *Wl = reinterpret_cast<bf16 *>(smem + lay.Wl);
    bf16 *WBh = reinterpret_cast<bf16 *>(smem + lay.WBh), *WBl = reinterpret_cast<bf16 *>(smem + lay.WBl);
    float *Sf = reinterpret_cast<float *>(smem + lay.Sf);
    bf16 *Sh = reinterpret_cast<bf16 *>(smem + lay.Sh), *Sl = reinterpret_cast<bf16 *>(smem + lay.Sl);
    float *Y1 = reinterpret_cast<float *>(smem + lay.Y1), *Y2 = reinterpret_cast<float *>(smem + lay.Y2);
    float *T = reinterpret_cast<float *>(smem + lay.T);
    const Scal sc = scal_at(smem + lay.scal);

    const int64_t npt = a.P / PT;
    const int64_t bh = (int64_t)blockIdx.x / npt, p0 = ((int64_t)blockIdx.x % npt) * PT;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, P = a.P, G = a.G;
    const float Dh = a.D ? a.D[h] : 0.f;

    for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
        const int p = i / N, n = i - p * N;
        Sf[p * lNf + n] = a.h0 ? a.h0[(bh * P + p0 + p) * a.N + n] : 0.f;
    }
    for (int64_t c = 0; c < a.nch; c++) {
        const int64_t t0 = c * SSD_Q;
        const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
        __syncthreads();  // the previous chunk's readers of every buffer are done
        if (threadIdx.x < 32) chunk_scalars(a, b, h, t0, q, sc);
        load_rows(Bs, N, lN, q, a.vec, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * a.N; });
        load_rows(Xs, PT, lP, q, a.vec, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * P + p0; });
        if (Y) {
            load_rows(Cs, N, lN, q, a.vec, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * a.N; });
            for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
                const int p = i / N, n = i - p * N;
                split_bf(Sf[p * lNf + n], &Sh[p * lN + n], &Sl[p * lN + n]);
            }
        }
        __syncthreads();
        chunk_weights(sc);
        __syncthreads();
        if (Y) {
            // CB = C B^T, then W[m,k] = CB[m,k] Lm[m,k] delta_k as hi + lo
            block_tiles(Q, Q, Wf, lQf, false, [&](Acc &acc, int i0, int j0) {
                mma_k<wmma::row_major, wmma::col_major>(acc, Cs, lN, Bs, lN, i0, j0, 0, N);
            });
            __syncthreads();
            for (int i = threadIdx.x; i < Q * Q; i += SSD_THREADS) {
                const int m = i / Q, k = i - m * Q;
                split_bf(Wf[m * lQf + k] * decay_mk(sc, m, k) * sc.delta[k], &Wh[m * lQ + k], &Wl[m * lQ + k]);
            }
            __syncthreads();
            // Y1 = W x (intra-chunk), Y2 = C S^T (incoming state)
            block_tiles(Q, PT, Y1, lPf, false, [&](Acc &acc, int i0, int j0) {
                mma_k<wmma::row_major, wmma::row_major>(acc, Wh, lQ, Xs, lP, i0, j0, 0, i0 + 16);
                mma_k<wmma::row_major, wmma::row_major>(acc, Wl, lQ, Xs, lP, i0, j0, 0, i0 + 16);
            });
            block_tiles(Q, PT, Y2, lPf, false, [&](Acc &acc, int i0, int j0) {
                mma_k<wmma::row_major, wmma::col_major>(acc, Cs, lN, Sh, lN, i0, j0, 0, N);
                mma_k<wmma::row_major, wmma::col_major>(acc, Cs, lN, Sl, lN, i0, j0, 0, N);
            });
            __syncthreads();
            for (int i = threadIdx.x; i < q * PT; i += SSD_THREADS) {
                const int m = i / PT, p = i - m * PT;
                const float v = Y1[m * lPf + p] + sc.din[m] * Y2[m * lPf + p] + Dh * bf(Xs[m * lP + p]);
                a.y[((b * L + t0 + m) * H + h) * P + p0 + p] = __float2bfloat16_rn(v);
            }
            __syncthreads();  // W and Y are dead; their regions hold WB and T below
        }
        // S = dlast S + x^T (w B): T = x^T (w B) first; the state entering the chunk is stored (backward)
        for (int i = threadIdx.x; i < Q * N; i += SSD_THREADS) {
            const int k = i / N, n = i - k * N;
            split_bf(sc.w[k] * bf(Bs[k * lN + n]), &WBh[k * lN + n], &WBl[k * lN + n]);
        }
        __syncthreads();
        block_tiles(PT, N, T, lNf, false, [&](Acc &acc, int i0, int j0) {
            mma_k<wmma::col_major, wmma::row_major>(acc, Xs, lP, WBh, lN, i0, j0, 0, Q);
            mma_k<wmma::col_major, wmma::row_major>(acc, Xs, lP, WBl, lN, i0, j0, 0, Q);
        });
        __syncthreads();
        const float dlast = sc.din[SSD_Q - 1];
        float *st = a.Sin ? a.Sin + ((bh * a.nch + c) * P + p0) * a.N : nullptr;
        for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
            const int p = i / N, n = i - p * N;
            const float old = Sf[p * lNf + n];
            if (st) st[i] = old;  // i = p*N + n
            Sf[p * lNf + n] = fmaf(dlast, old, T[p * lNf + n]);
        }
    }
    __syncthreads();
    if (a.h_last)
        for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
            const int p = i / N, n = i - p * N;
            a.h_last[(bh * P + p0 + p) * a.N + n] = Sf[p * lNf + n];
        }
}

// ---------------------------------------------------------------------------------------------- state gradient pass
// dS (gradient w.r.t. the state leaving chunk c) for c = nch-1 .. 0, stored to dSo; then dS_in = dlast dS +
// dy^T (din C) becomes the next (earlier) chunk's dS. dh0 = the final dS. Same decomposition as the forward.
__global__ void __launch_bounds__(SSD_THREADS) ssd_dstate_kernel(SsdDev a) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int N = (int)a.N, PT = SSD_PT, Q = SSD_Q;
    const int lN = (int)ld16(N), lP = (int)ld16(PT), lNf = (int)ld32(N);
    const DstLayout lay = dst_layout(N);
    bf16 *DYs = reinterpret_cast<bf16 *>(smem + lay.DY);
    bf16 *DCh = reinterpret_cast<bf16 *>(smem + lay.DCh), *DCl = reinterpret_cast<bf16 *>(smem + lay.DCl);
    float *Sf = reinterpret_cast<float *>(smem + lay.Sf), *T = reinterpret_cast<float *>(smem + lay.T);
    const Scal sc = scal_at(smem + lay.scal);

    const int64_t npt = a.P / PT;
    const int64_t bh = (int64_t)blockIdx.x / npt, p0 = ((int64_t)blockIdx.x % npt) * PT;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, P = a.P, G = a.G;

    for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
        const int p = i / N, n = i - p * N;
        Sf[p * lNf + n] = a.dhl ? a.dhl[(bh * P + p0 + p) * a.N + n] : 0.f;
    }
    for (int64_t c = a.nch - 1; c >= 0; c--) {
        const int64_t t0 = c * SSD_Q;
        const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
        __syncthreads();
        if (threadIdx.x < 32) chunk_scalars(a, b, h, t0, q, sc);
        load_rows(DYs, PT, lP, q, a.vec, [&](int m) { return a.dy + ((b * L + t0 + m) * H + h) * P + p0; });
        __syncthreads();
        chunk_weights(sc);
        __syncthreads();
        for (int i = threadIdx.x; i < Q * N; i += SSD_THREADS) {
            const int m = i / N, n = i - m * N;
            const float cv = m < q ? bf(a.Cm[((b * L + t0 + m) * G + g) * a.N + n]) : 0.f;
            split_bf(sc.din[m] * cv, &DCh[m * lN + n], &DCl[m * lN + n]);
        }
        __syncthreads();
        block_tiles(PT, N, T, lNf, false, [&](Acc &acc, int i0, int j0) {
            mma_k<wmma::col_major, wmma::row_major>(acc, DYs, lP, DCh, lN, i0, j0, 0, Q);
            mma_k<wmma::col_major, wmma::row_major>(acc, DYs, lP, DCl, lN, i0, j0, 0, Q);
        });
        __syncthreads();
        const float dlast = sc.din[SSD_Q - 1];
        float *st = a.dSo + ((bh * a.nch + c) * P + p0) * a.N;
        for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
            const int p = i / N, n = i - p * N;
            const float old = Sf[p * lNf + n];
            st[i] = old;
            Sf[p * lNf + n] = fmaf(dlast, old, T[p * lNf + n]);
        }
    }
    __syncthreads();
    if (a.dh0)
        for (int i = threadIdx.x; i < PT * N; i += SSD_THREADS) {
            const int p = i / N, n = i - p * N;
            a.dh0[(bh * P + p0 + p) * a.N + n] = Sf[p * lNf + n];
        }
}

// ---------------------------------------------------------------------------------------------- chunk gradients
// One block per (b, h, chunk). S0 = state entering the chunk (Sin), dS = gradient w.r.t. the state leaving it (dSo).
//   CB = C B^T, dG = dy x^T                                  [Q,Q]
//   W = CB Lm delta_k, V = dG Lm delta_k, E = dG CB Lm       [Q,Q] (elementwise)
//   dx  = D dy + w_k (B dS^T)[k,p] + W^T dy
//   dB  = w_k (x dS)[k,n] + V^T C
//   dC  = din_m (dy S0)[m,n] + V B
//   ddelta_k = Lm[Q-1,k] x_k.(B_k dS^T) + sum_m E[m,k]
//   d(cum) terms: tmp_m = din_m C_m.(dy S0)_m, u = dlast <dS, S0>, M[m,k] = E[m,k] delta_k (k < m) and the state's
//   M[Q-1,k] = w_k x_k.(B_k dS^T): da_j = sum_{m>=j} tmp_m + u + sum_{m>=j} sum_{k<j} M[m,k].
// The fp32 terms of dx/dB/dC are formed in R first, and the MMAs accumulate onto them in place.
template <int PC, int NC>  // P and N at compile time (0: at run time)
__global__ void __launch_bounds__(SSD_THREADS, 1) ssd_bwd_chunk_kernel(SsdDev a) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int P = PC ? PC : (int)a.P, N = NC ? NC : (int)a.N, Q = SSD_Q;
    const int lP = (int)ld16(P), lN = (int)ld16(N), lQ = (int)ld16(Q), lQf = (int)ld32(Q);
    const int lR = (int)ld32(P > N ? P : N);
    const ChunkLayout lay = chunk_layout(P, N);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X), *DYs = reinterpret_cast<bf16 *>(smem + lay.DY);
    bf16 *Bs = reinterpret_cast<bf16 *>(smem + lay.B), *Cs = reinterpret_cast<bf16 *>(smem + lay.C);
    float *CBf = reinterpret_cast<float *>(smem + lay.CB), *DGf = reinterpret_cast<float *>(smem + lay.DG);
    bf16 *Wh = reinterpret_cast<bf16 *>(smem + lay.Wh), *Wl = reinterpret_cast<bf16 *>(smem + lay.Wl);
    bf16 *Vh = reinterpret_cast<bf16 *>(smem + lay.Vh), *Vl = reinterpret_cast<bf16 *>(smem + lay.Vl);
    bf16 *Sh = reinterpret_cast<bf16 *>(smem + lay.Sh), *Sl = reinterpret_cast<bf16 *>(smem + lay.Sl);
    float *Rs = reinterpret_cast<float *>(smem + lay.R), *Es = Rs;  // E is dead before R is first written
    const Scal sc = scal_at(smem + lay.scal);

    const int64_t c = (int64_t)blockIdx.x % a.nch, bh = (int64_t)blockIdx.x / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, G = a.G, t0 = c * SSD_Q;
    const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
    const float Dh = a.D ? a.D[h] : 0.f, Ah = a.A[h];
    const int tid = threadIdx.x;

    load_rows_async(Xs, P, lP, q, a.vec, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * P; });
    load_rows_async(DYs, P, lP, q, a.vec, [&](int m) { return a.dy + ((b * L + t0 + m) * H + h) * P; });
    load_rows_async(Bs, N, lN, q, a.vec, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * N; });
    load_rows_async(Cs, N, lN, q, a.vec, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * N; });
    if (tid < 32) chunk_scalars(a, b, h, t0, q, sc);
    const float *S0g = a.Sin + (bh * a.nch + c) * P * N;
    const float *dSg = a.dSo + (bh * a.nch + c) * P * N;
    // dS as hi + lo; u = <dS, S0> (S0 read from global here)
    float up = 0.f;
    for (int i0 = tid; i0 < P * N / 4; i0 += 8 * SSD_THREADS) {  // 16-byte loads, 16 in flight (see load_rows)
        float4 d[8], s0[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * SSD_THREADS;
            if (i < P * N / 4) {
                d[u] = __ldcs(reinterpret_cast<const float4 *>(dSg) + i);
                s0[u] = __ldcs(reinterpret_cast<const float4 *>(S0g) + i);
            }
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * SSD_THREADS;
            if (i >= P * N / 4) break;
            const int p = 4 * i / N, n = 4 * i - p * N;
            bf16 *hp = Sh + p * lN + n, *lp = Sl + p * lN + n;
            split_bf(d[u].x, hp, lp), split_bf(d[u].y, hp + 1, lp + 1), split_bf(d[u].z, hp + 2, lp + 2);
            split_bf(d[u].w, hp + 3, lp + 3);
            up = fmaf(d[u].x, s0[u].x, up), up = fmaf(d[u].y, s0[u].y, up), up = fmaf(d[u].z, s0[u].z, up);
            up = fmaf(d[u].w, s0[u].w, up);
        }
    }
    cp_async_wait_all();
    __syncthreads();
    chunk_weights(sc);
    // CB = C B^T and dG = dy x^T
    block_tiles(Q, Q, CBf, lQf, false, [&](Acc &acc, int i0, int j0) {
        mma_k<wmma::row_major, wmma::col_major>(acc, Cs, lN, Bs, lN, i0, j0, 0, N);
    });
    block_tiles(Q, Q, DGf, lQf, false, [&](Acc &acc, int i0, int j0) {
        mma_k<wmma::row_major, wmma::col_major>(acc, DYs, lP, Xs, lP, i0, j0, 0, P);
    });
    const float u_raw = block_sum(up, sc.red);  // contains barriers: CB, dG, din, w are complete after it
    const float dlast = sc.din[SSD_Q - 1];
    const float u = dlast * u_raw;
    // W, V (kept in registers while CB/dG are read: their regions become W/V hi + lo), E into R (row stride lE: odd,
    // so that a warp walking 32 rows at one column, or one row, hits 32 banks)
    constexpr int PER = SSD_Q * SSD_Q / SSD_THREADS, lE = SSD_Q + 1;
    static_assert(PER * SSD_THREADS == SSD_Q * SSD_Q, "Q*Q must be a multiple of the block size");
    static_assert(SSD_THREADS == 4 * SSD_Q, "4 threads per row or column of the chunk");
    float *part1 = Es + SSD_Q * lE, *part2 = part1 + 4 * SSD_Q;  // [4][Q] partial sums (R has room: lR >= Q + 4)
    float wr[PER], vr[PER];
#pragma unroll
    for (int r = 0; r < PER; r++) {
        const int i = tid + r * SSD_THREADS, m = i / Q, k = i - m * Q;
        const float l = decay_mk(sc, m, k), cb = CBf[m * lQf + k], dg = DGf[m * lQf + k];
        wr[r] = cb * l * sc.delta[k];
        vr[r] = dg * l * sc.delta[k];
        Es[m * lE + k] = dg * cb * l;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < PER; r++) {
        const int i = tid + r * SSD_THREADS, m = i / Q, k = i - m * Q;
        split_bf(wr[r], &Wh[m * lQ + k], &Wl[m * lQ + k]);
        split_bf(vr[r], &Vh[m * lQ + k], &Vl[m * lQ + k]);
    }
    // Every thread: column / row index ix = tid % Q, quarter qr = tid / Q (16 rows or columns each).
    const int ix = tid & (SSD_Q - 1), qr = tid / SSD_Q, r0 = qr * (SSD_Q / 4), r1 = r0 + SSD_Q / 4;
    {  // quarter sums: part1 = column sums of E over rows m >= ix (ddelta); part2 = row sums of M[m,k] = E[m,k]
       // delta_k over k < m (the row prefixes below)
        float cs = 0.f, rs = 0.f;
        for (int m = r0 > ix ? r0 : ix; m < r1; m++) cs += Es[m * lE + ix];
        for (int k = r0; k < r1 && k < ix; k++) rs = fmaf(Es[ix * lE + k], sc.delta[k], rs);
        part1[qr * SSD_Q + ix] = cs;
        part2[qr * SSD_Q + ix] = rs;
    }
    __syncthreads();
    if (tid < SSD_Q) sc.dd[tid] = (part1[tid] + part1[SSD_Q + tid]) + (part1[2 * SSD_Q + tid] + part1[3 * SSD_Q + tid]);
    {  // row prefixes of M in place: Es[m][j] = sum_{k<j} E[m,k] delta_k for j <= m, 0 for j > m (row m = ix)
        const int m = ix;
        float pre = 0.f;
        for (int r = 0; r < qr; r++) pre += part2[r * SSD_Q + m];
        for (int j = r0; j < r1; j++) {
            const float e = Es[m * lE + j];
            Es[m * lE + j] = j <= m ? pre : 0.f;
            if (j < m) pre = fmaf(e, sc.delta[j], pre);
        }
    }
    __syncthreads();
    {  // tj_j = sum_{m>=j} sum_{k<j} M[m,k]: quarter sums of column j = ix (part1 is free again)
        float cs = 0.f;
        for (int m = r0 > ix ? r0 : ix; m < r1; m++) cs += Es[m * lE + ix];
        part1[qr * SSD_Q + ix] = cs;
    }
    __syncthreads();
    if (tid < SSD_Q) sc.tj[tid] = (part1[tid] + part1[SSD_Q + tid]) + (part1[2 * SSD_Q + tid] + part1[3 * SSD_Q + tid]);
    __syncthreads();  // E is dead: R may be written
    // R = B dS^T  [k,p]
    block_tiles_hilo<wmma::row_major, wmma::col_major>(Q, P, Rs, lR, false, Bs, lN, Sh, Sl, lN, N);
    __syncthreads();
    {  // xdsb_k = x_k . R_k: 4 lanes per row k, interleaved columns (no bank conflicts), then a shuffle sum
        const int k = tid >> 2, c4 = tid & 3;
        float s = 0.f;
        for (int p = c4; p < P; p += 4) s = fmaf(bf(Xs[k * lP + p]), Rs[k * lR + p], s);
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (c4 == 0) sc.xdsb[k] = s;
    }
    __syncthreads();
    // dx = (w_k R + D dy) + W^T dy
    grid_rc(Q, P, [&](int k, int p) {
        Rs[k * lR + p] = fmaf(sc.w[k], Rs[k * lR + p], Dh * bf(DYs[k * lP + p]));
    });
    __syncthreads();
    block_tiles(Q, P, Rs, lR, true, [&](Acc &acc, int i0, int j0) {
        mma_k<wmma::col_major, wmma::row_major>(acc, Wh, lQ, DYs, lP, i0, j0, i0, Q);
        mma_k<wmma::col_major, wmma::row_major>(acc, Wl, lQ, DYs, lP, i0, j0, i0, Q);
    });
    __syncthreads();
    grid_rc(q, P, [&](int k, int p) {
        a.dx[((b * L + t0 + k) * H + h) * P + p] = __float2bfloat16_rn(Rs[k * lR + p]);
    });
    __syncthreads();
    // dB = w_k (x dS) + V^T C
    block_tiles_hilo<wmma::row_major, wmma::row_major>(Q, N, Rs, lR, false, Xs, lP, Sh, Sl, lN, P);
    __syncthreads();
    grid_rc(Q, N, [&](int k, int n) {
        Rs[k * lR + n] *= sc.w[k];
    });
    __syncthreads();
    block_tiles(Q, N, Rs, lR, true, [&](Acc &acc, int i0, int j0) {
        mma_k<wmma::col_major, wmma::row_major>(acc, Vh, lQ, Cs, lN, i0, j0, i0, Q);
        mma_k<wmma::col_major, wmma::row_major>(acc, Vl, lQ, Cs, lN, i0, j0, i0, Q);
    });
    __syncthreads();
    grid_rc(q, N, [&](int k, int n) {
        const float v = Rs[k * lR + n];
        if (a.rep == 1) a.dBm[((b * L + t0 + k) * G + g) * N + n] = __float2bfloat16_rn(v);
        else a.dBh[((b * L + t0 + k) * H + h) * N + n] = v;
    });
    __syncthreads();
    // S0 as hi + lo (over dS), then dC = din_m (dy S0) + V B
    split_rows4(Sh, Sl, lN, reinterpret_cast<const float4 *>(S0g), P * N / 4, N);
    __syncthreads();
    block_tiles_hilo<wmma::row_major, wmma::row_major>(Q, N, Rs, lR, false, DYs, lP, Sh, Sl, lN, P);
    __syncthreads();
    {  // tmp_m = din_m C_m . (dy S0)_m, 4 lanes per row as above
        const int m = tid >> 2, c4 = tid & 3;
        float s = 0.f;
        for (int n = c4; n < N; n += 4) s = fmaf(bf(Cs[m * lN + n]), Rs[m * lR + n], s);
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (c4 == 0) sc.tmp[m] = sc.din[m] * s;
    }
    __syncthreads();
    grid_rc(Q, N, [&](int m, int n) {
        Rs[m * lR + n] *= sc.din[m];
    });
    __syncthreads();
    block_tiles(Q, N, Rs, lR, true, [&](Acc &acc, int i0, int j0) {
        mma_k<wmma::row_major, wmma::row_major>(acc, Vh, lQ, Bs, lN, i0, j0, 0, i0 + 16);
        mma_k<wmma::row_major, wmma::row_major>(acc, Vl, lQ, Bs, lN, i0, j0, 0, i0 + 16);
    });
    __syncthreads();
    grid_rc(q, N, [&](int m, int n) {
        const float v = Rs[m * lR + n];
        if (a.rep == 1) a.dCm[((b * L + t0 + m) * G + g) * N + n] = __float2bfloat16_rn(v);
        else a.dCh[((b * L + t0 + m) * H + h) * N + n] = v;
    });
    // da_j, ddt, and this block's partials of dA, ddt_bias, dD (thread j reads only finished scalars)
    float pa = 0.f, pb = 0.f, pd = 0.f;
    if (tid < SSD_Q) {
        const int j = tid;
        float da = u + sc.tj[j];
        for (int m = SSD_Q - 1; m >= j; m--) da += sc.tmp[m];
        for (int k = 0; k < j; k++) da = fmaf(sc.w[k], sc.xdsb[k], da);
        const float ddelta = fmaf(decay_mk(sc, SSD_Q - 1, j), sc.xdsb[j], sc.dd[j]);
        const float dd = fmaf(da, Ah, ddelta);
        pa = da * sc.delta[j];
        if (j < q) {
            const float v = sc.v[j];
            const float graw = a.softplus ? (v > 20.f ? dd : dd / (1.f + expf(-v))) : dd;
            a.ddt[(b * L + t0 + j) * H + h] = __float2bfloat16_rn(graw);
            pb = graw;
        }
    }
    {  // this thread's part of sum_j dy_j . x_j (dD): row tid / 4, every 4th column
        const int j = tid >> 2, c4 = tid & 3;
        if (j < q)
            for (int p = c4; p < P; p += 4) pd = fmaf(bf(DYs[j * lP + p]), bf(Xs[j * lP + p]), pd);
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

// ---------------------------------------------------------------------------------------------- v2: chunk-parallel
// The v2 forward and the first two stages of the v2 backward split the sequential state pass in two: every chunk's own
// contribution T_c [P,N] is formed in parallel over (b, h, chunk) on tensor cores (ssd_chunk_state_kernel), then a
// short elementwise scan over the chunks (ssd_scan_kernel, one thread per 4 state entries of a (b, h)) turns the T_c
// into the state entering (or, for the gradient, leaving) every chunk, in place: S_c = dl_{c-1} S_{c-1} + T_{c-1}.
// The chunk output (ssd_chunk_out_kernel) is then parallel over (b, h, chunk, P tile) too. Same arithmetic as v1
// (same splits, same MMA order, the same fmaf for the state update), so the states match v1 bit for bit.

struct CstLayout {  // ssd_chunk_state_kernel
    int64_t X, Mh, Ml, scal, total;
};
__host__ __device__ inline CstLayout cst_layout(int64_t P, int64_t N) {
    const int64_t Q = SSD_Q;
    CstLayout l;
    Carve c;
    l.X = c.take(Q * ld16(P) * 2);
    l.Mh = c.take(Q * ld16(N) * 2);
    l.Ml = c.take(Q * ld16(N) * 2);
    l.scal = c.take(SSD_SCAL * Q * 4);
    l.total = c.o;
    return l;
}

// One block per (b, h, chunk): T [P,N] = X^T (wt o M), stored to [B,H,nch,P,N].
//   forward (GRAD = false): X = x, M = B, wt_k = w_k; T goes to Sin, and dl = dlast of the chunk.
//   state gradient (GRAD = true): X = dy, M = C, wt_m = din_m; T goes to dSo.
template <bool GRAD>
__global__ void __launch_bounds__(SSD_THREADS) ssd_chunk_state_kernel(SsdDev a) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int P = (int)a.P, N = (int)a.N, Q = SSD_Q;
    const int lP = (int)ld16(P), lN = (int)ld16(N);
    const CstLayout lay = cst_layout(P, N);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X);
    bf16 *Mh = reinterpret_cast<bf16 *>(smem + lay.Mh), *Ml = reinterpret_cast<bf16 *>(smem + lay.Ml);
    const Scal sc = scal_at(smem + lay.scal);

    const int64_t c = (int64_t)blockIdx.x % a.nch, bh = (int64_t)blockIdx.x / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, G = a.G, t0 = c * SSD_Q;
    const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
    const bf16 *Xg = GRAD ? a.dy : a.x, *Mg = GRAD ? a.Cm : a.Bm;

    if (threadIdx.x < 32) chunk_scalars(a, b, h, t0, q, sc);
    load_rows(Xs, P, lP, q, a.vec, [&](int m) { return Xg + ((b * L + t0 + m) * H + h) * a.P; });
    load_rows(Mh, N, lN, q, a.vec, [&](int m) { return Mg + ((b * L + t0 + m) * G + g) * a.N; });
    __syncthreads();
    chunk_weights(sc);
    __syncthreads();
    const float *wt = GRAD ? sc.din : sc.w;
    for (int i = threadIdx.x; i < Q * N; i += SSD_THREADS) {  // in place: each element is read and written by one thread
        const int k = i / N, n = i - k * N;
        split_bf(wt[k] * bf(Mh[k * lN + n]), &Mh[k * lN + n], &Ml[k * lN + n]);
    }
    if (!GRAD && threadIdx.x == 0) a.dl[bh * a.nch + c] = sc.din[SSD_Q - 1];
    __syncthreads();
    float *T = (GRAD ? a.dSo : a.Sin) + (bh * a.nch + c) * a.P * a.N;
    const int warp = threadIdx.x >> 5, nt = N / 16, total = (P / 16) * nt;
    for (int t = warp; t < total; t += SSD_THREADS / 32) {
        const int i0 = (t / nt) * 16, j0 = (t % nt) * 16;
        Acc acc;
        wmma::fill_fragment(acc, 0.f);
        mma_k<wmma::col_major, wmma::row_major>(acc, Xs, lP, Mh, lN, i0, j0, 0, Q);
        mma_k<wmma::col_major, wmma::row_major>(acc, Xs, lP, Ml, lN, i0, j0, 0, Q);
        wmma::store_matrix_sync(T + (int64_t)i0 * a.N + j0, acc, (unsigned)a.N, wmma::mem_row_major);
    }
}

// In place over st [B,H,nch,P,N] (holding T_c): st_c = the running state s before chunk c's contribution, then
// s = dl_c s + T_c. Forward (REV = false): chunks in order from s = init (h0 or 0): st_c = the state entering chunk c,
// fin = h_last. State gradient (REV = true): chunks from the last one back, from s = dh_last (or 0): st_c = the
// gradient w.r.t. the state leaving chunk c, fin = dh0. One thread per 4 consecutive entries of a (b, h)'s state; the
// loads of U chunks are issued before their (dependent) updates.
template <bool REV>
__global__ void __launch_bounds__(256) ssd_scan_kernel(SsdDev a, float *st_all, const float *init, float *fin) {
    const int64_t PN4 = a.P * a.N / 4;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.B * a.H * PN4) return;
    const int64_t bh = i / PN4, e = i - bh * PN4;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    if (init) s = make_float4(init[4 * i], init[4 * i + 1], init[4 * i + 2], init[4 * i + 3]);
    float4 *st = reinterpret_cast<float4 *>(st_all) + bh * a.nch * PN4 + e;
    const float *dl = a.dl + bh * a.nch;
    constexpr int U = 8;
    for (int64_t c0 = 0; c0 < a.nch; c0 += U) {
        float4 t[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t j = c0 + u, c = REV ? a.nch - 1 - j : j;
            if (j < a.nch) t[u] = __ldcs(st + c * PN4);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t j = c0 + u, c = REV ? a.nch - 1 - j : j;
            if (j < a.nch) {
                const float d = dl[c];
                st[c * PN4] = s;
                s.x = fmaf(d, s.x, t[u].x), s.y = fmaf(d, s.y, t[u].y);
                s.z = fmaf(d, s.z, t[u].z), s.w = fmaf(d, s.w, t[u].w);
            }
        }
    }
    if (fin) fin[4 * i] = s.x, fin[4 * i + 1] = s.y, fin[4 * i + 2] = s.z, fin[4 * i + 3] = s.w;
}

// P tile of the chunk-output kernel: 64 rows where P allows (two blocks per (b, h, chunk) at P = 128)
__host__ __device__ constexpr int out_pt(int64_t P) {
    return P <= 64 ? (int)P : P % 64 == 0 ? 64 : P % 32 == 0 ? 32 : 16;
}

struct OutLayout {  // ssd_chunk_out_kernel; W (hi, lo) lives in B's region, the per-warp scratch in CB's
    int64_t C, B, Wh, Wl, X, CB, Sh, Sl, scal, total;
};
__host__ __device__ inline OutLayout out_layout(int64_t PT, int64_t N) {
    const int64_t Q = SSD_Q;
    OutLayout l;
    int64_t o = 0;
    l.C = o, o = al128(o + Q * ld16(N) * 2);
    l.B = o, l.Wh = o, l.Wl = o + al128(Q * ld16(Q) * 2);
    o = max64(al128(o + Q * ld16(N) * 2), l.Wl + al128(Q * ld16(Q) * 2));
    l.X = o, o = al128(o + Q * ld16(PT) * 2);
    l.CB = o, o = max64(al128(o + Q * ld32(Q) * 4), al128(o + (SSD_THREADS / 32) * 2 * 256 * 4));
    l.Sh = o, o = al128(o + PT * ld16(N) * 2);
    l.Sl = o, o = al128(o + PT * ld16(N) * 2);
    l.scal = o, o = al128(o + SSD_SCAL * Q * 4);
    l.total = o;
    return l;
}

// One block per (b, h, chunk, PT rows of P): y = W x + diag(din) C S_in^T + D x with W = (C B^T) o decay o delta
// (S_in from the scan). Each warp owns whole 16 x 16 output tiles: both products go to its scratch, and its lanes
// combine them and store bf16 pairs.
template <int PC, int NC>  // P and N at compile time (0: at run time)
__global__ void __launch_bounds__(SSD_THREADS) ssd_chunk_out_kernel(SsdDev a) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int64_t P = PC ? PC : a.P;
    const int N = NC ? NC : (int)a.N, Q = SSD_Q, PT = out_pt(P);
    const int lN = (int)ld16(N), lP = (int)ld16(PT), lQ = (int)ld16(Q), lQf = (int)ld32(Q);
    const OutLayout lay = out_layout(PT, N);
    bf16 *Cs = reinterpret_cast<bf16 *>(smem + lay.C), *Bs = reinterpret_cast<bf16 *>(smem + lay.B);
    bf16 *Wh = reinterpret_cast<bf16 *>(smem + lay.Wh), *Wl = reinterpret_cast<bf16 *>(smem + lay.Wl);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X);
    float *CBf = reinterpret_cast<float *>(smem + lay.CB);
    bf16 *Sh = reinterpret_cast<bf16 *>(smem + lay.Sh), *Sl = reinterpret_cast<bf16 *>(smem + lay.Sl);
    const Scal sc = scal_at(smem + lay.scal);

    const int64_t npt = P / PT;
    const int64_t pt = (int64_t)blockIdx.x % npt, rest = (int64_t)blockIdx.x / npt;
    const int64_t c = rest % a.nch, bh = rest / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep, p0 = pt * PT;
    const int64_t L = a.L, H = a.H, G = a.G, t0 = c * SSD_Q;
    const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
    const float Dh = a.D ? a.D[h] : 0.f;
    const int tid = threadIdx.x;

    load_rows_async(Cs, N, lN, q, a.vec, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * N; });
    load_rows_async(Bs, N, lN, q, a.vec, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * N; });
    load_rows_async(Xs, PT, lP, q, a.vec, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * P + p0; });
    if (tid < 32) chunk_scalars(a, b, h, t0, q, sc);
    {  // S_in rows p0 .. p0+PT-1 as hi + lo (16-byte loads: the workspace is 256-byte aligned, N % 16 == 0)
        const float4 *S0 = reinterpret_cast<const float4 *>(a.Sin + ((bh * a.nch + c) * P + p0) * N);
        split_rows4(Sh, Sl, lN, S0, PT * N / 4, N);
    }
    cp_async_wait_all();
    __syncthreads();
    chunk_weights(sc);
    block_tiles(Q, Q, CBf, lQf, false, [&](Acc &acc, int i0, int j0) {
        mma_k<wmma::row_major, wmma::col_major>(acc, Cs, lN, Bs, lN, i0, j0, 0, N);
    });
    __syncthreads();  // CB complete, B dead: W goes to its region
    for (int i = tid; i < Q * Q; i += SSD_THREADS) {
        const int m = i / Q, k = i - m * Q;
        split_bf(CBf[m * lQf + k] * decay_mk(sc, m, k) * sc.delta[k], &Wh[m * lQ + k], &Wl[m * lQ + k]);
    }
    __syncthreads();  // W complete, CB dead: the per-warp scratch goes to its region
    const int warp = tid >> 5, lane = tid & 31, nt = PT / 16, total = (Q / 16) * nt;
    float *s1 = CBf + warp * 512, *s2 = s1 + 256;
    // a1 = W x (intra-chunk), a2 = C S^T (incoming state) for up to two tiles t = warp, warp + 8 per warp. When nt
    // divides the 8 warps both tiles share the column block j0, and each x and S fragment is loaded once for both.
    constexpr int W8 = SSD_THREADS / 32;
    const bool shared_j = W8 % nt == 0;
    for (int t = warp; t < total; t += (shared_j ? 2 : 1) * W8) {
        const int nr = shared_j && t + W8 < total ? 2 : 1, j0 = (t % nt) * 16;
        int i0[2];
        i0[0] = (t / nt) * 16, i0[1] = ((t + W8) / nt) * 16;
        Acc a1[2], a2[2];
#pragma unroll
        for (int r = 0; r < 2; r++) wmma::fill_fragment(a1[r], 0.f), wmma::fill_fragment(a2[r], 0.f);
        const int kmax = (nr == 2 ? i0[1] : i0[0]) + 16;  // W is lower triangular: k tiles past the diagonal are 0
        for (int k = 0; k < kmax; k += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fx;
            ldfrag(fx, Xs + k * lP + j0, lP);
#pragma unroll
            for (int r = 0; r < 2; r++) {
                if (r >= nr || k >= i0[r] + 16) continue;
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fw;
                ldfrag(fw, Wh + i0[r] * lQ + k, lQ);
                wmma::mma_sync(a1[r], fw, fx, a1[r]);
                ldfrag(fw, Wl + i0[r] * lQ + k, lQ);
                wmma::mma_sync(a1[r], fw, fx, a1[r]);
            }
        }
        for (int k = 0; k < N; k += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fh, fl;
            ldfrag(fh, Sh + j0 * lN + k, lN);
            ldfrag(fl, Sl + j0 * lN + k, lN);
#pragma unroll
            for (int r = 0; r < 2; r++) {
                if (r >= nr) continue;
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fc;
                ldfrag(fc, Cs + i0[r] * lN + k, lN);
                wmma::mma_sync(a2[r], fc, fh, a2[r]);
                wmma::mma_sync(a2[r], fc, fl, a2[r]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (r >= nr) continue;
            wmma::store_matrix_sync(s1, a1[r], 16, wmma::mem_row_major);
            wmma::store_matrix_sync(s2, a2[r], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 128; e += 32) {  // 16 rows x 8 pairs
                const int rr = e >> 3, cc = (e & 7) * 2, m = i0[r] + rr, p = j0 + cc;
                if (m < q) {
                    const float v0 = s1[rr * 16 + cc] + sc.din[m] * s2[rr * 16 + cc] + Dh * bf(Xs[m * lP + p]);
                    const float v1 =
                        s1[rr * 16 + cc + 1] + sc.din[m] * s2[rr * 16 + cc + 1] + Dh * bf(Xs[m * lP + p + 1]);
                    bf16 *yp = a.y + ((b * L + t0 + m) * H + h) * P + p0 + p;
                    if (a.yvec) *reinterpret_cast<__nv_bfloat162 *>(yp) = __floats2bfloat162_rn(v0, v1);
                    else yp[0] = __float2bfloat16_rn(v0), yp[1] = __float2bfloat16_rn(v1);
                }
            }
            __syncwarp();
        }
    }
}

// ---------------------------------------------------------------------------------------------- v3: fused state pass
// The v2 state pass writes every chunk's T_c and reads it back in the scan: two extra fp32 round trips of the states.
// v3 walks the chunks in order per (b, h, TP x TN tile of the state) with the state tile held in WMMA accumulators
// (registers): per chunk, store it (the state entering the chunk), scale it by dl_c (a uniform scale: the fragment
// layout does not matter) and accumulate X^T (wt o M) onto it on tensor cores. The chunk scalars (w, din, dl) come from
// a small kernel beforehand, so the sequential loop only loads x (or dy) and B (or C) tiles, one chunk ahead.

// wv, dv [B,H,nch,Q] = w and din of every chunk position, dl [B,H,nch] = dlast. One block of Q threads per chunk.
__global__ void __launch_bounds__(SSD_Q) ssd_scalars_kernel(SsdDev a) {
    __shared__ __align__(16) float buf[SSD_SCAL * SSD_Q];
    const Scal sc = scal_at(reinterpret_cast<unsigned char *>(buf));
    const int64_t c = (int64_t)blockIdx.x % a.nch, bh = (int64_t)blockIdx.x / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, t0 = c * SSD_Q;
    const int q = (int)(a.L - t0 < SSD_Q ? a.L - t0 : SSD_Q);
    if (threadIdx.x < 32) chunk_scalars(a, b, h, t0, q, sc);
    __syncthreads();
    chunk_weights(sc);  // thread m writes din[m], w[m]
    const int64_t o = (bh * a.nch + c) * SSD_Q + threadIdx.x;
    a.wv[o] = sc.w[threadIdx.x];
    a.dv[o] = sc.din[threadIdx.x];
    if (threadIdx.x == SSD_Q - 1) a.dl[bh * a.nch + c] = sc.din[SSD_Q - 1];
}

// The sequential pass keeps PASS_STAGES chunks in flight: each stage holds one chunk's X and raw M tiles, its weights
// and dlast, filled by cp.async (PASS_STAGES - 1 chunks ahead of the one in the MMAs), so the walk is not one memory
// latency per chunk.
constexpr int PASS_STAGES = 4;

struct PassLayout {  // ssd_state_pass_kernel: stages of (X [Q,TP], M [Q,TN] bf16, wt [Q] and dlast), M hi/lo, scratch
    int64_t Xst, Mst, Wst, stage, Mh, Ml, scr, total;
};
__host__ __device__ inline PassLayout pass_layout(int64_t TP, int64_t TN) {
    const int64_t Q = SSD_Q;
    PassLayout l;
    Carve st, c;  // one stage, then the whole buffer (the stages first)
    l.Xst = st.take(Q * ld16(TP) * 2);
    l.Mst = st.take(Q * ld16(TN) * 2);
    l.Wst = st.take((Q + 4) * 4);
    l.stage = st.o;
    c.take(PASS_STAGES * l.stage);
    l.Mh = c.take(Q * ld16(TN) * 2);
    l.Ml = c.take(Q * ld16(TN) * 2);
    l.scr = c.take((SSD_THREADS / 32) * 256 * 4);
    l.total = c.o;
    return l;
}

__device__ __forceinline__ void cp_async4(void *smem, const void *gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

// One block per (b, h, TP rows of P, TN columns of N) (TN = out_pt, TP = pass_tp: 64 at P = N = 128 unless that gives
// too few blocks to fill the GPU), 8 warps, each owning up to two 16 x 16 tiles of the state. Forward (GRAD = false):
// X = x, M = B, wt = w, chunks in order from init = h0 (or 0); st_all[c] = the state entering chunk c, fin = h_last.
// GRAD: X = dy, M = C, wt = din, chunks from the last one back from init = dh_last (or 0); st_all[c] = the gradient
// w.r.t. the state leaving chunk c, fin = dh0.
// (The body of block blk: ssd_state_pass_kernel runs one direction, ssd_state_pass_both_kernel both.)
// HALF (v5): the same walk, but only the states at 128-token boundaries are stored, at index c / 2: the forward the
// state entering every even chunk, GRAD the gradient leaving every odd chunk (and the last chunk). The per-chunk
// kernels rebuild the other half on tensor cores from the neighbouring chunk (recon16).
template <bool GRAD, int PC, int NC, int TPC, bool HALF = false>  // P, N and TP at compile time (0: at run time)
__device__ __forceinline__ void state_pass(const SsdDev &a, int tp_rt, int64_t blk, float *st_all, const float *init,
                                           float *fin) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int64_t P = PC ? PC : a.P, N = NC ? NC : a.N;
    const int TP = TPC ? TPC : tp_rt, TN = out_pt(N), Q = SSD_Q;
    const int lX = (int)ld16(TP), lM = (int)ld16(TN);
    const PassLayout lay = pass_layout(TP, TN);
    bf16 *Mh = reinterpret_cast<bf16 *>(smem + lay.Mh), *Ml = reinterpret_cast<bf16 *>(smem + lay.Ml);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    float *scr = reinterpret_cast<float *>(smem + lay.scr) + warp * 256;

    const int64_t npt = P / TP, nnt = N / TN;
    const int64_t nt = blk % nnt, rest = blk / nnt;
    const int64_t pt = rest % npt, bh = rest / npt;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep, p0 = pt * TP, n0 = nt * TN;
    const int64_t L = a.L, H = a.H, G = a.G, nch = a.nch;
    const bf16 *Xg = GRAD ? a.dy : a.x, *Mg = GRAD ? a.Cm : a.Bm;
    const float *wg = GRAD ? a.dv : a.wv;

    // this warp's tiles of the [TP, TN] state: t = warp, warp + 8
    const int ntn = TN / 16, ntl = (TP / 16) * ntn;
    Acc acc[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int t = warp + r * (SSD_THREADS / 32);
        if (t >= ntl) continue;
        const int i0 = (t / ntn) * 16, j0 = (t % ntn) * 16;
        float v[8];  // all 8 loads in flight before the stores (see load_rows)
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int e = lane + 32 * u, i = e >> 4, j = e & 15;
            v[u] = init ? init[(bh * P + p0 + i0 + i) * N + n0 + j0 + j] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) scr[lane + 32 * u] = v[u];
        __syncwarp();
        wmma::load_matrix_sync(acc[r], scr, 16, wmma::mem_row_major);
        __syncwarp();
    }

    auto chunk_of = [&](int64_t j) { return GRAD ? nch - 1 - j : j; };
    auto issue = [&](int64_t c, int s) {  // chunk c into stage s (asynchronous when the tensors are 16-byte aligned)
        unsigned char *base = smem + s * lay.stage;
        bf16 *Xd = reinterpret_cast<bf16 *>(base + lay.Xst), *Md = reinterpret_cast<bf16 *>(base + lay.Mst);
        float *wd = reinterpret_cast<float *>(base + lay.Wst);
        const int64_t t0 = c * SSD_Q;
        const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
        load_rows_async(Xd, TP, lX, q, a.vec, [&](int m) { return Xg + ((b * L + t0 + m) * H + h) * P + p0; });
        load_rows_async(Md, TN, lM, q, a.vec, [&](int m) { return Mg + ((b * L + t0 + m) * G + g) * N + n0; });
        const float *wsrc = wg + (bh * nch + c) * SSD_Q;  // 256-byte aligned (workspace)
        if (tid < SSD_Q / 4) cp_async16(wd + 4 * tid, wsrc + 4 * tid);
        else if (tid == SSD_Q / 4) cp_async4(wd + SSD_Q, a.dl + bh * nch + c);
    };
#pragma unroll 1
    for (int s = 0; s < PASS_STAGES - 1; s++) {
        if (s < nch) issue(chunk_of(s), s);
        cp_async_commit();
    }
    for (int64_t j = 0; j < nch; j++) {
        const int64_t c = chunk_of(j);
        const int s = (int)(j % PASS_STAGES);
        if (j + PASS_STAGES - 1 < nch) issue(chunk_of(j + PASS_STAGES - 1), (int)((j + PASS_STAGES - 1) % PASS_STAGES));
        cp_async_commit();  // one group per iteration (maybe empty): chunk j's is complete after the wait
        cp_async_wait<PASS_STAGES - 1>();
        __syncthreads();
        unsigned char *base = smem + s * lay.stage;
        const bf16 *Xd = reinterpret_cast<const bf16 *>(base + lay.Xst), *Md = reinterpret_cast<const bf16 *>(base + lay.Mst);
        const float *wd = reinterpret_cast<const float *>(base + lay.Wst);
        for (int i = tid; i < Q * (TN / 8); i += SSD_THREADS) {  // M as wt_k M_k in hi + lo
            const int m = i / (TN / 8), col = (i % (TN / 8)) * 8;
            const uint4 raw = *reinterpret_cast<const uint4 *>(Md + m * lM + col);
            const bf16 *mv = reinterpret_cast<const bf16 *>(&raw);
            const float wk = wd[m];
            __align__(16) bf16 hi[8], lo[8];
#pragma unroll
            for (int e = 0; e < 8; e++) split_bf(wk * bf(mv[e]), &hi[e], &lo[e]);
            *reinterpret_cast<uint4 *>(Mh + m * lM + col) = *reinterpret_cast<const uint4 *>(hi);
            *reinterpret_cast<uint4 *>(Ml + m * lM + col) = *reinterpret_cast<const uint4 *>(lo);
        }
        __syncthreads();
        const float dl = wd[SSD_Q];
        const bool keep = !HALF || (GRAD ? ((c & 1) || c == nch - 1) : !(c & 1));
        float *st = HALF ? st_all + ((bh * ((nch + 1) / 2) + (c >> 1)) * P + p0) * N + n0
                         : st_all + ((bh * nch + c) * P + p0) * N + n0;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int t = warp + r * (SSD_THREADS / 32);
            if (t >= ntl) continue;
            const int i0 = (t / ntn) * 16, j0 = (t % ntn) * 16;
            if (keep) wmma::store_matrix_sync(st + (int64_t)i0 * N + j0, acc[r], (unsigned)N, wmma::mem_row_major);
#pragma unroll
            for (int e = 0; e < acc[r].num_elements; e++) acc[r].x[e] *= dl;
            mma_k<wmma::col_major, wmma::row_major>(acc[r], Xd, lX, Mh, lM, i0, j0, 0, Q);
            mma_k<wmma::col_major, wmma::row_major>(acc[r], Xd, lX, Ml, lM, i0, j0, 0, Q);
        }
        __syncthreads();  // stage s, Mh and Ml are free again
    }
    if (!fin) return;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int t = warp + r * (SSD_THREADS / 32);
        if (t >= ntl) continue;
        const int i0 = (t / ntn) * 16, j0 = (t % ntn) * 16;
        wmma::store_matrix_sync(scr, acc[r], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
            const int i = e >> 4, jj = e & 15;
            fin[(bh * P + p0 + i0 + i) * N + n0 + j0 + jj] = scr[e];
        }
        __syncwarp();
    }
}

template <bool GRAD, int PC, int NC, int TPC, bool HALF>
__global__ void __launch_bounds__(SSD_THREADS) ssd_state_pass_kernel(SsdDev a, int tp_rt, float *st_all,
                                                                      const float *init, float *fin) {
    state_pass<GRAD, PC, NC, TPC, HALF>(a, tp_rt, blockIdx.x, st_all, init, fin);
}
// The backward's two passes in one launch (v4): blocks [0, nb) walk the states forward from init (h0 or 0) into Sin,
// blocks [nb, 2 nb) the state gradients backward from dh_last into dSo (dh0 at the end). They are independent, and
// at 1 x 8192 each alone has too few blocks to hide its per-chunk latency.
template <int PC, int NC, int TPC, bool HALF>
__global__ void __launch_bounds__(SSD_THREADS) ssd_state_pass_both_kernel(SsdDev a, int tp_rt, int64_t nb,
                                                                           const float *init) {
    if ((int64_t)blockIdx.x < nb) state_pass<false, PC, NC, TPC, HALF>(a, tp_rt, blockIdx.x, a.Sin, init, nullptr);
    else state_pass<true, PC, NC, TPC, HALF>(a, tp_rt, (int64_t)blockIdx.x - nb, a.dSo, a.dhl, a.dh0);
}

// ---------------------------------------------------------------------------------------------- v4: mma.sync kernels
// v4 keeps v3's scalars kernel and state passes and replaces the per-chunk kernels: the chunk output becomes one block
// per (b, h, chunk) (C B^T and the decays once instead of once per P half), and the chunk-gradient kernel is split in
// two that each fit two blocks per SM: ssd_bwd_bc_kernel (dB, dC, and the d(cum) scalars tmp_m, u that need S0) and
// ssd_bwd_dx_kernel (dx, ddt and the parameter partials). Their [Q, P] / [Q, N] outputs stay in mma.sync register
// fragments from the first product to the store (no fp32 round trip through shared memory), and the fp32 states are
// read from global memory straight into B-operand fragments (split into hi + lo there): dS once per kernel, S0 once.
//
// m16n8k16 fragments (PTX ISA, "matrix fragments for mma.m16n8k16", bf16), g = lane / 4, t = lane % 4:
//   A (16 x 16): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   D (16 x 8):  d0, d1 = D[g][2t, 2t+1], d2, d3 = D[g+8][2t, 2t+1]        (bf16 pairs: lower index in the low half)
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <bool TRANS>
__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const bf16 *p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
}
// A fragment of rows i0.., columns k0.. of A [m][k] (row stride ld) in shared memory
__device__ __forceinline__ void lda_row(unsigned (&r)[4], const bf16 *A, int ld, int i0, int k0) {
    const int l = threadIdx.x & 31;
    ldsm4<false>(r, A + (i0 + (l & 15)) * ld + k0 + (l >> 4) * 8);
}
// A fragment of A = At^T, At [k][m] in shared memory (A's rows i0.., columns k0..)
__device__ __forceinline__ void lda_col(unsigned (&r)[4], const bf16 *At, int ld, int i0, int k0) {
    const int l = threadIdx.x & 31;
    ldsm4<true>(r, At + (k0 + (l >> 4) * 8 + (l & 7)) * ld + i0 + ((l >> 3) & 1) * 8);
}
// B fragments of two 8-column tiles n0, n0 + 8 (r0, r1 and r2, r3) of B = Bt^T, Bt [n][k] in shared memory
__device__ __forceinline__ void ldb_nk(unsigned (&r)[4], const bf16 *Bt, int ld, int n0, int k0) {
    const int l = threadIdx.x & 31;
    ldsm4<false>(r, Bt + (n0 + (l >> 4) * 8 + (l & 7)) * ld + k0 + ((l >> 3) & 1) * 8);
}
// the same from B [k][n] in shared memory
__device__ __forceinline__ void ldb_kn(unsigned (&r)[4], const bf16 *Bk, int ld, int k0, int n0) {
    const int l = threadIdx.x & 31;
    ldsm4<true>(r, Bk + (k0 + ((l >> 3) & 1) * 8 + (l & 7)) * ld + n0 + (l >> 4) * 8);
}
__device__ __forceinline__ unsigned pack_bf2(bf16 a, bf16 b) {  // a: lower index
    return (unsigned)__bfloat16_as_ushort(a) | ((unsigned)__bfloat16_as_ushort(b) << 16);
}
// two fp32 values of a B fragment register as bf16 hi and lo pairs (split_bf's rule: same bits as every kernel)
__device__ __forceinline__ void split2(float v0, float v1, unsigned &hi, unsigned &lo) {
    bf16 h0, l0, h1, l1;
    split_bf(v0, &h0, &l0), split_bf(v1, &h1, &l1);
    hi = pack_bf2(h0, h1), lo = pack_bf2(l0, l1);
}
__device__ __forceinline__ void st_pair(bf16 *p, float v0, float v1, bool vec) {
    if (vec) *reinterpret_cast<__nv_bfloat162 *>(p) = __floats2bfloat162_rn(v0, v1);
    else p[0] = __float2bfloat16_rn(v0), p[1] = __float2bfloat16_rn(v1);
}

// A [Q, Q] product per warp: the 16 x 32 slab of rows mi = 16 (warp / 2), columns kc = 32 (warp % 2) (4 tiles of 8).
// acc[j] += A[mi.., :K] Bt[kc + 8j.., :K]^T with A [m][k], Bt [n][k] bf16 in shared memory.
__device__ __forceinline__ void qq_slab(float (&acc)[4][4], const bf16 *A, int lda, const bf16 *Bt, int ldb, int mi,
                                        int kc, int K) {
    for (int k0 = 0; k0 < K; k0 += 16) {
        unsigned fa[4], f0[4], f1[4];
        lda_row(fa, A, lda, mi, k0);
        ldb_nk(f0, Bt, ldb, kc, k0);
        ldb_nk(f1, Bt, ldb, kc + 16, k0);
        mma16816(acc[0], fa, f0[0], f0[1]), mma16816(acc[1], fa, f0[2], f0[3]);
        mma16816(acc[2], fa, f1[0], f1[1]), mma16816(acc[3], fa, f1[2], f1[3]);
    }
}
// f(e, m, k) for the slab's cells: acc[j][e] is cell (m, k) = (mi + g + 8 (e / 2), kc + 8j + 2t + e % 2)
template <typename F>
__device__ __forceinline__ void slab_cells(int mi, int kc, F f) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) f(j, hh, mi + g + 8 * hh, kc + 8 * j + 2 * t);
}

// The [Q, 16 cb .. 16 cb + 15] output columns of the [Q, P] or [Q, N] products are dealt to the warps as units of one
// 16-column block and 4 / rs row tiles (rs row splits so that 8 warps stay busy when there are fewer than 8 blocks).
__host__ __device__ constexpr int v4_splits(int ncb) { return ncb * 4 <= 8 ? 4 : ncb * 2 <= 8 ? 2 : 1; }
struct Unit {
    int cb, mt0, nmt;
    bool on;
};
__device__ __forceinline__ Unit unit_of(int warp, int ncb) {
    const int rs = v4_splits(ncb);
    Unit u;
    u.on = warp < ncb * rs;
    u.cb = warp % ncb;
    u.nmt = 4 / rs;
    u.mt0 = (warp / ncb) * u.nmt;
    return u;
}
typedef float Frag[4][2][4];  // [row tile][8-column tile][register]: a unit's [16 nmt, 16] output

// v5: a 16 x 16 tile (rows r0.., columns c0..) of a state that the passes did not store (the one at a 64-token
// midpoint), rebuilt from the stored state one chunk away and that chunk's tiles:
//   S(r, c) = dl Sst(r, c) + sum_k Ta[k][r] (sc_k Tb[k][c])     (k over the Q tokens of the neighbouring chunk)
// Forward state entering odd chunk o from the state entering e = o - 1: Sst = S_e, Ta/Tb = x_e/B_e (or B_e/x_e for
// the transposed tile), sc = w_e, dl = dlast_e: the pass's own update. State gradient leaving even chunk e from the
// one leaving o = e + 1: Sst = dS_o, Ta/Tb = dy_o/C_o (or C_o/dy_o), sc = din_o, dl = dlast_o.
// Ta and Tb are exact bf16 tiles in shared memory; sc_k Tb enters as hi + lo (split_bf), as wt o M does in the pass.
// v[2i], v[2i+1] hold the stored values on entry and the rebuilt ones on return: i = 0: (r0 + g, c0 + 2t, +1),
// 1: (r0 + g, c0 + 8 + 2t, +1), 2: (r0 + g + 8, c0 + 2t, +1), 3: (r0 + g + 8, c0 + 8 + 2t, +1) (g = lane / 4,
// t = lane % 4): the two m16n8 accumulator tiles of columns c0.. and c0 + 8.., which are also the B-fragment pairs
// that mma_state_nk and the x dS / dy S0 products of ssd_bwd_bc_kernel consume. Warp-uniform (mma.sync).
struct Rec {
    const bf16 *Ta, *Tb;
    int lda, ldb;
    const float *sc;  // nullptr: Tb (hi) and Tl (lo) already hold sc_k Tb[k][c] split (presplit), shared by the warps
    float dl;
    const bf16 *Tl;
};
__device__ __forceinline__ float2 bf2_to_f2(unsigned u) {  // a bf16 pair (lower index in the low half) as floats
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
// (Without presplit every warp splits all of sc o Tb that its columns need: in ssd_bwd_dx_kernel, which has no room
// for the lo half, it stays so.)
__device__ __forceinline__ void recon16(float (&v)[8], const Rec &rc, int r0, int c0) {
    const int t = threadIdx.x & 3;
    float d0[4] = {rc.dl * v[0], rc.dl * v[1], rc.dl * v[4], rc.dl * v[5]};  // columns c0..: rows g, g + 8
    float d1[4] = {rc.dl * v[2], rc.dl * v[3], rc.dl * v[6], rc.dl * v[7]};  // columns c0 + 8..
    if (!rc.sc) {  // presplit operand: two fragment loads and four MMAs per k step, nothing else
#pragma unroll
        for (int k0 = 0; k0 < SSD_Q; k0 += 16) {
            unsigned fa[4], fh[4], fl[4];
            lda_col(fa, rc.Ta, rc.lda, r0, k0);
            ldb_kn(fh, rc.Tb, rc.ldb, k0, c0);
            ldb_kn(fl, rc.Tl, rc.ldb, k0, c0);
            mma16816(d0, fa, fh[0], fh[1]), mma16816(d0, fa, fl[0], fl[1]);
            mma16816(d1, fa, fh[2], fh[3]), mma16816(d1, fa, fl[2], fl[3]);
        }
    } else
#pragma unroll
    for (int k0 = 0; k0 < SSD_Q; k0 += 16) {
        unsigned fa[4], fb[4];
        lda_col(fa, rc.Ta, rc.lda, r0, k0);
        ldb_kn(fb, rc.Tb, rc.ldb, k0, c0);
        const float2 s0 = *reinterpret_cast<const float2 *>(rc.sc + k0 + 2 * t);      // rows k0 + 2t, +1
        const float2 s8 = *reinterpret_cast<const float2 *>(rc.sc + k0 + 8 + 2 * t);  // rows k0 + 8 + 2t, +1
        unsigned hi[4], lo[4];  // fb[0], fb[1]: b0, b1 of columns c0..; fb[2], fb[3]: of columns c0 + 8..
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 s = (i & 1) ? s8 : s0, b = bf2_to_f2(fb[i]);
            split2(s.x * b.x, s.y * b.y, hi[i], lo[i]);
        }
        mma16816(d0, fa, hi[0], hi[1]), mma16816(d0, fa, lo[0], lo[1]);
        mma16816(d1, fa, hi[2], hi[3]), mma16816(d1, fa, lo[2], lo[3]);
    }
    v[0] = d0[0], v[1] = d0[1], v[4] = d0[2], v[5] = d0[3];
    v[2] = d1[0], v[3] = d1[1], v[6] = d1[2], v[7] = d1[3];
}

// acc[mt][nt] += A[rows of mt, :K] S^T-fragment, A [m][k] bf16 in shared memory, S an fp32 [rows, K] matrix in global
// memory read straight into B fragments (element (k, n) = S[n0 + n][k], n0 = 16 cb) and split into hi + lo there.
// The next k step's eight values are loaded before this step's MMAs.
// sc_k T[k][c] for a [Q, width] bf16 tile in shared memory (row stride ld), split: hi in place, lo into Tl (same
// stride); the block's threads share the work (the pass splits wt o M the same way). A barrier must follow.
__device__ __forceinline__ void presplit(bf16 *T, bf16 *Tl, int width, int ld, const float *sc) {
    const int w8 = width / 8;
    for (int i = threadIdx.x; i < SSD_Q * w8; i += SSD_THREADS) {
        const int m = i / w8, col = (i - m * w8) * 8;
        const uint4 raw = *reinterpret_cast<const uint4 *>(T + m * ld + col);
        const bf16 *mv = reinterpret_cast<const bf16 *>(&raw);
        const float wk = sc[m];
        __align__(16) bf16 hi[8], lo[8];
#pragma unroll
        for (int e = 0; e < 8; e++) split_bf(wk * bf(mv[e]), &hi[e], &lo[e]);
        *reinterpret_cast<uint4 *>(T + m * ld + col) = *reinterpret_cast<const uint4 *>(hi);
        *reinterpret_cast<uint4 *>(Tl + m * ld + col) = *reinterpret_cast<const uint4 *>(lo);
    }
}

// acc += A rows (the unit's row tiles) x one 16-deep k step of the fp32 state, given as its hi and lo bf16 halves
// (split2 of the step's four float2 fragments): the shared core of mma_state_nk and mma_state_pf.
__device__ __forceinline__ void mma_state_k16(Frag &acc, const Unit &u, const bf16 *A, int lda, int k0, const unsigned (&hi)[4],
                                              const unsigned (&lo)[4]) {
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        if (mt >= u.nmt) break;
        unsigned fa[4];
        lda_row(fa, A, lda, (u.mt0 + mt) * 16, k0);
        mma16816(acc[mt][0], fa, hi[0], hi[1]), mma16816(acc[mt][0], fa, lo[0], lo[1]);
        mma16816(acc[mt][1], fa, hi[2], hi[3]), mma16816(acc[mt][1], fa, lo[2], lo[3]);
    }
}

// REC and rec (v5): S is the stored state one chunk away and every 16 x 16 tile is rebuilt first (recon16: rows n0..,
// columns k0..).
template <bool REC = false>
__device__ __forceinline__ void mma_state_nk(Frag &acc, const Unit &u, const bf16 *A, int lda, const float *S, int ldS,
                                             int n0, int K, const Rec *rc = nullptr, bool rec = false) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    const float *r0 = S + (int64_t)(n0 + g) * ldS + 2 * t, *r1 = r0 + (int64_t)8 * ldS;
    float2 cur[4], nxt[4];
    cur[0] = __ldg(reinterpret_cast<const float2 *>(r0)), cur[1] = __ldg(reinterpret_cast<const float2 *>(r0 + 8));
    cur[2] = __ldg(reinterpret_cast<const float2 *>(r1)), cur[3] = __ldg(reinterpret_cast<const float2 *>(r1 + 8));
    for (int k0 = 0; k0 < K; k0 += 16) {
        if (k0 + 16 < K) {
            const int k1 = k0 + 16;
            nxt[0] = __ldg(reinterpret_cast<const float2 *>(r0 + k1));
            nxt[1] = __ldg(reinterpret_cast<const float2 *>(r0 + k1 + 8));
            nxt[2] = __ldg(reinterpret_cast<const float2 *>(r1 + k1));
            nxt[3] = __ldg(reinterpret_cast<const float2 *>(r1 + k1 + 8));
        }
        if (REC && rec) {
            float v[8] = {cur[0].x, cur[0].y, cur[1].x, cur[1].y, cur[2].x, cur[2].y, cur[3].x, cur[3].y};
            recon16(v, *rc, n0, k0);
#pragma unroll
            for (int i = 0; i < 4; i++) cur[i] = make_float2(v[2 * i], v[2 * i + 1]);
        }
        unsigned hi[4], lo[4];
#pragma unroll
        for (int i = 0; i < 4; i++) split2(cur[i].x, cur[i].y, hi[i], lo[i]);
        mma_state_k16(acc, u, A, lda, k0, hi, lo);
#pragma unroll
        for (int i = 0; i < 4; i++) cur[i] = nxt[i];
    }
}

#ifndef SSD_V6_PF_OUT
#define SSD_V6_PF_OUT 3
#endif
#ifndef SSD_V6_PF_DX
#define SSD_V6_PF_DX 2
#endif
// v6: mma_state_nk's product with the fp32 state loads issued D k steps ahead (v4: one), the first D of them by
// state_pf_begin as early as the kernel knows S (before its tile loads land and its W / E phases run), so that their
// latency overlaps that work instead of stalling the first MMAs. Same values, same MMAs in the same order: the same
// bits as mma_state_nk. The ring slot of a k step is fixed at compile time (the inner loop over the D slots unrolls),
// so the ring stays in registers for any K (a multiple of 16).
template <int D>
struct StatePf {
    float2 v[D][4];
    const float *r0, *r1;
};
template <int D>
__device__ __forceinline__ void state_pf_load(StatePf<D> &pf, int j, int k) {
    pf.v[j][0] = __ldg(reinterpret_cast<const float2 *>(pf.r0 + k));
    pf.v[j][1] = __ldg(reinterpret_cast<const float2 *>(pf.r0 + k + 8));
    pf.v[j][2] = __ldg(reinterpret_cast<const float2 *>(pf.r1 + k));
    pf.v[j][3] = __ldg(reinterpret_cast<const float2 *>(pf.r1 + k + 8));
}
template <int D>
__device__ __forceinline__ void state_pf_begin(StatePf<D> &pf, const float *S, int ldS, int n0, int K) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    pf.r0 = S + (int64_t)(n0 + g) * ldS + 2 * t, pf.r1 = pf.r0 + (int64_t)8 * ldS;
#pragma unroll
    for (int j = 0; j < D; j++)
        if (16 * j < K) state_pf_load(pf, j, 16 * j);
}
template <int D>
__device__ __forceinline__ void mma_state_pf(Frag &acc, const Unit &u, const bf16 *A, int lda, StatePf<D> &pf, int K) {
    for (int kb = 0; kb < K; kb += 16 * D) {
#pragma unroll
        for (int j = 0; j < D; j++) {
            const int k0 = kb + 16 * j;
            if (k0 >= K) break;
            unsigned hi[4], lo[4];
#pragma unroll
            for (int i = 0; i < 4; i++) split2(pf.v[j][i].x, pf.v[j][i].y, hi[i], lo[i]);
            if (k0 + 16 * D < K) state_pf_load(pf, j, k0 + 16 * D);  // the slot is free once split
            mma_state_k16(acc, u, A, lda, k0, hi, lo);
        }
    }
}

// f(mt, nt, hh, row, col) for a unit's output cells: acc[mt][nt][2hh], [2hh+1] are (row, col), (row, col + 1)
template <typename F>
__device__ __forceinline__ void unit_cells(const Unit &u, F f) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        if (mt >= u.nmt) break;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int hh = 0; hh < 2; hh++) f(mt, nt, hh, (u.mt0 + mt) * 16 + g + 8 * hh, u.cb * 16 + 8 * nt + 2 * t);
    }
}

// Per-row sums over a unit's 16 columns of v(mt, nt, hh, row, col) (two columns per call), reduced over the 4 lanes
// of a row: red[cb * Q + row] (each (cb, row) written by one warp).
template <typename F>
__device__ __forceinline__ void unit_row_sums(const Unit &u, float *red, F v) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        if (mt >= u.nmt) break;
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int row = (u.mt0 + mt) * 16 + g + 8 * hh;
            float s = 0.f;
#pragma unroll
            for (int nt = 0; nt < 2; nt++) s += v(mt, nt, hh, row, u.cb * 16 + 8 * nt + 2 * t);
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            if (t == 0) red[u.cb * SSD_Q + row] = s;
        }
    }
}

struct V4Layout {  // shared memory of the v4 kernels (unused regions: size 0)
    int64_t X, DY, B, C, Wh, Wl, E, red, scal, T1, T2, total;
};
// kind 0: ssd_bwd_dx_kernel (X, DY, B, C, W hi/lo, E [Q, Q+1] with 8 rows of partials after it, also the row sums)
// kind 1: ssd_bwd_bc_kernel (X, DY, B, C, V hi/lo in W's place, row sums)
// kind 2: ssd_chunk_out4_kernel (X, B, C, W hi/lo)
// r5 (v5) adds the neighbouring chunk's two tiles for recon16: T1 [Q, P] (x or dy), T2 [Q, N] (B or C). Each kernel
// stays within two blocks per SM (<= 113 KB at P = N = 128): kind 2 gives them their own regions (108 KB; the lo half
// of the presplit T2 goes to B's region once W is formed); kind 1 puts T2 in B's region (B is loaded after the state
// products, behind V and dB) and adds T1 (110 KB; the presplit T1's lo half lives in V's region, V being formed after
// the state products); kind 0 puts T2 in C's region (dead once W and E are formed) and T1 in E's (dead after the
// ddelta bookkeeping), the partials after it (no room for a presplit: recon16 splits in registers there).
__host__ __device__ inline V4Layout v4_layout(int kind, int64_t P, int64_t N, bool r5 = false) {
    const int64_t Q = SSD_Q;
    V4Layout l;
    Carve c;
    l.X = c.take(Q * ld16(P) * 2);
    l.DY = c.take(kind == 2 ? 0 : Q * ld16(P) * 2);
    l.B = c.take(Q * ld16(N) * 2);
    l.C = c.take(Q * ld16(N) * 2);
    l.Wh = c.take(Q * ld16(Q) * 2);
    l.Wl = c.take(Q * ld16(Q) * 2);
    const int64_t e_main = kind == 0 && r5 ? max64(al128(Q * (Q + 1) * 4), Q * ld16(P) * 2) : Q * (Q + 1) * 4;
    l.E = c.take(kind == 0 ? e_main + 8 * Q * 4 : 0);
    l.red = kind == 0 ? l.E + e_main : c.take(kind == 1 ? 8 * Q * 4 : 0);
    l.scal = c.take(SSD_SCAL * Q * 4);
    l.T1 = l.T2 = 0;
    if (r5) {
        l.T1 = kind == 0 ? l.E : c.take(Q * ld16(P) * 2);
        l.T2 = kind == 0 ? l.C : kind == 1 ? l.B : c.take(Q * ld16(N) * 2);
    }
    l.total = c.o;
    return l;
}

// One block per (b, h, chunk): y = din_m C S_in^T + W x + D x, W = (C B^T) o decay o delta (one per chunk: v3's kernel
// formed C B^T and the decays once per 64 rows of P). Each warp owns a unit of y in registers.
// R5 (v5): the passes stored S_in for even chunks only; an odd chunk rebuilds its own from the previous chunk's
// (recon16 inside the C S_in^T product, with that chunk's x, B tiles and w, dlast).
// PF (v6, R5 off): the state loads issued PF k steps ahead, the first PF of them right after the tile loads (StatePf).
template <int PC, int NC, bool R5, int PF = 0>
__global__ void __launch_bounds__(SSD_THREADS, 2) ssd_chunk_out4_kernel(SsdDev a) {
    static_assert(!(R5 && PF), "v6's early state loads are for v4's stored states");
    extern __shared__ __align__(128) unsigned char smem[];
    const int P = PC ? PC : (int)a.P, N = NC ? NC : (int)a.N, Q = SSD_Q;
    const int lP = (int)ld16(P), lN = (int)ld16(N), lQ = (int)ld16(Q);
    const V4Layout lay = v4_layout(2, P, N, R5);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X), *Bs = reinterpret_cast<bf16 *>(smem + lay.B);
    bf16 *Cs = reinterpret_cast<bf16 *>(smem + lay.C);
    bf16 *Wh = reinterpret_cast<bf16 *>(smem + lay.Wh), *Wl = reinterpret_cast<bf16 *>(smem + lay.Wl);
    const Scal sc = scal_at(smem + lay.scal);
    const int64_t c = (int64_t)blockIdx.x % a.nch, bh = (int64_t)blockIdx.x / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, G = a.G, t0 = c * SSD_Q;
    const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
    const float Dh = a.D ? a.D[h] : 0.f;
    const int tid = threadIdx.x, warp = tid >> 5;

    load_rows_async(Cs, N, lN, q, a.vec, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * N; });
    load_rows_async(Bs, N, lN, q, a.vec, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * N; });
    load_rows_async(Xs, P, lP, q, a.vec, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * P; });
    const Unit u = unit_of(warp, P / 16);
    StatePf<PF ? PF : 1> pf;
    if (PF && u.on) state_pf_begin(pf, a.Sin + (bh * a.nch + c) * (int64_t)P * N, N, u.cb * 16, N);
    const bool rec = R5 && (c & 1);  // the previous chunk (full) is the partner
    Rec rc = {};
    if (rec) {
        const int64_t t1 = t0 - SSD_Q, o1 = bh * a.nch + c - 1;
        rc.Ta = reinterpret_cast<const bf16 *>(smem + lay.T1), rc.lda = lP;
        rc.Tb = reinterpret_cast<const bf16 *>(smem + lay.T2), rc.ldb = lN;
        rc.Tl = Bs, rc.sc = nullptr, rc.dl = a.dl[o1];  // w o B of chunk c - 1: hi in T2, lo in B's region (below)
        load_rows_async(reinterpret_cast<bf16 *>(smem + lay.T1), P, lP, SSD_Q, a.vec,
                        [&](int m) { return a.x + ((b * L + t1 + m) * H + h) * P; });
        load_rows_async(reinterpret_cast<bf16 *>(smem + lay.T2), N, lN, SSD_Q, a.vec,
                        [&](int m) { return a.Bm + ((b * L + t1 + m) * G + g) * N; });
        if (tid >= 32 && tid < 32 + SSD_Q) sc.sc2[tid - 32] = a.wv[o1 * SSD_Q + tid - 32];
    }
    if (tid < 32) chunk_scalars(a, b, h, t0, q, sc);
    cp_async_wait_all();
    __syncthreads();
    chunk_weights(sc);
    if (!PF) __syncthreads();  // (v6: the W slab needs chunk_scalars only; din and w are read after its barrier)
    {  // W as hi + lo (the slabs strictly above the diagonal are zero and never read)
        const int mi = (warp >> 1) * 16, kc = (warp & 1) * 32;
        if (kc <= mi + 15) {
            float cb[4][4] = {};
            qq_slab(cb, Cs, lN, Bs, lN, mi, kc, N);
            slab_cells(mi, kc, [&](int j, int hh, int m, int k) {
                unsigned hi, lo;
                split2(cb[j][2 * hh] * decay_mk(sc, m, k) * sc.delta[k],
                       cb[j][2 * hh + 1] * decay_mk(sc, m, k + 1) * sc.delta[k + 1], hi, lo);
                *reinterpret_cast<unsigned *>(Wh + m * lQ + k) = hi;
                *reinterpret_cast<unsigned *>(Wl + m * lQ + k) = lo;
            });
        }
    }
    __syncthreads();
    if (rec) {  // B is dead once W is formed: w o B of chunk c - 1 as hi (in place) + lo (B's region)
        presplit(reinterpret_cast<bf16 *>(smem + lay.T2), Bs, N, lN, sc.sc2);
        __syncthreads();
    }
    if (!u.on) return;
    const int p0 = u.cb * 16;
    Frag acc = {};
    if (PF)
        mma_state_pf(acc, u, Cs, lN, pf, N);  // C S_in^T, its first loads issued at the start
    else if (R5)  // C S_in^T, S_in stored (even c) or rebuilt (odd c) from the stored state entering c - 1
        mma_state_nk<true>(acc, u, Cs, lN, a.Sin + (bh * ((a.nch + 1) / 2) + (c >> 1)) * (int64_t)P * N, N, p0, N,
                           &rc, rec);
    else
        mma_state_nk(acc, u, Cs, lN, a.Sin + (bh * a.nch + c) * (int64_t)P * N, N, p0, N);  // C S_in^T
    unit_cells(u, [&](int mt, int nt, int hh, int row, int col) {
        acc[mt][nt][2 * hh] *= sc.din[row], acc[mt][nt][2 * hh + 1] *= sc.din[row];
    });
    // This loop and its three kin in the backward kernels (V^T C, V B, W^T dy) stay written out: one shared
    // template for the four (same bits) measured 0.5-1.3 % slower backwards on the H100 (2026-11-25; registers
    // allocated differently), so the copies are the price of that 1 %.
    const int last = (u.mt0 + u.nmt - 1) * 16;
    for (int kk = 0; kk <= last; kk += 16) {  // + W x (W lower triangular: k tiles up to the row tile)
        unsigned fx[4];
        ldb_kn(fx, Xs, lP, kk, p0);
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            if (mt >= u.nmt || kk > (u.mt0 + mt) * 16) continue;
            unsigned fw[4];
            lda_row(fw, Wh, lQ, (u.mt0 + mt) * 16, kk);
            mma16816(acc[mt][0], fw, fx[0], fx[1]), mma16816(acc[mt][1], fw, fx[2], fx[3]);
            lda_row(fw, Wl, lQ, (u.mt0 + mt) * 16, kk);
            mma16816(acc[mt][0], fw, fx[0], fx[1]), mma16816(acc[mt][1], fw, fx[2], fx[3]);
        }
    }
    unit_cells(u, [&](int mt, int nt, int hh, int row, int col) {
        if (row >= q) return;
        const float v0 = fmaf(Dh, bf(Xs[row * lP + col]), acc[mt][nt][2 * hh]);
        const float v1 = fmaf(Dh, bf(Xs[row * lP + col + 1]), acc[mt][nt][2 * hh + 1]);
        st_pair(a.y + ((b * L + t0 + row) * H + h) * P + col, v0, v1, a.yvec);
    });
}

// Backward, first of two per-chunk kernels (one block per (b, h, chunk)): dB = w_k (x dS) + V^T C and
// dC = din_m (dy S0) + V B with V = (dy x^T) o decay o delta, and for ssd_bwd_dx_kernel tmp_m = din_m C_m.(dy S0)_m
// (a.tw) and u = dlast <dS, S0> (a.uw). dS and S0 are read once each, straight into fragments.
// R5 (v5): the passes stored S0 for even chunks and dS for odd ones (and the last): an odd chunk rebuilds S0 from the
// previous chunk (x, B, w, dlast), an even one dS from the next (dy, C, din, dlast), inside the x dS / dy S0 loop
// (recon16 on the transposed tiles). The two tiles of that chunk take T1 and B's region, sc o (x or dy) presplit with
// its lo half in V's region; V is formed after the loop, while B comes into its region.
// PF (v6, R5 off): 1: no barrier between chunk_weights and the V slab (which needs chunk_scalars only); 2: that and
// the first k step's dS and S0 loads issued right after the tile loads (v4: after the V slab).
template <int PC, int NC, bool R5, int PF = 0>
__global__ void __launch_bounds__(SSD_THREADS, 2) ssd_bwd_bc_kernel(SsdDev a) {
    static_assert(!(R5 && PF), "v6's early state loads are for v4's stored states");
    extern __shared__ __align__(128) unsigned char smem[];
    const int P = PC ? PC : (int)a.P, N = NC ? NC : (int)a.N, Q = SSD_Q;
    const int lP = (int)ld16(P), lN = (int)ld16(N), lQ = (int)ld16(Q);
    const V4Layout lay = v4_layout(1, P, N, R5);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X), *DYs = reinterpret_cast<bf16 *>(smem + lay.DY);
    bf16 *Bs = reinterpret_cast<bf16 *>(smem + lay.B), *Cs = reinterpret_cast<bf16 *>(smem + lay.C);
    bf16 *Vh = reinterpret_cast<bf16 *>(smem + lay.Wh), *Vl = reinterpret_cast<bf16 *>(smem + lay.Wl);
    float *red = reinterpret_cast<float *>(smem + lay.red);
    const Scal sc = scal_at(smem + lay.scal);
    const int64_t c = (int64_t)blockIdx.x % a.nch, bh = (int64_t)blockIdx.x / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, G = a.G, t0 = c * SSD_Q;
    const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, lg = lane >> 2, lt = lane & 3;

    // R5: rS0 (odd c): S0 rebuilt from chunk c - 1; rdS (even c with a successor): dS rebuilt from chunk c + 1
    const bool rS0 = R5 && (c & 1), rdS = R5 && !(c & 1) && c + 1 < a.nch, rec = rS0 || rdS;
    auto load_b = [&]() {
        load_rows_async(Bs, N, lN, q, a.vec, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * N; });
    };
    load_rows_async(Xs, P, lP, q, a.vec, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * P; });
    load_rows_async(DYs, P, lP, q, a.vec, [&](int m) { return a.dy + ((b * L + t0 + m) * H + h) * P; });
    if (!rec) load_b();
    load_rows_async(Cs, N, lN, q, a.vec, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * N; });
    const Unit u = unit_of(warp, N / 16);
    const int n0 = u.cb * 16;
    const int64_t so = R5 ? (bh * ((a.nch + 1) / 2) + (c >> 1)) * (int64_t)P * N : (bh * a.nch + c) * (int64_t)P * N;
    const float *dS = a.dSo + so, *S0 = a.Sin + so;
    // x dS and dy S0 over k = p; this thread's state cells: rows k0 + 2t + {0, 1, 8, 9}, columns n0 + g + {0, 8}
    // (R5: each stored state is read by two neighbouring blocks, so S0 is not streamed past L2)
    auto load = [&](float (&vs)[8], float (&vz)[8], int k0) {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int64_t o = (int64_t)(k0 + 2 * lt + (i & 1) + ((i >> 1) & 1) * 8) * N + n0 + 8 * (i >> 2) + lg;
            vs[i] = __ldg(dS + o), vz[i] = R5 ? __ldg(S0 + o) : __ldcs(S0 + o);
        }
    };
    float cs[8], cz[8];
    if (PF == 2 && u.on) load(cs, cz, 0);
    Rec rc = {};
    if (rec) {  // Ta = B or C of the partner chunk [Q, N] (in B's region), Tb = its x or dy [Q, P]
        const int64_t c2 = rS0 ? c - 1 : c + 1, t2 = c2 * SSD_Q, o2 = bh * a.nch + c2;
        const int q2 = (int)(L - t2 < SSD_Q ? L - t2 : SSD_Q);
        bf16 *T1 = reinterpret_cast<bf16 *>(smem + lay.T1), *T2 = reinterpret_cast<bf16 *>(smem + lay.T2);
        const bf16 *Tg = rS0 ? a.Bm : a.Cm, *Xg = rS0 ? a.x : a.dy;
        load_rows_async(T2, N, lN, q2, a.vec, [&](int m) { return Tg + ((b * L + t2 + m) * G + g) * N; });
        load_rows_async(T1, P, lP, q2, a.vec, [&](int m) { return Xg + ((b * L + t2 + m) * H + h) * P; });
        if (tid >= 32 && tid < 32 + SSD_Q) sc.sc2[tid - 32] = (rS0 ? a.wv : a.dv)[o2 * SSD_Q + tid - 32];
        // sc o Tb presplit: hi in T1, lo in V's region (V is formed after the state products under R5)
        rc.Ta = T2, rc.lda = lN, rc.Tb = T1, rc.Tl = Vh, rc.ldb = lP, rc.sc = nullptr, rc.dl = a.dl[o2];
    }
    if (tid < 32) chunk_scalars(a, b, h, t0, q, sc);
    cp_async_wait_all();
    __syncthreads();
    chunk_weights(sc);
    if (R5 && rec) presplit(reinterpret_cast<bf16 *>(smem + lay.T1), Vh, P, lP, sc.sc2);
    if (!PF) __syncthreads();
    auto v_slab = [&]() {  // V as hi + lo
        const int mi = (warp >> 1) * 16, kc = (warp & 1) * 32;
        if (kc <= mi + 15) {
            float dg[4][4] = {};
            qq_slab(dg, DYs, lP, Xs, lP, mi, kc, P);
            slab_cells(mi, kc, [&](int j, int hh, int m, int k) {
                unsigned hi, lo;
                split2(dg[j][2 * hh] * decay_mk(sc, m, k) * sc.delta[k],
                       dg[j][2 * hh + 1] * decay_mk(sc, m, k + 1) * sc.delta[k + 1], hi, lo);
                *reinterpret_cast<unsigned *>(Vh + m * lQ + k) = hi;
                *reinterpret_cast<unsigned *>(Vl + m * lQ + k) = lo;
            });
        }
    };
    if (!R5) {
        v_slab();
        __syncthreads();
    }
    float up = 0.f;
    Frag fb = {}, fc = {};
    if (u.on) {
        float ns[8], nz[8];
        if (PF != 2) load(cs, cz, 0);
        const bool ucount = u.mt0 == 0;  // u: each state cell counted by one warp
        for (int k0 = 0; k0 < P; k0 += 16) {
            if (k0 + 16 < P) load(ns, nz, k0 + 16);
            if (R5 && rdS) recon16(cs, rc, n0, k0);  // dS^T tile: rows n0.., columns (p) k0..
            if (R5 && rS0) recon16(cz, rc, n0, k0);
            unsigned sh[4], sl[4], zh[4], zl[4];  // [nt * 2 + (b0, b1)]
#pragma unroll
            for (int i = 0; i < 4; i++) split2(cs[2 * i], cs[2 * i + 1], sh[i], sl[i]);
#pragma unroll
            for (int i = 0; i < 4; i++) split2(cz[2 * i], cz[2 * i + 1], zh[i], zl[i]);
            if (ucount)
#pragma unroll
                for (int i = 0; i < 8; i++) up = fmaf(cs[i], cz[i], up);
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                if (mt >= u.nmt) break;
                unsigned fx[4], fy[4];
                lda_row(fx, Xs, lP, (u.mt0 + mt) * 16, k0);
                lda_row(fy, DYs, lP, (u.mt0 + mt) * 16, k0);
#pragma unroll
                for (int nt = 0; nt < 2; nt++) {
                    mma16816(fb[mt][nt], fx, sh[2 * nt], sh[2 * nt + 1]);
                    mma16816(fb[mt][nt], fx, sl[2 * nt], sl[2 * nt + 1]);
                    mma16816(fc[mt][nt], fy, zh[2 * nt], zh[2 * nt + 1]);
                    mma16816(fc[mt][nt], fy, zl[2 * nt], zl[2 * nt + 1]);
                }
            }
#pragma unroll
            for (int i = 0; i < 8; i++) cs[i] = ns[i], cz[i] = nz[i];
        }
    }
    if (R5) {  // the partner tiles are dead: B into its region, in flight while V and dB are formed
        __syncthreads();
        if (rec) load_b();
        v_slab();
        __syncthreads();
    }
    if (u.on) {
        // dB = w_k (x dS) + V^T C (V^T upper triangular: m tiles from the row tile on)
        unit_cells(u, [&](int mt, int nt, int hh, int row, int col) {
            fb[mt][nt][2 * hh] *= sc.w[row], fb[mt][nt][2 * hh + 1] *= sc.w[row];
        });
        for (int kk = u.mt0 * 16; kk < Q; kk += 16) {
            unsigned fcm[4];
            ldb_kn(fcm, Cs, lN, kk, n0);
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                if (mt >= u.nmt || kk < (u.mt0 + mt) * 16) continue;
                unsigned fv[4];
                lda_col(fv, Vh, lQ, (u.mt0 + mt) * 16, kk);
                mma16816(fb[mt][0], fv, fcm[0], fcm[1]), mma16816(fb[mt][1], fv, fcm[2], fcm[3]);
                lda_col(fv, Vl, lQ, (u.mt0 + mt) * 16, kk);
                mma16816(fb[mt][0], fv, fcm[0], fcm[1]), mma16816(fb[mt][1], fv, fcm[2], fcm[3]);
            }
        }
        unit_cells(u, [&](int mt, int nt, int hh, int row, int col) {
            if (row >= q) return;
            const float v0 = fb[mt][nt][2 * hh], v1 = fb[mt][nt][2 * hh + 1];
            if (a.rep == 1) st_pair(a.dBm + ((b * L + t0 + row) * G + g) * N + col, v0, v1, a.ovec);
            else *reinterpret_cast<float2 *>(a.dBh + ((b * L + t0 + row) * H + h) * N + col) = make_float2(v0, v1);
        });
        // tmp_m's row sums C_m.(dy S0)_m, then dC = din_m (dy S0) + V B (V lower triangular: k tiles up to the row's)
        unit_row_sums(u, red, [&](int mt, int nt, int hh, int row, int col) {
            return fmaf(bf(Cs[row * lN + col]), fc[mt][nt][2 * hh], bf(Cs[row * lN + col + 1]) * fc[mt][nt][2 * hh + 1]);
        });
        unit_cells(u, [&](int mt, int nt, int hh, int row, int col) {
            fc[mt][nt][2 * hh] *= sc.din[row], fc[mt][nt][2 * hh + 1] *= sc.din[row];
        });
    }
    if (R5 && rec) {
        cp_async_wait_all();
        __syncthreads();
    }
    if (u.on) {
        const int last = (u.mt0 + u.nmt - 1) * 16;
        for (int kk = 0; kk <= last; kk += 16) {
            unsigned fbm[4];
            ldb_kn(fbm, Bs, lN, kk, n0);
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                if (mt >= u.nmt || kk > (u.mt0 + mt) * 16) continue;
                unsigned fv[4];
                lda_row(fv, Vh, lQ, (u.mt0 + mt) * 16, kk);
                mma16816(fc[mt][0], fv, fbm[0], fbm[1]), mma16816(fc[mt][1], fv, fbm[2], fbm[3]);
                lda_row(fv, Vl, lQ, (u.mt0 + mt) * 16, kk);
                mma16816(fc[mt][0], fv, fbm[0], fbm[1]), mma16816(fc[mt][1], fv, fbm[2], fbm[3]);
            }
        }
        unit_cells(u, [&](int mt, int nt, int hh, int row, int col) {
            if (row >= q) return;
            const float v0 = fc[mt][nt][2 * hh], v1 = fc[mt][nt][2 * hh + 1];
            if (a.rep == 1) st_pair(a.dCm + ((b * L + t0 + row) * G + g) * N + col, v0, v1, a.ovec);
            else *reinterpret_cast<float2 *>(a.dCh + ((b * L + t0 + row) * H + h) * N + col) = make_float2(v0, v1);
        });
    }
    const float u_raw = block_sum(up, sc.red);  // its barriers also complete red
    const int64_t o = bh * a.nch + c;
    if (tid < SSD_Q) {
        float s = 0.f;
        for (int cb = 0; cb < N / 16; cb++) s += red[cb * SSD_Q + tid];
        a.tw[o * SSD_Q + tid] = sc.din[tid] * s;
    }
    if (tid == 0) a.uw[o] = sc.din[SSD_Q - 1] * u_raw;
}

// Backward, second per-chunk kernel (after ssd_bwd_bc_kernel): dx = D dy + w_k (B dS^T) + W^T dy and ddt, with the
// interval-sum bookkeeping of v3's chunk kernel (E = (dy x^T) o (C B^T) o decay), tmp and u from ssd_bwd_bc_kernel,
// and this block's partials of dA, ddt_bias, dD.
// R5 (v5): dS is stored for odd chunks (and the last); an even chunk rebuilds it from the next chunk's (dy, C, din,
// dlast) inside R = B dS^T (recon16). That chunk's C goes to C's region once W and E are formed, its dy to E's
// region after the ddelta bookkeeping.
// PF (v6, R5 off): the dS loads issued PF k steps ahead, the first PF of them right after the tile loads (StatePf).
template <int PC, int NC, bool R5, int PF = 0>
__global__ void __launch_bounds__(SSD_THREADS, 2) ssd_bwd_dx_kernel(SsdDev a) {
    static_assert(!(R5 && PF), "v6's early state loads are for v4's stored states");
    extern __shared__ __align__(128) unsigned char smem[];
    const int P = PC ? PC : (int)a.P, N = NC ? NC : (int)a.N, Q = SSD_Q;
    const int lP = (int)ld16(P), lN = (int)ld16(N), lQ = (int)ld16(Q);
    const V4Layout lay = v4_layout(0, P, N, R5);
    bf16 *Xs = reinterpret_cast<bf16 *>(smem + lay.X), *DYs = reinterpret_cast<bf16 *>(smem + lay.DY);
    bf16 *Bs = reinterpret_cast<bf16 *>(smem + lay.B), *Cs = reinterpret_cast<bf16 *>(smem + lay.C);
    bf16 *Wh = reinterpret_cast<bf16 *>(smem + lay.Wh), *Wl = reinterpret_cast<bf16 *>(smem + lay.Wl);
    float *Es = reinterpret_cast<float *>(smem + lay.E), *red = reinterpret_cast<float *>(smem + lay.red);
    const Scal sc = scal_at(smem + lay.scal);
    const int64_t c = (int64_t)blockIdx.x % a.nch, bh = (int64_t)blockIdx.x / a.nch;
    const int64_t b = bh / a.H, h = bh % a.H, g = h / a.rep;
    const int64_t L = a.L, H = a.H, G = a.G, t0 = c * SSD_Q, o = bh * a.nch + c;
    const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
    const float Dh = a.D ? a.D[h] : 0.f, Ah = a.A[h];
    const int tid = threadIdx.x, warp = tid >> 5;

    load_rows_async(Xs, P, lP, q, a.vec, [&](int m) { return a.x + ((b * L + t0 + m) * H + h) * P; });
    load_rows_async(DYs, P, lP, q, a.vec, [&](int m) { return a.dy + ((b * L + t0 + m) * H + h) * P; });
    load_rows_async(Bs, N, lN, q, a.vec, [&](int m) { return a.Bm + ((b * L + t0 + m) * G + g) * N; });
    load_rows_async(Cs, N, lN, q, a.vec, [&](int m) { return a.Cm + ((b * L + t0 + m) * G + g) * N; });
    const Unit un = unit_of(warp, P / 16);
    StatePf<PF ? PF : 1> pf;
    if (PF && un.on) state_pf_begin(pf, a.dSo + o * (int64_t)P * N, N, un.cb * 16, N);
    const bool rec = R5 && !(c & 1) && c + 1 < a.nch;  // dS rebuilt from chunk c + 1
    const int64_t t2 = t0 + SSD_Q, o2 = o + 1;
    const int q2 = (int)(L - t2 < SSD_Q ? L - t2 : SSD_Q);
    Rec rc = {};
    if (rec) {
        rc.Ta = reinterpret_cast<const bf16 *>(smem + lay.T1), rc.lda = lP;  // dy of chunk c + 1 [Q, P]
        rc.Tb = reinterpret_cast<const bf16 *>(smem + lay.T2), rc.ldb = lN;  // its C [Q, N]
        rc.sc = sc.sc2, rc.dl = a.dl[o2];
    }
    if (tid < 32) chunk_scalars(a, b, h, t0, q, sc);
    else if (tid < 32 + SSD_Q) sc.tmp[tid - 32] = a.tw[o * SSD_Q + tid - 32];
    else if (rec && tid < 32 + 2 * SSD_Q) sc.sc2[tid - 32 - SSD_Q] = a.dv[o2 * SSD_Q + tid - 32 - SSD_Q];
    const float u = a.uw[o];
    cp_async_wait_all();
    __syncthreads();
    chunk_weights(sc);
    if (!PF) __syncthreads();  // (v6: W and E need chunk_scalars only; w is read after their barrier)
    // W (hi + lo) and E (row stride lE, odd: a warp walking a column or a row hits 32 banks)
    constexpr int lE = SSD_Q + 1;
    {
        const int mi = (warp >> 1) * 16, kc = (warp & 1) * 32;
        if (kc <= mi + 15) {  // (strictly upper slabs: W = E = 0 there, never read)
            float cb[4][4] = {}, dg[4][4] = {};
            qq_slab(cb, Cs, lN, Bs, lN, mi, kc, N);
            qq_slab(dg, DYs, lP, Xs, lP, mi, kc, P);
            slab_cells(mi, kc, [&](int j, int hh, int m, int k) {
                const float l0 = decay_mk(sc, m, k), l1 = decay_mk(sc, m, k + 1);
                const float c0 = cb[j][2 * hh], c1 = cb[j][2 * hh + 1];
                unsigned hi, lo;
                split2(c0 * l0 * sc.delta[k], c1 * l1 * sc.delta[k + 1], hi, lo);
                *reinterpret_cast<unsigned *>(Wh + m * lQ + k) = hi;
                *reinterpret_cast<unsigned *>(Wl + m * lQ + k) = lo;
                Es[m * lE + k] = dg[j][2 * hh] * c0 * l0;
                Es[m * lE + k + 1] = dg[j][2 * hh + 1] * c1 * l1;
            });
        }
    }
    __syncthreads();
    if (rec)  // C is dead: the next chunk's C into its region
        load_rows_async(reinterpret_cast<bf16 *>(smem + lay.T2), N, lN, q2, a.vec,
                        [&](int m) { return a.Cm + ((b * L + t2 + m) * G + g) * N; });
    // ddelta's column sums of E and the row prefixes of M = E delta_k (as v3's chunk kernel)
    static_assert(SSD_THREADS == 4 * SSD_Q, "4 threads per row or column of the chunk");
    float *part1 = red, *part2 = red + 4 * SSD_Q;
    const int ix = tid & (SSD_Q - 1), qr = tid / SSD_Q, r0 = qr * (SSD_Q / 4), r1 = r0 + SSD_Q / 4;
    {
        float cs = 0.f, rs = 0.f;
        for (int m = r0 > ix ? r0 : ix; m < r1; m++) cs += Es[m * lE + ix];
        for (int k = r0; k < r1 && k < ix; k++) rs = fmaf(Es[ix * lE + k], sc.delta[k], rs);
        part1[qr * SSD_Q + ix] = cs;
        part2[qr * SSD_Q + ix] = rs;
    }
    __syncthreads();
    if (tid < SSD_Q) sc.dd[tid] = (part1[tid] + part1[SSD_Q + tid]) + (part1[2 * SSD_Q + tid] + part1[3 * SSD_Q + tid]);
    {
        const int m = ix;
        float pre = 0.f;
        for (int r = 0; r < qr; r++) pre += part2[r * SSD_Q + m];
        for (int j = r0; j < r1; j++) {
            const float e = Es[m * lE + j];
            Es[m * lE + j] = j <= m ? pre : 0.f;
            if (j < m) pre = fmaf(e, sc.delta[j], pre);
        }
    }
    __syncthreads();
    {
        float cs = 0.f;
        for (int m = r0 > ix ? r0 : ix; m < r1; m++) cs += Es[m * lE + ix];
        part1[qr * SSD_Q + ix] = cs;
    }
    __syncthreads();
    if (rec)  // E is dead: the next chunk's dy into its region (the partials lie after it)
        load_rows_async(reinterpret_cast<bf16 *>(smem + lay.T1), P, lP, q2, a.vec,
                        [&](int m) { return a.dy + ((b * L + t2 + m) * H + h) * P; });
    if (tid < SSD_Q) sc.tj[tid] = (part1[tid] + part1[SSD_Q + tid]) + (part1[2 * SSD_Q + tid] + part1[3 * SSD_Q + tid]);
    if (rec) cp_async_wait_all();
    // part1/part2 are free: red holds the row sums below (v6: E's region, dead after the last column sums, so tj
    // above and the products below need no barrier between them)
    if (!PF) __syncthreads();
    float *rsum = PF ? Es : red;
    if (un.on) {
        const int p0 = un.cb * 16;
        Frag acc = {};
        if (PF)
            mma_state_pf(acc, un, Bs, lN, pf, N);  // R = B dS^T, its first loads issued at the start
        else if (R5)  // R = B dS^T, dS stored (odd c, the last c) or rebuilt from the stored one leaving c + 1
            mma_state_nk<true>(acc, un, Bs, lN, a.dSo + (bh * ((a.nch + 1) / 2) + (c >> 1)) * (int64_t)P * N, N, p0,
                               N, &rc, rec);
        else
            mma_state_nk(acc, un, Bs, lN, a.dSo + o * (int64_t)P * N, N, p0, N);  // R = B dS^T
        unit_row_sums(un, rsum, [&](int mt, int nt, int hh, int row, int col) {  // xdsb_k = x_k . R_k
            return fmaf(bf(Xs[row * lP + col]), acc[mt][nt][2 * hh], bf(Xs[row * lP + col + 1]) * acc[mt][nt][2 * hh + 1]);
        });
        unit_cells(un, [&](int mt, int nt, int hh, int row, int col) {  // w_k R + D dy
            float *v = &acc[mt][nt][2 * hh];
            v[0] = fmaf(sc.w[row], v[0], Dh * bf(DYs[row * lP + col]));
            v[1] = fmaf(sc.w[row], v[1], Dh * bf(DYs[row * lP + col + 1]));
        });
        for (int kk = un.mt0 * 16; kk < Q; kk += 16) {  // + W^T dy (W^T upper triangular)
            unsigned fd[4];
            ldb_kn(fd, DYs, lP, kk, p0);
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                if (mt >= un.nmt || kk < (un.mt0 + mt) * 16) continue;
                unsigned fw[4];
                lda_col(fw, Wh, lQ, (un.mt0 + mt) * 16, kk);
                mma16816(acc[mt][0], fw, fd[0], fd[1]), mma16816(acc[mt][1], fw, fd[2], fd[3]);
                lda_col(fw, Wl, lQ, (un.mt0 + mt) * 16, kk);
                mma16816(acc[mt][0], fw, fd[0], fd[1]), mma16816(acc[mt][1], fw, fd[2], fd[3]);
            }
        }
        unit_cells(un, [&](int mt, int nt, int hh, int row, int col) {
            if (row < q)
                st_pair(a.dx + ((b * L + t0 + row) * H + h) * P + col, acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1],
                        a.ovec);
        });
    }
    float pd = 0.f;  // this thread's part of dD's partial: dy . x over a quarter of row j (v6: before the xdsb barrier,
    auto pd_rows = [&]() {  // so that the threads past the first 64 work while those sum xdsb)
        const int j = tid >> 2, c4 = tid & 3;
        if (j < q)
            for (int p = c4; p < P; p += 4) pd = fmaf(bf(DYs[j * lP + p]), bf(Xs[j * lP + p]), pd);
    };
    if (PF) pd_rows();
    __syncthreads();
    if (tid < SSD_Q) {
        float s = 0.f;
        for (int cb = 0; cb < P / 16; cb++) s += rsum[cb * SSD_Q + tid];
        sc.xdsb[tid] = s;
    }
    __syncthreads();
    // da_j, ddt, and this block's partials of dA, ddt_bias, dD (as v3's chunk kernel)
    float pa = 0.f, pb = 0.f;
    if (tid < SSD_Q) {
        const int j = tid;
        float da = u + sc.tj[j];
        for (int m = SSD_Q - 1; m >= j; m--) da += sc.tmp[m];
        for (int k = 0; k < j; k++) da = fmaf(sc.w[k], sc.xdsb[k], da);
        const float ddelta = fmaf(decay_mk(sc, SSD_Q - 1, j), sc.xdsb[j], sc.dd[j]);
        const float dd = fmaf(da, Ah, ddelta);
        pa = da * sc.delta[j];
        if (j < q) {
            const float v = sc.v[j];
            const float graw = a.softplus ? (v > 20.f ? dd : dd / (1.f + expf(-v))) : dd;
            a.ddt[(b * L + t0 + j) * H + h] = __float2bfloat16_rn(graw);
            pb = graw;
        }
    }
    if (!PF) pd_rows();
    const float sa = block_sum(pa, sc.red);
    const float sb = block_sum(pb, sc.red);
    const float sd = block_sum(pd, sc.red);
    if (tid == 0) a.pA[o] = sa, a.pb[o] = sb, a.pD[o] = sd;
}

// ---------------------------------------------------------------------------------------------- v7: passes on mma.sync
// v6's state passes on mma.sync m16n8k16 with ldmatrix fragments, one barrier per chunk, up to three blocks per SM.
// The walk, the tiles (TP x TN of the state per block; pass_tp halves TP only below one block per SM) and the 4-stage
// cp.async pipeline of raw X / M tiles are v3's; what changes is where the fp32 weight enters: v3 splits wt_k M[k, n]
// into a hi + lo copy of M in shared memory (a block-wide pass between two barriers), v7 splits wt_k X[k, p] in
// registers, inside the A fragments of X^T that each warp loads anyway:  S += X^T (wt o M) = (wt o X)^T M,
// A = (wt o X)^T as hi + lo, B = M exact (ldmatrix.trans of the raw stage). With no shared copy to protect, the barrier
// at the top of a chunk (its stage landed; every warp left the previous chunk, whose stage the next loads reuse) is
// the only one, and shared memory is the 4 stages alone (74 KB at TP = TN = 64): 3 blocks of 8 warps fit an SM at
// <= 80 registers (v3: 2, 101 KB with its split copies and WMMA scratch), used where they save a wave (pass7_minb).
// The state stays in mma.sync accumulators (D layout), stored with 8-byte stores straight from them. Not v6's bits
// (the split falls on x or dy instead of B or C: the same ~16 bits of the fp32 factor); the per-chunk kernels are
// v6's. Compiled shapes only (P = 128, N = 128 or 64: TN = 64, TP = 64 or 32); other shapes run v6's pass.
// Warp w owns row tile rt = w % (TP/16) (16 rows of P) and NT = TP * TN / 1024 8-column tiles from (w / (TP/16)) NT.
template <bool GRAD, int PC, int NC, int TPC>
__device__ __forceinline__ void state_pass7(const SsdDev &a, int64_t blk, float *st_all, const float *init,
                                            float *fin) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int P = PC, N = NC, TP = TPC, TN = out_pt(NC), Q = SSD_Q;
    constexpr int lX = (int)ld16(TP), lM = (int)ld16(TN);
    constexpr int NRT = TP / 16, NT = TP * TN / 1024;  // row tiles; 8-column tiles per warp (2 or 4: pairs)
    static_assert(NT % 2 == 0 && NRT * (TN / 8) == 8 * NT, "v7 pass: TP x TN must deal 8 warps even 8-column pairs");
    const PassLayout lay = pass_layout(TP, TN);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int rt = warp % NRT, c0 = (warp / NRT) * NT * 8;  // this warp: rows 16 rt.., columns c0.. of the tile

    constexpr int64_t npt = P / TP, nnt = N / TN;
    const int64_t nt = blk % nnt, rest = blk / nnt;
    const int64_t pt = rest % npt, bh = rest / npt;
    const int64_t b = bh / a.H, h = bh % a.H, p0 = pt * TP, n0 = nt * TN;
    const int64_t L = a.L, nch = a.nch, xs = a.H * P, ms = a.G * NC;  // token strides of X and M
    // bases: token 0 of this block's X columns and M columns, its chunk scalars, its first stored state entry
    const bf16 *Xb = (GRAD ? a.dy : a.x) + (b * L * a.H + h) * P + p0;
    const bf16 *Mb = (GRAD ? a.Cm : a.Bm) + (b * L * a.G + h / a.rep) * NC + n0;
    const float *wb = (GRAD ? a.dv : a.wv) + bh * nch * SSD_Q, *dlb = a.dl + bh * nch;
    const int64_t r0 = p0 + 16 * rt + g;  // this lane's first state row (the other: r0 + 8)
    float *stb = st_all + (bh * nch * P + r0) * N + n0 + c0 + 2 * t;

    // acc[j]: rows (16 rt + g, + 8) x columns (c0 + 8 j + 2 t, + 1) of the tile, as the D fragment of m16n8k16
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            acc[j][e] = init ? init[(bh * P + r0 + 8 * (e >> 1)) * N + n0 + c0 + 8 * j + 2 * t + (e & 1)] : 0.f;

    auto chunk_of = [&](int64_t j) { return GRAD ? nch - 1 - j : j; };
    auto issue = [&](int64_t c, int s) {  // chunk c into stage s (asynchronous when the tensors are 16-byte aligned)
        unsigned char *base = smem + s * lay.stage;
        bf16 *Xd = reinterpret_cast<bf16 *>(base + lay.Xst), *Md = reinterpret_cast<bf16 *>(base + lay.Mst);
        float *wd = reinterpret_cast<float *>(base + lay.Wst);
        const int64_t t0 = c * SSD_Q;
        const int q = (int)(L - t0 < SSD_Q ? L - t0 : SSD_Q);
        const bf16 *Xc = Xb + t0 * xs, *Mc = Mb + t0 * ms;
        load_rows_async(Xd, TP, lX, q, a.vec, [&](int m) { return Xc + m * xs; });
        load_rows_async(Md, TN, lM, q, a.vec, [&](int m) { return Mc + m * ms; });
        const float *wsrc = wb + c * SSD_Q;  // 256-byte aligned (workspace)
        if (tid < SSD_Q / 4) cp_async16(wd + 4 * tid, wsrc + 4 * tid);
        else if (tid == SSD_Q / 4) cp_async4(wd + SSD_Q, dlb + c);
    };
#pragma unroll 1
    for (int s = 0; s < PASS_STAGES - 1; s++) {
        if (s < nch) issue(chunk_of(s), s);
        cp_async_commit();
    }
#pragma unroll 1
    for (int64_t j = 0; j < nch; j++) {
        const int64_t c = chunk_of(j);
        // PASS_STAGES - 1 + j groups committed so far (one per earlier chunk step, maybe empty): chunk j's is done
        // when at most PASS_STAGES - 2 are pending
        cp_async_wait<PASS_STAGES - 2>();
        __syncthreads();  // chunk j's stage visible to all; every warp is done with chunk j - 1 and its stage
        if (j + PASS_STAGES - 1 < nch) issue(chunk_of(j + PASS_STAGES - 1), (int)((j + PASS_STAGES - 1) % PASS_STAGES));
        cp_async_commit();
        const unsigned char *base = smem + (j % PASS_STAGES) * lay.stage;
        const bf16 *Xd = reinterpret_cast<const bf16 *>(base + lay.Xst);
        const bf16 *Md = reinterpret_cast<const bf16 *>(base + lay.Mst);
        const float *wd = reinterpret_cast<const float *>(base + lay.Wst);
        // the state entering chunk c (GRAD: the gradient leaving it), then S = dl S + (wt o X)^T M
        float *st = stb + c * (P * N);
        const float dl = wd[SSD_Q];
#pragma unroll
        for (int jj = 0; jj < NT; jj++) {
            *reinterpret_cast<float2 *>(st + 8 * jj) = make_float2(acc[jj][0], acc[jj][1]);
            *reinterpret_cast<float2 *>(st + 8 * N + 8 * jj) = make_float2(acc[jj][2], acc[jj][3]);
#pragma unroll
            for (int e = 0; e < 4; e++) acc[jj][e] *= dl;
        }
#pragma unroll
        for (int k0 = 0; k0 < Q; k0 += 16) {
            unsigned xa[4], ah[4], al[4];
            lda_col(xa, Xd, lX, 16 * rt, k0);  // A = X^T: a0, a1 at k0 + 2t, +1; a2, a3 at k0 + 2t + 8, +9
            const float2 w0 = *reinterpret_cast<const float2 *>(wd + k0 + 2 * t);
            const float2 w1 = *reinterpret_cast<const float2 *>(wd + k0 + 2 * t + 8);
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const float2 xv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&xa[r]));
                const float2 wv = r < 2 ? w0 : w1;
                split2(wv.x * xv.x, wv.y * xv.y, ah[r], al[r]);
            }
#pragma unroll
            for (int jj = 0; jj < NT; jj += 2) {
                unsigned fb[4];
                ldb_kn(fb, Md, lM, k0, c0 + 8 * jj);  // M [k][n]: columns c0 + 8 jj.. (fb0, fb1), +8.. (fb2, fb3)
                mma16816(acc[jj], ah, fb[0], fb[1]), mma16816(acc[jj], al, fb[0], fb[1]);
                mma16816(acc[jj + 1], ah, fb[2], fb[3]), mma16816(acc[jj + 1], al, fb[2], fb[3]);
            }
        }
    }
    if (!fin) return;
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            fin[(bh * P + r0 + 8 * (e >> 1)) * N + n0 + c0 + 8 * j + 2 * t + (e & 1)] = acc[j][e];
}

// MINB: blocks per SM the registers must allow (3: 80 registers, with a few bytes of spills; 2: up to 128, none); the
// host picks the one that needs fewer waves of blocks (pass7_minb)
template <bool GRAD, int PC, int NC, int TPC, int MINB>
__global__ void __launch_bounds__(SSD_THREADS, MINB) ssd_state_pass7_kernel(SsdDev a, float *st_all,
                                                                             const float *init, float *fin) {
    state_pass7<GRAD, PC, NC, TPC>(a, blockIdx.x, st_all, init, fin);
}
// The backward's two passes in one launch, as ssd_state_pass_both_kernel
template <int PC, int NC, int TPC, int MINB>
__global__ void __launch_bounds__(SSD_THREADS, MINB) ssd_state_pass7_both_kernel(SsdDev a, int64_t nb,
                                                                                  const float *init) {
    if ((int64_t)blockIdx.x < nb) state_pass7<false, PC, NC, TPC>(a, blockIdx.x, a.Sin, init, nullptr);
    else state_pass7<true, PC, NC, TPC>(a, (int64_t)blockIdx.x - nb, a.dSo, a.dhl, a.dh0);
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

// The dynamic shared memory a kernel needs, and the largest carveout (shared memory vs L1) so that the driver does not
// pick a configuration that fits fewer blocks per SM than the registers and shared memory allow.
template <typename K>
int set_smem(K kernel, int64_t bytes, char *err, size_t errlen, const char *who) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
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
    a.PT = SSD_PT;
    return a;
}

// 16-byte loads need 16-byte aligned tensor bases (row offsets are multiples of 16 elements)
bool vec_ok(const void *x, const void *Bm, const void *Cm, const void *dy) {
    const uintptr_t bits = (uintptr_t)x | (uintptr_t)Bm | (uintptr_t)Cm | (uintptr_t)dy;  // NULL: 0
    return (bits & 15) == 0;
}

// Workspaces: byte offsets into one 256-byte aligned buffer. The forward (v2) needs the states [B,H,nch,P,N] and dl;
// the backward also the state gradients and the partials.
struct Ws {
    size_t Sin, dSo, dl, wv, dv, pA, pD, pb, tw, uw, dBh, dCh, total;
};
Ws make_ws(const SsdShape *s, bool bwd) {
    const size_t nch = (size_t)((s->seqlen + SSD_Q - 1) / SSD_Q);
    const size_t states = (size_t)s->batch * s->nheads * nch * s->headdim * s->dstate * 4;
    const size_t parts = (size_t)s->batch * s->nheads * nch * 4;
    const size_t heads =
        bwd && s->ngroups < s->nheads ? (size_t)s->batch * s->seqlen * s->nheads * s->dstate * 4 : 0;
    auto up = [](size_t v) { return (v + 255) & ~(size_t)255; };
    Ws w;
    size_t o = 0;
    w.Sin = o, o = up(o + states);
    w.dl = o, o = up(o + parts);
    w.wv = o, o = up(o + parts * SSD_Q);
    w.dv = o, o = up(o + parts * SSD_Q);
    w.dSo = o, o = up(o + (bwd ? states : 0));
    w.pA = o, o = up(o + (bwd ? parts : 0));
    w.pD = o, o = up(o + (bwd ? parts : 0));
    w.pb = o, o = up(o + (bwd ? parts : 0));
    w.tw = o, o = up(o + (bwd ? parts * SSD_Q : 0));
    w.uw = o, o = up(o + (bwd ? parts : 0));
    w.dBh = o, o = up(o + heads);
    w.dCh = o, o = up(o + heads);
    w.total = o;
    return w;
}

// DISTILL_SSD=v1 selects the first kernels (sequential state passes in shared memory, per 16 rows of P), v2 the
// chunk-parallel state pass (chunk states, then an elementwise scan), v3 the fused state pass with the WMMA chunk
// kernels, v4 v3's state passes (the backward's two in one launch) and the mma.sync chunk kernels.
// v5 (DISTILL_SSD=v5): v4 with the states stored every 128 tokens (the passes' HALF, the per-chunk kernels' R5).
// v6 (DISTILL_SSD=v6): v4 with the per-chunk kernels' fp32 state loads issued earlier and further ahead (PF:
// SSD_V6_PF_OUT / SSD_V6_PF_DX k steps, the first ones at the kernel's start) and fewer barriers; the same bits as v4.
// v7 (the default; DISTILL_SSD=v6 for the kernels before it): v6 with the state passes on mma.sync (state_pass7) at
// the compiled shapes.
int ssd_version(void) {
    const char *v = getenv("DISTILL_SSD");
    if (v && !strcmp(v, "v1")) return 1;
    if (v && !strcmp(v, "v2")) return 2;
    if (v && !strcmp(v, "v3")) return 3;
    if (v && !strcmp(v, "v4")) return 4;
    if (v && !strcmp(v, "v5")) return 5;
    if (v && !strcmp(v, "v6")) return 6;
    return 7;
}
bool use_v1(void) { return ssd_version() == 1; }

// DISTILL_SSD_TIMING=1: every call synchronizes and prints the time of each of its stages to stderr (diagnostics).
struct Stages {
    bool on = false;
    int n = 0;
    cudaEvent_t ev[8];
    const char *name[8];
    cudaStream_t st;
    Stages(const char *who, cudaStream_t s) : st(s) {
        const char *v = getenv("DISTILL_SSD_TIMING");
        on = v && v[0] == '1';
        name[0] = who;
        mark(who);
    }
    void mark(const char *what) {
        if (!on || n >= 8) return;
        cudaEventCreate(&ev[n]);
        cudaEventRecord(ev[n], st);
        name[n++] = what;
    }
    ~Stages() {
        if (!on) return;
        cudaEventSynchronize(ev[n - 1]);
        fprintf(stderr, "%s stages ms:", name[0]);
        for (int i = 1; i < n; i++) {
            float ms = 0.f;
            cudaEventElapsedTime(&ms, ev[i - 1], ev[i]);
            fprintf(stderr, " %s %.3f", name[i], ms);
        }
        fprintf(stderr, "\n");
        for (int i = 0; i < n; i++) cudaEventDestroy(ev[i]);
    }
};

int64_t grid_of(int64_t threads, int per) { return (threads + per - 1) / per; }

// Rows of P per block of the sequential state pass: out_pt(P), halved (down to 32) while that leaves fewer than
// per_sm blocks per SM (e.g. 1 x 8192 with 32 heads: 128 blocks of 64 x 64 -> 256 of 32 x 64). v3-v6: 2 per SM (as
// many as fit); v7: 1, so that the backward's two passes at 1 x 8192 keep 256 blocks of 64 x 64, one wave, rather
// than 512 of 32 x 64 (2 waves at 2 per SM, 1.3 at 3).
int sm_count(void) {
    int dev = 0, sms = 132;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev))
        sms = 132;
    return sms;
}
int pass_tp(const SsdDev &a, int passes = 1, int per_sm = 2) {  // passes: launched together (both kernels: 2)
    const int sms = sm_count();
    int tp = out_pt(a.P);
    while (tp % 64 == 0 && passes * a.B * a.H * (a.P / tp) * (a.N / out_pt(a.N)) < per_sm * sms) tp /= 2;
    return tp;
}
int64_t pass_grid(const SsdDev &a, int tp) { return a.B * a.H * (a.P / tp) * (a.N / out_pt(a.N)); }

// The (P, N) shapes compiled with sizes as constants (MambaInLlama-8B: 128/128, and 128/64); any other runs the
// kernels' run-time-size instances (<0, 0>). f receives the two sizes as std::integral_constant.
template <typename F>
int by_shape(int64_t P, int64_t N, F f) {
    using std::integral_constant;
    if (P == 128 && N == 128) return f(integral_constant<int, 128>(), integral_constant<int, 128>());
    if (P == 128 && N == 64) return f(integral_constant<int, 128>(), integral_constant<int, 64>());
    return f(integral_constant<int, 0>(), integral_constant<int, 0>());
}

// v7's passes run (state_pass7): v7 (the default) at a shape compiled by by_shape (P 128, N 128 or 64), not v5's HALF
template <bool HALF>
bool pass7_ok(const SsdDev &a) { return !HALF && ssd_version() == 7 && a.P == 128 && (a.N == 128 || a.N == 64); }
// v7's instance for a grid of `blocks`: 3 blocks per SM where that takes fewer waves than 2 (8 x 2048: 1024 blocks in
// 3 waves instead of 4), else 2 (512 blocks: 2 waves either way, and the 2-per-SM instance does not spill)
int pass7_minb(int64_t blocks) {
    const int64_t sms = sm_count();
    return (blocks + 3 * sms - 1) / (3 * sms) < (blocks + 2 * sms - 1) / (2 * sms) ? 3 : 2;
}

// The sequential state pass (GRAD: the state-gradient pass) with its P tile tp (HALF: v5's, every other state)
template <bool GRAD, bool HALF = false>
int launch_pass(const SsdDev &a, float *st_all, const float *init, float *fin, cudaStream_t st, char *err,
                size_t errlen, const char *who) {
    const int tp = pass_tp(a, 1, pass7_ok<HALF>(a) ? 1 : 2);
    const int64_t smem = pass_layout(tp, out_pt(a.N)).total;
    return by_shape(a.P, a.N, [&](auto pc, auto nc) {
        constexpr int PC = decltype(pc)::value, NC = decltype(nc)::value;
        auto go = [&](auto kernel) {
            if (set_smem(kernel, smem, err, errlen, who)) return -1;
            kernel<<<(unsigned)pass_grid(a, tp), SSD_THREADS, (size_t)smem, st>>>(a, tp, st_all, init, fin);
            return scan_launch_check(err, errlen, who);
        };
        if constexpr (PC != 0 && !HALF) {  // v7: the mma.sync pass at the compiled shapes (the stages alone)
            auto go7 = [&](auto k3, auto k2) {  // the instances for 3 and 2 blocks per SM
                const int64_t smem7 = PASS_STAGES * pass_layout(tp, out_pt(a.N)).stage, blocks = pass_grid(a, tp);
                auto kernel = pass7_minb(blocks) == 3 ? k3 : k2;
                if (set_smem(kernel, smem7, err, errlen, who)) return -1;
                kernel<<<(unsigned)blocks, SSD_THREADS, (size_t)smem7, st>>>(a, st_all, init, fin);
                return scan_launch_check(err, errlen, who);
            };
            if (pass7_ok<HALF>(a) && tp == 64)
                return go7(ssd_state_pass7_kernel<GRAD, PC, NC, 64, 3>, ssd_state_pass7_kernel<GRAD, PC, NC, 64, 2>);
            if (pass7_ok<HALF>(a) && tp == 32)
                return go7(ssd_state_pass7_kernel<GRAD, PC, NC, 32, 3>, ssd_state_pass7_kernel<GRAD, PC, NC, 32, 2>);
        }
        if (PC && tp == 64) return go(ssd_state_pass_kernel<GRAD, PC, NC, (PC ? 64 : 0), HALF>);
        if (PC && tp == 32) return go(ssd_state_pass_kernel<GRAD, PC, NC, (PC ? 32 : 0), HALF>);
        return go(ssd_state_pass_kernel<GRAD, 0, 0, 0, HALF>);
    });
}

// Both passes of the backward in one launch (v4; HALF: v5); the scalars kernel must have run.
template <bool HALF>
int launch_passes_both(const SsdDev &a, const float *init, cudaStream_t st, char *err, size_t errlen, const char *who) {
    const int tp = pass_tp(a, 2, pass7_ok<HALF>(a) ? 1 : 2);
    const int64_t smem = pass_layout(tp, out_pt(a.N)).total, nb = pass_grid(a, tp);
    if (2 * nb > 0x7fffffff) return scan_fail(err, errlen, "%s: %lld blocks exceed the grid limit", who, (long long)(2 * nb));
    return by_shape(a.P, a.N, [&](auto pc, auto nc) {
        constexpr int PC = decltype(pc)::value, NC = decltype(nc)::value;
        auto go = [&](auto kernel) {
            if (set_smem(kernel, smem, err, errlen, who)) return -1;
            kernel<<<(unsigned)(2 * nb), SSD_THREADS, (size_t)smem, st>>>(a, tp, nb, init);
            return scan_launch_check(err, errlen, who);
        };
        if constexpr (PC != 0 && !HALF) {  // v7: the mma.sync passes at the compiled shapes (the stages alone)
            auto go7 = [&](auto k3, auto k2) {  // the instances for 3 and 2 blocks per SM
                const int64_t smem7 = PASS_STAGES * pass_layout(tp, out_pt(a.N)).stage;
                auto kernel = pass7_minb(2 * nb) == 3 ? k3 : k2;
                if (set_smem(kernel, smem7, err, errlen, who)) return -1;
                kernel<<<(unsigned)(2 * nb), SSD_THREADS, (size_t)smem7, st>>>(a, nb, init);
                return scan_launch_check(err, errlen, who);
            };
            if (pass7_ok<HALF>(a) && tp == 64)
                return go7(ssd_state_pass7_both_kernel<PC, NC, 64, 3>, ssd_state_pass7_both_kernel<PC, NC, 64, 2>);
            if (pass7_ok<HALF>(a) && tp == 32)
                return go7(ssd_state_pass7_both_kernel<PC, NC, 32, 3>, ssd_state_pass7_both_kernel<PC, NC, 32, 2>);
        }
        if (PC && tp == 64) return go(ssd_state_pass_both_kernel<PC, NC, (PC ? 64 : 0), HALF>);
        if (PC && tp == 32) return go(ssd_state_pass_both_kernel<PC, NC, (PC ? 32 : 0), HALF>);
        return go(ssd_state_pass_both_kernel<0, 0, 0, HALF>);
    });
}

// The state entering every chunk into a.Sin (h_last into fin): v3 (scalars, fused pass) or v2 (chunk states, scan).
int chunk_states(const SsdDev &a, const float *init, float *fin, cudaStream_t st, Stages &tm, char *err, size_t errlen,
              const char *who) {
    if (ssd_version() >= 3) {
        ssd_scalars_kernel<<<(unsigned)(a.B * a.H * a.nch), SSD_Q, 0, st>>>(a);
        if (scan_launch_check(err, errlen, who)) return -1;
        tm.mark("scalars");
        if (ssd_version() == 5 ? launch_pass<false, true>(a, a.Sin, init, fin, st, err, errlen, who)
                               : launch_pass<false>(a, a.Sin, init, fin, st, err, errlen, who))
            return -1;
        tm.mark("state_pass");
        return 0;
    }
    const int64_t smem = cst_layout(a.P, a.N).total;
    if (set_smem(ssd_chunk_state_kernel<false>, smem, err, errlen, who)) return -1;
    ssd_chunk_state_kernel<false><<<(unsigned)(a.B * a.H * a.nch), SSD_THREADS, (size_t)smem, st>>>(a);
    if (scan_launch_check(err, errlen, who)) return -1;
    tm.mark("chunk_state");
    ssd_scan_kernel<false><<<(unsigned)grid_of(a.B * a.H * a.P * a.N / 4, 256), 256, 0, st>>>(a, a.Sin, init, fin);
    if (scan_launch_check(err, errlen, who)) return -1;
    tm.mark("scan");
    return 0;
}

}  // namespace

extern "C" size_t ssd_fwd_cuda_workspace(const SsdShape *s) { return make_ws(s, false).total; }

extern "C" int ssd_fwd_cuda(const SsdShape *s, const uint16_t *x, const uint16_t *dt, const float *A,
                            const uint16_t *Bm, const uint16_t *Cm, const float *D, const float *dt_bias,
                            const uint8_t *reset, const float *h0, uint16_t *y, float *h_last, void *workspace,
                            ssd_stream_t stream, char *err, size_t errlen) {
    const char *who = "ssd_fwd_cuda";
    if (check_shape(s, err, errlen, who)) return -1;
    if (!x || !dt || !A || !Bm || !(y || h_last))
        return scan_fail(err, errlen, "%s: x, dt, A, Bm and one of y / h_last are required", who);
    if (y && !Cm) return scan_fail(err, errlen, "%s: Cm is required for y", who);
    if ((uintptr_t)workspace % 256) return scan_fail(err, errlen, "%s: workspace is not 256-byte aligned", who);
    SsdDev a = make_args(s);
    a.x = (const bf16 *)x, a.dt = (const bf16 *)dt, a.Bm = (const bf16 *)Bm, a.Cm = (const bf16 *)Cm;
    a.A = A, a.D = D, a.bias = dt_bias, a.reset = reset, a.h0 = h0;
    a.y = (bf16 *)y, a.h_last = h_last;
    a.vec = vec_ok(x, Bm, Cm, nullptr);
    a.yvec = ((uintptr_t)y & 3) == 0;
    cudaStream_t st = (cudaStream_t)stream;
    static const char *names[] = {"",      "ssd_fwd_cuda v1", "ssd_fwd_cuda v2", "ssd_fwd_cuda v3", "ssd_fwd_cuda v4",
                                  "ssd_fwd_cuda v5", "ssd_fwd_cuda v6", "ssd_fwd_cuda v7"};
    Stages tm(names[workspace ? ssd_version() : 1], st);
    if (workspace && !use_v1()) {  // v2: chunk states, scan, chunk outputs
        const int64_t blocks = a.B * a.H * a.nch * (a.P / out_pt(a.P));
        if (blocks > 0x7fffffff)
            return scan_fail(err, errlen, "%s: %lld blocks exceed the grid limit", who, (long long)blocks);
        const Ws w = make_ws(s, false);
        a.Sin = (float *)((char *)workspace + w.Sin), a.dl = (float *)((char *)workspace + w.dl);
        a.wv = (float *)((char *)workspace + w.wv), a.dv = (float *)((char *)workspace + w.dv);
        const bool v4 = ssd_version() >= 4, v5 = ssd_version() == 5, v6 = ssd_version() >= 6;  // v7: v6's chunk outputs
        const int64_t smem = v4 ? v4_layout(2, a.P, a.N, v5).total : out_layout(out_pt(a.P), a.N).total;
        if (smem_ok(max64(smem, cst_layout(a.P, a.N).total), err, errlen, who)) return -1;
        if (chunk_states(a, h0, h_last, st, tm, err, errlen, who)) return -1;
        if (y && v4) {  // one block per (b, h, chunk)
            if (by_shape(a.P, a.N, [&](auto pc, auto nc) {
                    constexpr int PC = decltype(pc)::value, NC = decltype(nc)::value;
                    auto go = [&](auto kernel) {
                        if (set_smem(kernel, smem, err, errlen, who)) return -1;
                        kernel<<<(unsigned)(a.B * a.H * a.nch), SSD_THREADS, (size_t)smem, st>>>(a);
                        return scan_launch_check(err, errlen, who);
                    };
                    return v5   ? go(ssd_chunk_out4_kernel<PC, NC, true>)
                           : v6 ? go(ssd_chunk_out4_kernel<PC, NC, false, SSD_V6_PF_OUT>)
                                : go(ssd_chunk_out4_kernel<PC, NC, false>);
                }))
                return -1;
            tm.mark("chunk_out");
        } else if (y) {
            if (by_shape(a.P, a.N, [&](auto pc, auto nc) {
                    auto kernel = ssd_chunk_out_kernel<decltype(pc)::value, decltype(nc)::value>;
                    if (set_smem(kernel, smem, err, errlen, who)) return -1;
                    kernel<<<(unsigned)blocks, SSD_THREADS, (size_t)smem, st>>>(a);
                    return scan_launch_check(err, errlen, who);
                }))
                return -1;
            tm.mark("chunk_out");
        }
        return 0;
    }
    const int64_t blocks = a.B * a.H * (a.P / a.PT);
    if (blocks > 0x7fffffff) return scan_fail(err, errlen, "%s: %lld blocks exceed the grid limit", who, (long long)blocks);
    const int64_t smem = fwd_layout(a.N).total;
    if (smem_ok(smem, err, errlen, who)) return -1;
    if (y) {
        if (set_smem(ssd_fwd_kernel<true>, smem, err, errlen, who)) return -1;
        ssd_fwd_kernel<true><<<(unsigned)blocks, SSD_THREADS, (size_t)smem, st>>>(a);
    } else {
        if (set_smem(ssd_fwd_kernel<false>, smem, err, errlen, who)) return -1;
        ssd_fwd_kernel<false><<<(unsigned)blocks, SSD_THREADS, (size_t)smem, st>>>(a);
    }
    if (scan_launch_check(err, errlen, who)) return -1;
    tm.mark("fused");
    return 0;
}

extern "C" size_t ssd_bwd_cuda_workspace(const SsdShape *s) { return make_ws(s, true).total; }

// kept (fwd_states): the forward left the states entering the chunks and the chunk scalars in the workspace (its
// regions are the first ones of the backward's: same offsets), so only the state-gradient pass runs (v4-v7).
extern "C" int ssd_bwd_cuda(const SsdShape *s, const uint16_t *x, const uint16_t *dt, const float *A,
                            const uint16_t *Bm, const uint16_t *Cm, const float *D, const float *dt_bias,
                            const uint8_t *reset, const float *h0, const uint16_t *dy, const float *dh_last,
                            uint16_t *dx, uint16_t *ddt, float *dA, uint16_t *dBm, uint16_t *dCm, float *dD,
                            float *ddt_bias, float *dh0, void *workspace, int fwd_states, ssd_stream_t stream,
                            char *err, size_t errlen) {
    const bool kept = fwd_states != 0;
    const char *who = kept ? "ssd_bwd_cuda (forward's states kept)" : "ssd_bwd_cuda";
    if (check_shape(s, err, errlen, who)) return -1;
    if (!x || !dt || !A || !Bm || !Cm || !dy || !dx || !ddt || !dA || !dBm || !dCm || !workspace)
        return scan_fail(err, errlen, "%s: x, dt, A, Bm, Cm, dy, dx, ddt, dA, dBm, dCm and workspace are required", who);
    if ((uintptr_t)workspace % 256) return scan_fail(err, errlen, "%s: workspace is not 256-byte aligned", who);
    SsdDev a = make_args(s);
    a.x = (const bf16 *)x, a.dt = (const bf16 *)dt, a.Bm = (const bf16 *)Bm, a.Cm = (const bf16 *)Cm;
    a.dy = (const bf16 *)dy;
    a.vec = vec_ok(x, Bm, Cm, dy);
    a.A = A, a.D = D, a.bias = dt_bias, a.reset = reset, a.h0 = h0, a.dhl = dh_last;
    a.dx = (bf16 *)dx, a.ddt = (bf16 *)ddt, a.dBm = (bf16 *)dBm, a.dCm = (bf16 *)dCm;
    a.ovec = (((uintptr_t)dx | (uintptr_t)dBm | (uintptr_t)dCm) & 3) == 0;
    a.dh0 = h0 ? dh0 : nullptr;
    const Ws w = make_ws(s, true);
    char *ws = (char *)workspace;
    a.Sin = (float *)(ws + w.Sin), a.dSo = (float *)(ws + w.dSo), a.dl = (float *)(ws + w.dl);
    a.wv = (float *)(ws + w.wv), a.dv = (float *)(ws + w.dv);
    a.pA = (float *)(ws + w.pA), a.pD = (float *)(ws + w.pD), a.pb = (float *)(ws + w.pb);
    a.tw = (float *)(ws + w.tw), a.uw = (float *)(ws + w.uw);
    if (a.rep > 1) a.dBh = (float *)(ws + w.dBh), a.dCh = (float *)(ws + w.dCh);
    const int ver = ssd_version();
    const bool v1 = ver == 1;
    if (kept && ver < 4)
        return scan_fail(err, errlen, "%s: the forward's states are kept by the v4-v7 kernels only (DISTILL_SSD=v%d)",
                         who, ver);

    const int64_t pass_blocks = a.B * a.H * (a.P / a.PT), chunk_blocks = a.B * a.H * a.nch;
    if (chunk_blocks > 0x7fffffff)
        return scan_fail(err, errlen, "%s: %lld blocks exceed the grid limit", who, (long long)chunk_blocks);
    const int64_t smem_fwd = fwd_layout(a.N).total, smem_dst = dst_layout(a.N).total;
    const int64_t smem_chunk = chunk_layout(a.P, a.N).total, smem_cst = cst_layout(a.P, a.N).total;
    if (smem_ok(max64(max64(v1 ? smem_fwd : smem_cst, smem_dst), smem_chunk), err, errlen, who)) return -1;
    cudaStream_t st = (cudaStream_t)stream;
    static const char *names[] = {"",      "ssd_bwd_cuda v1", "ssd_bwd_cuda v2", "ssd_bwd_cuda v3", "ssd_bwd_cuda v4",
                                  "ssd_bwd_cuda v5", "ssd_bwd_cuda v6", "ssd_bwd_cuda v7"};
    Stages tm(names[ver], st);
    if (v1) {
        if (set_smem(ssd_fwd_kernel<false>, smem_fwd, err, errlen, who) ||
            set_smem(ssd_dstate_kernel, smem_dst, err, errlen, who))
            return -1;
        // 1. states entering every chunk (forward recompute, no y)
        ssd_fwd_kernel<false><<<(unsigned)pass_blocks, SSD_THREADS, (size_t)smem_fwd, st>>>(a);
        if (scan_launch_check(err, errlen, "ssd_bwd_cuda: state pass")) return -1;
        tm.mark("state_pass");
        // 2. state gradients leaving every chunk, dh0
        ssd_dstate_kernel<<<(unsigned)pass_blocks, SSD_THREADS, (size_t)smem_dst, st>>>(a);
        if (scan_launch_check(err, errlen, "ssd_bwd_cuda: state-gradient pass")) return -1;
        tm.mark("dstate_pass");
    } else if (kept) {
        // 1. (the forward's chunk scalars and states) 2. the state-gradient pass alone (v5: every other one stored)
        if (ver == 5 ? launch_pass<true, true>(a, a.dSo, a.dhl, a.dh0, st, err, errlen, "ssd_bwd_cuda: state-gradient pass")
                     : launch_pass<true>(a, a.dSo, a.dhl, a.dh0, st, err, errlen, "ssd_bwd_cuda: state-gradient pass"))
            return -1;
        tm.mark("dstate_pass");
    } else if (ver >= 4) {
        // 1 + 2. the chunk scalars, then the state pass and the state-gradient pass in one launch (v5: every other
        //    state stored)
        ssd_scalars_kernel<<<(unsigned)(a.B * a.H * a.nch), SSD_Q, 0, st>>>(a);
        if (scan_launch_check(err, errlen, "ssd_bwd_cuda: scalars")) return -1;
        tm.mark("scalars");
        if (ver == 5 ? launch_passes_both<true>(a, h0, st, err, errlen, "ssd_bwd_cuda: state passes")
                     : launch_passes_both<false>(a, h0, st, err, errlen, "ssd_bwd_cuda: state passes"))
            return -1;
        tm.mark("passes");
    } else {
        // 1. states entering every chunk: chunk contributions, then the scan
        if (chunk_states(a, h0, nullptr, st, tm, err, errlen, "ssd_bwd_cuda: states")) return -1;
        // 2. state gradients leaving every chunk (dh0 at the end): the fused reverse pass (v3), or the chunk
        //    contributions and the reverse scan (v2)
        if (ver >= 3) {
            if (launch_pass<true>(a, a.dSo, a.dhl, a.dh0, st, err, errlen, "ssd_bwd_cuda: state-gradient pass"))
                return -1;
            tm.mark("dstate_pass");
        } else {
            if (set_smem(ssd_chunk_state_kernel<true>, smem_cst, err, errlen, who)) return -1;
            ssd_chunk_state_kernel<true><<<(unsigned)chunk_blocks, SSD_THREADS, (size_t)smem_cst, st>>>(a);
            if (scan_launch_check(err, errlen, "ssd_bwd_cuda: chunk state gradients")) return -1;
            tm.mark("chunk_dstate");
            const int64_t sb = grid_of(a.B * a.H * a.P * a.N / 4, 256);
            ssd_scan_kernel<true><<<(unsigned)sb, 256, 0, st>>>(a, a.dSo, a.dhl, a.dh0);
            if (scan_launch_check(err, errlen, "ssd_bwd_cuda: state-gradient scan")) return -1;
            tm.mark("rscan");
        }
    }
    // 3. per-chunk gradients: v4's two kernels (dB/dC with tmp and u, then dx and ddt), or the single chunk kernel
    if (ver >= 4) {
        const bool v5 = ver == 5;
        const int64_t sbc = v4_layout(1, a.P, a.N, v5).total, sdx = v4_layout(0, a.P, a.N, v5).total;
        if (smem_ok(max64(sbc, sdx), err, errlen, who)) return -1;
        if (by_shape(a.P, a.N, [&](auto pc, auto nc) {
                constexpr int PC = decltype(pc)::value, NC = decltype(nc)::value;
                auto go = [&](auto bc, auto dx) {
                    if (set_smem(bc, sbc, err, errlen, who)) return -1;
                    bc<<<(unsigned)chunk_blocks, SSD_THREADS, (size_t)sbc, st>>>(a);
                    if (scan_launch_check(err, errlen, "ssd_bwd_cuda: dB/dC gradients")) return -1;
                    tm.mark("bc_grads");
                    if (set_smem(dx, sdx, err, errlen, who)) return -1;
                    dx<<<(unsigned)chunk_blocks, SSD_THREADS, (size_t)sdx, st>>>(a);
                    if (scan_launch_check(err, errlen, "ssd_bwd_cuda: dx/ddt gradients")) return -1;
                    tm.mark("dx_grads");
                    return 0;
                };
                return v5 ? go(ssd_bwd_bc_kernel<PC, NC, true>, ssd_bwd_dx_kernel<PC, NC, true>)
                     : ver >= 6 ? go(ssd_bwd_bc_kernel<PC, NC, false, NC == 128 ? 2 : 1>,
                                   ssd_bwd_dx_kernel<PC, NC, false, SSD_V6_PF_DX>)
                                : go(ssd_bwd_bc_kernel<PC, NC, false>, ssd_bwd_dx_kernel<PC, NC, false>);
            }))
            return -1;
    } else {
        if (by_shape(a.P, a.N, [&](auto pc, auto nc) {
                auto kernel = ssd_bwd_chunk_kernel<decltype(pc)::value, decltype(nc)::value>;
                if (set_smem(kernel, smem_chunk, err, errlen, who)) return -1;
                kernel<<<(unsigned)chunk_blocks, SSD_THREADS, (size_t)smem_chunk, st>>>(a);
                return scan_launch_check(err, errlen, "ssd_bwd_cuda: chunk gradients");
            }))
            return -1;
        tm.mark("chunk_grads");
    }
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
    tm.mark("reduce");
    return 0;
}
