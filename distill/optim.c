// optim.c: see optim.h.
#include "distill/optim.h"

#include <math.h>
#include <string.h>

// Reductions run over chunks of this many elements; chunk sums are added in chunk order, so the result is
// the same for any thread count.
#define OPTIM_CHUNK (1 << 16)

void optim_config_default(OptimConfig *c) {
    memset(c, 0, sizeof *c);
    c->lr = 1e-4;
    c->min_lr_ratio = 0.1;
    c->decay = LR_DECAY_COSINE;
    c->total_steps = 1;
    c->beta1 = 0.9;
    c->beta2 = 0.999;
    c->eps = 1e-8;
    c->clip_norm = 1.0;
    c->grad_accum = 1;
    c->outlier_factor = 10.0;
    c->outlier_window = 64;
    c->spike_lr_factor = 0.5;  // (spike_rollbacks 0: off)
    c->outlier_warmup = 16;
}

static const char *DECAY_NAMES[] = {"cosine", "linear", "constant"};

const char *lr_decay_name(LrDecay d) { return (d >= 0 && d <= LR_DECAY_CONSTANT) ? DECAY_NAMES[d] : "?"; }

int lr_decay_parse(const char *s, LrDecay *out, DlError *e) {
    for (int i = 0; i <= LR_DECAY_CONSTANT; i++)
        if (!strcmp(s, DECAY_NAMES[i])) {
            *out = (LrDecay)i;
            return 0;
        }
    return dl_fail(e, "unknown lr schedule '%s' (expected cosine, linear or constant)", s);
}

const char *optim_outcome_name(OptimOutcome o) {
    switch (o) {
    case OPTIM_APPLIED: return "applied";
    case OPTIM_SKIP_NONFINITE_LOSS: return "skipped: non-finite loss";
    case OPTIM_SKIP_NONFINITE_GRAD: return "skipped: non-finite gradient norm";
    case OPTIM_SKIP_OUTLIER: return "skipped: gradient norm outlier";
    }
    return "?";
}

int64_t optim_warmup_steps(const OptimConfig *c) {
    if (c->warmup_steps > 0) return c->warmup_steps;
    if (c->warmup_ratio > 0) return (int64_t)ceil(c->warmup_ratio * (double)c->total_steps);
    return 0;
}

double optim_lr_at(const OptimConfig *c, int64_t step) {
    int64_t w = optim_warmup_steps(c);
    if (step < w) return c->lr * (double)(step + 1) / (double)w;
    double lo = c->lr * c->min_lr_ratio;
    int64_t span = c->total_steps - w;
    double p = span > 1 ? (double)(step - w) / (double)(span - 1) : 1.0;  // 0 at the first decay step, 1 at the last
    if (p > 1) p = 1;
    switch (c->decay) {
    case LR_DECAY_COSINE: return lo + (c->lr - lo) * 0.5 * (1.0 + cos(M_PI * p));
    case LR_DECAY_LINEAR: return c->lr - (c->lr - lo) * p;
    case LR_DECAY_CONSTANT: return c->lr;
    }
    return c->lr;
}

int optim_config_validate(const OptimConfig *c, DlError *e) {
    if (!(c->lr > 0) || !isfinite(c->lr)) return dl_fail(e, "optimizer: lr must be > 0 (got %g)", c->lr);
    if (!(c->min_lr_ratio >= 0 && c->min_lr_ratio <= 1))
        return dl_fail(e, "optimizer: min_lr_ratio must be in [0, 1] (got %g)", c->min_lr_ratio);
    if (c->decay < 0 || c->decay > LR_DECAY_CONSTANT) return dl_fail(e, "optimizer: bad lr schedule %d", (int)c->decay);
    if (c->total_steps < 1) return dl_fail(e, "optimizer: total_steps must be >= 1 (got %lld)", (long long)c->total_steps);
    if (c->warmup_steps < 0 || !(c->warmup_ratio >= 0 && c->warmup_ratio <= 1))
        return dl_fail(e, "optimizer: warmup_steps must be >= 0 and warmup_ratio in [0, 1]");
    if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
        return dl_fail(e, "optimizer: betas must be in [0, 1) (got %g, %g)", c->beta1, c->beta2);
    if (!(c->eps > 0)) return dl_fail(e, "optimizer: eps must be > 0 (got %g)", c->eps);
    if (!(c->weight_decay >= 0)) return dl_fail(e, "optimizer: weight_decay must be >= 0 (got %g)", c->weight_decay);
    if (c->grad_accum < 1) return dl_fail(e, "optimizer: grad_accum must be >= 1 (got %d)", c->grad_accum);
    if (c->outlier_factor > 0 && (c->outlier_window < 1 || c->outlier_window > OPTIM_MAX_WINDOW))
        return dl_fail(e, "optimizer: outlier_window must be in [1, %d] (got %d)", OPTIM_MAX_WINDOW, c->outlier_window);
    if (c->outlier_warmup < 0) return dl_fail(e, "optimizer: outlier_warmup must be >= 0");
    if (c->spike_rollbacks < 0 || (c->spike_rollbacks > 0 && !(c->spike_lr_factor > 0 && c->spike_lr_factor <= 1)))
        return dl_fail(e, "optimizer: spike_rollbacks must be >= 0 and spike_lr_factor in (0, 1] (got %d, %g)", c->spike_rollbacks,
                       c->spike_lr_factor);
    return 0;
}

int optim_init(Optim *o, const OptimConfig *c, const Registry *reg, DlError *e) {
    memset(o, 0, sizeof *o);
    if (optim_config_validate(c, e)) return -1;
    o->cfg = *c;
    o->reg = reg;
    // compact moments when some trainable tensor is only partly owned (ZeRO shard ranges)
    int64_t owned = 0;
    o->mv_compact = false;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable) continue;
        if (t->shard_begin != 0 || t->shard_end != t->numel) o->mv_compact = true;
        owned += DL_MAX(t->shard_end - t->shard_begin, (int64_t)0);
    }
    o->mv_off = dl_calloc((size_t)(reg->n ? reg->n : 1), sizeof(int64_t));
    int64_t pos = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!o->mv_compact) {
            o->mv_off[i] = t->offset + t->shard_begin;
        } else if (t->trainable && t->shard_end > t->shard_begin) {
            o->mv_off[i] = pos;
            pos += t->shard_end - t->shard_begin;
        } else {
            o->mv_off[i] = pos;  // owns nothing: never addressed
        }
    }
    o->mv_numel = o->mv_compact ? owned : reg->numel;
    o->m = dl_calloc((size_t)(o->mv_numel ? o->mv_numel : 1), sizeof(float));
    o->v = dl_calloc((size_t)(o->mv_numel ? o->mv_numel : 1), sizeof(float));
    o->lr_scale = dl_malloc((size_t)(reg->n ? reg->n : 1) * sizeof(double));
    o->wd = dl_malloc((size_t)(reg->n ? reg->n : 1) * sizeof(double));
    for (int i = 0; i < reg->n; i++) {
        o->lr_scale[i] = 1.0;
        o->wd[i] = reg->t[i].decay ? c->weight_decay : 0.0;
    }
    return 0;
}

void optim_free(Optim *o) {
    free(o->m);
    free(o->v);
    free(o->mv_off);
    free(o->lr_scale);
    free(o->wd);
    memset(o, 0, sizeof *o);
}

typedef struct {
    Optim *o;
    double lr_scale, wd;
} GroupSet;

static void group_set(int i, void *ctx) {
    GroupSet *g = ctx;
    g->o->lr_scale[i] = g->lr_scale;
    if (g->wd >= 0) g->o->wd[i] = g->wd;
}

int optim_set_group(Optim *o, const char *patterns, double lr_scale, double wd, DlError *e) {
    GroupSet g = {o, lr_scale, wd};
    return reg_match(o->reg, patterns, "optimizer group", group_set, &g, e);
}

// Chunk list over the owned ranges of trainable tensors: chunk k covers [off[k], off[k]+len[k]) of the buffer.
typedef struct {
    int64_t *off, *len;
    int64_t n;
} Chunks;

static void chunks_build(const Registry *reg, Chunks *c) {
    int64_t n = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable || t->shard_end <= t->shard_begin) continue;
        n += (t->shard_end - t->shard_begin + OPTIM_CHUNK - 1) / OPTIM_CHUNK;
    }
    c->off = dl_malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    c->len = dl_malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    c->n = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable) continue;
        for (int64_t b = t->shard_begin; b < t->shard_end; b += OPTIM_CHUNK) {
            c->off[c->n] = t->offset + b;
            c->len[c->n] = DL_MIN((int64_t)OPTIM_CHUNK, t->shard_end - b);
            c->n++;
        }
    }
}

double optim_grad_norm(const Registry *reg, const float *grads, double scale) {
    Chunks c;
    chunks_build(reg, &c);
    double *part = dl_malloc((size_t)(c.n ? c.n : 1) * sizeof(double));
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < c.n; k++) {
        const float *g = grads + c.off[k];
        double s = 0;
        for (int64_t j = 0; j < c.len[k]; j++) s += (double)g[j] * (double)g[j];
        part[k] = s;
    }
    double total = 0;
    for (int64_t k = 0; k < c.n; k++) total += part[k];
    free(part);
    free(c.off);
    free(c.len);
    return sqrt(total) * fabs(scale);
}

static double window_median(const OptimState *s) {
    if (s->window_n == 0) return 0;
    double tmp[OPTIM_MAX_WINDOW];
    int n = s->window_n;
    memcpy(tmp, s->window, (size_t)n * sizeof(double));
    for (int i = 1; i < n; i++) {  // insertion sort: n <= 256, once per step
        double x = tmp[i];
        int j = i - 1;
        while (j >= 0 && tmp[j] > x) {
            tmp[j + 1] = tmp[j];
            j--;
        }
        tmp[j + 1] = x;
    }
    return n % 2 ? tmp[n / 2] : 0.5 * (tmp[n / 2 - 1] + tmp[n / 2]);
}

void optim_zero_grads(const Optim *o, float *grads) {
    const Registry *r = o->reg;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        if (!t->trainable || t->shard_end <= t->shard_begin) continue;
        memset(grads + t->offset + t->shard_begin, 0, (size_t)(t->shard_end - t->shard_begin) * sizeof(float));
    }
}

void optim_step(Optim *o, float *params, const float *grads, double loss, OptimResult *r) {
    // the norm of a non-finite loss's gradient is meaningless: not computed (reported NaN)
    double norm = isfinite(loss) ? optim_grad_norm(o->reg, grads, 1.0 / o->cfg.grad_accum) : NAN;
    optim_step_norm(o, params, grads, loss, norm, r);
}

bool optim_decide(const OptimConfig *c, OptimState *s, double loss, double grad_norm, OptimResult *r, OptimStepK *k) {
    memset(r, 0, sizeof *r);
    r->lr = optim_lr_at(c, s->step);
    r->clip_scale = 1.0;
    s->step++;
    r->median_norm = window_median(s);
    if (!isfinite(loss)) {
        r->grad_norm = NAN;
        r->outcome = OPTIM_SKIP_NONFINITE_LOSS;
        s->n_skip_nonfinite++;
        return false;
    }
    r->grad_norm = grad_norm;
    if (!isfinite(r->grad_norm)) {
        r->outcome = OPTIM_SKIP_NONFINITE_GRAD;
        s->n_skip_nonfinite++;
        return false;
    }
    if (c->outlier_factor > 0 && s->n_accepted >= c->outlier_warmup && s->window_n > 0 &&
        r->grad_norm > c->outlier_factor * r->median_norm) {
        r->outcome = OPTIM_SKIP_OUTLIER;
        s->n_skip_outlier++;
        return false;
    }
    // accepted: record the norm, then update
    if (c->outlier_factor > 0) {
        s->window[s->window_pos] = r->grad_norm;
        s->window_pos = (s->window_pos + 1) % c->outlier_window;
        if (s->window_n < c->outlier_window) s->window_n++;
    }
    s->n_accepted++;
    if (c->clip_norm > 0 && r->grad_norm > c->clip_norm) r->clip_scale = c->clip_norm / r->grad_norm;
    s->t++;
    k->bc1 = 1.0 - pow(c->beta1, (double)s->t);
    k->bc2 = 1.0 - pow(c->beta2, (double)s->t);
    k->gscale = 1.0 / c->grad_accum * r->clip_scale;
    r->outcome = OPTIM_APPLIED;
    return true;
}

void optim_tensor_k(const Optim *o, int i, const OptimResult *r, const OptimStepK *k, float *decay, float *step_size) {
    *decay = (float)(1.0 - r->lr * o->lr_scale[i] * o->wd[i]);
    *step_size = (float)(r->lr * o->lr_scale[i] / k->bc1);
}

void optim_step_norm(Optim *o, float *params, const float *grads, double loss, double grad_norm, OptimResult *r) {
    const OptimConfig *c = &o->cfg;
    OptimStepK k;
    if (!optim_decide(c, &o->st, loss, grad_norm, r, &k)) return;
    const float b1 = (float)c->beta1, b2 = (float)c->beta2, eps = (float)c->eps;
    const float gscale = (float)k.gscale, inv_sqrt_bc2 = (float)(1.0 / sqrt(k.bc2));
    const Registry *reg = o->reg;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable || t->shard_end <= t->shard_begin) continue;
        float decay, step_size;
        optim_tensor_k(o, i, r, &k, &decay, &step_size);
        // the owned range [shard_begin, shard_end): element j of the tensor is index j - shard_begin here
        float *p = params + t->offset + t->shard_begin, *m = o->m + o->mv_off[i], *v = o->v + o->mv_off[i];
        const float *g = grads + t->offset + t->shard_begin;
        const int64_t n = t->shard_end - t->shard_begin;
#pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            float gj = g[j] * gscale;
            float mj = b1 * m[j] + (1.0f - b1) * gj;
            float vj = b2 * v[j] + (1.0f - b2) * gj * gj;
            m[j] = mj;
            v[j] = vj;
            float denom = sqrtf(vj) * inv_sqrt_bc2 + eps;
            p[j] = p[j] * decay - step_size * mj / denom;
        }
    }
}

int optim_check_finite(const Optim *o, DlError *e) {
    const Registry *r = o->reg;
    for (int i = 0; i < r->n; i++) {
        const TensorInfo *t = &r->t[i];
        if (!t->trainable) continue;
        for (int which = 0; which < 2; which++) {
            const float *b = (which ? o->v : o->m) + o->mv_off[i];
            for (int64_t j = 0; j < t->shard_end - t->shard_begin; j++)
                if (!isfinite(b[j]))
                    return dl_fail(e, "optimizer state %s of tensor %s is non-finite (%g) at element %lld",
                                   which ? "v" : "m", t->name, (double)b[j], (long long)(t->shard_begin + j));
        }
    }
    return 0;
}
