// model.h: the architecture of a teacher (Llama family) and of a hybrid student (some layers keep
// attention, the rest use a MambaInLlama mixer), and the parameter layout both share through the
// tensor registry. Names and layouts follow HF transformers and jxiw/MambaInLlama exactly, so exports
// need no renaming (see shared/research/mambainllama.md §1a, §4).
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/registry.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DL_MAX_LAYERS 256

typedef struct {
    int n_layer;       // decoder layers
    int d_model;       // hidden size
    int n_head;        // attention heads
    int n_kv_head;     // key/value heads (GQA)
    int head_dim;      // usually d_model / n_head
    int d_ff;          // MLP intermediate size
    int vocab;         // vocabulary size
    int max_pos;       // max_position_embeddings
    double rope_theta;
    double rms_eps;
    // Llama-3.1 rope scaling (rope_type "llama3"); rope_factor == 0 means none.
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_orig_max_pos;
    bool tied_embeddings;  // lm_head shares model.embed_tokens.weight
    int bos_id, eos_id;    // -1 if unknown
} LlamaConfig;

typedef enum { MIXER_ATTN = 0, MIXER_MAMBA1 = 1, MIXER_MAMBA2 = 2 } MixerKind;

typedef struct {
    LlamaConfig base;
    MixerKind mixer[DL_MAX_LAYERS];  // per layer; a teacher has MIXER_ATTN everywhere
    // Mamba dims (MambaInLlama, expand = 1): d_inner = n_head*head_dim, d_xb = n_kv_head*head_dim.
    int d_inner;
    int d_xb;
    int d_state;  // Mamba-1: 16; Mamba-2: head_dim
    int dt_rank;  // Mamba-1: ceil(d_model / 16)
    int d_conv;   // 4
} HybridConfig;

const char *mixer_name(MixerKind k);

// Checks the base config for consistency (positive sizes, heads divide, head_dim even, ...).
int llama_config_validate(const LlamaConfig *c, DlError *e);
// A hybrid of c with Mamba-1 (or Mamba-2) everywhere except the layers in attn_layers[0..n_attn).
int hybrid_config_init(HybridConfig *h, const LlamaConfig *c, MixerKind mamba_kind, const int *attn_layers,
                       int n_attn, DlError *e);
// A teacher: attention everywhere.
void hybrid_config_teacher(HybridConfig *h, const LlamaConfig *c);
int hybrid_n_attn(const HybridConfig *h);

// Registers every parameter of the model (in HF / MambaInLlama names) in layer order:
//   model.embed_tokens.weight [V, d]
//   model.layers.{i}.input_layernorm.weight [d]
//   attention layers:  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
//   Mamba-1 layers:    model.layers.{i}.mamba.{in_proj_z,in_proj_x,B_proj,C_proj,dt_proj_down,dt_proj,out_proj}.weight,
//                      .dt_proj.bias, .conv1d.weight [d_inner,1,4], .conv1d.bias, .A_log [d_inner,N], .D [d_inner]
//   Mamba-2 layers:    model.layers.{i}.mamba.{in_proj,conv1d,out_proj}.weight, conv1d.bias, dt_bias, A_log, D, norm.weight
//   model.layers.{i}.post_attention_layernorm.weight [d]
//   model.layers.{i}.mlp.{gate,up,down}_proj.weight
//   model.norm.weight [d]; lm_head.weight [V, d] unless tied
void model_build_registry(const HybridConfig *h, Registry *r);

// Parameters of one layer's mixer (for plans and reports).
int64_t mixer_param_count(const HybridConfig *h, int layer);

#ifdef __cplusplus
}
#endif
