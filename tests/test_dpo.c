// test_dpo.c: DPO on the train loop: rows built from a real preference shard (prompt kept at its last
// tokens, mask on the response); the loss equals log 2 when policy == reference; the gradient routed
// through per-row CE weights matches central finite differences of the DPO loss (float64 sums of the
// engine's log-probs); the pair position saves and restores; a few optimizer steps raise the reward
// accuracy / margin on the training pairs.
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/dpo.h"
#include "distill/train_model.h"
#include "distill/engine.h"
#include "distill/losses.h"
#include "tests/check.h"
#include "tests/tiny_model.h"

static void write_pairs(const char *path, int V) {
    ShardWriterOpts o = {.kind = SHARD_PREF, .tokenizer_pre = "none", .vocab_size = V, .deflate = 0};
    ShardWriter *w;
    DlError e;
    if (shard_writer_open(&w, path, &o, &e)) exit(1);
    Rng g;
    rng_init(&g, 4, 0);
    for (int i = 0; i < 6; i++) {
        int32_t p[12], c[8], r[8];
        int np = 4 + i % 5, nc = 3 + i % 4, nr = 2 + (i * 3) % 5;
        for (int k = 0; k < np; k++) p[k] = (int32_t)rng_below(&g, (uint64_t)V);
        for (int k = 0; k < nc; k++) c[k] = (3 * (k ? c[k - 1] : p[np - 1]) + 1) % V;  // "good" answers follow a rule
        for (int k = 0; k < nr; k++) r[k] = (int32_t)rng_below(&g, (uint64_t)V);
        if (shard_add_pair(w, p, np, c, nc, r, nr, &e)) exit(1);
    }
    if (shard_writer_close(w, &e)) exit(1);
}

// DPO loss of batch b for params (float64 from the engine's sequence log-probs).
static double dpo_of(TinyModel *s, const float *ref, const TrainBatch *b, double beta) {
    DlError e;
    Engine *pe = engine_new(&s->h, &s->r, s->p, b->B, b->T, 0, &e), *re = engine_new(&s->h, &s->r, ref, b->B, b->T, 0, &e);
    double lp[8], lr[8];
    LossSpec ls = {.w = {.ce = 1}, .norm = 1};
    engine_forward(pe, b->tokens, b->reset);
    engine_loss(pe, b->targets, b->mask, &ls, NULL, lp);
    engine_forward(re, b->tokens, b->reset);
    engine_loss(re, b->targets, b->mask, &ls, NULL, lr);
    double pc[4], pr[4], rc[4], rr[4];
    for (int i = 0; i < b->B / 2; i++) pc[i] = lp[2 * i], pr[i] = lp[2 * i + 1], rc[i] = lr[2 * i], rr[i] = lr[2 * i + 1];
    double l = dpo_loss(b->B / 2, beta, pc, pr, rc, rr, NULL, NULL, NULL);
    engine_free(pe), engine_free(re);
    return l;
}

int main(void) {
    dl_set_quiet(true);
    char dir[] = "/tmp/distill_test_dpo_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    TinyModel t, s;
    tiny_teacher(&t, 2, true, 31);
    int attn[1] = {1};
    tiny_hybrid(&s, &t, attn, 1, 32);
    const int V = s.h.base.vocab;
    char *pp = dl_path_join(dir, "pairs.h5");
    write_pairs(pp, V);
    DlError e;
    PairSource ps;
    CHECK(pair_source_open(&ps, pp, 5, 9, &e) == 0 && ps.n_pairs == 6);
    const int64_t B = 4, T = 12;
    TrainBatch b = {B, T, malloc(B * T * 4), malloc(B * T * 4), malloc(B * T), malloc(B * T)};
    BatchSource src = pair_source(&ps);
    CHECK(src.next(src.ctx, &b, &e) == 0);
    // row layout: reset at 0 only; mask exactly on response targets; targets shifted tokens
    int32_t *pr, *ch, *rj;
    int64_t np, nc, nr;
    shard_read_pair(ps.r, ps.perm[0], &pr, &np, &ch, &nc, &rj, &nr, &e);
    int64_t P = np > 5 ? 5 : np, masked = 0;
    for (int t2 = 0; t2 < T; t2++) masked += b.mask[t2];
    CHECK_EQ_I64(masked, DL_MIN(nc, T + 1 - P));
    CHECK(b.tokens[P] == ch[0] && b.targets[P - 1] == ch[0] && b.mask[P - 1] == 1 && b.mask[P - 2] == 0);
    CHECK(b.reset[0] == 1 && b.reset[1] == 0);
    CHECK(b.tokens[T + P] == rj[0]);  // row 1: same prompt, rejected answer
    free(pr), free(ch), free(rj);
    // position: save after one batch, draw two more, restore, draw again -> same rows
    CkptState cs;
    ckpt_state_init(&cs);
    src.save(src.ctx, &cs);
    TrainBatch b2 = {B, T, malloc(B * T * 4), malloc(B * T * 4), malloc(B * T), malloc(B * T)};
    int32_t keep[48];
    src.next(src.ctx, &b2, &e);
    src.next(src.ctx, &b2, &e);  // crosses into epoch 1 (6 pairs, 2 per batch)
    src.next(src.ctx, &b2, &e);
    memcpy(keep, b2.tokens, sizeof keep);
    CHECK(src.restore(src.ctx, &cs, &e) == 0);
    src.next(src.ctx, &b2, &e);
    src.next(src.ctx, &b2, &e);
    src.next(src.ctx, &b2, &e);
    CHECK(!memcmp(keep, b2.tokens, sizeof keep));
    ckpt_state_free(&cs);

    // policy == reference: loss log 2, margin 0
    const double beta = 0.5;
    float *ref = malloc((size_t)s.r.numel * 4);
    memcpy(ref, s.p, (size_t)s.r.numel * 4);
    DpoLoss d = {.hc = &s.h, .reg = &s.r, .ref_params = ref, .beta = beta};
    TrainModel *se = tm_new(TM_CPU, &s.h, &s.r, s.p, B, T, TM_TRAIN, NULL, &e);
    float *g = calloc((size_t)s.r.numel, 4);
    double loss;
    MetricPart parts[4];
    int n_parts;
    CHECK(dpo_train_loss(&d, se, &b, g, &loss, parts, &n_parts, &e) == 0);
    CHECK(fabs(loss - log(2.0)) < 1e-9 && n_parts == 3 && fabs(parts[2].value) < 1e-9);
    // move the policy away from the reference, then compare gradients with finite differences
    Rng rg;
    rng_init(&rg, 5, 0);
    for (int64_t i = 0; i < s.r.numel; i++) s.p[i] += (float)(0.05 * rng_normal(&rg));
    memset(g, 0, (size_t)s.r.numel * 4);
    CHECK(dpo_train_loss(&d, se, &b, g, &loss, parts, &n_parts, &e) == 0);
    CHECK(fabs(loss - dpo_of(&s, ref, &b, beta)) < 1e-9);
    // the 6 largest |gradient| entries over a few tensors of different kinds
    const char *names[] = {"model.layers.0.mamba.C_proj.weight", "model.layers.0.mamba.dt_proj.bias", "model.layers.1.self_attn.q_proj.weight",
                           "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"};
    double worst = 0;
    for (size_t k = 0; k < DL_ARRAY_LEN(names); k++) {
        const TensorInfo *ti = &s.r.t[reg_find(&s.r, names[k])];
        int64_t best = 0;
        for (int64_t j = 1; j < ti->numel; j++)
            if (fabsf(g[ti->offset + j]) > fabsf(g[ti->offset + best])) best = j;
        float *x = s.p + ti->offset + best, x0 = *x;
        const float h = 2e-3f;
        *x = x0 + h;
        double lp = dpo_of(&s, ref, &b, beta);
        *x = x0 - h;
        double lm = dpo_of(&s, ref, &b, beta);
        *x = x0;
        double fd = (lp - lm) / (2.0 * h), an = g[ti->offset + best];
        double rel = fabs(fd - an) / fmax(fabs(fd), 1e-6);
        printf("  %-44s grad %+.6e  fd %+.6e  rel %.2e\n", names[k], an, fd, rel);
        if (rel > worst) worst = rel;
    }
    CHECK_REL(worst, 3e-2, "DPO gradient vs finite differences (fp32 engine)");
    tm_free(se);
    dpo_loss_free(&d);

    // a short DPO run on the loop: the reward accuracy / margin on the training pairs rise
    TrainConfig c;
    memset(&c, 0, sizeof c);
    memcpy(ref, s.p, (size_t)s.r.numel * 4);  // reference = the start of this run
    d = (DpoLoss){.hc = &s.h, .reg = &s.r, .ref_params = ref, .beta = 0.5};
    c.hc = &s.h, c.reg = &s.r, c.params = s.p;
    c.loss_fn = dpo_train_loss, c.loss_ctx = &d;
    c.micro_batch = 6 * 2, c.seq_len = T;  // all 6 pairs every step
    optim_config_default(&c.opt);
    c.opt.lr = 5e-3, c.opt.total_steps = 12, c.opt.clip_norm = 0, c.opt.outlier_factor = 0;
    c.run_dir = dir, c.stage_name = "dpo", c.keep_checkpoints = 1;
    pair_source_close(&ps);
    CHECK(pair_source_open(&ps, pp, 5, 9, &e) == 0);
    src = pair_source(&ps);
    TrainResult res;
    int rc = train_run(&c, &src, &res, &e);
    if (rc) fprintf(stderr, "%s\n", e.msg);
    CHECK(rc == 0);
    printf("DPO: loss after 12 steps %.4f (log 2 = %.4f)\n", res.last_loss, log(2.0));
    CHECK(res.last_loss < 0.6);
    dpo_loss_free(&d);
    pair_source_close(&ps);

    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    free(pp), free(ref), free(g);
    free(b.tokens), free(b.targets), free(b.mask), free(b.reset);
    free(b2.tokens), free(b2.targets), free(b2.mask), free(b2.reset);
    tiny_free(&s), tiny_free(&t);
    return check_report("test_dpo");
}
