#!/usr/bin/env bash
# tests/gpu/teacher_shard.sh BUILD OUT: the sharded teacher (recipe hardware.teacher = "sharded"; distill/teacher_shard.h,
# kernels/engine/teacher_shard.h) against the replicated one. Needs a GPU, python3, BUILD/distill,
# BUILD/gpu_test_teacher_shard and the SmolLM2 teacher (scripts/fetch-teacher). Parts (TSHARD_PARTS, default
# "gpu1 gpu2"; gpu2 runs only where nvidia-smi lists >= 2 GPUs):
#   gpu1  1. gpu_test_teacher_shard: simulated ranks (W = 1-4) on one GPU, bitwise outputs, errors; --bench: an
#            8B-shaped teacher's forward replicated vs sharded (RESULT_TSHARD_BENCH);
#         2. the pipeline on 1 GPU (tests/recipes/gpu-dp.toml: layerwise CE + 0.1 KL, then KL over every parameter)
#            with hardware.teacher = "sharded" vs the default: every step's loss bit for bit.
#   gpu2  3. scripts/launch-local -n 2 gpu_test_teacher_shard --nccl --bench: real ncclAllGather, bitwise per rank,
#            timing per rank;
#         4. the pipeline on 2 GPUs (ZeRO-1, 2 x 1 rows per GPU), sharded vs replicated teacher: every step's loss bit
#            for bit, and the teacher's GPU memory from each loop's "GPU memory of this loop" line (smaller sharded).
# Prints "N passed, N failed"; exit status 1 on any failure.
set -u
B=${1:?usage: teacher_shard.sh BUILD OUT}
OUT=${2:?usage: teacher_shard.sh BUILD OUT}
D=$B/distill
DR=tests/recipes/gpu-dp.toml
RUNS=checkpoints/test-runs
HERE=$(dirname "$0")
PARTS=" ${TSHARD_PARTS:-gpu1 gpu2} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
pass=0 fail=0
mkdir -p "$OUT"
ok() { echo "  ok   $*"; pass=$((pass + 1)); }
bad() { echo "  FAIL $*"; fail=$((fail + 1)); }
rundp() {  # rundp NAME NPROC [args...]: a fresh gpu-dp run; log OUT/NAME.log
    local name=$1 np=$2 rc t0=$(date +%s)
    shift 2
    rm -rf "${RUNS:?}/$name"
    if [ "$np" -gt 1 ]; then
        timeout 600 scripts/launch-local -n "$np" "$D" "$DR" --set "run.name=$name" --set hardware.gpus="$np" "$@" > "$OUT/$name.log" 2>&1
    else
        timeout 600 "$D" "$DR" --set "run.name=$name" "$@" > "$OUT/$name.log" 2>&1
    fi
    rc=$?
    echo "  ($name on $np GPU(s): exit $rc, $(( $(date +%s) - t0 )) s)"
    [ $rc -eq 0 ] || { bad "run $name (see $OUT/$name.log)"; tail -20 "$OUT/$name.log"; }
    cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
    return $rc
}
compare() {  # compare A B WHAT: every step's loss identical
    if python3 "$HERE/check_metrics.py" "$RUNS/$1/metrics.jsonl" "$RUNS/$2/metrics.jsonl" --exact; then ok "$3: identical losses"
    else bad "$3: losses differ"; fi
}
memline() { grep -hE "GPU memory of this loop|teacher shard:" "$OUT/$1.log" | sed 's/^\[[0-9]\] //' | head -4 | sed "s/^/    $1: /"; }

if part gpu1; then
    out=$(timeout 300 "$B/gpu_test_teacher_shard" --bench 2>&1)
    rc=$?
    echo "$out" | grep -E "FAIL|MB|RESULT_TSHARD|passed"
    [ $rc -eq 0 ] && ok "gpu_test_teacher_shard (simulated ranks on 1 GPU)" || { bad "gpu_test_teacher_shard (exit $rc)"; echo "$out" | tail -20; }
    if rundp ts1-rep 1 && rundp ts1-shard 1 --set hardware.teacher=sharded; then
        grep -q "teacher shard: rank 0 of 1" "$OUT/ts1-shard.log" && ok "1 GPU: the sharded teacher ran (its memory line)" ||
            bad "1 GPU: no 'teacher shard:' line in ts1-shard.log"
        compare ts1-shard ts1-rep "1 GPU: sharded (world 1) vs replicated teacher"
        memline ts1-rep
        memline ts1-shard
    fi
fi
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if part gpu2 && [ "${ngpu:-0}" -lt 2 ]; then
    echo "  (gpu2: one GPU here; the 2-GPU checks need nvidia-smi to list 2)"
elif part gpu2; then
    out=$(timeout 300 scripts/launch-local -n 2 "$B/gpu_test_teacher_shard" --nccl --bench 2>&1)
    rc=$?
    echo "$out" | grep -E "FAIL|RESULT_TSHARD|passed|teacher shard:"
    [ $rc -eq 0 ] && ok "gpu_test_teacher_shard --nccl on 2 GPUs" || { bad "gpu_test_teacher_shard --nccl (exit $rc)"; echo "$out" | tail -20; }
    one=(--set optimizer.grad_accum=1 --set hardware.zero=1)
    if rundp ts2-rep 2 "${one[@]}" && rundp ts2-shard 2 "${one[@]}" --set hardware.teacher=sharded; then
        compare ts2-shard ts2-rep "2 GPUs ZeRO-1: sharded vs replicated teacher"
        memline ts2-rep
        memline ts2-shard
        python3 - "$OUT/ts2-rep.log" "$OUT/ts2-shard.log" <<'EOF' && ok "2 GPUs: the sharded teacher takes less GPU memory" || bad "2 GPUs: teacher memory not smaller"
import re, sys
def teacher(path):
    v = [float(m) for m in re.findall(r"GPU memory of this loop: [0-9.]+ GiB \(student [0-9.]+, teacher ([0-9.]+)\)", open(path).read())]
    return v
a, b = teacher(sys.argv[1]), teacher(sys.argv[2])
print(f"    teacher GiB per loop, replicated {a}, sharded {b}")
sys.exit(0 if a and b and len(a) == len(b) and all(y < x for x, y in zip(a, b)) else 1)
EOF
    fi
fi
echo "teacher_shard.sh: $pass passed, $fail failed"
[ $fail -eq 0 ]
