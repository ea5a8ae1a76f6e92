"""Dequantization oracle: distill's C dequantizer (through `distill inspect --dump`) against the PyPI `gguf`
package's dequantize on the very same tensor bytes.

Teacher types (F32, Q4_1, Q8_0) come from the real teacher file; F16, BF16, Q4_0 and the quantizable types
are written by gguf-py's quantizer; Q4_K, Q5_K and Q6_K (which gguf-py cannot quantize) are random valid
blocks written as raw bytes with finite scales.
"""
import os
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DISTILL_BIN", os.path.join(ROOT, "build", "distill"))
TEACHER = os.path.join(ROOT, "checkpoints", "teachers", "SmolLM2-135M-Instruct.Q4_1.gguf")


def dump(path, names, out):
    r = subprocess.run([BIN, "inspect", path, "--dump", ",".join(names), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {n: np.load(os.path.join(out, n + ".npy")) for n in names}


def oracle(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    return t.tensor_type, np.asarray(x, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


def check_same(ours, ref, what):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert ours.dtype == np.float32
    # bit-exact: both evaluate the same fp32 formula on the same bytes
    diff = np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))) if ours.size else 0.0
    assert np.array_equal(ours, ref, equal_nan=True), f"{what}: max abs diff {diff}"


@pytest.mark.skipif(not os.path.exists(TEACHER), reason="teacher missing (scripts/fetch-teacher)")
def test_teacher_types(tmp_path):
    reader = gguf.GGUFReader(TEACHER)
    types = {t.tensor_type for t in reader.tensors}
    assert types == {T.F32, T.Q4_1, T.Q8_0}, types  # what the teacher holds (export.md §1.2, verified)
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight",
             "blk.13.ffn_gate.weight", "blk.0.attn_norm.weight", "output_norm.weight"]
    ours = dump(TEACHER, names, tmp_path)
    seen = set()
    for n in names:
        tt, ref = oracle(reader, n)
        seen.add(tt)
        check_same(ours[n], ref, n)
    assert seen == types


def write_gguf(path, tensors):
    w = gguf.GGUFWriter(str(path), "llama")
    for name, arr, raw_dtype in tensors:
        if raw_dtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_k_blocks(rng, qtype, rows, blocks_per_row):
    """Random bytes for K-quant blocks, with finite fp16 scales so the values are comparable."""
    bs = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, bs), dtype=np.uint8)
    def put_f16(off, lo, hi):
        v = rng.uniform(lo, hi, size=(rows, blocks_per_row)).astype(np.float16)
        raw[:, :, off:off + 2] = v.view(np.uint8).reshape(rows, blocks_per_row, 2)
    if qtype in (T.Q4_K, T.Q5_K):
        put_f16(0, -0.05, 0.05)  # d
        put_f16(2, -0.05, 0.05)  # dmin
    else:  # Q6_K: d is the last field
        put_f16(bs - 2, -0.05, 0.05)
    return raw.reshape(rows, blocks_per_row * bs)


def test_generated_types(tmp_path):
    rng = np.random.default_rng(1234)
    x = (rng.standard_normal((6, 512)) * 3).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0 paths)
    x[1, :32] = 5.0  # a constant block (Q4_1 d = 0)
    tensors = [("f32", x, None), ("f16", x.astype(np.float16), None)]
    for qt in (T.BF16, T.Q8_0, T.Q4_0, T.Q4_1):
        tensors.append((qt.name.lower(), gguf.quants.quantize(x, qt), qt))
    for qt in (T.Q4_K, T.Q5_K, T.Q6_K):
        tensors.append((qt.name.lower(), random_k_blocks(rng, qt, 5, 3), qt))
    path = tmp_path / "types.gguf"
    write_gguf(path, tensors)
    reader = gguf.GGUFReader(str(path))
    names = [n for n, _, _ in tensors]
    ours = dump(str(path), names, tmp_path / "out")
    seen = set()
    for n in names:
        tt, ref = oracle(reader, n)
        seen.add(tt)
        check_same(ours[n], ref, n)
    assert seen == {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K}


def test_dequant_is_not_vacuous(tmp_path):
    """The comparison can fail: flipping one byte of a Q4_K block changes our output vs the original oracle."""
    rng = np.random.default_rng(7)
    raw = random_k_blocks(rng, T.Q4_K, 1, 1)
    ref = gguf.quants.dequantize(raw, T.Q4_K).reshape(1, 256)
    raw2 = raw.copy()
    raw2[0, 16] ^= 0xFF  # first quant byte
    path = tmp_path / "flip.gguf"
    write_gguf(path, [("t", raw2, T.Q4_K)])
    ours = dump(str(path), ["t"], tmp_path / "o")["t"]
    assert not np.array_equal(ours, ref)
