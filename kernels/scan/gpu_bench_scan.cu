// gpu_bench_scan.cu: times the selective-scan forward/backward, the conv1d and the decode steps at
// MambaInLlama-8B shapes (D = 4096, N = 16, C in 256 groups, B in 64 groups repeated x4), and the scan at the
// SmolLM2-135M demo's training shape (shape "smol16x1024": B 16, L 1024, D 576, C in 36 groups, B in 12 groups of
// 48 channels), and reports each as time, as a fraction of its memory floor (the fewest bytes it must move over a
// device-to-device copy bandwidth measured in the same run) and against mamba_ssm's times on an H100 (issue 6).
// Timing: CUDA events around every call, median of many calls after warm-up, inputs rotated among 3 sets so
// that no call finds its inputs in L2. Usage: gpu_bench_scan [reps [BxL|all [fwd]]] (BxL: only that shape, e.g. for
// ncu; fwd: only the forward rows)
#include <algorithm>
#include <vector>

#include "kernels/scan/gpu_common.cuh"
#include "kernels/scan/selective_scan_cuda.h"

typedef __nv_bfloat16 bf16;
static int REPS = 30;
static const int NSET = 3;

template <typename F>
static double median_ms(F &&call) { return gpu_median_ms(REPS, call); }

struct Set {
    bf16 *u, *dt, *z, *Bm, *Cm, *out, *dout, *du, *ddt, *dz, *dB, *dC;
    float *ckpt;
};

int main(int argc, char **argv) {
    if (argc > 1) REPS = atoi(argv[1]);
    const char *only = argc > 2 && strcmp(argv[2], "all") ? argv[2] : NULL;
    const bool fwd_only = argc > 3 && !strcmp(argv[3], "fwd");
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    int clk_khz = 0;
    cudaDeviceGetAttribute(&clk_khz, cudaDevAttrClockRate, 0);
    const double clk = clk_khz > 0 ? clk_khz * 1e3 : 1.98e9;
    const int sms = prop.multiProcessorCount;
    printf("device: %s, %d SMs, L2 %d MB, max SM clock %.2f GHz\n", prop.name, sms, prop.l2CacheSize >> 20, clk / 1e9);

    // copy bandwidth: bytes read + written per second of a large device-to-device copy
    const size_t cbytes = (size_t)2 << 30;
    char *c0, *c1;
    CK(cudaMalloc(&c0, cbytes)), CK(cudaMalloc(&c1, cbytes));
    CK(cudaMemset(c0, 1, cbytes));
    const double copy_ms = median_ms([&](int) { CK(cudaMemcpyAsync(c1, c0, cbytes, cudaMemcpyDeviceToDevice)); });
    const double bw = 2.0 * cbytes / (copy_ms * 1e-3);
    printf("copy bandwidth: %.3f TB/s (2 GiB device-to-device, read + write)\n", bw / 1e12);
    CK(cudaFree(c0)), CK(cudaFree(c1));
    // MUFU rate: 16 ex2 per clock per SM (sm_90)
    const double ex2_rate = 16.0 * sms * clk;

    struct BenchShape {
        const char *tag;
        int64_t B, L, D, Gc, Gb;
    };
    std::vector<BenchShape> shapes;
    for (int64_t L : {2048, 8192})
        for (int64_t B : {1, 2, 4, 8}) shapes.push_back({"", B, L, 4096, 256, 64});
    shapes.push_back({"smol", 16, 1024, 576, 36, 12});  // SmolLM2-135M's Mamba layers (d_inner 576, d_xb 192)
    const int64_t N = 16;
    printf("\n%-10s %-9s %9s %9s %9s %7s %7s %9s %9s\n", "shape", "kernel", "time ms", "floor ms", "ex2 ms",
           "%floor", "TB/s", "mamba ms", "speedup");
    std::vector<char> lines;
    for (const BenchShape &bs : shapes) {
        const int64_t B = bs.B, L = bs.L, D = bs.D, Gc = bs.Gc, Gb = bs.Gb;
        const bool is8b = D == 4096 && Gc == 256 && Gb == 64;
        char shape[32];
        snprintf(shape, sizeof shape, "%s%lldx%lld", bs.tag, (long long)B, (long long)L);
        if (only && strcmp(only, shape)) continue;
        ScanShape s = {B, L, D, N, Gc, Gb};
        const int64_t rows = B * L, nx = rows * D, nB = rows * Gb * N, nC = rows * Gc * N;
        Set set[NSET];
        // DISTILL_SCAN_BWD=v13 makes the forward store the state every 8 steps (8x the checkpoint elements)
        const size_t ck12 = selective_scan_ckpt_elems(&s);
        setenv("DISTILL_SCAN_BWD", "v13", 1);
        const size_t ck13 = std::max(ck12, selective_scan_ckpt_elems(&s));
        unsetenv("DISTILL_SCAN_BWD");
        for (int k = 0; k < NSET; k++) {
            bf16 **bfs[] = {&set[k].u, &set[k].dt, &set[k].z, &set[k].out, &set[k].dout, &set[k].du, &set[k].ddt, &set[k].dz};
            for (auto p : bfs) CK(cudaMalloc(p, nx * 2));
            CK(cudaMalloc(&set[k].Bm, nB * 2)), CK(cudaMalloc(&set[k].dB, nB * 2));
            CK(cudaMalloc(&set[k].Cm, nC * 2)), CK(cudaMalloc(&set[k].dC, nC * 2));
            CK(cudaMalloc(&set[k].ckpt, ck13 * 4));  // room for v13's checkpoints every 8 steps
            const uint64_t sd = 1000 * k + 7;
            fill_bf16(set[k].u, nx, sd + 1, 1, 0, 1), fill_bf16(set[k].dt, nx, sd + 2, 0, -6, -1);
            fill_bf16(set[k].z, nx, sd + 3, 1, 0, 1.5f), fill_bf16(set[k].dout, nx, sd + 4, 1, 0, 1);
            fill_bf16(set[k].Bm, nB, sd + 5, 1, 0, 1), fill_bf16(set[k].Cm, nC, sd + 6, 1, 0, 1);
        }
        std::vector<float> hA(D * N), hD(D), hb(D);
        for (int64_t i = 0; i < D * N; i++) hA[i] = -(float)(1 + (i % N));  // S4D-real init
        for (int64_t i = 0; i < D; i++) hD[i] = 1.f, hb[i] = -4.f + 3.f * gunif(99, i);
        float *A, *Dk, *bias, *dA, *dD, *ddb;
        CK(cudaMalloc(&A, D * N * 4)), CK(cudaMalloc(&Dk, D * 4)), CK(cudaMalloc(&bias, D * 4));
        CK(cudaMalloc(&dA, D * N * 4)), CK(cudaMalloc(&dD, D * 4)), CK(cudaMalloc(&ddb, D * 4));
        CK(cudaMemcpy(A, hA.data(), D * N * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(Dk, hD.data(), D * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(bias, hb.data(), D * 4, cudaMemcpyHostToDevice));
        size_t fws = 0;
        for (int ns = 1; ns <= 64; ns *= 2) fws = std::max(fws, selective_scan_fwd_workspace(&s, ns));
        fws = std::max(fws, selective_scan_fwd_workspace(&s, 0));
        void *fw = NULL, *bwsp = NULL;
        if (fws) CK(cudaMalloc(&fw, fws));
        // the backward workspace depends on the segment count, which DISTILL_SCAN_BWD_NSEG forces below: size it
        // for the largest of the settings used
        size_t bws = selective_scan_bwd_workspace(&s);
        for (const char *ns : {"1", "2", "4", "8"}) {
            setenv("DISTILL_SCAN_BWD_NSEG", ns, 1);
            bws = std::max(bws, selective_scan_bwd_workspace(&s));
        }
        unsetenv("DISTILL_SCAN_BWD_NSEG");
        CK(cudaMalloc(&bwsp, bws));
        auto release = [&]() {
            for (int k = 0; k < NSET; k++) {
                void *ps[] = {set[k].u, set[k].dt, set[k].z, set[k].out, set[k].dout, set[k].du, set[k].ddt, set[k].dz,
                              set[k].Bm, set[k].dB, set[k].Cm, set[k].dC, set[k].ckpt};
                for (void *q : ps) CK(cudaFree(q));
            }
            void *ps[] = {A, Dk, bias, dA, dD, ddb, fw, bwsp};
            for (void *q : ps)
                if (q) CK(cudaFree(q));
        };
        char err[256];
        auto fwd = [&](int i, int nseg, bool train) {
            Set &x = set[i % NSET];
            if (selective_scan_fwd_cuda(&s, (uint16_t *)x.u, (uint16_t *)x.dt, A, (uint16_t *)x.Bm, (uint16_t *)x.Cm,
                                        Dk, (uint16_t *)x.z, bias, NULL, NULL, (uint16_t *)x.out, NULL,
                                        train ? x.ckpt : NULL, nseg, fw, NULL, err, sizeof err)) {
                fprintf(stderr, "forward: %s\n", err);
                exit(1);
            }
        };
        auto bwd = [&](int i) {
            Set &x = set[i % NSET];
            if (selective_scan_bwd_cuda(&s, (uint16_t *)x.u, (uint16_t *)x.dt, A, (uint16_t *)x.Bm, (uint16_t *)x.Cm,
                                        Dk, (uint16_t *)x.z, bias, NULL, NULL, x.ckpt, (uint16_t *)x.dout, NULL,
                                        (uint16_t *)x.du, (uint16_t *)x.ddt, dA, (uint16_t *)x.dB, (uint16_t *)x.dC,
                                        dD, (uint16_t *)x.dz, ddb, NULL, bwsp, NULL, err, sizeof err)) {
                fprintf(stderr, "backward: %s\n", err);
                exit(1);
            }
        };
        for (int k = 0; k < NSET; k++) fwd(k, 0, true);  // checkpoints for the backward
        CK(cudaDeviceSynchronize());
        const double ckb = (double)ck12 * 4, ckb13 = (double)ck13 * 4;
        const double fbytes = rows * (D * 8.0 + (Gb + Gc) * N * 2.0);           // u dt z in, out; B, C
        const double bbytes = rows * (D * 14.0 + (Gb + Gc) * N * 4.0) + ckb;   // + grads, + checkpoints
        const double ex2_f = (double)nx * N / ex2_rate, ex2_b = 2 * ex2_f;
        double mamba_f = 0, mamba_b = 0;
        if (is8b && B == 8 && L == 2048) mamba_f = 1.33, mamba_b = 5.36;
        if (is8b && B == 1 && L == 8192) mamba_f = 0.75, mamba_b = 2.81;
        auto row = [&](const char *k, double ms, double bytes, double ex2, double mamba) {
            const double floor_ms = bytes / bw * 1e3;
            printf("%-10s %-9s %9.3f %9.3f %9.3f %6.0f%% %7.2f", shape, k, ms, floor_ms, ex2 * 1e3,
                   100 * floor_ms / ms, bytes / (ms * 1e-3) / 1e12);
            if (mamba > 0) printf(" %9.2f %8.2fx", mamba, mamba / ms);
            printf("\n");
            fflush(stdout);
        };
        // forward, training (writes checkpoints), automatic segments
        row("fwd", median_ms([&](int i) { fwd(i, 0, true); }), fbytes + ckb, ex2_f, mamba_f);
        row("fwd-inf", median_ms([&](int i) { fwd(i, 0, false); }), fbytes, ex2_f, 0);
        for (int ns = 1; ns <= (B <= 2 ? 16 : 2); ns *= 2) {
                char k[16];
                snprintf(k, sizeof k, "fwd-s%d", ns);
            row(k, median_ms([&](int i) { fwd(i, ns, true); }), fbytes + ckb, ex2_f, 0);
        }
        // the previous forward (DISTILL_SCAN_FWD=v10: 16-step tiles, 3 in flight), training and inference
        setenv("DISTILL_SCAN_FWD", "v10", 1);
        row("fwd-v10", median_ms([&](int i) { fwd(i, 0, true); }), fbytes + ckb, ex2_f, mamba_f);
        row("fwd-v10-inf", median_ms([&](int i) { fwd(i, 0, false); }), fbytes, ex2_f, 0);
        unsetenv("DISTILL_SCAN_FWD");
        // the forward as backward v13 needs it (checkpoints every 8 steps; v11 writes them)
        setenv("DISTILL_SCAN_BWD", "v13", 1);
        row("fwd-ck8", median_ms([&](int i) { fwd(i, 0, true); }), fbytes + ckb13, ex2_f, mamba_f);
        unsetenv("DISTILL_SCAN_BWD");
        // the previous default (DISTILL_SCAN_FWD=v11: v14's tiles with per-pair branches and 2-byte output stores)
        setenv("DISTILL_SCAN_FWD", "v11", 1);
        row("fwd-v11", median_ms([&](int i) { fwd(i, 0, true); }), fbytes + ckb, ex2_f, mamba_f);
        row("fwd-v11-inf", median_ms([&](int i) { fwd(i, 0, false); }), fbytes, ex2_f, 0);
        unsetenv("DISTILL_SCAN_FWD");
        // the default again (fwd-b), to bound the drift between the first rows and these
        row("fwd-b", median_ms([&](int i) { fwd(i, 0, true); }), fbytes + ckb, ex2_f, mamba_f);
        if (fwd_only) {
            release();
            continue;
        }
        for (int k = 0; k < NSET; k++) fwd(k, 0, true);
        // backward: the default (v12), then each selectable version (DISTILL_SCAN_BWD: v11, v12, v10, v13) and, at small
        // batch, forced segment counts of v11, v12 and v13 (v13 after forwards that store its 8-step checkpoints), and v12
        // again last (bwd-v12b); every row in the same run, so that they compare
        row("bwd", median_ms([&](int i) { bwd(i); }), bbytes, ex2_b, mamba_b);
        // (forced segments: at batch <= 2 of the 8B shapes, and at the SmolLM2 shape, which gets 3 automatically)
        const char *envs[][3] = {{"v11", NULL, "bwd-v11"},    {"v12", NULL, "bwd-v12"},    {"v10", NULL, "bwd-v10"},
                                 {"v11", "1", "bwd-v11-s1"}, {"v11", "2", "bwd-v11-s2"}, {"v11", "4", "bwd-v11-s4"},
                                 {"v11", "8", "bwd-v11-s8"}, {"v12", "1", "bwd-v12-s1"}, {"v12", "2", "bwd-v12-s2"},
                                 {"v12", "4", "bwd-v12-s4"}, {"v12", "8", "bwd-v12-s8"},
                                 {"v13", NULL, "bwd-v13"},   {"v13", "2", "bwd-v13-s2"}, {"v13", "4", "bwd-v13-s4"},
                                 {"v13", "8", "bwd-v13-s8"}, {"v12", NULL, "bwd-v12b"}};
        bool dense = false;  // the sets' checkpoints are v13's (every 8 steps)
        for (const auto &e : envs) {
            if (e[1] && is8b && (B > 2 || !strcmp(e[1], "1"))) continue;
            setenv("DISTILL_SCAN_BWD", e[0], 1);
            const bool v13 = !strcmp(e[0], "v13");
            if (v13 != dense) {  // re-run the forwards with the checkpoints this version reads
                for (int k = 0; k < NSET; k++) fwd(k, 0, true);
                CK(cudaDeviceSynchronize());
                dense = v13;
            }
            if (e[1]) setenv("DISTILL_SCAN_BWD_NSEG", e[1], 1);
            row(e[2], median_ms([&](int i) { bwd(i); }), bbytes + (v13 ? ckb13 - ckb : 0), ex2_b, e[1] ? 0 : mamba_b);
            unsetenv("DISTILL_SCAN_BWD"), unsetenv("DISTILL_SCAN_BWD_NSEG");
        }
        if (is8b && B == 8 && L == 2048) {
            // conv1d at the same shape: x [B,L,D] -> out; backward x, dout -> dx
            float *w, *cb, *dw, *dcb;
            CK(cudaMalloc(&w, D * 4 * 4)), CK(cudaMalloc(&cb, D * 4)), CK(cudaMalloc(&dw, D * 4 * 4));
            CK(cudaMalloc(&dcb, D * 4));
            CK(cudaMemset(w, 0, D * 16)), CK(cudaMemset(cb, 0, D * 4));
            void *cws;
            CK(cudaMalloc(&cws, conv1d_silu_bwd_workspace(B, L, D)));
            for (const char *fv : {(const char *)NULL, "v1"}) {
                if (fv) setenv("DISTILL_CONV_FWD", fv, 1);
                row(fv ? "conv-fwd-v1" : "conv-fwd", median_ms([&](int i) {
                        Set &x = set[i % NSET];
                        conv1d_silu_fwd_cuda(B, L, D, 4, (uint16_t *)x.u, w, cb, NULL, NULL, 1, (uint16_t *)x.out,
                                             NULL, err, sizeof err);
                    }), nx * 4.0, 0, 0);
                unsetenv("DISTILL_CONV_FWD");
            }
            // backward: the default and each version of DISTILL_CONV_BWD
            const char *cvs[][2] = {{NULL, "conv-bwd"}, {"v1", "conv-bwd-v1"}, {"v2c8", "conv-bwd-v2c8"}};
            for (const auto &cv : cvs) {
                if (cv[0]) setenv("DISTILL_CONV_BWD", cv[0], 1);
                row(cv[1], median_ms([&](int i) {
                        Set &x = set[i % NSET];
                        conv1d_silu_bwd_cuda(B, L, D, 4, (uint16_t *)x.u, w, cb, NULL, NULL, 1,
                                             (uint16_t *)x.dout, (uint16_t *)x.du, dw, dcb, cws, NULL, err,
                                             sizeof err);
                    }), nx * 6.0, 0, 0);
                unsetenv("DISTILL_CONV_BWD");
            }
            CK(cudaFree(w)), CK(cudaFree(cb)), CK(cudaFree(dw)), CK(cudaFree(dcb)), CK(cudaFree(cws));
            // decode: K tokens per row from a cached fp32 state [B, D, N]
            float *h, *hk;
            CK(cudaMalloc(&h, B * D * N * 4)), CK(cudaMalloc(&hk, B * D * N * 4));
            CK(cudaMemset(h, 0, B * D * N * 4));
            for (int K : {1, 4, 8}) {
                ScanShape sk = {B, K, D, N, Gc, Gb};
                char k[16];
                snprintf(k, sizeof k, "decode-K%d", K);
                const double bytes = B * D * N * 4.0 * 2 + B * K * (D * 8.0 + (Gb + Gc) * N * 2.0);
                row(k, median_ms([&](int i) {
                        Set &x = set[i % NSET];
                        selective_scan_multi_cuda(&sk, (uint16_t *)x.u, (uint16_t *)x.dt, A, (uint16_t *)x.Bm,
                                                  (uint16_t *)x.Cm, Dk, (uint16_t *)x.z, bias, h, NULL,
                                                  (uint16_t *)x.out, hk, NULL, NULL, err, sizeof err);
                    }), bytes, 0, 0);
            }
            CK(cudaFree(h)), CK(cudaFree(hk));
        }
        release();
    }
    printf("\nfloor = minimum bytes / copy bandwidth (fwd: u, dt, z, B, C in, out [+ fp32 checkpoints]; bwd: u, dt, z,\n"
           "dout, B, C, checkpoints in; du, ddt, dz, dB, dC out). ex2 = one exp2 per state and step (bwd: two) at 16/clk/SM.\n");
    return 0;
}
