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
// Usage: gpu_bench_decode [--config recipes/configs/smollm2-135m.json] [--steps 32] [--hbm 3.35e12] [--graph]
// Prints RESULT lines: RESULT decode model=... B=... ctx=... graph=0|1 inv=0|1 tok_s=... ms_step=... hbm_frac=...
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/engine/decode_cuda.h"

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

int main(int argc, char **argv) {
    const char *cfg = "recipes/configs/smollm2-135m.json";
    int steps = 32;
    double hbm = 3.35e12;  // H100 SXM
    int graph = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc) cfg = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hbm") && i + 1 < argc) hbm = atof(argv[++i]);
        else if (!strcmp(argv[i], "--graph")) graph = 1;
        else {
            fprintf(stderr, "usage: gpu_bench_decode [--config PATH] [--steps N] [--hbm BYTES_PER_S] [--graph]\n");
            return 2;
        }
    }
    DlError e;
    cudaDeviceProp prop;
    int dev = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    if (graph) setenv("DISTILL_DECODE_GRAPH", "1", 1);
    const char *ienv = getenv("DISTILL_DECODE_INVARIANT");
    const int inv = !(ienv && !strcmp(ienv, "0"));
    printf("gpu_bench_decode: %s, config %s, %d steps per point%s, %s arithmetic\n", prop.name, cfg, steps,
           graph ? ", CUDA graphs" : "", inv ? "batch-invariant" : "legacy (DISTILL_DECODE_INVARIANT=0)");

    LoadedModel lm;
    die_if(model_load(cfg, 1, &lm, &e) != 0, &e, "model_load");
    // the 50% hybrid: attention kept at even layers
    const LlamaConfig *c = &lm.hc.base;
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
