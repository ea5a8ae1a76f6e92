// cmd_score.c: `distill score` — perplexity of a model on a text file. The file is encoded as plain text (no
// special tokens added) and cut into consecutive, non-overlapping windows of --ctx tokens; each window is
// scored on its own (no context carried over), predicting its tokens 1..L-1 from the ones before.
// The last output line is `tokens=<predicted tokens> nll=<mean nll per predicted token> ppl=<exp(nll)>`.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/command.h"
#include "distill/common.h"
#include "distill/engine.h"
#include "distill/model_io.h"
#include "distill/tokenizer.h"

// Sum of -log p(w[t+1] | w[..t]) over one window of L tokens (L - 1 predictions), in double.
static double score_window(Engine *eng, const int32_t *w, int64_t L) {
    int32_t *targets = dl_malloc((size_t)L * sizeof(int32_t));
    for (int64_t t = 0; t < L; t++) targets[t] = t + 1 < L ? w[t + 1] : -1;
    LossSpec spec = {0};
    spec.w = (LossWeights){1, 0, 0, 1};
    spec.norm = 1;  // the sum
    engine_forward(eng, w, NULL);
    LossParts p = engine_loss(eng, targets, NULL, &spec, NULL, NULL);
    free(targets);
    return p.ce;
}

// Whitespace-separated token ids (the --ids input), validated against the vocabulary.
static int32_t *read_ids(const char *file, int64_t V, int64_t *n) {
    DlError e;
    size_t len;
    char *txt = dl_read_file(file, &len, &e);
    if (!txt) dl_die(DL_EXIT_INPUT, "score: %s", e.msg);
    int64_t cap = 1024, k = 0;
    int32_t *ids = dl_malloc((size_t)cap * sizeof(int32_t));
    char *p = txt;
    for (;;) {
        while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
        if (!*p) break;
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < 0 || v >= V)
            dl_die(DL_EXIT_INPUT, "score: %s: token %lld is not an id in 0..%lld", file, (long long)k, (long long)V - 1);
        if (k == cap) cap *= 2, ids = dl_realloc(ids, (size_t)cap * sizeof(int32_t));
        ids[k++] = (int32_t)v;
        p = end;
    }
    free(txt);
    *n = k;
    return ids;
}

// A float32 .npy file of shape [rows, cols], filled by the caller after this header.
static FILE *npy_open(const char *path, int64_t rows, int64_t cols) {
    FILE *f = fopen(path, "wb");
    if (!f) dl_die(DL_EXIT_RUNTIME, "score: cannot write %s", path);
    char hdr[128];
    int n = snprintf(hdr, sizeof hdr, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld), }", (long long)rows,
                     (long long)cols);
    int total = 10 + n + 1, pad = (64 - total % 64) % 64;
    uint16_t hl = (uint16_t)(n + pad + 1);
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fwrite(&hl, 2, 1, f);
    fwrite(hdr, 1, (size_t)n, f);
    for (int i = 0; i < pad; i++) fputc(' ', f);
    fputc('\n', f);
    return f;
}

static int run_score(int argc, char **argv) {
    const char *model = NULL, *file = NULL, *tpath = NULL, *dump = NULL;
    bool as_ids = false;
    int64_t ctx = 2048;
    uint64_t seed = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--model") && has) model = argv[++i];
        else if (!strcmp(a, "--ctx") && has) ctx = atoll(argv[++i]);
        else if (!strcmp(a, "--tokenizer") && has) tpath = argv[++i];
        else if (!strcmp(a, "--seed") && has) seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--ids")) as_ids = true;
        else if (!strcmp(a, "--dump-logits") && has) dump = argv[++i];
        else if (a[0] == '-' && a[1]) dl_die(DL_EXIT_USAGE, "score: unknown or incomplete option '%s' (see distill score --help)", a);
        else if (!file) file = a;
        else dl_die(DL_EXIT_USAGE, "score: one FILE expected, got '%s' too", a);
    }
    if (!model || !file) dl_die(DL_EXIT_USAGE, "score: usage: distill score --model MODEL [--ctx N] FILE");
    if (ctx < 2) dl_die(DL_EXIT_USAGE, "score: --ctx must be at least 2 (got %lld)", (long long)ctx);
    DlError e;
    LoadedModel m;
    if (model_load(model, seed, &m, &e)) dl_die(DL_EXIT_INPUT, "score: %s", e.msg);
    int32_t *ids = NULL;
    int64_t n = 0;
    if (as_ids) {
        ids = read_ids(file, m.hc.base.vocab, &n);
    } else {
        size_t len = 0;
        char *text = dl_read_file(file, &len, &e);
        if (!text) dl_die(DL_EXIT_INPUT, "score: %s", e.msg);
        Tokenizer *tok;
        const char *tp = tpath ? tpath : model;
        if (tokenizer_load(tp, &tok, &e)) dl_die(DL_EXIT_INPUT, "score: no tokenizer for %s (%s); pass --tokenizer", tp, e.msg);
        if (tokenizer_encode(tok, text, len, &ids, &n, &e)) dl_die(DL_EXIT_INPUT, "score: %s: %s", file, e.msg);
        free(text);
        tokenizer_free(tok);
        for (int64_t i = 0; i < n; i++)
            if (ids[i] >= m.hc.base.vocab)
                dl_die(DL_EXIT_INPUT, "score: token id %d of %s is outside the model's vocabulary of %d", ids[i], file, m.hc.base.vocab);
    }
    if (n < 2) dl_die(DL_EXIT_INPUT, "score: %s has %lld tokens; at least 2 are needed to predict one", file, (long long)n);
    if (m.hc.base.max_pos > 0 && ctx > m.hc.base.max_pos)
        dl_warn("score: --ctx %lld exceeds the model's trained context of %d", (long long)ctx, m.hc.base.max_pos);
    const int64_t nwin = (n + ctx - 1) / ctx;
    dl_info("score: %s: %lld tokens, %lld window(s) of up to %lld, model %s", file, (long long)n, (long long)nwin,
            (long long)ctx, m.source);
    const int64_t V = m.hc.base.vocab;
    FILE *df = NULL;
    float *lbuf = NULL;
    if (dump) {  // rows of every scored window (windows of one token are not scored)
        int64_t rows = 0;
        for (int64_t w = 0; w < nwin; w++) rows += DL_MIN(ctx, n - w * ctx) >= 2 ? DL_MIN(ctx, n - w * ctx) : 0;
        df = npy_open(dump, rows, V);
        lbuf = dl_malloc((size_t)V * 64 * sizeof(float));
    }
    Engine *full = NULL;
    double nll = 0, t0 = dl_now();
    int64_t predicted = 0;
    for (int64_t w = 0; w < nwin; w++) {
        int64_t s = w * ctx, L = DL_MIN(ctx, n - s);
        if (L < 2) continue;  // a last window of one token predicts nothing
        Engine *eng;
        if (L == ctx) {
            if (!full && !(full = engine_new(&m.hc, &m.reg, m.params, 1, ctx, 0, &e))) dl_die(DL_EXIT_INPUT, "score: %s", e.msg);
            eng = full;
        } else if (!(eng = engine_new(&m.hc, &m.reg, m.params, 1, L, 0, &e))) {
            dl_die(DL_EXIT_INPUT, "score: %s", e.msg);
        }
        nll += score_window(eng, ids + s, L);
        predicted += L - 1;
        for (int64_t r0 = 0; df && r0 < L; r0 += 64) {
            int64_t r1 = DL_MIN(L, r0 + 64);
            engine_logits(eng, r0, r1, lbuf);
            if (fwrite(lbuf, sizeof(float), (size_t)((r1 - r0) * V), df) != (size_t)((r1 - r0) * V))
                dl_die(DL_EXIT_RUNTIME, "score: writing %s failed", dump);
        }
        if (eng != full) engine_free(eng);
        double dt = dl_now() - t0;
        dl_info("window %lld/%lld: nll %.6f, %.1f tok/s", (long long)w + 1, (long long)nwin, nll / (double)predicted,
                (double)(s + L) / DL_MAX(dt, 1e-9));
    }
    engine_free(full);
    double mean = nll / (double)predicted;
    printf("tokens=%lld nll=%.8f ppl=%.8f\n", (long long)predicted, mean, exp(mean));
    if (df && fclose(df)) dl_die(DL_EXIT_RUNTIME, "score: writing %s failed", dump);
    free(lbuf);
    free(ids);
    model_free(&m);
    return DL_EXIT_OK;
}

DL_COMMAND(score_cmd, {
    .name = "score",
    .usage = "--model MODEL [--ctx N] [--ids] [--dump-logits OUT.npy] FILE",
    .summary = "perplexity of a model on a text file (plain tokens, independent windows)",
    .help =
        "Encodes FILE as plain text (no BOS/EOS or other special tokens added), cuts the tokens into\n"
        "consecutive non-overlapping windows of N tokens and scores each window on its own: every token but the\n"
        "window's first is predicted from the window's tokens before it.\n"
        "  --model MODEL     GGUF, HF model directory (teacher or MambaInLlama hybrid), or config .json\n"
        "  --ctx N           window length in tokens (default 2048)\n"
        "  --tokenizer PATH  tokenizer if MODEL has none (GGUF or tokenizer.json)\n"
        "  --seed S          seed of random weights for a config .json\n"
        "  --ids             FILE holds whitespace-separated token ids instead of text\n"
        "  --dump-logits P   also write the logits of every scored window as float32 .npy [tokens, vocab]\n"
        "Progress goes to stderr; the last line on stdout is\n"
        "  tokens=<predicted tokens> nll=<mean negative log-likelihood per predicted token> ppl=<exp(nll)>\n",
    .run = run_score,
})
