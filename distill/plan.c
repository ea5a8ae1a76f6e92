// plan.c: the dry-run plan and the memory estimate (see plan.h).
//
// Memory model, per GPU (device cuda) or host (device cpu). P = student parameters, P_t = trainable ones,
// P_T = teacher parameters, P_f = the Mamba-1 tensors the CUDA kernels read in fp32 and that are not trainable
// (conv1d weight and bias, A_log, D, dt_proj.bias), G = hardware.gpus, Z = hardware.zero; "/G if Z>=k" is
// ZeRO sharding. On cuda these are kernels/engine/engine_cuda.cu's buffers (which also pad each tensor to a
// multiple of DL_TENSOR_ALIGN elements, and keep padded dt_proj copies: 2 (Rp d + di Rp) + 4 Rp max(d, di)
// bytes per Mamba-1 layer, Rp = dt_rank rounded up to 8; both under 0.2% and not counted here):
//
//   cuda: weights = 2 P (bf16 compute copy)          /G if Z>=3 (training stages; inference stages keep whole copies)
//         master  = 4 P_t (fp32 master weights)      + 4 P_f (whole on every rank: ZeRO-1/2 broadcast the
//                                                    updated fp32 master pieces, the checkpoint writes it)
//         grads   = 4 P_t (fp32, accumulated)        whole at ZeRO-2 too (the engine's backward writes every
//                                                    trained tensor into one buffer; docs/MULTIGPU.md), unless
//                                                    DISTILL_DP_STAGE_GRADS=1 stages it: zero_stage_plan's bytes
//         optim   = 8 P_t (AdamW m and v, fp32)      /G if Z>=1
//         frozen  = 2 P_T (bf16 teacher, no master)  /G if Z>=3   (DPO: 2 P + 4 P_f, the frozen reference);
//                   hardware.teacher = "sharded": 2 (sum_l S_l + 2 max_l G S_l + P_glob), S_l = layer l's span / G
//                   rounded up to 16 elements, P_glob = embedding, final norm, head (distill/teacher_shard.h)
//   cpu:  weights = 4 P (fp32 weights are the master), grads = 4 P_t, optim = 8 P_t, frozen = 4 P_T.
//
// Data parallel on CUDA (train_model.c tm_dp_*) shards the AdamW moments at ZeRO-1 and 2; ZeRO-3 is refused.
// Activations on cuda: the engine's activation table (build_table in engine_cuda.cu), entry by entry, for the
// student (training) and for the online teacher or DPO reference (inference); see cuda_table below for the
// formula. The logits are streamed in chunks of c = min(B T, max(1, 2^27 / V)) rows (the engine's default, ECU_CHUNK_LOGITS):
// "logits" = 2 c V bytes for the student's chunk, the same for the teacher's chunk it computes for KL, and for
// the teacher engine's own chunk.
//
// Activations on cpu, saved for backward, per token and layer, in elements of the compute dtype (a = 4
// bytes); d = d_model, q = n_head*head_dim, kv = n_kv_head*head_dim, f = d_ff, di = d_inner,
// dxb = d_xb, R = dt_rank, N = d_state, H = n_head:
//   every layer:  input x, RMSNorm out, residual h, post-norm out            4 d
//                 MLP: gate, up, silu(gate)*up                              3 f
//   attention:    q, k, v, attention output                                 2 q + 2 kv  (+ H fp32 log-sum-exp)
//                 cpu engine only: the softmax probabilities, H*T per token (flash attention on cuda keeps none)
//   mamba1:       z, x, B, C, dt_low, dt, conv out, y, gated y              6 di + 2 dxb + R
//                 + scan states every SCAN_CHUNK tokens (fp32)              di*N/SCAN_CHUNK
//   mamba2:       in_proj out (z|x|B|C|dt), conv out, y, normed y           2 di + 2(2 dxb + di) + H, + di*N/SCAN_CHUNK
// Only layers from the first one holding a trainable tensor onward are saved (nothing before it needs a
// gradient). recompute = "mlp" drops the 3 f; "full" keeps only the layer input x (d) per layer plus one
// layer's full set. Tokens = micro_batch * seq_len (x2 for DPO: chosen and rejected).
// Logits (cpu): 4 bytes x tokens x vocab for the student logits (their gradient is computed in place), plus
// the same again for the teacher's logits when a KL term runs online. Stages without backward (generate,
// teacher_cache, eval) keep one layer's working set and the logits (both devices); generate adds the KV
// cache: 2 x n_layer x kv x (prompt + new tokens) x batch x a.
// What is not counted: cuBLASLt (32 MiB per engine), cuDNN, NCCL and selective-scan workspaces (tens of MiB),
// allocator fragmentation, the data loader, and on cpu the teacher's quantized file (mmapped, not resident
// after dequantization).
#include "distill/plan.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/model.h"
#include "distill/registry.h"
#include "distill/stage.h"
#include "distill/teacher_shard.h"
#include "distill/zero.h"
#include "kernels/engine/engine_cuda.h"        // ECU_CHUNK_LOGITS (a define: no CUDA code is called)
#include "kernels/engine/mamba2_cuda.h"        // the Mamba-2 unit's buffer tables (host functions, no CUDA calls)
#include "kernels/scan/selective_scan_cuda.h"  // SCAN_CKPT

#define SCAN_CHUNK 64  // tokens between saved scan states in the selective-scan backward (assumption)

const char *plan_bytes_str(double b, char *buf, size_t n) {
    if (b >= 1024.0 * 1024 * 1024) snprintf(buf, n, "%.2f GiB", b / (1024.0 * 1024 * 1024));
    else if (b >= 1024.0 * 1024) snprintf(buf, n, "%.1f MiB", b / (1024.0 * 1024));
    else snprintf(buf, n, "%.0f KiB", b / 1024.0);
    return buf;
}

static const char *count_str(int64_t x, char *buf, size_t n) {
    if (x >= 1000000000) snprintf(buf, n, "%.2fB", x / 1e9);
    else if (x >= 1000000) snprintf(buf, n, "%.1fM", x / 1e6);
    else if (x >= 1000) snprintf(buf, n, "%.1fK", x / 1e3);
    else snprintf(buf, n, "%lld", (long long)x);
    return buf;
}

// Elements saved per token by layer l (see the formula above); full = no recomputation.
static double layer_act_elems(const HybridConfig *h, int l, int recompute, int T, bool cpu) {
    const LlamaConfig *c = &h->base;
    double d = c->d_model, q = (double)c->n_head * c->head_dim, kv = (double)c->n_kv_head * c->head_dim, f = c->d_ff;
    double di = h->d_inner, dxb = h->d_xb, R = h->dt_rank, N = h->d_state, H = c->n_head;
    double e = 4 * d + (recompute == RECOMPUTE_MLP ? 0 : 3 * f);
    switch (h->mixer[l]) {
    case MIXER_ATTN:
        e += 2 * q + 2 * kv + H;  // H: log-sum-exp (fp32, counted as one element each)
        if (cpu) e += H * (double)T;
        break;
    case MIXER_MAMBA1: e += 6 * di + 2 * dxb + R + di * N / SCAN_CHUNK; break;
    case MIXER_MAMBA2: e += 2 * di + 2 * (2 * dxb + di) + H + di * N / SCAN_CHUNK; break;
    }
    return e;
}

// ZeRO-2 staged gradients (recipe hardware.stage_grads, or DISTILL_DP_STAGE_GRADS=1/0 in the environment, which
// the run reads too; train_model.h tm_dp_stage_grads): the most gradient memory any of the G ranks holds, from
// zero_stage_plan over the engine's compact layout (trained tensors in registry order at multiples of
// DL_TENSOR_ALIGN) with 2 MiB pages; -1 when off or there is one GPU.
static double staged_grad_bytes(const HybridConfig *h, const Registry *reg, int G, bool on) {
    if (!dl_env_switch("DISTILL_DP_STAGE_GRADS", on) || G < 2) return -1;
    ZeroLayout L;
    DlError e;
    if (zero_layout_build(&L, reg, G, 2, ZERO_BUCKET_BYTES, &e)) return -1;
    int64_t *off = dl_malloc((size_t)(reg->n ? reg->n : 1) * sizeof(int64_t)), n = 0;
    for (int i = 0; i < reg->n; i++) {
        off[i] = reg->t[i].trainable ? n : -1;
        if (reg->t[i].trainable) n += (reg->t[i].numel + DL_TENSOR_ALIGN - 1) / DL_TENSOR_ALIGN * DL_TENSOR_ALIGN;
    }
    double most = -1;
    for (int q = 0; q < G; q++) {
        ZeroStagePlan P;
        if (zero_stage_plan(&L, reg, off, n, h->base.n_layer, q, ZERO_STAGE_PAGE_ELEMS, &P, &e)) break;
        most = DL_MAX(most, zero_stage_bytes(&P));
        zero_stage_plan_free(&P);
    }
    free(off);
    zero_layout_free(&L);
    return most;
}

// ---- cuda: the engine's allocation (kernels/engine/engine_cuda.cu); engine_cuda_plan computes the same numbers
// from the engine's own code, and gpu_bench_engine --plan-only prints both side by side.

enum { CT_TRAIN = 1, CT_KEEP = 2, CT_RMLP = 4, CT_TEACHER_KL = 8 };  // = ECU_TRAIN, ECU_KEEP_HIDDEN, ...

static double al256(double b) { return (double)(((int64_t)b + 255) / 256 * 256); }  // one table entry

// The Mamba tensors the conv, scan and SSD kernels read in fp32: the engine keeps an fp32 master of them always.
static bool f32_read(const HybridConfig *h, const TensorInfo *t) {
    if (t->layer < 0 || h->mixer[t->layer] == MIXER_ATTN) return false;
    static const char *const S[] = {".mamba.conv1d.weight", ".mamba.conv1d.bias", ".mamba.A_log", ".mamba.D", ".mamba.dt_proj.bias",
                                    ".mamba.dt_bias"};
    const size_t n = strlen(t->name);
    for (size_t k = 0; k < DL_ARRAY_LEN(S); k++)
        if (n >= strlen(S[k]) && !strcmp(t->name + n - strlen(S[k]), S[k])) return true;
    return false;
}

// Bytes of one engine's activation table (build_table), its logits chunks reported apart in *logits. bf16
// (e = 2 bytes per element), N = B T rows, per entry rounded up to 256 bytes:
//   hidden states       (L+1) N d e when training or keeping them, else 2 N d e
//   per layer (every layer when training, else one set shared by all): xn1, mid, xn2 3 N d e, rstd1/2 2 N 4,
//     gate|up and silu(gate)*up 3 N f e (unless MLP recompute: then one shared set),
//     attention: q, att 2 N q e, k, v 2 N kv e, lse N H 4;
//     Mamba-1: z, C, y 3 N di e, x, B 2 N dxb e, dt_low N Rp e, training: scan states B ceil(T/SCAN_CKPT) di N 4
//   shared: mixer out, final norm out 2 N d e, final rstd N 4; Mamba: dt, repeated x, conv out 3 N di e, A di N 4;
//     tokens, positions, doc starts, targets, logp, row weights 6 N 4, resets and counted rows 2 N;
//     loss rows/sums 32 c + 64; logits chunk c V e (+ the teacher's with a KL term)
//   backward: d final hidden, d residual, d normed 3 N d e, d gate|up, d act 3 N f e, RMSNorm dw
//     partials min(N, 256) d 4, embedding plan 3 N 4 + 4; attention: dq, d att out 2 N q e, dk, dv 2 N kv e,
//     workspace N H 4; Mamba-1: dy, d conv out, d dt, dC, dz, d repeated x 6 N di e, dB, dx 2 N dxb e,
//     d dt_low N Rp e, dA di N 4, dD, d delta_bias, d conv bias 3 di 4, d conv w di W 4, conv workspace
//     B ceil(T/16) di 5 4
// Mamba-2 layers: the unit's own buffer tables (mamba2_cuda_acts_bufs per layer, mamba2_cuda_scratch_bufs once).
// The Mamba-2 unit's buffers (kernels/engine/mamba2_cuda.h: its own tables, 256-byte entries): per layer
// (scratch = 0) or the shared scratch (1).
static double m2_bytes(const HybridConfig *h, int64_t B, int64_t T, int scratch, bool train) {
#if DISTILL_CUDA
    Mamba2CudaShape s;
    Mamba2CudaActs a;
    Mamba2CudaScratch w;
    Mamba2CudaBuf b[MAMBA2_CUDA_MAX_BUFS];
    if (mamba2_cuda_shape(h, B, T, &s, NULL, 0)) return 0;  // the engine refuses this shape
    const int n = scratch ? mamba2_cuda_scratch_bufs(&s, train, &w, b) : mamba2_cuda_acts_bufs(&s, &a, b);
    return (double)mamba2_cuda_bufs_bytes(b, n);
#else  // no CUDA build: the cpu formula's per-layer elements in bf16
    (void)scratch, (void)train;
    return scratch ? 0 : 2.0 * (double)(B * T) * (2.0 * h->d_inner + 2.0 * (2 * h->d_xb + h->d_inner) + h->base.n_head);
#endif
}

static double cuda_table(const HybridConfig *h, double B, double T, int flags, double *logits) {
    const LlamaConfig *c = &h->base;
    const double e = 2, N = B * T, d = c->d_model, f = c->d_ff, V = c->vocab, H = c->n_head;
    const double q = (double)c->n_head * c->head_dim, kv = (double)c->n_kv_head * c->head_dim;
    const double di = h->d_inner, dxb = h->d_xb, ds = h->d_state, Rp = (double)((h->dt_rank + 7) / 8 * 8);
    const bool train = flags & CT_TRAIN, keep = train || (flags & CT_KEEP), rmlp = train && (flags & CT_RMLP);
    bool attn = false, mamba = false;
    bool m2 = false;
    for (int l = 0; l < c->n_layer; l++) attn |= h->mixer[l] == MIXER_ATTN, mamba |= h->mixer[l] == MIXER_MAMBA1;
    for (int l = 0; l < c->n_layer; l++) m2 |= h->mixer[l] == MIXER_MAMBA2;
    const double chunk = DL_MIN(N, (double)DL_MAX((int64_t)1, (int64_t)ECU_CHUNK_LOGITS / c->vocab));
    double t = al256((keep ? c->n_layer + 1 : 2) * N * d * e);
    for (int l = 0; l < (train ? c->n_layer : 1); l++) {
        const bool la = train ? h->mixer[l] == MIXER_ATTN : attn, lm = train ? h->mixer[l] == MIXER_MAMBA1 : mamba;
        t += 3 * al256(N * d * e) + 2 * al256(N * 4);
        if (!rmlp) t += al256(N * 2 * f * e) + al256(N * f * e);
        if (la) t += 2 * al256(N * q * e) + 2 * al256(N * kv * e) + al256(N * H * 4);
        if (lm) {
            t += 3 * al256(N * di * e) + 2 * al256(N * dxb * e) + al256(N * Rp * e);
            if (train) t += al256(B * ceil(T / SCAN_CKPT) * di * ds * 4);
        }
        if (train ? h->mixer[l] == MIXER_MAMBA2 : m2) t += m2_bytes(h, (int64_t)B, (int64_t)T, 0, train);  // per layer / one set
    }
    if (m2) t += m2_bytes(h, (int64_t)B, (int64_t)T, 1, train);
    if (rmlp) t += al256(N * 2 * f * e) + al256(N * f * e);
    t += 2 * al256(N * d * e) + al256(N * 4);
    if (mamba) t += 3 * al256(N * di * e) + al256(di * ds * 4);
    t += 3 * al256(N * 4) + al256(N);
    const double lg = al256(chunk * V * e) * ((flags & CT_TEACHER_KL) ? 2 : 1);
    t += lg + al256(chunk * 32) + al256(64) + 3 * al256(N * 4) + al256(N);
    if (train) {
        t += 3 * al256(N * d * e) + al256(N * 2 * f * e) + al256(N * f * e) + al256(DL_MIN(N, 256) * d * 4);
        t += 2 * al256(N * 4) + al256((N + 1) * 4);
        if (attn) t += 2 * al256(N * q * e) + 2 * al256(N * kv * e) + al256(B * T * H * 4);
        if (mamba) {
            t += 6 * al256(N * di * e) + 2 * al256(N * dxb * e) + al256(N * Rp * e) + al256(di * ds * 4) + 3 * al256(di * 4);
            t += al256(di * h->d_conv * 4) + al256(B * ceil(T / 16) * di * 5 * 4);
        }
    }
    *logits = lg;
    return t - lg;
}

static bool needs_teacher_online(const StageSpec *st) {
    switch (st->kind) {
    case STAGE_GENERATE:
    case STAGE_TEACHER_CACHE:
    case STAGE_EVAL:
    case STAGE_INIT: return true;
    case STAGE_LAYERWISE:
    case STAGE_DISTILL:
    case STAGE_SFT:
    case STAGE_DRAFT:
        return st->teacher_logits == TEACHER_ONLINE && (st->loss.kl > 0 || st->loss.reverse_kl > 0 || st->loss.mse > 0);
    default: return false;
    }
}

static int seq_len_of(const Recipe *r, const StageSpec *st) {
    if (st->data_index >= 0) return r->data[st->data_index].seq_len;
    int T = 0;
    for (int k = 0; k < st->n_eval_sets; k++)
        if (st->eval_index && st->eval_index[k] >= 0) T = DL_MAX(T, r->data[st->eval_index[k]].seq_len);
    return T ? T : 2048;
}

int plan_stage(const Recipe *r, const StageSpec *st, int step, StagePlan *p, DlError *e) {
    memset(p, 0, sizeof *p);
    HybridConfig h, teacher;
    if (recipe_stage_layout(r, st, step, &h, e)) return -1;
    hybrid_config_teacher(&teacher, &r->teacher_cfg.base);
    if (st->kind == STAGE_DRAFT) {  // the draft is the teacher cut to its chosen layers (stage_draft.c)
        LlamaConfig dc = r->teacher_cfg.base;
        dc.n_layer = st->n_draft_layers;
        hybrid_config_teacher(&h, &dc);
    }
    Registry reg, treg;
    model_build_registry(&h, &reg);
    model_build_registry(&teacher, &treg);
    const bool train = stage_kind_trains(st->kind);
    if (train) {
        if (reg_set_trainable(&reg, st->trainable, e) < 0) {
            reg_free(&reg);
            reg_free(&treg);
            return -1;
        }
    } else {
        for (int i = 0; i < reg.n; i++) reg.t[i].trainable = false;
    }
    const bool cuda = r->run.device == DEVICE_CUDA;
    const double G = r->hardware.gpus, Z = r->hardware.zero, a = cuda ? 2 : 4;
    const double P = (double)reg_params_numel(&reg), Pt = (double)reg_trainable_numel(&reg), PT = (double)reg_params_numel(&treg);
    p->params_total = (int64_t)P;
    p->params_trainable = (int64_t)Pt;
    const LlamaConfig *c = &h.base;
    const int T = seq_len_of(r, st);
    const OptimSpec *o = &st->opt;
    MemEstimate *m = &p->mem;
    const bool teacher_only = st->kind == STAGE_GENERATE || st->kind == STAGE_TEACHER_CACHE;
    // teacher-forced per-layer alignment, MSE alone (train_loop.c's align): no student forward through the loss, so
    // no teacher KL buffers, and whole gradients even where ZeRO-2 would stage them
    const StageLoss *SL = &st->loss;
    const bool align = SL->mse != 0 && SL->ce == 0 && SL->kl == 0 && SL->reverse_kl == 0;

    // ---- parameters and optimizer state
    if (cuda && train) {  // the engine's layout (kernels/engine/engine_cuda.cu engine_layout)
        double Pf = 0, Pf_all = 0;
        for (int i = 0; i < reg.n; i++)
            if (f32_read(&h, &reg.t[i])) {
                Pf_all += (double)reg.t[i].numel;
                if (!reg.t[i].trainable) Pf += (double)reg.t[i].numel;
            }
        m->weights = 2 * P / (Z >= 3 ? G : 1);
        m->master = 4 * Pt + 4 * Pf;  // every rank keeps the whole fp32 master (tm_dp_step broadcasts the pieces)
        m->grads = 4 * Pt;            // the engine's one gradient buffer, whole at every ZeRO stage
        const bool forced = align && st->kind != STAGE_DPO;
        const double staged = Z == 2 ? staged_grad_bytes(&h, &reg, (int)G, r->hardware.stage_grads && !forced) : -1;
        if (staged >= 0) m->grads = staged;  // unless ZeRO-2 stages it (opt-in)
        m->optim = (o->moments == MOMENTS_BF16 ? 4 : 8) * Pt / (Z >= 1 ? G : 1);
        // a teacher used inside training is sharded like the student under ZeRO-3
        if (needs_teacher_online(st)) m->frozen_model = 2 * PT / (Z >= 3 ? G : 1);
        // hardware.teacher = "sharded": this rank's pieces of every layer, two gather buffers and the whole global
        // tensors (teacher_shard.h; the draft stage trains on rank 0 alone, so its teacher is "sharded" over 1)
        if (needs_teacher_online(st) && r->hardware.teacher_sharded) {
            TShardPlan tp;
            if (tshard_plan(&tp, &treg, teacher.base.n_layer, st->kind == STAGE_DRAFT ? 1 : (int)G, e)) {
                reg_free(&reg);
                reg_free(&treg);
                return -1;
            }
            TShardBytes tb;
            tshard_bytes(&tp, 2, &tb);
            m->frozen_model = tb.total;
            tshard_plan_free(&tp);
        }
        // DPO's reference: a frozen student-shaped engine (its master holds the fp32-read tensors only)
        if (st->kind == STAGE_DPO) m->frozen_model = 2 * P / (Z >= 3 ? G : 1) + 4 * Pf_all;
    } else {  // cpu, and the cuda inference stages (generate, teacher_cache, eval, init: whole copies per GPU)
        if (!teacher_only) m->weights = cuda ? 2 * P : 4 * P;
        if (train) {
            m->grads = 4 * Pt / (Z >= 2 ? G : 1);
            m->optim = 8 * Pt / (Z >= 1 ? G : 1);
        }
        if (needs_teacher_online(st)) m->frozen_model = (cuda ? 2 : 4) * PT;
        if (st->kind == STAGE_DPO) m->frozen_model = 4 * P;
    }

    // ---- activations and logits
    double V = c->vocab;
    if (train && cuda) {
        // the engines train_loop.c makes: the student (training), the online teacher or DPO's reference (inference)
        const double B = o->micro_batch * (st->kind == STAGE_DPO ? 2.0 : 1.0), N = B * T;
        p->tokens_per_step = (int64_t)(B * o->grad_accum * G * T);
        const bool has_teacher = st->kind != STAGE_DPO && needs_teacher_online(st);
        const bool kl = has_teacher && !align && SL->kl + SL->reverse_kl != 0;
        double lg = 0, lt = 0;
        m->activations = cuda_table(&h, B, T, CT_TRAIN | (r->hardware.recompute != RECOMPUTE_NONE ? CT_RMLP : 0) |
                                                   (kl ? CT_TEACHER_KL : 0), &lg);
        if (SL->mse != 0 && st->kind != STAGE_DPO) {  // hidden-state gradients after each Mamba layer, MSE sums
            int nm = 0;
            for (int l = 0; l < c->n_layer; l++) nm += h.mixer[l] != MIXER_ATTN;
            m->activations += nm * N * c->d_model * 2 + 9 * N + 8;
        }
        if (has_teacher) m->activations += cuda_table(&teacher, B, T, SL->mse != 0 ? CT_KEEP : 0, &lt);
        if (st->kind == STAGE_DPO) m->activations += cuda_table(&h, B, T, 0, &lt);
        m->logits = lg + lt;
    } else if (train) {
        double B = o->micro_batch * (st->kind == STAGE_DPO ? 2.0 : 1.0);
        p->tokens_per_step = (int64_t)(B * o->grad_accum * G * T);
        int first = c->n_layer;  // first layer that needs saved activations
        for (int i = 0; i < reg.n; i++)
            if (reg.t[i].trainable) {
                int l = reg.t[i].layer < 0 ? (reg.t[i].role == ROLE_EMBED ? 0 : c->n_layer) : reg.t[i].layer;
                first = DL_MIN(first, l);
            }
        double per_tok = 0, max_layer = 0;
        for (int l = first; l < c->n_layer; l++) {
            double full = layer_act_elems(&h, l, RECOMPUTE_NONE, T, !cuda);
            max_layer = DL_MAX(max_layer, full);
            if (r->hardware.recompute == RECOMPUTE_FULL) per_tok += c->d_model;
            else per_tok += layer_act_elems(&h, l, r->hardware.recompute, T, !cuda);
        }
        if (r->hardware.recompute == RECOMPUTE_FULL) per_tok += max_layer;
        m->activations = per_tok * a * B * T;
        m->logits = 4.0 * B * T * V * (st->teacher_logits == TEACHER_ONLINE && st->kind != STAGE_DPO &&
                                               (st->loss.kl > 0 || st->loss.reverse_kl > 0) ? 2 : 1);
        if (st->kind == STAGE_DPO) m->logits = 4.0 * B * T * V;  // the reference's logits are reduced to log-probs at once
    } else if (st->kind == STAGE_GENERATE) {
        double B = st->batch_size, L = T + st->max_new_tokens;
        // the running slots' caches (prompt + answer) and the refill decoder's (prompts only; stage_generate.c)
        m->kv_cache = 2.0 * c->n_layer * c->n_kv_head * c->head_dim * (L + T) * B * a;
        m->activations = layer_act_elems(&teacher, 0, RECOMPUTE_NONE, (int)L, !cuda) * a * B;  // one token per sequence
        m->logits = 4.0 * B * V;
    } else if (st->kind == STAGE_TEACHER_CACHE || st->kind == STAGE_EVAL) {
        double B = st->batch_size;
        m->activations = layer_act_elems(st->kind == STAGE_EVAL ? &h : &teacher, c->n_layer - 1, RECOMPUTE_NONE, T, !cuda) * a * B * T;
        m->logits = 4.0 * B * T * V * (st->kind == STAGE_EVAL ? 2 : 1);
    }
    m->total = m->weights + m->master + m->grads + m->optim + m->frozen_model + m->activations + m->logits + m->kv_cache;
    reg_free(&reg);
    reg_free(&treg);
    return 0;
}

// "AMAMAM..." (A = attention, M = Mamba), and the attention layer list.
static void print_layout(FILE *f, const HybridConfig *h, const char *indent) {
    int L = h->base.n_layer, na = hybrid_n_attn(h);
    MixerKind mk = MIXER_ATTN;
    for (int l = 0; l < L; l++)
        if (h->mixer[l] != MIXER_ATTN) mk = h->mixer[l];
    fprintf(f, "%slayers:    ", indent);
    for (int l = 0; l < L; l++) fputc(h->mixer[l] == MIXER_ATTN ? 'A' : 'M', f);
    if (na == L) {
        fprintf(f, "  (the teacher: attention in all %d layers)\n", L);
        return;
    }
    fprintf(f, "  (A attention, M %s)\n", mixer_name(mk));
    fprintf(f, "%sattention: %d of %d [", indent, na, L);
    for (int l = 0, k = 0; l < L; l++)
        if (h->mixer[l] == MIXER_ATTN) fprintf(f, "%s%d", k++ ? "," : "", l);
    fprintf(f, "]; Mamba: %d\n", L - na);
}

static void print_mem(FILE *f, const Recipe *r, const StagePlan *p, const char *indent) {
    char b[32];
    const MemEstimate *m = &p->mem;
    fprintf(f, "%smemory %s: ", indent, r->run.device == DEVICE_CUDA ? "per GPU" : "(host)");
    const struct {
        const char *name;
        double v;
    } parts[] = {{"weights", m->weights}, {"master", m->master}, {"grads", m->grads}, {"adamw", m->optim},
                 {"frozen model", m->frozen_model}, {"activations", m->activations}, {"logits", m->logits}, {"kv cache", m->kv_cache}};
    int k = 0;
    for (size_t i = 0; i < DL_ARRAY_LEN(parts); i++)
        if (parts[i].v > 0) fprintf(f, "%s%s %s", k++ ? " + " : "", parts[i].name, plan_bytes_str(parts[i].v, b, sizeof b));
    fprintf(f, " = %s\n", plan_bytes_str(m->total, b, sizeof b));
}

static const char *what_stage_does(const Recipe *r, const StageSpec *st, char *buf, size_t n) {
    const char *d = st->data ? st->data : "-";
    switch (st->kind) {
    case STAGE_GENERATE:
        snprintf(buf, n, "the teacher answers the prompts of '%s' -> %s '%s' (up to %d new tokens, temperature %g%s)", d,
                 st->as_prompts ? "its answers become prompts of" : "data", st->output ? st->output : "?", st->max_new_tokens,
                 st->sample_temperature, st->max_prompts ? ", first prompts only" : "");
        break;
    case STAGE_TEACHER_CACHE: snprintf(buf, n, "cache the teacher's top-%d logits over '%s'", st->top_k, d); break;
    case STAGE_INIT:
        snprintf(buf, n, "build the hybrid: Mamba layers %s", st->init_method == INIT_ATTENTION ? "from W_Q/W_K/W_V/W_O" : "random");
        break;
    case STAGE_LAYERWISE:
    case STAGE_DISTILL:
    case STAGE_SFT:
        snprintf(buf, n, "train on '%s': loss %g CE + %g KL + %g reverse KL + %g MSE (T=%g), teacher %s", d, st->loss.ce, st->loss.kl,
                 st->loss.reverse_kl, st->loss.mse, st->loss.temperature,
                 !needs_teacher_online(st) && st->teacher_logits == TEACHER_ONLINE ? "not needed"
                 : st->teacher_logits == TEACHER_CACHE ? "logits from the cache" : "online");
        break;
    case STAGE_DPO: snprintf(buf, n, "DPO on '%s', beta %g, reference = the student at the stage start", d, st->beta); break;
    case STAGE_DRAFT: {
        size_t o = (size_t)snprintf(buf, n, "speculative draft: teacher layers [");
        for (int k = 0; k < st->n_draft_layers && o < n; k++) o += (size_t)snprintf(buf + o, n - o, "%s%d", k ? "," : "", st->draft_layers[k]);
        if (o < n)
            snprintf(buf + o, n - o, "] + embeddings/head, trained on '%s': loss %g CE + %g KL (T=%g) to the %s", d, st->loss.ce,
                     st->loss.kl, st->loss.temperature, st->kl_from == KL_FROM_STUDENT ? "student" : "teacher");
        break;
    }
    case STAGE_EXPORT:
        snprintf(buf, n, "export %s to %s", st->export_format == EXPORT_HF ? "MambaInLlama HF (safetensors)" : "?",
                 st->export_dir ? st->export_dir : "RUN_DIR/export");
        break;
    case STAGE_EVAL: {
        size_t o = (size_t)snprintf(buf, n, "perplexity, KL to the teacher, top-1 agreement on");
        for (int k = 0; k < st->n_eval_sets && o < n; k++) o += (size_t)snprintf(buf + o, n - o, "%s '%s'", k ? "," : "", st->eval_sets[k]);
        break;
    }
    default: snprintf(buf, n, "?");
    }
    return buf;
}

static void print_opt(FILE *f, const OptimSpec *o, const char *indent) {
    static const char *const S[] = {"cosine", "linear", "constant"};
    fprintf(f, "%soptimizer: AdamW lr %g betas (%g, %g) eps %g wd %g, warmup ", indent, o->lr, o->beta1, o->beta2, o->eps, o->weight_decay);
    if (o->warmup_steps >= 0) fprintf(f, "%lld steps", (long long)o->warmup_steps);
    else fprintf(f, "%g of the steps", o->warmup_ratio);
    fprintf(f, ", %s to %g x lr, clip %g\n", S[o->schedule], o->min_lr_ratio, o->clip);
}

static void print_length(FILE *f, int64_t steps, double epochs) {
    if (steps > 0) fprintf(f, "%lld steps", (long long)steps);
    else fprintf(f, "%g epoch%s", epochs, epochs == 1 ? "" : "s");
}

void plan_print(const Recipe *r, FILE *f) {
    char b1[32], b2[32], b3[512];
    const LlamaConfig *c = &r->teacher_cfg.base;
    char *run_dir = dl_path_join(r->run.output_dir, r->run.name);
    fprintf(f, "recipe:   %s\nrun dir:  %s\n", r->path, run_dir);
    free(run_dir);
    fprintf(f, "teacher:  %s%s\n", r->teacher.path, r->teacher_found ? "" : "  (not found)");
    if (!r->teacher_found) fprintf(f, "          not found, plan uses the config in %s\n", r->model_source);
    fprintf(f, "model:    %d layers, d_model %d, %d heads / %d kv heads (head_dim %d), d_ff %d, vocab %d%s\n", c->n_layer, c->d_model,
            c->n_head, c->n_kv_head, c->head_dim, c->d_ff, c->vocab, c->tied_embeddings ? ", tied embeddings" : "");
    HybridConfig th;
    hybrid_config_teacher(&th, c);
    Registry treg;
    model_build_registry(&th, &treg);
    fprintf(f, "          teacher parameters %s\n", count_str(reg_params_numel(&treg), b1, sizeof b1));
    reg_free(&treg);
    fprintf(f, "hybrid:   %s, %d of %d layers keep attention", r->hybrid.mixer == 1 ? "mamba2" : "mamba1", r->hybrid.n_attn, c->n_layer);
    if (r->hybrid.attn_fraction >= 0) fprintf(f, " (attn_fraction %g)", r->hybrid.attn_fraction);
    fputc('\n', f);
    fprintf(f, "device:   %s", r->run.device == DEVICE_CUDA ? "cuda" : "cpu");
    if (r->run.device == DEVICE_CUDA)
        fprintf(f, ", %d GPU%s, ZeRO-%d, recompute %s\n", r->hardware.gpus, r->hardware.gpus > 1 ? "s" : "", r->hardware.zero,
                (const char *[]){"none", "mlp", "full"}[r->hardware.recompute]);
    else if (r->run.threads) fprintf(f, ", %d thread%s\n", r->run.threads, r->run.threads > 1 ? "s" : "");
    else fprintf(f, ", all cores\n");
    fprintf(f, "seed:     %lld\n", (long long)r->run.seed);
    for (int i = 0; i < r->n_data; i++) {
        const DataSpec *d = &r->data[i];
        fprintf(f, "data %-12s %s, seq_len %d%s", d->name, (const char *[]){"text", "jsonl", "chat", "preference"}[d->format], d->seq_len,
                d->packing ? ", packed" : "");
        if (d->produced_by >= 0) fprintf(f, ", written by stage '%s'", r->stages[d->produced_by].name);
        for (int k = 0; k < d->n_sources; k++) fprintf(f, "%s%s", k ? ", " : ", from ", d->sources[k]);
        if (d->holdout > 0) fprintf(f, ", holdout %g", d->holdout);
        fputc('\n', f);
    }

    double peak = 0;
    for (int i = 0; i < r->n_stages; i++) {
        const StageSpec *st = &r->stages[i];
        const StageDef *def = dl_find_stage(st->kind);
        fprintf(f, "\nstage %d/%d  %s '%s'%s\n", i + 1, r->n_stages, stage_kind_name(st->kind), st->name,
                def ? "" : "  [not implemented in this build: the run would stop before stage 1]");
        fprintf(f, "  %s\n", what_stage_does(r, st, b3, sizeof b3));
        int nsteps = st->kind == STAGE_LAYERWISE ? st->n_schedule : 1;
        for (int k = 0; k < nsteps; k++) {
            const char *ind = "  ";
            if (st->kind == STAGE_LAYERWISE) {
                fprintf(f, "  schedule step %d/%d: ", k + 1, nsteps);
                print_length(f, st->schedule[k].steps, st->schedule[k].epochs);
                fputc('\n', f);
                ind = "    ";
            }
            HybridConfig h;
            DlError e;
            StagePlan p;
            if (recipe_stage_layout(r, st, k, &h, &e) || plan_stage(r, st, k, &p, &e)) {
                fprintf(f, "%splan error: %s\n", ind, e.msg);
                continue;
            }
            if (st->kind != STAGE_EXPORT) print_layout(f, &h, ind);
            if (stage_kind_trains(st->kind)) {
                fprintf(f, "%sparams:    %s total, %s trainable (%.1f%%) [%s]\n", ind, count_str(p.params_total, b1, sizeof b1),
                        count_str(p.params_trainable, b2, sizeof b2), 100.0 * (double)p.params_trainable / (double)DL_MAX(1, p.params_total),
                        st->trainable);
                fprintf(f, "%stokens:    %lld per step = %d micro-batch x %d accum x %d GPU x %d seq_len%s\n", ind,
                        (long long)p.tokens_per_step, st->opt.micro_batch, st->opt.grad_accum, r->hardware.gpus, seq_len_of(r, st),
                        st->kind == STAGE_DPO ? " x 2 (chosen, rejected)" : "");
            } else if (st->kind != STAGE_EXPORT) {
                fprintf(f, "%sparams:    %s (no training)\n", ind, count_str(p.params_total, b1, sizeof b1));
            }
            if (st->kind != STAGE_EXPORT) print_mem(f, r, &p, ind);
            if (def && def->estimate_bytes)
                fprintf(f, "%s           the stage's own estimate: %s\n", ind, plan_bytes_str(def->estimate_bytes(r, st, k), b1, sizeof b1));
            peak = DL_MAX(peak, p.mem.total);
        }
        if (stage_kind_trains(st->kind)) {
            if (st->kind != STAGE_LAYERWISE) {
                fprintf(f, "  length:    ");
                print_length(f, st->steps, st->epochs);
                fputc('\n', f);
            }
            print_opt(f, &st->opt, "  ");
        }
    }
    fprintf(f, "\npeak memory estimate %s: %s\n", r->run.device == DEVICE_CUDA ? "per GPU" : "(host)", plan_bytes_str(peak, b1, sizeof b1));
    for (int i = 0; i < r->n_warnings; i++) fprintf(f, "warning: %s\n", r->warnings[i]);
    int missing = 0;
    for (int i = 0; i < r->n_stages; i++) missing += dl_find_stage(r->stages[i].kind) == NULL;
    if (missing) fprintf(f, "note: %d stage%s not implemented in this build\n", missing, missing > 1 ? "s are" : " is");
}
