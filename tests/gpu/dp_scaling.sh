#!/usr/bin/env bash
# tests/gpu/dp_scaling.sh [BUILD] [gpu_bench_dp options]: data-parallel scaling 1 -> 2 GPUs of the 8B-shaped
# stage-1 step (issue 8, goal >= 90%): build/gpu_bench_dp on 1 GPU, then on 2 (scripts/launch-local) at ZeRO-0,
# 1 and 2, the same per-GPU batch, each without and with --overlap (the bucket reductions during the backward).
# Prints each RESULT_DP line and
#   SCALING zero=Z overlap=O tokens_per_s_1gpu=... tokens_per_s_2gpu=... efficiency=E
# with E = tokens/s on 2 GPUs / (2 x tokens/s on 1), and per stage
#   OVERLAP zero=Z identical (N steps)    or    OVERLAP zero=Z DIFFERENT: <first differing step lines>
# comparing rank 0's per-step loss and gradient norm (17 digits) of the runs without and with overlap: with 2
# GPUs they must be identical (train_model.h: each element is a sum of two, whatever the grouping). Default
# options: --layers 32 --B 2 --T 2048 --steps 6 --warmup 2 (the whole Llama-3-8B shape, 50% Mamba: 975M
# trained elements; ~65 GiB per GPU, so an H200; --layers 8 is gpu_bench_engine's case). ZEROS="0 1 2" picks
# the stages, OVERLAPS="0 1" the modes (default: 0 1, and at ZeRO-2 also s = --stage-grads, the staged gradient
# memory: "STAGED zero=2 identical" likewise, and its MEMORY_DP line against the unstaged run's). Exit status 1 if a
# run fails or overlap / staging changes a number (not if E < 0.9: a benchmark).
set -u
BUILD=${1:-build}
shift || true
opts=("$@")
[ ${#opts[@]} -gt 0 ] || opts=(--layers 32 --B 2 --T 2048 --steps 6 --warmup 2)
tps() { sed -n 's/.*RESULT_DP .*tokens_per_s=\([0-9.]*\).*/\1/p' | tail -1; }
steps() { sed 's/^\[0\] //' | sed -n 's/^ *\(step [0-9]*: loss [^,]*, grad norm [^ ]* ([^)]*)\).*/\1/p'; }
rc=0
out1=$(timeout 300 "$BUILD/gpu_bench_dp" "${opts[@]}" --zero 0 2>&1) || { echo "$out1" | tail -20; echo "1-GPU run failed"; exit 1; }
echo "$out1" | grep -E "gpu_bench_dp:|RESULT_DP|step [0-9]+:" | tail -4
t1=$(echo "$out1" | tps)
for z in ${ZEROS:-0 1 2}; do
    ref=""
    modes=${OVERLAPS:-0 1}
    [ "$z" = 2 ] && [ -z "${OVERLAPS:-}" ] && modes="0 1 s"
    for ov in $modes; do
        flag=()
        [ "$ov" = 1 ] && flag=(--overlap)
        [ "$ov" = s ] && flag=(--stage-grads)
        out2=$(timeout 300 scripts/launch-local -n 2 "$BUILD/gpu_bench_dp" "${opts[@]}" --zero "$z" "${flag[@]}" 2>&1) ||
            { echo "$out2" | tail -20; echo "2-GPU ZeRO-$z overlap=$ov run failed"; rc=1; continue; }
        echo "$out2" | grep -E "ZeRO-. plan|RESULT_DP|MEMORY_DP|step [0-9]+:" | sed 's/^\[0\] //' | tail -5
        t2=$(echo "$out2" | tps)
        python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'SCALING zero=$z overlap=$ov tokens_per_s_1gpu={a:.0f} tokens_per_s_2gpu={b:.0f} efficiency={b / (2 * a):.3f}')" "$t1" "$t2"
        s=$(echo "$out2" | steps)
        if [ "$ov" = 0 ]; then ref=$s; elif [ -n "$ref" ]; then
            what=OVERLAP
            [ "$ov" = s ] && what=STAGED
            if [ "$s" = "$ref" ] && [ -n "$s" ]; then echo "$what zero=$z identical ($(echo "$s" | wc -l) steps)"
            else echo "$what zero=$z DIFFERENT:"; diff <(echo "$ref") <(echo "$s") | head -6; rc=1; fi
        fi
    done
done
exit $rc
