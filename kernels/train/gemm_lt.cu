// gemm_lt.cu: the cuBLASLt GEMM wrapper of the training backend (twin of linear_fwd / linear_bwd).
// Row-major C = op(A) op(B) is computed as the column-major product C^T = op(B)^T op(A)^T, so the row-major
// operands are handed to cuBLASLt unchanged with A and B swapped. Descriptors, layouts and the chosen
// algorithm are cached per shape key; the algorithm is one of the heuristic's offers (in-place split-K
// reductions excluded), the first or the fastest by a one-time tuning kept process-wide and in a cache file
// ("GEMM tuning" below), so each shape always runs one fixed, deterministic kernel.
#include <cublasLt.h>
#include <stdlib.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/train/train_check.cuh"
#include "kernels/train/train_cuda.h"

typedef struct {
    int m, n, k, ta, tb, ab_dt, c_dt, bias, beta_nz;
} GemmKey;

typedef struct {
    GemmKey key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;  // la: cuBLAS "A" = our B; lb: cuBLAS "B" = our A
    cublasLtMatmulAlgo_t algo;
} GemmPlan;

struct DlGemm {
    cublasLtHandle_t lt;
    void *ws;
    size_t ws_bytes;
    GemmPlan *plans;
    int n, cap;
};

static cudaDataType_t cuda_type(DType dt) { return dt == DT_BF16 ? CUDA_R_16BF : CUDA_R_32F; }
static int esize(DType dt) { return dt == DT_BF16 ? 2 : 4; }

extern "C" DlGemm *dl_gemm_new(size_t workspace_bytes, char *err, size_t errlen) {
    DlGemm *g = (DlGemm *)calloc(1, sizeof(DlGemm));
    if (!g) {
        train_fail(err, errlen, "dl_gemm_new: out of host memory");
        return NULL;
    }
    g->ws_bytes = workspace_bytes ? workspace_bytes : (size_t)32 << 20;
    cublasCheck(cublasLtCreate(&g->lt));
    cudaCheck(cudaMalloc(&g->ws, g->ws_bytes));
    return g;
}

extern "C" void dl_gemm_free(DlGemm *g) {
    if (!g) return;
    for (int i = 0; i < g->n; i++) {
        cublasLtMatmulDescDestroy(g->plans[i].desc);
        cublasLtMatrixLayoutDestroy(g->plans[i].la);
        cublasLtMatrixLayoutDestroy(g->plans[i].lb);
        cublasLtMatrixLayoutDestroy(g->plans[i].lc);
    }
    free(g->plans);
    cudaFree(g->ws);
    cublasLtDestroy(g->lt);
    free(g);
}

// The heuristic's first `want` algorithms for a plan: 16-byte aligned operands, no in-place split-K reduction
// (its atomics would make the sum order vary between runs).
static cublasStatus_t heuristics(DlGemm *g, GemmPlan *p, int want, cublasLtMatmulHeuristicResult_t *res, int *found) {
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = g->ws_bytes;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    uint32_t red = CUBLASLT_REDUCTION_SCHEME_MASK & ~(uint32_t)CUBLASLT_REDUCTION_SCHEME_INPLACE;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &red, sizeof red));
    uint32_t align = 16;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align, sizeof align));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align, sizeof align));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof align));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof align));
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(g->lt, p->desc, p->la, p->lb, p->lc, p->lc, pref, want, res, found);
    cublasLtMatmulPreferenceDestroy(pref);
    return st;
}

static GemmPlan *plan_get(DlGemm *g, const GemmKey *key, char *err, size_t errlen) {
    for (int i = 0; i < g->n; i++)
        if (!memcmp(&g->plans[i].key, key, sizeof *key)) return &g->plans[i];
    if (g->n == g->cap) {
        int cap = g->cap ? 2 * g->cap : 16;
        GemmPlan *p = (GemmPlan *)realloc(g->plans, (size_t)cap * sizeof(GemmPlan));
        if (!p) {
            train_fail(err, errlen, "dl_gemm: out of host memory");
            return NULL;
        }
        g->plans = p, g->cap = cap;
    }
    GemmPlan *p = &g->plans[g->n];
    memset(p, 0, sizeof *p);
    p->key = *key;
    const DType ab = (DType)key->ab_dt, cd = (DType)key->c_dt;
    cublasCheck(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // cuBLAS A = our B (col-major view of row-major B: [n, k] if !tb, stored [k, n] read as n x k)
    cublasOperation_t opA = key->tb ? CUBLAS_OP_T : CUBLAS_OP_N, opB = key->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof opA));
    cublasCheck(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opB, sizeof opB));
    if (key->bias) {
        cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
        cublasCheck(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
        cudaDataType_t bt = cuda_type(cd);
        cublasCheck(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
    }
    const int m = key->m, n = key->n, k = key->k;
    // column-major layouts: rows, cols, leading dimension
    if (key->tb) cublasCheck(cublasLtMatrixLayoutCreate(&p->la, cuda_type(ab), k, n, k));  // B stored [n, k]
    else cublasCheck(cublasLtMatrixLayoutCreate(&p->la, cuda_type(ab), n, k, n));          // B stored [k, n]
    if (key->ta) cublasCheck(cublasLtMatrixLayoutCreate(&p->lb, cuda_type(ab), m, k, m));  // A stored [k, m]
    else cublasCheck(cublasLtMatrixLayoutCreate(&p->lb, cuda_type(ab), k, m, k));          // A stored [m, k]
    cublasCheck(cublasLtMatrixLayoutCreate(&p->lc, cuda_type(cd), n, m, n));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t st = heuristics(g, p, 1, &res, &found);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
        cublasLtMatmulDescDestroy(p->desc);
        cublasLtMatrixLayoutDestroy(p->la);
        cublasLtMatrixLayoutDestroy(p->lb);
        cublasLtMatrixLayoutDestroy(p->lc);
        train_fail(err, errlen,
                   "dl_gemm: cuBLASLt has no algorithm for m %d n %d k %d transA %d transB %d (%s in, %s out%s): %s",
                   m, n, k, key->ta, key->tb, ab == DT_BF16 ? "bf16" : "f32", cd == DT_BF16 ? "bf16" : "f32",
                   key->bias ? ", bias" : "", cublasLtGetStatusString(st));
        return NULL;
    }
    p->algo = res.algo;
    g->n++;
    return p;
}

// An algorithm's identity for the survey's lines: cuBLASLt's algo id, tile, stages, split-K and cluster shape.
static void algo_name(const cublasLtMatmulAlgo_t *a, char *buf, size_t len) {
    int id = 0, tile = 0, stages = 0, splitk = 1, cluster = 0;
    size_t w;
    cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &w);
    cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &w);
    cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &w);
    cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &w);
    cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof cluster, &w);
    snprintf(buf, len, "algo %d tile %d stages %d splitk %d cluster %d", id, tile, stages, splitk, cluster);
}

// ---- GEMM tuning -------------------------------------------------------------------------------------------------
// cuBLASLt's first heuristic choice is not always its fastest offer on the step's shapes (H100, 8B step, medians
// of 3 rounds: the head at 1046 rows 1.711 vs 1.556 ms, SmolLM2's gate+up 0.094 vs 0.081 ms; single timings were
// noisier, which is why rounds and a margin). So at a shape's first call the offers are timed on the call's own operands and the
// fastest is kept when it beats the first by TUNE_MARGIN. Different kernels sum in different orders, so a choice
// must not change between runs: choices are process-wide (every engine of a process runs the same kernel for a
// shape) and appended to a cache file, read back by every later process on the same GPU model, cuBLASLt version
// and workspace (DISTILL_GEMM_TUNE_FILE, default $XDG_CACHE_HOME or ~/.cache /distill/gemm-tune.txt). Only calls
// that overwrite their output (beta = 0) outside a graph capture are timed; the others keep the first offer unless
// the file already names a choice. Opt-in (DISTILL_GEMM_TUNE=1, recipe hardware.gemm_tune): measured on an H100
// (docs/BENCHMARKS.md) it made steps 1-2.4% faster, and a first run's choices depend on timings within the margin,
// so two first runs on a machine without the cache may differ in their last bits; off, the first offer is used
// everywhere. DISTILL_GEMM_SURVEY=1 prints every timed offer (and times, without keeping, when tuning is off).
enum { TUNE_OFFERS = 8, TUNE_ROUNDS = 3, TUNE_REPS = 3 };
static const double TUNE_MARGIN = 0.05;

typedef struct {
    GemmKey key;
    uint64_t ws;
    cublasLtMatmulAlgo_t algo;
} TuneEntry;

static struct {
    pthread_mutex_t mu;
    int loaded, on, survey;
    char path[1024], device[128];
    int lt_version;
    TuneEntry *e;
    int n, cap;
} g_tune = {PTHREAD_MUTEX_INITIALIZER};

static void tune_add(const GemmKey *key, uint64_t ws, const cublasLtMatmulAlgo_t *algo) {
    if (g_tune.n == g_tune.cap) {
        int cap = g_tune.cap ? 2 * g_tune.cap : 64;
        TuneEntry *e = (TuneEntry *)realloc(g_tune.e, (size_t)cap * sizeof(TuneEntry));
        if (!e) return;  // the choice then just is not remembered
        g_tune.e = e, g_tune.cap = cap;
    }
    TuneEntry *t = &g_tune.e[g_tune.n++];
    memset(t, 0, sizeof *t);
    t->key = *key, t->ws = ws, t->algo = *algo;
}

static const TuneEntry *tune_find(const GemmKey *key, uint64_t ws) {
    for (int i = 0; i < g_tune.n; i++)
        if (g_tune.e[i].ws == ws && !memcmp(&g_tune.e[i].key, key, sizeof *key)) return &g_tune.e[i];
    return NULL;
}

// A cache line: device|cuBLASLt version|m n k ta tb ab c bias beta ws|8 hex words of the algorithm.
static void tune_load(void) {
    const char *on = getenv("DISTILL_GEMM_TUNE"), *sv = getenv("DISTILL_GEMM_SURVEY");
    g_tune.on = on && !strcmp(on, "1");
    g_tune.survey = sv && !strcmp(sv, "1");
    g_tune.lt_version = (int)cublasLtGetVersion();
    cudaDeviceProp prop;
    int dev = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&prop, dev) == cudaSuccess)
        snprintf(g_tune.device, sizeof g_tune.device, "%s", prop.name);
    for (char *c = g_tune.device; *c; c++)
        if (*c == '|' || *c == '\n') *c = ' ';
    const char *f = getenv("DISTILL_GEMM_TUNE_FILE"), *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (f && *f) snprintf(g_tune.path, sizeof g_tune.path, "%s", f);
    else if (xdg && *xdg) snprintf(g_tune.path, sizeof g_tune.path, "%s/distill/gemm-tune.txt", xdg);
    else if (home && *home) snprintf(g_tune.path, sizeof g_tune.path, "%s/.cache/distill/gemm-tune.txt", home);
    FILE *fp = g_tune.path[0] ? fopen(g_tune.path, "r") : NULL;
    if (!fp) return;
    char line[1024], dev_name[128];
    while (fgets(line, sizeof line, fp)) {
        char *bar1 = strchr(line, '|'), *bar2 = bar1 ? strchr(bar1 + 1, '|') : NULL, *bar3 = bar2 ? strchr(bar2 + 1, '|') : NULL;
        if (!bar3 || bar1 - line >= (long)sizeof dev_name) continue;
        memcpy(dev_name, line, (size_t)(bar1 - line));
        dev_name[bar1 - line] = 0;
        if (strcmp(dev_name, g_tune.device) || atoi(bar1 + 1) != g_tune.lt_version) continue;
        GemmKey key;
        memset(&key, 0, sizeof key);
        unsigned long long ws = 0, w[8];
        if (sscanf(bar2 + 1, "%d %d %d %d %d %d %d %d %d %llu", &key.m, &key.n, &key.k, &key.ta, &key.tb, &key.ab_dt,
                   &key.c_dt, &key.bias, &key.beta_nz, &ws) != 10)
            continue;
        if (sscanf(bar3 + 1, "%llx %llx %llx %llx %llx %llx %llx %llx", &w[0], &w[1], &w[2], &w[3], &w[4], &w[5], &w[6],
                   &w[7]) != 8)
            continue;
        if (tune_find(&key, ws)) continue;  // the first line for a shape wins, as it did for the process that wrote it
        cublasLtMatmulAlgo_t algo;
        memset(&algo, 0, sizeof algo);
        for (int i = 0; i < 8; i++) algo.data[i] = w[i];
        tune_add(&key, ws, &algo);
    }
    fclose(fp);
}

static void tune_save(const GemmKey *k, uint64_t ws, const cublasLtMatmulAlgo_t *algo) {
    if (!g_tune.path[0]) return;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", g_tune.path);
    for (char *c = dir + 1; *c; c++)  // mkdir -p of the file's folder
        if (*c == '/') {
            *c = 0;
            mkdir(dir, 0755);
            *c = '/';
        }
    char line[1024];
    int n = snprintf(line, sizeof line, "%s|%d|%d %d %d %d %d %d %d %d %d %llu|", g_tune.device, g_tune.lt_version, k->m,
                     k->n, k->k, k->ta, k->tb, k->ab_dt, k->c_dt, k->bias, k->beta_nz, (unsigned long long)ws);
    for (int i = 0; i < 8; i++) n += snprintf(line + n, sizeof line - n, "%llx%c", (unsigned long long)algo->data[i], i < 7 ? ' ' : '\n');
    int fd = open(g_tune.path, O_WRONLY | O_CREAT | O_APPEND, 0644);  // one write per line: ranks may append at once
    if (fd < 0) return;
    if (write(fd, line, (size_t)n) != n) { /* a lost line only means the next process times the shape again */ }
    close(fd);
}

extern "C" void dl_gemm_tune_reload(void) {
    pthread_mutex_lock(&g_tune.mu);
    free(g_tune.e);
    g_tune.e = NULL, g_tune.n = g_tune.cap = 0, g_tune.loaded = 0;
    pthread_mutex_unlock(&g_tune.mu);
}

// Median time (ms) of each offer over TUNE_ROUNDS interleaved rounds of TUNE_REPS calls, into C (which the caller
// owns for that long); an offer that fails to run gets +inf.
static void time_offers(DlGemm *g, GemmPlan *p, const cublasLtMatmulHeuristicResult_t *res, int found, const void *A,
                        const void *B, void *C, cudaStream_t stream, float *ms_out) {
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    const float one = 1.f, zero = 0.f;
    float t[TUNE_OFFERS][TUNE_ROUNDS];
    int ok[TUNE_OFFERS];
    for (int i = 0; i < found; i++)  // warm-up, and which offers run at all
        ok[i] = cublasLtMatmul(g->lt, p->desc, &one, B, p->la, A, p->lb, &zero, C, p->lc, C, p->lc, &res[i].algo, g->ws,
                               g->ws_bytes, stream) == CUBLAS_STATUS_SUCCESS;
    for (int r = 0; r < TUNE_ROUNDS; r++)
        for (int i = 0; i < found; i++) {
            t[i][r] = INFINITY;
            if (!ok[i]) continue;
            cudaCheck(cudaEventRecord(e0, stream));
            for (int q = 0; q < TUNE_REPS; q++)
                cublasLtMatmul(g->lt, p->desc, &one, B, p->la, A, p->lb, &zero, C, p->lc, C, p->lc, &res[i].algo, g->ws,
                               g->ws_bytes, stream);
            cudaCheck(cudaEventRecord(e1, stream));
            cudaCheck(cudaEventSynchronize(e1));
            cudaCheck(cudaEventElapsedTime(&t[i][r], e0, e1));
            t[i][r] /= TUNE_REPS;
        }
    for (int i = 0; i < found; i++) {  // median of the rounds (insertion sort of 3)
        float *v = t[i];
        for (int a = 1; a < TUNE_ROUNDS; a++)
            for (int b = a; b > 0 && v[b] < v[b - 1]; b--) {
                float x = v[b];
                v[b] = v[b - 1], v[b - 1] = x;
            }
        ms_out[i] = v[TUNE_ROUNDS / 2];
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
}

// Picks a new plan's algorithm (p->algo holds the first offer): the cache's choice, else a timed one (see above).
// Called with g_tune.mu held.
static void tune_plan_locked(DlGemm *g, GemmPlan *p, const void *A, const void *B, void *C, const void *bias,
                             cudaStream_t stream) {
    if (!g_tune.loaded) tune_load(), g_tune.loaded = 1;
    const TuneEntry *hit = g_tune.on ? tune_find(&p->key, g->ws_bytes) : NULL;
    if (hit) {
        cublasLtMatmulHeuristicResult_t chk;
        memset(&chk, 0, sizeof chk);
        if (cublasLtMatmulAlgoCheck(g->lt, p->desc, p->la, p->lb, p->lc, p->lc, &hit->algo, &chk) == CUBLAS_STATUS_SUCCESS &&
            chk.workspaceSize <= g->ws_bytes)
            p->algo = hit->algo;
        return;
    }
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(stream, &cap);
    const GemmKey *k = &p->key;
    if ((!g_tune.on && !g_tune.survey) || cap != cudaStreamCaptureStatusNone || (k->beta_nz && !g_tune.survey)) return;
    cublasLtMatmulHeuristicResult_t res[TUNE_OFFERS];
    int found = 0;
    if (heuristics(g, p, TUNE_OFFERS, res, &found) != CUBLAS_STATUS_SUCCESS || found < 2) return;
    // accumulating calls (survey only) are timed into a scratch output: C holds data the call adds to
    void *out = C, *scratch = NULL;
    if (k->beta_nz) {
        if (cudaMalloc(&scratch, (size_t)k->m * k->n * esize((DType)k->c_dt)) != cudaSuccess) {
            cudaGetLastError();
            return;
        }
        out = scratch;
    }
    if (bias) cublasCheck(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    float ms[TUNE_OFFERS];
    time_offers(g, p, res, found, A, B, out, stream, ms);
    int best = 0;
    for (int i = 1; i < found; i++)
        if (ms[i] < ms[best]) best = i;
    if (ms[best] > (1.0 - TUNE_MARGIN) * ms[0]) best = 0;
    if (g_tune.survey) {
        const double flop = 2.0 * k->m * k->n * k->k;
        for (int i = 0; i < found; i++) {
            char name[128];
            algo_name(&res[i].algo, name, sizeof name);
            fprintf(stderr, "gemm survey   #%-2d %8.4f ms %6.1f TF/s  %s\n", i, ms[i], flop / ms[i] * 1e-9, name);
        }
        fprintf(stderr, "gemm survey m %d n %d k %d transA %d transB %d %s out%s beta %d: first %.4f ms, fastest %.4f ms "
                        "(%+.1f%%), %s #%d\n", k->m, k->n, k->k, k->ta, k->tb, k->c_dt == DT_BF16 ? "bf16" : "f32",
                k->bias ? " bias" : "", k->beta_nz, ms[0], ms[best], 100.0 * (ms[best] / ms[0] - 1),
                g_tune.on && !k->beta_nz ? "kept" : "not tuned, would keep", best);
    }
    if (scratch) cudaFree(scratch);
    if (g_tune.on && !k->beta_nz) {
        p->algo = res[best].algo;
        tune_add(k, g->ws_bytes, &res[best].algo);
        tune_save(k, g->ws_bytes, &res[best].algo);
    }
}

static void tune_plan(DlGemm *g, GemmPlan *p, const void *A, const void *B, void *C, const void *bias, cudaStream_t stream) {
    pthread_mutex_lock(&g_tune.mu);
    tune_plan_locked(g, p, A, B, C, bias, stream);
    pthread_mutex_unlock(&g_tune.mu);
}

extern "C" int dl_gemm(DlGemm *g, int m, int n, int k, DType ab_dt, const void *A, int transA, const void *B, int transB,
                       DType c_dt, void *C, const void *bias, float alpha, float beta, dl_stream_t stream, char *err,
                       size_t errlen) {
    if ((ab_dt != DT_BF16 && ab_dt != DT_F32) || (c_dt != DT_BF16 && c_dt != DT_F32))
        return train_fail(err, errlen, "dl_gemm: dtypes must be f32 or bf16");
    if (ab_dt == DT_F32 && c_dt == DT_BF16) return train_fail(err, errlen, "dl_gemm: f32 inputs with a bf16 output are not supported");
    if (m <= 0 || n <= 0 || k <= 0) return train_fail(err, errlen, "dl_gemm: empty shape m %d n %d k %d", m, n, k);
    if (((uintptr_t)A | (uintptr_t)B | (uintptr_t)C | (uintptr_t)bias) & 15)
        return train_fail(err, errlen, "dl_gemm: pointers must be 16-byte aligned");
    // leading dimensions (in elements) of row-major storage must give 16-byte aligned rows
    const int lda = transA ? m : k, ldb = transB ? k : n;
    if ((lda * esize(ab_dt)) % 16 || (ldb * esize(ab_dt)) % 16 || (n * esize(c_dt)) % 16)
        return train_fail(err, errlen, "dl_gemm: rows of A (%d), B (%d), C (%d elements) must be multiples of 16 bytes", lda, ldb, n);
    GemmKey key;
    memset(&key, 0, sizeof key);
    key.m = m, key.n = n, key.k = k, key.ta = !!transA, key.tb = !!transB, key.ab_dt = ab_dt, key.c_dt = c_dt;
    key.bias = bias != NULL, key.beta_nz = beta != 0.f;
    const int plans_before = g->n;
    GemmPlan *p = plan_get(g, &key, err, errlen);
    if (!p) return -1;
    if (g->n > plans_before) tune_plan(g, p, A, B, C, bias, (cudaStream_t)stream);
    if (bias) cublasCheck(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    cublasCheck(cublasLtMatmul(g->lt, p->desc, &alpha, B, p->la, A, p->lb, &beta, C, p->lc, C, p->lc, &p->algo, g->ws,
                               g->ws_bytes, (cudaStream_t)stream));
    return 0;
}

static int dim_ok(int64_t x) { return x > 0 && x <= 0x7fffffff; }

extern "C" int dl_linear_fwd(DlGemm *g, DType dt, void *y, const void *x, const void *W, const void *bias, int64_t N,
                             int64_t In, int64_t O, int accumulate, dl_stream_t stream, char *err, size_t errlen) {
    if (N == 0) return 0;
    if (!dim_ok(N) || !dim_ok(In) || !dim_ok(O)) return train_fail(err, errlen, "dl_linear_fwd: dims must be in 1..2^31-1");
    // y [N, O] = x [N, In] @ W^T, W stored [O, In]
    return dl_gemm(g, (int)N, (int)O, (int)In, dt, x, 0, W, 1, dt, y, bias, 1.f, accumulate ? 1.f : 0.f, stream, err, errlen);
}
extern "C" int dl_linear_dgrad(DlGemm *g, DType dt, void *dx, const void *dy, const void *W, int64_t N, int64_t In,
                               int64_t O, int accumulate, dl_stream_t stream, char *err, size_t errlen) {
    if (N == 0) return 0;
    if (!dim_ok(N) || !dim_ok(In) || !dim_ok(O)) return train_fail(err, errlen, "dl_linear_dgrad: dims must be in 1..2^31-1");
    // dx [N, In] = dy [N, O] @ W [O, In]
    return dl_gemm(g, (int)N, (int)In, (int)O, dt, dy, 0, W, 0, dt, dx, NULL, 1.f, accumulate ? 1.f : 0.f, stream, err, errlen);
}
extern "C" int dl_linear_wgrad(DlGemm *g, DType dt, DType dw_dt, void *dW, const void *dy, const void *x, int64_t N,
                               int64_t In, int64_t O, int accumulate, dl_stream_t stream, char *err, size_t errlen) {
    if (N == 0) return 0;
    if (!dim_ok(N) || !dim_ok(In) || !dim_ok(O)) return train_fail(err, errlen, "dl_linear_wgrad: dims must be in 1..2^31-1");
    // dW [O, In] = dy^T (dy stored [N, O]) @ x [N, In]
    return dl_gemm(g, (int)O, (int)In, (int)N, dt, dy, 1, x, 0, dw_dt, dW, NULL, 1.f, accumulate ? 1.f : 0.f, stream, err,
                   errlen);
}
