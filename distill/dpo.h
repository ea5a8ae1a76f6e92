// dpo.h: direct preference optimization on the shared train loop (Rafailov et al.; the MambaInLlama code
// uses TRL's DPOTrainer with the reference = a frozen copy of the model at the start of the stage).
//
// Batches: pair i of a preference shard fills rows 2i (prompt + chosen) and 2i+1 (prompt + rejected) of a
// micro-batch of 2*P rows of T tokens; the prompt keeps its last max_prompt tokens, the response is cut
// to fit; the mask selects the response's target positions, so a row's summed log-prob is log p(response
// | prompt). Pairs are visited in a per-epoch permutation drawn from the seed; the position is savable.
//
// Loss of a micro-batch: mean over pairs of -log sigmoid(beta * ((pc - rc) - (pr - rr))) with policy (p)
// and reference (r) log-probs of chosen (c) and rejected (r) responses. Its gradient reaches the policy
// through engine_loss with per-row weights -dL/dlogp (the CE of a row is -logp), so no logits are held.
#pragma once
#include <stdint.h>

#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"
#include "distill/shards.h"
#include "distill/train_loop.h"

typedef struct {
    ShardReader *r;
    int64_t n_pairs;
    int64_t max_prompt;     // prompt tokens kept (the last ones)
    uint64_t seed;
    int64_t epoch, next;    // position: pair `next` of epoch `epoch`'s permutation
    int64_t *perm;          // [n_pairs] permutation of the current epoch
    int32_t pad_id;
} PairSource;

// Opens a preference shard (kind "preference"). max_prompt <= 0: T / 2 (set at the first batch).
int pair_source_open(PairSource *ps, const char *path, int64_t max_prompt, uint64_t seed, DlError *e);
void pair_source_close(PairSource *ps);
BatchSource pair_source(PairSource *ps);

typedef struct {
    const HybridConfig *hc;
    const Registry *reg;
    const float *ref_params;  // the frozen reference (a copy of the student's weights at stage start)
    double beta;
    struct TrainModel *ref;   // created at the first batch (B, T of the batches), on the student's device
    double *lp;               // scratch: [B] policy / reference log-probs
    float *w;                 // [B] row weights
} DpoLoss;

// The TrainLossFn of DPO (ctx = DpoLoss*). Parts: "dpo" (the loss), "reward_acc" (fraction of pairs with a
// positive implicit reward margin), "margin" (mean beta * margin).
int dpo_train_loss(void *ctx, TrainModel *student, const TrainBatch *b, float *grads, double *loss, MetricPart *parts,
                   int *n_parts, DlError *e);
void dpo_loss_free(DpoLoss *d);
