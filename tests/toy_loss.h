// toy_loss.h: a nonlinear per-sample loss over every trainable element of a registry, for the data-parallel
// tests (test_zero, test_checkpoint_shard): loss_i = sum_x w_ix (0.5 (p_x - t_ix)^2 + sin(3 p_x) / 30), with
// w in [0.5, 1.5) and t in [-1, 1) hashed from (sample i, element x), so any rank can make any sample.
#pragma once
#include <math.h>
#include <stdint.h>

#include "distill/registry.h"

static inline uint64_t toy_mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

// uniform in [0, 1), from (a, b)
static inline float toy_unit(uint64_t a, uint64_t b) {
    return (float)((toy_mix(a * 0x9E3779B97F4A7C15ULL + b) >> 40) / (double)(1 << 24));
}

// Adds c * d loss_i / d p into g (registry layout), over trainable tensors.
static inline void toy_add_sample_grad(const Registry *reg, int64_t i, const float *p, float c, float *g) {
    for (int k = 0; k < reg->n; k++) {
        const TensorInfo *t = &reg->t[k];
        if (!t->trainable) continue;
        for (int64_t j = 0; j < t->numel; j++) {
            int64_t x = t->offset + j;
            float w = 0.5f + toy_unit((uint64_t)i, (uint64_t)x), tg = 2.0f * toy_unit((uint64_t)i + 1000, (uint64_t)x) - 1.0f;
            g[x] += c * (w * (p[x] - tg) + 0.1f * w * cosf(3.0f * p[x]));
        }
    }
}
