// fuzz_tokenizer.c: libFuzzer target for the tokenizer on arbitrary bytes. With the demo teacher's
// tokenizer (DISTILL_TOKENIZER, default checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf):
//  * encode never crashes; it fails only on invalid UTF-8, with an error that says so;
//  * decode(encode(x)) == x, except where a byte has no token (SmolLM2 maps six control bytes to <unk>);
//  * streaming decode emits exactly the bytes of the one-shot decode.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "distill/tokenizer.h"

static Tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    const char *path = getenv("DISTILL_TOKENIZER");
    if (!path) path = "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf";
    DlError e;
    if (tokenizer_load(path, &tok, &e)) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", e.msg);
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    const unsigned flags = (data[0] & 1) ? TOK_ENCODE_SPECIAL : 0;
    const char *text = (const char *)data + 1;
    const size_t len = size - 1;
    int32_t *ids = NULL;
    int64_t n = 0;
    DlError e;
    if (tokenizer_encode_ex(tok, text, len, flags, &ids, &n, &e)) {
        if (strstr(e.msg, "UTF-8")) return 0;  // rejected with a clear reason: fine
        fprintf(stderr, "encode failed: %s\n", e.msg);
        abort();
    }
    bool has_unk = false;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= tokenizer_vocab_size(tok)) abort();
        has_unk |= ids[i] == 0;
    }
    char *out = NULL;
    size_t out_len = 0;
    if (tokenizer_decode(tok, ids, n, &out, &out_len)) abort();
    if (!has_unk && (out_len != len || memcmp(out, text, len) != 0)) abort();
    // streaming decode gives the same bytes
    TokStream s;
    tok_stream_init(&s, tok);
    size_t cap = tokenizer_max_token_bytes(tok) + 4, got = 0;
    char *buf = malloc(cap), *all = malloc(out_len + cap + 1);
    for (int64_t i = 0; i < n; i++) {
        size_t k = tok_stream_push(&s, ids[i], buf, cap);
        memcpy(all + got, buf, k);
        got += k;
    }
    size_t k = tok_stream_flush(&s, buf, cap);
    memcpy(all + got, buf, k);
    got += k;
    if (got != out_len || memcmp(all, out, out_len) != 0) abort();
    free(buf), free(all), free(out), free(ids);
    return 0;
}
