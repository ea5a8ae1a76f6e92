// engine.h: whole-model forward and backward of a teacher (all attention) or a hybrid (attention + Mamba-1
// layers) on the CPU, fp32 — the reference engine. Parameters are read from one buffer laid out by the
// registry (model_build_registry); gradients go to a buffer of the same layout. The decoder layer is
//   h = x + Mixer(RMSNorm_in(x));  out = h + down(silu(gate(RMSNorm_post(h))) * up(RMSNorm_post(h)))
// with Mixer = GQA causal attention with RoPE, or the MambaInLlama Mamba-1 / Mamba-2 mixer
// (distill/mamba1_cpu.h, distill/mamba2_cpu.h).
//
// Packed sequences: reset[b,t] != 0 marks the first token of a new document in row b. Attention then sees
// only its own document, RoPE positions restart at 0, and Mamba state and conv window are cut, so a packed
// row equals its documents run one by one.
//
// Training step:   engine_forward -> engine_loss (streams logits through the head in row chunks, never
// materializing [B*T, V]) [-> engine_add_hidden_grad] -> engine_backward (grads are ADDED into).
// The teacher uses an inference engine (no activations kept) and is read chunk by chunk by the student's
// engine_loss (LossSpec.teacher), so neither model ever holds [B*T, V] logits.
// Decoding: Decoder keeps a KV cache per attention layer and conv + SSM state per Mamba layer (Mamba-1 or
// Mamba-2: distill/mamba2_cpu.h); one decode
// step costs O(1) in the sequence length for Mamba layers.
//
// Determinism: every reduction has a fixed order (static partitions over independent rows/columns).
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/losses.h"
#include "distill/model.h"
#include "distill/registry.h"

typedef struct Engine Engine;

enum {
    ENGINE_TRAIN = 1,        // keep activations for engine_backward
    ENGINE_KEEP_HIDDEN = 2,  // keep every hidden state for engine_hidden (implied by ENGINE_TRAIN)
};

// An engine for batches of B rows of T tokens. h, r and params must outlive it; params may change between
// steps (the optimizer updates them in place). Returns NULL (e filled) if r does not match h (a tensor missing or of the wrong size, e.g. a Mamba-1 registry for a Mamba-2 config).
Engine *engine_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t T, int flags,
                   DlError *e);
void engine_free(Engine *e);
int64_t engine_batch(const Engine *e);
int64_t engine_seqlen(const Engine *e);

// Forward over all layers: tokens [B*T] (ids < vocab), reset [B*T] or NULL. Ends with the final norm.
void engine_forward(Engine *e, const int32_t *tokens, const uint8_t *reset);
// Forward over layers [l0, l1) only, starting from hidden state x0 [B*T, d] (hidden state l0) instead of the
// embeddings (x0 NULL requires l0 == 0). For layerwise alignment; the final norm runs only if l1 == n_layer.
void engine_forward_range(Engine *e, const int32_t *tokens, const uint8_t *reset, int l0, const float *x0, int l1);

// Hidden state i of the last forward, [B*T, d], as HF's output_hidden_states before the final norm:
// i = 0 the embeddings, i = l + 1 the output of layer l. Needs ENGINE_TRAIN or ENGINE_KEEP_HIDDEN (else only
// the last computed state is available). final norm output: engine_final_hidden.
const float *engine_hidden(const Engine *e, int i);
const float *engine_final_hidden(const Engine *e);  // [B*T, d], after model.norm

// Logits of rows [r0, r1) of the last forward (row = b*T + t): out [(r1-r0), V].
void engine_logits(const Engine *e, int64_t r0, int64_t r1, float *out);

typedef struct {
    LossWeights w;               // ce, kl, rkl weights and temperature
    double norm;                 // loss = weighted sums / norm; 0: the number of counted rows
    const float *teacher_logits; // [B*T, V] teacher logits, or NULL
    const Engine *teacher;       // or: a teacher engine that ran forward on the same batch (logits per chunk)
    int teacher_topk;            // or: k > 0 and a sparse teacher (offline distillation, forward KL only):
    const int32_t *teacher_topk_ids;  // [B*T, k] token ids (< 0: padding)
    const float *teacher_topk_logp;   // [B*T, k] their log-probs at temperature 1
    const float *seq_weight;     // [B] optional multiplier of every term of row b (DPO: -dL/dlogp)
    int64_t chunk_rows;          // rows of logits per chunk; 0: about 16M logits per chunk
} LossSpec;

typedef struct {
    double loss;          // the total: (w.ce*ce + w.kl*kl + w.rkl*rkl) / norm
    double ce, kl, rkl;   // each sum / norm
    double n_tokens;      // counted rows
    double norm;          // the normalizer used
} LossParts;

// Loss of the last forward against targets [B*T] (target of row b*T+t: usually tokens[b*T+t+1]; < 0 means
// none) and mask [B*T] (NULL: all rows). If grads != NULL (ENGINE_TRAIN), d loss / d final hidden is kept for
// engine_backward and the head's gradient is added into grads. seq_logprob [B] (optional) gets, per row b,
// the sum over counted rows of log softmax(logits)[target] (DPO's sequence log-prob).
LossParts engine_loss(Engine *e, const int32_t *targets, const uint8_t *mask, const LossSpec *spec, float *grads,
                      double *seq_logprob);

// Adds scale * dh [B*T, d] to the gradient of hidden state i (see engine_hidden), e.g. from mse_rows.
// Call after the forward, before engine_backward.
void engine_add_hidden_grad(Engine *e, int i, const float *dh, float scale);

// Backward of the last forward from the gradients given by engine_loss / engine_add_hidden_grad. Gradients
// are ADDED into grads (same layout as params). Weight gradients of tensors with trainable == false are not
// computed or added, and the pass stops below the lowest trainable layer.
void engine_backward(Engine *e, float *grads);

// forward + loss + backward (grads may be NULL: forward + loss only).
LossParts engine_step(Engine *e, const int32_t *tokens, const uint8_t *reset, const int32_t *targets,
                      const uint8_t *mask, const LossSpec *spec, float *grads);

// ---- generation

typedef struct Decoder Decoder;
// A decoder for B sequences of up to max_len tokens each. Returns NULL (e filled) as engine_new does.
// Every sequence has its own length: prompts of different lengths are prefilled together
// (decoder_feed_ragged) and attention of sequence b sees only its own keys 0 .. len[b]-1 + t.
Decoder *decoder_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B, int64_t max_len,
                     DlError *e);
void decoder_free(Decoder *d);
void decoder_reset(Decoder *d);         // empties the caches (a new batch of sequences)
// Empties sequence b alone (length 0, Mamba state zero) while the others keep theirs: a finished sequence's slot
// takes a new prompt (continuous batching in the generate stage). Not inside a speculative window.
int decoder_reset_seq(Decoder *d, int64_t b, DlError *e);
// Sequence b of d becomes a copy of sequence j of src (same model; its KV rows, Mamba state and length): a prompt
// prefilled in a small batch of its own joins a running batch (the generate stage's refills).
int decoder_copy_seq(Decoder *d, int64_t b, const Decoder *src, int64_t j, DlError *e);
int64_t decoder_len(const Decoder *d);  // tokens fed so far: the longest sequence's length
int64_t decoder_seq_len(const Decoder *d, int64_t b);  // sequence b's length
int64_t decoder_batch(const Decoder *d);
int64_t decoder_vocab(const Decoder *d);
// Feeds tokens [B, L] at positions len[b] .. len[b]+L-1 of every sequence (a prefill when len == 0, a decode
// step when L == 1). logits: [B, V] of the last fed token (NULL: not computed); all_logits: [B, L, V] (NULL: not).
// Returns 0, or -1 (e filled) if some len[b] + L > max_len or a token id is out of range.
int decoder_feed(Decoder *d, const int32_t *tokens, int64_t L, float *logits, float *all_logits, DlError *e);
// As decoder_feed, but sequence b feeds only its first n[b] (1..L) tokens of row b (the rest is padding, never
// seen by anything later: its KV rows lie past len[b], the Mamba state stops at n[b] through the multi-step
// scan). logits [B, V] are those of each sequence's last fed token n[b]-1. n NULL: all L.
int decoder_feed_ragged(Decoder *d, const int32_t *tokens, int64_t L, const int64_t *n, float *logits,
                        float *all_logits, DlError *e);

// Speculative verification (mambainllama.md §5): decoder_window_begin marks the current state; the feeds that
// follow (uniform, not ragged) are tentative; decoder_accept(keep) then keeps the first keep[b] (0 .. tokens
// fed since) of them per sequence. Attention layers roll back by resetting the length (the KV rows past it are
// dead); Mamba layers are replayed from the state cached at the window start over the cached mixer inputs of
// the window by one multi-step run that stops each sequence at keep[b] — no per-token states are stored.
// When every sequence keeps the whole window, nothing is recomputed.
void decoder_window_begin(Decoder *d);
int decoder_accept(Decoder *d, const int32_t *keep, DlError *e);
// decoder_accept for speculative branches (several rows verifying different proposals after the same prefix):
// sequence b ends as sequence src[b] after src[b]'s keep[src[b]] window tokens (src NULL or src[b] == b: its own
// keep[b]). A source keeps its own window (src[src[b]] == src[b]) and both began the window at the same length;
// their states at the window start must be equal (the caller's promise: the rows fed the same tokens before it).
int decoder_accept_from(Decoder *d, const int32_t *keep, const int32_t *src, DlError *e);

// A head over a subset of the vocabulary (a speculative draft's trimmed head, draft_vocab.h): from now on the
// logits of ids[0..n) are computed as before (the same values) and every other logit is -inf, so argmax and
// sampling pick only from the subset, at the cost of n head rows instead of V. ids: distinct, in 0..V-1, any
// order (copied). n == 0 (ids NULL) restores the full head. Returns 0, or -1 (e filled) on a bad id.
int decoder_set_head_ids(Decoder *d, const int32_t *ids, int64_t n, DlError *e);

// Benchmarks only: sets every sequence's length to len without feeding tokens (the KV rows below len are
// zeroed, Mamba states kept), so the decode speed at a long context can be timed without a long prefill.
int decoder_seek(Decoder *d, int64_t len, DlError *e);
