// gpu_bench_dp.cu: data-parallel scaling of the stage-1 distillation step (issue 8): the step of
// gpu_bench_engine (frozen bf16 teacher forward, hybrid student forward, CE + 0.1 KL, backward, AdamW on the
// Mamba mixers; Llama-3-8B-shaped layers, every other layer Mamba; random weights and tokens) driven through
// the training loop's own calls (train_model.h: tm_* for the models, tm_dp_* for the NCCL reductions, the
// sharded step and the gather), one process per GPU, launched by scripts/launch-local:
//   build/gpu_bench_dp [--layers 8] [--B 2] [--T 2048] [--accum 1] [--steps 10] [--warmup 3] [--zero 0|1|2]
//                      [--recompute] [--overlap] [--stage-grads]
//   scripts/launch-local -n 2 build/gpu_bench_dp --zero 1
// --overlap: each bucket's reduction goes out on the communicator's stream as soon as the backward has finished
// it (tm_dp_before_backward; train_model.h), instead of after the backward. Rank 0 prints every step's loss and
// gradient norm with 17 digits (the `step N:` lines): runs with and without --overlap must print the same digits
// (2 ranks: bitwise, train_model.h says why); tests/gpu/dp_scaling.sh compares them.
// --stage-grads (ZeRO-2): the staged gradient buffer (hardware.stage_grads, train_model.h tm_dp_stage_grads;
// implies --overlap). Rank 0 prints the line
//   MEMORY_DP zero=Z stage_grads=S grads_gib=... plan_grads_gib=... device_used_gib=... peak_step_used_gib=...
// grads: what the gradient buffer holds (zero_stage_plan's figure when staged), whole_grads: 4 x its elements,
// plan_saving = their difference, measured_saving: cudaMemGetInfo's used memory before minus after replacing the
// whole buffer by the staged one (setup, before any step), device_used: used memory after setup, peak_step_used:
// the most after any step (staging slots are allocated up front, so it should stay at device_used).
// One process is the 1-GPU baseline (no NCCL: tm_optim_step, as train_loop.c). Rank 0 prints per step the
// time of the micro-batches (forward, loss, backward, ZeRO-2's per-micro-batch reductions; a device sync
// ends them) and of the data-parallel step (reduction, global norm, AdamW, gather), and the line
//   RESULT_DP world=W zero=Z layers=L B=B T=T accum=A step_ms=... compute_ms=... dp_ms=... tokens_per_s=...
// with tokens_per_s = W x A x B x T / step time (the global batch). Scaling efficiency W GPUs vs 1:
// tokens_per_s(W) / (W x tokens_per_s(1)), for the same per-GPU batch (tests/gpu/dp_scaling.sh).
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
#include "distill/nccl_comm.h"
#include "distill/optim.h"
#include "distill/rng.h"
#include "distill/train_model.h"
#include "distill/zero.h"
}
#include "kernels/engine/gpu_bench_weights.cuh"

static void die(const char *what, const DlError *e) {
    fprintf(stderr, "gpu_bench_dp: %s: %s\n", what, e->msg);
    exit(1);
}

int main(int argc, char **argv) {
    int layers = 8, steps = 10, warmup = 3, zero = 0, accum = 1;
    int64_t B = 2, T = 2048;
    bool recompute = false, overlap = false, stage_grads = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--B") && i + 1 < argc) B = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--T") && i + 1 < argc) T = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--accum") && i + 1 < argc) accum = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--zero") && i + 1 < argc) zero = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--recompute")) recompute = true;
        else if (!strcmp(argv[i], "--overlap")) overlap = true;
        else if (!strcmp(argv[i], "--stage-grads")) stage_grads = overlap = true;
        else {
            fprintf(stderr, "usage: gpu_bench_dp [--layers L] [--B n] [--T n] [--accum n] [--steps n] [--warmup n] "
                            "[--zero 0|1|2] [--recompute] [--overlap] [--stage-grads]   (several GPUs: scripts/launch-local -n N build/gpu_bench_dp ...)\n");
            return 2;
        }
    }
    if (layers < 2 || B < 1 || T < 8 || accum < 1 || steps < 1 || warmup < 0 || zero < 0 || zero > 2) {
        fprintf(stderr, "gpu_bench_dp: bad option value\n");
        return 2;
    }
    DlError e;
    // ---- the process group (torchrun-style variables from scripts/launch-local) and NCCL
    DistOpts dopt;
    DistEnv denv;
    dist_opts_default(&dopt);
    if (dist_opts_from_env(&dopt, &e) || dist_env_detect(&dopt, &denv, &e)) die("launch environment", &e);
    const int world = denv.world_size;
    DistGroup *g = NULL;
    NcclComm *nc = NULL;
    int rank = 0;
    if (world > 1) {
        if (!(g = dist_init(&denv, &dopt, &e))) die("rendezvous", &e);
        rank = dist_rank(g);
        if (!(nc = nccl_comm_init(g, dist_local_rank(g), NULL, &e))) die("NCCL", &e);
    }
    // ---- Llama-3-8B-shaped teacher and 50% hybrid (attention at even layers), Mamba mixers trained
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    c.bos_id = c.eos_id = -1;
    c.rms_eps = 1e-5;
    c.max_pos = 8192;
    c.n_layer = layers;
    c.d_model = 4096, c.n_head = 32, c.n_kv_head = 8, c.head_dim = 128, c.d_ff = 14336, c.vocab = 128256;
    c.rope_theta = 500000, c.tied_embeddings = false;
    int attn[DL_MAX_LAYERS], na = 0;
    for (int l = 0; l < c.n_layer; l += 2) attn[na++] = l;
    HybridConfig hs, ht;
    if (hybrid_config_init(&hs, &c, MIXER_MAMBA1, attn, na, &e)) die("hybrid config", &e);
    hybrid_config_teacher(&ht, &c);
    Registry rs, rt;
    model_build_registry(&hs, &rs);
    model_build_registry(&ht, &rt);
    if (reg_set_trainable(&rs, "*.mamba.*", &e) < 0) die("trainable", &e);
    if (rank == 0)
        printf("gpu_bench_dp: %d GPU%s, ZeRO-%d, %d layers (%d Mamba-1 + %d attention) Llama-3-8B-shaped, B %lld x T %lld x "
               "accum %d per GPU%s; student %.2fB params (%.3fB trained), teacher %.2fB\n", world, world > 1 ? "s" : "", zero,
               c.n_layer, c.n_layer - na, na, (long long)B, (long long)T, accum, recompute ? ", MLP recompute" : "",
               reg_params_numel(&rs) / 1e9, reg_trainable_numel(&rs) / 1e9, reg_params_numel(&rt) / 1e9);
    // ---- models
    float *pt = (float *)dl_malloc((size_t)rt.numel * 4);
    bench_fill_random(&rt, pt, 1);
    TrainModel *teacher = tm_new(TM_CUDA, &ht, &rt, pt, B, T, TM_FROZEN, NULL, &e);
    if (!teacher) die("teacher", &e);
    free(pt);
    float *ps = (float *)dl_malloc((size_t)rs.numel * 4);
    bench_fill_random(&rs, ps, 2);
    TrainModel *student = tm_new(TM_CUDA, &hs, &rs, ps, B, T, TM_TRAIN | TM_TEACHER_KL | (recompute ? TM_RECOMPUTE_MLP : 0),
                                 rank == 0 ? stdout : NULL, &e);
    if (!student) die("student", &e);
    free(ps);  // uploaded; the host copy would only be read by tm_sync_host, never called here
    // ---- optimizer: this rank's owned ranges of the ZeRO layout (train_loop.c's dp_init)
    OptimConfig oc;
    optim_config_default(&oc);
    oc.lr = 1e-4;
    oc.total_steps = 1000;
    oc.grad_accum = accum * world;
    ZeroLayout Z;
    Registry oreg = rs;
    oreg.t = (TensorInfo *)dl_malloc((size_t)rs.n * sizeof(TensorInfo));
    memcpy(oreg.t, rs.t, (size_t)rs.n * sizeof(TensorInfo));
    oreg.cap = rs.n;
    if (zero_layout_build(&Z, &rs, world, zero, (int64_t)25 << 20, &e)) die("ZeRO layout", &e);
    if (zero > 0 && world > 1) zero_apply_shards(&Z, &oreg, rank);
    Optim o;
    if (optim_init(&o, &oc, &oreg, &e)) die("optimizer", &e);
    float *grads = tm_grads_new(student);
    TmDp *dp = NULL;
    if (world > 1 && !(dp = tm_dp_new(student, &o, &Z, rank, g, nc, overlap, &e))) die("data parallel", &e);
    const double whole_grads = 4.0 * (double)tm_grads_numel(student), dev0 = tm_device_bytes(student);
    size_t fr = 0, tot = 0;
    cudaDeviceSynchronize();
    cudaMemGetInfo(&fr, &tot);
    const double used_whole = (double)(tot - fr);
    if (stage_grads) {
        if (!dp || zero != 2) {
            fprintf(stderr, "gpu_bench_dp: --stage-grads needs 2 or more GPUs and --zero 2\n");
            return 2;
        }
        if (tm_dp_stage_grads(dp, &grads, true, &e)) die("staged gradients", &e);
    }
    const double grads_now = whole_grads - (dev0 - tm_device_bytes(student));  // the plan's figure when staged
    cudaDeviceSynchronize();
    cudaMemGetInfo(&fr, &tot);
    const double used0 = (double)(tot - fr);
    double peak_used = used0;
    if (rank == 0 && world > 1)
        printf("  ZeRO-%d plan: %d buckets, %lld trained elements, shard %lld per rank; AdamW moments %.2f GiB per GPU; "
               "overlap %s\n", zero, Z.n_bucket, (long long)Z.trainable_numel, (long long)Z.shard_numel,
               tm_dp_moment_bytes(&o) / 1073741824.0, overlap ? "on" : "off");
    // ---- data: random tokens, different on every rank
    const int64_t N = B * T;
    int32_t *tok = (int32_t *)dl_malloc((size_t)N * 4), *tgt = (int32_t *)dl_malloc((size_t)N * 4);
    uint8_t *mask = (uint8_t *)dl_malloc((size_t)N);
    memset(mask, 1, (size_t)N);
    Rng rg;
    rng_init(&rg, 9, 100 + (uint64_t)rank);
    TmLoss ls;
    memset(&ls, 0, sizeof ls);
    ls.w.ce = 1.0f;
    ls.w.kl = 0.1f;
    ls.teacher = teacher;
    double t_step = 0, t_comp = 0, t_dp = 0;
    for (int s = 0; s < warmup + steps; s++) {
        if (g && dist_barrier(g, &e)) die("barrier", &e);  // every rank starts the step together
        const double t0 = dl_now();
        tm_grads_zero(student, grads);
        double loss = 0;
        for (int a = 0; a < accum; a++) {
            for (int64_t i = 0; i < N; i++) tok[i] = (int32_t)rng_below(&rg, (uint64_t)c.vocab);
            for (int64_t i = 0; i < N; i++) tgt[i] = (i + 1) % T ? tok[i + 1] : -1;
            for (int64_t i = 0; i < N; i++) mask[i] = tgt[i] >= 0;
            if (tm_forward(teacher, tok, NULL, &e) || tm_forward(student, tok, NULL, &e)) die("forward", &e);
            LossParts lp = tm_loss(student, tgt, mask, &ls, grads, NULL);
            if (dp && tm_dp_before_backward(dp, grads, a == accum - 1, &e)) die("overlap", &e);
            tm_backward(student, grads);
            loss += lp.loss;
            if (dp && tm_dp_micro(dp, grads, &e)) die("ZeRO-2 reduction", &e);
        }
        cudaDeviceSynchronize();  // the split below only (the loop itself syncs at the step)
        const double t1 = dl_now();
        double sum = loss;
        if (g) {
            double all[64];
            if (world > 64) die("world", &e);
            if (dist_allgather(g, &loss, sizeof loss, all, &e)) die("allgather", &e);
            sum = 0;
            for (int q = 0; q < world; q++) sum += all[q];
        }
        const double mean = sum / (accum * world);
        OptimResult r;
        if (dp ? tm_dp_step(dp, grads, mean, &r, &e) : tm_optim_step(student, &o, grads, mean, &r, &e)) die("step", &e);
        cudaDeviceSynchronize();
        const double t2 = dl_now();
        cudaMemGetInfo(&fr, &tot);
        if ((double)(tot - fr) > peak_used) peak_used = (double)(tot - fr);
        if (s >= warmup) t_step += t2 - t0, t_comp += t1 - t0, t_dp += t2 - t1;
        if (rank == 0)
            printf("  step %d: loss %.17g, grad norm %.17g (%s), %.1f ms: micro-batches %.1f, data-parallel step %.1f\n", s, mean,
                   r.grad_norm, optim_outcome_name(r.outcome), 1e3 * (t2 - t0), 1e3 * (t1 - t0), 1e3 * (t2 - t1));
    }
    const double step_s = t_step / steps;
    if (rank == 0)
        printf("RESULT_DP world=%d zero=%d overlap=%d layers=%d B=%lld T=%lld accum=%d step_ms=%.1f compute_ms=%.1f dp_ms=%.1f "
               "tokens_per_s=%.0f per_gpu=%.0f\n", world, zero, overlap ? 1 : 0, c.n_layer, (long long)B, (long long)T, accum, 1e3 * step_s,
               1e3 * t_comp / steps, 1e3 * t_dp / steps, (double)world * accum * N / step_s, (double)accum * N / step_s);
    if (rank == 0)
        printf("MEMORY_DP zero=%d stage_grads=%d grads_gib=%.3f whole_grads_gib=%.3f plan_saving_gib=%.3f "
               "measured_saving_gib=%.3f device_used_gib=%.3f peak_step_used_gib=%.3f\n", zero, stage_grads ? 1 : 0,
               grads_now / 1073741824.0, whole_grads / 1073741824.0, (whole_grads - grads_now) / 1073741824.0,
               (used_whole - used0) / 1073741824.0, used0 / 1073741824.0, peak_used / 1073741824.0);
    tm_dp_free(dp);
    tm_grads_free(student, grads);
    tm_free(student);
    tm_free(teacher);
    optim_free(&o);
    zero_layout_free(&Z);
    free(oreg.t);
    free(tok), free(tgt), free(mask);
    if (nc) nccl_comm_free(nc);
    if (g) dist_close(g);
    return 0;
}
