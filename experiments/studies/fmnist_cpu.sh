#!/usr/bin/env bash
# Issue 31's full-size study at `cpu` width on the complete Fashion-MNIST (REPRODUCTION.md,
# "FT-SAM on the complete Fashion-MNIST"): BadNets, Blended and LF, two independent backdoored
# models each (model seeds 0, 1; 20 epochs, from the pilot), two defense seeds each, the columns
# ft, ftsam and ftsam[rho=0] on shared class-balanced 5% subsets (3,000 images), the Retuning
# Attack on every model and on one clean model per model seed. Cost: README.md ("The full-size
# study"); every cell resumes where it stopped.
#
#   bash experiments/studies/fmnist_cpu.sh [RUNS]          (default RUNS=/work/runs/fmnist)
#   bash experiments/studies/fmnist_cpu.sh --sync [RUNS]   (finished cells -> results/fmnist_cpu)
#
# --knobs (before RUNS, with or without --sync) runs issue 35's knob columns instead
# (REPRODUCTION.md, "Why FT-SAM works or fails at full size"): ftsam[rho=4], ftsam[rho=8],
# ftsam[label_smoothing=0] and ftsam[schedule=cosine_epoch] beside ftsam on Blended and LF,
# both model seeds, defense seed 0, in RUNS (default /work/runs/fmnist_knobs) synced to
# results/fmnist_knobs_cpu. Its cells start as copies of the study's finished ds0 cells
# (backdoored, clean model, LF's pattern and the ftsam row: the same benign subset), taken from
# results/fmnist_cpu or else from the study's run folder (STUDY_RUNS, default
# /work/runs/fmnist), so it refuses to start before those cells have finished;
# `bash fmnist_cpu.sh && bash fmnist_cpu.sh --knobs` queues both on one machine.
#
# Run it from a snapshot of the code (git worktree add /work/snap COMMIT; cd /work/snap), so
# that edits in the main tree never change a run halfway, from a folder beside `shared/` (the
# data path is relative, as the cells' config.json record it). A new RUNS starts from the cells
# committed in results/fmnist_cpu (finished cells are not run again; the backdoored and clean
# models and LF's pattern are committed with them). --sync copies every finished cell (its
# results.json/md, metrics.jsonl, config.json, curves.png, lf_pattern.npy and its models:
# backdoored, clean and each defense's final variables, about 2.6 MB each) and the table's
# files into results/fmnist_cpu of the checkout it is run from (no checkpoints, tensorboard
# or jax_cache).
set -eu
. "$(dirname "$0")/args.sh"
check_study_args "$0" "--sync --knobs" "$@"
SYNC=0
KNOBS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --sync) SYNC=1; shift ;;
    --knobs) KNOBS=1; shift ;;
    *) break ;;
  esac
done
HERE=$(cd "$(dirname "$0")/../.." && pwd)
STUDY=$HERE/results/fmnist_cpu
if [ $KNOBS = 1 ]; then
  RUNS=${1:-/work/runs/fmnist_knobs}
  R=$HERE/results/fmnist_knobs_cpu
  ATTACKS=blended,lf
  DEFENSE_SEEDS=0
  DEFENSES='ftsam,ftsam[rho=4],ftsam[rho=8],ftsam[label_smoothing=0],ftsam[schedule=cosine_epoch]'
  DIFFERENCES='ftsam[rho=4]:ftsam,ftsam[rho=8]:ftsam,ftsam[label_smoothing=0]:ftsam,ftsam[schedule=cosine_epoch]:ftsam'
else
  RUNS=${1:-/work/runs/fmnist}
  R=$STUDY
  ATTACKS=badnets,blended,lf
  DEFENSE_SEEDS=0,1
  DEFENSES='ft,ftsam,ftsam[rho=0]'
  DIFFERENCES='ftsam:ft,ftsam:ftsam[rho=0]'
fi
PY=${PYTHON:-python}
if [ $SYNC = 1 ]; then
  mkdir -p "$R"
  for f in "$RUNS"/table.json "$RUNS"/table.md "$RUNS"/table*.png "$RUNS"/neurons.json \
      "$RUNS"/neurons.md; do [ -f "$f" ] && cp "$f" "$R/"; done
  for cell in "$RUNS"/*/m*/ds*; do
    [ -f "$cell/results.json" ] || continue
    dst=$R/${cell#"$RUNS"/}
    mkdir -p "$dst/models"
    for f in results.json results.md metrics.jsonl config.json curves.png lf_pattern.npy; do
      [ -f "$cell/$f" ] && cp "$cell/$f" "$dst/"
    done
    # issue 35's neuron analysis of the cell (experiments.neurons: analysis.json and PNGs)
    [ -d "$cell/analysis" ] && mkdir -p "$dst/analysis" && cp -r "$cell/analysis/." "$dst/analysis/"
    # every finished model: the backdoored and clean ones, and each defense's (the neuron
    # analysis of issue 35 reads them; a defense's model is final once its row is written)
    for m in "$cell"/models/*; do
      name=$(basename "$m")
      # the knob cells' copies of the study's models stay in results/fmnist_cpu only
      if [ $KNOBS = 1 ] && [ -e "$STUDY/${cell#"$RUNS"/}/models/$name" ]; then continue; fi
      if [ -d "$m" ] && [ ! -d "$dst/models/$name" ]; then cp -r "$m" "$dst/models/"; fi
      if [ -f "$m" ]; then cp "$m" "$dst/models/"; fi
    done
  done
  exit 0
fi
if [ -d "$R" ] && [ ! -e "$RUNS/table.json" ]; then mkdir -p "$RUNS" && cp -rn "$R/." "$RUNS/"; fi
mkdir -p "$RUNS"
if [ $KNOBS = 1 ]; then
  # each knob cell starts from the study's finished cell of the same model (never retrained);
  # no-clobber: a knob cell's own results.json (the study's rows plus the knobs') is kept, the
  # study's models it does not commit twice are filled in
  for a in blended lf; do
    for m in 0 1; do
      # the committed cell, else the study's own run folder (a queue on one machine)
      src=$STUDY/$a/m$m/ds0
      if ! grep -q '"ftsam"' "$src/results.json" 2>/dev/null; then
        src=${STUDY_RUNS:-/work/runs/fmnist}/$a/m$m/ds0
      fi
      if ! grep -q '"ftsam"' "$src/results.json" 2>/dev/null || [ ! -d "$src/models/backdoored" ]; then
        echo "error: $a/m$m/ds0 has no finished ftsam row yet in $STUDY or its run folder" \
          "(issue 31's study first)" >&2; exit 2
      fi
      mkdir -p "$RUNS/$a/m$m/ds0" && cp -rn "$src/." "$RUNS/$a/m$m/ds0/"
    done
  done
fi
"$PY" -m experiments.table --dataset=fashion_mnist --data_dir=../shared/data/fashion-mnist \
  --preset=cpu --attacks=$ATTACKS --model_seeds=0,1 --defense_seeds=$DEFENSE_SEEDS \
  --defenses="$DEFENSES" --differences="$DIFFERENCES" \
  --ftsam_flag=--epochs=20 --ftsam_flag=--retune_attack --workdir="$RUNS" >> "$RUNS/table.log" 2>&1
