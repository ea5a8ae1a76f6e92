// test_dataloader.c: the shard data loader over two real HDF5 shards: batches are the packed rows shifted by
// one, masks stop at document starts, shuffling is a seeded permutation (same seed, same order; another
// seed, another order), ranks get disjoint slices that cover the epoch, and a saved position resumes
// bit-exactly, also across an epoch boundary and with another world size of the same global batch.
#include <string.h>
#include <unistd.h>

#include "distill/dataloader.h"
#include "distill/shards.h"
#include "tests/check.h"

static const int64_t T = 8;
static char paths[2][300];

// Documents with ids encoding (shard, doc, position) so every row is recognisable.
static void make_shards(void) {
    DlError e;
    for (int s = 0; s < 2; s++) {
        snprintf(paths[s], sizeof paths[s], "/tmp/distill_test_dl_%d_%d.h5", (int)getpid(), s);
        ShardWriterOpts o = {.kind = SHARD_LM, .tokenizer_hash = 42, .tokenizer_pre = "smollm", .vocab_size = 100000,
                             .seq_len = T, .pad_id = 0, .deflate = 1, .chunk = 64};
        ShardWriter *w;
        CHECK(shard_writer_open(&w, paths[s], &o, &e) == 0);
        for (int d = 0; d < 20 + 7 * s; d++) {
            int32_t ids[64];
            uint8_t m[64];
            int64_t n = 3 + (d * 7) % 13;
            for (int64_t i = 0; i < n; i++) {
                ids[i] = 1 + s * 50000 + d * 100 + (int32_t)i;
                m[i] = i != 1;  // one unmasked token per doc
            }
            CHECK(shard_add_doc(w, ids, m, n, &e) == 0);
        }
        CHECK(shard_writer_close(w, &e) == 0);
    }
}

static DataLoader *open_dl(int rank, int world, int64_t B, uint64_t seed, bool shuffle) {
    DlError e;
    const char *p[2] = {paths[0], paths[1]};
    DataLoaderOpts o = {.paths = p, .n_paths = 2, .seq_len = T, .batch_size = B, .rank = rank, .world_size = world,
                        .seed = seed, .shuffle = shuffle};
    DataLoader *dl = NULL;
    if (dataloader_open(&dl, &o, &e)) fprintf(stderr, "%s\n", e.msg);
    return dl;
}

// Signature of a batch: its inputs, hashed.
static uint64_t batch_hash(const DataBatch *b) {
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i < b->B * b->T; i++) h = (h ^ (uint64_t)b->inputs[i]) * 1099511628211ull;
    return h;
}

static void test_content(void) {
    DlError e;
    DataLoader *dl = open_dl(0, 1, 3, 1, false);
    CHECK(dl != NULL);
    if (!dl) return;
    // gather all packed rows straight from the shards for comparison
    int64_t rows = dataloader_rows(dl);
    CHECK(rows > 10);
    const DataBatch *b;
    CHECK(dataloader_next(dl, &b, &e) == 0);
    ShardReader *r;
    CHECK(shard_open(&r, paths[0], &e) == 0);
    int32_t tok[3 * 9];
    uint8_t m[3 * 9], rs[3 * 9];
    CHECK(shard_read_rows(r, 0, 3, tok, m, rs, &e) == 0);
    bool ok = true;
    for (int64_t i = 0; i < 3; i++)
        for (int64_t t = 0; t < T; t++) {
            int64_t k = i * T + t, q = i * (T + 1) + t;
            ok &= b->inputs[k] == tok[q] && b->targets[k] == tok[q + 1];
            ok &= b->mask[k] == (m[q + 1] && !rs[q + 1]);
            ok &= b->reset[k] == (t == 0 || rs[q]);
        }
    CHECK(ok);
    // targets are the next token within a document; at a document start the mask is 0
    int n_boundary = 0;
    for (int64_t k = 0; k < 3 * T; k++) {
        bool crosses = (b->targets[k] / 100) != (b->inputs[k] / 100);
        if (crosses) { n_boundary++; CHECK(b->mask[k] == 0); }
        else CHECK(b->targets[k] == b->inputs[k] + 1);
    }
    CHECK(n_boundary > 0);
    shard_close(r);
    dataloader_close(dl);
}

static void test_shuffle_ranks_resume(void) {
    DlError e;
    const int64_t B = 2;
    // same seed: same order; another seed: another order
    DataLoader *a = open_dl(0, 1, B, 7, true), *b = open_dl(0, 1, B, 7, true), *c = open_dl(0, 1, B, 8, true);
    if (!a || !b || !c) { CHECK(0); return; }
    int64_t steps = dataloader_steps_per_epoch(a);
    CHECK(steps == dataloader_rows(a) / B);
    bool same = true, differ = false;
    const DataBatch *ba, *bb, *bc;
    for (int64_t s = 0; s < steps; s++) {
        dataloader_next(a, &ba, &e);
        dataloader_next(b, &bb, &e);
        dataloader_next(c, &bc, &e);
        same &= batch_hash(ba) == batch_hash(bb);
        differ |= batch_hash(ba) != batch_hash(bc);
    }
    CHECK(same && differ);
    // next epoch is another permutation of the same rows
    DataPos p = dataloader_pos(a);
    CHECK(p.epoch == 0 && p.consumed == (uint64_t)(steps * B));
    dataloader_next(a, &ba, &e);
    CHECK(ba->epoch == 1 && ba->step == 0);
    dataloader_close(a); dataloader_close(b); dataloader_close(c);

    // 3 ranks: disjoint slices whose union is every row of the epoch exactly once (minus the dropped tail)
    const int W = 3;
    DataLoader *rk[3];
    for (int r = 0; r < W; r++) rk[r] = open_dl(r, W, B, 11, true);
    int64_t rows = dataloader_rows(rk[0]), gsteps = dataloader_steps_per_epoch(rk[0]);
    CHECK(gsteps == rows / (B * W));
    // identify a row by its first input token + its second (unique: tokens encode shard/doc/pos, rows overlap by 1)
    int64_t seen_n = 0;
    uint64_t *seen = malloc((size_t)rows * sizeof(uint64_t));
    for (int64_t s = 0; s < gsteps; s++)
        for (int r = 0; r < W; r++) {
            const DataBatch *x;
            CHECK(dataloader_next(rk[r], &x, &e) == 0);
            for (int64_t i = 0; i < B; i++) seen[seen_n++] = ((uint64_t)x->inputs[i * T] << 32) | (uint32_t)x->inputs[i * T + 1];
        }
    CHECK(seen_n == gsteps * B * W);
    int dup = 0;
    for (int64_t i = 0; i < seen_n; i++)
        for (int64_t j = i + 1; j < seen_n; j++) dup += seen[i] == seen[j];
    CHECK(dup == 0);
    free(seen);
    for (int r = 0; r < W; r++) dataloader_close(rk[r]);

    // resume: run 5 steps, save, run 9 more (crossing into epoch 1); a fresh loader set to the saved
    // position gives the same 9 batches
    DataLoader *x = open_dl(0, 1, B, 5, true);
    const DataBatch *bx;
    for (int s = 0; s < 5; s++) dataloader_next(x, &bx, &e);
    DataPos saved = dataloader_pos(x);
    int64_t n_after = dataloader_steps_per_epoch(x) - 5 + 4;
    uint64_t *h = malloc((size_t)n_after * 8);
    for (int64_t s = 0; s < n_after; s++) {
        dataloader_next(x, &bx, &e);
        h[s] = batch_hash(bx);
    }
    CHECK(bx->epoch == 1);
    DataPos saved2 = dataloader_pos(x);
    DataLoader *y = open_dl(0, 1, B, 5, true);
    CHECK(dataloader_set_pos(y, &saved, &e) == 0);
    bool eq = true;
    for (int64_t s = 0; s < n_after; s++) {
        dataloader_next(y, &bx, &e);
        eq &= h[s] == batch_hash(bx);
    }
    CHECK(eq);
    // restoring a position in epoch 1 directly
    DataLoader *z = open_dl(0, 1, B, 5, true);
    CHECK(dataloader_set_pos(z, &saved2, &e) == 0);
    const DataBatch *bz;
    dataloader_next(x, &bx, &e);
    dataloader_next(z, &bz, &e);
    CHECK(batch_hash(bx) == batch_hash(bz) && bz->epoch == 1);
    // bad positions are refused
    DataPos bad = saved;
    bad.seed = 6;
    CHECK(dataloader_set_pos(z, &bad, &e) == -1);
    bad = saved;
    bad.consumed += 1;
    CHECK(dataloader_set_pos(z, &bad, &e) == -1);
    free(h);
    dataloader_close(x); dataloader_close(y); dataloader_close(z);

    // same global batch, other world size: 1 rank x 4 rows == 2 ranks x 2 rows, concatenated by rank
    DataLoader *one = open_dl(0, 1, 4, 3, true), *r0 = open_dl(0, 2, 2, 3, true), *r1 = open_dl(1, 2, 2, 3, true);
    const DataBatch *b1, *b2, *b3;
    bool match = true;
    for (int s = 0; s < 3; s++) {
        dataloader_next(one, &b1, &e);
        dataloader_next(r0, &b2, &e);
        dataloader_next(r1, &b3, &e);
        match &= memcmp(b1->inputs, b2->inputs, (size_t)(2 * T) * 4) == 0;
        match &= memcmp(b1->inputs + 2 * T, b3->inputs, (size_t)(2 * T) * 4) == 0;
    }
    CHECK(match);
    dataloader_close(one); dataloader_close(r0); dataloader_close(r1);
}

static void test_errors(void) {
    DlError e;
    DataLoader *dl;
    const char *p[2] = {paths[0], paths[1]};
    DataLoaderOpts o = {.paths = p, .n_paths = 2, .seq_len = T + 1, .batch_size = 2, .rank = 0, .world_size = 1};
    CHECK(dataloader_open(&dl, &o, &e) == -1 && strstr(e.msg, "seq_len"));
    o.seq_len = T;
    o.rank = 2;
    CHECK(dataloader_open(&dl, &o, &e) == -1 && strstr(e.msg, "rank"));
    o.rank = 0;
    o.batch_size = 100000;
    CHECK(dataloader_open(&dl, &o, &e) == -1 && strstr(e.msg, "fewer than one global batch"));
    const char *missing[] = {"/nonexistent/shard.h5"};
    o.paths = missing;
    o.n_paths = 1;
    o.batch_size = 1;
    CHECK(dataloader_open(&dl, &o, &e) == -1 && strstr(e.msg, "/nonexistent/shard.h5"));
}

// Preference batches: rows [0,B) are prompt+chosen, [B,2B) prompt+rejected; the mask covers response targets.
static void test_preference(void) {
    DlError e;
    char path[300];
    snprintf(path, sizeof path, "/tmp/distill_test_dl_pref_%d.h5", (int)getpid());
    ShardWriterOpts o = {.kind = SHARD_PREF, .tokenizer_hash = 42, .vocab_size = 1000, .pad_id = 999, .deflate = 1};
    ShardWriter *w;
    CHECK(shard_writer_open(&w, path, &o, &e) == 0);
    for (int i = 0; i < 10; i++) {
        int32_t p[4] = {100 + i, 101, 102, 103}, c[3] = {200 + i, 201, 202}, r[2] = {300 + i, 301};
        int64_t np = 2 + i % 3;  // 2..4
        CHECK(shard_add_pair(w, p, np, c, 3, r, i == 9 ? 2 : 1 + i % 2, &e) == 0);
    }
    CHECK(shard_writer_close(w, &e) == 0);
    const char *paths1[] = {path};
    DataLoaderOpts lo = {.paths = paths1, .n_paths = 1, .seq_len = 6, .batch_size = 2, .rank = 1, .world_size = 2,
                         .seed = 9, .shuffle = true, .preference = true};
    DataLoader *dl;
    CHECK(dataloader_open(&dl, &lo, &e) == 0);
    if (!dl) { fprintf(stderr, "%s\n", e.msg); return; }
    CHECK_EQ_I64(dataloader_rows(dl), 10);
    CHECK_EQ_I64(dataloader_steps_per_epoch(dl), 2);
    const DataBatch *b;
    int checked = 0;
    for (int s = 0; s < 2; s++) {
        CHECK(dataloader_next(dl, &b, &e) == 0);
        CHECK(b->B == 4 && b->n_pairs == 2 && b->T == 6);
        for (int64_t i = 0; i < 2; i++) {
            const int32_t *x = b->inputs + i * 6, *y = b->targets + i * 6, *xr = b->inputs + (2 + i) * 6;
            const uint8_t *m = b->mask + i * 6, *mr = b->mask + (2 + i) * 6;
            int pair = x[0] - 100;
            int64_t np = 2 + pair % 3;
            CHECK(xr[0] == x[0]);                    // same prompt in both rows
            CHECK(x[np] == 200 + pair);              // chosen starts right after the prompt
            CHECK(xr[np] == 300 + pair);             // rejected too
            CHECK(m[np - 1] == 1 && y[np - 1] == 200 + pair);  // the first response token is predicted
            CHECK(m[0] == 0 && (np < 3 || m[np - 2] == 0));     // prompt targets are not trained on
            int sum = 0, sumr = 0;
            for (int t = 0; t < 6; t++) sum += m[t], sumr += mr[t];
            CHECK(sum == 3);                         // exactly the chosen tokens
            int64_t nr = pair == 9 ? 2 : 1 + pair % 2;
            CHECK(sumr == nr);
            CHECK(b->reset[i * 6] == 1 && b->reset[i * 6 + 1] == 0);
            checked++;
        }
    }
    CHECK(checked == 4);
    dataloader_close(dl);
    // a pair longer than seq_len+1 is an error naming the shard
    lo.seq_len = 4;
    lo.rank = 0;
    lo.world_size = 1;
    lo.batch_size = 10;
    lo.shuffle = false;
    CHECK(dataloader_open(&dl, &lo, &e) == 0);
    CHECK(dataloader_next(dl, &b, &e) == -1 && strstr(e.msg, path) && strstr(e.msg, "seq_len"));
    dataloader_close(dl);
    // an LM loader refuses a preference shard and vice versa
    lo.preference = false;
    CHECK(dataloader_open(&dl, &lo, &e) == -1 && strstr(e.msg, "preference"));
    lo.preference = true;
    lo.paths = (const char *const[]){paths[0]};
    CHECK(dataloader_open(&dl, &lo, &e) == -1 && strstr(e.msg, "not a preference shard"));
    unlink(path);
}

int main(void) {
    make_shards();
    test_content();
    test_shuffle_ranks_resume();
    test_errors();
    test_preference();
    unlink(paths[0]);
    unlink(paths[1]);
    return check_report("test_dataloader");
}
