// gpu_test_engine.cu: the CUDA engine against the CPU engine (the reference) on a small random model.
//   1. bf16 mode, attention + Mamba-1 hybrid (2 + 2 layers, padded dt_rank, packed documents), every tensor
//      trainable, CE + 0.1 KL against a teacher engine: logits, loss and every parameter's gradient within
//      bf16 tolerance (relative error norm per tensor). The CPU runs in fp32 on the bf16-rounded weights.
//   2. fp32 mode, all-attention model with tied embeddings: the same checks within 1e-4.
//   3. 20 training steps of the stage-1 setup (only the Mamba mixers trained; device AdamW vs optim_step):
//      losses close at every step.
//   4. The 20 steps again on a fresh engine: identical bits (losses and final master weights).
//   5. The compact layout (fp32 master: trained + fp32-read Mamba tensors; gradients: trained tensors) with a
//      mixed trainable set: offsets, sizes = engine_cuda_plan, gradient copies, one step's gradients vs the CPU
//      engine, get_params writing only the master's tensors. (1.-2. also check that a frozen ECU_NO_MASTER
//      engine gives bit-identical logits.)
//   6. Attention through cuDNN's fused SDPA (DISTILL_ATTN=cudnn, set by the test; cases 1-5 run with the caller's
//      DISTILL_ATTN, native by default): case 1 with packed documents and with one document per row, each against
//      the CPU engine and against the hand-written kernels (close, and not bit-identical: cuDNN really ran), and
//      the 20 steps of case 3 twice (bit-identical: the deterministic backward). Fails where cuDNN cannot be
//      loaded. A bad DISTILL_ATTN value is refused.
//   7. Teacher forcing across engines: an engine started from another engine's hidden state (its stream waits on
//      that engine's event) gives the other engine's logits bit for bit.
//   8. Mamba-2 hybrids (MambaInLlama's Mamba-2 mixer, kernels/engine/mamba2_cuda.h; dt_bias and A_log in its init
//      ranges): case 1's parity on the small model and on SmolLM2's shapes (8 layers), the tied vocabulary-49152 KL
//      case, the 20 stage-1 steps (close to the CPU, bit-identical twice); fp32 mode is refused (bf16-only kernels).
//      The parity cases' CPU reference runs its Mamba-2 mixers with the device's bf16 storage
//      (mamba2_cpu_round_storage); their floor is still measured with fp32 storage.
// Exit status != 0 on any failure. Usage: gpu_test_engine [--verbose] [--no-cudnn]
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine/engine_cuda.h"
#include "kernels/engine/gpu_test_common.cuh"
#include "kernels/train/attention_cudnn.h"

extern "C" {
#include "distill/layers_cpu.h"
#include "distill/mamba2_cpu.h"
#include "distill/rng.h"
}




// bf16 gradient tolerance per tensor (relative error norm against the CPU engine in fp32 on the bf16-rounded
// weights). 5e-2, the project's bf16 gradient tolerance: on the real SmolLM2 teacher the CUDA gradients sit at 2-4e-2
// per tensor kind (docs/BENCHMARKS.md "Gradient parity on the real model"; distill/cmd_parity.c uses 5e-2), and here
// whole layers of a 4-layer model sit at 3-4.5e-2 with either attention path: bf16 rounding of activations
// propagated through the layers, not one tensor's error (the fp32 mode checks the math to 1e-4).
#define BF16_GRAD_TOL 5e-2
// dt_proj.bias: its gradient is a sum over every token of d delta, whose terms change sign, so bf16 errors of the terms
// survive the cancellation: it is the worst tensor of every bf16 parity run (SmolLM2 teacher-shaped 4.1e-2; here
// 4.2e-2 native, 5.0e-2 with cuDNN attention, H100 2727e28/b43e100), hence its own bound
#define BF16_GRAD_TOL_DT_BIAS 6e-2
// Mamba-2's D: d D = sum dy.x is a cancelling sum (the gated norm's dy is orthogonal to y ~ c x), which the SSD's
// bf16 y and dy move beyond the bf16 floor; gpu_test_mamba2 bounds the mixer alone at 1.5e-1 (docs/MAMBA2_CUDA.md)
#define BF16_GRAD_TOL_M2_D 1.5e-1
// Mamba-2's A_log takes dt_bias's bound: both are per-head sums over every token of terms that change sign (dA_h =
// A_h sum_t delta_t sum dh.h_prev.a), so the whole hybrid's bf16 activation noise (3e-2 per tensor here) survives
// their cancellation the same way. Measured: the mixer alone 1.6e-2 (gpu_test_mamba2); the tied vocabulary-49152 KL
// case's layer 2 (3 heads) 5.68e-2 with the storage-rounded CPU reference (H100, 0a7055e), 6.56e-2 before it.

// The mixer of the hybrid models' Mamba layers (case 8 switches to Mamba-2).
static MixerKind g_mixer = MIXER_MAMBA1;

// bf16 gradient tolerance of tensor `name` given the case's tolerance
static double grad_tol(const char *name, double tol_grad) {
    if (tol_grad < BF16_GRAD_TOL) return tol_grad;  // fp32 mode
    if (strstr(name, "dt_proj.bias") || strstr(name, "mamba.dt_bias")) return fmax(tol_grad, BF16_GRAD_TOL_DT_BIAS);
    if (g_mixer == MIXER_MAMBA2 && strstr(name, ".mamba.D")) return fmax(tol_grad, BF16_GRAD_TOL_M2_D);
    if (g_mixer == MIXER_MAMBA2 && strstr(name, ".mamba.A_log")) return fmax(tol_grad, BF16_GRAD_TOL_DT_BIAS);
    return tol_grad;
}

// Mamba-2 layers: dt_bias = softplus^-1 over MambaInLlama's dt range [1e-3, 1e-1] ([-6.9, -2.3]) across the heads and
// A_log = log(1 .. 16) (mamba2_init.c's ranges; test_params_init's generic values give dt ~ 0.7, far outside them)
static void mamba2_init_ranges(const HybridConfig *h, const Registry *r, float *p) {
    const int H = h->base.n_head;
    const double hm = H > 1 ? H - 1 : 1;
    for (int l = 0; l < h->base.n_layer; l++) {
        if (h->mixer[l] != MIXER_MAMBA2) continue;
        char nm[96];
        snprintf(nm, sizeof nm, "model.layers.%d.mamba.dt_bias", l);
        const int i = reg_find(r, nm);
        snprintf(nm, sizeof nm, "model.layers.%d.mamba.A_log", l);
        const int j = reg_find(r, nm);
        if (i < 0 || j < 0) {
            fprintf(stderr, "gpu_test_engine: layer %d has no dt_bias / A_log\n", l);
            exit(1);
        }
        for (int k = 0; k < H; k++) {
            p[r->t[i].offset + k] = (float)(-6.9 + 4.6 * k / hm + 0.05 * ((k * 7 + l) % 5 - 2));
            p[r->t[j].offset + k] = (float)log(1.0 + 15.0 * k / hm);
        }
    }
}

// Random weights: matrices N(0, 0.02^2 * 64/in-ish), norms 1 + noise, Mamba specifics in their usual ranges.
static void init_params(const Registry *r, float *p, uint64_t seed) { test_params_init(r, p, seed, 7, false); }

typedef struct {
    LlamaConfig c;
    HybridConfig h, ht;  // student (hybrid or teacher-shaped) and teacher
    Registry r, rt;
    float *p, *pt;       // host params
} Model;

// smol: SmolLM2-135M's layer shapes (d 576, 9/3 heads of 64, d_ff 1536) in 8 layers, attention at odd layers
static bool g_smol = false;

static void model_make_v(Model *m, bool hybrid, bool tied, int vocab, uint64_t seed) {
    DlError e;
    LlamaConfig *c = &m->c;
    memset(c, 0, sizeof *c);
    c->n_layer = g_smol ? 8 : 4;
    c->d_model = g_smol ? 576 : 192;  // dt_rank 12 (36): exercises the padded dt weights
    c->n_head = g_smol ? 9 : 3;
    c->n_kv_head = g_smol ? 3 : 1;
    c->head_dim = 64;
    c->d_ff = g_smol ? 1536 : 384;
    c->vocab = vocab;
    c->max_pos = 4096;
    c->rope_theta = 10000.0;
    c->rms_eps = 1e-5;
    c->tied_embeddings = tied;
    c->bos_id = c->eos_id = -1;
    int attn[4] = {1, 3, 5, 7};
    if (hybrid) die_if(hybrid_config_init(&m->h, c, g_mixer, attn, c->n_layer / 2, &e) != 0, &e, "hybrid_config_init");
    else hybrid_config_teacher(&m->h, c);
    hybrid_config_teacher(&m->ht, c);
    model_build_registry(&m->h, &m->r);
    model_build_registry(&m->ht, &m->rt);
    m->p = (float *)malloc((size_t)m->r.numel * 4);
    m->pt = (float *)malloc((size_t)m->rt.numel * 4);
    init_params(&m->r, m->p, seed);
    init_params(&m->rt, m->pt, seed + 1000);
    if (hybrid && g_mixer == MIXER_MAMBA2) mamba2_init_ranges(&m->h, &m->r, m->p);
}

static void model_make(Model *m, bool hybrid, bool tied, uint64_t seed) { model_make_v(m, hybrid, tied, 520, seed); }

// packed: several documents in both rows (resets inside the rows); else one document per row
static void batch_make_p(int64_t B, int64_t T, int V, uint64_t seed, bool packed, int32_t *tok, int32_t *tgt, uint8_t *reset) {
    Rng g;
    rng_init(&g, seed, 3);
    for (int64_t i = 0; i < B * T; i++) tok[i] = (int32_t)rng_below(&g, (uint64_t)V);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            int64_t i = b * T + t;
            tgt[i] = t + 1 < T ? tok[i + 1] : -1;
            reset[i] = t == 0 || (packed && ((b == 1 && t == T / 3) || (b == 0 && t == 100)));
        }
}
static void batch_make(int64_t B, int64_t T, int V, uint64_t seed, int32_t *tok, int32_t *tgt, uint8_t *reset) {
    batch_make_p(B, T, V, seed, true, tok, tgt, reset);
}

// What parity_v computed on the GPU (host copies; registry-layout gradients), for comparing two attention paths.
typedef struct {
    float *logits, *grads;  // [N, V], [numel]
    int64_t n_logits, n_grads;
} ParityOut;

// One CPU fp32 step of the student with weights p against the teacher with weights pt: gradients into g (calloc'd
// here), the loss returned, logits into logits when non-NULL. The reference of every parity case, and the floor's run.
static LossParts cpu_step(const Model *m, const float *p, const float *pt, int64_t B, int64_t T, const int32_t *tok,
                          const uint8_t *reset, const int32_t *tgt, float wce, float wkl, const float *seqw, float **g,
                          float *logits) {
    DlError e;
    Engine *ct = engine_new(&m->ht, &m->rt, pt, B, T, 0, &e);
    die_if(!ct, &e, "engine_new teacher");
    Engine *cs = engine_new(&m->h, &m->r, p, B, T, ENGINE_TRAIN, &e);
    die_if(!cs, &e, "engine_new student");
    engine_forward(ct, tok, reset);
    LossSpec ls;
    memset(&ls, 0, sizeof ls);
    ls.w.ce = wce;
    ls.w.kl = wkl;
    ls.teacher = ct;
    ls.seq_weight = seqw;
    ls.chunk_rows = 96;
    *g = (float *)calloc((size_t)m->r.numel, 4);
    LossParts l = engine_step(cs, tok, reset, tgt, NULL, &ls, *g);
    if (logits) engine_logits(cs, 0, B * T, logits);
    engine_free(cs);
    engine_free(ct);
    return l;
}

// Mamba-2 hybrids' gradients are ill-conditioned (docs/MAMBA2_CUDA.md "Accuracy"): there a tensor also passes within
// FLOOR_FACTOR x its floor, how far the CPU's own fp32 gradient moves when only the weights are rounded to bf16 --
// the rule of `distill parity --floor` (distill/cmd_parity.c), which judges the real Mamba-2 hybrid the same way
#define FLOOR_FACTOR 4.0

// One forward + loss + backward on both engines, compare logits, loss and every gradient.
// seqw: per-row weights of every loss term ([B]: DPO's -dL/dlogp), or NULL
static void parity_v(const char *label, bool hybrid, bool tied, int vocab, float wce, float wkl, const float *seqw, DType dt,
                     double tol_logits, double tol_grad, double tol_loss, bool packed = true, ParityOut *out = NULL) {
    printf("-- parity: %s\n", label);
    Model m;
    model_make_v(&m, hybrid, tied, vocab, 42);
    printf("   (%d layers, d %d, heads %d/%d, T %d)\n", m.c.n_layer, m.c.d_model, m.c.n_head, m.c.n_kv_head, g_smol ? 256 : 160);
    // the floor's weights: the model before rounding (Mamba-2 bf16 cases)
    const bool with_floor = dt == DT_BF16 && g_mixer == MIXER_MAMBA2;
    float *p32 = NULL, *pt32 = NULL;
    if (with_floor) {
        p32 = (float *)malloc((size_t)m.r.numel * 4), pt32 = (float *)malloc((size_t)m.rt.numel * 4);
        memcpy(p32, m.p, (size_t)m.r.numel * 4), memcpy(pt32, m.pt, (size_t)m.rt.numel * 4);
    }
    if (dt == DT_BF16) {
        bf16_round_array(m.p, m.r.numel);
        bf16_round_array(m.pt, m.rt.numel);
    }
    const int64_t B = 2, T = g_smol ? 256 : 160, N = B * T, V = m.c.vocab;
    int32_t *tok = (int32_t *)malloc(N * 4), *tgt = (int32_t *)malloc(N * 4);
    uint8_t *reset = (uint8_t *)malloc(N);
    batch_make_p(B, T, V, 5, packed, tok, tgt, reset);
    DlError e;
    // the CUDA engines first: with cuDNN attention the CPU reference rounds P to bf16 before P·V as cuDNN does (its
    // algorithm; on these shapes that moves the CPU's own gradients by up to ~1e-2 per tensor)
    EngineCuda *gt = engine_cuda_new(&m.ht, &m.rt, m.pt, B, T, ECU_NO_MASTER, dt, 96, NULL, &e);
    die_if(!gt, &e, "engine_cuda_new teacher");
    EngineCuda *gs = engine_cuda_new(&m.h, &m.r, m.p, B, T, ECU_TRAIN | ECU_TEACHER_KL, dt, 96, g_verbose ? stdout : NULL, &e);
    die_if(!gs, &e, "engine_cuda_new student");
    attention_cpu_round_p(engine_cuda_cudnn_attention(gs));
    // and its Mamba-2 mixers store bf16 where the device's do (with_floor: the Mamba-2 bf16 cases): their gradients
    // are ill-conditioned (in the SmolLM2-shaped case one token and head with a gated-norm input near 0 makes bf16
    // storage alone move layer 0's d dt_bias and d D by 0.97 / 0.78, the device's errors 1.01 / 0.83;
    // docs/MAMBA2_CUDA.md "Accuracy")
    mamba2_cpu_round_storage(with_floor);
    // CPU reference
    float *gc, *gfl = NULL, *gfr = NULL, *logc = (float *)malloc((size_t)N * V * 4);
    LossParts lc = cpu_step(&m, m.p, m.pt, B, T, tok, reset, tgt, wce, wkl, seqw, &gc, logc);
    mamba2_cpu_round_storage(false);
    // the floor as before: fp32 storage, on the rounded (gfr) and the unrounded weights (gfl). With the storage
    // rounded in both, weight rounding alone would move those two sums by 0.69 / 0.59 and excuse anything.
    if (with_floor) {
        cpu_step(&m, m.p, m.pt, B, T, tok, reset, tgt, wce, wkl, seqw, &gfr, NULL);
        cpu_step(&m, p32, pt32, B, T, tok, reset, tgt, wce, wkl, seqw, &gfl, NULL);
    }
    attention_cpu_round_p(false);
    // CUDA
    die_if(engine_cuda_forward(gt, tok, reset, &e) != 0, &e, "teacher forward");
    die_if(engine_cuda_forward(gs, tok, reset, &e) != 0, &e, "student forward");
    LossSpecCuda lg;
    memset(&lg, 0, sizeof lg);
    lg.w.ce = wce;
    lg.w.kl = wkl;
    lg.teacher = gt;
    lg.seq_weight = seqw;
    float *gd = engine_cuda_grads_new(gs);
    check(engine_cuda_grads_numel(gs) >= reg_params_numel(&m.r), "%s: every tensor trained: %lld gradient elements for "
          "%lld parameters", label, (long long)engine_cuda_grads_numel(gs), (long long)reg_params_numel(&m.r));
    // logits before the loss (the loss overwrites its chunk buffer with dlogits)
    const size_t es = dt == DT_BF16 ? 2 : 4;
    void *dl = engine_cuda_alloc((size_t)N * V * es);
    engine_cuda_logits(gs, 0, N, dl);
    float *logg = (float *)malloc((size_t)N * V * 4);
    if (dt == DT_BF16) {
        uint16_t *tmp = (uint16_t *)malloc((size_t)N * V * 2);
        engine_cuda_copy_to_host(tmp, dl, (size_t)N * V * 2);
        for (int64_t i = 0; i < N * V; i++) logg[i] = bf16_to_f32(tmp[i]);
        free(tmp);
    } else {
        engine_cuda_copy_to_host(logg, dl, (size_t)N * V * 4);
    }
    // the same weights in a frozen engine (no master beyond the fp32-read Mamba tensors, at other offsets): the
    // same logits, bit for bit
    {
        EngineCuda *gf = engine_cuda_new(&m.h, &m.r, m.p, B, T, ECU_NO_MASTER, dt, 96, NULL, &e);
        die_if(!gf, &e, "engine_cuda_new frozen student");
        check(engine_cuda_grads_numel(gf) == 0, "%s: a frozen engine has no gradients (%lld)", label,
              (long long)engine_cuda_grads_numel(gf));
        die_if(engine_cuda_forward(gf, tok, reset, &e) != 0, &e, "frozen forward");
        void *dl2 = engine_cuda_alloc((size_t)N * V * es);
        engine_cuda_logits(gf, 0, N, dl2);
        char *h1 = (char *)malloc((size_t)N * V * es), *h2 = (char *)malloc((size_t)N * V * es);
        engine_cuda_copy_to_host(h1, dl, (size_t)N * V * es);
        engine_cuda_copy_to_host(h2, dl2, (size_t)N * V * es);
        check(memcmp(h1, h2, (size_t)N * V * es) == 0, "%s: frozen engine (ECU_NO_MASTER) logits identical to the "
              "training engine's", label);
        free(h1), free(h2);
        engine_cuda_dfree(dl2);
        engine_cuda_free(gf);
    }
    LossParts lgp = engine_cuda_loss(gs, tgt, NULL, &lg, gd, NULL);
    engine_cuda_backward(gs, gd);
    float *gg = (float *)malloc((size_t)m.r.numel * 4);
    engine_cuda_grads_to_host(gs, gd, gg);
    double el = relerr(logg, logc, N * V);
    check(el <= tol_logits, "%s logits rel err %.3g (tol %.0e)", label, el, tol_logits);
    double dlc = fabs(lgp.loss - lc.loss) / fabs(lc.loss);
    check(dlc <= tol_loss, "%s loss cuda %.7f cpu %.7f (ce %.5f/%.5f kl %.5f/%.5f) rel %.2g (tol %.0e)", label, lgp.loss,
          lc.loss, lgp.ce, lc.ce, lgp.kl, lc.kl, dlc, tol_loss);
    double worst = 0;
    const char *wname = "";
    int nt = 0, nfloor = 0;
    for (int i = 0; i < m.r.n; i++) {
        const TensorInfo *t = &m.r.t[i];
        double er = relerr(gg + t->offset, gc + t->offset, t->numel);
        const double tol = grad_tol(t->name, tol_grad);
        const double fl = gfl ? relerr(gfl + t->offset, gfr + t->offset, t->numel) : 0.0;
        const bool ok = er <= tol || er <= FLOOR_FACTOR * fl;
        if (g_verbose) printf("      %-52s grad rel err %.3g floor %.3g\n", t->name, er, fl);
        if (g_verbose && gfl && t->numel <= 16) {  // per-head tensors (dt_bias, A_log, D): where the error sits
            printf("        cuda");
            for (int64_t k = 0; k < t->numel; k++) printf(" %10.3e", gg[t->offset + k]);
            printf("\n        cpu ");
            for (int64_t k = 0; k < t->numel; k++) printf(" %10.3e", gc[t->offset + k]);
            printf("\n");
        }
        if (!ok) printf("  FAIL %s grad %s rel err %.3g (tol %.0e, floor %.3g)\n", label, t->name, er, tol, fl);
        if (gfl && !(er <= tol) && ok) nfloor++;
        if (!(er <= worst)) worst = er, wname = t->name;
        nt++;
        ok ? g_pass++ : g_fail++;
    }
    if (gfl) printf("  %s: %d gradients above their tolerance pass within %.0fx their floor\n", label, nfloor, FLOOR_FACTOR);
    printf("  %s: %d gradients, worst rel err %.3g (%s), logits %.3g, loss rel %.2g\n", label, nt, worst, wname, el, dlc);
    if (out) {  // handed over to the caller
        out->logits = logg, out->grads = gg, out->n_logits = N * V, out->n_grads = m.r.numel;
        logg = gg = NULL;
    }
    engine_cuda_dfree(gd);
    engine_cuda_dfree(dl);
    engine_cuda_free(gs);
    engine_cuda_free(gt);
    free(gc), free(gfl), free(gfr), free(p32), free(pt32), free(gg), free(logc), free(logg), free(tok), free(tgt), free(reset);
    reg_free(&m.r), reg_free(&m.rt), free(m.p), free(m.pt);
}

// 20 stage-1 steps on the GPU: losses [steps], final master into pout.
static void gpu_train(Model *m, const OptimConfig *oc, int steps, int64_t B, int64_t T, double *loss, float *pout) {
    DlError e;
    const int64_t N = B * T;
    EngineCuda *gt = engine_cuda_new(&m->ht, &m->rt, m->pt, B, T, ECU_NO_MASTER, DT_BF16, 0, NULL, &e);
    die_if(!gt, &e, "teacher");
    EngineCuda *gs = engine_cuda_new(&m->h, &m->r, m->p, B, T, ECU_TRAIN | ECU_TEACHER_KL, DT_BF16, 0, NULL, &e);
    die_if(!gs, &e, "student");
    EngineCudaOptim *o = engine_cuda_optim_new(gs, oc, DT_F32, &e);
    die_if(!o, &e, "optim");
    float *gd = engine_cuda_grads_new(gs);
    int32_t *tok = (int32_t *)malloc(N * 4), *tgt = (int32_t *)malloc(N * 4);
    uint8_t *reset = (uint8_t *)malloc(N);
    LossSpecCuda lg;
    memset(&lg, 0, sizeof lg);
    lg.w.ce = 1.0f;
    lg.w.kl = 0.1f;
    lg.teacher = gt;
    for (int s = 0; s < steps; s++) {
        batch_make(B, T, m->c.vocab, 100 + s % 4, tok, tgt, reset);
        engine_cuda_zero_trainable(gs, gd);
        die_if(engine_cuda_forward(gt, tok, reset, &e) != 0, &e, "fwd");
        die_if(engine_cuda_forward(gs, tok, reset, &e) != 0, &e, "fwd");
        LossParts lp = engine_cuda_loss(gs, tgt, NULL, &lg, gd, NULL);
        engine_cuda_backward(gs, gd);
        OptimResult res;
        engine_cuda_optim_step(o, gd, lp.loss, &res);
        loss[s] = lp.loss;
    }
    // get_params writes the master's tensors only: the frozen ones keep the host's values
    memcpy(pout, m->p, (size_t)m->r.numel * 4);
    engine_cuda_get_params(gs, pout);
    engine_cuda_dfree(gd);
    engine_cuda_optim_free(o);
    engine_cuda_free(gs);
    engine_cuda_free(gt);
    free(tok), free(tgt), free(reset);
}

static void train_test(void) {
    const char *attn = getenv("DISTILL_ATTN");
    printf("-- 20 stage-1 steps (Mamba mixers trained), CUDA bf16 vs CPU fp32 (DISTILL_ATTN=%s)\n", attn && *attn ? attn : "default");
    Model m;
    model_make(&m, true, false, 77);
    bf16_round_array(m.p, m.r.numel);
    bf16_round_array(m.pt, m.rt.numel);
    DlError e;
    die_if(reg_set_trainable(&m.r, "*.mamba.*", &e) < 0, &e, "trainable");
    OptimConfig oc;
    optim_config_default(&oc);
    oc.lr = 1e-3;
    oc.decay = LR_DECAY_CONSTANT;
    oc.total_steps = 20;
    oc.weight_decay = 0.01;
    oc.outlier_factor = 0;
    const int steps = 20;
    const int64_t B = 2, T = 160, N = B * T;
    // CPU
    double lc[20], lg1[20], lg2[20];
    {
        Optim o;
        die_if(optim_init(&o, &oc, &m.r, &e) != 0, &e, "optim_init");
        float *p = (float *)malloc((size_t)m.r.numel * 4), *g = (float *)malloc((size_t)m.r.numel * 4);
        memcpy(p, m.p, (size_t)m.r.numel * 4);
        Engine *ct = engine_new(&m.ht, &m.rt, m.pt, B, T, 0, &e);
        Engine *cs = engine_new(&m.h, &m.r, p, B, T, ENGINE_TRAIN, &e);
        int32_t *tok = (int32_t *)malloc(N * 4), *tgt = (int32_t *)malloc(N * 4);
        uint8_t *reset = (uint8_t *)malloc(N);
        LossSpec ls;
        memset(&ls, 0, sizeof ls);
        ls.w.ce = 1.0f;
        ls.w.kl = 0.1f;
        ls.teacher = ct;
        for (int s = 0; s < steps; s++) {
            batch_make(B, T, m.c.vocab, 100 + s % 4, tok, tgt, reset);
            optim_zero_grads(&o, g);
            engine_forward(ct, tok, reset);
            LossParts lp = engine_step(cs, tok, reset, tgt, NULL, &ls, g);
            OptimResult res;
            optim_step(&o, p, g, lp.loss, &res);
            lc[s] = lp.loss;
        }
        engine_free(cs), engine_free(ct), optim_free(&o);
        free(p), free(g), free(tok), free(tgt), free(reset);
    }
    float *p1 = (float *)malloc((size_t)m.r.numel * 4), *p2 = (float *)malloc((size_t)m.r.numel * 4);
    gpu_train(&m, &oc, steps, B, T, lg1, p1);
    gpu_train(&m, &oc, steps, B, T, lg2, p2);
    double worst = 0;
    for (int s = 0; s < steps; s++) {
        double d = fabs(lg1[s] - lc[s]) / fabs(lc[s]);
        worst = fmax(worst, d);
        if (g_verbose || s == 0 || s == steps - 1) printf("    step %2d loss cuda %.6f cpu %.6f\n", s, lg1[s], lc[s]);
    }
    check(worst <= 1e-2, "20-step losses: worst rel diff %.3g (tol 1e-2), first %.5f last %.5f (cpu %.5f -> %.5f)", worst,
          lg1[0], lg1[steps - 1], lc[0], lc[steps - 1]);
    check(lg1[steps - 1] < lg1[0], "training lowers the loss (%.5f -> %.5f)", lg1[0], lg1[steps - 1]);
    check(memcmp(lg1, lg2, sizeof lg1) == 0, "two CUDA runs: identical losses");
    check(memcmp(p1, p2, (size_t)m.r.numel * 4) == 0, "two CUDA runs: identical final master weights");
    free(p1), free(p2);
    reg_free(&m.r), reg_free(&m.rt), free(m.p), free(m.pt);
}

// The compact layout with a mixed trainable set (an MLP, one Mamba projection; the fp32-read Mamba tensors
// frozen but kept in the master): offsets, sizes against engine_cuda_plan, the gradient copies, one step's
// gradients against the CPU engine (fused gate|up gradient in the compact buffer), and get_params' contract.
static void layout_test(void) {
    printf("-- compact master / gradients (trainable: MLPs + in_proj_x)\n");
    Model m;
    model_make(&m, true, false, 11);
    bf16_round_array(m.p, m.r.numel);
    bf16_round_array(m.pt, m.rt.numel);
    DlError e;
    die_if(reg_set_trainable(&m.r, "*.mlp.*,*.mamba.in_proj_x.weight", &e) < 0, &e, "trainable");
    const int64_t B = 2, T = 160, N = B * T;
    const int flags = ECU_TRAIN | ECU_TEACHER_KL;
    EngineCuda *gs = engine_cuda_new(&m.h, &m.r, m.p, B, T, flags, DT_BF16, 96, g_verbose ? stdout : NULL, &e);
    die_if(!gs, &e, "engine_cuda_new");
    // offsets: trained tensors in registry order, aligned, disjoint; fp32-read Mamba tensors have a master only
    int64_t want_g = 0, want_m = 0, prev_end = 0;
    bool offs_ok = true, f32_ok = true;
    int n_f32 = 0;
    for (int i = 0; i < m.r.n; i++) {
        const TensorInfo *t = &m.r.t[i];
        const int64_t span = (t->numel + DL_TENSOR_ALIGN - 1) / DL_TENSOR_ALIGN * DL_TENSOR_ALIGN;
        const int64_t go = engine_cuda_grad_offset(gs, i), mo = engine_cuda_master_offset(gs, i);
        const bool f32 = strstr(t->name, ".conv1d.") || strstr(t->name, ".A_log") || strstr(t->name, "dt_proj.bias") ||
                         (strstr(t->name, ".mamba.D") && t->ndim == 1);
        if (t->trainable) {
            offs_ok &= go >= prev_end && go % DL_TENSOR_ALIGN == 0 && mo >= 0;
            prev_end = go + t->numel;
            want_g += span;
        } else {
            offs_ok &= go == -1;
        }
        if (f32 && !t->trainable) f32_ok &= mo >= 0, n_f32++;
        if (!f32 && !t->trainable) f32_ok &= mo == -1;
        if (t->trainable || f32) want_m += span;
    }
    check(offs_ok, "gradient offsets: trained tensors only, in registry order, aligned, disjoint");
    check(f32_ok && n_f32 == 10, "master: trained tensors + the %d frozen fp32-read Mamba tensors (want 10), nothing else",
          n_f32);
    check(engine_cuda_grads_numel(gs) == want_g, "gradient elements %lld (want %lld of %lld in the registry)",
          (long long)engine_cuda_grads_numel(gs), (long long)want_g, (long long)m.r.numel);
    EngineCudaMemory mem, plan;
    engine_cuda_memory_parts(gs, &mem);
    check(mem.master == 4.0 * (double)want_m, "master %.0f bytes (want %.0f)", mem.master, 4.0 * (double)want_m);
    die_if(engine_cuda_plan(&m.h, &m.r, B, T, flags, DT_BF16, 96, &plan, &e) != 0, &e, "engine_cuda_plan");
    check(memcmp(&mem, &plan, sizeof mem) == 0, "engine_cuda_plan = the engine's memory (compute %.0f master %.0f padded "
          "%.0f activations %.0f grads %.0f)", plan.compute, plan.master, plan.padded, plan.activations, plan.grads);
    // gradient copies: registry layout <-> compact
    float *h1 = (float *)malloc((size_t)m.r.numel * 4), *h2 = (float *)malloc((size_t)m.r.numel * 4);
    for (int64_t i = 0; i < m.r.numel; i++) h1[i] = (float)(i % 1013) - 500.0f;
    float *gd = engine_cuda_grads_new(gs);
    engine_cuda_grads_from_host(gs, gd, h1);
    engine_cuda_grads_to_host(gs, gd, h2);
    bool rt = true;
    for (int i = 0; i < m.r.n; i++) {
        const TensorInfo *t = &m.r.t[i];
        for (int64_t j = 0; j < t->numel && rt; j++)
            rt = h2[t->offset + j] == (t->trainable ? h1[t->offset + j] : 0.0f);
    }
    check(rt, "grads_from_host -> grads_to_host: trained tensors kept, the others zero");
    // one step against the CPU engine with the same trainable set
    int32_t *tok = (int32_t *)malloc(N * 4), *tgt = (int32_t *)malloc(N * 4);
    uint8_t *reset = (uint8_t *)malloc(N);
    batch_make(B, T, m.c.vocab, 21, tok, tgt, reset);
    Engine *ct = engine_new(&m.ht, &m.rt, m.pt, B, T, 0, &e);
    die_if(!ct, &e, "engine_new teacher");
    Engine *cs = engine_new(&m.h, &m.r, m.p, B, T, ENGINE_TRAIN, &e);
    die_if(!cs, &e, "engine_new student");
    engine_forward(ct, tok, reset);
    LossSpec ls;
    memset(&ls, 0, sizeof ls);
    ls.w.ce = 1.0f;
    ls.w.kl = 0.1f;
    ls.teacher = ct;
    ls.chunk_rows = 96;
    float *gc = (float *)calloc((size_t)m.r.numel, 4);
    engine_step(cs, tok, reset, tgt, NULL, &ls, gc);
    EngineCuda *gt = engine_cuda_new(&m.ht, &m.rt, m.pt, B, T, ECU_NO_MASTER, DT_BF16, 96, NULL, &e);
    die_if(!gt, &e, "engine_cuda_new teacher");
    LossSpecCuda lg;
    memset(&lg, 0, sizeof lg);
    lg.w = ls.w;
    lg.teacher = gt;
    engine_cuda_zero_trainable(gs, gd);
    die_if(engine_cuda_forward(gt, tok, reset, &e) != 0, &e, "teacher forward");
    die_if(engine_cuda_forward(gs, tok, reset, &e) != 0, &e, "student forward");
    engine_cuda_loss(gs, tgt, NULL, &lg, gd, NULL);
    engine_cuda_backward(gs, gd);
    engine_cuda_grads_to_host(gs, gd, h2);
    double worst = 0;
    int nt = 0;
    bool zeros = true;
    for (int i = 0; i < m.r.n; i++) {
        const TensorInfo *t = &m.r.t[i];
        if (!t->trainable) {
            for (int64_t j = 0; j < t->numel; j++) zeros &= h2[t->offset + j] == 0.0f;
            continue;
        }
        double er = relerr(h2 + t->offset, gc + t->offset, t->numel);
        if (g_verbose || !(er <= BF16_GRAD_TOL)) printf("      %-52s grad rel err %.3g\n", t->name, er);
        worst = fmax(worst, er);
        if (!(er <= BF16_GRAD_TOL)) worst = INFINITY;
        nt++;
    }
    check(worst <= BF16_GRAD_TOL, "%d trained tensors' gradients vs the CPU engine: worst rel err %.3g (tol %.0e)", nt, worst,
          BF16_GRAD_TOL);
    check(zeros, "untrained tensors read back as zero gradients");
    // the same step on an engine that trains every tensor (registry-ordered compact layout = the registry's,
    // padding aside): the same bits for the tensors both train
    {
        Registry rall;
        model_build_registry(&m.h, &rall);  // every tensor trainable
        EngineCuda *ga = engine_cuda_new(&m.h, &rall, m.p, B, T, flags, DT_BF16, 96, NULL, &e);
        die_if(!ga, &e, "engine_cuda_new (all trainable)");
        float *gda = engine_cuda_grads_new(ga);
        die_if(engine_cuda_forward(ga, tok, reset, &e) != 0, &e, "forward (all trainable)");
        engine_cuda_loss(ga, tgt, NULL, &lg, gda, NULL);
        engine_cuda_backward(ga, gda);
        engine_cuda_grads_to_host(ga, gda, h1);
        bool same = true;
        for (int i = 0; i < m.r.n; i++)
            if (m.r.t[i].trainable && memcmp(h1 + m.r.t[i].offset, h2 + m.r.t[i].offset, (size_t)m.r.t[i].numel * 4)) {
                printf("      %s: gradient differs from the all-trainable engine's\n", m.r.t[i].name);
                same = false;
            }
        check(same, "trained tensors' gradients bit-identical to an all-trainable engine's");
        engine_cuda_dfree(gda);
        engine_cuda_free(ga);
        reg_free(&rall);
    }
    // get_params: the master's tensors only; a sentinel marks what must stay untouched
    for (int64_t i = 0; i < m.r.numel; i++) h1[i] = -12345.0f;
    engine_cuda_get_params(gs, h1);
    bool gp = true;
    for (int i = 0; i < m.r.n; i++) {
        const TensorInfo *t = &m.r.t[i];
        const bool has = engine_cuda_master_offset(gs, i) >= 0;
        for (int64_t j = 0; j < t->numel && gp; j++)
            gp = has ? h1[t->offset + j] == m.p[t->offset + j] : h1[t->offset + j] == -12345.0f;
    }
    check(gp, "get_params writes exactly the master's tensors (their uploaded fp32 values) and leaves the rest alone");
    engine_cuda_dfree(gd);
    engine_cuda_free(gs);
    engine_cuda_free(gt);
    engine_free(cs);
    engine_free(ct);
    free(h1), free(h2), free(gc), free(tok), free(tgt), free(reset);
    reg_free(&m.r), reg_free(&m.rt), free(m.p), free(m.pt);
}

// Teacher forcing across engines: a second engine with the teacher's weights, started at layer l0 from the
// teacher's hidden state l0 (engine_cuda_forward_range with x0, another engine's stream), must give the teacher's
// logits bit for bit; so must the teacher's final hidden state read through wait_hidden by the loss.
static void forcing_test(void) {
    printf("-- teacher forcing from another engine's hidden state (cross-stream)\n");
    Model m;
    model_make(&m, false, false, 11);
    const int64_t B = 2, T = 160, N = B * T, V = m.c.vocab;
    int32_t *tok = (int32_t *)malloc(N * 4), *tgt = (int32_t *)malloc(N * 4);
    uint8_t *reset = (uint8_t *)malloc(N);
    batch_make(B, T, V, 31, tok, tgt, reset);
    DlError e;
    EngineCuda *t = engine_cuda_new(&m.ht, &m.rt, m.pt, B, T, ECU_NO_MASTER | ECU_KEEP_HIDDEN, DT_BF16, 0, NULL, &e);
    die_if(!t, &e, "teacher");
    EngineCuda *s = engine_cuda_new(&m.ht, &m.rt, m.pt, B, T, ECU_NO_MASTER, DT_BF16, 0, NULL, &e);
    die_if(!s, &e, "second engine");
    const size_t bytes = (size_t)(N * V) * 2;
    void *l1 = engine_cuda_alloc(bytes), *l2 = engine_cuda_alloc(bytes);
    char *h1 = (char *)malloc(bytes), *h2 = (char *)malloc(bytes);
    for (int l0 = 1; l0 <= 3; l0 += 2) {
        die_if(engine_cuda_forward(t, tok, reset, &e) != 0, &e, "teacher forward");
        die_if(engine_cuda_forward_range(s, tok, reset, l0, engine_cuda_hidden(t, l0), m.c.n_layer, &e) != 0, &e,
               "forward from the teacher's hidden state");
        engine_cuda_logits(t, 0, N, l1);
        engine_cuda_logits(s, 0, N, l2);
        engine_cuda_copy_to_host(h1, l1, bytes);
        engine_cuda_copy_to_host(h2, l2, bytes);
        check(memcmp(h1, h2, bytes) == 0, "forward from the teacher's hidden state %d: logits identical to the teacher's", l0);
    }
    engine_cuda_dfree(l1), engine_cuda_dfree(l2);
    engine_cuda_free(s), engine_cuda_free(t);
    free(h1), free(h2), free(tok), free(tgt), free(reset);
    reg_free(&m.r), reg_free(&m.rt), free(m.p), free(m.pt);
}

// Out-of-memory path: an absurd micro-batch must come back as an error with the plan printed.
static void oom_test(void) {
    printf("-- out of memory is reported, not a crash\n");
    Model m;
    model_make(&m, true, false, 3);
    DlError e;
    EngineCuda *g = engine_cuda_new(&m.h, &m.r, m.p, 4096, 4096, ECU_TRAIN, DT_BF16, 0, stdout, &e);
    check(g == NULL, "engine_cuda_new(B 4096 x T 4096) fails: %s", g ? "(allocated?)" : e.msg);
    engine_cuda_free(g);
    reg_free(&m.r), reg_free(&m.rt), free(m.p), free(m.pt);
}

// 6. cuDNN's fused attention in the engine (DISTILL_ATTN=cudnn) against the CPU engine and the hand-written kernels.
static void cudnn_test(void) {
    printf("-- attention through cuDNN (DISTILL_ATTN=cudnn) vs the hand-written kernels and the CPU engine\n");
    char why[512];
    SdpaCudnn *probe = sdpa_cudnn_new(1, why, sizeof why);
    check(probe != NULL, "cuDNN fused attention loads (%s)", probe ? "ok" : why);
    if (!probe) return;
    printf("  cuDNN %ld\n", sdpa_cudnn_version(probe));
    sdpa_cudnn_free(probe);
    {  // a bad value is an error, not a silent default
        Model m;
        model_make(&m, true, false, 3);
        DlError e;
        setenv("DISTILL_ATTN", "flash", 1);
        EngineCuda *g = engine_cuda_new(&m.h, &m.r, m.p, 2, 64, ECU_TRAIN, DT_BF16, 0, NULL, &e);
        check(g == NULL, "DISTILL_ATTN=flash refused: %s", g ? "(accepted)" : e.msg);
        engine_cuda_free(g);
        reg_free(&m.r), reg_free(&m.rt), free(m.p), free(m.pt);
    }
    for (int k = 0; k < 4; k++) {  // tiny and SmolLM2-shaped, packed documents and one document per row
        const int packed = !(k & 1);
        g_smol = k >= 2;
        ParityOut nat, cud;
        char l1[128], l2[128];
        const char *shape = g_smol ? "SmolLM2-shaped 8 layers" : "4 layers", *docs = packed ? "packed documents" : "one document per row";
        snprintf(l1, sizeof l1, "bf16 hybrid %s, %s, native attention", shape, docs);
        snprintf(l2, sizeof l2, "bf16 hybrid %s, %s, cuDNN attention", shape, docs);
        // The 8-layer case looks for a gross error (the real SmolLM2 hybrid's gradients came out 10-20x too large
        // with cuDNN), so its tolerances sit above its measured bf16 floor rather than at the 4-layer ones: on the
        // H100 (e19e914) the hand-written kernels reached 5.2-5.7e-2 per tensor against the CPU at 8 layers (bf16
        // error grows with depth), cuDNN 5.1-6.2e-2, and the two differed by 1.1e-2 (logits) and 3.1-3.6e-2
        // (all gradients).
        const double tg = g_smol ? 8e-2 : BF16_GRAD_TOL, tl = g_smol ? 2e-2 : 1e-2, tx = g_smol ? 5e-2 : 2e-2;
        setenv("DISTILL_ATTN", "native", 1);
        parity_v(l1, true, false, 520, 1.0f, 0.1f, NULL, DT_BF16, 2e-2, tg, 5e-3, packed, &nat);
        setenv("DISTILL_ATTN", "cudnn", 1);
        parity_v(l2, true, false, 520, 1.0f, 0.1f, NULL, DT_BF16, 2e-2, tg, 5e-3, packed, &cud);
        const double el = relerr(cud.logits, nat.logits, nat.n_logits);
        check(el <= tl, "%s: cuDNN vs hand-written logits rel err %.3g (tol %.0e)", l2, el, tl);
        check(memcmp(cud.logits, nat.logits, (size_t)nat.n_logits * 4) != 0,
              "%s: logits differ in bits from the hand-written kernels' (cuDNN ran, no silent fallback)", l2);
        const double eg = relerr(cud.grads, nat.grads, nat.n_grads);
        check(eg <= tx, "%s: cuDNN vs hand-written gradients (all tensors) rel err %.3g (tol %.0e)", l2, eg, tx);
        free(nat.logits), free(nat.grads), free(cud.logits), free(cud.grads);
    }
    g_smol = false;
    // 20 steps twice with cuDNN attention: close to the CPU, bit-identical to each other
    setenv("DISTILL_ATTN", "cudnn", 1);
    train_test();
    unsetenv("DISTILL_ATTN");
}

static void parity(const char *label, bool hybrid, DType dt, double tol_logits, double tol_grad, double tol_loss) {
    parity_v(label, hybrid, !hybrid, 520, 1.0f, 0.1f, NULL, dt, tol_logits, tol_grad, tol_loss);
}

// 8. Mamba-2 hybrids: the parity cases, the 20 steps, the fp32 refusal (with the caller's DISTILL_ATTN)
static void mamba2_cases(void) {
    g_mixer = MIXER_MAMBA2;
    parity("bf16 Mamba-2 hybrid", true, DT_BF16, 2e-2, BF16_GRAD_TOL, 5e-3);
    parity_v("bf16 Mamba-2 hybrid, tied, vocab 49152, KL", true, true, 49152, 0.0f, 1.0f, NULL, DT_BF16, 2e-2,
             BF16_GRAD_TOL, 5e-3);
    g_smol = true;  // SmolLM2's shapes: 9 heads of 64 in 3 KV groups (dt rows padded 9 -> 16), T 256
    parity("bf16 Mamba-2 hybrid, SmolLM2 shapes", true, DT_BF16, 2e-2, BF16_GRAD_TOL, 5e-3);
    g_smol = false;
    train_test();
    {
        Model m;
        model_make(&m, true, false, 9);
        DlError e;
        EngineCuda *g = engine_cuda_new(&m.h, &m.r, m.p, 2, 64, ECU_TRAIN, DT_F32, 0, NULL, &e);
        check(!g && strstr(e.msg, "Mamba-2"), "fp32 mode with Mamba-2 layers refused: %s", g ? "(accepted)" : e.msg);
        if (g) engine_cuda_free(g);
        reg_free(&m.r), reg_free(&m.rt), free(m.p), free(m.pt);
    }
    g_mixer = MIXER_MAMBA1;
}

int main(int argc, char **argv) {
    bool cudnn = true;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--verbose")) g_verbose = 1;
        else if (!strcmp(argv[i], "--no-cudnn")) cudnn = false;
        else {
            fprintf(stderr, "usage: gpu_test_engine [--verbose] [--no-cudnn]\n");
            return 2;
        }
    }
    const char *attn = getenv("DISTILL_ATTN");
    printf("gpu_test_engine: cases 1-5 with DISTILL_ATTN=%s\n", attn && *attn ? attn : "(unset: the engine's default)");
    parity("bf16 hybrid", true, DT_BF16, 2e-2, BF16_GRAD_TOL, 5e-3);
    parity("fp32 attention", false, DT_F32, 1e-4, 1e-4, 1e-5);
    // SmolLM2's case: a hybrid with tied embeddings and a large vocabulary, every tensor trained, bf16 (the
    // pipeline's all-parameter stages on SmolLM2 showed CUDA gradient norms 2.4-8.6x below the CPU's at step 1)
    // with the end-to-end distill stage's loss (KL only) and with CE + 0.1 KL
    parity_v("bf16 hybrid, tied, vocab 49152, KL", true, true, 49152, 0.0f, 1.0f, NULL, DT_BF16, 2e-2, BF16_GRAD_TOL, 5e-3);
    parity_v("bf16 hybrid, tied, vocab 49152, CE + 0.1 KL", true, true, 49152, 1.0f, 0.1f, NULL, DT_BF16, 2e-2, BF16_GRAD_TOL, 5e-3);
    // DPO's gradient: CE with opposite row weights on a chosen and a rejected row (B = 2)
    static const float dpo_w[2] = {0.06f, -0.02f};  // opposite signs, not cancelling (the loss check is relative)
    parity_v("bf16 hybrid, tied, vocab 49152, row-weighted CE", true, true, 49152, 1.0f, 0.0f, dpo_w, DT_BF16, 2e-2, BF16_GRAD_TOL, 5e-3);
    train_test();
    layout_test();
    forcing_test();
    oom_test();
    if (cudnn) cudnn_test();
    mamba2_cases();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
