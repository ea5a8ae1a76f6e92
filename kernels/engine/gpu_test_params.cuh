// gpu_test_params.cuh: random weights in the usual ranges of each tensor kind, for the engine's GPU test and
// benchmark programs (not part of the library): matrices N(0, 1/in), norms 1 + noise, A_log = log(1..N),
// D near 1, dt_proj.bias near -3, conv weights N(0, 0.3^2), embeddings N(0, 0.5^2). bf16_round: round every
// value to bf16, so that a CPU reference and a bf16 GPU engine hold the same model.
#pragma once
#include <math.h>
#include <string.h>

extern "C" {
#include "distill/dtype.h"
#include "distill/registry.h"
#include "distill/rng.h"
}

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
