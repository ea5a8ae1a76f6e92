"""MambaInLlama's Mamba-1 mixer in PyTorch (float64, autograd), written here from
shared/research/mambainllama.md §1a, against our C mixer (distill/mamba1_cpu.c) driven through
`test_mamba1_cpu --io DIR`: forward, input gradient and every parameter gradient, token-by-token decode,
packed documents with resets; and the attention -> Mamba init (distill/mamba_init.c) against
init_with_kqvo's semantics (x <- V, B <- K, C <- Q, out <- O, repeat_kv applied at run time).
"""
import math
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

SUFFIXES = ["in_proj_z.weight", "in_proj_x.weight", "B_proj.weight", "C_proj.weight", "dt_proj_down.weight",
            "dt_proj.weight", "dt_proj.bias", "conv1d.weight", "conv1d.bias", "A_log", "D", "out_proj.weight"]


def c_binary():
    build = os.environ.get("DISTILL_BUILD")
    if not build:
        pytest.skip("DISTILL_BUILD not set (run through ctest)")
    path = os.path.join(build, "tests", "test_mamba1_cpu")
    if not os.path.exists(path):
        pytest.skip(f"{path} not built")
    return path


class Dims:
    def __init__(self, d_model, n_head, n_kv, head_dim):
        self.d = d_model
        self.di = n_head * head_dim           # d_inner (expand = 1)
        self.dxb = n_kv * head_dim            # d_xb
        self.N = 16                           # d_state
        self.R = math.ceil(d_model / 16)      # dt_rank "auto"
        self.W = 4                            # d_conv
        self.rep = self.di // self.dxb        # repeat_group
        self.shapes = {
            "in_proj_z.weight": (self.di, self.d), "in_proj_x.weight": (self.dxb, self.d),
            "B_proj.weight": (self.dxb, self.d), "C_proj.weight": (self.di, self.d),
            "dt_proj_down.weight": (self.R, self.d), "dt_proj.weight": (self.di, self.R),
            "dt_proj.bias": (self.di,), "conv1d.weight": (self.di, 1, self.W), "conv1d.bias": (self.di,),
            "A_log": (self.di, self.N), "D": (self.di,), "out_proj.weight": (self.d, self.di),
        }


def repeat_kv(t, n_rep):
    """[b, l, groups, N] -> [b, l, groups * n_rep, N]; output group g reads input group g // n_rep
    (transformers' repeat_kv: expand a new axis after the group axis, then flatten)."""
    b, l, g, n = t.shape
    return t[:, :, :, None, :].expand(b, l, g, n_rep, n).reshape(b, l, g * n_rep, n)


def mixer_one_doc(p, u, m):
    """The mixer on u [1, l, d] (one document, zero initial state)."""
    b, l, _ = u.shape
    z = u @ p["in_proj_z.weight"].T
    x = u @ p["in_proj_x.weight"].T
    Bv = u @ p["B_proj.weight"].T
    Cv = u @ p["C_proj.weight"].T
    dt = (u @ p["dt_proj_down.weight"].T) @ p["dt_proj.weight"].T + p["dt_proj.bias"]  # Linear with bias
    A = -torch.exp(p["A_log"])
    x = repeat_kv(x.view(b, l, m.dxb // m.N, m.N), m.rep).reshape(b, l, m.di)     # repeat before the conv
    xc = F.conv1d(x.transpose(1, 2), p["conv1d.weight"], p["conv1d.bias"], padding=m.W - 1, groups=m.di)[..., :l]
    xc = F.silu(xc).transpose(1, 2)                                                 # [b, l, di]
    Bg = repeat_kv(Bv.view(b, l, m.dxb // m.N, m.N), m.rep)                         # [b, l, di/N, N]
    Cg = Cv.view(b, l, m.di // m.N, m.N)
    Bc = Bg.repeat_interleave(m.di // Bg.shape[2], dim=2)                           # channel c: group c // N
    Cc = Cg.repeat_interleave(m.di // Cg.shape[2], dim=2)
    delta = F.softplus(dt + p["dt_proj.bias"])                                      # the bias a second time
    h = torch.zeros(b, m.di, m.N, dtype=u.dtype)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bc[:, t] * xc[:, t, :, None]
        ys.append((h * Cc[:, t]).sum(-1) + p["D"] * xc[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ p["out_proj.weight"].T


def mixer(p, u, reset, m):
    """Packed rows: each document (starting at t = 0 and where reset is 1) runs alone."""
    B, L, _ = u.shape
    rows = []
    for b in range(B):
        starts = sorted(set([0] + [t for t in range(L) if reset[b, t]])) + [L]
        rows.append(torch.cat([mixer_one_doc(p, u[b:b + 1, s:e], m) for s, e in zip(starts[:-1], starts[1:])], 1))
    return torch.cat(rows, 0)


def random_params(m, rng):
    p = {}
    for k, shape in m.shapes.items():
        if k == "dt_proj.bias":
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            v = dt + np.log(-np.expm1(-dt))
        elif k == "A_log":
            v = np.log(np.tile(np.arange(1, m.N + 1, dtype=np.float64), (m.di, 1))) + rng.uniform(-0.3, 0.3, shape)
        elif k == "D":
            v = rng.uniform(0.5, 1.5, shape)
        elif k.startswith("conv1d"):
            v = rng.uniform(-0.5, 0.5, shape)
        elif k == "dt_proj.weight":
            v = rng.uniform(-1, 1, shape) / math.sqrt(m.R)
        elif k == "out_proj.weight":
            v = rng.uniform(-1, 1, shape) / math.sqrt(m.di)
        else:
            v = rng.uniform(-1, 1, shape) / math.sqrt(m.d)
        p[k] = v.astype(np.float32)
    return p


def run_c(binary, tmp, cfg, B, L, x, reset, dout, params=None, attn=None, seed=1):
    d = str(tmp)
    with open(os.path.join(d, "config.txt"), "w") as f:
        f.write(f"{cfg[0]} {cfg[1]} {cfg[2]} {cfg[3]} {B} {L} {seed}\n")
    if params is not None:
        for k, v in params.items():
            v.astype("<f4").tofile(os.path.join(d, k + ".f32"))
    if attn is not None:
        for k, v in attn.items():
            v.astype("<f4").tofile(os.path.join(d, k + ".f32"))
    x.astype("<f4").tofile(os.path.join(d, "x.f32"))
    dout.astype("<f4").tofile(os.path.join(d, "dout.f32"))
    reset.astype(np.uint8).tofile(os.path.join(d, "reset.u8"))
    r = subprocess.run([binary, "--io", d], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

    def rd(name, shape):
        return np.fromfile(os.path.join(d, name), dtype="<f4").reshape(shape)

    return rd


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


CONFIGS = [
    (64, 4, 2, 16),    # head_dim = d_state: groups = heads, repeat 2
    (192, 3, 1, 64),   # SmolLM2-like head_dim 64 (4 groups per head), repeat 3
    (64, 8, 2, 8),     # head_dim < d_state: a group spans two heads, repeat 4
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_mixer_matches_torch(cfg, tmp_path):
    binary = c_binary()
    m = Dims(*cfg)
    rng = np.random.default_rng(sum(cfg))
    B, L = 2, 12
    p = random_params(m, rng)
    x = rng.uniform(-1, 1, (B, L, m.d)).astype(np.float32)
    dout = rng.uniform(-1, 1, (B, L, m.d)).astype(np.float32)
    reset = np.zeros((B, L), np.uint8)
    reset[1, [0, 4, 9]] = 1
    rd = run_c(binary, tmp_path, cfg, B, L, x, reset, dout, params=p)

    pt = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p.items()}
    u = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = mixer(pt, u, reset, m)
    (out * torch.tensor(dout, dtype=torch.float64)).sum().backward()

    assert rel(rd("out.f32", (B, L, m.d)), out.detach().numpy()) < 1e-5
    assert rel(rd("dx.f32", (B, L, m.d)), u.grad.numpy()) < 1e-5
    for k in SUFFIXES:
        e = rel(rd("grad." + k + ".f32", m.shapes[k]), pt[k].grad.numpy())
        assert e < 1e-5, (k, e)
    # token-by-token decode of row 0 (no resets) equals the reference
    assert rel(rd("step.f32", (B, L, m.d))[0], out.detach().numpy()[0]) < 1e-5


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_init_matches_init_with_kqvo(cfg, tmp_path):
    binary = c_binary()
    m = Dims(*cfg)
    rng = np.random.default_rng(100 + sum(cfg))
    attn = {"q_proj": rng.normal(0, 0.05, (m.di, m.d)), "k_proj": rng.normal(0, 0.05, (m.dxb, m.d)),
            "v_proj": rng.normal(0, 0.05, (m.dxb, m.d)), "o_proj": rng.normal(0, 0.05, (m.d, m.di))}
    attn = {k: v.astype(np.float32) for k, v in attn.items()}
    B, L = 2, 10
    x = rng.uniform(-1, 1, (B, L, m.d)).astype(np.float32)
    dout = rng.uniform(-1, 1, (B, L, m.d)).astype(np.float32)
    reset = np.zeros((B, L), np.uint8)
    rd = run_c(binary, tmp_path, cfg, B, L, x, reset, dout, attn=attn, seed=5)
    init = {k: rd("init." + k + ".f32", m.shapes[k]) for k in SUFFIXES}

    # init_with_kqvo: exact copies, no reordering (the GQA repeat is applied to activations)
    assert np.array_equal(init["in_proj_x.weight"], attn["v_proj"])
    assert np.array_equal(init["B_proj.weight"], attn["k_proj"])
    assert np.array_equal(init["C_proj.weight"], attn["q_proj"])
    assert np.array_equal(init["out_proj.weight"], attn["o_proj"])
    # A_log = log(1..16) per row; ours is the correctly rounded value, torch.log in float32 is 1 ulp off at 7
    want = np.log(np.tile(np.arange(1, 17, dtype=np.float64), (m.di, 1)))
    assert np.array_equal(init["A_log"], want.astype(np.float32))
    assert np.max(np.abs(init["A_log"] - torch.log(torch.arange(1, 17, dtype=torch.float32)).numpy())) <= 2.4e-7
    assert np.all(init["D"] == 1)
    dt = np.log1p(np.exp(init["dt_proj.bias"].astype(np.float64)))
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert np.abs(init["in_proj_z.weight"]).max() <= 1 / math.sqrt(m.d)
    assert np.abs(init["dt_proj.weight"]).max() <= 1 / math.sqrt(m.R)
    assert np.abs(init["conv1d.weight"]).max() <= 0.5 and np.abs(init["conv1d.bias"]).max() <= 0.5

    # the torch mixer built from the attention weights as the reference does, random parts from our init
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in init.items()}
    for dst, src in [("in_proj_x.weight", "v_proj"), ("B_proj.weight", "k_proj"), ("C_proj.weight", "q_proj"),
                     ("out_proj.weight", "o_proj")]:
        p[dst] = torch.tensor(attn[src], dtype=torch.float64)
    out = mixer(p, torch.tensor(x, dtype=torch.float64), reset, m)
    assert rel(rd("out.f32", (B, L, m.d)), out.numpy()) < 1e-5

    # KV-head pairing of the repeat (mambainllama.md §1a): C group i (q rows 16i..) and the B group it reads
    # (i // rep) belong to the same KV head, as in GQA attention
    hd = m.di // cfg[1]
    for i in range(m.di // 16):
        q_head = (16 * i) // hd
        assert (16 * (i // m.rep)) // hd == q_head // (cfg[1] // cfg[2])
