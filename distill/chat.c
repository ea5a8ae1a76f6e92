// chat.c: ChatML and Llama-3 chat templates rendered to ids + assistant loss mask.
//
// Ids equal what HF does (render the template to a string, then tokenize it with special tokens matched):
// special tokens split the string first, so the text between two special tokens is one segment and is
// encoded here as one piece ("user\nHello", "\n\nHello"). Where an assistant's content shares a segment
// with header text, a token is in the mask if it holds any byte of the content.
#include "distill/chat.h"

#include <string.h>
#include <utf8proc.h>

typedef struct {
    int32_t *ids;
    uint8_t *mask;
    int64_t n, cap;
} Render;

static void r_push(Render *r, int32_t id, uint8_t m) {
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 256;
        r->ids = dl_realloc(r->ids, (size_t)r->cap * sizeof(int32_t));
        r->mask = dl_realloc(r->mask, (size_t)r->cap);
    }
    r->ids[r->n] = id;
    r->mask[r->n] = m;
    r->n++;
}

// Encodes prefix ++ content as one segment; tokens holding content bytes get mask m, the rest 0.
static int r_segment(const Tokenizer *t, Render *r, const char *prefix, size_t np, const char *content, size_t nc,
                     uint8_t m, DlError *e) {
    size_t n = np + nc;
    if (n == 0) return 0;
    char *buf = dl_malloc(n + 1);
    memcpy(buf, prefix, np);
    memcpy(buf + np, content, nc);
    int32_t *ids = NULL;
    int64_t nid = 0, cap = 0;
    int rc = tokenizer_encode_append(t, buf, n, 0, &ids, &nid, &cap, e);
    free(buf);
    if (rc) return -1;
    size_t off = 0;
    for (int64_t i = 0; i < nid; i++) {
        size_t len;
        tokenizer_token_bytes(t, ids[i], &len);
        if (tokenizer_is_special(t, ids[i])) len = 1;  // an unk standing for one byte
        off += len;
        r_push(r, ids[i], (off > np) ? m : 0);
    }
    free(ids);
    return 0;
}

static int need_token(const Tokenizer *t, const char *name, int32_t *id, DlError *e) {
    *id = tokenizer_token_id(t, name);
    if (*id < 0) return dl_fail(e, "chat template needs the special token %s, which this tokenizer lacks", name);
    return 0;
}

// Default system prompt of a ChatML template that inserts one when the conversation has none (SmolLM2's
// GGUF template does). Returns a malloc'd string or NULL.
static char *chatml_default_system(const Tokenizer *t) {
    const char *tm = tokenizer_chat_template(t);
    if (!tm || !strstr(tm, "!= 'system'")) return NULL;
    // the newline after "system" is either a real newline or a Jinja escape in the template source
    const char *key = "<|im_start|>system\n", *key_esc = "<|im_start|>system\\n";
    const char *p = strstr(tm, key);
    if (p) p += strlen(key);
    else if ((p = strstr(tm, key_esc))) p += strlen(key_esc);
    else return NULL;
    const char *end = strstr(p, "<|im_end|>");
    if (!end) return NULL;
    char *out = dl_malloc((size_t)(end - p) + 1);
    size_t o = 0;
    for (const char *q = p; q < end; q++) {  // unescape the Jinja string literal
        if (*q == '\\' && q + 1 < end) {
            q++;
            out[o++] = *q == 'n' ? '\n' : *q == 't' ? '\t' : *q;
        } else {
            out[o++] = *q;
        }
    }
    out[o] = 0;
    return out;
}

static bool is_assistant(const char *role) { return strcmp(role, "assistant") == 0; }

static int render_chatml(const Tokenizer *t, const ChatMessage *msgs, int n, bool gen, Render *r, DlError *e) {
    int32_t im_start, im_end;
    if (need_token(t, "<|im_start|>", &im_start, e) || need_token(t, "<|im_end|>", &im_end, e)) return -1;
    char *sys = (n == 0 || strcmp(msgs[0].role, "system") != 0) ? chatml_default_system(t) : NULL;
    if (sys) {
        r_push(r, im_start, 0);
        int rc = r_segment(t, r, "system\n", 7, sys, strlen(sys), 0, e);
        free(sys);
        if (rc) return -1;
        r_push(r, im_end, 0);
        if (r_segment(t, r, "\n", 1, "", 0, 0, e)) return -1;
    }
    for (int i = 0; i < n; i++) {
        uint8_t m = is_assistant(msgs[i].role);
        size_t lr = strlen(msgs[i].role);
        char *hdr = dl_malloc(lr + 2);
        memcpy(hdr, msgs[i].role, lr);
        hdr[lr] = '\n';
        r_push(r, im_start, 0);
        int rc = r_segment(t, r, hdr, lr + 1, msgs[i].content, strlen(msgs[i].content), m, e);
        free(hdr);
        if (rc) return dl_fail_prefix(e, "message %d (%s)", i, msgs[i].role);
        r_push(r, im_end, m);
        if (r_segment(t, r, "\n", 1, "", 0, 0, e)) return -1;
    }
    if (gen) {
        r_push(r, im_start, 0);
        if (r_segment(t, r, "assistant\n", 10, "", 0, 0, e)) return -1;
    }
    return 0;
}

// Python's str.isspace (Jinja's `trim` is str.strip()): bidi class WS, B or S, or category Zs.
static bool py_isspace(int32_t cp) {
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x1f);
    const utf8proc_property_t *p = utf8proc_get_property(cp);
    return p->category == UTF8PROC_CATEGORY_ZS || p->bidi_class == UTF8PROC_BIDI_CLASS_WS ||
           p->bidi_class == UTF8PROC_BIDI_CLASS_B || p->bidi_class == UTF8PROC_BIDI_CLASS_S;
}

// Trims Unicode whitespace at both ends of s[0..*n) (valid UTF-8); returns the new start.
static const char *py_strip(const char *s, size_t *n) {
    const uint8_t *u = (const uint8_t *)s;
    size_t a = 0, b = *n;
    while (a < b) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(u + a, (utf8proc_ssize_t)(b - a), &cp);
        if (k <= 0 || !py_isspace(cp)) break;
        a += (size_t)k;
    }
    while (b > a) {
        size_t c = b - 1;
        while (c > a && (u[c] & 0xC0) == 0x80) c--;  // start of the last character
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(u + c, (utf8proc_ssize_t)(b - c), &cp);
        if (k <= 0 || !py_isspace(cp)) break;
        b = c;
    }
    *n = b - a;
    return s + a;
}

static int render_llama3(const Tokenizer *t, const ChatMessage *msgs, int n, bool gen, Render *r, DlError *e) {
    int32_t bot, sh, eh, eot;
    if (need_token(t, "<|begin_of_text|>", &bot, e) || need_token(t, "<|start_header_id|>", &sh, e) ||
        need_token(t, "<|end_header_id|>", &eh, e) || need_token(t, "<|eot_id|>", &eot, e))
        return -1;
    r_push(r, bot, 0);
    for (int i = 0; i < n; i++) {
        uint8_t m = is_assistant(msgs[i].role);
        r_push(r, sh, 0);
        if (r_segment(t, r, msgs[i].role, strlen(msgs[i].role), "", 0, 0, e)) return -1;
        r_push(r, eh, 0);
        // the Llama-3 template trims the content (Jinja `| trim`)
        size_t lc = strlen(msgs[i].content);
        const char *c = py_strip(msgs[i].content, &lc);
        if (r_segment(t, r, "\n\n", 2, c, lc, m, e)) return dl_fail_prefix(e, "message %d (%s)", i, msgs[i].role);
        r_push(r, eot, m);
    }
    if (gen) {
        r_push(r, sh, 0);
        if (r_segment(t, r, "assistant", 9, "", 0, 0, e)) return -1;
        r_push(r, eh, 0);
        if (r_segment(t, r, "\n\n", 2, "", 0, 0, e)) return -1;
    }
    return 0;
}

int chat_render(const Tokenizer *t, ChatFamily fam, const ChatMessage *msgs, int n, bool add_generation_prompt,
                int32_t **ids, uint8_t **loss_mask, int64_t *n_ids, DlError *e) {
    Render r = {0};
    *ids = NULL;
    if (loss_mask) *loss_mask = NULL;
    *n_ids = 0;
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content || !msgs[i].role[0])
            return dl_fail(e, "message %d has no role or no content", i);
    int rc = fam == CHAT_LLAMA3 ? render_llama3(t, msgs, n, add_generation_prompt, &r, e)
                                : render_chatml(t, msgs, n, add_generation_prompt, &r, e);
    if (rc) {
        free(r.ids);
        free(r.mask);
        return -1;
    }
    *ids = r.ids;
    *n_ids = r.n;
    if (loss_mask) *loss_mask = r.mask;
    else free(r.mask);
    return 0;
}

int chat_family_for(const Tokenizer *t, ChatFamily *fam, DlError *e) {
    const char *tm = tokenizer_chat_template(t);
    if (tm && strstr(tm, "<|im_start|>")) { *fam = CHAT_CHATML; return 0; }
    if (tm && strstr(tm, "<|start_header_id|>")) { *fam = CHAT_LLAMA3; return 0; }
    if (tokenizer_token_id(t, "<|im_start|>") >= 0 && tokenizer_token_id(t, "<|im_end|>") >= 0) { *fam = CHAT_CHATML; return 0; }
    if (tokenizer_token_id(t, "<|start_header_id|>") >= 0 && tokenizer_token_id(t, "<|eot_id|>") >= 0) { *fam = CHAT_LLAMA3; return 0; }
    return dl_fail(e, "cannot tell the chat template family: the tokenizer has neither ChatML (<|im_start|>) nor "
                      "Llama-3 (<|start_header_id|>) special tokens");
}

const char *chat_family_name(ChatFamily f) { return f == CHAT_LLAMA3 ? "llama3" : "chatml"; }

int chat_family_from_name(const char *name) {
    if (!strcmp(name, "chatml")) return CHAT_CHATML;
    if (!strcmp(name, "llama3")) return CHAT_LLAMA3;
    return -1;
}
