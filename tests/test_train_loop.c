// test_train_loop.c: the shared training loop on a tiny hybrid with a teacher (CE + KL + hidden MSE,
// accumulation, Mamba mixers only trainable): the loss goes down; stopping at step 4 of 8 and resuming
// from the checkpoint in a fresh state gives every loss and the final weights bit for bit; resuming with a
// changed step count or layout is refused; the last checkpoint is marked done; frozen tensors stay put.
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "tests/check.h"
#include "tests/tiny_model.h"

#define STEPS 8

typedef struct {
    double loss[STEPS + 1];
    int n;
} Log;

static void on_step(void *ctx, int64_t step, double loss, const OptimResult *r) {
    Log *l = ctx;
    (void)r;
    if (step >= 1 && step <= STEPS) l->loss[step] = loss;
    l->n++;
}

static void config(TrainConfig *c, TinyModel *s, TinyModel *t, const char *dir, Log *log) {
    memset(c, 0, sizeof *c);
    c->hc = &s->h;
    c->reg = &s->r;
    c->params = s->p;
    c->teacher_hc = &t->h;
    c->teacher_reg = &t->r;
    c->teacher_params = t->p;
    c->w = (LossWeights){.ce = 1, .kl = 0.1f, .temperature = 1};
    c->mse = 0.5;
    c->micro_batch = 2;
    c->seq_len = 16;
    optim_config_default(&c->opt);
    c->opt.lr = 3e-3;
    c->opt.beta2 = 0.98;
    c->opt.warmup_steps = 2;
    c->opt.total_steps = STEPS;
    c->opt.grad_accum = 2;
    c->opt.clip_norm = 1.0;
    c->run_dir = dir;
    c->stage_index = 2;
    c->stage_name = "layerwise";
    c->checkpoint_every = 2;
    c->keep_checkpoints = 2;
    c->recipe_text = "[run]\nname = \"tiny\"\n";
    c->on_step = on_step;
    c->on_step_ctx = log;
}

int main(void) {
    setenv("DISTILL_PROGRESS_INTERVAL", "1000", 1);
    dl_set_quiet(true);
    TinyModel t, s0;
    tiny_teacher(&t, 3, true, 5);
    int attn[1] = {1};
    tiny_hybrid(&s0, &t, attn, 1, 6);
    DlError e;
    CHECK(reg_set_trainable(&s0.r, "*.mamba.*", &e) > 0);
    const int64_t n = s0.r.numel;

    char dir_a[] = "/tmp/distill_test_loop_a_XXXXXX", dir_b[] = "/tmp/distill_test_loop_b_XXXXXX";
    if (!mkdtemp(dir_a) || !mkdtemp(dir_b)) return 1;

    // ---- A: uninterrupted
    float *pa = malloc((size_t)n * 4);
    memcpy(pa, s0.p, (size_t)n * 4);
    Log la = {0};
    TrainConfig c;
    TinyModel sa = s0;
    sa.p = pa;
    config(&c, &sa, &t, dir_a, &la);
    Metrics m;
    CHECK(metrics_open(&m, dir_a, -1, 0, &e) == 0);
    c.metrics = &m;
    SynthSource ss;
    BatchSource src = synth_source(&ss, 11, t.h.base.vocab);
    TrainResult res;
    int rc = train_run(&c, &src, &res, &e);
    if (rc) fprintf(stderr, "A: %s\n", e.msg);
    CHECK(rc == 0 && res.steps_done == STEPS && !res.stopped && res.n_skipped == 0);
    metrics_close(&m);
    CHECK_EQ_I64(la.n, STEPS);
    printf("losses A:");
    for (int i = 1; i <= STEPS; i++) printf(" %.6f", la.loss[i]);
    printf("\n");
    CHECK(la.loss[STEPS] < la.loss[1]);
    bool finite = true;
    for (int i = 1; i <= STEPS; i++) finite &= isfinite(la.loss[i]);
    CHECK(finite);
    // only Mamba tensors moved
    bool frozen_same = true, mamba_moved = false;
    for (int i = 0; i < s0.r.n; i++) {
        const TensorInfo *ti = &s0.r.t[i];
        bool same = !memcmp(pa + ti->offset, s0.p + ti->offset, (size_t)ti->numel * 4);
        if (ti->trainable) mamba_moved |= !same;
        else frozen_same &= same;
    }
    CHECK(frozen_same && mamba_moved);
    // the final checkpoint is complete, marked done, and holds the final weights
    char latest[512];
    CHECK(checkpoint_find_latest(dir_a, latest, sizeof latest, &e) == 1 && strstr(latest, "ckpt-02-00000008.h5"));
    CkptState st;
    ckpt_state_init(&st);
    int64_t done = 0;
    CHECK(checkpoint_read_state(latest, &st, &e) == 0 && ckpt_state_get_int(&st, TRAIN_KEY_DONE, &done, &e) == 0 && done == 1);
    ckpt_state_free(&st);
    float *pchk = calloc((size_t)n, 4);
    CHECK(checkpoint_load_weights(latest, &s0.r, pchk, 0, &e) == s0.r.n);
    bool same_w = true;
    for (int i = 0; i < s0.r.n; i++)
        same_w &= !memcmp(pchk + s0.r.t[i].offset, pa + s0.r.t[i].offset, (size_t)s0.r.t[i].numel * 4);
    CHECK(same_w);
    {
        char mp[600];
        snprintf(mp, sizeof mp, "%s/metrics.jsonl", dir_a);
        size_t len;
        char *txt = dl_read_file(mp, &len, &e);
        int lines = 0;
        for (size_t i = 0; txt && i < len; i++) lines += txt[i] == '\n';
        CHECK_EQ_I64(lines, STEPS);
        CHECK(txt && strstr(txt, "\"mse\":") && strstr(txt, "\"kl\":"));
        free(txt);
    }

    // ---- B: stop after 4 steps (a kill), then resume in a fresh state
    float *pb = malloc((size_t)n * 4);
    memcpy(pb, s0.p, (size_t)n * 4);
    Log lb = {0};
    TinyModel sb = s0;
    sb.p = pb;
    config(&c, &sb, &t, dir_b, &lb);
    c.stop_after = 4;
    src = synth_source(&ss, 11, t.h.base.vocab);
    CHECK(train_run(&c, &src, &res, &e) == 0 && res.stopped && res.steps_done == 4);
    // the "new process": scrambled weights and data position, everything must come from the checkpoint
    for (int64_t i = 0; i < n; i++) pb[i] = 1e3f;
    src = synth_source(&ss, 999, t.h.base.vocab);
    CHECK(checkpoint_find_latest(dir_b, latest, sizeof latest, &e) == 1 && strstr(latest, "ckpt-02-00000004.h5"));
    config(&c, &sb, &t, dir_b, &lb);
    c.resume_from = latest;
    // a loop of another length refuses the checkpoint
    c.opt.total_steps = STEPS + 1;
    CHECK(train_run(&c, &src, &res, &e) == -1 && strstr(e.msg, "did the recipe"));
    c.opt.total_steps = STEPS;
    // ... and so does a different layout
    TinyModel other;
    int attn2[1] = {2};
    tiny_hybrid(&other, &t, attn2, 1, 6);
    reg_set_trainable(&other.r, "*.mamba.*", &e);
    TrainConfig c2 = c;
    c2.hc = &other.h, c2.reg = &other.r, c2.params = other.p;
    CHECK(train_run(&c2, &src, &res, &e) == -1 && strstr(e.msg, "layout"));
    tiny_free(&other);
    rc = train_run(&c, &src, &res, &e);
    if (rc) fprintf(stderr, "B resume: %s\n", e.msg);
    CHECK(rc == 0 && res.steps_done == STEPS);
    int bit_equal = 0;
    for (int i = 1; i <= STEPS; i++) bit_equal += !memcmp(&la.loss[i], &lb.loss[i], sizeof(double));
    CHECK_EQ_I64(bit_equal, STEPS);
    bool same_final = true;
    for (int i = 0; i < s0.r.n; i++)
        same_final &= !memcmp(pa + s0.r.t[i].offset, pb + s0.r.t[i].offset, (size_t)s0.r.t[i].numel * 4);
    CHECK(same_final);
    // resuming a finished loop does nothing and succeeds
    CHECK(checkpoint_find_latest(dir_b, latest, sizeof latest, &e) == 1);
    c.resume_from = latest;
    lb.n = 0;
    CHECK(train_run(&c, &src, &res, &e) == 0 && lb.n == 0 && res.steps_done == STEPS);

    // ---- the alignment step (MSE only): teacher-forced per-layer hidden-state matching lowers the MSE
    {
        char dir_d[] = "/tmp/distill_test_loop_d_XXXXXX";
        if (!mkdtemp(dir_d)) return 1;
        float *pd = malloc((size_t)n * 4);
        memcpy(pd, s0.p, (size_t)n * 4);
        Log ld = {0};
        TinyModel sd = s0;
        sd.p = pd;
        config(&c, &sd, &t, dir_d, &ld);
        c.w = (LossWeights){0};
        c.mse = 1.0;
        c.opt.lr = 1e-2;
        src = synth_source(&ss, 11, t.h.base.vocab);
        rc = train_run(&c, &src, &res, &e);
        if (rc) fprintf(stderr, "align: %s\n", e.msg);
        printf("alignment MSE: %.6f -> %.6f\n", ld.loss[1], ld.loss[STEPS]);
        CHECK(rc == 0 && ld.loss[STEPS] < 0.8 * ld.loss[1]);
        bool frozen_ok = true;
        for (int i = 0; i < s0.r.n; i++)
            if (!s0.r.t[i].trainable)
                frozen_ok &= !memcmp(pd + s0.r.t[i].offset, s0.p + s0.r.t[i].offset, (size_t)s0.r.t[i].numel * 4);
        CHECK(frozen_ok);
        char cmdd[200];
        snprintf(cmdd, sizeof cmdd, "rm -rf %s", dir_d);
        CHECK(system(cmdd) == 0);
        free(pd);
    }

    // ---- a diverging run (lr absurdly high, no clipping) is stopped with a clear error, nothing non-finite saved
    char dir_c[] = "/tmp/distill_test_loop_c_XXXXXX";
    if (!mkdtemp(dir_c)) return 1;
    float *pc = malloc((size_t)n * 4);
    memcpy(pc, s0.p, (size_t)n * 4);
    Log lc = {0};
    TinyModel sc = s0;
    sc.p = pc;
    config(&c, &sc, &t, dir_c, &lc);
    c.opt.lr = 1e6;
    c.opt.clip_norm = 0;
    c.opt.total_steps = 40;
    c.max_consecutive_skips = 3;
    c.checkpoint_every = 1;
    src = synth_source(&ss, 11, t.h.base.vocab);
    rc = train_run(&c, &src, &res, &e);
    printf("diverging run: rc %d after %lld steps, %lld skipped: %s\n", rc, (long long)res.steps_done,
           (long long)res.n_skipped, rc ? e.msg : "");
    // either it diverged (stopped with a message) or a checkpoint write refused non-finite weights
    CHECK(rc == -1 && (strstr(e.msg, "diverged") || strstr(e.msg, "non-finite")));

    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s %s %s", dir_a, dir_b, dir_c);
    CHECK(system(cmd) == 0);
    free(pa), free(pb), free(pc), free(pchk);
    tiny_free(&s0);
    tiny_free(&t);
    return check_report("test_train_loop");
}
