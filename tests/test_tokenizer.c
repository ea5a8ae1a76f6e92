// test_tokenizer.c: the BPE tokenizer and chat templates on the real SmolLM2 teacher vocabulary (GGUF) and on
// small hand-built tokenizer.json files: known ids (from HF tokenizers), round trips over the multilingual
// corpus, streaming decode, special tokens, invalid UTF-8, merge order, bad files, thread safety.
// The exact-parity sweep against HF tokenizers is tests/py/test_tokenizer_parity.py.
#include <dirent.h>
#include <string.h>
#include <unistd.h>

#include "distill/chat.h"
#include "distill/tokenizer.h"
#include "distill/tokenizer_internal.h"
#include "tests/check.h"

static const char *TEACHER = "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf";

static bool ids_eq(const int32_t *a, int64_t na, const int32_t *b, int64_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, (size_t)na * sizeof(int32_t)) == 0);
}

static void check_ids(const Tokenizer *t, const char *text, const int32_t *want, int64_t nwant) {
    int32_t *ids;
    int64_t n;
    DlError e;
    CHECK(tokenizer_encode(t, text, strlen(text), &ids, &n, &e) == 0);
    CHECK(ids_eq(ids, n, want, nwant));
    if (!ids_eq(ids, n, want, nwant)) {
        fprintf(stderr, "  text %s\n  got ", text);
        for (int64_t i = 0; i < n; i++) fprintf(stderr, "%d ", ids[i]);
        fprintf(stderr, "\n");
    }
    free(ids);
}

// encode -> decode round trip and streaming decode of one text
static void roundtrip(const Tokenizer *t, const char *name, const char *text, size_t len) {
    int32_t *ids;
    int64_t n;
    DlError e;
    int rc = tokenizer_encode(t, text, len, &ids, &n, &e);
    CHECK(rc == 0);
    if (rc) { fprintf(stderr, "  %s: %s\n", name, e.msg); return; }
    char *back;
    size_t blen;
    CHECK(tokenizer_decode(t, ids, n, &back, &blen) == 0);
    CHECK(blen == len && memcmp(back, text, len) == 0);
    // streaming: every chunk is valid UTF-8 (the corpus is), the concatenation is the text
    TokStream s;
    tok_stream_init(&s, t);
    size_t cap = tokenizer_max_token_bytes(t) + 4;
    char *chunk = malloc(cap), *cat = malloc(len + 8);
    size_t o = 0;
    bool chunks_ok = true;
    for (int64_t i = 0; i < n; i++) {
        size_t k = tok_stream_push(&s, ids[i], chunk, cap);
        if (k == SIZE_MAX || o + k > len) { chunks_ok = false; break; }
        if (tok_utf8_invalid_at(chunk, k) >= 0) chunks_ok = false;
        memcpy(cat + o, chunk, k);
        o += k;
    }
    size_t k = tok_stream_flush(&s, chunk, cap);
    CHECK(k == 0);
    CHECK(chunks_ok);
    CHECK(o == len && memcmp(cat, text, len) == 0);
    if (o != len || memcmp(cat, text, len)) fprintf(stderr, "  stream mismatch in %s\n", name);
    free(chunk); free(cat); free(back); free(ids);
}

static void test_teacher(void) {
    DlError e;
    Tokenizer *t;
    if (tokenizer_load(TEACHER, &t, &e)) {
        fprintf(stderr, "%s\n(run scripts/fetch-teacher)\n", e.msg);
        CHECK(0);
        return;
    }
    CHECK_EQ_I64(tokenizer_vocab_size(t), 49152);
    CHECK_EQ_I64(tokenizer_bos(t), 1);
    CHECK_EQ_I64(tokenizer_eos(t), 2);
    CHECK(tokenizer_pre_type(t) == TOK_PRE_SMOLLM);
    CHECK_EQ_I64(tokenizer_token_id(t, "<|im_end|>"), 2);
    CHECK_EQ_I64(tokenizer_token_id(t, "Hello"), 19556);
    CHECK_EQ_I64(tokenizer_token_id(t, "Ġworld"), 905);
    CHECK_EQ_I64(tokenizer_token_id(t, "no-such-token-xyz"), -1);
    CHECK(tokenizer_is_special(t, 0) && !tokenizer_is_special(t, 905));

    // ids from HF tokenizers (tests/py builds the oracle): digits one by one, space before digits alone
    int32_t w1[] = {19556, 905, 28, 216, 33, 34, 35, 36, 37, 37366, 32057, 197, 104};
    check_ids(t, "Hello world, 12345 café  \n\tx", w1, DL_ARRAY_LEN(w1));
    int32_t w2[] = {216, 34, 32, 34, 38, 29, 33, 33, 29, 34, 35, 42, 5549, 137, 94, 25972, 83, 7466, 84, 2756, 4636, 246, 237, 15107, 116, 243, 2738};
    check_ids(t, " 2026-11-23: ünïcödé ✓ 🦙\r\n", w2, DL_ARRAY_LEN(w2));
    // bytes without a token (0x04, 0x06 are not in SmolLM2's vocab) become unk (id 0), as in HF
    int32_t w3[] = {81, 0, 82, 0};
    check_ids(t, "a\x04" "b\x06", w3, DL_ARRAY_LEN(w3));
    check_ids(t, "", NULL, 0);

    // special tokens: plain text by default, single ids when asked
    const char *sp = "<|im_start|>user\nHi<|im_end|>";
    int32_t *ids;
    int64_t n;
    CHECK(tokenizer_encode_ex(t, sp, strlen(sp), TOK_ENCODE_SPECIAL, &ids, &n, &e) == 0);
    int32_t wsp[] = {1, 4093, 198, 26843, 2};
    CHECK(ids_eq(ids, n, wsp, 5));
    free(ids);
    CHECK(tokenizer_encode(t, sp, strlen(sp), &ids, &n, &e) == 0);
    bool any_special = false;
    for (int64_t i = 0; i < n; i++) any_special |= tokenizer_is_special(t, ids[i]);
    CHECK(!any_special && n > 5);
    free(ids);

    // invalid UTF-8: error with the byte offset, never a crash
    const char *bad[] = {"ab\xff", "x\xc3", "\xc0\xaf", "\xed\xa0\x80", "ok \xf4\x90\x80\x80", "\xe2\x82"};
    for (size_t i = 0; i < DL_ARRAY_LEN(bad); i++) {
        ids = NULL;
        CHECK(tokenizer_encode(t, bad[i], strlen(bad[i]), &ids, &n, &e) == -1);
        CHECK(strstr(e.msg, "invalid UTF-8") != NULL);
        CHECK(ids == NULL);
    }
    CHECK(tok_utf8_invalid_at("ok \xf4\x90\x80\x80", 7) == 3);
    CHECK(tok_utf8_invalid_at("\xf0\x9f\xa6\x99", 4) == -1);

    // decode: out-of-range id is an error
    char *txt;
    size_t tl;
    int32_t badid[] = {5, 49152};
    CHECK(tokenizer_decode(t, badid, 2, &txt, &tl) == -1);

    // streaming decode holds a split character: 🦙 is 4 bytes over two byte-level tokens
    TokStream s;
    tok_stream_init(&s, t);
    char out[256];
    CHECK(tok_stream_push(&s, 15107, out, sizeof out) == 1 && out[0] == ' ');  // " " + 2 bytes of 🦙: held
    size_t k = tok_stream_push(&s, 116, out, sizeof out);
    CHECK(k == 0);
    k += tok_stream_push(&s, 243, out + k, sizeof out - k);
    CHECK(k == 4 && memcmp(out, "\xf0\x9f\xa6\x99", 4) == 0);
    CHECK(tok_stream_push(&s, 15107, out, sizeof out) == 1);
    CHECK(tok_stream_flush(&s, out, sizeof out) == 2);  // an unfinished character comes out at the end
    CHECK(tok_stream_push(&s, -1, out, sizeof out) == SIZE_MAX);
    CHECK(tok_stream_push(&s, 905, out, 2) == SIZE_MAX);

    // round trips over the corpus files
    DIR *d = opendir("tests/data/corpus");
    CHECK(d != NULL);
    int nfiles = 0;
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char path[512];
        snprintf(path, sizeof path, "tests/data/corpus/%s", de->d_name);
        size_t len;
        char *text = dl_read_file(path, &len, &e);
        CHECK(text != NULL);
        if (text) roundtrip(t, de->d_name, text, len);
        free(text);
        nfiles++;
    }
    if (d) closedir(d);
    CHECK(nfiles >= 10);

    // a long whitespace run and a long single-class run (heap merging, no quadratic blowup)
    size_t L = 200000;
    char *big = malloc(L + 1);
    memset(big, ' ', L);
    big[L] = 0;
    double t0 = dl_now();
    roundtrip(t, "spaces", big, L);
    memset(big, 'a', L);
    roundtrip(t, "aaaa", big, L);
    CHECK(dl_now() - t0 < 20.0);
    free(big);

    // same results from several threads at once (per-thread caches)
    const char *para = "Threads share the tokenizer; each keeps its own cache. Numbers 31415 and naïve words.";
    int32_t *ref;
    int64_t nref;
    CHECK(tokenizer_encode(t, para, strlen(para), &ref, &nref, &e) == 0);
    int mismatches = 0;
#pragma omp parallel for num_threads(2) reduction(+ : mismatches)
    for (int i = 0; i < 200; i++) {
        int32_t *x;
        int64_t nx;
        DlError ee;
        if (tokenizer_encode(t, para, strlen(para) - (size_t)(i % 7), &x, &nx, &ee)) { mismatches++; continue; }
        if (i % 7 == 0 && !ids_eq(x, nx, ref, nref)) mismatches++;
        free(x);
    }
    CHECK(mismatches == 0);
    free(ref);

    // chat: ChatML with SmolLM2's default system prompt equals encoding the rendered string with specials
    ChatMessage msgs[] = {{"user", "What is 2+2?"}, {"assistant", "2+2 = 4."}, {"user", " thanks"}, {"assistant", "\nYou're welcome!"}};
    ChatFamily fam;
    CHECK(chat_family_for(t, &fam, &e) == 0 && fam == CHAT_CHATML);
    uint8_t *mask;
    CHECK(chat_render(t, CHAT_CHATML, msgs, 4, false, &ids, &mask, &n, &e) == 0);
    const char *rendered =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n2+2 = 4.<|im_end|>\n"
        "<|im_start|>user\n thanks<|im_end|>\n<|im_start|>assistant\n\nYou're welcome!<|im_end|>\n";
    int32_t *want;
    int64_t nwant;
    CHECK(tokenizer_encode_ex(t, rendered, strlen(rendered), TOK_ENCODE_SPECIAL, &want, &nwant, &e) == 0);
    CHECK(ids_eq(ids, n, want, nwant));
    // the masked tokens decode to exactly the assistant contents and their <|im_end|>
    int32_t *sel = malloc((size_t)n * 4);
    int64_t ns = 0;
    for (int64_t i = 0; i < n; i++)
        if (mask[i]) sel[ns++] = ids[i];
    CHECK(tokenizer_decode(t, sel, ns, &txt, &tl) == 0);
    CHECK(strcmp(txt, "2+2 = 4.<|im_end|>\nYou're welcome!<|im_end|>") == 0);
    if (strcmp(txt, "2+2 = 4.<|im_end|>\nYou're welcome!<|im_end|>")) fprintf(stderr, "  mask text: [%s]\n", txt);
    free(txt); free(sel); free(ids); free(mask); free(want);
    // generation prompt; an explicit system message replaces the default one
    ChatMessage m2[] = {{"system", "Be brief."}, {"user", "Hi"}};
    CHECK(chat_render(t, CHAT_CHATML, m2, 2, true, &ids, &mask, &n, &e) == 0);
    CHECK(tokenizer_decode(t, ids, n, &txt, &tl) == 0);
    CHECK(strcmp(txt, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") == 0);
    int msum = 0;
    for (int64_t i = 0; i < n; i++) msum += mask[i];
    CHECK(msum == 0);
    free(txt); free(ids); free(mask);
    // user text cannot inject special tokens
    ChatMessage m3[] = {{"user", "<|im_end|>"}, {"assistant", "ok"}};
    CHECK(chat_render(t, CHAT_CHATML, m3, 2, false, &ids, &mask, &n, &e) == 0);
    int n_end = 0;
    for (int64_t i = 0; i < n; i++) n_end += ids[i] == 2;
    CHECK(n_end == 3);  // system, user, assistant turn ends only
    free(ids); free(mask);
    // Llama-3 template needs tokens SmolLM2 lacks: a clear error
    CHECK(chat_render(t, CHAT_LLAMA3, m2, 2, true, &ids, &mask, &n, &e) == -1);
    CHECK(strstr(e.msg, "<|begin_of_text|>") != NULL);
    // invalid UTF-8 in content
    ChatMessage m4[] = {{"user", "bad \xff"}};
    CHECK(chat_render(t, CHAT_CHATML, m4, 1, true, &ids, &mask, &n, &e) == -1);
    tokenizer_free(t);
}

// ---- small hand-made tokenizer.json files
static const char *TMPDIR_ = "/tmp";

static char *write_tmp(const char *name, const char *content) {
    char *p = malloc(512);
    snprintf(p, 512, "%s/distill_test_tok_%d_%s", TMPDIR_, (int)getpid(), name);
    FILE *f = fopen(p, "wb");
    fputs(content, f);
    fclose(f);
    return p;
}

// A byte-level vocabulary: all 256 bytes plus the merges given. GPT-2 alphabet for printable ASCII is the
// character itself; space is "Ġ".
static char *tiny_json(const char *extra_vocab, const char *merges, const char *pretok, bool ignore_merges) {
    // 256 byte tokens in the GPT-2 alphabet
    static char buf[1 << 16];
    size_t o = 0;
    o += (size_t)sprintf(buf + o, "{\"model\": {\"type\": \"BPE\", \"ignore_merges\": %s, \"vocab\": {", ignore_merges ? "true" : "false");
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        int cp = printable ? b : 256 + extra++;
        char u[8];
        int k = 0;
        if (cp < 0x80) u[k++] = (char)cp;
        else { u[k++] = (char)(0xC0 | (cp >> 6)); u[k++] = (char)(0x80 | (cp & 0x3F)); }
        u[k] = 0;
        if (cp == '"' || cp == '\\') o += (size_t)sprintf(buf + o, "\"\\%s\": %d, ", u, b);
        else o += (size_t)sprintf(buf + o, "\"%s\": %d, ", u, b);
    }
    o += (size_t)sprintf(buf + o, "%s}, \"merges\": [%s]}, \"pre_tokenizer\": %s, \"added_tokens\": "
                                  "[{\"id\": 300, \"content\": \"<|x|>\", \"special\": true}]}", extra_vocab, merges, pretok);
    return buf;
}

static const char *PRE_GPT2 = "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true}";

static void test_tiny(void) {
    DlError e;
    Tokenizer *t;
    int32_t *ids;
    int64_t n;
    // merge priority: "a a" (rank 0) before "b c"; ties go to the leftmost pair: "aaa" -> "aa" "a"
    char *p = write_tmp("tiny.json", tiny_json("\"aa\": 256, \"bc\": 257, \"aab\": 258, \"aaaa\": 259, \"<|x|>\": 300",
                                               "\"a a\", \"b c\", \"aa b\", \"aa aa\"", PRE_GPT2, false));
    CHECK(tokenizer_load(p, &t, &e) == 0);
    if (!t) { fprintf(stderr, "%s\n", e.msg); return; }
    CHECK_EQ_I64(tokenizer_vocab_size(t), 301);
    int32_t w1[] = {256, 'a'};  // "aaa": leftmost "a a" first
    check_ids(t, "aaa", w1, 2);
    int32_t w2[] = {256, 257};  // "aabc": "a a" (rank 0) -> aa b c, then "b c" (1) before "aa b" (2) -> aa bc
    check_ids(t, "aabc", w2, 2);
    int32_t w3[] = {259};
    check_ids(t, "aaaa", w3, 1);
    int32_t w4[] = {258, 'x'};
    check_ids(t, "aabx", w4, 2);
    // special token only with the flag
    CHECK(tokenizer_encode_ex(t, "a<|x|>a", 7, TOK_ENCODE_SPECIAL, &ids, &n, &e) == 0);
    int32_t w5[] = {'a', 300, 'a'};
    CHECK(ids_eq(ids, n, w5, 3));
    free(ids);
    uint64_t h1 = tokenizer_hash(t);
    tokenizer_free(t);
    // the same vocab with another merge order hashes differently; the same file hashes the same
    CHECK(tokenizer_load(p, &t, &e) == 0);
    CHECK(tokenizer_hash(t) == h1);
    tokenizer_free(t);
    unlink(p);
    free(p);
    p = write_tmp("tiny2.json", tiny_json("\"aa\": 256, \"bc\": 257, \"aab\": 258, \"aaaa\": 259, \"<|x|>\": 300",
                                          "\"b c\", \"a a\", \"aa b\", \"aa aa\"", PRE_GPT2, false));
    CHECK(tokenizer_load(p, &t, &e) == 0);
    CHECK(tokenizer_hash(t) != h1);
    tokenizer_free(t);
    unlink(p);
    free(p);
    // ignore_merges: a pre-token that is a vocab entry is taken whole even if merges cannot build it
    p = write_tmp("tiny3.json", tiny_json("\"xyz\": 256", "", PRE_GPT2, true));
    CHECK(tokenizer_load(p, &t, &e) == 0);
    int32_t w6[] = {256};
    check_ids(t, "xyz", w6, 1);
    tokenizer_free(t);
    unlink(p);
    free(p);
    p = write_tmp("tiny4.json", tiny_json("\"xyz\": 256", "", PRE_GPT2, false));
    CHECK(tokenizer_load(p, &t, &e) == 0);
    int32_t w7[] = {'x', 'y', 'z'};
    check_ids(t, "xyz", w7, 3);
    tokenizer_free(t);
    unlink(p);
    free(p);

    // bad files: clear errors, no crash
    struct { const char *name, *content, *expect; } bad[] = {
        {"b1.json", "{not json", "not valid JSON"},
        {"b2.json", "{\"model\": {\"type\": \"WordPiece\"}}", "BPE"},
        {"b3.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {}}, \"pre_tokenizer\": {\"type\": \"Whitespace\"}}", "pre_tokenizer"},
        {"b4.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": [1]}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", "vocab"},
        {"b5.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", "byte"},
        {"b6.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -3}}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", "id"},
        {"b7.json", "", "JSON"},
    };
    for (size_t i = 0; i < DL_ARRAY_LEN(bad); i++) {
        p = write_tmp(bad[i].name, bad[i].content);
        t = NULL;
        CHECK(tokenizer_load(p, &t, &e) == -1);
        CHECK(t == NULL);
        CHECK(strstr(e.msg, bad[i].expect) != NULL);
        if (!strstr(e.msg, bad[i].expect)) fprintf(stderr, "  %s: %s\n", bad[i].name, e.msg);
        unlink(p);
        free(p);
    }
    // merges that are not "A B"
    p = write_tmp("b8.json", tiny_json("\"ab\": 256", "\"ab\"", PRE_GPT2, false));
    CHECK(tokenizer_load(p, &t, &e) == -1 && strstr(e.msg, "merge") != NULL);
    if (!strstr(e.msg, "merge")) fprintf(stderr, "  b8: %s\n", e.msg);
    unlink(p);
    free(p);
    CHECK(tokenizer_load("/nonexistent/tok.gguf", &t, &e) == -1 && strstr(e.msg, "/nonexistent/tok.gguf") != NULL);
    CHECK(tokenizer_load("/tmp", &t, &e) == -1 && strstr(e.msg, "tokenizer.json") != NULL);
}

// Random byte strings (ASCII, UTF-8 pieces, stray and invalid bytes): encode either fails with an invalid
// UTF-8 message or round-trips exactly (bytes SmolLM2 has no token for become unk and are skipped here).
static void test_random_bytes(void) {
    DlError e;
    Tokenizer *t;
    if (tokenizer_load(TEACHER, &t, &e)) { CHECK(0); return; }
    static const char *pieces[] = {"a", "Z", " ", "  ", "\t", "\n", "\r\n", "7", "42", "'s", "'LL", ".", "<|im_end|>",
                                   "\xc3\xa9", "\xe4\xb8\xad", "\xf0\x9f\xa6\x99", "\xe2\x80\x8d", "\xcc\x81",
                                   "\xd9\xa3", "\xff", "\x80", "\xc3", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xc0\xaf",
                                   "\x01", "\x7f", "\xe3\x80\x80", "\xc2\xa0"};
    uint64_t st = 0x9e3779b97f4a7c15ull;
    int n_ok = 0, n_err = 0, bad = 0;
    char buf[512];
    for (int it = 0; it < 3000; it++) {
        size_t len = 0;
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        int k = (int)((st >> 33) % 24) + 1;
        for (int j = 0; j < k; j++) {
            st = st * 6364136223846793005ull + 1442695040888963407ull;
            const char *p = pieces[(st >> 33) % DL_ARRAY_LEN(pieces)];
            size_t pl = strlen(p);
            if (len + pl >= sizeof buf) break;
            memcpy(buf + len, p, pl);
            len += pl;
        }
        int32_t *ids;
        int64_t n;
        int rc = tokenizer_encode(t, buf, len, &ids, &n, &e);
        bool valid = tok_utf8_invalid_at(buf, len) < 0;
        if (rc) {
            n_err++;
            bad += valid || strstr(e.msg, "invalid UTF-8") == NULL;
            continue;
        }
        n_ok++;
        char *back;
        size_t bl;
        bad += !valid || tokenizer_decode(t, ids, n, &back, &bl) != 0 || bl != len || memcmp(back, buf, len) != 0;
        free(back);
        free(ids);
    }
    CHECK(bad == 0);
    CHECK(n_ok > 300 && n_err > 300);
    tokenizer_free(t);
}

int main(void) {
    test_teacher();
    test_random_bytes();
    test_tiny();
    return check_report("test_tokenizer");
}
