// hfconfig.h: HF transformers config.json (Llama, Llama-3.1 rope_scaling "llama3", Mistral) ->
// LlamaConfig, and MambaInLlama's mamba_config.json -> HybridConfig (attn_layers, ssm_cfg).
// Unknown keys are ignored (HF configs carry many); known keys with the wrong type or out-of-range values
// are errors naming the key and the file.
#pragma once
#include <stddef.h>

#include "distill/common.h"
#include "distill/model.h"

// Parses the JSON text json[0..len) (label names it in messages).
int hf_config_parse(const char *json, size_t len, const char *label, LlamaConfig *c, DlError *e);
int hf_config_load(const char *path, LlamaConfig *c, DlError *e);
// initializer_range of the config (default 0.02), for random initialization.
int hf_config_init_range(const char *json, size_t len, double *out);

// mamba_config.json of a MambaInLlama export on top of base (from config.json). Mamba-2 when ssm_cfg has
// "ngroups" or "d_state" equal to head_dim, else Mamba-1. d_inner/d_xb must match the base dims.
int hf_mamba_config_parse(const char *json, size_t len, const char *label, const LlamaConfig *base, HybridConfig *h,
                          DlError *e);
