// stage_common.h: what the pipeline stages share: loading the teacher and the tokenizer, finding and
// loading the student written by an earlier stage, saving a model checkpoint, turning a recipe data set
// into token shards (train / held-out split), and a BatchSource over the data loader.
//
// Models between stages: every model-producing stage (init, layerwise, distill, sft, dpo) leaves its
// result as the newest complete checkpoint in its stage directory; the checkpoint's blob "model.mixers"
// (one MixerKind byte per layer) plus the recipe's teacher config give the architecture back.
//
// Data sets (recipe [data.NAME]) become shards under RUN_DIR/data/:
//   NAME.all.h5       the sources tokenized (ingest_files; a source that is already a distill-tokens
//                     .h5 shard is used as it is)
//   NAME.train.h5, NAME.holdout.h5   documents split by a seeded draw per document (holdout fraction;
//                     max_records applied), packed into rows of seq_len+1 tokens
// A set written by a generate stage lives in that stage's directory as NAME.train.h5 / NAME.holdout.h5.
// Each file is written to a temporary name and renamed (shards.h), so an existing file is complete.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/dataloader.h"
#include "distill/dist.h"
#include "distill/model_io.h"
#include "distill/stage.h"
#include "distill/tokenizer.h"
#include "distill/train_loop.h"

typedef struct {
    HybridConfig hc;
    Registry reg;
    float *params;
} StageModel;

void stage_model_free(StageModel *m);
// The recipe's teacher (model_load; random weights from teacher.seed for a config-only teacher).
int stage_load_teacher(const RunContext *ctx, LoadedModel *t, DlError *e);
// The recipe's tokenizer (tokenizer.path, else the teacher's file).
int stage_load_tokenizer(const RunContext *ctx, Tokenizer **t, DlError *e);

// The newest complete checkpoint of the closest model-producing stage before stage `before`.
// Returns 1 (path in out), 0 if no earlier stage made a model, -1 on error.
int stage_find_model(const RunContext *ctx, int before, char *out, size_t n, DlError *e);
// Loads a model checkpoint (architecture from its "model.mixers" blob and the recipe's teacher config).
int stage_load_model(const RunContext *ctx, const char *path, StageModel *m, DlError *e);
// The student a stage starts from: the newest earlier model, or (none) the teacher as a model.
int stage_load_input_model(const RunContext *ctx, StageModel *m, char *from, size_t from_n, DlError *e);
// Writes a weights-only checkpoint of m into dir (step, mixers, recipe text, "model.final" = 1).
int stage_save_model(const RunContext *ctx, const char *dir, const StageModel *m, int64_t step, DlError *e);
// Copies every tensor of src that dst has with the same shape (names in the registry); returns the count.
int stage_copy_matching(const Registry *dst_reg, float *dst, const Registry *src_reg, const float *src);

typedef enum { SPLIT_TRAIN = 0, SPLIT_HOLDOUT = 1 } DataSplit;
// The shard of data set data_index for split (made on first use). *path is newly allocated.
// SPLIT_HOLDOUT of a set with holdout = 0 is an error naming the set.
int stage_data_shard(const RunContext *ctx, int data_index, DataSplit split, char **path, DlError *e);
// Writes docs of the LM shard `all` into train/holdout shards (see the header comment). keep_mask: use the
// shard's loss mask (assistant-only / response-only), else every token counts. Public for the generate stage.
int stage_split_shard(const char *all, const char *train_path, const char *holdout_path, double holdout, uint64_t seed,
                      int64_t seq_len, int64_t max_records, bool keep_mask, DlError *e);

// A BatchSource over a DataLoader (position saved as ints data.seed, data.epoch, data.consumed).
typedef struct {
    DataLoader *dl;
} LoaderSource;
int loader_source_open(LoaderSource *ls, const char *shard, int64_t B, int64_t T, uint64_t seed, bool shuffle,
                       DlError *e);
// The same for rank `rank` of `world` data-parallel ranks: its own rows of each global batch (dataloader.h).
int loader_source_open_rank(LoaderSource *ls, const char *shard, int64_t B, int64_t T, uint64_t seed, bool shuffle,
                            int rank, int world, DlError *e);
void loader_source_close(LoaderSource *ls);
BatchSource loader_source(LoaderSource *ls);

// Draws RUN_DIR's metrics.jsonl as PNG images (scripts/plot-metrics, found next to the build directory of
// this program or through DISTILL_PLOT). Best effort: a missing script or gnuplot is a note, not an error.
void stage_plot_metrics(const RunContext *ctx);

// The optimizer config of a stage (OptimSpec) for a loop of total_steps steps.
void stage_optim_config(const StageSpec *st, int64_t total_steps, OptimConfig *oc);
// Where the stage's models compute (TmDevice of train_model.h) from the recipe's run.device.
int stage_device(const RunContext *ctx);
// The device part of a training loop's configuration from the recipe: run.device, hardware.recompute and,
// with several ranks, the process group, ZeRO stage and NCCL communicator (stage_dist).
void stage_train_device(const RunContext *ctx, TrainConfig *c);  // (and the DISTILL_TEST_SPIKE hook)
// Steps of a training length given as steps, or as epochs (micro-batches per epoch / grad_accum).
int64_t stage_steps(int64_t steps, double epochs, int64_t batches_per_epoch, int grad_accum);

// The data-parallel process group of this process (cmd_run sets it once per run from the launcher's
// environment, dist.h). world 1 (g NULL): one process. Rank 0 owns the run directory, the metrics and the
// progress output; the training stages split each global batch over the ranks (train_loop.h); the other
// stages run on rank 0 while the rest wait.
typedef struct {
    DistGroup *g;
    int rank, world;
    int zero;  // ZeRO stage (hardware.zero, 0..2) of the training stages when world > 1
    struct NcclComm *nccl;  // device cuda, world > 1: the NCCL communicator (nccl_comm.h), else NULL
} StageDist;
void stage_set_dist(const StageDist *d);  // NULL: back to one process
const StageDist *stage_dist(void);
