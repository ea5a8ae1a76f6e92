// ssd_cpu.c: CPU twin of the chunked SSD scan (see ssd.h for the math and layouts).
// One (batch, head) pair is one independent job: its chunks run in order, each chunk doing the intra-chunk
// quadratic form plus the contribution of the state passed in from the previous chunk.
#include "kernels/ssd/ssd.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// F.softplus with threshold 20 (returns v itself above it) and its derivative.
static inline float softplus_f(float v) { return v > 20.f ? v : log1pf(expf(v)); }
static inline float softplus_grad(float v) { return v > 20.f ? 1.f : 1.f / (1.f + expf(-v)); }

// Dot product, vectorized with a fixed lane order (the same bits for any thread count).
static inline float dotf(const float *a, const float *b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// Per-thread scratch for one (b, h) job.
typedef struct {
    float *delta, *a, *cum;  // [Q]: delta_t, dA_t = delta_t*A, cum_m = sum_{j<=m} dA_j
    int *seg;                // [Q]: number of resets at chunk positions <= m
    float *Lm;               // [Q,Q]: exp(sum_{j=k+1..m} dA_j) for k <= m in the same segment, else 0
    float *CB;               // [Q,Q]: C_m . B_k
    float *tmp;              // [Q] scratch
} Chunk;

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz);
    if (!p) abort();  // the kernel API has no error channel; callers size buffers, this is scratch of O(Q^2 + P*N)
    return p;
}

static void chunk_alloc(Chunk *c, int64_t Q) {
    c->delta = xcalloc((size_t)Q, sizeof(float));
    c->a = xcalloc((size_t)Q, sizeof(float));
    c->cum = xcalloc((size_t)Q, sizeof(float));
    c->tmp = xcalloc((size_t)Q, sizeof(float));
    c->seg = xcalloc((size_t)Q, sizeof(int));
    c->Lm = xcalloc((size_t)(Q * Q), sizeof(float));
    c->CB = xcalloc((size_t)(Q * Q), sizeof(float));
}
static void chunk_free(Chunk *c) {
    free(c->delta), free(c->a), free(c->cum), free(c->tmp), free(c->seg), free(c->Lm), free(c->CB);
}

// Fills the chunk scratch for batch b, head h (group g), tokens t0 .. t0+q-1.
static void chunk_prep(const SsdShape *s, Chunk *c, int64_t b, int64_t h, int64_t g, int64_t t0, int64_t q,
                       const float *dt, const float *A, const float *Bm, const float *Cm, const float *dt_bias,
                       const uint8_t *reset) {
    const int64_t L = s->seqlen, H = s->nheads, G = s->ngroups, N = s->dstate, Q = s->chunk;
    const float Ah = A[h], bias = dt_bias ? dt_bias[h] : 0.f;
    float run = 0.f;
    int sg = 0;
    for (int64_t m = 0; m < q; m++) {
        const int64_t t = t0 + m;
        float v = dt[(b * L + t) * H + h] + bias;
        c->delta[m] = s->dt_softplus ? softplus_f(v) : v;
        c->a[m] = c->delta[m] * Ah;
        run += c->a[m];
        c->cum[m] = run;
        if (reset && reset[b * L + t]) sg++;
        c->seg[m] = sg;
    }
    for (int64_t m = 0; m < q; m++) {
        float *row = c->Lm + m * Q;
        float acc = 0.f;  // sum_{j=k+1..m} dA_j, accumulated directly so it is <= 0 exactly
        row[m] = 1.f;
        for (int64_t k = m - 1; k >= 0; k--) {
            acc += c->a[k + 1];
            row[k] = c->seg[k] == c->seg[m] ? expf(acc) : 0.f;
        }
        for (int64_t k = m + 1; k < q; k++) row[k] = 0.f;
        const float *Cv = Cm + ((b * L + t0 + m) * G + g) * N;
        float *cb = c->CB + m * Q;
        for (int64_t k = 0; k <= m; k++) {
            if (row[k] == 0.f) {
                cb[k] = 0.f;
                continue;
            }
            const float *Bv = Bm + ((b * L + t0 + k) * G + g) * N;
            cb[k] = dotf(Cv, Bv, N);
        }
    }
}

// S = [seg_last == 0] exp(cum_last) S_in + sum_{k <= last, same segment} Lm[last,k] delta_k x_k ⊗ B_k.
// S may alias S_in.
static void chunk_state(const SsdShape *s, const Chunk *c, int64_t b, int64_t h, int64_t g, int64_t t0, int64_t last,
                        const float *x, const float *Bm, const float *S_in, float *S) {
    const int64_t L = s->seqlen, H = s->nheads, G = s->ngroups, P = s->headdim, N = s->dstate, Q = s->chunk;
    const float decay = c->seg[last] == 0 ? expf(c->cum[last]) : 0.f;
    for (int64_t i = 0; i < P * N; i++) S[i] = decay * S_in[i];
    const float *row = c->Lm + last * Q;
    for (int64_t k = 0; k <= last; k++) {
        const float w = row[k] * c->delta[k];
        if (w == 0.f) continue;
        const float *xv = x + ((b * L + t0 + k) * H + h) * P;
        const float *Bv = Bm + ((b * L + t0 + k) * G + g) * N;
        for (int64_t p = 0; p < P; p++) {
            const float wx = w * xv[p];
            float *Sp = S + p * N;
            for (int64_t n = 0; n < N; n++) Sp[n] += wx * Bv[n];
        }
    }
}

void ssd_fwd_cpu(const SsdShape *s, const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                 const float *D, const float *dt_bias, const uint8_t *reset, const float *h0, float *y, float *h_last,
                 const int32_t *keep, float *h_keep) {
    const int64_t Bn = s->batch, L = s->seqlen, H = s->nheads, G = s->ngroups, P = s->headdim, N = s->dstate;
    const int64_t Q = s->chunk, rep = H / G;
#pragma omp parallel
    {
        Chunk c;
        chunk_alloc(&c, Q);
        float *S = xcalloc((size_t)(P * N), sizeof(float));
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < Bn; b++) {
            for (int64_t h = 0; h < H; h++) {
                const int64_t g = h / rep;
                const float Dh = D ? D[h] : 0.f;
                if (h0) memcpy(S, h0 + (b * H + h) * P * N, (size_t)(P * N) * sizeof(float));
                else memset(S, 0, (size_t)(P * N) * sizeof(float));
                const int64_t kp = keep && h_keep ? keep[b] : -1;  // state wanted after kp tokens
                float *Hk = h_keep ? h_keep + (b * H + h) * P * N : NULL;
                if (kp == 0) memmove(Hk, S, (size_t)(P * N) * sizeof(float));
                for (int64_t t0 = 0; t0 < L; t0 += Q) {
                    const int64_t q = L - t0 < Q ? L - t0 : Q;
                    chunk_prep(s, &c, b, h, g, t0, q, dt, A, Bm, Cm, dt_bias, reset);
                    for (int64_t m = 0; m < q; m++) {
                        const int64_t t = t0 + m;
                        const float *xm = x + ((b * L + t) * H + h) * P;
                        const float *Cv = Cm + ((b * L + t) * G + g) * N;
                        float *ym = y + ((b * L + t) * H + h) * P;
                        // incoming state, D skip
                        const float din = c.seg[m] == 0 ? expf(c.cum[m]) : 0.f;
                        for (int64_t p = 0; p < P; p++) {
                            const float acc = din != 0.f ? dotf(S + p * N, Cv, N) : 0.f;
                            ym[p] = din * acc + Dh * xm[p];
                        }
                        // intra-chunk quadratic form
                        const float *row = c.Lm + m * Q, *cb = c.CB + m * Q;
                        for (int64_t k = 0; k <= m; k++) {
                            const float coef = cb[k] * row[k] * c.delta[k];
                            if (coef == 0.f) continue;
                            const float *xk = x + ((b * L + t0 + k) * H + h) * P;
                            for (int64_t p = 0; p < P; p++) ym[p] += coef * xk[p];
                        }
                    }
                    if (kp - 1 >= t0 && kp - 1 < t0 + q) chunk_state(s, &c, b, h, g, t0, kp - 1 - t0, x, Bm, S, Hk);
                    chunk_state(s, &c, b, h, g, t0, q - 1, x, Bm, S, S);
                }
                if (h_last) memmove(h_last + (b * H + h) * P * N, S, (size_t)(P * N) * sizeof(float));
            }
        }
        free(S);
        chunk_free(&c);
    }
}

void ssd_bwd_cpu(const SsdShape *s, const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                 const float *D, const float *dt_bias, const uint8_t *reset, const float *h0, const float *dy,
                 const float *dh_last, float *dx, float *ddt, float *dA, float *dBm, float *dCm, float *dD,
                 float *ddt_bias, float *dh0) {
    const int64_t Bn = s->batch, L = s->seqlen, H = s->nheads, G = s->ngroups, P = s->headdim, N = s->dstate;
    const int64_t Q = s->chunk, rep = H / G, nch = (L + Q - 1) / Q;
    // Per-head gradients of Bm/Cm go to their own rows when heads do not share groups; otherwise to
    // per-head scratch [B,L,H,N], summed over the heads of each group afterwards in head order.
    float *dBh = dBm, *dCh = dCm;
    if (rep > 1) {
        dBh = xcalloc((size_t)(Bn * L * H * N), sizeof(float));
        dCh = xcalloc((size_t)(Bn * L * H * N), sizeof(float));
    }
    const int64_t GH = rep > 1 ? H : G;  // row stride (in N-vectors) of dBh / dCh per token
    // per-(b,h) partial sums of dA, dD, ddt_bias, reduced over b in order at the end
    float *pA = xcalloc((size_t)(Bn * H), sizeof(float));
    float *pD = xcalloc((size_t)(Bn * H), sizeof(float));
    float *pbias = xcalloc((size_t)(Bn * H), sizeof(float));
#pragma omp parallel
    {
        Chunk c;
        chunk_alloc(&c, Q);
        float *Sin = xcalloc((size_t)(nch * P * N), sizeof(float));  // state entering each chunk
        float *dS = xcalloc((size_t)(P * N), sizeof(float));         // gradient w.r.t. the chunk's outgoing state
        float *dSin = xcalloc((size_t)(P * N), sizeof(float));
        float *dG = xcalloc((size_t)(Q * Q), sizeof(float));          // dy_m . x_k
        float *M = xcalloc((size_t)(Q * Q), sizeof(float));           // dLoss/d(interval sum (k,m]) of dA
        float *dBS = xcalloc((size_t)(Q * P), sizeof(float));         // dS B_k [P] per k
        float *ddelta = xcalloc((size_t)Q, sizeof(float));
        float *da = xcalloc((size_t)Q, sizeof(float));
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < Bn; b++) {
            for (int64_t h = 0; h < H; h++) {
                const int64_t g = h / rep;
                const float Ah = A[h], Dh = D ? D[h] : 0.f, bias = dt_bias ? dt_bias[h] : 0.f;
                double accA = 0, accD = 0, accBias = 0;
                // recompute the state entering every chunk
                if (h0) memcpy(Sin, h0 + (b * H + h) * P * N, (size_t)(P * N) * sizeof(float));
                else memset(Sin, 0, (size_t)(P * N) * sizeof(float));
                for (int64_t ci = 0; ci + 1 < nch; ci++) {
                    const int64_t t0 = ci * Q;
                    chunk_prep(s, &c, b, h, g, t0, Q, dt, A, Bm, Cm, dt_bias, reset);
                    chunk_state(s, &c, b, h, g, t0, Q - 1, x, Bm, Sin + ci * P * N, Sin + (ci + 1) * P * N);
                }
                if (dh_last) memcpy(dS, dh_last + (b * H + h) * P * N, (size_t)(P * N) * sizeof(float));
                else memset(dS, 0, (size_t)(P * N) * sizeof(float));
                for (int64_t ci = nch - 1; ci >= 0; ci--) {
                    const int64_t t0 = ci * Q, q = L - t0 < Q ? L - t0 : Q, last = q - 1;
                    const float *S0 = Sin + ci * P * N;
                    chunk_prep(s, &c, b, h, g, t0, q, dt, A, Bm, Cm, dt_bias, reset);
                    const float *Lrow_last = c.Lm + last * Q;
                    // dG[m,k] = dy_m . x_k (k <= m, connected)
                    for (int64_t m = 0; m < q; m++) {
                        const float *dym = dy + ((b * L + t0 + m) * H + h) * P;
                        for (int64_t k = 0; k <= m; k++) {
                            dG[m * Q + k] =
                                c.Lm[m * Q + k] != 0.f ? dotf(dym, x + ((b * L + t0 + k) * H + h) * P, P) : 0.f;
                        }
                    }
                    // dS B_k (for dx) and x_k^T dS B_k (for ddelta and the decay)
                    for (int64_t k = 0; k < q; k++) {
                        const float *Bv = Bm + ((b * L + t0 + k) * G + g) * N;
                        for (int64_t p = 0; p < P; p++) dBS[k * P + p] = dotf(dS + p * N, Bv, N);
                    }
                    for (int64_t m = 0; m < q; m++) {
                        ddelta[m] = 0.f;
                        da[m] = 0.f;
                    }
                    for (int64_t i = 0; i < q * Q; i++) M[i] = 0.f;
                    // dx, ddelta, dB, and the interval-sum gradients M
                    for (int64_t k = 0; k < q; k++) {
                        const int64_t tk = t0 + k;
                        const float *xk = x + ((b * L + tk) * H + h) * P;
                        const float *dyk = dy + ((b * L + tk) * H + h) * P;
                        float *dxk = dx + ((b * L + tk) * H + h) * P;
                        float *dBk = dBh + ((b * L + tk) * GH + (rep > 1 ? h : g)) * N;
                        const float wk = Lrow_last[k] * c.delta[k];  // weight of token k in the outgoing state
                        for (int64_t p = 0; p < P; p++) dxk[p] = Dh * dyk[p] + wk * dBS[k * P + p];
                        const float xdsb = dotf(xk, dBS + k * P, P);
                        float dd = Lrow_last[k] * xdsb;
                        if (k < last) M[last * Q + k] += wk * xdsb;
                        // dB_k from the state: wk * dS^T x_k
                        for (int64_t n = 0; n < N; n++) dBk[n] = 0.f;
                        if (wk != 0.f) {
                            for (int64_t p = 0; p < P; p++) {
                                const float wx = wk * xk[p];
                                const float *dSp = dS + p * N;
                                for (int64_t n = 0; n < N; n++) dBk[n] += wx * dSp[n];
                            }
                        }
                        for (int64_t m = k; m < q; m++) {
                            const float l = c.Lm[m * Q + k];
                            if (l == 0.f) continue;
                            const float cb = c.CB[m * Q + k], gk = dG[m * Q + k];
                            const float coef = cb * l * c.delta[k];
                            const float *dym = dy + ((b * L + t0 + m) * H + h) * P;
                            for (int64_t p = 0; p < P; p++) dxk[p] += coef * dym[p];
                            dd += gk * cb * l;
                            if (k < m) M[m * Q + k] += gk * cb * l * c.delta[k];
                            const float dcb = gk * l * c.delta[k];
                            const float *Cv = Cm + ((b * L + t0 + m) * G + g) * N;
                            for (int64_t n = 0; n < N; n++) dBk[n] += dcb * Cv[n];
                        }
                        ddelta[k] += dd;
                    }
                    // dC, the incoming-state terms, dD
                    for (int64_t m = 0; m < q; m++) {
                        const int64_t tm = t0 + m;
                        const float *dym = dy + ((b * L + tm) * H + h) * P;
                        const float *xm = x + ((b * L + tm) * H + h) * P;
                        const float *Cv = Cm + ((b * L + tm) * G + g) * N;
                        float *dCv = dCh + ((b * L + tm) * GH + (rep > 1 ? h : g)) * N;
                        for (int64_t n = 0; n < N; n++) dCv[n] = 0.f;
                        for (int64_t k = 0; k <= m; k++) {
                            const float l = c.Lm[m * Q + k];
                            if (l == 0.f) continue;
                            const float dcb = dG[m * Q + k] * l * c.delta[k];
                            const float *Bv = Bm + ((b * L + t0 + k) * G + g) * N;
                            for (int64_t n = 0; n < N; n++) dCv[n] += dcb * Bv[n];
                        }
                        const float din = c.seg[m] == 0 ? expf(c.cum[m]) : 0.f;
                        if (din != 0.f) {
                            float v = 0.f;  // dy_m . (S_in C_m)
                            for (int64_t p = 0; p < P; p++) {
                                const float *Sp = S0 + p * N;
                                float sc = 0.f;
                                for (int64_t n = 0; n < N; n++) {
                                    sc += Sp[n] * Cv[n];
                                    dCv[n] += din * dym[p] * Sp[n];
                                }
                                v += dym[p] * sc;
                            }
                            c.tmp[m] = din * v;  // d loss / d cum_m
                        } else {
                            c.tmp[m] = 0.f;
                        }
                        accD += dotf(dym, xm, P);
                    }
                    // dS_in = [seg_last == 0] exp(cum_last) dS + sum_m din_m dy_m ⊗ C_m
                    const float dlast = c.seg[last] == 0 ? expf(c.cum[last]) : 0.f;
                    float u = 0.f;  // d loss / d cum_last through the state decay
                    for (int64_t i = 0; i < P * N; i++) {
                        u += dS[i] * S0[i];
                        dSin[i] = dlast * dS[i];
                    }
                    u *= dlast;
                    for (int64_t m = 0; m < q; m++) {
                        const float din = c.seg[m] == 0 ? expf(c.cum[m]) : 0.f;
                        if (din == 0.f) continue;
                        const float *dym = dy + ((b * L + t0 + m) * H + h) * P;
                        const float *Cv = Cm + ((b * L + t0 + m) * G + g) * N;
                        for (int64_t p = 0; p < P; p++) {
                            const float w = din * dym[p];
                            float *dp = dSin + p * N;
                            for (int64_t n = 0; n < N; n++) dp[n] += w * Cv[n];
                        }
                    }
                    // da_j = sum_{m >= j} sum_{k < j} M[m,k]  +  sum_{m >= j} dcum_m  +  u
                    {
                        float suffix = 0.f;
                        for (int64_t j = q - 1; j >= 0; j--) {
                            suffix += c.tmp[j];
                            da[j] = suffix + u;
                        }
                        // column-prefix sums of M per row, accumulated over rows m >= j
                        for (int64_t m = 0; m < q; m++) {
                            float pre = 0.f;  // sum_{k < j} M[m,k]
                            const float *Mrow = M + m * Q;
                            for (int64_t j = 1; j <= m; j++) {
                                pre += Mrow[j - 1];
                                da[j] += pre;
                            }
                        }
                    }
                    for (int64_t m = 0; m < q; m++) {
                        const int64_t tm = t0 + m;
                        const float dd = ddelta[m] + da[m] * Ah;
                        accA += (double)da[m] * c.delta[m];
                        const float v = dt[(b * L + tm) * H + h] + bias;
                        const float g_raw = s->dt_softplus ? dd * softplus_grad(v) : dd;
                        ddt[(b * L + tm) * H + h] = g_raw;
                        accBias += g_raw;
                    }
                    memcpy(dS, dSin, (size_t)(P * N) * sizeof(float));
                }
                if (h0 && dh0) memcpy(dh0 + (b * H + h) * P * N, dS, (size_t)(P * N) * sizeof(float));
                pA[b * H + h] = (float)accA;
                pD[b * H + h] = (float)accD;
                pbias[b * H + h] = (float)accBias;
            }
        }
        free(Sin), free(dS), free(dSin), free(dG), free(M), free(dBS), free(ddelta), free(da);
        chunk_free(&c);
    }
    for (int64_t h = 0; h < H; h++) {
        double sa = 0, sd = 0, sb = 0;
        for (int64_t b = 0; b < Bn; b++) sa += pA[b * H + h], sd += pD[b * H + h], sb += pbias[b * H + h];
        dA[h] = (float)sa;
        if (D && dD) dD[h] = (float)sd;
        if (dt_bias && ddt_bias) ddt_bias[h] = (float)sb;
    }
    if (rep > 1) {
        // sum the per-head rows of each group in head order
#pragma omp parallel for schedule(static)
        for (int64_t bt = 0; bt < Bn * L; bt++) {
            for (int64_t gi = 0; gi < G; gi++) {
                float *db = dBm + (bt * G + gi) * N, *dc = dCm + (bt * G + gi) * N;
                for (int64_t n = 0; n < N; n++) db[n] = dc[n] = 0.f;
                for (int64_t r = 0; r < rep; r++) {
                    const float *sb = dBh + (bt * H + gi * rep + r) * N, *sc = dCh + (bt * H + gi * rep + r) * N;
                    for (int64_t n = 0; n < N; n++) db[n] += sb[n], dc[n] += sc[n];
                }
            }
        }
        free(dBh), free(dCh);
    }
    free(pA), free(pD), free(pbias);
}
