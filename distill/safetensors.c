// safetensors.c: validated, memory-mapped safetensors reader (single file or sharded index) and writer.
#include "distill/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "distill/gguf.h"  // gguf_valid_utf8

typedef struct {
    char *path;
    const uint8_t *buf;
    uint64_t size;
    void *map;
} StFile;

struct SafeTensors {
    char label[512];
    StFile *files;
    int n_files;
    StTensor *t;
    int n_t, cap_t;
    char **meta;  // 2*n_meta strings
    int n_meta;
};

static void st_add(SafeTensors *s, const StTensor *t) {
    if (s->n_t == s->cap_t) {
        s->cap_t = s->cap_t ? 2 * s->cap_t : 64;
        s->t = dl_realloc(s->t, (size_t)s->cap_t * sizeof(StTensor));
    }
    s->t[s->n_t++] = *t;
}

// JSON number that must be a non-negative integer below 2^53 (exact in a double).
static bool json_u64(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return false;
    double d = v->valuedouble;
    if (!(d >= 0 && d < 9007199254740992.0) || d != floor(d)) return false;
    *out = (uint64_t)d;
    return true;
}

static int cmp_begin(const void *a, const void *b, void *ctx) {
    const StTensor *t = ctx;
    uint64_t x = t[*(const int *)a].begin, y = t[*(const int *)b].begin;
    if (x != y) return x < y ? -1 : 1;
    uint64_t xe = t[*(const int *)a].end, ye = t[*(const int *)b].end;
    return xe < ye ? -1 : xe > ye;
}
static int cmp_name(const void *a, const void *b, void *ctx) {
    const StTensor *t = ctx;
    return strcmp(t[*(const int *)a].name, t[*(const int *)b].name);
}

// Parses one file's header and appends its tensors (shard index `shard`) to s. label is the file name.
static int parse_file(SafeTensors *s, int shard, DlError *e) {
    const StFile *f = &s->files[shard];
    const char *label = f->path;
    if (f->size < 8) return dl_fail(e, "%s: truncated: %llu bytes, a safetensors file starts with an 8-byte header length", label, (unsigned long long)f->size);
    uint64_t n;
    memcpy(&n, f->buf, 8);
    if (n > ST_MAX_HEADER) return dl_fail(e, "%s: header length %llu exceeds the limit of %llu bytes (not a safetensors file?)", label, (unsigned long long)n, ST_MAX_HEADER);
    if (n > f->size - 8) return dl_fail(e, "%s: header length %llu runs past the end of the file (%llu bytes)", label, (unsigned long long)n, (unsigned long long)f->size);
    if (n < 2) return dl_fail(e, "%s: header of %llu bytes is too short for a JSON object", label, (unsigned long long)n);
    const char *h = (const char *)f->buf + 8;
    if (h[0] != '{') return dl_fail(e, "%s: header does not start with '{' (not a safetensors file)", label);
    if (!gguf_valid_utf8((const uint8_t *)h, n)) return dl_fail(e, "%s: header is not valid UTF-8 (or contains NUL)", label);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(h, n, &end, 0);
    if (!root) {
        uint64_t at = end && end >= h && end <= h + n ? (uint64_t)(end - h) : 0;
        const char *ep = cJSON_GetErrorPtr();
        if (ep && ep >= h && ep <= h + n) at = (uint64_t)(ep - h);
        return dl_fail(e, "%s: header is not valid JSON (near byte %llu of the header)", label, (unsigned long long)at);
    }
    int rc = 0;
    // only spaces may follow the JSON object
    for (const char *p = end; p && p < h + n; p++)
        if (*p != ' ') {
            rc = dl_fail(e, "%s: unexpected bytes after the header JSON (only space padding is allowed)", label);
            break;
        }
    if (!rc && !cJSON_IsObject(root)) rc = dl_fail(e, "%s: header is not a JSON object", label);
    const uint64_t data0 = 8 + n, buflen = f->size - data0;
    const int first = s->n_t;
    for (const cJSON *it = root->child; it && !rc; it = it->next) {
        const char *name = it->string;
        if (!name) { rc = dl_fail(e, "%s: header entry without a name", label); break; }
        if (!strcmp(name, "__metadata__")) {
            if (!cJSON_IsObject(it)) { rc = dl_fail(e, "%s: __metadata__ is not an object", label); break; }
            for (const cJSON *m = it->child; m; m = m->next)
                if (!cJSON_IsString(m) || !m->string) { rc = dl_fail(e, "%s: __metadata__ values must be strings (key '%s')", label, m->string ? m->string : "?"); break; }
            if (rc || shard != 0) continue;
            for (const cJSON *m = it->child; m; m = m->next) {
                s->meta = dl_realloc(s->meta, (size_t)(s->n_meta + 1) * 2 * sizeof(char *));
                s->meta[2 * s->n_meta] = dl_strdup(m->string);
                s->meta[2 * s->n_meta + 1] = dl_strdup(m->valuestring);
                s->n_meta++;
            }
            continue;
        }
        if (!name[0]) { rc = dl_fail(e, "%s: tensor with an empty name", label); break; }
        if (!cJSON_IsObject(it)) { rc = dl_fail(e, "%s: tensor '%s': entry is not an object", label, name); break; }
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
        const cJSON *sh = cJSON_GetObjectItemCaseSensitive(it, "shape");
        const cJSON *of = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        if (!cJSON_IsString(dt)) { rc = dl_fail(e, "%s: tensor '%s': missing or non-string \"dtype\"", label, name); break; }
        if (!cJSON_IsArray(sh)) { rc = dl_fail(e, "%s: tensor '%s': missing or non-array \"shape\"", label, name); break; }
        if (!cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2) { rc = dl_fail(e, "%s: tensor '%s': \"data_offsets\" must be [begin, end]", label, name); break; }
        StTensor t = {0};
        int d = dtype_from_name(dt->valuestring);
        if (d < 0 || dtype_info((DType)d)->is_quantized) { rc = dl_fail(e, "%s: tensor '%s': unsupported dtype \"%s\" (expected F32, F16, BF16, F64, I8..I64, U8..U64 or BOOL)", label, name, dt->valuestring); break; }
        t.dtype = (DType)d;
        int nd = cJSON_GetArraySize(sh);
        if (nd > ST_MAX_DIMS) { rc = dl_fail(e, "%s: tensor '%s': %d dimensions (at most %d supported)", label, name, nd, ST_MAX_DIMS); break; }
        t.ndim = nd;
        uint64_t numel = 1;
        int k = 0;
        for (const cJSON *x = sh->child; x; x = x->next, k++) {
            uint64_t v;
            if (!json_u64(x, &v)) { rc = dl_fail(e, "%s: tensor '%s': shape[%d] is not a non-negative integer", label, name, k); break; }
            if (!dl_mul_ok(numel, v, &numel) || numel > INT64_MAX) { rc = dl_fail(e, "%s: tensor '%s': shape overflows 64 bits", label, name); break; }
            t.shape[k] = (int64_t)v;
        }
        if (rc) break;
        t.numel = (int64_t)numel;
        if (!json_u64(of->child, &t.begin) || !json_u64(of->child->next, &t.end)) { rc = dl_fail(e, "%s: tensor '%s': data_offsets must be non-negative integers", label, name); break; }
        uint64_t want;
        if (!dl_mul_ok(numel, (uint64_t)dtype_info(t.dtype)->block_bytes, &want)) { rc = dl_fail(e, "%s: tensor '%s': size overflows 64 bits", label, name); break; }
        if (t.end < t.begin) { rc = dl_fail(e, "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", label, name, (unsigned long long)t.begin, (unsigned long long)t.end); break; }
        if (t.end - t.begin != want) { rc = dl_fail(e, "%s: tensor '%s': data_offsets span %llu bytes but %s %s needs %llu", label, name, (unsigned long long)(t.end - t.begin), dt->valuestring, nd ? "of its shape" : "scalar", (unsigned long long)want); break; }
        if (t.end > buflen) { rc = dl_fail(e, "%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the data (%llu bytes)", label, name, (unsigned long long)t.begin, (unsigned long long)t.end, (unsigned long long)buflen); break; }
        t.nbytes = want;
        t.data = f->buf + data0 + t.begin;
        t.shard = shard;
        t.name = dl_strdup(name);
        st_add(s, &t);
    }
    cJSON_Delete(root);
    if (rc) return rc;
    // the tensors of this file must tile its data buffer: sorted by begin, each starts where the last ended
    const int cnt = s->n_t - first;
    int *idx = dl_malloc((size_t)(cnt ? cnt : 1) * sizeof(int));
    for (int i = 0; i < cnt; i++) idx[i] = first + i;
    qsort_r(idx, cnt, sizeof(int), cmp_begin, s->t);
    uint64_t pos = 0;
    for (int i = 0; i < cnt && !rc; i++) {
        const StTensor *t = &s->t[idx[i]];
        if (t->begin < pos) rc = dl_fail(e, "%s: tensor '%s' [%llu, %llu) overlaps the previous tensor (which ends at %llu)", label, t->name, (unsigned long long)t->begin, (unsigned long long)t->end, (unsigned long long)pos);
        else if (t->begin > pos) rc = dl_fail(e, "%s: hole in the data buffer: bytes [%llu, %llu) belong to no tensor (before '%s')", label, (unsigned long long)pos, (unsigned long long)t->begin, t->name);
        pos = t->end;
    }
    if (!rc && pos != buflen) rc = dl_fail(e, "%s: the tensors cover %llu bytes of a %llu-byte data buffer (trailing bytes or truncated file)", label, (unsigned long long)pos, (unsigned long long)buflen);
    free(idx);
    return rc;
}

static int check_duplicates(SafeTensors *s, DlError *e) {
    if (s->n_t < 2) return 0;
    int *idx = dl_malloc((size_t)s->n_t * sizeof(int));
    for (int i = 0; i < s->n_t; i++) idx[i] = i;
    qsort_r(idx, s->n_t, sizeof(int), cmp_name, s->t);
    int rc = 0;
    for (int i = 1; i < s->n_t && !rc; i++)
        if (!strcmp(s->t[idx[i]].name, s->t[idx[i - 1]].name))
            rc = dl_fail(e, "%s: tensor '%s' appears twice (in %s and %s)", s->label, s->t[idx[i]].name,
                         s->files[s->t[idx[i - 1]].shard].path, s->files[s->t[idx[i]].shard].path);
    free(idx);
    return rc;
}

void st_close(SafeTensors *s) {
    if (!s) return;
    for (int i = 0; i < s->n_t; i++) free(s->t[i].name);
    free(s->t);
    for (int i = 0; i < s->n_files; i++) {
        if (s->files[i].map) munmap(s->files[i].map, s->files[i].size);
        free(s->files[i].path);
    }
    free(s->files);
    for (int i = 0; i < 2 * s->n_meta; i++) free(s->meta[i]);
    free(s->meta);
    free(s);
}

static StFile *add_file(SafeTensors *s, const char *path) {
    s->files = dl_realloc(s->files, (size_t)(s->n_files + 1) * sizeof(StFile));
    StFile *f = &s->files[s->n_files++];
    memset(f, 0, sizeof *f);
    f->path = dl_strdup(path);
    return f;
}

int st_open_memory(SafeTensors **out, const uint8_t *buf, size_t n, const char *label, DlError *e) {
    *out = NULL;
    SafeTensors *s = dl_calloc(1, sizeof *s);
    snprintf(s->label, sizeof s->label, "%s", label ? label : "<memory>");
    StFile *f = add_file(s, s->label);
    f->buf = buf;
    f->size = n;
    if (parse_file(s, 0, e) || check_duplicates(s, e)) {
        st_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

static int map_file(StFile *f, DlError *e) {
    int fd = open(f->path, O_RDONLY);
    if (fd < 0) return dl_fail(e, "%s: cannot open: %s", f->path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        close(fd);
        return dl_fail(e, "%s: not a regular file", f->path);
    }
    f->size = (uint64_t)st.st_size;
    if (f->size == 0) {
        close(fd);
        return dl_fail(e, "%s: empty file (expected safetensors)", f->path);
    }
    void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return dl_fail(e, "%s: mmap failed: %s", f->path, strerror(errno));
    f->map = m;
    f->buf = m;
    return 0;
}

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

// Opens the shards named by an index file and checks that weight_map and the shards agree exactly.
static int open_index(SafeTensors *s, const char *index_path, DlError *e) {
    size_t len;
    char *txt = dl_read_file(index_path, &len, e);
    if (!txt) return -1;
    cJSON *root = cJSON_ParseWithLength(txt, len);
    free(txt);
    if (!root) return dl_fail(e, "%s: not valid JSON", index_path);
    int rc = 0;
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) rc = dl_fail(e, "%s: missing \"weight_map\" object", index_path);
    char *dir = dl_strdup(index_path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    else strcpy(dir, ".");
    // distinct shard files, in order of first appearance
    for (const cJSON *it = wm ? wm->child : NULL; it && !rc; it = it->next) {
        if (!cJSON_IsString(it)) { rc = dl_fail(e, "%s: weight_map['%s'] is not a string", index_path, it->string); break; }
        const char *fn = it->valuestring;
        if (!fn[0] || strchr(fn, '/') || !strcmp(fn, "..") || !strcmp(fn, ".")) { rc = dl_fail(e, "%s: weight_map['%s'] = '%s' is not a plain file name", index_path, it->string, fn); break; }
        char *p = dl_path_join(dir, fn);
        bool seen = false;
        for (int i = 0; i < s->n_files; i++) seen |= !strcmp(s->files[i].path, p);
        if (!seen) add_file(s, p);
        free(p);
    }
    for (int i = 0; i < s->n_files && !rc; i++) rc = map_file(&s->files[i], e) || parse_file(s, i, e);
    if (!rc) rc = check_duplicates(s, e);
    // every index entry is in the shard it names, and every shard tensor is in the index
    for (const cJSON *it = wm ? wm->child : NULL; it && !rc; it = it->next) {
        int k = st_find(s, it->string);
        char *p = dl_path_join(dir, it->valuestring);
        if (k < 0) rc = dl_fail(e, "%s: tensor '%s' is listed in the index but missing from %s", index_path, it->string, p);
        else if (strcmp(s->files[s->t[k].shard].path, p)) rc = dl_fail(e, "%s: tensor '%s' is listed in %s but stored in %s", index_path, it->string, p, s->files[s->t[k].shard].path);
        free(p);
    }
    if (!rc && cJSON_GetArraySize(wm) != s->n_t) {
        for (int i = 0; i < s->n_t && !rc; i++)
            if (!cJSON_GetObjectItemCaseSensitive(wm, s->t[i].name))
                rc = dl_fail(e, "%s: tensor '%s' in %s is not listed in the index", index_path, s->t[i].name, s->files[s->t[i].shard].path);
        if (!rc) rc = dl_fail(e, "%s: weight_map has duplicate entries", index_path);
    }
    free(dir);
    cJSON_Delete(root);
    return rc;
}

int st_open(SafeTensors **out, const char *path, DlError *e) {
    *out = NULL;
    SafeTensors *s = dl_calloc(1, sizeof *s);
    snprintf(s->label, sizeof s->label, "%s", path);
    int rc;
    if (dl_is_dir(path)) {
        char *idx = dl_path_join(path, "model.safetensors.index.json");
        char *single = dl_path_join(path, "model.safetensors");
        if (dl_file_exists(idx)) rc = open_index(s, idx, e);
        else if (dl_file_exists(single)) {
            add_file(s, single);
            rc = map_file(&s->files[0], e) || parse_file(s, 0, e) || check_duplicates(s, e);
        } else rc = dl_fail(e, "%s: no model.safetensors or model.safetensors.index.json in this directory", path);
        free(idx);
        free(single);
    } else if (ends_with(path, ".json")) {
        rc = open_index(s, path, e);
    } else {
        add_file(s, path);
        rc = map_file(&s->files[0], e) || parse_file(s, 0, e) || check_duplicates(s, e);
    }
    if (rc) {
        st_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

int st_count(const SafeTensors *s) { return s->n_t; }
const StTensor *st_tensor(const SafeTensors *s, int i) { return i >= 0 && i < s->n_t ? &s->t[i] : NULL; }
int st_find(const SafeTensors *s, const char *name) {
    for (int i = 0; i < s->n_t; i++)
        if (!strcmp(s->t[i].name, name)) return i;
    return -1;
}
int st_metadata_count(const SafeTensors *s) { return s->n_meta; }
const char *st_metadata_key(const SafeTensors *s, int i) { return i >= 0 && i < s->n_meta ? s->meta[2 * i] : NULL; }
const char *st_metadata_value(const SafeTensors *s, int i) { return i >= 0 && i < s->n_meta ? s->meta[2 * i + 1] : NULL; }
int st_shard_count(const SafeTensors *s) { return s->n_files; }
const char *st_shard_path(const SafeTensors *s, int i) { return i >= 0 && i < s->n_files ? s->files[i].path : NULL; }
const char *st_label(const SafeTensors *s) { return s->label; }

int st_to_f32(const StTensor *t, float *dst, DlError *e) {
    const uint8_t *p = t->data;
    switch (t->dtype) {
    case DT_F32: memcpy(dst, p, (size_t)t->numel * 4); return 0;
    case DT_F16:
        for (int64_t i = 0; i < t->numel; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = f16_to_f32(h);
        }
        return 0;
    case DT_BF16:
        for (int64_t i = 0; i < t->numel; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = bf16_to_f32(h);
        }
        return 0;
    default: return dl_fail(e, "tensor '%s': dtype %s cannot be loaded as weights (expected F32, F16 or BF16)", t->name, dtype_name(t->dtype));
    }
}

// ---------------------------------------------------------------- writer

typedef struct {
    char *s;
    size_t n, cap;
} Buf;
static void bput(Buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = DL_MAX(2 * b->cap, b->n + n + 256);
        b->s = dl_realloc(b->s, b->cap);
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}
static void bputs(Buf *b, const char *s) { bput(b, s, strlen(s)); }
static void bjson_str(Buf *b, const char *s) {
    bputs(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char tmp[8];
        if (c == '"' || c == '\\') { tmp[0] = '\\'; tmp[1] = (char)c; bput(b, tmp, 2); }
        else if (c < 0x20) { snprintf(tmp, sizeof tmp, "\\u%04x", c); bputs(b, tmp); }
        else bput(b, (const char *)&c, 1);
    }
    bputs(b, "\"");
}

static int cmp_write_order(const void *a, const void *b) {
    const StWriteTensor *x = *(const StWriteTensor *const *)a, *y = *(const StWriteTensor *const *)b;
    int sx = dtype_info(x->dtype)->block_bytes, sy = dtype_info(y->dtype)->block_bytes;
    if (sx != sy) return sy - sx;
    return strcmp(x->name, y->name);
}

static int tensor_bytes(const StWriteTensor *t, uint64_t *nb, DlError *e) {
    const DTypeInfo *di = dtype_info(t->dtype);
    if (!di || di->is_quantized) return dl_fail(e, "safetensors writer: tensor '%s': dtype %s cannot be stored", t->name, dtype_name(t->dtype));
    if (t->ndim < 0 || t->ndim > ST_MAX_DIMS) return dl_fail(e, "safetensors writer: tensor '%s': %d dims", t->name, t->ndim);
    uint64_t n = 1;
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0 || !dl_mul_ok(n, (uint64_t)t->shape[d], &n)) return dl_fail(e, "safetensors writer: tensor '%s': bad shape", t->name);
    if (!dl_mul_ok(n, (uint64_t)di->block_bytes, nb)) return dl_fail(e, "safetensors writer: tensor '%s': too large", t->name);
    return 0;
}

int st_write(const char *path, const StWriteTensor *t, int n, const char *const *meta, int n_meta, DlError *e) {
    const StWriteTensor **ord = dl_malloc((size_t)(n ? n : 1) * sizeof *ord);
    for (int i = 0; i < n; i++) ord[i] = &t[i];
    qsort(ord, n, sizeof *ord, cmp_write_order);
    Buf h = {0};
    bputs(&h, "{");
    bool comma = false;
    if (n_meta > 0) {
        bputs(&h, "\"__metadata__\":{");
        for (int i = 0; i < n_meta; i++) {
            if (i) bputs(&h, ",");
            bjson_str(&h, meta[2 * i]);
            bputs(&h, ":");
            bjson_str(&h, meta[2 * i + 1]);
        }
        bputs(&h, "}");
        comma = true;
    }
    uint64_t off = 0;
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        const StWriteTensor *x = ord[i];
        uint64_t nb;
        if ((rc = tensor_bytes(x, &nb, e))) break;
        if (!x->name[0] || (i && !strcmp(x->name, ord[i - 1]->name))) {
            rc = dl_fail(e, "safetensors writer: empty or duplicate tensor name '%s'", x->name);
            break;
        }
        char tmp[128];
        if (comma) bputs(&h, ",");
        comma = true;
        bjson_str(&h, x->name);
        bputs(&h, ":{\"dtype\":");
        bjson_str(&h, dtype_name(x->dtype));
        bputs(&h, ",\"shape\":[");
        for (int d = 0; d < x->ndim; d++) {
            snprintf(tmp, sizeof tmp, "%s%lld", d ? "," : "", (long long)x->shape[d]);
            bputs(&h, tmp);
        }
        snprintf(tmp, sizeof tmp, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + nb));
        bputs(&h, tmp);
        off += nb;
    }
    bputs(&h, "}");
    while (h.n % 8) bputs(&h, " ");
    if (rc) {
        free(h.s);
        free(ord);
        return rc;
    }
    DlAtomic a;
    if (dl_atomic_open(&a, path, e) == 0) {
        FILE *f = a.f;
        uint64_t hl = h.n;
        bool ok = fwrite(&hl, 8, 1, f) == 1 && fwrite(h.s, 1, h.n, f) == h.n;
        for (int i = 0; i < n && ok; i++) {
            uint64_t nb;
            tensor_bytes(ord[i], &nb, NULL);
            ok = !nb || fwrite(ord[i]->data, 1, nb, f) == nb;
        }
        if (!ok) {
            rc = dl_fail(e, "%s: write failed: %s", a.tmp, strerror(errno));
            dl_atomic_abort(&a);
        } else {
            rc = dl_atomic_commit(&a, e);
        }
    } else {
        rc = -1;
    }
    free(h.s);
    free(ord);
    return rc;
}

int st_write_sharded(const char *dir, const StWriteTensor *t, int n, uint64_t max_shard_bytes, const char *const *meta,
                     int n_meta, int *n_shards, DlError *e) {
    if (dl_mkdirs(dir, e)) return -1;
    // greedy packing in the given order: a new shard starts when the next tensor would overflow this one
    int *shard_of = dl_malloc((size_t)(n ? n : 1) * sizeof(int));
    int ns = 0;
    uint64_t cur = 0, total = 0;
    for (int i = 0; i < n; i++) {
        uint64_t nb;
        if (tensor_bytes(&t[i], &nb, e)) {
            free(shard_of);
            return -1;
        }
        if (ns == 0 || (cur > 0 && cur + nb > max_shard_bytes)) ns++, cur = 0;
        cur += nb;
        total += nb;
        shard_of[i] = ns - 1;
    }
    if (ns == 0) ns = 1;
    if (n_shards) *n_shards = ns;
    int rc = 0;
    if (ns == 1) {
        char *p = dl_path_join(dir, "model.safetensors");
        rc = st_write(p, t, n, meta, n_meta, e);
        free(p);
        free(shard_of);
        return rc;
    }
    StWriteTensor *sub = dl_malloc((size_t)n * sizeof *sub);
    char fn[64];
    for (int s = 0; s < ns && !rc; s++) {
        int k = 0;
        for (int i = 0; i < n; i++)
            if (shard_of[i] == s) sub[k++] = t[i];
        snprintf(fn, sizeof fn, "model-%05d-of-%05d.safetensors", s + 1, ns);
        char *p = dl_path_join(dir, fn);
        rc = st_write(p, sub, k, meta, n_meta, e);
        free(p);
    }
    if (!rc) {
        Buf b = {0};
        char tmp[128];
        snprintf(tmp, sizeof tmp, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {", (unsigned long long)total);
        bputs(&b, tmp);
        // sorted by name, as HF writes it
        int *ord = dl_malloc((size_t)n * sizeof(int));
        for (int i = 0; i < n; i++) ord[i] = i;
        for (int i = 1; i < n; i++)  // insertion sort: indexes are small lists of names
            for (int j = i; j > 0 && strcmp(t[ord[j - 1]].name, t[ord[j]].name) > 0; j--) {
                int x = ord[j];
                ord[j] = ord[j - 1];
                ord[j - 1] = x;
            }
        for (int i = 0; i < n; i++) {
            bputs(&b, i ? ",\n    " : "\n    ");
            bjson_str(&b, t[ord[i]].name);
            snprintf(fn, sizeof fn, ": \"model-%05d-of-%05d.safetensors\"", shard_of[ord[i]] + 1, ns);
            bputs(&b, fn);
        }
        bputs(&b, "\n  }\n}\n");
        free(ord);
        char *p = dl_path_join(dir, "model.safetensors.index.json");
        rc = dl_write_file_atomic(p, b.s, b.n, e);
        free(p);
        free(b.s);
    }
    free(sub);
    free(shard_of);
    return rc;
}
