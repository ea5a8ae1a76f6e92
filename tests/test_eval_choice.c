// test_eval_choice.c: the multiple-choice evaluation (eval_choice.h).
//   * data/mc/general.jsonl loads: 150 questions of 4 non-empty choices, answers in range, spread over 0..3;
//   * bad files fail with FILE:LINE and what was expected (invalid JSON, missing/mistyped fields, answer
//     out of range, too few choices, empty file);
//   * lm_score_rows on a tiny random model equals a direct float64 log-softmax over engine_logits of each row
//     run alone, for batch sizes 1, 3, 8 (within 1e-5: the engine's sums depend on the batch shape in the
//     last bits), and refuses rows that cannot be scored;
//   * on the real SmolLM2-135M teacher (skipped when scripts/fetch-teacher has not run), a 20-question subset:
//     every option's log-likelihood equals the direct computation, the accuracies follow from those numbers,
//     and the teacher is above chance (DISTILL_MC_FULL=1 also prints the accuracy on all 150 questions).
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/eval_choice.h"
#include "distill/train_model.h"
#include "distill/model_io.h"
#include "tests/check.h"
#include "tests/tiny_model.h"

#define GGUF "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf"
#define MC "data/mc/general.jsonl"

// Direct: sum over t in [from, len) of log softmax(logits[t-1])[row[t]], one row alone, float64 log-softmax.
static double direct_ll(const EvalModel *m, const int32_t *row, int64_t len, int64_t from) {
    DlError e;
    const int64_t V = m->hc->base.vocab;
    Engine *eng = engine_new(m->hc, m->reg, m->params, 1, len, 0, &e);
    if (!eng) {
        fprintf(stderr, "%s\n", e.msg);
        return NAN;
    }
    engine_forward(eng, row, NULL);
    float *lg = malloc((size_t)(len * V) * sizeof(float));
    engine_logits(eng, 0, len, lg);
    double s = 0;
    for (int64_t t = from; t < len; t++) {
        const float *x = lg + (t - 1) * V;
        double mx = x[0], z = 0;
        for (int64_t j = 1; j < V; j++) mx = fmax(mx, x[j]);
        for (int64_t j = 0; j < V; j++) z += exp((double)x[j] - mx);
        s += (double)x[row[t]] - mx - log(z);
    }
    free(lg);
    engine_free(eng);
    return s;
}

static char g_dir[256];

// Writes text to a file in g_dir, loads it, and checks that loading fails with a message containing want1 and want2.
static void bad_file(const char *name, const char *text, const char *want1, const char *want2) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    ChoiceSet s;
    DlError e = {{0}};
    int rc = choice_set_load(path, &s, &e);
    CHECK(rc == -1);
    char want[600];
    snprintf(want, sizeof want, "%s%s", path, want1);
    bool ok = strstr(e.msg, want) && strstr(e.msg, want2);
    if (!ok) fprintf(stderr, "bad_file %s: message '%s' lacks '%s' / '%s'\n", name, e.msg, want, want2);
    CHECK(ok);
    if (rc == 0) choice_set_free(&s);
}

static void test_file(void) {
    ChoiceSet s;
    DlError e;
    int rc = choice_set_load(MC, &s, &e);
    if (rc) fprintf(stderr, "%s\n", e.msg);
    CHECK(rc == 0);
    if (rc) return;
    CHECK_EQ_I64(s.n, 150);
    CHECK(!strcmp(s.name, "general"));
    int per[4] = {0}, ok = 0;
    for (int64_t i = 0; i < s.n; i++) {
        const ChoiceItem *it = &s.items[i];
        ok += it->n_choices == 4 && it->answer >= 0 && it->answer < 4 && it->category && it->line == i + 1;
        if (it->answer >= 0 && it->answer < 4) per[it->answer]++;
    }
    CHECK_EQ_I64(ok, 150);
    for (int k = 0; k < 4; k++) CHECK(per[k] >= 20);  // the right answer is not always in one place
    choice_set_free(&s);

    const char *good = "{\"question\": \"q?\", \"choices\": [\"a\", \"b\"], \"answer\": 1}\n";
    char buf[1024];
    snprintf(buf, sizeof buf, "%s\n%s{not json\n", good, good);
    bad_file("badjson.jsonl", buf, ":4:", "expected one JSON object per line");
    snprintf(buf, sizeof buf, "%s{\"choices\": [\"a\", \"b\"], \"answer\": 0}\n", good);
    bad_file("noq.jsonl", buf, ":2:", "\"question\" must be a non-empty string");
    snprintf(buf, sizeof buf, "%s%s{\"question\": \"q\", \"choices\": [\"a\"], \"answer\": 0}\n", good, good);
    bad_file("onechoice.jsonl", buf, ":3:", "2 to 16 strings");
    snprintf(buf, sizeof buf, "{\"question\": \"q\", \"choices\": [\"a\", \"b\", \"c\"], \"answer\": 3}\n");
    bad_file("range.jsonl", buf, ":1:", "integer index 0..2");
    snprintf(buf, sizeof buf, "{\"question\": \"q\", \"choices\": [\"a\", 5], \"answer\": 0}\n");
    bad_file("choicetype.jsonl", buf, ":1:", "\"choices\"[1] must be a non-empty string");
    snprintf(buf, sizeof buf, "%s{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0.5}\n", good);
    bad_file("frac.jsonl", buf, ":2:", "\"answer\" must be an integer");
    bad_file("empty.jsonl", "\n  \n", ": no questions", "one JSON object per line");
}

// lm_score_rows against the direct computation on a tiny random teacher and a hybrid; batch sizes 1, 3, 8.
static void test_scorer_tiny(void) {
    TinyModel t, h;
    tiny_teacher(&t, 2, true, 5);
    int attn[1] = {1};
    tiny_hybrid(&h, &t, attn, 1, 6);
    const TinyModel *models[2] = {&t, &h};
    enum { N = 7 };
    int32_t *rows[N];
    int64_t len[N], from[N];
    Rng g;
    rng_init(&g, 17, 0);
    for (int i = 0; i < N; i++) {
        len[i] = 2 + (int64_t)(rng_u64(&g) % 30);
        from[i] = 1 + (int64_t)(rng_u64(&g) % (uint64_t)(len[i] - 1));
        rows[i] = malloc((size_t)len[i] * 4);
        for (int64_t k = 0; k < len[i]; k++) rows[i][k] = (int32_t)(rng_u64(&g) % 37);
    }
    for (int mi = 0; mi < 2; mi++) {
        EvalModel m = {&models[mi]->h, &models[mi]->r, models[mi]->p, TM_CPU};
        double want[N], worst = 0;
        for (int i = 0; i < N; i++) want[i] = direct_ll(&m, rows[i], len[i], from[i]);
        int batches[3] = {1, 3, 8};
        for (int bi = 0; bi < 3; bi++) {
            double sum[N], mean[N];
            DlError e;
            for (int i = 0; i < N; i++) sum[i] = mean[i] = NAN;  // poisoned
            CHECK(lm_score_rows(&m, (const int32_t *const *)rows, len, from, N, batches[bi], sum, mean, &e) == 0);
            for (int i = 0; i < N; i++) {
                worst = fmax(worst, fabs(sum[i] - want[i]) / fmax(1.0, fabs(want[i])));
                worst = fmax(worst, fabs(mean[i] * (double)(len[i] - from[i]) - sum[i]) / fmax(1.0, fabs(sum[i])));
            }
        }
        CHECK_REL(worst, 1e-5, mi ? "lm_score_rows (hybrid) vs direct" : "lm_score_rows (teacher) vs direct");
    }
    // rows that cannot be scored
    EvalModel m = {&t.h, &t.r, t.p, TM_CPU};
    double s1;
    DlError e;
    int64_t l1 = 3, f0 = 0, f3 = 3;
    int32_t bad[3] = {1, 99, 2};
    CHECK(lm_score_rows(&m, (const int32_t *const *)rows, &l1, &f0, 1, 1, &s1, NULL, &e) == -1 && strstr(e.msg, "row 0"));
    CHECK(lm_score_rows(&m, (const int32_t *const *)rows, &l1, &f3, 1, 1, &s1, NULL, &e) == -1);
    const int32_t *br[1] = {bad};
    int64_t f1 = 1;
    CHECK(lm_score_rows(&m, br, &l1, &f1, 1, 1, &s1, NULL, &e) == -1 && strstr(e.msg, "id 99"));
    for (int i = 0; i < N; i++) free(rows[i]);
    tiny_free(&t);
    tiny_free(&h);
}

static void test_teacher(void) {
    if (access(GGUF, R_OK)) {
        printf("test_eval_choice: teacher part skipped (run scripts/fetch-teacher)\n");
        return;
    }
    LoadedModel t;
    Tokenizer *tok;
    DlError e;
    ChoiceSet s;
    if (model_load(GGUF, 0, &t, &e) || tokenizer_load(GGUF, &tok, &e) || choice_set_load(MC, &s, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        CHECK(0);
        return;
    }
    EvalModel m = {&t.hc, &t.reg, t.params, TM_CPU};
    const int64_t NQ = 20;
    double sum[NQ * 4], mean[NQ * 4];
    ChoiceResult r;
    double t0 = dl_now();
    CHECK(choice_eval(&m, tok, &s, NQ, 8, "teacher", &r, sum, mean, &e) == 0);
    double dt = dl_now() - t0;
    CHECK_EQ_I64(r.n_questions, NQ);
    // the log-likelihoods: the direct computation for the first 5 questions (20 options), row by row
    double worst = 0;
    for (int64_t q = 0; q < 5; q++)
        for (int k = 0; k < 4; k++) {
            int32_t *ctx, *cont;
            int64_t nc, nk;
            char *qtext = malloc(strlen(s.items[q].question) + 32), *ctext = malloc(strlen(s.items[q].choices[k]) + 2);
            sprintf(qtext, "Question: %s\nAnswer:", s.items[q].question);
            sprintf(ctext, " %s", s.items[q].choices[k]);
            tokenizer_encode(tok, qtext, strlen(qtext), &ctx, &nc, &e);
            tokenizer_encode(tok, ctext, strlen(ctext), &cont, &nk, &e);
            int32_t *row = malloc((size_t)(nc + nk) * 4);
            memcpy(row, ctx, (size_t)nc * 4);
            memcpy(row + nc, cont, (size_t)nk * 4);
            double want = direct_ll(&m, row, nc + nk, nc);
            worst = fmax(worst, fabs(sum[q * 4 + k] - want) / fmax(1.0, fabs(want)));
            worst = fmax(worst, fabs(mean[q * 4 + k] - want / (double)nk) / fmax(1.0, fabs(want)));
            free(qtext), free(ctext), free(ctx), free(cont), free(row);
        }
    CHECK_REL(worst, 1e-4, "teacher option log-likelihoods vs direct");
    // the accuracies follow from the scores
    int64_t c = 0, cn = 0;
    for (int64_t q = 0; q < NQ; q++) {
        int b = 0, bn = 0;
        for (int k = 1; k < 4; k++) {
            if (sum[q * 4 + k] > sum[q * 4 + b]) b = k;
            if (mean[q * 4 + k] > mean[q * 4 + bn]) bn = k;
        }
        c += b == s.items[q].answer;
        cn += bn == s.items[q].answer;
    }
    CHECK_EQ_I64(r.n_correct, c);
    CHECK_EQ_I64(r.n_correct_norm, cn);
    CHECK(fabs(r.chance - 0.25) < 1e-12);
    int64_t cn_sum = 0, cc_sum = 0;  // per category: the counts add up, the names are the file's
    bool names = r.n_cat >= 2;
    for (int k = 0; k < r.n_cat; k++) {
        cn_sum += r.cat_n[k], cc_sum += r.cat_correct[k];
        names &= !strcmp(r.cat[k], "general knowledge") || !strcmp(r.cat[k], "arithmetic") ||
                 !strcmp(r.cat[k], "commonsense") || !strcmp(r.cat[k], "word meaning");
    }
    CHECK(names);
    CHECK_EQ_I64(cn_sum, NQ);
    CHECK_EQ_I64(cc_sum, r.n_correct);
    printf("test_eval_choice: teacher on %lld questions: acc %.3f, acc_norm %.3f (chance 0.25), %.1f s\n", (long long)NQ,
           r.acc, r.acc_norm, dt);
    // above chance: 20 questions at chance give >= 10 right with probability 0.014
    CHECK(r.n_correct >= 10 || r.n_correct_norm >= 10);
    if (getenv("DISTILL_MC_FULL")) {
        ChoiceResult full;
        t0 = dl_now();
        CHECK(choice_eval(&m, tok, &s, 0, 16, "teacher", &full, NULL, NULL, &e) == 0);
        printf("test_eval_choice: teacher on all %lld questions: acc %.3f, acc_norm %.3f, %.1f s\n",
               (long long)full.n_questions, full.acc, full.acc_norm, dl_now() - t0);
        choice_print_table(stdout, &full, 1);
        for (int k = 0; k < full.n_cat; k++)
            printf("  %-20s %lld/%lld\n", full.cat[k], (long long)full.cat_correct[k], (long long)full.cat_n[k]);
    }
    choice_set_free(&s);
    tokenizer_free(tok);
    model_free(&t);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_choice_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    test_file();
    test_scorer_tiny();
    test_teacher();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return check_report("test_eval_choice");
}
