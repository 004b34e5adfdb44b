#!/usr/bin/env bash
# Issues 32 and 33: the `cpu` Table 1 (results/table_cpu, REPRODUCTION.md "Table 1 at `cpu`
# scale") extended without changing any of its 91 cells: the paper's missing defenses and the
# two newer ones (nc, ac, abl, fst, pam; defense seed 0, as the committed baselines) on its seven
# attacks (ac and abl not on WaNet and Input-aware, which leave no poisoned training set: the
# table leaves those cells out), then the paper's missing attacks (lc, ssba, trojannn) with
# every defense (ft and ftsam at defense seeds 0, 1, 2 as committed, the others at 0).
#
#   bash experiments/studies/table_cpu_extend.sh [RUNS]         (default RUNS=/work/runs/table_cpu)
#   bash experiments/studies/table_cpu_extend.sh --sync [RUNS]  (finished cells -> results/table_cpu)
#
# Cost (estimated before it runs from the committed cells' times on this 2-core machine): the
# five columns about 1.5-2 h per attack with a poisoned set (AC retrains a model, about one
# backdoored model's 15-22 min; ABL trains one for 100 epochs, 25-35 min; NC searches 80
# epochs for each of the 10 labels, about 25-50 min, measured once on BadNets' model on the
# loaded machine; FST and PAM a few minutes each), about 11 h for the seven attacks; each new
# attack about 2.5-3 h (its backdoored model, its resource: LC's adversarial images, SSBA's
# encoder, TrojanNN's trigger, and 17 defense cells), about 8 h for the three: some 19
# CPU-hours in all.
#
# Run it from a snapshot of the code (git worktree add /work/snap COMMIT; cd /work/snap), from a
# folder beside `shared/` (the committed cells' config.json record the relative data path). A
# new RUNS starts from the cells committed in results/table_cpu (finished cells are not run
# again: the table resumes). --sync copies every cell's results.json/md, metrics.jsonl,
# config.json and its attack's files (models/backdoored, Input-aware's networks, LF's pattern,
# the cached *.npz resources), the cells' logs and the table's files into results/table_cpu of
# the checkout it is run from (no checkpoints, defended models, tensorboard or jax_cache).
set -eu
. "$(dirname "$0")/args.sh"
check_study_args "$0" "--sync" "$@"
SYNC=0
if [ "${1:-}" = "--sync" ]; then SYNC=1; shift; fi
RUNS=${1:-/work/runs/table_cpu}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
R=$HERE/results/table_cpu
PY=${PYTHON:-python}
if [ $SYNC = 1 ]; then
  for f in "$RUNS"/table.json "$RUNS"/table.md "$RUNS"/table*.png; do
    [ -f "$f" ] && cp "$f" "$R/"
  done
  mkdir -p "$R/logs" && cp -r "$RUNS/logs/." "$R/logs/"
  for cell in "$RUNS"/*/ds*; do
    [ -f "$cell/results.json" ] || continue
    dst=$R/${cell#"$RUNS"/}
    mkdir -p "$dst/models"
    for f in results.json results.md metrics.jsonl config.json lf_pattern.npy "$cell"/*.npz; do
      f=$(basename "$f")
      [ -f "$cell/$f" ] && cp "$cell/$f" "$dst/"
    done
    for m in backdoored input_aware clean clean.json; do
      if [ -d "$cell/models/$m" ] && [ ! -d "$dst/models/$m" ]; then cp -r "$cell/models/$m" "$dst/models/"; fi
      if [ -f "$cell/models/$m" ]; then cp "$cell/models/$m" "$dst/models/"; fi
    done
  done
  exit 0
fi
if [ ! -e "$RUNS/table.json" ]; then mkdir -p "$RUNS" && cp -rn "$R/." "$RUNS/"; fi
"$PY" -m experiments.table --dataset=cifar10 --data_dir=../shared/data/cifar10-subset \
  --preset=cpu \
  --attacks=badnets,badnets_a2a,blended,sig,wanet,lf,input_aware,lc,ssba,trojannn \
  --defenses=ft,ftsam,fp,nad,anp,ibau,clp,ikd,nc,ac,abl,fst,pam --seeded_defenses=ft,ftsam \
  --defense_seeds=0,1,2 --workdir="$RUNS" >> "$RUNS/table.log" 2>&1
