// gpu_bench_train.cu: times every training-backend kernel at Llama-3-8B shapes (d 4096, ff 14336, 32/8 heads
// of 128, V 128256, B*T = 2 x 2048 = 4096 tokens) in bf16 and prints time against its floor: memory-bound
// kernels against the bytes they must move at the measured device-to-device copy bandwidth; GEMMs and
// attention against the measured bf16 matmul rate (an 8192^3 product through the same cuBLASLt wrapper).
// Each figure is the median of --reps timed runs (CUDA events) after warm-up, on random inputs.
// Usage: gpu_bench_train [--reps N] [--csv FILE]
#include <cublasLt.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "kernels/scan/gpu_common.cuh"
#include "kernels/train/train_cuda.h"

typedef __nv_bfloat16 bf16;
static char err[512];
static int reps = 20;
static FILE *csv = nullptr;
static double bw_gbs = 0, mm_tflops = 0;

static void need(int rc, const char *what) {
    if (rc) {
        fprintf(stderr, "%s failed: %s\n", what, err);
        exit(1);
    }
}
static double time_ms(const std::function<void()> &fn) { return gpu_median_ms(reps, [&](int) { fn(); }); }
static void *dmal(size_t bytes) {
    void *p;
    CK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}
static bf16 *rbf(int64_t n, float sd, uint64_t seed) {
    bf16 *p = (bf16 *)dmal((size_t)n * 2);
    fill_bf16(p, n, seed, 1, 0.f, sd);
    return p;
}
__global__ void fill_f32_kernel(float *p, int64_t n, uint64_t seed, float sd) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        p[i] = sd * (gunif(seed, 2 * i) + gunif(seed, 2 * i + 1) - 1.0f) * 2.449f;
}
static float *rf32(int64_t n, float sd, uint64_t seed) {
    float *p = (float *)dmal((size_t)n * 4);
    fill_f32_kernel<<<4096, 256>>>(p, n, seed, sd);
    CK(cudaGetLastError());
    return p;
}
// memory-bound line: time vs bytes / copy bandwidth
static void row_mem(const char *name, double ms, double bytes) {
    const double floor_ms = bytes / (bw_gbs * 1e9) * 1e3;
    printf("  %-44s %9.3f ms  floor %8.3f ms  %5.1f%% of floor  %7.0f GB/s\n", name, ms, floor_ms, 100 * floor_ms / ms,
           bytes / ms / 1e6);
    if (csv) fprintf(csv, "%s,%.4f,%.4f,mem,%.1f\n", name, ms, floor_ms, bytes / ms / 1e6);
}
// compute-bound line: time vs flops / measured matmul rate
static void row_flop(const char *name, double ms, double flops) {
    const double floor_ms = flops / (mm_tflops * 1e12) * 1e3;
    printf("  %-44s %9.3f ms  floor %8.3f ms  %5.1f%% of floor  %7.1f TFLOP/s\n", name, ms, floor_ms, 100 * floor_ms / ms,
           flops / ms / 1e9);
    if (csv) fprintf(csv, "%s,%.4f,%.4f,flop,%.1f\n", name, ms, floor_ms, flops / ms / 1e9);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = fopen(argv[++i], "w");
        else {
            fprintf(stderr, "usage: gpu_bench_train [--reps N] [--csv FILE]\n");
            return 2;
        }
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("gpu_bench_train on %s (%d SMs), median of %d runs\n", prop.name, prop.multiProcessorCount, reps);
    if (csv) fprintf(csv, "kernel,ms,floor_ms,kind,rate\n");
    DlGemm *g = dl_gemm_new(0, err, sizeof err);
    if (!g) need(1, "dl_gemm_new");

    // ---- the two ceilings
    {
        const size_t bytes = (size_t)2 << 30;
        void *a = dmal(bytes), *b = dmal(bytes);
        CK(cudaMemset(a, 1, bytes));
        const double ms = time_ms([&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
        bw_gbs = 2.0 * bytes / ms / 1e6;
        CK(cudaFree(a));
        CK(cudaFree(b));
        const int M = 8192;
        bf16 *A = rbf((int64_t)M * M, 1, 1), *B = rbf((int64_t)M * M, 1, 2), *C = rbf((int64_t)M * M, 1, 3);
        const double mms = time_ms([&] {
            need(dl_gemm(g, M, M, M, DT_BF16, A, 0, B, 1, DT_BF16, C, NULL, 1, 0, NULL, err, sizeof err), "gemm");
        });
        mm_tflops = 2.0 * M * M * (double)M / mms / 1e9;
        printf("ceilings: device-to-device copy %.0f GB/s (read + write); bf16 GEMM 8192^3 %.1f TFLOP/s (%.3f ms)\n",
               bw_gbs, mm_tflops, mms);
        if (csv) fprintf(csv, "ceiling_copy,%.4f,0,mem,%.1f\nceiling_gemm_8192,%.4f,0,flop,%.1f\n", ms, bw_gbs, mms, mm_tflops);
        CK(cudaFree(A));
        CK(cudaFree(B));
        CK(cudaFree(C));
    }

    const int64_t N = 4096, d = 4096, ff = 14336, V = 128256, nh = 32, nkv = 8, hd = 128, Bt = 2, T = 2048;

    // ---- GEMMs (nn.Linear fwd, dgrad, wgrad with fp32 accumulation)
    printf("GEMM (bf16 in, fp32 accumulate; N = %lld tokens):\n", (long long)N);
    struct {
        const char *name;
        int64_t In, O;
    } lin[] = {{"qkv", d, d + 2 * nkv * hd}, {"o_proj", d, d}, {"gate_up", d, 2 * ff}, {"down", ff, d}, {"lm_head", d, V}};
    for (auto &L : lin) {
        bf16 *x = rbf(N * L.In, 1, 11), *W = rbf(L.O * L.In, 0.02f, 12), *y = rbf(N * L.O, 1, 13), *dx = rbf(N * L.In, 1, 14);
        float *dW = rf32(L.O * L.In, 0.01f, 15);
        const double fl = 2.0 * N * L.In * L.O;
        char nm[96];
        double ms = time_ms([&] { need(dl_linear_fwd(g, DT_BF16, y, x, W, NULL, N, L.In, L.O, 0, NULL, err, sizeof err), "fwd"); });
        snprintf(nm, sizeof nm, "%s fwd [%lld x %lld]", L.name, (long long)L.O, (long long)L.In);
        row_flop(nm, ms, fl);
        ms = time_ms([&] { need(dl_linear_dgrad(g, DT_BF16, dx, y, W, N, L.In, L.O, 0, NULL, err, sizeof err), "dgrad"); });
        snprintf(nm, sizeof nm, "%s dgrad", L.name);
        row_flop(nm, ms, fl);
        ms = time_ms([&] { need(dl_linear_wgrad(g, DT_BF16, DT_F32, dW, y, x, N, L.In, L.O, 1, NULL, err, sizeof err), "wgrad"); });
        snprintf(nm, sizeof nm, "%s wgrad (+= fp32)", L.name);
        row_flop(nm, ms, fl);
        for (void *p : {(void *)x, (void *)W, (void *)y, (void *)dx, (void *)dW}) CK(cudaFree(p));
    }

    // ---- memory-bound kernels
    printf("memory-bound kernels (bf16 activations):\n");
    {
        bf16 *x = rbf(N * d, 1, 21), *r = rbf(N * d, 1, 22), *h = rbf(N * d, 1, 23), *o = rbf(N * d, 1, 24), *w = rbf(d, 1, 25);
        bf16 *dy = rbf(N * d, 1, 26), *din = rbf(N * d, 1, 27);
        float *rstd = rf32(N, 1, 28), *dw = rf32(d, 1, 29);
        void *ws = dmal(rmsnorm_bwd_workspace(N, d));
        double ms = time_ms([&] {
            need(rmsnorm_fwd_cuda(DT_BF16, o, rstd, h, x, r, w, N, d, 1e-5f, NULL, err, sizeof err), "rmsnorm fwd");
        });
        row_mem("rmsnorm fwd + residual [4096 x 4096]", ms, 4.0 * N * d * 2);
        ms = time_ms([&] {
            need(rmsnorm_fwd_cuda(DT_BF16, o, rstd, NULL, x, NULL, w, N, d, 1e-5f, NULL, err, sizeof err), "rmsnorm fwd");
        });
        row_mem("rmsnorm fwd [4096 x 4096]", ms, 2.0 * N * d * 2);
        ms = time_ms([&] {
            need(rmsnorm_bwd_cuda(DT_BF16, din, dw, dy, h, w, rstd, N, d, ws, NULL, err, sizeof err), "rmsnorm bwd");
        });
        row_mem("rmsnorm bwd (din +=, dw +=)", ms, 4.0 * N * d * 2);
        // embedding
        std::vector<int32_t> tok(N);
        uint64_t s = 7;
        for (auto &t : tok) t = (int32_t)(gmix64(s++) % (uint64_t)V);
        int32_t *dtok = (int32_t *)dmal(N * 4);
        CK(cudaMemcpy(dtok, tok.data(), N * 4, cudaMemcpyHostToDevice));
        bf16 *wte = rbf(V * d, 1, 30);
        ms = time_ms([&] { need(embedding_fwd_cuda(DT_BF16, o, dtok, wte, N, V, d, NULL, err, sizeof err), "emb fwd"); });
        row_mem("embedding fwd [4096 x 4096]", ms, 2.0 * N * d * 2);
        std::vector<int32_t> ord(N), seg(N + 1), uq(N);
        const int64_t U = embedding_bwd_plan(tok.data(), N, V, ord.data(), seg.data(), uq.data(), err, sizeof err);
        int32_t *dord = (int32_t *)dmal(N * 4), *dseg = (int32_t *)dmal((N + 1) * 4), *duq = (int32_t *)dmal(N * 4);
        CK(cudaMemcpy(dord, ord.data(), N * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dseg, seg.data(), (N + 1) * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(duq, uq.data(), N * 4, cudaMemcpyHostToDevice));
        float *dwte = rf32(V * d, 1, 31);
        ms = time_ms([&] {
            need(embedding_bwd_cuda(DT_BF16, dwte, dy, dord, dseg, duq, U, d, NULL, err, sizeof err), "emb bwd");
        });
        row_mem("embedding bwd (dwte += fp32, rows used)", ms, (double)N * d * 2 + (double)U * d * 8);
        CK(cudaFree(wte));
        CK(cudaFree(dwte));
        for (void *p : {(void *)dord, (void *)dseg, (void *)duq}) CK(cudaFree(p));
        // rope on q
        std::vector<float> invf(hd / 2);
        for (int i = 0; i < hd / 2; i++) invf[i] = powf(500000.f, -2.f * i / hd);
        std::vector<int32_t> pos(N);
        for (int64_t n = 0; n < N; n++) pos[n] = (int32_t)(n % T);
        float *dinv = (float *)dmal(hd / 2 * 4);
        int32_t *dpos = (int32_t *)dmal(N * 4);
        CK(cudaMemcpy(dinv, invf.data(), hd / 2 * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dpos, pos.data(), N * 4, cudaMemcpyHostToDevice));
        bf16 *q = rbf(N * nh * hd, 1, 32);
        ms = time_ms([&] { need(rope_cuda(DT_BF16, q, dpos, dinv, N, (int)nh, (int)hd, 0, NULL, err, sizeof err), "rope"); });
        row_mem("rope q [4096 x 32 x 128] in place", ms, 2.0 * N * nh * hd * 2);
        CK(cudaFree(q));
        CK(cudaFree(dinv));
        CK(cudaFree(dpos));
        for (void *p : {(void *)x, (void *)r, (void *)h, (void *)o, (void *)w, (void *)dy, (void *)din, (void *)rstd,
                        (void *)dw, ws, (void *)dtok})
            CK(cudaFree(p));
    }
    {
        bf16 *gu = rbf(N * 2 * ff, 1, 41), *o = rbf(N * ff, 1, 42), *dy = rbf(N * ff, 1, 43), *dgu = rbf(N * 2 * ff, 1, 44);
        double ms = time_ms([&] {
            need(swiglu_fwd_cuda(DT_BF16, o, gu, gu + ff, N, ff, 2 * ff, NULL, err, sizeof err), "swiglu fwd");
        });
        row_mem("swiglu fwd [4096 x 14336]", ms, 3.0 * N * ff * 2);
        ms = time_ms([&] {
            need(swiglu_bwd_cuda(DT_BF16, dgu, dgu + ff, dy, gu, gu + ff, N, ff, 2 * ff, NULL, err, sizeof err), "swiglu bwd");
        });
        row_mem("swiglu bwd", ms, 5.0 * N * ff * 2);
        for (void *p : {(void *)gu, (void *)o, (void *)dy, (void *)dgu}) CK(cudaFree(p));
    }
    {
        const int64_t n = 2048;  // rows per loss chunk (2048 x 128256 bf16 = 0.5 GB of logits)
        bf16 *s = rbf(n * V, 2, 51), *t = rbf(n * V, 2, 52), *ds = rbf(n * V, 1, 53);
        std::vector<int32_t> tg(n);
        for (int64_t i = 0; i < n; i++) tg[i] = (int32_t)((i * 7919) % V);
        int32_t *dtg = (int32_t *)dmal(n * 4);
        CK(cudaMemcpy(dtg, tg.data(), n * 4, cudaMemcpyHostToDevice));
        double *rows = (double *)dmal(n * 32), *acc = (double *)dmal(32);
        LossWeights w1 = {1, 0, 0, 1}, w2 = {1, 0.1f, 0, 1}, w3 = {0, 1, 1, 2};
        double ms = time_ms([&] {
            need(loss_rows_cuda(DT_BF16, &w1, n, V, s, NULL, dtg, NULL, NULL, 1.0 / n, ds, rows, NULL, NULL, err, sizeof err), "ce");
        });
        row_mem("cross-entropy + dlogits [2048 x 128256]", ms, 2.0 * n * V * 2);
        ms = time_ms([&] {
            need(loss_rows_cuda(DT_BF16, &w2, n, V, s, t, dtg, NULL, NULL, 1.0 / n, ds, rows, NULL, NULL, err, sizeof err), "kl");
        });
        row_mem("CE + 0.1 KL(T=1) + dlogits", ms, 3.0 * n * V * 2);
        ms = time_ms([&] {
            need(loss_rows_cuda(DT_BF16, &w3, n, V, s, t, dtg, NULL, NULL, 1.0 / n, ds, rows, NULL, NULL, err, sizeof err), "rkl");
        });
        row_mem("KL + reverse KL (T=2) + dlogits", ms, 3.0 * n * V * 2);
        ms = time_ms([&] { need(loss_sum_cuda(rows, n, acc, NULL, err, sizeof err), "sum"); });
        for (void *p : {(void *)s, (void *)t, (void *)ds, (void *)dtg, (void *)rows, (void *)acc}) CK(cudaFree(p));
    }
    {
        const int64_t n = (int64_t)256 << 20;  // 268M parameters (about a 4-layer Llama-3-8B slice)
        float *p = rf32(n, 1, 61), *gr = rf32(n, 1e-3f, 62), *m = rf32(n, 1e-3f, 63), *v = rf32(n, 1e-6f, 64);
        CK(cudaMemset(v, 0, (size_t)n * 4));
        bf16 *c = rbf(n, 1, 65), *mb = rbf(n, 0, 66), *vb = rbf(n, 0, 67);
        AdamWArgs a = {1.f, 0.9f, 0.95f, 1e-8f, 1.f - 1e-5f, 1e-4f, 1.f, 1};
        double ms = time_ms([&] { need(adamw_cuda(&a, n, p, gr, DT_F32, m, v, DT_BF16, c, NULL, err, sizeof err), "adamw"); });
        row_mem("adamw fp32 moments + bf16 copy (268M)", ms, (double)n * 30);
        ms = time_ms([&] { need(adamw_cuda(&a, n, p, gr, DT_BF16, mb, vb, DT_BF16, c, NULL, err, sizeof err), "adamw"); });
        row_mem("adamw bf16 moments (SR) + bf16 copy", ms, (double)n * 22);
        double *acc = (double *)dmal(8);
        void *ws = dmal(grad_sumsq_workspace(n));
        ms = time_ms([&] { need(grad_sumsq_cuda(gr, n, acc, ws, NULL, err, sizeof err), "sumsq"); });
        row_mem("grad sum of squares (268M fp32)", ms, (double)n * 4);
        for (void *q : {(void *)p, (void *)gr, (void *)m, (void *)v, (void *)c, (void *)mb, (void *)vb, (void *)acc, ws})
            CK(cudaFree(q));
    }
    // ---- attention (hand-written fallback, CUDA cores)
    printf("attention (hand-written; B %lld, T %lld, heads %lld/%lld, hd %lld, causal):\n",
           (long long)Bt, (long long)T, (long long)nh, (long long)nkv, (long long)hd);
    {
        bf16 *q = rbf(N * nh * hd, 1, 71), *k = rbf(N * nkv * hd, 1, 72), *v = rbf(N * nkv * hd, 1, 73);
        bf16 *o = rbf(N * nh * hd, 1, 74), *dO = rbf(N * nh * hd, 1, 75), *dq = rbf(N * nh * hd, 1, 76);
        bf16 *dk = rbf(N * nkv * hd, 1, 77), *dv = rbf(N * nkv * hd, 1, 78);
        float *lse = rf32(Bt * nh * T, 1, 79);
        void *ws = dmal(attention_bwd_workspace(Bt, T, (int)nh));
        const double fl = 4.0 * Bt * nh * hd * (double)T * (T + 1) / 2;  // two matmuls over the causal half
        double ms = time_ms([&] {
            need(attention_fwd_cuda(DT_BF16, Bt, T, (int)nh, (int)nkv, (int)hd, q, k, v, NULL, o, lse, NULL, err, sizeof err), "attn fwd");
        });
        row_flop("attention fwd (tensor cores, mma.sync)", ms, fl);
        attention_use_tensor_cores(0);
        ms = time_ms([&] {
            need(attention_fwd_cuda(DT_BF16, Bt, T, (int)nh, (int)nkv, (int)hd, q, k, v, NULL, o, lse, NULL, err, sizeof err), "attn fwd");
        });
        attention_use_tensor_cores(1);
        row_flop("attention fwd (CUDA cores, fp32)", ms, fl);
        ms = time_ms([&] {
            need(attention_bwd_cuda(DT_BF16, Bt, T, (int)nh, (int)nkv, (int)hd, q, k, v, NULL, o, lse, dO, dq, dk, dv, ws,
                                    NULL, err, sizeof err), "attn bwd");
        });
        row_flop("attention bwd (tensor cores; 2.5x fwd FLOPs)", ms, 2.5 * fl);
        attention_use_tensor_cores(0);
        ms = time_ms([&] {
            need(attention_bwd_cuda(DT_BF16, Bt, T, (int)nh, (int)nkv, (int)hd, q, k, v, NULL, o, lse, dO, dq, dk, dv, ws,
                                    NULL, err, sizeof err), "attn bwd");
        });
        attention_use_tensor_cores(1);
        row_flop("attention bwd (CUDA cores, fp32)", ms, 2.5 * fl);
        for (void *p : {(void *)q, (void *)k, (void *)v, (void *)o, (void *)dO, (void *)dq, (void *)dk, (void *)dv, (void *)lse, ws})
            CK(cudaFree(p));
    }
    dl_gemm_free(g);
    if (csv) fclose(csv);
    printf("gpu_bench_train: done\n");
    return 0;
}
