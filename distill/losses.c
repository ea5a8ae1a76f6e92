// losses.c: see losses.h.
#include "distill/losses.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "distill/common.h"
#include "distill/layers_cpu.h"

// log-sum-exp of x[0..V) * a, in double
// (the exponentials in fp32, vectorized, summed in blocks of fp32 then double: dl_exp_affine)
static double lse_scaled(const float *x, int64_t V, double a) {
    const float af = (float)a;
    float mx = -INFINITY;
    for (int64_t i = 0; i < V; i++) mx = x[i] * af > mx ? x[i] * af : mx;  // (fmaxf is a libm call)
    return mx + log(dl_exp_affine(NULL, x, V, af, mx, 1.0f));
}

void loss_rows(const LossWeights *w, int64_t n, int64_t V, const float *logits, const float *teacher,
               const int32_t *targets, const uint8_t *mask, const float *row_weight, double scale, float *dlogits,
               LossSums *acc, float *logp_target) {
    const double T = w->temperature > 0 ? w->temperature : 1.0, invT = 1.0 / T;
    const bool need_ce = w->ce != 0 || logp_target, need_kl = w->kl != 0, need_rkl = w->rkl != 0;
    double *row = dl_calloc((size_t)(4 * n), sizeof(double));  // per row: ce, kl, rkl, counted
#pragma omp parallel for schedule(static) if (n * V >= (1 << 15))
    for (int64_t r = 0; r < n; r++) {
        const float *s = logits + r * V;
        float *ds = dlogits ? dlogits + r * V : NULL;
        int32_t tgt = targets ? targets[r] : -1;
        bool counted = !mask || mask[r];
        bool has_tgt = tgt >= 0 && tgt < V;
        if (logp_target) logp_target[r] = 0;
        if (!counted) {
            if (ds) memset(ds, 0, (size_t)V * sizeof(float));
            continue;
        }
        double rw = row_weight ? row_weight[r] : 1.0, g = scale * rw;
        double lse1 = 0, lseq = 0, lsep = 0, klr = 0, rklr = 0;
        if (need_ce) lse1 = lse_scaled(s, V, 1.0);
        if (need_kl || need_rkl) {
            const float *t = teacher + r * V;
            lseq = T == 1.0 ? (need_ce ? lse1 : lse_scaled(s, V, 1.0)) : lse_scaled(s, V, invT);
            lsep = lse_scaled(t, V, invT);
            for (int64_t i = 0; i < V; i++) {
                double lq = s[i] * invT - lseq, lp = t[i] * invT - lsep;
                if (need_kl) klr += exp(lp) * (lp - lq);
                if (need_rkl) rklr += exp(lq) * (lq - lp);
            }
        }
        double ce = 0;
        if (need_ce && has_tgt) ce = lse1 - s[tgt];
        if (logp_target && has_tgt) logp_target[r] = (float)(-ce);
        row[4 * r + 0] = w->ce != 0 && has_tgt ? rw * ce : 0;
        row[4 * r + 1] = rw * T * T * klr;
        row[4 * r + 2] = rw * T * T * rklr;
        row[4 * r + 3] = 1;
        if (!ds) continue;
        const float *t = teacher ? teacher + r * V : NULL;
        const double wce = w->ce != 0 && has_tgt ? w->ce : 0;
        if (!need_kl && !need_rkl) {  // CE only (SFT, scoring with gradients): one vectorized pass
            if (wce != 0) {
                dl_exp_affine(ds, s, V, 1.0f, (float)lse1, (float)(g * wce));
                ds[tgt] -= (float)(g * wce);
            } else {
                memset(ds, 0, (size_t)V * sizeof(float));
            }
            continue;
        }
        for (int64_t i = 0; i < V; i++) {
            double si = s[i], d = 0;
            if (wce != 0) d += wce * dl_expf((float)(si - lse1));
            if (need_kl || need_rkl) {
                double lq = si * invT - lseq, lp = t[i] * invT - lsep, q = exp(lq);
                if (need_kl) d += w->kl * T * (q - exp(lp));
                if (need_rkl) d += w->rkl * T * q * (lq - lp - rklr);
            }
            ds[i] = (float)(g * d);
        }
        if (wce != 0) ds[tgt] -= (float)(g * wce);
    }
    for (int64_t r = 0; r < n; r++) {
        acc->ce += row[4 * r + 0];
        acc->kl += row[4 * r + 1];
        acc->rkl += row[4 * r + 2];
        acc->n_rows += row[4 * r + 3];
    }
    free(row);
}

void loss_rows_topk(const LossWeights *w, int64_t n, int64_t V, const float *logits, int k, const int32_t *top_ids,
                    const float *top_logp, const int32_t *targets, const uint8_t *mask, const float *row_weight,
                    double scale, float *dlogits, LossSums *acc, float *logp_target) {
    if (w->rkl != 0) dl_die(DL_EXIT_RUNTIME, "loss: reverse KL needs full teacher logits, not top-%d", k);
    const double T = w->temperature > 0 ? w->temperature : 1.0, invT = 1.0 / T;
    double *row = dl_calloc((size_t)(3 * n), sizeof(double));  // per row: ce, kl, counted
#pragma omp parallel for schedule(static) if (n * V >= (1 << 15))
    for (int64_t r = 0; r < n; r++) {
        const float *s = logits + r * V, *tl = top_logp + r * k;
        const int32_t *ti = top_ids + r * k;
        float *ds = dlogits ? dlogits + r * V : NULL;
        int32_t tgt = targets ? targets[r] : -1;
        bool has_tgt = tgt >= 0 && tgt < V;
        if (logp_target) logp_target[r] = 0;
        if (mask && !mask[r]) {
            if (ds) memset(ds, 0, (size_t)V * sizeof(float));
            continue;
        }
        // everything is read from s before ds (which may alias it) is written
        const double rw = row_weight ? row_weight[r] : 1.0, g = scale * rw;
        const double wce = w->ce != 0 && has_tgt ? w->ce : 0;
        const double lse1 = lse_scaled(s, V, 1.0), lseq = T == 1.0 ? lse1 : lse_scaled(s, V, invT);
        double mp = -INFINITY, zp = 0, kl = 0;
        for (int i = 0; i < k; i++)
            if (ti[i] >= 0 && ti[i] < V) mp = fmax(mp, tl[i] * invT);
        for (int i = 0; i < k; i++)
            if (ti[i] >= 0 && ti[i] < V) zp += exp(tl[i] * invT - mp);
        const double lsep = mp + log(zp);
        const double wkl = zp > 0 ? w->kl : 0;  // a row without any valid id has no KL term
        for (int i = 0; i < k && wkl != 0; i++) {
            if (ti[i] < 0 || ti[i] >= V) continue;  // padding of rows with fewer than k ids
            double lp = tl[i] * invT - lsep, lq = s[ti[i]] * invT - lseq;
            kl += exp(lp) * (lp - lq);
        }
        double ce = has_tgt ? lse1 - s[tgt] : 0;
        if (logp_target && has_tgt) logp_target[r] = (float)(-ce);
        row[3 * r + 0] = wce != 0 ? rw * ce : 0;
        row[3 * r + 1] = wkl != 0 ? rw * T * T * kl : 0;
        row[3 * r + 2] = 1;
        if (!ds) continue;
        for (int64_t i = 0; i < V; i++) {
            double si = s[i], d = 0;
            if (wce != 0) d += wce * dl_expf((float)(si - lse1));
            if (wkl != 0) d += wkl * T * exp(si * invT - lseq);
            ds[i] = (float)(g * d);
        }
        if (wce != 0) ds[tgt] -= (float)(g * wce);
        if (wkl != 0)
            for (int i = 0; i < k; i++)
                if (ti[i] >= 0 && ti[i] < V) ds[ti[i]] -= (float)(g * wkl * T * exp(tl[i] * invT - lsep));
    }
    for (int64_t r = 0; r < n; r++) {
        acc->ce += row[3 * r + 0];
        acc->kl += row[3 * r + 1];
        acc->n_rows += row[3 * r + 2];
    }
    free(row);
}

double loss_total(const LossWeights *w, const LossSums *s, double norm) {
    double tot = (double)w->ce * s->ce + (double)w->kl * s->kl + (double)w->rkl * s->rkl;
    return norm > 0 ? tot / norm : tot;
}

double mse_rows(int64_t n, int64_t d, const float *a, const float *b, const uint8_t *mask, double scale, float *da) {
    double *row = dl_calloc((size_t)n, sizeof(double));
#pragma omp parallel for schedule(static) if (n * d >= (1 << 15))
    for (int64_t r = 0; r < n; r++) {
        if (mask && !mask[r]) continue;
        const float *x = a + r * d, *y = b + r * d;
        double s = 0;
        for (int64_t i = 0; i < d; i++) {
            double e = (double)x[i] - y[i];
            s += e * e;
            if (da) da[r * d + i] += (float)(2.0 * scale * e);
        }
        row[r] = s;
    }
    double tot = 0;
    for (int64_t r = 0; r < n; r++) tot += row[r];
    free(row);
    return scale * tot;
}

// log sigmoid(x), stable for large |x|
static double log_sigmoid(double x) { return x >= 0 ? -log1p(exp(-x)) : x - log1p(exp(x)); }

double dpo_loss(int64_t n, double beta, const double *pc, const double *pr, const double *rc, const double *rr,
                double *d_chosen, double *d_rejected, double *accuracy) {
    double tot = 0, acc = 0;
    for (int64_t i = 0; i < n; i++) {
        double margin = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]));
        tot += -log_sigmoid(margin);
        acc += margin > 0;
        // d(-log sigmoid(m))/dm = -sigmoid(-m)
        double g = -1.0 / (1.0 + exp(margin)) * beta / (double)n;
        if (d_chosen) d_chosen[i] = g;
        if (d_rejected) d_rejected[i] = -g;
    }
    if (accuracy) *accuracy = n ? acc / (double)n : 0;
    return n ? tot / (double)n : 0;
}
