// dataloader.h: batches of packed rows from one or more LM shards (shards.h), for training.
//
// Row space: the packed rows of all shards, in the order given. Each epoch visits a permutation of the
// rows (Fisher-Yates driven by rng_init(seed, epoch); the identity with shuffle off). Global batch k of an
// epoch is perm[k*B*W .. (k+1)*B*W); rank r takes its B rows at perm[k*B*W + r*B ..], so ranks never
// overlap and together cover the epoch. A trailing partial global batch is dropped.
//
// A batch (B rows of T = seq_len positions, row-major [B, T]):
//   inputs[b,t]  = row[t]             targets[b,t] = row[t+1]
//   mask[b,t]    = 1 if targets[b,t] is trained on: its loss_mask is 1 and it does not start a new document
//                  (no prediction across a document boundary)
//   reset[b,t]   = 1 if the recurrent state must be zeroed before consuming inputs[b,t] (a document starts
//                  there; always 1 at t = 0)
// Preference shards (opts.preference): the unit is a pair, and a batch holds 2B rows: row i < B is
// prompt+chosen of pair i, row B+i is prompt+rejected of the same pair, each right-padded to T with the
// shard's pad id; mask is 1 on the response targets only; reset is 1 at t = 0. A pair longer than T+1 tokens
// is an error naming the shard and pair (tokenize with --seq-len T to drop such pairs up front).
// The position (DataPos) is a small POD: save it in checkpoints and restore it to continue bit-exactly.
// It counts rows consumed globally, so a resume with the same global batch B*W may change W.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/tokenizer.h"

typedef struct {
    uint64_t seed;
    uint64_t epoch;
    uint64_t consumed;  // rows consumed in this epoch, over all ranks
} DataPos;

typedef struct {
    const char *const *paths;
    int n_paths;
    int64_t seq_len;        // must equal the shards' seq_len
    int64_t batch_size;     // rows per rank per step (B)
    int rank, world_size;   // 0 <= rank < world_size
    uint64_t seed;
    bool shuffle;
    const Tokenizer *tokenizer;  // optional: shards must have been written with it
    bool preference;             // read preference pairs instead of packed LM rows
} DataLoaderOpts;

typedef struct {
    int64_t B, T;               // rows in the batch (2 x pairs for preference batches), positions per row
    int64_t n_pairs;            // preference batches: pairs (rows = 2 * n_pairs); 0 for LM batches
    int32_t *inputs, *targets;  // [B, T]
    uint8_t *mask, *reset;      // [B, T]
    uint64_t epoch;             // epoch the batch came from
    int64_t step;               // global step index within that epoch
} DataBatch;

typedef struct DataLoader DataLoader;
int dataloader_open(DataLoader **dl, const DataLoaderOpts *o, DlError *e);
void dataloader_close(DataLoader *dl);
// Fills the loader's batch (valid until the next call) and advances; crosses into the next epoch when the
// current one runs out.
int dataloader_next(DataLoader *dl, const DataBatch **batch, DlError *e);
DataPos dataloader_pos(const DataLoader *dl);
// Restores a position (seed must match the loader's; consumed must be a multiple of B*W).
int dataloader_set_pos(DataLoader *dl, const DataPos *p, DlError *e);
int64_t dataloader_rows(const DataLoader *dl);            // rows (pairs for preference) in all shards
int64_t dataloader_steps_per_epoch(const DataLoader *dl);  // floor(rows / (B*W))
