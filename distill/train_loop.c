// train_loop.c: see train_loop.h.
#include "distill/train_loop.h"

#include <math.h>
#include <signal.h>
#include <string.h>

#include "distill/checkpoint_shard.h"
#include "distill/train_model.h"
#include "distill/zero.h"

typedef struct {
    TrainModel *student, *teacher;
    float *grads;     // [reg->numel], where the student computes (train_model.h)
    TrainBatch b;
} Loop;

// Data-parallel state of one loop (world > 1; see train_loop.h).
typedef struct {
    DistGroup *g;
    int rank, world, stage;
    ZeroLayout Z;
    Registry oreg;  // the optimizer's view: this rank's owned ranges (stage 0: every element)
    Registry sreg;  // this rank's ZeRO slice: the pieces its checkpoint file holds (= oreg for stages 1, 2)
    int64_t *soff;  // stage 0: where sreg's slice of each tensor starts in the full-layout m, v (optim.h)
    float *flat;    // [Z.flat_numel] gradients / parameters in the flat layout (CPU only)
    float *shard;   // [Z.shard_numel] this rank's slice of the summed gradient (CPU only)
    float *pshard;  // [Z.shard_numel] this rank's slice of the updated parameters (CPU only)
    TmDp *cu;       // CUDA: the device-side reductions, step and gather (train_model.h)
} Dp;

static void reg_copy(Registry *dst, const Registry *src) {
    *dst = *src;
    dst->cap = src->n;
    dst->t = dl_malloc((size_t)(src->n ? src->n : 1) * sizeof(TensorInfo));
    memcpy(dst->t, src->t, (size_t)src->n * sizeof(TensorInfo));
}

static int dp_init(Dp *d, const TrainConfig *c, const OptimConfig *oc, DlError *e) {
    memset(d, 0, sizeof *d);
    d->g = c->dist;
    d->rank = dist_rank(c->dist), d->world = dist_world(c->dist), d->stage = c->zero_stage;
    if (zero_optim_check(oc, d->world, d->stage, e) ||
        zero_layout_build(&d->Z, c->reg, d->world, d->stage, c->zero_bucket_bytes, e))
        return dl_fail_prefix(e, "%s: ", c->stage_name);
    reg_copy(&d->oreg, c->reg);
    reg_copy(&d->sreg, c->reg);
    for (int k = 0; k < d->Z.n_seg; k++) {  // the rank's slice at any stage (zero_apply_shards: all at stage 0)
        int64_t b = 0, en = 0;
        zero_seg_owned(&d->Z, k, d->rank, &b, &en);
        d->sreg.t[d->Z.seg[k].tensor].shard_begin = b;
        d->sreg.t[d->Z.seg[k].tensor].shard_end = en;
    }
    if (d->stage > 0) zero_apply_shards(&d->Z, &d->oreg, d->rank);
    d->soff = dl_calloc((size_t)(c->reg->n ? c->reg->n : 1), sizeof(int64_t));
    for (int i = 0; i < c->reg->n; i++) d->soff[i] = c->reg->t[i].offset + d->sreg.t[i].shard_begin;
    if (c->device != TM_CUDA) {  // CUDA reduces and gathers in the device buffers (tm_dp_*)
        d->flat = dl_calloc((size_t)d->Z.flat_numel, sizeof(float));
        d->shard = dl_calloc((size_t)d->Z.shard_numel, sizeof(float));
        d->pshard = dl_calloc((size_t)d->Z.shard_numel, sizeof(float));
    }
    return 0;
}

static void dp_free(Dp *d) {
    tm_dp_free(d->cu);
    zero_layout_free(&d->Z);
    reg_free(&d->oreg);
    reg_free(&d->sreg);
    free(d->soff);
    free(d->flat);
    free(d->shard);
    free(d->pshard);
}

// Sums this rank's gradient (registry layout, all trainable elements) into its shard of the flat space:
// accumulate = add to the shard (ZeRO-2, micro-batches after the first).
static int dp_reduce_scatter(Dp *d, const float *grads, bool accumulate, DlError *e) {
    zero_pack(&d->Z, grads, d->flat);
    // (CUDA: tm_dp_micro / tm_dp_step reduce each bucket slice in the device gradient buffer instead)
    return zdist_reduce_scatter(d->g, &d->Z, d->flat, d->shard, accumulate, e);
}

// The optimizer step of a data-parallel rank, after its micro-batches (see train_loop.h). loss: global.
static int dp_step(Dp *d, Optim *o, float *params, float *grads, double loss, OptimResult *r, DlError *e) {
    if (d->stage < 2 && dp_reduce_scatter(d, grads, false, e)) return -1;
    if (d->stage == 0) {  // all-reduce (= reduce-scatter + all-gather); every rank updates every element
        if (zdist_all_gather(d->g, &d->Z, d->shard, d->flat, e)) return -1;
        zero_unpack(&d->Z, d->flat, grads);
        optim_step(o, params, grads, loss, r);
        return 0;
    }
    zero_shard_unpack(&d->Z, d->rank, d->shard, grads);
    double sq = 0;
    if (zdist_all_reduce_f64(d->g, zero_local_sq_norm(&d->oreg, grads), &sq, e)) return -1;
    zero_optim_step(o, d->world, params, grads, loss, sq, r);
    zero_shard_pack(&d->Z, d->rank, params, d->pshard);
    if (zdist_all_gather(d->g, &d->Z, d->pshard, d->flat, e)) return -1;
    zero_unpack(&d->Z, d->flat, params);
    return 0;
}

// Sums n doubles over the ranks (in rank order: the same result on every rank).
static int dp_sum(Dp *d, double *x, int n, DlError *e) {
    double *all = dl_malloc((size_t)d->world * (size_t)n * sizeof(double));
    int rc = dist_allgather(d->g, x, (size_t)n * sizeof(double), all, e);
    if (rc == 0)
        for (int i = 0; i < n; i++) {
            double t = 0;
            for (int q = 0; q < d->world; q++) t += all[(size_t)q * (size_t)n + (size_t)i];
            x[i] = t;
        }
    free(all);
    return rc;
}

static void loop_free(Loop *L) {
    if (L->grads) tm_grads_free(L->student, L->grads);
    tm_free(L->student);
    tm_free(L->teacher);
    free(L->b.tokens);
    free(L->b.targets);
    free(L->b.mask);
    free(L->b.reset);
}

// Loss-spike recovery state of a loop (optim.h, spike_rollbacks): saved in every checkpoint so that a resume
// continues it exactly.
typedef struct {
    int rollbacks;  // done so far in this loop (the lr is c->opt.lr x spike_lr_factor^rollbacks)
    int skips;      // steps skipped in a row up to now
} Spike;

static void fill_state(const TrainConfig *c, const Optim *o, BatchSource *src, int64_t step, int64_t tokens, bool done,
                       const Spike *sp, CkptState *st) {
    ckpt_state_init(st);
    st->stage_index = c->stage_index;
    snprintf(st->stage_name, sizeof st->stage_name, "%s", c->stage_name);
    st->step = c->step_offset + step;
    ckpt_state_set_recipe(st, c->recipe_text);
    ckpt_state_set_int(st, TRAIN_KEY_OFFSET, c->step_offset);
    ckpt_state_set_int(st, TRAIN_KEY_TOTAL, o->cfg.total_steps);
    ckpt_state_set_int(st, TRAIN_KEY_TOKENS, tokens);
    ckpt_state_set_int(st, TRAIN_KEY_GLOBAL_ACCUM, o->cfg.grad_accum);
    ckpt_state_set_int(st, TRAIN_KEY_DONE, done);
    ckpt_state_set_int(st, TRAIN_KEY_ROLLBACKS, sp->rollbacks);
    ckpt_state_set_int(st, TRAIN_KEY_SKIPS, sp->skips);
    uint8_t mix[DL_MAX_LAYERS];
    for (int l = 0; l < c->hc->base.n_layer; l++) mix[l] = (uint8_t)c->hc->mixer[l];
    ckpt_state_set_blob(st, TRAIN_KEY_MIXERS, mix, c->hc->base.n_layer);
    if (src->save) src->save(src->ctx, st);
    if (c->annotate) c->annotate(c->annotate_ctx, st);
}

static int save(const TrainConfig *c, Optim *o, const Dp *d, TrainModel *student, BatchSource *src, int64_t step,
                int64_t tokens, bool done, Spike *sp, TrainResult *res, DlError *e) {
    tm_sync_host(student, o);  // cuda: the device master and moments are the truth
    CkptState st;
    fill_state(c, o, src, step, tokens, done, sp, &st);
    // nothing is pruned during a run of skips (keep_last 0): a rollback needs the last checkpoint before it; the
    // first save after the skips prunes as usual
    const int keep = sp->skips > 0 ? 0 : c->keep_checkpoints;
    int rc;
    if (d) {  // every rank writes its slice of m, v; rank 0 the weights and the manifest, last
        Optim view = *o;
        view.reg = &d->sreg;
        if (d->stage == 0) view.mv_off = d->soff;  // every rank holds all of m, v; each writes its slice
        rc = ckpt_shard_save(d->g, c->run_dir, c->reg, c->params, &view, d->stage, &st, keep, res->last_checkpoint,
                             sizeof res->last_checkpoint, e);
    } else {
        rc = checkpoint_write(c->run_dir, c->reg, c->params, o, &st, keep, res->last_checkpoint, sizeof res->last_checkpoint, e);
    }
    ckpt_state_free(&st);
    return rc;
}

// The checkpoint a rollback returns to: the newest of this loop (steps after step_offset) before step `before`
// that was written outside a run of skips (or before the key existed). Returns whether there is one.
static bool spike_find_good(const TrainConfig *c, int64_t before, char *out, size_t out_n) {
    int64_t *steps = NULL;
    DlError e;
    bool found = false;
    for (int i = checkpoint_list_steps(c->run_dir, c->stage_index, &steps, &e) - 1; i >= 0 && !found; i--) {
        if (steps[i] >= before || steps[i] <= c->step_offset) continue;
        char *p = checkpoint_path(c->run_dir, c->stage_index, steps[i]);
        CkptState st;
        ckpt_state_init(&st);
        int64_t sk = 0;
        found = checkpoint_read_state(p, &st, &e) == 0 && (ckpt_state_get_int(&st, TRAIN_KEY_SKIPS, &sk, &e) || sk == 0);
        ckpt_state_free(&st);
        if (found) snprintf(out, out_n, "%s", p);
        free(p);
    }
    free(steps);
    return found;
}

// The learning rate after n spike rollbacks.
static void spike_lr(const TrainConfig *c, Optim *o, int n) {
    o->cfg.lr = c->opt.lr;
    for (int i = 0; i < n; i++) o->cfg.lr *= c->opt.spike_lr_factor;
}

// Restores weights, optimizer and (with data) the batch position from checkpoint `path` of this loop, and
// the spike state it recorded into *sp_rollbacks / *sp_skips (0 in checkpoints older than the keys); returns
// the loop-local step to continue from, or -1. The global batch is kept: *accum (micro-batches per rank)
// becomes the checkpoint's accum x world / world. A spike rollback reloads without the data position.
static int64_t restore(const TrainConfig *c, const char *path, bool data, Optim *o, int world, int *accum, BatchSource *src,
                       int64_t *tokens, int64_t *sp_rollbacks, int64_t *sp_skips, DlError *e) {
    CkptState st;
    ckpt_state_init(&st);
    int64_t step = -1, off = 0, total = 0;
    if (checkpoint_read_state(path, &st, e)) goto out;
    if (st.stage_index != c->stage_index) {
        dl_fail(e, "%s: written by stage %d (%s), cannot resume stage %d (%s) from it", path, st.stage_index,
                st.stage_name, c->stage_index, c->stage_name);
        goto out;
    }
    if (ckpt_state_get_int(&st, TRAIN_KEY_OFFSET, &off, e) || ckpt_state_get_int(&st, TRAIN_KEY_TOTAL, &total, e) ||
        ckpt_state_get_int(&st, TRAIN_KEY_TOKENS, tokens, e)) {
        dl_fail_prefix(e, "%s: ", path);
        goto out;
    }
    if (off != c->step_offset || total != c->opt.total_steps || st.step < off || st.step > off + total) {
        dl_fail(e, "%s: holds step %lld of a loop over steps [%lld, %lld), but this loop covers [%lld, %lld) (did the "
                   "recipe's steps, epochs or batch change?)",
                path, (long long)st.step, (long long)off, (long long)(off + total), (long long)c->step_offset,
                (long long)(c->step_offset + c->opt.total_steps));
        goto out;
    }
    const CkptBlob *mix = ckpt_state_get_blob(&st, TRAIN_KEY_MIXERS);
    bool same = mix && mix->len == c->hc->base.n_layer;
    for (int l = 0; same && l < c->hc->base.n_layer; l++) same = mix->data[l] == (uint8_t)c->hc->mixer[l];
    if (!same) {
        dl_fail(e, "%s: the checkpoint's layer layout (attention/Mamba per layer) differs from this stage's", path);
        goto out;
    }
    DlError e2;
    int64_t gacc = 0;
    if (ckpt_state_get_int(&st, TRAIN_KEY_GLOBAL_ACCUM, &gacc, &e2) == 0 && gacc != o->cfg.grad_accum) {
        if (gacc % world) {
            dl_fail(e, "%s: written with %lld micro-batches per step over all ranks, which %d ranks cannot split evenly "
                       "(resume on a number of ranks that divides it)", path, (long long)gacc, world);
            goto out;
        }
        dl_info("%s: resuming on %d rank%s: %lld micro-batch%s per rank per step (the checkpoint's global batch)",
                c->stage_name, world, world > 1 ? "s" : "", (long long)(gacc / world), gacc / world > 1 ? "es" : "");
        *accum = (int)(gacc / world);
        o->cfg.grad_accum = (int)gacc;
    }
    if (checkpoint_load_weights(path, c->reg, c->params, 0, e) < 0) goto out;
    // plain or sharded, written on any number of ranks: this rank's owned ranges, or an error
    if (ckpt_shard_load_optim(path, o, e)) goto out;
    if (o->st.step != st.step - off) {
        dl_fail(e, "%s: optimizer step %lld does not match checkpoint step %lld", path, (long long)o->st.step,
                (long long)(st.step - off));
        goto out;
    }
    DlError e3;
    if (ckpt_state_get_int(&st, TRAIN_KEY_ROLLBACKS, sp_rollbacks, &e3)) *sp_rollbacks = 0;
    if (ckpt_state_get_int(&st, TRAIN_KEY_SKIPS, sp_skips, &e3)) *sp_skips = 0;
    if (data && src->restore && src->restore(src->ctx, &st, e)) {
        dl_fail_prefix(e, "%s: restoring the data position: ", path);
        goto out;
    }
    step = st.step - off;
out:
    ckpt_state_free(&st);
    return step;
}

// Rows counted by the MSE terms and their scale: weight / (counted rows x d x compared layers).
static double mse_scale(const TrainConfig *c, const TrainBatch *b, double weight) {
    int n_cmp = 0;
    for (int l = 0; l < c->hc->base.n_layer; l++) n_cmp += c->hc->mixer[l] != MIXER_ATTN;
    int64_t counted = 0;
    for (int64_t i = 0; i < b->B * b->T; i++) counted += b->mask[i] != 0;
    if (!n_cmp || !counted) return 0;
    return weight / ((double)counted * (double)c->hc->base.d_model * n_cmp);
}

// Mean squared difference of the student's and the teacher's hidden states after every Mamba layer of the
// student; adds its gradient. Returns the (weighted) term.
static double hidden_mse(const TrainConfig *c, Loop *L, double weight) {
    const double scale = mse_scale(c, &L->b, weight);
    if (scale == 0) return 0;
    double total = 0;
    for (int l = 0; l < c->hc->base.n_layer; l++)
        if (c->hc->mixer[l] != MIXER_ATTN) total += tm_mse_hidden(L->student, l + 1, L->teacher, L->b.mask, scale);
    return total;
}

// Teacher-forced per-layer alignment (the loss is MSE only): each Mamba layer l of the student gets the
// teacher's hidden state l as input and is trained to reproduce the teacher's hidden state l+1, one layer
// at a time (forward of that layer, MSE, backward into its own parameters). Returns the weighted MSE.
static int align_layers(const TrainConfig *c, Loop *L, double weight, double *out, DlError *e) {
    const double scale = mse_scale(c, &L->b, weight);
    double total = 0;
    for (int l = 0; scale != 0 && l < c->hc->base.n_layer; l++) {
        if (c->hc->mixer[l] == MIXER_ATTN) continue;
        if (tm_forward_layer_from(L->student, L->b.tokens, L->b.reset, l, L->teacher, e)) return -1;
        total += tm_mse_hidden(L->student, l + 1, L->teacher, L->b.mask, scale);
        tm_backward(L->student, L->grads);
    }
    *out = total;
    return 0;
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
    const TmDevice dev = c->device == TM_CUDA ? TM_CUDA : TM_CPU;
    if (dev == TM_CUDA && cached)
        return dl_fail(e, "%s: teacher_logits = \"cache\" is not supported on device = \"cuda\" (the online teacher is "
                          "faster there: remove teacher_logits)", c->stage_name);
    const int world = c->dist ? dist_world(c->dist) : 1, rank = c->dist ? dist_rank(c->dist) : 0;
    if (dev == TM_CUDA && world > 1 && !c->nccl)
        return dl_fail(e, "%s: data parallel on CUDA runs over NCCL, which this build or run does not have", c->stage_name);
    int accum = c->opt.grad_accum;  // micro-batches per rank per step
    OptimConfig oc = c->opt;
    oc.grad_accum = accum * world;  // the optimizer averages over every micro-batch of every rank
    Dp dp, *d = NULL;
    if (world > 1) {  // on CUDA too: the checkpoint layout, the sums of the step's numbers, the stop flag
        if (dp_init(&dp, c, &oc, e)) {
            dp_free(&dp);
            return -1;
        }
        d = &dp;
    }
    Optim o;
    if (optim_init(&o, &oc, d ? &dp.oreg : c->reg, e)) {
        if (d) dp_free(d);
        return dl_fail_prefix(e, "%s: ", c->stage_name);
    }
    Loop L;
    memset(&L, 0, sizeof L);
    int rc = -1;
    FILE *mem_log = dev == TM_CUDA && rank == 0 ? stderr : NULL;
    if (mem_log) dl_info("%s: student on the GPU:", c->stage_name);
    L.student = tm_new(dev, c->hc, c->reg, c->params, B, T,
                       TM_TRAIN | (need_teacher && !align && c->w.kl + c->w.rkl != 0 ? TM_TEACHER_KL : 0) |
                           (c->recompute_mlp ? TM_RECOMPUTE_MLP : 0), mem_log, e);
    if (!L.student) goto out;
    if (need_teacher) {
        if (mem_log) dl_info("%s: teacher on the GPU:", c->stage_name);
        if (c->teacher_shard && dev == TM_CUDA)  // (teacher_shard.h: bitwise the same teacher)
            L.teacher = tm_new_sharded_teacher(c->teacher_hc, c->teacher_reg, c->teacher_params, B, T,
                                               c->mse != 0 ? TM_KEEP_HIDDEN : 0, rank, world, c->nccl, mem_log, e);
        else
            L.teacher = tm_new(dev, c->teacher_hc, c->teacher_reg, (float *)c->teacher_params, B, T,
                               TM_FROZEN | (c->mse != 0 ? TM_KEEP_HIDDEN : 0), mem_log, e);
        if (!L.teacher) goto out;
    }
    L.grads = tm_grads_new(L.student);
    if (d && dev == TM_CUDA && (!(d->cu = tm_dp_new(L.student, &o, &d->Z, rank, d->g, c->nccl, c->dp_overlap, e)) ||
                                tm_dp_stage_grads(d->cu, &L.grads, c->dp_stage_grads && !align, e))) {
        dl_fail_prefix(e, "%s: ", c->stage_name);
        goto out;
    }
    L.b = (TrainBatch){B, T, dl_malloc((size_t)(B * T) * 4), dl_malloc((size_t)(B * T) * 4), dl_malloc((size_t)(B * T)),
                       dl_malloc((size_t)(B * T))};
    int64_t step = 0, tokens = 0;
    Spike sp = {0};
    if (c->resume_from) {
        int64_t rb = 0, sk = 0;
        step = restore(c, c->resume_from, true, &o, world, &accum, src, &tokens, &rb, &sk, e);
        if (step < 0) goto out;
        sp.rollbacks = res->rollbacks = (int)rb, sp.skips = (int)sk;
        spike_lr(c, &o, sp.rollbacks);
        tm_load_host(L.student, &o);
        dl_info("%s: resumed at step %lld of %lld from %s", c->stage_name, (long long)(c->step_offset + step),
                (long long)(c->step_offset + o.cfg.total_steps), c->resume_from);
    }
    const int64_t total = o.cfg.total_steps;
    if (d)
        dl_info("%s: data parallel over %d ranks, ZeRO-%d, global batch %lld x %d x %d rows", c->stage_name, world,
                d->stage, (long long)B, accum, world);
    const int max_skips = c->max_consecutive_skips > 0 ? c->max_consecutive_skips : 25;
    Progress prog;
    progress_begin(&prog, c->progress_label ? c->progress_label : c->stage_name, c->step_offset + step, c->step_offset + total);
    double t_run = dl_now();
    int64_t tokens_run = 0, steps_run = 0;
    TmLoss ls = {.w = c->w, .teacher = L.teacher};
    if (dev == TM_CUDA && rank == 0) {  // the student's with its fp32 AdamW moments (this rank's share under ZeRO-1/2)
        const double gib = 1073741824.0, sb = tm_device_bytes(L.student) + tm_dp_moment_bytes(&o),
                     tb = L.teacher ? tm_device_bytes(L.teacher) : 0;
        dl_info("%s: GPU memory of this loop: %.2f GiB (student %.2f, teacher %.2f)", c->stage_name, (sb + tb) / gib,
                sb / gib, tb / gib);
    }
    for (; step < total; step++) {
        double t0 = dl_now();
        tm_grads_zero(L.student, L.grads);  // every trainable tensor whole (a ZeRO rank sums its full local gradient)
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
                goto micro_done;
            }
            if (cached) {
                ls.teacher_logits = src->teacher_logits(src->ctx);
                ls.teacher = NULL;
            }
            if (L.teacher && tm_forward(L.teacher, L.b.tokens, L.b.reset, e)) goto fail_batch;
            if (align) {
                double m = 0;
                if (align_layers(c, &L, c->mse, &m, e)) goto fail_batch;
                loss += m, mse += m;
                for (int64_t i = 0; i < B * T; i++) step_tokens += L.b.mask[i] != 0;
                goto micro_done;
            }
            if (tm_forward(L.student, L.b.tokens, L.b.reset, e)) goto fail_batch;
            LossParts lp = tm_loss(L.student, L.b.targets, L.b.mask, &ls, L.grads, NULL);
            double m = c->mse != 0 ? hidden_mse(c, &L, c->mse) : 0;
            if (d && d->cu && tm_dp_before_backward(d->cu, L.grads, a == accum - 1, e)) goto fail_dist;  // overlap (opt-in)
            tm_backward(L.student, L.grads);
            loss += lp.loss + m;
            ce += lp.ce, kl += lp.kl, rkl += lp.rkl, mse += m;
            step_tokens += (int64_t)lp.n_tokens;
        micro_done:
            if (d && d->stage == 2 && d->cu) {  // ZeRO-2 on CUDA: onto the owners now; keep what this rank owns
                if (tm_dp_micro(d->cu, L.grads, e)) goto fail_dist;
            } else if (d && d->stage == 2) {  // ZeRO-2: into the shard accumulator now; the full buffer is staging only
                if (dp_reduce_scatter(d, L.grads, a > 0, e)) goto fail_dist;
                tm_grads_zero(L.student, L.grads);
            }
        }
        bool stop_now = c->stop && *c->stop;
        OptimResult r;
        if (d) {
            // the step's numbers over all ranks; a stop requested on any rank stops them all at this step
            double sum[11] = {loss, ce, kl, rkl, mse, (double)step_tokens, stop_now ? 1 : 0};
            for (int i = 0; i < 4; i++) sum[7 + i] = custom[i].value;
            if (dp_sum(d, sum, 11, e)) goto fail_dist;
            loss = sum[0], ce = sum[1], kl = sum[2], rkl = sum[3], mse = sum[4];
            step_tokens = (int64_t)sum[5], stop_now = sum[6] > 0;
            for (int i = 0; i < 4; i++) custom[i].value = sum[7 + i];
        }
        const int gaccum = accum * world;
        loss /= gaccum, ce /= gaccum, kl /= gaccum, rkl /= gaccum, mse /= gaccum;
        if (sp.rollbacks == 0 && c->step_offset + step + 1 >= c->test_spike[0] && c->step_offset + step + 1 <= c->test_spike[1])
            loss = NAN;
        if (d && d->cu) {
            if (tm_dp_step(d->cu, L.grads, loss, &r, e)) goto fail_dist;
        } else if (d) {
            if (dp_step(d, &o, c->params, L.grads, loss, &r, e)) goto fail_dist;
        } else {
            if (tm_optim_step(L.student, &o, L.grads, loss, &r, e)) goto out_prog;
        }
        bool skipped = r.outcome != OPTIM_APPLIED;
        int64_t gstep = c->step_offset + step + 1;
        tokens += B * T * gaccum;
        tokens_run += B * T * gaccum;
        steps_run++;
        double dt = dl_now() - t0, tps = dt > 0 ? (double)(B * T * gaccum) / dt : 0;
        res->last_loss = loss;
        if (skipped) {
            res->n_skipped++;
            sp.skips++;
            if (rank == 0)
                dl_warn("%s step %lld: %s (loss %g, gradient norm %g, running median %g); weights unchanged", c->stage_name,
                    (long long)gstep, optim_outcome_name(r.outcome), loss, r.grad_norm, r.median_norm);
        } else {
            sp.skips = 0;
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
                for (int i = 0; i < np; i++) parts[i] = (MetricPart){custom[i].name, custom[i].value / gaccum};
            }
            MetricsRow row = {.stage_index = c->stage_index, .stage = c->stage_name, .step = gstep,
                              .total_steps = c->step_offset + total, .loss = loss, .parts = parts, .n_parts = np,
                              .lr = r.lr, .grad_norm = r.grad_norm, .tokens = step_tokens, .tokens_per_s = tps,
                              .skipped = skipped, .skip_reason = skipped ? optim_outcome_name(r.outcome) : NULL};
            if (metrics_write(c->metrics, &row, e)) goto out_prog;
        }
        if (c->on_step) c->on_step(c->on_step_ctx, gstep, loss, &r);
        progress_update(&prog, gstep, loss, tokens_run / (dl_now() - t_run));
        char good[512];
        if (sp.skips >= max_skips && sp.rollbacks < o.cfg.spike_rollbacks && spike_find_good(c, gstep, good, sizeof good)) {
            // a loss spike: back to the last good checkpoint with a smaller step, on the batches after the spike
            int64_t rb = 0, sk = 0, from = gstep - sp.skips + 1;
            int64_t back = restore(c, good, false, &o, world, &accum, src, &tokens, &rb, &sk, e);
            if (back < 0) {
                dl_fail_prefix(e, "%s: rolling back after %d skipped steps: ", c->stage_name, sp.skips);
                goto out_prog;
            }
            spike_lr(c, &o, ++sp.rollbacks);
            res->rollbacks = sp.rollbacks;
            tm_load_host(L.student, &o);
            if (rank == 0) {
                checkpoint_drop_after(c->run_dir, c->stage_index, c->step_offset + back);
                dl_warn("%s: steps %lld-%lld were skipped; loss spike: rollback %d of %d to %s (step %lld), learning rate x%g "
                        "from here, the batches since step %lld are not replayed",
                        c->stage_name, (long long)from, (long long)gstep, sp.rollbacks, o.cfg.spike_rollbacks, good,
                        (long long)(c->step_offset + back), o.cfg.lr / c->opt.lr, (long long)(c->step_offset + back));
            }
            sp.skips = 0;
            step = back - 1;  // (the loop's step++ continues at the checkpoint's step)
            continue;
        }
        if (sp.skips >= max_skips) {
            dl_fail(e, "%s: %d steps in a row were skipped (last: %s at step %lld); training diverged%s. The last good "
                       "checkpoint is kept: --resume with more optimizer.spike_rollbacks (rolls back to it), start a new "
                       "run with a lower optimizer.lr for this stage, or check the data",
                    c->stage_name, sp.skips, optim_outcome_name(r.outcome), (long long)gstep,
                    sp.rollbacks ? " again after the rollbacks optimizer.spike_rollbacks allows" : "");
            goto out_prog;
        }
        bool last = step + 1 == total, interrupt = stop_now;
        if (last || interrupt || (c->checkpoint_every > 0 && (step + 1) % c->checkpoint_every == 0)) {
            if (save(c, &o, d, L.student, src, step + 1, tokens, last, &sp, res, e)) goto out_prog;
        }
        res->steps_done = step + 1;
        if (interrupt && !last) {
            res->interrupted = true;
            dl_info("\n%s: stopped at step %lld; checkpoint %s", c->stage_name, (long long)gstep, res->last_checkpoint);
            break;
        }
        if (c->pause_after > 0 && steps_run == c->pause_after) raise(SIGSTOP);
        if (c->stop_after > 0 && steps_run >= c->stop_after && !last) {
            res->stopped = true;
            break;
        }
    }
    res->steps_done = (res->stopped || res->interrupted) ? step + 1 : total;
    res->tokens_per_s = tokens_run / (dl_now() - t_run + 1e-9);
    rc = 0;
    goto out_prog;
fail_batch:  // a batch the model refused (e.g. a token id out of range): e names it
    dl_fail_prefix(e, "%s, step %lld: ", c->stage_name, (long long)(c->step_offset + step + 1));
    goto out_prog;
fail_dist:  // a collective failed: a rank died or timed out (e names it); no checkpoint of this step
    dl_fail_prefix(e, "%s, step %lld: ", c->stage_name, (long long)(c->step_offset + step + 1));
out_prog:
    progress_end(&prog);
out:
    loop_free(&L);
    optim_free(&o);
    if (d) dp_free(d);
    return rc;
}
