// sample_cuda.cu: token sampling on the GPU (decode_cuda.h, "sampling on the device"). One block per row, which
// reads its V logits from global memory and never writes them. What is drawn:
//   greedy: the argmax, lowest id on ties (NaN counts as -inf);
//   top-k: keep the keys >= the k-th largest key (ties at it all kept);
//   top-p: the nucleus, most likely first and ties by lower id: the exact logit tau where the cumulative mass
//     reaches top_p, and the number c of tokens equal to tau (lowest ids first) still needed;
//   the draw: u * total placed among the members' masses in id order.
// Probabilities are 2^40-scaled integers exp((x - max) / T) * 2^40, so every sum is exact and the result does not
// depend on the thread count, the traversal order or the order of atomic updates. The draw is a counter-based
// hash of (seed, stream, counter).
//
// How (the first version, until 0f35392, made 4 + 4 radix passes over every row with 64-bit shared atomics that all
// hit the same few bins: the general path below is that algorithm with per-warp histograms; the fast path gives the
// same ids bit for bit, which gpu_test_decode_inv checks against the general path, sample_rows_cuda_reference, and
// which the generate stage's output showed against the first version, docs/BENCHMARKS.md):
//   A. argmax (the maximum m for the softmax);
//   B. every token's weight once: the total mass, and per warp a mass histogram over z = (x - m) / T in steps of
//      1/4 (a monotone function of the logit, so the bins are ranges of keys, ordered like radix bins). Each warp
//      owns a contiguous range of ids, so its histogram is also the mass of its range by bin. Tokens with
//      z < -28 weigh 0 (e^-28 * 2^40 < 1) and cost no exp;
//   C. (top-p) the bin where the cumulative mass reaches the target holds tau: its tokens are copied to shared
//      memory (at most CAND_CAP of them; about 500 of 49152 N(0, 2^2) logits at T 0.7) and tau, c come from a
//      radix select over them there; the member mass of each warp's id range is then its histogram above that
//      bin plus its copied tokens above tau plus its share of the c ties (without top-p: its whole histogram),
//      so the draw only walks the one warp range (V / 16 ids) where u * total falls.
// Passes over the row: 3 (A, B, C) plus 1/16 of one, instead of 8 plus the atomics' serialization.
// Rows this does not fit (a boundary bin past CAND_CAP tokens, e.g. all logits equal; an infinite logit or
// 1/T; V >= 2^24, where 64-bit sums could wrap) take the general path: radix select over the whole row, with
// per-warp histograms, run-length merged atomic updates and a parallel bin search, and the draw over the whole row.
#include <cuda_runtime.h>
#include <math.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>

#include "kernels/engine/decode_cuda.h"
#include "kernels/train/train_check.cuh"

#define SAMPLE_THREADS 512
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SAMPLE_UNROLL 8        // loads in flight per thread in a pass over the row
#define COARSE_BINS 128        // pass B's histogram: z in steps of 1/4 down to -31.75 (coarse_bin)
#define CAND_CAP 2048          // tokens of the nucleus boundary's coarse bin kept in shared memory
#define ZERO_WEIGHT_Z (-28.0f) // below it exp(z) * 2^40 < 0.77 (expf is within 2 ulp): weight 0
#define FULL_MASK 0xffffffffu

__host__ __device__ static inline uint64_t mix64(uint64_t z) {  // splitmix64's finalizer: a bijection
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Counter-based: the draw of (seed, stream, counter) needs no state, so it does not depend on batching.
__host__ __device__ static inline double uniform3(uint64_t seed, uint64_t stream, uint64_t counter) {
    uint64_t h = mix64(seed ^ 0x243F6A8885A308D3ull);
    h = mix64(h ^ stream);
    h = mix64(h ^ counter);
    return (double)(h >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

extern "C" double decode_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
    return uniform3(seed, stream, counter);
}

__device__ static inline float clean(float v) { return isnan(v) ? -INFINITY : v; }
// Order-preserving map float -> uint32 (larger float, larger key).
__device__ static inline uint32_t okey(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ static inline float okey_inv(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ static inline float zval(float v, float m, float inv_t) { return (v - m) * inv_t; }
// The integer weight exp(z) * 2^40 (z <= 0, so <= 2^40). The float product is exact (a power of two only moves
// the exponent; no overflow for e <= 1), so the truncation equals the reference's double one (NaN -> 0 in both).
__device__ static inline uint64_t weight_z(float z) { return (uint64_t)(expf(z) * 1099511627776.0f); }
__device__ static inline uint64_t weight(float v, float m, float inv_t) { return weight_z(zval(v, m, inv_t)); }
// Pass B's bin of z: monotone (larger z, larger bin, like a radix bin of the key). Bin 127 holds z in (-1/4, 0],
// bin 127 - j z in (-(j+1)/4, -j/4], bin 0 z <= -31.75 (weight 0) and NaN.
__device__ static inline int coarse_bin(float z) {
    const float b = z * -4.0f;  // exact
    if (!(b < (float)(COARSE_BINS - 1))) return 0;
    return COARSE_BINS - 1 - max((int)b, 0);
}

__device__ static inline void atomic_add_u64(uint64_t *p, uint64_t v) {
    atomicAdd((unsigned long long *)p, (unsigned long long)v);
}
__device__ static inline uint64_t sat_add(uint64_t a, uint64_t b) {  // min(a + b, 2^64 - 1): associative
    const uint64_t s = a + b;
    return s < a ? ~0ull : s;
}

// Sum over the block in a fixed order (integers: exact anyway). sh: 32 entries.
__device__ static uint64_t block_sum_u64(uint64_t v, uint64_t *sh) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    const int w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[w] = v;
    __syncthreads();
    uint64_t r = 0;
    for (int i = 0; i < nw; i++) r += sh[i];
    return r;
}

// Exclusive prefix sum over threads in thread order; *total gets the block's sum. sh: 32 entries.
__device__ static uint64_t block_excl_scan_u64(uint64_t v, uint64_t *sh, uint64_t *total) {
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    uint64_t x = v;
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t y = __shfl_up_sync(FULL_MASK, x, o);
        if (l >= o) x += y;
    }
    __syncthreads();
    if (l == 31) sh[w] = x;
    __syncthreads();
    uint64_t base = 0, tot = 0;
    for (int i = 0; i < nw; i++) {
        if (i < w) base += sh[i];
        tot += sh[i];
    }
    *total = tot;
    return base + x - v;
}

struct SampleArgs {
    int64_t V;
    float inv_t;
    int greedy;
    int64_t top_k;  // 0: off
    float top_p;    // 0: off
    uint64_t seed;
    int general;    // 1: every row takes the general path (sample_rows_cuda_reference: the oracle of the fast path)
};

struct SampleSmem {
    union {
        uint64_t radix[SAMPLE_WARPS][256];  // general path: one radix histogram per warp (32 KB)
        struct {
            uint64_t coarse[SAMPLE_WARPS][COARSE_BINS];  // pass B: mass by warp range and bin (16 KB)
            uint32_t ckey[CAND_CAP], cid[CAND_CAP];      // pass C: the boundary bin's keys and ids (16 KB)
        } nuc;
    } u;
    uint64_t merged[256];             // a histogram summed over warps, or the candidates' radix histogram
    uint64_t wmass[SAMPLE_WARPS];     // member mass of each warp's id range
    uint64_t wtb[SAMPLE_WARPS];       // ties (key == tau) in the ranges of lower warps
    uint32_t wtie[SAMPLE_WARPS];      // ties in each warp's range
    uint32_t wand[SAMPLE_WARPS], wor[SAMPLE_WARPS];
    uint64_t sh[32];
    float shv[32];
    int64_t shi[32];
    uint64_t need, pick_base, t;
    uint32_t ncand;
    int bin, pick_w;
};

// f(ok, i, v) for the ids lo + lane, lo + lane + 32, ... of [lo, hi) (a warp reads 128 contiguous bytes), with
// SAMPLE_UNROLL loads issued before any is used; every lane runs the same rounds (ok = false past hi), so f may
// use warp votes.
template <typename F>
__device__ __forceinline__ void warp_range(const float *x, int64_t lo, int64_t hi, F f) {
    const uint32_t lane = threadIdx.x & 31, h = (uint32_t)hi;  // ids < V <= INT32_MAX: 32-bit indices
    for (uint32_t base = (uint32_t)lo; base < h; base += 32 * SAMPLE_UNROLL) {
        float v[SAMPLE_UNROLL];
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const uint32_t i = base + 32 * u + lane;
            v[u] = i < h ? __ldg(x + i) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const uint32_t i = base + 32 * u + lane;
            f(i < h, (int64_t)i, clean(v[u]));
        }
    }
}
// The same over [0, V) for the whole block: thread t gets t, t + blockDim.x, ...
template <typename F>
__device__ __forceinline__ void block_range(const float *x, int64_t V, F f) {
    const uint32_t nt = blockDim.x, h = (uint32_t)V;
    for (uint32_t base = 0; base < h; base += nt * SAMPLE_UNROLL) {
        float v[SAMPLE_UNROLL];
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const uint32_t i = base + u * nt + threadIdx.x;
            v[u] = i < h ? __ldg(x + i) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < SAMPLE_UNROLL; u++) {
            const uint32_t i = base + u * nt + threadIdx.x;
            f(i < h, (int64_t)i, clean(v[u]));
        }
    }
}

// Radix step: the largest bin b of hist[NB] whose cumulative weight from the top reaches need, and need minus the
// weight above b (bin 0 if none does): the sequential "for b = NB-1..1: if (hist[b] >= need) break; need -=
// hist[b]" of the reference, found by warp 0 with saturating suffix sums instead of one thread's loop over 256
// bins. Same answer: sums above the bin are < need, so never saturated. Results in s_bin / s_need for every thread.
template <int NB>
__device__ static void pick_bin(const uint64_t *hist, uint64_t need, int *s_bin, uint64_t *s_need) {
    constexpr int P = NB / 32;  // bins per lane, lane l holding [l P, l P + P)
    __syncthreads();            // hist complete; earlier readers of s_bin / s_need done
    if (threadIdx.x < 32) {
        const int l = threadIdx.x;
        uint64_t h[P], loc = 0;
#pragma unroll
        for (int p = 0; p < P; p++) h[p] = hist[l * P + p], loc = sat_add(loc, h[p]);
        uint64_t suf = loc;  // this lane's bins and every higher lane's
        for (int o = 1; o < 32; o <<= 1) {
            const uint64_t y = __shfl_down_sync(FULL_MASK, suf, o);
            if (l + o < 32) suf = sat_add(suf, y);
        }
        uint64_t run = __shfl_down_sync(FULL_MASK, suf, 1);
        if (l == 31) run = 0;
        int hit = -1;
        uint64_t above = 0;
#pragma unroll
        for (int p = P - 1; p >= 0; p--) {
            const uint64_t nr = sat_add(run, h[p]);
            if (hit < 0 && (nr >= need || l * P + p == 0)) hit = l * P + p, above = run;  // bin 0: the fallback
            run = nr;
        }
        const unsigned ball = __ballot_sync(FULL_MASK, hit >= 0);  // lane 0 always hits
        const int src = 31 - __clz(ball);
        const int b = __shfl_sync(FULL_MASK, hit, src);
        const uint64_t ab = __shfl_sync(FULL_MASK, above, src);
        if (l == 0) *s_bin = b, *s_need = need - ab;
    }
    __syncthreads();
}

// General radix select over the row (the reference algorithm): keys >= floor_key weighted by count (by_mass =
// false) or mass; returns the key where the cumulative weight, largest keys first, reaches `need`; *rest gets the
// weight still needed from entries equal to it. The first digits put nearly every logit into one or two bins, so
// each thread merges runs of equal bins before its atomic update, into its warp's own histogram.
__device__ static uint32_t radix_select_rows(const float *x, const SampleArgs &a, float m, uint32_t floor_key,
                                             bool by_mass, uint64_t need, SampleSmem &S, uint64_t *rest) {
    const int tid = threadIdx.x;
    uint64_t *const hist = S.u.radix[tid >> 5];
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < SAMPLE_WARPS * 256; i += blockDim.x) (&S.u.radix[0][0])[i] = 0;
        __syncthreads();
        uint64_t run = 0;
        int rb = 0;
        block_range(x, a.V, [&](bool ok, int64_t, float v) {
            const uint32_t k = okey(v);
            if (!ok || k < floor_key || (k & mask) != prefix) return;
            const int b = (k >> shift) & 255;
            if (b != rb) {
                if (run) atomic_add_u64(&hist[rb], run);
                rb = b, run = 0;
            }
            run += by_mass ? weight(v, m, a.inv_t) : 1;
        });
        if (run) atomic_add_u64(&hist[rb], run);
        __syncthreads();
        if (tid < 256) {
            uint64_t s = 0;
            for (int w = 0; w < SAMPLE_WARPS; w++) s += S.u.radix[w][tid];
            S.merged[tid] = s;
        }
        pick_bin<256>(S.merged, need, &S.bin, &S.need);
        prefix |= (uint32_t)S.bin << shift;
        need = S.need;
        mask |= 255u << shift;
    }
    *rest = need;
    return prefix;
}

// The same selection by mass over the n copied tokens of pass C (all of the boundary bin's tokens; `need` at most
// their mass). A digit that every candidate shares is taken without a histogram: that histogram would hold all
// the remaining mass (>= need) in that one bin, so the step would pick it and leave need unchanged.
__device__ static uint32_t radix_select_cand(SampleSmem &S, int n, const SampleArgs &a, float m, uint64_t need,
                                             uint64_t *rest) {
    const int tid = threadIdx.x;
    uint32_t an = ~0u, orr = 0u;
    for (int j = tid; j < n; j += blockDim.x) an &= S.u.nuc.ckey[j], orr |= S.u.nuc.ckey[j];
    an = __reduce_and_sync(FULL_MASK, an);
    orr = __reduce_or_sync(FULL_MASK, orr);
    if ((tid & 31) == 0) S.wand[tid >> 5] = an, S.wor[tid >> 5] = orr;
    __syncthreads();
    an = ~0u, orr = 0u;
    for (int w = 0; w < SAMPLE_WARPS; w++) an &= S.wand[w], orr |= S.wor[w];
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const uint32_t dm = 255u << shift;
        if (!((an ^ orr) & dm)) {
            prefix |= an & dm, mask |= dm;
            continue;
        }
        for (int i = tid; i < 256; i += blockDim.x) S.merged[i] = 0;
        __syncthreads();
        uint64_t run = 0;
        int rb = 0;
        for (int j = tid; j < n; j += blockDim.x) {
            const uint32_t k = S.u.nuc.ckey[j];
            if ((k & mask) != prefix) continue;
            const int b = (k >> shift) & 255;
            if (b != rb) {
                if (run) atomic_add_u64(&S.merged[rb], run);
                rb = b, run = 0;
            }
            run += weight(okey_inv(k), m, a.inv_t);
        }
        if (run) atomic_add_u64(&S.merged[rb], run);
        pick_bin<256>(S.merged, need, &S.bin, &S.need);
        prefix |= (uint32_t)S.bin << shift;
        need = S.need;
        mask |= dm;
    }
    *rest = need;
    return prefix;
}

// The draw among the ids [lo, hi): each thread takes a contiguous id range, ties at tau are ranked from tie_base0
// in id order, member masses are scanned in id order from mass_base, and the id where the cumulative mass first
// exceeds t is written. own_total: [lo, hi) is the whole row and t comes from u and its total here.
__device__ static void draw_range(const float *x, int64_t lo, int64_t hi, const SampleArgs &a, float m,
                                  uint32_t kth, bool nucleus, uint32_t tau, uint64_t c, uint64_t tie_base0,
                                  uint64_t mass_base, uint64_t t, bool own_total, double u, int32_t *out_row,
                                  uint64_t *sh) {
    const int64_t n = hi - lo, nt = blockDim.x, per = (n + nt - 1) / nt;
    const int64_t i0 = lo + min(n, (int64_t)threadIdx.x * per), i1 = lo + min(n, (int64_t)threadIdx.x * per + per);
    uint64_t tie_base = tie_base0, tot;
    // a kept id: its key at or above the k-th, and in the nucleus (below tau out; at tau the first c ties in id
    // order, r counting the ties met so far)
    auto member = [&](uint32_t k, uint64_t &r) {
        if (k < kth) return false;
        if (nucleus && k <= tau) return k == tau && r++ < c;
        return true;
    };
    if (nucleus) {
        uint64_t cnt = 0;
        for (int64_t i = i0; i < i1; i++) cnt += okey(clean(x[i])) == tau;
        tie_base += block_excl_scan_u64(cnt, sh, &tot);
    }
    uint64_t mass = 0, r = tie_base;
    for (int64_t i = i0; i < i1; i++) {
        const float v = clean(x[i]);
        if (member(okey(v), r)) mass += weight(v, m, a.inv_t);
    }
    uint64_t total_n;
    const uint64_t base = mass_base + block_excl_scan_u64(mass, sh, &total_n);
    if (own_total) {
        t = (uint64_t)(u * (double)total_n);
        if (t >= total_n) t = total_n - 1;
    }
    if (mass > 0 && t >= base && t < base + mass) {
        uint64_t acc = base;
        r = tie_base;
        for (int64_t i = i0; i < i1; i++) {
            const float v = clean(x[i]);
            if (!member(okey(v), r)) continue;
            acc += weight(v, m, a.inv_t);
            if (acc > t) {
                *out_row = (int32_t)i;
                break;
            }
        }
    }
}

// The argmax's merge: the larger value, the lower id on ties (NaN already -inf), the same (value, id) in any order
// of merges; sample_kernel's greedy path and argmax_chunks_kernel both use it, so their ids agree.
__device__ __forceinline__ void am_merge(float &bv, int64_t &bi, float v, int64_t i) {
    if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
}

// At most 64 registers (2 blocks of 512 threads per SM; 40 for 3 blocks spills), no spills.
__global__ void __launch_bounds__(SAMPLE_THREADS, 2)
    sample_kernel(const float *logits, SampleArgs a, const uint64_t *stream, const uint64_t *counter, int32_t *out) {
    __shared__ SampleSmem S;
    const int64_t row = blockIdx.x, V = a.V;
    const float *x = logits + row * V;
    const int tid = threadIdx.x, wid = tid >> 5;

    // A. argmax, lowest id on ties (NaN counts as -inf): the same (value, id) in any traversal order
    float bv = -INFINITY;
    int64_t bi = INT64_MAX;
    block_range(x, V, [&](bool ok, int64_t i, float v) {
        if (ok) am_merge(bv, bi, v, i);
    });
    for (int o = 16; o; o >>= 1) am_merge(bv, bi, __shfl_xor_sync(FULL_MASK, bv, o), __shfl_xor_sync(FULL_MASK, bi, o));
    if ((tid & 31) == 0) S.shv[wid] = bv, S.shi[wid] = bi;
    __syncthreads();
    bv = S.shv[0], bi = S.shi[0];
    for (int w = 1; w < SAMPLE_WARPS; w++) am_merge(bv, bi, S.shv[w], S.shi[w]);
    if (a.greedy || !(bv > -INFINITY)) {  // block-uniform condition
        if (tid == 0) out[row] = (int32_t)bi;
        return;
    }
    const float m = bv;

    // top-k: keep keys >= the k-th largest key (ties at it all kept)
    uint32_t kth = 0;
    uint64_t rest;
    if (a.top_k > 0 && a.top_k < V) kth = radix_select_rows(x, a, m, 0, false, (uint64_t)a.top_k, S, &rest);

    // B. total mass; per warp (a contiguous id range, `seg` ids, a multiple of 32) the mass by coarse bin. Runs of
    // one bin are summed in registers before the atomic update (a narrow distribution is mostly one bin).
    const int64_t seg = (V + 32 * SAMPLE_WARPS - 1) / (32 * SAMPLE_WARPS) * 32;
    const int64_t wlo = min(V, (int64_t)wid * seg), whi = min(V, wlo + seg);
    for (int i = tid; i < SAMPLE_WARPS * COARSE_BINS; i += blockDim.x) (&S.u.nuc.coarse[0][0])[i] = 0;
    __syncthreads();
    uint64_t total;
    {
        uint64_t part = 0, run = 0;
        int rb = 0;
        uint64_t *const coarse = S.u.nuc.coarse[wid];
        warp_range(x, wlo, whi, [&](bool ok, int64_t, float v) {
            if (!ok || okey(v) < kth) return;
            const float z = zval(v, m, a.inv_t);
            if (z < ZERO_WEIGHT_Z) return;  // weight 0
            const uint64_t w = weight_z(z);
            part += w;
            const int b = coarse_bin(z);
            if (b != rb) {
                if (run) atomic_add_u64(&coarse[rb], run);
                rb = b, run = 0;
            }
            run += w;
        });
        if (run) atomic_add_u64(&coarse[rb], run);
        total = block_sum_u64(part, S.sh);  // (its barriers also complete the histograms)
    }
    const bool nucleus = a.top_p > 0.0f && a.top_p < 1.0f;
    uint64_t target = 0;
    if (nucleus) {
        target = (uint64_t)ceil((double)a.top_p * (double)total);
        if (target < 1) target = 1;
        if (target > total) target = total;
    }

    // C. the fast path: exact sums (V < 2^24, so no 64-bit sum wraps) and total >= 2^40 (finite m and 1/T: the
    // maximum weighs exp(0) * 2^40), so target >= 1 and every radix step finds a bin with mass
    if (!a.general && m < INFINITY && isfinite(a.inv_t) && V < ((int64_t)1 << 24)) {
        int bstar = -1;  // the coarse bin holding tau (none without top-p: every bin is above)
        uint64_t need = 0;
        if (nucleus) {
            if (tid < COARSE_BINS) {
                uint64_t s = 0;
                for (int w = 0; w < SAMPLE_WARPS; w++) s += S.u.nuc.coarse[w][tid];
                S.merged[tid] = s;
            }
            pick_bin<COARSE_BINS>(S.merged, target, &S.bin, &S.need);
            bstar = S.bin, need = S.need;  // need: target minus the mass of the bins above, >= 1
        }
        if (tid < SAMPLE_WARPS) {
            uint64_t s = 0;
            for (int b = bstar + 1; b < COARSE_BINS; b++) s += S.u.nuc.coarse[tid][b];
            S.wmass[tid] = s, S.wtie[tid] = 0;
        }
        if (tid == 0) S.ncand = 0;
        __syncthreads();
        bool fits = true;
        uint32_t tau = 0;
        uint64_t c = 0, q_tau = 0;
        if (nucleus) {
            // copy the boundary bin's tokens (order does not matter: everything below is a sum or a count)
            const int lane = tid & 31;
            warp_range(x, wlo, whi, [&](bool ok, int64_t i, float v) {
                const uint32_t k = okey(v);
                const bool p = ok && k >= kth && coarse_bin(zval(v, m, a.inv_t)) == bstar;
                const unsigned bal = __ballot_sync(FULL_MASK, p);
                if (!bal) return;
                uint32_t pos = 0;
                if (lane == 0) pos = atomicAdd(&S.ncand, (uint32_t)__popc(bal));
                pos = __shfl_sync(FULL_MASK, pos, 0) + __popc(bal & ((1u << lane) - 1u));
                if (p && pos < CAND_CAP) S.u.nuc.ckey[pos] = k, S.u.nuc.cid[pos] = (uint32_t)i;
            });
            __syncthreads();
            const int n = (int)S.ncand;
            fits = n <= CAND_CAP;
            if (fits) {
                tau = radix_select_cand(S, n, a, m, need, &rest);
                q_tau = weight(okey_inv(tau), m, a.inv_t);  // >= 1: tau's bin held mass >= rest >= 1
                c = q_tau ? (rest + q_tau - 1) / q_tau : 1;
                for (int j = tid; j < n; j += blockDim.x) {
                    const uint32_t k = S.u.nuc.ckey[j];
                    const int w = (int)(S.u.nuc.cid[j] / (uint32_t)seg);
                    if (k > tau) atomic_add_u64(&S.wmass[w], weight(okey_inv(k), m, a.inv_t));
                    else if (k == tau) atomicAdd(&S.wtie[w], 1u);
                }
                __syncthreads();
            }
        }
        if (fits) {
            if (tid == 0) {
                // the c lowest-id ties (all of weight q_tau) are members: the first warps' ranges take them
                uint64_t before = 0, tot = 0;
                for (int w = 0; w < SAMPLE_WARPS; w++) {
                    if (nucleus) {
                        const uint64_t tw = S.wtie[w], left = before < c ? c - before : 0;
                        S.wmass[w] += (tw < left ? tw : left) * q_tau;
                        S.wtb[w] = before;
                        before += tw;
                    }
                    tot += S.wmass[w];
                }
                const double u = uniform3(a.seed, stream[row], counter[row]);
                uint64_t t = (uint64_t)(u * (double)tot);
                if (t >= tot) t = tot - 1;
                uint64_t acc = 0;
                int w = 0;
                for (; w < SAMPLE_WARPS - 1 && t >= acc + S.wmass[w]; w++) acc += S.wmass[w];
                S.pick_w = w, S.pick_base = acc, S.t = t;
            }
            __syncthreads();
            const int w = S.pick_w;
            const int64_t lo = min(V, (int64_t)w * seg), hi = min(V, lo + seg);
            draw_range(x, lo, hi, a, m, kth, nucleus, tau, c, nucleus ? S.wtb[w] : 0, S.pick_base, S.t, false, 0.0,
                       out + row, S.sh);
            return;
        }
    }

    // The general path: tau by radix select over the row, the draw over the whole row.
    uint32_t tau = 0;
    uint64_t c = 0;
    if (nucleus) {
        tau = radix_select_rows(x, a, m, kth, true, target, S, &rest);
        const uint64_t q_tau = weight(okey_inv(tau), m, a.inv_t);
        c = q_tau ? (rest + q_tau - 1) / q_tau : 1;
    }
    draw_range(x, 0, V, a, m, kth, nucleus, tau, c, 0, 0, 0, true, uniform3(a.seed, stream[row], counter[row]),
               out + row, S.sh);
}

// ---------------------------------------------------------------- launch

static int sample_args(int64_t rows, int64_t V, const DecodeSampling *s, SampleArgs *a, char *err, size_t errlen) {
    if (rows <= 0 || V <= 0 || V > INT32_MAX || rows > INT32_MAX)
        return train_fail(err, errlen, "sample: bad shape rows %lld x vocab %lld", (long long)rows, (long long)V);
    if (!(s->temperature <= 0.0f) && !(s->temperature < INFINITY))
        return train_fail(err, errlen, "sample: temperature %g must be finite", (double)s->temperature);
    a->V = V;
    a->greedy = s->temperature <= 0.0f;
    a->inv_t = a->greedy ? 1.0f : 1.0f / s->temperature;
    a->top_k = s->top_k > 0 ? s->top_k : 0;
    a->top_p = s->top_p > 0.0f && s->top_p < 1.0f ? s->top_p : 0.0f;
    a->seed = s->seed;
    a->general = 0;
    return 0;
}

// Internal: enqueue on a given stream (decode_cuda.cu).
int sample_rows_cuda_on(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s, const uint64_t *stream,
                        const uint64_t *counter, int32_t *out, cudaStream_t st, char *err, size_t errlen) {
    SampleArgs a;
    if (sample_args(rows, V, s, &a, err, errlen)) return -1;
    // DISTILL_SAMPLE=reference: every row through the general path (same draws; for A/B timing on a device)
    static int ref = -1;
    if (ref < 0) {
        const char *e = getenv("DISTILL_SAMPLE");
        ref = e && !strcmp(e, "reference");
        if (e && !ref && *e) fprintf(stderr, "sample_rows_cuda: DISTILL_SAMPLE=\"%s\" unknown (only \"reference\"); ignored\n", e);
    }
    a.general = ref;
    sample_kernel<<<(unsigned)rows, SAMPLE_THREADS, 0, st>>>(logits, a, stream, counter, out);
    kernelCheck("sample_kernel");
    return 0;
}

extern "C" int sample_rows_cuda(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s,
                                const uint64_t *stream, const uint64_t *counter, int32_t *out, char *err,
                                size_t errlen) {
    return sample_rows_cuda_on(logits, rows, V, s, stream, counter, out, 0, err, errlen);
}

// ---------------------------------------------------------------- greedy picks of few rows

// sample_kernel's greedy path is one block per row: for a decode step's one row it left all but one SM idle (~20 us
// over 49152 logits on an H100). Here a row is cut into chunks of AM_CHUNK logits, one block per (chunk, row), and
// the row's last block to finish (an atomic count, reset by that block) merges the chunks' (value, id). The argmax
// with the lowest id on ties (NaN as -inf) does not depend on the order of the merges, so the ids are the greedy
// path's.
#define AM_CHUNK 4096
#define AM_THREADS 256

// the block's (value, id) to thread 0
__device__ __forceinline__ void am_block(float &bv, int64_t &bi, float *sv, int64_t *si) {
    for (int o = 16; o; o >>= 1) am_merge(bv, bi, __shfl_xor_sync(FULL_MASK, bv, o), __shfl_xor_sync(FULL_MASK, bi, o));
    if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = bv, si[threadIdx.x >> 5] = bi;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < AM_THREADS / 32; w++) am_merge(bv, bi, sv[w], si[w]);
}

__global__ void __launch_bounds__(AM_THREADS)
    argmax_chunks_kernel(const float *logits, int64_t V, int nch, float *pv, int64_t *pi, unsigned *cnt, int32_t *out) {
    __shared__ float sv[AM_THREADS / 32];
    __shared__ int64_t si[AM_THREADS / 32];
    __shared__ bool last;
    const int64_t row = blockIdx.y, i0 = (int64_t)blockIdx.x * AM_CHUNK, i1 = min(V, i0 + AM_CHUNK);
    const float *x = logits + row * V;
    float bv = -INFINITY;
    int64_t bi = INT64_MAX;
    for (int64_t i = i0 + threadIdx.x; i < i1; i += AM_THREADS) am_merge(bv, bi, clean(__ldg(x + i)), i);
    am_block(bv, bi, sv, si);
    if (threadIdx.x == 0) {
        pv[row * nch + blockIdx.x] = bv, pi[row * nch + blockIdx.x] = bi;
        __threadfence();  // the partial is visible before the count says so
        last = atomicAdd(cnt + row, 1u) == (unsigned)nch - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    bv = -INFINITY, bi = INT64_MAX;
    for (int c = threadIdx.x; c < nch; c += AM_THREADS) am_merge(bv, bi, __ldcg(pv + row * nch + c), __ldcg(pi + row * nch + c));
    __syncthreads();  // sv / si reused
    am_block(bv, bi, sv, si);
    if (threadIdx.x == 0) out[row] = (int32_t)bi, cnt[row] = 0;  // INT64_MAX (all NaN) -> -1, as sample_kernel
}

// The workspace: one count per row for up to AM_MAX_ROWS rows first (at the same place whatever the rows of a call,
// so a later call with more rows never finds another call's partials where its counts are), then the partials.
#define AM_MAX_ROWS 65535
extern "C" size_t argmax_rows_workspace(int64_t rows, int64_t V) {
    const int64_t nch = (V + AM_CHUNK - 1) / AM_CHUNK;
    return (size_t)(AM_MAX_ROWS + 1) * 4 + (size_t)(rows * nch) * (8 + 4);
}

int argmax_rows_cuda_on(const float *logits, int64_t rows, int64_t V, void *ws, int32_t *out, cudaStream_t st,
                        char *err, size_t errlen) {
    if (rows <= 0 || V <= 0 || V > INT32_MAX || rows > AM_MAX_ROWS)
        return train_fail(err, errlen, "argmax_rows: bad shape rows %lld x vocab %lld", (long long)rows, (long long)V);
    const int64_t nch = (V + AM_CHUNK - 1) / AM_CHUNK;
    unsigned *cnt = (unsigned *)ws;  // [AM_MAX_ROWS + 1] counts (zero between calls), [rows, nch] ids, values
    int64_t *pi = (int64_t *)(cnt + AM_MAX_ROWS + 1);
    float *pv = (float *)(pi + rows * nch);
    argmax_chunks_kernel<<<dim3((unsigned)nch, (unsigned)rows), AM_THREADS, 0, st>>>(logits, V, (int)nch, pv, pi, cnt, out);
    kernelCheck("argmax_chunks_kernel");
    return 0;
}

extern "C" int argmax_rows_cuda(const float *logits, int64_t rows, int64_t V, void *ws, int32_t *out, char *err,
                                size_t errlen) {
    return argmax_rows_cuda_on(logits, rows, V, ws, out, 0, err, errlen);
}

// ---------------------------------------------------------------- ranked picks (speculative branches)

// Row r gets the id of rank r % W in the order (value descending, NaN as -inf; id ascending on ties): sample_rank
// (sample.h) on the device. As argmax_chunks_kernel, a row is cut into chunks of RK_CHUNK logits, one block per
// (chunk, row): the block keeps its chunk in registers (RK_PER per thread) and takes its first n = rank + 1 elements of
// the order in n block-wide rounds, each the best element after the previous round's; the row's last block to finish
// merges the chunks' n candidates the same way. Every element of the row's first n is among its chunk's first n, so
// the result does not depend on the chunking or the order of the merges.
#define RANK_MAX 8
#define RK_THREADS 256
#define RK_PER 16
#define RK_CHUNK (RK_THREADS * RK_PER)

__device__ __forceinline__ bool rk_before(float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); }

// the block's best (value, id) of the threads' (bv, bi), to every thread (sv, si: [RK_THREADS / 32 + 1] shared)
__device__ __forceinline__ void rk_block_best(float &bv, int64_t &bi, float *sv, int64_t *si) {
    for (int o = 16; o; o >>= 1) am_merge(bv, bi, __shfl_xor_sync(FULL_MASK, bv, o), __shfl_xor_sync(FULL_MASK, bi, o));
    if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = bv, si[threadIdx.x >> 5] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < RK_THREADS / 32; w++) am_merge(bv, bi, sv[w], si[w]);
        sv[RK_THREADS / 32] = bv, si[RK_THREADS / 32] = bi;
    }
    __syncthreads();
    bv = sv[RK_THREADS / 32], bi = si[RK_THREADS / 32];
    __syncthreads();  // sv / si reused by the next call
}

__global__ void __launch_bounds__(RK_THREADS)
    rank_chunks_kernel(const float *logits, int64_t V, int W, int nch, float *pv, int64_t *pi, unsigned *cnt, int32_t *out) {
    __shared__ float sv[RK_THREADS / 32 + 1];
    __shared__ int64_t si[RK_THREADS / 32 + 1];
    __shared__ bool last;
    const int64_t row = blockIdx.y, i0 = (int64_t)blockIdx.x * RK_CHUNK;
    const int n = (int)(row % W) + 1;
    const float *x = logits + row * V;
    float v[RK_PER];
#pragma unroll
    for (int k = 0; k < RK_PER; k++) {
        const int64_t i = i0 + k * RK_THREADS + threadIdx.x;
        v[k] = i < V ? clean(__ldg(x + i)) : -INFINITY;
    }
    float qv = INFINITY;  // the previous round's pick (none yet: everything comes after (+inf, -1))
    int64_t qi = -1;
    float *cv = pv + (row * nch + blockIdx.x) * RANK_MAX;
    int64_t *ci = pi + (row * nch + blockIdx.x) * RANK_MAX;
    for (int r = 0; r < n; r++) {
        float bv = -INFINITY;
        int64_t bi = INT64_MAX;
#pragma unroll
        for (int k = 0; k < RK_PER; k++) {
            const int64_t i = i0 + k * RK_THREADS + threadIdx.x;
            if (i < V && rk_before(qv, qi, v[k], i) && rk_before(v[k], i, bv, bi)) bv = v[k], bi = i;
        }
        rk_block_best(bv, bi, sv, si);
        qv = bv, qi = bi;
        if (threadIdx.x == 0) cv[r] = bv, ci[r] = bi;
    }
    if (threadIdx.x == 0) {
        __threadfence();  // the candidates are visible before the count says so
        last = atomicAdd(cnt + row, 1u) == (unsigned)nch - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    qv = INFINITY, qi = -1;
    for (int r = 0; r < n; r++) {  // the same rounds over the nch * n candidates
        float bv = -INFINITY;
        int64_t bi = INT64_MAX;
        for (int c = threadIdx.x; c < nch * n; c += RK_THREADS) {
            const float cvv = __ldcg(pv + (row * nch + c / n) * RANK_MAX + c % n);
            const int64_t cii = __ldcg(pi + (row * nch + c / n) * RANK_MAX + c % n);
            if (cii < V && rk_before(qv, qi, cvv, cii) && rk_before(cvv, cii, bv, bi)) bv = cvv, bi = cii;
        }
        rk_block_best(bv, bi, sv, si);
        qv = bv, qi = bi;
    }
    if (threadIdx.x == 0) out[row] = qi >= 0 && qi < V ? (int32_t)qi : -1, cnt[row] = 0;
}

// The workspace: one count per row for up to RK_MAX_ROWS rows first (zero between calls; at the same place whatever the
// rows of a call, as argmax_rows'), then the chunks' candidates.
#define RK_MAX_ROWS 65535
#define RK_COUNTS_BYTES ((size_t)(RK_MAX_ROWS + 1) * 4)
extern "C" size_t rank_rows_workspace(int64_t rows, int64_t V) {
    const int64_t nch = (V + RK_CHUNK - 1) / RK_CHUNK;
    return RK_COUNTS_BYTES + (size_t)(rows * nch * RANK_MAX) * (8 + 4);
}

int rank_rows_cuda_on(const float *logits, int64_t rows, int64_t V, int W, void *ws, int32_t *out, cudaStream_t st,
                      char *err, size_t errlen) {
    if (rows <= 0 || V <= 0 || V > INT32_MAX || rows > RK_MAX_ROWS || W < 1 || W > RANK_MAX)
        return train_fail(err, errlen, "rank_rows: bad shape rows %lld x vocab %lld, %d ranks (1..%d)", (long long)rows,
                          (long long)V, W, RANK_MAX);
    const int64_t nch = (V + RK_CHUNK - 1) / RK_CHUNK;
    unsigned *cnt = (unsigned *)ws;  // [RK_MAX_ROWS + 1] counts, [rows, nch, RANK_MAX] ids, values
    int64_t *pi = (int64_t *)((char *)ws + RK_COUNTS_BYTES);
    float *pv = (float *)(pi + rows * nch * RANK_MAX);
    rank_chunks_kernel<<<dim3((unsigned)nch, (unsigned)rows), RK_THREADS, 0, st>>>(logits, V, W, (int)nch, pv, pi, cnt, out);
    kernelCheck("rank_chunks_kernel");
    return 0;
}

extern "C" int rank_rows_cuda(const float *logits, int64_t rows, int64_t V, int W, void *ws, int32_t *out, char *err,
                              size_t errlen) {
    return rank_rows_cuda_on(logits, rows, V, W, ws, out, 0, err, errlen);
}

// sample_rows_cuda with every row through the general path (radix select over the whole row, the draw over the whole
// row): the oracle of the fast path in tests and benchmarks (not in decode_cuda.h: they declare it themselves).
extern "C" int sample_rows_cuda_reference(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s,
                                          const uint64_t *stream, const uint64_t *counter, int32_t *out, char *err,
                                          size_t errlen) {
    SampleArgs a;
    if (sample_args(rows, V, s, &a, err, errlen)) return -1;
    a.general = 1;
    sample_kernel<<<(unsigned)rows, SAMPLE_THREADS, 0, 0>>>(logits, a, stream, counter, out);
    kernelCheck("sample_kernel (general path)");
    return 0;
}
