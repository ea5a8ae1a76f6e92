// tokenizer.c: byte-level BPE core: vocabulary tables, merge ranks, pre-tokenization (PCRE2, UTF+UCP, JIT),
// heap-based merging, special-token splitting, decoding and streaming decoding.
//
// Encoding follows HF `tokenizers` exactly: special tokens (only when asked) split the text first; each
// remaining segment is pre-tokenized (SmolLM: every \p{N} char isolated, then the GPT-2 pattern on each
// piece; Llama-3: its pattern); each pre-token is mapped to its bytes' initial single-byte tokens and merged
// pair by pair, always the lowest merge rank first, ties to the leftmost pair.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "distill/tokenizer.h"

#include <pcre2.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <utf8proc.h>

#include "distill/tokenizer_internal.h"

// ---- patterns (HF ByteLevel's GPT-2 regex and the Llama-3 Split regex, as in their tokenizer.json)
static const char *PAT_GPT2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char *PAT_LLAMA3 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static const char *PRE_NAMES[] = {"gpt2", "smollm", "llama-bpe"};

int tokenizer_pre_from_name(const char *name) {
    if (!name) return -1;
    if (!strcmp(name, "gpt2") || !strcmp(name, "default") || !strcmp(name, "gpt-2")) return TOK_PRE_GPT2;
    if (!strcmp(name, "smollm") || !strcmp(name, "starcoder") || !strcmp(name, "refact")) return TOK_PRE_SMOLLM;
    if (!strcmp(name, "llama-bpe") || !strcmp(name, "llama3") || !strcmp(name, "llama-v3")) return TOK_PRE_LLAMA3;
    return -1;
}

// ---- GPT-2 byte <-> unicode alphabet: printable bytes stand for themselves, the other 68 bytes map to
// U+0100.. in byte order, so every token is a printable string.
static int byte_to_cp[256];
static int cp_to_byte[324];  // U+0000..U+0143 -> byte, or -1
static void bytes_alphabet_fill(void) {
    int extra = 0;
    for (int i = 0; i < 324; i++) cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        byte_to_cp[b] = printable ? b : 256 + extra++;
        cp_to_byte[byte_to_cp[b]] = b;
    }
}
static void bytes_alphabet_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, bytes_alphabet_fill);
}

// Decodes one UTF-8 character (validated input); returns its length.
static inline int utf8_decode(const uint8_t *s, size_t n, int32_t *cp) {
    uint8_t c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    if ((c >> 5) == 6 && n >= 2) { *cp = ((c & 0x1F) << 6) | (s[1] & 0x3F); return 2; }
    if ((c >> 4) == 14 && n >= 3) { *cp = ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F); return 3; }
    if ((c >> 3) == 30 && n >= 4) {
        *cp = ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        return 4;
    }
    *cp = -1;
    return 1;
}

int64_t tok_utf8_invalid_at(const char *text, size_t len) {
    const uint8_t *s = (const uint8_t *)text;
    size_t i = 0;
    while (i < len) {
        // ASCII fast path, 8 bytes at a time
        while (i + 8 <= len) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= len) break;
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        int need;
        uint32_t cp, min;
        if (c >= 0xC2 && c <= 0xDF) { need = 1; cp = c & 0x1F; min = 0x80; }
        else if (c >= 0xE0 && c <= 0xEF) { need = 2; cp = c & 0x0F; min = 0x800; }
        else if (c >= 0xF0 && c <= 0xF4) { need = 3; cp = c & 0x07; min = 0x10000; }
        else return (int64_t)i;
        if (i + (size_t)need >= len) return (int64_t)i;  // truncated at the end
        for (int k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return (int64_t)i;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return (int64_t)i;
        i += need + 1;
    }
    return -1;
}

// Converts a vocabulary string in the byte-level alphabet to raw bytes; false if a character is outside it.
static bool vocab_to_bytes(const char *s, size_t n, char *out, size_t *out_n) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        int32_t cp;
        int k = utf8_decode((const uint8_t *)s + i, n - i, &cp);
        if (cp < 0 || cp >= 324 || cp_to_byte[cp] < 0) return false;
        out[o++] = (char)cp_to_byte[cp];
        i += k;
    }
    *out_n = o;
    return true;
}

// ---- hashing
static inline uint64_t fnv1a(const void *p, size_t n, uint64_t h) {
    const uint8_t *s = p;
    for (size_t i = 0; i < n; i++) { h ^= s[i]; h *= 0x100000001b3ull; }
    return h;
}
#define FNV_INIT 0xcbf29ce484222325ull
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return x;
}

// bytes -> id table (open addressing; ids of entries, -1 empty)
static int32_t strtab_find(const Tokenizer *t, const int32_t *tab, uint64_t mask, const char *s, size_t n) {
    uint64_t h = fnv1a(s, n, FNV_INIT);
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        int32_t id = tab[i];
        if (id < 0) return -1;
        size_t len = (size_t)(t->off[id + 1] - t->off[id]);
        if (len == n && memcmp(t->blob + t->off[id], s, n) == 0) return id;
    }
}
static void strtab_insert(const Tokenizer *t, int32_t *tab, uint64_t mask, int32_t id) {
    const char *s = t->blob + t->off[id];
    size_t n = (size_t)(t->off[id + 1] - t->off[id]);
    uint64_t h = fnv1a(s, n, FNV_INIT);
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        if (tab[i] < 0) { tab[i] = id; return; }
        int32_t o = tab[i];
        size_t len = (size_t)(t->off[o + 1] - t->off[o]);
        if (len == n && memcmp(t->blob + t->off[o], s, n) == 0) return;  // duplicate: first id wins
    }
}

// pair (a,b) -> (rank, merged id)
static inline uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }
static inline bool pair_find(const Tokenizer *t, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    uint64_t k = pair_key(a, b);
    for (uint64_t i = mix64(k) & t->pair_mask;; i = (i + 1) & t->pair_mask) {
        TokPair *p = &t->pairs[i];
        if (p->rank < 0) return false;
        if (p->key == k) { *rank = p->rank; *merged = p->merged; return true; }
    }
}

static uint64_t pow2_at_least(uint64_t n) {
    uint64_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

static atomic_uint_fast64_t tok_serial_counter = 1;

int tokenizer_build(const TokenizerSpec *sp, Tokenizer **out, DlError *e) {
    bytes_alphabet_init();
    *out = NULL;
    const char *src = sp->source ? sp->source : "tokenizer";
    if (sp->n_tokens <= 0) return dl_fail(e, "%s: empty vocabulary", src);
    if ((int)sp->pre < 0 || sp->pre > TOK_PRE_LLAMA3) return dl_fail(e, "%s: unknown pre-tokenizer %d", src, sp->pre);
    Tokenizer *t = dl_calloc(1, sizeof(Tokenizer));
    t->serial = atomic_fetch_add(&tok_serial_counter, 1);
    t->n = sp->n_tokens;
    t->pre = sp->pre;
    t->ignore_merges = sp->ignore_merges;
    t->bos = sp->bos; t->eos = sp->eos; t->pad = sp->pad;
    if (t->bos >= t->n) t->bos = -1;
    if (t->eos >= t->n) t->eos = -1;
    if (t->pad >= t->n) t->pad = -1;
    t->unk = sp->unk < t->n ? sp->unk : -1;
    t->chat_template = sp->chat_template ? dl_strdup(sp->chat_template) : NULL;
    t->special = dl_calloc((size_t)t->n, 1);
    t->off = dl_malloc(((size_t)t->n + 1) * sizeof(int64_t));

    // token bytes: specials as text, others through the byte alphabet (raw text if outside it)
    size_t total = 0;
    for (int32_t i = 0; i < t->n; i++) total += sp->token_lens ? sp->token_lens[i] : (sp->tokens[i] ? strlen(sp->tokens[i]) : 0);
    t->blob = dl_malloc(total + 1);
    int64_t o = 0;
    uint64_t h = FNV_INIT;
    h = fnv1a(PRE_NAMES[t->pre], strlen(PRE_NAMES[t->pre]), h);
    h = fnv1a(&t->ignore_merges, 1, h);
    for (int32_t i = 0; i < t->n; i++) {
        const char *s = sp->tokens[i] ? sp->tokens[i] : "";
        size_t n = sp->token_lens ? sp->token_lens[i] : strlen(s);
        t->off[i] = o;
        t->special[i] = sp->special ? (sp->special[i] != 0) : 0;
        size_t bn = 0;
        if (t->special[i] || !vocab_to_bytes(s, n, t->blob + o, &bn)) {
            memcpy(t->blob + o, s, n);
            bn = n;
        }
        o += (int64_t)bn;
        if (bn > t->max_token_bytes) t->max_token_bytes = bn;
        h = fnv1a(&n, sizeof(n), h);
        h = fnv1a(s, n, h);
        h = fnv1a(&t->special[i], 1, h);
    }
    t->off[t->n] = o;

    // lookup tables: normal tokens by bytes (BPE), special tokens by text
    t->tok_mask = pow2_at_least((uint64_t)t->n * 2) - 1;
    t->tok_tab = dl_malloc((t->tok_mask + 1) * sizeof(int32_t));
    t->spec_tab = dl_malloc((t->tok_mask + 1) * sizeof(int32_t));
    memset(t->tok_tab, 0xff, (t->tok_mask + 1) * sizeof(int32_t));
    memset(t->spec_tab, 0xff, (t->tok_mask + 1) * sizeof(int32_t));
    for (int32_t i = 0; i < t->n; i++) {
        if (t->off[i + 1] == t->off[i]) continue;  // hole in the id space
        if (t->special[i]) {
            strtab_insert(t, t->spec_tab, t->tok_mask, i);
            t->specials = dl_realloc(t->specials, (size_t)(t->n_specials + 1) * sizeof(int32_t));
            t->specials[t->n_specials++] = i;
            t->special_first[(uint8_t)t->blob[t->off[i]]] = 1;
        } else {
            strtab_insert(t, t->tok_tab, t->tok_mask, i);
        }
    }
    int n_missing = 0;
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        t->byte_id[b] = strtab_find(t, t->tok_tab, t->tok_mask, &c, 1);
        if (t->byte_id[b] < 0) {
            // SmolLM2 lacks a few control bytes and bytes that never occur in UTF-8; HF emits unk_token
            // for them, so do we
            t->byte_id[b] = t->unk;
            n_missing++;
        }
    }
    if (n_missing > 64) {
        DlError tmp;
        dl_fail(&tmp, "%s: vocabulary lacks %d of the 256 single-byte tokens: not a byte-level BPE vocabulary", src, n_missing);
        tokenizer_free(t);
        return dl_fail(e, "%s", tmp.msg);
    }

    // merges: "A B" -> ranks; pairs whose parts or result are not in the vocab are skipped (HF rejects
    // such files; they do not occur in real ones)
    t->pair_mask = pow2_at_least((uint64_t)(sp->n_merges > 0 ? sp->n_merges : 1) * 2) - 1;
    t->pairs = dl_malloc((t->pair_mask + 1) * sizeof(TokPair));
    for (uint64_t i = 0; i <= t->pair_mask; i++) t->pairs[i].rank = -1;
    char *buf = dl_malloc(t->max_token_bytes * 2 + 1024);
    size_t bufcap = t->max_token_bytes * 2 + 1024;
    for (int64_t r = 0; r < sp->n_merges; r++) {
        const char *m = sp->merges[r];
        size_t mn = sp->merge_lens ? sp->merge_lens[r] : strlen(m);
        h = fnv1a(&mn, sizeof(mn), h);
        h = fnv1a(m, mn, h);
        const char *sp1 = memchr(m, ' ', mn);
        if (!sp1 || sp1 == m) {
            DlError tmp;
            dl_fail(&tmp, "%s: merge %lld is not of the form \"A B\": \"%.*s\"", src, (long long)r, (int)DL_MIN(mn, 80), m);
            free(buf);
            tokenizer_free(t);
            return dl_fail(e, "%s", tmp.msg);
        }
        size_t an = (size_t)(sp1 - m), bn2 = mn - an - 1;
        if (an + bn2 + 8 > bufcap) { bufcap = (an + bn2) * 2 + 8; buf = dl_realloc(buf, bufcap); }
        size_t la, lb;
        if (!vocab_to_bytes(m, an, buf, &la) || !vocab_to_bytes(sp1 + 1, bn2, buf + la, &lb)) continue;
        int32_t ia = strtab_find(t, t->tok_tab, t->tok_mask, buf, la);
        int32_t ib = strtab_find(t, t->tok_tab, t->tok_mask, buf + la, lb);
        int32_t im = strtab_find(t, t->tok_tab, t->tok_mask, buf, la + lb);
        if (ia < 0 || ib < 0 || im < 0) continue;
        uint64_t k = pair_key(ia, ib);
        for (uint64_t i = mix64(k) & t->pair_mask;; i = (i + 1) & t->pair_mask) {
            if (t->pairs[i].rank < 0) {
                t->pairs[i] = (TokPair){.key = k, .rank = (int32_t)DL_MIN(r, INT32_MAX), .merged = im};
                break;
            }
            if (t->pairs[i].key == k) break;  // a repeated merge keeps its first (lowest) rank
        }
    }
    free(buf);
    t->hash = h;

    // pre-tokenizer regex
    const char *pat = t->pre == TOK_PRE_LLAMA3 ? PAT_LLAMA3 : PAT_GPT2;
    int err;
    PCRE2_SIZE eoff;
    t->re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &eoff, NULL);
    if (!t->re) {
        tokenizer_free(t);
        return dl_fail(e, "%s: PCRE2 failed to compile the pre-tokenizer pattern (error %d)", src, err);
    }
    t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    *out = t;
    return 0;
}

void tokenizer_free(Tokenizer *t) {
    if (!t) return;
    if (t->re) pcre2_code_free(t->re);
    free(t->blob); free(t->off); free(t->special); free(t->tok_tab); free(t->spec_tab);
    free(t->pairs); free(t->specials); free(t->chat_template);
    free(t);
}

// ---- per-thread encoder state: PCRE2 match data, BPE scratch and a cache of encoded words (like HF's
// BPE cache); keyed by the tokenizer's serial so a new tokenizer never sees another's entries.
#define CACHE_SLOTS (1u << 16)
#define CACHE_MAX_WORD 48
typedef struct {
    uint64_t h;
    uint32_t word_off, ids_off;
    uint16_t word_len, n_ids;
    uint32_t used;
} CacheEnt;
typedef struct {
    uint64_t serial;
    pcre2_match_data *md;
    CacheEnt *ents;
    uint32_t n_used;
    char *words; uint32_t words_len, words_cap;
    int32_t *cids; uint32_t cids_len, cids_cap;
    // BPE scratch
    int32_t *sym, *prev, *next;
    int64_t sym_cap;
    uint64_t *heap;  // (rank << 32 | pos) min-heap
    int64_t heap_cap;
} TokTLS;
static _Thread_local TokTLS tls;

static TokTLS *tls_for(const Tokenizer *t) {
    TokTLS *s = &tls;
    if (!s->md) s->md = pcre2_match_data_create(4, NULL);
    if (!s->ents) {
        s->ents = dl_calloc(CACHE_SLOTS, sizeof(CacheEnt));
        s->words_cap = 1u << 20; s->words = dl_malloc(s->words_cap);
        s->cids_cap = 1u << 18; s->cids = dl_malloc(s->cids_cap * sizeof(int32_t));
    }
    if (s->serial != t->serial) {
        memset(s->ents, 0, CACHE_SLOTS * sizeof(CacheEnt));
        s->n_used = 0; s->words_len = 0; s->cids_len = 0;
        s->serial = t->serial;
    }
    return s;
}

static inline void push_id(int32_t **ids, int64_t *n, int64_t *cap, int32_t id) {
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 256;
        *ids = dl_realloc(*ids, (size_t)*cap * sizeof(int32_t));
    }
    (*ids)[(*n)++] = id;
}

static inline void heap_push(TokTLS *s, int64_t *hn, uint64_t v) {
    if (*hn == s->heap_cap) {
        s->heap_cap = s->heap_cap ? s->heap_cap * 2 : 256;
        s->heap = dl_realloc(s->heap, (size_t)s->heap_cap * sizeof(uint64_t));
    }
    int64_t i = (*hn)++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (s->heap[p] <= v) break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = v;
}
static inline uint64_t heap_pop(TokTLS *s, int64_t *hn) {
    uint64_t top = s->heap[0], v = s->heap[--(*hn)];
    int64_t i = 0, n = *hn;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && s->heap[c + 1] < s->heap[c]) c++;
        if (s->heap[c] >= v) break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n > 0) s->heap[i] = v;
    return top;
}

// BPE-merges one pre-token's bytes w[0..n) and appends the ids.
static void bpe_word(const Tokenizer *t, TokTLS *s, const uint8_t *w, int64_t n, int32_t **ids, int64_t *nid,
                     int64_t *cap) {
    if (n == 1) { push_id(ids, nid, cap, t->byte_id[w[0]]); return; }
    if (t->ignore_merges) {
        int32_t id = strtab_find(t, t->tok_tab, t->tok_mask, (const char *)w, (size_t)n);
        if (id >= 0) { push_id(ids, nid, cap, id); return; }
    }
    if (n > s->sym_cap) {
        s->sym_cap = n * 2;
        s->sym = dl_realloc(s->sym, (size_t)s->sym_cap * sizeof(int32_t));
        s->prev = dl_realloc(s->prev, (size_t)s->sym_cap * sizeof(int32_t));
        s->next = dl_realloc(s->next, (size_t)s->sym_cap * sizeof(int32_t));
    }
    int32_t *sym = s->sym, *prev = s->prev, *next = s->next;
    for (int64_t i = 0; i < n; i++) {
        sym[i] = t->byte_id[w[i]];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    int64_t hn = 0;
    int32_t rank, merged;
    for (int64_t i = 0; i + 1 < n; i++)
        if (pair_find(t, sym[i], sym[i + 1], &rank, &merged)) heap_push(s, &hn, ((uint64_t)rank << 32) | (uint64_t)i);
    while (hn > 0) {
        uint64_t top = heap_pop(s, &hn);
        int32_t r = (int32_t)(top >> 32), pos = (int32_t)(top & 0xffffffffu);
        // stale entry? the symbol may be gone (sym = -1) or changed, or its right neighbour changed
        if (sym[pos] < 0 || next[pos] < 0) continue;
        int32_t nx = next[pos];
        if (!pair_find(t, sym[pos], sym[nx], &rank, &merged) || rank != r) continue;
        sym[pos] = merged;
        sym[nx] = -1;
        next[pos] = next[nx];
        if (next[nx] >= 0) prev[next[nx]] = pos;
        if (prev[pos] >= 0 && pair_find(t, sym[prev[pos]], sym[pos], &rank, &merged))
            heap_push(s, &hn, ((uint64_t)rank << 32) | (uint64_t)prev[pos]);
        if (next[pos] >= 0 && pair_find(t, sym[pos], sym[next[pos]], &rank, &merged))
            heap_push(s, &hn, ((uint64_t)rank << 32) | (uint64_t)pos);
    }
    for (int32_t i = 0; i >= 0; i = next[i]) push_id(ids, nid, cap, sym[i]);
}

// Encodes one pre-token, through the word cache for short words.
static void encode_word(const Tokenizer *t, TokTLS *s, const uint8_t *w, int64_t n, int32_t **ids, int64_t *nid,
                        int64_t *cap) {
    if (n > CACHE_MAX_WORD) { bpe_word(t, s, w, n, ids, nid, cap); return; }
    uint64_t h = fnv1a(w, (size_t)n, FNV_INIT);
    uint32_t i = (uint32_t)(mix64(h) & (CACHE_SLOTS - 1));
    for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
        CacheEnt *c = &s->ents[i];
        if (!c->used) break;
        if (c->h == h && c->word_len == n && memcmp(s->words + c->word_off, w, (size_t)n) == 0) {
            for (uint32_t k = 0; k < c->n_ids; k++) push_id(ids, nid, cap, s->cids[c->ids_off + k]);
            return;
        }
    }
    int64_t start = *nid;
    bpe_word(t, s, w, n, ids, nid, cap);
    int64_t cnt = *nid - start;
    if (s->n_used >= CACHE_SLOTS / 2 || s->words_len + n > s->words_cap || s->cids_len + cnt > s->cids_cap) {
        memset(s->ents, 0, CACHE_SLOTS * sizeof(CacheEnt));  // full: start over (cheap, rare)
        s->n_used = 0; s->words_len = 0; s->cids_len = 0;
        i = (uint32_t)(mix64(h) & (CACHE_SLOTS - 1));
    }
    CacheEnt *c = &s->ents[i];
    *c = (CacheEnt){.h = h, .word_off = s->words_len, .ids_off = s->cids_len, .word_len = (uint16_t)n,
                    .n_ids = (uint16_t)cnt, .used = 1};
    memcpy(s->words + s->words_len, w, (size_t)n);
    memcpy(s->cids + s->cids_len, *ids + start, (size_t)cnt * sizeof(int32_t));
    s->words_len += (uint32_t)n;
    s->cids_len += (uint32_t)cnt;
    s->n_used++;
}

// Splits seg with the compiled pattern (every match is a pre-token; unmatched gaps too, as HF's Isolated
// split keeps them) and encodes the pieces.
static int regex_segment(const Tokenizer *t, TokTLS *s, const uint8_t *seg, size_t n, int32_t **ids, int64_t *nid,
                         int64_t *cap, DlError *e) {
    size_t pos = 0;
    while (pos < n) {
        int rc = t->jit ? pcre2_jit_match(t->re, seg, n, pos, 0, s->md, NULL)
                        : pcre2_match(t->re, seg, n, pos, PCRE2_NO_UTF_CHECK, s->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) {
            encode_word(t, s, seg + pos, (int64_t)(n - pos), ids, nid, cap);
            return 0;
        }
        if (rc < 0) return dl_fail(e, "pre-tokenizer regex failed (PCRE2 error %d)", rc);
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(s->md);
        size_t a = ov[0], b = ov[1];
        if (a > pos) encode_word(t, s, seg + pos, (int64_t)(a - pos), ids, nid, cap);
        if (b == a) {  // cannot happen with these patterns; guard against an endless loop anyway
            b = a + 1;
            while (b < n && (seg[b] & 0xC0) == 0x80) b++;
        }
        encode_word(t, s, seg + a, (int64_t)(b - a), ids, nid, cap);
        pos = b;
    }
    return 0;
}

static inline bool is_number_cp(int32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    utf8proc_category_t c = utf8proc_category(cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

// Pre-tokenizes and encodes a segment free of special tokens.
static int encode_segment(const Tokenizer *t, TokTLS *s, const uint8_t *seg, size_t n, int32_t **ids, int64_t *nid,
                          int64_t *cap, DlError *e) {
    if (t->pre != TOK_PRE_SMOLLM) return regex_segment(t, s, seg, n, ids, nid, cap, e);
    // SmolLM/StarCoder: HF Digits(individual_digits) isolates each numeric char before the GPT-2 split
    size_t start = 0, i = 0;
    while (i < n) {
        int32_t cp;
        int k = utf8_decode(seg + i, n - i, &cp);
        if (is_number_cp(cp)) {
            if (i > start && regex_segment(t, s, seg + start, i - start, ids, nid, cap, e)) return -1;
            encode_word(t, s, seg + i, k, ids, nid, cap);
            start = i + k;
        }
        i += k;
    }
    if (n > start) return regex_segment(t, s, seg + start, n - start, ids, nid, cap, e);
    return 0;
}

// Leftmost-longest special token starting at p, or -1.
static int32_t special_at(const Tokenizer *t, const char *p, size_t left) {
    int32_t best = -1;
    size_t best_len = 0;
    for (int32_t k = 0; k < t->n_specials; k++) {
        int32_t id = t->specials[k];
        size_t len = (size_t)(t->off[id + 1] - t->off[id]);
        if (len > best_len && len <= left && memcmp(p, t->blob + t->off[id], len) == 0) {
            best = id;
            best_len = len;
        }
    }
    return best;
}

int tokenizer_encode_append(const Tokenizer *t, const char *text, size_t len, unsigned flags, int32_t **ids,
                            int64_t *n, int64_t *cap, DlError *e) {
    int64_t bad = tok_utf8_invalid_at(text, len);
    if (bad >= 0) return dl_fail(e, "invalid UTF-8 at byte offset %lld", (long long)bad);
    if (t->unk < 0) {  // a byte without a token and no unk token: refuse rather than drop text
        for (size_t i = 0; i < len; i++)
            if (t->byte_id[(uint8_t)text[i]] < 0)
                return dl_fail(e, "byte 0x%02x at offset %zu has no token in this vocabulary (and no unk token)",
                               (uint8_t)text[i], i);
    }
    TokTLS *s = tls_for(t);
    const uint8_t *u = (const uint8_t *)text;
    size_t start = 0;
    if ((flags & TOK_ENCODE_SPECIAL) && t->n_specials > 0) {
        for (size_t i = 0; i < len; i++) {
            if (!t->special_first[u[i]]) continue;
            int32_t id = special_at(t, text + i, len - i);
            if (id < 0) continue;
            if (i > start && encode_segment(t, s, u + start, i - start, ids, n, cap, e)) return -1;
            push_id(ids, n, cap, id);
            i += (size_t)(t->off[id + 1] - t->off[id]) - 1;
            start = i + 1;
        }
    }
    if (len > start) return encode_segment(t, s, u + start, len - start, ids, n, cap, e);
    return 0;
}

int tokenizer_encode_ex(const Tokenizer *t, const char *text, size_t len, unsigned flags, int32_t **ids,
                        int64_t *n, DlError *e) {
    int64_t cap = (int64_t)(len / 3) + 16;
    *ids = dl_malloc((size_t)cap * sizeof(int32_t));
    *n = 0;
    if (tokenizer_encode_append(t, text, len, flags, ids, n, &cap, e)) {
        free(*ids);
        *ids = NULL;
        *n = 0;
        return -1;
    }
    return 0;
}

int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int32_t **ids, int64_t *n, DlError *e) {
    return tokenizer_encode_ex(t, text, len, 0, ids, n, e);
}

int tokenizer_decode(const Tokenizer *t, const int32_t *ids, int64_t n, char **text, size_t *len) {
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n) { *text = NULL; *len = 0; return -1; }
        total += (size_t)(t->off[ids[i] + 1] - t->off[ids[i]]);
    }
    char *out = dl_malloc(total + 1);
    size_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        size_t k = (size_t)(t->off[ids[i] + 1] - t->off[ids[i]]);
        memcpy(out + o, t->blob + t->off[ids[i]], k);
        o += k;
    }
    out[o] = 0;
    *text = out;
    *len = o;
    return 0;
}

// ---- streaming decode
void tok_stream_init(TokStream *s, const Tokenizer *t) {
    memset(s, 0, sizeof(*s));
    s->t = t;
}

// Expected length of a UTF-8 sequence from its lead byte; 0 for a byte that cannot start one.
static inline int utf8_seq_len(uint8_t c) {
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return 2;
    if (c >= 0xE0 && c <= 0xEF) return 3;
    if (c >= 0xF0 && c <= 0xF4) return 4;
    return 0;
}

size_t tok_stream_push(TokStream *s, int32_t id, char *out, size_t cap) {
    const Tokenizer *t = s->t;
    if (id < 0 || id >= t->n) return SIZE_MAX;
    const uint8_t *b = (const uint8_t *)t->blob + t->off[id];
    size_t k = (size_t)(t->off[id + 1] - t->off[id]);
    if (cap < k + 4) return SIZE_MAX;
    // join held bytes and the token's bytes, emit everything up to the last incomplete character
    uint8_t tmp[8];
    size_t o = 0, i = 0;
    int np = s->npend;
    memcpy(tmp, s->pend, (size_t)np);
    // walk the concatenation pend ++ b
    size_t total = (size_t)np + k;
#define AT(j) ((j) < (size_t)np ? tmp[(j)] : b[(j) - (size_t)np])
    while (i < total) {
        uint8_t c = AT(i);
        int L = utf8_seq_len(c);
        if (L <= 1) { out[o++] = (char)c; i++; continue; }  // ASCII, or a stray byte passed through
        size_t j = 1;
        while (j < (size_t)L && i + j < total && (AT(i + j) & 0xC0) == 0x80) j++;
        if (j == (size_t)L) {
            for (size_t q = 0; q < j; q++) out[o++] = (char)AT(i + q);
            i += j;
        } else if (i + j == total) {
            break;  // incomplete at the end: hold it
        } else {
            for (size_t q = 0; q < j; q++) out[o++] = (char)AT(i + q);  // broken sequence: pass through
            i += j;
        }
    }
    uint8_t keep[4];
    int nk = 0;
    while (i < total) keep[nk++] = AT(i), i++;
#undef AT
    memcpy(s->pend, keep, (size_t)nk);
    s->npend = nk;
    return o;
}

size_t tok_stream_flush(TokStream *s, char *out, size_t cap) {
    size_t n = (size_t)s->npend;
    if (cap < n) return SIZE_MAX;
    memcpy(out, s->pend, n);
    s->npend = 0;
    return n;
}

// ---- accessors
int32_t tokenizer_vocab_size(const Tokenizer *t) { return t->n; }
int32_t tokenizer_bos(const Tokenizer *t) { return t->bos; }
int32_t tokenizer_eos(const Tokenizer *t) { return t->eos; }
int32_t tokenizer_pad(const Tokenizer *t) { return t->pad; }
size_t tokenizer_max_token_bytes(const Tokenizer *t) { return t->max_token_bytes; }
TokPreType tokenizer_pre_type(const Tokenizer *t) { return t->pre; }
const char *tokenizer_pre_name(const Tokenizer *t) { return PRE_NAMES[t->pre]; }
const char *tokenizer_chat_template(const Tokenizer *t) { return t->chat_template; }
uint64_t tokenizer_hash(const Tokenizer *t) { return t->hash; }
bool tokenizer_is_special(const Tokenizer *t, int32_t id) { return id >= 0 && id < t->n && t->special[id]; }

const char *tokenizer_token_bytes(const Tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n) return NULL;
    *len = (size_t)(t->off[id + 1] - t->off[id]);
    return t->blob + t->off[id];
}

int32_t tokenizer_token_id(const Tokenizer *t, const char *token) {
    size_t n = strlen(token);
    if (n == 0) return -1;
    int32_t id = strtab_find(t, t->spec_tab, t->tok_mask, token, n);
    if (id >= 0) return id;
    char *buf = dl_malloc(n + 1);
    size_t bn;
    if (vocab_to_bytes(token, n, buf, &bn)) id = strtab_find(t, t->tok_tab, t->tok_mask, buf, bn);
    free(buf);
    return id;
}
