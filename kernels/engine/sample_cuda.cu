// sample_cuda.cu: token sampling on the GPU (decode_cuda.h, "sampling on the device"). One block per row
// reads its V logits a few times from global memory (L2-resident at V ~ 50k) and never writes them:
//   1. argmax (greedy, and the maximum for the softmax);
//   2. top-k: radix select (4 passes of 8 bits, integer histogram counts) of the k-th largest logit;
//   3. top-p: radix select weighted by the probability mass of the kept tokens, down to the exact logit tau
//      where the cumulative mass (most likely first) reaches top_p, then the number c of tokens equal to tau
//      (lowest ids first) still needed;
//   4. the draw: each thread owns a contiguous id range; an exclusive scan of the members' masses in id order
//      places u * total in exactly one thread's range, which walks it.
// Probabilities are 2^40-scaled integers exp((x - max) / T) * 2^40, so every sum is exact and the result
// does not depend on the thread count or the order of atomic updates.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels/engine/decode_cuda.h"
#include "kernels/train/train_check.cuh"

#define SAMPLE_THREADS 512

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
// The integer weight of a logit: exp((v - m) * inv_t) * 2^40 (v <= m, so <= 2^40).
__device__ static inline uint64_t weight(float v, float m, float inv_t) {
    float e = expf((v - m) * inv_t);
    return (uint64_t)((double)e * 1099511627776.0);
}

// Sum over the block in a fixed order (integers: exact anyway). sh: 32 entries.
__device__ static uint64_t block_sum_u64(uint64_t v, uint64_t *sh) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
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
        uint64_t y = __shfl_up_sync(0xffffffffu, x, o);
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
};

// Radix select from the top over keys (restricted to key >= floor_key) weighted by count (by_mass = 0) or
// by mass: returns the key where the cumulative weight, largest keys first, reaches `need`; *rest gets the
// weight still needed from entries equal to that key.
__device__ static uint32_t radix_select(const float *x, const SampleArgs &a, float m, uint32_t floor_key, int by_mass,
                                        uint64_t need, uint64_t *hist, uint32_t *s_prefix, uint64_t *s_need,
                                        uint64_t *rest) {
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < a.V; i += blockDim.x) {
            const float v = clean(x[i]);
            const uint32_t k = okey(v);
            if (k >= floor_key && (k & mask) == prefix)
                atomicAdd((unsigned long long *)&hist[(k >> shift) & 255u], (unsigned long long)(by_mass ? weight(v, m, a.inv_t) : 1));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint64_t nd = need;
            int bin = 255;
            for (; bin > 0; bin--) {
                if (hist[bin] >= nd) break;
                nd -= hist[bin];
            }
            *s_prefix = prefix | ((uint32_t)bin << shift);
            *s_need = nd;
        }
        __syncthreads();
        prefix = *s_prefix;
        need = *s_need;
        mask |= 255u << shift;
        __syncthreads();
    }
    *rest = need;
    return prefix;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(const float *logits, SampleArgs a, const uint64_t *stream, const uint64_t *counter, int32_t *out) {
    __shared__ uint64_t sh[32];
    __shared__ float shv[32];
    __shared__ int64_t shi[32];
    __shared__ uint64_t hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ uint64_t s_need;
    const int64_t row = blockIdx.x, V = a.V;
    const float *x = logits + row * V;
    const int tid = threadIdx.x, nt = blockDim.x;

    // 1. argmax, lowest id on ties (NaN counts as -inf)
    float bv = -INFINITY;
    int64_t bi = INT64_MAX;
    for (int64_t i = tid; i < V; i += nt) {
        const float v = clean(x[i]);
        if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
    }
    for (int o = 16; o; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    if ((tid & 31) == 0) shv[tid >> 5] = bv, shi[tid >> 5] = bi;
    __syncthreads();
    bv = shv[0], bi = shi[0];
    for (int w = 1; w < nt / 32; w++)
        if (shv[w] > bv || (shv[w] == bv && shi[w] < bi)) bv = shv[w], bi = shi[w];
    if (a.greedy || !(bv > -INFINITY)) {  // block-uniform condition
        if (tid == 0) out[row] = (int32_t)bi;
        return;
    }
    const float m = bv;

    // 2. top-k: keep keys >= the k-th largest key (ties at it all kept)
    uint32_t kth = 0;
    uint64_t rest;
    if (a.top_k > 0 && a.top_k < V) kth = radix_select(x, a, m, 0, 0, (uint64_t)a.top_k, hist, &s_prefix, &s_need, &rest);

    // 3. top-p: the threshold key tau and the number c of tokens at tau (lowest ids first) in the nucleus
    const bool nucleus = a.top_p > 0.0f && a.top_p < 1.0f;
    uint32_t tau = 0;
    uint64_t c = 0;
    if (nucleus) {
        uint64_t part = 0;
        for (int64_t i = tid; i < V; i += nt) {
            const float v = clean(x[i]);
            if (okey(v) >= kth) part += weight(v, m, a.inv_t);
        }
        const uint64_t total = block_sum_u64(part, sh);
        uint64_t target = (uint64_t)ceil((double)a.top_p * (double)total);
        if (target < 1) target = 1;
        if (target > total) target = total;
        tau = radix_select(x, a, m, kth, 1, target, hist, &s_prefix, &s_need, &rest);
        const uint64_t q_tau = weight(okey_inv(tau), m, a.inv_t);  // >= 1: the tau bin held >= rest >= 1
        c = q_tau ? (rest + q_tau - 1) / q_tau : 1;
    }

    // 4. the draw over contiguous id ranges
    const int64_t per = (V + nt - 1) / nt, i0 = min(V, (int64_t)tid * per), i1 = min(V, i0 + per);
    uint64_t tie_base = 0, tot;
    if (nucleus) {
        uint64_t cnt = 0;
        for (int64_t i = i0; i < i1; i++) cnt += okey(clean(x[i])) == tau;
        tie_base = block_excl_scan_u64(cnt, sh, &tot);
    }
    uint64_t mass = 0, r = tie_base;
    for (int64_t i = i0; i < i1; i++) {
        const float v = clean(x[i]);
        const uint32_t k = okey(v);
        if (k < kth) continue;
        bool mem = true;
        if (nucleus) {
            if (k < tau) mem = false;
            else if (k == tau) mem = r++ < c;
        }
        if (mem) mass += weight(v, m, a.inv_t);
    }
    uint64_t total_n;
    const uint64_t base = block_excl_scan_u64(mass, sh, &total_n);
    const double u = uniform3(a.seed, stream[row], counter[row]);
    uint64_t t = (uint64_t)(u * (double)total_n);
    if (t >= total_n) t = total_n - 1;
    if (mass > 0 && t >= base && t < base + mass) {
        uint64_t acc = base;
        r = tie_base;
        for (int64_t i = i0; i < i1; i++) {
            const float v = clean(x[i]);
            const uint32_t k = okey(v);
            if (k < kth) continue;
            bool mem = true;
            if (nucleus) {
                if (k < tau) mem = false;
                else if (k == tau) mem = r++ < c;
            }
            if (!mem) continue;
            acc += weight(v, m, a.inv_t);
            if (acc > t) {
                out[row] = (int32_t)i;
                break;
            }
        }
    }
}

// Internal: enqueue on a given stream (decode_cuda.cu).
int sample_rows_cuda_on(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s, const uint64_t *stream,
                        const uint64_t *counter, int32_t *out, cudaStream_t st, char *err, size_t errlen) {
    if (rows <= 0 || V <= 0 || V > INT32_MAX || rows > INT32_MAX)
        return train_fail(err, errlen, "sample: bad shape rows %lld x vocab %lld", (long long)rows, (long long)V);
    if (!(s->temperature <= 0.0f) && !(s->temperature < INFINITY))
        return train_fail(err, errlen, "sample: temperature %g must be finite", (double)s->temperature);
    SampleArgs a;
    a.V = V;
    a.greedy = s->temperature <= 0.0f;
    a.inv_t = a.greedy ? 1.0f : 1.0f / s->temperature;
    a.top_k = s->top_k > 0 ? s->top_k : 0;
    a.top_p = s->top_p > 0.0f && s->top_p < 1.0f ? s->top_p : 0.0f;
    a.seed = s->seed;
    sample_kernel<<<(unsigned)rows, SAMPLE_THREADS, 0, st>>>(logits, a, stream, counter, out);
    kernelCheck("sample_kernel");
    return 0;
}

extern "C" int sample_rows_cuda(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s,
                                const uint64_t *stream, const uint64_t *counter, int32_t *out, char *err,
                                size_t errlen) {
    return sample_rows_cuda_on(logits, rows, V, s, stream, counter, out, 0, err, errlen);
}
