// toml.c: the TOML 1.0 parser and value writer (see toml.h). A hand-written recursive-descent parser
// over a byte range with line/column tracking; the first syntax error stops the parse.
#include "distill/toml.h"

#include <math.h>
#include <stdarg.h>
#include <string.h>

#define TOML_MAX_DEPTH 128  // nesting of arrays / inline tables; deeper input is rejected, not recursed

typedef struct {
    const char *p, *end;
    const char *file;
    int line, col;
    int depth;      // containers (tables, arrays) around the value being read, as the writer would nest them
    int cur_depth;  // depth of cur below the root
    DlError *e;
    bool failed;
    TomlValue *root, *cur;  // cur: the table that key/value lines go into
} P;

typedef struct {
    char *s;
    size_t n, cap;
} Buf;

static void buf_putc(Buf *b, char c) {
    if (b->n + 2 > b->cap) {
        b->cap = b->cap ? b->cap * 2 : 32;
        b->s = dl_realloc(b->s, b->cap);
    }
    b->s[b->n++] = c;
    b->s[b->n] = 0;
}

static char *buf_take(Buf *b) {
    if (!b->s) return dl_strdup("");
    return b->s;
}

static int perr_at(P *p, int line, int col, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int perr_at(P *p, int line, int col, const char *fmt, ...) {
    if (p->failed) return -1;
    p->failed = true;
    char msg[DL_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return dl_fail(p->e, "%s:%d:%d: %s", p->file, line, col, msg);
}
#define perr(p, ...) perr_at((p), (p)->line, (p)->col, __VA_ARGS__)

static bool eof(const P *p) { return p->p >= p->end; }
static int peek(const P *p) { return p->p < p->end ? (unsigned char)*p->p : -1; }
static int peek_at(const P *p, size_t k) { return p->p + k < p->end ? (unsigned char)p->p[k] : -1; }

static void adv(P *p) {
    if (p->p >= p->end) return;
    unsigned char c = (unsigned char)*p->p++;
    if (c == '\n') {
        p->line++;
        p->col = 1;
    } else if ((c & 0xC0) != 0x80) {
        p->col++;  // columns count characters, not bytes
    }
}

static bool starts(const P *p, const char *s) {
    size_t n = strlen(s);
    return (size_t)(p->end - p->p) >= n && memcmp(p->p, s, n) == 0;
}

// Printable description of the character at p, for messages ("'x'", "end of file", "newline").
static const char *describe(const P *p, char *buf, size_t n) {
    int c = peek(p);
    if (c < 0) return "end of file";
    if (c == '\n' || (c == '\r' && peek_at(p, 1) == '\n')) return "end of line";
    if (c == '\r') return "a carriage return without a line feed";
    if (c < 0x20 || c == 0x7F) {
        snprintf(buf, n, "control character U+%04X", c);
        return buf;
    }
    if (c >= 0x80) return "a non-ASCII character";
    snprintf(buf, n, "'%c'", c);
    return buf;
}

static void skip_ws(P *p) {
    while (peek(p) == ' ' || peek(p) == '\t') adv(p);
}

static int skip_comment(P *p) {
    // at '#': comments run to the end of the line and may not hold control characters (tab is fine)
    while (!eof(p) && peek(p) != '\n') {
        int c = peek(p);
        if (c == '\r' && peek_at(p, 1) == '\n') break;
        if ((c < 0x20 && c != '\t') || c == 0x7F) return perr(p, "control character U+%04X in a comment", c);
        adv(p);
    }
    return 0;
}

// Whitespace, newlines and comments (inside arrays).
static int skip_ws_nl(P *p) {
    for (;;) {
        int c = peek(p);
        if (c == ' ' || c == '\t' || c == '\n') adv(p);
        else if (c == '\r' && peek_at(p, 1) == '\n') {
            adv(p);
            adv(p);
        } else if (c == '#') {
            if (skip_comment(p)) return -1;
        } else return 0;
    }
}

// After a key/value or a header: spaces, an optional comment, then a newline or the end of the file.
static int expect_eol(P *p, const char *after) {
    skip_ws(p);
    if (peek(p) == '#' && skip_comment(p)) return -1;
    if (eof(p)) return 0;
    if (peek(p) == '\n') {
        adv(p);
        return 0;
    }
    if (peek(p) == '\r' && peek_at(p, 1) == '\n') {
        adv(p);
        adv(p);
        return 0;
    }
    char b[48];
    return perr(p, "expected a newline after %s, found %s", after, describe(p, b, sizeof b));
}

// ---------------------------------------------------------------------------------------------- values

TomlValue *toml_new(TomlType type) {
    TomlValue *v = dl_calloc(1, sizeof *v);
    v->type = type;
    return v;
}

TomlValue *toml_new_string(const char *s) {
    TomlValue *v = toml_new(TOML_STRING);
    v->u.s = dl_strdup(s);
    return v;
}

void toml_free(TomlValue *v) {
    if (!v) return;
    if (v->type == TOML_STRING) free(v->u.s);
    else if (v->type == TOML_ARRAY) {
        for (int i = 0; i < v->u.arr.n; i++) toml_free(v->u.arr.items[i]);
        free(v->u.arr.items);
    } else if (v->type == TOML_TABLE) {
        for (int i = 0; i < v->u.tab.n; i++) {
            free(v->u.tab.kv[i].key);
            toml_free(v->u.tab.kv[i].val);
        }
        free(v->u.tab.kv);
    }
    free(v);
}

const TomlKv *toml_get_kv(const TomlValue *t, const char *key) {
    if (!t || t->type != TOML_TABLE) return NULL;
    for (int i = 0; i < t->u.tab.n; i++)
        if (strcmp(t->u.tab.kv[i].key, key) == 0) return &t->u.tab.kv[i];
    return NULL;
}

TomlValue *toml_get(const TomlValue *t, const char *key) {
    const TomlKv *kv = toml_get_kv(t, key);
    return kv ? kv->val : NULL;
}

static TomlKv *table_add(TomlValue *t, const char *key, int line, int col, TomlValue *v) {
    if (t->u.tab.n == t->u.tab.cap) {
        t->u.tab.cap = t->u.tab.cap ? 2 * t->u.tab.cap : 8;
        t->u.tab.kv = dl_realloc(t->u.tab.kv, (size_t)t->u.tab.cap * sizeof(TomlKv));
    }
    TomlKv *kv = &t->u.tab.kv[t->u.tab.n++];
    kv->key = dl_strdup(key);
    kv->line = line;
    kv->col = col;
    kv->val = v;
    return kv;
}

TomlKv *toml_table_set(TomlValue *t, const char *key, TomlValue *v) {
    for (int i = 0; i < t->u.tab.n; i++)
        if (strcmp(t->u.tab.kv[i].key, key) == 0) {
            toml_free(t->u.tab.kv[i].val);
            t->u.tab.kv[i].val = v;
            return &t->u.tab.kv[i];
        }
    return table_add(t, key, v->line, v->col, v);
}

void toml_array_push(TomlValue *a, TomlValue *v) {
    if (a->u.arr.n == a->u.arr.cap) {
        a->u.arr.cap = a->u.arr.cap ? 2 * a->u.arr.cap : 4;
        a->u.arr.items = dl_realloc(a->u.arr.items, (size_t)a->u.arr.cap * sizeof(TomlValue *));
    }
    a->u.arr.items[a->u.arr.n++] = v;
}

const char *toml_type_name(TomlType t) {
    switch (t) {
    case TOML_STRING: return "string";
    case TOML_INT: return "integer";
    case TOML_FLOAT: return "float";
    case TOML_BOOL: return "boolean";
    case TOML_ARRAY: return "array";
    case TOML_TABLE: return "table";
    }
    return "?";
}

// Describes an existing value for redefinition errors.
static const char *what_is(const TomlValue *v) {
    if (v->type == TOML_TABLE) {
        if (v->flags & TOML_T_INLINE) return "an inline table";
        if (v->flags & TOML_T_DOTTED) return "a table defined by dotted keys";
        return "a table";
    }
    if (v->type == TOML_ARRAY) return (v->flags & TOML_A_TABLES) ? "an array of tables" : "an array";
    return toml_type_name(v->type);
}

// ---------------------------------------------------------------------------------------------- strings

static void put_utf8(Buf *b, uint32_t cp) {
    if (cp < 0x80) buf_putc(b, (char)cp);
    else if (cp < 0x800) {
        buf_putc(b, (char)(0xC0 | (cp >> 6)));
        buf_putc(b, (char)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        buf_putc(b, (char)(0xE0 | (cp >> 12)));
        buf_putc(b, (char)(0x80 | ((cp >> 6) & 0x3F)));
        buf_putc(b, (char)(0x80 | (cp & 0x3F)));
    } else {
        buf_putc(b, (char)(0xF0 | (cp >> 18)));
        buf_putc(b, (char)(0x80 | ((cp >> 12) & 0x3F)));
        buf_putc(b, (char)(0x80 | ((cp >> 6) & 0x3F)));
        buf_putc(b, (char)(0x80 | (cp & 0x3F)));
    }
}

// At the character after a backslash in a basic string.
static int read_escape(P *p, Buf *b) {
    int line = p->line, col = p->col - 1;
    int c = peek(p);
    const char *simple = "b\bt\tn\nf\fr\r\"\"\\\\";
    for (const char *s = simple; *s; s += 2)
        if (c == s[0]) {
            buf_putc(b, s[1]);
            adv(p);
            return 0;
        }
    if (c == 'u' || c == 'U') {
        int nd = c == 'u' ? 4 : 8;
        adv(p);
        uint32_t cp = 0;
        for (int k = 0; k < nd; k++) {
            int h = peek(p);
            int d = (h >= '0' && h <= '9') ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
            if (d < 0) return perr_at(p, line, col, "escape \\%c needs %d hex digits", c, nd);
            cp = cp * 16 + (uint32_t)d;
            adv(p);
        }
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return perr_at(p, line, col, "escape \\%c%0*X is not a Unicode scalar value", c, nd, cp);
        if (cp == 0) return perr_at(p, line, col, "U+0000 in a string is not supported");
        put_utf8(b, cp);
        return 0;
    }
    char d[48];
    return perr_at(p, line, col, "invalid escape sequence \\%s in a string (valid: \\b \\t \\n \\f \\r \\\" \\\\ \\uXXXX \\UXXXXXXXX)",
                   c >= 0x21 && c < 0x7F ? (char[2]){(char)c, 0} : describe(p, d, sizeof d));
}

static int check_str_char(P *p, int c, bool multiline) {
    if (c == '\t' || (c >= 0x20 && c != 0x7F)) return 0;
    if (multiline && c == '\n') return 0;
    if (multiline && c == '\r' && peek_at(p, 1) == '\n') return 0;
    if (multiline && c == '\r') return perr(p, "carriage return without a line feed in a string");
    if (c == '\n' || c == '\r') return perr(p, "unterminated string (strings in \"...\" or '...' end on the same line)");
    return perr(p, "control character U+%04X in a string (write it as an escape)", c);
}

// p at the opening quote. Handles "...", '...', """...""" and '''...'''.
static char *read_string(P *p) {
    int line = p->line, col = p->col;
    char q = (char)peek(p);
    bool literal = q == '\'';
    bool ml = starts(p, literal ? "'''" : "\"\"\"");
    Buf b = {0};
    if (ml) {
        adv(p);
        adv(p);
        adv(p);
        // a newline right after the opening delimiter is trimmed
        if (peek(p) == '\n') adv(p);
        else if (peek(p) == '\r' && peek_at(p, 1) == '\n') {
            adv(p);
            adv(p);
        }
    } else adv(p);
    for (;;) {
        if (eof(p)) {
            perr_at(p, line, col, "unterminated string (no closing %s)", ml ? (literal ? "'''" : "\"\"\"") : (literal ? "'" : "\""));
            goto fail;
        }
        int c = peek(p);
        if (c == q) {
            if (!ml) {
                adv(p);
                break;
            }
            int n = 0;
            while (peek_at(p, (size_t)n) == q) n++;
            if (n >= 3) {
                if (n > 5) {
                    perr(p, "too many quotes at the end of a multi-line string");
                    goto fail;
                }
                for (int k = 0; k < n - 3; k++) buf_putc(&b, q);
                for (int k = 0; k < n; k++) adv(p);
                break;
            }
            for (int k = 0; k < n; k++) {
                buf_putc(&b, q);
                adv(p);
            }
            continue;
        }
        if (c == '\\' && !literal) {
            adv(p);
            if (ml) {
                // line-ending backslash: skip whitespace up to and over the newline(s)
                const char *s = p->p;
                while (s < p->end && (*s == ' ' || *s == '\t')) s++;
                if (s < p->end && (*s == '\n' || (*s == '\r' && s + 1 < p->end && s[1] == '\n'))) {
                    while (peek(p) == ' ' || peek(p) == '\t' || peek(p) == '\n' || (peek(p) == '\r' && peek_at(p, 1) == '\n'))
                        adv(p);
                    continue;
                }
            }
            if (read_escape(p, &b)) goto fail;
            continue;
        }
        if (check_str_char(p, c, ml)) goto fail;
        if (c == '\r') {  // CRLF inside a multi-line string becomes LF
            adv(p);
            continue;
        }
        buf_putc(&b, (char)c);
        adv(p);
    }
    return buf_take(&b);
fail:
    free(b.s);
    return NULL;
}

// ---------------------------------------------------------------------------------------------- keys

typedef struct {
    char *s;
    int line, col;
} KeyPart;

typedef struct {
    KeyPart *v;
    int n, cap;
} Key;

static void key_free(Key *k) {
    for (int i = 0; i < k->n; i++) free(k->v[i].s);
    free(k->v);
    k->v = NULL;
    k->n = k->cap = 0;
}

static bool is_bare(int c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

// A possibly dotted key: part ( ws '.' ws part )*
static int read_key(P *p, Key *k) {
    for (;;) {
        if (k->n == k->cap) {
            k->cap = k->cap ? 2 * k->cap : 4;
            k->v = dl_realloc(k->v, (size_t)k->cap * sizeof(KeyPart));
        }
        KeyPart *kp = &k->v[k->n];
        kp->line = p->line;
        kp->col = p->col;
        int c = peek(p);
        if (c == '"' || c == '\'') {
            if (starts(p, "\"\"\"") || starts(p, "'''")) return perr(p, "a key cannot be a multi-line string");
            kp->s = read_string(p);
            if (!kp->s) return -1;
        } else if (is_bare(c)) {
            Buf b = {0};
            while (is_bare(peek(p))) {
                buf_putc(&b, (char)peek(p));
                adv(p);
            }
            kp->s = buf_take(&b);
        } else {
            char d[48];
            return perr(p, "expected a key, found %s", describe(p, d, sizeof d));
        }
        k->n++;
        skip_ws(p);
        if (peek(p) != '.') return 0;
        adv(p);
        skip_ws(p);
    }
}

// ---------------------------------------------------------------------------------------------- numbers

static bool is_digit_b(int c, int base) {
    if (base == 16) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    if (base == 8) return c >= '0' && c <= '7';
    if (base == 2) return c == '0' || c == '1';
    return c >= '0' && c <= '9';
}

// Checks "digit (_? digit)*" over s[0..n) in base and copies the digits (no underscores) into out.
static bool digits_ok(const char *s, size_t n, int base, Buf *out) {
    if (n == 0) return false;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '_') {
            if (i == 0 || i + 1 == n || s[i + 1] == '_') return false;
            continue;
        }
        if (!is_digit_b((unsigned char)s[i], base)) return false;
        buf_putc(out, s[i]);
    }
    return true;
}

// p at the first character of a number, inf, nan, or a date (rejected).
static TomlValue *read_number(P *p) {
    int line = p->line, col = p->col;
    const char *s = p->p;
    size_t n = 0;
    while (s + n < p->end && (is_bare((unsigned char)s[n]) || s[n] == '+' || s[n] == '.' || s[n] == ':')) n++;
    // dates (1979-05-27) and times (07:32:00) are TOML but no recipe needs them
    if ((n >= 5 && is_digit_b(s[0], 10) && is_digit_b(s[1], 10) && is_digit_b(s[2], 10) && is_digit_b(s[3], 10) && s[4] == '-') ||
        (n >= 3 && is_digit_b(s[0], 10) && is_digit_b(s[1], 10) && s[2] == ':')) {
        perr(p, "dates and times are not supported in recipes (write the value as a string)");
        return NULL;
    }
    char tok[80];
    size_t tn = n < sizeof tok - 1 ? n : sizeof tok - 1;
    memcpy(tok, s, tn);
    tok[tn] = 0;
    for (size_t k = 0; k < n; k++) adv(p);

    TomlValue *v = NULL;
    Buf b = {0};
    size_t i = 0;
    bool neg = false, signed_ = false;
    if (n && (s[0] == '+' || s[0] == '-')) {
        neg = s[0] == '-';
        signed_ = true;
        i = 1;
    }
    const char *r = s + i;
    size_t rn = n - i;
    if (rn == 3 && (!memcmp(r, "inf", 3) || !memcmp(r, "nan", 3))) {
        v = toml_new(TOML_FLOAT);
        v->u.f = r[0] == 'i' ? (neg ? -INFINITY : INFINITY) : NAN;
        goto done;
    }
    if (rn > 2 && r[0] == '0' && (r[1] == 'x' || r[1] == 'o' || r[1] == 'b')) {
        int base = r[1] == 'x' ? 16 : r[1] == 'o' ? 8 : 2;
        if (signed_) goto bad_sign;
        if (!digits_ok(r + 2, rn - 2, base, &b)) goto bad;
        uint64_t acc = 0;
        for (size_t k = 0; k < b.n; k++) {
            int c = (unsigned char)b.s[k];
            int d = c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
            if (acc > (UINT64_MAX - (uint64_t)d) / (uint64_t)base || acc * base + d > (uint64_t)INT64_MAX) goto range;
            acc = acc * base + (uint64_t)d;
        }
        v = toml_new(TOML_INT);
        v->u.i = (int64_t)acc;
        goto done;
    }
    // decimal: int part, optional fraction, optional exponent
    size_t k = 0;
    while (k < rn && (is_digit_b(r[k], 10) || r[k] == '_')) k++;
    size_t int_len = k;
    if (int_len == 0) goto bad;
    if (r[0] == '0' && int_len > 1) {
        perr_at(p, line, col, "leading zeros are not allowed in '%s'", tok);
        goto fail;
    }
    if (signed_) buf_putc(&b, neg ? '-' : '+');
    if (!digits_ok(r, int_len, 10, &b)) goto bad;
    bool is_float = false;
    if (k < rn && r[k] == '.') {
        is_float = true;
        buf_putc(&b, '.');
        size_t f0 = ++k;
        while (k < rn && (is_digit_b(r[k], 10) || r[k] == '_')) k++;
        if (!digits_ok(r + f0, k - f0, 10, &b)) goto bad;
    }
    if (k < rn && (r[k] == 'e' || r[k] == 'E')) {
        is_float = true;
        buf_putc(&b, 'e');
        k++;
        if (k < rn && (r[k] == '+' || r[k] == '-')) buf_putc(&b, r[k++]);
        size_t e0 = k;
        while (k < rn && (is_digit_b(r[k], 10) || r[k] == '_')) k++;
        if (!digits_ok(r + e0, k - e0, 10, &b)) goto bad;
    }
    if (k != rn) goto bad;
    if (is_float) {
        char *endp = NULL;
        double f = strtod(b.s, &endp);
        if (!endp || *endp) goto bad;
        if (isinf(f)) goto range;
        v = toml_new(TOML_FLOAT);
        v->u.f = f;
    } else {
        // accumulate negatively so INT64_MIN parses
        int64_t acc = 0;
        for (const char *d = b.s + (signed_ ? 1 : 0); *d; d++) {
            int dv = *d - '0';
            if (acc < (INT64_MIN + dv) / 10) goto range;
            acc = acc * 10 - dv;
        }
        if (!neg) {
            if (acc == INT64_MIN) goto range;
            acc = -acc;
        }
        v = toml_new(TOML_INT);
        v->u.i = acc;
    }
done:
    free(b.s);
    v->line = line;
    v->col = col;
    return v;
bad_sign:
    perr_at(p, line, col, "'%s': hexadecimal, octal and binary integers cannot have a sign", tok);
    goto fail;
range:
    perr_at(p, line, col, "'%s' is out of range (integers are 64-bit; floats must be finite unless written inf)", tok);
    goto fail;
bad:
    if (n == 0) {
        char d[48];
        perr_at(p, line, col, "expected a value, found %s", describe(p, d, sizeof d));
    } else
        perr_at(p, line, col, "invalid value '%s' (expected a number, true/false, a \"string\", [array] or {table})", tok);
fail:
    free(b.s);
    return NULL;
}

// ---------------------------------------------------------------------------------------------- tables

static int keyval(P *p, TomlValue *table);

static TomlValue *read_value(P *p);

static TomlValue *read_array(P *p) {
    TomlValue *a = toml_new(TOML_ARRAY);
    a->line = p->line;
    a->col = p->col;
    a->flags = TOML_A_STATIC;
    adv(p);  // [
    for (;;) {
        if (skip_ws_nl(p)) goto fail;
        if (peek(p) == ']') {
            adv(p);
            return a;
        }
        TomlValue *v = read_value(p);
        if (!v) goto fail;
        toml_array_push(a, v);
        if (skip_ws_nl(p)) goto fail;
        if (peek(p) == ',') {
            adv(p);
            continue;
        }
        if (peek(p) == ']') {
            adv(p);
            return a;
        }
        char d[48];
        perr(p, "expected ',' or ']' in the array that starts at line %d col %d, found %s", a->line, a->col, describe(p, d, sizeof d));
        goto fail;
    }
fail:
    toml_free(a);
    return NULL;
}

static void seal(TomlValue *t) {
    if (t->type != TOML_TABLE) return;
    t->flags |= TOML_T_INLINE;
    for (int i = 0; i < t->u.tab.n; i++) seal(t->u.tab.kv[i].val);
}

static TomlValue *read_inline_table(P *p) {
    TomlValue *t = toml_new(TOML_TABLE);
    t->line = p->line;
    t->col = p->col;
    adv(p);  // {
    skip_ws(p);
    if (peek(p) == '}') {
        adv(p);
        seal(t);
        return t;
    }
    for (;;) {
        skip_ws(p);
        if (keyval(p, t)) goto fail;
        skip_ws(p);
        if (peek(p) == ',') {
            adv(p);
            skip_ws(p);
            if (peek(p) == '}') {
                perr(p, "trailing comma in an inline table (TOML 1.0 does not allow it)");
                goto fail;
            }
            continue;
        }
        if (peek(p) == '}') {
            adv(p);
            seal(t);
            return t;
        }
        char d[48];
        perr(p, "expected ',' or '}' in the inline table that starts at line %d col %d, found %s (inline tables are one line)",
             t->line, t->col, describe(p, d, sizeof d));
        goto fail;
    }
fail:
    toml_free(t);
    return NULL;
}

static TomlValue *read_value(P *p) {
    if (++p->depth > TOML_MAX_DEPTH) {
        perr(p, "arrays and inline tables nested more than %d deep", TOML_MAX_DEPTH);
        return NULL;
    }
    int line = p->line, col = p->col;
    int c = peek(p);
    TomlValue *v = NULL;
    if (c == '"' || c == '\'') {
        char *s = read_string(p);
        if (s) {
            v = toml_new(TOML_STRING);
            v->u.s = s;
        }
    } else if (c == '[') v = read_array(p);
    else if (c == '{') v = read_inline_table(p);
    else if (starts(p, "true") && !is_bare(peek_at(p, 4))) {
        for (int k = 0; k < 4; k++) adv(p);
        v = toml_new(TOML_BOOL);
        v->u.b = true;
    } else if (starts(p, "false") && !is_bare(peek_at(p, 5))) {
        for (int k = 0; k < 5; k++) adv(p);
        v = toml_new(TOML_BOOL);
        v->u.b = false;
    } else v = read_number(p);
    p->depth--;
    if (v) {
        v->line = line;
        v->col = col;
    }
    return v;
}

static char *key_str(const Key *k, int upto, char *buf, size_t n) {
    size_t o = 0;
    buf[0] = 0;
    for (int i = 0; i < upto && o < n; i++) o += (size_t)snprintf(buf + o, n - o, "%s%s", i ? "." : "", k->v[i].s);
    return buf;
}

// key = value into table (the current table, or an inline table being read).
static int keyval(P *p, TomlValue *table) {
    Key k = {0};
    if (read_key(p, &k)) goto fail;
    skip_ws(p);
    if (peek(p) != '=') {
        char d[48];
        perr(p, "expected '=' after the key '%s', found %s", k.v[k.n - 1].s, describe(p, d, sizeof d));
        goto fail;
    }
    adv(p);
    skip_ws(p);
    int saved_depth = p->depth;
    p->depth += k.n - 1;  // each dotted segment is one more table level
    TomlValue *v = p->depth >= TOML_MAX_DEPTH ? NULL : read_value(p);
    p->depth = saved_depth;
    if (!v) {
        if (saved_depth + k.n - 1 >= TOML_MAX_DEPTH) perr(p, "tables nested more than %d deep", TOML_MAX_DEPTH);
        goto fail;
    }
    // walk the dotted prefix: only tables made by dotted keys (in this same table) may be extended
    TomlValue *t = table;
    char kb[512];
    for (int i = 0; i + 1 < k.n; i++) {
        TomlValue *sub = toml_get(t, k.v[i].s);
        if (!sub) {
            sub = toml_new(TOML_TABLE);
            sub->flags = TOML_T_DOTTED;
            sub->line = k.v[i].line;
            sub->col = k.v[i].col;
            table_add(t, k.v[i].s, k.v[i].line, k.v[i].col, sub);
        } else if (sub->type != TOML_TABLE || !(sub->flags & TOML_T_DOTTED) || (sub->flags & TOML_T_INLINE)) {
            perr_at(p, k.v[i].line, k.v[i].col, "cannot add keys to '%s': it is already %s (line %d)",
                    key_str(&k, i + 1, kb, sizeof kb), what_is(sub), sub->line);
            toml_free(v);
            goto fail;
        }
        t = sub;
    }
    KeyPart *last = &k.v[k.n - 1];
    const TomlKv *old = toml_get_kv(t, last->s);
    if (old) {
        perr_at(p, last->line, last->col, "duplicate key '%s' (first defined at line %d col %d)", key_str(&k, k.n, kb, sizeof kb),
                old->line, old->col);
        toml_free(v);
        goto fail;
    }
    table_add(t, last->s, last->line, last->col, v);
    key_free(&k);
    return 0;
fail:
    key_free(&k);
    return -1;
}

// [a.b.c] or [[a.b.c]]
static int header(P *p) {
    int line = p->line, col = p->col;
    bool aot = starts(p, "[[");
    adv(p);
    if (aot) adv(p);
    skip_ws(p);
    Key k = {0};
    char kb[512];
    if (read_key(p, &k)) goto fail;
    skip_ws(p);
    if (aot ? !starts(p, "]]") : peek(p) != ']') {
        char d[48];
        perr(p, "expected '%s' to close the table header, found %s", aot ? "]]" : "]", describe(p, d, sizeof d));
        goto fail;
    }
    adv(p);
    if (aot) adv(p);
    TomlValue *t = p->root;
    int depth = 0;
    for (int i = 0; i + 1 < k.n; i++) {
        TomlValue *sub = toml_get(t, k.v[i].s);
        depth += sub && sub->type == TOML_ARRAY ? 2 : 1;
        if (!sub) {
            sub = toml_new(TOML_TABLE);
            sub->flags = TOML_T_IMPLICIT;
            sub->line = line;
            sub->col = col;
            table_add(t, k.v[i].s, k.v[i].line, k.v[i].col, sub);
        } else if (sub->type == TOML_ARRAY && (sub->flags & TOML_A_TABLES)) {
            sub = sub->u.arr.items[sub->u.arr.n - 1];
        } else if (sub->type != TOML_TABLE || (sub->flags & TOML_T_INLINE)) {
            perr_at(p, k.v[i].line, k.v[i].col, "cannot define a table under '%s': it is already %s (line %d)",
                    key_str(&k, i + 1, kb, sizeof kb), what_is(sub), sub->line);
            goto fail;
        }
        t = sub;
    }
    KeyPart *last = &k.v[k.n - 1];
    TomlValue *old = toml_get(t, last->s);
    depth += aot ? 2 : 1;
    if (depth >= TOML_MAX_DEPTH) {
        perr_at(p, line, col, "tables nested more than %d deep", TOML_MAX_DEPTH);
        goto fail;
    }
    p->cur_depth = depth;
    if (aot) {
        TomlValue *arr = old;
        if (!arr) {
            arr = toml_new(TOML_ARRAY);
            arr->flags = TOML_A_TABLES;
            arr->line = line;
            arr->col = col;
            table_add(t, last->s, last->line, last->col, arr);
        } else if (!(arr->type == TOML_ARRAY && (arr->flags & TOML_A_TABLES))) {
            perr_at(p, line, col, "cannot define [[%s]]: '%s' is already %s (line %d)", key_str(&k, k.n, kb, sizeof kb), last->s,
                    what_is(arr), arr->line);
            goto fail;
        }
        TomlValue *nt = toml_new(TOML_TABLE);
        nt->flags = TOML_T_HEADER;
        nt->line = line;
        nt->col = col;
        toml_array_push(arr, nt);
        p->cur = nt;
    } else if (!old) {
        TomlValue *nt = toml_new(TOML_TABLE);
        nt->flags = TOML_T_HEADER;
        nt->line = line;
        nt->col = col;
        table_add(t, last->s, last->line, last->col, nt);
        p->cur = nt;
    } else if (old->type == TOML_TABLE && old->flags == TOML_T_IMPLICIT) {
        old->flags = TOML_T_HEADER;
        old->line = line;
        old->col = col;
        p->cur = old;
    } else {
        perr_at(p, line, col, "table [%s] is defined twice: it is already %s (line %d)", key_str(&k, k.n, kb, sizeof kb),
                what_is(old), old->line);
        goto fail;
    }
    key_free(&k);
    return expect_eol(p, "the table header");
fail:
    key_free(&k);
    return -1;
}

// TOML files are UTF-8; reject anything else up front with its position.
static int check_utf8(P *p) {
    const unsigned char *s = (const unsigned char *)p->p, *end = (const unsigned char *)p->end;
    int line = 1, col = 1;
    while (s < end) {
        unsigned c = *s;
        int n = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : -1;
        if (n < 0 || end - s <= n) return perr_at(p, line, col, "invalid UTF-8 byte 0x%02X", c);
        uint32_t cp = n == 0 ? c : n == 1 ? (c & 0x1F) : n == 2 ? (c & 0x0F) : (c & 0x07);
        for (int k = 1; k <= n; k++) {
            if ((s[k] & 0xC0) != 0x80) return perr_at(p, line, col, "invalid UTF-8 sequence");
            cp = (cp << 6) | (s[k] & 0x3F);
        }
        static const uint32_t minv[4] = {0, 0x80, 0x800, 0x10000};
        if (cp < minv[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return perr_at(p, line, col, "invalid UTF-8 sequence (overlong or not a scalar value)");
        if (c == '\n') {
            line++;
            col = 1;
        } else col++;
        s += n + 1;
    }
    return 0;
}

TomlValue *toml_parse(const char *text, size_t len, const char *filename, DlError *e) {
    P p = {.p = text, .end = text + len, .file = filename ? filename : "<input>", .line = 1, .col = 1, .e = e};
    p.root = toml_new(TOML_TABLE);
    p.root->flags = TOML_T_HEADER;
    p.cur = p.root;
    if (check_utf8(&p)) goto fail;
    // a UTF-8 byte order mark is allowed at the start
    if (starts(&p, "\xEF\xBB\xBF")) p.p += 3;
    while (!eof(&p)) {
        skip_ws(&p);
        int c = peek(&p);
        if (c < 0) break;
        if (c == '#') {
            if (skip_comment(&p) || expect_eol(&p, "the comment")) goto fail;
        } else if (c == '\n' || c == '\r') {
            if (expect_eol(&p, "")) goto fail;
        } else if (c == '[') {
            if (header(&p)) goto fail;
        } else {
            p.depth = p.cur_depth;
            if (keyval(&p, p.cur) || expect_eol(&p, "the value")) goto fail;
        }
    }
    return p.root;
fail:
    toml_free(p.root);
    return NULL;
}

TomlValue *toml_parse_file(const char *path, DlError *e) {
    size_t len = 0;
    char *text = dl_read_file(path, &len, e);
    if (!text) return NULL;
    TomlValue *v = toml_parse(text, len, path, e);
    free(text);
    return v;
}

TomlValue *toml_parse_value(const char *text, DlError *e) {
    P p = {.p = text, .end = text + strlen(text), .file = "value", .line = 1, .col = 1, .e = e};
    p.root = toml_new(TOML_TABLE);  // keeps the inline-table code happy; unused otherwise
    TomlValue *v = NULL;
    if (check_utf8(&p)) goto done;
    skip_ws(&p);
    v = read_value(&p);
    if (v) {
        skip_ws(&p);
        if (!eof(&p)) {
            char d[48];
            perr(&p, "unexpected %s after the value", describe(&p, d, sizeof d));
            toml_free(v);
            v = NULL;
        }
    }
done:
    toml_free(p.root);
    return v;
}

// ---------------------------------------------------------------------------------------------- writing

void toml_write_key(FILE *f, const char *key) {
    bool bare = key[0] != 0;
    for (const char *c = key; *c; c++)
        if (!is_bare((unsigned char)*c)) bare = false;
    if (bare) fputs(key, f);
    else toml_write_string(f, key);
}

void toml_write_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        switch (*c) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\t': fputs("\\t", f); break;
        case '\r': fputs("\\r", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        default:
            if (*c < 0x20 || *c == 0x7F) fprintf(f, "\\u%04X", *c);
            else fputc(*c, f);
        }
    }
    fputc('"', f);
}

void toml_write_value(FILE *f, const TomlValue *v) {
    switch (v->type) {
    case TOML_STRING: toml_write_string(f, v->u.s); break;
    case TOML_INT: fprintf(f, "%lld", (long long)v->u.i); break;
    case TOML_BOOL: fputs(v->u.b ? "true" : "false", f); break;
    case TOML_FLOAT: {
        double x = v->u.f;
        if (isnan(x)) fputs("nan", f);
        else if (isinf(x)) fputs(x < 0 ? "-inf" : "inf", f);
        else {
            // shortest form that reads back to the same double, always with a '.' or an exponent
            char b[40];
            for (int prec = 1; prec <= 17; prec++) {
                snprintf(b, sizeof b, "%.*g", prec, x);
                if (strtod(b, NULL) == x) break;
            }
            fputs(b, f);
            if (!strpbrk(b, ".eE")) fputs(".0", f);
        }
        break;
    }
    case TOML_ARRAY:
        fputc('[', f);
        for (int i = 0; i < v->u.arr.n; i++) {
            if (i) fputs(", ", f);
            toml_write_value(f, v->u.arr.items[i]);
        }
        fputc(']', f);
        break;
    case TOML_TABLE:
        fputc('{', f);
        for (int i = 0; i < v->u.tab.n; i++) {
            fputs(i ? ", " : " ", f);
            toml_write_key(f, v->u.tab.kv[i].key);
            fputs(" = ", f);
            toml_write_value(f, v->u.tab.kv[i].val);
        }
        fputs(v->u.tab.n ? " }" : "}", f);
        break;
    }
}
