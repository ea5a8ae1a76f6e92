// gpu_test_train.cu: every training-backend kernel against its CPU twin, the engine's own function
// (distill/layers_cpu.c, losses.c, optim.c), on fresh random inputs with outputs poisoned (all bits set:
// NaN) before each call, in both modes: fp32 (tolerance 1e-5 relative error norm; AdamW bit-exact) and bf16
// (inputs rounded to bf16 first and the CPU run on the rounded values, so the error is the kernel's own;
// tolerance 1e-2). Determinism: the reducing kernels run twice and must give identical bits.
// Shapes are small and awkward (rows not multiples of the tiles, V not a multiple of the block, GQA,
// several documents per row). Exit status 1 if any check fails.
#include <unistd.h>
#include <cublasLt.h>

#include <vector>

#include "kernels/scan/gpu_common.cuh"
#include "kernels/train/train_cuda.h"

#define _Noreturn [[noreturn]]  // C11 keyword in distill/common.h
extern "C" {
#include "distill/layers_cpu.h"
#include "distill/losses.h"
#include "distill/optim.h"
#include "distill/registry.h"
}

typedef __nv_bfloat16 bf16;
typedef std::vector<float> Vec;

static int npass = 0, nfail = 0;
static char err[512];

static void check(bool ok, const char *name, const char *fmt, double x, double tol) {
    ok ? npass++ : nfail++;
    printf("  %-4s %-46s ", ok ? "ok" : "FAIL", name);
    printf(fmt, x, tol);
    printf("\n");
}
static void check_rel(double e, double tol, const char *name) {
    check(e <= tol && e == e, name, "rel err %.2e (tol %.0e)", e, tol);
}
// a refused call counts as a failure and the test goes on (its poisoned outputs then fail their checks too)
static void need(int rc, const char *what) {
    if (rc) {
        printf("  FAIL %-46s call refused: %s\n", what, err);
        nfail++;
    }
}

// ---- host data
static uint64_t hs = 0x5eed;
static double hunif() { return (double)(gmix64(hs++) >> 11) * 0x1.0p-53; }
static double hnorm() { return sqrt(-2 * log(hunif() + 1e-300)) * cos(6.283185307179586 * hunif()); }
static Vec randn(int64_t n, double sd) {
    Vec v((size_t)n);
    for (auto &x : v) x = (float)(sd * hnorm());
    return v;
}
static double rel(const Vec &x, const Vec &r) {
    double a = 0, b = 0;
    for (size_t i = 0; i < x.size(); i++) {
        const double e = (double)x[i] - r[i];
        a += e * e, b += (double)r[i] * r[i];
    }
    return a != a ? NAN : sqrt(a / (b > 0 ? b : 1));
}
static const char *dtn(DType dt) { return dt == DT_BF16 ? "bf16" : "f32"; }
static double tol_of(DType dt) { return dt == DT_BF16 ? 1e-2 : 1e-5; }
static size_t esz(DType dt) { return dt == DT_BF16 ? 2 : 4; }

// ---- device buffers of dtype dt
struct Buf {
    void *p = nullptr;
    int64_t n = 0;
    DType dt = DT_F32;
};
static Buf dalloc(DType dt, int64_t n) {
    Buf b;
    b.n = n, b.dt = dt;
    CK(cudaMalloc(&b.p, (size_t)(n > 0 ? n : 1) * esz(dt)));
    CK(cudaMemset(b.p, 0xFF, (size_t)(n > 0 ? n : 1) * esz(dt)));  // poison
    return b;
}
static void dfree(Buf &b) {
    CK(cudaFree(b.p));
    b.p = nullptr;
}
// uploads x as dt; x is rounded to what dt holds, so the CPU twin sees the same inputs
static Buf up(DType dt, Vec &x) {
    Buf b = dalloc(dt, (int64_t)x.size());
    if (dt == DT_F32) {
        CK(cudaMemcpy(b.p, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    } else {
        std::vector<bf16> t(x.size());
        for (size_t i = 0; i < x.size(); i++) t[i] = __float2bfloat16_rn(x[i]), x[i] = __bfloat162float(t[i]);
        CK(cudaMemcpy(b.p, t.data(), x.size() * 2, cudaMemcpyHostToDevice));
    }
    return b;
}
static void upload_into(Buf &b, Vec &x) {
    Buf t = up(b.dt, x);
    CK(cudaMemcpy(b.p, t.p, x.size() * esz(b.dt), cudaMemcpyDeviceToDevice));
    dfree(t);
}
static Vec down(const Buf &b) {
    Vec x((size_t)b.n);
    CK(cudaDeviceSynchronize());
    if (b.dt == DT_F32) {
        CK(cudaMemcpy(x.data(), b.p, x.size() * 4, cudaMemcpyDeviceToHost));
    } else {
        std::vector<bf16> t(x.size());
        CK(cudaMemcpy(t.data(), b.p, x.size() * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < x.size(); i++) x[i] = __bfloat162float(t[i]);
    }
    return x;
}
static bool same_bits(const Buf &a, const Buf &b) {
    std::vector<char> x((size_t)a.n * esz(a.dt)), y((size_t)b.n * esz(b.dt));
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(x.data(), a.p, x.size(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(y.data(), b.p, y.size(), cudaMemcpyDeviceToHost));
    return x == y;
}
template <typename T>
static T *dput(const std::vector<T> &x) {
    T *p;
    CK(cudaMalloc(&p, x.size() * sizeof(T) + 16));
    CK(cudaMemcpy(p, x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
}
static void check_flag(bool ok, const char *name, const char *detail) {
    ok ? npass++ : nfail++;
    printf("  %-4s %-46s %s\n", ok ? "ok" : "FAIL", name, detail);
}
static void det(bool same, const char *name) { check_flag(same, name, "bitwise identical over two runs"); }

// ---------------------------------------------------------------- GEMM

static void test_gemm(DlGemm *g, DType dt) {
    const int64_t N = 136, In = 200, O = 328;  // rows not a multiple of any tile
    printf("GEMM (%s): N %lld, In %lld, O %lld\n", dtn(dt), (long long)N, (long long)In, (long long)O);
    Vec x = randn(N * In, 1), W = randn(O * In, 0.05), bias = randn(O, 0.5), dy = randn(N * O, 1);
    Buf dx_ = up(dt, x), dW_ = up(dt, W), dbias = up(dt, bias), ddy = up(dt, dy);
    char name[96];
    // forward with bias
    Vec y(N * O);
    linear_fwd(y.data(), x.data(), W.data(), N, In, O, false);
    for (int64_t n = 0; n < N; n++)
        for (int64_t o = 0; o < O; o++) y[n * O + o] += bias[o];
    Buf dyo = dalloc(dt, N * O);
    need(dl_linear_fwd(g, dt, dyo.p, dx_.p, dW_.p, dbias.p, N, In, O, 0, NULL, err, sizeof err), "linear_fwd");
    snprintf(name, sizeof name, "linear fwd + bias epilogue (%s)", dtn(dt));
    check_rel(rel(down(dyo), y), tol_of(dt), name);
    // forward accumulating into an existing output (beta = 1), no bias
    Vec y0 = randn(N * O, 1);
    upload_into(dyo, y0);
    Vec y1 = y0;
    linear_fwd(y1.data(), x.data(), W.data(), N, In, O, true);
    need(dl_linear_fwd(g, dt, dyo.p, dx_.p, dW_.p, NULL, N, In, O, 1, NULL, err, sizeof err), "linear_fwd acc");
    snprintf(name, sizeof name, "linear fwd accumulate (%s)", dtn(dt));
    check_rel(rel(down(dyo), y1), tol_of(dt), name);
    // dgrad and wgrad (fp32 gradient accumulated onto random contents)
    Vec dxr(N * In), dWr = randn(O * In, 0.1);
    Buf ddx = dalloc(dt, N * In), ddW = dalloc(DT_F32, O * In);
    upload_into(ddW, dWr);
    linear_bwd(dxr.data(), false, dWr.data(), dy.data(), x.data(), W.data(), N, In, O);
    need(dl_linear_dgrad(g, dt, ddx.p, ddy.p, dW_.p, N, In, O, 0, NULL, err, sizeof err), "dgrad");
    need(dl_linear_wgrad(g, dt, DT_F32, ddW.p, ddy.p, dx_.p, N, In, O, 1, NULL, err, sizeof err), "wgrad");
    snprintf(name, sizeof name, "linear dgrad (%s)", dtn(dt));
    check_rel(rel(down(ddx), dxr), tol_of(dt), name);
    snprintf(name, sizeof name, "linear wgrad, fp32 accumulate (%s in)", dtn(dt));
    check_rel(rel(down(ddW), dWr), dt == DT_BF16 ? 1e-5 : 1e-5, name);  // fp32 output: no output rounding
    // determinism of all three
    Buf a1 = dalloc(dt, N * O), a2 = dalloc(dt, N * O), w1 = dalloc(DT_F32, O * In), w2 = dalloc(DT_F32, O * In);
    need(dl_linear_fwd(g, dt, a1.p, dx_.p, dW_.p, dbias.p, N, In, O, 0, NULL, err, sizeof err), "fwd");
    need(dl_linear_fwd(g, dt, a2.p, dx_.p, dW_.p, dbias.p, N, In, O, 0, NULL, err, sizeof err), "fwd");
    need(dl_linear_wgrad(g, dt, DT_F32, w1.p, ddy.p, dx_.p, N, In, O, 0, NULL, err, sizeof err), "wgrad");
    need(dl_linear_wgrad(g, dt, DT_F32, w2.p, ddy.p, dx_.p, N, In, O, 0, NULL, err, sizeof err), "wgrad");
    snprintf(name, sizeof name, "linear fwd/wgrad deterministic (%s)", dtn(dt));
    det(same_bits(a1, a2) && same_bits(w1, w2), name);
    // misaligned leading dimension is refused with a message, nothing launched
    int rc = dl_gemm(g, 3, 5, 7, dt, dx_.p, 0, dW_.p, 1, dt, dyo.p, NULL, 1, 0, NULL, err, sizeof err);
    check_flag(rc == -1, "dl_gemm refuses unaligned rows", err);
    for (Buf *b : {&dx_, &dW_, &dbias, &ddy, &dyo, &ddx, &ddW, &a1, &a2, &w1, &w2}) dfree(*b);
}

// GEMM tuning (DISTILL_GEMM_TUNE=1): a tuned shape gives the reference's numbers; a second "process" (the
// process-wide choices forgotten, the cache file read back) runs the same kernel, bit for bit, also with junk
// lines in the file; tuning off still gives the reference's numbers. Which offer wins is the GPU's business.
static void test_gemm_tune() {
    const int64_t N = 520, In = 256, O = 1032;
    printf("GEMM tuning: N %lld, In %lld, O %lld\n", (long long)N, (long long)In, (long long)O);
    char path[128];
    snprintf(path, sizeof path, "/tmp/distill-gemm-tune-%d.txt", (int)getpid());
    remove(path);
    setenv("DISTILL_GEMM_TUNE_FILE", path, 1);
    Vec x = randn(N * In, 1), W = randn(O * In, 0.05), y(N * O);
    linear_fwd(y.data(), x.data(), W.data(), N, In, O, false);
    Buf dx = up(DT_BF16, x), dW = up(DT_BF16, W);
    Buf out[4] = {dalloc(DT_BF16, N * O), dalloc(DT_BF16, N * O), dalloc(DT_BF16, N * O), dalloc(DT_BF16, N * O)};
    const char *tune[4] = {"1", "1", "1", "0"};
    for (int run = 0; run < 4; run++) {
        setenv("DISTILL_GEMM_TUNE", tune[run], 1);
        if (run == 2) {  // lines a reader must skip: torn, foreign, wrong field counts
            FILE *f = fopen(path, "a");
            if (f) fputs("junk\n|||\nsome GPU|1|1 2 3|0\n", f), fclose(f);
        }
        dl_gemm_tune_reload();
        DlGemm *g = dl_gemm_new(0, err, sizeof err);
        if (!g) {
            need(1, "dl_gemm_new");
            continue;
        }
        need(dl_linear_fwd(g, DT_BF16, out[run].p, dx.p, dW.p, NULL, N, In, O, 0, NULL, err, sizeof err), "linear_fwd tuned");
        dl_gemm_free(g);
        char name[96];
        snprintf(name, sizeof name, "tuned GEMM, run %d (DISTILL_GEMM_TUNE=%s) vs the CPU", run, tune[run]);
        check_rel(rel(down(out[run]), y), 1e-2, name);
    }
    FILE *f = fopen(path, "r");
    int lines = 0;
    char line[1024];
    while (f && fgets(line, sizeof line, f)) lines++;
    if (f) fclose(f);
    check(lines >= 4, "tuning cache file written", "%g lines (>= %g: 1 + 3 junk)", lines, 4);
    det(same_bits(out[0], out[1]), "GEMM run 2 (cache read back) = run 1");
    det(same_bits(out[0], out[2]), "GEMM run 3 (cache with junk lines) = run 1");
    unsetenv("DISTILL_GEMM_TUNE");
    unsetenv("DISTILL_GEMM_TUNE_FILE");
    dl_gemm_tune_reload();
    remove(path);
    for (Buf &b : out) dfree(b);
    dfree(dx), dfree(dW);
}

// ---------------------------------------------------------------- RMSNorm

// d % 8 == 0: the bf16 16-byte paths (warp per row for d <= 2048 with dw, and for every d without dw; the block
// kernel for larger d with dw); N > 256 puts several rows in each of the backward's 256 row ranges
static void test_rmsnorm(DType dt, int64_t d, int64_t N = 77) {
    const float eps = 1e-5f;
    printf("RMSNorm (%s): N %lld, d %lld\n", dtn(dt), (long long)N, (long long)d);
    Vec x = randn(N * d, 1), r = randn(N * d, 1), w = randn(d, 0.3);
    for (auto &v : w) v += 1.0f;
    Buf bx = up(dt, x), br = up(dt, r), bw = up(dt, w);
    // fused residual: h = x + r (rounded to dt), out = norm(h)
    Buf bh = dalloc(dt, N * d), bo = dalloc(dt, N * d);
    float *rstd;
    CK(cudaMalloc(&rstd, N * 4));
    CK(cudaMemset(rstd, 0xFF, N * 4));
    need(rmsnorm_fwd_cuda(dt, bo.p, rstd, bh.p, bx.p, br.p, bw.p, N, d, eps, NULL, err, sizeof err), "rmsnorm fwd");
    Vec h(N * d);
    for (int64_t i = 0; i < N * d; i++) h[i] = x[i] + r[i];
    Buf tmp = up(dt, h);  // rounds h as the kernel stores it
    dfree(tmp);
    Vec out(N * d), rs(N);
    rmsnorm_fwd(out.data(), rs.data(), h.data(), w.data(), N, d, eps);
    char name[96];
    snprintf(name, sizeof name, "rmsnorm fwd + residual: h (%s)", dtn(dt));
    check_rel(rel(down(bh), h), dt == DT_BF16 ? 1e-2 : 1e-6, name);
    snprintf(name, sizeof name, "rmsnorm fwd + residual: out (%s)", dtn(dt));
    check_rel(rel(down(bo), out), tol_of(dt), name);
    Vec grs(N);
    CK(cudaMemcpy(grs.data(), rstd, N * 4, cudaMemcpyDeviceToHost));
    snprintf(name, sizeof name, "rmsnorm fwd: rstd (%s)", dtn(dt));
    check_rel(rel(grs, rs), 1e-5, name);
    // plain (no residual)
    Buf bo2 = dalloc(dt, N * d);
    need(rmsnorm_fwd_cuda(dt, bo2.p, NULL, NULL, bx.p, NULL, bw.p, N, d, eps, NULL, err, sizeof err), "rmsnorm fwd");
    Vec out2(N * d);
    rmsnorm_fwd(out2.data(), NULL, x.data(), w.data(), N, d, eps);
    snprintf(name, sizeof name, "rmsnorm fwd (%s)", dtn(dt));
    check_rel(rel(down(bo2), out2), tol_of(dt), name);
    // backward: din accumulates onto existing values, dw (fp32) onto existing values
    Vec dy = randn(N * d, 1), din0 = randn(N * d, 1), dw0 = randn(d, 1);
    Buf bdy = up(dt, dy), bdin = up(dt, din0);
    Buf bdw = up(DT_F32, dw0);
    Buf bhh = up(dt, h);
    CK(cudaMemcpy(rstd, rs.data(), N * 4, cudaMemcpyHostToDevice));
    const size_t ws = rmsnorm_bwd_workspace(N, d);
    void *wsp;
    CK(cudaMalloc(&wsp, ws));
    need(rmsnorm_bwd_cuda(dt, bdin.p, (float *)bdw.p, bdy.p, bhh.p, bw.p, rstd, N, d, wsp, NULL, err, sizeof err), "rmsnorm bwd");
    Vec din = din0, dw = dw0;
    rmsnorm_bwd(din.data(), dw.data(), dy.data(), h.data(), w.data(), rs.data(), N, d);
    snprintf(name, sizeof name, "rmsnorm bwd: din += (%s)", dtn(dt));
    check_rel(rel(down(bdin), din), tol_of(dt), name);
    snprintf(name, sizeof name, "rmsnorm bwd: dw += (fp32, %s in)", dtn(dt));
    check_rel(rel(down(bdw), dw), 1e-5, name);
    {  // frozen weight (dw NULL, as stage 1's norms): din only
        Buf bdin3 = up(dt, din0);
        need(rmsnorm_bwd_cuda(dt, bdin3.p, NULL, bdy.p, bhh.p, bw.p, rstd, N, d, NULL, NULL, err, sizeof err), "bwd");
        snprintf(name, sizeof name, "rmsnorm bwd without dw: din += (%s)", dtn(dt));
        check_rel(rel(down(bdin3), din), tol_of(dt), name);
        dfree(bdin3);
    }
    Buf bdw2 = up(DT_F32, dw0), bdin2 = up(dt, din0);
    upload_into(bdin, din0);
    upload_into(bdw, dw0);
    need(rmsnorm_bwd_cuda(dt, bdin.p, (float *)bdw.p, bdy.p, bhh.p, bw.p, rstd, N, d, wsp, NULL, err, sizeof err), "bwd");
    need(rmsnorm_bwd_cuda(dt, bdin2.p, (float *)bdw2.p, bdy.p, bhh.p, bw.p, rstd, N, d, wsp, NULL, err, sizeof err), "bwd");
    snprintf(name, sizeof name, "rmsnorm bwd deterministic (%s)", dtn(dt));
    det(same_bits(bdin, bdin2) && same_bits(bdw, bdw2), name);
    CK(cudaFree(rstd));
    CK(cudaFree(wsp));
    for (Buf *b : {&bx, &br, &bw, &bh, &bo, &bo2, &bdy, &bdin, &bdw, &bhh, &bdw2, &bdin2}) dfree(*b);
}

// ---------------------------------------------------------------- RoPE

static void test_rope(DType dt) {
    LlamaConfig c;
    memset(&c, 0, sizeof c);
    c.head_dim = 128, c.rope_theta = 500000.0;
    c.rope_factor = 8, c.rope_low_freq_factor = 1, c.rope_high_freq_factor = 4, c.rope_orig_max_pos = 8192;
    const int nh = 6, hd = c.head_dim;
    const int64_t B = 2, T = 300, N = B * T;
    printf("RoPE (%s, llama3 scaling): N %lld, heads %d, hd %d, two documents per row\n", dtn(dt), (long long)N, nh, hd);
    std::vector<float> invf(hd / 2);
    rope_inv_freq(&c, invf.data());
    std::vector<uint8_t> reset(N, 0);
    reset[100] = reset[T + 7] = 1;
    std::vector<int32_t> pos(N), ds(N);
    doc_positions(B, T, reset.data(), pos.data(), ds.data());
    for (int64_t n = 0; n < N; n += 97) pos[n] += 6000;  // large angles too
    Vec x = randn(N * nh * hd, 1);
    Buf bx = up(dt, x);
    float *dinv = dput(invf);
    int32_t *dpos = dput(pos);
    need(rope_cuda(dt, bx.p, dpos, dinv, N, nh, hd, 0, NULL, err, sizeof err), "rope");
    Vec y = x;
    rope_apply(y.data(), pos.data(), invf.data(), N, nh, hd, false);
    char name[96];
    snprintf(name, sizeof name, "rope fwd (%s)", dtn(dt));
    check_rel(rel(down(bx), y), tol_of(dt), name);
    Vec g = randn(N * nh * hd, 1);
    Buf bg = up(dt, g);
    need(rope_cuda(dt, bg.p, dpos, dinv, N, nh, hd, 1, NULL, err, sizeof err), "rope inverse");
    rope_apply(g.data(), pos.data(), invf.data(), N, nh, hd, true);
    snprintf(name, sizeof name, "rope bwd (inverse rotation) (%s)", dtn(dt));
    check_rel(rel(down(bg), g), tol_of(dt), name);
    // q (nh heads) and k (2 heads) in one launch: the same bits as one rope_cuda each (the decoder's path)
    const int nk = 2;
    Vec q = randn(N * nh * hd, 3), k = randn(N * nk * hd, 4);
    Buf q1 = up(dt, q), k1 = up(dt, k), q2 = up(dt, q), k2 = up(dt, k);
    need(rope_cuda(dt, q1.p, dpos, dinv, N, nh, hd, 0, NULL, err, sizeof err), "rope q");
    need(rope_cuda(dt, k1.p, dpos, dinv, N, nk, hd, 0, NULL, err, sizeof err), "rope k");
    need(rope2_cuda(dt, q2.p, nh, k2.p, nk, dpos, dinv, N, hd, 0, NULL, err, sizeof err), "rope2");
    snprintf(name, sizeof name, "rope2 (q and k in one launch) == rope each (%s)", dtn(dt));
    check_flag(same_bits(q1, q2) && same_bits(k1, k2), name, "bitwise identical");
    CK(cudaFree(dinv));
    CK(cudaFree(dpos));
    dfree(bx), dfree(bg), dfree(q1), dfree(k1), dfree(q2), dfree(k2);
}

// ---------------------------------------------------------------- SwiGLU

static void test_swiglu(DType dt, int64_t ff) {  // ff % 8 == 0: the bf16 16-byte path
    const int64_t rows = 53, ld = 2 * ff;  // gate | up halves of one fused GEMM output
    printf("SwiGLU (%s): rows %lld, ff %lld, ld %lld\n", dtn(dt), (long long)rows, (long long)ff, (long long)ld);
    Vec gu = randn(rows * ld, 2), dy = randn(rows * ff, 1);
    Buf bgu = up(dt, gu), bdy = up(dt, dy), bo = dalloc(dt, rows * ff), bd = dalloc(dt, rows * ld);
    Vec gate(rows * ff), upv(rows * ff), dyv = dy;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < ff; c++) gate[r * ff + c] = gu[r * ld + c], upv[r * ff + c] = gu[r * ld + ff + c];
    const char *base = (const char *)bgu.p;
    need(swiglu_fwd_cuda(dt, bo.p, base, base + ff * esz(dt), rows, ff, ld, NULL, err, sizeof err), "swiglu fwd");
    Vec out(rows * ff);
    swiglu_fwd(out.data(), gate.data(), upv.data(), rows * ff);
    char name[96];
    snprintf(name, sizeof name, "swiglu fwd (%s)", dtn(dt));
    check_rel(rel(down(bo), out), tol_of(dt), name);
    char *dbase = (char *)bd.p;
    need(swiglu_bwd_cuda(dt, dbase, dbase + ff * esz(dt), bdy.p, base, base + ff * esz(dt), rows, ff, ld, NULL, err,
                         sizeof err), "swiglu bwd");
    Vec dg(rows * ff), du(rows * ff);
    swiglu_bwd(dg.data(), du.data(), dyv.data(), gate.data(), upv.data(), rows * ff);
    Vec got = down(bd), gg(rows * ff), gup(rows * ff);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < ff; c++) gg[r * ff + c] = got[r * ld + c], gup[r * ff + c] = got[r * ld + ff + c];
    snprintf(name, sizeof name, "swiglu bwd: dgate (%s)", dtn(dt));
    check_rel(rel(gg, dg), tol_of(dt), name);
    snprintf(name, sizeof name, "swiglu bwd: dup (%s)", dtn(dt));
    check_rel(rel(gup, du), tol_of(dt), name);
    for (Buf *b : {&bgu, &bdy, &bo, &bd}) dfree(*b);
}

// ---------------------------------------------------------------- embedding

static void test_embedding(DType dt) {
    const int64_t V = 1000, d = 264, N = 517;
    printf("embedding (%s): V %lld, d %lld, N %lld (repeated tokens)\n", dtn(dt), (long long)V, (long long)d, (long long)N);
    std::vector<int32_t> tok(N);
    for (auto &t : tok) t = (int32_t)(hunif() < 0.3 ? 7 : (int32_t)(hunif() * V));  // one frequent token
    tok[N - 1] = (int32_t)V - 1;
    Vec wte = randn(V * d, 1), dy = randn(N * d, 1), dw0 = randn(V * d, 1);
    Buf bw = up(dt, wte), bo = dalloc(dt, N * d), bdy = up(dt, dy), bdw = up(DT_F32, dw0), bdw2 = up(DT_F32, dw0);
    int32_t *dtok = dput(tok);
    need(embedding_fwd_cuda(dt, bo.p, dtok, bw.p, N, V, d, NULL, err, sizeof err), "embedding fwd");
    Vec out(N * d);
    embedding_fwd(out.data(), tok.data(), wte.data(), N, d);
    char name[96];
    snprintf(name, sizeof name, "embedding fwd (%s)", dtn(dt));
    check_rel(rel(down(bo), out), 0, name);  // a copy: exact
    std::vector<int32_t> order(N), seg(N + 1), uniq(N);
    const int64_t U = embedding_bwd_plan(tok.data(), N, V, order.data(), seg.data(), uniq.data(), err, sizeof err);
    if (U < 0) need(1, "embedding_bwd_plan");
    int32_t *dord = dput(order), *dseg = dput(seg), *duq = dput(uniq);
    need(embedding_bwd_cuda(dt, (float *)bdw.p, bdy.p, dord, dseg, duq, U, d, NULL, err, sizeof err), "embedding bwd");
    need(embedding_bwd_cuda(dt, (float *)bdw2.p, bdy.p, dord, dseg, duq, U, d, NULL, err, sizeof err), "embedding bwd");
    Vec dw = dw0;
    embedding_bwd(dw.data(), dy.data(), tok.data(), N, d);
    snprintf(name, sizeof name, "embedding bwd: dwte += (fp32, %s in)", dtn(dt));
    check_rel(rel(down(bdw), dw), 1e-5, name);
    snprintf(name, sizeof name, "embedding bwd deterministic (%s)", dtn(dt));
    det(same_bits(bdw, bdw2), name);
    std::vector<int32_t> bad = tok;
    bad[3] = (int32_t)V;
    const int64_t rc = embedding_bwd_plan(bad.data(), N, V, order.data(), seg.data(), uniq.data(), err, sizeof err);
    check_flag(rc == -1 && strstr(err, "row 3"), "embedding_bwd_plan names a bad token's row", err);
    for (int32_t *p : {dtok, dord, dseg, duq}) CK(cudaFree(p));
    for (Buf *b : {&bw, &bo, &bdy, &bdw, &bdw2}) dfree(*b);
}

// ---------------------------------------------------------------- losses

// kern: "block" or "cluster" picks loss_rows_cuda's kernel through DISTILL_LOSS_ROWS, "auto" its default
static void test_loss(DType dt, int64_t V, float T, float wce, float wkl, float wrkl, bool inplace, const char *kern = "auto") {
    const int64_t n = 37;
    if (strcmp(kern, "auto")) setenv("DISTILL_LOSS_ROWS", kern, 1);
    else unsetenv("DISTILL_LOSS_ROWS");
    printf("loss (%s, %s kernel): n %lld, V %lld, T %.1f, ce %.1f kl %.1f rkl %.1f, %s\n", dtn(dt), kern, (long long)n,
           (long long)V, T, wce, wkl, wrkl, inplace ? "dlogits in place" : "separate dlogits");
    Vec s = randn(n * V, 3), t = randn(n * V, 3), rw(n);
    std::vector<int32_t> tgt(n);
    std::vector<uint8_t> mask(n);
    for (int64_t r = 0; r < n; r++) {
        tgt[r] = r % 9 == 4 ? -1 : (int32_t)(hunif() * V);
        mask[r] = r % 7 != 3;
        rw[r] = (float)(0.5 + hunif());
    }
    Buf bs = up(dt, s), bt = up(dt, t);
    int32_t *dtg = dput(tgt);
    uint8_t *dmk = dput(mask);
    float *drw = dput(rw);
    LossWeights w = {wce, wkl, wrkl, T};
    const double scale = 1.0 / 29;
    Buf bd = inplace ? bs : dalloc(dt, n * V);
    double *rows, *acc;
    float *lp;
    CK(cudaMalloc(&rows, n * 4 * sizeof(double)));
    CK(cudaMalloc(&acc, 2 * 4 * sizeof(double)));
    CK(cudaMalloc(&lp, n * 4));
    CK(cudaMemset(rows, 0xFF, n * 4 * sizeof(double)));
    CK(cudaMemset(lp, 0xFF, n * 4));
    CK(cudaMemset(acc, 0, 2 * 4 * sizeof(double)));
    need(loss_rows_cuda(dt, &w, n, V, bs.p, bt.p, dtg, dmk, drw, scale, bd.p, rows, lp, NULL, err, sizeof err), "loss");
    need(loss_sum_cuda(rows, n, acc, NULL, err, sizeof err), "loss sum");
    Vec ds(n * V), lpc(n);
    LossSums sums = {0, 0, 0, 0};
    loss_rows(&w, n, V, s.data(), t.data(), tgt.data(), mask.data(), rw.data(), scale, ds.data(), &sums, lpc.data());
    double ga[4];
    CK(cudaMemcpy(ga, acc, sizeof ga, cudaMemcpyDeviceToHost));
    char name[120];
    const double ls_tol = 1e-5;  // sums in fp64 of fp32 element terms
    const double ref[4] = {sums.ce, sums.kl, sums.rkl, sums.n_rows};
    const char *nm[4] = {"ce sum", "kl sum", "rkl sum", "counted rows"};
    for (int j = 0; j < 4; j++) {
        const double e = fabs(ga[j] - ref[j]) / fmax(fabs(ref[j]), 1e-30);
        snprintf(name, sizeof name, "loss %s (%s, %s, V %lld)", nm[j], dtn(dt), kern, (long long)V);
        check_rel(ref[j] == 0 ? fabs(ga[j]) : e, ls_tol, name);
    }
    snprintf(name, sizeof name, "loss dlogits (%s, %s, V %lld)", dtn(dt), kern, (long long)V);
    check_rel(rel(down(bd), ds), dt == DT_BF16 ? 1e-2 : 1e-5, name);
    Vec glp(n);
    CK(cudaMemcpy(glp.data(), lp, n * 4, cudaMemcpyDeviceToHost));
    snprintf(name, sizeof name, "loss logp_target (%s, %s, V %lld)", dtn(dt), kern, (long long)V);
    check_rel(rel(glp, lpc), 1e-5, name);
    if (!inplace) {  // determinism: rerun into a second buffer
        Buf bd2 = dalloc(dt, n * V);
        double *rows2;
        CK(cudaMalloc(&rows2, n * 4 * sizeof(double)));
        need(loss_rows_cuda(dt, &w, n, V, bs.p, bt.p, dtg, dmk, drw, scale, bd2.p, rows2, NULL, NULL, err, sizeof err), "loss");
        need(loss_sum_cuda(rows2, n, acc + 4, NULL, err, sizeof err), "loss sum");
        double gb[8];
        CK(cudaMemcpy(gb, acc, sizeof gb, cudaMemcpyDeviceToHost));
        snprintf(name, sizeof name, "loss deterministic (%s, %s, V %lld)", dtn(dt), kern, (long long)V);
        det(same_bits(bd, bd2) && !memcmp(gb, gb + 4, 4 * sizeof(double)), name);
        CK(cudaFree(rows2));
        dfree(bd2);
        dfree(bd);
    }
    CK(cudaFree(rows));
    CK(cudaFree(acc));
    CK(cudaFree(lp));
    CK(cudaFree(dtg));
    CK(cudaFree(dmk));
    CK(cudaFree(drw));
    dfree(bs), dfree(bt);
}

// ---------------------------------------------------------------- attention

static void test_attention(DType dt, int hd, bool docs, bool mma) {
    attention_use_tensor_cores(mma);
    const int64_t B = 2, T = 203;
    const int nh = 6, nkv = 2;
    printf("attention (%s): B %lld, T %lld, heads %d/%d, hd %d, %s, forward on %s\n", dtn(dt), (long long)B, (long long)T, nh,
           nkv, hd, docs ? "documents" : "causal only", dt == DT_BF16 && mma ? "tensor cores" : "CUDA cores");
    const int64_t qn = B * T * nh * hd, kn = B * T * nkv * hd;
    Vec q = randn(qn, 1), k = randn(kn, 1), v = randn(kn, 1), dout = randn(qn, 1);
    std::vector<uint8_t> reset(B * T, 0);
    if (docs) reset[70] = reset[71] = reset[150] = reset[T + 64] = 1;
    std::vector<int32_t> ds(B * T);
    doc_positions(B, T, reset.data(), NULL, ds.data());
    Buf bq = up(dt, q), bk = up(dt, k), bv = up(dt, v), bdo = up(dt, dout);
    Buf bo = dalloc(dt, qn), bdq = dalloc(dt, qn), bdk = dalloc(dt, kn), bdv = dalloc(dt, kn);
    Buf blse = dalloc(DT_F32, B * nh * T);
    int32_t *dds = dput(ds);
    AttnShape s = {B, T, T, 0, nh, nkv, hd};
    need(attention_fwd_cuda(dt, B, T, nh, nkv, hd, bq.p, bk.p, bv.p, dds, bo.p, (float *)blse.p, NULL, err, sizeof err), "attn fwd");
    Vec out(qn), lse(B * nh * T);
    attention_fwd(&s, q.data(), k.data(), v.data(), ds.data(), out.data(), lse.data());
    char name[96];
    snprintf(name, sizeof name, "attention fwd: out (%s, hd %d%s)", dtn(dt), hd, dt == DT_BF16 && mma ? ", mma" : "");
    check_rel(rel(down(bo), out), tol_of(dt), name);
    snprintf(name, sizeof name, "attention fwd: lse (%s, hd %d%s)", dtn(dt), hd, dt == DT_BF16 && mma ? ", mma" : "");
    check_rel(rel(down(blse), lse), 1e-5, name);

    // backward from the CPU's out/lse (rounded as dt) so both sides differentiate the same forward
    Vec outr = out;
    Buf bor = up(dt, outr);
    Buf blr = up(DT_F32, lse);
    void *ws;
    CK(cudaMalloc(&ws, attention_bwd_workspace(B, T, nh)));
    need(attention_bwd_cuda(dt, B, T, nh, nkv, hd, bq.p, bk.p, bv.p, dds, bor.p, (float *)blr.p, bdo.p, bdq.p, bdk.p, bdv.p,
                            ws, NULL, err, sizeof err), "attn bwd");
    Vec dq(qn), dk(kn), dv(kn);
    attention_bwd(&s, q.data(), k.data(), v.data(), ds.data(), outr.data(), lse.data(), dout.data(), dq.data(), dk.data(), dv.data());
    const char *path = dt == DT_BF16 && mma ? ", mma" : "";
    snprintf(name, sizeof name, "attention bwd: dq (%s, hd %d%s)", dtn(dt), hd, path);
    check_rel(rel(down(bdq), dq), tol_of(dt), name);
    snprintf(name, sizeof name, "attention bwd: dk (%s, hd %d%s)", dtn(dt), hd, path);
    check_rel(rel(down(bdk), dk), tol_of(dt), name);
    snprintf(name, sizeof name, "attention bwd: dv (%s, hd %d%s)", dtn(dt), hd, path);
    check_rel(rel(down(bdv), dv), tol_of(dt), name);
    Buf bdq2 = dalloc(dt, qn), bdk2 = dalloc(dt, kn), bdv2 = dalloc(dt, kn);
    need(attention_bwd_cuda(dt, B, T, nh, nkv, hd, bq.p, bk.p, bv.p, dds, bor.p, (float *)blr.p, bdo.p, bdq2.p, bdk2.p,
                            bdv2.p, ws, NULL, err, sizeof err), "attn bwd");
    snprintf(name, sizeof name, "attention bwd deterministic (%s, hd %d%s)", dtn(dt), hd, path);
    det(same_bits(bdq, bdq2) && same_bits(bdk, bdk2) && same_bits(bdv, bdv2), name);
    attention_use_tensor_cores(1);
    CK(cudaFree(ws));
    CK(cudaFree(dds));
    for (Buf *b : {&bq, &bk, &bv, &bdo, &bo, &bdq, &bdk, &bdv, &blse, &bor, &blr, &bdq2, &bdk2, &bdv2}) dfree(*b);
}

// ---------------------------------------------------------------- optimizer

static void test_optim(DType mv_dt) {
    // a registry of three tensors, one frozen; two steps with grad_accum 2 and clipping active
    Registry reg;
    reg_init(&reg);
    const int64_t d1[2] = {37, 129}, d2[1] = {1000}, d3[2] = {16, 16};
    reg_add(&reg, "a.weight", ROLE_MLP, 0, 2, d1);
    reg_add(&reg, "b.weight", ROLE_NORM, 0, 1, d2);
    reg_add(&reg, "c.weight", ROLE_ATTN, 0, 2, d3);
    reg.t[2].trainable = false;
    const int64_t n = reg.numel;
    printf("AdamW (%s moments) + grad norm: %lld elements, 3 tensors (1 frozen), accum 2, clip active\n", dtn(mv_dt),
           (long long)n);
    OptimConfig c;
    optim_config_default(&c);
    c.lr = 1e-2, c.weight_decay = 0.1, c.grad_accum = 2, c.clip_norm = 0.5, c.total_steps = 10, c.outlier_factor = 0;
    Optim o;
    DlError e;
    if (optim_init(&o, &c, &reg, &e)) {
        fprintf(stderr, "optim_init failed\n");
        exit(1);
    }
    Vec p = randn(n, 1), g = randn(n, 0.3);
    const Vec p0 = p;
    Buf bp = up(DT_F32, p), bg = up(DT_F32, g);
    Buf bm = dalloc(mv_dt, n), bv = dalloc(mv_dt, n), bc = dalloc(DT_BF16, n);
    CK(cudaMemset(bm.p, 0, n * esz(mv_dt)));
    CK(cudaMemset(bv.p, 0, n * esz(mv_dt)));
    double *acc;
    CK(cudaMalloc(&acc, sizeof(double)));
    void *ws;
    int64_t maxn = 0;
    for (int i = 0; i < reg.n; i++) maxn = reg.t[i].numel > maxn ? reg.t[i].numel : maxn;
    CK(cudaMalloc(&ws, grad_sumsq_workspace(n > maxn ? n : maxn)));
    bool bits_ok = true;
    double norm_err = 0;
    for (int step = 0; step < 3; step++) {
        // GPU: the norm over trainable tensors, then the per-tensor update with optim_step's scalars
        CK(cudaMemset(acc, 0, sizeof(double)));
        for (int i = 0; i < reg.n; i++)
            if (reg.t[i].trainable)
                need(grad_sumsq_cuda((const float *)bg.p + reg.t[i].offset, reg.t[i].numel, acc, ws, NULL, err, sizeof err), "sumsq");
        double ss;
        CK(cudaMemcpy(&ss, acc, sizeof ss, cudaMemcpyDeviceToHost));
        const double inv_accum = 1.0 / c.grad_accum, gnorm = sqrt(ss) * inv_accum;
        const double cpu_norm = optim_grad_norm(&reg, g.data(), inv_accum);
        norm_err = fmax(norm_err, fabs(gnorm - cpu_norm) / cpu_norm);
        OptimResult r;
        optim_step(&o, p.data(), g.data(), 1.0, &r);
        const double t = (double)o.st.t;
        const double bc1 = 1.0 - pow(c.beta1, t), bc2 = 1.0 - pow(c.beta2, t);
        for (int i = 0; i < reg.n; i++) {
            const TensorInfo *ti = &reg.t[i];
            if (!ti->trainable) continue;
            AdamWArgs a;
            a.gscale = (float)(inv_accum * r.clip_scale);  // the CPU's clip factor: bits comparable
            a.b1 = (float)c.beta1, a.b2 = (float)c.beta2, a.eps = (float)c.eps;
            a.decay = (float)(1.0 - r.lr * o.lr_scale[i] * o.wd[i]);
            a.step_size = (float)(r.lr * o.lr_scale[i] / bc1);
            a.inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
            a.seed = 1000 + step;
            const int64_t off = ti->offset;
            need(adamw_cuda(&a, ti->numel, (float *)bp.p + off, (const float *)bg.p + off, mv_dt,
                            (char *)bm.p + off * esz(mv_dt), (char *)bv.p + off * esz(mv_dt), DT_BF16,
                            (bf16 *)bc.p + off, NULL, err, sizeof err), "adamw");
        }
        if (mv_dt == DT_F32) {
            Vec gp = down(bp);
            for (int i = 0; i < reg.n; i++)
                if (reg.t[i].trainable)
                    bits_ok = bits_ok && !memcmp(gp.data() + reg.t[i].offset, p.data() + reg.t[i].offset, reg.t[i].numel * 4);
        }
        g = randn(n, 0.3);
        upload_into(bg, g);
    }
    check_rel(norm_err, 1e-12, "grad norm vs optim_grad_norm (fp64 sums)");
    Vec gp = down(bp), gc = down(bc), pt, ct;
    for (int i = 0; i < reg.n; i++)
        if (reg.t[i].trainable)
            for (int64_t j = 0; j < reg.t[i].numel; j++) {
                pt.push_back(p[reg.t[i].offset + j]);
                ct.push_back(gp[reg.t[i].offset + j]);
            }
    Vec cc;
    for (int i = 0; i < reg.n; i++)
        if (reg.t[i].trainable)
            for (int64_t j = 0; j < reg.t[i].numel; j++) cc.push_back(gc[reg.t[i].offset + j]);
    if (mv_dt == DT_F32) {
        check_flag(bits_ok, "adamw fp32: params bit-identical to optim_step", "3 steps");
        check_rel(rel(cc, pt), 4e-3, "adamw fp32: bf16 weight copy");
    } else {
        // bf16 moments: the update differs by the moments' rounding; compare the parameter change
        Vec dg, dr;
        for (int i = 0; i < reg.n; i++)
            if (reg.t[i].trainable)
                for (int64_t j = 0; j < reg.t[i].numel; j++) {
                    const int64_t o2 = reg.t[i].offset + j;
                    dg.push_back(gp[o2] - p0[o2]), dr.push_back(p[o2] - p0[o2]);
                }
        check_rel(rel(dg, dr), 2e-2, "adamw bf16 moments (stoch. rounding): update");
    }
    // frozen tensor untouched (still its poison-free initial values)
    bool frozen_ok = !memcmp(gp.data() + reg.t[2].offset, p.data() + reg.t[2].offset, reg.t[2].numel * 4);
    check_flag(frozen_ok, "adamw leaves the frozen tensor alone", "");
    // determinism of the norm: same gradients twice
    double s1, s2;
    CK(cudaMemset(acc, 0, sizeof(double)));
    need(grad_sumsq_cuda((const float *)bg.p, n, acc, ws, NULL, err, sizeof err), "sumsq");
    CK(cudaMemcpy(&s1, acc, 8, cudaMemcpyDeviceToHost));
    CK(cudaMemset(acc, 0, sizeof(double)));
    need(grad_sumsq_cuda((const float *)bg.p, n, acc, ws, NULL, err, sizeof err), "sumsq");
    CK(cudaMemcpy(&s2, acc, 8, cudaMemcpyDeviceToHost));
    det(!memcmp(&s1, &s2, 8), "grad sumsq deterministic");
    CK(cudaFree(acc));
    CK(cudaFree(ws));
    for (Buf *b : {&bp, &bg, &bm, &bv, &bc}) dfree(*b);
    optim_free(&o);
    reg_free(&reg);
}

int main(int argc, char **argv) {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("gpu_test_train on %s (%d SMs)\n", prop.name, prop.multiProcessorCount);
    DlGemm *g = dl_gemm_new(0, err, sizeof err);
    if (!g) {
        fprintf(stderr, "dl_gemm_new: %s\n", err);
        return 1;
    }
    for (DType dt : {DT_F32, DT_BF16}) {
        test_gemm(g, dt);
        test_rmsnorm(dt, 1000);
        test_rmsnorm(dt, 1001);
        test_rmsnorm(dt, 576, 3001);   // SmolLM2's width, ~12 rows per range
        test_rmsnorm(dt, 4096, 600);   // Llama-3-8B's: the block kernel with dw
        test_rope(dt);
        test_swiglu(dt, 704);
        test_swiglu(dt, 700);
        test_embedding(dt);
        test_loss(dt, 1000, 2.0f, 1.0f, 0.5f, 0.25f, false);
        test_loss(dt, 50257, 1.0f, 1.0f, 0.1f, 0.0f, true);
        test_loss(dt, 777, 1.5f, 0.0f, 0.0f, 1.0f, false);
        test_loss(dt, 2048, 1.5f, 1.0f, 0.5f, 0.25f, true);  // bf16: the 16-byte path, in place
        if (dt == DT_BF16) {
            // both bf16 kernels by name (DISTILL_LOSS_ROWS), on the cluster kernel's shapes: 1 block (V 1000,
            // 2048), clusters of 4 x 1 word per thread (16384), 8 x 2 words with a partial last word row (49144),
            // 8 x 4 (Llama-3's 128256: the engine's CE + 0.1 KL in place, and the reverse-KL path)
            for (const char *kern : {"cluster", "block"}) {
                test_loss(dt, 1000, 2.0f, 1.0f, 0.5f, 0.25f, false, kern);
                test_loss(dt, 2048, 1.5f, 1.0f, 0.5f, 0.25f, true, kern);
                test_loss(dt, 16384, 1.0f, 1.0f, 0.0f, 0.0f, true, kern);
                test_loss(dt, 49144, 1.0f, 1.0f, 0.1f, 0.0f, false, kern);
                test_loss(dt, 128256, 1.0f, 1.0f, 0.1f, 0.0f, true, kern);
                test_loss(dt, 128256, 2.0f, 0.5f, 1.0f, 0.5f, false, kern);
            }
            unsetenv("DISTILL_LOSS_ROWS");
        }
        test_attention(dt, 64, true, true);
        test_attention(dt, 128, true, true);
        test_attention(dt, 128, false, true);
        if (dt == DT_BF16) {  // the CUDA-core forward in bf16 as well
            test_attention(dt, 64, true, false);
            test_attention(dt, 128, true, false);
        }
    }
    test_optim(DT_F32);
    test_optim(DT_BF16);
    test_gemm_tune();
    dl_gemm_free(g);
    CK(cudaDeviceSynchronize());
    printf("gpu_test_train: %d passed, %d failed\n", npass, nfail);
    return nfail ? 1 : 0;
}
