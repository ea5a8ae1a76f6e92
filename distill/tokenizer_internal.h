// tokenizer_internal.h: the Tokenizer struct, shared by tokenizer.c and its loaders (tokenizer_*.c).
#pragma once
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "distill/tokenizer.h"

typedef struct {
    uint64_t key;    // (left id << 32) | right id
    int32_t rank;    // merge priority (lower first); -1 marks an empty slot
    int32_t merged;  // id of the concatenation
} TokPair;

struct Tokenizer {
    int32_t n;           // vocab size (ids 0..n-1)
    char *blob;          // token bytes, id i at blob[off[i]..off[i+1])
    int64_t *off;        // [n+1]
    uint8_t *special;    // [n] 1 for control/added tokens (matched as text only with TOK_ENCODE_SPECIAL)
    int32_t *tok_tab;    // bytes -> id for normal tokens, open addressing, [tok_mask+1]
    int32_t *spec_tab;   // text -> id for special tokens
    uint64_t tok_mask;
    TokPair *pairs;      // merge table, [pair_mask+1]
    uint64_t pair_mask;
    int32_t byte_id[256];  // single-byte token of each byte (-1: none in the vocab)
    int32_t *specials;     // ids of special tokens
    int32_t n_specials;
    uint8_t special_first[256];  // first bytes of special tokens
    size_t max_token_bytes;
    TokPreType pre;
    bool ignore_merges;
    int32_t bos, eos, pad, unk;
    char *chat_template;
    uint64_t hash;
    uint64_t serial;  // unique per tokenizer object: keys the per-thread word cache
    pcre2_code *re;
    bool jit;
};

// Byte offset of the first invalid UTF-8 sequence in text, or -1 if it is valid (no surrogates,
// no overlong forms, nothing above U+10FFFF: what Rust strings and Python str accept).
int64_t tok_utf8_invalid_at(const char *text, size_t len);
// Loaders (tokenizer_json.c, tokenizer_gguf.c).
int tokenizer_load_json(const char *path, Tokenizer **out, DlError *e);
int tokenizer_load_gguf(const char *path, Tokenizer **out, DlError *e);
