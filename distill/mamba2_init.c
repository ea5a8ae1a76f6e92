// mamba2_init.c: attention -> MambaInLlama Mamba-2 initialization of one layer (see mamba2_cpu.h and
// shared/research/mambainllama.md §1b: mamba2/hybrid_wrapper.py copies v/k/q/o; the rest keeps the
// module's default init).
#include <math.h>
#include <string.h>

#include "distill/mamba2_cpu.h"

// One stream per random tensor, derived from a single draw of the caller's generator.
enum { S_Z = 1, S_DT, S_DTB, S_ALOG, S_CONVW, S_CONVB };

static const TensorInfo *tensor(const Registry *r, int layer, const char *suffix, char *name, size_t n) {
    snprintf(name, n, "model.layers.%d.%s", layer, suffix);
    int i = reg_find(r, name);
    return i < 0 ? NULL : &r->t[i];
}

// Expects tensor `suffix` of layer `layer` in r with exactly the given shape.
static const TensorInfo *need(const Registry *r, const char *which, int layer, const char *suffix, int ndim,
                              const int64_t *shape, DlError *e) {
    char name[DL_TENSOR_NAME_MAX], b1[64];
    const TensorInfo *t = tensor(r, layer, suffix, name, sizeof name);
    if (!t) {
        dl_fail(e, "mamba2 init: the %s has no tensor %s", which, name);
        return NULL;
    }
    int ok = t->ndim == ndim;
    for (int k = 0; ok && k < ndim; k++) ok = t->shape[k] == shape[k];
    if (!ok) {
        char want[96] = "[";
        for (int k = 0; k < ndim; k++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", k ? ", " : "", (long long)shape[k]);
        strncat(want, "]", sizeof want - strlen(want) - 1);
        dl_fail(e, "mamba2 init: %s %s has shape %s, expected %s", which, name, reg_shape_str(t, b1, sizeof b1), want);
        return NULL;
    }
    return t;
}

static void uniform(float *p, int64_t n, double lo, double hi, uint64_t seed, uint64_t stream) {
    Rng g;
    rng_init(&g, seed, stream);
    for (int64_t i = 0; i < n; i++) p[i] = (float)(lo + (hi - lo) * rng_uniform_f64(&g));
}

int mamba2_init_layer_from_attention(const HybridConfig *h, const Registry *hr, float *hp, const Registry *tr,
                                     const float *tp, int l, Rng *rng, DlError *e) {
    const LlamaConfig *c = &h->base;
    if (l < 0 || l >= c->n_layer || h->mixer[l] != MIXER_MAMBA2)
        return dl_fail(e, "mamba2 init: layer %d is not a Mamba-2 layer of the hybrid", l);
    if (h->d_state != c->head_dim || h->d_inner != c->n_head * c->head_dim || h->d_xb != c->n_kv_head * c->head_dim)
        return dl_fail(e, "mamba2 init: hybrid dims (d_state %d, d_inner %d, d_xb %d) do not follow heads %d/%d x head_dim %d",
                       h->d_state, h->d_inner, h->d_xb, c->n_head, c->n_kv_head, c->head_dim);
    const int64_t d = c->d_model, H = c->n_head, di = h->d_inner, dxb = h->d_xb, xbc = dxb + dxb + di, W = h->d_conv;
    const int64_t n_in = di + xbc + H;
    // source attention (q [di, d], k/v [dxb, d], o [d, di]) and destination tensors
    const TensorInfo *q = need(tr, "source", l, "self_attn.q_proj.weight", 2, (int64_t[]){di, d}, e);
    const TensorInfo *k = q ? need(tr, "source", l, "self_attn.k_proj.weight", 2, (int64_t[]){dxb, d}, e) : NULL;
    const TensorInfo *v = k ? need(tr, "source", l, "self_attn.v_proj.weight", 2, (int64_t[]){dxb, d}, e) : NULL;
    const TensorInfo *o = v ? need(tr, "source", l, "self_attn.o_proj.weight", 2, (int64_t[]){d, di}, e) : NULL;
    const TensorInfo *in = o ? need(hr, "hybrid", l, "mamba.in_proj.weight", 2, (int64_t[]){n_in, d}, e) : NULL;
    const TensorInfo *cw = in ? need(hr, "hybrid", l, "mamba.conv1d.weight", 3, (int64_t[]){xbc, 1, W}, e) : NULL;
    const TensorInfo *cb = cw ? need(hr, "hybrid", l, "mamba.conv1d.bias", 1, (int64_t[]){xbc}, e) : NULL;
    const TensorInfo *dtb = cb ? need(hr, "hybrid", l, "mamba.dt_bias", 1, (int64_t[]){H}, e) : NULL;
    const TensorInfo *alog = dtb ? need(hr, "hybrid", l, "mamba.A_log", 1, (int64_t[]){H}, e) : NULL;
    const TensorInfo *D = alog ? need(hr, "hybrid", l, "mamba.D", 1, (int64_t[]){H}, e) : NULL;
    const TensorInfo *nw = D ? need(hr, "hybrid", l, "mamba.norm.weight", 1, (int64_t[]){di}, e) : NULL;
    const TensorInfo *out = nw ? need(hr, "hybrid", l, "mamba.out_proj.weight", 2, (int64_t[]){d, di}, e) : NULL;
    if (!out) return -1;

    const uint64_t seed = rng_u64(rng);
    float *W_in = hp + in->offset;
    // in_proj rows [z | x | B | C | dt]; z and dt rows: nn.Linear default U(-1/sqrt(d), 1/sqrt(d))
    const double bound = 1.0 / sqrt((double)d);
    uniform(W_in, di * d, -bound, bound, seed, S_Z);
    memcpy(W_in + di * d, tp + v->offset, (size_t)(dxb * d) * sizeof(float));                 // x <- v_proj
    memcpy(W_in + (di + dxb) * d, tp + k->offset, (size_t)(dxb * d) * sizeof(float));         // B <- k_proj
    memcpy(W_in + (di + 2 * dxb) * d, tp + q->offset, (size_t)(di * d) * sizeof(float));      // C <- q_proj
    uniform(W_in + (di + xbc) * d, H * d, -bound, bound, seed, S_DT);
    memcpy(hp + out->offset, tp + o->offset, (size_t)(d * di) * sizeof(float));               // out <- o_proj
    // dt log-uniform in [1e-3, 1e-1], floored at 1e-4; dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt))
    {
        Rng g;
        rng_init(&g, seed, S_DTB);
        const double lo = log(1e-3), hi = log(1e-1);
        for (int64_t i = 0; i < H; i++) {
            double dt = exp(lo + (hi - lo) * rng_uniform_f64(&g));
            if (dt < 1e-4) dt = 1e-4;
            hp[dtb->offset + i] = (float)(dt + log(-expm1(-dt)));
        }
    }
    // A_log = log(U(1, 16)) (A_init_range = (1, 16))
    {
        Rng g;
        rng_init(&g, seed, S_ALOG);
        for (int64_t i = 0; i < H; i++) hp[alog->offset + i] = (float)log(1.0 + 15.0 * rng_uniform_f64(&g));
    }
    for (int64_t i = 0; i < H; i++) hp[D->offset + i] = 1.f;
    for (int64_t i = 0; i < di; i++) hp[nw->offset + i] = 1.f;
    // Conv1d default (kaiming_uniform(a=sqrt(5)) and its bias rule): U(-1/sqrt(fan_in), +), fan_in = 1 * W
    const double cbound = 1.0 / sqrt((double)W);
    uniform(hp + cw->offset, xbc * W, -cbound, cbound, seed, S_CONVW);
    uniform(hp + cb->offset, xbc, -cbound, cbound, seed, S_CONVB);
    return 0;
}
