// gpu_test_zero_optim.cu: the sharded device optimizer of ZeRO-1/2 (engine_cuda_optim with a sharded host Optim,
// engine_cuda.h) on ONE GPU, with R = 2 and 3 simulated ranks: one engine per rank, the NCCL collectives of
// train_model.c's tm_dp_* replaced by host sums and device copies between the engines' buffers, and an
// unsharded engine (engine_cuda_optim_step) as the reference. A small bf16 hybrid (2 attention + 2 Mamba-1
// layers, tied embeddings), every tensor trained, 2 KiB ZeRO buckets (many buckets, tensors cut between ranks):
//   1. zero_slice_ranges / zero_piece_ranges accept the engine's gradient and master offsets;
//   2. engine_cuda_optim_keep_owned zeroes exactly the elements a rank does not own;
//   3. 6 AdamW steps (weight decay, grad_accum 2): each rank holds the summed gradient in its owned ranges
//      (and its own local gradient elsewhere, as after a reduction), the global norm from the ranks' owned
//      squared norms, engine_cuda_optim_step_norm, the owned master pieces copied to the other ranks,
//      engine_cuda_optim_gathered. Clipping off: every rank's fp32 master equals the reference's bit for bit,
//      and a forward + loss on every rank (bf16 compute copy, padded dt weights) equals the reference's bit
//      for bit. Clipping active: masters within 1e-6.
//   4. the moments pulled into each rank's compact host Optim equal the reference's on the owned ranges, bit
//      for bit; a fresh attach + push (a resume) and 2 more steps stay equal to the reference.
//   5. engine_cuda_set_grad_hook (the overlap of tm_dp_*): see hook_case below; tied and untied heads, every
//      tensor / the Mamba mixers + final norm trained, a full pass (CE) and a partial one (MSE on hidden 2).
//   6. ZeRO-2 staged gradients (grad_stage.h) for ranks 0 and 1 of 2 and 1 and 2 of 3 (runs shorter than a slot, two
//      runs in one bucket): see stage_case below.
// Exit status != 0 on any failure. Usage: gpu_test_zero_optim [--verbose]
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine/engine_cuda.h"
#include "kernels/engine/gpu_test_common.cuh"
#include "kernels/engine/grad_stage.h"

extern "C" {
#include "distill/zero.h"
}

#include <cuda_runtime.h>

#define MAXR 3
static const int64_t B = 2, T = 64;

typedef struct {
    HybridConfig h;
    Registry r;
    float *p;
} Model;

static void model_make(Model *m, bool tied) {
    DlError e;
    LlamaConfig c;
    test_small_llama(&c, tied);
    int attn[2] = {1, 3};
    die_if(hybrid_config_init(&m->h, &c, MIXER_MAMBA1, attn, 2, &e) != 0, &e, "hybrid_config_init");
    model_build_registry(&m->h, &m->r);
    for (int i = 0; i < m->r.n; i++) m->r.t[i].trainable = true;
    m->p = (float *)malloc((size_t)m->r.numel * 4);
    test_params_init(&m->r, m->p, 5, 7, false);
}

static void reg_dup(Registry *d, const Registry *s) {
    *d = *s;
    d->t = (TensorInfo *)malloc((size_t)s->n * sizeof(TensorInfo));
    memcpy(d->t, s->t, (size_t)s->n * sizeof(TensorInfo));
    d->cap = s->n;
}

static double loss_of(EngineCuda *E, const int32_t *tok, const int32_t *tgt) {
    DlError e;
    die_if(engine_cuda_forward(E, tok, NULL, &e) != 0, &e, "forward");
    LossSpecCuda ls;
    memset(&ls, 0, sizeof ls);
    ls.w.ce = 1.0f;
    return engine_cuda_loss(E, tgt, NULL, &ls, NULL, NULL).loss;
}

static void run(int R, double clip) {
    DlError e;
    Model m;
    model_make(&m, true);
    const Registry *r = &m.r;
    OptimConfig oc;
    optim_config_default(&oc);
    oc.lr = 3e-3, oc.total_steps = 20, oc.weight_decay = 0.1, oc.grad_accum = 2, oc.clip_norm = clip;
    oc.outlier_factor = 0;
    ZeroLayout Z;
    die_if(zero_layout_build(&Z, r, R, 1, 2048, &e) != 0, &e, "layout");
    // reference (unsharded) and R ranks
    EngineCuda *ref = engine_cuda_new(&m.h, r, m.p, B, T, ECU_TRAIN, DT_BF16, 0, NULL, &e);
    die_if(!ref, &e, "engine");
    Optim oref;
    die_if(optim_init(&oref, &oc, r, &e) != 0, &e, "optim");
    EngineCudaOptim *xref = engine_cuda_optim_attach(ref, &oref, DT_F32, &e);
    die_if(!xref, &e, "attach");
    EngineCuda *E[MAXR];
    Registry oreg[MAXR];
    Optim o[MAXR];
    EngineCudaOptim *x[MAXR];
    float *g[MAXR];
    for (int q = 0; q < R; q++) {
        die_if(!(E[q] = engine_cuda_new(&m.h, r, m.p, B, T, ECU_TRAIN, DT_BF16, 0, NULL, &e)), &e, "engine");
        reg_dup(&oreg[q], r);
        zero_apply_shards(&Z, &oreg[q], q);
        die_if(optim_init(&o[q], &oc, &oreg[q], &e) != 0, &e, "optim");
        die_if(!(x[q] = engine_cuda_optim_attach(E[q], &o[q], DT_F32, &e)), &e, "attach (sharded)");
        g[q] = engine_cuda_grads_new(E[q]);
    }
    float *gref = engine_cuda_grads_new(ref);
    // 1. the ranges over the engine's offsets
    int64_t *goff = (int64_t *)malloc((size_t)r->n * 8), *moff = (int64_t *)malloc((size_t)r->n * 8);
    for (int i = 0; i < r->n; i++) goff[i] = engine_cuda_grad_offset(E[0], i), moff[i] = engine_cuda_master_offset(E[0], i);
    ZeroRange *sl = (ZeroRange *)malloc((size_t)zero_slice_ranges_max(&Z) * sizeof(ZeroRange));
    ZeroRange *pc = (ZeroRange *)malloc((size_t)zero_piece_ranges_max(&Z) * sizeof(ZeroRange));
    int ns = 0, np = 0;
    int rc1 = zero_slice_ranges(&Z, goff, sl, &ns, &e), rc2 = zero_piece_ranges(&Z, moff, pc, &np, &e);
    check(rc1 == 0 && rc2 == 0, "R=%d: slice and piece ranges over the engine's offsets (%s)", R, rc1 || rc2 ? e.msg : "ok");
    check(Z.n_bucket > 4 && np > Z.n_seg, "R=%d: %d buckets, %d slices, %d pieces for %d tensors (tensors cut)", R, Z.n_bucket,
          ns, np, Z.n_seg);
    const int64_t N = r->numel;
    float *loc[MAXR], *sum = (float *)malloc((size_t)N * 4), *h = (float *)malloc((size_t)N * 4),
                      *hr = (float *)malloc((size_t)N * 4);
    for (int q = 0; q < R; q++) loc[q] = (float *)malloc((size_t)N * 4);
    int32_t tok[B * T], tgt[B * T];
    Rng rg;
    rng_init(&rg, 77, (uint64_t)R);
    for (int64_t i = 0; i < B * T; i++) tok[i] = (int32_t)rng_below(&rg, 520);
    for (int64_t i = 0; i < B * T; i++) tgt[i] = (i + 1) % T ? tok[i + 1] : -1;
    bool keep_ok = true, master_ok = true, loss_ok = true, mv_ok = true;
    double worst = 0;
    for (int s = 0; s < 8; s++) {
        // the ranks' local gradients and their rank-order sum (what the reduction leaves on each owner)
        for (int q = 0; q < R; q++)
            for (int64_t k = 0; k < N; k++) loc[q][k] = (float)(rng_normal(&rg) * 0.05);
        for (int64_t k = 0; k < N; k++) {
            float a = loc[0][k];
            for (int q = 1; q < R; q++) a += loc[q][k];
            sum[k] = a;
        }
        engine_cuda_grads_from_host(ref, gref, sum);
        for (int q = 0; q < R; q++) {
            memcpy(h, loc[q], (size_t)N * 4);
            for (int i = 0; i < r->n; i++)
                for (int64_t j = oreg[q].t[i].shard_begin; j < oreg[q].t[i].shard_end; j++) h[r->t[i].offset + j] = sum[r->t[i].offset + j];
            engine_cuda_grads_from_host(E[q], g[q], h);
            if (s == 0) {  // 2. keep_owned: the owned elements stay, the others become 0 (the step reads the owned only)
                engine_cuda_optim_keep_owned(x[q], g[q]);
                engine_cuda_sync();
                engine_cuda_grads_to_host(E[q], g[q], hr);
                for (int i = 0; i < r->n; i++)
                    for (int64_t j = 0; j < r->t[i].numel; j++) {
                        bool own = j >= oreg[q].t[i].shard_begin && j < oreg[q].t[i].shard_end;
                        float want = own ? sum[r->t[i].offset + j] : 0.0f;
                        keep_ok &= hr[r->t[i].offset + j] == want;
                    }
            }
        }
        if (s == 6) {  // 4. a resume: moments pulled, fresh device state, pushed back
            engine_cuda_optim_pull(xref);
            for (int q = 0; q < R; q++) {
                engine_cuda_optim_pull(x[q]);
                for (int i = 0; i < r->n; i++)
                    for (int64_t j = oreg[q].t[i].shard_begin; j < oreg[q].t[i].shard_end; j++) {
                        const int64_t a = o[q].mv_off[i] + j - oreg[q].t[i].shard_begin, b = oref.mv_off[i] + j;
                        mv_ok &= o[q].m[a] == oref.m[b] && o[q].v[a] == oref.v[b];
                    }
                engine_cuda_optim_free(x[q]);
                die_if(!(x[q] = engine_cuda_optim_attach(E[q], &o[q], DT_F32, &e)), &e, "re-attach");
                engine_cuda_optim_push(x[q]);
            }
        }
        // 3. the step
        OptimResult rr, rq;
        engine_cuda_optim_step(xref, gref, 1.0, &rr);
        double sq = 0;
        for (int q = 0; q < R; q++) sq += engine_cuda_optim_sq_norm(x[q], g[q]);
        const double norm = zero_global_norm(&oc, 1.0, sq);
        for (int q = 0; q < R; q++) engine_cuda_optim_step_norm(x[q], g[q], 1.0, norm, &rq);
        engine_cuda_sync();
        for (int k = 0; k < np; k++)  // the broadcast of every owned piece from its owner
            for (int q = 0; q < R; q++)
                if (q != pc[k].root)
                    cudaMemcpy(engine_cuda_master(E[q]) + pc[k].off, engine_cuda_master(E[pc[k].root]) + pc[k].off,
                               (size_t)pc[k].n * 4, cudaMemcpyDeviceToDevice);
        engine_cuda_sync();  // device-to-device copies need not be done when cudaMemcpy returns
        for (int q = 0; q < R; q++) engine_cuda_optim_gathered(x[q]);
        engine_cuda_sync();
        check(fabs(rr.grad_norm - rq.grad_norm) <= 1e-12 * rr.grad_norm && rr.outcome == rq.outcome,
              "R=%d step %d: norm %.9g vs %.9g (clip scale %.4g)", R, s, rq.grad_norm, rr.grad_norm, rr.clip_scale);
        engine_cuda_get_params(ref, hr);
        const double lref = loss_of(ref, tok, tgt);
        for (int q = 0; q < R; q++) {
            memcpy(h, hr, (size_t)N * 4);
            engine_cuda_get_params(E[q], h);
            double d = relerr(h, hr, N);
            worst = fmax(worst, d);
            master_ok &= clip > 0 ? d <= 1e-6 : memcmp(h, hr, (size_t)N * 4) == 0;
            if (clip <= 0) loss_ok &= loss_of(E[q], tok, tgt) == lref;
        }
    }
    check(keep_ok, "R=%d: keep_owned leaves exactly the owned elements", R);
    check(master_ok, "R=%d clip %g: every rank's fp32 master vs the unsharded step: worst %.2e (%s)", R, clip, worst,
          clip > 0 ? "within 1e-6" : "bitwise");
    if (clip <= 0) check(loss_ok, "R=%d: forward losses of every rank equal the reference's bitwise (compute copy refreshed)", R);
    check(mv_ok, "R=%d: pulled moments equal the reference's on the owned ranges; after push the steps stay equal", R);
    for (int q = 0; q < R; q++) {
        engine_cuda_dfree(g[q]);
        engine_cuda_optim_free(x[q]);
        engine_cuda_free(E[q]);
        optim_free(&o[q]);
        free(oreg[q].t);
        free(loc[q]);
    }
    engine_cuda_dfree(gref);
    engine_cuda_optim_free(xref);
    engine_cuda_free(ref);
    optim_free(&oref);
    zero_layout_free(&Z);
    free(sum), free(h), free(hr), free(goff), free(moff), free(sl), free(pc), free(m.p);
    reg_free(&m.r);
}

// ---- 5. the backward's progress reports (engine_cuda_set_grad_hook) against the real engine: at each report,
// every bucket zero_buckets_ready calls final is copied (on the engine's stream, so after exactly the work
// enqueued so far) into a snapshot; after the backward each snapshot must equal the final gradient bit for bit
// (nothing wrote the bucket after the report that released it: what the overlapped reduction would have sent
// is the whole gradient). Control: snapshots of EVERY bucket at the first report must differ from the final
// gradient for the buckets written later (the comparison has power).
typedef struct {
    EngineCuda *E;
    const ZeroLayout *Z;
    const int *level, *first;
    const ZeroRange *sl;
    float *g, *snap;
    int sent, reports;
    int *at;       // [n_bucket] the report that released each bucket
    bool control;  // snapshot everything at the first report
} HookT;

static void hook_fn(void *ctx, int level) {
    HookT *t = (HookT *)ctx;
    const int ready = t->control && t->reports == 0 ? t->Z->n_bucket : zero_buckets_ready(t->level, t->Z->n_bucket, level);
    cudaStream_t st = (cudaStream_t)engine_cuda_stream(t->E);
    for (int b = t->sent; b < ready; b++) {
        const ZeroRange *a = &t->sl[t->first[b]], *z = &t->sl[t->first[b + 1] - 1];
        const int64_t off = a->off, n = z->off + z->n - a->off;
        cudaMemcpyAsync(t->snap + off, t->g + off, (size_t)n * 4, cudaMemcpyDeviceToDevice, st);
        t->at[b] = t->reports;
    }
    if (ready > t->sent) t->sent = ready;
    t->reports++;
}

// mode 0: CE over the whole model; 1: an MSE on hidden state 2 only (the pass starts at layer 1).
static void hook_case(bool tied, const char *trained, int mode) {
    DlError e;
    Model m;
    model_make(&m, tied);
    const Registry *r = &m.r;
    die_if(reg_set_trainable(&m.r, trained, &e) < 0, &e, "trainable");
    ZeroLayout Z;
    die_if(zero_layout_build(&Z, r, 2, 2, 2048, &e) != 0, &e, "layout");
    int64_t *goff = (int64_t *)malloc((size_t)r->n * 8);
    int *level = (int *)malloc((size_t)Z.n_bucket * sizeof(int)), *first = (int *)malloc((size_t)(Z.n_bucket + 1) * sizeof(int));
    int *at = (int *)malloc((size_t)Z.n_bucket * sizeof(int));
    ZeroRange *sl = (ZeroRange *)malloc((size_t)zero_slice_ranges_max(&Z) * sizeof(ZeroRange));
    zero_bucket_levels(&Z, r, m.h.base.n_layer, level);
    int32_t tok[B * T], tgt[B * T];
    for (int64_t i = 0; i < B * T; i++) tok[i] = (int32_t)((i * 7919 + 13) % m.h.base.vocab);
    for (int64_t i = 0; i < B * T; i++) tgt[i] = (i + 1) % T ? tok[i + 1] : -1;
    for (int control = 0; control < 2; control++) {
        EngineCuda *E = engine_cuda_new(&m.h, r, m.p, B, T, ECU_TRAIN, DT_BF16, 0, NULL, &e);
        die_if(!E, &e, "engine");
        for (int i = 0; i < r->n; i++) goff[i] = engine_cuda_grad_offset(E, i);
        int ns = 0;
        die_if(zero_slice_ranges_split(&Z, goff, sl, &ns, first, &e) != 0, &e, "slice ranges");
        const int64_t gn = engine_cuda_grads_numel(E);
        float *g = engine_cuda_grads_new(E), *snap = (float *)engine_cuda_alloc((size_t)gn * 4);
        HookT t = {E, &Z, level, first, sl, g, snap, 0, 0, at, control != 0};
        for (int b = 0; b < Z.n_bucket; b++) at[b] = -1;
        die_if(engine_cuda_forward(E, tok, NULL, &e) != 0, &e, "forward");
        if (mode == 0) {
            LossSpecCuda ls;
            memset(&ls, 0, sizeof ls);
            ls.w.ce = 1.0f;
            engine_cuda_loss(E, tgt, NULL, &ls, g, NULL);
        } else {
            engine_cuda_mse_hidden(E, 2, engine_cuda_hidden(E, 1), NULL, 1.0, true);
        }
        engine_cuda_set_grad_hook(E, hook_fn, &t);
        engine_cuda_backward(E, g);
        engine_cuda_set_grad_hook(E, NULL, NULL);
        engine_cuda_sync();
        float *hg = (float *)malloc((size_t)gn * 4), *hs = (float *)malloc((size_t)gn * 4);
        engine_cuda_copy_to_host(hg, g, (size_t)gn * 4);
        engine_cuda_copy_to_host(hs, snap, (size_t)gn * 4);
        int equal = 0, nonzero = 0, all_sent = t.sent == Z.n_bucket;
        for (int b = 0; b < Z.n_bucket; b++) {
            const ZeroRange *a = &sl[first[b]], *z = &sl[first[b + 1] - 1];
            bool eq = !memcmp(hg + a->off, hs + a->off, (size_t)(z->off + z->n - a->off) * 4), nz = false;
            for (int64_t k = a->off; k < z->off + z->n; k++) nz |= hg[k] != 0;
            equal += eq, nonzero += nz;
            all_sent &= at[b] >= 0;
        }
        if (!control) {
            check(all_sent && equal == Z.n_bucket && nonzero > 0,
                  "grad hook (%s, trained '%s', %s): %d buckets released over %d reports, every one's snapshot at its "
                  "release == final gradient bitwise (%d of %d; %d with a nonzero gradient)",
                  tied ? "tied" : "untied", trained, mode ? "MSE on hidden 2" : "CE", Z.n_bucket, t.reports, equal,
                  Z.n_bucket, nonzero);
        } else {
            int late = 0;  // buckets whose own release comes after the first report: their snapshot must be stale
            for (int b = 0; b < Z.n_bucket; b++) late += zero_buckets_ready(level, Z.n_bucket, mode ? 2 : m.h.base.n_layer) <= b;
            check(Z.n_bucket - equal >= 1 && late >= 1,
                  "grad hook control (%s, '%s', %s): snapshots of every bucket at the first report: %d of %d stale (%d "
                  "released later)", tied ? "tied" : "untied", trained, mode ? "MSE" : "CE", Z.n_bucket - equal, Z.n_bucket, late);
        }
        free(hg), free(hs);
        engine_cuda_dfree(g), engine_cuda_dfree(snap);
        engine_cuda_free(E);
    }
    free(goff), free(level), free(first), free(at), free(sl), free(m.p);
    zero_layout_free(&Z);
    reg_free(&m.r);
}

// ---- 6. ZeRO-2 staged gradients on one GPU, as rank q of 2 (no NCCL: the "reduction" of each bucket copies the
// bucket's data, on the communication stream at its launch, into a snapshot). A wider model (d 1024, 4 layers,
// every tensor trained, 8 MiB buckets) so buckets span several 2 MiB pages. Three micro-batches: engine A runs
// each one's backward densely into a fresh buffer (g_k) and into an accumulating one (g_acc, cleared of what q does
// not own after each micro-batch, the keep_owned rule); engine B (same weights) runs it into the staged buffer
// through grad_stage_report. At every launch the snapshot must equal, bit for bit, g_acc on q's owned elements and
// g_k elsewhere (the staged pages were mapped before the backward wrote them and zeroed); every bucket is launched;
// the staged buffer holds less memory than the whole one.
typedef struct {
    GradStage *gs;
    float *g, *snap;
    const ZeroRange *sl;
    const int *first;
} StageT;

static int stage_launch(void *ctx, int b, void *comm, DlError *e) {
    StageT *t = (StageT *)ctx;
    const ZeroRange *a = &t->sl[t->first[b]], *z = &t->sl[t->first[b + 1] - 1];
    cudaError_t r = cudaMemcpyAsync(t->snap + a->off, t->g + a->off, (size_t)(z->off + z->n - a->off) * 4,
                                    cudaMemcpyDeviceToDevice, (cudaStream_t)comm);
    return r == cudaSuccess ? 0 : dl_fail(e, "snapshot copy: %s", cudaGetErrorString(r));
}

typedef struct {
    StageT *t;
    const int *level;
    cudaStream_t compute, comm;
    int launched;
    bool failed;
    DlError err;
} StageHook;

static void stage_hook(void *ctx, int lv) {
    StageHook *h = (StageHook *)ctx;
    if (h->failed) return;
    const int n = grad_stage_report(h->t->gs, h->level, lv, h->compute, h->comm, stage_launch, h->t, &h->err);
    if (n < 0) h->failed = true;
    else h->launched = n;
}

// Rank q of W. d_ff 3072 (not a multiple of the 2 MiB page in elements) gives staged runs of different lengths,
// some shorter than a slot, and at W = 3 the middle rank's buckets have two runs (before and after its slice): the
// mappings that a slot of one allocation could not serve on a GPU (grad_stage.cu's header).
static void stage_case(int W, int q) {
    DlError e;
    Model m;
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    c.n_layer = 4, c.d_model = 1024, c.n_head = 8, c.n_kv_head = 2, c.head_dim = 128, c.d_ff = 3072, c.vocab = 520;
    c.max_pos = 4096, c.rope_theta = 10000.0, c.rms_eps = 1e-5, c.tied_embeddings = false, c.bos_id = c.eos_id = -1;
    int attn[2] = {1, 3};
    die_if(hybrid_config_init(&m.h, &c, MIXER_MAMBA1, attn, 2, &e) != 0, &e, "hybrid_config_init");
    model_build_registry(&m.h, &m.r);
    for (int i = 0; i < m.r.n; i++) m.r.t[i].trainable = true;
    m.p = (float *)malloc((size_t)m.r.numel * 4);
    test_params_init(&m.r, m.p, 9, 3, false);
    const Registry *r = &m.r;
    ZeroLayout Z;
    die_if(zero_layout_build(&Z, r, W, 2, 8 << 20, &e) != 0, &e, "layout");
    EngineCuda *A = engine_cuda_new(&m.h, r, m.p, B, T, ECU_TRAIN, DT_BF16, 0, NULL, &e);
    die_if(!A, &e, "engine A");
    EngineCuda *Bn = engine_cuda_new(&m.h, r, m.p, B, T, ECU_TRAIN, DT_BF16, 0, NULL, &e);
    die_if(!Bn, &e, "engine B");
    const int64_t gn = engine_cuda_grads_numel(A);
    int64_t *goff = (int64_t *)malloc((size_t)r->n * 8);
    for (int i = 0; i < r->n; i++) goff[i] = engine_cuda_grad_offset(A, i);
    int *level = (int *)malloc((size_t)Z.n_bucket * sizeof(int)), *first = (int *)malloc((size_t)(Z.n_bucket + 1) * sizeof(int));
    ZeroRange *sl = (ZeroRange *)malloc((size_t)zero_slice_ranges_max(&Z) * sizeof(ZeroRange));
    int ns = 0;
    die_if(zero_slice_ranges_split(&Z, goff, sl, &ns, first, &e) != 0, &e, "slices");
    zero_bucket_levels(&Z, r, c.n_layer, level);
    int dev = 0;
    cudaGetDevice(&dev);
    const int64_t page = grad_stage_page(dev, &e);
    die_if(page < 0, &e, "page");
    ZeroStagePlan P;
    die_if(zero_stage_plan(&Z, r, goff, gn, c.n_layer, q, page, &P, &e) != 0, &e, "stage plan");
    GradStage *gs = grad_stage_new(&P, gn, dev, &e);
    die_if(!gs, &e, "grad_stage_new");
    float *gk = engine_cuda_grads_new(A), *gacc = engine_cuda_grads_new(A), *snap = (float *)engine_cuda_alloc((size_t)gn * 4);
    float *g = grad_stage_ptr(gs);
    cudaStream_t comm;
    cudaStreamCreateWithFlags(&comm, cudaStreamNonBlocking);
    cudaEvent_t ev;
    cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    StageT t = {gs, g, snap, sl, first};
    StageHook hk = {&t, level, (cudaStream_t)engine_cuda_stream(Bn), comm, 0, false, {{0}}};
    // q's owned elements
    uint8_t *own = (uint8_t *)calloc((size_t)gn, 1);
    for (int k = 0; k < Z.n_seg; k++) {
        int64_t b0, b1;
        zero_seg_owned(&Z, k, q, &b0, &b1);
        for (int64_t x = b0; x < b1; x++) own[goff[Z.seg[k].tensor] + x] = 1;
    }
    float *hk_h = (float *)malloc((size_t)gn * 4), *ha = (float *)malloc((size_t)gn * 4), *hs = (float *)malloc((size_t)gn * 4);
    die_if(grad_stage_zero(gs, engine_cuda_stream(Bn), &e) != 0, &e, "zero");
    bool ok = true, all = true;
    int64_t staged_checked = 0;
    int32_t tok[B * T], tgt[B * T];
    LossSpecCuda ls;
    memset(&ls, 0, sizeof ls);
    ls.w.ce = 1.0f;
    for (int mb = 0; mb < 3; mb++) {
        for (int64_t i = 0; i < B * T; i++) tok[i] = (int32_t)((i * 7919 + 13 + 101 * mb) % c.vocab);
        for (int64_t i = 0; i < B * T; i++) tgt[i] = (i + 1) % T ? tok[i + 1] : -1;
        // dense: this micro-batch alone, and accumulated
        engine_cuda_zero_trainable(A, gk);
        die_if(engine_cuda_forward(A, tok, NULL, &e) != 0, &e, "forward");
        engine_cuda_loss(A, tgt, NULL, &ls, gk, NULL);
        engine_cuda_backward(A, gk);
        die_if(engine_cuda_forward(A, tok, NULL, &e) != 0, &e, "forward");
        engine_cuda_loss(A, tgt, NULL, &ls, gacc, NULL);
        engine_cuda_backward(A, gacc);
        // staged
        die_if(engine_cuda_forward(Bn, tok, NULL, &e) != 0, &e, "forward");
        engine_cuda_loss(Bn, tgt, NULL, &ls, g, NULL);
        grad_stage_begin(gs);
        engine_cuda_set_grad_hook(Bn, stage_hook, &hk);
        engine_cuda_backward(Bn, g);
        engine_cuda_set_grad_hook(Bn, NULL, NULL);
        die_if(hk.failed, &hk.err, "grad_stage_report");
        all &= hk.launched == Z.n_bucket;
        cudaEventRecord(ev, comm);
        cudaStreamWaitEvent((cudaStream_t)engine_cuda_stream(Bn), ev, 0);
        die_if(grad_stage_clear(gs, engine_cuda_stream(Bn), &e) != 0, &e, "clear");
        engine_cuda_sync();
        engine_cuda_copy_to_host(hk_h, gk, (size_t)gn * 4);
        engine_cuda_copy_to_host(ha, gacc, (size_t)gn * 4);
        engine_cuda_copy_to_host(hs, snap, (size_t)gn * 4);
        for (int b = 0; b < Z.n_bucket; b++)
            for (int64_t x = sl[first[b]].off; x < sl[first[b + 1] - 1].off + sl[first[b + 1] - 1].n; x++) {
                const float want = own[x] ? ha[x] : hk_h[x];
                if (memcmp(&want, &hs[x], 4)) {
                    if (ok) fprintf(stderr, "stage rank %d micro %d bucket %d element %lld: %g, want %g (%s)\n", q, mb, b,
                                    (long long)x, hs[x], want, own[x] ? "owned" : "not owned");
                    ok = false;
                }
                staged_checked += !own[x];
            }
        // the keep_owned rule on the dense accumulator
        for (int64_t x = 0; x < gn; x++)
            if (!own[x]) ha[x] = 0;
        cudaMemcpy(gacc, ha, (size_t)gn * 4, cudaMemcpyHostToDevice);
    }
    int shorter = 0, two = 0;  // staged buckets whose pages fill only part of a slot; with runs on both sides
    for (int b = 0; b < P.n_bucket; b++) {
        const int64_t na = P.b[b].a1 - P.b[b].a0, nb = P.b[b].b1 - P.b[b].b0;
        shorter += na + nb > 0 && na + nb < P.slot_pages;
        two += na > 0 && nb > 0;
    }
    check(ok && all && grad_stage_bytes(gs) < 4.0 * (double)gn && P.staged_pages > 0 && (shorter > 0 || two > 0),
          "ZeRO-2 staged gradients, rank %d of %d: 3 micro-batches, %d buckets launched each, every snapshot == dense "
          "(owned: accumulated; %lld other elements: this micro-batch's) bitwise; %.1f MB held vs %.1f MB whole (%lld "
          "permanent pages, %d slots x %lld pages; %d buckets fill part of a slot, %d have two runs)", q, W, Z.n_bucket,
          (long long)staged_checked, grad_stage_bytes(gs) / 1e6, 4.0 * (double)gn / 1e6, (long long)P.perm_pages, P.slots,
          (long long)P.slot_pages, shorter, two);
    free(hk_h), free(ha), free(hs), free(own), free(goff), free(level), free(first), free(sl);
    engine_cuda_dfree(gk), engine_cuda_dfree(gacc), engine_cuda_dfree(snap);
    grad_stage_free(gs);
    zero_stage_plan_free(&P);
    cudaStreamDestroy(comm);
    cudaEventDestroy(ev);
    engine_cuda_free(A);
    engine_cuda_free(Bn);
    zero_layout_free(&Z);
    free(m.p);
    reg_free(&m.r);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--verbose")) g_verbose = 1;
    stage_case(2, 0);
    stage_case(2, 1);
    stage_case(3, 1);  // two runs per bucket
    stage_case(3, 2);
    hook_case(true, "*", 0);
    hook_case(false, "*", 0);
    hook_case(false, "*.mamba.*,model.norm.weight", 0);
    hook_case(true, "*", 1);
    run(2, 0);
    run(3, 0);
    run(2, 0.05);
    printf("gpu_test_zero_optim: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail != 0;
}
