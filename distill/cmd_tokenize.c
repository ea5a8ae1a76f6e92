// cmd_tokenize.c: `distill tokenize`: print the ids of a file, decode ids, benchmark encoding, or run the
// data stage (files -> HDF5 shard) exactly as a recipe does (ingest_files).
#include <errno.h>
#include <string.h>

#include "distill/command.h"
#include "distill/common.h"
#include "distill/ingest.h"
#include "distill/shards.h"
#include "distill/tokenizer.h"

static int64_t parse_i64(const char *opt, const char *s) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < 0) dl_die(DL_EXIT_USAGE, "%s expects a non-negative integer, got '%s'", opt, s);
    return v;
}

static int print_ids(const Tokenizer *t, const char *file, bool special) {
    DlError e;
    size_t len;
    char *txt = dl_read_file(file, &len, &e);
    if (!txt) dl_die(DL_EXIT_INPUT, "%s", e.msg);
    int32_t *ids;
    int64_t n;
    if (tokenizer_encode_ex(t, txt, len, special ? TOK_ENCODE_SPECIAL : 0, &ids, &n, &e))
        dl_die(DL_EXIT_INPUT, "%s: %s", file, e.msg);
    // one line, built in a buffer (fast for large files)
    char *out = dl_malloc((size_t)n * 12 + 2);
    size_t o = 0;
    for (int64_t i = 0; i < n; i++) o += (size_t)sprintf(out + o, i ? " %d" : "%d", ids[i]);
    out[o++] = '\n';
    if (fwrite(out, 1, o, stdout) != o || fflush(stdout)) dl_die(DL_EXIT_RUNTIME, "writing to stdout failed");
    free(out);
    free(ids);
    free(txt);
    return DL_EXIT_OK;
}

// Reads whitespace-separated ids from a file ("-" for stdin) and writes the exact decoded bytes.
static int decode_ids(const Tokenizer *t, const char *file) {
    DlError e;
    size_t len;
    char *txt = NULL;
    if (!strcmp(file, "-")) {
        size_t cap = 1 << 16;
        txt = dl_malloc(cap);
        len = 0;
        size_t k;
        while ((k = fread(txt + len, 1, cap - len - 1, stdin)) > 0) {
            len += k;
            if (len + 1 == cap) txt = dl_realloc(txt, cap *= 2);
        }
        txt[len] = 0;
    } else if (!(txt = dl_read_file(file, &len, &e))) {
        dl_die(DL_EXIT_INPUT, "%s", e.msg);
    }
    int64_t n = 0, cap = 1024;
    int32_t *ids = dl_malloc((size_t)cap * 4);
    char *p = txt;
    for (;;) {
        while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r' || *p == ',') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= tokenizer_vocab_size(t))
            dl_die(DL_EXIT_INPUT, "%s: id #%lld is not an integer in [0, %d)", file, (long long)n, tokenizer_vocab_size(t));
        if (n == cap) ids = dl_realloc(ids, (size_t)(cap *= 2) * 4);
        ids[n++] = (int32_t)v;
        p = end;
    }
    char *out;
    size_t olen;
    tokenizer_decode(t, ids, n, &out, &olen);
    fwrite(out, 1, olen, stdout);
    free(out);
    free(ids);
    free(txt);
    return DL_EXIT_OK;
}

// Single-threaded encode throughput over the concatenated files, best of `repeat` runs.
static int bench(const Tokenizer *t, char **files, int n_files, int repeat) {
    DlError e;
    double best = 1e30;
    int64_t bytes = 0, toks = 0;
    char **txt = dl_calloc((size_t)n_files, sizeof(char *));
    size_t *len = dl_calloc((size_t)n_files, sizeof(size_t));
    for (int i = 0; i < n_files; i++)
        if (!(txt[i] = dl_read_file(files[i], &len[i], &e))) dl_die(DL_EXIT_INPUT, "%s", e.msg);
    for (int r = 0; r < repeat; r++) {
        double t0 = dl_now();
        bytes = toks = 0;
        for (int i = 0; i < n_files; i++) {
            int32_t *ids;
            int64_t n;
            if (tokenizer_encode(t, txt[i], len[i], &ids, &n, &e)) dl_die(DL_EXIT_INPUT, "%s: %s", files[i], e.msg);
            bytes += (int64_t)len[i];
            toks += n;
            free(ids);
        }
        best = DL_MIN(best, dl_now() - t0);
    }
    printf("{\"bytes\": %lld, \"tokens\": %lld, \"seconds\": %.6f, \"MB_per_s\": %.3f, \"tokens_per_s\": %.0f}\n",
           (long long)bytes, (long long)toks, best, bytes / best / 1e6, toks / best);
    for (int i = 0; i < n_files; i++) free(txt[i]);
    free(txt);
    free(len);
    return DL_EXIT_OK;
}

// Prints a shard's layout and bad-record counts as one JSON object (validates it on the way).
static int shard_info_cmd(const char *path, const char *tok_path) {
    DlError e;
    ShardReader *r;
    if (shard_open(&r, path, &e)) dl_die(DL_EXIT_INPUT, "%s", e.msg);
    const ShardInfo *in = shard_info(r);
    printf("{\"path\": \"%s\", \"kind\": \"%s\", \"format_version\": %d, \"tokenizer_hash\": \"%016llx\", "
           "\"vocab_size\": %d, \"n_tokens\": %lld, \"n_docs\": %lld, \"seq_len\": %lld, \"n_seqs\": %lld, "
           "\"n_pairs\": %lld",
           path, in->kind == SHARD_PREF ? "preference" : "lm", in->format_version,
           (unsigned long long)in->tokenizer_hash, in->vocab_size, (long long)in->n_tokens, (long long)in->n_docs,
           (long long)in->seq_len, (long long)in->n_seqs, (long long)in->n_pairs);
    const char *keys[] = {"tokenizer_pre", "chat_family", "input_format", "created_by"};
    for (size_t i = 0; i < DL_ARRAY_LEN(keys); i++) {
        char *v = shard_attr_str(r, keys[i]);
        if (v) printf(", \"%s\": \"%s\"", keys[i], v);
        free(v);
    }
    printf("}\n");
    int rc = DL_EXIT_OK;
    if (tok_path) {  // optional: does the shard belong to this tokenizer?
        Tokenizer *t;
        if (tokenizer_load(tok_path, &t, &e)) dl_die(DL_EXIT_INPUT, "%s", e.msg);
        if (shard_check_tokenizer(r, t, &e)) {
            dl_warn("%s", e.msg);
            rc = DL_EXIT_INPUT;
        }
        tokenizer_free(t);
    }
    shard_close(r);
    return rc;
}

static int run_tokenize(int argc, char **argv) {
    const char *tok_path = NULL, *ids_file = NULL, *decode_file = NULL, *out = NULL, *info = NULL;
    bool special = false, do_bench = false;
    int repeat = 3;
    IngestOptions o;
    ingest_options_default(&o);
    char **files = dl_calloc((size_t)argc + 1, sizeof(char *));
    int n_files = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--tokenizer") && has) tok_path = argv[++i];
        else if (!strcmp(a, "--ids") && has) ids_file = argv[++i];
        else if (!strcmp(a, "--decode") && has) decode_file = argv[++i];
        else if (!strcmp(a, "--special")) special = true;
        else if (!strcmp(a, "--info") && has) info = argv[++i];
        else if (!strcmp(a, "--bench")) do_bench = true;
        else if (!strcmp(a, "--repeat") && has) {
            int64_t v = parse_i64(a, argv[++i]);  // (not inside DL_MAX: it evaluates its arguments twice)
            repeat = (int)DL_MAX(1, DL_MIN(v, 1000));
        }
        else if (!strcmp(a, "--out") && has) out = argv[++i];
        else if (!strcmp(a, "--format") && has) {
            int f = ingest_format_from_name(argv[++i]);
            if (f < 0) dl_die(DL_EXIT_USAGE, "--format must be auto, text, jsonl, chat or preference (got '%s')", argv[i]);
            o.format = (IngestFormat)f;
        } else if (!strcmp(a, "--seq-len") && has) o.seq_len = parse_i64(a, argv[++i]);
        else if (!strcmp(a, "--max-len") && has) o.max_len = parse_i64(a, argv[++i]);
        else if (!strcmp(a, "--on-error") && has) {
            const char *p = argv[++i];
            if (!strcmp(p, "skip")) o.policy = INGEST_SKIP;
            else if (!strcmp(p, "fail")) o.policy = INGEST_FAIL;
            else dl_die(DL_EXIT_USAGE, "--on-error must be skip or fail (got '%s')", p);
        } else if (!strcmp(a, "--chat-template") && has) {
            int f = chat_family_from_name(argv[++i]);
            if (f < 0) dl_die(DL_EXIT_USAGE, "--chat-template must be chatml or llama3 (got '%s')", argv[i]);
            o.chat_family = f;
        } else if (!strcmp(a, "--no-doc-sep")) o.doc_sep = false;
        else if (!strcmp(a, "--deflate") && has) {
            int64_t v = parse_i64(a, argv[++i]);
            o.deflate = (int)DL_MIN(9, v);
        }
        else if (a[0] == '-' && a[1]) dl_die(DL_EXIT_USAGE, "unknown or incomplete option '%s' (see distill tokenize --help)", a);
        else files[n_files++] = argv[i];
    }
    if (info) {
        free(files);
        return shard_info_cmd(info, tok_path);
    }
    if (!tok_path) dl_die(DL_EXIT_USAGE, "--tokenizer MODEL is required (a GGUF file, tokenizer.json or HF directory)");
    int modes = (ids_file != NULL) + (decode_file != NULL) + (out != NULL) + do_bench;
    if (modes != 1) dl_die(DL_EXIT_USAGE, "give exactly one of --ids FILE, --decode FILE, --bench FILES, --out OUT.h5 FILES");
    DlError e;
    Tokenizer *t;
    if (tokenizer_load(tok_path, &t, &e)) dl_die(DL_EXIT_INPUT, "%s", e.msg);
    int rc = DL_EXIT_OK;
    if (ids_file) rc = print_ids(t, ids_file, special);
    else if (decode_file) rc = decode_ids(t, decode_file);
    else if (do_bench) {
        if (n_files == 0) dl_die(DL_EXIT_USAGE, "--bench needs input files");
        rc = bench(t, files, n_files, repeat);
    } else {
        if (n_files == 0) dl_die(DL_EXIT_USAGE, "--out needs input files");
        IngestStats st;
        double t0 = dl_now();
        if (ingest_files(t, (const char *const *)files, n_files, out, &o, &st, &e)) {
            tokenizer_free(t);
            free(files);
            dl_die(DL_EXIT_INPUT, "%s", e.msg);
        }
        dl_info("wrote %s: %lld records, %lld docs, %lld pairs, %lld tokens, %lld skipped (json %lld, fields %lld, "
                "utf8 %lld, empty %lld, too long %lld, wrong kind %lld) in %.2fs",
                out, (long long)st.n_records, (long long)st.n_docs, (long long)st.n_pairs, (long long)st.n_tokens,
                (long long)st.n_skipped, (long long)st.n_bad_json, (long long)st.n_missing_field, (long long)st.n_bad_utf8,
                (long long)st.n_empty, (long long)st.n_too_long, (long long)st.n_wrong_kind, dl_now() - t0);
    }
    tokenizer_free(t);
    free(files);
    return rc;
}

DL_COMMAND(tokenize_cmd, {
    .name = "tokenize",
    .usage = "--tokenizer MODEL (--ids FILE | --decode FILE | --bench FILES | --out OUT.h5 FILES...) [options] | --info SHARD",
    .summary = "tokenize files: print ids, decode, benchmark, or write HDF5 token shards (the data stage)",
    .help = "MODEL is a GGUF file (tokenizer.ggml.* metadata), an HF tokenizer.json or a directory holding one.\n\n"
            "modes:\n"
            "  --ids FILE        print the ids of the whole file (no special tokens added) on one line\n"
            "  --special         with --ids: match special-token text such as <|im_start|> as single ids\n"
            "  --decode FILE     read whitespace-separated ids (FILE or - for stdin), write the exact bytes\n"
            "  --bench FILES     single-threaded encode throughput (JSON line); --repeat N (default 3)\n"
            "  --info SHARD      validate a shard and print its layout as JSON (with --tokenizer: also check\n"
            "                    that the shard was written with that tokenizer)\n"
            "  --out OUT.h5 FILES  write one HDF5 shard (see data/README.md), exactly as the recipe's data stage\n\n"
            "shard options:\n"
            "  --format F        auto (default: .jsonl/.json by keys, other files as text) | text | jsonl |\n"
            "                    chat | preference\n"
            "  --seq-len N       also pack documents into rows of N+1 tokens with document-reset flags\n"
            "  --max-len N       records longer than N tokens are errors (default for chat/preference records:\n"
            "                    N = seq-len + 1 when packing; text documents are split across rows)\n"
            "  --on-error P      skip (default: report FILE:LINE and go on) | fail (stop at the first bad record,\n"
            "                    leave no output)\n"
            "  --chat-template T chatml | llama3 (default: from the tokenizer)\n"
            "  --no-doc-sep      do not append <|endoftext|> / <|end_of_text|> to text documents\n"
            "  --deflate N       HDF5 deflate level 0-9 (default 4)\n\n"
            "On NFS/Lustre, where HDF5 file locking fails, set HDF5_USE_FILE_LOCKING=FALSE.\n\n"
            "examples:\n"
            "  distill tokenize --tokenizer checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf --ids notes.txt\n"
            "  distill tokenize --tokenizer teacher.gguf --out data/sft.h5 --seq-len 2048 chats.jsonl\n",
    .run = run_tokenize,
})
