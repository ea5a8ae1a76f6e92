// losses.h: the distillation losses on logits, computed one block of rows at a time so that a caller can
// stream [rows, V] logits through head -> loss -> dlogits -> dhead without ever holding [B*T, V]
// (the engine does this in engine_loss). Plus the hidden-state MSE and the DPO loss.
//
// Per row (token) with student logits s, teacher logits t, temperature T, p = softmax(t/T), q = softmax(s/T):
//   ce  = -log softmax(s)[target]                       (temperature 1)
//   kl  = T^2 * KL(p || q) = T^2 * sum p (log p - log q)  forward KL (MambaInLlama's loss at T = 1)
//   rkl = T^2 * KL(q || p)                                reverse KL
// The T^2 factor keeps gradient magnitudes independent of T (Hinton et al.). Rows whose mask is 0 add
// nothing and get zero gradient; a row weight (e.g. per-sequence DPO weight) multiplies every term.
// All sums are taken in double in row order, so results are deterministic and independent of threads.
#pragma once
#include <stdint.h>

typedef struct {
    float ce;           // weight of cross-entropy against targets
    float kl;           // weight of forward KL(teacher || student)
    float rkl;          // weight of reverse KL(student || teacher)
    float temperature;  // of both KLs; 0 means 1
} LossWeights;

typedef struct {
    double ce, kl, rkl;  // sums over counted rows (row weights applied), before any normalization
    double n_rows;       // number of counted rows (mask != 0)
} LossSums;

// One block of n rows of V logits. targets [n] (used if w->ce != 0; a target < 0 or >= V is not counted),
// mask [n] (NULL: all counted), row_weight [n] (NULL: 1), teacher [n, V] (needed if kl or rkl != 0).
// dlogits [n, V] (NULL: no gradient; may alias logits) gets scale * d(w.ce*ce + w.kl*kl + w.rkl*rkl)/ds.
// Adds the sums of the terms with a nonzero weight (unweighted by w) into acc. logp_target [n] (optional) gets log softmax(s)[target] (0 where
// the row is not counted).
void loss_rows(const LossWeights *w, int64_t n, int64_t V, const float *logits, const float *teacher,
               const int32_t *targets, const uint8_t *mask, const float *row_weight, double scale, float *dlogits,
               LossSums *acc, float *logp_target);

// The same with a sparse teacher, as stored for offline distillation: per row the teacher's top-k token ids
// top_ids [n, k] and their log-probs top_logp [n, k] (temperature 1). p is renormalized over the k ids at
// temperature T: p_i = softmax_k(top_logp / T); kl = T^2 * sum_k p_k (log p_k - log q_k), whose gradient is
// T * (q - p) with p zero outside the k ids (k = V with all ids gives the dense forward KL). Reverse KL is not
// defined for a truncated teacher: w->rkl must be 0.
void loss_rows_topk(const LossWeights *w, int64_t n, int64_t V, const float *logits, int k, const int32_t *top_ids,
                    const float *top_logp, const int32_t *targets, const uint8_t *mask, const float *row_weight,
                    double scale, float *dlogits, LossSums *acc, float *logp_target);

// Total loss of sums with weights, divided by norm.
double loss_total(const LossWeights *w, const LossSums *s, double norm);

// Hidden-state MSE over rows: sum over counted rows of sum_i (a - b)^2, times scale; a, b [n, d];
// da [n, d] (optional) += scale * 2 (a - b) on counted rows. Returns the scaled sum.
double mse_rows(int64_t n, int64_t d, const float *a, const float *b, const uint8_t *mask, double scale, float *da);

// DPO (Rafailov et al.): loss_i = -log sigmoid(beta * ((pc_i - rc_i) - (pr_i - rr_i))) over n pairs of
// sequence log-probs (policy chosen/rejected, reference chosen/rejected). Returns the mean over pairs;
// d_chosen/d_rejected [n] (optional) get d(mean loss)/d pc_i and d pr_i. accuracy (optional): fraction of
// pairs whose implicit reward margin is > 0.
double dpo_loss(int64_t n, double beta, const double *pc, const double *pr, const double *rc, const double *rr,
                double *d_chosen, double *d_rejected, double *accuracy);
