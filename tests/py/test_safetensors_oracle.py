"""HF directories and safetensors files written by the real writers (transformers' save_pretrained,
sharded and not; the `safetensors` package with F32/F16/BF16) read by distill (`distill inspect --dump`),
compared tensor by tensor with what was saved."""
import json
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_torch = pytest.importorskip("safetensors.torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DISTILL_BIN", os.path.join(ROOT, "build", "distill"))


def run(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def dump_all(path, out, hf=True):
    code, _, err = run("inspect", str(path), "--dump", "all", "--out", str(out), *(["--hf"] if hf else []))
    assert code == 0, err
    return {f[:-4]: np.load(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".npy")}


@pytest.mark.parametrize("tied,shard,rope", [(False, None, None), (True, "60KB", None), (False, "60KB", "llama3")])
def test_save_pretrained_dir(tmp_path, tied, shard, rope):
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    if rope:
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).to(torch.bfloat16 if shard else torch.float32)
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (d / "model.safetensors.index.json").exists()
    code, out, err = run("inspect", str(d))
    assert code == 0, err
    assert "check: all" in out and ("tied embeddings    yes" in out) == tied
    if rope:
        assert "llama3 (factor 8" in out
    ours = dump_all(d, tmp_path / "out")
    ref = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if tied:
        ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    for k in ref:
        assert np.array_equal(ours[k], ref[k]), k


def test_safetensors_file_dtypes(tmp_path):
    g = torch.Generator().manual_seed(1)
    t = {"a.f32": torch.randn(3, 5, generator=g), "b.f16": torch.randn(4, 2, generator=g).half(),
         "c.bf16": torch.randn(7, generator=g).bfloat16(), "d.scalar": torch.tensor(2.5)}
    p = tmp_path / "x.safetensors"
    st_torch.save_file(t, str(p), metadata={"format": "pt"})
    code, out, err = run("inspect", str(p))
    assert code == 0, err
    assert "BF16" in out and "F16" in out and "format = pt" in out
    ours = dump_all(p, tmp_path / "o", hf=False)
    for k, v in t.items():
        assert np.array_equal(ours[k], v.float().numpy()), k


def test_rejects_inconsistent_dir(tmp_path):
    """A directory whose tensors do not match its config: inspect and load fail with exit 3, naming the tensor."""
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    d = tmp_path / "m"
    model.save_pretrained(d, safe_serialization=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("inspect", str(d))
    assert code == 3 and "mlp" in err and "expected [128, 64]" in err, err
