// test_safetensors.c: writer -> reader round trips (single file with every plain dtype, scalar and empty
// tensors, metadata; sharded with index), fp32 conversion, and every rejection path of the reader on
// crafted headers and indexes (messages checked by substring), plus truncation at every cut point.
#include <string.h>
#include <unistd.h>

#include "distill/safetensors.h"
#include "tests/check.h"

static char tmpdir[256];

static char *tpath(const char *name) { return dl_path_join(tmpdir, name); }

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(p, 1, n, f);
        fclose(f);
    }
}

// A safetensors file from a header string and n data bytes (0x11 each).
static uint8_t *craft(const char *header, size_t ndata, size_t *n) {
    uint64_t hl = strlen(header);
    *n = 8 + hl + ndata;
    uint8_t *b = malloc(*n);
    memcpy(b, &hl, 8);
    memcpy(b + 8, header, hl);
    memset(b + 8 + hl, 0x11, ndata);
    return b;
}

static void expect_reject_buf(const uint8_t *b, size_t n, const char *want, const char *what) {
    SafeTensors *s = NULL;
    DlError e = {{0}};
    uint8_t *copy = malloc(n ? n : 1);  // exact size, so ASan catches an over-read
    memcpy(copy, b, n);
    int rc = st_open_memory(&s, copy, n, "crafted", &e);
    if (rc == 0) {
        check_fail_++;
        fprintf(stderr, "  %s: accepted, expected an error with '%s'\n", what, want);
        st_close(s);
    } else if (!strstr(e.msg, want)) {
        check_fail_++;
        fprintf(stderr, "  %s: message '%s' lacks '%s'\n", what, e.msg, want);
    } else
        check_pass_++;
    free(copy);
}

static void expect_reject(const char *header, size_t ndata, const char *want, const char *what) {
    size_t n;
    uint8_t *b = craft(header, ndata, &n);
    expect_reject_buf(b, n, want, what);
    free(b);
}

static void test_round_trip(void) {
    DlError e;
    float f32[12];
    for (int i = 0; i < 12; i++) f32[i] = (float)i * 0.37f - 2.0f;
    uint16_t f16[6], bf16[6];
    for (int i = 0; i < 6; i++) f16[i] = f32_to_f16(f32[i]), bf16[i] = f32_to_bf16(f32[i] * 3);
    int64_t i64[5] = {-1, 0, 1, INT64_MAX, INT64_MIN};
    uint8_t u8[3] = {0, 128, 255}, bo[2] = {1, 0};
    double f64[2] = {0.1, -1e300};
    float scalar = 42.5f;
    int64_t s_a[2] = {3, 4}, s_f16[2] = {2, 3}, s_bf[3] = {1, 2, 3}, s_i64[1] = {5}, s_u8[1] = {3}, s_bo[1] = {2},
            s_f64[1] = {2}, s_empty[2] = {0, 3};
    StWriteTensor t[] = {
        {"model.a", DT_F32, 2, s_a, f32},  {"b.f16", DT_F16, 2, s_f16, f16}, {"c.bf16", DT_BF16, 3, s_bf, bf16},
        {"d.i64", DT_I64, 1, s_i64, i64},  {"e.u8", DT_U8, 1, s_u8, u8},     {"f.bool", DT_BOOL, 1, s_bo, bo},
        {"g.f64", DT_F64, 1, s_f64, f64},  {"h.scalar", DT_F32, 0, NULL, &scalar}, {"i.empty", DT_F32, 2, s_empty, f32},
        {"j \"quoted\"\\name", DT_U8, 1, s_u8, u8},
    };
    const int nt = (int)DL_ARRAY_LEN(t);
    const char *meta[] = {"format", "pt", "note", "tab\there"};
    char *p = tpath("single.safetensors");
    CHECK(st_write(p, t, nt, meta, 2, &e) == 0);
    size_t n;
    uint8_t *buf = (uint8_t *)dl_read_file(p, &n, &e);
    uint64_t hl;
    memcpy(&hl, buf, 8);
    CHECK(hl % 8 == 0 && buf[8] == '{');
    SafeTensors *s;
    CHECK(st_open(&s, p, &e) == 0);
    if (!s) {
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    CHECK(st_count(s) == nt);
    for (int i = 0; i < nt; i++) {
        int k = st_find(s, t[i].name);
        CHECK(k >= 0);
        if (k < 0) continue;
        const StTensor *r = st_tensor(s, k);
        CHECK(r->dtype == t[i].dtype && r->ndim == t[i].ndim);
        int64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++) {
            CHECK(r->shape[d] == t[i].shape[d]);
            numel *= t[i].shape[d];
        }
        CHECK(r->numel == numel && r->nbytes == (uint64_t)(numel * dtype_info(t[i].dtype)->block_bytes));
        CHECK(!memcmp(r->data, t[i].data, r->nbytes));
    }
    // larger elements first (aligned data), then names
    CHECK(st_tensor(s, st_find(s, "d.i64"))->begin < st_tensor(s, st_find(s, "model.a"))->begin);
    CHECK(st_tensor(s, st_find(s, "model.a"))->begin < st_tensor(s, st_find(s, "b.f16"))->begin);
    CHECK(st_metadata_count(s) == 2 && !strcmp(st_metadata_key(s, 0), "format") && !strcmp(st_metadata_value(s, 1), "tab\there"));
    float y[12];
    CHECK(st_to_f32(st_tensor(s, st_find(s, "model.a")), y, &e) == 0 && !memcmp(y, f32, sizeof f32));
    CHECK(st_to_f32(st_tensor(s, st_find(s, "b.f16")), y, &e) == 0);
    int ok = 1;
    for (int i = 0; i < 6; i++) ok &= y[i] == f16_to_f32(f16[i]);
    CHECK(ok);
    CHECK(st_to_f32(st_tensor(s, st_find(s, "c.bf16")), y, &e) == 0);
    ok = 1;
    for (int i = 0; i < 6; i++) ok &= y[i] == bf16_to_f32(bf16[i]);
    CHECK(ok);
    CHECK(st_to_f32(st_tensor(s, st_find(s, "d.i64")), y, &e) != 0 && strstr(e.msg, "F32, F16 or BF16"));
    st_close(s);

    // every cut point of the file is rejected
    int accepted = 0;
    for (size_t cut = 0; cut < n; cut++) {
        uint8_t *c = malloc(cut ? cut : 1);
        memcpy(c, buf, cut);
        if (st_open_memory(&s, c, cut, "cut", &e) == 0) {
            accepted++;
            st_close(s);
        }
        free(c);
    }
    CHECK(accepted == 0);
    free(buf);
    // writer errors
    StWriteTensor dup[2] = {{"x", DT_F32, 1, s_i64, f32}, {"x", DT_F32, 1, s_i64, f32}};
    char *p2 = tpath("dup.safetensors");
    CHECK(st_write(p2, dup, 2, NULL, 0, &e) != 0 && strstr(e.msg, "duplicate") && !dl_file_exists(p2));
    StWriteTensor q[1] = {{"q", DT_Q4_0, 1, s_i64, f32}};
    CHECK(st_write(p2, q, 1, NULL, 0, &e) != 0 && strstr(e.msg, "cannot be stored"));
    CHECK(st_write("/nonexistent-dir/x.safetensors", t, 1, NULL, 0, &e) != 0);
    free(p2);
    free(p);
}

static void test_sharded(void) {
    DlError e;
    enum { NT = 5 };
    float data[NT][64];
    char names[NT][32];
    int64_t shape[NT][2];
    StWriteTensor t[NT];
    for (int i = 0; i < NT; i++) {
        for (int j = 0; j < 64; j++) data[i][j] = (float)(i * 100 + j);
        snprintf(names[i], sizeof names[i], "layer.%d.w", i);
        shape[i][0] = 8, shape[i][1] = 8 - (i == 2) * 4;  // one smaller tensor
        t[i] = (StWriteTensor){names[i], DT_F32, 2, shape[i], data[i]};
    }
    char *dir = tpath("sharded");
    int ns = 0;
    const char *meta[] = {"format", "pt"};
    CHECK(st_write_sharded(dir, t, NT, 512, meta, 1, &ns, &e) == 0);  // 256 B each: 2 per shard
    CHECK(ns == 3);
    char *idx = dl_path_join(dir, "model.safetensors.index.json");
    CHECK(dl_file_exists(idx));
    char *s3 = dl_path_join(dir, "model-00003-of-00003.safetensors");
    CHECK(dl_file_exists(s3));
    SafeTensors *s;
    for (int via = 0; via < 2; via++) {
        CHECK(st_open(&s, via ? idx : dir, &e) == 0);
        if (!s) {
            fprintf(stderr, "%s\n", e.msg);
            continue;
        }
        CHECK(st_count(s) == NT && st_shard_count(s) == 3);
        for (int i = 0; i < NT; i++) {
            int k = st_find(s, names[i]);
            CHECK(k >= 0 && !memcmp(st_tensor(s, k)->data, data[i], st_tensor(s, k)->nbytes));
        }
        CHECK(st_metadata_count(s) == 1);
        st_close(s);
    }
    // everything in one shard: model.safetensors alone
    char *dir1 = tpath("one");
    CHECK(st_write_sharded(dir1, t, NT, 1 << 20, NULL, 0, &ns, &e) == 0 && ns == 1);
    char *single = dl_path_join(dir1, "model.safetensors");
    CHECK(dl_file_exists(single));
    CHECK(st_open(&s, dir1, &e) == 0 && st_count(s) == NT);
    if (s) st_close(s);

    // index inconsistencies
    const char *bad[][2] = {
        {"{\"weight_map\": {\"layer.0.w\": \"missing.safetensors\"}}", "cannot open"},
        {"{\"weight_map\": {\"layer.0.w\": \"../x.safetensors\"}}", "plain file name"},
        {"{\"weight_map\": {\"layer.0.w\": 3}}", "not a string"},
        {"{\"metadata\": {}}", "weight_map"},
        {"{\"weight_map\": ", "not valid JSON"},
        {"{\"weight_map\": {\"layer.0.w\": \"model-00001-of-00003.safetensors\", \"nope\": \"model-00001-of-00003.safetensors\"}}", "missing from"},
        {"{\"weight_map\": {\"layer.0.w\": \"model-00001-of-00003.safetensors\"}}", "not listed in the index"},
        {"{\"weight_map\": {\"layer.0.w\": \"model-00001-of-00003.safetensors\", \"layer.1.w\": \"model-00001-of-00003.safetensors\", \"layer.2.w\": \"model-00001-of-00003.safetensors\"}}", "is listed in"},
    };
    char *bidx = dl_path_join(dir, "bad.index.json");
    for (size_t i = 0; i < DL_ARRAY_LEN(bad); i++) {
        write_bytes(bidx, bad[i][0], strlen(bad[i][0]));
        int rc = st_open(&s, bidx, &e);
        CHECK(rc != 0);
        if (rc == 0) st_close(s);
        else if (!strstr(e.msg, bad[i][1])) {
            check_fail_++;
            fprintf(stderr, "  index %zu: '%s' lacks '%s'\n", i, e.msg, bad[i][1]);
        }
    }
    CHECK(st_open(&s, tmpdir, &e) != 0 && strstr(e.msg, "no model.safetensors"));
    free(bidx), free(idx), free(s3), free(single), free(dir1), free(dir);
}

static void test_rejections(void) {
    // the smallest valid file, as a baseline
    {
        size_t n;
        uint8_t *b = craft("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}  ", 8, &n);
        SafeTensors *s;
        DlError e;
        CHECK(st_open_memory(&s, b, n, "ok", &e) == 0);
        if (s) st_close(s);
        free(b);
    }
    expect_reject_buf((const uint8_t *)"\x10\0\0", 3, "truncated", "3 bytes");
    {
        uint64_t big = 200000000;
        uint8_t b[16];
        memcpy(b, &big, 8);
        memcpy(b + 8, "{}      ", 8);
        expect_reject_buf(b, 16, "exceeds the limit", "huge header");
        big = 9;
        memcpy(b, &big, 8);
        expect_reject_buf(b, 16, "runs past the end", "header past EOF");
    }
    expect_reject("[1,2]", 0, "does not start with '{'", "array header");
    expect_reject("{\"a\":", 0, "not valid JSON", "bad JSON");
    expect_reject("{}x", 0, "unexpected bytes", "junk after JSON");
    expect_reject("{\"a\xff\":1}", 0, "UTF-8", "non-UTF-8 header");
    expect_reject("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "unsupported dtype \"F8_E4M3\"", "F8");
    expect_reject("{\"a\":{\"dtype\":\"Q4_0\",\"shape\":[32],\"data_offsets\":[0,18]}}", 18, "unsupported dtype", "quantized dtype");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape[0]", "negative dim");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}", 8, "shape[0]", "fractional dim");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "dimensions", "9 dims");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, "overflow", "shape overflow");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, "[begin, end]", "one offset");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "end before", "end < begin");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}", 12, "needs 8", "size mismatch");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "past the end", "data past EOF");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1e300,1e300]}}", 8, "non-negative integers", "1e300");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlaps", "overlap");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}", 20, "hole", "hole");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 9, "cover 8 bytes of a 9-byte", "trailing data");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "appears twice", "duplicate");
    expect_reject("{\"__metadata__\":{\"k\":1}}", 0, "must be strings", "metadata int");
    expect_reject("{\"__metadata__\":[]}", 0, "not an object", "metadata list");
    expect_reject("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "\"dtype\"", "no dtype");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, "\"shape\"", "no shape");
    expect_reject("{\"a\":5}", 0, "not an object", "entry not object");
    expect_reject("{\"\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "empty name", "empty name");
    DlError e;
    SafeTensors *s;
    CHECK(st_open(&s, "/nonexistent.safetensors", &e) != 0 && strstr(e.msg, "cannot open"));
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/distill_test_st_%d", (int)getpid());
    DlError e;
    dl_mkdirs(tmpdir, &e);
    test_round_trip();
    test_sharded();
    test_rejections();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    return check_report("test_safetensors");
}
