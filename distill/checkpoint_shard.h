// checkpoint_shard.h: checkpoints of data-parallel runs whose optimizer state is sharded (ZeRO-1/2), and
// resuming them on any number of ranks (re-sharding).
//
// Parallel HDF5 (collective writes into one file) is not installed here (Debian's libhdf5-dev is the
// serial build), so each rank writes its own file and rank 0 writes the manifest last:
//   run_dir/shards/ckpt-SS-STEP/rank-RRRRR-of-WWWWW.h5   one per rank (format "distill-optim-shard" 1):
//       attributes format, format_version, rank, world, stage_index, step, optim_step, optim_t
//       names  uint8 [*]    the names of the tensors it holds a piece of, '\n'-separated
//       ranges int64 [n, 4] per piece: begin, end (elements of the tensor), offset in m/v, tensor numel
//       m, v   float32 [*]  the pieces of the first and second moments, concatenated
//   run_dir/ckpt-SS-STEP.h5 (+ .done)                     written by rank 0 with checkpoint_write (checkpoint.h)
//       AFTER every rank's file is complete: full fp32 weights (identical on every rank after the
//       all-gather), the run state, and the manifest in the state: ints zero.world, zero.stage, the optimizer
//       counters zero.optim.*, blob zero.optim.window (the outlier window, f64), blob zero.shards (one line
//       per rank file: "RANK FILE SHA256 BYTES ELEMENTS").
// So completion is checkpoint.c's: a checkpoint counts only once its main file's marker verifies, which
// implies every shard file was complete (fsynced, renamed) and recorded with its SHA-256; a crash at any
// point leaves the previous checkpoint in force. checkpoint_find_latest needs no change.
//
// Resuming reads each needed shard file (SHA-256 checked against the manifest) and copies, for every
// trainable tensor, the overlap of each old piece with this rank's owned range [shard_begin, shard_end):
// any old world size and bucket layout -> any new one, bitwise. A plain checkpoint (no shards, e.g. written
// on one rank, or gathered by rank 0 for a small model) loads through the same call.
//
// Small models can instead gather m and v to rank 0 (all-gather of the shards, zero.h) and write a plain
// checkpoint with checkpoint_write: one file, readable by every tool, also re-shardable.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/checkpoint.h"
#include "distill/common.h"
#include "distill/dist.h"
#include "distill/optim.h"
#include "distill/registry.h"

#define CKPT_SHARD_FILE_MAX 96

// What a rank reports about its file (a fixed-size POD, so that it can be all-gathered).
typedef struct {
    int32_t rank, world;
    int32_t ok;                       // 0: the rank failed (err says why)
    char file[CKPT_SHARD_FILE_MAX];   // relative to run_dir
    char sha256[65];
    int64_t bytes;
    int64_t n_elems;                  // elements of m (and of v) in the file
    char err[256];
} CkptShardInfo;

// Step 1, every rank: writes its shard file (m, v over the owned ranges of opt->reg) atomically. Refuses
// non-finite values. info is filled either way (ok = 0 and err on failure), returns 0 or -1 with e.
int ckpt_shard_write_rank(const char *run_dir, const Optim *opt, int rank, int world, const CkptState *st,
                          CkptShardInfo *info, DlError *e);

// Step 2, rank 0, once it holds every rank's info (infos[r] for rank r): checks them, adds the manifest and
// the optimizer counters to a copy of st, writes the main checkpoint (checkpoint_write, weights from params,
// keep_last as there), and deletes shard directories of checkpoints that are gone or were never completed.
int ckpt_shard_write_main(const char *run_dir, const Registry *reg, const float *params, const Optim *opt,
                          const CkptShardInfo *infos, int world, int stage, const CkptState *st, int keep_last,
                          char *path_out, size_t path_n, DlError *e);

// Both steps over a process group: step 1 on every rank, all-gather of the infos, step 2 on rank 0, and
// rank 0's result broadcast, so every rank returns the same status (an error names the failing rank).
int ckpt_shard_save(DistGroup *g, const char *run_dir, const Registry *reg, const float *params, const Optim *opt,
                    int stage, const CkptState *st, int keep_last, char *path_out, size_t path_n, DlError *e);

// True if the checkpoint's optimizer state lives in shard files (false: plain checkpoint). -1 on error.
int ckpt_shard_is_sharded(const char *path, bool *sharded, DlError *e);
// Number of ranks that wrote the checkpoint (1 for a plain one).
int ckpt_shard_world(const char *path, int *world, DlError *e);

// Restores opt (m and v over the owned ranges of opt->reg's trainable tensors, and the counters) from a
// checkpoint written on any number of ranks, sharded or plain. Every owned element must be found exactly
// once; shapes must match; shard files must match the manifest's SHA-256. Weights: checkpoint_load_weights.
int ckpt_shard_load_optim(const char *path, Optim *opt, DlError *e);
