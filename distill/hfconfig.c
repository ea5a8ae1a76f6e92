// hfconfig.c: HF config.json and MambaInLlama mamba_config.json parsing (see hfconfig.h).
#include "distill/hfconfig.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>

// Integer member: absent/null -> def (or error if required); must be an integral number in [lo, hi].
static int get_int(const cJSON *o, const char *key, bool required, int64_t def, int64_t lo, int64_t hi, int64_t *out,
                   const char *label, DlError *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        if (required) return dl_fail(e, "%s: \"%s\" is missing (expected an integer)", label, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return dl_fail(e, "%s: \"%s\" must be an integer", label, key);
    double d = v->valuedouble;
    if (!(d >= (double)lo && d <= (double)hi))
        return dl_fail(e, "%s: \"%s\" = %.17g is out of range (expected %lld..%lld)", label, key, d, (long long)lo, (long long)hi);
    *out = (int64_t)d;
    return 0;
}

static int get_num(const cJSON *o, const char *key, bool required, double def, double *out, const char *label, DlError *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        if (required) return dl_fail(e, "%s: \"%s\" is missing (expected a number)", label, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return dl_fail(e, "%s: \"%s\" must be a finite number", label, key);
    *out = v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *o, const char *key, bool def, bool *out, const char *label, DlError *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v)) return dl_fail(e, "%s: \"%s\" must be true or false", label, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

// bos/eos ids: an integer, or a list (Llama 3.1 lists several eos ids; the first is the main one).
static int get_token_id(const cJSON *o, const char *key, int *out, const char *label, DlError *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    *out = -1;
    if (!v || cJSON_IsNull(v)) return 0;
    if (cJSON_IsArray(v)) v = v->child;
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 || v->valuedouble > INT32_MAX)
        return dl_fail(e, "%s: \"%s\" must be a non-negative integer or a list of them", label, key);
    *out = (int)v->valuedouble;
    return 0;
}

static cJSON *parse_object(const char *json, size_t len, const char *label, DlError *e) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root) {
        const char *ep = cJSON_GetErrorPtr();
        int line = 1;
        if (ep && ep >= json && ep <= json + len)
            for (const char *p = json; p < ep; p++) line += *p == '\n';
        dl_fail(e, "%s:%d: not valid JSON", label, line);
        return NULL;
    }
    for (const char *p = end; p && p < json + len; p++)
        if (*p != ' ' && *p != '\n' && *p != '\r' && *p != '\t' && *p != 0) {
            cJSON_Delete(root);
            dl_fail(e, "%s: unexpected text after the JSON object", label);
            return NULL;
        }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        dl_fail(e, "%s: expected a JSON object", label);
        return NULL;
    }
    return root;
}

static int parse_config(const cJSON *o, const char *label, LlamaConfig *c, DlError *e) {
    memset(c, 0, sizeof *c);
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(o, "model_type");
    if (mt && !cJSON_IsString(mt)) return dl_fail(e, "%s: \"model_type\" must be a string", label);
    if (mt && strcmp(mt->valuestring, "llama") && strcmp(mt->valuestring, "mistral"))
        return dl_fail(e, "%s: model_type \"%s\" is not supported (expected \"llama\" or \"mistral\")", label, mt->valuestring);
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(o, "hidden_act");
    if (act && !cJSON_IsNull(act) && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu")))
        return dl_fail(e, "%s: \"hidden_act\" must be \"silu\" (SwiGLU MLP)", label);
    bool ab, mb;
    if (get_bool(o, "attention_bias", false, &ab, label, e) || get_bool(o, "mlp_bias", false, &mb, label, e)) return -1;
    if (ab || mb) return dl_fail(e, "%s: attention_bias/mlp_bias = true is not supported (Llama has no biases)", label);
    int64_t v;
    const int64_t BIG = (int64_t)1 << 30;
#define INT_FIELD(key, req, def, lo, hi, dst) \
    if (get_int(o, key, req, def, lo, hi, &v, label, e)) return -1; \
    dst = (int)v;
    INT_FIELD("hidden_size", true, 0, 1, BIG, c->d_model);
    INT_FIELD("num_hidden_layers", true, 0, 1, DL_MAX_LAYERS, c->n_layer);
    INT_FIELD("num_attention_heads", true, 0, 1, 1 << 16, c->n_head);
    INT_FIELD("num_key_value_heads", false, c->n_head, 1, 1 << 16, c->n_kv_head);
    INT_FIELD("head_dim", false, c->d_model / c->n_head, 1, 1 << 16, c->head_dim);
    INT_FIELD("intermediate_size", true, 0, 1, BIG, c->d_ff);
    INT_FIELD("vocab_size", true, 0, 1, BIG, c->vocab);
    INT_FIELD("max_position_embeddings", false, 2048, 1, BIG, c->max_pos);
#undef INT_FIELD
    // transformers >= 5 writes "rope_parameters" {rope_theta, rope_type, factor, ...} instead of the
    // top-level "rope_theta" and "rope_scaling"; both spellings are read (top-level wins).
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(o, "rope_parameters");
    if (rp && !cJSON_IsNull(rp) && !cJSON_IsObject(rp)) return dl_fail(e, "%s: \"rope_parameters\" must be an object", label);
    if (rp && !cJSON_IsObject(rp)) rp = NULL;
    double theta_default = 10000.0;
    if (rp && get_num(rp, "rope_theta", false, 10000.0, &theta_default, label, e)) return dl_fail_prefix(e, "rope_parameters: ");
    if (get_num(o, "rope_theta", false, theta_default, &c->rope_theta, label, e) ||
        get_num(o, "rms_norm_eps", false, 1e-6, &c->rms_eps, label, e) ||
        get_bool(o, "tie_word_embeddings", false, &c->tied_embeddings, label, e) ||
        get_token_id(o, "bos_token_id", &c->bos_id, label, e) || get_token_id(o, "eos_token_id", &c->eos_id, label, e))
        return -1;
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(o, "rope_scaling");
    if ((!rs || cJSON_IsNull(rs)) && rp) rs = rp;
    if (rs && !cJSON_IsNull(rs)) {
        const char *rname = rs == rp ? "rope_parameters" : "rope_scaling";
        if (!cJSON_IsObject(rs)) return dl_fail(e, "%s: \"%s\" must be an object or null", label, rname);
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
        if (!ty) ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
        if (!ty && rs == rp) {
            // rope_parameters with only rope_theta: no scaling
        } else if (!cJSON_IsString(ty)) return dl_fail(e, "%s: %s needs a string \"rope_type\"", label, rname);
        else if (!strcmp(ty->valuestring, "default")) {
            // same as no scaling
        } else if (!strcmp(ty->valuestring, "llama3")) {
            int64_t omp;
            if (get_num(rs, "factor", true, 0, &c->rope_factor, label, e) ||
                get_num(rs, "low_freq_factor", true, 0, &c->rope_low_freq_factor, label, e) ||
                get_num(rs, "high_freq_factor", true, 0, &c->rope_high_freq_factor, label, e) ||
                get_int(rs, "original_max_position_embeddings", true, 0, 1, BIG, &omp, label, e))
                return dl_fail_prefix(e, "%s: ", rname);
            c->rope_orig_max_pos = (int)omp;
            if (!(c->rope_factor >= 1) || !(c->rope_low_freq_factor > 0) || !(c->rope_high_freq_factor > c->rope_low_freq_factor))
                return dl_fail(e, "%s: %s: need factor >= 1 and high_freq_factor > low_freq_factor > 0", label, rname);
        } else {
            return dl_fail(e, "%s: %s type \"%s\" is not supported (expected \"llama3\", \"default\" or null)", label, rname, ty->valuestring);
        }
    }
    if (c->d_model % c->n_head && !cJSON_GetObjectItemCaseSensitive(o, "head_dim"))
        return dl_fail(e, "%s: hidden_size %d is not a multiple of num_attention_heads %d (give head_dim)", label, c->d_model, c->n_head);
    if ((int64_t)c->n_head * c->head_dim > BIG || (int64_t)c->n_kv_head * c->head_dim > BIG)
        return dl_fail(e, "%s: num_attention_heads * head_dim is absurdly large", label);
    if (llama_config_validate(c, e)) return dl_fail_prefix(e, "%s: ", label);
    return 0;
}

int hf_config_parse(const char *json, size_t len, const char *label, LlamaConfig *c, DlError *e) {
    cJSON *root = parse_object(json, len, label, e);
    if (!root) return -1;
    int rc = parse_config(root, label, c, e);
    cJSON_Delete(root);
    return rc;
}

int hf_config_load(const char *path, LlamaConfig *c, DlError *e) {
    size_t len;
    char *txt = dl_read_file(path, &len, e);
    if (!txt) return -1;
    int rc = hf_config_parse(txt, len, path, c, e);
    free(txt);
    return rc;
}

int hf_config_init_range(const char *json, size_t len, double *out) {
    *out = 0.02;
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) return -1;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "initializer_range");
    if (cJSON_IsNumber(v) && v->valuedouble > 0 && isfinite(v->valuedouble)) *out = v->valuedouble;
    cJSON_Delete(root);
    return 0;
}

int hf_mamba_config_parse(const char *json, size_t len, const char *label, const LlamaConfig *base, HybridConfig *h,
                          DlError *e) {
    cJSON *o = parse_object(json, len, label, e);
    if (!o) return -1;
    int rc = 0;
    int64_t v;
    const int64_t q = (int64_t)base->n_head * base->head_dim, kv = (int64_t)base->n_kv_head * base->head_dim;
    int attn[DL_MAX_LAYERS];
    int n_attn = 0;
    MixerKind kind = MIXER_MAMBA1;
    const cJSON *ssm = cJSON_GetObjectItemCaseSensitive(o, "ssm_cfg");
    const cJSON *al = cJSON_GetObjectItemCaseSensitive(o, "attn_layers");
    if (ssm && !cJSON_IsNull(ssm) && !cJSON_IsObject(ssm)) { rc = dl_fail(e, "%s: \"ssm_cfg\" must be an object", label); goto done; }
    if (get_int(o, "d_model", false, base->d_model, base->d_model, base->d_model, &v, label, e)) { rc = dl_fail_prefix(e, "(must equal config.json hidden_size) "); goto done; }
    if (get_int(o, "n_layer", false, base->n_layer, base->n_layer, base->n_layer, &v, label, e)) { rc = dl_fail_prefix(e, "(must equal num_hidden_layers) "); goto done; }
    if (get_int(o, "d_inner", false, q, q, q, &v, label, e)) { rc = dl_fail_prefix(e, "(must equal num_attention_heads*head_dim) "); goto done; }
    if (get_int(o, "d_xb", false, kv, kv, kv, &v, label, e)) { rc = dl_fail_prefix(e, "(must equal num_key_value_heads*head_dim) "); goto done; }
    if (ssm && cJSON_IsObject(ssm)) {
        if (get_int(ssm, "expand", false, 1, 1, 1, &v, label, e)) { rc = dl_fail_prefix(e, "ssm_cfg: "); goto done; }
        if (cJSON_GetObjectItemCaseSensitive(ssm, "ngroups")) {
            kind = MIXER_MAMBA2;
            if (get_int(ssm, "ngroups", true, 0, base->n_head, base->n_head, &v, label, e) ||
                get_int(ssm, "d_state", false, base->head_dim, base->head_dim, base->head_dim, &v, label, e)) {
                rc = dl_fail_prefix(e, "ssm_cfg (Mamba-2 needs ngroups = num_attention_heads, d_state = head_dim): ");
                goto done;
            }
        } else if (get_int(ssm, "d_state", false, 16, 16, 16, &v, label, e)) {
            rc = dl_fail_prefix(e, "ssm_cfg (Mamba-1 uses d_state 16): ");
            goto done;
        }
    }
    if (al && !cJSON_IsNull(al)) {
        if (!cJSON_IsArray(al)) { rc = dl_fail(e, "%s: \"attn_layers\" must be a list of layer indices", label); goto done; }
        for (const cJSON *x = al->child; x; x = x->next) {
            if (!cJSON_IsNumber(x) || x->valuedouble != floor(x->valuedouble) || x->valuedouble < 0 || x->valuedouble >= base->n_layer) {
                rc = dl_fail(e, "%s: attn_layers entries must be integers in 0..%d", label, base->n_layer - 1);
                goto done;
            }
            if (n_attn == DL_MAX_LAYERS) { rc = dl_fail(e, "%s: attn_layers has more than %d entries", label, DL_MAX_LAYERS); goto done; }
            attn[n_attn++] = (int)x->valuedouble;
        }
    }
    if (hybrid_config_init(h, base, kind, attn, n_attn, e)) rc = dl_fail_prefix(e, "%s: ", label);
done:
    cJSON_Delete(o);
    return rc;
}
