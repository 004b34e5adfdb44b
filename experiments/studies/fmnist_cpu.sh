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
SYNC=0
if [ "${1:-}" = "--sync" ]; then SYNC=1; shift; fi
RUNS=${1:-/work/runs/fmnist}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
R=$HERE/results/fmnist_cpu
PY=${PYTHON:-python}
if [ $SYNC = 1 ]; then
  mkdir -p "$R"
  for f in table.json table.md table.png; do [ -f "$RUNS/$f" ] && cp "$RUNS/$f" "$R/"; done
  for cell in "$RUNS"/*/m*/ds*; do
    [ -f "$cell/results.json" ] || continue
    dst=$R/${cell#"$RUNS"/}
    mkdir -p "$dst/models"
    for f in results.json results.md metrics.jsonl config.json curves.png lf_pattern.npy; do
      [ -f "$cell/$f" ] && cp "$cell/$f" "$dst/"
    done
    # every finished model: the backdoored and clean ones, and each defense's (the neuron
    # analysis of issue 35 reads them; a defense's model is final once its row is written)
    for m in "$cell"/models/*; do
      name=$(basename "$m")
      if [ -d "$m" ] && [ ! -d "$dst/models/$name" ]; then cp -r "$m" "$dst/models/"; fi
      if [ -f "$m" ]; then cp "$m" "$dst/models/"; fi
    done
  done
  exit 0
fi
if [ -d "$R" ] && [ ! -e "$RUNS/table.json" ]; then mkdir -p "$RUNS" && cp -rn "$R/." "$RUNS/"; fi
mkdir -p "$RUNS"
"$PY" -m experiments.table --dataset=fashion_mnist --data_dir=../shared/data/fashion-mnist \
  --preset=cpu --attacks=badnets,blended,lf --model_seeds=0,1 --defense_seeds=0,1 \
  --defenses='ft,ftsam,ftsam[rho=0]' --differences='ftsam:ft,ftsam:ftsam[rho=0]' \
  --ftsam_flag=--epochs=20 --ftsam_flag=--retune_attack --workdir="$RUNS" >> "$RUNS/table.log" 2>&1
