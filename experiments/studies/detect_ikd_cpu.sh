#!/usr/bin/env bash
# Issue 23's pre-stated IKD detection test (REPRODUCTION.md, "IKD for detection, tested with
# power"): fgd and fgd_ikd with paired streams, 24 student epochs, the study's committed
# teacher, seeds 0..9 one pair at a time (an interrupted study holds whole pairs), then the
# secondaries (student, fgd_afa, fgd_ssa, fgd_noise) on seeds 0-2. About 30 min per pair on 2
# cores; rerunning resumes (finished students are skipped, a started one resumes from its
# checkpoint).
#
#   bash experiments/studies/detect_ikd_cpu.sh [WORKDIR]     (default runs/detect_powered)
#
# Run it from a snapshot of the code (git worktree add /tmp/snap HEAD; cd /tmp/snap). A new
# WORKDIR starts from the committed files: results/detect_powered (the pairs so far) and the
# teacher's final variables (results/detect_teacher_study/scenes16k_flip_e20/teacher_variables),
# so no teacher is trained. Copy config.json, results.json, results.md, metrics.jsonl,
# detections.png and models/student_* back to results/detect_powered after each pair, then
# `python -m experiments.report --write`.
set -eu
W=${1:-runs/detect_powered}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
# The data folder as the committed run recorded it (a run setting: another spelling of the
# path is refused): the absolute path of ../shared/data.
DATA=${DATA:-$(cd "$HERE/../shared/data" && pwd)}
if [ ! -d "$W/models/teacher" ]; then
  mkdir -p "$W/models"
  cp "$HERE/results/detect_powered/"{config.json,results.json,metrics.jsonl} "$W/"
  cp -r "$HERE/results/detect_teacher_study/scenes16k_flip_e20/teacher_variables" \
    "$W/models/teacher"
fi
common=(--config=experiments/configs/detect.py:cpu --config.data_dir="$DATA"
        --config.epochs=24 --config.warmup_epochs=1 --config.teacher_extra_scenes=12000
        --config.teacher_epochs=20 --config.teacher_flip=true --config.paired_streams=true
        --config.progress=false --workdir="$W")
seeds=0
for n in 1 2 3 4 5 6 7 8 9 10; do
  "$PY" -m experiments.detect "${common[@]}" --config.methods=fgd,fgd_ikd \
    --config.seeds=$seeds >> "$W.log" 2>&1
  seeds=$seeds,$n
done
"$PY" -m experiments.detect "${common[@]}" --config.methods=student,fgd_afa,fgd_ssa,fgd_noise \
  --config.seeds=0,1,2 >> "$W.log" 2>&1
