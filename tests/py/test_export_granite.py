"""HF transformers loads our GraniteMoeHybridForCausalLM export (distill/export_granite.c) and computes our logits.

Models: Mamba-2 hybrids made by distill's own code (tests/test_export_formats --make-hybrid: teacher -> hybrid
config with attention kept at the listed layers -> hybrid_init_from_teacher, Mamba-2 layers initialized from
attention; written as a MambaInLlama Mamba-2 export), then `distill export --format granite`:
  * a small random one (config .json teacher with initializer_range 0.2, GQA 6/2 heads of 8, rope_theta 50000,
    untied head), exported with mamba_expand 1 (exact shapes) and 2 (3 zero heads per real 3... padding to 12);
  * SmolLM2-135M-Instruct (the teacher GGUF) as a 50% hybrid, exported in f32 (real scale, tied embeddings
    written as an explicit lm_head).
Our logits come from tests/test_export_formats --logits (the reference forward with distill's mamba2_forward;
the CPU engine does not dispatch Mamba-2 yet). Tolerance: relative error norm 1e-4 (both fp32).
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER = os.path.join(ROOT, "checkpoints", "teachers", "SmolLM2-135M-Instruct.Q4_1.gguf")
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64, "vocab_size": 64,
    "max_position_embeddings": 128, "rope_theta": 50000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2,
}


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def tools():
    build = os.environ.get("DISTILL_BUILD")
    if not build:
        pytest.skip("DISTILL_BUILD not set (run through ctest)")
    tool = os.path.join(build, "tests", "test_export_formats")
    distill = os.environ.get("DISTILL_BIN") or os.path.join(build, "distill")
    assert os.path.exists(tool), f"{tool} missing: build the test_export_formats target"
    return tool, distill


def ours(tool, model, ids, tmp):
    f = tmp / "ids.txt"
    f.write_text(" ".join(map(str, ids)) + "\n")
    out = tmp / "ours.bin"
    run([tool, "--logits", model, str(f), str(out)])
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)


def hf_model(d):
    from transformers import GraniteMoeHybridForCausalLM
    m = GraniteMoeHybridForCausalLM.from_pretrained(d, dtype=torch.float32)
    m.eval()
    return m


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make(tools, tmp, teacher, attn, seed, fmt_args):
    tool, distill = tools
    hyb = str(tmp / "hybrid")
    if not os.path.exists(hyb):
        run([tool, "--make-hybrid", teacher, attn, str(seed), hyb])
    out = str(tmp / ("granite" + "".join(fmt_args).replace("-", "")))
    run([distill, "export", "--model", hyb, "--format", "granite", "--dtype", "f32", "--out", out] + fmt_args)
    return hyb, out


@pytest.mark.parametrize("expand", [1, 2])
def test_tiny_hybrid_logits(tools, tmp_path, expand):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    hyb, g = make(tools, tmp_path, str(cfg), "1", 11, ["--expand", str(expand)])
    conf = json.load(open(os.path.join(g, "config.json")))
    assert conf["mamba_expand"] == expand and conf["mamba_n_heads"] == 6 * expand
    assert conf["attention_multiplier"] == pytest.approx(8 ** -0.5)
    rng = np.random.default_rng(expand)
    ids = rng.integers(0, 64, 37).tolist()
    ref = ours(tools[0], hyb, ids, tmp_path)
    m = hf_model(g)
    assert [type(l.mamba).__name__ if l.mamba is not None else "attn" for l in m.model.layers][1] == "attn"
    with torch.no_grad():
        got = m(torch.tensor([ids])).logits[0].numpy()
    err = rel(got, ref)
    print(f"expand {expand}: HF vs ours relative error {err:.2e}")
    assert err < 1e-4

    # HF's cached path (prefill 20 tokens, then one token at a time) gives the same logits
    with torch.no_grad():
        out = m(torch.tensor([ids[:20]]), use_cache=True)
        cache, steps = out.past_key_values, [out.logits[0]]
        for t in range(20, len(ids)):
            o = m(torch.tensor([[ids[t]]]), past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            steps.append(o.logits[0])
    cached = torch.cat(steps).numpy()
    err_c = rel(cached, ref)
    print(f"expand {expand}: HF cached decode vs ours {err_c:.2e}")
    assert err_c < 1e-4


def test_mismatch_is_detected(tools, tmp_path):
    """The comparison can fail: the same export with Granite's default attention_multiplier (1.0) instead of
    1/sqrt(head_dim), or with a whole-d_inner gated norm (mamba_n_groups 1 with B/C shared) differs."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    hyb, g = make(tools, tmp_path, str(cfg), "1", 11, [])
    ids = list(range(3, 40))
    ref = ours(tools[0], hyb, ids, tmp_path)
    conf = json.load(open(os.path.join(g, "config.json")))
    conf["attention_multiplier"] = 1.0
    json.dump(conf, open(os.path.join(g, "config.json"), "w"))
    with torch.no_grad():
        got = hf_model(g)(torch.tensor([ids])).logits[0].numpy()
    assert rel(got, ref) > 1e-2


def test_smollm2_hybrid_logits(tools, tmp_path):
    if not os.path.exists(TEACHER):
        pytest.skip(f"{TEACHER} missing (scripts/fetch-teacher)")
    attn = ",".join(str(i) for i in range(0, 30, 2))
    hyb, g = make(tools, tmp_path, TEACHER, attn, 1, [])
    conf = json.load(open(os.path.join(g, "config.json")))
    assert conf["mamba_expand"] == 1 and conf["mamba_n_groups"] == 9 and conf["mamba_d_state"] == 64
    assert conf["layer_types"][:3] == ["attention", "mamba", "attention"]
    ids = [504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 7158, 314]  # "The capital of France is ..."
    ref = ours(tools[0], hyb, ids, tmp_path)
    m = hf_model(g)
    with torch.no_grad():
        got = m(torch.tensor([ids])).logits[0].numpy()
    err = rel(got, ref)
    print(f"SmolLM2 50% Mamba-2 hybrid: HF vs ours relative error {err:.2e}, top-1 agreement "
          f"{(got.argmax(1) == ref.argmax(1)).mean():.3f}")
    assert err < 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()
    shutil.rmtree(g)
