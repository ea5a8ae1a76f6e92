// grad_stage.cu: see grad_stage.h. Host code; the driver's virtual-memory calls are looked up through the runtime
// (cudaGetDriverEntryPointByVersion), so nothing links libcuda directly.
// A slot is slot_pages physical allocations of ONE page each, and a bucket's run of n staged pages is n mappings of
// whole allocations. The first version made a slot one allocation of slot_pages pages and mapped parts of it (a run
// shorter than the slot; a second run at an offset into it). It passed gpu_test_zero_optim, where every staged run
// was as long as the slot, and failed in the first 2-GPU runs (2 x H200, 2026-11-24: cuMemMap CUDA_ERROR_NOT_SUPPORTED),
// whose runs are not. A probe on an H100 (driver 580.159.04) gave 801 for the first page of a 2-page allocation and for
// its second page at an offset, and success for 1-page allocations mapped side by side with one cuMemSetAccess.
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine/grad_stage.h"

typedef CUresult (*PfnReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
typedef CUresult (*PfnAddrFree)(CUdeviceptr, size_t);
typedef CUresult (*PfnCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
typedef CUresult (*PfnRelease)(CUmemGenericAllocationHandle);
typedef CUresult (*PfnMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
typedef CUresult (*PfnUnmap)(CUdeviceptr, size_t);
typedef CUresult (*PfnSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
typedef CUresult (*PfnGranularity)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);

static struct {
    bool loaded;
    PfnReserve reserve;
    PfnAddrFree addr_free;
    PfnCreate create;
    PfnRelease release;
    PfnMap map;
    PfnUnmap unmap;
    PfnSetAccess set_access;
    PfnGranularity granularity;
} D;

static int load(DlError *e) {
    if (D.loaded) return 0;
    struct {
        const char *name;
        void **fn;
    } t[] = {{"cuMemAddressReserve", (void **)&D.reserve}, {"cuMemAddressFree", (void **)&D.addr_free},
             {"cuMemCreate", (void **)&D.create},          {"cuMemRelease", (void **)&D.release},
             {"cuMemMap", (void **)&D.map},                {"cuMemUnmap", (void **)&D.unmap},
             {"cuMemSetAccess", (void **)&D.set_access},   {"cuMemGetAllocationGranularity", (void **)&D.granularity}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        cudaDriverEntryPointQueryResult q;
        cudaError_t r = cudaGetDriverEntryPointByVersion(t[i].name, t[i].fn, 12000, cudaEnableDefault, &q);
        if (r != cudaSuccess || q != cudaDriverEntryPointSuccess || !*t[i].fn)
            return dl_fail(e, "ZeRO-2 staged gradients: the CUDA driver has no %s (%s); run without DISTILL_DP_STAGE_GRADS",
                           t[i].name, cudaGetErrorString(r));
    }
    D.loaded = true;
    return 0;
}

#define DRV(call, what)                                                                                  \
    do {                                                                                                 \
        CUresult r_ = (call);                                                                            \
        if (r_ != CUDA_SUCCESS)                                                                          \
            return dl_fail(e, "ZeRO-2 staged gradients: %s failed (CUresult %d)%s", what, (int)r_,       \
                           r_ == CUDA_ERROR_OUT_OF_MEMORY ? ": out of device memory" : "");             \
    } while (0)
#define RT(call)                                                                                         \
    do {                                                                                                 \
        cudaError_t r_ = (call);                                                                         \
        if (r_ != cudaSuccess) return dl_fail(e, "ZeRO-2 staged gradients: %s failed: %s", #call, cudaGetErrorString(r_)); \
    } while (0)

struct GradStage {
    ZeroStagePlan P;  // a copy (arrays owned)
    int device;
    size_t gran;      // bytes per page
    CUdeviceptr base;
    size_t va_bytes;
    CUmemGenericAllocationHandle *perm_h;  // [P.n_perm]
    CUmemGenericAllocationHandle *slot_h;  // [P.slots * P.slot_pages] one page each; slot s: [s * slot_pages, ...)
    int *slot_owner;                       // [P.slots] bucket mapped there, -1: none
    bool *slot_released;                   // its reduction's release event was recorded
    cudaEvent_t *slot_ev;                  // [P.slots] recorded on the comm stream after the owner's reduction
    cudaEvent_t order_ev;                  // compute -> comm ordering
    int mapped, launched;                  // in the current backward
    bool compute_dirty;                    // compute work enqueued since the last ordering event
};

static CUmemAllocationProp prop_of(int device) {
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = device;
    return p;
}

int64_t grad_stage_page(int device, DlError *e) {
    if (load(e)) return -1;
    CUmemAllocationProp p = prop_of(device);
    size_t g = 0;
    DRV(D.granularity(&g, &p, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), "cuMemGetAllocationGranularity");
    if (g % 4) return dl_fail(e, "ZeRO-2 staged gradients: granularity %zu is not a multiple of 4 bytes", g);
    return (int64_t)(g / 4);
}

static int set_access(GradStage *g, CUdeviceptr p, size_t bytes, DlError *e) {
    CUmemAccessDesc a;
    memset(&a, 0, sizeof a);
    a.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    a.location.id = g->device;
    a.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    DRV(D.set_access(p, bytes, &a, 1), "cuMemSetAccess");
    return 0;
}

static int setup(GradStage *g, const ZeroStagePlan *P, int64_t n, int device, DlError *e) {
    if (load(e)) return -1;
    g->device = device;
    RT(cudaSetDevice(device));
    const int64_t page = grad_stage_page(device, e);
    if (page < 0) return -1;
    if (page != P->page)
        return dl_fail(e, "ZeRO-2 staged gradients: the plan's page is %lld elements, the device's %lld", (long long)P->page,
                       (long long)page);
    if (P->n_pages * page < n) return dl_fail(e, "ZeRO-2 staged gradients: the plan covers fewer than %lld elements", (long long)n);
    g->gran = (size_t)page * 4;
    g->va_bytes = (size_t)P->n_pages * g->gran;
    DRV(D.reserve(&g->base, g->va_bytes, g->gran, 0, 0), "cuMemAddressReserve");
    CUmemAllocationProp pr = prop_of(device);
    g->perm_h = (CUmemGenericAllocationHandle *)dl_calloc((size_t)(P->n_perm ? P->n_perm : 1), sizeof *g->perm_h);
    for (int i = 0; i < P->n_perm; i++) {
        const size_t at = (size_t)P->perm[2 * i] * g->gran, sz = (size_t)(P->perm[2 * i + 1] - P->perm[2 * i]) * g->gran;
        DRV(D.create(&g->perm_h[i], sz, &pr, 0), "cuMemCreate (permanent pages)");
        DRV(D.map(g->base + at, sz, 0, g->perm_h[i], 0), "cuMemMap (permanent pages)");
        if (set_access(g, g->base + at, sz, e)) return -1;
        RT(cudaMemset((void *)(g->base + at), 0, sz));
    }
    const int K = P->slots;
    g->slot_owner = (int *)dl_malloc((size_t)(K ? K : 1) * sizeof(int));
    g->slot_released = (bool *)dl_calloc((size_t)(K ? K : 1), sizeof(bool));
    g->slot_ev = (cudaEvent_t *)dl_calloc((size_t)(K ? K : 1), sizeof(cudaEvent_t));
    g->slot_h = (CUmemGenericAllocationHandle *)dl_calloc((size_t)(K * P->slot_pages + 1), sizeof *g->slot_h);
    for (int s = 0; s < K; s++) g->slot_owner[s] = -1;  // (grad_stage_free reads them if a create below fails)
    for (int s = 0; s < K; s++) {
        for (int64_t i = 0; i < P->slot_pages; i++)
            DRV(D.create(&g->slot_h[(size_t)s * P->slot_pages + i], g->gran, &pr, 0), "cuMemCreate (staging slot)");
        RT(cudaEventCreateWithFlags(&g->slot_ev[s], cudaEventDisableTiming));
    }
    RT(cudaEventCreateWithFlags(&g->order_ev, cudaEventDisableTiming));
    RT(cudaDeviceSynchronize());
    return 0;
}

static void plan_copy(ZeroStagePlan *d, const ZeroStagePlan *s) {
    *d = *s;
    d->b = (ZeroStageBucket *)dl_malloc((size_t)(s->n_bucket ? s->n_bucket : 1) * sizeof(ZeroStageBucket));
    memcpy(d->b, s->b, (size_t)s->n_bucket * sizeof(ZeroStageBucket));
    d->perm = (int64_t *)dl_malloc((size_t)(2 * s->n_perm + 2) * sizeof(int64_t));
    memcpy(d->perm, s->perm, (size_t)(2 * s->n_perm) * sizeof(int64_t));
    d->clear = (ZeroRange *)dl_malloc((size_t)(s->n_clear + 1) * sizeof(ZeroRange));
    memcpy(d->clear, s->clear, (size_t)s->n_clear * sizeof(ZeroRange));
}

GradStage *grad_stage_new(const ZeroStagePlan *P, int64_t n, int device, DlError *e) {
    GradStage *g = (GradStage *)dl_calloc(1, sizeof *g);
    plan_copy(&g->P, P);
    if (setup(g, P, n, device, e)) {
        grad_stage_free(g);
        return NULL;
    }
    return g;
}

// Pages [p0, p1) of the buffer: unmapped one by one (cuMemUnmap takes whole mappings), or mapped to the slot's
// allocations from index h on and made accessible (one call for the run).
static int unmap_run(GradStage *g, int64_t p0, int64_t p1, DlError *e) {
    for (int64_t p = p0; p < p1; p++) DRV(D.unmap(g->base + (size_t)p * g->gran, g->gran), "cuMemUnmap");
    return 0;
}

static int map_run(GradStage *g, int64_t p0, int64_t p1, const CUmemGenericAllocationHandle *h, DlError *e) {
    if (p1 <= p0) return 0;
    for (int64_t p = p0; p < p1; p++) DRV(D.map(g->base + (size_t)p * g->gran, g->gran, 0, h[p - p0], 0), "cuMemMap (staging slot)");
    return set_access(g, g->base + (size_t)p0 * g->gran, (size_t)(p1 - p0) * g->gran, e);
}

static int unmap_bucket(GradStage *g, int b, DlError *e) {
    const ZeroStageBucket *z = &g->P.b[b];
    return unmap_run(g, z->a0, z->a1, e) || unmap_run(g, z->b0, z->b1, e) ? -1 : 0;
}

void grad_stage_free(GradStage *g) {
    if (!g) return;
    DlError e;
    cudaDeviceSynchronize();
    for (int s = 0; g->slot_owner && s < g->P.slots; s++)
        if (g->slot_owner[s] >= 0) unmap_bucket(g, g->slot_owner[s], &e);
    for (int i = 0; g->perm_h && i < g->P.n_perm; i++)
        if (g->perm_h[i]) {
            D.unmap(g->base + (size_t)g->P.perm[2 * i] * g->gran, (size_t)(g->P.perm[2 * i + 1] - g->P.perm[2 * i]) * g->gran);
            D.release(g->perm_h[i]);
        }
    for (int64_t i = 0; g->slot_h && i < (int64_t)g->P.slots * g->P.slot_pages; i++)
        if (g->slot_h[i]) D.release(g->slot_h[i]);
    for (int s = 0; g->slot_ev && s < g->P.slots; s++)
        if (g->slot_ev[s]) cudaEventDestroy(g->slot_ev[s]);
    if (g->order_ev) cudaEventDestroy(g->order_ev);
    if (g->base) D.addr_free(g->base, g->va_bytes);
    free(g->perm_h), free(g->slot_h), free(g->slot_owner), free(g->slot_released), free(g->slot_ev);
    zero_stage_plan_free(&g->P);
    free(g);
}

float *grad_stage_ptr(GradStage *g) { return (float *)g->base; }
double grad_stage_bytes(const GradStage *g) { return zero_stage_bytes(&g->P); }
int grad_stage_mapped(const GradStage *g) { return g->mapped; }

int grad_stage_zero(GradStage *g, void *stream, DlError *e) {
    for (int i = 0; i < g->P.n_perm; i++)
        RT(cudaMemsetAsync((void *)(g->base + (size_t)g->P.perm[2 * i] * g->gran), 0,
                           (size_t)(g->P.perm[2 * i + 1] - g->P.perm[2 * i]) * g->gran, (cudaStream_t)stream));
    return 0;
}

int grad_stage_clear(GradStage *g, void *stream, DlError *e) {
    float *p = grad_stage_ptr(g);
    for (int i = 0; i < g->P.n_clear; i++)
        RT(cudaMemsetAsync(p + g->P.clear[i].off, 0, (size_t)g->P.clear[i].n * 4, (cudaStream_t)stream));
    return 0;
}

void grad_stage_begin(GradStage *g) { g->mapped = g->launched = 0, g->compute_dirty = true; }

// Gives bucket b its slot's memory (zeroed on compute), unless it still has it.
static int map_bucket(GradStage *g, int b, cudaStream_t compute, DlError *e) {
    const ZeroStageBucket *z = &g->P.b[b];
    if (z->sidx < 0) return 0;  // nothing staged
    const int s = z->sidx % g->P.slots;
    if (g->slot_owner[s] != b) {
        if (g->slot_owner[s] >= 0) {
            if (!g->slot_released[s])
                return dl_fail(e, "ZeRO-2 staged gradients: slot %d still holds bucket %d, whose reduction was not launched "
                                  "(bucket %d needs it; an internal error of the schedule)", s, g->slot_owner[s], b);
            RT(cudaEventSynchronize(g->slot_ev[s]));  // its reduction has read it
            if (unmap_bucket(g, g->slot_owner[s], e)) return -1;
            g->slot_owner[s] = -1;
        }
        const CUmemGenericAllocationHandle *h = g->slot_h + (size_t)s * g->P.slot_pages;  // run b after run a's pages
        if (map_run(g, z->a0, z->a1, h, e) || map_run(g, z->b0, z->b1, h + (z->a1 - z->a0), e)) return -1;
        g->slot_owner[s] = b;
    }
    g->slot_released[s] = false;
    if (z->a1 > z->a0)
        RT(cudaMemsetAsync((void *)(g->base + (size_t)z->a0 * g->gran), 0, (size_t)(z->a1 - z->a0) * g->gran, compute));
    if (z->b1 > z->b0)
        RT(cudaMemsetAsync((void *)(g->base + (size_t)z->b0 * g->gran), 0, (size_t)(z->b1 - z->b0) * g->gran, compute));
    g->compute_dirty = true;
    return 0;
}

int grad_stage_report(GradStage *g, const int *level, int lv, void *compute, void *comm, GradStageLaunch launch,
                      void *ctx, DlError *e) {
    const int nb = g->P.n_bucket;
    const int ready = zero_buckets_ready(level, nb, lv);
    g->compute_dirty = true;  // the layer just enqueued
    for (int b = g->launched; b < nb; b++) {
        if (b >= ready && g->P.b[b].hi < lv - 1) break;  // neither final nor written by the next layer
        if (b >= g->mapped) {
            if (map_bucket(g, b, (cudaStream_t)compute, e)) return -1;
            g->mapped = b + 1;
        }
        if (b < ready) {
            if (g->compute_dirty) {  // the reduction reads what the compute stream wrote (and zeroed)
                RT(cudaEventRecord(g->order_ev, (cudaStream_t)compute));
                RT(cudaStreamWaitEvent((cudaStream_t)comm, g->order_ev, 0));
                g->compute_dirty = false;
            }
            if (launch(ctx, b, comm, e)) return -1;
            const ZeroStageBucket *z = &g->P.b[b];
            if (z->sidx >= 0) {
                const int s = z->sidx % g->P.slots;
                RT(cudaEventRecord(g->slot_ev[s], (cudaStream_t)comm));
                g->slot_released[s] = true;
            }
            g->launched = b + 1;
        }
    }
    return g->launched;
}
