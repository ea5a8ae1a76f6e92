// test_registry.c: the tensor registry and the teacher/hybrid parameter layout.
#include <string.h>

#include "distill/model.h"
#include "tests/check.h"

static LlamaConfig smollm2(void) {
    LlamaConfig c = {.n_layer = 30, .d_model = 576, .n_head = 9, .n_kv_head = 3, .head_dim = 64, .d_ff = 1536,
                     .vocab = 49152, .max_pos = 8192, .rope_theta = 100000, .rms_eps = 1e-5, .tied_embeddings = true};
    return c;
}

int main(void) {
    LlamaConfig c = smollm2();
    HybridConfig t;
    hybrid_config_teacher(&t, &c);
    Registry r;
    model_build_registry(&t, &r);
    // SmolLM2-135M has 134,515,008 parameters (tied embeddings)
    CHECK_EQ_I64(reg_params_numel(&r), 134515008);
    CHECK(reg_find(&r, "lm_head.weight") < 0);
    int q = reg_find(&r, "model.layers.29.self_attn.q_proj.weight");
    CHECK(q >= 0 && r.t[q].shape[0] == 576 && r.t[q].shape[1] == 576 && r.t[q].layer == 29);
    for (int i = 0; i < r.n; i++) CHECK(r.t[i].offset % DL_TENSOR_ALIGN == 0);
    for (int i = 1; i < r.n; i++) CHECK(r.t[i].offset >= r.t[i - 1].offset + r.t[i - 1].numel);
    reg_free(&r);

    // 50% hybrid: odd layers keep attention (as MambaInLlama's 50% recipes)
    int attn[15];
    for (int i = 0; i < 15; i++) attn[i] = 2 * i + 1;
    HybridConfig h;
    DlError e;
    CHECK(hybrid_config_init(&h, &c, MIXER_MAMBA1, attn, 15, &e) == 0);
    CHECK_EQ_I64(h.d_inner, 576);
    CHECK_EQ_I64(h.d_xb, 192);
    CHECK_EQ_I64(h.dt_rank, 36);
    model_build_registry(&h, &r);
    int a = reg_find(&r, "model.layers.0.mamba.A_log");
    CHECK(a >= 0 && r.t[a].shape[0] == 576 && r.t[a].shape[1] == 16 && !r.t[a].decay);
    CHECK(reg_find(&r, "model.layers.1.self_attn.k_proj.weight") >= 0);
    CHECK(reg_find(&r, "model.layers.0.self_attn.k_proj.weight") < 0);
    int Dt = reg_find(&r, "model.layers.0.mamba.D");
    CHECK(Dt >= 0 && !r.t[Dt].decay);
    CHECK(r.t[reg_find(&r, "model.layers.0.mamba.in_proj_z.weight")].decay);
    // trainable patterns: only Mamba mixers
    CHECK(reg_set_trainable(&r, "*.mamba.*", &e) > 0);
    CHECK(!r.t[reg_find(&r, "model.embed_tokens.weight")].trainable);
    CHECK(r.t[a].trainable);
    CHECK(reg_set_trainable(&r, "*.mamba.*,nothing.matches", &e) < 0);
    CHECK(strstr(e.msg, "nothing.matches") != NULL);
    // bad layer lists
    int bad[2] = {3, 3};
    CHECK(hybrid_config_init(&h, &c, MIXER_MAMBA1, bad, 2, &e) < 0);
    bad[0] = 30;
    CHECK(hybrid_config_init(&h, &c, MIXER_MAMBA1, bad, 1, &e) < 0);
    reg_free(&r);
    return check_report("test_registry");
}
