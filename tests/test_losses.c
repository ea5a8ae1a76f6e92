// test_losses.c: the logit losses (CE, forward/reverse KL with temperature, masks, row weights), the hidden
// MSE and DPO against float64 formulas written here; gradients against central finite differences of the
// float64 loss; chunked evaluation (rows in blocks) equals one block; masked rows add nothing.
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "distill/losses.h"
#include "distill/rng.h"
#include "tests/check.h"

static Rng rng;
enum { N = 7, V = 13 };
static double S[N * V], Tt[N * V];
static int32_t tgt[N];
static uint8_t msk[N];
static float rwt[N];
static LossWeights W;

// float64 reference: the weighted loss summed over counted rows, times scale
static double ref_loss(const double *s, double *ce_o, double *kl_o, double *rkl_o) {
    const double T = W.temperature > 0 ? W.temperature : 1;
    double ce = 0, kl = 0, rkl = 0;
    for (int r = 0; r < N; r++) {
        if (!msk[r]) continue;
        const double *x = s + r * V, *t = Tt + r * V;
        double m1 = -INFINITY, mq = -INFINITY, mp = -INFINITY;
        for (int i = 0; i < V; i++) m1 = fmax(m1, x[i]), mq = fmax(mq, x[i] / T), mp = fmax(mp, t[i] / T);
        double z1 = 0, zq = 0, zp = 0;
        for (int i = 0; i < V; i++) z1 += exp(x[i] - m1), zq += exp(x[i] / T - mq), zp += exp(t[i] / T - mp);
        double l1 = m1 + log(z1), lq = mq + log(zq), lp = mp + log(zp);
        if (tgt[r] >= 0) ce += rwt[r] * (l1 - x[tgt[r]]);
        for (int i = 0; i < V; i++) {
            double a = x[i] / T - lq, b = t[i] / T - lp;
            kl += rwt[r] * T * T * exp(b) * (b - a);
            rkl += rwt[r] * T * T * exp(a) * (a - b);
        }
    }
    if (ce_o) *ce_o = ce, *kl_o = kl, *rkl_o = rkl;
    return W.ce * ce + W.kl * kl + W.rkl * rkl;
}

static double rel(const float *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), den += b[i] * b[i];
    return sqrt(num / (den > 0 ? den : 1));
}

static void check_config(float ce, float kl, float rkl, float temp, const char *what) {
    W = (LossWeights){ce, kl, rkl, temp};
    float s[N * V], t[N * V], ds[N * V];
    for (int i = 0; i < N * V; i++) s[i] = (float)S[i], t[i] = (float)Tt[i];
    LossSums acc = {0};
    const double scale = 0.37;
    for (int i = 0; i < N * V; i++) ds[i] = NAN;
    loss_rows(&W, N, V, s, t, tgt, msk, rwt, scale, ds, &acc, NULL);
    double ce_r, kl_r, rkl_r, tot = ref_loss(S, &ce_r, &kl_r, &rkl_r);
    char buf[128];
    snprintf(buf, sizeof buf, "%s: loss", what);
    CHECK_REL(fabs(loss_total(&W, &acc, 0) - tot) / fabs(tot), 1e-5, buf);
    // each sum is computed only for a term with a weight (the others stay 0)
    CHECK_REL(fabs(acc.ce - (ce ? ce_r : 0)) / fabs(ce_r), 1e-5, "ce sum");
    CHECK_REL(fabs(acc.kl - (kl ? kl_r : 0)) / fabs(kl_r), 1e-5, "kl sum");
    CHECK_REL(fabs(acc.rkl - (rkl ? rkl_r : 0)) / fabs(rkl_r), 1e-5, "rkl sum");
    int cnt = 0;
    for (int r = 0; r < N; r++) cnt += msk[r];
    CHECK(acc.n_rows == cnt);
    // FD gradient of scale * loss w.r.t. the student logits
    double g[N * V];
    for (int i = 0; i < N * V; i++) {
        double x0 = S[i], h = 1e-5;
        S[i] = x0 + h;
        double lp = ref_loss(S, NULL, NULL, NULL);
        S[i] = x0 - h;
        double lm = ref_loss(S, NULL, NULL, NULL);
        S[i] = x0;
        g[i] = scale * (lp - lm) / (2 * h);
    }
    snprintf(buf, sizeof buf, "%s: dlogits vs FD", what);
    CHECK_REL(rel(ds, g, N * V), 1e-5, buf);
    // masked rows: zero gradient
    bool zero = true;
    for (int r = 0; r < N; r++)
        if (!msk[r])
            for (int i = 0; i < V; i++) zero &= ds[r * V + i] == 0;
    CHECK(zero);
    // chunked (rows in blocks of 3, 3, 1, in place) equals one block
    float s2[N * V];
    memcpy(s2, s, sizeof s);
    LossSums acc2 = {0};
    for (int r0 = 0; r0 < N; r0 += 3) {
        int n = r0 + 3 <= N ? 3 : N - r0;
        loss_rows(&W, n, V, s2 + r0 * V, t + r0 * V, tgt + r0, msk + r0, rwt + r0, scale, s2 + r0 * V, &acc2, NULL);
    }
    snprintf(buf, sizeof buf, "%s: chunked == whole", what);
    double dd = 0;
    for (int i = 0; i < N * V; i++) dd = fmax(dd, fabs(s2[i] - ds[i]));
    CHECK_REL(dd + fabs(loss_total(&W, &acc2, 0) - loss_total(&W, &acc, 0)), 1e-6, buf);
}

static void test_logit_losses(void) {
    for (int i = 0; i < N * V; i++) S[i] = 2 * rng_normal(&rng), Tt[i] = 2 * rng_normal(&rng);
    for (int r = 0; r < N; r++) {
        tgt[r] = (int32_t)rng_below(&rng, V);
        msk[r] = r != 2 && r != 5;
        rwt[r] = r == 4 ? -0.5f : 1.0f + 0.1f * r;
    }
    tgt[6] = -1;  // a counted row without a target: no CE, still in KL
    check_config(1, 0, 0, 1, "ce");
    check_config(0, 1, 0, 1, "kl T=1");
    check_config(0, 1, 0, 2.5f, "kl T=2.5");
    check_config(0, 0, 1, 1, "rkl T=1");
    check_config(0, 0, 1, 0.7f, "rkl T=0.7");
    check_config(1, 0.1f, 0.3f, 2, "ce+kl+rkl T=2");
    // log p(target) output
    float s[N * V], lp[N];
    for (int i = 0; i < N * V; i++) s[i] = (float)S[i];
    W = (LossWeights){0, 0, 0, 1};
    LossSums acc = {0};
    loss_rows(&W, N, V, s, NULL, tgt, msk, NULL, 1, NULL, &acc, lp);
    double e = 0;
    for (int r = 0; r < N; r++) {
        double ref = 0;
        if (msk[r] && tgt[r] >= 0) {
            double m = -INFINITY, z = 0;
            for (int i = 0; i < V; i++) m = fmax(m, S[r * V + i]);
            for (int i = 0; i < V; i++) z += exp(S[r * V + i] - m);
            ref = S[r * V + tgt[r]] - m - log(z);
        }
        e = fmax(e, fabs(lp[r] - ref));
    }
    CHECK_REL(e, 1e-5, "log p(target)");
    // KL of identical distributions is 0
    W = (LossWeights){0, 1, 1, 1.3f};
    LossSums z = {0};
    loss_rows(&W, N, V, s, s, tgt, NULL, NULL, 1, NULL, &z, NULL);
    CHECK(fabs(z.kl) < 1e-6 && fabs(z.rkl) < 1e-6);
}

// sparse teacher: k = V equals the dense forward KL; k = 4 against FD of a float64 formula; in place == apart
enum { K = 4 };
static int32_t topi[N * K];
static double topl[N * K];
static double ref_topk(const double *s) {
    const double T = W.temperature;
    double tot = 0;
    for (int r = 0; r < N; r++) {
        if (!msk[r]) continue;
        const double *x = s + r * V;
        double m = -INFINITY, z = 0, mp = -INFINITY, zp = 0, m1 = -INFINITY, z1 = 0;
        for (int i = 0; i < V; i++) m = fmax(m, x[i] / T), m1 = fmax(m1, x[i]);
        for (int i = 0; i < V; i++) z += exp(x[i] / T - m), z1 += exp(x[i] - m1);
        for (int i = 0; i < K; i++) mp = fmax(mp, topl[r * K + i] / T);
        for (int i = 0; i < K; i++) zp += exp(topl[r * K + i] / T - mp);
        double kl = 0;
        for (int i = 0; i < K; i++) {
            double lp = topl[r * K + i] / T - mp - log(zp), lq = x[topi[r * K + i]] / T - m - log(z);
            kl += exp(lp) * (lp - lq);
        }
        tot += rwt[r] * (W.kl * T * T * kl + (tgt[r] >= 0 ? W.ce * (m1 + log(z1) - x[tgt[r]]) : 0));
    }
    return tot;
}
static void test_topk(void) {
    W = (LossWeights){0.5f, 1.0f, 0, 2.0f};
    float s[N * V], t[N * V], d1[N * V], d2[N * V];
    for (int i = 0; i < N * V; i++) s[i] = (float)S[i], t[i] = (float)Tt[i];
    // k = V: ids 0..V-1 in a shuffled order, teacher log-probs at T = 1
    int32_t *ids = malloc(sizeof(int32_t) * N * V);
    float *lp = malloc(sizeof(float) * N * V);
    for (int r = 0; r < N; r++) {
        double m = -INFINITY, z = 0;
        for (int i = 0; i < V; i++) m = fmax(m, Tt[r * V + i]);
        for (int i = 0; i < V; i++) z += exp(Tt[r * V + i] - m);
        for (int i = 0; i < V; i++) {
            int id = (i * 5 + r) % V;  // 5 is coprime with 13
            ids[r * V + i] = id;
            lp[r * V + i] = (float)(Tt[r * V + id] - m - log(z));
        }
    }
    LossSums a = {0}, b = {0};
    loss_rows(&W, N, V, s, t, tgt, msk, rwt, 0.3, d1, &a, NULL);
    loss_rows_topk(&W, N, V, s, V, ids, lp, tgt, msk, rwt, 0.3, d2, &b, NULL);
    double dd = 0;
    for (int i = 0; i < N * V; i++) dd = fmax(dd, fabs(d1[i] - d2[i]));
    CHECK_REL(fabs(a.kl - b.kl) / fabs(a.kl) + fabs(a.ce - b.ce) / fabs(a.ce) + dd, 1e-5, "top-k with k = V == dense KL");
    // k = 4 vs FD of the float64 formula
    float tl4[N * K];
    for (int r = 0; r < N; r++)
        for (int i = 0; i < K; i++) {
            topi[r * K + i] = (r + 3 * i) % V;
            topl[r * K + i] = -0.5 - i + 0.1 * r;
            tl4[r * K + i] = (float)topl[r * K + i];
        }
    LossSums c = {0};
    loss_rows_topk(&W, N, V, s, K, topi, tl4, tgt, msk, rwt, 1.0, d1, &c, NULL);
    double ref = ref_topk(S);
    CHECK_REL(fabs(loss_total(&W, &c, 0) - ref) / fabs(ref), 1e-5, "top-4 loss");
    double g[N * V];
    for (int i = 0; i < N * V; i++) {
        double x0 = S[i], h = 1e-5;
        S[i] = x0 + h;
        double fp = ref_topk(S);
        S[i] = x0 - h;
        double fm = ref_topk(S);
        S[i] = x0;
        g[i] = (fp - fm) / (2 * h);
    }
    CHECK_REL(rel(d1, g, N * V), 1e-5, "top-4 dlogits vs FD");
    // in place (the engine's use) == separate output
    LossSums e = {0};
    loss_rows_topk(&W, N, V, s, K, topi, tl4, tgt, msk, rwt, 1.0, s, &e, NULL);
    CHECK(memcmp(s, d1, sizeof s) == 0 && e.kl == c.kl);
    free(ids);
    free(lp);
}

static void test_mse(void) {
    enum { R = 5, D = 9 };
    float a[R * D], b[R * D], da[R * D];
    uint8_t m[R] = {1, 0, 1, 1, 1};
    for (int i = 0; i < R * D; i++) a[i] = (float)rng_normal(&rng), b[i] = (float)rng_normal(&rng), da[i] = 0;
    double ref = 0;
    double g[R * D];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < D; i++) {
            double e = (double)a[r * D + i] - b[r * D + i];
            ref += m[r] ? 0.5 * e * e : 0;
            g[r * D + i] = m[r] ? 0.5 * 2 * e : 0;
        }
    double l = mse_rows(R, D, a, b, m, 0.5, da);
    CHECK_REL(fabs(l - ref) / ref, 1e-6, "mse loss");
    CHECK_REL(rel(da, g, R * D), 1e-6, "mse grad");
}

static void test_dpo(void) {
    enum { P = 4 };
    double pc[P], pr[P], rc[P], rr[P], dc[P], dr[P], acc;
    for (int i = 0; i < P; i++) pc[i] = -10 * rng_uniform_f64(&rng), pr[i] = -10 * rng_uniform_f64(&rng), rc[i] = -10 * rng_uniform_f64(&rng), rr[i] = -10 * rng_uniform_f64(&rng);
    const double beta = 0.1;
    double l = dpo_loss(P, beta, pc, pr, rc, rr, dc, dr, &acc);
    double ref = 0, nacc = 0;
    for (int i = 0; i < P; i++) {
        double m = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]));
        ref += -log(1 / (1 + exp(-m))) / P;
        nacc += m > 0;
    }
    CHECK_REL(fabs(l - ref) / ref, 1e-12, "dpo loss");
    CHECK(acc == nacc / P);
    double e = 0;
    for (int i = 0; i < P; i++) {
        double h = 1e-6, x0 = pc[i];
        pc[i] = x0 + h;
        double lp = dpo_loss(P, beta, pc, pr, rc, rr, NULL, NULL, NULL);
        pc[i] = x0 - h;
        double lm = dpo_loss(P, beta, pc, pr, rc, rr, NULL, NULL, NULL);
        pc[i] = x0;
        e = fmax(e, fabs((lp - lm) / (2 * h) - dc[i]) / fabs(dc[i]));
        x0 = pr[i];
        pr[i] = x0 + h;
        lp = dpo_loss(P, beta, pc, pr, rc, rr, NULL, NULL, NULL);
        pr[i] = x0 - h;
        lm = dpo_loss(P, beta, pc, pr, rc, rr, NULL, NULL, NULL);
        pr[i] = x0;
        e = fmax(e, fabs((lp - lm) / (2 * h) - dr[i]) / fabs(dr[i]));
    }
    CHECK_REL(e, 1e-6, "dpo gradients vs FD");
    // large margins stay finite
    double big_c = 0, big_r = -1e4, zero = 0, dcb, drb;
    double lb = dpo_loss(1, 1.0, &big_c, &big_r, &zero, &zero, &dcb, &drb, NULL);
    CHECK(isfinite(lb) && lb >= 0 && lb < 1e-10 && isfinite(dcb));
    lb = dpo_loss(1, 1.0, &big_r, &big_c, &zero, &zero, &dcb, &drb, NULL);
    CHECK(fabs(lb - 1e4) < 1e-6 && fabs(dcb + 1) < 1e-12);
}

int main(void) {
    rng_init(&rng, 99, 0);
    test_logit_losses();
    test_topk();
    test_mse();
    test_dpo();
    return check_report("test_losses");
}
