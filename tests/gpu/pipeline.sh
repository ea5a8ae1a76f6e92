#!/usr/bin/env bash
# tests/gpu/pipeline.sh DISTILL OUT: the training pipeline on CUDA (needs a GPU, the SmolLM2 teacher and
# python3; scripts/gpu-pass-pipeline runs it on the device machine). With tests/recipes/gpu-parity.toml
# (init, stepwise layerwise CE+KL, teacher-forced MSE alignment, end-to-end KL over every parameter, DPO,
# export):
#   1. a CUDA run finishes and exports;
#   2. a second CUDA run gives every step's loss bit for bit (determinism);
#   3. the CPU reference (fp32) gives every step's loss within 3% (bf16 compute on the GPU);
#   4. a CUDA run killed after 4 steps of the first training loop (no checkpoint of step 4) and resumed
#      gives the uninterrupted run's losses bit for bit (exact resume: weights, AdamW moments on the
#      device, data position).
#   5. with 2 GPUs (nvidia-smi lists >= 2): the same global batch over 2 ranks (NCCL all-reduce, ZeRO-0,
#      launched by scripts/launch-local) gives the 1-GPU losses within 1e-3, and two 2-GPU runs agree bit
#      for bit.
# PIPELINE_PARTS picks checks (default "a b cpu resume gpu2"; a = the reference CUDA run, which the others
# compare with). Prints "N passed, N failed"; exit status 1 on any failure.
set -u
D=${1:?usage: pipeline.sh DISTILL OUT}
OUT=${2:?usage: pipeline.sh DISTILL OUT}
R=tests/recipes/gpu-parity.toml
RUNS=checkpoints/test-runs
HERE=$(dirname "$0")
pass=0 fail=0
mkdir -p "$OUT"
ok() { echo "  ok   $*"; pass=$((pass + 1)); }
bad() { echo "  FAIL $*"; fail=$((fail + 1)); }
run() {  # run NAME [args...]: a fresh run; its log in OUT/NAME.log; returns distill's status
    local name=$1
    shift
    rm -rf "${RUNS:?}/$name"
    local t0=$(date +%s)
    "$D" "$R" --set "run.name=$name" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "  ($name: exit $rc, $(( $(date +%s) - t0 )) s)"
    return $rc
}
metrics() { cp "$RUNS/$1/metrics.jsonl" "$OUT/$1.metrics.jsonl" 2>/dev/null; echo "$RUNS/$1/metrics.jsonl"; }

PARTS=" ${PIPELINE_PARTS:-a b cpu resume gpu2} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
if part a && run cuda-a && [ -f "$RUNS/cuda-a/export/config.json" ]; then ok "CUDA run finished and exported"; else bad "CUDA run (see $OUT/cuda-a.log)"; tail -20 "$OUT/cuda-a.log"; fi
grep -E "GPU memory of this loop|finished in" "$OUT/cuda-a.log" | head -20
if ! part b; then :
elif run cuda-b; then
    python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cuda-b)" --exact && ok "two CUDA runs: identical losses" || bad "two CUDA runs differ"
else bad "second CUDA run"; fi
if ! part cpu; then :
elif run cpu --set run.device=cpu; then
    python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cpu)" --rel 0.03 && ok "CUDA (bf16) vs CPU (fp32) losses within 3%" || bad "CUDA vs CPU losses"
else bad "CPU run (see $OUT/cpu.log)"; tail -20 "$OUT/cpu.log"; fi
if part resume; then
DISTILL_TEST_STOP_AFTER=4 run cuda-r
"$D" "$R" --set run.name=cuda-r --resume "$RUNS/cuda-r" > "$OUT/cuda-r.resume.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
    python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cuda-r)" --exact && ok "kill after step 4 + resume: identical losses" || bad "resumed run differs"
else bad "resume exit $rc (see $OUT/cuda-r.resume.log)"; tail -20 "$OUT/cuda-r.resume.log"; fi
fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if ! part gpu2; then :
elif [ "${ngpu:-0}" -ge 2 ]; then
    # global batch as the 1-GPU run: 2 rows x 1 micro-batch x 2 ranks (layerwise, distill; DPO runs on rank 0)
    two=(--set hardware.gpus=2 --set optimizer.grad_accum=1)
    for name in gpu2-a gpu2-b; do
        rm -rf "${RUNS:?}/$name"
        t0=$(date +%s)
        scripts/launch-local -n 2 "$D" "$R" --set "run.name=$name" "${two[@]}" > "$OUT/$name.log" 2>&1
        rc=$?
        echo "  ($name: exit $rc, $(( $(date +%s) - t0 )) s)"
        [ $rc -eq 0 ] || { bad "2-GPU run $name (see $OUT/$name.log)"; tail -20 "$OUT/$name.log"; }
    done
    python3 "$HERE/check_metrics.py" "$(metrics gpu2-a)" "$(metrics gpu2-b)" --exact && ok "two 2-GPU runs: identical losses" || bad "two 2-GPU runs differ"
    python3 "$HERE/check_metrics.py" "$(metrics gpu2-a)" "$(metrics cuda-a)" --rel 1e-3 && ok "2 GPUs vs 1 GPU (same global batch): losses within 1e-3" || bad "2 GPUs vs 1 GPU"
    grep -E "data parallel|tok/s" "$OUT/gpu2-a.log" | head -6
else
    echo "  (one GPU: the 2-GPU checks need nvidia-smi to list 2)"
fi
echo "pipeline.sh: $pass passed, $fail failed"
[ $fail -eq 0 ]
