// selective_scan_cpu.c: fp32 CPU twins of the selective-scan kernels (forward, backward, decode steps).
// Layout and math: selective_scan.h. Work is split over (batch, C group) in the forward and over B groups in
// the backward, so that every reduction (dB over the channels of a B group, dA/dD/ddelta_bias over batch and
// time) is summed by one thread in a fixed order: results do not depend on the number of threads.
#include "kernels/scan/selective_scan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// softplus with F.softplus's threshold of 20, and its derivative (sigmoid below the threshold, 1 above)
static inline float softplus_f(float x) { return x <= 20.f ? log1pf(expf(x)) : x; }
static inline float dsoftplus_f(float x) { return x <= 20.f ? 1.f / (1.f + expf(-x)) : 1.f; }
static inline float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// Runs steps [t0, t1) of one C group (channels d0 .. d0+Dg-1) of batch row b, state h [Dg, N] in/out.
// Writes out[b,t,d] when out != NULL. Resets zero the state before their step.
static void fwd_group_steps(const ScanShape *s, int64_t b, int64_t gc, int64_t t0, int64_t t1, const float *u,
                            const float *dt, const float *A, const float *Bm, const float *Cm, const float *Dskip,
                            const float *z, const float *delta_bias, const uint8_t *reset, float *h, float *out) {
    const int64_t D = s->dim, N = s->dstate, L = s->seqlen, Gc = s->groups_c, Gb = s->groups_b;
    const int64_t Dg = D / Gc, d0 = gc * Dg, gb = d0 / (D / Gb);
    for (int64_t t = t0; t < t1; t++) {
        if (reset && reset[b * L + t]) memset(h, 0, (size_t)(Dg * N) * sizeof(float));
        const int64_t row = (b * L + t) * D;
        const float *Bt = Bm + ((b * L + t) * Gb + gb) * N;  // [N]
        const float *Ct = Cm + ((b * L + t) * Gc + gc) * N;  // [N]
        for (int64_t j = 0; j < Dg; j++) {
            const int64_t d = d0 + j;
            const float uu = u[row + d];
            const float delta = softplus_f(dt[row + d] + (delta_bias ? delta_bias[d] : 0.f));
            const float du = delta * uu;
            float *hj = h + j * N;
            const float *Ad = A + d * N;
            float y = 0.f;
            for (int64_t n = 0; n < N; n++) {
                hj[n] = expf(delta * Ad[n]) * hj[n] + du * Bt[n];
                y += Ct[n] * hj[n];
            }
            if (out) {
                y += Dskip[d] * uu;
                if (z) y *= z[row + d] * sigmoid_f(z[row + d]);
                out[row + d] = y;
            }
        }
    }
}

static void load_state(const ScanShape *s, int64_t b, int64_t gc, const float *hsrc, float *h) {
    const int64_t D = s->dim, N = s->dstate, Dg = D / s->groups_c;
    if (hsrc) memcpy(h, hsrc + (b * D + gc * Dg) * N, (size_t)(Dg * N) * sizeof(float));
    else memset(h, 0, (size_t)(Dg * N) * sizeof(float));
}
static void store_state(const ScanShape *s, int64_t b, int64_t gc, const float *h, float *hdst) {
    const int64_t D = s->dim, N = s->dstate, Dg = D / s->groups_c;
    if (hdst) memcpy(hdst + (b * D + gc * Dg) * N, h, (size_t)(Dg * N) * sizeof(float));
}

void selective_scan_fwd_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                            const float *Cm, const float *Dskip, const float *z, const float *delta_bias,
                            const uint8_t *reset, const float *h0, float *out, float *h_last) {
    const int64_t Dg = s->dim / s->groups_c, N = s->dstate;
#pragma omp parallel
    {
        float *h = malloc((size_t)(Dg * N) * sizeof(float));
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < s->batch; b++)
            for (int64_t gc = 0; gc < s->groups_c; gc++) {
                load_state(s, b, gc, h0, h);
                fwd_group_steps(s, b, gc, 0, s->seqlen, u, dt, A, Bm, Cm, Dskip, z, delta_bias, reset, h, out);
                store_state(s, b, gc, h, h_last);
            }
        free(h);
    }
}

void selective_scan_multi_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                              const float *Cm, const float *Dskip, const float *z, const float *delta_bias,
                              const float *h_in, const int32_t *keep, float *out, float *h_keep, float *h_end) {
    const int64_t Dg = s->dim / s->groups_c, N = s->dstate, K = s->seqlen;
#pragma omp parallel
    {
        float *h = malloc((size_t)(Dg * N) * sizeof(float));
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t b = 0; b < s->batch; b++)
            for (int64_t gc = 0; gc < s->groups_c; gc++) {
                int64_t k = keep ? keep[b] : K;
                k = k < 0 ? 0 : (k > K ? K : k);
                load_state(s, b, gc, h_in, h);  // read before h_keep (which may alias h_in) is written
                fwd_group_steps(s, b, gc, 0, k, u, dt, A, Bm, Cm, Dskip, z, delta_bias, NULL, h, out);
                store_state(s, b, gc, h, h_keep);
                fwd_group_steps(s, b, gc, k, K, u, dt, A, Bm, Cm, Dskip, z, delta_bias, NULL, h, out);
                store_state(s, b, gc, h, h_end);
            }
        free(h);
    }
}

void selective_scan_step_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                             const float *Cm, const float *Dskip, const float *z, const float *delta_bias, float *h,
                             float *out) {
    ScanShape s1 = *s;
    s1.seqlen = 1;
    selective_scan_multi_cpu(&s1, u, dt, A, Bm, Cm, Dskip, z, delta_bias, h, NULL, out, h, NULL);
}

// ---- backward ----------------------------------------------------------------------------------------------
// Per C group: a forward sweep keeps the state at every CHUNK-th step; then chunks are walked in reverse, each
// recomputed from its checkpoint into a [CHUNK+1, Dg, N] history, and the adjoint dh is carried backwards.
// Memory is O(L/CHUNK · Dg·N + CHUNK · Dg·N) per thread instead of O(L · Dg·N).
#define BWD_CHUNK 64

typedef struct {
    float *ck;    // [nchunks, Dg, N] state before each chunk
    float *hist;  // [CHUNK+1, Dg, N] hist[0] = state before the chunk's first step, hist[i] = after step i-1
    float *dh;    // [Dg, N] adjoint of the current state
} BwdScratch;

void selective_scan_bwd_cpu(const ScanShape *s, const float *u, const float *dt, const float *A, const float *Bm,
                            const float *Cm, const float *Dskip, const float *z, const float *delta_bias,
                            const uint8_t *reset, const float *h0, const float *dout, const float *dh_last,
                            float *du, float *ddt, float *dA, float *dB, float *dC, float *dD, float *dz,
                            float *ddelta_bias, float *dh0) {
    const int64_t Bsz = s->batch, L = s->seqlen, D = s->dim, N = s->dstate, Gc = s->groups_c, Gb = s->groups_b;
    const int64_t Dg = D / Gc, rep = Gc / Gb, nch = (L + BWD_CHUNK - 1) / BWD_CHUNK;
    const int64_t GN = Dg * N;
#pragma omp parallel
    {
        BwdScratch w;
        w.ck = malloc((size_t)((nch > 0 ? nch : 1) * GN) * sizeof(float));
        w.hist = malloc((size_t)((BWD_CHUNK + 1) * GN) * sizeof(float));
        w.dh = malloc((size_t)GN * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t gb = 0; gb < Gb; gb++) {
            // channels of this B group: C groups gb*rep .. gb*rep+rep-1; their dA/dD/ddelta_bias sums live in
            // the outputs themselves (zeroed here, summed over b then t in a fixed order)
            const int64_t c0 = gb * rep * Dg, nc = rep * Dg;
            memset(dA + c0 * N, 0, (size_t)(nc * N) * sizeof(float));
            memset(dD + c0, 0, (size_t)nc * sizeof(float));
            if (ddelta_bias) memset(ddelta_bias + c0, 0, (size_t)nc * sizeof(float));
            for (int64_t b = 0; b < Bsz; b++) {
                for (int64_t t = 0; t < L; t++) memset(dB + ((b * L + t) * Gb + gb) * N, 0, (size_t)N * sizeof(float));
                for (int64_t gc = gb * rep; gc < (gb + 1) * rep; gc++) {
                    const int64_t d0 = gc * Dg;
                    // forward sweep: checkpoints
                    float *h = w.hist;
                    load_state(s, b, gc, h0, h);
                    for (int64_t c = 0; c < nch; c++) {
                        memcpy(w.ck + c * GN, h, (size_t)GN * sizeof(float));
                        const int64_t t1 = (c + 1) * BWD_CHUNK < L ? (c + 1) * BWD_CHUNK : L;
                        fwd_group_steps(s, b, gc, c * BWD_CHUNK, t1, u, dt, A, Bm, Cm, Dskip, z, delta_bias, reset, h,
                                        NULL);
                    }
                    if (dh_last) memcpy(w.dh, dh_last + (b * D + d0) * N, (size_t)GN * sizeof(float));
                    else memset(w.dh, 0, (size_t)GN * sizeof(float));
                    for (int64_t c = nch - 1; c >= 0; c--) {
                        const int64_t ta = c * BWD_CHUNK, tb = (c + 1) * BWD_CHUNK < L ? (c + 1) * BWD_CHUNK : L;
                        // recompute the chunk's states: hist[i+1] = state after step ta+i
                        memcpy(w.hist, w.ck + c * GN, (size_t)GN * sizeof(float));
                        for (int64_t t = ta; t < tb; t++) {
                            float *hn = w.hist + (t - ta + 1) * GN;
                            memcpy(hn, hn - GN, (size_t)GN * sizeof(float));
                            fwd_group_steps(s, b, gc, t, t + 1, u, dt, A, Bm, Cm, Dskip, z, delta_bias, reset, hn,
                                            NULL);
                        }
                        for (int64_t t = tb - 1; t >= ta; t--) {
                            const int64_t row = (b * L + t) * D;
                            const int rs = reset && reset[b * L + t];
                            const float *Bt = Bm + ((b * L + t) * Gb + gb) * N;
                            const float *Ct = Cm + ((b * L + t) * Gc + gc) * N;
                            float *dBt = dB + ((b * L + t) * Gb + gb) * N;
                            float *dCt = dC + ((b * L + t) * Gc + gc) * N;
                            const float *ht = w.hist + (t - ta + 1) * GN, *hp = w.hist + (t - ta) * GN;
                            memset(dCt, 0, (size_t)N * sizeof(float));
                            for (int64_t j = 0; j < Dg; j++) {
                                const int64_t d = d0 + j;
                                const float uu = u[row + d], raw = dt[row + d] + (delta_bias ? delta_bias[d] : 0.f);
                                const float delta = softplus_f(raw);
                                const float *htj = ht + j * N, *hpj = hp + j * N, *Ad = A + d * N;
                                float *dhj = w.dh + j * N, *dAd = dA + d * N;
                                float gy = dout[row + d];
                                if (z) {
                                    float y = Dskip[d] * uu;
                                    for (int64_t n = 0; n < N; n++) y += Ct[n] * htj[n];
                                    const float zz = z[row + d], sg = sigmoid_f(zz);
                                    dz[row + d] = gy * y * sg * (1.f + zz * (1.f - sg));
                                    gy *= zz * sg;
                                }
                                dD[d] += gy * uu;
                                float dui = gy * Dskip[d], ddelta = 0.f;
                                for (int64_t n = 0; n < N; n++) {
                                    float g = dhj[n] + gy * Ct[n];  // dL/dh_t[n]
                                    dCt[n] += gy * htj[n];
                                    const float a = expf(delta * Ad[n]);
                                    const float hprev = rs ? 0.f : hpj[n];
                                    ddelta += g * (hprev * a * Ad[n] + Bt[n] * uu);
                                    dAd[n] += g * hprev * a * delta;
                                    dBt[n] += g * delta * uu;
                                    dui += g * delta * Bt[n];
                                    dhj[n] = rs ? 0.f : g * a;  // dL/dh_{t-1}[n]
                                }
                                du[row + d] = dui;
                                const float dtt = ddelta * dsoftplus_f(raw);
                                ddt[row + d] = dtt;
                                if (ddelta_bias) ddelta_bias[d] += dtt;
                            }
                        }
                    }
                    if (h0 && dh0) memcpy(dh0 + (b * D + d0) * N, w.dh, (size_t)GN * sizeof(float));
                }
            }
        }
        free(w.ck);
        free(w.hist);
        free(w.dh);
    }
}
