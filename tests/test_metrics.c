// test_metrics.c: metrics.jsonl rows parse as JSON with every field, losses round-trip bit for bit,
// non-finite values become null, resume drops rows after the checkpoint (and a torn last line); the
// progress text and its plain-line throttling.
#include <cjson/cJSON.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/metrics.h"
#include "tests/check.h"

static cJSON **read_rows(const char *path, int *n) {
    DlError e;
    size_t len;
    char *t = dl_read_file(path, &len, &e);
    cJSON **rows = NULL;
    *n = 0;
    for (char *save = NULL, *line = t ? strtok_r(t, "\n", &save) : NULL; line; line = strtok_r(NULL, "\n", &save)) {
        rows = dl_realloc(rows, (size_t)(*n + 1) * sizeof *rows);
        rows[(*n)++] = cJSON_Parse(line);
    }
    free(t);
    return rows;
}

static void free_rows(cJSON **rows, int n) {
    for (int i = 0; i < n; i++) cJSON_Delete(rows[i]);
    free(rows);
}

static double num(const cJSON *o, const char *k) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(x) ? x->valuedouble : NAN;
}

int main(void) {
    char dir[] = "/tmp/distill_test_metrics_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    Metrics m;
    DlError e;
    CHECK(metrics_open(&m, dir, -1, 0, &e) == 0);
    const double losses[5] = {2.302585092994046, 1.0 / 3.0, 0.1 + 0.2, 7.5e-12, NAN};
    for (int s = 0; s < 5; s++) {
        MetricPart parts[2] = {{"ce", losses[s] * 0.9}, {"kl", 0.123456789012345678}};
        MetricsRow r = {.stage_index = s < 3 ? 0 : 1, .stage = s < 3 ? "layer\"wise" : "sft", .step = s < 3 ? s + 1 : s - 2,
                        .total_steps = 3, .loss = losses[s], .parts = parts, .n_parts = 2, .lr = 8e-5, .grad_norm = 0.5,
                        .tokens = 4096, .tokens_per_s = 1234.5, .skipped = s == 4,
                        .skip_reason = s == 4 ? "skipped: non-finite loss" : NULL};
        CHECK(metrics_write(&m, &r, &e) == 0);
    }
    CHECK(metrics_event(&m, "stage_end", "\"stage_index\":1,\"stage\":\"sft\"", &e) == 0);
    metrics_close(&m);

    char *path = dl_path_join(dir, "metrics.jsonl");
    int n;
    cJSON **rows = read_rows(path, &n);
    CHECK_EQ_I64(n, 6);
    bool parsed = true;
    for (int i = 0; i < n; i++) parsed &= rows[i] != NULL;
    CHECK(parsed);
    if (parsed && n == 6) {
        for (int s = 0; s < 4; s++) CHECK(num(rows[s], "loss") == losses[s]);  // bit-exact through %.17g
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(rows[0], "stage");
        CHECK(cJSON_IsString(st) && !strcmp(st->valuestring, "layer\"wise"));
        CHECK(num(rows[1], "step") == 2 && num(rows[1], "total_steps") == 3 && num(rows[1], "tokens") == 4096);
        CHECK(num(rows[2], "lr") == 8e-5 && num(rows[2], "grad_norm") == 0.5 && num(rows[2], "tokens_per_s") == 1234.5);
        const cJSON *parts = cJSON_GetObjectItemCaseSensitive(rows[1], "parts");
        CHECK(num(parts, "kl") == 0.123456789012345678 && num(parts, "ce") == losses[1] * 0.9);
        CHECK(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(rows[4], "loss")));  // NaN -> null
        CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(rows[4], "skipped")));
        CHECK(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(rows[3], "skipped")));
        CHECK(cJSON_GetObjectItemCaseSensitive(rows[4], "skip_reason") != NULL);
        CHECK(num(rows[0], "elapsed_s") >= 0 && num(rows[0], "time") > 1.6e9);
        CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(rows[5], "event")));
    }
    free_rows(rows, n);

    // resume from (stage 1, step 1): rows (1,2) and the stage_end event of stage 1 stay (event has no step)
    // only if not after; a torn last line is dropped
    FILE *f = fopen(path, "ab");
    fputs("{\"stage_index\":1,\"stage\":\"sft\",\"step\":3,\"lo", f);
    fclose(f);
    CHECK(metrics_open(&m, dir, 1, 1, &e) == 0);
    MetricsRow r = {.stage_index = 1, .stage = "sft", .step = 2, .total_steps = 3, .loss = 0.25};
    CHECK(metrics_write(&m, &r, &e) == 0);
    metrics_close(&m);
    rows = read_rows(path, &n);
    // kept: 3 rows of stage 0, (1,1), the event (stage 1, no step); dropped: (1,2), torn line; added: (1,2)
    CHECK_EQ_I64(n, 6);
    if (n == 6) {
        CHECK(num(rows[3], "stage_index") == 1 && num(rows[3], "step") == 1);
        CHECK(num(rows[5], "step") == 2 && num(rows[5], "loss") == 0.25);
        int steps12 = 0;
        for (int i = 0; i < n; i++) steps12 += num(rows[i], "stage_index") == 1 && num(rows[i], "step") == 2;
        CHECK_EQ_I64(steps12, 1);
    }
    free_rows(rows, n);
    // a fresh (non-resume) open starts an empty file
    CHECK(metrics_open(&m, dir, -1, 0, &e) == 0);
    metrics_close(&m);
    rows = read_rows(path, &n);
    CHECK_EQ_I64(n, 0);
    free_rows(rows, n);
    CHECK(metrics_open(&m, "/proc/no_such_dir/x", -1, 0, &e) == -1 && strstr(e.msg, "/proc/no_such_dir"));

    // progress text
    Progress p;
    progress_begin(&p, "layerwise", 0, 100);
    p.t_start = 1000.0;
    char line[256];
    progress_format(&p, 5, 2.5, 812.4, 1010.0, line, sizeof line);
    CHECK(strstr(line, "layerwise") && strstr(line, "step   5/100") && strstr(line, "loss 2.5000") &&
          strstr(line, "812 tok/s") && strstr(line, "elapsed 10s") && strstr(line, "ETA 3m10s"));
    progress_begin(&p, "sft", 40, 100);  // resumed at step 40: the rate counts only steps run here
    p.t_start = 0;
    progress_format(&p, 50, 1.0, 1, 3600.0, line, sizeof line);
    CHECK(strstr(line, "ETA 5h00m") != NULL);
    // plain lines (not a terminal): first and last step always, the rest throttled by interval_s
    FILE *tf = tmpfile();
    progress_begin(&p, "eval", 0, 50);
    p.tty = false;
    p.quiet = false;
    p.out = tf;
    p.interval_s = 3600;
    for (int s = 1; s <= 50; s++) progress_update(&p, s, 1.0, 10);
    progress_end(&p);
    rewind(tf);
    int lines = 0;
    while (fgets(line, sizeof line, tf)) lines++;
    CHECK_EQ_I64(lines, 2);
    fclose(tf);
    tf = tmpfile();
    progress_begin(&p, "eval", 0, 50);
    p.tty = false;
    p.out = tf;
    p.interval_s = 0;  // every step
    p.quiet = false;
    for (int s = 1; s <= 50; s++) progress_update(&p, s, 1.0, 10);
    rewind(tf);
    lines = 0;
    while (fgets(line, sizeof line, tf)) lines++;
    CHECK_EQ_I64(lines, 50);
    fclose(tf);
    // quiet: nothing
    tf = tmpfile();
    progress_begin(&p, "eval", 0, 5);
    p.quiet = true;
    p.out = tf;
    for (int s = 1; s <= 5; s++) progress_update(&p, s, 1.0, 10);
    progress_end(&p);
    CHECK(ftell(tf) == 0);
    fclose(tf);
    // a terminal: one line rewritten with \r, ended by a newline
    tf = tmpfile();
    progress_begin(&p, "init", 0, 3);
    p.tty = true;
    p.quiet = false;
    p.out = tf;
    for (int s = 1; s <= 3; s++) progress_update(&p, s, 1.0, 10);
    progress_end(&p);
    rewind(tf);
    char buf[1024] = "";
    size_t got = fread(buf, 1, sizeof buf - 1, tf);
    buf[got] = 0;
    CHECK(buf[0] == '\r' && strchr(buf, '\n') == buf + got - 1);
    fclose(tf);

    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    free(path);
    return check_report("test_metrics");
}
