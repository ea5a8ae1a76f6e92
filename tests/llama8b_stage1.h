// llama8b_stage1.h: the Llama-3-8B shape (recipes/configs/llama3-8b.json) as a 50% Mamba-1 hybrid, attention kept
// in layers 0, 2, ..., 30, with only the Mamba mixers trainable (stage 1): the registry the ZeRO arithmetic tests size.
#pragma once
#include <stdio.h>

#include "distill/model.h"
#include "distill/model_io.h"

// Fills hc and reg (the caller frees reg); 0, or -1 with the reason on stderr.
static inline int llama8b_stage1(HybridConfig *hc, Registry *reg) {
    HybridConfig teacher;
    DlError e;
    int attn[16];
    for (int i = 0; i < 16; i++) attn[i] = 2 * i;
    if (model_read_config("recipes/configs/llama3-8b.json", &teacher, &e) ||
        hybrid_config_init(hc, &teacher.base, MIXER_MAMBA1, attn, 16, &e)) {
        fprintf(stderr, "llama8b_stage1: %s\n", e.msg);
        return -1;
    }
    model_build_registry(hc, reg);
    if (reg_set_trainable(reg, "*.mamba.*", &e) <= 0) {
        fprintf(stderr, "llama8b_stage1: no Mamba tensor to train\n");
        reg_free(reg);
        return -1;
    }
    return 0;
}
