// cmd_generate.c: `distill generate` streams a continuation of a prompt (or a chat answer) from a teacher or
// a hybrid on the CPU: one prefill of the prompt, then one decode step per token (KV cache for attention
// layers, conv + SSM state for Mamba layers, so a Mamba layer's step costs the same at any length).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/chat.h"
#include "distill/command.h"
#include "distill/common.h"
#include "distill/engine.h"
#include "distill/model_io.h"
#include "distill/rng.h"
#include "distill/sample.h"
#include "distill/tokenizer.h"

typedef struct {
    const char *model, *tokenizer, *prompt, *system, *prompt_ids;
    bool chat, ids, add_bos;
    int64_t max_tokens;
    SampleParams sp;
    uint64_t seed;
} GenOpts;

typedef struct {
    LoadedModel m;
    Tokenizer *tok;
    Decoder *dec;
    int64_t ctx;
    int32_t stop[2];  // end-of-sequence ids (-1: none)
    Rng rng;
    float *logits;
} Gen;

// Generates after prompt ids; writes text (or ids) to stdout as produced. Returns the ids generated.
static int64_t generate(Gen *g, const GenOpts *o, const int32_t *prompt, int64_t n_prompt, int32_t **out_ids) {
    DlError e;
    const int64_t V = g->m.hc.base.vocab;
    if (n_prompt == 0) dl_die(DL_EXIT_USAGE, "generate: the prompt is empty (no tokens to start from)");
    int64_t budget = DL_MIN(o->max_tokens, g->ctx - n_prompt);
    if (budget < o->max_tokens)
        dl_warn("generate: the context of %lld tokens leaves room for %lld new tokens", (long long)g->ctx, (long long)DL_MAX(budget, 0));
    *out_ids = NULL;
    if (budget <= 0) return 0;
    for (int64_t i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= V)
            dl_die(DL_EXIT_INPUT, "generate: prompt token id %d is outside the model's vocabulary of %lld", prompt[i], (long long)V);
    // a cache as long as this generation can get
    g->dec = decoder_new(&g->m.hc, &g->m.reg, g->m.params, 1, n_prompt + budget, &e);
    if (!g->dec) dl_die(DL_EXIT_INPUT, "generate: %s", e.msg);
    double t0 = dl_now();
    if (decoder_feed(g->dec, prompt, n_prompt, g->logits, NULL, &e)) dl_die(DL_EXIT_RUNTIME, "generate: %s", e.msg);
    double t1 = dl_now();
    int32_t *ids = dl_malloc((size_t)budget * sizeof(int32_t));
    int64_t n = 0;
    TokStream ts;
    if (g->tok) tok_stream_init(&ts, g->tok);
    size_t cap = (g->tok ? tokenizer_max_token_bytes(g->tok) : 0) + 8;
    char *buf = dl_malloc(cap);
    while (n < budget) {
        int32_t id = sample_token(g->logits, V, &o->sp, &g->rng);
        ids[n++] = id;
        bool stop = id == g->stop[0] || id == g->stop[1];
        if (o->ids) printf("%s%d", n > 1 ? " " : "", id);
        else if (!stop) {
            size_t k = tok_stream_push(&ts, id, buf, cap);
            if (k != (size_t)-1) fwrite(buf, 1, k, stdout);
        }
        fflush(stdout);
        if (stop || n == budget) break;
        if (decoder_feed(g->dec, &id, 1, g->logits, NULL, &e)) dl_die(DL_EXIT_RUNTIME, "generate: %s", e.msg);
    }
    if (!o->ids) {
        size_t k = tok_stream_flush(&ts, buf, cap);
        fwrite(buf, 1, k, stdout);
    }
    printf("\n");
    fflush(stdout);
    double t2 = dl_now();
    dl_info("prompt %lld tokens (%.1f tok/s), generated %lld tokens (%.1f tok/s)", (long long)n_prompt,
            n_prompt / DL_MAX(t1 - t0, 1e-9), (long long)n, (n > 1 ? n - 1 : 0) / DL_MAX(t2 - t1, 1e-9));
    free(buf);
    decoder_free(g->dec);
    g->dec = NULL;
    *out_ids = ids;
    return n;
}

static int run_generate(int argc, char **argv) {
    GenOpts o = {.max_tokens = 256, .sp = {.greedy = false, .temperature = 0.7f, .top_p = 0.9f}, .seed = 0};
    bool temp_set = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (!strcmp(a, "--model") && has) o.model = argv[++i];
        else if (!strcmp(a, "--tokenizer") && has) o.tokenizer = argv[++i];
        else if (!strcmp(a, "--prompt") && has) o.prompt = argv[++i];
        else if (!strcmp(a, "--system") && has) o.system = argv[++i];
        else if (!strcmp(a, "--prompt-ids") && has) o.prompt_ids = argv[++i];
        else if (!strcmp(a, "--chat")) o.chat = true;
        else if (!strcmp(a, "--max-tokens") && has) o.max_tokens = atoll(argv[++i]);
        else if (!strcmp(a, "--temperature") && has) o.sp.temperature = (float)atof(argv[++i]), temp_set = true;
        else if (!strcmp(a, "--top-p") && has) o.sp.top_p = (float)atof(argv[++i]), temp_set = true;
        else if (!strcmp(a, "--greedy")) o.sp.greedy = true;
        else if (!strcmp(a, "--seed") && has) o.seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--ids")) o.ids = true;
        else if (!strcmp(a, "--add-bos")) o.add_bos = true;
        else dl_die(DL_EXIT_USAGE, "generate: unknown or incomplete option '%s' (see distill generate --help)", a);
    }
    if (!o.model) dl_die(DL_EXIT_USAGE, "generate: --model MODEL is required");
    if (!o.prompt && !o.chat && !o.prompt_ids) dl_die(DL_EXIT_USAGE, "generate: give --prompt TEXT, or --chat (with or without --prompt)");
    if (o.prompt_ids && (o.prompt || o.chat)) dl_die(DL_EXIT_USAGE, "generate: --prompt-ids excludes --prompt and --chat");
    if (o.sp.greedy && temp_set) dl_die(DL_EXIT_USAGE, "generate: --greedy excludes --temperature/--top-p");
    if (o.max_tokens <= 0) dl_die(DL_EXIT_USAGE, "generate: --max-tokens must be positive");
    if (!o.sp.greedy && !(o.sp.temperature > 0)) dl_die(DL_EXIT_USAGE, "generate: --temperature must be > 0 (or use --greedy)");
    if (!o.sp.greedy && !(o.sp.top_p > 0 && o.sp.top_p <= 1)) dl_die(DL_EXIT_USAGE, "generate: --top-p must be in (0, 1]");

    Gen g = {0};
    DlError e;
    if (model_load(o.model, o.seed, &g.m, &e)) dl_die(DL_EXIT_INPUT, "generate: %s", e.msg);
    const char *tpath = o.tokenizer ? o.tokenizer : o.model;
    bool need_tok = !(o.prompt_ids && o.ids);  // ids in, ids out: no tokenizer needed
    if (need_tok && tokenizer_load(tpath, &g.tok, &e))
        dl_die(DL_EXIT_INPUT, "generate: no tokenizer for %s (%s); pass --tokenizer GGUF|tokenizer.json", tpath, e.msg);
    g.ctx = g.m.hc.base.max_pos > 0 ? g.m.hc.base.max_pos : 2048;
    g.logits = dl_malloc((size_t)g.m.hc.base.vocab * sizeof(float));
    g.stop[0] = g.tok ? tokenizer_eos(g.tok) : g.m.hc.base.eos_id;
    g.stop[1] = -1;
    rng_init(&g.rng, o.seed, 0x9e7e);
    dl_info("generate: %s (%d layers, %d attention), context %lld", g.m.source, g.m.hc.base.n_layer,
            hybrid_n_attn(&g.m.hc), (long long)g.ctx);

    if (!o.chat) {
        int32_t *ids = NULL, *gen = NULL;
        int64_t n = 0;
        if (o.prompt_ids) {  // "ID ID ..." (checked against the vocabulary in generate)
            int64_t cap = 64;
            ids = dl_malloc((size_t)cap * sizeof(int32_t));
            for (const char *p = o.prompt_ids; *p;) {
                char *end;
                long v = strtol(p, &end, 10);
                if (end == p) dl_die(DL_EXIT_USAGE, "generate: --prompt-ids expects integers, got '%s'", p);
                if (n == cap) cap *= 2, ids = dl_realloc(ids, (size_t)cap * sizeof(int32_t));
                ids[n++] = (int32_t)v;
                for (p = end; *p == ' ' || *p == ','; p++) {}
            }
        } else if (tokenizer_encode(g.tok, o.prompt, strlen(o.prompt), &ids, &n, &e)) {
            dl_die(DL_EXIT_INPUT, "generate: prompt: %s", e.msg);
        }
        if (o.add_bos) {
            int32_t bos = tokenizer_bos(g.tok);
            if (bos < 0) dl_die(DL_EXIT_INPUT, "generate: --add-bos but the tokenizer has no BOS token");
            ids = dl_realloc(ids, (size_t)(n + 1) * sizeof(int32_t));
            memmove(ids + 1, ids, (size_t)n * sizeof(int32_t));
            ids[0] = bos;
            n++;
        }
        if (!o.ids && o.prompt) fputs(o.prompt, stdout);
        generate(&g, &o, ids, n, &gen);
        free(ids);
        free(gen);
    } else {
        ChatFamily fam;
        if (chat_family_for(g.tok, &fam, &e)) dl_die(DL_EXIT_INPUT, "generate: --chat: %s", e.msg);
        const char *end_tok = fam == CHAT_CHATML ? "<|im_end|>" : "<|eot_id|>";
        g.stop[1] = tokenizer_token_id(g.tok, end_tok);
        // conversation so far (role, content), re-rendered each turn
        int cap = 16, nm = 0;
        ChatMessage *msgs = dl_malloc((size_t)cap * sizeof(ChatMessage));
        if (o.system) msgs[nm++] = (ChatMessage){"system", o.system};
        bool interactive = !o.prompt;
        char *line = NULL;
        size_t lcap = 0;
        for (;;) {
            const char *user = o.prompt;
            if (interactive) {
                fprintf(stderr, "> ");
                ssize_t k = getline(&line, &lcap, stdin);
                if (k < 0) break;
                while (k > 0 && (line[k - 1] == '\n' || line[k - 1] == '\r')) line[--k] = 0;
                if (k == 0) continue;
                user = dl_strdup(line);
            }
            if (nm + 2 > cap) cap *= 2, msgs = dl_realloc(msgs, (size_t)cap * sizeof(ChatMessage));
            msgs[nm++] = (ChatMessage){"user", user};
            int32_t *ids = NULL, *gen = NULL;
            int64_t n = 0;
            if (chat_render(g.tok, fam, msgs, nm, true, &ids, NULL, &n, &e)) dl_die(DL_EXIT_INPUT, "generate: %s", e.msg);
            int64_t ng = generate(&g, &o, ids, n, &gen);
            char *text = NULL;
            size_t tl = 0;
            int64_t keep = ng;
            while (keep > 0 && (gen[keep - 1] == g.stop[0] || gen[keep - 1] == g.stop[1])) keep--;
            if (tokenizer_decode(g.tok, gen, keep, &text, &tl)) text = dl_strdup("");
            msgs[nm++] = (ChatMessage){"assistant", text};
            free(ids);
            free(gen);
            if (!interactive) break;
        }
        free(line);
        free(msgs);  // message strings are freed at exit
    }
    free(g.logits);
    if (g.tok) tokenizer_free(g.tok);
    model_free(&g.m);
    return DL_EXIT_OK;
}

DL_COMMAND(generate_cmd, {
    .name = "generate",
    .usage = "--model MODEL [--prompt TEXT | --chat] [--max-tokens N] [--temperature T --top-p P | --greedy] [--seed S]",
    .summary = "stream text from a teacher or hybrid (CPU; KV cache + Mamba state)",
    .help =
        "Generates from MODEL (a GGUF, an HF model directory incl. MambaInLlama hybrid exports, or a config\n"
        ".json with random weights from --seed) on the CPU, streaming text to stdout.\n"
        "  --prompt TEXT        continue TEXT (encoded as plain text; no special tokens added)\n"
        "  --chat               render the chat template (ChatML or Llama-3) and answer as the assistant;\n"
        "                       with --prompt one turn, without it an interactive conversation on stdin\n"
        "  --system TEXT        system message for --chat\n"
        "  --max-tokens N       new tokens at most (default 256); stops at EOS / end of turn\n"
        "  --temperature T      sampling temperature (default 0.7)\n"
        "  --top-p P            nucleus sampling mass (default 0.9)\n"
        "  --greedy             argmax decoding (excludes --temperature/--top-p)\n"
        "  --seed S             sampling seed (default 0); also seeds random weights of a config .json\n"
        "  --tokenizer PATH     tokenizer (GGUF or tokenizer.json) if MODEL has none\n"
        "  --add-bos            prepend the tokenizer's BOS token to --prompt\n"
        "  --prompt-ids 'I I ..' start from these token ids instead of --prompt\n"
        "  --ids                print generated token ids instead of text\n"
        "Example: distill generate --model checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf --chat \\\n"
        "           --prompt 'What is a Mamba layer?' --greedy --max-tokens 64\n",
    .run = run_generate,
})
