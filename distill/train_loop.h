// train_loop.h: the one training loop shared by the layerwise, distill, sft (and, through its own loss,
// dpo) stages: micro-batches from a BatchSource, the teacher's logits (and hidden states) online, the loss
// mix (CE, forward/reverse KL, hidden-state MSE), gradient accumulation, the optimizer, metrics and
// progress, a checkpoint every N steps and at the end, and exact resume.
//
// Resume is bit-exact: a checkpoint holds the weights, the optimizer (m, v, counters, outlier window), the
// batch source's position (its save/restore callbacks) and the step. Every computation is deterministic
// (fixed-order reductions), so steps after a resume produce the same losses, bit for bit, as an
// uninterrupted run with the same configuration and thread count... and in fact any thread count, where
// the engine's reductions are thread-count independent.
//
// Data parallel (TrainConfig.dist with world W > 1): every rank runs this loop on its own slice of each
// global batch (its BatchSource yields rank r's rows), so a step covers micro_batch x grad_accum x W rows.
// After the micro-batches the gradients are summed over ranks in the ZeRO layout of zero.h (stage 0: all-
// reduce; 1: reduce-scatter after the last micro-batch; 2: after every one), each rank updates what it
// owns with the global gradient norm (optim_step_norm: the same skips and clipping as one rank), and the
// parameters are all-gathered. The loss, token counts and the stop flag are summed over ranks every step,
// so a SIGINT/SIGTERM on any rank stops every rank at the same step before the collective checkpoint.
// Checkpoints go through ckpt_shard_save (every rank its optimizer slice, rank 0 the weights and the
// manifest); resume reads any checkpoint (plain or sharded, any old world size) with ckpt_shard_load_optim,
// keeping the global batch: a run of W ranks x grad_accum A resumed on W' ranks runs A*W/W' micro-batches
// per rank (an error if that is not whole). On CPU the collectives run over dist.h's control channel
// (zdist_*); the CUDA backend calls nccl_comm.h at the marked hooks.
//
// Loss spikes: the optimizer skips a step whose loss or gradient is non-finite or whose gradient norm is an
// outlier (optim.h). After max_consecutive_skips skipped steps in a row the weights are stuck where the spike
// left them, so the loop rolls back: it reloads the newest checkpoint written before the run of skips
// (weights and optimizer, not the data position), drops this loop's later checkpoints, multiplies the
// learning rate by opt.spike_lr_factor for the rest of the loop and goes on with the batches after the spike,
// at most opt.spike_rollbacks times; then (or with no such checkpoint) it stops with an error. The
// checkpoints record the rollbacks and the run of skips, so a resume continues it exactly, and a fresh run
// with the same configuration makes the same rollbacks at the same steps.
//
// Steps are numbered within the stage: a loop may cover a sub-range [step_offset, step_offset + steps) of
// its stage (layerwise schedule steps run one loop each), so checkpoint names and metrics rows stay
// monotone over the whole stage.
#pragma once
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "distill/checkpoint.h"
#include "distill/common.h"
#include "distill/dist.h"
#include "distill/losses.h"
#include "distill/metrics.h"
#include "distill/model.h"
#include "distill/optim.h"
#include "distill/registry.h"

// One micro-batch of B rows of T tokens (arrays owned by the loop, B*T each).
typedef struct {
    int64_t B, T;
    int32_t *tokens;   // inputs
    int32_t *targets;  // next-token targets (< 0: no loss at this position)
    uint8_t *mask;     // 1 where the loss counts (e.g. assistant tokens); the loop passes it to the loss
    uint8_t *reset;    // 1 where a packed document starts
} TrainBatch;

// Where micro-batches come from. next() fills b (all four arrays) and returns 0, or -1 with e. save() puts
// the position into the checkpoint state (ckpt_state_set_int/blob/rng); restore() reads it back so that the
// next next() returns what it would have returned in the uninterrupted run.
typedef struct {
    void *ctx;
    int (*next)(void *ctx, TrainBatch *b, DlError *e);
    void (*save)(void *ctx, CkptState *st);
    int (*restore)(void *ctx, const CkptState *st, DlError *e);
    // optional: the teacher's log-probs [B*T, V] of the last batch (a teacher cache); KL terms then use them
    // instead of running the teacher
    const float *(*teacher_logits)(void *ctx);
} BatchSource;

typedef struct TrainModel TrainModel;  // train_model.h
// A custom loss for one micro-batch (DPO): runs the student's forward, loss and backward itself on b,
// ADDING the gradient into grads (where the student computes: train_model.h), and returns the loss; up to 4
// named parts (for metrics) go to parts.
typedef int (*TrainLossFn)(void *ctx, TrainModel *student, const TrainBatch *b, float *grads, double *loss,
                           MetricPart *parts, int *n_parts, DlError *e);

typedef struct {
    // the student: trainable flags of reg must be set (reg_set_trainable) before train_run
    const HybridConfig *hc;
    const Registry *reg;
    float *params;
    // the teacher, for KL and MSE terms (NULL when the loss has neither)
    const HybridConfig *teacher_hc;
    const Registry *teacher_reg;
    const float *teacher_params;
    // loss: w.ce, w.kl, w.rkl, w.temperature; mse: weight of the mean squared hidden-state difference over
    // the outputs of the student's Mamba layers (teacher hidden state of the same layer as target).
    // With mse alone (ce = kl = rkl = 0) it is the alignment step: each Mamba layer gets the teacher's hidden
    // state as its input (teacher forcing) and learns to reproduce the teacher layer's output; with other
    // terms the MSE is taken along the student's own forward pass.
    LossWeights w;
    double mse;
    // or a custom loss (w and mse unused, no teacher needed); loss_ctx is passed to it
    TrainLossFn loss_fn;
    void *loss_ctx;
    // batches: micro_batch rows of seq_len tokens; opt.grad_accum micro-batches per step
    int64_t micro_batch, seq_len;
    OptimConfig opt;         // opt.total_steps = steps of this loop
    // run bookkeeping
    const char *run_dir;
    int stage_index;
    const char *stage_name;
    const char *progress_label;  // the progress line's name (NULL: stage_name), e.g. "layerwise 2/3"
    int64_t step_offset;     // first step of this loop within the stage
    int64_t checkpoint_every;  // steps between checkpoints (0: only at the end)
    int keep_checkpoints;
    const char *recipe_text; // saved in checkpoints (may be NULL)
    Metrics *metrics;        // may be NULL
    int max_consecutive_skips;  // roll back or stop after this many skipped steps in a row (0: 25)
    // for tests: steps [test_spike[0], test_spike[1]] (the stage's numbering) get a non-finite loss while the loop
    // has not rolled back yet: a loss spike made to order (DISTILL_TEST_SPIKE=STAGE:A-B[:N], stage_common.c)
    int64_t test_spike[2];
    // resume: a checkpoint of this stage, inside this loop's step range (NULL: start fresh)
    const char *resume_from;
    // extra state for the checkpoints of this loop (e.g. the layerwise schedule step); may be NULL
    void (*annotate)(void *ctx, CkptState *st);
    void *annotate_ctx;
    // observer of each step (tests, callers that collect losses); may be NULL
    void (*on_step)(void *ctx, int64_t step, double loss, const OptimResult *r);
    void *on_step_ctx;
    // for tests: return after this many steps of this process (a simulated kill; 0: run to the end)
    int64_t stop_after;
    // for tests: after this many steps of this process (metrics and any due checkpoint written) the process
    // stops itself with SIGSTOP, so a test can SIGKILL it at a known step instead of racing a fast run
    int64_t pause_after;
    // set by SIGINT/SIGTERM (RunContext.stop; may be NULL): the loop finishes the step, writes a checkpoint
    // and returns 0 with res->interrupted
    volatile sig_atomic_t *stop;
    // data parallel (see the header comment): the process group (NULL or world 1: one process), the ZeRO
    // stage 0..2 and the bucket size in bytes (<= 0: one bucket). opt.grad_accum is per rank.
    DistGroup *dist;
    int zero_stage;
    int64_t zero_bucket_bytes;
    // where the models compute (TmDevice of train_model.h: 0 = cpu, 1 = cuda) and, on cuda, whether the
    // MLP activations are recomputed in the backward (recipe hardware.recompute = "mlp" or "full")
    int device;
    bool recompute_mlp;
    // cuda, world > 1: the NCCL communicator over the ranks of dist (nccl_comm.h), or NULL
    struct NcclComm *nccl;
    // cuda: the online teacher keeps 1/world of each layer and gathers layers during its forward (recipe
    // hardware.teacher = "sharded", tm_new_sharded_teacher); same numbers as the whole teacher
    bool teacher_shard;
    // cuda, world > 1: overlap each bucket's reduction with the backward; ZeRO-2: staged gradient memory (recipe
    // hardware.overlap / stage_grads; DISTILL_DP_OVERLAP / DISTILL_DP_STAGE_GRADS = 1 or 0 override them). Staging
    // is skipped in a teacher-forced layerwise stage, whose per-layer backward is not announced to the reductions.
    bool dp_overlap, dp_stage_grads;
} TrainConfig;

typedef struct {
    int64_t steps_done;     // steps of this loop completed (including resumed ones)
    double last_loss;
    double tokens_per_s;    // over the steps run by this process
    int64_t n_skipped;
    int rollbacks;          // loss-spike rollbacks (OptimConfig.spike_rollbacks)
    bool stopped;           // returned because of stop_after
    bool interrupted;       // returned because *stop was set (a checkpoint of the last step was written)
    char last_checkpoint[512];
} TrainResult;

// Runs the loop. Returns 0, or -1 with e (bad config, data error, divergence, checkpoint write failure).
int train_run(const TrainConfig *c, BatchSource *src, TrainResult *res, DlError *e);

// Checkpoint state keys the loop writes (besides the batch source's and annotate's keys).
#define TRAIN_KEY_OFFSET "train.step_offset"
#define TRAIN_KEY_TOTAL "train.total_steps"
#define TRAIN_KEY_TOKENS "train.tokens"
#define TRAIN_KEY_GLOBAL_ACCUM "train.global_accum"  // micro-batches per step over all ranks (accum x world)
#define TRAIN_KEY_DONE "train.done"       // 1 in the checkpoint written at the loop's last step
#define TRAIN_KEY_ROLLBACKS "train.rollbacks"  // loss-spike rollbacks done so far in this loop
#define TRAIN_KEY_SKIPS "train.skips_in_row"   // steps skipped in a row up to the checkpoint's step
#define TRAIN_KEY_MIXERS "model.mixers"  // blob: one byte per layer, MixerKind (the hybrid layout)
