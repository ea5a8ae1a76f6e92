// stage_reuse.h: reuse of a finished stage's expensive work across runs. A stage that appends its progress
// to a file (generate: generated.bin, the responses; pairs: scores.bin, the teacher's scores) keeps that file,
// once complete, as OUTPUT_DIR/.KIND-cache/KEY.bin, KEY a hash of everything the file depends on. A later stage
// with the same KEY copies it in as its progress file and continues through its resume path, so it computes
// nothing (e.g. the 25% demo after the 50% one: the same teacher, prompts and settings).
// The key always covers the program version, the device, the seed and a sample of the teacher file (size,
// first and last MiB of each file: hashing an 8B teacher would take a minute); the stage adds its inputs.
// A stage whose result is a directory (draft: STAGE_DIR/model, the trained draft) keeps a copy of it as
// OUTPUT_DIR/.KIND-cache/KEY/ instead, and a later stage with the same KEY copies it in and trains nothing. Both
// copies go through a temporary directory renamed into place (export_dir_*), so neither side is ever partial.
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "distill/sha256.h"
#include "distill/stage.h"

typedef struct {
    Sha256 h;
    const char *kind;  // "generate", "pairs", "draft": the cache directory's name
} ReuseKey;

void reuse_key_begin(ReuseKey *k, const RunContext *ctx, const char *kind);
void reuse_key_add(ReuseKey *k, const void *data, size_t n);
// OUTPUT_DIR/.KIND-cache/KEY.bin (newly allocated); ends the key.
char *reuse_key_path(ReuseKey *k, const RunContext *ctx);
// Copies a cached file to `progress` when there is one: 1 copied, 0 none, -1 error (e filled).
int reuse_fetch(const char *cache, const char *progress, DlError *e);
// Drops a cached file or directory that does not fit the stage (why: the reader's message), and the copy made of
// it, with a warning naming the cache: the stage then computes everything and keeps its own.
void reuse_drop(const char *cache, const char *progress, const char *stage_name, const char *why);
// Keeps a complete `progress` file as `cache` (a failure only warns: the stage's own output is complete).
void reuse_keep(const char *cache, const char *progress, const char *stage_name);

// Directory forms. OUTPUT_DIR/.KIND-cache/KEY (newly allocated); ends the key.
char *reuse_key_dir(ReuseKey *k, const RunContext *ctx);
// Copies the cached directory's files to `dir` when there is a cache: 1 copied, 0 none, -1 error (e filled).
int reuse_fetch_dir(const char *cache, const char *dir, DlError *e);
// Keeps the files of a complete `dir` as the cache (a failure only warns).
void reuse_keep_dir(const char *cache, const char *dir, const char *stage_name);
// Adds the content of an LM shard's packed rows (tokens, loss mask, resets) to the key: what a training stage
// reads, independent of the file's bytes (HDF5 records write times).
int reuse_key_add_shard_rows(ReuseKey *k, const char *shard, DlError *e);
