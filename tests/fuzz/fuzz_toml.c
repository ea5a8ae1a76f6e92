// fuzz_toml.c: libFuzzer target for the TOML parser (distill/toml.c). Any input must either parse or
// fail with a message; a parsed document is written back with the value writer, which must parse
// again and write identically (the resolved-recipe serializer relies on that round trip).
// Build: CC=clang cmake -S . -B build-fuzz -DDISTILL_FUZZ=ON && cmake --build build-fuzz --target fuzz_toml
// Run:   build-fuzz/tests/fuzz_toml -max_total_time=600 CORPUS_DIR recipes/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "distill/toml.h"

static char *write_doc(const TomlValue *root) {
    char *out = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&out, &n);
    for (int i = 0; i < root->u.tab.n; i++) {
        toml_write_key(f, root->u.tab.kv[i].key);
        fputs(" = ", f);
        toml_write_value(f, root->u.tab.kv[i].val);
        fputc('\n', f);
    }
    fclose(f);
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    DlError e;
    TomlValue *v = toml_parse((const char *)data, size, "fuzz.toml", &e);
    if (v) {
        char *a = write_doc(v);
        TomlValue *v2 = toml_parse(a, strlen(a), "roundtrip.toml", &e);
        if (!v2) {
            fprintf(stderr, "round trip failed: %s\n--- written:\n%s\n", e.msg, a);
            abort();
        }
        char *b = write_doc(v2);
        if (strcmp(a, b)) {
            fprintf(stderr, "round trip differs:\n%s\n---\n%s\n", a, b);
            abort();
        }
        free(a);
        free(b);
        toml_free(v2);
        toml_free(v);
    } else if (strncmp(e.msg, "fuzz.toml:", 10) != 0) {
        fprintf(stderr, "error without a position: %s\n", e.msg);
        abort();
    }
    // the --set value parser on the same bytes
    char *s = malloc(size + 1);
    memcpy(s, data, size);
    s[size] = 0;
    toml_free(toml_parse_value(s, &e));
    free(s);
    return 0;
}
