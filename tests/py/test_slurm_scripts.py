"""scripts/slurm: the sbatch body's control flow with stand-ins for srun, scontrol and scancel (no SLURM here):
first start vs --resume, USR1 before the time limit -> SIGINT to the tasks (checkpoint) -> requeue, a failed
run requeued up to MAX_RESTARTS, bad input not requeued."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: skip options, run the program once (as task 0), forwarding SIGINT like a job step would get it
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
echo "srun $*" >> "$LOG"
# a background job of a script starts with SIGINT ignored; slurmstepd-launched tasks do not: restore it
python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' "$@" &
echo $! > "$PIDFILE"
wait $!; rc=$?
while kill -0 $(cat "$PIDFILE") 2>/dev/null; do wait $(cat "$PIDFILE"); rc=$?; done
exit $rc
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$LOG"
kill -INT $(cat "$PIDFILE")
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$LOG"
"""
FAKE_DISTILL = """#!/usr/bin/env bash
echo "distill $*" >> "$LOG"
echo "rdzv=${DISTILL_RDZV:-}:${DISTILL_RDZV_FILE:-}" >> "$LOG"
case "$FAKE_MODE" in
  ok) exit 0 ;;
  fail) exit 1 ;;
  input) exit 3 ;;
  wait) trap 'echo "distill got SIGINT: checkpoint" >> "$LOG"; exit 4' INT
        touch "$READY"; for i in $(seq 300); do sleep 0.1; done; exit 0 ;;
esac
"""


def setup(tmp_path):
    b = tmp_path / "bin"
    b.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL), ("distill", FAKE_DISTILL)]:
        p = b / name
        p.write_text(text)
        p.chmod(0o755)
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("SLURM_") or k in ("RECIPE", "RUN_NAME", "EXTRA", "RDZV"):
            del env[k]
    env.update(PATH=f"{b}:{env['PATH']}", LOG=str(tmp_path / "log"), PIDFILE=str(tmp_path / "pid"),
               READY=str(tmp_path / "ready"), SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242", SLURM_NTASKS="8",
               RECIPE="recipes/quickstart.toml", DISTILL=str(b / "distill"), OUTPUT_DIR=str(tmp_path / "out"))
    return env


def log(tmp_path):
    p = tmp_path / "log"
    return p.read_text() if p.exists() else ""


def run(env, script="distill-1node.sbatch", timeout=60):
    return subprocess.run(["bash", str(ROOT / "scripts/slurm" / script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_first_start_then_resume(tmp_path):
    env = setup(tmp_path)
    env["FAKE_MODE"] = "ok"
    r = run(env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = log(tmp_path)
    assert "--set run.name=quickstart" in lines and "--set hardware.gpus=8" in lines and "--resume" not in lines
    assert "scontrol" not in lines
    run_dir = tmp_path / "out" / "quickstart"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.resolved.toml").write_text("[run]\n")
    env["SLURM_RESTART_COUNT"] = "1"
    r = run(env, "distill-nnodes.sbatch")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"--resume {run_dir}" in log(tmp_path)
    assert "resuming" in r.stdout


def test_usr1_checkpoints_and_requeues(tmp_path):
    env = setup(tmp_path)
    env["FAKE_MODE"] = "wait"
    p = subprocess.Popen(["bash", str(ROOT / "scripts/slurm/distill-1node.sbatch")], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (tmp_path / "ready").exists():
        assert time.time() - t0 < 20 and p.poll() is None, "the task never started"
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
    out, _ = p.communicate(timeout=30)
    lines = log(tmp_path)
    assert p.returncode == 0, out
    assert "scancel --signal=INT 4242" in lines
    assert "distill got SIGINT: checkpoint" in lines
    assert "scontrol requeue 4242" in lines
    # the requeue comes after the task stopped
    assert lines.index("distill got SIGINT") < lines.index("scontrol requeue")


@pytest.mark.parametrize("restart,requeue", [("0", True), ("3", False)])
def test_failed_run_requeued_up_to_max(tmp_path, restart, requeue):
    env = setup(tmp_path)
    env.update(FAKE_MODE="fail", SLURM_RESTART_COUNT=restart, MAX_RESTARTS="3")
    r = run(env)
    assert ("scontrol requeue 4242" in log(tmp_path)) == requeue
    assert r.returncode == (0 if requeue else 1), r.stdout + r.stderr


def test_bad_input_not_requeued(tmp_path):
    env = setup(tmp_path)
    env["FAKE_MODE"] = "input"
    r = run(env)
    assert r.returncode == 3
    assert "scontrol" not in log(tmp_path)


def test_file_rendezvous_and_missing_recipe(tmp_path):
    env = setup(tmp_path)
    env.update(FAKE_MODE="ok", RDZV="file", SLURM_RESTART_COUNT="2")
    r = run(env)
    assert r.returncode == 0
    assert f"rdzv=file:{tmp_path}/out/quickstart/.rendezvous-4242-2" in log(tmp_path)
    env["RECIPE"] = "recipes/no-such.toml"
    r = run(env)
    assert r.returncode == 2 and "not found" in r.stderr
