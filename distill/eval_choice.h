// eval_choice.h: log-likelihood scoring of token continuations, and the multiple-choice evaluation built
// on it (the eval stage's `choice = [...]` key; data/mc/).
//
// lm_score_rows is the one place where a model scores token rows: row i is rows[i][0 .. len[i]) and its
// positions t in [from[i], len[i]) are scored, sum[i] = sum_t log p(rows[i][t] | rows[i][0 .. t)). The pairs
// stage (teacher log-likelihood of sampled responses) and eval_choice (of answer options) both call it, so
// routing it to another engine (CUDA) changes both.
//
// Multiple-choice file (JSONL, one question per line; blank lines ignored):
//   {"question": "What is 7 x 8?", "choices": ["54", "56", "63", "64"], "answer": 1, "category": "arithmetic"}
// answer is the 0-based index of the correct choice; 2..16 non-empty choices; category is optional.
// Each option is scored as the continuation " " + choice of the context "Question: " + question + "\nAnswer:"
// (plain text, no chat template; context and continuation are tokenized separately, so the split is exact).
// A question counts as correct when the right option has the highest summed log-likelihood (acc) or the
// highest per-token mean (acc_norm); ties go to the lowest index. Chance is 1/choices (0.25 with 4).
#pragma once
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"
#include "distill/eval.h"
#include "distill/tokenizer.h"

// Scores n rows in batches of up to `batch` rows (longest first; each batch padded to its longest row rounded up
// to a multiple of 32, so that few engine shapes serve all batches).
// sum [n] gets the summed log-prob of the scored positions; mean [n] (may be NULL) the per-token mean.
// Requires 1 <= from[i] < len[i] <= the model's max_pos and ids < vocab; else -1 with e naming the row.
// Deterministic: the batches depend only on the lengths.
int lm_score_rows(const EvalModel *m, const int32_t *const *rows, const int64_t *len, const int64_t *from, int64_t n,
                  int64_t batch, double *sum, double *mean, DlError *e);
// The same, keeping the last engine in *keep across calls (an engine is built per batch shape; on CUDA that costs
// seconds: device buffers, the weights' upload, attention graphs), so a caller that scores many chunks of rows in
// length order builds each shape once. score_keep_free releases it; *keep starts zeroed.
typedef struct {
    struct TrainModel *eng;
    int64_t B, T, built;  // the kept engine's shape; engines built so far
    double build_s;       // seconds spent building them
} ScoreKeep;
int lm_score_rows_keep(const EvalModel *m, const int32_t *const *rows, const int64_t *len, const int64_t *from, int64_t n,
                       int64_t batch, double *sum, double *mean, ScoreKeep *keep, DlError *e);
void score_keep_free(ScoreKeep *keep);

typedef struct {
    char *question;
    char **choices;
    int n_choices;
    int answer;        // 0-based index into choices
    char *category;    // may be NULL
    int64_t line;      // line in the file (for messages)
} ChoiceItem;

typedef struct {
    char *path;
    char name[64];     // the file name without directory and extension ("general")
    ChoiceItem *items;
    int64_t n;
} ChoiceSet;

// Reads a multiple-choice JSONL file. Bad input: -1 with e = "FILE:LINE: what was expected".
int choice_set_load(const char *path, ChoiceSet *s, DlError *e);
void choice_set_free(ChoiceSet *s);

typedef struct {
    char label[64];        // the model ("teacher", "student", "init")
    char set[64];          // ChoiceSet.name
    int64_t n_questions;
    int64_t n_correct;     // by summed log-likelihood
    int64_t n_correct_norm;// by per-token mean log-likelihood
    double acc, acc_norm;  // n_correct / n_questions, n_correct_norm / n_questions
    double chance;         // mean of 1/choices over the questions
    int n_cat;             // per category (first 16 in file order; the rest and uncategorized: "other")
    char cat[16][32];
    int64_t cat_n[16], cat_correct[16];  // questions and right answers (summed log-likelihood)
} ChoiceResult;

// Evaluates model m on the first max_items questions of s (0: all). ll_sum / ll_mean (may be NULL) get, per
// question and option, in item order, the option's summed / mean log-likelihood (sum of n_choices entries).
int choice_eval(const EvalModel *m, const Tokenizer *tok, const ChoiceSet *s, int64_t max_items, int64_t batch,
                const char *label, ChoiceResult *out, double *ll_sum, double *ll_mean, DlError *e);

// Adds (or replaces) the key "choice": [{label, set, questions, correct, correct_norm, acc, acc_norm, chance,
// by_category: {CATEGORY: {questions, correct, acc}}}, ...] in the JSON
// object of path (created as {} when missing), rewritten atomically.
int choice_add_json(const char *path, const ChoiceResult *r, int n, DlError *e);
// A table: one row per set and metric, one column per distinct label (in first-seen order).
void choice_print_table(FILE *f, const ChoiceResult *r, int n);

// Every file on every model: out (malloc'd, n_files * n_models results, file-major) with labels[i] for
// models[i]. Prints one progress line per (file, model) through dl_info.
int choice_eval_models(const char *const *files, int n_files, const EvalModel *models, const char *const *labels,
                       int n_models, const Tokenizer *tok, int64_t batch, ChoiceResult **out, int *n_out, DlError *e);
