// teacher_cache.c: see teacher_cache.h.
#include "distill/teacher_cache.h"
#include "distill/h5util.h"

#include <errno.h>
#include <hdf5.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/metrics.h"

// ---------------------------------------------------------------- row source

static void rs_perm(RowSource *rs) {
    for (int64_t i = 0; i < rs->n_rows; i++) rs->perm[i] = i;
    if (!rs->shuffle) return;
    Rng g;
    rng_init(&g, rs->seed, 0x70e000ull + (uint64_t)rs->epoch);
    for (int64_t i = rs->n_rows - 1; i > 0; i--) {
        int64_t j = (int64_t)rng_below(&g, (uint64_t)(i + 1)), t = rs->perm[i];
        rs->perm[i] = rs->perm[j], rs->perm[j] = t;
    }
}

int row_source_open(RowSource *rs, const char *shard, int64_t T, uint64_t seed, bool shuffle, DlError *e) {
    memset(rs, 0, sizeof *rs);
    if (shard_open(&rs->r, shard, e)) return -1;
    const ShardInfo *in = shard_info(rs->r);
    if (in->kind != SHARD_LM || in->seq_len != T || in->n_seqs < 1) {
        int rc = dl_fail(e, "%s: expected an LM shard packed with seq_len %lld (has %lld rows of seq_len %lld)", shard,
                         (long long)T, (long long)in->n_seqs, (long long)in->seq_len);
        shard_close(rs->r);
        rs->r = NULL;
        return rc;
    }
    rs->n_rows = in->n_seqs;
    rs->T = T;
    rs->seed = seed;
    rs->shuffle = shuffle;
    rs->perm = dl_malloc((size_t)rs->n_rows * sizeof *rs->perm);
    rs_perm(rs);
    return 0;
}

int row_source_attach_cache(RowSource *rs, const char *cache_path, int64_t V, DlError *e) {
    if (tcache_open(&rs->cache, cache_path, e)) return -1;
    if (tcache_rows(rs->cache) != rs->n_rows)
        return dl_fail(e, "%s: caches %lld rows, the data has %lld (was the data set re-made?)", cache_path,
                       (long long)tcache_rows(rs->cache), (long long)rs->n_rows);
    rs->V = V;
    return 0;
}

void row_source_close(RowSource *rs) {
    if (rs->r) shard_close(rs->r);
    if (rs->cache) tcache_close(rs->cache);
    free(rs->perm), free(rs->last_rows), free(rs->buf_t), free(rs->buf_m), free(rs->buf_r), free(rs->teacher);
    memset(rs, 0, sizeof *rs);
}

int64_t row_source_rows(const RowSource *rs) { return rs->n_rows; }

static int rs_next(void *ctx, TrainBatch *b, DlError *e) {
    RowSource *rs = ctx;
    const int64_t T = rs->T, W = T + 1;
    if (b->T != T) return dl_fail(e, "row source: batch T %lld, data seq_len %lld", (long long)b->T, (long long)T);
    if (rs->cap < b->B) {
        rs->cap = b->B;
        rs->last_rows = dl_realloc(rs->last_rows, (size_t)b->B * sizeof(int64_t));
        rs->buf_t = dl_realloc(rs->buf_t, (size_t)W * 4);
        rs->buf_m = dl_realloc(rs->buf_m, (size_t)W);
        rs->buf_r = dl_realloc(rs->buf_r, (size_t)W);
        if (rs->cache) rs->teacher = dl_realloc(rs->teacher, (size_t)(b->B * T * rs->V) * sizeof(float));
    }
    for (int64_t i = 0; i < b->B; i++) {
        if (rs->next >= rs->n_rows) {
            rs->epoch++;
            rs->next = 0;
            rs_perm(rs);
        }
        int64_t row = rs->perm[rs->next++];
        rs->last_rows[i] = row;
        if (shard_read_rows(rs->r, row, 1, rs->buf_t, rs->buf_m, rs->buf_r, e)) return -1;
        for (int64_t t = 0; t < T; t++) {
            b->tokens[i * T + t] = rs->buf_t[t];
            b->targets[i * T + t] = rs->buf_t[t + 1];
            b->mask[i * T + t] = rs->buf_m[t + 1] && !rs->buf_r[t + 1];
            b->reset[i * T + t] = t == 0 || rs->buf_r[t];
        }
    }
    if (rs->cache && tcache_dense(rs->cache, rs->last_rows, b->B, T, rs->V, rs->teacher, e)) return -1;
    return 0;
}

static void rs_save(void *ctx, CkptState *st) {
    RowSource *rs = ctx;
    ckpt_state_set_int(st, "rows.seed", (int64_t)rs->seed);
    ckpt_state_set_int(st, "rows.epoch", rs->epoch);
    ckpt_state_set_int(st, "rows.next", rs->next);
}

static int rs_restore(void *ctx, const CkptState *st, DlError *e) {
    RowSource *rs = ctx;
    int64_t seed, epoch, next;
    if (ckpt_state_get_int(st, "rows.seed", &seed, e) || ckpt_state_get_int(st, "rows.epoch", &epoch, e) ||
        ckpt_state_get_int(st, "rows.next", &next, e))
        return -1;
    if ((uint64_t)seed != rs->seed || next < 0 || next > rs->n_rows || epoch < 0)
        return dl_fail(e, "saved row position (seed %lld, epoch %lld, row %lld) does not fit this data (%lld rows)",
                       (long long)seed, (long long)epoch, (long long)next, (long long)rs->n_rows);
    rs->epoch = epoch;
    rs->next = next;
    rs_perm(rs);
    return 0;
}

static const float *rs_teacher(void *ctx) {
    RowSource *rs = ctx;
    return rs->teacher;
}

BatchSource row_source(RowSource *rs) {
    BatchSource s = {rs, rs_next, rs_save, rs_restore, NULL};
    if (rs->cache) s.teacher_logits = rs_teacher;
    return s;
}

// ---------------------------------------------------------------- cache file

struct TeacherCache {
    hid_t f, ids, logp, rest;
    int k;
    int64_t rows, T, V;
    int32_t *bi;
    float *bl, *br;
};

// rows [r0, r0+n) of a dataset of shape [rows, T(, k)]
static herr_t slab(hid_t d, bool write, hid_t mtype, int rank, int64_t r0, int64_t n, int64_t T, int64_t k, void *buf) {
    hsize_t start[3] = {(hsize_t)r0, 0, 0}, count[3] = {(hsize_t)n, (hsize_t)T, (hsize_t)k};
    hid_t fs = H5Dget_space(d);
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
    hid_t ms = H5Screate_simple(rank, count, NULL);
    herr_t r = write ? H5Dwrite(d, mtype, ms, fs, H5P_DEFAULT, buf) : H5Dread(d, mtype, ms, fs, H5P_DEFAULT, buf);
    H5Sclose(ms);
    H5Sclose(fs);
    return r;
}

int tcache_write(const char *path, const HybridConfig *hc, const Registry *reg, const float *params, const char *shard,
                 int64_t B, int k, volatile sig_atomic_t *stop, DlError *e) {
    ShardReader *r = NULL;
    if (shard_open(&r, shard, e)) return -1;
    const ShardInfo *in = shard_info(r);
    const int64_t T = in->seq_len, rows = in->n_seqs, V = hc->base.vocab, W = T + 1;
    if (in->kind != SHARD_LM || T < 1 || rows < 1) {
        shard_close(r);
        return dl_fail(e, "%s: not a packed LM shard", shard);
    }
    if (k < 1 || k > V) {
        shard_close(r);
        return dl_fail(e, "teacher_cache: top_k = %d must be in 1..%lld", k, (long long)V);
    }
    B = DL_MAX(1, DL_MIN(B, rows));
    char *tmp = dl_malloc(strlen(path) + 5);
    sprintf(tmp, "%s.tmp", path);
    H5Quiet quiet = h5_quiet_begin();
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), ds[3] = {-1, -1, -1};
    int rc = -1;
    Engine *en = NULL;
    int32_t *tk = dl_malloc((size_t)(B * W) * 4), *in_tok = dl_malloc((size_t)(B * T) * 4), *bi = dl_malloc((size_t)(B * T * k) * 4);
    uint8_t *rst = dl_malloc((size_t)(B * W)), *in_rst = dl_malloc((size_t)(B * T));
    float *lg = dl_malloc((size_t)(T * V) * 4), *bl = dl_malloc((size_t)(B * T * k) * 4), *br = dl_malloc((size_t)(B * T) * 4);
    if (f < 0) {
        dl_fail(e, "%s: cannot create", tmp);
        goto out;
    }
    {
        hsize_t d3[3] = {(hsize_t)rows, (hsize_t)T, (hsize_t)k}, d2[2] = {(hsize_t)rows, (hsize_t)T};
        hid_t s3 = H5Screate_simple(3, d3, NULL), s2 = H5Screate_simple(2, d2, NULL);
        ds[0] = H5Dcreate2(f, "ids", H5T_STD_I32LE, s3, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ds[1] = H5Dcreate2(f, "logp", H5T_IEEE_F32LE, s3, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ds[2] = H5Dcreate2(f, "rest", H5T_IEEE_F32LE, s2, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        H5Sclose(s3), H5Sclose(s2);
        if (ds[0] < 0 || ds[1] < 0 || ds[2] < 0 || h5_attr_put_str(f, "format", TCACHE_FORMAT) || h5_attr_put_i64(f, "format_version", 1) ||
            h5_attr_put_i64(f, "k", k) || h5_attr_put_i64(f, "vocab", V) || h5_attr_put_i64(f, "seq_len", T) || h5_attr_put_i64(f, "rows", rows) ||
            h5_attr_put_str(f, "source", shard)) {
            dl_fail(e, "%s: cannot create datasets", tmp);
            goto out;
        }
    }
    Progress prog;
    progress_begin(&prog, "teacher_cache", 0, rows);
    double t0 = dl_now();
    for (int64_t r0 = 0; r0 < rows; r0 += B) {
        if (stop && *stop) {
            progress_end(&prog);
            rc = 1;
            goto out;
        }
        int64_t n = DL_MIN(B, rows - r0);
        if (!en || n != B) {  // the last batch may be smaller
            engine_free(en);
            en = engine_new(hc, reg, params, n, T, 0, e);
            if (!en) goto out;
        }
        if (shard_read_rows(r, r0, n, tk, NULL, rst, e)) goto out;
        for (int64_t i = 0; i < n; i++)
            for (int64_t t = 0; t < T; t++) in_tok[i * T + t] = tk[i * W + t], in_rst[i * T + t] = t == 0 || rst[i * W + t];
        engine_forward(en, in_tok, in_rst);
        for (int64_t i = 0; i < n; i++) {
            engine_logits(en, i * T, (i + 1) * T, lg);
#pragma omp parallel for schedule(static)
            for (int64_t t = 0; t < T; t++) {
                const float *x = lg + t * V;
                double m = x[0];
                for (int64_t j = 1; j < V; j++) m = x[j] > m ? x[j] : m;
                double s = 0;
                for (int64_t j = 0; j < V; j++) s += exp((double)x[j] - m);
                double lse = m + log(s);
                // top-k by repeated selection over a small k (insertion into a sorted list)
                int32_t *id = bi + (i * T + t) * k;
                float *lp = bl + (i * T + t) * k;
                int have = 0;
                for (int64_t j = 0; j < V; j++) {
                    if (have == k && x[j] <= x[id[k - 1]]) continue;
                    int pos = have < k ? have++ : k - 1;
                    while (pos > 0 && x[id[pos - 1]] < x[j]) {
                        id[pos] = id[pos - 1];
                        pos--;
                    }
                    id[pos] = (int32_t)j;
                }
                double top = 0;
                for (int q = 0; q < k; q++) {
                    lp[q] = (float)((double)x[id[q]] - lse);
                    top += exp((double)x[id[q]] - lse);
                }
                double restp = 1.0 - top;
                br[i * T + t] = k == V || restp <= 0 ? -INFINITY : (float)log(restp);
            }
        }
        if (slab(ds[0], true, H5T_NATIVE_INT32, 3, r0, n, T, k, bi) < 0 || slab(ds[1], true, H5T_NATIVE_FLOAT, 3, r0, n, T, k, bl) < 0 ||
            slab(ds[2], true, H5T_NATIVE_FLOAT, 2, r0, n, T, 1, br) < 0) {
            dl_fail(e, "%s: write failed (disk full?)", tmp);
            goto out;
        }
        progress_update(&prog, r0 + n, NAN, (double)((r0 + n) * T) / (dl_now() - t0 + 1e-9));
    }
    progress_end(&prog);
    rc = 0;
out:
    for (int i = 0; i < 3; i++)
        if (ds[i] >= 0) H5Dclose(ds[i]);
    if (f >= 0 && H5Fclose(f) < 0 && rc == 0) rc = dl_fail(e, "%s: close failed", tmp);
    h5_quiet_end(quiet);
    if (rc == 0 && rename(tmp, path) != 0) rc = dl_fail(e, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (rc != 0) unlink(tmp);
    engine_free(en);
    shard_close(r);
    free(tmp), free(tk), free(in_tok), free(bi), free(rst), free(in_rst), free(lg), free(bl), free(br);
    return rc;
}

int tcache_open(TeacherCache **out, const char *path, DlError *e) {
    TeacherCache *tc = dl_calloc(1, sizeof *tc);
    H5Quiet quiet = h5_quiet_begin();
    hid_t fapl = h5_fapl(false);
    tc->f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    H5Pclose(fapl);
    int64_t k = 0, v = 0;
    int rc = -1;
    if (tc->f < 0) {
        dl_fail(e, "%s: cannot open teacher cache", path);
        goto out;
    }
    if (h5_attr_get_i64(tc->f, "k", &k) || h5_attr_get_i64(tc->f, "vocab", &v) || h5_attr_get_i64(tc->f, "seq_len", &tc->T) ||
        h5_attr_get_i64(tc->f, "rows", &tc->rows) || k < 1 || k > v) {
        dl_fail(e, "%s: not a teacher cache (attributes k, vocab, seq_len, rows)", path);
        goto out;
    }
    tc->k = (int)k;
    tc->V = v;
    tc->ids = H5Dopen2(tc->f, "ids", H5P_DEFAULT);
    tc->logp = H5Dopen2(tc->f, "logp", H5P_DEFAULT);
    tc->rest = H5Dopen2(tc->f, "rest", H5P_DEFAULT);
    if (tc->ids < 0 || tc->logp < 0 || tc->rest < 0) {
        dl_fail(e, "%s: datasets ids/logp/rest missing", path);
        goto out;
    }
    tc->bi = dl_malloc((size_t)(tc->T * k) * 4);
    tc->bl = dl_malloc((size_t)(tc->T * k) * 4);
    tc->br = dl_malloc((size_t)tc->T * 4);
    rc = 0;
out:
    h5_quiet_end(quiet);
    if (rc) tcache_close(tc), tc = NULL;
    *out = tc;
    return rc;
}

void tcache_close(TeacherCache *tc) {
    if (!tc) return;
    if (tc->ids > 0) H5Dclose(tc->ids);
    if (tc->logp > 0) H5Dclose(tc->logp);
    if (tc->rest > 0) H5Dclose(tc->rest);
    if (tc->f > 0) H5Fclose(tc->f);
    free(tc->bi), free(tc->bl), free(tc->br);
    free(tc);
}

int tcache_k(const TeacherCache *tc) { return tc->k; }
int64_t tcache_rows(const TeacherCache *tc) { return tc->rows; }

int tcache_dense(TeacherCache *tc, const int64_t *rows, int64_t n, int64_t T, int64_t V, float *out, DlError *e) {
    if (T != tc->T || V != tc->V)
        return dl_fail(e, "teacher cache holds [%lld positions, vocab %lld], asked for [%lld, %lld]", (long long)tc->T,
                       (long long)tc->V, (long long)T, (long long)V);
    const int k = tc->k;
    for (int64_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= tc->rows) return dl_fail(e, "teacher cache: row %lld out of range", (long long)rows[i]);
        if (slab(tc->ids, false, H5T_NATIVE_INT32, 3, rows[i], 1, T, k, tc->bi) < 0 ||
            slab(tc->logp, false, H5T_NATIVE_FLOAT, 3, rows[i], 1, T, k, tc->bl) < 0 ||
            slab(tc->rest, false, H5T_NATIVE_FLOAT, 2, rows[i], 1, T, 1, tc->br) < 0)
            return dl_fail(e, "teacher cache: cannot read row %lld", (long long)rows[i]);
        for (int64_t t = 0; t < T; t++) {
            float *o = out + (i * T + t) * V;
            // the rest mass spread evenly; a floor instead of -inf keeps 0 * log 0 terms finite in the losses
            float fill = V > k && isfinite(tc->br[t]) ? (float)(tc->br[t] - log((double)(V - k))) : -1e4f;
            if (fill < -1e4f) fill = -1e4f;
            for (int64_t j = 0; j < V; j++) o[j] = fill;
            for (int q = 0; q < k; q++) {
                int32_t id = tc->bi[t * k + q];
                if (id < 0 || id >= V) return dl_fail(e, "teacher cache: token id %d out of range", id);
                o[id] = tc->bl[t * k + q];
            }
        }
    }
    return 0;
}
