// test_gguf.c: GGUF writer -> reader round trip (every metadata type, nested arrays, every writable tensor
// dtype, bitwise), quantizer accuracy, typed getters, and every rejection path of the reader on crafted
// files (truncation at every cut point, bad magic/version, absurd counts, bad bools/UTF-8/types, deep
// nesting, bad dims/types/offsets, overlaps, duplicates, alignment), each with a message checked by substring.
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/gguf.h"
#include "distill/quant.h"
#include "tests/check.h"

static char tmpdir[256];

static uint8_t *slurp(const char *path, size_t *n) {
    DlError e;
    char *b = dl_read_file(path, n, &e);
    return (uint8_t *)b;
}

// ---------------------------------------------------------------- a byte builder for crafted files
typedef struct {
    uint8_t *b;
    size_t n, cap;
} B;
static void put(B *b, const void *p, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->b = realloc(b->b, b->cap);
    }
    memcpy(b->b + b->n, p, n);
    b->n += n;
}
static void u32(B *b, uint32_t x) { put(b, &x, 4); }
static void u64(B *b, uint64_t x) { put(b, &x, 8); }
static void str(B *b, const char *s) {
    u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void hdr(B *b, uint32_t version, uint64_t n_t, uint64_t n_kv) {
    put(b, "GGUF", 4);
    u32(b, version);
    u64(b, n_t);
    u64(b, n_kv);
}
// tensor info
static void tinfo(B *b, const char *name, uint32_t nd, const uint64_t *ne, uint32_t type, uint64_t off) {
    str(b, name);
    u32(b, nd);
    for (uint32_t i = 0; i < nd; i++) u64(b, ne[i]);
    u32(b, type);
    u64(b, off);
}
static void pad_to(B *b, size_t align) {
    uint8_t z = 0;
    while (b->n % align) put(b, &z, 1);
}
static void zeros(B *b, size_t n) {
    for (size_t i = 0; i < n; i++) put(b, "", 1);
}

// Opening b must fail with a message containing want.
static void expect_reject(B *b, const char *want, const char *what) {
    GgufFile *g = NULL;
    DlError e = {{0}};
    int rc = gguf_open_memory(&g, b->b, b->n, "crafted", &e);
    CHECK(rc != 0);
    if (rc == 0) {
        fprintf(stderr, "  %s: accepted, expected an error with '%s'\n", what, want);
        gguf_close(g);
    } else if (!strstr(e.msg, want)) {
        check_fail_++;
        fprintf(stderr, "  %s: message '%s' lacks '%s'\n", what, e.msg, want);
    } else
        check_pass_++;
    free(b->b);
    memset(b, 0, sizeof *b);
}

// ---------------------------------------------------------------- round trip

static float frand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) / 16777216.0) * 2.0f - 1.0f;
}

static void test_round_trip(void) {
    DlError e;
    GgufWriter *w = gguf_writer_new();
    // scalars of every type
    GgufValue v;
    const GgufType scal[] = {GGUF_TYPE_UINT8, GGUF_TYPE_INT8, GGUF_TYPE_UINT16, GGUF_TYPE_INT16, GGUF_TYPE_UINT32, GGUF_TYPE_INT32,
                             GGUF_TYPE_FLOAT32, GGUF_TYPE_BOOL, GGUF_TYPE_UINT64, GGUF_TYPE_INT64, GGUF_TYPE_FLOAT64};
    char key[64];
    for (size_t i = 0; i < DL_ARRAY_LEN(scal); i++) {
        memset(&v, 0, sizeof v);
        v.type = scal[i];
        switch (scal[i]) {
        case GGUF_TYPE_UINT8: v.u = 250; break;
        case GGUF_TYPE_INT8: v.i = -120; break;
        case GGUF_TYPE_UINT16: v.u = 65000; break;
        case GGUF_TYPE_INT16: v.i = -32000; break;
        case GGUF_TYPE_UINT32: v.u = 4000000000u; break;
        case GGUF_TYPE_INT32: v.i = -2000000000; break;
        case GGUF_TYPE_FLOAT32: v.f = 0.1f; break;
        case GGUF_TYPE_BOOL: v.b = true; break;
        case GGUF_TYPE_UINT64: v.u = 18000000000000000000ull; break;
        case GGUF_TYPE_INT64: v.i = -9000000000000000000ll; break;
        case GGUF_TYPE_FLOAT64: v.f = 0.1; break;
        default: break;
        }
        snprintf(key, sizeof key, "s.%s", gguf_type_name(scal[i]));
        CHECK(gguf_w_value(w, key, &v, &e) == 0);
    }
    CHECK(gguf_w_str(w, "s.string", "héllo \"world\"\n", &e) == 0);
    CHECK(gguf_w_str(w, "s.empty", "", &e) == 0);
    // arrays of every scalar type (3 elements, raw little-endian)
    uint8_t raw[3 * 8];
    for (int i = 0; i < 24; i++) raw[i] = (uint8_t)(i * 37 + 1);
    for (size_t i = 0; i < DL_ARRAY_LEN(scal); i++) {
        uint8_t r2[24];
        memcpy(r2, raw, 24);
        if (scal[i] == GGUF_TYPE_BOOL) r2[0] = 1, r2[1] = 0, r2[2] = 1;
        snprintf(key, sizeof key, "a.%s", gguf_type_name(scal[i]));
        CHECK(gguf_w_arr(w, key, scal[i], 3, r2, &e) == 0);
    }
    const char *strs[] = {"alpha", "", "γάμμα"};
    CHECK(gguf_w_arr_str(w, "a.string", 3, strs, &e) == 0);
    CHECK(gguf_w_arr(w, "a.empty", GGUF_TYPE_INT32, 0, NULL, &e) == 0);
    // nested: [[1, 2], [3]] of int32 and [[["x"]], []] three deep
    int32_t i12[] = {1, 2}, i3[] = {3};
    GgufValue inner[2] = {{.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_INT32, 2, (const uint8_t *)i12, NULL}},
                          {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_INT32, 1, (const uint8_t *)i3, NULL}}};
    GgufValue nested = {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_ARRAY, 2, NULL, inner}};
    CHECK(gguf_w_value(w, "a.nested", &nested, &e) == 0);
    GgufValue sx = {.type = GGUF_TYPE_STRING, .str = {"x", 1}};
    GgufValue l1 = {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_STRING, 1, NULL, &sx}};
    GgufValue l2[2] = {{.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_ARRAY, 1, NULL, &l1}},
                       {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_ARRAY, 0, NULL, NULL}}};
    GgufValue l3 = {.type = GGUF_TYPE_ARRAY, .arr = {GGUF_TYPE_ARRAY, 2, NULL, l2}};
    CHECK(gguf_w_value(w, "a.deep", &l3, &e) == 0);
    CHECK(gguf_w_u32(w, "general.alignment", 64, &e) == 0);
    // writer errors
    CHECK(gguf_w_u32(w, "s.uint32", 1, &e) != 0 && strstr(e.msg, "twice"));
    CHECK(gguf_w_u64(w, "general.alignment", 64, &e) != 0);

    // tensors: raw bytes of every dtype, and fp32 converted by the writer
    uint64_t seed = 1;
    const int64_t rows = 3, cols = 256;
    float *x = malloc(sizeof(float) * rows * cols);
    for (int64_t i = 0; i < rows * cols; i++) x[i] = frand(&seed) * 4;
    x[5] = 0;  // an exact zero
    const DType raw_types[] = {DT_F32, DT_F16, DT_BF16, DT_Q8_0, DT_Q4_0, DT_Q4_1, DT_Q4_K, DT_Q5_K, DT_Q6_K, DT_I32, DT_F64};
    uint8_t *rawbuf[DL_ARRAY_LEN(raw_types)];
    int64_t shape[2] = {rows, cols};
    for (size_t k = 0; k < DL_ARRAY_LEN(raw_types); k++) {
        int64_t nb = dtype_nbytes(raw_types[k], rows * cols);
        rawbuf[k] = malloc((size_t)nb);
        for (int64_t i = 0; i < nb; i++) rawbuf[k][i] = (uint8_t)(frand(&seed) * 127 + 128);
        snprintf(key, sizeof key, "raw.%s", dtype_name(raw_types[k]));
        CHECK(gguf_w_tensor(w, key, raw_types[k], 2, shape, rawbuf[k], (uint64_t)nb, &e) == 0);
    }
    const DType conv_types[] = {DT_F32, DT_F16, DT_BF16, DT_Q8_0, DT_Q4_0, DT_Q4_1};
    for (size_t k = 0; k < DL_ARRAY_LEN(conv_types); k++) {
        snprintf(key, sizeof key, "conv.%s", dtype_name(conv_types[k]));
        CHECK(gguf_w_tensor_f32(w, key, conv_types[k], 2, shape, x, &e) == 0);
    }
    int64_t vshape[1] = {7};
    CHECK(gguf_w_tensor_f32(w, "vec", DT_F32, 1, vshape, x, &e) == 0);
    CHECK(gguf_w_tensor(w, "raw.F32", DT_F32, 2, shape, rawbuf[0], 4 * rows * cols, &e) != 0 && strstr(e.msg, "twice"));
    CHECK(gguf_w_tensor(w, "bad.bytes", DT_F32, 2, shape, rawbuf[0], 12, &e) != 0 && strstr(e.msg, "bytes given"));
    int64_t badshape[2] = {3, 40};
    CHECK(gguf_w_tensor_f32(w, "bad.block", DT_Q8_0, 2, badshape, x, &e) != 0 && strstr(e.msg, "multiple"));
    CHECK(gguf_w_tensor_f32(w, "bad.q4k", DT_Q4_K, 2, shape, x, &e) != 0);
    char longname[80];
    memset(longname, 'n', 70);
    longname[70] = 0;
    CHECK(gguf_w_tensor_f32(w, longname, DT_F32, 1, vshape, x, &e) != 0);

    char path[300];
    snprintf(path, sizeof path, "%s/rt.gguf", tmpdir);
    CHECK(gguf_writer_write(w, path, &e) == 0);
    char tmp[310];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(!dl_file_exists(tmp));
    // atomic: a failed write leaves nothing behind
    CHECK(gguf_writer_write(w, "/nonexistent-dir/x.gguf", &e) != 0 && !dl_file_exists("/nonexistent-dir/x.gguf"));
    gguf_writer_free(w);

    GgufFile *g;
    CHECK(gguf_open(&g, path, &e) == 0);
    if (!g) {
        fprintf(stderr, "open: %s\n", e.msg);
        return;
    }
    CHECK(gguf_version(g) == 3);
    CHECK(gguf_alignment(g) == 64);
    CHECK(gguf_data_offset(g) % 64 == 0);
    // scalars back, bitwise
    for (size_t i = 0; i < DL_ARRAY_LEN(scal); i++) {
        snprintf(key, sizeof key, "s.%s", gguf_type_name(scal[i]));
        int kv = gguf_find_key(g, key);
        CHECK(kv >= 0 && gguf_kv_type(g, kv) == scal[i]);
    }
    int64_t iv;
    uint64_t uv;
    double fv;
    bool bv;
    CHECK(gguf_get_i64(g, "s.int8", &iv, &e) == 0 && iv == -120);
    CHECK(gguf_get_u64(g, "s.uint8", &uv, &e) == 0 && uv == 250);
    CHECK(gguf_get_u64(g, "s.uint16", &uv, &e) == 0 && uv == 65000);
    CHECK(gguf_get_i64(g, "s.int16", &iv, &e) == 0 && iv == -32000);
    CHECK(gguf_get_u64(g, "s.uint32", &uv, &e) == 0 && uv == 4000000000u);
    CHECK(gguf_get_i64(g, "s.int32", &iv, &e) == 0 && iv == -2000000000);
    CHECK(gguf_get_u64(g, "s.uint64", &uv, &e) == 0 && uv == 18000000000000000000ull);
    CHECK(gguf_get_i64(g, "s.int64", &iv, &e) == 0 && iv == -9000000000000000000ll);
    CHECK(gguf_get_f64(g, "s.float32", &fv, &e) == 0 && fv == (double)0.1f);
    CHECK(gguf_get_f64(g, "s.float64", &fv, &e) == 0 && fv == 0.1);
    CHECK(gguf_get_bool(g, "s.bool", &bv, &e) == 0 && bv);
    size_t len;
    const char *s = gguf_get_str_key(g, "s.string", &len, &e);
    CHECK(s && len == strlen("héllo \"world\"\n") && !strcmp(s, "héllo \"world\"\n"));
    s = gguf_get_str_key(g, "s.empty", &len, &e);
    CHECK(s && len == 0);
    // getter type checks
    CHECK(gguf_get_i64(g, "s.uint64", &iv, &e) != 0 && strstr(e.msg, "out of range"));
    CHECK(gguf_get_u64(g, "s.int8", &uv, &e) != 0 && strstr(e.msg, "non-negative"));
    CHECK(gguf_get_f64(g, "s.string", &fv, &e) != 0 && strstr(e.msg, "expected a number"));
    CHECK(gguf_get_bool(g, "s.uint8", &bv, &e) != 0 && strstr(e.msg, "expected bool"));
    CHECK(gguf_get_i64(g, "no.such.key", &iv, &e) != 0 && strstr(e.msg, "missing"));
    CHECK(gguf_get_str_key(g, "s.int8", &len, &e) == NULL && strstr(e.msg, "expected string"));
    // arrays back, bitwise
    for (size_t i = 0; i < DL_ARRAY_LEN(scal); i++) {
        snprintf(key, sizeof key, "a.%s", gguf_type_name(scal[i]));
        int kv = gguf_find_key(g, key);
        const GgufValue *av = gguf_kv_value(g, kv);
        CHECK(av && av->type == GGUF_TYPE_ARRAY && av->arr.elem == scal[i] && av->arr.n == 3);
        static const size_t esz[] = {1, 1, 2, 2, 4, 4, 4, 1, 8, 8, 8};
        if (scal[i] != GGUF_TYPE_BOOL) CHECK(av && !memcmp(av->arr.data, raw, 3 * esz[i]));
    }
    int ka = gguf_find_key(g, "a.int32");
    int32_t want;
    memcpy(&want, raw + 4, 4);
    CHECK(gguf_arr_int(g, ka, 1) == want);
    CHECK(gguf_arr_int(g, ka, 3) == 0);  // out of range is refused, not read
    int kb = gguf_find_key(g, "a.bool");
    CHECK(gguf_arr_int(g, kb, 0) == 1 && gguf_arr_int(g, kb, 1) == 0);
    int kf = gguf_find_key(g, "a.float64");
    double wd;
    memcpy(&wd, raw + 16, 8);
    CHECK(gguf_arr_float(g, kf, 2) == wd || (isnan(wd) && isnan(gguf_arr_float(g, kf, 2))));
    uint64_t n;
    int ks = gguf_find_arr(g, "a.string", GGUF_TYPE_STRING, &n, &e);
    CHECK(ks >= 0 && n == 3);
    for (int i = 0; i < 3; i++) CHECK(!strcmp(gguf_arr_str(g, ks, (uint64_t)i, &len), strs[i]) && len == strlen(strs[i]));
    CHECK(gguf_arr_str(g, ks, 3, &len) == NULL);
    CHECK(gguf_find_arr(g, "a.string", GGUF_TYPE_INT32, &n, &e) < 0 && strstr(e.msg, "array of string"));
    CHECK(gguf_find_arr(g, "a.uint8", GGUF_TYPE_INT64, &n, &e) >= 0);  // any integer element type is fine
    CHECK(gguf_find_arr(g, "s.int8", GGUF_TYPE_INT64, &n, &e) < 0 && strstr(e.msg, "expected an array"));
    CHECK(gguf_arr_len(g, gguf_find_key(g, "a.empty")) == 0 && gguf_arr_type(g, gguf_find_key(g, "a.empty")) == GGUF_TYPE_INT32);
    const GgufValue *nv = gguf_kv_value(g, gguf_find_key(g, "a.nested"));
    CHECK(nv && nv->arr.elem == GGUF_TYPE_ARRAY && nv->arr.n == 2);
    if (nv && nv->arr.n == 2) {
        GgufValue e0, x0;
        CHECK(gguf_value_elem(nv, 0, &e0) && e0.arr.n == 2 && gguf_value_elem(&e0, 1, &x0) && x0.i == 2);
        CHECK(gguf_value_elem(nv, 1, &e0) && e0.arr.n == 1 && gguf_value_elem(&e0, 0, &x0) && x0.i == 3);
    }
    const GgufValue *dv = gguf_kv_value(g, gguf_find_key(g, "a.deep"));
    CHECK(dv && dv->arr.n == 2 && dv->arr.items[0].arr.n == 1 && dv->arr.items[0].arr.items[0].arr.n == 1 &&
          !strcmp(dv->arr.items[0].arr.items[0].arr.items[0].str.ptr, "x") && dv->arr.items[1].arr.n == 0);
    char fb[256];
    gguf_value_format(nv, fb, sizeof fb, 4);
    CHECK(!strcmp(fb, "[array x 2] [[int32 x 2] [1, 2], [int32 x 1] [3]]"));

    // tensors
    CHECK(gguf_tensor_count(g) == (int)(DL_ARRAY_LEN(raw_types) + DL_ARRAY_LEN(conv_types) + 1));
    for (size_t k = 0; k < DL_ARRAY_LEN(raw_types); k++) {
        snprintf(key, sizeof key, "raw.%s", dtype_name(raw_types[k]));
        const GgufTensor *t = gguf_tensor(g, gguf_find_tensor(g, key));
        CHECK(t && t->dtype == (int)raw_types[k] && t->n_dims == 2 && t->ne[0] == cols && t->ne[1] == rows);
        CHECK(t && t->offset % 64 == 0);
        CHECK(t && t->nbytes == (uint64_t)dtype_nbytes(raw_types[k], rows * cols) && !memcmp(t->data, rawbuf[k], t->nbytes));
        free(rawbuf[k]);
    }
    float *y = malloc(sizeof(float) * rows * cols);
    uint8_t *q = malloc((size_t)dtype_nbytes(DT_F32, rows * cols));
    for (size_t k = 0; k < DL_ARRAY_LEN(conv_types); k++) {
        DType dt = conv_types[k];
        snprintf(key, sizeof key, "conv.%s", dtype_name(dt));
        const GgufTensor *t = gguf_tensor(g, gguf_find_tensor(g, key));
        CHECK(t && quantize(dt, x, q, rows * cols) == 0 && !memcmp(t->data, q, t->nbytes));  // bitwise the quantizer's output
        CHECK(t && dequantize(dt, t->data, y, rows * cols) == 0);
        // error bound per type: half a quantization step of each block
        double worst = 0;
        for (int64_t b = 0; b < rows * cols; b += 32) {
            float mn = INFINITY, mx = -INFINITY, amax = 0;
            for (int j = 0; j < 32; j++) mn = fminf(mn, x[b + j]), mx = fmaxf(mx, x[b + j]), amax = fmaxf(amax, fabsf(x[b + j]));
            // Q4_0 keeps a full step at the far end (q = 16 clamps to 15), the others half a step
            double step = dt == DT_Q8_0 ? amax / 127.0 : dt == DT_Q4_0 ? 2 * amax / 8.0 : dt == DT_Q4_1 ? (mx - mn) / 15.0 : 0;
            for (int j = 0; j < 32; j++) {
                double err = fabs((double)y[b + j] - x[b + j]);
                double bound = dt == DT_F32 ? 0 : dt == DT_F16 ? fabs(x[b + j]) * 1e-3 + 1e-7 : dt == DT_BF16 ? fabs(x[b + j]) * 4e-3 + 1e-30
                             : step * 0.5 * 1.01 + fabs(x[b + j]) * 2e-3 + 1e-6;  // fp16 scale rounding
                if (err > bound) worst = fmax(worst, err / (bound + 1e-30));
            }
        }
        if (worst > 0) fprintf(stderr, "  %s: error %.3g x the bound\n", dtype_name(dt), worst);
        CHECK(worst == 0);
    }
    CHECK(gguf_tensor(g, gguf_find_tensor(g, "conv.F32")) && !memcmp(gguf_tensor(g, gguf_find_tensor(g, "conv.F32"))->data, x, 4 * rows * cols));
    free(q);
    free(y);
    free(x);
    gguf_close(g);

    // truncation at every cut point before the end of the last tensor's data must be rejected
    size_t fn;
    uint8_t *buf = slurp(path, &fn);
    CHECK(buf != NULL);
    uint64_t need = 0;
    {
        GgufFile *g2;
        CHECK(gguf_open_memory(&g2, buf, fn, "full", &e) == 0);
        for (int i = 0; i < gguf_tensor_count(g2); i++) {
            const GgufTensor *t = gguf_tensor(g2, i);
            need = DL_MAX(need, gguf_data_offset(g2) + t->offset + t->nbytes);
        }
        gguf_close(g2);
    }
    int accepted = 0;
    for (uint64_t cut = 0; cut < need; cut += (cut < 4096 ? 1 : 61)) {
        uint8_t *c = malloc(cut ? cut : 1);  // exact-size copy so ASan sees any over-read
        memcpy(c, buf, cut);
        GgufFile *g3;
        if (gguf_open_memory(&g3, c, cut, "cut", &e) == 0) {
            accepted++;
            gguf_close(g3);
        } else if (!e.msg[0])
            accepted++;
        free(c);
    }
    CHECK(accepted == 0);
    free(buf);
}

// ---------------------------------------------------------------- crafted rejections

static void test_rejections(void) {
    B b = {0};
    put(&b, "GGUX", 4), u32(&b, 3), u64(&b, 0), u64(&b, 0);
    expect_reject(&b, "bad magic", "bad magic");
    put(&b, "GG", 2);
    expect_reject(&b, "bad magic", "2-byte file");
    expect_reject(&b, "bad magic", "empty");
    hdr(&b, 1, 0, 0);
    expect_reject(&b, "version 1", "v1");
    hdr(&b, 4, 0, 0);
    expect_reject(&b, "unsupported GGUF version 4", "v4");
    hdr(&b, 0x03000000u, 0, 0);
    expect_reject(&b, "big-endian", "big-endian");
    hdr(&b, 3, 0, 1ull << 62);
    expect_reject(&b, "metadata count", "absurd kv count");
    hdr(&b, 3, 1ull << 40, 0);
    expect_reject(&b, "tensor count", "absurd tensor count");
    put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0);
    expect_reject(&b, "truncated", "header cut");

    // metadata values
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, GGUF_TYPE_BOOL), put(&b, "\x02", 1);
    expect_reject(&b, "expected 0 or 1", "bool 2");
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, GGUF_TYPE_ARRAY), u32(&b, GGUF_TYPE_BOOL), u64(&b, 2), put(&b, "\x01\x07", 2);
    expect_reject(&b, "expected 0 or 1", "bool array 7");
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, 13), u32(&b, 0);
    expect_reject(&b, "unknown value type 13", "value type 13");
    hdr(&b, 3, 0, 1), str(&b, "k\xff"), u32(&b, GGUF_TYPE_UINT8), put(&b, "\x01", 1);
    expect_reject(&b, "UTF-8", "invalid UTF-8 key");
    hdr(&b, 3, 0, 1), str(&b, "\xc0\xaf"), u32(&b, GGUF_TYPE_UINT8), put(&b, "\x01", 1);
    expect_reject(&b, "UTF-8", "overlong UTF-8 key");
    hdr(&b, 3, 0, 1), u64(&b, 3), put(&b, "a\0b", 3), u32(&b, GGUF_TYPE_UINT8), put(&b, "\x01", 1);
    expect_reject(&b, "UTF-8", "NUL in key");
    hdr(&b, 3, 0, 1), str(&b, ""), u32(&b, GGUF_TYPE_UINT8), put(&b, "\x01", 1);
    expect_reject(&b, "empty metadata key", "empty key");
    {
        hdr(&b, 3, 0, 1);
        u64(&b, 70000);
        for (int i = 0; i < 70000; i++) put(&b, "a", 1);
        u32(&b, GGUF_TYPE_UINT8), put(&b, "\x01", 1);
        expect_reject(&b, "at most 65535", "over-long key");
    }
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, GGUF_TYPE_STRING), u64(&b, 1ull << 60);
    expect_reject(&b, "truncated", "string past EOF");
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, GGUF_TYPE_ARRAY), u32(&b, GGUF_TYPE_UINT64), u64(&b, 0x0000FFFFFFFFFFFFull), u64(&b, 0);
    expect_reject(&b, "does not fit", "absurd array count");
    // a high-bits-only count could be a u32 count followed by data: the u32 reading must then explain the rest
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, GGUF_TYPE_ARRAY), u32(&b, GGUF_TYPE_UINT64), u64(&b, 1ull << 61), u64(&b, 0);
    expect_reject(&b, "does not fit", "absurd array count, low half 0");
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, GGUF_TYPE_ARRAY), u32(&b, 77), u64(&b, 1);
    expect_reject(&b, "unknown array element type 77", "array elem type");
    hdr(&b, 3, 0, 1), str(&b, "k"), u32(&b, GGUF_TYPE_ARRAY);
    for (int d = 0; d < GGUF_MAX_DEPTH + 1; d++) u32(&b, GGUF_TYPE_ARRAY), u64(&b, 1);
    u32(&b, GGUF_TYPE_UINT8), u64(&b, 0);
    expect_reject(&b, "nested deeper", "deep nesting");
    hdr(&b, 3, 0, 2), str(&b, "k"), u32(&b, GGUF_TYPE_UINT8), put(&b, "\x01", 1), str(&b, "k"), u32(&b, GGUF_TYPE_UINT8), put(&b, "\x01", 1);
    expect_reject(&b, "duplicate metadata key 'k'", "duplicate key");
    hdr(&b, 3, 0, 1), str(&b, "general.alignment"), u32(&b, GGUF_TYPE_UINT32), u32(&b, 48);
    expect_reject(&b, "power of two", "alignment 48");
    hdr(&b, 3, 0, 1), str(&b, "general.alignment"), u32(&b, GGUF_TYPE_UINT32), u32(&b, 0);
    expect_reject(&b, "power of two", "alignment 0");
    hdr(&b, 3, 0, 1), str(&b, "general.alignment"), u32(&b, GGUF_TYPE_UINT64), u64(&b, 32);
    expect_reject(&b, "expected uint32", "alignment type");

    // tensor infos
    uint64_t ne2[2] = {32, 2}, ne1[1] = {32};
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 5, (uint64_t[]){1, 1, 1, 1, 1}, 0, 0);
    expect_reject(&b, "n_dims = 5", "5 dims");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 0, NULL, 0, 0), zeros(&b, 64);
    expect_reject(&b, "n_dims = 0", "0 dims");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 2, ne2, 99, 0);
    expect_reject(&b, "unknown ggml type 99", "ggml type 99");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 1, (uint64_t[]){33}, 8, 0);
    expect_reject(&b, "not a multiple of the Q8_0 block size", "block size");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 2, (uint64_t[]){1ull << 40, 1ull << 40}, 0, 0);
    expect_reject(&b, "overflow", "ne overflow");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 2, (uint64_t[]){1ull << 30, 1ull << 30}, 0, 0);
    expect_reject(&b, "past the end", "huge tensor");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 1, ne1, 0, 16);
    expect_reject(&b, "not a multiple of the alignment", "unaligned offset");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 1, ne1, 0, 0), pad_to(&b, 32), zeros(&b, 127);
    expect_reject(&b, "past the end", "data past EOF");
    hdr(&b, 3, 1, 0), tinfo(&b, "t", 1, ne1, 0, UINT64_MAX - 31);
    expect_reject(&b, "past the end", "offset overflow");
    hdr(&b, 3, 2, 0), tinfo(&b, "a", 1, ne1, 0, 0), tinfo(&b, "b", 1, ne1, 0, 64), pad_to(&b, 32), zeros(&b, 256);
    expect_reject(&b, "overlap", "overlap");
    hdr(&b, 3, 2, 0), tinfo(&b, "a", 1, ne1, 0, 0), tinfo(&b, "a", 1, ne1, 0, 128), pad_to(&b, 32), zeros(&b, 256);
    expect_reject(&b, "duplicate tensor name 'a'", "duplicate tensor");
    hdr(&b, 3, 1, 0), tinfo(&b, "", 1, ne1, 0, 0), pad_to(&b, 32), zeros(&b, 128);
    expect_reject(&b, "empty name", "empty tensor name");
    {
        char nm[70];
        memset(nm, 'x', 65);
        nm[65] = 0;
        hdr(&b, 3, 1, 0), tinfo(&b, nm, 1, ne1, 0, 0), pad_to(&b, 32), zeros(&b, 128);
        expect_reject(&b, "at most 64", "65-byte tensor name");
    }

    // accepted variants: v2, disjoint neighbours, tensors in any order, u32 array counts
    hdr(&b, 2, 2, 1), str(&b, "k"), u32(&b, GGUF_TYPE_UINT8), put(&b, "\x05", 1);
    tinfo(&b, "b", 1, ne1, 0, 128), tinfo(&b, "a", 1, ne1, 0, 0), pad_to(&b, 32), zeros(&b, 256);
    {
        GgufFile *g;
        DlError e;
        CHECK(gguf_open_memory(&g, b.b, b.n, "v2", &e) == 0);
        if (g) {
            CHECK(gguf_version(g) == 2 && gguf_tensor_count(g) == 2 && gguf_tensor(g, 1)->data == b.b + gguf_data_offset(g));
            gguf_close(g);
        } else fprintf(stderr, "  v2: %s\n", e.msg);
        free(b.b);
        memset(&b, 0, sizeof b);
    }
    hdr(&b, 3, 0, 2), str(&b, "arr"), u32(&b, GGUF_TYPE_ARRAY), u32(&b, GGUF_TYPE_STRING), u32(&b, 2), str(&b, "ab"), str(&b, "c");
    str(&b, "n"), u32(&b, GGUF_TYPE_UINT32), u32(&b, 9);
    {
        GgufFile *g;
        DlError e;
        CHECK(gguf_open_memory(&g, b.b, b.n, "u32 counts", &e) == 0);
        if (g) {
            size_t len;
            int kv = gguf_find_key(g, "arr");
            CHECK(gguf_arr_len(g, kv) == 2 && !strcmp(gguf_arr_str(g, kv, 1, &len), "c"));
            uint64_t v;
            CHECK(gguf_get_u64(g, "n", &v, &e) == 0 && v == 9);
            gguf_close(g);
        } else fprintf(stderr, "  u32 counts: %s\n", e.msg);
        free(b.b);
        memset(&b, 0, sizeof b);
    }
    // a file that is not there / not regular
    GgufFile *g;
    DlError e;
    CHECK(gguf_open(&g, "/nonexistent.gguf", &e) != 0 && strstr(e.msg, "cannot open"));
    CHECK(gguf_open(&g, "/tmp", &e) != 0 && strstr(e.msg, "not a regular file"));
}

// Every dequantizer must reject partial blocks and unsupported types instead of reading past the input.
static void test_quant_api(void) {
    float y[256];
    uint8_t q[512] = {0};
    CHECK(dequantize(DT_Q8_0, q, y, 31) != 0);
    CHECK(dequantize(DT_Q6_K, q, y, 128) != 0);
    CHECK(dequantize(DT_I32, q, y, 4) != 0);
    CHECK(quantize(DT_Q4_K, y, q, 256) != 0);
    CHECK(quant_can_dequantize(DT_Q5_K) && !quant_can_quantize(DT_Q5_K));
    // NaN/inf inputs encode without undefined behaviour (UBSan builds) and decode to something
    float bad[32];
    for (int j = 0; j < 32; j++) bad[j] = j == 3 ? NAN : j == 4 ? INFINITY : (float)j;
    CHECK(quantize(DT_Q8_0, bad, q, 32) == 0 && quantize(DT_Q4_0, bad, q, 32) == 0 && quantize(DT_Q4_1, bad, q, 32) == 0);
    // a known Q4_1 block: d = 0.5, m = -1, nibbles 0..15 then 15..0
    uint8_t blk[20];
    uint16_t d = f32_to_f16(0.5f), m = f32_to_f16(-1.0f);
    memcpy(blk, &d, 2);
    memcpy(blk + 2, &m, 2);
    for (int j = 0; j < 16; j++) blk[4 + j] = (uint8_t)(j | ((15 - j) << 4));
    CHECK(dequantize(DT_Q4_1, blk, y, 32) == 0);
    int ok = 1;
    for (int j = 0; j < 16; j++) ok &= y[j] == 0.5f * j - 1 && y[16 + j] == 0.5f * (15 - j) - 1;
    CHECK(ok);
    // a known Q8_0 block
    uint8_t b8[34];
    d = f32_to_f16(0.25f);
    memcpy(b8, &d, 2);
    for (int j = 0; j < 32; j++) b8[2 + j] = (uint8_t)(int8_t)(j - 16);
    CHECK(dequantize(DT_Q8_0, b8, y, 32) == 0);
    ok = 1;
    for (int j = 0; j < 32; j++) ok &= y[j] == 0.25f * (j - 16);
    CHECK(ok);
}

// Our quantizer against the PyPI gguf package's (tests/data/quant_ref.gguf, made by make_quant_ref.py):
// the same fp32 rows must encode to the same bytes.
static void test_quant_reference(void) {
    GgufFile *g;
    DlError e;
    if (gguf_open(&g, "tests/data/quant_ref.gguf", &e)) {
        check_fail_++;
        fprintf(stderr, "  %s\n", e.msg);
        return;
    }
    const GgufTensor *x = gguf_tensor(g, gguf_find_tensor(g, "x"));
    CHECK(x && x->dtype == DT_F32);
    const DType types[] = {DT_F16, DT_BF16, DT_Q8_0, DT_Q4_0, DT_Q4_1};
    float *xf = malloc(x->nbytes);
    memcpy(xf, x->data, x->nbytes);
    uint8_t *mine = malloc(x->nbytes);
    for (size_t k = 0; k < DL_ARRAY_LEN(types); k++) {
        const GgufTensor *t = gguf_tensor(g, gguf_find_tensor(g, dtype_name(types[k])));
        CHECK(t && t->dtype == (int)types[k] && t->numel == x->numel);
        if (!t) continue;
        CHECK(quantize(types[k], xf, mine, x->numel) == 0);
        int bad = 0;
        for (uint64_t i = 0; i < t->nbytes; i++) bad += mine[i] != t->data[i];
        if (bad) fprintf(stderr, "  %s: %d of %llu bytes differ from gguf-py's quantizer\n", dtype_name(types[k]), bad, (unsigned long long)t->nbytes);
        CHECK(bad == 0);
    }
    free(mine);
    free(xf);
    gguf_close(g);
}

// The teacher file (when fetched): its header, tensor count and types.
static void test_teacher(void) {
    const char *path = "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (!dl_file_exists(path)) {
        printf("teacher not fetched; skipping the teacher checks\n");
        return;
    }
    GgufFile *g;
    DlError e;
    CHECK(gguf_open(&g, path, &e) == 0);
    if (!g) return;
    CHECK(gguf_tensor_count(g) == 272);
    int nq41 = 0, nq80 = 0, nf32 = 0;
    for (int i = 0; i < gguf_tensor_count(g); i++) {
        int t = gguf_tensor(g, i)->dtype;
        nq41 += t == DT_Q4_1, nq80 += t == DT_Q8_0, nf32 += t == DT_F32;
    }
    CHECK(nq41 == 210 && nq80 == 1 && nf32 == 61);
    uint64_t n;
    CHECK(gguf_find_arr(g, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, &n, &e) >= 0 && n == 49152);
    size_t len;
    CHECK(!strcmp(gguf_get_str_key(g, "general.architecture", &len, &e), "llama"));
    gguf_close(g);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/distill_test_gguf_%d", (int)getpid());
    DlError e;
    dl_mkdirs(tmpdir, &e);
    test_round_trip();
    test_rejections();
    test_quant_api();
    test_quant_reference();
    test_teacher();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    return check_report("test_gguf");
}
