// test_checkpoint.c: HDF5 checkpoints: bitwise round trip of weights, optimizer and state; a flipped
// byte is caught (by the marker and by the dataset checksum); a truncated newest checkpoint falls back
// to the previous one with a warning; keep-last-N; leftovers of interrupted writes are ignored; a real
// crash (abort in a child between the temporary write and the rename) loses nothing; non-finite values
// are refused; shape mismatches are named.
#include <fcntl.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "distill/checkpoint.h"
#include "distill/h5util.h"
#include "tests/check.h"

static char g_dir[256];

static void build(Registry *r, int64_t rows) {
    reg_init(r);
    int64_t a[2] = {rows, 24}, b[1] = {24}, c[3] = {6, 1, 4};
    reg_add(r, "model.embed_tokens.weight", ROLE_EMBED, -1, 2, a);
    reg_add(r, "model.layers.0.input_layernorm.weight", ROLE_NORM, 0, 1, b);
    reg_add(r, "model.layers.0.mamba.conv1d.weight", ROLE_MAMBA, 0, 3, c);
    r->t[1].trainable = false;
}

static void fill(float *p, int64_t n, uint64_t seed) {
    Rng g;
    rng_init(&g, seed, 0);
    for (int64_t i = 0; i < n; i++) p[i] = (float)rng_normal(&g);
}

static void make_state(CkptState *st, int stage, int64_t step) {
    ckpt_state_init(st);
    st->stage_index = stage;
    snprintf(st->stage_name, sizeof st->stage_name, "layerwise");
    st->step = step;
    ckpt_state_set_recipe(st, "[run]\nname = \"t\"\nseed = 1\n");
    ckpt_state_set_int(st, "loader.shard", 3);
    ckpt_state_set_int(st, "loader.pos", -123456789012345LL);
    uint8_t blob[300];
    for (int i = 0; i < 300; i++) blob[i] = (uint8_t)(i * 7);
    ckpt_state_set_blob(st, "loader_perm", blob, sizeof blob);
    ckpt_state_set_blob(st, "empty", NULL, 0);
    Rng r;
    rng_init(&r, 42, 1);
    rng_u64(&r);
    ckpt_state_set_rng(st, "data", &r);
    rng_init(&r, 42, 2);
    ckpt_state_set_rng(st, "sample", &r);
}

static int count_files(const char *suffix) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "ls %s | grep -c '%s$'", g_dir, suffix);
    FILE *p = popen(cmd, "r");
    int n = -1;
    if (p && fscanf(p, "%d", &n) != 1) n = -1;
    if (p) pclose(p);
    return n;
}

// Captures what dl_warn prints to stderr during fn.
static char g_captured[8192];
static int find_latest_captured(char *out, size_t n) {
    fflush(stderr);
    int saved = dup(2);
    char path[300];
    snprintf(path, sizeof path, "%s/stderr.txt", g_dir);
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    dup2(fd, 2);
    DlError e;
    int rc = checkpoint_find_latest(g_dir, out, n, &e);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    close(fd);
    size_t len = 0;
    char *t = dl_read_file(path, &len, &e);
    snprintf(g_captured, sizeof g_captured, "%s", t ? t : "");
    free(t);
    unlink(path);
    return rc;
}

static void write_step(const Registry *reg, const float *p, const Optim *o, int stage, int64_t step, int keep) {
    CkptState st;
    make_state(&st, stage, step);
    DlError e;
    int rc = checkpoint_write(g_dir, reg, p, o, &st, keep, NULL, 0, &e);
    if (rc) fprintf(stderr, "write failed: %s\n", e.msg);
    CHECK(rc == 0);
    ckpt_state_free(&st);
}

// The shared string attributes (h5util): what they write reads back, and so do the string types that earlier
// versions wrote (optimizer shards: ASCII, null-terminated, size strlen + 1; checkpoints: ASCII, null-padded,
// size strlen) and a variable-length one; a missing or non-string attribute fails, a long one is truncated.
static void string_attrs(void) {
    char path[300];
    snprintf(path, sizeof path, "%s/attrs.h5", g_dir);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    CHECK(f >= 0);
    CHECK(h5_attr_put_str(f, "now", "distill-checkpoint") == 0 && h5_attr_put_str(f, "empty", "") == 0);
    CHECK(h5_attr_put_str(f, "utf8", "d\xc3\xa9j\xc3\xa0") == 0 && h5_attr_put_i64(f, "int", 7) == 0);
    struct { const char *name; size_t size; H5T_str_t pad; } old[] = {{"old_term", 6, H5T_STR_NULLTERM}, {"old_pad", 5, H5T_STR_NULLPAD}};
    for (int i = 0; i < 2; i++) {
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, old[i].size);
        H5Tset_strpad(t, old[i].pad);
        CHECK(h5_attr_put(f, old[i].name, t, t, "shard") == 0);
        H5Tclose(t);
    }
    hid_t vt = H5Tcopy(H5T_C_S1);
    H5Tset_size(vt, H5T_VARIABLE);
    const char *vs = "variable";
    CHECK(h5_attr_put(f, "var", vt, vt, &vs) == 0);
    H5Tclose(vt);
    H5Fclose(f);
    f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(f >= 0);
    char buf[32];
    memset(buf, 'x', sizeof buf);
    CHECK(h5_attr_get_strn(f, "now", buf, sizeof buf) == 0 && !strcmp(buf, "distill-checkpoint"));
    CHECK(h5_attr_get_strn(f, "empty", buf, sizeof buf) == 0 && buf[0] == 0);
    CHECK(h5_attr_get_strn(f, "utf8", buf, sizeof buf) == 0 && !strcmp(buf, "d\xc3\xa9j\xc3\xa0"));
    CHECK(h5_attr_get_strn(f, "old_term", buf, sizeof buf) == 0 && !strcmp(buf, "shard"));
    CHECK(h5_attr_get_strn(f, "old_pad", buf, sizeof buf) == 0 && !strcmp(buf, "shard"));
    char *v = h5_attr_get_str(f, "var");
    CHECK(v && !strcmp(v, "variable"));
    free(v);
    CHECK(h5_attr_get_strn(f, "now", buf, 8) == 0 && !strcmp(buf, "distill"));
    CHECK(h5_attr_get_strn(f, "missing", buf, sizeof buf) == -1 && h5_attr_get_str(f, "int") == NULL);
    H5Fclose(f);
    unlink(path);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/distill_test_ckpt_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    string_attrs();
    Registry reg;
    build(&reg, 40);
    float *p = dl_calloc((size_t)reg.numel, 4), *g = dl_calloc((size_t)reg.numel, 4);
    fill(p, reg.numel, 1);
    OptimConfig oc;
    optim_config_default(&oc);
    oc.total_steps = 10;
    oc.outlier_warmup = 1;
    Optim o;
    DlError e;
    CHECK(optim_init(&o, &oc, &reg, &e) == 0);
    for (int s = 0; s < 3; s++) {  // some real optimizer state
        fill(g, reg.numel, 10 + s);
        OptimResult r;
        optim_step(&o, p, g, 1.0, &r);
    }

    // ---- round trip
    CkptState st;
    make_state(&st, 1, 7);
    char path[512];
    CHECK(checkpoint_write(g_dir, &reg, p, &o, &st, 3, path, sizeof path, &e) == 0);
    CHECK(strstr(path, "ckpt-01-00000007.h5") != NULL);
    CHECK(checkpoint_is_hdf5(path));
    CHECK(checkpoint_verify(path, &e) == 0);
    {
        char cmd[600];  // the marker is in sha256sum format
        snprintf(cmd, sizeof cmd, "cd %s && sha256sum --status -c ckpt-01-00000007.done", g_dir);
        CHECK(system(cmd) == 0);
    }
    float *p2 = dl_calloc((size_t)reg.numel, 4);
    CHECK(checkpoint_load_weights(path, &reg, p2, 0, &e) == 3);
    for (int i = 0; i < reg.n; i++)
        CHECK(memcmp(p + reg.t[i].offset, p2 + reg.t[i].offset, (size_t)reg.t[i].numel * 4) == 0);
    Optim o2;
    optim_init(&o2, &oc, &reg, &e);
    CHECK(checkpoint_has_optim(path));
    CHECK(checkpoint_load_optim(path, &o2, &e) == 0);
    for (int i = 0; i < reg.n; i++) {
        const TensorInfo *t = &reg.t[i];
        if (!t->trainable) continue;
        CHECK(memcmp(o.m + t->offset, o2.m + t->offset, (size_t)t->numel * 4) == 0);
        CHECK(memcmp(o.v + t->offset, o2.v + t->offset, (size_t)t->numel * 4) == 0);
    }
    CHECK(memcmp(&o.st, &o2.st, sizeof o.st) == 0);
    CkptState rd;
    ckpt_state_init(&rd);
    CHECK(checkpoint_read_state(path, &rd, &e) == 0);
    CHECK(rd.stage_index == 1 && rd.step == 7 && !strcmp(rd.stage_name, "layerwise"));
    CHECK(!strcmp(rd.version, DISTILL_VERSION));
    CHECK(rd.recipe && !strcmp(rd.recipe, st.recipe));
    int64_t v = 0;
    CHECK(ckpt_state_get_int(&rd, "loader.pos", &v, &e) == 0 && v == -123456789012345LL);
    CHECK(ckpt_state_get_int(&rd, "loader.shard", &v, &e) == 0 && v == 3);
    CHECK(ckpt_state_get_int(&rd, "nope", &v, &e) == -1 && strstr(e.msg, "nope"));
    const CkptBlob *b = ckpt_state_get_blob(&rd, "loader_perm");
    CHECK(b && b->len == 300 && !memcmp(b->data, st.blobs[0].data, 300));
    b = ckpt_state_get_blob(&rd, "empty");
    CHECK(b && b->len == 0);
    Rng r1, r2;
    CHECK(ckpt_state_get_rng(&rd, "data", &r1, &e) == 0 && ckpt_state_get_rng(&st, "data", &r2, &e) == 0);
    CHECK(rng_u64(&r1) == rng_u64(&r2));
    ckpt_state_free(&rd);

    // ---- describe
    {
        char dpath[300];
        snprintf(dpath, sizeof dpath, "%s/describe.txt", g_dir);
        FILE *f = fopen(dpath, "w");
        CHECK(checkpoint_describe(path, f, &e) == 0);
        fclose(f);
        size_t len;
        char *t = dl_read_file(dpath, &len, &e);
        CHECK(t && strstr(t, "model.layers.0.mamba.conv1d.weight") && strstr(t, "[6, 1, 4]") && strstr(t, "complete") &&
              strstr(t, "loader.pos") && strstr(t, "step 7"));
        free(t);
        unlink(dpath);
    }

    // ---- shape mismatch, missing / extra tensors
    Registry other;
    build(&other, 41);
    float *po = dl_calloc((size_t)other.numel, 4);
    CHECK(checkpoint_load_weights(path, &other, po, 0, &e) == -1 && strstr(e.msg, "model.embed_tokens.weight") &&
          strstr(e.msg, "[40, 24]") && strstr(e.msg, "[41, 24]"));
    Registry more;
    build(&more, 40);
    int64_t d1[1] = {5};
    reg_add(&more, "lm_head.weight", ROLE_HEAD, -1, 1, d1);
    float *pm = dl_calloc((size_t)more.numel, 4);
    CHECK(checkpoint_load_weights(path, &more, pm, 0, &e) == -1 && strstr(e.msg, "lm_head.weight") && strstr(e.msg, "missing"));
    pm[more.t[3].offset] = 9.0f;
    CHECK(checkpoint_load_weights(path, &more, pm, CKPT_ALLOW_MISSING, &e) == 3);
    CHECK(pm[more.t[3].offset] == 9.0f && !memcmp(pm, p, 4));
    Registry fewer;
    reg_init(&fewer);
    int64_t b24[1] = {24};
    reg_add(&fewer, "model.layers.0.input_layernorm.weight", ROLE_NORM, 0, 1, b24);
    float *pf = dl_calloc((size_t)fewer.numel, 4);
    CHECK(checkpoint_load_weights(path, &fewer, pf, 0, &e) == -1 && strstr(e.msg, "not part of the model"));
    CHECK(checkpoint_load_weights(path, &fewer, pf, CKPT_ALLOW_EXTRA, &e) == 1);

    // ---- non-finite values are refused and nothing is written
    float keep = p[5];
    p[5] = NAN;
    CkptState st9;
    make_state(&st9, 1, 9);
    CHECK(checkpoint_write(g_dir, &reg, p, &o, &st9, 3, NULL, 0, &e) == -1 && strstr(e.msg, "non-finite") &&
          strstr(e.msg, "model.embed_tokens.weight"));
    p[5] = keep;
    o.v[reg.t[2].offset + 1] = INFINITY;
    CHECK(checkpoint_write(g_dir, &reg, p, &o, &st9, 3, NULL, 0, &e) == -1 && strstr(e.msg, "conv1d"));
    o.v[reg.t[2].offset + 1] = 0.5f;
    char *p9 = checkpoint_path(g_dir, 1, 9);
    CHECK(!dl_file_exists(p9));
    CHECK(count_files(".tmp") == 0);

    // ---- a flipped byte inside a weight: the marker check and the dataset checksum both catch it
    write_step(&reg, p, &o, 1, 9, 3);
    {
        size_t len;
        char *raw = dl_read_file(p9, &len, &e);
        const float *needle = p + reg.t[2].offset + 10;  // bytes of conv1d.weight[10..12]
        char *hit = memmem(raw, len, needle, 8);
        CHECK(hit != NULL);
        if (hit) {
            FILE *f = fopen(p9, "r+b");
            fseek(f, (long)(hit - raw) + 2, SEEK_SET);
            fputc(hit[2] ^ 0x10, f);
            fclose(f);
        }
        free(raw);
        CHECK(checkpoint_verify(p9, &e) == -1 && strstr(e.msg, "corrupted or truncated"));
        CHECK(checkpoint_load_weights(p9, &reg, p2, 0, &e) == -1 && strstr(e.msg, "conv1d.weight") &&
              strstr(e.msg, "checksum"));
    }
    // ... and find_latest falls back to step 7 with a warning naming the file
    char latest[512];
    CHECK(find_latest_captured(latest, sizeof latest) == 1);
    CHECK(strstr(latest, "ckpt-01-00000007.h5") != NULL);
    CHECK(strstr(g_captured, "ckpt-01-00000009.h5") && strstr(g_captured, "corrupted or truncated"));

    // ---- truncated newest: rewrite 9 cleanly, write 10, cut 10 in half
    write_step(&reg, p, &o, 1, 9, 0);
    write_step(&reg, p, &o, 1, 10, 0);
    char *p10 = checkpoint_path(g_dir, 1, 10);
    {
        struct stat sb;
        stat(p10, &sb);
        CHECK(truncate(p10, sb.st_size / 2) == 0);
    }
    CHECK(find_latest_captured(latest, sizeof latest) == 1);
    CHECK(strstr(latest, "ckpt-01-00000009.h5") != NULL);
    CHECK(strstr(g_captured, "ckpt-01-00000010.h5") && strstr(g_captured, "truncated"));
    CHECK(checkpoint_load_weights(p10, &reg, p2, 0, &e) == -1);  // a reader given the broken file fails cleanly

    // ---- leftovers of interrupted writes: a .tmp without marker, an .h5 without marker: ignored/skipped
    {
        char t[600];
        snprintf(t, sizeof t, "%s/ckpt-01-00000030.h5.tmp", g_dir);
        FILE *f = fopen(t, "w");
        fputs("partial", f);
        fclose(f);
        snprintf(t, sizeof t, "%s/ckpt-01-00000020.h5", g_dir);
        char *src = checkpoint_path(g_dir, 1, 9), cmd[1400];
        snprintf(cmd, sizeof cmd, "cp %s %s", src, t);  // a complete file whose marker was never written
        CHECK(system(cmd) == 0);
        free(src);
    }
    CHECK(find_latest_captured(latest, sizeof latest) == 1);
    CHECK(strstr(latest, "ckpt-01-00000009.h5") != NULL);
    CHECK(strstr(g_captured, "ckpt-01-00000020.h5") && strstr(g_captured, "no completion marker"));
    CHECK(strstr(g_captured, "00000030") == NULL);  // .tmp files are not candidates at all

    // ---- stage order: (stage 2, step 1) is newer than (stage 1, step 20); keep-last-2 prunes the rest
    write_step(&reg, p, &o, 2, 1, 2);
    CHECK(find_latest_captured(latest, sizeof latest) == 1);
    CHECK(strstr(latest, "ckpt-02-00000001.h5") != NULL);
    // markers count as complete for keep-last-N (re-hashing every old file on each write would cost too much):
    // 1/10 (broken, marked) and 2/1 are kept; 1/7, 1/9 and the unmarked 1/20 are gone
    CHECK_EQ_I64(count_files(".done"), 2);
    CHECK_EQ_I64(count_files(".h5"), 2);
    CHECK_EQ_I64(count_files(".tmp"), 0);
    for (int s = 2; s <= 5; s++) write_step(&reg, p, &o, 2, s, 2);
    CHECK_EQ_I64(count_files(".done"), 2);
    CHECK_EQ_I64(count_files(".h5"), 2);
    {
        char *a = checkpoint_path(g_dir, 2, 4), *c = checkpoint_path(g_dir, 2, 5);
        CHECK(dl_file_exists(a) && dl_file_exists(c));
        free(a), free(c);
    }

    // ---- a real crash between the temporary write and the rename: the previous checkpoint stays newest
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 2);
        setenv("DISTILL_TEST_CRASH_IN_CHECKPOINT", "1", 1);
        CkptState s6;
        make_state(&s6, 2, 6);
        DlError ce;
        checkpoint_write(g_dir, &reg, p, &o, &s6, 2, NULL, 0, &ce);
        _exit(0);  // not reached if the hook works
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
    CHECK_EQ_I64(count_files(".tmp"), 1);
    CHECK(find_latest_captured(latest, sizeof latest) == 1);
    CHECK(strstr(latest, "ckpt-02-00000005.h5") != NULL);
    CHECK(g_captured[0] == 0);  // nothing to warn about: the .tmp is simply not a checkpoint
    // the next successful write cleans the leftover
    write_step(&reg, p, &o, 2, 6, 2);
    CHECK_EQ_I64(count_files(".tmp"), 0);
    CHECK(find_latest_captured(latest, sizeof latest) == 1 && strstr(latest, "ckpt-02-00000006.h5"));

    // ---- a weights-only checkpoint, and an empty directory
    {
        CkptState s0;
        make_state(&s0, 3, 0);
        CHECK(checkpoint_write(g_dir, &reg, p, NULL, &s0, 0, path, sizeof path, &e) == 0);
        CHECK(!checkpoint_has_optim(path));
        CHECK(checkpoint_load_optim(path, &o2, &e) == -1 && strstr(e.msg, "no optimizer state"));
        ckpt_state_free(&s0);
        char empty[300];
        snprintf(empty, sizeof empty, "%s/empty", g_dir);
        mkdir(empty, 0755);
        CHECK(checkpoint_find_latest(empty, latest, sizeof latest, &e) == 0);
        CHECK(checkpoint_load_weights("/nonexistent/x.h5", &reg, p2, 0, &e) == -1 && strstr(e.msg, "/nonexistent/x.h5"));
    }

    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    CHECK(system(cmd) == 0);
    free(p9), free(p10), free(p), free(p2), free(g), free(po), free(pm), free(pf);
    ckpt_state_free(&st);
    ckpt_state_free(&st9);
    optim_free(&o), optim_free(&o2);
    reg_free(&reg), reg_free(&other), reg_free(&more), reg_free(&fewer);
    return check_report("test_checkpoint");
}
