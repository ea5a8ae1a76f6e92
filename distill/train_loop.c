// train_loop.c: see train_loop.h.
#include "distill/train_loop.h"

#include <math.h>
#include <string.h>

#include "distill/engine.h"

typedef struct {
    Engine *student, *teacher;
    float *grads;     // [reg->numel]
    float *dh;        // [B*T, d] hidden-state gradient scratch (MSE)
    TrainBatch b;
} Loop;

static void loop_free(Loop *L) {
    engine_free(L->student);
    engine_free(L->teacher);
    free(L->grads);
    free(L->dh);
    free(L->b.tokens);
    free(L->b.targets);
    free(L->b.mask);
    free(L->b.reset);
}

static void fill_state(const TrainConfig *c, const Optim *o, BatchSource *src, int64_t step, int64_t tokens, bool done,
                       CkptState *st) {
    ckpt_state_init(st);
    st->stage_index = c->stage_index;
    snprintf(st->stage_name, sizeof st->stage_name, "%s", c->stage_name);
    st->step = c->step_offset + step;
    ckpt_state_set_recipe(st, c->recipe_text);
    ckpt_state_set_int(st, TRAIN_KEY_OFFSET, c->step_offset);
    ckpt_state_set_int(st, TRAIN_KEY_TOTAL, o->cfg.total_steps);
    ckpt_state_set_int(st, TRAIN_KEY_TOKENS, tokens);
    ckpt_state_set_int(st, TRAIN_KEY_DONE, done);
    uint8_t mix[DL_MAX_LAYERS];
    for (int l = 0; l < c->hc->base.n_layer; l++) mix[l] = (uint8_t)c->hc->mixer[l];
    ckpt_state_set_blob(st, TRAIN_KEY_MIXERS, mix, c->hc->base.n_layer);
    if (src->save) src->save(src->ctx, st);
    if (c->annotate) c->annotate(c->annotate_ctx, st);
}

static int save(const TrainConfig *c, const Optim *o, BatchSource *src, int64_t step, int64_t tokens, bool done,
                TrainResult *res, DlError *e) {
    CkptState st;
    fill_state(c, o, src, step, tokens, done, &st);
    int rc = checkpoint_write(c->run_dir, c->reg, c->params, o, &st, c->keep_checkpoints, res->last_checkpoint,
                              sizeof res->last_checkpoint, e);
    ckpt_state_free(&st);
    return rc;
}

// Restores weights, optimizer and batch position; returns the loop-local step to continue from, or -1.
static int64_t resume(const TrainConfig *c, Optim *o, BatchSource *src, int64_t *tokens, DlError *e) {
    CkptState st;
    ckpt_state_init(&st);
    int64_t step = -1, off = 0, total = 0;
    if (checkpoint_read_state(c->resume_from, &st, e)) goto out;
    if (st.stage_index != c->stage_index) {
        dl_fail(e, "%s: written by stage %d (%s), cannot resume stage %d (%s) from it", c->resume_from, st.stage_index,
                st.stage_name, c->stage_index, c->stage_name);
        goto out;
    }
    if (ckpt_state_get_int(&st, TRAIN_KEY_OFFSET, &off, e) || ckpt_state_get_int(&st, TRAIN_KEY_TOTAL, &total, e) ||
        ckpt_state_get_int(&st, TRAIN_KEY_TOKENS, tokens, e)) {
        dl_fail_prefix(e, "%s: ", c->resume_from);
        goto out;
    }
    if (off != c->step_offset || total != c->opt.total_steps || st.step < off || st.step > off + total) {
        dl_fail(e, "%s: holds step %lld of a loop over steps [%lld, %lld), but this loop covers [%lld, %lld) (did the "
                   "recipe's steps, epochs or batch change?)",
                c->resume_from, (long long)st.step, (long long)off, (long long)(off + total), (long long)c->step_offset,
                (long long)(c->step_offset + c->opt.total_steps));
        goto out;
    }
    const CkptBlob *mix = ckpt_state_get_blob(&st, TRAIN_KEY_MIXERS);
    bool same = mix && mix->len == c->hc->base.n_layer;
    for (int l = 0; same && l < c->hc->base.n_layer; l++) same = mix->data[l] == (uint8_t)c->hc->mixer[l];
    if (!same) {
        dl_fail(e, "%s: the checkpoint's layer layout (attention/Mamba per layer) differs from this stage's", c->resume_from);
        goto out;
    }
    if (checkpoint_load_weights(c->resume_from, c->reg, c->params, 0, e) < 0) goto out;
    if (checkpoint_load_optim(c->resume_from, o, e)) goto out;
    if (o->st.step != st.step - off) {
        dl_fail(e, "%s: optimizer step %lld does not match checkpoint step %lld", c->resume_from, (long long)o->st.step,
                (long long)(st.step - off));
        goto out;
    }
    if (src->restore && src->restore(src->ctx, &st, e)) {
        dl_fail_prefix(e, "%s: restoring the data position: ", c->resume_from);
        goto out;
    }
    step = st.step - off;
out:
    ckpt_state_free(&st);
    return step;
}

// Mean squared difference of the student's and the teacher's hidden states after every Mamba layer of the
// student; adds its gradient. Returns the (weighted) term.
static double hidden_mse(const TrainConfig *c, Loop *L, int64_t rows, double weight) {
    const int nl = c->hc->base.n_layer;
    const int64_t d = c->hc->base.d_model;
    int n_cmp = 0;
    for (int l = 0; l < nl; l++) n_cmp += c->hc->mixer[l] != MIXER_ATTN;
    if (!n_cmp) return 0;
    int64_t counted = 0;
    for (int64_t i = 0; i < rows; i++) counted += L->b.mask[i] != 0;
    if (!counted) return 0;
    const double scale = weight / ((double)counted * (double)d * n_cmp);
    double total = 0;
    for (int l = 0; l < nl; l++) {
        if (c->hc->mixer[l] == MIXER_ATTN) continue;
        memset(L->dh, 0, (size_t)(rows * d) * sizeof(float));
        total += mse_rows(rows, d, engine_hidden(L->student, l + 1), engine_hidden(L->teacher, l + 1), L->b.mask, scale,
                          L->dh);
        engine_add_hidden_grad(L->student, l + 1, L->dh, 1.0f);
    }
    return total;
}

// Teacher-forced per-layer alignment (the loss is MSE only): each Mamba layer l of the student gets the
// teacher's hidden state l as input and is trained to reproduce the teacher's hidden state l+1, one layer
// at a time (forward of that layer, MSE, backward into its own parameters). Returns the weighted MSE.
static double align_layers(const TrainConfig *c, Loop *L, int64_t rows, double weight) {
    const int nl = c->hc->base.n_layer;
    const int64_t d = c->hc->base.d_model;
    int n_cmp = 0;
    for (int l = 0; l < nl; l++) n_cmp += c->hc->mixer[l] != MIXER_ATTN;
    int64_t counted = 0;
    for (int64_t i = 0; i < rows; i++) counted += L->b.mask[i] != 0;
    if (!n_cmp || !counted) return 0;
    const double scale = weight / ((double)counted * (double)d * n_cmp);
    double total = 0;
    for (int l = 0; l < nl; l++) {
        if (c->hc->mixer[l] == MIXER_ATTN) continue;
        engine_forward_range(L->student, L->b.tokens, L->b.reset, l, engine_hidden(L->teacher, l), l + 1);
        memset(L->dh, 0, (size_t)(rows * d) * sizeof(float));
        total += mse_rows(rows, d, engine_hidden(L->student, l + 1), engine_hidden(L->teacher, l + 1), L->b.mask, scale, L->dh);
        engine_add_hidden_grad(L->student, l + 1, L->dh, 1.0f);
        engine_backward(L->student, L->grads);
    }
    return total;
}

int train_run(const TrainConfig *c, BatchSource *src, TrainResult *res, DlError *e) {
    memset(res, 0, sizeof *res);
    const int64_t B = c->micro_batch, T = c->seq_len;
    if (B < 1 || T < 1) return dl_fail(e, "%s: micro_batch and seq_len must be >= 1 (got %lld, %lld)", c->stage_name, (long long)B, (long long)T);
    bool cached = src->teacher_logits != NULL;
    const bool align = !c->loss_fn && c->mse != 0 && c->w.ce == 0 && c->w.kl == 0 && c->w.rkl == 0;
    bool need_teacher = !c->loss_fn && (((c->w.kl != 0 || c->w.rkl != 0) && !cached) || c->mse != 0);
    if (need_teacher && !c->teacher_params)
        return dl_fail(e, "%s: the loss has KL or MSE terms but no teacher was given", c->stage_name);
    if (c->mse != 0 && c->teacher_hc->base.n_layer != c->hc->base.n_layer)
        return dl_fail(e, "%s: hidden-state MSE needs a teacher with the student's layer count", c->stage_name);
    if (reg_trainable_numel(c->reg) == 0) return dl_fail(e, "%s: no trainable tensors", c->stage_name);
    Optim o;
    if (optim_init(&o, &c->opt, c->reg, e)) return dl_fail_prefix(e, "%s: ", c->stage_name);
    Loop L;
    memset(&L, 0, sizeof L);
    int rc = -1;
    L.student = engine_new(c->hc, c->reg, c->params, B, T, ENGINE_TRAIN, e);
    if (!L.student) goto out;
    if (need_teacher) {
        L.teacher = engine_new(c->teacher_hc, c->teacher_reg, c->teacher_params, B, T, c->mse != 0 ? ENGINE_KEEP_HIDDEN : 0, e);
        if (!L.teacher) goto out;
    }
    L.grads = dl_calloc((size_t)c->reg->numel, sizeof(float));
    if (c->mse != 0) L.dh = dl_malloc((size_t)(B * T * c->hc->base.d_model) * sizeof(float));
    L.b = (TrainBatch){B, T, dl_malloc((size_t)(B * T) * 4), dl_malloc((size_t)(B * T) * 4), dl_malloc((size_t)(B * T)),
                       dl_malloc((size_t)(B * T))};
    int64_t step = 0, tokens = 0;
    if (c->resume_from) {
        step = resume(c, &o, src, &tokens, e);
        if (step < 0) goto out;
        dl_info("%s: resumed at step %lld of %lld from %s", c->stage_name, (long long)(c->step_offset + step),
                (long long)(c->step_offset + o.cfg.total_steps), c->resume_from);
    }
    const int64_t total = o.cfg.total_steps;
    const int accum = o.cfg.grad_accum;
    const int max_skips = c->max_consecutive_skips > 0 ? c->max_consecutive_skips : 25;
    int consecutive_skips = 0;
    Progress prog;
    progress_begin(&prog, c->progress_label ? c->progress_label : c->stage_name, c->step_offset + step, c->step_offset + total);
    double t_run = dl_now();
    int64_t tokens_run = 0, steps_run = 0;
    LossSpec ls = {.w = c->w, .teacher = L.teacher};
    for (; step < total; step++) {
        double t0 = dl_now();
        optim_zero_grads(&o, L.grads);
        double loss = 0, ce = 0, kl = 0, rkl = 0, mse = 0;
        int64_t step_tokens = 0;
        MetricPart custom[4] = {{0}};
        int n_custom = 0;
        for (int a = 0; a < accum; a++) {
            if (src->next(src->ctx, &L.b, e)) {
                dl_fail_prefix(e, "%s, step %lld: ", c->stage_name, (long long)(c->step_offset + step + 1));
                goto out_prog;
            }
            if (c->loss_fn) {  // a custom loss (DPO) does its own forward/backward
                double l = 0;
                MetricPart mp[4];
                int nmp = 0;
                if (c->loss_fn(c->loss_ctx, L.student, &L.b, L.grads, &l, mp, &nmp, e)) {
                    dl_fail_prefix(e, "%s, step %lld: ", c->stage_name, (long long)(c->step_offset + step + 1));
                    goto out_prog;
                }
                loss += l;
                for (int i = 0; i < nmp && i < 4; i++) {
                    custom[i].name = mp[i].name;
                    custom[i].value += mp[i].value;
                }
                n_custom = nmp < 4 ? nmp : 4;
                for (int64_t i = 0; i < B * T; i++) step_tokens += L.b.mask[i] != 0;
                continue;
            }
            if (cached) {
                ls.teacher_logits = src->teacher_logits(src->ctx);
                ls.teacher = NULL;
            }
            if (L.teacher) engine_forward(L.teacher, L.b.tokens, L.b.reset);
            if (align) {
                double m = align_layers(c, &L, B * T, c->mse);
                loss += m, mse += m;
                for (int64_t i = 0; i < B * T; i++) step_tokens += L.b.mask[i] != 0;
                continue;
            }
            engine_forward(L.student, L.b.tokens, L.b.reset);
            LossParts lp = engine_loss(L.student, L.b.targets, L.b.mask, &ls, L.grads, NULL);
            double m = c->mse != 0 ? hidden_mse(c, &L, B * T, c->mse) : 0;
            engine_backward(L.student, L.grads);
            loss += lp.loss + m;
            ce += lp.ce, kl += lp.kl, rkl += lp.rkl, mse += m;
            step_tokens += (int64_t)lp.n_tokens;
        }
        loss /= accum, ce /= accum, kl /= accum, rkl /= accum, mse /= accum;
        OptimResult r;
        optim_step(&o, c->params, L.grads, loss, &r);
        bool skipped = r.outcome != OPTIM_APPLIED;
        int64_t gstep = c->step_offset + step + 1;
        tokens += B * T * accum;
        tokens_run += B * T * accum;
        steps_run++;
        double dt = dl_now() - t0, tps = dt > 0 ? (double)(B * T * accum) / dt : 0;
        res->last_loss = loss;
        if (skipped) {
            res->n_skipped++;
            consecutive_skips++;
            dl_warn("%s step %lld: %s (loss %g, gradient norm %g, running median %g); weights unchanged", c->stage_name,
                    (long long)gstep, optim_outcome_name(r.outcome), loss, r.grad_norm, r.median_norm);
        } else {
            consecutive_skips = 0;
        }
        if (c->metrics) {
            MetricPart parts[4];
            int np = 0;
            if (c->w.ce != 0) parts[np++] = (MetricPart){"ce", ce};
            if (c->w.kl != 0) parts[np++] = (MetricPart){"kl", kl};
            if (c->w.rkl != 0) parts[np++] = (MetricPart){"rkl", rkl};
            if (c->mse != 0) parts[np++] = (MetricPart){"mse", mse};
            if (c->loss_fn) {
                np = n_custom;
                for (int i = 0; i < np; i++) parts[i] = (MetricPart){custom[i].name, custom[i].value / accum};
            }
            MetricsRow row = {.stage_index = c->stage_index, .stage = c->stage_name, .step = gstep,
                              .total_steps = c->step_offset + total, .loss = loss, .parts = parts, .n_parts = np,
                              .lr = r.lr, .grad_norm = r.grad_norm, .tokens = step_tokens, .tokens_per_s = tps,
                              .skipped = skipped, .skip_reason = skipped ? optim_outcome_name(r.outcome) : NULL};
            if (metrics_write(c->metrics, &row, e)) goto out_prog;
        }
        if (c->on_step) c->on_step(c->on_step_ctx, gstep, loss, &r);
        progress_update(&prog, gstep, loss, tokens_run / (dl_now() - t_run));
        if (consecutive_skips >= max_skips) {
            dl_fail(e, "%s: %d steps in a row were skipped (last: %s at step %lld); training diverged. The last good "
                       "checkpoint is kept: lower the learning rate or check the data, then resume",
                    c->stage_name, consecutive_skips, optim_outcome_name(r.outcome), (long long)gstep);
            goto out_prog;
        }
        bool last = step + 1 == total, interrupt = c->stop && *c->stop;
        if (last || interrupt || (c->checkpoint_every > 0 && (step + 1) % c->checkpoint_every == 0)) {
            if (save(c, &o, src, step + 1, tokens, last, res, e)) goto out_prog;
        }
        res->steps_done = step + 1;
        if (interrupt && !last) {
            res->interrupted = true;
            dl_info("\n%s: stopped at step %lld; checkpoint %s", c->stage_name, (long long)gstep, res->last_checkpoint);
            break;
        }
        if (c->stop_after > 0 && steps_run >= c->stop_after && !last) {
            res->stopped = true;
            break;
        }
    }
    res->steps_done = (res->stopped || res->interrupted) ? step + 1 : total;
    res->tokens_per_s = tokens_run / (dl_now() - t_run + 1e-9);
    rc = 0;
out_prog:
    progress_end(&prog);
out:
    loop_free(&L);
    optim_free(&o);
    return rc;
}
