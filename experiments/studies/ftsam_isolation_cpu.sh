#!/usr/bin/env bash
# Issue 22's studies at `cpu` scale, paired (--benign_selection=shared), on the committed
# backdoored models (REPRODUCTION.md, "FT-SAM's effect isolated"): (a) isolation on BadNets,
# Blended, SIG; (a') isolation on LF with BackdoorBench's pattern; (c) rho (Figure 3);
# (b) benign ratios (Table 3). About 7-9 hours on 2 cores; every table resumes where it stopped.
#
#   bash experiments/studies/ftsam_isolation_cpu.sh [RUNS]     (default RUNS=runs/ftsam22)
#
# Run it from a snapshot of the code (git worktree add /tmp/snap HEAD; cd /tmp/snap), so that
# edits in the main tree never change a run halfway. The data path is the one the committed
# backdoored models were trained with (their config.json guards it): run from a folder beside
# `shared/`. LF needs BackdoorBench's pattern at LFPAT (the path its committed model recorded):
#   git -C BackdoorBench show f02e353:resource/lowFrequency/cifar10_preactresnet18_0_255.npy > $LFPAT
# Copy each finished table into results/ftsam_{iso,iso_lf,rho,table3} without checkpoints,
# models, tensorboard or jax_cache, then `python -m experiments.report --write`. A new RUNS
# starts from those committed cells (finished cells are not run again).
set -eu
RUNS=${1:-runs/ftsam22}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
R=$HERE/results
PY=${PYTHON:-python}
DATA=../shared/data/cifar10-subset
LFPAT=${LFPAT:-/work/main/runs/lf_bb/backdoorbench_cifar10_preactresnet18_0_255.npy}
resume_from() {  # resume_from NAME: a new workdir starts from the cells committed in results/
  local src=$R/ftsam_$1 dst=$RUNS/$1
  if [ -d "$src" ] && [ ! -e "$dst" ]; then mkdir -p "$dst" && cp -r "$src/." "$dst/"; fi
}
seed_from() {  # seed_from SRC DST: the backdoored row, config.json and final variables
  local src=$1 dst=$2
  mkdir -p "$dst/models"
  [ -d "$dst/models/backdoored" ] || cp -r "$src/models/backdoored" "$dst/models/"
  if [ -f "$src/lf_pattern.npy" ] && [ ! -f "$dst/lf_pattern.npy" ]; then
    cp "$src/lf_pattern.npy" "$dst/"
  fi
  [ -f "$dst/results.json" ] && return 0
  cp "$src/config.json" "$dst/"
  "$PY" - "$src/results.json" "$dst/results.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
row = {k: r[k] for k in ("dataset", "attack", "model", "config", "backdoored")}
json.dump({**row, "defenses": {}}, open(sys.argv[2], "w"), indent=2)
PYEOF
}
for study in iso iso_lf rho table3; do resume_from $study; done
common=(--dataset=cifar10 --data_dir=$DATA --preset=cpu --benign_selection=shared)
lf=(--attacks=lf --ftsam_flag=--trigger_path="$LFPAT")
# (a), (a') in two passes, so that a session that stops early has the pre-stated test first:
# pass 1 the three columns it needs (36 cells, about 2 min each on 2 idle cores), pass 2 two
# more (a table takes new columns and keeps its finished cells).
primary=(--defenses='ft,ftsam,ftsam[rho=0]' --defense_seeds=0,1,2
         --differences='ftsam:ft,ftsam:ftsam[rho=0],ftsam[rho=0]:ft')
# Pass 2 adds plain SAM and SAM on FT's own recipe (no smoothing, cosine per epoch): with ft,
# ftsam and ftsam[rho=0] a 2x2 of recipe x SAM.
FTREC='ftsam[label_smoothing=0,schedule=cosine_epoch]'
iso=(--defenses="ft,ftsam,ftsam[rho=0],ftsam[adaptive=false],$FTREC" --defense_seeds=0,1,2
     --differences="ftsam:ft,ftsam:ftsam[rho=0],ftsam[rho=0]:ft,ftsam:ftsam[adaptive=false],$FTREC:ft,ftsam:$FTREC")
mkdir -p "$RUNS"
for a in badnets blended sig; do seed_from "$R/table_cpu/$a/ds0" "$RUNS/iso/$a/ds0"; done
seed_from "$R/lf_backdoorbench/ds0" "$RUNS/iso_lf/lf/ds0"
isolation() {  # isolation COLUMN_FLAGS...: the isolation tables (a) and (a') with these columns
  "$PY" -m experiments.table "${common[@]}" --attacks=badnets,blended,sig "$@" \
    --workdir="$RUNS/iso" >> "$RUNS/iso.log" 2>&1 || true
  "$PY" -m experiments.table "${common[@]}" "${lf[@]}" "$@" \
    --workdir="$RUNS/iso_lf" >> "$RUNS/iso_lf.log" 2>&1 || true
}
isolation "${primary[@]}"
isolation "${iso[@]}"
for a in badnets blended; do seed_from "$R/table_cpu/$a/ds0" "$RUNS/rho/$a/ds0"; done
"$PY" -m experiments.table "${common[@]}" --attacks=badnets,blended \
  --defenses='ftsam[rho=0.5],ftsam[rho=1],ftsam,ftsam[rho=4],ftsam[rho=8]' --defense_seeds=0,1 \
  --workdir="$RUNS/rho" > "$RUNS/rho.log" 2>&1 || true
for a in badnets blended; do seed_from "$R/table_cpu/$a/ds0" "$RUNS/table3/$a/ratio0.01/ds0"; done
"$PY" -m experiments.table "${common[@]}" --attacks=badnets,blended --defenses=ft,ftsam \
  --benign_ratios=0.01,0.05,0.1 --defense_seeds=0,1,2 --differences=ftsam:ft \
  --workdir="$RUNS/table3" > "$RUNS/table3.log" 2>&1 || true
