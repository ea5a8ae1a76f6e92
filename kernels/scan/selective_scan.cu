// selective_scan.cu: the Mamba-1 selective scan on Hopper: forward (with an optional time-segment pre-pass),
// deterministic backward, multi-token decode. Design notes: docs/KERNELS.md.
//
// Work mapping. Forward: two lanes per (batch row, channel), N/2 states each (v11: 32-step tiles; v10: 16).
// Backward v12 (the default for MambaInLlama's shapes; scan_bwd11_kernel<DB, 12>), v13 (DISTILL_SCAN_BWD=v13, <DB, 13>)
// and v11 (DISTILL_SCAN_BWD=v11, <DB, 11>): two lanes per channel, 8-step groups of states and decays in registers,
// dB/dC summed per warp through shared memory (v12: lagged one step, scaled on the reading side; v13: the state
// before each group read from the forward's checkpoints every 8 steps instead of a sweep per chunk). Backward v10 (other shapes,
// DISTILL_SCAN_BWD=v10): 4 consecutive lanes own one recurrence and split its N states (R = N/4 each), so that a
// warp covers 8 channels and a C group of 16 channels spans 64 lanes; time advances in groups of 4 steps, lane q
// "owns" step t0+q of each group: it loads that step's per-channel scalars (u, dt, z, dout), computes
// softplus/sigmoid once, shares them with its 3 neighbours by shuffles, and after the group receives the step's
// sums over states (a 2-round reduce-scatter) to write that step's outputs. Decode: 4 lanes per channel. Every
// per-(token, channel) transcendental is computed once per pass.
#include "kernels/scan/scan_common.cuh"
#include "kernels/scan/selective_scan_cuda.h"

#include <stdlib.h>
#include <string.h>

#define FULL_MASK 0xffffffffu

namespace {

constexpr int QL = 4;             // lanes per channel
constexpr int FWD_THREADS = 128;  // 32 channels per forward block

struct FwdArgs {
    int64_t B, L, D, Gc, Gb, Dg, Db;
    const bf16 *u, *dt, *Bm, *Cm, *z;
    const float *A, *Dskip, *delta_bias, *h0;
    const uint8_t *reset;
    bf16 *out;
    float *h_last, *ckpt;
    int nseg;
    int64_t seglen, nck;  // nck: checkpoints per batch row (ceil(L / 64), or ceil(L / 8) when ck8)
    int ck8;              // 1: the state before every 8th step (backward v13), else before every 64th
    float *seg_h;   // [B, nseg, D, N] end state of each segment started from zero
    float *seg_sd;  // [B, nseg, D]    sum of delta after the segment's last reset
    int *seg_rs;    // [B, nseg, D]    1 if the segment holds a reset
};

// Sums v[j] over the 4 lanes of a channel and returns to lane q the sum for j = q (3 shuffles for 4 sums).
__device__ __forceinline__ float reduce_scatter4(const float (&v)[4], int q) {
    const bool hi = q & 2;
    float k0 = hi ? v[2] : v[0], k1 = hi ? v[3] : v[1];
    const float s0 = hi ? v[0] : v[2], s1 = hi ? v[1] : v[3];
    k0 += __shfl_xor_sync(FULL_MASK, s0, 2);
    k1 += __shfl_xor_sync(FULL_MASK, s1, 2);
    const bool lo = q & 1;
    const float k = lo ? k1 : k0, s = lo ? k0 : k1;
    return k + __shfl_xor_sync(FULL_MASK, s, 1);
}

// ---- staged tiles ------------------------------------------------------------------------------------------
// A block's inputs for T consecutive steps are copied into shared memory ahead of use (cp.async, several
// tiles in flight), so that the recurrences read shared memory and the global loads are wide, coalesced and
// overlapped with compute. Layout of one tile: act [NT][T][CPB] bf16 (u, dt, z[, dout]); Bs [T][pB], Cs [T][pC]
// bf16 (the block's span of B and C groups); rs [T] uint8.
struct TileGeom {
    int T, CPB, NT, pB, pC, offB, offC, offR, bytes;
};
static inline int align16(int x) { return (x + 15) & ~15; }
TileGeom make_geom(int T, int CPB, int NT, int pB, int pC) {
    TileGeom g;
    g.T = T, g.CPB = CPB, g.NT = NT, g.pB = pB, g.pC = pC;
    g.offB = align16(NT * T * CPB * 2);
    g.offC = g.offB + align16(T * pB * 2);
    g.offR = g.offC + align16(T * pC * 2);
    g.bytes = g.offR + align16(T);
    return g;
}
// most groups of size gs that a block of cpb channels (starting at a multiple of cpb) can touch
int64_t span_groups(int64_t cpb, int64_t gs) {
    if (cpb % gs == 0) return cpb / gs;
    if (gs % cpb == 0) return 1;
    return (cpb - 1) / gs + 2;
}

struct TileSrc {
    const bf16 *act[4];
    const bf16 *Bm, *Cm;
    const uint8_t *reset;
    int64_t L, D, GbN, GcN;
};

__device__ __forceinline__ const bf16 *pick4(const bf16 *const (&a)[4], int k) {  // no local-memory array
    return k == 0 ? a[0] : k == 1 ? a[1] : k == 2 ? a[2] : a[3];
}
// Issues the copies of steps [t_start, t_start + nsteps) of batch row b, channels [c0, c0 + nchv), B span
// [bofs, bofs + nBv) and C span [cofs, cofs + nCv) (element offsets within a token's B / C row). Steps past
// nsteps get zero B and C (so that padded steps are exact identities in the backward).
template <int T, int CPB, int NT, int NTHR, bool AL16>
__device__ void load_tile(char *tile, const TileGeom &g, const TileSrc &s, int64_t b, int64_t c0, int nchv,
                          int64_t bofs, int nBv, int64_t cofs, int nCv, int64_t t_start, int nsteps) {
    // T, CPB, NT and the thread count are compile-time, so the index arithmetic below is shifts and masks
    const int tid = threadIdx.x;
    bf16 *act = (bf16 *)tile, *Bs = (bf16 *)(tile + g.offB), *Cs = (bf16 *)(tile + g.offC);
    uint8_t *rs = (uint8_t *)(tile + g.offR);
    const int64_t row0 = b * s.L + t_start;
    if (AL16) {
        constexpr int cpr = CPB / 8, nact = NT * T * cpr;
#pragma unroll 4
        for (int e = tid; e < nact; e += NTHR) {
            const int k = e / (T * cpr), r = e % (T * cpr), i = r / cpr, ch = (r % cpr) * 8;
            const bf16 *src = pick4(s.act, k);
            if (i < nsteps && ch < nchv && src)
                cp_async16(act + (k * T + i) * CPB + ch, src + (row0 + i) * s.D + c0 + ch);
        }
        const int cb8 = nBv / 8, cc8 = nCv / 8;
        for (int e = tid; e < nsteps * cb8; e += NTHR) {
            const int i = e / cb8, x = (e - i * cb8) * 8;
            cp_async16(Bs + i * g.pB + x, s.Bm + (row0 + i) * s.GbN + bofs + x);
        }
        for (int e = tid; e < nsteps * cc8; e += NTHR) {
            const int i = e / cc8, x = (e - i * cc8) * 8;
            cp_async16(Cs + i * g.pC + x, s.Cm + (row0 + i) * s.GcN + cofs + x);
        }
    } else {
        for (int e = tid; e < NT * T * CPB; e += NTHR) {
            const int k = e / (T * CPB), r = e % (T * CPB), i = r / CPB, ch = r % CPB;
            const bf16 *src = pick4(s.act, k);
            if (i < nsteps && ch < nchv && src) act[(k * T + i) * CPB + ch] = src[(row0 + i) * s.D + c0 + ch];
        }
        for (int e = tid; e < nsteps * nBv; e += NTHR) {
            const int i = e / nBv, x = e % nBv;
            Bs[i * g.pB + x] = s.Bm[(row0 + i) * s.GbN + bofs + x];
        }
        for (int e = tid; e < nsteps * nCv; e += NTHR) {
            const int i = e / nCv, x = e % nCv;
            Cs[i * g.pC + x] = s.Cm[(row0 + i) * s.GcN + cofs + x];
        }
    }
    for (int i = tid; i < T; i += NTHR) rs[i] = (i < nsteps && s.reset) ? s.reset[row0 + i] : 0;
    if (nsteps < T) {  // the last tile: padded steps get zero B and C
        const bf16 zero = __float2bfloat16_rn(0.f);
        for (int e = tid; e < (T - nsteps) * g.pB; e += NTHR) Bs[nsteps * g.pB + e] = zero;
        for (int e = tid; e < (T - nsteps) * g.pC; e += NTHR) Cs[nsteps * g.pC + e] = zero;
    }
}

constexpr int FWD1_THREADS = 128;  // channels per forward block
constexpr int FT0 = 16;            // steps per forward tile (v10)
constexpr int FNST0 = 3;           // tiles in flight (v10)

// loads R consecutive floats from shared memory (aligned to R floats for R <= 4, to 4 floats otherwise)
template <int R>
__device__ __forceinline__ void ldsf_r(const float *p, float (&v)[R]) {
    if constexpr (R == 1) {
        v[0] = *p;
    } else if constexpr (R == 2) {
        const float2 x = *reinterpret_cast<const float2 *>(p);
        v[0] = x.x, v[1] = x.y;
    } else {
        ldsf_vec<R>(p, v);
    }
}

// Forward (v10): main pass (PREPASS = false) or segment pre-pass (PREPASS = true: local end state from zero, no
// outputs). Two lanes per (batch row, channel), N/2 states each, 128 channels (256 threads) per block,
// blockIdx.x = (seg * B + b) * nblocks_d + block. The one-thread-per-channel kernel it replaced (v5) ran 8 warps
// per SM at 8 x 2048 and was 5-20 % slower at every benchmarked shape (H100, 2026-11-23). The per-step scalars are
// not computed twice: steps go in pairs, lane `hf` of a channel computes softplus (and the gate) for step i + hf
// and the pair swaps deltas with one shuffle; y's two halves meet with one shuffle per step, and lane hf stores
// step i + hf. So the MUFU work stays 16 + 4 per token-channel, plus 1.5 shuffles per lane and step.
constexpr int FWD2_THREADS = 256;  // 128 channels x 2 lanes

// The per-thread 16-byte pieces of a full tile's u, dt, z rows (FAST: forward v11). With 128 channels and 256 threads
// each thread copies channels [8 (tid & 15), + 8) of steps tid / 16 + 16 jj, jj < FT / 16, of each kind: its
// addresses are one 64-bit base per tile plus compile-time multiples of 16 D (no per-piece index arithmetic).
template <int FT, int NK>
__device__ __forceinline__ void load_acts_fast(bf16 *act, const bf16 *const (&src)[4], int64_t base, int64_t D16) {
    constexpr int CPB = FWD1_THREADS;
    static_assert(FWD2_THREADS == 256 && CPB == 128 && FT % 16 == 0, "fixed geometry");
    const int tid = threadIdx.x, i0 = tid >> 4, ch = (tid & 15) * 8;
#pragma unroll
    for (int k = 0; k < NK; k++) {
        if (!src[k]) continue;
#pragma unroll
        for (int jj = 0; jj < FT / 16; jj++)
            cp_async16(act + (k * FT + i0 + 16 * jj) * CPB + ch, src[k] + base + jj * D16);
    }
}

// What a forward block works on (v11 and v14): blockIdx.x = (seg * B + b) * nblocks_d + block; lane pair (cl, hf)
// of a block of CPB channels owns channel d = c0 + cl, states [n0, n0 + N/2). Out-of-range lanes (d >= D in the last
// channel block) compute on a real channel and store nothing.
struct FwdBlk {
    int64_t b, c0, d, gc, gb, gclo, gblo, tb, te;
    int seg, nchv, nCv, nBv, cl, hf, n0;
    bool dvalid;
};
template <int N, int CPB>
__device__ __forceinline__ FwdBlk fwd_blk(const FwdArgs &p) {
    FwdBlk k;
    const int64_t ncb = (p.D + CPB - 1) / CPB;
    int64_t bid = blockIdx.x;
    const int64_t cb = bid % ncb;
    bid /= ncb;
    k.b = bid % p.B;
    k.seg = (int)(bid / p.B);
    k.cl = threadIdx.x >> 1, k.hf = threadIdx.x & 1, k.n0 = k.hf * (N / 2);
    k.c0 = cb * CPB;
    const int64_t d_raw = k.c0 + k.cl;
    k.nchv = (int)(p.D - k.c0 < CPB ? p.D - k.c0 : CPB);
    k.dvalid = d_raw < p.D;
    k.d = k.dvalid ? d_raw : p.D - 1;
    k.gc = k.d / p.Dg, k.gb = k.d / p.Db;
    k.gclo = k.c0 / p.Dg, k.gblo = k.c0 / p.Db;
    k.nCv = (int)((k.c0 + k.nchv - 1) / p.Dg - k.gclo + 1) * N;
    k.nBv = (int)((k.c0 + k.nchv - 1) / p.Db - k.gblo + 1) * N;
    k.tb = (int64_t)k.seg * p.seglen, k.te = k.tb + p.seglen < p.L ? k.tb + p.seglen : p.L;
    return k;
}
// A2 = A log2(e) of the lane's states; h = the state before the segment's first step: h0 (or 0), carried through the
// earlier segments' local end states (h <- decay(s) * h + local_end(s), exact with resets); the pre-pass starts at 0
template <int N, bool PREPASS>
__device__ __forceinline__ void fwd_state_in(const FwdArgs &p, const FwdBlk &k, float (&A2)[N / 2], float (&h)[N / 2]) {
    constexpr int H = N / 2;
    const int64_t D = p.D, b = k.b, d = k.d;
    const int n0 = k.n0;
#pragma unroll
    for (int n = 0; n < H; n++) A2[n] = p.A[d * N + n0 + n] * SCAN_LOG2E;
#pragma unroll
    for (int n = 0; n < H; n++) h[n] = (!PREPASS && p.h0) ? p.h0[(b * D + d) * N + n0 + n] : 0.f;
    if (!PREPASS) {
        for (int s = 0; s < k.seg; s++) {
            const int64_t i = (b * p.nseg + s) * D + d;
            const bool rs = p.seg_rs[i] != 0;
            const float sd = p.seg_sd[i];
#pragma unroll
            for (int n = 0; n < H; n++) h[n] = (rs ? 0.f : ex2f(A2[n] * sd)) * h[n] + p.seg_h[i * N + n0 + n];
        }
    }
}
// after the last step: the pre-pass leaves the segment's local end state, sum delta since its last reset and whether
// it holds a reset; the main pass the final state (last segment only)
template <int N, bool PREPASS>
__device__ __forceinline__ void fwd_state_out(const FwdArgs &p, const FwdBlk &k, const float (&h)[N / 2], float sd,
                                              int anyrs) {
    constexpr int H = N / 2;
    if (!k.dvalid) return;
    if (PREPASS) {
        const int64_t i = (k.b * p.nseg + k.seg) * p.D + k.d;
#pragma unroll
        for (int n = 0; n < H; n++) p.seg_h[i * N + k.n0 + n] = h[n];
        if (k.hf == 0) p.seg_sd[i] = sd, p.seg_rs[i] = anyrs;
    } else if (k.seg == p.nseg - 1 && p.h_last) {
#pragma unroll
        for (int n = 0; n < H; n++) p.h_last[(k.b * p.D + k.d) * N + k.n0 + n] = h[n];
    }
}
// a lane's H states as float4 stores (checkpoints)
template <int H>
__device__ __forceinline__ void st_state(float *ck, const float (&h)[H]) {
    if constexpr (H % 4 == 0) {
#pragma unroll
        for (int n = 0; n < H; n += 4) reinterpret_cast<float4 *>(ck)[n / 4] = make_float4(h[n], h[n + 1], h[n + 2], h[n + 3]);
    } else {
#pragma unroll
        for (int n = 0; n < H; n++) ck[n] = h[n];
    }
}
// Issues the copies of tile kt (steps tb + kt FT ...) into slot kt % FNST, then commits a group (also when kt is past
// the last tile, so that the wait counts stay fixed). FAST: a full tile's u/dt/z by load_acts_fast.
template <int N, bool PREPASS, bool AL16, int FT, int FNST, bool FAST>
__device__ __forceinline__ void fwd_issue(char *smem, const TileGeom &geo, const TileSrc &src, const FwdBlk &k,
                                          int kt, int ntile) {
    constexpr int CPB = FWD1_THREADS;
    if (kt < ntile) {
        const int64_t ts = k.tb + (int64_t)kt * FT, L = src.L, D = src.D;
        const int ns = (int)(k.te - ts < FT ? k.te - ts : FT);
        char *tl = smem + (kt % FNST) * geo.bytes;
        const int tid = threadIdx.x;
        if (FAST && ns == FT && k.nchv == CPB) {
            load_acts_fast<FT, PREPASS ? 2 : 3>((bf16 *)tl, src.act, (k.b * L + ts + (tid >> 4)) * D + k.c0 + (tid & 15) * 8,
                                                16 * D);
            load_tile<FT, CPB, 0, FWD2_THREADS, AL16>(tl, geo, src, k.b, k.c0, k.nchv, k.gblo * N, k.nBv, k.gclo * N,
                                                     PREPASS ? 0 : k.nCv, ts, ns);
        } else {
            load_tile<FT, CPB, 3, FWD2_THREADS, AL16>(tl, geo, src, k.b, k.c0, k.nchv, k.gblo * N, k.nBv, k.gclo * N,
                                                     PREPASS ? 0 : k.nCv, ts, ns);
        }
    }
    cp_async_commit();
}

// FT steps per tile, FNST tiles in flight. FAST (v11, the default; DISTILL_SCAN_FWD=v10 for v10): 32-step tiles with 2 in flight (half
// the barriers, checkpoint tests and B/C conversion passes per step), full tiles' u/dt/z copied by load_acts_fast,
// and the reset of each step as a float (0 or -inf) made in the conversion pass, one shared load per step.
template <int N, bool PREPASS, bool AL16, int FT, int FNST, bool FAST>
__global__ void __launch_bounds__(FWD2_THREADS, 2) scan_fwd2_kernel(const FwdArgs p, const TileGeom geo) {
    constexpr int CPB = FWD1_THREADS, H = N / 2;
    static_assert(FT % 2 == 0 && SCAN_CKPT % FT == 0 && FNST >= 2, "steps go in pairs; tiles divide SCAN_CKPT");
    static_assert(!FAST || AL16, "the fast loader needs aligned rows");
    extern __shared__ __align__(16) char smem[];
    const FwdBlk k = fwd_blk<N, CPB>(p);
    if (PREPASS && k.seg == p.nseg - 1) return;
    const int tid = threadIdx.x, cl = k.cl, hf = k.hf, n0 = k.n0;
    const bool dvalid = k.dvalid;
    const int64_t b = k.b, d = k.d, gc = k.gc, gb = k.gb, gclo = k.gclo, gblo = k.gblo, tb = k.tb, te = k.te;
    const int64_t L = p.L, D = p.D;
    const TileSrc src = {{p.u, p.dt, PREPASS ? nullptr : p.z, nullptr}, p.Bm, p.Cm, p.reset, L, D, p.Gb * N, p.Gc * N};

    float A2[H], h[H];
    fwd_state_in<N, PREPASS>(p, k, A2, h);
    const float Dd = PREPASS ? 0.f : p.Dskip[d];
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    float sd = 0.f;
    int anyrs = 0;

    const int ntile = (int)((te - tb + FT - 1) / FT);
    for (int kk = 0; kk < FNST - 1; kk++) fwd_issue<N, PREPASS, AL16, FT, FNST, FAST>(smem, geo, src, k, kk, ntile);

    for (int kt = 0; kt < ntile; kt++) {
        cp_async_wait<FNST - 2>();
        __syncthreads();
        fwd_issue<N, PREPASS, AL16, FT, FNST, FAST>(smem, geo, src, k, kt + FNST - 1, ntile);
        const char *tile = smem + (kt % FNST) * geo.bytes;
        const bf16 *su = (const bf16 *)tile + cl, *sdt = su + FT * CPB, *sz = sdt + FT * CPB;
        const uint8_t *srs = (const uint8_t *)(tile + geo.offR);
        {
            float *fB = (float *)(smem + FNST * geo.bytes), *fC = fB + FT * geo.pB;
            const __nv_bfloat162 *tB = (const __nv_bfloat162 *)(tile + geo.offB);
            const __nv_bfloat162 *tC = (const __nv_bfloat162 *)(tile + geo.offC);
            for (int e = tid; e < FT * geo.pB / 2; e += FWD2_THREADS)
                reinterpret_cast<float2 *>(fB)[e] = __bfloat1622float2(tB[e]);
            if (!PREPASS)
                for (int e = tid; e < FT * geo.pC / 2; e += FWD2_THREADS)
                    reinterpret_cast<float2 *>(fC)[e] = __bfloat1622float2(tC[e]);
            if (FAST && tid < FT) (fC + FT * geo.pC)[tid] = ((const uint8_t *)(tile + geo.offR))[tid] ? -INFINITY : 0.f;
            __syncthreads();
        }
        const float *sB = (const float *)(smem + FNST * geo.bytes) + (gb - gblo) * N + n0;
        const float *sC = (const float *)(smem + FNST * geo.bytes) + FT * geo.pB + (gc - gclo) * N + n0;
        const int64_t ts = tb + (int64_t)kt * FT;
        const int ns = (int)(te - ts < FT ? te - ts : FT);
        if (!PREPASS && p.ckpt && !p.ck8 && (ts % SCAN_CKPT) == 0 && dvalid) {
            st_state<H>(p.ckpt + ((b * p.nck + ts / SCAN_CKPT) * D + d) * N + n0, h);
        }
        bf16 *outp = PREPASS ? nullptr : p.out + (b * L + ts) * D + d;
        const bool hasz = !PREPASS && p.z != nullptr;
        // steps i and i + 1 (i even); lane hf computes step i + hf's scalars; steps past ns are identities
        // ck8: the state before steps ts + i with i % 8 == 0 (ts is a multiple of 16), 2 float4 per lane
        auto pair = [&](int i, bool ck_here) {
            if (!PREPASS && ck_here && p.ck8 && p.ckpt && dvalid) {
                st_state<H>(p.ckpt + ((b * p.nck + (ts + i) / 8) * D + d) * N + n0, h);
            }
            const int me = i + hf;
            const bool vme = me < ns, v1 = i + 1 < ns;
            const float dl_me = vme ? softplus_dev(__bfloat162float(sdt[me * CPB]) + bias) : 0.f;
            const float dl_o = __shfl_xor_sync(FULL_MASK, dl_me, 1);
            const float dl[2] = {hf ? dl_o : dl_me, hf ? dl_me : dl_o};
            const float uu[2] = {__bfloat162float(su[i * CPB]), v1 ? __bfloat162float(su[(i + 1) * CPB]) : 0.f};
            float yp[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                // a reset zeroes the decay: ex2(-inf) = 0
                const float rx = FAST ? (((const float *)(smem + FNST * geo.bytes)) + FT * (geo.pB + geo.pC))[i + j]
                                      : srs[i + j] ? -INFINITY : 0.f;
                const float du = dl[j] * uu[j];
                float Bv[H];
                ldsf_r<H>(sB + (i + j) * geo.pB, Bv);
                if (PREPASS) {
#pragma unroll
                    for (int n = 0; n < H; n++) h[n] = ex2f(fmaf(dl[j], A2[n], rx)) * h[n] + du * Bv[n];
                    sd = rx != 0.f ? dl[j] : sd + dl[j];
                    anyrs |= rx != 0.f;
                } else {
                    float Cv[H], y0 = 0.f, y1 = 0.f;
                    ldsf_r<H>(sC + (i + j) * geo.pC, Cv);
#pragma unroll
                    for (int n = 0; n < H; n++) {
                        h[n] = ex2f(fmaf(dl[j], A2[n], rx)) * h[n] + du * Bv[n];
                        if (n & 1) y1 += Cv[n] * h[n];
                        else y0 += Cv[n] * h[n];
                    }
                    yp[j] = y0 + y1;
                }
            }
            if (!PREPASS) {
                const float mine = hf ? yp[0] : yp[1], keep = hf ? yp[1] : yp[0];  // send the partner's step
                const float y = keep + __shfl_xor_sync(FULL_MASK, mine, 1);        // full y of step i + hf
                const float zz = hasz ? __bfloat162float(sz[me * CPB]) : 0.f;
                const float gate = hasz ? zz * sigmoid_dev(zz) : 1.f;
                if (dvalid && vme) stbf(outp + (int64_t)me * D, (y + Dd * (hf ? uu[1] : uu[0])) * gate);
            }
        };
        if (ns == FT) {
            // at most 8 pairs unrolled (registers: 16 unrolled pairs of a 32-step tile spill)
#pragma unroll 1
            for (int i0 = 0; i0 < FT; i0 += 16) {
#pragma unroll
                for (int i = 0; i < 16 && i < FT; i += 2) pair(i0 + i, (i & 7) == 0);
            }
        } else {
#pragma unroll 1
            for (int i = 0; i < ns; i += 2) pair(i, (i & 7) == 0);
        }
    }
    cp_async_wait<0>();
    fwd_state_out<N, PREPASS>(p, k, h, sd, anyrs);
}

// ---- forward v14 (the default; DISTILL_SCAN_FWD=v11 selects v11 above) ---------------------------------------
// v11's work split (lane pairs, 128 channels per block, 32-step tiles, 2 in flight), with the unrolled 16-step body
// one basic block: v11's body had a branch per step pair (the v13 checkpoint test, the gate's z test, the
// per-lane output store with its 64-bit address, the padded-step tests), and ptxas does not move instructions across
// them, so each pair's chain (dt load, softplus, delta exchange, exps, y exchange, gate, store) ran exposed; the SASS
// showed ~163 instructions per token-channel in the body, ~75 of them per-pair overhead. Here (~129 in the body, one
// basic block, 128 registers, no spills):
// - z is a template parameter, v13's 8-step checkpoints are left to v11; full tiles run steps known to be valid at
//   compile time;
// - each lane loads only its own step's u and computes delta*u once; the pair swaps delta and delta*u by 4 indexed
//   shuffles (no selects);
// - outputs go to shared memory, over the lane's own u (no other lane reads it), and leave as 16-byte rows after the
//   next barrier (one 64-bit base per thread and tile instead of one address per 2-byte store);
// - B and C in fp32 are group-major [group][FT][N] (+16 floats between groups against bank conflicts), so that a
//   step's B/C address is the lane's base plus a compile-time offset (v11: a run-time row stride per step).
// Measured and dropped (H100, ba17932): the last state of each lane (two in the pre-pass) on an FMA-pipe exp2
// polynomial instead of the MUFU (0.518 vs 0.516 ms at 8 x 2048: the MUFU is not the limit); the deltas computed per
// tile in the conversion pass, no delta exchange (0.555); v13's 8-step checkpoints written by v14 (0.735 with
// streaming stores, 0.745 with plain ones, against v11's 0.624), so the launcher sends them to v11.
// v15 experiments, measured on the H100 against v14 in the same runs and dropped (scan-fwd15, 2026-11-24; 8 x 2048
// v14 0.514 / 0.517 ms): each pair's scalars (softplus, delta*u, the pair shuffles, gate, D u) computed one or two
// pairs ahead in the source (0.619 / 0.627: ptxas already issues the next pair's loads and shuffles inside the current
// pair; the carried values cost it registers and the schedule, 2402 vs 1990 stall cycles per 16-step body; code in
// 726009c); 8- or 4-step unrolled pieces instead of 16 (0.518 / 0.542: instruction fetch is not the limit); two y
// accumulators (0.518); B and C read as bf16 from the staged tile, no conversion pass (0.543: a third fewer shared
// loads, 37 % more instructions); code of the last four in 8f3b491.
// v14pK (scan-fwd-poly, 2026-11-24): 2/3/4/8 of each lane's 8 states on the FMA-pipe exp2, slower at every shape and K
// (8 x 2048: 0.69-0.93 ms against 0.515; without z, no spills: 0.514-0.901 against 0.473); code in b9c2dfd.
constexpr int F14_T = 32;    // steps per tile
constexpr int F14_GPAD = 16; // floats between the fp32 B/C groups

// bytes of dynamic shared memory: 2 staged tiles, then fp32 B groups, C groups [group][FT][N] (+ pad), reset floats
template <int N>
__host__ __device__ constexpr int f14_gs() { return F14_T * N + F14_GPAD; }
template <int N>
size_t f14_smem(const TileGeom &g) {
    return 2 * (size_t)g.bytes + ((size_t)(g.pB + g.pC) / N * f14_gs<N>() + F14_T) * sizeof(float);
}

// 64-step checkpoints only (the launcher sends v13's 8-step ones to v11)
template <int N, bool PREPASS, bool HASZ>
__global__ void __launch_bounds__(FWD2_THREADS, 2) scan_fwd14_kernel(const FwdArgs p, const TileGeom geo) {
    constexpr int CPB = FWD1_THREADS, H = N / 2, FT = F14_T, GS = f14_gs<N>();
    static_assert(N == 8 || N == 16, "B/C spans convert in 8-element pieces within one group");
    extern __shared__ __align__(16) char smem[];
    const FwdBlk k = fwd_blk<N, CPB>(p);
    if (PREPASS && k.seg == p.nseg - 1) return;
    const int tid = threadIdx.x, hf = k.hf;
    const int64_t L = p.L, D = p.D, b = k.b, d = k.d;
    const TileSrc src = {{p.u, p.dt, (PREPASS || !HASZ) ? nullptr : p.z, nullptr}, p.Bm, p.Cm, p.reset, L, D,
                         p.Gb * N, p.Gc * N};
    float A2[H], h[H];
    fwd_state_in<N, PREPASS>(p, k, A2, h);
    const float Dd = PREPASS ? 0.f : p.Dskip[d];
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    float sd = 0.f;
    int anyrs = 0;

    float *fB = (float *)(smem + 2 * geo.bytes), *fC = fB + geo.pB / N * GS, *fR = fC + geo.pC / N * GS;
    const float *sB = fB + (k.gb - k.gblo) * GS + k.n0, *sC = fC + (k.gc - k.gclo) * GS + k.n0;
    const int ntile = (int)((k.te - k.tb + FT - 1) / FT);
    // outputs of tile kt, staged over its u rows: 16-byte pieces (steps tid / 16 + 16 jj, channels 8 (tid & 15) + 8)
    auto store_out = [&](int kt) {
        const int64_t ts = k.tb + (int64_t)kt * FT;
        const int ns = (int)(k.te - ts < FT ? k.te - ts : FT), i0 = tid >> 4, ch = (tid & 15) * 8;
        const bf16 *so = (const bf16 *)(smem + (kt & 1) * geo.bytes);
        bf16 *dst = p.out + (b * L + ts + i0) * D + k.c0 + ch;
#pragma unroll
        for (int jj = 0; jj < FT / 16; jj++)
            if (i0 + 16 * jj < ns && ch < k.nchv)
                *reinterpret_cast<uint4 *>(dst + jj * 16 * D) = *reinterpret_cast<const uint4 *>(so + (i0 + 16 * jj) * CPB + ch);
    };
    // Copies of tile kt into slot kt & 1. Full tiles of full channel blocks: u/dt/z by load_acts_fast, and B/C with
    // thread tid on step tid / 8, pieces 8 (tid % 8) + 64 m of the spans (no index division); the reset bytes go
    // through a register (rs_val, stored to the slot after this tile's steps) rather than a load that would stall
    // warp 0 right away. Other tiles: load_tile.
    uint8_t rs_val = 0;
    uint8_t *rs_dst = nullptr;
    auto issue = [&](int kt) {
        if (kt < ntile) {
            const int64_t ts = k.tb + (int64_t)kt * FT;
            const int ns = (int)(k.te - ts < FT ? k.te - ts : FT);
            char *tl = smem + (kt & 1) * geo.bytes;
            if (ns == FT && k.nchv == CPB) {
                load_acts_fast<FT, PREPASS ? 2 : 3>((bf16 *)tl, src.act, (b * L + ts + (tid >> 4)) * D + k.c0 + (tid & 15) * 8,
                                                    16 * D);
                const int i = tid >> 3;
                const int64_t row = b * L + ts + i;
                const bf16 *gB = p.Bm + row * src.GbN + k.gblo * N, *gC = p.Cm + row * src.GcN + k.gclo * N;
                bf16 *tB = (bf16 *)(tl + geo.offB) + i * geo.pB, *tC = (bf16 *)(tl + geo.offC) + i * geo.pC;
                for (int x = (tid & 7) * 8; x < k.nBv; x += 64) cp_async16(tB + x, gB + x);
                if (!PREPASS)
                    for (int x = (tid & 7) * 8; x < k.nCv; x += 64) cp_async16(tC + x, gC + x);
                if (tid < FT) {
                    rs_val = p.reset ? p.reset[b * L + ts + tid] : 0;
                    rs_dst = (uint8_t *)(tl + geo.offR) + tid;
                }
            } else {
                load_tile<FT, CPB, 3, FWD2_THREADS, true>(tl, geo, src, b, k.c0, k.nchv, k.gblo * N, k.nBv, k.gclo * N,
                                                         PREPASS ? 0 : k.nCv, ts, ns);
            }
        }
        cp_async_commit();
    };
    issue(0);
    if (rs_dst) *rs_dst = rs_val, rs_dst = nullptr;
    for (int kt = 0; kt < ntile; kt++) {
        cp_async_wait<0>();
        __syncthreads();
        if (!PREPASS && kt > 0) store_out(kt - 1);
        const char *tile = smem + (kt & 1) * geo.bytes;
        {  // B (and C) spans to fp32, 8 elements per piece (one group), resets to 0 / -inf
            const int i = tid >> 3;  // 8 threads per step
            const bf16 *tB = (const bf16 *)(tile + geo.offB) + i * geo.pB, *tC = (const bf16 *)(tile + geo.offC) + i * geo.pC;
            auto cvt8 = [&](const bf16 *s, float *dst) {
                float v[8];
                lds_vec<8>(s, v);
                reinterpret_cast<float4 *>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
                reinterpret_cast<float4 *>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
            };
            for (int x = (tid & 7) * 8; x < geo.pB; x += 64) cvt8(tB + x, fB + (x / N) * GS + i * N + x % N);
            if (!PREPASS)
                for (int x = (tid & 7) * 8; x < geo.pC; x += 64) cvt8(tC + x, fC + (x / N) * GS + i * N + x % N);
            if (tid < FT) fR[tid] = ((const uint8_t *)(tile + geo.offR))[tid] ? -INFINITY : 0.f;
        }
        __syncthreads();
        issue(kt + 1);
        const int64_t ts = k.tb + (int64_t)kt * FT;
        const int ns = (int)(k.te - ts < FT ? k.te - ts : FT);
        if (!PREPASS && p.ckpt && (ts % SCAN_CKPT) == 0 && k.dvalid)
            st_state<H>(p.ckpt + ((b * p.nck + ts / SCAN_CKPT) * D + d) * N + k.n0, h);
        bf16 *su = (bf16 *)tile + k.cl;  // u rows; a lane's outputs replace its own steps' u
        const bf16 *sdt = su + FT * CPB, *sz = sdt + FT * CPB;
        // steps i, i + 1 (i even); lane hf owns step i + hf: its delta, delta*u, gate and output
        auto pair = [&](int i, bool full) {
            const int me = i + hf;
            const bool vme = full || me < ns;  // padded steps: delta = 0, B = 0: identities
            const float u_me = __bfloat162float(su[me * CPB]);
            const float dl_me = vme ? softplus_dev(__bfloat162float(sdt[me * CPB]) + bias) : 0.f;
            const float du_me = vme ? dl_me * u_me : 0.f;
            const float dl[2] = {__shfl_sync(FULL_MASK, dl_me, 0, 2), __shfl_sync(FULL_MASK, dl_me, 1, 2)};
            const float du[2] = {__shfl_sync(FULL_MASK, du_me, 0, 2), __shfl_sync(FULL_MASK, du_me, 1, 2)};
            const float2 rx = *reinterpret_cast<const float2 *>(fR + i);  // a reset zeroes the decay: ex2(-inf) = 0
            float yp[2];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const float r = j ? rx.y : rx.x;
                float Bv[H], Cv[H];
                ldsf_vec<H>(sB + (i + j) * N, Bv);
                if (!PREPASS) ldsf_vec<H>(sC + (i + j) * N, Cv);
                float y = 0.f;
#pragma unroll
                for (int n = 0; n < H; n++) {
                    const float x = fmaf(dl[j], A2[n], r);
                    h[n] = ex2f(x) * h[n] + du[j] * Bv[n];
                    if (!PREPASS) y = fmaf(Cv[n], h[n], y);
                }
                yp[j] = y;
                if (PREPASS) {
                    sd = r != 0.f ? dl[j] : sd + dl[j];
                    anyrs |= r != 0.f;
                }
            }
            if (!PREPASS) {
                const float mine = hf ? yp[0] : yp[1], keep = hf ? yp[1] : yp[0];  // send the partner's step
                float o = fmaf(Dd, u_me, keep + __shfl_xor_sync(FULL_MASK, mine, 1));
                if (HASZ) {
                    const float zz = __bfloat162float(sz[me * CPB]);
                    o *= zz * sigmoid_dev(zz);
                }
                su[me * CPB] = __float2bfloat16_rn(o);
            }
        };
        if (ns == FT) {
#pragma unroll 1
            for (int i0 = 0; i0 < FT; i0 += 16) {
#pragma unroll
                for (int i = 0; i < 16; i += 2) pair(i0 + i, true);
            }
        } else {
#pragma unroll 1
            for (int i = 0; i < ns; i += 2) pair(i, false);
        }
        if (rs_dst) *rs_dst = rs_val, rs_dst = nullptr;  // the next tile's resets, read after the next barrier
    }
    cp_async_wait<0>();
    if (!PREPASS && ntile > 0) {
        __syncthreads();
        store_out(ntile - 1);
    }
    fwd_state_out<N, PREPASS>(p, k, h, sd, anyrs);
}

// ---- backward ----------------------------------------------------------------------------------------------
// Per (batch row, block of CPB channels), chunks of SCAN_CKPT steps in reverse, each staged in shared memory
// while the previous chunk is processed. For each chunk: a forward sweep from the forward's checkpoint stores
// the state before every 4-step group in shared memory; then the groups are walked in reverse: the group's 4
// states and decays are recomputed into registers, the outputs' gradient is formed (y recomputed for dz), and
// the adjoint is carried back through the 4 steps. dB and dC (sums over the channels of a group) go through
// shared memory and are summed in a fixed order; dA, dD and ddelta_bias are summed per lane over time, then
// over batch rows by a second kernel: no atomics, so the result is deterministic.
struct BwdArgs {
    int64_t B, L, D, Gc, Gb, Dg, Db, nck;
    int ckmul;  // checkpoints per 64-step chunk: 1, or 8 (every 8 steps, for v13; v10 reads every 8th)
    const bf16 *u, *dt, *Bm, *Cm, *z, *dout;
    const float *A, *Dskip, *delta_bias, *h0, *ckpt, *dh_last;
    const uint8_t *reset;
    bf16 *du, *ddt, *dB, *dC, *dz;
    float *dh0;
    float *dA_part, *dD_part, *ddb_part;  // [nseg * B, D, N], [nseg * B, D] x2 (row = seg * B + b)
    float *dB_part;                       // [B, L, Gc, N] when B groups do not fit a block, else NULL
    // time segments (v10): segment s covers steps [s * seglen, min((s + 1) * seglen, L)), seglen a multiple of
    // SCAN_CKPT; seg_* from scan_bwd_seg_prepass (segments 1..nseg-1)
    int nseg;
    int64_t seglen;
    float *seg_dh, *seg_sd;  // [B, nseg, D, N] local dh at the segment's start (from zero), [B, nseg, D] sum of delta
    int *seg_rs;             // [B, nseg, D] 1 if the segment holds a reset
    // the same for pieces of piecelen steps (npps per segment 1..nseg-1), folded into seg_* by scan_bwd_seg_fold
    int64_t piecelen, npps;
    float *piece_dh, *piece_sd;  // [B, nseg - 1, npps, D, N], [B, nseg - 1, npps, D]
    int *piece_rs;               // [B, nseg - 1, npps, D]
};

// Incoming adjoint of segment seg (states n0 .. n0 + R - 1 of channel d): dh_last carried back through the later
// segments, last first: dh <- (reset in s ? 0 : 2^(A log2e sum delta)) * dh + local dh of s (fixed order)
template <int N, int R>
__device__ __forceinline__ void seg_carry_dh(const BwdArgs &p, int64_t b, int64_t d, int seg, int n0,
                                             const float (&A2)[R], float (&dh)[R]) {
    for (int s2 = p.nseg - 1; s2 > seg; s2--) {
        const int64_t i = (b * p.nseg + s2) * p.D + d;
        const bool rs = p.seg_rs[i] != 0;
        const float sd = p.seg_sd[i];
#pragma unroll
        for (int r = 0; r < R; r++) dh[r] = (rs ? 0.f : ex2f(A2[r] * sd)) * dh[r] + p.seg_dh[i * N + n0 + r];
    }
}

// A lane's per-(segment, row) partials of dA (states n0 .. n0 + R - 1), dh0 from segment 0, and (one lane per
// channel) dD and ddelta_bias
template <int N, int R>
__device__ __forceinline__ void put_bwd_partials(const BwdArgs &p, int seg, int64_t b, int64_t d, int n0,
                                                 const float (&dA)[R], const float (&dh)[R], bool scalars, float dD,
                                                 float ddb) {
    const int64_t prow = (int64_t)seg * p.B + b, D = p.D;
#pragma unroll
    for (int r = 0; r < R; r++) {
        p.dA_part[(prow * D + d) * N + n0 + r] = dA[r];
        if (seg == 0 && p.h0 && p.dh0) p.dh0[(b * D + d) * N + n0 + r] = dh[r];
    }
    if (scalars) p.dD_part[prow * D + d] = dD, p.ddb_part[prow * D + d] = ddb;
}

constexpr int BWD_GROUPS = SCAN_CKPT / 4;

// two staged chunks, the group snapshots, the dB/dC exchange, and the chunk's B and C spans in fp32
template <int N, int THREADS>
size_t bwd_smem_bytes(const TileGeom &g) {
    return 2 * (size_t)g.bytes + (size_t)(BWD_GROUPS * (N / QL) * THREADS + 2 * 4 * (THREADS / QL) * N) * sizeof(float) +
           (size_t)g.T * (g.pB + g.pC) * sizeof(float);
}

__device__ __forceinline__ float dsoftplus_dev(float x) { return x <= 20.f ? sigmoid_dev(x) : 1.f; }

// WRED (N = 16, 8 | channels per C group, whole B groups per block): dB and dC are first summed over the warp's
// 8 channels by a shuffle reduce-scatter (each lane ends with one of the 32 (kind, state) sums of its quarter), so
// shared memory holds per-warp sums, one barrier per 4-step group is enough (double-buffered), and the final sums
// add 2 (dC) or 8 (dB) per-warp values. Otherwise per-channel values go through shared memory.
template <int N, int THREADS, bool AL16, bool WRED>
__global__ void __launch_bounds__(THREADS) scan_bwd_kernel(const BwdArgs p, const TileGeom geo) {
    constexpr int R = N / QL, CPB = THREADS / QL, T = SCAN_CKPT, NW = THREADS / 32;
    static_assert(!WRED || R == 4, "the warp reduction assumes 4 states per lane");
    extern __shared__ __align__(16) char smem[];
    float *sub = (float *)(smem + 2 * geo.bytes);  // [BWD_GROUPS][R][THREADS]
    float *redC = sub + BWD_GROUPS * R * THREADS;   // [4][CPB][N]; WRED: redW [2 buffers][4][NW][2][N]
    float *redB = redC + 4 * CPB * N;               // [4][CPB][N]
    float *fBC = redB + 4 * CPB * N;                // [T][pB] then [T][pC]: the chunk's B and C in fp32
    const int warp = threadIdx.x >> 5;

    const int64_t L = p.L, D = p.D, ncb = (D + CPB - 1) / CPB;
    // blockIdx.x = (seg * B + b) * ncb + cb
    const int64_t cb = blockIdx.x % ncb, b = (blockIdx.x / ncb) % p.B;
    const int seg = (int)(blockIdx.x / ncb / p.B);
    const int tid = threadIdx.x, lane = tid & 31, q = tid & 3, base = lane & ~3, cl = tid >> 2;
    const int64_t c0 = cb * CPB, d_raw = c0 + cl;
    const int nchv = (int)(D - c0 < CPB ? D - c0 : CPB);
    const bool dvalid = d_raw < D;
    const int64_t d = dvalid ? d_raw : D - 1;
    const int64_t gc = d / p.Dg, gb = d / p.Db, gclo = c0 / p.Dg, gblo = c0 / p.Db;
    const int nCv = (int)((c0 + nchv - 1) / p.Dg - gclo + 1) * N, nBv = (int)((c0 + nchv - 1) / p.Db - gblo + 1) * N;
    const int ngrp = CPB / (int)p.Dg;      // C groups per block
    const bool fastB = (CPB % p.Db) == 0;  // whole B groups per block
    const int nbg = fastB ? CPB / (int)p.Db : 0, rep = (int)(p.Db / p.Dg);
    const TileSrc src = {{p.u, p.dt, p.z, p.dout}, p.Bm, p.Cm, p.reset, L, D, p.Gb * N, p.Gc * N};

    float A[R], A2[R], dh[R], dA_acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        A[r] = p.A[d * N + q * R + r];
        A2[r] = A[r] * SCAN_LOG2E;
        dh[r] = p.dh_last ? p.dh_last[(b * D + d) * N + q * R + r] : 0.f;
        dA_acc[r] = 0.f;
    }
    seg_carry_dh<N, R>(p, b, d, seg, q * R, A2, dh);
    const float Dd = p.Dskip[d], bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const float vmask = dvalid ? 1.f : 0.f;  // channels past D (last block) compute on channel D-1, add nothing
    float dD_acc = 0.f, ddb_acc = 0.f;
    const int64_t tseg0 = (int64_t)seg * p.seglen, tseg1 = tseg0 + p.seglen < L ? tseg0 + p.seglen : L;
    const int64_t kfirst = tseg0 / T, klast = (tseg1 - 1) / T;  // the segment's chunks (segments are T-aligned)

    auto issue = [&](int64_t k) {
        if (k >= kfirst) {
            const int64_t ts = k * T;
            const int ns = (int)(L - ts < T ? L - ts : T);
            load_tile<T, CPB, 4, THREADS, AL16>(smem + (k & 1) * geo.bytes, geo, src, b, c0, nchv, gblo * N, nBv,
                                                gclo * N, nCv, ts, ns);
        }
        cp_async_commit();
    };
    issue(klast);
    for (int64_t k = klast; k >= kfirst; k--) {
        cp_async_wait<0>();
        __syncthreads();
        issue(k - 1);
        const char *tile = smem + (k & 1) * geo.bytes;
        const bf16 *su = (const bf16 *)tile, *sdt = su + T * CPB, *sz = sdt + T * CPB, *sdo = sz + T * CPB;
        {
            // B and C to fp32 once per chunk: each value is read 3 times per lane (sweep, recompute) by up to
            // Db / Dg channels, and the bf16 unpacking was ~12 instructions per lane and step
            const __nv_bfloat162 *tB = (const __nv_bfloat162 *)(tile + geo.offB);
            const int nb2 = T * (geo.pB + geo.pC) / 2;  // pB, pC even; the C span follows B's in both layouts
            const int offC2 = (geo.offC - geo.offB) / 4, nB2 = T * geo.pB / 2;
            for (int e = tid; e < nb2; e += THREADS) {
                const __nv_bfloat162 v = e < nB2 ? tB[e] : tB[offC2 + (e - nB2)];
                reinterpret_cast<float2 *>(fBC)[e] = __bfloat1622float2(v);
            }
            __syncthreads();
        }
        const float *sB = fBC + (gb - gblo) * N + q * R;
        const float *sC = fBC + T * geo.pB + (gc - gclo) * N + q * R;
        const uint8_t *srs = (const uint8_t *)(tile + geo.offR);
        const int64_t tb = k * T, te = tb + T < L ? tb + T : L;
        const int ng = (int)((te - tb + 3) / 4);
        float h[R];
#pragma unroll
        for (int r = 0; r < R; r++) h[r] = p.ckpt[((b * p.nck + k * p.ckmul) * D + d) * N + q * R + r];
        // sweep: state before each group (the last group's own steps are not needed)
#pragma unroll 1
        for (int g = 0; g < ng; g++) {
#pragma unroll
            for (int r = 0; r < R; r++) sub[(g * R + r) * THREADS + tid] = h[r];
            if (g == ng - 1) break;
            const int i = 4 * g + q;
            const bool tv = tb + i < te;
            const float uu = tv ? __bfloat162float(su[i * CPB + cl]) : 0.f;
            const float delta = tv ? softplus_dev(__bfloat162float(sdt[i * CPB + cl]) + bias) : 0.f;
            const float rsx = srs[i] ? -INFINITY : 0.f;
            const float du_own = delta * uu;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float dj = __shfl_sync(FULL_MASK, delta, base + j);
                const float duj = __shfl_sync(FULL_MASK, du_own, base + j);
                const float rj = __shfl_sync(FULL_MASK, rsx, base + j);
                float Bv[R];
                ldsf_r<R>(sB + (4 * g + j) * geo.pB, Bv);
#pragma unroll
                for (int r = 0; r < R; r++) h[r] = ex2f(fmaf(dj, A2[r], rj)) * h[r] + duj * Bv[r];
            }
        }
        // reverse over the groups
#pragma unroll 1
        for (int g = ng - 1; g >= 0; g--) {
            const int i = 4 * g + q;
            const int64_t t0 = tb + 4 * g;
            const bool tv = t0 + q < te;
            // branch-free (no divergence before the shuffles): rows past the chunk's end hold stale data, which
            // the selects drop; their B and C are zero and their reset byte 0
            const float raw = __bfloat162float(sdt[i * CPB + cl]) + bias;
            const float uu = tv ? __bfloat162float(su[i * CPB + cl]) : 0.f;
            const float delta = tv ? softplus_dev(raw) : 0.f;
            const float rs = srs[i] ? -INFINITY : 0.f;  // a reset: decay 0, which also zeroes every term through h_{t-1}
            const float go = tv ? __bfloat162float(sdo[i * CPB + cl]) : 0.f;
            const float zz = (tv && p.z) ? __bfloat162float(sz[i * CPB + cl]) : 0.f;
            const float du_own = delta * uu;
            float Bv[4][R], Cv[4][R], hs[R];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                ldsf_r<R>(sB + (4 * g + j) * geo.pB, Bv[j]);
                ldsf_r<R>(sC + (4 * g + j) * geo.pC, Cv[j]);
            }
#pragma unroll
            for (int r = 0; r < R; r++) hs[r] = sub[(g * R + r) * THREADS + tid];
            // recompute the group's states and decays
            float hj[4][R], aj[4][R], dj[4], duj[4], yp[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                dj[j] = __shfl_sync(FULL_MASK, delta, base + j);
                duj[j] = __shfl_sync(FULL_MASK, du_own, base + j);
                const float rj = __shfl_sync(FULL_MASK, rs, base + j);
                yp[j] = 0.f;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    aj[j][r] = ex2f(fmaf(dj[j], A2[r], rj));
                    hj[j][r] = aj[j][r] * (j ? hj[j - 1][r] : hs[r]) + duj[j] * Bv[j][r];
                    yp[j] += Cv[j][r] * hj[j][r];
                }
            }
            // output gradient of the owned step: gate, D skip
            const float y = reduce_scatter4(yp, q) + Dd * uu;
            float gy = go, dzv = 0.f;
            if (p.z) {
                const float sg = sigmoid_dev(zz);
                dzv = go * y * sg * (1.f + zz * (1.f - sg));
                gy = go * zz * sg;
            }
            dD_acc += gy * uu;
            float gyj[4], ddp[4], dup[4];
#pragma unroll
            for (int j = 0; j < 4; j++) gyj[j] = __shfl_sync(FULL_MASK, gy, base + j);
            // adjoint through the 4 steps, newest first
#pragma unroll
            for (int j = 3; j >= 0; j--) {
                float cC[R], cB[R], sA = 0.f, sBg = 0.f;
                const float gyv = gyj[j] * vmask, duv = duj[j] * vmask;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const float gr = fmaf(gyj[j], Cv[j][r], dh[r]);  // dL/dh_t
                    const float ga = gr * aj[j][r];                  // = dL/dh_{t-1} (0 after a reset)
                    const float gah = ga * (j ? hj[j - 1][r] : hs[r]);
                    sA = fmaf(gah, A[r], sA);                        // d/d delta through the decay
                    dA_acc[r] = fmaf(gah, dj[j], dA_acc[r]);
                    sBg = fmaf(gr, Bv[j][r], sBg);                   // sum_r dL/dh_t * B: feeds du and d delta
                    dh[r] = ga;
                    cC[r] = gyv * hj[j][r];
                    cB[r] = gr * duv;
                }
                ddp[j] = sA;   // d delta = u * sum sBg + sum sA, formed by the step's owner lane
                dup[j] = sBg;
                if constexpr (WRED) {
                    // reduce-scatter over lane bits 4, 3, 2 (the warp's 8 channels): 7 shuffles
                    const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
                    float k4[4], k2[2];
#pragma unroll
                    for (int m = 0; m < 4; m++)
                        k4[m] = (b4 ? cB[m] : cC[m]) + __shfl_xor_sync(FULL_MASK, b4 ? cC[m] : cB[m], 16);
#pragma unroll
                    for (int m = 0; m < 2; m++)
                        k2[m] = (b3 ? k4[2 + m] : k4[m]) + __shfl_xor_sync(FULL_MASK, b3 ? k4[m] : k4[2 + m], 8);
                    const float k1 = (b2 ? k2[1] : k2[0]) + __shfl_xor_sync(FULL_MASK, b2 ? k2[0] : k2[1], 4);
                    const int r = (b3 ? 2 : 0) + (b2 ? 1 : 0), kind = b4 ? 1 : 0;  // kind 0: dC, 1: dB
                    redC[((((g & 1) * 4 + j) * NW + warp) * 2 + kind) * N + q * R + r] = k1;
                    continue;
                }
                float *pc = redC + (j * CPB + cl) * N + q * R, *pb = redB + (j * CPB + cl) * N + q * R;
                if constexpr (R == 4) {
                    *reinterpret_cast<float4 *>(pc) = make_float4(cC[0], cC[1], cC[2], cC[3]);
                    *reinterpret_cast<float4 *>(pb) = make_float4(cB[0], cB[1], cB[2], cB[3]);
                } else {
#pragma unroll
                    for (int r = 0; r < R; r++) pc[r] = cC[r], pb[r] = cB[r];
                }
            }
            const float sA_own = reduce_scatter4(ddp, q), sB_own = reduce_scatter4(dup, q);
            const float dd_own = fmaf(uu, sB_own, sA_own), du_sc = delta * sB_own;
            if (tv && dvalid) {
                const float dtt = dd_own * dsoftplus_dev(raw);
                const int64_t row = (b * L + t0 + q) * D + d;
                ddb_acc += dtt;
                stbf(p.du + row, gy * Dd + du_sc);
                stbf(p.ddt + row, dtt);
                if (p.z) stbf(p.dz + row, dzv);
            }
            __syncthreads();
            if constexpr (WRED) {
                // per-warp sums -> dC (Dg/8 warps) and dB (Db/8 warps), in warp order; buffers alternate with g
                const float *rw = redC + (g & 1) * 4 * NW * 2 * N;
                if (THREADS == 256 && p.Dg == 16 && p.Db == 64) {
                    // MambaInLlama's grouping: 4 C groups of 2 warps and 1 B group of 8 warps per block; one dC
                    // value per thread and one dB value for threads 0..63, same summation order as below
                    const int j = tid >> 6, gi = (tid >> 4) & 3, n = tid & 15;
                    const int64_t tt = t0 + j, gcg = cb * 4 + gi;
                    const float sC = rw[((j * NW + 2 * gi) * 2) * N + n] + rw[((j * NW + 2 * gi + 1) * 2) * N + n];
                    if (tt < te && gcg < p.Gc) stbf(p.dC + ((b * L + tt) * p.Gc + gcg) * N + n, sC);
                    if (tid < 64) {
                        const int jb = tid >> 4;
                        float sBv = 0.f;
#pragma unroll
                        for (int w = 0; w < 8; w++) sBv += rw[((jb * NW + w) * 2 + 1) * N + n];
                        if (t0 + jb < te && cb < p.Gb) stbf(p.dB + ((b * L + t0 + jb) * p.Gb + cb) * N + n, sBv);
                    }
                    continue;
                }
                const int wpc = (int)p.Dg / 8, wpb = (int)p.Db / 8, tot = 4 * (ngrp + nbg) * N;
                for (int e = tid; e < tot; e += THREADS) {
                    const int n = e % N, x = e / N, j = x % 4, gi = x / 4;  // gi < ngrp: C group, else B group
                    const int64_t tt = t0 + j;
                    if (gi < ngrp) {
                        float sC = 0.f;
                        for (int w = gi * wpc; w < (gi + 1) * wpc; w++) sC += rw[((j * NW + w) * 2 + 0) * N + n];
                        const int64_t gcg = cb * ngrp + gi;
                        if (tt < te && gcg < p.Gc) stbf(p.dC + ((b * L + tt) * p.Gc + gcg) * N + n, sC);
                    } else {
                        const int bi = gi - ngrp;
                        float sBv = 0.f;
                        for (int w = bi * wpb; w < (bi + 1) * wpb; w++) sBv += rw[((j * NW + w) * 2 + 1) * N + n];
                        const int64_t gbg = cb * nbg + bi;
                        if (tt < te && gbg < p.Gb) stbf(p.dB + ((b * L + tt) * p.Gb + gbg) * N + n, sBv);
                    }
                }
                continue;  // the next group writes the other buffer; its barrier orders the reuse of this one
            }
            // dC per C group and step; dB summed per C group first (in place, or to the fp32 partials)
            const int tot1 = 4 * ngrp * N;
            for (int e = tid; e < tot1; e += THREADS) {
                const int n = e % N, gi = (e / N) % ngrp, j = e / (N * ngrp);
                const int64_t tt = t0 + j, gcg = cb * ngrp + gi;
                float sC = 0.f, sBv = 0.f;
                for (int c = 0; c < (int)p.Dg; c++) {
                    sC += redC[(j * CPB + gi * (int)p.Dg + c) * N + n];
                    sBv += redB[(j * CPB + gi * (int)p.Dg + c) * N + n];
                }
                const bool ok = tt < te && gcg < p.Gc;
                if (ok) stbf(p.dC + ((b * L + tt) * p.Gc + gcg) * N + n, sC);
                if (fastB) redB[(j * CPB + gi * (int)p.Dg) * N + n] = sBv;
                else if (ok) p.dB_part[((b * L + tt) * p.Gc + gcg) * N + n] = sBv;
            }
            if (fastB) {
                __syncthreads();
                const int tot2 = 4 * nbg * N;
                for (int e = tid; e < tot2; e += THREADS) {
                    const int n = e % N, bi = (e / N) % nbg, j = e / (N * nbg);
                    const int64_t tt = t0 + j, gbg = cb * nbg + bi;
                    float sBv = 0.f;
                    for (int i2 = 0; i2 < rep; i2++) sBv += redB[(j * CPB + (bi * rep + i2) * (int)p.Dg) * N + n];
                    if (tt < te && gbg < p.Gb) stbf(p.dB + ((b * L + tt) * p.Gb + gbg) * N + n, sBv);
                }
            }
            __syncthreads();
        }
    }
    // per-row partial sums; lanes of a channel combine in a fixed order
    dD_acc += __shfl_xor_sync(FULL_MASK, dD_acc, 1);
    dD_acc += __shfl_xor_sync(FULL_MASK, dD_acc, 2);
    ddb_acc += __shfl_xor_sync(FULL_MASK, ddb_acc, 1);
    ddb_acc += __shfl_xor_sync(FULL_MASK, ddb_acc, 2);
    if (dvalid) put_bwd_partials<N, R>(p, seg, b, d, q * R, dA_acc, dh, q == 0, dD_acc, ddb_acc);
}

// Backward time-segment pre-pass (v10). For segments 1..nseg-1, the adjoint at the segment's start when it starts
// from zero at the segment's end: dh_{t-1} = a_t (dh_t + gy_t C_t) does not involve the states, so it costs one
// exp and two FMAs per state and step; plus sum delta and "holds a reset" (the product of the decays is 0 after a
// reset, else 2^(A log2e sum delta)). A serial walk over a whole segment waits one memory latency per step (it cost
// 0.4-3 ms at 1 x 8192 on the H100), so pieces of piecelen steps (64 by default) run in parallel, one thread per
// (piece, row, channel), and scan_bwd_seg_fold composes each segment's pieces, last first (exact: the map is linear).
template <int N, bool AL16>
__global__ void __launch_bounds__(128) scan_bwd_piece_prepass(const BwdArgs p) {
    const int64_t D = p.D, L = p.L, ncb = (D + 127) / 128;
    int64_t bid = blockIdx.x;
    const int64_t cb = bid % ncb;
    bid /= ncb;
    const int64_t b = bid % p.B;
    bid /= p.B;
    const int64_t pc = bid % p.npps;
    const int seg = 1 + (int)(bid / p.npps);
    const int64_t d = cb * 128 + threadIdx.x;
    if (d >= D) return;
    const int64_t gc = d / p.Dg, Gc = p.Gc;
    const int64_t sb = (int64_t)seg * p.seglen, se = sb + p.seglen < L ? sb + p.seglen : L;
    const int64_t tb = sb + pc * p.piecelen, te = tb + p.piecelen < se ? tb + p.piecelen : se;  // may be empty
    float A2[N], dh[N];
#pragma unroll
    for (int n = 0; n < N; n++) A2[n] = p.A[d * N + n] * SCAN_LOG2E, dh[n] = 0.f;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    // no branches in the loop, so that the loads of later steps can be issued early: absent z / resets read a
    // stand-in array and are masked
    const bool hasz = p.z != nullptr, hasrs = p.reset != nullptr;
    const bf16 *zsrc = hasz ? p.z : p.dt;
    const uint8_t *rsrc = hasrs ? p.reset : (const uint8_t *)p.dt;
    float sd = 0.f;
    int anyrs = 0;
#pragma unroll 4
    for (int64_t t = te - 1; t >= tb; t--) {
        const int64_t row = (b * L + t) * D + d;
        const float delta = softplus_dev(ldbf(p.dt + row) + bias), go = ldbf(p.dout + row), zz = ldbf(zsrc + row);
        const bool rs = hasrs && __ldg(rsrc + b * L + t) != 0;
        const float rx = rs ? -INFINITY : 0.f;
        const float gy = hasz ? go * zz * sigmoid_dev(zz) : go;
        float Cv[N];
        const bf16 *cp = p.Cm + ((b * L + t) * Gc + gc) * N;
        if constexpr (AL16 && N % 8 == 0) {
            load_vec<N>(cp, Cv);
        } else {
#pragma unroll
            for (int n = 0; n < N; n++) Cv[n] = ldbf(cp + n);
        }
#pragma unroll
        for (int n = 0; n < N; n++) dh[n] = ex2f(fmaf(delta, A2[n], rx)) * fmaf(gy, Cv[n], dh[n]);
        sd += delta, anyrs |= rs;
    }
    const int64_t i = ((b * (p.nseg - 1) + seg - 1) * p.npps + pc) * D + d;
#pragma unroll
    for (int n = 0; n < N; n++) p.piece_dh[i * N + n] = dh[n];
    p.piece_sd[i] = sd, p.piece_rs[i] = anyrs;
}

// seg_* of segment s >= 1 from its pieces, last first: dh <- (reset ? 0 : 2^(A log2e sd)) dh + piece dh
template <int N>
__global__ void __launch_bounds__(128) scan_bwd_seg_fold(const BwdArgs p) {
    const int64_t D = p.D, ncb = (D + 127) / 128;
    const int64_t cb = blockIdx.x % ncb, b = (blockIdx.x / ncb) % p.B;
    const int seg = 1 + (int)(blockIdx.x / ncb / p.B);
    const int64_t d = cb * 128 + threadIdx.x;
    if (d >= D) return;
    float A2[N], dh[N];
#pragma unroll
    for (int n = 0; n < N; n++) A2[n] = p.A[d * N + n] * SCAN_LOG2E, dh[n] = 0.f;
    float sd = 0.f;
    int anyrs = 0;
    for (int64_t pc = p.npps - 1; pc >= 0; pc--) {
        const int64_t i = ((b * (p.nseg - 1) + seg - 1) * p.npps + pc) * D + d;
        const bool rs = p.piece_rs[i] != 0;
        const float s2 = p.piece_sd[i];
#pragma unroll
        for (int n = 0; n < N; n++) dh[n] = (rs ? 0.f : ex2f(A2[n] * s2)) * dh[n] + p.piece_dh[i * N + n];
        sd += s2, anyrs |= rs;
    }
    const int64_t i = (b * p.nseg + seg) * D + d;
#pragma unroll
    for (int n = 0; n < N; n++) p.seg_dh[i * N + n] = dh[n];
    p.seg_sd[i] = sd, p.seg_rs[i] = anyrs;
}

// out[m] = sum over b of part[b*M + m], in order of b
__global__ void reduce_rows_kernel(const float *part, int64_t rows, int64_t M, float *out) {
    const int64_t m = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) return;
    float s = 0.f;
    for (int64_t b = 0; b < rows; b++) s += part[b * M + m];
    out[m] = s;
}
// dB[row, gb, n] = sum over the rep C groups of B group gb of part[row, gc, n], in order
__global__ void reduce_dB_kernel(const float *part, int64_t BL, int64_t Gb, int64_t rep, int64_t N, bf16 *dB) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= BL * Gb * N) return;
    const int64_t n = i % N, gb = (i / N) % Gb, row = i / (N * Gb);
    float s = 0.f;
    for (int64_t k = 0; k < rep; k++) s += part[(row * Gb * rep + gb * rep + k) * N + n];
    dB[i] = __float2bfloat16_rn(s);
}

// ---- decode: K tokens from a cached state ----------------------------------------------------------------
struct MultiArgs {
    int64_t B, K, D, Gc, Gb, Dg, Db;
    const bf16 *u, *dt, *Bm, *Cm, *z;
    const float *A, *Dskip, *delta_bias, *h_in;
    const int32_t *keep;
    bf16 *out;
    float *h_keep, *h_end;
    ScanLayers ls;  // blockIdx.y = layer: each pointer advanced by its stride times the layer (zeros: one layer)
};

template <int N>
__global__ void __launch_bounds__(FWD_THREADS) scan_multi_kernel(const MultiArgs p) {
    constexpr int R = N / QL;
    const int64_t ncb = (p.D + 31) / 32, cb = blockIdx.x % ncb, b = blockIdx.x / ncb;
    const int q = threadIdx.x & 3;
    const int64_t d_raw = cb * 32 + (threadIdx.x >> 2);
    const bool dvalid = d_raw < p.D;
    const int64_t d = dvalid ? d_raw : p.D - 1, D = p.D, K = p.K;
    const int64_t gc = d / p.Dg, gb = d / p.Db, l = blockIdx.y;
    const bf16 *u = p.u + l * p.ls.u, *dtp = p.dt + l * p.ls.dt, *Bm = p.Bm + l * p.ls.B, *Cm = p.Cm + l * p.ls.C;
    const float *Ap = p.A + l * p.ls.A, *h_in = p.h_in + l * p.ls.h;
    float *h_keep = p.h_keep ? p.h_keep + l * p.ls.h_keep : nullptr;
    float A2[R], h[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        A2[r] = Ap[d * N + q * R + r] * SCAN_LOG2E;
        h[r] = h_in[(b * D + d) * N + q * R + r];  // read before h_keep (maybe the same memory) is written
    }
    int64_t keep = p.keep ? p.keep[b] : K;
    keep = keep < 0 ? 0 : (keep > K ? K : keep);
    const float bias = p.delta_bias ? p.delta_bias[l * p.ls.delta_bias + d] : 0.f;
    // only the state after keep wanted (a replay: no outputs, no end state): the steps past keep are not run
    const int64_t last = !p.out && !p.h_end ? keep : K;
    for (int64_t t = 0; t <= last; t++) {
        if (t == keep && h_keep && dvalid) {
#pragma unroll
            for (int r = 0; r < R; r++) h_keep[(b * D + d) * N + q * R + r] = h[r];
        }
        if (t == last) break;
        const int64_t row = (b * K + t) * D + d;
        const float uu = ldbf(u + row), delta = softplus_dev(ldbf(dtp + row) + bias);
        float Bv[R], Cv[R], y = 0.f;
        load_vec<R>(Bm + ((b * K + t) * p.Gb + gb) * N + q * R, Bv);
        if (p.out) load_vec<R>(Cm + ((b * K + t) * p.Gc + gc) * N + q * R, Cv);
#pragma unroll
        for (int r = 0; r < R; r++) {
            h[r] = ex2f(delta * A2[r]) * h[r] + delta * uu * Bv[r];
            if (p.out) y += Cv[r] * h[r];
        }
        if (!p.out) continue;  // warp-uniform
        y += __shfl_xor_sync(FULL_MASK, y, 1);
        y += __shfl_xor_sync(FULL_MASK, y, 2);
        if (q == 0 && dvalid) {
            float o = y + p.Dskip[d] * uu;
            if (p.z) {
                const float zz = ldbf(p.z + row);
                o *= zz * sigmoid_dev(zz);
            }
            stbf(p.out + row, o);
        }
    }
    if (p.h_end && dvalid) {
#pragma unroll
        for (int r = 0; r < R; r++) p.h_end[(b * D + d) * N + q * R + r] = h[r];
    }
}

int check_shape(const ScanShape *s, int for_bwd, char *err, size_t errlen) {
    if (s->batch < 1 || s->seqlen < 0 || s->dim < 1 || s->groups_c < 1 || s->groups_b < 1)
        return scan_fail(err, errlen, "selective scan: bad shape (batch %lld, seqlen %lld, dim %lld, groups %lld/%lld)",
                         (long long)s->batch, (long long)s->seqlen, (long long)s->dim, (long long)s->groups_c,
                         (long long)s->groups_b);
    if (s->dstate != 4 && s->dstate != 8 && s->dstate != 16 && s->dstate != 32)
        return scan_fail(err, errlen, "selective scan (CUDA): dstate %lld unsupported, expected 4, 8, 16 or 32",
                         (long long)s->dstate);
    if (s->dim % s->groups_c || s->groups_c % s->groups_b)
        return scan_fail(err, errlen, "selective scan: dim %lld must be a multiple of groups_c %lld, and groups_c of groups_b %lld",
                         (long long)s->dim, (long long)s->groups_c, (long long)s->groups_b);
    const int cpb = s->dstate == 32 ? 32 : 64;
    if (for_bwd && cpb % (s->dim / s->groups_c))
        return scan_fail(err, errlen, "selective scan backward (CUDA): %lld channels per C group must divide %d",
                         (long long)(s->dim / s->groups_c), cpb);
    return 0;
}

int64_t n_ckpt(const ScanShape *s) { return (s->seqlen + SCAN_CKPT - 1) / SCAN_CKPT; }  // 64-step chunks
// checkpoints per 64-step chunk: 8 (the state before every 8th step) when DISTILL_SCAN_BWD=v13 selects the backward
// that reads them instead of sweeping each chunk; the forward and backward of a pass must see the same setting
int ckpt_mul();
// checkpoints per batch row
int64_t n_ckpt_rows(const ScanShape *s) {
    return ckpt_mul() == 8 ? (s->seqlen + SCAN_CKPT / 8 - 1) / (SCAN_CKPT / 8) : n_ckpt(s);
}

// segments: enough threads to fill the GPU, each segment a multiple of SCAN_CKPT steps
int choose_nseg(const ScanShape *s, int nseg) {
    const int64_t maxseg = n_ckpt(s) > 0 ? n_ckpt(s) : 1;
    if (nseg <= 0) {
        // one thread per channel: aim at ~32K threads (about 8 warps per SM)
        const int64_t threads = s->batch * s->dim;
        nseg = (int)((32768 + threads - 1) / threads);
    }
    if (nseg > maxseg) nseg = (int)maxseg;
    if (nseg > 64) nseg = 64;
    return nseg < 1 ? 1 : nseg;
}
int64_t seg_len(const ScanShape *s, int nseg) {
    const int64_t per = (s->seqlen + nseg - 1) / nseg;
    return (per + SCAN_CKPT - 1) / SCAN_CKPT * SCAN_CKPT;
}

// ---- backward v11: a lane pair per channel, 8-step groups in registers, dB/dC through shared memory ---------
// One block = 64 channels x 2 lanes (lane hf owns states [8 hf, 8 hf + 8)); a warp = 16 channels = one C group;
// 2 blocks per SM. Per 64-step chunk, newest first: a sweep from the forward's fp32 checkpoint keeps the state
// before every 8-step group in shared memory; then each group, newest first, is recomputed into registers (8 steps
// x 8 states of h and of the decay a: two exps per state and step in all), and the adjoint runs back through its 8
// steps. Per-step scalars are computed once per (step, channel): lane hf owns steps 2q + hf of a group and leaves
// delta, delta*u and the gated output gradient in a per-warp buffer for its partner; the pair's partial sums over
// states (y, sum dh B, sum dh a h A) meet with one shuffle per step pair. dB and dC: every lane writes its 8 + 8
// per-state terms to a per-warp buffer; lane l then sums one column (dC of state l, or the warp's partial dB of
// state l - 16) over the warp's 16 channels in a fixed order; B groups of 32 or 64 channels add the warps' partials
// in warp order after the group's barrier; other widths (48, 80, ..., which may straddle blocks) write the warps'
// partials to an fp32 workspace that reduce_dB_kernel sums in order. No atomics: deterministic.
// Inputs arrive by cp.async in 8-step slots: when group g of chunk k is done, its slot is refilled with the group of
// chunk k - 1 that uses it (7 - g: slots alternate direction with the chunk's parity, so that the groups the next
// sweep needs first are loaded first). Each warp converts its own B and C rows of a group to fp32 when it starts it.
// Why a lane pair rather than one thread per channel: 8 x 16 states of h and a do not fit 255 registers, and
// snapshots every 4 steps (16 x 64 bytes per channel) would leave room for ~4 warps per SM (docs/KERNELS.md).
constexpr int B11_CH = 64, B11_THREADS = 128, B11_G = 8, B11_NG = SCAN_CKPT / B11_G, B11_WARPS = B11_THREADS / 32;
static_assert(SCAN_CKPT == 64, "the slot scheme assumes 8 groups of 8 steps per chunk");
// v12's dB/dC terms of a step: [lane half hf][channel in warp: 20 floats, 16 used: 8 h (dC), 8 dL/dh (dB)]; the
// half stride 336 (= 16 mod 32) and the row stride 20 keep the writers' float4 stores and the readers' column loads
// free of bank conflicts
constexpr int B12_RHALF = 336, B12_RROW = 20, B12_RED = B12_RHALF + 16 * B12_RROW;
// floats per warp: B/C rows, step scalars, dB/dC terms
template <bool V12>
__host__ __device__ constexpr int b11_wbuf() { return B11_G * 32 + B11_G * 3 * 16 + (V12 ? B12_RED : 512); }

struct B11Geom {  // byte offsets into dynamic shared memory
    int act, Bs, Cs, ck, rxf, snap, wbuf, redB, so, bytes;
};
// a group's outputs are staged in shared memory (du, ddt, dz [step][channel], dC [step][4 groups x 16], dB [step][4
// groups x 16] when B groups are 16 channels wide) and written after the group's barrier as 16-byte rows: the
// per-step 2-byte stores each cost a 64-bit address computation that the registers could not keep
// DB: channels per B group, 16, 32 or 64; 0 = any other multiple of 16 (48, 80, 96, 128, ...: the generic mode, in
// which a B group may straddle blocks): each warp stages its own B group's rows (the B span holds 4 rows of 16, as
// for DB = 16), and the warps' partial dB (sums over their 16 channels = one C group) go through redB to the fp32
// workspace dB_part [B*L, Gc, 16] as 16-byte rows; reduce_dB_kernel then sums each B group's Db/16 partials in order.
constexpr int B11_SOK = 5;
// staged output kinds: v12 leaves out dB's unless B groups are 16 channels wide (v11 kept room for it)
template <int DB, bool V12>
__host__ __device__ constexpr int b11_sok() { return V12 && DB != 16 ? 4 : B11_SOK; }
template <int DB, int V>
B11Geom b11_geom() {
    constexpr bool V12 = V >= 12;
    constexpr int PB = DB ? (B11_CH / DB) * 16 : B11_WARPS * 16;
    B11Geom g;
    int o = 0;
    g.act = o, o += 4 * SCAN_CKPT * B11_CH * 2;               // u, dt, z, dout [kind][physical step][channel] bf16
    g.Bs = o, o += SCAN_CKPT * PB * 2;                        // B span [physical step][PB] bf16
    g.Cs = o, o += SCAN_CKPT * B11_CH * 2;                    // C span [physical step][64] bf16 (4 groups of 16)
    g.ck = o, o += V == 13 ? 0 : B11_CH * 16 * 4;             // the chunk's checkpoint [channel][16] fp32
    g.rxf = o, o += SCAN_CKPT * 4;                            // 0 or -inf (reset) per logical step
    // state before groups 1..7 [g-1][half][thread][4]; v13: before each group, from the forward [slot][channel][16]
    g.snap = o, o += V == 13 ? B11_NG * B11_CH * 16 * 4 : (B11_NG - 1) * B11_THREADS * 8 * 4;
    g.wbuf = o, o += B11_WARPS * b11_wbuf<V12>() * 4;         // per warp, see b11_wbuf
    g.redB = o, o += DB != 16 ? 2 * B11_G * B11_WARPS * 16 * 4 : 0;  // [group parity][step][warp][16]
    g.so = o, o += 2 * b11_sok<DB, V12>() * B11_G * B11_CH * 2;  // staged outputs [group parity][kind][step][64] bf16
    g.bytes = o;
    return g;
}

// 8 floats of a state from two float4 at p and p + stride
__device__ __forceinline__ void ld_state8(const float *p, int stride, float (&v)[8]) {
    const float4 a = *reinterpret_cast<const float4 *>(p), c = *reinterpret_cast<const float4 *>(p + stride);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = c.x, v[5] = c.y, v[6] = c.z, v[7] = c.w;
}

// One state of one adjoint step (the v11 and v12/v13 adjoints): from dh = dL/dh_t's part carried from step t + 1, the
// step's gy C and decay a, and the state before the step, prev: returns gr = dL/dh_t, leaves dL/dh_{t-1} in dh and
// adds the state's terms to the two-accumulator sums over states (sA2: dh a h A, sB2: dh B) and to dA.
__device__ __forceinline__ float b11_adj_state(float &dh, float gyj, float Cn, float an, float prev, float A2n, float dlj,
                                               float Bn, float &sA2, float &dAn, float &sB2) {
    const float gr = fmaf(gyj, Cn, dh);  // dL/dh_t
    const float ga = gr * an;            // dL/dh_{t-1} (0 after a reset)
    const float gah = ga * prev;
    sA2 = fmaf(gah, A2n, sA2);
    dAn = fmaf(gah, dlj, dAn);
    sB2 = fmaf(gr, Bn, sB2);
    dh = ga;
    return gr;
}

// The end of an adjoint step pair 2q, 2q + 1 (both lanes of the channel have their partial sums over states of
// sum dh a h A (sA) and sum dh B (sB) for the even step, sAo / sBo for the odd one): lane hf owns step jo = 2q + hf
// and gets its partner's sums with one shuffle each, then stages du = gy D + delta SB and ddt = (u SB + ln2 SA)
// softplus'(raw) in so (kinds 0, 1: [kind][step][64]) and adds ddt to the ddelta_bias sum. wsc: the warp's step
// scalars [step][delta, delta*u, gy][16 channels]; su: the group's u rows of this channel [step][64] bf16.
__device__ __forceinline__ void b11_pair_out(float sA, float sB, float sAo, float sBo, int hf, int q, int nv,
                                             const float (&dspo)[B11_G / 2], const float *wsc, int cw, const bf16 *su,
                                             int sl, float Dd, bf16 *so, int cl, float &ddb_acc) {
    constexpr int G = B11_G, CH = B11_CH;
    const int jo = 2 * q + hf;
    const float kA = hf ? sAo : sA, xA = hf ? sA : sAo, kB = hf ? sBo : sB, xB = hf ? sB : sBo;
    const float SA = kA + __shfl_xor_sync(FULL_MASK, xA, 1), SB = kB + __shfl_xor_sync(FULL_MASK, xB, 1);
    const float dlo = wsc[(jo * 3) * 16 + cw], gyo = wsc[(jo * 3 + 2) * 16 + cw];
    const float uu = jo < nv ? __bfloat162float(su[(sl * G + jo) * CH]) : 0.f;
    const float dtt = fmaf(uu, SB, SA * SCAN_LN2) * dspo[q];
    if (jo < nv) ddb_acc += dtt;
    so[(0 * G + jo) * CH + cl] = __float2bfloat16_rn(fmaf(gyo, Dd, dlo * SB));
    so[(1 * G + jo) * CH + cl] = __float2bfloat16_rn(dtt);
}

// V12 (the default; DISTILL_SCAN_BWD=v11 selects V12 = false): the same kernel with (1) the adjoint's per-step column sums lagged by one step, so
// that step j + 1's column loads and adds overlap step j's arithmetic, and step j's B, C and scalars loaded one step
// ahead (v11 loaded them after the step's last __syncwarp, so every step waited a shared-memory latency twice);
// (2) one 64-bit offset per thread and group for every 16-byte row piece it copies (u, dt, z, dout, C in; du, ddt,
// dz, dC and 16-channel dB out: C groups of 16 channels make C's row stride D, as is dB's for 16-channel B groups),
// where v11 computed a 64-bit address per piece and kind with selects.
// V = 13 (DISTILL_SCAN_BWD=v13, opt-in): v12 without the sweep. The forward stores the state before every 8th step
// (8 bytes per token-channel instead of 1), and the state before each group arrives by cp.async with the group's
// inputs into the group's slot (4 KB per slot, the 32 KB of v12's checkpoint and snapshots); every chunk needs its
// groups newest first, so slot g always holds group g and is refilled with group g of the previous chunk.
template <int DB, int V>
__global__ void __launch_bounds__(B11_THREADS, 2) scan_bwd11_kernel(const BwdArgs p, const B11Geom geo) {
    constexpr bool V12 = V >= 12, V13 = V == 13;
    constexpr int N = 16, H = 8, CH = B11_CH, NTH = B11_THREADS, T = SCAN_CKPT, G = B11_G;
    // B span, B groups per block, warps per B group (DB = 0: a row per warp, see b11_geom)
    constexpr int PB = DB ? (CH / DB) * N : B11_WARPS * N, NBG = DB ? CH / DB : B11_WARPS, WPB = DB ? DB / 16 : 1;
    extern __shared__ __align__(16) char smem[];
    bf16 *act = (bf16 *)(smem + geo.act), *Bs = (bf16 *)(smem + geo.Bs), *Cs = (bf16 *)(smem + geo.Cs);
    float *ck = (float *)(smem + geo.ck), *rxf = (float *)(smem + geo.rxf), *snap = (float *)(smem + geo.snap);
    float *redB = (float *)(smem + geo.redB);

    const int64_t L = p.L, D = p.D, ncb = D / CH;
    const int64_t cb = blockIdx.x % ncb, b = (blockIdx.x / ncb) % p.B;
    const int seg = (int)(blockIdx.x / ncb / p.B);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, hf = tid & 1, cl = tid >> 1, cw = lane >> 1;
    const int64_t c0 = cb * CH, d = c0 + cl, gc0 = c0 / 16, gb0 = DB ? c0 / DB : 0;
    const int64_t GbN = p.Gb * N, GcN = p.Gc * N;
    const bool hasz = p.z != nullptr;
    // per-warp buffers: wbc [8 steps][B 16 | C 16] fp32; wsc [8 steps][delta, delta*u, gy][16 channels]; red (below)
    constexpr int SOK = b11_sok<DB, V12>();
    float *wbc = (float *)(smem + geo.wbuf) + warp * b11_wbuf<V12>(), *wsc = wbc + G * 32, *red = wsc + G * 3 * 16;
    const int boff = DB ? ((16 * warp) / DB) * 16 : warp * 16;  // the warp's B group within the block's B span

    float A2[H], dh[H], dA[H];
#pragma unroll
    for (int n = 0; n < H; n++) {
        A2[n] = p.A[d * N + hf * H + n] * SCAN_LOG2E;
        dh[n] = p.dh_last ? p.dh_last[(b * D + d) * N + hf * H + n] : 0.f;
        dA[n] = 0.f;
    }
    seg_carry_dh<N, H>(p, b, d, seg, hf * H, A2, dh);
    const float Dd = p.Dskip[d], bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    float dD_acc = 0.f, ddb_acc = 0.f;
    const int64_t tseg0 = (int64_t)seg * p.seglen, tseg1 = tseg0 + p.seglen < L ? tseg0 + p.seglen : L;
    const int64_t kfirst = tseg0 / T, klast = (tseg1 - 1) / T;

    // logical group gg of chunk kk lives in slot (kk odd ? 7 - gg : gg)
    // (v13: slot gg; no sweep, so every chunk needs its groups newest first)
    auto slot_of = [](int64_t kk, int gg) { return (!V13 && (kk & 1)) ? G - 1 - gg : gg; };
    auto load_group = [&](int64_t kk, int gg) {
        const int sl = slot_of(kk, gg);
        const int64_t t0 = kk * T + gg * G;
        const int nv = (int)(L - t0 < G ? (L - t0 > 0 ? L - t0 : 0) : G);
        const int64_t row0 = b * L + t0;
        if constexpr (V12) {
            // thread: step i, channels c0 + x .. + 7 of u, dt, C (threads < 64) or z, dout (the others); one
            // offset for all (C: Gc * 16 == D and gc0 * 16 == c0)
            static_assert(G * 8 * 2 == NTH, "two threads per (step, 16-byte piece)");
            const int i = (tid >> 3) & 7, x = (tid & 7) * 8;
            if (i < nv) {
                const int64_t off = (row0 + i) * D + c0 + x;
                bf16 *dst = act + (sl * G + i) * CH + x;
                if (tid < 64) {
                    cp_async16(dst, p.u + off);
                    cp_async16(dst + T * CH, p.dt + off);
                    cp_async16(Cs + (sl * G + i) * CH + x, p.Cm + off);
                } else {
                    if (hasz) cp_async16(dst + 2 * T * CH, p.z + off);
                    cp_async16(dst + 3 * T * CH, p.dout + off);
                }
            }
        } else {
#pragma unroll
            for (int it = 0; it < 4 * G * 8 / NTH; it++) {  // 4 kinds x 8 steps x 8 16-byte pieces
                const int e = tid + it * NTH, kind = e >> 6, i = (e >> 3) & 7, x = (e & 7) * 8;
                const bf16 *src = kind == 0 ? p.u : kind == 1 ? p.dt : kind == 2 ? p.z : p.dout;
                if (i < nv && src) cp_async16(act + (kind * T + sl * G + i) * CH + x, src + (row0 + i) * D + c0 + x);
            }
        }
        // B: v12 puts the pieces on threads 64.. first (threads < 64 copy three pieces above, the others two)
        const int tb8 = V12 ? (tid + 64) & (NTH - 1) : tid;
        if constexpr (DB != 0) {
            for (int e = tb8; e < G * (PB / 8); e += NTH) {
                const int i = e / (PB / 8), x = (e % (PB / 8)) * 8;
                if (i < nv) cp_async16(Bs + (sl * G + i) * PB + x, p.Bm + (row0 + i) * GbN + gb0 * N + x);
            }
        } else {  // row x >> 4 of the span: the B group of warp x >> 4's channels, (c0 + 16 (x >> 4)) / Db
            static_assert(G * (PB / 8) <= NTH, "one 16-byte piece per thread");
            const int i = tb8 >> 3, x = (tb8 & 7) * 8;
            const int64_t gw = (int64_t)((uint32_t)(c0 + 16 * (x >> 4)) / (uint32_t)p.Db);
            if (tb8 < G * (PB / 8) && i < nv)
                cp_async16(Bs + (sl * G + i) * PB + x, p.Bm + (row0 + i) * GbN + gw * N + (x & 15));
        }
        if constexpr (V13) {  // the state before the group, [64 channels][16] fp32 contiguous: 2 pieces per thread
            if (nv > 0) {
                const float *src = p.ckpt + ((b * p.nck + kk * B11_NG + gg) * D + c0) * N;
                float *dst = snap + sl * CH * N;
#pragma unroll
                for (int it = 0; it < CH * N / 4 / NTH; it++)
                    cp_async16(dst + (tid + it * NTH) * 4, src + (tid + it * NTH) * 4);
            }
        }
        if (!V12 && tid < G * 8) {
            const int i = tid >> 3, x = (tid & 7) * 8;
            if (i < nv) cp_async16(Cs + (sl * G + i) * CH + x, p.Cm + (row0 + i) * GcN + gc0 * N + x);
        }
    };
    auto load_ck = [&](int64_t kk) {  // 64 channels x 16 states, contiguous
        const float *src = p.ckpt + ((b * p.nck + kk) * D + c0) * N;
#pragma unroll
        for (int it = 0; it < CH * N / 4 / NTH; it++) cp_async16(ck + (tid + it * NTH) * 4, src + (tid + it * NTH) * 4);
    };
    // the warp's B and C rows of a group (slot sl, nv valid steps) to fp32; zero past the end, so padded steps are
    // identities. Lane l: step l >> 2, 8 values (l & 3 < 2: B, else C).
    auto warp_bc = [&](int sl, int nv) {
        __syncwarp();  // the previous group's values have been read
        const int i = lane >> 2, x = lane & 3;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (i < nv)
            v = x < 2 ? *reinterpret_cast<const uint4 *>(Bs + (sl * G + i) * PB + boff + x * 8)
                      : *reinterpret_cast<const uint4 *>(Cs + (sl * G + i) * CH + warp * 16 + (x - 2) * 8);
        const __nv_bfloat162 *h2 = reinterpret_cast<const __nv_bfloat162 *>(&v);
        const float2 f0 = __bfloat1622float2(h2[0]), f1 = __bfloat1622float2(h2[1]);
        const float2 f2 = __bfloat1622float2(h2[2]), f3 = __bfloat1622float2(h2[3]);
        float4 *dp = reinterpret_cast<float4 *>(wbc + i * 32 + x * 8);
        dp[0] = make_float4(f0.x, f0.y, f1.x, f1.y);
        dp[1] = make_float4(f2.x, f2.y, f3.x, f3.y);
        __syncwarp();
    };
    const float *sB = wbc + hf * H, *sC = wbc + 16 + hf * H;  // + step * 32

    for (int gg = 0; gg < B11_NG; gg++) load_group(klast, gg);
    if (!V13) load_ck(klast);
    cp_async_commit();
    int rsv = (tid < T && p.reset && klast * T + tid < L) ? p.reset[b * L + klast * T + tid] : 0;

    for (int64_t k = klast; k >= kfirst; k--) {
        if (!V13 || k == klast) cp_async_wait<0>();  // v13 waits per group, below
        if (tid < T) rxf[tid] = rsv ? -INFINITY : 0.f;  // 0 past the end (rsv is 0 there)
        __syncthreads();
        rsv = (tid < T && p.reset && k > kfirst) ? p.reset[b * L + (k - 1) * T + tid] : 0;  // for the next chunk
        const int64_t tb = k * T, te = tb + T < L ? tb + T : L;
        const int ns = (int)(te - tb), ng = (ns + G - 1) / G;
        if (k > kfirst) {  // slots of groups past the chunk's end (only in the last chunk) are free already
            for (int gg = ng; gg < B11_NG; gg++) load_group(k - 1, V13 ? gg : G - 1 - gg);
        }
        cp_async_commit();

        const bf16 *su = act + cl, *sdt = su + T * CH, *sz = sdt + T * CH, *sdo = sz + T * CH;
        // sweep: the state before each group 1..ng-1 (whole groups: only the chunk's last group can be partial);
        // v13 reads them from the forward's 8-step checkpoints instead
        if constexpr (!V13) {
        float h[H];
        ldsf_vec<H>(ck + cl * N + hf * H, h);
#pragma unroll 1
        for (int g = 0; g < ng - 1; g++) {
            const int sl = slot_of(k, g);
            warp_bc(sl, G);
            float dl[G], du[G];
#pragma unroll
            for (int q = 0; q < G / 2; q++) {
                const int ps = sl * G + 2 * q + hf;
                const float uu = __bfloat162float(su[ps * CH]);
                const float dm = softplus_dev(__bfloat162float(sdt[ps * CH]) + bias), um = dm * uu;
                const float dox = __shfl_xor_sync(FULL_MASK, dm, 1), uox = __shfl_xor_sync(FULL_MASK, um, 1);
                dl[2 * q] = hf ? dox : dm, dl[2 * q + 1] = hf ? dm : dox;
                du[2 * q] = hf ? uox : um, du[2 * q + 1] = hf ? um : uox;
            }
#pragma unroll
            for (int j = 0; j < G; j++) {
                float Bv[H];
                ldsf_vec<H>(sB + j * 32, Bv);
                const float rx = rxf[g * G + j];
#pragma unroll
                for (int n = 0; n < H; n++) h[n] = ex2f(fmaf(dl[j], A2[n], rx)) * h[n] + du[j] * Bv[n];
            }
            float4 *sn = reinterpret_cast<float4 *>(snap) + (g * 2) * NTH + tid;
            sn[0] = make_float4(h[0], h[1], h[2], h[3]);
            sn[NTH] = make_float4(h[4], h[5], h[6], h[7]);
        }
        }
        // groups newest first
#pragma unroll 1
        for (int g = ng - 1; g >= 0; g--) {
            const int sl = slot_of(k, g);
            const int64_t t0 = tb + g * G;
            const int nv = (int)(te - t0 < G ? te - t0 : G);
            const float *hsrc = V13 ? snap + (sl * CH + cl) * N + hf * H
                                : g ? snap + ((g - 1) * 2 * NTH + tid) * 4 : ck + cl * N + hf * H;
            const int hstride = (g && !V13) ? NTH * 4 : 4;  // the second float4 of the state
            if constexpr (V13) {
                // this group's slot was filled by the commit 8 before the latest (counted from the group's refill in
                // chunk k + 1: its g later groups, this chunk's start, this chunk's 7 - g earlier groups), or by the
                // first chunk's, which the chunk start waited for
                cp_async_wait<8>();
                __syncthreads();
            }
            warp_bc(sl, nv);
            // output offsets of the group's first step (64-bit once per group; steps add 32-bit multiples)
            bf16 *so = (bf16 *)(smem + geo.so) + (g & 1) * SOK * G * CH;  // [kind][step][64]
            // own steps 2q + hf: scalars once per (step, channel), left in wsc for the partner lane
            float dspo[G / 2], dzf[G / 2];  // u is re-read where needed (registers)
#pragma unroll
            for (int q = 0; q < G / 2; q++) {
                const int j = 2 * q + hf, ps = sl * G + j;
                const bool tv = j < nv;
                const float raw = __bfloat162float(sdt[ps * CH]) + bias;
                const float uu = tv ? __bfloat162float(su[ps * CH]) : 0.f;
                const float go = tv ? __bfloat162float(sdo[ps * CH]) : 0.f;
                const float zz = (tv && hasz) ? __bfloat162float(sz[ps * CH]) : 0.f;
                float sp, dsp;
                softplus_d(raw, sp, dsp);
                const float dm = tv ? sp : 0.f;
                float gm = go, zf = 0.f;
                if (hasz) {
                    const float sg = sigmoid_dev(zz);
                    gm = go * zz * sg;
                    zf = go * sg * (1.f + zz * (1.f - sg));  // dz = zf * y
                }
                dspo[q] = dsp, dzf[q] = zf;
                dD_acc = fmaf(gm, uu, dD_acc);
                wsc[(j * 3 + 0) * 16 + cw] = dm;
                wsc[(j * 3 + 1) * 16 + cw] = dm * uu;
                wsc[(j * 3 + 2) * 16 + cw] = gm;
            }
            __syncwarp();
            // recompute the group's states and decays; after each step pair, the owners' gate gradient (y = both
            // halves' sums + D u)
            float hj[G][H], aj[G][H];
            {
                float hp[H], yo = 0.f;
                ld_state8(hsrc, hstride, hp);
#pragma unroll
                for (int j = 0; j < G; j++) {
                    float Bv[H], Cv[H], y0 = 0.f, y1 = 0.f;
                    ldsf_vec<H>(sB + j * 32, Bv);
                    ldsf_vec<H>(sC + j * 32, Cv);
                    const float rx = rxf[g * G + j], dlj = wsc[(j * 3) * 16 + cw], duj = wsc[(j * 3 + 1) * 16 + cw];
#pragma unroll
                    for (int n = 0; n < H; n++) {
                        aj[j][n] = ex2f(fmaf(dlj, A2[n], rx));
                        hj[j][n] = aj[j][n] * (j ? hj[j - 1][n] : hp[n]) + duj * Bv[n];
                        if (n & 1) y1 = fmaf(Cv[n], hj[j][n], y1);
                        else y0 = fmaf(Cv[n], hj[j][n], y0);
                    }
                    if (!(j & 1)) {
                        yo = y0 + y1;
                    } else {
                        const int q = j >> 1;
                        const float ye = yo, yd = y0 + y1, keep = hf ? yd : ye, send = hf ? ye : yd;
                        const int jo = 2 * q + hf;
                        const float uu = jo < nv ? __bfloat162float(su[(sl * G + jo) * CH]) : 0.f;
                        const float y = keep + __shfl_xor_sync(FULL_MASK, send, 1) + Dd * uu;
                        so[(2 * G + jo) * CH + cl] = __float2bfloat16_rn(dzf[q] * y);
                    }
                }
            }
            if constexpr (V12) {
                // adjoint through the 8 steps, newest first. Step j's dB/dC terms go to red in iteration j; their
                // column sums are loaded in iteration j - 1 (for step 0 after the loop), before that iteration
                // overwrites red, and added after it has stored its own terms: the loads and adds overlap step j - 1's
                // arithmetic. Step j's B, C and scalars are loaded during step j + 1. The terms are unscaled (h for
                // dC, dL/dh for dB): the reading lane multiplies each channel's by its gy (dC) or delta*u (dB),
                // 16 FFMA in place of v11's 16 FMUL per lane and step on the writing side plus 16 FADD.
                const int ckind = lane >> 4, cn = lane & 15;
                const float *col = red + (cn >> 3) * B12_RHALF + ckind * 8 + (cn & 7);  // + channel * B12_RROW
                float4 *rw = reinterpret_cast<float4 *>(red + hf * B12_RHALF + cw * B12_RROW);  // + kind * 2 + k
                auto col_load = [&](float (&cv)[16], float (&sc)[16], int js) {
#pragma unroll
                    for (int c = 0; c < 16; c++) cv[c] = col[c * B12_RROW];
                    ldsf_vec<16>(wsc + (js * 3 + 2 - ckind) * 16, sc);  // gy (dC) or delta*u (dB) per channel
                };
                auto col_put = [&](const float (&cv)[16], const float (&sc)[16], int js) {
                    float v4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int c = 0; c < 16; c++) v4[c & 3] = fmaf(sc[c], cv[c], v4[c & 3]);
                    const float v = (v4[0] + v4[1]) + (v4[2] + v4[3]);
                    if (lane < 16) so[(3 * G + js) * CH + warp * 16 + lane] = __float2bfloat16_rn(v);
                    else if (DB == 16) so[(4 * G + js) * CH + warp * 16 + lane - 16] = __float2bfloat16_rn(v);
                    else redB[(((g & 1) * G + js) * B11_WARPS + warp) * 16 + (lane - 16)] = v;
                };
                float sAo = 0.f, sBo = 0.f;  // the odd step's partial sums, combined with the even step's
                float Bn[H], Cn[H], hp0[H];  // the next step's B and C rows; the state before the group
                ldsf_vec<H>(sB + (G - 1) * 32, Bn);
                ldsf_vec<H>(sC + (G - 1) * 32, Cn);
                float dln = wsc[((G - 1) * 3) * 16 + cw], gyn = wsc[((G - 1) * 3 + 2) * 16 + cw];
#pragma unroll
                for (int j = G - 1; j >= 0; j--) {
                    float Bv[H], Cv[H], grs[H], sA2[2] = {0.f, 0.f}, sB2[2] = {0.f, 0.f};
#pragma unroll
                    for (int n = 0; n < H; n++) Bv[n] = Bn[n], Cv[n] = Cn[n];
                    const float dlj = dln, gyj = gyn;
                    if (j > 0) {
                        ldsf_vec<H>(sB + (j - 1) * 32, Bn);
                        ldsf_vec<H>(sC + (j - 1) * 32, Cn);
                        dln = wsc[((j - 1) * 3) * 16 + cw], gyn = wsc[((j - 1) * 3 + 2) * 16 + cw];
                    }
                    if (j == 1) ld_state8(hsrc, hstride, hp0);
#pragma unroll
                    for (int n = 0; n < H; n++) {
                        const float prev = j ? hj[j - 1][n] : hp0[n];
                        grs[n] = b11_adj_state(dh[n], gyj, Cv[n], aj[j][n], prev, A2[n], dlj, Bv[n], sA2[n & 1], dA[n],
                                               sB2[n & 1]);
                    }
                    const float sA = sA2[0] + sA2[1], sBg = sB2[0] + sB2[1];
                    float cv[16], sc[16];
                    if (j < G - 1) {
                        col_load(cv, sc, j + 1);  // step j + 1's terms
                        __syncwarp();             // read by every lane before this step's terms replace them
                    }
                    rw[0] = make_float4(hj[j][0], hj[j][1], hj[j][2], hj[j][3]);
                    rw[1] = make_float4(hj[j][4], hj[j][5], hj[j][6], hj[j][7]);
                    rw[2] = make_float4(grs[0], grs[1], grs[2], grs[3]);
                    rw[3] = make_float4(grs[4], grs[5], grs[6], grs[7]);
                    __syncwarp();
                    if (j < G - 1) col_put(cv, sc, j + 1);
                    if (j & 1) sAo = sA, sBo = sBg;
                    else b11_pair_out(sA, sBg, sAo, sBo, hf, j >> 1, nv, dspo, wsc, cw, su, sl, Dd, so, cl, ddb_acc);
                }
                float cv[16], sc[16];
                col_load(cv, sc, 0);  // step 0's terms
                col_put(cv, sc, 0);
            } else {
                // adjoint through the 8 steps, newest first
                float sAo = 0.f, sBo = 0.f;  // the odd step's partial sums, combined with the even step's
    #pragma unroll
                for (int j = G - 1; j >= 0; j--) {
                    // two accumulators per sum over states (a dependent chain of 8 FMAs stalls with 2 warps per scheduler)
                    float Bv[H], Cv[H], hp[H], cB[H], cC[H], sA2[2] = {0.f, 0.f}, sB2[2] = {0.f, 0.f};
                    ldsf_vec<H>(sB + j * 32, Bv);
                    ldsf_vec<H>(sC + j * 32, Cv);
                    if (j == 0) ld_state8(hsrc, hstride, hp);
                    const float dlj = wsc[(j * 3) * 16 + cw], duj = wsc[(j * 3 + 1) * 16 + cw], gyj = wsc[(j * 3 + 2) * 16 + cw];
    #pragma unroll
                    for (int n = 0; n < H; n++) {
                        const float prev = j ? hj[j - 1][n] : hp[n];
                        const float gr = b11_adj_state(dh[n], gyj, Cv[n], aj[j][n], prev, A2[n], dlj, Bv[n], sA2[n & 1],
                                                       dA[n], sB2[n & 1]);
                        cB[n] = gr * duj;
                        cC[n] = gyj * hj[j][n];
                    }
                    const float sA = sA2[0] + sA2[1], sBg = sB2[0] + sB2[1];
                    // dC (kind 0) and dB (kind 1) terms: float4 [kind][q][channel in warp][hf]
                    reinterpret_cast<float4 *>(red)[(0 * 16 + cw) * 2 + hf] = make_float4(cC[0], cC[1], cC[2], cC[3]);
                    reinterpret_cast<float4 *>(red)[(1 * 16 + cw) * 2 + hf] = make_float4(cC[4], cC[5], cC[6], cC[7]);
                    reinterpret_cast<float4 *>(red)[(2 * 16 + cw) * 2 + hf] = make_float4(cB[0], cB[1], cB[2], cB[3]);
                    reinterpret_cast<float4 *>(red)[(3 * 16 + cw) * 2 + hf] = make_float4(cB[4], cB[5], cB[6], cB[7]);
                    __syncwarp();
                    // lane l: kind l >> 4, state n = l & 15; rows staggered so that the 32 lanes hit distinct banks
                    // (4 interleaved partial sums, combined in a fixed order: deterministic, and no 16-long add chain)
                    float v;
                    {
                        const int kind = lane >> 4, n = lane & 15, qq = (n >> 2) & 1, hn = n >> 3, e = n & 3;
                        const float *col = red + ((kind * 2 + qq) * 16 * 2 + hn) * 4 + e;
                        float v4[4] = {0.f, 0.f, 0.f, 0.f};
    #pragma unroll
                        for (int i = 0; i < 16; i++) v4[i & 3] += col[((i + qq + 2 * kind) & 15) * 8];
                        v = (v4[0] + v4[1]) + (v4[2] + v4[3]);
                    }
                    __syncwarp();
                    if (lane < 16) so[(3 * G + j) * CH + warp * 16 + lane] = __float2bfloat16_rn(v);
                    else if (DB == 16) so[(4 * G + j) * CH + warp * 16 + lane - 16] = __float2bfloat16_rn(v);
                    else redB[(((g & 1) * G + j) * B11_WARPS + warp) * 16 + (lane - 16)] = v;
                    if (j & 1) sAo = sA, sBo = sBg;
                    else b11_pair_out(sA, sBg, sAo, sBo, hf, j >> 1, nv, dspo, wsc, cw, su, sl, Dd, so, cl, ddb_acc);
                }
            }
            __syncthreads();
            if constexpr (DB > 16) {  // B groups wider than a warp: the warps' partials in warp order
                const float *rb = redB + (g & 1) * G * B11_WARPS * 16;
                for (int e = tid; e < G * NBG * 16; e += NTH) {
                    const int j = e / (NBG * 16), bi = (e >> 4) % NBG, n = e & 15;
                    float s = 0.f;
#pragma unroll
                    for (int w = 0; w < WPB; w++) s += rb[(j * B11_WARPS + bi * WPB + w) * 16 + n];
                    if (j < nv) stbf(p.dB + (b * L + t0 + j) * GbN + (gb0 + bi) * N + n, s);
                }
            } else if constexpr (DB == 0) {
                // the warps' partials to dB_part [B*L, Gc, 16]: per step, the block's 4 C groups are 64 contiguous
                // floats there as in redB; 8 steps x 16 float4, one per thread
                static_assert(G * B11_WARPS * 16 / 4 == NTH, "one float4 per thread");
                const float *rb = redB + (g & 1) * G * B11_WARPS * 16;
                const int j = tid >> 4, x = (tid & 15) * 4;
                if (j < nv)
                    *reinterpret_cast<float4 *>(p.dB_part + ((b * L + t0 + j) * p.Gc + gc0) * N + x) =
                        *reinterpret_cast<const float4 *>(rb + j * B11_WARPS * 16 + x);
            }
            // the staged outputs of the group's valid steps, 16 bytes per thread and copy
            if constexpr (V12) {  // one offset for du, ddt, dz, dC (Gc * 16 == D) and 16-channel dB (Gb * 16 == D)
                const int i = (tid >> 3) & 7, x = (tid & 7) * 8;
                if (i < nv) {
                    const int64_t off = (b * L + t0 + i) * D + c0 + x;
                    const bf16 *src = so + i * CH + x;  // + kind * G * CH
                    if (tid < 64) {
                        *reinterpret_cast<uint4 *>(p.du + off) = *reinterpret_cast<const uint4 *>(src);
                        *reinterpret_cast<uint4 *>(p.ddt + off) = *reinterpret_cast<const uint4 *>(src + G * CH);
                        if constexpr (DB == 16)
                            *reinterpret_cast<uint4 *>(p.dB + off) = *reinterpret_cast<const uint4 *>(src + 4 * G * CH);
                    } else {
                        if (hasz) *reinterpret_cast<uint4 *>(p.dz + off) = *reinterpret_cast<const uint4 *>(src + 2 * G * CH);
                        *reinterpret_cast<uint4 *>(p.dC + off) = *reinterpret_cast<const uint4 *>(src + 3 * G * CH);
                    }
                }
            } else
            for (int e = tid; e < SOK * G * 8; e += NTH) {
                const int kind = e >> 6, i = (e >> 3) & 7, x = (e & 7) * 8;
                if (i >= nv || (kind == 2 && !hasz) || (kind == 4 && DB != 16)) continue;
                const uint4 v = *reinterpret_cast<const uint4 *>(so + (kind * G + i) * CH + x);
                const int64_t row = b * L + t0 + i;
                bf16 *dst = kind == 0   ? p.du + row * D + c0
                            : kind == 1 ? p.ddt + row * D + c0
                            : kind == 2 ? p.dz + row * D + c0
                            : kind == 3 ? p.dC + row * GcN + gc0 * N
                                        : p.dB + row * GbN + gb0 * N;
                *reinterpret_cast<uint4 *>(dst + x) = v;
            }
            if (k > kfirst) {  // this slot now takes the group of chunk k - 1 that uses it
                load_group(k - 1, V13 ? g : G - 1 - g);
                if (!V13 && g == 0) load_ck(k - 1);
            }
            cp_async_commit();
        }
    }
    cp_async_wait<0>();
    dD_acc += __shfl_xor_sync(FULL_MASK, dD_acc, 1);
    ddb_acc += __shfl_xor_sync(FULL_MASK, ddb_acc, 1);
    put_bwd_partials<N, H>(p, seg, b, d, hf * H, dA, dh, hf == 0, dD_acc, ddb_acc);
}

// v11 takes N = 16, C groups of 16 channels (a warp's 16 channels), B groups of any multiple of 16 channels (16, 32
// and 64 summed within the block; others through dB_part, DB = 0), D a multiple of 64 and 16-byte aligned rows;
// other shapes run v10.
bool bwd11_shape_ok(const ScanShape *s) {
    if (s->groups_c < 1 || s->groups_b < 1 || s->dim % s->groups_b) return false;
    const int64_t Dg = s->dim / s->groups_c, Db = s->dim / s->groups_b;
    return s->dstate == 16 && Dg == 16 && Db % 16 == 0 && s->dim % B11_CH == 0;
}
size_t bwd11_smem(const ScanShape *s) {
    const int64_t Db = s->dim / s->groups_b;
    // the largest of v11's, v12's and v13's (the segment model, which uses it, is the same for all)
    auto mx = [](const B11Geom &a, const B11Geom &b, const B11Geom &c) {
        const int m = a.bytes > b.bytes ? a.bytes : b.bytes;
        return (size_t)(m > c.bytes ? m : c.bytes);
    };
    return Db == 16   ? mx(b11_geom<16, 11>(), b11_geom<16, 12>(), b11_geom<16, 13>())
           : Db == 32 ? mx(b11_geom<32, 11>(), b11_geom<32, 12>(), b11_geom<32, 13>())
           : Db == 64 ? mx(b11_geom<64, 11>(), b11_geom<64, 12>(), b11_geom<64, 13>())
                      : mx(b11_geom<0, 11>(), b11_geom<0, 12>(), b11_geom<0, 13>());
}
// blocks per SM the shared memory allows (228 KB per SM, 1 KB reserved per block; registers allow 2)
int bwd11_blocks_per_sm(const ScanShape *s) { return bwd11_smem(s) + 1024 <= 114 * 1024 ? 2 : 1; }

// Backward time segments (v10). The backward kernel runs one block of 64 channels (32 for N = 32) per SM (its
// shared memory), so a shape with few (row, channel-block) pairs leaves SMs idle: 1 x 8192 at D 4096 has 64
// blocks for 132 SMs. Model: BWD_SLOTS blocks run at once (H100/H200: 132 SMs x 1); a segment of c chunks costs
// c + 1 chunk-times (the +1: its pipeline fill and carry); the pre-pass costs ~0.15 chunk-times per chunk
// (one exp per state and step, no outputs) per wave of 1024 threads per SM. The fewest segments with the least
// modelled time win. Fixed by the shape (not by the device), so results are the same bits on every GPU.
// DISTILL_SCAN_BWD selects the backward: v12 (default; shapes it does not take run v10), v11 (v12's kernel before
// its v12 changes), v13 (v12 without the per-chunk sweep, reading the forward's checkpoints every 8 steps, which the
// same setting makes the forward store; shapes v13 does not take run v10 on every 8th), v10, v8 (v10's kernel without
// segments), v9; DISTILL_SCAN_BWD_NSEG=n forces n segments
// (benchmarks).
constexpr int BWD_SLOTS = 132;
const char *bwd_version() {
    const char *e = getenv("DISTILL_SCAN_BWD");
    return e ? e : "v12";
}
// ver: 10 (v10's kernel) or 11 (v11's). v11 runs 2 blocks of 64 channels per SM and costs ~2.5x less per chunk, so
// the pre-pass weighs more (0.2 chunk-times per chunk per wave).
int bwd_nseg_for(const ScanShape *s, int ver) {
    const int64_t nck = n_ckpt(s);
    if (nck <= 1) return 1;
    if (ver == 8) return 1;
    if (const char *e = getenv("DISTILL_SCAN_BWD_NSEG")) {
        const int n = atoi(e);
        if (n >= 1) {
            const int64_t per = (nck + n - 1) / n;  // chunks per segment
            return (int)((nck + per - 1) / per);
        }
    }
    const bool v11 = ver >= 11 && bwd11_shape_ok(s);  // v11's kernel (v12 is the same kernel, restructured)
    const int64_t cpb = v11 ? B11_CH : s->dstate == 32 ? 32 : 64, cols = s->batch * ((s->dim + cpb - 1) / cpb);
    const int64_t slots = v11 ? (int64_t)BWD_SLOTS * bwd11_blocks_per_sm(s) : BWD_SLOTS;
    const double pre = v11 ? 0.2 : 0.08;
    double best = 1e300;
    int bestn = 1;
    for (int n = 1; n <= 64 && n <= nck; n++) {
        const int64_t per = (nck + n - 1) / n, ns = (nck + per - 1) / per;  // chunks per segment, segments
        if (ns != n) continue;                                              // same as a smaller n
        const int64_t waves = (cols * ns + slots - 1) / slots;
        double cost = (double)(waves * (per + 1));
        // pre-pass: (ns - 1) * per chunks of every column at ~0.08 chunk-times per wave (one MUFU-bound pass, 18
        // special-function ops per token-channel against ~1000 instructions in v10's kernel), + fold and launches
        if (ns > 1) cost += 0.5 + pre * (double)(cols * (ns - 1) * per) / slots;
        if (cost < best - 1e-9) best = cost, bestn = n;
    }
    return bestn;
}
int bwd_ver() {
    const char *v = bwd_version();
    return !strcmp(v, "v8") ? 8 : !strcmp(v, "v10") ? 10 : !strcmp(v, "v11") ? 11 : !strcmp(v, "v13") ? 13 : 12;
}
int bwd_nseg(const ScanShape *s) { return bwd_nseg_for(s, bwd_ver()); }
int ckpt_mul() { return bwd_ver() == 13 ? 8 : 1; }

// pre-pass pieces: 64 steps each, or more so that their partials stay under 64 MiB
void bwd_pieces(const ScanShape *s, int nseg, int64_t *piecelen, int64_t *npps) {
    const int64_t cps = (n_ckpt(s) + nseg - 1) / nseg;  // chunks per segment
    const double bytes = (double)(s->batch * s->dim * (nseg - 1) * cps) * (double)(s->dstate + 2) * 4.0;
    int64_t pcs = (int64_t)(bytes / (64.0 * 1024 * 1024)) + 1;
    if (pcs > cps) pcs = cps;
    *piecelen = pcs * SCAN_CKPT, *npps = (cps + pcs - 1) / pcs;
}
size_t bwd_piece_bytes(const ScanShape *s, int nseg) {
    if (nseg <= 1) return 0;
    int64_t pl, np;
    bwd_pieces(s, nseg, &pl, &np);
    return (size_t)(s->batch * (nseg - 1) * np * s->dim) * (size_t)(s->dstate + 2) * sizeof(float);
}

// 16-byte copies need 16-byte aligned rows and group spans
bool aligned16(const ScanShape *s, const void *const *ptrs, int n) {
    if (s->dim % 8 || s->dstate % 8) return false;
    for (int i = 0; i < n; i++)
        if (ptrs[i] && ((uintptr_t)ptrs[i] & 15)) return false;
    return true;
}

// ---- backward v9: one thread per channel ------------------------------------------------------------------
// Same structure as the forward: one thread per (batch row, channel) holds all 16 states, the adjoint dh and the
// dA sums in registers; no per-step shuffles of scalars. Per 64-step chunk (newest first): a sweep from the
// forward's fp32 checkpoint keeps the state before every 4-step group in shared memory (private to the thread);
// then each group, newest first, is recomputed into registers (states, y for dz, dC), and the adjoint runs
// back through its 4 steps (the decays are recomputed rather than kept: registers, not the MUFU, limit this).
// dC: a shuffle reduce-scatter over the 16 lanes of a C group (fixed order). dB: the same over the lanes of a
// B group (16, 32 or 64 channels; 64 adds the block's two warp sums in shared memory in warp order).
// Time segments for small batch: dh does not depend on the states (dh_{t-1} = a_t (dh_t + gy_t C_t)), so a
// cheap pre-pass computes each segment's local dh at its start from zero (and sum delta / any reset), and each
// segment starts from its later segments' combined dh. dA, dD, ddelta_bias: per-(segment, row) partials summed
// in order by reduce_rows_kernel. Deterministic: no atomics, fixed orders, nseg fixed by the shape.
constexpr int B1_THREADS = 64;               // channels per block
constexpr int B1_NG = SCAN_CKPT / 4;         // 4-step groups per chunk
struct Bwd1Args {
    int64_t B, L, D, Gc, Gb, Db, nck, seglen;
    int nseg;
    const bf16 *u, *dt, *Bm, *Cm, *z, *dout;
    const float *A, *Dskip, *delta_bias, *h0, *ckpt, *dh_last;
    const uint8_t *reset;
    bf16 *du, *ddt, *dB, *dC, *dz;
    float *dh0;
    float *dA_part, *dD_part, *ddb_part;  // [nseg * B, D, N], [nseg * B, D] x2 (row = seg * B + b)
    float *seg_dh, *seg_sd;               // [B, nseg, D, N], [B, nseg, D]: local dh at a segment's start, sum delta
    int *seg_rs;                          // [B, nseg, D]: 1 if the segment holds a reset
};

// Sums v[n] over the 16 lanes of a half-warp; lane l ends with the sum for n = l & 15 (15 shuffles, fixed order).
__device__ __forceinline__ float reduce_scatter16(const float (&v)[16], int lane) {
    float a8[8], a4[4], a2[2];
    const bool b8 = lane & 8, b4 = lane & 4, b2 = lane & 2, b1 = lane & 1;
#pragma unroll
    for (int m = 0; m < 8; m++) a8[m] = (b8 ? v[m + 8] : v[m]) + __shfl_xor_sync(FULL_MASK, b8 ? v[m] : v[m + 8], 8);
#pragma unroll
    for (int m = 0; m < 4; m++) a4[m] = (b4 ? a8[m + 4] : a8[m]) + __shfl_xor_sync(FULL_MASK, b4 ? a8[m] : a8[m + 4], 4);
#pragma unroll
    for (int m = 0; m < 2; m++) a2[m] = (b2 ? a4[m + 2] : a4[m]) + __shfl_xor_sync(FULL_MASK, b2 ? a4[m] : a4[m + 2], 2);
    return (b1 ? a2[1] : a2[0]) + __shfl_xor_sync(FULL_MASK, b1 ? a2[0] : a2[1], 1);
}

struct B1Step {
    float u, raw, delta, go, zz, rx;
};
__device__ __forceinline__ B1Step b1_load(const Bwd1Args &p, int64_t row, bool valid, float bias, bool full) {
    B1Step s;
    s.u = valid ? ldbf(p.u + row) : 0.f;
    s.raw = ldbf(p.dt + row) + bias;
    s.delta = valid ? softplus_dev(s.raw) : 0.f;
    s.rx = 0.f, s.go = 0.f, s.zz = 0.f;
    if (full) {
        s.go = valid ? ldbf(p.dout + row) : 0.f;
        if (p.z) s.zz = ldbf(p.z + row);
    }
    return s;
}

// PRE: local dh at the segment's start from zero (segments 1..nseg-1); no outputs
template <bool PRE, int DB>
__global__ void __launch_bounds__(B1_THREADS) scan_bwd1_kernel(const Bwd1Args p) {
    constexpr int N = 16, CPB = B1_THREADS;
    extern __shared__ __align__(16) float snap[];  // [B1_NG][N][CPB]; then red [2][4][2][N]
    float *red = snap + B1_NG * N * CPB;
    const int64_t L = p.L, D = p.D, ncb = D / CPB;
    int64_t bid = blockIdx.x;
    const int64_t cb = bid % ncb;
    bid /= ncb;
    const int64_t b = bid % p.B;
    const int seg = (int)(bid / p.B);
    if (PRE && seg == 0) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t d = cb * CPB + tid, gc = d / 16, gb = d / DB;
    const int64_t Gc = p.Gc, Gb = p.Gb;
    const int64_t tbs = (int64_t)seg * p.seglen, tes = tbs + p.seglen < L ? tbs + p.seglen : L;

    float A2[N], dh[N], dA_acc[N];
#pragma unroll
    for (int n = 0; n < N; n++) A2[n] = p.A[d * N + n] * SCAN_LOG2E, dh[n] = 0.f, dA_acc[n] = 0.f;
    const float Dd = p.Dskip[d], bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const bool hasz = p.z != nullptr;

    if (PRE) {
        float sd = 0.f;
        int anyrs = 0;
#pragma unroll 1
        for (int64_t t = tes - 1; t >= tbs; t--) {
            const int64_t row = (b * L + t) * D + d;
            const float delta = softplus_dev(ldbf(p.dt + row) + bias), go = ldbf(p.dout + row);
            const bool rs = p.reset && p.reset[b * L + t];
            const float rx = rs ? -INFINITY : 0.f;
            float gy = go;
            if (hasz) {
                const float zz = ldbf(p.z + row);
                gy = go * zz * sigmoid_dev(zz);
            }
            float Cv[N];
            load_vec<N>(p.Cm + ((b * L + t) * Gc + gc) * N, Cv);
#pragma unroll
            for (int n = 0; n < N; n++) dh[n] = ex2f(fmaf(delta, A2[n], rx)) * fmaf(gy, Cv[n], dh[n]);
            sd += delta, anyrs |= rs;
        }
        const int64_t i = (b * p.nseg + seg) * D + d;
#pragma unroll
        for (int n = 0; n < N; n++) p.seg_dh[i * N + n] = dh[n];
        p.seg_sd[i] = sd, p.seg_rs[i] = anyrs;
        return;
    }

    // incoming dh: dh_last carried back through the later segments, in order from the last
    if (p.dh_last) {
#pragma unroll
        for (int n = 0; n < N; n++) dh[n] = p.dh_last[(b * D + d) * N + n];
    }
    for (int s = p.nseg - 1; s > seg; s--) {
        const int64_t i = (b * p.nseg + s) * D + d;
        const bool rs = p.seg_rs[i] != 0;
        const float sd = p.seg_sd[i];
#pragma unroll
        for (int n = 0; n < N; n++) dh[n] = (rs ? 0.f : ex2f(A2[n] * sd)) * dh[n] + p.seg_dh[i * N + n];
    }
    float dD_acc = 0.f, ddb_acc = 0.f;
    float *mysnap = snap + tid;

#pragma unroll 1
    for (int64_t k = (tes - 1) / SCAN_CKPT; k >= tbs / SCAN_CKPT; k--) {
        const int64_t tb = k * SCAN_CKPT, te = tb + SCAN_CKPT < L ? tb + SCAN_CKPT : L;
        const int ng = (int)((te - tb + 3) / 4);
        float h[N];
        {
            const float4 *ck = reinterpret_cast<const float4 *>(p.ckpt + ((b * p.nck + k) * D + d) * N);
#pragma unroll
            for (int n = 0; n < N; n += 4) {
                const float4 v = ck[n / 4];
                h[n] = v.x, h[n + 1] = v.y, h[n + 2] = v.z, h[n + 3] = v.w;
            }
        }
        // sweep: the state before each group (the last group's steps are not needed)
#pragma unroll 1
        for (int g = 0; g < ng; g++) {
#pragma unroll
            for (int n = 0; n < N; n++) mysnap[(g * N + n) * CPB] = h[n];
            if (g == ng - 1) break;
#pragma unroll
            for (int j = 0; j < 4; j++) {  // whole groups: only the last group can be partial
                const int64_t t = tb + 4 * g + j, row = (b * L + t) * D + d;
                const B1Step s = b1_load(p, row, true, bias, false);
                const float rx = (p.reset && p.reset[b * L + t]) ? -INFINITY : 0.f;
                float Bv[N];
                load_vec<N>(p.Bm + ((b * L + t) * Gb + gb) * N, Bv);
                const float du = s.delta * s.u;
#pragma unroll
                for (int n = 0; n < N; n++) h[n] = ex2f(fmaf(s.delta, A2[n], rx)) * h[n] + du * Bv[n];
            }
        }
        // groups newest first
#pragma unroll 1
        for (int g = ng - 1; g >= 0; g--) {
            const int64_t t0 = tb + 4 * g;
            B1Step st[4];
            float hj[4][N], gyj[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int64_t t = t0 + j;
                const bool valid = t < te;
                const int64_t tt = valid ? t : te - 1, row = (b * L + tt) * D + d;
                st[j] = b1_load(p, row, valid, bias, true);
                st[j].rx = (valid && p.reset && p.reset[b * L + tt]) ? -INFINITY : 0.f;
                float Bv[N], Cv[N], y0 = 0.f, y1 = 0.f;
                load_vec<N>(p.Bm + ((b * L + tt) * Gb + gb) * N, Bv);
                load_vec<N>(p.Cm + ((b * L + tt) * Gc + gc) * N, Cv);
                const float du = st[j].delta * st[j].u;
#pragma unroll
                for (int n = 0; n < N; n++) {
                    const float prev = j ? hj[j - 1][n] : mysnap[(g * N + n) * CPB];
                    hj[j][n] = ex2f(fmaf(st[j].delta, A2[n], st[j].rx)) * prev + du * Bv[n];
                    if (n & 1) y1 += Cv[n] * hj[j][n];
                    else y0 += Cv[n] * hj[j][n];
                }
                const float y = y0 + y1 + Dd * st[j].u, go = st[j].go, zz = st[j].zz;
                float gy = go;
                if (hasz) {
                    const float sg = sigmoid_dev(zz);
                    gy = go * zz * sg;
                    if (valid) stbf(p.dz + row, go * y * sg * (1.f + zz * (1.f - sg)));
                }
                gyj[j] = gy;
                // dC[t, gc, n] = sum over the group's 16 channels of gy * h_t[n]
                float cC[N];
#pragma unroll
                for (int n = 0; n < N; n++) cC[n] = gy * hj[j][n];
                const float sc = reduce_scatter16(cC, lane);
                if (valid) {  // each lane holds one state's sum of its half-warp (its C group): lane l writes state l & 15
                    stbf(p.dC + ((b * L + t) * Gc + gc) * N + (lane & 15), sc);
                }
            }
            // adjoint, newest step first
#pragma unroll
            for (int j = 3; j >= 0; j--) {
                const int64_t t = t0 + j;
                const bool valid = t < te;
                const int64_t tt = valid ? t : te - 1, row = (b * L + tt) * D + d;
                float Bv[N], Cv[N], cB[N], sA = 0.f, sBg = 0.f;
                load_vec<N>(p.Bm + ((b * L + tt) * Gb + gb) * N, Bv);
                load_vec<N>(p.Cm + ((b * L + tt) * Gc + gc) * N, Cv);
                const float delta = st[j].delta, du = delta * st[j].u, gy = gyj[j];
#pragma unroll
                for (int n = 0; n < N; n++) {
                    const float prev = j ? hj[j - 1][n] : mysnap[(g * N + n) * CPB];
                    const float gr = fmaf(gy, Cv[n], dh[n]);  // dL/dh_t
                    const float ga = gr * ex2f(fmaf(delta, A2[n], st[j].rx));  // dL/dh_{t-1}
                    const float gah = ga * prev;
                    sA = fmaf(gah, A2[n], sA);
                    dA_acc[n] = fmaf(gah, delta, dA_acc[n]);
                    sBg = fmaf(gr, Bv[n], sBg);
                    dh[n] = ga;
                    cB[n] = gr * du;
                }
                const float ddelta = fmaf(st[j].u, sBg, sA * SCAN_LN2);
                if (valid) {
                    const float dtt = ddelta * dsoftplus_dev(st[j].raw);
                    ddb_acc += dtt;
                    dD_acc += gy * st[j].u;
                    stbf(p.du + row, fmaf(gy, Dd, delta * sBg));
                    stbf(p.ddt + row, dtt);
                }
                float sb = reduce_scatter16(cB, lane);
                if constexpr (DB >= 32) sb += __shfl_xor_sync(FULL_MASK, sb, 16);
                if constexpr (DB <= 32) {
                    if (valid && (DB == 16 || lane < 16)) stbf(p.dB + ((b * L + t) * Gb + gb) * N + (lane & 15), sb);
                } else {
                    if (lane < 16) red[(((g & 1) * 4 + j) * 2 + warp) * N + lane] = sb;
                }
            }
            if constexpr (DB == 64) {
                // the block's two warps form one B group: add their sums in warp order
                __syncthreads();
                const int j = tid >> 4, n = tid & 15;
                const float *rr = red + (((g & 1) * 4 + j) * 2) * N + n;
                if (t0 + j < te) stbf(p.dB + ((b * L + t0 + j) * Gb + gb) * N + n, rr[0] + rr[N]);
            }
        }
    }
    const int64_t prow = (int64_t)seg * p.B + b;
#pragma unroll
    for (int n = 0; n < N; n++) {
        p.dA_part[(prow * D + d) * N + n] = dA_acc[n];
        if (seg == 0 && p.h0 && p.dh0) p.dh0[(b * D + d) * N + n] = dh[n];
    }
    p.dD_part[prow * D + d] = dD_acc, p.ddb_part[prow * D + d] = ddb_acc;
}

size_t bwd1_smem_bytes() { return (size_t)(B1_NG * 16 * B1_THREADS + 2 * 4 * 2 * 16) * sizeof(float); }

// v9 path: N = 16, C groups of 16 channels, B groups of 16, 32 or 64 channels, D a multiple of 64, aligned rows.
// Opt-in (DISTILL_SCAN_BWD=v9): correct and deterministic on the GPU tests, but 2.8x slower than v8 at 8x2048
// (H100: 9.98 vs 3.58 ms; docs/KERNELS.md says why), so v8 stays the default.
bool bwd1_eligible(const ScanShape *s, bool al16) {
    const char *e = getenv("DISTILL_SCAN_BWD");
    if (!e || strcmp(e, "v9") != 0) return false;
    const int64_t Dg = s->dim / s->groups_c, Db = s->dim / s->groups_b;
    return al16 && s->dstate == 16 && Dg == 16 && (Db == 16 || Db == 32 || Db == 64) && s->dim % B1_THREADS == 0;
}
int bwd1_nseg(const ScanShape *s) { return choose_nseg(s, 0); }

// Sets kern's dynamic shared memory (per device and cheap: set on every call rather than cached), then launches it
// over `blocks` blocks; -1 when the attribute is refused.
template <typename K, typename... Args>
int launch_smem(K kern, int64_t blocks, int threads, size_t smem, cudaStream_t st, const Args &...args) {
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) return -1;
    kern<<<(unsigned)blocks, threads, smem, st>>>(args...);
    return 0;
}

template <int DB>
int launch_bwd1(const Bwd1Args &a, cudaStream_t st) {
    const size_t smem = bwd1_smem_bytes();
    const int64_t blocks = (int64_t)a.nseg * a.B * (a.D / B1_THREADS);
    if (a.nseg > 1) scan_bwd1_kernel<true, DB><<<(unsigned)blocks, B1_THREADS, 0, st>>>(a);
    return launch_smem(scan_bwd1_kernel<false, DB>, blocks, B1_THREADS, smem, st, a);
}

// forward version: v14 (v11's tiles with a branch-free unrolled body and staged outputs; aligned rows, N = 8 or 16, 64-step
// checkpoints), the default since the H100 run of ba17932 (faster at all 9 benchmarked shapes); otherwise, and with
// DISTILL_SCAN_FWD=v11, v11 (32-step tiles, 2 in flight, fast loader; aligned rows, N <= 16), the default before; with
// DISTILL_SCAN_FWD=v10 or what neither takes, v10 (16-step tiles, 3 in flight). Read at every call.
int fwd_ver() {
    const char *e = getenv("DISTILL_SCAN_FWD");
    return !e ? 14 : !strcmp(e, "v10") ? 10 : !strcmp(e, "v11") ? 11 : 14;
}

template <int N>
int launch_fwd14(const FwdArgs &a, cudaStream_t st) {
    constexpr int CPB = FWD1_THREADS;
    const TileGeom g = make_geom(F14_T, CPB, 3, (int)(span_groups(CPB, a.Db) * N), (int)(span_groups(CPB, a.Dg) * N));
    const size_t smem = f14_smem<N>(g);
    const int64_t blocks = (int64_t)a.nseg * a.B * ((a.D + CPB - 1) / CPB);
    auto go = [&](auto kern) { return launch_smem(kern, blocks, FWD2_THREADS, smem, st, a, g); };
    int rc = 0;
    if (a.nseg > 1) rc |= go(scan_fwd14_kernel<N, true, false>);
    rc |= a.z ? go(scan_fwd14_kernel<N, false, true>) : go(scan_fwd14_kernel<N, false, false>);
    return rc;
}

template <int N, int FT, int FNST, bool FAST>
int launch_fwd_t(const FwdArgs &a, bool al16, cudaStream_t st) {
    constexpr int CPB = FWD1_THREADS;
    const TileGeom g = make_geom(FT, CPB, 3, (int)(span_groups(CPB, a.Db) * N), (int)(span_groups(CPB, a.Dg) * N));
    const size_t smem = (size_t)FNST * g.bytes + (size_t)FT * (g.pB + g.pC + (FAST ? 1 : 0)) * sizeof(float);
    const int64_t blocks = (int64_t)a.nseg * a.B * ((a.D + CPB - 1) / CPB);
    auto go = [&](auto kern) { return launch_smem(kern, blocks, FWD2_THREADS, smem, st, a, g); };
    int rc = 0;
    if constexpr (FAST) {
        if (a.nseg > 1) rc |= go(scan_fwd2_kernel<N, true, true, FT, FNST, true>);
        rc |= go(scan_fwd2_kernel<N, false, true, FT, FNST, true>);
    } else {
        if (a.nseg > 1)
            rc |= al16 ? go(scan_fwd2_kernel<N, true, true, FT, FNST, false>) : go(scan_fwd2_kernel<N, true, false, FT, FNST, false>);
        rc |= al16 ? go(scan_fwd2_kernel<N, false, true, FT, FNST, false>) : go(scan_fwd2_kernel<N, false, false, FT, FNST, false>);
    }
    return rc;
}
template <int N>
int launch_fwd(const FwdArgs &a, bool al16, cudaStream_t st) {
    const int ver = fwd_ver();
    if constexpr (N == 8 || N == 16)  // v13's 8-step checkpoints: v11 (v14's own stores ran slower)
        if (al16 && ver == 14 && !(a.ck8 && a.ckpt)) return launch_fwd14<N>(a, st);
    if constexpr (N <= 16)  // N = 32 spills at 32-step tiles
        if (al16 && ver != 10) return launch_fwd_t<N, 32, 2, true>(a, al16, st);
    return launch_fwd_t<N, FT0, FNST0, false>(a, al16, st);
}

// v11: the segment pre-pass (shared with v10) when nseg > 1, then the main kernel
template <int DB, int V>
int launch_bwd11_db(const BwdArgs &a, cudaStream_t st) {
    const B11Geom g = b11_geom<DB, V>();
    const int64_t blocks = (int64_t)a.nseg * a.B * (a.D / B11_CH);
    return launch_smem(scan_bwd11_kernel<DB, V>, blocks, B11_THREADS, (size_t)g.bytes, st, a, g);
}
template <int DB>
int launch_bwd11_v(const BwdArgs &a, int ver, cudaStream_t st) {
    return ver == 13   ? launch_bwd11_db<DB, 13>(a, st)
           : ver == 12 ? launch_bwd11_db<DB, 12>(a, st)
                       : launch_bwd11_db<DB, 11>(a, st);
}
int launch_bwd11(const BwdArgs &a, int ver, cudaStream_t st) {
    if (a.nseg > 1) {
        const int64_t fb = (int64_t)(a.nseg - 1) * a.B * ((a.D + 127) / 128);
        scan_bwd_piece_prepass<16, true><<<(unsigned)(fb * a.npps), 128, 0, st>>>(a);
        scan_bwd_seg_fold<16><<<(unsigned)fb, 128, 0, st>>>(a);
    }
    if (a.Db == 16) return launch_bwd11_v<16>(a, ver, st);
    if (a.Db == 32) return launch_bwd11_v<32>(a, ver, st);
    if (a.Db == 64) return launch_bwd11_v<64>(a, ver, st);
    return launch_bwd11_v<0>(a, ver, st);  // per-warp dB partials to dB_part, summed by reduce_dB_kernel
}

template <int N, int THREADS>
int launch_bwd(const BwdArgs &a, bool al16, cudaStream_t st) {
    constexpr int CPB0 = THREADS / QL;
    const bool wred = N == 16 && a.Dg % 8 == 0 && CPB0 % a.Db == 0 && a.Db % 8 == 0;
    constexpr int CPB = THREADS / QL;
    const TileGeom g = make_geom(SCAN_CKPT, CPB, 4, (int)(span_groups(CPB, a.Db) * N), (int)(span_groups(CPB, a.Dg) * N));
    const size_t smem = bwd_smem_bytes<N, THREADS>(g);
    const int64_t blocks = (int64_t)a.nseg * a.B * ((a.D + CPB - 1) / CPB);
    if (a.nseg > 1) {
        const int64_t fb = (int64_t)(a.nseg - 1) * a.B * ((a.D + 127) / 128);
        if (al16) scan_bwd_piece_prepass<N, true><<<(unsigned)(fb * a.npps), 128, 0, st>>>(a);
        else scan_bwd_piece_prepass<N, false><<<(unsigned)(fb * a.npps), 128, 0, st>>>(a);
        scan_bwd_seg_fold<N><<<(unsigned)fb, 128, 0, st>>>(a);
    }
    auto go = [&](auto kern) { return launch_smem(kern, blocks, THREADS, smem, st, a, g); };
    if constexpr (N == 16)
        if (wred) return al16 ? go(scan_bwd_kernel<N, THREADS, true, true>) : go(scan_bwd_kernel<N, THREADS, false, true>);
    return al16 ? go(scan_bwd_kernel<N, THREADS, true, false>) : go(scan_bwd_kernel<N, THREADS, false, false>);
}

}  // namespace

extern "C" size_t selective_scan_ckpt_elems(const ScanShape *s) {
    return (size_t)(s->batch * n_ckpt_rows(s) * s->dim * s->dstate);
}

extern "C" size_t selective_scan_fwd_workspace(const ScanShape *s, int nseg) {
    nseg = choose_nseg(s, nseg);
    if (nseg <= 1) return 0;
    const size_t per = (size_t)(s->batch * nseg * s->dim);
    return per * (size_t)s->dstate * sizeof(float) + per * sizeof(float) + per * sizeof(int);
}

extern "C" size_t selective_scan_bwd_workspace(const ScanShape *s) {
    const int64_t cpb = s->dstate == 32 ? 32 : 64, Db = s->dim / (s->groups_b > 0 ? s->groups_b : 1);
    // v8/v10/v11: per-(segment, row) partials of dA, dD, ddelta_bias; the segments' local dh, sum delta, reset flag;
    // the per-C-group dB partials [B*L, Gc, N] fp32 when a B group does not fit a block (64 % Db != 0 at N = 16: v10,
    // and v11's generic mode, whose per-warp partials are per-C-group partials since its C groups are 16 channels);
    // the pre-pass pieces. Sized for the larger of v10's and v11's segment counts, so that DISTILL_SCAN_BWD may
    // change between calls.
    size_t best = 0;
    for (int ver : {10, 11}) {
        const int nseg = bwd_nseg_for(s, ver);
        const size_t rows = (size_t)nseg * (size_t)(s->batch * s->dim);
        size_t bytes = rows * (size_t)(2 * s->dstate + 3) * sizeof(float) + rows * sizeof(int);
        if (Db <= 0 || cpb % Db) bytes += (size_t)(s->batch * s->seqlen * s->groups_c * s->dstate) * sizeof(float);
        bytes += bwd_piece_bytes(s, nseg);
        best = bytes > best ? bytes : best;
    }
    // v9: per-(segment, row) partials and the segments' local dh, sum delta, reset flag
    const size_t seg = (size_t)bwd1_nseg(s) * (size_t)(s->batch * s->dim);
    const size_t v9 = seg * (size_t)(2 * s->dstate + 3) * sizeof(float) + seg * sizeof(int);
    return best > v9 ? best : v9;
}

extern "C" int selective_scan_fwd_cuda(const ScanShape *s, const uint16_t *u, const uint16_t *dt, const float *A,
                                       const uint16_t *Bm, const uint16_t *Cm, const float *Dskip, const uint16_t *z,
                                       const float *delta_bias, const uint8_t *reset, const float *h0, uint16_t *out,
                                       float *h_last, float *ckpt, int nseg, void *workspace, scan_stream_t stream,
                                       char *err, size_t errlen) {
    if (check_shape(s, 0, err, errlen)) return -1;
    if (s->seqlen == 0) {  // no steps: the final state is the initial one
        if (h_last) {
            const size_t bytes = (size_t)(s->batch * s->dim * s->dstate) * sizeof(float);
            cudaError_t e = h0 ? cudaMemcpyAsync(h_last, h0, bytes, cudaMemcpyDeviceToDevice, (cudaStream_t)stream)
                               : cudaMemsetAsync(h_last, 0, bytes, (cudaStream_t)stream);
            if (e != cudaSuccess) return scan_fail(err, errlen, "selective scan: %s", cudaGetErrorString(e));
        }
        return 0;
    }
    FwdArgs a = {};
    a.B = s->batch, a.L = s->seqlen, a.D = s->dim, a.Gc = s->groups_c, a.Gb = s->groups_b;
    a.Dg = s->dim / s->groups_c, a.Db = s->dim / s->groups_b;
    a.u = (const bf16 *)u, a.dt = (const bf16 *)dt, a.Bm = (const bf16 *)Bm, a.Cm = (const bf16 *)Cm;
    a.z = (const bf16 *)z, a.A = A, a.Dskip = Dskip, a.delta_bias = delta_bias, a.h0 = h0, a.reset = reset;
    a.out = (bf16 *)out, a.h_last = h_last, a.ckpt = ckpt;
    a.nseg = choose_nseg(s, nseg);
    a.seglen = seg_len(s, a.nseg);
    a.nseg = (int)((s->seqlen + a.seglen - 1) / a.seglen);
    a.nck = n_ckpt_rows(s);
    a.ck8 = ckpt_mul() == 8;
    if (a.nseg > 1) {
        if (!workspace) return scan_fail(err, errlen, "selective scan forward: %d segments need a workspace", a.nseg);
        const size_t per = (size_t)(a.B * a.nseg * a.D);
        a.seg_h = (float *)workspace;
        a.seg_sd = a.seg_h + per * s->dstate;
        a.seg_rs = (int *)(a.seg_sd + per);
    }
    cudaStream_t st = (cudaStream_t)stream;
    const void *ptrs[] = {u, dt, z, Bm, Cm};
    const bool al16 = aligned16(s, ptrs, 5);
    int rc = 0;
    switch (s->dstate) {
        case 4: rc = launch_fwd<4>(a, al16, st); break;
        case 8: rc = launch_fwd<8>(a, al16, st); break;
        case 16: rc = launch_fwd<16>(a, al16, st); break;
        case 32: rc = launch_fwd<32>(a, al16, st); break;
    }
    if (rc) return scan_fail(err, errlen, "selective scan forward: shared-memory request refused");
    return scan_launch_check(err, errlen, "selective scan forward");
}

extern "C" int selective_scan_bwd_cuda(const ScanShape *s, const uint16_t *u, const uint16_t *dt, const float *A,
                                       const uint16_t *Bm, const uint16_t *Cm, const float *Dskip, const uint16_t *z,
                                       const float *delta_bias, const uint8_t *reset, const float *h0,
                                       const float *ckpt, const uint16_t *dout, const float *dh_last, uint16_t *du,
                                       uint16_t *ddt, float *dA, uint16_t *dB, uint16_t *dC, float *dD, uint16_t *dz,
                                       float *ddelta_bias, float *dh0, void *workspace, scan_stream_t stream,
                                       char *err, size_t errlen) {
    if (check_shape(s, 1, err, errlen)) return -1;
    if (!workspace) return scan_fail(err, errlen, "selective scan backward: workspace required");
    if (!ckpt && s->seqlen > 0) return scan_fail(err, errlen, "selective scan backward: forward checkpoints required");
    cudaStream_t st = (cudaStream_t)stream;
    BwdArgs a = {};
    a.B = s->batch, a.L = s->seqlen, a.D = s->dim, a.Gc = s->groups_c, a.Gb = s->groups_b;
    a.Dg = s->dim / s->groups_c, a.Db = s->dim / s->groups_b, a.nck = n_ckpt_rows(s), a.ckmul = ckpt_mul();
    a.u = (const bf16 *)u, a.dt = (const bf16 *)dt, a.Bm = (const bf16 *)Bm, a.Cm = (const bf16 *)Cm;
    a.z = (const bf16 *)z, a.dout = (const bf16 *)dout;
    a.A = A, a.Dskip = Dskip, a.delta_bias = delta_bias, a.h0 = h0, a.ckpt = ckpt, a.dh_last = dh_last;
    a.reset = reset;
    a.du = (bf16 *)du, a.ddt = (bf16 *)ddt, a.dB = (bf16 *)dB, a.dC = (bf16 *)dC, a.dz = (bf16 *)dz, a.dh0 = dh0;
    const int64_t BD = s->batch * s->dim;
    a.nseg = bwd_nseg(s);
    a.seglen = (n_ckpt(s) + a.nseg - 1) / a.nseg * SCAN_CKPT;
    const int64_t RD = a.nseg * BD;  // partial rows: (segment, batch row)
    a.dA_part = (float *)workspace;
    a.dD_part = a.dA_part + RD * s->dstate;
    a.ddb_part = a.dD_part + RD;
    a.seg_dh = a.ddb_part + RD;
    a.seg_sd = a.seg_dh + RD * s->dstate;
    a.seg_rs = (int *)(a.seg_sd + RD);
    const int cpb = s->dstate == 32 ? 32 : 64;
    const bool fastB = cpb % a.Db == 0;
    a.dB_part = fastB ? NULL : (float *)(a.seg_rs + RD);
    if (a.nseg > 1) {
        bwd_pieces(s, a.nseg, &a.piecelen, &a.npps);
        const int64_t PD = s->batch * (a.nseg - 1) * a.npps * s->dim;
        a.piece_dh = (float *)(a.seg_rs + RD) + (fastB ? 0 : s->batch * s->seqlen * s->groups_c * s->dstate);
        a.piece_sd = a.piece_dh + PD * s->dstate;
        a.piece_rs = (int *)(a.piece_sd + PD);
    }
    if (s->seqlen == 0) {  // gradients of an empty sequence: dh0 = dh_last, the rest zero
        cudaMemsetAsync(dA, 0, (size_t)(s->dim * s->dstate) * sizeof(float), st);
        cudaMemsetAsync(dD, 0, (size_t)s->dim * sizeof(float), st);
        if (ddelta_bias) cudaMemsetAsync(ddelta_bias, 0, (size_t)s->dim * sizeof(float), st);
        if (h0 && dh0) {
            const size_t bytes = (size_t)(BD * s->dstate) * sizeof(float);
            if (dh_last) cudaMemcpyAsync(dh0, dh_last, bytes, cudaMemcpyDeviceToDevice, st);
            else cudaMemsetAsync(dh0, 0, bytes, st);
        }
        return scan_launch_check(err, errlen, "selective scan backward");
    }
    const void *ptrs[] = {u, dt, z, Bm, Cm, dout};
    const bool al16 = aligned16(s, ptrs, 6);
    int rc = 0;
    if (bwd1_eligible(s, al16)) {
        Bwd1Args b1 = {};
        b1.B = a.B, b1.L = a.L, b1.D = a.D, b1.Gc = a.Gc, b1.Gb = a.Gb, b1.Db = a.Db, b1.nck = a.nck;
        b1.nseg = bwd1_nseg(s);
        b1.seglen = seg_len(s, b1.nseg);
        b1.nseg = (int)((s->seqlen + b1.seglen - 1) / b1.seglen);
        b1.u = a.u, b1.dt = a.dt, b1.Bm = a.Bm, b1.Cm = a.Cm, b1.z = a.z, b1.dout = a.dout;
        b1.A = A, b1.Dskip = Dskip, b1.delta_bias = delta_bias, b1.h0 = h0, b1.ckpt = ckpt, b1.dh_last = dh_last;
        b1.reset = reset;
        b1.du = a.du, b1.ddt = a.ddt, b1.dB = a.dB, b1.dC = a.dC, b1.dz = a.dz, b1.dh0 = dh0;
        const int64_t rows = (int64_t)b1.nseg * s->batch, RD = rows * s->dim;
        b1.dA_part = (float *)workspace;
        b1.dD_part = b1.dA_part + RD * s->dstate;
        b1.ddb_part = b1.dD_part + RD;
        b1.seg_dh = b1.ddb_part + RD;
        b1.seg_sd = b1.seg_dh + RD * s->dstate;
        b1.seg_rs = (int *)(b1.seg_sd + RD);
        rc = a.Db == 16 ? launch_bwd1<16>(b1, st) : a.Db == 32 ? launch_bwd1<32>(b1, st) : launch_bwd1<64>(b1, st);
        if (rc) return scan_fail(err, errlen, "selective scan backward: cannot raise the shared-memory limit");
        if (scan_launch_check(err, errlen, "selective scan backward (v9)")) return -1;
        const int64_t DN = s->dim * s->dstate;
        reduce_rows_kernel<<<(unsigned)((DN + 255) / 256), 256, 0, st>>>(b1.dA_part, rows, DN, dA);
        reduce_rows_kernel<<<(unsigned)((s->dim + 255) / 256), 256, 0, st>>>(b1.dD_part, rows, s->dim, dD);
        if (ddelta_bias)
            reduce_rows_kernel<<<(unsigned)((s->dim + 255) / 256), 256, 0, st>>>(b1.ddb_part, rows, s->dim, ddelta_bias);
        return scan_launch_check(err, errlen, "selective scan backward reductions");
    }
    // v11's generic dB mode stores 16-byte rows of dB_part (aligned whenever the workspace is)
    if (bwd_ver() >= 11 && al16 && bwd11_shape_ok(s) && (fastB || ((uintptr_t)a.dB_part & 15) == 0)) {
        rc = launch_bwd11(a, bwd_ver(), st);
    } else {
        switch (s->dstate) {
            case 4: rc = launch_bwd<4, 256>(a, al16, st); break;
            case 8: rc = launch_bwd<8, 256>(a, al16, st); break;
            case 16: rc = launch_bwd<16, 256>(a, al16, st); break;
            case 32: rc = launch_bwd<32, 128>(a, al16, st); break;
        }
    }
    if (rc) return scan_fail(err, errlen, "selective scan backward: cannot raise the shared-memory limit");
    if (scan_launch_check(err, errlen, "selective scan backward")) return -1;
    const int64_t DN = s->dim * s->dstate;
    const int64_t prows = (int64_t)a.nseg * s->batch;
    reduce_rows_kernel<<<(unsigned)((DN + 255) / 256), 256, 0, st>>>(a.dA_part, prows, DN, dA);
    reduce_rows_kernel<<<(unsigned)((s->dim + 255) / 256), 256, 0, st>>>(a.dD_part, prows, s->dim, dD);
    if (ddelta_bias)
        reduce_rows_kernel<<<(unsigned)((s->dim + 255) / 256), 256, 0, st>>>(a.ddb_part, prows, s->dim, ddelta_bias);
    if (!fastB) {
        const int64_t n = s->batch * s->seqlen * s->groups_b * s->dstate;
        reduce_dB_kernel<<<(unsigned)((n + 255) / 256), 256, 0, st>>>(a.dB_part, s->batch * s->seqlen, s->groups_b,
                                                                      s->groups_c / s->groups_b, s->dstate, a.dB);
    }
    return scan_launch_check(err, errlen, "selective scan backward reductions");
}

extern "C" int selective_scan_multi_layers_cuda(const ScanShape *s, const ScanLayers *ls, const uint16_t *u,
                                                const uint16_t *dt, const float *A, const uint16_t *Bm,
                                                const uint16_t *Cm, const float *Dskip, const uint16_t *z,
                                                const float *delta_bias, const float *h_in, const int32_t *keep,
                                                uint16_t *out, float *h_keep, float *h_end, scan_stream_t stream,
                                                char *err, size_t errlen) {
    if (check_shape(s, 0, err, errlen)) return -1;
    MultiArgs a = {};
    if (ls) a.ls = *ls;
    if (a.ls.layers < 1) a.ls.layers = 1;
    if (a.ls.layers > 65535 || (a.ls.layers > 1 && (out || z || h_end || !h_keep)))
        return scan_fail(err, errlen, "selective scan multi-token step: %lld layers (at most 65535; several layers "
                         "give only h_keep: no out, z or h_end)", (long long)a.ls.layers);
    a.B = s->batch, a.K = s->seqlen, a.D = s->dim, a.Gc = s->groups_c, a.Gb = s->groups_b;
    a.Dg = s->dim / s->groups_c, a.Db = s->dim / s->groups_b;
    a.u = (const bf16 *)u, a.dt = (const bf16 *)dt, a.Bm = (const bf16 *)Bm, a.Cm = (const bf16 *)Cm;
    a.z = (const bf16 *)z, a.A = A, a.Dskip = Dskip, a.delta_bias = delta_bias, a.h_in = h_in, a.keep = keep;
    a.out = (bf16 *)out, a.h_keep = h_keep, a.h_end = h_end;
    const dim3 blocks((unsigned)(s->batch * ((s->dim + 31) / 32)), (unsigned)a.ls.layers);
    cudaStream_t st = (cudaStream_t)stream;
    switch (s->dstate) {
        case 4: scan_multi_kernel<4><<<blocks, FWD_THREADS, 0, st>>>(a); break;
        case 8: scan_multi_kernel<8><<<blocks, FWD_THREADS, 0, st>>>(a); break;
        case 16: scan_multi_kernel<16><<<blocks, FWD_THREADS, 0, st>>>(a); break;
        case 32: scan_multi_kernel<32><<<blocks, FWD_THREADS, 0, st>>>(a); break;
    }
    return scan_launch_check(err, errlen, "selective scan multi-token step");
}

extern "C" int selective_scan_multi_cuda(const ScanShape *s, const uint16_t *u, const uint16_t *dt, const float *A,
                                         const uint16_t *Bm, const uint16_t *Cm, const float *Dskip,
                                         const uint16_t *z, const float *delta_bias, const float *h_in,
                                         const int32_t *keep, uint16_t *out, float *h_keep, float *h_end,
                                         scan_stream_t stream, char *err, size_t errlen) {
    return selective_scan_multi_layers_cuda(s, NULL, u, dt, A, Bm, Cm, Dskip, z, delta_bias, h_in, keep, out, h_keep,
                                            h_end, stream, err, errlen);
}
