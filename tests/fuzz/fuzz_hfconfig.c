// fuzz_hfconfig.c: libFuzzer target for the HF config.json parser and the MambaInLlama mamba_config.json
// parser (the input is parsed as both; a valid config is also expanded into its registry).
#include <stdint.h>
#include <stdlib.h>

#include "distill/hfconfig.h"
#include "distill/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    DlError e;
    LlamaConfig c;
    double r;
    hf_config_init_range((const char *)data, size, &r);
    if (hf_config_parse((const char *)data, size, "fuzz", &c, &e)) {
        // still exercise the mamba parser against a fixed small base
        LlamaConfig b = {.n_layer = 4, .d_model = 64, .n_head = 4, .n_kv_head = 2, .head_dim = 16, .d_ff = 128,
                         .vocab = 100, .max_pos = 64, .rope_theta = 1e4, .rms_eps = 1e-5};
        HybridConfig h;
        hf_mamba_config_parse((const char *)data, size, "fuzz", &b, &h, &e);
        return 0;
    }
    HybridConfig h;
    if (hf_mamba_config_parse((const char *)data, size, "fuzz", &c, &h, &e)) hybrid_config_teacher(&h, &c);
    // a registry of a small parsed config must build (bounded: the registry is not the parser under test,
    // and large layouts only slow the fuzzer down)
    if (c.n_layer <= 8 && (int64_t)c.vocab * c.d_model < (1 << 20) && (int64_t)c.d_model * c.d_ff < (1 << 20)) {
        Registry reg;
        model_build_registry(&h, &reg);
        reg_free(&reg);
    }
    return 0;
}
