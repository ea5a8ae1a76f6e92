// gpu_bench_ssd.cu: times the CUDA chunked SSD forward and backward at MambaInLlama-8B Mamba-2 shapes (H 32 heads,
// P = N = 128, G = 32 groups: x and B repeated from the 8 KV heads; mambainllama.md §1b) at B x L = 8 x 2048 and
// 1 x 8192, plus a grouped variant (G 8, N 64), and reports each as time and as a fraction of its floor:
//   HBM floor    = the fewest bytes the call must move (bf16 inputs once, outputs once; no intermediate states)
//                  / the copy bandwidth measured here with a copy kernel (bytes read + written per second)
//   tensor floor = the chunked algorithm's matrix FLOPs (Q = 64) / 989 TFLOP/s (H100/H200 dense bf16, nominal)
//   fp32 floor   = the same FLOPs / 67 TFLOP/s (nominal fp32 FMA peak: what these SIMT kernels can reach at best)
//   floor = max(HBM floor, tensor floor); %floor = floor / time.
// Timing: CUDA events around every call, median of `reps` calls after 3 warm-up calls, inputs rotated among 3 sets so
// that no call finds its inputs in L2. Every shape is timed with each kernel generation in VERSIONS (DISTILL_SSD set
// in turn; default "v6,v7": v7 is v6 with the state passes on mma.sync; v6 is v4 with the state loads issued
// earlier; v5 stores the state every 128 tokens), in the same run. "bwd kept" times ssd_bwd_cuda with fwd_states = 1,
// each call right after an (untimed) forward into the same workspace, whose states it reads instead of recomputing
// them. Usage: gpu_bench_ssd [reps [BxL|all [VERSIONS]]]
#include <algorithm>
#include <string>
#include <vector>

#include "kernels/scan/gpu_common.cuh"
#include "kernels/ssd/ssd_cuda.h"

typedef __nv_bfloat16 bf16;
static int REPS = 30;
static const int NSET = 3;

template <typename F>
static double median_ms(F &&call) { return gpu_median_ms(REPS, call); }

// the bandwidth probe: 16-byte loads and stores, grid-stride
__global__ void copy_kernel(const uint4 *__restrict__ src, uint4 *__restrict__ dst, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

struct Set {
    bf16 *x, *dt, *Bm, *Cm, *y, *dy, *dx, *ddt, *dB, *dC;
};

int main(int argc, char **argv) {
    if (argc > 1) REPS = std::max(1, atoi(argv[1]));
    const char *only = argc > 2 && strcmp(argv[2], "all") ? argv[2] : NULL;
    std::vector<std::string> vers;
    {
        std::string list = argc > 3 ? argv[3] : "v6,v7";
        size_t at = 0;
        while (at <= list.size()) {
            const size_t e = std::min(list.find(',', at), list.size());
            if (e > at) vers.push_back(list.substr(at, e - at));
            at = e + 1;
        }
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);

    // copy bandwidth (bytes read + written per second), 2 GiB buffers
    const size_t cbytes = (size_t)2 << 30;
    uint4 *c0, *c1;
    CK(cudaMalloc(&c0, cbytes)), CK(cudaMalloc(&c1, cbytes));
    CK(cudaMemset(c0, 1, cbytes));
    const int64_t n16 = (int64_t)(cbytes / 16);
    const double copy_ms = median_ms([&](int) {
        copy_kernel<<<prop.multiProcessorCount * 8, 512>>>(c0, c1, n16);
    });
    const double bw = 2.0 * cbytes / (copy_ms * 1e-3);
    printf("copy bandwidth: %.3f TB/s (copy kernel, 2 GiB, read + write)\n", bw / 1e12);
    CK(cudaFree(c0)), CK(cudaFree(c1));
    const double tc_rate = 989e12, fp32_rate = 67e12;

    struct Shape {
        int64_t B, L, H, P, N, G;
    };
    const Shape shapes[] = {
        {8, 2048, 32, 128, 128, 32},
        {1, 8192, 32, 128, 128, 32},
        {8, 2048, 32, 128, 64, 8},
    };
    printf("\n%-8s %-16s %-10s %9s %9s %9s %9s %7s %7s\n", "shape", "H/P/N/G", "call", "time ms", "HBM ms", "tc ms",
           "fp32 ms", "%floor", "TB/s");
    for (const Shape &sh : shapes) {
        char shape[32], hpng[32];
        snprintf(shape, sizeof shape, "%lldx%lld", (long long)sh.B, (long long)sh.L);
        snprintf(hpng, sizeof hpng, "%lld/%lld/%lld/%lld", (long long)sh.H, (long long)sh.P, (long long)sh.N,
                 (long long)sh.G);
        if (only && strcmp(only, shape)) continue;
        const SsdShape s = {sh.B, sh.L, sh.H, sh.P, sh.G, sh.N, SSD_CUDA_CHUNK, 1};
        const int64_t rows = sh.B * sh.L, nx = rows * sh.H * sh.P, ndt = rows * sh.H, nB = rows * sh.G * sh.N;
        Set set[NSET];
        for (int k = 0; k < NSET; k++) {
            Set &t = set[k];
            CK(cudaMalloc(&t.x, nx * 2)), CK(cudaMalloc(&t.y, nx * 2)), CK(cudaMalloc(&t.dy, nx * 2));
            CK(cudaMalloc(&t.dx, nx * 2)), CK(cudaMalloc(&t.dt, ndt * 2)), CK(cudaMalloc(&t.ddt, ndt * 2));
            CK(cudaMalloc(&t.Bm, nB * 2)), CK(cudaMalloc(&t.Cm, nB * 2)), CK(cudaMalloc(&t.dB, nB * 2));
            CK(cudaMalloc(&t.dC, nB * 2));
            const uint64_t sd = 1000 * k + 11;
            fill_bf16(t.x, nx, sd + 1, 1, 0.f, 1.f), fill_bf16(t.dy, nx, sd + 2, 1, 0.f, 1.f);
            fill_bf16(t.dt, ndt, sd + 3, 0, -1.f, 1.f);
            fill_bf16(t.Bm, nB, sd + 4, 1, 0.f, 0.1f), fill_bf16(t.Cm, nB, sd + 5, 1, 0.f, 0.1f);
        }
        std::vector<float> hA(sh.H), hD(sh.H, 1.f), hb(sh.H);
        for (int64_t h = 0; h < sh.H; h++) hA[h] = -(1.f + 15.f * gunif(77, h)), hb[h] = -4.f + 3.f * gunif(78, h);
        float *A, *Dk, *bias, *dA, *dD, *ddb;
        CK(cudaMalloc(&A, sh.H * 4)), CK(cudaMalloc(&Dk, sh.H * 4)), CK(cudaMalloc(&bias, sh.H * 4));
        CK(cudaMalloc(&dA, sh.H * 4)), CK(cudaMalloc(&dD, sh.H * 4)), CK(cudaMalloc(&ddb, sh.H * 4));
        CK(cudaMemcpy(A, hA.data(), sh.H * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(Dk, hD.data(), sh.H * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(bias, hb.data(), sh.H * 4, cudaMemcpyHostToDevice));
        const size_t wsz = ssd_bwd_cuda_workspace(&s);
        void *ws;
        CK(cudaMalloc(&ws, wsz));
        char err[256];
        auto fwd = [&](int i) {
            Set &t = set[i % NSET];
            if (ssd_fwd_cuda(&s, (uint16_t *)t.x, (uint16_t *)t.dt, A, (uint16_t *)t.Bm, (uint16_t *)t.Cm, Dk, bias,
                             NULL, NULL, (uint16_t *)t.y, NULL, ws, NULL, err, sizeof err)) {
                fprintf(stderr, "forward: %s\n", err);
                exit(1);
            }
        };
        // kept: the forward's states, left in ws by fwd(i), are read instead of recomputed (fwd_states = 1)
        auto bwd_as = [&](int i, int kept) {
            Set &t = set[i % NSET];
            if (ssd_bwd_cuda(&s, (uint16_t *)t.x, (uint16_t *)t.dt, A, (uint16_t *)t.Bm, (uint16_t *)t.Cm, Dk, bias,
                             NULL, NULL, (uint16_t *)t.dy, NULL, (uint16_t *)t.dx, (uint16_t *)t.ddt, dA,
                             (uint16_t *)t.dB, (uint16_t *)t.dC, dD, ddb, NULL, ws, kept, NULL, err, sizeof err)) {
                fprintf(stderr, "backward%s: %s\n", kept ? " (states kept)" : "", err);
                exit(1);
            }
        };
        auto bwd = [&](int i) { bwd_as(i, 0); };
        auto bwd_kept = [&](int i) { bwd_as(i, 1); };
        // median time of bwd_kept(i), each after an untimed fwd(i) into the same workspace
        auto kept_median_ms = [&]() {
            cudaEvent_t e0, e1;
            CK(cudaEventCreate(&e0)), CK(cudaEventCreate(&e1));
            for (int i = 0; i < 3; i++) fwd(i), bwd_kept(i);
            CK(cudaDeviceSynchronize());
            std::vector<float> ts(REPS);
            for (int i = 0; i < REPS; i++) {
                fwd(i);
                CK(cudaEventRecord(e0));
                bwd_kept(i);
                CK(cudaEventRecord(e1));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ts[i], e0, e1));
            }
            CK(cudaEventDestroy(e0)), CK(cudaEventDestroy(e1));
            std::sort(ts.begin(), ts.end());
            return (double)ts[REPS / 2];
        };
        // bytes: fwd x, dt, B, C in, y out; bwd x, dt, B, C, dy in, dx, ddt, dB, dC out
        const double HP = (double)sh.H * sh.P, GN = (double)sh.G * sh.N, Q = SSD_CUDA_CHUNK;
        const double fbytes = rows * (2 * HP * 2 + sh.H * 2.0 + 2 * GN * 2);
        const double bbytes = rows * (4 * HP * 2 + 2 * sh.H * 2.0 + 4 * GN * 2);
        // matrix FLOPs per (b, h, chunk): fwd C.B^T, W x, C S, state update; bwd C.B^T, dy x^T, B dS^T, W^T dy,
        // x dS, V^T C, dy S0, V B and the two sequential passes (state, state gradient)
        const double chunks = (double)sh.B * sh.H * ((sh.L + SSD_CUDA_CHUNK - 1) / SSD_CUDA_CHUNK);
        const double P = (double)sh.P, N = (double)sh.N;
        const double fflops = chunks * 2 * (Q * Q * N + Q * Q * P + 2 * Q * P * N);
        const double bflops = chunks * 2 * (3 * Q * Q * N + 2 * Q * Q * P + 5 * Q * P * N);
        auto row = [&](const char *ver, const char *k, double ms, double bytes, double flops) {
            const double hbm = bytes / bw * 1e3, tc = flops / tc_rate * 1e3, f32 = flops / fp32_rate * 1e3;
            const double fl = std::max(hbm, tc);
            char call[24];
            snprintf(call, sizeof call, "%s %s", ver, k);
            printf("%-8s %-16s %-10s %9.3f %9.3f %9.3f %9.3f %6.1f%% %7.2f\n", shape, hpng, call, ms, hbm, tc, f32,
                   100 * fl / ms, bytes / (ms * 1e-3) / 1e12);
            printf("RESULT kernel=ssd_%s version=%s shape=%s H=%lld P=%lld N=%lld G=%lld ms=%.4f floor_ms=%.4f "
                   "hbm_floor_ms=%.4f tc_floor_ms=%.4f fp32_floor_ms=%.4f frac_floor=%.4f copy_TBps=%.3f device=\"%s\"\n",
                   k, ver, shape, (long long)sh.H, (long long)sh.P, (long long)sh.N, (long long)sh.G, ms, fl, hbm, tc,
                   f32, fl / ms, bw / 1e12, prop.name);
            fflush(stdout);
        };
        // mamba_ssm's Triton SSD (mamba_chunk_scan_combined, chunk 256) on an H100, as quoted in issue #10
        const double ref = sh.N == 128 && sh.G == 32 ? (sh.B == 8 && sh.L == 2048 ? 7.17 : sh.B == 1 && sh.L == 8192 ? 4.75 : 0)
                                                     : 0;
        std::vector<double> tot;
        for (const std::string &ver : vers) {
            setenv("DISTILL_SSD", ver.c_str(), 1);
            const double fms = median_ms(fwd), bms = median_ms(bwd);
            const bool old = ver == "v1" || ver == "v2" || ver == "v3";  // no kept states
            const double kms = old ? 0 : kept_median_ms();
            row(ver.c_str(), "fwd", fms, fbytes, fflops);
            row(ver.c_str(), "bwd", bms, bbytes, bflops);
            if (!old) row(ver.c_str(), "bwdkept", kms, bbytes, bflops);
            tot.push_back(fms + bms);
            if (ref > 0)
                printf("%-8s %-16s %s fwd+bwd %.3f ms; mamba_ssm Triton (H100, issue #10) %.2f ms: %.2fx (goal >= 3x)\n",
                       shape, hpng, ver.c_str(), fms + bms, ref, ref / (fms + bms));
            if (ref > 0 && !old)
                printf("%-8s %-16s %s fwd+bwd, states kept %.3f ms: %.2fx\n", shape, hpng, ver.c_str(), fms + kms,
                       ref / (fms + kms));
        }
        for (size_t i = 1; i < vers.size(); i++)
            printf("%-8s %-16s fwd+bwd %s / %s = %.3f\n", shape, hpng, vers[i].c_str(), vers[0].c_str(), tot[i] / tot[0]);
        for (int k = 0; k < NSET; k++) {
            void *ps[] = {set[k].x, set[k].y, set[k].dy, set[k].dx, set[k].dt, set[k].ddt, set[k].Bm, set[k].Cm,
                          set[k].dB, set[k].dC};
            for (void *p : ps) CK(cudaFree(p));
        }
        void *ps[] = {A, Dk, bias, dA, dD, ddb, ws};
        for (void *p : ps) CK(cudaFree(p));
    }
    printf("\nHBM floor: bf16 inputs read once and outputs written once (the backward's fp32 state workspace, ~2 x 4 B\n"
           "per (b, h, chunk, p, n), is not in the floor). tc: matrix FLOPs at 989 TFLOP/s; fp32: at 67 TFLOP/s.\n");
    return 0;
}
