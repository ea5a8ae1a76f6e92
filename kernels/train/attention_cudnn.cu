// attention_cudnn.cu: attention through cuDNN's fused flash-attention (SDPA) graphs, built operation by
// operation with the cuDNN backend API (cudnnBackend*), the way cuDNN's own frontend lowers its "composite"
// SDPA node for cuDNN 9.x, so that the runtime-fusion engine recognizes the pattern. Interface and layouts:
// attention_cudnn.h. Notation: B batch rows, T tokens per row, H query heads, G = Hk key/value heads,
// D head size; every graph tensor is 4-d [batch, head, row, column] with strides into our token-major
// buffers (q[b, t, h, d] at ((b*T + t)*H + h)*D + d), so nothing is transposed or copied.
//
// Forward graph (per batch row and head):
//   S = Q·Kᵀ (Kᵀ is K read with swapped strides) → S·scale → (+ document bias) → (padding mask) →
//   causal mask (row index ≥ column index, else -inf, from generated indices) → softmax with statistics:
//   m = max_j S, E = exp(S - m), z = Σ_j E, Stats = m + log z (our lse), P = E / z (bf16) → O = P·V.
// Backward graph (dQ, dK, dV from Q, K, V, O, dO and Stats; nothing of the forward is kept):
//   Dsum = Σ_d dO∘O (fp32, a graph buffer), P = exp(S·scale (+ bias) - Stats) under the same masks,
//   dV = Pᵀ·dO, dS = P∘(dO·Vᵀ - Dsum)·scale, dK = dSᵀ·Q, dQ = dS·K; with GQA dK and dV are computed per
//   query head and summed over each group by a reduction. Deterministic handles write dQ straight from
//   the matmul (cuDNN's dP-workspace variant); others accumulate it in an fp32 buffer (atomics).
// Version workarounds (the ones cuDNN's frontend applies for the versions we may meet at run time):
//   backward with T % 128 != 0 on cuDNN <= 9.15 gets a padding mask with sequence lengths T; the masked
//   value is -FLT_MAX before 9.10 (-inf after); a padding mask is applied twice in the backward for
//   9.0 <= version < 9.10; the fp32 dQ accumulator is zeroed by us before 9.6.
#include "kernels/train/attention_cudnn.h"
#include "kernels/train/train_common.cuh"

#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#if DISTILL_HAVE_CUDNN
#include <cudnn.h>
#include <dlfcn.h>

// ---------------------------------------------------------------- the cuDNN entry points (dlopen)
struct CudnnApi {
    void *lib;
    decltype(&cudnnGetVersion) getVersion;
    decltype(&cudnnGetErrorString) errorString;
    decltype(&cudnnGetLastErrorString) lastError;
    decltype(&cudnnCreate) create;
    decltype(&cudnnDestroy) destroy;
    decltype(&cudnnSetStream) setStream;
    decltype(&cudnnBackendCreateDescriptor) bCreate;
    decltype(&cudnnBackendDestroyDescriptor) bDestroy;
    decltype(&cudnnBackendFinalize) bFinalize;
    decltype(&cudnnBackendSetAttribute) bSet;
    decltype(&cudnnBackendGetAttribute) bGet;
    decltype(&cudnnBackendExecute) bExecute;
};

static int api_load(CudnnApi *a, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    const char *env = getenv("DISTILL_CUDNN_LIB");
    const char *names[3] = {env && *env ? env : NULL, "libcudnn.so.9", "libcudnn.so"};
    const char *why = "";
    for (const char *n : names) {
        if (!n) continue;
        a->lib = dlopen(n, RTLD_NOW | RTLD_LOCAL);
        if (a->lib) break;
        why = dlerror();
    }
    if (!a->lib)
        return train_fail(err, errlen,
                          "cuDNN not available: cannot load libcudnn.so.9 (%s); install cuDNN 9 or point "
                          "LD_LIBRARY_PATH / DISTILL_CUDNN_LIB at it",
                          why ? why : "");
#define SDPA_SYM(field, name)                                                                             \
    do {                                                                                                  \
        a->field = (decltype(&name))dlsym(a->lib, #name);                                                 \
        if (!a->field) {                                                                                  \
            dlclose(a->lib);                                                                              \
            a->lib = NULL;                                                                                \
            return train_fail(err, errlen, "cuDNN library lacks %s (cuDNN 9 is required)", #name);        \
        }                                                                                                 \
    } while (0)
    SDPA_SYM(getVersion, cudnnGetVersion);
    SDPA_SYM(errorString, cudnnGetErrorString);
    SDPA_SYM(lastError, cudnnGetLastErrorString);
    SDPA_SYM(create, cudnnCreate);
    SDPA_SYM(destroy, cudnnDestroy);
    SDPA_SYM(setStream, cudnnSetStream);
    SDPA_SYM(bCreate, cudnnBackendCreateDescriptor);
    SDPA_SYM(bDestroy, cudnnBackendDestroyDescriptor);
    SDPA_SYM(bFinalize, cudnnBackendFinalize);
    SDPA_SYM(bSet, cudnnBackendSetAttribute);
    SDPA_SYM(bGet, cudnnBackendGetAttribute);
    SDPA_SYM(bExecute, cudnnBackendExecute);
#undef SDPA_SYM
    return 0;
}

// tensor unique ids of the graphs' named (non-virtual) tensors; virtual ones count up from UID_VIRTUAL
enum {
    UID_Q = 1, UID_K, UID_V, UID_O, UID_STATS, UID_DO, UID_DQ, UID_DK, UID_DV,
    UID_SCALE, UID_NEG_INF, UID_ONE, UID_BIAS, UID_SEQ_Q, UID_SEQ_KV, UID_DSUM, UID_DQ_ACC,
    UID_VIRTUAL = 100
};

// One cached execution plan and everything it references (descriptors are kept alive with the plan).
struct SdpaPlan {
    int bwd, causal, docs;
    int64_t B, T;
    int H, G, D;
    DType dt;
    int pad;         // version workaround: padding mask with lengths T
    int offline_ok;  // offline handle: an engine compiled the graph (no driver to load it)
    int failed;      // no plan for this shape: later calls fail fast with the same message
    char why[512];
    std::vector<cudnnBackendDescriptor_t> descs;
    cudnnBackendDescriptor_t plan;
    int64_t engine, workspace;
    void *aux;        // backward: Dsum [B, H, T] fp32, then (non-deterministic) dQ accumulator [B, H, T, D] fp32
    float *dsum, *dq_acc;
    int32_t *seqlen;  // [B] = T (pad only)
    size_t aux_bytes, guard;  // DISTILL_SDPA_GUARD: aux is followed by `guard` bytes of 0xA5
    float scale, neg_inf, one;  // by-value scalars (read by cudnnBackendExecute from these addresses)
};

struct SdpaCudnn {
    CudnnApi api;
    cudnnHandle_t handle;          // NULL offline (plans only, for a described device)
    cudnnBackendDescriptor_t devprop;  // offline: the described device
    int det;
    long version;
    std::vector<SdpaPlan *> plans;
    void *ws;  // shared workspace, grown at plan build time only
    size_t ws_bytes;
    void *bias;  // document bias [B, 1, T, T] of the activation dtype
    size_t bias_bytes;
    size_t ws_guard;  // DISTILL_SDPA_GUARD: the workspace is followed by this many bytes of 0xA5
};

// ---------------------------------------------------------------- graph building with checked calls
// Every cudnnBackend* call goes through one of the macros below, which name the call and the attribute;
// the first failure is recorded (status, cuDNN's last error message) and turns the later calls into no-ops.
struct Graph {
    const CudnnApi *a;
    std::vector<cudnnBackendDescriptor_t> *descs;
    std::vector<cudnnBackendDescriptor_t> ops;
    int64_t next_uid;
    const char *ctx;
    char *err;
    size_t errlen;
    bool bad;
};

static void g_fail(Graph &g, cudnnStatus_t st, const char *call, const char *what) {
    if (g.bad) return;
    g.bad = true;
    char last[384] = "";
    g.a->lastError(last, sizeof last);
    train_fail(g.err, g.errlen, "%s: %s(%s) failed: %s%s%s", g.ctx, call, what, g.a->errorString(st), *last ? ": " : "",
               last);
}
static cudnnBackendDescriptor_t g_new(Graph &g, cudnnBackendDescriptorType_t type, const char *name) {
    if (g.bad) return NULL;
    cudnnBackendDescriptor_t d = NULL;
    const cudnnStatus_t st = g.a->bCreate(type, &d);
    if (st != CUDNN_STATUS_SUCCESS) {
        g_fail(g, st, "cudnnBackendCreateDescriptor", name);
        return NULL;
    }
    g.descs->push_back(d);
    return d;
}
static void g_set(Graph &g, cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t attr, cudnnBackendAttributeType_t type,
                  int64_t n, const void *v, const char *name) {
    if (g.bad) return;
    const cudnnStatus_t st = g.a->bSet(d, attr, type, n, v);
    if (st != CUDNN_STATUS_SUCCESS) g_fail(g, st, "cudnnBackendSetAttribute", name);
}
static void g_get(Graph &g, cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t attr, cudnnBackendAttributeType_t type,
                  int64_t n, int64_t *got, void *v, const char *name) {
    if (g.bad) return;
    const cudnnStatus_t st = g.a->bGet(d, attr, type, n, got, v);
    if (st != CUDNN_STATUS_SUCCESS) g_fail(g, st, "cudnnBackendGetAttribute", name);
}
static void g_fin(Graph &g, cudnnBackendDescriptor_t d, const char *name) {
    if (g.bad) return;
    const cudnnStatus_t st = g.a->bFinalize(d);
    if (st != CUDNN_STATUS_SUCCESS) g_fail(g, st, "cudnnBackendFinalize", name);
}
#define GNEW(g, type) g_new(g, type, #type)
#define GSET(g, d, attr, type, n, v) g_set(g, d, attr, type, n, v, #attr)
#define GLINK(g, d, attr, desc)                                        \
    do {                                                               \
        cudnnBackendDescriptor_t l_ = (desc);                          \
        g_set(g, d, attr, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &l_, #attr); \
    } while (0)
#define GGET(g, d, attr, type, n, got, v) g_get(g, d, attr, type, n, got, v, #attr)
#define GFIN(g, d, what) g_fin(g, d, what)

struct Dims {
    int64_t v[4];
};
static Dims dims(int64_t a, int64_t b, int64_t c, int64_t d) { return Dims{{a, b, c, d}}; }

static cudnnBackendDescriptor_t g_tensor(Graph &g, int64_t uid, cudnnDataType_t dt, Dims dim, Dims str, bool is_virtual,
                                         bool by_value, const char *what) {
    cudnnBackendDescriptor_t t = GNEW(g, CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t align = 16;
    GSET(g, t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    GSET(g, t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt);
    GSET(g, t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dim.v);
    GSET(g, t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, str.v);
    GSET(g, t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
    GSET(g, t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) GSET(g, t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    GFIN(g, t, what);
    return t;
}
static cudnnBackendDescriptor_t g_virtual(Graph &g, cudnnDataType_t dt, Dims dim, Dims str) {
    return g_tensor(g, g.next_uid++, dt, dim, str, true, false, "virtual tensor");
}
static cudnnBackendDescriptor_t g_scalar(Graph &g, int64_t uid, cudnnDataType_t dt, const char *what) {
    return g_tensor(g, uid, dt, dims(1, 1, 1, 1), dims(1, 1, 1, 1), false, true, what);
}

// y = op(x [, b [, t]]) (BINARY_SELECT: y = t ? x : b). axis >= 0: GEN_INDEX's axis.
static cudnnBackendDescriptor_t g_pw(Graph &g, cudnnPointwiseMode_t mode, cudnnDataType_t prec, cudnnBackendDescriptor_t x,
                                     cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y,
                                     int64_t axis = -1) {
    cudnnBackendDescriptor_t pd = GNEW(g, CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    GSET(g, pd, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    GSET(g, pd, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (axis >= 0) GSET(g, pd, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    GFIN(g, pd, "pointwise descriptor");
    cudnnBackendDescriptor_t op = GNEW(g, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    GLINK(g, op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pd);
    GLINK(g, op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) GLINK(g, op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
    if (t) GLINK(g, op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
    GLINK(g, op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    GFIN(g, op, "pointwise operation");
    if (!g.bad) g.ops.push_back(op);
    return y;
}
// c = a·b (fp32 accumulation); the optional overrides are the per-batch sequence lengths of a padded graph
static void g_matmul(Graph &g, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c,
                     cudnnBackendDescriptor_t m_len, cudnnBackendDescriptor_t n_len, cudnnBackendDescriptor_t k_len) {
    cudnnBackendDescriptor_t md = GNEW(g, CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    GSET(g, md, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    GFIN(g, md, "matmul descriptor");
    cudnnBackendDescriptor_t op = GNEW(g, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    GLINK(g, op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
    GLINK(g, op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
    GLINK(g, op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
    GLINK(g, op, CUDNN_ATTR_OPERATION_MATMUL_DESC, md);
    if (m_len) GLINK(g, op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, m_len);
    if (n_len) GLINK(g, op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, n_len);
    if (k_len) GLINK(g, op, CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, k_len);
    GFIN(g, op, "matmul operation");
    if (!g.bad) g.ops.push_back(op);
}
// y = reduce(x) over the dimensions where y is smaller (ADD over a group of heads when y has G of H heads)
static void g_reduce(Graph &g, cudnnReduceTensorOp_t how, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t rd = GNEW(g, CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    GSET(g, rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &how);
    GSET(g, rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    GFIN(g, rd, "reduction descriptor");
    cudnnBackendDescriptor_t op = GNEW(g, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    GLINK(g, op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
    GLINK(g, op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
    GLINK(g, op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd);
    GFIN(g, op, "reduction operation");
    if (!g.bad) g.ops.push_back(op);
}
// y = x seen with other dimensions/strides (the transposes of the backward)
static void g_reshape(Graph &g, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t op = GNEW(g, CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    GLINK(g, op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x);
    GLINK(g, op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    GFIN(g, op, "reshape operation");
    if (!g.bad) g.ops.push_back(op);
}

// The shapes of one graph.
struct Shp {
    int64_t B, T, H, G, D;
    cudnnDataType_t io;
    Dims s_dim, s_str, st_str, stat_dim, stat_str;
};
static Shp shape_of(const SdpaPlan &p) {
    Shp s;
    s.B = p.B, s.T = p.T, s.H = p.H, s.G = p.G, s.D = p.D;
    s.io = p.dt == DT_F16 ? CUDNN_DATA_HALF : CUDNN_DATA_BFLOAT16;
    s.s_dim = dims(s.B, s.H, s.T, s.T);
    s.s_str = dims(s.H * s.T * s.T, s.T * s.T, s.T, 1);   // scores [b, h, query, key]
    s.st_str = dims(s.H * s.T * s.T, s.T * s.T, 1, s.T);  // the same storage seen as [b, h, key, query]
    s.stat_dim = dims(s.B, s.H, s.T, 1);
    s.stat_str = dims(s.H * s.T, s.T, 1, 1);  // = lse [B, H, T]
    return s;
}
static cudnnBackendDescriptor_t score(Graph &g, const Shp &s, cudnnDataType_t dt = CUDNN_DATA_FLOAT) {
    return g_virtual(g, dt, s.s_dim, s.s_str);
}
// x where (row < seq_q[b] and column < seq_kv[b]), else neg_inf
static cudnnBackendDescriptor_t padding_mask(Graph &g, const Shp &s, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t seq_q,
                                             cudnnBackendDescriptor_t seq_kv, cudnnBackendDescriptor_t neg_inf) {
    cudnnBackendDescriptor_t r = g_pw(g, CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, x, NULL, NULL, score(g, s, CUDNN_DATA_INT32), 2);
    cudnnBackendDescriptor_t c = g_pw(g, CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, x, NULL, NULL, score(g, s, CUDNN_DATA_INT32), 3);
    cudnnBackendDescriptor_t rm = g_pw(g, CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, r, seq_q, NULL, score(g, s, CUDNN_DATA_BOOLEAN));
    cudnnBackendDescriptor_t cm = g_pw(g, CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, c, seq_kv, NULL, score(g, s, CUDNN_DATA_BOOLEAN));
    cudnnBackendDescriptor_t m = g_pw(g, CUDNN_POINTWISE_LOGICAL_AND, CUDNN_DATA_BOOLEAN, rm, cm, NULL, score(g, s, CUDNN_DATA_BOOLEAN));
    return g_pw(g, CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, x, neg_inf, m, score(g, s));
}
// x where row >= column (a query sees itself and earlier keys), else neg_inf
static cudnnBackendDescriptor_t causal_mask(Graph &g, const Shp &s, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t neg_inf) {
    cudnnBackendDescriptor_t r = g_pw(g, CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, x, NULL, NULL, score(g, s, CUDNN_DATA_INT32), 2);
    cudnnBackendDescriptor_t c = g_pw(g, CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, x, NULL, NULL, score(g, s, CUDNN_DATA_INT32), 3);
    cudnnBackendDescriptor_t m = g_pw(g, CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, r, c, NULL, score(g, s, CUDNN_DATA_BOOLEAN));
    return g_pw(g, CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, x, neg_inf, m, score(g, s));
}

// The named tensors both graphs share. Q/O/dO/dQ [B, H, T, D] and K/V/dK/dV [B, G, T, D] over token-major
// storage; Kᵀ (and in the backward Vᵀ) are the same storage with the last two strides swapped.
struct Named {
    cudnnBackendDescriptor_t q, kt, v, vt, o, stats, scale, neg_inf, bias, seq_q, seq_kv;
};
static Named named_tensors(Graph &g, const Shp &s, const SdpaPlan &p) {
    const int64_t B = s.B, T = s.T, H = s.H, G = s.G, D = s.D;
    Named n;
    memset(&n, 0, sizeof n);
    n.q = g_tensor(g, UID_Q, s.io, dims(B, H, T, D), dims(T * H * D, D, H * D, 1), false, false, "tensor Q");
    n.kt = g_tensor(g, UID_K, s.io, dims(B, G, D, T), dims(T * G * D, D, 1, G * D), false, false, "tensor K (as Kᵀ)");
    if (p.bwd) n.vt = g_tensor(g, UID_V, s.io, dims(B, G, D, T), dims(T * G * D, D, 1, G * D), false, false, "tensor V (as Vᵀ)");
    else n.v = g_tensor(g, UID_V, s.io, dims(B, G, T, D), dims(T * G * D, D, G * D, 1), false, false, "tensor V");
    n.o = g_tensor(g, UID_O, s.io, dims(B, H, T, D), dims(T * H * D, D, H * D, 1), false, false, "tensor O");
    n.stats = g_tensor(g, UID_STATS, CUDNN_DATA_FLOAT, s.stat_dim, s.stat_str, false, false, "tensor Stats (lse)");
    n.scale = g_scalar(g, UID_SCALE, CUDNN_DATA_FLOAT, "scalar attention scale");
    if (p.causal || p.pad) n.neg_inf = g_scalar(g, UID_NEG_INF, CUDNN_DATA_FLOAT, "scalar -inf");
    if (p.docs) n.bias = g_tensor(g, UID_BIAS, s.io, dims(B, 1, T, T), dims(T * T, T * T, T, 1), false, false, "tensor document bias");
    if (p.pad) {
        n.seq_q = g_tensor(g, UID_SEQ_Q, CUDNN_DATA_INT32, dims(B, 1, 1, 1), dims(1, 1, 1, 1), false, false, "tensor seq_len_q");
        n.seq_kv = g_tensor(g, UID_SEQ_KV, CUDNN_DATA_INT32, dims(B, 1, 1, 1), dims(1, 1, 1, 1), false, false, "tensor seq_len_kv");
    }
    return n;
}

static void build_fwd(Graph &g, const SdpaPlan &p) {
    const Shp s = shape_of(p);
    const Named n = named_tensors(g, s, p);
    cudnnBackendDescriptor_t x = score(g, s);
    g_matmul(g, n.q, n.kt, x, n.seq_q, n.seq_kv, NULL);  // S = Q·Kᵀ
    x = g_pw(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, x, n.scale, NULL, score(g, s));
    if (p.docs) x = g_pw(g, CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, x, n.bias, NULL, score(g, s));
    if (p.pad) x = padding_mask(g, s, x, n.seq_q, n.seq_kv, n.neg_inf);
    if (p.causal) x = causal_mask(g, s, x, n.neg_inf);
    // softmax with statistics: Stats = max + log(sum exp(x - max)), P = exp(x - max) / sum
    cudnnBackendDescriptor_t mx = g_virtual(g, CUDNN_DATA_FLOAT, s.stat_dim, s.stat_str);
    g_reduce(g, CUDNN_REDUCE_TENSOR_MAX, x, mx);
    cudnnBackendDescriptor_t z = g_pw(g, CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, x, mx, NULL, score(g, s));
    cudnnBackendDescriptor_t e = g_pw(g, CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, z, NULL, NULL, score(g, s));
    cudnnBackendDescriptor_t sum = g_virtual(g, CUDNN_DATA_FLOAT, s.stat_dim, s.stat_str);
    g_reduce(g, CUDNN_REDUCE_TENSOR_ADD, e, sum);
    cudnnBackendDescriptor_t lg = g_pw(g, CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, sum, NULL, NULL,
                                       g_virtual(g, CUDNN_DATA_FLOAT, s.stat_dim, s.stat_str));
    g_pw(g, CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, mx, lg, NULL, n.stats);
    cudnnBackendDescriptor_t P = g_pw(g, CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, e, sum, NULL, score(g, s, s.io));  // P in io dtype
    g_matmul(g, P, n.v, n.o, n.seq_q, NULL, n.seq_kv);  // O = P·V
}

static void build_bwd(Graph &g, const SdpaPlan &p, long version, int det) {
    const Shp s = shape_of(p);
    const Named n = named_tensors(g, s, p);
    const int64_t B = s.B, T = s.T, H = s.H, G = s.G, D = s.D;
    const Dims qd = dims(B, H, T, D), qs = dims(T * H * D, D, H * D, 1);
    const Dims kd = dims(B, G, T, D), ks = dims(T * G * D, D, G * D, 1);
    const Dims packed = dims(H * T * D, T * D, D, 1);  // [B, H, T, D] contiguous (per-head intermediates)
    cudnnBackendDescriptor_t dO = g_tensor(g, UID_DO, s.io, qd, qs, false, false, "tensor dO");
    cudnnBackendDescriptor_t dQ = g_tensor(g, UID_DQ, s.io, qd, qs, false, false, "tensor dQ");
    cudnnBackendDescriptor_t dK = g_tensor(g, UID_DK, s.io, kd, ks, false, false, "tensor dK");
    cudnnBackendDescriptor_t dV = g_tensor(g, UID_DV, s.io, kd, ks, false, false, "tensor dV");
    cudnnBackendDescriptor_t one = g_scalar(g, UID_ONE, CUDNN_DATA_FLOAT, "scalar one");
    cudnnBackendDescriptor_t dsum = g_tensor(g, UID_DSUM, CUDNN_DATA_FLOAT, s.stat_dim, s.stat_str, false, false, "tensor Dsum");
    // Dsum = Σ_d dO∘O (a graph buffer the fused kernel reads back)
    cudnnBackendDescriptor_t x = g_pw(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, dO, n.o, NULL,
                                      g_virtual(g, CUDNN_DATA_FLOAT, qd, packed));
    cudnnBackendDescriptor_t r = g_virtual(g, CUDNN_DATA_FLOAT, s.stat_dim, s.stat_str);
    g_reduce(g, CUDNN_REDUCE_TENSOR_ADD, x, r);
    g_pw(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, r, one, NULL, dsum);
    // P = exp(S·scale (+ bias) - Stats) under the forward's masks
    x = score(g, s);
    g_matmul(g, n.q, n.kt, x, n.seq_q, n.seq_kv, NULL);
    x = g_pw(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, x, n.scale, NULL, score(g, s));
    if (p.docs) x = g_pw(g, CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, x, n.bias, NULL, score(g, s));
    x = g_pw(g, CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, x, n.stats, NULL, score(g, s));
    if (p.pad) {
        x = padding_mask(g, s, x, n.seq_q, n.seq_kv, n.neg_inf);
        if (version >= 90000 && version < 91000) x = padding_mask(g, s, x, n.seq_q, n.seq_kv, n.neg_inf);
    }
    if (p.causal) x = causal_mask(g, s, x, n.neg_inf);
    cudnnBackendDescriptor_t P = g_pw(g, CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, x, NULL, NULL, score(g, s));
    // dV = Pᵀ·dO (summed over each group of H/G query heads)
    cudnnBackendDescriptor_t Pt = g_virtual(g, s.io, s.s_dim, s.st_str);
    g_reshape(g, P, Pt);
    if (H == G) {
        g_matmul(g, Pt, dO, dV, n.seq_kv, NULL, n.seq_q);
    } else {
        cudnnBackendDescriptor_t full = g_virtual(g, s.io, qd, packed);
        g_matmul(g, Pt, dO, full, n.seq_kv, NULL, n.seq_q);
        g_reduce(g, CUDNN_REDUCE_TENSOR_ADD, full, dV);
    }
    // dS = P∘(dO·Vᵀ - Dsum)·scale
    x = score(g, s);
    g_matmul(g, dO, n.vt, x, n.seq_q, n.seq_kv, NULL);
    x = g_pw(g, CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, x, dsum, NULL, score(g, s));
    x = g_pw(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, x, P, NULL, score(g, s));
    cudnnBackendDescriptor_t dS = g_pw(g, CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, x, n.scale, NULL, score(g, s));
    // dK = dSᵀ·Q
    cudnnBackendDescriptor_t dSt = g_virtual(g, s.io, s.s_dim, s.st_str);
    g_reshape(g, dS, dSt);
    if (H == G) {
        g_matmul(g, dSt, n.q, dK, n.seq_kv, NULL, n.seq_q);
    } else {
        cudnnBackendDescriptor_t full = g_virtual(g, s.io, qd, packed);
        g_matmul(g, dSt, n.q, full, n.seq_kv, NULL, n.seq_q);
        g_reduce(g, CUDNN_REDUCE_TENSOR_ADD, full, dK);
    }
    // dQ = dS·K (K seen again as [B, G, T, D])
    cudnnBackendDescriptor_t k = g_virtual(g, s.io, kd, ks);
    g_reshape(g, n.kt, k);
    if (det) {
        g_matmul(g, dS, k, dQ, n.seq_q, NULL, n.seq_kv);
    } else {
        cudnnBackendDescriptor_t acc = g_tensor(g, UID_DQ_ACC, CUDNN_DATA_FLOAT, qd, packed, false, false, "tensor dQ accumulator");
        g_matmul(g, dS, k, acc, n.seq_q, NULL, n.seq_kv);
        g_pw(g, CUDNN_POINTWISE_IDENTITY, CUDNN_DATA_FLOAT, acc, NULL, NULL, dQ);
    }
}

// Operation graph → heuristics (mode A) → the first engine configuration that finalizes (and, for a
// deterministic handle, carries no NONDETERMINISTIC note) → execution plan and its workspace size.
// Offline (no GPU: h NULL), the device comes from a device-properties descriptor instead of the handle.
static void make_plan(Graph &g, cudnnHandle_t h, cudnnBackendDescriptor_t devprop, int det, SdpaPlan *p) {
    cudnnBackendDescriptor_t og = GNEW(g, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    if (h) GSET(g, og, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
    if (!g.bad) GSET(g, og, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, (int64_t)g.ops.size(), g.ops.data());
    GFIN(g, og, "operation graph");
    cudnnBackendDescriptor_t heur = GNEW(g, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    GLINK(g, heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, og);
    const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    GSET(g, heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    if (devprop) GLINK(g, heur, CUDNN_ATTR_ENGINEHEUR_DEVICEPROP, devprop);
    GFIN(g, heur, "engine heuristics");
    int64_t count = 0;
    GGET(g, heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, NULL);
    if (g.bad) return;
    if (count <= 0) {
        g.bad = true;
        train_fail(g.err, g.errlen, "%s: cuDNN heuristics offer no engine for this graph (GPU, driver or cuDNN too old?)", g.ctx);
        return;
    }
    std::vector<cudnnBackendDescriptor_t> cfgs;
    for (int64_t i = 0; i < count && !g.bad; i++) cfgs.push_back(GNEW(g, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
    int64_t got = 0;
    if (!g.bad) GGET(g, heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got, cfgs.data());
    if (g.bad) return;
    int skipped = 0;
    cudnnStatus_t last = CUDNN_STATUS_SUCCESS;
    char last_msg[384] = "";
    for (int64_t i = 0; i < got && !g.bad; i++) {
        cudnnBackendDescriptor_t eng = GNEW(g, CUDNN_BACKEND_ENGINE_DESCRIPTOR);
        int64_t n1 = 0;
        GGET(g, cfgs[i], CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n1, &eng);
        cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
        int64_t nn = 0, index = -1;
        GGET(g, eng, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE, CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &nn, notes);
        GGET(g, eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n1, &index);
        if (g.bad) return;
        bool nondet = false;
        for (int64_t j = 0; j < nn && j < CUDNN_NUMERICAL_NOTE_TYPE_COUNT; j++) nondet |= notes[j] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC;
        if (det && nondet) {
            skipped++;
            continue;
        }
        cudnnBackendDescriptor_t plan = GNEW(g, CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
        if (h) GSET(g, plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
        if (devprop) GLINK(g, plan, CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP, devprop);
        GLINK(g, plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfgs[i]);
        if (g.bad) return;
        last = g.a->bFinalize(plan);  // an engine that cannot take this graph fails here: try the next
        if (!h && last == CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER) {
            // offline with the toolkit's stub libcuda: the engine accepted the graph and compiled its kernel;
            // only loading it needs a driver. That is the offline check's success.
            p->offline_ok = 1, p->engine = index;
            return;
        }
        if (last != CUDNN_STATUS_SUCCESS) {
            g.a->lastError(last_msg, sizeof last_msg);
            continue;
        }
        int64_t ws = 0;
        GGET(g, plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n1, &ws);
        if (g.bad) return;
        p->plan = plan, p->engine = index, p->workspace = ws;
        return;
    }
    if (g.bad) return;
    g.bad = true;
    train_fail(g.err, g.errlen,
               "%s: none of the %lld engine configurations cuDNN offered finalized (%d skipped as non-deterministic)%s%s%s%s",
               g.ctx, (long long)got, skipped, last != CUDNN_STATUS_SUCCESS ? "; last: " : "",
               last != CUDNN_STATUS_SUCCESS ? g.a->errorString(last) : "", *last_msg ? ": " : "", last_msg);
}

static void plan_free(SdpaCudnn *s, SdpaPlan *p) {
    for (size_t i = p->descs.size(); i-- > 0;) s->api.bDestroy(p->descs[i]);
    if (p->aux) cudaFree(p->aux);
    delete p;
}

static const char *dt_name(DType dt) { return dt == DT_BF16 ? "bf16" : dt == DT_F16 ? "fp16" : dt == DT_F32 ? "fp32" : "other"; }

static SdpaPlan *find_plan(const SdpaCudnn *s, int bwd, DType dt, int64_t B, int64_t T, int H, int G, int D, int causal,
                           int docs) {
    for (SdpaPlan *p : s->plans)
        if (p->bwd == bwd && p->dt == dt && p->B == B && p->T == T && p->H == H && p->G == G && p->D == D &&
            p->causal == causal && p->docs == docs)
            return p;
    return NULL;
}

// The plan for a shape: cached, or built now (with its buffers and the shared workspace grown to fit).
static SdpaPlan *get_plan(SdpaCudnn *s, int bwd, DType dt, int64_t B, int64_t T, int H, int G, int D, int causal, int docs,
                          char *err, size_t errlen) {
    SdpaPlan *p = find_plan(s, bwd, dt, B, T, H, G, D, causal, docs);
    if (p && p->failed) {
        train_fail(err, errlen, "%s", p->why);
        return NULL;
    }
    if (p) return p;
    p = new SdpaPlan();
    p->bwd = bwd, p->causal = causal, p->docs = docs, p->B = B, p->T = T, p->H = H, p->G = G, p->D = D, p->dt = dt;
    // DISTILL_SDPA_PAD=1 forces the workaround everywhere (to check that graph where the version does not need it)
    const char *force_pad = getenv("DISTILL_SDPA_PAD");
    p->pad = (bwd && T % 128 != 0 && s->version <= 91500) || (force_pad && *force_pad == '1');
    p->offline_ok = 0, p->failed = 0, p->why[0] = 0, p->plan = NULL, p->engine = -1, p->workspace = 0, p->aux = NULL, p->dsum = p->dq_acc = NULL, p->seqlen = NULL;
    p->aux_bytes = p->guard = 0;
    p->scale = 1.0f / sqrtf((float)D);
    p->neg_inf = s->version < 91000 ? -FLT_MAX : -INFINITY;
    p->one = 1.0f;
    char ctx[160];
    snprintf(ctx, sizeof ctx, "sdpa_cudnn %s (%s, B %lld, T %lld, heads %d/%d, hd %d%s%s%s)", bwd ? "backward" : "forward",
             dt_name(dt), (long long)B, (long long)T, H, G, D, causal ? ", causal" : "", docs ? ", documents" : "",
             bwd ? (s->det ? ", deterministic" : ", dQ atomics") : "");
    Graph g;
    g.a = &s->api, g.descs = &p->descs, g.next_uid = UID_VIRTUAL, g.ctx = ctx, g.err = p->why, g.errlen = sizeof p->why;
    g.bad = false;
    if (bwd) build_bwd(g, *p, s->version, s->det);
    else build_fwd(g, *p);
    if (!g.bad) make_plan(g, s->handle, s->devprop, s->det, p);
    if (!g.bad && !s->handle && p->offline_ok) {
        s->plans.push_back(p);
        return p;
    }
    if (g.bad || !p->plan) {  // remembered (descriptors released), so that this shape fails fast from now on
        if (!g.bad) snprintf(p->why, sizeof p->why, "%s: no execution plan", ctx);
        for (size_t i = p->descs.size(); i-- > 0;) s->api.bDestroy(p->descs[i]);
        p->descs.clear();
        p->plan = NULL, p->failed = 1;
        s->plans.push_back(p);
        train_fail(err, errlen, "%s", p->why);
        return NULL;
    }
    if (!s->handle) {  // offline: the plan is the result; nothing runs, nothing is allocated
        s->plans.push_back(p);
        return p;
    }
    // buffers: the shared workspace, the document bias, the backward's Dsum / dQ accumulator, sequence lengths
    size_t aux = 0, off_acc = 0, off_len = 0;
    if (bwd) {
        aux = (size_t)(B * H * T) * sizeof(float);
        aux = (aux + 255) & ~(size_t)255;
        off_acc = aux;
        if (!s->det) aux += (size_t)(B * H * T * D) * sizeof(float);
    }
    off_len = (aux + 255) & ~(size_t)255;
    if (p->pad) aux = off_len + (size_t)B * sizeof(int32_t);
    cudaError_t ce = cudaSuccess;
    // diagnostic DISTILL_SDPA_GUARD=1: 64 MiB of 0xA5 after the workspace and the plan buffers, checked after every
    // execution (execute), to catch cuDNN writing past what it asked for
    const char *gv = getenv("DISTILL_SDPA_GUARD");
    const size_t guard = gv && *gv == '1' ? (size_t)64 << 20 : 0;
    p->aux_bytes = aux, p->guard = aux ? guard : 0;
    if (aux) ce = cudaMalloc(&p->aux, aux + p->guard);
    if (ce == cudaSuccess && p->guard) ce = cudaMemset((char *)p->aux + aux, 0xA5, p->guard);
    if (ce == cudaSuccess && (size_t)p->workspace > s->ws_bytes) {
        if (s->ws) cudaFree(s->ws);
        s->ws = NULL, s->ws_bytes = 0;
        ce = cudaMalloc(&s->ws, (size_t)p->workspace + guard);
        if (ce == cudaSuccess) s->ws_bytes = (size_t)p->workspace, s->ws_guard = guard;
        if (ce == cudaSuccess && guard) ce = cudaMemset((char *)s->ws + s->ws_bytes, 0xA5, guard);
    }
    const size_t bias = docs ? (size_t)(B * T * T) * 2 : 0;
    if (ce == cudaSuccess && bias > s->bias_bytes) {
        if (s->bias) cudaFree(s->bias);
        s->bias = NULL, s->bias_bytes = 0;
        ce = cudaMalloc(&s->bias, bias);
        if (ce == cudaSuccess) s->bias_bytes = bias;
    }
    if (ce == cudaSuccess && p->aux) {
        if (bwd) p->dsum = (float *)p->aux;
        if (bwd && !s->det) p->dq_acc = (float *)((char *)p->aux + off_acc);
        if (p->pad) {
            p->seqlen = (int32_t *)((char *)p->aux + off_len);
            std::vector<int32_t> len((size_t)B, (int32_t)T);
            ce = cudaMemcpy(p->seqlen, len.data(), len.size() * sizeof(int32_t), cudaMemcpyHostToDevice);
        }
    }
    if (ce != cudaSuccess) {
        train_fail(err, errlen, "%s: cannot allocate its buffers (workspace %lld B, plan buffers %zu B, bias %zu B): %s", ctx,
                   (long long)p->workspace, aux, bias, cudaGetErrorString(ce));
        cudaGetLastError();  // an allocation failure is not sticky: clear it for the caller's next check
        plan_free(s, p);
        return NULL;
    }
    s->plans.push_back(p);
    return p;
}

// document bias [B, 1, T, T]: 0 from the query's document start on, a large negative number before it
template <typename TT>
__global__ void doc_bias_kernel(TT *bias, const int32_t *doc_start, int64_t rows, int64_t T, float neg) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t lo = doc_start[r];
        TT *row = bias + r * T;
        for (int64_t j = threadIdx.x; j < T; j += blockDim.x) row[j] = (TT)(j < lo ? neg : 0.0f);
    }
}

static int write_bias(SdpaCudnn *s, DType dt, int64_t B, int64_t T, const int32_t *doc_start, dl_stream_t stream) {
    const int grid = (int)(B * T < 65535 ? B * T : 65535);
    (void)dt;  // bf16 (check_shape)
    doc_bias_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>((__nv_bfloat16 *)s->bias, doc_start, B * T, T, -1e30f);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

// DISTILL_SDPA_GUARD: the guard bytes after buf (n of them) must still be 0xA5; one line on stderr if not
static void guard_check(const char *what, const SdpaPlan *p, const void *buf, size_t n) {
    if (!n) return;
    std::vector<unsigned char> h(n);
    if (cudaMemcpy(h.data(), buf, n, cudaMemcpyDeviceToHost) != cudaSuccess) return;
    size_t lo = n, hi = 0;
    for (size_t i = 0; i < n; i++)
        if (h[i] != 0xA5) lo = i < lo ? i : lo, hi = i;
    if (lo < n)
        fprintf(stderr, "sdpa_cudnn %s (B %lld, T %lld, heads %d/%d, hd %d): %s guard overwritten at bytes +%zu..+%zu past its end\n",
                p->bwd ? "backward" : "forward", (long long)p->B, (long long)p->T, p->H, p->G, p->D, what, lo, hi);
}

static int execute(SdpaCudnn *s, SdpaPlan *p, int n, const int64_t *uids, void *const *ptrs, dl_stream_t stream, char *err,
                   size_t errlen) {
    const CudnnApi &a = s->api;
    if ((size_t)p->workspace > s->ws_bytes)  // only after a failed workspace allocation for another shape
        return train_fail(err, errlen, "sdpa_cudnn: the shared workspace was lost to a failed allocation (%lld B needed)",
                          (long long)p->workspace);
    cudnnStatus_t st = a.setStream(s->handle, (cudaStream_t)stream);
    if (st != CUDNN_STATUS_SUCCESS) return train_fail(err, errlen, "sdpa_cudnn: cudnnSetStream failed: %s", a.errorString(st));
    std::vector<cudnnBackendDescriptor_t> descs;
    char ctx[64];
    snprintf(ctx, sizeof ctx, "sdpa_cudnn %s execute", p->bwd ? "backward" : "forward");
    Graph g;
    g.a = &a, g.descs = &descs, g.next_uid = 0, g.ctx = ctx, g.err = err, g.errlen = errlen, g.bad = false;
    cudnnBackendDescriptor_t vp = GNEW(g, CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    void *ws = s->ws;
    GSET(g, vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n, uids);
    GSET(g, vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, n, ptrs);
    GSET(g, vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
    GFIN(g, vp, "variant pack");
    // diagnostics: DISTILL_SDPA_ZERO_WS=1 zeroes the workspace (and the backward's Dsum) before every execution;
    // DISTILL_SDPA_SYNC=1 synchronizes the device around it (orders cuDNN against work on other streams)
    const char *zw = getenv("DISTILL_SDPA_ZERO_WS"), *sy = getenv("DISTILL_SDPA_SYNC");
    if (!g.bad && zw && *zw == '1') {
        if (s->ws_bytes) cudaMemsetAsync(s->ws, 0, s->ws_bytes, (cudaStream_t)stream);
        if (p->dsum) cudaMemsetAsync(p->dsum, 0, (size_t)(p->B * p->H * p->T) * sizeof(float), (cudaStream_t)stream);
    }
    if (!g.bad && sy && *sy == '1') cudaDeviceSynchronize();
    if (!g.bad) {
        st = a.bExecute(s->handle, p->plan, vp);
        if (st != CUDNN_STATUS_SUCCESS) g_fail(g, st, "cudnnBackendExecute", "execution plan");
    }
    if (!g.bad && sy && *sy == '1') cudaDeviceSynchronize();
    if (!g.bad && (s->ws_guard || p->guard)) {
        cudaStreamSynchronize((cudaStream_t)stream);
        guard_check("workspace", p, (char *)s->ws + s->ws_bytes, s->ws ? s->ws_guard : 0);
        guard_check("plan buffer (Dsum)", p, (char *)p->aux + p->aux_bytes, p->aux ? p->guard : 0);
    }
    for (cudnnBackendDescriptor_t d : descs) a.bDestroy(d);
    return g.bad ? -1 : 0;
}

static int check_shape(const char *fn, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal, int docs, char *err,
                       size_t errlen) {
    if (dt != DT_BF16)  // cuDNN also takes fp16; only bf16 (the training dtype) is tested, so only bf16 is offered
        return train_fail(err, errlen, "%s: dtype %s not supported by the cuDNN path (bf16 only)", fn, dt_name(dt));
    if (hd < 8 || hd > 128 || hd % 8) return train_fail(err, errlen, "%s: head_dim %d not supported (a multiple of 8, <= 128)", fn, hd);
    if (nh < 1 || nkv < 1 || nh % nkv) return train_fail(err, errlen, "%s: %d query heads not a multiple of %d KV heads", fn, nh, nkv);
    if (B < 0 || T < 0 || T > (1 << 20)) return train_fail(err, errlen, "%s: batch %lld / length %lld out of range", fn, (long long)B, (long long)T);
    if (docs && !causal) return train_fail(err, errlen, "%s: document masks need causal attention", fn);
    return 0;
}
static int check_args(const char *fn, SdpaCudnn *s, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal,
                      const int32_t *doc_start, const void *const *ptrs, int nptr, char *err, size_t errlen) {
    if (!s) return train_fail(err, errlen, "%s: no cuDNN handle (sdpa_cudnn_new failed)", fn);
    if (!s->handle) return train_fail(err, errlen, "%s: an offline handle only builds plans", fn);
    if (check_shape(fn, dt, B, T, nh, nkv, hd, causal, doc_start != NULL, err, errlen)) return -1;
    for (int i = 0; i < nptr; i++) {
        if (!ptrs[i]) return train_fail(err, errlen, "%s: tensor %d is NULL", fn, i);
        if ((uintptr_t)ptrs[i] & 15) return train_fail(err, errlen, "%s: tensor %d is not 16-byte aligned", fn, i);
    }
    return 0;
}

extern "C" int sdpa_cudnn_fwd(SdpaCudnn *s, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal, const void *q,
                              const void *k, const void *v, const int32_t *doc_start, void *out, float *lse,
                              dl_stream_t stream, char *err, size_t errlen) {
    const void *ptrs[5] = {q, k, v, out, lse};
    if (check_args("sdpa_cudnn_fwd", s, dt, B, T, nh, nkv, hd, causal, doc_start, ptrs, 5, err, errlen)) return -1;
    if (B == 0 || T == 0) return 0;
    causal = causal != 0;
    SdpaPlan *p = get_plan(s, 0, dt, B, T, nh, nkv, hd, causal, doc_start != NULL, err, errlen);
    if (!p) return -1;
    if (doc_start && write_bias(s, dt, B, T, doc_start, stream))
        return train_fail(err, errlen, "sdpa_cudnn_fwd: document bias kernel launch failed");
    int64_t uids[12];
    void *dp[12];
    int n = 0;
#define PUT(uid, ptr) (uids[n] = (uid), dp[n] = (void *)(ptr), n++)
    PUT(UID_Q, q), PUT(UID_K, k), PUT(UID_V, v), PUT(UID_O, out), PUT(UID_STATS, lse), PUT(UID_SCALE, &p->scale);
    if (p->causal || p->pad) PUT(UID_NEG_INF, &p->neg_inf);
    if (p->docs) PUT(UID_BIAS, s->bias);
    if (p->pad) PUT(UID_SEQ_Q, p->seqlen), PUT(UID_SEQ_KV, p->seqlen);
    return execute(s, p, n, uids, dp, stream, err, errlen);
}

extern "C" int sdpa_cudnn_bwd(SdpaCudnn *s, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal, const void *q,
                              const void *k, const void *v, const int32_t *doc_start, const void *out, const float *lse,
                              const void *dout, void *dq, void *dk, void *dv, dl_stream_t stream, char *err, size_t errlen) {
    const void *ptrs[9] = {q, k, v, out, lse, dout, dq, dk, dv};
    if (check_args("sdpa_cudnn_bwd", s, dt, B, T, nh, nkv, hd, causal, doc_start, ptrs, 9, err, errlen)) return -1;
    if (B == 0 || T == 0) return 0;
    causal = causal != 0;
    SdpaPlan *p = get_plan(s, 1, dt, B, T, nh, nkv, hd, causal, doc_start != NULL, err, errlen);
    if (!p) return -1;
    if (doc_start && write_bias(s, dt, B, T, doc_start, stream))
        return train_fail(err, errlen, "sdpa_cudnn_bwd: document bias kernel launch failed");
    if (p->dq_acc && s->version < 90600) {  // older cuDNN expects a zeroed accumulator
        const cudaError_t ce = cudaMemsetAsync(p->dq_acc, 0, (size_t)(B * nh * T * hd) * sizeof(float), stream);
        if (ce != cudaSuccess) return train_fail(err, errlen, "sdpa_cudnn_bwd: cudaMemsetAsync: %s", cudaGetErrorString(ce));
    }
    int64_t uids[20];
    void *dp[20];
    int n = 0;
    PUT(UID_Q, q), PUT(UID_K, k), PUT(UID_V, v), PUT(UID_O, out), PUT(UID_STATS, lse), PUT(UID_DO, dout);
    PUT(UID_DQ, dq), PUT(UID_DK, dk), PUT(UID_DV, dv), PUT(UID_SCALE, &p->scale), PUT(UID_ONE, &p->one);
    PUT(UID_DSUM, p->dsum);
    if (p->causal || p->pad) PUT(UID_NEG_INF, &p->neg_inf);
    if (p->dq_acc) PUT(UID_DQ_ACC, p->dq_acc);
    if (p->docs) PUT(UID_BIAS, s->bias);
    if (p->pad) PUT(UID_SEQ_Q, p->seqlen), PUT(UID_SEQ_KV, p->seqlen);
#undef PUT
    return execute(s, p, n, uids, dp, stream, err, errlen);
}

extern "C" void sdpa_cudnn_free(SdpaCudnn *s) {
    if (!s) return;
    for (SdpaPlan *p : s->plans) plan_free(s, p);
    if (s->ws) cudaFree(s->ws);
    if (s->bias) cudaFree(s->bias);
    if (s->handle) s->api.destroy(s->handle);
    if (s->devprop) s->api.bDestroy(s->devprop);
    // the library stays loaded: cuDNN keeps process-wide state that dlclose would leave dangling
    delete s;
}

// A handle-less SdpaCudnn with cuDNN loaded, if its version is at least min_version (what: who needs it).
static SdpaCudnn *sdpa_open(int deterministic, long min_version, const char *what, char *err, size_t errlen) {
    SdpaCudnn *s = new SdpaCudnn();
    s->handle = NULL, s->devprop = NULL, s->det = deterministic != 0, s->ws = s->bias = NULL, s->ws_bytes = s->bias_bytes = s->ws_guard = 0;
    if (api_load(&s->api, err, errlen)) {
        delete s;
        return NULL;
    }
    s->version = (long)s->api.getVersion();
    if (s->version < min_version) {
        train_fail(err, errlen, "%s need cuDNN %ld.%ld or newer; this is %ld", what, min_version / 10000, min_version / 100 % 100,
                   s->version);
        delete s;
        return NULL;
    }
    return s;
}

extern "C" SdpaCudnn *sdpa_cudnn_new(int deterministic, char *err, size_t errlen) {
    SdpaCudnn *s = sdpa_open(deterministic, 90000, "the fused attention graphs", err, errlen);
    if (!s) return NULL;
    if (s->version == 91000 || s->version == 91001) {  // cuDNN's frontend refuses these for fp16/bf16 SDPA too
        train_fail(err, errlen, "cuDNN %ld has known fused-attention bugs (use 9.10.2 or newer)", s->version);
        delete s;
        return NULL;
    }
    int dev = 0, major = 0;
    cudaError_t ce = cudaGetDevice(&dev);
    if (ce == cudaSuccess) ce = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (ce != cudaSuccess || major < 8) {
        train_fail(err, errlen, "cuDNN fused attention needs an sm_80 or newer GPU (%s)",
                   ce != cudaSuccess ? cudaGetErrorString(ce) : "this one is older");
        cudaGetLastError();
        delete s;
        return NULL;
    }
    const cudnnStatus_t st = s->api.create(&s->handle);
    if (st != CUDNN_STATUS_SUCCESS) {
        train_fail(err, errlen, "cudnnCreate failed: %s", s->api.errorString(st));
        s->handle = NULL;
        delete s;
        return NULL;
    }
    // self-check: a small forward and backward (GQA, causal) must find a plan on this GPU / cuDNN
    if (!get_plan(s, 0, DT_BF16, 1, 128, 2, 1, 64, 1, 0, err, errlen) || !get_plan(s, 1, DT_BF16, 1, 128, 2, 1, 64, 1, 0, err, errlen)) {
        sdpa_cudnn_free(s);
        return NULL;
    }
    return s;
}

extern "C" SdpaCudnn *sdpa_cudnn_new_offline(int deterministic, const char *device_json, char *err, size_t errlen) {
    SdpaCudnn *s = sdpa_open(deterministic, 90800, "offline plans (device-properties descriptors)", err, errlen);
    if (!s) return NULL;
    std::vector<cudnnBackendDescriptor_t> descs;
    Graph g;
    g.a = &s->api, g.descs = &descs, g.next_uid = 0, g.ctx = "sdpa_cudnn offline device", g.err = err, g.errlen = errlen, g.bad = false;
    cudnnBackendDescriptor_t d = GNEW(g, CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR);
    GSET(g, d, CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION, CUDNN_TYPE_CHAR, (int64_t)strlen(device_json), device_json);
    GFIN(g, d, "device properties (JSON)");
    if (g.bad) {
        for (cudnnBackendDescriptor_t x : descs) s->api.bDestroy(x);
        delete s;
        return NULL;
    }
    s->devprop = d;
    return s;
}

extern "C" int sdpa_cudnn_prepare(SdpaCudnn *s, int backward, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd, int causal,
                                  int docs, char *err, size_t errlen) {
    if (!s) return train_fail(err, errlen, "sdpa_cudnn_prepare: no handle");
    if (check_shape("sdpa_cudnn_prepare", dt, B, T, nh, nkv, hd, causal, docs, err, errlen)) return -1;
    if (B < 1 || T < 1) return train_fail(err, errlen, "sdpa_cudnn_prepare: empty shape");
    return get_plan(s, backward != 0, dt, B, T, nh, nkv, hd, causal != 0, docs != 0, err, errlen) ? 0 : -1;
}

extern "C" long sdpa_cudnn_version(const SdpaCudnn *s) { return s ? s->version : 0; }
extern "C" int sdpa_cudnn_plan_count(const SdpaCudnn *s) {
    int n = 0;
    if (s)
        for (const SdpaPlan *p : s->plans) n += !p->failed;
    return n;
}
extern "C" int sdpa_cudnn_plan_info(const SdpaCudnn *s, int backward, DType dt, int64_t B, int64_t T, int nh, int nkv, int hd,
                                    int causal, int docs, int64_t *engine, int64_t *workspace_bytes) {
    const SdpaPlan *p = s ? find_plan(s, backward != 0, dt, B, T, nh, nkv, hd, causal != 0, docs != 0) : NULL;
    if (p && p->failed) p = NULL;
    if (engine) *engine = p ? p->engine : -1;
    if (workspace_bytes) *workspace_bytes = p ? p->workspace : -1;
    return p ? 0 : -1;
}

#else  // built without cuDNN headers: the same interface, reporting why it is unavailable

struct SdpaCudnn {
    int unused;
};
static int not_built(char *err, size_t errlen) {
    return train_fail(err, errlen, "cuDNN attention not available: this build found no cudnn.h (install cuDNN 9 and rebuild)");
}
extern "C" SdpaCudnn *sdpa_cudnn_new(int, char *err, size_t errlen) {
    not_built(err, errlen);
    return NULL;
}
extern "C" void sdpa_cudnn_free(SdpaCudnn *) {}
extern "C" int sdpa_cudnn_fwd(SdpaCudnn *, DType, int64_t, int64_t, int, int, int, int, const void *, const void *, const void *,
                              const int32_t *, void *, float *, dl_stream_t, char *err, size_t errlen) {
    return not_built(err, errlen);
}
extern "C" int sdpa_cudnn_bwd(SdpaCudnn *, DType, int64_t, int64_t, int, int, int, int, const void *, const void *, const void *,
                              const int32_t *, const void *, const float *, const void *, void *, void *, void *, dl_stream_t,
                              char *err, size_t errlen) {
    return not_built(err, errlen);
}
extern "C" SdpaCudnn *sdpa_cudnn_new_offline(int, const char *, char *err, size_t errlen) {
    not_built(err, errlen);
    return NULL;
}
extern "C" int sdpa_cudnn_prepare(SdpaCudnn *, int, DType, int64_t, int64_t, int, int, int, int, int, char *err, size_t errlen) {
    return not_built(err, errlen);
}
extern "C" long sdpa_cudnn_version(const SdpaCudnn *) { return 0; }
extern "C" int sdpa_cudnn_plan_count(const SdpaCudnn *) { return 0; }
extern "C" int sdpa_cudnn_plan_info(const SdpaCudnn *, int, DType, int64_t, int64_t, int, int, int, int, int, int64_t *engine,
                                    int64_t *workspace_bytes) {
    if (engine) *engine = -1;
    if (workspace_bytes) *workspace_bytes = -1;
    return -1;
}
#endif
