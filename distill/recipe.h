// recipe.h: the recipe schema (docs/RECIPES.md), its validation, --set overrides and the resolved-recipe
// writer. A recipe is a TOML file; recipe_load() reads it, applies the overrides, checks EVERYTHING
// (unknown keys with a hint, types, ranges, cross references, files, the model config, layer lists,
// trainable patterns) and lists all problems at once as `file:line:col: message` before any work starts.
//
// One table of field descriptors per TOML table (recipe.c) drives reading, range checks, --set typing,
// the "did you mean" hints, the writer of recipe.resolved.toml and `distill run --schema`.
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"
#include "distill/model.h"
#include "distill/toml.h"

typedef enum {
    STAGE_GENERATE = 0,  // the teacher writes responses to prompts (SeqKD pseudo-labels) -> a data set
    STAGE_TEACHER_CACHE, // the teacher's top-k logits over a data set, to HDF5 (offline KL)
    STAGE_INIT,          // build the hybrid: Mamba layers from each replaced layer's attention weights
    STAGE_LAYERWISE,     // stepwise progressive distillation (schedule of layouts), Mamba mixers only
    STAGE_DISTILL,       // end-to-end KL/CE distillation
    STAGE_SFT,           // supervised fine-tuning (CE, optional KL)
    STAGE_DPO,           // direct preference optimization, reference = frozen student at stage start
    STAGE_EXPORT,        // MambaInLlama HF export
    STAGE_EVAL,          // perplexity, KL to teacher, top-1 agreement
    STAGE_PAIRS,         // preference pairs from scored teacher samples (best vs worst response per prompt)
    STAGE_DRAFT,         // a few-layer cut of the teacher, fine-tuned as the speculative-decoding draft
    STAGE_KIND_COUNT
} StageKind;
// True for the kinds whose result is a model (init, layerwise, distill, sft, dpo).
bool stage_kind_makes_model(StageKind k);

enum { DEVICE_CPU = 0, DEVICE_CUDA };
enum { SCHED_COSINE = 0, SCHED_LINEAR, SCHED_CONSTANT };
enum { FMT_TEXT = 0, FMT_JSONL, FMT_CHAT, FMT_PREFERENCE };
enum { BAD_SKIP = 0, BAD_FAIL };
enum { TEACHER_ONLINE = 0, TEACHER_CACHE };
enum { KL_FROM_TEACHER = 0, KL_FROM_STUDENT };  // a draft stage's KL source
enum { INIT_ATTENTION = 0, INIT_RANDOM };
enum { EXPORT_HF = 0 };
enum { EXPORT_BF16 = 0, EXPORT_F16, EXPORT_F32 };
enum { RECOMPUTE_NONE = 0, RECOMPUTE_MLP, RECOMPUTE_FULL };
enum { MOMENTS_FP32 = 0, MOMENTS_BF16 };

const char *stage_kind_name(StageKind k);
// true for kinds that train (layerwise, distill, sft, dpo, draft)
bool stage_kind_trains(StageKind k);

typedef struct {
    char *name;             // run name; the run directory is output_dir/name
    char *output_dir;       // "checkpoints/runs"
    int64_t seed;           // every random stream derives from it
    int device;             // DEVICE_*
    int threads;            // CPU threads, 0 = all cores
    int keep_checkpoints;   // newest N complete checkpoints kept
    int64_t checkpoint_every;  // optimizer steps between checkpoints (0: only at stage ends)
    int64_t log_every;      // steps between progress/metrics lines
} RunSpec;

typedef struct {
    char *path;    // GGUF file, HF model directory, or config .json (random weights drawn with seed)
    char *config;  // optional HF config.json standing in for path when path is missing (dry-run only)
    int64_t seed;  // random-weight seed for a config-only teacher (default run.seed)
} TeacherSpec;

typedef struct {
    char *path;  // NULL: the teacher's own tokenizer (GGUF metadata or tokenizer.json of the HF dir)
} TokenizerSource;

typedef struct {
    int mixer;             // MIXER_MAMBA1 or MIXER_MAMBA2
    double attn_fraction;  // as written, or -1 when attn_layers was given
    int n_attn;            // resolved layers that keep attention, ascending
    int attn_layers[DL_MAX_LAYERS];
} HybridSpec;

typedef struct {
    double lr;             // peak learning rate
    double beta1, beta2;   // AdamW betas
    double eps;
    double weight_decay;
    int64_t warmup_steps;  // -1: use warmup_ratio
    double warmup_ratio;   // of the stage's total steps
    int schedule;          // SCHED_*
    double min_lr_ratio;   // final lr = lr * min_lr_ratio
    double clip;           // global gradient-norm clip (0 = off)
    int micro_batch;       // sequences per forward/backward per GPU
    int grad_accum;        // micro-batches per optimizer step
    int moments;           // MOMENTS_*: AdamW m, v in fp32, or bf16 with stochastic rounding (CUDA only)
    int spike_rollbacks;     // loss-spike recovery (optim.h): rollbacks to the last good checkpoint per loop
    double spike_lr_factor;  // ... each multiplying the learning rate by this
} OptimSpec;

typedef struct {
    int gpus;         // data-parallel ranks
    int zero;         // ZeRO stage 0..3 (1: optimizer state, 2: + grads, 3: + weights sharded)
    int recompute;    // RECOMPUTE_*: activation recomputation in backward
    char *teacher;    // "replicated" (NULL: not written, the default) or "sharded" (distill/teacher_shard.h)
    bool teacher_sharded;  // teacher == "sharded" (set by recipe_load's checks)
    bool overlap;          // data parallel on cuda: each bucket's reduction during the backward (train_model.h)
    bool stage_grads;      // ZeRO-2 on cuda: gradient memory only for the owned slices + staging slots (grad_stage.h)
    bool gemm_tune;        // cuda: one-time timing of cuBLASLt's offers per GEMM shape (kernels/train/gemm_lt.cu)
} HardwareSpec;

typedef struct {
    char *name;            // the NAME of [data.NAME]
    int line, col;         // its table header
    char **sources;        // files (jsonl/text); empty when a stage produces the set
    int n_sources;
    int format;            // FMT_*
    char *field;           // jsonl: the text field ("text")
    int seq_len;           // tokens per training sequence
    bool packing;          // pack several records per sequence
    bool assistant_only;   // chat/preference: loss on assistant tokens only
    int bad_records;       // BAD_SKIP or BAD_FAIL
    int64_t max_records;   // 0 = all
    double holdout;        // fraction of records held out for eval stages (deterministic by seed)
    bool shuffle;
    int produced_by;       // index of the stage that writes this set (generate), or -1
} DataSpec;

typedef struct {
    double ce;           // weight of cross-entropy on the labels
    double kl;           // weight of forward KL(teacher || student)
    double reverse_kl;   // weight of reverse KL(student || teacher)
    double temperature;  // softmax temperature of the KL terms
    double mse;          // weight of per-layer hidden-state MSE to the teacher (layerwise alignment)
} StageLoss;

typedef struct {
    int line, col;
    double attn_fraction;  // as written, or -1
    int n_attn;            // resolved attention layers of this step (a superset of the final layout)
    int attn_layers[DL_MAX_LAYERS];
    int64_t steps;         // this step's length (inherits the stage's steps/epochs when unset)
    double epochs;
} ScheduleStep;

typedef struct {
    StageKind kind;
    char *name;            // unique; default: the kind (or kind-N when a kind repeats)
    int index;             // position in the recipe (0-based)
    int line, col;         // its [[stage]] header
    // data
    char *data;            // data set used (training, generate prompts, teacher_cache); NULL if none
    int data_index;        // into Recipe.data, or -1
    char *output;          // generate: the data set it writes
    int output_index;
    char **eval_sets;      // eval: data sets (held-out parts)
    int n_eval_sets;
    int *eval_index;
    // length of training stages: steps > 0, or epochs > 0 (then steps = 0)
    int64_t steps;
    double epochs;
    StageLoss loss;
    char *trainable;       // comma-separated fnmatch patterns over tensor names (reg_set_trainable)
    OptimSpec opt;         // [optimizer] with this stage's [stage.optimizer] overrides
    int teacher_logits;    // TEACHER_ONLINE or TEACHER_CACHE (a teacher_cache stage on the same data ran)
    ScheduleStep *schedule;  // layerwise: the steps; always >= 1 after validation
    int n_schedule;
    double beta;           // dpo
    int max_prompt_len;    // dpo: prompt tokens kept (0: seq_len / 2)
    // generate
    int max_new_tokens;
    double sample_temperature;
    double top_p;
    int top_k;             // generate: 0 = off; teacher_cache: logits kept per position
    int batch_size;
    int64_t max_prompts;   // 0 = all
    int samples_per_prompt;  // generate: responses per prompt, each its own RNG stream (default 1)
    int kl_from;             // draft: KL_FROM_TEACHER, or KL_FROM_STUDENT (the newest earlier model: the speculative target)
    bool prompt_filter;      // generate with as_prompts: keep only clean prompts (prompt_filter.h); cut ones dropped
    bool reuse;              // generate, pairs, draft: reuse the work of an identical earlier stage (stage_reuse.h)
    bool as_prompts;         // generate: the responses become a prompt set (STAGE_DIR/OUTPUT.prompts.jsonl) for a later generate
    // init
    int init_method;       // INIT_*
    // export
    int export_format;
    char *export_dir;      // NULL: RUN_DIR/export
    int export_dtype;
    int64_t shard_mb;      // max safetensors shard size, 0 = one file
    // eval
    int64_t max_sequences; // 0 = all held-out sequences
    char **choice_sets;    // eval: multiple-choice JSONL files scored by log-likelihood (eval_choice.h)
    int n_choice_sets;
    // pairs (stage_pairs.c): score = teacher mean log-prob - penalties; pairs need best - worst >= min_margin
    double min_margin;
    double unfinished_penalty;  // subtracted when a response did not end with a stop token
    double repeat_penalty;      // times the fraction of repeated 4-grams in the response
    // draft (stage_draft.c): the teacher layers the draft keeps, in order (after validation: [0, n_layer-1]
    // when not given)
    int draft_layers[DL_MAX_LAYERS];
    int n_draft_layers;
    int64_t draft_vocab;   // draft: ids of its trimmed head's list (draft_vocab.h; 0: the full head, no list)
    // eval: speculative decoding (spec_eval.h) of the student (and the teacher) with a draft stage's model
    char *spec_draft;      // the draft stage's name (NULL: the last draft stage before this eval, if any)
    int spec_draft_index;  // after validation: that stage's index, or -1 (no speculative measurement)
    int spec_k[DL_MAX_LAYERS];  // draft lengths K measured (after validation: [2, 4] when not given)
    int n_spec_k;
    int spec_branches[DL_MAX_LAYERS];  // speculative branch counts W measured (GenParams.branches; default [1])
    int n_spec_branches;
    int spec_tokens;       // new tokens per prompt
    int spec_prompts;      // prompts measured (0: no speculative measurement)
    char *spec_data;       // data set whose documents' prompts are used (NULL: the first of data)
    int spec_data_index;
    bool spec_teacher;     // also the teacher as the target
} StageSpec;

typedef struct {
    char *path;            // the recipe file
    TomlValue *doc;        // the parsed tree (with --set applied); positions for late errors
    RunSpec run;
    TeacherSpec teacher;
    TokenizerSource tokenizer;
    HybridSpec hybrid;
    OptimSpec optimizer;
    HardwareSpec hardware;
    DataSpec *data;
    int n_data;
    StageSpec *stages;
    int n_stages;
    // the teacher's architecture (from path, or from config when path is missing)
    HybridConfig teacher_cfg;
    bool teacher_found;    // teacher.path exists
    char *model_source;    // what teacher_cfg was read from
    char **warnings;       // non-fatal notes (missing inputs in a dry run, ...)
    int n_warnings;
    char **set_labels;     // "--set k=v" texts that values of doc point at (their origin)
    int n_set_labels;
} Recipe;

typedef struct {
    bool dry_run;          // missing input files become warnings (the plan still needs the model config)
} RecipeOptions;

// All problems found, each "file:line:col: message", sorted by position.
typedef struct {
    char **msg;
    int n;
} RecipeErrors;

// Reads, overrides (sets[i] = "key=value") and validates a recipe. Returns 0, or -1 with errs listing every
// problem (a TOML syntax error is the only one reported alone).
int recipe_load(const char *path, const char *const *sets, int n_sets, const RecipeOptions *opt, Recipe *r,
                RecipeErrors *errs);
void recipe_free(Recipe *r);
void recipe_errors_free(RecipeErrors *errs);

// Writes the resolved recipe (every key, defaults and overrides applied, layers as lists) as TOML that
// recipe_load reads back to the same Recipe.
void recipe_write_resolved(const Recipe *r, FILE *f);
// Writes the schema reference (every table and key, type, default, range, help) as Markdown.
void recipe_write_schema(FILE *f);

// The hybrid layout a stage runs with (teacher layout before init; the schedule step for layerwise).
// step: schedule step for layerwise stages (ignored otherwise).
int recipe_stage_layout(const Recipe *r, const StageSpec *st, int step, HybridConfig *h, DlError *e);
// Attention layers kept by a fraction (0.5 -> 1,3,5,...; 0.25 -> 3,7,11,...; 0.75 -> all but 0,4,8,...).
// Returns the count, or -1 with e filled when the fraction is not 0, 1, 1/k or 1-1/k.
int recipe_layers_from_fraction(double f, int n_layer, int *out, DlError *e);
