#!/usr/bin/env bash
# The open CPU studies, one heavy run at a time, in the order of DEVELOPERS.md's list; each
# resumes where it stopped and skips what is finished, so a session starts the queue first
# thing and it goes on where the last session's stopped:
#   1. issue 31: the full-size study on Fashion-MNIST (fmnist_cpu.sh)
#   2. issue 35: its knob columns (fmnist_cpu.sh --knobs) and the neuron analysis of its models
#      (experiments.neurons on the study's run folder)
#   3. issues 32 and 33: the cpu Table 1 extended (table_cpu_extend.sh)
#   4. issue 34: the MGD study (detect_mgd_cpu.sh)
# Their costs are stated in each script and in REPRODUCTION.md's pre-stated tests.
#
#   bash experiments/studies/start_queue.sh   (from the checkout: venv, snapshot, this queue)
#   or by hand: git worktree add /work/snap HEAD && cd /work/snap   (a snapshot beside shared/)
#   PYTHON=... nohup bash experiments/studies/queue_cpu.sh > /work/runs/queue.log 2>&1 &
#   ... before the session stops, from the main checkout:
#   bash experiments/studies/queue_cpu.sh --sync   (every part's finished files -> results/)
#   python -m experiments.report --write; git add results ...; git commit
set -eu
. "$(dirname "$0")/args.sh"
check_study_args "$0" "--sync" "$@"
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=${RUNS:-/work/runs}
PY=${PYTHON:-python}
if [ "${1:-}" = "--sync" ]; then
  bash "$HERE/fmnist_cpu.sh" --sync "$RUNS/fmnist"
  [ -d "$RUNS/fmnist_knobs" ] && bash "$HERE/fmnist_cpu.sh" --sync --knobs "$RUNS/fmnist_knobs"
  [ -d "$RUNS/table_cpu" ] && bash "$HERE/table_cpu_extend.sh" --sync "$RUNS/table_cpu"
  [ -d "$RUNS/detect_mgd" ] && bash "$HERE/detect_mgd_cpu.sh" --sync "$RUNS/detect_mgd"
  exit 0
fi
mkdir -p "$RUNS"
step() {  # step NAME COMMAND...: run it; a failed part is said and the queue goes on
  echo "$(date -u +%FT%TZ) start $1"
  shift
  local rc=0
  "$@" || rc=$?
  if [ $rc != 0 ]; then echo "$(date -u +%FT%TZ) FAILED (exit $rc): $*"; fi
}
step "fmnist study" env PYTHON="$PY" bash "$HERE/fmnist_cpu.sh" "$RUNS/fmnist"
step "fmnist knobs" env PYTHON="$PY" STUDY_RUNS="$RUNS/fmnist" \
  bash "$HERE/fmnist_cpu.sh" --knobs "$RUNS/fmnist_knobs"
step "neurons" bash -c "'$PY' -m experiments.neurons --study='$RUNS/fmnist' >> '$RUNS/neurons.log' 2>&1"
step "table_cpu extension" env PYTHON="$PY" bash "$HERE/table_cpu_extend.sh" "$RUNS/table_cpu"
step "detect_mgd" env PYTHON="$PY" bash "$HERE/detect_mgd_cpu.sh" "$RUNS/detect_mgd"
echo "$(date -u +%FT%TZ) queue done"
