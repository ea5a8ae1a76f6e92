// metrics.h: per-step metrics as JSON lines, and the live progress line of a stage.
//
// metrics.jsonl (in the run directory) holds one object per optimizer step:
//   {"stage_index":1,"stage":"layerwise","step":12,"total_steps":500,"loss":2.31,"parts":{"ce":2.1,"kl":2.0},
//    "lr":8e-05,"grad_norm":0.91,"tokens":4096,"tokens_per_s":5120.3,"skipped":false,"elapsed_s":40.2,"time":1.7e9}
// Steps are 1-based (the step just finished). Non-finite numbers are written as null (JSON has no NaN).
// Losses use 17 significant digits, so a float64 loss survives a round trip bit for bit.
// On resume the rows after the checkpoint's position are dropped, so the file never holds a step twice.
//
// Progress goes to stderr: one live line per stage on a terminal (\r, throttled to 10 Hz), a plain line
// every `interval_s` seconds (and at the first and last step) otherwise, nothing in quiet mode.
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "distill/common.h"

typedef struct {
    const char *name;  // "ce", "kl", "mse", ...
    double value;
} MetricPart;

typedef struct {
    int stage_index;
    const char *stage;
    int64_t step, total_steps;
    double loss;
    const MetricPart *parts;
    int n_parts;
    double lr, grad_norm;
    int64_t tokens;        // tokens in this step
    double tokens_per_s;
    bool skipped;
    const char *skip_reason;  // NULL if not skipped
} MetricsRow;

typedef struct {
    FILE *f;
    char *path;
    double t0;
} Metrics;

// Opens run_dir/metrics.jsonl for appending. With resume_stage < 0 the file starts empty; otherwise rows
// after (resume_stage, resume_step) are removed first (they were written after the checkpoint resumed from).
int metrics_open(Metrics *m, const char *run_dir, int resume_stage, int64_t resume_step, DlError *e);
// Appends one row and flushes (a killed run loses at most the line being written).
int metrics_write(Metrics *m, const MetricsRow *r, DlError *e);
// Appends an arbitrary event object {"event": name, ...fields_json} (fields_json: "\"k\":v,..." or NULL).
int metrics_event(Metrics *m, const char *name, const char *fields_json, DlError *e);
void metrics_close(Metrics *m);

// JSON string escaping into out (always NUL-terminated; truncated to n).
void json_escape(const char *s, char *out, size_t n);

typedef struct {
    char stage[64];
    int64_t total, start_step, last_step;
    double t_start, t_last;
    double interval_s;  // plain-line period when not a terminal (default 30 s)
    bool tty, quiet, open_line;
    int last_len;
    FILE *out;
} Progress;

// Starts the progress of a stage that runs steps (start_step, total]. Mode is taken from dl_is_quiet()
// and isatty(stderr); the environment variable DISTILL_PROGRESS_INTERVAL overrides interval_s.
void progress_begin(Progress *p, const char *stage, int64_t start_step, int64_t total);
// Reports that `step` steps are done (loss, or NaN to show none; throughput of the last step or an average).
void progress_update(Progress *p, int64_t step, double loss, double tokens_per_s);
// Ends the stage: on a terminal the live line is completed with a newline.
void progress_end(Progress *p);
// Formats the progress text for step into buf (exposed for tests).
void progress_format(const Progress *p, int64_t step, double loss, double tokens_per_s, double now, char *buf, size_t n);
