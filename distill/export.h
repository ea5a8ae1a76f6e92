// export.h: a model (teacher or hybrid) as a MambaInLlama HF checkpoint directory
// (shared/research/mambainllama.md §4, export.md §4):
//   config.json                    the HF Llama config (architectures LlamaForCausalLM, model_type llama)
//   mamba_config.json              hybrids only: d_model, ssm_cfg, rms_norm_eps, vocab_size (null), d_inner,
//                                  d_xb, intermediate_size, hidden_act, n_layer, attn_layers
//   model.safetensors              or model-0000i-of-0000N.safetensors + model.safetensors.index.json when
//                                  the weights exceed max_shard_bytes; tensors under their registry names
//                                  (= MambaInLlama's), lm_head left out when tied, metadata format=pt
// The directory is built as DIR.tmp-PID and renamed into place, so a failed export never leaves a
// directory that looks complete; an existing DIR is replaced only after the new one is complete.
#pragma once
#include <stdint.h>

#include "distill/common.h"
#include "distill/dtype.h"
#include "distill/model.h"
#include "distill/registry.h"

typedef struct {
    DType dtype;               // DT_F32, DT_BF16 or DT_F16 (round to nearest even)
    uint64_t max_shard_bytes;  // 0: one file
    const char *name_or_path;  // "_name_or_path" of config.json (the teacher); NULL: "distill"
} ExportOptions;

int export_hf(const char *dir, const HybridConfig *h, const Registry *r, const float *params, const ExportOptions *o,
              DlError *e);

// An export directory written atomically (every exporter of a directory): files go into DIR.tmp-PID;
// export_dir_commit renames it to DIR, moving a previous DIR aside and removing it only afterwards;
// export_dir_end removes the temporary directory unless the commit succeeded, and frees the paths.
typedef struct {
    char *final, *tmp, *old;  // DIR without trailing slashes, DIR.tmp-PID, DIR.old-PID
    int committed;
} ExportDir;
int export_dir_begin(ExportDir *d, const char *dir, DlError *e);  // creates DIR.tmp-PID (a stale one is removed)
int export_dir_write_text(const ExportDir *d, const char *name, const char *text, DlError *e);  // text + newline, fsynced
int export_dir_commit(ExportDir *d, DlError *e);
void export_dir_end(ExportDir *d);

// The two JSON texts (newly allocated), for tests and `distill inspect`.
char *export_config_json(const HybridConfig *h, DType dtype, const char *name_or_path);
char *export_mamba_config_json(const HybridConfig *h);
