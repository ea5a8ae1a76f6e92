// test_layers_cpu.c: every layer of layers_cpu.c against a float64 implementation of its formula written
// here: the fp32 forward against the float64 forward, and the fp32 backward against central finite
// differences of the float64 forward (loss = sum(w * y) with random w), on tiny random shapes. Outputs are
// poisoned with NaN before each call so an unwritten element fails.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/layers_cpu.h"
#include "distill/rng.h"
#include "tests/check.h"

static Rng rng;

static double *drand_vec(int64_t n, double scale) {
    double *x = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) x[i] = scale * rng_normal(&rng);
    return x;
}
static float *to_f32(const double *x, int64_t n) {
    float *y = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) y[i] = (float)x[i];
    return y;
}
static float *poisoned(int64_t n) {
    float *y = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) y[i] = NAN;
    return y;
}
static float *zeros(int64_t n) { return calloc((size_t)n, sizeof(float)); }

// ||a - b|| / ||b||
static double rel_err_fd(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// Finite-difference gradient of loss() w.r.t. every element of x (float64, central, step h).
typedef double (*LossFn)(void);
static double *fd_grad(double *x, int64_t n, LossFn loss) {
    double *g = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        double h = 1e-5 * fmax(1.0, fabs(x[i])), x0 = x[i];
        x[i] = x0 + h;
        double lp = loss();
        x[i] = x0 - h;
        double lm = loss();
        x[i] = x0;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

// ---------------------------------------------------------------- linear
static int64_t LN = 5, LI = 7, LO = 6;
static double *lx, *lW, *lw;
static void ref_linear(const double *x, const double *W, double *y, int64_t N, int64_t In, int64_t O) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < O; o++) {
            double s = 0;
            for (int64_t i = 0; i < In; i++) s += x[n * In + i] * W[o * In + i];
            y[n * O + o] = s;
        }
}
static double loss_linear(void) {
    double *y = malloc((size_t)(LN * LO) * sizeof(double));
    ref_linear(lx, lW, y, LN, LI, LO);
    double s = 0;
    for (int64_t i = 0; i < LN * LO; i++) s += lw[i] * y[i];
    free(y);
    return s;
}
static void test_linear(void) {
    lx = drand_vec(LN * LI, 1);
    lW = drand_vec(LO * LI, 1);
    lw = drand_vec(LN * LO, 1);
    float *x = to_f32(lx, LN * LI), *W = to_f32(lW, LO * LI), *w = to_f32(lw, LN * LO), *y = poisoned(LN * LO);
    double *yr = malloc((size_t)(LN * LO) * sizeof(double));
    ref_linear(lx, lW, yr, LN, LI, LO);
    linear_fwd(y, x, W, LN, LI, LO, false);
    CHECK_REL(rel_err_fd(y, yr, LN * LO), 1e-6, "linear fwd");
    float *dx = poisoned(LN * LI), *dW = zeros(LO * LI);
    linear_bwd(dx, false, dW, w, x, W, LN, LI, LO);
    double *gx = fd_grad(lx, LN * LI, loss_linear), *gW = fd_grad(lW, LO * LI, loss_linear);
    CHECK_REL(rel_err_fd(dx, gx, LN * LI), 1e-6, "linear dx");
    CHECK_REL(rel_err_fd(dW, gW, LO * LI), 1e-6, "linear dW");
    // accumulate paths add
    linear_fwd(y, x, W, LN, LI, LO, true);
    for (int64_t i = 0; i < LN * LO; i++) yr[i] *= 2;
    CHECK_REL(rel_err_fd(y, yr, LN * LO), 1e-6, "linear fwd accumulate");
    linear_bwd(dx, true, dW, w, x, W, LN, LI, LO);
    for (int64_t i = 0; i < LN * LI; i++) gx[i] *= 2;
    for (int64_t i = 0; i < LO * LI; i++) gW[i] *= 2;
    CHECK_REL(rel_err_fd(dx, gx, LN * LI), 1e-6, "linear dx accumulate");
    CHECK_REL(rel_err_fd(dW, gW, LO * LI), 1e-6, "linear dW accumulate");
    free(x), free(W), free(w), free(y), free(yr), free(dx), free(dW), free(gx), free(gW), free(lx), free(lW), free(lw);
}

// ---------------------------------------------------------------- embedding
static void test_embedding(void) {
    const int64_t V = 11, d = 70, N = 9;  // d > 64: several column blocks
    int32_t tok[9] = {3, 0, 10, 3, 3, 7, 0, 5, 10};
    double *wte = drand_vec(V * d, 1), *dout = drand_vec(N * d, 1);
    float *fw = to_f32(wte, V * d), *fd = to_f32(dout, N * d), *y = poisoned(N * d), *dw = zeros(V * d);
    embedding_fwd(y, tok, fw, N, d);
    double err = 0;
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < d; i++) err += fabs(y[n * d + i] - fw[tok[n] * d + i]);
    CHECK(err == 0);
    embedding_bwd(dw, fd, tok, N, d);
    double *ref = calloc((size_t)(V * d), sizeof(double));
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < d; i++) ref[tok[n] * d + i] += dout[n * d + i];
    CHECK_REL(rel_err_fd(dw, ref, V * d), 1e-6, "embedding dwte");
    free(wte), free(dout), free(fw), free(fd), free(y), free(dw), free(ref);
}

// ---------------------------------------------------------------- RMSNorm
static int64_t RN = 4, RD = 67;
static double *rx, *rg, *rw;
static const double REPS = 1e-5;
static void ref_rmsnorm(const double *x, const double *g, double *y, int64_t N, int64_t d) {
    for (int64_t n = 0; n < N; n++) {
        double ss = 0;
        for (int64_t i = 0; i < d; i++) ss += x[n * d + i] * x[n * d + i];
        double r = 1 / sqrt(ss / d + REPS);
        for (int64_t i = 0; i < d; i++) y[n * d + i] = g[i] * x[n * d + i] * r;
    }
}
static double loss_rmsnorm(void) {
    double *y = malloc((size_t)(RN * RD) * sizeof(double));
    ref_rmsnorm(rx, rg, y, RN, RD);
    double s = 0;
    for (int64_t i = 0; i < RN * RD; i++) s += rw[i] * y[i];
    free(y);
    return s;
}
static void test_rmsnorm(void) {
    rx = drand_vec(RN * RD, 2);
    rg = drand_vec(RD, 1);
    rw = drand_vec(RN * RD, 1);
    float *x = to_f32(rx, RN * RD), *g = to_f32(rg, RD), *w = to_f32(rw, RN * RD), *y = poisoned(RN * RD), *rs = poisoned(RN);
    double *yr = malloc((size_t)(RN * RD) * sizeof(double));
    ref_rmsnorm(rx, rg, yr, RN, RD);
    rmsnorm_fwd(y, rs, x, g, RN, RD, (float)REPS);
    CHECK_REL(rel_err_fd(y, yr, RN * RD), 1e-6, "rmsnorm fwd");
    float *dx = zeros(RN * RD), *dg = zeros(RD);
    rmsnorm_bwd(dx, dg, w, x, g, rs, RN, RD);
    double *gx = fd_grad(rx, RN * RD, loss_rmsnorm), *gg = fd_grad(rg, RD, loss_rmsnorm);
    CHECK_REL(rel_err_fd(dx, gx, RN * RD), 1e-5, "rmsnorm dx");
    CHECK_REL(rel_err_fd(dg, gg, RD), 1e-5, "rmsnorm dw");
    free(x), free(g), free(w), free(y), free(rs), free(yr), free(dx), free(dg), free(gx), free(gg), free(rx), free(rg), free(rw);
}

// ---------------------------------------------------------------- RoPE (plain and llama3-scaled)
static void test_rope(bool llama3) {
    LlamaConfig c = {0};
    c.head_dim = 16;
    c.rope_theta = 500000;
    if (llama3) {
        c.rope_factor = 8;
        c.rope_low_freq_factor = 1;
        c.rope_high_freq_factor = 4;
        c.rope_orig_max_pos = 64;  // small, so all three frequency bands occur with head_dim 16
    }
    const int half = 8, nh = 3;
    const int64_t N = 5;
    float invf[8];
    rope_inv_freq(&c, invf);
    // float64 reference of the frequencies (HF _compute_llama3_parameters)
    double ref[8];
    int bands[3] = {0, 0, 0};
    for (int i = 0; i < half; i++) {
        double f = pow(c.rope_theta, -(2.0 * i) / c.head_dim);
        if (llama3) {
            double wl = 2 * M_PI / f, lo_wl = 64 / 1.0, hi_wl = 64 / 4.0;
            if (wl < hi_wl) bands[0]++;
            else if (wl > lo_wl) f /= 8, bands[2]++;
            else {
                double sm = (64 / wl - 1) / (4 - 1);
                f = (1 - sm) * f / 8 + sm * f;
                bands[1]++;
            }
        }
        ref[i] = f;
    }
    double e = 0, n = 0;
    for (int i = 0; i < half; i++) e += (invf[i] - ref[i]) * (invf[i] - ref[i]), n += ref[i] * ref[i];
    CHECK_REL(sqrt(e / n), 1e-6, llama3 ? "rope llama3 inv_freq" : "rope inv_freq");
    if (llama3) CHECK(bands[0] > 0 && bands[1] > 0 && bands[2] > 0);
    int32_t pos[5] = {0, 1, 7, 100, 2047};
    double *x = drand_vec(N * nh * 16, 1);
    float *fx = to_f32(x, N * nh * 16), *orig = to_f32(x, N * nh * 16);
    rope_apply(fx, pos, invf, N, nh, 16, false);
    double *yr = malloc((size_t)(N * nh * 16) * sizeof(double));
    for (int64_t r = 0; r < N; r++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < half; i++) {
                double ang = pos[r] * (double)invf[i];
                const double *v = x + (r * nh + h) * 16;
                yr[(r * nh + h) * 16 + i] = v[i] * cos(ang) - v[i + half] * sin(ang);
                yr[(r * nh + h) * 16 + i + half] = v[i + half] * cos(ang) + v[i] * sin(ang);
            }
    CHECK_REL(rel_err_fd(fx, yr, N * nh * 16), 1e-5, "rope apply");
    // the inverse is the backward (rotation transpose) and undoes the forward
    rope_apply(fx, pos, invf, N, nh, 16, true);
    double *o64 = malloc((size_t)(N * nh * 16) * sizeof(double));
    for (int64_t i = 0; i < N * nh * 16; i++) o64[i] = orig[i];
    CHECK_REL(rel_err_fd(fx, o64, N * nh * 16), 1e-6, "rope inverse");
    free(x), free(fx), free(orig), free(yr), free(o64);
}

static void test_doc_positions(void) {
    uint8_t reset[8] = {0, 0, 1, 0, 0, 1, 1, 0};
    int32_t pos[8], ds[8];
    doc_positions(2, 4, reset, pos, ds);
    int32_t ep[8] = {0, 1, 0, 1, 0, 0, 0, 1}, es[8] = {0, 0, 2, 2, 0, 1, 2, 2};
    CHECK(memcmp(pos, ep, sizeof ep) == 0);
    CHECK(memcmp(ds, es, sizeof es) == 0);
}

// ---------------------------------------------------------------- attention
static int64_t AB = 2, AT = 6;  // AT changes for the multi-block test
static const int ANH = 4, ANKV = 2, AHD = 8;
static double *aq, *ak, *av, *aw;
static int32_t adoc[2 * 200];
static void ref_attention(const double *q, const double *k, const double *v, double *out) {
    const int rep = ANH / ANKV;
    const int64_t qs = ANH * AHD, ks = ANKV * AHD;
    for (int64_t b = 0; b < AB; b++)
        for (int h = 0; h < ANH; h++)
            for (int64_t t = 0; t < AT; t++) {
                int g = h / rep;
                double sc[200], mx = -INFINITY, sum = 0;
                for (int64_t j = adoc[b * AT + t]; j <= t; j++) {
                    double s = 0;
                    for (int i = 0; i < AHD; i++) s += q[(b * AT + t) * qs + h * AHD + i] * k[(b * AT + j) * ks + g * AHD + i];
                    sc[j] = s / sqrt((double)AHD);
                    mx = fmax(mx, sc[j]);
                }
                for (int64_t j = adoc[b * AT + t]; j <= t; j++) sum += exp(sc[j] - mx);
                for (int i = 0; i < AHD; i++) {
                    double o = 0;
                    for (int64_t j = adoc[b * AT + t]; j <= t; j++) o += exp(sc[j] - mx) / sum * v[(b * AT + j) * ks + g * AHD + i];
                    out[(b * AT + t) * qs + h * AHD + i] = o;
                }
            }
}
static double loss_attention(void) {
    const int64_t n = AB * AT * ANH * AHD;
    double *o = malloc((size_t)n * sizeof(double));
    ref_attention(aq, ak, av, o);
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += aw[i] * o[i];
    free(o);
    return s;
}
static void test_attention(void) {
    const int64_t nq = AB * AT * ANH * AHD, nk = AB * AT * ANKV * AHD;
    uint8_t reset[12] = {0, 0, 0, 1, 0, 0, /* row 1 */ 0, 1, 0, 0, 1, 0};
    doc_positions(AB, AT, reset, NULL, adoc);
    aq = drand_vec(nq, 1);
    ak = drand_vec(nk, 1);
    av = drand_vec(nk, 1);
    aw = drand_vec(nq, 1);
    float *q = to_f32(aq, nq), *k = to_f32(ak, nk), *v = to_f32(av, nk), *w = to_f32(aw, nq);
    float *o = poisoned(nq), *lse = poisoned(AB * ANH * AT);
    AttnShape s = {AB, AT, AT, 0, ANH, ANKV, AHD};
    attention_fwd(&s, q, k, v, adoc, o, lse);
    double *orf = malloc((size_t)nq * sizeof(double));
    ref_attention(aq, ak, av, orf);
    CHECK_REL(rel_err_fd(o, orf, nq), 1e-6, "attention fwd");
    float *dq = poisoned(nq), *dk = poisoned(nk), *dv = poisoned(nk);
    attention_bwd(&s, q, k, v, adoc, o, lse, w, dq, dk, dv);
    double *gq = fd_grad(aq, nq, loss_attention), *gk = fd_grad(ak, nk, loss_attention), *gv = fd_grad(av, nk, loss_attention);
    CHECK_REL(rel_err_fd(dq, gq, nq), 1e-5, "attention dq");
    CHECK_REL(rel_err_fd(dk, gk, nk), 1e-5, "attention dk");
    CHECK_REL(rel_err_fd(dv, gv, nk), 1e-5, "attention dv");
    // decode form: queries at the end of a longer key buffer (a cache of capacity 9, 6 filled, q0 = 4)
    const int64_t cap = 9;
    float *kc = poisoned(AB * cap * ANKV * AHD), *vc = poisoned(AB * cap * ANKV * AHD);
    for (int64_t b = 0; b < AB; b++) {
        memcpy(kc + b * cap * ANKV * AHD, k + b * AT * ANKV * AHD, (size_t)(AT * ANKV * AHD) * sizeof(float));
        memcpy(vc + b * cap * ANKV * AHD, v + b * AT * ANKV * AHD, (size_t)(AT * ANKV * AHD) * sizeof(float));
    }
    // reference without document masks
    memset(adoc, 0, sizeof adoc);
    ref_attention(aq, ak, av, orf);
    float *qd = malloc((size_t)(AB * 2 * ANH * AHD) * sizeof(float)), *od = poisoned(AB * 2 * ANH * AHD);
    double *oref = malloc((size_t)(AB * 2 * ANH * AHD) * sizeof(double));
    for (int64_t b = 0; b < AB; b++)
        for (int64_t t = 0; t < 2; t++) {
            memcpy(qd + (b * 2 + t) * ANH * AHD, q + (b * AT + 4 + t) * ANH * AHD, (size_t)(ANH * AHD) * sizeof(float));
            memcpy(oref + (b * 2 + t) * ANH * AHD, orf + (b * AT + 4 + t) * ANH * AHD, (size_t)(ANH * AHD) * sizeof(double));
        }
    AttnShape sd = {AB, 2, cap, 4, ANH, ANKV, AHD};
    attention_fwd(&sd, qd, kc, vc, NULL, od, NULL);
    CHECK_REL(rel_err_fd(od, oref, AB * 2 * ANH * AHD), 1e-6, "attention with a KV cache");
    free(q), free(k), free(v), free(w), free(o), free(lse), free(orf), free(dq), free(dk), free(dv), free(gq), free(gk), free(gv);
    free(aq), free(ak), free(av), free(aw), free(kc), free(vc), free(qd), free(od), free(oref);
}

// Several query blocks (T = 150 > 64), documents crossing block edges: forward vs float64, backward vs
// finite differences on sampled elements.
static double fd_one(double *x, int64_t i, LossFn loss) {
    double h = 1e-5, x0 = x[i];
    x[i] = x0 + h;
    double lp = loss();
    x[i] = x0 - h;
    double lm = loss();
    x[i] = x0;
    return (lp - lm) / (2 * h);
}
static void test_attention_long(void) {
    AT = 150;
    const int64_t nq = AB * AT * ANH * AHD, nk = AB * AT * ANKV * AHD;
    uint8_t *reset = calloc((size_t)(AB * AT), 1);
    reset[60] = 1, reset[70] = 1, reset[AT + 130] = 1;  // row 0: docs [0,60) [60,70) [70,150); row 1: [0,130) [130,150)
    doc_positions(AB, AT, reset, NULL, adoc);
    aq = drand_vec(nq, 1);
    ak = drand_vec(nk, 1);
    av = drand_vec(nk, 1);
    aw = drand_vec(nq, 1);
    float *q = to_f32(aq, nq), *k = to_f32(ak, nk), *v = to_f32(av, nk), *w = to_f32(aw, nq);
    float *o = poisoned(nq), *lse = poisoned(AB * ANH * AT);
    AttnShape s = {AB, AT, AT, 0, ANH, ANKV, AHD};
    attention_fwd(&s, q, k, v, adoc, o, lse);
    double *orf = malloc((size_t)nq * sizeof(double));
    ref_attention(aq, ak, av, orf);
    CHECK_REL(rel_err_fd(o, orf, nq), 1e-6, "attention fwd, 3 query blocks");
    float *dq = poisoned(nq), *dk = poisoned(nk), *dv = poisoned(nk);
    attention_bwd(&s, q, k, v, adoc, o, lse, w, dq, dk, dv);
    double num = 0, den = 0;
    for (int i = 0; i < 40; i++) {
        int64_t iq = (int64_t)rng_below(&rng, (uint64_t)nq), ik = (int64_t)rng_below(&rng, (uint64_t)nk);
        double gq = fd_one(aq, iq, loss_attention), gk = fd_one(ak, ik, loss_attention), gv = fd_one(av, ik, loss_attention);
        num += (dq[iq] - gq) * (dq[iq] - gq) + (dk[ik] - gk) * (dk[ik] - gk) + (dv[ik] - gv) * (dv[ik] - gv);
        den += gq * gq + gk * gk + gv * gv;
    }
    CHECK_REL(sqrt(num / den), 1e-5, "attention dq/dk/dv, 3 query blocks (sampled FD)");
    free(q), free(k), free(v), free(w), free(o), free(lse), free(orf), free(dq), free(dk), free(dv), free(reset);
    free(aq), free(ak), free(av), free(aw);
    AT = 6;
}

// ---------------------------------------------------------------- SwiGLU
static const int64_t SN = 40;
static double *sg, *su, *sw;
static double loss_swiglu(void) {
    double s = 0;
    for (int64_t i = 0; i < SN; i++) s += sw[i] * sg[i] / (1 + exp(-sg[i])) * su[i];
    return s;
}
static void test_swiglu(void) {
    sg = drand_vec(SN, 3);
    su = drand_vec(SN, 1);
    sw = drand_vec(SN, 1);
    float *g = to_f32(sg, SN), *u = to_f32(su, SN), *w = to_f32(sw, SN), *y = poisoned(SN);
    swiglu_fwd(y, g, u, SN);
    double *yr = malloc(SN * sizeof(double));
    for (int64_t i = 0; i < SN; i++) yr[i] = sg[i] / (1 + exp(-sg[i])) * su[i];
    CHECK_REL(rel_err_fd(y, yr, SN), 1e-6, "swiglu fwd");
    float *dg = poisoned(SN), *du = poisoned(SN);
    swiglu_bwd(dg, du, w, g, u, SN);
    double *gg = fd_grad(sg, SN, loss_swiglu), *gu = fd_grad(su, SN, loss_swiglu);
    CHECK_REL(rel_err_fd(dg, gg, SN), 1e-5, "swiglu dgate");
    CHECK_REL(rel_err_fd(du, gu, SN), 1e-5, "swiglu dup");
    free(g), free(u), free(w), free(y), free(yr), free(dg), free(du), free(gg), free(gu), free(sg), free(su), free(sw);
}

static void test_expf(void) {
    double worst = 0;
    for (int i = 0; i <= 200000; i++) {
        float x = -87.0f + 97.0f * (float)i / 200000;  // [-87, 10]
        double ref = exp((double)x);
        worst = fmax(worst, fabs(dl_expf(x) - ref) / ref);
    }
    CHECK_REL(worst, 5e-7, "dl_expf vs exp");
    CHECK(dl_expf(-1000.0f) > 0 && dl_expf(-1000.0f) < 1e-37f && dl_expf(0.0f) == 1.0f);
}

int main(void) {
    rng_init(&rng, 1234, 0);
    test_expf();
    test_linear();
    test_embedding();
    test_rmsnorm();
    test_rope(false);
    test_rope(true);
    test_doc_positions();
    test_attention();
    test_attention_long();
    test_swiglu();
    return check_report("test_layers_cpu");
}
