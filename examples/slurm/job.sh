#!/bin/bash
# The body of every sbatch script here (they exec it, so Slurm's signals reach this shell):
# the launcher on the first node of the allocation, resumed from the run's last checkpoint when
# there is one (a requeued job), stopped with a checkpoint on TERM, requeued on USR1 (the warning
# `--signal=B:USR1@120` sends before the time limit or a preemption).
#   RUN_DIR   on a filesystem every node sees; the same across requeues (SLURM_JOB_ID is kept)
#   CONFIG    the experiment YAML;  PYTHON  the project's interpreter;  extra arguments go to the launcher
set -uo pipefail
PROJECT=${BOBA_PROJECT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$PROJECT"
RUN_DIR=${RUN_DIR:-$PROJECT/runs/slurm-$SLURM_JOB_ID}
CONFIG=${CONFIG:-configs/tiny.yaml}
PY=${PYTHON:-$PROJECT/.venv/bin/python}
echo "[job.sh] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, run dir $RUN_DIR"

"$PY" -m launcher --slurm --resume --config "$CONFIG" -o run_dir="$RUN_DIR" "$@" &
launcher=$!
requeue=0
trap 'requeue=1; kill -TERM $launcher' USR1
trap 'kill -TERM $launcher' TERM
while :; do
    wait $launcher
    rc=$?
    kill -0 $launcher 2>/dev/null || break   # a trap ended the wait, not the launcher: wait again
done
if [ $requeue = 1 ]; then
    echo "[job.sh] requeueing job $SLURM_JOB_ID: it resumes from the checkpoint just written"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit $rc
