// conv1d_silu_cpu.c: fp32 CPU twins of the causal depthwise conv1d (+ bias, + SiLU), token-major [B,L,C].
// Work is split over blocks of channels; every reduction (dw, dbias over batch and time) is summed by one
// thread in a fixed order, so results do not depend on the number of threads.
#include "kernels/scan/selective_scan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CONV_CBLK 64  // channels per task: contiguous in memory, so the inner loops run over c

// First time step whose input the window of step t may read: the last reset at or before t, or -(W-1)
// (x_prev) / 0 (zeros before t = 0) when there is none.
static inline int64_t window_start(int64_t t, int64_t last_reset, int W, int has_prev) {
    (void)t;
    if (last_reset >= 0) return last_reset;
    return has_prev ? -(int64_t)(W - 1) : 0;
}

// x at time tt (>= -(W-1)) of row b, channel c
static inline float x_at(const float *x, const float *x_prev, int64_t b, int64_t L, int64_t C, int W, int64_t tt,
                         int64_t c) {
    if (tt >= 0) return x[(b * L + tt) * C + c];
    return x_prev[(b * (W - 1) + (W - 1) + tt) * C + c];
}

static inline float silu_f(float v) { return v / (1.f + expf(-v)); }

void conv1d_silu_fwd_cpu(int64_t B, int64_t L, int64_t C, int W, const float *x, const float *w, const float *bias,
                         const uint8_t *reset, const float *x_prev, int silu, float *out) {
    const int64_t nblk = (C + CONV_CBLK - 1) / CONV_CBLK;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++)
        for (int64_t cb = 0; cb < nblk; cb++) {
            const int64_t ca = cb * CONV_CBLK, ce = ca + CONV_CBLK < C ? ca + CONV_CBLK : C;
            int64_t last_reset = -1;
            for (int64_t t = 0; t < L; t++) {
                if (reset && reset[b * L + t]) last_reset = t;
                const int64_t ts = window_start(t, last_reset, W, x_prev != NULL);
                for (int64_t c = ca; c < ce; c++) {
                    float acc = bias ? bias[c] : 0.f;
                    for (int k = 0; k < W; k++) {
                        const int64_t tt = t - (W - 1) + k;
                        if (tt >= ts) acc += w[c * W + k] * x_at(x, x_prev, b, L, C, W, tt, c);
                    }
                    out[(b * L + t) * C + c] = silu ? silu_f(acc) : acc;
                }
            }
        }
}

void conv1d_silu_bwd_cpu(int64_t B, int64_t L, int64_t C, int W, const float *x, const float *w, const float *bias,
                         const uint8_t *reset, const float *x_prev, int silu, const float *dout, float *dx, float *dw,
                         float *dbias) {
    const int64_t nblk = (C + CONV_CBLK - 1) / CONV_CBLK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t cb = 0; cb < nblk; cb++) {
        const int64_t ca = cb * CONV_CBLK, ce = ca + CONV_CBLK < C ? ca + CONV_CBLK : C;
        memset(dw + ca * W, 0, (size_t)((ce - ca) * W) * sizeof(float));
        if (dbias) memset(dbias + ca, 0, (size_t)(ce - ca) * sizeof(float));
        for (int64_t b = 0; b < B; b++) {
            for (int64_t t = 0; t < L; t++) memset(dx + (b * L + t) * C + ca, 0, (size_t)(ce - ca) * sizeof(float));
            int64_t last_reset = -1;
            for (int64_t t = 0; t < L; t++) {
                if (reset && reset[b * L + t]) last_reset = t;
                const int64_t ts = window_start(t, last_reset, W, x_prev != NULL);
                for (int64_t c = ca; c < ce; c++) {
                    float g = dout[(b * L + t) * C + c];
                    if (silu) {  // recompute the pre-activation for SiLU's derivative
                        float acc = bias ? bias[c] : 0.f;
                        for (int k = 0; k < W; k++) {
                            const int64_t tt = t - (W - 1) + k;
                            if (tt >= ts) acc += w[c * W + k] * x_at(x, x_prev, b, L, C, W, tt, c);
                        }
                        const float sg = 1.f / (1.f + expf(-acc));
                        g *= sg * (1.f + acc * (1.f - sg));
                    }
                    if (dbias) dbias[c] += g;
                    for (int k = 0; k < W; k++) {
                        const int64_t tt = t - (W - 1) + k;
                        if (tt < ts) continue;
                        dw[c * W + k] += g * x_at(x, x_prev, b, L, C, W, tt, c);
                        if (tt >= 0) dx[(b * L + tt) * C + c] += g * w[c * W + k];
                    }
                }
            }
        }
    }
}

void conv1d_state_advance_cpu(int64_t B, int64_t K, int64_t C, int W, const float *x, const int32_t *keep,
                              float *conv_state) {
    const int64_t S = W - 1;
    for (int64_t b = 0; b < B; b++) {
        int64_t k = keep ? keep[b] : K;
        k = k < 0 ? 0 : (k > K ? K : k);
        // new state = last S entries of [old state | first k tokens]; in place, i ascending reads index k+i >= i
        for (int64_t i = 0; i < S; i++)
            for (int64_t c = 0; c < C; c++)
                conv_state[(b * S + i) * C + c] =
                    k + i < S ? conv_state[(b * S + k + i) * C + c] : x[(b * K + k + i - S) * C + c];
    }
}
