// gpu_bench_decode.cu: generation speed of DecoderCuda on SmolLM2-135M-shaped models with random weights:
// the teacher (30 attention layers) vs the 50% hybrid (attention at even layers, Mamba-1 at odd ones).
//   * decode: one step + sampling (T = 0.7, top-p 0.9: the demo recipe's loop) per token, at batch 1 and 64
//     and contexts 512 / 2k / 8k; the KV cache is filled by decoder_cuda_seek (zeroed rows), so no long
//     prefill is timed. Reported as tokens/s (batch * steps / s) and ms per step, and at batch 1 as the
//     bytes the step must read (bf16 weights + KV rows) over the time: the fraction of the HBM bandwidth.
//   * prefill: 64 ragged prompts of 30..300 tokens (the demo's prompt lengths), tokens/s.
//   * sampling alone at batch 64 over the 49152-token vocabulary.
//   --graph: decode steps replayed from a CUDA graph (DISTILL_DECODE_GRAPH=1): launch overhead removed.
//   The decoder's arithmetic is the batch-invariant one unless DISTILL_DECODE_INVARIANT=0 (the previous
//   cuBLASLt GEMMs and row-dependent key splits): run both for the cost of invariance (inv=1 / inv=0 below).
//   --gemm: only decode_gemm, every variant (decode_gemm_with) at M = 512 (--gemm-m M: at M rows, e.g. 1 for a
//     batch-1 decode step) on the generate stage's shapes (N, K) =
//     (576, 576) q/o, (3072, 576) gate+up, (576, 1536) down (bf16 out), (vocab, 576) head (fp32 out); each
//     variant's output is compared bitwise with variant 2's. --sample: only the sampler kernel at batch 512 over
//     the vocabulary (T 0.7, top-p 0.9), the fast path vs the general path alone (sample_rows_cuda_reference),
//     ids compared. Both flags: both parts.
//   --attn: only the decode attention kernels at batch 512, contexts 128 / 256 / 512, on the config's head shapes:
//     one block per (row, head) (attn_tiles_kernel<false>, what DISTILL_DECODE_ATTN=tiles forces) vs one block per
//     (row, KV group) (attn_gqa_kernel, the default for many rows), bits compared, and the bytes-over-bandwidth floor.
//     Combines with --gen / --gemm / --sample.
// Usage: gpu_bench_decode [--config recipes/configs/smollm2-135m.json] [--steps 32] [--hbm 3.35e12] [--graph]
//                         [--gemm [--gemm-m M]] [--sample] [--gen] [--attn]
// Prints RESULT lines: RESULT decode model=... B=... ctx=... graph=0|1 inv=0|1 tok_s=... ms_step=... hbm_frac=...;
// RESULT gemm M=... N=... K=... out=... variant=... us=... tflops=... same_bits=0|1 and RESULT gemm_best per shape;
// RESULT sample_kernel B=... V=... rows=... fast_ms=... ref_ms=... speedup=... same_ids=0|1;
// RESULT attn kernel=tiles|gqa B=512 ctx=... us=... floor_us=... floor_frac=... and RESULT attn_ab ... same_bits=0|1.
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_bf16.h>

#include "kernels/engine/decode_cuda.h"
#include "kernels/engine/decode_gemm.h"

extern "C" {
#include "distill/model_io.h"
#include "distill/rng.h"
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die_if(bool bad, const DlError *e, const char *what) {
    if (bad) {
        fprintf(stderr, "gpu_bench_decode: %s: %s\n", what, e->msg);
        exit(1);
    }
}

// Random weights in usual ranges (speed only; finite logits keep the sampler on its normal path).
static void fill_random(const Registry *r, float *p, uint64_t seed) {
    Rng g;
    rng_init(&g, seed, 5);
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        float *x = p + t->offset;
        const bool alog = strstr(t->name, "A_log"), dtb = strstr(t->name, "dt_proj.bias"), conv = strstr(t->name, "conv1d");
        const double sd = t->ndim >= 2 ? 1.0 / sqrt((double)t->shape[t->ndim - 1]) : 0.0;
        for (int64_t j = 0; j < t->numel; j++) {
            if (alog) x[j] = logf(1.0f + (float)(j % t->shape[t->ndim - 1]));
            else if (dtb) x[j] = -4.0f;
            else if (t->ndim == 1 || conv) x[j] = conv ? 0.25f : 1.0f;
            else x[j] = (float)(sd * (2.0 * rng_uniform_f64(&g) - 1.0) * 1.7320508);
        }
    }
}

// bf16 bytes of the weights a decode step reads (every matrix once; the tied head counted once).
static double weight_bytes(const Registry *r) {
    double n = 0;
    for (int i = 0; i < r->n; i++) n += (double)r->t[i].numel;
    return 2 * n;
}

extern "C" int sample_rows_cuda_reference(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s,
                                          const uint64_t *stream, const uint64_t *counter, int32_t *out, char *err,
                                          size_t errlen);  // sample_cuda.cu (not in decode_cuda.h)

#define CKB(call)                                                                                  \
    do {                                                                                           \
        const cudaError_t ce_ = (call);                                                            \
        if (ce_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "gpu_bench_decode: %s: %s\n", #call, cudaGetErrorString(ce_));         \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

// Every decode_gemm variant at M rows on the generate stage's shapes; the fastest per shape.
// Milliseconds per call of f: `warm` untimed calls, then `reps` between two events on the default stream.
template <typename F>
static double time_calls(F f, int warm, int reps) {
    cudaEvent_t e0, e1;
    CKB(cudaEventCreate(&e0));
    CKB(cudaEventCreate(&e1));
    for (int r = 0; r < warm; r++) f();
    CKB(cudaEventRecord(e0));
    for (int r = 0; r < reps; r++) f();
    CKB(cudaEventRecord(e1));
    CKB(cudaEventSynchronize(e1));
    float ms;
    CKB(cudaEventElapsedTime(&ms, e0, e1));
    CKB(cudaEventDestroy(e0));
    CKB(cudaEventDestroy(e1));
    return ms / reps;
}

static void bench_gemm(int64_t M, int64_t vocab, int64_t d, int64_t ffn) {
    const int64_t shapes[4][2] = {{d, d}, {2 * ffn, d}, {d, ffn}, {vocab, d}};
    for (int si = 0; si < 4; si++) {
        const int64_t N = shapes[si][0], K = shapes[si][1];
        const bool head = si == 3;
        const DType odt = head ? DT_F32 : DT_BF16;
        const size_t osz = head ? 4 : 2;
        Rng g;
        rng_init(&g, (uint64_t)(N * 7 + K), 11);
        __nv_bfloat16 *hx = (__nv_bfloat16 *)malloc((size_t)(M * K) * 2), *hw = (__nv_bfloat16 *)malloc((size_t)(N * K) * 2);
        for (int64_t i = 0; i < M * K; i++) hx[i] = __float2bfloat16_rn((float)(2.0 * rng_uniform_f64(&g) - 1.0));
        for (int64_t i = 0; i < N * K; i++) hw[i] = __float2bfloat16_rn((float)((2.0 * rng_uniform_f64(&g) - 1.0) / sqrt((double)K)));
        void *dx, *dw, *dy;
        CKB(cudaMalloc(&dx, (size_t)(M * K) * 2));
        CKB(cudaMalloc(&dw, (size_t)(N * K) * 2));
        CKB(cudaMalloc(&dy, (size_t)(M * N) * osz));
        CKB(cudaMemcpy(dx, hx, (size_t)(M * K) * 2, cudaMemcpyHostToDevice));
        CKB(cudaMemcpy(dw, hw, (size_t)(N * K) * 2, cudaMemcpyHostToDevice));
        char *ref = (char *)malloc((size_t)(M * N) * osz), *out = (char *)malloc((size_t)(M * N) * osz);
        double best = 1e30;
        int best_v = -1;
        // variant 2 first (the reference bits: the choice for M > 64 until 0f35392), then 0, 1, 3, 4, ... until refused
        for (int k = 0;; k++) {
            const int v = k == 0 ? 2 : k <= 2 ? k - 1 : k;
            char err[256];
            if (decode_gemm_with(v, odt, dy, dx, dw, NULL, M, N, K, 0, NULL, err, sizeof err)) break;
            CKB(cudaDeviceSynchronize());
            CKB(cudaMemcpy(k == 0 ? ref : out, dy, (size_t)(M * N) * osz, cudaMemcpyDeviceToHost));
            const int same = k == 0 || !memcmp(ref, out, (size_t)(M * N) * osz);
            char tile[64];
            decode_gemm_variant_name(v, tile, sizeof tile);
            const double us = 1e3 * time_calls([&]() { decode_gemm_with(v, odt, dy, dx, dw, NULL, M, N, K, 0, NULL, err, sizeof err); },
                                               3, head ? 20 : 200);
            printf("RESULT gemm M=%lld N=%lld K=%lld out=%s variant=%d tile=\"%s\" us=%.2f tflops=%.1f same_bits=%d\n",
                   (long long)M, (long long)N, (long long)K, head ? "f32" : "bf16", v, tile, us,
                   2.0 * M * N * K / (us * 1e-6) / 1e12, same);
            if (same && us < best) best = us, best_v = v;
        }
        printf("RESULT gemm_best M=%lld N=%lld K=%lld variant=%d us=%.2f (decode_gemm_variant(%lld) = %d)\n", (long long)M,
               (long long)N, (long long)K, best_v, best, (long long)M, decode_gemm_variant(M));
        CKB(cudaFree(dx));
        CKB(cudaFree(dw));
        CKB(cudaFree(dy));
        free(hx), free(hw), free(ref), free(out);
    }
}

// The sampler kernel alone on B rows of V logits: the fast kernel vs the reference, same ids expected.
static void bench_sample(int64_t B, int64_t V) {
    const DecodeSampling ds = {0.7f, 0, 0.9f, 1};
    float *hl = (float *)malloc((size_t)(B * V) * 4), *dl;
    uint64_t *hs = (uint64_t *)malloc((size_t)B * 8), *ds_, *dc;
    int32_t *ho = (int32_t *)malloc((size_t)B * 4), *hr = (int32_t *)malloc((size_t)B * 4), *dout;
    CKB(cudaMalloc(&dl, (size_t)(B * V) * 4));
    CKB(cudaMalloc(&ds_, (size_t)B * 8));
    CKB(cudaMalloc(&dc, (size_t)B * 8));
    CKB(cudaMalloc(&dout, (size_t)B * 4));
    for (int64_t b = 0; b < B; b++) hs[b] = (uint64_t)b;
    CKB(cudaMemcpy(ds_, hs, (size_t)B * 8, cudaMemcpyHostToDevice));
    CKB(cudaMemcpy(dc, hs, (size_t)B * 8, cudaMemcpyHostToDevice));
    const char *kinds[2] = {"normal", "peaked"};  // N(0, 2^2) logits; or N(-5, 2.5^2) with a few at 12..15
    for (int kind = 0; kind < 2; kind++) {
        Rng g;
        rng_init(&g, 99 + kind, 4);
        for (int64_t i = 0; i < B * V; i++) {
            const double z = rng_normal(&g);
            hl[i] = kind == 0 ? (float)(2.0 * z) : (i % V) % 6151 == 17 ? 12.0f + (float)((i % V) % 7) * 0.5f : (float)(2.5 * z - 5.0);
        }
        CKB(cudaMemcpy(dl, hl, (size_t)(B * V) * 4, cudaMemcpyHostToDevice));
        double ms2[2];
        for (int which = 0; which < 2; which++) {
            char err[256];
            auto call = [&]() {
                const int rc = which ? sample_rows_cuda_reference(dl, B, V, &ds, ds_, dc, dout, err, sizeof err)
                                     : sample_rows_cuda(dl, B, V, &ds, ds_, dc, dout, err, sizeof err);
                if (rc) {
                    fprintf(stderr, "gpu_bench_decode: sample: %s\n", err);
                    exit(1);
                }
            };
            call();
            CKB(cudaDeviceSynchronize());
            CKB(cudaMemcpy(which ? hr : ho, dout, (size_t)B * 4, cudaMemcpyDeviceToHost));
            ms2[which] = time_calls(call, 0, 20);
        }
        printf("RESULT sample_kernel B=%lld V=%lld rows=%s T=0.7 top_p=0.9 fast_ms=%.3f ref_ms=%.3f speedup=%.1f same_ids=%d\n",
               (long long)B, (long long)V, kinds[kind], ms2[0], ms2[1], ms2[1] / ms2[0], !memcmp(ho, hr, (size_t)B * 4));
    }
    CKB(cudaFree(dl));
    CKB(cudaFree(ds_));
    CKB(cudaFree(dc));
    CKB(cudaFree(dout));
    free(hl), free(hs), free(ho), free(hr);
}

// Random bf16 in [-1, 1) from a hash of the index (the bench only needs finite values).
__global__ void fill_bf16_kernel(__nv_bfloat16 *x, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
        x[i] = __float2bfloat16_rn((float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}

// --attn: the decode attention alone at batch 512 (one query per sequence at position ctx, keys 0..ctx) on the
// model's head shapes, contexts 128 / 256 / 512: the per-(row, head) kernel (attn_tiles_kernel<false>, "tiles")
// and the per-(row, KV group) kernel (attn_gqa_kernel, "gqa"), their outputs compared bitwise; floor = the bytes
// one call must read and write (q, every sequence's K and V rows 0..ctx, out) over the HBM bandwidth.
static void bench_attn(const LlamaConfig *c, double hbm) {
    const int64_t B = 512, max_len = 1024, nh = c->n_head, nkv = c->n_kv_head, hd = c->head_dim, kvd = nkv * hd;
    const int64_t qn = B * nh * hd, cache = B * max_len * kvd;
    __nv_bfloat16 *dq, *dk, *dv, *dout;
    int32_t *dl;
    CKB(cudaMalloc(&dq, (size_t)qn * 2));
    CKB(cudaMalloc(&dk, (size_t)cache * 2));
    CKB(cudaMalloc(&dv, (size_t)cache * 2));
    CKB(cudaMalloc(&dout, (size_t)qn * 2));
    CKB(cudaMalloc(&dl, (size_t)B * 4));
    fill_bf16_kernel<<<1024, 256>>>(dq, qn, 1u);
    fill_bf16_kernel<<<4096, 256>>>(dk, cache, 2u);
    fill_bf16_kernel<<<4096, 256>>>(dv, cache, 3u);
    CKB(cudaGetLastError());
    int32_t *hl = (int32_t *)malloc((size_t)B * 4);
    uint16_t *ho[2] = {(uint16_t *)malloc((size_t)qn * 2), (uint16_t *)malloc((size_t)qn * 2)};
    const char *names[2] = {"tiles", "gqa"};
    const int kern[2] = {0, 2};
    const int64_t ctxs[3] = {128, 256, 512};
    for (int ci = 0; ci < 3; ci++) {
        const int64_t ctx = ctxs[ci];
        for (int64_t b = 0; b < B; b++) hl[b] = (int32_t)ctx;
        CKB(cudaMemcpy(dl, hl, (size_t)B * 4, cudaMemcpyHostToDevice));
        const double bytes = 2.0 * qn * 2 + 2.0 * B * (ctx + 1) * kvd * 2, floor_us = bytes / hbm * 1e6;
        double us[2] = {0, 0};
        for (int k = 0; k < 2; k++) {
            char err[256];
            auto call = [&]() {
                if (decode_attention_cuda(kern[k], dq, dk, dv, dl, B, 1, max_len, (int)nh, (int)nkv, (int)hd, ctx + 1, dout, err,
                                          sizeof err)) {
                    fprintf(stderr, "gpu_bench_decode: attention: %s\n", err);
                    exit(1);
                }
            };
            CKB(cudaMemset(dout, 0xff, (size_t)qn * 2));
            call();
            CKB(cudaDeviceSynchronize());
            CKB(cudaMemcpy(ho[k], dout, (size_t)qn * 2, cudaMemcpyDeviceToHost));
            us[k] = 1e3 * time_calls(call, 3, 50);
            printf("RESULT attn kernel=%s B=%lld ctx=%lld nh=%lld nkv=%lld hd=%lld us=%.1f floor_us=%.1f floor_frac=%.2f GB_s=%.0f\n",
                   names[k], (long long)B, (long long)ctx, (long long)nh, (long long)nkv, (long long)hd, us[k], floor_us,
                   floor_us / us[k], bytes / (us[k] * 1e-6) / 1e9);
        }
        printf("RESULT attn_ab B=%lld ctx=%lld tiles_us=%.1f gqa_us=%.1f speedup=%.2f same_bits=%d\n", (long long)B,
               (long long)ctx, us[0], us[1], us[0] / us[1], !memcmp(ho[0], ho[1], (size_t)qn * 2));
    }
    CKB(cudaFree(dq));
    CKB(cudaFree(dk));
    CKB(cudaFree(dv));
    CKB(cudaFree(dout));
    CKB(cudaFree(dl));
    free(hl), free(ho[0]), free(ho[1]);
}

// --gen: the generate stage's loop on the teacher at batch 512 (continuous batching, stage_generate.c): a decode
// step + sampling at contexts 128 / 256 / 512, and a refill feed (128 new prompts of L tokens beside 384 running
// sequences that feed 1 token each, all 512 x L columns computed) against a prefill of the 128 prompts alone.
static void bench_gen(const LoadedModel *lm, int steps) {
    DlError e;
    const int64_t B = 512, V = lm->hc.base.vocab, L = 100, NEW = 128;
    DecodeSampling ds = {0.7f, 0, 0.9f, 1};
    DecoderCuda *d = decoder_cuda_new(&lm->hc, &lm->reg, lm->params, B, 1024, stdout, &e);
    die_if(!d, &e, "decoder_cuda_new");
    int32_t *tok = (int32_t *)calloc((size_t)(B * L), 4), *next = (int32_t *)calloc((size_t)B, 4);
    uint64_t *st = (uint64_t *)calloc((size_t)B, 8), *ctr = (uint64_t *)calloc((size_t)B, 8);
    int64_t n[512];
    for (int64_t b = 0; b < B; b++) st[b] = (uint64_t)b, next[b] = (int32_t)(b % V);
    const int64_t ctxs[3] = {128, 256, 512};
    for (int ci = 0; ci < 3; ci++) {
        die_if(decoder_cuda_reset(d, B, &e) || decoder_cuda_seek(d, ctxs[ci], &e), &e, "seek");
        for (int s = 0; s < 3; s++)
            die_if(decoder_cuda_step(d, next, &e) || decoder_cuda_sample(d, &ds, st, ctr, next, &e), &e, "warm-up");
        double t0 = now(), ts = 0;
        for (int s = 0; s < steps; s++) {
            die_if(decoder_cuda_step(d, next, &e) != 0, &e, "step");
            cudaDeviceSynchronize();
            const double t1 = now();
            die_if(decoder_cuda_sample(d, &ds, st, ctr, next, &e) != 0, &e, "sample");
            ts += now() - t1;
        }
        const double sec = now() - t0;
        printf("RESULT gen_step B=%lld ctx=%lld ms_step=%.3f (sample %.3f) tok_s=%.0f\n", (long long)B, (long long)ctxs[ci],
               sec / steps * 1e3, ts / steps * 1e3, B * steps / sec);
    }
    for (int64_t i = 0; i < B * L; i++) tok[i] = (int32_t)((i * 131 + 7) % V);
    double best_mix = 1e30, best_new = 1e30;
    for (int rep = 0; rep < 4; rep++) {
        die_if(decoder_cuda_reset(d, B, &e) || decoder_cuda_seek(d, 256, &e), &e, "seek");
        for (int64_t b = 0; b < B; b++) n[b] = b < NEW ? L : 1;
        for (int64_t b = 0; b < NEW; b++) die_if(decoder_cuda_reset_seq(d, b, &e), &e, "reset_seq");
        cudaDeviceSynchronize();
        double t0 = now();
        die_if(decoder_cuda_feed_ragged(d, tok, L, n, &e), &e, "refill feed");
        cudaDeviceSynchronize();
        if (rep) best_mix = fmin(best_mix, now() - t0);
        die_if(decoder_cuda_reset(d, NEW, &e), &e, "reset");
        cudaDeviceSynchronize();
        t0 = now();
        die_if(decoder_cuda_feed_ragged(d, tok, L, NULL, &e), &e, "prefill");
        cudaDeviceSynchronize();
        if (rep) best_new = fmin(best_new, now() - t0);
    }
    printf("RESULT gen_refill B=%lld new=%lld L=%lld mixed_ms=%.2f alone_ms=%.2f\n", (long long)B, (long long)NEW, (long long)L,
           best_mix * 1e3, best_new * 1e3);
    decoder_cuda_free(d);
    free(tok), free(next), free(st), free(ctr);
}

int main(int argc, char **argv) {
    const char *cfg = "recipes/configs/smollm2-135m.json";
    int steps = 32;
    double hbm = 3.35e12;  // H100 SXM
    int graph = 0, only_gemm = 0, only_sample = 0, only_gen = 0, only_attn = 0;
    int64_t gemm_m = 512;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc) cfg = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hbm") && i + 1 < argc) hbm = atof(argv[++i]);
        else if (!strcmp(argv[i], "--graph")) graph = 1;
        else if (!strcmp(argv[i], "--gemm")) only_gemm = 1;
        else if (!strcmp(argv[i], "--gemm-m") && i + 1 < argc) gemm_m = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--sample")) only_sample = 1;
        else if (!strcmp(argv[i], "--gen")) only_gen = 1;
        else if (!strcmp(argv[i], "--attn")) only_attn = 1;
        else {
            fprintf(stderr, "usage: gpu_bench_decode [--config PATH] [--steps N] [--hbm BYTES_PER_S] [--graph] [--gemm] "
                            "[--gemm-m M] [--sample] [--gen] [--attn]\n");
            return 2;
        }
    }
    if (gemm_m < 1 || gemm_m > 65536) {
        fprintf(stderr, "gpu_bench_decode: --gemm-m %lld outside 1..65536\n", (long long)gemm_m);
        return 2;
    }
    DlError e;
    cudaDeviceProp prop;
    int dev = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    if (graph) setenv("DISTILL_DECODE_GRAPH", "1", 1);
    const char *ienv = getenv("DISTILL_DECODE_INVARIANT");
    const int inv = !(ienv && !strcmp(ienv, "0"));
    const char *aenv = getenv("DISTILL_DECODE_ATTN");
    const int tiles = aenv && !strcmp(aenv, "tiles");
    printf("gpu_bench_decode: %s, config %s, %d steps per point%s, %s arithmetic, many-rows attention: %s\n", prop.name,
           cfg, steps, graph ? ", CUDA graphs" : "", inv ? "batch-invariant" : "legacy (DISTILL_DECODE_INVARIANT=0)",
           tiles ? "one block per (row, head) (DISTILL_DECODE_ATTN=tiles)" : "one block per (row, KV group) where instantiated");

    LoadedModel lm;
    die_if(model_load(cfg, 1, &lm, &e) != 0, &e, "model_load");
    // the 50% hybrid: attention kept at even layers
    const LlamaConfig *c = &lm.hc.base;
    if (only_gemm || only_sample || only_gen || only_attn) {
        if (only_attn) bench_attn(c, hbm);
        if (only_gen) bench_gen(&lm, steps);
        if (only_gemm) bench_gemm(gemm_m, c->vocab, c->d_model, c->d_ff);
        if (only_sample) bench_sample(512, c->vocab);
        model_free(&lm);
        return 0;
    }
    HybridConfig hh;
    int attn[256], na = 0;
    for (int l = 0; l < c->n_layer; l += 2) attn[na++] = l;
    die_if(hybrid_config_init(&hh, c, MIXER_MAMBA1, attn, na, &e) != 0, &e, "hybrid_config_init");
    Registry hr;
    model_build_registry(&hh, &hr);
    float *hp = (float *)malloc((size_t)hr.numel * 4);
    fill_random(&hr, hp, 2);

    struct {
        const char *name;
        const HybridConfig *h;
        const Registry *r;
        const float *p;
    } models[2] = {{"teacher", &lm.hc, &lm.reg, lm.params}, {"hybrid50", &hh, &hr, hp}};
    const int64_t batches[3] = {1, 4, 64}, ctxs[3] = {512, 2048, 8192};
    const int64_t V = c->vocab, kvd = (int64_t)c->n_kv_head * c->head_dim;
    DecodeSampling ds = {0.7f, 0, 0.9f, 1};
    for (int mi = 0; mi < 2; mi++) {
        const double wb = weight_bytes(models[mi].r);
        const int n_attn = hybrid_n_attn(models[mi].h);
        for (int bi = 0; bi < 3; bi++) {
            const int64_t B = batches[bi];
            DecoderCuda *d = decoder_cuda_new(models[mi].h, models[mi].r, models[mi].p, B, ctxs[2] + steps + 8, stdout, &e);
            die_if(!d, &e, "decoder_cuda_new");
            int32_t *tok = (int32_t *)calloc((size_t)(B * 300), 4), *next = (int32_t *)calloc((size_t)B, 4);
            uint64_t *st = (uint64_t *)calloc((size_t)B, 8), *ctr = (uint64_t *)calloc((size_t)B, 8);
            for (int64_t b = 0; b < B; b++) st[b] = (uint64_t)b;
            if (B == 64) {  // prefill: ragged prompts of 30..300 tokens
                int64_t n[64], total = 0;
                for (int64_t b = 0; b < B; b++) {
                    n[b] = 30 + (b * 270) / 63;
                    total += n[b];
                    for (int64_t t = 0; t < 300; t++) tok[b * 300 + t] = (int32_t)((b * 977 + t * 131) % V);
                }
                double best = 1e30;
                for (int rep = 0; rep < 4; rep++) {
                    die_if(decoder_cuda_reset(d, B, &e) != 0, &e, "reset");
                    cudaDeviceSynchronize();
                    double t0 = now();
                    die_if(decoder_cuda_feed_ragged(d, tok, 300, n, &e) != 0, &e, "prefill");
                    decoder_cuda_sample(d, &ds, st, ctr, next, &e);  // synchronizes
                    if (rep) best = fmin(best, now() - t0);
                }
                printf("RESULT prefill model=%s B=%lld inv=%d prompt_tokens=%lld ms=%.2f tok_s=%.0f (padded to 300: %.0f)\n",
                       models[mi].name, (long long)B, inv, (long long)total, best * 1e3, total / best, B * 300 / best);
                // sampling alone
                double t0 = now();
                for (int rep = 0; rep < 20; rep++) decoder_cuda_sample(d, &ds, st, ctr, next, &e);
                printf("RESULT sample B=%lld V=%lld T=0.7 top_p=0.9 ms=%.3f\n", (long long)B, (long long)V,
                       (now() - t0) / 20 * 1e3);
            }
            for (int ci = 0; ci < 3; ci++) {
                const int64_t ctx = ctxs[ci];
                die_if(decoder_cuda_reset(d, B, &e) != 0, &e, "reset");
                die_if(decoder_cuda_seek(d, ctx, &e) != 0, &e, "seek");
                for (int64_t b = 0; b < B; b++) next[b] = (int32_t)(b % V);
                for (int s = 0; s < 3; s++) {  // warm-up
                    die_if(decoder_cuda_step(d, next, &e) != 0, &e, "step");
                    die_if(decoder_cuda_sample(d, &ds, st, ctr, next, &e) != 0, &e, "sample");
                }
                double t0 = now();
                for (int s = 0; s < steps; s++) {
                    die_if(decoder_cuda_step(d, next, &e) != 0, &e, "step");
                    for (int64_t b = 0; b < B; b++) ctr[b] = (uint64_t)s;
                    die_if(decoder_cuda_sample(d, &ds, st, ctr, next, &e) != 0, &e, "sample");
                }
                const double sec = now() - t0, ms = sec / steps * 1e3;
                // bytes a step reads at batch B: weights once + every sequence's K and V rows
                const double bytes = wb + (double)B * n_attn * 2.0 * (ctx + 3 + steps / 2) * kvd * 2;
                printf("RESULT decode model=%s B=%lld ctx=%lld graph=%d inv=%d tok_s=%.0f ms_step=%.3f read_GB=%.3f hbm_frac=%.2f\n",
                       models[mi].name, (long long)B, (long long)ctx, graph, inv, B * steps / sec, ms, bytes / 1e9,
                       bytes / (ms * 1e-3) / hbm);
            }
            decoder_cuda_free(d);
            free(tok), free(next), free(st), free(ctr);
        }
    }
    free(hp);
    reg_free(&hr);
    model_free(&lm);
    return 0;
}
