"""scripts/plot-metrics draws PNGs from a metrics.jsonl in the format distill/metrics.c writes."""
import json
import math
import pathlib
import shutil
import struct
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "plot-metrics"

pytestmark = pytest.mark.skipif(shutil.which("gnuplot") is None, reason="gnuplot not installed")


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def write_run(d, stages):
    with open(d / "metrics.jsonl", "w") as f:
        for si, (name, n) in enumerate(stages):
            for s in range(1, n + 1):
                ce = 3.0 * math.exp(-s / 30) + 1.0
                row = {"stage_index": si, "stage": name, "step": s, "total_steps": n,
                       "loss": None if s == 7 else ce + 0.1, "parts": {"ce": ce, "kl": 1.0},
                       "lr": 1e-4, "grad_norm": 1.5, "tokens": 100, "tokens_per_s": 50.0,
                       "skipped": s == 7, "elapsed_s": s, "time": 1.7e9}
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
            f.write(json.dumps({"event": "stage_end", "stage_index": si}) + "\n")
        f.write('{"stage_index":1,"stage":"sft","step":99,"lo')  # a torn last line is ignored


def test_draws_every_stage(tmp_path):
    write_run(tmp_path, [("layerwise", 40), ("sft", 25)])
    r = subprocess.run([str(SCRIPT), str(tmp_path), "--smooth", "5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert png_size(tmp_path / "loss.png") == (1200, 600)
    assert png_size(tmp_path / "metrics-00-layerwise.png") == (1200, 900)
    assert png_size(tmp_path / "metrics-01-sft.png") == (1200, 900)
    assert "2 stage image" in r.stdout


def test_out_dir_and_errors(tmp_path):
    write_run(tmp_path, [("distill", 3)])
    out = tmp_path / "plots"
    r = subprocess.run([str(SCRIPT), str(tmp_path / "metrics.jsonl"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "metrics-00-distill.png").exists()
    r = subprocess.run([str(SCRIPT), str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 3 and "no such file" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"event":"run_start"}\n')
    r = subprocess.run([str(SCRIPT), str(empty)], capture_output=True, text=True)
    assert r.returncode == 3 and "no step rows" in r.stderr
    r = subprocess.run([str(SCRIPT), str(tmp_path), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2


def test_xz_reads_like_plain(tmp_path):
    # docs/results keeps metrics.jsonl.xz: the same rows give the same images, titled after the run directory
    plain, packed = tmp_path / "plain-run", tmp_path / "packed-run"
    plain.mkdir(), packed.mkdir()
    write_run(plain, [("distill", 30)])
    write_run(packed, [("distill", 30)])
    subprocess.run(["xz", str(packed / "metrics.jsonl")], check=True)
    assert not (packed / "metrics.jsonl").exists()
    for d in (plain, packed):
        r = subprocess.run([str(SCRIPT), str(d)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (plain / "metrics-00-distill.png").read_bytes() == (packed / "metrics-00-distill.png").read_bytes()
    assert png_size(packed / "loss.png") == (1200, 600)
    (tmp_path / "bad.jsonl.xz").write_text("not xz")
    r = subprocess.run([str(SCRIPT), str(tmp_path / "bad.jsonl.xz"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 3 and "not an xz file" in r.stderr
