// mamba2_cpu.c: MambaInLlama's Mamba-2 mixer on the CPU (see mamba2_cpu.h for the math).
// One core forward serves training, prefill, multi-token and single-token decode; the cached paths only
// add the conv window (x_prev) and the SSM state (h0 / h_keep) of the scan.
#include "distill/mamba2_cpu.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/dtype.h"
#include "kernels/scan/selective_scan.h"
#include "kernels/ssd/ssd.h"

typedef struct {
    int64_t d, H, P, N, kv, rep, di, dxb, xbc, n_in;
    int W;
    float eps;
} Dims;

// The layer's tensors (pointers into params) and their offsets (for the grads buffer).
enum { T_IN = 0, T_CONVW, T_CONVB, T_DTB, T_ALOG, T_D, T_NORM, T_OUT, T_COUNT };
typedef struct {
    const float *p[T_COUNT];
    int64_t off[T_COUNT];
} Tensors;

static Dims dims_of(const HybridConfig *h) {
    const LlamaConfig *c = &h->base;
    Dims m;
    m.d = c->d_model;
    m.H = c->n_head;
    m.P = c->head_dim;
    m.N = h->d_state;
    m.kv = c->n_kv_head;
    m.rep = m.H / m.kv;
    m.di = h->d_inner;
    m.dxb = h->d_xb;
    m.xbc = m.dxb + m.dxb + m.di;
    m.n_in = m.di + m.xbc + m.H;
    m.W = h->d_conv;
    m.eps = (float)c->rms_eps;
    return m;
}

// Looks the layer's tensors up; a wrong layout is a program error (the registry comes from
// model_build_registry), so it dies naming the tensor.
static Tensors tensors_of(const HybridConfig *h, const Registry *r, const float *params, int layer) {
    static const char *names[T_COUNT] = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                         "A_log",          "D",             "norm.weight", "out_proj.weight"};
    const Dims m = dims_of(h);
    const int64_t numel[T_COUNT] = {m.n_in * m.d, m.xbc * m.W, m.xbc, m.H, m.H, m.H, m.di, m.d * m.di};
    if (layer < 0 || layer >= h->base.n_layer || h->mixer[layer] != MIXER_MAMBA2)
        dl_die(DL_EXIT_RUNTIME, "mamba2: layer %d is not a Mamba-2 layer", layer);
    if (m.N != m.P) dl_die(DL_EXIT_RUNTIME, "mamba2: d_state %lld must equal head_dim %lld", (long long)m.N, (long long)m.P);
    Tensors t;
    for (int k = 0; k < T_COUNT; k++) {
        char name[DL_TENSOR_NAME_MAX];
        snprintf(name, sizeof name, "model.layers.%d.mamba.%s", layer, names[k]);
        int i = reg_find(r, name);
        if (i < 0) dl_die(DL_EXIT_RUNTIME, "mamba2: the registry has no tensor %s", name);
        if (r->t[i].numel != numel[k])
            dl_die(DL_EXIT_RUNTIME, "mamba2: %s has %lld elements, expected %lld", name, (long long)r->t[i].numel,
                   (long long)numel[k]);
        t.off[k] = r->t[i].offset;
        t.p[k] = params + t.off[k];
    }
    return t;
}

static inline float silu_f(float v) { return v / (1.f + expf(-v)); }

// bf16 storage emulation (mamba2_cpu_round_storage): bit 1 the intermediates, bit 2 the boundary
enum { RND_MID = 1, RND_IO = 2 };
static int g_m2_round = 0;
void mamba2_cpu_round_storage(bool on) { g_m2_round = on ? RND_MID | RND_IO : 0; }
static int round_mode(void) {
    const char *v = getenv("DISTILL_CPU_M2_ROUND");
    if (!v || !*v) return g_m2_round;
    return (strchr(v, 'i') ? RND_MID : 0) | (strchr(v, 'b') ? RND_IO : 0);
}
// Columns c0 .. c0+n-1 of every row of x [rows, stride] rounded to bf16 (z and dt inside [T, n_in]).
static void round_cols(float *x, int64_t rows, int64_t stride, int64_t c0, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < rows; t++) bf16_round_array(x + t * stride + c0, n);
}
// With the boundary rounded: a bf16-rounded copy of x [n] (the caller frees it); else NULL.
static float *io_copy(const float *x, int64_t n, int rnd) {
    if (!(rnd & RND_IO)) return NULL;
    float *c = dl_malloc((size_t)n * sizeof(float));
    memcpy(c, x, (size_t)n * sizeof(float));
    bf16_round_array(c, n);
    return c;
}

struct Mamba2Acts {
    int64_t cap;   // tokens
    float *u;      // [T, d]      mixer input
    float *proj;   // [T, n_in]   [z | xBC raw | dt]
    float *xraw;   // [T, xbc]    xBC before the conv (contiguous copy for the conv)
    float *xc;     // [T, xbc]    silu(conv(xBC) + b)
    float *y;      // [T, di]     scan output
    float *rstd;   // [T, H]      1/rms of each head group of y*silu(z)
    float *yn;     // [T, di]     normed, gated output (input of out_proj)
};

Mamba2Acts *mamba2_acts_new(const HybridConfig *h, int64_t B, int64_t L) {
    const Dims m = dims_of(h);
    const int64_t T = B * L;
    Mamba2Acts *a = dl_calloc(1, sizeof *a);
    a->cap = T;
    a->u = dl_malloc((size_t)(T * m.d) * sizeof(float));
    a->proj = dl_malloc((size_t)(T * m.n_in) * sizeof(float));
    a->xraw = dl_malloc((size_t)(T * m.xbc) * sizeof(float));
    a->xc = dl_malloc((size_t)(T * m.xbc) * sizeof(float));
    a->y = dl_malloc((size_t)(T * m.di) * sizeof(float));
    a->rstd = dl_malloc((size_t)(T * m.H) * sizeof(float));
    a->yn = dl_malloc((size_t)(T * m.di) * sizeof(float));
    return a;
}

void mamba2_acts_free(Mamba2Acts *a) {
    if (!a) return;
    free(a->u), free(a->proj), free(a->xraw), free(a->xc), free(a->y), free(a->rstd), free(a->yn);
    free(a);
}

// Scan inputs derived from the conv output: x and B repeated to the H heads (head h <- KV head h/rep),
// C per head, raw dt per head, A = -exp(A_log).
typedef struct {
    float *xr, *Br, *Cc, *dt, *A;  // [T,H,P], [T,H,N], [T,H,N], [T,H], [H]
} ScanIn;

static ScanIn scan_in_new(const Dims *m, int64_t T) {
    ScanIn s = {dl_malloc((size_t)(T * m->H * m->P) * sizeof(float)), dl_malloc((size_t)(T * m->H * m->N) * sizeof(float)),
                dl_malloc((size_t)(T * m->H * m->N) * sizeof(float)), dl_malloc((size_t)(T * m->H) * sizeof(float)),
                dl_malloc((size_t)m->H * sizeof(float))};
    return s;
}
static void scan_in_free(ScanIn *s) { free(s->xr), free(s->Br), free(s->Cc), free(s->dt), free(s->A); }

static void scan_in_fill(const Dims *m, const Tensors *tn, int64_t T, const float *proj, const float *xc, ScanIn *s) {
    const int64_t H = m->H, P = m->P, N = m->N;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *row = xc + t * m->xbc;
        for (int64_t h = 0; h < H; h++) {
            const int64_t j = h / m->rep;
            memcpy(s->xr + (t * H + h) * P, row + j * P, (size_t)P * sizeof(float));
            memcpy(s->Br + (t * H + h) * N, row + m->dxb + j * N, (size_t)N * sizeof(float));
            memcpy(s->Cc + (t * H + h) * N, row + 2 * m->dxb + h * N, (size_t)N * sizeof(float));
            s->dt[t * H + h] = proj[t * m->n_in + m->di + m->xbc + h];
        }
    }
    for (int64_t h = 0; h < H; h++) s->A[h] = -expf(tn->p[T_ALOG][h]);
}

static SsdShape ssd_shape(const Dims *m, int64_t B, int64_t L) {
    SsdShape s = {B, L, m->H, m->P, m->H, m->N, MAMBA2_CPU_CHUNK, 1};
    return s;
}

// Buffers of one forward: either the acts (training) or temporaries (inference).
typedef struct {
    float *proj, *xraw, *xc, *y, *rstd, *yn;
} Fwd;

// The whole layer on B rows of L tokens. conv_prev [B,W-1,xbc] (or NULL), h0 (or NULL), keep/h_keep as in
// ssd_fwd_cpu (h_keep may alias h0).
static void core_forward(const Dims *m, const Tensors *tn, int64_t B, int64_t L, const float *x, const uint8_t *reset,
                         float *out, Fwd *f, const float *conv_prev, const float *h0, const int32_t *keep,
                         float *h_keep) {
    const int64_t T = B * L, H = m->H, P = m->P, di = m->di;
    const int rnd = round_mode();
    float *xb = io_copy(x, T * m->d, rnd);  // the device's bf16 mixer input
    if (xb) x = xb;
    // [T, n_in] = x [T, d] @ W_in^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)m->n_in, (int)m->d, 1.f, x, (int)m->d,
                tn->p[T_IN], (int)m->d, 0.f, f->proj, (int)m->n_in);
    free(xb);
    if (rnd & RND_MID) {  // z and dt are stored bf16; xBC stays fp32 (the conv input)
        round_cols(f->proj, T, m->n_in, 0, di);
        round_cols(f->proj, T, m->n_in, di + m->xbc, H);
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++)
        memcpy(f->xraw + t * m->xbc, f->proj + t * m->n_in + di, (size_t)m->xbc * sizeof(float));
    conv1d_silu_fwd_cpu(B, L, m->xbc, m->W, f->xraw, tn->p[T_CONVW], tn->p[T_CONVB], reset, conv_prev, 1, f->xc);
    if (rnd & RND_MID) bf16_round_array(f->xc, T * m->xbc);
    ScanIn s = scan_in_new(m, T);
    scan_in_fill(m, tn, T, f->proj, f->xc, &s);
    const SsdShape sh = ssd_shape(m, B, L);
    ssd_fwd_cpu(&sh, s.xr, s.dt, s.A, s.Br, s.Cc, tn->p[T_D], tn->p[T_DTB], reset, h0, f->y, NULL, keep, h_keep);
    scan_in_free(&s);
    if (rnd & RND_MID) bf16_round_array(f->y, T * di);
    // gated RMSNorm per head group (norm_before_gate = False): yn = rmsnorm_P(y * silu(z)) * w
    const float *nw = tn->p[T_NORM];
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *z = f->proj + t * m->n_in;
        for (int64_t h = 0; h < H; h++) {
            const float *yv = f->y + t * di + h * P;
            float *o = f->yn + t * di + h * P;
            float ss = 0.f;
            for (int64_t p = 0; p < P; p++) {
                const float g = yv[p] * silu_f(z[h * P + p]);
                o[p] = g;
                ss += g * g;
            }
            const float rs = 1.f / sqrtf(ss / (float)P + m->eps);
            f->rstd[t * H + h] = rs;
            for (int64_t p = 0; p < P; p++) o[p] = o[p] * rs * nw[h * P + p];
        }
    }
    if (rnd & RND_MID) bf16_round_array(f->yn, T * di);
    // out [T, d] = yn [T, di] @ W_out^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)m->d, (int)di, 1.f, f->yn, (int)di,
                tn->p[T_OUT], (int)di, 0.f, out, (int)m->d);
    if (rnd & RND_IO) bf16_round_array(out, T * m->d);
}

static Fwd fwd_temp(const Dims *m, int64_t T) {
    Fwd f = {dl_malloc((size_t)(T * m->n_in) * sizeof(float)), dl_malloc((size_t)(T * m->xbc) * sizeof(float)),
             dl_malloc((size_t)(T * m->xbc) * sizeof(float)), dl_malloc((size_t)(T * m->di) * sizeof(float)),
             dl_malloc((size_t)(T * m->H) * sizeof(float)),   dl_malloc((size_t)(T * m->di) * sizeof(float))};
    return f;
}
static void fwd_temp_free(Fwd *f) { free(f->proj), free(f->xraw), free(f->xc), free(f->y), free(f->rstd), free(f->yn); }

void mamba2_forward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba2Acts *acts) {
    const Dims m = dims_of(h);
    const Tensors tn = tensors_of(h, r, params, layer);
    if (B * L == 0) return;
    if (!acts) {
        Fwd f = fwd_temp(&m, B * L);
        core_forward(&m, &tn, B, L, x, reset, out, &f, NULL, NULL, NULL, NULL);
        fwd_temp_free(&f);
        return;
    }
    if (acts->cap < B * L)
        dl_die(DL_EXIT_RUNTIME, "mamba2_forward: acts hold %lld tokens, %lld needed", (long long)acts->cap,
               (long long)(B * L));
    memcpy(acts->u, x, (size_t)(B * L * m.d) * sizeof(float));
    if (round_mode() & RND_IO) bf16_round_array(acts->u, B * L * m.d);  // in_proj's wgrad reads the bf16 input
    Fwd f = {acts->proj, acts->xraw, acts->xc, acts->y, acts->rstd, acts->yn};
    core_forward(&m, &tn, B, L, x, reset, out, &f, NULL, NULL, NULL, NULL);
}

void mamba2_backward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                     const uint8_t *reset, const float *dout, float *dx, float *grads, Mamba2Acts *a) {
    const Dims m = dims_of(h);
    const Tensors tn = tensors_of(h, r, params, layer);
    const int64_t T = B * L, H = m.H, P = m.P, N = m.N, di = m.di, xbc = m.xbc, n_in = m.n_in;
    if ((!grads && !dx) || T == 0) return;
    float *g_in = grads ? grads + tn.off[T_IN] : NULL, *g_out = grads ? grads + tn.off[T_OUT] : NULL;
    float *g_norm = grads ? grads + tn.off[T_NORM] : NULL;
    float *dyn = dl_malloc((size_t)(T * di) * sizeof(float));
    float *dproj = dl_malloc((size_t)(T * n_in) * sizeof(float));
    float *dys = dl_malloc((size_t)(T * di) * sizeof(float));
    const int rnd = round_mode();
    float *doutb = io_copy(dout, T * m.d, rnd);  // the device's bf16 d out
    if (doutb) dout = doutb;
    // out_proj: dyn = dout @ W_out; dW_out += dout^T @ yn
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)di, (int)m.d, 1.f, dout, (int)m.d,
                tn.p[T_OUT], (int)di, 0.f, dyn, (int)di);
    if (rnd & RND_MID) bf16_round_array(dyn, T * di);
    if (grads)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)m.d, (int)di, (int)T, 1.f, dout, (int)m.d, a->yn,
                    (int)di, 1.f, g_out, (int)di);
    // gated norm backward, per (token, head): yhat = g * rstd, yn = yhat * w
    const float *nw = tn.p[T_NORM];
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *z = a->proj + t * n_in;
        float *dz = dproj + t * n_in;
        for (int64_t hh = 0; hh < H; hh++) {
            const int64_t c0 = hh * P;
            const float rs = a->rstd[t * H + hh];
            float dot = 0.f;  // sum_p (dyn w)_p * yhat_p
            for (int64_t p = 0; p < P; p++) {
                const float g = a->y[t * di + c0 + p] * silu_f(z[c0 + p]);
                dot += dyn[t * di + c0 + p] * nw[c0 + p] * g * rs;
            }
            dot /= (float)P;
            for (int64_t p = 0; p < P; p++) {
                const float zv = z[c0 + p], sg = 1.f / (1.f + expf(-zv)), yv = a->y[t * di + c0 + p];
                const float yhat = yv * zv * sg * rs;
                const float dg = rs * (dyn[t * di + c0 + p] * nw[c0 + p] - yhat * dot);
                dys[t * di + c0 + p] = dg * zv * sg;                     // d/dy of y*silu(z)
                dz[c0 + p] = dg * yv * sg * (1.f + zv * (1.f - sg));     // d/dz of y*silu(z)
            }
        }
    }
    if (rnd & RND_MID) {
        bf16_round_array(dys, T * di);
        round_cols(dproj, T, n_in, 0, di);  // d z
    }
    // norm weight: sum over tokens in order, parallel over channels
    if (grads) {
#pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < di; c++) {
            const int64_t hh = c / P;
            float acc = 0.f;
            for (int64_t t = 0; t < T; t++) {
                const float zv = a->proj[t * n_in + c];
                acc += dyn[t * di + c] * a->y[t * di + c] * silu_f(zv) * a->rstd[t * H + hh];
            }
            g_norm[c] += acc;
        }
    }
    free(dyn);
    // scan backward
    ScanIn s = scan_in_new(&m, T);
    scan_in_fill(&m, &tn, T, a->proj, a->xc, &s);
    const SsdShape sh = ssd_shape(&m, B, L);
    float *dxr = dl_malloc((size_t)(T * H * P) * sizeof(float)), *dBr = dl_malloc((size_t)(T * H * N) * sizeof(float));
    float *dCc = dl_malloc((size_t)(T * H * N) * sizeof(float)), *ddt = dl_malloc((size_t)(T * H) * sizeof(float));
    float dA[H], dD[H], dbias[H];  // small: H <= a few hundred
    ssd_bwd_cpu(&sh, s.xr, s.dt, s.A, s.Br, s.Cc, tn.p[T_D], tn.p[T_DTB], reset, NULL, dys, NULL, dxr, ddt, dA, dBr, dCc,
                dD, dbias, NULL);
    free(dys);
    if (rnd & RND_MID) {  // the SSD's bf16 outputs (per head, before the KV-group sums)
        bf16_round_array(dxr, T * H * P), bf16_round_array(dBr, T * H * N);
        bf16_round_array(dCc, T * H * N), bf16_round_array(ddt, T * H);
    }
    for (int64_t hh = 0; grads && hh < H; hh++) {
        grads[tn.off[T_ALOG] + hh] += dA[hh] * s.A[hh];  // A = -exp(A_log): dA/dA_log = A
        grads[tn.off[T_D] + hh] += dD[hh];
        grads[tn.off[T_DTB] + hh] += dbias[hh];
    }
    scan_in_free(&s);
    // undo the GQA repeat (sum over the heads of each KV group, in head order) and the split
    float *dxc = dl_malloc((size_t)(T * xbc) * sizeof(float)), *dxraw = dl_malloc((size_t)(T * xbc) * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *row = dxc + t * xbc;
        for (int64_t j = 0; j < m.kv; j++) {
            float *gx = row + j * P, *gb = row + m.dxb + j * N;
            memcpy(gx, dxr + (t * H + j * m.rep) * P, (size_t)P * sizeof(float));
            memcpy(gb, dBr + (t * H + j * m.rep) * N, (size_t)N * sizeof(float));
            for (int64_t q = 1; q < m.rep; q++) {
                const float *sx = dxr + (t * H + j * m.rep + q) * P, *sb = dBr + (t * H + j * m.rep + q) * N;
                for (int64_t p = 0; p < P; p++) gx[p] += sx[p];
                for (int64_t n = 0; n < N; n++) gb[n] += sb[n];
            }
        }
        memcpy(row + 2 * m.dxb, dCc + t * H * N, (size_t)(H * N) * sizeof(float));
        for (int64_t hh = 0; hh < H; hh++) dproj[t * n_in + di + xbc + hh] = ddt[t * H + hh];
    }
    free(dxr), free(dBr), free(dCc), free(ddt);
    if (rnd & RND_MID) bf16_round_array(dxc, T * xbc);  // the sums in fp32, rounded once
    // conv backward (dw, dbias written into temporaries, then added)
    float *dcw = dl_malloc((size_t)(xbc * m.W) * sizeof(float)), *dcb = dl_malloc((size_t)xbc * sizeof(float));
    conv1d_silu_bwd_cpu(B, L, xbc, m.W, a->xraw, tn.p[T_CONVW], tn.p[T_CONVB], reset, NULL, 1, dxc, dxraw, dcw, dcb);
    if (grads) {
        for (int64_t i = 0; i < xbc * m.W; i++) grads[tn.off[T_CONVW] + i] += dcw[i];
        for (int64_t i = 0; i < xbc; i++) grads[tn.off[T_CONVB] + i] += dcb[i];
    }
    free(dcw), free(dcb), free(dxc);
    if (rnd & RND_MID) bf16_round_array(dxraw, T * xbc);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) memcpy(dproj + t * n_in + di, dxraw + t * xbc, (size_t)xbc * sizeof(float));
    free(dxraw);
    // in_proj: dx = dproj @ W_in; dW_in += dproj^T @ u
    if (dx && (rnd & RND_IO)) {  // the device adds the z, xBC and dt blocks' products into its bf16 dx one by one
        const int64_t c0[3] = {0, di, di + xbc}, nc[3] = {di, xbc, H};
        for (int k = 0; k < 3; k++) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)m.d, (int)nc[k], 1.f, dproj + c0[k],
                        (int)n_in, tn.p[T_IN] + c0[k] * m.d, (int)m.d, k ? 1.f : 0.f, dx, (int)m.d);
            bf16_round_array(dx, T * m.d);
        }
    } else if (dx) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)m.d, (int)n_in, 1.f, dproj, (int)n_in,
                    tn.p[T_IN], (int)m.d, 0.f, dx, (int)m.d);
    }
    if (grads)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)n_in, (int)m.d, (int)T, 1.f, dproj, (int)n_in, a->u,
                    (int)m.d, 1.f, g_in, (int)m.d);
    free(dproj), free(doutb);
}

// ---------------------------------------------------------------- generation state

Mamba2State mamba2_state_new(const HybridConfig *h, int64_t B) {
    const Dims m = dims_of(h);
    Mamba2State st = {.B = B, .xbc = m.xbc, .nheads = m.H, .headdim = m.P, .d_state = m.N, .d_conv = m.W};
    st.conv = dl_calloc((size_t)(B * (m.W - 1) * m.xbc), sizeof(float));
    st.ssm = dl_calloc((size_t)(B * m.H * m.P * m.N), sizeof(float));
    return st;
}

void mamba2_state_free(Mamba2State *st) {
    free(st->conv), free(st->ssm);
    st->conv = st->ssm = NULL;
}

static int64_t conv_per_row(const Mamba2State *st) { return (st->d_conv - 1) * st->xbc; }
static int64_t ssm_per_row(const Mamba2State *st) { return st->nheads * st->headdim * st->d_state; }

void mamba2_state_reset(Mamba2State *st, int64_t b) {
    int64_t b0 = b < 0 ? 0 : b, b1 = b < 0 ? st->B : b + 1;
    memset(st->conv + b0 * conv_per_row(st), 0, (size_t)((b1 - b0) * conv_per_row(st)) * sizeof(float));
    memset(st->ssm + b0 * ssm_per_row(st), 0, (size_t)((b1 - b0) * ssm_per_row(st)) * sizeof(float));
}

void mamba2_state_copy(Mamba2State *dst, const Mamba2State *src) {
    if (dst->B != src->B || dst->xbc != src->xbc || dst->nheads != src->nheads || dst->headdim != src->headdim ||
        dst->d_state != src->d_state || dst->d_conv != src->d_conv)
        dl_die(DL_EXIT_RUNTIME, "mamba2_state_copy: states of different shapes");
    memcpy(dst->conv, src->conv, (size_t)(src->B * conv_per_row(src)) * sizeof(float));
    memcpy(dst->ssm, src->ssm, (size_t)(src->B * ssm_per_row(src)) * sizeof(float));
}

// New conv window of row b after its first k tokens of xraw [B,L,xbc]: the last W-1 inputs of
// [old window | tokens 0..k-1], zero before the last document start among those tokens.
static void conv_state_advance(Mamba2State *st, int64_t B, int64_t L, const float *xraw, const uint8_t *reset,
                               const int32_t *keep) {
    const int64_t S = st->d_conv - 1, C = st->xbc;
    float *tmp = dl_malloc((size_t)(S * C + 1) * sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        int64_t k = keep ? keep[b] : L;
        k = k < 0 ? 0 : (k > L ? L : k);
        int64_t last_reset = INT64_MIN;
        for (int64_t t = 0; t < k; t++)
            if (reset && reset[b * L + t]) last_reset = t;
        float *win = st->conv + b * S * C;
        for (int64_t i = 0; i < S; i++) {
            const int64_t j = k - S + i;  // token index; negative = old window entry S + j
            float *dst = tmp + i * C;
            if (j < last_reset) memset(dst, 0, (size_t)C * sizeof(float));
            else if (j < 0) memcpy(dst, win + (S + j) * C, (size_t)C * sizeof(float));
            else memcpy(dst, xraw + (b * L + j) * C, (size_t)C * sizeof(float));
        }
        memcpy(win, tmp, (size_t)(S * C) * sizeof(float));
    }
    free(tmp);
}

// Cached run of L tokens: outputs of all of them; state left after keep[b] tokens (NULL: all L).
static void cached_run(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                       const float *x, const uint8_t *reset, const int32_t *keep, float *out, Mamba2State *st) {
    const Dims m = dims_of(h);
    const Tensors tn = tensors_of(h, r, params, layer);
    if (st->B != B || st->xbc != m.xbc || st->nheads != m.H || st->headdim != m.P || st->d_state != m.N ||
        st->d_conv != m.W)
        dl_die(DL_EXIT_RUNTIME, "mamba2: state of layer %d has the wrong shape for batch %lld", layer, (long long)B);
    if (B * L == 0) return;  // no tokens: the state stays as it is
    int32_t *kp = dl_malloc((size_t)B * sizeof(int32_t));
    for (int64_t b = 0; b < B; b++) {
        int64_t k = keep ? keep[b] : L;
        kp[b] = (int32_t)(k < 0 ? 0 : (k > L ? L : k));
    }
    Fwd f = fwd_temp(&m, B * L);
    core_forward(&m, &tn, B, L, x, reset, out, &f, st->conv, st->ssm, kp, st->ssm);
    conv_state_advance(st, B, L, f.xraw, reset, kp);
    fwd_temp_free(&f);
    free(kp);
}

void mamba2_prefill(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba2State *st) {
    cached_run(h, r, params, layer, B, L, x, reset, NULL, out, st);
}

void mamba2_multistep(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t K,
                      const float *x, const int32_t *keep, float *out, Mamba2State *st) {
    cached_run(h, r, params, layer, B, K, x, NULL, keep, out, st);
}

void mamba2_step(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, const float *x,
                 Mamba2State *st, float *out) {
    cached_run(h, r, params, layer, B, 1, x, NULL, NULL, out, st);
}
