// cmd_parity.c: `distill parity` — the CUDA engine against the CPU reference on one real model and batch
// (issue #7's parity check at full size, through the same TrainModel calls the training loop makes):
//   1. one forward/loss/backward on each device: the loss, a few rows of logits, and every trained tensor's
//      gradient (relative error of the CUDA one against the CPU one, per tensor and per tensor kind);
//   2. --fd: the CPU gradient itself checked by central finite differences along each tensor kind's gradient
//      direction (CPU only, fp32 forward, double loss sums), so a disagreement says which side is wrong;
//   3. --steps N: N AdamW steps on both devices from the same start, their losses and gradient norms.
// The student is MODEL as loaded, or with --attn-layers the hybrid the `init` stage builds from it (the
// loaded model is then also the teacher of --kl). Exit status 1 when a tolerance is exceeded.
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/command.h"
#include "distill/common.h"
#include "distill/dtype.h"
#include "distill/layers_cpu.h"
#include "distill/mamba_init.h"
#include "distill/model_io.h"
#include "distill/rng.h"
#include "distill/tokenizer.h"
#include "distill/train_model.h"

typedef struct {
    const char *model, *text, *train, *attn, *row_w, *against;
    int64_t B, T;
    float ce, kl;
    int fd, steps;
    bool fp32, cpu_only, mamba2, round, floor;
    double lr, tol_loss, tol_grad, tol_norm;
    uint64_t seed;
} Args;

typedef struct {
    HybridConfig h;
    Registry r;
    float *params;  // [r.numel], the starting point
} Student;

// "odd" | "even" | "none" | "1,3,5": the layers that keep attention.
static int parse_attn(const char *s, int n_layer, int *out) {
    int n = 0;
    if (!strcmp(s, "odd") || !strcmp(s, "even")) {
        for (int l = !strcmp(s, "odd"); l < n_layer; l += 2) out[n++] = l;
        return n;
    }
    if (!strcmp(s, "none")) return 0;
    for (const char *p = s; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v >= n_layer)
            dl_die(DL_EXIT_USAGE, "parity: --attn-layers '%s': expected odd, even, none or layer numbers 0..%d", s,
                   n_layer - 1);
        out[n++] = (int)v;
        p = *end == ',' ? end + 1 : end;
    }
    return n;
}

static void make_student(const Args *a, const LoadedModel *src, Student *s) {
    DlError e;
    if (!a->attn) {
        s->h = src->hc;
        model_build_registry(&s->h, &s->r);
        s->params = dl_malloc((size_t)s->r.numel * sizeof(float));
        memcpy(s->params, src->params, (size_t)s->r.numel * sizeof(float));
    } else {
        int attn[DL_MAX_LAYERS];
        int n = parse_attn(a->attn, src->hc.base.n_layer, attn);
        if (hybrid_config_init(&s->h, &src->hc.base, a->mamba2 ? MIXER_MAMBA2 : MIXER_MAMBA1, attn, n, &e))
            dl_die(DL_EXIT_USAGE, "parity: %s", e.msg);
        model_build_registry(&s->h, &s->r);
        s->params = dl_calloc((size_t)s->r.numel, sizeof(float));
        if (hybrid_init_from_teacher(&s->h, &s->r, s->params, &src->hc, &src->reg, src->params, a->seed, &e))
            dl_die(DL_EXIT_INPUT, "parity: %s", e.msg);
    }
    if (reg_set_trainable(&s->r, a->train, &e) < 0) dl_die(DL_EXIT_USAGE, "parity: --train: %s", e.msg);
}

// B windows of T tokens (and their next-token targets) from --text, or seeded random ids.
static void make_batch(const Args *a, int64_t V, int32_t *tok, int32_t *tgt) {
    const int64_t B = a->B, T = a->T;
    if (a->text) {
        DlError e;
        size_t len;
        char *txt = dl_read_file(a->text, &len, &e);
        if (!txt) dl_die(DL_EXIT_INPUT, "parity: %s", e.msg);
        Tokenizer *tk;
        if (tokenizer_load(a->model, &tk, &e)) dl_die(DL_EXIT_INPUT, "parity: no tokenizer in %s (%s)", a->model, e.msg);
        int32_t *ids;
        int64_t n;
        if (tokenizer_encode(tk, txt, len, &ids, &n, &e)) dl_die(DL_EXIT_INPUT, "parity: %s: %s", a->text, e.msg);
        if (n < B * (T + 1))
            dl_die(DL_EXIT_INPUT, "parity: %s has %lld tokens; --batch %lld --seq %lld needs %lld", a->text, (long long)n,
                   (long long)B, (long long)T, (long long)(B * (T + 1)));
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < T; t++) {
                tok[b * T + t] = ids[b * (T + 1) + t];
                tgt[b * T + t] = ids[b * (T + 1) + t + 1];
            }
        free(ids), free(txt);
        tokenizer_free(tk);
        return;
    }
    Rng g;
    rng_init(&g, a->seed, 77);
    for (int64_t i = 0; i < B * T; i++) tok[i] = (int32_t)rng_below(&g, (uint64_t)V);
    for (int64_t i = 0; i < B * T; i++) tgt[i] = (i + 1) % T ? tok[i + 1] : -1;
}

// A tensor's kind: its name without the layer number (model.layers.7.mlp.up_proj.weight -> mlp.up_proj.weight).
static const char *kind_of(const char *name, char *buf, size_t n) {
    const char *p = strstr(name, "layers.");
    if (!p) return name;
    p += 7;
    while (isdigit((unsigned char)*p)) p++;
    snprintf(buf, n, "%s", *p == '.' ? p + 1 : p);
    return buf;
}

typedef struct {
    char name[128];
    double g2, d2, c2, f2;  // |cpu|^2, |cuda - cpu|^2, |cuda|^2, |floor - cpu|^2
    int n;
} Kind;

static int kind_index(Kind *k, int *nk, const char *name) {
    for (int i = 0; i < *nk; i++)
        if (!strcmp(k[i].name, name)) return i;
    snprintf(k[*nk].name, sizeof k[*nk].name, "%s", name);
    return (*nk)++;
}

typedef struct {
    TrainModel *s, *t;
    float *grads;
} Side;

// tparams: the teacher's weights (src->params, or a bf16-rounded copy)
static Side side_new(const Args *a, TmDevice dev, const Student *st, const LoadedModel *src, float *params,
                     float *tparams) {
    DlError e;
    Side d = {0};
    int fp = dev == TM_CUDA && a->fp32 ? TM_FP32 : 0;
    if (a->kl > 0 && !(d.t = tm_new(dev, &src->hc, &src->reg, tparams, a->B, a->T, TM_FROZEN | fp, NULL, &e)))
        dl_die(DL_EXIT_RUNTIME, "parity: teacher on %s: %s", dev == TM_CUDA ? "cuda" : "cpu", e.msg);
    int f = TM_TRAIN | fp | (a->kl > 0 ? TM_TEACHER_KL : 0);
    if (!(d.s = tm_new(dev, &st->h, &st->r, params, a->B, a->T, f, NULL, &e)))
        dl_die(DL_EXIT_RUNTIME, "parity: student on %s: %s", dev == TM_CUDA ? "cuda" : "cpu", e.msg);
    d.grads = tm_grads_new(d.s);
    return d;
}

static void side_free(Side *d) {
    tm_grads_free(d->s, d->grads);
    tm_free(d->s);
    tm_free(d->t);
}

// One forward + loss (+ backward into d->grads when grad). Returns the loss parts.
static LossParts side_step(const Args *a, Side *d, const int32_t *tok, const int32_t *tgt, const float *roww, bool grad) {
    DlError e;
    if (d->t && tm_forward(d->t, tok, NULL, &e)) dl_die(DL_EXIT_INPUT, "parity: %s", e.msg);
    if (tm_forward(d->s, tok, NULL, &e)) dl_die(DL_EXIT_INPUT, "parity: %s", e.msg);
    TmLoss spec = {.w = {a->ce, a->kl, 0, 1}, .teacher = d->t, .seq_weight = roww};
    if (grad) tm_grads_zero(d->s, d->grads);
    LossParts p = tm_loss(d->s, tgt, NULL, &spec, grad ? d->grads : NULL, NULL);
    if (grad) tm_backward(d->s, d->grads);
    return p;
}

// A copy of x [n], rounded to bf16 when round (as the CUDA engine's compute copy is).
static float *params_copy(const float *x, int64_t n, bool round) {
    float *y = dl_malloc((size_t)n * sizeof(float));
    memcpy(y, x, (size_t)n * sizeof(float));
    if (round) bf16_round_array(y, n);
    return y;
}

// |x - ref| / |ref| of one number (the loss)
static double rel1(double x, double ref) { return fabs(x - ref) / fmax(fabs(ref), 1e-30); }

static double relerr(const float *x, const float *ref, int64_t n) {
    double d2 = 0, r2 = 0;
    for (int64_t i = 0; i < n; i++) d2 += ((double)x[i] - ref[i]) * ((double)x[i] - ref[i]), r2 += (double)ref[i] * ref[i];
    return r2 > 0 ? sqrt(d2 / r2) : sqrt(d2);
}

// Central differences of the CPU loss along u = (the gradient restricted to each kind) / its norm.
static int fd_check(const Args *a, const Student *st, const LoadedModel *src, const int32_t *tok, const int32_t *tgt,
                    const float *roww, const float *g, Kind *k, int nk) {
    float *p = params_copy(st->params, st->r.numel, false);
    Side d = side_new(a, TM_CPU, st, src, p, src->params);
    int bad = 0;
    // The loss is fp32 arithmetic summed in double: a change below ~1e-6 of it is rounding, so a kind whose largest
    // step moves the loss less than that (2 * 1e-2 * |g| < 1e-6 |L|) cannot be judged by differences.
    const double L0 = fabs(side_step(a, &d, tok, tgt, roww, false).loss);
    printf("\nfinite differences of the CPU loss along each kind's gradient (eps on a unit direction):\n");
    enum { NE = 4 };
    const double eps[NE] = {1e-2, 2e-3, 5e-4, 1e-4};
    printf("  %-40s %11s %11s %11s %11s %11s %9s\n", "kind", "|g|", "eps=1e-2", "2e-3", "5e-4", "1e-4", "best rel");
    char kb[128];
    for (int ki = 0; ki < nk && ki < a->fd; ki++) {
        double gn = sqrt(k[ki].g2);
        if (gn == 0) continue;
        double fdv[NE], best = INFINITY;
        for (int q = 0; q < NE; q++) {
            double L[2];
            for (int sgn = 0; sgn < 2; sgn++) {
                double s = (sgn ? -eps[q] : eps[q]) / gn;
                for (int i = 0; i < st->r.n; i++) {
                    const TensorInfo *t = &st->r.t[i];
                    if (!t->trainable || strcmp(kind_of(t->name, kb, sizeof kb), k[ki].name)) continue;
                    for (int64_t j = 0; j < t->numel; j++)
                        p[t->offset + j] = st->params[t->offset + j] + (float)(s * g[t->offset + j]);
                }
                L[sgn] = side_step(a, &d, tok, tgt, roww, false).loss;
            }
            fdv[q] = (L[0] - L[1]) / (2 * eps[q]);
            memcpy(p, st->params, (size_t)st->r.numel * sizeof(float));
            best = fmin(best, fabs(fdv[q] - gn) / gn);
        }
        // a step too large meets curvature, one too small fp32 rounding: one of them must agree
        const bool resolved = 2 * eps[0] * gn >= 1e-6 * L0;
        bool ok = best < 5e-2 || !resolved;
        bad += !ok;
        printf("  %-40s %11.5g %11.5g %11.5g %11.5g %11.5g %9.2e%s\n", k[ki].name, gn, fdv[0], fdv[1], fdv[2], fdv[3], best,
               !resolved ? "  (below fp32 resolution: not judged)" : ok ? "" : "  <-- differs");
        fflush(stdout);
    }
    side_free(&d);
    free(p);
    return bad;
}

// One forward/loss/backward of a fresh student (and teacher) on dev, with the weights as given or rounded to
// bf16; the gradient into g (host, registry layout) and rows [0, nrow) of logits into x.
// flash: the device side ran flash attention (bf16 P·V, tm_flash_attention), set by the CUDA call and read by the floor
static LossParts grads_once(const Args *a, TmDevice dev, bool round, const Student *st, const LoadedModel *src,
                            const int32_t *tok, const int32_t *tgt, const float *roww, float *g, float *x, int64_t nrow,
                            bool *flash) {
    float *p = params_copy(st->params, st->r.numel, round);
    float *tp = round ? params_copy(src->params, src->reg.numel, true) : src->params;
    Side d = side_new(a, dev, st, src, p, tp);
    if (dev == TM_CUDA && flash) *flash = tm_flash_attention(d.s);
    LossParts l = side_step(a, &d, tok, tgt, roww, true);
    tm_grads_to_host(d.s, d.grads, g);
    tm_logits(d.s, 0, nrow, x);
    side_free(&d);
    free(p);
    if (tp != src->params) free(tp);
    return l;
}

static int run_parity(int argc, char **argv) {
    Args a = {.train = "*", .B = 2, .T = 256, .ce = 1, .kl = 0, .lr = 1e-4, .seed = 1, .tol_loss = 1e-2,
              .tol_grad = 5e-2, .tol_norm = 3e-2};
    // bf16 tolerances: activations rounded to 8 mantissa bits through 30 layers give the SmolLM2 teacher 2e-2 on the
    // logits and 2-4e-2 per gradient kind (rounding only the weights gives 1e-2), hence 5e-2 per tensor
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(o, "--text") && has) a.text = argv[++i];
        else if (!strcmp(o, "--train") && has) a.train = argv[++i];
        else if (!strcmp(o, "--attn-layers") && has) a.attn = argv[++i];
        else if (!strcmp(o, "--row-weights") && has) a.row_w = argv[++i];
        else if (!strcmp(o, "--against") && has) a.against = argv[++i];
        else if (!strcmp(o, "--round-bf16")) a.round = true;
        else if (!strcmp(o, "--floor")) a.floor = true;
        else if (!strcmp(o, "--batch") && has) a.B = atoll(argv[++i]);
        else if (!strcmp(o, "--seq") && has) a.T = atoll(argv[++i]);
        else if (!strcmp(o, "--ce") && has) a.ce = (float)atof(argv[++i]);
        else if (!strcmp(o, "--kl") && has) a.kl = (float)atof(argv[++i]);
        else if (!strcmp(o, "--fd") && has) a.fd = atoi(argv[++i]);
        else if (!strcmp(o, "--steps") && has) a.steps = atoi(argv[++i]);
        else if (!strcmp(o, "--lr") && has) a.lr = atof(argv[++i]);
        else if (!strcmp(o, "--seed") && has) a.seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(o, "--tol-grad") && has) a.tol_grad = atof(argv[++i]);
        else if (!strcmp(o, "--fp32")) a.fp32 = true;
        else if (!strcmp(o, "--cpu-only")) a.cpu_only = true;
        else if (!strcmp(o, "--mamba2")) a.mamba2 = true;
        else if (o[0] == '-') dl_die(DL_EXIT_USAGE, "parity: unknown or incomplete option '%s' (see distill parity --help)", o);
        else if (!a.model) a.model = o;
        else dl_die(DL_EXIT_USAGE, "parity: more than one MODEL ('%s')", o);
    }
    if (!a.model) dl_die(DL_EXIT_USAGE, "parity: no MODEL (see distill parity --help)");
    if (!a.against) a.against = "cuda";
    if (strcmp(a.against, "cuda") && strcmp(a.against, "cpu-bf16"))
        dl_die(DL_EXIT_USAGE, "parity: --against '%s': expected cuda or cpu-bf16", a.against);
    const bool vs_cpu = !strcmp(a.against, "cpu-bf16");
    const TmDevice dev2 = vs_cpu ? TM_CPU : TM_CUDA;
    const char *name2 = vs_cpu ? "cpu-bf16" : "cuda";
    if (a.B < 1 || a.T < 2) dl_die(DL_EXIT_USAGE, "parity: --batch must be >= 1 and --seq >= 2");
    if (a.fp32) a.tol_loss = 1e-4, a.tol_grad = a.tol_grad == 5e-2 ? 1e-3 : a.tol_grad, a.tol_norm = 1e-4;
    DlError e;
    LoadedModel src;
    if (model_load(a.model, a.seed, &src, &e)) dl_die(DL_EXIT_INPUT, "parity: %s", e.msg);
    Student st;
    make_student(&a, &src, &st);
    if (a.round) bf16_round_array(src.params, src.reg.numel), bf16_round_array(st.params, st.r.numel);
    // the second side's weights: as given, or (cpu-bf16) rounded to bf16 as the CUDA engine's compute copy is
    float *tp2 = vs_cpu ? params_copy(src.params, src.reg.numel, true) : src.params;
    const int64_t V = st.h.base.vocab, N = a.B * a.T;
    int32_t *tok = dl_malloc((size_t)N * sizeof(int32_t)), *tgt = dl_malloc((size_t)N * sizeof(int32_t));
    make_batch(&a, V, tok, tgt);
    float *roww = NULL;
    if (a.row_w) {  // DPO's gradient is a row-weighted CE: e.g. --row-weights 1,-0.5
        roww = dl_malloc((size_t)a.B * sizeof(float));
        const char *p = a.row_w;
        for (int64_t b = 0; b < a.B; b++) {
            char *end;
            roww[b] = (float)strtod(p, &end);
            if (end == p) dl_die(DL_EXIT_USAGE, "parity: --row-weights needs %lld numbers", (long long)a.B);
            p = *end == ',' ? end + 1 : end;
        }
    }
    printf("parity: %s, %d layers (%d attention), %lld of %lld parameters trained (%s), batch %lld x %lld, "
           "loss %.3g CE + %.3g KL%s, %s\n",
           src.source, st.h.base.n_layer, hybrid_n_attn(&st.h), (long long)reg_trainable_numel(&st.r),
           (long long)st.r.numel, a.train, (long long)a.B, (long long)a.T, a.ce, a.kl, roww ? ", row-weighted" : "",
           a.cpu_only ? "CPU only" : vs_cpu ? "against the CPU on bf16-rounded weights" : a.fp32 ? "CUDA in fp32" : "CUDA in bf16");

    // 1. one step on the CPU (the reference), then on CUDA
    float *pc = params_copy(st.params, st.r.numel, false);
    Side cpu = side_new(&a, TM_CPU, &st, &src, pc, src.params);
    double t0 = dl_now();
    LossParts lc = side_step(&a, &cpu, tok, tgt, roww, true);
    printf("cpu : loss %.6f (ce %.6f kl %.6f), %.1f s\n", lc.loss, lc.ce, lc.kl, dl_now() - t0);
    const int64_t nrow = N < 8 ? N : 8;
    float *gc = dl_malloc((size_t)st.r.numel * sizeof(float)), *gg = dl_calloc((size_t)st.r.numel, sizeof(float));
    float *xc = dl_malloc((size_t)(nrow * V) * sizeof(float)), *xg = dl_malloc((size_t)(nrow * V) * sizeof(float));
    tm_grads_to_host(cpu.s, cpu.grads, gc);
    tm_logits(cpu.s, 0, nrow, xc);
    int bad = 0;
    bool have2 = false, flash = false;
    LossParts lg = {0};
    if (!a.cpu_only) {
        t0 = dl_now();
        lg = grads_once(&a, dev2, vs_cpu, &st, &src, tok, tgt, roww, gg, xg, nrow, &flash);
        printf("%s: loss %.6f (ce %.6f kl %.6f), %.2f s\n", name2, lg.loss, lg.ce, lg.kl, dl_now() - t0);
        have2 = true;
        double dl = rel1(lg.loss, lc.loss), dx = relerr(xg, xc, nrow * V);
        printf("loss rel err %.2e (tol %.0e); logits of rows 0..%lld rel err %.2e\n", dl, a.tol_loss, (long long)nrow - 1, dx);
        bad += dl > a.tol_loss;
    }
    // the floor: how far the CPU's own gradient moves when only the weights are rounded to bf16 (and, where the device
    // ran flash attention, P as its P·V takes it)
    float *gf = NULL;
    if (a.floor && have2 && !vs_cpu) {
        gf = dl_calloc((size_t)st.r.numel, sizeof(float));
        float *xf = dl_malloc((size_t)(nrow * V) * sizeof(float));
        attention_cpu_round_p(flash);
        LossParts lf = grads_once(&a, TM_CPU, true, &st, &src, tok, tgt, roww, gf, xf, nrow, NULL);
        attention_cpu_round_p(false);
        printf("floor (cpu on bf16-rounded weights%s): loss %.6f, loss rel err %.2e, logits rel err %.2e\n",
               flash ? ", attention P in bf16" : "", lf.loss, rel1(lf.loss, lc.loss), relerr(xf, xc, nrow * V));
        free(xf);
    }

    // per tensor, then per kind
    Kind *k = dl_calloc((size_t)st.r.n, sizeof(Kind));
    int nk = 0;
    double G2 = 0, C2 = 0;
    char kb[128];
    char gl[32], ll[32], nl[32];
    snprintf(gl, sizeof gl, "|g %s|", name2), snprintf(ll, sizeof ll, "loss %s", name2), snprintf(nl, sizeof nl, "norm %s", name2);
    if (have2) printf("\n  %-52s %10s %10s %10s %9s\n", "tensor", "numel", "|g cpu|", gl, "rel err");
    for (int i = 0; i < st.r.n; i++) {
        const TensorInfo *t = &st.r.t[i];
        if (!t->trainable) continue;
        double g2 = 0, c2 = 0, d2 = 0, f2 = 0;
        for (int64_t j = 0; j < t->numel; j++) {
            double x = gc[t->offset + j], y = gg[t->offset + j], f = gf ? gf[t->offset + j] : x;
            g2 += x * x, c2 += y * y, d2 += (x - y) * (x - y), f2 += (f - x) * (f - x);
        }
        int q = kind_index(k, &nk, kind_of(t->name, kb, sizeof kb));
        k[q].g2 += g2, k[q].c2 += c2, k[q].d2 += d2, k[q].f2 += f2, k[q].n++;
        G2 += g2, C2 += c2;
        double r = g2 > 0 ? sqrt(d2 / g2) : sqrt(d2);
        if (have2 && (r > a.tol_grad || getenv("DISTILL_PARITY_ALL")))
            printf("  %-52s %10lld %10.4g %10.4g %9.2e%s\n", t->name, (long long)t->numel, sqrt(g2), sqrt(c2), r,
                   r > a.tol_grad ? "  <-- over tol" : "");
    }
    // with --floor a kind passes when its error is within the tolerance or within 4x the floor (one sample of a
    // random perturbation: the SmolLM2 init hybrid showed ratios up to 3.1)
    printf("\n  %-40s %5s %12s %12s %9s %9s\n", "kind", "count", "|g cpu|", gl, "rel err", gf ? "floor" : "");
    for (int q = 0; q < nk; q++) {
        double r = k[q].g2 > 0 ? sqrt(k[q].d2 / k[q].g2) : 0, fl = k[q].g2 > 0 ? sqrt(k[q].f2 / k[q].g2) : 0;
        bool over = have2 && r > fmax(a.tol_grad, gf ? 4 * fl : 0);
        bad += over;
        printf("  %-40s %5d %12.5g %12.5g %9.2e %9.2e%s\n", k[q].name, k[q].n, sqrt(k[q].g2), have2 ? sqrt(k[q].c2) : NAN,
               have2 ? r : NAN, gf ? fl : NAN, over ? "  <-- over tol" : "");
    }
    printf("  %-40s %5s %12.5g %12.5g\n", "all trained", "", sqrt(G2), have2 ? sqrt(C2) : NAN);
    if (have2 && !gf) bad += fabs(sqrt(C2) - sqrt(G2)) > a.tol_norm * sqrt(G2);
    fflush(stdout);

    // 2. the CPU gradient against finite differences
    if (a.fd > 0) bad += fd_check(&a, &st, &src, tok, tgt, roww, gc, k, nk);

    // 3. AdamW steps on both devices
    if (a.steps > 0) {
        OptimConfig oc;
        optim_config_default(&oc);
        oc.lr = a.lr, oc.total_steps = a.steps;
        Optim oc_cpu, oc_cu;
        if (optim_init(&oc_cpu, &oc, &st.r, &e)) dl_die(DL_EXIT_USAGE, "parity: %s", e.msg);
        float *pg = NULL;
        Side cu = {0};
        if (have2) {
            if (optim_init(&oc_cu, &oc, &st.r, &e)) dl_die(DL_EXIT_USAGE, "parity: %s", e.msg);
            pg = params_copy(st.params, st.r.numel, vs_cpu);
            cu = side_new(&a, dev2, &st, &src, pg, tp2);
        }
        memcpy(pc, st.params, (size_t)st.r.numel * sizeof(float));
        printf("\n%5s %12s %12s %9s %12s %12s %9s\n", "step", "loss cpu", ll, "rel", "norm cpu", nl, "rel");
        double worst = 0;
        for (int s = 0; s < a.steps; s++) {
            OptimResult rc = {0}, rg = {0};
            LossParts a1 = side_step(&a, &cpu, tok, tgt, roww, true), a2 = {0};
            if (tm_optim_step(cpu.s, &oc_cpu, cpu.grads, a1.loss, &rc, &e)) dl_die(DL_EXIT_RUNTIME, "parity: %s", e.msg);
            if (have2) {
                a2 = side_step(&a, &cu, tok, tgt, roww, true);
                if (tm_optim_step(cu.s, &oc_cu, cu.grads, a2.loss, &rg, &e)) dl_die(DL_EXIT_RUNTIME, "parity: %s", e.msg);
            }
            double r1 = have2 ? fabs(a2.loss - a1.loss) / fabs(a1.loss) : NAN;
            double r2 = have2 ? fabs(rg.grad_norm - rc.grad_norm) / rc.grad_norm : NAN;
            if (have2) worst = fmax(worst, r1);
            printf("%5d %12.6f %12.6f %9.2e %12.5g %12.5g %9.2e\n", s + 1, a1.loss, a2.loss, r1, rc.grad_norm, rg.grad_norm, r2);
            fflush(stdout);
        }
        if (have2) {
            printf("worst loss rel err over %d steps: %.2e (tol %.0e)\n", a.steps, worst, 3 * a.tol_loss);
            bad += worst > 3 * a.tol_loss;
            side_free(&cu);
            optim_free(&oc_cu);
            free(pg);
        }
        optim_free(&oc_cpu);
    }
    printf("\nparity: %s\n", bad ? "FAILED" : "ok");
    side_free(&cpu);
    free(gf);
    free(pc), free(gc), free(gg), free(xc), free(xg), free(k), free(tok), free(tgt), free(roww);
    free(st.params);
    if (tp2 != src.params) free(tp2);
    reg_free(&st.r);
    model_free(&src);
    return bad ? DL_EXIT_RUNTIME : DL_EXIT_OK;
}

DL_COMMAND(parity_cmd, {
    .name = "parity",
    .usage = "MODEL [options]",
    .summary = "compare the CUDA engine with the CPU reference on one batch: loss, logits, every gradient",
    .help = "MODEL is a GGUF, an HF directory or a config .json (random weights). One forward/loss/backward runs on\n"
            "the CPU (fp32 reference) and on CUDA; the loss, 8 rows of logits and every trained tensor's gradient\n"
            "are compared (relative L2 error per tensor and per kind of tensor).\n"
            "  --attn-layers L   train the hybrid the init stage builds (L: odd, even, none, or 1,3,5); MODEL is then\n"
            "                    also the teacher of --kl\n"
            "  --mamba2          Mamba-2 instead of Mamba-1 layers in that hybrid\n"
            "  --train PATTERNS  trained tensors (glob, default *)\n"
            "  --text FILE       batch from this text (MODEL's tokenizer); default: seeded random tokens\n"
            "  --batch B --seq T (default 2 x 256)\n"
            "  --ce W --kl W     loss weights (default 1, 0); --row-weights W1,W2,.. multiplies row b (DPO)\n"
            "  --fp32            CUDA computes in fp32 (tolerance 1e-3 per tensor instead of 5e-2)\n"
            "  --fd N            check the CPU gradient by finite differences along the first N kinds\n"
            "  --steps N         then N AdamW steps (--lr, default 1e-4) on both, comparing losses and norms (Adam's\n"
            "                    first steps are sign-like, so bf16 noise in tiny gradient elements flips them: use\n"
            "                    --fp32 to check the optimizer itself)\n"
            "  --cpu-only        no CUDA (with --fd: checks the CPU reference alone)\n"
            "  --against cpu-bf16  compare with the CPU engine on bf16-rounded weights instead of CUDA: how much the\n"
            "                    gradient moves from weight rounding alone (the floor any bf16 engine can reach)\n"
            "  --round-bf16      round the starting weights to bf16 on both sides (only activation precision differs)\n"
            "  --floor           also run the CPU on bf16-rounded weights; a kind then passes when CUDA's error is\n"
            "                    within the tolerance or within 4x that floor (for ill-conditioned gradients, e.g. a\n"
            "                    freshly initialized hybrid, where rounding the weights alone moves the gradient)\n"
            "  --seed S --tol-grad X\n"
            "Set DISTILL_PARITY_ALL=1 to print every tensor, not only those over the tolerance.\n"
            "Example: distill parity checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf --attn-layers odd --kl 1 "
            "--ce 0 --text data/heldout.txt\n",
    .run = run_parity,
})
