// stage_draft.c: the `draft` stage: the speculative-decoding draft model of the paper's section 5 ("shrink
// and fine-tune"): the teacher cut to a few of its layers (`layers`, default the first and the last) with
// its embeddings, final norm and head (spec_draft_from_layers), then fine-tuned with the shared training loop
// on `data` (prompt-masked CE on the teacher's generated responses, and/or KL to the online teacher), on the
// run's device. kl_from = "student": the KL terms follow the newest earlier model instead, the hybrid the draft
// will propose tokens to: acceptance is agreement with the target, and a draft that learned the teacher is
// accepted only as far as the student agrees with the teacher. The draft never replaces the student: later stages still find the hybrid (stage_find_model
// skips this kind).
//
// Output: STAGE_DIR/model/, an HF Llama directory (config.json + model.safetensors, fp32: the trained
// weights exactly), loadable by `distill eval-spec --draft` and HF transformers; the eval stage uses it for
// its speculative rows. Checkpoints of the training loop live in STAGE_DIR as for every training stage, so
// --resume continues an interrupted fine-tune bit-exactly (and only exports when training had finished).
//
// Reuse (`reuse = true`, the default; stage_reuse.h): a draft trained toward the teacher depends only on the teacher,
// its training rows and the stage's settings, not on the student (the 50% and 25% demos train the same draft to the
// same bits). The finished STAGE_DIR/model is kept as OUTPUT_DIR/.draft-cache/KEY/ and an identical later stage
// copies it in instead of training. kl_from = "student" drafts are never reused (their KL target is the run's own).
#include <string.h>

#include "distill/checkpoint.h"
#include "distill/draft_vocab.h"
#include "distill/export.h"
#include "distill/model_io.h"
#include "distill/spec_decode.h"
#include "distill/stage_common.h"
#include "distill/stage_reuse.h"

// STAGE_DIR/model, the directory the stage writes (newly allocated).
static char *draft_dir(const char *stage_dir) { return dl_path_join(stage_dir, "model"); }

static bool draft_complete(const char *dir, const StageSpec *st) {
    char *cfg = dl_path_join(dir, "config.json"), *voc = dl_path_join(dir, DRAFT_VOCAB_FILE);
    bool ok = dl_file_exists(cfg) && (st->draft_vocab <= 0 || dl_file_exists(voc));
    free(cfg), free(voc);
    return ok;
}

// OUTPUT_DIR/.draft-cache/KEY (stage_reuse.h): the teacher, seed and device (reuse_key_begin), every setting of the
// stage that shapes its training (the index seeds its data order; checkpoint spacing decides where a loss-spike
// rollback returns), and the content of its training rows. NULL with e filled when the rows cannot be read.
// A setting added later that changes how the draft trains must be added here, or stale drafts would be reused.
static char *draft_cache_dir(const RunContext *ctx, const StageSpec *st, const char *shard, int64_t steps, DlError *e) {
    const Recipe *rec = ctx->recipe;
    const DataSpec *ds = &rec->data[st->data_index];
    const OptimSpec *o = &st->opt;
    ReuseKey k;
    reuse_key_begin(&k, ctx, "draft");
    char txt[1536];
    int n = snprintf(txt, sizeof txt,
                     "index %d\nsteps %lld\ntrainable %s\nloss %.17g %.17g %.17g %.17g\nkl_from %d\n"
                     "opt %.17g %.17g %.17g %.17g %.17g %lld %.17g %d %.17g %.17g %d %d %d %d %.17g\n"
                     "data %d %d\nhardware %d %d\ncheckpoints %lld %d\nvocab %lld\nlayers",
                     st->index, (long long)steps, st->trainable && *st->trainable ? st->trainable : "*", st->loss.ce,
                     st->loss.kl, st->loss.reverse_kl, st->loss.temperature, st->kl_from, o->lr, o->beta1, o->beta2, o->eps,
                     o->weight_decay, (long long)o->warmup_steps, o->warmup_ratio, o->schedule, o->min_lr_ratio, o->clip,
                     o->micro_batch, o->grad_accum, o->moments, o->spike_rollbacks, o->spike_lr_factor, ds->seq_len,
                     ds->shuffle, rec->hardware.recompute, rec->hardware.gemm_tune, (long long)rec->run.checkpoint_every,
                     rec->run.keep_checkpoints, (long long)st->draft_vocab);
    for (int i = 0; i < st->n_draft_layers && n < (int)sizeof txt - 16; i++) n += snprintf(txt + n, sizeof txt - (size_t)n, " %d", st->draft_layers[i]);
    reuse_key_add(&k, txt, (size_t)n);
    return reuse_key_add_shard_rows(&k, shard, e) ? NULL : reuse_key_dir(&k, ctx);
}

// A reused draft must be the cut this stage would train: its layer count and the teacher's sizes.
static int check_reused(const char *dir, const StageSpec *st, const HybridConfig *teacher, DlError *e) {
    LoadedModel m;
    if (model_load(dir, 0, &m, e)) return -1;
    const LlamaConfig *a = &m.hc.base, *b = &teacher->base;
    int rc = 0;
    if (a->n_layer != st->n_draft_layers || a->d_model != b->d_model || a->vocab != b->vocab || a->n_head != b->n_head ||
        a->n_kv_head != b->n_kv_head || a->d_ff != b->d_ff)
        rc = dl_fail(e, "%d layers of width %d, vocabulary %d; this stage trains %d layers of width %d, vocabulary %d",
                     a->n_layer, a->d_model, a->vocab, st->n_draft_layers, b->d_model, b->vocab);
    model_free(&m);
    return rc;
}

// The trimmed head's list (draft_vocab.h): the `vocab` ids the training rows teach most often, written beside the
// weights after them (draft_complete wants both, so a kill in between re-exports on --resume).
static int write_vocab(const StageSpec *st, const char *data_name, const char *shard, const char *dir, int64_t V, DlError *e) {
    int64_t *counts = dl_malloc((size_t)V * sizeof *counts), total = 0;
    char source[320];  // no paths: the same rows give the same file in any run directory
    snprintf(source, sizeof source, "data '%s', train split, tokens with loss mask 1", data_name);
    int64_t covered = 0;
    int rc = draft_vocab_count(shard, V, counts, &total, e);
    if (rc == 0) rc = draft_vocab_write(dir, counts, V, st->draft_vocab, source, &covered, e);
    if (rc == 0)
        dl_info("%s: head trimmed to %lld ids, %.2f%% of the %lld trained tokens (%s)", st->name, (long long)st->draft_vocab,
                total > 0 ? 100.0 * (double)covered / (double)total : 0.0, (long long)total, DRAFT_VOCAB_FILE);
    free(counts);
    return rc;
}

static int run_draft(RunContext *ctx, const StageSpec *st) {
    const Recipe *rec = ctx->recipe;
    DlError e;
    int rc = DL_EXIT_RUNTIME;
    char *out = draft_dir(ctx->stage_dir), *shard = NULL, *cache = NULL;
    LoadedModel t;
    memset(&t, 0, sizeof t);
    bool have_t = false;
    StageModel d, sm;  // the draft; the student (kl_from = "student")
    memset(&d, 0, sizeof d);
    memset(&sm, 0, sizeof sm);
    char from[1024] = "";
    LoaderSource ls = {0};
    Metrics metrics = {0};
    CkptState cst;
    ckpt_state_init(&cst);
    char latest[1024] = "";
    if (ctx->resume && draft_complete(out, st)) {
        dl_info("%s: already complete (%s)", st->name, out);
        rc = DL_EXIT_OK;
        goto out;
    }
    const DataSpec *ds = &rec->data[st->data_index];
    if (stage_data_shard(ctx, st->data_index, SPLIT_TRAIN, &shard, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    const int64_t B = st->opt.micro_batch, T = ds->seq_len;
    const uint64_t data_seed = (uint64_t)ctx->seed ^ (0x9e37ull * (uint64_t)(st->index + 1));
    if (loader_source_open(&ls, shard, B, T, data_seed, ds->shuffle, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    const int64_t steps = stage_steps(st->steps, st->epochs, dataloader_steps_per_epoch(ls.dl), st->opt.grad_accum);
    if (st->reuse && st->kl_from != KL_FROM_STUDENT) {
        if (!(cache = draft_cache_dir(ctx, st, shard, steps, &e))) {
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        const int f = reuse_fetch_dir(cache, out, &e);
        if (f < 0) goto fail;
        if (f == 1) {
            if (check_reused(out, st, &rec->teacher_cfg, &e) == 0) {
                dl_info("%s: draft reused from %s (an identical earlier draft stage; reuse = false trains it again)", st->name, cache);
                rc = DL_EXIT_OK;
                goto out;
            }
            reuse_drop(cache, out, st->name, e.msg);
        }
    }
    if (stage_load_teacher(ctx, &t, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    have_t = true;
    // [n_draft_layers] teacher layers + embeddings, norm, head; the recipe checked the layer list
    if (spec_draft_from_layers(&t.hc, &t.reg, t.params, st->draft_layers, st->n_draft_layers, &d.hc, &d.reg, &d.params, &e))
        goto fail;
    if (reg_set_trainable(&d.reg, st->trainable && *st->trainable ? st->trainable : "*", &e) < 0) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    // resume: a finished fine-tune only needs its export; an unfinished one continues from its checkpoint
    int64_t done = 0;
    const char *resume_from = NULL;
    if (ctx->resume) {
        int f = checkpoint_find_latest(ctx->stage_dir, latest, sizeof latest, &e);
        if (f < 0) goto fail;
        if (f == 1) {
            if (checkpoint_read_state(latest, &cst, &e) || ckpt_state_get_int(&cst, TRAIN_KEY_DONE, &done, &e)) goto fail;
            resume_from = latest;
        }
    }
    char layers[256];
    size_t o = 0;
    for (int i = 0; i < st->n_draft_layers && o < sizeof layers; i++)
        o += (size_t)snprintf(layers + o, sizeof layers - o, "%s%d", i ? "," : "", st->draft_layers[i]);
    dl_info("%s: teacher layers [%s] -> a %d-layer draft, %lld parameters (%lld trainable), %lld steps%s%s", st->name, layers,
            d.hc.base.n_layer, (long long)reg_params_numel(&d.reg), (long long)reg_trainable_numel(&d.reg), (long long)steps,
            resume_from ? ", from " : "", resume_from ? latest : "");
    if (done) {
        if (checkpoint_load_weights(latest, &d.reg, d.params, 0, &e) < 0) goto fail;
    } else {
        if (metrics_open(&metrics, ctx->run_dir, st->index, resume_from ? cst.step : 0, &e)) goto fail;
        const bool teacher_online = st->loss.kl != 0 || st->loss.reverse_kl != 0;
        TrainConfig c;
        memset(&c, 0, sizeof c);
        c.hc = &d.hc, c.reg = &d.reg, c.params = d.params;
        if (teacher_online && st->kl_from == KL_FROM_STUDENT) {
            if (stage_load_input_model(ctx, &sm, from, sizeof from, &e)) goto fail;
            dl_info("%s: KL to the student %s (the speculative target)", st->name, from);
            c.teacher_hc = &sm.hc, c.teacher_reg = &sm.reg, c.teacher_params = sm.params;
        } else if (teacher_online) {
            c.teacher_hc = &t.hc, c.teacher_reg = &t.reg, c.teacher_params = t.params;
        }
        c.w = (LossWeights){.ce = (float)st->loss.ce, .kl = (float)st->loss.kl, .rkl = (float)st->loss.reverse_kl,
                            .temperature = st->loss.temperature > 0 ? (float)st->loss.temperature : 1.0f};
        c.micro_batch = B, c.seq_len = T;
        stage_optim_config(st, steps, &c.opt);
        c.run_dir = ctx->stage_dir;
        c.stage_index = st->index;
        c.stage_name = st->name;
        c.checkpoint_every = rec->run.checkpoint_every;
        c.keep_checkpoints = rec->run.keep_checkpoints;
        c.metrics = &metrics;
        stage_train_device(ctx, &c);
        // one process: with several ranks the runner runs this stage on rank 0 alone (a draft is small)
        c.dist = NULL, c.nccl = NULL, c.zero_stage = 0;
        c.resume_from = resume_from;
        c.stop = ctx->stop;
        const char *stop_env = getenv("DISTILL_TEST_STOP_AFTER");  // tests: a simulated kill after N steps
        if (stop_env) c.stop_after = atoll(stop_env);
        BatchSource src = loader_source(&ls);
        TrainResult res;
        if (train_run(&c, &src, &res, &e)) goto fail;
        metrics_close(&metrics);
        if (res.interrupted || res.stopped) {  // a checkpoint of the last step was written: --resume continues
            rc = DL_EXIT_INTERRUPTED;
            goto out;
        }
        stage_plot_metrics(ctx);
    }
    // fp32: the trained weights exactly (a 2-layer draft of a 135M teacher is ~140 MB)
    ExportOptions eo = {.dtype = DT_F32, .max_shard_bytes = 0, .name_or_path = rec->teacher.path};
    if (export_hf(out, &d.hc, &d.reg, d.params, &eo, &e)) goto fail;
    if (st->draft_vocab > 0 && write_vocab(st, ds->name, shard, out, d.hc.base.vocab, &e)) goto fail;
    dl_info("%s: draft written to %s", st->name, out);
    if (cache) reuse_keep_dir(cache, out, st->name);
    rc = DL_EXIT_OK;
    goto out;
fail:
    fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
out:
    ckpt_state_free(&cst);
    metrics_close(&metrics);
    loader_source_close(&ls);
    free(shard);
    free(out);
    free(cache);
    stage_model_free(&d);
    stage_model_free(&sm);
    if (have_t) model_free(&t);
    return rc;
}

DL_STAGE(stage_draft_def, {.kind = STAGE_DRAFT,
                           .summary = "speculative-decoding draft: a few teacher layers + embeddings/head, fine-tuned",
                           .run = run_draft})
