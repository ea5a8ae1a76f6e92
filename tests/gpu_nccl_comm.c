// gpu_nccl_comm: the NCCL layer on real GPUs, one process per GPU (not in ctest: no GPU on the build
// machines). Launch:  scripts/launch-local -n 2 build/gpu_nccl_comm [--stall | --die] [--bench]
//   default  the ZeRO plan of zero.h on device: per-bucket reduce-scatter (in place) and all-gather of a
//            test registry's flat gradient, against the simulated ranks (zsim_*) on the host (bitwise for 2
//            ranks, where a sum of two is order-free; 1e-6 relative otherwise); fp32 average all-reduce;
//            bf16 all-reduce within bf16 rounding. Exit 0 if all pass.
//   --stall  the last rank never joins the all-reduce: every other rank's watchdog aborts after the
//            timeout (5 s) with a message naming the operation; they exit 0 if that happened in time.
//   --die    the last rank exits right after the init: the same, for a dead peer.
//   --bench  all-reduce bus bandwidth of 256 MiB bf16 / fp32 buffers (for docs/BENCHMARKS.md).
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "distill/dist.h"
#include "distill/nccl_comm.h"
#include "distill/zero.h"

#define CK(call)                                                                                                   \
    do {                                                                                                           \
        cudaError_t err_ = (call);                                                                                 \
        if (err_ != cudaSuccess) {                                                                                 \
            fprintf(stderr, "rank %d: %s: %s\n", rank, #call, cudaGetErrorString(err_));                           \
            return 1;                                                                                              \
        }                                                                                                          \
    } while (0)

static float val(int r, int64_t i) { return sinf(0.013f * (float)i + 0.7f * (float)r) * (1.0f + 0.01f * (float)r); }

static void build_reg(Registry *reg) {
    reg_init(reg);
    int64_t d[2] = {1000, 77};
    reg_add(reg, "embed", ROLE_EMBED, -1, 2, d);
    d[0] = 77;
    reg_add(reg, "norm", ROLE_NORM, 0, 1, d);
    d[0] = 513, d[1] = 129;
    reg_add(reg, "proj", ROLE_MAMBA, 0, 2, d);
    d[0] = 4097;
    reg_add(reg, "bias", ROLE_MAMBA, 0, 1, d);
}

int main(int argc, char **argv) {
    bool stall = false, die = false, bench = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--stall")) stall = true;
        else if (!strcmp(argv[i], "--die")) die = true;
        else if (!strcmp(argv[i], "--bench")) bench = true;
        else {
            fprintf(stderr, "usage: %s [--stall | --die] [--bench]\n", argv[0]);
            return 2;
        }
    }
    DistOpts o;
    dist_opts_default(&o);
    DistEnv env;
    DlError e = {{0}};
    if (dist_opts_from_env(&o, &e) || dist_env_detect(&o, &env, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    int rank = env.rank;
    DistGroup *g = dist_init(&env, &o, &e);
    if (!g) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    const int world = dist_world(g);
    NcclCommOpts no = {.timeout_s = (stall || die) ? 5 : 120, .grace_s = 30, .no_exit = true};
    double t0 = dl_now();
    NcclComm *c = nccl_comm_init(g, dist_local_rank(g), &no, &e);
    if (!c) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    printf("rank %d/%d (host %s, GPU %d): NCCL up in %.2f s\n", rank, world, dist_host_of(g, rank), dist_local_rank(g), dl_now() - t0);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    if (stall || die) {
        const int64_t n = 1 << 20;
        float *d;
        CK(cudaMalloc((void **)&d, n * sizeof(float)));
        CK(cudaMemset(d, 0, n * sizeof(float)));
        if (rank == world - 1) {
            if (die) _exit(1);
            sleep(20);  // never joins; the others must give up on their own
            return 0;
        }
        double ts = dl_now();
        int rc = nccl_all_reduce(c, d, d, n, DT_F32, false, s, &e);
        if (rc == 0) rc = nccl_sync(c, s, &e);
        double waited = dl_now() - ts;
        bool ok = rc == -1 && (strstr(e.msg, "did not complete") || strstr(e.msg, "asynchronous error")) && waited < 20;
        printf("rank %d: %s after %.1f s: %s -> %s\n", rank, stall ? "stalled peer" : "dead peer", waited, e.msg,
               ok ? "PASS" : "FAIL");
        nccl_comm_free(c);
        return ok ? 0 : 1;
    }

    int fails = 0;
    // ---- the ZeRO plan on device vs the simulated ranks
    Registry reg;
    build_reg(&reg);
    ZeroLayout L;
    if (zero_layout_build(&L, &reg, world, 2, 256 << 10, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    const int64_t F = L.flat_numel;
    float **hflat = dl_calloc((size_t)world, sizeof(float *)), **hshard = dl_calloc((size_t)world, sizeof(float *));
    for (int r = 0; r < world; r++) {  // every rank's gradient is computable anywhere: the oracle needs all
        hflat[r] = dl_malloc((size_t)F * 4);
        hshard[r] = dl_malloc((size_t)L.shard_numel * 4);
        for (int64_t i = 0; i < F; i++) hflat[r][i] = val(r, i);
    }
    zsim_reduce_scatter(&L, (const float *const *)hflat, hshard, false);
    float *dflat, *back = dl_malloc((size_t)F * 4);
    CK(cudaMalloc((void **)&dflat, (size_t)F * 4));
    CK(cudaMemcpy(dflat, hflat[rank], (size_t)F * 4, cudaMemcpyHostToDevice));
    for (int b = 0; b < L.n_bucket; b++) {  // in place: the rank's slice of each bucket
        const ZeroBucket *k = &L.bucket[b];
        if (nccl_reduce_scatter(c, dflat + k->flat_begin, dflat + k->flat_begin + (int64_t)rank * k->slice, k->slice, DT_F32,
                                false, s, &e)) {
            fprintf(stderr, "%s\n", e.msg);
            return 1;
        }
    }
    if (nccl_sync(c, s, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    CK(cudaMemcpy(back, dflat, (size_t)F * 4, cudaMemcpyDeviceToHost));
    double maxrel = 0, dn = 0, nn = 0;  // maxrel: relative L2 norm of the difference
    int64_t diff = 0;
    for (int b = 0; b < L.n_bucket; b++) {
        const ZeroBucket *k = &L.bucket[b];
        for (int64_t i = 0; i < k->slice; i++) {
            float got = back[k->flat_begin + (int64_t)rank * k->slice + i], want = hshard[rank][k->shard_offset + i];
            diff += memcmp(&got, &want, 4) != 0;
            dn += ((double)got - want) * ((double)got - want);
            nn += (double)want * want;
        }
    }
    maxrel = sqrt(dn / nn);
    bool rs_ok = world == 2 ? diff == 0 : maxrel < 1e-6;
    printf("rank %d: reduce-scatter of %d buckets (%lld elements): %lld differ from the simulated ranks, rel norm %.2e %s\n", rank,
           L.n_bucket, (long long)F, (long long)diff, maxrel, rs_ok ? "PASS" : "FAIL");
    fails += !rs_ok;
    // all-gather of the (device-reduced) shards, in place
    for (int b = 0; b < L.n_bucket; b++) {
        const ZeroBucket *k = &L.bucket[b];
        if (nccl_all_gather(c, dflat + k->flat_begin + (int64_t)rank * k->slice, dflat + k->flat_begin, k->slice, DT_F32, s, &e)) {
            fprintf(stderr, "%s\n", e.msg);
            return 1;
        }
    }
    if (nccl_sync(c, s, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    float *gathered = dl_malloc((size_t)F * 4);
    CK(cudaMemcpy(gathered, dflat, (size_t)F * 4, cudaMemcpyDeviceToHost));
    // every slot must hold exactly what its owner had after the reduce-scatter: compare with the oracle slices
    float **hf2 = dl_calloc((size_t)world, sizeof(float *));
    for (int r = 0; r < world; r++) hf2[r] = dl_malloc((size_t)F * 4);
    zsim_all_gather(&L, (const float *const *)hshard, hf2);
    dn = nn = 0;
    for (int64_t i = 0; i < F; i++) {
        dn += ((double)gathered[i] - hf2[rank][i]) * ((double)gathered[i] - hf2[rank][i]);
        nn += (double)hf2[rank][i] * hf2[rank][i];
    }
    maxrel = sqrt(dn / nn);
    bool ag_ok = world == 2 ? !memcmp(gathered, hf2[rank], (size_t)F * 4) : maxrel < 1e-6;
    printf("rank %d: all-gather: rel norm %.2e vs simulated %s\n", rank, maxrel, ag_ok ? "PASS" : "FAIL");
    fails += !ag_ok;
    // fp32 average all-reduce, bf16 sum all-reduce
    CK(cudaMemcpy(dflat, hflat[rank], (size_t)F * 4, cudaMemcpyHostToDevice));
    uint16_t *hb = dl_malloc((size_t)F * 2), *db;
    for (int64_t i = 0; i < F; i++) hb[i] = f32_to_bf16(val(rank, i));
    CK(cudaMalloc((void **)&db, (size_t)F * 2));
    CK(cudaMemcpy(db, hb, (size_t)F * 2, cudaMemcpyHostToDevice));
    if (nccl_group_begin(c, &e) || nccl_all_reduce(c, dflat, dflat, F, DT_F32, true, s, &e) ||
        nccl_all_reduce(c, db, db, F, DT_BF16, false, s, &e) || nccl_group_end(c, &e) || nccl_sync(c, s, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    CK(cudaMemcpy(back, dflat, (size_t)F * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hb, db, (size_t)F * 2, cudaMemcpyDeviceToHost));
    double e32 = 0, e16 = 0, n2 = 0;
    for (int64_t i = 0; i < F; i++) {
        double sum = 0;
        for (int r = 0; r < world; r++) sum += val(r, i);
        e32 += (back[i] - sum / world) * (back[i] - sum / world) * world * world;
        e16 += (bf16_to_f32(hb[i]) - sum) * (bf16_to_f32(hb[i]) - sum);
        n2 += sum * sum;
    }
    e16 = sqrt(e16 / n2);
    e32 = sqrt(e32 / n2);
    bool ar_ok = e32 < 1e-6 && e16 < 1e-2;
    printf("rank %d: all-reduce fp32 avg rel norm %.2e, bf16 sum rel norm %.2e %s\n", rank, e32, e16, ar_ok ? "PASS" : "FAIL");
    fails += !ar_ok;

    if (bench) {
        const int64_t bytes = 256ll << 20;
        void *d;
        CK(cudaMalloc(&d, bytes));
        CK(cudaMemset(d, 0, bytes));
        for (int w = 0; w < 2; w++) {
            DType dt = w ? DT_BF16 : DT_F32;
            int64_t n = bytes / (w ? 2 : 4);
            for (int it = 0; it < 3; it++) nccl_all_reduce(c, d, d, n, dt, false, s, &e);
            nccl_sync(c, s, &e);
            double tb = dl_now();
            const int iters = 20;
            for (int it = 0; it < iters; it++) nccl_all_reduce(c, d, d, n, dt, false, s, &e);
            if (nccl_sync(c, s, &e)) {
                fprintf(stderr, "%s\n", e.msg);
                return 1;
            }
            double sec = (dl_now() - tb) / iters;
            double busbw = (double)bytes / sec * 2.0 * (world - 1) / world / 1e9;
            if (rank == 0)
                printf("all-reduce %s 256 MiB over %d GPUs: %.3f ms, bus bandwidth %.1f GB/s\n", w ? "bf16" : "fp32", world,
                       sec * 1e3, busbw);
        }
        cudaFree(d);
    }
    DlError be;
    if (dist_barrier(g, &be)) fprintf(stderr, "%s\n", be.msg);
    nccl_comm_free(c);
    dist_close(g);
    printf("rank %d: %s\n", rank, fails ? "FAILED" : "all passed");
    return fails ? 1 : 0;
}
