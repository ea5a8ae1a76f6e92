// spec_decode.h: plain and speculative generation for batches of prompts of any lengths (mambainllama.md §5).
// A draft model proposes K tokens one at a time; the target verifies them in ONE multi-token feed
// (decoder_window_begin + decoder_feed of [pending, d1..dK] with all logits) and keeps the accepted prefix
// (decoder_accept: KV rollback by length, Mamba state replayed from the cached window-start state). The same
// code drives the CPU Decoder and the GPU DecoderCuda (GenDecoder below).
// Acceptance is standard speculative sampling: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
// at the first rejection a token is drawn from normalize(max(p_i - q_i, 0)); when all K are accepted a bonus
// token is drawn from p_{K+1}. p and q are the sampling distributions (sample_probs: temperature, top-p), so
// the output has exactly the target's distribution, and greedy decoding (one-hot p, q) reduces to exact
// argmax matching: the same tokens as plain greedy decoding.
#pragma once
#include <stdint.h>

#include "distill/engine.h"
#include "distill/rng.h"
#include "distill/sample.h"

#define SPEC_MAX_K 16
#define SPEC_MAX_BRANCH 8

typedef struct {
    int k;                // draft tokens per step, 1 .. SPEC_MAX_K
    SampleParams sp;      // shared by draft and target
    int64_t max_tokens;   // per sequence
    int32_t stop[2];      // stop token ids (< 0: none); a stop token is emitted, then the sequence ends
    int branches;         // speculative greedy decoding: W (1..SPEC_MAX_BRANCH) draft chains per sequence, the first
                          // token of chain w the draft's rank-w pick (sample_rank), the rest its greedy picks; the
                          // target verifies all W in one feed and keeps the chain it accepts longest (the first on
                          // ties). 0 or 1: one chain. The decoders then hold W rows per sequence (batch B * W)
} GenParams;

typedef struct {
    int64_t steps;                     // target verification steps summed over active sequences
    int64_t accepted_at[SPEC_MAX_K];   // how often draft position i (0-based) was accepted
    int64_t emitted;                   // tokens emitted (before truncation to max_tokens)
    int64_t target_feeds, draft_feeds; // decoder_feed calls (any length)
    int64_t rounds;                    // draft-then-verify rounds (loop iterations; = steps at batch 1)
    int64_t branch_won[SPEC_MAX_BRANCH];  // steps whose kept chain was branch w (branches > 1)
    double draft_s, verify_s;          // host wall seconds of the rounds' two phases: the draft's pending feed and
                                       // proposals; the target's window, feed of K + 1 tokens, picks, acceptance and
                                       // both accepts. Each phase ends at a host synchronization (picks reach the
                                       // host) except the accepts, whose GPU work lands in the next draft phase.
                                       // Greedy on the GPU the draft's picks stay there (one synchronization per
                                       // round): draft_s is then only the time to enqueue its work, verify_s the rest
} SpecStats;

// Decoder capacity (max_len) that generation of max_tokens after prompts of up to Lmax tokens needs.
int64_t spec_max_len(int64_t Lmax, int64_t max_tokens, int k);

// The decoder the generation loops drive: the CPU Decoder (engine.h) or the GPU DecoderCuda
// (kernels/engine/decode_cuda.h), exactly one set. Both have the same feed / window / accept semantics, so
// one algorithm serves both. Picks: greedy tokens are argmaxes (on the GPU computed there: only token ids
// cross to the host); sampled decoding works on host probabilities (sample_probs), for which the GPU copies
// the logits rows it needs to the host.
typedef struct DecoderCuda DecoderCuda;
typedef struct {
    Decoder *cpu;
    DecoderCuda *cuda;
} GenDecoder;
static inline GenDecoder gen_cpu(Decoder *d) {
    GenDecoder g = {d, NULL};
    return g;
}
static inline GenDecoder gen_cuda(DecoderCuda *d) {
    GenDecoder g = {NULL, d};
    return g;
}
// A decoder for B sequences of up to max_len tokens on the CPU (cuda = 0) or the GPU (cuda = 1: batch B, bf16
// weights, CUDA graphs for short feeds when graph != 0). Returns 0 or -1 (e filled; also when built without
// CUDA). Free with gen_decoder_free.
int gen_decoder_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t max_len,
                    int cuda, int graph, GenDecoder *g, DlError *e);
void gen_decoder_free(GenDecoder *g);
// A trimmed head on either device (decoder_set_head_ids / decoder_cuda_set_head_ids; n 0: the full head).
int gen_decoder_set_head_ids(GenDecoder g, const int32_t *ids, int64_t n, DlError *e);
// Plain decode speed at a long context (benchmarks): seek to ctx (zeroed KV rows, speed only), one warm-up
// step, then `steps` greedy single-token steps of every sequence; returns tokens/s (or -1, e filled).
double gen_decode_speed(GenDecoder g, int64_t ctx, int steps, DlError *e);

// Plain generation: prompts [B, Lmax] (row b holds plen[b] >= 1 tokens, the rest padding), one token per step.
// out [B, max_tokens] gets the tokens, n_out [B] their count. The target decoder has B sequences and at least
// spec_max_len(...) capacity; it is reset first. Returns 0 or -1 (e filled).
int gen_plain(GenDecoder target, const int32_t *prompts, const int64_t *plen, int64_t Lmax, const GenParams *gp,
              Rng *rng, int32_t *out, int64_t *n_out, DlError *e);
// Speculative generation: as gen_plain with a draft decoder (same batch and vocabulary; either device). stats may
// be NULL. With gp->branches = W > 1 (greedy only) both decoders hold W rows per sequence: their batch is B * W for
// the B prompts of prompts / plen (rows s * W .. s * W + W - 1 are sequence s's chains), and out / n_out are per
// sequence. The output still equals plain greedy decoding token for token.
int gen_speculative(GenDecoder target, GenDecoder draft, const int32_t *prompts, const int64_t *plen, int64_t Lmax,
                    const GenParams *gp, Rng *rng, int32_t *out, int64_t *n_out, SpecStats *stats, DlError *e);

// A draft model cut from a model: the embeddings, final norm and head plus layers layers[0..n) (in that
// order, renumbered 0..n-1). dh/dr/dparams are filled (free with reg_free and free). Returns 0 or -1.
int spec_draft_from_layers(const HybridConfig *h, const Registry *r, const float *params, const int *layers, int n,
                           HybridConfig *dh, Registry *dr, float **dparams, DlError *e);
