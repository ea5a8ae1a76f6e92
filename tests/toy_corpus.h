// toy_corpus.h: a token shard of a tiny learnable "language" (vocab 256, 120 documents, mostly
// tok -> (5*tok+3) mod 256), for tests that run the real pipeline on a random-weight teacher.
#pragma once
#include <stdio.h>
#include <stdlib.h>

#include "distill/rng.h"
#include "distill/shards.h"

static void toy_corpus_write(const char *path) {
    ShardWriterOpts o = {.kind = SHARD_LM, .tokenizer_hash = 0, .tokenizer_pre = "none", .vocab_size = 256,
                         .seq_len = 0, .pad_id = 0, .deflate = 1};
    ShardWriter *w;
    DlError e;
    if (shard_writer_open(&w, path, &o, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        exit(1);
    }
    Rng g;
    rng_init(&g, 42, 0);
    for (int d = 0; d < 120; d++) {
        int32_t ids[64];
        int n = 8 + (int)rng_below(&g, 40);
        ids[0] = 1;
        for (int i = 1; i < n; i++) ids[i] = rng_uniform(&g) < 0.85f ? (5 * ids[i - 1] + 3) % 256 : (int32_t)rng_below(&g, 256);
        if (shard_add_doc(w, ids, NULL, n, &e)) exit(1);
    }
    if (shard_writer_close(w, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        exit(1);
    }
}
