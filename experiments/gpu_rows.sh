#!/usr/bin/env bash
# One GPU sitting: the GPU rows of BENCHMARKS.md and a full-width FT-SAM pipeline run.
#
# Runs on a lent GPU machine from the repository root, with
#   .whl/      wheels of what its image lacks (ml_collections, tensorboardX)
#   .devcarry/ the CIFAR-10 slice (cifar10-subset/) and ../shared/bench/torch_peer.py
# and writes everything to $OUT (default ./gpu_out). Each part has its own time limit and the
# parts are independent: a failing one is reported and the next still runs.
#   1. experiments.bench, paper preset (PreAct-ResNet18 width 64, batch 128), float32;
#   2. the PyTorch peer, same rows, float32 (and channels_last);
#   3. experiments.bench bfloat16, and the peer under autocast bf16;
#   4. experiments.ftsam at the paper preset on the slice: Blended, FT and FT-SAM, seed 0,
#      until the sitting's deadline (BUDGET_S seconds from the start, default 520).
# Preparing the two folders where you launch from (keep them out of git, .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 tensorboardX==2.6.5
#   mkdir -p .devcarry && cp -r ../shared/data/cifar10-subset ../shared/bench/torch_peer.py .devcarry/
# Used on 2026-11-26 (one H200, 187 s for all four parts): BENCHMARKS.md's GPU section.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-520}; START=$(date +%s)
STEPS=${STEPS:-30}; WARMUP=${WARMUP:-3}; PRESET=${PRESET:-paper}; PIPE_PRESET=${PIPE_PRESET:-paper}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
part() {  # part NAME LIMIT_S COMMAND...: run with a limit, stdout to $OUT/NAME.out, stderr to NAME.err
  local name=$1 limit=$2; shift 2
  local l; l=$(left); (( limit > l )) && limit=$l
  if (( limit < 20 )); then echo "== $name: skipped (${l}s left)"; return; fi
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  echo "   rc=$? after $(( $(date +%s) - START ))s"; tail -3 "$OUT/$name.err"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint as o, torch; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

BENCH=(python3 -m experiments.bench --preset="$PRESET" --steps="$STEPS" --warmup="$WARMUP" --json)
WIDTH=64; [ "$PRESET" = paper ] || WIDTH=16   # the bench preset's network (cpu: width 16)
PEER=(python3 .devcarry/torch_peer.py --device=cuda --width="$WIDTH" --batch_size=128 --steps="$STEPS" --warmup="$WARMUP")
part jax_f32 150 "${BENCH[@]}" --dtype=float32
part torch_f32 60 "${PEER[@]}"
part torch_f32_cl 60 "${PEER[@]}" --channels_last
part jax_bf16 150 "${BENCH[@]}" --dtype=bfloat16
part torch_amp 60 "${PEER[@]}" --amp --channels_last

WD=/tmp/pipe_blended
part pipeline 100000 python3 -m experiments.ftsam --preset="$PIPE_PRESET" --dataset=cifar10 \
  --data_dir=.devcarry/cifar10-subset --attack=blended --defenses=ft,ftsam --seed=0 \
  --checkpoint_every=25 --progress=false --workdir="$WD"
tar czf "$OUT/pipeline.tgz" --exclude=checkpoints --exclude=models --exclude=tensorboard \
  -C /tmp pipe_blended 2>/dev/null
echo "== done after $(( $(date +%s) - START ))s"
for f in "$OUT"/*.out; do echo "-- $f"; tail -c 1500 "$f"; echo; done
# What comes back is at most 8 files: the logs travel as one archive.
(cd "$OUT" && tar czf logs.tgz ./*.out ./*.err && rm -f ./*.out ./*.err)
