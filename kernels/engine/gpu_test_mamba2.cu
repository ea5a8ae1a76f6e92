// gpu_test_mamba2.cu: the device Mamba-2 mixer (mamba2_cuda.h) against its CPU twin (distill/mamba2_cpu.c, fp32,
// itself checked against float64 finite differences by tests/test_mamba2_cpu) on the same bf16-rounded weights and
// inputs. Per shape: the output (relative error norm <= 2e-2), dx and every weight gradient (<= 5e-2; the device adds
// into buffers pre-filled with 0.25, which the check subtracts), with every output, activation and scratch buffer
// poisoned (NaN) first. Then: a second run with a different poison gives identical bits (output, dx, gradients); dx
// without weight gradients, weight gradients without dx, and the norm/out_proj-only early exit give the same bits as
// the full backward; a forward-only (inference) scratch gives the same output bits.
// Tolerances (docs/MAMBA2_CUDA.md, "Accuracy"): the gated norm makes this gradient ill-conditioned where a head's
// output nearly vanishes (y ~ c x with c ~ 0: 1/rms up to 1/sqrt(eps)), so every gradient is also judged against its
// floor: how far the fp32 twin's own gradient moves when its weights, input and output gradient are replaced by other
// fp32 values with the same bf16 rounding (value + U(-1/2, 1/2) of its bf16 spacing; the largest of 4 draws). A
// tensor passes within its tolerance (output 2e-2, gradients 5e-2) or within 2x its floor. d D = sum dy.x is a
// cancelling sum (dy is orthogonal to y ~ c x) that the SSD's bf16 y and dy move beyond the floor: 1.5e-1. At L = 1
// (every token a document start, y = c x exactly) d D, d dt_bias and the dt rows are zero up to eps: printed only.
// Weights: test_params_init, with dt_bias over MambaInLlama's init range softplus^-1([1e-3, 1e-1]) = [-6.9, -2.3]
// across the heads and A_log = log(1 .. 16) (its A range).
// Shapes: SmolLM2-135M's (d 576, 9 heads of P = N = 64, 3 KV groups: dt rows padded 9 -> 16) with packed documents
// (resets on consecutive tokens, on a chunk boundary, on the last token) and a long row over 16 chunks; a
// Llama-3-like head (8 heads of 128, 2 KV groups) with one document per row (no reset tensor) and packed; L = 1;
// multi-head (rep 1, P 32); P 16 with 12 heads (rep 3); the long SmolLM2 row again with dt_bias over [-4, 0] (fast
// decay; the model of the first device run, where the bf16 conv input moved dx by 0.34). Unsupported shapes are
// refused with a message.
// Exit status 1 if any check fails. Usage: gpu_test_mamba2 [--verbose]; gpu_test_mamba2 --bench times one
// Llama-3-8B Mamba-2 layer (B 8 x L 2048 and B 1 x L 8192) instead.
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "kernels/engine/gpu_test_common.cuh"
#include "kernels/engine/mamba2_cuda.h"
#include "kernels/train/train_check.cuh"

extern "C" {
#include "distill/mamba2_cpu.h"
}

typedef struct {
    const char *name;
    int d, H, kv, P;
    int64_t B, L;
    int reset_kind;        // 0: no reset tensor (one document per row); 1: row starts only; 2: packed (list below)
    int resets[8][2];      // (b, t) document starts besides t = 0, for reset_kind 2; t < 0 ends the list
    int fast;              // 1: dt_bias over [-4, 0] (delta up to ~1, fast decay: y ~ c x, the ill-conditioned regime)
} Case;

static const Case CASES[] = {
    {"SmolLM2 (576, 9x64, kv 3) B 2 L 200 packed", 576, 9, 3, 64, 2, 200, 2,
     {{0, 70}, {0, 71}, {1, 128}, {1, 199}, {0, -1}}},
    {"SmolLM2 B 1 L 1000 packed (16 chunks)", 576, 9, 3, 64, 1, 1000, 2, {{0, 64}, {0, 65}, {0, 500}, {0, -1}}},
    {"Llama-3-like (1024, 8x128, kv 2) B 2 L 300, no resets", 1024, 8, 2, 128, 2, 300, 0, {{0, -1}}},
    {"Llama-3-like B 2 L 130 packed", 1024, 8, 2, 128, 2, 130, 2, {{0, 1}, {0, 63}, {1, 64}, {1, 100}, {0, -1}}},
    {"SmolLM2 L = 1, B 3", 576, 9, 3, 64, 3, 1, 1, {{0, -1}}},
    {"multi-head (256, 8x32, kv 8) B 2 L 77", 256, 8, 8, 32, 2, 77, 1, {{0, -1}}},
    {"P 16 (200, 12x16, kv 4) B 2 L 65 packed", 200, 12, 4, 16, 2, 65, 2, {{1, 33}, {0, -1}}},
    {"SmolLM2 B 1 L 1000 packed, fast decay (dt_bias -4..0)", 576, 9, 3, 64, 1, 1000, 2, {{0, 64}, {0, 65}, {0, 500}, {0, -1}},
     1},
};

static const char *TNAMES[8] = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                "A_log",          "D",             "norm.weight", "out_proj.weight"};
enum { T_IN = 0, T_CW, T_CB, T_DTB, T_ALOG, T_D, T_NORM, T_OUT };

static float bfr(float v) { return bf16_to_f32(f32_to_bf16(v)); }
// Another fp32 value with the same bf16 rounding as v (a bf16 value): v + U(-1/2, 1/2) of v's bf16 spacing.
static float bf16_jitter(float v, Rng *g) {
    if (v == 0.f || !isfinite(v)) return v;
    int e;
    frexpf(v, &e);  // |v| in [2^(e-1), 2^e): 8 significant bits -> spacing 2^(e-8)
    return v + (float)((rng_uniform(g) - 0.5) * ldexpf(1.f, e - 8));
}

static void *dmalloc(size_t n) {
    void *p = NULL;
    cudaCheck(cudaMalloc(&p, n ? n : 16));
    return p;
}
static void *up_bf16(const float *x, int64_t n) {
    std::vector<uint16_t> h((size_t)n);
    for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(x[i]);
    void *d = dmalloc((size_t)n * 2);
    cudaCheck(cudaMemcpy(d, h.data(), (size_t)n * 2, cudaMemcpyHostToDevice));
    return d;
}
static float *up_f32(const float *x, int64_t n) {
    float *d = (float *)dmalloc((size_t)n * 4);
    cudaCheck(cudaMemcpy(d, x, (size_t)n * 4, cudaMemcpyHostToDevice));
    return d;
}
static std::vector<float> down_bf16(const void *d, int64_t n) {
    std::vector<uint16_t> h((size_t)n);
    cudaCheck(cudaMemcpy(h.data(), d, (size_t)n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> f((size_t)n);
    for (int64_t i = 0; i < n; i++) f[i] = bf16_to_f32(h[i]);
    return f;
}
static std::vector<char> down_bytes(const void *d, size_t n) {
    std::vector<char> h(n);
    cudaCheck(cudaMemcpy(h.data(), d, n, cudaMemcpyDeviceToHost));
    return h;
}

// The device side of one case: weights, gradients, inputs, one arena of activations + scratch.
typedef struct {
    Mamba2CudaShape s;
    Mamba2CudaW w;
    float *g[8];       // device gradients, one per tensor
    int64_t numel[8];
    void *u, *dout, *out, *dx;
    uint8_t *reset;
    Mamba2CudaActs a;
    Mamba2CudaScratch ws;
    void *arena;
    size_t arena_bytes;
} Dev;

static void fill_grads(Dev *D) {
    for (int k = 0; k < 8; k++) {
        std::vector<float> v((size_t)D->numel[k], 0.25f);
        cudaCheck(cudaMemcpy(D->g[k], v.data(), v.size() * 4, cudaMemcpyHostToDevice));
    }
}

// One forward + backward with everything poisoned by byte `poison` first. gmask: which gradients to ask for.
static void run_dev(Dev *D, DlGemm *gm, int poison, unsigned gmask, bool want_dx) {
    const int64_t N = D->s.B * D->s.L, d = D->s.d;
    char err[512] = "";
    cudaCheck(cudaMemset(D->arena, poison, D->arena_bytes));
    cudaCheck(cudaMemset(D->out, poison, (size_t)(N * d) * 2));
    cudaCheck(cudaMemset(D->dx, poison, (size_t)(N * d) * 2));
    fill_grads(D);
    if (mamba2_cuda_fwd(gm, &D->s, &D->w, D->u, D->reset, D->out, &D->a, &D->ws, NULL, err, sizeof err)) {
        fprintf(stderr, "gpu_test_mamba2: forward refused: %s\n", err);
        exit(1);
    }
    Mamba2CudaG gr;
    float **gp[8] = {&gr.in_proj, &gr.conv_w, &gr.conv_b, &gr.dt_bias, &gr.A_log, &gr.D, &gr.norm_w, &gr.out_proj};
    for (int k = 0; k < 8; k++) *gp[k] = (gmask >> k) & 1 ? D->g[k] : NULL;
    if (mamba2_cuda_bwd(gm, &D->s, &D->w, &gr, D->u, D->reset, D->dout, want_dx ? D->dx : NULL, &D->a, &D->ws, NULL,
                        err, sizeof err)) {
        fprintf(stderr, "gpu_test_mamba2: backward refused: %s\n", err);
        exit(1);
    }
    cudaCheck(cudaDeviceSynchronize());
}

typedef struct {
    std::vector<char> out, dx, g[8];
} Bits;
static Bits grab(const Dev *D) {
    const int64_t N = D->s.B * D->s.L, d = D->s.d;
    Bits b;
    b.out = down_bytes(D->out, (size_t)(N * d) * 2);
    b.dx = down_bytes(D->dx, (size_t)(N * d) * 2);
    for (int k = 0; k < 8; k++) b.g[k] = down_bytes(D->g[k], (size_t)D->numel[k] * 4);
    return b;
}

static void run_case(const Case *cs, DlGemm *gm) {
    printf("-- %s\n", cs->name);
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    c.n_layer = 1, c.d_model = cs->d, c.n_head = cs->H, c.n_kv_head = cs->kv, c.head_dim = cs->P;
    c.d_ff = 64, c.vocab = 64, c.max_pos = 1 << 16, c.rope_theta = 10000.0, c.rms_eps = 1e-5;
    c.bos_id = c.eos_id = -1;
    HybridConfig h;
    DlError e;
    if (hybrid_config_init(&h, &c, MIXER_MAMBA2, NULL, 0, &e)) {
        fprintf(stderr, "gpu_test_mamba2: %s\n", e.msg);
        exit(1);
    }
    Registry r;
    model_build_registry(&h, &r);
    float *p = (float *)malloc((size_t)r.numel * 4);
    test_params_init(&r, p, 1234 + (uint64_t)cs->d, 11, true);
    int64_t off[8], numel[8];
    for (int k = 0; k < 8; k++) {
        char nm[128];
        snprintf(nm, sizeof nm, "model.layers.0.mamba.%s", TNAMES[k]);
        const int i = reg_find(&r, nm);
        if (i < 0) {
            fprintf(stderr, "gpu_test_mamba2: no tensor %s\n", nm);
            exit(1);
        }
        off[k] = r.t[i].offset, numel[k] = r.t[i].numel;
    }
    // dt_bias across MambaInLlama's init range softplus^-1([1e-3, 1e-1]) = [-6.9, -2.3] (fast: [-4, 0]),
    // A_log = log(1 .. 16)
    Rng rg;
    rng_init(&rg, 99, (uint64_t)cs->d);
    const double hm = cs->H > 1 ? cs->H - 1 : 1;
    for (int k = 0; k < cs->H; k++) {
        const double lo = cs->fast ? -4.0 : -6.9, hi = cs->fast ? 0.0 : -2.3;
        p[off[T_DTB] + k] = bfr((float)(lo + (hi - lo) * k / hm + 0.1 * rng_normal(&rg)));
        p[off[T_ALOG] + k] = bfr((float)log(1.0 + 15.0 * k / hm));
    }
    const int64_t B = cs->B, L = cs->L, N = B * L, d = cs->d;
    std::vector<float> u((size_t)(N * d)), dout((size_t)(N * d));
    for (auto &v : u) v = bfr((float)rng_normal(&rg));
    for (auto &v : dout) v = bfr((float)rng_normal(&rg));
    std::vector<uint8_t> reset((size_t)N, 0);
    for (int64_t b = 0; b < B; b++) reset[(size_t)(b * L)] = 1;
    for (int k = 0; cs->reset_kind == 2 && k < 8 && cs->resets[k][1] >= 0; k++)
        reset[(size_t)(cs->resets[k][0] * L + cs->resets[k][1])] = 1;
    const uint8_t *rs_h = cs->reset_kind ? reset.data() : NULL;

    // CPU twin, fp32
    std::vector<float> out_c((size_t)(N * d)), dx_c((size_t)(N * d));
    float *gc = (float *)calloc((size_t)r.numel, 4);
    Mamba2Acts *ca = mamba2_acts_new(&h, B, L);
    mamba2_forward(&h, &r, p, 0, B, L, u.data(), rs_h, out_c.data(), ca);
    mamba2_backward(&h, &r, p, 0, B, L, rs_h, dout.data(), dx_c.data(), gc, ca);
    // the floor: the twin on 4 other fp32 sets of weights, input and output gradient with the same bf16 rounding
    double fl_dx[1] = {0}, fl_g[9] = {0};  // largest movement: dx; 8 tensors + the dt rows
    {
        const int64_t r0 = (int64_t)(h.d_inner + 2 * h.d_xb + h.d_inner) * d;  // first dt row of in_proj
        float *pj = (float *)malloc((size_t)r.numel * 4), *gj = (float *)malloc((size_t)r.numel * 4);
        std::vector<float> uj((size_t)(N * d)), dj((size_t)(N * d)), oj((size_t)(N * d)), xj((size_t)(N * d));
        for (int kf = 1; kf <= 4; kf++) {
            Rng jg;
            rng_init(&jg, 555 + (uint64_t)kf, 0);
            for (int64_t i = 0; i < r.numel; i++) pj[i] = bf16_jitter(p[i], &jg);
            for (int64_t i = 0; i < N * d; i++) uj[i] = bf16_jitter(u[i], &jg);
            for (int64_t i = 0; i < N * d; i++) dj[i] = bf16_jitter(dout[i], &jg);
            memset(gj, 0, (size_t)r.numel * 4);
            mamba2_forward(&h, &r, pj, 0, B, L, uj.data(), rs_h, oj.data(), ca);
            mamba2_backward(&h, &r, pj, 0, B, L, rs_h, dj.data(), xj.data(), gj, ca);
            fl_dx[0] = fmax(fl_dx[0], relerr(xj.data(), dx_c.data(), N * d));
            for (int k = 0; k <= 8; k++) {
                const int64_t o0 = k < 8 ? off[k] : off[T_IN] + r0, n = k < 8 ? numel[k] : (int64_t)cs->H * d;
                fl_g[k] = fmax(fl_g[k], relerr(gj + o0, gc + o0, n));
            }
        }
        free(pj), free(gj);
    }
    mamba2_acts_free(ca);

    // device
    Dev D;
    memset(&D, 0, sizeof D);
    char err[512] = "";
    if (mamba2_cuda_shape(&h, B, L, &D.s, err, sizeof err)) {
        check(false, "%s: shape refused: %s", cs->name, err);
        return;
    }
    D.w.in_proj = (const uint16_t *)up_bf16(p + off[T_IN], numel[T_IN]);
    D.w.conv_w = up_f32(p + off[T_CW], numel[T_CW]);
    D.w.conv_b = up_f32(p + off[T_CB], numel[T_CB]);
    D.w.dt_bias = up_f32(p + off[T_DTB], numel[T_DTB]);
    D.w.A_log = up_f32(p + off[T_ALOG], numel[T_ALOG]);
    D.w.D = up_f32(p + off[T_D], numel[T_D]);
    D.w.norm_w = (const uint16_t *)up_bf16(p + off[T_NORM], numel[T_NORM]);
    D.w.out_proj = (const uint16_t *)up_bf16(p + off[T_OUT], numel[T_OUT]);
    for (int k = 0; k < 8; k++) D.numel[k] = numel[k], D.g[k] = (float *)dmalloc((size_t)numel[k] * 4);
    D.u = up_bf16(u.data(), N * d);
    D.dout = up_bf16(dout.data(), N * d);
    D.out = dmalloc((size_t)(N * d) * 2);
    D.dx = dmalloc((size_t)(N * d) * 2);
    if (rs_h) {
        D.reset = (uint8_t *)dmalloc((size_t)N);
        cudaCheck(cudaMemcpy(D.reset, rs_h, (size_t)N, cudaMemcpyHostToDevice));
    }
    Mamba2CudaBuf bufs[2 * MAMBA2_CUDA_MAX_BUFS];
    int nb = mamba2_cuda_acts_bufs(&D.s, &D.a, bufs);
    nb += mamba2_cuda_scratch_bufs(&D.s, 1, &D.ws, bufs + nb);
    D.arena_bytes = mamba2_cuda_bufs_bytes(bufs, nb);
    D.arena = dmalloc(D.arena_bytes);
    mamba2_cuda_bufs_place(bufs, nb, D.arena);

    // 1. against the CPU, everything poisoned with NaN
    run_dev(&D, gm, 0xFF, 0xFF, true);
    const Bits b1 = grab(&D);
    std::vector<float> o = down_bf16(D.out, N * d), dxv = down_bf16(D.dx, N * d);
    const bool l1 = L == 1;  // D, dt_bias and the dt rows are zero up to eps (y = c x at a document start)
    const double eo = relerr(o.data(), out_c.data(), N * d), ex = relerr(dxv.data(), dx_c.data(), N * d);
    check(eo <= 2e-2, "%s: out rel err %.2e (tol 2e-2)", cs->name, eo);
    check(ex <= 5e-2 || ex <= 2 * fl_dx[0], "%s: dx rel err %.2e (tol 5e-2, floor %.2e)", cs->name, ex, fl_dx[0]);
    printf("   rel err (floor): out %.2e  dx %.2e (%.2e)", eo, ex, fl_dx[0]);
    const int64_t r0 = (int64_t)(h.d_inner + 2 * h.d_xb + h.d_inner) * d;  // first dt row of in_proj
    for (int k = 0; k <= 8; k++) {  // k = 8: the dt rows of in_proj alone (the whole tensor's norm would hide them)
        const int kk = k < 8 ? k : T_IN;
        const int64_t o0 = k < 8 ? 0 : r0, n = k < 8 ? numel[k] : (int64_t)cs->H * d;
        std::vector<float> gv((size_t)n);
        const float *raw = (const float *)b1.g[kk].data() + o0;
        for (int64_t i = 0; i < n; i++) gv[i] = raw[i] - 0.25f;
        const double eg = relerr(gv.data(), gc + off[kk] + o0, n), fl = fl_g[k];
        const bool cancels = k == 8 || k == T_D || k == T_DTB;
        const double tol = k == T_D ? 1.5e-1 : 5e-2;
        const char *nm = k < 8 ? TNAMES[k] : "in_proj dt rows";
        printf("  d%s %.2e (%.2e)%s", nm, eg, fl, l1 && cancels ? " [not checked]" : "");
        if (!(l1 && cancels))
            check(eg <= tol || eg <= 2 * fl, "%s: d %s rel err %.2e (tol %.0e, floor %.2e)", cs->name, nm, eg, tol, fl);
    }
    printf("\n");

    // 2. a second run with another poison (finite: 0x7f7f...): the same bits
    run_dev(&D, gm, 0x7F, 0xFF, true);
    const Bits b2 = grab(&D);
    bool same = b1.out == b2.out && b1.dx == b2.dx;
    for (int k = 0; k < 8; k++) same = same && b1.g[k] == b2.g[k];
    check(same, "%s: second run bitwise identical (out, dx, 8 gradients)", cs->name);

    // 3. dx only (every weight frozen), 4. gradients only (no dx), 5. norm + out_proj only: the same bits
    run_dev(&D, gm, 0xFF, 0, true);
    const Bits b3 = grab(&D);
    bool untouched = true;
    for (int k = 0; k < 8; k++)
        for (int64_t i = 0; i < numel[k]; i++) untouched = untouched && ((const float *)b3.g[k].data())[i] == 0.25f;
    check(b3.dx == b1.dx && b3.out == b1.out && untouched, "%s: frozen weights: dx bitwise, gradients untouched", cs->name);
    run_dev(&D, gm, 0xFF, 0xFF, false);
    const Bits b4 = grab(&D);
    same = true;
    for (int k = 0; k < 8; k++) same = same && b4.g[k] == b1.g[k];
    check(same, "%s: no dx: the 8 gradients bitwise", cs->name);
    run_dev(&D, gm, 0xFF, (1u << T_NORM) | (1u << T_OUT), false);
    const Bits b5 = grab(&D);
    untouched = true;
    for (int k = 0; k < T_NORM; k++)
        for (int64_t i = 0; i < numel[k]; i++) untouched = untouched && ((const float *)b5.g[k].data())[i] == 0.25f;
    check(b5.g[T_NORM] == b1.g[T_NORM] && b5.g[T_OUT] == b1.g[T_OUT] && untouched,
          "%s: norm + out_proj only: their gradients bitwise, the others untouched", cs->name);

    // 6. inference scratch (train = 0): the same output bits
    {
        Mamba2CudaActs a;
        Mamba2CudaScratch ws;
        Mamba2CudaBuf ib[2 * MAMBA2_CUDA_MAX_BUFS];
        int n = mamba2_cuda_acts_bufs(&D.s, &a, ib);
        n += mamba2_cuda_scratch_bufs(&D.s, 0, &ws, ib + n);
        const size_t bytes = mamba2_cuda_bufs_bytes(ib, n);
        check(bytes < D.arena_bytes && !ws.dheads && !ws.ssd_bwd_ws, "%s: inference buffers %zu < training %zu bytes",
              cs->name, bytes, D.arena_bytes);
        void *ar = dmalloc(bytes);
        cudaCheck(cudaMemset(ar, 0xFF, bytes));
        cudaCheck(cudaMemset(D.out, 0xFF, (size_t)(N * d) * 2));
        mamba2_cuda_bufs_place(ib, n, ar);
        const int rc = mamba2_cuda_fwd(gm, &D.s, &D.w, D.u, D.reset, D.out, &a, &ws, NULL, err, sizeof err);
        cudaCheck(cudaDeviceSynchronize());
        check(rc == 0 && down_bytes(D.out, (size_t)(N * d) * 2) == b1.out, "%s: inference scratch: out bitwise (%s)",
              cs->name, rc ? err : "ok");
        // a backward on inference scratch is refused with a message
        Mamba2CudaG gr;
        memset(&gr, 0, sizeof gr);
        gr.D = D.g[T_D];
        check(mamba2_cuda_bwd(gm, &D.s, &D.w, &gr, D.u, D.reset, D.dout, NULL, &a, &ws, NULL, err, sizeof err) != 0 &&
                  strstr(err, "train"),
              "%s: backward on forward-only scratch refused: %s", cs->name, err);
        cudaFree(ar);
    }

    cudaFree((void *)D.w.in_proj), cudaFree((void *)D.w.conv_w), cudaFree((void *)D.w.conv_b);
    cudaFree((void *)D.w.dt_bias), cudaFree((void *)D.w.A_log), cudaFree((void *)D.w.D);
    cudaFree((void *)D.w.norm_w), cudaFree((void *)D.w.out_proj);
    for (int k = 0; k < 8; k++) cudaFree(D.g[k]);
    cudaFree(D.u), cudaFree(D.dout), cudaFree(D.out), cudaFree(D.dx), cudaFree(D.reset), cudaFree(D.arena);
    free(gc);
    free(p);
    reg_free(&r);
}

// Shapes the kernels cannot take are refused with a message naming the limit.
static void refusals(void) {
    printf("-- refusals\n");
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    c.n_layer = 1, c.d_model = 576, c.n_head = 9, c.n_kv_head = 3, c.head_dim = 64, c.d_ff = 64, c.vocab = 64;
    c.max_pos = 4096, c.rope_theta = 10000.0, c.rms_eps = 1e-5, c.bos_id = c.eos_id = -1;
    HybridConfig h;
    DlError e;
    Mamba2CudaShape s;
    char err[512];
    hybrid_config_init(&h, &c, MIXER_MAMBA2, NULL, 0, &e);
    check(mamba2_cuda_shape(&h, 2, 64, &s, err, sizeof err) == 0, "SmolLM2 shape accepted");
    HybridConfig h2 = h;
    h2.base.head_dim = 24, h2.d_state = 24, h2.d_inner = 9 * 24, h2.d_xb = 3 * 24;
    check(mamba2_cuda_shape(&h2, 2, 64, &s, err, sizeof err) != 0 && strstr(err, "multiples of 16"),
          "head_dim 24 refused: %s", err);
    h2 = h, h2.base.d_model = 580;
    check(mamba2_cuda_shape(&h2, 2, 64, &s, err, sizeof err) != 0 && strstr(err, "multiple of 8"),
          "d_model 580 refused: %s", err);
    h2 = h, h2.d_state = 16;
    check(mamba2_cuda_shape(&h2, 2, 64, &s, err, sizeof err) != 0 && strstr(err, "d_state"), "d_state != head_dim refused: %s",
          err);
    check(mamba2_cuda_shape(&h, 0, 64, &s, err, sizeof err) != 0, "batch 0 refused: %s", err);
}

// --bench: GPU time of one Llama-3-8B Mamba-2 layer (d 4096, 32 heads of 128, 8 KV groups), forward and forward +
// backward (every gradient and dx), random weights, one document per row. Informational (no pass/fail).
static void bench(DlGemm *gm, int64_t B, int64_t L) {
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    c.n_layer = 1, c.d_model = 4096, c.n_head = 32, c.n_kv_head = 8, c.head_dim = 128, c.d_ff = 64, c.vocab = 64;
    c.max_pos = 1 << 16, c.rope_theta = 500000.0, c.rms_eps = 1e-5, c.bos_id = c.eos_id = -1;
    HybridConfig h;
    DlError e;
    hybrid_config_init(&h, &c, MIXER_MAMBA2, NULL, 0, &e);
    Mamba2CudaShape s;
    char err[512] = "";
    if (mamba2_cuda_shape(&h, B, L, &s, err, sizeof err)) {
        fprintf(stderr, "bench: %s\n", err);
        exit(1);
    }
    const int64_t d = 4096, H = 32, di = 4096, xbc = 2 * 1024 + di, nin = di + xbc + H, N = B * L;
    Rng g;
    rng_init(&g, 5, 5);
    std::vector<float> win((size_t)(nin * d)), wout((size_t)(d * di)), cw((size_t)(xbc * 4)), cb((size_t)xbc);
    std::vector<float> dtb((size_t)H), alog((size_t)H), Dv((size_t)H, 1.f), nw((size_t)di, 1.f), x((size_t)(N * d));
    for (auto &v : win) v = (float)(rng_normal(&g) / 64.0);
    for (auto &v : wout) v = (float)(rng_normal(&g) / 64.0);
    for (auto &v : cw) v = (float)(0.3 * rng_normal(&g));
    for (auto &v : cb) v = (float)(0.3 * rng_normal(&g));
    for (int64_t k = 0; k < H; k++) dtb[k] = -4.f + 0.1f * (float)k, alog[k] = logf(1.f + (float)(k % 16));
    for (auto &v : x) v = (float)rng_normal(&g);
    Mamba2CudaW w = {(const uint16_t *)up_bf16(win.data(), nin * d), up_f32(cw.data(), xbc * 4), up_f32(cb.data(), xbc),
                     up_f32(dtb.data(), H), up_f32(alog.data(), H), up_f32(Dv.data(), H),
                     (const uint16_t *)up_bf16(nw.data(), di), (const uint16_t *)up_bf16(wout.data(), d * di)};
    Mamba2CudaG gr;
    float **gp[8] = {&gr.in_proj, &gr.conv_w, &gr.conv_b, &gr.dt_bias, &gr.A_log, &gr.D, &gr.norm_w, &gr.out_proj};
    const int64_t gn[8] = {nin * d, xbc * 4, xbc, H, H, H, di, d * di};
    for (int k = 0; k < 8; k++) {
        *gp[k] = (float *)dmalloc((size_t)gn[k] * 4);
        cudaCheck(cudaMemset(*gp[k], 0, (size_t)gn[k] * 4));
    }
    void *u = up_bf16(x.data(), N * d), *dout = up_bf16(x.data(), N * d), *out = dmalloc((size_t)(N * d) * 2);
    void *dx = dmalloc((size_t)(N * d) * 2);
    Mamba2CudaActs a;
    Mamba2CudaScratch ws;
    Mamba2CudaBuf bufs[2 * MAMBA2_CUDA_MAX_BUFS];
    int nb = mamba2_cuda_acts_bufs(&s, &a, bufs);
    const size_t acts = mamba2_cuda_bufs_bytes(bufs, nb);
    nb += mamba2_cuda_scratch_bufs(&s, 1, &ws, bufs + nb);
    const size_t total = mamba2_cuda_bufs_bytes(bufs, nb);
    void *arena = dmalloc(total);
    mamba2_cuda_bufs_place(bufs, nb, arena);
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    float ms_f = 0, ms_fb = 0;
    for (int pass = 0; pass < 2; pass++) {  // pass 0 warms up
        const int iters = pass ? 5 : 1;
        cudaCheck(cudaEventRecord(e0));
        for (int i = 0; i < iters; i++)
            if (mamba2_cuda_fwd(gm, &s, &w, u, NULL, out, &a, &ws, NULL, err, sizeof err)) exit(1);
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        cudaCheck(cudaEventElapsedTime(&ms_f, e0, e1));
        ms_f /= iters;
        cudaCheck(cudaEventRecord(e0));
        for (int i = 0; i < iters; i++)
            if (mamba2_cuda_fwd(gm, &s, &w, u, NULL, out, &a, &ws, NULL, err, sizeof err) ||
                mamba2_cuda_bwd(gm, &s, &w, &gr, u, NULL, dout, dx, &a, &ws, NULL, err, sizeof err)) {
                fprintf(stderr, "bench: %s\n", err);
                exit(1);
            }
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        cudaCheck(cudaEventElapsedTime(&ms_fb, e0, e1));
        ms_fb /= iters;
    }
    printf("bench: Llama-3-8B Mamba-2 layer, B %lld x L %lld: forward %.3f ms, forward+backward %.3f ms (%.0f tokens/s); "
           "saved activations %.1f MiB per layer, buffers %.1f MiB in all\n",
           (long long)B, (long long)L, ms_f, ms_fb, (double)N / (ms_fb * 1e-3), acts / 1048576.0, total / 1048576.0);
    cudaFree(arena), cudaFree(u), cudaFree(dout), cudaFree(out), cudaFree(dx);
    for (int k = 0; k < 8; k++) cudaFree(*gp[k]);
    cudaFree((void *)w.in_proj), cudaFree((void *)w.conv_w), cudaFree((void *)w.conv_b), cudaFree((void *)w.dt_bias);
    cudaFree((void *)w.A_log), cudaFree((void *)w.D), cudaFree((void *)w.norm_w), cudaFree((void *)w.out_proj);
}

int main(int argc, char **argv) {
    bool do_bench = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--verbose")) g_verbose = 1;
        else if (!strcmp(argv[i], "--bench")) do_bench = true;
        else {
            fprintf(stderr, "usage: gpu_test_mamba2 [--verbose] [--bench]\n");
            return 2;
        }
    }
    char err[512] = "";
    DlGemm *gm = dl_gemm_new(0, err, sizeof err);
    if (!gm) {
        fprintf(stderr, "gpu_test_mamba2: dl_gemm_new: %s\n", err);
        return 1;
    }
    if (do_bench) {  // timing only
        bench(gm, 8, 2048);
        bench(gm, 1, 8192);
        dl_gemm_free(gm);
        return 0;
    }
    refusals();
    for (size_t k = 0; k < sizeof CASES / sizeof CASES[0]; k++) run_case(&CASES[k], gm);
    dl_gemm_free(gm);
    printf("gpu_test_mamba2: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
