// stage_train.c: the training stages that share train_loop: `layerwise` (stepwise progressive
// distillation: a schedule of layouts, each converting more attention layers to Mamba, already-trained
// Mamba layers kept; by default only the Mamba mixers train, loss CE + 0.1 KL on pseudo-labels, optional
// hidden-state MSE), and `distill` / `sft` (end to end, trainable by pattern, any CE/KL/reverse-KL mix).
//
// Each schedule step (one for distill/sft) is one train_run over steps [offset, offset + steps) of the
// stage. Its model starts from the previous step's model (the earlier stage's for the first): the new
// layout is built from the teacher (Mamba from attention) and every tensor the previous model has with the
// same name and shape is copied over it, so trained Mamba layers and any trained shared weights carry on.
// Checkpoints carry "layerwise.sub" (the schedule step); --resume continues inside the right step.
#include <string.h>

#include "distill/checkpoint.h"
#include "distill/mamba_init.h"
#include "distill/stage_common.h"
#include "distill/teacher_cache.h"

#define KEY_SUB "layerwise.sub"

static void annotate_sub(void *ctx, CkptState *st) { ckpt_state_set_int(st, KEY_SUB, *(int *)ctx); }

static bool same_layout(const HybridConfig *a, const HybridConfig *b) {
    if (a->base.n_layer != b->base.n_layer) return false;
    for (int l = 0; l < a->base.n_layer; l++)
        if (a->mixer[l] != b->mixer[l]) return false;
    return true;
}

// model k from prev: the layout from the teacher, then prev's matching tensors over it.
static int derive(StageModel *m, const StageModel *prev, LoadedModel *teacher, bool *teacher_loaded,
                  const RunContext *ctx, DlError *e) {
    model_build_registry(&m->hc, &m->reg);
    m->params = dl_calloc((size_t)m->reg.numel, sizeof(float));
    if (!same_layout(&m->hc, &prev->hc)) {
        if (!*teacher_loaded) {
            if (stage_load_teacher(ctx, teacher, e)) return -1;
            *teacher_loaded = true;
        }
        if (hybrid_init_from_teacher(&m->hc, &m->reg, m->params, &teacher->hc, &teacher->reg, teacher->params, ctx->seed, e))
            return -1;
    }
    stage_copy_matching(&m->reg, m->params, &prev->reg, prev->params);
    return 0;
}

static int run_training(RunContext *ctx, const StageSpec *st) {
    const Recipe *rec = ctx->recipe;
    const bool layerwise = st->kind == STAGE_LAYERWISE;
    DlError e;
    int rc = DL_EXIT_RUNTIME;
    LoadedModel teacher;
    bool teacher_loaded = false;
    StageModel prev, cur;
    memset(&prev, 0, sizeof prev);
    memset(&cur, 0, sizeof cur);
    memset(&teacher, 0, sizeof teacher);
    LoaderSource ls = {0};
    RowSource rows;
    memset(&rows, 0, sizeof rows);
    char *cache = NULL;
    Metrics metrics = {0};
    CkptState cst;
    ckpt_state_init(&cst);
    char *shard = NULL;
    char from[1100], latest[1024] = "";
    // data
    if (st->data_index < 0) {
        dl_fail(&e, "stage '%s' has no data set", st->name);
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    const DataSpec *ds = &rec->data[st->data_index];
    const StageDist *sd = stage_dist();
    // rank 0 makes the data shard (written once, atomically); the others open it after rank 0 says it is there
    int shard_ok = 1;
    if (sd->rank == 0) shard_ok = stage_data_shard(ctx, st->data_index, SPLIT_TRAIN, &shard, &e) == 0;
    if (sd->world > 1) {
        DlError e2;
        if (dist_bcast(sd->g, &shard_ok, sizeof shard_ok, &e2)) {
            e = e2;
            goto fail;
        }
        if (sd->rank > 0) {
            if (!shard_ok) {
                dl_fail(&e, "rank 0 could not prepare data set '%s' (its message says why)", ds->name);
                rc = DL_EXIT_INPUT;
                goto fail;
            }
            shard_ok = stage_data_shard(ctx, st->data_index, SPLIT_TRAIN, &shard, &e) == 0;
        }
    }
    if (!shard_ok) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    const int64_t B = st->opt.micro_batch, T = ds->seq_len;
    const uint64_t data_seed = (uint64_t)ctx->seed ^ (0x9e37ull * (uint64_t)(st->index + 1));
    BatchSource src;
    int64_t steps_per_epoch;
    if (st->teacher_logits == TEACHER_CACHE) {
        // the teacher's top-k from the teacher_cache stage that ran on this data set; rows in its order
        for (int i = st->index - 1; i >= 0 && !cache; i--)
            if (rec->stages[i].kind == STAGE_TEACHER_CACHE && rec->stages[i].data_index == st->data_index) {
                char *d = run_stage_dir(ctx, i), nm[300];
                snprintf(nm, sizeof nm, "%s.cache.h5", ds->name);
                cache = dl_path_join(d, nm);
                free(d);
            }
        if (!cache) {
            dl_fail(&e, "teacher_logits = \"cache\" but no teacher_cache stage on data '%s' runs before", ds->name);
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        if (sd->world > 1) {
            dl_fail(&e, "teacher_logits = \"cache\" does not run data parallel yet (%d ranks); use \"online\"", sd->world);
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        if (st->loss.mse != 0) {
            dl_fail(&e, "the hidden-state MSE needs the teacher online (teacher_logits = \"online\")");
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        if (row_source_open(&rows, shard, T, data_seed, ds->shuffle, &e) ||
            row_source_attach_cache(&rows, cache, rec->teacher_cfg.base.vocab, &e)) {
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        src = row_source(&rows);
        steps_per_epoch = row_source_rows(&rows) / B;
    } else {
        if (loader_source_open_rank(&ls, shard, B, T, data_seed, ds->shuffle, sd->rank, sd->world, &e)) {
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        src = loader_source(&ls);
        steps_per_epoch = dataloader_steps_per_epoch(ls.dl);
    }
    // where to start: the newest checkpoint of this stage (on --resume), else the earlier stage's model
    int k_ckpt = -1;
    int64_t done_flag = 0, ckpt_step = 0;
    if (ctx->resume) {
        int f = checkpoint_find_latest(ctx->stage_dir, latest, sizeof latest, &e);
        if (f < 0) goto fail;
        if (f == 1) {
            int64_t sub = 0;
            if (checkpoint_read_state(latest, &cst, &e) || ckpt_state_get_int(&cst, KEY_SUB, &sub, &e) ||
                ckpt_state_get_int(&cst, TRAIN_KEY_DONE, &done_flag, &e))
                goto fail;
            k_ckpt = (int)sub;
            ckpt_step = cst.step;
        }
    }
    if (stage_load_input_model(ctx, &prev, from, sizeof from, &e)) goto fail;
    if (sd->rank == 0 && metrics_open(&metrics, ctx->run_dir, st->index, k_ckpt >= 0 ? ckpt_step : 0, &e)) goto fail;
    const int n_sub = layerwise ? st->n_schedule : 1;
    LossWeights w = {.ce = (float)st->loss.ce, .kl = (float)st->loss.kl, .rkl = (float)st->loss.reverse_kl,
                     .temperature = st->loss.temperature > 0 ? (float)st->loss.temperature : 1.0f};
    bool need_teacher = ((st->loss.kl != 0 || st->loss.reverse_kl != 0) && !cache) || st->loss.mse != 0;
    if (need_teacher && !teacher_loaded) {
        if (stage_load_teacher(ctx, &teacher, &e)) goto fail;
        teacher_loaded = true;
    }
    int64_t offset = 0;
    dl_info("%s: starting from %s", st->name, k_ckpt >= 0 ? latest : from);
    for (int k = 0; k < n_sub; k++) {
        int64_t steps = layerwise ? stage_steps(st->schedule[k].steps, st->schedule[k].epochs, steps_per_epoch, st->opt.grad_accum)
                                  : stage_steps(st->steps, st->epochs, steps_per_epoch, st->opt.grad_accum);
        int64_t off_k = offset;
        offset += steps;
        if (k < k_ckpt) continue;
        memset(&cur, 0, sizeof cur);
        if (layerwise) {
            if (recipe_stage_layout(rec, st, k, &cur.hc, &e)) goto fail;
        } else {
            cur.hc = prev.hc;
        }
        const char *resume_from = NULL;
        if (k == k_ckpt && done_flag) {  // this schedule step finished: its checkpoint is the next one's input
            stage_model_free(&prev);
            if (stage_load_model(ctx, latest, &prev, &e)) goto fail;
            continue;
        }
        if (k == k_ckpt) {
            model_build_registry(&cur.hc, &cur.reg);
            cur.params = dl_calloc((size_t)cur.reg.numel, sizeof(float));
            resume_from = latest;
        } else if (derive(&cur, &prev, &teacher, &teacher_loaded, ctx, &e)) {
            goto fail;
        }
        const char *pattern = st->trainable && *st->trainable ? st->trainable : (layerwise ? "*.mamba.*" : "*");
        if (reg_set_trainable(&cur.reg, pattern, &e) < 0) {
            rc = DL_EXIT_INPUT;
            goto fail;
        }
        char sname[96];
        if (layerwise && n_sub > 1) snprintf(sname, sizeof sname, "%s %d/%d", st->name, k + 1, n_sub);
        else snprintf(sname, sizeof sname, "%s", st->name);
        if (layerwise)
            dl_info("%s: %d of %d layers Mamba, %lld trainable parameters, steps %lld..%lld", sname,
                    cur.hc.base.n_layer - hybrid_n_attn(&cur.hc), cur.hc.base.n_layer,
                    (long long)reg_trainable_numel(&cur.reg), (long long)off_k + 1, (long long)(off_k + steps));
        TrainConfig c;
        memset(&c, 0, sizeof c);
        c.hc = &cur.hc, c.reg = &cur.reg, c.params = cur.params;
        if (teacher_loaded) c.teacher_hc = &teacher.hc, c.teacher_reg = &teacher.reg, c.teacher_params = teacher.params;
        c.w = w;
        c.mse = st->loss.mse;
        c.micro_batch = B, c.seq_len = T;
        stage_optim_config(st, steps, &c.opt);
        c.run_dir = ctx->stage_dir;
        c.stage_index = st->index;
        c.stage_name = st->name;
        c.progress_label = sname;
        c.step_offset = off_k;
        c.checkpoint_every = rec->run.checkpoint_every;
        c.keep_checkpoints = rec->run.keep_checkpoints;
        c.metrics = sd->rank == 0 ? &metrics : NULL;
        stage_train_device(ctx, &c);
        c.resume_from = resume_from;
        int sub = k;
        c.annotate = annotate_sub, c.annotate_ctx = &sub;
        c.stop = ctx->stop;
        const char *stop_env = getenv("DISTILL_TEST_STOP_AFTER");  // tests: a simulated kill after N steps
        if (stop_env) c.stop_after = atoll(stop_env);
        const char *pause_env = getenv("DISTILL_TEST_PAUSE_AFTER");  // tests: SIGSTOP after N steps, for a SIGKILL
        if (pause_env) c.pause_after = atoll(pause_env);
        TrainResult res;
        if (train_run(&c, &src, &res, &e)) goto fail;
        if (res.interrupted) {
            rc = DL_EXIT_INTERRUPTED;
            goto out;
        }
        if (res.stopped) {
            rc = DL_EXIT_INTERRUPTED;
            goto out;
        }
        stage_model_free(&prev);
        prev = cur;
        memset(&cur, 0, sizeof cur);
    }
    rc = DL_EXIT_OK;
    metrics_close(&metrics);
    if (sd->rank == 0) stage_plot_metrics(ctx);
    goto out;
fail:
    if (stage_dist()->world > 1)
        fprintf(stderr, "distill: error (rank %d of %d): %s: %s\n", stage_dist()->rank, stage_dist()->world, st->name, e.msg);
    else
        fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
out:
    ckpt_state_free(&cst);
    metrics_close(&metrics);
    loader_source_close(&ls);
    row_source_close(&rows);
    free(cache);
    free(shard);
    stage_model_free(&cur);
    stage_model_free(&prev);
    if (teacher_loaded) model_free(&teacher);
    return rc;
}

DL_STAGE(stage_layerwise_def, {.kind = STAGE_LAYERWISE,
                               .summary = "stepwise layerwise distillation: Mamba mixers only, CE + KL to the teacher",
                               .run = run_training})
DL_STAGE(stage_distill_def, {.kind = STAGE_DISTILL, .summary = "end-to-end distillation (KL / CE mix)", .run = run_training})
DL_STAGE(stage_sft_def, {.kind = STAGE_SFT, .summary = "supervised fine-tuning (CE, optional KL)", .run = run_training})
