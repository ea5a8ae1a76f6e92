// cmd_export.c: `distill export` — writes a model (anything model_load reads: GGUF, HF / MambaInLlama export
// directory, config .json) in a format an inference engine or MambaInLlama's code loads:
//   mambainllama  MambaInLlama's HF format (export.h; Mamba-2 hybrids through export_mamba2.h)
//   granite       GraniteMoeHybridForCausalLM config + safetensors (HF transformers, vLLM, SGLang)
//   gguf-f16      llama.cpp granitehybrid GGUF, F16 matrices
//   gguf-q8_0     the same with Q8_0 matrices (gguf-f32: unrounded, for verification)
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/command.h"
#include "distill/common.h"
#include "distill/export.h"
#include "distill/export_gguf.h"
#include "distill/export_granite.h"
#include "distill/export_mamba2.h"
#include "distill/model_io.h"

static int parse_int(const char *opt, const char *v, long long lo, long long hi, long long *out) {
    char *end;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || x < lo || x > hi) {
        fprintf(stderr, "export: %s expects an integer in [%lld, %lld], got '%s'\n", opt, lo, hi, v);
        return -1;
    }
    *out = x;
    return 0;
}

static int run_export(int argc, char **argv) {
    const char *model = NULL, *format = NULL, *out = NULL, *tok = NULL, *dtype_s = NULL, *name = NULL, *hf_code = NULL;
    long long seed = 0, expand = 0, shard_mb = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(s) (!strcmp(a, s) && (v || (fprintf(stderr, "export: %s needs a value\n", s), exit(DL_EXIT_USAGE), 0)) && ++i)
        if (OPT("--model")) model = v;
        else if (OPT("--format")) format = v;
        else if (OPT("--out")) out = v;
        else if (OPT("--tokenizer")) tok = v;
        else if (OPT("--dtype")) dtype_s = v;
        else if (OPT("--name")) name = v;
        else if (OPT("--hf-code")) hf_code = v;
        else if (OPT("--seed")) { if (parse_int("--seed", v, 0, INT64_MAX, &seed)) return DL_EXIT_USAGE; }
        else if (OPT("--expand")) { if (parse_int("--expand", v, 0, 64, &expand)) return DL_EXIT_USAGE; }
        else if (OPT("--shard-mb")) { if (parse_int("--shard-mb", v, 0, 1 << 30, &shard_mb)) return DL_EXIT_USAGE; }
        else {
            fprintf(stderr, "export: unknown argument '%s' (see distill export --help)\n", a);
            return DL_EXIT_USAGE;
        }
#undef OPT
    }
    if (!model || !format || !out) {
        fprintf(stderr, "export: --model, --format and --out are required (see distill export --help)\n");
        return DL_EXIT_USAGE;
    }
    const bool is_gguf = !strcmp(format, "gguf-f16") || !strcmp(format, "gguf-q8_0") || !strcmp(format, "gguf-f32");
    if (!is_gguf && strcmp(format, "mambainllama") && strcmp(format, "granite")) {
        fprintf(stderr, "export: --format '%s': expected mambainllama, granite, gguf-f16 or gguf-q8_0\n", format);
        return DL_EXIT_USAGE;
    }
    DType dt = DT_BF16;  // HF formats default to bf16, as MambaInLlama's released checkpoints
    if (dtype_s) {
        char up[16] = {0};  // dtype names are upper case ("BF16"); accept either
        for (size_t k = 0; k + 1 < sizeof up && dtype_s[k]; k++) up[k] = (char)toupper((unsigned char)dtype_s[k]);
        int t = dtype_from_name(up);
        if (t != DT_F32 && t != DT_F16 && t != DT_BF16) {
            fprintf(stderr, "export: --dtype '%s': expected f32, bf16 or f16 (GGUF types come from --format)\n", dtype_s);
            return DL_EXIT_USAGE;
        }
        dt = (DType)t;
    }
    if (tok && !is_gguf) fprintf(stderr, "export: note: --tokenizer is used by the GGUF formats only\n");

    DlError e;
    LoadedModel m;
    fprintf(stderr, "export: loading %s\n", model);
    if (model_load(model, (uint64_t)seed, &m, &e)) dl_die(DL_EXIT_INPUT, "export: %s", e.msg);
    int rc;
    const HybridConfig *h = &m.hc;
    if (!strcmp(format, "mambainllama")) {
        ExportOptions o = {.dtype = dt, .max_shard_bytes = (uint64_t)shard_mb << 20, .name_or_path = name};
        bool m2 = false;
        for (int l = 0; l < h->base.n_layer; l++) m2 |= h->mixer[l] == MIXER_MAMBA2;
        rc = m2 ? export_mambainllama_mamba2(out, h, &m.reg, m.params, &o, &e) : export_hf(out, h, &m.reg, m.params, &o, &e);
        if (!rc && hf_code) rc = export_add_hf_code(out, h, hf_code, &e);
    } else if (!strcmp(format, "granite")) {
        GraniteOptions o = {.dtype = dt, .expand = (int)expand, .max_shard_bytes = (uint64_t)shard_mb << 20, .name_or_path = name};
        rc = export_granite(out, h, &m.reg, m.params, &o, &e);
    } else {
        GgufExportOptions o = {.dtype = !strcmp(format, "gguf-q8_0") ? DT_Q8_0 : !strcmp(format, "gguf-f32") ? DT_F32 : DT_F16,
                               .tokenizer_gguf = tok,
                               .name = name, .expand = (int)expand};
        if (!tok) fprintf(stderr, "export: warning: no --tokenizer GGUF: the file has no vocabulary; llama.cpp needs one to load it\n");
        rc = export_gguf(out, h, &m.reg, m.params, &o, &e);
    }
    model_free(&m);
    if (rc) dl_die(DL_EXIT_INPUT, "export: %s", e.msg);
    printf("export: wrote %s (%s)\n", out, format);
    return DL_EXIT_OK;
}

DL_COMMAND(export_cmd, {
    .name = "export",
    .usage = "--model MODEL --format mambainllama|granite|gguf-f16|gguf-q8_0 --out PATH [options]",
    .summary = "write a model for inference engines (HF/vLLM/SGLang, llama.cpp) or MambaInLlama's code",
    .help =
        "  --model MODEL      GGUF, HF model directory (teacher or MambaInLlama hybrid, e.g. a run's export/),\n"
        "                     or config .json (random weights)\n"
        "  --format F         mambainllama  MambaInLlama's HF format (config.json + mamba_config.json + safetensors;\n"
        "                                   Mamba-1 or Mamba-2 hybrids)\n"
        "                     granite       GraniteMoeHybridForCausalLM directory for HF transformers, vLLM, SGLang\n"
        "                                   (Mamba-2 hybrids; exact, see docs/EXPORTS.md)\n"
        "                     gguf-f16      llama.cpp granitehybrid GGUF, F16 matrices (Mamba-2 hybrids)\n"
        "                     gguf-q8_0     the same, Q8_0 matrices\n"
        "                     gguf-f32      the same, F32 (large; for checking the mapping without rounding)\n"
        "  --out PATH         output directory (mambainllama, granite) or .gguf file\n"
        "  --tokenizer GGUF   GGUF whose tokenizer.* metadata is copied (the teacher's); needed by llama.cpp\n"
        "  --dtype T          f32, bf16 (default) or f16 for the HF formats\n"
        "  --expand N         Mamba d_inner = N * hidden_size, padded with zero heads (exact). Default: granite the\n"
        "                     smallest that fits (1 for Llama teachers), GGUF 2 (llama.cpp asserts expand 2)\n"
        "  --shard-mb N       split safetensors into shards of at most N MiB (0: one file)\n"
        "  --name S           _name_or_path / general.name\n"
        "  --hf-code DIR      mambainllama format, Mamba-1 hybrids: add DIR/modeling_mambainllama.py and\n"
        "                     configuration_mambainllama.py (distill's hf/ folder) and an auto_map, so HF transformers\n"
        "                     loads it with trust_remote_code=True (e.g. for lm-evaluation-harness)\n"
        "  --seed S           seed of random weights for a config .json model\n",
    .run = run_export,
})
