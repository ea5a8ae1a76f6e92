// stage_dpo.c: the `dpo` stage: preference optimization of the newest model of the run against a frozen
// copy of itself taken at the start of the stage (the reference, as MambaInLlama's DPO recipes do with
// TRL), on the shared train loop (dpo.h). On --resume the reference is rebuilt from the same input model.
#include <string.h>

#include "distill/checkpoint.h"
#include "distill/dpo.h"
#include "distill/stage_common.h"

static int run_dpo(RunContext *ctx, const StageSpec *st) {
    const Recipe *rec = ctx->recipe;
    DlError e;
    int rc = DL_EXIT_RUNTIME;
    StageModel m;
    memset(&m, 0, sizeof m);
    PairSource ps;
    memset(&ps, 0, sizeof ps);
    DpoLoss dl = {0};
    Metrics metrics = {0};
    float *ref = NULL;
    char *shard = NULL;
    char from[1100], latest[1024];
    const char *resume_from = NULL;
    int64_t ckpt_step = 0;
    if (stage_load_input_model(ctx, &m, from, sizeof from, &e)) goto fail;
    ref = dl_malloc((size_t)m.reg.numel * sizeof(float));
    memcpy(ref, m.params, (size_t)m.reg.numel * sizeof(float));
    if (ctx->resume) {
        int f = checkpoint_find_latest(ctx->stage_dir, latest, sizeof latest, &e);
        if (f < 0) goto fail;
        if (f == 1) {
            CkptState cs;
            ckpt_state_init(&cs);
            if (checkpoint_read_state(latest, &cs, &e)) goto fail;
            ckpt_step = cs.step;
            ckpt_state_free(&cs);
            resume_from = latest;
        }
    }
    if (stage_data_shard(ctx, st->data_index, SPLIT_TRAIN, &shard, &e) ||
        pair_source_open(&ps, shard, st->max_prompt_len, (uint64_t)ctx->seed ^ 0xd70ull, &e)) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    const DataSpec *ds = &rec->data[st->data_index];
    const int64_t pairs = st->opt.micro_batch > 0 ? st->opt.micro_batch : 1, B = 2 * pairs, T = ds->seq_len;
    int64_t steps = st->steps > 0 ? st->steps
                                  : (int64_t)(st->epochs * (double)ps.n_pairs / (double)(pairs * (st->opt.grad_accum > 0 ? st->opt.grad_accum : 1)) + 0.999);
    if (steps < 1) steps = 1;
    const char *pattern = st->trainable && *st->trainable ? st->trainable : "*";
    if (reg_set_trainable(&m.reg, pattern, &e) < 0) {
        rc = DL_EXIT_INPUT;
        goto fail;
    }
    if (metrics_open(&metrics, ctx->run_dir, st->index, ckpt_step, &e)) goto fail;
    dl = (DpoLoss){.hc = &m.hc, .reg = &m.reg, .ref_params = ref, .beta = st->beta};
    BatchSource src = pair_source(&ps);
    TrainConfig c;
    memset(&c, 0, sizeof c);
    c.hc = &m.hc, c.reg = &m.reg, c.params = m.params;
    c.loss_fn = dpo_train_loss, c.loss_ctx = &dl;
    c.micro_batch = B, c.seq_len = T;
    stage_optim_config(st, steps, &c.opt);
    c.run_dir = ctx->stage_dir;
    c.stage_index = st->index;
    c.stage_name = st->name;
    c.checkpoint_every = rec->run.checkpoint_every;
    c.keep_checkpoints = rec->run.keep_checkpoints;
    c.metrics = &metrics;
    c.resume_from = resume_from;
    c.stop = ctx->stop;
    c.device = stage_device(ctx);
    dl_info("%s: %lld pairs, beta %g, reference = %s, %lld steps of %lld pairs x %d", st->name, (long long)ps.n_pairs,
            st->beta, from, (long long)steps, (long long)pairs, c.opt.grad_accum);
    TrainResult res;
    if (train_run(&c, &src, &res, &e)) goto fail;
    rc = res.interrupted ? DL_EXIT_INTERRUPTED : DL_EXIT_OK;
    metrics_close(&metrics);
    if (rc == DL_EXIT_OK) stage_plot_metrics(ctx);
    goto out;
fail:
    fprintf(stderr, "distill: error: %s: %s\n", st->name, e.msg);
out:
    dpo_loss_free(&dl);
    metrics_close(&metrics);
    pair_source_close(&ps);
    free(shard);
    free(ref);
    stage_model_free(&m);
    return rc;
}

DL_STAGE(stage_dpo_def, {.kind = STAGE_DPO, .summary = "direct preference optimization against a frozen copy of the student",
                         .run = run_dpo})
