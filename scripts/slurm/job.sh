#!/usr/bin/env bash
# scripts/slurm/job.sh: the body shared by distill-1node.sbatch and distill-nnodes.sbatch (sourced by them;
# not submitted itself). One task per GPU through srun; requeue on preemption or time limit; resume.
#
# Settings (environment, or sbatch --export): RECIPE (required), DISTILL (binary, default build/distill),
# OUTPUT_DIR (default checkpoints), RUN_NAME (default: the recipe's file name), RDZV (tcp | file; default
# tcp), MAX_RESTARTS (requeues after a failed run, default 3), EXTRA (more distill arguments, e.g.
# "--set stage.layerwise.steps=100").
#
# Preemption / time limit: sbatch --signal=B:USR1@120 sends USR1 to this script 120 s before the end. The trap
# asks every task to stop (SIGINT: distill writes a checkpoint and exits with status 4), waits for them, and
# requeues the job. A requeued job (SLURM_RESTART_COUNT > 0) finds RUN_DIR/recipe.resolved.toml and passes
# --resume RUN_DIR. A run that fails (a rank died: every rank aborts through NCCL's watchdog, status 1) is
# requeued too, up to MAX_RESTARTS times, and resumes from its last complete checkpoint.
set -uo pipefail

: "${RECIPE:?set RECIPE=recipes/....toml (sbatch --export=ALL,RECIPE=...)}"
DISTILL=${DISTILL:-build/distill}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints}
RUN_NAME=${RUN_NAME:-$(basename "$RECIPE" .toml)}
RUN_DIR="$OUTPUT_DIR/$RUN_NAME"
RDZV=${RDZV:-tcp}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RESTART=${SLURM_RESTART_COUNT:-0}

[ -x "$DISTILL" ] || { echo "job.sh: $DISTILL is not an executable (build first: cmake --build build)" >&2; exit 2; }
[ -f "$RECIPE" ] || { echo "job.sh: recipe $RECIPE not found (submit from the repository root)" >&2; exit 2; }

# NCCL: NVLink multicast off (distill sets it too unless set); for IB clusters pick the interfaces here
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# export NCCL_SOCKET_IFNAME=ib0   NCCL_IB_HCA=mlx5   NCCL_DEBUG=INFO   (site-specific)

# The process group: distill reads SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; rank 0's address is
# the first node of the job, the port 20000 + job id % 20000 (override with MASTER_ADDR / MASTER_PORT).
# The job key includes SLURM_RESTART_COUNT, so ranks of a previous incarnation can never join this one.
if [ "$RDZV" = file ]; then
    mkdir -p "$RUN_DIR"
    export DISTILL_RDZV=file DISTILL_RDZV_FILE="$RUN_DIR/.rendezvous-$SLURM_JOB_ID-$RESTART"
fi

ARGS=("$RECIPE" --set "run.output_dir=$OUTPUT_DIR" --set "run.name=$RUN_NAME" --set "hardware.gpus=$SLURM_NTASKS")
if [ -f "$RUN_DIR/recipe.resolved.toml" ]; then
    ARGS+=(--resume "$RUN_DIR")
    echo "job.sh: resuming $RUN_DIR (restart $RESTART of job $SLURM_JOB_ID)"
else
    echo "job.sh: starting $RUN_DIR (job $SLURM_JOB_ID)"
fi
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && ARGS+=($EXTRA)

requeued=0
on_usr1() {
    echo "job.sh: $(date -u +%T) end of the allocation near: stopping the tasks (checkpoint), then requeueing"
    requeued=1
    scancel --signal=INT "$SLURM_JOB_ID"  # the job steps only, not this script
}
trap on_usr1 USR1

srun --kill-on-bad-exit=1 --cpu-bind=none --ntasks="$SLURM_NTASKS" "$DISTILL" "${ARGS[@]}" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives: wait again until srun has really finished
while :; do
    wait "$srun_pid"; rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
echo "job.sh: $(date -u +%T) srun exited with status $rc"

if [ "$requeued" = 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
case "$rc" in
    0) echo "job.sh: run complete" ;;
    2|3) echo "job.sh: bad command line or input (status $rc): not requeued" ;;
    *)
        if [ "$RESTART" -lt "$MAX_RESTARTS" ]; then
            echo "job.sh: run failed (status $rc); requeueing to resume from the last checkpoint ($((RESTART + 1))/$MAX_RESTARTS)"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "job.sh: run failed (status $rc) after $RESTART restarts: giving up" ;;
esac
exit "$rc"
