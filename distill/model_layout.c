// model_layout.c: configs and the parameter layout of teachers and hybrids (see model.h).
#include <string.h>

#include "distill/model.h"

const char *mixer_name(MixerKind k) {
    switch (k) {
    case MIXER_ATTN: return "attention";
    case MIXER_MAMBA1: return "mamba1";
    case MIXER_MAMBA2: return "mamba2";
    }
    return "?";
}

int llama_config_validate(const LlamaConfig *c, DlError *e) {
    if (c->n_layer <= 0 || c->n_layer > DL_MAX_LAYERS)
        return dl_fail(e, "num_hidden_layers = %d, expected 1..%d", c->n_layer, DL_MAX_LAYERS);
    if (c->d_model <= 0 || c->n_head <= 0 || c->n_kv_head <= 0 || c->head_dim <= 0 || c->d_ff <= 0 || c->vocab <= 0)
        return dl_fail(e, "sizes must be positive (hidden %d, heads %d, kv heads %d, head_dim %d, intermediate %d, vocab %d)",
                       c->d_model, c->n_head, c->n_kv_head, c->head_dim, c->d_ff, c->vocab);
    if (c->n_head % c->n_kv_head)
        return dl_fail(e, "num_attention_heads %d is not a multiple of num_key_value_heads %d", c->n_head, c->n_kv_head);
    if (c->head_dim % 2) return dl_fail(e, "head_dim %d must be even for RoPE", c->head_dim);
    if (!(c->rope_theta > 0)) return dl_fail(e, "rope_theta must be positive");
    if (!(c->rms_eps > 0)) return dl_fail(e, "rms_norm_eps must be positive");
    return 0;
}

static void mamba_dims(HybridConfig *h, MixerKind kind) {
    const LlamaConfig *c = &h->base;
    h->d_inner = c->n_head * c->head_dim;
    h->d_xb = c->n_kv_head * c->head_dim;
    h->d_conv = 4;
    h->d_state = kind == MIXER_MAMBA2 ? c->head_dim : 16;
    h->dt_rank = (c->d_model + 15) / 16;
}

void hybrid_config_teacher(HybridConfig *h, const LlamaConfig *c) {
    memset(h, 0, sizeof *h);
    h->base = *c;
    for (int i = 0; i < c->n_layer; i++) h->mixer[i] = MIXER_ATTN;
    mamba_dims(h, MIXER_MAMBA1);
}

int hybrid_config_init(HybridConfig *h, const LlamaConfig *c, MixerKind kind, const int *attn_layers, int n_attn,
                       DlError *e) {
    if (llama_config_validate(c, e)) return -1;
    memset(h, 0, sizeof *h);
    h->base = *c;
    for (int i = 0; i < c->n_layer; i++) h->mixer[i] = kind;
    for (int k = 0; k < n_attn; k++) {
        int l = attn_layers[k];
        if (l < 0 || l >= c->n_layer) return dl_fail(e, "attn_layers: layer %d out of range 0..%d", l, c->n_layer - 1);
        if (h->mixer[l] == MIXER_ATTN) return dl_fail(e, "attn_layers: layer %d listed twice", l);
        h->mixer[l] = MIXER_ATTN;
    }
    mamba_dims(h, kind);
    if (kind == MIXER_MAMBA1 && (h->d_inner % h->d_state || h->d_xb % h->d_state))
        return dl_fail(e, "Mamba-1 needs n_head*head_dim (%d) and n_kv_head*head_dim (%d) to be multiples of d_state %d",
                       h->d_inner, h->d_xb, h->d_state);
    return 0;
}

int hybrid_n_attn(const HybridConfig *h) {
    int n = 0;
    for (int i = 0; i < h->base.n_layer; i++) n += h->mixer[i] == MIXER_ATTN;
    return n;
}

#define ADD(role, layer, name, ...) \
    reg_addf(r, role, layer, (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[]){__VA_ARGS__}, "%s", name)

static void add_layer_tensor(Registry *r, TensorRole role, int layer, const char *suffix, int ndim, const int64_t *dims) {
    reg_addf(r, role, layer, ndim, dims, "model.layers.%d.%s", layer, suffix);
}
#define LT(role, suffix, ...) \
    add_layer_tensor(r, role, l, suffix, (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[]){__VA_ARGS__})

void model_build_registry(const HybridConfig *h, Registry *r) {
    const LlamaConfig *c = &h->base;
    const int64_t d = c->d_model, V = c->vocab, ff = c->d_ff;
    const int64_t q = (int64_t)c->n_head * c->head_dim, kv = (int64_t)c->n_kv_head * c->head_dim;
    const int64_t di = h->d_inner, dxb = h->d_xb, N = h->d_state, R = h->dt_rank, W = h->d_conv;
    reg_init(r);
    ADD(ROLE_EMBED, -1, "model.embed_tokens.weight", V, d);
    for (int l = 0; l < c->n_layer; l++) {
        LT(ROLE_NORM, "input_layernorm.weight", d);
        switch (h->mixer[l]) {
        case MIXER_ATTN:
            LT(ROLE_ATTN, "self_attn.q_proj.weight", q, d);
            LT(ROLE_ATTN, "self_attn.k_proj.weight", kv, d);
            LT(ROLE_ATTN, "self_attn.v_proj.weight", kv, d);
            LT(ROLE_ATTN, "self_attn.o_proj.weight", d, q);
            break;
        case MIXER_MAMBA1:
            LT(ROLE_MAMBA, "mamba.in_proj_z.weight", di, d);
            LT(ROLE_MAMBA, "mamba.in_proj_x.weight", dxb, d);
            LT(ROLE_MAMBA, "mamba.B_proj.weight", dxb, d);
            LT(ROLE_MAMBA, "mamba.C_proj.weight", di, d);
            LT(ROLE_MAMBA, "mamba.dt_proj_down.weight", R, d);
            LT(ROLE_MAMBA, "mamba.dt_proj.weight", di, R);
            LT(ROLE_MAMBA, "mamba.dt_proj.bias", di);
            LT(ROLE_MAMBA, "mamba.conv1d.weight", di, 1, W);
            LT(ROLE_MAMBA, "mamba.conv1d.bias", di);
            LT(ROLE_MAMBA, "mamba.A_log", di, N);
            LT(ROLE_MAMBA, "mamba.D", di);
            LT(ROLE_MAMBA, "mamba.out_proj.weight", d, di);
            break;
        case MIXER_MAMBA2: {
            const int64_t nh = c->n_head, xbc = dxb + dxb + di;
            LT(ROLE_MAMBA, "mamba.in_proj.weight", di + xbc + nh, d);  // rows [z, x, B, C, dt]
            LT(ROLE_MAMBA, "mamba.conv1d.weight", xbc, 1, W);
            LT(ROLE_MAMBA, "mamba.conv1d.bias", xbc);
            LT(ROLE_MAMBA, "mamba.dt_bias", nh);
            LT(ROLE_MAMBA, "mamba.A_log", nh);
            LT(ROLE_MAMBA, "mamba.D", nh);
            LT(ROLE_MAMBA, "mamba.norm.weight", di);
            LT(ROLE_MAMBA, "mamba.out_proj.weight", d, di);
            break;
        }
        }
        LT(ROLE_NORM, "post_attention_layernorm.weight", d);
        LT(ROLE_MLP, "mlp.gate_proj.weight", ff, d);
        LT(ROLE_MLP, "mlp.up_proj.weight", ff, d);
        LT(ROLE_MLP, "mlp.down_proj.weight", d, ff);
    }
    ADD(ROLE_NORM, -1, "model.norm.weight", d);
    if (!c->tied_embeddings) ADD(ROLE_HEAD, -1, "lm_head.weight", V, d);
    // A_log, D, dt biases, conv biases and norm weights are not decayed (as in mamba_ssm's _no_weight_decay)
    for (int i = 0; i < r->n; i++) {
        TensorInfo *t = &r->t[i];
        if (strstr(t->name, "A_log") || strstr(t->name, ".D") == t->name + strlen(t->name) - 2 || strstr(t->name, "bias"))
            t->decay = false;
    }
}

int64_t mixer_param_count(const HybridConfig *h, int layer) {
    Registry r;
    model_build_registry(h, &r);
    char prefix[64];
    int n = snprintf(prefix, sizeof prefix, "model.layers.%d.", layer);
    int64_t total = 0;
    for (int i = 0; i < r.n; i++) {
        const char *nm = r.t[i].name;
        if (strncmp(nm, prefix, n) == 0 && (r.t[i].role == ROLE_ATTN || r.t[i].role == ROLE_MAMBA)) total += r.t[i].numel;
    }
    reg_free(&r);
    return total;
}
