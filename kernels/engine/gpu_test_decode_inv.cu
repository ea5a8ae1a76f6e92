// gpu_test_decode_inv.cu: batch invariance of DecoderCuda (docs/DECODE_CUDA.md, "Batch invariance"): a token's
// logits are bit-identical however it is fed. Every comparison below is BITWISE (memcmp of fp32 logits).
//   1. decode_gemm: the rows of an M-row product equal, bit for bit, the same rows computed at M = 1, 3, 16,
//      17, 36, 64, 65, 300, at another offset in the batch, and by each of the kGemmVariants variants; and the
//      result is within 1e-2 (bf16 out) / 1e-4 (fp32 out) of a float64 reference (bias, accumulate, K = 40
//      with a zero-padded chunk). For information: how many rows cuBLASLt (the legacy path) changes with M.
//      decode_gemm_multi (3, 5 and 6 outputs of one x in one launch): every output equal to decode_gemm's alone.
//   2. Decoder, random hybrid (attention + Mamba-1) and teacher (all attention), prompts of up to 2500
//      tokens (20 key tiles of 128), batch 1 and 4, with and without CUDA graphs: the logits of 9 single
//      decode steps == those of one K-token verification window (K = 1..8) == a ragged prefill of prompt +
//      tokens (all-logits feed, one chunk and chunks of 3 columns); after accept(keep) the next step equals
//      the single-step run at the same position; batch 1 == the same sequence at batch 4; graphs == none.
//   3. Greedy speculative == plain greedy, token for token, on 16 prompts (5..2500 tokens, 40 new tokens) at
//      batch 1 and 4, K = 2, 4, 8, a 2-layer-cut draft and the target itself as draft, for a teacher and a
//      hybrid whose head rows come in near-identical pairs (row v + V/2 = row v * (1 + 0.02 noise)): the top
//      two logits of most positions are then within 1% of each other, so any difference in the last bits
//      between a step and a verification flips tokens (the test checks that the near-ties are there).
//   4. The sampler (sample_rows_cuda) draws the same ids as its general path alone (sample_rows_cuda_reference:
//      radix select and the draw over the whole row, the first version's algorithm), bit for bit, on rows of 64 .. 131072 logits of 13 kinds (normal, peaked, quantized
//      with many equal values, all equal, NaN / -inf / +inf, ids sorted by logit, near the zero-weight limit)
//      under 12 settings (greedy, T from 1e-39 to 5, top-k, top-p): every path of the fast kernel. The split
//      argmax (argmax_rows_cuda, several blocks per row: the decoder's greedy picks) gives the greedy ids.
// With DISTILL_DECODE_INVARIANT=0 (the previous arithmetic: cuBLASLt GEMMs, key splits that depend on the
// number of rows) sections 2 and 3 are expected to FAIL: that is how the test shows it can see the problem.
//   5. The attention kernels alone (decode_attention_cuda) on random q, K, V: one block per (row, head)
//      (attn_tiles_kernel<false>), the per-tile blocks + fold, one block per (row, KV group) (attn_gqa_kernel, the
//      default for many rows) and one per (row, KV group, tile) + fold (the few-rows path) give the same bits, at batch 1 .. 512, 1 .. 4 query
//      rows per sequence, ragged lengths of 1 .. 700 keys (tile edges 128 / 129 included), SmolLM2's 9 / 3
//      heads of 64 and G = 1, 2, 3, 4, 8 at hd 64 and 128; shapes without a GQA kernel are refused; all within
//      1e-2 of a float64 softmax. And a decoder's all-logits prefill (teacher, hybrid) is the same bits with the
//      GQA kernel and with DISTILL_DECODE_ATTN=tiles; with DISTILL_DECODE_FUSE=0 (rope and KV append, SwiGLU and
//      the down projection as separate launches) and DISTILL_DECODE_MULTI=0 (one launch per projection) every logit
//      of a prefill, steps, a window and accept is the same bits too; one sequence's windows (inputs written in
//      place, all Mamba layers replayed in one launch) equal DISTILL_DECODE_FUSE=15's (copied, replayed per layer),
//      with and without graphs. decode_gemm_swiglu (section 1) equals decode_gemm into gate|up then swiglu_fwd_cuda
//      bitwise.
// Usage: gpu_test_decode_inv [--verbose] [--only gemm,decoder,spec,sample,attn]. Exit status != 0 on any failure.
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine/decode_cuda.h"
#include "kernels/engine/decode_gemm.h"
#include "kernels/engine/gpu_test_common.cuh"
#include "kernels/train/train_cuda.h"

extern "C" {
#include "distill/rng.h"
#include "distill/sample.h"
#include "distill/spec_decode.h"
}

#define kGemmVariants 8  // decode_gemm_with's variants 0..7 (the test checks that 8 is refused)

// rows of [n, V] that differ in any bit; *mx = the largest |a - b|
static int64_t rows_differ(const float *a, const float *b, int64_t n, int64_t V, double *mx) {
    int64_t bad = 0;
    for (int64_t r = 0; r < n; r++) {
        if (memcmp(a + r * V, b + r * V, (size_t)V * 4)) bad++;
        for (int64_t v = 0; v < V && mx; v++) *mx = fmax(*mx, fabs((double)a[r * V + v] - b[r * V + v]));
    }
    return bad;
}

// ---------------------------------------------------------------- 1. the GEMM

static void gemm_case(int64_t N, int64_t K, bool bias, bool acc, DType odt, DlGemm *lt) {
    const int64_t MM = 305;  // rows of the big product; M-row calls use rows [off, off + M)
    const int osz = odt == DT_F32 ? 4 : 2;
    Rng g;
    rng_init(&g, (uint64_t)(N * 131 + K), 3);
    uint16_t *hx = (uint16_t *)malloc((size_t)(MM * K) * 2), *hw = (uint16_t *)malloc((size_t)(N * K) * 2);
    uint16_t *hb = (uint16_t *)malloc((size_t)N * 2);
    float *y0 = (float *)malloc((size_t)(MM * N) * 4);  // initial y (accumulate), as float
    for (int64_t i = 0; i < MM * K; i++) hx[i] = f32_to_bf16((float)rng_normal(&g));
    for (int64_t i = 0; i < N * K; i++) hw[i] = f32_to_bf16((float)(rng_normal(&g) / sqrt((double)K)));
    for (int64_t i = 0; i < N; i++) hb[i] = f32_to_bf16((float)rng_normal(&g));
    for (int64_t i = 0; i < MM * N; i++) y0[i] = odt == DT_F32 ? (float)rng_normal(&g) : bf16_to_f32(f32_to_bf16((float)rng_normal(&g)));
    void *dx, *dw, *db, *dy;
    CK(cudaMalloc(&dx, (size_t)(MM * K) * 2));
    CK(cudaMalloc(&dw, (size_t)(N * K) * 2));
    CK(cudaMalloc(&db, (size_t)N * 2));
    CK(cudaMalloc(&dy, (size_t)(MM * N) * 4));
    CK(cudaMemcpy(dx, hx, (size_t)(MM * K) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, hw, (size_t)(N * K) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, hb, (size_t)N * 2, cudaMemcpyHostToDevice));
    // y init in the output dtype
    void *hy0 = malloc((size_t)(MM * N) * osz);
    for (int64_t i = 0; i < MM * N; i++) {
        if (odt == DT_F32) ((float *)hy0)[i] = y0[i];
        else ((uint16_t *)hy0)[i] = f32_to_bf16(y0[i]);
    }
    char err[256] = "", nm[128];
    snprintf(nm, sizeof nm, "decode_gemm N %lld K %lld%s%s, %s out", (long long)N, (long long)K, bias ? " +bias" : "",
             acc ? " +accumulate" : "", odt == DT_F32 ? "f32" : "bf16");
    // run(M, off, variant) -> host [M, N] as float
    auto run = [&](int64_t M, int64_t off, int variant, float *out) {
        CK(cudaMemcpy(dy, hy0, (size_t)(MM * N) * osz, cudaMemcpyHostToDevice));
        const void *x = (const uint16_t *)dx + off * K;
        void *y = (char *)dy + (size_t)(off * N) * osz;
        const int rc = variant < 0 ? decode_gemm(odt, y, x, dw, bias ? db : NULL, M, N, K, acc, NULL, err, sizeof err)
                                   : decode_gemm_with(variant, odt, y, x, dw, bias ? db : NULL, M, N, K, acc, NULL, err, sizeof err);
        if (rc) {
            printf("  FAIL %s: refused: %s\n", nm, err);
            exit(1);
        }
        CK(cudaDeviceSynchronize());
        void *h = malloc((size_t)(M * N) * osz);
        CK(cudaMemcpy(h, y, (size_t)(M * N) * osz, cudaMemcpyDeviceToHost));
        for (int64_t i = 0; i < M * N; i++) out[i] = odt == DT_F32 ? ((float *)h)[i] : bf16_to_f32(((uint16_t *)h)[i]);
        free(h);
    };
    float *big = (float *)malloc((size_t)(MM * N) * 4), *part = (float *)malloc((size_t)(MM * N) * 4);
    run(MM, 0, -1, big);
    // vs float64
    double num = 0, den = 0;
    for (int64_t m = 0; m < MM; m++)
        for (int64_t n = 0; n < N; n++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++) s += (double)bf16_to_f32(hx[m * K + k]) * bf16_to_f32(hw[n * K + k]);
            if (bias) s += bf16_to_f32(hb[n]);
            if (acc) s += y0[m * N + n];
            const double d = big[m * N + n] - s;
            num += d * d, den += s * s;
        }
    const double rel = sqrt(num / den), tol = odt == DT_F32 ? 1e-4 : 1e-2;  // bf16 inputs; tensor-core fp32 sums
    check(rel < tol, "%s: M %lld vs float64: relative error %.2e (< %.0e)", nm, (long long)MM, rel, tol);
    const int64_t Ms[8] = {1, 3, 16, 17, 36, 64, 65, 300};
    int64_t bad = 0;
    for (int i = 0; i < 8; i++) {
        run(Ms[i], 0, -1, part);
        bad += rows_differ(part, big, Ms[i], N, NULL);
        run(Ms[i], 5, -1, part);  // the same rows at another place in the batch
        bad += rows_differ(part, big + 5 * N, Ms[i], N, NULL);
    }
    check(bad == 0, "%s: rows bitwise equal at M = 1, 3, 16, 17, 36, 64, 65, 300 and offset 5 (%lld rows differ)", nm,
          (long long)bad);
    bad = 0;
    for (int v = 0; v < kGemmVariants; v++) {
        run(MM, 0, v, part);
        bad += rows_differ(part, big, MM, N, NULL);
    }
    check(bad == 0, "%s: the %d tile variants give identical bits (%lld rows differ)", nm, kGemmVariants,
          (long long)bad);
    if (lt && !acc && !bias) {  // information: the legacy cuBLASLt path at M = 1 .. 9 vs M = 300
        float *ref = (float *)malloc((size_t)(MM * N) * 4);
        int64_t lbad = 0;
        for (int64_t M = 300; M >= 1; M = M == 300 ? 9 : M - 1) {
            if (dl_gemm(lt, (int)M, (int)N, (int)K, DT_BF16, dx, 0, dw, 1, odt, dy, NULL, 1.0f, 0.0f, NULL, err, sizeof err)) {
                printf("  (cuBLASLt refused: %s)\n", err);
                break;
            }
            CK(cudaDeviceSynchronize());
            void *h = malloc((size_t)(M * N) * osz);
            CK(cudaMemcpy(h, dy, (size_t)(M * N) * osz, cudaMemcpyDeviceToHost));
            for (int64_t i = 0; i < M * N; i++) part[i] = odt == DT_F32 ? ((float *)h)[i] : bf16_to_f32(((uint16_t *)h)[i]);
            free(h);
            if (M == 300) memcpy(ref, part, (size_t)(M * N) * 4);
            else lbad += rows_differ(part, ref, M, N, NULL);
        }
        printf("        (%s: cuBLASLt, the legacy path: %lld of the 45 rows of M = 1..9 differ from the same rows at M = 300)\n",
               nm, (long long)lbad);
        free(ref);
    }
    CK(cudaFree(dx));
    CK(cudaFree(dw));
    CK(cudaFree(db));
    CK(cudaFree(dy));
    free(hx), free(hw), free(hb), free(y0), free(hy0), free(big), free(part);
}

// decode_gemm_multi: n products of one x in one launch, each output bit for bit decode_gemm's for it alone (outputs
// poisoned with 0xff bytes first), at M = 1 .. 300 (the decode, window and prefill tiles).
static void gemm_multi_case(int n, const int64_t *Ns, int64_t K, DType odt) {
    const int64_t MM = 300, Ms[5] = {1, 3, 17, 65, 300};
    const int osz = odt == DT_F32 ? 4 : 2;
    Rng g;
    rng_init(&g, (uint64_t)(n * 977 + K), 5);
    int64_t wtot = 0, ytot = 0;
    for (int i = 0; i < n; i++) wtot += Ns[i] * K, ytot += MM * Ns[i];
    uint16_t *hx = (uint16_t *)malloc((size_t)(MM * K) * 2), *hw = (uint16_t *)malloc((size_t)wtot * 2);
    for (int64_t i = 0; i < MM * K; i++) hx[i] = f32_to_bf16((float)rng_normal(&g));
    for (int64_t i = 0; i < wtot; i++) hw[i] = f32_to_bf16((float)(rng_normal(&g) / sqrt((double)K)));
    char *dx, *dw, *ya, *yb;
    CK(cudaMalloc(&dx, (size_t)(MM * K) * 2));
    CK(cudaMalloc(&dw, (size_t)wtot * 2));
    CK(cudaMalloc(&ya, (size_t)ytot * osz));
    CK(cudaMalloc(&yb, (size_t)ytot * osz));
    CK(cudaMemcpy(dx, hx, (size_t)(MM * K) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, hw, (size_t)wtot * 2, cudaMemcpyHostToDevice));
    char *ha = (char *)malloc((size_t)ytot * osz), *hb = (char *)malloc((size_t)ytot * osz), err[256] = "";
    int64_t bad = 0;
    for (int mi = 0; mi < 5; mi++) {
        const int64_t M = Ms[mi];
        CK(cudaMemset(ya, 0xff, (size_t)ytot * osz));
        CK(cudaMemset(yb, 0xff, (size_t)ytot * osz));
        DecodeGemmOut outs[DECODE_GEMM_MAX_OUTS];
        int64_t wo = 0, yo = 0;
        for (int i = 0; i < n; i++) {
            outs[i] = (DecodeGemmOut){yb + yo * osz, dw + wo * 2, NULL, Ns[i]};
            if (decode_gemm(odt, ya + yo * osz, dx, dw + wo * 2, NULL, M, Ns[i], K, 0, NULL, err, sizeof err)) {
                printf("  FAIL decode_gemm refused: %s\n", err);
                exit(1);
            }
            wo += Ns[i] * K, yo += MM * Ns[i];
        }
        if (decode_gemm_multi(odt, outs, n, dx, M, K, NULL, err, sizeof err)) {
            printf("  FAIL decode_gemm_multi refused: %s\n", err);
            exit(1);
        }
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(ha, ya, (size_t)ytot * osz, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hb, yb, (size_t)ytot * osz, cudaMemcpyDeviceToHost));
        yo = 0;
        for (int i = 0; i < n; i++) {
            bad += memcmp(ha + yo * osz, hb + yo * osz, (size_t)(M * Ns[i]) * osz) != 0;
            for (int64_t j = M * Ns[i]; j < MM * Ns[i]; j++)  // nothing written past the M rows
                bad += memcmp(hb + (yo + j) * osz, "\xff\xff\xff\xff", (size_t)osz) != 0;
            yo += MM * Ns[i];
        }
    }
    check(bad == 0, "decode_gemm_multi, %d outputs (N %lld .. %lld), K %lld, %s out: every output bitwise equal to decode_gemm "
          "alone at M = 1, 3, 17, 65, 300, no row past M written (%lld differ)", n, (long long)Ns[0], (long long)Ns[n - 1],
          (long long)K, odt == DT_F32 ? "f32" : "bf16", (long long)bad);
    CK(cudaFree(dx));
    CK(cudaFree(dw));
    CK(cudaFree(ya));
    CK(cudaFree(yb));
    free(hx), free(hw), free(ha), free(hb);
}

// decode_gemm_swiglu: act = swiglu(x @ Wg^T, x @ Wu^T) with the SwiGLU as the GEMM's epilogue, bit for bit decode_gemm
// into a bf16 gate|up buffer then swiglu_fwd_cuda (outputs poisoned with 0xff first; nothing past M written) at
// M = 1 .. 300 (the three tiles), with the weights as one fused [2F, K] gate|up tensor or two separate tensors.
static void gemm_swiglu_case(int64_t F, int64_t K, bool fused) {
    const int64_t MM = 300, Ms[7] = {1, 3, 16, 17, 64, 65, 300};
    Rng g;
    rng_init(&g, (uint64_t)(F * 31 + K + fused), 9);
    uint16_t *hx = (uint16_t *)malloc((size_t)(MM * K) * 2), *hw = (uint16_t *)malloc((size_t)(2 * F * K) * 2);
    for (int64_t i = 0; i < MM * K; i++) hx[i] = f32_to_bf16((float)rng_normal(&g));
    for (int64_t i = 0; i < 2 * F * K; i++) hw[i] = f32_to_bf16((float)(2.0 * rng_normal(&g) / sqrt((double)K)));
    char *dx, *dw, *dw2, *gu, *aa, *ab;
    CK(cudaMalloc(&dx, (size_t)(MM * K) * 2));
    CK(cudaMalloc(&dw, (size_t)(2 * F * K) * 2));
    CK(cudaMalloc(&dw2, (size_t)(F * K) * 2));  // the up weights apart from the gate's (the unfused layout)
    CK(cudaMalloc(&gu, (size_t)(MM * 2 * F) * 2));
    CK(cudaMalloc(&aa, (size_t)(MM * F) * 2));
    CK(cudaMalloc(&ab, (size_t)(MM * F) * 2));
    CK(cudaMemcpy(dx, hx, (size_t)(MM * K) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, hw, (size_t)(2 * F * K) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw2, dw + F * K * 2, (size_t)(F * K) * 2, cudaMemcpyDeviceToDevice));
    const char *Wu = fused ? dw + F * K * 2 : dw2;
    char *ha = (char *)malloc((size_t)(MM * F) * 2), *hb = (char *)malloc((size_t)(MM * F) * 2), err[256] = "";
    int64_t bad = 0;
    for (int mi = 0; mi < 7; mi++) {
        const int64_t M = Ms[mi];
        CK(cudaMemset(aa, 0xff, (size_t)(MM * F) * 2));
        CK(cudaMemset(ab, 0xff, (size_t)(MM * F) * 2));
        if (decode_gemm(DT_BF16, gu, dx, dw, NULL, M, 2 * F, K, 0, NULL, err, sizeof err) ||
            swiglu_fwd_cuda(DT_BF16, aa, gu, gu + F * 2, M, F, 2 * F, NULL, err, sizeof err) ||
            decode_gemm_swiglu(ab, dx, dw, Wu, M, F, K, NULL, err, sizeof err)) {
            printf("  FAIL refused: %s\n", err);
            exit(1);
        }
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(ha, aa, (size_t)(MM * F) * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hb, ab, (size_t)(MM * F) * 2, cudaMemcpyDeviceToHost));
        bad += memcmp(ha, hb, (size_t)(MM * F) * 2) != 0;  // the poisoned rows past M included
    }
    check(bad == 0, "decode_gemm_swiglu, F %lld, K %lld, %s weights: bitwise equal to decode_gemm into gate|up then "
          "swiglu_fwd_cuda at M = 1, 3, 16, 17, 64, 65, 300, nothing past M written (%lld of 7 differ)", (long long)F,
          (long long)K, fused ? "fused gate|up" : "separate", (long long)bad);
    check(decode_gemm_swiglu(ab, dx, dw, Wu, 4, F + 4, K, NULL, err, sizeof err) != 0 &&
              decode_gemm_swiglu(ab, dx + 2, dw, Wu, 4, F, K, NULL, err, sizeof err) != 0,
          "decode_gemm_swiglu refuses F not a multiple of 8 and a misaligned x: %s", err);
    CK(cudaFree(dx));
    CK(cudaFree(dw));
    CK(cudaFree(dw2));
    CK(cudaFree(gu));
    CK(cudaFree(aa));
    CK(cudaFree(ab));
    free(hx), free(hw), free(ha), free(hb);
}

static void test_gemm(void) {
    char err[256];
    DlGemm *lt = dl_gemm_new(0, err, sizeof err);
    gemm_case(576, 576, false, false, DT_BF16, lt);   // SmolLM2's q / o
    gemm_case(192, 40, true, false, DT_BF16, NULL);   // the padded dt_proj with its bias: K % 32 != 0
    gemm_case(576, 1536, false, true, DT_BF16, NULL); // down_proj accumulated into the residual
    gemm_case(520, 192, false, false, DT_F32, lt);    // a head: fp32 logits
    gemm_case(72, 4104, false, false, DT_F32, NULL);  // long K, N not a multiple of the wide tiles
    const int64_t mamba_in[5] = {576, 192, 192, 576, 40}, qkv[3] = {576, 192, 192}, six[6] = {8, 72, 576, 16, 1536, 24};
    gemm_multi_case(5, mamba_in, 576, DT_BF16);  // SmolLM2's Mamba input projections z, x, B, C, dt_low
    gemm_multi_case(3, qkv, 576, DT_BF16);       // q, k, v
    gemm_multi_case(6, six, 40, DT_F32);         // the most outputs, K % 32 != 0, fp32 out
    gemm_swiglu_case(1536, 576, true);   // SmolLM2's MLP (fused gate|up weights)
    gemm_swiglu_case(1536, 576, false);  // gate and up as two tensors
    gemm_swiglu_case(200, 40, true);     // K % 32 != 0, F not a multiple of the tiles
    check(decode_gemm_multi(DT_BF16, NULL, DECODE_GEMM_MAX_OUTS + 1, NULL, 4, 64, NULL, err, sizeof err) != 0,
          "decode_gemm_multi refuses %d outputs: %s", DECODE_GEMM_MAX_OUTS + 1, err);
    // bad shapes are refused
    check(decode_gemm(DT_BF16, NULL, NULL, NULL, NULL, 4, 12, 64, 0, NULL, err, sizeof err) != 0,
          "decode_gemm refuses N = 12 (not a multiple of 8): %s", err);
    check(decode_gemm_with(kGemmVariants, DT_BF16, NULL, NULL, NULL, NULL, 4, 16, 64, 0, NULL, err, sizeof err) != 0,
          "decode_gemm_with refuses variant %d (kGemmVariants is up to date): %s", kGemmVariants, err);
    if (lt) dl_gemm_free(lt);
}

// ---------------------------------------------------------------- models

typedef struct {
    HybridConfig h;
    Registry r;
    float *p;
} Model;

// 4 layers, d 192, 3 heads (1 KV head), untied head, vocabulary 520. twins: head rows v + V/2 = row v times
// (1 + 0.02 noise), so argmaxes are near-ties (section 3).
static void model_make(Model *m, bool hybrid, uint64_t seed, bool twins) {
    DlError e;
    LlamaConfig c;
    test_small_llama(&c, false);
    int attn[2] = {1, 3};
    if (hybrid) die_if(hybrid_config_init(&m->h, &c, MIXER_MAMBA1, attn, 2, &e) != 0, &e, "hybrid_config_init");
    else hybrid_config_teacher(&m->h, &c);
    model_build_registry(&m->h, &m->r);
    m->p = (float *)malloc((size_t)m->r.numel * 4);
    test_params_init(&m->r, m->p, seed, 11, true);
    if (twins) {
        const int i = reg_find(&m->r, "lm_head.weight");
        die_if(i < 0, &e, "lm_head.weight");
        float *w = m->p + m->r.t[i].offset;
        const int64_t V = c.vocab, d = c.d_model, half = V / 2;
        Rng g;
        rng_init(&g, seed, 99);
        for (int64_t v = 0; v < half; v++)
            for (int64_t j = 0; j < d; j++)
                w[(v + half) * d + j] = bf16_to_f32(f32_to_bf16(w[v * d + j] * (float)(1.0 + 0.02 * rng_normal(&g))));
    }
}

static void random_tokens(int32_t *tok, int64_t B, int64_t L, const int64_t *plen, int64_t V, uint64_t seed) {
    Rng g;
    rng_init(&g, seed, 1);
    memset(tok, 0, (size_t)(B * L) * 4);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < (plen ? plen[b] : L); t++) tok[b * L + t] = (int32_t)rng_below(&g, (uint64_t)V);
}

// ---------------------------------------------------------------- 2. the decoder

enum { NS = 9 };  // continuation tokens: single steps 0..8

// prompts [B, L] (plen), continuation cont [B, NS]: the logits of NS single steps, ls [B, NS, V], and of the
// prefill's last tokens, lp [B, V].
static void single_steps(const Model *m, DecoderCuda *d, int64_t B, const int32_t *pr, const int64_t *plen, int64_t L,
                         const int32_t *cont, float *ls, float *lp) {
    DlError e;
    const int64_t V = m->h.base.vocab;
    float *row = (float *)malloc((size_t)(B * V) * 4);
    int32_t col[8];
    die_if(decoder_cuda_reset(d, B, &e) || decoder_cuda_feed_ragged(d, pr, L, plen, &e), &e, "prefill");
    decoder_cuda_logits_host(d, lp);
    for (int i = 0; i < NS; i++) {
        for (int64_t b = 0; b < B; b++) col[b] = cont[b * NS + i];
        die_if(decoder_cuda_step(d, col, &e) != 0, &e, "step");
        decoder_cuda_logits_host(d, row);
        for (int64_t b = 0; b < B; b++) memcpy(ls + (b * NS + i) * V, row + b * V, (size_t)V * 4);
    }
    free(row);
}

static void decoder_case(const Model *m, const char *name, int64_t B, const int64_t *plen, int64_t L, bool graph,
                         float *ls_out /* [B, NS, V] or NULL */) {
    DlError e;
    char nm[160];
    snprintf(nm, sizeof nm, "%s, batch %lld%s", name, (long long)B, graph ? ", CUDA graphs" : "");
    const int64_t V = m->h.base.vocab, max_len = L + NS + 8;
    int32_t *pr = (int32_t *)malloc((size_t)(B * L) * 4), *cont = (int32_t *)malloc((size_t)(B * NS) * 4);
    random_tokens(pr, B, L, plen, V, 41);
    random_tokens(cont, B, NS, NULL, V, 42);
    if (B > 1) {  // sequence 0 of a batch = the batch-1 sequence (same prompt and continuation)
        int32_t *p1 = (int32_t *)malloc((size_t)L * 4), *c1 = (int32_t *)malloc((size_t)NS * 4);
        random_tokens(p1, 1, L, plen, V, 41);
        random_tokens(c1, 1, NS, NULL, V, 42);
        memcpy(pr, p1, (size_t)L * 4), memcpy(cont, c1, (size_t)NS * 4);
        free(p1), free(c1);
    }
    DecoderCuda *d = decoder_cuda_new(&m->h, &m->r, m->p, B, max_len, NULL, &e);
    die_if(!d, &e, "decoder_cuda_new");
    decoder_cuda_use_graph(d, graph);
    float *ls = (float *)malloc((size_t)(B * NS * V) * 4), *lp = (float *)malloc((size_t)(B * V) * 4);
    float *lw = (float *)malloc((size_t)(B * NS * V) * 4), *row = (float *)malloc((size_t)(B * V) * 4);
    single_steps(m, d, B, pr, plen, L, cont, ls, lp);
    if (ls_out) memcpy(ls_out, ls, (size_t)(B * NS * V) * 4);
    // K-token verification windows, then accept(keep) and one step
    int64_t wbad = 0, abad = 0, wrows = 0, arows = 0;
    double wmx = 0, amx = 0;
    for (int K = 1; K <= 8; K++) {
        die_if(decoder_cuda_reset(d, B, &e) || decoder_cuda_feed_ragged(d, pr, L, plen, &e), &e, "prefill");
        int32_t *win = (int32_t *)malloc((size_t)(B * K) * 4);
        for (int64_t b = 0; b < B; b++) memcpy(win + b * K, cont + b * NS, (size_t)K * 4);
        decoder_cuda_window_begin(d);
        die_if(decoder_cuda_feed(d, win, K, NULL, 1, &e) != 0, &e, "window");
        decoder_cuda_logits_host(d, lw);  // [B, K, V]
        for (int64_t b = 0; b < B; b++) wbad += rows_differ(lw + b * K * V, ls + b * NS * V, K, V, &wmx);
        wrows += B * K;
        int32_t keep[8], col[8];
        for (int64_t b = 0; b < B; b++) {
            keep[b] = (int32_t)((K + 2 * b) % (K + 1));  // 0 .. K over the batches and K values
            col[b] = cont[b * NS + keep[b]];             // the next token: the single-step run's at that position
        }
        die_if(decoder_cuda_accept(d, keep, &e) != 0, &e, "accept");
        die_if(decoder_cuda_step(d, col, &e) != 0, &e, "step after accept");
        decoder_cuda_logits_host(d, row);
        for (int64_t b = 0; b < B; b++) abad += rows_differ(row + b * V, ls + (b * NS + keep[b]) * V, 1, V, &amx);
        arows += B;
        free(win);
    }
    check(wbad == 0, "%s: K-token verification windows (K = 1..8) == single decode steps, bitwise: %lld of %lld rows "
          "differ (max |diff| %.3e)", nm, (long long)wbad, (long long)wrows, wmx);
    check(abad == 0, "%s: the step after accept(keep) == the single-step run at that position, bitwise: %lld of %lld "
          "rows differ (max |diff| %.3e)", nm, (long long)abad, (long long)arows, amx);
    // a prefill of prompt + all continuation tokens with every row's logits, in one chunk and in 3-column chunks
    if (!graph) {
        const int64_t LP = L + NS;
        int32_t *pp = (int32_t *)calloc((size_t)(B * LP), 4);
        int64_t n[8];
        for (int64_t b = 0; b < B; b++) {
            memcpy(pp + b * LP, pr + b * L, (size_t)plen[b] * 4);
            memcpy(pp + b * LP + plen[b], cont + b * NS, (size_t)NS * 4);
            n[b] = plen[b] + NS;
        }
        float *la = (float *)malloc((size_t)(B * LP * V) * 4);
        for (int chunked = 0; chunked < 2; chunked++) {
            if (chunked) setenv("DISTILL_DECODE_ROWS", B == 1 ? "3" : "12", 1);
            DecoderCuda *dp = decoder_cuda_new(&m->h, &m->r, m->p, B, max_len, NULL, &e);
            if (chunked) unsetenv("DISTILL_DECODE_ROWS");
            die_if(!dp, &e, "decoder_cuda_new");
            die_if(decoder_cuda_reset(dp, B, &e) || decoder_cuda_feed(dp, pp, LP, n, 1, &e), &e, "prefill all logits");
            decoder_cuda_logits_host(dp, la);  // [B, LP, V]
            int64_t pbad = 0;
            double pmx = 0;
            for (int64_t b = 0; b < B; b++) {
                pbad += rows_differ(la + (b * LP + plen[b] - 1) * V, lp + b * V, 1, V, &pmx);       // the prompt's last
                pbad += rows_differ(la + (b * LP + plen[b]) * V, ls + b * NS * V, NS, V, &pmx);    // the steps'
            }
            check(pbad == 0, "%s: a prefill of prompt + %d tokens%s == the prefill + single steps, bitwise: %lld of %lld "
                  "rows differ (max |diff| %.3e)", nm, NS, chunked ? " in 3-column chunks" : "", (long long)pbad,
                  (long long)(B * (NS + 1)), pmx);
            decoder_cuda_free(dp);
        }
        free(pp), free(la);
    }
    decoder_cuda_free(d);
    free(pr), free(cont), free(ls), free(lp), free(lw), free(row);
}

static void test_decoder(const Model *hy, const Model *te) {
    const Model *ms[2] = {hy, te};
    const char *names[2] = {"hybrid", "teacher"};
    // batch 1: a 2500-token prompt (20 key tiles: enough that the legacy split count, capped by the tiles,
    // differs between steps and verifications even at batch 1); batch 4: 2500, 37, 1700 and 260 tokens
    const int64_t p1[1] = {2500}, p4[4] = {2500, 37, 1700, 260};
    const int64_t V = hy->h.base.vocab;
    float *l1 = (float *)malloc((size_t)(NS * V) * 4), *l4 = (float *)malloc((size_t)(4 * NS * V) * 4);
    float *g1 = (float *)malloc((size_t)(NS * V) * 4), *g4 = (float *)malloc((size_t)(4 * NS * V) * 4);
    for (int i = 0; i < 2; i++) {
        decoder_case(ms[i], names[i], 1, p1, 2500, false, l1);
        decoder_case(ms[i], names[i], 4, p4, 2500, false, l4);
        decoder_case(ms[i], names[i], 1, p1, 2500, true, g1);
        decoder_case(ms[i], names[i], 4, p4, 2500, true, g4);
        double mx = 0;
        const int64_t b14 = rows_differ(l1, l4, NS, V, &mx);  // sequence 0 of the batch = the batch-1 sequence
        check(b14 == 0, "%s: sequence 0 at batch 4 == alone at batch 1, bitwise: %lld of %d step rows differ (max %.3e)",
              names[i], (long long)b14, NS, mx);
        mx = 0;
        const int64_t bg = rows_differ(g4, l4, 4 * NS, V, &mx) + rows_differ(g1, l1, NS, V, &mx);
        check(bg == 0, "%s: graph-replayed steps == plain launches, bitwise: %lld of %d rows differ (max %.3e)", names[i],
              (long long)bg, 5 * NS, mx);
    }
    free(l1), free(l4), free(g1), free(g4);
}

// ---------------------------------------------------------------- 3. greedy speculative == plain greedy

// Fraction of the plain output's positions whose top-2 logits lie within 1% of the row's largest |logit|.
static double near_tie_fraction(const Model *t, const int32_t *pr, const int64_t *plen, int64_t LM, const int32_t *out,
                                const int64_t *nout, int64_t NP, int64_t NT) {
    DlError e;
    const int64_t V = t->h.base.vocab;
    DecoderCuda *d = decoder_cuda_new(&t->h, &t->r, t->p, 1, LM + NT + 4, NULL, &e);
    die_if(!d, &e, "decoder_cuda_new");
    int32_t *seq = (int32_t *)malloc((size_t)(LM + NT) * 4);
    float *lg = (float *)malloc((size_t)((LM + NT) * V) * 4);
    int64_t near = 0, tot = 0;
    for (int64_t s = 0; s < NP; s++) {
        const int64_t n = plen[s] + nout[s];
        memcpy(seq, pr + s * LM, (size_t)plen[s] * 4);
        memcpy(seq + plen[s], out + s * NT, (size_t)nout[s] * 4);
        die_if(decoder_cuda_reset(d, 1, &e) || decoder_cuda_feed(d, seq, n, NULL, 1, &e), &e, "teacher-forced feed");
        decoder_cuda_logits_host(d, lg);
        for (int64_t i = 0; i < nout[s]; i++) {  // row plen - 1 + i predicts output token i
            const float *x = lg + (plen[s] - 1 + i) * V;
            float a = -INFINITY, b = -INFINITY, mx = 0;
            for (int64_t v = 0; v < V; v++) {
                mx = fmaxf(mx, fabsf(x[v]));
                if (x[v] > a) b = a, a = x[v];
                else if (x[v] > b) b = x[v];
            }
            near += (a - b) <= 1e-2f * mx;
            tot++;
        }
    }
    decoder_cuda_free(d);
    free(seq), free(lg);
    return tot ? (double)near / tot : 0.0;
}

static void spec_equal_case(const Model *t, const Model *dr, const char *name) {
    DlError e;
    enum { NP = 16, LM = 2500, NT = 40 };  // contexts up to 20 key tiles
    const int64_t V = t->h.base.vocab;
    int64_t plen[NP];
    Rng g;
    rng_init(&g, 7, 7);
    for (int i = 0; i < NP; i++) plen[i] = 5 + (int64_t)rng_below(&g, LM - 4);
    plen[0] = LM;
    int32_t *pr = (int32_t *)malloc(sizeof(int32_t) * NP * LM);
    random_tokens(pr, NP, LM, plen, V, 51);
    int32_t *ref = (int32_t *)malloc(sizeof(int32_t) * NP * NT), *got = (int32_t *)malloc(sizeof(int32_t) * NP * NT);
    int64_t nref[NP], ngot[NP];
    const int ks[3] = {2, 4, 8}, bs[2] = {1, 4};
    const bool graph = true;  // as eval-spec runs
    bool first = true;
    for (int bi = 0; bi < 2; bi++) {
        const int64_t B = bs[bi];
        for (int ki = 0; ki < 3; ki++) {
            GenParams gp;
            memset(&gp, 0, sizeof gp);
            gp.k = ks[ki], gp.sp.greedy = true, gp.max_tokens = NT, gp.stop[0] = gp.stop[1] = -1;
            const int64_t ml = spec_max_len(LM, NT, gp.k);
            GenDecoder T, D;
            die_if(gen_decoder_new(&t->h, &t->r, t->p, B, ml, 1, graph, &T, &e) != 0, &e, "target");
            die_if(gen_decoder_new(&dr->h, &dr->r, dr->p, B, ml, 1, graph, &D, &e) != 0, &e, "draft");
            int equal = 0, first_div = -1;
            int64_t steps = 0, acc0 = 0;
            for (int64_t s0 = 0; s0 < NP; s0 += B) {
                Rng r1, r2;
                rng_init(&r1, 1, 0), rng_init(&r2, 1, 0);
                die_if(gen_plain(T, pr + s0 * LM, plen + s0, LM, &gp, &r1, ref + s0 * NT, nref + s0, &e) != 0, &e, "gen_plain");
                SpecStats st;
                die_if(gen_speculative(T, D, pr + s0 * LM, plen + s0, LM, &gp, &r2, got + s0 * NT, ngot + s0, &st, &e) != 0,
                       &e, "gen_speculative");
                steps += st.steps, acc0 += st.accepted_at[0];
            }
            for (int64_t s = 0; s < NP; s++) {
                int64_t i = 0;
                while (i < NT && ref[s * NT + i] == got[s * NT + i]) i++;
                if (i == NT && nref[s] == NT && ngot[s] == NT) equal++;
                else if (first_div < 0) first_div = (int)i;
            }
            check(equal == NP, "%s, batch %lld, K=%d: greedy speculative == plain greedy in %d of %d sequences (first "
                  "divergence at token %d; acceptance at position 0 %.2f)", name, (long long)B, gp.k, equal, NP, first_div,
                  (double)acc0 / (double)(steps > 0 ? steps : 1));
            if (first) {  // the plain outputs are near-ties: the case can fail
                const double f = near_tie_fraction(t, pr, plen, LM, ref, nref, NP, NT);
                check(f >= 0.3, "%s: %.0f%% of the plain greedy tokens are near-ties (top two logits within 1%% of the row's "
                      "largest |logit|; need >= 30%% for the case to have power)", name, 100 * f);
                first = false;
            }
            gen_decoder_free(&T), gen_decoder_free(&D);
        }
    }
    free(pr), free(ref), free(got);
}

static void test_spec(void) {
    DlError e;
    Model te, hy;
    model_make(&te, false, 61, true);
    model_make(&hy, true, 62, true);
    const Model *ms[2] = {&te, &hy};
    const char *nm[2] = {"near-tie teacher", "near-tie hybrid"};
    for (int i = 0; i < 2; i++) {
        Model cut;
        const int cl[2] = {0, 1};
        die_if(spec_draft_from_layers(&ms[i]->h, &ms[i]->r, ms[i]->p, cl, 2, &cut.h, &cut.r, &cut.p, &e) != 0, &e, "cut");
        char n1[96], n2[96];
        snprintf(n1, sizeof n1, "%s, 2-layer cut draft", nm[i]);
        snprintf(n2, sizeof n2, "%s, itself as draft", nm[i]);
        spec_equal_case(ms[i], &cut, n1);
        spec_equal_case(ms[i], ms[i], n2);
        free(cut.p);
        reg_free(&cut.r);
    }
    free(te.p), free(hy.p);
    reg_free(&te.r), reg_free(&hy.r);
}

// ---------------------------------------------------------------- 4. the sampler

extern "C" int sample_rows_cuda_reference(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s,
                                          const uint64_t *stream, const uint64_t *counter, int32_t *out, char *err,
                                          size_t errlen);  // sample_cuda.cu (not in decode_cuda.h: tests only)

#define SAMPLE_KINDS 13

// Logit i of a row of kind `kind` (variant j: a different random row of the same kind).
static float sample_logit(int kind, int64_t i, int64_t V, Rng *g) {
    switch (kind) {
        case 0: return (float)(2.0 * rng_normal(g));                                 // normal
        case 1: {                                                                     // peaked, like a language model
            const float v = (float)(2.5 * rng_normal(g) - 5.0);
            return i % 6151 == 17 ? 12.0f + (float)(i % 7) * 0.5f : v;
        }
        case 2: return roundf((float)(3.0 * rng_normal(g)) * 4.0f) / 4.0f;           // quantized: many ties
        case 3: return 0.5f;                                                          // all equal
        case 4: return i % 3 == 0 ? 1.0f : 0.0f;                                      // two levels of ties
        case 5: {                                                                     // NaN and -inf inside
            if (i % 97 == 5) return NAN;
            if (i % 89 == 7) return -INFINITY;
            return (float)(2.0 * rng_normal(g));
        }
        case 6: return i == V / 3 ? INFINITY : (float)(2.0 * rng_normal(g));         // +inf: infinite max
        case 7: return (float)(30.0 * rng_normal(g));                                 // wide: most weigh 0
        case 8: return i == V / 2 ? 0.0f : (float)(-30.0 + 4.0 * rng_uniform_f64(g)); // z around -28 at T 1
        case 9: return i % 2 ? NAN : -INFINITY;                                       // nothing finite
        case 10: return bf16_to_f32(f32_to_bf16((float)(3.0 * rng_normal(g))));      // bf16 values
        case 11: return -(float)i * 1e-3f;                                            // falling with the id
        default: return (float)i * 1e-3f;                                             // rising with the id
    }
}

static void test_sampler(void) {
    const int64_t Vs[5] = {64, 1000, 49152, 50257, 131072}, per_kind = 8, R = SAMPLE_KINDS * per_kind;
    const DecodeSampling settings[12] = {
        {0.7f, 0, 0.9f, 1},      // the generate stage's
        {1.0f, 0, 1.0f, 2},      // plain softmax
        {0.7f, 50, 0.9f, 3},     // top-k then top-p
        {1.3f, 20, 0.8f, 4},     //
        {1.0f, 1, 1.0f, 5},      // top-k 1
        {0.05f, 0, 0.5f, 6},     // cold
        {5.0f, 0, 0.95f, 7},     // hot: wide nucleus
        {1.0f, 0, 0.3f, 8},      //
        {1e-39f, 0, 0.9f, 9},    // 1/T overflows to inf
        {0.7f, 1000, 0.99f, 10}, //
        {0.0f, 0, 0.9f, 11},     // greedy
        {1.0f, 0, 0.999f, 12},   //
    };
    char err[256];
    Rng g;
    rng_init(&g, 4242, 9);
    for (int vi = 0; vi < 5; vi++) {
        const int64_t V = Vs[vi];
        float *hl = (float *)malloc((size_t)(R * V) * 4), *dl;
        for (int64_t r = 0; r < R; r++)
            for (int64_t i = 0; i < V; i++) hl[r * V + i] = sample_logit((int)(r % SAMPLE_KINDS), i, V, &g);
        uint64_t *hs = (uint64_t *)malloc((size_t)R * 8), *hc = (uint64_t *)malloc((size_t)R * 8), *ds, *dc;
        int32_t *ho = (int32_t *)malloc((size_t)R * 4), *hr = (int32_t *)malloc((size_t)R * 4), *dout;
        CK(cudaMalloc(&dl, (size_t)(R * V) * 4));
        CK(cudaMalloc(&ds, (size_t)R * 8));
        CK(cudaMalloc(&dc, (size_t)R * 8));
        CK(cudaMalloc(&dout, (size_t)R * 4));
        CK(cudaMemcpy(dl, hl, (size_t)(R * V) * 4, cudaMemcpyHostToDevice));
        int64_t draws = 0, bad = 0, shown = 0;
        for (int si = 0; si < 12; si++)
            for (int rep = 0; rep < 4; rep++) {
                for (int64_t r = 0; r < R; r++) hs[r] = (uint64_t)(r * 1000003 + rep), hc[r] = (uint64_t)(rep * 977 + r);
                CK(cudaMemcpy(ds, hs, (size_t)R * 8, cudaMemcpyHostToDevice));
                CK(cudaMemcpy(dc, hc, (size_t)R * 8, cudaMemcpyHostToDevice));
                for (int which = 0; which < 2; which++) {
                    CK(cudaMemset(dout, 0x7f, (size_t)R * 4));  // the same poison: a row left unwritten must match
                    const int rc = which ? sample_rows_cuda_reference(dl, R, V, &settings[si], ds, dc, dout, err, sizeof err)
                                         : sample_rows_cuda(dl, R, V, &settings[si], ds, dc, dout, err, sizeof err);
                    if (rc) {
                        printf("  FAIL sampler: refused: %s\n", err);
                        exit(1);
                    }
                    CK(cudaDeviceSynchronize());
                    CK(cudaMemcpy(which ? hr : ho, dout, (size_t)R * 4, cudaMemcpyDeviceToHost));
                }
                for (int64_t r = 0; r < R; r++) {
                    draws++;
                    if (ho[r] == hr[r]) continue;
                    bad++;
                    if (shown++ < 8)
                        printf("        sampler V %lld kind %d row %lld setting %d rep %d: fast %d, reference %d\n",
                               (long long)V, (int)(r % SAMPLE_KINDS), (long long)r, si, rep, ho[r], hr[r]);
                }
            }
        check(bad == 0, "sampler V = %lld: the fast kernel draws the reference's ids (%lld of %lld draws differ)",
              (long long)V, (long long)bad, (long long)draws);
        {  // argmax_rows_cuda (several blocks per row) == the sampler's greedy ids, twice on one workspace
            const size_t wsb = argmax_rows_workspace(R, V);
            void *ws;
            CK(cudaMalloc(&ws, wsb));
            CK(cudaMemset(ws, 0, wsb));
            CK(cudaMemset(dout, 0x7f, (size_t)R * 4));
            if (sample_rows_cuda(dl, R, V, &settings[10], ds, dc, dout, err, sizeof err)) {
                printf("  FAIL sampler: refused: %s\n", err);
                exit(1);
            }
            CK(cudaMemcpy(hr, dout, (size_t)R * 4, cudaMemcpyDeviceToHost));
            int64_t abad = 0;
            for (int rep = 0; rep < 4; rep++) {  // all rows, the first 3, all again, the first one: the counts stay right
                const int64_t rr = rep == 1 ? 3 : rep == 3 ? 1 : R;
                CK(cudaMemset(dout, 0x7f, (size_t)R * 4));
                CK(cudaMemcpy(dout + rr, hr + rr, (size_t)(R - rr) * 4, cudaMemcpyHostToDevice));
                if (argmax_rows_cuda(dl, rr, V, ws, dout, err, sizeof err)) {
                    printf("  FAIL argmax_rows_cuda: refused: %s\n", err);
                    exit(1);
                }
                CK(cudaDeviceSynchronize());
                CK(cudaMemcpy(ho, dout, (size_t)R * 4, cudaMemcpyDeviceToHost));
                for (int64_t r = 0; r < R; r++) abad += ho[r] != hr[r];
            }
            check(abad == 0, "argmax_rows_cuda V = %lld: the greedy ids of the sampler on %lld rows of %d kinds (NaN, "
                  "infinities, ties), calls of %lld, 3, %lld and 1 rows on one workspace (%lld differ)", (long long)V, (long long)R, SAMPLE_KINDS,
                  (long long)R, (long long)R, (long long)abad);
            CK(cudaFree(ws));
        }
        CK(cudaFree(dl));
        CK(cudaFree(ds));
        CK(cudaFree(dc));
        CK(cudaFree(dout));
        free(hl), free(hs), free(hc), free(ho), free(hr);
    }
}

// ---------------------------------------------------------------- 5. the attention kernels

// nb sequences, lc query rows each at positions lenb[b] + t (len: lenb, or NULL for random lengths): the
// decoder's three attention kernels (decode_attention_cuda 0: one block per (row, head); 1: per-tile blocks +
// fold; 2: one block per (row, KV group)) compared bit for bit, and against a float64 softmax (loose: bf16 out).
static void attn_case(int nh, int nkv, int hd, int64_t nb, int64_t lc, const int64_t *len, int64_t max_len, uint64_t seed) {
    const int64_t kvd = (int64_t)nkv * hd, qd = (int64_t)nh * hd, rows = nb * lc, cache = nb * max_len * kvd;
    const int G = nh / nkv;
    const bool gqa = nh % nkv == 0 && (hd == 64 || hd == 128) && (G == 1 || G == 2 || G == 3 || G == 4 || G == 8);
    Rng g;
    rng_init(&g, seed, 7);
    int32_t *hl = (int32_t *)malloc((size_t)nb * 4);
    int64_t maxkeys = 1, minkeys = max_len;
    for (int64_t b = 0; b < nb; b++) {
        hl[b] = (int32_t)(len ? len[b] : (int64_t)rng_below(&g, (uint64_t)(max_len - lc + 1)));
        maxkeys = hl[b] + lc > maxkeys ? hl[b] + lc : maxkeys;
        minkeys = hl[b] + 1 < minkeys ? hl[b] + 1 : minkeys;
    }
    uint16_t *hq = (uint16_t *)malloc((size_t)(rows * qd) * 2), *hk = (uint16_t *)malloc((size_t)cache * 2);
    uint16_t *hv = (uint16_t *)malloc((size_t)cache * 2), *ho[4];
    for (int64_t i = 0; i < rows * qd; i++) hq[i] = f32_to_bf16((float)(2.0 * rng_normal(&g)));
    for (int64_t i = 0; i < cache; i++) hk[i] = f32_to_bf16((float)rng_normal(&g)), hv[i] = f32_to_bf16((float)rng_normal(&g));
    void *dq, *dk, *dv, *dout;
    int32_t *dl;
    CK(cudaMalloc(&dq, (size_t)(rows * qd) * 2));
    CK(cudaMalloc(&dk, (size_t)cache * 2));
    CK(cudaMalloc(&dv, (size_t)cache * 2));
    CK(cudaMalloc(&dout, (size_t)(rows * qd) * 2));
    CK(cudaMalloc(&dl, (size_t)nb * 4));
    CK(cudaMemcpy(dq, hq, (size_t)(rows * qd) * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk, hk, (size_t)cache * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, hv, (size_t)cache * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dl, hl, (size_t)nb * 4, cudaMemcpyHostToDevice));
    char nm[200], err[256];
    snprintf(nm, sizeof nm, "attention %d heads / %d KV heads of %d, %lld sequences x %lld rows, keys %lld..%lld", nh, nkv,
             hd, (long long)nb, (long long)lc, (long long)minkeys, (long long)maxkeys);
    int rc[4];
    for (int k = 0; k < 4; k++) {
        ho[k] = (uint16_t *)malloc((size_t)(rows * qd) * 2);
        CK(cudaMemset(dout, 0xff, (size_t)(rows * qd) * 2));  // NaNs where a kernel writes nothing
        rc[k] = decode_attention_cuda(k, dq, dk, dv, dl, nb, lc, max_len, nh, nkv, hd, maxkeys, dout, err, sizeof err);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(ho[k], dout, (size_t)(rows * qd) * 2, cudaMemcpyDeviceToHost));
    }
    check(rc[0] == 0 && rc[1] == 0, "%s: the per-head and per-tile kernels run", nm);
    check(!memcmp(ho[0], ho[1], (size_t)(rows * qd) * 2), "%s: per-tile blocks + fold == one block per (row, head), bitwise", nm);
    if (gqa) {
        check(rc[2] == 0, "%s: the GQA kernel runs", nm);
        int64_t bad = 0;
        for (int64_t i = 0; i < rows * qd; i++) bad += ho[2][i] != ho[0][i];
        check(bad == 0, "%s: one block per (row, KV group) == one block per (row, head), bitwise: %lld of %lld values differ",
              nm, (long long)bad, (long long)(rows * qd));
        check(rc[3] == 0, "%s: the per-tile GQA kernel runs", nm);
        bad = 0;
        for (int64_t i = 0; i < rows * qd; i++) bad += ho[3][i] != ho[0][i];
        check(bad == 0, "%s: one block per (row, KV group, tile) + fold == one block per (row, head), bitwise: %lld of %lld "
              "values differ", nm, (long long)bad, (long long)(rows * qd));
    } else {
        check(rc[2] != 0 && rc[3] != 0, "%s: the GQA kernels are refused (not instantiated for this shape): %s", nm,
              rc[2] ? err : "ran");
    }
    // float64 reference of kernel 0's output (the others equal it bitwise or were refused)
    const double scale = 1.0 / sqrt((double)hd);
    double mx = 0;
    double *sc = (double *)malloc((size_t)max_len * 8), *o = (double *)malloc((size_t)hd * 8);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / lc, p = hl[b] + r % lc;
        for (int h = 0; h < nh; h++) {
            const uint16_t *qr = hq + (r * nh + h) * hd;
            const int64_t kv0 = b * max_len * kvd + (int64_t)(h / G) * hd;
            double m = -INFINITY, l = 0;
            for (int64_t j = 0; j <= p; j++) {
                double s = 0;
                for (int d = 0; d < hd; d++) s += (double)bf16_to_f32(qr[d]) * bf16_to_f32(hk[kv0 + j * kvd + d]);
                sc[j] = s * scale;
                m = fmax(m, sc[j]);
            }
            for (int d = 0; d < hd; d++) o[d] = 0;
            for (int64_t j = 0; j <= p; j++) {
                const double e = exp(sc[j] - m);
                l += e;
                for (int d = 0; d < hd; d++) o[d] += e * bf16_to_f32(hv[kv0 + j * kvd + d]);
            }
            for (int d = 0; d < hd; d++) {
                const double x = bf16_to_f32(ho[0][(r * nh + h) * hd + d]), ref = o[d] / l;
                const double dd = fabs(x - ref) / (1.0 + fabs(ref));
                mx = dd == dd ? fmax(mx, dd) : INFINITY;
            }
        }
    }
    check(mx < 1e-2, "%s: within 1e-2 of a float64 softmax (max |diff| / (1 + |ref|) %.2e)", nm, mx);
    free(sc), free(o);
    CK(cudaFree(dq));
    CK(cudaFree(dk));
    CK(cudaFree(dv));
    CK(cudaFree(dout));
    CK(cudaFree(dl));
    free(hl), free(hq), free(hk), free(hv), free(ho[0]), free(ho[1]), free(ho[2]), free(ho[3]);
}

// A decoder's logits as it runs by default == with the environment variable env=val (an A/B switch that must not
// change a bit), bitwise: an all-logits ragged prefill (600 / 37 / 300 / 129 tokens), 3 single steps, a 3-token
// all-logits window, accept and one more step.
static void env_ab_case(const Model *m, const char *name, const char *env, const char *val, const char *what) {
    DlError e;
    const int64_t B = 4, LP = 600, V = m->h.base.vocab, W = 3, NSTEP = 3;
    const int64_t n[4] = {600, 37, 300, 129}, rows = B * LP + NSTEP * B + B * W + B;
    int32_t *tok = (int32_t *)malloc((size_t)(B * LP) * 4), *more = (int32_t *)malloc((size_t)(B * (NSTEP + W + 1)) * 4);
    random_tokens(tok, B, LP, n, V, 77);
    random_tokens(more, B, NSTEP + W + 1, NULL, V, 78);
    float *la[2];
    for (int k = 0; k < 2; k++) {
        if (k) setenv(env, val, 1);
        DecoderCuda *d = decoder_cuda_new(&m->h, &m->r, m->p, B, LP + 16, NULL, &e);
        if (k) unsetenv(env);
        die_if(!d, &e, "decoder_cuda_new");
        float *o = la[k] = (float *)malloc((size_t)(rows * V) * 4);
        die_if(decoder_cuda_reset(d, B, &e) || decoder_cuda_feed(d, tok, LP, n, 1, &e), &e, "prefill all logits");
        decoder_cuda_logits_host(d, o);  // [B, LP, V]; rows past each n[b] are compared too (the same feed)
        o += B * LP * V;
        int32_t col[4], win[4 * 3];
        for (int64_t i = 0; i < NSTEP; i++, o += B * V) {
            for (int64_t b = 0; b < B; b++) col[b] = more[b * (NSTEP + W + 1) + i];
            die_if(decoder_cuda_step(d, col, &e) != 0, &e, "step");
            decoder_cuda_logits_host(d, o);
        }
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < W; j++) win[b * W + j] = more[b * (NSTEP + W + 1) + NSTEP + j];
        decoder_cuda_window_begin(d);
        die_if(decoder_cuda_feed(d, win, W, NULL, 1, &e) != 0, &e, "window");
        decoder_cuda_logits_host(d, o);
        o += B * W * V;
        const int32_t keep[4] = {0, 1, 2, 3};
        die_if(decoder_cuda_accept(d, keep, &e) != 0, &e, "accept");
        for (int64_t b = 0; b < B; b++) col[b] = more[b * (NSTEP + W + 1) + NSTEP + W];
        die_if(decoder_cuda_step(d, col, &e) != 0, &e, "step after accept");
        decoder_cuda_logits_host(d, o);
        decoder_cuda_free(d);
    }
    double mx = 0;
    const int64_t bad = rows_differ(la[0], la[1], rows, V, &mx);
    check(bad == 0, "%s: logits with %s == with %s=%s, bitwise (prefill, steps, a window, accept, a step): %lld of %lld "
          "rows differ (max |diff| %.3e)", name, what, env, val, (long long)bad, (long long)rows, mx);
    free(tok), free(more), free(la[0]), free(la[1]);
}

// Speculative windows of nb sequences (the in-place window inputs and the replay of all Mamba layers in one launch,
// DISTILL_DECODE_FUSE bit 4; several sequences are written in place when the window's capacity is its length) == the
// copy and the per-layer replay (DISTILL_DECODE_FUSE=15), bitwise, with and without CUDA graphs: a prefill, then
// windows of 4 tokens accepting 2, 0, 4 and 1 of them (sequence b keeps (keep + b) mod 5), a window fed in two parts
// (its feeds are copied), each followed by a step; every logit of every feed compared.
static void window_ab_case(const Model *m, const char *name, int64_t nb) {
    DlError e;
    const int64_t LP = 50, V = m->h.base.vocab, W = 4, NR = 5;
    const int32_t keeps[NR] = {2, 0, 4, 1, 3};
    const int64_t rows = nb * (1 + NR * (W + 1)), T = NR * (W + 1);
    int32_t *tok = (int32_t *)malloc((size_t)(nb * LP) * 4), *more = (int32_t *)malloc((size_t)(nb * T) * 4);
    int32_t w[8 * 4], kp[8];
    random_tokens(tok, nb, LP, NULL, V, 91);
    random_tokens(more, nb, T, NULL, V, 92);
    float *la[4];
    for (int k = 0; k < 4; k++) {  // k & 1: DISTILL_DECODE_FUSE=15 (reference); k & 2: graphs
        if (k & 1) setenv("DISTILL_DECODE_FUSE", "15", 1);
        DecoderCuda *d = decoder_cuda_new(&m->h, &m->r, m->p, nb + 1, LP + 64, NULL, &e);
        if (k & 1) unsetenv("DISTILL_DECODE_FUSE");
        die_if(!d, &e, "decoder_cuda_new");
        decoder_cuda_use_graph(d, (k & 2) != 0);
        float *o = la[k] = (float *)malloc((size_t)(rows * V) * 4);
        for (int64_t i = 0; i < rows * V; i++) o[i] = NAN;
        die_if(decoder_cuda_reset(d, nb, &e) || decoder_cuda_feed(d, tok, LP, NULL, 0, &e), &e, "prefill");
        decoder_cuda_logits_host(d, o), o += nb * V;
        for (int r = 0; r < NR; r++) {
            // w [nb, W]: this round's window tokens of each sequence; then its step token
            auto cols = [&](int64_t c0, int64_t n) {
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t j = 0; j < n; j++) w[b * n + j] = more[b * T + r * (W + 1) + c0 + j];
            };
            decoder_cuda_window_begin(d);
            if (r == NR - 1) {  // two feeds in one window
                cols(0, 2);
                die_if(decoder_cuda_feed(d, w, 2, NULL, 1, &e) != 0, &e, "window part 1");
                decoder_cuda_logits_host(d, o), o += nb * 2 * V;
                cols(2, 2);
                die_if(decoder_cuda_feed(d, w, 2, NULL, 1, &e) != 0, &e, "window part 2");
                decoder_cuda_logits_host(d, o), o += nb * 2 * V;
            } else {
                cols(0, W);
                die_if(decoder_cuda_feed(d, w, W, NULL, 1, &e) != 0, &e, "window");
                decoder_cuda_logits_host(d, o), o += nb * W * V;
            }
            for (int64_t b = 0; b < nb; b++) kp[b] = (keeps[r] + (int32_t)b) % 5;
            die_if(decoder_cuda_accept(d, kp, &e) != 0, &e, "accept");
            cols(W, 1);
            die_if(decoder_cuda_step(d, w, &e) != 0, &e, "step after accept");
            decoder_cuda_logits_host(d, o), o += nb * V;
        }
        decoder_cuda_free(d);
    }
    for (int k = 0; k < 4; k++) {
        if (k == 1) continue;
        double mx = 0;
        const int64_t bad = rows_differ(la[k], la[1], rows, V, &mx);
        check(bad == 0, "%s: %lld sequence(s)' windows (accepting 2, 0, 4, 1 of 4; one window in two feeds)%s%s == "
              "DISTILL_DECODE_FUSE=15 without graphs, bitwise: %lld of %lld rows differ (max |diff| %.3e)", name,
              (long long)nb, k & 1 ? " with DISTILL_DECODE_FUSE=15" : " in place, one replay launch", k & 2 ? ", graphs" : "",
              (long long)bad, (long long)rows, mx);
    }
    free(tok), free(more);
    for (int k = 0; k < 4; k++) free(la[k]);
}

static void test_attn(void) {
    const int64_t l1[4][1] = {{0}, {127}, {128}, {516}};
    for (int i = 0; i < 4; i++) attn_case(9, 3, 64, 1, 1, l1[i], 520, 10 + i);  // SmolLM2: 1 key .. 517 keys (5 tiles)
    attn_case(9, 3, 64, 5, 1, NULL, 700, 20);    // ragged
    attn_case(9, 3, 64, 64, 3, NULL, 600, 21);   // 3-token windows
    {
        int64_t *l = (int64_t *)malloc(512 * 8);
        for (int64_t b = 0; b < 512; b++) l[b] = b % 4 == 0 ? 512 : (b * 37) % 520;  // the generate stage's batch
        attn_case(9, 3, 64, 512, 1, l, 521, 22);
        free(l);
    }
    attn_case(3, 1, 64, 4, 4, NULL, 400, 23);    // the tests' small model
    attn_case(4, 4, 64, 6, 2, NULL, 300, 24);    // G = 1
    attn_case(4, 2, 64, 6, 2, NULL, 300, 25);    // G = 2
    attn_case(16, 2, 64, 3, 2, NULL, 300, 26);   // G = 8
    attn_case(2, 2, 128, 6, 1, NULL, 300, 27);   // hd 128, G = 1
    attn_case(6, 2, 128, 6, 2, NULL, 400, 28);   // G = 3
    attn_case(8, 2, 128, 16, 2, NULL, 300, 29);  // G = 4 (Llama-3-like)
    attn_case(16, 2, 128, 8, 1, NULL, 300, 30);  // G = 8
    attn_case(10, 2, 64, 4, 2, NULL, 300, 31);   // G = 5: no GQA kernel, refused
    attn_case(6, 2, 96, 4, 1, NULL, 300, 32);    // hd 96: refused
    Model hy, te;
    model_make(&hy, true, 1, false);
    model_make(&te, false, 2, false);
    const Model *ms[2] = {&hy, &te};
    const char *names[2] = {"hybrid", "teacher"};
    for (int i = 0; i < 2; i++) {
        env_ab_case(ms[i], names[i], "DISTILL_DECODE_ATTN", "tiles", "the GQA attention");
        env_ab_case(ms[i], names[i], "DISTILL_DECODE_FUSE", "0", "the fused rope + KV append and gate|up + SwiGLU");
        env_ab_case(ms[i], names[i], "DISTILL_DECODE_MULTI", "0", "the grouped projections");
    }
    window_ab_case(&hy, "hybrid", 1);
    window_ab_case(&hy, "hybrid", 3);
    free(hy.p), free(te.p);
    reg_free(&hy.r), reg_free(&te.r);
}

int main(int argc, char **argv) {
    const char *only = NULL;  // comma-separated sections, all by default
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--verbose")) g_verbose = 1;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else {
            fprintf(stderr, "usage: gpu_test_decode_inv [--verbose] [--only gemm,decoder,spec,sample,attn]\n");
            return 2;
        }
    }
    auto want = [&](const char *sec) { return !only || strstr(only, sec) != NULL; };
    cudaDeviceProp prop;
    int dev = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaGetDeviceProperties(&prop, dev));
    const char *inv = getenv("DISTILL_DECODE_INVARIANT");
    printf("gpu_test_decode_inv: %s, decoder arithmetic: %s\n", prop.name,
           inv && !strcmp(inv, "0") ? "LEGACY (DISTILL_DECODE_INVARIANT=0: sections 2-3 are expected to fail)" : "batch-invariant");
    if (want("gemm")) test_gemm();
    if (want("decoder")) {
        Model hy, te;
        model_make(&hy, true, 1, false);
        model_make(&te, false, 2, false);
        test_decoder(&hy, &te);
        free(hy.p), free(te.p);
        reg_free(&hy.r), reg_free(&te.r);
    }
    if (want("spec")) test_spec();
    if (want("sample")) test_sampler();
    if (want("attn")) test_attn();
    printf("gpu_test_decode_inv: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
