// teacher_cache.h: offline teacher signals. The teacher's top-k log-probabilities per position of every
// packed row of an LM shard, plus the log of the probability mass outside the top k, in HDF5:
//   /ids   int32   [rows, T, k]   token ids, most likely first
//   /logp  float32 [rows, T, k]   their log-probabilities (log softmax of the teacher's logits)
//   /rest  float32 [rows, T]      log(1 - sum of the k probabilities), -inf when k = V
//   attributes: format "distill-teacher-cache", version 1, k, vocab, seq_len, rows, source (the shard)
// Student stages then run without the teacher: the cached distribution is made dense again with the top k
// exact and the rest mass spread evenly over the other V - k tokens, and KL (forward or reverse) is
// computed against it. With k = V it is the teacher's distribution exactly.
//
// RowSource: the packed rows of an LM shard as training batches (inputs row[:T], targets row[1:], mask =
// the target's loss mask unless it starts a document, reset as stored) in a per-epoch seeded permutation,
// with a savable position, and optionally the cached teacher log-probs of each batch.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"
#include "distill/shards.h"
#include "distill/train_loop.h"

#define TCACHE_FORMAT "distill-teacher-cache"

// Runs the teacher over every packed row of shard (batches of B rows) and writes the cache to path
// (path.tmp, renamed when complete). stop (may be NULL) aborts between batches (returns 1).
int tcache_write(const char *path, const HybridConfig *hc, const Registry *reg, const float *params, const char *shard,
                 int64_t B, int k, volatile sig_atomic_t *stop, DlError *e);

typedef struct TeacherCache TeacherCache;
int tcache_open(TeacherCache **tc, const char *path, DlError *e);
void tcache_close(TeacherCache *tc);
int tcache_k(const TeacherCache *tc);
int64_t tcache_rows(const TeacherCache *tc);
// Dense teacher log-probs of rows[0..n) into out [n*T, V] (see the header comment).
int tcache_dense(TeacherCache *tc, const int64_t *rows, int64_t n, int64_t T, int64_t V, float *out, DlError *e);

typedef struct {
    ShardReader *r;
    int64_t n_rows, T;
    uint64_t seed;
    bool shuffle;
    int64_t epoch, next;   // position
    int64_t *perm;         // [n_rows]
    int64_t *last_rows;    // rows of the last batch
    int64_t cap;
    int32_t *buf_t;        // [B, T+1] scratch
    uint8_t *buf_m, *buf_r;
    TeacherCache *cache;   // optional: teacher log-probs per batch
    float *teacher;        // [B*T, V] when cache is set
    int64_t V;
} RowSource;

int row_source_open(RowSource *rs, const char *shard, int64_t T, uint64_t seed, bool shuffle, DlError *e);
// Attach a cache (its rows must be the shard's packed rows, same T).
int row_source_attach_cache(RowSource *rs, const char *cache_path, int64_t V, DlError *e);
void row_source_close(RowSource *rs);
BatchSource row_source(RowSource *rs);
int64_t row_source_rows(const RowSource *rs);
