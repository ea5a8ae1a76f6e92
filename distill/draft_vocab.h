// draft_vocab.h: a speculative draft's trimmed head. A draft step of a small model is dominated by its head
// (SmolLM2: 49152 x 576 of 2 layers' ~7M weights; Llama-3: 128256 x 4096, more than two of its layers), yet the
// tokens it proposes come from a small part of the vocabulary. The draft stage counts the tokens its training
// rows teach (loss mask 1) and keeps the most frequent `vocab` ids in MODEL_DIR/draft_vocab.json; decoders then
// compute only those head rows (decoder_set_head_ids: the other logits are -inf). Exactness is untouched: the
// target verifies every proposal, and speculative sampling is exact for any draft distribution q (q = 0 outside
// the subset); only acceptance can drop, when the target wants a token the draft cannot propose.
//
// draft_vocab.json: {"format": "distill-draft-vocab", "version": 1, "vocab_size": V, "counted_tokens": total,
// "source": "...", "ids": [most frequent first], "counts": [their counts]}. HF loaders ignore the file: the
// model directory stays an ordinary Llama checkpoint with its full head.
#pragma once
#include <stdint.h>

#include "distill/common.h"

#define DRAFT_VOCAB_FILE "draft_vocab.json"

// A sorted (ascending) copy of ids[0..n) after checking that they are distinct and in 0..V-1; NULL with e filled
// (naming `who`, the index and the id) otherwise. Free with free().
int32_t *head_ids_sorted(const int32_t *ids, int64_t n, int64_t V, const char *who, DlError *e);

// counts [V] (zeroed here) <- how often each id is a trained token (loss mask 1) of the packed LM shard; total (may
// be NULL) <- their sum. Returns 0 or -1 (e names the shard; also an id outside 0..V-1).
int draft_vocab_count(const char *shard, int64_t V, int64_t *counts, int64_t *total, DlError *e);

// Writes DIR/draft_vocab.json atomically: the `keep` ids with the highest counts (ties: lower id first; ids never
// seen fill up in id order when fewer than keep were), most frequent first. 0 < keep <= V. covered (may be NULL) <- the
// kept ids' summed counts. Returns 0 or -1.
int draft_vocab_write(const char *dir, const int64_t *counts, int64_t V, int64_t keep, const char *source, int64_t *covered,
                      DlError *e);

typedef struct {
    int32_t *ids;      // [n], most frequent first
    int64_t n;
    int64_t total;     // counted_tokens
    double coverage;   // the first n ids' share of counted_tokens (0 when none were counted)
} DraftVocab;

// Reads DIR/draft_vocab.json for a model of vocabulary V: its first `want` ids (0: all). Returns 1 when the file
// does not exist (v zeroed), 0 when read, -1 with e naming the file and what is wrong (not JSON, another format
// or vocabulary, an id out of range or repeated, counts missing, want larger than the file's list).
int draft_vocab_read(const char *dir, int64_t V, int64_t want, DraftVocab *v, DlError *e);
void draft_vocab_free(DraftVocab *v);
