// stage_common.c: see stage_common.h.
#include "distill/stage_common.h"

#include "distill/train_model.h"

#include <limits.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/checkpoint.h"
#include "distill/ingest.h"
#include "distill/shards.h"
#include "distill/zero.h"

void stage_model_free(StageModel *m) {
    reg_free(&m->reg);
    free(m->params);
    memset(m, 0, sizeof *m);
}

int stage_load_teacher(const RunContext *ctx, LoadedModel *t, DlError *e) {
    const TeacherSpec *ts = &ctx->recipe->teacher;
    if (model_load(ts->path, (uint64_t)ts->seed, t, e)) return dl_fail_prefix(e, "teacher: ");
    return 0;
}

int stage_load_tokenizer(const RunContext *ctx, Tokenizer **t, DlError *e) {
    const char *p = ctx->recipe->tokenizer.path ? ctx->recipe->tokenizer.path : ctx->recipe->teacher.path;
    if (tokenizer_load(p, t, e)) return dl_fail_prefix(e, "tokenizer: ");
    return 0;
}

int stage_find_model(const RunContext *ctx, int before, char *out, size_t n, DlError *e) {
    for (int i = before - 1; i >= 0; i--) {
        if (!stage_kind_makes_model(ctx->recipe->stages[i].kind)) continue;
        char *dir = run_stage_dir(ctx, i);
        int rc = checkpoint_find_latest(dir, out, n, e);
        if (rc == 0) dl_fail(e, "stage '%s' (%s) has no complete checkpoint in %s: run it first (or --resume)",
                             ctx->recipe->stages[i].name, stage_kind_name(ctx->recipe->stages[i].kind), dir);
        free(dir);
        return rc == 1 ? 1 : -1;
    }
    return 0;
}

int stage_load_model(const RunContext *ctx, const char *path, StageModel *m, DlError *e) {
    memset(m, 0, sizeof *m);
    CkptState st;
    ckpt_state_init(&st);
    int rc = -1;
    if (checkpoint_read_state(path, &st, e)) goto out;
    const CkptBlob *mix = ckpt_state_get_blob(&st, TRAIN_KEY_MIXERS);
    const LlamaConfig *base = &ctx->recipe->teacher_cfg.base;
    if (!mix || mix->len != base->n_layer) {
        dl_fail(e, "%s: no layer layout for a %d-layer model (blob %s); was it written for another teacher?", path,
                base->n_layer, TRAIN_KEY_MIXERS);
        goto out;
    }
    int attn[DL_MAX_LAYERS], na = 0;
    MixerKind kind = MIXER_MAMBA1;
    for (int l = 0; l < base->n_layer; l++) {
        if (mix->data[l] == MIXER_ATTN) attn[na++] = l;
        else kind = (MixerKind)mix->data[l];
    }
    if (na == base->n_layer) hybrid_config_teacher(&m->hc, base);
    else if (hybrid_config_init(&m->hc, base, kind, attn, na, e)) goto out;
    model_build_registry(&m->hc, &m->reg);
    m->params = dl_calloc((size_t)m->reg.numel, sizeof(float));
    if (checkpoint_load_weights(path, &m->reg, m->params, 0, e) < 0) goto out;
    rc = 0;
out:
    ckpt_state_free(&st);
    if (rc) stage_model_free(m);
    return rc;
}

int stage_load_input_model(const RunContext *ctx, StageModel *m, char *from, size_t from_n, DlError *e) {
    char path[1024];
    int found = stage_find_model(ctx, ctx->stage_index, path, sizeof path, e);
    if (found < 0) return -1;
    if (found) {
        snprintf(from, from_n, "%s", path);
        return stage_load_model(ctx, path, m, e);
    }
    LoadedModel t;
    if (stage_load_teacher(ctx, &t, e)) return -1;
    snprintf(from, from_n, "%s (the teacher)", ctx->recipe->teacher.path);
    m->hc = t.hc;
    m->reg = t.reg;
    m->params = t.params;
    return 0;
}

int stage_save_model(const RunContext *ctx, const char *dir, const StageModel *m, int64_t step, DlError *e) {
    CkptState st;
    ckpt_state_init(&st);
    st.stage_index = ctx->stage_index;
    snprintf(st.stage_name, sizeof st.stage_name, "%s", ctx->recipe->stages[ctx->stage_index].name);
    st.step = step;
    uint8_t mix[DL_MAX_LAYERS];
    for (int l = 0; l < m->hc.base.n_layer; l++) mix[l] = (uint8_t)m->hc.mixer[l];
    ckpt_state_set_blob(&st, TRAIN_KEY_MIXERS, mix, m->hc.base.n_layer);
    ckpt_state_set_int(&st, "model.final", 1);
    ckpt_state_set_int(&st, TRAIN_KEY_DONE, 1);
    int rc = checkpoint_write(dir, &m->reg, m->params, NULL, &st, ctx->recipe->run.keep_checkpoints, NULL, 0, e);
    ckpt_state_free(&st);
    return rc;
}

int stage_copy_matching(const Registry *dst_reg, float *dst, const Registry *src_reg, const float *src) {
    int n = 0;
    for (int i = 0; i < dst_reg->n; i++) {
        const TensorInfo *t = &dst_reg->t[i];
        int j = reg_find(src_reg, t->name);
        if (j < 0) continue;
        const TensorInfo *s = &src_reg->t[j];
        bool same = s->ndim == t->ndim;
        for (int k = 0; same && k < t->ndim; k++) same = s->shape[k] == t->shape[k];
        if (!same) continue;
        memcpy(dst + t->offset, src + s->offset, (size_t)t->numel * sizeof(float));
        n++;
    }
    return n;
}

// ---------------------------------------------------------------- data

static int ingest_format(int fmt) {
    switch (fmt) {
    case FMT_TEXT: return INGEST_TEXT;
    case FMT_JSONL: return INGEST_JSONL;
    case FMT_CHAT: return INGEST_CHAT;
    case FMT_PREFERENCE: return INGEST_PREF;
    }
    return INGEST_AUTO;
}

static bool is_shard_file(const char *p) {
    size_t n = strlen(p);
    return n > 3 && !strcmp(p + n - 3, ".h5");
}

int stage_split_shard(const char *all, const char *train_path, const char *holdout_path, double holdout, uint64_t seed,
                      int64_t seq_len, int64_t max_records, bool keep_mask, DlError *e) {
    ShardReader *r = NULL;
    if (shard_open(&r, all, e)) return -1;
    const ShardInfo *in = shard_info(r);
    if (in->kind != SHARD_LM) {
        shard_close(r);
        return dl_fail(e, "%s: a preference shard cannot be split into LM rows", all);
    }
    char *pre = shard_attr_str(r, "tokenizer_pre");
    int32_t pad = in->vocab_size > 0 ? 0 : 0;
    ShardWriterOpts o = {.kind = SHARD_LM, .tokenizer_hash = in->tokenizer_hash, .tokenizer_pre = pre ? pre : "",
                         .vocab_size = in->vocab_size, .seq_len = seq_len, .pad_id = pad, .deflate = 1};
    ShardWriter *wt = NULL, *wh = NULL;
    int rc = -1;
    int64_t n = in->n_docs;
    if (max_records > 0 && max_records < n) n = max_records;
    // which documents are held out: a seeded draw per document; at least one on each side when possible
    uint8_t *hold = dl_calloc((size_t)(n ? n : 1), 1);
    int64_t nh = 0;
    for (int64_t d = 0; d < n && holdout > 0; d++) {
        Rng g;
        rng_init(&g, seed, 0x401d0000u + (uint64_t)d);
        hold[d] = rng_uniform_f64(&g) < holdout;
        nh += hold[d];
    }
    if (holdout > 0 && n >= 2 && nh == 0) hold[n - 1] = 1, nh = 1;
    if (holdout > 0 && n >= 2 && nh == n) hold[0] = 0, nh--;
    if (n == 0 || (holdout > 0 && n < 2)) {
        dl_fail(e, "%s: %lld documents, too few to train on%s", all, (long long)n, holdout > 0 ? " and hold some out" : "");
        goto out;
    }
    if (shard_writer_open(&wt, train_path, &o, e)) goto out;
    if (holdout > 0 && shard_writer_open(&wh, holdout_path, &o, e)) goto out;
    for (int64_t d = 0; d < n; d++) {
        int32_t *ids = NULL;
        uint8_t *mask = NULL;
        int64_t len = 0;
        if (shard_read_doc(r, d, &ids, keep_mask ? &mask : NULL, &len, e)) goto out;
        int wrc = len > 0 ? shard_add_doc(hold[d] ? wh : wt, ids, mask, len, e) : 0;
        free(ids);
        free(mask);
        if (wrc) goto out;
    }
    shard_writer_attr_str(wt, "source", all, NULL);
    if (wh) shard_writer_attr_str(wh, "source", all, NULL);
    ShardWriter *w1 = wt, *w2 = wh;
    wt = wh = NULL;
    if (shard_writer_close(w1, e)) {
        if (w2) shard_writer_abort(w2);
        goto out;
    }
    if (w2 && shard_writer_close(w2, e)) goto out;
    rc = 0;
out:
    if (wt) shard_writer_abort(wt);
    if (wh) shard_writer_abort(wh);
    free(hold);
    free(pre);
    shard_close(r);
    return rc;
}

int stage_data_shard(const RunContext *ctx, int data_index, DataSplit split, char **path, DlError *e) {
    const Recipe *rc = ctx->recipe;
    if (data_index < 0 || data_index >= rc->n_data) return dl_fail(e, "no data set #%d", data_index);
    const DataSpec *d = &rc->data[data_index];
    *path = NULL;
    if (split == SPLIT_HOLDOUT && d->format == FMT_PREFERENCE)
        return dl_fail(e, "data set '%s' holds preference pairs; eval uses LM data sets", d->name);
    if (split == SPLIT_HOLDOUT && !(d->holdout > 0))
        return dl_fail(e, "data set '%s' has no held-out part (set holdout > 0 in [data.%s])", d->name, d->name);
    char name[300];
    snprintf(name, sizeof name, "%s.%s.h5", d->name, split == SPLIT_TRAIN ? "train" : "holdout");
    if (d->produced_by >= 0) {
        char *dir = run_stage_dir(ctx, d->produced_by);
        *path = dl_path_join(dir, name);
        free(dir);
        if (!dl_file_exists(*path)) {
            int rc2 = dl_fail(e, "%s is missing: stage '%s' writes data set '%s'; run it first", *path,
                              rc->stages[d->produced_by].name, d->name);
            free(*path);
            *path = NULL;
            return rc2;
        }
        return 0;
    }
    char *ddir = dl_path_join(ctx->run_dir, "data");
    if (dl_mkdirs(ddir, e)) {
        free(ddir);
        return -1;
    }
    *path = dl_path_join(ddir, name);
    if (d->format == FMT_PREFERENCE) {
        char an[300];
        snprintf(an, sizeof an, "%s.all.h5", d->name);
        char *ap = d->n_sources == 1 && is_shard_file(d->sources[0]) ? dl_strdup(d->sources[0]) : dl_path_join(ddir, an);
        if (dl_file_exists(ap)) {
            free(*path);
            *path = ap;
            free(ddir);
            return 0;
        }
        free(ap);
    }
    if (dl_file_exists(*path)) {
        free(ddir);
        return 0;
    }
    // tokenize the sources (unless a source is already a shard), then split
    char allname[300];
    snprintf(allname, sizeof allname, "%s.all.h5", d->name);
    char *all = NULL;
    int r = -1;
    if (d->n_sources == 1 && is_shard_file(d->sources[0])) {
        all = dl_strdup(d->sources[0]);
    } else {
        all = dl_path_join(ddir, allname);
        if (!dl_file_exists(all)) {
            Tokenizer *tok = NULL;
            if (stage_load_tokenizer(ctx, &tok, e)) goto out;
            IngestOptions io;
            ingest_options_default(&io);
            io.format = (IngestFormat)ingest_format(d->format);
            io.policy = d->bad_records == BAD_FAIL ? INGEST_FAIL : INGEST_SKIP;
            io.seq_len = 0;
            io.max_len = d->packing ? 0 : d->seq_len + 1;
            IngestStats stats;
            dl_info("data '%s': tokenizing %d source file(s)", d->name, d->n_sources);
            int irc = ingest_files(tok, (const char *const *)d->sources, d->n_sources, all, &io, &stats, e);
            tokenizer_free(tok);
            if (irc) {
                dl_fail_prefix(e, "data '%s': ", d->name);
                goto out;
            }
            if (stats.n_skipped)
                dl_warn("data '%s': %lld bad record(s) skipped (bad_records = \"skip\")", d->name, (long long)stats.n_skipped);
        }
    }
    {  // preference pairs are used as they are (no split: held-out pairs are not used by any stage yet)
        ShardReader *sr = NULL;
        if (shard_open(&sr, all, e)) goto out;
        bool pref = shard_info(sr)->kind == SHARD_PREF;
        shard_close(sr);
        if (pref) {
            free(*path);
            *path = dl_strdup(all);
            r = 0;
            goto out;
        }
    }
    {
        char *tr = dl_path_join(ddir, name), *ho = NULL;
        char trn[300], hon[300];
        snprintf(trn, sizeof trn, "%s.train.h5", d->name);
        snprintf(hon, sizeof hon, "%s.holdout.h5", d->name);
        free(tr);
        tr = dl_path_join(ddir, trn);
        ho = dl_path_join(ddir, hon);
        bool keep_mask = d->format == FMT_CHAT ? d->assistant_only : true;
        r = stage_split_shard(all, tr, ho, d->holdout, (uint64_t)ctx->seed, d->seq_len, d->max_records, keep_mask, e);
        if (r) dl_fail_prefix(e, "data '%s': ", d->name);
        free(tr);
        free(ho);
    }
out:
    free(all);
    free(ddir);
    if (r) {
        free(*path);
        *path = NULL;
    }
    return r;
}

// ---------------------------------------------------------------- loader source

static int ls_next(void *ctx, TrainBatch *b, DlError *e) {
    LoaderSource *ls = ctx;
    const DataBatch *db;
    if (dataloader_next(ls->dl, &db, e)) return -1;
    if (db->B != b->B || db->T != b->T) return dl_fail(e, "data loader batch [%lld, %lld], expected [%lld, %lld]",
                                                       (long long)db->B, (long long)db->T, (long long)b->B, (long long)b->T);
    size_t n = (size_t)(b->B * b->T);
    memcpy(b->tokens, db->inputs, n * 4);
    memcpy(b->targets, db->targets, n * 4);
    memcpy(b->mask, db->mask, n);
    memcpy(b->reset, db->reset, n);
    return 0;
}

static void ls_save(void *ctx, CkptState *st) {
    LoaderSource *ls = ctx;
    DataPos p = dataloader_pos(ls->dl);
    ckpt_state_set_int(st, "data.seed", (int64_t)p.seed);
    ckpt_state_set_int(st, "data.epoch", (int64_t)p.epoch);
    ckpt_state_set_int(st, "data.consumed", (int64_t)p.consumed);
}

static int ls_restore(void *ctx, const CkptState *st, DlError *e) {
    LoaderSource *ls = ctx;
    int64_t seed, epoch, consumed;
    if (ckpt_state_get_int(st, "data.seed", &seed, e) || ckpt_state_get_int(st, "data.epoch", &epoch, e) ||
        ckpt_state_get_int(st, "data.consumed", &consumed, e))
        return -1;
    DataPos p = {(uint64_t)seed, (uint64_t)epoch, (uint64_t)consumed};
    return dataloader_set_pos(ls->dl, &p, e);
}

int loader_source_open(LoaderSource *ls, const char *shard, int64_t B, int64_t T, uint64_t seed, bool shuffle,
                       DlError *e) {
    return loader_source_open_rank(ls, shard, B, T, seed, shuffle, 0, 1, e);
}

int loader_source_open_rank(LoaderSource *ls, const char *shard, int64_t B, int64_t T, uint64_t seed, bool shuffle,
                            int rank, int world, DlError *e) {
    const char *paths[1] = {shard};
    DataLoaderOpts o = {.paths = paths, .n_paths = 1, .seq_len = T, .batch_size = B, .rank = rank, .world_size = world,
                        .seed = seed, .shuffle = shuffle};
    ls->dl = NULL;
    return dataloader_open(&ls->dl, &o, e);
}

void loader_source_close(LoaderSource *ls) {
    if (ls->dl) dataloader_close(ls->dl);
    ls->dl = NULL;
}

BatchSource loader_source(LoaderSource *ls) { return (BatchSource){ls, ls_next, ls_save, ls_restore, NULL}; }

int stage_device(const RunContext *ctx) { return ctx->recipe->run.device == DEVICE_CUDA ? TM_CUDA : TM_CPU; }

void stage_train_device(const RunContext *ctx, TrainConfig *c) {
    const Recipe *r = ctx->recipe;
    // tests: DISTILL_TEST_SPIKE=STAGE:A-B[:N]: in the stage named STAGE (c->stage_name, set before this call), a
    // non-finite loss at steps A..B until the loop rolls back; N skipped steps in a row start the rollback (25)
    const char *spike = getenv("DISTILL_TEST_SPIKE"), *colon = spike ? strchr(spike, ':') : NULL;
    long long a = 0, b = -1;
    int n = 0;
    if (colon && c->stage_name && strlen(c->stage_name) == (size_t)(colon - spike) &&
        !strncmp(spike, c->stage_name, (size_t)(colon - spike)) && sscanf(colon + 1, "%lld-%lld:%d", &a, &b, &n) >= 2) {
        c->test_spike[0] = a, c->test_spike[1] = b;
        if (n > 0) c->max_consecutive_skips = n;
    }
    c->device = stage_device(ctx);
    c->recompute_mlp = r->hardware.recompute != RECOMPUTE_NONE;  // "full" recomputes the MLP only on CUDA today
    c->teacher_shard = r->hardware.teacher_sharded;  // (cuda: the recipe checks refuse it elsewhere)
    c->dp_overlap = r->hardware.overlap, c->dp_stage_grads = r->hardware.stage_grads;
    const StageDist *sd = stage_dist();
    if (sd && sd->world > 1) {
        c->dist = sd->g;
        c->zero_stage = sd->zero;
        c->zero_bucket_bytes = ZERO_BUCKET_BYTES;  // (zero.h) buckets reduced as the backward finishes them (CUDA); one on tiny models
        c->nccl = sd->nccl;
    }
}

void stage_optim_config(const StageSpec *st, int64_t total_steps, OptimConfig *oc) {
    const OptimSpec *s = &st->opt;
    optim_config_default(oc);
    oc->lr = s->lr;
    oc->beta1 = s->beta1;
    oc->beta2 = s->beta2;
    oc->eps = s->eps > 0 ? s->eps : 1e-8;
    oc->weight_decay = s->weight_decay;
    oc->warmup_steps = s->warmup_steps >= 0 ? s->warmup_steps : 0;
    oc->warmup_ratio = s->warmup_steps >= 0 ? 0 : s->warmup_ratio;
    if (oc->warmup_steps >= total_steps) oc->warmup_steps = total_steps > 1 ? total_steps / 2 : 0;
    oc->decay = s->schedule == SCHED_LINEAR ? LR_DECAY_LINEAR : s->schedule == SCHED_CONSTANT ? LR_DECAY_CONSTANT : LR_DECAY_COSINE;
    oc->min_lr_ratio = s->min_lr_ratio;
    oc->clip_norm = s->clip;
    oc->grad_accum = s->grad_accum > 0 ? s->grad_accum : 1;
    oc->total_steps = total_steps;
    oc->moments_bf16 = s->moments == MOMENTS_BF16;
    oc->spike_rollbacks = s->spike_rollbacks;
    oc->spike_lr_factor = s->spike_lr_factor;
}

int64_t stage_steps(int64_t steps, double epochs, int64_t batches_per_epoch, int grad_accum) {
    if (steps > 0) return steps;
    int64_t per_epoch = batches_per_epoch / (grad_accum > 0 ? grad_accum : 1);
    int64_t n = (int64_t)ceil(epochs * (double)per_epoch);
    return n > 0 ? n : 1;
}

void stage_plot_metrics(const RunContext *ctx) {
    char script[PATH_MAX + 64] = "";
    const char *env = getenv("DISTILL_PLOT");
    if (env) snprintf(script, sizeof script, "%s", env);
    else {  // BUILD/distill -> BUILD/../scripts/plot-metrics
        char exe[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n <= 0) return;
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (!slash) return;
        *slash = 0;
        snprintf(script, sizeof script, "%s/../scripts/plot-metrics", exe);
    }
    if (access(script, X_OK) != 0) {
        dl_info("(loss curves not drawn: %s not found; set DISTILL_PLOT to scripts/plot-metrics)", script);
        return;
    }
    char *cmd = dl_malloc(strlen(script) + strlen(ctx->run_dir) + 64);
    sprintf(cmd, "'%s' '%s' >/dev/null 2>&1", script, ctx->run_dir);
    int rc = system(cmd);
    free(cmd);
    if (rc == 0) dl_info("loss curves: %s/loss.png", ctx->run_dir);
    else dl_info("(loss curves not drawn: plot-metrics failed; is gnuplot installed?)");
}

// ---------------------------------------------------------------- the process group

static StageDist g_dist = {NULL, 0, 1, 0, NULL};

void stage_set_dist(const StageDist *d) {
    if (d) g_dist = *d;
    else g_dist = (StageDist){NULL, 0, 1, 0, NULL};
}

const StageDist *stage_dist(void) { return &g_dist; }
