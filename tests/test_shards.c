// test_shards.c: HDF5 shard writer/reader round trips (docs, masks, packed rows with resets, preference
// pairs), validation of bad shard files, and the ingest stage on real JSONL/text inputs with every kind of
// bad record (counted, reported with file:line, skip vs fail, no output left on failure).
#include <string.h>
#include <unistd.h>

#include "distill/chat.h"
#include "distill/ingest.h"
#include "distill/shards.h"
#include "distill/tokenizer.h"
#include "tests/check.h"

static const char *TEACHER = "checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf";
static char tmpdir[256];

static char *tmp_path(const char *name) {
    char *p = malloc(512);
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}
static char *write_file(const char *name, const char *content, size_t len) {
    char *p = tmp_path(name);
    FILE *f = fopen(p, "wb");
    fwrite(content, 1, len, f);
    fclose(f);
    return p;
}

// Documents of lengths 1..n_docs with ids = (doc*100 + i) % vocab; masks alternate.
static void test_writer_reader(void) {
    DlError e;
    char *path = tmp_path("lm.h5");
    const int64_t T = 7;
    ShardWriterOpts o = {.kind = SHARD_LM, .tokenizer_hash = 0x1234abcdull, .tokenizer_pre = "smollm",
                         .vocab_size = 1000, .seq_len = T, .pad_id = 999, .deflate = 4, .chunk = 16};
    ShardWriter *w;
    CHECK(shard_writer_open(&w, path, &o, &e) == 0);
    const int n_docs = 9;
    int64_t total = 0;
    int32_t stream[256];
    uint8_t smask[256], sreset[256];
    for (int d = 0; d < n_docs; d++) {
        int64_t n = d + 1;
        int32_t ids[16];
        uint8_t m[16];
        for (int64_t i = 0; i < n; i++) {
            ids[i] = (int32_t)((d * 100 + i) % 1000);
            m[i] = (uint8_t)((d + i) % 2);
            stream[total + i] = ids[i];
            smask[total + i] = m[i];
            sreset[total + i] = i == 0;
        }
        CHECK(shard_add_doc(w, ids, m, n, &e) == 0);
        total += n;
    }
    // invalid input is refused without breaking the shard
    int32_t badid[] = {5, 1000};
    CHECK(shard_add_doc(w, badid, NULL, 2, &e) == -1 && strstr(e.msg, "out of range"));
    CHECK(shard_add_doc(w, badid, NULL, 0, &e) == -1);
    CHECK(shard_writer_attr_str(w, "sources", "a.txt\nb.txt", &e) == 0);
    CHECK(access(path, F_OK) != 0);  // nothing at the final path until close
    // (ids are checked before anything is written, so the refused documents left the shard intact)
    CHECK(shard_writer_close(w, &e) == 0);
    CHECK(access(path, F_OK) == 0);

    ShardReader *r;
    CHECK(shard_open(&r, path, &e) == 0);
    if (!r) { fprintf(stderr, "%s\n", e.msg); return; }
    const ShardInfo *in = shard_info(r);
    CHECK_EQ_I64(in->n_docs, n_docs);
    CHECK_EQ_I64(in->n_tokens, total);
    CHECK_EQ_I64(in->seq_len, T);
    CHECK_EQ_I64(in->n_seqs, (total - 1 + T - 1) / T);  // rows of T+1 overlapping by one
    CHECK(in->tokenizer_hash == 0x1234abcdull);
    char *src = shard_attr_str(r, "sources");
    CHECK(src && !strcmp(src, "a.txt\nb.txt"));
    free(src);
    for (int d = 0; d < n_docs; d++) {
        int32_t *ids;
        uint8_t *m;
        int64_t n;
        CHECK(shard_read_doc(r, d, &ids, &m, &n, &e) == 0);
        CHECK_EQ_I64(n, d + 1);
        bool ok = true;
        for (int64_t i = 0; i < n; i++) ok &= ids[i] == (d * 100 + i) % 1000 && m[i] == (d + i) % 2;
        CHECK(ok);
        free(ids);
        free(m);
    }
    int32_t *ids;
    int64_t n;
    CHECK(shard_read_doc(r, n_docs, &ids, NULL, &n, &e) == -1);
    // packed rows: row k = stream[k*T .. k*T+T], padded at the end; resets at document starts
    int64_t S = in->n_seqs, W = T + 1;
    int32_t *pt = malloc((size_t)(S * W) * 4);
    uint8_t *pm = malloc((size_t)(S * W)), *pr = malloc((size_t)(S * W));
    CHECK(shard_read_rows(r, 0, S, pt, pm, pr, &e) == 0);
    bool ok = true;
    for (int64_t k = 0; k < S; k++)
        for (int64_t j = 0; j < W; j++) {
            int64_t s = k * T + j;
            if (s < total) ok &= pt[k * W + j] == stream[s] && pm[k * W + j] == smask[s] && pr[k * W + j] == sreset[s];
            else ok &= pt[k * W + j] == 999 && pm[k * W + j] == 0 && pr[k * W + j] == (s == total);
        }
    CHECK(ok);
    CHECK(shard_read_rows(r, S - 1, 2, pt, NULL, NULL, &e) == -1);
    free(pt); free(pm); free(pr);
    shard_close(r);

    // preference shard
    char *pp = tmp_path("pref.h5");
    ShardWriterOpts po = {.kind = SHARD_PREF, .tokenizer_hash = 7, .vocab_size = 50, .deflate = 1};
    CHECK(shard_writer_open(&w, pp, &po, &e) == 0);
    for (int i = 0; i < 5; i++) {
        int32_t p[3] = {i, i + 1, i + 2}, c[3] = {10 + i, 11, 12}, rj[4] = {20 + i, 21, 22, 23};
        CHECK(shard_add_pair(w, p, 3, c, 2 + i % 2, rj, 1 + i % 4, &e) == 0);
    }
    CHECK(shard_add_doc(w, badid, NULL, 1, &e) == -1);
    CHECK(shard_writer_close(w, &e) == 0);
    CHECK(shard_open(&r, pp, &e) == 0);
    CHECK(shard_info(r)->kind == SHARD_PREF && shard_info(r)->n_pairs == 5);
    int32_t *a, *b, *c;
    int64_t na, nb, nc;
    CHECK(shard_read_pair(r, 3, &a, &na, &b, &nb, &c, &nc, &e) == 0);
    CHECK(na == 3 && a[0] == 3 && a[2] == 5 && nb == 3 && b[0] == 13 && nc == 4 && c[0] == 23 && c[3] == 23);
    free(a); free(b); free(c);
    CHECK(shard_read_pair(r, 5, &a, &na, &b, &nb, &c, &nc, &e) == -1);
    CHECK(shard_read_rows(r, 0, 1, NULL, NULL, NULL, &e) == -1);
    shard_close(r);
    unlink(pp);
    free(pp);

    // abort leaves nothing
    char *ap = tmp_path("aborted.h5");
    CHECK(shard_writer_open(&w, ap, &o, &e) == 0);
    shard_writer_abort(w);
    char tmpname[600];
    snprintf(tmpname, sizeof tmpname, "%s.tmp", ap);
    CHECK(access(ap, F_OK) != 0 && access(tmpname, F_OK) != 0);
    free(ap);
    unlink(path);
    free(path);
}

static void test_bad_shards(void) {
    DlError e;
    ShardReader *r;
    char *p = write_file("garbage.h5", "not an hdf5 file at all", 23);
    CHECK(shard_open(&r, p, &e) == -1 && strstr(e.msg, "not an HDF5 file"));
    unlink(p);
    free(p);
    CHECK(shard_open(&r, "/nonexistent/x.h5", &e) == -1 && strstr(e.msg, "/nonexistent/x.h5"));
    // an HDF5 file that is not a shard (written by h5py it would look the same: no "format" attribute)
    p = tmp_path("other.h5");
    ShardWriterOpts o = {.kind = SHARD_LM, .vocab_size = 10};
    ShardWriter *w;
    CHECK(shard_writer_open(&w, p, &o, &e) == 0);
    int32_t ids[] = {1, 2, 3};
    CHECK(shard_add_doc(w, ids, NULL, 3, &e) == 0);
    CHECK(shard_writer_close(w, &e) == 0);
    CHECK(shard_open(&r, p, &e) == 0);  // valid
    shard_close(r);
    unlink(p);
    free(p);
    ShardWriterOpts bad = {.kind = SHARD_PREF, .vocab_size = 10, .seq_len = 4};
    p = tmp_path("bad.h5");
    CHECK(shard_writer_open(&w, p, &bad, &e) == -1);
    free(p);
}

static void count_check(const IngestStats *s, int64_t json, int64_t field, int64_t utf8, int64_t empty, int64_t lng, int64_t kind) {
    CHECK_EQ_I64(s->n_bad_json, json);
    CHECK_EQ_I64(s->n_missing_field, field);
    CHECK_EQ_I64(s->n_bad_utf8, utf8);
    CHECK_EQ_I64(s->n_empty, empty);
    CHECK_EQ_I64(s->n_too_long, lng);
    CHECK_EQ_I64(s->n_wrong_kind, kind);
    CHECK_EQ_I64(s->n_skipped, json + field + utf8 + empty + lng + kind);
}

static void test_ingest(void) {
    DlError e;
    Tokenizer *t;
    if (tokenizer_load(TEACHER, &t, &e)) {
        fprintf(stderr, "%s (run scripts/fetch-teacher)\n", e.msg);
        CHECK(0);
        return;
    }
    dl_set_quiet(true);
    const char *jl =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello there!\"}]}\n"  // 1 ok
        "{\"text\": \"A plain document.\"}\n"                                // 2 ok
        "{\"text\": \"broken\"\n"                                            // 3 bad json
        "\n"                                                                 // 4 blank: ignored
        "{\"messages\": [{\"role\": \"user\"}]}\n"                           // 5 missing content
        "{\"text\": \"bad \xff byte\"}\n"                                    // 6 invalid UTF-8
        "{\"text\": \"\"}\n"                                                 // 7 empty
        "{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n"  // 8 no assistant: empty
        "[1, 2, 3]\n"                                                        // 9 not an object
        "{\"chosen\": \"a\", \"rejected\": \"b\", \"prompt\": \"q\"}\n"      // 10 preference in an LM shard
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me a long story please\"}, {\"role\": \"assistant\", "
        "\"content\": \"Once upon a time there was a very long answer that goes on and on and on and on and on, "
        "well beyond the limit that this test sets for a single record.\"}]}\n"  // 11 too long
        "{\"text\": 42}\n"                                                   // 12 text not a string
        "{\"text\": \"x\"} trailing\n"                                       // 13 trailing garbage
        "{\"text\": \"Last good one.\"}";                                    // 14 ok, no final newline
    char *in = write_file("mixed.jsonl", jl, strlen(jl));
    char *out = tmp_path("mixed.h5");
    IngestOptions o;
    ingest_options_default(&o);
    o.seq_len = 48;  // chat records over 49 tokens are too long
    IngestStats st;
    const char *files[] = {in};
    CHECK(ingest_files(t, files, 1, out, &o, &st, &e) == 0);
    CHECK_EQ_I64(st.n_records, 13);
    CHECK_EQ_I64(st.n_docs, 3);
    count_check(&st, 3, 2, 1, 2, 1, 1);
    ShardReader *r;
    CHECK(shard_open(&r, out, &e) == 0);
    if (r) {
        CHECK(shard_check_tokenizer(r, t, &e) == 0);
        CHECK_EQ_I64(shard_info(r)->n_docs, 3);
        int32_t *ids;
        uint8_t *m;
        int64_t n;
        // doc 0 is the chat: its masked part decodes to the assistant answer + <|im_end|>
        CHECK(shard_read_doc(r, 0, &ids, &m, &n, &e) == 0);
        int32_t sel[256];
        int64_t ns = 0;
        for (int64_t i = 0; i < n && ns < 256; i++)
            if (m[i]) sel[ns++] = ids[i];
        char *txt;
        size_t tl;
        tokenizer_decode(t, sel, ns, &txt, &tl);
        CHECK(!strcmp(txt, "Hello there!<|im_end|>"));
        free(txt); free(ids); free(m);
        // doc 1: text + <|endoftext|> separator, all in the loss
        CHECK(shard_read_doc(r, 1, &ids, &m, &n, &e) == 0);
        tokenizer_decode(t, ids, n, &txt, &tl);
        CHECK(!strcmp(txt, "A plain document.<|endoftext|>"));
        bool all = true;
        for (int64_t i = 0; i < n; i++) all &= m[i] == 1;
        CHECK(all);
        free(txt); free(ids); free(m);
        char *nsk = shard_attr_str(r, "chat_family");
        CHECK(nsk && !strcmp(nsk, "chatml"));
        free(nsk);
        shard_close(r);
    }
    // policy fail: stops at line 3 with file:line, and leaves no output
    unlink(out);
    o.policy = INGEST_FAIL;
    CHECK(ingest_files(t, files, 1, out, &o, &st, &e) == -1);
    char want[600];
    snprintf(want, sizeof want, "%s:3: invalid JSON", in);
    CHECK(strstr(e.msg, want) != NULL);
    if (!strstr(e.msg, want)) fprintf(stderr, "  got: %s\n", e.msg);
    CHECK(access(out, F_OK) != 0);
    char tmpname[600];
    snprintf(tmpname, sizeof tmpname, "%s.tmp", out);
    CHECK(access(tmpname, F_OK) != 0);

    // a text file with invalid UTF-8 on line 3 is reported there
    const char bad_txt[] = "line one\nline two\nline \xc3\x28 three\n";
    char *tf = write_file("bad.txt", bad_txt, sizeof bad_txt - 1);
    const char *tfiles[] = {tf};
    CHECK(ingest_files(t, tfiles, 1, out, &o, &st, &e) == -1);
    snprintf(want, sizeof want, "%s:3: invalid UTF-8 at column 6", tf);
    CHECK(strstr(e.msg, want) != NULL);
    if (!strstr(e.msg, want)) fprintf(stderr, "  got: %s\n", e.msg);
    // nothing valid at all: an error, not an empty shard
    o.policy = INGEST_SKIP;
    CHECK(ingest_files(t, tfiles, 1, out, &o, &st, &e) == -1 && strstr(e.msg, "no valid records"));
    CHECK(access(out, F_OK) != 0);
    CHECK(ingest_files(t, tfiles, 0, out, &o, &st, &e) == -1);
    const char *missing[] = {"/nonexistent/data.jsonl"};
    CHECK(ingest_files(t, missing, 1, out, &o, &st, &e) == -1 && strstr(e.msg, "/nonexistent/data.jsonl"));

    // --format preference on chat data: every record is refused and no (empty) shard is written
    const char *chat_only = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}\n";
    char *cf = write_file("chat_only.jsonl", chat_only, strlen(chat_only));
    const char *cfiles[] = {cf};
    ingest_options_default(&o);
    o.format = INGEST_PREF;
    CHECK(ingest_files(t, cfiles, 1, out, &o, &st, &e) == -1 && strstr(e.msg, "no valid records"));
    CHECK(st.n_missing_field == 1);
    CHECK(access(out, F_OK) != 0);
    free(cf);

    // preference pairs in the TRL styles
    const char *pj =
        "{\"prompt\": \"What is 1+1?\", \"chosen\": \"2\", \"rejected\": \"3\"}\n"
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"Capital of France?\"}], \"chosen\": [{\"role\": \"assistant\", "
        "\"content\": \"Paris.\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"Lyon.\"}]}\n"
        "{\"chosen\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}], "
        "\"rejected\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Go away.\"}]}\n"
        "{\"chosen\": [{\"role\": \"user\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": \"x\"}], "
        "\"rejected\": [{\"role\": \"user\", \"content\": \"B\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n"  // prompts differ
        "{\"prompt\": \"q\", \"chosen\": \"\", \"rejected\": \"no\"}\n"      // empty chosen
        "{\"prompt\": \"q\", \"chosen\": \"yes\"}\n"                          // missing rejected
        "{\"text\": \"not a pair\"}\n";                                       // wrong kind
    char *pf = write_file("pref.jsonl", pj, strlen(pj));
    const char *pfiles[] = {pf};
    char *pout = tmp_path("pref_out.h5");
    ingest_options_default(&o);
    CHECK(ingest_files(t, pfiles, 1, pout, &o, &st, &e) == 0);
    CHECK_EQ_I64(st.n_pairs, 3);
    count_check(&st, 0, 2, 0, 1, 0, 1);
    CHECK(shard_open(&r, pout, &e) == 0);
    if (r) {
        CHECK(shard_info(r)->kind == SHARD_PREF && shard_info(r)->n_pairs == 3);
        int32_t *a, *b, *c;
        int64_t na, nb, nc;
        CHECK(shard_read_pair(r, 1, &a, &na, &b, &nb, &c, &nc, &e) == 0);
        char *ta, *tb, *tc;
        size_t l;
        tokenizer_decode(t, a, na, &ta, &l);
        tokenizer_decode(t, b, nb, &tb, &l);
        tokenizer_decode(t, c, nc, &tc, &l);
        CHECK(strstr(ta, "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n") != NULL);
        CHECK(!strcmp(tb, "Paris.<|im_end|>"));
        CHECK(!strcmp(tc, "Lyon.<|im_end|>"));
        free(ta); free(tb); free(tc); free(a); free(b); free(c);
        CHECK(shard_read_pair(r, 2, &a, &na, &b, &nb, &c, &nc, &e) == 0);
        tokenizer_decode(t, b, nb, &tb, &l);
        CHECK(!strcmp(tb, "Hello!<|im_end|>"));
        free(tb); free(a); free(b); free(c);
        shard_close(r);
    }
    unlink(pout);
    free(pout);
    free(pf);
    free(tf);
    free(in);
    free(out);
    dl_set_quiet(false);
    tokenizer_free(t);
}

// data/prompts.jsonl and data/heldout-prompts.jsonl load cleanly, render, and do not overlap; bad prompt
// lines are counted by kind.
static void test_prompts(void) {
    DlError e;
    Tokenizer *t;
    if (tokenizer_load(TEACHER, &t, &e)) { CHECK(0); return; }
    PromptSet train, held;
    IngestStats st;
    CHECK(prompts_load("data/prompts.jsonl", INGEST_FAIL, 20, &train, &st, &e) == 0);
    CHECK(train.n >= 300 && st.n_skipped == 0);
    CHECK(prompts_load("data/heldout-prompts.jsonl", INGEST_FAIL, 20, &held, &st, &e) == 0);
    CHECK(held.n >= 20);
    int overlap = 0, render_fail = 0;
    int64_t max_len = 0;
    for (int64_t i = 0; i < train.n; i++) {
        for (int64_t j = 0; j < held.n; j++)
            overlap += !strcmp(train.items[i].msgs[0].content, held.items[j].msgs[0].content);
        int32_t *ids;
        int64_t n;
        if (chat_render(t, CHAT_CHATML, train.items[i].msgs, train.items[i].n_msgs, true, &ids, NULL, &n, &e)) render_fail++;
        else { max_len = DL_MAX(max_len, n); free(ids); }
    }
    CHECK(overlap == 0 && render_fail == 0);
    CHECK(max_len > 30 && max_len < 400);
    prompts_free(&train);
    prompts_free(&held);
    const char *pj =
        "{\"prompt\": \"Say hi.\"}\n"
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Q?\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}\n"
        "{\"messages\": []}\n"
        "{nope\n"
        "{\"prompt\": 3}\n"
        "\n"
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Be kind.\"}, {\"role\": \"user\", \"content\": \"Hello\"}]}\n";
    char *pf = write_file("prompts_bad.jsonl", pj, strlen(pj));
    PromptSet ps;
    CHECK(prompts_load(pf, INGEST_SKIP, 0, &ps, &st, &e) == 0);
    CHECK_EQ_I64(ps.n, 2);
    CHECK_EQ_I64(st.n_records, 6);
    count_check(&st, 1, 2, 0, 1, 0, 0);
    CHECK(ps.n == 2 && ps.items[1].n_msgs == 2 && ps.items[1].line == 7 && !strcmp(ps.items[0].msgs[0].role, "user"));
    prompts_free(&ps);
    CHECK(prompts_load(pf, INGEST_FAIL, 0, &ps, &st, &e) == -1 && strstr(e.msg, ":2: ") != NULL);
    free(pf);
    tokenizer_free(t);
}

// Randomly mutated JSONL lines (bytes deleted, replaced, inserted, lines cut): ingest never crashes, and every
// non-blank record is either kept or counted as skipped.
static void test_mutated_jsonl(void) {
    DlError e;
    Tokenizer *t;
    if (tokenizer_load(TEACHER, &t, &e)) { CHECK(0); return; }
    static const char *seeds[] = {
        "{\"text\": \"Hello, world! 123 \\u00e9\\n\"}",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi?\"}, {\"role\": \"assistant\", \"content\": \"Hello.\"}]}",
        "{\"prompt\": \"q\", \"chosen\": \"yes\", \"rejected\": \"no\"}",
    };
    static const char junk[] = "{}[]\":,\\ \xff\xc3\x80\x00\nabc0";
    char *path = tmp_path("mutated.jsonl");
    FILE *f = fopen(path, "wb");
    uint64_t st = 12345;
    int lines = 0;
    for (int it = 0; it < 600; it++) {
        char line[512];
        const char *src = seeds[it % 3];
        size_t n = strlen(src);
        memcpy(line, src, n);
        int muts = it % 4;  // a quarter stay intact
        for (int m = 0; m < muts && n > 2; m++) {
            st = st * 6364136223846793005ull + 1442695040888963407ull;
            size_t pos = (size_t)((st >> 33) % n);
            char c = junk[(st >> 20) % (sizeof junk - 1)];
            switch ((st >> 40) % 4) {
                case 0: memmove(line + pos, line + pos + 1, n - pos - 1); n--; break;
                case 1: line[pos] = c; break;
                case 2: memmove(line + pos + 1, line + pos, n - pos); line[pos] = c; n++; break;
                default: n = pos + 1; break;
            }
        }
        for (size_t i = 0; i < n; i++)
            if (line[i] == '\n') line[i] = ' ';  // one record per line
        fwrite(line, 1, n, f);
        fputc('\n', f);
        lines++;
    }
    fclose(f);
    char *out = tmp_path("mutated.h5");
    IngestOptions o;
    ingest_options_default(&o);
    o.max_reports = 0;
    IngestStats s;
    const char *files[] = {path};
    int rc = ingest_files(t, files, 1, out, &o, &s, &e);
    CHECK(rc == 0);
    CHECK(s.n_records > 500 && s.n_records <= lines);
    CHECK_EQ_I64(s.n_records, s.n_docs + s.n_pairs + s.n_skipped);
    CHECK(s.n_docs >= 100 && s.n_skipped >= 100);
    ShardReader *r;
    CHECK(shard_open(&r, out, &e) == 0);
    if (r) {
        CHECK_EQ_I64(shard_info(r)->n_docs, s.n_docs);
        shard_close(r);
    }
    unlink(out);
    unlink(path);
    free(out);
    free(path);
    tokenizer_free(t);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/distill_test_shards_%d", (int)getpid());
    DlError e;
    dl_mkdirs(tmpdir, &e);
    test_writer_reader();
    test_bad_shards();
    test_ingest();
    test_prompts();
    test_mutated_jsonl();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    return check_report("test_shards");
}
