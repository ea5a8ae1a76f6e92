// ingest.c: records from text/JSONL files -> token ids + loss masks -> shard writer, with per-record
// error accounting (file:line, kind of error) under a skip|fail policy.
#include "distill/ingest.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <string.h>

#include "distill/shards.h"
#include "distill/tokenizer_internal.h"

void ingest_options_default(IngestOptions *o) {
    memset(o, 0, sizeof(*o));
    o->format = INGEST_AUTO;
    o->policy = INGEST_SKIP;
    o->chat_family = -1;
    o->doc_sep = true;
    o->deflate = 4;
    o->max_reports = 20;
}

static const char *FORMAT_NAMES[] = {"auto", "text", "jsonl", "chat", "preference"};
int ingest_format_from_name(const char *name) {
    for (int i = 0; i < (int)DL_ARRAY_LEN(FORMAT_NAMES); i++)
        if (!strcmp(name, FORMAT_NAMES[i])) return i;
    return -1;
}
const char *ingest_format_name(IngestFormat f) { return (unsigned)f < DL_ARRAY_LEN(FORMAT_NAMES) ? FORMAT_NAMES[f] : "?"; }

typedef enum { BAD_JSON, BAD_FIELD, BAD_UTF8, BAD_EMPTY, BAD_LONG, BAD_KIND } BadKind;

typedef struct {
    const Tokenizer *t;
    const IngestOptions *o;
    IngestStats *st;
    ChatFamily fam;
    int32_t sep_id;          // end-of-text separator for text docs, or -1
    int64_t max_len;         // effective limit for chat/preference records (0: none)
    int64_t max_len_text;    // for text docs (0: none)
    ShardWriter *w;
    const char *out_path;
    ShardWriterOpts wo;
    int kind;                // -1 until the first valid record fixes it: SHARD_LM / SHARD_PREF
    int n_reports;
    DlError *e;
} Ctx;

// Counts a bad record; returns 0 to continue (skip) or -1 to stop (fail, e filled).
static int bad(Ctx *c, BadKind k, const char *file, int64_t line, const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static int bad(Ctx *c, BadKind k, const char *file, int64_t line, const char *fmt, ...) {
    int64_t *cnt[] = {&c->st->n_bad_json, &c->st->n_missing_field, &c->st->n_bad_utf8, &c->st->n_empty,
                      &c->st->n_too_long, &c->st->n_wrong_kind};
    (*cnt[k])++;
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c->o->policy == INGEST_FAIL) return dl_fail(c->e, "%s:%lld: %s", file, (long long)line, msg);
    c->st->n_skipped++;
    if (c->n_reports++ < c->o->max_reports) dl_warn("%s:%lld: %s (skipped)", file, (long long)line, msg);
    else if (c->n_reports == c->o->max_reports + 1) dl_warn("further bad records are counted but not shown");
    return 0;
}

// Opens the writer on the first valid record (its kind decides the shard kind unless --format did).
static int ensure_writer(Ctx *c, int kind) {
    if (c->w) return 0;
    c->kind = kind;
    c->wo.kind = (ShardKind)kind;
    if (kind == SHARD_PREF) c->wo.seq_len = 0;
    return shard_writer_open(&c->w, c->out_path, &c->wo, c->e);
}

// Adds an LM document; over-long records are errors for chat data (their answers would be cut).
static int add_doc(Ctx *c, const char *file, int64_t line, int32_t *ids, uint8_t *mask, int64_t n, bool is_chat) {
    if (c->kind == SHARD_PREF) return bad(c, BAD_KIND, file, line, "a %s record in a preference shard", is_chat ? "chat" : "text");
    int64_t lim = is_chat ? c->max_len : c->max_len_text;
    if (lim > 0 && n > lim) return bad(c, BAD_LONG, file, line, "%lld tokens, more than the limit of %lld", (long long)n, (long long)lim);
    if (ensure_writer(c, SHARD_LM) || shard_add_doc(c->w, ids, mask, n, c->e)) return -1;
    c->st->n_docs++;
    c->st->n_tokens += n;
    return 0;
}

// ---- text documents
static int ingest_text_doc(Ctx *c, const char *file, int64_t line, const char *text, size_t len) {
    if (len == 0) return bad(c, BAD_EMPTY, file, line, "empty document");
    int64_t badat = tok_utf8_invalid_at(text, len);
    if (badat >= 0) {
        int64_t ln = line, col = 1;
        for (int64_t i = 0; i < badat; i++) {
            if (text[i] == '\n') ln++, col = 1;
            else col++;
        }
        return bad(c, BAD_UTF8, file, ln, "invalid UTF-8 at column %lld (byte 0x%02x)", (long long)col, (uint8_t)text[badat]);
    }
    int32_t *ids = NULL;
    int64_t n = 0, cap = 0;
    DlError te;
    if (tokenizer_encode_append(c->t, text, len, 0, &ids, &n, &cap, &te)) {
        free(ids);
        return bad(c, BAD_UTF8, file, line, "%s", te.msg);
    }
    if (c->sep_id >= 0) {
        ids = dl_realloc(ids, (size_t)(n + 1) * sizeof(int32_t));
        ids[n++] = c->sep_id;
    }
    int rc = add_doc(c, file, line, ids, NULL, n, false);
    free(ids);
    return rc;
}

// ---- JSON helpers
// Parses a message list; returns the count, or -1 with why filled.
static int parse_messages(const cJSON *arr, ChatMessage **out, char *why, size_t nw) {
    *out = NULL;
    if (!cJSON_IsArray(arr)) { snprintf(why, nw, "expected a list of {\"role\", \"content\"} messages"); return -1; }
    int n = cJSON_GetArraySize(arr);
    ChatMessage *m = dl_calloc((size_t)(n > 0 ? n : 1), sizeof(ChatMessage));
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsObject(it) || !cJSON_IsString(role) || !cJSON_IsString(content) || !role->valuestring[0]) {
            snprintf(why, nw, "message %d: expected {\"role\": string, \"content\": string}", i);
            free(m);
            return -1;
        }
        m[i].role = role->valuestring;
        m[i].content = content->valuestring;
        i++;
    }
    *out = m;
    return n;
}

static bool msgs_valid_utf8(const ChatMessage *m, int n, int *which) {
    for (int i = 0; i < n; i++)
        if (tok_utf8_invalid_at(m[i].content, strlen(m[i].content)) >= 0 || tok_utf8_invalid_at(m[i].role, strlen(m[i].role)) >= 0) {
            *which = i;
            return false;
        }
    return true;
}

static int ingest_chat(Ctx *c, const char *file, int64_t line, const cJSON *msgs_json) {
    char why[256];
    ChatMessage *m;
    int n = parse_messages(msgs_json, &m, why, sizeof why);
    if (n < 0) return bad(c, BAD_FIELD, file, line, "\"messages\": %s", why);
    int rc = 0, which;
    bool has_asst = false;
    for (int i = 0; i < n; i++) has_asst |= !strcmp(m[i].role, "assistant");
    if (n == 0) rc = bad(c, BAD_EMPTY, file, line, "empty \"messages\" list");
    else if (!has_asst) rc = bad(c, BAD_EMPTY, file, line, "no assistant message: nothing to train on");
    else if (!msgs_valid_utf8(m, n, &which)) rc = bad(c, BAD_UTF8, file, line, "message %d: invalid UTF-8", which);
    else {
        int32_t *ids;
        uint8_t *mask;
        int64_t nid;
        DlError ce;
        if (chat_render(c->t, c->fam, m, n, false, &ids, &mask, &nid, &ce)) rc = bad(c, BAD_FIELD, file, line, "%s", ce.msg);
        else {
            rc = add_doc(c, file, line, ids, mask, nid, true);
            free(ids);
            free(mask);
        }
    }
    free(m);
    return rc;
}

// A response given as a string or as a message list ending in an assistant message.
static int response_of(const cJSON *v, const char **content, int *n_prefix, const cJSON **list, char *why, size_t nw) {
    *list = NULL;
    *n_prefix = 0;
    if (!v) { snprintf(why, nw, "missing (a string or a message list)"); return -1; }
    if (cJSON_IsString(v)) { *content = v->valuestring; return 0; }
    if (cJSON_IsArray(v) && cJSON_GetArraySize(v) > 0) {
        int n = cJSON_GetArraySize(v);
        const cJSON *last = cJSON_GetArrayItem(v, n - 1);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(last, "role");
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(last, "content");
        if (!cJSON_IsString(role) || strcmp(role->valuestring, "assistant") != 0 || !cJSON_IsString(ct)) {
            snprintf(why, nw, "the last message must be {\"role\": \"assistant\", \"content\": string}");
            return -1;
        }
        *content = ct->valuestring;
        *n_prefix = n - 1;
        *list = v;
        return 0;
    }
    snprintf(why, nw, "expected a string or a non-empty message list");
    return -1;
}

// Renders prompt + assistant response and returns the response tokens (the part after the prompt rendered
// with the generation prompt), without trailing unmasked tokens (ChatML's newline after <|im_end|>).
static int render_response(Ctx *c, const ChatMessage *prompt, int np, const int32_t *pids, int64_t npid,
                           const char *resp, int32_t **out, int64_t *nout, DlError *e) {
    ChatMessage *all = dl_malloc((size_t)(np + 1) * sizeof(ChatMessage));
    memcpy(all, prompt, (size_t)np * sizeof(ChatMessage));
    all[np] = (ChatMessage){"assistant", resp};
    int32_t *ids;
    uint8_t *mask;
    int64_t n;
    int rc = chat_render(c->t, c->fam, all, np + 1, false, &ids, &mask, &n, e);
    free(all);
    if (rc) return -1;
    if (n < npid || memcmp(ids, pids, (size_t)npid * sizeof(int32_t)) != 0) {
        free(ids); free(mask);
        return dl_fail(e, "the conversation does not start with the rendered prompt (template mismatch)");
    }
    while (n > npid && !mask[n - 1]) n--;
    *nout = n - npid;
    *out = dl_malloc((size_t)DL_MAX(*nout, 1) * sizeof(int32_t));
    memcpy(*out, ids + npid, (size_t)*nout * sizeof(int32_t));
    free(ids);
    free(mask);
    return 0;
}

static bool same_message(const cJSON *a, const cJSON *b) {
    const char *ra = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(a, "role"));
    const char *rb = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(b, "role"));
    const char *ca = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(a, "content"));
    const char *cb = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(b, "content"));
    return ra && rb && ca && cb && !strcmp(ra, rb) && !strcmp(ca, cb);
}

static int ingest_pref(Ctx *c, const char *file, int64_t line, const cJSON *obj) {
    if (c->kind == SHARD_LM) return bad(c, BAD_KIND, file, line, "a preference record in an LM shard");
    const cJSON *jp = cJSON_GetObjectItemCaseSensitive(obj, "prompt");
    if (!jp) jp = cJSON_GetObjectItemCaseSensitive(obj, "messages");
    const cJSON *jc = cJSON_GetObjectItemCaseSensitive(obj, "chosen"), *jr = cJSON_GetObjectItemCaseSensitive(obj, "rejected");
    char why[256];
    const char *rc_txt, *rr_txt;
    int pc, pr;
    const cJSON *lc, *lr;
    if (response_of(jc, &rc_txt, &pc, &lc, why, sizeof why)) return bad(c, BAD_FIELD, file, line, "\"chosen\": %s", why);
    if (response_of(jr, &rr_txt, &pr, &lr, why, sizeof why)) return bad(c, BAD_FIELD, file, line, "\"rejected\": %s", why);
    // the prompt: explicit (string or messages), or implicit (the shared prefix of chosen and rejected)
    ChatMessage *pm = NULL;
    int np = 0;
    ChatMessage one;
    if (jp) {
        if (cJSON_IsString(jp)) {
            one = (ChatMessage){"user", jp->valuestring};
            pm = &one;
            np = 1;
        } else if ((np = parse_messages(jp, &pm, why, sizeof why)) < 0) {
            return bad(c, BAD_FIELD, file, line, "\"prompt\": %s", why);
        }
        if (pc > 0 || pr > 0) {  // with an explicit prompt, earlier messages in chosen/rejected would be dropped
            if (pm != &one) free(pm);
            return bad(c, BAD_FIELD, file, line, "with an explicit prompt, chosen/rejected must be a string or one assistant message");
        }
    } else {
        if (!lc || !lr) return bad(c, BAD_FIELD, file, line, "missing \"prompt\" (or \"messages\"); string chosen/rejected need one");
        if (pc != pr || pc == 0) return bad(c, BAD_FIELD, file, line, "implicit prompt: chosen and rejected must share all but their last message");
        for (int i = 0; i < pc; i++)
            if (!same_message(cJSON_GetArrayItem(lc, i), cJSON_GetArrayItem(lr, i)))
                return bad(c, BAD_FIELD, file, line, "implicit prompt: chosen and rejected differ at message %d", i);
        cJSON *prefix = cJSON_CreateArray();
        for (int i = 0; i < pc; i++) cJSON_AddItemReferenceToArray(prefix, cJSON_GetArrayItem(lc, i));
        np = parse_messages(prefix, &pm, why, sizeof why);
        cJSON_Delete(prefix);
        if (np < 0) return bad(c, BAD_FIELD, file, line, "\"chosen\": %s", why);
    }
    int rc = 0, which;
    int32_t *pids = NULL, *cids = NULL, *rids = NULL;
    int64_t npid = 0, nc = 0, nr = 0;
    DlError ce;
    ChatMessage resp[2] = {{"assistant", rc_txt}, {"assistant", rr_txt}};
    if (np == 0) rc = bad(c, BAD_EMPTY, file, line, "empty prompt");
    else if (!rc_txt[0] || !rr_txt[0]) rc = bad(c, BAD_EMPTY, file, line, "empty chosen or rejected response");
    else if (!msgs_valid_utf8(pm, np, &which)) rc = bad(c, BAD_UTF8, file, line, "prompt message %d: invalid UTF-8", which);
    else if (!msgs_valid_utf8(resp, 2, &which)) rc = bad(c, BAD_UTF8, file, line, "%s: invalid UTF-8", which ? "rejected" : "chosen");
    else if (chat_render(c->t, c->fam, pm, np, true, &pids, NULL, &npid, &ce) ||
             render_response(c, pm, np, pids, npid, rc_txt, &cids, &nc, &ce) ||
             render_response(c, pm, np, pids, npid, rr_txt, &rids, &nr, &ce))
        rc = bad(c, BAD_FIELD, file, line, "%s", ce.msg);
    else if (c->max_len > 0 && (npid + nc > c->max_len || npid + nr > c->max_len))
        rc = bad(c, BAD_LONG, file, line, "prompt+response of %lld/%lld tokens, more than the limit of %lld",
                 (long long)(npid + nc), (long long)(npid + nr), (long long)c->max_len);
    else if (ensure_writer(c, SHARD_PREF) || shard_add_pair(c->w, pids, npid, cids, nc, rids, nr, c->e))
        rc = -1;
    else {
        c->st->n_pairs++;
        c->st->n_tokens += npid + nc + nr;
    }
    free(pids); free(cids); free(rids);
    if (pm != &one) free(pm);
    return rc;
}

// One JSONL line (already UTF-8 checked, not blank).
static int ingest_json_line(Ctx *c, const char *file, int64_t line, const char *s, size_t n) {
    const char *end = NULL;
    cJSON *obj = cJSON_ParseWithLengthOpts(s, n, &end, false);
    if (!obj) {
        int64_t col = end ? (int64_t)(end - s) + 1 : 1;
        if (!end) col = (int64_t)((cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() - s : 0)) + 1;
        return bad(c, BAD_JSON, file, line, "invalid JSON near column %lld", (long long)col);
    }
    // trailing garbage after the object
    while (end && (size_t)(end - s) < n && (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n')) end++;
    int rc;
    if (end && (size_t)(end - s) < n) rc = bad(c, BAD_JSON, file, line, "trailing characters after the JSON value at column %lld", (long long)(end - s) + 1);
    else if (!cJSON_IsObject(obj)) rc = bad(c, BAD_JSON, file, line, "expected a JSON object");
    else {
        IngestFormat f = c->o->format;
        bool has_pref = cJSON_HasObjectItem(obj, "chosen") || cJSON_HasObjectItem(obj, "rejected");
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(obj, "messages");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(obj, "text");
        if (f == INGEST_PREF || (f == INGEST_AUTO && has_pref)) rc = ingest_pref(c, file, line, obj);
        else if (f == INGEST_CHAT || (f == INGEST_AUTO && msgs)) {
            rc = msgs ? ingest_chat(c, file, line, msgs) : bad(c, BAD_FIELD, file, line, "missing \"messages\" (a list of {\"role\", \"content\"})");
        } else if (f == INGEST_JSONL || (f == INGEST_AUTO && text)) {
            if (!cJSON_IsString(text)) rc = bad(c, BAD_FIELD, file, line, "missing \"text\" (a string)");
            else rc = ingest_text_doc(c, file, line, text->valuestring, strlen(text->valuestring));
        } else {
            rc = bad(c, BAD_FIELD, file, line, "record has none of \"text\", \"messages\", \"chosen\"/\"rejected\"");
        }
    }
    cJSON_Delete(obj);
    return rc;
}

static bool is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return false;
    return true;
}

static bool has_suffix(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

static int ingest_file(Ctx *c, const char *file) {
    bool jsonl = c->o->format == INGEST_JSONL || c->o->format == INGEST_CHAT || c->o->format == INGEST_PREF ||
                 (c->o->format == INGEST_AUTO && (has_suffix(file, ".jsonl") || has_suffix(file, ".json")));
    if (!jsonl) {
        size_t len;
        char *txt = dl_read_file(file, &len, c->e);
        if (!txt) return -1;
        c->st->n_records++;
        int rc = ingest_text_doc(c, file, 1, txt, len);
        free(txt);
        return rc;
    }
    FILE *f = fopen(file, "rb");
    if (!f) return dl_fail(c->e, "%s: cannot open: %s", file, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int64_t ln = 0;
    int rc = 0;
    while ((n = getline(&line, &cap, f)) >= 0) {
        ln++;
        if (is_blank(line, (size_t)n)) continue;
        c->st->n_records++;
        int64_t badat = tok_utf8_invalid_at(line, (size_t)n);
        if (badat >= 0) rc = bad(c, BAD_UTF8, file, ln, "invalid UTF-8 at column %lld (byte 0x%02x)", (long long)badat + 1, (uint8_t)line[badat]);
        else if (memchr(line, 0, (size_t)n)) rc = bad(c, BAD_JSON, file, ln, "NUL byte in the line");
        else rc = ingest_json_line(c, file, ln, line, (size_t)n);
        if (rc) break;
    }
    if (!rc && ferror(f)) rc = dl_fail(c->e, "%s: read error after line %lld", file, (long long)ln);
    free(line);
    fclose(f);
    return rc;
}

// The token that ends a text document: <|endoftext|> (GPT-2/SmolLM), <|end_of_text|> (Llama-3), else EOS.
static int32_t doc_separator(const Tokenizer *t) {
    int32_t id = tokenizer_token_id(t, "<|endoftext|>");
    if (id < 0) id = tokenizer_token_id(t, "<|end_of_text|>");
    if (id < 0) id = tokenizer_eos(t);
    return id;
}

int ingest_files(const Tokenizer *t, const char *const *files, int n_files, const char *out_path,
                 const IngestOptions *o, IngestStats *stats, DlError *e) {
    IngestStats local;
    IngestStats *st = stats ? stats : &local;
    memset(st, 0, sizeof(*st));
    if (n_files <= 0) return dl_fail(e, "no input files");
    Ctx c = {.t = t, .o = o, .st = st, .out_path = out_path, .kind = -1, .e = e};
    c.sep_id = o->doc_sep ? doc_separator(t) : -1;
    if (o->chat_family >= 0) c.fam = (ChatFamily)o->chat_family;
    else if (chat_family_for(t, &c.fam, e)) {
        if (o->format == INGEST_CHAT || o->format == INGEST_PREF) return -1;
        c.fam = CHAT_CHATML;  // text-only data needs no template; chat records will fail to render
    }
    c.max_len = o->max_len > 0 ? o->max_len : (o->seq_len > 0 ? o->seq_len + 1 : 0);
    c.max_len_text = o->max_len;
    int32_t pad = tokenizer_pad(t);
    if (pad < 0) pad = tokenizer_eos(t);
    if (pad < 0) pad = 0;
    c.wo = (ShardWriterOpts){.kind = SHARD_LM, .tokenizer_hash = tokenizer_hash(t), .tokenizer_pre = tokenizer_pre_name(t),
                             .vocab_size = tokenizer_vocab_size(t), .seq_len = o->seq_len, .pad_id = pad,
                             .deflate = o->deflate, .chunk = 1 << 16};
    if (o->format == INGEST_PREF && ensure_writer(&c, SHARD_PREF)) return -1;
    size_t srclen = 1;
    for (int i = 0; i < n_files; i++) srclen += strlen(files[i]) + 1;
    char *sources = dl_calloc(srclen, 1);
    for (int i = 0; i < n_files; i++) {
        if (i) strcat(sources, "\n");
        strcat(sources, files[i]);
    }
    int rc = 0;
    for (int i = 0; i < n_files && !rc; i++) rc = ingest_file(&c, files[i]);
    if (!rc && st->n_docs + st->n_pairs == 0)
        rc = dl_fail(e, "no valid records in %d input file(s) (%lld skipped)", n_files, (long long)st->n_skipped);
    if (!rc) {
        DlError *x = e;
        rc = shard_writer_attr_str(c.w, "sources", sources, x) || shard_writer_attr_str(c.w, "input_format", ingest_format_name(o->format), x) ||
             shard_writer_attr_str(c.w, "chat_family", chat_family_name(c.fam), x) ||
             shard_writer_attr_i64(c.w, "n_records", st->n_records, x) || shard_writer_attr_i64(c.w, "n_skipped", st->n_skipped, x) ||
             shard_writer_attr_i64(c.w, "n_bad_json", st->n_bad_json, x) || shard_writer_attr_i64(c.w, "n_missing_field", st->n_missing_field, x) ||
             shard_writer_attr_i64(c.w, "n_bad_utf8", st->n_bad_utf8, x) || shard_writer_attr_i64(c.w, "n_empty", st->n_empty, x) ||
             shard_writer_attr_i64(c.w, "n_too_long", st->n_too_long, x) || shard_writer_attr_i64(c.w, "n_wrong_kind", st->n_wrong_kind, x) ||
             shard_writer_attr_i64(c.w, "doc_separator", c.sep_id, x);
        rc = rc ? -1 : 0;
    }
    free(sources);
    if (rc) {
        if (c.w) shard_writer_abort(c.w);
        return -1;
    }
    return shard_writer_close(c.w, e);
}

// ---- prompt sets
static void prompt_item_free(PromptItem *it) {
    for (int i = 0; i < it->n_msgs; i++) {
        free((char *)it->msgs[i].role);
        free((char *)it->msgs[i].content);
    }
    free(it->msgs);
}

void prompts_free(PromptSet *s) {
    for (int64_t i = 0; i < s->n; i++) prompt_item_free(&s->items[i]);
    free(s->items);
    s->items = NULL;
    s->n = 0;
}

// Parses one prompt line into it; returns 0 ok, else the BadKind + 1 with why filled.
static int parse_prompt(const char *s, size_t n, PromptItem *it, char *why, size_t nw) {
    memset(it, 0, sizeof(*it));
    int64_t badat = tok_utf8_invalid_at(s, n);
    if (badat >= 0) { snprintf(why, nw, "invalid UTF-8 at column %lld", (long long)badat + 1); return BAD_UTF8 + 1; }
    cJSON *obj = cJSON_ParseWithLength(s, n);
    if (!obj || !cJSON_IsObject(obj)) {
        cJSON_Delete(obj);
        snprintf(why, nw, "invalid JSON (expected an object)");
        return BAD_JSON + 1;
    }
    int rc = 0;
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(obj, "messages");
    const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(obj, "prompt");
    if (msgs) {
        ChatMessage *m;
        char inner[200];
        int k = parse_messages(msgs, &m, inner, sizeof inner);
        if (k < 0) rc = BAD_FIELD + 1, snprintf(why, nw, "\"messages\": %s", inner);
        else if (k == 0) { snprintf(why, nw, "empty \"messages\" list"); rc = BAD_EMPTY + 1; }
        else if (!strcmp(m[k - 1].role, "assistant")) { snprintf(why, nw, "the last message is the assistant's: nothing to answer"); rc = BAD_FIELD + 1; }
        else {
            it->msgs = dl_calloc((size_t)k, sizeof(ChatMessage));
            it->n_msgs = k;
            for (int i = 0; i < k; i++) it->msgs[i] = (ChatMessage){dl_strdup(m[i].role), dl_strdup(m[i].content)};
            if (!m[k - 1].content[0]) { snprintf(why, nw, "empty last message"); rc = BAD_EMPTY + 1; }
        }
        free(m);
    } else if (cJSON_IsString(prompt)) {
        if (!prompt->valuestring[0]) { snprintf(why, nw, "empty \"prompt\""); rc = BAD_EMPTY + 1; }
        else {
            it->msgs = dl_calloc(1, sizeof(ChatMessage));
            it->n_msgs = 1;
            it->msgs[0] = (ChatMessage){dl_strdup("user"), dl_strdup(prompt->valuestring)};
        }
    } else {
        snprintf(why, nw, "expected \"messages\" (a list) or \"prompt\" (a string)");
        rc = BAD_FIELD + 1;
    }
    if (rc) prompt_item_free(it);
    cJSON_Delete(obj);
    return rc;
}

int prompts_load(const char *path, IngestPolicy policy, int max_reports, PromptSet *out, IngestStats *stats,
                 DlError *e) {
    IngestStats local;
    IngestStats *st = stats ? stats : &local;
    memset(st, 0, sizeof(*st));
    memset(out, 0, sizeof(*out));
    FILE *f = fopen(path, "rb");
    if (!f) return dl_fail(e, "%s: cannot open: %s", path, strerror(errno));
    IngestOptions o;
    ingest_options_default(&o);
    o.policy = policy;
    o.max_reports = max_reports;
    Ctx c = {.o = &o, .st = st, .e = e};
    char *line = NULL, why[256];
    size_t cap = 0;
    ssize_t n;
    int64_t ln = 0, capn = 0;
    int rc = 0;
    while (!rc && (n = getline(&line, &cap, f)) >= 0) {
        ln++;
        if (is_blank(line, (size_t)n)) continue;
        st->n_records++;
        PromptItem it;
        int k = memchr(line, 0, (size_t)n) ? (snprintf(why, sizeof why, "NUL byte in the line"), BAD_JSON + 1)
                                            : parse_prompt(line, (size_t)n, &it, why, sizeof why);
        if (k) {
            rc = bad(&c, (BadKind)(k - 1), path, ln, "%s", why);
            continue;
        }
        it.line = ln;
        if (out->n == capn) out->items = dl_realloc(out->items, (size_t)(capn = capn ? capn * 2 : 256) * sizeof(PromptItem));
        out->items[out->n++] = it;
    }
    free(line);
    fclose(f);
    if (!rc && out->n == 0) rc = dl_fail(e, "%s: no valid prompts (%lld skipped)", path, (long long)st->n_skipped);
    if (rc) prompts_free(out);
    return rc ? -1 : 0;
}
