// export_mamba2.h: (a) MambaInLlama's own Mamba-2 checkpoint format (mambainllama.md §1b, §4): the teacher's
// config.json, mamba_config.json {"d_model", "ssm_cfg": {"expand": 1, "ngroups": n_head, "d_state": head_dim},
// "d_inner", "d_xb", "intermediate_size", "n_layer", "attn_layers", "rms_norm_eps", ...} and safetensors under
// MambaInLlama's names (model.layers.N.mamba.{in_proj,conv1d,out_proj}.weight, conv1d.bias, dt_bias, A_log, D,
// norm.weight) in the compact layout (x and B for the KV heads only). Loaded by jxiw/MambaInLlama's
// mamba2_inference wrapper and by distill itself; no engine loads it (use export_granite / export_gguf).
// The writing is export_hf's (distill/export.h): its config.json, mamba_config.json and sharding already
// cover the Mamba-2 case, so this only checks that the model is a Mamba-2 hybrid and calls it.
#pragma once
#include "distill/export.h"

int export_mambainllama_mamba2(const char *dir, const HybridConfig *h, const Registry *r, const float *params,
                               const ExportOptions *o, DlError *e);

// Makes an export_hf directory of a Mamba-1 hybrid loadable by HF transformers with trust_remote_code
// (no engine implements MambaInLlama's Mamba-1): copies hf_dir/modeling_mambainllama.py and
// configuration_mambainllama.py into dir and adds to its config.json "auto_map" (AutoConfig,
// AutoModelForCausalLM) and "mamba_config" (mamba_config.json's keys plus d_state, d_conv, dt_rank).
// config.json is replaced atomically; mamba_config.json stays for MambaInLlama's own loader.
int export_add_hf_code(const char *dir, const HybridConfig *h, const char *hf_dir, DlError *e);
