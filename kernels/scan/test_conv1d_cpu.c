// test_conv1d_cpu.c: the fp32 causal depthwise conv1d (+SiLU) twin against its float64 reference; the
// reference's backward against float64 finite differences; streaming (x_prev) against one long sequence;
// the decode-state advance. Outputs are poisoned with NaN before every call.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/scan/selective_scan.h"
#include "tests/check.h"

static uint64_t rng_s = 0x243F6A8885A308D3ull;
static double urand(void) {
    uint64_t z = (rng_s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}
static double nrand(void) { return sqrt(-2.0 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand()); }
// fills f and d with the same float-representable normal values
static void fill2(float *f, double *d, int64_t n, double sd) {
    for (int64_t i = 0; i < n; i++) f[i] = (float)(sd * nrand()), d[i] = f[i];
}
static void poison(float *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) p[i] = NAN;
}
static double relerr(const float *x, const double *r, int64_t n) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < n; i++) a += ((double)x[i] - r[i]) * ((double)x[i] - r[i]), b += r[i] * r[i];
    return a != a ? NAN : sqrt(a / (b > 0 ? b : 1));
}
static double relerr_ff(const float *x, const float *r, int64_t n) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < n; i++) a += ((double)x[i] - r[i]) * ((double)x[i] - r[i]), b += (double)r[i] * r[i];
    return a != a ? NAN : sqrt(a / (b > 0 ? b : 1));
}

static void run_case(int64_t B, int64_t L, int64_t C, int W, int silu, int resets, int prev) {
    const int64_t n = B * L * C, np = B * (W - 1) * C;
    float *x = malloc(n * 4), *w = malloc(C * W * 4), *bias = malloc(C * 4), *xp = malloc((np + 1) * 4), *dout = malloc(n * 4);
    double *xd = malloc(n * 8), *wd = malloc(C * W * 8), *bd = malloc(C * 8), *xpd = malloc((np + 1) * 8), *doutd = malloc(n * 8);
    fill2(x, xd, n, 1), fill2(w, wd, C * W, 0.5), fill2(bias, bd, C, 0.3), fill2(xp, xpd, np, 1), fill2(dout, doutd, n, 1);
    uint8_t *rs = calloc(B * L + 1, 1);
    if (resets)
        for (int64_t i = 0; i < B * L; i++) rs[i] = urand() < 0.1 || (L > 5 && (i % L == 2 || i % L == 3));
    const uint8_t *r = resets ? rs : NULL;
    float *out = malloc(n * 4), *dx = malloc(n * 4), *dw = malloc(C * W * 4), *db = malloc(C * 4);
    double *outd = malloc(n * 8), *dxd = malloc(n * 8), *dwd = malloc(C * W * 8), *dbd = malloc(C * 8);
    conv1d_silu_fwd_ref64(B, L, C, W, xd, wd, bd, r, prev ? xpd : NULL, silu, outd);
    conv1d_silu_bwd_ref64(B, L, C, W, xd, wd, bd, r, prev ? xpd : NULL, silu, doutd, dxd, dwd, dbd);
    poison(out, n), poison(dx, n), poison(dw, C * W), poison(db, C);
    conv1d_silu_fwd_cpu(B, L, C, W, x, w, bias, r, prev ? xp : NULL, silu, out);
    conv1d_silu_bwd_cpu(B, L, C, W, x, w, bias, r, prev ? xp : NULL, silu, dout, dx, dw, db);
    char what[160];
    snprintf(what, sizeof what, "conv B%lld L%lld C%lld W%d silu%d res%d prev%d", (long long)B, (long long)L,
             (long long)C, W, silu, resets, prev);
    CHECK_REL(relerr(out, outd, n), 1e-6, what);
    CHECK_REL(relerr(dx, dxd, n), 1e-6, what);
    CHECK_REL(relerr(dw, dwd, C * W), 1e-5, what);
    CHECK_REL(relerr(db, dbd, C), 1e-5, what);
    free(x), free(w), free(bias), free(xp), free(dout), free(xd), free(wd), free(bd), free(xpd), free(doutd);
    free(rs), free(out), free(dx), free(dw), free(db), free(outd), free(dxd), free(dwd), free(dbd);
}

static void fd_check(int silu, int resets) {
    const int64_t B = 2, L = 7, C = 3;
    const int W = 4;
    const int64_t n = B * L * C, np = B * (W - 1) * C;
    double x[42], w[12], b[3], xp[18], dout[42], out[42], dx[42], dw[12], db[3];
    float tmp[64];
    fill2(tmp, x, n, 1), fill2(tmp, w, C * W, 0.5), fill2(tmp, b, C, 0.3), fill2(tmp, xp, np, 1), fill2(tmp, dout, n, 1);
    uint8_t rs[14] = {0};
    rs[3] = rs[4] = rs[7 + 5] = resets;
    const uint8_t *r = resets ? rs : NULL;
    conv1d_silu_bwd_ref64(B, L, C, W, x, w, b, r, xp, silu, dout, dx, dw, db);
    double *ps[3] = {x, w, b}, *gs[3] = {dx, dw, db};
    const int64_t pn[3] = {n, C * W, C};
    for (int p = 0; p < 3; p++) {
        double num = 0, den = 0;
        for (int64_t i = 0; i < pn[p]; i++) {
            const double save = ps[p][i], eps = 1e-6;
            double l[2];
            for (int k = 0; k < 2; k++) {
                ps[p][i] = save + (k ? -eps : eps);
                conv1d_silu_fwd_ref64(B, L, C, W, x, w, b, r, xp, silu, out);
                l[k] = 0;
                for (int64_t j = 0; j < n; j++) l[k] += out[j] * dout[j];
            }
            ps[p][i] = save;
            const double fd = (l[0] - l[1]) / (2 * eps);
            num += (fd - gs[p][i]) * (fd - gs[p][i]), den += fd * fd;
        }
        CHECK_REL(sqrt(num / den), 1e-7, "conv ref64 bwd vs finite differences");
    }
}

// streaming: the conv over [x1 | x2] equals the conv over x2 with x_prev = the last W-1 tokens of x1, and
// conv1d_state_advance_cpu produces that x_prev from the previous state
static void stream_check(void) {
    const int64_t B = 3, L1 = 9, L2 = 5, C = 70;
    const int W = 4;
    float *x = malloc(B * (L1 + L2) * C * 4), *w = malloc(C * W * 4), *bias = malloc(C * 4);
    double *scratch = malloc(B * (L1 + L2) * C * 8);
    fill2(x, scratch, B * (L1 + L2) * C, 1), fill2(w, scratch, C * W, 0.5), fill2(bias, scratch, C, 0.3);
    float *full = malloc(B * (L1 + L2) * C * 4), *x1 = malloc(B * L1 * C * 4), *x2 = malloc(B * L2 * C * 4);
    for (int64_t b = 0; b < B; b++) {
        memcpy(x1 + b * L1 * C, x + b * (L1 + L2) * C, L1 * C * 4);
        memcpy(x2 + b * L2 * C, x + (b * (L1 + L2) + L1) * C, L2 * C * 4);
    }
    conv1d_silu_fwd_cpu(B, L1 + L2, C, W, x, w, bias, NULL, NULL, 1, full);
    float *state = calloc(B * (W - 1) * C, 4), *o2 = malloc(B * L2 * C * 4), *ref2 = malloc(B * L2 * C * 4);
    conv1d_state_advance_cpu(B, L1, C, W, x1, NULL, state);  // from a zero state over all of x1
    poison(o2, B * L2 * C);
    conv1d_silu_fwd_cpu(B, L2, C, W, x2, w, bias, NULL, state, 1, o2);
    for (int64_t b = 0; b < B; b++) memcpy(ref2 + b * L2 * C, full + (b * (L1 + L2) + L1) * C, L2 * C * 4);
    CHECK_REL(relerr_ff(o2, ref2, B * L2 * C), 1e-7, "conv streaming with x_prev == one long sequence");
    // keep a prefix: advancing by keep tokens == advancing over the prefix alone
    int32_t keep[3] = {0, 2, 5};
    float *s1 = malloc(B * (W - 1) * C * 4), *s2 = malloc(B * (W - 1) * C * 4);
    memcpy(s1, state, B * (W - 1) * C * 4), memcpy(s2, state, B * (W - 1) * C * 4);
    conv1d_state_advance_cpu(B, L2, C, W, x2, keep, s1);
    int ok = 1;
    for (int64_t b = 0; b < B; b++) {
        float *st = s2 + b * (W - 1) * C;
        conv1d_state_advance_cpu(1, keep[b], C, W, x2 + b * L2 * C, NULL, st);
        ok &= !memcmp(st, s1 + b * (W - 1) * C, (W - 1) * C * 4);
    }
    CHECK(ok);
    free(x), free(w), free(bias), free(scratch), free(full), free(x1), free(x2), free(state), free(o2), free(ref2);
    free(s1), free(s2);
}

int main(void) {
    fd_check(1, 1), fd_check(1, 0), fd_check(0, 1);
    run_case(1, 1, 8, 4, 1, 0, 0);
    run_case(2, 37, 96, 4, 1, 1, 1);
    run_case(3, 50, 65, 4, 1, 1, 0);
    run_case(2, 20, 33, 3, 0, 1, 1);
    run_case(1, 30, 17, 2, 1, 0, 1);
    run_case(2, 12, 10, 1, 1, 1, 0);
    run_case(1, 70000, 3, 4, 1, 1, 0);  // L >= 65536
    stream_check();
    return check_report("test_conv1d_cpu");
}
