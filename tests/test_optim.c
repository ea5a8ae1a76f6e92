// test_optim.c: AdamW against a float64 reference written here (with clipping, weight decay, groups,
// accumulation, a shard range and a frozen tensor), the LR schedules, skipping of non-finite and outlier
// steps, and independence of the thread count.
#include <math.h>
#include <omp.h>
#include <string.h>

#include "distill/optim.h"
#include "distill/rng.h"
#include "tests/check.h"

static void build(Registry *r) {
    reg_init(r);
    int64_t a[2] = {33, 17}, b[1] = {29}, c[2] = {8, 5}, d[1] = {70000};  // d spans two reduction chunks
    reg_add(r, "w.matrix", ROLE_MLP, 0, 2, a);
    reg_add(r, "w.norm", ROLE_NORM, 0, 1, b);
    reg_add(r, "w.frozen", ROLE_ATTN, 0, 2, c);
    reg_add(r, "w.big", ROLE_MAMBA, 1, 1, d);
    r->t[2].trainable = false;
    r->t[3].shard_begin = 5000;  // only this range belongs to "this rank"
    r->t[3].shard_end = 69001;
}

static void fill(Rng *g, float *x, int64_t n, double scale) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)(scale * rng_normal(g));
}

// float64 AdamW reference over the same registry.
typedef struct {
    double *p, *m, *v;
    int64_t t;
} Ref;

static void ref_step(Ref *R, const Registry *reg, const float *grads, const OptimConfig *c, const double *lr_scale,
                     const double *wd, int64_t step, double *norm_out) {
    double ss = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable) continue;
        for (int64_t j = t->shard_begin; j < t->shard_end; j++) {
            double g = grads[t->offset + j] / (double)c->grad_accum;
            ss += g * g;
        }
    }
    double norm = sqrt(ss), clip = (c->clip_norm > 0 && norm > c->clip_norm) ? c->clip_norm / norm : 1.0;
    *norm_out = norm;
    R->t++;
    double lr = optim_lr_at(c, step);
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        if (!t->trainable) continue;
        for (int64_t j = t->shard_begin; j < t->shard_end; j++) {
            int64_t k = t->offset + j;
            double g = grads[k] / (double)c->grad_accum * clip;
            R->m[k] = c->beta1 * R->m[k] + (1 - c->beta1) * g;
            R->v[k] = c->beta2 * R->v[k] + (1 - c->beta2) * g * g;
            double mh = R->m[k] / (1 - pow(c->beta1, (double)R->t)), vh = R->v[k] / (1 - pow(c->beta2, (double)R->t));
            double a = lr * lr_scale[i];
            R->p[k] -= a * wd[i] * R->p[k];
            R->p[k] -= a * mh / (sqrt(vh) + c->eps);
        }
    }
}

static void test_schedule(void) {
    OptimConfig c;
    optim_config_default(&c);
    c.lr = 1.0;
    c.min_lr_ratio = 0.1;
    c.warmup_steps = 10;
    c.total_steps = 110;
    CHECK(fabs(optim_lr_at(&c, 0) - 0.1) < 1e-12);
    CHECK(fabs(optim_lr_at(&c, 4) - 0.5) < 1e-12);
    CHECK(fabs(optim_lr_at(&c, 9) - 1.0) < 1e-12);
    CHECK(fabs(optim_lr_at(&c, 10) - 1.0) < 1e-12);  // first decay step: peak
    CHECK(fabs(optim_lr_at(&c, 109) - 0.1) < 1e-12); // last step: min
    // cosine midpoint (step 10 + 99/2 is not an integer; use the formula at p = 0.5 via span 101)
    c.total_steps = 111;
    CHECK(fabs(optim_lr_at(&c, 60) - (0.1 + 0.9 * 0.5)) < 1e-12);
    CHECK(fabs(optim_lr_at(&c, 35) - (0.1 + 0.9 * 0.5 * (1 + cos(M_PI * 0.25)))) < 1e-12);
    c.decay = LR_DECAY_LINEAR;
    CHECK(fabs(optim_lr_at(&c, 35) - (1.0 - 0.9 * 0.25)) < 1e-12);
    CHECK(fabs(optim_lr_at(&c, 110) - 0.1) < 1e-12);
    CHECK(fabs(optim_lr_at(&c, 500) - 0.1) < 1e-12);  // past the end: stays at min
    c.decay = LR_DECAY_CONSTANT;
    CHECK(fabs(optim_lr_at(&c, 50) - 1.0) < 1e-12);
    c.warmup_steps = 0;
    c.warmup_ratio = 0.05;
    c.total_steps = 200;
    CHECK_EQ_I64(optim_warmup_steps(&c), 10);
    CHECK(fabs(optim_lr_at(&c, 0) - 0.1) < 1e-12);
    c.warmup_ratio = 0;
    CHECK(fabs(optim_lr_at(&c, 0) - 1.0) < 1e-12);  // no warmup: constant peak
    LrDecay d;
    DlError e;
    CHECK(lr_decay_parse("linear", &d, &e) == 0 && d == LR_DECAY_LINEAR);
    CHECK(lr_decay_parse("cosin", &d, &e) == -1 && strstr(e.msg, "cosin"));
    c.beta2 = 1.0;
    CHECK(optim_config_validate(&c, &e) == -1 && strstr(e.msg, "betas"));
}

static double rel_delta_err(const float *p, const double *ref, const float *p0, const Registry *reg) {
    double num = 0, den = 0;
    for (int i = 0; i < reg->n; i++) {
        const TensorInfo *t = &reg->t[i];
        for (int64_t j = 0; j < t->numel; j++) {
            int64_t k = t->offset + j;
            double dd = ((double)p[k] - p0[k]) - (ref[k] - p0[k]);
            num += dd * dd;
            den += (ref[k] - p0[k]) * (ref[k] - p0[k]);
        }
    }
    return sqrt(num / (den > 0 ? den : 1));
}

static void test_adamw_vs_reference(void) {
    Registry reg;
    build(&reg);
    OptimConfig c;
    optim_config_default(&c);
    c.lr = 3e-2;
    c.warmup_steps = 2;
    c.total_steps = 8;
    c.beta1 = 0.9;
    c.beta2 = 0.98;
    c.weight_decay = 0.1;
    c.clip_norm = 40.0;  // clips the big-gradient steps only
    c.grad_accum = 3;
    c.outlier_factor = 0;  // the gradient scale changes on purpose here
    Optim o;
    DlError e;
    CHECK(optim_init(&o, &c, &reg, &e) == 0);
    CHECK(optim_set_group(&o, "w.norm", 0.5, 0.01, &e) == 1);  // lr x0.5 and some decay on a norm
    CHECK(optim_set_group(&o, "no.such.*", 1, -1, &e) == -1 && strstr(e.msg, "no.such"));
    int64_t n = reg.numel;
    float *p = dl_calloc((size_t)n, 4), *p0 = dl_malloc((size_t)n * 4), *g = dl_calloc((size_t)n, 4),
          *g0 = dl_malloc((size_t)n * 4);
    Rng rng;
    rng_init(&rng, 7, 0);
    fill(&rng, p, n, 1.0);
    memcpy(p0, p, (size_t)n * 4);
    Ref R = {dl_malloc((size_t)n * 8), dl_calloc((size_t)n, 8), dl_calloc((size_t)n, 8), 0};
    for (int64_t k = 0; k < n; k++) R.p[k] = p[k];
    int clipped = 0;
    for (int s = 0; s < 8; s++) {
        fill(&rng, g, n, (s % 3 == 1) ? 1.0 : 0.02);  // some steps above the clip threshold
        memcpy(g0, g, (size_t)n * 4);
        double ref_norm;
        ref_step(&R, &reg, g, &c, o.lr_scale, o.wd, s, &ref_norm);
        OptimResult r;
        optim_step(&o, p, g, 1.0, &r);
        CHECK(r.outcome == OPTIM_APPLIED);
        CHECK(fabs(r.grad_norm - ref_norm) <= 1e-12 * ref_norm);
        CHECK(fabs(r.lr - optim_lr_at(&c, s)) < 1e-15);
        if (r.clip_scale < 1) {
            clipped++;
            CHECK(fabs(r.clip_scale - c.clip_norm / ref_norm) < 1e-12);
        }
        CHECK(memcmp(g, g0, (size_t)n * 4) == 0);  // grads are read only
    }
    CHECK(clipped >= 2 && clipped <= 4);
    CHECK_REL(rel_delta_err(p, R.p, p0, &reg), 2e-5, "AdamW update vs float64 reference");
    // frozen tensor and the part of w.big outside the shard: bitwise unchanged, moments zero
    const TensorInfo *fz = &reg.t[2], *big = &reg.t[3];
    CHECK(memcmp(p + fz->offset, p0 + fz->offset, (size_t)fz->numel * 4) == 0);
    CHECK(memcmp(p + big->offset, p0 + big->offset, 5000 * 4) == 0);
    CHECK(memcmp(p + big->offset + 69001, p0 + big->offset + 69001, (size_t)(70000 - 69001) * 4) == 0);
    CHECK(p[big->offset + 5000] != p0[big->offset + 5000]);
    // shard ranges in the registry: m and v hold the owned elements only (optim.h), nothing for w.frozen
    CHECK(o.mv_compact && o.mv_numel == 33 * 17 + 29 + (69001 - 5000) && o.mv_off[3] == 33 * 17 + 29);
    CHECK_EQ_I64(o.st.step, 8);
    CHECK_EQ_I64(o.st.t, 8);
    CHECK(optim_check_finite(&o, &e) == 0);
    o.v[o.mv_off[1] + 3] = INFINITY;
    CHECK(optim_check_finite(&o, &e) == -1 && strstr(e.msg, "w.norm") && strstr(e.msg, "element 3"));
    optim_free(&o);
    free(R.p), free(R.m), free(R.v);
    free(p), free(p0), free(g), free(g0);
    reg_free(&reg);
}

// Summing 4 micro-batch gradients with grad_accum = 4 gives the update of their mean with grad_accum = 1.
static void test_accumulation(void) {
    Registry reg;
    build(&reg);
    OptimConfig c;
    optim_config_default(&c);
    c.lr = 1e-2;
    c.total_steps = 3;
    c.clip_norm = 0.5;
    Optim a, b;
    DlError e;
    c.grad_accum = 4;
    optim_init(&a, &c, &reg, &e);
    c.grad_accum = 1;
    optim_init(&b, &c, &reg, &e);
    int64_t n = reg.numel;
    float *pa = dl_malloc((size_t)n * 4), *pb = dl_malloc((size_t)n * 4), *sum = dl_calloc((size_t)n, 4),
          *mean = dl_calloc((size_t)n, 4), *mb = dl_malloc((size_t)n * 4);
    Rng rng;
    rng_init(&rng, 11, 0);
    fill(&rng, pa, n, 1.0);
    memcpy(pb, pa, (size_t)n * 4);
    for (int s = 0; s < 3; s++) {
        optim_zero_grads(&a, sum);
        memset(mean, 0, (size_t)n * 4);
        for (int k = 0; k < 4; k++) {
            fill(&rng, mb, n, 0.1);
            for (int64_t j = 0; j < n; j++) sum[j] += mb[j], mean[j] += 0.25f * mb[j];
        }
        OptimResult ra, rb;
        optim_step(&a, pa, sum, 2.0, &ra);
        optim_step(&b, pb, mean, 2.0, &rb);
        CHECK(fabs(ra.grad_norm - rb.grad_norm) < 1e-5 * rb.grad_norm);
    }
    double num = 0, den = 0;
    for (int64_t j = 0; j < n; j++) num += ((double)pa[j] - pb[j]) * ((double)pa[j] - pb[j]), den += (double)pb[j] * pb[j];
    CHECK_REL(sqrt(num / den), 1e-6, "accumulated (sum, accum=4) vs mean gradient (accum=1)");
    optim_free(&a), optim_free(&b);
    free(pa), free(pb), free(sum), free(mean), free(mb);
    reg_free(&reg);
}

static void test_skips(void) {
    Registry reg;
    build(&reg);
    OptimConfig c;
    optim_config_default(&c);
    c.lr = 1e-2;
    c.total_steps = 100;
    c.clip_norm = 0;
    c.outlier_factor = 5;
    c.outlier_window = 4;
    c.outlier_warmup = 3;
    Optim o;
    DlError e;
    optim_init(&o, &c, &reg, &e);
    int64_t n = reg.numel;
    float *p = dl_malloc((size_t)n * 4), *g = dl_malloc((size_t)n * 4), *snap = dl_malloc((size_t)n * 4);
    float *msnap = dl_malloc((size_t)n * 4);
    Rng rng;
    rng_init(&rng, 3, 0);
    fill(&rng, p, n, 1.0);
    OptimResult r;
    // a NaN loss is skipped before anything is touched
    fill(&rng, g, n, 0.1);
    memcpy(snap, p, (size_t)n * 4);
    optim_step(&o, p, g, NAN, &r);
    CHECK(r.outcome == OPTIM_SKIP_NONFINITE_LOSS);
    CHECK(memcmp(p, snap, (size_t)n * 4) == 0);
    CHECK(o.st.step == 1 && o.st.t == 0 && o.st.n_skip_nonfinite == 1);
    // an Inf gradient element: skipped
    g[reg.t[3].offset + 60000] = INFINITY;
    optim_step(&o, p, g, 1.0, &r);
    CHECK(r.outcome == OPTIM_SKIP_NONFINITE_GRAD && !isfinite(r.grad_norm));
    CHECK(memcmp(p, snap, (size_t)n * 4) == 0);
    // ... but a NaN in a frozen tensor's gradient is not ours to look at
    fill(&rng, g, n, 0.1);
    g[reg.t[2].offset] = NAN;
    optim_step(&o, p, g, 1.0, &r);
    CHECK(r.outcome == OPTIM_APPLIED);
    // fill the window with normal steps, then a 100x gradient is an outlier
    for (int s = 0; s < 4; s++) {
        fill(&rng, g, n, 0.1);
        optim_step(&o, p, g, 1.0, &r);
        CHECK(r.outcome == OPTIM_APPLIED);
    }
    CHECK(o.st.window_n == 4);
    fill(&rng, g, n, 10.0);
    memcpy(snap, p, (size_t)n * 4);
    memcpy(msnap, o.m, (size_t)o.mv_numel * 4);
    double med = 0;
    optim_step(&o, p, g, 1.0, &r);
    med = r.median_norm;
    CHECK(r.outcome == OPTIM_SKIP_OUTLIER);
    CHECK(r.grad_norm > 5 * med && med > 0);
    CHECK(memcmp(p, snap, (size_t)n * 4) == 0 && memcmp(o.m, msnap, (size_t)o.mv_numel * 4) == 0);
    CHECK(o.st.n_skip_outlier == 1);
    // a 3x gradient is not an outlier (factor 5)
    fill(&rng, g, n, 0.3);
    optim_step(&o, p, g, 1.0, &r);
    CHECK(r.outcome == OPTIM_APPLIED);
    CHECK_EQ_I64(o.st.step, 9);
    CHECK_EQ_I64(o.st.t, 6);
    // before the warmup count is reached the test is not armed
    Optim o2;
    optim_init(&o2, &c, &reg, &e);
    fill(&rng, g, n, 0.1);
    optim_step(&o2, p, g, 1.0, &r);
    fill(&rng, g, n, 100.0);
    optim_step(&o2, p, g, 1.0, &r);
    CHECK(r.outcome == OPTIM_APPLIED);
    optim_free(&o2);
    optim_free(&o);
    free(p), free(g), free(snap), free(msnap);
    reg_free(&reg);
}

// The same steps with 1 and 2 threads give bitwise identical parameters and norms.
static void test_thread_independence(void) {
    Registry reg;
    build(&reg);
    OptimConfig c;
    optim_config_default(&c);
    c.total_steps = 4;
    int64_t n = reg.numel;
    float *res[2];
    double norms[2][4];
    for (int th = 0; th < 2; th++) {
        omp_set_num_threads(th + 1);
        Optim o;
        DlError e;
        optim_init(&o, &c, &reg, &e);
        float *p = dl_malloc((size_t)n * 4), *g = dl_malloc((size_t)n * 4);
        Rng rng;
        rng_init(&rng, 5, 0);
        fill(&rng, p, n, 1.0);
        for (int s = 0; s < 4; s++) {
            fill(&rng, g, n, 0.5);
            OptimResult r;
            optim_step(&o, p, g, 1.0, &r);
            norms[th][s] = r.grad_norm;
        }
        res[th] = p;
        free(g);
        optim_free(&o);
    }
    CHECK(memcmp(res[0], res[1], (size_t)n * 4) == 0);
    CHECK(memcmp(norms[0], norms[1], sizeof norms[0]) == 0);
    free(res[0]), free(res[1]);
    reg_free(&reg);
}

int main(void) {
    test_schedule();
    test_adamw_vs_reference();
    test_accumulation();
    test_skips();
    test_thread_independence();
    return check_report("test_optim");
}
