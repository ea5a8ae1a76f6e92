// layers_cpu.c: see layers_cpu.h.
#include "distill/layers_cpu.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "distill/common.h"
#include "distill/dtype.h"

// Parallelize a loop only when it has enough work: fork/join of threads costs microseconds on an idle
// machine but a scheduler quantum when cores are shared, and decode steps run hundreds of tiny loops.
#define PAR(work) ((int64_t)(work) >= (1 << 15))

// ---------------------------------------------------------------- vector exp

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f v4_exp(v4f x) {
    const v4f lo = {-87.0f, -87.0f, -87.0f, -87.0f}, hi = {88.0f, 88.0f, 88.0f, 88.0f};
    v4i m = x > lo;
    x = (v4f)(((v4i)x & m) | ((v4i)lo & ~m));
    m = x < hi;
    x = (v4f)(((v4i)x & m) | ((v4i)hi & ~m));
    const float shifter = 12582912.0f;
    v4f t = x * 1.44269504f + shifter, fn = t - shifter;
    v4f r = x - fn * 0.693145751953125f - fn * 1.428606765330187e-06f;
    v4f p = r * (1.0f / 720) + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v4i e = ((v4i)t - 0x4B400000 + 127) << 23;
    return p * (v4f)e;
}

double dl_exp_affine(float *out, const float *x, int64_t n, float a, float sub, float scale) {
    double total = 0;
    for (int64_t b0 = 0; b0 < n; b0 += 256) {
        const int64_t b1 = DL_MIN(n, b0 + 256);
        v4f acc = {0, 0, 0, 0};
        int64_t i = b0;
        for (; i + 4 <= b1; i += 4) {
            v4f v;
            memcpy(&v, x + i, sizeof v);
            v = v4_exp(v * a - sub);
            acc += v;
            if (out) {
                v *= scale;
                memcpy(out + i, &v, sizeof v);
            }
        }
        float tail = 0;
        for (; i < b1; i++) {
            float v = dl_expf(x[i] * a - sub);
            tail += v;
            if (out) out[i] = scale * v;
        }
        total += (double)((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail;
    }
    return total;
}

// ---------------------------------------------------------------- linear

void linear_fwd(float *out, const float *in, const float *W, int64_t N, int64_t In, int64_t O, bool accumulate) {
    if (N == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)O, (int)In, 1.0f, in, (int)In, W, (int)In,
                accumulate ? 1.0f : 0.0f, out, (int)O);
}

void linear_bwd(float *din, bool din_accumulate, float *dW, const float *dout, const float *in, const float *W,
                int64_t N, int64_t In, int64_t O) {
    if (N == 0) return;
    if (din)  // [N, O] @ [O, In]
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)N, (int)In, (int)O, 1.0f, dout, (int)O, W, (int)In,
                    din_accumulate ? 1.0f : 0.0f, din, (int)In);
    if (dW)  // [O, N] @ [N, In]
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)O, (int)In, (int)N, 1.0f, dout, (int)O, in, (int)In,
                    1.0f, dW, (int)In);
}

// ---------------------------------------------------------------- embedding

void embedding_fwd(float *out, const int32_t *tokens, const float *wte, int64_t N, int64_t d) {
#pragma omp parallel for schedule(static) if (PAR(N * d))
    for (int64_t n = 0; n < N; n++) memcpy(out + n * d, wte + (int64_t)tokens[n] * d, (size_t)d * sizeof(float));
}

// Column blocks of 64 per task: each output element is summed over tokens in token order.
void embedding_bwd(float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t d) {
    const int64_t CB = 64, nb = (d + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (PAR(N * d))
    for (int64_t cb = 0; cb < nb; cb++) {
        int64_t c0 = cb * CB, c1 = DL_MIN(d, c0 + CB);
        for (int64_t n = 0; n < N; n++) {
            float *dst = dwte + (int64_t)tokens[n] * d;
            const float *src = dout + n * d;
            for (int64_t c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
}

// ---------------------------------------------------------------- RMSNorm

void rmsnorm_fwd(float *out, float *rstd, const float *in, const float *w, int64_t N, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (PAR(N * d))
    for (int64_t n = 0; n < N; n++) {
        const float *x = in + n * d;
        double ss = 0;
        for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
        float r = 1.0f / sqrtf((float)(ss / (double)d) + eps);
        if (rstd) rstd[n] = r;
        float *y = out + n * d;
        for (int64_t i = 0; i < d; i++) y[i] = w[i] * (x[i] * r);
    }
}

void rmsnorm_bwd(float *din, float *dw, const float *dout, const float *in, const float *w, const float *rstd,
                 int64_t N, int64_t d) {
    // dx_i = r * w_i dy_i - r^3 / d * x_i * sum_j w_j dy_j x_j
#pragma omp parallel for schedule(static) if (PAR(N * d))
    for (int64_t n = 0; n < N; n++) {
        const float *x = in + n * d, *dy = dout + n * d;
        float r = rstd[n];
        double dot = 0;
        for (int64_t i = 0; i < d; i++) dot += (double)w[i] * dy[i] * x[i];
        float c = (float)(dot * r * r * r / (double)d);
        float *dx = din + n * d;
        for (int64_t i = 0; i < d; i++) dx[i] += r * w[i] * dy[i] - c * x[i];
    }
    if (!dw) return;
    const int64_t CB = 64, nb = (d + CB - 1) / CB;
#pragma omp parallel for schedule(static) if (PAR(N * d))
    for (int64_t cb = 0; cb < nb; cb++) {
        int64_t c0 = cb * CB, c1 = DL_MIN(d, c0 + CB);
        for (int64_t n = 0; n < N; n++) {
            const float *x = in + n * d, *dy = dout + n * d;
            float r = rstd[n];
            for (int64_t c = c0; c < c1; c++) dw[c] += dy[c] * (x[c] * r);
        }
    }
}

// ---------------------------------------------------------------- RoPE

void rope_inv_freq(const LlamaConfig *c, float *inv_freq) {
    const int half = c->head_dim / 2;
    // as HF computes it in float32: 1 / base^(2i/hd)
    for (int i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)c->head_dim;
        inv_freq[i] = 1.0f / powf((float)c->rope_theta, e);
    }
    if (c->rope_factor > 0) {  // Llama-3.1 "llama3": long wavelengths slowed by factor, a smooth band between
        const double factor = c->rope_factor, lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
        const double old_ctx = c->rope_orig_max_pos;
        const double low_wavelen = old_ctx / lo, high_wavelen = old_ctx / hi;
        for (int i = 0; i < half; i++) {
            double f = inv_freq[i], wavelen = 2.0 * M_PI / f;
            double scaled = wavelen > low_wavelen ? f / factor : f;
            if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
                double smooth = (old_ctx / wavelen - lo) / (hi - lo);
                scaled = (1.0 - smooth) * scaled / factor + smooth * scaled;
            }
            inv_freq[i] = (float)scaled;
        }
    }
}

void rope_apply(float *x, const int32_t *pos, const float *inv_freq, int64_t N, int nheads, int hd, bool inverse) {
    const int half = hd / 2;
#pragma omp parallel for schedule(static) if (PAR(N * nheads * hd))
    for (int64_t n = 0; n < N; n++) {
        float cs[512], sn[512];  // head_dim <= 1024
        for (int i = 0; i < half; i++) {
            float ang = (float)pos[n] * inv_freq[i];  // fp32 product, as HF's inv_freq @ position_ids
            cs[i] = (float)cos((double)ang);
            sn[i] = (float)sin((double)ang);
            if (inverse) sn[i] = -sn[i];
        }
        for (int h = 0; h < nheads; h++) {
            float *v = x + (n * nheads + h) * (int64_t)hd;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = b * cs[i] + a * sn[i];
            }
        }
    }
}

void doc_positions(int64_t B, int64_t T, const uint8_t *reset, int32_t *pos, int32_t *doc_start) {
    for (int64_t b = 0; b < B; b++) {
        int64_t start = 0;
        for (int64_t t = 0; t < T; t++) {
            if (reset && reset[b * T + t]) start = t;
            if (pos) pos[b * T + t] = (int32_t)(t - start);
            if (doc_start) doc_start[b * T + t] = (int32_t)start;
        }
    }
}

// ---------------------------------------------------------------- attention
// Blocked: for each (batch row, head) and block of QB queries, the scores against the keys the block can
// see are one sgemm, masked and softmaxed row by row, then multiplied by V in a second sgemm. Tasks are
// independent, run in parallel with OpenBLAS single-threaded inside them (restored afterwards).

enum { QB = 64 };

static inline float dotf(const float *a, const float *b, int n) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// key range [lo, hi] seen by queries t0..t1-1 of batch row b (union over the block)
static void block_keys(const AttnShape *s, const int32_t *doc_start, int64_t b, int64_t t0, int64_t t1, int64_t *lo,
                       int64_t *hi) {
    *hi = s->q0 + t1 - 1;
    *lo = *hi;
    for (int64_t t = t0; t < t1; t++) *lo = DL_MIN(*lo, doc_start ? doc_start[b * s->Tq + t] : 0);
}

// Per-thread scratch that grows and is kept (OpenMP keeps its threads): large per-call allocations would be
// fresh mmaps, and zeroing their pages cost more than the softmax.
static float *thread_scratch(int slot, size_t n) {
    static _Thread_local float *buf[2];
    static _Thread_local size_t cap[2];
    if (n > cap[slot]) {
        free(buf[slot]);
        buf[slot] = dl_malloc(n * sizeof(float));
        cap[slot] = n;
    }
    return buf[slot];
}

int blas_set_threads(int n) {
    int prev = openblas_get_num_threads();
    if (n != prev) openblas_set_num_threads(n);
    return prev;
}

// Rounding in attention_fwd: bit 1 rounds the softmax weights to bf16 before P·V (as fused flash-attention kernels
// such as cuDNN's do), bit 2 the output (as any bf16 engine stores it). The backward still recomputes an fp32 P from
// the lse, as those kernels do. DISTILL_CPU_ATTN_ROUND=p|o|po (a diagnostic of the init hybrid's conditioning,
// docs/ENGINE_CUDA.md) overrides attention_cpu_round_p.
static int g_attn_round = 0;
void attention_cpu_round_p(bool on) { g_attn_round = on ? 1 : 0; }
static int attn_round_mode(void) {
    const char *v = getenv("DISTILL_CPU_ATTN_ROUND");
    if (!v || !*v) return g_attn_round;
    return (strchr(v, 'p') ? 1 : 0) | (strchr(v, 'o') ? 2 : 0);
}

void attention_fwd(const AttnShape *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                   float *out, float *lse) {
    const int round_mode = attn_round_mode();
    const int64_t B = s->B, Tq = s->Tq, Tk = s->Tk;
    const int nh = s->nh, nkv = s->nkv, hd = s->hd, rep = nh / nkv;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t nqb = (Tq + QB - 1) / QB, tasks = B * nh * nqb;
    const bool par = PAR(B * nh * Tq * (s->q0 + Tq) * hd / 2);
    // the per-block GEMMs are tiny and, inside this parallel region, OpenBLAS's OpenMP build runs them
    // serially: no thread pinning needed (pinning BLAS to 1 thread would pin OpenMP too, serializing this loop)
#pragma omp parallel if (par)
    {
        float *S = thread_scratch(0, (size_t)(QB * Tk));
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t b = task / (nh * nqb), h = (task / nqb) % nh, t0 = (task % nqb) * QB, t1 = DL_MIN(Tq, t0 + QB);
            int64_t g = h / rep, lo, hi;
            block_keys(s, doc_start, b, t0, t1, &lo, &hi);
            const int64_t n = t1 - t0, span = hi - lo + 1;
            const float *qb = q + (b * Tq + t0) * qs + h * hd;
            const float *kb = k + (b * Tk + lo) * ks + g * hd, *vb = v + (b * Tk + lo) * ks + g * hd;
            // S [n, span] = Q_blk K^T
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)span, hd, scale, qb, (int)qs, kb, (int)ks,
                        0.0f, S, (int)span);
            for (int64_t i = 0; i < n; i++) {
                int64_t t = t0 + i, rlo = (doc_start ? doc_start[b * Tq + t] : 0) - lo, rhi = s->q0 + t - lo;
                float *row = S + i * span, mx = -INFINITY;
                for (int64_t j = rlo; j <= rhi; j++) mx = row[j] > mx ? row[j] : mx;  // (fmaxf is a libm call)
                for (int64_t j = 0; j < rlo; j++) row[j] = 0;
                for (int64_t j = rhi + 1; j < span; j++) row[j] = 0;
                double sum = dl_exp_affine(row + rlo, row + rlo, rhi - rlo + 1, 1.0f, mx, 1.0f);
                float inv = (float)(1.0 / sum);
                for (int64_t j = rlo; j <= rhi; j++) row[j] *= inv;
                if (round_mode & 1) bf16_round_array(row + rlo, rhi - rlo + 1);
                if (lse) lse[(b * nh + h) * Tq + t] = mx + (float)log(sum);
            }
            // O_blk [n, hd] = P V
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, hd, (int)span, 1.0f, S, (int)span, vb, (int)ks,
                        0.0f, out + (b * Tq + t0) * qs + h * hd, (int)qs);
            if (round_mode & 2)
                for (int64_t i = 0; i < n; i++) bf16_round_array(out + (b * Tq + t0 + i) * qs + h * hd, hd);
        }
    }
}

void attention_bwd(const AttnShape *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                   const float *out, const float *lse, const float *dout, float *dq, float *dk, float *dv) {
    const int64_t B = s->B, T = s->Tq;
    const int nh = s->nh, nkv = s->nkv, hd = s->hd, rep = nh / nkv;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    memset(dk, 0, (size_t)(B * T * ks) * sizeof(float));
    memset(dv, 0, (size_t)(B * T * ks) * sizeof(float));
    const int64_t nqb = (T + QB - 1) / QB;
    // one task per (batch row, KV head): it owns dk/dv of that head and dq of the heads sharing it, and
    // walks heads and query blocks in a fixed order, so the dk/dv sums are race-free and deterministic
#pragma omp parallel if (PAR(B * nh * T * T * hd / 2))
    {
        float *P = thread_scratch(0, (size_t)(QB * T)), *dP = thread_scratch(1, (size_t)(QB * T));
#pragma omp for schedule(static)
        for (int64_t bg = 0; bg < B * nkv; bg++) {
            int64_t b = bg / nkv, g = bg % nkv;
            for (int64_t h = g * rep; h < (g + 1) * rep; h++)
                for (int64_t qbi = 0; qbi < nqb; qbi++) {
                    int64_t t0 = qbi * QB, t1 = DL_MIN(T, t0 + QB), lo, hi;
                    block_keys(s, doc_start, b, t0, t1, &lo, &hi);
                    const int64_t n = t1 - t0, span = hi - lo + 1;
                    const float *qb = q + (b * T + t0) * qs + h * hd, *dob = dout + (b * T + t0) * qs + h * hd;
                    const float *kb = k + (b * T + lo) * ks + g * hd, *vb = v + (b * T + lo) * ks + g * hd;
                    // P = exp(scale Q K^T - lse) on the visible keys; dP = dO V^T
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)span, hd, scale, qb, (int)qs, kb,
                                (int)ks, 0.0f, P, (int)span);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)span, hd, 1.0f, dob, (int)qs, vb,
                                (int)ks, 0.0f, dP, (int)span);
                    for (int64_t i = 0; i < n; i++) {
                        int64_t t = t0 + i, rlo = (doc_start ? doc_start[b * T + t] : 0) - lo, rhi = t - lo;
                        float m = lse[(b * nh + h) * T + t];
                        float Di = dotf(dob + i * qs, out + (b * T + t) * qs + h * hd, hd);
                        float *pr = P + i * span, *dpr = dP + i * span;
                        for (int64_t j = 0; j < rlo; j++) pr[j] = dpr[j] = 0;
                        for (int64_t j = rhi + 1; j < span; j++) pr[j] = dpr[j] = 0;
                        dl_exp_affine(pr + rlo, pr + rlo, rhi - rlo + 1, 1.0f, m, 1.0f);
                        for (int64_t j = rlo; j <= rhi; j++) dpr[j] = pr[j] * (dpr[j] - Di) * scale;  // dS
                    }
                    // dQ_blk = dS K; dK += dS^T Q_blk; dV += P^T dO_blk
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, hd, (int)span, 1.0f, dP, (int)span, kb,
                                (int)ks, 0.0f, dq + (b * T + t0) * qs + h * hd, (int)qs);
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)span, hd, (int)n, 1.0f, dP, (int)span, qb,
                                (int)qs, 1.0f, dk + (b * T + lo) * ks + g * hd, (int)ks);
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)span, hd, (int)n, 1.0f, P, (int)span, dob,
                                (int)qs, 1.0f, dv + (b * T + lo) * ks + g * hd, (int)ks);
                }
        }
    }
}

// ---------------------------------------------------------------- SwiGLU

void swiglu_fwd(float *out, const float *gate, const float *up, int64_t n) {
#pragma omp parallel for schedule(static) if (PAR(n))
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void swiglu_bwd(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n) {
#pragma omp parallel for schedule(static) if (PAR(n))
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i], sg = 1.0f / (1.0f + expf(-g)), silu = g * sg;
        dup[i] = dout[i] * silu;
        dgate[i] = dout[i] * up[i] * sg * (1.0f + g * (1.0f - sg));
    }
}

void vec_add(float *y, const float *x, int64_t n) {
#pragma omp parallel for schedule(static) if (PAR(n))
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}
