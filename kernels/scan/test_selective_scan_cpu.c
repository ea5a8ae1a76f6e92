// test_selective_scan_cpu.c: the fp32 CPU twins of the selective scan against the float64 reference, and the
// float64 reference's backward against float64 finite differences.
//  * forward/backward relative error (‖x − ref‖/‖ref‖) on fresh random inputs at many shapes: L = 1, L not a
//    multiple of the backward chunk, L >= 65536, N = 1/5/8/16, several group layouts, resets (also at t = 0
//    and consecutive: zero-length documents), h0, z, extreme delta and A; outputs poisoned with NaN first;
//  * determinism: the backward with 1 and 2 threads gives identical bits;
//  * decode: the step and the multi-token step against the forward on the same tokens.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/scan/selective_scan.h"
#include "tests/check.h"

static uint64_t rng_s = 0x9E3779B97F4A7C15ull;
static double urand(void) {  // splitmix64 -> [0,1)
    uint64_t z = (rng_s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}
static double nrand(void) { return sqrt(-2.0 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand()); }

// a tensor held twice: double values that are exactly representable in float, and the float copy
typedef struct {
    int64_t n;
    double *d;
    float *f;
} T2;
static T2 t2_new(int64_t n) {
    T2 t = {n, calloc((size_t)(n ? n : 1), sizeof(double)), calloc((size_t)(n ? n : 1), sizeof(float))};
    return t;
}
static void t2_free(T2 *t) { free(t->d), free(t->f); }
static void t2_set(T2 *t, int64_t i, double v) { t->f[i] = (float)v, t->d[i] = (double)t->f[i]; }
static void fill_normal(T2 *t, double mean, double sd) {
    for (int64_t i = 0; i < t->n; i++) t2_set(t, i, mean + sd * nrand());
}
static void fill_unif(T2 *t, double lo, double hi) {
    for (int64_t i = 0; i < t->n; i++) t2_set(t, i, lo + (hi - lo) * urand());
}
static void poison_f(float *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) p[i] = NAN;
}
static double worst_err = 0;  // the largest relative error seen by a passing check, printed at the end
static double relerr(const float *x, const double *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = (double)x[i] - ref[i];
        num += e * e, den += ref[i] * ref[i];
    }
    if (num != num) return NAN;
    const double e = den > 0 ? sqrt(num / den) : sqrt(num);
    if (getenv("SCAN_TEST_VERBOSE")) printf("  rel err %.3e\n", e);
    if (e > worst_err) worst_err = e;
    return e;
}

typedef struct {
    int64_t B, L, D, N, Gc, Gb;
    int z, h0, bias, resets, dhl, extreme;
} Case;

typedef struct {
    T2 u, dt, A, Bm, Cm, Dk, z, bias, h0, dout, dhl;
    uint8_t *reset;
} Inputs;

static Inputs make_inputs(const Case *c) {
    const int64_t BL = c->B * c->L;
    Inputs in;
    in.u = t2_new(BL * c->D), in.dt = t2_new(BL * c->D), in.A = t2_new(c->D * c->N);
    in.Bm = t2_new(BL * c->Gb * c->N), in.Cm = t2_new(BL * c->Gc * c->N), in.Dk = t2_new(c->D);
    in.z = t2_new(BL * c->D), in.bias = t2_new(c->D), in.h0 = t2_new(c->B * c->D * c->N);
    in.dout = t2_new(BL * c->D), in.dhl = t2_new(c->B * c->D * c->N);
    fill_normal(&in.u, 0, 1), fill_normal(&in.Bm, 0, 1), fill_normal(&in.Cm, 0, 1), fill_normal(&in.Dk, 1, 0.3);
    fill_normal(&in.z, 0, 1.5), fill_normal(&in.h0, 0, 1), fill_normal(&in.dout, 0, 1), fill_normal(&in.dhl, 0, 1);
    fill_unif(&in.bias, -1, 1);
    if (c->extreme) {
        // large delta (past softplus's threshold of 20) and very negative A: exp underflows to 0
        fill_unif(&in.dt, -4, 40);
        for (int64_t i = 0; i < in.A.n; i++) t2_set(&in.A, i, -exp(log(0.5) + urand() * log(2e4)));
    } else {
        fill_unif(&in.dt, -6, -1);
        for (int64_t i = 0; i < in.A.n; i++) t2_set(&in.A, i, -exp(urand() * log(16.0)));
    }
    in.reset = calloc((size_t)(BL ? BL : 1), 1);
    if (c->resets)
        for (int64_t b = 0; b < c->B; b++)
            for (int64_t t = 0; t < c->L; t++) {
                uint8_t r = urand() < 0.08;
                if (t == 0 && b == 0) r = 1;                     // a reset at t = 0 (h0 discarded)
                if (c->L > 6 && (t == 3 || t == 4)) r = 1;       // consecutive: a one-token document
                in.reset[b * c->L + t] = r;
            }
    return in;
}
static void free_inputs(Inputs *in) {
    T2 *all[] = {&in->u, &in->dt, &in->A, &in->Bm, &in->Cm, &in->Dk, &in->z, &in->bias, &in->h0, &in->dout, &in->dhl};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) t2_free(all[i]);
    free(in->reset);
}

#define FP(c, in, x) ((c)->x ? (in)->x.f : NULL)
#define DP(c, in, x) ((c)->x ? (in)->x.d : NULL)

static void run_case(const Case *c) {
    char name[160];
    snprintf(name, sizeof name, "B%lld L%lld D%lld N%lld Gc%lld Gb%lld z%d h0%d res%d ext%d", (long long)c->B,
             (long long)c->L, (long long)c->D, (long long)c->N, (long long)c->Gc, (long long)c->Gb, c->z, c->h0,
             c->resets, c->extreme);
    ScanShape s = {c->B, c->L, c->D, c->N, c->Gc, c->Gb};
    Inputs in = make_inputs(c);
    const int64_t nx = c->B * c->L * c->D, nh = c->B * c->D * c->N;
    const float *biasf = c->bias ? in.bias.f : NULL;
    const double *biasd = c->bias ? in.bias.d : NULL;
    const float *zf = c->z ? in.z.f : NULL;
    const double *zd = c->z ? in.z.d : NULL;
    const float *h0f = c->h0 ? in.h0.f : NULL;
    const double *h0d = c->h0 ? in.h0.d : NULL;
    const uint8_t *rs = c->resets ? in.reset : NULL;

    // forward
    double *out_r = malloc((size_t)nx * sizeof(double)), *hl_r = malloc((size_t)nh * sizeof(double));
    float *out = malloc((size_t)nx * sizeof(float)), *hl = malloc((size_t)nh * sizeof(float));
    selective_scan_fwd_ref64(&s, in.u.d, in.dt.d, in.A.d, in.Bm.d, in.Cm.d, in.Dk.d, zd, biasd, rs, h0d, out_r, hl_r);
    poison_f(out, nx), poison_f(hl, nh);
    selective_scan_fwd_cpu(&s, in.u.f, in.dt.f, in.A.f, in.Bm.f, in.Cm.f, in.Dk.f, zf, biasf, rs, h0f, out, hl);
    char what[256];
    snprintf(what, sizeof what, "%s fwd out", name);
    CHECK_REL(relerr(out, out_r, nx), 1e-5, what);
    snprintf(what, sizeof what, "%s fwd h_last", name);
    CHECK_REL(relerr(hl, hl_r, nh), 1e-5, what);

    // backward
    const int64_t nB = c->B * c->L * c->Gb * c->N, nC = c->B * c->L * c->Gc * c->N, nA = c->D * c->N;
    double *g_r[9];
    float *g[9];
    const int64_t gn[9] = {nx, nx, nA, nB, nC, c->D, nx, c->D, nh};
    const char *gname[9] = {"du", "ddt", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dh0"};
    for (int i = 0; i < 9; i++) g_r[i] = malloc((size_t)gn[i] * sizeof(double)), g[i] = malloc((size_t)gn[i] * sizeof(float));
    const double *dhl_d = c->dhl ? in.dhl.d : NULL;
    const float *dhl_f = c->dhl ? in.dhl.f : NULL;
    selective_scan_bwd_ref64(&s, in.u.d, in.dt.d, in.A.d, in.Bm.d, in.Cm.d, in.Dk.d, zd, biasd, rs, h0d, in.dout.d,
                             dhl_d, g_r[0], g_r[1], g_r[2], g_r[3], g_r[4], g_r[5], c->z ? g_r[6] : NULL,
                             c->bias ? g_r[7] : NULL, c->h0 ? g_r[8] : NULL);
    for (int i = 0; i < 9; i++) poison_f(g[i], gn[i]);
    selective_scan_bwd_cpu(&s, in.u.f, in.dt.f, in.A.f, in.Bm.f, in.Cm.f, in.Dk.f, zf, biasf, rs, h0f, in.dout.f,
                           dhl_f, g[0], g[1], g[2], g[3], g[4], g[5], c->z ? g[6] : NULL, c->bias ? g[7] : NULL,
                           c->h0 ? g[8] : NULL);
    for (int i = 0; i < 9; i++) {
        if ((i == 6 && !c->z) || (i == 7 && !c->bias) || (i == 8 && !c->h0)) continue;
        snprintf(what, sizeof what, "%s bwd %s", name, gname[i]);
        // fp32 sums of up to B*L terms (dA, dD, ddelta_bias) land a little above 1e-5 at long L
        CHECK_REL(relerr(g[i], g_r[i], gn[i]), c->L > 10000 ? 1e-4 : 2e-5, what);
    }
    // determinism across thread counts
    if (c->L * c->D < 400000) {
        float *g2[9];
        for (int i = 0; i < 9; i++) g2[i] = malloc((size_t)gn[i] * sizeof(float)), poison_f(g2[i], gn[i]);
        const int nt = omp_get_max_threads();
        omp_set_num_threads(nt > 1 ? 1 : 2);
        selective_scan_bwd_cpu(&s, in.u.f, in.dt.f, in.A.f, in.Bm.f, in.Cm.f, in.Dk.f, zf, biasf, rs, h0f,
                               in.dout.f, dhl_f, g2[0], g2[1], g2[2], g2[3], g2[4], g2[5], c->z ? g2[6] : NULL,
                               c->bias ? g2[7] : NULL, c->h0 ? g2[8] : NULL);
        omp_set_num_threads(nt);
        int same = 1;
        for (int i = 0; i < 9; i++) {
            if ((i == 6 && !c->z) || (i == 7 && !c->bias) || (i == 8 && !c->h0)) continue;
            if (memcmp(g[i], g2[i], (size_t)gn[i] * sizeof(float))) same = 0;
        }
        CHECK(same);
        for (int i = 0; i < 9; i++) free(g2[i]);
    }
    for (int i = 0; i < 9; i++) free(g_r[i]), free(g[i]);
    free(out_r), free(hl_r), free(out), free(hl);
    free_inputs(&in);
}

// float64 finite differences of loss = Σ out·W + Σ h_last·V against selective_scan_bwd_ref64
static void fd_check(int with_z, int with_resets) {
    Case c = {2, 9, 4, 3, 2, 1, with_z, 1, 1, with_resets, 1, 0};
    ScanShape s = {c.B, c.L, c.D, c.N, c.Gc, c.Gb};
    Inputs in = make_inputs(&c);
    const uint8_t *rs = with_resets ? in.reset : NULL;
    const double *zd = with_z ? in.z.d : NULL;
    const int64_t nx = c.B * c.L * c.D, nh = c.B * c.D * c.N;
    double *out = malloc(nx * sizeof(double)), *hl = malloc(nh * sizeof(double));
    double *g[9];
    const int64_t gn[9] = {nx, nx, c.D * c.N, c.B * c.L * c.Gb * c.N, c.B * c.L * c.Gc * c.N, c.D, nx, c.D, nh};
    for (int i = 0; i < 9; i++) g[i] = malloc(gn[i] * sizeof(double));
    selective_scan_bwd_ref64(&s, in.u.d, in.dt.d, in.A.d, in.Bm.d, in.Cm.d, in.Dk.d, zd, in.bias.d, rs, in.h0.d,
                             in.dout.d, in.dhl.d, g[0], g[1], g[2], g[3], g[4], g[5], with_z ? g[6] : NULL, g[7],
                             g[8]);
    double *params[9] = {in.u.d, in.dt.d, in.A.d, in.Bm.d, in.Cm.d, in.Dk.d, in.z.d, in.bias.d, in.h0.d};
    const char *pname[9] = {"u", "dt", "A", "B", "C", "D", "z", "delta_bias", "h0"};
    for (int p = 0; p < 9; p++) {
        if (p == 6 && !with_z) continue;
        double num = 0, den = 0;
        for (int64_t i = 0; i < gn[p]; i++) {
            const double save = params[p][i], eps = 1e-6 * (1.0 + fabs(save));
            double lp[2];
            for (int k = 0; k < 2; k++) {
                params[p][i] = save + (k ? -eps : eps);
                selective_scan_fwd_ref64(&s, in.u.d, in.dt.d, in.A.d, in.Bm.d, in.Cm.d, in.Dk.d, zd, in.bias.d, rs,
                                         in.h0.d, out, hl);
                double l = 0;
                for (int64_t j = 0; j < nx; j++) l += out[j] * in.dout.d[j];
                for (int64_t j = 0; j < nh; j++) l += hl[j] * in.dhl.d[j];
                lp[k] = l;
            }
            params[p][i] = save;
            const double fd = (lp[0] - lp[1]) / (2 * eps);
            num += (fd - g[p][i]) * (fd - g[p][i]), den += fd * fd;
        }
        char what[128];
        snprintf(what, sizeof what, "ref64 bwd vs finite differences: d%s (z%d resets%d)", pname[p], with_z,
                 with_resets);
        CHECK_REL(sqrt(num / (den > 0 ? den : 1)), 1e-6, what);
    }
    for (int i = 0; i < 9; i++) free(g[i]);
    free(out), free(hl);
    free_inputs(&in);
}

// decode: K tokens through the multi-token step and through K one-token steps equal the forward from the
// same state; the state after a chosen prefix equals the forward's final state on that prefix
static void decode_check(int64_t B, int64_t K, int64_t D, int64_t N, int64_t Gc, int64_t Gb) {
    Case c = {B, K, D, N, Gc, Gb, 1, 1, 1, 0, 0, 0};
    ScanShape s = {B, K, D, N, Gc, Gb};
    Inputs in = make_inputs(&c);
    const int64_t nx = B * K * D, nh = B * D * N;
    double *out_r = malloc(nx * sizeof(double)), *hl_r = malloc(nh * sizeof(double));
    double *hk_r = malloc(nh * sizeof(double));
    float *out = malloc(nx * sizeof(float)), *hk = malloc(nh * sizeof(float)), *he = malloc(nh * sizeof(float));
    int32_t *keep = malloc(B * sizeof(int32_t));
    selective_scan_fwd_ref64(&s, in.u.d, in.dt.d, in.A.d, in.Bm.d, in.Cm.d, in.Dk.d, in.z.d, in.bias.d, NULL,
                             in.h0.d, out_r, hl_r);
    // reference state after keep[b] tokens: the forward on each row's prefix
    for (int64_t b = 0; b < B; b++) {
        keep[b] = (int32_t)(b % (K + 1));
        ScanShape s1 = {1, keep[b], D, N, Gc, Gb};
        double *o1 = malloc((size_t)(keep[b] * D + 1) * sizeof(double)), *u1 = malloc((keep[b] * D + 1) * sizeof(double));
        double *dt1 = malloc((keep[b] * D + 1) * sizeof(double)), *z1 = malloc((keep[b] * D + 1) * sizeof(double));
        double *B1 = malloc((keep[b] * Gb * N + 1) * sizeof(double)), *C1 = malloc((keep[b] * Gc * N + 1) * sizeof(double));
        for (int64_t t = 0; t < keep[b]; t++) {
            memcpy(u1 + t * D, in.u.d + (b * K + t) * D, D * sizeof(double));
            memcpy(dt1 + t * D, in.dt.d + (b * K + t) * D, D * sizeof(double));
            memcpy(z1 + t * D, in.z.d + (b * K + t) * D, D * sizeof(double));
            memcpy(B1 + t * Gb * N, in.Bm.d + (b * K + t) * Gb * N, Gb * N * sizeof(double));
            memcpy(C1 + t * Gc * N, in.Cm.d + (b * K + t) * Gc * N, Gc * N * sizeof(double));
        }
        selective_scan_fwd_ref64(&s1, u1, dt1, in.A.d, B1, C1, in.Dk.d, z1, in.bias.d, NULL, in.h0.d + b * D * N, o1,
                                 hk_r + b * D * N);
        free(o1), free(u1), free(dt1), free(z1), free(B1), free(C1);
    }
    // multi-token, h_keep aliasing the cached state
    memcpy(hk, in.h0.f, nh * sizeof(float));
    poison_f(out, nx), poison_f(he, nh);
    selective_scan_multi_cpu(&s, in.u.f, in.dt.f, in.A.f, in.Bm.f, in.Cm.f, in.Dk.f, in.z.f, in.bias.f, hk, keep, out,
                             hk, he);
    CHECK_REL(relerr(out, out_r, nx), 1e-5, "multi-token step: outputs");
    CHECK_REL(relerr(hk, hk_r, nh), 1e-5, "multi-token step: state after the kept prefix (in place)");
    CHECK_REL(relerr(he, hl_r, nh), 1e-5, "multi-token step: state after all K tokens");
    // one-token steps
    float *h = malloc(nh * sizeof(float)), *ut = malloc(B * D * sizeof(float)), *dtt = malloc(B * D * sizeof(float));
    float *zt = malloc(B * D * sizeof(float)), *Bt = malloc(B * Gb * N * sizeof(float)), *Ct = malloc(B * Gc * N * sizeof(float));
    float *ot = malloc(B * D * sizeof(float));
    memcpy(h, in.h0.f, nh * sizeof(float));
    poison_f(out, nx);
    for (int64_t t = 0; t < K; t++) {
        for (int64_t b = 0; b < B; b++) {
            memcpy(ut + b * D, in.u.f + (b * K + t) * D, D * sizeof(float));
            memcpy(dtt + b * D, in.dt.f + (b * K + t) * D, D * sizeof(float));
            memcpy(zt + b * D, in.z.f + (b * K + t) * D, D * sizeof(float));
            memcpy(Bt + b * Gb * N, in.Bm.f + (b * K + t) * Gb * N, Gb * N * sizeof(float));
            memcpy(Ct + b * Gc * N, in.Cm.f + (b * K + t) * Gc * N, Gc * N * sizeof(float));
        }
        poison_f(ot, B * D);
        selective_scan_step_cpu(&s, ut, dtt, in.A.f, Bt, Ct, in.Dk.f, zt, in.bias.f, h, ot);
        for (int64_t b = 0; b < B; b++) memcpy(out + (b * K + t) * D, ot + b * D, D * sizeof(float));
    }
    CHECK_REL(relerr(out, out_r, nx), 1e-5, "one-token steps: outputs");
    CHECK_REL(relerr(h, hl_r, nh), 1e-5, "one-token steps: final state");
    free(h), free(ut), free(dtt), free(zt), free(Bt), free(Ct), free(ot);
    free(out_r), free(hl_r), free(hk_r), free(out), free(hk), free(he), free(keep);
    free_inputs(&in);
}

int main(void) {
    fd_check(1, 1);
    fd_check(0, 0);
    fd_check(1, 0);
    const Case cases[] = {
        // B  L      D    N   Gc  Gb  z h0 bias res dhl ext
        {1, 1, 16, 16, 1, 1, 1, 1, 1, 0, 1, 0},         // L = 1
        {2, 67, 32, 16, 2, 1, 1, 1, 1, 1, 1, 0},        // L not a multiple of the chunk; 2 C groups share B
        {2, 130, 48, 16, 3, 1, 1, 0, 1, 1, 0, 0},
        {1, 200, 12, 5, 4, 2, 1, 1, 0, 1, 1, 0},        // N = 5, 3 channels per C group
        {3, 33, 8, 1, 8, 8, 0, 1, 1, 1, 1, 0},          // N = 1, no z
        {2, 96, 64, 8, 8, 2, 1, 1, 1, 0, 0, 0},         // N = 8
        {1, 64, 256, 16, 16, 4, 1, 1, 1, 1, 1, 0},      // 8B-like grouping: C groups = D/N, B groups repeated x4
        {2, 150, 32, 16, 2, 1, 1, 1, 1, 1, 1, 1},       // extreme delta and A
        {1, 7, 16, 16, 1, 1, 1, 1, 1, 1, 1, 1},
        {1, 65539, 4, 4, 1, 1, 1, 1, 1, 1, 1, 0},       // L >= 65536
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_case(&cases[i]);
    decode_check(5, 4, 32, 16, 2, 1);
    decode_check(3, 1, 12, 5, 4, 2);
    printf("largest fp32 relative error vs float64: %.3e\n", worst_err);
    return check_report("test_selective_scan_cpu");
}
