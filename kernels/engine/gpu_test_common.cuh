// gpu_test_common.cuh: what the engine's GPU test programs share (not part of the library): pass/fail
// counting with check(), fatal-error exits (die_if, CK), the relative error norm, and random weights in the usual
// ranges of each tensor kind.
#pragma once
#include <cuda_runtime.h>
#include <errno.h>  // program_invocation_short_name (glibc)
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "distill/dtype.h"
#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"
#include "distill/rng.h"
}

static int g_fail = 0, g_pass = 0, g_verbose = 0;

// A setup step that must not fail (an engine, a forward): its message and exit 1.
static inline void die_if(bool bad, const DlError *e, const char *what) {
    if (!bad) return;
    fprintf(stderr, "%s: %s: %s\n", program_invocation_short_name, what, e ? e->msg : "");
    exit(1);
}

// A CUDA runtime call of the test itself.
#define CK(call)                                                                                              \
    do {                                                                                                      \
        cudaError_t e_ = (call);                                                                              \
        if (e_ != cudaSuccess) {                                                                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));            \
            exit(1);                                                                                          \
        }                                                                                                     \
    } while (0)

// Counts a check; prints it when it fails (or always with --verbose).
// The small Llama the decode and ZeRO tests build their hybrids from: 4 layers, d 192, 3 heads (1 KV head) of 64,
// d_ff 384, vocabulary 520.
static inline void test_small_llama(LlamaConfig *c, bool tied) {
    memset(c, 0, sizeof *c);
    c->n_layer = 4, c->d_model = 192, c->n_head = 3, c->n_kv_head = 1, c->head_dim = 64, c->d_ff = 384, c->vocab = 520;
    c->max_pos = 4096, c->rope_theta = 10000.0, c->rms_eps = 1e-5, c->tied_embeddings = tied, c->bos_id = c->eos_id = -1;
}

static void check(bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (!ok || g_verbose) {
        printf("%s ", ok ? "  ok  " : "  FAIL");
        vprintf(fmt, ap);
        printf("\n");
    }
    va_end(ap);
    ok ? g_pass++ : g_fail++;
}

// |a - b| / |b| over n values (fp64 sums; |a - b| when b is all zero; infinity on non-finite values).
static double relerr(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    if (!isfinite(num)) return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

// Random weights: matrices N(0, 1/in), norms 1 + noise, A_log = log(1..N), D near 1, dt_proj.bias near -3,
// conv weights N(0, 0.3^2), embeddings N(0, 0.5^2). bf16_round: round every value to bf16, so that a CPU
// reference and a bf16 GPU engine hold the same model.
static void test_params_init(const Registry *r, float *p, uint64_t seed, uint64_t stream, bool bf16_round) {
    Rng g;
    rng_init(&g, seed, stream);
    memset(p, 0, (size_t)r->numel * sizeof(float));
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        float *x = p + t->offset;
        const char *nm = t->name;
        for (int64_t j = 0; j < t->numel; j++) {
            double z = rng_normal(&g);
            float v;
            if (strstr(nm, "norm")) v = (float)(1.0 + 0.1 * z);
            else if (strstr(nm, "A_log")) v = (float)log(1.0 + (double)(j % t->shape[t->ndim - 1])) + (float)(0.05 * z);
            else if (strstr(nm, ".D")) v = (float)(1.0 + 0.1 * z);
            else if (strstr(nm, "dt_proj.bias")) v = (float)(-3.0 + 0.5 * z);
            else if (strstr(nm, "conv1d")) v = (float)(0.3 * z);
            else if (strstr(nm, "embed") || strstr(nm, "lm_head")) v = (float)(0.5 * z);
            else v = (float)(z / sqrt((double)t->shape[t->ndim - 1]));
            x[j] = bf16_round ? bf16_to_f32(f32_to_bf16(v)) : v;
        }
    }
}
