// test_train_loop.c: the shared training loop on a tiny hybrid with a teacher (CE + KL + hidden MSE,
// accumulation, Mamba mixers only trainable): the loss goes down; stopping at step 4 of 8 and resuming
// from the checkpoint in a fresh state gives every loss and the final weights bit for bit; resuming with a
// changed step count or layout is refused; the last checkpoint is marked done; frozen tensors stay put.
// A loss spike (batches that make the loss non-finite, enough for a run of skipped steps) rolls back to the
// last good checkpoint with half the learning rate, and a run killed after the rollback or inside the run of
// skips resumes to the same weights bit for bit; without rollbacks left the loop stops with an error.
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "tests/check.h"
#include "distill/train_model.h"
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

// ---- loss spikes: a CE loss whose value is NaN for the batches (p0, p1] of the source (so the step is skipped)
#define SPIKE_STEPS 30
typedef struct {
    SynthSource *ss;
    int64_t p0, p1;
    double lr[SPIKE_STEPS + 1];  // the lr each step used, the last time it ran
} Spiky;

static int spiky_loss(void *ctx, TrainModel *m, const TrainBatch *b, float *grads, double *loss, MetricPart *parts,
                      int *n_parts, DlError *e) {
    Spiky *s = ctx;
    if (tm_forward(m, b->tokens, b->reset, e)) return -1;
    TmLoss spec = {.w = {.ce = 1, .temperature = 1}};
    LossParts lp = tm_loss(m, b->targets, b->mask, &spec, grads, NULL);
    tm_backward(m, grads);
    const bool poisoned = s->ss->batches > s->p0 && s->ss->batches <= s->p1;  // the batch just drawn
    *loss = poisoned ? NAN : lp.loss;
    parts[0] = (MetricPart){"ce", lp.ce};
    *n_parts = 1;
    return 0;
}

static void spiky_step(void *ctx, int64_t step, double loss, const OptimResult *r) {
    (void)loss;
    if (step >= 1 && step <= SPIKE_STEPS) ((Spiky *)ctx)->lr[step] = r->lr;
}

// Runs the spiky loop in dir from params p (stop_after / resume_from, checkpoint_every / keep_checkpoints as
// given); returns train_run's rc.
static int spiky_run_ck(TinyModel *s, TinyModel *t, const char *dir, Spiky *sp, SynthSource *ss, int rollbacks,
                        int64_t stop_after, const char *resume_from, int every, int keep, TrainResult *res, DlError *e) {
    TrainConfig c;
    config(&c, s, t, dir, NULL);
    c.w = (LossWeights){0};
    c.mse = 0;
    c.loss_fn = spiky_loss, c.loss_ctx = sp;
    c.on_step = spiky_step, c.on_step_ctx = sp;
    c.opt.total_steps = SPIKE_STEPS;
    c.opt.spike_rollbacks = rollbacks;
    c.opt.spike_lr_factor = 0.5;
    c.max_consecutive_skips = 3;
    c.checkpoint_every = every;
    c.keep_checkpoints = keep;
    c.stage_name = "distill";
    c.stop_after = stop_after;
    c.resume_from = resume_from;
    BatchSource src = synth_source(ss, 11, t->h.base.vocab);
    sp->ss = ss;
    // 2 micro-batches per step: batches 21..28 poison steps 11-14; with a checkpoint every 4 steps the third skip
    // (step 13) rolls back to step 8's (step 12's was written inside the run of skips), and the batches drawn
    // after it (27, 28) poison one more step
    sp->p0 = 20, sp->p1 = 28;
    return train_run(&c, &src, res, e);
}

static int spiky_run(TinyModel *s, TinyModel *t, const char *dir, Spiky *sp, SynthSource *ss, int rollbacks,
                     int64_t stop_after, const char *resume_from, TrainResult *res, DlError *e) {
    return spiky_run_ck(s, t, dir, sp, ss, rollbacks, stop_after, resume_from, 4, 2, res, e);
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

    // ---- loss spikes
    {
        char dir_s[] = "/tmp/distill_test_loop_s_XXXXXX", dir_k[] = "/tmp/distill_test_loop_k_XXXXXX",
             dir_m[] = "/tmp/distill_test_loop_m_XXXXXX", dir_n[] = "/tmp/distill_test_loop_n_XXXXXX";
        if (!mkdtemp(dir_s) || !mkdtemp(dir_k) || !mkdtemp(dir_m) || !mkdtemp(dir_n)) return 1;
        float *ps = malloc((size_t)n * 4), *pk = malloc((size_t)n * 4), *pm = malloc((size_t)n * 4);
        TinyModel ts = s0, tk = s0, tmm = s0;
        ts.p = ps, tk.p = pk, tmm.p = pm;
        Spiky sps = {0}, spk = {0}, spm = {0};
        SynthSource ssp;
        // uninterrupted: one rollback, then to the end
        memcpy(ps, s0.p, (size_t)n * 4);
        rc = spiky_run(&ts, &t, dir_s, &sps, &ssp, 1, 0, NULL, &res, &e);
        if (rc) fprintf(stderr, "spike: %s\n", e.msg);
        OptimConfig sched;  // config()'s schedule
        optim_config_default(&sched);
        sched.lr = 3e-3, sched.warmup_steps = 2, sched.total_steps = SPIKE_STEPS;
        printf("loss spike: rc %d, %lld steps, %lld skipped, %d rollback(s); lr at step 20 %.6g (schedule %.6g)\n", rc,
               (long long)res.steps_done, (long long)res.n_skipped, res.rollbacks, sps.lr[20], optim_lr_at(&sched, 19));
        CHECK(rc == 0 && res.steps_done == SPIKE_STEPS && res.rollbacks == 1 && res.n_skipped == 4);
        CHECK(sps.lr[8] == optim_lr_at(&sched, 7) && sps.lr[20] == 0.5 * optim_lr_at(&sched, 19) &&
              sps.lr[SPIKE_STEPS] == 0.5 * optim_lr_at(&sched, SPIKE_STEPS - 1));
        bool fin = true;
        for (int64_t i = 0; i < n; i++) fin &= isfinite(ps[i]);
        CHECK(fin);
        char last[512];
        CHECK(checkpoint_find_latest(dir_s, last, sizeof last, &e) == 1 && strstr(last, "ckpt-02-00000030.h5"));
        {
            CkptState st;
            ckpt_state_init(&st);
            int64_t rbk = -1;
            CHECK(checkpoint_read_state(last, &st, &e) == 0 && ckpt_state_get_int(&st, TRAIN_KEY_ROLLBACKS, &rbk, &e) == 0 &&
                  rbk == 1);
            ckpt_state_free(&st);
        }
        // killed after the rollback, (a) 2 steps into the new branch: the newest checkpoint is step 8's (the
        // abandoned branch's step-12 one was dropped), and resuming from it meets the spike and its rollback
        // again; (b) at step 18: the newest is step 16 of the new branch, with the halved lr. Both resumed runs
        // end on the uninterrupted run's weights.
        const int64_t kill_at[2] = {15, 23};
        const char *newest[2] = {"ckpt-02-00000008.h5", "ckpt-02-00000016.h5"};
        for (int k = 0; k < 2; k++) {
            memcpy(pk, s0.p, (size_t)n * 4);
            CHECK(spiky_run(&tk, &t, dir_k, &spk, &ssp, 1, kill_at[k], NULL, &res, &e) == 0 && res.stopped && res.rollbacks == 1);
            CHECK(checkpoint_find_latest(dir_k, last, sizeof last, &e) == 1 && strstr(last, newest[k]));
            for (int64_t i = 0; i < n; i++) pk[i] = 1e3f;
            rc = spiky_run(&tk, &t, dir_k, &spk, &ssp, 1, 0, last, &res, &e);
            if (rc) fprintf(stderr, "spike resume: %s\n", e.msg);
            CHECK(rc == 0 && res.rollbacks == 1 && !memcmp(ps, pk, (size_t)n * 4));
            char rm[200];
            snprintf(rm, sizeof rm, "rm -f %s/ckpt-*", dir_k);
            CHECK(system(rm) == 0);
        }
        // killed inside the run of skips (after step 12, whose checkpoint has 2 skips in a row): the resumed run
        // finds the step-8 checkpoint for its rollback and ends on the same weights
        memcpy(pm, s0.p, (size_t)n * 4);
        CHECK(spiky_run(&tmm, &t, dir_m, &spm, &ssp, 1, 12, NULL, &res, &e) == 0 && res.stopped && res.rollbacks == 0);
        CHECK(checkpoint_find_latest(dir_m, last, sizeof last, &e) == 1 && strstr(last, "ckpt-02-00000012.h5"));
        for (int64_t i = 0; i < n; i++) pm[i] = 1e3f;
        rc = spiky_run(&tmm, &t, dir_m, &spm, &ssp, 1, 0, last, &res, &e);
        if (rc) fprintf(stderr, "spike resume in the skips: %s\n", e.msg);
        CHECK(rc == 0 && res.rollbacks == 1 && !memcmp(ps, pm, (size_t)n * 4));
        // a checkpoint every step, only the newest kept: the two written inside the run of skips do not push out
        // the last good one (step 10), which the rollback takes
        memcpy(pm, s0.p, (size_t)n * 4);
        rc = spiky_run_ck(&tmm, &t, dir_n, &spm, &ssp, 1, 0, NULL, 1, 1, &res, &e);
        if (rc) fprintf(stderr, "spike, keep 1: %s\n", e.msg);
        CHECK(rc == 0 && res.rollbacks == 1 && res.steps_done == SPIKE_STEPS);
        CHECK(checkpoint_find_latest(dir_n, last, sizeof last, &e) == 1 && strstr(last, "ckpt-02-00000030.h5"));
        {
            char rm[200];
            snprintf(rm, sizeof rm, "rm -f %s/ckpt-*", dir_n);
            CHECK(system(rm) == 0);
        }
        // no rollbacks allowed: the loop stops at the third skip with the hint
        memcpy(pm, s0.p, (size_t)n * 4);
        rc = spiky_run(&tmm, &t, dir_n, &spm, &ssp, 0, 0, NULL, &res, &e);
        printf("loss spike without rollbacks: rc %d: %s\n", rc, rc ? e.msg : "");
        CHECK(rc == -1 && strstr(e.msg, "diverged") && strstr(e.msg, "spike_rollbacks") && res.steps_done == 12);
        char cmds[400];
        snprintf(cmds, sizeof cmds, "rm -rf %s %s %s %s", dir_s, dir_k, dir_m, dir_n);
        CHECK(system(cmds) == 0);
        free(ps), free(pk), free(pm);
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
