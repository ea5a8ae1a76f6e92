"""The CPU engine against HF transformers (CPU, float32):
  * SmolLM2-135M-Instruct logits from the GGUF (dequantized by distill) equal LlamaForCausalLM loaded from the
    same GGUF within 1e-4 relative error (Frobenius norm) on several prompts;
  * the same for a small random Llama-3.1-style model with "llama3" rope scaling and an untied head, written
    here as config.json + model.safetensors and loaded by both;
  * `distill score` mean NLL / perplexity on a text file equals HF's (same windows) within 1e-4 relative;
  * greedy generation of 64 tokens (KV-cache decoding) equals HF `generate` token for token.
Logits come from `distill score --ids --dump-logits`, which runs each window through the engine on its own.
"""
import json
import math
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DISTILL_BIN", os.path.join(ROOT, "build", "distill"))
TEACHER = os.path.join(ROOT, "checkpoints", "teachers", "SmolLM2-135M-Instruct.Q4_1.gguf")
TOL = 1e-4

teacher_only = pytest.mark.skipif(not os.path.exists(TEACHER), reason="teacher missing (scripts/fetch-teacher)")

TEXT = (
    "The Mamba in the Llama replaces most attention layers of a pretrained Transformer with linear RNN layers.\n"
    "Each Mamba layer is initialized from the attention weights it replaces: C from the queries, B from the keys,\n"
    "x from the values and the output projection from W_O. Distillation then trains the hybrid to match the\n"
    "teacher's next-token distribution, first layer by layer and then end to end, before supervised fine-tuning\n"
    "and preference optimization. The result decodes faster because a Mamba layer keeps a fixed-size state\n"
    "instead of a key-value cache that grows with every token. 1234 + 5678 = 6912; café, naïve, 東京.\n"
)


def run(args, **kw):
    r = subprocess.run([BIN] + args, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"distill {' '.join(args)} failed:\n{r.stderr}"
    return r


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def distill_logits(model, ids, tmp_path, ctx=None):
    """Logits of one window of ids through `distill score`: [len(ids), V] float32."""
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(map(str, ids)))
    out = tmp_path / "logits.npy"
    run(["score", "--model", str(model), "--ids", "--ctx", str(ctx or len(ids)), "--dump-logits", str(out), str(f)])
    return np.load(out)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(2)
    d, f = os.path.dirname(TEACHER), os.path.basename(TEACHER)
    model = transformers.LlamaForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@teacher_only
def test_smollm2_logits(smol, tmp_path):
    model, tok = smol
    prompts = [
        "The capital of France is",
        "<|im_start|>user\nWrite a haiku about distillation.<|im_end|>\n<|im_start|>assistant\n",
        TEXT,
    ]
    for p in prompts:
        ids = tok(p, add_special_tokens=False).input_ids
        ours = distill_logits(TEACHER, ids, tmp_path)
        ref = hf_logits(model, ids)
        assert ours.shape == ref.shape
        err = rel_err(ours, ref)
        print(f"SmolLM2 {len(ids)} tokens: logits relative error {err:.2e}")
        assert err < TOL, f"{len(ids)}-token prompt: relative error {err:.3e}"
        # not vacuous: the logits are far from a constant
        assert np.std(ref) > 1.0


@teacher_only
def test_score_perplexity(smol, tmp_path):
    model, tok = smol
    ctx = 48
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = run(["score", "--model", TEACHER, "--ctx", str(ctx), str(f)])
    last = r.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split())
    assert set(fields) == {"tokens", "nll", "ppl"}, last
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert len(ids) > 2 * ctx  # several windows, the last one partial
    nll, n = 0.0, 0
    for s in range(0, len(ids), ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:
            continue
        lp = torch.log_softmax(torch.tensor(hf_logits(model, w)), -1)
        nll -= lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
        n += len(w) - 1
    assert int(fields["tokens"]) == n
    ref = nll / n
    print(f"score: distill nll {fields['nll']} ppl {fields['ppl']}, HF nll {ref:.8f} ppl {math.exp(ref):.8f}")
    assert abs(float(fields["nll"]) - ref) / ref < TOL
    assert abs(float(fields["ppl"]) - math.exp(ref)) / math.exp(ref) < TOL


@teacher_only
def test_greedy_generation(smol):
    model, tok = smol
    msgs = [{"role": "user", "content": "Explain in detail how a bicycle works."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    r = run(["generate", "--model", TEACHER, "--prompt-ids", " ".join(map(str, ids)), "--greedy",
             "--max-tokens", "64", "--ids"])
    ours = [int(x) for x in r.stdout.split()]
    print(f"greedy: {len(ours)} tokens, HF {len(out)}")
    assert len(out) == 64  # a long answer, so the whole 64-token path is compared
    assert ours == out


def write_random_llama3(d, seed=0):
    """A small Llama-3.1-style model (GQA, llama3 rope scaling, untied head) as config.json + safetensors."""
    from safetensors.torch import save_file
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=320, hidden_size=96,
        intermediate_size=160, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32", initializer_range=0.02)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    g = torch.Generator().manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(d))  # shapes from the config
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # larger than the default init, so logits are far from uniform and layers matter
            t = torch.randn(v.shape, generator=g) * (0.5 / math.sqrt(v.shape[-1]) * 2)
        sd[k] = t.contiguous()
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return d


def test_random_llama3_rope_scaling(tmp_path):
    torch.set_num_threads(2)
    d = write_random_llama3(str(tmp_path / "llama3"))
    model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    for n in (7, 200):  # 200 > original context 64: every frequency band is exercised
        ids = rng.integers(0, 320, n).tolist()
        ours = distill_logits(d, ids, tmp_path)
        ref = hf_logits(model, ids)
        err = rel_err(ours, ref)
        print(f"random llama3 {n} tokens: logits relative error {err:.2e}")
        assert err < TOL
    # llama3 scaling matters: without it HF's logits differ by far more than the tolerance
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.pop("rope_scaling")
    d2 = str(tmp_path / "noscale")
    os.makedirs(d2)
    json.dump(cfg, open(os.path.join(d2, "config.json"), "w"))
    os.symlink(os.path.join(d, "model.safetensors"), os.path.join(d2, "model.safetensors"))
    plain = transformers.LlamaForCausalLM.from_pretrained(d2, dtype=torch.float32).eval()
    assert rel_err(hf_logits(plain, ids), ref) > 100 * TOL
    # greedy decoding with the KV cache equals HF generate
    prompt = rng.integers(0, 320, 12).tolist()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 12:].tolist()
    r = run(["generate", "--model", d, "--prompt-ids", " ".join(map(str, prompt)), "--greedy", "--max-tokens", "40",
             "--ids"])
    ours = [int(x) for x in r.stdout.split()]
    # distill stops at the config's EOS; HF was told not to: compare up to distill's stop
    assert len(ours) >= 1 and out[:len(ours)] == ours
    if len(ours) < 40:
        assert ours[-1] == 2


def _timed(cmd, env):
    """Wall seconds and CPU seconds (user + sys) of a child process."""
    import resource
    import time
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.returncode == 0, r.stderr
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


@teacher_only
@pytest.mark.skipif(os.environ.get("DISTILL_BENCH") != "1", reason="benchmark: set DISTILL_BENCH=1")
def test_bench_forward(smol, tmp_path):
    """CPU teacher forward: tokens/s of `distill score` (model load subtracted) and of HF transformers on the
    same windows, with 1 and 2 threads. Prints a table for docs/BENCHMARKS.md."""
    import time
    model, tok = smol
    base = tok(TEXT, add_special_tokens=False).input_ids
    ids = (base * (4096 // len(base) + 1))[:4096]
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(map(str, ids)))
    short = tmp_path / "short.txt"
    short.write_text(" ".join(map(str, ids[:2])))
    rows = []
    for threads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        torch.set_num_threads(threads)
        w0, c0 = _timed([BIN, "score", "--model", TEACHER, "--ids", "--ctx", "2", str(short)], env)  # load only
        for ctx in (256, 2048):
            wall, cpu = _timed([BIN, "score", "--model", TEACHER, "--ids", "--ctx", str(ctx), str(f)], env)
            t0, p0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                for s in range(0, len(ids), ctx):
                    model(torch.tensor([ids[s:s + ctx]]))
            hw, hc = time.perf_counter() - t0, time.process_time() - p0
            n = len(ids)
            rows.append((threads, ctx, n / (wall - w0), n / (cpu - c0), n / hw, n / hc))
    print("\nthreads ctx | distill tok/s (wall) tok/CPU-s | HF tok/s (wall) tok/CPU-s   load avg %.1f" % os.getloadavg()[0])
    for r in rows:
        print("%d %5d | %8.1f %8.1f | %8.1f %8.1f" % r)
