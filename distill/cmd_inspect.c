// cmd_inspect.c: `distill inspect FILE` describes a model file: format, architecture and config,
// metadata, and every tensor with its shape and dtype/quantization. It also checks that the tensors match
// the config, and can dump tensors as fp32 .npy files (used by the Python oracle tests).
//
// Formats are tried in the order of INSPECTORS below; each entry is {name, probe, describe}, so adding a
// format (e.g. HDF5 checkpoints) is one function pair and one line in the table.
#include <stdio.h>
#include <string.h>

#include "distill/checkpoint.h"
#include "distill/command.h"
#include "distill/common.h"
#include "distill/gguf.h"
#include "distill/hfconfig.h"
#include "distill/model_io.h"
#include "distill/quant.h"
#include "distill/safetensors.h"

typedef struct {
    int max_items;      // array elements shown per metadata value
    const char *dump;   // comma-separated tensor names, or "all"
    const char *out;    // directory for dumped .npy files
    bool hf;            // dump through model_load (HF names and layout) instead of the file's own tensors
    uint64_t seed;      // for config-only sources with --hf
} InspectOpts;

typedef struct {
    const char *name;
    bool (*probe)(const char *path);
    int (*describe)(const char *path, const InspectOpts *o, DlError *e);
} Inspector;

// ---------------------------------------------------------------- helpers

static bool has_suffix(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

static bool file_starts_with(const char *path, const void *magic, size_t n) {
    if (dl_is_dir(path)) return false;
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    char buf[16];
    size_t got = fread(buf, 1, n, f);
    fclose(f);
    return got == n && !memcmp(buf, magic, n);
}

static const char *human_bytes(double b, char *buf, size_t n) {
    const char *u[] = {"B", "KB", "MB", "GB", "TB"};
    int i = 0;
    while (b >= 1000 && i < 4) b /= 1000, i++;
    snprintf(buf, n, i ? "%.1f %s" : "%.0f %s", b, u[i]);
    return buf;
}

static const char *shape_str(int nd, const int64_t *s, char *buf, size_t n) {
    size_t p = 0;
    p += snprintf(buf + p, n - p, "[");
    for (int d = 0; d < nd && p < n; d++) p += snprintf(buf + p, n - p, "%s%lld", d ? ", " : "", (long long)s[d]);
    if (p < n) snprintf(buf + p, n - p, "]");
    return buf;
}

static void print_config(const HybridConfig *hc) {
    const LlamaConfig *c = &hc->base;
    printf("config:\n");
    printf("  layers             %d\n", c->n_layer);
    printf("  hidden size        %d\n", c->d_model);
    printf("  attention heads    %d\n", c->n_head);
    printf("  KV heads           %d\n", c->n_kv_head);
    printf("  head dim           %d\n", c->head_dim);
    printf("  intermediate size  %d\n", c->d_ff);
    printf("  vocab              %d\n", c->vocab);
    printf("  context length     %d\n", c->max_pos);
    printf("  rope theta         %g\n", c->rope_theta);
    if (c->rope_factor > 0)
        printf("  rope scaling       llama3 (factor %g, low %g, high %g, original context %d)\n", c->rope_factor,
               c->rope_low_freq_factor, c->rope_high_freq_factor, c->rope_orig_max_pos);
    printf("  rms norm eps       %g\n", c->rms_eps);
    printf("  tied embeddings    %s\n", c->tied_embeddings ? "yes" : "no");
    if (c->bos_id >= 0 || c->eos_id >= 0) printf("  bos / eos ids      %d / %d\n", c->bos_id, c->eos_id);
    int n_attn = hybrid_n_attn(hc);
    if (n_attn != c->n_layer) {
        MixerKind mk = MIXER_ATTN;
        for (int i = 0; i < c->n_layer; i++)
            if (hc->mixer[i] != MIXER_ATTN) mk = hc->mixer[i];
        printf("  hybrid             %d attention + %d %s layers (d_inner %d, d_xb %d, d_state %d)\n  attention layers  ",
               n_attn, c->n_layer - n_attn, mixer_name(mk), hc->d_inner, hc->d_xb, hc->d_state);
        for (int i = 0; i < c->n_layer; i++)
            if (hc->mixer[i] == MIXER_ATTN) printf(" %d", i);
        printf("\n");
    }
    Registry r;
    model_build_registry(hc, &r);
    printf("  parameters         %lld (%d tensors)\n", (long long)reg_params_numel(&r), r.n);
    reg_free(&r);
}

// Writes x[numel] as a little-endian fp32 .npy of the given shape.
static int write_npy(const char *path, const float *x, int nd, const int64_t *shape, DlError *e) {
    char hdr[256], sh[160] = "";
    size_t p = 0;
    for (int d = 0; d < nd; d++) p += snprintf(sh + p, sizeof sh - p, "%lld,%s", (long long)shape[d], d + 1 < nd ? " " : "");
    int n = snprintf(hdr, sizeof hdr, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }", sh);
    int total = 10 + n + 1, pad = (64 - total % 64) % 64;
    int64_t numel = 1;
    for (int d = 0; d < nd; d++) numel *= shape[d];
    FILE *f = fopen(path, "wb");
    if (!f) return dl_fail(e, "%s: cannot create", path);
    uint16_t hl = (uint16_t)(n + pad + 1);
    bool ok = fwrite("\x93NUMPY\x01\x00", 1, 8, f) == 8 && fwrite(&hl, 2, 1, f) == 1 && fwrite(hdr, 1, n, f) == (size_t)n;
    for (int i = 0; i < pad && ok; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fputc('\n', f) != EOF && fwrite(x, sizeof(float), (size_t)numel, f) == (size_t)numel;
    if (fclose(f) || !ok) return dl_fail(e, "%s: write failed", path);
    return 0;
}

static bool wanted(const char *list, const char *name) {
    if (!strcmp(list, "all")) return true;
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *c = strchr(p, ',');
        size_t len = c ? (size_t)(c - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return true;
        if (!c) break;
        p = c + 1;
    }
    return false;
}

static int dump_one(const InspectOpts *o, const char *name, const float *x, int nd, const int64_t *shape, DlError *e) {
    char fn[256];
    snprintf(fn, sizeof fn, "%s.npy", name);
    for (char *c = fn; *c; c++)
        if (*c == '/') *c = '_';
    char *path = dl_path_join(o->out, fn);
    int rc = write_npy(path, x, nd, shape, e);
    free(path);
    return rc;
}

// --dump --hf: every wanted registry tensor of model_load(path), in HF layout.
static int dump_hf(const char *path, const InspectOpts *o, DlError *e) {
    LoadedModel m;
    if (model_load(path, o->seed, &m, e)) return -1;
    int rc = 0, n = 0;
    for (int i = 0; i < m.reg.n && !rc; i++) {
        const TensorInfo *t = &m.reg.t[i];
        if (!wanted(o->dump, t->name)) continue;
        rc = dump_one(o, t->name, m.params + t->offset, t->ndim, t->shape, e);
        n++;
    }
    model_free(&m);
    if (!rc && !n) rc = dl_fail(e, "--dump: no tensor named '%s' in %s", o->dump, path);
    if (!rc) printf("dumped %d tensors (HF layout) to %s\n", n, o->out);
    return rc;
}

// ---------------------------------------------------------------- GGUF

static bool probe_gguf(const char *path) { return file_starts_with(path, "GGUF", 4) || has_suffix(path, ".gguf"); }

static int describe_gguf(const char *path, const InspectOpts *o, DlError *e) {
    GgufFile *g;
    if (gguf_open(&g, path, e)) return -1;
    char b1[64], b2[64];
    printf("file: %s\nformat: GGUF v%u, %s, %d tensors, %d metadata keys, alignment %u, tensor data at byte %llu\n", path,
           gguf_version(g), human_bytes((double)gguf_file_size(g), b1, sizeof b1), gguf_tensor_count(g), gguf_kv_count(g),
           gguf_alignment(g), (unsigned long long)gguf_data_offset(g));
    int ka = gguf_find_key(g, "general.architecture");
    const char *arch = gguf_get_str(g, ka, NULL);
    printf("architecture: %s\n", arch ? arch : "(general.architecture missing)");
    HybridConfig hc;
    DlError ce;
    bool have_cfg = model_gguf_config(g, &hc, &ce) == 0;
    if (have_cfg) print_config(&hc);
    else printf("config: not available as a llama teacher: %s\n", ce.msg);

    printf("metadata:\n");
    char *vb = dl_malloc(4096);
    for (int i = 0; i < gguf_kv_count(g); i++) {
        const GgufValue *v = gguf_kv_value(g, i);
        printf("  %-40s %-8s %s\n", gguf_kv_key(g, i), gguf_type_name(v->type), gguf_value_format(v, vb, 4096, o->max_items));
    }
    free(vb);
    printf("tensors: (shape in row-major/HF order, i.e. GGUF ne reversed)\n");
    int counts[64] = {0};
    uint64_t tbytes = 0;
    int64_t tparams = 0;
    for (int i = 0; i < gguf_tensor_count(g); i++) {
        const GgufTensor *t = gguf_tensor(g, i);
        const char *tn = "?";
        ggml_type_info(t->ggml_type, &tn, NULL, NULL);
        int64_t shape[GGUF_MAX_DIMS];
        int nd = gguf_tensor_shape(t, shape);
        char hf[128] = "";
        if (!gguf_name_to_hf(t->name, hf + 4, sizeof hf - 4)) memcpy(hf, "  = ", 4);
        printf("  %-28s %-16s %-6s %10s%s\n", t->name, shape_str(nd, shape, b1, sizeof b1), tn,
               human_bytes((double)t->nbytes, b2, sizeof b2), hf);
        if (t->ggml_type < 64) counts[t->ggml_type]++;
        tbytes += t->nbytes;
        tparams += t->numel;
    }
    printf("tensor types:");
    for (int k = 0; k < 64; k++)
        if (counts[k]) {
            const char *tn = "?";
            ggml_type_info((uint32_t)k, &tn, NULL, NULL);
            printf(" %s x%d", tn, counts[k]);
        }
    printf("; %lld elements in %s\n", (long long)tparams, human_bytes((double)tbytes, b1, sizeof b1));
    int rc = 0;
    if (o->dump && !o->hf) {
        int n = 0;
        for (int i = 0; i < gguf_tensor_count(g) && !rc; i++) {
            const GgufTensor *t = gguf_tensor(g, i);
            if (!wanted(o->dump, t->name)) continue;
            if (t->dtype < 0 || !quant_can_dequantize((DType)t->dtype)) {
                rc = dl_fail(e, "%s: tensor '%s': cannot dequantize this type", path, t->name);
                break;
            }
            float *x = dl_malloc((size_t)DL_MAX(t->numel, 1) * sizeof(float));
            dequantize((DType)t->dtype, t->data, x, t->numel);
            int64_t shape[GGUF_MAX_DIMS];
            int nd = gguf_tensor_shape(t, shape);
            rc = dump_one(o, t->name, x, nd, shape, e);
            free(x);
            n++;
        }
        if (!rc && !n) rc = dl_fail(e, "--dump: no tensor named '%s' in %s", o->dump, path);
        if (!rc) printf("dumped %d tensors (file layout, dequantized) to %s\n", n, o->out);
    }
    gguf_close(g);
    if (!rc && o->dump && o->hf) rc = dump_hf(path, o, e);
    return rc;
}

// ---------------------------------------------------------------- safetensors

static void print_st(const SafeTensors *s) {
    char b1[64], b2[64];
    if (st_shard_count(s) > 1) {
        printf("shards: %d\n", st_shard_count(s));
        for (int i = 0; i < st_shard_count(s); i++) printf("  %s\n", st_shard_path(s, i));
    }
    if (st_metadata_count(s)) {
        printf("metadata:\n");
        for (int i = 0; i < st_metadata_count(s); i++) printf("  %s = %s\n", st_metadata_key(s, i), st_metadata_value(s, i));
    }
    printf("tensors:\n");
    uint64_t tb = 0;
    int64_t tp = 0;
    int dtcount[DT_COUNT] = {0};
    for (int i = 0; i < st_count(s); i++) {
        const StTensor *t = st_tensor(s, i);
        printf("  %-56s %-16s %-5s %10s\n", t->name, shape_str(t->ndim, t->shape, b1, sizeof b1), dtype_name(t->dtype),
               human_bytes((double)t->nbytes, b2, sizeof b2));
        tb += t->nbytes;
        tp += t->numel;
        dtcount[t->dtype]++;
    }
    printf("tensor types:");
    for (int k = 0; k < DT_COUNT; k++)
        if (dtcount[k]) printf(" %s x%d", dtype_name((DType)k), dtcount[k]);
    printf("; %d tensors, %lld elements in %s\n", st_count(s), (long long)tp, human_bytes((double)tb, b1, sizeof b1));
}

static bool probe_st(const char *path) {
    return has_suffix(path, ".safetensors") || has_suffix(path, ".safetensors.index.json");
}

static int describe_st(const char *path, const InspectOpts *o, DlError *e) {
    SafeTensors *s;
    if (st_open(&s, path, e)) return -1;
    printf("file: %s\nformat: safetensors\n", path);
    print_st(s);
    int rc = 0;
    if (o->dump) {
        int n = 0;
        for (int i = 0; i < st_count(s) && !rc; i++) {
            const StTensor *t = st_tensor(s, i);
            if (!wanted(o->dump, t->name)) continue;
            float *x = dl_malloc((size_t)DL_MAX(t->numel, 1) * sizeof(float));
            rc = st_to_f32(t, x, e) || dump_one(o, t->name, x, t->ndim, t->shape, e);
            free(x);
            n++;
        }
        if (!rc && !n) rc = dl_fail(e, "--dump: no tensor named '%s' in %s", o->dump, path);
    }
    st_close(s);
    return rc;
}

// ---------------------------------------------------------------- HF directory and config json

static bool probe_hf_dir(const char *path) {
    if (!dl_is_dir(path)) return false;
    char *c = dl_path_join(path, "config.json");
    bool ok = dl_file_exists(c);
    free(c);
    return ok;
}

static int describe_hf_dir(const char *path, const InspectOpts *o, DlError *e) {
    HybridConfig hc;
    if (model_read_config(path, &hc, e)) return -1;
    SafeTensors *s;
    if (st_open(&s, path, e)) return -1;
    printf("directory: %s\nformat: HF model directory (config.json%s + safetensors)\narchitecture: %s\n", path,
           hybrid_n_attn(&hc) == hc.base.n_layer ? "" : " + mamba_config.json",
           hybrid_n_attn(&hc) == hc.base.n_layer ? "llama" : "MambaInLlama hybrid");
    print_config(&hc);
    print_st(s);
    // the tensors must be exactly the registry of the config (names and shapes)
    Registry r;
    model_build_registry(&hc, &r);
    int rc = 0;
    char b1[64], b2[64];
    for (int i = 0; i < r.n && !rc; i++) {
        int k = st_find(s, r.t[i].name);
        if (k < 0) {
            rc = dl_fail(e, "%s: tensor '%s' (shape %s) is missing", path, r.t[i].name, reg_shape_str(&r.t[i], b1, sizeof b1));
            break;
        }
        const StTensor *t = st_tensor(s, k);
        bool same = t->ndim == r.t[i].ndim;
        for (int d = 0; same && d < t->ndim; d++) same = t->shape[d] == r.t[i].shape[d];
        if (!same)
            rc = dl_fail(e, "%s: tensor '%s' has shape %s, expected %s", path, t->name, shape_str(t->ndim, t->shape, b1, sizeof b1),
                         reg_shape_str(&r.t[i], b2, sizeof b2));
        else if (t->dtype != DT_F32 && t->dtype != DT_F16 && t->dtype != DT_BF16)
            rc = dl_fail(e, "%s: tensor '%s' has dtype %s (expected F32, F16 or BF16)", path, t->name, dtype_name(t->dtype));
    }
    if (!rc) printf("check: all %d tensors of the config are present with the right shapes\n", r.n);
    reg_free(&r);
    st_close(s);
    if (!rc && o->dump) rc = o->hf ? dump_hf(path, o, e) : dl_fail(e, "--dump on a directory needs --hf");
    return rc;
}

static bool probe_config_json(const char *path) { return has_suffix(path, ".json") && !dl_is_dir(path); }

static int describe_config_json(const char *path, const InspectOpts *o, DlError *e) {
    HybridConfig hc;
    if (model_read_config(path, &hc, e)) return -1;
    printf("file: %s\nformat: HF config.json (no weights: `distill` fills random weights from a seed)\narchitecture: llama\n", path);
    print_config(&hc);
    if (o->dump) return o->hf ? dump_hf(path, o, e) : dl_fail(e, "--dump on a config needs --hf");
    return 0;
}

// ---------------------------------------------------------------- HDF5 checkpoints (checkpoint.c describes them)

static int describe_ckpt(const char *path, const InspectOpts *o, DlError *e) {
    if (o->dump) return dl_fail(e, "--dump is not supported for checkpoints (use the model loader on an export)");
    printf("file: %s\nformat: HDF5\n", path);
    return checkpoint_describe(path, stdout, e);
}

// ---------------------------------------------------------------- dispatch

static const Inspector INSPECTORS[] = {
    {"HDF5 checkpoint", checkpoint_is_hdf5, describe_ckpt},
    {"GGUF", probe_gguf, describe_gguf},
    {"safetensors", probe_st, describe_st},
    {"HF model directory", probe_hf_dir, describe_hf_dir},
    {"HF config", probe_config_json, describe_config_json},
};

static int run_inspect(int argc, char **argv) {
    InspectOpts o = {.max_items = 8, .seed = 0};
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--dump") && i + 1 < argc) o.dump = argv[++i];
        else if (!strcmp(a, "--out") && i + 1 < argc) o.out = argv[++i];
        else if (!strcmp(a, "--hf")) o.hf = true;
        else if (!strcmp(a, "--seed") && i + 1 < argc) o.seed = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--max-items") && i + 1 < argc) o.max_items = atoi(argv[++i]);
        else if (a[0] == '-') dl_die(DL_EXIT_USAGE, "inspect: unknown option '%s' (see distill inspect --help)", a);
        else if (!path) path = a;
        else dl_die(DL_EXIT_USAGE, "inspect: one FILE at a time (got '%s' and '%s')", path, a);
    }
    if (!path) dl_die(DL_EXIT_USAGE, "inspect: missing FILE (see distill inspect --help)");
    if (o.dump && !o.out) dl_die(DL_EXIT_USAGE, "inspect: --dump needs --out DIR");
    if (!dl_file_exists(path) && !dl_is_dir(path)) dl_die(DL_EXIT_INPUT, "%s: no such file or directory", path);
    DlError e;
    if (o.out && dl_mkdirs(o.out, &e)) dl_die(DL_EXIT_RUNTIME, "%s", e.msg);
    for (size_t i = 0; i < DL_ARRAY_LEN(INSPECTORS); i++) {
        if (!INSPECTORS[i].probe(path)) continue;
        if (INSPECTORS[i].describe(path, &o, &e)) {
            fflush(stdout);
            dl_die(DL_EXIT_INPUT, "%s", e.msg);
        }
        return DL_EXIT_OK;
    }
    dl_die(DL_EXIT_INPUT, "%s: not a recognized model file (expected GGUF, safetensors, an HF model directory, a config .json or an HDF5 checkpoint)", path);
}

DL_COMMAND(inspect_cmd, {
    .name = "inspect",
    .usage = "FILE [--max-items N] [--dump NAMES|all --out DIR [--hf] [--seed S]]",
    .summary = "describe a model file: GGUF, safetensors, HF model directory, config .json, HDF5 checkpoint",
    .help = "Shows the format, architecture and config (layers, hidden size, heads, KV heads, vocab, tied\n"
            "embeddings), the metadata (long arrays summarized) and every tensor with its shape and dtype or\n"
            "quantization type. For HF directories it also checks that the tensors match the config.\n\n"
            "options:\n"
            "  --max-items N   array elements shown per metadata value (default 8)\n"
            "  --dump NAMES    write the comma-separated tensors (or 'all') as fp32 .npy files into --out DIR:\n"
            "                  by default the file's own tensors, dequantized, in the file's layout\n"
            "  --hf            dump through the model loader instead: HF names and layout (Q/K un-permuted)\n"
            "  --seed S        seed for random weights when FILE is a config .json (with --hf)\n\n"
            "examples:\n"
            "  distill inspect checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf\n"
            "  distill inspect recipes/configs/llama3-8b.json\n",
    .run = run_inspect,
})
