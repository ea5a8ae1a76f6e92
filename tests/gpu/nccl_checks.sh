#!/usr/bin/env bash
# tests/gpu/nccl_checks.sh [BUILD]: the NCCL layer on 2 GPUs (tests/gpu_nccl_comm.c, scripts/launch-local):
# the ZeRO plan against simulated ranks, a stalled peer and a dead peer (every other rank aborts with a
# message instead of hanging), and the all-reduce bandwidth. Prints each run's tail; exit 1 if one failed.
set -u
BUILD=${1:-build}
rc=0
for mode in "" --stall --die --bench; do
    echo "== gpu_nccl_comm ${mode:-(plan)}"
    timeout 120 scripts/launch-local -n 2 --grace 20 "$BUILD/gpu_nccl_comm" $mode > /tmp/nccl_checks.log 2>&1
    r=$?
    tail -8 /tmp/nccl_checks.log
    echo "   exit $r"
    # --die: the last rank exits 1 by design; rank 0's lines above must name the aborted operation
    [ $r -eq 0 ] || [ "$mode" = --die ] || rc=1
done
exit $rc
