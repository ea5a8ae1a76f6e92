// export.c: see export.h.
#include "distill/export.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "distill/safetensors.h"

static MixerKind hybrid_kind(const HybridConfig *h) {
    for (int l = 0; l < h->base.n_layer; l++)
        if (h->mixer[l] != MIXER_ATTN) return h->mixer[l];
    return MIXER_ATTN;
}

char *export_config_json(const HybridConfig *h, DType dtype, const char *name_or_path) {
    const LlamaConfig *c = &h->base;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "_name_or_path", name_or_path ? name_or_path : "distill");
    cJSON *arch = cJSON_AddArrayToObject(o, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(o, "model_type", "llama");
    cJSON_AddBoolToObject(o, "attention_bias", false);
    cJSON_AddNumberToObject(o, "attention_dropout", 0.0);
    if (c->bos_id >= 0) cJSON_AddNumberToObject(o, "bos_token_id", c->bos_id);
    if (c->eos_id >= 0) cJSON_AddNumberToObject(o, "eos_token_id", c->eos_id);
    cJSON_AddNumberToObject(o, "head_dim", c->head_dim);
    cJSON_AddStringToObject(o, "hidden_act", "silu");
    cJSON_AddNumberToObject(o, "hidden_size", c->d_model);
    cJSON_AddNumberToObject(o, "initializer_range", 0.02);
    cJSON_AddNumberToObject(o, "intermediate_size", c->d_ff);
    cJSON_AddNumberToObject(o, "max_position_embeddings", c->max_pos);
    cJSON_AddBoolToObject(o, "mlp_bias", false);
    cJSON_AddNumberToObject(o, "num_attention_heads", c->n_head);
    cJSON_AddNumberToObject(o, "num_hidden_layers", c->n_layer);
    cJSON_AddNumberToObject(o, "num_key_value_heads", c->n_kv_head);
    cJSON_AddNumberToObject(o, "pretraining_tp", 1);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->rms_eps);
    if (c->rope_factor > 0) {
        cJSON *rs = cJSON_AddObjectToObject(o, "rope_scaling");
        cJSON_AddNumberToObject(rs, "factor", c->rope_factor);
        cJSON_AddNumberToObject(rs, "high_freq_factor", c->rope_high_freq_factor);
        cJSON_AddNumberToObject(rs, "low_freq_factor", c->rope_low_freq_factor);
        cJSON_AddNumberToObject(rs, "original_max_position_embeddings", c->rope_orig_max_pos);
        cJSON_AddStringToObject(rs, "rope_type", "llama3");
    } else {
        cJSON_AddNullToObject(o, "rope_scaling");
    }
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tied_embeddings);
    cJSON_AddStringToObject(o, "torch_dtype", dtype == DT_BF16 ? "bfloat16" : dtype == DT_F16 ? "float16" : "float32");
    cJSON_AddBoolToObject(o, "use_cache", true);
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab);
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    return s;
}

char *export_mamba_config_json(const HybridConfig *h) {
    const LlamaConfig *c = &h->base;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "d_model", c->d_model);
    cJSON *ssm = cJSON_AddObjectToObject(o, "ssm_cfg");
    cJSON_AddNumberToObject(ssm, "expand", 1);
    if (hybrid_kind(h) == MIXER_MAMBA2) {  // MambaInLlama's Mamba-2: one group per head, d_state = head_dim
        cJSON_AddNumberToObject(ssm, "ngroups", c->n_head);
        cJSON_AddNumberToObject(ssm, "d_state", h->d_state);
    }
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->rms_eps);
    cJSON_AddNullToObject(o, "vocab_size");
    cJSON_AddNumberToObject(o, "d_inner", h->d_inner);
    cJSON_AddNumberToObject(o, "d_xb", h->d_xb);
    cJSON_AddNumberToObject(o, "intermediate_size", c->d_ff);
    cJSON_AddStringToObject(o, "hidden_act", "silu");
    cJSON_AddNumberToObject(o, "n_layer", c->n_layer);
    cJSON *al = cJSON_AddArrayToObject(o, "attn_layers");
    for (int l = 0; l < c->n_layer; l++)
        if (h->mixer[l] == MIXER_ATTN) cJSON_AddItemToArray(al, cJSON_CreateNumber(l));
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    return s;
}

int export_dir_begin(ExportDir *d, const char *dir, DlError *e) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    d->final = dl_malloc(n + 1), d->tmp = dl_malloc(n + 32), d->old = dl_malloc(n + 32), d->committed = 0;
    memcpy(d->final, dir, n);
    d->final[n] = 0;
    snprintf(d->tmp, n + 32, "%s.tmp-%d", d->final, (int)getpid());
    snprintf(d->old, n + 32, "%s.old-%d", d->final, (int)getpid());
    dl_remove_tree(d->tmp);
    return dl_mkdirs(d->tmp, e);
}

int export_dir_write_text(const ExportDir *d, const char *name, const char *text, DlError *e) {
    char *p = dl_path_join(d->tmp, name);
    FILE *f = fopen(p, "wb");
    int rc = 0;
    if (!f) rc = dl_fail(e, "%s: cannot create: %s", p, strerror(errno));
    else {
        size_t n = strlen(text);
        if (fwrite(text, 1, n, f) != n || fputc('\n', f) == EOF || fflush(f) || fsync(fileno(f)))
            rc = dl_fail(e, "%s: write failed: %s", p, strerror(errno));
        if (fclose(f) && !rc) rc = dl_fail(e, "%s: close failed: %s", p, strerror(errno));
    }
    free(p);
    return rc;
}

// DIR -> DIR.old, tmp -> DIR, remove DIR.old (a failed second rename puts DIR back)
int export_dir_commit(ExportDir *d, DlError *e) {
    bool had = dl_file_exists(d->final);
    if (had && rename(d->final, d->old) != 0)
        return dl_fail(e, "export: cannot move the previous %s aside: %s", d->final, strerror(errno));
    if (rename(d->tmp, d->final) != 0) {
        dl_fail(e, "export: cannot rename %s to %s: %s", d->tmp, d->final, strerror(errno));
        if (had) rename(d->old, d->final);
        return -1;
    }
    if (had) dl_remove_tree(d->old);
    d->committed = 1;
    return 0;
}

void export_dir_end(ExportDir *d) {
    if (d->tmp && !d->committed) dl_remove_tree(d->tmp);
    free(d->final), free(d->tmp), free(d->old);
    d->final = d->tmp = d->old = NULL;
}

int export_hf(const char *dir, const HybridConfig *h, const Registry *r, const float *params, const ExportOptions *o,
              DlError *e) {
    if (o->dtype != DT_F32 && o->dtype != DT_BF16 && o->dtype != DT_F16)
        return dl_fail(e, "export: dtype %s not supported (f32, bf16 or f16)", dtype_name(o->dtype));
    int rc = -1;
    StWriteTensor *wt = dl_calloc((size_t)(r->n ? r->n : 1), sizeof *wt);
    void **bufs = dl_calloc((size_t)(r->n ? r->n : 1), sizeof *bufs);
    char *cfg = NULL, *mcfg = NULL;
    ExportDir d;
    if (export_dir_begin(&d, dir, e)) goto out;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        const float *src = params + t->offset;
        wt[i] = (StWriteTensor){t->name, o->dtype, t->ndim, t->shape, src};
        if (o->dtype == DT_F32) continue;
        uint16_t *b = dl_malloc((size_t)t->numel * 2);
        for (int64_t k = 0; k < t->numel; k++) b[k] = o->dtype == DT_BF16 ? f32_to_bf16(src[k]) : f32_to_f16(src[k]);
        bufs[i] = b;
        wt[i].data = b;
    }
    const char *meta[2] = {"format", "pt"};
    int n_shards = 0;
    if (st_write_sharded(d.tmp, wt, r->n, o->max_shard_bytes ? o->max_shard_bytes : UINT64_MAX / 4, meta, 1, &n_shards, e))
        goto out;
    cfg = export_config_json(h, o->dtype, o->name_or_path);
    if (export_dir_write_text(&d, "config.json", cfg, e)) goto out;
    if (hybrid_n_attn(h) < h->base.n_layer) {
        mcfg = export_mamba_config_json(h);
        if (export_dir_write_text(&d, "mamba_config.json", mcfg, e)) goto out;
    }
    rc = export_dir_commit(&d, e);
out:
    export_dir_end(&d);
    for (int i = 0; i < r->n; i++) free(bufs[i]);
    free(bufs);
    free(wt);
    cJSON_free(cfg);
    cJSON_free(mcfg);
    return rc;
}
