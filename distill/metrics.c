// metrics.c: see metrics.h.
#include "distill/metrics.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

void json_escape(const char *s, char *out, size_t n) {
    size_t k = 0;
    if (!n) return;
    for (; s && *s && k + 7 < n; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') out[k++] = '\\', out[k++] = (char)c;
        else if (c == '\n') out[k++] = '\\', out[k++] = 'n';
        else if (c == '\t') out[k++] = '\\', out[k++] = 't';
        else if (c < 0x20) k += (size_t)snprintf(out + k, n - k, "\\u%04x", c);
        else out[k++] = (char)c;
    }
    out[k] = 0;
}

// A JSON number, or null when non-finite.
static void num(FILE *f, double v, const char *fmt) {
    if (isfinite(v)) fprintf(f, fmt, v);
    else fputs("null", f);
}

// Keeps the lines of path whose (stage_index, step) is at or before (stage, step); drops the rest.
static int truncate_after(const char *path, int stage, int64_t step, DlError *e) {
    if (!dl_file_exists(path)) return 0;
    size_t len;
    char *text = dl_read_file(path, &len, e);
    if (!text) return -1;
    DlAtomic a;
    if (dl_atomic_open(&a, path, e)) {
        free(text);
        return -1;
    }
    FILE *f = a.f;
    int kept = 0, dropped = 0;
    for (char *line = text, *next; line && *line; line = next) {
        char *nl = strchr(line, '\n');
        next = nl ? nl + 1 : NULL;
        if (!nl) break;  // a partial last line (killed mid-write) is dropped
        *nl = 0;
        cJSON *o = cJSON_Parse(line);
        bool keep = false;
        if (o) {
            const cJSON *si = cJSON_GetObjectItemCaseSensitive(o, "stage_index");
            const cJSON *st = cJSON_GetObjectItemCaseSensitive(o, "step");
            if (cJSON_IsNumber(si) && cJSON_IsNumber(st))
                keep = si->valuedouble < stage || (si->valuedouble == stage && st->valuedouble <= (double)step);
            else
                keep = cJSON_IsNumber(si) && si->valuedouble <= stage;  // events carry a stage but no step
            cJSON_Delete(o);
        }
        if (keep) fprintf(f, "%s\n", line), kept++;
        else dropped++;
    }
    free(text);
    if (dl_atomic_commit(&a, e)) return -1;
    if (dropped) dl_info("metrics: dropped %d rows written after the checkpoint resumed from", dropped);
    return 0;
}

int metrics_open(Metrics *m, const char *run_dir, int resume_stage, int64_t resume_step, DlError *e) {
    memset(m, 0, sizeof *m);
    if (dl_mkdirs(run_dir, e)) return -1;
    m->path = dl_path_join(run_dir, "metrics.jsonl");
    if (resume_stage >= 0 && truncate_after(m->path, resume_stage, resume_step, e)) {
        free(m->path);
        m->path = NULL;
        return -1;
    }
    m->f = fopen(m->path, resume_stage >= 0 ? "ab" : "wb");
    if (!m->f) {
        int rc = dl_fail(e, "%s: cannot open for writing: %s", m->path, strerror(errno));
        free(m->path);
        m->path = NULL;
        return rc;
    }
    m->t0 = dl_now();
    return 0;
}

static double unix_time(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return tv.tv_sec + 1e-6 * tv.tv_usec;
}

int metrics_write(Metrics *m, const MetricsRow *r, DlError *e) {
    if (!m->f) return dl_fail(e, "metrics file is not open");
    FILE *f = m->f;
    char s[256];
    json_escape(r->stage ? r->stage : "", s, sizeof s);
    fprintf(f, "{\"stage_index\":%d,\"stage\":\"%s\",\"step\":%lld,\"total_steps\":%lld,\"loss\":", r->stage_index, s,
            (long long)r->step, (long long)r->total_steps);
    num(f, r->loss, "%.17g");
    fputs(",\"parts\":{", f);
    for (int i = 0; i < r->n_parts; i++) {
        json_escape(r->parts[i].name, s, sizeof s);
        fprintf(f, "%s\"%s\":", i ? "," : "", s);
        num(f, r->parts[i].value, "%.17g");
    }
    fputs("},\"lr\":", f);
    num(f, r->lr, "%.9g");
    fputs(",\"grad_norm\":", f);
    num(f, r->grad_norm, "%.9g");
    fprintf(f, ",\"tokens\":%lld,\"tokens_per_s\":", (long long)r->tokens);
    num(f, r->tokens_per_s, "%.1f");
    fprintf(f, ",\"skipped\":%s", r->skipped ? "true" : "false");
    if (r->skipped && r->skip_reason) {
        json_escape(r->skip_reason, s, sizeof s);
        fprintf(f, ",\"skip_reason\":\"%s\"", s);
    }
    fprintf(f, ",\"elapsed_s\":%.3f,\"time\":%.3f}\n", dl_now() - m->t0, unix_time());
    if (fflush(f) != 0 || ferror(f)) return dl_fail(e, "%s: write failed: %s", m->path, strerror(errno));
    return 0;
}

int metrics_event(Metrics *m, const char *name, const char *fields_json, DlError *e) {
    if (!m->f) return dl_fail(e, "metrics file is not open");
    char s[256];
    json_escape(name, s, sizeof s);
    fprintf(m->f, "{\"event\":\"%s\"%s%s,\"elapsed_s\":%.3f,\"time\":%.3f}\n", s, fields_json && *fields_json ? "," : "",
            fields_json ? fields_json : "", dl_now() - m->t0, unix_time());
    if (fflush(m->f) != 0 || ferror(m->f)) return dl_fail(e, "%s: write failed: %s", m->path, strerror(errno));
    return 0;
}

void metrics_close(Metrics *m) {
    if (m->f) fclose(m->f);
    free(m->path);
    memset(m, 0, sizeof *m);
}

// ---------------------------------------------------------------- progress

void progress_begin(Progress *p, const char *stage, int64_t start_step, int64_t total) {
    memset(p, 0, sizeof *p);
    snprintf(p->stage, sizeof p->stage, "%s", stage);
    p->total = total;
    p->start_step = p->last_step = start_step;
    p->t_start = dl_now();
    p->t_last = -1e30;
    p->out = stderr;
    p->quiet = dl_is_quiet();
    p->tty = isatty(fileno(stderr));
    p->interval_s = 30;
    const char *iv = getenv("DISTILL_PROGRESS_INTERVAL");
    if (iv && atof(iv) >= 0) p->interval_s = atof(iv);
}

static void fmt_duration(double s, char *buf, size_t n) {
    if (!isfinite(s) || s < 0) {
        snprintf(buf, n, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else if (t >= 60) snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, n, "%lds", t);
}

void progress_format(const Progress *p, int64_t step, double loss, double tokens_per_s, double now, char *buf, size_t n) {
    double el = now - p->t_start;
    int64_t done = step - p->start_step, left = p->total - step;
    char eta[32], elapsed[32];
    fmt_duration(done > 0 ? el / (double)done * (double)left : NAN, eta, sizeof eta);
    fmt_duration(el, elapsed, sizeof elapsed);
    int w = snprintf(NULL, 0, "%lld", (long long)p->total);
    char ls[32] = "";
    if (!isnan(loss)) snprintf(ls, sizeof ls, "  loss %.4f", loss);  // NaN: a stage without a loss (generate)
    snprintf(buf, n, "%s  step %*lld/%lld%s  %.0f tok/s  elapsed %s  ETA %s", p->stage, w, (long long)step,
             (long long)p->total, ls, tokens_per_s, elapsed, step >= p->total ? "0s" : eta);
}

void progress_update(Progress *p, int64_t step, double loss, double tokens_per_s) {
    if (p->quiet) return;
    double now = dl_now();
    bool first = p->last_step == p->start_step, last = step >= p->total;
    p->last_step = step;
    double period = p->tty ? 0.1 : p->interval_s;
    if (!first && !last && now - p->t_last < period) return;
    p->t_last = now;
    char line[256];
    progress_format(p, step, loss, tokens_per_s, now, line, sizeof line);
    if (p->tty) {
        int len = (int)strlen(line);
        fprintf(p->out, "\r%s%*s", line, p->last_len > len ? p->last_len - len : 0, "");
        p->last_len = len;
        p->open_line = true;
    } else {
        fprintf(p->out, "%s\n", line);
    }
    fflush(p->out);
}

void progress_end(Progress *p) {
    if (p->quiet) return;
    if (p->tty && p->open_line) fputc('\n', p->out);
    p->open_line = false;
    fflush(p->out);
}
