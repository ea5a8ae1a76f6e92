// mamba_init.h: the `init` stage's parameter work: build a hybrid's parameters from a teacher (or from an
// earlier hybrid), as MambaInLlama does (shared/research/mambainllama.md §1a, `init_with_kqvo`):
//   * every tensor whose name exists in the source with the same shape is copied (embeddings, norms, MLPs,
//     kept attention, head; and Mamba layers that are Mamba in the source too, for stage-to-stage growth);
//   * a Mamba-1 layer whose source layer is attention gets
//       in_proj_x <- v_proj, B_proj <- k_proj, C_proj <- q_proj, out_proj <- o_proj   (exact copies),
//       in_proj_z, dt_proj_down ~ U(-1/sqrt(d_model), +)            (nn.Linear default),
//       dt_proj.weight ~ U(-dt_rank^-0.5, +dt_rank^-0.5),
//       dt_proj.bias = softplus^-1(dt), dt = max(exp(U(log 1e-3, log 1e-1)), 1e-4),
//       conv1d.weight, conv1d.bias ~ U(-1/2, 1/2)                  (Conv1d default, fan_in = 1*4),
//       A_log[c,n] = log(n+1), D = 1;
//   * a Mamba-2 layer whose source layer is attention: mamba2_init_layer_from_attention (mamba2_cpu.h);
//   * an untied lm_head from a tied source is the source's embedding.
// The GQA repeat needs no weight change: the mixer repeats x and B groups at run time (repeat_kv), so
// checkpoints stay in MambaInLlama's layout.
// Random draws use one RNG stream per (layer, tensor), so results depend only on the seed, not on which
// other layers are Mamba.
#pragma once
#include <stdint.h>

#include "distill/common.h"
#include "distill/model.h"
#include "distill/registry.h"

// hparams: the hybrid's buffer (hr->numel floats, every tensor written). Returns 0, or -1 with e naming the
// tensor and what was expected (mismatched configs or tied heads, a layer that cannot be derived from its
// source); hparams is then partly written and must be discarded.
int hybrid_init_from_teacher(const HybridConfig *h, const Registry *hr, float *hparams, const HybridConfig *teacher_hc,
                             const Registry *tr, const float *tparams, uint64_t seed, DlError *e);
