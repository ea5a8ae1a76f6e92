// engine_cuda_optim.cu: AdamW on the device for EngineCuda (engine_cuda.h): fp32 (or bf16) moments, the global
// gradient norm, the update of the fp32 master and the bf16 compute copy. The decisions (schedule, skips,
// clipping, parameter groups) are the host optimizer's (optim_decide, optim_tensor_k), shared with the CPU step.
// Each trained tensor i is updated over the host Optim's owned range [shard_begin, shard_end): the whole tensor
// (moments in the gradients' compact layout), or a ZeRO-1/2 shard (moments in the host Optim's compact layout,
// mv_off: 1/world of the state per rank; distill/zero.h).
#include <math.h>
#include <string.h>

#include "kernels/engine/engine_cuda_internal.cuh"

struct EngineCudaOptim {
    EngineCuda *E;
    Optim *host;       // config, counters, outlier window, parameter groups (and host m, v for pull/push)
    Optim own;         // the host Optim when made from a config (engine_cuda_optim_new)
    DType mv_dt;
    int *idx;          // trained tensor indices (E->goff >= 0)
    int64_t *moff;     // where element b[k] of each sits in the device moments (E->goff, or the host's mv_off)
    int64_t *b, *e;    // the owned range [b, e) of each (the whole tensor unless the host Optim is sharded)
    int n;
    bool sharded;      // some range is not the whole tensor (ZeRO-1/2)
    int64_t mv_n;      // elements of each device moment
    size_t bytes;      // device memory of the moments and workspaces
    void *m, *v;
    double *acc;
    void *ws;
};

EngineCudaOptim *engine_cuda_optim_attach(EngineCuda *E, Optim *host, DType mv_dt, DlError *err) {
    if (E->flags & ECU_NO_MASTER) {
        dl_fail(err, "engine_cuda_optim: the engine is frozen (ECU_NO_MASTER): it has no fp32 master to update");
        return NULL;
    }
    if (mv_dt != DT_F32 && mv_dt != DT_BF16) {
        dl_fail(err, "engine_cuda_optim: moments must be fp32 or bf16");
        return NULL;
    }
    const Registry *r = E->r;
    if (host->reg->n != r->n || host->reg->numel != r->numel) {
        dl_fail(err, "engine_cuda_optim: the optimizer's registry is not the engine's");
        return NULL;
    }
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *h = &host->reg->t[i];
        if (h->trainable != (E->goff[i] >= 0) ||
            (E->goff[i] >= 0 && !(0 <= h->shard_begin && h->shard_begin <= h->shard_end && h->shard_end <= r->t[i].numel))) {
            dl_fail(err, "engine_cuda_optim: tensor %s: the optimizer's owned range [%lld, %lld) is not a range of the "
                         "tensor's %lld elements, or its trainable flag differs from the engine's", r->t[i].name,
                    (long long)h->shard_begin, (long long)h->shard_end, (long long)r->t[i].numel);
            return NULL;
        }
    }
    EngineCudaOptim *o = (EngineCudaOptim *)calloc(1, sizeof *o);
    o->E = E;
    o->host = host;
    o->mv_dt = mv_dt;
    o->sharded = host->mv_compact;  // optim_init: compact moments iff some trainable tensor is only partly owned
    const size_t nt = (size_t)DL_MAX(r->n, 1);
    o->idx = (int *)malloc(nt * sizeof(int));
    o->moff = (int64_t *)malloc(nt * sizeof(int64_t));
    o->b = (int64_t *)malloc(nt * sizeof(int64_t));
    o->e = (int64_t *)malloc(nt * sizeof(int64_t));
    int64_t maxn = 1;
    for (int i = 0; i < r->n; i++)
        if (E->goff[i] >= 0) {
            const TensorInfo *h = &host->reg->t[i];
            o->idx[o->n] = i;
            o->b[o->n] = o->sharded ? h->shard_begin : 0;
            o->e[o->n] = o->sharded ? h->shard_end : r->t[i].numel;
            o->moff[o->n] = o->sharded ? host->mv_off[i] : E->goff[i];
            maxn = DL_MAX(maxn, o->e[o->n] - o->b[o->n]);
            o->n++;
        }
    o->mv_n = o->sharded ? host->mv_numel : E->grad_n;
    size_t mb = (size_t)o->mv_n * (mv_dt == DT_F32 ? 4 : 2);
    o->m = ecu_try_alloc(DL_MAX(mb, (size_t)16));
    o->v = ecu_try_alloc(DL_MAX(mb, (size_t)16));
    o->ws = ecu_try_alloc(DL_MAX(grad_sumsq_workspace(maxn), (size_t)16));
    o->acc = (double *)ecu_try_alloc(sizeof(double));
    o->bytes = 2 * DL_MAX(mb, (size_t)16) + DL_MAX(grad_sumsq_workspace(maxn), (size_t)16) + sizeof(double);
    if (!o->m || !o->v || !o->ws || !o->acc) {
        char b1[32];
        ecu_oom_report(E, "AdamW moments", 2 * mb, stderr);
        dl_fail(err, "engine_cuda: out of GPU memory for the AdamW moments (%s)", ecu_gib(2.0 * mb, b1, sizeof b1));
        engine_cuda_optim_free(o);
        return NULL;
    }
    cudaCheck(cudaMemset(o->m, 0, mb));
    cudaCheck(cudaMemset(o->v, 0, mb));
    cudaCheck(cudaDeviceSynchronize());
    return o;
}

EngineCudaOptim *engine_cuda_optim_new(EngineCuda *E, const OptimConfig *c, DType mv_dt, DlError *err) {
    Optim tmp;
    if (optim_init(&tmp, c, E->r, err)) return NULL;
    // the host moments are only used by pull/push; optim_init's calloc stays untouched (not resident) otherwise
    Optim *keep = (Optim *)malloc(sizeof *keep);
    *keep = tmp;
    EngineCudaOptim *o = engine_cuda_optim_attach(E, keep, mv_dt, err);
    if (!o) {
        optim_free(keep);
        free(keep);
        return NULL;
    }
    o->own = *keep;
    free(keep);
    o->host = &o->own;
    return o;
}

void engine_cuda_optim_free(EngineCudaOptim *o) {
    if (!o) return;
    cudaFree(o->m);
    cudaFree(o->v);
    cudaFree(o->ws);
    cudaFree(o->acc);
    if (o->host == &o->own) optim_free(&o->own);
    free(o->idx);
    free(o->moff);
    free(o->b);
    free(o->e);
    free(o);
}

// Moments between the device (compact, mv_dt) and the host Optim (fp32 at mv_off), one tensor at a time.
static void moments_move(EngineCudaOptim *o, bool to_host) {
    EngineCuda *E = o->E;
    int64_t maxn = 1;
    for (int k = 0; k < o->n; k++) maxn = DL_MAX(maxn, o->e[k] - o->b[k]);
    float *tmp = NULL;
    if (o->mv_dt != DT_F32) cudaCheck(cudaMalloc(&tmp, (size_t)maxn * 4));
    const size_t mes = o->mv_dt == DT_F32 ? 4 : 2;
    cudaCheck(cudaDeviceSynchronize());
    for (int k = 0; k < o->n; k++) {
        const int i = o->idx[k];
        const int64_t n = o->e[k] - o->b[k];  // host element shard_begin sits at mv_off[i] in either layout
        if (n <= 0) continue;
        for (int which = 0; which < 2; which++) {
            float *h = (which ? o->host->v : o->host->m) + o->host->mv_off[i];
            void *dv = at(which ? o->v : o->m, o->moff[k], mes);
            if (o->mv_dt == DT_F32) {
                cudaCheck(cudaMemcpy(to_host ? (void *)h : dv, to_host ? dv : (void *)h, (size_t)n * 4,
                                     to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice));
            } else if (to_host) {
                TC(convert_cuda(DT_F32, tmp, o->mv_dt, dv, n, E->st, EA));
                cudaCheck(cudaStreamSynchronize(E->st));
                cudaCheck(cudaMemcpy(h, tmp, (size_t)n * 4, cudaMemcpyDeviceToHost));
            } else {
                cudaCheck(cudaMemcpy(tmp, h, (size_t)n * 4, cudaMemcpyHostToDevice));
                cudaCheck(cudaDeviceSynchronize());
                TC(convert_cuda(o->mv_dt, dv, DT_F32, tmp, n, E->st, EA));
                cudaCheck(cudaStreamSynchronize(E->st));
            }
        }
    }
    cudaFree(tmp);
}
void engine_cuda_optim_pull(EngineCudaOptim *o) { moments_move(o, true); }
void engine_cuda_optim_push(EngineCudaOptim *o) { moments_move(o, false); }
double engine_cuda_optim_bytes(const EngineCudaOptim *o) { return (double)o->bytes; }

// Sum of squares of grads over the owned ranges (fp64 on the device, in a fixed order), to the host.
static double owned_sumsq(EngineCudaOptim *o, const float *grads) {
    EngineCuda *E = o->E;
    cudaCheck(cudaMemsetAsync(o->acc, 0, sizeof(double), E->st));
    for (int k = 0; k < o->n; k++)
        TC(grad_sumsq_cuda(grads + E->goff[o->idx[k]] + o->b[k], o->e[k] - o->b[k], o->acc, o->ws, E->st, EA));
    double ss = 0;
    cudaCheck(cudaMemcpyAsync(&ss, o->acc, sizeof ss, cudaMemcpyDeviceToHost, E->st));
    cudaCheck(cudaStreamSynchronize(E->st));
    return ss;
}

double engine_cuda_grad_norm(EngineCudaOptim *o, const float *grads, double scale) { return sqrt(owned_sumsq(o, grads)) * scale; }
double engine_cuda_optim_sq_norm(EngineCudaOptim *o, const float *grads) { return owned_sumsq(o, grads); }

void engine_cuda_optim_step(EngineCudaOptim *o, const float *grads, double loss, OptimResult *res) {
    // the norm is only needed (and only taken) when the loss is finite, as optim_step decides
    const double norm = isfinite(loss) ? engine_cuda_grad_norm(o, grads, 1.0 / o->host->cfg.grad_accum) : NAN;
    engine_cuda_optim_step_norm(o, grads, loss, norm, res);
}

void engine_cuda_optim_step_norm(EngineCudaOptim *o, const float *grads, double loss, double norm, OptimResult *res) {
    EngineCuda *E = o->E;
    Optim *h = o->host;
    const Registry *r = E->r;
    OptimStepK k;
    if (!optim_decide(&h->cfg, &h->st, loss, norm, res, &k)) return;
    AdamWArgs a;
    a.gscale = (float)k.gscale;
    a.b1 = (float)h->cfg.beta1;
    a.b2 = (float)h->cfg.beta2;
    a.eps = (float)h->cfg.eps;
    a.inv_sqrt_bc2 = (float)(1.0 / sqrt(k.bc2));
    a.seed = 0x9e3779b97f4a7c15ull * (uint64_t)h->st.step;  // bf16 moments: a shard hashes its own indices
    const size_t mes = o->mv_dt == DT_F32 ? 4 : 2;
    for (int q = 0; q < o->n; q++) {
        const int i = o->idx[q];
        const TensorInfo *t = &r->t[i];
        const int64_t b = o->b[q], n = o->e[q] - o->b[q];
        if (n <= 0) continue;
        optim_tensor_k(h, i, res, &k, &a.decay, &a.step_size);
        TC(adamw_cuda(&a, n, E->master + E->moff[i] + b, grads + E->goff[i] + b, o->mv_dt, at(o->m, o->moff[q], mes),
                      at(o->v, o->moff[q], mes), E->dt == DT_BF16 ? DT_BF16 : DT_F32,
                      E->dt == DT_BF16 ? at(E->wc, t->offset + b, 2) : NULL, E->st, EA));
    }
    if (!o->sharded) ecu_refresh_pad(E);  // sharded: after the other ranks' pieces arrived (engine_cuda_optim_gathered)
}

void engine_cuda_optim_keep_owned(EngineCudaOptim *o, float *grads) {
    EngineCuda *E = o->E;
    for (int k = 0; k < o->n; k++) {
        float *g = grads + E->goff[o->idx[k]];
        const int64_t numel = E->r->t[o->idx[k]].numel;
        if (o->b[k] > 0) cudaCheck(cudaMemsetAsync(g, 0, (size_t)o->b[k] * 4, E->st));
        if (o->e[k] < numel) cudaCheck(cudaMemsetAsync(g + o->e[k], 0, (size_t)(numel - o->e[k]) * 4, E->st));
    }
}

void engine_cuda_optim_gathered(EngineCudaOptim *o) {
    EngineCuda *E = o->E;
    if (E->dt == DT_BF16)  // the compute copy of the elements other ranks updated, rounded as adamw_cuda rounds
        for (int k = 0; k < o->n; k++) {
            const int i = o->idx[k];
            const int64_t numel = E->r->t[i].numel, off = E->r->t[i].offset;
            const float *p = E->master + E->moff[i];
            if (o->b[k] > 0) TC(convert_cuda(DT_BF16, at(E->wc, off, 2), DT_F32, p, o->b[k], E->st, EA));
            if (o->e[k] < numel)
                TC(convert_cuda(DT_BF16, at(E->wc, off + o->e[k], 2), DT_F32, p + o->e[k], numel - o->e[k], E->st, EA));
        }
    ecu_refresh_pad(E);
}
