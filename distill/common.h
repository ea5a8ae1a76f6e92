// common.h: errors, checked allocation, logging and small file helpers shared by every part of distill.
//
// Two ways to fail, on purpose:
//  * Library code (parsers, readers, loaders) returns an int (0 ok, -1 error) and fills a DlError with a
//    message that names the file, line, key or tensor and what was expected. Fuzz targets and tests rely on
//    readers returning instead of exiting.
//  * Program code (commands, stages) calls dl_die() with the message, which prints it and exits with
//    DL_EXIT_INPUT / DL_EXIT_RUNTIME. mallocCheck-style macros die with a hint, as in llm.c.
#pragma once
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

// C and CUDA C++ both include these headers (the CUDA engine is compiled by nvcc as C++).
#ifdef __cplusplus
#define DL_NORETURN [[noreturn]]
extern "C" {
#else
#define DL_NORETURN _Noreturn
#endif

// Exit codes of the distill program (documented in README and `distill --help`).
enum {
    DL_EXIT_OK = 0,
    DL_EXIT_RUNTIME = 1,  // a run failed: numerical trouble, I/O failure while writing, CUDA/NCCL error
    DL_EXIT_USAGE = 2,    // bad command line
    DL_EXIT_INPUT = 3,    // bad input: recipe, model file, data file, checkpoint
    DL_EXIT_INTERRUPTED = 4,  // stopped by a signal; the last complete checkpoint is kept
};

#define DL_ERR_LEN 1024
typedef struct {
    char msg[DL_ERR_LEN];
} DlError;

// Writes the message into e (if non-NULL) and returns -1, so readers can `return dl_fail(e, ...)`.
int dl_fail(DlError *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Prefixes an existing error message with context ("reading x.gguf: " + old message).
int dl_fail_prefix(DlError *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Prints "distill: error: <msg>" and exits with code.
DL_NORETURN void dl_die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Prints "distill: warning: <msg>".
void dl_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
// Informational output on stderr unless quiet mode is set (dl_set_quiet).
void dl_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void dl_set_quiet(bool quiet);
bool dl_is_quiet(void);

// Allocation that dies on failure with the size asked for and a hint.
void *dl_malloc_impl(size_t n, const char *file, int line);
void *dl_calloc_impl(size_t n, size_t size, const char *file, int line);
void *dl_realloc_impl(void *p, size_t n, const char *file, int line);
#define dl_malloc(n) dl_malloc_impl((n), __FILE__, __LINE__)
#define dl_calloc(n, s) dl_calloc_impl((n), (s), __FILE__, __LINE__)
#define dl_realloc(p, n) dl_realloc_impl((p), (n), __FILE__, __LINE__)
char *dl_strdup(const char *s);

// Reads a whole file into a NUL-terminated buffer. Returns NULL and fills e on failure.
char *dl_read_file(const char *path, size_t *len, DlError *e);
bool dl_file_exists(const char *path);
// A recipe switch unless the environment variable `name` is "1" or "0" (tests and benchmarks set them).
bool dl_env_switch(const char *name, bool recipe);
bool dl_is_dir(const char *path);
// mkdir -p; returns 0 or -1 with e filled.
int dl_mkdirs(const char *path, DlError *e);
// Atomic file writes: dl_atomic_open creates a unique temporary beside path (PATH.tmp.XXXXXX, mode 0644) to write
// into through a->f; dl_atomic_commit flushes, fsyncs, closes and renames it over path, so path is either its old
// self or the whole new file (two writers of one path never share a temporary). A failed commit and
// dl_atomic_abort remove the temporary. Every function returns 0 or -1 with e filled (naming the file).
typedef struct {
    FILE *f;
    char *tmp, *path;
} DlAtomic;
int dl_atomic_open(DlAtomic *a, const char *path, DlError *e);
int dl_atomic_commit(DlAtomic *a, DlError *e);
void dl_atomic_abort(DlAtomic *a);
// The whole file at once: n bytes of data (dl_atomic_open + fwrite + dl_atomic_commit).
int dl_write_file_atomic(const char *path, const void *data, size_t n, DlError *e);
// Copies src to dst atomically (as dl_atomic_open / commit).
int dl_copy_file(const char *src, const char *dst, DlError *e);
// rm -rf path (a file or a directory tree; symbolic links are removed, not followed). Missing: nothing to do.
void dl_remove_tree(const char *path);
// fsync of a file, or of a directory (dir = true: after a rename in it; file systems that refuse fsync on
// directories (EINVAL/EBADF) pass, the rename being as durable as they allow). 0 or -1 with e filled.
int dl_fsync_path(const char *path, bool dir, DlError *e);
// SHA-256 of a whole file as 64 hex characters + NUL; its size in *bytes when not NULL. 0 or -1 with e filled.
int dl_sha256_file(const char *path, char hex[65], int64_t *bytes, DlError *e);
// Joins a and b with a '/', into a newly allocated string.
char *dl_path_join(const char *a, const char *b);

// Monotonic wall clock in seconds.
double dl_now(void);

// Overflow-checked size arithmetic for readers: returns false on overflow.
static inline bool dl_mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool dl_add_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

#ifdef __cplusplus
}
#endif

#define DL_MIN(a, b) ((a) < (b) ? (a) : (b))
#define DL_MAX(a, b) ((a) > (b) ? (a) : (b))
#define DL_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
