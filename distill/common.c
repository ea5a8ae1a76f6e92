// common.c: see common.h.
#include "distill/common.h"

#include <errno.h>
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

int dl_copy_file(const char *src, const char *dst, DlError *e) {
    // a unique temporary name (mkstemp): two runs keeping the same file at once each write their own copy
    size_t n = strlen(dst);
    char *tmp = dl_malloc(n + 12);
    memcpy(tmp, dst, n), memcpy(tmp + n, ".tmp.XXXXXX", 12);
    FILE *in = fopen(src, "rb"), *out = NULL;
    int rc = 0, fd = -1;
    if (!in) {
        rc = dl_fail(e, "%s: cannot open: %s", src, strerror(errno));
        goto out;
    }
    if ((fd = mkstemp(tmp)) < 0 || fchmod(fd, 0644) != 0 || !(out = fdopen(fd, "wb"))) {  // mkstemp makes 0600
        rc = dl_fail(e, "%s: cannot create: %s", tmp, strerror(errno));
        if (fd >= 0) close(fd), unlink(tmp);
        goto out;
    }
    char buf[1 << 16];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, k, out) != k) break;
    if (ferror(in) || ferror(out) || fflush(out) || fsync(fileno(out))) rc = dl_fail(e, "%s -> %s: copy failed: %s", src, tmp, strerror(errno));
out:
    if (in) fclose(in);
    if (out && fclose(out) && !rc) rc = dl_fail(e, "%s: write failed: %s", tmp, strerror(errno));
    if (!rc && rename(tmp, dst) != 0) rc = dl_fail(e, "%s -> %s: cannot rename: %s", tmp, dst, strerror(errno));
    if (rc && out) unlink(tmp);
    free(tmp);
    return rc;
}

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
