// train_model.c: see train_model.h. Each call is a switch over the two engines; nothing else lives here.
#include "distill/train_model.h"

#include <math.h>
#include <string.h>

#include "distill/engine.h"
#ifdef DISTILL_CUDA
#include "kernels/engine/engine_cuda.h"
#include "kernels/engine/grad_stage.h"
#include "kernels/engine/teacher_shard.h"
#endif
#ifdef DISTILL_NCCL
#include "distill/nccl_comm.h"
#endif

struct TrainModel {
    TmDevice dev;
    const HybridConfig *h;
    const Registry *r;
    float *params;  // host
    int64_t B, T;
    Engine *cpu;
    float *dh;      // CPU: [B*T, d] hidden-gradient scratch of tm_mse_hidden (lazy)
#ifdef DISTILL_CUDA
    EngineCuda *cu;
    EngineCudaOptim *opt;  // made at the first tm_optim_step / tm_load_host with that Optim
    Optim *opt_host;
    int64_t grad_bytes;
    GradStage *gs;       // ZeRO-2 staged gradients (tm_dp_stage_grads): the buffer tm_grads_* then handle
    bool gs_armed;       // the running backward was announced (tm_dp_before_backward)
    TeacherShard *ts;    // tm_new_sharded_teacher: the engine's weights (rank's pieces, gathered per layer)
#endif
};

TrainModel *tm_new(TmDevice dev, const HybridConfig *h, const Registry *r, float *params, int64_t B, int64_t T,
                   int flags, FILE *log, DlError *e) {
    TrainModel *m = dl_calloc(1, sizeof *m);
    m->dev = dev, m->h = h, m->r = r, m->params = params, m->B = B, m->T = T;
    if (dev == TM_CPU) {
        int ef = (flags & TM_TRAIN ? ENGINE_TRAIN : 0) | (flags & TM_KEEP_HIDDEN ? ENGINE_KEEP_HIDDEN : 0);
        if (!(m->cpu = engine_new(h, r, params, B, T, ef, e))) goto fail;
        return m;
    }
#ifdef DISTILL_CUDA
    int cf = (flags & TM_TRAIN ? ECU_TRAIN : 0) | (flags & TM_KEEP_HIDDEN ? ECU_KEEP_HIDDEN : 0) |
             (flags & TM_TEACHER_KL ? ECU_TEACHER_KL : 0) | (flags & TM_FROZEN ? ECU_NO_MASTER : 0) |
             (flags & TM_RECOMPUTE_MLP ? ECU_RECOMPUTE_MLP : 0);
    if (!(m->cu = engine_cuda_new(h, r, params, B, T, cf, flags & TM_FP32 ? DT_F32 : DT_BF16, 0, log, e))) goto fail;
    return m;
#else
    (void)log;
    dl_fail(e, "this build has no CUDA (rebuild where nvcc is installed)");
#endif
fail:
    free(m);
    return NULL;
}

TrainModel *tm_new_sharded_teacher(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t T,
                                   int flags, int rank, int world, struct NcclComm *c, FILE *log, DlError *e) {
#ifdef DISTILL_CUDA
    if (world > 1 && !c) {
        dl_fail(e, "the sharded teacher (hardware.teacher = \"sharded\") over %d ranks needs the run's NCCL communicator", world);
        return NULL;
    }
    void *stream = NULL;
    TeacherShardGather gather = teacher_shard_copy_gather;
#ifdef DISTILL_NCCL
    if (c && !(stream = nccl_comm_stream(c, e))) return NULL;
    if (c) gather = tshard_nccl_gather;
#endif
    TrainModel *m = dl_calloc(1, sizeof *m);
    m->dev = TM_CUDA, m->h = h, m->r = r, m->params = (float *)params, m->B = B, m->T = T;
    const int cf = ECU_NO_MASTER | ECU_EXTERN_WEIGHTS | (flags & TM_KEEP_HIDDEN ? ECU_KEEP_HIDDEN : 0);
    if (!(m->cu = engine_cuda_new(h, r, NULL, B, T, cf, DT_BF16, 0, log, e)) ||
        !(m->ts = teacher_shard_new(m->cu, r, h->base.n_layer, rank, world, params, gather, c, stream, log, e))) {
        dl_fail_prefix(e, "sharded teacher: ");
        tm_free(m);
        return NULL;
    }
    return m;
#else
    (void)h, (void)r, (void)params, (void)B, (void)T, (void)flags, (void)rank, (void)world, (void)c, (void)log;
    dl_fail(e, "the sharded teacher (hardware.teacher = \"sharded\") needs a CUDA build");
    return NULL;
#endif
}

void tm_free(TrainModel *m) {
    if (!m) return;
    engine_free(m->cpu);
    free(m->dh);
#ifdef DISTILL_CUDA
    teacher_shard_free(m->ts);
    engine_cuda_optim_free(m->opt);
    grad_stage_free(m->gs);
    engine_cuda_free(m->cu);
#endif
    free(m);
}

TmDevice tm_device(const TrainModel *m) { return m->dev; }

int tm_forward(TrainModel *m, const int32_t *tokens, const uint8_t *reset, DlError *e) {
#ifdef DISTILL_CUDA
    if (m->cu) return engine_cuda_forward(m->cu, tokens, reset, e);
#endif
    (void)e;
    engine_forward(m->cpu, tokens, reset);
    return 0;
}

int tm_forward_layer_from(TrainModel *m, const int32_t *tokens, const uint8_t *reset, int l, const TrainModel *src,
                          DlError *e) {
    if (src->dev != m->dev) return dl_fail(e, "teacher forcing: the two models are on different devices");
#ifdef DISTILL_CUDA
    if (m->cu) return engine_cuda_forward_range(m->cu, tokens, reset, l, engine_cuda_hidden(src->cu, l), l + 1, e);
#endif
    engine_forward_range(m->cpu, tokens, reset, l, engine_hidden(src->cpu, l), l + 1);
    return 0;
}

LossParts tm_loss(TrainModel *m, const int32_t *targets, const uint8_t *mask, const TmLoss *spec, float *grads,
                  double *seq_logprob) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        if (spec->teacher_logits)  // the stages refuse this before training starts (stage_common.c)
            dl_die(DL_EXIT_RUNTIME, "tm_loss: a cached teacher (teacher_logits = \"cache\") is not supported on CUDA");
        LossSpecCuda ls = {.w = spec->w, .norm = spec->norm, .teacher = spec->teacher ? spec->teacher->cu : NULL,
                           .seq_weight = spec->seq_weight};
        return engine_cuda_loss(m->cu, targets, mask, &ls, grads, seq_logprob);
    }
#endif
    LossSpec ls = {.w = spec->w, .norm = spec->norm, .teacher_logits = spec->teacher_logits,
                   .teacher = spec->teacher ? spec->teacher->cpu : NULL, .seq_weight = spec->seq_weight};
    return engine_loss(m->cpu, targets, mask, &ls, grads, seq_logprob);
}

double tm_mse_hidden(TrainModel *m, int i, const TrainModel *t, const uint8_t *mask, double scale) {
#ifdef DISTILL_CUDA
    if (m->cu) return engine_cuda_mse_hidden(m->cu, i, engine_cuda_hidden(t->cu, i), mask, scale, true);
#endif
    const int64_t rows = m->B * m->T, d = m->h->base.d_model;
    if (!m->dh) m->dh = dl_malloc((size_t)(rows * d) * sizeof(float));
    memset(m->dh, 0, (size_t)(rows * d) * sizeof(float));
    double v = mse_rows(rows, d, engine_hidden(m->cpu, i), engine_hidden(t->cpu, i), mask, scale, m->dh);
    engine_add_hidden_grad(m->cpu, i, m->dh, 1.0f);
    return v;
}

void tm_logits(const TrainModel *m, int64_t r0, int64_t r1, float *out) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        engine_cuda_logits_host(m->cu, r0, r1, out);
        return;
    }
#endif
    engine_logits(m->cpu, r0, r1, out);
}

void tm_backward(TrainModel *m, float *grads) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        if (m->gs && !m->gs_armed)  // the staged pages are mapped by the announced backward's reports only
            dl_die(DL_EXIT_INPUT, "ZeRO-2 staged gradients (hardware.stage_grads, DISTILL_DP_STAGE_GRADS) need every backward "
                                   "announced to the data-parallel reductions; this stage's loss (a custom loss) runs its "
                                   "own: set hardware.stage_grads = false (or DISTILL_DP_STAGE_GRADS=0)");
        engine_cuda_backward(m->cu, grads);
        return;
    }
#endif
    engine_backward(m->cpu, grads);
}

float *tm_grads_new(TrainModel *m) {
#ifdef DISTILL_CUDA
    if (m->cu) {  // the engine's compact layout: the trained tensors only
        m->grad_bytes = engine_cuda_grads_numel(m->cu) * 4;
        return engine_cuda_grads_new(m->cu);
    }
#endif
    return dl_calloc((size_t)m->r->numel, sizeof(float));
}

int64_t tm_grads_numel(const TrainModel *m) {
#ifdef DISTILL_CUDA
    if (m->cu) return engine_cuda_grads_numel(m->cu);
#endif
    return m->r->numel;
}

void tm_grads_free(TrainModel *m, float *grads) {
#ifdef DISTILL_CUDA
    if (m && m->cu) {
        if (m->gs && grads == grad_stage_ptr(m->gs)) {
            grad_stage_free(m->gs);
            m->gs = NULL;
            return;
        }
        engine_cuda_dfree(grads);
        return;
    }
#endif
    (void)m;
    free(grads);
}

void tm_grads_zero(TrainModel *m, float *grads) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        DlError e;
        if (m->gs && grads == grad_stage_ptr(m->gs)) {
            if (grad_stage_zero(m->gs, engine_cuda_stream(m->cu), &e)) dl_die(DL_EXIT_RUNTIME, "%s", e.msg);
            return;
        }
        engine_cuda_zero_trainable(m->cu, grads);
        return;
    }
#endif
    for (int i = 0; i < m->r->n; i++)
        if (m->r->t[i].trainable) memset(grads + m->r->t[i].offset, 0, (size_t)m->r->t[i].numel * sizeof(float));
}

void tm_grads_to_host(const TrainModel *m, const float *grads, float *host) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        if (m->gs && grads == grad_stage_ptr(m->gs))
            dl_die(DL_EXIT_RUNTIME, "tm_grads_to_host: staged ZeRO-2 gradients have pages without memory (diagnostics "
                                    "need hardware.stage_grads = false)");
        engine_cuda_grads_to_host(m->cu, grads, host);
        return;
    }
#endif
    memset(host, 0, (size_t)m->r->numel * sizeof(float));
    for (int i = 0; i < m->r->n; i++)
        if (m->r->t[i].trainable)
            memcpy(host + m->r->t[i].offset, grads + m->r->t[i].offset, (size_t)m->r->t[i].numel * sizeof(float));
}

#ifdef DISTILL_CUDA
static int cuda_optim(TrainModel *m, Optim *o, DlError *e) {
    if (m->opt && m->opt_host == o) return 0;
    engine_cuda_optim_free(m->opt);
    m->opt_host = o;
    if (!(m->opt = engine_cuda_optim_attach(m->cu, o, o->cfg.moments_bf16 ? DT_BF16 : DT_F32, e))) return -1;
    return 0;
}
#endif

int tm_optim_step(TrainModel *m, Optim *o, float *grads, double loss, OptimResult *r, DlError *e) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        if (cuda_optim(m, o, e)) return -1;
        engine_cuda_optim_step(m->opt, grads, loss, r);
        return 0;
    }
#endif
    (void)e;
    optim_step(o, m->params, grads, loss, r);
    return 0;
}

void tm_sync_host(TrainModel *m, Optim *o) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        engine_cuda_get_params(m->cu, m->params);
        if (o && m->opt && m->opt_host == o) engine_cuda_optim_pull(m->opt);
    }
#endif
    (void)m, (void)o;
}

void tm_load_host(TrainModel *m, Optim *o) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        engine_cuda_set_params(m->cu, m->params);
        DlError e;
        if (o) {
            if (cuda_optim(m, o, &e)) dl_die(DL_EXIT_RUNTIME, "%s", e.msg);
            engine_cuda_optim_push(m->opt);
        }
    }
#endif
    (void)m, (void)o;
}

void *tm_stream(TrainModel *m) {
#ifdef DISTILL_CUDA
    if (m->cu) return engine_cuda_stream(m->cu);
#endif
    (void)m;
    return NULL;
}

double tm_device_bytes(const TrainModel *m) {
#ifdef DISTILL_CUDA
    if (m->cu) {
        double w = 0, a = 0;
        engine_cuda_memory(m->cu, &w, &a);
        return w + a + (double)m->grad_bytes + (m->ts ? teacher_shard_bytes(m->ts) : 0);
    }
#endif
    (void)m;
    return 0;
}

bool tm_flash_attention(const TrainModel *m) {
#ifdef DISTILL_CUDA
    if (m->cu) return engine_cuda_cudnn_attention(m->cu);
#endif
    (void)m;
    return false;
}

// ---------------------------------------------------------------- data parallel on CUDA

double tm_dp_moment_bytes(const Optim *o) {
    return 8.0 * (double)(o->mv_compact ? o->mv_numel : reg_trainable_numel(o->reg));
}

struct TmDp {
    TrainModel *m;
    Optim *o;
    DistGroup *g;
    NcclComm *c;
    int stage;
    ZeroRange *slices;  // every rank's slice of every bucket in the gradient buffer (stages 1, 2)
    ZeroRange *pieces;  // every rank's owned piece of every trained tensor in the fp32 master (stages 1, 2)
    int n_slices, n_pieces;
    // overlap with the backward (tm_dp_new's switch; tm_dp_stage_grads turns it on)
    bool overlap;
    int n_bucket;
    int *first;         // [n_bucket + 1] bucket b's ranges in slices: [first[b], first[b + 1])
    int *level;         // [n_bucket] zero_bucket_levels
    void *cst;          // the communicator's stream
    float *grads;       // the buffer the armed backward writes
    bool armed;         // the engine's hook is set: the running backward's buckets go out as they become final
    int launched;       // buckets enqueued on cst by the armed backward
    bool reduced;       // every bucket of the last armed backward was enqueued; the compute stream has not waited yet
    bool failed;        // an NCCL call inside the hook failed: err, reported by tm_dp_micro / tm_dp_step
    DlError err;
    const ZeroLayout *Z;  // the caller's
    int rank;
    struct GradStage *gs;  // tm_dp_stage_grads (owned by the model: m->gs)
};

void tm_dp_free(TmDp *d) {
    if (!d) return;
    free(d->slices);
    free(d->pieces);
    free(d->first);
    free(d->level);
    free(d);
}

bool tm_dp_overlap(const TmDp *d) { return d->overlap; }

#if defined(DISTILL_CUDA) && defined(DISTILL_NCCL)
// Every rank's slice of every bucket in the gradient buffer (split by bucket) and every owned piece of the master.
static int dp_ranges(TmDp *d, DlError *e) {
    const Registry *r = d->m->r;
    const ZeroLayout *Z = d->Z;
    int64_t *goff = dl_malloc((size_t)(r->n ? r->n : 1) * sizeof(int64_t));
    int64_t *moff = dl_malloc((size_t)(r->n ? r->n : 1) * sizeof(int64_t));
    for (int i = 0; i < r->n; i++) {
        goff[i] = engine_cuda_grad_offset(d->m->cu, i);
        moff[i] = engine_cuda_master_offset(d->m->cu, i);
    }
    d->slices = dl_malloc((size_t)zero_slice_ranges_max(Z) * sizeof(ZeroRange));
    d->pieces = dl_malloc((size_t)zero_piece_ranges_max(Z) * sizeof(ZeroRange));
    int rc = zero_slice_ranges_split(Z, goff, d->slices, &d->n_slices, d->first, e);
    if (!rc) rc = zero_piece_ranges(Z, moff, d->pieces, &d->n_pieces, e);
    free(goff);
    free(moff);
    if (rc) {
        free(d->slices), free(d->pieces);
        d->slices = d->pieces = NULL;
        return dl_fail_prefix(e, "data parallel on the device: ");
    }
    return 0;
}

TmDp *tm_dp_new(TrainModel *m, Optim *o, const ZeroLayout *Z, int rank, DistGroup *g, NcclComm *c, bool overlap, DlError *e) {
    if (!m->cu || !c) {
        dl_fail(e, "data parallel on the device: needs a CUDA model and an NCCL communicator");
        return NULL;
    }
    const Registry *r = m->r;
    for (int k = 0; k < Z->n_seg; k++) {  // the optimizer must own exactly this rank's part of the layout
        const TensorInfo *t = &o->reg->t[Z->seg[k].tensor];
        int64_t b = 0, en = t->numel;
        if (Z->stage > 0) zero_seg_owned(Z, k, rank, &b, &en);
        if (b == en) b = en = 0;
        if (t->shard_begin != b || t->shard_end != en) {
            dl_fail(e, "data parallel: the optimizer owns [%lld, %lld) of %s, the ZeRO-%d layout gives rank %d [%lld, %lld)",
                    (long long)t->shard_begin, (long long)t->shard_end, t->name, Z->stage, rank, (long long)b, (long long)en);
            return NULL;
        }
    }
    if (cuda_optim(m, o, e)) return NULL;
    TmDp *d = dl_calloc(1, sizeof *d);
    d->m = m, d->o = o, d->g = g, d->c = c, d->stage = Z->stage, d->Z = Z, d->rank = rank;
    // each bucket's level (host arithmetic); the slices and pieces at ZeRO-1/2 (ZeRO-0: only once overlap asks)
    d->n_bucket = Z->n_bucket;
    d->first = dl_malloc((size_t)(Z->n_bucket + 1) * sizeof(int));
    d->level = dl_malloc((size_t)(Z->n_bucket ? Z->n_bucket : 1) * sizeof(int));
    zero_bucket_levels(Z, r, m->h->base.n_layer, d->level);
    d->overlap = dl_env_switch("DISTILL_DP_OVERLAP", overlap);
    if ((d->stage > 0 || d->overlap) && dp_ranges(d, e)) {
        tm_dp_free(d);
        return NULL;
    }
    if (d->overlap && rank == 0)
        dl_info("data parallel: each bucket's reduction overlapped with the backward (hardware.overlap, %d buckets)",
                Z->n_bucket);
    return d;
}

// Enqueues the reductions of buckets [launched, upto) on the communicator's stream, after everything the
// compute stream holds so far (the backward's writes of those buckets' gradients).
static void dp_launch(TmDp *d, int upto) {
    if (upto <= d->launched || d->failed) return;
    if (nccl_stream_order(d->c, d->cst, engine_cuda_stream(d->m->cu), &d->err)) goto fail;
    for (int b = d->launched; b < upto; b++) {
        const ZeroRange *rg = d->slices + d->first[b];
        const int n = d->first[b + 1] - d->first[b];
        if (d->stage == 0) {  // the bucket's data: its slices are adjacent
            const int64_t off = rg[0].off, end = rg[n - 1].off + rg[n - 1].n;
            if (nccl_all_reduce(d->c, d->grads + off, d->grads + off, end - off, DT_F32, false, d->cst, &d->err)) goto fail;
        } else if (nccl_reduce_ranges(d->c, d->grads, rg, n, d->cst, &d->err)) goto fail;
    }
    d->launched = upto;
    return;
fail:
    d->failed = true;
}

// grad_stage_report's launch: bucket b's slices onto their owners (ZeRO-2).
static int dp_launch_staged(void *ctx, int b, void *comm, DlError *e) {
    TmDp *d = ctx;
    return nccl_reduce_ranges(d->c, d->grads, d->slices + d->first[b], d->first[b + 1] - d->first[b], comm, e);
}

// engine_cuda_backward's progress (EngineCudaGradHook): the buckets whose level it reached go out.
static void dp_hook(void *ctx, int level) {
    TmDp *d = ctx;
    if (d->gs) {  // staged: the next layer's buckets get memory, the final ones go out (grad_stage.h)
        if (!d->failed) {
            const int n = grad_stage_report(d->gs, d->level, level, engine_cuda_stream(d->m->cu), d->cst, dp_launch_staged,
                                            d, &d->err);
            if (n < 0) d->failed = true;
            else d->launched = n;
        }
    } else {
        dp_launch(d, zero_buckets_ready(d->level, d->n_bucket, level));
    }
    if (level < 0) {  // the end of the backward: every bucket went out
        engine_cuda_set_grad_hook(d->m->cu, NULL, NULL);
        d->armed = false;
        d->m->gs_armed = false;
        d->reduced = !d->failed;
    }
}

int tm_dp_before_backward(TmDp *d, float *grads, bool last_micro, DlError *e) {
    if (!d->overlap || (d->stage != 2 && !last_micro)) return 0;
    if (d->armed || d->reduced)
        return dl_fail(e, "data parallel: tm_dp_before_backward twice without tm_dp_micro / tm_dp_step between");
    if (!d->cst && !(d->cst = nccl_comm_stream(d->c, e))) return -1;
    d->grads = grads, d->launched = 0, d->failed = false, d->armed = true;
    if (d->gs) {
        grad_stage_begin(d->gs);
        d->m->gs_armed = true;
    }
    engine_cuda_set_grad_hook(d->m->cu, dp_hook, d);
    return 0;
}

int tm_dp_stage_grads(TmDp *d, float **grads, bool on, DlError *e) {
    if (!dl_env_switch("DISTILL_DP_STAGE_GRADS", on)) return 0;
    if (d->stage != 2)
        return dl_fail(e, "hardware.stage_grads (or DISTILL_DP_STAGE_GRADS=1) stages ZeRO-2's gradients: set hardware.zero = 2 "
                          "(got %d)", d->stage);
    TrainModel *m = d->m;
    const int dev = nccl_comm_device(d->c);
    const int64_t page = grad_stage_page(dev, e);
    if (page < 0) return -1;
    const Registry *r = m->r;
    int64_t *goff = dl_malloc((size_t)(r->n ? r->n : 1) * sizeof(int64_t));
    for (int i = 0; i < r->n; i++) goff[i] = engine_cuda_grad_offset(m->cu, i);
    ZeroStagePlan P;
    const int64_t n = engine_cuda_grads_numel(m->cu);
    int rc = zero_stage_plan(d->Z, r, goff, n, m->h->base.n_layer, d->rank, page, &P, e);
    free(goff);
    if (rc) return -1;
    GradStage *gs = grad_stage_new(&P, n, dev, e);
    if (gs && d->rank == 0)
        dl_info("data parallel: ZeRO-2 staged gradients (hardware.stage_grads): %.3f GiB per GPU instead of %.3f "
                "(%lld permanent pages, %d slots of %lld pages, %lld-element pages)", grad_stage_bytes(gs) / 1073741824.0,
                4.0 * (double)n / 1073741824.0, (long long)P.perm_pages, P.slots, (long long)P.slot_pages, (long long)page);
    zero_stage_plan_free(&P);
    if (!gs) return -1;
    tm_grads_free(m, *grads);
    *grads = grad_stage_ptr(gs);
    m->gs = gs;
    m->grad_bytes = (int64_t)grad_stage_bytes(gs);
    d->gs = gs;
    d->overlap = true;
    return 0;
}

// 1: the last announced backward's reductions were enqueued on the communicator's stream, and the compute stream
// now waits for them; 0: none announced (reduce now); -1: an error (in the hook, or a backward that never ran).
static int dp_join(TmDp *d, float *grads, DlError *e) {
    if (d->failed) {
        d->failed = d->reduced = d->armed = d->m->gs_armed = false;
        engine_cuda_set_grad_hook(d->m->cu, NULL, NULL);
        *e = d->err;
        return -1;
    }
    if (d->armed) {
        engine_cuda_set_grad_hook(d->m->cu, NULL, NULL);
        d->armed = d->m->gs_armed = false;
        return dl_fail(e, "data parallel: tm_dp_before_backward was not followed by a backward");
    }
    if (!d->reduced) return 0;
    d->reduced = false;
    if (grads != d->grads) return dl_fail(e, "data parallel: the overlapped backward wrote another gradient buffer");
    if (nccl_stream_order(d->c, engine_cuda_stream(d->m->cu), d->cst, e)) return -1;
    return 1;
}

int tm_dp_micro(TmDp *d, float *grads, DlError *e) {
    if (d->stage != 2) return 0;
    const int j = dp_join(d, grads, e);
    if (j < 0) return -1;
    if (!j && d->gs)
        return dl_fail(e, "data parallel: ZeRO-2 staged gradients need every backward announced (tm_dp_before_backward)");
    if (!j && nccl_reduce_ranges(d->c, grads, d->slices, d->n_slices, engine_cuda_stream(d->m->cu), e)) return -1;
    if (d->gs) return grad_stage_clear(d->gs, engine_cuda_stream(d->m->cu), e);
    engine_cuda_optim_keep_owned(d->m->opt, grads);
    return 0;
}

int tm_dp_step(TmDp *d, float *grads, double loss, OptimResult *r, DlError *e) {
    TrainModel *m = d->m;
    void *st = engine_cuda_stream(m->cu);
    const int j = d->stage == 2 ? 0 : dp_join(d, grads, e);
    if (j < 0) return -1;
    if (d->stage == 0) {
        if ((!j && nccl_all_reduce(d->c, grads, grads, engine_cuda_grads_numel(m->cu), DT_F32, false, st, e)) ||
            nccl_sync(d->c, st, e))
            return -1;
        engine_cuda_optim_step(m->opt, grads, loss, r);
        return 0;
    }
    if (d->stage == 1 && !j && nccl_reduce_ranges(d->c, grads, d->slices, d->n_slices, st, e)) return -1;
    if (nccl_sync(d->c, st, e)) return -1;
    double sq = 0;
    if (zdist_all_reduce_f64(d->g, engine_cuda_optim_sq_norm(m->opt, grads), &sq, e)) return -1;
    engine_cuda_optim_step_norm(m->opt, grads, loss, zero_global_norm(&d->o->cfg, loss, sq), r);
    if (r->outcome != OPTIM_APPLIED) return 0;  // every rank decided alike (the same global norm)
    if (nccl_bcast_ranges(d->c, engine_cuda_master(m->cu), d->pieces, d->n_pieces, st, e) || nccl_sync(d->c, st, e)) return -1;
    engine_cuda_optim_gathered(m->opt);
    return 0;
}
#else
TmDp *tm_dp_new(TrainModel *m, Optim *o, const ZeroLayout *Z, int rank, DistGroup *g, NcclComm *c, bool overlap, DlError *e) {
    (void)m, (void)o, (void)Z, (void)rank, (void)g, (void)c, (void)overlap;
    dl_fail(e, "data parallel on the device needs CUDA and NCCL, and this build lacks one (rebuild where nvcc and "
               "nccl.h are installed)");
    return NULL;
}
int tm_dp_micro(TmDp *d, float *grads, DlError *e) {
    (void)d, (void)grads;
    return dl_fail(e, "data parallel on the device: not in this build");
}
int tm_dp_step(TmDp *d, float *grads, double loss, OptimResult *r, DlError *e) {
    (void)d, (void)grads, (void)loss, (void)r;
    return dl_fail(e, "data parallel on the device: not in this build");
}
int tm_dp_stage_grads(TmDp *d, float **grads, bool on, DlError *e) {
    (void)d, (void)grads, (void)on, (void)e;
    return 0;
}
int tm_dp_before_backward(TmDp *d, float *grads, bool last_micro, DlError *e) {
    (void)d, (void)grads, (void)last_micro;
    return dl_fail(e, "data parallel on the device: not in this build");
}
#endif
