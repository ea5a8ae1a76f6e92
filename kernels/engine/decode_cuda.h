// decode_cuda.h: batched generation on the GPU, callable from C. DecoderCuda is the CUDA twin of the CPU
// Decoder (distill/engine.h) for what generation needs: B sequences of up to max_len tokens, each with its
// own length; ragged prefill (every sequence its own prompt length); one-token decode steps; the logits of
// each sequence's last token; sampling on the device. Teacher (all attention) or attention + Mamba-1 hybrid;
// Mamba-2 layers are refused. Design and limits: docs/DECODE_CUDA.md.
//
// Precision: bf16 weights (uploaded from the host fp32 registry buffer), bf16 activations and KV cache,
// fp32 SSM state, bf16 conv window (it holds bf16 GEMM outputs, so keeping it in bf16 loses nothing), fp32
// logits. The Mamba conv weights, A = -exp(A_log), D and the dt bias are kept in fp32.
// Memory: KV cache 2 * n_attn * B * max_len * kvd bf16, Mamba state n_mamba * B * d_inner * (d_state fp32
// + 3 bf16), scratch for up to `rows` tokens per pass (a prefill of B*L tokens runs in chunks of columns).
// Determinism and batch invariance: no float atomics; two runs give identical bits. Every token's logits are
// bit-identical whether it is fed in a 1-token step, a K-token speculative window, a prefill (one chunk or
// many), at any batch size or slot, with or without CUDA graphs: the GEMMs are decode_gemm.h (one reduction
// order per element, fixed by K alone) and the attention folds fixed 128-key tiles in order. So greedy
// speculative decoding reproduces plain greedy decoding exactly. DISTILL_DECODE_INVARIANT=0 restores the
// previous arithmetic (cuBLASLt, key splits chosen from the number of rows) for comparisons only.
// Errors: CUDA failures exit with the call and a hint (kernels/train/train_check.cuh); shape, length and
// token errors return -1 / NULL with e filled.
#pragma once
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
#ifndef _Noreturn
#define _Noreturn [[noreturn]]
#endif
extern "C" {
#endif

#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"

typedef struct DecoderCuda DecoderCuda;

// A decoder for up to B sequences of up to max_len tokens each. params: host fp32, registry layout (the
// host copy is not kept). log: one line with the memory use (NULL: silent). NULL with e filled on a bad
// shape, a Mamba-2 layer, or out of memory.
DecoderCuda *decoder_cuda_new(const HybridConfig *h, const Registry *r, const float *params, int64_t B,
                              int64_t max_len, FILE *log, DlError *e);
void decoder_cuda_free(DecoderCuda *d);
// Empties the caches for a new batch of nb sequences (1 <= nb <= B): later calls work on slots 0..nb-1.
int decoder_cuda_reset(DecoderCuda *d, int64_t nb, DlError *e);
// decoder_reset_seq on the device: sequence b (< nb) alone is emptied (length 0, Mamba state zero).
int decoder_cuda_reset_seq(DecoderCuda *d, int64_t b, DlError *e);
// decoder_copy_seq on the device for n sequences at once: sequence b[i] of d becomes a copy of sequence j[i] of
// src (same model; KV rows, Mamba state, length). Ordered after src's work so far and before d's next feed.
int decoder_cuda_copy_seqs(DecoderCuda *d, const int64_t *b, const DecoderCuda *src, const int64_t *j, int64_t n, DlError *e);
int64_t decoder_cuda_batch(const DecoderCuda *d);  // the active batch nb
int64_t decoder_cuda_capacity(const DecoderCuda *d);  // B
int64_t decoder_cuda_max_len(const DecoderCuda *d);
int64_t decoder_cuda_seq_len(const DecoderCuda *d, int64_t b);
int64_t decoder_cuda_vocab(const DecoderCuda *d);
double decoder_cuda_bytes(const DecoderCuda *d);  // device memory held
// decoder_set_head_ids on the device: the head computes only rows ids[0..n) (a draft's trimmed head, draft_vocab.h);
// their logits keep their bits and every other logit is -inf. n 0: the full head again. Captured graphs are
// dropped. Returns 0 or -1 (e filled) on a bad id.
int decoder_cuda_set_head_ids(DecoderCuda *d, const int32_t *ids, int64_t n, DlError *e);

// decoder_feed_ragged on the device: tokens [nb, L] (host), sequence b feeds its first n[b] (1..L) tokens
// (n NULL: all L) at positions len[b] .. len[b]+n[b]-1; afterwards the device logits [nb, V] (fp32) are
// those of each sequence's last fed token. Returns 0, or -1 (e filled) if a length would pass max_len or a
// token id is out of range (nothing is changed then).
int decoder_cuda_feed_ragged(DecoderCuda *d, const int32_t *tokens, int64_t L, const int64_t *n, DlError *e);
// One decode step: token[b] (host [nb]) appended to every sequence.
int decoder_cuda_step(DecoderCuda *d, const int32_t *tokens, DlError *e);
// The general feed (decoder_feed_ragged's twin): as decoder_cuda_feed_ragged; all_logits != 0 keeps the logits
// of every fed token, [nb, L, V] (row b*L + t; rows past n[b] are padding), else those of each sequence's
// last fed token, [nb, V].
int decoder_cuda_feed(DecoderCuda *d, const int32_t *tokens, int64_t L, const int64_t *n, int all_logits, DlError *e);
// The logits of the last feed: device pointer [rows, V] fp32 with rows = decoder_cuda_logits_rows (nb, or
// nb * L after an all-logits feed; valid until the next feed), or a host copy of all those rows.
const float *decoder_cuda_logits(const DecoderCuda *d);
int64_t decoder_cuda_logits_rows(const DecoderCuda *d);
void decoder_cuda_logits_host(const DecoderCuda *d, float *out);
// Greedy tokens of every row of the last feed's logits (argmax on the device, lowest id on ties, as
// sample_argmax): host [decoder_cuda_logits_rows]. Only the ids cross to the host.
int decoder_cuda_argmax(DecoderCuda *d, int32_t *tokens, DlError *e);
// Greedy decoding of n (1..16) tokens per sequence with one host round trip: pick i is the argmax of the current
// logits (the first: those of the last feed, which must have kept one row per sequence), and picks are fed back as
// one-token steps, all n of them when feed_last, else the first n-1. out host [nb, n]. The same tokens, lengths,
// states and logits as n x (decoder_cuda_argmax, then decoder_cuda_step if fed), also inside a speculative window;
// with graphs on, the whole chain is one graph per (nb, n, feed_last, window). DISTILL_DECODE_CHAIN=0 runs it as
// those separate calls (A/B timing). Returns 0 or -1 (e filled: n out of range, a length past max_len, or
// all-logits rows). out NULL: the picks stay on the device, with no host round trip, for another decoder's
// decoder_cuda_feed_picks.
int decoder_cuda_greedy_chain(DecoderCuda *d, int n, int feed_last, int32_t *out, DlError *e);
// decoder_cuda_greedy_chain for speculative branches: the first pick of sequence b is the id of rank b % W (1..8) of
// its logits (rank_rows_cuda; 0: the argmax), the later picks argmaxes, so W consecutive sequences holding the same
// state propose W different continuations. W 1: decoder_cuda_greedy_chain.
int decoder_cuda_branch_chain(DecoderCuda *d, int W, int n, int feed_last, int32_t *out, DlError *e);
// A speculative round without a host round trip between draft and target: feeds tokens [nb, 1 + n] to d whose
// column 0 is first (host [nb]) and columns 1..n are the picks of src's last greedy chain run with out NULL (copied
// on the device once src's stream has made them; src: another decoder, same nb and vocabulary). all_logits as
// decoder_cuda_feed. Tokens, logits, lengths and bits are those of decoder_cuda_feed with the picks brought to
// the host first. -1 (e filled): no picks kept, a shape mismatch, or a feed longer than one pass.
int decoder_cuda_feed_picks(DecoderCuda *d, const int32_t *first, const DecoderCuda *src, int all_logits, DlError *e);
// After decoder_cuda_feed_picks: decoder_cuda_argmax, and the tokens that feed fed (host [nb, 1 + n]), with one
// host synchronization.
int decoder_cuda_argmax_fed(DecoderCuda *d, int32_t *tokens, int32_t *fed, DlError *e);

// Speculative verification window (decoder_window_begin / decoder_accept of engine.h, same meaning):
// window_begin marks the current state; the feeds that follow (uniform, not ragged; any number and length)
// are tentative; accept(keep) keeps the first keep[b] (0 .. tokens fed since) of them per sequence (host
// [nb]). Attention layers roll back by resetting the length (the KV rows past it are dead). Mamba layers
// keep one copy of their state (SSM + conv window) from the window start and the scan and conv inputs of
// the window's tokens (x, u, dt, B: [nb, window, .] bf16); accept replays the window from that copy with the
// multi-token scan (selective_scan_multi_cuda), which stops each sequence at keep[b] and writes only the
// state after it: no per-token states are stored. When every sequence keeps the whole window nothing is
// recomputed. The window buffers grow on demand (the first window sizes them).
void decoder_cuda_window_begin(DecoderCuda *d);
int decoder_cuda_accept(DecoderCuda *d, const int32_t *keep, DlError *e);
// decoder_accept_from (engine.h) on the device: sequence b ends as sequence src[b] after its keep[src[b]] window tokens
// (src NULL: decoder_cuda_accept). The branches take their sources' kept keys and values and Mamba window inputs (two
// launches over all layers), then every Mamba state is replayed from the window start as in decoder_cuda_accept.
int decoder_cuda_accept_from(DecoderCuda *d, const int32_t *keep, const int32_t *src, DlError *e);
// CUDA graphs for short feeds (L <= 32 tokens, one chunk: decode steps and verification windows), captured
// once per (batch, L, all_logits, window) shape. Default: the DISTILL_DECODE_GRAPH environment variable.
void decoder_cuda_use_graph(DecoderCuda *d, int on);
// Benchmarks only (decoder_seek): every sequence's length set to len without feeding (the KV rows below len
// are zeroed, Mamba states kept), so the decode speed at a long context is timed without a long prefill.
int decoder_cuda_seek(DecoderCuda *d, int64_t len, DlError *e);

// ---- sampling on the device (no [nb, V] copy to the host)
// temperature <= 0: greedy (argmax, lowest id on ties). Otherwise softmax(logits / temperature) over the
// top_k largest logits (top_k <= 0 or >= V: all; ties at the k-th value all kept, as the CPU stage does),
// truncated to the top-p nucleus (top_p <= 0 or >= 1: off; most likely first, ties by lower id), then one
// draw. The uniform of row b is a counter-based hash of (seed, stream[b], counter[b]) (sample_uniform_cuda
// below), so a sequence's tokens do not depend on the batch it runs in. Probabilities are carried as 2^40-
// scaled integers relative to the row maximum (sums exact and order-free); tokens less likely than 2^-40
// times the most likely one are never drawn.
typedef struct {
    float temperature;
    int top_k;
    float top_p;
    uint64_t seed;
} DecodeSampling;

// The uniform in [0, 1) (53 bits) used for (seed, stream, counter); the same function runs on the host.
double decode_uniform(uint64_t seed, uint64_t stream, uint64_t counter);

// Samples one token per row from the decoder's logits: stream, counter host [nb]; tokens host [nb] out.
int decoder_cuda_sample(DecoderCuda *d, const DecodeSampling *s, const uint64_t *stream, const uint64_t *counter,
                        int32_t *tokens, DlError *e);

// The sampler alone, for tests: logits device [rows, V] fp32; stream, counter device [rows] u64; out device
// [rows] int32. Enqueued on the default stream. Returns 0 or -1 (err) on a bad shape.
int sample_rows_cuda(const float *logits, int64_t rows, int64_t V, const DecodeSampling *s, const uint64_t *stream,
                     const uint64_t *counter, int32_t *out, char *err, size_t errlen);

// Greedy ids of rows of logits (argmax, lowest id on ties, NaN as -inf: sample_rows_cuda's greedy ids) with
// several blocks per row, for few rows. ws: argmax_rows_workspace(rows, V) bytes of device memory, zeroed before its
// first use (every call leaves it so). rows <= 65535. Enqueued on the default stream.
size_t argmax_rows_workspace(int64_t rows, int64_t V);
int argmax_rows_cuda(const float *logits, int64_t rows, int64_t V, void *ws, int32_t *out, char *err, size_t errlen);

// The id of rank r % W (W 1..8) of each row r of logits [rows, V] (sample_rank of sample.h: value descending, NaN as
// -inf, lower id first on ties) into out [rows] (device), several blocks per row. ws: rank_rows_workspace(rows, V)
// bytes of device memory, zeroed before its first use (every call leaves it so). rows <= 65535. Default stream; -1
// (err) on a bad shape.
size_t rank_rows_workspace(int64_t rows, int64_t V);
int rank_rows_cuda(const float *logits, int64_t rows, int64_t V, int W, void *ws, int32_t *out, char *err, size_t errlen);

// The decode attention alone, for tests and benchmarks: q device [nb*lc, nh*hd] bf16 (row b*lc + t: the query at
// position lenb[b] + t, which sees keys 0..lenb[b] + t of sequence b), kc, vc device [nb, max_len, nkv*hd] bf16,
// lenb device [nb] int32, out device [nb*lc, nh*hd] bf16; every query's keys <= maxkeys <= max_len. kernel: 0 =
// attn_tiles_kernel<false> (one block per (row, head), the fold in the block), 1 = attn_tiles_kernel<true> +
// attn_fold_kernel (one block per tile, the decoder's few-rows path; allocates and frees its workspace,
// synchronizes), 2 = attn_gqa_kernel (one block per (row, KV group); -1 where it is not instantiated: nh / nkv
// not in {1, 2, 3, 4, 8} or hd not 64 / 128), 3 = attn_gqa_kernel per tile + attn_fold_kernel (one block per (row, KV
// group, tile), the decoder's few-rows path where 2 is instantiated; -1 where it is not). The four give the same bits. Default stream; -1 (err) on a bad
// shape.
int decode_attention_cuda(int kernel, const void *q, const void *kc, const void *vc, const int32_t *lenb, int64_t nb,
                          int64_t lc, int64_t max_len, int nh, int nkv, int hd, int64_t maxkeys, void *out, char *err,
                          size_t errlen);

#ifdef __cplusplus
}
#endif
