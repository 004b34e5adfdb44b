#!/usr/bin/env bash
# Starts the queue of long CPU studies (queue_cpu.sh) at a session's start, or says it runs:
#   - the virtualenv VENV (default /work/venv) is made with the checkout's test extras when
#     it is missing (a new machine);
#   - the snapshot SNAP (default /work/snap, a git worktree) is made, or moved to the
#     checkout's HEAD: only here, with no queue running, so a run never mixes two commits of
#     the code within one process; the commit is printed for the record (REPRODUCTION.md's
#     status lists the commits a study ran from);
#   - queue_cpu.sh starts from SNAP in the background, appending to RUNS/queue.log (default
#     RUNS /work/runs); every study resumes from its run folder or the committed results/.
#
#   bash experiments/studies/start_queue.sh        (from the main checkout)
#
# Before the session stops: `bash experiments/studies/queue_cpu.sh --sync` from the checkout,
# `python -m experiments.report --write`, commit the results (see queue_cpu.sh).
set -eu
. "$(dirname "$0")/args.sh"
check_study_args "$0" "" "$@"
MAIN=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-/work/venv}
SNAP=${SNAP:-/work/snap}
RUNS=${RUNS:-/work/runs}
if pgrep -f "studies/queue_cpu.sh" > /dev/null; then
  echo "the queue is running already (RUNS/queue.log); nothing started"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -e "$MAIN[test]"
fi
HEAD=$(git -C "$MAIN" rev-parse HEAD)
git -C "$MAIN" worktree prune
if [ -d "$SNAP/.git" ] || [ -f "$SNAP/.git" ]; then
  git -C "$SNAP" checkout -q --detach "$HEAD"
else
  git -C "$MAIN" worktree add -q --detach "$SNAP" "$HEAD"
fi
mkdir -p "$RUNS"
echo "$(date -u +%FT%TZ) snapshot $(git -C "$SNAP" log --oneline -1 | cut -c1-72)" \
  >> "$RUNS/queue.log"
(cd "$SNAP" && PYTHON="$VENV/bin/python" RUNS="$RUNS" \
  nohup bash experiments/studies/queue_cpu.sh >> "$RUNS/queue.log" 2>&1 &)
echo "queue started from $(git -C "$SNAP" log --oneline -1 | cut -c1-72); log: $RUNS/queue.log"
