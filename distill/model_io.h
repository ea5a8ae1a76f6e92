// model_io.h: loading a model (config + fp32 weights in HF layout, in registry order) from any supported
// source, so every stage sees one representation:
//   * a GGUF file (llama architecture): metadata -> LlamaConfig, tensors dequantized, llama.cpp names
//     mapped to HF names, the rope permutation of Q and K undone (shared/research/export.md §2.3);
//   * an HF model directory: config.json + model.safetensors or model.safetensors.index.json (F32/F16/
//     BF16); with mamba_config.json it is a MambaInLlama hybrid export whose tensor names are exactly the
//     registry names;
//   * a config .json file alone: random weights (normal(0, initializer_range) for matrices, ones for norms)
//     drawn from rng.h with the seed, in registry order, so 8B-shape runs need no weights.
// Missing, extra or mis-shaped tensors are errors naming the tensor and the expected shape.
#pragma once
#include <stdint.h>

#include "distill/common.h"
#include "distill/gguf.h"
#include "distill/model.h"
#include "distill/registry.h"

typedef struct {
    HybridConfig hc;  // a teacher: all MIXER_ATTN; a MambaInLlama export: its layout
    Registry reg;     // model_build_registry(&hc)
    float *params;    // [reg.numel] fp32, HF layout (Q/K un-permuted from GGUF)
    char source[512]; // path and format, for messages
} LoadedModel;

// Reads only the configuration of path (any of the sources above). No weights are read.
int model_read_config(const char *path, HybridConfig *hc, DlError *e);
// Loads config and weights. seed is used only for a config-only source (random weights).
int model_load(const char *path, uint64_t seed, LoadedModel *m, DlError *e);
void model_free(LoadedModel *m);

// The LlamaConfig of an open GGUF file (llama architecture), as a teacher HybridConfig.
int model_gguf_config(const GgufFile *g, HybridConfig *hc, DlError *e);

// What kind of source path is: "gguf", "hf-dir", "config-json", or NULL (with e filled) if none.
const char *model_source_kind(const char *path, DlError *e);

// GGUF llama tensor name <-> HF name ("blk.3.attn_q.weight" <-> "model.layers.3.self_attn.q_proj.weight").
// Return 0, or -1 if the name is not a llama tensor name.
int gguf_name_to_hf(const char *gguf_name, char *out, size_t n);
int hf_name_to_gguf(const char *hf_name, char *out, size_t n);

// llama.cpp's rope permutation of a Q or K weight [n_head*head_dim, in] (rows only, any element size):
// permute maps HF rows to GGUF rows, unpermute undoes it. elem_bytes * in = bytes per row.
void rope_permute_rows(const void *src, void *dst, int n_head, int head_dim, int64_t row_bytes);
void rope_unpermute_rows(const void *src, void *dst, int n_head, int head_dim, int64_t row_bytes);
