// gpu_bench_engine.cu: the stage-1 distillation step on the CUDA engine: frozen bf16 teacher forward + hybrid
// student forward, CE + 0.1 KL over the vocabulary (streamed in row chunks), backward, AdamW on the Mamba
// mixers only (every other layer is Mamba, attention kept at even layers). Random weights.
//   gpu_bench_engine [--model smollm2|llama8b] [--layers L] [--B 2] [--T 2048] [--steps 10] [--warmup 3]
//                    [--recompute] [--attn-cuda-cores] [--chunk rows[,rows...]] [--share-prefix] [--attn-odd] [--plan-only]
//                    [--moments fp32|bf16]
// Reports ms/step, tokens/s and MFU. FLOPs counted: teacher forward + 3x student forward (forward and
// backward), GEMMs 2*m*n*k, causal attention 2*T*nh*hd per token for QK^T and PV each (half the square),
// scan and element-wise work not counted. MFU against the 989 TFLOP/s dense bf16 peak of the H100 SXM and
// against the bf16 GEMM rate measured here (8192^3 through dl_gemm).
// Memory: the engines' allocations by purpose (engine_cuda_memory_parts, the optimizer's moments) next to
// plan_stage()'s estimate (the --dry-run formula) with their ratio, and cudaMemGetInfo's use. --plan-only prints
// that comparison from engine_cuda_plan (what the engines would allocate) and exits without touching a GPU.
// --chunk: rows of logits per loss chunk; 0 (the default) is the engine's default, which the pipeline runs and
// the plan assumes. A list (--chunk 0,256,1024) measures the step at each in one process: the random weights
// are generated once and the engines rebuilt per chunk; each gives a RESULT line naming its chunk.
// --moments bf16: AdamW moments in bf16 with stochastic rounding (optimizer.moments = "bf16"; default fp32).
// --attn-odd: attention kept at the odd layers, Mamba at 0, 2, ... (the layout of the recipes and of MambaInLlama's
// 50% Llama-3 models: the backward then runs down to layer 0); the default keeps attention at the even layers.
// --share-prefix: the student's layers below its first Mamba layer get the teacher's weights (as stage 1's
// initialization gives them: frozen and equal), the teacher keeps its hidden states, and the student's forward
// starts from the teacher's hidden state there (engine_cuda_forward_range) instead of recomputing those layers.
// The pipeline (train_loop.c) does not do this yet; the option measures what it would save.
// Environment: DISTILL_ATTN=cudnn|native picks the attention kernels (engine_cuda.cu attn_select; the RESULT line
// names it); DISTILL_ENGINE_PROFILE=1 prints each engine's GPU time per region of the step when it is freed (the
// regions synchronize, so the step times printed then are not the benchmark's); DISTILL_GEMM_TUNE=1 tunes the GEMMs
// (kernels/train/gemm_lt.cu; the RESULT line says gemm_tune=1; the first step of a fresh tuning is a warm-up step).
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/engine/engine_cuda.h"
#include "kernels/train/train_cuda.h"

extern "C" {
#include "distill/plan.h"
#include "distill/recipe.h"
#include "distill/rng.h"
}
#include "kernels/engine/gpu_bench_weights.cuh"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Forward FLOPs per token of a model (see the header).
static double fwd_flops_per_token(const HybridConfig *h, int64_t T) {
    const LlamaConfig *c = &h->base;
    const double d = c->d_model, ff = c->d_ff, V = c->vocab, qd = (double)c->n_head * c->head_dim;
    const double kvd = (double)c->n_kv_head * c->head_dim, di = h->d_inner, dxb = h->d_xb, R = h->dt_rank;
    double f = 2 * d * V;  // head
    for (int l = 0; l < c->n_layer; l++) {
        f += 2 * 3 * d * ff;
        if (h->mixer[l] == MIXER_ATTN) f += 2 * (2 * d * qd + 2 * d * kvd) + 2 * 2 * (T / 2.0) * qd;
        else f += 2 * (d * di + 2 * d * dxb + d * di + d * R + R * di + di * d);
    }
    return f;
}

static double gemm_rate(void) {
    const int n = 8192;
    void *A, *B, *C;
    cudaMalloc(&A, (size_t)n * n * 2);
    cudaMalloc(&B, (size_t)n * n * 2);
    cudaMalloc(&C, (size_t)n * n * 2);
    cudaMemset(A, 0, (size_t)n * n * 2);
    cudaMemset(B, 0, (size_t)n * n * 2);
    char err[256];
    DlGemm *g = dl_gemm_new(0, err, sizeof err);
    for (int i = 0; i < 3; i++) dl_gemm(g, n, n, n, DT_BF16, A, 0, B, 1, DT_BF16, C, NULL, 1, 0, NULL, err, sizeof err);
    cudaDeviceSynchronize();
    const int reps = 20;
    double t0 = now();
    for (int i = 0; i < reps; i++) dl_gemm(g, n, n, n, DT_BF16, A, 0, B, 1, DT_BF16, C, NULL, 1, 0, NULL, err, sizeof err);
    cudaDeviceSynchronize();
    double dt = (now() - t0) / reps;
    dl_gemm_free(g);
    cudaFree(A), cudaFree(B), cudaFree(C);
    return 2.0 * n * n * (double)n / dt;
}

// The engines' device memory by purpose next to the plan's estimate (MemEstimate) and their ratio. optim: the
// AdamW moments' bytes. measured: cudaMemGetInfo's difference over the engines' creation (< 0: not measured).
static void print_vs_plan(const EngineCudaMemory *s, const EngineCudaMemory *t, double optim, const StagePlan *sp,
                          double measured) {
    const MemEstimate *p = &sp->mem;
    const double G = 1073741824.0;
    const struct {
        const char *name;
        double engine, plan;
    } rows[] = {
        {"weights (bf16 copy + padded dt)", s->compute + s->padded, p->weights},
        {"fp32 master", s->master, p->master},
        {"gradients", s->grads, p->grads},
        {"AdamW moments", optim, p->optim},
        {"teacher weights", t->compute + t->master + t->padded, p->frozen_model},
        {"activations (both tables)", s->activations - s->logits + t->activations - t->logits, p->activations},
        {"logits chunks", s->logits + t->logits, p->logits},
    };
    double et = 0;
    printf("  memory (GiB)                        engine      plan   engine/plan\n");
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        et += rows[i].engine;
        printf("    %-32s %9.3f %9.3f   %s", rows[i].name, rows[i].engine / G, rows[i].plan / G, rows[i].plan > 0 ? "" : "-\n");
        if (rows[i].plan > 0) printf("%.3f\n", rows[i].engine / rows[i].plan);
    }
    printf("    %-32s %9.3f %9.3f   %.3f\n", "total", et / G, p->total / G, et / p->total);
    if (measured >= 0)
        printf("  memory: %.3f GiB used on the GPU (cudaMemGetInfo over the engines' creation, cuBLASLt workspaces "
               "included), plan %.3f GiB: %+.1f%%\n", measured / G, p->total / G, 100.0 * (measured - p->total) / p->total);
    printf("RESULT_MEMORY engine_GiB=%.3f plan_GiB=%.3f ratio=%.3f%s\n", et / G, p->total / G, et / p->total,
           measured >= 0 ? "" : " (engine_cuda_plan)");
}

int main(int argc, char **argv) {
    const char *model = "llama8b";
    int layers = 8, steps = 10, warmup = 3;
    int64_t B = 2, T = 2048;
    bool recompute = false, plan_only = false, share = false, attn_odd = false, m16 = false;
    int64_t chunks[16] = {0};
    int n_chunks = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--B") && i + 1 < argc) B = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--T") && i + 1 < argc) T = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--recompute")) recompute = true;
        else if (!strcmp(argv[i], "--share-prefix")) share = true;
        else if (!strcmp(argv[i], "--attn-odd")) attn_odd = true;
        else if (!strcmp(argv[i], "--moments") && i + 1 < argc && (!strcmp(argv[i + 1], "bf16") || !strcmp(argv[i + 1], "fp32")))
            m16 = !strcmp(argv[++i], "bf16");
        else if (!strcmp(argv[i], "--chunk") && i + 1 < argc) {
            n_chunks = 0;
            for (char *p = argv[++i]; *p && n_chunks < 16;) {
                chunks[n_chunks++] = strtoll(p, &p, 10);
                if (*p == ',') p++;
                else if (*p) n_chunks = 0, *p = 0;  // not a list of numbers: usage
            }
            for (int k = 0; k < n_chunks; k++)
                if (chunks[k] < 0) n_chunks = 0;
            if (n_chunks == 0) {
                fprintf(stderr, "gpu_bench_engine: --chunk wants rows[,rows...] (0: the engine's default)\n");
                return 2;
            }
        }
        else if (!strcmp(argv[i], "--attn-cuda-cores")) attention_use_tensor_cores(0);
        else if (!strcmp(argv[i], "--plan-only")) plan_only = true;
        else {
            fprintf(stderr, "usage: gpu_bench_engine [--model smollm2|llama8b] [--layers L] [--B n] [--T n] [--steps n] "
                            "[--warmup n] [--recompute] [--attn-cuda-cores] [--chunk rows[,rows...]] [--share-prefix] [--attn-odd] [--plan-only] "
                            "[--moments fp32|bf16]\n");
            return 2;
        }
    }
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    c.bos_id = c.eos_id = -1;
    c.rms_eps = 1e-5;
    c.max_pos = 8192;
    if (!strcmp(model, "smollm2")) {  // SmolLM2-135M
        c.n_layer = layers > 0 && layers != 8 ? layers : 30;
        c.d_model = 576, c.n_head = 9, c.n_kv_head = 3, c.head_dim = 64, c.d_ff = 1536, c.vocab = 49152;
        c.rope_theta = 100000, c.tied_embeddings = true;
    } else {  // Llama-3-8B-shaped layers
        c.n_layer = layers;
        c.d_model = 4096, c.n_head = 32, c.n_kv_head = 8, c.head_dim = 128, c.d_ff = 14336, c.vocab = 128256;
        c.rope_theta = 500000, c.tied_embeddings = false;
    }
    int attn[DL_MAX_LAYERS], na = 0;
    for (int l = attn_odd ? 1 : 0; l < c.n_layer; l += 2) attn[na++] = l;
    HybridConfig hs, ht;
    DlError e;
    if (hybrid_config_init(&hs, &c, MIXER_MAMBA1, attn, na, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    hybrid_config_teacher(&ht, &c);
    Registry rs, rt;
    model_build_registry(&hs, &rs);
    model_build_registry(&ht, &rt);
    if (reg_set_trainable(&rs, "*.mamba.*", &e) < 0) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    const int sflags = ECU_TRAIN | ECU_TEACHER_KL | (recompute ? ECU_RECOMPUTE_MLP : 0);
    // ---- the plan's estimate for the same stage (what `distill RECIPE --dry-run` prints)
    StagePlan sp;
    bool have_plan = false;
    {
        Recipe r;
        memset(&r, 0, sizeof r);
        r.teacher_cfg = ht;
        r.hybrid.mixer = 0;
        r.hybrid.n_attn = na;
        memcpy(r.hybrid.attn_layers, attn, sizeof(int) * na);
        r.run.device = DEVICE_CUDA;
        r.hardware.gpus = 1;
        r.hardware.zero = 0;
        r.hardware.recompute = recompute ? RECOMPUTE_MLP : RECOMPUTE_NONE;
        DataSpec ds;
        memset(&ds, 0, sizeof ds);
        ds.seq_len = (int)T;
        r.data = &ds;
        r.n_data = 1;
        StageSpec st;
        memset(&st, 0, sizeof st);
        st.kind = STAGE_DISTILL;
        st.data_index = 0;
        st.loss.ce = 1.0;
        st.loss.kl = 0.1;
        st.trainable = (char *)"*.mamba.*";
        st.opt.micro_batch = (int)B;
        st.opt.grad_accum = 1;
        st.opt.moments = m16 ? MOMENTS_BF16 : MOMENTS_FP32;
        st.teacher_logits = TEACHER_ONLINE;
        if (plan_stage(&r, &st, 0, &sp, &e) == 0) have_plan = true;
        else printf("  plan_stage: %s\n", e.msg);
    }
    // the engine's rows per loss chunk for a --chunk value (its activation table's logits entry says it)
    auto chunk_rows_of = [&](const EngineCudaMemory *m) {
        return (int64_t)llround(m->logits / 2.0 / (2.0 * c.vocab));  // two bf16 chunks (student, teacher's for KL)
    };
    printf("gpu_bench_engine: %s, %s: %d layers (%d Mamba-1 + %d attention), d %d, vocab %d, B %lld x T %lld%s, loss "
           "chunk", plan_only ? "plan only (no GPU)" : "", model, c.n_layer, c.n_layer - na, na, c.d_model, c.vocab,
           (long long)B, (long long)T, recompute ? ", MLP recompute" : "");
    for (int k = 0; k < n_chunks; k++) printf("%s %lld%s", k ? "," : "", (long long)chunks[k], chunks[k] > 0 ? "" : " (engine default)");
    printf(" rows\n");
    printf("  student %.1fM params (%.1fM trainable), teacher %.1fM\n", reg_params_numel(&rs) / 1e6,
           reg_trainable_numel(&rs) / 1e6, reg_params_numel(&rt) / 1e6);
    if (plan_only) {
        for (int k = 0; k < n_chunks; k++) {
            EngineCudaMemory ms, mt;
            if (engine_cuda_plan(&hs, &rs, B, T, sflags, DT_BF16, chunks[k], &ms, &e) ||
                engine_cuda_plan(&ht, &rt, B, T, ECU_NO_MASTER, DT_BF16, chunks[k], &mt, &e)) {
                fprintf(stderr, "engine_cuda_plan: %s\n", e.msg);
                return 1;
            }
            printf("  --chunk %lld: the engine's loss chunk is %lld rows\n", (long long)chunks[k], (long long)chunk_rows_of(&ms));
            // AdamW fp32 m and v over the compact gradient layout (engine_cuda_optim_attach)
            if (have_plan) print_vs_plan(&ms, &mt, (m16 ? 1 : 2) * ms.grads, &sp, -1);  // m and v: 2 x 4 or 2 x 2 bytes
        }
        return 0;
    }
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    printf("  device: %s\n", prop.name);
    // ---- random weights, once (host fp32, registry layout): the teacher's, then the student's
    float *pt = (float *)malloc((size_t)rt.numel * 4), *ps = (float *)malloc((size_t)rs.numel * 4);
    if (!pt || !ps) {
        fprintf(stderr, "gpu_bench_engine: out of host memory for the weights (%.1f GB)\n", (rt.numel + rs.numel) * 4e-9);
        return 1;
    }
    bench_fill_random(&rt, pt, 1);
    int lowest = 0;  // the student's first Mamba layer
    while (lowest < c.n_layer && hs.mixer[lowest] != MIXER_MAMBA1) lowest++;
    if (share)
        printf("  --share-prefix: student layers 0..%d take the teacher's weights; the student's forward starts from the "
               "teacher's hidden state %d\n", lowest - 1, lowest);
    bench_fill_random(&rs, ps, 2);
    for (int i = 0; share && i < rs.n; i++) {  // by name: layers below `lowest` and the non-layer tensors (as stage 1 inits)
        const TensorInfo *t = &rs.t[i];
        const int j = reg_find(&rt, t->name);
        if (j >= 0 && t->layer < lowest) memcpy(ps + t->offset, pt + rt.t[j].offset, (size_t)t->numel * 4);
    }
    const int64_t N = B * T;
    int32_t *tok = (int32_t *)malloc(N * 4), *tgt = (int32_t *)malloc(N * 4);
    Rng g;
    rng_init(&g, 9, 9);
    for (int64_t i = 0; i < N; i++) tok[i] = (int32_t)rng_below(&g, (uint64_t)c.vocab);
    for (int64_t i = 0; i < N; i++) tgt[i] = (i + 1) % T ? tok[i + 1] : -1;
    const double rate = gemm_rate();
    for (int k = 0; k < n_chunks; k++) {
        const int64_t chunk = chunks[k];
        size_t free0, tot;
        cudaMemGetInfo(&free0, &tot);
        EngineCuda *teacher = engine_cuda_new(&ht, &rt, pt, B, T, ECU_NO_MASTER | (share ? ECU_KEEP_HIDDEN : 0), DT_BF16,
                                              chunk, k ? NULL : stdout, &e);
        if (!teacher) {
            fprintf(stderr, "teacher: %s\n", e.msg);
            return 1;
        }
        EngineCuda *student = engine_cuda_new(&hs, &rs, ps, B, T, sflags, DT_BF16, chunk, k ? NULL : stdout, &e);
        if (!student) {
            fprintf(stderr, "student: %s\n", e.msg);
            return 1;
        }
        OptimConfig oc;
        optim_config_default(&oc);
        oc.lr = 1e-4;
        oc.total_steps = 1000;
        EngineCudaOptim *opt = engine_cuda_optim_new(student, &oc, m16 ? DT_BF16 : DT_F32, &e);
        if (!opt) {
            fprintf(stderr, "optim: %s\n", e.msg);
            return 1;
        }
        float *grads = engine_cuda_grads_new(student);
        size_t free1;
        cudaMemGetInfo(&free1, &tot);
        EngineCudaMemory ms, mt;
        engine_cuda_memory_parts(student, &ms);
        engine_cuda_memory_parts(teacher, &mt);
        const int64_t rows = chunk_rows_of(&ms);
        printf("== loss chunk %lld rows (--chunk %lld)\n", (long long)rows, (long long)chunk);
        if (have_plan && (k == 0 || chunk == 0)) print_vs_plan(&ms, &mt, engine_cuda_optim_bytes(opt), &sp, (double)(free0 - free1));
        // ---- the step
        LossSpecCuda ls;
        memset(&ls, 0, sizeof ls);
        ls.w.ce = 1.0f;
        ls.w.kl = 0.1f;
        ls.teacher = teacher;
        double tsum = 0, tfwd_t = 0, tloss = 0;
        LossParts lp;
        memset(&lp, 0, sizeof lp);
        for (int s = 0; s < warmup + steps; s++) {
            engine_cuda_sync();
            double t0 = now();
            engine_cuda_zero_trainable(student, grads);
            if (engine_cuda_forward(teacher, tok, NULL, &e) ||
                (share ? engine_cuda_forward_range(student, tok, NULL, lowest, engine_cuda_hidden(teacher, lowest), c.n_layer, &e)
                       : engine_cuda_forward(student, tok, NULL, &e))) {
                fprintf(stderr, "%s\n", e.msg);
                return 1;
            }
            engine_cuda_sync();
            double t1 = now();
            lp = engine_cuda_loss(student, tgt, NULL, &ls, grads, NULL);
            engine_cuda_sync();
            double tl = now();
            engine_cuda_backward(student, grads);
            engine_cuda_sync();
            double tb = now();
            OptimResult res;
            engine_cuda_optim_step(opt, grads, lp.loss, &res);
            engine_cuda_sync();
            double t2 = now();
            if (s >= warmup) tsum += t2 - t0, tfwd_t += t1 - t0, tloss += tl - t1;
            printf("  step %d: loss %.4f (ce %.4f kl %.4f) grad norm %.3g, %.1f ms: forwards %.1f, head+loss %.1f, backward "
                   "%.1f, optimizer %.1f\n", s, lp.loss, lp.ce, lp.kl, res.grad_norm, 1e3 * (t2 - t0), 1e3 * (t1 - t0),
                   1e3 * (tl - t1), 1e3 * (tb - tl), 1e3 * (t2 - tb));
        }
        const double step_s = tsum / steps;
        const double ft = fwd_flops_per_token(&ht, T) * N, fs = fwd_flops_per_token(&hs, T) * N;
        const double flops = ft + 3 * fs;
        const char *attn_env = getenv("DISTILL_ATTN"), *tune_env = getenv("DISTILL_GEMM_TUNE");
        printf("RESULT attn=%s gemm_tune=%d moments=%s model=%s layers=%d B=%lld T=%lld chunk=%lld%s step_ms=%.1f (forwards %.1f, head+loss %.1f) "
               "tokens_per_s=%.0f TFLOP_per_step=%.1f TFLOPs=%.0f MFU_989=%.1f%% gemm_rate=%.0f TFLOP/s frac_of_gemm=%.1f%%\n",
               attn_env && *attn_env ? attn_env : "default", tune_env && !strcmp(tune_env, "1"), m16 ? "bf16" : "fp32", model, c.n_layer, (long long)B,
               (long long)T, (long long)rows,
               chunk > 0 ? "" : "(default)", 1e3 * step_s, 1e3 * tfwd_t / steps, 1e3 * tloss / steps, N / step_s, flops / 1e12,
               flops / step_s / 1e12, 100 * flops / step_s / 989e12, rate / 1e12, 100 * flops / step_s / rate);
        engine_cuda_dfree(grads);
        engine_cuda_optim_free(opt);
        engine_cuda_free(student);
        engine_cuda_free(teacher);
    }
    free(pt);
    free(ps);
    free(tok);
    free(tgt);
    return 0;
}
