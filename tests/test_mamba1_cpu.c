// test_mamba1_cpu.c: the MambaInLlama Mamba-1 mixer (distill/mamba1_cpu.h) and the attention -> Mamba init
// (distill/mamba_init.h) against a float64 implementation of mambainllama.md §1a written here, loop by loop:
//   * forward and backward vs float64 (fresh random inputs, poisoned outputs), relative error norms <= 1e-5;
//   * float64 finite differences for every Mamba parameter tensor and the input (tiny shape);
//   * prefill == token-by-token decode == chunked prefill, including resets inside chunks;
//   * packed sequences with resets == the documents run separately (outputs, dx and parameter gradients);
//   * init: exact copies (C_proj == q_proj, B_proj == k_proj, in_proj_x == v_proj, out_proj == o_proj, shared
//     tensors), the init distributions, determinism, hybrid -> hybrid growth, and errors.
// `test_mamba1_cpu --io DIR` is a helper for tests/py/test_mamba_ref.py (PyTorch reference): see io_mode().
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "distill/mamba1_cpu.h"
#include "distill/mamba_init.h"
#include "distill/model_io.h"
#include "distill/rng.h"
#include "tests/check.h"

// ---- the 12 tensors of a Mamba-1 layer
enum { P_Z, P_X, P_B, P_C, P_DTD, P_DTW, P_DTB, P_CW, P_CB, P_ALOG, P_D, P_OUT, NP };
static const char *SUFFIX[NP] = {"in_proj_z.weight", "in_proj_x.weight", "B_proj.weight",  "C_proj.weight",
                                 "dt_proj_down.weight", "dt_proj.weight", "dt_proj.bias", "conv1d.weight",
                                 "conv1d.bias",      "A_log",            "D",             "out_proj.weight"};

typedef struct {
    int64_t d, di, dxb, N, R, W, rep;
} Dims;

static Dims dims_of(const HybridConfig *h) {
    Dims m = {h->base.d_model, h->d_inner, h->d_xb, h->d_state, h->dt_rank, h->d_conv, h->d_inner / h->d_xb};
    return m;
}

static const TensorInfo *mtensor(const Registry *r, int layer, int k) {
    char name[DL_TENSOR_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.mamba.%s", layer, SUFFIX[k]);
    int i = reg_find(r, name);
    if (i < 0) {
        fprintf(stderr, "missing %s\n", name);
        exit(2);
    }
    return &r->t[i];
}

// A one-block hybrid whose layer 0 is Mamba-1 (layer 1 keeps attention, so the registry is a real hybrid's).
static void make_hybrid(HybridConfig *h, Registry *r, int d_model, int n_head, int n_kv, int head_dim) {
    LlamaConfig c = {.n_layer = 2, .d_model = d_model, .n_head = n_head, .n_kv_head = n_kv, .head_dim = head_dim,
                     .d_ff = 2 * d_model, .vocab = 32, .max_pos = 256, .rope_theta = 10000, .rms_eps = 1e-5,
                     .tied_embeddings = true, .bos_id = -1, .eos_id = -1};
    int attn[1] = {1};
    DlError e;
    if (hybrid_config_init(h, &c, MIXER_MAMBA1, attn, 1, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        exit(2);
    }
    model_build_registry(h, r);
}

static double urand(Rng *g, double a, double b) { return a + (b - a) * rng_uniform_f64(g); }

// Random but realistic Mamba parameters (scales of the init; A_log and D perturbed so no path is special).
static void random_params(const HybridConfig *h, const Registry *r, float *p, uint64_t seed) {
    Dims m = dims_of(h);
    Rng g;
    rng_init(&g, seed, 7);
    for (int k = 0; k < NP; k++) {
        const TensorInfo *t = mtensor(r, 0, k);
        float *q = p + t->offset;
        for (int64_t i = 0; i < t->numel; i++) {
            double v;
            switch (k) {
            case P_DTW: v = urand(&g, -1, 1) / sqrt((double)m.R); break;
            case P_DTB: {
                double dt = exp(urand(&g, log(1e-3), log(1e-1)));
                v = dt + log(-expm1(-dt));
                break;
            }
            case P_CW: case P_CB: v = urand(&g, -0.5, 0.5); break;
            case P_ALOG: v = log((double)(i % m.N + 1)) + urand(&g, -0.3, 0.3); break;
            case P_D: v = urand(&g, 0.5, 1.5); break;
            case P_OUT: v = urand(&g, -1, 1) / sqrt((double)m.di); break;
            default: v = urand(&g, -1, 1) / sqrt((double)m.d) * (k == P_DTD ? 4.0 : 1.0); break;
            }
            q[i] = (float)v;
        }
    }
}

static void fill_rand(float *x, int64_t n, double scale, Rng *g) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)urand(g, -scale, scale);
}
static void poison(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = NAN;
}

static double rel_err_fd(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return sqrt(num) / (sqrt(den) + 1e-300);
}
static double rel_err_dd(const double *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return sqrt(num) / (sqrt(den) + 1e-300);
}
static double rel_err_ff(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return sqrt(num) / (sqrt(den) + 1e-300);
}

// ================================ float64 reference of the mixer ================================
// Written from mambainllama.md §1a: every loop is the formula, nothing shared with the library.
typedef struct {
    Dims m;
    int64_t B, L, T;
    const uint8_t *reset;
    double *P[NP];  // parameters, registry shapes
    // forward intermediates
    double *u, *z, *xs, *Bs, *Cs, *dtl, *dtf, *xr, *pre, *xc, *sarg, *delta, *hs, *ypre, *y, *out;
    int64_t *start;  // [T]: first time step of the token's document (within its row)
} Ref;

static double sigm(double v) { return 1.0 / (1.0 + exp(-v)); }
static double silu(double v) { return v * sigm(v); }
static double dsilu(double v) {
    double s = sigm(v);
    return s * (1.0 + v * (1.0 - s));
}
static double softplus(double v) { return v > 20.0 ? v : log1p(exp(v)); }
static double dsoftplus(double v) { return v > 20.0 ? 1.0 : sigm(v); }

static Ref ref_new(const HybridConfig *h, const Registry *r, const float *p, int64_t B, int64_t L, const uint8_t *reset) {
    Ref f;
    memset(&f, 0, sizeof f);
    f.m = dims_of(h), f.B = B, f.L = L, f.T = B * L, f.reset = reset;
    for (int k = 0; k < NP; k++) {
        const TensorInfo *t = mtensor(r, 0, k);
        f.P[k] = malloc((size_t)t->numel * sizeof(double));
        for (int64_t i = 0; i < t->numel; i++) f.P[k][i] = p[t->offset + i];
    }
    const int64_t T = f.T, di = f.m.di, d = f.m.d;
    double **bufs[] = {&f.z, &f.Cs, &f.dtf, &f.xr, &f.pre, &f.xc, &f.sarg, &f.delta, &f.ypre, &f.y};
    for (size_t i = 0; i < DL_ARRAY_LEN(bufs); i++) *bufs[i] = calloc((size_t)(T * di), sizeof(double));
    f.u = calloc((size_t)(T * d), sizeof(double));
    f.out = calloc((size_t)(T * d), sizeof(double));
    f.xs = calloc((size_t)(T * f.m.dxb), sizeof(double));
    f.Bs = calloc((size_t)(T * f.m.dxb), sizeof(double));
    f.dtl = calloc((size_t)(T * f.m.R), sizeof(double));
    f.hs = calloc((size_t)(T * di * f.m.N), sizeof(double));
    f.start = calloc((size_t)T, sizeof(int64_t));
    for (int64_t b = 0; b < B; b++) {
        int64_t s = 0;
        for (int64_t t = 0; t < L; t++) {
            if (reset && reset[b * L + t]) s = t;
            f.start[b * L + t] = s;
        }
    }
    return f;
}

static void ref_free(Ref *f) {
    for (int k = 0; k < NP; k++) free(f->P[k]);
    double *bufs[] = {f->u, f->z, f->xs, f->Bs, f->Cs, f->dtl, f->dtf, f->xr, f->pre, f->xc,
                      f->sarg, f->delta, f->hs, f->ypre, f->y, f->out};
    for (size_t i = 0; i < DL_ARRAY_LEN(bufs); i++) free(bufs[i]);
    free(f->start);
}

// y[T, o] = x[T, k] W[o, k]^T
static void ref_linear(const double *x, const double *W, double *y, int64_t T, int64_t o, int64_t k) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < o; i++) {
            double s = 0;
            for (int64_t j = 0; j < k; j++) s += x[t * k + j] * W[i * k + j];
            y[t * o + i] = s;
        }
}

// Forward from f->u (already set); fills every intermediate and f->out. Returns nothing.
static void ref_forward(Ref *f) {
    const Dims m = f->m;
    const int64_t T = f->T, L = f->L, di = m.di, dxb = m.dxb, N = m.N, R = m.R, W = m.W, d = m.d;
    double **P = f->P;
    ref_linear(f->u, P[P_Z], f->z, T, di, d);
    ref_linear(f->u, P[P_X], f->xs, T, dxb, d);
    ref_linear(f->u, P[P_B], f->Bs, T, dxb, d);
    ref_linear(f->u, P[P_C], f->Cs, T, di, d);
    ref_linear(f->u, P[P_DTD], f->dtl, T, R, d);
    ref_linear(f->dtl, P[P_DTW], f->dtf, T, di, R);
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < di; c++) f->dtf[t * di + c] += P[P_DTB][c];  // dt_proj's own bias
    // repeat_kv: channel c = g*N + n of the repeated x reads group g / rep of x
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < di; c++) f->xr[t * di + c] = f->xs[t * dxb + (c / N / m.rep) * N + c % N];
    // causal depthwise conv over the document's past, + bias, SiLU
    for (int64_t t = 0; t < T; t++) {
        const int64_t b = t / L, tl = t % L, s = f->start[t];
        for (int64_t c = 0; c < di; c++) {
            double a = P[P_CB][c];
            for (int64_t k = 0; k < W; k++) {
                int64_t src = tl - (W - 1) + k;
                if (src >= s) a += P[P_CW][c * W + k] * f->xr[(b * L + src) * di + c];
            }
            f->pre[t * di + c] = a;
            f->xc[t * di + c] = silu(a);
        }
    }
    // the scan, with the dt bias applied a second time
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < di; c++) {
            f->sarg[t * di + c] = f->dtf[t * di + c] + P[P_DTB][c];
            f->delta[t * di + c] = softplus(f->sarg[t * di + c]);
        }
    for (int64_t t = 0; t < T; t++) {
        const int64_t tl = t % L;
        const int fresh = tl == 0 || (f->reset && f->reset[t]);
        for (int64_t c = 0; c < di; c++) {
            const int64_t gB = c / N / m.rep, gC = c / N;
            const double dl = f->delta[t * di + c], xv = f->xc[t * di + c];
            double yv = 0;
            for (int64_t n = 0; n < N; n++) {
                double hp = fresh ? 0.0 : f->hs[((t - 1) * di + c) * N + n];
                double A = -exp(P[P_ALOG][c * N + n]);
                double hn = exp(dl * A) * hp + dl * f->Bs[t * dxb + gB * N + n] * xv;
                f->hs[(t * di + c) * N + n] = hn;
                yv += f->Cs[t * di + gC * N + n] * hn;
            }
            yv += P[P_D][c] * xv;
            f->ypre[t * di + c] = yv;
            f->y[t * di + c] = yv * silu(f->z[t * di + c]);
        }
    }
    ref_linear(f->y, P[P_OUT], f->out, T, d, di);
}

// Backward of loss = sum(out * G): gradients of the 12 tensors (G[k], registry shapes) and du [T,d].
static void ref_backward(Ref *f, const double *dout, double **G, double *du) {
    const Dims m = f->m;
    const int64_t T = f->T, L = f->L, di = m.di, dxb = m.dxb, N = m.N, R = m.R, W = m.W, d = m.d;
    double **P = f->P;
    double *dy = calloc((size_t)(T * di), sizeof(double)), *dz = calloc((size_t)(T * di), sizeof(double));
    double *dxc = calloc((size_t)(T * di), sizeof(double)), *dC = calloc((size_t)(T * di), sizeof(double));
    double *dsarg = calloc((size_t)(T * di), sizeof(double)), *dxr = calloc((size_t)(T * di), sizeof(double));
    double *dB = calloc((size_t)(T * dxb), sizeof(double)), *dxs = calloc((size_t)(T * dxb), sizeof(double));
    double *ddtl = calloc((size_t)(T * R), sizeof(double)), *dh = calloc((size_t)N, sizeof(double));
    // out = W_out y
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < d; i++)
            for (int64_t c = 0; c < di; c++) {
                dy[t * di + c] += dout[t * d + i] * P[P_OUT][i * di + c];
                G[P_OUT][i * di + c] += dout[t * d + i] * f->y[t * di + c];
            }
    // gate
    double *dypre = calloc((size_t)(T * di), sizeof(double));
    for (int64_t i = 0; i < T * di; i++) {
        dypre[i] = dy[i] * silu(f->z[i]);
        dz[i] = dy[i] * f->ypre[i] * dsilu(f->z[i]);
    }
    // scan, in reverse time per (row, channel)
    for (int64_t b = 0; b < f->B; b++)
        for (int64_t c = 0; c < di; c++) {
            const int64_t gB = c / N / m.rep, gC = c / N;
            memset(dh, 0, (size_t)N * sizeof(double));
            for (int64_t tl = L - 1; tl >= 0; tl--) {
                const int64_t t = b * L + tl;
                const int fresh = tl == 0 || (f->reset && f->reset[t]);
                const double g = dypre[t * di + c], dl = f->delta[t * di + c], xv = f->xc[t * di + c];
                double ddelta = 0;
                G[P_D][c] += g * xv;
                dxc[t * di + c] += g * P[P_D][c];
                for (int64_t n = 0; n < N; n++) {
                    const double hn = f->hs[(t * di + c) * N + n];
                    const double hp = fresh ? 0.0 : f->hs[((t - 1) * di + c) * N + n];
                    const double A = -exp(P[P_ALOG][c * N + n]), a = exp(dl * A), Bv = f->Bs[t * dxb + gB * N + n];
                    dC[t * di + gC * N + n] += g * hn;
                    dh[n] += g * f->Cs[t * di + gC * N + n];
                    ddelta += dh[n] * (A * a * hp + Bv * xv);
                    G[P_ALOG][c * N + n] += dh[n] * dl * a * hp * A;  // dA_log = dA * A
                    dB[t * dxb + gB * N + n] += dh[n] * dl * xv;
                    dxc[t * di + c] += dh[n] * dl * Bv;
                    dh[n] = fresh ? 0.0 : dh[n] * a;
                }
                dsarg[t * di + c] = ddelta * dsoftplus(f->sarg[t * di + c]);
                G[P_DTB][c] += 2.0 * dsarg[t * di + c];  // the bias is in dt_proj and in delta_bias
            }
        }
    // conv + SiLU
    for (int64_t t = 0; t < T; t++) {
        const int64_t b = t / L, tl = t % L, s = f->start[t];
        for (int64_t c = 0; c < di; c++) {
            const double dp = dxc[t * di + c] * dsilu(f->pre[t * di + c]);
            G[P_CB][c] += dp;
            for (int64_t k = 0; k < W; k++) {
                int64_t src = tl - (W - 1) + k;
                if (src >= s) {
                    G[P_CW][c * W + k] += dp * f->xr[(b * L + src) * di + c];
                    dxr[(b * L + src) * di + c] += dp * P[P_CW][c * W + k];
                }
            }
        }
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < di; c++) dxs[t * dxb + (c / N / m.rep) * N + c % N] += dxr[t * di + c];
    // dt = W_dt dtl + b, dtl = W_dd u
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < di; c++)
            for (int64_t j = 0; j < R; j++) {
                G[P_DTW][c * R + j] += dsarg[t * di + c] * f->dtl[t * R + j];
                ddtl[t * R + j] += dsarg[t * di + c] * P[P_DTW][c * R + j];
            }
    // the input projections
    struct {
        int k;
        const double *dv;
        int64_t o;
    } proj[5] = {{P_Z, dz, di}, {P_X, dxs, dxb}, {P_B, dB, dxb}, {P_C, dC, di}, {P_DTD, ddtl, R}};
    memset(du, 0, (size_t)(T * d) * sizeof(double));
    for (int q = 0; q < 5; q++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < proj[q].o; i++) {
                const double gv = proj[q].dv[t * proj[q].o + i];
                for (int64_t j = 0; j < d; j++) {
                    G[proj[q].k][i * d + j] += gv * f->u[t * d + j];
                    du[t * d + j] += gv * P[proj[q].k][i * d + j];
                }
            }
    free(dy), free(dz), free(dxc), free(dC), free(dsarg), free(dxr), free(dB), free(dxs), free(ddtl), free(dh);
    free(dypre);
}

static double ref_loss(Ref *f, const double *Gout) {
    ref_forward(f);
    double s = 0;
    for (int64_t i = 0; i < f->T * f->m.d; i++) s += f->out[i] * Gout[i];
    return s;
}

// ================================ tests ================================

static uint8_t *make_resets(int64_t B, int64_t L, const int64_t *starts, int n_starts, int64_t row) {
    uint8_t *r = calloc((size_t)(B * L), 1);
    for (int i = 0; i < n_starts; i++) r[row * L + starts[i]] = 1;
    return r;
}

// fp32 library vs float64 reference: out, dx and every gradient.
static void test_vs_ref64(int d_model, int n_head, int n_kv, int head_dim, int64_t B, int64_t L, int with_resets,
                          uint64_t seed) {
    HybridConfig h;
    Registry r;
    make_hybrid(&h, &r, d_model, n_head, n_kv, head_dim);
    Dims m = dims_of(&h);
    const int64_t T = B * L, d = m.d;
    float *p = calloc((size_t)r.numel, sizeof(float)), *g = calloc((size_t)r.numel, sizeof(float));
    random_params(&h, &r, p, seed);
    Rng rg;
    rng_init(&rg, seed, 99);
    float *x = malloc((size_t)(T * d) * sizeof(float)), *dout = malloc((size_t)(T * d) * sizeof(float));
    float *out = malloc((size_t)(T * d) * sizeof(float)), *dx = malloc((size_t)(T * d) * sizeof(float));
    fill_rand(x, T * d, 1.0, &rg);
    fill_rand(dout, T * d, 1.0, &rg);
    int64_t starts[3] = {0, L / 3, L / 3 + 5 < L ? L / 3 + 5 : L - 1};
    uint8_t *reset = with_resets ? make_resets(B, L, starts, 3, B - 1) : NULL;

    poison(out, T * d);
    poison(dx, T * d);
    Mamba1Acts *acts = mamba1_acts_new(&h, B, L);
    mamba1_forward(&h, &r, p, 0, B, L, x, reset, out, acts);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, dx, g, acts);

    Ref f = ref_new(&h, &r, p, B, L, reset);
    for (int64_t i = 0; i < T * d; i++) f.u[i] = x[i];
    ref_forward(&f);
    double *Gr[NP], *du = malloc((size_t)(T * d) * sizeof(double)), *G = malloc((size_t)(T * d) * sizeof(double));
    for (int64_t i = 0; i < T * d; i++) G[i] = dout[i];
    for (int k = 0; k < NP; k++) Gr[k] = calloc((size_t)mtensor(&r, 0, k)->numel, sizeof(double));
    ref_backward(&f, G, Gr, du);

    char what[160];
    double e = rel_err_fd(out, f.out, T * d), worst = e;
    snprintf(what, sizeof what, "out (d=%d, %d/%d heads, B=%lld, L=%lld%s)", d_model, n_head, n_kv, (long long)B,
             (long long)L, with_resets ? ", resets" : "");
    CHECK_REL(e, 1e-5, what);
    e = rel_err_fd(dx, du, T * d);
    worst = DL_MAX(worst, e);
    CHECK_REL(e, 1e-5, "dx");
    for (int k = 0; k < NP; k++) {
        const TensorInfo *t = mtensor(&r, 0, k);
        e = rel_err_fd(g + t->offset, Gr[k], t->numel);
        worst = DL_MAX(worst, e);
        snprintf(what, sizeof what, "grad %s", SUFFIX[k]);
        CHECK_REL(e, 1e-5, what);
    }
    printf("  vs float64: d=%d heads %d/%d B=%lld L=%lld%s: worst relative error %.2e\n", d_model, n_head, n_kv,
           (long long)B, (long long)L, with_resets ? " resets" : "", worst);

    // gradients are ADDED: a second backward doubles them; and the run is deterministic
    float *g1 = malloc((size_t)r.numel * sizeof(float)), *dx2 = malloc((size_t)(T * d) * sizeof(float));
    float *out2 = malloc((size_t)(T * d) * sizeof(float));
    memcpy(g1, g, (size_t)r.numel * sizeof(float));
    mamba1_forward(&h, &r, p, 0, B, L, x, reset, out2, acts);
    CHECK(memcmp(out, out2, (size_t)(T * d) * sizeof(float)) == 0);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, dx2, g, acts);
    CHECK(memcmp(dx, dx2, (size_t)(T * d) * sizeof(float)) == 0);
    double num = 0, den = 0;
    for (int64_t i = 0; i < r.numel; i++) {
        num += ((double)g[i] - 2.0 * g1[i]) * ((double)g[i] - 2.0 * g1[i]);
        den += 4.0 * (double)g1[i] * g1[i];
    }
    CHECK_REL(sqrt(num / den), 1e-6, "grads accumulate (second backward doubles them)");
    // a frozen layer (grads NULL) gives the same dx; the lowest layer (dx NULL) the same grads
    float *g3 = calloc((size_t)r.numel, sizeof(float));
    poison(dx2, T * d);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, dx2, NULL, acts);
    CHECK(memcmp(dx, dx2, (size_t)(T * d) * sizeof(float)) == 0);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, NULL, g3, acts);
    CHECK(memcmp(g3, g1, (size_t)r.numel * sizeof(float)) == 0);
    free(g3);

    mamba1_acts_free(acts);
    ref_free(&f);
    for (int k = 0; k < NP; k++) free(Gr[k]);
    free(du), free(G), free(p), free(g), free(g1), free(x), free(dout), free(out), free(out2), free(dx), free(dx2);
    free(reset);
    reg_free(&r);
}

// Finite differences (float64, central) of the float64 reference, for every element of every Mamba tensor
// and of the input, on a tiny shape with a reset; checks the reference backward and the fp32 backward.
static void test_finite_differences(void) {
    HybridConfig h;
    Registry r;
    make_hybrid(&h, &r, 32, 4, 2, 8);  // d_inner 32, d_xb 16, N 16: C groups 2, B groups 1, dt_rank 2
    Dims m = dims_of(&h);
    const int64_t B = 2, L = 6, T = B * L, d = m.d;
    float *p = calloc((size_t)r.numel, sizeof(float)), *g = calloc((size_t)r.numel, sizeof(float));
    random_params(&h, &r, p, 1234);
    Rng rg;
    rng_init(&rg, 77, 1);
    float *x = malloc((size_t)(T * d) * sizeof(float)), *dout = malloc((size_t)(T * d) * sizeof(float));
    float *out = malloc((size_t)(T * d) * sizeof(float)), *dx = malloc((size_t)(T * d) * sizeof(float));
    fill_rand(x, T * d, 1.0, &rg);
    fill_rand(dout, T * d, 1.0, &rg);
    int64_t starts[1] = {3};
    uint8_t *reset = make_resets(B, L, starts, 1, 1);
    poison(dx, T * d);
    Mamba1Acts *acts = mamba1_acts_new(&h, B, L);
    mamba1_forward(&h, &r, p, 0, B, L, x, reset, out, acts);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, dx, g, acts);

    Ref f = ref_new(&h, &r, p, B, L, reset);
    for (int64_t i = 0; i < T * d; i++) f.u[i] = x[i];
    double *Gout = malloc((size_t)(T * d) * sizeof(double)), *du = malloc((size_t)(T * d) * sizeof(double));
    for (int64_t i = 0; i < T * d; i++) Gout[i] = dout[i];
    double *Gr[NP];
    for (int k = 0; k < NP; k++) Gr[k] = calloc((size_t)mtensor(&r, 0, k)->numel, sizeof(double));
    ref_forward(&f);
    ref_backward(&f, Gout, Gr, du);

    // 4-point central stencil, error O(eps^4): truncation ~1e-12 and roundoff ~1e-16*|loss|/eps stay far
    // below the gradients even for A_log, whose entries are small
    const double eps = 1e-3;
    double worst_ref = 0, worst_f32 = 0;
    char what[160];
    for (int k = 0; k <= NP; k++) {  // k == NP: the input
        const int64_t n = k < NP ? mtensor(&r, 0, k)->numel : T * d;
        double *v = k < NP ? f.P[k] : f.u;
        double *fd = malloc((size_t)n * sizeof(double));
        for (int64_t i = 0; i < n; i++) {
            const double keep = v[i];
            double l[4];
            const double at[4] = {2 * eps, eps, -eps, -2 * eps};
            for (int q = 0; q < 4; q++) {
                v[i] = keep + at[q];
                l[q] = ref_loss(&f, Gout);
            }
            v[i] = keep;
            fd[i] = (8.0 * (l[1] - l[2]) - (l[0] - l[3])) / (12.0 * eps);
        }
        const double er = rel_err_dd(k < NP ? Gr[k] : du, fd, n);
        const double ef = rel_err_fd(k < NP ? g + mtensor(&r, 0, k)->offset : dx, fd, n);
        worst_ref = DL_MAX(worst_ref, er), worst_f32 = DL_MAX(worst_f32, ef);
        snprintf(what, sizeof what, "finite differences vs float64 backward: %s", k < NP ? SUFFIX[k] : "input");
        CHECK_REL(er, 1e-6, what);
        snprintf(what, sizeof what, "finite differences vs fp32 backward: %s", k < NP ? SUFFIX[k] : "input");
        CHECK_REL(ef, 1e-5, what);
        free(fd);
    }
    printf("  finite differences (12 tensors + input): float64 backward %.2e, fp32 backward %.2e\n", worst_ref,
           worst_f32);
    mamba1_acts_free(acts);
    ref_free(&f);
    for (int k = 0; k < NP; k++) free(Gr[k]);
    free(Gout), free(du), free(p), free(g), free(x), free(dout), free(out), free(dx), free(reset);
    reg_free(&r);
}

// Copies rows [t0, t1) of every batch row of a [B, L, d] tensor into [B, t1-t0, d].
static void slice_time(const float *x, int64_t B, int64_t L, int64_t d, int64_t t0, int64_t t1, float *y) {
    for (int64_t b = 0; b < B; b++)
        memcpy(y + b * (t1 - t0) * d, x + (b * L + t0) * d, (size_t)((t1 - t0) * d) * sizeof(float));
}
static void unslice_time(const float *y, int64_t B, int64_t L, int64_t d, int64_t t0, int64_t t1, float *x) {
    for (int64_t b = 0; b < B; b++)
        memcpy(x + (b * L + t0) * d, y + b * (t1 - t0) * d, (size_t)((t1 - t0) * d) * sizeof(float));
}

// Full forward == prefill == token-by-token decode == chunked prefill + decode (with resets in the chunks).
static void test_prefill_decode(void) {
    HybridConfig h;
    Registry r;
    make_hybrid(&h, &r, 96, 6, 2, 16);
    Dims m = dims_of(&h);
    const int64_t B = 2, L = 20, T = B * L, d = m.d;
    float *p = calloc((size_t)r.numel, sizeof(float));
    random_params(&h, &r, p, 42);
    Rng rg;
    rng_init(&rg, 5, 5);
    float *x = malloc((size_t)(T * d) * sizeof(float)), *ref = malloc((size_t)(T * d) * sizeof(float));
    float *got = malloc((size_t)(T * d) * sizeof(float)), *xb = malloc((size_t)(T * d) * sizeof(float));
    float *ob = malloc((size_t)(T * d) * sizeof(float));
    fill_rand(x, T * d, 1.0, &rg);

    for (int with_resets = 0; with_resets < 2; with_resets++) {
        // resets (row 1) at 3, at 8 (inside the last d_conv-1 steps of chunk 1 = [0,10)), at 11 (chunk 2 = [10,14))
        uint8_t *reset = calloc((size_t)T, 1);
        if (with_resets) reset[1 * L + 3] = reset[1 * L + 8] = reset[1 * L + 11] = 1;
        mamba1_forward(&h, &r, p, 0, B, L, x, with_resets ? reset : NULL, ref, NULL);

        Mamba1State st = mamba1_state_new(&h, B), st2 = mamba1_state_new(&h, B);
        if (!with_resets) {
            // whole prefill
            poison(got, T * d);
            mamba1_prefill(&h, &r, p, 0, B, L, x, NULL, got, &st);
            CHECK_REL(rel_err_ff(got, ref, T * d), 1e-6, "prefill == forward");
            // token by token
            poison(got, T * d);
            for (int64_t t = 0; t < L; t++) {
                slice_time(x, B, L, d, t, t + 1, xb);
                mamba1_step(&h, &r, p, 0, B, xb, &st2, ob);
                unslice_time(ob, B, L, d, t, t + 1, got);
            }
            double e = rel_err_ff(got, ref, T * d);
            printf("  decode token by token vs forward: relative error %.2e\n", e);
            CHECK_REL(e, 1e-5, "mamba1_step x L == forward");
            CHECK_REL(rel_err_ff(st2.ssm, st.ssm, B * m.di * m.N), 1e-5, "final SSM state: decode == prefill");
            CHECK_REL(rel_err_ff(st2.conv, st.conv, B * (m.W - 1) * m.di), 1e-6, "final conv state: decode == prefill");
            mamba1_state_reset(&st, -1);
            mamba1_state_reset(&st2, -1);
        }
        // chunked: prefill [0,10) and [10,14) (resets inside), then decode 14..19; a state copy rolls back
        const int64_t cuts[3] = {0, 10, 14};
        poison(got, T * d);
        uint8_t *rchunk = calloc((size_t)T, 1);
        for (int c = 0; c < 2; c++) {
            const int64_t t0 = cuts[c], t1 = cuts[c + 1], n = t1 - t0;
            slice_time(x, B, L, d, t0, t1, xb);
            for (int64_t b = 0; b < B; b++) memcpy(rchunk + b * n, reset + b * L + t0, (size_t)n);
            mamba1_prefill(&h, &r, p, 0, B, n, xb, rchunk, ob, &st);
            unslice_time(ob, B, L, d, t0, t1, got);
        }
        mamba1_state_copy(&st2, &st);
        for (int64_t t = 14; t < L; t++) {
            slice_time(x, B, L, d, t, t + 1, xb);
            mamba1_step(&h, &r, p, 0, B, xb, &st, ob);
            unslice_time(ob, B, L, d, t, t + 1, got);
        }
        double e = rel_err_ff(got, ref, T * d);
        printf("  chunked prefill (10+4) + decode%s vs forward: relative error %.2e\n", with_resets ? " with resets" : "",
               e);
        CHECK_REL(e, 1e-5, with_resets ? "chunked prefill with resets + decode == forward" : "chunked prefill + decode == forward");
        // roll back to the copy and replay the last 6 tokens as one multi-token step: same outputs
        slice_time(x, B, L, d, 14, L, xb);
        mamba1_prefill(&h, &r, p, 0, B, L - 14, xb, NULL, ob, &st2);
        slice_time(got, B, L, d, 14, L, xb);
        CHECK_REL(rel_err_ff(ob, xb, B * (L - 14) * d), 1e-5, "multi-token step from a copied state == decode");
        CHECK_REL(rel_err_ff(st2.ssm, st.ssm, B * m.di * m.N), 1e-5, "state after multi-token step == after decode");
        mamba1_state_free(&st);
        mamba1_state_free(&st2);
        free(reset), free(rchunk);
    }
    free(p), free(x), free(ref), free(got), free(xb), free(ob);
    reg_free(&r);
}

// Multi-token step (speculative verification): outputs of all K tokens == forward; the state is left after
// the accepted prefix keep[b] (== prefilling exactly those tokens), and decoding goes on from there.
static void test_multistep(void) {
    HybridConfig h;
    Registry r;
    make_hybrid(&h, &r, 96, 6, 2, 16);
    Dims m = dims_of(&h);
    const int64_t B = 3, P = 7, K = 5, L = P + K, d = m.d;
    const int32_t keep[3] = {2, 5, 0};
    float *p = calloc((size_t)r.numel, sizeof(float));
    random_params(&h, &r, p, 8);
    Rng rg;
    rng_init(&rg, 6, 6);
    float *x = malloc((size_t)(B * L * d) * sizeof(float)), *ref = malloc((size_t)(B * L * d) * sizeof(float));
    float *xb = malloc((size_t)(B * L * d) * sizeof(float)), *ob = malloc((size_t)(B * L * d) * sizeof(float));
    float *rb = malloc((size_t)(B * L * d) * sizeof(float)), *nxt = malloc((size_t)(B * d) * sizeof(float));
    fill_rand(x, B * L * d, 1.0, &rg);
    fill_rand(nxt, B * d, 1.0, &rg);
    mamba1_forward(&h, &r, p, 0, B, L, x, NULL, ref, NULL);
    Mamba1State st = mamba1_state_new(&h, B);
    slice_time(x, B, L, d, 0, P, xb);
    mamba1_prefill(&h, &r, p, 0, B, P, xb, NULL, ob, &st);
    slice_time(x, B, L, d, P, L, xb);
    poison(ob, B * K * d);
    mamba1_multistep(&h, &r, p, 0, B, K, xb, keep, ob, &st);
    slice_time(ref, B, L, d, P, L, rb);
    double e = rel_err_ff(ob, rb, B * K * d);
    CHECK_REL(e, 1e-5, "multi-token step outputs == forward");
    // the next token after the accepted prefix, per row, vs a forward over prompt + prefix + next token
    float *o1 = malloc((size_t)(B * d) * sizeof(float));
    mamba1_step(&h, &r, p, 0, B, nxt, &st, o1);
    double es = 0, ec = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = P + keep[b] + 1;
        Mamba1State sb = mamba1_state_new(&h, 1);
        memcpy(xb, x + b * L * d, (size_t)((n - 1) * d) * sizeof(float));
        memcpy(xb + (n - 1) * d, nxt + b * d, (size_t)d * sizeof(float));
        mamba1_prefill(&h, &r, p, 0, 1, n, xb, NULL, rb, &sb);
        es = DL_MAX(es, rel_err_ff(o1 + b * d, rb + (n - 1) * d, d));
        ec = DL_MAX(ec, rel_err_ff(st.ssm + b * m.di * m.N, sb.ssm, m.di * m.N));
        ec = DL_MAX(ec, rel_err_ff(st.conv + b * (m.W - 1) * m.di, sb.conv, (m.W - 1) * m.di));
        mamba1_state_free(&sb);
    }
    printf("  multi-token step: outputs %.2e; after accepting {2,5,0} of 5: next output %.2e, state %.2e\n", e, es, ec);
    CHECK_REL(es, 1e-5, "decode after a partially accepted multi-token step == forward of the accepted tokens");
    CHECK_REL(ec, 1e-5, "state after a partially accepted multi-token step == prefill of the accepted tokens");
    mamba1_state_free(&st);
    free(p), free(x), free(ref), free(xb), free(ob), free(rb), free(nxt), free(o1);
    reg_free(&r);
}

// Packed rows with resets == each document alone: outputs, dx, and summed parameter gradients.
static void test_packed_vs_documents(void) {
    HybridConfig h;
    Registry r;
    make_hybrid(&h, &r, 64, 4, 1, 16);  // MQA-like: rep 4
    Dims m = dims_of(&h);
    const int64_t B = 2, L = 22, T = B * L, d = m.d;
    const int64_t docs[2][5] = {{5, 9, 1, 7, 0}, {2, 3, 17, 0, 0}};  // lengths per row, 0-terminated
    float *p = calloc((size_t)r.numel, sizeof(float));
    random_params(&h, &r, p, 9);
    Rng rg;
    rng_init(&rg, 3, 3);
    float *x = malloc((size_t)(T * d) * sizeof(float)), *dout = malloc((size_t)(T * d) * sizeof(float));
    float *out = malloc((size_t)(T * d) * sizeof(float)), *dx = malloc((size_t)(T * d) * sizeof(float));
    float *out_docs = malloc((size_t)(T * d) * sizeof(float)), *dx_docs = malloc((size_t)(T * d) * sizeof(float));
    float *g = calloc((size_t)r.numel, sizeof(float)), *g_docs = calloc((size_t)r.numel, sizeof(float));
    fill_rand(x, T * d, 1.0, &rg);
    fill_rand(dout, T * d, 1.0, &rg);
    uint8_t *reset = calloc((size_t)T, 1);
    for (int b = 0; b < B; b++) {
        int64_t t = 0;
        for (int k = 0; docs[b][k]; k++) reset[b * L + t] = 1, t += docs[b][k];
    }
    Mamba1Acts *acts = mamba1_acts_new(&h, B, L);
    poison(out, T * d), poison(dx, T * d), poison(out_docs, T * d), poison(dx_docs, T * d);
    mamba1_forward(&h, &r, p, 0, B, L, x, reset, out, acts);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, dx, g, acts);
    for (int b = 0; b < B; b++) {
        int64_t t = 0;
        for (int k = 0; docs[b][k]; k++) {
            const int64_t n = docs[b][k], off = (b * L + t) * d;
            mamba1_forward(&h, &r, p, 0, 1, n, x + off, NULL, out_docs + off, acts);
            mamba1_backward(&h, &r, p, 0, 1, n, NULL, dout + off, dx_docs + off, g_docs, acts);
            t += n;
        }
    }
    double eo = rel_err_ff(out, out_docs, T * d), ed = rel_err_ff(dx, dx_docs, T * d), eg = 0;
    CHECK_REL(eo, 1e-6, "packed with resets == documents alone: out");
    CHECK_REL(ed, 1e-6, "packed with resets == documents alone: dx");
    for (int k = 0; k < NP; k++) {
        const TensorInfo *t = mtensor(&r, 0, k);
        double e = rel_err_ff(g + t->offset, g_docs + t->offset, t->numel);
        eg = DL_MAX(eg, e);
        char what[128];
        snprintf(what, sizeof what, "packed == documents: grad %s", SUFFIX[k]);
        CHECK_REL(e, 1e-5, what);
    }
    printf("  packed vs documents: out %.2e, dx %.2e, grads %.2e\n", eo, ed, eg);
    // without the resets the documents would interact: the check can fail
    mamba1_forward(&h, &r, p, 0, B, L, x, NULL, out, NULL);
    CHECK(rel_err_ff(out, out_docs, T * d) > 1e-3);
    mamba1_acts_free(acts);
    free(p), free(x), free(dout), free(out), free(dx), free(out_docs), free(dx_docs), free(g), free(g_docs), free(reset);
    reg_free(&r);
}

// Determinism: two runs with the same thread count give bitwise the same results (every reduction of the
// mixer and of the scan / conv twins has a fixed order). Across thread counts only rounding may differ:
// OpenBLAS (OpenMP build) splits its GEMMs by the thread count, which a run fixes (recipe `threads`).
static void test_thread_independence(void) {
    HybridConfig h;
    Registry r;
    make_hybrid(&h, &r, 96, 6, 2, 16);
    Dims m = dims_of(&h);
    const int64_t B = 3, L = 40, T = B * L, d = m.d;
    float *p = calloc((size_t)r.numel, sizeof(float));
    random_params(&h, &r, p, 21);
    Rng rg;
    rng_init(&rg, 21, 21);
    float *x = malloc((size_t)(T * d) * sizeof(float)), *o[2], *dx[2], *g[2];
    fill_rand(x, T * d, 1.0, &rg);
    uint8_t *reset = calloc((size_t)T, 1);
    reset[L + 7] = reset[2 * L + 30] = 1;
    const int omp0 = omp_get_max_threads();
    float *o1 = malloc((size_t)(T * d) * sizeof(float));
    Mamba1Acts *a = mamba1_acts_new(&h, B, L);
    omp_set_num_threads(1);
    mamba1_forward(&h, &r, p, 0, B, L, x, reset, o1, NULL);
    for (int k = 0; k < 2; k++) {
        omp_set_num_threads(2);
        o[k] = malloc((size_t)(T * d) * sizeof(float)), dx[k] = malloc((size_t)(T * d) * sizeof(float));
        g[k] = calloc((size_t)r.numel, sizeof(float));
        mamba1_forward(&h, &r, p, 0, B, L, x, reset, o[k], a);
        mamba1_backward(&h, &r, p, 0, B, L, reset, x, dx[k], g[k], a);
    }
    omp_set_num_threads(omp0);
    CHECK(memcmp(o[0], o[1], (size_t)(T * d) * sizeof(float)) == 0);
    CHECK_REL(rel_err_ff(o1, o[0], T * d), 1e-6, "1 vs 2 threads");
    free(o1);
    CHECK(memcmp(dx[0], dx[1], (size_t)(T * d) * sizeof(float)) == 0);
    CHECK(memcmp(g[0], g[1], (size_t)r.numel * sizeof(float)) == 0);
    mamba1_acts_free(a);
    for (int k = 0; k < 2; k++) free(o[k]), free(dx[k]), free(g[k]);
    free(p), free(x), free(reset);
    reg_free(&r);
}

// ---- init
static void make_llama(LlamaConfig *c, bool tied) {
    *c = (LlamaConfig){.n_layer = 4, .d_model = 96, .n_head = 6, .n_kv_head = 2, .head_dim = 16, .d_ff = 64,
                       .vocab = 40, .max_pos = 128, .rope_theta = 10000, .rms_eps = 1e-5, .tied_embeddings = tied,
                       .bos_id = -1, .eos_id = -1};
}

static const float *tens(const Registry *r, const float *p, const char *fmt, int layer) {
    char name[DL_TENSOR_NAME_MAX];
    snprintf(name, sizeof name, fmt, layer);
    int i = reg_find(r, name);
    if (i < 0) {
        fprintf(stderr, "missing %s\n", name);
        exit(2);
    }
    return p + r->t[i].offset;
}
static int64_t tnumel(const Registry *r, const char *fmt, int layer) {
    char name[DL_TENSOR_NAME_MAX];
    snprintf(name, sizeof name, fmt, layer);
    return r->t[reg_find(r, name)].numel;
}

// Uniform(-b, b) check: within bounds, variance b^2/3 within 6 standard errors, spread reaching the ends.
static void check_uniform(const float *v, int64_t n, double b, const char *what) {
    double s2 = 0, mx = 0;
    int in = 1;
    for (int64_t i = 0; i < n; i++) {
        if (!(fabs(v[i]) <= b)) in = 0;
        s2 += (double)v[i] * v[i];
        mx = DL_MAX(mx, fabs(v[i]));
    }
    const double var = s2 / n, want = b * b / 3, se = b * b * sqrt(4.0 / 45.0 / n);  // sd of x^2 for U(-b,b)
    if (!in || fabs(var - want) > 6 * se || mx < b * (1 - 20.0 / n))
        fprintf(stderr, "%s: bound %.4g, max %.4g, var %.4g (want %.4g +- %.2g)\n", what, b, mx, var, want, se);
    CHECK(in);
    CHECK(fabs(var - want) <= 6 * se);
    CHECK(mx >= b * (1 - 20.0 / n));
}

static void test_init(void) {
    LlamaConfig tc, hc_base;
    make_llama(&tc, true);
    HybridConfig teacher, hyb;
    hybrid_config_teacher(&teacher, &tc);
    Registry tr, hr;
    model_build_registry(&teacher, &tr);
    float *tp = calloc((size_t)tr.numel, sizeof(float));
    Rng rg;
    rng_init(&rg, 11, 0);
    for (int64_t i = 0; i < tr.numel; i++) tp[i] = (float)rng_normal(&rg);
    make_llama(&hc_base, false);  // untied student from a tied teacher: lm_head = embeddings
    int attn[1] = {1};
    DlError e;
    CHECK(hybrid_config_init(&hyb, &hc_base, MIXER_MAMBA1, attn, 1, &e) == 0);
    model_build_registry(&hyb, &hr);
    float *hp = malloc((size_t)hr.numel * sizeof(float)), *hp2 = malloc((size_t)hr.numel * sizeof(float));
    poison(hp, hr.numel);
    CHECK(hybrid_init_from_teacher(&hyb, &hr, hp, &teacher, &tr, tp, 1234, &e) == 0);

    // shared tensors: bitwise copies
    int shared_ok = 1, n_shared = 0;
    for (int i = 0; i < hr.n; i++) {
        const TensorInfo *t = &hr.t[i];
        if (t->role == ROLE_MAMBA) continue;
        int j = reg_find(&tr, strcmp(t->name, "lm_head.weight") == 0 ? "model.embed_tokens.weight" : t->name);
        if (j < 0 || memcmp(hp + t->offset, tp + tr.t[j].offset, (size_t)t->numel * sizeof(float))) shared_ok = 0;
        n_shared++;
    }
    CHECK(shared_ok);
    CHECK(n_shared == 1 + 4 * 2 + 4 * 3 + 4 + 1 + 1);  // embed, norms, MLPs, layer 1 attention, final norm, head
    const Dims m = dims_of(&hyb);
    for (int l = 0; l < 4; l++) {
        if (l == 1) continue;
        // x <- V, B <- K, C <- Q, out <- O: exact copies (the GQA repeat happens at run time)
        const char *pairs[4][2] = {{"model.layers.%d.mamba.in_proj_x.weight", "model.layers.%d.self_attn.v_proj.weight"},
                                   {"model.layers.%d.mamba.B_proj.weight", "model.layers.%d.self_attn.k_proj.weight"},
                                   {"model.layers.%d.mamba.C_proj.weight", "model.layers.%d.self_attn.q_proj.weight"},
                                   {"model.layers.%d.mamba.out_proj.weight", "model.layers.%d.self_attn.o_proj.weight"}};
        for (int k = 0; k < 4; k++)
            CHECK(tnumel(&hr, pairs[k][0], l) == tnumel(&tr, pairs[k][1], l) &&
                  memcmp(tens(&hr, hp, pairs[k][0], l), tens(&tr, tp, pairs[k][1], l),
                         (size_t)tnumel(&hr, pairs[k][0], l) * sizeof(float)) == 0);
        const float *alog = tens(&hr, hp, "model.layers.%d.mamba.A_log", l), *D = tens(&hr, hp, "model.layers.%d.mamba.D", l);
        int a_ok = 1, d_ok = 1;
        for (int64_t c = 0; c < m.di; c++) {
            for (int64_t n = 0; n < m.N; n++) a_ok &= alog[c * m.N + n] == (float)log((double)n + 1);
            d_ok &= D[c] == 1.0f;
        }
        CHECK(a_ok);
        CHECK(d_ok);
        // dt = softplus(bias) is log-uniform on [1e-3, 1e-1]: bounds and mean/sd of log(dt)
        const float *dtb = tens(&hr, hp, "model.layers.%d.mamba.dt_proj.bias", l);
        double s = 0, s2 = 0;
        int b_ok = 1;
        for (int64_t c = 0; c < m.di; c++) {
            double dt = log1p(exp((double)dtb[c]));
            b_ok &= dt >= 1e-3 * (1 - 1e-4) && dt <= 1e-1 * (1 + 1e-4);
            s += log(dt), s2 += log(dt) * log(dt);
        }
        const double mean = s / m.di, sd = sqrt(s2 / m.di - mean * mean), w = log(100.0);
        CHECK(b_ok);
        CHECK(fabs(mean - 0.5 * (log(1e-3) + log(1e-1))) < 6 * w / sqrt(12.0 * m.di));
        CHECK(fabs(sd - w / sqrt(12.0)) < 0.2 * w / sqrt(12.0));
        check_uniform(tens(&hr, hp, "model.layers.%d.mamba.in_proj_z.weight", l), m.di * m.d, 1 / sqrt((double)m.d),
                      "in_proj_z");
        check_uniform(tens(&hr, hp, "model.layers.%d.mamba.dt_proj_down.weight", l), m.R * m.d, 1 / sqrt((double)m.d),
                      "dt_proj_down");
        check_uniform(tens(&hr, hp, "model.layers.%d.mamba.dt_proj.weight", l), m.di * m.R, 1 / sqrt((double)m.R),
                      "dt_proj.weight");
        check_uniform(tens(&hr, hp, "model.layers.%d.mamba.conv1d.weight", l), m.di * m.W, 0.5, "conv1d.weight");
        check_uniform(tens(&hr, hp, "model.layers.%d.mamba.conv1d.bias", l), m.di, 0.5, "conv1d.bias");
    }
    // layers draw from their own streams: different layers differ
    CHECK(memcmp(tens(&hr, hp, "model.layers.%d.mamba.in_proj_z.weight", 0),
                 tens(&hr, hp, "model.layers.%d.mamba.in_proj_z.weight", 2), 64 * sizeof(float)) != 0);
    // deterministic for the seed; another seed changes only the random tensors
    poison(hp2, hr.numel);
    CHECK(hybrid_init_from_teacher(&hyb, &hr, hp2, &teacher, &tr, tp, 1234, &e) == 0);
    CHECK(memcmp(hp, hp2, (size_t)hr.numel * sizeof(float)) == 0);
    CHECK(hybrid_init_from_teacher(&hyb, &hr, hp2, &teacher, &tr, tp, 1235, &e) == 0);
    CHECK(memcmp(tens(&hr, hp, "model.layers.%d.mamba.in_proj_z.weight", 0),
                 tens(&hr, hp2, "model.layers.%d.mamba.in_proj_z.weight", 0), 64 * sizeof(float)) != 0);
    CHECK(memcmp(tens(&hr, hp, "model.layers.%d.mamba.C_proj.weight", 0),
                 tens(&hr, hp2, "model.layers.%d.mamba.C_proj.weight", 0), (size_t)m.di * m.d * sizeof(float)) == 0);

    // hybrid -> hybrid (a stage turns layer 1 into Mamba): Mamba layers 0, 2, 3 are copied, layer 1 comes from
    // the source's attention
    HybridConfig hyb2;
    Registry hr2;
    int attn_none[1] = {0};
    CHECK(hybrid_config_init(&hyb2, &hc_base, MIXER_MAMBA1, attn_none, 0, &e) == 0);
    model_build_registry(&hyb2, &hr2);
    float *hp3 = malloc((size_t)hr2.numel * sizeof(float));
    CHECK(hybrid_init_from_teacher(&hyb2, &hr2, hp3, &hyb, &hr, hp, 77, &e) == 0);
    int grow_ok = 1;
    for (int i = 0; i < hr2.n; i++) {
        const TensorInfo *t = &hr2.t[i];
        if (t->layer == 1 && t->role == ROLE_MAMBA) continue;
        int j = reg_find(&hr, t->name);
        grow_ok &= j >= 0 && memcmp(hp3 + t->offset, hp + hr.t[j].offset, (size_t)t->numel * sizeof(float)) == 0;
    }
    CHECK(grow_ok);
    CHECK(memcmp(tens(&hr2, hp3, "model.layers.%d.mamba.C_proj.weight", 1),
                 tens(&tr, tp, "model.layers.%d.self_attn.q_proj.weight", 1), (size_t)m.di * m.d * sizeof(float)) == 0);
    // errors: an attention layer cannot come from a Mamba layer; configs must match
    e.msg[0] = 0;
    CHECK(hybrid_init_from_teacher(&hyb, &hr, hp, &hyb2, &hr2, hp3, 1, &e) == -1);
    CHECK(strstr(e.msg, "layer 1") != NULL);
    LlamaConfig other = tc;
    other.d_ff = 32;
    HybridConfig tother;
    Registry tro;
    hybrid_config_teacher(&tother, &other);
    model_build_registry(&tother, &tro);
    float *tpo = calloc((size_t)tro.numel, sizeof(float));
    e.msg[0] = 0;
    CHECK(hybrid_init_from_teacher(&hyb, &hr, hp, &tother, &tro, tpo, 1, &e) == -1);
    CHECK(strstr(e.msg, "does not match") != NULL);
    // a tied hybrid cannot drop an untied source's head
    e.msg[0] = 0;
    CHECK(hybrid_init_from_teacher(&hyb2, &hr2, hp3, &hyb, &hr, hp, 1, &e) == 0);  // untied -> untied is fine
    LlamaConfig tied_base;
    make_llama(&tied_base, true);
    HybridConfig htied;
    Registry rtied;
    CHECK(hybrid_config_init(&htied, &tied_base, MIXER_MAMBA1, attn, 1, &e) == 0);
    model_build_registry(&htied, &rtied);
    float *ptied = calloc((size_t)rtied.numel, sizeof(float));
    CHECK(hybrid_init_from_teacher(&htied, &rtied, ptied, &hyb, &hr, hp, 1, &e) == -1);
    CHECK(strstr(e.msg, "lm_head") != NULL);
    free(ptied);
    reg_free(&rtied);
    // Mamba-2 hybrids go through the Mamba-2 layer init; shared tensors are still copied, and it is seeded
    HybridConfig h2;
    Registry r2;
    CHECK(hybrid_config_init(&h2, &hc_base, MIXER_MAMBA2, attn, 1, &e) == 0);
    model_build_registry(&h2, &r2);
    float *p2 = malloc((size_t)r2.numel * sizeof(float)), *p2b = malloc((size_t)r2.numel * sizeof(float));
    CHECK(hybrid_init_from_teacher(&h2, &r2, p2, &teacher, &tr, tp, 9, &e) == 0);
    CHECK(hybrid_init_from_teacher(&h2, &r2, p2b, &teacher, &tr, tp, 9, &e) == 0);
    CHECK(memcmp(p2, p2b, (size_t)r2.numel * sizeof(float)) == 0);
    CHECK(memcmp(tens(&r2, p2, "model.layers.%d.mamba.out_proj.weight", 2),
                 tens(&tr, tp, "model.layers.%d.self_attn.o_proj.weight", 2), (size_t)m.d * m.di * sizeof(float)) == 0);
    CHECK(memcmp(tens(&r2, p2, "model.layers.%d.mlp.down_proj.weight", 2),
                 tens(&tr, tp, "model.layers.%d.mlp.down_proj.weight", 2), (size_t)m.d * 64 * sizeof(float)) == 0);
    free(p2), free(p2b);
    reg_free(&r2);
    printf("  init: %d shared tensors copied bitwise, Q/K/V/O -> C/B/x/out exact, distributions in range\n", n_shared);
    free(tp), free(hp), free(hp2), free(hp3), free(tpo);
    reg_free(&tr), reg_free(&hr), reg_free(&hr2), reg_free(&tro);
}

// The real teacher (SmolLM2-135M, GQA 9/3, tied): init a 50% hybrid (attention kept in odd layers), check
// the copies, and run layer 0's mixer on the initialized weights against the float64 formulas.
static void test_real_teacher(void) {
    const char *path = "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (!dl_file_exists(path)) {
        printf("  real teacher: %s missing (scripts/fetch-teacher), skipped\n", path);
        return;
    }
    LoadedModel t;
    DlError e;
    if (model_load(path, 0, &t, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        CHECK(0);
        return;
    }
    int attn[DL_MAX_LAYERS], n_attn = 0;
    for (int l = 1; l < t.hc.base.n_layer; l += 2) attn[n_attn++] = l;
    HybridConfig h;
    Registry r;
    CHECK(hybrid_config_init(&h, &t.hc.base, MIXER_MAMBA1, attn, n_attn, &e) == 0);
    CHECK(h.d_inner == 576 && h.d_xb == 192 && h.d_state == 16 && h.dt_rank == 36);
    model_build_registry(&h, &r);
    float *p = malloc((size_t)r.numel * sizeof(float));
    CHECK(hybrid_init_from_teacher(&h, &r, p, &t.hc, &t.reg, t.params, 7, &e) == 0);
    int copies_ok = 1;
    for (int l = 0; l < h.base.n_layer; l += 2) {
        const char *pairs[4][2] = {{"model.layers.%d.mamba.in_proj_x.weight", "model.layers.%d.self_attn.v_proj.weight"},
                                   {"model.layers.%d.mamba.B_proj.weight", "model.layers.%d.self_attn.k_proj.weight"},
                                   {"model.layers.%d.mamba.C_proj.weight", "model.layers.%d.self_attn.q_proj.weight"},
                                   {"model.layers.%d.mamba.out_proj.weight", "model.layers.%d.self_attn.o_proj.weight"}};
        for (int k = 0; k < 4; k++)
            copies_ok &= memcmp(tens(&r, p, pairs[k][0], l), tens(&t.reg, t.params, pairs[k][1], l),
                                (size_t)tnumel(&r, pairs[k][0], l) * sizeof(float)) == 0;
    }
    CHECK(copies_ok);
    int shared_ok = 1;
    for (int i = 0; i < r.n; i++) {
        if (r.t[i].role == ROLE_MAMBA) continue;
        int j = reg_find(&t.reg, r.t[i].name);
        shared_ok &= j >= 0 && memcmp(p + r.t[i].offset, t.params + t.reg.t[j].offset,
                                      (size_t)r.t[i].numel * sizeof(float)) == 0;
    }
    CHECK(shared_ok);

    // layer 0's mixer on the initialized weights vs float64, with a reset
    const int64_t B = 2, L = 24, T = B * L, d = h.base.d_model;
    Rng rg;
    rng_init(&rg, 31, 0);
    float *x = malloc((size_t)(T * d) * sizeof(float)), *dout = malloc((size_t)(T * d) * sizeof(float));
    float *out = malloc((size_t)(T * d) * sizeof(float)), *dx = malloc((size_t)(T * d) * sizeof(float));
    float *g = calloc((size_t)r.numel, sizeof(float));
    fill_rand(x, T * d, 1.0, &rg);
    fill_rand(dout, T * d, 1.0, &rg);
    uint8_t *reset = calloc((size_t)T, 1);
    reset[L + 10] = 1;
    poison(out, T * d), poison(dx, T * d);
    Mamba1Acts *a = mamba1_acts_new(&h, B, L);
    mamba1_forward(&h, &r, p, 0, B, L, x, reset, out, a);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, dx, g, a);
    Ref f = ref_new(&h, &r, p, B, L, reset);
    for (int64_t i = 0; i < T * d; i++) f.u[i] = x[i];
    ref_forward(&f);
    double *Gr[NP], *du = malloc((size_t)(T * d) * sizeof(double)), *G = malloc((size_t)(T * d) * sizeof(double));
    for (int64_t i = 0; i < T * d; i++) G[i] = dout[i];
    for (int k = 0; k < NP; k++) Gr[k] = calloc((size_t)mtensor(&r, 0, k)->numel, sizeof(double));
    ref_backward(&f, G, Gr, du);
    double worst = DL_MAX(rel_err_fd(out, f.out, T * d), rel_err_fd(dx, du, T * d));
    for (int k = 0; k < NP; k++) {
        const TensorInfo *ti = mtensor(&r, 0, k);
        worst = DL_MAX(worst, rel_err_fd(g + ti->offset, Gr[k], ti->numel));
    }
    CHECK_REL(worst, 1e-5, "SmolLM2-initialized layer 0: fp32 vs float64 (out, dx, grads)");
    printf("  real teacher: %d Mamba layers initialized from SmolLM2, copies exact; layer 0 vs float64 %.2e\n",
           h.base.n_layer - n_attn, worst);
    mamba1_acts_free(a);
    ref_free(&f);
    for (int k = 0; k < NP; k++) free(Gr[k]);
    free(du), free(G), free(x), free(dout), free(out), free(dx), free(g), free(reset), free(p);
    reg_free(&r);
    model_free(&t);
}

// ================================ --io mode (for tests/py/test_mamba_ref.py) ================================
// DIR/config.txt: "d_model n_head n_kv_head head_dim B L seed". Reads DIR/<suffix>.f32 for every Mamba tensor
// (raw float32, registry shape) unless DIR/q_proj.f32 exists, in which case the Mamba layer is initialized
// from that attention (q_proj, k_proj, v_proj, o_proj .f32) by hybrid_init_from_teacher and written to
// DIR/init.<suffix>.f32. Reads x.f32 [B,L,d], reset.u8 [B,L], dout.f32; writes out.f32, dx.f32,
// grad.<suffix>.f32 and step.f32 (the outputs of token-by-token decode).
static int read_raw(const char *dir, const char *name, void *dst, size_t bytes) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t got = fread(dst, 1, bytes, f);
    fclose(f);
    if (got != bytes) {
        fprintf(stderr, "%s: %zu bytes, expected %zu\n", path, got, bytes);
        return -2;
    }
    return 0;
}
static int write_raw(const char *dir, const char *name, const void *src, size_t bytes) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(src, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot write %s\n", path);
        if (f) fclose(f);
        return -1;
    }
    return fclose(f);
}

static int io_mode(const char *dir) {
    char path[1024];
    snprintf(path, sizeof path, "%s/config.txt", dir);
    FILE *cf = fopen(path, "r");
    int dm, nh, nkv, hd;
    long long Bq, Lq;
    unsigned long long seed;
    if (!cf || fscanf(cf, "%d %d %d %d %lld %lld %llu", &dm, &nh, &nkv, &hd, &Bq, &Lq, &seed) != 7) {
        fprintf(stderr, "%s: expected 'd_model n_head n_kv_head head_dim B L seed'\n", path);
        if (cf) fclose(cf);
        return 2;
    }
    fclose(cf);
    HybridConfig h;
    Registry r;
    make_hybrid(&h, &r, dm, nh, nkv, hd);
    const int64_t B = Bq, L = Lq, T = B * L, d = dm;
    float *p = calloc((size_t)r.numel, sizeof(float)), *g = calloc((size_t)r.numel, sizeof(float));
    float *qkvo[4] = {0};
    const char *anames[4] = {"q_proj.f32", "k_proj.f32", "v_proj.f32", "o_proj.f32"};
    const int64_t an[4] = {(int64_t)h.d_inner * d, (int64_t)h.d_xb * d, (int64_t)h.d_xb * d, d * (int64_t)h.d_inner};
    qkvo[0] = malloc((size_t)an[0] * sizeof(float));
    int from_attn = read_raw(dir, anames[0], qkvo[0], (size_t)an[0] * sizeof(float)) == 0;
    if (from_attn) {
        // a one-layer teacher and a one-layer hybrid of the same shape
        LlamaConfig c = h.base;
        c.n_layer = 1;
        HybridConfig th, hh;
        Registry trr, hrr;
        hybrid_config_teacher(&th, &c);
        DlError e;
        if (hybrid_config_init(&hh, &c, MIXER_MAMBA1, NULL, 0, &e)) return fprintf(stderr, "%s\n", e.msg), 2;
        model_build_registry(&th, &trr);
        model_build_registry(&hh, &hrr);
        float *tp = calloc((size_t)trr.numel, sizeof(float)), *hp = calloc((size_t)hrr.numel, sizeof(float));
        const char *tn[4] = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                             "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"};
        for (int k = 0; k < 4; k++) {
            if (k) qkvo[k] = malloc((size_t)an[k] * sizeof(float));
            if (k && read_raw(dir, anames[k], qkvo[k], (size_t)an[k] * sizeof(float))) return 2;
            memcpy(tp + trr.t[reg_find(&trr, tn[k])].offset, qkvo[k], (size_t)an[k] * sizeof(float));
        }
        if (hybrid_init_from_teacher(&hh, &hrr, hp, &th, &trr, tp, seed, &e)) return fprintf(stderr, "%s\n", e.msg), 2;
        for (int k = 0; k < NP; k++) {
            const TensorInfo *src = mtensor(&hrr, 0, k), *dst = mtensor(&r, 0, k);
            memcpy(p + dst->offset, hp + src->offset, (size_t)dst->numel * sizeof(float));
            snprintf(path, sizeof path, "init.%s.f32", SUFFIX[k]);
            if (write_raw(dir, path, hp + src->offset, (size_t)src->numel * sizeof(float))) return 2;
        }
        free(tp), free(hp);
        reg_free(&trr), reg_free(&hrr);
        for (int k = 1; k < 4; k++) free(qkvo[k]);
    } else {
        for (int k = 0; k < NP; k++) {
            const TensorInfo *t = mtensor(&r, 0, k);
            snprintf(path, sizeof path, "%s.f32", SUFFIX[k]);
            if (read_raw(dir, path, p + t->offset, (size_t)t->numel * sizeof(float))) {
                fprintf(stderr, "%s/%s missing or short\n", dir, path);
                return 2;
            }
        }
    }
    free(qkvo[0]);
    float *x = malloc((size_t)(T * d) * sizeof(float)), *dout = malloc((size_t)(T * d) * sizeof(float));
    float *out = malloc((size_t)(T * d) * sizeof(float)), *dx = malloc((size_t)(T * d) * sizeof(float));
    uint8_t *reset = calloc((size_t)T, 1);
    if (read_raw(dir, "x.f32", x, (size_t)(T * d) * sizeof(float)) || read_raw(dir, "dout.f32", dout, (size_t)(T * d) * sizeof(float)) ||
        read_raw(dir, "reset.u8", reset, (size_t)T))
        return fprintf(stderr, "%s: x.f32, dout.f32 and reset.u8 are needed\n", dir), 2;
    Mamba1Acts *acts = mamba1_acts_new(&h, B, L);
    mamba1_forward(&h, &r, p, 0, B, L, x, reset, out, acts);
    mamba1_backward(&h, &r, p, 0, B, L, reset, dout, dx, g, acts);
    if (write_raw(dir, "out.f32", out, (size_t)(T * d) * sizeof(float)) || write_raw(dir, "dx.f32", dx, (size_t)(T * d) * sizeof(float)))
        return 2;
    for (int k = 0; k < NP; k++) {
        const TensorInfo *t = mtensor(&r, 0, k);
        snprintf(path, sizeof path, "grad.%s.f32", SUFFIX[k]);
        if (write_raw(dir, path, g + t->offset, (size_t)t->numel * sizeof(float))) return 2;
    }
    // token-by-token decode (ignores resets: for the no-reset rows)
    Mamba1State st = mamba1_state_new(&h, B);
    float *xb = malloc((size_t)(B * d) * sizeof(float)), *ob = malloc((size_t)(B * d) * sizeof(float));
    for (int64_t t = 0; t < L; t++) {
        slice_time(x, B, L, d, t, t + 1, xb);
        mamba1_step(&h, &r, p, 0, B, xb, &st, ob);
        unslice_time(ob, B, L, d, t, t + 1, out);
    }
    if (write_raw(dir, "step.f32", out, (size_t)(T * d) * sizeof(float))) return 2;
    mamba1_state_free(&st);
    mamba1_acts_free(acts);
    free(p), free(g), free(x), free(dout), free(out), free(dx), free(reset), free(xb), free(ob);
    reg_free(&r);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--io") == 0) return io_mode(argv[2]);
    if (argc != 1) {
        fprintf(stderr, "usage: %s [--io DIR]\n", argv[0]);
        return 2;
    }
    printf("Mamba-1 mixer (fp32 CPU) vs float64 formulas:\n");
    test_vs_ref64(96, 6, 2, 16, 2, 33, 0, 1);                 // rep 3, dt_rank 6
    test_vs_ref64(96, 6, 2, 16, 2, 33, 1, 2);                 // with resets
    test_vs_ref64(64, 8, 2, 8, 3, 17, 1, 3);                  // head_dim < d_state: groups span heads
    test_vs_ref64(576, 9, 3, 64, 2, 48, 1, 4);                // SmolLM2-135M dims
    test_finite_differences();
    test_prefill_decode();
    test_multistep();
    test_packed_vs_documents();
    test_thread_independence();
    test_init();
    test_real_teacher();
    return check_report("test_mamba1_cpu");
}
