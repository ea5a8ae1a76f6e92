// gpu_bench_spec.cu: speculative vs plain decoding on the GPU (DecoderCuda driven by spec_decode.c, the same
// code as the CPU), SmolLM2-135M-shaped models with random weights: the teacher (30 attention layers) and the
// 50% hybrid (attention at even layers, Mamba-1 at odd ones). Random weights say nothing about acceptance, so:
//   1. components, per target and batch: a plain decode step (+ device argmax) and a K+1-token verification
//      window (window_begin, feed with all logits, argmax, accept of a partial prefix, which replays the Mamba
//      layers), and a draft step of the 2-layer cut (layers 0, 1); with them the speedup a draft of acceptance
//      a would give: E[tokens per round] = (1 - a^(K+1)) / (1 - a) over (K draft steps + 1 verify), in units
//      of plain steps.
//   2. end to end: gen_plain vs gen_speculative tokens/s with the 2-layer cut as the draft, on a target whose
//      other layers' residual branches (o_proj / out_proj / down_proj) are scaled by s: s = 0 makes the target
//      equal its cut (acceptance ~1: the verification machinery's best case at full target cost), s = 0.5
//      lowers it; the measured acceptance is printed beside the speed. 64-token prompts, 128 new tokens.
//   3. plain decode tokens/s of the hybrid vs the teacher at contexts 1k, 8k, 32k (batch 1 and 8; KV cache
//      filled by seek: speed only).
//   --draft-heads instead: a 2-layer draft of the config's shape, full head vs heads trimmed to N ids (draft_heads).
//   --branches instead: the parts of a speculative round with W = 1, 2, 3, 4, 8 branches (one sequence, W decoder rows;
//     the 50% hybrid target, the teacher's layers 0 and L-1 as the draft with a 16,384-id head), K 3: the draft's
//     pending step, its chain of K (ranked first picks), the target's K+1 window with argmax, each decoder's accept
//     (accept_from when W > 1), and the ranked pick against the argmax alone (branch_parts). BRANCH_W=w: that W only;
//     BRANCH_K=k: K (default 3); BRANCH_PROFILE=1: one target step and one verification round between cudaProfilerStart / Stop (ncu, nsys).
// CUDA graphs for short feeds unless --no-graph.
// Usage: gpu_bench_spec [--config PATH] [--no-graph] [--quick] [--draft-heads | --branches]
// Prints RESULT lines.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/engine/decode_cuda.h"
#include "kernels/engine/gpu_test_common.cuh"

extern "C" {
#include "distill/model_io.h"
#include "distill/spec_decode.h"
}

typedef struct {
    const char *name;
    HybridConfig h;
    Registry r;
    float *p;
} Model;

static void model_init(Model *m, const char *name, const HybridConfig *h, uint64_t seed) {
    m->name = name;
    m->h = *h;
    model_build_registry(&m->h, &m->r);
    m->p = (float *)malloc((size_t)m->r.numel * 4);
    test_params_init(&m->r, m->p, seed, 17, false);
}

// Scales the residual-branch outputs of layers >= first by s (s = 0: those layers add nothing).
static void scale_branches(Model *m, int first, float s) {
    for (int i = 0; i < m->r.n; i++) {
        const TensorInfo *t = &m->r.t[i];
        int l;
        if (sscanf(t->name, "model.layers.%d.", &l) != 1 || l < first) continue;
        if (strstr(t->name, "o_proj") || strstr(t->name, "out_proj") || strstr(t->name, "down_proj"))
            for (int64_t j = 0; j < t->numel; j++) m->p[t->offset + j] *= s;
    }
}

// Times (ms) of a plain step, a K+1 verification window with a partial accept, at batch B after a 512-token
// context (seek). Host-synchronizing like the generation loop (argmax ids back to the host every feed); the steps
// also per pick of greedy chains (decoder_cuda_greedy_chain: K picks, one round trip), as gen_plain and the
// speculative draft run them.
static void components(const Model *m, const Model *cut, int64_t B, const int *ks, int nk, int graph) {
    DlError e;
    const int64_t ctx = 512, reps = 20;
    DecoderCuda *d = decoder_cuda_new(&m->h, &m->r, m->p, B, ctx + reps * 12 + 64, NULL, &e);
    die_if(!d, &e, "decoder_cuda_new");
    DecoderCuda *dc = decoder_cuda_new(&cut->h, &cut->r, cut->p, B, ctx + reps * 12 + 64, NULL, &e);
    die_if(!dc, &e, "decoder_cuda_new (draft)");
    decoder_cuda_use_graph(d, graph), decoder_cuda_use_graph(dc, graph);
    int32_t *tok = (int32_t *)calloc((size_t)(B * 16), 4), *am = (int32_t *)calloc((size_t)(B * 16), 4);
    int32_t keep[256];
    double t0 = 0;
    // plain step
    double step_ms = 0, dstep_ms = 0;
    for (int which = 0; which < 2; which++) {
        DecoderCuda *x = which ? dc : d;
        die_if(decoder_cuda_reset(x, B, &e) || decoder_cuda_seek(x, ctx, &e), &e, "seek");
        for (int w = 0; w < 3; w++) die_if(decoder_cuda_step(x, tok, &e) || decoder_cuda_argmax(x, am, &e), &e, "step");
        t0 = dl_now();
        for (int r = 0; r < reps; r++) die_if(decoder_cuda_step(x, tok, &e) || decoder_cuda_argmax(x, am, &e), &e, "step");
        (which ? dstep_ms : step_ms) = (dl_now() - t0) * 1e3 / reps;
    }
    // per pick, in greedy chains of n picks all fed (decoder_cuda_greedy_chain: one host round trip per chain)
    auto chain_ms = [&](DecoderCuda *x, int n) {
        die_if(decoder_cuda_reset(x, B, &e) || decoder_cuda_seek(x, ctx, &e) || decoder_cuda_step(x, tok, &e), &e, "seek");
        for (int w = 0; w < 3; w++) die_if(decoder_cuda_greedy_chain(x, n, 1, am, &e), &e, "chain");
        const double t1 = dl_now();
        for (int r = 0; r < reps; r++) die_if(decoder_cuda_greedy_chain(x, n, 1, am, &e), &e, "chain");
        return (dl_now() - t1) * 1e3 / (reps * n);
    };
    const double cstep_ms = chain_ms(d, 4), cdstep_ms = chain_ms(dc, 4);
    printf("RESULT spec_parts model=%s B=%lld graph=%d step_ms=%.3f draft2_step_ms=%.3f chain4_step_ms=%.3f "
           "chain4_draft2_ms=%.3f\n",
           m->name, (long long)B, graph, step_ms, dstep_ms, cstep_ms, cdstep_ms);
    for (int ki = 0; ki < nk; ki++) {
        const int K = ks[ki];
        die_if(decoder_cuda_reset(d, B, &e) || decoder_cuda_seek(d, ctx, &e), &e, "seek");
        for (int64_t b = 0; b < B; b++) keep[b] = (int32_t)(1 + b % K);  // partial: the Mamba replay runs
        double vms = 0;
        for (int r = -3; r < reps; r++) {
            if (r == 0) t0 = dl_now();
            decoder_cuda_window_begin(d);
            die_if(decoder_cuda_feed(d, tok, K + 1, NULL, 1, &e) || decoder_cuda_argmax(d, am, &e) ||
                       decoder_cuda_accept(d, keep, &e),
                   &e, "verify");
        }
        vms = (dl_now() - t0) * 1e3 / reps;
        printf("RESULT spec_verify model=%s B=%lld K=%d graph=%d verify_ms=%.3f verify_over_step=%.2f", m->name, (long long)B,
               K, graph, vms, vms / step_ms);
        // predicted speedup for a draft as cheap as the 2-layer cut, at acceptance a: with a host round trip per
        // draft pick, then with the K picks in one chain (the decoder's greedy path), against chained plain steps
        const double dcms = chain_ms(dc, K);
        for (int chained = 0; chained < 2; chained++) {
            const double round_ms = K * (chained ? dcms : dstep_ms) + vms;
            for (double a = 0.5; a < 0.95; a += 0.2) {
                const double E = (1 - pow(a, K + 1)) / (1 - a);
                printf(" pred%s_speedup_a%.1f=%.2f", chained ? "_chain" : "", a, E * (chained ? cstep_ms : step_ms) / round_ms);
            }
        }
        printf(" draft2_chain%d_ms=%.3f\n", K, dcms);
    }
    decoder_cuda_free(d), decoder_cuda_free(dc);
    free(tok), free(am);
}

// gen_plain vs gen_speculative end to end (greedy, no stop) with the 2-layer cut as the draft.
static void end_to_end(const Model *m, const Model *cut, const char *label, int64_t B, const int *ks, int nk, int graph) {
    DlError e;
    const int64_t LP = 64, NT = 128;
    const int64_t V = m->h.base.vocab;
    int32_t *pr = (int32_t *)malloc((size_t)(B * LP) * 4), *out = (int32_t *)malloc((size_t)(B * NT) * 4);
    int32_t *ref = (int32_t *)malloc((size_t)(B * NT) * 4);
    int64_t *plen = (int64_t *)malloc((size_t)B * 8), *no = (int64_t *)malloc((size_t)B * 8);
    Rng g;
    rng_init(&g, 99, 1);
    for (int64_t i = 0; i < B * LP; i++) pr[i] = (int32_t)rng_below(&g, (uint64_t)V);
    for (int64_t b = 0; b < B; b++) plen[b] = LP;
    GenParams gp;
    memset(&gp, 0, sizeof gp);
    gp.sp.greedy = true, gp.max_tokens = NT, gp.stop[0] = gp.stop[1] = -1;
    const int64_t ml = spec_max_len(LP, NT, 8);
    GenDecoder T, D;
    die_if(gen_decoder_new(&m->h, &m->r, m->p, B, ml, 1, graph, &T, &e), &e, "target");
    die_if(gen_decoder_new(&cut->h, &cut->r, cut->p, B, ml, 1, graph, &D, &e), &e, "draft");
    Rng rng;
    rng_init(&rng, 0, 0);
    die_if(gen_plain(T, pr, plen, LP, &gp, &rng, out, no, &e), &e, "warm-up");
    for (int ki = 0; ki < nk; ki++) {  // graph captures and GEMM heuristics of every shape, untimed
        gp.k = ks[ki];
        die_if(gen_speculative(T, D, pr, plen, LP, &gp, &rng, out, no, NULL, &e), &e, "warm-up");
    }
    double t = dl_now();
    die_if(gen_plain(T, pr, plen, LP, &gp, &rng, ref, no, &e), &e, "plain");
    const double plain_tps = (double)(B * NT) / (dl_now() - t);
    for (int ki = 0; ki < nk; ki++) {
        gp.k = ks[ki];
        SpecStats st;
        t = dl_now();
        die_if(gen_speculative(T, D, pr, plen, LP, &gp, &rng, out, no, &st, &e), &e, "speculative");
        const double tps = (double)(B * NT) / (dl_now() - t);
        double acc = 0;
        for (int i = 0; i < gp.k; i++) acc += (double)st.accepted_at[i];
        acc /= (double)(st.steps > 0 ? st.steps : 1) * gp.k;
        const bool same = !memcmp(out, ref, (size_t)(B * NT) * 4);
        printf("RESULT spec_e2e model=%s target=%s B=%lld K=%d graph=%d plain_tok_s=%.0f spec_tok_s=%.0f speedup=%.2f "
               "acceptance=%.3f tokens_per_step=%.2f greedy_equal=%d\n",
               m->name, label, (long long)B, gp.k, graph, plain_tps, tps, tps / plain_tps, acc,
               (double)st.emitted / (double)(st.steps > 0 ? st.steps : 1), same);
    }
    gen_decoder_free(&T), gen_decoder_free(&D);
    free(pr), free(out), free(ref), free(plen), free(no);
}

// --draft-heads: a 2-layer draft of the config's shape (two teacher layers, embeddings, norm, head) at batch 1 after a
// 512-token context, its step (+ argmax, one round trip) and its pick in greedy chains of 4, with the full head and
// with heads trimmed to the first N ids (decoder_cuda_set_head_ids, draft_vocab.h). Random weights: speed only.
static void draft_heads(const char *cfg, int graph) {
    DlError e;
    LoadedModel lm;
    die_if(model_load(cfg, 1, &lm, &e) != 0, &e, "model_load");
    HybridConfig h = lm.hc;
    model_free(&lm);
    h.base.n_layer = 2;
    for (int l = 0; l < 2; l++) h.mixer[l] = MIXER_ATTN;
    Model m;
    model_init(&m, "draft2", &h, 3);
    const int64_t V = h.base.vocab, ctx = 512, reps = 50;
    DecoderCuda *d = decoder_cuda_new(&m.h, &m.r, m.p, 1, ctx + reps * 8 + 64, NULL, &e);
    die_if(!d, &e, "decoder_cuda_new");
    decoder_cuda_use_graph(d, graph);
    int32_t *ids = (int32_t *)malloc((size_t)V * 4), tok[8] = {0}, am[8];
    for (int64_t i = 0; i < V; i++) ids[i] = (int32_t)i;
    const int64_t ns[6] = {0, 65536, 32768, 16384, 8192, 4096};
    for (int ni = 0; ni < 6; ni++) {
        const int64_t n = ns[ni];
        if (n >= V) continue;
        die_if(decoder_cuda_set_head_ids(d, ids, n, &e) != 0, &e, "set_head_ids");
        double ms[2];
        for (int chain = 0; chain < 2; chain++) {
            die_if(decoder_cuda_reset(d, 1, &e) || decoder_cuda_seek(d, ctx, &e) || decoder_cuda_step(d, tok, &e), &e, "seek");
            auto once = [&]() {
                if (chain) die_if(decoder_cuda_greedy_chain(d, 4, 1, am, &e), &e, "chain");
                else die_if(decoder_cuda_step(d, tok, &e) || decoder_cuda_argmax(d, am, &e), &e, "step");
            };
            for (int w = 0; w < 3; w++) once();
            const double t0 = dl_now();
            for (int r = 0; r < reps; r++) once();
            ms[chain] = (dl_now() - t0) * 1e3 / (double)(reps * (chain ? 4 : 1));
        }
        printf("RESULT draft_head config=%s V=%lld d=%d head_ids=%lld graph=%d step_ms=%.4f chain4_pick_ms=%.4f head_mb=%.1f\n", cfg,
               (long long)V, h.base.d_model, (long long)(n ? n : V), graph, ms[0], ms[1], (double)(n ? n : V) * h.base.d_model * 2 / 1e6);
    }
    decoder_cuda_free(d);
    free(ids), free(m.p);
    reg_free(&m.r);
}

// Microseconds per call of f over reps calls after 3 untimed ones, the stream drained after each (host-synchronizing
// like the generation loop).
template <typename F> static double time_us(int reps, F f) {
    for (int i = 0; i < 3; i++) f();
    CK(cudaDeviceSynchronize());
    const double t0 = dl_now();
    for (int i = 0; i < reps; i++) {
        f();
        CK(cudaDeviceSynchronize());
    }
    return (dl_now() - t0) * 1e6 / reps;
}

// The config's teacher and its 50% hybrid (attention at even layers, Mamba-1 at odd ones), random weights.
static void bench_models(const char *cfg, LoadedModel *lm, Model *tm, Model *hm) {
    DlError e;
    die_if(model_load(cfg, 1, lm, &e) != 0, &e, "model_load");
    const LlamaConfig *c = &lm->hc.base;
    HybridConfig hh;
    int attn[256], na = 0;
    for (int l = 0; l < c->n_layer; l += 2) attn[na++] = l;
    die_if(hybrid_config_init(&hh, c, MIXER_MAMBA1, attn, na, &e) != 0, &e, "hybrid_config_init");
    model_init(tm, "teacher", &lm->hc, 1);
    model_init(hm, "hybrid50", &hh, 2);
}

static void branch_parts(const char *cfg, int graph) {
    DlError e;
    LoadedModel lm;
    Model tm, hm, cut;
    bench_models(cfg, &lm, &tm, &hm);
    const LlamaConfig *c = &lm.hc.base;
    const int cl[2] = {0, c->n_layer - 1};
    die_if(spec_draft_from_layers(&tm.h, &tm.r, tm.p, cl, 2, &cut.h, &cut.r, &cut.p, &e) != 0, &e, "cut");
    const int64_t V = c->vocab, nh = V < 16384 ? V : 16384, ctx = 400, reps = 200;
    int32_t *ids = (int32_t *)malloc((size_t)nh * 4);
    for (int64_t j = 0; j < nh; j++) ids[j] = (int32_t)j;
    const int K = getenv("BRANCH_K") ? atoi(getenv("BRANCH_K")) : 3, Ws[5] = {1, 2, 3, 4, 8};
    for (int wi = 0; wi < 5; wi++) {
        const int W = Ws[wi];
        if (getenv("BRANCH_W") && atoi(getenv("BRANCH_W")) != W) continue;  // one W only
        DecoderCuda *t = decoder_cuda_new(&hm.h, &hm.r, hm.p, W, ctx + reps * 8 + 64, NULL, &e);
        DecoderCuda *d = decoder_cuda_new(&cut.h, &cut.r, cut.p, W, ctx + reps * 8 + 64, NULL, &e);
        die_if(!t || !d, &e, "decoder_cuda_new");
        die_if(decoder_cuda_set_head_ids(d, ids, nh, &e) != 0, &e, "head ids");
        decoder_cuda_use_graph(t, graph), decoder_cuda_use_graph(d, graph);
        int32_t tok[64] = {0}, am[64], keep[8], src[8];
        for (int w = 0; w < W; w++) keep[w] = 2, src[w] = W > 1 ? 1 % W : 0;  // partial accept; rows take row 1's window
        die_if(decoder_cuda_reset(t, W, &e) || decoder_cuda_seek(t, ctx, &e) || decoder_cuda_reset(d, W, &e) ||
                   decoder_cuda_seek(d, ctx, &e),
               &e, "seek");
        const int32_t *sp = W > 1 ? src : NULL;
        // the draft: pending step, window, chain of K (picks on the device), accept of 2
        const double d_step = time_us(reps, [&] { die_if(decoder_cuda_step(d, tok, &e), &e, "draft step"); });
        const double d_round = time_us(reps, [&] {
            die_if(decoder_cuda_step(d, tok, &e), &e, "draft step");
            decoder_cuda_window_begin(d);
            die_if(decoder_cuda_branch_chain(d, W, K, 0, NULL, &e) || decoder_cuda_accept_from(d, keep, sp, &e), &e, "draft");
        });
        const double d_chain = time_us(reps, [&] {
            die_if(decoder_cuda_step(d, tok, &e), &e, "draft step");
            decoder_cuda_window_begin(d);
            die_if(decoder_cuda_branch_chain(d, W, K, 0, NULL, &e) || decoder_cuda_accept(d, keep, &e), &e, "draft");
        });
        // the target: window of K + 1 with all logits, argmax, accept of 2 (its Mamba layers replay)
        auto verify = [&](const int32_t *s) {
            decoder_cuda_window_begin(t);
            die_if(decoder_cuda_feed(t, tok, K + 1, NULL, 1, &e) || decoder_cuda_argmax(t, am, &e) ||
                       decoder_cuda_accept_from(t, keep, s, &e),
                   &e, "verify");
        };
        const double t_round = time_us(reps, [&] { verify(sp); }), t_plain = time_us(reps, [&] { verify(NULL); });
        if (getenv("BRANCH_PROFILE")) {  // one target step and one verification round under a profiler (ncu / nsys)
            CK(cudaDeviceSynchronize());
            CK(cudaProfilerStart());
            die_if(decoder_cuda_step(t, tok, &e) || decoder_cuda_argmax(t, am, &e), &e, "target step");
            verify(sp);
            CK(cudaDeviceSynchronize());
            CK(cudaProfilerStop());
        }
        const double t_step = time_us(reps, [&] {
            die_if(decoder_cuda_step(t, tok, &e) || decoder_cuda_argmax(t, am, &e), &e, "target step");
        });
        // the picks alone on the draft's logits
        die_if(decoder_cuda_step(d, tok, &e), &e, "draft step");
        char err[256] = "";
        void *ws = NULL;
        CK(cudaMalloc(&ws, argmax_rows_workspace(W, V)));
        CK(cudaMemset(ws, 0, argmax_rows_workspace(W, V)));
        int32_t *dam = NULL;
        CK(cudaMalloc(&dam, 64 * 4));
        void *rws = NULL;
        CK(cudaMalloc(&rws, rank_rows_workspace(W, V)));
        CK(cudaMemset(rws, 0, rank_rows_workspace(W, V)));
        const double rank = time_us(reps, [&] {
            die_if(rank_rows_cuda(decoder_cuda_logits(d), W, V, W, rws, dam, err, sizeof err) != 0, &e, "rank");
        });
        CK(cudaFree(rws));
        const double amax = time_us(reps, [&] {
            die_if(argmax_rows_cuda(decoder_cuda_logits(d), W, V, ws, dam, err, sizeof err) != 0, &e, "argmax");
        });
        CK(cudaFree(ws));
        CK(cudaFree(dam));
        printf("RESULT branch_parts config=%s W=%d K=%d graph=%d target_step_us=%.1f draft_step_us=%.1f draft_round_us=%.1f "
               "draft_round_plain_accept_us=%.1f verify_us=%.1f verify_plain_accept_us=%.1f rank_us=%.1f argmax_us=%.1f\n",
               cfg, W, K, graph, t_step, d_step, d_round, d_chain, t_round, t_plain, rank, amax);
        decoder_cuda_free(t), decoder_cuda_free(d);
    }
    free(ids), free(tm.p), free(hm.p), free(cut.p);
    reg_free(&tm.r), reg_free(&hm.r), reg_free(&cut.r);
    model_free(&lm);
}

int main(int argc, char **argv) {
    const char *cfg = "recipes/configs/smollm2-135m.json";
    int graph = 1, quick = 0, heads = 0, branches = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc) cfg = argv[++i];
        else if (!strcmp(argv[i], "--no-graph")) graph = 0;
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--draft-heads")) heads = 1;
        else if (!strcmp(argv[i], "--branches")) branches = 1;
        else {
            fprintf(stderr, "usage: gpu_bench_spec [--config PATH] [--no-graph] [--quick] [--draft-heads | --branches]\n");
            return 2;
        }
    }
    if (heads) {
        draft_heads(cfg, graph);
        return 0;
    }
    if (branches) {
        branch_parts(cfg, graph);
        return 0;
    }
    DlError e;
    cudaDeviceProp prop;
    int dev = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    const char *ienv = getenv("DISTILL_DECODE_INVARIANT");  // 0: the legacy (not batch-invariant) arithmetic
    printf("gpu_bench_spec: %s, config %s%s, %s decoder arithmetic\n", prop.name, cfg, graph ? ", CUDA graphs" : "",
           ienv && !strcmp(ienv, "0") ? "legacy (DISTILL_DECODE_INVARIANT=0)" : "batch-invariant");
    LoadedModel lm;
    Model tm, hm;
    bench_models(cfg, &lm, &tm, &hm);
    const int ks[3] = {2, 4, 8};
    const int64_t batches[3] = {1, 4, 16};
    Model *models[2] = {&hm, &tm};
    for (int mi = 0; mi < 2; mi++) {
        Model *m = models[mi], cut;
        const int cl[2] = {0, 1};
        cut.name = "cut2";
        die_if(spec_draft_from_layers(&m->h, &m->r, m->p, cl, 2, &cut.h, &cut.r, &cut.p, &e) != 0, &e, "cut");
        for (int bi = 0; bi < (quick ? 1 : 3); bi++) components(m, &cut, batches[bi], ks, 3, graph);
        // end to end: the target scaled towards its cut
        float *keep = (float *)malloc((size_t)m->r.numel * 4);
        memcpy(keep, m->p, (size_t)m->r.numel * 4);
        const float scales[2] = {0.0f, 0.5f};
        for (int si = 0; si < 2; si++) {
            memcpy(m->p, keep, (size_t)m->r.numel * 4);
            scale_branches(m, 2, scales[si]);
            char label[32];
            snprintf(label, sizeof label, "cut2+s%.1f", scales[si]);
            for (int bi = 0; bi < (quick ? 1 : 3); bi++) end_to_end(m, &cut, label, batches[bi], ks, 2, graph);
        }
        memcpy(m->p, keep, (size_t)m->r.numel * 4);
        free(keep), free(cut.p);
        reg_free(&cut.r);
    }
    // plain decode at long contexts: hybrid vs teacher
    const int64_t ctxs[3] = {1024, 8192, 32768}, cb[2] = {1, 8};
    for (int bi = 0; bi < 2; bi++)
        for (int ci = 0; ci < 3; ci++) {
            double tps[2];
            for (int mi = 0; mi < 2; mi++) {
                GenDecoder g;
                die_if(gen_decoder_new(&models[mi]->h, &models[mi]->r, models[mi]->p, cb[bi], ctxs[ci] + 48, 1, graph, &g, &e),
                       &e, "decoder");
                die_if((tps[mi] = gen_decode_speed(g, ctxs[ci], 32, &e)) < 0, &e, "decode speed");
                gen_decoder_free(&g);
            }
            printf("RESULT ctx_decode B=%lld ctx=%lld graph=%d hybrid50_tok_s=%.0f teacher_tok_s=%.0f hybrid_over_teacher=%.2f\n",
                   (long long)cb[bi], (long long)ctxs[ci], graph, tps[0], tps[1], tps[0] / tps[1]);
        }
    free(tm.p), free(hm.p);
    reg_free(&tm.r), reg_free(&hm.r);
    model_free(&lm);
    return 0;
}
