// stage.h: the interface between the recipe runner (cmd_run.c) and the stage implementations. A stage
// kind (layerwise, dpo, ...) is one StageDef registered at program start with DL_STAGE, as commands are
// with DL_COMMAND; the runner validates the whole recipe, checks that every kind it uses is registered,
// calls each stage's optional check() for all stages, and only then runs the stages in order.
//
// Run directory layout (made by the runner):
//   RUN_DIR/recipe.resolved.toml      the recipe with defaults and --set applied (what actually ran)
//   RUN_DIR/NN-NAME/                  one directory per stage (NN = 01, 02, ...), the stage's own files
//   RUN_DIR/NN-NAME/DONE              written by the runner after the stage returned 0
// On --resume the runner skips stages whose DONE exists and calls the first unfinished stage with
// ctx->resume = true; the stage continues from its newest complete checkpoint in ctx->stage_dir.
#pragma once
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "distill/recipe.h"

typedef struct RunContext RunContext;
struct RunContext {
    const Recipe *recipe;   // validated; stages, data sets, optimizer, hardware, teacher_cfg
    const char *run_dir;    // RUN_DIR (exists)
    const char *stage_dir;  // RUN_DIR/NN-NAME of the stage being run (exists)
    int stage_index;        // index into recipe->stages of the stage being run
    uint64_t seed;          // recipe->run.seed
    int device;             // DEVICE_CPU or DEVICE_CUDA
    int threads;            // CPU threads in use (resolved; >= 1)
    bool quiet;             // --quiet: no progress lines (errors and warnings still print)
    bool resume;            // continue this stage from its newest complete checkpoint (--resume)
    // Set (to 1) by SIGINT/SIGTERM. A stage polls it (run_should_stop) at least once per optimizer step,
    // finishes or abandons the step, writes a checkpoint if it can do so consistently, and returns
    // DL_EXIT_INTERRUPTED. A second signal kills the process at once.
    volatile sig_atomic_t *stop;
    // Free slot for state shared between stages of one process (e.g. the student kept in memory from
    // init to layerwise); whoever sets it sets state_free, which the runner calls at the end.
    void *state;
    void (*state_free)(void *state);
};

// The directory of stage i of the run ("RUN_DIR/03-layerwise"), newly allocated. Stages use it to find
// the output of an earlier stage (e.g. the data set a generate stage wrote).
char *run_stage_dir(const RunContext *ctx, int stage_index);
// Returns true once a stop was requested.
bool run_should_stop(const RunContext *ctx);

typedef struct {
    StageKind kind;
    const char *summary;  // one line for the plan ("stepwise layerwise distillation")
    // Runs the stage; returns DL_EXIT_OK, DL_EXIT_INTERRUPTED, DL_EXIT_INPUT (bad data found while
    // reading) or DL_EXIT_RUNTIME. It prints its own progress unless ctx->quiet and writes only under
    // ctx->stage_dir (or the export dir), atomically.
    int (*run)(RunContext *ctx, const StageSpec *st);
    // Optional: checks that need the stage's own knowledge (data file contents, tokenizer, ...), called
    // for every stage before the run directory is made or any stage runs (ctx->run_dir may not exist
    // yet; ctx->stage_dir is NULL). Returns 0, or -1 with e naming file/line and what was
    // expected; the runner reports all failures together and exits DL_EXIT_INPUT.
    int (*check)(const RunContext *ctx, const StageSpec *st, DlError *e);
    // Optional: the stage's own estimate of its peak bytes per GPU (host on cpu) for schedule step `step`,
    // shown by --dry-run beside the generic formula of plan.c (e.g. once a CUDA stage knows its buffers).
    double (*estimate_bytes)(const Recipe *r, const StageSpec *st, int step);
} StageDef;

void dl_register_stage(const StageDef *def);
// The implementation of kind in this build, or NULL.
const StageDef *dl_find_stage(StageKind kind);
// Replaces the implementation of def->kind and returns the previous one
// (or NULL). For tests of the runner, which put recording stages in place of the real ones.
const StageDef *dl_override_stage(const StageDef *def);

// DL_STAGE(var, {.kind = STAGE_LAYERWISE, .summary = ..., .run = ...}) defines and registers a stage.
#define DL_STAGE(var, ...)                                                            \
    static const StageDef var = __VA_ARGS__;                                          \
    __attribute__((constructor)) static void var##_register(void) { dl_register_stage(&var); }
