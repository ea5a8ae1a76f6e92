// test_ssd_cpu.c: the chunked SSD CPU twin against a float64 sequential recurrence (forward and
// reverse-mode backward written independently here), and that reference against float64 central finite
// differences. Fresh random inputs per case, outputs poisoned with NaN before every call, lengths that
// are not multiples of the chunk, L = 1, document resets (also on consecutive tokens and at t = 0),
// groups shared by several heads, and bitwise determinism across thread counts.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ssd/ssd.h"
#include "tests/check.h"

// ---------------------------------------------------------------- random numbers (splitmix64)
static uint64_t rng_state = 0x5eed5eedULL;
static double urand(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}
static double unif(double lo, double hi) { return lo + (hi - lo) * urand(); }

// ---------------------------------------------------------------- float64 sequential reference
typedef struct {
    SsdShape s;
    // inputs in double (the fp32 kernel gets the same values rounded to float)
    double *x, *dt, *A, *B, *C, *D, *bias, *h0;
    uint8_t *reset;
    int has_D, has_bias, has_h0;
} Problem;

static double sp(double v) { return v > 20.0 ? v : log1p(exp(v)); }
static double sp_grad(double v) { return v > 20.0 ? 1.0 : 1.0 / (1.0 + exp(-v)); }

static double delta_of(const Problem *pr, int64_t b, int64_t t, int64_t h) {
    const SsdShape *s = &pr->s;
    double v = pr->dt[(b * s->seqlen + t) * s->nheads + h] + (pr->has_bias ? pr->bias[h] : 0.0);
    return s->dt_softplus ? sp(v) : v;
}

// y [B,L,H,P], h_last [B,H,P,N], h_keep (state after keep[b] tokens of row b) or NULL
static void ref_fwd(const Problem *pr, double *y, double *h_last, const int32_t *keep, double *h_keep) {
    const SsdShape *s = &pr->s;
    const int64_t Bn = s->batch, L = s->seqlen, H = s->nheads, G = s->ngroups, P = s->headdim, N = s->dstate;
    double *S = calloc((size_t)(P * N), sizeof(double));
    for (int64_t b = 0; b < Bn; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / G);
            for (int64_t i = 0; i < P * N; i++) S[i] = pr->has_h0 ? pr->h0[(b * H + h) * P * N + i] : 0.0;
            if (h_keep && keep[b] == 0) memcpy(h_keep + (b * H + h) * P * N, S, (size_t)(P * N) * sizeof(double));
            for (int64_t t = 0; t < L; t++) {
                if (pr->reset && pr->reset[b * L + t]) memset(S, 0, (size_t)(P * N) * sizeof(double));
                const double dl = delta_of(pr, b, t, h), a = exp(dl * pr->A[h]);
                const double *xv = pr->x + ((b * L + t) * H + h) * P;
                const double *Bv = pr->B + ((b * L + t) * G + g) * N, *Cv = pr->C + ((b * L + t) * G + g) * N;
                for (int64_t p = 0; p < P; p++)
                    for (int64_t n = 0; n < N; n++) S[p * N + n] = a * S[p * N + n] + dl * xv[p] * Bv[n];
                for (int64_t p = 0; p < P; p++) {
                    double acc = (pr->has_D ? pr->D[h] : 0.0) * xv[p];
                    for (int64_t n = 0; n < N; n++) acc += S[p * N + n] * Cv[n];
                    y[((b * L + t) * H + h) * P + p] = acc;
                }
                if (h_keep && t == keep[b] - 1) memcpy(h_keep + (b * H + h) * P * N, S, (size_t)(P * N) * sizeof(double));
            }
            if (h_last) memcpy(h_last + (b * H + h) * P * N, S, (size_t)(P * N) * sizeof(double));
        }
    free(S);
}

typedef struct {
    double *x, *dt, *A, *B, *C, *D, *bias, *h0;
} Grads;

static Grads grads_new(const SsdShape *s) {
    const int64_t T = s->batch * s->seqlen;
    Grads g = {
        calloc((size_t)(T * s->nheads * s->headdim), 8), calloc((size_t)(T * s->nheads), 8),
        calloc((size_t)s->nheads, 8), calloc((size_t)(T * s->ngroups * s->dstate), 8),
        calloc((size_t)(T * s->ngroups * s->dstate), 8), calloc((size_t)s->nheads, 8), calloc((size_t)s->nheads, 8),
        calloc((size_t)(s->batch * s->nheads * s->headdim * s->dstate), 8),
    };
    return g;
}
static void grads_free(Grads *g) {
    free(g->x), free(g->dt), free(g->A), free(g->B), free(g->C), free(g->D), free(g->bias), free(g->h0);
}

// Reverse-mode of ref_fwd for loss = <dy, y> + <dh_last, h_last>. Accumulates into g (zeroed by caller).
static void ref_bwd(const Problem *pr, const double *dy, const double *dh_last, Grads *gr) {
    const SsdShape *s = &pr->s;
    const int64_t Bn = s->batch, L = s->seqlen, H = s->nheads, G = s->ngroups, P = s->headdim, N = s->dstate;
    const int64_t PN = P * N;
    double *Ss = malloc((size_t)((L + 1) * PN) * sizeof(double));  // Ss[t+1] = state after t; Ss[0] = h0
    double *dS = malloc((size_t)PN * sizeof(double));
    for (int64_t b = 0; b < Bn; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / G);
            for (int64_t i = 0; i < PN; i++) Ss[i] = pr->has_h0 ? pr->h0[(b * H + h) * PN + i] : 0.0;
            for (int64_t t = 0; t < L; t++) {
                const int reset = pr->reset && pr->reset[b * L + t];
                const double dl = delta_of(pr, b, t, h), a = exp(dl * pr->A[h]);
                const double *xv = pr->x + ((b * L + t) * H + h) * P, *Bv = pr->B + ((b * L + t) * G + g) * N;
                for (int64_t p = 0; p < P; p++)
                    for (int64_t n = 0; n < N; n++)
                        Ss[(t + 1) * PN + p * N + n] = (reset ? 0.0 : a * Ss[t * PN + p * N + n]) + dl * xv[p] * Bv[n];
            }
            for (int64_t i = 0; i < PN; i++) dS[i] = dh_last ? dh_last[(b * H + h) * PN + i] : 0.0;
            for (int64_t t = L - 1; t >= 0; t--) {
                const int reset = pr->reset && pr->reset[b * L + t];
                const double v = pr->dt[(b * L + t) * H + h] + (pr->has_bias ? pr->bias[h] : 0.0);
                const double dl = delta_of(pr, b, t, h), a = exp(dl * pr->A[h]);
                const double *xv = pr->x + ((b * L + t) * H + h) * P, *Bv = pr->B + ((b * L + t) * G + g) * N;
                const double *Cv = pr->C + ((b * L + t) * G + g) * N, *dyv = dy + ((b * L + t) * H + h) * P;
                const double *St = Ss + (t + 1) * PN, *Sp = Ss + t * PN;
                double *dxv = gr->x + ((b * L + t) * H + h) * P;
                double *dBv = gr->B + ((b * L + t) * G + g) * N, *dCv = gr->C + ((b * L + t) * G + g) * N;
                // y = S_t C + D x
                for (int64_t p = 0; p < P; p++) {
                    for (int64_t n = 0; n < N; n++) {
                        dS[p * N + n] += dyv[p] * Cv[n];
                        dCv[n] += dyv[p] * St[p * N + n];
                    }
                    if (pr->has_D) {
                        dxv[p] += pr->D[h] * dyv[p];
                        gr->D[h] += dyv[p] * xv[p];
                    }
                }
                // S_t = a S_{t-1} + dl x B^T
                double ddl = 0, da = 0;
                for (int64_t p = 0; p < P; p++)
                    for (int64_t n = 0; n < N; n++) {
                        const double d = dS[p * N + n];
                        ddl += d * xv[p] * Bv[n];
                        dxv[p] += d * dl * Bv[n];
                        dBv[n] += d * dl * xv[p];
                        if (!reset) da += d * Sp[p * N + n];
                    }
                // a = exp(dl A)
                ddl += da * a * pr->A[h];
                gr->A[h] += da * a * dl;
                const double dv = s->dt_softplus ? ddl * sp_grad(v) : ddl;
                gr->dt[(b * L + t) * H + h] += dv;
                if (pr->has_bias) gr->bias[h] += dv;
                for (int64_t i = 0; i < PN; i++) dS[i] = reset ? 0.0 : a * dS[i];
            }
            if (pr->has_h0)
                for (int64_t i = 0; i < PN; i++) gr->h0[(b * H + h) * PN + i] += dS[i];
        }
    free(Ss), free(dS);
}

// ---------------------------------------------------------------- problem setup
static Problem problem_new(SsdShape s, double reset_p, int has_D, int has_bias, int has_h0, double dt_lo,
                           double dt_hi) {
    Problem pr = {.s = s, .has_D = has_D, .has_bias = has_bias, .has_h0 = has_h0};
    const int64_t T = s.batch * s.seqlen, H = s.nheads, G = s.ngroups, P = s.headdim, N = s.dstate;
    pr.x = malloc((size_t)(T * H * P) * 8);
    pr.dt = malloc((size_t)(T * H) * 8);
    pr.A = malloc((size_t)H * 8);
    pr.B = malloc((size_t)(T * G * N) * 8);
    pr.C = malloc((size_t)(T * G * N) * 8);
    pr.D = malloc((size_t)H * 8);
    pr.bias = malloc((size_t)H * 8);
    pr.h0 = malloc((size_t)(s.batch * H * P * N) * 8);
    pr.reset = reset_p > 0 ? calloc((size_t)T, 1) : NULL;
    for (int64_t i = 0; i < T * H * P; i++) pr.x[i] = unif(-1, 1);
    for (int64_t i = 0; i < T * H; i++) pr.dt[i] = unif(dt_lo, dt_hi);
    for (int64_t h = 0; h < H; h++) {
        pr.A[h] = -exp(unif(log(0.5), log(16.0)));
        pr.D[h] = unif(0.5, 1.5);
        pr.bias[h] = unif(-4.0, -1.0);
    }
    for (int64_t i = 0; i < T * G * N; i++) pr.B[i] = unif(-1, 1), pr.C[i] = unif(-1, 1);
    for (int64_t i = 0; i < s.batch * H * P * N; i++) pr.h0[i] = unif(-1, 1);
    if (pr.reset)
        for (int64_t i = 0; i < T; i++) pr.reset[i] = urand() < reset_p;
    // round every input to float so the fp32 kernel and the reference see identical values
    double *arrs[] = {pr.x, pr.dt, pr.A, pr.B, pr.C, pr.D, pr.bias, pr.h0};
    int64_t lens[] = {T * H * P, T * H, H, T * G * N, T * G * N, H, H, s.batch * H * P * N};
    for (int k = 0; k < 8; k++)
        for (int64_t i = 0; i < lens[k]; i++) arrs[k][i] = (float)arrs[k][i];
    return pr;
}
static void problem_free(Problem *pr) {
    free(pr->x), free(pr->dt), free(pr->A), free(pr->B), free(pr->C), free(pr->D), free(pr->bias), free(pr->h0);
    free(pr->reset);
}

static float *to_f(const double *a, int64_t n) {
    float *f = malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) f[i] = (float)a[i];
    return f;
}
static float *poisoned(int64_t n) {
    float *f = malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) f[i] = NAN;
    return f;
}
// ||a - b|| / ||b||  (absolute norm if ||b|| == 0)
static double rel_err(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    if (!(num == num)) return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static double rel_err_dd(const double *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// ---------------------------------------------------------------- kernel vs reference
static void run_case(const char *name, SsdShape s, double reset_p, int has_D, int has_bias, int has_h0,
                     int force_reset0, double dt_lo, double dt_hi) {
    Problem pr = problem_new(s, reset_p, has_D, has_bias, has_h0, dt_lo, dt_hi);
    if (force_reset0 && pr.reset) {
        pr.reset[0] = 1;
        if (s.seqlen > 3) pr.reset[2] = pr.reset[3] = 1;  // consecutive resets
    }
    const int64_t T = s.batch * s.seqlen, H = s.nheads, G = s.ngroups, P = s.headdim, N = s.dstate;
    const int64_t nX = T * H * P, nS = s.batch * H * P * N, nB = T * G * N;
    // keep: 0, L, and values in between across rows
    int32_t *keep = malloc((size_t)s.batch * sizeof(int32_t));
    for (int64_t b = 0; b < s.batch; b++) keep[b] = (int32_t)(b == 0 ? (s.seqlen + 1) / 2 : b == 1 ? s.seqlen : b % 3 == 2 ? 0 : 1);
    // float copies
    float *x = to_f(pr.x, nX), *dt = to_f(pr.dt, T * H), *A = to_f(pr.A, H), *Bm = to_f(pr.B, nB);
    float *Cm = to_f(pr.C, nB), *D = to_f(pr.D, H), *bias = to_f(pr.bias, H), *h0 = to_f(pr.h0, nS);
    // reference forward
    double *yr = malloc((size_t)nX * 8), *hr = malloc((size_t)nS * 8), *har = malloc((size_t)nS * 8);
    ref_fwd(&pr, yr, hr, keep, har);
    float *y = poisoned(nX), *hl = poisoned(nS), *ha = poisoned(nS);
    ssd_fwd_cpu(&s, x, dt, A, Bm, Cm, has_D ? D : NULL, has_bias ? bias : NULL, pr.reset, has_h0 ? h0 : NULL, y, hl,
                keep, ha);
    double ey = rel_err(y, yr, nX), eh = rel_err(hl, hr, nS), ea = rel_err(ha, har, nS);
    char what[160];
    snprintf(what, sizeof what, "%s: y", name);
    CHECK_REL(ey, 1e-5, what);
    snprintf(what, sizeof what, "%s: h_last", name);
    CHECK_REL(eh, 1e-5, what);
    snprintf(what, sizeof what, "%s: h_keep", name);
    CHECK_REL(ea, 1e-5, what);
    if (has_h0) {  // h_keep and h_last aliasing h0 (state updated in place, as the decode path does)
        float *hk = to_f(pr.h0, nS), *hl2 = to_f(pr.h0, nS), *y2 = poisoned(nX);
        ssd_fwd_cpu(&s, x, dt, A, Bm, Cm, has_D ? D : NULL, has_bias ? bias : NULL, pr.reset, hk, y2, NULL, keep, hk);
        ssd_fwd_cpu(&s, x, dt, A, Bm, Cm, has_D ? D : NULL, has_bias ? bias : NULL, pr.reset, hl2, y2, hl2, NULL, NULL);
        CHECK(memcmp(hk, ha, (size_t)nS * 4) == 0 && memcmp(hl2, hl, (size_t)nS * 4) == 0 && memcmp(y2, y, (size_t)nX * 4) == 0);
        free(hk), free(hl2), free(y2);
    }

    // backward with random dy and dh_last
    double *dyd = malloc((size_t)nX * 8), *dhd = malloc((size_t)nS * 8);
    for (int64_t i = 0; i < nX; i++) dyd[i] = (float)unif(-1, 1);
    for (int64_t i = 0; i < nS; i++) dhd[i] = (float)unif(-1, 1);
    Grads gr = grads_new(&s);
    ref_bwd(&pr, dyd, dhd, &gr);
    float *dy = to_f(dyd, nX), *dh = to_f(dhd, nS);
    float *dx = poisoned(nX), *ddt = poisoned(T * H), *dA = poisoned(H), *dB = poisoned(nB), *dC = poisoned(nB);
    float *dD = poisoned(H), *dbias = poisoned(H), *dh0 = poisoned(nS);
    ssd_bwd_cpu(&s, x, dt, A, Bm, Cm, has_D ? D : NULL, has_bias ? bias : NULL, pr.reset, has_h0 ? h0 : NULL, dy, dh, dx,
                ddt, dA, dB, dC, dD, dbias, dh0);
    double e[8] = {rel_err(dx, gr.x, nX), rel_err(ddt, gr.dt, T * H), rel_err(dA, gr.A, H), rel_err(dB, gr.B, nB),
                   rel_err(dC, gr.C, nB), has_D ? rel_err(dD, gr.D, H) : 0, has_bias ? rel_err(dbias, gr.bias, H) : 0,
                   has_h0 ? rel_err(dh0, gr.h0, nS) : 0};
    const char *nm[8] = {"dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dh0"};
    double worst = 0;
    for (int k = 0; k < 8; k++) {
        snprintf(what, sizeof what, "%s: %s", name, nm[k]);
        CHECK_REL(e[k], 1e-5, what);
        if (!(e[k] <= worst)) worst = e[k];
    }
    printf("%-34s y %.1e h_last %.1e h_keep %.1e | worst grad %.1e (dx %.1e ddt %.1e dA %.1e dB %.1e dC %.1e)\n", name,
           ey, eh, ea, worst, e[0], e[1], e[2], e[3], e[4]);

    // determinism: bitwise equal with 1 thread and with the default thread count
    int nt = omp_get_max_threads();
    omp_set_num_threads(1);
    float *y1 = poisoned(nX), *dx1 = poisoned(nX), *ddt1 = poisoned(T * H), *dA1 = poisoned(H), *dB1 = poisoned(nB);
    float *dC1 = poisoned(nB), *dD1 = poisoned(H), *db1 = poisoned(H), *dh01 = poisoned(nS);
    ssd_fwd_cpu(&s, x, dt, A, Bm, Cm, has_D ? D : NULL, has_bias ? bias : NULL, pr.reset, has_h0 ? h0 : NULL, y1, NULL,
                NULL, NULL);
    ssd_bwd_cpu(&s, x, dt, A, Bm, Cm, has_D ? D : NULL, has_bias ? bias : NULL, pr.reset, has_h0 ? h0 : NULL, dy, dh,
                dx1, ddt1, dA1, dB1, dC1, dD1, db1, dh01);
    omp_set_num_threads(nt);
    CHECK(memcmp(y1, y, (size_t)nX * 4) == 0);
    CHECK(memcmp(dx1, dx, (size_t)nX * 4) == 0 && memcmp(ddt1, ddt, (size_t)(T * H) * 4) == 0 &&
          memcmp(dA1, dA, (size_t)H * 4) == 0 && memcmp(dB1, dB, (size_t)nB * 4) == 0 &&
          memcmp(dC1, dC, (size_t)nB * 4) == 0);

    free(y1), free(dx1), free(ddt1), free(dA1), free(dB1), free(dC1), free(dD1), free(db1), free(dh01);
    free(x), free(dt), free(A), free(Bm), free(Cm), free(D), free(bias), free(h0);
    free(keep), free(yr), free(hr), free(har), free(y), free(hl), free(ha);
    free(dyd), free(dhd), free(dy), free(dh), free(dx), free(ddt), free(dA), free(dB), free(dC), free(dD), free(dbias),
        free(dh0);
    grads_free(&gr);
    problem_free(&pr);
}

// ---------------------------------------------------------------- reference backward vs finite differences
static double loss_of(const Problem *pr, const double *wy, const double *wh) {
    const SsdShape *s = &pr->s;
    const int64_t nX = s->batch * s->seqlen * s->nheads * s->headdim;
    const int64_t nS = s->batch * s->nheads * s->headdim * s->dstate;
    double *y = malloc((size_t)nX * 8), *hl = malloc((size_t)nS * 8);
    ref_fwd(pr, y, hl, NULL, NULL);
    double l = 0;
    for (int64_t i = 0; i < nX; i++) l += wy[i] * y[i];
    for (int64_t i = 0; i < nS; i++) l += wh[i] * hl[i];
    free(y), free(hl);
    return l;
}

// FD of every input element; compares with ref_bwd (float64) and with the fp32 kernel backward.
static void fd_case(const char *name, SsdShape s, double reset_p) {
    Problem pr = problem_new(s, reset_p, 1, 1, 1, -1.0, 1.0);
    const int64_t T = s.batch * s.seqlen, H = s.nheads, G = s.ngroups, P = s.headdim, N = s.dstate;
    const int64_t nX = T * H * P, nS = s.batch * H * P * N, nB = T * G * N;
    double *wy = malloc((size_t)nX * 8), *wh = malloc((size_t)nS * 8);
    for (int64_t i = 0; i < nX; i++) wy[i] = (float)unif(-1, 1);
    for (int64_t i = 0; i < nS; i++) wh[i] = (float)unif(-1, 1);
    Grads gr = grads_new(&s);
    ref_bwd(&pr, wy, wh, &gr);
    // kernel grads
    float *x = to_f(pr.x, nX), *dt = to_f(pr.dt, T * H), *A = to_f(pr.A, H), *Bm = to_f(pr.B, nB);
    float *Cm = to_f(pr.C, nB), *D = to_f(pr.D, H), *bias = to_f(pr.bias, H), *h0 = to_f(pr.h0, nS);
    float *dy = to_f(wy, nX), *dh = to_f(wh, nS);
    float *kg[8] = {poisoned(nX), poisoned(T * H), poisoned(H), poisoned(nB), poisoned(nB), poisoned(H), poisoned(H),
                    poisoned(nS)};
    ssd_bwd_cpu(&s, x, dt, A, Bm, Cm, D, bias, pr.reset, h0, dy, dh, kg[0], kg[1], kg[2], kg[3], kg[4], kg[5], kg[6],
                kg[7]);
    double *in[8] = {pr.x, pr.dt, pr.A, pr.B, pr.C, pr.D, pr.bias, pr.h0};
    double *an[8] = {gr.x, gr.dt, gr.A, gr.B, gr.C, gr.D, gr.bias, gr.h0};
    int64_t len[8] = {nX, T * H, H, nB, nB, H, H, nS};
    const char *nm[8] = {"x", "dt", "A", "B", "C", "D", "dt_bias", "h0"};
    for (int k = 0; k < 8; k++) {
        double *fd = malloc((size_t)len[k] * 8);
        for (int64_t i = 0; i < len[k]; i++) {
            const double v = in[k][i], eps = 1e-6 * (fabs(v) > 1 ? fabs(v) : 1);
            in[k][i] = v + eps;
            double lp = loss_of(&pr, wy, wh);
            in[k][i] = v - eps;
            double lm = loss_of(&pr, wy, wh);
            in[k][i] = v;
            fd[i] = (lp - lm) / (2 * eps);
        }
        double er = rel_err_dd(an[k], fd, len[k]), ek = rel_err(kg[k], fd, len[k]);
        char what[128];
        snprintf(what, sizeof what, "%s: FD vs float64 backward, d%s", name, nm[k]);
        CHECK_REL(er, 1e-6, what);
        snprintf(what, sizeof what, "%s: FD vs fp32 kernel, d%s", name, nm[k]);
        CHECK_REL(ek, 1e-5, what);
        printf("%-34s d%-8s ref-vs-FD %.1e  kernel-vs-FD %.1e\n", name, nm[k], er, ek);
        free(fd);
    }
    for (int k = 0; k < 8; k++) free(kg[k]);
    free(x), free(dt), free(A), free(Bm), free(Cm), free(D), free(bias), free(h0), free(dy), free(dh), free(wy), free(wh);
    grads_free(&gr);
    problem_free(&pr);
}

int main(void) {
    // {batch, seqlen, H, P, G, N, Q, softplus}
    run_case("L=37 Q=8 G=2 resets h0", (SsdShape){2, 37, 4, 8, 2, 6, 8, 1}, 0.1, 1, 1, 1, 1, -1, 1);
    run_case("L=1 Q=8", (SsdShape){4, 1, 4, 5, 4, 3, 8, 1}, 0, 1, 1, 1, 0, -1, 1);
    run_case("L=1 reset at 0", (SsdShape){2, 1, 2, 4, 1, 4, 4, 1}, 1.0, 1, 1, 1, 1, -1, 1);
    run_case("L=64 Q=16 G=H no D/bias/h0", (SsdShape){2, 64, 3, 8, 3, 8, 16, 1}, 0, 0, 0, 0, 0, -1, 1);
    run_case("L=50 Q=1", (SsdShape){1, 50, 2, 4, 1, 5, 1, 1}, 0.05, 1, 1, 1, 1, -1, 1);
    run_case("L=20 Q=64 (> L)", (SsdShape){2, 20, 2, 4, 2, 4, 64, 1}, 0.15, 1, 1, 1, 1, -1, 1);
    run_case("L=45 Q=8 no softplus, no bias", (SsdShape){1, 45, 2, 6, 1, 6, 8, 0}, 0.1, 1, 0, 1, 1, 0.01, 0.3);
    run_case("L=41 Q=8 dt above threshold 20", (SsdShape){1, 41, 2, 4, 2, 4, 8, 1}, 0.1, 1, 1, 1, 1, -3, 24);
    run_case("L=300 Q=64 P=N=32 G=1", (SsdShape){2, 300, 4, 32, 1, 32, 64, 1}, 0.01, 1, 1, 1, 0, -1, 1);
    run_case("L=130 Q=32 P=16 N=24 G=2", (SsdShape){1, 130, 6, 16, 2, 24, 32, 1}, 0.02, 1, 1, 1, 1, -1, 1);
    fd_case("FD L=11 Q=4 G=1 resets", (SsdShape){2, 11, 2, 3, 1, 3, 4, 1}, 0.2);
    fd_case("FD L=9 Q=3 G=2", (SsdShape){1, 9, 2, 2, 2, 3, 3, 1}, 0.0);
    return check_report("test_ssd_cpu");
}
