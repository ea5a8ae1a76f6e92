// registry.c: see registry.h.
#include "distill/registry.h"

#include <fnmatch.h>
#include <string.h>

static const char *ROLE_NAMES[ROLE_COUNT] = {"embed", "norm", "attn", "mlp", "mamba", "head"};

const char *role_name(TensorRole role) { return (role >= 0 && role < ROLE_COUNT) ? ROLE_NAMES[role] : "?"; }

void reg_init(Registry *r) { memset(r, 0, sizeof *r); }

void reg_free(Registry *r) {
    free(r->t);
    memset(r, 0, sizeof *r);
}

int reg_add(Registry *r, const char *name, TensorRole role, int layer, int ndim, const int64_t *dims) {
    if (ndim < 1 || ndim > DL_MAX_DIMS) dl_die(DL_EXIT_RUNTIME, "tensor %s: %d dims (1..4 supported)", name, ndim);
    if (strlen(name) >= DL_TENSOR_NAME_MAX) dl_die(DL_EXIT_RUNTIME, "tensor name too long: %s", name);
    if (reg_find(r, name) >= 0) dl_die(DL_EXIT_RUNTIME, "tensor %s registered twice", name);
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 64;
        r->t = dl_realloc(r->t, (size_t)r->cap * sizeof *r->t);
    }
    TensorInfo *t = &r->t[r->n];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (dims[i] <= 0) dl_die(DL_EXIT_RUNTIME, "tensor %s: dimension %d is %lld", name, i, (long long)dims[i]);
        t->shape[i] = dims[i];
        t->numel *= dims[i];
    }
    t->dtype = DT_F32;
    t->role = role;
    t->layer = layer;
    t->trainable = true;
    t->decay = ndim >= 2 && role != ROLE_NORM;
    t->offset = (r->numel + DL_TENSOR_ALIGN - 1) / DL_TENSOR_ALIGN * DL_TENSOR_ALIGN;
    t->shard_begin = 0;
    t->shard_end = t->numel;
    r->numel = t->offset + t->numel;
    return r->n++;
}

int reg_addf(Registry *r, TensorRole role, int layer, int ndim, const int64_t *dims, const char *fmt, ...) {
    char name[DL_TENSOR_NAME_MAX + 32];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return reg_add(r, name, role, layer, ndim, dims);
}

int reg_find(const Registry *r, const char *name) {
    for (int i = 0; i < r->n; i++)
        if (strcmp(r->t[i].name, name) == 0) return i;
    return -1;
}

int reg_match(const Registry *r, const char *patterns, const char *what, void (*fn)(int index, void *ctx), void *ctx,
              DlError *e) {
    int total = 0;
    char *copy = dl_strdup(patterns), *save = NULL;
    for (char *p = strtok_r(copy, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
        while (*p == ' ') p++;
        size_t l = strlen(p);
        while (l && p[l - 1] == ' ') p[--l] = 0;
        if (!l) continue;
        int matched = 0;
        for (int i = 0; i < r->n; i++)
            if (fnmatch(p, r->t[i].name, 0) == 0) {
                fn(i, ctx);
                matched++;
            }
        if (!matched) {
            dl_fail(e, "%s pattern '%s' matches no tensor (names look like 'model.layers.0.mamba.A_log')", what, p);
            free(copy);
            return -1;
        }
        total += matched;
    }
    free(copy);
    return total;
}

static void set_trainable(int i, void *ctx) { ((Registry *)ctx)->t[i].trainable = true; }

int reg_vlookup(const Registry *r, int64_t numel, const char *who, DlError *e, const char *fmt, va_list ap) {
    char name[DL_TENSOR_NAME_MAX];
    vsnprintf(name, sizeof name, fmt, ap);
    int i = reg_find(r, name);
    if (i < 0) return dl_fail(e, "%s: tensor %s missing from the registry", who, name);
    if (r->t[i].numel != numel)
        return dl_fail(e, "%s: tensor %s has %lld elements, expected %lld", who, name, (long long)r->t[i].numel,
                       (long long)numel);
    return i;
}

int reg_set_trainable(Registry *r, const char *patterns, DlError *e) {
    for (int i = 0; i < r->n; i++) r->t[i].trainable = false;
    if (reg_match(r, patterns, "trainable", set_trainable, r, e) < 0) return -1;
    int n = 0;
    for (int i = 0; i < r->n; i++) n += r->t[i].trainable;
    return n;
}

int64_t reg_trainable_numel(const Registry *r) {
    int64_t n = 0;
    for (int i = 0; i < r->n; i++)
        if (r->t[i].trainable) n += r->t[i].numel;
    return n;
}

int64_t reg_params_numel(const Registry *r) {
    int64_t n = 0;
    for (int i = 0; i < r->n; i++) n += r->t[i].numel;
    return n;
}

const char *reg_shape_str(const TensorInfo *t, char *buf, size_t n) {
    size_t k = 0;
    k += snprintf(buf + k, n - k, "[");
    for (int i = 0; i < t->ndim && k < n; i++) k += snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
    return buf;
}

void reg_print(const Registry *r, FILE *f) {
    char sb[96];
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        fprintf(f, "  %-52s %-18s %-5s %-5s %s\n", t->name, reg_shape_str(t, sb, sizeof sb), dtype_name(t->dtype),
                role_name(t->role), t->trainable ? "train" : "frozen");
    }
}
