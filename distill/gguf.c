// gguf.c: GGUF reader (validating, memory-mapped) and writer. See gguf.h for the format.
#include "distill/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "distill/quant.h"

// ---------------------------------------------------------------- ggml types

typedef struct {
    const char *name;
    int block_elems, block_bytes;
} GgmlTypeInfo;

// Sizes from ggml-common.h / gguf-py GGML_QUANT_SIZES. Codes 4, 5 (removed Q4_2/Q4_3) and 31..33 are gaps.
static const GgmlTypeInfo GGML_TYPES[] = {
    [0] = {"F32", 1, 4},          [1] = {"F16", 1, 2},        [2] = {"Q4_0", 32, 18},     [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22},       [7] = {"Q5_1", 32, 24},     [8] = {"Q8_0", 32, 34},     [9] = {"Q8_1", 32, 40},
    [10] = {"Q2_K", 256, 84},     [11] = {"Q3_K", 256, 110},  [12] = {"Q4_K", 256, 144},  [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},    [15] = {"Q8_K", 256, 292},  [16] = {"IQ2_XXS", 256, 66}, [17] = {"IQ2_XS", 256, 74},
    [18] = {"IQ3_XXS", 256, 98},  [19] = {"IQ1_S", 256, 50},  [20] = {"IQ4_NL", 32, 18},  [21] = {"IQ3_S", 256, 110},
    [22] = {"IQ2_S", 256, 82},    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},       [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},         [27] = {"I64", 1, 8},       [28] = {"F64", 1, 8},       [29] = {"IQ1_M", 256, 56},
    [30] = {"BF16", 1, 2},        [34] = {"TQ1_0", 256, 54},  [35] = {"TQ2_0", 256, 66},  [39] = {"MXFP4", 32, 17},
};

static const struct {
    uint32_t ggml;
    DType dt;
} GGML_DTYPE[] = {
    {0, DT_F32},   {1, DT_F16},   {2, DT_Q4_0},  {3, DT_Q4_1},  {8, DT_Q8_0},  {12, DT_Q4_K}, {13, DT_Q5_K},
    {14, DT_Q6_K}, {24, DT_I8},   {25, DT_I16},  {26, DT_I32},  {27, DT_I64},  {28, DT_F64},  {30, DT_BF16},
};

bool ggml_type_info(uint32_t t, const char **name, int *block_elems, int *block_bytes) {
    if (t >= DL_ARRAY_LEN(GGML_TYPES) || !GGML_TYPES[t].name) return false;
    if (name) *name = GGML_TYPES[t].name;
    if (block_elems) *block_elems = GGML_TYPES[t].block_elems;
    if (block_bytes) *block_bytes = GGML_TYPES[t].block_bytes;
    return true;
}

int ggml_type_to_dtype(uint32_t t) {
    for (size_t i = 0; i < DL_ARRAY_LEN(GGML_DTYPE); i++)
        if (GGML_DTYPE[i].ggml == t) return GGML_DTYPE[i].dt;
    return -1;
}

int dtype_to_ggml_type(DType t) {
    for (size_t i = 0; i < DL_ARRAY_LEN(GGML_DTYPE); i++)
        if (GGML_DTYPE[i].dt == t) return (int)GGML_DTYPE[i].ggml;
    return -1;
}

static const char *TYPE_NAMES[GGUF_TYPE_COUNT] = {"uint8", "int8",   "uint16", "int16",  "uint32", "int32", "float32",
                                                  "bool",  "string", "array",  "uint64", "int64",  "float64"};
const char *gguf_type_name(GgufType t) { return (t >= 0 && t < GGUF_TYPE_COUNT) ? TYPE_NAMES[t] : "?"; }

// Bytes of a scalar element (0 for string/array).
static int scalar_size(GgufType t) {
    switch (t) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}
static bool is_int_type(GgufType t) {
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_INT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_INT16 ||
           t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64;
}
static bool is_unsigned_type(GgufType t) {
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_UINT64;
}
static bool is_float_type(GgufType t) { return t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64; }

// Decodes one packed little-endian scalar into a widened value.
static void decode_scalar(GgufType t, const uint8_t *p, GgufValue *v) {
    memset(v, 0, sizeof *v);
    v->type = t;
    switch (t) {
    case GGUF_TYPE_UINT8: v->u = p[0]; break;
    case GGUF_TYPE_INT8: v->i = (int8_t)p[0]; break;
    case GGUF_TYPE_BOOL: v->b = p[0] != 0; break;
    case GGUF_TYPE_UINT16: { uint16_t x; memcpy(&x, p, 2); v->u = x; break; }
    case GGUF_TYPE_INT16: { int16_t x; memcpy(&x, p, 2); v->i = x; break; }
    case GGUF_TYPE_UINT32: { uint32_t x; memcpy(&x, p, 4); v->u = x; break; }
    case GGUF_TYPE_INT32: { int32_t x; memcpy(&x, p, 4); v->i = x; break; }
    case GGUF_TYPE_FLOAT32: { float x; memcpy(&x, p, 4); v->f = x; break; }
    case GGUF_TYPE_UINT64: memcpy(&v->u, p, 8); break;
    case GGUF_TYPE_INT64: memcpy(&v->i, p, 8); break;
    case GGUF_TYPE_FLOAT64: memcpy(&v->f, p, 8); break;
    default: break;
    }
}

// Encodes a widened scalar value into its packed form (inverse of decode_scalar).
static void encode_scalar(const GgufValue *v, uint8_t *p) {
    switch (v->type) {
    case GGUF_TYPE_UINT8: p[0] = (uint8_t)v->u; break;
    case GGUF_TYPE_INT8: p[0] = (uint8_t)(int8_t)v->i; break;
    case GGUF_TYPE_BOOL: p[0] = v->b ? 1 : 0; break;
    case GGUF_TYPE_UINT16: { uint16_t x = (uint16_t)v->u; memcpy(p, &x, 2); break; }
    case GGUF_TYPE_INT16: { int16_t x = (int16_t)v->i; memcpy(p, &x, 2); break; }
    case GGUF_TYPE_UINT32: { uint32_t x = (uint32_t)v->u; memcpy(p, &x, 4); break; }
    case GGUF_TYPE_INT32: { int32_t x = (int32_t)v->i; memcpy(p, &x, 4); break; }
    case GGUF_TYPE_FLOAT32: { float x = (float)v->f; memcpy(p, &x, 4); break; }
    case GGUF_TYPE_UINT64: memcpy(p, &v->u, 8); break;
    case GGUF_TYPE_INT64: memcpy(p, &v->i, 8); break;
    case GGUF_TYPE_FLOAT64: memcpy(p, &v->f, 8); break;
    default: break;
    }
}

// Strict UTF-8: no overlong forms, surrogates or code points above U+10FFFF; NUL is rejected too.
bool gguf_valid_utf8(const uint8_t *s, uint64_t n) {
    uint64_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c == 0) return false;
        if (c < 0x80) { i++; continue; }
        int len;
        uint32_t cp;
        if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
        else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
        else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
        else return false;
        if ((uint64_t)len > n - i) return false;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return false;
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += len;
    }
    return true;
}

// ---------------------------------------------------------------- reader

// A block of string storage. Strings live in the header, so the arena grows with the header, not the file.
typedef struct Chunk {
    struct Chunk *next;
    uint64_t used, cap;
    char data[];
} Chunk;

struct GgufFile {
    const uint8_t *buf;
    uint64_t size;
    void *map;  // non-NULL when we mapped the file
    char label[512];
    uint32_t version, alignment;
    uint64_t data_off;
    int n_kv;
    char **keys;
    GgufValue *vals;
    int n_t;
    GgufTensor *t;
    struct Chunk *arena;  // NUL-terminated copies of all strings, in chunks (pointers stay valid)
};

typedef struct {
    GgufFile *g;
    uint64_t pos;
    bool count32;     // array counts stored as u32
    bool count_hint;  // an impossible u64 array count had non-zero high bits: maybe a u32-count file
    DlError *e;
} Rd;

static int rd_need(Rd *r, uint64_t k, const char *what) {
    if (k > r->g->size - r->pos)
        return dl_fail(r->e, "truncated at byte %llu reading %s (need %llu bytes, %llu left)",
                       (unsigned long long)r->pos, what, (unsigned long long)k,
                       (unsigned long long)(r->g->size - r->pos));
    return 0;
}
static int rd_u32(Rd *r, uint32_t *v, const char *what) {
    if (rd_need(r, 4, what)) return -1;
    memcpy(v, r->g->buf + r->pos, 4);
    r->pos += 4;
    return 0;
}
static int rd_u64(Rd *r, uint64_t *v, const char *what) {
    if (rd_need(r, 8, what)) return -1;
    memcpy(v, r->g->buf + r->pos, 8);
    r->pos += 8;
    return 0;
}
static uint64_t rd_left(const Rd *r) { return r->g->size - r->pos; }

// Reads a gguf_string into the arena. max_len bounds it; utf8 requires valid UTF-8 without NUL.
static int rd_string(Rd *r, uint64_t max_len, bool utf8, const char *what, const char **out, uint64_t *out_len) {
    uint64_t len;
    uint64_t at = r->pos;
    if (rd_u64(r, &len, what)) return -1;
    if (len > max_len)
        return dl_fail(r->e, "%s at byte %llu is %llu bytes long (at most %llu allowed)", what, (unsigned long long)at,
                       (unsigned long long)len, (unsigned long long)max_len);
    if (rd_need(r, len, what)) return -1;
    const uint8_t *s = r->g->buf + r->pos;
    if (utf8 && !gguf_valid_utf8(s, len))
        return dl_fail(r->e, "%s at byte %llu is not valid UTF-8 (or contains NUL)", what, (unsigned long long)at);
    GgufFile *g = r->g;
    Chunk *c = g->arena;
    if (!c || len + 1 > c->cap - c->used) {  // len <= file size here, so this allocation is bounded
        uint64_t cap = DL_MAX(len + 1, DL_MIN((uint64_t)1 << 20, g->size + 1));  // small files, small chunks
        c = malloc(sizeof(Chunk) + cap);
        if (!c) return dl_fail(r->e, "out of memory (%llu bytes for a string)", (unsigned long long)len);
        c->next = g->arena, c->used = 0, c->cap = cap;
        g->arena = c;
    }
    char *dst = c->data + c->used;
    memcpy(dst, s, len);
    dst[len] = 0;
    c->used += len + 1;
    r->pos += len;
    *out = dst;
    if (out_len) *out_len = len;
    return 0;
}

static void value_free(GgufValue *v);
static void values_free(GgufValue *items, uint64_t n) {
    if (!items) return;
    for (uint64_t i = 0; i < n; i++) value_free(&items[i]);
    free(items);
}
static void value_free(GgufValue *v) {
    if (v->type == GGUF_TYPE_ARRAY) {
        values_free(v->arr.items, v->arr.items ? v->arr.n : 0);
        v->arr.items = NULL;
    }
}

static int rd_value(Rd *r, GgufType type, int depth, const char *key, GgufValue *v) {
    memset(v, 0, sizeof *v);
    v->type = type;
    uint64_t at = r->pos;
    int sz = scalar_size(type);
    if (sz) {
        if (rd_need(r, sz, "a metadata value")) return -1;
        const uint8_t *p = r->g->buf + r->pos;
        if (type == GGUF_TYPE_BOOL && p[0] > 1)
            return dl_fail(r->e, "key '%s': bool value at byte %llu is %u (expected 0 or 1)", key, (unsigned long long)at, p[0]);
        decode_scalar(type, p, v);
        r->pos += sz;
        return 0;
    }
    if (type == GGUF_TYPE_STRING) {
        if (rd_string(r, UINT64_MAX, false, "a string value", &v->str.ptr, &v->str.len))
            return dl_fail_prefix(r->e, "key '%s': ", key);
        return 0;
    }
    if (type != GGUF_TYPE_ARRAY)
        return dl_fail(r->e, "key '%s': unknown value type %u at byte %llu (expected 0..12)", key, (unsigned)type,
                       (unsigned long long)at);
    if (depth >= GGUF_MAX_DEPTH)
        return dl_fail(r->e, "key '%s': arrays nested deeper than %d at byte %llu", key, GGUF_MAX_DEPTH, (unsigned long long)at);
    uint32_t elem;
    uint64_t n;
    if (rd_u32(r, &elem, "an array element type")) return -1;
    if (r->count32) {
        uint32_t n32;
        if (rd_u32(r, &n32, "an array length")) return -1;
        n = n32;
    } else if (rd_u64(r, &n, "an array length")) return -1;
    if (elem >= GGUF_TYPE_COUNT)
        return dl_fail(r->e, "key '%s': unknown array element type %u at byte %llu (expected 0..12)", key, elem,
                       (unsigned long long)at);
    v->arr.elem = (GgufType)elem;
    // every element needs at least this many bytes, which bounds n by the bytes left
    uint64_t min_bytes = scalar_size(elem) ? (uint64_t)scalar_size(elem) : elem == GGUF_TYPE_STRING ? 8 : (r->count32 ? 8 : 12);
    if (n > rd_left(r) / min_bytes) {
        if (!r->count32 && (n >> 32)) r->count_hint = true;
        return dl_fail(r->e, "key '%s': array of %llu %s elements at byte %llu does not fit in the %llu bytes left", key,
                       (unsigned long long)n, gguf_type_name(elem), (unsigned long long)at,
                       (unsigned long long)rd_left(r));
    }
    v->arr.n = n;
    v->arr.data = r->g->buf + r->pos;
    if (scalar_size(elem)) {
        if (elem == GGUF_TYPE_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (v->arr.data[i] > 1)
                    return dl_fail(r->e, "key '%s': bool element %llu is %u (expected 0 or 1)", key, (unsigned long long)i,
                                   v->arr.data[i]);
        r->pos += n * min_bytes;
        return 0;
    }
    v->arr.items = n ? calloc(n, sizeof(GgufValue)) : NULL;
    if (n && !v->arr.items) return dl_fail(r->e, "key '%s': out of memory for %llu array elements", key, (unsigned long long)n);
    for (uint64_t i = 0; i < n; i++)
        if (rd_value(r, (GgufType)elem, depth + 1, key, &v->arr.items[i])) return -1;  // caller frees
    return 0;
}

static void file_free_parsed(GgufFile *g) {
    if (g->vals)
        for (int i = 0; i < g->n_kv; i++) value_free(&g->vals[i]);
    free(g->vals);
    free(g->keys);
    free(g->t);
    for (Chunk *c = g->arena, *nx; c; c = nx) {
        nx = c->next;
        free(c);
    }
    g->vals = NULL, g->keys = NULL, g->t = NULL, g->arena = NULL;
    g->n_kv = g->n_t = 0;
}

static int cmp_str_idx(const void *a, const void *b, void *ctx) {
    char **names = ctx;
    return strcmp(names[*(const int *)a], names[*(const int *)b]);
}
static int cmp_tensor_name(const void *a, const void *b, void *ctx) {
    const GgufTensor *t = ctx;
    return strcmp(t[*(const int *)a].name, t[*(const int *)b].name);
}
static int cmp_tensor_off(const void *a, const void *b, void *ctx) {
    const GgufTensor *t = ctx;
    uint64_t x = t[*(const int *)a].offset, y = t[*(const int *)b].offset;
    return x < y ? -1 : x > y;
}

static int parse_rd(GgufFile *g, Rd *r);

// Parses g->buf. With count32, array counts are read as u32 (old converters); *hint reports whether a
// failed u64-count parse looks like such a file (only then is the u32 reading tried).
static int parse(GgufFile *g, bool count32, bool *hint, DlError *e) {
    Rd r = {.g = g, .pos = 0, .count32 = count32, .e = e};
    int rc = parse_rd(g, &r);
    if (hint) *hint = r.count_hint;
    // the u32 reading is a guess: accept it only if the file then has nothing unexplained in it (zero
    // padding up to the data section, and no bytes after it when there are no tensors)
    if (!rc && count32) {
        for (uint64_t p = r.pos; p < DL_MIN(g->data_off, g->size); p++)
            if (g->buf[p]) return dl_fail(e, "non-zero padding at byte %llu", (unsigned long long)p);
        if (g->n_t == 0 && g->size > g->data_off) return dl_fail(e, "trailing bytes after the metadata");
    }
    return rc;
}

static int parse_rd(GgufFile *g, Rd *r) {
    DlError *e = r->e;

    uint32_t magic;
    if (g->size < 4 || (memcpy(&magic, g->buf, 4), magic != 0x46554747u))
        return dl_fail(e, "not a GGUF file (bad magic: expected the bytes \"GGUF\")");
    r->pos = 4;
    if (rd_u32(r, &g->version, "the version")) return -1;
    if (g->version == 1) return dl_fail(e, "GGUF version 1 is not supported (expected 2 or 3)");
    if (g->version == 0x02000000u || g->version == 0x03000000u)
        return dl_fail(e, "big-endian GGUF is not supported (expected a little-endian file)");
    if (g->version != 2 && g->version != 3) return dl_fail(e, "unsupported GGUF version %u (expected 2 or 3)", g->version);
    uint64_t n_t, n_kv;
    if (rd_u64(r, &n_t, "the tensor count") || rd_u64(r, &n_kv, "the metadata count")) return -1;
    // a KV takes >= 13 bytes (8 len + 1 key byte + 4 type), a tensor info >= 33 (8 + 1 + 4 + 8 + 4 + 8)
    if (n_kv > rd_left(r) / 13 || n_kv > INT32_MAX)
        return dl_fail(e, "metadata count %llu is impossible for a file of %llu bytes", (unsigned long long)n_kv,
                       (unsigned long long)g->size);
    if (n_t > rd_left(r) / 33 || n_t > INT32_MAX)
        return dl_fail(e, "tensor count %llu is impossible for a file of %llu bytes", (unsigned long long)n_t,
                       (unsigned long long)g->size);

    g->keys = calloc(n_kv ? n_kv : 1, sizeof(char *));
    g->vals = calloc(n_kv ? n_kv : 1, sizeof(GgufValue));
    if (!g->keys || !g->vals) return dl_fail(e, "out of memory for %llu metadata entries", (unsigned long long)n_kv);
    for (uint64_t i = 0; i < n_kv; i++) {
        const char *key;
        uint64_t klen, at = r->pos;
        if (rd_string(r, GGUF_MAX_KEY, true, "a metadata key", &key, &klen)) return -1;
        if (klen == 0) return dl_fail(e, "empty metadata key at byte %llu", (unsigned long long)at);
        uint32_t type;
        if (rd_u32(r, &type, "a value type")) return dl_fail_prefix(e, "key '%s': ", key);
        g->keys[i] = (char *)key;
        g->n_kv = (int)i + 1;  // so that a failure below frees this value too
        if (rd_value(r, (GgufType)type, 0, key, &g->vals[i])) return -1;
    }
    // duplicate keys
    if (n_kv > 1) {
        int *idx = dl_malloc(n_kv * sizeof(int));
        for (int i = 0; i < (int)n_kv; i++) idx[i] = i;
        qsort_r(idx, n_kv, sizeof(int), cmp_str_idx, g->keys);
        for (uint64_t i = 1; i < n_kv; i++)
            if (!strcmp(g->keys[idx[i]], g->keys[idx[i - 1]])) {
                int rc = dl_fail(e, "duplicate metadata key '%s'", g->keys[idx[i]]);
                free(idx);
                return rc;
            }
        free(idx);
    }
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int ka = gguf_find_key(g, "general.alignment");
    if (ka >= 0) {
        const GgufValue *v = &g->vals[ka];
        if (v->type != GGUF_TYPE_UINT32)
            return dl_fail(e, "general.alignment has type %s (expected uint32)", gguf_type_name(v->type));
        if (v->u == 0 || (v->u & (v->u - 1)))
            return dl_fail(e, "general.alignment = %llu (expected a power of two)", (unsigned long long)v->u);
        g->alignment = (uint32_t)v->u;
    }

    g->t = calloc(n_t ? n_t : 1, sizeof(GgufTensor));
    if (!g->t) return dl_fail(e, "out of memory for %llu tensor infos", (unsigned long long)n_t);
    g->n_t = (int)n_t;
    for (uint64_t i = 0; i < n_t; i++) {
        GgufTensor *t = &g->t[i];
        const char *name;
        uint64_t nlen, at = r->pos;
        if (rd_string(r, GGUF_MAX_NAME, true, "a tensor name", &name, &nlen))
            return dl_fail_prefix(e, "tensor info %llu: ", (unsigned long long)i);
        if (nlen == 0) return dl_fail(e, "tensor info %llu at byte %llu has an empty name", (unsigned long long)i, (unsigned long long)at);
        memcpy(t->name, name, nlen + 1);
        uint32_t nd;
        if (rd_u32(r, &nd, "n_dims")) return dl_fail_prefix(e, "tensor '%s': ", t->name);
        if (nd < 1 || nd > GGUF_MAX_DIMS) return dl_fail(e, "tensor '%s': n_dims = %u (expected 1..%d)", t->name, nd, GGUF_MAX_DIMS);
        t->n_dims = (int)nd;
        uint64_t numel = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t ne;
            if (rd_u64(r, &ne, "a dimension")) return dl_fail_prefix(e, "tensor '%s': ", t->name);
            if (ne > INT64_MAX || !dl_mul_ok(numel, ne, &numel) || numel > INT64_MAX)
                return dl_fail(e, "tensor '%s': dimensions overflow 64 bits (ne[%u] = %llu)", t->name, d, (unsigned long long)ne);
            t->ne[d] = (int64_t)ne;
        }
        t->numel = (int64_t)numel;
        if (rd_u32(r, &t->ggml_type, "the tensor type")) return dl_fail_prefix(e, "tensor '%s': ", t->name);
        const char *tname;
        int be, bb;
        if (!ggml_type_info(t->ggml_type, &tname, &be, &bb))
            return dl_fail(e, "tensor '%s': unknown ggml type %u", t->name, t->ggml_type);
        if (t->ne[0] % be)
            return dl_fail(e, "tensor '%s': ne[0] = %lld is not a multiple of the %s block size %d", t->name,
                           (long long)t->ne[0], tname, be);
        uint64_t nbytes;
        if (!dl_mul_ok(numel / be, (uint64_t)bb, &nbytes))
            return dl_fail(e, "tensor '%s': size overflows 64 bits", t->name);
        t->nbytes = nbytes;
        t->dtype = ggml_type_to_dtype(t->ggml_type);
        if (rd_u64(r, &t->offset, "the tensor offset")) return dl_fail_prefix(e, "tensor '%s': ", t->name);
        if (t->offset % g->alignment)
            return dl_fail(e, "tensor '%s': offset %llu is not a multiple of the alignment %u", t->name,
                           (unsigned long long)t->offset, g->alignment);
    }
    // data section: after the infos, padded to the alignment
    uint64_t data_off;
    if (!dl_add_ok(r->pos, g->alignment - 1, &data_off)) return dl_fail(e, "header size overflows");
    data_off -= data_off % g->alignment;
    g->data_off = data_off;
    uint64_t avail = data_off <= g->size ? g->size - data_off : 0;
    for (int i = 0; i < g->n_t; i++) {
        GgufTensor *t = &g->t[i];
        uint64_t end;
        if (!dl_add_ok(t->offset, t->nbytes, &end) || end > avail)
            return dl_fail(e, "tensor '%s': data [%llu, +%llu) runs past the end of the file (data section has %llu bytes)",
                           t->name, (unsigned long long)t->offset, (unsigned long long)t->nbytes, (unsigned long long)avail);
        t->data = g->buf + data_off + t->offset;
    }
    if (g->n_t > 1) {
        int *idx = dl_malloc((size_t)g->n_t * sizeof(int));
        for (int i = 0; i < g->n_t; i++) idx[i] = i;
        qsort_r(idx, g->n_t, sizeof(int), cmp_tensor_name, g->t);
        int rc = 0;
        for (int i = 1; i < g->n_t && !rc; i++)
            if (!strcmp(g->t[idx[i]].name, g->t[idx[i - 1]].name)) rc = dl_fail(e, "duplicate tensor name '%s'", g->t[idx[i]].name);
        if (!rc) {
            qsort_r(idx, g->n_t, sizeof(int), cmp_tensor_off, g->t);
            // disjoint ranges: each non-empty tensor ends before the next non-empty one starts
            int prev = -1;
            for (int i = 0; i < g->n_t && !rc; i++) {
                const GgufTensor *t = &g->t[idx[i]];
                if (!t->nbytes) continue;
                if (prev >= 0 && g->t[prev].offset + g->t[prev].nbytes > t->offset)
                    rc = dl_fail(e, "tensors '%s' and '%s' overlap (offsets %llu+%llu and %llu)", g->t[prev].name, t->name,
                                 (unsigned long long)g->t[prev].offset, (unsigned long long)g->t[prev].nbytes,
                                 (unsigned long long)t->offset);
                prev = idx[i];
            }
        }
        free(idx);
        if (rc) return rc;
    }
    return 0;
}

int gguf_open_memory(GgufFile **out, const uint8_t *buf, size_t n, const char *label, DlError *e) {
    *out = NULL;
    GgufFile *g = calloc(1, sizeof *g);
    if (!g) return dl_fail(e, "out of memory");
    g->buf = buf;
    g->size = n;
    snprintf(g->label, sizeof g->label, "%s", label ? label : "<memory>");
    DlError first;
    bool hint = false;
    if (parse(g, false, &hint, &first) == 0) {
        *out = g;
        return 0;
    }
    file_free_parsed(g);
    // files from converters that wrote u32 array counts parse in the second mode
    DlError second;
    if (hint && parse(g, true, NULL, &second) == 0) {
        *out = g;
        return 0;
    }
    file_free_parsed(g);
    free(g);
    return dl_fail(e, "%s: %s", label ? label : "<memory>", first.msg);
}

int gguf_open(GgufFile **out, const char *path, DlError *e) {
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return dl_fail(e, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        close(fd);
        return dl_fail(e, "%s: not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return dl_fail(e, "%s: empty file (expected a GGUF file)", path);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return dl_fail(e, "%s: mmap failed: %s", path, strerror(errno));
    if (gguf_open_memory(out, map, (size_t)st.st_size, path, e)) {
        munmap(map, (size_t)st.st_size);
        return -1;
    }
    (*out)->map = map;
    return 0;
}

void gguf_close(GgufFile *g) {
    if (!g) return;
    file_free_parsed(g);
    if (g->map) munmap(g->map, g->size);
    free(g);
}

uint32_t gguf_version(const GgufFile *g) { return g->version; }
uint32_t gguf_alignment(const GgufFile *g) { return g->alignment; }
uint64_t gguf_data_offset(const GgufFile *g) { return g->data_off; }
uint64_t gguf_file_size(const GgufFile *g) { return g->size; }
const char *gguf_label(const GgufFile *g) { return g->label; }

int gguf_kv_count(const GgufFile *g) { return g->n_kv; }
const char *gguf_kv_key(const GgufFile *g, int kv) { return kv >= 0 && kv < g->n_kv ? g->keys[kv] : NULL; }
const GgufValue *gguf_kv_value(const GgufFile *g, int kv) { return kv >= 0 && kv < g->n_kv ? &g->vals[kv] : NULL; }
GgufType gguf_kv_type(const GgufFile *g, int kv) { return kv >= 0 && kv < g->n_kv ? g->vals[kv].type : GGUF_TYPE_COUNT; }

int gguf_find_key(const GgufFile *g, const char *key) {
    for (int i = 0; i < g->n_kv; i++)
        if (!strcmp(g->keys[i], key)) return i;
    return -1;
}

static const GgufValue *need_key(const GgufFile *g, const char *key, DlError *e) {
    int kv = gguf_find_key(g, key);
    if (kv < 0) {
        dl_fail(e, "%s: metadata key '%s' is missing", g->label, key);
        return NULL;
    }
    return &g->vals[kv];
}

int gguf_get_i64(const GgufFile *g, const char *key, int64_t *out, DlError *e) {
    const GgufValue *v = need_key(g, key, e);
    if (!v) return -1;
    if (!is_int_type(v->type))
        return dl_fail(e, "%s: metadata key '%s' has type %s (expected an integer)", g->label, key, gguf_type_name(v->type));
    if (is_unsigned_type(v->type) && v->u > INT64_MAX)
        return dl_fail(e, "%s: metadata key '%s' = %llu is out of range", g->label, key, (unsigned long long)v->u);
    *out = is_unsigned_type(v->type) ? (int64_t)v->u : v->i;
    return 0;
}

int gguf_get_u64(const GgufFile *g, const char *key, uint64_t *out, DlError *e) {
    const GgufValue *v = need_key(g, key, e);
    if (!v) return -1;
    if (!is_int_type(v->type))
        return dl_fail(e, "%s: metadata key '%s' has type %s (expected an integer)", g->label, key, gguf_type_name(v->type));
    if (!is_unsigned_type(v->type) && v->i < 0)
        return dl_fail(e, "%s: metadata key '%s' = %lld (expected a non-negative value)", g->label, key, (long long)v->i);
    *out = is_unsigned_type(v->type) ? v->u : (uint64_t)v->i;
    return 0;
}

int gguf_get_f64(const GgufFile *g, const char *key, double *out, DlError *e) {
    const GgufValue *v = need_key(g, key, e);
    if (!v) return -1;
    if (is_float_type(v->type)) *out = v->f;
    else if (is_int_type(v->type)) *out = is_unsigned_type(v->type) ? (double)v->u : (double)v->i;
    else return dl_fail(e, "%s: metadata key '%s' has type %s (expected a number)", g->label, key, gguf_type_name(v->type));
    return 0;
}

int gguf_get_bool(const GgufFile *g, const char *key, bool *out, DlError *e) {
    const GgufValue *v = need_key(g, key, e);
    if (!v) return -1;
    if (v->type != GGUF_TYPE_BOOL)
        return dl_fail(e, "%s: metadata key '%s' has type %s (expected bool)", g->label, key, gguf_type_name(v->type));
    *out = v->b;
    return 0;
}

const char *gguf_get_str(const GgufFile *g, int kv, size_t *len) {
    if (kv < 0 || kv >= g->n_kv || g->vals[kv].type != GGUF_TYPE_STRING) return NULL;
    if (len) *len = g->vals[kv].str.len;
    return g->vals[kv].str.ptr;
}

const char *gguf_get_str_key(const GgufFile *g, const char *key, size_t *len, DlError *e) {
    const GgufValue *v = need_key(g, key, e);
    if (!v) return NULL;
    if (v->type != GGUF_TYPE_STRING) {
        dl_fail(e, "%s: metadata key '%s' has type %s (expected string)", g->label, key, gguf_type_name(v->type));
        return NULL;
    }
    if (len) *len = v->str.len;
    return v->str.ptr;
}

int gguf_find_arr(const GgufFile *g, const char *key, GgufType want, uint64_t *n, DlError *e) {
    int kv = gguf_find_key(g, key);
    if (kv < 0) return dl_fail(e, "%s: metadata key '%s' is missing", g->label, key);
    const GgufValue *v = &g->vals[kv];
    if (v->type != GGUF_TYPE_ARRAY)
        return dl_fail(e, "%s: metadata key '%s' has type %s (expected an array of %s)", g->label, key,
                       gguf_type_name(v->type), gguf_type_name(want));
    GgufType el = v->arr.elem;
    bool ok = el == want || (is_int_type(want) && is_int_type(el)) || (is_float_type(want) && is_float_type(el));
    if (!ok)
        return dl_fail(e, "%s: metadata key '%s' is an array of %s (expected %s)", g->label, key, gguf_type_name(el),
                       gguf_type_name(want));
    if (n) *n = v->arr.n;
    return kv;
}

uint64_t gguf_arr_len(const GgufFile *g, int kv) {
    return kv >= 0 && kv < g->n_kv && g->vals[kv].type == GGUF_TYPE_ARRAY ? g->vals[kv].arr.n : 0;
}
GgufType gguf_arr_type(const GgufFile *g, int kv) {
    return kv >= 0 && kv < g->n_kv && g->vals[kv].type == GGUF_TYPE_ARRAY ? g->vals[kv].arr.elem : GGUF_TYPE_COUNT;
}

bool gguf_value_elem(const GgufValue *a, uint64_t i, GgufValue *out) {
    if (a->type != GGUF_TYPE_ARRAY || i >= a->arr.n) return false;
    if (a->arr.items) {
        *out = a->arr.items[i];
        return true;
    }
    int sz = scalar_size(a->arr.elem);
    if (!sz) return false;
    decode_scalar(a->arr.elem, a->arr.data + i * sz, out);
    return true;
}

const char *gguf_arr_str(const GgufFile *g, int kv, uint64_t i, size_t *len) {
    if (gguf_arr_type(g, kv) != GGUF_TYPE_STRING || i >= g->vals[kv].arr.n) return NULL;
    const GgufValue *s = &g->vals[kv].arr.items[i];
    if (len) *len = s->str.len;
    return s->str.ptr;
}

int64_t gguf_arr_int(const GgufFile *g, int kv, uint64_t i) {
    GgufValue v;
    if (kv < 0 || kv >= g->n_kv || !gguf_value_elem(&g->vals[kv], i, &v)) return 0;
    if (v.type == GGUF_TYPE_BOOL) return v.b;
    if (is_unsigned_type(v.type)) return (int64_t)v.u;
    if (is_int_type(v.type)) return v.i;
    return 0;
}

double gguf_arr_float(const GgufFile *g, int kv, uint64_t i) {
    GgufValue v;
    if (kv < 0 || kv >= g->n_kv || !gguf_value_elem(&g->vals[kv], i, &v)) return 0;
    if (is_float_type(v.type)) return v.f;
    if (is_unsigned_type(v.type)) return (double)v.u;
    if (is_int_type(v.type)) return (double)v.i;
    if (v.type == GGUF_TYPE_BOOL) return v.b;
    return 0;
}

// Appends to buf (bounded), keeping *pos <= n - 1.
static void app(char *buf, size_t n, size_t *pos, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void app(char *buf, size_t n, size_t *pos, const char *fmt, ...) {
    if (*pos + 1 >= n) return;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(buf + *pos, n - *pos, fmt, ap);
    va_end(ap);
    if (k > 0) *pos = DL_MIN(*pos + (size_t)k, n - 1);
}

static void fmt_value(const GgufValue *v, char *buf, size_t n, size_t *pos, int max_items) {
    switch (v->type) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_UINT32: case GGUF_TYPE_UINT64:
        app(buf, n, pos, "%llu", (unsigned long long)v->u); break;
    case GGUF_TYPE_INT8: case GGUF_TYPE_INT16: case GGUF_TYPE_INT32: case GGUF_TYPE_INT64:
        app(buf, n, pos, "%lld", (long long)v->i); break;
    case GGUF_TYPE_FLOAT32: case GGUF_TYPE_FLOAT64: app(buf, n, pos, "%.9g", v->f); break;
    case GGUF_TYPE_BOOL: app(buf, n, pos, "%s", v->b ? "true" : "false"); break;
    case GGUF_TYPE_STRING: {
        app(buf, n, pos, "\"");
        uint64_t lim = DL_MIN(v->str.len, (uint64_t)60);
        for (uint64_t i = 0; i < lim; i++) {
            unsigned char c = (unsigned char)v->str.ptr[i];
            if (c == '"' || c == '\\') app(buf, n, pos, "\\%c", c);
            else if (c == '\n') app(buf, n, pos, "\\n");
            else if (c < 0x20 || c == 0x7f) app(buf, n, pos, "\\x%02x", c);
            else app(buf, n, pos, "%c", c);
        }
        app(buf, n, pos, v->str.len > lim ? "\"... (%llu bytes)" : "\"", (unsigned long long)v->str.len);
        break;
    }
    case GGUF_TYPE_ARRAY: {
        app(buf, n, pos, "[%s x %llu] [", gguf_type_name(v->arr.elem), (unsigned long long)v->arr.n);
        uint64_t lim = DL_MIN(v->arr.n, (uint64_t)(max_items < 0 ? 0 : max_items));
        for (uint64_t i = 0; i < lim; i++) {
            GgufValue el;
            if (!gguf_value_elem(v, i, &el)) break;
            if (i) app(buf, n, pos, ", ");
            fmt_value(&el, buf, n, pos, max_items);
        }
        app(buf, n, pos, v->arr.n > lim ? ", ...]" : "]");
        break;
    }
    default: app(buf, n, pos, "?"); break;
    }
}

const char *gguf_value_format(const GgufValue *v, char *buf, size_t n, int max_items) {
    size_t pos = 0;
    if (n) buf[0] = 0;
    fmt_value(v, buf, n, &pos, max_items);
    return buf;
}

int gguf_tensor_count(const GgufFile *g) { return g->n_t; }
const GgufTensor *gguf_tensor(const GgufFile *g, int i) { return i >= 0 && i < g->n_t ? &g->t[i] : NULL; }
int gguf_find_tensor(const GgufFile *g, const char *name) {
    for (int i = 0; i < g->n_t; i++)
        if (!strcmp(g->t[i].name, name)) return i;
    return -1;
}
int gguf_tensor_shape(const GgufTensor *t, int64_t shape[GGUF_MAX_DIMS]) {
    for (int d = 0; d < t->n_dims; d++) shape[d] = t->ne[t->n_dims - 1 - d];
    return t->n_dims;
}

// ---------------------------------------------------------------- writer

typedef struct {
    char *key;
    GgufValue v;  // deep copy: owns its strings, scalar array data and items
} WKv;

typedef struct {
    char name[GGUF_MAX_NAME + 1];
    DType dtype;
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    int64_t numel;
    uint64_t nbytes, offset;
    const void *raw;   // bytes in dtype's encoding, or
    const float *f32;  // values to convert
} WTensor;

struct GgufWriter {
    WKv *kv;
    int n_kv, cap_kv;
    WTensor *t;
    int n_t, cap_t;
};

GgufWriter *gguf_writer_new(void) { return dl_calloc(1, sizeof(GgufWriter)); }

static void wvalue_free(GgufValue *v) {
    if (v->type == GGUF_TYPE_STRING) free((char *)v->str.ptr);
    if (v->type == GGUF_TYPE_ARRAY) {
        if (v->arr.items)
            for (uint64_t i = 0; i < v->arr.n; i++) wvalue_free(&v->arr.items[i]);
        free(v->arr.items);
        free((void *)v->arr.data);
    }
}

void gguf_writer_free(GgufWriter *w) {
    if (!w) return;
    for (int i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        wvalue_free(&w->kv[i].v);
    }
    free(w->kv);
    free(w->t);
    free(w);
}

static int wvalue_copy(GgufValue *dst, const GgufValue *src, int depth, const char *key, DlError *e) {
    memset(dst, 0, sizeof *dst);
    if (src->type < 0 || src->type >= GGUF_TYPE_COUNT) return dl_fail(e, "key '%s': invalid value type %d", key, (int)src->type);
    if (depth >= GGUF_MAX_DEPTH) return dl_fail(e, "key '%s': arrays nested deeper than %d", key, GGUF_MAX_DEPTH);
    *dst = *src;
    if (src->type == GGUF_TYPE_STRING) {
        char *s = dl_malloc(src->str.len + 1);
        if (src->str.len) memcpy(s, src->str.ptr, src->str.len);
        s[src->str.len] = 0;
        dst->str.ptr = s;
    } else if (src->type == GGUF_TYPE_ARRAY) {
        GgufType el = src->arr.elem;
        dst->arr.data = NULL, dst->arr.items = NULL;
        if (el < 0 || el >= GGUF_TYPE_COUNT) return dl_fail(e, "key '%s': invalid array element type %d", key, (int)el);
        int sz = scalar_size(el);
        if (sz) {
            uint64_t nb;
            if (!dl_mul_ok(src->arr.n, sz, &nb)) return dl_fail(e, "key '%s': array too large", key);
            uint8_t *d = dl_malloc(nb ? nb : 1);
            if (nb) memcpy(d, src->arr.data, nb);
            if (el == GGUF_TYPE_BOOL)
                for (uint64_t i = 0; i < src->arr.n; i++) d[i] = d[i] ? 1 : 0;
            dst->arr.data = d;
        } else if (src->arr.n) {
            if (!src->arr.items) return dl_fail(e, "key '%s': array of %s needs items", key, gguf_type_name(el));
            dst->arr.items = dl_calloc(src->arr.n, sizeof(GgufValue));
            for (uint64_t i = 0; i < src->arr.n; i++) {
                if (src->arr.items[i].type != el) {
                    dst->arr.n = i;
                    return dl_fail(e, "key '%s': element %llu has type %s in an array of %s", key, (unsigned long long)i,
                                   gguf_type_name(src->arr.items[i].type), gguf_type_name(el));
                }
                if (wvalue_copy(&dst->arr.items[i], &src->arr.items[i], depth + 1, key, e)) {
                    dst->arr.n = i + 1;
                    return -1;
                }
            }
        }
    }
    return 0;
}

int gguf_w_value(GgufWriter *w, const char *key, const GgufValue *v, DlError *e) {
    size_t kl = strlen(key);
    if (kl == 0 || kl > GGUF_MAX_KEY || !gguf_valid_utf8((const uint8_t *)key, kl))
        return dl_fail(e, "GGUF writer: invalid key '%s' (1..%d bytes of UTF-8)", key, GGUF_MAX_KEY);
    for (int i = 0; i < w->n_kv; i++)
        if (!strcmp(w->kv[i].key, key)) return dl_fail(e, "GGUF writer: key '%s' added twice", key);
    if (!strcmp(key, "general.alignment") &&
        (v->type != GGUF_TYPE_UINT32 || v->u == 0 || (v->u & (v->u - 1))))
        return dl_fail(e, "GGUF writer: general.alignment must be a uint32 power of two");
    if (w->n_kv == w->cap_kv) {
        w->cap_kv = w->cap_kv ? 2 * w->cap_kv : 32;
        w->kv = dl_realloc(w->kv, (size_t)w->cap_kv * sizeof(WKv));
    }
    WKv *kv = &w->kv[w->n_kv];
    if (wvalue_copy(&kv->v, v, 0, key, e)) {
        wvalue_free(&kv->v);
        return -1;
    }
    kv->key = dl_strdup(key);
    w->n_kv++;
    return 0;
}

int gguf_w_u32(GgufWriter *w, const char *key, uint32_t x, DlError *e) {
    GgufValue v = {.type = GGUF_TYPE_UINT32, .u = x};
    return gguf_w_value(w, key, &v, e);
}
int gguf_w_i32(GgufWriter *w, const char *key, int32_t x, DlError *e) {
    GgufValue v = {.type = GGUF_TYPE_INT32, .i = x};
    return gguf_w_value(w, key, &v, e);
}
int gguf_w_u64(GgufWriter *w, const char *key, uint64_t x, DlError *e) {
    GgufValue v = {.type = GGUF_TYPE_UINT64, .u = x};
    return gguf_w_value(w, key, &v, e);
}
int gguf_w_f32(GgufWriter *w, const char *key, float x, DlError *e) {
    GgufValue v = {.type = GGUF_TYPE_FLOAT32, .f = x};
    return gguf_w_value(w, key, &v, e);
}
int gguf_w_bool(GgufWriter *w, const char *key, bool x, DlError *e) {
    GgufValue v = {.type = GGUF_TYPE_BOOL, .b = x};
    return gguf_w_value(w, key, &v, e);
}
int gguf_w_str(GgufWriter *w, const char *key, const char *s, DlError *e) {
    GgufValue v = {.type = GGUF_TYPE_STRING, .str = {s, strlen(s)}};
    return gguf_w_value(w, key, &v, e);
}
int gguf_w_arr(GgufWriter *w, const char *key, GgufType elem, uint64_t n, const void *data, DlError *e) {
    if (!scalar_size(elem)) return dl_fail(e, "GGUF writer: key '%s': gguf_w_arr takes scalar elements", key);
    GgufValue v = {.type = GGUF_TYPE_ARRAY, .arr = {elem, n, data, NULL}};
    return gguf_w_value(w, key, &v, e);
}
int gguf_w_arr_str(GgufWriter *w, const char *key, uint64_t n, const char *const *strs, DlError *e) {
    GgufValue *items = dl_calloc(n ? n : 1, sizeof(GgufValue));
    for (uint64_t i = 0; i < n; i++) {
        items[i].type = GGUF_TYPE_STRING;
        items[i].str.ptr = strs[i];
        items[i].str.len = strlen(strs[i]);
    }
    GgufValue v = {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_STRING, n, NULL, items}};
    int rc = gguf_w_value(w, key, &v, e);
    free(items);
    return rc;
}

static int add_tensor(GgufWriter *w, const char *name, DType t, int ndim, const int64_t *shape, DlError *e,
                      WTensor **out) {
    size_t nl = strlen(name);
    if (nl == 0 || nl > GGUF_MAX_NAME || !gguf_valid_utf8((const uint8_t *)name, nl))
        return dl_fail(e, "GGUF writer: invalid tensor name '%s' (1..%d bytes of UTF-8)", name, GGUF_MAX_NAME);
    for (int i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name)) return dl_fail(e, "GGUF writer: tensor '%s' added twice", name);
    int gt = dtype_to_ggml_type(t);
    if (gt < 0) return dl_fail(e, "GGUF writer: tensor '%s': dtype %s has no GGUF type", name, dtype_name(t));
    if (ndim < 1 || ndim > GGUF_MAX_DIMS) return dl_fail(e, "GGUF writer: tensor '%s': %d dims (expected 1..4)", name, ndim);
    WTensor wt = {0};
    memcpy(wt.name, name, nl + 1);
    wt.dtype = t;
    wt.n_dims = ndim;
    uint64_t numel = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) wt.ne[d] = 1;
    for (int d = 0; d < ndim; d++) {
        int64_t s = shape[ndim - 1 - d];
        if (s < 0 || !dl_mul_ok(numel, (uint64_t)s, &numel) || numel > INT64_MAX)
            return dl_fail(e, "GGUF writer: tensor '%s': bad shape", name);
        wt.ne[d] = s;
    }
    wt.numel = (int64_t)numel;
    const DTypeInfo *di = dtype_info(t);
    if (wt.ne[0] % di->block_elems)
        return dl_fail(e, "GGUF writer: tensor '%s': innermost dimension %lld is not a multiple of the %s block size %d",
                       name, (long long)wt.ne[0], di->name, di->block_elems);
    int64_t nb = dtype_nbytes(t, wt.numel);
    if (nb < 0) return dl_fail(e, "GGUF writer: tensor '%s': size overflows", name);
    wt.nbytes = (uint64_t)nb;
    if (w->n_t == w->cap_t) {
        w->cap_t = w->cap_t ? 2 * w->cap_t : 64;
        w->t = dl_realloc(w->t, (size_t)w->cap_t * sizeof(WTensor));
    }
    w->t[w->n_t] = wt;
    *out = &w->t[w->n_t++];
    return 0;
}

int gguf_w_tensor(GgufWriter *w, const char *name, DType t, int ndim, const int64_t *shape, const void *data,
                  uint64_t nbytes, DlError *e) {
    WTensor *wt;
    if (add_tensor(w, name, t, ndim, shape, e, &wt)) return -1;
    if (wt->nbytes != nbytes) {
        w->n_t--;
        return dl_fail(e, "GGUF writer: tensor '%s': %llu bytes given, shape needs %llu", name, (unsigned long long)nbytes,
                       (unsigned long long)wt->nbytes);
    }
    wt->raw = data;
    return 0;
}

int gguf_w_tensor_f32(GgufWriter *w, const char *name, DType t, int ndim, const int64_t *shape, const float *x,
                      DlError *e) {
    if (!quant_can_quantize(t)) return dl_fail(e, "GGUF writer: tensor '%s': cannot encode fp32 as %s", name, dtype_name(t));
    WTensor *wt;
    if (add_tensor(w, name, t, ndim, shape, e, &wt)) return -1;
    wt->f32 = x;
    return 0;
}

typedef struct {
    FILE *f;
    uint64_t pos;
    bool err;
} WOut;

static void wput(WOut *o, const void *p, size_t n) {
    if (o->err || !n) return;
    if (fwrite(p, 1, n, o->f) != n) o->err = true;
    o->pos += n;
}
static void wu32(WOut *o, uint32_t x) { wput(o, &x, 4); }
static void wu64(WOut *o, uint64_t x) { wput(o, &x, 8); }
static void wstr(WOut *o, const char *s, uint64_t n) {
    wu64(o, n);
    wput(o, s, n);
}
static void wpad(WOut *o, uint32_t align) {
    static const uint8_t zeros[64];
    while (o->pos % align) wput(o, zeros, DL_MIN((uint64_t)sizeof zeros, align - o->pos % align));
}

static void wvalue(WOut *o, const GgufValue *v) {
    int sz = scalar_size(v->type);
    if (sz) {
        uint8_t b[8];
        encode_scalar(v, b);
        wput(o, b, sz);
    } else if (v->type == GGUF_TYPE_STRING) {
        wstr(o, v->str.ptr, v->str.len);
    } else {
        wu32(o, v->arr.elem);
        wu64(o, v->arr.n);
        int es = scalar_size(v->arr.elem);
        if (es) wput(o, v->arr.data, v->arr.n * es);
        else
            for (uint64_t i = 0; i < v->arr.n; i++) wvalue(o, &v->arr.items[i]);
    }
}

int gguf_writer_write(GgufWriter *w, const char *path, DlError *e) {
    uint32_t align = GGUF_DEFAULT_ALIGNMENT;
    for (int i = 0; i < w->n_kv; i++)
        if (!strcmp(w->kv[i].key, "general.alignment")) align = (uint32_t)w->kv[i].v.u;
    uint64_t off = 0;
    for (int i = 0; i < w->n_t; i++) {
        w->t[i].offset = off;
        off += w->t[i].nbytes;
        off = (off + align - 1) / align * align;
    }
    DlAtomic a;
    if (dl_atomic_open(&a, path, e)) return -1;
    WOut o = {.f = a.f};
    wu32(&o, 0x46554747u);
    wu32(&o, 3);
    wu64(&o, (uint64_t)w->n_t);
    wu64(&o, (uint64_t)w->n_kv);
    for (int i = 0; i < w->n_kv; i++) {
        wstr(&o, w->kv[i].key, strlen(w->kv[i].key));
        wu32(&o, w->kv[i].v.type);
        wvalue(&o, &w->kv[i].v);
    }
    for (int i = 0; i < w->n_t; i++) {
        const WTensor *t = &w->t[i];
        wstr(&o, t->name, strlen(t->name));
        wu32(&o, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) wu64(&o, (uint64_t)t->ne[d]);
        wu32(&o, (uint32_t)dtype_to_ggml_type(t->dtype));
        wu64(&o, t->offset);
    }
    wpad(&o, align);
    for (int i = 0; i < w->n_t && !o.err; i++) {
        const WTensor *t = &w->t[i];
        if (t->raw) wput(&o, t->raw, t->nbytes);
        else if (t->nbytes) {
            // convert row-chunk by row-chunk so a large tensor needs no full-size temporary
            const int64_t row = t->ne[0] ? t->ne[0] : 1;
            int64_t rows_per = DL_MAX((int64_t)1, (int64_t)(1 << 20) / row);
            const DTypeInfo *di = dtype_info(t->dtype);
            uint8_t *buf = dl_malloc((size_t)(rows_per * row / di->block_elems * di->block_bytes));
            for (int64_t r0 = 0; r0 < t->numel / row && !o.err; r0 += rows_per) {
                int64_t nr = DL_MIN(rows_per, t->numel / row - r0);
                quantize(t->dtype, t->f32 + r0 * row, buf, nr * row);
                wput(&o, buf, (size_t)(nr * row / di->block_elems * di->block_bytes));
            }
            free(buf);
        }
        wpad(&o, align);
    }
    if (o.err) {
        const int rc = dl_fail(e, "%s: write failed: %s", a.tmp, strerror(errno));
        dl_atomic_abort(&a);
        return rc;
    }
    return dl_atomic_commit(&a, e);
}
