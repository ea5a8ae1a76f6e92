"""The exactness claim of shared/research/export.md §3.2 with a real engine: a MambaInLlama Mamba-2 layer
(compact x/B from the KV heads, conv over the compact xBC, repeat_kv after the conv) equals a standard Mamba-2
layer whose x and B rows (in_proj and conv1d) are duplicated per KV group, n_groups = n_heads.

Three implementations of one random layer are compared:
  * ours: distill/mamba2_cpu.c (fp32), run through `test_mamba2_cpu --run-layer IN OUT`;
  * HF transformers' GraniteMoeHybridMambaLayer (its torch path) with the mapped weights;
  * a float64 NumPy transcription of MambaInLlama's layer (mambainllama.md §1b), written here, sequential.
The semantic differences found are recorded in docs/EXPORTS.md; the ones that can be shown are asserted here
(HF with a whole-d_inner gated norm, as older transformers versions and HF Bamba/Mamba2 with n_groups = 1
compute it, differs; HF with the per-group norm matches); HF's cached decode path matches too; and the zero
padding of heads and state dimensions (for engines' shape limits) is exact.
"""
import os
import struct
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.granitemoehybrid import modeling_granitemoehybrid as gmh  # noqa: E402
from transformers.models.granitemoehybrid.configuration_granitemoehybrid import GraniteMoeHybridConfig  # noqa: E402

D_CONV = 4


def c_binary():
    build = os.environ.get("DISTILL_BUILD")
    if not build:
        pytest.skip("DISTILL_BUILD not set (run through ctest)")
    path = os.path.join(build, "tests", "test_mamba2_cpu")
    assert os.path.exists(path), f"{path} missing: build the test_mamba2_cpu target"
    return path


class Layer:
    """Random MambaInLlama Mamba-2 layer parameters (float32 values), in our / MambaInLlama layout."""

    def __init__(self, rng, d_model, n_head, n_kv, head_dim, eps=1e-5):
        self.d, self.H, self.kv, self.P = d_model, n_head, n_kv, head_dim
        self.N, self.rep, self.eps = head_dim, n_head // n_kv, eps
        self.di, self.dxb = n_head * head_dim, n_kv * head_dim
        self.xbc = 2 * self.dxb + self.di
        self.n_in = self.di + self.xbc + self.H
        f = np.float32
        self.in_proj = (rng.uniform(-1, 1, (self.n_in, d_model)) / np.sqrt(d_model)).astype(f)
        self.conv_w = rng.uniform(-0.5, 0.5, (self.xbc, 1, D_CONV)).astype(f)
        self.conv_b = rng.uniform(-0.5, 0.5, self.xbc).astype(f)
        self.dt_bias = np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(0.3), self.H)))).astype(f)
        self.A_log = np.log(rng.uniform(1, 16, self.H)).astype(f)
        self.D = rng.uniform(0.5, 1.5, self.H).astype(f)
        self.norm_w = rng.uniform(0.5, 1.5, self.di).astype(f)
        self.out_proj = (rng.uniform(-1, 1, (d_model, self.di)) / np.sqrt(self.di)).astype(f)

    # ---- export.md §3.2: duplicate x and B rows per KV group (head h reads KV group h // rep)
    def expand_rows(self, t):
        """t has xBC channels first ([xbc, ...]); returns [di + 2*H*N, ...] in standard Mamba-2 order."""
        x, B, C = t[: self.dxb], t[self.dxb: 2 * self.dxb], t[2 * self.dxb:]
        xs = x.reshape(self.kv, self.P, *t.shape[1:])
        Bs = B.reshape(self.kv, self.N, *t.shape[1:])
        xe = np.repeat(xs, self.rep, axis=0).reshape(self.di, *t.shape[1:])
        Be = np.repeat(Bs, self.rep, axis=0).reshape(self.H * self.N, *t.shape[1:])
        return np.concatenate([xe, Be, C], axis=0)

    def fold_rows(self, t):
        """Gradient of expand_rows: [di + H*N + di, ...] (standard) -> [xbc, ...] (summed over duplicates)."""
        x, B, C = t[: self.di], t[self.di: self.di + self.H * self.N], t[self.di + self.H * self.N:]
        xf = x.reshape(self.kv, self.rep, self.P, *t.shape[1:]).sum(1).reshape(self.dxb, *t.shape[1:])
        Bf = B.reshape(self.kv, self.rep, self.N, *t.shape[1:]).sum(1).reshape(self.dxb, *t.shape[1:])
        return np.concatenate([xf, Bf, C], axis=0)

    def granite_weights(self):
        z = self.in_proj[: self.di]
        xbc = self.in_proj[self.di: self.di + self.xbc]
        dt = self.in_proj[self.di + self.xbc:]
        return {
            "in_proj.weight": np.concatenate([z, self.expand_rows(xbc), dt], axis=0),
            "conv1d.weight": self.expand_rows(self.conv_w),
            "conv1d.bias": self.expand_rows(self.conv_b),
            "dt_bias": self.dt_bias, "A_log": self.A_log, "D": self.D,
            "norm.weight": self.norm_w, "out_proj.weight": self.out_proj,
        }


    def granite_weights_padded(self, H2, N2):
        """export.md §3.2 zero padding: H2 >= H heads (extra heads: zero in_proj rows, conv weights and bias,
        out_proj columns) and d_state N2 >= N (extra state dims: zero B/C rows and conv channels)."""
        w = self.granite_weights()
        H, P, N, d = self.H, self.P, self.N, self.d

        def blocks(t, size, rows):  # [H*size, ...] -> [H2, rows, ...] zero padded
            t = t.reshape(H, size, *t.shape[1:])
            out = np.zeros((H2, rows, *t.shape[2:]), np.float32)
            out[:H, :size] = t
            return out.reshape(H2 * rows, *t.shape[2:])

        def split_xbc(t):  # standard-layout xBC channels -> padded
            x, B, C = t[: self.di], t[self.di: self.di + H * N], t[self.di + H * N:]
            return np.concatenate([blocks(x, P, P), blocks(B, N, N2), blocks(C, N, N2)], axis=0)

        W = w["in_proj.weight"]
        z, xbc, dt = W[: self.di], W[self.di: self.di + self.di + 2 * H * N], W[self.di + self.di + 2 * H * N:]
        pad1 = lambda v, fill: np.concatenate([v, np.full(H2 - H, fill, np.float32)])  # noqa: E731
        out_proj = np.zeros((d, H2 * P), np.float32)
        out_proj[:, : H * P] = w["out_proj.weight"]
        return {
            "in_proj.weight": np.concatenate([blocks(z, P, P), split_xbc(xbc), blocks(dt, 1, 1)], axis=0),
            "conv1d.weight": split_xbc(w["conv1d.weight"]), "conv1d.bias": split_xbc(w["conv1d.bias"]),
            "dt_bias": pad1(self.dt_bias, 0.5), "A_log": pad1(self.A_log, 1.0), "D": pad1(self.D, 1.0),
            "norm.weight": np.concatenate([self.norm_w, np.ones((H2 - H) * P, np.float32)]),
            "out_proj.weight": out_proj,
        }


def run_ours(tmp_path, layer, x):
    Bn, L, _ = x.shape
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(struct.pack("<6q", layer.d, layer.H, layer.kv, layer.P, Bn, L))
        f.write(struct.pack("<d", layer.eps))
        for a in (layer.in_proj, layer.conv_w, layer.conv_b, layer.dt_bias, layer.A_log, layer.D, layer.norm_w,
                  layer.out_proj, x):
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    r = subprocess.run([c_binary(), "--run-layer", str(inp), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return np.fromfile(out, dtype="<f4").reshape(Bn, L, layer.d)


NAMES = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]


def run_ours_bwd(tmp_path, layer, x, dout):
    """Our forward + backward: out, dx, and the gradients of our (compact) tensors."""
    Bn, L, _ = x.shape
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(struct.pack("<6q", layer.d, layer.H, layer.kv, layer.P, Bn, L))
        f.write(struct.pack("<d", layer.eps))
        for a in (layer.in_proj, layer.conv_w, layer.conv_b, layer.dt_bias, layer.A_log, layer.D, layer.norm_w,
                  layer.out_proj, x, dout):
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    r = subprocess.run([c_binary(), "--run-layer-bwd", str(inp), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    flat = np.fromfile(out, dtype="<f4")
    shapes = [x.shape, x.shape] + [a.shape for a in (layer.in_proj, layer.conv_w, layer.conv_b, layer.dt_bias,
                                                      layer.A_log, layer.D, layer.norm_w, layer.out_proj)]
    res, o = [], 0
    for sh in shapes:
        n = int(np.prod(sh))
        res.append(flat[o:o + n].reshape(sh))
        o += n
    assert o == flat.size
    return res[0], res[1], dict(zip(NAMES, res[2:]))


def ref_mambainllama(layer, x):
    """MambaInLlama's Mamba-2 layer (mambainllama.md §1b) in float64, token by token."""
    p = {k: np.asarray(v, np.float64) for k, v in vars(layer).items() if isinstance(v, np.ndarray)}
    Bn, L, _ = x.shape
    out = np.zeros((Bn, L, layer.d))
    W = p["conv_w"][:, 0, :]
    A = -np.exp(p["A_log"])
    for b in range(Bn):
        proj = x[b].astype(np.float64) @ p["in_proj"].T
        z, xbc_raw, dt = proj[:, : layer.di], proj[:, layer.di: layer.di + layer.xbc], proj[:, layer.di + layer.xbc:]
        S = np.zeros((layer.H, layer.P, layer.N))
        for t in range(L):
            acc = p["conv_b"].copy()
            for k in range(D_CONV):
                tt = t - (D_CONV - 1) + k
                if tt >= 0:
                    acc += W[:, k] * xbc_raw[tt]
            xc = acc / (1 + np.exp(-acc))
            xv, Bv, Cv = xc[: layer.dxb], xc[layer.dxb: 2 * layer.dxb], xc[2 * layer.dxb:]
            y = np.zeros(layer.di)
            for h in range(layer.H):
                j = h // layer.rep  # repeat_kv: head h uses KV group h // rep
                delta = np.logaddexp(0, dt[t, h] + p["dt_bias"][h])
                xh, Bh, Ch = xv[j * layer.P:(j + 1) * layer.P], Bv[j * layer.N:(j + 1) * layer.N], Cv[h * layer.N:(h + 1) * layer.N]
                S[h] = np.exp(delta * A[h]) * S[h] + delta * np.outer(xh, Bh)
                y[h * layer.P:(h + 1) * layer.P] = S[h] @ Ch + p["D"][h] * xh
            g = y * z[t] / (1 + np.exp(-z[t]))
            gg = g.reshape(layer.H, layer.P)
            gn = gg / np.sqrt((gg ** 2).mean(-1, keepdims=True) + layer.eps)
            out[b, t] = (gn.reshape(-1) * p["norm_w"]) @ p["out_proj"].T
    return out


def m_config(layer, chunk_size=256, H=None, N=None):
    H, N = H or layer.H, N or layer.N
    # GraniteMoeHybridConfig.mamba_expand is an int (strictly validated): d_inner must be a multiple of d_model
    assert (H * layer.P) % layer.d == 0, "not representable: pad heads with zero rows (export.md §3.2) first"
    return GraniteMoeHybridConfig(
        vocab_size=16, hidden_size=layer.d, intermediate_size=8, shared_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=layer.H, num_key_value_heads=layer.kv,
        layer_types=["mamba"], num_local_experts=0, num_experts_per_tok=0,
        mamba_n_heads=H, mamba_d_head=layer.P, mamba_n_groups=H, mamba_d_state=N,
        mamba_expand=H * layer.P // layer.d, mamba_d_conv=D_CONV, mamba_conv_bias=True, mamba_proj_bias=False,
        mamba_chunk_size=chunk_size, rms_norm_eps=layer.eps, hidden_act="silu",
    )


def granite_layer(layer, chunk_size=256):
    cfg = m_config(layer, chunk_size)
    m = gmh.GraniteMoeHybridMambaLayer(cfg, layer_idx=0).eval()
    assert m.intermediate_size == layer.di, "mamba_expand * hidden_size must give d_inner exactly"
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in layer.granite_weights().items()}
    m.load_state_dict(sd, strict=True)
    return m


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


SHAPES = [
    # d_model, heads, kv heads, head_dim, batch, length, HF chunk size
    (48, 6, 2, 8, 2, 37, 16),     # GQA, L not a multiple of the chunk
    (32, 4, 1, 16, 1, 70, 256),   # d_inner 64 = 2 d_model (mamba_expand 2), MQA
    (576, 9, 3, 64, 1, 24, 256),  # SmolLM2-135M's attention shape
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}_h{s[1]}_kv{s[2]}_hd{s[3]}_L{s[5]}")
def test_granite_equals_mambainllama(tmp_path, shape):
    d, H, kv, hd, Bn, L, Q = shape
    rng = np.random.default_rng(1000 + d)
    layer = Layer(rng, d, H, kv, hd)
    x = rng.uniform(-1, 1, (Bn, L, d)).astype(np.float32)
    ref = ref_mambainllama(layer, x)
    ours = run_ours(tmp_path, layer, x)
    m = granite_layer(layer, Q)
    with torch.no_grad():
        hf = m(torch.from_numpy(x)).numpy()
    e_ours, e_hf, e_pair = rel(ours, ref), rel(hf, ref), rel(ours, hf)
    print(f"{shape}: ours vs float64 {e_ours:.2e}, HF GraniteMoeHybrid vs float64 {e_hf:.2e}, ours vs HF {e_pair:.2e}")
    assert e_ours < 1e-5
    assert e_hf < 1e-5, "the x/B row duplication of export.md §3.2 is not exact in HF GraniteMoeHybrid"
    assert e_pair < 2e-5


def test_whole_dinner_norm_differs(tmp_path):
    """The gated RMSNorm must be per head group: a whole-d_inner norm (group_size = d_inner, what HF's
    Mamba2/Bamba gated norms compute when n_groups = 1, and what older transformers releases computed
    regardless of n_groups) gives a different layer."""
    rng = np.random.default_rng(7)
    layer = Layer(rng, 48, 6, 2, 8)
    x = rng.uniform(-1, 1, (1, 20, 48)).astype(np.float32)
    m = granite_layer(layer)
    assert m.norm.group_size == layer.P
    with torch.no_grad():
        grouped = m(torch.from_numpy(x)).numpy()
        m.norm.group_size = layer.di
        whole = m(torch.from_numpy(x)).numpy()
    ref = ref_mambainllama(layer, x)
    print(f"per-head norm vs float64 {rel(grouped, ref):.2e}; whole-d_inner norm vs float64 {rel(whole, ref):.2e}")
    assert rel(grouped, ref) < 1e-5
    assert rel(whole, ref) > 1e-2, "a whole-d_inner norm should not match MambaInLlama"


def test_granite_decode_matches(tmp_path):
    """HF's recurrent path (selective_state_update + conv update, through the hybrid cache) on the mapped
    weights also matches MambaInLlama token by token."""
    rng = np.random.default_rng(11)
    layer = Layer(rng, 48, 6, 2, 8)
    L = 9
    x = rng.uniform(-1, 1, (1, L, 48)).astype(np.float32)
    ref = ref_mambainllama(layer, x)
    m = granite_layer(layer)
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache(config=m_config(layer))
    outs = []
    with torch.no_grad():
        outs.append(m(torch.from_numpy(x[:, :4]), cache_params=cache).numpy())  # prefill of 4 tokens
        for t in range(4, L):  # then one token at a time
            outs.append(m(torch.from_numpy(x[:, t:t + 1]), cache_params=cache).numpy())
    hf = np.concatenate(outs, axis=1)
    print(f"HF cached prefill(4) + 5 decode steps vs float64 {rel(hf, ref):.2e}")
    assert rel(hf, ref) < 1e-5


def test_zero_padding_is_exact():
    """d_inner 64 is not a multiple of d_model 40 (not representable: mamba_expand is an int); padding to
    5 heads (d_inner 80 = 2 d_model) and d_state 16 -> 32 with zeros (export.md §3.2) is exact."""
    rng = np.random.default_rng(5)
    layer = Layer(rng, 40, 4, 2, 16)
    x = rng.uniform(-1, 1, (2, 30, 40)).astype(np.float32)
    ref = ref_mambainllama(layer, x)
    H2, N2 = 5, 32
    m = gmh.GraniteMoeHybridMambaLayer(m_config(layer, 256, H2, N2), layer_idx=0).eval()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in layer.granite_weights_padded(H2, N2).items()}
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        hf = m(torch.from_numpy(x)).numpy()
    print(f"padded to {H2} heads, d_state {N2}: HF vs float64 {rel(hf, ref):.2e}")
    assert rel(hf, ref) < 1e-5


def test_backward_matches_hf_autograd(tmp_path):
    """Our backward against torch autograd through HF's layer with the mapped weights: dx, and every
    parameter gradient with the HF gradients of duplicated x/B rows summed back onto our compact rows
    (training in our layout = training HF's with those rows tied)."""
    rng = np.random.default_rng(21)
    layer = Layer(rng, 48, 6, 2, 8)
    x = rng.uniform(-1, 1, (2, 45, 48)).astype(np.float32)
    dout = rng.uniform(-1, 1, x.shape).astype(np.float32)
    out, dx, grads = run_ours_bwd(tmp_path, layer, x, dout)
    m = granite_layer(layer, chunk_size=16)
    xt = torch.from_numpy(x).requires_grad_(True)
    hf = m(xt)
    (hf * torch.from_numpy(dout)).sum().backward()
    g = {k: v.grad.numpy() for k, v in m.named_parameters()}
    W = g["in_proj.weight"]
    di, xs = layer.di, 2 * layer.di + layer.H * layer.N
    hf_grads = {
        "in_proj.weight": np.concatenate([W[:di], layer.fold_rows(W[di:di + xs]), W[di + xs:]], axis=0),
        "conv1d.weight": layer.fold_rows(g["conv1d.weight"]), "conv1d.bias": layer.fold_rows(g["conv1d.bias"]),
        **{k: g[k] for k in ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")},
    }
    errs = {"out": rel(out, hf.detach().numpy()), "dx": rel(dx, xt.grad.numpy())}
    errs.update({k: rel(grads[k], hf_grads[k]) for k in NAMES})
    print("ours vs HF autograd: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for k, v in errs.items():
        assert v < 2e-5, (k, v)
