// gpu_test_scan.cu: the CUDA selective scan (forward, backward, multi-token decode) and conv1d kernels against
// the float64 references, on fresh random inputs, outputs poisoned (all bits set: NaN) before every call.
// Shapes: L = 1, L not a multiple of 4 or of the checkpoint interval, D not a multiple of the block's channels,
// N = 4/8/16/32, both dB paths (and in v11 B groups of 16/32/64 channels summed in the block, of 48/80/128 through
// per-warp partials: SmolLM2-135M's D 576 with 12 B groups of 48 among them), resets (at t = 0 and consecutive),
// extreme delta and A, time segments, a grid of more than 65535 (batch x channel) blocks, L >= 65536, and
// B*L*D > 2^31 (64-bit offsets; the reference is computed for the last channels of that problem, where offsets
// are largest).
// The backward and then the forward are also run twice and must give identical bits. The small cases run again with each selectable
// version / option (defaults: forward v14, backward v12; DISTILL_SCAN_BWD=v13 (the forward (v11) storing states every 8
// steps, alone and with 3 segments; v10 on every 8th for the shapes v13 does not take), =v11, =v10, =v8: v10 without time
// segments; DISTILL_SCAN_BWD_NSEG=3 with v12, v11 and v10; DISTILL_SCAN_FWD=v10: 16-step forward tiles; =v11: the
// forward default before v14), and every
// conv case with the conv defaults (v2), with v1 (DISTILL_CONV_FWD/BWD=v1) and with the backward v2c8. Run with a version in the
// environment and --only-huge to put it through the > 2^31 case too. Exit status 1 if any check fails.
// Usage: gpu_test_scan [--no-huge | --quick | --mid | --only-huge]
#include "kernels/scan/gpu_common.cuh"
#include "kernels/scan/selective_scan_cuda.h"

typedef __nv_bfloat16 bf16;
static int npass = 0, nfail = 0;

static void check(double err, double tol, const char *name, const char *what) {
    const bool ok = err <= tol && err == err;
    ok ? npass++ : nfail++;
    printf("  %-4s %-44s %-12s rel err %.2e (tol %.0e)\n", ok ? "ok" : "FAIL", name, what, err, tol);
}

static uint64_t hs = 12345;
static double hunif(void) { return (double)(gmix64(hs++) >> 11) * 0x1.0p-53; }
static double hnorm(void) { return sqrt(-2 * log(hunif() + 1e-300)) * cos(6.283185307179586 * hunif()); }

template <typename T>
static T *dalloc(int64_t n) {
    T *p;
    CK(cudaMalloc(&p, (size_t)(n > 0 ? n : 1) * sizeof(T)));
    return p;
}
template <typename T>
static void poison(T *p, int64_t n) {
    CK(cudaMemset(p, 0xFF, (size_t)n * sizeof(T)));
}
// copies rows x width elements starting at column col of a [rows, pitch] device matrix into a double array
static void get_bf(double *dst, const bf16 *src, int64_t rows, int64_t pitch, int64_t col, int64_t width) {
    bf16 *tmp = (bf16 *)malloc((size_t)(rows * width) * sizeof(bf16));
    CK(cudaMemcpy2D(tmp, width * sizeof(bf16), src + col, pitch * sizeof(bf16), width * sizeof(bf16), rows,
                    cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < rows * width; i++) dst[i] = bf2d(tmp[i]);
    free(tmp);
}
static void get_f(float *dst, const float *src, int64_t rows, int64_t pitch, int64_t col, int64_t width) {
    CK(cudaMemcpy2D(dst, width * sizeof(float), src + col, pitch * sizeof(float), width * sizeof(float), rows,
                    cudaMemcpyDeviceToHost));
}
static void get_bf_raw(bf16 *dst, const bf16 *src, int64_t rows, int64_t pitch, int64_t col, int64_t width) {
    CK(cudaMemcpy2D(dst, width * sizeof(bf16), src + col, pitch * sizeof(bf16), width * sizeof(bf16), rows,
                    cudaMemcpyDeviceToHost));
}

typedef struct {
    const char *name;
    int64_t B, L, D, N, Gc, Gb;
    int z, h0, bias, resets, dhl, extreme, nseg;
    int64_t slice;  // 0: check every channel; else the last `slice` channels (a multiple of D/Gb)
} GCase;

static void run_scan_case(const GCase *c) {
    printf("%s: B %lld L %lld D %lld N %lld Gc %lld Gb %lld nseg %d\n", c->name, (long long)c->B, (long long)c->L,
           (long long)c->D, (long long)c->N, (long long)c->Gc, (long long)c->Gb, c->nseg);
    ScanShape s = {c->B, c->L, c->D, c->N, c->Gc, c->Gb};
    const int64_t B = c->B, L = c->L, D = c->D, N = c->N, Gc = c->Gc, Gb = c->Gb, rows = B * L;
    const int64_t nx = rows * D, nB = rows * Gb * N, nC = rows * Gc * N, nh = B * D * N;
    const uint64_t seed = gmix64((uint64_t)hs++);
    bf16 *u = dalloc<bf16>(nx), *dt = dalloc<bf16>(nx), *z = c->z ? dalloc<bf16>(nx) : NULL, *Bm = dalloc<bf16>(nB);
    bf16 *Cm = dalloc<bf16>(nC), *out = dalloc<bf16>(nx), *dout = dalloc<bf16>(nx);
    uint8_t *rs = c->resets ? dalloc<uint8_t>(rows) : NULL;
    fill_bf16(u, nx, seed + 1, 1, 0.f, 1.f);
    if (c->extreme) fill_bf16(dt, nx, seed + 2, 0, -4.f, 40.f);
    else fill_bf16(dt, nx, seed + 2, 0, -6.f, -1.f);
    if (z) fill_bf16(z, nx, seed + 3, 1, 0.f, 1.5f);
    fill_bf16(Bm, nB, seed + 4, 1, 0.f, 1.f);
    fill_bf16(Cm, nC, seed + 5, 1, 0.f, 1.f);
    fill_bf16(dout, nx, seed + 6, 1, 0.f, 1.f);
    if (rs) {
        fill_u8_kernel<<<1024, 256>>>(rs, rows, seed + 7, 0.05f, L);
        CK(cudaGetLastError());
    }
    // small fp32 parameters on the host
    float *A_h = (float *)malloc(D * N * 4), *D_h = (float *)malloc(D * 4), *bias_h = (float *)malloc(D * 4);
    float *h0_h = (float *)malloc(nh * 4), *dhl_h = (float *)malloc(nh * 4);
    for (int64_t i = 0; i < D * N; i++)
        A_h[i] = c->extreme ? (float)-exp(log(0.5) + hunif() * log(2e4)) : (float)-exp(hunif() * log(16.0));
    for (int64_t i = 0; i < D; i++) D_h[i] = (float)(1 + 0.3 * hnorm()), bias_h[i] = (float)(2 * hunif() - 1);
    for (int64_t i = 0; i < nh; i++) h0_h[i] = (float)hnorm(), dhl_h[i] = (float)hnorm();
    float *A = dalloc<float>(D * N), *Dk = dalloc<float>(D), *bias = dalloc<float>(D), *h0 = dalloc<float>(nh);
    float *dhl = dalloc<float>(nh), *hl = dalloc<float>(nh);
    CK(cudaMemcpy(A, A_h, D * N * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(Dk, D_h, D * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bias, bias_h, D * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(h0, h0_h, nh * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dhl, dhl_h, nh * 4, cudaMemcpyHostToDevice));
    float *ckpt = dalloc<float>((int64_t)selective_scan_ckpt_elems(&s));
    const size_t fws = selective_scan_fwd_workspace(&s, c->nseg), bws = selective_scan_bwd_workspace(&s);
    void *fw = fws ? dalloc<char>((int64_t)fws) : NULL, *bw = dalloc<char>((int64_t)bws);
    // forward
    poison(out, nx), poison(hl, nh);
    char err[512] = "";
    const float *biasp = c->bias ? bias : NULL, *h0p = c->h0 ? h0 : NULL;
    auto fwd = [&]() {
        return selective_scan_fwd_cuda(&s, (uint16_t *)u, (uint16_t *)dt, A, (uint16_t *)Bm, (uint16_t *)Cm, Dk,
                                       (uint16_t *)z, biasp, rs, h0p, (uint16_t *)out, hl, ckpt, c->nseg, fw, NULL,
                                       err, sizeof err);
    };
    if (fwd()) {
        printf("  FAIL forward refused: %s\n", err), nfail++;
        return;
    }
    // backward
    bf16 *du = dalloc<bf16>(nx), *ddt = dalloc<bf16>(nx), *dz = c->z ? dalloc<bf16>(nx) : NULL;
    bf16 *dB = dalloc<bf16>(nB), *dC = dalloc<bf16>(nC);
    float *dA = dalloc<float>(D * N), *dD = dalloc<float>(D), *ddb = dalloc<float>(D), *dh0 = dalloc<float>(nh);
    poison(du, nx), poison(ddt, nx), poison(dB, nB), poison(dC, nC), poison(dA, D * N), poison(dD, D);
    poison(ddb, D), poison(dh0, nh);
    if (dz) poison(dz, nx);
    const float *dhlp = c->dhl ? dhl : NULL;
    auto bwd = [&]() {
        return selective_scan_bwd_cuda(&s, (uint16_t *)u, (uint16_t *)dt, A, (uint16_t *)Bm, (uint16_t *)Cm, Dk,
                                       (uint16_t *)z, biasp, rs, h0p, ckpt, (uint16_t *)dout, dhlp, (uint16_t *)du,
                                       (uint16_t *)ddt, dA, (uint16_t *)dB, (uint16_t *)dC, dD, (uint16_t *)dz,
                                       c->bias ? ddb : NULL, c->h0 ? dh0 : NULL, bw, NULL, err, sizeof err);
    };
    if (bwd()) {
        printf("  FAIL backward refused: %s\n", err), nfail++;
        return;
    }
    CK(cudaDeviceSynchronize());

    // the checked channels [dlo, D): whole B groups
    const int64_t Dg = D / Gc, Db = D / Gb, dlo = c->slice ? D - c->slice : 0, Ds = D - dlo;
    const int64_t gclo = dlo / Dg, gblo = dlo / Db, Gcs = Ds / Dg, Gbs = Ds / Db;
    ScanShape ss = {B, L, Ds, N, Gcs, Gbs};
    const int64_t nxs = rows * Ds, nBs = rows * Gbs * N, nCs = rows * Gcs * N, nhs = B * Ds * N;
    double *u_r = (double *)malloc(nxs * 8), *dt_r = (double *)malloc(nxs * 8), *z_r = (double *)malloc(nxs * 8);
    double *B_r = (double *)malloc(nBs * 8), *C_r = (double *)malloc(nCs * 8), *do_r = (double *)malloc(nxs * 8);
    double *A_r = (double *)malloc(Ds * N * 8), *D_r = (double *)malloc(Ds * 8), *b_r = (double *)malloc(Ds * 8);
    double *h0_r = (double *)malloc(nhs * 8), *dhl_r = (double *)malloc(nhs * 8);
    uint8_t *rs_r = (uint8_t *)malloc(rows + 1);
    get_bf(u_r, u, rows, D, dlo, Ds), get_bf(dt_r, dt, rows, D, dlo, Ds), get_bf(do_r, dout, rows, D, dlo, Ds);
    if (z) get_bf(z_r, z, rows, D, dlo, Ds);
    get_bf(B_r, Bm, rows, Gb * N, gblo * N, Gbs * N), get_bf(C_r, Cm, rows, Gc * N, gclo * N, Gcs * N);
    if (rs) CK(cudaMemcpy(rs_r, rs, rows, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < Ds * N; i++) A_r[i] = A_h[dlo * N + i];
    for (int64_t i = 0; i < Ds; i++) D_r[i] = D_h[dlo + i], b_r[i] = bias_h[dlo + i];
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < Ds * N; i++)
            h0_r[b * Ds * N + i] = h0_h[(b * D + dlo) * N + i], dhl_r[b * Ds * N + i] = dhl_h[(b * D + dlo) * N + i];
    double *out_r = (double *)malloc(nxs * 8), *hl_r = (double *)malloc(nhs * 8);
    selective_scan_fwd_ref64(&ss, u_r, dt_r, A_r, B_r, C_r, D_r, z ? z_r : NULL, c->bias ? b_r : NULL,
                             rs ? rs_r : NULL, c->h0 ? h0_r : NULL, out_r, hl_r);
    double *g_r[9];
    const int64_t gn[9] = {nxs, nxs, Ds * N, nBs, nCs, Ds, nxs, Ds, nhs};
    for (int i = 0; i < 9; i++) g_r[i] = (double *)malloc((size_t)gn[i] * 8);
    selective_scan_bwd_ref64(&ss, u_r, dt_r, A_r, B_r, C_r, D_r, z ? z_r : NULL, c->bias ? b_r : NULL,
                             rs ? rs_r : NULL, c->h0 ? h0_r : NULL, do_r, c->dhl ? dhl_r : NULL, g_r[0], g_r[1],
                             g_r[2], g_r[3], g_r[4], g_r[5], z ? g_r[6] : NULL, c->bias ? g_r[7] : NULL,
                             c->h0 ? g_r[8] : NULL);
    // compare
    bf16 *tb = (bf16 *)malloc((size_t)(nxs > nCs ? nxs : nCs) * 2);
    float *tf = (float *)malloc((size_t)(nhs > Ds * N ? nhs : Ds * N) * 4);
    get_bf_raw(tb, out, rows, D, dlo, Ds), check(rel_bf(tb, out_r, nxs), 5e-3, c->name, "fwd out");
    get_f(tf, hl, B, D * N, dlo * N, Ds * N), check(rel_f(tf, hl_r, nhs), 5e-5, c->name, "fwd h_last");
    get_bf_raw(tb, du, rows, D, dlo, Ds), check(rel_bf(tb, g_r[0], nxs), 5e-3, c->name, "bwd du");
    get_bf_raw(tb, ddt, rows, D, dlo, Ds), check(rel_bf(tb, g_r[1], nxs), 5e-3, c->name, "bwd ddt");
    get_f(tf, dA, 1, D * N, dlo * N, Ds * N), check(rel_f(tf, g_r[2], Ds * N), 5e-5, c->name, "bwd dA");
    get_bf_raw(tb, dB, rows, Gb * N, gblo * N, Gbs * N), check(rel_bf(tb, g_r[3], nBs), 5e-3, c->name, "bwd dB");
    get_bf_raw(tb, dC, rows, Gc * N, gclo * N, Gcs * N), check(rel_bf(tb, g_r[4], nCs), 5e-3, c->name, "bwd dC");
    get_f(tf, dD, 1, D, dlo, Ds), check(rel_f(tf, g_r[5], Ds), 5e-5, c->name, "bwd dD");
    if (z) get_bf_raw(tb, dz, rows, D, dlo, Ds), check(rel_bf(tb, g_r[6], nxs), 5e-3, c->name, "bwd dz");
    if (c->bias) get_f(tf, ddb, 1, D, dlo, Ds), check(rel_f(tf, g_r[7], Ds), 5e-5, c->name, "bwd ddelta_bias");
    if (c->h0) get_f(tf, dh0, B, D * N, dlo * N, Ds * N), check(rel_f(tf, g_r[8], nhs), 5e-5, c->name, "bwd dh0");

    // determinism: a second backward, then a second forward, give the same bits (checked on the whole outputs,
    // the forward's checkpoints included, for small problems)
    auto repeat = [&](int n, const int64_t *sizes, void *const *bufs, auto again_call, const char *what) {
        char *first[8];
        for (int i = 0; i < n; i++) {
            first[i] = (char *)malloc((size_t)sizes[i]);
            CK(cudaMemcpy(first[i], bufs[i], (size_t)sizes[i], cudaMemcpyDeviceToHost));
            CK(cudaMemset(bufs[i], 0xFF, (size_t)sizes[i]));
        }
        again_call();
        CK(cudaDeviceSynchronize());
        int same = 1;
        for (int i = 0; i < n; i++) {
            char *again = (char *)malloc((size_t)sizes[i]);
            CK(cudaMemcpy(again, bufs[i], (size_t)sizes[i], cudaMemcpyDeviceToHost));
            same &= !memcmp(again, first[i], (size_t)sizes[i]);
            free(again), free(first[i]);
        }
        check(same ? 0.0 : 1.0, 0.0, c->name, what);
    };
    if (nx < (1ll << 26)) {
        const int64_t bsizes[5] = {nx * 2, nx * 2, nB * 2, nC * 2, D * N * 4};
        void *bbufs[5] = {du, ddt, dB, dC, dA};
        repeat(5, bsizes, bbufs, bwd, "bwd bitwise repeatable");
        const int64_t fsizes[3] = {nx * 2, nh * 4, (int64_t)selective_scan_ckpt_elems(&s) * 4};
        void *fbufs[3] = {out, hl, ckpt};
        repeat(3, fsizes, fbufs, fwd, "fwd bitwise repeatable");
    }
    free(tb), free(tf), free(u_r), free(dt_r), free(z_r), free(B_r), free(C_r), free(do_r), free(A_r), free(D_r);
    free(b_r), free(h0_r), free(dhl_r), free(rs_r), free(out_r), free(hl_r);
    for (int i = 0; i < 9; i++) free(g_r[i]);
    free(A_h), free(D_h), free(bias_h), free(h0_h), free(dhl_h);
    void *dev[] = {u, dt, z, Bm, Cm, out, dout, rs, A, Dk, bias, h0, dhl, hl, ckpt, fw, bw, du, ddt, dz, dB, dC, dA, dD, ddb, dh0};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++)
        if (dev[i]) CK(cudaFree(dev[i]));
}

// multi-token decode: outputs and the states after the kept prefix / all K tokens against the float64 forward
static void run_multi_case(int64_t B, int64_t K, int64_t D, int64_t N, int64_t Gc, int64_t Gb) {
    char name[96];
    snprintf(name, sizeof name, "multi B%lld K%lld D%lld N%lld", (long long)B, (long long)K, (long long)D, (long long)N);
    printf("%s\n", name);
    ScanShape s = {B, K, D, N, Gc, Gb};
    const int64_t nx = B * K * D, nB = B * K * Gb * N, nC = B * K * Gc * N, nh = B * D * N;
    const uint64_t seed = gmix64(hs++);
    bf16 *u = dalloc<bf16>(nx), *dt = dalloc<bf16>(nx), *z = dalloc<bf16>(nx), *Bm = dalloc<bf16>(nB);
    bf16 *Cm = dalloc<bf16>(nC), *out = dalloc<bf16>(nx);
    fill_bf16(u, nx, seed + 1, 1, 0, 1), fill_bf16(dt, nx, seed + 2, 0, -6, -1), fill_bf16(z, nx, seed + 3, 1, 0, 1.5f);
    fill_bf16(Bm, nB, seed + 4, 1, 0, 1), fill_bf16(Cm, nC, seed + 5, 1, 0, 1);
    float *A_h = (float *)malloc(D * N * 4), *D_h = (float *)malloc(D * 4), *b_h = (float *)malloc(D * 4);
    float *h_h = (float *)malloc(nh * 4);
    for (int64_t i = 0; i < D * N; i++) A_h[i] = (float)-exp(hunif() * log(16.0));
    for (int64_t i = 0; i < D; i++) D_h[i] = (float)(1 + 0.3 * hnorm()), b_h[i] = (float)(2 * hunif() - 1);
    for (int64_t i = 0; i < nh; i++) h_h[i] = (float)hnorm();
    int32_t *keep_h = (int32_t *)malloc(B * 4);
    for (int64_t b = 0; b < B; b++) keep_h[b] = (int32_t)(b % (K + 1));
    float *A = dalloc<float>(D * N), *Dk = dalloc<float>(D), *bias = dalloc<float>(D), *h = dalloc<float>(nh);
    float *he = dalloc<float>(nh);
    int32_t *keep = dalloc<int32_t>(B);
    CK(cudaMemcpy(A, A_h, D * N * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(Dk, D_h, D * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bias, b_h, D * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(h, h_h, nh * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(keep, keep_h, B * 4, cudaMemcpyHostToDevice));
    poison(out, nx), poison(he, nh);
    char err[256];
    if (selective_scan_multi_cuda(&s, (uint16_t *)u, (uint16_t *)dt, A, (uint16_t *)Bm, (uint16_t *)Cm, Dk,
                                  (uint16_t *)z, bias, h, keep, (uint16_t *)out, h, he, NULL, err, sizeof err)) {
        printf("  FAIL multi refused: %s\n", err), nfail++;
        return;
    }
    CK(cudaDeviceSynchronize());
    double *u_r = (double *)malloc(nx * 8), *dt_r = (double *)malloc(nx * 8), *z_r = (double *)malloc(nx * 8);
    double *B_r = (double *)malloc(nB * 8), *C_r = (double *)malloc(nC * 8), *A_r = (double *)malloc(D * N * 8);
    double *D_r = (double *)malloc(D * 8), *b_r = (double *)malloc(D * 8), *h_r = (double *)malloc(nh * 8);
    get_bf(u_r, u, 1, nx, 0, nx), get_bf(dt_r, dt, 1, nx, 0, nx), get_bf(z_r, z, 1, nx, 0, nx);
    get_bf(B_r, Bm, 1, nB, 0, nB), get_bf(C_r, Cm, 1, nC, 0, nC);
    for (int64_t i = 0; i < D * N; i++) A_r[i] = A_h[i];
    for (int64_t i = 0; i < D; i++) D_r[i] = D_h[i], b_r[i] = b_h[i];
    for (int64_t i = 0; i < nh; i++) h_r[i] = h_h[i];
    double *out_r = (double *)malloc(nx * 8), *hl_r = (double *)malloc(nh * 8), *hk_r = (double *)malloc(nh * 8);
    selective_scan_fwd_ref64(&s, u_r, dt_r, A_r, B_r, C_r, D_r, z_r, b_r, NULL, h_r, out_r, hl_r);
    for (int64_t b = 0; b < B; b++) {  // the state after keep[b] tokens: the forward on that row's prefix
        ScanShape s1 = {1, keep_h[b], D, N, Gc, Gb};
        double *o1 = (double *)malloc((keep_h[b] * D + 1) * 8);
        // row b's tensors are contiguous [K, ...]; a prefix of them is the first keep[b] steps
        selective_scan_fwd_ref64(&s1, u_r + b * K * D, dt_r + b * K * D, A_r, B_r + b * K * Gb * N,
                                 C_r + b * K * Gc * N, D_r, z_r + b * K * D, b_r, NULL, h_r + b * D * N, o1,
                                 hk_r + b * D * N);
        free(o1);
    }
    bf16 *tb = (bf16 *)malloc(nx * 2);
    float *tf = (float *)malloc(nh * 4);
    CK(cudaMemcpy(tb, out, nx * 2, cudaMemcpyDeviceToHost));
    check(rel_bf(tb, out_r, nx), 5e-3, name, "outputs");
    CK(cudaMemcpy(tf, h, nh * 4, cudaMemcpyDeviceToHost));
    check(rel_f(tf, hk_r, nh), 1e-5, name, "h_keep");
    CK(cudaMemcpy(tf, he, nh * 4, cudaMemcpyDeviceToHost));
    check(rel_f(tf, hl_r, nh), 1e-5, name, "h_end");
    free(tb), free(tf), free(u_r), free(dt_r), free(z_r), free(B_r), free(C_r), free(A_r), free(D_r), free(b_r);
    free(h_r), free(out_r), free(hl_r), free(hk_r), free(A_h), free(D_h), free(b_h), free(h_h), free(keep_h);
    void *dev[] = {u, dt, z, Bm, Cm, out, A, Dk, bias, h, he, keep};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) CK(cudaFree(dev[i]));
}

static void run_conv_case(int64_t B, int64_t L, int64_t C, int W, int silu, int resets, int prev) {
    char name[96];
    const char *ver = getenv("DISTILL_CONV_BWD"), *fver = getenv("DISTILL_CONV_FWD");
    snprintf(name, sizeof name, "conv B%lld L%lld C%lld W%d silu%d res%d prev%d%s%s%s%s", (long long)B, (long long)L,
             (long long)C, W, silu, resets, prev, fver ? " fwd " : "", fver ? fver : "", ver ? " bwd " : "",
             ver ? ver : "");
    printf("%s\n", name);
    const int64_t n = B * L * C, np = B * (W - 1) * C;
    const uint64_t seed = gmix64(hs++);
    bf16 *x = dalloc<bf16>(n), *xp = dalloc<bf16>(np), *dout = dalloc<bf16>(n), *out = dalloc<bf16>(n);
    bf16 *dx = dalloc<bf16>(n);
    uint8_t *rs = dalloc<uint8_t>(B * L);
    fill_bf16(x, n, seed + 1, 1, 0, 1), fill_bf16(xp, np, seed + 2, 1, 0, 1), fill_bf16(dout, n, seed + 3, 1, 0, 1);
    fill_u8_kernel<<<256, 256>>>(rs, B * L, seed + 4, 0.1f, L);
    float *w_h = (float *)malloc(C * W * 4), *b_h = (float *)malloc(C * 4);
    for (int64_t i = 0; i < C * W; i++) w_h[i] = (float)(0.5 * hnorm());
    for (int64_t i = 0; i < C; i++) b_h[i] = (float)(0.3 * hnorm());
    float *w = dalloc<float>(C * W), *bias = dalloc<float>(C), *dw = dalloc<float>(C * W), *db = dalloc<float>(C);
    CK(cudaMemcpy(w, w_h, C * W * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bias, b_h, C * 4, cudaMemcpyHostToDevice));
    void *ws = dalloc<char>((int64_t)conv1d_silu_bwd_workspace(B, L, C));
    poison(out, n), poison(dx, n), poison(dw, C * W), poison(db, C);
    char err[256];
    const uint8_t *r = resets ? rs : NULL;
    const uint16_t *xpp = prev ? (uint16_t *)xp : NULL;
    if (conv1d_silu_fwd_cuda(B, L, C, W, (uint16_t *)x, w, bias, r, xpp, silu, (uint16_t *)out, NULL, err, sizeof err) ||
        conv1d_silu_bwd_cuda(B, L, C, W, (uint16_t *)x, w, bias, r, xpp, silu, (uint16_t *)dout, (uint16_t *)dx, dw,
                             db, ws, NULL, err, sizeof err)) {
        printf("  FAIL conv refused: %s\n", err), nfail++;
        return;
    }
    CK(cudaDeviceSynchronize());
    double *x_r = (double *)malloc(n * 8), *xp_r = (double *)malloc((np + 1) * 8), *do_r = (double *)malloc(n * 8);
    double *w_r = (double *)malloc(C * W * 8), *b_r = (double *)malloc(C * 8), *o_r = (double *)malloc(n * 8);
    double *dx_r = (double *)malloc(n * 8), *dw_r = (double *)malloc(C * W * 8), *db_r = (double *)malloc(C * 8);
    uint8_t *rs_h = (uint8_t *)malloc(B * L);
    get_bf(x_r, x, 1, n, 0, n), get_bf(do_r, dout, 1, n, 0, n);
    if (np) get_bf(xp_r, xp, 1, np, 0, np);
    CK(cudaMemcpy(rs_h, rs, B * L, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < C * W; i++) w_r[i] = w_h[i];
    for (int64_t i = 0; i < C; i++) b_r[i] = b_h[i];
    conv1d_silu_fwd_ref64(B, L, C, W, x_r, w_r, b_r, resets ? rs_h : NULL, prev ? xp_r : NULL, silu, o_r);
    conv1d_silu_bwd_ref64(B, L, C, W, x_r, w_r, b_r, resets ? rs_h : NULL, prev ? xp_r : NULL, silu, do_r, dx_r, dw_r,
                          db_r);
    bf16 *tb = (bf16 *)malloc(n * 2);
    float *tf = (float *)malloc(C * W * 4);
    CK(cudaMemcpy(tb, out, n * 2, cudaMemcpyDeviceToHost));
    check(rel_bf(tb, o_r, n), 5e-3, name, "out");
    CK(cudaMemcpy(tb, dx, n * 2, cudaMemcpyDeviceToHost));
    check(rel_bf(tb, dx_r, n), 5e-3, name, "dx");
    CK(cudaMemcpy(tf, dw, C * W * 4, cudaMemcpyDeviceToHost));
    check(rel_f(tf, dw_r, C * W), 5e-5, name, "dw");
    CK(cudaMemcpy(tf, db, C * 4, cudaMemcpyDeviceToHost));
    check(rel_f(tf, db_r, C), 5e-5, name, "dbias");
    free(tb), free(tf), free(x_r), free(xp_r), free(do_r), free(w_r), free(b_r), free(o_r), free(dx_r), free(dw_r);
    free(db_r), free(rs_h), free(w_h), free(b_h);
    void *dev[] = {x, xp, dout, out, dx, rs, w, bias, dw, db, ws};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) CK(cudaFree(dev[i]));
}

int main(int argc, char **argv) {
    // --quick: only the scan cases of at most 2^22 elements, once (for compute-sanitizer runs); --only-huge: only the
    // > 2^31-element case (to put a version selected by the environment through it)
    // --mid: the scan cases of at most 2^25 elements (the > 65535-block and L = 70000 ones included), once (to put a
    // version selected by the environment through them without the variant passes)
    const int quick = argc > 1 && !strcmp(argv[1], "--quick"), only_huge = argc > 1 && !strcmp(argv[1], "--only-huge");
    const int mid = argc > 1 && !strcmp(argv[1], "--mid");
    const int huge = !(argc > 1 && (!strcmp(argv[1], "--no-huge") || quick || mid));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    const GCase cases[] = {
        // name                 B   L      D       N   Gc     Gb    z h0 bias res dhl ext nseg slice
        {"L=1", 2, 1, 64, 16, 4, 1, 1, 1, 1, 1, 1, 0, 1, 0},
        {"L=67, D=96, generic dB", 2, 67, 96, 16, 6, 2, 1, 1, 1, 1, 1, 0, 1, 0},
        {"N=8, fast dB", 3, 300, 128, 8, 16, 4, 1, 1, 1, 1, 1, 0, 1, 0},
        {"N=32", 1, 200, 64, 32, 2, 1, 1, 1, 1, 1, 1, 0, 1, 0},
        {"N=4", 2, 129, 32, 4, 8, 2, 0, 1, 1, 1, 0, 0, 1, 0},
        {"extreme delta, A", 2, 150, 64, 16, 4, 1, 1, 1, 1, 1, 1, 1, 1, 0},
        {"8B grouping, no h0/z", 2, 513, 256, 16, 16, 4, 0, 0, 1, 0, 0, 0, 1, 0},
        {"B groups of 16 channels", 2, 300, 128, 16, 8, 8, 1, 1, 1, 1, 1, 0, 1, 0},
        {"B groups of 32 channels", 3, 131, 192, 16, 12, 6, 1, 0, 1, 1, 0, 0, 1, 0},
        {"segments x4", 1, 1000, 64, 16, 4, 1, 1, 1, 1, 1, 1, 0, 4, 0},
        {"segments auto", 1, 777, 128, 16, 8, 2, 1, 1, 1, 1, 1, 0, 0, 0},
        // B groups of 48/80/128 channels: v11's generic dB mode (per-warp partials, then reduce_dB_kernel); a 48- or
        // 80-channel group straddles two 64-channel blocks. SmolLM2-135M: D 576, 12 B groups of 48. Backward
        // segments (automatic, fixed by the shape): 8, 6, 24, 1, 4, 3 in this order
        {"SmolLM2 Db=48 (v11 generic dB)", 2, 1003, 576, 16, 36, 12, 1, 1, 1, 1, 1, 0, 1, 0},
        {"SmolLM2 Db=48, no z/h0", 3, 333, 576, 16, 36, 12, 0, 0, 1, 1, 0, 0, 1, 0},
        {"SmolLM2 Db=48, B=1 (24 bwd segments)", 1, 1500, 576, 16, 36, 12, 1, 1, 1, 1, 1, 0, 0, 0},
        {"SmolLM2 Db=48, B=16 (no bwd segments)", 16, 130, 576, 16, 36, 12, 1, 1, 1, 1, 1, 0, 1, 0},
        {"Db=80 (v11 generic dB)", 2, 200, 640, 16, 40, 8, 1, 1, 0, 1, 1, 0, 1, 0},
        {"Db=128 (v11 generic dB)", 3, 131, 384, 16, 24, 3, 1, 0, 1, 1, 0, 0, 1, 0},
        {">65535 blocks", 32, 5, 163840, 16, 10240, 2560, 1, 1, 1, 1, 1, 0, 1, 0},
        {"L=70000", 1, 70000, 64, 16, 4, 1, 1, 1, 1, 1, 1, 0, 0, 0},
        {"B*L*D > 2^31 (last 64 ch)", 1, 65600, 32768, 16, 2048, 512, 1, 1, 1, 1, 1, 0, 0, 64},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        if (!huge && cases[i].B * cases[i].L * cases[i].D > (1ll << 31)) continue;
        if (quick && cases[i].B * cases[i].L * cases[i].D > (1ll << 22)) continue;
        if (mid && cases[i].B * cases[i].L * cases[i].D > (1ll << 25)) continue;
        if (only_huge && cases[i].B * cases[i].L * cases[i].D <= (1ll << 31)) continue;
        run_scan_case(&cases[i]);
    }
    if (quick || mid || only_huge) {
        printf("gpu_test_scan: %d passed, %d failed\n", npass, nfail);
        return nfail ? 1 : 0;
    }
    // the selectable versions and options (selective_scan.cu reads these at every call) on the small cases
    const char *variants[][4] = {{"DISTILL_SCAN_BWD", "v13", NULL, NULL},
                                 {"DISTILL_SCAN_BWD", "v13", "DISTILL_SCAN_BWD_NSEG", "3"},
                                 {"DISTILL_SCAN_BWD", "v11", NULL, NULL},
                                 {"DISTILL_SCAN_BWD", "v11", "DISTILL_SCAN_BWD_NSEG", "3"},
                                 {"DISTILL_SCAN_BWD", "v10", NULL, NULL},
                                 {"DISTILL_SCAN_BWD", "v8", NULL, NULL},
                                 {"DISTILL_SCAN_BWD_NSEG", "3", NULL, NULL},
                                 {"DISTILL_SCAN_BWD", "v10", "DISTILL_SCAN_BWD_NSEG", "3"},
                                 {"DISTILL_SCAN_FWD", "v10", NULL, NULL},
                                 {"DISTILL_SCAN_FWD", "v11", NULL, NULL}};
    for (const auto &v : variants) {
        if (getenv(v[0]) || (v[2] && getenv(v[2]))) continue;  // set by the caller: the main loop above already ran it
        setenv(v[0], v[1], 1);
        if (v[2]) setenv(v[2], v[3], 1);
        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
            if (cases[i].B * cases[i].L * cases[i].D > (1ll << 24)) continue;
            GCase c = cases[i];
            char name[160];
            snprintf(name, sizeof name, "%s [%s=%s%s%s%s%s]", c.name, v[0], v[1], v[2] ? " " : "", v[2] ? v[2] : "",
                     v[2] ? "=" : "", v[2] ? v[3] : "");
            c.name = name;
            run_scan_case(&c);
        }
        unsetenv(v[0]);
        if (v[2]) unsetenv(v[2]);
    }
    run_multi_case(5, 4, 64, 16, 4, 1);
    run_multi_case(3, 1, 96, 8, 12, 3);
    run_multi_case(2, 7, 64, 32, 2, 1);
    // conv versions: the defaults (forward and backward v2), both v1 (DISTILL_CONV_FWD/BWD=v1), backward v2c8; C not
    // a multiple of 4 runs v1 anyway
    const char *conv_vers[][2] = {{NULL, NULL}, {"v1", "v1"}, {NULL, "v2c8"}};
    for (const auto &cv : conv_vers) {
        if (cv[0]) setenv("DISTILL_CONV_FWD", cv[0], 1);
        if (cv[1]) setenv("DISTILL_CONV_BWD", cv[1], 1);
        run_conv_case(1, 1, 8, 4, 1, 0, 0);
        run_conv_case(2, 37, 96, 4, 1, 1, 1);
        run_conv_case(3, 50, 65, 4, 1, 1, 0);
        run_conv_case(2, 20, 33, 3, 0, 1, 1);
        run_conv_case(1, 30, 17, 2, 1, 0, 1);
        run_conv_case(2, 600, 136, 4, 1, 1, 1);
        run_conv_case(1, 300, 264, 3, 0, 1, 0);
        run_conv_case(3, 257, 64, 1, 1, 1, 1);
        run_conv_case(2, 513, 40, 2, 1, 0, 1);
        run_conv_case(1, 70000, 16, 4, 1, 1, 0);
        unsetenv("DISTILL_CONV_BWD"), unsetenv("DISTILL_CONV_FWD");
    }
    printf("gpu_test_scan: %d passed, %d failed\n", npass, nfail);
    return nfail ? 1 : 0;
}
