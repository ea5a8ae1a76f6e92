// test_teacher_cache.c: the offline teacher cache: with k = V the dense reconstruction is the teacher's
// log-softmax; with k < V the top k are the teacher's k most likely tokens with their log-probs, the rest
// mass is exact and the dense distribution sums to 1; training from the k = V cache gives the losses of
// training with the teacher online; the row source's position saves and restores.
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/teacher_cache.h"
#include "tests/check.h"
#include "tests/tiny_model.h"

#define T 16

static void write_shard(const char *path, int V) {
    ShardWriterOpts o = {.kind = SHARD_LM, .tokenizer_pre = "none", .vocab_size = V, .seq_len = T, .pad_id = 0};
    ShardWriter *w;
    DlError e;
    if (shard_writer_open(&w, path, &o, &e)) exit(1);
    Rng g;
    rng_init(&g, 8, 0);
    for (int d = 0; d < 14; d++) {
        int32_t ids[40];
        int n = 5 + (int)rng_below(&g, 30);
        ids[0] = 1;
        for (int i = 1; i < n; i++) ids[i] = rng_uniform(&g) < 0.8f ? (3 * ids[i - 1] + 1) % V : (int32_t)rng_below(&g, (uint64_t)V);
        if (shard_add_doc(w, ids, NULL, n, &e)) exit(1);
    }
    if (shard_writer_close(w, &e)) exit(1);
}

typedef struct {
    double loss[16];
} Log;
static void on_step(void *ctx, int64_t step, double loss, const OptimResult *r) {
    (void)r;
    ((Log *)ctx)->loss[step] = loss;
}

static int train(TinyModel *s, TinyModel *t, const char *shard, const char *cache, const char *dir, Log *log) {
    RowSource rs;
    DlError e;
    if (row_source_open(&rs, shard, T, 3, true, &e)) return -1;
    if (cache && row_source_attach_cache(&rs, cache, t->h.base.vocab, &e)) return -1;
    BatchSource src = row_source(&rs);
    TrainConfig c;
    memset(&c, 0, sizeof c);
    c.hc = &s->h, c.reg = &s->r, c.params = s->p;
    if (!cache) c.teacher_hc = &t->h, c.teacher_reg = &t->r, c.teacher_params = t->p;
    c.w = (LossWeights){.ce = 1, .kl = 0.5f, .rkl = 0.25f, .temperature = 1};
    c.micro_batch = 2, c.seq_len = T;
    optim_config_default(&c.opt);
    c.opt.lr = 3e-3, c.opt.total_steps = 6;
    c.run_dir = dir, c.stage_name = "distill", c.keep_checkpoints = 1;
    c.on_step = on_step, c.on_step_ctx = log;
    TrainResult res;
    int rc = train_run(&c, &src, &res, &e);
    if (rc) fprintf(stderr, "%s\n", e.msg);
    row_source_close(&rs);
    return rc;
}

int main(void) {
    dl_set_quiet(true);
    char dir[] = "/tmp/distill_test_tcache_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    TinyModel t, s;
    tiny_teacher(&t, 2, true, 12);
    int attn[1] = {1};
    tiny_hybrid(&s, &t, attn, 1, 13);
    const int64_t V = t.h.base.vocab;
    char *shard = dl_path_join(dir, "d.h5"), *cfull = dl_path_join(dir, "full.h5"), *c5 = dl_path_join(dir, "k5.h5");
    write_shard(shard, (int)V);
    DlError e;
    CHECK(tcache_write(cfull, &t.h, &t.r, t.p, shard, 3, (int)V, NULL, &e) == 0);
    CHECK(tcache_write(c5, &t.h, &t.r, t.p, shard, 4, 5, NULL, &e) == 0);
    CHECK(tcache_write(c5, &t.h, &t.r, t.p, shard, 4, 0, NULL, &e) == -1 && strstr(e.msg, "top_k"));

    // all rows in order through the row source, the teacher online on the same batch
    RowSource rs;
    CHECK(row_source_open(&rs, shard, T, 1, false, &e) == 0);
    const int64_t R = row_source_rows(&rs);
    CHECK(R >= 4);
    CHECK(row_source_attach_cache(&rs, cfull, V, &e) == 0);
    TrainBatch b = {R, T, malloc(R * T * 4), malloc(R * T * 4), malloc(R * T), malloc(R * T)};
    BatchSource src = row_source(&rs);
    CHECK(src.teacher_logits != NULL && src.next(src.ctx, &b, &e) == 0);
    const float *dense = src.teacher_logits(src.ctx);
    Engine *te = engine_new(&t.h, &t.r, t.p, R, T, 0, &e);
    engine_forward(te, b.tokens, b.reset);
    float *lg = malloc((size_t)(R * T * V) * 4);
    engine_logits(te, 0, R * T, lg);
    double worst = 0;
    for (int64_t i = 0; i < R * T; i++) {
        double m = lg[i * V], sum = 0;
        for (int64_t j = 1; j < V; j++) m = fmax(m, lg[i * V + j]);
        for (int64_t j = 0; j < V; j++) sum += exp(lg[i * V + j] - m);
        for (int64_t j = 0; j < V; j++) worst = fmax(worst, fabs(dense[i * V + j] - (lg[i * V + j] - m - log(sum))));
    }
    CHECK_REL(worst, 1e-5, "k = V cache vs teacher log-softmax (max abs)");
    // k = 5: ids are the top 5, log-probs exact, rest mass and normalization
    TeacherCache *tc;
    CHECK(tcache_open(&tc, c5, &e) == 0 && tcache_k(tc) == 5);
    float *d5 = malloc((size_t)(T * V) * 4);
    int64_t row0 = 0;
    CHECK(tcache_dense(tc, &row0, 1, T, V, d5, &e) == 0);
    int ok_top = 0;
    double worst_sum = 0;
    for (int64_t t2 = 0; t2 < T; t2++) {
        const float *x = dense + t2 * V, *y = d5 + t2 * V;  // row 0 of the ordered batch is shard row 0
        // the 5 largest of x must carry x's values in y; all others share one value
        int64_t idx[5];
        for (int q = 0; q < 5; q++) {
            int64_t best = -1;
            for (int64_t j = 0; j < V; j++) {
                bool used = false;
                for (int u = 0; u < q; u++) used |= idx[u] == j;
                if (!used && (best < 0 || x[j] > x[best])) best = j;
            }
            idx[q] = best;
        }
        bool good = true;
        double top = 0;
        for (int q = 0; q < 5; q++) good &= fabs(y[idx[q]] - x[idx[q]]) < 1e-5, top += exp(x[idx[q]]);
        double sum = 0;
        for (int64_t j = 0; j < V; j++) sum += exp(y[j]);
        float other = 0;
        for (int64_t j = 0; j < V && !other; j++) {
            bool in = false;
            for (int q = 0; q < 5; q++) in |= idx[q] == j;
            if (!in) other = y[j];
        }
        good &= fabs(exp(other) * (V - 5) - (1 - top)) < 1e-5;
        ok_top += good;
        worst_sum = fmax(worst_sum, fabs(sum - 1));
    }
    CHECK_EQ_I64(ok_top, T);
    CHECK_REL(worst_sum, 1e-5, "dense k = 5 distribution sums to 1");
    tcache_close(tc);
    engine_free(te);
    row_source_close(&rs);
    // a cache for other data is refused
    CHECK(row_source_open(&rs, shard, T + 1, 1, false, &e) == -1 && strstr(e.msg, "seq_len"));

    // position save / restore (shuffled)
    CHECK(row_source_open(&rs, shard, T, 9, true, &e) == 0);
    src = row_source(&rs);
    TrainBatch b2 = {2, T, malloc(2 * T * 4), malloc(2 * T * 4), malloc(2 * T), malloc(2 * T)};
    src.next(src.ctx, &b2, &e);
    CkptState cs;
    ckpt_state_init(&cs);
    src.save(src.ctx, &cs);
    int32_t keep[2 * T * 1];
    for (int k = 0; k < 5; k++) src.next(src.ctx, &b2, &e);  // crosses an epoch
    memcpy(keep, b2.tokens, sizeof keep);
    CHECK(src.restore(src.ctx, &cs, &e) == 0);
    for (int k = 0; k < 5; k++) src.next(src.ctx, &b2, &e);
    CHECK(!memcmp(keep, b2.tokens, sizeof keep));
    ckpt_state_free(&cs);
    row_source_close(&rs);

    // training from the k = V cache = training with the teacher online
    float *p0 = malloc((size_t)s.r.numel * 4);
    memcpy(p0, s.p, (size_t)s.r.numel * 4);
    reg_set_trainable(&s.r, "*.mamba.*", &e);
    Log online = {{0}}, cached = {{0}};
    CHECK(train(&s, &t, shard, NULL, dir, &online) == 0);
    memcpy(s.p, p0, (size_t)s.r.numel * 4);
    CHECK(train(&s, &t, shard, cfull, dir, &cached) == 0);
    double wl = 0;
    for (int i = 1; i <= 6; i++) wl = fmax(wl, fabs(online.loss[i] - cached.loss[i]) / fabs(online.loss[i]));
    printf("online vs cached losses: max relative difference %.2e (step 6: %.6f vs %.6f)\n", wl, online.loss[6], cached.loss[6]);
    CHECK_REL(wl, 1e-4, "losses with the k = V cache vs the online teacher");

    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    free(shard), free(cfull), free(c5), free(lg), free(d5), free(p0);
    free(b.tokens), free(b.targets), free(b.mask), free(b.reset);
    free(b2.tokens), free(b2.targets), free(b2.mask), free(b2.reset);
    tiny_free(&s), tiny_free(&t);
    return check_report("test_teacher_cache");
}
