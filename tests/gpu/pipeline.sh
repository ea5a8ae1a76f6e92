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
#   5. gpu2 (2 GPUs, nvidia-smi lists >= 2; tests/recipes/gpu-dp.toml, launched by scripts/launch-local):
#      the same global batch on 1 GPU and over 2 (ZeRO-0: NCCL all-reduce); ZeRO-1 and ZeRO-2 (reductions
#      onto each slice's owner, sharded AdamW, broadcast of the updated master) vs ZeRO-0; ZeRO-2
#      accumulating 2 micro-batches of 1 row per GPU vs ZeRO-0; one optimizer shard file per rank. Each
#      comparison reports "identical" or "within 1e-3 (not bitwise)"; beyond 1e-3 fails.
#      With DISTILL_DP_OVERLAP=1 (reductions overlapped with the backward) ZeRO-0, ZeRO-1 and ZeRO-2 (2
#      micro-batches) must give the unoverlapped runs' losses bit for bit.
#   6. gpu2resume (2 GPUs): a ZeRO-2 run stopped after step 4 and resumed on 2 GPUs gives the
#      uninterrupted run's losses bit for bit; saved on 2 GPUs (ZeRO-1) and resumed on 1, and saved on 1
#      and resumed on 2 (ZeRO-2), vs the uninterrupted run on the new GPU count (layerwise stage: identical
#      or within 1e-3). Uses gpu2's runs when the same pass made them.
#      (gpu-dp.toml's epoch must hold every step of a stage: the loader drops a partial last global batch,
#      whose size follows micro_batch x GPUs, so crossing an epoch gives 1 and 2 GPUs different data.)
#   7. m16: AdamW moments in bf16 with stochastic rounding: a run exports, a second run and a run killed after
#      4 steps and resumed give its losses bit for bit (its losses beside the fp32-moment run's: printed, not judged).
#   8. spike: a loss spike made to order in the distill stage (DISTILL_TEST_SPIKE=distill:4-5:2: steps 4 and 5
#      skipped) rolls back to its step-3 checkpoint on the GPU (weights and AdamW state reloaded onto the device,
#      half the learning rate), finishes and exports; a second such run gives its losses bit for bit.
# PIPELINE_PARTS picks checks (default "a b cpu resume m16 spike gpu2 gpu2resume"; a = the reference CUDA run, which b,
# cpu and resume compare with). Prints "N passed, N failed"; exit status 1 on any failure.
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

PARTS=" ${PIPELINE_PARTS:-a b cpu resume m16 spike gpu2 gpu2resume} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
if part a; then
    if run cuda-a && [ -f "$RUNS/cuda-a/export/config.json" ]; then ok "CUDA run finished and exported"
    else bad "CUDA run (see $OUT/cuda-a.log)"; tail -20 "$OUT/cuda-a.log"; fi
    grep -E "GPU memory of this loop|finished in" "$OUT/cuda-a.log" | head -20
fi
if ! part b; then :
elif run cuda-b; then
    python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cuda-b)" --exact && ok "two CUDA runs: identical losses" || bad "two CUDA runs differ"
else bad "second CUDA run"; fi
if ! part cpu; then :
elif run cpu --set run.device=cpu; then
    # bf16 vs fp32 from the same start: the first step (before any update) must agree; after it the trajectories
    # of this ill-conditioned model drift apart (docs/BENCHMARKS.md, "Gradient parity on the real model"), so the
    # whole run is printed, not judged. `distill parity` (tests/gpu/parity.sh) checks every gradient instead.
    python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cpu)" --rel 0.01 --stages layerwise-1 --steps 1 \
        && ok "CUDA (bf16) vs CPU (fp32): first step's loss within 1%" || bad "CUDA vs CPU first step"
    python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cpu)" --rel 0.03 | sed 's/^FAIL/(info)/' 
else bad "CPU run (see $OUT/cpu.log)"; tail -20 "$OUT/cpu.log"; fi
if part resume; then
DISTILL_TEST_STOP_AFTER=4 run cuda-r
"$D" "$R" --set run.name=cuda-r --resume "$RUNS/cuda-r" > "$OUT/cuda-r.resume.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
    python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cuda-r)" --exact && ok "kill after step 4 + resume: identical losses" || bad "resumed run differs"
else bad "resume exit $rc (see $OUT/cuda-r.resume.log)"; tail -20 "$OUT/cuda-r.resume.log"; fi
fi
if part m16; then
# AdamW moments in bf16 with stochastic rounding (optimizer.moments = "bf16"): the rounding draws its bits from the
# step and the element's index, so two runs and a killed-and-resumed run must still give the same losses bit for bit
M16="--set optimizer.moments=bf16"
if run cuda-m16 $M16 && [ -f "$RUNS/cuda-m16/export/config.json" ]; then
    ok "bf16 moments: CUDA run finished and exported"
    grep -E "GPU memory of this loop" "$OUT/cuda-m16.log" | head -3
    [ -f "$RUNS/cuda-a/metrics.jsonl" ] && python3 "$HERE/check_metrics.py" "$(metrics cuda-a)" "$(metrics cuda-m16)" --rel 0.03 | sed 's/^FAIL/(info)/'
    if run cuda-m16b $M16; then
        python3 "$HERE/check_metrics.py" "$(metrics cuda-m16)" "$(metrics cuda-m16b)" --exact && ok "bf16 moments: two runs identical" || bad "bf16 moments: two runs differ"
    else bad "bf16 moments: second run (see $OUT/cuda-m16b.log)"; fi
    DISTILL_TEST_STOP_AFTER=4 run cuda-m16r $M16
    if "$D" "$R" --set run.name=cuda-m16r $M16 --resume "$RUNS/cuda-m16r" > "$OUT/cuda-m16r.resume.log" 2>&1; then
        python3 "$HERE/check_metrics.py" "$(metrics cuda-m16)" "$(metrics cuda-m16r)" --exact && ok "bf16 moments: kill after step 4 + resume identical" || bad "bf16 moments: resumed run differs"
    else bad "bf16 moments: resume (see $OUT/cuda-m16r.resume.log)"; tail -20 "$OUT/cuda-m16r.resume.log"; fi
else bad "bf16 moments: CUDA run (see $OUT/cuda-m16.log)"; tail -20 "$OUT/cuda-m16.log"; fi
fi
if part spike; then
SPIKE=distill:4-5:2
if DISTILL_TEST_SPIKE=$SPIKE run cuda-sp && [ -f "$RUNS/cuda-sp/export/config.json" ] && grep -q "loss spike: rollback 1 of 2" "$OUT/cuda-sp.log"; then
    ok "loss spike: rolled back on the GPU, finished and exported"
    grep -E "loss spike" "$OUT/cuda-sp.log" | head -2
    if DISTILL_TEST_SPIKE=$SPIKE run cuda-sp2; then
        python3 "$HERE/check_metrics.py" "$(metrics cuda-sp)" "$(metrics cuda-sp2)" --exact && ok "loss spike: two runs identical" || bad "loss spike: two runs differ"
    else bad "loss spike: second run (see $OUT/cuda-sp2.log)"; fi
else bad "loss spike run (see $OUT/cuda-sp.log)"; tail -20 "$OUT/cuda-sp.log"; fi
fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
# ---- 2 GPUs (tests/recipes/gpu-dp.toml: layerwise with the Mamba mixers trained, then KL over every parameter;
# global batch 4 rows: 2 x 2 on 1 GPU, 2 x 1 or 1 x 2 per GPU on 2)
DR=tests/recipes/gpu-dp.toml
rundp() {  # rundp NAME NPROC [args...]: a fresh gpu-dp run on NPROC GPUs (scripts/launch-local); log OUT/NAME.log
    local name=$1 np=$2
    shift 2
    rm -rf "${RUNS:?}/$name"
    local t0=$(date +%s) rc
    if [ "$np" -gt 1 ]; then
        scripts/launch-local -n "$np" "$D" "$DR" --set "run.name=$name" --set hardware.gpus="$np" "$@" > "$OUT/$name.log" 2>&1
    else
        "$D" "$DR" --set "run.name=$name" "$@" > "$OUT/$name.log" 2>&1
    fi
    rc=$?
    echo "  ($name on $np GPU(s): exit $rc, $(( $(date +%s) - t0 )) s)"
    return $rc
}
resumedp() {  # resumedp NAME NPROC [args...]: --resume of run NAME on NPROC GPUs; log OUT/NAME.resume.log
    local name=$1 np=$2
    shift 2
    local t0=$(date +%s) rc
    if [ "$np" -gt 1 ]; then
        scripts/launch-local -n "$np" "$D" "$DR" --set "run.name=$name" --set hardware.gpus="$np" "$@" --resume "$RUNS/$name" > "$OUT/$name.resume.log" 2>&1
    else
        "$D" "$DR" --set "run.name=$name" --set hardware.gpus=1 "$@" --resume "$RUNS/$name" > "$OUT/$name.resume.log" 2>&1
    fi
    rc=$?
    echo "  ($name resumed on $np GPU(s): exit $rc, $(( $(date +%s) - t0 )) s)"
    [ $rc -eq 0 ] || { bad "resume of $name on $np GPU(s) (see $OUT/$name.resume.log)"; tail -20 "$OUT/$name.resume.log"; }
    return $rc
}
have() { [ -f "$RUNS/$1/metrics.jsonl" ] && grep -q '"loss"' "$RUNS/$1/metrics.jsonl"; }
need() {  # need NAME NPROC [args...]: the run unless an earlier part of this pass made it
    have "$1" && return 0
    rundp "$@" || { bad "run $1 (see $OUT/$1.log)"; tail -20 "$OUT/$1.log"; return 1; }
}
same() {  # same A B WHAT [check_metrics options]: losses identical, or at least within bf16 tolerance (1e-3)
    if python3 "$HERE/check_metrics.py" "$(metrics "$1")" "$(metrics "$2")" --exact "${@:4}"; then ok "$3: identical losses"
    elif python3 "$HERE/check_metrics.py" "$(metrics "$1")" "$(metrics "$2")" --rel 1e-3 "${@:4}"; then ok "$3: losses within 1e-3 (not bitwise)"
    else bad "$3"; fi
}
one=(--set optimizer.grad_accum=1)   # 2 rows x 1 micro-batch per GPU
acc=(--set optimizer.micro_batch=1)  # 1 row x 2 micro-batches per GPU (ZeRO-2 reduces after each)
if [ "${ngpu:-0}" -lt 2 ]; then
    part gpu2 || part gpu2resume && echo "  (one GPU: the 2-GPU checks need nvidia-smi to list 2)"
else
    if part gpu2; then
        need dp1 1
        need dp2-z0 2 "${one[@]}" --set hardware.zero=0 && same dp2-z0 dp1 "2 GPUs ZeRO-0 vs 1 GPU (same global batch)"
        need dp2-z1 2 "${one[@]}" --set hardware.zero=1 && same dp2-z1 dp2-z0 "2 GPUs ZeRO-1 vs ZeRO-0"
        need dp2-z2 2 "${one[@]}" --set hardware.zero=2 && same dp2-z2 dp2-z0 "2 GPUs ZeRO-2 vs ZeRO-0"
        # Other micro-batch shapes run other GEMM shapes (other rounding); this model's gradient is ill-conditioned
        # (docs/BENCHMARKS.md, "Gradient parity on the real model"), so later steps drift by a few % (2e-2 / 4.7e-2
        # by steps 4-6 on 2 x H200 at 68a5aa8): only the first stage's first step, before any update, must agree.
        need dp2-z2a 2 "${acc[@]}" --set hardware.zero=2 && same dp2-z2a dp2-z0 "2 GPUs ZeRO-2 with 2 micro-batches of 1 row vs ZeRO-0 (first step)" --stages layerwise --steps 1
        # overlap (DISTILL_DP_OVERLAP=1: each bucket's reduction on NCCL's stream as soon as the backward finished it):
        # the same operations bucket by bucket, so with 2 GPUs the unoverlapped losses bit for bit (ZeRO-0 and 1:
        # after the last micro-batch; ZeRO-2 with 2 micro-batches: after each)
        for spec in "dp2-z0 0 one" "dp2-z1 1 one" "dp2-z2a 2 acc"; do
            read -r nm z mode <<< "$spec"
            if [ "$mode" = one ]; then args=("${one[@]}"); else args=("${acc[@]}"); fi
            if need "$nm" 2 "${args[@]}" --set hardware.zero="$z"; then
                export DISTILL_DP_OVERLAP=1
                need "$nm-ov" 2 "${args[@]}" --set hardware.zero="$z"
                unset DISTILL_DP_OVERLAP
                if ! grep -q "overlapped with the backward" "$OUT/$nm-ov.log" 2>/dev/null; then bad "ZeRO-$z overlap run: no overlap line in its log"
                elif python3 "$HERE/check_metrics.py" "$(metrics "$nm-ov")" "$(metrics "$nm")" --exact; then ok "2 GPUs ZeRO-$z ($mode) overlapped vs not: identical losses"
                else bad "2 GPUs ZeRO-$z ($mode) overlapped vs not: losses differ"; fi
            fi
        done
        # ZeRO-2 staged gradient memory (DISTILL_DP_STAGE_GRADS=1: only the owned slices and K staging slots have
        # memory): the same losses bit for bit, and less gradient memory in the loop's memory line
        if need dp2-z2a 2 "${acc[@]}" --set hardware.zero=2; then
            export DISTILL_DP_STAGE_GRADS=1
            need dp2-z2a-st 2 "${acc[@]}" --set hardware.zero=2
            unset DISTILL_DP_STAGE_GRADS
            if ! grep -q "ZeRO-2 staged gradients" "$OUT/dp2-z2a-st.log" 2>/dev/null; then bad "ZeRO-2 staged run: no staging line in its log"
            elif python3 "$HERE/check_metrics.py" "$(metrics dp2-z2a-st)" "$(metrics dp2-z2a)" --exact; then ok "2 GPUs ZeRO-2 staged gradients vs whole: identical losses"
            else bad "2 GPUs ZeRO-2 staged gradients vs whole: losses differ"; fi
            grep -hE "staged gradients|GPU memory of this loop" "$OUT/dp2-z2a-st.log" "$OUT/dp2-z2a.log" | sed 's/^\[[0-9]\] //' | head -6
        fi
        # ZeRO-1/2 checkpoints: one optimizer file per rank next to rank 0's main file (in each stage's folder)
        n=$(ls "$RUNS"/dp2-z1/*/shards/*/rank-0000[01]-of-00002.h5 2>/dev/null | wc -l)
        [ "$n" -ge 2 ] && ok "ZeRO-1 checkpoint: a shard file per rank ($n files kept)" || bad "ZeRO-1 shard files missing ($n)"
        for name in dp1 dp2-z0 dp2-z1 dp2-z2; do
            echo "  $name: $(grep -hE "GPU memory of this loop" "$OUT/$name.log" | sed 's/^\[[0-9]\] //' | tr '\n' ' ')"
        done
        grep -hE "data parallel over" "$OUT/dp2-z1.log" | head -2
    fi
    if part gpu2resume; then
        # kill and resume on 2 GPUs (ZeRO-2, 2 micro-batches per GPU): stopped after 4 layerwise steps, without
        # a checkpoint of step 4 (the last is step 3), resumed: the uninterrupted run's losses bit for bit
        if need dp2-z2a 2 "${acc[@]}" --set hardware.zero=2; then
            DISTILL_TEST_STOP_AFTER=4 rundp dp2-z2r 2 "${acc[@]}" --set hardware.zero=2
            resumedp dp2-z2r 2 "${acc[@]}" --set hardware.zero=2 &&
                { python3 "$HERE/check_metrics.py" "$(metrics dp2-z2a)" "$(metrics dp2-z2r)" --exact && ok "2 GPUs killed after step 4 + resumed: identical losses" || bad "2-GPU resume differs"; }
        fi
        # 2 -> 1: ZeRO-1 on 2 GPUs stopped after 4 layerwise steps, resumed on 1 GPU (the checkpoint's global
        # batch: 2 micro-batches; re-sharded moments). Compared over the layerwise stage only: a stage that
        # STARTS after the resume takes the recipe's per-GPU batch, so its global batch follows the GPU count.
        if need dp2-z1 2 "${one[@]}" --set hardware.zero=1; then
            DISTILL_TEST_STOP_AFTER=4 rundp dp21 2 "${one[@]}" --set hardware.zero=1
            resumedp dp21 1 "${one[@]}" --set hardware.zero=1 &&
                same dp21 dp2-z1 "saved on 2 GPUs (ZeRO-1), resumed on 1 (layerwise)" --stages layerwise
        fi
        # 1 -> 2: 1 GPU stopped after 4 layerwise steps, resumed on 2 GPUs with ZeRO-2 (1 micro-batch of 2 rows each)
        if need dp1 1; then
            DISTILL_TEST_STOP_AFTER=4 rundp dp12 1 --set hardware.zero=2
            resumedp dp12 2 --set hardware.zero=2 && same dp12 dp1 "saved on 1 GPU, resumed on 2 (ZeRO-2; layerwise)" --stages layerwise
        fi
    fi
fi
echo "pipeline.sh: $pass passed, $fail failed"
[ $fail -eq 0 ]
