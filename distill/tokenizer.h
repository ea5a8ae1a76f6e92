// tokenizer.h: byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama-3) loaded from GGUF metadata
// (tokenizer.ggml.*) or an HF tokenizer.json, with the pre-tokenizers of those families (PCRE2 with UTF+UCP
// for the Unicode classes), special tokens, exact-byte decoding and a streaming decoder that never splits a
// UTF-8 character. Ids equal HF `tokenizers` (tests/py/test_tokenizer_parity.py checks it). Known limit:
// characters new in Unicode 15 (e.g. Kawi digits U+11F50..) are classified by PCRE2 10.42's Unicode 14
// tables, while HF's regex engine knows them; text with such characters may split differently.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "distill/common.h"

typedef struct Tokenizer Tokenizer;

// Pre-tokenizer families (GGUF tokenizer.ggml.pre names in comments).
typedef enum {
    TOK_PRE_GPT2 = 0,    // "gpt2" / "default": the GPT-2 pattern
    TOK_PRE_SMOLLM = 1,  // "smollm" / "starcoder": each \p{N} char on its own, then the GPT-2 pattern
    TOK_PRE_LLAMA3 = 2,  // "llama-bpe" / "llama3": the Llama-3 pattern (\p{N}{1,3}, newline-aware)
} TokPreType;

// Loads a GGUF file (tokenizer.ggml.* keys), an HF tokenizer.json, or an HF model directory containing
// tokenizer.json. Returns 0, or -1 with e naming the file and what was wrong.
int tokenizer_load(const char *path, Tokenizer **out, DlError *e);
void tokenizer_free(Tokenizer *t);

// Flags for tokenizer_encode_ex.
enum {
    TOK_ENCODE_SPECIAL = 1,  // match special/added tokens written in the text ("<|im_start|>") as single ids
};
// Encodes len bytes of text (must be valid UTF-8; otherwise -1 with the byte offset in e). No BOS/EOS is
// added and special-token text is encoded as plain text. *ids is malloc'd (free it); *n its length.
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int32_t **ids, int64_t *n, DlError *e);
int tokenizer_encode_ex(const Tokenizer *t, const char *text, size_t len, unsigned flags, int32_t **ids,
                        int64_t *n, DlError *e);
// Appends to a caller-owned growable buffer instead (*ids may be NULL; *cap its capacity in ids).
int tokenizer_encode_append(const Tokenizer *t, const char *text, size_t len, unsigned flags, int32_t **ids,
                            int64_t *n, int64_t *cap, DlError *e);

// Decodes ids to the exact bytes they stand for (special tokens as their text). *text is malloc'd and
// NUL-terminated (len excludes the NUL). Returns -1 if an id is out of range.
int tokenizer_decode(const Tokenizer *t, const int32_t *ids, int64_t n, char **text, size_t *len);

// Streaming decode: push ids one at a time and receive only complete UTF-8 characters; bytes of a
// character that spans tokens are held until it completes. Invalid sequences are passed through unchanged
// (decoding stays byte-exact). out must hold at least tokenizer_max_token_bytes(t) + 4 bytes; push returns
// the number of bytes written, or SIZE_MAX for an out-of-range id or a too-small buffer (state unchanged).
typedef struct {
    const Tokenizer *t;
    uint8_t pend[4];  // bytes of an incomplete UTF-8 character
    int npend;
} TokStream;
void tok_stream_init(TokStream *s, const Tokenizer *t);
size_t tok_stream_push(TokStream *s, int32_t id, char *out, size_t cap);
// Emits any held bytes (an incomplete character at the end of the stream) and resets the state.
size_t tok_stream_flush(TokStream *s, char *out, size_t cap);

int32_t tokenizer_vocab_size(const Tokenizer *t);
int32_t tokenizer_bos(const Tokenizer *t);  // -1 if none
int32_t tokenizer_eos(const Tokenizer *t);  // -1 if none
int32_t tokenizer_pad(const Tokenizer *t);  // -1 if none
// Id of a token given by its vocabulary text (e.g. "<|im_end|>", "Ġthe"), or -1.
int32_t tokenizer_token_id(const Tokenizer *t, const char *token);
// Raw bytes of token id (not NUL-terminated); NULL for an out-of-range id.
const char *tokenizer_token_bytes(const Tokenizer *t, int32_t id, size_t *len);
bool tokenizer_is_special(const Tokenizer *t, int32_t id);
size_t tokenizer_max_token_bytes(const Tokenizer *t);
TokPreType tokenizer_pre_type(const Tokenizer *t);
const char *tokenizer_pre_name(const Tokenizer *t);
// The chat template string from GGUF (tokenizer.chat_template) or tokenizer_config.json, or NULL.
const char *tokenizer_chat_template(const Tokenizer *t);
// Stable 64-bit hash of vocab (bytes + special flags), merges and pre-tokenizer; recorded in shards so a
// shard is never read with a different tokenizer.
uint64_t tokenizer_hash(const Tokenizer *t);

// ---- construction from arrays (used by the GGUF and tokenizer.json loaders and by tests)
// tokens: vocabulary strings in the byte-level alphabet (GPT-2 bytes_to_unicode), special tokens as plain
// text; special[i] marks control/added tokens; merges: "A B" strings, rank = index. Copies everything.
typedef struct {
    int32_t n_tokens;
    const char *const *tokens;
    const size_t *token_lens;  // may be NULL (then strlen)
    const uint8_t *special;    // may be NULL
    int64_t n_merges;
    const char *const *merges;
    const size_t *merge_lens;  // may be NULL
    TokPreType pre;
    bool ignore_merges;  // a pre-token that is itself a vocab entry is emitted whole (Llama-3, HF ignore_merges)
    int32_t bos, eos, pad;
    int32_t unk;  // emitted for a byte the vocabulary has no token for; set -1 for none (then such text fails)
    const char *chat_template;  // may be NULL
    const char *source;         // file name, for error messages
} TokenizerSpec;
int tokenizer_build(const TokenizerSpec *spec, Tokenizer **out, DlError *e);

// Maps a GGUF tokenizer.ggml.pre name to a pre-tokenizer; -1 if unsupported.
int tokenizer_pre_from_name(const char *name);
