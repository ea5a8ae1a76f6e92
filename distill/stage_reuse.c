// stage_reuse.c: the cache of finished progress files (stage_reuse.h).
#include "distill/stage_reuse.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "distill/common.h"
#include "distill/export.h"
#include "distill/recipe.h"
#include "distill/shards.h"

// A file's size and its first and last MiB; a directory (HF model) contributes each regular file in name order.
static void hash_file_sample(Sha256 *h, const char *path, int depth) {
    struct stat sb;
    if (stat(path, &sb) != 0) {
        sha256_update(h, "missing", 7);
        return;
    }
    if (S_ISDIR(sb.st_mode) && depth == 0) {
        struct dirent **ents = NULL;
        const int n = scandir(path, &ents, NULL, alphasort);
        for (int i = 0; i < n; i++) {
            if (ents[i]->d_name[0] != '.') {
                char *f = dl_path_join(path, ents[i]->d_name);
                sha256_update(h, ents[i]->d_name, strlen(ents[i]->d_name) + 1);
                hash_file_sample(h, f, depth + 1);
                free(f);
            }
            free(ents[i]);
        }
        free(ents);
        return;
    }
    if (!S_ISREG(sb.st_mode)) return;
    const int64_t size = sb.st_size, part = (int64_t)1 << 20;
    sha256_update(h, &size, sizeof size);
    FILE *f = fopen(path, "rb");
    if (!f) return;
    char *buf = dl_malloc((size_t)part);
    for (int k = 0; k < 2; k++) {
        const int64_t at = k == 0 ? 0 : DL_MAX((int64_t)0, size - part);
        if (fseeko(f, (off_t)at, SEEK_SET) != 0) break;
        sha256_update(h, buf, fread(buf, 1, (size_t)part, f));
    }
    free(buf);
    fclose(f);
}

void reuse_key_begin(ReuseKey *k, const RunContext *ctx, const char *kind) {
    const Recipe *rec = ctx->recipe;
    sha256_init(&k->h);
    k->kind = kind;
    char head[256];
    const int n = snprintf(head, sizeof head, "distill %s v1\nversion %s\ndevice %d\nseed %llu\nteacher_seed %lld\n", kind,
                           DISTILL_VERSION, ctx->device, (unsigned long long)ctx->seed, (long long)rec->teacher.seed);
    sha256_update(&k->h, head, (size_t)n);
    hash_file_sample(&k->h, rec->teacher.path, 0);
}

void reuse_key_add(ReuseKey *k, const void *data, size_t n) { sha256_update(&k->h, data, n); }

// OUTPUT_DIR/.KIND-cache/KEY + suffix
static char *key_path(ReuseKey *k, const RunContext *ctx, const char *suffix) {
    uint8_t d[32];
    char hex[65], name[96];
    sha256_final(&k->h, d);
    sha256_to_hex(d, hex);
    snprintf(name, sizeof name, ".%s-cache/%.32s%s", k->kind, hex, suffix);
    return dl_path_join(ctx->recipe->run.output_dir, name);
}

char *reuse_key_path(ReuseKey *k, const RunContext *ctx) { return key_path(k, ctx, ".bin"); }
char *reuse_key_dir(ReuseKey *k, const RunContext *ctx) { return key_path(k, ctx, ""); }

static int add_rows(void *ctx, int64_t first, int64_t n, int64_t S, int64_t W, const int32_t *tok, const uint8_t *mask,
                    const uint8_t *reset, DlError *e) {
    (void)e;
    ReuseKey *k = ctx;
    if (first == 0) reuse_key_add(k, &S, sizeof S), reuse_key_add(k, &W, sizeof W);
    reuse_key_add(k, tok, (size_t)(n * W) * sizeof(int32_t));
    reuse_key_add(k, mask, (size_t)(n * W));
    reuse_key_add(k, reset, (size_t)(n * W));
    return 0;
}

int reuse_key_add_shard_rows(ReuseKey *k, const char *shard, DlError *e) { return shard_walk_rows(shard, add_rows, k, e); }

// dst <- the regular files of src, through dst.tmp-PID renamed into place
static int copy_dir(const char *src, const char *dst, DlError *e) {
    struct dirent **ents = NULL;
    const int n = scandir(src, &ents, NULL, alphasort);
    if (n < 0) return dl_fail(e, "%s: cannot list: %s", src, strerror(errno));
    ExportDir d;
    int rc = export_dir_begin(&d, dst, e);
    for (int i = 0; i < n; i++) {
        char *f = dl_path_join(src, ents[i]->d_name), *t = dl_path_join(d.tmp ? d.tmp : "", ents[i]->d_name);
        struct stat sb;
        if (rc == 0 && ents[i]->d_name[0] != '.' && stat(f, &sb) == 0 && S_ISREG(sb.st_mode)) rc = dl_copy_file(f, t, e);
        free(f), free(t), free(ents[i]);
    }
    free(ents);
    if (rc == 0) rc = export_dir_commit(&d, e);
    export_dir_end(&d);
    return rc;
}

int reuse_fetch_dir(const char *cache, const char *dir, DlError *e) {
    if (!dl_is_dir(cache)) return 0;
    return copy_dir(cache, dir, e) ? -1 : 1;
}

// OUTPUT_DIR/.KIND-cache, the folder of a cache path
static int make_cache_folder(const char *cache, DlError *e) {
    char *dir = dl_strdup(cache);
    char *slash = strrchr(dir, '/');
    if (slash) slash[1] = 0;
    const int rc = dl_mkdirs(dir, e);
    free(dir);
    return rc;
}

void reuse_keep_dir(const char *cache, const char *dir, const char *stage_name) {
    DlError e;
    if (make_cache_folder(cache, &e) || copy_dir(dir, cache, &e)) dl_warn("%s: not kept for reuse: %s", stage_name, e.msg);
}

int reuse_fetch(const char *cache, const char *progress, DlError *e) {
    if (!dl_file_exists(cache)) return 0;
    return dl_copy_file(cache, progress, e) ? -1 : 1;
}

void reuse_drop(const char *cache, const char *progress, const char *stage_name, const char *why) {
    dl_warn("%s: the reused %s does not fit this stage (%s); it is removed and everything is computed again", stage_name,
            cache, why);
    dl_remove_tree(cache);  // a file, or a cached directory (draft)
    dl_remove_tree(progress);
}

void reuse_keep(const char *cache, const char *progress, const char *stage_name) {
    DlError e;
    if (make_cache_folder(cache, &e) || dl_copy_file(progress, cache, &e)) dl_warn("%s: not kept for reuse: %s", stage_name, e.msg);
}
