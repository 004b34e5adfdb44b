#!/usr/bin/env bash
# One GPU sitting for issue 31: the full-size study (experiments/studies/fmnist_cpu.sh) at the
# `paper` width (PreAct-ResNet18 width 64, lr 0.01 for the backdoored model and the defenses) on
# the complete Fashion-MNIST, with the same design as the CPU study (the primary record):
# BadNets, Blended, LF x model seeds 0,1 x defense seeds 0,1 x {ft, ftsam, ftsam[rho=0]} on
# shared 5% subsets, the Retuning Attack on every model, backdoored models of EPOCHS (20, the
# CPU study's) epochs, cells model seed by model seed until the sitting's deadline.
#
# Runs on a lent GPU machine from the repository root, with
#   .whl/      wheels of what its image lacks (ml_collections, tensorboardX; see gpu_rows.sh)
#   .devcarry/ the Fashion-MNIST folder (fashion-mnist/: the four official .gz files, SHA256SUMS)
# and writes to $OUT (default ./gpu_out) one archive of the table's folder without checkpoints,
# defended models or the compilation cache (table.json, table.md and every cell's results), so
# that whole cells come back even when the deadline stops one.
# Rehearse on CPU: PRESET=smoke ATTACKS=badnets,blended MODELS=0,1 SEEDS=0 BUDGET_S=120
#   DATA=../shared/data/fashion-mnist bash experiments/gpu_fmnist.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-520}; PRESET=${PRESET:-paper}; EPOCHS=${EPOCHS:-20}
ATTACKS=${ATTACKS:-badnets,blended,lf}; MODELS=${MODELS:-0,1}; SEEDS=${SEEDS:-0,1}
DATA=${DATA:-.devcarry/fashion-mnist}; WD=${WD:-/tmp/fmnist_paper}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
START=$(date +%s)
timeout "$BUDGET_S" python3 -m experiments.table --dataset=fashion_mnist --data_dir="$DATA" \
  --preset="$PRESET" --attacks="$ATTACKS" --model_seeds="$MODELS" --defense_seeds="$SEEDS" \
  --benign_selection=shared --defenses='ft,ftsam,ftsam[rho=0]' \
  --differences='ftsam:ft,ftsam:ftsam[rho=0]' --ftsam_flag=--epochs="$EPOCHS" \
  --ftsam_flag=--retune_attack --ftsam_flag=--checkpoint_every=25 \
  --workdir="$WD" >"$OUT/table.out" 2>"$OUT/table.err"
echo "table rc=$? after $(( $(date +%s) - START ))s"
# table.json / table.md follow the cells: a table stopped by the deadline keeps what finished.
tar czf "$OUT/fmnist_paper.tgz" --exclude=checkpoints --exclude=jax_cache --exclude=tensorboard \
  --exclude='models/ft*' -C "$(dirname "$WD")" "$(basename "$WD")" 2>/dev/null
tail -c 3000 "$OUT/table.out"; tail -5 "$OUT/table.err"
