// test_toml.c: TOML 1.0 conformance of distill/toml.c: every value kind, the tricky string and number
// forms, table/array-of-table rules, and that each invalid document fails with the right
// file:line:col: message. Also replays the fuzzer's fixed crashers (tests/fuzz/regress/toml/).
#include <dirent.h>
#include <math.h>
#include <string.h>

#include "distill/toml.h"
#include "tests/check.h"

static TomlValue *parse(const char *s, DlError *e) { return toml_parse(s, strlen(s), "t.toml", e); }

// Follows a dotted path of plain keys ("a.b.c") through tables.
static TomlValue *at(TomlValue *root, const char *path) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    TomlValue *v = root;
    for (char *save = NULL, *k = strtok_r(buf, ".", &save); k && v; k = strtok_r(NULL, ".", &save)) v = toml_get(v, k);
    return v;
}

static int ok_(const char *doc, int line) {
    DlError e = {{0}};
    TomlValue *v = parse(doc, &e);
    if (!v) {
        fprintf(stderr, "line %d: expected to parse, got: %s\n", line, e.msg);
        return 0;
    }
    toml_free(v);
    return 1;
}
#define OK(doc) CHECK(ok_(doc, __LINE__))

// The document must fail with a message that starts with "t.toml:LINE:COL: " and contains `what`.
static int bad_(const char *doc, int eline, int ecol, const char *what, int line) {
    DlError e = {{0}};
    TomlValue *v = parse(doc, &e);
    if (v) {
        fprintf(stderr, "line %d: expected an error for %s\n", line, doc);
        toml_free(v);
        return 0;
    }
    char pre[64];
    snprintf(pre, sizeof pre, "t.toml:%d:%d: ", eline, ecol);
    if (strncmp(e.msg, pre, strlen(pre)) || !strstr(e.msg, what)) {
        fprintf(stderr, "line %d: expected \"%s...%s\", got \"%s\"\n", line, pre, what, e.msg);
        return 0;
    }
    return 1;
}
#define BAD(doc, l, c, what) CHECK(bad_(doc, l, c, what, __LINE__))

static void test_scalars(void) {
    DlError e;
    TomlValue *r = parse("# comment\n"
                         "a = 1\n"
                         "b = -0x7F # no: hex has no sign\n",
                         &e);
    CHECK(r == NULL);
    r = parse("i1 = +99\ni2 = -17\ni3 = 0\ni4 = 1_000_000\nh = 0xdead_BEEF\no = 0o755\nbin = 0b1101\n"
              "max = 9223372036854775807\nmin = -9223372036854775808\n"
              "f1 = 1.0\nf2 = -3.1415\nf3 = 5e+22\nf4 = 1e06\nf5 = -2E-2\nf6 = 6.626e-34\nf7 = 224_617.445_991\n"
              "pinf = +inf\nninf = -inf\nn = nan\nz = -0.0\nt = true\nf = false\n",
              &e);
    CHECK(r != NULL);
    if (!r) {
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    CHECK_EQ_I64(at(r, "i1")->u.i, 99);
    CHECK_EQ_I64(at(r, "i2")->u.i, -17);
    CHECK_EQ_I64(at(r, "i4")->u.i, 1000000);
    CHECK_EQ_I64(at(r, "h")->u.i, 0xdeadbeefLL);
    CHECK_EQ_I64(at(r, "o")->u.i, 0755);
    CHECK_EQ_I64(at(r, "bin")->u.i, 13);
    CHECK(at(r, "max")->u.i == INT64_MAX);
    CHECK(at(r, "min")->u.i == INT64_MIN);
    CHECK(at(r, "f1")->type == TOML_FLOAT && at(r, "f1")->u.f == 1.0);
    CHECK(at(r, "f3")->u.f == 5e22);
    CHECK(at(r, "f4")->u.f == 1e6);
    CHECK(at(r, "f5")->u.f == -2e-2);
    CHECK(at(r, "f7")->u.f == 224617.445991);
    CHECK(isinf(at(r, "pinf")->u.f) && at(r, "pinf")->u.f > 0);
    CHECK(isinf(at(r, "ninf")->u.f) && at(r, "ninf")->u.f < 0);
    CHECK(isnan(at(r, "n")->u.f));
    CHECK(at(r, "z")->u.f == 0 && signbit(at(r, "z")->u.f));
    CHECK(at(r, "t")->type == TOML_BOOL && at(r, "t")->u.b);
    CHECK(!at(r, "f")->u.b);
    CHECK_EQ_I64(toml_get_kv(r, "i2")->line, 2);
    CHECK_EQ_I64(at(r, "i2")->col, 6);
    toml_free(r);

    BAD("a = 9223372036854775808\n", 1, 5, "out of range");
    BAD("a = -9223372036854775809\n", 1, 5, "out of range");
    BAD("a = 0x8000000000000000\n", 1, 5, "out of range");
    BAD("a = 1e400\n", 1, 5, "out of range");
    BAD("a = 01\n", 1, 5, "leading zeros");
    BAD("a = 1__0\n", 1, 5, "invalid value '1__0'");
    BAD("a = _1\n", 1, 5, "invalid value");
    BAD("a = 1_\n", 1, 5, "invalid value");
    BAD("a = 1.\n", 1, 5, "invalid value");
    BAD("a = .5\n", 1, 5, "invalid value");
    BAD("a = 1.e5\n", 1, 5, "invalid value");
    BAD("a = 1e\n", 1, 5, "invalid value");
    BAD("a = +0x10\n", 1, 5, "cannot have a sign");
    BAD("a = 0b102\n", 1, 5, "invalid value");
    BAD("a = TRUE\n", 1, 5, "invalid value");
    BAD("a = truex\n", 1, 5, "invalid value");
    BAD("a = 1979-05-27\n", 1, 5, "dates and times are not supported");
    BAD("a = 07:32:00\n", 1, 5, "dates and times");
    BAD("a = \n", 1, 5, "expected a value, found end of line");
    BAD("a = 1 2\n", 1, 7, "expected a newline after the value, found '2'");
    BAD("a = hello\n", 1, 5, "invalid value 'hello'");
}

static void test_strings(void) {
    DlError e;
    TomlValue *r = parse("s1 = \"tab\\there \\\"q\\\" back\\\\slash \\u00E9 \\U0001F600\"\n"
                         "s2 = 'C:\\Users\\no\\escapes'\n"
                         "s3 = \"\"\"\nline1\nline2\"\"\"\n"
                         "s4 = \"\"\"one \\\n    two \\\n\n   three\"\"\"\n"
                         "s5 = '''\nraw \\n ''quoted'' '''\n"
                         "s6 = \"\"\"ends with quote\"\"\"\"\n"
                         "s7 = \"\"\"two \"\" inside and two at the end\"\"\"\"\"\n"
                         "s8 = ''''one quote in literal''''\n"
                         "s9 = \"\"\n"
                         "s10 = \"caf\xC3\xA9\"\n",
                         &e);
    CHECK(r != NULL);
    if (!r) {
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    CHECK(!strcmp(at(r, "s1")->u.s, "tab\there \"q\" back\\slash \xC3\xA9 \xF0\x9F\x98\x80"));
    CHECK(!strcmp(at(r, "s2")->u.s, "C:\\Users\\no\\escapes"));
    CHECK(!strcmp(at(r, "s3")->u.s, "line1\nline2"));
    CHECK(!strcmp(at(r, "s4")->u.s, "one two three"));
    CHECK(!strcmp(at(r, "s5")->u.s, "raw \\n ''quoted'' "));
    CHECK(!strcmp(at(r, "s6")->u.s, "ends with quote\""));
    CHECK(!strcmp(at(r, "s7")->u.s, "two \"\" inside and two at the end\"\""));
    CHECK(!strcmp(at(r, "s8")->u.s, "'one quote in literal'"));
    CHECK(!strcmp(at(r, "s9")->u.s, ""));
    CHECK(!strcmp(at(r, "s10")->u.s, "caf\xC3\xA9"));
    toml_free(r);
    // CRLF line endings, also inside multi-line strings
    r = parse("a = \"\"\"x\r\ny\"\"\"\r\nb = 2\r\n", &e);
    CHECK(r && !strcmp(at(r, "a")->u.s, "x\ny") && at(r, "b")->u.i == 2);
    toml_free(r);

    BAD("a = \"abc\n", 1, 9, "unterminated string");
    BAD("a = \"abc", 1, 5, "unterminated string");
    BAD("a = \"\"\"abc\n\n", 1, 5, "no closing \"\"\"");
    BAD("a = \"\\x41\"\n", 1, 6, "invalid escape sequence \\x");
    BAD("a = \"\\u12\"\n", 1, 6, "needs 4 hex digits");
    BAD("a = \"\\uD800\"\n", 1, 6, "not a Unicode scalar value");
    BAD("a = \"\\U00110000\"\n", 1, 6, "not a Unicode scalar value");
    BAD("a = \"\\u0000\"\n", 1, 6, "U+0000");
    BAD("a = \"a\x01\"\n", 1, 7, "control character U+0001");
    BAD("a = 'a\x7F'\n", 1, 7, "control character U+007F");
    BAD("a = \"\"\"a\"\"\"\"\"\"\n", 1, 9, "too many quotes");
    BAD("a = \"\xC3\x28\"\n", 1, 6, "invalid UTF-8");
    BAD("a = \"\xED\xA0\x80\"\n", 1, 6, "invalid UTF-8");   // encoded surrogate
    BAD("a = \"\xC0\xAF\"\n", 1, 6, "invalid UTF-8");       // overlong
    BAD("# \x01\n", 1, 3, "control character U+0001 in a comment");
    BAD("a = 1\rb = 2\n", 1, 6, "carriage return without a line feed");
}

static void test_keys_tables(void) {
    DlError e;
    TomlValue *r = parse("title = 'x'\n"
                         "\"quoted key\" = 1\n"
                         "'lit.key' = 2\n"
                         "site.\"google.com\" = true\n"
                         "a . b . c = 3\n"
                         "a.b.d = 4\n"
                         "1234 = 'bare digits'\n"
                         "\n[tbl]\nx = 1\n"
                         "[ dog . \"tater.man\" ]\ntype.name = 'pug'\n"
                         "[x.y.z.w]\n[x]\nk = 1\n"
                         "[fruit]\napple.color = 'red'\napple.taste.sweet = true\n[fruit.apple.texture]\nsmooth = true\n",
                         &e);
    CHECK(r != NULL);
    if (!r) {
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    CHECK(toml_get(r, "quoted key")->u.i == 1);
    CHECK(toml_get(r, "lit.key")->u.i == 2);
    CHECK(toml_get(toml_get(r, "site"), "google.com")->u.b);
    CHECK(at(r, "a.b.c")->u.i == 3 && at(r, "a.b.d")->u.i == 4);
    CHECK(!strcmp(toml_get(r, "1234")->u.s, "bare digits"));
    CHECK(!strcmp(at(toml_get(at(r, "dog"), "tater.man"), "type.name")->u.s, "pug"));
    CHECK(at(r, "x.k")->u.i == 1 && at(r, "x.y.z.w") && at(r, "x.y.z.w")->type == TOML_TABLE);
    CHECK(at(r, "fruit.apple.texture.smooth")->u.b && at(r, "fruit.apple.taste.sweet")->u.b);
    CHECK_EQ_I64(at(r, "tbl")->line, 9);  // a table remembers its header line
    toml_free(r);

    BAD("a = 1\na = 2\n", 2, 1, "duplicate key 'a' (first defined at line 1 col 1)");
    BAD("a.b = 1\na.b = 2\n", 2, 3, "duplicate key 'a.b'");
    BAD("a = 1\na.b = 2\n", 2, 1, "cannot add keys to 'a': it is already integer");
    BAD("[a]\n[a]\n", 2, 1, "table [a] is defined twice");
    BAD("[a.b]\n[a]\n[a]\n", 3, 1, "defined twice");
    BAD("[a]\nb = 1\n[a.b]\n", 3, 1, "table [a.b] is defined twice: it is already integer");
    BAD("[fruit]\napple.color = 'red'\n[fruit.apple]\n", 3, 1, "already a table defined by dotted keys");
    BAD("[a.b.c]\nz = 1\n[a]\nb.c.t = 2\n", 4, 1, "cannot add keys to 'b'");
    BAD("a = {x = 1}\n[a]\n", 2, 1, "already an inline table");
    BAD("a = {x = 1}\n[a.b]\n", 2, 2, "cannot define a table under 'a': it is already an inline table");
    BAD("a = {x = 1}\na.y = 2\n", 2, 1, "cannot add keys to 'a': it is already an inline table");
    BAD("a = [1]\n[[a]]\n", 2, 1, "cannot define [[a]]: 'a' is already an array");
    BAD("[[a]]\n[a]\n", 2, 1, "already an array of tables");
    BAD("[a]\n[[a]]\n", 2, 1, "cannot define [[a]]: 'a' is already a table");
    BAD("= 1\n", 1, 1, "expected a key, found '='");
    BAD("a b = 1\n", 1, 3, "expected '=' after the key 'a', found 'b'");
    BAD("a. = 1\n", 1, 4, "expected a key");
    BAD("\"\"\"a\"\"\" = 1\n", 1, 1, "multi-line string");
    BAD("[a\n", 1, 3, "expected ']' to close the table header");
    BAD("[[a]\n", 1, 4, "expected ']]'");
    BAD("[a] b = 1\n", 1, 5, "expected a newline after the table header");
    BAD("[]\n", 1, 2, "expected a key");
}

static void test_arrays_inline(void) {
    DlError e;
    TomlValue *r = parse("a = [ 1, 2, 3 ]\n"
                         "b = [\n  'x',  # comment\n\n  \"y\", # another\n]\n"
                         "c = [ [1, 2], ['mixed', 1.5, true, {k = 1}] ]\n"
                         "d = []\n"
                         "p = { x = 1, y.z = 2, s = 'v' }\n"
                         "q = {}\n"
                         "[[stage]]\nname = 'one'\n[stage.loss]\nkl = 0.1\n"
                         "[[stage]]\nname = 'two'\n[[stage.schedule]]\nn = 1\n[[stage.schedule]]\nn = 2\n",
                         &e);
    CHECK(r != NULL);
    if (!r) {
        fprintf(stderr, "%s\n", e.msg);
        return;
    }
    CHECK_EQ_I64(at(r, "a")->u.arr.n, 3);
    CHECK(at(r, "a")->u.arr.items[2]->u.i == 3);
    CHECK_EQ_I64(at(r, "b")->u.arr.n, 2);
    CHECK(!strcmp(at(r, "b")->u.arr.items[1]->u.s, "y"));
    CHECK_EQ_I64(at(r, "b")->u.arr.items[1]->line, 5);
    TomlValue *c = at(r, "c");
    CHECK(c->u.arr.n == 2 && c->u.arr.items[1]->u.arr.n == 4 && c->u.arr.items[1]->u.arr.items[3]->type == TOML_TABLE);
    CHECK(at(r, "d")->u.arr.n == 0);
    CHECK(at(r, "p.y.z")->u.i == 2 && at(r, "q")->u.tab.n == 0);
    TomlValue *st = at(r, "stage");
    CHECK(st && st->type == TOML_ARRAY && st->u.arr.n == 2);
    if (st && st->u.arr.n == 2) {
        CHECK(at(st->u.arr.items[0], "loss.kl")->u.f == 0.1);
        CHECK(toml_get(st->u.arr.items[1], "schedule")->u.arr.n == 2);
        CHECK_EQ_I64(st->u.arr.items[1]->line, 15);
    }
    toml_free(r);

    OK("a = [\n]\n");
    OK("a = [ # c\n 1 # c\n , # c\n ] # c\n");
    OK("[[a]]\n[a.b]\nx = 1\n[[a]]\n[a.b]\nx = 2\n");  // [a.b] belongs to the latest [[a]]
    OK("[a.b]\n[[a.c]]\n[a]\nd = 1\n");
    OK("\xEF\xBB\xBF" "a = 1");                            // BOM, no final newline
    OK("");
    OK("a = {}\nb = { c = [1, {d = 'e'}] }\n");
    BAD("a = [1 2]\n", 1, 8, "expected ',' or ']' in the array that starts at line 1 col 5");
    BAD("a = [,]\n", 1, 6, "expected a value, found ','");
    BAD("a = [1,,2]\n", 1, 8, "expected a value");
    BAD("a = [1\n", 2, 1, "expected ',' or ']'");
    BAD("a = {x = 1,}\n", 1, 12, "trailing comma in an inline table");
    BAD("a = {x = 1\n}\n", 1, 11, "inline tables are one line");
    BAD("a = {x = 1, x = 2}\n", 1, 13, "duplicate key 'x'");
    BAD("a = {x.y = 1, x = 2}\n", 1, 15, "duplicate key 'x'");
    // deep nesting is rejected, not recursed into
    char deep[600];
    memset(deep, '[', sizeof deep);
    memcpy(deep, "a = ", 4);
    deep[sizeof deep - 1] = 0;
    DlError e2;
    CHECK(parse(deep, &e2) == NULL && strstr(e2.msg, "nested more than"));
}

static void test_value_and_writer(void) {
    DlError e;
    TomlValue *v = toml_parse_value("[1, 'a', {b = 2.5}]", &e);
    CHECK(v && v->type == TOML_ARRAY && v->u.arr.n == 3);
    toml_free(v);
    CHECK(toml_parse_value("1 2", &e) == NULL && strstr(e.msg, "after the value"));
    // writer output parses back to an equal tree (written again byte-identically)
    const char *doc = "a = [1, -2, 0.1, 1e+300, -0.0, inf, nan, \"q\\\"\\n\\u0001\xC3\xA9\", true, {\"x y\" = [], z = {}}]\n";
    TomlValue *r = parse(doc, &e);
    CHECK(r != NULL);
    char *out1 = NULL, *out2 = NULL;
    size_t n1 = 0, n2 = 0;
    FILE *f = open_memstream(&out1, &n1);
    fputs("a = ", f);
    toml_write_value(f, toml_get(r, "a"));
    fputc('\n', f);
    fclose(f);
    TomlValue *r2 = parse(out1, &e);
    CHECK(r2 != NULL);
    if (r2) {
        f = open_memstream(&out2, &n2);
        fputs("a = ", f);
        toml_write_value(f, toml_get(r2, "a"));
        fputc('\n', f);
        fclose(f);
        CHECK(!strcmp(out1, out2));
        CHECK(toml_get(r2, "a")->u.arr.items[2]->u.f == 0.1);
        CHECK(strstr(out1, "0.1,") != NULL);
    }
    toml_free(r);
    toml_free(r2);
    free(out1);
    free(out2);
}

// Inputs that crashed or hung the fuzzer once (after the fix they must simply parse or fail).
static void test_regressions(void) {
    const char *dir = "tests/fuzz/regress/toml";
    DIR *d = opendir(dir);
    if (!d) return;  // no crashers recorded
    int n = 0;
    for (struct dirent *de; (de = readdir(d));) {
        if (de->d_name[0] == '.') continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        size_t len = 0;
        DlError e;
        char *text = dl_read_file(path, &len, &e);
        CHECK(text != NULL);
        if (!text) continue;
        TomlValue *v = toml_parse(text, len, path, &e);
        toml_free(v);
        free(text);
        n++;
    }
    closedir(d);
    printf("replayed %d fuzz regression inputs\n", n);
    CHECK(n > 0);
}

int main(void) {
    test_scalars();
    test_strings();
    test_keys_tables();
    test_arrays_inline();
    test_value_and_writer();
    test_regressions();
    return check_report("test_toml");
}
