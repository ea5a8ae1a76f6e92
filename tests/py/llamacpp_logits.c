// llamacpp_logits.c: a small program against llama.cpp's libllama (built by tests/py/test_export_llamacpp.py,
// not by our CMake): the logits llama.cpp computes for given token ids, so our exports can be compared
// with a real engine.
//   llamacpp_logits MODEL.gguf IDS OUT     IDS: whitespace-separated token ids (one sequence, one batch);
//                                          OUT: float32 [T, n_vocab] raw, the logits of every position
//   llamacpp_logits MODEL.gguf --tokenize TEXT   prints llama.cpp's token ids of TEXT (no BOS added)
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS OUT | MODEL.gguf --tokenize TEXT\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) return fprintf(stderr, "llama.cpp could not load %s\n", argv[1]), 1;
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int V = llama_vocab_n_tokens(vocab);
    if (!strcmp(argv[2], "--tokenize")) {
        int cap = (int)strlen(argv[3]) + 8;
        llama_token *t = malloc(sizeof *t * (size_t)cap);
        int n = llama_tokenize(vocab, argv[3], (int)strlen(argv[3]), t, cap, false, true);
        if (n < 0) return fprintf(stderr, "tokenize failed\n"), 1;
        for (int i = 0; i < n; i++) printf("%d%c", t[i], i + 1 < n ? ' ' : '\n');
        return 0;
    }
    FILE *f = fopen(argv[2], "r");
    if (!f) return fprintf(stderr, "cannot read %s\n", argv[2]), 1;
    int cap = 64, T = 0, id;
    llama_token *ids = malloc(sizeof *ids * (size_t)cap);
    while (fscanf(f, "%d", &id) == 1) {
        if (T == cap) ids = realloc(ids, sizeof *ids * (size_t)(cap *= 2));
        ids[T++] = id;
    }
    fclose(f);
    if (T == 0) return fprintf(stderr, "no token ids in %s\n", argv[2]), 1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(T < 64 ? 64 : T);
    cp.n_batch = cp.n_ubatch = (uint32_t)T;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.type_k = cp.type_v = GGML_TYPE_F32;  // the default F16 KV cache would round attention's K and V
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;  // CPU flash attention casts K/V to F16
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return fprintf(stderr, "llama.cpp could not create a context\n"), 1;
    struct llama_batch b = llama_batch_init(T, 0, 1);
    for (int i = 0; i < T; i++) {
        b.token[i] = ids[i];
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = T;
    if (llama_decode(ctx, b)) return fprintf(stderr, "llama_decode failed\n"), 1;
    FILE *o = fopen(argv[3], "wb");
    if (!o) return fprintf(stderr, "cannot write %s\n", argv[3]), 1;
    for (int i = 0; i < T; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), (size_t)V, o);
    if (fclose(o)) return fprintf(stderr, "write failed\n"), 1;
    printf("llama.cpp logits: %d tokens x %d\n", T, V);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
