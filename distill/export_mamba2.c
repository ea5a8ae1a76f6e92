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
