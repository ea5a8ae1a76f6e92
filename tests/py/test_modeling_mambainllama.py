"""hf/modeling_mambainllama.py (written here from the formulas) runs our Mamba-1 MambaInLlama export under HF
transformers with trust_remote_code and gives our CPU engine's logits.

A small random Llama teacher (config .json, initializer_range 0.2, GQA 4/2 heads of 16, untied head) becomes a
Mamba-1 hybrid keeping attention at layer 1 (distill's init from attention, tests/test_export_formats
--make-hybrid1), is exported with `distill export --format mambainllama --hf-code hf/`, and loaded with
AutoModelForCausalLM(trust_remote_code=True). Ours: the CPU engine (test_export_formats --logits). Tolerance 1e-4
relative (both fp32); also left padding in a batch and the error raised for a non-empty cache.
"""
import json
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 80,
    "max_position_embeddings": 128, "rope_theta": 20000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2,
}


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    build = os.environ.get("DISTILL_BUILD")
    if not build:
        pytest.skip("DISTILL_BUILD not set (run through ctest)")
    tool = os.path.join(build, "tests", "test_export_formats")
    distill = os.environ.get("DISTILL_BIN") or os.path.join(build, "distill")
    d = tmp_path_factory.mktemp("m1")
    (d / "tiny.json").write_text(json.dumps(TINY))
    hyb, out = str(d / "hybrid"), str(d / "export")
    run([tool, "--make-hybrid1", str(d / "tiny.json"), "1", "5", hyb])
    run([distill, "export", "--model", hyb, "--format", "mambainllama", "--dtype", "f32", "--out", out,
         "--hf-code", os.path.join(ROOT, "hf")])
    return tool, d, out


def ours(tool, d, model, ids):
    f = d / "ids.txt"
    f.write_text(" ".join(map(str, ids)) + "\n")
    run([tool, "--logits", model, str(f), str(d / "ours.bin")])
    return np.fromfile(d / "ours.bin", dtype=np.float32).reshape(len(ids), -1)


def load(out):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    return m.eval()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_logits_match_engine(export):
    tool, d, out = export
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_mambainllama.MambaInLlamaForCausalLM"
    assert conf["mamba_config"]["attn_layers"] == [1] and conf["mamba_config"]["d_state"] == 16
    ids = np.random.default_rng(0).integers(0, 80, 29).tolist()
    ref = ours(tool, d, out, ids)  # distill reads the export back (model_load), engine forward
    m = load(out)
    assert type(m).__name__ == "MambaInLlamaForCausalLM"
    with torch.no_grad():
        got = m(torch.tensor([ids])).logits[0].numpy()
    err = rel(got, ref)
    print(f"Mamba-1 hybrid under transformers vs our engine: relative error {err:.2e}")
    assert err < 1e-4

    # left padding in a batch: the padded row's real positions give the same logits
    with torch.no_grad():
        pad = 5
        inp = torch.tensor([[0] * pad + ids[:20], ids[:25]])
        mask = torch.tensor([[0] * pad + [1] * 20, [1] * 25])
        pos = torch.clamp(mask.cumsum(1) - 1, min=0)
        lg = m(inp, attention_mask=mask, position_ids=pos).logits
    assert rel(lg[0, pad:].numpy(), ref[:20]) < 1e-4
    assert rel(lg[1].numpy(), ref[:25]) < 1e-4


def test_wrong_dt_bias_is_detected(export, tmp_path):
    """The comparison can fail: with the dt bias halved (so delta = softplus(dt_proj(.) + b/2 ... ) differs from
    MambaInLlama's double application) the logits move well beyond the tolerance."""
    tool, d, out = export
    ids = list(range(3, 30))
    ref = ours(tool, d, out, ids)
    m = load(out)
    with torch.no_grad():
        for layer in m.model.layers:
            if hasattr(layer, "mamba"):
                layer.mamba.dt_proj.bias.mul_(0.5)
        got = m(torch.tensor([ids])).logits[0].numpy()
    assert rel(got, ref) > 1e-3
