// test_spec_eval.c: the numbers spec_eval_run reports (distill eval-spec and the eval stage's speculative rows),
// against an independent computation on the CPU. With greedy decoding every accepted draft token equals the
// target's token, so the draft's proposal at position i of a step is its teacher-forced argmax on the plain
// output. From the plain output y (extended by K tokens: verification looks past max_tokens) and the draft's
// teacher-forced argmaxes g, the acceptance per position and the tokens per step follow by counting:
//   c = 1 (y[0] comes from the prefill); while c < T: one step; j = matches g[c+i] == y[c+i], i < K;
//   accepted_at[0..j) += 1; emitted += j + 1; c += j + 1.
// Checked exactly for K 1..4 and two drafts (cuts of a random 4-layer teacher, one with intermediate
// acceptance), plus the exactness count (greedy speculative = plain in every sequence), the draft's cost and the
// model speedup derived from it, and bad configurations.
// Branches (W chains per sequence, chain w starting from the draft's rank-w token): a step accepts a draft token only
// when y[c] is among the draft's W first ranks, in the chain of that rank (its first token is y[c], so its later
// proposals are the teacher-forced argmaxes again): j = 0 if rank(y[c]) >= W, else 1 + matches g[c+1+i] == y[c+1+i],
// i < K - 1; the kept chain is rank(y[c]) (chain 0 when none accepts).
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/model_io.h"
#include "distill/rng.h"
#include "distill/spec_eval.h"
#include "tests/check.h"

enum { NP = 5, T = 24, KMAX = 4 };

// argmax of each position's logits of the draft, teacher-forced on prompt + y: g[t] predicts y[t] (t >= 1); rk[t] the
// rank of y[t] in those logits (larger first, lower id first on ties).
static void teacher_forced(const LoadedModel *d, const int32_t *prompt, int64_t np, const int32_t *y, int64_t ny, int32_t *g,
                           int *rk) {
    DlError e;
    const int64_t L = np + ny, V = d->hc.base.vocab;
    Decoder *dec = decoder_new(&d->hc, &d->reg, d->params, 1, L, &e);
    int32_t *tok = malloc((size_t)L * sizeof(int32_t));
    float *all = malloc((size_t)(L * V) * sizeof(float));
    memcpy(tok, prompt, (size_t)np * sizeof(int32_t));
    memcpy(tok + np, y, (size_t)ny * sizeof(int32_t));
    if (!dec || decoder_feed(dec, tok, L, NULL, all, &e)) {
        fprintf(stderr, "teacher_forced: %s\n", e.msg);
        exit(1);
    }
    for (int64_t t = 1; t < ny; t++) {  // position np + t - 1 predicts y[t]
        const float *r = all + (np + t - 1) * V;
        int64_t a = 0;
        for (int64_t v = 1; v < V; v++)
            if (r[v] > r[a]) a = v;
        g[t] = (int32_t)a;
        rk[t] = 0;
        for (int64_t v = 0; v < V; v++) rk[t] += r[v] > r[y[t]] || (r[v] == r[y[t]] && v < y[t]);
    }
    g[0] = -1, rk[0] = -1;
    free(tok), free(all);
    decoder_free(dec);
}

int main(void) {
    char dir[] = "/tmp/distill_test_spec_eval_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    char path[200];
    snprintf(path, sizeof path, "%s/t.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 32, \"intermediate_size\": 64, \"num_hidden_layers\": 4,"
          " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 64, \"max_position_embeddings\": 256,"
          " \"rope_theta\": 10000.0, \"rms_norm_eps\": 1e-5, \"tie_word_embeddings\": true, \"initializer_range\": 0.1}\n",
          f);
    fclose(f);
    DlError e;
    LoadedModel tgt;
    if (model_load(path, 11, &tgt, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    unlink(path), rmdir(dir);
    // prompts of 2..10 random tokens
    int32_t *pr[NP];
    int64_t pl[NP];
    Rng g;
    rng_init(&g, 3, 0);
    for (int i = 0; i < NP; i++) {
        pl[i] = 2 + (int64_t)(rng_uniform_f64(&g) * 9);
        pr[i] = malloc((size_t)pl[i] * sizeof(int32_t));
        for (int64_t t = 0; t < pl[i]; t++) pr[i][t] = (int32_t)(rng_uniform_f64(&g) * 64);
    }
    // plain outputs, extended by KMAX tokens, through the plain generation code
    int32_t y[NP][T + KMAX + 1];
    {
        GenDecoder d;
        if (gen_decoder_new(&tgt.hc, &tgt.reg, tgt.params, 1, 64, 0, 0, &d, &e)) return 1;
        GenParams gp = {.sp = {.greedy = true, .top_p = 1}, .max_tokens = T + KMAX + 1, .stop = {-1, -1}};
        for (int i = 0; i < NP; i++) {
            int64_t n;
            Rng r0;
            rng_init(&r0, 0, 0);
            if (gen_plain(d, pr[i], &pl[i], pl[i], &gp, &r0, y[i], &n, &e) || n != T + KMAX + 1) return 1;
        }
        gen_decoder_free(&d);
    }
    const int layer_sets[2][3] = {{0, 1, 3}, {0, 1, 2}};
    double best_mid = 0;  // an acceptance at position 0 away from 0 and 1 (the check has power)
    for (int ds = 0; ds < 2; ds++) {
        LoadedModel dr = {0};
        if (spec_draft_from_layers(&tgt.hc, &tgt.reg, tgt.params, layer_sets[ds], 3, &dr.hc, &dr.reg, &dr.params, &e)) return 1;
        int32_t gf[NP][T + KMAX + 1];
        int rk[NP][T + KMAX + 1];
        for (int i = 0; i < NP; i++) teacher_forced(&dr, pr[i], pl[i], y[i], T + KMAX + 1, gf[i], rk[i]);
        enum { NW = 3 };
        int ks[KMAX] = {1, 2, 3, 4}, b1 = 1, ws[NW] = {1, 2, 3};
        SpecEvalRow rows[NW * KMAX];
        SpecEvalConfig c = {.target = {&tgt.hc, &tgt.reg, tgt.params}, .draft = {&dr.hc, &dr.reg, dr.params},
                            .prompts = (const int32_t *const *)pr, .plen = pl, .n_prompts = NP, .ks = ks, .nk = KMAX,
                            .batches = &b1, .nb = 1, .branches = ws, .nw = NW, .max_tokens = T, .temperature = 0, .cuda = 0,
                            .graph = 0};
        CHECK_EQ_I64(spec_eval_n_rows(&c), NW * KMAX);
        CHECK(spec_eval_run(&c, rows, &e) == 0);
        for (int ri = 0; ri < NW * KMAX; ri++) {
            const int K = ks[ri % KMAX], W = ws[ri / KMAX];
            int64_t steps = 0, emitted = 0, acc[KMAX] = {0}, won[3] = {0};
            for (int i = 0; i < NP; i++)
                for (int64_t pos = 1; pos < T;) {
                    int j = 0;
                    if (rk[i][pos] < W) {  // the chain of that rank proposes y[pos], then the teacher-forced argmaxes
                        j = 1;
                        while (j < K && gf[i][pos + j] == y[i][pos + j]) j++;
                    }
                    steps++;
                    won[j ? rk[i][pos] : 0]++;
                    for (int a = 0; a < j; a++) acc[a]++;
                    emitted += j + 1;
                    pos += j + 1;
                }
            const SpecEvalRow *r = &rows[ri];
            CHECK_EQ_I64(r->k, K);
            CHECK_EQ_I64(r->branches, W);
            for (int w = 0; w < W && W > 1; w++) CHECK(fabs(r->branch_won[w] - (double)won[w] / (double)steps) < 1e-12);
            CHECK_EQ_I64(r->same, NP);
            CHECK_EQ_I64(r->sequences, NP);
            CHECK_EQ_I64(r->n_div, 0);
            bool ok = fabs(r->tokens_per_step - (double)emitted / (double)steps) < 1e-12;
            for (int a = 0; a < K; a++) ok &= fabs(r->acceptance[a] - (double)acc[a] / (double)steps) < 1e-12;
            if (!ok) {
                fprintf(stderr, "draft %d K %d W %d: tokens/step %.6f vs %.6f; acceptance", ds, K, W, r->tokens_per_step,
                        (double)emitted / (double)steps);
                for (int a = 0; a < K; a++) fprintf(stderr, " %.4f/%.4f", r->acceptance[a], (double)acc[a] / (double)steps);
                fprintf(stderr, "\n");
            }
            CHECK(ok);
            if (r->acceptance[0] > 0.1 && r->acceptance[0] < 0.9) best_mid = r->acceptance[0];
            printf("draft %d (layers %d,%d,%d) K %d W %d: %.3f tokens/step, acceptance", ds, layer_sets[ds][0], layer_sets[ds][1],
                   layer_sets[ds][2], K, W, r->tokens_per_step);
            for (int a = 0; a < K; a++) printf(" %.3f", r->acceptance[a]);
            printf("\n");
            CHECK(r->plain_tps > 0 && r->spec_tps > 0 && fabs(r->speedup - r->spec_tps / r->plain_tps) < 1e-9);
            // the draft's cost per token and the speedup it allows
            CHECK(r->draft_tps > 0 && fabs(r->draft_cost - r->plain_tps / r->draft_tps) < 1e-9);
            CHECK(fabs(r->model_speedup - r->tokens_per_step / (1 + K * r->draft_cost)) < 1e-9);
            CHECK(r->draft_steps > 0 && r->verify_steps > 0);  // every round has both phases
        }
        free(dr.params), reg_free(&dr.reg);
    }
    if (!(best_mid > 0)) fprintf(stderr, "no draft with an intermediate acceptance: the check has no power\n");
    CHECK(best_mid > 0);
    // bad configurations are errors, not crashes
    {
        int k9 = 9, b1 = 1, b0 = 0;
        SpecEvalRow row;
        SpecEvalConfig c = {.target = {&tgt.hc, &tgt.reg, tgt.params}, .draft = {&tgt.hc, &tgt.reg, tgt.params},
                            .prompts = (const int32_t *const *)pr, .plen = pl, .n_prompts = NP, .ks = &k9, .nk = 1,
                            .batches = &b1, .nb = 1, .max_tokens = 4};
        CHECK(spec_eval_run(&c, &row, &e) == -1 && strstr(e.msg, "K = 9"));
        c.ks = &b1, c.batches = &b0;
        CHECK(spec_eval_run(&c, &row, &e) == -1 && strstr(e.msg, "batch size 0"));
        c.batches = &b1, c.n_prompts = 0;
        CHECK(spec_eval_run(&c, &row, &e) == -1 && strstr(e.msg, "no prompts"));
    }
    for (int i = 0; i < NP; i++) free(pr[i]);
    model_free(&tgt);
    return check_report("test_spec_eval");
}
