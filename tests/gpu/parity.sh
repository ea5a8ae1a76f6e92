#!/usr/bin/env bash
# tests/gpu/parity.sh [DISTILL [OUT]]: `distill parity` (CUDA against the CPU reference, every gradient of one
# batch, then a few AdamW steps) on the real SmolLM2 teacher and the 50% hybrid the recipes train, with the
# loss of each stage: distill (KL only, every tensor), DPO (row-weighted CE), layerwise (CE + 0.1 KL, Mamba
# mixers only). The freshly initialized hybrid's gradient is ill-conditioned (rounding the weights to bf16
# moves the CPU's own gradient by 20-180% per kind of tensor), so those runs judge CUDA against that floor
# (--floor); the teacher (every tensor trained: embeddings tied at vocabulary 49152, norms, attention, MLP)
# is well conditioned and is held to the plain bf16 tolerance. Each log goes to OUT/parity-NAME.log.
set -u
D=${1:-build/distill}
OUT=${2:-out}
mkdir -p "$OUT"
T=checkpoints/teachers/SmolLM2-135M-Instruct.Q4_1.gguf
hybrid=("$T" --attn-layers odd --text data/heldout.txt --batch 2 --seq 256 --floor)
teacher=("$T" --text data/heldout.txt --batch 2 --seq 256)
rc=0
one() {
    local name=$1
    shift
    echo "== parity $name: $*"
    DISTILL_PARITY_ALL=1 timeout "${PARITY_TIMEOUT:-240}" "$D" parity "$@" > "$OUT/parity-$name.log" 2>&1 || rc=1
    grep -E "^(cpu|cuda|loss rel)|over tol|worst|^parity" "$OUT/parity-$name.log" | grep -v "^parity: /" | head -30
    sed -n '/^  kind  /,/all trained/p' "$OUT/parity-$name.log"
}
one teacher-fp32 "${teacher[@]}" --ce 1 --fp32 --steps 5
one teacher-ce "${teacher[@]}" --ce 1
one teacher-dpo "${teacher[@]}" --ce 1 --row-weights 1,-0.5
one hybrid-kl "${hybrid[@]}" --ce 0 --kl 1
one hybrid-dpo "${hybrid[@]}" --ce 1 --row-weights 1,-0.5
one hybrid-layerwise "${hybrid[@]}" --ce 1 --kl 0.1 --train '*.mamba.*'
exit $rc
