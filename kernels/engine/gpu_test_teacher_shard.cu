// gpu_test_teacher_shard: the sharded teacher (kernels/engine/teacher_shard.h) against the replicated one.
//
// One GPU (default): simulated ranks. For teachers of 1, 2, 3 and 5 layers (tied and untied heads, odd sizes) and a
// SmolLM2-135M-shaped one (4 layers, random weights), W = 1, 2, 3, 4 simulated ranks, as rank 0 and as rank W-1:
// the other ranks' pieces are uploaded by the same code (teacher_shard_upload) and the "all-gather" copies them into
// the slot in rank order. Two forward passes on different batches: every hidden state, the final norm's output and
// the logits must be BITWISE the replicated engine's; the gathers counted (L in the first pass; in the second, the
// layers whose buffer no longer holds them: 0 for 1 or 2 layers); a student's CE + KL loss against the sharded teacher bitwise the same as against the replicated
// one (the head read from the global buffer). Errors: ECU_EXTERN_WEIGHTS on a trained, an fp32 or a hybrid model;
// a forward without weights; a failing gather (the forward returns its message); a misaligned weight.
// With --bench: forward time of an 8B-shaped teacher (--layers, default 4; B 1 x T 2048) replicated vs sharded
// (world 1 here: the gather is a device copy), so the overlap of the gathers with the layers shows.
//
// Two GPUs (--nccl, under scripts/launch-local -n 2): each rank runs the replicated and the sharded teacher (real
// ncclAllGather on the communicator's stream) on its own batch and compares bitwise; prints per rank
//   RESULT_TSHARD rank=R world=W identical=1 gathers=G bytes_sharded=... bytes_replicated=...
// and with --bench the timing line RESULT_TSHARD_BENCH (also per rank).
// Pass: "N passed, 0 failed" and exit status 0 (every rank).
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define _Noreturn [[noreturn]]  // C11 keyword in distill/common.h
extern "C" {
#include "distill/common.h"
#include "distill/dist.h"
#include "distill/model.h"
#include "distill/teacher_shard.h"
#ifdef DISTILL_NCCL
#include "distill/nccl_comm.h"
#endif
}
#include "kernels/engine/engine_cuda.h"
#include "kernels/engine/gpu_test_common.cuh"
#include "kernels/train/train_check.cuh"
#include "kernels/engine/teacher_shard.h"

static void cfg(LlamaConfig *c, int L, int d, int H, int KV, int hd, int ff, int V, bool tied) {
    memset(c, 0, sizeof *c);
    c->n_layer = L, c->d_model = d, c->n_head = H, c->n_kv_head = KV, c->head_dim = hd, c->d_ff = ff, c->vocab = V;
    c->max_pos = 4096, c->rope_theta = 10000, c->rms_eps = 1e-5, c->tied_embeddings = tied, c->bos_id = c->eos_id = -1;
}

// ---- simulated ranks: the other ranks' pieces on this GPU, "gathered" by copies in rank order
typedef struct {
    TShardPlan p;
    void **shard;  // [W] device bf16 [shard_total] (NULL for this rank: its piece comes as send)
    int rank;
    int fail_at;   // a layer whose gather fails (-1: none)
} Sim;

static int sim_gather(void *ctx, int layer, const void *send, void *recv, int64_t count, void *stream, DlError *e) {
    Sim *s = (Sim *)ctx;
    if (layer == s->fail_at) return dl_fail(e, "simulated gather failure at layer %d", layer);
    if (count != s->p.layer[layer].shard) return dl_fail(e, "count %lld, expected %lld", (long long)count, (long long)s->p.layer[layer].shard);
    for (int q = 0; q < s->p.world; q++) {
        const void *src = q == s->rank ? send : (const char *)s->shard[q] + (size_t)s->p.layer[layer].off * 2;
        cudaCheck(cudaMemcpyAsync((char *)recv + (size_t)(q * count) * 2, src, (size_t)count * 2, cudaMemcpyDeviceToDevice,
                                  (cudaStream_t)stream));
    }
    return 0;
}

// Everything the forward produces, on the host: hidden states 0..L, the final norm's output, the logits (bf16 bits).
typedef struct {
    uint16_t *h, *xf, *lg;
    int64_t nh, nxf, nlg;
} Outs;

static void outs_get(EngineCuda *E, const LlamaConfig *c, int64_t N, Outs *o) {
    const int64_t d = c->d_model, V = c->vocab;
    o->nh = (int64_t)(c->n_layer + 1) * N * d, o->nxf = N * d, o->nlg = N * V;
    o->h = (uint16_t *)malloc((size_t)o->nh * 2);
    o->xf = (uint16_t *)malloc((size_t)o->nxf * 2);
    o->lg = (uint16_t *)malloc((size_t)o->nlg * 2);
    for (int i = 0; i <= c->n_layer; i++) engine_cuda_copy_to_host(o->h + (int64_t)i * N * d, engine_cuda_hidden(E, i), (size_t)(N * d) * 2);
    engine_cuda_copy_to_host(o->xf, engine_cuda_final_hidden(E), (size_t)o->nxf * 2);
    void *lg = engine_cuda_alloc((size_t)o->nlg * 2);
    engine_cuda_logits(E, 0, N, lg);
    engine_cuda_copy_to_host(o->lg, lg, (size_t)o->nlg * 2);
    engine_cuda_dfree(lg);
}
static bool outs_equal(const Outs *a, const Outs *b) {
    return !memcmp(a->h, b->h, (size_t)a->nh * 2) && !memcmp(a->xf, b->xf, (size_t)a->nxf * 2) && !memcmp(a->lg, b->lg, (size_t)a->nlg * 2);
}
static void outs_free(Outs *o) { free(o->h), free(o->xf), free(o->lg); }

static void batch(int32_t *tok, int64_t N, int V, uint64_t seed) {
    Rng g;
    rng_init(&g, seed, 7);
    for (int64_t i = 0; i < N; i++) tok[i] = (int32_t)rng_below(&g, (uint64_t)V);
}

// Gathers the schedule makes in pass `pass` (0, 1) over L layers: a layer is gathered unless its slot (l mod 2) still
// holds it, and layer l + 1 is prefetched at layer l (teacher_shard.h).
static int64_t expected_gathers(int L, int pass) {
    int held[2] = {-1, -1};
    const int ns = L > 1 ? 2 : 1;
    int64_t g[2] = {0, 0};
    for (int p = 0; p < 2; p++)
        for (int l = 0; l < L; l++) {
            if (held[l % ns] != l) g[p]++, held[l % ns] = l;
            if (ns > 1 && l + 1 < L && held[(l + 1) % 2] != l + 1) g[p]++, held[(l + 1) % 2] = l + 1;
        }
    return g[pass];
}

// One model: the replicated reference, then the sharded teacher for each simulated world and rank.
static void model_case(const char *name, const LlamaConfig *c, int64_t B, int64_t T) {
    HybridConfig h;
    Registry r;
    hybrid_config_teacher(&h, c);
    model_build_registry(&h, &r);
    float *p = (float *)malloc((size_t)r.numel * sizeof(float));
    test_params_init(&r, p, 11, 0, false);
    const int64_t N = B * T;
    int32_t *tok[2] = {(int32_t *)malloc((size_t)N * 4), (int32_t *)malloc((size_t)N * 4)};
    int32_t *targ = (int32_t *)malloc((size_t)N * 4);
    batch(tok[0], N, c->vocab, 1), batch(tok[1], N, c->vocab, 2), batch(targ, N, c->vocab, 3);
    DlError e;
    EngineCuda *ref = engine_cuda_new(&h, &r, p, B, T, ECU_NO_MASTER | ECU_KEEP_HIDDEN, DT_BF16, 0, NULL, &e);
    die_if(!ref, &e, "replicated teacher");
    // a student (the same shape, trained) whose CE + KL loss reads the teacher's head
    EngineCuda *stu = engine_cuda_new(&h, &r, p, B, T, ECU_TRAIN | ECU_TEACHER_KL, DT_BF16, 0, NULL, &e);
    die_if(!stu, &e, "student");
    LossSpecCuda ls;
    memset(&ls, 0, sizeof ls);
    ls.w.ce = 1.0f, ls.w.kl = 1.0f, ls.w.temperature = 1.0f, ls.teacher = ref;
    Outs want[2];
    LossParts lwant[2];
    for (int k = 0; k < 2; k++) {
        die_if(engine_cuda_forward(ref, tok[k], NULL, &e) != 0, &e, "replicated forward");
        outs_get(ref, c, N, &want[k]);
        die_if(engine_cuda_forward(stu, tok[k], NULL, &e) != 0, &e, "student forward");
        lwant[k] = engine_cuda_loss(stu, targ, NULL, &ls, NULL, NULL);
    }
    double rep_bytes = 0;
    engine_cuda_memory(ref, &rep_bytes, NULL);
    const int worlds[] = {1, 2, 3, 4};
    for (int wi = 0; wi < 4; wi++) {
        const int W = worlds[wi];
        for (int rank = 0; rank < W; rank += (W > 1 ? W - 1 : 1)) {
            Sim sim;
            memset(&sim, 0, sizeof sim);
            die_if(tshard_plan(&sim.p, &r, c->n_layer, W, &e) != 0, &e, "plan");
            sim.rank = rank, sim.fail_at = -1;
            sim.shard = (void **)calloc((size_t)W, sizeof(void *));
            for (int q = 0; q < W; q++)
                if (q != rank) sim.shard[q] = teacher_shard_upload(&sim.p, q, p);
            EngineCuda *E = engine_cuda_new(&h, &r, NULL, B, T, ECU_NO_MASTER | ECU_KEEP_HIDDEN | ECU_EXTERN_WEIGHTS, DT_BF16,
                                            0, NULL, &e);
            die_if(!E, &e, "extern-weights teacher");
            TeacherShard *ts = teacher_shard_new(E, &r, c->n_layer, rank, W, p, sim_gather, &sim, NULL, NULL, &e);
            die_if(!ts, &e, "teacher_shard_new");
            bool same = true, lsame = true;
            int64_t g0 = 0, g1 = 0;
            for (int k = 0; k < 2; k++) {
                die_if(engine_cuda_forward(E, tok[k], NULL, &e) != 0, &e, "sharded forward");
                (k ? g1 : g0) = teacher_shard_gathers(ts) - (k ? g0 : 0);
                Outs got;
                outs_get(E, c, N, &got);
                same &= outs_equal(&got, &want[k]);
                outs_free(&got);
                LossSpecCuda lt = ls;
                lt.teacher = E;
                die_if(engine_cuda_forward(stu, tok[k], NULL, &e) != 0, &e, "student forward");
                LossParts lp = engine_cuda_loss(stu, targ, NULL, &lt, NULL, NULL);
                lsame &= !memcmp(&lp, &lwant[k], sizeof lp);
            }
            const int L = c->n_layer;
            check(same, "%s, W %d rank %d: hidden states, final norm and logits of 2 batches bitwise the replicated teacher's",
                  name, W, rank);
            check(lsame, "%s, W %d rank %d: the student's CE + KL loss against it bitwise the same (%.17g)", name, W, rank,
                  lwant[1].loss);
            check(g0 == L && g0 == expected_gathers(L, 0) && g1 == expected_gathers(L, 1),
                  "%s, W %d rank %d: gathers %lld + %lld (expected %lld + %lld)", name, W, rank, (long long)g0, (long long)g1,
                  (long long)expected_gathers(L, 0), (long long)expected_gathers(L, 1));
            if (W == 2 && rank == 0)
                printf("  %s: teacher weights per GPU replicated %.2f MB, sharded over 2 %.2f MB\n", name, rep_bytes / 1e6,
                       teacher_shard_bytes(ts) / 1e6);
            // a failing gather: the forward returns -1 with the gather's message (the hook is left as it was)
            if (W == 2 && rank == 0 && L >= 3) {
                sim.fail_at = 2;
                DlError fe = {0};
                int rc = engine_cuda_forward(E, tok[0], NULL, &fe);
                check(rc == -1 && strstr(fe.msg, "gathering layer 2") && strstr(fe.msg, "simulated gather failure"),
                      "%s: a failing gather fails the forward: %s", name, fe.msg);
                engine_cuda_sync();
            }
            teacher_shard_free(ts);
            engine_cuda_free(E);
            for (int q = 0; q < W; q++) engine_cuda_dfree(sim.shard[q]);
            free(sim.shard);
            tshard_plan_free(&sim.p);
        }
    }
    for (int k = 0; k < 2; k++) outs_free(&want[k]);
    engine_cuda_free(stu);
    engine_cuda_free(ref);
    free(tok[0]), free(tok[1]), free(targ), free(p);
    reg_free(&r);
}

static void error_cases(void) {
    LlamaConfig c;
    cfg(&c, 2, 128, 2, 1, 64, 256, 96, true);
    HybridConfig h;
    Registry r;
    hybrid_config_teacher(&h, &c);
    model_build_registry(&h, &r);
    DlError e = {0};
    EngineCuda *E = engine_cuda_new(&h, &r, NULL, 1, 16, ECU_TRAIN | ECU_EXTERN_WEIGHTS, DT_BF16, 0, NULL, &e);
    check(!E && strstr(e.msg, "ECU_EXTERN_WEIGHTS"), "extern weights on a trained engine refused: %s", e.msg);
    E = engine_cuda_new(&h, &r, NULL, 1, 16, ECU_NO_MASTER | ECU_EXTERN_WEIGHTS, DT_F32, 0, NULL, &e);
    check(!E && strstr(e.msg, "bf16"), "extern weights in fp32 refused: %s", e.msg);
    HybridConfig hy;
    const int attn[] = {0};
    die_if(hybrid_config_init(&hy, &c, MIXER_MAMBA1, attn, 1, &e) != 0, &e, "hybrid");
    Registry ry;
    model_build_registry(&hy, &ry);
    E = engine_cuda_new(&hy, &ry, NULL, 1, 16, ECU_NO_MASTER | ECU_EXTERN_WEIGHTS, DT_BF16, 0, NULL, &e);
    check(!E && strstr(e.msg, "without Mamba layers"), "extern weights on a hybrid refused: %s", e.msg);
    reg_free(&ry);
    E = engine_cuda_new(&h, &r, NULL, 1, 16, ECU_NO_MASTER | ECU_EXTERN_WEIGHTS, DT_BF16, 0, NULL, &e);
    die_if(!E, &e, "extern engine");
    int32_t tok[16] = {0};
    int rc = engine_cuda_forward(E, tok, NULL, &e);
    check(rc == -1 && strstr(e.msg, "has no weights"), "a forward without weights fails: %s", e.msg);
    void *buf = engine_cuda_alloc(4096);
    rc = engine_cuda_set_weight(E, 0, (char *)buf + 2, &e);
    check(rc == -1 && strstr(e.msg, "16-byte aligned"), "a misaligned weight refused: %s", e.msg);
    rc = engine_cuda_set_weight(E, r.n, buf, &e);
    check(rc == -1 && strstr(e.msg, "outside"), "a bad tensor index refused: %s", e.msg);
    engine_cuda_dfree(buf);
    engine_cuda_free(E);
    reg_free(&r);
}

// --bench: forward ms of an 8B-shaped teacher, replicated vs sharded (gather through `gather`).
static void bench(int layers, int rank, int world, TeacherShardGather gather, void *gctx, void *stream) {
    LlamaConfig c;
    cfg(&c, layers, 4096, 32, 8, 128, 14336, 128256, false);
    c.rope_theta = 500000;
    HybridConfig h;
    Registry r;
    hybrid_config_teacher(&h, &c);
    model_build_registry(&h, &r);
    float *p = (float *)malloc((size_t)r.numel * sizeof(float));
    for (int64_t i = 0; i < r.numel; i++)  // small deterministic values (random ones take minutes at this size)
        p[i] = (float)((int64_t)((uint64_t)i * 2654435761u % 2001) - 1000) * 2e-5f;
    for (int i = 0; i < r.n; i++)
        if (strstr(r.t[i].name, "norm"))
            for (int64_t j = 0; j < r.t[i].numel; j++) p[r.t[i].offset + j] = 1.0f;
    const int64_t B = 1, T = 2048, N = B * T;
    int32_t *tok = (int32_t *)malloc((size_t)N * 4);
    batch(tok, N, c.vocab, 9 + rank);
    DlError e;
    double ms[2] = {0, 0}, bytes[2] = {0, 0};
    for (int s = 0; s < 2; s++) {
        EngineCuda *E = engine_cuda_new(&h, &r, s ? NULL : p, B, T, ECU_NO_MASTER | (s ? ECU_EXTERN_WEIGHTS : 0), DT_BF16, 0,
                                        NULL, &e);
        die_if(!E, &e, "bench teacher");
        TeacherShard *ts = NULL;
        if (s) die_if(!(ts = teacher_shard_new(E, &r, layers, rank, world, p, gather, gctx, stream, NULL, &e)), &e, "bench shard");
        engine_cuda_memory(E, &bytes[s], NULL);
        if (ts) bytes[s] += teacher_shard_bytes(ts);
        cudaEvent_t a, b;
        cudaEventCreate(&a), cudaEventCreate(&b);
        const int reps = 5;
        for (int k = 0; k < reps + 2; k++) {
            if (k == 2) cudaEventRecord(a, (cudaStream_t)engine_cuda_stream(E));
            die_if(engine_cuda_forward(E, tok, NULL, &e) != 0, &e, "bench forward");
        }
        cudaEventRecord(b, (cudaStream_t)engine_cuda_stream(E));
        cudaEventSynchronize(b);
        float t = 0;
        cudaEventElapsedTime(&t, a, b);
        ms[s] = t / reps;
        cudaEventDestroy(a), cudaEventDestroy(b);
        teacher_shard_free(ts);
        engine_cuda_free(E);
    }
    printf("RESULT_TSHARD_BENCH rank=%d world=%d layers=%d B=1 T=2048 forward_ms_replicated=%.3f forward_ms_sharded=%.3f "
           "overhead=%.1f%% weights_GB_replicated=%.3f weights_GB_sharded=%.3f\n", rank, world, layers, ms[0], ms[1],
           100.0 * (ms[1] / ms[0] - 1), bytes[0] / 1e9, bytes[1] / 1e9);
    free(tok), free(p);
    reg_free(&r);
}

int main(int argc, char **argv) {
    bool nccl = false, do_bench = false;
    int layers = 4;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--nccl")) nccl = true;
        else if (!strcmp(argv[i], "--bench")) do_bench = true;
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--verbose")) g_verbose = 1;
        else {
            fprintf(stderr, "usage: gpu_test_teacher_shard [--bench [--layers L]] [--verbose]   (2 GPUs: scripts/launch-local "
                            "-n 2 build/gpu_test_teacher_shard --nccl [--bench])\n");
            return 2;
        }
    }
    if (layers < 1) layers = 1;
    if (!nccl) {
        const struct {
            const char *name;
            int L, d, H, KV, hd, ff, V;
            bool tied;
            int64_t B, T;
        } M[] = {{"1 layer, untied", 1, 128, 2, 1, 64, 200, 104, false, 2, 24},
                 {"2 layers, tied", 2, 128, 2, 2, 64, 256, 96, true, 2, 32},
                 {"3 layers, untied, odd sizes", 3, 192, 3, 1, 64, 328, 264, false, 3, 40},
                 {"5 layers, tied", 5, 256, 4, 2, 64, 344, 512, true, 2, 64},
                 {"SmolLM2-135M shape, 4 layers", 4, 576, 9, 3, 64, 1536, 49152, true, 2, 128}};
        for (size_t k = 0; k < sizeof M / sizeof M[0]; k++) {
            LlamaConfig c;
            cfg(&c, M[k].L, M[k].d, M[k].H, M[k].KV, M[k].hd, M[k].ff, M[k].V, M[k].tied);
            model_case(M[k].name, &c, M[k].B, M[k].T);
        }
        error_cases();
        if (do_bench) bench(layers, 0, 1, teacher_shard_copy_gather, NULL, NULL);
        printf("gpu_test_teacher_shard: %d passed, %d failed\n", g_pass, g_fail);
        return g_fail ? 1 : 0;
    }
#ifdef DISTILL_NCCL
    DlError e;
    DistOpts dopt;
    DistEnv denv;
    dist_opts_default(&dopt);
    if (dist_opts_from_env(&dopt, &e) || dist_env_detect(&dopt, &denv, &e)) die_if(true, &e, "launch environment");
    DistGroup *g = dist_init(&denv, &dopt, &e);
    die_if(!g, &e, "rendezvous");
    const int rank = dist_rank(g), world = dist_world(g);
    NcclComm *nc = nccl_comm_init(g, dist_local_rank(g), NULL, &e);
    die_if(!nc, &e, "NCCL");
    void *cs = nccl_comm_stream(nc, &e);
    die_if(!cs, &e, "NCCL stream");
    LlamaConfig c;
    cfg(&c, 5, 576, 9, 3, 64, 1536, 49152, true);  // SmolLM2-135M's layer and vocabulary shapes
    HybridConfig h;
    Registry r;
    hybrid_config_teacher(&h, &c);
    model_build_registry(&h, &r);
    float *p = (float *)malloc((size_t)r.numel * sizeof(float));
    test_params_init(&r, p, 11, 0, false);
    const int64_t B = 2, T = 128, N = B * T;
    int32_t *tok = (int32_t *)malloc((size_t)N * 4);
    EngineCuda *ref = engine_cuda_new(&h, &r, p, B, T, ECU_NO_MASTER | ECU_KEEP_HIDDEN, DT_BF16, 0, NULL, &e);
    die_if(!ref, &e, "replicated teacher");
    EngineCuda *E = engine_cuda_new(&h, &r, NULL, B, T, ECU_NO_MASTER | ECU_KEEP_HIDDEN | ECU_EXTERN_WEIGHTS, DT_BF16, 0,
                                    NULL, &e);
    die_if(!E, &e, "extern-weights teacher");
    TeacherShard *ts = teacher_shard_new(E, &r, c.n_layer, rank, world, p, tshard_nccl_gather, nc, cs, stdout, &e);
    die_if(!ts, &e, "teacher_shard_new");
    bool same = true;
    for (int k = 0; k < 3; k++) {  // each rank its own batches (data parallel)
        batch(tok, N, c.vocab, 100 + 10 * rank + k);
        die_if(engine_cuda_forward(ref, tok, NULL, &e) != 0, &e, "replicated forward");
        die_if(engine_cuda_forward(E, tok, NULL, &e) != 0, &e, "sharded forward");
        Outs a, b;
        outs_get(ref, &c, N, &a);
        outs_get(E, &c, N, &b);
        same &= outs_equal(&a, &b);
        outs_free(&a), outs_free(&b);
    }
    die_if(nccl_sync(nc, cs, &e) != 0, &e, "NCCL");
    double rb = 0;
    engine_cuda_memory(ref, &rb, NULL);
    check(same, "rank %d of %d: 3 batches' hidden states, final norm and logits bitwise the replicated teacher's", rank, world);
    printf("RESULT_TSHARD rank=%d world=%d identical=%d gathers=%lld bytes_sharded=%.0f bytes_replicated=%.0f\n", rank, world,
           same ? 1 : 0, (long long)teacher_shard_gathers(ts), teacher_shard_bytes(ts), rb);
    teacher_shard_free(ts);
    engine_cuda_free(E);
    engine_cuda_free(ref);
    free(tok), free(p);
    reg_free(&r);
    if (do_bench) bench(layers, rank, world, tshard_nccl_gather, nc, cs);
    int fails = g_fail, all[64] = {0};
    if (world <= 64 && dist_allgather(g, &fails, sizeof fails, all, &e) == 0)
        for (int q = 0; q < world; q++) g_fail += q == rank ? 0 : all[q];
    printf("gpu_test_teacher_shard (rank %d): %d passed, %d failed\n", rank, g_pass, g_fail);
    nccl_comm_free(nc);
    dist_close(g);
    return g_fail ? 1 : 0;
#else
    fprintf(stderr, "gpu_test_teacher_shard: --nccl needs a build with NCCL\n");
    return 2;
#endif
}
