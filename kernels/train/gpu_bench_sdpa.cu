// gpu_bench_sdpa.cu: causal GQA attention forward and backward, cuDNN's fused flash attention
// (attention_cudnn.h: deterministic dP-workspace backward and the dQ-atomics one) against the hand-written
// mma.sync kernels (attention_fwd_cuda / attention_bwd_cuda), at Llama-3-8B shapes by default
// (B 2, T 2048, 32/8 heads of 128, bf16), without and with document masks (documents of --doc tokens).
// Each figure is the median of --reps timed runs (CUDA events) after warm-up. FLOPs count the two
// matmuls over the causal half (4·B·H·D·T(T+1)/2; backward 2.5x), as gpu_bench_train does, and the
// floor is that count at the measured bf16 GEMM rate (an 8192^3 product through cuBLASLt). With documents
// the same causal count is used (the hand-written kernel skips other documents' keys; cuDNN masks them
// with a bias), so that row reads as causal-equivalent throughput.
// Usage: gpu_bench_sdpa [--B 2] [--T 2048] [--H 32] [--G 8] [--D 128] [--doc 512] [--reps 20]
#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

#include "kernels/scan/gpu_common.cuh"
#include "kernels/train/attention_cudnn.h"
#include "kernels/train/train_cuda.h"

#define _Noreturn [[noreturn]]  // C11 keyword in distill/common.h
extern "C" {
#include "distill/layers_cpu.h"
}

typedef __nv_bfloat16 bf16;
static char err[1024];
static int reps = 20;
static double mm_tflops = 0;

static void need(int rc, const char *what) {
    if (rc) {
        fprintf(stderr, "%s failed: %s\n", what, err);
        exit(1);
    }
}
static double time_ms(const std::function<void()> &fn) { return gpu_median_ms(reps, [&](int) { fn(); }); }
static bf16 *rbf(int64_t n, uint64_t seed) {
    bf16 *p;
    CK(cudaMalloc(&p, (size_t)n * 2));
    fill_bf16(p, n, seed, 1, 0.f, 1.f);
    return p;
}
static void row(const char *name, double ms, double flops) {
    const double floor_ms = flops / (mm_tflops * 1e12) * 1e3;
    printf("  %-46s %9.3f ms  floor %8.3f ms  %5.1f%% of floor  %7.1f TFLOP/s\n", name, ms, floor_ms, 100 * floor_ms / ms,
           flops / ms / 1e9);
}

int main(int argc, char **argv) {
    int64_t B = 2, T = 2048, doc = 512;
    int H = 32, G = 8, D = 128;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--B")) B = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--T")) T = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--H")) H = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--G")) G = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--D")) D = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--doc")) doc = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    // ceiling: a bf16 8192^3 GEMM through the training backend's cuBLASLt wrapper
    {
        DlGemm *g = dl_gemm_new(0, err, sizeof err);
        if (!g) need(-1, "dl_gemm_new");
        const int M = 8192;
        bf16 *a = rbf((int64_t)M * M, 1), *b = rbf((int64_t)M * M, 2), *c = rbf((int64_t)M * M, 3);
        const double ms = time_ms([&] {
            need(dl_gemm(g, M, M, M, DT_BF16, a, 0, b, 1, DT_BF16, c, NULL, 1.f, 0.f, NULL, err, sizeof err), "gemm");
        });
        mm_tflops = 2.0 * M * M * (double)M / ms / 1e9;
        for (bf16 *p : {a, b, c}) CK(cudaFree(p));
        dl_gemm_free(g);
    }
    const auto t0 = std::chrono::steady_clock::now();
    SdpaCudnn *sd = sdpa_cudnn_new(1, err, sizeof err);
    if (!sd) need(-1, "sdpa_cudnn_new");
    SdpaCudnn *sn = sdpa_cudnn_new(0, err, sizeof err);
    if (!sn) need(-1, "sdpa_cudnn_new (dQ atomics)");
    const double t_new = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("%s, cuDNN %ld; bf16 GEMM 8192^3 %.1f TFLOP/s; two handles with self-check plans in %.2f s\n", prop.name,
           sdpa_cudnn_version(sd), mm_tflops, t_new);
    printf("attention: B %lld, T %lld, heads %d/%d, hd %d, causal, bf16\n", (long long)B, (long long)T, H, G, D);

    const int64_t N = B * T;
    bf16 *q = rbf(N * H * D, 11), *k = rbf(N * G * D, 12), *v = rbf(N * G * D, 13), *dO = rbf(N * H * D, 14);
    bf16 *o = rbf(N * H * D, 15), *dq = rbf(N * H * D, 16), *dk = rbf(N * G * D, 17), *dv = rbf(N * G * D, 18);
    float *lse;
    CK(cudaMalloc(&lse, (size_t)(B * H * T) * 4));
    void *ws;
    CK(cudaMalloc(&ws, attention_bwd_workspace(B, T, H)));
    std::vector<uint8_t> reset((size_t)N, 0);
    for (int64_t i = 0; i < N; i += doc > 0 ? doc : N) reset[(size_t)i] = 1;
    std::vector<int32_t> ds((size_t)N);
    doc_positions(B, T, reset.data(), NULL, ds.data());
    int32_t *dds;
    CK(cudaMalloc(&dds, (size_t)N * 4));
    CK(cudaMemcpy(dds, ds.data(), (size_t)N * 4, cudaMemcpyHostToDevice));

    const double fl = 4.0 * B * H * D * (double)T * (T + 1) / 2;
    for (int docs = 0; docs < 2; docs++) {
        const int32_t *dsp = docs ? dds : NULL;
        if (docs) printf("with documents of %lld tokens (causal-equivalent FLOPs):\n", (long long)doc);
        // plan build cost of this shape (first call), then steady state
        double build[3];
        for (int i = 0; i < 3; i++) {
            const auto b0 = std::chrono::steady_clock::now();
            if (i == 0) need(sdpa_cudnn_prepare(sd, 0, DT_BF16, B, T, H, G, D, 1, docs, err, sizeof err), "prepare fwd");
            if (i == 1) need(sdpa_cudnn_prepare(sd, 1, DT_BF16, B, T, H, G, D, 1, docs, err, sizeof err), "prepare bwd");
            if (i == 2) need(sdpa_cudnn_prepare(sn, 1, DT_BF16, B, T, H, G, D, 1, docs, err, sizeof err), "prepare bwd atomics");
            build[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - b0).count();
        }
        int64_t ef, wf, eb, wb, ea, wa;
        sdpa_cudnn_plan_info(sd, 0, DT_BF16, B, T, H, G, D, 1, docs, &ef, &wf);
        sdpa_cudnn_plan_info(sd, 1, DT_BF16, B, T, H, G, D, 1, docs, &eb, &wb);
        sdpa_cudnn_plan_info(sn, 1, DT_BF16, B, T, H, G, D, 1, docs, &ea, &wa);
        printf("  plans: fwd engine %lld (workspace %.1f MiB, built in %.2f s), bwd engine %lld (%.1f MiB, %.2f s), "
               "bwd dQ-atomics engine %lld (%.1f MiB, %.2f s)\n",
               (long long)ef, wf / 1048576.0, build[0], (long long)eb, wb / 1048576.0, build[1], (long long)ea, wa / 1048576.0,
               build[2]);
        double ms = time_ms([&] {
            need(attention_fwd_cuda(DT_BF16, B, T, H, G, D, q, k, v, dsp, o, lse, NULL, err, sizeof err), "hand-written fwd");
        });
        row("fwd hand-written (mma.sync)", ms, fl);
        ms = time_ms([&] { need(sdpa_cudnn_fwd(sd, DT_BF16, B, T, H, G, D, 1, q, k, v, dsp, o, lse, NULL, err, sizeof err), "cuDNN fwd"); });
        row(docs ? "fwd cuDNN (document bias)" : "fwd cuDNN", ms, fl);
        ms = time_ms([&] {
            need(attention_bwd_cuda(DT_BF16, B, T, H, G, D, q, k, v, dsp, o, lse, dO, dq, dk, dv, ws, NULL, err, sizeof err),
                 "hand-written bwd");
        });
        row("bwd hand-written (mma.sync; 2.5x fwd FLOPs)", ms, 2.5 * fl);
        ms = time_ms([&] {
            need(sdpa_cudnn_bwd(sd, DT_BF16, B, T, H, G, D, 1, q, k, v, dsp, o, lse, dO, dq, dk, dv, NULL, err, sizeof err),
                 "cuDNN bwd");
        });
        row("bwd cuDNN deterministic", ms, 2.5 * fl);
        ms = time_ms([&] {
            need(sdpa_cudnn_bwd(sn, DT_BF16, B, T, H, G, D, 1, q, k, v, dsp, o, lse, dO, dq, dk, dv, NULL, err, sizeof err),
                 "cuDNN bwd atomics");
        });
        row("bwd cuDNN dQ atomics (non-deterministic)", ms, 2.5 * fl);
    }
    for (void *p : {(void *)q, (void *)k, (void *)v, (void *)dO, (void *)o, (void *)dq, (void *)dk, (void *)dv, (void *)lse, ws,
                    (void *)dds})
        CK(cudaFree(p));
    sdpa_cudnn_free(sn);
    sdpa_cudnn_free(sd);
    return 0;
}
