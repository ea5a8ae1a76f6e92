// plan.h: the resolved plan of a recipe (`distill RECIPE --dry-run`): stages in order, each stage's
// layout (which layers are Mamba, which keep attention), parameter counts (total / trainable), tokens per
// optimizer step, and an estimate of memory per GPU (or of host memory on CPU). The formula is in plan.c;
// the CUDA pipeline compares its real allocation to plan_stage_memory().
#pragma once
#include <stdint.h>
#include <stdio.h>

#include "distill/recipe.h"

// Bytes per GPU (device cuda) or in host memory (device cpu), by purpose.
typedef struct {
    double weights;      // student parameters (bf16 working copy on cuda, fp32 on cpu)
    double master;       // fp32 master copy of trainable parameters (cuda only)
    double grads;        // gradients of trainable parameters (fp32)
    double optim;        // AdamW first and second moments (fp32) of trainable parameters
    double frozen_model; // the frozen teacher (online KL, generate, teacher_cache) or the DPO reference
    double activations;  // saved for backward (or one layer's working set without backward)
    double logits;       // [tokens, vocab] fp32 buffers: student logits/grad, teacher logits
    double kv_cache;     // generate: keys and values of the teacher for batch x (prompt + new tokens)
    double total;
} MemEstimate;

typedef struct {
    int64_t params_total;      // student (or teacher for teacher-only stages) parameters
    int64_t params_trainable;  // after reg_set_trainable(stage.trainable)
    int64_t tokens_per_step;   // micro_batch * grad_accum * gpus * seq_len (x2 for DPO pairs)
    MemEstimate mem;
} StagePlan;

// Plan of stage st (schedule step `step` for layerwise). Returns 0 or -1 with e filled.
int plan_stage(const Recipe *r, const StageSpec *st, int step, StagePlan *p, DlError *e);
// Prints the whole plan.
void plan_print(const Recipe *r, FILE *f);
// "1.23 GiB", "512 MiB" into buf.
const char *plan_bytes_str(double bytes, char *buf, size_t n);
