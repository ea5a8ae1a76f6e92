// layers_cpu.c: see layers_cpu.h.
#include "distill/layers_cpu.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "distill/common.h"

// Parallelize a loop only when it has enough work: fork/join of threads costs microseconds on an idle
// machine but a scheduler quantum when cores are shared, and decode steps run hundreds of tiny loops.
#define PAR(work) ((int64_t)(work) >= (1 << 15))

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

static inline float dotf(const float *a, const float *b, int n) {
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void attention_fwd(const AttnShape *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                   float *out, float *lse) {
    const int64_t B = s->B, Tq = s->Tq, Tk = s->Tk;
    const int nh = s->nh, nkv = s->nkv, hd = s->hd, rep = nh / nkv;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t rows = B * nh * Tq;
#pragma omp parallel if (PAR(rows * (s->q0 + Tq) * hd / 2))
    {
        float *sc = dl_malloc((size_t)Tk * sizeof(float));
#pragma omp for schedule(dynamic, 16)
        for (int64_t r = 0; r < rows; r++) {
            int64_t b = r / (nh * Tq), h = (r / Tq) % nh, t = r % Tq, g = h / rep;
            int64_t hi = s->q0 + t, lo = doc_start ? doc_start[b * Tq + t] : 0;
            const float *qr = q + (b * Tq + t) * qs + h * hd;
            float mx = -INFINITY;
            for (int64_t j = lo; j <= hi; j++) {
                float x = dotf(qr, k + (b * Tk + j) * ks + g * hd, hd) * scale;
                sc[j] = x;
                if (x > mx) mx = x;
            }
            double sum = 0;
            for (int64_t j = lo; j <= hi; j++) {
                sc[j] = expf(sc[j] - mx);
                sum += sc[j];
            }
            float inv = (float)(1.0 / sum);
            float *o = out + (b * Tq + t) * qs + h * hd;
            for (int i = 0; i < hd; i++) o[i] = 0;
            for (int64_t j = lo; j <= hi; j++) {
                float p = sc[j] * inv;
                const float *vr = v + (b * Tk + j) * ks + g * hd;
#pragma omp simd
                for (int i = 0; i < hd; i++) o[i] += p * vr[i];
            }
            if (lse) lse[(b * nh + h) * Tq + t] = mx + (float)log(sum);
        }
        free(sc);
    }
}

void attention_bwd(const AttnShape *s, const float *q, const float *k, const float *v, const int32_t *doc_start,
                   const float *out, const float *lse, const float *dout, float *dq, float *dk, float *dv) {
    const int64_t B = s->B, T = s->Tq;
    const int nh = s->nh, nkv = s->nkv, hd = s->hd, rep = nh / nkv;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    memset(dq, 0, (size_t)(B * T * qs) * sizeof(float));
    memset(dk, 0, (size_t)(B * T * ks) * sizeof(float));
    memset(dv, 0, (size_t)(B * T * ks) * sizeof(float));
    // one task per (batch row, KV head): it owns dk/dv of that head and dq of the heads sharing it
#pragma omp parallel for schedule(static) if (PAR(B * nkv * T * T * hd / 2))
    for (int64_t bg = 0; bg < B * nkv; bg++) {
        int64_t b = bg / nkv, g = bg % nkv;
        for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
            for (int64_t t = 0; t < T; t++) {
                int64_t lo = doc_start ? doc_start[b * T + t] : 0;
                const float *qr = q + (b * T + t) * qs + h * hd, *dor = dout + (b * T + t) * qs + h * hd;
                const float *orow = out + (b * T + t) * qs + h * hd;
                float m = lse[(b * nh + h) * T + t];
                float Di = dotf(dor, orow, hd);
                float *dqr = dq + (b * T + t) * qs + h * hd;
                for (int64_t j = lo; j <= t; j++) {
                    const float *kr = k + (b * T + j) * ks + g * hd, *vr = v + (b * T + j) * ks + g * hd;
                    float p = expf(dotf(qr, kr, hd) * scale - m);
                    float dp = dotf(dor, vr, hd);
                    float ds = p * (dp - Di) * scale;
                    float *dkr = dk + (b * T + j) * ks + g * hd, *dvr = dv + (b * T + j) * ks + g * hd;
#pragma omp simd
                    for (int i = 0; i < hd; i++) {
                        dqr[i] += ds * kr[i];
                        dkr[i] += ds * qr[i];
                        dvr[i] += p * dor[i];
                    }
                }
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
