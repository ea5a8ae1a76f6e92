// scan_ref64_cpu.c: float64 references of the selective scan and the conv1d (tests only). Deliberately the
// plainest form: one (b, d) recurrence at a time, the whole state history kept, no chunking, so that it
// shares no structure (and no bug) with the fp32 twins or the CUDA kernels it checks.
#include "kernels/scan/selective_scan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double softplus_d(double x) { return x <= 20.0 ? log1p(exp(x)) : x; }
static double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

// index helpers
#define IX(b, t, d) (((b) * L + (t)) * D + (d))
#define IB(b, t, n) ((((b) * L + (t)) * Gb + gb) * N + (n))
#define IC(b, t, n) ((((b) * L + (t)) * Gc + gc) * N + (n))

void selective_scan_fwd_ref64(const ScanShape *s, const double *u, const double *dt, const double *A,
                              const double *Bm, const double *Cm, const double *Dskip, const double *z,
                              const double *delta_bias, const uint8_t *reset, const double *h0, double *out,
                              double *h_last) {
    const int64_t Bsz = s->batch, L = s->seqlen, D = s->dim, N = s->dstate, Gc = s->groups_c, Gb = s->groups_b;
    double *h = malloc((size_t)N * sizeof(double));
    for (int64_t b = 0; b < Bsz; b++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t gc = d / (D / Gc), gb = d / (D / Gb);
            for (int64_t n = 0; n < N; n++) h[n] = h0 ? h0[(b * D + d) * N + n] : 0.0;
            for (int64_t t = 0; t < L; t++) {
                const double delta = softplus_d(dt[IX(b, t, d)] + (delta_bias ? delta_bias[d] : 0.0));
                double y = Dskip[d] * u[IX(b, t, d)];
                for (int64_t n = 0; n < N; n++) {
                    const double hp = (reset && reset[b * L + t]) ? 0.0 : h[n];
                    h[n] = exp(delta * A[d * N + n]) * hp + delta * Bm[IB(b, t, n)] * u[IX(b, t, d)];
                    y += Cm[IC(b, t, n)] * h[n];
                }
                if (z) y *= z[IX(b, t, d)] * sigmoid_d(z[IX(b, t, d)]);
                out[IX(b, t, d)] = y;
            }
            if (h_last)
                for (int64_t n = 0; n < N; n++) h_last[(b * D + d) * N + n] = h[n];
        }
    free(h);
}

void selective_scan_bwd_ref64(const ScanShape *s, const double *u, const double *dt, const double *A,
                              const double *Bm, const double *Cm, const double *Dskip, const double *z,
                              const double *delta_bias, const uint8_t *reset, const double *h0, const double *dout,
                              const double *dh_last, double *du, double *ddt, double *dA, double *dB, double *dC,
                              double *dD, double *dz, double *ddelta_bias, double *dh0) {
    const int64_t Bsz = s->batch, L = s->seqlen, D = s->dim, N = s->dstate, Gc = s->groups_c, Gb = s->groups_b;
    double *H = malloc((size_t)((L + 1) * N) * sizeof(double));  // H[t+1] = state after step t, H[0] = h0
    double *dh = malloc((size_t)N * sizeof(double));
    memset(dA, 0, (size_t)(D * N) * sizeof(double));
    memset(dD, 0, (size_t)D * sizeof(double));
    memset(dB, 0, (size_t)(Bsz * L * Gb * N) * sizeof(double));
    memset(dC, 0, (size_t)(Bsz * L * Gc * N) * sizeof(double));
    if (ddelta_bias) memset(ddelta_bias, 0, (size_t)D * sizeof(double));
    for (int64_t b = 0; b < Bsz; b++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t gc = d / (D / Gc), gb = d / (D / Gb);
            for (int64_t n = 0; n < N; n++) H[n] = h0 ? h0[(b * D + d) * N + n] : 0.0;
            for (int64_t t = 0; t < L; t++) {
                const double delta = softplus_d(dt[IX(b, t, d)] + (delta_bias ? delta_bias[d] : 0.0));
                for (int64_t n = 0; n < N; n++) {
                    const double hp = (reset && reset[b * L + t]) ? 0.0 : H[t * N + n];
                    H[(t + 1) * N + n] = exp(delta * A[d * N + n]) * hp + delta * Bm[IB(b, t, n)] * u[IX(b, t, d)];
                }
            }
            for (int64_t n = 0; n < N; n++) dh[n] = dh_last ? dh_last[(b * D + d) * N + n] : 0.0;
            for (int64_t t = L - 1; t >= 0; t--) {
                const int64_t i = IX(b, t, d);
                const double raw = dt[i] + (delta_bias ? delta_bias[d] : 0.0), delta = softplus_d(raw);
                const double *ht = H + (t + 1) * N;
                const int rs = reset && reset[b * L + t];
                double gy = dout[i];
                if (z) {
                    double y = Dskip[d] * u[i];
                    for (int64_t n = 0; n < N; n++) y += Cm[IC(b, t, n)] * ht[n];
                    const double sg = sigmoid_d(z[i]);
                    dz[i] = gy * y * sg * (1.0 + z[i] * (1.0 - sg));
                    gy *= z[i] * sg;
                }
                dD[d] += gy * u[i];
                double dui = gy * Dskip[d], ddelta = 0.0;
                for (int64_t n = 0; n < N; n++) {
                    const double g = dh[n] + gy * Cm[IC(b, t, n)];
                    dC[IC(b, t, n)] += gy * ht[n];
                    const double a = exp(delta * A[d * N + n]), hp = rs ? 0.0 : H[t * N + n];
                    ddelta += g * (hp * a * A[d * N + n] + Bm[IB(b, t, n)] * u[i]);
                    dA[d * N + n] += g * hp * a * delta;
                    dB[IB(b, t, n)] += g * delta * u[i];
                    dui += g * delta * Bm[IB(b, t, n)];
                    dh[n] = rs ? 0.0 : g * a;
                }
                du[i] = dui;
                ddt[i] = ddelta * (raw <= 20.0 ? sigmoid_d(raw) : 1.0);
                if (ddelta_bias) ddelta_bias[d] += ddt[i];
            }
            if (h0 && dh0)
                for (int64_t n = 0; n < N; n++) dh0[(b * D + d) * N + n] = dh[n];
        }
    free(H);
    free(dh);
}

// conv: a tap reads x[tt] only when no reset lies in (tt, t] and tt >= 0, or tt < 0 with x_prev and no reset
// in [0, t]
static int tap_ok(const uint8_t *reset, int64_t b, int64_t L, int64_t t, int64_t tt, int has_prev) {
    if (tt < 0 && !has_prev) return 0;
    for (int64_t r = (tt < 0 ? 0 : tt + 1); r <= t; r++)
        if (reset && reset[b * L + r]) return 0;
    return 1;
}
static double xval(const double *x, const double *x_prev, int64_t b, int64_t L, int64_t C, int W, int64_t tt,
                   int64_t c) {
    return tt >= 0 ? x[(b * L + tt) * C + c] : x_prev[(b * (W - 1) + (W - 1) + tt) * C + c];
}

void conv1d_silu_fwd_ref64(int64_t B, int64_t L, int64_t C, int W, const double *x, const double *w,
                           const double *bias, const uint8_t *reset, const double *x_prev, int silu, double *out) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < L; t++)
            for (int64_t c = 0; c < C; c++) {
                double acc = bias ? bias[c] : 0.0;
                for (int k = 0; k < W; k++) {
                    const int64_t tt = t - (W - 1) + k;
                    if (tap_ok(reset, b, L, t, tt, x_prev != NULL))
                        acc += w[c * W + k] * xval(x, x_prev, b, L, C, W, tt, c);
                }
                out[(b * L + t) * C + c] = silu ? acc * sigmoid_d(acc) : acc;
            }
}

void conv1d_silu_bwd_ref64(int64_t B, int64_t L, int64_t C, int W, const double *x, const double *w,
                           const double *bias, const uint8_t *reset, const double *x_prev, int silu,
                           const double *dout, double *dx, double *dw, double *dbias) {
    memset(dx, 0, (size_t)(B * L * C) * sizeof(double));
    memset(dw, 0, (size_t)(C * W) * sizeof(double));
    if (dbias) memset(dbias, 0, (size_t)C * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < L; t++)
            for (int64_t c = 0; c < C; c++) {
                double acc = bias ? bias[c] : 0.0;
                for (int k = 0; k < W; k++) {
                    const int64_t tt = t - (W - 1) + k;
                    if (tap_ok(reset, b, L, t, tt, x_prev != NULL))
                        acc += w[c * W + k] * xval(x, x_prev, b, L, C, W, tt, c);
                }
                double g = dout[(b * L + t) * C + c];
                if (silu) {
                    const double sg = sigmoid_d(acc);
                    g *= sg * (1.0 + acc * (1.0 - sg));
                }
                if (dbias) dbias[c] += g;
                for (int k = 0; k < W; k++) {
                    const int64_t tt = t - (W - 1) + k;
                    if (!tap_ok(reset, b, L, t, tt, x_prev != NULL)) continue;
                    dw[c * W + k] += g * xval(x, x_prev, b, L, C, W, tt, c);
                    if (tt >= 0) dx[(b * L + tt) * C + c] += g * w[c * W + k];
                }
            }
}
