// optim.h: AdamW over the trainable tensors of a registry, with its LR schedule, global-norm clipping,
// gradient accumulation and skipping of bad steps.
//
// Layout: the parameters (fp32 master weights) and the gradients are the registry's buffers
// (reg->numel floats each, a tensor at TensorInfo.offset); only [shard_begin, shard_end) of each trainable
// tensor is read or written. Frozen tensors (trainable == false) are never touched. The moments m and v:
// when the registry owns every element of every trainable tensor, the registry layout (m[t->offset + j]);
// when it carries ZeRO shard ranges (a part of some tensor is owned by another rank), compact: only the
// owned ranges, one after the other in registry order, so a rank holds 1/world of the state. Either way
// element j (shard_begin <= j < shard_end) of tensor i is m[mv_off[i] + (j - shard_begin)].
//
// One step: the caller sums the gradients of `grad_accum` micro-batches into grads and calls optim_step
// with the mean loss. The optimizer divides by grad_accum, takes the global L2 norm, skips the step if the
// loss or the norm is NaN/Inf or the norm is an outlier (> outlier_factor x the median of the last
// outlier_window accepted norms, once outlier_warmup norms were seen), clips to clip_norm, and applies
// AdamW (decoupled weight decay, PyTorch order: p -= lr*wd*p, then the Adam update).
//
// Determinism: every reduction runs over fixed chunks in a fixed order, so results do not depend on the
// number of OpenMP threads.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/registry.h"

typedef enum { LR_DECAY_COSINE = 0, LR_DECAY_LINEAR, LR_DECAY_CONSTANT } LrDecay;

typedef struct {
    double lr;             // peak learning rate
    double min_lr_ratio;   // decay ends at lr * min_lr_ratio
    LrDecay decay;
    int64_t warmup_steps;  // linear warmup length; if 0, warmup_ratio * total_steps is used
    double warmup_ratio;
    int64_t total_steps;   // optimizer steps of the whole schedule
    double beta1, beta2, eps;
    double weight_decay;   // default for tensors with TensorInfo.decay (0 elsewhere)
    double clip_norm;      // global-norm clip; <= 0 disables
    int grad_accum;        // micro-batches summed into grads per step, over all ranks (>= 1; data parallel: per-rank x world)
    double outlier_factor; // skip if norm > factor * running median; <= 0 disables
    int outlier_window;    // number of recent accepted norms kept (<= OPTIM_MAX_WINDOW)
    int outlier_warmup;    // accepted steps before the outlier test is armed
    bool moments_bf16;     // CUDA: AdamW m, v stored in bf16 with stochastic rounding (the CPU step keeps fp32)
    // Loss-spike recovery, done by the training loop (train_loop.h), not by optim_step: when the loop sees its
    // limit of skipped steps in a row, it reloads the newest checkpoint written before the run of skips, scales
    // lr by spike_lr_factor and goes on with the batches after the spike, at most spike_rollbacks times
    // (0: it stops with an error instead; the default here; recipes default to 2 x 0.5).
    int spike_rollbacks;
    double spike_lr_factor;  // in (0, 1]
} OptimConfig;

#define OPTIM_MAX_WINDOW 256

// Defaults: lr 1e-4, cosine to 0.1, no warmup, betas (0.9, 0.999), eps 1e-8, wd 0, clip 1.0,
// accum 1, outliers > 10x median of the last 64 norms after 16 steps.
void optim_config_default(OptimConfig *c);
const char *lr_decay_name(LrDecay d);
int lr_decay_parse(const char *s, LrDecay *out, DlError *e);  // "cosine" | "linear" | "constant"

// Learning rate of schedule step `step` (0-based): warmup (step+1)/W * lr, then decay over the rest.
double optim_lr_at(const OptimConfig *c, int64_t step);
int64_t optim_warmup_steps(const OptimConfig *c);

typedef enum { OPTIM_APPLIED = 0, OPTIM_SKIP_NONFINITE_LOSS, OPTIM_SKIP_NONFINITE_GRAD, OPTIM_SKIP_OUTLIER } OptimOutcome;
const char *optim_outcome_name(OptimOutcome o);

// Everything a checkpoint must hold to resume the optimizer bit-exactly.
typedef struct {
    int64_t step;        // schedule steps taken (applied + skipped)
    int64_t t;           // applied updates (Adam bias correction)
    int64_t n_skip_nonfinite, n_skip_outlier;
    int window_n, window_pos;             // ring of recent accepted grad norms
    double window[OPTIM_MAX_WINDOW];
    int64_t n_accepted;                   // accepted norms ever (arms the outlier test)
} OptimState;

typedef struct {
    OptimConfig cfg;
    const Registry *reg;
    float *m, *v;        // [mv_numel] each, zero-initialized (see the header comment)
    int64_t *mv_off;     // [reg->n] where tensor i's owned range starts in m and v
    int64_t mv_numel;    // reg->numel (registry layout) or the sum of the owned ranges (compact)
    bool mv_compact;
    double *lr_scale;    // [reg->n] per-tensor lr multiplier (1)
    double *wd;          // [reg->n] per-tensor weight decay (cfg.weight_decay if decay, else 0)
    OptimState st;
} Optim;

typedef struct {
    OptimOutcome outcome;
    double lr;           // lr used (or that would have been used) at this step
    double grad_norm;    // global norm of the averaged gradient, before clipping
    double clip_scale;   // factor applied to the gradient (1 if not clipped)
    double median_norm;  // running median before this step (0 if the window is empty)
} OptimResult;

// Checks the config (positive lr, betas in [0,1), accum >= 1, total_steps >= 1, window size); returns -1 with e.
int optim_config_validate(const OptimConfig *c, DlError *e);
int optim_init(Optim *o, const OptimConfig *c, const Registry *reg, DlError *e);
void optim_free(Optim *o);
// Parameter group: tensors matching the comma-separated fnmatch patterns get this lr multiplier and weight
// decay (wd < 0 keeps the current value). Returns the count matched, or -1 if a pattern matches nothing.
int optim_set_group(Optim *o, const char *patterns, double lr_scale, double wd, DlError *e);

// Global L2 norm of grads over the owned range of trainable tensors, times `scale` (fixed-order, float64).
double optim_grad_norm(const Registry *reg, const float *grads, double scale);

// One optimizer step (see the header comment). grads is read only. Returns the outcome in r.
void optim_step(Optim *o, float *params, const float *grads, double loss, OptimResult *r);
// The same step with the GLOBAL L2 norm of the averaged gradient (sum over micro-batches and ranks, times
// 1/grad_accum) given by the caller: a rank that owns a shard (ZeRO-1/2) passes the norm over all ranks, so
// every rank skips, clips and records the outlier window exactly as one rank would. optim_step is
// optim_step_norm with optim_grad_norm(reg, grads, 1/grad_accum).
void optim_step_norm(Optim *o, float *params, const float *grads, double loss, double grad_norm, OptimResult *r);
// The two halves of a step, shared by the CPU update above and the device update of the CUDA backend:
// optim_decide takes the schedule step (lr), the skips, the outlier window and clipping, and returns true
// when the AdamW update is to be applied with the constants in k; optim_tensor_k gives tensor i's decoupled
// decay factor and step size (its parameter group's lr multiplier and weight decay).
typedef struct {
    double bc1, bc2;  // Adam bias corrections 1 - beta^t
    double gscale;    // gradient multiplier: 1/grad_accum x clip scale
} OptimStepK;
bool optim_decide(const OptimConfig *c, OptimState *st, double loss, double grad_norm, OptimResult *r, OptimStepK *k);
void optim_tensor_k(const Optim *o, int i, const OptimResult *r, const OptimStepK *k, float *decay, float *step_size);
// Zeroes the owned ranges of trainable tensors in grads (call before accumulating micro-batches).
void optim_zero_grads(const Optim *o, float *grads);
// Returns the first non-finite value of m or v over trainable tensors (tensor name and index in e), or 0.
int optim_check_finite(const Optim *o, DlError *e);
