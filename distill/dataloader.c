// dataloader.c: seeded per-epoch permutation of packed rows, disjoint per-rank slices, resumable position.
#include "distill/dataloader.h"

#include <string.h>

#include "distill/rng.h"
#include "distill/shards.h"

struct DataLoader {
    DataLoaderOpts o;
    ShardReader **shards;
    int n_shards;
    int64_t *first_row;  // [n_shards+1] prefix sums of rows
    int64_t rows;
    int64_t *perm;       // [rows] order of the current epoch
    DataPos pos;
    DataBatch batch;
    int32_t *row_tok;    // [T+1] staging
    uint8_t *row_mask, *row_reset;
};

static void make_perm(DataLoader *dl) {
    for (int64_t i = 0; i < dl->rows; i++) dl->perm[i] = i;
    if (!dl->o.shuffle) return;
    Rng r;
    rng_init(&r, dl->pos.seed, 0x64617461ull + dl->pos.epoch);  // stream per epoch ("data" + epoch)
    for (int64_t i = dl->rows - 1; i > 0; i--) {
        int64_t j = (int64_t)rng_below(&r, (uint64_t)i + 1);
        int64_t t = dl->perm[i];
        dl->perm[i] = dl->perm[j];
        dl->perm[j] = t;
    }
}

int dataloader_open(DataLoader **out, const DataLoaderOpts *o, DlError *e) {
    *out = NULL;
    if (o->n_paths <= 0) return dl_fail(e, "data loader: no shard files");
    if (o->seq_len <= 0 || o->batch_size <= 0) return dl_fail(e, "data loader: seq_len and batch_size must be > 0");
    if (o->world_size <= 0 || o->rank < 0 || o->rank >= o->world_size)
        return dl_fail(e, "data loader: rank %d out of range for world size %d", o->rank, o->world_size);
    DataLoader *dl = dl_calloc(1, sizeof(DataLoader));
    dl->o = *o;
    dl->o.paths = NULL;
    dl->shards = dl_calloc((size_t)o->n_paths, sizeof(ShardReader *));
    dl->first_row = dl_calloc((size_t)o->n_paths + 1, sizeof(int64_t));
    for (int i = 0; i < o->n_paths; i++) {
        ShardReader *r;
        if (shard_open(&r, o->paths[i], e)) goto fail;
        dl->shards[dl->n_shards++] = r;
        const ShardInfo *in = shard_info(r);
        if (o->preference && in->kind != SHARD_PREF) { dl_fail(e, "%s: not a preference shard (tokenize with --format preference)", o->paths[i]); goto fail; }
        if (!o->preference && in->kind != SHARD_LM) { dl_fail(e, "%s: a preference shard cannot feed the LM data loader", o->paths[i]); goto fail; }
        if (!o->preference && in->seq_len != o->seq_len) {
            dl_fail(e, "%s: packed with seq_len %lld, but training uses seq_len %lld (re-run distill tokenize --seq-len %lld)",
                    o->paths[i], (long long)in->seq_len, (long long)o->seq_len, (long long)o->seq_len);
            goto fail;
        }
        if (o->tokenizer && shard_check_tokenizer(r, o->tokenizer, e)) goto fail;
        if (i > 0 && in->tokenizer_hash != shard_info(dl->shards[0])->tokenizer_hash) {
            dl_fail(e, "%s: written with a different tokenizer than %s", o->paths[i], o->paths[0]);
            goto fail;
        }
        dl->first_row[i + 1] = dl->first_row[i] + (o->preference ? in->n_pairs : in->n_seqs);
    }
    dl->rows = dl->first_row[dl->n_shards];
    int64_t global = o->batch_size * o->world_size;
    if (dl->rows < global) {
        dl_fail(e, "data loader: %lld packed rows in %d shard(s), fewer than one global batch of %lld (batch %lld x %d ranks)",
                (long long)dl->rows, dl->n_shards, (long long)global, (long long)o->batch_size, o->world_size);
        goto fail;
    }
    dl->perm = dl_malloc((size_t)dl->rows * sizeof(int64_t));
    dl->pos = (DataPos){.seed = o->seed, .epoch = 0, .consumed = 0};
    make_perm(dl);
    int64_t rows_per_batch = o->preference ? 2 * o->batch_size : o->batch_size;
    int64_t BT = rows_per_batch * o->seq_len;
    dl->batch = (DataBatch){.B = rows_per_batch, .T = o->seq_len, .n_pairs = o->preference ? o->batch_size : 0};
    dl->batch.inputs = dl_malloc((size_t)BT * 4);
    dl->batch.targets = dl_malloc((size_t)BT * 4);
    dl->batch.mask = dl_malloc((size_t)BT);
    dl->batch.reset = dl_malloc((size_t)BT);
    dl->row_tok = dl_malloc((size_t)(o->seq_len + 1) * 4);
    dl->row_mask = dl_malloc((size_t)o->seq_len + 1);
    dl->row_reset = dl_malloc((size_t)o->seq_len + 1);
    *out = dl;
    return 0;
fail:
    dataloader_close(dl);
    return -1;
}

void dataloader_close(DataLoader *dl) {
    if (!dl) return;
    for (int i = 0; i < dl->n_shards; i++) shard_close(dl->shards[i]);
    free(dl->shards); free(dl->first_row); free(dl->perm);
    free(dl->batch.inputs); free(dl->batch.targets); free(dl->batch.mask); free(dl->batch.reset);
    free(dl->row_tok); free(dl->row_mask); free(dl->row_reset);
    free(dl);
}

int64_t dataloader_rows(const DataLoader *dl) { return dl->rows; }
int64_t dataloader_steps_per_epoch(const DataLoader *dl) { return dl->rows / (dl->o.batch_size * dl->o.world_size); }
DataPos dataloader_pos(const DataLoader *dl) { return dl->pos; }

int dataloader_set_pos(DataLoader *dl, const DataPos *p, DlError *e) {
    int64_t global = dl->o.batch_size * dl->o.world_size;
    if (p->seed != dl->o.seed) return dl_fail(e, "data position was saved with seed %llu, the loader uses %llu", (unsigned long long)p->seed, (unsigned long long)dl->o.seed);
    if (p->consumed % (uint64_t)global != 0 || p->consumed > (uint64_t)(dataloader_steps_per_epoch(dl) * global))
        return dl_fail(e, "data position: %llu rows consumed is not a whole number of global batches of %lld within an epoch",
                       (unsigned long long)p->consumed, (long long)global);
    bool new_epoch = p->epoch != dl->pos.epoch;
    dl->pos = *p;
    if (new_epoch) make_perm(dl);
    return 0;
}

// Shard holding global row g (last shard with first_row <= g).
static int shard_of(const DataLoader *dl, int64_t g) {
    int lo = 0, hi = dl->n_shards - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (dl->first_row[mid] <= g) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// Row g of the global row space into the staging buffers.
static int read_row(DataLoader *dl, int64_t g, DlError *e) {
    int s = shard_of(dl, g);
    return shard_read_rows(dl->shards[s], g - dl->first_row[s], 1, dl->row_tok, dl->row_mask, dl->row_reset, e);
}

// Writes prompt ++ response as row `row` of the batch: padded, mask on the response targets.
static int put_pair_row(DataLoader *dl, int64_t row, const int32_t *p, int64_t np, const int32_t *r, int64_t nr,
                        int32_t pad, const char *path, int64_t pair, DlError *e) {
    int64_t T = dl->o.seq_len, L = np + nr;
    if (L > T + 1)
        return dl_fail(e, "%s: preference pair %lld has %lld tokens, more than seq_len+1 = %lld (tokenize with --seq-len %lld "
                          "to skip such pairs, or train with a longer seq_len)", path, (long long)pair, (long long)L,
                       (long long)(T + 1), (long long)T);
    DataBatch *b = &dl->batch;
    for (int64_t t = 0; t < T; t++) {
        int64_t k = row * T + t;
        int32_t x = t < L ? (t < np ? p[t] : r[t - np]) : pad;
        int32_t y = t + 1 < L ? (t + 1 < np ? p[t + 1] : r[t + 1 - np]) : pad;
        b->inputs[k] = x;
        b->targets[k] = y;
        b->mask[k] = t + 1 >= np && t + 1 < L;
        b->reset[k] = t == 0;
    }
    return 0;
}

static int read_pairs(DataLoader *dl, int64_t base, DlError *e) {
    int64_t B = dl->o.batch_size;
    for (int64_t i = 0; i < B; i++) {
        int64_t g = dl->perm[base + i];
        int s = shard_of(dl, g);
        int32_t *p, *c, *r;
        int64_t np, nc, nr;
        if (shard_read_pair(dl->shards[s], g - dl->first_row[s], &p, &np, &c, &nc, &r, &nr, e)) return -1;
        int32_t pad = shard_info(dl->shards[s])->pad_id;
        const char *path = shard_path(dl->shards[s]);
        int rc = put_pair_row(dl, i, p, np, c, nc, pad, path, g - dl->first_row[s], e) ||
                 put_pair_row(dl, B + i, p, np, r, nr, pad, path, g - dl->first_row[s], e);
        free(p); free(c); free(r);
        if (rc) return -1;
    }
    return 0;
}

int dataloader_next(DataLoader *dl, const DataBatch **out, DlError *e) {
    int64_t B = dl->o.batch_size, T = dl->o.seq_len, global = B * dl->o.world_size;
    if ((int64_t)dl->pos.consumed + global > dl->rows) {  // epoch done: next permutation
        dl->pos.epoch++;
        dl->pos.consumed = 0;
        make_perm(dl);
    }
    DataBatch *b = &dl->batch;
    b->epoch = dl->pos.epoch;
    b->step = (int64_t)dl->pos.consumed / global;
    int64_t base = (int64_t)dl->pos.consumed + (int64_t)dl->o.rank * B;
    if (dl->o.preference) {
        if (read_pairs(dl, base, e)) return -1;
        dl->pos.consumed += (uint64_t)global;
        *out = b;
        return 0;
    }
    for (int64_t i = 0; i < B; i++) {
        if (read_row(dl, dl->perm[base + i], e)) return -1;
        for (int64_t t = 0; t < T; t++) {
            b->inputs[i * T + t] = dl->row_tok[t];
            b->targets[i * T + t] = dl->row_tok[t + 1];
            b->mask[i * T + t] = dl->row_mask[t + 1] && !dl->row_reset[t + 1];
            b->reset[i * T + t] = t == 0 || dl->row_reset[t];
        }
    }
    dl->pos.consumed += (uint64_t)global;
    *out = b;
    return 0;
}
