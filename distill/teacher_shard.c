// teacher_shard.c: see teacher_shard.h (the host arithmetic of the sharded teacher).
#include "distill/teacher_shard.h"

#include <stdlib.h>
#include <string.h>

#ifdef DISTILL_NCCL
#include "distill/nccl_comm.h"
#endif

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

void tshard_plan_free(TShardPlan *p) {
    if (!p) return;
    free(p->layer);
    free(p->global);
    free(p->global_off);
    memset(p, 0, sizeof *p);
}

int tshard_plan(TShardPlan *p, const Registry *r, int n_layer, int world, DlError *e) {
    memset(p, 0, sizeof *p);
    if (world < 1) return dl_fail(e, "teacher shard: world size %d (expected >= 1)", world);
    if (n_layer < 1) return dl_fail(e, "teacher shard: the teacher has %d layers (expected >= 1)", n_layer);
    p->world = world;
    p->n_layer = n_layer;
    p->numel = r->numel;
    p->layer = dl_calloc((size_t)n_layer, sizeof *p->layer);
    for (int l = 0; l < n_layer; l++) p->layer[l].lo = -1;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        if (t->layer >= n_layer || t->layer < -1) {
            dl_fail(e, "teacher shard: tensor %s has layer %d outside 0..%d", t->name, t->layer, n_layer - 1);
            goto fail;
        }
        if (t->layer < 0) {
            p->n_global++;
            continue;
        }
        TShardLayer *L = &p->layer[t->layer];
        const int64_t end = round_up(t->offset + t->numel, DL_TENSOR_ALIGN);
        if (L->lo < 0 || t->offset < L->lo) L->lo = t->offset;
        if (end > L->hi) L->hi = end;
    }
    for (int l = 0; l < n_layer; l++)
        if (p->layer[l].lo < 0) {
            dl_fail(e, "teacher shard: layer %d has no tensors in the registry", l);
            goto fail;
        }
    // a span must hold its own layer's tensors only (the slot is filled with the span as it is in the registry)
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        for (int l = 0; l < n_layer; l++) {
            const TShardLayer *L = &p->layer[l];
            if (t->layer != l && t->offset + t->numel > L->lo && t->offset < L->hi) {
                dl_fail(e, "teacher shard: tensor %s (%s) lies inside layer %d's span [%lld, %lld) of the registry: each "
                           "layer's tensors must be contiguous to be sharded", t->name,
                        t->layer < 0 ? "a global tensor" : "another layer", l, (long long)L->lo, (long long)L->hi);
                goto fail;
            }
        }
    }
    int64_t off = 0;
    for (int l = 0; l < n_layer; l++) {
        TShardLayer *L = &p->layer[l];
        L->shard = round_up((L->hi - L->lo + world - 1) / world, DL_TENSOR_ALIGN);
        L->off = off;
        off += L->shard;
        if (world * L->shard > p->slot) p->slot = world * L->shard;
    }
    p->shard_total = off;
    p->n_slots = n_layer > 1 ? 2 : 1;
    p->global = dl_calloc((size_t)DL_MAX(p->n_global, 1), sizeof *p->global);
    p->global_off = dl_calloc((size_t)DL_MAX(p->n_global, 1), sizeof *p->global_off);
    int k = 0;
    for (int i = 0; i < r->n; i++)
        if (r->t[i].layer < 0) {
            p->global[k] = i;
            p->global_off[k++] = p->global_numel;
            p->global_numel += round_up(r->t[i].numel, DL_TENSOR_ALIGN);
        }
    return 0;
fail:
    tshard_plan_free(p);
    return -1;
}

void tshard_range(const TShardPlan *p, int l, int q, int64_t *begin, int64_t *end) {
    const TShardLayer *L = &p->layer[l];
    const int64_t b = L->lo + (int64_t)q * L->shard, en = b + L->shard;
    *begin = DL_MIN(b, L->hi);
    *end = DL_MIN(en, L->hi);
}

int tshard_owner(const TShardPlan *p, int l, int64_t x) { return (int)((x - p->layer[l].lo) / p->layer[l].shard); }

int tshard_layer_of(const TShardPlan *p, int64_t x) {
    for (int l = 0; l < p->n_layer; l++)
        if (x >= p->layer[l].lo && x < p->layer[l].hi) return l;
    return -1;
}

void tshard_bytes(const TShardPlan *p, size_t es, TShardBytes *b) {
    b->shards = (double)p->shard_total * (double)es;
    b->slots = (double)p->n_slots * (double)p->slot * (double)es;
    b->globals = (double)p->global_numel * (double)es;
    b->total = b->shards + b->slots + b->globals;
    b->replicated = (double)p->numel * (double)es;
}

void tshard_pack(const TShardPlan *p, int q, const float *params, float *out) {
    memset(out, 0, (size_t)p->shard_total * sizeof(float));
    for (int l = 0; l < p->n_layer; l++) {
        int64_t b, en;
        tshard_range(p, l, q, &b, &en);
        if (en > b) memcpy(out + p->layer[l].off, params + b, (size_t)(en - b) * sizeof(float));
    }
}

void tshard_pack_globals(const TShardPlan *p, const Registry *r, const float *params, float *out) {
    memset(out, 0, (size_t)p->global_numel * sizeof(float));
    for (int k = 0; k < p->n_global; k++) {
        const TensorInfo *t = &r->t[p->global[k]];
        memcpy(out + p->global_off[k], params + t->offset, (size_t)t->numel * sizeof(float));
    }
}

void tshard_gather_host(const TShardPlan *p, int l, const float *const *shards, float *slot) {
    const TShardLayer *L = &p->layer[l];
    for (int q = 0; q < p->world; q++) memcpy(slot + (int64_t)q * L->shard, shards[q] + L->off, (size_t)L->shard * sizeof(float));
}

int tshard_nccl_gather(void *ctx, int layer, const void *send, void *recv, int64_t count, void *stream, DlError *e) {
    (void)layer;
#ifdef DISTILL_NCCL
    return nccl_all_gather((NcclComm *)ctx, send, recv, count, DT_BF16, stream, e);
#else
    (void)ctx, (void)send, (void)recv, (void)count, (void)stream;
    return dl_fail(e, "teacher shard: this build has no NCCL (the sharded teacher gathers its layers over NCCL)");
#endif
}
