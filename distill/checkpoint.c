// checkpoint.c: see checkpoint.h. HDF5 C API (1.10): one dataset per tensor, SHA-256 per dataset,
// atomic tmp + fsync + rename + marker protocol.
#include "distill/checkpoint.h"
#include "distill/h5util.h"

#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "distill/sha256.h"

#define CKPT_FORMAT "distill-checkpoint"
#define CKPT_FORMAT_VERSION 1

// ---------------------------------------------------------------- state maps

void ckpt_state_init(CkptState *s) { memset(s, 0, sizeof *s); }

void ckpt_state_free(CkptState *s) {
    free(s->recipe);
    free(s->ints);
    for (int i = 0; i < s->n_blobs; i++) free(s->blobs[i].data);
    free(s->blobs);
    free(s->rngs);
    memset(s, 0, sizeof *s);
}

void ckpt_state_set_recipe(CkptState *s, const char *text) {
    free(s->recipe);
    s->recipe = text ? dl_strdup(text) : NULL;
}

static void check_key(const char *key) {
    size_t n = strlen(key);
    bool ok = n > 0 && n < CKPT_KEY_MAX;
    for (size_t i = 0; ok && i < n; i++) {
        char c = key[i];
        ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
    }
    // a bad key is a programming error, not bad input
    if (!ok) dl_die(DL_EXIT_RUNTIME, "checkpoint state key '%s' is invalid (1-63 chars of [A-Za-z0-9_.-])", key);
}

void ckpt_state_set_int(CkptState *s, const char *key, int64_t v) {
    check_key(key);
    for (int i = 0; i < s->n_ints; i++)
        if (!strcmp(s->ints[i].key, key)) {
            s->ints[i].value = v;
            return;
        }
    s->ints = dl_realloc(s->ints, (size_t)(s->n_ints + 1) * sizeof *s->ints);
    snprintf(s->ints[s->n_ints].key, CKPT_KEY_MAX, "%s", key);
    s->ints[s->n_ints++].value = v;
}

void ckpt_state_set_blob(CkptState *s, const char *key, const void *data, int64_t len) {
    check_key(key);
    CkptBlob *b = NULL;
    for (int i = 0; i < s->n_blobs; i++)
        if (!strcmp(s->blobs[i].key, key)) b = &s->blobs[i];
    if (!b) {
        s->blobs = dl_realloc(s->blobs, (size_t)(s->n_blobs + 1) * sizeof *s->blobs);
        b = &s->blobs[s->n_blobs++];
        memset(b, 0, sizeof *b);
        snprintf(b->key, CKPT_KEY_MAX, "%s", key);
    }
    free(b->data);
    b->data = dl_malloc((size_t)len);
    if (len) memcpy(b->data, data, (size_t)len);
    b->len = len;
}

void ckpt_state_set_rng(CkptState *s, const char *key, const Rng *r) {
    check_key(key);
    for (int i = 0; i < s->n_rngs; i++)
        if (!strcmp(s->rngs[i].key, key)) {
            s->rngs[i].rng = *r;
            return;
        }
    s->rngs = dl_realloc(s->rngs, (size_t)(s->n_rngs + 1) * sizeof *s->rngs);
    snprintf(s->rngs[s->n_rngs].key, CKPT_KEY_MAX, "%s", key);
    s->rngs[s->n_rngs++].rng = *r;
}

int ckpt_state_get_int(const CkptState *s, const char *key, int64_t *v, DlError *e) {
    for (int i = 0; i < s->n_ints; i++)
        if (!strcmp(s->ints[i].key, key)) {
            *v = s->ints[i].value;
            return 0;
        }
    return dl_fail(e, "checkpoint has no integer '%s'", key);
}

const CkptBlob *ckpt_state_get_blob(const CkptState *s, const char *key) {
    for (int i = 0; i < s->n_blobs; i++)
        if (!strcmp(s->blobs[i].key, key)) return &s->blobs[i];
    return NULL;
}

int ckpt_state_get_rng(const CkptState *s, const char *key, Rng *r, DlError *e) {
    for (int i = 0; i < s->n_rngs; i++)
        if (!strcmp(s->rngs[i].key, key)) {
            *r = s->rngs[i].rng;
            return 0;
        }
    return dl_fail(e, "checkpoint has no random generator state '%s'", key);
}

// ---------------------------------------------------------------- names

char *checkpoint_path(const char *run_dir, int stage_index, int64_t step) {
    char name[64];
    snprintf(name, sizeof name, "ckpt-%02d-%08lld.h5", stage_index, (long long)step);
    return dl_path_join(run_dir, name);
}

// Parses "ckpt-SS-STEP<suffix>" exactly; returns true and the numbers if name matches.
static bool parse_name(const char *name, const char *suffix, int *stage, int64_t *step) {
    if (strncmp(name, "ckpt-", 5)) return false;
    const char *p = name + 5;
    int64_t a = 0, b = 0;
    int na = 0, nb = 0;
    while (*p >= '0' && *p <= '9' && na < 9) a = a * 10 + (*p++ - '0'), na++;
    if (na < 2 || *p++ != '-') return false;
    while (*p >= '0' && *p <= '9' && nb < 18) b = b * 10 + (*p++ - '0'), nb++;
    if (nb < 8 || strcmp(p, suffix)) return false;
    *stage = (int)a;
    *step = b;
    return true;
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

// ---------------------------------------------------------------- files

static char *dir_of(const char *path) {
    const char *s = strrchr(path, '/');
    if (!s) return dl_strdup(".");
    if (s == path) return dl_strdup("/");
    char *d = dl_malloc((size_t)(s - path) + 1);
    memcpy(d, path, (size_t)(s - path));
    d[s - path] = 0;
    return d;
}

static char *marker_path(const char *ckpt_path) {
    size_t n = strlen(ckpt_path);
    char *m = dl_malloc(n + 8);
    memcpy(m, ckpt_path, n + 1);
    if (n > 3 && !strcmp(m + n - 3, ".h5")) m[n - 3] = 0;
    strcat(m, ".done");
    return m;
}

// Writes text to path via path.tmp + fsync + rename + fsync(dir).
static int write_file_atomic(const char *path, const char *text, DlError *e) {
    char *tmp = dl_malloc(strlen(path) + 5);
    sprintf(tmp, "%s.tmp", path);
    int rc = -1;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        dl_fail(e, "%s: cannot create: %s", tmp, strerror(errno));
        goto out;
    }
    size_t n = strlen(text);
    if (fwrite(text, 1, n, f) != n || fflush(f) != 0 || fsync(fileno(f)) != 0) {
        dl_fail(e, "%s: write failed: %s", tmp, strerror(errno));
        fclose(f);
        goto out;
    }
    if (fclose(f) != 0) {
        dl_fail(e, "%s: close failed: %s", tmp, strerror(errno));
        goto out;
    }
    if (rename(tmp, path) != 0) {
        dl_fail(e, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto out;
    }
    char *d = dir_of(path);
    rc = dl_fsync_path(d, true, e);
    free(d);
out:
    free(tmp);
    return rc;
}

// ---------------------------------------------------------------- HDF5 helpers

// Creates dataset `name` of ndim dims under loc, writes data (nbytes raw bytes in mtype) and its sha256.
static int ds_write(hid_t loc, const char *name, hid_t ftype, hid_t mtype, int ndim, const hsize_t *dims,
                    const void *data, size_t nbytes, const char *what, DlError *e) {
    hid_t sp = H5Screate_simple(ndim, dims, NULL);
    hid_t d = H5Dcreate2(loc, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (d < 0) rc = dl_fail(e, "cannot create dataset for %s %s", what, name);
    else if (nbytes && H5Dwrite(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
        rc = dl_fail(e, "cannot write dataset for %s %s", what, name);
    else {
        char hex[65];
        sha256_hex(data, nbytes, hex);
        if (h5_attr_put_str(d, "sha256", hex)) rc = dl_fail(e, "cannot write checksum of %s %s", what, name);
    }
    if (d >= 0) H5Dclose(d);
    H5Sclose(sp);
    return rc;
}

// Opens dataset name under loc and checks its element class/size and dims (exp_dims: expected, or NULL to
// accept any shape; the count must then fit max_elems). Reads it into out and verifies its sha256.
// Returns the number of elements read, or -1.
static int64_t ds_read(hid_t loc, const char *name, H5T_class_t cls, size_t elem, hid_t mtype, int exp_ndim,
                       const int64_t *exp_dims, void *out, int64_t max_elems, const char *what, const char *file,
                       DlError *e) {
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0) return dl_fail(e, "%s: %s %s is missing", file, what, name);
    hid_t ft = H5Dget_type(d), sp = H5Dget_space(d);
    int64_t n = -1;
    int nd = H5Sget_simple_extent_ndims(sp);
    hsize_t dims[8] = {0};
    if (H5Tget_class(ft) != cls || H5Tget_size(ft) != elem) {
        dl_fail(e, "%s: %s %s has the wrong element type (expected %zu-byte %s)", file, what, name, elem,
                cls == H5T_FLOAT ? "float" : "integer");
        goto out;
    }
    if (nd < 0 || nd > 8) {
        dl_fail(e, "%s: %s %s has an unreadable shape", file, what, name);
        goto out;
    }
    H5Sget_simple_extent_dims(sp, dims, NULL);
    int64_t count = 1;
    for (int i = 0; i < nd; i++) count *= (int64_t)dims[i];
    if (exp_dims) {
        bool same = nd == exp_ndim;
        for (int i = 0; same && i < nd; i++) same = (int64_t)dims[i] == exp_dims[i];
        if (!same) {
            char got[128] = "[", want[128] = "[";
            for (int i = 0; i < nd; i++) snprintf(got + strlen(got), 128 - strlen(got), "%s%llu", i ? ", " : "", (unsigned long long)dims[i]);
            for (int i = 0; i < exp_ndim; i++) snprintf(want + strlen(want), 128 - strlen(want), "%s%lld", i ? ", " : "", (long long)exp_dims[i]);
            dl_fail(e, "%s: %s %s has shape %s], expected %s]", file, what, name, got, want);
            goto out;
        }
    }
    if (count > max_elems) {
        dl_fail(e, "%s: %s %s has %lld elements, at most %lld expected", file, what, name, (long long)count, (long long)max_elems);
        goto out;
    }
    if (count && H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0) {
        dl_fail(e, "%s: cannot read %s %s (file damaged?)", file, what, name);
        goto out;
    }
    char want_hex[80], got_hex[65];
    if (h5_attr_get_strn(d, "sha256", want_hex, sizeof want_hex)) {
        dl_fail(e, "%s: %s %s has no sha256 checksum", file, what, name);
        goto out;
    }
    sha256_hex(out, (size_t)count * elem, got_hex);
    if (strcmp(want_hex, got_hex)) {
        dl_fail(e, "%s: %s %s fails its checksum (stored %.16s..., computed %.16s...): the file is corrupted", file,
                what, name, want_hex, got_hex);
        goto out;
    }
    n = count;
out:
    H5Tclose(ft);
    H5Sclose(sp);
    H5Dclose(d);
    return n;
}

static hid_t group_create_ordered(hid_t loc, const char *name) {
    hid_t gcpl = H5Pcreate(H5P_GROUP_CREATE);
    H5Pset_link_creation_order(gcpl, H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED);
    hid_t g = H5Gcreate2(loc, name, H5P_DEFAULT, gcpl, H5P_DEFAULT);
    H5Pclose(gcpl);
    return g;
}

// Number of links of a group and the name of link i (creation order when tracked, else name order).
static int64_t group_count(hid_t g) {
    H5G_info_t info;
    if (H5Gget_info(g, &info) < 0) return -1;
    return (int64_t)info.nlinks;
}
static int group_name_at(hid_t g, int64_t i, char *buf, size_t n) {
    H5G_info_t info;
    H5_index_t idx = H5_INDEX_NAME;
    if (H5Gget_info(g, &info) >= 0) {
        hid_t gcpl = H5Gget_create_plist(g);
        unsigned flags = 0;
        if (gcpl >= 0 && H5Pget_link_creation_order(gcpl, &flags) >= 0 && (flags & H5P_CRT_ORDER_INDEXED))
            idx = H5_INDEX_CRT_ORDER;
        if (gcpl >= 0) H5Pclose(gcpl);
    }
    ssize_t len = H5Lget_name_by_idx(g, ".", idx, H5_ITER_INC, (hsize_t)i, buf, n, H5P_DEFAULT);
    return len < 0 || (size_t)len >= n ? -1 : 0;
}

// ---------------------------------------------------------------- write

static int check_finite_tensor(const TensorInfo *t, const float *p, const char *what, DlError *e) {
    for (int64_t j = 0; j < t->numel; j++)
        if (!isfinite(p[j]))
            return dl_fail(e, "refusing to write a checkpoint: %s of tensor %s is non-finite (%g) at element %lld", what,
                           t->name, (double)p[j], (long long)j);
    return 0;
}

static int write_h5(const char *path, const Registry *reg, const float *params, const Optim *opt, const CkptState *st,
                    DlError *e) {
    hid_t fapl = h5_fapl(false);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (f < 0) return dl_fail(e, "%s: cannot create HDF5 file (directory writable? disk full?)", path);
    int rc = -1;
    hid_t g = -1, g2 = -1;
    if (h5_attr_put_str(f, "format", CKPT_FORMAT) || h5_attr_put_i64(f, "format_version", CKPT_FORMAT_VERSION) ||
        h5_attr_put_str(f, "program_version", DISTILL_VERSION) || h5_attr_put_i64(f, "stage_index", st->stage_index) ||
        h5_attr_put_str(f, "stage_name", st->stage_name) || h5_attr_put_i64(f, "step", st->step)) {
        dl_fail(e, "%s: cannot write attributes", path);
        goto out;
    }
    // weights, in registry order
    g = group_create_ordered(f, "weights");
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        hsize_t dims[DL_MAX_DIMS];
        for (int k = 0; k < t->ndim; k++) dims[k] = (hsize_t)t->shape[k];
        if (ds_write(g, t->name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, t->ndim, dims, params + t->offset,
                     (size_t)t->numel * sizeof(float), "weight", e))
            goto out;
    }
    H5Gclose(g);
    g = -1;
    if (opt) {
        const OptimState *s = &opt->st;
        const OptimConfig *c = &opt->cfg;
        g = H5Gcreate2(f, "optim", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (h5_attr_put_i64(g, "step", s->step) || h5_attr_put_i64(g, "t", s->t) || h5_attr_put_i64(g, "n_skip_nonfinite", s->n_skip_nonfinite) ||
            h5_attr_put_i64(g, "n_skip_outlier", s->n_skip_outlier) || h5_attr_put_i64(g, "window_n", s->window_n) ||
            h5_attr_put_i64(g, "window_pos", s->window_pos) || h5_attr_put_i64(g, "n_accepted", s->n_accepted) ||
            h5_attr_put_f64(g, "lr", c->lr) || h5_attr_put_f64(g, "beta1", c->beta1) || h5_attr_put_f64(g, "beta2", c->beta2) ||
            h5_attr_put_f64(g, "eps", c->eps) || h5_attr_put_f64(g, "weight_decay", c->weight_decay) ||
            h5_attr_put_f64(g, "clip_norm", c->clip_norm) || h5_attr_put_i64(g, "grad_accum", c->grad_accum) ||
            h5_attr_put_i64(g, "total_steps", c->total_steps)) {
            dl_fail(e, "%s: cannot write optimizer attributes", path);
            goto out;
        }
        hsize_t wd = OPTIM_MAX_WINDOW;
        if (ds_write(g, "window", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 1, &wd, s->window, sizeof s->window,
                     "optimizer", e))
            goto out;
        for (int which = 0; which < 2; which++) {
            g2 = group_create_ordered(g, which ? "v" : "m");
            const float *buf = which ? opt->v : opt->m;
            for (int i = 0; i < reg->n; i++) {
                const TensorInfo *t = &reg->t[i];
                if (!t->trainable) continue;
                hsize_t dims[DL_MAX_DIMS];
                for (int k = 0; k < t->ndim; k++) dims[k] = (hsize_t)t->shape[k];
                if (ds_write(g2, t->name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, t->ndim, dims, buf + t->offset,
                             (size_t)t->numel * sizeof(float), which ? "optimizer v of" : "optimizer m of", e))
                    goto out;
            }
            H5Gclose(g2);
            g2 = -1;
        }
        H5Gclose(g);
        g = -1;
    }
    g = group_create_ordered(f, "rng");
    for (int i = 0; i < st->n_rngs; i++) {
        hsize_t d4 = 4;
        if (ds_write(g, st->rngs[i].key, H5T_STD_U64LE, H5T_NATIVE_UINT64, 1, &d4, st->rngs[i].rng.s, sizeof(uint64_t) * 4,
                     "rng", e))
            goto out;
    }
    H5Gclose(g);
    g = group_create_ordered(f, "ints");
    for (int i = 0; i < st->n_ints; i++)
        if (h5_attr_put_i64(g, st->ints[i].key, st->ints[i].value)) {
            dl_fail(e, "%s: cannot write integer %s", path, st->ints[i].key);
            goto out;
        }
    H5Gclose(g);
    g = group_create_ordered(f, "blobs");
    for (int i = 0; i < st->n_blobs; i++) {
        hsize_t n = (hsize_t)st->blobs[i].len;
        if (ds_write(g, st->blobs[i].key, H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, &n, st->blobs[i].data, (size_t)n, "blob", e))
            goto out;
    }
    H5Gclose(g);
    g = -1;
    {
        const char *rt = st->recipe ? st->recipe : "";
        hsize_t n = strlen(rt);
        if (ds_write(f, "recipe", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, &n, rt, (size_t)n, "recipe", e)) goto out;
    }
    rc = 0;
out:
    if (g2 >= 0) H5Gclose(g2);
    if (g >= 0) H5Gclose(g);
    if (H5Fclose(f) < 0 && rc == 0) rc = dl_fail(e, "%s: closing the HDF5 file failed (disk full?)", path);
    return rc;
}

typedef struct {
    int stage;
    int64_t step;
} CkKey;

static int key_cmp(const void *a, const void *b) {
    const CkKey *x = a, *y = b;
    if (x->stage != y->stage) return x->stage < y->stage ? -1 : 1;
    return x->step < y->step ? -1 : x->step > y->step;
}

// Lists the checkpoints of dir with the given suffix (".h5" or ".done"), sorted oldest first.
static int list_ckpts(const char *dir, const char *suffix, CkKey **out, int *n, DlError *e) {
    DIR *d = opendir(dir);
    if (!d) return dl_fail(e, "%s: cannot read directory: %s", dir, strerror(errno));
    int cap = 16;
    *n = 0;
    *out = dl_malloc((size_t)cap * sizeof **out);
    struct dirent *de;
    while ((de = readdir(d))) {
        CkKey k;
        if (!parse_name(de->d_name, suffix, &k.stage, &k.step)) continue;
        if (*n == cap) *out = dl_realloc(*out, (size_t)(cap *= 2) * sizeof **out);
        (*out)[(*n)++] = k;
    }
    closedir(d);
    qsort(*out, (size_t)*n, sizeof **out, key_cmp);
    return 0;
}

static void remove_file(const char *dir, const char *name) {
    char *p = dl_path_join(dir, name);
    if (unlink(p) != 0 && errno != ENOENT) dl_warn("cannot delete old checkpoint file %s: %s", p, strerror(errno));
    free(p);
}

// Deletes a complete checkpoint: its marker first, so a half-deleted one is never taken for complete.
static void remove_ckpt(const char *dir, CkKey k) {
    char name[64];
    snprintf(name, sizeof name, "ckpt-%02d-%08lld.done", k.stage, (long long)k.step);
    remove_file(dir, name);
    snprintf(name, sizeof name, "ckpt-%02d-%08lld.h5", k.stage, (long long)k.step);
    remove_file(dir, name);
}

// After a complete checkpoint `newest`: delete leftovers of interrupted writes (*.tmp, .h5 without marker
// older than newest) and complete checkpoints beyond keep_last (marker first, so a half-deleted one is never
// taken for complete).
static void prune(const char *dir, CkKey newest, int keep_last) {
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *de;
        char **names = NULL;
        int nn = 0;
        while ((de = readdir(d))) {
            size_t l = strlen(de->d_name);
            if (!strncmp(de->d_name, "ckpt-", 5) && l > 4 && !strcmp(de->d_name + l - 4, ".tmp")) {
                names = dl_realloc(names, (size_t)(nn + 1) * sizeof *names);
                names[nn++] = dl_strdup(de->d_name);
            }
        }
        closedir(d);
        for (int i = 0; i < nn; i++) remove_file(dir, names[i]), free(names[i]);
        free(names);
    }
    CkKey *h5 = NULL, *done = NULL;
    int nh = 0, nd = 0;
    if (list_ckpts(dir, ".h5", &h5, &nh, NULL) || list_ckpts(dir, ".done", &done, &nd, NULL)) goto out;
    char name[64];
    for (int i = 0; i < nh; i++) {
        bool has = false;
        for (int j = 0; j < nd && !has; j++) has = !key_cmp(&h5[i], &done[j]);
        if (!has && key_cmp(&h5[i], &newest) < 0) {
            snprintf(name, sizeof name, "ckpt-%02d-%08lld.h5", h5[i].stage, (long long)h5[i].step);
            remove_file(dir, name);
        }
    }
    if (keep_last > 0)
        for (int j = 0; j < nd - keep_last; j++) remove_ckpt(dir, done[j]);
out:
    free(h5);
    free(done);
}

int checkpoint_list_steps(const char *run_dir, int stage_index, int64_t **steps, DlError *e) {
    CkKey *done = NULL;
    int nd = 0, n = 0;
    *steps = NULL;
    if (list_ckpts(run_dir, ".done", &done, &nd, e)) return -1;
    *steps = dl_malloc((size_t)(nd ? nd : 1) * sizeof **steps);
    for (int i = 0; i < nd; i++)
        if (done[i].stage == stage_index) (*steps)[n++] = done[i].step;
    free(done);
    return n;
}

void checkpoint_drop_after(const char *run_dir, int stage_index, int64_t step) {
    CkKey *h5 = NULL;
    int nh = 0;
    if (list_ckpts(run_dir, ".h5", &h5, &nh, NULL) == 0)
        for (int i = 0; i < nh; i++)
            if (h5[i].stage == stage_index && h5[i].step > step) remove_ckpt(run_dir, h5[i]);
    free(h5);
}

static int g_hook_writes = 0;  // checkpoint writes that saw the crash test hook armed

int checkpoint_write(const char *run_dir, const Registry *reg, const float *params, const Optim *opt,
                     const CkptState *st, int keep_last, char *path_out, size_t path_n, DlError *e) {
    // nothing non-finite is ever written
    for (int i = 0; i < reg->n; i++)
        if (check_finite_tensor(&reg->t[i], params + reg->t[i].offset, "weight", e)) return -1;
    if (opt) {
        if (opt->reg != reg) return dl_fail(e, "checkpoint: optimizer belongs to another registry");
        if (optim_check_finite(opt, e)) return dl_fail_prefix(e, "refusing to write a checkpoint: ");
    }
    if (dl_mkdirs(run_dir, e)) return -1;
    char *path = checkpoint_path(run_dir, st->stage_index, st->step);
    char *tmp = dl_malloc(strlen(path) + 5);
    sprintf(tmp, "%s.tmp", path);
    char *marker = marker_path(path);
    int rc = -1;
    H5Quiet q = h5_quiet_begin();
    int wr = write_h5(tmp, reg, params, opt, st, e);
    h5_quiet_end(q);
    if (wr) {
        unlink(tmp);
        goto out;
    }
    if (dl_fsync_path(tmp, false, e)) goto out;
    char hex[65];
    if (dl_sha256_file(tmp, hex, NULL, e)) goto out;
    const char *crash = getenv("DISTILL_TEST_CRASH_IN_CHECKPOINT");
    if (crash && *crash && atoi(crash) == ++g_hook_writes) {
        fprintf(stderr, "distill: DISTILL_TEST_CRASH_IN_CHECKPOINT=%s: aborting before renaming %s\n", crash, tmp);
        fflush(stderr);
        abort();
    }
    // a stale marker of an older file with this name must not vouch for the new one
    unlink(marker);
    if (rename(tmp, path) != 0) {
        dl_fail(e, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto out;
    }
    if (dl_fsync_path(run_dir, true, e)) goto out;
    char line[128];
    snprintf(line, sizeof line, "%s  %s\n", hex, base_name(path));
    if (write_file_atomic(marker, line, e)) goto out;
    prune(run_dir, (CkKey){st->stage_index, st->step}, keep_last);
    if (path_out) snprintf(path_out, path_n, "%s", path);
    rc = 0;
out:
    free(path);
    free(tmp);
    free(marker);
    return rc;
}

// ---------------------------------------------------------------- verify / find

int checkpoint_verify(const char *path, DlError *e) {
    char *marker = marker_path(path);
    int rc = -1;
    size_t len = 0;
    char *text = NULL;
    if (!dl_file_exists(path)) {
        dl_fail(e, "%s: file is missing", path);
        goto out;
    }
    if (!dl_file_exists(marker)) {
        dl_fail(e, "%s: no completion marker %s (the write was interrupted)", path, base_name(marker));
        goto out;
    }
    DlError e2;
    text = dl_read_file(marker, &len, &e2);
    if (!text) {
        dl_fail(e, "%s", e2.msg);
        goto out;
    }
    char want[65];
    bool ok = len >= 67;
    for (int i = 0; ok && i < 64; i++) ok = strchr("0123456789abcdef", text[i]) != NULL && text[i];
    if (ok) {
        memcpy(want, text, 64);
        want[64] = 0;
        const char *nm = text + 66;
        size_t bl = strlen(base_name(path));
        ok = text[64] == ' ' && text[65] == ' ' && !strncmp(nm, base_name(path), bl) && (nm[bl] == '\n' || nm[bl] == 0);
    }
    if (!ok) {
        dl_fail(e, "%s: completion marker is malformed (expected \"SHA256  %s\")", marker, base_name(path));
        goto out;
    }
    char got[65];
    int64_t size = 0;
    if (dl_sha256_file(path, got, &size, e)) goto out;
    if (strcmp(want, got)) {
        dl_fail(e, "%s: SHA-256 does not match its completion marker (file corrupted or truncated; %lld bytes on disk)",
                path, (long long)size);
        goto out;
    }
    rc = 0;
out:
    free(text);
    free(marker);
    return rc;
}

int checkpoint_find_latest(const char *run_dir, char *out, size_t out_n, DlError *e) {
    CkKey *h5 = NULL;
    int nh = 0;
    if (!dl_is_dir(run_dir)) return 0;
    if (list_ckpts(run_dir, ".h5", &h5, &nh, e)) return -1;
    int found = 0;
    for (int i = nh - 1; i >= 0 && !found; i--) {
        char *p = checkpoint_path(run_dir, h5[i].stage, h5[i].step);
        DlError ve;
        if (checkpoint_verify(p, &ve) == 0) {
            snprintf(out, out_n, "%s", p);
            found = 1;
        } else {
            dl_warn("skipping checkpoint %s: %s; trying the previous one", p, ve.msg);
        }
        free(p);
    }
    free(h5);
    return found;
}

// ---------------------------------------------------------------- read

static hid_t open_ro(const char *path, DlError *e) {
    if (!dl_file_exists(path)) {
        dl_fail(e, "%s: no such file", path);
        return -1;
    }
    hid_t fapl = h5_fapl(false);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    H5Pclose(fapl);
    if (f < 0) {
        dl_fail(e, "%s: not a readable HDF5 file (truncated or not a checkpoint)", path);
        return -1;
    }
    char fmt[64] = "";
    if (h5_attr_get_strn(f, "format", fmt, sizeof fmt) || strcmp(fmt, CKPT_FORMAT)) {
        H5Fclose(f);
        dl_fail(e, "%s: not a distill checkpoint (attribute format is '%s', expected '%s')", path, fmt, CKPT_FORMAT);
        return -1;
    }
    int64_t v = 0;
    if (h5_attr_get_i64(f, "format_version", &v) || v != CKPT_FORMAT_VERSION) {
        H5Fclose(f);
        dl_fail(e, "%s: checkpoint format version %lld, this program reads version %d", path, (long long)v,
                CKPT_FORMAT_VERSION);
        return -1;
    }
    return f;
}

typedef struct {
    CkptState *st;
    int bad;
} IntsIter;

static herr_t ints_cb(hid_t loc, const char *name, const H5A_info_t *info, void *data) {
    IntsIter *it = data;
    int64_t v;
    if (strlen(name) >= CKPT_KEY_MAX || h5_attr_get_i64(loc, name, &v)) {
        it->bad = 1;
        return 1;
    }
    ckpt_state_set_int(it->st, name, v);
    return 0;
}

static int read_state(hid_t f, const char *path, CkptState *st, DlError *e) {
    ckpt_state_free(st);
    int64_t v;
    if (h5_attr_get_i64(f, "stage_index", &v)) return dl_fail(e, "%s: attribute stage_index missing", path);
    st->stage_index = (int)v;
    if (h5_attr_get_i64(f, "step", &st->step)) return dl_fail(e, "%s: attribute step missing", path);
    if (h5_attr_get_strn(f, "stage_name", st->stage_name, sizeof st->stage_name))
        return dl_fail(e, "%s: attribute stage_name missing", path);
    if (h5_attr_get_strn(f, "program_version", st->version, sizeof st->version))
        return dl_fail(e, "%s: attribute program_version missing", path);
    hid_t g = H5Gopen2(f, "ints", H5P_DEFAULT);
    if (g < 0) return dl_fail(e, "%s: group /ints missing", path);
    IntsIter it = {st, 0};
    hsize_t idx = 0;
    herr_t r = H5Aiterate2(g, H5_INDEX_NAME, H5_ITER_INC, &idx, ints_cb, &it);
    H5Gclose(g);
    if (r < 0 || it.bad) return dl_fail(e, "%s: cannot read /ints", path);
    char name[256];
    g = H5Gopen2(f, "rng", H5P_DEFAULT);
    if (g < 0) return dl_fail(e, "%s: group /rng missing", path);
    for (int64_t i = 0, n = group_count(g); i < n; i++) {
        Rng rng;
        if (group_name_at(g, i, name, sizeof name) || strlen(name) >= CKPT_KEY_MAX) {
            H5Gclose(g);
            return dl_fail(e, "%s: bad entry in /rng", path);
        }
        int64_t d4[1] = {4};
        if (ds_read(g, name, H5T_INTEGER, 8, H5T_NATIVE_UINT64, 1, d4, rng.s, 4, "rng", path, e) < 0) {
            H5Gclose(g);
            return -1;
        }
        ckpt_state_set_rng(st, name, &rng);
    }
    H5Gclose(g);
    g = H5Gopen2(f, "blobs", H5P_DEFAULT);
    if (g < 0) return dl_fail(e, "%s: group /blobs missing", path);
    for (int64_t i = 0, n = group_count(g); i < n; i++) {
        if (group_name_at(g, i, name, sizeof name) || strlen(name) >= CKPT_KEY_MAX) {
            H5Gclose(g);
            return dl_fail(e, "%s: bad entry in /blobs", path);
        }
        hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
        hid_t sp = d >= 0 ? H5Dget_space(d) : -1;
        hssize_t cnt = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
        if (sp >= 0) H5Sclose(sp);
        if (d >= 0) H5Dclose(d);
        if (cnt < 0) {
            H5Gclose(g);
            return dl_fail(e, "%s: blob %s unreadable", path, name);
        }
        uint8_t *buf = dl_malloc((size_t)cnt + 1);
        if (ds_read(g, name, H5T_INTEGER, 1, H5T_NATIVE_UINT8, 0, NULL, buf, cnt, "blob", path, e) < 0) {
            free(buf);
            H5Gclose(g);
            return -1;
        }
        ckpt_state_set_blob(st, name, buf, cnt);
        free(buf);
    }
    H5Gclose(g);
    hid_t d = H5Dopen2(f, "recipe", H5P_DEFAULT);
    hid_t sp = d >= 0 ? H5Dget_space(d) : -1;
    hssize_t cnt = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    if (cnt < 0) return dl_fail(e, "%s: dataset /recipe missing", path);
    char *rt = dl_calloc((size_t)cnt + 1, 1);
    if (ds_read(f, "recipe", H5T_INTEGER, 1, H5T_NATIVE_UINT8, 0, NULL, rt, cnt, "recipe", path, e) < 0) {
        free(rt);
        return -1;
    }
    st->recipe = rt;
    return 0;
}

int checkpoint_read_state(const char *path, CkptState *st, DlError *e) {
    H5Quiet q = h5_quiet_begin();
    hid_t f = open_ro(path, e);
    int rc = f < 0 ? -1 : read_state(f, path, st, e);
    if (f >= 0) H5Fclose(f);
    h5_quiet_end(q);
    return rc;
}

int checkpoint_load_weights(const char *path, const Registry *reg, float *params, unsigned flags, DlError *e) {
    H5Quiet q = h5_quiet_begin();
    int rc = -1, loaded = 0;
    hid_t g = -1;
    hid_t f = open_ro(path, e);
    if (f < 0) goto out;
    g = H5Gopen2(f, "weights", H5P_DEFAULT);
    if (g < 0) {
        dl_fail(e, "%s: group /weights missing", path);
        goto out;
    }
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (H5Lexists(g, t->name, H5P_DEFAULT) <= 0) {
            if (flags & CKPT_ALLOW_MISSING) continue;
            dl_fail(e, "%s: weight %s is missing (does the recipe's model match the checkpoint?)", path, t->name);
            goto out;
        }
        if (ds_read(g, t->name, H5T_FLOAT, 4, H5T_NATIVE_FLOAT, t->ndim, t->shape, params + t->offset, t->numel, "weight",
                    path, e) < 0)
            goto out;
        loaded++;
    }
    if (!(flags & CKPT_ALLOW_EXTRA)) {
        char name[256];
        for (int64_t i = 0, n = group_count(g); i < n; i++)
            if (group_name_at(g, i, name, sizeof name) == 0 && reg_find(reg, name) < 0) {
                dl_fail(e, "%s: weight %s is not part of the model being loaded (does the recipe's model match?)", path, name);
                goto out;
            }
    }
    rc = loaded;
out:
    if (g >= 0) H5Gclose(g);
    if (f >= 0) H5Fclose(f);
    h5_quiet_end(q);
    return rc;
}

bool checkpoint_has_optim(const char *path) {
    H5Quiet q = h5_quiet_begin();
    hid_t f = open_ro(path, NULL);
    bool has = f >= 0 && H5Lexists(f, "optim", H5P_DEFAULT) > 0;
    if (f >= 0) H5Fclose(f);
    h5_quiet_end(q);
    return has;
}

int checkpoint_load_optim(const char *path, Optim *opt, DlError *e) {
    H5Quiet q = h5_quiet_begin();
    int rc = -1;
    hid_t g = -1, g2 = -1;
    hid_t f = open_ro(path, e);
    if (f < 0) goto out;
    if (H5Lexists(f, "optim", H5P_DEFAULT) <= 0) {
        dl_fail(e, "%s: holds no optimizer state", path);
        goto out;
    }
    g = H5Gopen2(f, "optim", H5P_DEFAULT);
    OptimState s;
    memset(&s, 0, sizeof s);
    int64_t wn = 0, wp = 0;
    if (h5_attr_get_i64(g, "step", &s.step) || h5_attr_get_i64(g, "t", &s.t) ||
        h5_attr_get_i64(g, "n_skip_nonfinite", &s.n_skip_nonfinite) || h5_attr_get_i64(g, "n_skip_outlier", &s.n_skip_outlier) ||
        h5_attr_get_i64(g, "window_n", &wn) || h5_attr_get_i64(g, "window_pos", &wp) ||
        h5_attr_get_i64(g, "n_accepted", &s.n_accepted)) {
        dl_fail(e, "%s: optimizer attributes missing", path);
        goto out;
    }
    if (wn < 0 || wn > OPTIM_MAX_WINDOW || wp < 0 || wp >= OPTIM_MAX_WINDOW || s.t < 0 || s.t > s.step) {
        dl_fail(e, "%s: optimizer counters out of range", path);
        goto out;
    }
    if (opt->cfg.outlier_factor > 0 && (wn > opt->cfg.outlier_window || wp >= opt->cfg.outlier_window)) {
        dl_fail(e, "%s: the saved outlier window (%lld norms) does not fit outlier_window = %d", path, (long long)wn,
                opt->cfg.outlier_window);
        goto out;
    }
    s.window_n = (int)wn;
    s.window_pos = (int)wp;
    int64_t wd[1] = {OPTIM_MAX_WINDOW};
    if (ds_read(g, "window", H5T_FLOAT, 8, H5T_NATIVE_DOUBLE, 1, wd, s.window, OPTIM_MAX_WINDOW, "optimizer", path, e) < 0)
        goto out;
    const Registry *reg = opt->reg;
    for (int which = 0; which < 2; which++) {
        g2 = H5Gopen2(g, which ? "v" : "m", H5P_DEFAULT);
        if (g2 < 0) {
            dl_fail(e, "%s: optimizer group %s missing", path, which ? "v" : "m");
            goto out;
        }
        float *buf = which ? opt->v : opt->m;
        for (int i = 0; i < reg->n; i++) {
            const TensorInfo *t = &reg->t[i];
            if (!t->trainable) continue;
            if (H5Lexists(g2, t->name, H5P_DEFAULT) <= 0) {
                dl_fail(e, "%s: no optimizer state for trainable tensor %s (was it frozen when the checkpoint was written?)",
                        path, t->name);
                goto out;
            }
            if (ds_read(g2, t->name, H5T_FLOAT, 4, H5T_NATIVE_FLOAT, t->ndim, t->shape, buf + t->offset, t->numel,
                        which ? "optimizer v of" : "optimizer m of", path, e) < 0)
                goto out;
        }
        H5Gclose(g2);
        g2 = -1;
    }
    opt->st = s;
    rc = 0;
out:
    if (g2 >= 0) H5Gclose(g2);
    if (g >= 0) H5Gclose(g);
    if (f >= 0) H5Fclose(f);
    h5_quiet_end(q);
    return rc;
}

// ---------------------------------------------------------------- describe

bool checkpoint_is_hdf5(const char *path) {
    static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
    unsigned char b[8];
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    size_t n = fread(b, 1, 8, f);
    fclose(f);
    return n == 8 && !memcmp(b, sig, 8);
}

static void describe_group_tensors(hid_t g, FILE *out, const char *title) {
    char name[256];
    int64_t n = group_count(g), total = 0;
    fprintf(out, "%s (%lld tensors):\n", title, (long long)n);
    for (int64_t i = 0; i < n; i++) {
        if (group_name_at(g, i, name, sizeof name)) continue;
        hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
        if (d < 0) continue;
        hid_t sp = H5Dget_space(d);
        hsize_t dims[8] = {0};
        int nd = H5Sget_simple_extent_ndims(sp);
        if (nd > 8) nd = 8;
        if (nd > 0) H5Sget_simple_extent_dims(sp, dims, NULL);
        char shape[128] = "[";
        int64_t cnt = 1;
        for (int k = 0; k < nd; k++) {
            snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%llu", k ? ", " : "", (unsigned long long)dims[k]);
            cnt *= (int64_t)dims[k];
        }
        strncat(shape, "]", sizeof shape - strlen(shape) - 1);
        total += cnt;
        fprintf(out, "  %-56s %s\n", name, shape);
        H5Sclose(sp);
        H5Dclose(d);
    }
    fprintf(out, "  total: %lld values\n", (long long)total);
}

int checkpoint_describe(const char *path, FILE *out, DlError *e) {
    DlError ve;
    bool verified = checkpoint_verify(path, &ve) == 0;
    H5Quiet q = h5_quiet_begin();
    CkptState st;
    ckpt_state_init(&st);
    int rc = -1;
    hid_t f = open_ro(path, e);
    if (f < 0 || read_state(f, path, &st, e)) goto out;
    fprintf(out, "distill checkpoint %s\n", path);
    fprintf(out, "  integrity: %s\n", verified ? "complete, SHA-256 matches its marker" : ve.msg);
    fprintf(out, "  written by distill %s; stage %d (%s), step %lld\n", st.version, st.stage_index, st.stage_name,
            (long long)st.step);
    fprintf(out, "  recipe: %zu bytes\n", st.recipe ? strlen(st.recipe) : (size_t)0);
    for (int i = 0; i < st.n_ints; i++) fprintf(out, "  int   %-32s %lld\n", st.ints[i].key, (long long)st.ints[i].value);
    for (int i = 0; i < st.n_blobs; i++) fprintf(out, "  blob  %-32s %lld bytes\n", st.blobs[i].key, (long long)st.blobs[i].len);
    for (int i = 0; i < st.n_rngs; i++) fprintf(out, "  rng   %s\n", st.rngs[i].key);
    if (H5Lexists(f, "optim", H5P_DEFAULT) > 0) {
        hid_t g = H5Gopen2(f, "optim", H5P_DEFAULT);
        int64_t step = 0, t = 0, s1 = 0, s2 = 0, accum = 0, total = 0;
        double lr = 0, b1 = 0, b2 = 0, wd = 0, clip = 0;
        h5_attr_get_i64(g, "step", &step), h5_attr_get_i64(g, "t", &t), h5_attr_get_i64(g, "n_skip_nonfinite", &s1);
        h5_attr_get_i64(g, "n_skip_outlier", &s2), h5_attr_get_i64(g, "grad_accum", &accum), h5_attr_get_i64(g, "total_steps", &total);
        h5_attr_get_f64(g, "lr", &lr), h5_attr_get_f64(g, "beta1", &b1), h5_attr_get_f64(g, "beta2", &b2);
        h5_attr_get_f64(g, "weight_decay", &wd), h5_attr_get_f64(g, "clip_norm", &clip);
        fprintf(out, "  optimizer: AdamW lr %g betas (%g, %g) wd %g clip %g accum %lld; step %lld of %lld, %lld updates, "
                     "skipped %lld non-finite + %lld outliers\n",
                lr, b1, b2, wd, clip, (long long)accum, (long long)step, (long long)total, (long long)t, (long long)s1,
                (long long)s2);
        hid_t gm = H5Gopen2(g, "m", H5P_DEFAULT);
        if (gm >= 0) {
            fprintf(out, "  optimizer moments for %lld trainable tensors\n", (long long)group_count(gm));
            H5Gclose(gm);
        }
        H5Gclose(g);
    } else {
        fprintf(out, "  optimizer: none (weights only)\n");
    }
    hid_t g = H5Gopen2(f, "weights", H5P_DEFAULT);
    if (g < 0) {
        dl_fail(e, "%s: group /weights missing", path);
        goto out;
    }
    describe_group_tensors(g, out, "weights");
    H5Gclose(g);
    rc = 0;
out:
    if (f >= 0) H5Fclose(f);
    ckpt_state_free(&st);
    h5_quiet_end(q);
    return rc;
}
