// toml.h: a TOML 1.0 parser for recipes. It builds a tree of values that remembers where each key and
// value was written (line, column), so the recipe validator can report every problem as
// `file:line:col: message`.
//
// Supported: tables, arrays of tables, dotted and quoted keys, inline tables, basic and literal strings
// (single- and multi-line, all escapes incl. \u and \U), integers (decimal, 0x, 0o, 0b, underscores),
// floats (fraction, exponent, inf, nan), booleans, arrays (mixed types, newlines, trailing comma),
// comments. Duplicate keys and table redefinitions are errors, as the spec says.
// Not supported (a clear error instead): dates and times, and strings containing U+0000.
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"

typedef enum { TOML_STRING, TOML_INT, TOML_FLOAT, TOML_BOOL, TOML_ARRAY, TOML_TABLE } TomlType;

typedef struct TomlValue TomlValue;

typedef struct {
    char *key;       // unescaped key (one segment of a dotted key)
    int line, col;   // where the key segment was written
    TomlValue *val;
} TomlKv;

// How a table came to exist; decides which later definitions are legal (TOML 1.0 §Table).
enum {
    TOML_T_IMPLICIT = 1,  // created as a parent of a [a.b.c] header; may be defined once later
    TOML_T_HEADER = 2,    // defined by a [header] (or as an element of [[array]])
    TOML_T_DOTTED = 4,    // created by a dotted key (a.b = 1); no [header] may define it
    TOML_T_INLINE = 8,    // an inline table { ... }: sealed, nothing may be added later
};
enum { TOML_A_STATIC = 1, TOML_A_TABLES = 2 };  // array flags: a literal [ ... ] or an array of tables

struct TomlValue {
    TomlType type;
    int line, col;       // where the value (or the header of a table) starts; 0 if made by the program
    const char *origin;  // NULL: from the parsed file; else a label (e.g. "--set optimizer.lr=1e-4")
    int flags;
    union {
        char *s;     // TOML_STRING (NUL-terminated UTF-8)
        int64_t i;   // TOML_INT
        double f;    // TOML_FLOAT
        bool b;      // TOML_BOOL
        struct {
            TomlValue **items;
            int n, cap;
        } arr;       // TOML_ARRAY
        struct {
            TomlKv *kv;
            int n, cap;
        } tab;       // TOML_TABLE, keys in the order written
    } u;
};

// Parses text[0..len) (need not be NUL-terminated). filename is used in error messages only.
// Returns the root table, or NULL with e = "file:line:col: message".
TomlValue *toml_parse(const char *text, size_t len, const char *filename, DlError *e);
TomlValue *toml_parse_file(const char *path, DlError *e);
// Parses a single value as written after `key =` (used for --set). NULL and e filled on failure.
TomlValue *toml_parse_value(const char *text, DlError *e);
void toml_free(TomlValue *v);

// Table lookup by exact key (NULL if absent or t is not a table); toml_get_kv gives the key position too.
TomlValue *toml_get(const TomlValue *t, const char *key);
const TomlKv *toml_get_kv(const TomlValue *t, const char *key);
// New values owned by the caller until attached with toml_table_set / toml_array_push.
TomlValue *toml_new(TomlType type);
TomlValue *toml_new_string(const char *s);
// Sets key in table t to v (replacing and freeing any previous value). Returns the kv slot.
TomlKv *toml_table_set(TomlValue *t, const char *key, TomlValue *v);
void toml_array_push(TomlValue *a, TomlValue *v);
const char *toml_type_name(TomlType t);

// Writers for the serializer of resolved recipes: a key (bare if possible, else quoted) and a string.
void toml_write_key(FILE *f, const char *key);
void toml_write_string(FILE *f, const char *s);
// Writes any value in inline form (tables as { k = v }, floats round-trip exactly).
void toml_write_value(FILE *f, const TomlValue *v);
