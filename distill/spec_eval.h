// spec_eval.h: the speculative-decoding measurement shared by `distill eval-spec` (cmd_eval_spec.c) and the
// pipeline's eval stage (stage_eval.c): for each batch size B and draft length K, plain and speculative
// generation of max_tokens tokens (no stop token: every run generates exactly max_tokens, so timings compare)
// for every prompt, batched B at a time (a short last batch repeats prompts; only the real ones count for the
// greedy comparison), on the CPU or the GPU through the generation code of spec_decode.h.
//
// Per (B, K) row: plain and speculative tokens/s, speedup, mean tokens per target step, the acceptance rate
// (accepted / proposed draft tokens), the fraction of verification steps that accepted draft position i, and
// with greedy decoding how many sequences equal the plain output token for token (exactness: all of them).
// Also the draft's cost per token relative to the target's (its own plain generation timed the same way) and the
// speedup that acceptance and cost allow, tokens_per_step / (1 + K cost): what a better draft must change.
#pragma once
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"
#include "distill/spec_decode.h"

#define SPEC_EVAL_MAX_K 8  // K values accepted (decoder capacity is sized for this)
#define SPEC_EVAL_MAX_DIV 4  // greedy divergences analysed per row

// A greedy speculative sequence that differs from the plain one: where, and how close its two candidate tokens
// are in an fp32 CPU reference of the target (decoder_feed of the prompt and the plain output before the
// divergence). A gap far below the bf16 noise of the GPU decoders (~1e-2 of max |logit|) is a near-tie that
// the verification (several tokens per pass) and the plain steps (one token) may break differently; a large gap,
// or any divergence on the CPU, is a bug.
typedef struct {
    int64_t prompt, position;         // prompt index; index of the first differing new token
    int32_t plain_token, spec_token;  // what each run emitted there
    int32_t ref_token;                // the reference's argmax
    double gap;                       // reference logit(plain_token) - logit(spec_token)
    double top2_gap;                  // reference top-1 minus top-2 logit
    double max_abs;                   // reference largest |logit| of the row
} SpecDivergence;

typedef struct {
    const HybridConfig *hc;
    const Registry *reg;
    const float *params;  // fp32, registry order (the GPU decoder converts to bf16)
} SpecModel;

typedef struct {
    SpecModel target, draft;     // same vocabulary
    const int32_t *draft_head_ids;  // the draft's trimmed head (draft_vocab.h): draft_head_n ids, or NULL: full head
    int64_t draft_head_n;
    const int32_t *const *prompts;  // n_prompts token arrays, prompt i has plen[i] >= 1 tokens
    const int64_t *plen;
    int64_t n_prompts;
    const int *ks;               // nk draft lengths, each 1..SPEC_EVAL_MAX_K
    int nk;
    const int *batches;          // nb batch sizes, each >= 1
    int nb;
    const int *branches;         // nw speculative branch counts (GenParams.branches, 1..SPEC_MAX_BRANCH; greedy only
    int nw;                      // when > 1); nw 0: one chain only
    int64_t max_tokens;          // new tokens per sequence (>= 1)
    double temperature;          // 0: greedy; > 0: sampled (top-p 1), fixed seeds
    int cuda, graph;             // decode on the GPU (DecoderCuda), CUDA graphs for short feeds
    FILE *progress;              // each row printed as it is measured (spec_eval_print_row), or NULL
} SpecEvalConfig;

typedef struct {
    int64_t batch;
    int k;
    int branches;                         // chains per sequence (1: plain speculative decoding)
    double branch_won[SPEC_MAX_BRANCH];   // fraction of steps that kept chain w (the draft's rank-w first token)
    double plain_tps, spec_tps, speedup;  // tokens/s (generated tokens of the whole batch / wall time)
    double tokens_per_step;               // emitted tokens per target verification step (1 .. K+1)
    double draft_tps;                     // the draft's own plain generation, tokens/s (same prompts and batch)
    double draft_cost;                    // plain_tps / draft_tps: one draft token's time in target tokens
    double model_speedup;                 // tokens_per_step / (1 + K draft_cost): the speedup if verifying K + 1
                                          // tokens cost one plain target step (measured below it: verification cost)
    double draft_steps, verify_steps;     // a round's draft and verify phases (SpecStats) in plain target steps
                                          // (batch / plain_tps): speedup ~ tokens_per_step / (their sum); the model
                                          // above takes verify_steps = 1 and draft_steps = K draft_cost
    double acceptance_rate;               // accepted draft tokens / proposed
    double acceptance[SPEC_MAX_K];        // [k]: fraction of steps that accepted draft position i
    int64_t same, sequences;              // greedy: sequences equal to the plain output; same = -1 when sampled
    SpecDivergence div[SPEC_EVAL_MAX_DIV];  // greedy: the first differing sequences (n_div of them)
    int n_div;
} SpecEvalRow;

// Rows the measurement fills: nb * max(nw, 1) * nk.
int64_t spec_eval_n_rows(const SpecEvalConfig *c);
// Runs the measurement; rows [spec_eval_n_rows] are filled batch-major, then by branches, then by K (row
// (bi * max(nw, 1) + wi) * nk + ki). On the GPU one short
// untimed warm-up of plain and speculative generation precedes each batch size (cuBLASLt heuristics, graph
// captures). Returns 0, or -1 with e filled (bad configuration, decoder or generation failure).
int spec_eval_run(const SpecEvalConfig *c, SpecEvalRow *rows, DlError *e);

// The table: header line, then one line per row (and one line per divergence under it).
void spec_eval_print_header(FILE *f);
void spec_eval_print_row(FILE *f, const SpecEvalRow *r);

// One row as a new JSON object (cJSON; the caller adds it to its document): batch, k, plain_tokens_per_s,
// spec_tokens_per_s, speedup, tokens_per_step, acceptance_rate, (greedy:) greedy_equal_sequences and
// sequences, acceptance (array of k) and, when some greedy sequence differed, divergences (prompt, position,
// plain_token, spec_token, ref_token, ref_logit_gap, ref_top2_gap, ref_max_abs_logit).
struct cJSON;
struct cJSON *spec_eval_row_json(const SpecEvalRow *r);
