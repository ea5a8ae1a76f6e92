// mamba1_cpu.c: MambaInLlama's Mamba-1 mixer on the CPU (see mamba1_cpu.h for the math). Projections are
// OpenBLAS GEMMs on token-major activations; the conv and the selective scan are the CPU twins in
// kernels/scan (the same functions the CUDA kernels are tested against).
#include "distill/mamba1_cpu.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "kernels/scan/selective_scan.h"

// ---- the layer's tensors, looked up by name in the registry
typedef struct {
    const float *z, *x, *Bp, *Cp, *dtd, *dtw, *dtb, *cw, *cb, *alog, *D, *out;  // weights
    int64_t oz, ox, oB, oC, odtd, odtw, odtb, ocw, ocb, oalog, oD, oout;         // their offsets (for grads)
} Mamba1Weights;

static int64_t tensor_offset(const HybridConfig *h, const Registry *r, int layer, const char *suffix, int64_t numel) {
    char name[DL_TENSOR_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.mamba.%s", layer, suffix);
    int i = reg_find(r, name);
    // A missing tensor is a caller bug (wrong layer or registry), not bad user input.
    if (i < 0) dl_die(DL_EXIT_RUNTIME, "mamba1: no tensor %s (layer %d is %s)", name, layer, mixer_name(h->mixer[layer]));
    if (r->t[i].numel != numel)
        dl_die(DL_EXIT_RUNTIME, "mamba1: %s has %lld elements, expected %lld", name, (long long)r->t[i].numel,
               (long long)numel);
    return r->t[i].offset;
}

static Mamba1Weights weights(const HybridConfig *h, const Registry *r, const float *p, int layer) {
    const int64_t d = h->base.d_model, di = h->d_inner, dxb = h->d_xb, N = h->d_state, R = h->dt_rank, W = h->d_conv;
    if (layer < 0 || layer >= h->base.n_layer || h->mixer[layer] != MIXER_MAMBA1)
        dl_die(DL_EXIT_RUNTIME, "mamba1: layer %d is not a Mamba-1 layer", layer);
    Mamba1Weights w;
    w.oz = tensor_offset(h, r, layer, "in_proj_z.weight", di * d);
    w.ox = tensor_offset(h, r, layer, "in_proj_x.weight", dxb * d);
    w.oB = tensor_offset(h, r, layer, "B_proj.weight", dxb * d);
    w.oC = tensor_offset(h, r, layer, "C_proj.weight", di * d);
    w.odtd = tensor_offset(h, r, layer, "dt_proj_down.weight", R * d);
    w.odtw = tensor_offset(h, r, layer, "dt_proj.weight", di * R);
    w.odtb = tensor_offset(h, r, layer, "dt_proj.bias", di);
    w.ocw = tensor_offset(h, r, layer, "conv1d.weight", di * W);
    w.ocb = tensor_offset(h, r, layer, "conv1d.bias", di);
    w.oalog = tensor_offset(h, r, layer, "A_log", di * N);
    w.oD = tensor_offset(h, r, layer, "D", di);
    w.oout = tensor_offset(h, r, layer, "out_proj.weight", d * di);
    w.z = p + w.oz, w.x = p + w.ox, w.Bp = p + w.oB, w.Cp = p + w.oC, w.dtd = p + w.odtd, w.dtw = p + w.odtw;
    w.dtb = p + w.odtb, w.cw = p + w.ocw, w.cb = p + w.ocb, w.alog = p + w.oalog, w.D = p + w.oD, w.out = p + w.oout;
    return w;
}

static ScanShape scan_shape(const HybridConfig *h, int64_t B, int64_t L) {
    ScanShape s = {.batch = B, .seqlen = L, .dim = h->d_inner, .dstate = h->d_state,
                   .groups_c = h->d_inner / h->d_state, .groups_b = h->d_xb / h->d_state};
    return s;
}

// out[T, o] = in[T, k] * W[o, k]^T (+ out if accumulate): an nn.Linear on token-major rows.
static void linear(const float *in, const float *W, float *out, int64_t T, int64_t o, int64_t k, int accumulate) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)o, (int)k, 1.0f, in, (int)k, W, (int)k,
                accumulate ? 1.0f : 0.0f, out, (int)o);
}
// din[T, k] (+)= dout[T, o] * W[o, k]
static void linear_bwd_in(const float *dout, const float *W, float *din, int64_t T, int64_t o, int64_t k, int accumulate) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)k, (int)o, 1.0f, dout, (int)o, W, (int)k,
                accumulate ? 1.0f : 0.0f, din, (int)k);
}
// dW[o, k] += dout[T, o]^T * in[T, k]
static void linear_bwd_w(const float *dout, const float *in, float *dW, int64_t T, int64_t o, int64_t k) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)o, (int)k, (int)T, 1.0f, dout, (int)o, in, (int)k, 1.0f, dW,
                (int)k);
}

// Parallel regions only pay off above a few thousand elements (a decode step has B rows).
#define PAR_MIN_ELEMS 32768

// repeat_kv over groups of N channels: xr[t, g*N + n] = xs[t, (g/rep)*N + n], g < d_inner/N.
static void repeat_groups(const HybridConfig *h, int64_t T, const float *xs, float *xr) {
    const int64_t di = h->d_inner, dxb = h->d_xb, N = h->d_state, rep = di / dxb, G = di / N;
#pragma omp parallel for schedule(static) if (T * di >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < G; g++) memcpy(xr + t * di + g * N, xs + t * dxb + (g / rep) * N, (size_t)N * sizeof(float));
}
// Its adjoint: dxs[t, j*N + n] = sum over the rep copies, in a fixed order.
static void repeat_groups_bwd(const HybridConfig *h, int64_t T, const float *dxr, float *dxs) {
    const int64_t di = h->d_inner, dxb = h->d_xb, N = h->d_state, rep = di / dxb, Gb = dxb / N;
#pragma omp parallel for schedule(static) if (T * di >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < Gb; j++)
            for (int64_t n = 0; n < N; n++) {
                float s = 0.0f;
                for (int64_t k = 0; k < rep; k++) s += dxr[t * di + (j * rep + k) * N + n];
                dxs[t * dxb + j * N + n] = s;
            }
}

// dt [T, di] = dtl [T, R] W_dt^T + b_dt (dt_proj is a Linear with bias)
static void dt_proj_fwd(const Mamba1Weights *w, const float *dtl, float *dt, int64_t T, int64_t di, int64_t R) {
    for (int64_t t = 0; t < T; t++) memcpy(dt + t * di, w->dtb, (size_t)di * sizeof(float));
    linear(dtl, w->dtw, dt, T, di, R, 1);
}

static void neg_exp(const float *alog, float *A, int64_t n) {
    for (int64_t i = 0; i < n; i++) A[i] = -expf(alog[i]);
}

struct Mamba1Acts {
    int64_t cap;  // tokens
    float *u;     // [T, d]   mixer input
    float *z;     // [T, di]
    float *xs;    // [T, dxb] x before the repeat
    float *Bs;    // [T, dxb]
    float *Cs;    // [T, di]
    float *dtl;   // [T, R]   dt_proj_down output (dt = dt_proj(dtl) is recomputed: R = d/16 makes it cheap)
    float *y;     // [T, di]  gated scan output (input of out_proj)
};

Mamba1Acts *mamba1_acts_new(const HybridConfig *h, int64_t B, int64_t L) {
    const int64_t T = B * L, d = h->base.d_model, di = h->d_inner, dxb = h->d_xb, R = h->dt_rank;
    Mamba1Acts *a = dl_calloc(1, sizeof *a);
    a->cap = T;
    a->u = dl_malloc((size_t)(T * d) * sizeof(float));
    a->z = dl_malloc((size_t)(T * di) * sizeof(float));
    a->xs = dl_malloc((size_t)(T * dxb) * sizeof(float));
    a->Bs = dl_malloc((size_t)(T * dxb) * sizeof(float));
    a->Cs = dl_malloc((size_t)(T * di) * sizeof(float));
    a->dtl = dl_malloc((size_t)(T * R) * sizeof(float));
    a->y = dl_malloc((size_t)(T * di) * sizeof(float));
    return a;
}

void mamba1_acts_free(Mamba1Acts *a) {
    if (!a) return;
    free(a->u), free(a->z), free(a->xs), free(a->Bs), free(a->Cs), free(a->dtl), free(a->y);
    free(a);
}

Mamba1State mamba1_state_new(const HybridConfig *h, int64_t B) {
    Mamba1State st = {.B = B, .d_inner = h->d_inner, .d_state = h->d_state, .d_conv = h->d_conv};
    st.conv = dl_calloc((size_t)(B * (h->d_conv - 1) * h->d_inner), sizeof(float));
    st.ssm = dl_calloc((size_t)(B * h->d_inner * h->d_state), sizeof(float));
    return st;
}

void mamba1_state_free(Mamba1State *st) {
    free(st->conv), free(st->ssm);
    st->conv = st->ssm = NULL;
}

void mamba1_state_reset(Mamba1State *st, int64_t b) {
    const int64_t nc = (st->d_conv - 1) * st->d_inner, ns = st->d_inner * st->d_state;
    if (b < 0) {
        memset(st->conv, 0, (size_t)(st->B * nc) * sizeof(float));
        memset(st->ssm, 0, (size_t)(st->B * ns) * sizeof(float));
    } else {
        memset(st->conv + b * nc, 0, (size_t)nc * sizeof(float));
        memset(st->ssm + b * ns, 0, (size_t)ns * sizeof(float));
    }
}

void mamba1_state_copy(Mamba1State *dst, const Mamba1State *src) {
    if (dst->B != src->B || dst->d_inner != src->d_inner || dst->d_state != src->d_state || dst->d_conv != src->d_conv)
        dl_die(DL_EXIT_RUNTIME, "mamba1_state_copy: states of different shapes");
    memcpy(dst->conv, src->conv, (size_t)(src->B * (src->d_conv - 1) * src->d_inner) * sizeof(float));
    memcpy(dst->ssm, src->ssm, (size_t)(src->B * src->d_inner * src->d_state) * sizeof(float));
}

// Prefill with resets: after conv1d_state_advance_cpu, window entries from before the last document start
// of the chunk must read as zeros (the next token's window may not reach into the previous document).
static void conv_state_cut(Mamba1State *st, int64_t L, const uint8_t *reset) {
    const int64_t di = st->d_inner, W1 = st->d_conv - 1;
    for (int64_t b = 0; b < st->B; b++) {
        int64_t last_start = -1;  // last t with a reset
        for (int64_t t = 0; t < L; t++)
            if (reset[b * L + t]) last_start = t;
        if (last_start < 0) continue;
        for (int64_t j = 0; j < W1; j++)  // window entry j holds time step L - W1 + j
            if (L - W1 + j < last_start) memset(st->conv + (b * W1 + j) * di, 0, (size_t)di * sizeof(float));
    }
}

typedef enum { RUN_FORWARD, RUN_PREFILL, RUN_MULTI } RunKind;

// One forward serves training, inference, prefill, multi-token steps and decode.
// RUN_FORWARD: training (acts) or inference; RUN_PREFILL: from st to st, resets allowed; RUN_MULTI: from st,
// st left after the first keep[b] tokens (NULL: all), no resets.
static void forward_impl(RunKind kind, const HybridConfig *h, const Registry *r, const float *params, int layer,
                         int64_t B, int64_t L, const float *x, const uint8_t *reset, const int32_t *keep, float *out,
                         Mamba1Acts *acts, Mamba1State *st) {
    const int64_t T = B * L, d = h->base.d_model, di = h->d_inner, dxb = h->d_xb, N = h->d_state, R = h->dt_rank;
    const int W = h->d_conv;
    const Mamba1Weights w = weights(h, r, params, layer);
    if (acts && acts->cap < T)
        dl_die(DL_EXIT_RUNTIME, "mamba1_forward: activations hold %lld tokens, %lld given", (long long)acts->cap,
               (long long)T);
    if (kind != RUN_FORWARD && !st) dl_die(DL_EXIT_RUNTIME, "mamba1: prefill / step without a state");
    if (st && (st->B != B || st->d_inner != di || st->d_state != N || st->d_conv != W))
        dl_die(DL_EXIT_RUNTIME, "mamba1: state made for batch %lld, used with batch %lld", (long long)st->B, (long long)B);
    float *tmp = NULL;
    float *z, *xs, *Bs, *Cs, *dtl, *y;
    if (acts) {
        memcpy(acts->u, x, (size_t)(T * d) * sizeof(float));
        z = acts->z, xs = acts->xs, Bs = acts->Bs, Cs = acts->Cs, dtl = acts->dtl, y = acts->y;
    } else {
        tmp = dl_malloc((size_t)(T * (3 * di + 2 * dxb + R)) * sizeof(float));
        z = tmp, Cs = z + T * di, y = Cs + T * di, xs = y + T * di, Bs = xs + T * dxb, dtl = Bs + T * dxb;
    }
    float *dt = dl_malloc((size_t)(T * di) * sizeof(float));
    float *xr = dl_malloc((size_t)(T * di) * sizeof(float));  // x after the GQA repeat (conv input)
    float *xc = dl_malloc((size_t)(T * di) * sizeof(float));  // conv + SiLU output = scan input
    float *A = dl_malloc((size_t)(di * N) * sizeof(float));

    linear(x, w.z, z, T, di, d, 0);
    linear(x, w.x, xs, T, dxb, d, 0);
    linear(x, w.Bp, Bs, T, dxb, d, 0);
    linear(x, w.Cp, Cs, T, di, d, 0);
    linear(x, w.dtd, dtl, T, R, d, 0);
    // dt = dt_proj(dtl) with its bias (the scan adds the same bias again as delta_bias)
    dt_proj_fwd(&w, dtl, dt, T, di, R);

    repeat_groups(h, T, xs, xr);
    conv1d_silu_fwd_cpu(B, L, di, W, xr, w.cw, w.cb, kind == RUN_MULTI ? NULL : reset, st ? st->conv : NULL, 1, xc);
    neg_exp(w.alog, A, di * N);
    const ScanShape s = scan_shape(h, B, L);
    if (kind == RUN_MULTI) {
        // the state after the kept prefix overwrites st->ssm (read first by the scan)
        selective_scan_multi_cpu(&s, xc, dt, A, Bs, Cs, w.D, z, w.dtb, st->ssm, keep, y, st->ssm, NULL);
        conv1d_state_advance_cpu(B, L, di, W, xr, keep, st->conv);
    } else if (kind == RUN_PREFILL) {
        float *h_last = dl_malloc((size_t)(B * di * N) * sizeof(float));
        selective_scan_fwd_cpu(&s, xc, dt, A, Bs, Cs, w.D, z, w.dtb, reset, st->ssm, y, h_last);
        memcpy(st->ssm, h_last, (size_t)(B * di * N) * sizeof(float));
        free(h_last);
        conv1d_state_advance_cpu(B, L, di, W, xr, NULL, st->conv);
        if (reset) conv_state_cut(st, L, reset);
    } else {
        selective_scan_fwd_cpu(&s, xc, dt, A, Bs, Cs, w.D, z, w.dtb, reset, NULL, y, NULL);
    }
    linear(y, w.out, out, T, d, di, 0);
    free(xr), free(xc), free(A), free(dt), free(tmp);
}

void mamba1_forward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba1Acts *acts) {
    forward_impl(RUN_FORWARD, h, r, params, layer, B, L, x, reset, NULL, out, acts, NULL);
}

void mamba1_prefill(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                    const float *x, const uint8_t *reset, float *out, Mamba1State *st) {
    forward_impl(RUN_PREFILL, h, r, params, layer, B, L, x, reset, NULL, out, NULL, st);
}

void mamba1_multistep(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t K,
                      const float *x, const int32_t *keep, float *out, Mamba1State *st) {
    forward_impl(RUN_MULTI, h, r, params, layer, B, K, x, NULL, keep, out, NULL, st);
}

void mamba1_step(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, const float *x,
                 Mamba1State *st, float *out) {
    forward_impl(RUN_MULTI, h, r, params, layer, B, 1, x, NULL, NULL, out, NULL, st);
}

void mamba1_backward(const HybridConfig *h, const Registry *r, const float *params, int layer, int64_t B, int64_t L,
                     const uint8_t *reset, const float *dout, float *dx, float *grads, Mamba1Acts *a) {
    const int64_t T = B * L, d = h->base.d_model, di = h->d_inner, dxb = h->d_xb, N = h->d_state, R = h->dt_rank;
    const int W = h->d_conv;
    const Mamba1Weights w = weights(h, r, params, layer);
    if (!a || a->cap < T) dl_die(DL_EXIT_RUNTIME, "mamba1_backward: activations missing or too small");

    // [T, di] buffers: dy, xr, xc (later dxr), dt, dxc, ddt, dC, dz; [T, dxb]: dB, dxs; [T, R]: ddtl
    float *buf = dl_malloc((size_t)(T * (8 * di + 2 * dxb + R)) * sizeof(float));
    float *dy = buf, *xr = dy + T * di, *xc = xr + T * di, *dxc = xc + T * di, *ddt = dxc + T * di, *dC = ddt + T * di;
    float *dz = dC + T * di, *dt = dz + T * di, *dB = dt + T * di, *dxs = dB + T * dxb, *ddtl = dxs + T * dxb;
    // per-channel: A, dA [di,N]; dD, ddb, dcb [di]; dcw [di,W]
    float *small = dl_malloc((size_t)(2 * di * N + 3 * di + di * W) * sizeof(float));
    float *A = small, *dA = A + di * N, *dD = dA + di * N, *ddb = dD + di, *dcb = ddb + di, *dcw = dcb + di;

    // out = y W_out^T
    linear_bwd_in(dout, w.out, dy, T, d, di, 0);
    if (grads) linear_bwd_w(dout, a->y, grads + w.oout, T, d, di);

    // recompute the scan inputs
    dt_proj_fwd(&w, a->dtl, dt, T, di, R);
    repeat_groups(h, T, a->xs, xr);
    conv1d_silu_fwd_cpu(B, L, di, W, xr, w.cw, w.cb, reset, NULL, 1, xc);
    neg_exp(w.alog, A, di * N);
    const ScanShape s = scan_shape(h, B, L);
    selective_scan_bwd_cpu(&s, xc, dt, A, a->Bs, a->Cs, w.D, a->z, w.dtb, reset, NULL, dy, NULL, dxc, ddt, dA, dB, dC,
                           dD, dz, ddb, NULL);

    // conv + SiLU backward: dxr goes into xc's buffer (xc is no longer needed)
    float *dxr = xc;
    conv1d_silu_bwd_cpu(B, L, di, W, xr, w.cw, w.cb, reset, NULL, 1, dxc, dxr, dcw, dcb);
    repeat_groups_bwd(h, T, dxr, dxs);
    // dt = dtl W_dt^T + b
    linear_bwd_in(ddt, w.dtw, ddtl, T, di, R, 0);

    if (grads) {
        float *g_alog = grads + w.oalog, *g_D = grads + w.oD, *g_dtb = grads + w.odtb;
        for (int64_t i = 0; i < di * N; i++) g_alog[i] += dA[i] * A[i];  // A = -exp(A_log): dA/dA_log = A
        for (int64_t c = 0; c < di; c++) g_D[c] += dD[c];
        // dt_proj.bias enters twice: through dt_proj (sum of ddt over tokens) and as delta_bias (ddb)
#pragma omp parallel for schedule(static) if (T * di >= PAR_MIN_ELEMS)
        for (int64_t c = 0; c < di; c++) {
            float sum = 0.0f;
            for (int64_t t = 0; t < T; t++) sum += ddt[t * di + c];
            g_dtb[c] += sum + ddb[c];
        }
        float *g_cw = grads + w.ocw, *g_cb = grads + w.ocb;
        for (int64_t i = 0; i < di * W; i++) g_cw[i] += dcw[i];
        for (int64_t c = 0; c < di; c++) g_cb[c] += dcb[c];
        linear_bwd_w(ddt, a->dtl, grads + w.odtw, T, di, R);
        // the five input projections
        linear_bwd_w(dz, a->u, grads + w.oz, T, di, d);
        linear_bwd_w(dxs, a->u, grads + w.ox, T, dxb, d);
        linear_bwd_w(dB, a->u, grads + w.oB, T, dxb, d);
        linear_bwd_w(dC, a->u, grads + w.oC, T, di, d);
        linear_bwd_w(ddtl, a->u, grads + w.odtd, T, R, d);
    }
    if (dx) {
        linear_bwd_in(dz, w.z, dx, T, di, d, 0);
        linear_bwd_in(dxs, w.x, dx, T, dxb, d, 1);
        linear_bwd_in(dB, w.Bp, dx, T, dxb, d, 1);
        linear_bwd_in(dC, w.Cp, dx, T, di, d, 1);
        linear_bwd_in(ddtl, w.dtd, dx, T, R, d, 1);
    }
    free(buf), free(small);
}
