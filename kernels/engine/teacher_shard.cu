// teacher_shard.cu: see teacher_shard.h. Host code over the CUDA runtime; the only kernel is the engine's own
// fp32 -> bf16 conversion (convert_cuda), so a shard holds exactly the bits of the whole compute copy.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine/teacher_shard.h"
#include "kernels/train/train_check.cuh"
#include "kernels/train/train_cuda.h"

struct TeacherShard {
    EngineCuda *E;
    const Registry *r;
    TShardPlan p;
    int rank;
    void *shard;            // bf16 [p.shard_total]: rank's pieces of every layer
    void *glob;             // bf16 [p.global_numel]: the global tensors, whole
    void *slot[2];          // bf16 [p.slot]: gathered layers
    int held[2];            // the layer in each slot (-1: none yet)
    cudaEvent_t ready[2];   // recorded on the gather stream after each slot's last gather
    cudaEvent_t used;       // recorded on the engine's stream before a gather overwrites a slot
    cudaStream_t comm;
    bool own_comm;
    TeacherShardGather gather;
    void *gctx;
    int64_t n_gathers;
};

// A cudaMalloc that fails into e (the caller frees what it made).
static void *dev_alloc(size_t bytes, const char *what, DlError *e) {
    void *p = NULL;
    if (bytes == 0) bytes = 16;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        cudaGetLastError();
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        dl_fail(e, "teacher shard: out of GPU memory for %s (%.2f GiB; %.2f GiB free of %.2f)", what,
                (double)bytes / 1073741824.0, (double)fr / 1073741824.0, (double)tot / 1073741824.0);
        return NULL;
    }
    return p;
}

// dst[0..n) (bf16, device) <- src[0..n) (fp32, host) through stage (fp32 device, cap elements).
static int upload_bf16(void *dst, const float *src, int64_t n, float *stage, int64_t cap, cudaStream_t st, DlError *e) {
    char msg[256] = "";
    for (int64_t i = 0; i < n; i += cap) {
        const int64_t k = DL_MIN(cap, n - i);
        cudaCheck(cudaStreamSynchronize(st));  // stage is free again (and src may be pageable: the copy goes in order on st)
        cudaCheck(cudaMemcpyAsync(stage, src + i, (size_t)k * 4, cudaMemcpyHostToDevice, st));
        if (convert_cuda(DT_BF16, (char *)dst + (size_t)i * 2, DT_F32, stage, k, st, msg, sizeof msg))
            return dl_fail(e, "teacher shard: fp32 -> bf16 conversion refused: %s", msg);
    }
    return 0;
}

// Uploads rank q's pieces (plan p, host params) into shard (bf16 [p->shard_total], zeroed padding).
static int upload_shard(const TShardPlan *p, int q, const float *params, void *shard, DlError *e) {
    cudaStream_t st;
    cudaCheck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaCheck(cudaMemsetAsync(shard, 0, (size_t)p->shard_total * 2, st));
    int64_t cap = 1;
    for (int l = 0; l < p->n_layer; l++) cap = DL_MAX(cap, p->layer[l].shard);
    cap = DL_MIN(cap, (int64_t)16 << 20);
    float *stage = (float *)dev_alloc((size_t)cap * 4, "the upload's staging buffer", e);
    int rc = stage ? 0 : -1;
    for (int l = 0; l < p->n_layer && !rc; l++) {
        int64_t b, en;
        tshard_range(p, l, q, &b, &en);
        if (en > b) rc = upload_bf16((char *)shard + (size_t)p->layer[l].off * 2, params + b, en - b, stage, cap, st, e);
    }
    cudaCheck(cudaStreamSynchronize(st));
    cudaFree(stage);
    cudaCheck(cudaStreamDestroy(st));
    return rc;
}

void *teacher_shard_upload(const TShardPlan *p, int q, const float *params) {
    DlError e = {0};
    void *d = dev_alloc((size_t)p->shard_total * 2, "a simulated rank's shard", &e);
    if (!d || upload_shard(p, q, params, d, &e)) dl_die(DL_EXIT_RUNTIME, "%s", e.msg);
    return d;
}

int teacher_shard_copy_gather(void *ctx, int layer, const void *send, void *recv, int64_t count, void *stream, DlError *e) {
    (void)ctx, (void)layer, (void)e;
    cudaCheck(cudaMemcpyAsync(recv, send, (size_t)count * 2, cudaMemcpyDeviceToDevice, (cudaStream_t)stream));
    return 0;
}

// Gathers layer l into its slot (l % n_slots) on the gather stream, after everything enqueued so far on the
// engine's stream (the slot's previous readers).
static int launch(TeacherShard *s, int l, DlError *e) {
    const int k = l % s->p.n_slots;
    cudaStream_t est = (cudaStream_t)engine_cuda_stream(s->E);
    cudaCheck(cudaEventRecord(s->used, est));
    cudaCheck(cudaStreamWaitEvent(s->comm, s->used, 0));
    const TShardLayer *L = &s->p.layer[l];
    s->held[k] = -1;
    if (s->gather(s->gctx, l, (const char *)s->shard + (size_t)L->off * 2, s->slot[k], L->shard, s->comm, e))
        return dl_fail_prefix(e, "teacher shard: gathering layer %d: ", l);
    cudaCheck(cudaEventRecord(s->ready[k], s->comm));
    s->held[k] = l;
    s->n_gathers++;
    return 0;
}

// The engine's forward layer hook (engine_cuda_set_layer_hook): see the header comment.
static int hook(void *ctx, int l, int l1, DlError *e) {
    TeacherShard *s = (TeacherShard *)ctx;
    const int k = l % s->p.n_slots;
    if (s->held[k] != l && launch(s, l, e)) return -1;
    cudaCheck(cudaStreamWaitEvent((cudaStream_t)engine_cuda_stream(s->E), s->ready[k], 0));
    const int64_t lo = s->p.layer[l].lo;
    for (int i = 0; i < s->r->n; i++)
        if (s->r->t[i].layer == l &&
            engine_cuda_set_weight(s->E, i, (const char *)s->slot[k] + (size_t)(s->r->t[i].offset - lo) * 2, e))
            return -1;
    if (s->p.n_slots > 1 && l + 1 < l1 && s->held[(l + 1) % 2] != l + 1) return launch(s, l + 1, e);  // the prefetch
    return 0;
}

TeacherShard *teacher_shard_new(EngineCuda *E, const Registry *r, int n_layer, int rank, int world, const float *params,
                                TeacherShardGather gather, void *gctx, void *stream, FILE *log, DlError *e) {
    if (rank < 0 || rank >= world) {
        dl_fail(e, "teacher shard: rank %d outside 0..%d", rank, world - 1);
        return NULL;
    }
    TeacherShard *s = (TeacherShard *)calloc(1, sizeof *s);
    s->E = E, s->r = r, s->rank = rank, s->gather = gather, s->gctx = gctx;
    s->held[0] = s->held[1] = -1;
    if (tshard_plan(&s->p, r, n_layer, world, e)) {
        free(s);
        return NULL;
    }
    cudaCheck(cudaEventCreateWithFlags(&s->ready[0], cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&s->ready[1], cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&s->used, cudaEventDisableTiming));
    if (stream) s->comm = (cudaStream_t)stream;
    else {
        cudaCheck(cudaStreamCreateWithFlags(&s->comm, cudaStreamNonBlocking));
        s->own_comm = true;
    }
    const TShardPlan *p = &s->p;
    if (!(s->shard = dev_alloc((size_t)p->shard_total * 2, "the teacher's shard", e)) ||
        !(s->glob = dev_alloc((size_t)p->global_numel * 2, "the teacher's global tensors", e)))
        goto fail;
    for (int k = 0; k < p->n_slots; k++)
        if (!(s->slot[k] = dev_alloc((size_t)p->slot * 2, "a teacher layer's gather buffer", e))) goto fail;
    if (upload_shard(p, rank, params, s->shard, e)) goto fail;
    {
        cudaStream_t st = (cudaStream_t)engine_cuda_stream(E);
        int64_t cap = 1;
        for (int k = 0; k < p->n_global; k++) cap = DL_MAX(cap, r->t[p->global[k]].numel);
        cap = DL_MIN(cap, (int64_t)16 << 20);
        float *stage = (float *)dev_alloc((size_t)cap * 4, "the upload's staging buffer", e);
        if (!stage) goto fail;
        cudaCheck(cudaMemsetAsync(s->glob, 0, (size_t)p->global_numel * 2, st));
        int rc = 0;
        for (int k = 0; k < p->n_global && !rc; k++) {
            const TensorInfo *t = &r->t[p->global[k]];
            void *dst = (char *)s->glob + (size_t)p->global_off[k] * 2;
            rc = upload_bf16(dst, params + t->offset, t->numel, stage, cap, st, e) ||
                 engine_cuda_set_weight(E, p->global[k], dst, e);
        }
        cudaCheck(cudaStreamSynchronize(st));
        cudaFree(stage);
        if (rc) goto fail;
    }
    engine_cuda_set_layer_hook(E, hook, s);
    if (log) {
        TShardBytes b;
        tshard_bytes(p, 2, &b);
        fprintf(log, "teacher shard: rank %d of %d keeps %.3f GiB of the bf16 teacher (its layer pieces %.3f, %d gather "
                     "buffers %.3f, global tensors %.3f) instead of %.3f GiB%s\n", rank, world, b.total / 1073741824.0,
                b.shards / 1073741824.0, p->n_slots, b.slots / 1073741824.0, b.globals / 1073741824.0,
                b.replicated / 1073741824.0, world == 1 ? " (one rank: no saving, the same numbers)" : "");
    }
    return s;
fail:
    teacher_shard_free(s);
    return NULL;
}

void teacher_shard_free(TeacherShard *s) {
    if (!s) return;
    cudaDeviceSynchronize();
    engine_cuda_set_layer_hook(s->E, NULL, NULL);
    cudaFree(s->shard);
    cudaFree(s->glob);
    cudaFree(s->slot[0]);
    cudaFree(s->slot[1]);
    cudaEventDestroy(s->ready[0]);
    cudaEventDestroy(s->ready[1]);
    cudaEventDestroy(s->used);
    if (s->own_comm) cudaStreamDestroy(s->comm);
    tshard_plan_free(&s->p);
    free(s);
}

const TShardPlan *teacher_shard_plan(const TeacherShard *s) { return &s->p; }

double teacher_shard_bytes(const TeacherShard *s) {
    TShardBytes b;
    tshard_bytes(&s->p, 2, &b);
    return b.total;
}

int64_t teacher_shard_gathers(const TeacherShard *s) { return s->n_gathers; }
