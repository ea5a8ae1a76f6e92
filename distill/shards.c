// shards.c: HDF5 token shard writer (buffered appends to chunked, compressed, extendible datasets; online
// packing into overlapping rows) and reader (validated at open; random access to docs, rows and pairs).
#include "distill/shards.h"
#include "distill/h5util.h"

#include <hdf5.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }  // we report errors ourselves

// ---- appendable dataset: rows of `width` elements, extended as buffered rows are flushed
typedef struct {
    const char *name;
    hid_t ds, mtype;
    size_t esize;
    int64_t width;     // elements per row (1 for 1-D datasets)
    int64_t n_file;    // rows in the file
    uint8_t *buf;
    int64_t nbuf, cap; // rows buffered / capacity
} Col;

static int col_create(Col *c, hid_t loc, const char *name, hid_t ftype, hid_t mtype, size_t esize, int64_t width,
                      int64_t chunk, int deflate, const char *path, DlError *e) {
    memset(c, 0, sizeof(*c));
    c->name = name;
    c->mtype = mtype;
    c->esize = esize;
    c->width = width;
    int rank = width > 1 ? 2 : 1;
    hsize_t dims[2] = {0, (hsize_t)width}, maxd[2] = {H5S_UNLIMITED, (hsize_t)width};
    int64_t rows_per_chunk = DL_MAX(1, chunk / width);
    hsize_t cdims[2] = {(hsize_t)rows_per_chunk, (hsize_t)width};
    hid_t sp = H5Screate_simple(rank, dims, maxd);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, rank, cdims);
    if (deflate > 0) {
        H5Pset_shuffle(dcpl);
        H5Pset_deflate(dcpl, (unsigned)DL_MIN(deflate, 9));
    }
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    c->ds = H5Dcreate2(loc, name, ftype, sp, lcpl, dcpl, H5P_DEFAULT);
    H5Pclose(lcpl);
    H5Pclose(dcpl);
    H5Sclose(sp);
    if (c->ds < 0) return dl_fail(e, "%s: cannot create dataset %s", path, name);
    c->cap = rows_per_chunk;
    c->buf = dl_malloc((size_t)(c->cap * width) * esize);
    return 0;
}

static int col_flush(Col *c, const char *path, DlError *e) {
    if (c->nbuf == 0) return 0;
    int rank = c->width > 1 ? 2 : 1;
    hsize_t newd[2] = {(hsize_t)(c->n_file + c->nbuf), (hsize_t)c->width};
    if (H5Dset_extent(c->ds, newd) < 0) return dl_fail(e, "%s: cannot extend dataset %s", path, c->name);
    hid_t fs = H5Dget_space(c->ds);
    hsize_t start[2] = {(hsize_t)c->n_file, 0}, count[2] = {(hsize_t)c->nbuf, (hsize_t)c->width};
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t ms = H5Screate_simple(rank, count, NULL);
    herr_t st = H5Dwrite(c->ds, c->mtype, ms, fs, H5P_DEFAULT, c->buf);
    H5Sclose(ms);
    H5Sclose(fs);
    if (st < 0) return dl_fail(e, "%s: write to dataset %s failed (disk full?)", path, c->name);
    c->n_file += c->nbuf;
    c->nbuf = 0;
    return 0;
}

// Appends n rows.
static int col_append(Col *c, const void *p, int64_t n, const char *path, DlError *e) {
    const uint8_t *src = p;
    size_t row = (size_t)c->width * c->esize;
    while (n > 0) {
        int64_t k = DL_MIN(n, c->cap - c->nbuf);
        memcpy(c->buf + (size_t)c->nbuf * row, src, (size_t)k * row);
        c->nbuf += k;
        src += (size_t)k * row;
        n -= k;
        if (c->nbuf == c->cap && col_flush(c, path, e)) return -1;
    }
    return 0;
}

static void col_close(Col *c) {
    if (c->ds > 0) H5Dclose(c->ds);
    free(c->buf);
    c->ds = 0;
    c->buf = NULL;
}

// ---- writer
struct ShardWriter {
    char *path, *tmp;
    hid_t f;
    ShardWriterOpts o;
    Col tokens, mask, offsets;                        // LM
    Col ptok, pmask, preset;                          // LM packed rows
    Col pr_tok, pr_off, ch_tok, ch_off, rj_tok, rj_off;  // preference
    int64_t n_tokens, n_docs, n_pairs, n_pr, n_ch, n_rj;
    // the packed row being filled: [T+1]
    uint32_t *row_tok;
    uint8_t *row_mask, *row_reset;
    int64_t row_fill, n_rows;
    uint32_t *conv;  // int32 -> uint32 staging
    int64_t conv_cap;
    bool failed;
};

int shard_writer_open(ShardWriter **out, const char *path, const ShardWriterOpts *o, DlError *e) {
    h5_quiet();
    *out = NULL;
    if (o->kind != SHARD_LM && o->kind != SHARD_PREF) return dl_fail(e, "%s: unknown shard kind %d", path, o->kind);
    if (o->vocab_size <= 0) return dl_fail(e, "%s: vocab_size must be > 0", path);
    if (o->seq_len < 0 || (o->seq_len > 0 && o->kind != SHARD_LM)) return dl_fail(e, "%s: seq_len applies to LM shards only", path);
    if (o->seq_len > 0 && (o->pad_id < 0 || o->pad_id >= o->vocab_size)) return dl_fail(e, "%s: pad id %d out of range", path, o->pad_id);
    ShardWriter *w = dl_calloc(1, sizeof(ShardWriter));
    w->o = *o;
    if (w->o.chunk <= 0) w->o.chunk = 1 << 16;
    w->path = dl_strdup(path);
    w->tmp = dl_malloc(strlen(path) + 8);
    sprintf(w->tmp, "%s.tmp", path);
    hid_t fapl = h5_fapl(true);  // a writer locks where the file system can
    w->f = H5Fcreate(w->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (w->f < 0) {
        dl_fail(e, "%s: cannot create HDF5 file (directory missing or not writable? on NFS/Lustre set "
                   "HDF5_USE_FILE_LOCKING=FALSE)", w->tmp);
        free(w->path); free(w->tmp); free(w);
        return -1;
    }
    int64_t ch = w->o.chunk;
    int d = w->o.deflate;
    int rc = 0;
    const char *p = w->tmp;
    if (o->kind == SHARD_LM) {
        rc |= col_create(&w->tokens, w->f, "tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, 4, 1, ch, d, p, e);
        rc |= col_create(&w->mask, w->f, "loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, 1, ch, d, p, e);
        rc |= col_create(&w->offsets, w->f, "doc_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, 8, 1, ch / 4, d, p, e);
        if (o->seq_len > 0) {
            int64_t W = o->seq_len + 1;
            rc |= col_create(&w->ptok, w->f, "packed/tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, 4, W, ch, d, p, e);
            rc |= col_create(&w->pmask, w->f, "packed/loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, W, ch, d, p, e);
            rc |= col_create(&w->preset, w->f, "packed/reset", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, W, ch, d, p, e);
            w->row_tok = dl_malloc((size_t)W * 4);
            w->row_mask = dl_malloc((size_t)W);
            w->row_reset = dl_malloc((size_t)W);
        }
        uint64_t zero = 0;
        if (!rc) rc = col_append(&w->offsets, &zero, 1, p, e);
    } else {
        rc |= col_create(&w->pr_tok, w->f, "pref/prompt_tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, 4, 1, ch, d, p, e);
        rc |= col_create(&w->ch_tok, w->f, "pref/chosen_tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, 4, 1, ch, d, p, e);
        rc |= col_create(&w->rj_tok, w->f, "pref/rejected_tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, 4, 1, ch, d, p, e);
        rc |= col_create(&w->pr_off, w->f, "pref/prompt_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, 8, 1, ch / 4, d, p, e);
        rc |= col_create(&w->ch_off, w->f, "pref/chosen_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, 8, 1, ch / 4, d, p, e);
        rc |= col_create(&w->rj_off, w->f, "pref/rejected_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, 8, 1, ch / 4, d, p, e);
        uint64_t zero = 0;
        if (!rc) rc = col_append(&w->pr_off, &zero, 1, p, e) | col_append(&w->ch_off, &zero, 1, p, e) |
                      col_append(&w->rj_off, &zero, 1, p, e);
    }
    if (rc) {
        shard_writer_abort(w);
        return -1;
    }
    *out = w;
    return 0;
}

// Checks ids against the vocab and converts them to uint32 in w->conv.
static int stage_ids(ShardWriter *w, const int32_t *ids, int64_t n, DlError *e) {
    if (n > w->conv_cap) {
        w->conv_cap = n * 2;
        w->conv = dl_realloc(w->conv, (size_t)w->conv_cap * 4);
    }
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= w->o.vocab_size)
            return dl_fail(e, "%s: token id %d out of range [0, %d)", w->path, ids[i], w->o.vocab_size);
        w->conv[i] = (uint32_t)ids[i];
    }
    return 0;
}

static int emit_row(ShardWriter *w, DlError *e) {
    if (col_append(&w->ptok, w->row_tok, 1, w->tmp, e) || col_append(&w->pmask, w->row_mask, 1, w->tmp, e) ||
        col_append(&w->preset, w->row_reset, 1, w->tmp, e))
        return -1;
    w->n_rows++;
    return 0;
}

// Feeds the packing window; a full row of T+1 is written and its last token starts the next row.
static int pack_push(ShardWriter *w, uint32_t tok, uint8_t m, uint8_t reset, DlError *e) {
    int64_t W = w->o.seq_len + 1;
    w->row_tok[w->row_fill] = tok;
    w->row_mask[w->row_fill] = m;
    w->row_reset[w->row_fill] = reset;
    if (++w->row_fill == W) {
        if (emit_row(w, e)) return -1;
        w->row_tok[0] = w->row_tok[W - 1];
        w->row_mask[0] = w->row_mask[W - 1];
        w->row_reset[0] = w->row_reset[W - 1];
        w->row_fill = 1;
    }
    return 0;
}

int shard_add_doc(ShardWriter *w, const int32_t *ids, const uint8_t *mask, int64_t n, DlError *e) {
    if (w->o.kind != SHARD_LM) return dl_fail(e, "%s: shard_add_doc on a preference shard", w->path);
    if (n <= 0) return dl_fail(e, "%s: empty document", w->path);
    if (stage_ids(w, ids, n, e)) return -1;
    uint8_t one = 1;
    if (col_append(&w->tokens, w->conv, n, w->tmp, e)) goto fail;
    if (mask) {
        if (col_append(&w->mask, mask, n, w->tmp, e)) goto fail;
    } else {
        uint8_t ones[4096];
        memset(ones, one, sizeof ones);
        for (int64_t i = 0; i < n; i += (int64_t)sizeof ones)
            if (col_append(&w->mask, ones, DL_MIN(n - i, (int64_t)sizeof ones), w->tmp, e)) goto fail;
    }
    w->n_tokens += n;
    w->n_docs++;
    uint64_t end = (uint64_t)w->n_tokens;
    if (col_append(&w->offsets, &end, 1, w->tmp, e)) goto fail;
    if (w->o.seq_len > 0)
        for (int64_t i = 0; i < n; i++)
            if (pack_push(w, w->conv[i], mask ? (mask[i] != 0) : 1, i == 0, e)) goto fail;
    return 0;
fail:
    w->failed = true;
    return -1;
}

static int add_part(ShardWriter *w, Col *tok, Col *off, int64_t *count, const int32_t *ids, int64_t n, DlError *e) {
    if (stage_ids(w, ids, n, e)) return -1;
    if (col_append(tok, w->conv, n, w->tmp, e)) return -1;
    *count += n;
    uint64_t end = (uint64_t)*count;
    return col_append(off, &end, 1, w->tmp, e);
}

int shard_add_pair(ShardWriter *w, const int32_t *prompt, int64_t np, const int32_t *chosen, int64_t nc,
                   const int32_t *rejected, int64_t nr, DlError *e) {
    if (w->o.kind != SHARD_PREF) return dl_fail(e, "%s: shard_add_pair on an LM shard", w->path);
    if (np <= 0 || nc <= 0 || nr <= 0) return dl_fail(e, "%s: preference pair with an empty part", w->path);
    // validate all three before writing any, so a bad pair leaves the shard consistent
    if (stage_ids(w, prompt, np, e) || stage_ids(w, chosen, nc, e) || stage_ids(w, rejected, nr, e)) return -1;
    if (add_part(w, &w->pr_tok, &w->pr_off, &w->n_pr, prompt, np, e) ||
        add_part(w, &w->ch_tok, &w->ch_off, &w->n_ch, chosen, nc, e) ||
        add_part(w, &w->rj_tok, &w->rj_off, &w->n_rj, rejected, nr, e)) {
        w->failed = true;
        return -1;
    }
    w->n_pairs++;
    return 0;
}

int shard_writer_attr_str(ShardWriter *w, const char *key, const char *value, DlError *e) {
    if (h5_attr_put_str(w->f, key, value)) return dl_fail(e, "%s: cannot write attribute %s", w->path, key);
    return 0;
}
int shard_writer_attr_i64(ShardWriter *w, const char *key, int64_t value, DlError *e) {
    if (h5_attr_put_i64(w->f, key, value)) return dl_fail(e, "%s: cannot write attribute %s", w->path, key);
    return 0;
}

static void writer_free(ShardWriter *w) {
    Col *cols[] = {&w->tokens, &w->mask, &w->offsets, &w->ptok, &w->pmask, &w->preset,
                   &w->pr_tok, &w->pr_off, &w->ch_tok, &w->ch_off, &w->rj_tok, &w->rj_off};
    for (size_t i = 0; i < DL_ARRAY_LEN(cols); i++) col_close(cols[i]);
    if (w->f > 0) H5Fclose(w->f);
    free(w->row_tok); free(w->row_mask); free(w->row_reset); free(w->conv);
    free(w->path); free(w->tmp);
    free(w);
}

void shard_writer_abort(ShardWriter *w) {
    if (!w) return;
    char *tmp = dl_strdup(w->tmp);
    writer_free(w);
    unlink(tmp);
    free(tmp);
}

int shard_writer_close(ShardWriter *w, DlError *e) {
    if (w->failed) {
        dl_fail(e, "%s: an earlier write failed; nothing was written", w->path);
        shard_writer_abort(w);
        return -1;
    }
    const char *p = w->tmp;
    int rc = 0;
    if (w->o.kind == SHARD_LM && w->o.seq_len > 0) {
        // last row: pad if it holds tokens beyond the one carried over (or if it is the only row)
        if (w->row_fill > 1 || (w->n_rows == 0 && w->row_fill == 1)) {
            int64_t W = w->o.seq_len + 1;
            for (int64_t i = w->row_fill; i < W; i++) {
                w->row_tok[i] = (uint32_t)w->o.pad_id;
                w->row_mask[i] = 0;
                w->row_reset[i] = i == w->row_fill;
            }
            rc |= emit_row(w, e);
        }
    }
    Col *cols[] = {&w->tokens, &w->mask, &w->offsets, &w->ptok, &w->pmask, &w->preset,
                   &w->pr_tok, &w->pr_off, &w->ch_tok, &w->ch_off, &w->rj_tok, &w->rj_off};
    for (size_t i = 0; i < DL_ARRAY_LEN(cols) && !rc; i++)
        if (cols[i]->ds > 0) rc |= col_flush(cols[i], p, e);
    if (!rc) {
        hid_t f = w->f;
        int a = 0;
        a |= h5_attr_put_str(f, "format", SHARD_FORMAT);
        a |= h5_attr_put_i64(f, "format_version", SHARD_FORMAT_VERSION);
        a |= h5_attr_put_str(f, "kind", w->o.kind == SHARD_LM ? "lm" : "preference");
        a |= h5_attr_put_u64(f, "tokenizer_hash", w->o.tokenizer_hash);
        a |= h5_attr_put_str(f, "tokenizer_pre", w->o.tokenizer_pre ? w->o.tokenizer_pre : "");
        a |= h5_attr_put_i64(f, "vocab_size", w->o.vocab_size);
        a |= h5_attr_put_i64(f, "n_tokens", w->n_tokens);
        a |= h5_attr_put_i64(f, "n_docs", w->n_docs);
        a |= h5_attr_put_i64(f, "seq_len", w->o.seq_len);
        a |= h5_attr_put_i64(f, "n_seqs", w->n_rows);
        a |= h5_attr_put_i64(f, "n_pairs", w->n_pairs);
        a |= h5_attr_put_i64(f, "pad_id", w->o.pad_id);
        a |= h5_attr_put_str(f, "created_by", "distill " DISTILL_VERSION);
        if (a) rc = dl_fail(e, "%s: cannot write the file attributes", p);
    }
    if (!rc && H5Fflush(w->f, H5F_SCOPE_GLOBAL) < 0) rc = dl_fail(e, "%s: flush failed", p);
    if (rc) {
        shard_writer_abort(w);
        return -1;
    }
    H5Fclose(w->f);
    w->f = 0;
    if (rename(w->tmp, w->path) != 0) {
        dl_fail(e, "%s: cannot rename %s into place", w->path, w->tmp);
        shard_writer_abort(w);
        return -1;
    }
    writer_free(w);
    return 0;
}

// ---- reader
struct ShardReader {
    char *path;
    hid_t f;
    ShardInfo info;
    hid_t tokens, mask, ptok, pmask, preset;
    hid_t pr_tok, ch_tok, rj_tok;
    uint64_t *doc_off;                   // [n_docs+1]
    uint64_t *pr_off, *ch_off, *rj_off;  // [n_pairs+1]
};

static hid_t open_ds(ShardReader *r, const char *name, int rank, int64_t d0, int64_t d1, DlError *e) {
    // H5Lexists on "a/b" fails when group "a" is missing, which reads as "missing" here too
    if (H5Lexists(r->f, name, H5P_DEFAULT) <= 0) return dl_fail(e, "%s: missing dataset /%s", r->path, name);
    hid_t ds = H5Dopen2(r->f, name, H5P_DEFAULT);
    if (ds < 0) return dl_fail(e, "%s: cannot open dataset /%s", r->path, name);
    hid_t sp = H5Dget_space(ds);
    hsize_t dims[4] = {0};
    int nd = H5Sget_simple_extent_ndims(sp);
    if (nd == rank) H5Sget_simple_extent_dims(sp, dims, NULL);
    H5Sclose(sp);
    if (nd != rank || (d0 >= 0 && (int64_t)dims[0] != d0) || (rank == 2 && (int64_t)dims[1] != d1)) {
        H5Dclose(ds);
        if (rank == 2)
            return dl_fail(e, "%s: dataset /%s has shape (%lld, %lld), expected (%lld, %lld)", r->path, name,
                           (long long)dims[0], (long long)dims[1], (long long)d0, (long long)d1);
        return dl_fail(e, "%s: dataset /%s has %lld elements (rank %d), expected %lld", r->path, name,
                       (long long)dims[0], nd, (long long)d0);
    }
    return ds;
}

static int read_1d(hid_t ds, hid_t mtype, int64_t start, int64_t n, void *out) {
    if (n == 0) return 0;
    hid_t fs = H5Dget_space(ds);
    hsize_t st[1] = {(hsize_t)start}, ct[1] = {(hsize_t)n};
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, st, NULL, ct, NULL);
    hid_t ms = H5Screate_simple(1, ct, NULL);
    herr_t rc = H5Dread(ds, mtype, ms, fs, H5P_DEFAULT, out);
    H5Sclose(ms);
    H5Sclose(fs);
    return rc < 0 ? -1 : 0;
}

// Reads an offsets dataset of n+1 entries and checks it starts at 0, never decreases and ends at total.
static int read_offsets(ShardReader *r, const char *name, int64_t n, int64_t total, uint64_t **out, DlError *e) {
    hid_t ds = open_ds(r, name, 1, n + 1, 0, e);
    if (ds < 0) return -1;
    *out = dl_malloc((size_t)(n + 1) * 8);
    int rc = read_1d(ds, H5T_NATIVE_UINT64, 0, n + 1, *out);
    H5Dclose(ds);
    if (rc) return dl_fail(e, "%s: cannot read /%s", r->path, name);
    if ((*out)[0] != 0 || (int64_t)(*out)[n] != total) return dl_fail(e, "%s: /%s must run from 0 to %lld", r->path, name, (long long)total);
    for (int64_t i = 0; i < n; i++)
        if ((*out)[i + 1] < (*out)[i]) return dl_fail(e, "%s: /%s decreases at entry %lld", r->path, name, (long long)i);
    return 0;
}

static int64_t ds_len(ShardReader *r, const char *name) {
    if (H5Lexists(r->f, name, H5P_DEFAULT) <= 0) return -1;
    hid_t ds = H5Dopen2(r->f, name, H5P_DEFAULT);
    hid_t sp = H5Dget_space(ds);
    hsize_t d[4] = {0};
    H5Sget_simple_extent_dims(sp, d, NULL);
    H5Sclose(sp);
    H5Dclose(ds);
    return (int64_t)d[0];
}

int shard_open(ShardReader **out, const char *path, DlError *e) {
    h5_quiet();
    *out = NULL;
    if (!dl_file_exists(path)) return dl_fail(e, "%s: no such shard file", path);
    if (H5Fis_hdf5(path) <= 0) return dl_fail(e, "%s: not an HDF5 file", path);
    ShardReader *r = dl_calloc(1, sizeof(ShardReader));
    r->path = dl_strdup(path);
    hid_t fapl = h5_fapl(false);  // read-only shards, often on NFS/Lustre without flock
    r->f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    H5Pclose(fapl);
    if (r->f < 0) {
        dl_fail(e, "%s: cannot open HDF5 file (on NFS/Lustre set HDF5_USE_FILE_LOCKING=FALSE)", path);
        goto fail;
    }
    char *fmt = h5_attr_get_str(r->f, "format");
    bool ok = fmt && !strcmp(fmt, SHARD_FORMAT);
    free(fmt);
    if (!ok) { dl_fail(e, "%s: not a distill token shard (attribute format != \"%s\")", path, SHARD_FORMAT); goto fail; }
    int64_t v = 0;
    if (h5_attr_get_i64(r->f, "format_version", &v) || v != SHARD_FORMAT_VERSION) {
        dl_fail(e, "%s: shard format version %lld, this build reads version %d", path, (long long)v, SHARD_FORMAT_VERSION);
        goto fail;
    }
    ShardInfo *in = &r->info;
    in->format_version = (int)v;
    char *kind = h5_attr_get_str(r->f, "kind");
    in->kind = kind && !strcmp(kind, "preference") ? SHARD_PREF : SHARD_LM;
    bool kind_ok = kind && (!strcmp(kind, "preference") || !strcmp(kind, "lm"));
    free(kind);
    if (!kind_ok) { dl_fail(e, "%s: attribute kind must be \"lm\" or \"preference\"", path); goto fail; }
    int64_t vs = 0;
    if (h5_attr_get_u64(r->f, "tokenizer_hash", &in->tokenizer_hash) || h5_attr_get_i64(r->f, "vocab_size", &vs) || vs <= 0 ||
        vs > INT32_MAX) {
        dl_fail(e, "%s: missing or invalid tokenizer_hash/vocab_size attributes", path);
        goto fail;
    }
    in->vocab_size = (int32_t)vs;
    int64_t pad = 0;
    if (!h5_attr_get_i64(r->f, "pad_id", &pad) && pad >= 0 && pad < vs) in->pad_id = (int32_t)pad;
    if (in->kind == SHARD_LM) {
        in->n_tokens = ds_len(r, "tokens");
        in->n_docs = ds_len(r, "doc_offsets") - 1;
        if (in->n_tokens < 0 || in->n_docs < 0) { dl_fail(e, "%s: missing /tokens or /doc_offsets", path); goto fail; }
        if ((r->tokens = open_ds(r, "tokens", 1, in->n_tokens, 0, e)) < 0) goto fail;
        if ((r->mask = open_ds(r, "loss_mask", 1, in->n_tokens, 0, e)) < 0) goto fail;
        if (read_offsets(r, "doc_offsets", in->n_docs, in->n_tokens, &r->doc_off, e)) goto fail;
        int64_t T = 0;
        h5_attr_get_i64(r->f, "seq_len", &T);  // absent: not packed (T stays 0)
        if (T > 0) {
            in->seq_len = T;
            in->n_seqs = ds_len(r, "packed/tokens");
            if (in->n_seqs < 0) { dl_fail(e, "%s: seq_len=%lld but no /packed/tokens", path, (long long)T); goto fail; }
            if ((r->ptok = open_ds(r, "packed/tokens", 2, in->n_seqs, T + 1, e)) < 0) goto fail;
            if ((r->pmask = open_ds(r, "packed/loss_mask", 2, in->n_seqs, T + 1, e)) < 0) goto fail;
            if ((r->preset = open_ds(r, "packed/reset", 2, in->n_seqs, T + 1, e)) < 0) goto fail;
        }
    } else {
        in->n_pairs = ds_len(r, "pref/prompt_offsets") - 1;
        if (in->n_pairs < 0) { dl_fail(e, "%s: missing /pref/prompt_offsets", path); goto fail; }
        int64_t lp = ds_len(r, "pref/prompt_tokens"), lc = ds_len(r, "pref/chosen_tokens"), lr = ds_len(r, "pref/rejected_tokens");
        if (lp < 0 || lc < 0 || lr < 0) { dl_fail(e, "%s: missing /pref/*_tokens datasets", path); goto fail; }
        if ((r->pr_tok = open_ds(r, "pref/prompt_tokens", 1, lp, 0, e)) < 0) goto fail;
        if ((r->ch_tok = open_ds(r, "pref/chosen_tokens", 1, lc, 0, e)) < 0) goto fail;
        if ((r->rj_tok = open_ds(r, "pref/rejected_tokens", 1, lr, 0, e)) < 0) goto fail;
        if (read_offsets(r, "pref/prompt_offsets", in->n_pairs, lp, &r->pr_off, e) ||
            read_offsets(r, "pref/chosen_offsets", in->n_pairs, lc, &r->ch_off, e) ||
            read_offsets(r, "pref/rejected_offsets", in->n_pairs, lr, &r->rj_off, e))
            goto fail;
    }
    *out = r;
    return 0;
fail:
    shard_close(r);
    return -1;
}

void shard_close(ShardReader *r) {
    if (!r) return;
    hid_t ds[] = {r->tokens, r->mask, r->ptok, r->pmask, r->preset, r->pr_tok, r->ch_tok, r->rj_tok};
    for (size_t i = 0; i < DL_ARRAY_LEN(ds); i++)
        if (ds[i] > 0) H5Dclose(ds[i]);
    if (r->f > 0) H5Fclose(r->f);
    free(r->doc_off); free(r->pr_off); free(r->ch_off); free(r->rj_off);
    free(r->path);
    free(r);
}

const ShardInfo *shard_info(const ShardReader *r) { return &r->info; }
const char *shard_path(const ShardReader *r) { return r->path; }
char *shard_attr_str(const ShardReader *r, const char *key) { return h5_attr_get_str(r->f, key); }

int shard_check_tokenizer(const ShardReader *r, const Tokenizer *t, DlError *e) {
    if (r->info.tokenizer_hash != tokenizer_hash(t) || r->info.vocab_size != tokenizer_vocab_size(t))
        return dl_fail(e, "%s: written with tokenizer %016llx (vocab %d), but the model's tokenizer is %016llx (vocab %d)",
                       r->path, (unsigned long long)r->info.tokenizer_hash, r->info.vocab_size,
                       (unsigned long long)tokenizer_hash(t), tokenizer_vocab_size(t));
    return 0;
}

// Reads n uint32 ids at start into int32 out, checking them against the vocab.
static int read_ids(const ShardReader *r, hid_t ds, const char *name, int64_t start, int64_t n, int32_t *out, DlError *e) {
    if (read_1d(ds, H5T_NATIVE_UINT32, start, n, out)) return dl_fail(e, "%s: cannot read /%s", r->path, name);
    for (int64_t i = 0; i < n; i++)
        if ((uint32_t)out[i] >= (uint32_t)r->info.vocab_size)
            return dl_fail(e, "%s: /%s[%lld] = %u is not below vocab_size %d", r->path, name, (long long)(start + i),
                           (uint32_t)out[i], r->info.vocab_size);
    return 0;
}

int shard_read_doc(const ShardReader *r, int64_t d, int32_t **ids, uint8_t **mask, int64_t *n, DlError *e) {
    *ids = NULL;
    if (mask) *mask = NULL;
    if (r->info.kind != SHARD_LM || d < 0 || d >= r->info.n_docs)
        return dl_fail(e, "%s: document %lld out of range (%lld docs)", r->path, (long long)d, (long long)r->info.n_docs);
    int64_t a = (int64_t)r->doc_off[d], len = (int64_t)(r->doc_off[d + 1] - r->doc_off[d]);
    *ids = dl_malloc((size_t)DL_MAX(len, 1) * 4);
    if (read_ids(r, r->tokens, "tokens", a, len, *ids, e)) goto fail;
    if (mask) {
        *mask = dl_malloc((size_t)DL_MAX(len, 1));
        if (read_1d(r->mask, H5T_NATIVE_UINT8, a, len, *mask)) { dl_fail(e, "%s: cannot read /loss_mask", r->path); goto fail; }
    }
    *n = len;
    return 0;
fail:
    free(*ids);
    *ids = NULL;
    if (mask) { free(*mask); *mask = NULL; }
    return -1;
}

static int read_2d(hid_t ds, hid_t mtype, int64_t first, int64_t count, int64_t W, void *out) {
    hid_t fs = H5Dget_space(ds);
    hsize_t st[2] = {(hsize_t)first, 0}, ct[2] = {(hsize_t)count, (hsize_t)W};
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, st, NULL, ct, NULL);
    hid_t ms = H5Screate_simple(2, ct, NULL);
    herr_t rc = H5Dread(ds, mtype, ms, fs, H5P_DEFAULT, out);
    H5Sclose(ms);
    H5Sclose(fs);
    return rc < 0 ? -1 : 0;
}

int shard_read_rows(const ShardReader *r, int64_t first, int64_t count, int32_t *tokens, uint8_t *mask,
                    uint8_t *reset, DlError *e) {
    const ShardInfo *in = &r->info;
    if (in->kind != SHARD_LM || in->seq_len <= 0) return dl_fail(e, "%s: shard has no packed rows (written without --seq-len)", r->path);
    if (first < 0 || count < 0 || first + count > in->n_seqs)
        return dl_fail(e, "%s: rows [%lld, %lld) out of range (%lld rows)", r->path, (long long)first,
                       (long long)(first + count), (long long)in->n_seqs);
    int64_t W = in->seq_len + 1;
    if (tokens) {
        if (read_2d(r->ptok, H5T_NATIVE_UINT32, first, count, W, tokens)) return dl_fail(e, "%s: cannot read /packed/tokens", r->path);
        for (int64_t i = 0; i < count * W; i++)
            if ((uint32_t)tokens[i] >= (uint32_t)in->vocab_size)
                return dl_fail(e, "%s: /packed/tokens row %lld holds id %u >= vocab_size %d", r->path,
                               (long long)(first + i / W), (uint32_t)tokens[i], in->vocab_size);
    }
    if (mask && read_2d(r->pmask, H5T_NATIVE_UINT8, first, count, W, mask)) return dl_fail(e, "%s: cannot read /packed/loss_mask", r->path);
    if (reset && read_2d(r->preset, H5T_NATIVE_UINT8, first, count, W, reset)) return dl_fail(e, "%s: cannot read /packed/reset", r->path);
    return 0;
}

static int read_part(const ShardReader *r, hid_t ds, const char *name, const uint64_t *off, int64_t i, int32_t **out,
                     int64_t *n, DlError *e) {
    int64_t a = (int64_t)off[i], len = (int64_t)(off[i + 1] - off[i]);
    *out = dl_malloc((size_t)DL_MAX(len, 1) * 4);
    *n = len;
    if (read_ids(r, ds, name, a, len, *out, e)) {
        free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

int shard_read_pair(const ShardReader *r, int64_t i, int32_t **prompt, int64_t *np, int32_t **chosen, int64_t *nc,
                    int32_t **rejected, int64_t *nr, DlError *e) {
    *prompt = *chosen = *rejected = NULL;
    if (r->info.kind != SHARD_PREF || i < 0 || i >= r->info.n_pairs)
        return dl_fail(e, "%s: preference pair %lld out of range (%lld pairs)", r->path, (long long)i, (long long)r->info.n_pairs);
    if (read_part(r, r->pr_tok, "pref/prompt_tokens", r->pr_off, i, prompt, np, e) ||
        read_part(r, r->ch_tok, "pref/chosen_tokens", r->ch_off, i, chosen, nc, e) ||
        read_part(r, r->rj_tok, "pref/rejected_tokens", r->rj_off, i, rejected, nr, e)) {
        free(*prompt); free(*chosen); free(*rejected);
        *prompt = *chosen = *rejected = NULL;
        return -1;
    }
    return 0;
}

int shard_walk_rows(const char *path, ShardRowsFn fn, void *ctx, DlError *e) {
    ShardReader *r = NULL;
    if (shard_open(&r, path, e)) return -1;
    const ShardInfo *in = shard_info(r);
    const int64_t S = in->n_seqs, W = in->seq_len + 1, chunk = 256;
    if (in->kind != SHARD_LM || S <= 0) {
        shard_close(r);
        return dl_fail(e, "%s: not a packed LM shard", path);
    }
    int32_t *tok = dl_malloc((size_t)(chunk * W) * sizeof(int32_t));
    uint8_t *mask = dl_malloc((size_t)(chunk * W)), *reset = dl_malloc((size_t)(chunk * W));
    int rc = 0;
    for (int64_t at = 0; at < S && rc == 0; at += chunk) {
        const int64_t n = DL_MIN(chunk, S - at);
        if ((rc = shard_read_rows(r, at, n, tok, mask, reset, e)) == 0) rc = fn(ctx, at, n, S, W, tok, mask, reset, e);
    }
    free(tok), free(mask), free(reset);
    shard_close(r);
    return rc;
}
