// eval.h: how close a student is to its teacher on held-out token rows:
//   perplexity exp(mean NLL of the targets), for student and teacher (and their ratio),
//   KL(teacher || student) per token (mean over counted positions; also relative to the teacher's entropy),
//   top-1 agreement: fraction of positions where the student's argmax equals the teacher's,
//   next-token accuracy of each against the targets (and the ratio student / teacher).
// Positions count where target >= 0 and mask != 0. All sums are float64 in row order (deterministic).
#pragma once
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"
#include "distill/train_loop.h"

typedef struct {
    char label[64];             // "student", "init", ...
    int64_t n_tokens, n_rows;
    double nll, ppl;            // student
    double teacher_nll, teacher_ppl;
    double ppl_ratio;           // ppl / teacher_ppl (1 = as good as the teacher)
    double kl;                  // mean KL(teacher || student), nats per token
    double teacher_entropy;     // mean entropy of the teacher's distribution, nats per token
    double kl_ratio;            // kl / teacher_entropy
    double top1_agreement;      // argmax student == argmax teacher
    double acc, teacher_acc;    // argmax == target
    double acc_ratio;           // acc / teacher_acc
} EvalResult;

typedef struct {
    const HybridConfig *hc;
    const Registry *reg;
    const float *params;
    int device;  // TmDevice (train_model.h): 0 the CPU engine, 1 the CUDA engine (bf16)
} EvalModel;

// Evaluates student against teacher over n_batches micro-batches of B rows of T tokens from src.
int eval_run(const EvalModel *student, const EvalModel *teacher, BatchSource *src, int64_t B, int64_t T,
             int64_t n_batches, const char *label, EvalResult *out, DlError *e);

// Appends results as a JSON document {"results": [...]} to path (atomically replaced).
int eval_write_json(const char *path, const EvalResult *r, int n, DlError *e);
// The table (one column per result, the teacher in the first).
void eval_print_table(FILE *f, const EvalResult *r, int n);
