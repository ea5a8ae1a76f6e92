// test_eval.c: eval metrics: the teacher against itself (KL 0, agreement 1, ratios 1); the hybrid's NLL and
// KL against the loss kernels' CE and KL (losses.h, an independent implementation) on the same logits;
// a short distillation with the train loop moves every metric toward the teacher; JSON and table output.
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "distill/engine.h"
#include "distill/eval.h"
#include "distill/train_model.h"
#include "tests/check.h"
#include "tests/tiny_model.h"

int main(void) {
    dl_set_quiet(true);
    TinyModel t, s;
    tiny_teacher(&t, 3, true, 8);
    int attn[1] = {1};
    tiny_hybrid(&s, &t, attn, 1, 9);
    EvalModel em_t = {&t.h, &t.r, t.p, TM_CPU}, em_s = {&s.h, &s.r, s.p, TM_CPU};
    const int64_t B = 2, T = 16, NB = 3;
    DlError e;
    SynthSource ss;
    BatchSource src = synth_source(&ss, 77, t.h.base.vocab);
    EvalResult self;
    CHECK(eval_run(&em_t, &em_t, &src, B, T, NB, "teacher", &self, &e) == 0);
    CHECK(fabs(self.kl) < 1e-9 && self.top1_agreement == 1.0 && fabs(self.ppl_ratio - 1) < 1e-12 &&
          (self.teacher_acc == 0 || fabs(self.acc_ratio - 1) < 1e-12) && self.n_rows == B * NB);
    CHECK(self.teacher_entropy > 0.5 && self.ppl > 1);

    // the hybrid vs the loss kernels on the same batches
    src = synth_source(&ss, 77, t.h.base.vocab);
    EvalResult init;
    CHECK(eval_run(&em_s, &em_t, &src, B, T, NB, "init", &init, &e) == 0);
    src = synth_source(&ss, 77, t.h.base.vocab);
    Engine *se = engine_new(&s.h, &s.r, s.p, B, T, 0, &e), *te = engine_new(&t.h, &t.r, t.p, B, T, 0, &e);
    TrainBatch b = {B, T, malloc(B * T * 4), malloc(B * T * 4), malloc(B * T), malloc(B * T)};
    const int64_t V = t.h.base.vocab;
    float *ls = malloc(B * T * V * 4), *lt = malloc(B * T * V * 4);
    LossSums sums = {0};
    LossWeights w = {.ce = 1, .kl = 1, .temperature = 1};
    for (int k = 0; k < NB; k++) {
        src.next(src.ctx, &b, &e);
        engine_forward(se, b.tokens, b.reset);
        engine_forward(te, b.tokens, b.reset);
        engine_logits(se, 0, B * T, ls);
        engine_logits(te, 0, B * T, lt);
        uint8_t cnt[64];
        for (int i = 0; i < B * T; i++) cnt[i] = b.mask[i] && b.targets[i] >= 0;
        loss_rows(&w, B * T, V, ls, lt, b.targets, cnt, NULL, 1.0, NULL, &sums, NULL);
    }
    CHECK_EQ_I64(init.n_tokens, (int64_t)sums.n_rows);
    CHECK_REL(fabs(init.nll - sums.ce / sums.n_rows) / (sums.ce / sums.n_rows), 1e-6, "eval NLL vs loss_rows CE");
    CHECK_REL(fabs(init.kl - sums.kl / sums.n_rows) / (sums.kl / sums.n_rows), 1e-6, "eval KL vs loss_rows KL");
    CHECK(fabs(init.teacher_ppl - self.ppl) < 1e-9 * self.ppl);  // same teacher, same data
    printf("init: ppl %.4f (teacher %.4f) kl %.4f agreement %.3f\n", init.ppl, init.teacher_ppl, init.kl, init.top1_agreement);
    engine_free(se), engine_free(te);
    free(ls), free(lt), free(b.tokens), free(b.targets), free(b.mask), free(b.reset);

    // distill a little (KL only, all Mamba tensors) and evaluate on held-out batches of another seed
    char dir[] = "/tmp/distill_test_eval_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    CHECK(reg_set_trainable(&s.r, "*.mamba.*", &e) > 0);
    TrainConfig c;
    memset(&c, 0, sizeof c);
    c.hc = &s.h, c.reg = &s.r, c.params = s.p;
    c.teacher_hc = &t.h, c.teacher_reg = &t.r, c.teacher_params = t.p;
    c.w = (LossWeights){.kl = 1, .temperature = 1};
    c.micro_batch = 4, c.seq_len = 16;
    optim_config_default(&c.opt);
    c.opt.lr = 1e-2, c.opt.total_steps = 40, c.opt.warmup_steps = 4, c.opt.beta2 = 0.98;
    c.run_dir = dir, c.stage_name = "distill", c.keep_checkpoints = 1;
    src = synth_source(&ss, 5, t.h.base.vocab);
    TrainResult res;
    int rc = train_run(&c, &src, &res, &e);
    if (rc) fprintf(stderr, "%s\n", e.msg);
    CHECK(rc == 0);
    EvalResult r[2];
    r[0] = init;
    src = synth_source(&ss, 77, t.h.base.vocab);
    CHECK(eval_run(&em_s, &em_t, &src, B, T, NB, "trained", &r[1], &e) == 0);
    printf("trained: ppl %.4f kl %.4f agreement %.3f\n", r[1].ppl, r[1].kl, r[1].top1_agreement);
    CHECK(r[1].kl < 0.7 * init.kl);
    CHECK(fabs(r[1].ppl_ratio - 1) < fabs(init.ppl_ratio - 1));
    CHECK(r[1].top1_agreement >= init.top1_agreement);

    char *jp = dl_path_join(dir, "eval.json");
    CHECK(eval_write_json(jp, r, 2, &e) == 0);
    size_t len;
    char *txt = dl_read_file(jp, &len, &e);
    CHECK(txt && strstr(txt, "\"label\": \"trained\"") && strstr(txt, "\"kl_ratio\""));
    free(txt);
    FILE *tf = tmpfile();
    eval_print_table(tf, r, 2);
    rewind(tf);
    char buf[4096] = "";
    buf[fread(buf, 1, sizeof buf - 1, tf)] = 0;
    fclose(tf);
    CHECK(strstr(buf, "perplexity") && strstr(buf, "top-1 agreement") && strstr(buf, "trained"));
    printf("%s", buf);
    // errors: no counted positions
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    free(jp);
    tiny_free(&s), tiny_free(&t);
    return check_report("test_eval");
}
