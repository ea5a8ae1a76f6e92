// checkpoint.h: training checkpoints in HDF5, written atomically, verified on load.
//
// File layout (format "distill-checkpoint", version 1):
//   /                 attributes: format, format_version, program_version, stage_index, stage_name, step
//   /weights/NAME     float32 dataset of the tensor's shape, one per registry tensor (HF names)
//   /optim            (if saved) attributes step, t, n_skip_nonfinite, n_skip_outlier, window_n, window_pos,
//                     n_accepted; datasets window [OPTIM_MAX_WINDOW] f64, m/NAME and v/NAME per trainable tensor
//   /rng/KEY          uint64 [4] per saved Rng
//   /ints             one int64 attribute per key (data-loader position, counters)
//   /blobs/KEY        uint8 dataset per key (opaque state, e.g. a model config as JSON)
//   /recipe           uint8 dataset: the resolved recipe text
// Every dataset carries a "sha256" attribute (hex of its raw bytes), checked when it is read.
//
// Files in a run directory: ckpt-SS-STEP.h5 (SS = stage index, 2 digits; STEP = step, 8 digits, so names
// sort in run order) and its completion marker ckpt-SS-STEP.done, which holds "SHA256  ckpt-SS-STEP.h5\n"
// (the sha256sum format: `sha256sum -c ckpt-...done` checks it). Writing: ckpt...h5.tmp, fsync, rename,
// fsync the directory, then the marker (written the same way). Only a file with a verifying marker counts.
// Older checkpoints beyond keep_last are deleted after the new one is complete.
//
// Test hook: with DISTILL_TEST_CRASH_IN_CHECKPOINT=N in the environment, the N-th checkpoint write that sees
// the variable aborts after its temporary file is complete and before the rename (to test that a crash
// there loses nothing).
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"
#include "distill/optim.h"
#include "distill/registry.h"
#include "distill/rng.h"

#define CKPT_KEY_MAX 64

typedef struct {
    char key[CKPT_KEY_MAX];
    int64_t value;
} CkptInt;

typedef struct {
    char key[CKPT_KEY_MAX];
    uint8_t *data;  // owned
    int64_t len;
} CkptBlob;

typedef struct {
    char key[CKPT_KEY_MAX];
    Rng rng;
} CkptRng;

// Everything besides weights and optimizer: where the run is, and generic key->value state.
typedef struct {
    int stage_index;
    char stage_name[CKPT_KEY_MAX];
    int64_t step;        // optimizer steps done in this stage
    char *recipe;        // resolved recipe text (owned; NULL if none)
    char version[32];    // program version that wrote the file (set by the reader; the writer uses DISTILL_VERSION)
    CkptInt *ints;
    int n_ints;
    CkptBlob *blobs;
    int n_blobs;
    CkptRng *rngs;
    int n_rngs;
} CkptState;

void ckpt_state_init(CkptState *s);
void ckpt_state_free(CkptState *s);
void ckpt_state_set_recipe(CkptState *s, const char *text);
// Setters replace an existing key. Keys: up to 63 characters of [A-Za-z0-9_.-].
void ckpt_state_set_int(CkptState *s, const char *key, int64_t v);
void ckpt_state_set_blob(CkptState *s, const char *key, const void *data, int64_t len);
void ckpt_state_set_rng(CkptState *s, const char *key, const Rng *r);
// Getters return 0, or -1 with e naming the missing key.
int ckpt_state_get_int(const CkptState *s, const char *key, int64_t *v, DlError *e);
const CkptBlob *ckpt_state_get_blob(const CkptState *s, const char *key);
int ckpt_state_get_rng(const CkptState *s, const char *key, Rng *r, DlError *e);

// Name of the checkpoint file for (stage, step) inside run_dir (newly allocated).
char *checkpoint_path(const char *run_dir, int stage_index, int64_t step);

// Writes run_dir/ckpt-SS-STEP.h5 (SS, STEP from st) with weights, the optimizer (if opt != NULL) and st,
// atomically, then keeps only the newest keep_last complete checkpoints (keep_last <= 0 keeps all).
// Refuses (returns -1, writes nothing) if any weight or optimizer value is non-finite. The path written is
// copied to path_out if non-NULL.
int checkpoint_write(const char *run_dir, const Registry *reg, const float *params, const Optim *opt,
                     const CkptState *st, int keep_last, char *path_out, size_t path_n, DlError *e);

// The steps of stage stage_index's checkpoints that have a completion marker, oldest first, in *steps
// (allocated; free it): returns their count, or -1 with e.
int checkpoint_list_steps(const char *run_dir, int stage_index, int64_t **steps, DlError *e);

// Deletes every checkpoint of stage stage_index with a step after `step` (a training loop that rolled back
// to an earlier checkpoint: what it wrote since belongs to the abandoned branch, and a resume must not take it).
void checkpoint_drop_after(const char *run_dir, int stage_index, int64_t step);

// Checks a checkpoint against its completion marker (presence, format, SHA-256 of the file).
int checkpoint_verify(const char *path, DlError *e);

// The newest checkpoint of run_dir whose marker verifies. A newer one that is missing its marker, or is
// corrupted or truncated, is reported with dl_warn (naming the file and the problem) and skipped.
// Returns 1 and the path in out, 0 if there is none, -1 on error (e.g. run_dir unreadable).
int checkpoint_find_latest(const char *run_dir, char *out, size_t out_n, DlError *e);

// Reads the non-tensor state (stage, step, recipe, ints, blobs, rngs, version).
int checkpoint_read_state(const char *path, CkptState *st, DlError *e);

enum {
    CKPT_ALLOW_MISSING = 1,  // registry tensors absent from the file keep their current values
    CKPT_ALLOW_EXTRA = 2,    // tensors in the file but not in the registry are ignored
};
// Reads the weights into params (registry layout). Every tensor read must have the registry's shape and a
// matching checksum. Returns the number of tensors read, or -1.
int checkpoint_load_weights(const char *path, const Registry *reg, float *params, unsigned flags, DlError *e);
// True if the file holds optimizer state.
bool checkpoint_has_optim(const char *path);
// Restores m, v and the optimizer state (every trainable tensor of opt->reg must be present). The config
// (lr, schedule, ...) is not stored: it comes from the recipe.
int checkpoint_load_optim(const char *path, Optim *opt, DlError *e);

// Human-readable summary for `distill inspect`: marker status, stage/step, version, recipe size, state
// keys, optimizer counters, and the tensors with shapes. Returns 0 or -1 with e.
int checkpoint_describe(const char *path, FILE *f, DlError *e);
// True if path looks like an HDF5 file (signature check), for inspect's format dispatch.
bool checkpoint_is_hdf5(const char *path);
