// recipe.c: the recipe schema as field tables, the validator, --set overrides and the resolved writer.
// See recipe.h for the contract and docs/RECIPES.md for the user-facing reference.
#include "distill/recipe.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include "distill/model_io.h"
#include "distill/registry.h"

// ================================================================================================ names

static const char *const KIND_NAMES[] = {"generate", "teacher_cache", "init", "layerwise", "distill",
                                         "sft",      "dpo",           "export", "eval", "pairs", "draft", NULL};
const char *stage_kind_name(StageKind k) { return k < STAGE_KIND_COUNT ? KIND_NAMES[k] : "?"; }
bool stage_kind_trains(StageKind k) {
    return k == STAGE_LAYERWISE || k == STAGE_DISTILL || k == STAGE_SFT || k == STAGE_DPO || k == STAGE_DRAFT;
}

static const char *const DEVICE_CHOICES[] = {"cpu", "cuda", NULL};
static const char *const MIXER_CHOICES[] = {"mamba1", "mamba2", NULL};
static const char *const SCHED_CHOICES[] = {"cosine", "linear", "constant", NULL};
static const char *const FORMAT_CHOICES[] = {"text", "jsonl", "chat", "preference", NULL};
static const char *const BAD_CHOICES[] = {"skip", "fail", NULL};
static const char *const TLOGITS_CHOICES[] = {"online", "cache", NULL};
static const char *const INIT_CHOICES[] = {"attention", "random", NULL};
static const char *const EXPORT_CHOICES[] = {"hf", NULL};
static const char *const DTYPE_CHOICES[] = {"bf16", "f16", "f32", NULL};
static const char *const RECOMPUTE_CHOICES[] = {"none", "mlp", "full", NULL};
static const char *const MOMENTS_CHOICES[] = {"fp32", "bf16", NULL};
static const char *const KLFROM_CHOICES[] = {"teacher", "student", NULL};

// ================================================================================================ fields

typedef enum {
    F_BOOL,
    F_INT,       // int64_t
    F_I32,       // int
    F_FLOAT,     // double; integers accepted
    F_STR,       // char*
    F_PATH,      // char*, a file or directory (existence checked in the semantic pass)
    F_ENUM,      // int index into choices
    F_STRLIST,   // char** + int count; a single string is accepted as a list of one
    F_PATTERNS,  // char*: a string or a list of strings, stored comma-joined
    F_INTLIST,   // int[DL_MAX_LAYERS] + int count
    F_BETAS,     // two doubles in [0, 1)
    F_SPECIAL,   // read by the caller (sub-tables, kind)
} FType;

#define NOMIN (-INFINITY)
#define NOMAX (INFINITY)
#define KB(k) (1u << (k))
#define K_ALL 0u
#define K_TRAIN (KB(STAGE_LAYERWISE) | KB(STAGE_DISTILL) | KB(STAGE_SFT) | KB(STAGE_DPO) | KB(STAGE_DRAFT))
#define K_KD (KB(STAGE_LAYERWISE) | KB(STAGE_DISTILL) | KB(STAGE_SFT))
#define K_LOSS (K_KD | KB(STAGE_DRAFT))  // kinds with a [stage.loss] table (the draft: ce, kl, reverse_kl, temperature)

typedef struct {
    const char *key;
    FType type;
    size_t off, off_n;       // value offset; count offset for lists
    double min, max;
    bool min_excl;           // min is exclusive
    const char *const *choices;
    unsigned kinds;          // stage kinds the key applies to (K_ALL: any)
    const char *help;
} Field;

#define FLD(T, key, type, member, lo, hi, help) {key, type, offsetof(T, member), 0, lo, hi, false, NULL, K_ALL, help}

static const Field RUN_FIELDS[] = {
    FLD(RunSpec, "name", F_STR, name, 0, 0, "run name; the run directory is output_dir/name (default: the recipe file name)"),
    FLD(RunSpec, "output_dir", F_STR, output_dir, 0, 0, "root of run directories"),
    FLD(RunSpec, "seed", F_INT, seed, 0, 9.2e18, "seed of every random stream (init, data order, sampling)"),
    {"device", F_ENUM, offsetof(RunSpec, device), 0, 0, 0, false, DEVICE_CHOICES, K_ALL, "where to run"},
    FLD(RunSpec, "threads", F_I32, threads, 0, 4096, "CPU threads (0: all cores)"),
    FLD(RunSpec, "keep_checkpoints", F_I32, keep_checkpoints, 1, 1000, "newest complete checkpoints kept per run"),
    FLD(RunSpec, "checkpoint_every", F_INT, checkpoint_every, 0, 1e12, "optimizer steps between checkpoints (0: at stage ends only)"),
    FLD(RunSpec, "log_every", F_INT, log_every, 1, 1e12, "steps between progress lines and metrics.jsonl records"),
};

static const Field TEACHER_FIELDS[] = {
    FLD(TeacherSpec, "path", F_PATH, path, 0, 0, "GGUF file, HF model directory, or HF config .json (random weights from seed)"),
    FLD(TeacherSpec, "config", F_PATH, config, 0, 0, "HF config.json used for the plan when path does not exist yet (--dry-run)"),
    FLD(TeacherSpec, "seed", F_INT, seed, 0, 9.2e18, "random-weight seed of a config-only teacher (default: run.seed)"),
};

static const Field TOKENIZER_FIELDS[] = {
    FLD(TokenizerSource, "path", F_PATH, path, 0, 0, "tokenizer.json or GGUF to take the tokenizer from (default: the teacher's)"),
};

static const Field HYBRID_FIELDS[] = {
    {"mixer", F_ENUM, offsetof(HybridSpec, mixer), 0, 0, 0, false, MIXER_CHOICES, K_ALL, "Mamba variant of the replaced layers"},
    {"attn_layers", F_INTLIST, offsetof(HybridSpec, attn_layers), offsetof(HybridSpec, n_attn), 0, DL_MAX_LAYERS - 1, false, NULL,
     K_ALL, "layers that keep attention (0-based); the rest become Mamba"},
    FLD(HybridSpec, "attn_fraction", F_FLOAT, attn_fraction, 0, 1,
        "instead of attn_layers: 0.5 keeps 1,3,5,...; 0.25 keeps 3,7,11,...; 0.125 keeps 7,15,...; 0.75 all but 0,4,8,..."),
};

static const Field OPTIM_FIELDS[] = {
    {"lr", F_FLOAT, offsetof(OptimSpec, lr), 0, 0, 1, true, NULL, K_ALL, "peak learning rate"},
    {"betas", F_BETAS, offsetof(OptimSpec, beta1), 0, 0, 1, false, NULL, K_ALL, "AdamW (beta1, beta2)"},
    {"eps", F_FLOAT, offsetof(OptimSpec, eps), 0, 0, 1, true, NULL, K_ALL, "AdamW epsilon"},
    FLD(OptimSpec, "weight_decay", F_FLOAT, weight_decay, 0, 10, "decoupled weight decay (matrices only; not norms, biases, A_log, D)"),
    FLD(OptimSpec, "warmup_steps", F_INT, warmup_steps, 0, 1e12, "linear warmup steps (or warmup_ratio)"),
    FLD(OptimSpec, "warmup_ratio", F_FLOAT, warmup_ratio, 0, 1, "warmup as a fraction of the stage's steps (or warmup_steps)"),
    {"schedule", F_ENUM, offsetof(OptimSpec, schedule), 0, 0, 0, false, SCHED_CHOICES, K_ALL, "decay after warmup"},
    FLD(OptimSpec, "min_lr_ratio", F_FLOAT, min_lr_ratio, 0, 1, "final lr as a fraction of lr"),
    FLD(OptimSpec, "clip", F_FLOAT, clip, 0, 1e6, "global gradient-norm clip (0: off)"),
    FLD(OptimSpec, "micro_batch", F_I32, micro_batch, 1, 1 << 20, "sequences per forward/backward per GPU"),
    FLD(OptimSpec, "grad_accum", F_I32, grad_accum, 1, 1 << 20, "micro-batches per optimizer step"),
    {"moments", F_ENUM, offsetof(OptimSpec, moments), 0, 0, 0, false, MOMENTS_CHOICES, K_ALL,
     "AdamW m and v: fp32, or bf16 with stochastic rounding (half the memory; device = \"cuda\" only)"},
    FLD(OptimSpec, "spike_rollbacks", F_I32, spike_rollbacks, 0, 100,
        "after 25 skipped steps in a row: reload the last checkpoint before them, scale lr, go on with later batches (times per loop; 0: stop)"),
    {"spike_lr_factor", F_FLOAT, offsetof(OptimSpec, spike_lr_factor), 0, 0, 1, true, NULL, K_ALL,
     "learning-rate multiplier at each spike rollback"},
};

static const Field HARDWARE_FIELDS[] = {
    FLD(HardwareSpec, "gpus", F_I32, gpus, 1, 1024, "data-parallel GPUs (one process per GPU, NCCL)"),
    FLD(HardwareSpec, "zero", F_I32, zero, 0, 3, "ZeRO stage: 1 shards optimizer state, 2 also grads, 3 also weights"),
    {"recompute", F_ENUM, offsetof(HardwareSpec, recompute), 0, 0, 0, false, RECOMPUTE_CHOICES, K_ALL,
     "activation recomputation in backward"},
    FLD(HardwareSpec, "teacher", F_STR, teacher, 0, 0,
        "the frozen teacher on each GPU: \"replicated\" (the default: a whole copy) or \"sharded\" (1/gpus of each layer, gathered "
        "a layer ahead during its forward; cuda)"),
    FLD(HardwareSpec, "overlap", F_BOOL, overlap, 0, 0,
        "data parallel on cuda: reduce each gradient bucket while the backward computes the next layers (same numbers)"),
    FLD(HardwareSpec, "stage_grads", F_BOOL, stage_grads, 0, 0,
        "ZeRO-2 on cuda: gradient memory for this GPU's slices only, other pages mapped while the backward writes them "
        "(same numbers; implies overlap; not in teacher-forced layerwise stages)"),
    FLD(HardwareSpec, "gemm_tune", F_BOOL, gemm_tune, 0, 0,
        "cuda: time cuBLASLt's 8 offers at each GEMM shape's first call and keep the fastest if 5% faster (H100: steps "
        "1-2.4% faster); choices are cached in ~/.cache/distill/gemm-tune.txt (DISTILL_GEMM_TUNE_FILE) for later runs"),
};

static const Field DATA_FIELDS[] = {
    {"sources", F_STRLIST, offsetof(DataSpec, sources), offsetof(DataSpec, n_sources), 0, 0, false, NULL, K_ALL,
     "input files (omit when a generate stage writes this set)"},
    {"format", F_ENUM, offsetof(DataSpec, format), 0, 0, 0, false, FORMAT_CHOICES, K_ALL,
     "text: plain text; jsonl: {field: text}; chat: {messages:[{role,content}]}; preference: {prompt, chosen, rejected}"},
    FLD(DataSpec, "field", F_STR, field, 0, 0, "jsonl: the key holding the text"),
    FLD(DataSpec, "seq_len", F_I32, seq_len, 8, 1 << 20, "tokens per training sequence"),
    FLD(DataSpec, "packing", F_BOOL, packing, 0, 0, "pack several records into each sequence"),
    FLD(DataSpec, "assistant_only", F_BOOL, assistant_only, 0, 0, "chat: loss on assistant tokens only"),
    {"bad_records", F_ENUM, offsetof(DataSpec, bad_records), 0, 0, 0, false, BAD_CHOICES, K_ALL,
     "a malformed record: skip (counted and reported) or fail"},
    FLD(DataSpec, "max_records", F_INT, max_records, 0, 1e15, "records used (0: all)"),
    FLD(DataSpec, "holdout", F_FLOAT, holdout, 0, 0.5, "fraction held out for eval stages (chosen by seed)"),
    FLD(DataSpec, "shuffle", F_BOOL, shuffle, 0, 0, "shuffle record order each epoch (by seed)"),
};

static const Field LOSS_FIELDS[] = {
    FLD(StageLoss, "ce", F_FLOAT, ce, 0, 1e6, "weight of cross-entropy on the labels"),
    FLD(StageLoss, "kl", F_FLOAT, kl, 0, 1e6, "weight of forward KL(teacher‖student)"),
    FLD(StageLoss, "reverse_kl", F_FLOAT, reverse_kl, 0, 1e6, "weight of reverse KL(student‖teacher)"),
    {"temperature", F_FLOAT, offsetof(StageLoss, temperature), 0, 0, 100, true, NULL, K_ALL, "softmax temperature of the KL terms"},
    FLD(StageLoss, "mse", F_FLOAT, mse, 0, 1e6, "weight of per-layer hidden-state MSE to the teacher (alignment)"),
};

static const Field SCHED_STEP_FIELDS[] = {
    {"attn_layers", F_INTLIST, offsetof(ScheduleStep, attn_layers), offsetof(ScheduleStep, n_attn), 0, DL_MAX_LAYERS - 1, false,
     NULL, K_ALL, "layers still attention during this step (a superset of [hybrid])"},
    FLD(ScheduleStep, "attn_fraction", F_FLOAT, attn_fraction, 0, 1, "as [hybrid] attn_fraction"),
    FLD(ScheduleStep, "steps", F_INT, steps, 1, 1e12, "optimizer steps of this step (default: the stage's)"),
    {"epochs", F_FLOAT, offsetof(ScheduleStep, epochs), 0, 0, 1000, true, NULL, K_ALL, "epochs of this step (default: the stage's)"},
};

#define SFLD(key, type, member, lo, hi, kinds, help) {key, type, offsetof(StageSpec, member), 0, lo, hi, false, NULL, kinds, help}
static const Field STAGE_FIELDS[] = {
    {"kind", F_SPECIAL, 0, 0, 0, 0, false, KIND_NAMES, K_ALL, "what the stage does"},
    SFLD("name", F_STR, name, 0, 0, K_ALL, "unique name (run-dir subdirectory, --set stage.NAME.key)"),
    SFLD("data", F_STR, data, 0, 0, K_TRAIN | KB(STAGE_GENERATE) | KB(STAGE_TEACHER_CACHE),
         "data set used (generate: the prompts)"),
    {"data", F_STRLIST, offsetof(StageSpec, eval_sets), offsetof(StageSpec, n_eval_sets), 0, 0, false, NULL, KB(STAGE_EVAL),
     "data sets evaluated (their held-out part when holdout > 0)"},
    SFLD("output", F_STR, output, 0, 0, KB(STAGE_GENERATE), "data set the responses are written to"),
    SFLD("data", F_STR, data, 0, 0, KB(STAGE_PAIRS), "data set of responses to score (a generate stage's output)"),
    SFLD("output", F_STR, output, 0, 0, KB(STAGE_PAIRS), "preference data set the pairs are written to"),
    SFLD("steps", F_INT, steps, 1, 1e12, K_TRAIN, "optimizer steps (or epochs)"),
    {"epochs", F_FLOAT, offsetof(StageSpec, epochs), 0, 0, 1000, true, NULL, K_TRAIN, "passes over the data (or steps)"},
    {"loss", F_SPECIAL, 0, 0, 0, 0, false, NULL, K_LOSS, "[stage.loss] weights (ce, kl, reverse_kl, temperature, mse)"},
    SFLD("trainable", F_PATTERNS, trainable, 0, 0, K_TRAIN, "glob patterns of trained tensors (the rest stay frozen)"),
    {"optimizer", F_SPECIAL, 0, 0, 0, 0, false, NULL, K_TRAIN, "[stage.optimizer]: overrides of [optimizer]"},
    {"teacher_logits", F_ENUM, offsetof(StageSpec, teacher_logits), 0, 0, 0, false, TLOGITS_CHOICES, K_KD,
     "KL target: the teacher run alongside, or the cache of an earlier teacher_cache stage"},
    {"schedule", F_SPECIAL, 0, 0, 0, 0, false, NULL, KB(STAGE_LAYERWISE), "[[stage.schedule]] steps of layouts"},
    {"beta", F_FLOAT, offsetof(StageSpec, beta), 0, 0, 100, true, NULL, KB(STAGE_DPO), "DPO beta"},
    SFLD("max_prompt_len", F_I32, max_prompt_len, 0, 1 << 20, KB(STAGE_DPO), "prompt tokens kept (0: seq_len/2)"),
    SFLD("max_new_tokens", F_I32, max_new_tokens, 1, 1 << 20, KB(STAGE_GENERATE), "response length limit"),
    SFLD("temperature", F_FLOAT, sample_temperature, 0, 100, KB(STAGE_GENERATE), "sampling temperature (0: greedy)"),
    {"top_p", F_FLOAT, offsetof(StageSpec, top_p), 0, 0, 1, true, NULL, KB(STAGE_GENERATE), "nucleus sampling"},
    SFLD("top_k", F_I32, top_k, 0, 1 << 20, KB(STAGE_GENERATE), "sample among the k most likely tokens (0: off)"),
    SFLD("top_k", F_I32, top_k, 1, 1 << 20, KB(STAGE_TEACHER_CACHE), "logits kept per position (+ log-sum-exp of the rest)"),
    SFLD("batch_size", F_I32, batch_size, 1, 1 << 20, KB(STAGE_GENERATE) | KB(STAGE_TEACHER_CACHE) | KB(STAGE_EVAL) | KB(STAGE_PAIRS),
         "sequences per forward pass"),
    SFLD("max_prompts", F_INT, max_prompts, 0, 1e15, KB(STAGE_GENERATE), "prompts used (0: all)"),
    SFLD("samples_per_prompt", F_I32, samples_per_prompt, 1, 1 << 20, KB(STAGE_GENERATE),
         "responses sampled per prompt, each from its own RNG stream and each its own document"),
    {"method", F_ENUM, offsetof(StageSpec, init_method), 0, 0, 0, false, INIT_CHOICES, KB(STAGE_INIT),
     "attention: Mamba from W_Q/W_K/W_V/W_O (the paper); random: ablation"},
    {"format", F_ENUM, offsetof(StageSpec, export_format), 0, 0, 0, false, EXPORT_CHOICES, KB(STAGE_EXPORT),
     "hf: MambaInLlama HF layout (config.json, mamba_config.json, safetensors)"},
    SFLD("dir", F_STR, export_dir, 0, 0, KB(STAGE_EXPORT), "output directory (default: RUN_DIR/export)"),
    {"dtype", F_ENUM, offsetof(StageSpec, export_dtype), 0, 0, 0, false, DTYPE_CHOICES, KB(STAGE_EXPORT), "tensor dtype"},
    SFLD("shard_mb", F_INT, shard_mb, 0, 1e9, KB(STAGE_EXPORT), "max safetensors shard size in MB (0: one file)"),
    SFLD("max_sequences", F_INT, max_sequences, 0, 1e15, KB(STAGE_EVAL), "sequences evaluated per set (0: all)"),
    {"choice", F_STRLIST, offsetof(StageSpec, choice_sets), offsetof(StageSpec, n_choice_sets), 0, 0, false, NULL, KB(STAGE_EVAL),
     "multiple-choice JSONL files, options scored by log-likelihood (accuracy per model)"},
    SFLD("as_prompts", F_BOOL, as_prompts, 0, 0, KB(STAGE_GENERATE),
         "the responses become prompts (one user message each, deduplicated) that a later generate stage reads: teacher-written prompts"),
    SFLD("prompt_filter", F_BOOL, prompt_filter, 0, 0, KB(STAGE_GENERATE),
         "as_prompts: keep a response only as the clean prompt it holds (distill/prompt_filter.h; offers, refusals, "
         "fragments and responses cut at max_new_tokens dropped)"),
    SFLD("reuse", F_BOOL, reuse, 0, 0, KB(STAGE_GENERATE) | KB(STAGE_PAIRS) | KB(STAGE_DRAFT),
         "reuse the responses (generate), teacher scores (pairs) or trained draft (draft, unless kl_from = \"student\") of an "
         "identical earlier stage (OUTPUT_DIR/.KIND-cache)"),
    SFLD("min_margin", F_FLOAT, min_margin, 0, 1e6, KB(STAGE_PAIRS), "skip a prompt when best - worst score < this (nats/token)"),
    SFLD("unfinished_penalty", F_FLOAT, unfinished_penalty, 0, 1e6, KB(STAGE_PAIRS),
         "score penalty of a response without a stop token (cut at max length)"),
    SFLD("repeat_penalty", F_FLOAT, repeat_penalty, 0, 1e6, KB(STAGE_PAIRS), "score penalty per fraction of repeated 4-grams"),
    {"layers", F_INTLIST, offsetof(StageSpec, draft_layers), offsetof(StageSpec, n_draft_layers), 0, DL_MAX_LAYERS - 1, false, NULL,
     KB(STAGE_DRAFT), "teacher layers the draft keeps, ascending (default: the first and the last), plus embeddings, norm, head"},
    {"kl_from", F_ENUM, offsetof(StageSpec, kl_from), 0, 0, 0, false, KLFROM_CHOICES, KB(STAGE_DRAFT),
     "whose next-token distribution the draft's KL terms follow: the teacher, or the student the draft will serve (the "
     "newest earlier model; on the 25% demo no higher acceptance than toward the teacher)"},
    SFLD("vocab", F_INT, draft_vocab, 0, 1e9, KB(STAGE_DRAFT),
         "trimmed head: the draft's MODEL_DIR/draft_vocab.json keeps the ids its training rows teach most often, and "
         "eval / eval-spec compute only those head rows (0: the full head; output stays exact either way)"),
    SFLD("draft", F_STR, spec_draft, 0, 0, KB(STAGE_EVAL),
         "draft stage whose model the speculative rows use (default: the last draft stage before this eval, if any)"),
    {"spec_k", F_INTLIST, offsetof(StageSpec, spec_k), offsetof(StageSpec, n_spec_k), 0, DL_MAX_LAYERS - 1, false, NULL,
     KB(STAGE_EVAL), "speculative decoding: draft lengths K measured, each 1..8 (default [2, 4])"},
    {"spec_branches", F_INTLIST, offsetof(StageSpec, spec_branches), offsetof(StageSpec, n_spec_branches), 0, DL_MAX_LAYERS - 1,
     false, NULL, KB(STAGE_EVAL),
     "speculative decoding: branch counts W measured, each 1..8 (W draft chains from the draft's W most likely first "
     "tokens, verified in one feed; default [1])"},
    SFLD("spec_tokens", F_I32, spec_tokens, 1, 1 << 16, KB(STAGE_EVAL), "speculative decoding: new tokens per prompt (no early stop)"),
    SFLD("spec_prompts", F_I32, spec_prompts, 0, 1 << 20, KB(STAGE_EVAL),
         "speculative decoding: prompts measured at batch 1 (0: no speculative measurement)"),
    SFLD("spec_data", F_STR, spec_data, 0, 0, KB(STAGE_EVAL),
         "speculative decoding: data set whose held-out documents give the prompts (default: the first of data)"),
    SFLD("spec_teacher", F_BOOL, spec_teacher, 0, 0, KB(STAGE_EVAL), "speculative decoding: also with the teacher as the target"),
};

typedef struct {
    const char *name;  // TOML table
    const Field *f;
    int n;
} TableDef;

static const TableDef TOP_TABLES[] = {
    {"run", RUN_FIELDS, DL_ARRAY_LEN(RUN_FIELDS)},
    {"teacher", TEACHER_FIELDS, DL_ARRAY_LEN(TEACHER_FIELDS)},
    {"tokenizer", TOKENIZER_FIELDS, DL_ARRAY_LEN(TOKENIZER_FIELDS)},
    {"hybrid", HYBRID_FIELDS, DL_ARRAY_LEN(HYBRID_FIELDS)},
    {"optimizer", OPTIM_FIELDS, DL_ARRAY_LEN(OPTIM_FIELDS)},
    {"hardware", HARDWARE_FIELDS, DL_ARRAY_LEN(HARDWARE_FIELDS)},
};
static const char *const TOP_KEYS[] = {"run", "teacher", "tokenizer", "hybrid", "optimizer", "hardware", "data", "stage", NULL};

// ================================================================================================ errors

typedef struct {
    int line, col, from_set, seq;
    char *msg;
} Err;

typedef struct {
    const char *file;
    Err *e;
    int n, cap;
    Recipe *r;
    const RecipeOptions *opt;
} Ctx;

static void add_err(Ctx *c, int line, int col, const char *origin, const char *fmt, va_list ap) {
    char body[DL_ERR_LEN], full[DL_ERR_LEN + 300];
    vsnprintf(body, sizeof body, fmt, ap);
    if (origin) snprintf(full, sizeof full, "%s: %s", origin, body);
    else if (line > 0) snprintf(full, sizeof full, "%s:%d:%d: %s", c->file, line, col, body);
    else snprintf(full, sizeof full, "%s: %s", c->file, body);
    if (c->n == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 16;
        c->e = dl_realloc(c->e, (size_t)c->cap * sizeof(Err));
    }
    c->e[c->n] = (Err){line, col, origin != NULL, c->n, dl_strdup(full)};
    c->n++;
}

static void err_v(Ctx *c, const TomlValue *v, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void err_v(Ctx *c, const TomlValue *v, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    add_err(c, v ? v->line : 0, v ? v->col : 0, v ? v->origin : NULL, fmt, ap);
    va_end(ap);
}

static void err_kv(Ctx *c, const TomlKv *kv, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void err_kv(Ctx *c, const TomlKv *kv, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    add_err(c, kv->val->origin ? 0 : kv->line, kv->col, kv->val->origin, fmt, ap);
    va_end(ap);
}

static void warn(Recipe *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warn(Recipe *r, const char *fmt, ...) {
    char b[DL_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    r->warnings = dl_realloc(r->warnings, (size_t)(r->n_warnings + 1) * sizeof(char *));
    r->warnings[r->n_warnings++] = dl_strdup(b);
}

static int err_cmp(const void *a, const void *b) {
    const Err *x = a, *y = b;
    if (x->from_set != y->from_set) return x->from_set - y->from_set;
    if (x->line != y->line) return x->line - y->line;
    if (x->col != y->col) return x->col - y->col;
    return x->seq - y->seq;
}

// ================================================================================================ hints

static int edit_distance(const char *a, const char *b) {
    int n = (int)strlen(a), m = (int)strlen(b);
    if (n > 64 || m > 64) return 99;
    int d[65][65];
    for (int i = 0; i <= n; i++) d[i][0] = i;
    for (int j = 0; j <= m; j++) d[0][j] = j;
    for (int i = 1; i <= n; i++)
        for (int j = 1; j <= m; j++) {
            int sub = d[i - 1][j - 1] + (tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]));
            d[i][j] = DL_MIN(sub, DL_MIN(d[i - 1][j] + 1, d[i][j - 1] + 1));
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = DL_MIN(d[i][j], d[i - 2][j - 2] + 1);
        }
    return d[n][m];
}

// " (did you mean 'x'?)" or "" into buf.
static const char *hint(const char *key, const char *const *cands, int n, char *buf, size_t bn) {
    int best = 99;
    const char *bk = NULL;
    for (int i = 0; i < n; i++) {
        if (!cands[i]) continue;
        int d = edit_distance(key, cands[i]);
        if (d < best) {
            best = d;
            bk = cands[i];
        }
    }
    int limit = DL_MAX(1, (int)strlen(key) / 3);
    if (bk && best <= DL_MAX(limit, 2) && best < (int)strlen(key)) snprintf(buf, bn, " (did you mean '%s'?)", bk);
    else buf[0] = 0;
    return buf;
}

static const char *field_hint(const char *key, const Field *f, int nf, unsigned kind_bit, char *buf, size_t bn) {
    const char *c[64];
    int n = 0;
    for (int i = 0; i < nf && n < 64; i++)
        if (!f[i].kinds || !kind_bit || (f[i].kinds & kind_bit)) c[n++] = f[i].key;
    return hint(key, c, n, buf, bn);
}

static void join_choices(const char *const *ch, char *buf, size_t n) {
    size_t o = 0;
    buf[0] = 0;
    for (int i = 0; ch[i] && o < n; i++) o += (size_t)snprintf(buf + o, n - o, "%s%s", i ? ", " : "", ch[i]);
}

static int choice_count(const char *const *ch) {
    int n = 0;
    while (ch[n]) n++;
    return n;
}

// ================================================================================================ reading

static const Field *find_field(const Field *f, int nf, const char *key, unsigned kind_bit, const Field **other_kind) {
    if (other_kind) *other_kind = NULL;
    for (int i = 0; i < nf; i++) {
        if (strcmp(f[i].key, key)) continue;
        if (!f[i].kinds || !kind_bit || (f[i].kinds & kind_bit)) return &f[i];
        if (other_kind && !*other_kind) *other_kind = &f[i];
    }
    return NULL;
}

static const char *type_expect(const Field *f) {
    switch (f->type) {
    case F_BOOL: return "a boolean (true or false)";
    case F_INT:
    case F_I32: return "an integer";
    case F_FLOAT: return "a number";
    case F_STR:
    case F_PATH:
    case F_ENUM: return "a string";
    case F_STRLIST: return "a string or an array of strings";
    case F_PATTERNS: return "a string or an array of strings";
    case F_INTLIST: return "an array of integers";
    case F_BETAS: return "an array of two numbers, e.g. [0.9, 0.98]";
    case F_SPECIAL: return "a table";
    }
    return "?";
}

static bool range_ok(const Field *f, double x) {
    if (isnan(x)) return false;
    if (f->min_excl ? !(x > f->min) : !(x >= f->min)) return false;
    return x <= f->max;
}

static void range_msg(const Field *f, char *buf, size_t n) {
    // integers print in full (1048576, not 1.04858e+06)
    const char *fmt_lo = f->type == F_FLOAT ? "%g" : "%.0f";
    char lo[40], hi[40];
    snprintf(lo, sizeof lo, fmt_lo, f->min);
    snprintf(hi, sizeof hi, fmt_lo, f->max);
    if (f->max == NOMAX || f->max >= 1e12) snprintf(buf, n, "%s %s", f->min_excl ? ">" : ">=", lo);
    else snprintf(buf, n, "%s%s, %s]", f->min_excl ? "in (" : "in [", lo, hi);
}

// Reads one value of field f into obj. Returns 0 or -1 (error recorded).
static int read_field(Ctx *c, const Field *f, const TomlKv *kv, void *obj, const char *where) {
    const TomlValue *v = kv->val;
    char *p = (char *)obj + f->off;
    char rb[96];
#define TYPE_ERR()                                                                                                     \
    do {                                                                                                               \
        err_v(c, v, "%s.%s must be %s, not %s", where, kv->key, type_expect(f),                                       \
              v->type == TOML_TABLE ? "a table" : v->type == TOML_ARRAY ? "an array" : toml_type_name(v->type));       \
        return -1;                                                                                                     \
    } while (0)
    switch (f->type) {
    case F_BOOL:
        if (v->type != TOML_BOOL) TYPE_ERR();
        *(bool *)p = v->u.b;
        return 0;
    case F_INT:
    case F_I32:
        if (v->type != TOML_INT) {
            if (v->type == TOML_FLOAT && v->u.f == floor(v->u.f) && fabs(v->u.f) < 1e15) {
                err_v(c, v, "%s.%s must be an integer: write %.0f without a fraction or exponent", where, kv->key, v->u.f);
                return -1;
            }
            TYPE_ERR();
        }
        if (!range_ok(f, (double)v->u.i)) {
            range_msg(f, rb, sizeof rb);
            err_v(c, v, "%s.%s = %lld is out of range (expected %s)", where, kv->key, (long long)v->u.i, rb);
            return -1;
        }
        if (f->type == F_INT) *(int64_t *)p = v->u.i;
        else *(int *)p = (int)v->u.i;
        return 0;
    case F_FLOAT: {
        double x;
        if (v->type == TOML_FLOAT) x = v->u.f;
        else if (v->type == TOML_INT) x = (double)v->u.i;
        else TYPE_ERR();
        if (!range_ok(f, x)) {
            range_msg(f, rb, sizeof rb);
            err_v(c, v, "%s.%s = %g is out of range (expected %s)", where, kv->key, x, rb);
            return -1;
        }
        *(double *)p = x;
        return 0;
    }
    case F_STR:
    case F_PATH:
        if (v->type != TOML_STRING) TYPE_ERR();
        if (!v->u.s[0]) {
            err_v(c, v, "%s.%s must not be empty", where, kv->key);
            return -1;
        }
        free(*(char **)p);
        *(char **)p = dl_strdup(v->u.s);
        return 0;
    case F_ENUM: {
        if (v->type != TOML_STRING) TYPE_ERR();
        for (int i = 0; f->choices[i]; i++)
            if (!strcmp(v->u.s, f->choices[i])) {
                *(int *)p = i;
                return 0;
            }
        char ch[256], hb[96];
        join_choices(f->choices, ch, sizeof ch);
        err_v(c, v, "%s.%s = \"%s\" is not one of: %s%s", where, kv->key, v->u.s, ch,
              hint(v->u.s, f->choices, choice_count(f->choices), hb, sizeof hb));
        return -1;
    }
    case F_STRLIST:
    case F_PATTERNS: {
        int n = 0;
        const TomlValue *const *items = NULL;
        const TomlValue *one[1] = {v};
        if (v->type == TOML_STRING) {
            items = one;
            n = 1;
        } else if (v->type == TOML_ARRAY) {
            items = (const TomlValue *const *)v->u.arr.items;
            n = v->u.arr.n;
        } else TYPE_ERR();
        for (int i = 0; i < n; i++)
            if (items[i]->type != TOML_STRING || !items[i]->u.s[0]) {
                err_v(c, items[i], "%s.%s: element %d must be a non-empty string", where, kv->key, i + 1);
                return -1;
            }
        if (n == 0) {
            err_v(c, v, "%s.%s must not be empty", where, kv->key);
            return -1;
        }
        if (f->type == F_PATTERNS) {
            size_t len = 1;
            for (int i = 0; i < n; i++) len += strlen(items[i]->u.s) + 1;
            char *s = dl_malloc(len);
            s[0] = 0;
            for (int i = 0; i < n; i++) {
                if (strchr(items[i]->u.s, ',') && n > 1) {
                    err_v(c, items[i], "%s.%s: a pattern in a list cannot contain ','", where, kv->key);
                    free(s);
                    return -1;
                }
                if (i) strcat(s, ",");
                strcat(s, items[i]->u.s);
            }
            free(*(char **)p);
            *(char **)p = s;
            return 0;
        }
        char ***lp = (char ***)p;
        int *np = (int *)((char *)obj + f->off_n);
        for (int i = 0; i < *np; i++) free((*lp)[i]);
        free(*lp);
        *lp = dl_calloc((size_t)n, sizeof(char *));
        for (int i = 0; i < n; i++) (*lp)[i] = dl_strdup(items[i]->u.s);
        *np = n;
        return 0;
    }
    case F_INTLIST: {
        if (v->type != TOML_ARRAY) TYPE_ERR();
        int *out = (int *)p, *np = (int *)((char *)obj + f->off_n);
        if (v->u.arr.n > DL_MAX_LAYERS) {
            err_v(c, v, "%s.%s has %d entries (at most %d)", where, kv->key, v->u.arr.n, DL_MAX_LAYERS);
            return -1;
        }
        int bad = 0;
        for (int i = 0; i < v->u.arr.n; i++) {
            const TomlValue *it = v->u.arr.items[i];
            if (it->type != TOML_INT) {
                err_v(c, it, "%s.%s: element %d must be an integer layer index, not %s", where, kv->key, i + 1, toml_type_name(it->type));
                bad = 1;
            } else if (!range_ok(f, (double)it->u.i)) {
                err_v(c, it, "%s.%s: layer %lld is out of range (0..%d)", where, kv->key, (long long)it->u.i, DL_MAX_LAYERS - 1);
                bad = 1;
            } else out[i] = (int)it->u.i;
        }
        if (bad) return -1;
        *np = v->u.arr.n;
        return 0;
    }
    case F_BETAS: {
        if (v->type != TOML_ARRAY || v->u.arr.n != 2) TYPE_ERR();
        double *b = (double *)p;
        for (int i = 0; i < 2; i++) {
            const TomlValue *it = v->u.arr.items[i];
            double x = it->type == TOML_FLOAT ? it->u.f : it->type == TOML_INT ? (double)it->u.i : NAN;
            if (!(x >= 0 && x < 1)) {
                err_v(c, it, "%s.%s: beta%d must be a number in [0, 1)", where, kv->key, i + 1);
                return -1;
            }
            b[i] = x;
        }
        return 0;
    }
    case F_SPECIAL: return 0;
    }
#undef TYPE_ERR
    return 0;
}

// Reads every key of table t through fields. kind_bit selects stage-kind keys (0: not a stage).
static void read_table(Ctx *c, const TomlValue *t, const char *where, const Field *f, int nf, void *obj, unsigned kind_bit,
                       const char *kind_name) {
    for (int i = 0; i < t->u.tab.n; i++) {
        const TomlKv *kv = &t->u.tab.kv[i];
        const Field *other = NULL;
        const Field *fd = find_field(f, nf, kv->key, kind_bit, &other);
        if (!fd) {
            if (other) {
                char kinds[256];
                size_t o = 0;
                kinds[0] = 0;
                for (int k = 0; k < STAGE_KIND_COUNT; k++)
                    for (int j = 0; j < nf; j++)
                        if (!strcmp(f[j].key, kv->key) && (f[j].kinds & KB(k))) {
                            o += (size_t)snprintf(kinds + o, sizeof kinds - o, "%s%s", o ? ", " : "", KIND_NAMES[k]);
                            break;
                        }
                err_kv(c, kv, "key '%s' does not apply to a %s stage (it is for: %s)", kv->key, kind_name, kinds);
            } else {
                char hb[96];
                err_kv(c, kv, "unknown key '%s' in %s%s", kv->key, where, field_hint(kv->key, f, nf, kind_bit, hb, sizeof hb));
            }
            continue;
        }
        read_field(c, fd, kv, obj, where);
    }
}

static const TomlValue *sub_table(Ctx *c, const TomlValue *parent, const char *key, const char *where) {
    const TomlKv *kv = toml_get_kv(parent, key);
    if (!kv) return NULL;
    if (kv->val->type != TOML_TABLE) {
        err_v(c, kv->val, "%s must be a table ([%s] or %s = { ... }), not %s", where, where, key, toml_type_name(kv->val->type));
        return NULL;
    }
    return kv->val;
}

// ================================================================================================ defaults

static void optim_defaults(OptimSpec *o) {
    *o = (OptimSpec){.lr = 8e-5, .beta1 = 0.9, .beta2 = 0.98, .eps = 1e-8, .weight_decay = 0.0, .warmup_steps = 0,
                     .warmup_ratio = 0.0, .schedule = SCHED_COSINE, .min_lr_ratio = 0.0, .clip = 1.0, .micro_batch = 1,
                     .grad_accum = 1, .spike_rollbacks = 2, .spike_lr_factor = 0.5};
}

static void data_defaults(DataSpec *d) {
    memset(d, 0, sizeof *d);
    d->format = FMT_JSONL;
    d->field = dl_strdup("text");
    d->seq_len = 2048;
    d->packing = true;
    d->assistant_only = true;
    d->bad_records = BAD_SKIP;
    d->shuffle = true;
    d->produced_by = -1;
}

static void stage_defaults(StageSpec *s, StageKind kind, const OptimSpec *opt) {
    memset(s, 0, sizeof *s);
    s->kind = kind;
    s->data_index = s->output_index = -1;
    s->opt = *opt;
    s->loss = (StageLoss){.ce = 1, .kl = 0, .reverse_kl = 0, .temperature = 1, .mse = 0};
    if (kind == STAGE_LAYERWISE) s->loss.kl = 0.1;  // the paper's stage 1: alpha = 1 (CE), beta = 0.1 (KL)
    if (kind == STAGE_DISTILL) s->loss = (StageLoss){.ce = 0, .kl = 1, .temperature = 1};  // the later KL-only recipe
    s->trainable = dl_strdup(kind == STAGE_LAYERWISE ? "*.mamba.*" : "*");
    s->beta = 0.1;
    s->max_new_tokens = 256;
    s->sample_temperature = 0.7;
    s->top_p = 0.9;
    s->top_k = kind == STAGE_TEACHER_CACHE ? 64 : 0;
    s->batch_size = 8;
    s->samples_per_prompt = 1;
    s->reuse = true;
    s->prompt_filter = true;
    s->export_format = EXPORT_HF;
    s->export_dtype = EXPORT_BF16;
    s->shard_mb = 5000;
    s->min_margin = 0.05;
    s->unfinished_penalty = 1.0;
    s->repeat_penalty = 2.0;
    s->spec_draft_index = s->spec_data_index = -1;
    s->spec_k[0] = 2, s->spec_k[1] = 4, s->n_spec_k = 2;
    s->spec_branches[0] = 1, s->n_spec_branches = 1;
    s->spec_tokens = 64;
    s->spec_prompts = 8;
    s->spec_teacher = true;
}

static char *stem(const char *path) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    char *s = dl_strdup(b);
    char *dot = strrchr(s, '.');
    if (dot && dot != s) *dot = 0;
    return s;
}

static void recipe_defaults(Recipe *r, const char *path) {
    memset(r, 0, sizeof *r);
    r->path = dl_strdup(path);
    r->run = (RunSpec){.name = stem(path), .output_dir = dl_strdup("checkpoints/runs"), .seed = 1234, .device = DEVICE_CPU,
                       .threads = 0, .keep_checkpoints = 3, .checkpoint_every = 500, .log_every = 10};
    r->teacher.seed = -1;
    r->hybrid.mixer = 0;  // index into MIXER_CHOICES: mamba1
    r->hybrid.attn_fraction = 0.5;
    optim_defaults(&r->optimizer);
    r->hardware = (HardwareSpec){.gpus = 1, .zero = 1, .recompute = RECOMPUTE_NONE};
}

// ================================================================================================ layers

int recipe_layers_from_fraction(double f, int n_layer, int *out, DlError *e) {
    int n = 0;
    if (f == 0) return 0;
    if (f == 1) {
        for (int l = 0; l < n_layer; l++) out[n++] = l;
        return n;
    }
    // f = 1/k keeps every k-th layer counted from the end of each group: k-1, 2k-1, ... (the paper's 50%: odd layers)
    double k = 1.0 / f;
    if (fabs(k - round(k)) < 1e-9 && round(k) >= 2) {
        int kk = (int)round(k);
        for (int l = 0; l < n_layer; l++)
            if (l % kk == kk - 1) out[n++] = l;
        return n;
    }
    // f = 1 - 1/k replaces every k-th layer starting at 0 (the 25%-Mamba step: Mamba at 0, 4, 8, ...)
    k = 1.0 / (1.0 - f);
    if (fabs(k - round(k)) < 1e-9 && round(k) >= 2) {
        int kk = (int)round(k);
        for (int l = 0; l < n_layer; l++)
            if (l % kk != 0) out[n++] = l;
        return n;
    }
    return dl_fail(e, "attn_fraction = %g: use 0, 1, 1/k (0.5, 0.25, 0.125) or 1-1/k (0.75, 0.875), or list attn_layers", f);
}

static bool layer_in(const int *set, int n, int l) {
    for (int i = 0; i < n; i++)
        if (set[i] == l) return true;
    return false;
}

static int int_cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

// Resolves a layout written as attn_layers (list, positions in lv) or attn_fraction. Returns count or -1.
static int resolve_layout(Ctx *c, const char *where, const TomlValue *tab, int n_layer, double fraction, int *layers, int n) {
    const TomlValue *lv = toml_get(tab, "attn_layers"), *fv = toml_get(tab, "attn_fraction");
    if (lv && fv) {
        err_v(c, fv, "%s: give attn_layers or attn_fraction, not both", where);
        return -1;
    }
    if (lv) {
        int bad = 0;
        for (int i = 0; i < n; i++) {
            if (layers[i] >= n_layer) {
                err_v(c, lv->u.arr.items[i], "%s.attn_layers: layer %d does not exist (the teacher has %d layers, 0..%d)", where,
                      layers[i], n_layer, n_layer - 1);
                bad = 1;
            }
            for (int j = 0; j < i; j++)
                if (layers[j] == layers[i]) {
                    err_v(c, lv->u.arr.items[i], "%s.attn_layers: layer %d is listed twice", where, layers[i]);
                    bad = 1;
                }
        }
        if (bad) return -1;
        qsort(layers, (size_t)n, sizeof(int), int_cmp);
        return n;
    }
    DlError e;
    int k = recipe_layers_from_fraction(fraction, n_layer, layers, &e);
    if (k < 0) err_v(c, fv, "%s.%s", where, e.msg);
    return k;
}

// ================================================================================================ tables

static void read_stage(Ctx *c, const TomlValue *t, int idx, StageSpec *s) {
    Recipe *r = c->r;
    const TomlKv *kk = toml_get_kv(t, "kind");
    char where[160];
    StageKind kind = STAGE_KIND_COUNT;
    if (!kk) {
        err_v(c, t, "[[stage]] #%d has no kind (one of: generate, teacher_cache, init, layerwise, distill, sft, dpo, export, eval, "
                    "pairs, draft)",
              idx + 1);
    } else if (kk->val->type != TOML_STRING) {
        err_v(c, kk->val, "[[stage]] #%d: kind must be a string", idx + 1);
    } else {
        for (int k = 0; k < STAGE_KIND_COUNT; k++)
            if (!strcmp(kk->val->u.s, KIND_NAMES[k])) kind = (StageKind)k;
        if (kind == STAGE_KIND_COUNT) {
            char ch[256], hb[96];
            join_choices(KIND_NAMES, ch, sizeof ch);
            err_v(c, kk->val, "[[stage]] #%d: unknown kind \"%s\" (one of: %s)%s", idx + 1, kk->val->u.s, ch,
                  hint(kk->val->u.s, KIND_NAMES, STAGE_KIND_COUNT, hb, sizeof hb));
        }
    }
    stage_defaults(s, kind == STAGE_KIND_COUNT ? STAGE_INIT : kind, &r->optimizer);
    s->kind = kind;
    s->index = idx;
    s->line = t->line;
    s->col = t->col;
    if (kind == STAGE_KIND_COUNT) return;  // keys cannot be checked without a kind
    snprintf(where, sizeof where, "stage #%d (%s)", idx + 1, KIND_NAMES[kind]);
    read_table(c, t, where, STAGE_FIELDS, DL_ARRAY_LEN(STAGE_FIELDS), s, KB(kind), KIND_NAMES[kind]);

    char sub[200];
    snprintf(sub, sizeof sub, "%s loss", where);
    const TomlValue *lt = (KB(kind) & K_LOSS) ? sub_table(c, t, "loss", sub) : NULL;
    if (lt) read_table(c, lt, sub, LOSS_FIELDS, DL_ARRAY_LEN(LOSS_FIELDS), &s->loss, 0, NULL);
    snprintf(sub, sizeof sub, "%s optimizer", where);
    const TomlValue *ot = (KB(kind) & K_TRAIN) ? sub_table(c, t, "optimizer", sub) : NULL;
    if (ot) {
        read_table(c, ot, sub, OPTIM_FIELDS, DL_ARRAY_LEN(OPTIM_FIELDS), &s->opt, 0, NULL);
        const TomlValue *ws = toml_get(ot, "warmup_steps"), *wr = toml_get(ot, "warmup_ratio");
        if (ws && wr) err_v(c, wr, "%s: give warmup_steps or warmup_ratio, not both", sub);
        else if (wr) s->opt.warmup_steps = -1;
    }
    if (kind == STAGE_LAYERWISE) {
        const TomlKv *skv = toml_get_kv(t, "schedule");
        if (skv) {
            const TomlValue *sv = skv->val;
            if (sv->type != TOML_ARRAY || sv->u.arr.n == 0) {
                err_v(c, sv, "%s.schedule must be a non-empty array of tables ([[stage.schedule]])", where);
            } else {
                s->n_schedule = sv->u.arr.n;
                s->schedule = dl_calloc((size_t)s->n_schedule, sizeof(ScheduleStep));
                for (int i = 0; i < sv->u.arr.n; i++) {
                    const TomlValue *it = sv->u.arr.items[i];
                    ScheduleStep *ss = &s->schedule[i];
                    ss->attn_fraction = -1;
                    ss->line = it->line;
                    ss->col = it->col;
                    if (it->type != TOML_TABLE) {
                        err_v(c, it, "%s.schedule: step %d must be a table", where, i + 1);
                        continue;
                    }
                    char sw[200];
                    snprintf(sw, sizeof sw, "%s schedule step %d", where, i + 1);
                    read_table(c, it, sw, SCHED_STEP_FIELDS, DL_ARRAY_LEN(SCHED_STEP_FIELDS), ss, 0, NULL);
                    if (!toml_get(it, "attn_layers") && !toml_get(it, "attn_fraction"))
                        err_v(c, it, "%s: give attn_layers or attn_fraction", sw);
                    if (toml_get(it, "steps") && toml_get(it, "epochs"))
                        err_v(c, toml_get(it, "epochs"), "%s: give steps or epochs, not both", sw);
                }
            }
        }
    }
    // length of training stages
    if (stage_kind_trains(kind)) {
        const TomlValue *sv = toml_get(t, "steps"), *ev = toml_get(t, "epochs");
        if (sv && ev) err_v(c, ev, "%s: give steps or epochs, not both", where);
        else if (ev) s->steps = 0;
        bool per_step = s->n_schedule > 0;
        for (int i = 0; i < s->n_schedule; i++)
            if (!s->schedule[i].steps && !(s->schedule[i].epochs > 0)) per_step = false;
        if (!sv && !ev && !per_step)
            err_v(c, t, "%s needs a length: steps = N or epochs = X%s", where, kind == STAGE_LAYERWISE ? " (or one per schedule step)" : "");
    }
}

static void read_data(Ctx *c, const TomlValue *root) {
    const TomlKv *dkv = toml_get_kv(root, "data");
    if (!dkv) return;
    if (dkv->val->type != TOML_TABLE) {
        err_kv(c, dkv, "data must be tables [data.NAME], not %s", toml_type_name(dkv->val->type));
        return;
    }
    const TomlValue *dt = dkv->val;
    Recipe *r = c->r;
    r->data = dl_calloc((size_t)DL_MAX(1, dt->u.tab.n), sizeof(DataSpec));
    for (int i = 0; i < dt->u.tab.n; i++) {
        const TomlKv *kv = &dt->u.tab.kv[i];
        if (kv->val->type != TOML_TABLE) {
            err_kv(c, kv, "data.%s must be a table [data.%s] describing a data set", kv->key, kv->key);
            continue;
        }
        DataSpec *d = &r->data[r->n_data++];
        data_defaults(d);
        d->name = dl_strdup(kv->key);
        d->line = kv->val->line;
        d->col = kv->val->col;
        char where[160];
        snprintf(where, sizeof where, "[data.%s]", kv->key);
        read_table(c, kv->val, where, DATA_FIELDS, DL_ARRAY_LEN(DATA_FIELDS), d, 0, NULL);
    }
}

static bool name_ok(const char *s) {
    if (!s[0] || s[0] == '.') return false;
    for (const char *p = s; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '_' && *p != '-' && *p != '.') return false;
    return true;
}

static int find_data(const Recipe *r, const char *name) {
    for (int i = 0; i < r->n_data; i++)
        if (!strcmp(r->data[i].name, name)) return i;
    return -1;
}

static const char *data_hint(const Recipe *r, const char *name, char *buf, size_t n) {
    const char *c[64];
    int k = 0;
    for (int i = 0; i < r->n_data && k < 64; i++) c[k++] = r->data[i].name;
    return hint(name, c, k, buf, n);
}

// Position of key in a stage's table (for late, semantic errors).
static const TomlValue *stage_val(const Recipe *r, const StageSpec *s, const char *key) {
    const TomlValue *arr = toml_get(r->doc, "stage");
    if (!arr || arr->type != TOML_ARRAY || s->index >= arr->u.arr.n) return NULL;
    const TomlValue *t = arr->u.arr.items[s->index];
    const TomlValue *v = toml_get(t, key);
    return v ? v : t;
}

static void check_path(Ctx *c, const TomlValue *v, const char *what, const char *path) {
    if (dl_file_exists(path)) return;
    if (c->opt && c->opt->dry_run) {
        warn(c->r, "%s '%s' not found (the run would stop here)", what, path);
        return;
    }
    err_v(c, v, "%s '%s' not found", what, path);
}

// ================================================================================================ semantic checks

static void check_model(Ctx *c) {
    Recipe *r = c->r;
    const TomlValue *tt = toml_get(r->doc, "teacher");
    const TomlValue *pv = toml_get(tt, "path"), *cv = toml_get(tt, "config");
    if (!r->teacher.path) {
        err_v(c, tt, "[teacher] needs path = \"...\" (a GGUF file, an HF model directory, or a config .json)");
        return;
    }
    if (r->teacher.seed < 0) r->teacher.seed = r->run.seed;
    DlError e;
    r->teacher_found = dl_file_exists(r->teacher.path);
    if (r->teacher.config && !dl_file_exists(r->teacher.config)) {
        if (!r->teacher_found) {
            err_v(c, cv, "teacher.config '%s' not found (and teacher.path '%s' does not exist either)", r->teacher.config,
                  r->teacher.path);
            return;
        }
        warn(r, "teacher.config '%s' not found (unused: teacher.path exists)", r->teacher.config);
    }
    const char *src = NULL;
    if (r->teacher_found) src = r->teacher.path;
    else if (r->teacher.config) {
        src = r->teacher.config;
        if (c->opt && c->opt->dry_run)
            warn(r, "teacher: '%s' not found, plan uses the config in %s", r->teacher.path, r->teacher.config);
        else
            err_v(c, pv, "teacher.path '%s' not found (download the model there or point path at it; teacher.config is only "
                  "used by --dry-run)", r->teacher.path);
    } else {
        err_v(c, pv, "teacher.path '%s' not found%s", r->teacher.path,
              c->opt && c->opt->dry_run ? " (add config = \"recipes/configs/....json\" to plan without the weights)" : "");
        return;
    }
    if (model_read_config(src, &r->teacher_cfg, &e)) {
        err_v(c, src == r->teacher.path ? pv : cv, "cannot read the model config: %s", e.msg);
        return;
    }
    r->model_source = dl_strdup(src);
}

// A config-only teacher (random weights) has no tokenizer: text data then needs [tokenizer] path.
static void check_tokenizer(Ctx *c) {
    Recipe *r = c->r;
    if (!r->teacher.path) return;
    size_t pl = strlen(r->teacher.path);
    if (!r->tokenizer.path && pl > 5 && !strcmp(r->teacher.path + pl - 5, ".json")) {
        const char *text = NULL;
        for (int i = 0; i < r->n_data && !text; i++)
            for (int k = 0; k < r->data[i].n_sources && !text; k++) {
                size_t sl = strlen(r->data[i].sources[k]);
                if (!(sl > 3 && !strcmp(r->data[i].sources[k] + sl - 3, ".h5"))) text = r->data[i].sources[k];
            }
        for (int i = 0; i < r->n_stages && !text; i++)
            if (r->stages[i].kind == STAGE_GENERATE) text = "the generate stage's prompts";
        if (text)
            err_v(c, toml_get(toml_get(r->doc, "teacher"), "path"),
                  "teacher.path is a config .json (random weights, no tokenizer), but %s needs one: set [tokenizer] "
                  "path = \"tokenizer.json or a GGUF\" (already tokenized .h5 shards need none)", text);
    }
}

static bool subset(const int *a, int na, const int *b, int nb) {
    for (int i = 0; i < na; i++)
        if (!layer_in(b, nb, a[i])) return false;
    return true;
}

// A draft stage's layers: default the first and the last teacher layer; each exists, ascending, once.
// Element i of a list value, where an error about that element points (the value itself when it is not a list).
static const TomlValue *list_item(const TomlValue *v, int i) {
    return v && v->type == TOML_ARRAY && i < v->u.arr.n ? v->u.arr.items[i] : v;
}

static void check_draft_layers(Ctx *c, StageSpec *s, int L) {
    if (s->kind != STAGE_DRAFT) return;
    if (s->n_draft_layers == 0) {
        s->draft_layers[s->n_draft_layers++] = 0;
        if (L > 1) s->draft_layers[s->n_draft_layers++] = L - 1;
        return;
    }
    const TomlValue *lv = stage_val(c->r, s, "layers");
    for (int i = 0; i < s->n_draft_layers; i++) {
        const TomlValue *pos = list_item(lv, i);
        if (s->draft_layers[i] >= L)
            err_v(c, pos, "stage '%s'.layers: layer %d does not exist (the teacher has %d layers, 0..%d)", s->name, s->draft_layers[i],
                  L, L - 1);
        else if (i > 0 && s->draft_layers[i] <= s->draft_layers[i - 1])
            err_v(c, pos, "stage '%s'.layers must be ascending, each layer once (%d after %d)", s->name, s->draft_layers[i],
                  s->draft_layers[i - 1]);
    }
}

// A draft stage's trimmed head keeps at most the teacher's vocabulary.
static void check_draft_vocab(Ctx *c, StageSpec *s, int64_t V) {
    if (s->kind == STAGE_DRAFT && s->draft_vocab > V)
        err_v(c, stage_val(c->r, s, "vocab"), "stage '%s'.vocab = %lld: the teacher's vocabulary has %lld ids", s->name,
              (long long)s->draft_vocab, (long long)V);
}

bool stage_kind_makes_model(StageKind k) {
    return k == STAGE_INIT || k == STAGE_LAYERWISE || k == STAGE_DISTILL || k == STAGE_SFT || k == STAGE_DPO;
}

// kl_from = "student": KL terms to follow, and an earlier stage that makes the student.
static void check_draft_kl(Ctx *c, const StageSpec *s) {
    if (s->kind != STAGE_DRAFT || s->kl_from != KL_FROM_STUDENT) return;
    const TomlValue *v = stage_val(c->r, s, "kl_from");
    if (s->loss.kl == 0 && s->loss.reverse_kl == 0)
        err_v(c, v, "stage '%s': kl_from = \"student\" needs [stage.loss] kl or reverse_kl > 0 (the draft learns the "
                    "student's distribution through them)", s->name);
    bool made = false;
    for (int i = 0; i < s->index; i++) made |= stage_kind_makes_model(c->r->stages[i].kind);
    if (!made)
        err_v(c, v, "stage '%s': kl_from = \"student\" needs an earlier stage that makes the student (init, layerwise, "
                    "distill, sft or dpo)", s->name);
}

static void check_layouts(Ctx *c) {
    Recipe *r = c->r;
    int L = r->teacher_cfg.base.n_layer;
    const TomlValue *ht = toml_get(r->doc, "hybrid");
    if (!toml_get(ht, "attn_layers") || toml_get(ht, "attn_fraction")) {
        r->hybrid.n_attn = resolve_layout(c, "[hybrid]", ht, L, r->hybrid.attn_fraction, r->hybrid.attn_layers, 0);
    } else {
        r->hybrid.attn_fraction = -1;
        r->hybrid.n_attn = resolve_layout(c, "[hybrid]", ht, L, -1, r->hybrid.attn_layers, r->hybrid.n_attn);
    }
    if (r->hybrid.n_attn < 0) return;
    HybridConfig h;
    DlError e;
    MixerKind mk = r->hybrid.mixer == 1 ? MIXER_MAMBA2 : MIXER_MAMBA1;
    if (hybrid_config_init(&h, &r->teacher_cfg.base, mk, r->hybrid.attn_layers, r->hybrid.n_attn, &e)) {
        err_v(c, toml_get(ht, "mixer") ? toml_get(ht, "mixer") : ht, "[hybrid]: %s", e.msg);
        return;
    }
    for (int si = 0; si < r->n_stages; si++) check_draft_layers(c, &r->stages[si], L), check_draft_kl(c, &r->stages[si]),
                                              check_draft_vocab(c, &r->stages[si], r->teacher_cfg.base.vocab);
    for (int si = 0; si < r->n_stages; si++) {
        StageSpec *s = &r->stages[si];
        if (s->kind != STAGE_LAYERWISE) continue;
        if (s->n_schedule == 0) {  // one step: the final layout
            s->n_schedule = 1;
            s->schedule = dl_calloc(1, sizeof(ScheduleStep));
            s->schedule[0].attn_fraction = r->hybrid.attn_fraction;
            s->schedule[0].n_attn = r->hybrid.n_attn;
            memcpy(s->schedule[0].attn_layers, r->hybrid.attn_layers, sizeof r->hybrid.attn_layers);
            s->schedule[0].line = s->line;
            s->schedule[0].col = s->col;
        } else {
            const TomlValue *arr = toml_get(toml_get(r->doc, "stage")->u.arr.items[si], "schedule");
            for (int i = 0; i < s->n_schedule; i++) {
                ScheduleStep *ss = &s->schedule[i];
                const TomlValue *st = arr->u.arr.items[i];
                if (st->type != TOML_TABLE) return;
                char where[160];
                snprintf(where, sizeof where, "stage '%s' schedule step %d", s->name, i + 1);
                int n = resolve_layout(c, where, st, L, ss->attn_fraction, ss->attn_layers, ss->n_attn);
                if (n < 0) continue;
                ss->n_attn = n;
                const TomlValue *pos = toml_get(st, "attn_layers") ? toml_get(st, "attn_layers") : toml_get(st, "attn_fraction");
                if (!subset(r->hybrid.attn_layers, r->hybrid.n_attn, ss->attn_layers, ss->n_attn)) {
                    err_v(c, pos, "%s keeps fewer attention layers than [hybrid]: every layer that keeps attention in [hybrid] "
                          "must keep it in every step", where);
                } else if (i > 0 && !subset(ss->attn_layers, ss->n_attn, s->schedule[i - 1].attn_layers, s->schedule[i - 1].n_attn)) {
                    err_v(c, pos, "%s turns a Mamba layer of step %d back into attention: each step may only replace more layers",
                          where, i);
                }
            }
        }
        for (int i = 0; i < s->n_schedule; i++) {  // lengths default to the stage's
            if (!s->schedule[i].steps && !(s->schedule[i].epochs > 0)) {
                s->schedule[i].steps = s->steps;
                s->schedule[i].epochs = s->epochs;
            }
        }
    }
}

static void check_trainable(Ctx *c) {
    Recipe *r = c->r;
    for (int si = 0; si < r->n_stages; si++) {
        StageSpec *s = &r->stages[si];
        if (!stage_kind_trains(s->kind)) continue;
        int nsteps = s->kind == STAGE_LAYERWISE ? s->n_schedule : 1;
        for (int k = 0; k < nsteps; k++) {
            HybridConfig h;
            DlError e;
            if (recipe_stage_layout(r, s, k, &h, &e)) break;
            Registry reg;
            model_build_registry(&h, &reg);
            if (reg_set_trainable(&reg, s->trainable, &e) < 0) {
                if (nsteps > 1) err_v(c, stage_val(r, s, "trainable"), "stage '%s' schedule step %d: %s", s->name, k + 1, e.msg);
                else err_v(c, stage_val(r, s, "trainable"), "stage '%s': %s", s->name, e.msg);
                reg_free(&reg);
                break;
            }
            reg_free(&reg);
        }
    }
}

// An eval stage's speculative-decoding keys: the draft stage (named, or the last one before the eval), K values,
// the data set of the prompts (an LM set, not a preference set).
// An eval stage's speculative list `key` (draft lengths K, branch counts W): each value 1..8, at least one.
static void check_spec_list(Ctx *c, const StageSpec *s, const char *key, const int *v, int n, const char *sym,
                            const char *give) {
    const TomlValue *kv = stage_val(c->r, s, key);
    for (int k = 0; k < n; k++)
        if (v[k] < 1 || v[k] > 8) err_v(c, list_item(kv, k), "stage '%s'.%s: %s = %d is outside 1..8", s->name, key, sym, v[k]);
    if (n == 0) err_v(c, kv, "stage '%s'.%s is empty: give at least one %s", s->name, key, give);
}

static void check_spec(Ctx *c, StageSpec *s) {
    Recipe *r = c->r;
    char hb[96];
    s->spec_draft_index = -1;
    if (s->spec_draft) {
        const char *names[64];
        int nn = 0;
        for (int j = 0; j < r->n_stages; j++) {
            if (r->stages[j].name && nn < 64 && r->stages[j].kind == STAGE_DRAFT) names[nn++] = r->stages[j].name;
            if (r->stages[j].name && !strcmp(r->stages[j].name, s->spec_draft)) s->spec_draft_index = j;
        }
        const int j = s->spec_draft_index;
        if (j < 0)
            err_v(c, stage_val(r, s, "draft"), "stage '%s': no stage named '%s' (draft = the name of a draft stage)%s", s->name,
                  s->spec_draft, hint(s->spec_draft, names, nn, hb, sizeof hb));
        else if (r->stages[j].kind != STAGE_DRAFT)
            err_v(c, stage_val(r, s, "draft"), "stage '%s': draft = '%s' is not a draft stage (its kind is %s)", s->name, s->spec_draft,
                  KIND_NAMES[r->stages[j].kind]);
        else if (j > s->index)
            err_v(c, stage_val(r, s, "draft"), "stage '%s' uses the draft of stage '%s', which runs after it", s->name, s->spec_draft);
        if (j < 0 || r->stages[j].kind != STAGE_DRAFT || j > s->index) s->spec_draft_index = -1;
    } else {
        for (int j = 0; j < s->index; j++)
            if (r->stages[j].kind == STAGE_DRAFT) s->spec_draft_index = j;
    }
    check_spec_list(c, s, "spec_k", s->spec_k, s->n_spec_k, "K", "K (or spec_prompts = 0)");
    check_spec_list(c, s, "spec_branches", s->spec_branches, s->n_spec_branches, "W", "W (1: one chain)");
    s->spec_data_index = -1;
    if (s->spec_data) {
        int di = find_data(r, s->spec_data);
        if (di < 0)
            err_v(c, stage_val(r, s, "spec_data"), "stage '%s': no data set '%s' (define [data.%s])%s", s->name, s->spec_data,
                  s->spec_data, data_hint(r, s->spec_data, hb, sizeof hb));
        else if (r->data[di].format == FMT_PREFERENCE)
            err_v(c, stage_val(r, s, "spec_data"), "stage '%s': spec_data '%s' is a preference set; the prompts come from an LM or "
                  "chat set", s->name, s->spec_data);
        else if (r->data[di].produced_by >= s->index)
            err_v(c, stage_val(r, s, "spec_data"), "stage '%s' uses data '%s' before stage '%s' writes it", s->name, s->spec_data,
                  r->stages[r->data[di].produced_by].name);
        else s->spec_data_index = di;
    } else {
        for (int k = 0; k < s->n_eval_sets && s->spec_data_index < 0; k++) {
            int di = find_data(r, s->eval_sets[k]);
            if (di >= 0 && r->data[di].format != FMT_PREFERENCE) s->spec_data_index = di;
        }
        if (s->spec_draft_index >= 0 && s->spec_prompts > 0 && s->spec_data_index < 0 && s->n_eval_sets > 0)
            err_v(c, stage_val(r, s, "data"), "stage '%s': every data set is a preference set: name an LM or chat set for the "
                  "speculative prompts (spec_data = \"NAME\")", s->name);
    }
}

static void check_stages(Ctx *c) {
    Recipe *r = c->r;
    char hb[96];
    // names: defaults and uniqueness
    int count[STAGE_KIND_COUNT + 1] = {0}, seen[STAGE_KIND_COUNT + 1] = {0};
    for (int i = 0; i < r->n_stages; i++) count[r->stages[i].kind]++;
    for (int i = 0; i < r->n_stages; i++) {
        StageSpec *s = &r->stages[i];
        if (s->kind == STAGE_KIND_COUNT) continue;
        seen[s->kind]++;
        if (!s->name) {
            char b[64];
            if (count[s->kind] > 1) snprintf(b, sizeof b, "%s-%d", KIND_NAMES[s->kind], seen[s->kind]);
            else snprintf(b, sizeof b, "%s", KIND_NAMES[s->kind]);
            s->name = dl_strdup(b);
        } else if (!name_ok(s->name)) {
            err_v(c, stage_val(r, s, "name"), "stage name '%s' may only use letters, digits, '_', '-' and '.'", s->name);
        }
        for (int j = 0; j < i; j++)
            if (r->stages[j].name && !strcmp(r->stages[j].name, s->name))
                err_v(c, stage_val(r, s, "name"), "stage name '%s' is used twice (stages %d and %d)", s->name, j + 1, i + 1);
    }
    if (r->n_stages == 0) err_v(c, NULL, "the recipe has no [[stage]]: nothing to do");
    // data sets written by generate stages (first, so a use before the write is caught below)
    for (int i = 0; i < r->n_stages; i++) {
        StageSpec *s = &r->stages[i];
        if (s->kind == STAGE_GENERATE || s->kind == STAGE_PAIRS) {
            if (!s->output) err_v(c, stage_val(r, s, "kind"), "stage '%s' needs output = \"NAME\" (the [data.NAME] it writes)", s->name);
            else {
                int di = find_data(r, s->output);
                s->output_index = di;
                if (di < 0)
                    err_v(c, stage_val(r, s, "output"), "stage '%s': no data set '%s' to write (define [data.%s] without sources)%s",
                          s->name, s->output, s->output, data_hint(r, s->output, hb, sizeof hb));
                else if (r->data[di].produced_by >= 0)
                    err_v(c, stage_val(r, s, "output"), "data set '%s' is written by two stages ('%s' and '%s')", s->output,
                          r->stages[r->data[di].produced_by].name, s->name);
                else if (r->data[di].n_sources && !s->as_prompts)  // a prompt set: its sources, then what the stage writes
                    err_v(c, stage_val(r, s, "output"), "stage '%s' writes data set '%s', which already has sources: drop them",
                          s->name, s->output);
                else {
                    r->data[di].produced_by = i;
                    r->data[di].format = s->kind == STAGE_PAIRS ? FMT_PREFERENCE : FMT_CHAT;  // pairs / prompt + response
                }
                if (s->data && s->output && !strcmp(s->data, s->output))
                    err_v(c, stage_val(r, s, "output"), "stage '%s' reads and writes the same data set", s->name);
            }
        }
    }
    // data references and order
    int init_at = -1, n_init = 0;
    for (int i = 0; i < r->n_stages; i++) {
        StageSpec *s = &r->stages[i];
        if (s->kind == STAGE_KIND_COUNT) continue;
        if (s->kind == STAGE_INIT) {
            if (n_init++) err_v(c, stage_val(r, s, "kind"), "a recipe has one init stage (this is the second)");
            else init_at = i;
        }
        bool student = s->kind != STAGE_GENERATE && s->kind != STAGE_TEACHER_CACHE && s->kind != STAGE_INIT && s->kind != STAGE_PAIRS &&
                       s->kind != STAGE_DRAFT;
        if (student && init_at < 0)
            err_v(c, stage_val(r, s, "kind"), "stage '%s' (%s) works on the hybrid: put an init stage before it", s->name,
                  KIND_NAMES[s->kind]);
        bool needs_data = stage_kind_trains(s->kind) || s->kind == STAGE_GENERATE || s->kind == STAGE_TEACHER_CACHE ||
                          s->kind == STAGE_PAIRS;
        if (needs_data && !s->data) err_v(c, stage_val(r, s, "kind"), "stage '%s' needs data = \"NAME\" (a [data.NAME] table)", s->name);
        if (s->kind == STAGE_EVAL && s->n_eval_sets == 0)
            err_v(c, stage_val(r, s, "kind"), "stage '%s' needs data = [\"NAME\", ...] (the sets to evaluate)", s->name);
        const char *refs[64];
        int nref = 0;
        if (s->data && nref < 64) refs[nref++] = s->data;
        for (int k = 0; k < s->n_eval_sets && nref < 64; k++) refs[nref++] = s->eval_sets[k];
        if (s->n_eval_sets) s->eval_index = dl_calloc((size_t)s->n_eval_sets, sizeof(int));
        for (int k = 0; k < nref; k++) {
            int di = find_data(r, refs[k]);
            if (s->n_eval_sets) s->eval_index[k] = di;
            else s->data_index = di;
            const TomlValue *pos = stage_val(r, s, "data");
            if (pos && pos->type == TOML_ARRAY && k < pos->u.arr.n) pos = pos->u.arr.items[k];
            if (di < 0) {
                err_v(c, pos, "stage '%s': no data set '%s' (define [data.%s])%s", s->name, refs[k], refs[k],
                      data_hint(r, refs[k], hb, sizeof hb));
                continue;
            }
            DataSpec *d = &r->data[di];
            if (d->produced_by >= i)
                err_v(c, pos, "stage '%s' uses data '%s' before stage '%s' writes it", s->name, d->name, r->stages[d->produced_by].name);
            if (s->kind == STAGE_GENERATE && d->produced_by >= 0 && d->produced_by < i && !r->stages[d->produced_by].as_prompts)
                err_v(c, pos, "stage '%s' (generate) reads prompts, but '%s' holds prompt + response documents from stage '%s' "
                      "(as_prompts = true there makes its responses a prompt set)", s->name, d->name, r->stages[d->produced_by].name);
            if (d->produced_by >= 0 && d->produced_by < i && r->stages[d->produced_by].as_prompts && s->kind != STAGE_GENERATE)
                err_v(c, pos, "stage '%s' (%s) cannot use '%s': it is a prompt set (written by stage '%s' with as_prompts), "
                      "read only by generate stages", s->name, KIND_NAMES[s->kind], d->name, r->stages[d->produced_by].name);
            if (s->kind == STAGE_DPO && d->format != FMT_PREFERENCE)
                err_v(c, pos, "stage '%s' (dpo) needs a data set with format = \"preference\"; '%s' is %s", s->name, d->name,
                      FORMAT_CHOICES[d->format]);
            if (s->kind != STAGE_DPO && s->kind != STAGE_EVAL && d->format == FMT_PREFERENCE)
                err_v(c, pos, "stage '%s' (%s) cannot use the preference set '%s'", s->name, KIND_NAMES[s->kind], d->name);
        }
        if ((KB(s->kind) & K_KD) && s->teacher_logits == TEACHER_CACHE) {
            bool ok = false;
            for (int j = 0; j < i; j++)
                if (r->stages[j].kind == STAGE_TEACHER_CACHE && r->stages[j].data && s->data && !strcmp(r->stages[j].data, s->data))
                    ok = true;
            if (!ok)
                err_v(c, stage_val(r, s, "teacher_logits"), "stage '%s': teacher_logits = \"cache\" needs an earlier teacher_cache "
                      "stage on data '%s'", s->name, s->data ? s->data : "?");
        }
        if ((KB(s->kind) & K_LOSS) && s->loss.ce + s->loss.kl + s->loss.reverse_kl + s->loss.mse <= 0)
            err_v(c, stage_val(r, s, "loss"), "stage '%s': every loss weight is 0", s->name);
        if (s->kind == STAGE_DRAFT && s->loss.mse > 0)
            err_v(c, stage_val(r, s, "loss"), "stage '%s' (draft): loss.mse aligns Mamba layers; a draft has none (use ce and/or kl)",
                  s->name);
        if (s->kind == STAGE_EVAL) check_spec(c, s);
        if (s->kind == STAGE_LAYERWISE && s->loss.mse > 0 && s->teacher_logits == TEACHER_CACHE)
            err_v(c, stage_val(r, s, "teacher_logits"), "stage '%s': the hidden-state loss (mse) needs the teacher online", s->name);
    }
    for (int i = 0; i < r->n_stages; i++) {  // eval: multiple-choice files
        const StageSpec *s = &r->stages[i];
        const TomlValue *cv = stage_val(r, s, "choice");
        for (int k = 0; k < s->n_choice_sets; k++)
            check_path(c, cv && cv->type == TOML_ARRAY && k < cv->u.arr.n ? cv->u.arr.items[k] : cv, "choice file",
                       s->choice_sets[k]);
    }
    // data sets: sources or a producer
    for (int i = 0; i < r->n_data; i++) {
        DataSpec *d = &r->data[i];
        const TomlValue *dt = toml_get(toml_get(r->doc, "data"), d->name);
        if (!name_ok(d->name)) err_v(c, dt, "data set name '%s' may only use letters, digits, '_', '-' and '.'", d->name);
        if (d->produced_by < 0 && d->n_sources == 0)
            err_v(c, dt, "[data.%s] has no sources and no generate stage writes it (add sources = [\"file.jsonl\"])", d->name);
        const TomlValue *sv = toml_get(dt, "sources");
        for (int k = 0; k < d->n_sources; k++) {
            const TomlValue *pos = sv && sv->type == TOML_ARRAY && k < sv->u.arr.n ? sv->u.arr.items[k] : sv;
            char what[200];
            snprintf(what, sizeof what, "[data.%s] source", d->name);
            check_path(c, pos, what, d->sources[k]);
        }
    }
}

static void check_misc(Ctx *c) {
    Recipe *r = c->r;
    const TomlValue *run = toml_get(r->doc, "run"), *hw = toml_get(r->doc, "hardware");
    if (!name_ok(r->run.name)) err_v(c, toml_get(run, "name"), "run.name '%s' may only use letters, digits, '_', '-' and '.'", r->run.name);
    if (r->hardware.gpus > 1 && r->run.device != DEVICE_CUDA)
        err_v(c, toml_get(hw, "gpus"), "hardware.gpus = %d needs run.device = \"cuda\"", r->hardware.gpus);
#ifndef DISTILL_CUDA
    if (r->run.device == DEVICE_CUDA && !(c->opt && c->opt->dry_run))
        err_v(c, toml_get(run, "device"), "run.device = \"cuda\" but this build has no CUDA (rebuild where nvcc is installed, "
              "or use --dry-run to see the plan)");
#endif
    // the CUDA engine trains and evaluates Mamba-2 hybrids (kernels/engine/mamba2_cuda.h), but the CUDA decoder
    // (kernels/engine/decode_cuda.h) has attention and Mamba-1 layers only: an eval stage that measures speculative
    // decoding (spec_prompts > 0 and a draft stage before it, or draft = "NAME") on a Mamba-2 hybrid would fail
    // after the training stages have spent their GPU time, so say so before any stage runs
    if (r->run.device == DEVICE_CUDA && r->hybrid.mixer == 1)  // MIXER_CHOICES[1] = "mamba2"
        for (int i = 0; i < r->n_stages; i++) {
            const StageSpec *s = &r->stages[i];
            bool draft = s->spec_draft != NULL;
            for (int j = 0; j < i && !draft; j++) draft = r->stages[j].kind == STAGE_DRAFT;
            if (s->kind == STAGE_EVAL && s->spec_prompts > 0 && draft) {
                err_v(c, stage_val(r, s, "spec_prompts") ? stage_val(r, s, "spec_prompts") : toml_get(toml_get(r->doc, "hybrid"), "mixer"),
                      "stage '%s' measures speculative decoding of a hybrid.mixer = \"mamba2\" model on run.device = \"cuda\", "
                      "and the CUDA decoder has attention and Mamba-1 layers only: set spec_prompts = 0 in that stage (or "
                      "use device = \"cpu\" or mixer = \"mamba1\")", s->name ? s->name : KIND_NAMES[s->kind]);
                break;
            }
        }
    const TomlValue *ot = toml_get(r->doc, "optimizer");
    if (r->run.device != DEVICE_CUDA)  // the CPU optimizer keeps fp32 moments
        for (int i = 0; i < r->n_stages; i++)
            if (r->stages[i].opt.moments == MOMENTS_BF16 && stage_kind_trains(r->stages[i].kind)) {
                const TomlValue *so = stage_val(r, &r->stages[i], "optimizer");
                const TomlValue *pos = toml_get(so, "moments") ? toml_get(so, "moments") : toml_get(ot, "moments");
                err_v(c, pos, "optimizer.moments = \"bf16\" (stage '%s') needs run.device = \"cuda\": the CPU optimizer keeps "
                      "fp32 moments", r->stages[i].name ? r->stages[i].name : KIND_NAMES[r->stages[i].kind]);
                break;
            }
    // hardware.teacher (teacher_shard.h): kept out of the resolved recipe unless written, so that runs started
    // before the key existed resume unchanged
    if (r->hardware.teacher) {
        const TomlValue *tv = toml_get(hw, "teacher");
        if (!strcmp(r->hardware.teacher, "sharded")) r->hardware.teacher_sharded = true;
        else if (strcmp(r->hardware.teacher, "replicated"))
            err_v(c, tv, "hardware.teacher = \"%s\": expected \"replicated\" or \"sharded\"", r->hardware.teacher);
        if (r->hardware.teacher_sharded && r->run.device != DEVICE_CUDA)
            err_v(c, tv, "hardware.teacher = \"sharded\" needs run.device = \"cuda\" (it splits the teacher over the GPUs' "
                  "memory; on the CPU every process keeps its copy)");
    }
    if (r->hardware.stage_grads && (r->hardware.zero != 2 || r->run.device != DEVICE_CUDA))
        err_v(c, toml_get(hw, "stage_grads"), "hardware.stage_grads = true stages ZeRO-2's gradient memory on the GPU: it needs "
              "hardware.zero = 2 and run.device = \"cuda\" (got zero = %d, device \"%s\")", r->hardware.zero,
              r->run.device == DEVICE_CUDA ? "cuda" : "cpu");
    if (r->hardware.overlap && r->run.device != DEVICE_CUDA)
        err_v(c, toml_get(hw, "overlap"), "hardware.overlap = true overlaps the GPUs' NCCL reductions with the backward: "
              "it needs run.device = \"cuda\"");
    if (toml_get(ot, "warmup_steps") && toml_get(ot, "warmup_ratio"))
        err_v(c, toml_get(ot, "warmup_ratio"), "[optimizer]: give warmup_steps or warmup_ratio, not both");
    if (r->tokenizer.path) check_path(c, toml_get(toml_get(r->doc, "tokenizer"), "path"), "tokenizer.path", r->tokenizer.path);
}

int recipe_stage_layout(const Recipe *r, const StageSpec *st, int step, HybridConfig *h, DlError *e) {
    bool before_init = true;
    for (int i = 0; i < st->index && i < r->n_stages; i++)
        if (r->stages[i].kind == STAGE_INIT) before_init = false;
    if (st->kind == STAGE_INIT) before_init = false;
    if (before_init && (st->kind == STAGE_GENERATE || st->kind == STAGE_TEACHER_CACHE)) {
        hybrid_config_teacher(h, &r->teacher_cfg.base);
        return 0;
    }
    if (st->kind == STAGE_GENERATE || st->kind == STAGE_TEACHER_CACHE || st->kind == STAGE_PAIRS) {  // these run the teacher
        hybrid_config_teacher(h, &r->teacher_cfg.base);
        return 0;
    }
    if (st->kind == STAGE_DRAFT) {  // the teacher cut to the draft's layers (spec_draft_from_layers), attention throughout
        if (st->n_draft_layers < 1) return dl_fail(e, "stage '%s': the draft has no layers", st->name ? st->name : "draft");
        hybrid_config_teacher(h, &r->teacher_cfg.base);
        h->base.n_layer = st->n_draft_layers;
        return 0;
    }
    MixerKind mk = r->hybrid.mixer == 1 ? MIXER_MAMBA2 : MIXER_MAMBA1;
    if (st->kind == STAGE_LAYERWISE && st->n_schedule > 0) {
        if (step < 0 || step >= st->n_schedule) step = st->n_schedule - 1;
        return hybrid_config_init(h, &r->teacher_cfg.base, mk, st->schedule[step].attn_layers, st->schedule[step].n_attn, e);
    }
    return hybrid_config_init(h, &r->teacher_cfg.base, mk, r->hybrid.attn_layers, r->hybrid.n_attn, e);
}

// ================================================================================================ --set

typedef struct {
    const Field *f;
    int nf;
    unsigned kind_bit;
    const char *kind_name;
} Scope;

static void set_origin(TomlValue *v, const char *lab) {
    v->origin = lab;
    if (v->type == TOML_ARRAY)
        for (int i = 0; i < v->u.arr.n; i++) set_origin(v->u.arr.items[i], lab);
    if (v->type == TOML_TABLE)
        for (int i = 0; i < v->u.tab.n; i++) set_origin(v->u.tab.kv[i].val, lab);
}

// Finds or creates the table at the dotted path parts[0..n) for --set, and the field set that applies.
// Stage i's name as validation will give it: explicit, else the kind (kind-N when the kind repeats).
static void stage_eff_name(TomlValue *arr, int i, char *out, size_t n) {
    TomlValue *st = arr->u.arr.items[i];
    TomlValue *nm = toml_get(st, "name"), *kd = toml_get(st, "kind");
    if (nm && nm->type == TOML_STRING) {
        snprintf(out, n, "%s", nm->u.s);
        return;
    }
    out[0] = 0;
    if (!kd || kd->type != TOML_STRING) return;
    int same = 0, nth = 0;
    for (int j = 0; j < arr->u.arr.n; j++) {
        TomlValue *kj = toml_get(arr->u.arr.items[j], "kind");
        if (kj && kj->type == TOML_STRING && !strcmp(kj->u.s, kd->u.s)) {
            same++;
            if (j <= i) nth++;
        }
    }
    if (same > 1) snprintf(out, n, "%s-%d", kd->u.s, nth);
    else snprintf(out, n, "%s", kd->u.s);
}

static int apply_set(Ctx *c, TomlValue *root, const char *setarg) {
    const char *eq = strchr(setarg, '=');
    char label[600];
    snprintf(label, sizeof label, "--set %s", setarg);
    if (!eq || eq == setarg) {
        TomlValue tmp = {.origin = label};
        err_v(c, &tmp, "expected key=value (e.g. --set optimizer.lr=1e-4)");
        return -1;
    }
    char key[256];
    size_t kl = (size_t)(eq - setarg);
    if (kl >= sizeof key) kl = sizeof key - 1;
    memcpy(key, setarg, kl);
    key[kl] = 0;
    const char *val = eq + 1;
    char *parts[16];
    int np = 0;
    char *save = NULL;
    for (char *p = strtok_r(key, ".", &save); p && np < 16; p = strtok_r(NULL, ".", &save)) parts[np++] = p;
#define SET_ERR(...)                                                                                                   \
    do {                                                                                                               \
        char m_[DL_ERR_LEN];                                                                                           \
        snprintf(m_, sizeof m_, __VA_ARGS__);                                                                          \
        TomlValue tmp_ = {.origin = label};                                                                            \
        err_v(c, &tmp_, "%s", m_);                                                                                     \
        return -1;                                                                                                     \
    } while (0)
    if (np < 2) SET_ERR("the key must name a table and a key, e.g. optimizer.lr or stage.NAME.steps");
    TomlValue *t = NULL;
    Scope sc = {0};
    int rest = 0;
    char hb[96];
    if (!strcmp(parts[0], "stage")) {
        TomlValue *arr = toml_get(root, "stage");
        if (!arr || arr->type != TOML_ARRAY) SET_ERR("the recipe has no [[stage]]");
        if (np < 3) SET_ERR("name the stage and the key: stage.NAME.key (NAME: a stage name or a kind used once)");
        int found = -1, nkind = 0;
        char names[256] = "";  // the names of the stages of that kind, for the error below
        for (int i = 0; i < arr->u.arr.n; i++) {
            char eff[64];
            stage_eff_name(arr, i, eff, sizeof eff);
            if (!strcmp(eff, parts[1])) {
                found = i;
                nkind = 1;
                break;
            }
        }
        if (found < 0)
            for (int i = 0; i < arr->u.arr.n; i++) {
                TomlValue *kd = toml_get(arr->u.arr.items[i], "kind");
                if (kd && kd->type == TOML_STRING && !strcmp(kd->u.s, parts[1])) {
                    if (!nkind) found = i;
                    nkind++;
                    char eff[64];
                    stage_eff_name(arr, i, eff, sizeof eff);
                    const size_t n = strlen(names);
                    snprintf(names + n, sizeof names - n, "%sstage.%s", n ? ", " : "", eff);
                }
            }
        if (found < 0) SET_ERR("no stage named '%s' (and no stage of that kind)", parts[1]);
        if (nkind > 1) SET_ERR("%d stages have kind '%s': name one of them (%s)", nkind, parts[1], names);
        t = arr->u.arr.items[found];
        if (t->type != TOML_TABLE) SET_ERR("stage '%s' is not a table", parts[1]);
        TomlValue *kd = toml_get(t, "kind");
        unsigned kb = 0;
        const char *kn = "?";
        for (int k = 0; kd && kd->type == TOML_STRING && k < STAGE_KIND_COUNT; k++)
            if (!strcmp(kd->u.s, KIND_NAMES[k])) {
                kb = KB(k);
                kn = KIND_NAMES[k];
            }
        sc = (Scope){STAGE_FIELDS, DL_ARRAY_LEN(STAGE_FIELDS), kb, kn};
        rest = 2;
        if (np == 4 && (!strcmp(parts[2], "loss") || !strcmp(parts[2], "optimizer"))) {
            bool loss = !strcmp(parts[2], "loss");
            TomlValue *sub = toml_get(t, parts[2]);
            if (!sub) {
                sub = toml_new(TOML_TABLE);
                sub->flags = TOML_T_HEADER;
                toml_table_set(t, parts[2], sub);
            }
            if (sub->type != TOML_TABLE) SET_ERR("stage '%s' %s is not a table", parts[1], parts[2]);
            t = sub;
            sc = loss ? (Scope){LOSS_FIELDS, DL_ARRAY_LEN(LOSS_FIELDS), 0, NULL} : (Scope){OPTIM_FIELDS, DL_ARRAY_LEN(OPTIM_FIELDS), 0, NULL};
            rest = 3;
        }
    } else if (!strcmp(parts[0], "data")) {
        if (np < 3) SET_ERR("name the data set and the key: data.NAME.key");
        TomlValue *dt = toml_get(root, "data");
        TomlValue *d = toml_get(dt, parts[1]);
        if (!d || d->type != TOML_TABLE) SET_ERR("no data set [data.%s] in the recipe", parts[1]);
        t = d;
        sc = (Scope){DATA_FIELDS, DL_ARRAY_LEN(DATA_FIELDS), 0, NULL};
        rest = 2;
    } else {
        int ti = -1;
        for (int i = 0; i < (int)DL_ARRAY_LEN(TOP_TABLES); i++)
            if (!strcmp(TOP_TABLES[i].name, parts[0])) ti = i;
        if (ti < 0) SET_ERR("unknown table '%s'%s", parts[0], hint(parts[0], TOP_KEYS, 8, hb, sizeof hb));
        t = toml_get(root, parts[0]);
        if (!t) {
            t = toml_new(TOML_TABLE);
            t->flags = TOML_T_HEADER;
            toml_table_set(root, parts[0], t);
        }
        if (t->type != TOML_TABLE) SET_ERR("'%s' is not a table in the recipe", parts[0]);
        sc = (Scope){TOP_TABLES[ti].f, TOP_TABLES[ti].n, 0, NULL};
        rest = 1;
    }
    if (np != rest + 1) SET_ERR("'%s' has no sub-keys", parts[rest]);
    const char *k = parts[rest];
    const Field *other = NULL;
    const Field *fd = find_field(sc.f, sc.nf, k, sc.kind_bit, &other);
    if (!fd) {
        if (other) SET_ERR("key '%s' does not apply to a %s stage", k, sc.kind_name);
        SET_ERR("unknown key '%s'%s", k, field_hint(k, sc.f, sc.nf, sc.kind_bit, hb, sizeof hb));
    }
    if (fd->type == F_SPECIAL && !strcmp(k, "kind")) SET_ERR("the kind of a stage cannot be changed with --set");
    // sub-tables (loss, optimizer) and the schedule may be given whole, as TOML: schedule=[{attn_fraction=0.5, steps=10}]
    // typed by the schema: strings may be written bare (--set run.device=cuda)
    TomlValue *v = NULL;
    bool stringish = fd->type == F_STR || fd->type == F_PATH || fd->type == F_ENUM ||
                     ((fd->type == F_STRLIST || fd->type == F_PATTERNS) && val[0] != '[');
    if (stringish && val[0] != '"' && val[0] != '\'') v = toml_new_string(val);
    else {
        DlError e;
        v = toml_parse_value(val, &e);
        if (!v) {
            const char *m = strncmp(e.msg, "value:", 6) ? e.msg : strchr(e.msg + 6, ':') ? strchr(strchr(e.msg + 6, ':') + 1, ':') + 1 : e.msg;
            while (*m == ' ') m++;
            SET_ERR("cannot read the value (%s expected): %s", type_expect(fd), m);
        }
    }
    // the value remembers it came from --set, so errors name the --set instead of a file position;
    // the label is owned by the recipe because the tree points at it
    Recipe *r = c->r;
    r->set_labels = dl_realloc(r->set_labels, (size_t)(r->n_set_labels + 1) * sizeof(char *));
    char *lab = r->set_labels[r->n_set_labels++] = dl_strdup(label);
    v->origin = lab;
    TomlKv *kv = toml_table_set(t, k, v);
    kv->line = 0;
    kv->col = 0;
    // nested values too, so errors inside a list or table also name the --set
    set_origin(v, lab);
    // a --set of one of two exclusive keys replaces the other (warmup_steps/warmup_ratio, attn_layers/attn_fraction)
    static const char *const excl[][2] = {{"warmup_steps", "warmup_ratio"}, {"attn_layers", "attn_fraction"}, {"steps", "epochs"}};
    for (size_t i = 0; i < DL_ARRAY_LEN(excl); i++)
        for (int j = 0; j < 2; j++)
            if (!strcmp(k, excl[i][j])) {
                for (int q = 0; q < t->u.tab.n; q++)
                    if (!strcmp(t->u.tab.kv[q].key, excl[i][1 - j])) {
                        toml_free(t->u.tab.kv[q].val);
                        free(t->u.tab.kv[q].key);
                        memmove(&t->u.tab.kv[q], &t->u.tab.kv[q + 1], (size_t)(t->u.tab.n - q - 1) * sizeof(TomlKv));
                        t->u.tab.n--;
                        break;
                    }
            }
#undef SET_ERR
    return 0;
}

// ================================================================================================ load

// ================================================================================================ load

static void read_top(Ctx *c) {
    Recipe *r = c->r;
    TomlValue *root = r->doc;
    char hb[96];
    for (int i = 0; i < root->u.tab.n; i++) {
        const TomlKv *kv = &root->u.tab.kv[i];
        bool known = false;
        for (int k = 0; TOP_KEYS[k]; k++) known |= !strcmp(kv->key, TOP_KEYS[k]);
        if (!known) err_kv(c, kv, "unknown table or key '%s'%s", kv->key, hint(kv->key, TOP_KEYS, 8, hb, sizeof hb));
    }
    void *objs[] = {&r->run, &r->teacher, &r->tokenizer, &r->hybrid, &r->optimizer, &r->hardware};
    for (int i = 0; i < (int)DL_ARRAY_LEN(TOP_TABLES); i++) {
        char where[64];
        snprintf(where, sizeof where, "[%s]", TOP_TABLES[i].name);
        const TomlValue *t = sub_table(c, root, TOP_TABLES[i].name, TOP_TABLES[i].name);
        if (t) read_table(c, t, where, TOP_TABLES[i].f, TOP_TABLES[i].n, objs[i], 0, NULL);
    }
    const TomlValue *ot = toml_get(root, "optimizer");
    if (toml_get(ot, "warmup_ratio") && !toml_get(ot, "warmup_steps")) r->optimizer.warmup_steps = -1;
    if (!toml_get(root, "teacher")) err_v(c, NULL, "missing [teacher] (path = a GGUF file, an HF model directory or a config .json)");
}

static void read_stages(Ctx *c) {
    Recipe *r = c->r;
    const TomlKv *skv = toml_get_kv(r->doc, "stage");
    if (!skv) return;
    const TomlValue *sv = skv->val;
    if (sv->type != TOML_ARRAY) {
        err_kv(c, skv, "stages are an array of tables: write [[stage]] (two brackets) for each stage");
        return;
    }
    // stage i of the recipe is element i of the array (positions of late errors are looked up by index)
    bool tables = true;
    for (int i = 0; i < sv->u.arr.n; i++)
        if (sv->u.arr.items[i]->type != TOML_TABLE) {
            err_v(c, sv->u.arr.items[i], "stage #%d must be a table ([[stage]])", i + 1);
            tables = false;
        }
    if (!tables) return;
    r->stages = dl_calloc((size_t)DL_MAX(1, sv->u.arr.n), sizeof(StageSpec));
    for (int i = 0; i < sv->u.arr.n; i++) {
        read_stage(c, sv->u.arr.items[i], r->n_stages, &r->stages[r->n_stages]);
        r->n_stages++;
    }
}

int recipe_load(const char *path, const char *const *sets, int n_sets, const RecipeOptions *opt, Recipe *r,
                RecipeErrors *errs) {
    memset(errs, 0, sizeof *errs);
    recipe_defaults(r, path);
    Ctx c = {.file = path, .r = r, .opt = opt};
    DlError e;
    r->doc = toml_parse_file(path, &e);
    if (!r->doc) {
        errs->msg = dl_malloc(sizeof(char *));
        errs->msg[0] = dl_strdup(e.msg);
        errs->n = 1;
        return -1;
    }
    for (int i = 0; i < n_sets; i++) apply_set(&c, r->doc, sets[i]);
    read_top(&c);
    read_data(&c, r->doc);
    read_stages(&c);
    check_misc(&c);
    check_stages(&c);
    int before = c.n;
    check_model(&c);
    if (r->model_source && c.n == before) {
        check_layouts(&c);
        if (c.n == before) check_trainable(&c);
    }
    check_tokenizer(&c);
    if (c.n == 0) {
        free(c.e);
        return 0;
    }
    qsort(c.e, (size_t)c.n, sizeof(Err), err_cmp);
    errs->msg = dl_malloc((size_t)c.n * sizeof(char *));
    for (int i = 0; i < c.n; i++) errs->msg[i] = c.e[i].msg;
    errs->n = c.n;
    free(c.e);
    return -1;
}

void recipe_errors_free(RecipeErrors *errs) {
    for (int i = 0; i < errs->n; i++) free(errs->msg[i]);
    free(errs->msg);
    memset(errs, 0, sizeof *errs);
}

static void free_list(char **l, int n) {
    for (int i = 0; i < n; i++) free(l[i]);
    free(l);
}

void recipe_free(Recipe *r) {
    free(r->path);
    toml_free(r->doc);
    free(r->run.name);
    free(r->run.output_dir);
    free(r->teacher.path);
    free(r->teacher.config);
    free(r->tokenizer.path);
    free(r->hardware.teacher);
    for (int i = 0; i < r->n_data; i++) {
        free(r->data[i].name);
        free_list(r->data[i].sources, r->data[i].n_sources);
        free(r->data[i].field);
    }
    free(r->data);
    for (int i = 0; i < r->n_stages; i++) {
        StageSpec *s = &r->stages[i];
        free(s->name);
        free(s->data);
        free(s->output);
        free_list(s->eval_sets, s->n_eval_sets);
        free_list(s->choice_sets, s->n_choice_sets);
        free(s->eval_index);
        free(s->trainable);
        free(s->schedule);
        free(s->export_dir);
        free(s->spec_draft);
        free(s->spec_data);
    }
    free(r->stages);
    free(r->model_source);
    free_list(r->warnings, r->n_warnings);
    free_list(r->set_labels, r->n_set_labels);
    memset(r, 0, sizeof *r);
}

// ================================================================================================ writing

static void write_float(FILE *f, double x) {
    TomlValue v = {.type = TOML_FLOAT};
    v.u.f = x;
    toml_write_value(f, &v);
}

// Writes `key = value` for one field of obj; returns false if the field has no value to write.
static bool write_field(FILE *f, const Field *fd, const void *obj) {
    const char *p = (const char *)obj + fd->off;
    switch (fd->type) {
    case F_STR:
    case F_PATH:
    case F_PATTERNS:
        if (!*(char *const *)p) return false;
        break;
    case F_STRLIST:
    case F_INTLIST:
        if (fd->type == F_STRLIST && *(const int *)((const char *)obj + fd->off_n) == 0) return false;
        break;
    case F_SPECIAL: return false;
    default: break;
    }
    toml_write_key(f, fd->key);
    fputs(" = ", f);
    switch (fd->type) {
    case F_BOOL: fputs(*(const bool *)p ? "true" : "false", f); break;
    case F_INT: fprintf(f, "%lld", (long long)*(const int64_t *)p); break;
    case F_I32: fprintf(f, "%d", *(const int *)p); break;
    case F_FLOAT: write_float(f, *(const double *)p); break;
    case F_STR:
    case F_PATH:
    case F_PATTERNS: toml_write_string(f, *(char *const *)p); break;
    case F_ENUM: toml_write_string(f, fd->choices[*(const int *)p]); break;
    case F_STRLIST: {
        char *const *l = *(char **const *)p;
        int n = *(const int *)((const char *)obj + fd->off_n);
        fputc('[', f);
        for (int i = 0; i < n; i++) {
            if (i) fputs(", ", f);
            toml_write_string(f, l[i]);
        }
        fputc(']', f);
        break;
    }
    case F_INTLIST: {
        const int *l = (const int *)p;
        int n = *(const int *)((const char *)obj + fd->off_n);
        fputc('[', f);
        for (int i = 0; i < n; i++) fprintf(f, "%s%d", i ? ", " : "", l[i]);
        fputc(']', f);
        break;
    }
    case F_BETAS:
        fputc('[', f);
        write_float(f, ((const double *)p)[0]);
        fputs(", ", f);
        write_float(f, ((const double *)p)[1]);
        fputc(']', f);
        break;
    case F_SPECIAL: break;
    }
    fputc('\n', f);
    return true;
}

static void write_optim(FILE *f, const OptimSpec *o) {
    for (int i = 0; i < (int)DL_ARRAY_LEN(OPTIM_FIELDS); i++) {
        const Field *fd = &OPTIM_FIELDS[i];
        if (!strcmp(fd->key, "warmup_steps") && o->warmup_steps < 0) continue;
        if (!strcmp(fd->key, "warmup_ratio") && o->warmup_steps >= 0) continue;
        write_field(f, fd, o);
    }
}

static void write_length(FILE *f, int64_t steps, double epochs) {
    if (steps > 0) fprintf(f, "steps = %lld\n", (long long)steps);
    else if (epochs > 0) {
        fputs("epochs = ", f);
        write_float(f, epochs);
        fputc('\n', f);
    }
}

void recipe_write_resolved(const Recipe *r, FILE *f) {
    fprintf(f, "# Resolved recipe written by distill %s from %s: every default and --set applied, layers listed.\n",
            DISTILL_VERSION, r->path);
    for (int i = 0; i < r->n_set_labels; i++) fprintf(f, "# %s\n", r->set_labels[i]);
    fputs("\n[run]\n", f);
    for (int i = 0; i < (int)DL_ARRAY_LEN(RUN_FIELDS); i++) write_field(f, &RUN_FIELDS[i], &r->run);
    fputs("\n[teacher]\n", f);
    for (int i = 0; i < (int)DL_ARRAY_LEN(TEACHER_FIELDS); i++) write_field(f, &TEACHER_FIELDS[i], &r->teacher);
    fputs("\n[tokenizer]\n", f);
    if (!write_field(f, &TOKENIZER_FIELDS[0], &r->tokenizer)) fputs("# path: the teacher's own tokenizer\n", f);
    fputs("\n[hybrid]\n", f);
    write_field(f, &HYBRID_FIELDS[0], &r->hybrid);
    write_field(f, &HYBRID_FIELDS[1], &r->hybrid);
    fputs("\n[optimizer]\n", f);
    write_optim(f, &r->optimizer);
    fputs("\n[hardware]\n", f);
    for (int i = 0; i < (int)DL_ARRAY_LEN(HARDWARE_FIELDS); i++) write_field(f, &HARDWARE_FIELDS[i], &r->hardware);
    for (int d = 0; d < r->n_data; d++) {
        fputs("\n[data.", f);
        toml_write_key(f, r->data[d].name);
        fputs("]\n", f);
        if (r->data[d].produced_by >= 0) fprintf(f, "# written by stage '%s'\n", r->stages[r->data[d].produced_by].name);
        for (int i = 0; i < (int)DL_ARRAY_LEN(DATA_FIELDS); i++) write_field(f, &DATA_FIELDS[i], &r->data[d]);
    }
    for (int si = 0; si < r->n_stages; si++) {
        const StageSpec *s = &r->stages[si];
        unsigned kb = KB(s->kind);
        fprintf(f, "\n[[stage]]\nkind = \"%s\"\n", KIND_NAMES[s->kind]);
        for (int i = 0; i < (int)DL_ARRAY_LEN(STAGE_FIELDS); i++) {
            const Field *fd = &STAGE_FIELDS[i];
            if (fd->kinds && !(fd->kinds & kb)) continue;
            if (!strcmp(fd->key, "steps") || !strcmp(fd->key, "epochs")) continue;
            write_field(f, fd, s);
        }
        if (stage_kind_trains(s->kind) && s->kind != STAGE_LAYERWISE) write_length(f, s->steps, s->epochs);
        if (kb & K_LOSS) {
            fputs("[stage.loss]\n", f);
            for (int i = 0; i < (int)DL_ARRAY_LEN(LOSS_FIELDS); i++) write_field(f, &LOSS_FIELDS[i], &s->loss);
        }
        if (kb & K_TRAIN) {
            fputs("[stage.optimizer]\n", f);
            write_optim(f, &s->opt);
        }
        for (int k = 0; k < s->n_schedule; k++) {
            const ScheduleStep *ss = &s->schedule[k];
            fputs("[[stage.schedule]]\n", f);
            write_field(f, &SCHED_STEP_FIELDS[0], ss);
            write_length(f, ss->steps, ss->epochs);
        }
    }
}

// Markdown cell with the default of field fd in obj ("" if none).
static void default_cell(FILE *f, const Field *fd, const void *obj) {
    char *buf = NULL;
    size_t n = 0;
    FILE *m = open_memstream(&buf, &n);
    bool any = write_field(m, fd, obj);
    fclose(m);
    if (any) {
        char *eq = strstr(buf, " = ");
        char *v = eq ? eq + 3 : buf;
        v[strcspn(v, "\n")] = 0;
        fprintf(f, "`%s`", v);
    } else fputs("-", f);
    free(buf);
}

static void schema_table(FILE *f, const char *title, const Field *fd, int nf, const void *obj, bool stage, bool no_defaults) {
    fprintf(f, "\n### %s\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n", title);
    for (int i = 0; i < nf; i++) {
        const Field *x = &fd[i];
        static const char *const TN[] = {"bool", "int", "int", "float", "string", "path", "string", "string list",
                                         "pattern(s)", "int list", "[float, float]", "table"};
        fprintf(f, "| `%s` | %s | ", x->key, x->type == F_SPECIAL && x->choices ? "string" : TN[x->type]);
        if (no_defaults || x->type == F_INTLIST) fputs("-", f);
        else if (!strcmp(x->key, "seed") && obj && fd == TEACHER_FIELDS) fputs("run.seed", f);
        else if (stage && (!strcmp(x->key, "steps") || !strcmp(x->key, "epochs"))) fputs("-", f);
        else if (stage) {
            // stage defaults depend on the kind: show the first kind the key applies to
            StageSpec s;
            OptimSpec o;
            optim_defaults(&o);
            int k0 = 0;
            while (x->kinds && k0 < STAGE_KIND_COUNT && !(x->kinds & KB(k0))) k0++;
            stage_defaults(&s, (StageKind)(k0 < STAGE_KIND_COUNT ? k0 : 0), &o);
            if (!strcmp(x->key, "trainable")) fputs("`\"*.mamba.*\"` (layerwise), `\"*\"`", f);
            else if (x->type == F_SPECIAL || !strcmp(x->key, "name")) fputs("-", f);
            else default_cell(f, x, &s);
            free(s.trainable);
        } else default_cell(f, x, obj);
        fputs(" | ", f);
        if (x->choices) {
            for (int k = 0; x->choices[k]; k++) fprintf(f, "%s`%s`", k ? ", " : "", x->choices[k]);
        } else if (x->type == F_INT || x->type == F_I32 || x->type == F_FLOAT) {
            char rb[96];
            range_msg(x, rb, sizeof rb);
            fputs(rb, f);
        }
        if (stage && x->kinds) {
            fputs(x->choices || x->type == F_INT || x->type == F_I32 || x->type == F_FLOAT ? "; " : "", f);
            fputs("kinds: ", f);
            for (int k = 0, o = 0; k < STAGE_KIND_COUNT; k++)
                if (x->kinds & KB(k)) fprintf(f, "%s%s", o++ ? ", " : "", KIND_NAMES[k]);
        }
        fprintf(f, " | %s |\n", x->help);
    }
}

void recipe_write_schema(FILE *f) {
    Recipe r;
    recipe_defaults(&r, "RECIPE.toml");
    void *objs[] = {&r.run, &r.teacher, &r.tokenizer, &r.hybrid, &r.optimizer, &r.hardware};
    for (int i = 0; i < (int)DL_ARRAY_LEN(TOP_TABLES); i++) {
        char t[64];
        snprintf(t, sizeof t, "[%s]", TOP_TABLES[i].name);
        schema_table(f, t, TOP_TABLES[i].f, TOP_TABLES[i].n, objs[i], false, false);
    }
    DataSpec d;
    data_defaults(&d);
    schema_table(f, "[data.NAME]", DATA_FIELDS, DL_ARRAY_LEN(DATA_FIELDS), &d, false, false);
    free(d.field);
    schema_table(f, "[[stage]]", STAGE_FIELDS, DL_ARRAY_LEN(STAGE_FIELDS), NULL, true, false);
    StageLoss l = {.ce = 1, .kl = 0.1, .temperature = 1};
    schema_table(f, "[stage.loss] (defaults shown for layerwise; distill: kl = 1, ce = 0; sft, draft: ce = 1, kl = 0)", LOSS_FIELDS,
                 DL_ARRAY_LEN(LOSS_FIELDS), &l, false, false);
    fputs("\n`[stage.optimizer]` takes the keys of `[optimizer]` and overrides them for that stage.\n", f);
    ScheduleStep ss = {.attn_fraction = -1};
    schema_table(f, "[[stage.schedule]] (layerwise; steps/epochs default to the stage's)", SCHED_STEP_FIELDS,
                 DL_ARRAY_LEN(SCHED_STEP_FIELDS), &ss, false, true);
    recipe_free(&r);
}
