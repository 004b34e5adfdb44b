#!/usr/bin/env bash
# One GPU sitting for issue 22: FT-SAM's effect isolated at the `paper` preset on the slice
# (PreAct-ResNet18 width 64, one lr 0.01 for the backdoored model and the defenses), paired
# (--benign_selection=shared): ft, ftsam, the SAM-off control ftsam[rho=0] and plain SAM
# ftsam[adaptive=false], defense seeds 0,1,2, attacks in the order of ATTACKS (default Blended,
# BadNets, SIG: the paper's headline case first), until the sitting's deadline.
#
# Runs on a lent GPU machine from the repository root, with
#   .whl/      wheels of what its image lacks (ml_collections, tensorboardX; see gpu_rows.sh)
#   .devcarry/ the CIFAR-10 slice (cifar10-subset/)
# and writes to $OUT (default ./gpu_out) one archive of the table's folder without checkpoints,
# models or the compilation cache (table.json, table.md, table.png and every cell's results), so
# that whole attacks come back even when the deadline stops a cell. Sizing from the lease of
# 2026-11-26: a backdoored model 27-51 s, an FT / FT-SAM cell 9-30 s with compilation, so an
# attack (1 + 12 cells) takes about 4-6 min: two or three attacks in one sitting.
# Rehearsed on CPU: PRESET=smoke ATTACKS=badnets SEEDS=0,1 DATA=../shared/data/cifar10-subset
# BUDGET_S=60 (the deadline stopped it in a cell; the archive held the finished cells).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-520}; PRESET=${PRESET:-paper}
ATTACKS=${ATTACKS:-blended,badnets,sig}; SEEDS=${SEEDS:-0,1,2}
DATA=${DATA:-.devcarry/cifar10-subset}; WD=${WD:-/tmp/iso_paper}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
START=$(date +%s)
timeout "$BUDGET_S" python3 -m experiments.table --dataset=cifar10 --data_dir="$DATA" \
  --preset="$PRESET" --attacks="$ATTACKS" --benign_selection=shared \
  --defenses='ft,ftsam,ftsam[rho=0],ftsam[adaptive=false]' --defense_seeds="$SEEDS" \
  --differences='ftsam:ft,ftsam:ftsam[rho=0],ftsam[rho=0]:ft,ftsam:ftsam[adaptive=false]' \
  --ftsam_flag=--checkpoint_every=25 --workdir="$WD" >"$OUT/table.out" 2>"$OUT/table.err"
echo "table rc=$? after $(( $(date +%s) - START ))s"
# table.json / table.md follow the cells: a table stopped by the deadline keeps what finished.
tar czf "$OUT/isolation.tgz" --exclude=checkpoints --exclude=models --exclude=jax_cache \
  --exclude=tensorboard -C "$(dirname "$WD")" "$(basename "$WD")" 2>/dev/null
tail -c 3000 "$OUT/table.out"; tail -5 "$OUT/table.err"
