// export_granite.h: a MambaInLlama Mamba-2 hybrid as a standard Mamba-2 hybrid, the layout engines implement
// (shared/research/export.md §3.2, §3.4; docs/EXPORTS.md):
//   * mamba2_to_standard: one layer in the standard Mamba-2 layout (HF GraniteMoeHybrid / vLLM / SGLang
//     MambaMixer2 / llama.cpp granitehybrid): n_groups = heads, head_dim = d_state = attention head_dim, the
//     compact x/B rows of in_proj and conv1d duplicated per KV group (head h reads KV head h / rep), z/C/dt,
//     dt_bias/A_log/D/norm/out_proj unchanged; optionally padded with all-zero heads (exact: every head is
//     normalized on its own and a zero head outputs 0) so that heads * head_dim reaches a required d_inner.
//   * export_granite: a `GraniteMoeHybridForCausalLM` directory (config.json + safetensors) for HF
//     transformers, vLLM and SGLang: layer_types per layer, rope, attention_multiplier = 1/sqrt(head_dim),
//     no experts (the MLP as shared_mlp), all multipliers 1, an explicit lm_head.
#pragma once
#include <stdint.h>

#include "distill/common.h"
#include "distill/dtype.h"
#include "distill/model.h"
#include "distill/registry.h"

// One Mamba-2 layer in the standard layout. Dims after padding: H heads (= groups), P = N = head_dim,
// d_inner = H*P, conv_dim = d_inner + 2*H*N, n_in = 2*d_inner + 2*H*N + H.
typedef struct {
    int64_t H, P, N, d_model, d_conv, d_inner, conv_dim, n_in;
    float *in_proj;   // [n_in, d_model]   rows [z | x | B | C | dt]
    float *conv_w;    // [conv_dim, d_conv] channels [x | B | C]
    float *conv_b;    // [conv_dim]
    float *dt_bias;   // [H]
    float *A_log;     // [H]
    float *D;         // [H]
    float *norm_w;    // [d_inner]
    float *out_proj;  // [d_model, d_inner]
} Mamba2Std;

// Heads of the standard layout for a required d_inner = expand * d_model (expand 0: the smallest integer
// expand >= 1 that holds the model's heads). Fails if head_dim does not divide it or it is smaller than the
// model's n_head * head_dim.
int mamba2_std_heads(const HybridConfig *h, int expand, int *heads, int *expand_out, DlError *e);
// Layer `layer` (a Mamba-2 layer of h) with H_out >= n_head heads (the extra ones zero).
int mamba2_to_standard(const HybridConfig *h, const Registry *r, const float *params, int layer, int H_out,
                       Mamba2Std *s, DlError *e);
void mamba2_std_free(Mamba2Std *s);

// Checks that h is something the standard layout represents: every non-attention layer Mamba-2, attention
// layers with head_dim == d_model / n_head (engines derive it so), no rope scaling unknown to engines.
int granite_check(const HybridConfig *h, DlError *e);

typedef struct {
    DType dtype;               // DT_F32, DT_BF16 or DT_F16
    int expand;                // mamba_expand; 0: the smallest that fits (1 for Llama-family teachers)
    uint64_t max_shard_bytes;  // 0: one file
    const char *name_or_path;  // "_name_or_path"; NULL: "distill"
} GraniteOptions;

// Writes dir (built as dir.tmp-PID, renamed into place; a failure leaves nothing that looks complete).
int export_granite(const char *dir, const HybridConfig *h, const Registry *r, const float *params,
                   const GraniteOptions *o, DlError *e);
// config.json text (newly allocated; cJSON_free/free) for heads H_out / expand.
char *export_granite_config_json(const HybridConfig *h, int H_out, int expand, DType dtype, const char *name_or_path);
