// ingest.h: the data stage: text / JSONL / chat / preference files -> tokenized HDF5 shard (shards.h).
// `distill tokenize --out` and the recipe's data stage both call ingest_files().
//
// Inputs (data/README.md has examples):
//   text        a plain UTF-8 file is one document (an end-of-text separator token is appended)
//   jsonl       one {"text": "..."} per line
//   chat        one {"messages": [{"role": ..., "content": ...}, ...]} per line; loss on assistant turns only
//   preference  one TRL-style pair per line: {"prompt": str | [messages], "chosen": str | [messages],
//               "rejected": ...}, or {"messages": [...], "chosen", "rejected"}, or implicit-prompt pairs
//               where chosen/rejected are whole conversations sharing all but the last (assistant) message
//   auto        .jsonl/.json files: each line by its keys (chosen+rejected, messages, text); others: text
// Bad records (invalid JSON, missing or mistyped fields, invalid UTF-8, empty documents, records longer
// than max_len) are reported as FILE:LINE: reason and counted by kind; with policy skip they are left out,
// with policy fail the first one stops the run and no output file is left behind.
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/chat.h"
#include "distill/common.h"
#include "distill/tokenizer.h"

typedef enum { INGEST_AUTO = 0, INGEST_TEXT, INGEST_JSONL, INGEST_CHAT, INGEST_PREF } IngestFormat;
typedef enum { INGEST_SKIP = 0, INGEST_FAIL = 1 } IngestPolicy;

typedef struct {
    IngestFormat format;
    IngestPolicy policy;
    int64_t seq_len;      // > 0: also write packed rows of seq_len+1 tokens (LM shards)
    int64_t max_len;      // records with more tokens are errors; 0: seq_len+1 for chat/preference records
                          // when packing, else unlimited (long text documents are split across rows)
    int chat_family;      // ChatFamily, or -1 to choose from the tokenizer
    bool doc_sep;         // append an end-of-text token to each text document
    int deflate;          // HDF5 deflate level
    int max_reports;      // file:line messages printed before going quiet (counts continue)
} IngestOptions;

typedef struct {
    int64_t n_records;      // records seen (text files + non-blank JSONL lines)
    int64_t n_docs, n_pairs, n_tokens;
    int64_t n_bad_json, n_missing_field, n_bad_utf8, n_empty, n_too_long, n_wrong_kind;
    int64_t n_skipped;      // sum of the bad-record counts
} IngestStats;

void ingest_options_default(IngestOptions *o);
int ingest_format_from_name(const char *name);  // -1 if unknown
const char *ingest_format_name(IngestFormat f);

// Tokenizes files into one shard at out_path. Returns 0, or -1 with e naming the file:line and problem
// (policy fail), an I/O error, or "no valid records". stats may be NULL.
int ingest_files(const Tokenizer *t, const char *const *files, int n_files, const char *out_path,
                 const IngestOptions *o, IngestStats *stats, DlError *e);

// ---- prompt sets (data/prompts.jsonl): what the teacher answers to make pseudo-labels
// One {"messages": [{"role", "content"}, ...]} (ending in a non-assistant message) or {"prompt": "..."}
// (one user message) per line; blank lines ignored; bad lines counted/reported like ingest_files.
typedef struct {
    ChatMessage *msgs;  // owned strings
    int n_msgs;
    int64_t line;       // 1-based line in the file
} PromptItem;
typedef struct {
    PromptItem *items;
    int64_t n;
} PromptSet;
int prompts_load(const char *path, IngestPolicy policy, int max_reports, PromptSet *out, IngestStats *stats,
                 DlError *e);
void prompts_free(PromptSet *s);
