"""An independent reader of distill's MambaInLlama export: safetensors + a plain PyTorch float64 forward
written here from the formulas (shared/research/mambainllama.md §0, §1a; HF Llama), compared with the
logits distill's engine computed for the same tokens (tests/test_export --fixture writes both)."""
import json
import math
import os
import pathlib
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

BUILD = pathlib.Path(os.environ.get("DISTILL_BUILD", "build"))


def rmsnorm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):  # x [T, H, hd], HF rotate_half convention
    T, _, hd = x.shape
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(u, W, p, cfg):
    T = u.shape[0]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = (u @ W[p + "self_attn.q_proj.weight"].T).view(T, H, hd)
    k = (u @ W[p + "self_attn.k_proj.weight"].T).view(T, KV, hd)
    v = (u @ W[p + "self_attn.v_proj.weight"].T).view(T, KV, hd)
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    o = torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, H * hd)
    return o @ W[p + "self_attn.o_proj.weight"].T


def mamba1(u, W, p, mc):
    """MambaInLlama Mamba-1 mixer (expand 1, d_state 16): x from W_V, B from W_K, C from W_Q, GQA by repeat."""
    T = u.shape[0]
    di, dxb, N = mc["d_inner"], mc["d_xb"], 16
    rg = di // dxb
    z = u @ W[p + "mamba.in_proj_z.weight"].T  # [T, di]
    x = u @ W[p + "mamba.in_proj_x.weight"].T  # [T, dxb]
    B = u @ W[p + "mamba.B_proj.weight"].T  # [T, dxb]
    C = u @ W[p + "mamba.C_proj.weight"].T  # [T, di]
    dt_bias = W[p + "mamba.dt_proj.bias"]
    dt = (u @ W[p + "mamba.dt_proj_down.weight"].T) @ W[p + "mamba.dt_proj.weight"].T + dt_bias
    # repeat_kv on groups of N: destination group g reads source group g // rg
    x = x.view(T, dxb // N, N).repeat_interleave(rg, dim=1).reshape(T, di)
    B = B.view(T, dxb // N, N).repeat_interleave(rg, dim=1)  # [T, di/N, N]
    C = C.view(T, di // N, N)
    # causal depthwise conv (k = 4) + bias, then SiLU
    w = W[p + "mamba.conv1d.weight"][:, 0, :]  # [di, 4]
    K = w.shape[1]
    xp = torch.cat([torch.zeros(K - 1, di, dtype=x.dtype), x], 0)
    xc = sum(xp[k : k + T] * w[:, k] for k in range(K)) + W[p + "mamba.conv1d.bias"]
    xc = xc * torch.sigmoid(xc)
    delta = torch.nn.functional.softplus(dt + dt_bias)  # the dt bias applies twice (reference behaviour)
    A = -torch.exp(W[p + "mamba.A_log"])  # [di, N]
    D = W[p + "mamba.D"]
    g = torch.arange(di) // N  # channel -> its B/C group
    h = torch.zeros(di, N, dtype=u.dtype)
    ys = []
    for t in range(T):
        h = torch.exp(delta[t][:, None] * A) * h + (delta[t] * xc[t])[:, None] * B[t][g]
        ys.append((h * C[t][g]).sum(-1) + D * xc[t])
    y = torch.stack(ys) * (z * torch.sigmoid(z))
    return y @ W[p + "mamba.out_proj.weight"].T


def forward(tokens, W, cfg, mc):
    eps = cfg["rms_norm_eps"]
    attn = set(mc["attn_layers"]) if mc else set(range(cfg["num_hidden_layers"]))
    x = W["model.embed_tokens.weight"][tokens]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        u = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        x = x + (attention(u, W, p, cfg) if l in attn else mamba1(u, W, p, mc))
        u = rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate, up = u @ W[p + "mlp.gate_proj.weight"].T, u @ W[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.T


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    exe = BUILD / "tests" / "test_export"
    if not exe.exists():
        pytest.skip(f"{exe} not built")
    d = tmp_path_factory.mktemp("export")
    subprocess.run([str(exe), "--fixture", str(d)], check=True)
    return d


def test_export_logits_match_engine(fixture):
    ex = fixture / "export"
    cfg = json.loads((ex / "config.json").read_text())
    mc = json.loads((ex / "mamba_config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert mc["ssm_cfg"] == {"expand": 1} and mc["d_model"] == cfg["hidden_size"]
    assert mc["d_inner"] == cfg["num_attention_heads"] * cfg["head_dim"]
    assert mc["d_xb"] == cfg["num_key_value_heads"] * cfg["head_dim"]
    assert mc["n_layer"] == cfg["num_hidden_layers"] and mc["attn_layers"] == [1]
    assert mc["intermediate_size"] == cfg["intermediate_size"]
    W = {k: torch.from_numpy(v.astype(np.float64)) for k, v in load_file(str(ex / "model.safetensors")).items()}
    B, T, V = map(int, (fixture / "shape.txt").read_text().split())
    tokens = np.fromfile(fixture / "tokens.i32", dtype=np.int32).reshape(B, T)
    want = np.fromfile(fixture / "logits.f32", dtype=np.float32).reshape(B, T, V).astype(np.float64)
    with torch.no_grad():
        got = np.stack([forward(torch.from_numpy(tokens[b]).long(), W, cfg, mc).numpy() for b in range(B)])
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"export reader vs engine logits: relative error {rel:.3e}")
    assert rel < 1e-5
    # the logits are not degenerate (a forward that ignores the mixers would be far off)
    assert np.std(want) > 0.1
