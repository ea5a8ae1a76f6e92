// gpu_bench_loss.cu: the loss over the vocabulary (loss_rows_cuda, kernels/train/loss.cu) against its memory
// floor, for both kernels (cluster: the row read once into shared memory; block: one block per row streaming it
// two or three times), at the engine's loss chunks (rows of logits per call). bf16 logits, random N(0, 2).
// Floor: the bytes the loss must move at the measured device-to-device copy bandwidth: the student row and the
// teacher row read once (2 + 2 bytes per element) and dlogits written once (2 bytes), i.e. 6 bytes per
// element with a teacher and 4 without. Each figure is the median of --reps runs (CUDA events) after warm-up.
//   gpu_bench_loss [--reps N] [--V vocab] [--rows n1,n2,...]   (defaults: 20, 128256, 130,1024,4096)
// Prints one RESULT_LOSS line per (rows, case, kernel).
#include <vector>

#include "kernels/scan/gpu_common.cuh"
#include "kernels/train/train_cuda.h"

typedef __nv_bfloat16 bf16;
static char err[512];

static void need(int rc, const char *what) {
    if (rc) {
        fprintf(stderr, "%s failed: %s\n", what, err);
        exit(1);
    }
}
static void *dmal(size_t bytes) {
    void *p;
    CK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}

int main(int argc, char **argv) {
    int reps = 20;
    int64_t V = 128256;
    std::vector<int64_t> rows = {130, 1024, 4096};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--V") && i + 1 < argc) V = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) {
            rows.clear();
            for (char *p = argv[++i]; *p;) {
                rows.push_back(strtoll(p, &p, 10));
                if (*p == ',') p++;
                else if (*p) break;
            }
        } else {
            fprintf(stderr, "usage: gpu_bench_loss [--reps N] [--V vocab] [--rows n1,n2,...]\n");
            return 2;
        }
    }
    if (V < 8 || rows.empty() || reps < 1) {
        fprintf(stderr, "gpu_bench_loss: bad --V, --rows or --reps\n");
        return 2;
    }
    int64_t nmax = 0;
    for (int64_t n : rows) nmax = n > nmax ? n : nmax;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    double bw;  // bytes/s
    {
        const size_t bytes = (size_t)2 << 30;
        void *a = dmal(bytes), *b = dmal(bytes);
        CK(cudaMemset(a, 1, bytes));
        const double ms = gpu_median_ms(reps, [&](int) { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
        bw = 2.0 * bytes / ms * 1e3;
        CK(cudaFree(a));
        CK(cudaFree(b));
    }
    printf("gpu_bench_loss on %s (%d SMs): V %lld bf16, device-to-device copy %.0f GB/s (read + write), median of %d\n",
           prop.name, prop.multiProcessorCount, (long long)V, bw / 1e9, reps);
    bf16 *s = (bf16 *)dmal((size_t)(nmax * V) * 2), *t = (bf16 *)dmal((size_t)(nmax * V) * 2);
    bf16 *ds = (bf16 *)dmal((size_t)(nmax * V) * 2);
    fill_bf16(s, nmax * V, 51, 1, 0.f, 2.f);
    fill_bf16(t, nmax * V, 52, 1, 0.f, 2.f);
    std::vector<int32_t> tg(nmax);
    for (int64_t i = 0; i < nmax; i++) tg[i] = (int32_t)((i * 7919) % V);
    int32_t *dtg = (int32_t *)dmal((size_t)nmax * 4);
    CK(cudaMemcpy(dtg, tg.data(), (size_t)nmax * 4, cudaMemcpyHostToDevice));
    double *drows = (double *)dmal((size_t)nmax * 32), *acc = (double *)dmal(64);
    const struct {
        const char *name;
        LossWeights w;
        bool teacher;
    } cases[] = {
        {"ce+0.1kl", {1.f, 0.1f, 0.f, 1.f}, true},  // stage-1 distillation (the engine's default step)
        {"ce", {1.f, 0.f, 0.f, 1.f}, false},        // SFT
        {"kl+rkl(T=2)", {0.f, 1.f, 1.f, 2.f}, true},
    };
    printf("  %6s  %-12s %-8s %9s %9s %7s %8s\n", "rows", "loss", "kernel", "ms", "floor ms", "%floor", "GB/s");
    for (int64_t n : rows) {
        for (const auto &c : cases) {
            const double bytes = (double)n * V * 2 * (c.teacher ? 3 : 2);
            double msk[2];
            for (int kb = 0; kb < 2; kb++) {
                setenv("DISTILL_LOSS_ROWS", kb ? "block" : "cluster", 1);
                msk[kb] = gpu_median_ms(reps, [&](int) {
                    need(loss_rows_cuda(DT_BF16, &c.w, n, V, s, c.teacher ? t : NULL, dtg, NULL, NULL, 1.0 / n, ds, drows,
                                        NULL, NULL, err, sizeof err), c.name);
                });
                const double floor_ms = bytes / bw * 1e3;
                printf("  %6lld  %-12s %-8s %9.3f %9.3f %6.1f%% %8.0f\n", (long long)n, c.name, kb ? "block" : "cluster",
                       msk[kb], floor_ms, 100 * floor_ms / msk[kb], bytes / msk[kb] / 1e6);
                printf("RESULT_LOSS rows=%lld V=%lld loss=%s kernel=%s ms=%.4f floor_ms=%.4f pct_floor=%.1f\n", (long long)n,
                       (long long)V, c.name, kb ? "block" : "cluster", msk[kb], floor_ms, 100 * floor_ms / msk[kb]);
            }
        }
    }
    unsetenv("DISTILL_LOSS_ROWS");
    for (void *p : {(void *)s, (void *)t, (void *)ds, (void *)dtg, (void *)drows, (void *)acc}) CK(cudaFree(p));
    printf("gpu_bench_loss: done\n");
    return 0;
}
