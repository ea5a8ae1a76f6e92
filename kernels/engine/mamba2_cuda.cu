// mamba2_cuda.cu: the MambaInLlama Mamba-2 mixer on the device (see mamba2_cuda.h for the math and the interface).
// The GEMMs go through DlGemm, the scan through kernels/ssd; this file holds the conv (fp32 input) and the
// glue kernels: the GQA repeat of x and B to the heads and its transpose, the gated RMSNorm per head and its
// backward, the norm weight's column sums, and the fp32 folds of the per-head gradients.
#include "kernels/engine/mamba2_cuda.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kernels/ssd/ssd_cuda.h"
#include "kernels/train/train_check.cuh"

namespace {

typedef __nv_bfloat16 bf16;

// Derived sizes of a call (mamba2_cuda.h's names).
struct Dims {
    int64_t B, L, N, d, H, P, kv, rep, di, dxb, xbc, Hp;
    int W;
    float eps;
};
Dims dims_of(const Mamba2CudaShape *s) {
    Dims m;
    m.B = s->B, m.L = s->L, m.N = s->B * s->L, m.d = s->d, m.H = s->H, m.P = s->P, m.kv = s->kv;
    m.rep = s->H / s->kv, m.di = s->H * s->P, m.dxb = s->kv * s->P, m.xbc = 2 * m.dxb + m.di;
    m.Hp = (s->H + 7) / 8 * 8, m.W = s->W, m.eps = s->eps;
    return m;
}
// The SSD sees H heads in H groups (x and B already repeated to the heads), P = N.
SsdShape ssd_shape(const Dims &m) {
    SsdShape s = {m.B, m.L, m.H, m.P, m.H, m.P, SSD_CUDA_CHUNK, 1};
    return s;
}
// Rows per block of the norm weight's column sums: 64, more for huge batches (at most 4096 partial rows).
int64_t gn_rows(int64_t N) {
    const int64_t r = (N + 4095) / 4096;
    return r > 64 ? r : 64;
}
int64_t gn_blocks(int64_t N) { return (N + gn_rows(N) - 1) / gn_rows(N); }

unsigned grid_for(int64_t n, int threads) {
    const int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < (int64_t)1 << 20 ? (b > 0 ? b : 1) : (int64_t)1 << 20);
}
#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }
__device__ __forceinline__ void ld8(const bf16 *p, float (&f)[8]) {
    const uint4 v = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
    for (int e = 0; e < 4; e++) {
        const float2 t = __bfloat1622float2(h[e]);
        f[2 * e] = t.x, f[2 * e + 1] = t.y;
    }
}
__device__ __forceinline__ void st8(bf16 *p, const float (&f)[8]) {
    uint4 v;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&v;
    for (int e = 0; e < 4; e++) h[e] = __floats2bfloat162_rn(f[2 * e], f[2 * e + 1]);
    *(uint4 *)p = v;
}

// heads [3, N, di] from the conv output xc [N, xbc] = [x (dxb) | B (dxb) | C (di)]: slice 0 = x and slice 1 = B of
// KV head h/rep for head h, slice 2 = C (each head its own). 8 channels (16 bytes) per thread: P % 16 == 0.
__global__ void split_heads_k(const bf16 *xc, bf16 *heads, int64_t N, int64_t di, int64_t dxb, int64_t xbc, int64_t P,
                              int64_t rep) {
    const int64_t v8 = di / 8, per = N * v8;
    GRID_STRIDE(i, 3 * per) {
        const int64_t part = i / per, r = i - part * per, t = r / v8, e = (r - t * v8) * 8;
        int64_t src;
        if (part == 2) {
            src = 2 * dxb + e;
        } else {
            const int64_t h = e / P, p = e - h * P;
            src = part * dxb + (h / rep) * P + p;
        }
        *(uint4 *)(heads + part * per * 8 + t * di + e) = *(const uint4 *)(xc + t * xbc + src);
    }
}

// The transpose: dxc [N, xbc] from dheads [3, N, di]: x and B channels are the sum over the rep heads of their KV
// group, heads in order, in fp32 (mamba2_cpu.c's order), rounded once; C channels are copied.
__global__ void merge_heads_k(const bf16 *dh, bf16 *dxc, int64_t N, int64_t di, int64_t dxb, int64_t xbc, int64_t P,
                              int64_t rep) {
    const int64_t v8 = xbc / 8;
    GRID_STRIDE(i, N * v8) {
        const int64_t t = i / v8, c = (i - t * v8) * 8;
        if (c >= 2 * dxb) {
            *(uint4 *)(dxc + t * xbc + c) = *(const uint4 *)(dh + 2 * N * di + t * di + (c - 2 * dxb));
            continue;
        }
        const int64_t part = c >= dxb, cc = c - part * dxb, j = cc / P, p = cc - j * P;
        const bf16 *src = dh + part * N * di + t * di + j * rep * P + p;
        float s[8], v[8];
        ld8(src, s);
        for (int64_t q = 1; q < rep; q++) {
            ld8(src + q * P, v);
            for (int e = 0; e < 8; e++) s[e] += v[e];
        }
        st8(dxc + t * xbc + c, s);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);  // every lane: the same bits
    return v;
}

// Gated RMSNorm forward, one warp per (token, head): g = y * silu(z) over the head's P <= 128 channels,
// rs = 1 / sqrt(mean(g^2) + eps), yn = g * rs * w. y, z, yn [N, di] bf16; w [di] bf16; rstd [N, H] fp32 (NULL: not
// written, the backward's recomputation).
__global__ void gnorm_fwd_k(const bf16 *y, const bf16 *z, const bf16 *w, bf16 *yn, float *rstd, int64_t N, int H,
                            int P, float eps) {
    const int lane = threadIdx.x & 31;
    const int64_t nw = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; wid < N * H; wid += nw) {  // whole warps
        const int64_t t = wid / H, h = wid - t * H, off = t * (int64_t)H * P + h * P;
        float g[4], ss = 0.f;
        for (int k = 0; k < 4; k++) {
            const int p = lane + 32 * k;
            g[k] = 0.f;
            if (p < P) {
                g[k] = __bfloat162float(y[off + p]) * silu(__bfloat162float(z[off + p]));
                ss += g[k] * g[k];
            }
        }
        ss = warp_sum(ss);
        const float rs = 1.f / sqrtf(ss / (float)P + eps);
        for (int k = 0; k < 4; k++) {
            const int p = lane + 32 * k;
            if (p < P) yn[off + p] = __float2bfloat16_rn(g[k] * rs * __bfloat162float(w[h * P + p]));
        }
        if (rstd && lane == 0) rstd[wid] = rs;
    }
}

// Gated RMSNorm backward, one warp per (token, head), given dyn = d loss / d yn:
//   ghat = g rs, dot = mean_p(dyn w ghat), dg = rs (dyn w - ghat dot), dy = dg silu(z), dz = dg y silu'(z)
// with silu'(z) = sg (1 + z (1 - sg)), sg = sigmoid(z). All [N, di] bf16; rstd [N, H] fp32 from the forward.
__global__ void gnorm_bwd_k(const bf16 *dyn, const bf16 *y, const bf16 *z, const float *rstd, const bf16 *w, bf16 *dy,
                            bf16 *dz, int64_t N, int H, int P) {
    const int lane = threadIdx.x & 31;
    const int64_t nw = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; wid < N * H; wid += nw) {  // whole warps
        const int64_t t = wid / H, h = wid - t * H, off = t * (int64_t)H * P + h * P;
        const float rs = rstd[wid];
        float yv[4], zv[4], sg[4], dw[4], dot = 0.f;
        for (int k = 0; k < 4; k++) {
            const int p = lane + 32 * k;
            yv[k] = zv[k] = sg[k] = dw[k] = 0.f;
            if (p < P) {
                yv[k] = __bfloat162float(y[off + p]);
                zv[k] = __bfloat162float(z[off + p]);
                sg[k] = 1.f / (1.f + expf(-zv[k]));
                dw[k] = __bfloat162float(dyn[off + p]) * __bfloat162float(w[h * P + p]);
                dot += dw[k] * (yv[k] * zv[k] * sg[k] * rs);
            }
        }
        dot = warp_sum(dot) / (float)P;
        for (int k = 0; k < 4; k++) {
            const int p = lane + 32 * k;
            if (p >= P) continue;
            const float ghat = yv[k] * zv[k] * sg[k] * rs;
            const float dg = rs * (dw[k] - ghat * dot);
            dy[off + p] = __float2bfloat16_rn(dg * zv[k] * sg[k]);
            dz[off + p] = __float2bfloat16_rn(dg * yv[k] * sg[k] * (1.f + zv[k] * (1.f - sg[k])));
        }
    }
}

// Norm weight gradient, pass 1: part [nb, di] = per block of `rows` tokens, the sum over them in order of
// dyn * y * silu(z) * rs (one thread per channel, coalesced). Pass 2 (col_sum_add_k) adds the nb partials in order.
__global__ void gnorm_dw_part_k(const bf16 *dyn, const bf16 *y, const bf16 *z, const float *rstd, float *part,
                                int64_t N, int64_t di, int H, int P, int64_t rows) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, rb = blockIdx.y;
    if (c >= di) return;
    const int64_t h = c / P, t1 = (rb + 1) * rows < N ? (rb + 1) * rows : N;
    float acc = 0.f;
    for (int64_t t = rb * rows; t < t1; t++) {
        const int64_t i = t * di + c;
        acc += __bfloat162float(dyn[i]) * (__bfloat162float(y[i]) * silu(__bfloat162float(z[i]))) * rstd[t * H + h];
    }
    part[rb * di + c] = acc;
}
// g [n] += sum over r < nb of part [r, n], r in order
__global__ void col_sum_add_k(const float *part, int64_t nb, int64_t n, float *g) {
    GRID_STRIDE(c, n) {
        float s = 0.f;
        for (int64_t r = 0; r < nb; r++) s += part[r * n + c];
        g[c] += s;
    }
}

// The causal depthwise conv + SiLU on the fp32 xBC (mamba2_cpu.c's conv1d_silu_*_cpu math: bias first, then the W
// taps oldest first; resets cut the window). The conv input stays fp32 because rounding it to bf16 is what
// amplifies the gradient error where the gated norm is ill-conditioned (docs/MAMBA2_CUDA.md, "Accuracy"); the
// bf16 kernels of kernels/scan take bf16 input, hence these. x [N, C] fp32 token-major, rows of L tokens; w [C, W].
// Smallest position of token t's window (t global, p = t % L its position in the row): back to W-1 tokens, not
// before the row start nor before a document start (reset[t'] != 0: t' starts a document) at or before p.
__device__ __forceinline__ int64_t win_lo(const uint8_t *reset, int64_t t, int64_t p, int W) {
    int64_t lo = p;
    for (int j = 1; j < W && p - j >= 0; j++) {
        if (reset && reset[t - j + 1]) break;
        lo = p - j;
    }
    return lo;
}
// pre-activation of token t (position p, window from lo), channel c
__device__ __forceinline__ float conv_pre(const float *x, const float *w, const float *b, int64_t t, int64_t p,
                                          int64_t lo, int64_t C, int64_t c, int W) {
    float acc = b[c];
    for (int k = 0; k < W; k++)
        if (p - (W - 1) + k >= lo) acc += w[c * W + k] * x[(t - (W - 1) + k) * C + c];
    return acc;
}
__device__ __forceinline__ float dsilu(float a) {
    const float sg = 1.f / (1.f + expf(-a));
    return sg * (1.f + a * (1.f - sg));
}
// out [N, C] bf16 = silu(conv(x) + b)
__global__ void conv_fwd_k(const float *x, const float *w, const float *b, const uint8_t *reset, bf16 *out, int64_t N,
                           int64_t L, int64_t C, int W) {
    GRID_STRIDE(i, N * C) {
        const int64_t t = i / C, c = i - t * C, p = t % L;
        out[i] = __float2bfloat16_rn(silu(conv_pre(x, w, b, t, p, win_lo(reset, t, p, W), C, c, W)));
    }
}
// dx [N, C] bf16 = the conv's transpose of g = dout * silu'(pre): token s receives from the tokens t = s .. s+W-1 of
// its row whose window reaches back to s (in order of t)
__global__ void conv_bwd_dx_k(const float *x, const float *w, const float *b, const uint8_t *reset, const bf16 *dout,
                              bf16 *dx, int64_t N, int64_t L, int64_t C, int W) {
    GRID_STRIDE(i, N * C) {
        const int64_t s = i / C, c = i - s * C, q = s % L;
        float acc = 0.f;
        for (int j = 0; j < W && q + j < L; j++) {
            const int64_t t = s + j, p = q + j, lo = win_lo(reset, t, p, W);
            if (lo > q) break;  // a document starts after s: later tokens do not see s either
            const float g = __bfloat162float(dout[t * C + c]) * dsilu(conv_pre(x, w, b, t, p, lo, C, c, W));
            acc += w[c * W + (W - 1 - j)] * g;
        }
        dx[i] = __float2bfloat16_rn(acc);
    }
}
// d w, d b pass 1: part [nb, C W + C] = per block of `rows` tokens, in order, sum of g x (per tap) and of g
// (one thread per channel); pass 2: col_sum_add_k
__global__ void conv_dw_part_k(const float *x, const float *w, const float *b, const uint8_t *reset, const bf16 *dout,
                               float *part, int64_t N, int64_t L, int64_t C, int W, int64_t rows) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, rb = blockIdx.y;
    if (c >= C) return;
    const int64_t t1 = (rb + 1) * rows < N ? (rb + 1) * rows : N;
    float dw[4] = {0.f, 0.f, 0.f, 0.f}, db = 0.f;
    for (int64_t t = rb * rows; t < t1; t++) {
        const int64_t p = t % L, lo = win_lo(reset, t, p, W);
        const float g = __bfloat162float(dout[t * C + c]) * dsilu(conv_pre(x, w, b, t, p, lo, C, c, W));
        db += g;
        for (int k = 0; k < W; k++)
            if (p - (W - 1) + k >= lo) dw[k] += g * x[(t - (W - 1) + k) * C + c];
    }
    float *o = part + rb * (C * W + C);
    for (int k = 0; k < W; k++) o[c * W + k] = dw[k];
    o[C * W + c] = db;
}

// A [n] = -exp(A_log)
__global__ void neg_exp_k(float *A, const float *alog, int64_t n) {
    GRID_STRIDE(i, n) A[i] = -expf(alog[i]);
}
// y [n] += x [n]
__global__ void add_k(float *y, const float *x, int64_t n) {
    GRID_STRIDE(i, n) y[i] += x[i];
}
// y [n] += a [n] * b [n]  (A_log's gradient: dA * A, as A = -exp(A_log))
__global__ void add_mul_k(float *y, const float *a, const float *b, int64_t n) {
    GRID_STRIDE(i, n) y[i] += a[i] * b[i];
}

void add_f32(float *y, const float *x, int64_t n, cudaStream_t st) {
    add_k<<<grid_for(n, 256), 256, 0, st>>>(y, x, n);
    kernelCheck("mamba2 add");
}

int add_buf(Mamba2CudaBuf *o, int n, const char *name, void **slot, size_t bytes) {
    o[n].name = name, o[n].slot = slot, o[n].bytes = bytes;
    return n + 1;
}

// wdt [Hp, d] = in_proj's H dt rows, then Hp - H zero rows
void dt_rows(const Dims &m, const Mamba2CudaW *w, Mamba2CudaScratch *ws, cudaStream_t st) {
    const bf16 *src = (const bf16 *)w->in_proj + (m.di + m.xbc) * m.d;
    cudaCheck(cudaMemcpyAsync(ws->wdt, src, (size_t)(m.H * m.d) * 2, cudaMemcpyDeviceToDevice, st));
    if (m.Hp > m.H)
        cudaCheck(cudaMemsetAsync((bf16 *)ws->wdt + m.H * m.d, 0, (size_t)((m.Hp - m.H) * m.d) * 2, st));
}

void gnorm_fwd(const Dims &m, const void *y, const void *z, const void *w, void *yn, float *rstd, cudaStream_t st) {
    const int64_t warps = m.N * m.H;
    gnorm_fwd_k<<<grid_for(warps * 32, 256), 256, 0, st>>>((const bf16 *)y, (const bf16 *)z, (const bf16 *)w,
                                                             (bf16 *)yn, rstd, m.N, (int)m.H, (int)m.P, m.eps);
    kernelCheck("mamba2 gated norm forward");
}

void split_heads(const Dims &m, const void *xc, void *heads, cudaStream_t st) {
    split_heads_k<<<grid_for(3 * m.N * m.di / 8, 256), 256, 0, st>>>((const bf16 *)xc, (bf16 *)heads, m.N, m.di, m.dxb,
                                                                      m.xbc, m.P, m.rep);
    kernelCheck("mamba2 split heads");
}

void conv_fwd(const Dims &m, const float *xraw, const Mamba2CudaW *w, const uint8_t *reset, void *xc, cudaStream_t st) {
    conv_fwd_k<<<grid_for(m.N * m.xbc, 256), 256, 0, st>>>(xraw, w->conv_w, w->conv_b, reset, (bf16 *)xc, m.N, m.L, m.xbc,
                                                           m.W);
    kernelCheck("mamba2 conv forward");
}

bool scratch_ok(const Mamba2CudaScratch *ws, bool train) {
    if (!ws->xc || !ws->heads || !ws->dtp || !ws->wdt || !ws->A || !ws->ssd_fwd_ws) return false;
    return !train || (ws->dheads && ws->dys && ws->dz && ws->ddt && ws->dpar && ws->gwdt && ws->gnorm &&
                      ws->ssd_bwd_ws && ws->conv_part);
}

}  // namespace

#define CALL(x)                         \
    do {                                \
        if ((x) != 0) return -1; /* err filled by the callee */ \
    } while (0)

extern "C" int mamba2_cuda_shape(const HybridConfig *h, int64_t B, int64_t L, Mamba2CudaShape *s, char *err,
                                 size_t errlen) {
    const LlamaConfig *c = &h->base;
    const int64_t H = c->n_head, P = c->head_dim, kv = c->n_kv_head;
    if (B < 1 || L < 1) return train_fail(err, errlen, "mamba2_cuda: batch %lld x seqlen %lld must be positive", (long long)B, (long long)L);
    if (B * L > 0x7fffffff)
        return train_fail(err, errlen, "mamba2_cuda: %lld tokens in one call; at most 2^31 - 1 (GEMM dimensions)", (long long)(B * L));
    if (h->d_state != P)
        return train_fail(err, errlen, "mamba2_cuda: d_state %d must equal head_dim %lld (MambaInLlama's Mamba-2)", h->d_state, (long long)P);
    if (P < 16 || P > 128 || P % 16)
        return train_fail(err, errlen, "mamba2_cuda: head_dim = d_state %lld; the SSD kernels take multiples of 16 in [16, 128]",
                    (long long)P);
    if (kv < 1 || H < 1 || H % kv)
        return train_fail(err, errlen, "mamba2_cuda: n_head %lld is not a multiple of n_kv_head %lld", (long long)H, (long long)kv);
    if (h->d_inner != H * P || h->d_xb != kv * P)
        return train_fail(err, errlen, "mamba2_cuda: d_inner %d / d_xb %d must be n_head*head_dim %lld / n_kv_head*head_dim %lld",
                    h->d_inner, h->d_xb, (long long)(H * P), (long long)(kv * P));
    if (c->d_model < 8 || c->d_model % 8)
        return train_fail(err, errlen, "mamba2_cuda: d_model %d must be a multiple of 8 (cuBLASLt needs 16-byte rows)", c->d_model);
    if (h->d_conv < 1 || h->d_conv > 4) return train_fail(err, errlen, "mamba2_cuda: d_conv %d; the conv kernel takes 1..4", h->d_conv);
    s->B = B, s->L = L, s->d = c->d_model, s->H = H, s->P = P, s->kv = kv, s->W = h->d_conv, s->eps = (float)c->rms_eps;
    return 0;
}

extern "C" int mamba2_cuda_acts_bufs(const Mamba2CudaShape *s, Mamba2CudaActs *a, Mamba2CudaBuf *out) {
    const Dims m = dims_of(s);
    memset(a, 0, sizeof *a);
    int n = 0;
    n = add_buf(out, n, "mamba2 z", &a->z, (size_t)(m.N * m.di) * 2);
    n = add_buf(out, n, "mamba2 xBC (conv in, fp32)", (void **)&a->xraw, (size_t)(m.N * m.xbc) * 4);
    n = add_buf(out, n, "mamba2 dt", &a->dt, (size_t)(m.N * m.H) * 2);
    n = add_buf(out, n, "mamba2 y", &a->y, (size_t)(m.N * m.di) * 2);
    n = add_buf(out, n, "mamba2 gated norm rstd", (void **)&a->rstd, (size_t)(m.N * m.H) * 4);
    return n;
}

extern "C" int mamba2_cuda_scratch_bufs(const Mamba2CudaShape *s, int train, Mamba2CudaScratch *w, Mamba2CudaBuf *out) {
    const Dims m = dims_of(s);
    const SsdShape sh = ssd_shape(m);
    memset(w, 0, sizeof *w);
    int n = 0;
    n = add_buf(out, n, "mamba2 conv out", &w->xc, (size_t)(m.N * m.xbc) * 2);
    n = add_buf(out, n, "mamba2 heads x|B|C", &w->heads, (size_t)(3 * m.N * m.di) * 2);
    n = add_buf(out, n, "mamba2 dt padded", &w->dtp, (size_t)(m.N * m.Hp) * 2);
    n = add_buf(out, n, "mamba2 dt rows padded", &w->wdt, (size_t)(m.Hp * m.d) * 2);
    n = add_buf(out, n, "mamba2 A", (void **)&w->A, (size_t)m.H * 4);
    n = add_buf(out, n, "ssd fwd workspace", &w->ssd_fwd_ws, ssd_fwd_cuda_workspace(&sh));
    if (!train) return n;
    n = add_buf(out, n, "mamba2 d heads", &w->dheads, (size_t)(3 * m.N * m.di) * 2);
    n = add_buf(out, n, "mamba2 d y", &w->dys, (size_t)(m.N * m.di) * 2);
    n = add_buf(out, n, "mamba2 d z", &w->dz, (size_t)(m.N * m.di) * 2);
    n = add_buf(out, n, "mamba2 d dt", &w->ddt, (size_t)(m.N * m.H) * 2);
    n = add_buf(out, n, "mamba2 d per-channel params", (void **)&w->dpar, (size_t)(3 * m.H + m.xbc * m.W + m.xbc) * 4);
    n = add_buf(out, n, "mamba2 d dt rows padded", (void **)&w->gwdt, (size_t)(m.Hp * m.d) * 4);
    n = add_buf(out, n, "mamba2 d norm w partials", (void **)&w->gnorm, (size_t)(gn_blocks(m.N) * m.di) * 4);
    n = add_buf(out, n, "ssd bwd workspace", &w->ssd_bwd_ws, ssd_bwd_cuda_workspace(&sh));
    n = add_buf(out, n, "mamba2 conv d w|b partials", (void **)&w->conv_part,
                (size_t)(gn_blocks(m.N) * (m.xbc * m.W + m.xbc)) * 4);
    return n;
}

extern "C" size_t mamba2_cuda_bufs_bytes(const Mamba2CudaBuf *b, int n) {
    size_t t = 0;
    for (int i = 0; i < n; i++) t += (b[i].bytes + 255) & ~(size_t)255;
    return t;
}

extern "C" void mamba2_cuda_bufs_place(const Mamba2CudaBuf *b, int n, void *base) {
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        *b[i].slot = b[i].bytes ? (char *)base + off : NULL;
        off += (b[i].bytes + 255) & ~(size_t)255;
    }
}

extern "C" int mamba2_cuda_fwd(DlGemm *g, const Mamba2CudaShape *s, const Mamba2CudaW *w, const void *u,
                               const uint8_t *reset, void *out, Mamba2CudaActs *a, Mamba2CudaScratch *ws,
                               dl_stream_t stream, char *err, size_t errlen) {
    const Dims m = dims_of(s);
    cudaStream_t st = (cudaStream_t)stream;
    if (!w->in_proj || !w->conv_w || !w->conv_b || !w->dt_bias || !w->A_log || !w->D || !w->norm_w || !w->out_proj)
        return train_fail(err, errlen, "mamba2_cuda_fwd: a weight pointer is NULL");
    if (!u || !out || !a->z || !a->xraw || !a->dt || !a->y || !a->rstd || !scratch_ok(ws, false))
        return train_fail(err, errlen, "mamba2_cuda_fwd: input, output, activation or scratch buffer missing");
    const bf16 *Win = (const bf16 *)w->in_proj;
    // in_proj: z [N, di], xBC [N, xbc] straight from their row blocks; dt [N, H] through the padded rows
    CALL(dl_linear_fwd(g, DT_BF16, a->z, u, Win, NULL, m.N, m.d, m.di, 0, stream, err, errlen));
    CALL(dl_gemm(g, (int)m.N, (int)m.xbc, (int)m.d, DT_BF16, u, 0, Win + m.di * m.d, 1, DT_F32, a->xraw, NULL, 1.f, 0.f,
                 stream, err, errlen));  // fp32 output: the conv input is kept fp32
    dt_rows(m, w, ws, st);
    CALL(dl_linear_fwd(g, DT_BF16, ws->dtp, u, ws->wdt, NULL, m.N, m.d, m.Hp, 0, stream, err, errlen));
    cudaCheck(cudaMemcpy2DAsync(a->dt, (size_t)m.H * 2, ws->dtp, (size_t)m.Hp * 2, (size_t)m.H * 2, (size_t)m.N,
                                cudaMemcpyDeviceToDevice, st));
    // conv + SiLU over the compact xBC (resets cut the window), then the heads for the SSD
    conv_fwd(m, a->xraw, w, reset, ws->xc, st);
    split_heads(m, ws->xc, ws->heads, st);
    neg_exp_k<<<1, 256, 0, st>>>(ws->A, w->A_log, m.H);
    kernelCheck("mamba2 A");
    const SsdShape sh = ssd_shape(m);
    const uint16_t *xr = (const uint16_t *)ws->heads, *Br = xr + m.N * m.di, *Cc = xr + 2 * m.N * m.di;
    CALL(ssd_fwd_cuda(&sh, xr, (const uint16_t *)a->dt, ws->A, Br, Cc, w->D, w->dt_bias, reset, NULL,
                      (uint16_t *)a->y, NULL, ws->ssd_fwd_ws, stream, err, errlen));
    // gated norm into heads slice 0 (the SSD is done with it), out_proj
    gnorm_fwd(m, a->y, a->z, w->norm_w, ws->heads, a->rstd, st);
    CALL(dl_linear_fwd(g, DT_BF16, out, ws->heads, w->out_proj, NULL, m.N, m.di, m.d, 0, stream, err, errlen));
    return 0;
}

extern "C" int mamba2_cuda_bwd(DlGemm *g, const Mamba2CudaShape *s, const Mamba2CudaW *w, const Mamba2CudaG *gr,
                               const void *u, const uint8_t *reset, const void *dout, void *dx,
                               const Mamba2CudaActs *a, Mamba2CudaScratch *ws, dl_stream_t stream, char *err,
                               size_t errlen) {
    const Dims m = dims_of(s);
    cudaStream_t st = (cudaStream_t)stream;
    const Mamba2CudaG none = {};
    if (!gr) gr = &none;
    const bool below = dx || gr->in_proj || gr->conv_w || gr->conv_b || gr->dt_bias || gr->A_log || gr->D;
    if (!below && !gr->norm_w && !gr->out_proj) return 0;
    if (!w->in_proj || !w->conv_w || !w->conv_b || !w->dt_bias || !w->A_log || !w->D || !w->norm_w || !w->out_proj)
        return train_fail(err, errlen, "mamba2_cuda_bwd: a weight pointer is NULL");
    if (!u || !dout || !a->z || !a->xraw || !a->dt || !a->y || !a->rstd || !scratch_ok(ws, true))
        return train_fail(err, errlen, "mamba2_cuda_bwd: input, activation or scratch buffer missing (scratch needs train = 1)");
    const int64_t N = m.N, di = m.di, d = m.d;
    void *yn = ws->heads, *dyn = ws->dheads;  // slice 0 of each, free until the SSD's recomputation / backward
    // out_proj: dyn = dout W_out; dW_out += dout^T yn (yn recomputed: the forward's bits)
    if (gr->out_proj) {
        gnorm_fwd(m, a->y, a->z, w->norm_w, yn, NULL, st);
        CALL(dl_linear_wgrad(g, DT_BF16, DT_F32, gr->out_proj, dout, yn, N, di, d, 1, stream, err, errlen));
    }
    if (!below && !gr->norm_w) return 0;
    CALL(dl_linear_dgrad(g, DT_BF16, dyn, dout, w->out_proj, N, di, d, 0, stream, err, errlen));
    // gated norm: the weight's gradient by fixed row blocks, then d y and d z
    if (gr->norm_w) {
        const int64_t rows = gn_rows(N), nb = gn_blocks(N);
        gnorm_dw_part_k<<<dim3((unsigned)((di + 255) / 256), (unsigned)nb), 256, 0, st>>>(
            (const bf16 *)dyn, (const bf16 *)a->y, (const bf16 *)a->z, a->rstd, ws->gnorm, N, di, (int)m.H, (int)m.P, rows);
        kernelCheck("mamba2 norm weight partials");
        col_sum_add_k<<<grid_for(di, 256), 256, 0, st>>>(ws->gnorm, nb, di, gr->norm_w);
        kernelCheck("mamba2 norm weight sum");
    }
    if (!below) return 0;
    gnorm_bwd_k<<<grid_for(N * m.H * 32, 256), 256, 0, st>>>((const bf16 *)dyn, (const bf16 *)a->y, (const bf16 *)a->z,
                                                              a->rstd, (const bf16 *)w->norm_w, (bf16 *)ws->dys,
                                                              (bf16 *)ws->dz, N, (int)m.H, (int)m.P);
    kernelCheck("mamba2 gated norm backward");
    // recompute the SSD inputs: conv output, heads, A
    conv_fwd(m, a->xraw, w, reset, ws->xc, st);
    split_heads(m, ws->xc, ws->heads, st);
    neg_exp_k<<<1, 256, 0, st>>>(ws->A, w->A_log, m.H);
    kernelCheck("mamba2 A");
    // SSD backward: d x, d B (per head), d C into dheads; d dt; dA, dD, d dt_bias (fp32, fixed order)
    float *dA = ws->dpar, *dD = dA + m.H, *ddtb = dD + m.H, *dcw = ddtb + m.H, *dcb = dcw + m.xbc * m.W;
    const SsdShape sh = ssd_shape(m);
    const uint16_t *xr = (const uint16_t *)ws->heads, *Br = xr + N * di, *Cc = xr + 2 * N * di;
    uint16_t *dxr = (uint16_t *)ws->dheads, *dBr = dxr + N * di, *dCc = dxr + 2 * N * di;
    CALL(ssd_bwd_cuda(&sh, xr, (const uint16_t *)a->dt, ws->A, Br, Cc, w->D, w->dt_bias, reset, NULL,
                      (const uint16_t *)ws->dys, NULL, dxr, (uint16_t *)ws->ddt, dA, dBr, dCc, dD, ddtb, NULL,
                      ws->ssd_bwd_ws, 0, stream, err, errlen));
    if (gr->A_log) {
        add_mul_k<<<1, 256, 0, st>>>(gr->A_log, dA, ws->A, m.H);
        kernelCheck("mamba2 A_log gradient");
    }
    if (gr->D) add_f32(gr->D, dD, m.H, st);
    if (gr->dt_bias) add_f32(gr->dt_bias, ddtb, m.H, st);  // dt_bias enters once: its gradient is the SSD's
    // undo the repeat (into xc's buffer: d conv output), then the conv backward (d xBC raw into heads' buffer)
    merge_heads_k<<<grid_for(N * m.xbc / 8, 256), 256, 0, st>>>((const bf16 *)ws->dheads, (bf16 *)ws->xc, N, di, m.dxb,
                                                                 m.xbc, m.P, m.rep);
    kernelCheck("mamba2 merge heads");
    void *dxraw = ws->heads;
    conv_bwd_dx_k<<<grid_for(N * m.xbc, 256), 256, 0, st>>>(a->xraw, w->conv_w, w->conv_b, reset, (const bf16 *)ws->xc,
                                                            (bf16 *)dxraw, N, m.L, m.xbc, m.W);
    kernelCheck("mamba2 conv backward (d x)");
    if (gr->conv_w || gr->conv_b) {  // d w, d b into dcw, dcb (adjacent in dpar) by fixed row blocks
        const int64_t rows = gn_rows(N), nb = gn_blocks(N), nc = m.xbc * m.W + m.xbc;
        conv_dw_part_k<<<dim3((unsigned)((m.xbc + 255) / 256), (unsigned)nb), 256, 0, st>>>(
            a->xraw, w->conv_w, w->conv_b, reset, (const bf16 *)ws->xc, ws->conv_part, N, m.L, m.xbc, m.W, rows);
        kernelCheck("mamba2 conv backward (d w partials)");
        cudaCheck(cudaMemsetAsync(dcw, 0, (size_t)nc * 4, st));
        col_sum_add_k<<<grid_for(nc, 256), 256, 0, st>>>(ws->conv_part, nb, nc, dcw);
        kernelCheck("mamba2 conv backward (d w sums)");
    }
    if (gr->conv_w) add_f32(gr->conv_w, dcw, m.xbc * m.W, st);
    if (gr->conv_b) add_f32(gr->conv_b, dcb, m.xbc, st);
    // d dt into the padded [N, Hp] layout (zero columns: they meet the zero rows of wdt)
    cudaCheck(cudaMemsetAsync(ws->dtp, 0, (size_t)(N * m.Hp) * 2, st));
    cudaCheck(cudaMemcpy2DAsync(ws->dtp, (size_t)m.Hp * 2, ws->ddt, (size_t)m.H * 2, (size_t)m.H * 2, (size_t)N,
                                cudaMemcpyDeviceToDevice, st));
    // in_proj: dx = dz W_z + d xBC W_xbc + d dt W_dt; dW_in += [dz | d xBC | d dt]^T u, block by block
    const bf16 *Win = (const bf16 *)w->in_proj;
    if (dx) {
        dt_rows(m, w, ws, st);
        CALL(dl_linear_dgrad(g, DT_BF16, dx, ws->dz, Win, N, d, di, 0, stream, err, errlen));
        CALL(dl_linear_dgrad(g, DT_BF16, dx, dxraw, Win + di * d, N, d, m.xbc, 1, stream, err, errlen));
        CALL(dl_linear_dgrad(g, DT_BF16, dx, ws->dtp, ws->wdt, N, d, m.Hp, 1, stream, err, errlen));
    }
    if (gr->in_proj) {
        CALL(dl_linear_wgrad(g, DT_BF16, DT_F32, gr->in_proj, ws->dz, u, N, d, di, 1, stream, err, errlen));
        CALL(dl_linear_wgrad(g, DT_BF16, DT_F32, gr->in_proj + di * d, dxraw, u, N, d, m.xbc, 1, stream, err, errlen));
        CALL(dl_linear_wgrad(g, DT_BF16, DT_F32, ws->gwdt, ws->dtp, u, N, d, m.Hp, 0, stream, err, errlen));
        add_f32(gr->in_proj + (di + m.xbc) * d, ws->gwdt, m.H * d, st);
    }
    return 0;
}
