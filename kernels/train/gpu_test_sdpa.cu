// gpu_test_sdpa.cu: cuDNN's fused attention (attention_cudnn.h) against a float64 CPU reference and the
// hand-written kernels (attention_fwd_cuda / attention_bwd_cuda), on fresh random bf16 inputs with every
// output poisoned (all bits set: NaN) before each call. Shapes: GQA 9/3 heads of 64 (SmolLM2), 32/8 of
// 128 (Llama-3-8B), an MHA and a non-causal case, with and without document resets, T not a multiple of
// 64. Checks per case: out and lse (forward), dq/dk/dv (backward from the reference forward, rounded to
// bf16, so every side differentiates the same forward), relative error norms <= 1e-2 (lse 1e-3); the
// same against the hand-written kernels (2e-2: both sides carry their own bf16 error); identical bits on a second backward (deterministic handle); the
// non-deterministic (fp32 dQ accumulator) variant against the reference; plans reused (no new plan on a
// repeat); refused calls (bad head size, dtype, head ratio, alignment) return -1 and leave outputs alone.
// Prints "N passed, N failed"; exit status 1 on any failure.
//
// Usage: gpu_test_sdpa            (on a GPU)
//        gpu_test_sdpa --offline  (no GPU: builds every plan of the cases above for a described H100 with
//                                  the stub libcuda.so.1 on LD_LIBRARY_PATH; see sdpa_cudnn_new_offline;
//                                  ctest gpu_test_sdpa_offline, set up by kernels/train/CMakeLists.txt)
#include <dlfcn.h>

#include <vector>

#include "kernels/scan/gpu_common.cuh"
#include "kernels/train/attention_cudnn.h"
#include "kernels/train/train_cuda.h"

#define _Noreturn [[noreturn]]  // C11 keyword in distill/common.h
extern "C" {
#include "distill/layers_cpu.h"
}

typedef __nv_bfloat16 bf16;
static int npass = 0, nfail = 0;
static char err[1024];

static void check(bool ok, const char *name, const char *fmt, double x, double tol) {
    ok ? npass++ : nfail++;
    printf("  %-4s %-58s ", ok ? "ok" : "FAIL", name);
    printf(fmt, x, tol);
    printf("\n");
}
static void check_rel(double e, double tol, const char *name) { check(e <= tol && e == e, name, "rel err %.2e (tol %.0e)", e, tol); }
static void check_true(bool ok, const char *name, const char *why) {
    ok ? npass++ : nfail++;
    printf("  %-4s %-58s %s\n", ok ? "ok" : "FAIL", name, ok ? "" : why);
}

// ---- host data: N(0, 1) values rounded to bf16 (kept as the bf16 bits and as doubles)
static uint64_t hs = 0x5d9a;
static double hunif() { return (double)(gmix64(hs++) >> 11) * 0x1.0p-53; }
static double hnorm() { return sqrt(-2 * log(hunif() + 1e-300)) * cos(6.283185307179586 * hunif()); }
struct HostBf {
    std::vector<bf16> b;
    std::vector<double> d;
};
static HostBf hrand(int64_t n) {
    HostBf h;
    h.b.resize((size_t)n), h.d.resize((size_t)n);
    for (int64_t i = 0; i < n; i++) h.b[i] = __float2bfloat16_rn((float)hnorm()), h.d[i] = bf2d(h.b[i]);
    return h;
}
static HostBf hround(const std::vector<double> &x) {
    HostBf h;
    h.b.resize(x.size()), h.d.resize(x.size());
    for (size_t i = 0; i < x.size(); i++) h.b[i] = __float2bfloat16_rn((float)x[i]), h.d[i] = bf2d(h.b[i]);
    return h;
}
static double rel_bd(const std::vector<bf16> &x, const std::vector<double> &r) { return rel_bf(x.data(), r.data(), (int64_t)r.size()); }
static double rel_bb(const std::vector<bf16> &x, const std::vector<bf16> &y) {
    std::vector<double> r(y.size());
    for (size_t i = 0; i < y.size(); i++) r[i] = bf2d(y[i]);
    return rel_bd(x, r);
}

// ---- device buffers
template <typename T>
static T *dput(const std::vector<T> &h) {
    T *p;
    CK(cudaMalloc(&p, h.size() * sizeof(T) + 16));
    CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
}
template <typename T>
static T *dpoison(size_t n) {
    T *p;
    CK(cudaMalloc(&p, n * sizeof(T) + 16));
    CK(cudaMemset(p, 0xff, n * sizeof(T) + 16));
    return p;
}
template <typename T>
static std::vector<T> dget(const T *p, size_t n) {
    std::vector<T> h(n);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}
static bool still_poisoned(const void *p, size_t bytes) {
    std::vector<uint8_t> h = dget((const uint8_t *)p, bytes);
    for (uint8_t c : h)
        if (c != 0xff) return false;
    return true;
}

// ---- float64 reference (the definition: softmax over keys [lo, hi] of q·k / sqrt(D))
struct Case {
    int64_t B, T;
    int H, G, D, causal;
    std::vector<int64_t> resets;  // flat token indices (b*T + t) where a new document starts
};
static void ref_window(const Case &c, const int32_t *ds, int64_t b, int64_t i, int64_t *lo, int64_t *hi) {
    *lo = ds ? ds[b * c.T + i] : 0;
    *hi = c.causal ? i : c.T - 1;
}
static void ref_fwd(const Case &c, const int32_t *ds, const std::vector<double> &q, const std::vector<double> &k,
                    const std::vector<double> &v, std::vector<double> &out, std::vector<double> &lse) {
    const int64_t T = c.T, H = c.H, G = c.G, D = c.D;
    const double scale = 1.0 / sqrt((double)D);
    out.assign((size_t)(c.B * T * H * D), 0.0), lse.assign((size_t)(c.B * H * T), 0.0);
    std::vector<double> s((size_t)T);
    for (int64_t b = 0; b < c.B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / G);
            for (int64_t i = 0; i < T; i++) {
                int64_t lo, hi;
                ref_window(c, ds, b, i, &lo, &hi);
                const double *qi = &q[(size_t)(((b * T + i) * H + h) * D)];
                double m = -INFINITY;
                for (int64_t j = lo; j <= hi; j++) {
                    const double *kj = &k[(size_t)(((b * T + j) * G + g) * D)];
                    double a = 0;
                    for (int64_t d = 0; d < D; d++) a += qi[d] * kj[d];
                    s[j] = a * scale, m = fmax(m, s[j]);
                }
                double z = 0;
                for (int64_t j = lo; j <= hi; j++) z += exp(s[j] - m);
                double *oi = &out[(size_t)(((b * T + i) * H + h) * D)];
                for (int64_t j = lo; j <= hi; j++) {
                    const double p = exp(s[j] - m) / z;
                    const double *vj = &v[(size_t)(((b * T + j) * G + g) * D)];
                    for (int64_t d = 0; d < D; d++) oi[d] += p * vj[d];
                }
                lse[(size_t)((b * H + h) * T + i)] = m + log(z);
            }
        }
}
// gradients of sum(dout * out) through the forward defined by (q, k, v, lse, out)
static void ref_bwd(const Case &c, const int32_t *ds, const std::vector<double> &q, const std::vector<double> &k,
                    const std::vector<double> &v, const std::vector<double> &out, const std::vector<double> &lse,
                    const std::vector<double> &dout, std::vector<double> &dq, std::vector<double> &dk, std::vector<double> &dv) {
    const int64_t T = c.T, H = c.H, G = c.G, D = c.D;
    const double scale = 1.0 / sqrt((double)D);
    dq.assign(q.size(), 0.0), dk.assign(k.size(), 0.0), dv.assign(v.size(), 0.0);
    for (int64_t b = 0; b < c.B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / G);
            for (int64_t i = 0; i < T; i++) {
                int64_t lo, hi;
                ref_window(c, ds, b, i, &lo, &hi);
                const size_t qo = (size_t)(((b * T + i) * H + h) * D);
                double dsum = 0;
                for (int64_t d = 0; d < D; d++) dsum += dout[qo + d] * out[qo + d];
                const double L = lse[(size_t)((b * H + h) * T + i)];
                for (int64_t j = lo; j <= hi; j++) {
                    const size_t ko = (size_t)(((b * T + j) * G + g) * D);
                    double sc = 0, dp = 0;
                    for (int64_t d = 0; d < D; d++) sc += q[qo + d] * k[ko + d], dp += dout[qo + d] * v[ko + d];
                    const double p = exp(sc * scale - L), dsij = p * (dp - dsum) * scale;
                    for (int64_t d = 0; d < D; d++) {
                        dq[qo + d] += dsij * k[ko + d];
                        dk[ko + d] += dsij * q[qo + d];
                        dv[ko + d] += p * dout[qo + d];
                    }
                }
            }
        }
}

static void describe(const Case &c, char *buf, size_t n) {
    snprintf(buf, n, "B %lld T %lld %d/%d hd %d%s%s", (long long)c.B, (long long)c.T, c.H, c.G, c.D, c.causal ? " causal" : " full",
             c.resets.empty() ? "" : " docs");
}

static void run_case(SdpaCudnn *s, SdpaCudnn *snd, const Case &c) {
    char tag[96], name[160];
    describe(c, tag, sizeof tag);
    printf("case %s\n", tag);
    const int64_t N = c.B * c.T, qn = N * c.H * c.D, kn = N * c.G * c.D;
    HostBf q = hrand(qn), k = hrand(kn), v = hrand(kn), dout = hrand(qn);
    std::vector<int32_t> ds;
    const int32_t *hds = NULL;
    int32_t *dds = NULL;
    if (!c.resets.empty()) {
        std::vector<uint8_t> reset((size_t)N, 0);
        for (int64_t r : c.resets) reset[(size_t)r] = 1;
        ds.resize((size_t)N);
        doc_positions(c.B, c.T, reset.data(), NULL, ds.data());
        hds = ds.data();
        dds = dput(ds);
    }
    std::vector<double> out_ref, lse_ref;
    ref_fwd(c, hds, q.d, k.d, v.d, out_ref, lse_ref);
    bf16 *dq_ = dput(q.b), *dk_ = dput(k.b), *dv_ = dput(v.b), *ddo = dput(dout.b);

    // ---- forward
    bf16 *o = dpoison<bf16>(qn);
    float *lse = dpoison<float>(c.B * c.H * c.T);
    int rc = sdpa_cudnn_fwd(s, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, dq_, dk_, dv_, dds, o, lse, NULL, err, sizeof err);
    snprintf(name, sizeof name, "fwd call (%s)", tag);
    check_true(rc == 0, name, err);
    std::vector<bf16> o_h = dget(o, qn);
    std::vector<float> lse_h = dget(lse, c.B * c.H * c.T);
    snprintf(name, sizeof name, "fwd out vs float64 (%s)", tag);
    check_rel(rel_bd(o_h, out_ref), 1e-2, name);
    snprintf(name, sizeof name, "fwd lse vs float64 (%s)", tag);
    check_rel(rel_f(lse_h.data(), lse_ref.data(), (int64_t)lse_ref.size()), 1e-3, name);
    const int plans = sdpa_cudnn_plan_count(s);
    rc = sdpa_cudnn_fwd(s, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, dq_, dk_, dv_, dds, o, lse, NULL, err, sizeof err);
    snprintf(name, sizeof name, "fwd repeat reuses its plan (%s)", tag);
    check_true(rc == 0 && sdpa_cudnn_plan_count(s) == plans, name, rc ? err : "a new plan was built");
    if (c.causal) {
        bf16 *o2 = dpoison<bf16>(qn);
        float *lse2 = dpoison<float>(c.B * c.H * c.T);
        rc = attention_fwd_cuda(DT_BF16, c.B, c.T, c.H, c.G, c.D, dq_, dk_, dv_, dds, o2, lse2, NULL, err, sizeof err);
        snprintf(name, sizeof name, "fwd hand-written call (%s)", tag);
        check_true(rc == 0, name, err);
        std::vector<bf16> o2_h = dget(o2, qn);
        std::vector<float> lse2_h = dget(lse2, c.B * c.H * c.T);
        snprintf(name, sizeof name, "fwd out cuDNN vs hand-written (%s)", tag);
        check_rel(rel_bb(o_h, o2_h), 2e-2, name);
        std::vector<double> l2(lse2_h.begin(), lse2_h.end());
        snprintf(name, sizeof name, "fwd lse cuDNN vs hand-written (%s)", tag);
        check_rel(rel_f(lse_h.data(), l2.data(), (int64_t)l2.size()), 1e-3, name);
        CK(cudaFree(o2));
        CK(cudaFree(lse2));
    }

    // ---- backward from the reference forward (out rounded to bf16, lse in fp32)
    HostBf outr = hround(out_ref);
    std::vector<float> lsef(lse_ref.begin(), lse_ref.end());
    std::vector<double> lsed(lsef.begin(), lsef.end());
    std::vector<double> gq, gk, gv;
    ref_bwd(c, hds, q.d, k.d, v.d, outr.d, lsed, dout.d, gq, gk, gv);
    bf16 *dor = dput(outr.b);
    float *dl = dput(lsef);
    bf16 *gq1 = dpoison<bf16>(qn), *gk1 = dpoison<bf16>(kn), *gv1 = dpoison<bf16>(kn);
    bf16 *gq2 = dpoison<bf16>(qn), *gk2 = dpoison<bf16>(kn), *gv2 = dpoison<bf16>(kn);
    rc = sdpa_cudnn_bwd(s, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, dq_, dk_, dv_, dds, dor, dl, ddo, gq1, gk1, gv1, NULL, err,
                        sizeof err);
    snprintf(name, sizeof name, "bwd call (%s)", tag);
    check_true(rc == 0, name, err);
    std::vector<bf16> gq_h = dget(gq1, qn), gk_h = dget(gk1, kn), gv_h = dget(gv1, kn);
    snprintf(name, sizeof name, "bwd dq vs float64 (%s)", tag);
    check_rel(rel_bd(gq_h, gq), 1e-2, name);
    snprintf(name, sizeof name, "bwd dk vs float64 (%s)", tag);
    check_rel(rel_bd(gk_h, gk), 1e-2, name);
    snprintf(name, sizeof name, "bwd dv vs float64 (%s)", tag);
    check_rel(rel_bd(gv_h, gv), 1e-2, name);
    rc = sdpa_cudnn_bwd(s, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, dq_, dk_, dv_, dds, dor, dl, ddo, gq2, gk2, gv2, NULL, err,
                        sizeof err);
    std::vector<bf16> gq2_h = dget(gq2, qn), gk2_h = dget(gk2, kn), gv2_h = dget(gv2, kn);
    const bool same = rc == 0 && !memcmp(gq_h.data(), gq2_h.data(), qn * 2) && !memcmp(gk_h.data(), gk2_h.data(), kn * 2) &&
                      !memcmp(gv_h.data(), gv2_h.data(), kn * 2);
    snprintf(name, sizeof name, "bwd deterministic: identical bits twice (%s)", tag);
    check_true(same, name, rc ? err : "the two backward passes differ");
    if (c.causal) {
        void *ws;
        CK(cudaMalloc(&ws, attention_bwd_workspace(c.B, c.T, c.H)));
        CK(cudaMemset(gq2, 0xff, qn * 2));
        CK(cudaMemset(gk2, 0xff, kn * 2));
        CK(cudaMemset(gv2, 0xff, kn * 2));
        rc = attention_bwd_cuda(DT_BF16, c.B, c.T, c.H, c.G, c.D, dq_, dk_, dv_, dds, dor, dl, ddo, gq2, gk2, gv2, ws, NULL, err,
                                sizeof err);
        snprintf(name, sizeof name, "bwd hand-written call (%s)", tag);
        check_true(rc == 0, name, err);
        std::vector<bf16> hq = dget(gq2, qn), hk = dget(gk2, kn), hv = dget(gv2, kn);
        snprintf(name, sizeof name, "bwd dq cuDNN vs hand-written (%s)", tag);
        check_rel(rel_bb(gq_h, hq), 2e-2, name);
        snprintf(name, sizeof name, "bwd dk cuDNN vs hand-written (%s)", tag);
        check_rel(rel_bb(gk_h, hk), 2e-2, name);
        snprintf(name, sizeof name, "bwd dv cuDNN vs hand-written (%s)", tag);
        check_rel(rel_bb(gv_h, hv), 2e-2, name);
        CK(cudaFree(ws));
    }
    if (snd) {  // the fp32 dQ-accumulator graph
        CK(cudaMemset(gq2, 0xff, qn * 2));
        CK(cudaMemset(gk2, 0xff, kn * 2));
        CK(cudaMemset(gv2, 0xff, kn * 2));
        rc = sdpa_cudnn_bwd(snd, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, dq_, dk_, dv_, dds, dor, dl, ddo, gq2, gk2, gv2, NULL,
                            err, sizeof err);
        snprintf(name, sizeof name, "bwd dQ-atomics call (%s)", tag);
        check_true(rc == 0, name, err);
        std::vector<bf16> aq = dget(gq2, qn), ak = dget(gk2, kn), av = dget(gv2, kn);
        snprintf(name, sizeof name, "bwd dQ-atomics dq vs float64 (%s)", tag);
        check_rel(rel_bd(aq, gq), 1e-2, name);
        snprintf(name, sizeof name, "bwd dQ-atomics dk vs float64 (%s)", tag);
        check_rel(rel_bd(ak, gk), 1e-2, name);
        snprintf(name, sizeof name, "bwd dQ-atomics dv vs float64 (%s)", tag);
        check_rel(rel_bd(av, gv), 1e-2, name);
    }
    for (void *p : {(void *)dq_, (void *)dk_, (void *)dv_, (void *)ddo, (void *)o, (void *)lse, (void *)dor, (void *)dl, (void *)gq1,
                    (void *)gk1, (void *)gv1, (void *)gq2, (void *)gk2, (void *)gv2})
        CK(cudaFree(p));
    if (dds) CK(cudaFree(dds));
}

// calls that must be refused (-1, a message) without touching the outputs
static void refusals(SdpaCudnn *s) {
    printf("refused calls\n");
    const int64_t B = 1, T = 64;
    bf16 *q = dpoison<bf16>(B * T * 9 * 128 + 8), *k = dpoison<bf16>(B * T * 9 * 128), *v = dpoison<bf16>(B * T * 9 * 128);
    bf16 *o = dpoison<bf16>(B * T * 9 * 128);
    float *lse = dpoison<float>(B * 9 * T);
    struct {
        const char *what;
        DType dt;
        int H, G, D, causal, shift, docs;
    } bad[] = {{"head_dim 100 (not a multiple of 8)", DT_BF16, 4, 2, 100, 1, 0, 0},
               {"fp32 activations", DT_F32, 4, 2, 64, 1, 0, 0},
               {"9 query heads over 4 KV heads", DT_BF16, 9, 4, 64, 1, 0, 0},
               {"q not 16-byte aligned", DT_BF16, 4, 2, 64, 1, 1, 0},
               {"documents without causal", DT_BF16, 4, 2, 64, 0, 0, 1}};
    int32_t *ds = dput(std::vector<int32_t>((size_t)(B * T), 0));
    for (auto &b : bad) {
        err[0] = 0;
        // poisoned afresh for every call, so that one call that wrongly ran cannot fail the next ones' checks
        CK(cudaMemset(o, 0xff, (size_t)(B * T * 9 * 128) * sizeof(bf16)));
        CK(cudaMemset(lse, 0xff, (size_t)(B * 9 * T) * sizeof(float)));
        CK(cudaDeviceSynchronize());
        const int rc = sdpa_cudnn_fwd(s, b.dt, B, T, b.H, b.G, b.D, b.causal, q + b.shift, k, v, b.docs ? ds : NULL, o, lse, NULL,
                                      err, sizeof err);
        char name[128];
        snprintf(name, sizeof name, "refused: %s", b.what);
        check_true(rc == -1 && err[0] && still_poisoned(o, B * T * 9 * 128 * 2) && still_poisoned(lse, B * 9 * T * 4), name,
                   rc ? "outputs were written" : "accepted");
        if (rc) printf("       (%s)\n", err);
    }
    for (void *p : {(void *)q, (void *)k, (void *)v, (void *)o, (void *)lse, (void *)ds}) CK(cudaFree(p));
}

static std::vector<Case> cases() {
    std::vector<Case> v;
    v.push_back({2, 200, 9, 3, 64, 1, {}});                          // SmolLM2 heads, T % 64 != 0
    v.push_back({2, 200, 9, 3, 64, 1, {70, 71, 150, 200 + 64}});      // with document resets (one 1-token document)
    v.push_back({1, 300, 32, 8, 128, 1, {}});                        // Llama-3-8B heads
    v.push_back({2, 130, 32, 8, 128, 1, {40, 130 + 1, 130 + 100}});  // Llama-3-8B heads with documents
    v.push_back({1, 256, 4, 4, 128, 1, {}});                         // MHA (no head reduction), T % 128 == 0
    v.push_back({1, 100, 4, 2, 64, 0, {}});                          // full (non-causal) attention
    return v;
}

// An H100 SXM as cuDNN's device-properties JSON (the fields cuDNN 9.19 reads)
static const char *H100_JSON =
    "{\"maxGridSize\":[2147483647,65535,65535],\"maxBlockSize\":[1024,1024,64],\"regsPerBlock\":65536,"
    "\"multiProcessorCount\":132,\"warpSize\":32,\"maxSharedMemoryPerBlock\":49152,\"maxSharedMemoryPerBlockOptin\":232448,"
    "\"reservedSharedMemoryPerBlock\":1024,\"maxRegistersPerSM\":65536,\"maxCtasPerSM\":32,\"maxThreadsPerBlock\":1024,"
    "\"maxThreadsPerSM\":2048,\"pciDeviceId\":0,\"isTccDriver\":0,\"supportCoopLaunch\":1,\"smClockRateKHz\":1980000,"
    "\"memClockRateKHz\":2619000,\"l2CacheSize\":52428800,\"deviceName\":\"NVIDIA H100 80GB HBM3\","
    "\"totalGlobalMem\":85045460992,\"cudaDeviceId\":0,\"deviceVer\":900,\"driverVer\":13000}";

// exit status 77 (ctest: skipped) where the check cannot run: no cuDNN >= 9.8, or no libcuda.so.1 at all
// (then cuDNN's engines stop at their support checks; the toolkit's stub driver is enough to compile)
static int offline() {
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cuda) {
        printf("gpu_test_sdpa --offline: skipped: no libcuda.so.1 (put the CUDA toolkit's lib/stubs/libcuda.so, "
               "linked as libcuda.so.1, on LD_LIBRARY_PATH)\n");
        return 77;
    }
    for (int det = 1; det >= 0; det--) {
        SdpaCudnn *s = sdpa_cudnn_new_offline(det, H100_JSON, err, sizeof err);
        if (!s) {
            const bool absent = strstr(err, "not available") || strstr(err, "need cuDNN 9.8");
            printf("%s offline handle: %s\n", absent ? "gpu_test_sdpa --offline: skipped:" : "  FAIL", err);
            return absent ? 77 : 1;
        }
        if (det) printf("cuDNN %ld, offline plans for an H100 (%s backward)\n", sdpa_cudnn_version(s), "deterministic");
        else printf("offline plans, dQ-atomics backward\n");
        for (const Case &c : cases())
            for (int bwd = 0; bwd < 2; bwd++) {
                if (!bwd && !det) continue;  // the forward does not depend on the flag
                char tag[96], name[160];
                describe(c, tag, sizeof tag);
                snprintf(name, sizeof name, "%s plan (%s)", bwd ? "bwd" : "fwd", tag);
                const int rc = sdpa_cudnn_prepare(s, bwd, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, !c.resets.empty(), err, sizeof err);
                int64_t engine = -1;
                sdpa_cudnn_plan_info(s, bwd, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, !c.resets.empty(), &engine, NULL);
                check_true(rc == 0, name, err);
                if (!rc) printf("       (engine %lld compiled the graph)\n", (long long)engine);
            }
        sdpa_cudnn_free(s);
    }
    printf("gpu_test_sdpa --offline: %d passed, %d failed\n", npass, nfail);
    return nfail ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--offline")) return offline();
    int dev = 0;
    CK(cudaGetDevice(&dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    SdpaCudnn *s = sdpa_cudnn_new(1, err, sizeof err);
    if (!s) {
        printf("  FAIL sdpa_cudnn_new: %s\n", err);
        printf("gpu_test_sdpa: 0 passed, 1 failed\n");
        return 1;
    }
    SdpaCudnn *snd = sdpa_cudnn_new(0, err, sizeof err);
    check_true(snd != NULL, "sdpa_cudnn_new (dQ atomics)", err);
    printf("%s, cuDNN %ld\n", prop.name, sdpa_cudnn_version(s));
    for (const Case &c : cases()) run_case(s, snd, c);
    refusals(s);
    int64_t engine, ws;
    for (const Case &c : cases())
        for (int bwd = 0; bwd < 2; bwd++)
            if (!sdpa_cudnn_plan_info(s, bwd, DT_BF16, c.B, c.T, c.H, c.G, c.D, c.causal, !c.resets.empty(), &engine, &ws)) {
                char tag[96];
                describe(c, tag, sizeof tag);
                printf("  plan %s (%s): engine %lld, workspace %lld B\n", bwd ? "bwd" : "fwd", tag, (long long)engine, (long long)ws);
            }
    sdpa_cudnn_free(snd);
    sdpa_cudnn_free(s);
    printf("gpu_test_sdpa: %d passed, %d failed\n", npass, nfail);
    return nfail ? 1 : 0;
}
