"""Q/K un-permutation and name mapping: the teacher as distill's model loader sees it (HF names and layout,
through `distill inspect --dump all --hf`) against what HF transformers loads from the same GGUF
(AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), CPU, float32). Every tensor must match within
1e-6, and q_proj/k_proj must differ from the raw (permuted) GGUF rows, so the test sees the permutation.
"""
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DISTILL_BIN", os.path.join(ROOT, "build", "distill"))
TEACHER = os.path.join(ROOT, "checkpoints", "teachers", "SmolLM2-135M-Instruct.Q4_1.gguf")

pytestmark = pytest.mark.skipif(not os.path.exists(TEACHER), reason="teacher missing (scripts/fetch-teacher)")


@pytest.fixture(scope="module")
def hf_state():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(TEACHER), gguf_file=os.path.basename(TEACHER), dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    r = subprocess.run([BIN, "inspect", TEACHER, "--dump", "all", "--hf", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {f[:-4]: str(out / f) for f in os.listdir(out) if f.endswith(".npy")}


def test_qk_layers(ours, hf_state):
    reader = gguf.GGUFReader(TEACHER)
    raw = {t.name: t for t in reader.tensors}
    for layer in (0, 1, 15, 29):
        for proj, gname in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            a, b = np.load(ours[name]), hf_state[name]
            assert a.shape == b.shape
            assert np.max(np.abs(a - b)) <= 1e-6, name
            t = raw[f"blk.{layer}.{gname}.weight"]
            permuted = gguf.quants.dequantize(t.data, t.tensor_type).reshape(a.shape)
            assert not np.allclose(permuted, b), f"{name}: raw GGUF rows already equal HF rows?"


def test_all_tensors(ours, hf_state):
    expected = {k for k in hf_state if k != "lm_head.weight"}  # tied: lm_head is the embedding
    assert set(ours) == expected
    assert len(ours) == 272
    for name in sorted(expected):
        a, b = np.load(ours[name]), hf_state[name]
        assert a.shape == b.shape, name
        assert np.max(np.abs(a - b)) <= 1e-6, name
    if "lm_head.weight" in hf_state:
        assert np.array_equal(hf_state["lm_head.weight"], np.load(ours["model.embed_tokens.weight"]))
