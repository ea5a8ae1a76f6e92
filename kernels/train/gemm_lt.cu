// gemm_lt.cu: the cuBLASLt GEMM wrapper of the training backend (twin of linear_fwd / linear_bwd).
// Row-major C = op(A) op(B) is computed as the column-major product C^T = op(B)^T op(A)^T, so the row-major
// operands are handed to cuBLASLt unchanged with A and B swapped. Descriptors, layouts and the chosen
// algorithm are cached per shape key; the algorithm is the first heuristic result with in-place split-K
// reductions excluded, so each shape always runs one fixed, deterministic kernel.
#include <cublasLt.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

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

// DISTILL_GEMM_SURVEY=1: at a shape's first call, time each of the (up to 16) algorithms the heuristic offers on
// the call's own operands, into a scratch output, and print them beside the chosen one (the first). The choice
// is not changed: this only says whether another algorithm would pay for a shape of a real step.
static void survey(DlGemm *g, GemmPlan *p, const void *A, const void *B, const void *bias, cudaStream_t stream) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(stream, &cap);
    if (cap != cudaStreamCaptureStatusNone) return;  // no timing inside a graph capture
    enum { MAX_ALGOS = 16, REPS = 10 };
    cublasLtMatmulHeuristicResult_t res[MAX_ALGOS];
    int found = 0;
    if (heuristics(g, p, MAX_ALGOS, res, &found) != CUBLAS_STATUS_SUCCESS || found == 0) return;
    const GemmKey *k = &p->key;
    void *C = NULL;
    if (cudaMalloc(&C, (size_t)k->m * k->n * esize((DType)k->c_dt)) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    if (bias) cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    const float one = 1.f, zero = 0.f;
    const double flop = 2.0 * k->m * k->n * k->k;
    float best_ms = 0, first_ms = 0;
    int best = -1;
    for (int i = 0; i < found; i++) {
        cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
        for (int r = 0; r < 2 && st == CUBLAS_STATUS_SUCCESS; r++)
            st = cublasLtMatmul(g->lt, p->desc, &one, B, p->la, A, p->lb, &zero, C, p->lc, C, p->lc, &res[i].algo, g->ws,
                                g->ws_bytes, stream);
        if (st != CUBLAS_STATUS_SUCCESS) continue;
        cudaCheck(cudaEventRecord(e0, stream));
        for (int r = 0; r < REPS; r++)
            cublasLtMatmul(g->lt, p->desc, &one, B, p->la, A, p->lb, &zero, C, p->lc, C, p->lc, &res[i].algo, g->ws,
                           g->ws_bytes, stream);
        cudaCheck(cudaEventRecord(e1, stream));
        cudaCheck(cudaEventSynchronize(e1));
        float ms = 0;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        ms /= REPS;
        if (i == 0) first_ms = ms;
        if (best < 0 || ms < best_ms) best = i, best_ms = ms;
        char name[128];
        algo_name(&res[i].algo, name, sizeof name);
        fprintf(stderr, "gemm survey   #%-2d %8.4f ms %6.1f TF/s  %s\n", i, ms, flop / ms * 1e-9, name);
    }
    fprintf(stderr, "gemm survey m %d n %d k %d transA %d transB %d %s out%s beta %d: chosen #0 %.4f ms, best #%d %.4f ms "
                    "(%+.1f%%), %d algorithms\n", k->m, k->n, k->k, k->ta, k->tb, k->c_dt == DT_BF16 ? "bf16" : "f32",
            k->bias ? " bias" : "", k->beta_nz, first_ms, best, best_ms, first_ms > 0 ? 100.0 * (best_ms / first_ms - 1) : 0.0,
            found);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(C);
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
    if (g->n > plans_before) {
        static int survey_on = -1;
        if (survey_on < 0) survey_on = getenv("DISTILL_GEMM_SURVEY") && !strcmp(getenv("DISTILL_GEMM_SURVEY"), "1");
        if (survey_on) survey(g, p, A, B, bias, (cudaStream_t)stream);
    }
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
