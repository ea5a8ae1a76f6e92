// export_mamba2.c: see export_mamba2.h.
#include "distill/export_mamba2.h"

int export_mambainllama_mamba2(const char *dir, const HybridConfig *h, const Registry *r, const float *params,
                               const ExportOptions *o, DlError *e) {
    int n_m2 = 0;
    for (int l = 0; l < h->base.n_layer; l++) {
        if (h->mixer[l] == MIXER_MAMBA1)
            return dl_fail(e, "export: layer %d is a Mamba-1 layer; the MambaInLlama Mamba-2 format holds Mamba-2 "
                              "layers only (export a Mamba-1 hybrid with --format mambainllama)", l);
        n_m2 += h->mixer[l] == MIXER_MAMBA2;
    }
    if (!n_m2) return dl_fail(e, "export: the model has no Mamba-2 layer (a teacher); nothing MambaInLlama-specific to write");
    if (h->d_state != h->base.head_dim)
        return dl_fail(e, "export: d_state %d != head_dim %d; MambaInLlama's Mamba-2 forces d_state = head_dim", h->d_state,
                       h->base.head_dim);
    return export_hf(dir, h, r, params, o, e);
}

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int export_add_hf_code(const char *dir, const HybridConfig *h, const char *hf_dir, DlError *e) {
    for (int l = 0; l < h->base.n_layer; l++)
        if (h->mixer[l] == MIXER_MAMBA2)
            return dl_fail(e, "export: --hf-code is for Mamba-1 hybrids; Mamba-2 hybrids load in transformers as "
                              "--format granite");
    const char *files[2] = {"modeling_mambainllama.py", "configuration_mambainllama.py"};
    for (int i = 0; i < 2; i++) {
        char *src = dl_path_join(hf_dir, files[i]), *dst = dl_path_join(dir, files[i]);
        size_t n;
        char *txt = dl_read_file(src, &n, e);
        int rc = txt ? dl_write_file_atomic(dst, txt, n, e) : -1;
        free(txt), free(src), free(dst);
        if (rc) return -1;
    }
    char *cp = dl_path_join(dir, "config.json"), *mp = dl_path_join(dir, "mamba_config.json");
    size_t n1, n2;
    char *ct = dl_read_file(cp, &n1, e), *mt = ct ? dl_read_file(mp, &n2, e) : NULL;
    cJSON *c = mt ? cJSON_Parse(ct) : NULL, *m = c ? cJSON_Parse(mt) : NULL;
    int rc = -1;
    if (!m) {
        if (mt) dl_fail(e, "export: %s or %s is not valid JSON", cp, mp);
        goto out;
    }
    cJSON_AddNumberToObject(m, "d_state", h->d_state);
    cJSON_AddNumberToObject(m, "d_conv", h->d_conv);
    cJSON_AddNumberToObject(m, "dt_rank", h->dt_rank);
    cJSON_AddItemToObject(c, "mamba_config", m);
    m = NULL;
    cJSON *am = cJSON_AddObjectToObject(c, "auto_map");
    cJSON_AddStringToObject(am, "AutoConfig", "configuration_mambainllama.MambaInLlamaConfig");
    cJSON_AddStringToObject(am, "AutoModelForCausalLM", "modeling_mambainllama.MambaInLlamaForCausalLM");
    char *txt = cJSON_Print(c);
    rc = dl_write_file_atomic(cp, txt, strlen(txt), e);
    cJSON_free(txt);
out:
    cJSON_Delete(c), cJSON_Delete(m);
    free(ct), free(mt), free(cp), free(mp);
    return rc;
}
