// checkpoint_shard.c: see checkpoint_shard.h.
#include "distill/checkpoint_shard.h"
#include "distill/h5util.h"

#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


#define SHARD_FORMAT "distill-optim-shard"
#define SHARD_FORMAT_VERSION 1

// ---------------------------------------------------------------- small HDF5 and file helpers

static int put_ds(hid_t f, const char *name, hid_t ftype, hid_t mtype, int ndim, const hsize_t *dims, const void *data) {
    hid_t sp = H5Screate_simple(ndim, dims, NULL);
    hid_t d = H5Dcreate2(f, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = d < 0 ? -1 : H5Dwrite(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (d >= 0) H5Dclose(d);
    H5Sclose(sp);
    return rc < 0 ? -1 : 0;
}

// Size of a dataset with ndim dims (dims out), -1 if absent or of another rank.
static int ds_dims(hid_t f, const char *name, int ndim, hsize_t *dims) {
    if (H5Lexists(f, name, H5P_DEFAULT) <= 0) return -1;
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    if (d < 0) return -1;
    hid_t sp = H5Dget_space(d);
    int nd = H5Sget_simple_extent_ndims(sp);
    int rc = nd == ndim && H5Sget_simple_extent_dims(sp, dims, NULL) == ndim ? 0 : -1;
    H5Sclose(sp);
    H5Dclose(d);
    return rc;
}

static int get_ds(hid_t f, const char *name, hid_t mtype, void *buf) {
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    if (d < 0) return -1;
    herr_t rc = H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
    H5Dclose(d);
    return rc < 0 ? -1 : 0;
}

// Reads elements [off, off + n) of a 1-D float dataset.
static int get_ds_range(hid_t d, int64_t off, int64_t n, float *buf) {
    hid_t fs = H5Dget_space(d);
    hsize_t start = (hsize_t)off, count = (hsize_t)n;
    hid_t ms = H5Screate_simple(1, &count, NULL);
    herr_t rc = H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, NULL, &count, NULL);
    if (rc >= 0) rc = H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, buf);
    H5Sclose(ms);
    H5Sclose(fs);
    return rc < 0 ? -1 : 0;
}

static char *shard_dir(const char *run_dir, int stage_index, int64_t step) {
    char name[64];
    snprintf(name, sizeof name, "shards/ckpt-%02d-%08lld", stage_index, (long long)step);
    return dl_path_join(run_dir, name);
}

// ---------------------------------------------------------------- step 1: one rank's file

static int write_shard_h5(const char *path, const Optim *opt, int rank, int world, const CkptState *st, int64_t *n_elems,
                          DlError *e) {
    const Registry *reg = opt->reg;
    int npiece = 0;
    int64_t total = 0;
    size_t names_len = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable || t->shard_end <= t->shard_begin) continue;
        npiece++;
        total += t->shard_end - t->shard_begin;
        names_len += strlen(t->name) + 1;
    }
    char *names = dl_malloc(names_len + 1);
    int64_t *ranges = dl_malloc((size_t)(npiece ? npiece : 1) * 4 * sizeof(int64_t));
    float *m = dl_malloc((size_t)(total ? total : 1) * sizeof(float)), *v = dl_malloc((size_t)(total ? total : 1) * sizeof(float));
    size_t k = 0;
    int p = 0;
    int64_t off = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable || t->shard_end <= t->shard_begin) continue;
        k += (size_t)sprintf(names + k, "%s\n", t->name);
        int64_t n = t->shard_end - t->shard_begin;
        ranges[4 * p + 0] = t->shard_begin;
        ranges[4 * p + 1] = t->shard_end;
        ranges[4 * p + 2] = off;
        ranges[4 * p + 3] = t->numel;
        memcpy(m + off, opt->m + opt->mv_off[i], (size_t)n * sizeof(float));
        memcpy(v + off, opt->v + opt->mv_off[i], (size_t)n * sizeof(float));
        off += n;
        p++;
    }
    *n_elems = total;
    int rc = -1;
    hid_t fapl = h5_fapl(false);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (f < 0) {
        dl_fail(e, "%s: cannot create HDF5 file (directory writable? disk full?)", path);
        goto out;
    }
    hsize_t dn = names_len, dr[2] = {(hsize_t)npiece, 4}, dm = (hsize_t)total;
    if (h5_attr_put_str(f, "format", SHARD_FORMAT) || h5_attr_put_i64(f, "format_version", SHARD_FORMAT_VERSION) ||
        h5_attr_put_i64(f, "rank", rank) || h5_attr_put_i64(f, "world", world) || h5_attr_put_i64(f, "stage_index", st->stage_index) ||
        h5_attr_put_i64(f, "step", st->step) || h5_attr_put_i64(f, "optim_step", opt->st.step) || h5_attr_put_i64(f, "optim_t", opt->st.t) ||
        put_ds(f, "names", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, &dn, names) ||
        put_ds(f, "ranges", H5T_STD_I64LE, H5T_NATIVE_INT64, 2, dr, ranges) ||
        put_ds(f, "m", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 1, &dm, m) || put_ds(f, "v", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 1, &dm, v))
        dl_fail(e, "%s: writing failed (disk full?)", path);
    else rc = 0;
    if (f >= 0 && H5Fclose(f) < 0 && rc == 0) rc = dl_fail(e, "%s: closing the HDF5 file failed (disk full?)", path);
out:
    free(names);
    free(ranges);
    free(m);
    free(v);
    return rc;
}

int ckpt_shard_write_rank(const char *run_dir, const Optim *opt, int rank, int world, const CkptState *st,
                          CkptShardInfo *info, DlError *e) {
    memset(info, 0, sizeof *info);
    info->rank = rank;
    info->world = world;
    snprintf(info->file, sizeof info->file, "shards/ckpt-%02d-%08lld/rank-%05d-of-%05d.h5", st->stage_index,
             (long long)st->step, rank, world);
    char *dir = shard_dir(run_dir, st->stage_index, st->step);
    char *path = dl_path_join(run_dir, info->file);
    char *tmp = dl_malloc(strlen(path) + 8);
    sprintf(tmp, "%s.tmp", path);
    int rc = -1;
    if (optim_check_finite(opt, e)) {  // over this rank's owned ranges
        dl_fail_prefix(e, "refusing to write a checkpoint: ");
        goto out;
    }
    if (dl_mkdirs(dir, e)) goto out;
    H5Quiet q = h5_quiet_begin();
    int wr = write_shard_h5(tmp, opt, rank, world, st, &info->n_elems, e);
    h5_quiet_end(q);
    if (wr || dl_fsync_path(tmp, false, e) || dl_sha256_file(tmp, info->sha256, &info->bytes, e)) {
        unlink(tmp);
        goto out;
    }
    if (rename(tmp, path)) {
        dl_fail(e, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        goto out;
    }
    if (dl_fsync_path(dir, true, e)) goto out;
    rc = 0;
out:
    if (rc) {
        dl_fail_prefix(e, "rank %d: ", rank);
        snprintf(info->err, sizeof info->err, "%s", e->msg);
    }
    info->ok = rc == 0;
    free(dir);
    free(path);
    free(tmp);
    return rc;
}

// ---------------------------------------------------------------- step 2: the manifest (rank 0)

static void state_copy(CkptState *d, const CkptState *s) {
    ckpt_state_init(d);
    d->stage_index = s->stage_index;
    snprintf(d->stage_name, sizeof d->stage_name, "%s", s->stage_name);
    d->step = s->step;
    if (s->recipe) ckpt_state_set_recipe(d, s->recipe);
    for (int i = 0; i < s->n_ints; i++) ckpt_state_set_int(d, s->ints[i].key, s->ints[i].value);
    for (int i = 0; i < s->n_blobs; i++) ckpt_state_set_blob(d, s->blobs[i].key, s->blobs[i].data, s->blobs[i].len);
    for (int i = 0; i < s->n_rngs; i++) ckpt_state_set_rng(d, s->rngs[i].key, &s->rngs[i].rng);
}

static int rm_tree(const char *dir) {  // one level: a shard directory holds files only
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char *p = dl_path_join(dir, de->d_name);
        unlink(p);
        free(p);
    }
    closedir(d);
    return rmdir(dir);
}

// Shard directories whose main checkpoint has no marker (pruned by keep_last, or never completed).
static void prune_shards(const char *run_dir, int keep_stage, int64_t keep_step) {
    char *sd = dl_path_join(run_dir, "shards");
    DIR *d = opendir(sd);
    if (!d) {
        free(sd);
        return;
    }
    struct dirent *de;
    char **del = NULL;
    int nd = 0;
    while ((de = readdir(d))) {
        int stage, n = 0;
        long long step;
        if (sscanf(de->d_name, "ckpt-%2d-%8lld%n", &stage, &step, &n) != 2 || de->d_name[n]) continue;
        if (stage == keep_stage && step == keep_step) continue;
        char *main_path = checkpoint_path(run_dir, stage, step);  // ckpt-SS-STEP.h5; its marker: ckpt-SS-STEP.done
        char *marker = dl_malloc(strlen(main_path) + 8);
        size_t ml = strlen(main_path);
        if (ml > 3 && !strcmp(main_path + ml - 3, ".h5")) ml -= 3;
        sprintf(marker, "%.*s.done", (int)ml, main_path);
        if (!dl_file_exists(marker)) {
            del = dl_realloc(del, (size_t)(nd + 1) * sizeof *del);
            del[nd++] = dl_path_join(sd, de->d_name);
        }
        free(marker);
        free(main_path);
    }
    closedir(d);
    for (int i = 0; i < nd; i++) {
        if (rm_tree(del[i])) dl_warn("cannot delete old shard directory %s: %s", del[i], strerror(errno));
        free(del[i]);
    }
    free(del);
    free(sd);
}

int ckpt_shard_write_main(const char *run_dir, const Registry *reg, const float *params, const Optim *opt,
                          const CkptShardInfo *infos, int world, int stage, const CkptState *st, int keep_last,
                          char *path_out, size_t path_n, DlError *e) {
    for (int r = 0; r < world; r++) {
        if (!infos[r].ok) return dl_fail(e, "checkpoint not written: %s", infos[r].err[0] ? infos[r].err : "a rank failed");
        if (infos[r].rank != r || infos[r].world != world)
            return dl_fail(e, "checkpoint not written: shard info %d is from rank %d of %d (expected rank %d of %d)", r,
                           infos[r].rank, infos[r].world, r, world);
    }
    size_t cap = (size_t)world * 256 + 1, k = 0;
    char *list = dl_malloc(cap);
    for (int r = 0; r < world; r++)
        k += (size_t)snprintf(list + k, cap - k, "%d %s %s %lld %lld\n", r, infos[r].file, infos[r].sha256,
                              (long long)infos[r].bytes, (long long)infos[r].n_elems);
    CkptState s;
    state_copy(&s, st);
    ckpt_state_set_int(&s, "zero.world", world);
    ckpt_state_set_int(&s, "zero.stage", stage);
    ckpt_state_set_int(&s, "zero.optim.step", opt->st.step);
    ckpt_state_set_int(&s, "zero.optim.t", opt->st.t);
    ckpt_state_set_int(&s, "zero.optim.n_skip_nonfinite", opt->st.n_skip_nonfinite);
    ckpt_state_set_int(&s, "zero.optim.n_skip_outlier", opt->st.n_skip_outlier);
    ckpt_state_set_int(&s, "zero.optim.n_accepted", opt->st.n_accepted);
    ckpt_state_set_int(&s, "zero.optim.window_n", opt->st.window_n);
    ckpt_state_set_int(&s, "zero.optim.window_pos", opt->st.window_pos);
    ckpt_state_set_blob(&s, "zero.optim.window", opt->st.window, sizeof opt->st.window);
    ckpt_state_set_blob(&s, "zero.shards", list, (int64_t)k);
    free(list);
    int rc = checkpoint_write(run_dir, reg, params, NULL, &s, keep_last, path_out, path_n, e);
    if (rc == 0) prune_shards(run_dir, st->stage_index, st->step);
    ckpt_state_free(&s);
    return rc;
}

int ckpt_shard_save(DistGroup *g, const char *run_dir, const Registry *reg, const float *params, const Optim *opt,
                    int stage, const CkptState *st, int keep_last, char *path_out, size_t path_n, DlError *e) {
    const int rank = dist_rank(g), world = dist_world(g);
    CkptShardInfo mine;
    DlError e1 = {{0}};
    ckpt_shard_write_rank(run_dir, opt, rank, world, st, &mine, &e1);  // failure travels in mine.ok / mine.err
    if (!mine.ok) snprintf(mine.err, sizeof mine.err, "rank %d (host %s): %s", rank, dist_host_of(g, rank), e1.msg);
    CkptShardInfo *all = dl_malloc((size_t)world * sizeof *all);
    if (dist_allgather(g, &mine, sizeof mine, all, e)) {
        free(all);
        return dl_fail_prefix(e, "checkpoint: ");
    }
    struct {
        int32_t ok;
        char msg[DL_ERR_LEN];
        char path[512];
    } res;
    memset(&res, 0, sizeof res);
    if (rank == 0) {
        DlError e2 = {{0}};
        res.ok = ckpt_shard_write_main(run_dir, reg, params, opt, all, world, stage, st, keep_last, res.path, sizeof res.path, &e2) == 0;
        snprintf(res.msg, sizeof res.msg, "%s", e2.msg);
    }
    free(all);
    if (dist_bcast(g, &res, sizeof res, e)) return dl_fail_prefix(e, "checkpoint: ");
    if (!res.ok) return dl_fail(e, "%s", res.msg);
    if (path_out) snprintf(path_out, path_n, "%s", res.path);
    return 0;
}

// ---------------------------------------------------------------- resume

int ckpt_shard_world(const char *path, int *world, DlError *e) {
    CkptState st;
    ckpt_state_init(&st);
    if (checkpoint_read_state(path, &st, e)) {
        ckpt_state_free(&st);
        return -1;
    }
    int64_t w = 1;
    DlError ig;
    if (ckpt_state_get_int(&st, "zero.world", &w, &ig)) w = 1;
    ckpt_state_free(&st);
    *world = (int)w;
    return 0;
}

int ckpt_shard_is_sharded(const char *path, bool *sharded, DlError *e) {
    CkptState st;
    ckpt_state_init(&st);
    if (checkpoint_read_state(path, &st, e)) {
        ckpt_state_free(&st);
        return -1;
    }
    *sharded = ckpt_state_get_blob(&st, "zero.shards") != NULL;
    ckpt_state_free(&st);
    return 0;
}

typedef struct {
    int rank;
    char file[CKPT_SHARD_FILE_MAX + 1];
    char sha256[65];
    long long bytes, n_elems;
} ManifestEntry;

static int parse_manifest(const CkptBlob *b, int world, ManifestEntry *ents, const char *path, DlError *e) {
    char *text = dl_malloc((size_t)b->len + 1);
    memcpy(text, b->data, (size_t)b->len);
    text[b->len] = 0;
    int n = 0, rc = 0;
    char *save = NULL;
    for (char *ln = strtok_r(text, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save)) {
        ManifestEntry m;
        if (n >= world || sscanf(ln, "%d %96s %64s %lld %lld", &m.rank, m.file, m.sha256, &m.bytes, &m.n_elems) != 5 ||
            m.rank != n || strlen(m.sha256) != 64 || strstr(m.file, "..") || m.file[0] == '/') {
            rc = dl_fail(e, "%s: shard manifest line %d is malformed: '%.120s'", path, n + 1, ln);
            break;
        }
        ents[n++] = m;
    }
    if (!rc && n != world) rc = dl_fail(e, "%s: shard manifest lists %d files for %d ranks", path, n, world);
    free(text);
    return rc;
}

static int load_counters(const CkptState *st, Optim *opt, const char *path, DlError *e) {
    OptimState s;
    memset(&s, 0, sizeof s);
    int64_t wn, wp;
    if (ckpt_state_get_int(st, "zero.optim.step", &s.step, e) || ckpt_state_get_int(st, "zero.optim.t", &s.t, e) ||
        ckpt_state_get_int(st, "zero.optim.n_skip_nonfinite", &s.n_skip_nonfinite, e) ||
        ckpt_state_get_int(st, "zero.optim.n_skip_outlier", &s.n_skip_outlier, e) ||
        ckpt_state_get_int(st, "zero.optim.n_accepted", &s.n_accepted, e) ||
        ckpt_state_get_int(st, "zero.optim.window_n", &wn, e) || ckpt_state_get_int(st, "zero.optim.window_pos", &wp, e))
        return dl_fail_prefix(e, "%s: ", path);
    const CkptBlob *w = ckpt_state_get_blob(st, "zero.optim.window");
    if (!w || w->len != (int64_t)sizeof s.window) return dl_fail(e, "%s: optimizer window missing or of the wrong size", path);
    if (wn < 0 || wn > OPTIM_MAX_WINDOW || wp < 0 || wp >= OPTIM_MAX_WINDOW || s.t < 0 || s.t > s.step)
        return dl_fail(e, "%s: optimizer counters out of range", path);
    if (opt->cfg.outlier_factor > 0 && (wn > opt->cfg.outlier_window || wp >= opt->cfg.outlier_window))
        return dl_fail(e, "%s: the saved outlier window (%lld norms) does not fit outlier_window = %d", path, (long long)wn,
                       opt->cfg.outlier_window);
    s.window_n = (int)wn;
    s.window_pos = (int)wp;
    memcpy(s.window, w->data, sizeof s.window);
    opt->st = s;
    return 0;
}

// Copies the overlaps of one shard file's pieces with the owned ranges of opt->reg; covered[i] counts the
// elements found for tensor i. Returns 0, or -1 with e.
static int load_one(const char *run_dir, const ManifestEntry *me, int world, const CkptState *st, Optim *opt,
                    int64_t *covered, const char *path, DlError *e) {
    const Registry *reg = opt->reg;
    char *fp = dl_path_join(run_dir, me->file);
    int rc = -1;
    char *names = NULL;
    int64_t *ranges = NULL;
    int *tidx = NULL;
    hid_t f = -1, dm = -1, dv = -1;
    hid_t fapl = h5_fapl(false);
    f = H5Fopen(fp, H5F_ACC_RDONLY, fapl);
    H5Pclose(fapl);
    if (f < 0) {
        dl_fail(e, "%s: shard file %s of rank %d is %s", path, fp, me->rank,
                dl_file_exists(fp) ? "not a readable HDF5 file (corrupted?)" : "missing (copied without its shards/ folder?)");
        goto out;
    }
    char fmt[64] = "";
    int64_t frank = -1, fworld = -1, fstage = -1, fstep = -1, fos = -1;
    if (h5_attr_get_strn(f, "format", fmt, sizeof fmt) || strcmp(fmt, SHARD_FORMAT) || h5_attr_get_i64(f, "rank", &frank) ||
        h5_attr_get_i64(f, "world", &fworld) || h5_attr_get_i64(f, "stage_index", &fstage) || h5_attr_get_i64(f, "step", &fstep) ||
        h5_attr_get_i64(f, "optim_step", &fos)) {
        dl_fail(e, "%s: not a distill optimizer shard (attributes format/rank/world/step)", fp);
        goto out;
    }
    if (frank != me->rank || fworld != world || fstage != st->stage_index || fstep != st->step || fos != opt->st.step) {
        dl_fail(e, "%s: belongs to rank %lld of %lld, stage %lld step %lld (optimizer step %lld); the manifest %s expects rank %d "
                   "of %d, stage %d step %lld (optimizer step %lld)",
                fp, (long long)frank, (long long)fworld, (long long)fstage, (long long)fstep, (long long)fos, path, me->rank, world,
                st->stage_index, (long long)st->step, (long long)opt->st.step);
        goto out;
    }
    hsize_t dn[1], dr[2], dmv[1];
    if (ds_dims(f, "names", 1, dn) || ds_dims(f, "ranges", 2, dr) || dr[1] != 4 || ds_dims(f, "m", 1, dmv) ||
        (int64_t)dmv[0] != me->n_elems) {
        dl_fail(e, "%s: datasets names/ranges/m missing or of unexpected shape", fp);
        goto out;
    }
    int np = (int)dr[0];
    names = dl_malloc(dn[0] + 1);
    ranges = dl_malloc((size_t)(np ? np : 1) * 4 * sizeof(int64_t));
    if ((dn[0] && get_ds(f, "names", H5T_NATIVE_UINT8, names)) || (np && get_ds(f, "ranges", H5T_NATIVE_INT64, ranges))) {
        dl_fail(e, "%s: cannot read the piece table", fp);
        goto out;
    }
    names[dn[0]] = 0;
    // map the pieces to tensors; does this rank need anything from this file?
    tidx = dl_malloc((size_t)(np ? np : 1) * sizeof(int));
    bool needed = false;
    char *save = NULL, *nm = strtok_r(names, "\n", &save);
    for (int p = 0; p < np; p++, nm = strtok_r(NULL, "\n", &save)) {
        if (!nm) {
            dl_fail(e, "%s: %d pieces but fewer names", fp, np);
            goto out;
        }
        int64_t b = ranges[4 * p], en = ranges[4 * p + 1], off = ranges[4 * p + 2], numel = ranges[4 * p + 3];
        if (b < 0 || en <= b || en > numel || off < 0 || off + (en - b) > me->n_elems) {
            dl_fail(e, "%s: piece %d (%s) has an invalid range [%lld, %lld) at %lld", fp, p, nm, (long long)b, (long long)en,
                    (long long)off);
            goto out;
        }
        int i = reg_find(reg, nm);
        tidx[p] = -1;
        if (i < 0 || !reg->t[i].trainable) continue;  // not trained now: its moments are not needed
        if (reg->t[i].numel != numel) {
            dl_fail(e, "%s: tensor %s has %lld elements in the checkpoint, %lld in this model", fp, nm, (long long)numel,
                    (long long)reg->t[i].numel);
            goto out;
        }
        tidx[p] = i;
        if (DL_MIN(en, reg->t[i].shard_end) > DL_MAX(b, reg->t[i].shard_begin)) needed = true;
    }
    if (!needed) {
        rc = 0;
        goto out;
    }
    // the data is trusted only if the file is the one the manifest recorded
    char hex[65];
    int64_t bytes = 0;
    if (dl_sha256_file(fp, hex, &bytes, e)) goto out;
    if (strcmp(hex, me->sha256) || bytes != me->bytes) {
        dl_fail(e, "%s: SHA-256 or size (%lld bytes) does not match the manifest of %s (file corrupted or replaced)", fp,
                (long long)bytes, path);
        goto out;
    }
    dm = H5Dopen2(f, "m", H5P_DEFAULT);
    dv = H5Dopen2(f, "v", H5P_DEFAULT);
    if (dm < 0 || dv < 0) {
        dl_fail(e, "%s: datasets m/v missing", fp);
        goto out;
    }
    for (int p = 0; p < np; p++) {
        int i = tidx[p];
        if (i < 0) continue;
        const TensorInfo *t = &reg->t[i];
        int64_t b = ranges[4 * p], en = ranges[4 * p + 1], off = ranges[4 * p + 2];
        int64_t x0 = DL_MAX(b, t->shard_begin), x1 = DL_MIN(en, t->shard_end);
        if (x1 <= x0) continue;
        const int64_t at = opt->mv_off[i] + (x0 - t->shard_begin);  // optim.h: owned element x0
        if (get_ds_range(dm, off + (x0 - b), x1 - x0, opt->m + at) || get_ds_range(dv, off + (x0 - b), x1 - x0, opt->v + at)) {
            dl_fail(e, "%s: reading m/v of %s failed", fp, t->name);
            goto out;
        }
        covered[i] += x1 - x0;
    }
    rc = 0;
out:
    if (dm >= 0) H5Dclose(dm);
    if (dv >= 0) H5Dclose(dv);
    if (f >= 0) H5Fclose(f);
    free(names);
    free(ranges);
    free(tidx);
    free(fp);
    return rc;
}

int ckpt_shard_load_optim(const char *path, Optim *opt, DlError *e) {
    CkptState st;
    ckpt_state_init(&st);
    if (checkpoint_read_state(path, &st, e)) {
        ckpt_state_free(&st);
        return -1;
    }
    const CkptBlob *list = ckpt_state_get_blob(&st, "zero.shards");
    if (!list) {  // plain checkpoint: every tensor's full moments, of which this rank uses its range
        ckpt_state_free(&st);
        if (!opt->mv_compact) return checkpoint_load_optim(path, opt, e);
        // compact (sharded) moments: read into a registry-layout optimizer over the same tensors, keep the
        // owned ranges (a transient full copy: plain checkpoints come from one rank, i.e. small models)
        Registry full = *opt->reg;
        full.t = dl_malloc((size_t)(full.n ? full.n : 1) * sizeof(TensorInfo));
        memcpy(full.t, opt->reg->t, (size_t)full.n * sizeof(TensorInfo));
        for (int i = 0; i < full.n; i++) full.t[i].shard_begin = 0, full.t[i].shard_end = full.t[i].numel;
        Optim tmp;
        int rc2 = optim_init(&tmp, &opt->cfg, &full, e);
        if (rc2 == 0) rc2 = checkpoint_load_optim(path, &tmp, e);
        if (rc2 == 0) {
            for (int i = 0; i < full.n; i++) {
                const TensorInfo *t = &opt->reg->t[i];
                if (!t->trainable || t->shard_end <= t->shard_begin) continue;
                size_t n = (size_t)(t->shard_end - t->shard_begin);
                memcpy(opt->m + opt->mv_off[i], tmp.m + t->offset + t->shard_begin, n * sizeof(float));
                memcpy(opt->v + opt->mv_off[i], tmp.v + t->offset + t->shard_begin, n * sizeof(float));
            }
            opt->st = tmp.st;
        }
        if (tmp.m) optim_free(&tmp);
        free(full.t);
        return rc2;
    }
    int rc = -1;
    int64_t w64 = 0;
    ManifestEntry *ents = NULL;
    int64_t *covered = NULL;
    OptimState saved = opt->st;
    if (ckpt_state_get_int(&st, "zero.world", &w64, e) || w64 < 1 || w64 > 65536) {
        dl_fail(e, "%s: shard manifest without a valid zero.world", path);
        goto out;
    }
    const int world = (int)w64;
    ents = dl_malloc((size_t)world * sizeof *ents);
    if (parse_manifest(list, world, ents, path, e) || load_counters(&st, opt, path, e)) goto out;
    char *run_dir = dl_strdup(path);
    char *slash = strrchr(run_dir, '/');
    if (slash) *slash = 0;
    else strcpy(run_dir, ".");
    const Registry *reg = opt->reg;
    covered = dl_calloc((size_t)(reg->n ? reg->n : 1), sizeof(int64_t));
    H5Quiet q = h5_quiet_begin();
    int bad = 0;
    for (int r = 0; r < world && !bad; r++) bad = load_one(run_dir, &ents[r], world, &st, opt, covered, path, e);
    h5_quiet_end(q);
    free(run_dir);
    if (bad) goto out;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable) continue;
        int64_t want = DL_MAX(t->shard_end - t->shard_begin, 0);
        if (covered[i] != want) {
            dl_fail(e, "%s: the shard files hold %lld of the %lld elements [%lld, %lld) of tensor %s this rank needs "
                       "(%s; was it frozen when the checkpoint was written?)",
                    path, (long long)covered[i], (long long)want, (long long)t->shard_begin, (long long)t->shard_end, t->name,
                    covered[i] > want ? "overlapping pieces" : "missing pieces");
            goto out;
        }
    }
    rc = 0;
out:
    if (rc) opt->st = saved;
    free(ents);
    free(covered);
    ckpt_state_free(&st);
    return rc;
}
