// common.c: see common.h.
#include "distill/common.h"
#include "distill/sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static bool g_quiet = false;

void dl_set_quiet(bool quiet) { g_quiet = quiet; }
bool dl_is_quiet(void) { return g_quiet; }

int dl_fail(DlError *e, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int dl_fail_prefix(DlError *e, const char *fmt, ...) {
    if (e) {
        char prefix[DL_ERR_LEN], old[DL_ERR_LEN];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(prefix, sizeof prefix, fmt, ap);
        va_end(ap);
        memcpy(old, e->msg, sizeof old);
        snprintf(e->msg, sizeof e->msg, "%s%s", prefix, old);
    }
    return -1;
}

void dl_die(int code, const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fputs("distill: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

void dl_warn(const char *fmt, ...) {
    va_list ap;
    fputs("distill: warning: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void dl_info(const char *fmt, ...) {
    if (g_quiet) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static DL_NORETURN void oom(size_t n, const char *file, int line) {
    dl_die(DL_EXIT_RUNTIME,
           "out of memory allocating %zu bytes at %s:%d\n---> HINT: use a smaller model, batch or "
           "sequence length, or a machine with more memory",
           n, file, line);
}

void *dl_malloc_impl(size_t n, const char *file, int line) {
    void *p = malloc(n ? n : 1);
    if (!p) oom(n, file, line);
    return p;
}

void *dl_calloc_impl(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) oom(n * size, file, line);
    return p;
}

void *dl_realloc_impl(void *p, size_t n, const char *file, int line) {
    void *q = realloc(p, n ? n : 1);
    if (!q) oom(n, file, line);
    return q;
}

char *dl_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = dl_malloc(n);
    memcpy(p, s, n);
    return p;
}

char *dl_read_file(const char *path, size_t *len, DlError *e) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        dl_fail(e, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = dl_malloc(cap + 1);
    for (;;) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) {
            if (ferror(f)) {
                dl_fail(e, "%s: read error: %s", path, strerror(errno));
                free(buf);
                fclose(f);
                return NULL;
            }
            break;
        }
        cap *= 2;
        buf = dl_realloc(buf, cap + 1);
    }
    fclose(f);
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

bool dl_env_switch(const char *name, bool recipe) {
    const char *v = getenv(name);
    return v && (*v == '1' || *v == '0') && !v[1] ? *v == '1' : recipe;
}

bool dl_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

bool dl_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int dl_mkdirs(const char *path, DlError *e) {
    char *p = dl_strdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST) {
            dl_fail(e, "%s: cannot create directory: %s", p, strerror(errno));
            free(p);
            return -1;
        }
        *s = '/';
    }
    int rc = 0;
    if (mkdir(p, 0777) != 0 && errno != EEXIST) rc = dl_fail(e, "%s: cannot create directory: %s", p, strerror(errno));
    free(p);
    return rc;
}

int dl_atomic_open(DlAtomic *a, const char *path, DlError *e) {
    const size_t n = strlen(path);
    a->path = dl_strdup(path);
    a->tmp = dl_malloc(n + 12);
    memcpy(a->tmp, path, n), memcpy(a->tmp + n, ".tmp.XXXXXX", 12);
    a->f = NULL;
    const int fd = mkstemp(a->tmp);
    if (fd < 0 || fchmod(fd, 0644) != 0 || !(a->f = fdopen(fd, "wb"))) {  // mkstemp makes 0600
        const int rc = dl_fail(e, "%s: cannot create: %s", a->tmp, strerror(errno));
        if (fd >= 0) close(fd), unlink(a->tmp);
        free(a->tmp), free(a->path);
        a->tmp = a->path = NULL;
        return rc;
    }
    return 0;
}

int dl_atomic_commit(DlAtomic *a, DlError *e) {
    int rc = 0;
    if (ferror(a->f) || fflush(a->f) || fsync(fileno(a->f))) rc = dl_fail(e, "%s: write failed: %s", a->tmp, strerror(errno));
    if (fclose(a->f) && !rc) rc = dl_fail(e, "%s: write failed: %s", a->tmp, strerror(errno));
    a->f = NULL;
    if (!rc && rename(a->tmp, a->path) != 0) rc = dl_fail(e, "%s -> %s: cannot rename: %s", a->tmp, a->path, strerror(errno));
    if (rc) unlink(a->tmp);
    else {  // the rename itself reaches the disk with the directory (best effort: some filesystems refuse)
        char *slash = strrchr(a->path, '/');
        if (slash) *slash = 0;
        const int dfd = open(slash ? (*a->path ? a->path : "/") : ".", O_RDONLY | O_DIRECTORY);
        if (dfd >= 0) fsync(dfd), close(dfd);
    }
    free(a->tmp), free(a->path);
    a->tmp = a->path = NULL;
    return rc;
}

void dl_atomic_abort(DlAtomic *a) {
    if (a->f) fclose(a->f), unlink(a->tmp);
    a->f = NULL;
    free(a->tmp), free(a->path);
    a->tmp = a->path = NULL;
}

int dl_write_file_atomic(const char *path, const void *data, size_t n, DlError *e) {
    DlAtomic a;
    if (dl_atomic_open(&a, path, e)) return -1;
    if (n && fwrite(data, 1, n, a.f) != n) {
        const int rc = dl_fail(e, "%s: write failed: %s", a.tmp, strerror(errno));
        dl_atomic_abort(&a);
        return rc;
    }
    return dl_atomic_commit(&a, e);
}

int dl_copy_file(const char *src, const char *dst, DlError *e) {
    FILE *in = fopen(src, "rb");
    if (!in) return dl_fail(e, "%s: cannot open: %s", src, strerror(errno));
    DlAtomic a;
    if (dl_atomic_open(&a, dst, e)) {
        fclose(in);
        return -1;
    }
    char buf[1 << 16];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, k, a.f) != k) break;
    const bool bad = ferror(in) || ferror(a.f);
    fclose(in);
    if (bad) {
        const int rc = dl_fail(e, "%s -> %s: copy failed: %s", src, a.tmp, strerror(errno));
        dl_atomic_abort(&a);
        return rc;
    }
    return dl_atomic_commit(&a, e);
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

void dl_remove_tree(const char *path) { nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

char *dl_path_join(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    char *p = dl_malloc(la + lb + 2);
    memcpy(p, a, la);
    size_t k = la;
    if (la && a[la - 1] != '/') p[k++] = '/';
    memcpy(p + k, b, lb + 1);
    return p;
}

double dl_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

int dl_fsync_path(const char *path, bool dir, DlError *e) {
    const int fd = open(path, dir ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
    if (fd < 0) return dl_fail(e, "%s: cannot open for fsync: %s", path, strerror(errno));
    const int rc = fsync(fd), err = errno;
    close(fd);
    if (rc != 0 && !(dir && (err == EINVAL || err == EBADF))) return dl_fail(e, "%s: fsync failed: %s", path, strerror(err));
    return 0;
}

int dl_sha256_file(const char *path, char hex[65], int64_t *bytes, DlError *e) {
    FILE *f = fopen(path, "rb");
    if (!f) return dl_fail(e, "%s: cannot open: %s", path, strerror(errno));
    Sha256 s;
    sha256_init(&s);
    const size_t cap = 1 << 20;
    uint8_t *buf = dl_malloc(cap);
    int64_t total = 0;
    size_t n;
    while ((n = fread(buf, 1, cap, f)) > 0) sha256_update(&s, buf, n), total += (int64_t)n;
    const int bad = ferror(f);
    fclose(f);
    free(buf);
    if (bad) return dl_fail(e, "%s: read error", path);
    uint8_t d[32];
    sha256_final(&s, d);
    sha256_to_hex(d, hex);
    if (bytes) *bytes = total;
    return 0;
}
