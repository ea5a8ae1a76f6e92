// engine_cuda_internal.cuh: EngineCuda's state, shared by the files that implement engine_cuda.h
// (engine_cuda.cu: layout, forward, loss, backward; engine_cuda_optim.cu: the AdamW step on the device).
// Not an API: nothing outside kernels/engine includes it.
#pragma once
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/engine/engine_cuda.h"
#include "kernels/engine/mamba2_cuda.h"
#include "kernels/train/attention_cudnn.h"
#include "kernels/train/train_check.cuh"
#include "kernels/train/train_cuda.h"

// A kernels/train or kernels/scan entry point returned -1: its shape limits were checked in engine_cuda_new,
// so this is an engine bug; name the call and stop.
static char g_err[512];  // per file: the message of the last refused kernel call
#define TC(call)                                                                                            \
    do {                                                                                                    \
        g_err[0] = 0;                                                                                       \
        if ((call) != 0) {                                                                                  \
            fprintf(stderr, "%s:%d: engine_cuda: %s refused: %s\n  hint: a shape outside the kernel's limits " \
                            "reached it; engine_cuda_new should have rejected the model\n",                  \
                    __FILE__, __LINE__, #call, g_err);                                                      \
            exit(1);                                                                                        \
        }                                                                                                   \
    } while (0)
#define EA g_err, sizeof g_err

// ---------------------------------------------------------------- weights by registry name

// A tensor's places: off in the registry layout (the compute copy, the host buffers), moff in the compact fp32
// master, goff in the compact gradients (and AdamW moments); -1 where it has none (engine_layout).
typedef struct {
    int64_t off;   // element offset in the registry layout (-1: absent)
    int idx;       // registry index (-1: absent)
    int64_t moff;  // element offset in E->master (-1: no fp32 master)
    int64_t goff;  // element offset in the gradient buffer (-1: not trained by this engine)
} WRef;

typedef struct {
    WRef in_norm, post_norm, gate, up, down;
    WRef q, k, v, o;                                              // attention
    WRef z, x, Bp, Cp, dtd, dtw, dtb, cw, cb, alog, D, out;       // Mamba-1 (Mamba-2: cw, cb, dtb = dt_bias, alog, D, out)
    WRef m2in, m2norm;                                            // Mamba-2: in_proj [z|x|B|C|dt], norm.weight
    int64_t pad_dtd, pad_dtw;  // element offsets of the padded dt weights in the padded-weights buffer
    bool fused_gu;             // gate and up adjacent in the buffer (one [2ff, d] GEMM)
    // Mamba z|x|B|C projections: fused_in, their weights adjacent ([2di + 2dxb, d], one GEMM through the layer's
    // gate|up buffer, then split); fused_in_grad, all four trained with adjacent gradients (one weight-gradient GEMM)
    bool fused_in, fused_in_grad;
} LayerW;

// ---------------------------------------------------------------- activation table

typedef struct {
    char name[40];
    int layer;     // -1: shared
    size_t bytes;
    size_t off;
    void **slot;
} ActEntry;

typedef struct {
    ActEntry *e;
    int n, cap;
    size_t total;
} ActTable;


// ---------------------------------------------------------------- engine

// DISTILL_ENGINE_PROFILE=1: GPU time per region of the step (engine_cuda.cu prof), printed by engine_cuda_free
typedef struct {
    const char *name;  // a string literal
    double ms;
    long n;
} ProfRow;
#define ECU_PROF_ROWS 48

typedef struct {
    void *xn1, *q, *k, *v, *att, *mid, *xn2, *gu, *act;  // dt
    float *rstd1, *rstd2, *lse;
    void *z, *xs, *Bs, *Cs, *dtl, *y;                     // Mamba-1 (dt); dtl is [N, Rp]
    float *ckpt;                                          // scan states every SCAN_CKPT steps
    Mamba2CudaActs m2;                                    // Mamba-2 (mamba2_cuda.h)
} LayerActs;

struct EngineCuda {
    HybridConfig h;
    const Registry *r;
    int64_t B, T, N, chunk;
    int flags;
    DType dt;
    size_t es;  // bytes per activation element
    int Rp;     // dt_rank padded to 8 (cuBLASLt needs leading dimensions of 8 elements)
    LayerW *w;
    WRef emb, fnorm, head;
    int lowest;
    bool has_mamba;       // a Mamba-1 layer
    bool has_mamba2;      // a Mamba-2 layer (mamba2_cuda.h)
    Mamba2CudaShape m2shape;
    Mamba2CudaScratch m2s;  // shared by the Mamba-2 layers (activation table)
    cudaStream_t st;
    DlGemm *gemm;
    // compact parameter-side layout (engine_layout), per registry tensor: -1 where absent
    int64_t *moff;     // [r->n] offsets in master
    int64_t *goff;     // [r->n] offsets in the gradients / AdamW moments
    bool *f32read;     // [r->n] read in fp32 by the kernels (Mamba conv1d weight/bias, A_log, D, dt_proj.bias)
    int64_t master_n;  // elements of master (0: none)
    int64_t grad_n;    // elements of a gradient buffer (engine_cuda_grads_numel)
    float *master;     // fp32 [master_n] or NULL; in fp32 mode the registry layout (= wc)
    void *wc;          // compute copy [numel] in dt, registry layout (== master in fp32 mode); NULL with ECU_EXTERN_WEIGHTS
    const void **wext; // ECU_EXTERN_WEIGHTS: [r->n] where each tensor is read (engine_cuda_set_weight), else NULL
    EngineCudaLayerHook layer_hook;  // engine_cuda_set_layer_hook: called before each layer of a forward
    void *layer_hook_ctx;
    void *wpad;        // padded dt_proj_down / dt_proj copies (dt)
    int64_t wpad_n;
    float *gpad;       // fp32 gradients of the padded dt weights (one layer at a time)
    int64_t gpad_n;
    float *inv_freq;   // [hd/2]
    // attention kernels (engine_cuda.cu attn_select): cuDNN's fused SDPA (DISTILL_ATTN=cudnn, bf16, deterministic
    // backward) or NULL: the hand-written kernels. A shape cuDNN refuses falls back per call (same out and lse).
    SdpaCudnn *sdpa;
    bool sdpa_warned;  // a refusal was reported (one line per engine)
    bool prof;           // DISTILL_ENGINE_PROFILE=1
    cudaEvent_t pev[2];  // the last region boundary, the next
    ProfRow prow[ECU_PROF_ROWS];
    int nprow;
    long nfwd;  // forward calls so far (the profile skips the first step)
    // recorded on st when hidden state i is written (i = 0..n_layer; n_layer + 1: the final norm's output), so that
    // another engine's stream can wait for exactly what it reads (engine_cuda.cu wait_hidden)
    cudaEvent_t *ev_state;
    double weight_bytes;
    // activation table, one allocation
    ActTable tab;
    char *arena;
    LayerActs *acts;   // [n_layer] when training, else [1]
    void *states;      // [n_states, N, d]
    int n_states;
    void *mix, *xf;
    float *rstdf;
    void *mdt, *xr, *xc;  // Mamba scratch [N, di]
    float *A;             // [di, ds]
    void *scan_ws;
    int32_t *tok, *pos, *docs;
    uint8_t *reset_d;
    // backward
    void *gu_sh, *act_sh;  // MLP recompute
    void *dres, *dxn, *dxf, *dgu, *dact, *dq, *datt, *dk, *dv;
    void *dy, *dxc, *ddt, *dC, *dz, *dxr, *dB, *dxs, *ddtl;
    float *dA, *dD, *ddb, *dcw, *dcb;
    void *rms_ws, *attn_ws, *scanb_ws, *conv_ws;
    int32_t *eorder, *eseg, *euniq;
    // loss
    void *lbuf, *tbuf;
    double *rows, *acc;
    float *logp, *rw;
    int32_t *targ;
    uint8_t *cnt;
    // host state
    int32_t *tok_h;
    uint8_t *reset_h;
    bool have_reset;
    bool multi_doc;  // some row packs several documents (cuDNN then needs the document bias)
    int l0, l1, last_state;
    bool have_dxf;
    void **dhid;  // lazily allocated [n_layer+1] gradients of hidden states
    EngineCudaGradHook grad_hook;  // engine_cuda_set_grad_hook: the backward's progress (data-parallel overlap)
    void *grad_hook_ctx;
    bool *has_dhid;
    // hidden-state MSE (lazily allocated)
    uint8_t *mse_mask;
    double *mse_rows, *mse_acc;
};

static inline char *P(const EngineCuda *e, WRef w) {
    if (e->wext) return w.idx >= 0 ? (char *)e->wext[w.idx] : NULL;  // ECU_EXTERN_WEIGHTS: the caller's pointers
    return (char *)e->wc + (size_t)w.off * e->es;
}
static inline float *PM(const EngineCuda *e, WRef w) { return e->master + w.moff; }  // engine_layout guarantees moff >= 0
static inline float *G(float *grads, WRef w) { return grads && w.goff >= 0 ? grads + w.goff : NULL; }
static inline char *at(const void *p, int64_t elems, size_t es) { return (char *)p + (size_t)elems * es; }

// engine_cuda.cu's allocation helpers, also used by the optimizer
void *ecu_try_alloc(size_t bytes);  // NULL when the device is out of memory (no exit)
void ecu_oom_report(EngineCuda *E, const char *what, size_t want, FILE *f);
const char *ecu_gib(double b, char *buf, size_t n);
void ecu_refresh_pad(EngineCuda *E);  // the padded dt weights from the compute copy, after an update
