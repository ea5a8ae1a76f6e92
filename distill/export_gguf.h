// export_gguf.h: a MambaInLlama Mamba-2 hybrid as a llama.cpp `granitehybrid` GGUF (shared/research/export.md
// §2.3, §3.3, §3.4; keys and tensor shapes as llama.cpp's src/models/granite-hybrid.cpp loads them):
//   general.architecture = granitehybrid; granitehybrid.{block_count, context_length, embedding_length,
//   feed_forward_length, vocab_size}; attention.{head_count, head_count_kv (per layer: 0 marks a Mamba
//   layer), key_length, value_length, layer_norm_rms_epsilon, scale = 1/sqrt(head_dim)};
//   rope.{dimension_count = head_dim, freq_base}, rope.scaling.finetuned = true (granitehybrid's RoPE switch);
//   ssm.{conv_kernel, inner_size, state_size = head_dim, time_step_rank = heads, group_count = heads};
//   logit_scale = residual_scale = embedding_scale = 1; tokenizer.* copied from the teacher GGUF.
// Tensors: token_embd, output_norm, output (unless tied), blk.N.{attn_norm, ffn_norm, ffn_gate/up/down},
// attention layers blk.N.attn_{q,k,v,output} with Q and K rope-permuted (llama.cpp's NORM rope pairs rows
// 2j, 2j+1; HF pairs j, j + d/2), Mamba layers in the standard Mamba-2 layout (export_granite.h)
// blk.N.ssm_in, ssm_conv1d{.weight,.bias}, ssm_dt.bias, ssm_a = -exp(A_log), ssm_d, ssm_norm {P, heads}, ssm_out.
// Matrices are F16 or Q8_0 (F16 where a row is not a whole number of Q8_0 blocks); norms, biases, the conv and
// the per-head SSM scalars stay F32 (what llama.cpp's converter keeps in F32).
#pragma once
#include "distill/common.h"
#include "distill/dtype.h"
#include "distill/model.h"
#include "distill/registry.h"

typedef struct {
    DType dtype;                 // DT_F16, DT_Q8_0 (or DT_F32, DT_BF16) for the matrices
    const char *tokenizer_gguf;  // GGUF whose tokenizer.* keys are copied (its vocabulary must match); NULL: none
    const char *name;            // general.name; NULL: "distill hybrid"
    // mamba d_inner = expand * hidden_size (zero heads padded). llama.cpp up to at least the llama-cpp-python
    // 0.3.36 sources asserts 2 * n_embd == d_inner for granitehybrid; 0 means 2.
    int expand;
} GgufExportOptions;

// Writes path atomically (path.tmp, rename). Errors name the tensor or key and what was expected.
int export_gguf(const char *path, const HybridConfig *h, const Registry *r, const float *params,
                const GgufExportOptions *o, DlError *e);
