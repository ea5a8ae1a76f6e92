// test_mamba2_cpu.c: the Mamba-2 mixer (distill/mamba2_cpu.c) against a float64 implementation of the
// formulas of mambainllama.md §1b written here token by token (no chunking, no GEMMs); its backward
// against float64 central finite differences for the input and every parameter tensor; the cached paths
// (prefill, chunked prefill, step, multi-token step with per-row accepted prefixes) against each other and
// the forward; packed documents with resets against the documents run alone; init from attention; the bf16
// storage emulation (mamba2_cpu_round_storage): bf16 output and dx, off again gives the same bits as before.
//
// Also a tool for tests/py/test_mamba2_granite.py:
//   test_mamba2_cpu --run-layer IN OUT
// IN (little-endian): int64 d_model, n_head, n_kv_head, head_dim, B, L; float64 rms_eps; then float32
// in_proj [n_in,d], conv1d.weight [xbc,1,4], conv1d.bias [xbc], dt_bias [H], A_log [H], D [H],
// norm.weight [d_inner], out_proj [d,d_inner], x [B,L,d]. OUT: float32 out [B,L,d] of mamba2_forward.
//   test_mamba2_cpu --run-layer-bwd IN OUT
// IN as above followed by dout [B,L,d]; OUT: out, dx [B,L,d], then the gradients of the 8 tensors in the
// order above (mamba2_backward into a zeroed buffer).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/dtype.h"
#include "distill/mamba2_cpu.h"
#include "distill/model.h"
#include "distill/rng.h"
#include "tests/check.h"

static const char *TNAMES[8] = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                "A_log",          "D",             "norm.weight", "out_proj.weight"};

static Rng R;
static double unif(double lo, double hi) { return lo + (hi - lo) * rng_uniform_f64(&R); }

typedef struct {
    HybridConfig h;
    Registry r;
    float *p;
    int layer;
} Model;

// A hybrid with attention at layer 0 and Mamba-2 at layer 1 (so the layer index is exercised).
static void model_new(Model *m, int d, int nh, int nkv, int hd) {
    LlamaConfig c = {0};
    c.n_layer = 2, c.d_model = d, c.n_head = nh, c.n_kv_head = nkv, c.head_dim = hd, c.d_ff = 8, c.vocab = 16;
    c.max_pos = 64, c.rope_theta = 10000, c.rms_eps = 1e-5, c.bos_id = c.eos_id = -1;
    DlError e;
    int attn[1] = {0};
    if (hybrid_config_init(&m->h, &c, MIXER_MAMBA2, attn, 1, &e)) {
        fprintf(stderr, "config: %s\n", e.msg);
        exit(1);
    }
    model_build_registry(&m->h, &m->r);
    m->p = calloc((size_t)m->r.numel, sizeof(float));
    m->layer = 1;
    for (int i = 0; i < m->r.n; i++) {
        const TensorInfo *t = &m->r.t[i];
        float *q = m->p + t->offset;
        const char *nm = t->name;
        for (int64_t j = 0; j < t->numel; j++) {
            double v;
            if (strstr(nm, "A_log")) v = log(unif(1, 16));
            else if (strstr(nm, "dt_bias")) v = log(expm1(exp(unif(log(1e-3), log(0.5)))));
            else if (strstr(nm, "mamba.D") || strstr(nm, "norm.weight")) v = unif(0.5, 1.5);
            else if (strstr(nm, "conv1d")) v = unif(-0.5, 0.5);
            else v = unif(-1, 1) / sqrt((double)(t->ndim == 2 ? t->shape[1] : 1));
            q[j] = (float)v;
        }
    }
}
static void model_free(Model *m) {
    reg_free(&m->r);
    free(m->p);
}
static const TensorInfo *mt(const Model *m, int k) {
    char name[128];
    snprintf(name, sizeof name, "model.layers.%d.mamba.%s", m->layer, TNAMES[k]);
    int i = reg_find(&m->r, name);
    if (i < 0) {
        fprintf(stderr, "no tensor %s\n", name);
        exit(1);
    }
    return &m->r.t[i];
}

// ---------------------------------------------------------------- float64 formula implementation
static double sigm(double v) { return 1.0 / (1.0 + exp(-v)); }
static double softplus(double v) { return v > 20 ? v : log1p(exp(v)); }

// out [B,L,d] of the layer, params pd (double copy of the float buffer).
static void ref_forward(const Model *m, const double *pd, int64_t B, int64_t L, const double *x, const uint8_t *reset,
                        double *out) {
    const LlamaConfig *c = &m->h.base;
    const int64_t d = c->d_model, H = c->n_head, P = c->head_dim, N = m->h.d_state, kv = c->n_kv_head, rep = H / kv;
    const int64_t di = m->h.d_inner, dxb = m->h.d_xb, xbc = 2 * dxb + di, n_in = di + xbc + H, W = m->h.d_conv;
    const double *Win = pd + mt(m, 0)->offset, *cw = pd + mt(m, 1)->offset, *cb = pd + mt(m, 2)->offset;
    const double *dtb = pd + mt(m, 3)->offset, *alog = pd + mt(m, 4)->offset, *D = pd + mt(m, 5)->offset;
    const double *nw = pd + mt(m, 6)->offset, *Wout = pd + mt(m, 7)->offset;
    double *proj = malloc((size_t)(L * n_in) * 8), *xc = malloc((size_t)(L * xbc) * 8), *S = malloc((size_t)(H * P * N) * 8);
    double *g = malloc((size_t)di * 8);
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < L; t++)
            for (int64_t o = 0; o < n_in; o++) {
                double acc = 0;
                for (int64_t i = 0; i < d; i++) acc += Win[o * d + i] * x[(b * L + t) * d + i];
                proj[t * n_in + o] = acc;
            }
        int64_t start = 0;  // current document start
        memset(S, 0, (size_t)(H * P * N) * 8);
        for (int64_t t = 0; t < L; t++) {
            if (reset && reset[b * L + t]) {
                start = t;
                memset(S, 0, (size_t)(H * P * N) * 8);
            }
            for (int64_t ch = 0; ch < xbc; ch++) {
                double acc = cb[ch];
                for (int64_t k = 0; k < W; k++) {
                    int64_t tt = t - (W - 1) + k;
                    if (tt >= start) acc += cw[ch * W + k] * proj[tt * n_in + di + ch];
                }
                xc[t * xbc + ch] = acc * sigm(acc);
            }
            const double *xv = xc + t * xbc, *Bv = xv + dxb, *Cv = xv + 2 * dxb, *z = proj + t * n_in;
            for (int64_t h = 0; h < H; h++) {
                const int64_t j = h / rep;
                const double delta = softplus(proj[t * n_in + di + xbc + h] + dtb[h]);
                const double a = exp(-delta * exp(alog[h]));
                double ss = 0;
                for (int64_t p = 0; p < P; p++) {
                    double y = D[h] * xv[j * P + p];
                    for (int64_t n = 0; n < N; n++) {
                        double *s = &S[(h * P + p) * N + n];
                        *s = a * *s + delta * xv[j * P + p] * Bv[j * N + n];
                        y += *s * Cv[h * N + n];
                    }
                    const double zz = z[h * P + p];
                    g[h * P + p] = y * zz * sigm(zz);
                    ss += g[h * P + p] * g[h * P + p];
                }
                const double rs = 1.0 / sqrt(ss / P + c->rms_eps);
                for (int64_t p = 0; p < P; p++) g[h * P + p] *= rs * nw[h * P + p];
            }
            for (int64_t o = 0; o < d; o++) {
                double acc = 0;
                for (int64_t i = 0; i < di; i++) acc += Wout[o * di + i] * g[i];
                out[(b * L + t) * d + o] = acc;
            }
        }
    }
    free(proj), free(xc), free(S), free(g);
}

// ---------------------------------------------------------------- helpers
static float *frand(int64_t n, double lo, double hi) {
    float *f = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) f[i] = (float)unif(lo, hi);
    return f;
}
static float *fnan(int64_t n) {
    float *f = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) f[i] = NAN;
    return f;
}
static double *todbl(const float *f, int64_t n) {
    double *d = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = f[i];
    return d;
}
static double rel_fd(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = (double)a[i] - b[i];
        num += e * e, den += b[i] * b[i];
    }
    if (!(num == num)) return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static double rel_ff(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = (double)a[i] - b[i];
        num += e * e, den += (double)b[i] * b[i];
    }
    if (!(num == num)) return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// ---------------------------------------------------------------- forward vs float64
static void test_forward(const char *name, int d, int nh, int nkv, int hd, int64_t B, int64_t L, double reset_p) {
    Model m;
    model_new(&m, d, nh, nkv, hd);
    const int64_t T = B * L;
    float *x = frand(T * d, -1, 1), *out = fnan(T * d);
    uint8_t *reset = calloc((size_t)T, 1);
    for (int64_t i = 0; i < T; i++) reset[i] = unif(0, 1) < reset_p;
    double *pd = todbl(m.p, m.r.numel), *xd = todbl(x, T * d), *od = malloc((size_t)(T * d) * 8);
    ref_forward(&m, pd, B, L, xd, reset, od);
    mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, reset, out, NULL);
    double e1 = rel_fd(out, od, T * d);
    // with acts (training path) the output is the same bits
    Mamba2Acts *a = mamba2_acts_new(&m.h, B, L);
    float *out2 = fnan(T * d);
    mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, reset, out2, a);
    CHECK(memcmp(out, out2, (size_t)(T * d) * 4) == 0);
    char what[128];
    snprintf(what, sizeof what, "forward %s", name);
    CHECK_REL(e1, 1e-5, what);
    printf("forward %-40s rel err vs float64 %.2e\n", name, e1);
    mamba2_acts_free(a);
    free(x), free(out), free(out2), free(reset), free(pd), free(xd), free(od);
    model_free(&m);
}

// ---------------------------------------------------------------- backward vs finite differences
static double loss_ref(const Model *m, const double *pd, int64_t B, int64_t L, const double *x, const uint8_t *reset,
                       const double *w) {
    const int64_t n = B * L * m->h.base.d_model;
    double *o = malloc((size_t)n * 8), l = 0;
    ref_forward(m, pd, B, L, x, reset, o);
    for (int64_t i = 0; i < n; i++) l += w[i] * o[i];
    free(o);
    return l;
}

static void test_backward(int d, int nh, int nkv, int hd, int64_t B, int64_t L) {
    Model m;
    model_new(&m, d, nh, nkv, hd);
    const int64_t T = B * L;
    float *x = frand(T * d, -1, 1), *out = fnan(T * d), *dout = frand(T * d, -1, 1), *dx = fnan(T * d);
    uint8_t *reset = calloc((size_t)T, 1);
    reset[2] = 1, reset[L + 3] = reset[L + 4] = 1;  // row 0: a document starts at t=2; row 1: two in a row
    Mamba2Acts *a = mamba2_acts_new(&m.h, B, L + 3);  // capacity larger than needed is fine
    mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, reset, out, a);
    float *grads = calloc((size_t)m.r.numel, sizeof(float));
    mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, dx, grads, a);
    // grads are ADDED: from a non-zero buffer the result is base + grads (up to rounding), and tensors
    // outside this layer's mixer are untouched
    {
        float *gb = malloc((size_t)m.r.numel * sizeof(float)), *base = malloc((size_t)m.r.numel * sizeof(float));
        float *dxb = fnan(T * d);
        for (int64_t i = 0; i < m.r.numel; i++) base[i] = gb[i] = (float)unif(-1, 1);
        mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, dxb, gb, a);
        int added = 1, untouched = 1;
        for (int i = 0; i < m.r.n; i++) {
            const TensorInfo *t = &m.r.t[i];
            const int mine = t->layer == m.layer && strstr(t->name, ".mamba.");
            for (int64_t j = 0; j < t->numel; j++) {
                const int64_t o = t->offset + j;
                if (mine) added &= fabs((double)gb[o] - ((double)base[o] + grads[o])) <= 1e-6 * (fabs(base[o]) + fabs(grads[o]));
                else untouched &= gb[o] == base[o];
            }
        }
        CHECK(added);
        CHECK(untouched);
        CHECK(memcmp(dxb, dx, (size_t)(T * d) * 4) == 0);  // dx is written, not accumulated
        free(gb), free(base), free(dxb);
    }
    double *pd = todbl(m.p, m.r.numel), *xd = todbl(x, T * d), *wd = todbl(dout, T * d);
    // dx
    {
        double *fd = malloc((size_t)(T * d) * 8);
        for (int64_t i = 0; i < T * d; i++) {
            const double v = xd[i], eps = 1e-6;
            xd[i] = v + eps;
            double lp = loss_ref(&m, pd, B, L, xd, reset, wd);
            xd[i] = v - eps;
            double lm = loss_ref(&m, pd, B, L, xd, reset, wd);
            xd[i] = v;
            fd[i] = (lp - lm) / (2 * eps);
        }
        double e = rel_fd(dx, fd, T * d);
        CHECK_REL(e, 1e-5, "backward dx vs FD");
        printf("backward dx                     rel err vs float64 FD %.2e\n", e);
        free(fd);
    }
    for (int k = 0; k < 8; k++) {
        const TensorInfo *t = mt(&m, k);
        double *fd = malloc((size_t)t->numel * 8);
        float *g = malloc((size_t)t->numel * sizeof(float));
        for (int64_t j = 0; j < t->numel; j++) {
            double *pp = pd + t->offset + j, v = *pp, eps = 1e-6 * (fabs(v) > 1 ? fabs(v) : 1);
            *pp = v + eps;
            double lp = loss_ref(&m, pd, B, L, xd, reset, wd);
            *pp = v - eps;
            double lm = loss_ref(&m, pd, B, L, xd, reset, wd);
            *pp = v;
            fd[j] = (lp - lm) / (2 * eps);
            g[j] = grads[t->offset + j];
        }
        double e = rel_fd(g, fd, t->numel);
        char what[128];
        snprintf(what, sizeof what, "backward d%s vs FD", TNAMES[k]);
        CHECK_REL(e, 1e-5, what);
        printf("backward d%-20s rel err vs float64 FD %.2e\n", TNAMES[k], e);
        free(fd), free(g);
    }
    // frozen layer (grads NULL) gives the same dx; lowest layer (dx NULL) gives the same grads
    {
        float *dxf = fnan(T * d), *gl = calloc((size_t)m.r.numel, sizeof(float));
        mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, dxf, NULL, a);
        mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, NULL, gl, a);
        CHECK(memcmp(dxf, dx, (size_t)(T * d) * 4) == 0);
        CHECK(memcmp(gl, grads, (size_t)m.r.numel * 4) == 0);
        free(dxf), free(gl);
    }
    // determinism: a second backward gives the same bits
    float *grads2 = calloc((size_t)m.r.numel, sizeof(float)), *grads3 = calloc((size_t)m.r.numel, sizeof(float));
    float *dx2 = fnan(T * d);
    mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, dx2, grads2, a);
    mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, dx2, grads3, a);
    CHECK(memcmp(grads2, grads3, (size_t)m.r.numel * 4) == 0 && memcmp(dx, dx2, (size_t)(T * d) * 4) == 0);
    mamba2_acts_free(a);
    free(x), free(out), free(dout), free(dx), free(dx2), free(reset), free(grads), free(grads2), free(grads3);
    free(pd), free(xd), free(wd);
    model_free(&m);
}

// Larger shape (several scan chunks, resets): FD on a random sample of entries of x and of every tensor.
static void test_backward_sampled(int d, int nh, int nkv, int hd, int64_t B, int64_t L, int samples) {
    Model m;
    model_new(&m, d, nh, nkv, hd);
    const int64_t T = B * L;
    float *x = frand(T * d, -1, 1), *out = fnan(T * d), *dout = frand(T * d, -1, 1), *dx = fnan(T * d);
    uint8_t *reset = calloc((size_t)T, 1);
    reset[40] = 1, reset[L + 70] = 1;
    Mamba2Acts *a = mamba2_acts_new(&m.h, B, L);
    mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, reset, out, a);
    float *grads = calloc((size_t)m.r.numel, sizeof(float));
    mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, dx, grads, a);
    double *pd = todbl(m.p, m.r.numel), *xd = todbl(x, T * d), *wd = todbl(dout, T * d);
    for (int k = -1; k < 8; k++) {
        double *buf = k < 0 ? xd : pd + mt(&m, k)->offset;
        const float *an = k < 0 ? dx : grads + mt(&m, k)->offset;
        const int64_t n = k < 0 ? T * d : mt(&m, k)->numel;
        double *fd = malloc((size_t)samples * 8);
        float *ag = malloc((size_t)samples * 4);
        for (int i = 0; i < samples; i++) {
            const int64_t j = (int64_t)rng_below(&R, (uint64_t)n);
            const double v = buf[j], eps = 1e-6 * (fabs(v) > 1 ? fabs(v) : 1);
            buf[j] = v + eps;
            double lp = loss_ref(&m, pd, B, L, xd, reset, wd);
            buf[j] = v - eps;
            double lm = loss_ref(&m, pd, B, L, xd, reset, wd);
            buf[j] = v;
            fd[i] = (lp - lm) / (2 * eps);
            ag[i] = an[j];
        }
        double e = rel_fd(ag, fd, samples);
        char what[128];
        snprintf(what, sizeof what, "sampled backward d%s vs FD (L=%lld)", k < 0 ? "x" : TNAMES[k], (long long)L);
        CHECK_REL(e, 1e-5, what);
        printf("backward L=%lld d%-20s rel err vs float64 FD on %d entries %.2e\n", (long long)L, k < 0 ? "x" : TNAMES[k],
               samples, e);
        free(fd), free(ag);
    }
    mamba2_acts_free(a);
    free(x), free(out), free(dout), free(dx), free(reset), free(grads), free(pd), free(xd), free(wd);
    model_free(&m);
}

// ---------------------------------------------------------------- cached paths
static void test_cached(void) {
    Model m;
    model_new(&m, 24, 4, 2, 6);
    const int64_t B = 3, L1 = 70, K = 5, d = 24, L = L1 + K + 1;  // L1 > chunk: prefill spans chunks
    float *x = frand(B * L * d, -1, 1), *ref = fnan(B * L * d);
    mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, NULL, ref, NULL);
    // (1) prefill of everything == forward
    Mamba2State st = mamba2_state_new(&m.h, B);
    float *o = fnan(B * L * d);
    mamba2_prefill(&m.h, &m.r, m.p, m.layer, B, L, x, NULL, o, &st);
    double e = rel_ff(o, ref, B * L * d);
    CHECK_REL(e, 1e-6, "prefill == forward");
    // (2) token-by-token steps == forward
    mamba2_state_reset(&st, -1);
    float *xs = malloc((size_t)(B * d) * 4), *os = fnan(B * d), *ostep = fnan(B * L * d);
    for (int64_t t = 0; t < L; t++) {
        for (int64_t b = 0; b < B; b++) memcpy(xs + b * d, x + (b * L + t) * d, (size_t)d * 4);
        mamba2_step(&m.h, &m.r, m.p, m.layer, B, xs, &st, os);
        for (int64_t b = 0; b < B; b++) memcpy(ostep + (b * L + t) * d, os + b * d, (size_t)d * 4);
    }
    double e2 = rel_ff(ostep, ref, B * L * d);
    CHECK_REL(e2, 1e-5, "steps == forward");
    Mamba2State st_steps = mamba2_state_new(&m.h, B);
    mamba2_state_copy(&st_steps, &st);
    // (3) chunked prefill: L1 tokens, then the rest; the final state equals the steps' state
    Mamba2State st2 = mamba2_state_new(&m.h, B);
    float *xa = malloc((size_t)(B * L1 * d) * 4), *xb = malloc((size_t)(B * (L - L1) * d) * 4);
    float *oa = fnan(B * L1 * d), *ob = fnan(B * (L - L1) * d);
    for (int64_t b = 0; b < B; b++) {
        memcpy(xa + b * L1 * d, x + b * L * d, (size_t)(L1 * d) * 4);
        memcpy(xb + b * (L - L1) * d, x + (b * L + L1) * d, (size_t)((L - L1) * d) * 4);
    }
    mamba2_prefill(&m.h, &m.r, m.p, m.layer, B, L1, xa, NULL, oa, &st2);
    Mamba2State st_l1 = mamba2_state_new(&m.h, B);
    mamba2_state_copy(&st_l1, &st2);
    mamba2_prefill(&m.h, &m.r, m.p, m.layer, B, L - L1, xb, NULL, ob, &st2);
    double e3 = 0;
    for (int64_t b = 0; b < B; b++) {
        e3 = fmax(e3, rel_ff(oa + b * L1 * d, ref + b * L * d, L1 * d));
        e3 = fmax(e3, rel_ff(ob + b * (L - L1) * d, ref + (b * L + L1) * d, (L - L1) * d));
    }
    CHECK_REL(e3, 1e-5, "chunked prefill == forward");
    const int64_t nssm = B * st.nheads * st.headdim * st.d_state, nconv = B * (st.d_conv - 1) * st.xbc;
    double es = fmax(rel_ff(st2.ssm, st_steps.ssm, nssm), rel_ff(st2.conv, st_steps.conv, nconv));
    CHECK_REL(es, 1e-5, "state after chunked prefill == state after steps");
    // (4) multi-token step of K tokens from the state after L1, keeping keep[b] tokens: outputs == forward,
    // state == the state after L1 + keep[b] tokens (rebuilt by steps per row), and decoding continues exactly.
    int32_t keep[3] = {2, 0, (int32_t)K};
    float *xk = malloc((size_t)(B * K * d) * 4), *ok = fnan(B * K * d);
    for (int64_t b = 0; b < B; b++) memcpy(xk + b * K * d, x + (b * L + L1) * d, (size_t)(K * d) * 4);
    Mamba2State st3 = mamba2_state_new(&m.h, B);
    mamba2_state_copy(&st3, &st_l1);
    mamba2_multistep(&m.h, &m.r, m.p, m.layer, B, K, xk, keep, ok, &st3);
    double e4 = 0;
    for (int64_t b = 0; b < B; b++) e4 = fmax(e4, rel_ff(ok + b * K * d, ref + (b * L + L1) * d, K * d));
    CHECK_REL(e4, 1e-5, "multistep outputs == forward");
    Mamba2State st4 = mamba2_state_new(&m.h, B);
    mamba2_state_copy(&st4, &st_l1);
    for (int64_t t = 0; t < K; t++) {
        // step every row, but freeze rows past their keep by restoring their state afterwards
        Mamba2State snap = mamba2_state_new(&m.h, B);
        mamba2_state_copy(&snap, &st4);
        for (int64_t b = 0; b < B; b++) memcpy(xs + b * d, x + (b * L + L1 + t) * d, (size_t)d * 4);
        mamba2_step(&m.h, &m.r, m.p, m.layer, B, xs, &st4, os);
        for (int64_t b = 0; b < B; b++)
            if (t >= keep[b]) {
                const int64_t cs = (st4.d_conv - 1) * st4.xbc, ss = st4.nheads * st4.headdim * st4.d_state;
                memcpy(st4.conv + b * cs, snap.conv + b * cs, (size_t)cs * 4);
                memcpy(st4.ssm + b * ss, snap.ssm + b * ss, (size_t)ss * 4);
            }
        mamba2_state_free(&snap);
    }
    double e5 = fmax(rel_ff(st3.ssm, st4.ssm, nssm), rel_ff(st3.conv, st4.conv, nconv));
    CHECK_REL(e5, 1e-5, "multistep state after accepted prefix == steps");
    // continue one token from the multistep state: equal to continuing from the steps' state
    for (int64_t b = 0; b < B; b++) memcpy(xs + b * d, x + (b * L + L - 1) * d, (size_t)d * 4);
    float *oc3 = fnan(B * d), *oc4 = fnan(B * d);
    mamba2_step(&m.h, &m.r, m.p, m.layer, B, xs, &st3, oc3);
    mamba2_step(&m.h, &m.r, m.p, m.layer, B, xs, &st4, oc4);
    double e6 = rel_ff(oc3, oc4, B * d);
    CHECK_REL(e6, 1e-5, "decode after multistep == decode after steps");
    // row 2 kept all K tokens: identical to the prefill-of-everything path at that point
    printf("cached: prefill %.1e, steps %.1e, chunked prefill %.1e (state %.1e), multistep out %.1e state %.1e, "
           "continue %.1e\n", e, e2, e3, es, e4, e5, e6);
    // (5) K = 0 leaves the state as it is
    {
        Mamba2State before = mamba2_state_new(&m.h, B);
        mamba2_state_copy(&before, &st3);
        mamba2_multistep(&m.h, &m.r, m.p, m.layer, B, 0, xk, NULL, ok, &st3);
        CHECK(memcmp(before.ssm, st3.ssm, (size_t)nssm * 4) == 0 && memcmp(before.conv, st3.conv, (size_t)nconv * 4) == 0);
        mamba2_state_free(&before);
    }
    // (6) state reset of one row == a fresh state for that row
    mamba2_state_reset(&st3, 1);
    int zero = 1;
    for (int64_t i = 0; i < st3.nheads * st3.headdim * st3.d_state; i++)
        zero &= st3.ssm[1 * st3.nheads * st3.headdim * st3.d_state + i] == 0.f;
    CHECK(zero);
    mamba2_state_free(&st), mamba2_state_free(&st2), mamba2_state_free(&st3), mamba2_state_free(&st4);
    mamba2_state_free(&st_l1), mamba2_state_free(&st_steps);
    free(x), free(ref), free(o), free(xs), free(os), free(ostep), free(xa), free(xb), free(oa), free(ob), free(xk), free(ok);
    free(oc3), free(oc4);
    model_free(&m);
}

// packed row with resets == the documents run alone; prefill with resets == forward with resets
static void test_packed(void) {
    Model m;
    model_new(&m, 16, 2, 1, 8);
    const int64_t d = 16, lens[3] = {9, 1, 75}, L = 85;  // the last document crosses a chunk boundary
    float *x = frand(L * d, -1, 1), *o = fnan(L * d);
    uint8_t reset[85] = {0};
    reset[9] = reset[10] = 1;
    mamba2_forward(&m.h, &m.r, m.p, m.layer, 1, L, x, reset, o, NULL);
    int64_t s0 = 0;
    double e = 0;
    for (int k = 0; k < 3; k++) {
        float *od = fnan(lens[k] * d);
        mamba2_forward(&m.h, &m.r, m.p, m.layer, 1, lens[k], x + s0 * d, NULL, od, NULL);
        e = fmax(e, rel_ff(o + s0 * d, od, lens[k] * d));
        free(od);
        s0 += lens[k];
    }
    CHECK_REL(e, 1e-5, "packed with resets == separate documents");
    // prefill with resets from a non-zero state == forward (the reset at t=0 discards the old state)
    Mamba2State st = mamba2_state_new(&m.h, 1);
    float *junk = frand(7 * d, -1, 1), *oj = fnan(7 * d), *op = fnan(L * d);
    mamba2_prefill(&m.h, &m.r, m.p, m.layer, 1, 7, junk, NULL, oj, &st);
    reset[0] = 1;
    mamba2_prefill(&m.h, &m.r, m.p, m.layer, 1, L, x, reset, op, &st);
    double e2 = rel_ff(op, o, L * d);
    CHECK_REL(e2, 1e-5, "prefill with reset at 0 from a used state == forward");
    // then one more token: equals running the last document plus that token alone
    float *x2 = frand(d, -1, 1), *os = fnan(d), *xl = malloc((size_t)((lens[2] + 1) * d) * 4), *ol = fnan((lens[2] + 1) * d);
    mamba2_step(&m.h, &m.r, m.p, m.layer, 1, x2, &st, os);
    memcpy(xl, x + (L - lens[2]) * d, (size_t)(lens[2] * d) * 4);
    memcpy(xl + lens[2] * d, x2, (size_t)d * 4);
    mamba2_forward(&m.h, &m.r, m.p, m.layer, 1, lens[2] + 1, xl, NULL, ol, NULL);
    double e3 = rel_ff(os, ol + lens[2] * d, d);
    CHECK_REL(e3, 1e-5, "step after a packed prefill continues the last document");
    printf("packed: documents %.1e, prefill with resets %.1e, continue %.1e\n", e, e2, e3);
    mamba2_state_free(&st);
    free(x), free(o), free(junk), free(oj), free(op), free(x2), free(os), free(xl), free(ol);
    model_free(&m);
}

// ---------------------------------------------------------------- init from attention
static void test_init(void) {
    LlamaConfig c = {0};
    c.n_layer = 3, c.d_model = 32, c.n_head = 4, c.n_kv_head = 2, c.head_dim = 8, c.d_ff = 16, c.vocab = 20;
    c.max_pos = 64, c.rope_theta = 10000, c.rms_eps = 1e-5, c.bos_id = c.eos_id = -1;
    HybridConfig th, hy;
    hybrid_config_teacher(&th, &c);
    DlError e;
    int attn[1] = {1};
    CHECK(hybrid_config_init(&hy, &c, MIXER_MAMBA2, attn, 1, &e) == 0);
    Registry tr, hr;
    model_build_registry(&th, &tr);
    model_build_registry(&hy, &hr);
    float *tp = malloc((size_t)tr.numel * 4), *hp = calloc((size_t)hr.numel, 4), *hp2 = calloc((size_t)hr.numel, 4);
    for (int64_t i = 0; i < tr.numel; i++) tp[i] = (float)unif(-1, 1);
    Rng g1, g2;
    rng_init(&g1, 42, 7);
    rng_init(&g2, 42, 7);
    CHECK(mamba2_init_layer_from_attention(&hy, &hr, hp, &tr, tp, 2, &g1, &e) == 0);
    CHECK(mamba2_init_layer_from_attention(&hy, &hr, hp2, &tr, tp, 2, &g2, &e) == 0);
    CHECK(memcmp(hp, hp2, (size_t)hr.numel * 4) == 0);  // same seed, same values
    const int64_t d = 32, H = 4, di = 32, dxb = 16, xbc = 64;
    const float *W = hp + hr.t[reg_find(&hr, "model.layers.2.mamba.in_proj.weight")].offset;
    const float *q = tp + tr.t[reg_find(&tr, "model.layers.2.self_attn.q_proj.weight")].offset;
    const float *k = tp + tr.t[reg_find(&tr, "model.layers.2.self_attn.k_proj.weight")].offset;
    const float *v = tp + tr.t[reg_find(&tr, "model.layers.2.self_attn.v_proj.weight")].offset;
    const float *o = tp + tr.t[reg_find(&tr, "model.layers.2.self_attn.o_proj.weight")].offset;
    CHECK(memcmp(W + di * d, v, (size_t)(dxb * d) * 4) == 0);
    CHECK(memcmp(W + (di + dxb) * d, k, (size_t)(dxb * d) * 4) == 0);
    CHECK(memcmp(W + (di + 2 * dxb) * d, q, (size_t)(di * d) * 4) == 0);
    CHECK(memcmp(hp + hr.t[reg_find(&hr, "model.layers.2.mamba.out_proj.weight")].offset, o, (size_t)(d * di) * 4) == 0);
    // z and dt rows: U(-1/sqrt(d), 1/sqrt(d)), not all equal, spread over most of the range
    const double bound = 1 / sqrt((double)d);
    double zmax = 0, dtmax = 0, zmean = 0;
    int in_range = 1;
    for (int64_t i = 0; i < di * d; i++) zmax = fmax(zmax, fabs(W[i])), zmean += W[i], in_range &= fabs(W[i]) <= bound;
    for (int64_t i = 0; i < H * d; i++) dtmax = fmax(dtmax, fabs(W[(di + xbc) * d + i])), in_range &= fabs(W[(di + xbc) * d + i]) <= bound;
    CHECK(in_range && zmax > 0.9 * bound && dtmax > 0.8 * bound && fabs(zmean / (di * d)) < 0.1 * bound);
    const float *dtb = hp + hr.t[reg_find(&hr, "model.layers.2.mamba.dt_bias")].offset;
    const float *alog = hp + hr.t[reg_find(&hr, "model.layers.2.mamba.A_log")].offset;
    const float *D = hp + hr.t[reg_find(&hr, "model.layers.2.mamba.D")].offset;
    const float *nw = hp + hr.t[reg_find(&hr, "model.layers.2.mamba.norm.weight")].offset;
    const float *cw = hp + hr.t[reg_find(&hr, "model.layers.2.mamba.conv1d.weight")].offset;
    const float *cb = hp + hr.t[reg_find(&hr, "model.layers.2.mamba.conv1d.bias")].offset;
    int ok = 1;
    for (int64_t h = 0; h < H; h++) {
        double dt = softplus(dtb[h]);
        ok &= dt >= 0.999e-3 && dt <= 1.001e-1;
        ok &= alog[h] >= 0 && alog[h] <= log(16.0) + 1e-6 && D[h] == 1.f;
    }
    for (int64_t i = 0; i < di; i++) ok &= nw[i] == 1.f;
    for (int64_t i = 0; i < xbc * 4; i++) ok &= fabs(cw[i]) <= 0.5;
    for (int64_t i = 0; i < xbc; i++) ok &= fabs(cb[i]) <= 0.5;
    CHECK(ok);
    // only layer 2's Mamba tensors were written
    int others_zero = 1;
    for (int i = 0; i < hr.n; i++)
        if (hr.t[i].layer != 2 || !strstr(hr.t[i].name, ".mamba."))
            for (int64_t j = 0; j < hr.t[i].numel; j++) others_zero &= hp[hr.t[i].offset + j] == 0.f;
    CHECK(others_zero);
    // errors: an attention layer of the hybrid; a source whose q_proj has the wrong shape
    CHECK(mamba2_init_layer_from_attention(&hy, &hr, hp, &tr, tp, 1, &g1, &e) == -1 && strstr(e.msg, "layer 1"));
    LlamaConfig c2 = c;
    c2.n_kv_head = 4;  // k/v projections of the wrong size
    HybridConfig th2;
    hybrid_config_teacher(&th2, &c2);
    Registry tr2;
    model_build_registry(&th2, &tr2);
    float *tp2 = calloc((size_t)tr2.numel, 4);
    CHECK(mamba2_init_layer_from_attention(&hy, &hr, hp, &tr2, tp2, 0, &g1, &e) == -1 &&
          strstr(e.msg, "model.layers.0.self_attn.k_proj.weight") && strstr(e.msg, "expected [16, 32]"));
    printf("init: copies exact; z/dt bound %.3f (max |z| %.3f); %s\n", bound, zmax, e.msg);
    reg_free(&tr), reg_free(&hr), reg_free(&tr2);
    free(tp), free(hp), free(hp2), free(tp2);
}

// ---------------------------------------------------------------- tool mode for the Python oracle test
static int run_layer(const char *in_path, const char *out_path, int bwd) {
    FILE *f = fopen(in_path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", in_path);
        return 3;
    }
    int64_t hdr[6];
    double eps;
    if (fread(hdr, 8, 6, f) != 6 || fread(&eps, 8, 1, f) != 1) {
        fprintf(stderr, "%s: short header\n", in_path);
        return 3;
    }
    LlamaConfig c = {0};
    c.n_layer = 1, c.d_model = (int)hdr[0], c.n_head = (int)hdr[1], c.n_kv_head = (int)hdr[2], c.head_dim = (int)hdr[3];
    c.d_ff = 1, c.vocab = 1, c.max_pos = 1, c.rope_theta = 10000, c.rms_eps = eps, c.bos_id = c.eos_id = -1;
    const int64_t B = hdr[4], L = hdr[5];
    if (B < 1 || L < 1 || B * L > ((int64_t)1 << 24)) {
        fprintf(stderr, "%s: batch %lld x length %lld out of range\n", in_path, (long long)B, (long long)L);
        return 3;
    }
    Model m;
    DlError e;
    if (hybrid_config_init(&m.h, &c, MIXER_MAMBA2, NULL, 0, &e)) {
        fprintf(stderr, "%s: %s\n", in_path, e.msg);
        return 3;
    }
    model_build_registry(&m.h, &m.r);
    m.p = calloc((size_t)m.r.numel, 4);
    m.layer = 0;
    for (int k = 0; k < 8; k++) {
        const TensorInfo *t = mt(&m, k);
        if (fread(m.p + t->offset, 4, (size_t)t->numel, f) != (size_t)t->numel) {
            fprintf(stderr, "%s: short tensor %s\n", in_path, t->name);
            return 3;
        }
    }
    const int64_t n = B * L * c.d_model;
    float *x = malloc((size_t)n * 4), *out = malloc((size_t)n * 4);
    if (fread(x, 4, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "%s: short input\n", in_path);
        return 3;
    }
    float *dout = NULL, *dx = NULL, *grads = NULL;
    if (bwd) {
        dout = malloc((size_t)n * 4), dx = malloc((size_t)n * 4), grads = calloc((size_t)m.r.numel, 4);
        if (fread(dout, 4, (size_t)n, f) != (size_t)n) {
            fprintf(stderr, "%s: short dout\n", in_path);
            return 3;
        }
    }
    fclose(f);
    Mamba2Acts *acts = bwd ? mamba2_acts_new(&m.h, B, L) : NULL;
    mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, NULL, out, acts);
    if (bwd) mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, NULL, dout, dx, grads, acts);
    FILE *g = fopen(out_path, "wb");
    int ok = g && fwrite(out, 4, (size_t)n, g) == (size_t)n;
    if (bwd) {
        ok = ok && fwrite(dx, 4, (size_t)n, g) == (size_t)n;
        for (int k = 0; k < 8 && ok; k++) {
            const TensorInfo *t = mt(&m, k);
            ok = fwrite(grads + t->offset, 4, (size_t)t->numel, g) == (size_t)t->numel;
        }
    }
    if (!g || fclose(g) || !ok) {
        fprintf(stderr, "cannot write %s\n", out_path);
        return 1;
    }
    mamba2_acts_free(acts);
    free(x), free(out), free(dout), free(dx), free(grads);
    model_free(&m);
    return 0;
}

// ---------------------------------------------------------------- bf16 storage emulation
static bool all_bf16(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (bf16_to_f32(f32_to_bf16(x[i])) != x[i]) return false;
    return true;
}
static void test_round_storage(void) {
    Model m;
    model_new(&m, 48, 6, 2, 8);
    const int64_t B = 2, L = 40, T = B * L, d = 48;
    float *x = frand(T * d, -1, 1), *dout = frand(T * d, -1, 1);
    uint8_t *reset = calloc((size_t)T, 1);
    reset[0] = reset[17] = reset[L] = 1;
    Mamba2Acts *a = mamba2_acts_new(&m.h, B, L);
    float *out[3], *dx[3], *g[3], *oinf = fnan(T * d);
    for (int k = 0; k < 3; k++) {  // off, on, off again
        mamba2_cpu_round_storage(k == 1);
        out[k] = fnan(T * d), dx[k] = fnan(T * d), g[k] = calloc((size_t)m.r.numel, sizeof(float));
        mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, reset, out[k], a);
        mamba2_backward(&m.h, &m.r, m.p, m.layer, B, L, reset, dout, dx[k], g[k], a);
        if (k == 1) mamba2_forward(&m.h, &m.r, m.p, m.layer, B, L, x, reset, oinf, NULL);
    }
    mamba2_cpu_round_storage(false);
    CHECK(all_bf16(out[1], T * d) && all_bf16(dx[1], T * d));                  // the device's bf16 output and dx
    CHECK(!all_bf16(out[0], T * d) && memcmp(oinf, out[1], (size_t)(T * d) * 4) == 0);  // inference: the same bits
    CHECK_REL(rel_ff(out[1], out[0], T * d), 2e-2, "bf16 storage: output near fp32");
    CHECK(memcmp(out[2], out[0], (size_t)(T * d) * 4) == 0 && memcmp(dx[2], dx[0], (size_t)(T * d) * 4) == 0 &&
          memcmp(g[2], g[0], (size_t)m.r.numel * 4) == 0);  // off again: fp32 bits
    printf("bf16 storage: output %.2e, dx %.2e from fp32\n", rel_ff(out[1], out[0], T * d), rel_ff(dx[1], dx[0], T * d));
    for (int k = 0; k < 3; k++) free(out[k]), free(dx[k]), free(g[k]);
    mamba2_acts_free(a);
    free(x), free(dout), free(reset), free(oinf);
    model_free(&m);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--run-layer") == 0) return run_layer(argv[2], argv[3], 0);
    if (argc == 4 && strcmp(argv[1], "--run-layer-bwd") == 0) return run_layer(argv[2], argv[3], 1);
    rng_init(&R, 2024, 1);
    test_forward("tiny d=12 H=4 kv=2 hd=4 B=2 L=7", 12, 4, 2, 4, 2, 7, 0.2);
    test_forward("L=1", 12, 4, 2, 4, 3, 1, 0.0);
    test_forward("d=48 H=6 kv=2 hd=8 B=2 L=150 resets", 48, 6, 2, 8, 2, 150, 0.02);
    test_forward("MHA d=32 H=4 kv=4 hd=8 B=1 L=64", 32, 4, 4, 8, 1, 64, 0.0);
    test_backward(12, 4, 2, 4, 2, 7);
    test_backward_sampled(32, 4, 2, 8, 2, 150, 16);
    test_cached();
    test_packed();
    test_init();
    test_round_storage();
    return check_report("test_mamba2_cpu");
}
