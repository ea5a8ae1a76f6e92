// shards.h: HDF5 token shards (format "distill-tokens", version 1), readable by h5py.
//
// An LM shard (plain text and chat data) holds, as chunked, shuffle+deflate compressed 1-D datasets:
//   /tokens       uint32 [N]     all documents' token ids, concatenated
//   /loss_mask    uint8  [N]     1 where a training loss applies (all of a text doc; assistant turns of chat)
//   /doc_offsets  uint64 [D+1]   document d is tokens[doc_offsets[d] : doc_offsets[d+1]]
// and, when written with seq_len T > 0, the documents packed into fixed-length training rows:
//   /packed/tokens    uint32 [S, T+1]  row k is the stream tokens[k*T : k*T+T+1] (consecutive rows overlap
//                                     by one token, so inputs = row[:T] and targets = row[1:] lose nothing);
//                                     the last row is padded with pad_id
//   /packed/loss_mask uint8  [S, T+1]  the stream's loss mask; 0 on padding
//   /packed/reset     uint8  [S, T+1]  1 where a document starts (and on the first padding position): the
//                                     recurrent (Mamba) state and attention must not cross it
// A preference shard holds pairs that share a prompt:
//   /pref/prompt_tokens, /pref/chosen_tokens, /pref/rejected_tokens      uint32
//   /pref/prompt_offsets, /pref/chosen_offsets, /pref/rejected_offsets   uint64 [P+1]
// Root attributes: format="distill-tokens", format_version=1, kind="lm"|"preference", tokenizer_hash
// (uint64, tokenizer_hash()), tokenizer_pre, vocab_size, n_tokens, n_docs, seq_len, n_seqs, n_pairs,
// created_by, plus any string/int attributes the writer adds (sources, chat_family, skipped counts...).
//
// Files are written to PATH.tmp and renamed into place by shard_writer_close, so a failed or interrupted
// run never leaves a partial file that looks valid. Readers open with HDF5 file locking off (shards are
// read-only; locking fails on many NFS/Lustre mounts); writers lock but ignore file systems without locks.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/tokenizer.h"

#define SHARD_FORMAT "distill-tokens"
#define SHARD_FORMAT_VERSION 1

typedef enum { SHARD_LM = 0, SHARD_PREF = 1 } ShardKind;

typedef struct {
    ShardKind kind;
    uint64_t tokenizer_hash;
    const char *tokenizer_pre;  // e.g. "smollm"
    int32_t vocab_size;
    int64_t seq_len;   // LM only: > 0 writes /packed with rows of seq_len+1 tokens
    int32_t pad_id;    // padding of the last packed row (>= 0)
    int deflate;       // deflate level 0..9 (0: no compression); with byte shuffle when > 0
    int64_t chunk;     // chunk length in elements of the 1-D datasets (<= 0: 1<<16)
} ShardWriterOpts;

typedef struct ShardWriter ShardWriter;
int shard_writer_open(ShardWriter **w, const char *path, const ShardWriterOpts *o, DlError *e);
// Appends one document (LM shard). mask may be NULL (all ones). n must be > 0.
int shard_add_doc(ShardWriter *w, const int32_t *ids, const uint8_t *mask, int64_t n, DlError *e);
// Appends one preference pair (preference shard).
int shard_add_pair(ShardWriter *w, const int32_t *prompt, int64_t np, const int32_t *chosen, int64_t nc,
                   const int32_t *rejected, int64_t nr, DlError *e);
int shard_writer_attr_str(ShardWriter *w, const char *key, const char *value, DlError *e);
int shard_writer_attr_i64(ShardWriter *w, const char *key, int64_t value, DlError *e);
// Flushes, writes the count attributes, closes and renames PATH.tmp to PATH. Frees w in all cases.
int shard_writer_close(ShardWriter *w, DlError *e);
// Discards everything written (removes PATH.tmp) and frees w.
void shard_writer_abort(ShardWriter *w);

typedef struct {
    ShardKind kind;
    int format_version;
    uint64_t tokenizer_hash;
    int32_t vocab_size;
    int64_t n_tokens, n_docs;   // LM
    int64_t seq_len, n_seqs;    // LM packed (0 if not packed)
    int64_t n_pairs;            // preference
    int32_t pad_id;             // padding id recorded by the writer (0 if none)
} ShardInfo;

typedef struct ShardReader ShardReader;
// Opens and validates the layout (format, version, dataset shapes, offsets monotone and in range).
int shard_open(ShardReader **r, const char *path, DlError *e);
void shard_close(ShardReader *r);
const ShardInfo *shard_info(const ShardReader *r);
const char *shard_path(const ShardReader *r);
// Fails (naming both hashes) if the shard was written with another tokenizer.
int shard_check_tokenizer(const ShardReader *r, const Tokenizer *t, DlError *e);
// Reads a string attribute (malloc'd) or NULL if absent.
char *shard_attr_str(const ShardReader *r, const char *key);
// Document d: ids and mask (malloc'd; mask may be NULL to skip).
int shard_read_doc(const ShardReader *r, int64_t d, int32_t **ids, uint8_t **mask, int64_t *n, DlError *e);
// Packed rows [first, first+count): each array [count, seq_len+1] (any may be NULL to skip).
int shard_read_rows(const ShardReader *r, int64_t first, int64_t count, int32_t *tokens, uint8_t *mask,
                    uint8_t *reset, DlError *e);
// Every packed row of the LM shard at path, in chunks: fn(ctx, first, n, S, W, tokens, mask, reset, e) for rows
// [first, first+n) of S, each array [n, W = seq_len+1]; a nonzero return stops the walk and is returned. -1 (e filled)
// when the file is not a packed LM shard with rows or cannot be read.
typedef int (*ShardRowsFn)(void *ctx, int64_t first, int64_t n, int64_t S, int64_t W, const int32_t *tokens,
                           const uint8_t *mask, const uint8_t *reset, DlError *e);
int shard_walk_rows(const char *path, ShardRowsFn fn, void *ctx, DlError *e);
// Preference pair i (arrays malloc'd).
int shard_read_pair(const ShardReader *r, int64_t i, int32_t **prompt, int64_t *np, int32_t **chosen, int64_t *nc,
                    int32_t **rejected, int64_t *nr, DlError *e);
