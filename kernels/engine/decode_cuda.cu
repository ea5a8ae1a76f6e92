// decode_cuda.cu: DecoderCuda (decode_cuda.h). Every feed, prefill or decode step, runs the same batched
// multi-token path over the rows of up to `rows` tokens at a time (a long ragged prefill is cut into chunks
// of columns):
//   embedding -> per layer: RMSNorm -> attention (q/k/v GEMMs, RoPE, K/V appended to the cache at each
//   sequence's own length, attention of each query over its own keys) or Mamba-1 (five input GEMMs, dt GEMM
//   with bias, GQA repeat of x, causal conv from the cached window, multi-token selective scan from the
//   cached state that stops each sequence after its own valid tokens, window advance) -> out GEMM ->
//   residual + RMSNorm -> SwiGLU MLP -> residual; then the final norm and the head on each sequence's last
//   token only, fp32 logits.
// GEMMs, norms, RoPE, SwiGLU and the embedding come from kernels/train (train_cuda.h), the conv and the scan
// from kernels/scan; the KV-cache writes, the decode attention, the GQA repeat, the conv-window advance and
// the last-row gather are the small kernels below.
// Speculative windows (decoder_cuda_window_begin / accept): each Mamba layer keeps its window tokens' conv
// and scan inputs (written in place by the window's first feed when the layouts agree, else copied by
// win_store_kernel) and one copy of its window-start state; accept replays the window from that copy with the
// multi-token scan (all Mamba layers in one launch), stopping each sequence at its accepted length.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine/decode_cuda.h"
#include "kernels/engine/decode_gemm.h"
#include "kernels/scan/scan_common.cuh"  // sigmoid_dev: the conv step computes as conv1d_silu_fwd_cuda
#include "kernels/scan/selective_scan_cuda.h"
#include "kernels/train/train_common.cuh"  // rope_cs / rope_rot: the fused rope + append
#include "kernels/train/train_cuda.h"

extern "C" {
#include "distill/draft_vocab.h"  // head_ids_sorted
#include "distill/layers_cpu.h"  // rope_inv_freq
}

int argmax_rows_cuda_on(const float *logits, int64_t rows, int64_t V, void *ws, int32_t *out, cudaStream_t st,
                        char *err, size_t errlen);
int sample_rows_cuda_on(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s, const uint64_t *stream,
                        const uint64_t *counter, int32_t *out, cudaStream_t st, char *err, size_t errlen);
int rank_rows_cuda_on(const float *logits, int64_t rows, int64_t V, int W, void *ws, int32_t *out, cudaStream_t st,
                      char *err, size_t errlen);

#define ATT_THREADS 128  // keys per tile = threads; head_dim <= 2 * ATT_THREADS
#define MAX_HD 256

// ---------------------------------------------------------------- small kernels

// K and V rows of the fed tokens into the cache: row (b, t) goes to position lenb[b] + t of sequence b.
// k, v [nb*lc, kvd]; kc, vc [B, max_len, kvd].
__global__ void kv_append_kernel(bf16 *kc, bf16 *vc, const bf16 *k, const bf16 *v, const int32_t *lenb, int64_t nb,
                                 int64_t lc, int64_t kvd, int64_t max_len) {
    const int64_t total = nb * lc * kvd;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / kvd, c = i % kvd, b = row / lc, t = row % lc;
        const int64_t dst = (b * max_len + lenb[b] + t) * kvd + c;
        kc[dst] = k[i];
        vc[dst] = v[i];
    }
}

// rope2_cuda (q and k in place) then kv_append_kernel in one launch, the same bits: one thread per (row, head, pair i)
// of the q heads then the KV heads (each computes its angle: the heads in parallel, not one after another) rotates
// pair i of its q head in place, or writes its k head's rotated pair, and v's pair unchanged, to the cache at the
// row's position.
__global__ void rope_kv_kernel(bf16 *q, int nh, const bf16 *k, const bf16 *v, int nkv, bf16 *kc, bf16 *vc,
                               const int32_t *pos, const float *inv_freq, const int32_t *lenb, int64_t nb, int64_t lc,
                               int hd, int64_t max_len) {
    const int half = hd / 2, heads = nh + nkv;
    const int64_t total = nb * lc * heads * half, kvd = (int64_t)nkv * hd;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t nh_ = idx / half, n = nh_ / heads, b = n / lc, t = n % lc;
        const int i = (int)(idx - nh_ * half), h = (int)(nh_ - n * heads);
        float cs, sn, o1, o2;
        rope_cs(pos[n], inv_freq[i], 1.0f, &cs, &sn);
        if (h < nh) {
            bf16 *x = q + (n * nh + h) * (int64_t)hd;
            rope_rot(__bfloat162float(x[i]), __bfloat162float(x[i + half]), cs, sn, &o1, &o2);
            x[i] = __float2bfloat16_rn(o1), x[i + half] = __float2bfloat16_rn(o2);
        } else {
            const int64_t o = (int64_t)(h - nh) * hd, src = n * kvd + o, dst = (b * max_len + lenb[b] + t) * kvd + o;
            rope_rot(__bfloat162float(k[src + i]), __bfloat162float(k[src + i + half]), cs, sn, &o1, &o2);
            kc[dst + i] = __float2bfloat16_rn(o1), kc[dst + i + half] = __float2bfloat16_rn(o2);
            vc[dst + i] = v[src + i], vc[dst + i + half] = v[src + i + half];
        }
    }
}

struct AttArgs {
    int64_t max_len, lc, kps;  // keys per split
    int nh, nkv, hd, nsplit;
    float scale;
};

// Block reductions in a fixed order (deterministic). red: 32 floats of shared memory.
__device__ static float block_max_f(float v, float *red) {
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); i++) r = fmaxf(r, red[i]);
    return r;
}
__device__ static float block_sum_f(float v, float *red) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) r += red[i];
    return r;
}

// ---- the previous attention (DISTILL_DECODE_INVARIANT=0, kept to measure against and to show what the
// invariance test catches): the number of key splits follows the number of (row, head) blocks, so a query's
// softmax sums are grouped differently in a 1-token step and in a (K+1)-token verification.
// One block per (query row, head) x key split: query (b, t) sits at position p = lenb[b] + t and sees keys
// 0..p of its own sequence; split s covers keys [s*kps, (s+1)*kps). Tiles of ATT_THREADS keys: one thread
// per key computes the score, then threads over head dims accumulate p * V (online softmax across tiles).
// Partial (acc [hd], max, sum) per split go to ws [rows, nh, nsplit, hd + 2].
__global__ void __launch_bounds__(ATT_THREADS)
    attn_partial_kernel(const bf16 *q, const bf16 *kc, const bf16 *vc, const int32_t *lenb, AttArgs a, float *ws) {
    __shared__ float qs[MAX_HD];
    __shared__ float ps[ATT_THREADS];
    __shared__ float red[32];
    // block x = row * nh + head: the heads of one KV group run back to back, so their K/V reads share L2
    const int64_t row = blockIdx.x / a.nh;
    const int h = (int)(blockIdx.x % a.nh), s = blockIdx.y, tid = threadIdx.x, hd = a.hd;
    const int64_t b = row / a.lc, t = row % a.lc;
    const int64_t p = (int64_t)lenb[b] + t;
    const int g = h / (a.nh / a.nkv);
    const int64_t kvd = (int64_t)a.nkv * hd;
    for (int i = tid; i < hd; i += ATT_THREADS) qs[i] = __bfloat162float(q[(row * a.nh + h) * hd + i]) * a.scale;
    __syncthreads();
    const bf16 *Kb = kc + b * a.max_len * kvd + (int64_t)g * hd, *Vb = vc + b * a.max_len * kvd + (int64_t)g * hd;
    const int64_t k0 = (int64_t)s * a.kps, k1 = min(k0 + a.kps, p + 1);
    float m = -INFINITY, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int64_t j0 = k0; j0 < k1; j0 += ATT_THREADS) {  // k1 and k0 are block-uniform
        const int64_t j = j0 + tid;
        float sc = -INFINITY;
        if (j < k1) {
            const uint4 *kr = (const uint4 *)(Kb + j * kvd);  // hd % 8 == 0, rows 16-byte aligned
            float dot = 0.0f;
            for (int c = 0; c < hd / 8; c++) {
                const uint4 u = kr[c];
                const bf16 *e = (const bf16 *)&u;
#pragma unroll
                for (int x = 0; x < 8; x++) dot += qs[c * 8 + x] * __bfloat162float(e[x]);
            }
            sc = dot;
        }
        const float mnew = fmaxf(m, block_max_f(sc, red));
        const float pj = j < k1 ? expf(sc - mnew) : 0.0f;
        ps[tid] = pj;
        const float tsum = block_sum_f(pj, red);  // its barriers also publish ps
        const float corr = expf(m - mnew);          // m = -inf at the first tile: 0
        l = l * corr + tsum;
        acc0 *= corr;
        acc1 *= corr;
        m = mnew;
        const int nk = (int)min((int64_t)ATT_THREADS, k1 - j0);
        for (int jj = 0; jj < nk; jj++) {
            const float pv = ps[jj];
            const bf16 *vr = Vb + (j0 + jj) * kvd;
            if (tid < hd) acc0 += pv * __bfloat162float(vr[tid]);
            if (tid + ATT_THREADS < hd) acc1 += pv * __bfloat162float(vr[tid + ATT_THREADS]);
        }
        __syncthreads();  // ps is rewritten by the next tile
    }
    float *o = ws + ((row * a.nh + h) * a.nsplit + s) * (int64_t)(hd + 2);
    if (tid < hd) o[tid] = acc0;
    if (tid + ATT_THREADS < hd) o[tid + ATT_THREADS] = acc1;
    if (tid == 0) o[hd] = m, o[hd + 1] = l;
}

// Combines the splits of (row, head) in split order: out [rows, nh*hd] bf16.
__global__ void attn_combine_kernel(const float *ws, AttArgs a, bf16 *out) {
    const int64_t row = blockIdx.x;
    const int h = blockIdx.y, hd = a.hd;
    const float *o = ws + (row * a.nh + h) * a.nsplit * (int64_t)(hd + 2);
    float M = -INFINITY;
    for (int s = 0; s < a.nsplit; s++) M = fmaxf(M, o[s * (hd + 2) + hd]);
    float L = 0.0f;
    for (int s = 0; s < a.nsplit; s++) {
        const float ms = o[s * (hd + 2) + hd];
        if (ms > -INFINITY) L += o[s * (hd + 2) + hd + 1] * expf(ms - M);
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < a.nsplit; s++) {
            const float ms = o[s * (hd + 2) + hd];
            if (ms > -INFINITY) acc += o[s * (hd + 2) + d] * expf(ms - M);
        }
        out[(row * a.nh + h) * hd + d] = __float2bfloat16(L > 0.0f ? acc / L : 0.0f);
    }
}

// ---- batch-invariant attention (the default). The keys of a query are cut into fixed tiles of ATT_THREADS
// keys (tile i: keys [128 i, 128 i + 128)), whatever the number of query rows, the batch or the context the
// feed was sized for. Each tile gives a softmax partial (its max m, sum l = sum exp(s - m), acc = sum
// exp(s - m) v, every sum in one fixed order); the partials are folded left to right, tile 0 first:
//   (M, L, acc) <- (max(M, m), L e^(M - M') + l e^(m - M'), acc e^(M - M') + a e^(m - M'))
// and out = acc / L. The fold runs either inside one block per (row, head) (attn_tiles_kernel<false>: many
// rows) or across blocks, one per tile, then attn_fold_kernel (few rows: the blocks fill the GPU). Both use
// the same functions with explicit roundings, so the choice never changes a bit.

// e^(M - M') and e^(m - M') for M' = max(M, m): the factors of one fold step.
__device__ __forceinline__ void fold_factors(float M, float m, float &ca, float &cb) {
    const float Mn = fmaxf(M, m);
    ca = expf(__fsub_rn(M, Mn));
    cb = expf(__fsub_rn(m, Mn));
}
__device__ __forceinline__ float fold_one(float x, float ca, float y, float cb) { return __fmaf_rn(x, ca, __fmul_rn(y, cb)); }

#define VSH_HD 128  // head dims up to which attn_tiles_kernel stages a tile's V rows in shared memory (32 KB)
// One block per (query row, head) [x one tile when SPLIT]. SPLIT: the tile's partial (acc [hd], m, l) goes to
// ws [rows, nh, nsplit, hd + 2] (m = -inf for a tile past the query's keys); otherwise the block folds all the
// query's tiles and writes out [rows, nh*hd] bf16.
template <bool SPLIT>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_tiles_kernel(const bf16 *q, const bf16 *kc, const bf16 *vc, const int32_t *lenb, AttArgs a, float *ws,
                      bf16 *out) {
    __shared__ float qs[MAX_HD];
    __shared__ float ps[ATT_THREADS];
    __shared__ float red[32];
    __shared__ __align__(16) bf16 vsh[ATT_THREADS * VSH_HD];
    const int64_t row = blockIdx.x / a.nh;
    const int h = (int)(blockIdx.x % a.nh), tid = threadIdx.x, hd = a.hd;
    const int64_t b = row / a.lc, t = row % a.lc;
    const int64_t p = (int64_t)lenb[b] + t;  // the query's position: it sees keys 0..p
    const int g = h / (a.nh / a.nkv);
    const int64_t kvd = (int64_t)a.nkv * hd;
    for (int i = tid; i < hd; i += ATT_THREADS) qs[i] = __fmul_rn(__bfloat162float(q[(row * a.nh + h) * hd + i]), a.scale);
    __syncthreads();
    const bf16 *Kb = kc + b * a.max_len * kvd + (int64_t)g * hd, *Vb = vc + b * a.max_len * kvd + (int64_t)g * hd;
    const int64_t ntile = p / ATT_THREADS + 1;
    const int64_t tb = SPLIT ? (int64_t)blockIdx.y : 0, te = SPLIT ? (tb + 1 < ntile ? tb + 1 : ntile) : ntile;
    float M = -INFINITY, L = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int64_t tile = tb; tile < te; tile++) {  // block-uniform bounds
        const int64_t j0 = tile * ATT_THREADS, j = j0 + tid;
        float sc = -INFINITY;
        if (j <= p) {
            const uint4 *kr = (const uint4 *)(Kb + j * kvd);  // hd % 8 == 0, rows 16-byte aligned
            float dot = 0.0f;
            for (int c0 = 0; c0 < hd / 8; c0 += 4) {  // 4 loads in flight, then their products in order
                uint4 u[4];
#pragma unroll
                for (int c = 0; c < 4; c++) u[c] = c0 + c < hd / 8 ? kr[c0 + c] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    if (c0 + c >= hd / 8) break;
                    const bf16 *e = (const bf16 *)&u[c];
#pragma unroll
                    for (int x = 0; x < 8; x++) dot = __fmaf_rn(qs[(c0 + c) * 8 + x], __bfloat162float(e[x]), dot);
                }
            }
            sc = dot;
        }
        const float mt = block_max_f(sc, red);  // finite: key j0 <= p is in the tile
        const float pj = j <= p ? expf(__fsub_rn(sc, mt)) : 0.0f;
        ps[tid] = pj;
        const float lt = block_sum_f(pj, red);  // its barriers also publish ps
        const int nk = (int)min((int64_t)ATT_THREADS, p + 1 - j0);
        float a0 = 0.0f, a1 = 0.0f;
        // acc += p_j v_j over the tile's keys in order. hd <= 128: the tile's V rows staged in shared memory by the
        // whole block (16-byte loads, all in flight at once), then read from there; else V elements loaded
        // PV_AHEAD keys at a time so their loads overlap. (One global load per FMA in a chain was latency-bound.)
        constexpr int PV_AHEAD = 16;
        const bool has0 = tid < hd, has1 = tid + ATT_THREADS < hd;
        if (hd <= VSH_HD) {
            const int per = hd / 8;
            for (int e = tid; e < nk * per; e += ATT_THREADS) {
                const int r = e / per, c = e - r * per;
                ((uint4 *)vsh)[e] = *(const uint4 *)(Vb + (j0 + r) * kvd + c * 8);
            }
            __syncthreads();
            if (has0) {
#pragma unroll 8
                for (int jj = 0; jj < nk; jj++) a0 = __fmaf_rn(ps[jj], __bfloat162float(vsh[jj * hd + tid]), a0);
            }
        }
        for (int jb = 0; hd > VSH_HD && jb < nk; jb += PV_AHEAD) {  // (the else of the staged path)
            float v0[PV_AHEAD], v1[PV_AHEAD];
#pragma unroll
            for (int u = 0; u < PV_AHEAD; u++) {
                const bf16 *vr = Vb + (j0 + jb + u) * kvd;
                const bool in = jb + u < nk;
                v0[u] = in && has0 ? __bfloat162float(vr[tid]) : 0.0f;
                v1[u] = in && has1 ? __bfloat162float(vr[tid + ATT_THREADS]) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < PV_AHEAD; u++) {
                if (jb + u >= nk) break;
                const float pv = ps[jb + u];
                if (has0) a0 = __fmaf_rn(pv, v0[u], a0);
                if (has1) a1 = __fmaf_rn(pv, v1[u], a1);
            }
        }
        if (tile == tb) {
            M = mt, L = lt, acc0 = a0, acc1 = a1;
        } else {
            float ca, cb;
            fold_factors(M, mt, ca, cb);
            L = fold_one(L, ca, lt, cb);
            acc0 = fold_one(acc0, ca, a0, cb);
            acc1 = fold_one(acc1, ca, a1, cb);
            M = fmaxf(M, mt);
        }
        __syncthreads();  // ps and red are rewritten by the next tile
    }
    if (SPLIT) {
        float *o = ws + ((row * a.nh + h) * a.nsplit + blockIdx.y) * (int64_t)(hd + 2);
        if (tid < hd) o[tid] = acc0;
        if (tid + ATT_THREADS < hd) o[tid + ATT_THREADS] = acc1;
        if (tid == 0) o[hd] = M, o[hd + 1] = L;
    } else {
        bf16 *o = out + (row * a.nh + h) * hd;
        if (tid < hd) o[tid] = __float2bfloat16_rn(__fdiv_rn(acc0, L));
        if (tid + ATT_THREADS < hd) o[tid + ATT_THREADS] = __float2bfloat16_rn(__fdiv_rn(acc1, L));
    }
}

// The fold of attn_tiles_kernel<true>'s partials, tile 0 first (tile 0 always holds key 0; tiles past the
// query's keys carry m = -inf and are skipped): out [rows, nh*hd] bf16.
__global__ void attn_fold_kernel(const float *ws, AttArgs a, bf16 *out) {
    const int64_t row = blockIdx.x;
    const int h = blockIdx.y, hd = a.hd;
    const float *o = ws + (row * a.nh + h) * a.nsplit * (int64_t)(hd + 2);
    constexpr int AHEAD = 8;  // the partials of 8 tiles loaded before they are folded in (one latency, not 8)
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float M = o[hd], L = o[hd + 1], acc = o[d];
        for (int s0 = 1; s0 < a.nsplit; s0 += AHEAD) {
            float pm[AHEAD], pl[AHEAD], pa[AHEAD];
#pragma unroll
            for (int u = 0; u < AHEAD; u++) {
                const float *os = o + (int64_t)(s0 + u < a.nsplit ? s0 + u : 0) * (hd + 2);
                pm[u] = os[hd], pl[u] = os[hd + 1], pa[u] = os[d];
            }
#pragma unroll
            for (int u = 0; u < AHEAD; u++) {
                if (s0 + u >= a.nsplit) break;
                const float m = pm[u];
                if (!(m > -INFINITY)) continue;
                float ca, cb;
                fold_factors(M, m, ca, cb);
                L = fold_one(L, ca, pl[u], cb);
                acc = fold_one(acc, ca, pa[u], cb);
                M = fmaxf(M, m);
            }
        }
        out[(row * a.nh + h) * hd + d] = __float2bfloat16_rn(__fdiv_rn(acc, L));
    }
}

// ---- GQA attention for many rows (the default for the fold-in-block path; DISTILL_DECODE_ATTN=tiles forces
// attn_tiles_kernel<false> for A/B measurements). One block of ATT_THREADS threads per (query row, KV group):
// the G = nh / nkv query heads that share a KV head read each K row and V row of the tile once (the per-head
// kernel read them G times, through L2), and the P*V of a tile runs over G * HD independent (head, dim)
// chains instead of the hd of one head, reading V from shared memory instead of global memory.
// Per tile of 128 keys:
//   * the tile's V rows go to shared memory with cp.async, issued first so the copy overlaps the scores;
//   * thread tid computes key j0 + tid's score for every head of the group from one read of the K row;
//   * per head, the tile max and sum with the tree of block_max_f / block_sum_f;
//   * thread tid owns W consecutive dims of one head (W = the power of two that brings G * HD chains within
//     ATT_THREADS threads) and accumulates p * V over the tile's keys, then folds the tile into its running
//     (M, L, acc).
// Bits (option (a) of the design brief: no change of arithmetic): for each (query row, head) every value is
// produced by the same operations in the same order as attn_tiles_kernel<false>:
//   q scaled with __fmul_rn; each score one chain of __fmaf_rn over d ascending from 0.0f (the K row's bf16
//   values converted exactly); the tile max = the xor-shuffle tree 16, 8, 4, 2, 1 within each warp of 32 keys,
//   then fmaxf(red[0], red[1]), ... in warp order; p = expf(__fsub_rn(s, m)) for keys <= p, 0 otherwise; the tile
//   sum = the same shuffle tree with +, then 0.0f + red[0] + red[1] + ... in warp order; each output dim one
//   __fmaf_rn chain from 0.0f over the tile's keys in order (keys past the query's position not visited), the
//   bf16 V values copied to shared memory unchanged; tile 0 taken as is and later tiles folded with
//   fold_factors / fold_one; out = bf16_rn(__fdiv_rn(acc, L)). The block is ATT_THREADS = 128 threads, 4 warps,
//   as in the per-head kernel, so the warp-level trees group the same keys. Which block or thread does the
//   work changes no rounding, so the output is bit-identical to attn_tiles_kernel<false> and hence (the same
//   per-tile partials and fold) to attn_tiles_kernel<true> + attn_fold_kernel; gpu_test_decode_inv's "attn"
//   section compares the three bit for bit.
__device__ __forceinline__ void attn_cp_async16(void *smem, const void *gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

// SPLIT: one block per (query row, KV group, tile), each tile's partial per head to ws [rows, nh, nsplit, hd + 2] as
// attn_tiles_kernel<true> writes them (the same values: a tile's partial is computed as above), for attn_fold_kernel.
// Few rows (verification windows of several sequences) then load each K and V tile once per group, not once per head.
template <int G, int HD, bool SPLIT>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_gqa_kernel(const bf16 *q, const bf16 *kc, const bf16 *vc, const int32_t *lenb, AttArgs a, float *ws, bf16 *out) {
    constexpr int NW = ATT_THREADS / 32;                   // warps: 4, as in block_max_f / block_sum_f
    constexpr int NCH = G * HD;                            // (head, dim) chains of the P*V
    constexpr int W = NCH <= ATT_THREADS ? 1 : NCH <= 2 * ATT_THREADS ? 2 : NCH <= 4 * ATT_THREADS ? 4 : 8;
    constexpr int UPH = HD / W, NU = G * UPH;              // threads per head, threads with chains
    constexpr int PST = ATT_THREADS + 4;                   // ps row stride: heads in different banks
    static_assert(HD % 8 == 0 && HD % W == 0 && NU <= ATT_THREADS, "attn_gqa_kernel: bad G / HD");
    __shared__ __align__(16) float qs[G][HD];
    __shared__ float ps[G][PST];
    __shared__ float redm[G][NW], reds[G][NW];
    __shared__ __align__(16) bf16 vs[ATT_THREADS * HD];
    const int64_t row = blockIdx.x / a.nkv;
    const int g = (int)(blockIdx.x % a.nkv), tid = threadIdx.x, lane = tid & 31, wp = tid >> 5;
    const int64_t b = row / a.lc, t = row % a.lc;
    const int64_t p = (int64_t)lenb[b] + t;  // the query's position: it sees keys 0..p
    const int64_t kvd = (int64_t)a.nkv * HD;
    for (int i = tid; i < G * HD; i += ATT_THREADS)  // heads g*G .. g*G + G-1 are the group's
        qs[i / HD][i % HD] = __fmul_rn(__bfloat162float(q[(row * a.nh + (int64_t)g * G) * HD + i]), a.scale);
    __syncthreads();
    const bf16 *Kb = kc + b * a.max_len * kvd + (int64_t)g * HD, *Vb = vc + b * a.max_len * kvd + (int64_t)g * HD;
    const bool own = tid < NU;  // this thread's chains: head hu, dims du .. du + W - 1
    const int hu = own ? tid / UPH : 0, du = own ? (tid % UPH) * W : 0;
    float M = -INFINITY, L = 0.0f, acc[W];
#pragma unroll
    for (int w = 0; w < W; w++) acc[w] = 0.0f;
    const int64_t ntile = p / ATT_THREADS + 1;
    const int64_t tb = SPLIT ? (int64_t)blockIdx.y : 0, te = SPLIT ? (tb + 1 < ntile ? tb + 1 : ntile) : ntile;
    for (int64_t tile = tb; tile < te; tile++) {  // block-uniform bounds
        const int64_t j0 = tile * ATT_THREADS, j = j0 + tid;
        const int nk = (int)min((int64_t)ATT_THREADS, p + 1 - j0);  // the tile's keys <= p
        for (int c = tid; c < nk * (HD / 8); c += ATT_THREADS) {    // rows <= p < max_len only
            const int r = c / (HD / 8), x = c % (HD / 8);
            attn_cp_async16(vs + r * HD + x * 8, Vb + (j0 + r) * kvd + x * 8);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        float sc[G];
#pragma unroll
        for (int h = 0; h < G; h++) sc[h] = -INFINITY;
        if (j <= p) {
            const uint4 *kr = (const uint4 *)(Kb + j * kvd);  // HD % 8 == 0, rows 16-byte aligned
            float dot[G];
#pragma unroll
            for (int h = 0; h < G; h++) dot[h] = 0.0f;
#pragma unroll
            for (int c = 0; c < HD / 8; c++) {
                const uint4 u = kr[c];
                const bf16 *e = (const bf16 *)&u;
#pragma unroll
                for (int x = 0; x < 8; x++) {
                    const float kx = __bfloat162float(e[x]);
#pragma unroll
                    for (int h = 0; h < G; h++) dot[h] = __fmaf_rn(qs[h][c * 8 + x], kx, dot[h]);
                }
            }
#pragma unroll
            for (int h = 0; h < G; h++) sc[h] = dot[h];
        }
        // tile max per head (block_max_f's tree)
#pragma unroll
        for (int h = 0; h < G; h++) {
            float v = sc[h];
            for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
            if (lane == 0) redm[h][wp] = v;
        }
        __syncthreads();
        // p per key and head, tile sum per head (block_sum_f's tree)
#pragma unroll
        for (int h = 0; h < G; h++) {
            float mt = redm[h][0];
            for (int i = 1; i < NW; i++) mt = fmaxf(mt, redm[h][i]);  // finite: key j0 <= p is in the tile
            const float pj = j <= p ? expf(__fsub_rn(sc[h], mt)) : 0.0f;
            ps[h][tid] = pj;
            float v = pj;
            for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) reds[h][wp] = v;
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        __syncthreads();  // publishes ps, reds and the V tile
        float mt = redm[hu][0];
        for (int i = 1; i < NW; i++) mt = fmaxf(mt, redm[hu][i]);
        float lt = 0.0f;
        for (int i = 0; i < NW; i++) lt += reds[hu][i];
        float av[W];
#pragma unroll
        for (int w = 0; w < W; w++) av[w] = 0.0f;
        if (own) {
            const float *pr = ps[hu];
            const bf16 *vr = vs + du;
#pragma unroll 4
            for (int jj = 0; jj < nk; jj++) {
                const float pv = pr[jj];
                float vv[W];
                if (W == 8) {
                    const uint4 u = *(const uint4 *)(vr + jj * HD);
                    const bf16 *e = (const bf16 *)&u;
#pragma unroll
                    for (int w = 0; w < W; w++) vv[w] = __bfloat162float(e[w]);
                } else if (W == 4) {
                    const uint2 u = *(const uint2 *)(vr + jj * HD);
                    const bf16 *e = (const bf16 *)&u;
#pragma unroll
                    for (int w = 0; w < W; w++) vv[w] = __bfloat162float(e[w]);
                } else if (W == 2) {
                    const unsigned u = *(const unsigned *)(vr + jj * HD);
                    const bf16 *e = (const bf16 *)&u;
#pragma unroll
                    for (int w = 0; w < W; w++) vv[w] = __bfloat162float(e[w]);
                } else {
                    vv[0] = __bfloat162float(vr[jj * HD]);
                }
#pragma unroll
                for (int w = 0; w < W; w++) av[w] = __fmaf_rn(pv, vv[w], av[w]);
            }
        }
        if (tile == tb) {
            M = mt, L = lt;
#pragma unroll
            for (int w = 0; w < W; w++) acc[w] = av[w];
        } else {
            float ca, cb;
            fold_factors(M, mt, ca, cb);
            L = fold_one(L, ca, lt, cb);
#pragma unroll
            for (int w = 0; w < W; w++) acc[w] = fold_one(acc[w], ca, av[w], cb);
            M = fmaxf(M, mt);
        }
        __syncthreads();  // vs, ps, redm and reds are rewritten by the next tile
    }
    if (own && SPLIT) {  // a tile past the query's keys leaves m = -inf: the fold skips it
        float *o = ws + ((row * a.nh + (int64_t)g * G + hu) * a.nsplit + blockIdx.y) * (int64_t)(HD + 2);
#pragma unroll
        for (int w = 0; w < W; w++) o[du + w] = acc[w];
        if (du == 0) o[HD] = M, o[HD + 1] = L;
    } else if (own) {
        bf16 *o = out + (row * a.nh + (int64_t)g * G + hu) * HD + du;
#pragma unroll
        for (int w = 0; w < W; w++) o[w] = __float2bfloat16_rn(__fdiv_rn(acc[w], L));
    }
}

// attn_gqa_kernel<G, HD> over nrows query rows when it is instantiated for the model's shape (nh a multiple
// of nkv, G = nh / nkv in {1, 2, 3, 4, 8}, hd 64 or 128): true; false (nothing launched) otherwise. tiles > 0: the
// SPLIT variant, tiles blocks per (row, group), partials into ws (a.nsplit == tiles).
static bool attn_gqa_launch(const bf16 *q, const bf16 *kc, const bf16 *vc, const int32_t *lenb, const AttArgs &a,
                            int64_t nrows, int64_t tiles, float *ws, bf16 *out, cudaStream_t st) {
    if (a.nkv <= 0 || a.nh % a.nkv || nrows * a.nkv <= 0 || nrows * a.nkv >= INT32_MAX) return false;
    const int G = a.nh / a.nkv;
    const unsigned grid = (unsigned)(nrows * a.nkv);
#define GQA_CASE(GG, HH)                                                                                            \
    if (G == GG && a.hd == HH) {                                                                                    \
        if (tiles > 0)                                                                                              \
            attn_gqa_kernel<GG, HH, true><<<dim3(grid, (unsigned)tiles), ATT_THREADS, 0, st>>>(q, kc, vc, lenb, a, ws, out); \
        else                                                                                                        \
            attn_gqa_kernel<GG, HH, false><<<grid, ATT_THREADS, 0, st>>>(q, kc, vc, lenb, a, NULL, out);            \
        return true;                                                                                                \
    }
    GQA_CASE(1, 64)
    GQA_CASE(2, 64)
    GQA_CASE(3, 64)
    GQA_CASE(4, 64)
    GQA_CASE(8, 64)
    GQA_CASE(1, 128)
    GQA_CASE(2, 128)
    GQA_CASE(3, 128)
    GQA_CASE(4, 128)
    GQA_CASE(8, 128)
#undef GQA_CASE
    return false;
}

// The attention's arguments for a model's heads (scale 1/sqrt(hd)); the caller sets kps and nsplit.
static AttArgs att_args(int64_t max_len, int64_t lc, int nh, int nkv, int hd) {
    AttArgs a;
    a.max_len = max_len, a.lc = lc, a.nh = nh, a.nkv = nkv, a.hd = hd;
    a.scale = 1.0f / sqrtf((float)hd);
    a.kps = ATT_THREADS, a.nsplit = 1;
    return a;
}

// The batch-invariant attention on nrows query rows, one of three kernels that give the same bits (partials per
// tile of ATT_THREADS keys, folded in tile order): ATT_TILES one block per (row, head) folding in the block;
// ATT_SPLIT one block per (row, head, tile) into ws [nrows * nh * tiles * (hd + 2)] and attn_fold_kernel;
// ATT_GQA one block per (row, KV group) (false, nothing launched, when it is not instantiated for the shape);
// ATT_GQA_SPLIT one block per (row, KV group, tile) into ws, then attn_fold_kernel (false when not instantiated).
enum { ATT_TILES = 0, ATT_SPLIT = 1, ATT_GQA = 2, ATT_GQA_SPLIT = 3 };
static bool attn_invariant_launch(int kernel, const bf16 *q, const bf16 *kc, const bf16 *vc, const int32_t *lenb,
                                  AttArgs a, int64_t nrows, int64_t tiles, float *ws, bf16 *out, cudaStream_t st) {
    a.kps = ATT_THREADS;
    a.nsplit = kernel == ATT_SPLIT || kernel == ATT_GQA_SPLIT ? (int)tiles : 1;
    if (kernel == ATT_SPLIT || kernel == ATT_GQA_SPLIT) {  // the tiles' partials, then one fold
        if (kernel == ATT_GQA_SPLIT) {
            if (!attn_gqa_launch(q, kc, vc, lenb, a, nrows, tiles, ws, out, st)) return false;
            kernelCheck("attn_gqa_kernel (per tile)");
        } else {
            attn_tiles_kernel<true><<<dim3((unsigned)(nrows * a.nh), (unsigned)tiles), ATT_THREADS, 0, st>>>(q, kc, vc, lenb, a,
                                                                                                            ws, out);
            kernelCheck("attn_tiles_kernel (per tile)");
        }
        attn_fold_kernel<<<dim3((unsigned)nrows, (unsigned)a.nh), a.hd < 128 ? 64 : 128, 0, st>>>(ws, a, out);
        kernelCheck("attn_fold_kernel");
    } else if (kernel == ATT_GQA) {
        if (!attn_gqa_launch(q, kc, vc, lenb, a, nrows, 0, NULL, out, st)) return false;
        kernelCheck("attn_gqa_kernel");
    } else {
        attn_tiles_kernel<false><<<(unsigned)(nrows * a.nh), ATT_THREADS, 0, st>>>(q, kc, vc, lenb, a, NULL, out);
        kernelCheck("attn_tiles_kernel");
    }
    return true;
}

// xr [N, di]: channel c = g*N + n reads xs[(g / rep)*N + n] (repeat_kv over groups of d_state channels).
__global__ void repeat_kernel(bf16 *xr, const bf16 *xs, int64_t N, int64_t di, int64_t dxb, int64_t ds) {
    const int64_t total = N * di, rep = di / dxb;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / di, c = i % di, g = c / ds, n = c % ds;
        xr[i] = xs[t * dxb + (g / rep) * ds + n];
    }
}

#define CONV_W_MAX 4  // decoder_cuda_new refuses d_conv > 4
// Conv window [nb, W-1, C] of sequence b, channel c advanced past the first kp of the K new inputs x [nb, K, C]:
// entry j becomes element kp + j of the sequence (old window src, then x), written to win. Everything is read
// before anything is written, so src may be win. One function for both kernels below, so that they give the same bits.
__device__ __forceinline__ void conv_window_advance(bf16 *win, const bf16 *src, const bf16 *x, int64_t b, int64_t c,
                                                    int64_t kp, int64_t K, int64_t C, int W) {
    bf16 nv[CONV_W_MAX - 1];
#pragma unroll
    for (int j = 0; j < CONV_W_MAX - 1; j++) {
        const int64_t e = kp + j;  // index into (window[0..W-2], x[0..K-1])
        if (j < W - 1) nv[j] = e < W - 1 ? src[(b * (W - 1) + e) * C + c] : x[(b * K + (e - (W - 1))) * C + c];
    }
#pragma unroll
    for (int j = 0; j < CONV_W_MAX - 1; j++)
        if (j < W - 1) win[(b * (W - 1) + j) * C + c] = nv[j];
}

// conv_window_advance for every (b, c) past keep[b] inputs (the replay reads the window-start copy as src).
// blockIdx.y = layer (the replay's Mamba layers in one launch): win, src and x advanced by ws, ws and xs elements
// per layer.
__global__ void conv_advance_kernel(bf16 *win, const bf16 *src, const bf16 *x, const int32_t *keep, int64_t nb,
                                    int64_t K, int64_t C, int W, int64_t ws = 0, int64_t xs = 0) {
    const int64_t total = nb * C;
    win += blockIdx.y * ws, src += blockIdx.y * ws, x += blockIdx.y * xs;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
        conv_window_advance(win, src, x, i / C, i % C, keep[i / C], K, C, W);
}

#define CONV_STEP_MAX 64  // chunks up to this many tokens take conv_step_kernel (one thread walks a channel's tokens)
// repeat_kernel, conv1d_silu_fwd_cuda (with the window as x_prev) and conv_advance_kernel in one launch for the few
// tokens of a step or a verification window, the same bits: one thread per (b, channel c) walks the chunk's lc
// tokens, reading x through the repeat map (xs [nb*lc, dxb] -> xr [nb*lc, di], kept for the speculative window's
// store), computing bias + the W taps oldest first with fmaf and silu by sigmoid_dev as the conv kernel does, then
// moves the window past keep[b] inputs (conv_window_advance, as conv_advance_kernel).
template <int W>
__global__ void conv_step_kernel(bf16 *win, const bf16 *xs, bf16 *xr, bf16 *xc, const float *w, const float *bias,
                                 const int32_t *keep, int64_t nb, int64_t lc, int64_t C, int64_t dxb, int64_t ds) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= nb * C) return;
    const int64_t b = i / C, c = i % C, rep = C / dxb, sc = (c / ds / rep) * ds + c % ds;
    float wk[W], xw[W];
#pragma unroll
    for (int k = 0; k < W; k++) wk[k] = w[c * W + k];
    const float bs = bias ? bias[c] : 0.f;
#pragma unroll
    for (int k = 1; k < W; k++) xw[k] = __bfloat162float(win[(b * (W - 1) + k - 1) * C + c]);
    for (int64_t t = 0; t < lc; t++) {
        const bf16 x = xs[(b * lc + t) * dxb + sc];
        xr[(b * lc + t) * C + c] = x;
#pragma unroll
        for (int k = 0; k < W - 1; k++) xw[k] = xw[k + 1];
        xw[W - 1] = __bfloat162float(x);
        float a = bs;
#pragma unroll
        for (int k = 0; k < W; k++) a = fmaf(wk[k], xw[k], a);
        xc[(b * lc + t) * C + c] = __float2bfloat16_rn(a * sigmoid_dev(a));
    }
    conv_window_advance(win, win, xr, b, c, keep[b], lc, C, W);
}

// last [b] = x [idx[b]] for idx[b] >= 0 (the row of sequence b's last fed token in this chunk).
__global__ void gather_last_kernel(bf16 *last, const bf16 *x, const int32_t *idx, int64_t nb, int64_t d) {
    const int64_t total = nb * d;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = i / d, c = i % d;
        if (idx[b] >= 0) last[i] = x[(int64_t)idx[b] * d + c];
    }
}

// Pick i of a greedy chain (decoder_cuda_greedy_chain): out [nb, n] gets each sequence's argmax am [nb]; when a
// feed follows, that token becomes its input (ints: tok [rows], pos [rows], keep, lastidx, lenb [B] each, window
// offset [1]; a one-token feed uses tok[b], pos[b]) and, after the chain's first feed, the position, the length
// and the window offset move on by one (the first feed's come from the host's upload).
__global__ void chain_pick_kernel(int32_t *ints, int64_t rows, int64_t B, int64_t nb, const int32_t *am, int32_t *out,
                                  int n, int i, int feed, int advance) {
    const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (b >= nb) return;
    out[b * n + i] = am[b];
    if (!feed) return;
    ints[b] = am[b];
    if (!advance) return;
    ints[rows + b] += 1;
    ints[2 * rows + 2 * B + b] += 1;
    if (b == 0) ints[2 * rows + 3 * B] += 1;
}

// A trimmed head (decoder_cuda_set_head_ids): its kept rows gathered once, hw [np, d] <- head [hid[j], d].
__global__ void head_gather_kernel(bf16 *hw, const bf16 *head, const int32_t *hid, int64_t np, int64_t d) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < np * d; i += (int64_t)gridDim.x * blockDim.x)
        hw[i] = head[(int64_t)hid[i / d] * d + i % d];
}
// ... and after each head GEMM every logits row is rewritten whole: column v gets the GEMM's column hpos[v], or -inf
// where hpos[v] < 0 (not kept). logits [rows, V] (row stride V), hout [rows, hp].
__global__ void head_expand_kernel(float *logits, const float *hout, const int32_t *hpos, int64_t rows, int64_t V, int64_t hp) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * V; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / V;
        const int32_t j = hpos[i % V];
        logits[i] = j >= 0 ? hout[r * hp + j] : -INFINITY;
    }
}

// The window's copy of a Mamba layer's per-token inputs: array a (blockIdx.y) of the chunk, src [nb*lc, C],
// goes to dst [B, cap, C] at columns ofs[0] + t (ofs on the device, so a captured graph reads it per launch).
struct WinStore {
    const bf16 *src[4];
    bf16 *dst[4];
    int64_t C[4];
};
__global__ void win_store_kernel(WinStore w, const int32_t *ofs, int64_t nb, int64_t lc, int64_t cap) {
    const int a = blockIdx.y;
    const int64_t C = w.C[a], total = nb * lc * C, o = ofs[0];
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / C, c = i % C, b = row / lc, t = row % lc;
        w.dst[a][(b * cap + o + t) * C + c] = w.src[a][i];
    }
}

// One sequence's Mamba state per layer: the SSM state (fp32) and the conv window (bf16), in elements.
static int64_t ssm_per_seq(const HybridConfig *h) { return h->d_inner * h->d_state; }
static int64_t conv_per_seq(const HybridConfig *h) { return (h->d_conv > 1 ? h->d_conv - 1 : 1) * h->d_inner; }
// One Mamba-1 layer's fp32 parameters in w32 (conv weight and bias, A, D, dt bias), the layers' slabs consecutive in
// layer order, and its window inputs per token (xr, xc, dt [di], B [dxb]): the replay's per-layer strides follow.
static int64_t w32_per_layer(const HybridConfig *h) { return h->d_inner * (h->d_conv + 3 + h->d_state); }
static int64_t window_per_tok(const HybridConfig *h) { return 3 * h->d_inner + h->d_xb; }

static unsigned grid_of(int64_t n, int threads) {
    int64_t g = (n + threads - 1) / threads;
    return (unsigned)(g < 1 ? 1 : g > 65535 * 8 ? 65535 * 8 : g);
}

// decoder_cuda_accept_from: sequence b (blockIdx.z) with src[b] != b takes its source's window. Keys and values of
// cache blockIdx.y (kv [2 * n_layer], NULL for Mamba layers) at positions len0[b] .. len0[b] + keep[b] - 1 (keep:
// already the source's); sb = [src | len0], [B] each.
__global__ void kv_take_kernel(bf16 *const *kv, const int32_t *sb, const int32_t *keep, int64_t B, int64_t max_len, int64_t kvd) {
    const int64_t b = blockIdx.z, j = sb[b];
    bf16 *p = kv[blockIdx.y];
    if (!p || j == b) return;
    const int64_t o = sb[B + b] * kvd, n = keep[b] * kvd;
    bf16 *dst = p + b * max_len * kvd + o;
    const bf16 *src = p + j * max_len * kvd + o;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) dst[i] = src[i];
}
// ... and the four window input arrays of Mamba layer blockIdx.y (wbuf [n_m][4 arrays [B, cap, C]]), wlen columns.
__global__ void win_take_kernel(bf16 *wbuf, const int32_t *sb, int64_t B, int64_t cap, int64_t wlen, int64_t di, int64_t dxb) {
    const int64_t b = blockIdx.z, j = sb[b];
    if (j == b) return;
    bf16 *base = wbuf + blockIdx.y * B * cap * (3 * di + dxb);
    const int64_t n3 = 3 * wlen * di, total = n3 + wlen * dxb;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t o0, r;
        if (i < n3) {  // xr, xc, dt: [B, cap, di] each
            const int64_t a = i / (wlen * di);
            r = i % (wlen * di), o0 = a * B * cap * di;
            base[o0 + b * cap * di + r] = base[o0 + j * cap * di + r];
        } else {       // B: [B, cap, dxb]
            r = i - n3, o0 = 3 * B * cap * di;
            base[o0 + b * cap * dxb + r] = base[o0 + j * cap * dxb + r];
        }
    }
}

// ---------------------------------------------------------------- the decoder

typedef struct {
    int kind;
    int64_t in_norm, post_norm, gate, up, down;  // bf16 element offsets into w
    bool fused_gu;
    int64_t q, k, v, o;                          // attention
    bf16 *kc, *vc;                               // [B, max_len, kvd]
    int64_t z, x, Bp, Cp, dtd, dtw, dtb, out;    // Mamba (dtd / dtw: the padded copies)
    float *cw, *cb, *A, *D, *dtb32;              // Mamba fp32 (device, into w32)
    float *ssm;                                  // [B, di, ds] (a slice of ssm_all)
    bf16 *conv;                                  // [B, W-1, di] (a slice of conv_all)
    int mi;                                      // Mamba layer index (slices of the *_all buffers)
    bf16 *w_xr, *w_xc, *w_dt, *w_B;              // window inputs [B, wcap, di] (B: [B, wcap, dxb])
} DLayer;

#define MAX_GRAPHS 8
#define GRAPH_MAX_L 32
#define CHAIN_MAX 16  // picks per decoder_cuda_greedy_chain call
#define BRANCH_MAX 8  // decoder_cuda_branch_chain's W (rank_rows_cuda's RANK_MAX)
// a chain's graph key: 2 * picks + feed_last + CHAIN_KEY_W * (W - 1)
#define CHAIN_KEY_W 64
struct GraphEntry {
    cudaGraphExec_t ex;
    int64_t nb, lc;
    int all, win;
    int chain;  // 0: one feed's pass; else a greedy chain, 2 * picks + feed_last + CHAIN_KEY_W * (W - 1)
};

struct DecoderCuda {
    HybridConfig h;
    int64_t B, nb, max_len, rows, Rp;
    cudaStream_t st;
    DlGemm *gemm;
    bf16 *w;          // registry copy, then the padded dt weights
    float *w32;       // fp32 Mamba tensors
    int64_t emb, fnorm, head;
    DLayer *L;
    float *inv_freq;  // device [hd/2]
    int64_t *len;     // host [B]
    // scratch, [rows, ...]
    bf16 *x, *xn, *mid, *q, *k, *v, *att, *gu, *act, *mix, *z, *xs, *Bs, *Cs, *dtl, *dt, *xr, *xc, *y;
    bf16 *last, *lastn;  // [B, d]
    int32_t *ints;       // device: tok [rows], pos [rows], keep [B], lastidx [B], lenb [B], window offset [1]
    int32_t *hints;      // host mirror
    float *att_ws;
    int64_t att_ws_elems;
    float *logits;       // [lcap, V]: the last feed's lrows rows
    // trimmed head (decoder_cuda_set_head_ids; hn 0: the full head): hw [hp, d] the kept ids' head rows in ascending
    // id order (hp: hn rounded up to a multiple of 8 by repeating the last), hout [lcap, hp] the GEMM's output, hpos [V]
    // each id's column in it or -1
    int64_t hn, hp;
    int32_t *hpos;
    bf16 *hw;
    float *hout;
    int64_t lrows, lcap;
    uint64_t *s_u64;     // sampling: stream [B], counter [B]
    int32_t *s_out;      // [B]
    int32_t *am_out;     // argmax: [lcap]
    uint64_t *am_u64;    // [lcap] zeros (the sampler's stream / counter, unused when greedy)
    void *am_ws;         // argmax_rows_workspace(lcap, V), zeroed
    void *rk_ws;         // rank_rows_workspace(B, V), zeroed: a branch chain's first picks
    int32_t *chain_out;  // [B, CHAIN_MAX]: a greedy chain's picks ([nb, n] of the last chain)
    int chain_kept;      // picks of the last chain left on the device (out NULL) for another decoder's feed; else 0
    cudaEvent_t chain_ev;  // recorded after such a chain: the reading decoder's stream waits on it
    int32_t *pin_tok;    // pinned host [rows]: a picks feed's tokens on their way back (decoder_cuda_argmax_fed)
    int64_t picks_L;     // tokens per sequence of the last decoder_cuda_feed_picks (0: the last feed was another)
    bool chain;          // greedy chains in one launch (default; DISTILL_DECODE_CHAIN=0: a host round trip per pick)
    bool gemm_multi;     // q/k/v and the Mamba input projections in one launch each (default; DISTILL_DECODE_MULTI=0:
                         // one per output, the same bits, for A/B timing)
    int fuse;            // bit 0: rope + KV append in one launch; bit 1: the SwiGLU as the gate | up GEMM's epilogue;
                         // bit 2: repeat, conv and conv advance in one launch for chunks of <= CONV_STEP_MAX tokens;
                         // bit 3: greedy picks of <= ARGMAX_SPLIT_ROWS rows by several blocks per row;
                         // bit 4: speculative windows: a window's first feed writes the Mamba layers' window inputs
                         // in place when the layouts agree (wdirect; no win_store_kernel), accept replays all Mamba
                         // layers in one launch of the scan and one of the conv advance
                         // (default 31; DISTILL_DECODE_FUSE=0: the previous kernels, the same ids and bits, for A/B)
    int n_sm;
    bool invariant;      // batch-invariant arithmetic (default; DISTILL_DECODE_INVARIANT=0: cuBLASLt + row-dependent splits)
    bool attn_gqa;       // many rows: attn_gqa_kernel where instantiated (default; DISTILL_DECODE_ATTN=tiles: attn_tiles_kernel)
    double bytes;
    // Mamba states of all layers [n_m, B, ...] in one buffer each, and their window-start copies
    int n_m;
    float *ssm_all, *ssm0_all;
    bf16 *conv_all, *conv0_all;
    // speculative window: open flag, tokens fed since it opened, capacity of the input buffers
    bool win;
    bool wdirect;        // this feed (the window's first, one chunk, one sequence or wcap == L) writes the window
                         // inputs in place
    int64_t wlen, wcap;
    int64_t *len0;       // host [B]: lengths at the window start
    bf16 *wbuf;          // per Mamba layer the 4 input arrays [B, wcap, .]
    int32_t *acc_keep;   // device [3 * B]: keep per sequence, then decoder_cuda_accept_from's sources and window starts
    int32_t *acc_src;    // acc_keep + B
    void **kv_ptr;       // device [2 * n_layer]: each attention layer's kc, vc (NULL for the others)
    // CUDA graphs (DISTILL_DECODE_GRAPH=1 or decoder_cuda_use_graph): short single-chunk feeds replay a graph of
    // the whole pass, one per (nb, L, all, win); the attention split is then sized for max_len, so no kernel
    // argument changes between launches (per-feed data comes through D->ints)
    bool use_graph;
    GraphEntry g[MAX_GRAPHS];
    int ng, gnext;
    GraphEntry rg[MAX_GRAPHS];  // accept's replay, per (nb, wcap) (lc = wcap)
    int nrg;
};

#define EA err, sizeof err
#define TCK(call)                                                                                                 \
    do {                                                                                                          \
        char err[256] = "";                                                                                       \
        if ((call) != 0) {                                                                                        \
            fprintf(stderr, "decode_cuda: %s\n", err);                                                            \
            exit(DL_EXIT_RUNTIME);                                                                                \
        }                                                                                                         \
    } while (0)

static void *dalloc(DecoderCuda *D, size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 16;
    cudaCheck(cudaMalloc(&p, bytes));
    cudaCheck(cudaMemset(p, 0, bytes));
    cudaCheck(cudaDeviceSynchronize());  // the legacy-stream memset does not order against the decoder's stream
    D->bytes += (double)bytes;
    return p;
}

static int lookup(const Registry *r, int64_t numel, DlError *e, int64_t *off, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int i = reg_vlookup(r, numel, "decoder_cuda", e, fmt, ap);
    va_end(ap);
    if (i < 0) return -1;
    *off = r->t[i].offset;
    return 0;
}

static bf16 *W(const DecoderCuda *D, int64_t off) { return D->w + off; }

// y [N, O] (+)= x [N, In] @ W^T (+ bias): the batch-invariant GEMM, or cuBLASLt with the legacy arithmetic.
static void lin(DecoderCuda *D, void *y, const void *x, int64_t woff, const void *bias, int64_t N, int64_t In, int64_t O,
                int acc) {
    if (D->invariant) TCK(decode_gemm(DT_BF16, y, x, W(D, woff), bias, N, O, In, acc, D->st, EA));
    else TCK(dl_linear_fwd(D->gemm, DT_BF16, y, x, W(D, woff), bias, N, In, O, acc, D->st, EA));
}

// Several products of the same rows x [N, In]: y[i] [N, O[i]] = x @ W(woff[i])^T, no bias. With the batch-invariant
// arithmetic one launch (decode_gemm_multi: the same bits as a lin per output, fewer launches per step), else a lin
// each.
static void lin_multi(DecoderCuda *D, const void *x, int64_t N, int64_t In, int n, void *const *y, const int64_t *woff,
                      const int64_t *O) {
    if (!D->invariant || !D->gemm_multi) {
        for (int i = 0; i < n; i++) lin(D, y[i], x, woff[i], NULL, N, In, O[i], 0);
        return;
    }
    DecodeGemmOut outs[DECODE_GEMM_MAX_OUTS];
    for (int i = 0; i < n; i++) outs[i] = (DecodeGemmOut){y[i], W(D, woff[i]), NULL, O[i]};
    TCK(decode_gemm_multi(DT_BF16, outs, n, x, N, In, D->st, EA));
}

// fp32 logits [rows, V] (row stride V) of the normed rows x [rows, d]; with a trimmed head the kept ids' columns get
// the same values (a GEMM element's arithmetic depends on K alone) and every other column -inf.
static void head_gemm(DecoderCuda *D, float *logits, const bf16 *x, int64_t rows) {
    const int64_t V = D->h.base.vocab, d = D->h.base.d_model, N = D->hn ? D->hp : V;
    const bf16 *Wh = D->hn ? D->hw : W(D, D->head);
    float *y = D->hn ? D->hout : logits;
    if (D->invariant) TCK(decode_gemm(DT_F32, y, x, Wh, NULL, rows, N, d, 0, D->st, EA));
    else TCK(dl_gemm(D->gemm, (int)rows, (int)N, (int)d, DT_BF16, x, 0, Wh, 1, DT_F32, y, NULL, 1.0f, 0.0f, D->st, EA));
    if (D->hn) {
        head_expand_kernel<<<grid_of(rows * V, 256), 256, 0, D->st>>>(logits, D->hout, D->hpos, rows, V, D->hp);
        kernelCheck("head_expand_kernel");
    }
}

void decoder_cuda_free(DecoderCuda *D) {
    if (!D) return;
    cudaDeviceSynchronize();
    if (D->L) {
        for (int l = 0; l < D->h.base.n_layer; l++) cudaFree(D->L[l].kc), cudaFree(D->L[l].vc);
    }
    void *bufs[] = {D->w, D->w32, D->inv_freq, D->x, D->xn, D->mid, D->q, D->k, D->v, D->att, D->gu, D->act, D->mix,
                    D->z, D->xs, D->Bs, D->Cs, D->dtl, D->dt, D->xr, D->xc, D->y, D->last, D->lastn, D->ints,
                    D->att_ws, D->logits, D->s_u64, D->s_out, D->am_out, D->am_u64, D->am_ws, D->rk_ws, D->chain_out, D->ssm_all, D->ssm0_all,
                    D->conv_all, D->conv0_all, D->wbuf, D->acc_keep, D->kv_ptr, D->hpos, D->hw, D->hout};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) cudaFree(bufs[i]);
    for (int i = 0; i < D->ng; i++) cudaGraphExecDestroy(D->g[i].ex);
    for (int i = 0; i < D->nrg; i++) cudaGraphExecDestroy(D->rg[i].ex);
    if (D->gemm) dl_gemm_free(D->gemm);
    if (D->st) cudaStreamDestroy(D->st);
    if (D->chain_ev) cudaEventDestroy(D->chain_ev);
    if (D->pin_tok) cudaFreeHost(D->pin_tok);
    free(D->L);
    free(D->len);
    free(D->len0);
    free(D->hints);
    free(D);
}

DecoderCuda *decoder_cuda_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t max_len,
                              FILE *log, DlError *e) {
    const LlamaConfig *c = &h->base;
    const int64_t d = c->d_model, ff = c->d_ff, V = c->vocab, hd = c->head_dim;
    const int64_t qd = (int64_t)c->n_head * hd, kvd = (int64_t)c->n_kv_head * hd;
    const int64_t di = h->d_inner, dxb = h->d_xb, ds = h->d_state, R = h->dt_rank, Wc = h->d_conv;
    bool any_m = false;
    if (B <= 0 || max_len <= 0 || max_len >= INT32_MAX / 2 || B > INT32_MAX / 2) {
        dl_fail(e, "decoder_cuda: batch %lld x length %lld outside 1..2^30", (long long)B, (long long)max_len);
        return NULL;
    }
    if (d % 8 || ff % 8 || V % 8 || hd % 8 || hd > MAX_HD || c->n_head % c->n_kv_head) {
        dl_fail(e, "decoder_cuda: d_model %lld, d_ff %lld, vocab %lld and head_dim %lld must be multiples of 8, head_dim "
                   "<= %d, heads %d a multiple of kv heads %d",
                (long long)d, (long long)ff, (long long)V, (long long)hd, MAX_HD, c->n_head, c->n_kv_head);
        return NULL;
    }
    for (int l = 0; l < c->n_layer; l++) {
        if (h->mixer[l] == MIXER_MAMBA2) {
            dl_fail(e, "decoder_cuda: layer %d is a Mamba-2 layer: the CUDA decoder supports attention and Mamba-1 "
                       "layers only (decode this model on the CPU: run.device = \"cpu\")", l);
            return NULL;
        }
        any_m = any_m || h->mixer[l] == MIXER_MAMBA1;
    }
    if (any_m && (di % ds || dxb % ds || di % dxb || di % 8 || dxb % 8 || Wc < 1 || Wc > 4 ||
                  !(ds == 4 || ds == 8 || ds == 16 || ds == 32))) {
        dl_fail(e, "decoder_cuda: Mamba dims d_inner %lld, d_xb %lld, d_state %lld, d_conv %lld: need multiples of 8, "
                   "d_state in {4, 8, 16, 32} dividing both, d_conv 1..4",
                (long long)di, (long long)dxb, (long long)ds, (long long)Wc);
        return NULL;
    }
    DecoderCuda *D = (DecoderCuda *)calloc(1, sizeof *D);
    D->h = *h;
    D->B = D->nb = B;
    D->max_len = max_len;
    D->Rp = (R + 7) / 8 * 8;
    D->L = (DLayer *)calloc((size_t)c->n_layer, sizeof(DLayer));
    D->len = (int64_t *)calloc((size_t)B, sizeof(int64_t));
    D->len0 = (int64_t *)calloc((size_t)B, sizeof(int64_t));
    // weight offsets
    int bad = lookup(r, V * d, e, &D->emb, "model.embed_tokens.weight") || lookup(r, d, e, &D->fnorm, "model.norm.weight");
    if (!bad) {
        if (c->tied_embeddings) D->head = D->emb;
        else bad = lookup(r, V * d, e, &D->head, "lm_head.weight");
    }
    int64_t pad_at = (r->numel + 15) / 16 * 16, pad_n = 0;  // padded dt weights after the registry copy
    for (int l = 0; l < c->n_layer && !bad; l++) {
        DLayer *L = &D->L[l];
        L->kind = h->mixer[l];
        bad = lookup(r, d, e, &L->in_norm, "model.layers.%d.input_layernorm.weight", l) ||
              lookup(r, d, e, &L->post_norm, "model.layers.%d.post_attention_layernorm.weight", l) ||
              lookup(r, ff * d, e, &L->gate, "model.layers.%d.mlp.gate_proj.weight", l) ||
              lookup(r, ff * d, e, &L->up, "model.layers.%d.mlp.up_proj.weight", l) ||
              lookup(r, d * ff, e, &L->down, "model.layers.%d.mlp.down_proj.weight", l);
        if (bad) break;
        L->fused_gu = L->up == L->gate + ff * d;
        if (L->kind == MIXER_ATTN) {
            bad = lookup(r, qd * d, e, &L->q, "model.layers.%d.self_attn.q_proj.weight", l) ||
                  lookup(r, kvd * d, e, &L->k, "model.layers.%d.self_attn.k_proj.weight", l) ||
                  lookup(r, kvd * d, e, &L->v, "model.layers.%d.self_attn.v_proj.weight", l) ||
                  lookup(r, d * qd, e, &L->o, "model.layers.%d.self_attn.o_proj.weight", l);
        } else {
            int64_t dtd, dtw;
            bad = lookup(r, di * d, e, &L->z, "model.layers.%d.mamba.in_proj_z.weight", l) ||
                  lookup(r, dxb * d, e, &L->x, "model.layers.%d.mamba.in_proj_x.weight", l) ||
                  lookup(r, dxb * d, e, &L->Bp, "model.layers.%d.mamba.B_proj.weight", l) ||
                  lookup(r, di * d, e, &L->Cp, "model.layers.%d.mamba.C_proj.weight", l) ||
                  lookup(r, R * d, e, &dtd, "model.layers.%d.mamba.dt_proj_down.weight", l) ||
                  lookup(r, di * R, e, &dtw, "model.layers.%d.mamba.dt_proj.weight", l) ||
                  lookup(r, di, e, &L->dtb, "model.layers.%d.mamba.dt_proj.bias", l) ||
                  lookup(r, di * d, e, &L->out, "model.layers.%d.mamba.out_proj.weight", l);
            int64_t t;
            bad = bad || lookup(r, di * Wc, e, &t, "model.layers.%d.mamba.conv1d.weight", l) ||
                  lookup(r, di, e, &t, "model.layers.%d.mamba.conv1d.bias", l) ||
                  lookup(r, di * ds, e, &t, "model.layers.%d.mamba.A_log", l) ||
                  lookup(r, di, e, &t, "model.layers.%d.mamba.D", l);
            L->dtd = pad_at + pad_n;  // [Rp, d]
            pad_n += (D->Rp * d + 15) / 16 * 16;
            L->dtw = pad_at + pad_n;  // [di, Rp]
            pad_n += (di * D->Rp + 15) / 16 * 16;
            (void)dtd, (void)dtw;
        }
    }
    if (bad) {
        decoder_cuda_free(D);
        return NULL;
    }
    // size the scratch: up to `rows` tokens per pass (>= B), about 256 MiB of activations
    const int64_t per_row = 3 * d + 2 * qd + 2 * kvd + 3 * ff + 2 * d + (any_m ? 6 * di + 2 * dxb + D->Rp : 0);
    int64_t rows = (256ll << 20) / (per_row * 2);
    rows = rows < B ? B : rows;
    if (rows > B * max_len) rows = B * max_len;
    if (rows > (1ll << 20) && B <= (1ll << 20)) rows = 1ll << 20;
    const char *env = getenv("DISTILL_DECODE_ROWS");  // tests: force chunked prefills
    if (env && atoll(env) > 0) rows = atoll(env) < B ? B : (atoll(env) > rows ? rows : atoll(env));
    D->rows = rows;
    if (rows * c->n_head >= INT32_MAX) {  // attention grid: one block per (row, head)
        dl_fail(e, "decoder_cuda: batch %lld x %d heads is too large", (long long)B, c->n_head);
        decoder_cuda_free(D);
        return NULL;
    }
    // memory check before allocating
    size_t free_b = 0, total_b = 0;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    double need = (double)(pad_at + pad_n) * 2 + (double)rows * per_row * 2;
    for (int l = 0; l < c->n_layer; l++)
        need += D->L[l].kind == MIXER_ATTN ? 2.0 * B * max_len * kvd * 2 : 2.0 * B * di * (ds * 4 + (Wc - 1) * 2);  // + window copy
    if (need > (double)free_b * 0.95) {
        dl_fail(e, "decoder_cuda: needs %.2f GiB of GPU memory for batch %lld x context %lld, %.2f GiB free: lower "
                   "batch_size or max_new_tokens",
                need / 1073741824.0, (long long)B, (long long)max_len, free_b / 1073741824.0);
        decoder_cuda_free(D);
        return NULL;
    }
    cudaCheck(cudaStreamCreateWithFlags(&D->st, cudaStreamNonBlocking));
    char gerr[256] = "";
    D->gemm = dl_gemm_new(0, gerr, sizeof gerr);
    if (!D->gemm) {
        dl_fail(e, "decoder_cuda: %s", gerr);
        decoder_cuda_free(D);
        return NULL;
    }
    int dev = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetAttribute(&D->n_sm, cudaDevAttrMultiProcessorCount, dev));
    const char *cenv = getenv("DISTILL_DECODE_CHAIN");
    D->chain = !(cenv && !strcmp(cenv, "0"));
    const char *menv = getenv("DISTILL_DECODE_MULTI");
    D->gemm_multi = !(menv && !strcmp(menv, "0"));
    const char *fenv = getenv("DISTILL_DECODE_FUSE");
    D->fuse = fenv && *fenv ? atoi(fenv) & 31 : 31;
    const char *genv = getenv("DISTILL_DECODE_GRAPH");
    D->use_graph = genv && atoi(genv) > 0;
    const char *ienv = getenv("DISTILL_DECODE_INVARIANT");
    D->invariant = !(ienv && !strcmp(ienv, "0"));
    const char *aenv = getenv("DISTILL_DECODE_ATTN");  // "tiles": the per-(row, head) kernel (same bits, A/B timing)
    D->attn_gqa = !(aenv && !strcmp(aenv, "tiles"));

    // ---- weights: host fp32 -> bf16 through a staging buffer; padded dt weights built on the host
    D->w = (bf16 *)dalloc(D, (size_t)(pad_at + pad_n) * 2);
    {
        const int64_t n = r->numel, chunk = n < (16ll << 20) ? n : (16ll << 20);
        float *stage = (float *)dalloc(D, (size_t)chunk * 4);
        for (int64_t i = 0; i < n; i += chunk) {
            const int64_t k = n - i < chunk ? n - i : chunk;
            cudaCheck(cudaMemcpyAsync(stage, params + i, (size_t)k * 4, cudaMemcpyHostToDevice, D->st));
            TCK(convert_cuda(DT_BF16, D->w + i, DT_F32, stage, k, D->st, EA));
        }
        if (pad_n) {
            float *hp = (float *)calloc((size_t)pad_n, sizeof(float));
            for (int l = 0; l < c->n_layer; l++) {
                if (D->L[l].kind != MIXER_MAMBA1) continue;
                int64_t dtd, dtw;
                lookup(r, R * d, e, &dtd, "model.layers.%d.mamba.dt_proj_down.weight", l);
                lookup(r, di * R, e, &dtw, "model.layers.%d.mamba.dt_proj.weight", l);
                memcpy(hp + (D->L[l].dtd - pad_at), params + dtd, (size_t)(R * d) * 4);  // rows R..Rp-1 zero
                for (int64_t ci = 0; ci < di; ci++)
                    memcpy(hp + (D->L[l].dtw - pad_at) + ci * D->Rp, params + dtw + ci * R, (size_t)R * 4);
            }
            float *stage2 = (float *)dalloc(D, (size_t)pad_n * 4);
            cudaCheck(cudaStreamSynchronize(D->st));
            cudaCheck(cudaMemcpyAsync(stage2, hp, (size_t)pad_n * 4, cudaMemcpyHostToDevice, D->st));
            TCK(convert_cuda(DT_BF16, D->w + pad_at, DT_F32, stage2, pad_n, D->st, EA));
            cudaCheck(cudaStreamSynchronize(D->st));
            cudaCheck(cudaFree(stage2));
            D->bytes -= (double)pad_n * 4;
            free(hp);
        }
        cudaCheck(cudaStreamSynchronize(D->st));
        cudaCheck(cudaFree(stage));
        D->bytes -= (double)chunk * 4;
    }
    // fp32 Mamba tensors: conv weight [di, W], conv bias, A = -exp(A_log) [di, ds], D, dt bias
    int64_t n32 = 0;
    for (int l = 0; l < c->n_layer; l++)
        if (D->L[l].kind == MIXER_MAMBA1) n32 += w32_per_layer(h);
    if (n32) {
        float *hp = (float *)malloc((size_t)n32 * 4);
        D->w32 = (float *)dalloc(D, (size_t)n32 * 4);
        int64_t at = 0;
        for (int l = 0; l < c->n_layer; l++) {
            DLayer *L = &D->L[l];
            if (L->kind != MIXER_MAMBA1) continue;
            int64_t ocw, ocb, oal, oD;
            lookup(r, di * Wc, e, &ocw, "model.layers.%d.mamba.conv1d.weight", l);
            lookup(r, di, e, &ocb, "model.layers.%d.mamba.conv1d.bias", l);
            lookup(r, di * ds, e, &oal, "model.layers.%d.mamba.A_log", l);
            lookup(r, di, e, &oD, "model.layers.%d.mamba.D", l);
            L->cw = D->w32 + at;
            memcpy(hp + at, params + ocw, (size_t)(di * Wc) * 4), at += di * Wc;
            L->cb = D->w32 + at;
            memcpy(hp + at, params + ocb, (size_t)di * 4), at += di;
            L->A = D->w32 + at;
            for (int64_t i = 0; i < di * ds; i++) hp[at + i] = -expf(params[oal + i]);
            at += di * ds;
            L->D = D->w32 + at;
            memcpy(hp + at, params + oD, (size_t)di * 4), at += di;
            L->dtb32 = D->w32 + at;
            memcpy(hp + at, params + L->dtb, (size_t)di * 4), at += di;
        }
        cudaCheck(cudaMemcpy(D->w32, hp, (size_t)n32 * 4, cudaMemcpyHostToDevice));
        free(hp);
    }
    {
        float inv[512];
        rope_inv_freq(c, inv);
        D->inv_freq = (float *)dalloc(D, (size_t)(hd / 2) * 4);
        cudaCheck(cudaMemcpy(D->inv_freq, inv, (size_t)(hd / 2) * 4, cudaMemcpyHostToDevice));
    }
    // ---- caches and states (Mamba: all layers in one buffer, so a window start copies them in one call)
    const int64_t cwin = Wc - 1 > 0 ? Wc - 1 : 1;
    for (int l = 0; l < c->n_layer; l++)
        if (D->L[l].kind != MIXER_ATTN) D->L[l].mi = D->n_m++;
    if (D->n_m) {
        D->ssm_all = (float *)dalloc(D, (size_t)(D->n_m * B * di * ds) * 4);
        D->ssm0_all = (float *)dalloc(D, (size_t)(D->n_m * B * di * ds) * 4);
        D->conv_all = (bf16 *)dalloc(D, (size_t)(D->n_m * B * cwin * di) * 2);
        D->conv0_all = (bf16 *)dalloc(D, (size_t)(D->n_m * B * cwin * di) * 2);
    }
    D->acc_keep = (int32_t *)dalloc(D, (size_t)(3 * B) * 4);
    D->acc_src = D->acc_keep + B;
    D->rk_ws = dalloc(D, rank_rows_workspace(B, c->vocab));
    cudaCheck(cudaMemset(D->rk_ws, 0, rank_rows_workspace(B, c->vocab)));
    for (int l = 0; l < c->n_layer; l++) {
        DLayer *L = &D->L[l];
        if (L->kind == MIXER_ATTN) {
            L->kc = (bf16 *)dalloc(D, (size_t)(B * max_len * kvd) * 2);
            L->vc = (bf16 *)dalloc(D, (size_t)(B * max_len * kvd) * 2);
        } else {
            L->ssm = D->ssm_all + L->mi * B * di * ds;
            L->conv = D->conv_all + L->mi * B * cwin * di;
        }
    }
    {  // the KV caches' addresses for decoder_cuda_accept_from's one launch over all layers
        void **hp = (void **)dl_calloc((size_t)(2 * c->n_layer), sizeof(void *));
        for (int l = 0; l < c->n_layer; l++) hp[2 * l] = D->L[l].kc, hp[2 * l + 1] = D->L[l].vc;
        D->kv_ptr = (void **)dalloc(D, (size_t)(2 * c->n_layer) * sizeof(void *));
        cudaCheck(cudaMemcpy(D->kv_ptr, hp, (size_t)(2 * c->n_layer) * sizeof(void *), cudaMemcpyHostToDevice));
        free(hp);
    }
    // ---- scratch
#define SCR(p, n) D->p = (bf16 *)dalloc(D, (size_t)(n) * 2)
    SCR(x, rows * d);
    SCR(xn, rows * d);
    SCR(mid, rows * d);
    SCR(mix, rows * d);
    SCR(q, rows * qd);
    SCR(att, rows * qd);
    SCR(k, rows * kvd);
    SCR(v, rows * kvd);
    SCR(gu, rows * 2 * ff);
    SCR(act, rows * ff);
    if (any_m) {
        SCR(z, rows * di);
        SCR(Cs, rows * di);
        SCR(dt, rows * di);
        SCR(xr, rows * di);
        SCR(xc, rows * di);
        SCR(y, rows * di);
        SCR(xs, rows * dxb);
        SCR(Bs, rows * dxb);
        SCR(dtl, rows * D->Rp);
    }
    SCR(last, B * d);
    SCR(lastn, B * d);
#undef SCR
    D->ints = (int32_t *)dalloc(D, (size_t)(2 * rows + 3 * B + 1) * 4);
    D->hints = (int32_t *)calloc((size_t)(2 * rows + 3 * B + 1), 4);
    // attention workspace: the legacy splits need (rows * nh + 2 n_sm) partials; the invariant per-tile
    // partials are used while rows * nh < 2 n_sm, with up to ceil(max_len / 128) tiles each (capped at 256 MiB:
    // past it the fold runs inside the blocks, same bits)
    D->att_ws_elems = ((int64_t)rows * c->n_head + 2ll * D->n_sm + 64) * (hd + 2);
    {
        int64_t tiles = 2ll * D->n_sm * ((max_len + ATT_THREADS - 1) / ATT_THREADS) * (hd + 2);
        if (tiles > (1ll << 26)) tiles = 1ll << 26;
        if (tiles > D->att_ws_elems) D->att_ws_elems = tiles;
    }
    D->att_ws = (float *)dalloc(D, (size_t)D->att_ws_elems * 4);
    D->logits = (float *)dalloc(D, (size_t)(B * V) * 4);
    D->am_out = (int32_t *)dalloc(D, (size_t)B * 4);
    D->am_u64 = (uint64_t *)dalloc(D, (size_t)B * 8);
    D->am_ws = dalloc(D, argmax_rows_workspace(B, c->vocab));
    D->lcap = B;
    D->lrows = B;
    D->s_u64 = (uint64_t *)dalloc(D, (size_t)(2 * B) * 8);
    D->s_out = (int32_t *)dalloc(D, (size_t)B * 4);
    D->chain_out = (int32_t *)dalloc(D, (size_t)(B * CHAIN_MAX) * 4);
    cudaCheck(cudaEventCreateWithFlags(&D->chain_ev, cudaEventDisableTiming));
    cudaCheck(cudaMallocHost((void **)&D->pin_tok, (size_t)rows * 4));
    cudaCheck(cudaDeviceSynchronize());
    if (log)
        fprintf(log, "decoder_cuda: batch %lld x context %lld, %d layers (%d attention), %.2f GiB on the GPU (weights "
                     "%.2f GiB bf16, %lld rows per pass)\n",
                (long long)B, (long long)max_len, c->n_layer, hybrid_n_attn(h), D->bytes / 1073741824.0,
                (double)(pad_at + pad_n) * 2 / 1073741824.0, (long long)rows);
    return D;
}

int decoder_cuda_reset(DecoderCuda *D, int64_t nb, DlError *e) {
    if (nb < 1 || nb > D->B)
        return dl_fail(e, "decoder_cuda_reset: batch %lld outside 1..%lld", (long long)nb, (long long)D->B);
    D->nb = nb;
    D->win = false;
    D->chain_kept = 0, D->picks_L = 0;
    memset(D->len, 0, (size_t)D->B * sizeof(int64_t));
    const HybridConfig *h = &D->h;
    if (D->n_m) {
        cudaCheck(cudaMemsetAsync(D->ssm_all, 0, (size_t)(D->n_m * D->B * ssm_per_seq(h)) * 4, D->st));
        cudaCheck(cudaMemsetAsync(D->conv_all, 0, (size_t)(D->n_m * D->B * conv_per_seq(h)) * 2, D->st));
    }
    return 0;
}

int decoder_cuda_reset_seq(DecoderCuda *D, int64_t b, DlError *e) {
    if (b < 0 || b >= D->nb)
        return dl_fail(e, "decoder_cuda_reset_seq: sequence %lld outside 0..%lld", (long long)b, (long long)D->nb - 1);
    if (D->win) return dl_fail(e, "decoder_cuda_reset_seq: not allowed inside a speculative window");
    D->len[b] = 0;
    const HybridConfig *h = &D->h;
    if (D->n_m) {  // layer-major [n_m, B, ...]: one strided memset per state array
        const int64_t s1 = ssm_per_seq(h), s2 = conv_per_seq(h);
        cudaCheck(cudaMemset2DAsync(D->ssm_all + b * s1, (size_t)(D->B * s1) * 4, 0, (size_t)s1 * 4, (size_t)D->n_m, D->st));
        cudaCheck(cudaMemset2DAsync(D->conv_all + b * s2, (size_t)(D->B * s2) * 2, 0, (size_t)s2 * 2, (size_t)D->n_m, D->st));
    }
    return 0;
}

// Up to COPY_MAX sequences' KV rows per launch, passed by value: dst slot b, src slot j, rows len.
#define COPY_MAX 256
struct CopyList {
    int32_t b[COPY_MAX], j[COPY_MAX], len[COPY_MAX];
};

// blockIdx.y = the sequence; 16-byte words when a row is a multiple of 16 bytes (cudaMalloc bases are aligned).
__global__ void kv_copy_kernel(bf16 *dk, bf16 *dv, const bf16 *sk, const bf16 *sv, CopyList cl, int64_t dmax, int64_t smax,
                               int64_t kvd) {
    const int k = blockIdx.y;
    const int64_t doff = (int64_t)cl.b[k] * dmax * kvd, soff = (int64_t)cl.j[k] * smax * kvd, n = (int64_t)cl.len[k] * kvd;
    if ((kvd * 2) % 16 == 0) {
        const int64_t w = n / 8;
        const uint4 *a = (const uint4 *)(sk + soff), *c = (const uint4 *)(sv + soff);
        uint4 *x = (uint4 *)(dk + doff), *y = (uint4 *)(dv + doff);
        for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < w; i += (int64_t)gridDim.x * blockDim.x) x[i] = a[i], y[i] = c[i];
    } else {
        for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
            dk[doff + i] = sk[soff + i], dv[doff + i] = sv[soff + i];
    }
}

int decoder_cuda_copy_seqs(DecoderCuda *D, const int64_t *b, const DecoderCuda *S, const int64_t *j, int64_t n, DlError *e) {
    const HybridConfig *h = &D->h;
    const LlamaConfig *c = &h->base;
    if (S->h.base.n_layer != c->n_layer || S->n_m != D->n_m)
        return dl_fail(e, "decoder_cuda_copy_seqs: the two decoders hold different models");
    if (D->win) return dl_fail(e, "decoder_cuda_copy_seqs: not allowed inside a speculative window");
    for (int64_t i = 0; i < n; i++) {
        if (b[i] < 0 || b[i] >= D->nb || j[i] < 0 || j[i] >= S->nb)
            return dl_fail(e, "decoder_cuda_copy_seqs: sequence %lld -> %lld outside the batches (%lld, %lld)", (long long)j[i],
                           (long long)b[i], (long long)S->nb, (long long)D->nb);
        if (S->len[j[i]] > D->max_len)
            return dl_fail(e, "decoder_cuda_copy_seqs: %lld tokens exceed the context of %lld", (long long)S->len[j[i]],
                           (long long)D->max_len);
    }
    cudaCheck(cudaStreamSynchronize(S->st));  // src's prefill is done; D's stream orders the copy before D's next feed
    const int64_t kvd = (int64_t)c->n_kv_head * c->head_dim;
    for (int64_t i0 = 0; i0 < n; i0 += COPY_MAX) {
        const int64_t m = n - i0 < COPY_MAX ? n - i0 : COPY_MAX;
        CopyList cl;
        int64_t most = 1;
        for (int64_t i = 0; i < m; i++) {
            cl.b[i] = (int32_t)b[i0 + i], cl.j[i] = (int32_t)j[i0 + i], cl.len[i] = (int32_t)S->len[j[i0 + i]];
            most = cl.len[i] > most ? cl.len[i] : most;
        }
        const unsigned gx = (unsigned)((most * kvd / 8 + 255) / 256);
        for (int l = 0; l < c->n_layer; l++) {
            if (D->L[l].kind != MIXER_ATTN) continue;
            kv_copy_kernel<<<dim3(gx ? gx : 1, (unsigned)m), 256, 0, D->st>>>(D->L[l].kc, D->L[l].vc, S->L[l].kc, S->L[l].vc, cl,
                                                                             D->max_len, S->max_len, kvd);
            kernelCheck("kv_copy_kernel");
        }
    }
    if (D->n_m) {  // layer-major [n_m, B, ...] state arrays: one strided copy per sequence and array
        const int64_t s1 = ssm_per_seq(h), s2 = conv_per_seq(h);
        for (int64_t i = 0; i < n; i++) {
            cudaCheck(cudaMemcpy2DAsync(D->ssm_all + b[i] * s1, (size_t)(D->B * s1) * 4, S->ssm_all + j[i] * s1,
                                        (size_t)(S->B * s1) * 4, (size_t)s1 * 4, (size_t)D->n_m, cudaMemcpyDeviceToDevice, D->st));
            cudaCheck(cudaMemcpy2DAsync(D->conv_all + b[i] * s2, (size_t)(D->B * s2) * 2, S->conv_all + j[i] * s2,
                                        (size_t)(S->B * s2) * 2, (size_t)s2 * 2, (size_t)D->n_m, cudaMemcpyDeviceToDevice, D->st));
        }
    }
    for (int64_t i = 0; i < n; i++) D->len[b[i]] = S->len[j[i]];
    return 0;
}

int64_t decoder_cuda_batch(const DecoderCuda *D) { return D->nb; }
int64_t decoder_cuda_capacity(const DecoderCuda *D) { return D->B; }
int64_t decoder_cuda_max_len(const DecoderCuda *D) { return D->max_len; }
int64_t decoder_cuda_seq_len(const DecoderCuda *D, int64_t b) { return b >= 0 && b < D->nb ? D->len[b] : -1; }
int64_t decoder_cuda_vocab(const DecoderCuda *D) { return D->h.base.vocab; }

static void graphs_drop(DecoderCuda *D);

int decoder_cuda_set_head_ids(DecoderCuda *D, const int32_t *ids, int64_t n, DlError *e) {
    const int64_t V = D->h.base.vocab, d = D->h.base.d_model;
    int32_t *sorted = NULL;
    if (n > 0 && !(sorted = head_ids_sorted(ids, n, V, "decoder_cuda", e))) return -1;
    cudaCheck(cudaStreamSynchronize(D->st));
    graphs_drop(D);  // captured heads point at the old buffers
    cudaCheck(cudaFree(D->hpos)), cudaCheck(cudaFree(D->hw)), cudaCheck(cudaFree(D->hout));
    if (D->hn) D->bytes -= (double)V * 4 + (double)(D->hp * d) * 2 + (double)(D->lcap * D->hp) * 4;
    D->hpos = NULL, D->hw = NULL, D->hout = NULL, D->hn = D->hp = 0;
    if (n <= 0) return 0;
    const int64_t hp = (n + 7) / 8 * 8;  // decode_gemm's N % 8 == 0: the padding repeats the last id
    int32_t *padded = (int32_t *)dl_malloc((size_t)hp * sizeof(int32_t)), *pos = (int32_t *)dl_malloc((size_t)V * sizeof(int32_t));
    for (int64_t j = 0; j < hp; j++) padded[j] = sorted[j < n ? j : n - 1];
    for (int64_t v = 0; v < V; v++) pos[v] = -1;
    for (int64_t j = 0; j < n; j++) pos[sorted[j]] = (int32_t)j;
    int32_t *hid = NULL;
    cudaCheck(cudaMalloc(&hid, (size_t)hp * 4));
    D->hpos = (int32_t *)dalloc(D, (size_t)V * 4);
    D->hw = (bf16 *)dalloc(D, (size_t)(hp * d) * 2);
    D->hout = (float *)dalloc(D, (size_t)(D->lcap * hp) * 4);
    cudaCheck(cudaMemcpy(hid, padded, (size_t)hp * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(D->hpos, pos, (size_t)V * 4, cudaMemcpyHostToDevice));
    head_gather_kernel<<<grid_of(hp * d, 256), 256, 0, D->st>>>(D->hw, W(D, D->head), hid, hp, d);
    kernelCheck("head_gather_kernel");
    cudaCheck(cudaStreamSynchronize(D->st));
    cudaCheck(cudaFree(hid));
    free(padded), free(pos), free(sorted);
    D->hn = n, D->hp = hp;
    return 0;
}

double decoder_cuda_bytes(const DecoderCuda *D) { return D->bytes; }

// Attention of rows nb*lc (queries at lenb[b] + t) over the cache of layer L.
static void attention(DecoderCuda *D, const DLayer *L, int64_t lc, int64_t maxkeys) {
    const LlamaConfig *c = &D->h.base;
    const int64_t nrows = D->nb * lc;
    AttArgs a = att_args(D->max_len, lc, c->n_head, c->n_kv_head, c->head_dim);
    const int64_t blocks = nrows * c->n_head, tiles = (maxkeys + ATT_THREADS - 1) / ATT_THREADS;
    const int32_t *lenb = D->ints + 2 * D->rows + 2 * D->B;
    if (D->invariant) {
        // the tiles across blocks while the (row, head) blocks cannot fill the GPU; else the fold inside the blocks:
        // one block per (row, KV group) when that still gives every SM a block and the GQA kernel is instantiated
        // for the shape, else one per (row, head)
        // (the per-tile blocks: one per KV group when the GQA kernel is instantiated, so a tile of keys and values is
        // read once for the group's heads)
        const bool split = blocks < 2ll * D->n_sm && blocks * tiles * (int64_t)(a.hd + 2) <= D->att_ws_elems;
        const int kernel = split && D->attn_gqa                       ? ATT_GQA_SPLIT
                           : split                                    ? ATT_SPLIT
                           : D->attn_gqa && nrows * a.nkv >= D->n_sm ? ATT_GQA
                                                                      : ATT_TILES;
        if (!attn_invariant_launch(kernel, D->q, L->kc, L->vc, lenb, a, nrows, tiles, D->att_ws, D->att, D->st) &&
            !(split && attn_invariant_launch(ATT_SPLIT, D->q, L->kc, L->vc, lenb, a, nrows, tiles, D->att_ws, D->att, D->st)))
            attn_invariant_launch(ATT_TILES, D->q, L->kc, L->vc, lenb, a, nrows, tiles, NULL, D->att, D->st);
        return;
    }
    // legacy: split the keys only when the (row, head) blocks cannot fill the GPU; the workspace bound holds
    // because nsplit > 1 only when rows * nh < 2 * n_sm
    int64_t ns = (2ll * D->n_sm + blocks - 1) / blocks;
    if (ns > tiles) ns = tiles;
    if (ns < 1) ns = 1;
    a.kps = ((maxkeys + ns - 1) / ns + ATT_THREADS - 1) / ATT_THREADS * ATT_THREADS;
    a.nsplit = (int)((maxkeys + a.kps - 1) / a.kps);
    // DISTILL_DECODE_KPS=N (diagnostic): in the decode regime, N keys per split whatever the number of query rows,
    // so a row's softmax sums group the same keys in a 1-token step and in a (K+1)-token verification (the
    // default split count depends on the rows, so the two differ in the last bits past 128 keys)
    static const long fixed_kps = getenv("DISTILL_DECODE_KPS") ? atol(getenv("DISTILL_DECODE_KPS")) : 0;
    if (fixed_kps > 0 && blocks < 2ll * D->n_sm) {
        const int64_t k2 = (fixed_kps + ATT_THREADS - 1) / ATT_THREADS * ATT_THREADS, n2 = (maxkeys + k2 - 1) / k2;
        if (blocks * n2 * (int64_t)(a.hd + 2) <= D->att_ws_elems) a.kps = k2, a.nsplit = (int)n2;
    }
    if (blocks * a.nsplit * (int64_t)(a.hd + 2) > D->att_ws_elems) {  // cannot happen by the sizing above
        fprintf(stderr, "decode_cuda: attention workspace too small (%lld rows, %d splits)\n", (long long)nrows, a.nsplit);
        exit(DL_EXIT_RUNTIME);
    }
    dim3 g1((unsigned)(nrows * c->n_head), (unsigned)a.nsplit);
    attn_partial_kernel<<<g1, ATT_THREADS, 0, D->st>>>(D->q, L->kc, L->vc, lenb, a, D->att_ws);
    kernelCheck("attn_partial_kernel");
    dim3 g2((unsigned)nrows, (unsigned)c->n_head);
    attn_combine_kernel<<<g2, a.hd < 128 ? 64 : 128, 0, D->st>>>(D->att_ws, a, D->att);
    kernelCheck("attn_combine_kernel");
}

static void mamba(DecoderCuda *D, const DLayer *L, int64_t lc) {
    const HybridConfig *h = &D->h;
    const int64_t nb = D->nb, N = nb * lc, d = h->base.d_model, di = h->d_inner, dxb = h->d_xb, ds = h->d_state;
    const int64_t Rp = D->Rp;
    const int Wc = h->d_conv;
    const int32_t *keep = D->ints + 2 * D->rows;
    // what a window's replay needs (conv input xr, scan input xc, dt, B): in the scratch rows, then copied to the
    // window buffers; or written there in place (wdirect: the same layout)
    bf16 *xr = D->xr, *xc = D->xc, *dt = D->dt, *Bs = D->Bs;
    if (D->wdirect) xr = L->w_xr, xc = L->w_xc, dt = L->w_dt, Bs = L->w_B;
    {  // z, x, B, C and the low-rank dt input from the normed rows
        void *const y[5] = {D->z, D->xs, Bs, D->Cs, D->dtl};
        const int64_t wo[5] = {L->z, L->x, L->Bp, L->Cp, L->dtd}, O[5] = {di, dxb, dxb, di, Rp};
        lin_multi(D, D->xn, N, d, 5, y, wo, O);
    }
    // dt = dt_proj(dt_low) with its bias; the scan adds the bias again (MambaInLlama's double bias)
    lin(D, dt, D->dtl, L->dtw, W(D, L->dtb), N, Rp, di, 0);
    // a step or a window: repeat, conv and the conv window's advance in one launch (the advance reads only xr and
    // keep, so it may come before the scan); a longer chunk (prefill): three launches
    const bool conv_step = (D->fuse & 4) && Wc >= 2 && Wc <= 4 && lc <= CONV_STEP_MAX;
    if (conv_step) {
#define CONV_STEP_CASE(w)                                                                                           \
    case w:                                                                                                         \
        conv_step_kernel<w><<<grid_of(nb * di, 128), 128, 0, D->st>>>(L->conv, D->xs, xr, xc, L->cw, L->cb, keep,       \
                                                                       nb, lc, di, dxb, ds);                          \
        break;
        switch (Wc) { CONV_STEP_CASE(2) CONV_STEP_CASE(3) CONV_STEP_CASE(4) }
#undef CONV_STEP_CASE
        kernelCheck("conv_step_kernel");
    } else {
        repeat_kernel<<<grid_of(N * di, 256), 256, 0, D->st>>>(xr, D->xs, N, di, dxb, ds);
        kernelCheck("repeat_kernel");
        TCK(conv1d_silu_fwd_cuda(nb, lc, di, Wc, (const uint16_t *)xr, L->cw, L->cb, NULL,
                                 Wc > 1 ? (const uint16_t *)L->conv : NULL, 1, (uint16_t *)xc, D->st, EA));
    }
    if (D->win && !D->wdirect) {  // the window's copy of what a replay needs: conv input, scan input u, dt, B
        WinStore ws = {{xr, xc, dt, Bs}, {L->w_xr, L->w_xc, L->w_dt, L->w_B}, {di, di, di, dxb}};
        win_store_kernel<<<dim3(grid_of(N * di, 256), 4), 256, 0, D->st>>>(ws, D->ints + 2 * D->rows + 3 * D->B, nb, lc,
                                                                          D->wcap);
        kernelCheck("win_store_kernel");
    }
    ScanShape s = {nb, lc, di, ds, di / ds, dxb / ds};
    TCK(selective_scan_multi_cuda(&s, (const uint16_t *)xc, (const uint16_t *)dt, L->A, (const uint16_t *)Bs,
                                  (const uint16_t *)D->Cs, L->D, (const uint16_t *)D->z, L->dtb32, L->ssm, keep,
                                  (uint16_t *)D->y, L->ssm, NULL, D->st, EA));
    if (Wc > 1 && !conv_step) {
        conv_advance_kernel<<<grid_of(nb * di, 256), 256, 0, D->st>>>(L->conv, L->conv, xr, keep, nb, lc, di, Wc);
        kernelCheck("conv_advance_kernel");
    }
    lin(D, D->mix, D->y, L->out, NULL, N, di, d, 0);
}

// One pass over the model for the chunk already uploaded (D->ints): nb sequences x lc tokens.
static void run_chunk(DecoderCuda *D, int64_t lc, int64_t maxkeys) {
    const LlamaConfig *c = &D->h.base;
    const int64_t nb = D->nb, N = nb * lc, d = c->d_model, ff = c->d_ff, hd = c->head_dim;
    const int64_t qd = (int64_t)c->n_head * hd, kvd = (int64_t)c->n_kv_head * hd;
    const float eps = (float)c->rms_eps;
    const int32_t *tok = D->ints, *pos = D->ints + D->rows, *lenb = D->ints + 2 * D->rows + 2 * D->B;
    TCK(embedding_fwd_cuda(DT_BF16, D->x, tok, W(D, D->emb), N, c->vocab, d, D->st, EA));
    for (int l = 0; l < c->n_layer; l++) {
        const DLayer *L = &D->L[l];
        TCK(rmsnorm_fwd_cuda(DT_BF16, D->xn, NULL, NULL, D->x, NULL, W(D, L->in_norm), N, d, eps, D->st, EA));
        if (L->kind == MIXER_ATTN) {
            void *const y[3] = {D->q, D->k, D->v};
            const int64_t wo[3] = {L->q, L->k, L->v}, O[3] = {qd, kvd, kvd};
            lin_multi(D, D->xn, N, d, 3, y, wo, O);
            if (D->fuse & 1) {
                const int64_t pairs = N * (c->n_head + c->n_kv_head) * (hd / 2);
                rope_kv_kernel<<<grid_of(pairs, 128), 128, 0, D->st>>>(D->q, c->n_head, D->k, D->v, c->n_kv_head, L->kc,
                                                                       L->vc, pos, D->inv_freq, lenb, nb, lc, (int)hd,
                                                                       D->max_len);
                kernelCheck("rope_kv_kernel");
            } else {
                TCK(rope2_cuda(DT_BF16, D->q, c->n_head, D->k, c->n_kv_head, pos, D->inv_freq, N, (int)hd, 0, D->st, EA));
                kv_append_kernel<<<grid_of(N * kvd, 256), 256, 0, D->st>>>(L->kc, L->vc, D->k, D->v, lenb, nb, lc, kvd,
                                                                            D->max_len);
                kernelCheck("kv_append_kernel");
            }
            attention(D, L, lc, maxkeys);
            lin(D, D->mix, D->att, L->o, NULL, N, qd, d, 0);
        } else {
            mamba(D, L, lc);
        }
        // mid = x + mixer; xn = norm(mid)
        TCK(rmsnorm_fwd_cuda(DT_BF16, D->xn, NULL, D->mid, D->mix, D->x, W(D, L->post_norm), N, d, eps, D->st, EA));
        if (D->invariant && (D->fuse & 2)) {  // act = swiglu(gate, up) as the GEMM's epilogue
            const bf16 *Wg = W(D, L->gate);
            TCK(decode_gemm_swiglu(D->act, D->xn, Wg, L->fused_gu ? Wg + ff * d : W(D, L->up), N, ff, d, D->st, EA));
        } else if (L->fused_gu) {
            lin(D, D->gu, D->xn, L->gate, NULL, N, d, 2 * ff, 0);
            TCK(swiglu_fwd_cuda(DT_BF16, D->act, D->gu, D->gu + ff, N, ff, 2 * ff, D->st, EA));
        } else {
            lin(D, D->gu, D->xn, L->gate, NULL, N, d, ff, 0);
            lin(D, D->gu + N * ff, D->xn, L->up, NULL, N, d, ff, 0);
            TCK(swiglu_fwd_cuda(DT_BF16, D->act, D->gu, D->gu + N * ff, N, ff, ff, D->st, EA));
        }
        lin(D, D->mid, D->act, L->down, NULL, N, ff, d, 1);  // mid += down(act): the next layer's input
        bf16 *t = D->x;
        D->x = D->mid;
        D->mid = t;
    }
    const int32_t *lastidx = D->ints + 2 * D->rows + D->B;
    gather_last_kernel<<<grid_of(nb * d, 256), 256, 0, D->st>>>(D->last, D->x, lastidx, nb, d);
    kernelCheck("gather_last_kernel");
}

// Final norm and head on each sequence's last token: logits [nb, V] fp32.
static void head(DecoderCuda *D) {
    const LlamaConfig *c = &D->h.base;
    const int64_t nb = D->nb, d = c->d_model;
    TCK(rmsnorm_fwd_cuda(DT_BF16, D->lastn, NULL, NULL, D->last, NULL, W(D, D->fnorm), nb, d, (float)c->rms_eps, D->st, EA));
    head_gemm(D, D->logits, D->lastn, nb);
}

// Final norm and head on every row of the chunk (columns c0 .. c0+lc-1 of an L-token feed): logits [nb, L, V].
static void head_all(DecoderCuda *D, int64_t lc, int64_t c0, int64_t L) {
    const LlamaConfig *c = &D->h.base;
    const int64_t nb = D->nb, V = c->vocab, d = c->d_model, N = nb * lc;
    TCK(rmsnorm_fwd_cuda(DT_BF16, D->xn, NULL, NULL, D->x, NULL, W(D, D->fnorm), N, d, (float)c->rms_eps, D->st, EA));
    if (lc == L) {
        head_gemm(D, D->logits, D->xn, N);
        return;
    }
    for (int64_t b = 0; b < nb; b++)  // a chunked feed: sequence b's columns land at rows b*L + c0 ..
        head_gemm(D, D->logits + (b * L + c0) * V, D->xn + b * lc * d, lc);
}

// Greedy tokens of the last feed's logits rows on the device: am_out [rows] (lowest id on ties, as sample_argmax).
// Up to ARGMAX_SPLIT_ROWS rows (steps, windows, chains) several blocks per row; more rows fill the GPU one block each.
#define ARGMAX_SPLIT_ROWS 64
static int argmax_rows(DecoderCuda *D, int64_t rows, char *err, size_t errlen) {
    if ((D->fuse & 8) && rows <= ARGMAX_SPLIT_ROWS)
        return argmax_rows_cuda_on(D->logits, rows, D->h.base.vocab, D->am_ws, D->am_out, D->st, err, errlen);
    const DecodeSampling g = {0.0f, 0, 1.0f, 0};
    return sample_rows_cuda_on(D->logits, rows, D->h.base.vocab, &g, D->am_u64, D->am_u64, D->am_out, D->st, err,
                               errlen);
}

// A greedy chain's device work (decoder_cuda_branch_chain): n picks into chain_out, each the argmax of the current
// logits (the first: of rank b % W in row b), the first `feeds` of them fed back as one-token steps; ints holds the
// first feed's upload.
static void chain_body(DecoderCuda *D, int W, int n, int feeds) {
    const int64_t nb = D->nb;
    for (int i = 0; i < n; i++) {
        if (i == 0 && W > 1) TCK(rank_rows_cuda_on(D->logits, nb, D->h.base.vocab, W, D->rk_ws, D->am_out, D->st, EA));
        else TCK(argmax_rows(D, nb, EA));
        chain_pick_kernel<<<grid_of(nb, 128), 128, 0, D->st>>>(D->ints, D->rows, D->B, nb, D->am_out, D->chain_out, n,
                                                               i, i < feeds, i > 0);
        kernelCheck("chain_pick_kernel");
        if (i < feeds) {
            run_chunk(D, 1, D->max_len);
            head(D);
        }
    }
}

static void graphs_drop(DecoderCuda *D) {
    for (int i = 0; i < D->ng; i++) cudaCheck(cudaGraphExecDestroy(D->g[i].ex));
    for (int i = 0; i < D->nrg; i++) cudaCheck(cudaGraphExecDestroy(D->rg[i].ex));
    D->ng = D->gnext = D->nrg = 0;
}

// Room for `rows` rows of logits (and their argmax); captured graphs hold the old pointer: dropped.
static void ensure_logits(DecoderCuda *D, int64_t rows) {
    if (rows <= D->lcap) return;
    cudaCheck(cudaStreamSynchronize(D->st));
    graphs_drop(D);
    const int64_t V = D->h.base.vocab;
    cudaCheck(cudaFree(D->logits)), cudaCheck(cudaFree(D->am_out)), cudaCheck(cudaFree(D->am_u64));
    cudaCheck(cudaFree(D->am_ws));
    D->bytes -= (double)D->lcap * (V * 4 + 12) + (double)argmax_rows_workspace(D->lcap, V);
    D->logits = (float *)dalloc(D, (size_t)(rows * V) * 4);
    D->am_out = (int32_t *)dalloc(D, (size_t)rows * 4);
    D->am_u64 = (uint64_t *)dalloc(D, (size_t)rows * 8);
    D->am_ws = dalloc(D, argmax_rows_workspace(rows, V));
    if (D->hn) {
        cudaCheck(cudaFree(D->hout));
        D->bytes -= (double)(D->lcap * D->hp) * 4;
        D->hout = (float *)dalloc(D, (size_t)(rows * D->hp) * 4);
    }
    D->lcap = rows;
}

// Window input buffers for `need` tokens per sequence (the old contents kept); graphs dropped on growth.
static void ensure_window(DecoderCuda *D, int64_t need) {
    if (need <= D->wcap || D->n_m == 0) return;
    const HybridConfig *h = &D->h;
    const int64_t B = D->B, di = h->d_inner, dxb = h->d_xb, per = window_per_tok(h);
    // an empty window grows to exactly its need: a verification window of L tokens then has wcap == L, the layout of
    // the scratch rows, and several sequences' inputs are written in place (decoder_cuda_feed's wdirect)
    const int64_t cap = D->wlen == 0 || need > 2 * D->wcap ? need : 2 * D->wcap;
    cudaCheck(cudaStreamSynchronize(D->st));
    graphs_drop(D);
    bf16 *nbuf = (bf16 *)dalloc(D, (size_t)(D->n_m * B * cap * per) * 2);
    for (int l = 0; l < h->base.n_layer; l++) {
        DLayer *L = &D->L[l];
        if (L->kind == MIXER_ATTN) continue;
        bf16 *base = nbuf + L->mi * B * cap * per;
        bf16 *nw[4] = {base, base + B * cap * di, base + 2 * B * cap * di, base + 3 * B * cap * di};
        bf16 *ow[4] = {L->w_xr, L->w_xc, L->w_dt, L->w_B};
        const int64_t C[4] = {di, di, di, dxb};
        for (int a = 0; a < 4; a++) {
            if (D->wcap && D->wlen)  // [B, wcap, C] -> [B, cap, C]: the first wlen columns of each sequence
                cudaCheck(cudaMemcpy2DAsync(nw[a], (size_t)(cap * C[a]) * 2, ow[a], (size_t)(D->wcap * C[a]) * 2,
                                            (size_t)(D->wlen * C[a]) * 2, (size_t)B, cudaMemcpyDeviceToDevice, D->st));
        }
        L->w_xr = nw[0], L->w_xc = nw[1], L->w_dt = nw[2], L->w_B = nw[3];
    }
    cudaCheck(cudaStreamSynchronize(D->st));
    if (D->wbuf) {
        cudaCheck(cudaFree(D->wbuf));
        D->bytes -= (double)(D->n_m * B * D->wcap * per) * 2;
    }
    D->wbuf = nbuf;
    D->wcap = cap;
}

// The graph of one pass for this feed's shape (chain 0), or of a greedy chain (chain = 2 * picks + feed_last; lc 1,
// all 0), captured on first use (nothing runs while capturing).
static cudaGraphExec_t graph_for(DecoderCuda *D, int64_t lc, int all, int chain) {
    const int win = D->win && D->n_m > 0 ? 1 + D->wdirect : 0;
    for (int i = 0; i < D->ng; i++)
        if (D->g[i].nb == D->nb && D->g[i].lc == lc && D->g[i].all == all && D->g[i].win == win &&
            D->g[i].chain == chain)
            return D->g[i].ex;
    int slot;
    if (D->ng < MAX_GRAPHS) {
        slot = D->ng++;
    } else {  // full: replace round robin
        slot = D->gnext;
        D->gnext = (D->gnext + 1) % MAX_GRAPHS;
        cudaCheck(cudaStreamSynchronize(D->st));
        cudaCheck(cudaGraphExecDestroy(D->g[slot].ex));
    }
    cudaGraph_t g;
    cudaCheck(cudaStreamBeginCapture(D->st, cudaStreamCaptureModeThreadLocal));
    if (chain) {
        const int c = chain % CHAIN_KEY_W;
        chain_body(D, chain / CHAIN_KEY_W + 1, c / 2, c / 2 - 1 + c % 2);
    } else {
        run_chunk(D, lc, D->max_len);
        if (all) head_all(D, lc, 0, lc);
        else head(D);
    }
    cudaCheck(cudaStreamEndCapture(D->st, &g));
    GraphEntry *ge = &D->g[slot];
    cudaCheck(cudaGraphInstantiate(&ge->ex, g, 0));
    cudaCheck(cudaGraphDestroy(g));
    ge->nb = D->nb, ge->lc = lc, ge->all = all, ge->win = win, ge->chain = chain;
    return ge->ex;
}

// The ints of columns c0 .. c0+lc-1 of a feed of tokens [nb, L] (n: per-sequence counts, or NULL: L each; tokens
// NULL: ids 0, which a greedy chain overwrites on the device) staged in hints and uploaded in one go: [tok | pos]
// of the chunk's tokens, then [keep | lastidx | lenb | window offset]. Stream-ordered after the earlier kernels;
// pageable copies return once the host buffer is staged, so the host may refill it at once. Returns the most keys
// any of the chunk's queries sees.
static int64_t upload_chunk(DecoderCuda *D, const int32_t *tokens, int64_t L, const int64_t *n, int64_t c0, int64_t lc) {
    const int64_t nb = D->nb;
    int32_t *tok = D->hints, *pos = D->hints + D->rows, *keep = D->hints + 2 * D->rows;
    int32_t *lastidx = keep + D->B, *lenb = keep + 2 * D->B, *wofs = keep + 3 * D->B;
    int64_t maxkeys = 0;
    for (int64_t b = 0; b < nb; b++) {
        const int64_t nbv = n ? n[b] : L, kp = nbv - c0 < 0 ? 0 : (nbv - c0 > lc ? lc : nbv - c0);
        for (int64_t t = 0; t < lc; t++) {
            tok[b * lc + t] = tokens ? tokens[b * L + c0 + t] : 0;
            pos[b * lc + t] = (int32_t)(D->len[b] + t);
        }
        keep[b] = (int32_t)kp;
        lastidx[b] = nbv - 1 >= c0 && nbv - 1 < c0 + lc ? (int32_t)(b * lc + nbv - 1 - c0) : -1;
        lenb[b] = (int32_t)D->len[b];
        if (D->len[b] + lc > maxkeys) maxkeys = D->len[b] + lc;
    }
    wofs[0] = (int32_t)(D->wlen + c0);
    cudaCheck(cudaMemcpyAsync(D->ints, D->hints, (size_t)(nb * lc) * 4, cudaMemcpyHostToDevice, D->st));
    cudaCheck(cudaMemcpyAsync(D->ints + D->rows, D->hints + D->rows, (size_t)(nb * lc) * 4, cudaMemcpyHostToDevice, D->st));
    cudaCheck(cudaMemcpyAsync(D->ints + 2 * D->rows, keep, (size_t)(3 * D->B + 1) * 4, cudaMemcpyHostToDevice, D->st));
    return maxkeys;
}

// -1 (e filled) when sequence b has no room for `add` more tokens.
static int room_check(const DecoderCuda *D, int64_t b, int64_t add, DlError *e) {
    if (D->len[b] + add <= D->max_len) return 0;
    return dl_fail(e, "decoder_cuda: sequence %lld: %lld + %lld tokens exceed the context of %lld", (long long)b,
                   (long long)D->len[b], (long long)add, (long long)D->max_len);
}

int decoder_cuda_feed_ragged(DecoderCuda *D, const int32_t *tokens, int64_t L, const int64_t *n, DlError *e) {
    return decoder_cuda_feed(D, tokens, L, n, 0, e);
}

// decoder_cuda_feed, and decoder_cuda_feed_picks when src is given: columns 1..L-1 of every sequence's tokens are then
// src's last greedy picks, copied on the device after src's stream has made them (one chunk only).
static int feed_impl(DecoderCuda *D, const int32_t *tokens, int64_t L, const int64_t *n, int all, const DecoderCuda *src,
                     DlError *e) {
    const LlamaConfig *c = &D->h.base;
    const int64_t nb = D->nb, V = c->vocab;
    if (L <= 0) return dl_fail(e, "decoder_cuda: feeding %lld tokens", (long long)L);
    bool ragged = false;
    for (int64_t b = 0; b < nb; b++) {
        if (n && (n[b] < 1 || n[b] > L))
            return dl_fail(e, "decoder_cuda: sequence %lld feeds %lld tokens, expected 1..%lld", (long long)b,
                           (long long)n[b], (long long)L);
        ragged = ragged || (n && n[b] != L);
        if (room_check(D, b, L, e)) return -1;
    }
    if (ragged && D->win) return dl_fail(e, "decoder_cuda: ragged feeds are not allowed inside a speculative window");
    for (int64_t i = 0; i < nb * L; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return dl_fail(e, "decoder_cuda: token id %d out of range 0..%lld", tokens[i], (long long)V - 1);
    if (all) ensure_logits(D, nb * L);
    if (D->win) ensure_window(D, D->wlen + L);
    const int64_t Lc = D->rows / nb < L ? D->rows / nb : L;  // columns per chunk (rows >= B >= nb)
    if (src && Lc < L)
        return dl_fail(e, "decoder_cuda: a feed of %lld x %lld tokens with device picks needs one pass (%lld rows)",
                       (long long)nb, (long long)L, (long long)D->rows);
    const int32_t *keep = D->hints + 2 * D->rows;  // each sequence's tokens in the chunk (upload_chunk)
    D->lrows = all ? nb * L : nb;
    D->picks_L = src ? L : 0;
    // the window's first feed in one chunk, of one sequence or of L == wcap tokens each: the window buffers' first
    // nb * L rows are laid out as the scratch rows, so the Mamba layers write them in place (no copy)
    D->wdirect = D->win && D->n_m > 0 && (D->fuse & 16) && D->wlen == 0 && Lc == L && (nb == 1 || D->wcap == L);
    for (int64_t c0 = 0; c0 < L; c0 += Lc) {
        const int64_t lc = L - c0 < Lc ? L - c0 : Lc;
        const int64_t maxkeys = upload_chunk(D, tokens, L, n, c0, lc);
        if (src) {  // tok [nb, L]: columns 1.. from src->chain_out [nb, L-1], once src's chain has run
            cudaCheck(cudaStreamWaitEvent(D->st, src->chain_ev, 0));
            cudaCheck(cudaMemcpy2DAsync(D->ints + 1, (size_t)L * 4, src->chain_out, (size_t)(L - 1) * 4,
                                        (size_t)(L - 1) * 4, (size_t)nb, cudaMemcpyDeviceToDevice, D->st));
        }
        if (D->use_graph && Lc == L && L <= GRAPH_MAX_L) {  // one chunk: the whole feed is one graph launch
            cudaCheck(cudaGraphLaunch(graph_for(D, L, all, 0), D->st));
            for (int64_t b = 0; b < nb; b++) D->len[b] += keep[b];
            if (D->win) D->wlen += L;
            D->wdirect = false;
            return 0;
        }
        run_chunk(D, lc, maxkeys);
        if (all) head_all(D, lc, c0, L);
        for (int64_t b = 0; b < nb; b++) D->len[b] += keep[b];
    }
    D->wdirect = false;
    if (!all) head(D);
    if (D->win) D->wlen += L;
    return 0;
}

int decoder_cuda_feed(DecoderCuda *D, const int32_t *tokens, int64_t L, const int64_t *n, int all, DlError *e) {
    return feed_impl(D, tokens, L, n, all, NULL, e);
}

int decoder_cuda_feed_picks(DecoderCuda *D, const int32_t *first, const DecoderCuda *S, int all, DlError *e) {
    const int64_t nb = D->nb, L = 1 + (int64_t)S->chain_kept;
    if (S == D || S->chain_kept < 1)
        return dl_fail(e, "decoder_cuda_feed_picks: the source decoder has no greedy picks kept on the device");
    if (S->nb != nb || S->h.base.vocab != D->h.base.vocab)
        return dl_fail(e, "decoder_cuda_feed_picks: the picks are of %lld sequences over %lld ids, this decoder has %lld over %lld",
                       (long long)S->nb, (long long)S->h.base.vocab, (long long)nb, (long long)D->h.base.vocab);
    int32_t *tok = (int32_t *)calloc((size_t)(nb * L), sizeof(int32_t));  // column 0 from the host, the rest ids 0 for now
    for (int64_t b = 0; b < nb; b++) tok[b * L] = first[b];
    const int rc = feed_impl(D, tok, L, NULL, all, S, e);
    free(tok);
    return rc;
}

void decoder_cuda_window_begin(DecoderCuda *D) {
    D->win = true;
    D->wlen = 0;
    memcpy(D->len0, D->len, (size_t)D->B * sizeof(int64_t));
    if (!D->n_m) return;
    // the window-start state of every Mamba layer: the first nb sequences of each layer's slice
    const HybridConfig *h = &D->h;
    const int64_t B = D->B, nb = D->nb, sd = ssm_per_seq(h), cw = conv_per_seq(h);
    cudaCheck(cudaMemcpy2DAsync(D->ssm0_all, (size_t)(B * sd) * 4, D->ssm_all, (size_t)(B * sd) * 4, (size_t)(nb * sd) * 4,
                                (size_t)D->n_m, cudaMemcpyDeviceToDevice, D->st));
    if (h->d_conv > 1)
        cudaCheck(cudaMemcpy2DAsync(D->conv0_all, (size_t)(B * cw) * 2, D->conv_all, (size_t)(B * cw) * 2,
                                    (size_t)(nb * cw) * 2, (size_t)D->n_m, cudaMemcpyDeviceToDevice, D->st));
}

static void replay(DecoderCuda *D);

int decoder_cuda_accept(DecoderCuda *D, const int32_t *keep, DlError *e) { return decoder_cuda_accept_from(D, keep, NULL, e); }

int decoder_cuda_accept_from(DecoderCuda *D, const int32_t *keep, const int32_t *src, DlError *e) {
    if (!D->win) return dl_fail(e, "decoder_cuda_accept without decoder_cuda_window_begin");
    const int64_t nb = D->nb, B = D->B;
    bool all = true, moved = false;
    for (int64_t b = 0; b < nb; b++) {
        if (keep[b] < 0 || keep[b] > D->wlen)
            return dl_fail(e, "decoder_cuda_accept: sequence %lld keeps %d of %lld window tokens", (long long)b, keep[b],
                           (long long)D->wlen);
        all = all && keep[b] == D->wlen;
        if (!src || src[b] == b) continue;
        if (src[b] < 0 || src[b] >= nb || src[src[b]] != src[b] || D->len0[src[b]] != D->len0[b])
            return dl_fail(e, "decoder_cuda_accept: sequence %lld cannot take sequence %d's window (a source must keep its "
                              "own, and both must have started the window at the same length)", (long long)b, src[b]);
        moved = true;
    }
    D->win = false;
    int32_t *hk = D->hints, *hs = D->hints + B;  // staged: keep per sequence (the source's), then [src | len0]
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j = src ? src[b] : b;
        hk[b] = keep[j], hs[b] = (int32_t)j, hs[B + b] = (int32_t)D->len0[b];
        D->len[b] = D->len0[b] + keep[j];  // attention: rollback = length reset
    }
    if (moved) {  // the branches take their sources' kept keys and values and Mamba window inputs, then replay below
        const LlamaConfig *c = &D->h.base;
        const int64_t kvd = (int64_t)c->n_kv_head * c->head_dim;
        cudaCheck(cudaMemcpyAsync(D->acc_keep, hk, (size_t)(3 * B) * 4, cudaMemcpyHostToDevice, D->st));  // [keep | src | len0]
        kv_take_kernel<<<dim3(grid_of(D->wlen * kvd, 256), (unsigned)(2 * c->n_layer), (unsigned)nb), 256, 0, D->st>>>(
            (bf16 *const *)D->kv_ptr, D->acc_src, D->acc_keep, B, D->max_len, kvd);
        kernelCheck("kv_take_kernel");
        if (D->n_m && D->wlen) {
            win_take_kernel<<<dim3(grid_of(D->wlen * window_per_tok(&D->h), 256), (unsigned)D->n_m, (unsigned)nb), 256, 0, D->st>>>(
                D->wbuf, D->acc_src, B, D->wcap, D->wlen, D->h.d_inner, D->h.d_xb);
            kernelCheck("win_take_kernel");
        }
    }
    if ((all && !moved) || D->wlen == 0 || D->n_m == 0) return 0;  // the Mamba states already are those after every token
    if (!moved) cudaCheck(cudaMemcpyAsync(D->acc_keep, hk, (size_t)nb * 4, cudaMemcpyHostToDevice, D->st));
    if (!D->use_graph) {
        replay(D);
        return 0;
    }
    int i = 0;  // the replay's graph for (nb, wcap), captured on first use
    while (i < D->nrg && !(D->rg[i].nb == nb && D->rg[i].lc == D->wcap)) i++;
    if (i == D->nrg) {
        if (D->nrg == MAX_GRAPHS) {  // full: replace the first
            cudaCheck(cudaStreamSynchronize(D->st));
            cudaCheck(cudaGraphExecDestroy(D->rg[0].ex));
            i = 0;
        } else {
            D->nrg++;
        }
        cudaGraph_t g;
        cudaCheck(cudaStreamBeginCapture(D->st, cudaStreamCaptureModeThreadLocal));
        replay(D);
        cudaCheck(cudaStreamEndCapture(D->st, &g));
        cudaCheck(cudaGraphInstantiate(&D->rg[i].ex, g, 0));
        cudaCheck(cudaGraphDestroy(g));
        D->rg[i].nb = nb, D->rg[i].lc = D->wcap, D->rg[i].all = D->rg[i].win = 0;
    }
    cudaCheck(cudaGraphLaunch(D->rg[i].ex, D->st));
    return 0;
}

// The Mamba layers' states after each sequence's acc_keep[b] window tokens, from the window-start copy.
static void replay(DecoderCuda *D) {
    const HybridConfig *h = &D->h;
    const int64_t B = D->B, nb = D->nb, di = h->d_inner, ds = h->d_state, dxb = h->d_xb;
    const int64_t cw = conv_per_seq(h);
    const int Wc = h->d_conv;
    // scans from the window-start states (the buffers' stride is wcap columns; each sequence's scan stops at its
    // keep: no outputs are asked for); conv windows: the window-start copy advanced past the kept inputs
    ScanShape s = {nb, D->wcap, di, ds, di / ds, dxb / ds};
    // the Mamba layers' slices of each buffer are B * wcap * window_per_tok (window inputs), w32_per_layer (fp32
    // parameters), B * di * ds (states) and B * cw (conv windows) apart, so one launch of each kernel serves them all;
    // DISTILL_DECODE_FUSE without 16: one launch per layer (A/B: each starts from its own layer's pointers)
    const int64_t per = (D->fuse & 16) && D->n_m > 1 ? D->n_m : 1, wl = B * D->wcap * window_per_tok(h), pl = w32_per_layer(h),
                  sl = B * di * ds;
    const ScanLayers ls = {per, wl, wl, wl, 0, pl, pl, sl, sl};
    for (int l = 0; l < h->base.n_layer; l++) {
        const DLayer *L = &D->L[l];
        if (L->kind == MIXER_ATTN || L->mi % per) continue;  // each launch starts at its first layer
        // C does not enter the state: any buffer serves (u's)
        TCK(selective_scan_multi_layers_cuda(&s, &ls, (const uint16_t *)L->w_xc, (const uint16_t *)L->w_dt, L->A,
                                             (const uint16_t *)L->w_B, (const uint16_t *)L->w_xc, L->D, NULL, L->dtb32,
                                             D->ssm0_all + L->mi * sl, D->acc_keep, NULL, L->ssm, NULL, D->st, EA));
        if (Wc > 1) {
            conv_advance_kernel<<<dim3(grid_of(nb * di, 256), (unsigned)per), 256, 0, D->st>>>(
                L->conv, D->conv0_all + L->mi * B * cw, L->w_xr, D->acc_keep, nb, D->wcap, di, Wc, B * cw, wl);
            kernelCheck("conv_advance_kernel");
        }
    }
}

void decoder_cuda_use_graph(DecoderCuda *D, int on) { D->use_graph = on != 0; }

int64_t decoder_cuda_logits_rows(const DecoderCuda *D) { return D->lrows; }

int decoder_cuda_argmax(DecoderCuda *D, int32_t *tokens, DlError *e) {
    char err[256] = "";
    if (argmax_rows(D, D->lrows, EA)) return dl_fail(e, "decoder_cuda: %s", err);
    cudaCheck(cudaMemcpyAsync(tokens, D->am_out, (size_t)D->lrows * 4, cudaMemcpyDeviceToHost, D->st));
    cudaCheck(cudaStreamSynchronize(D->st));
    return 0;
}

int decoder_cuda_argmax_fed(DecoderCuda *D, int32_t *tokens, int32_t *fed, DlError *e) {
    if (!D->picks_L) return dl_fail(e, "decoder_cuda_argmax_fed: the last feed was not decoder_cuda_feed_picks");
    const size_t nf = (size_t)(D->nb * D->picks_L);
    // the fed tokens (ints, which the argmax does not touch) into pinned memory, then decoder_cuda_argmax, whose
    // synchronization covers this copy too
    cudaCheck(cudaMemcpyAsync(D->pin_tok, D->ints, nf * 4, cudaMemcpyDeviceToHost, D->st));
    if (decoder_cuda_argmax(D, tokens, e)) return -1;
    memcpy(fed, D->pin_tok, nf * 4);
    return 0;
}

int decoder_cuda_greedy_chain(DecoderCuda *D, int n, int feed_last, int32_t *out, DlError *e) {
    return decoder_cuda_branch_chain(D, 1, n, feed_last, out, e);
}

// The first pick of row b by rank b % W, on the host (the path without chains).
static int first_picks_ranked(DecoderCuda *D, int W, int32_t *t, DlError *e) {
    char err[256] = "";
    if (rank_rows_cuda_on(D->logits, D->nb, D->h.base.vocab, W, D->rk_ws, D->am_out, D->st, EA))
        return dl_fail(e, "decoder_cuda: %s", err);
    cudaCheck(cudaMemcpyAsync(t, D->am_out, (size_t)D->nb * 4, cudaMemcpyDeviceToHost, D->st));
    cudaCheck(cudaStreamSynchronize(D->st));
    return 0;
}

int decoder_cuda_branch_chain(DecoderCuda *D, int W, int n, int feed_last, int32_t *out, DlError *e) {
    const int64_t nb = D->nb;
    const int feeds = feed_last ? n : n - 1;
    if (n < 1 || n > CHAIN_MAX) return dl_fail(e, "decoder_cuda: a greedy chain of %d picks, expected 1..%d", n, CHAIN_MAX);
    if (W < 1 || W > BRANCH_MAX) return dl_fail(e, "decoder_cuda: %d branches, expected 1..%d", W, BRANCH_MAX);
    if (D->lrows != nb)
        return dl_fail(e, "decoder_cuda: a greedy chain needs the last-token logits of the %lld sequences, the last feed "
                          "kept %lld rows", (long long)nb, (long long)D->lrows);
    for (int64_t b = 0; b < nb; b++)
        if (room_check(D, b, feeds, e)) return -1;
    if (!D->chain) {  // the same picks with a host round trip each (A/B timing); out NULL: then uploaded to chain_out
        int32_t *t = (int32_t *)malloc((size_t)nb * sizeof(int32_t));
        int32_t *o = out ? out : (int32_t *)malloc((size_t)(nb * n) * sizeof(int32_t));
        int rc = 0;
        for (int i = 0; i < n && rc == 0; i++) {
            if ((rc = i == 0 && W > 1 ? first_picks_ranked(D, W, t, e) : decoder_cuda_argmax(D, t, e)) != 0) break;
            for (int64_t b = 0; b < nb; b++) o[b * n + i] = t[b];
            if (i < feeds) rc = decoder_cuda_feed(D, t, 1, NULL, 0, e);
        }
        D->chain_kept = 0;
        if (rc == 0 && !out) {
            cudaCheck(cudaMemcpyAsync(D->chain_out, o, (size_t)(nb * n) * 4, cudaMemcpyHostToDevice, D->st));
            cudaCheck(cudaStreamSynchronize(D->st));  // o is freed below
            cudaCheck(cudaEventRecord(D->chain_ev, D->st));
            D->chain_kept = n;
        }
        if (!out) free(o);
        free(t);
        return rc;
    }
    if (feeds > 0) {  // the first feed's ints (its tokens come from the first pick, on the device)
        if (D->win) ensure_window(D, D->wlen + feeds);
        upload_chunk(D, NULL, 1, NULL, 0, 1);
    }
    if (D->use_graph) cudaCheck(cudaGraphLaunch(graph_for(D, 1, 0, 2 * n + (feed_last != 0) + CHAIN_KEY_W * (W - 1)), D->st));
    else chain_body(D, W, n, feeds);
    D->chain_kept = out ? 0 : n;
    if (out) {
        cudaCheck(cudaMemcpyAsync(out, D->chain_out, (size_t)(nb * n) * 4, cudaMemcpyDeviceToHost, D->st));
        cudaCheck(cudaStreamSynchronize(D->st));
    } else {
        cudaCheck(cudaEventRecord(D->chain_ev, D->st));
    }
    for (int64_t b = 0; b < nb; b++) D->len[b] += feeds;
    if (D->win) D->wlen += feeds;
    return 0;
}

int decoder_cuda_step(DecoderCuda *D, const int32_t *tokens, DlError *e) {
    return decoder_cuda_feed_ragged(D, tokens, 1, NULL, e);
}

const float *decoder_cuda_logits(const DecoderCuda *D) { return D->logits; }

void decoder_cuda_logits_host(const DecoderCuda *D, float *out) {
    cudaCheck(cudaMemcpyAsync(out, D->logits, (size_t)(D->lrows * D->h.base.vocab) * 4, cudaMemcpyDeviceToHost, D->st));
    cudaCheck(cudaStreamSynchronize(D->st));
}

int decoder_cuda_seek(DecoderCuda *D, int64_t len, DlError *e) {
    if (len < 0 || len >= D->max_len)
        return dl_fail(e, "decoder_cuda_seek: length %lld outside 0..%lld", (long long)len, (long long)D->max_len - 1);
    const LlamaConfig *c = &D->h.base;
    const int64_t kvd = (int64_t)c->n_kv_head * c->head_dim;
    for (int l = 0; l < c->n_layer; l++)
        if (D->L[l].kind == MIXER_ATTN) {
            cudaCheck(cudaMemsetAsync(D->L[l].kc, 0, (size_t)(D->nb * D->max_len * kvd) * 2, D->st));
            cudaCheck(cudaMemsetAsync(D->L[l].vc, 0, (size_t)(D->nb * D->max_len * kvd) * 2, D->st));
        }
    for (int64_t b = 0; b < D->nb; b++) D->len[b] = len;
    D->win = false;
    return 0;
}

int decoder_cuda_sample(DecoderCuda *D, const DecodeSampling *s, const uint64_t *stream, const uint64_t *counter,
                        int32_t *tokens, DlError *e) {
    const int64_t nb = D->nb;
    if (D->lrows != nb)
        return dl_fail(e, "decoder_cuda_sample: the last feed kept the logits of every token (use decoder_cuda_argmax)");
    cudaCheck(cudaMemcpyAsync(D->s_u64, stream, (size_t)nb * 8, cudaMemcpyHostToDevice, D->st));
    cudaCheck(cudaMemcpyAsync(D->s_u64 + D->B, counter, (size_t)nb * 8, cudaMemcpyHostToDevice, D->st));
    char err[256] = "";
    if (sample_rows_cuda_on(D->logits, nb, D->h.base.vocab, s, D->s_u64, D->s_u64 + D->B, D->s_out, D->st, EA))
        return dl_fail(e, "decoder_cuda: %s", err);
    cudaCheck(cudaMemcpyAsync(tokens, D->s_out, (size_t)nb * 4, cudaMemcpyDeviceToHost, D->st));
    cudaCheck(cudaStreamSynchronize(D->st));
    return 0;
}

// The decode attention alone (decode_cuda.h): the decoder's kernels on caller buffers, default stream.
int decode_attention_cuda(int kernel, const void *q, const void *kc, const void *vc, const int32_t *lenb, int64_t nb,
                          int64_t lc, int64_t max_len, int nh, int nkv, int hd, int64_t maxkeys, void *out, char *err,
                          size_t errlen) {
    if (nb < 1 || lc < 1 || nkv < 1 || nh < nkv || nh % nkv || hd < 8 || hd % 8 || hd > MAX_HD || maxkeys < 1 ||
        maxkeys > max_len || nb * lc * nh >= INT32_MAX) {
        snprintf(err, errlen, "decode_attention_cuda: bad shape (nb %lld, lc %lld, nh %d, nkv %d, hd %d, keys %lld of %lld)",
                 (long long)nb, (long long)lc, nh, nkv, hd, (long long)maxkeys, (long long)max_len);
        return -1;
    }
    if (kernel != ATT_TILES && kernel != ATT_SPLIT && kernel != ATT_GQA && kernel != ATT_GQA_SPLIT) {
        snprintf(err, errlen, "decode_attention_cuda: kernel %d (0, 1, 2 or 3)", kernel);
        return -1;
    }
    const AttArgs a = att_args(max_len, lc, nh, nkv, hd);
    const int64_t nrows = nb * lc, tiles = (maxkeys + ATT_THREADS - 1) / ATT_THREADS;
    if ((kernel == ATT_SPLIT || kernel == ATT_GQA_SPLIT) && tiles > 65535) {
        snprintf(err, errlen, "decode_attention_cuda: %lld tiles per query for the per-tile grid", (long long)tiles);
        return -1;
    }
    float *ws = NULL;
    if (kernel == ATT_SPLIT || kernel == ATT_GQA_SPLIT) cudaCheck(cudaMalloc(&ws, (size_t)(nrows * nh * tiles * (hd + 2)) * 4));
    const bool ran = attn_invariant_launch(kernel, (const bf16 *)q, (const bf16 *)kc, (const bf16 *)vc, lenb, a, nrows, tiles,
                                           ws, (bf16 *)out, 0);
    if (ws) {
        cudaCheck(cudaDeviceSynchronize());
        cudaCheck(cudaFree(ws));
    }
    if (!ran) {
        snprintf(err, errlen, "decode_attention_cuda: no GQA kernel for %d heads / %d KV heads of %d", nh, nkv, hd);
        return -1;
    }
    return 0;
}
