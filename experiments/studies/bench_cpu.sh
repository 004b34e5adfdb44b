#!/usr/bin/env bash
# BENCHMARKS.md's CPU sections re-measured in one sitting, every raw output kept:
#   bash experiments/studies/bench_cpu.sh OUTDIR
# from the repository root, with the project's virtualenv active, on an otherwise idle machine.
# Writes to OUTDIR (then commit it as results/bench_cpu_DATE/; `python -m experiments.report
# --write` makes BENCHMARKS.md's CPU tables from it):
#   wW_rR_jax.json, wW_rR_torch.json, wW_rR_jax_before.json   the rows of "JAX against PyTorch"
#       (width W, round R: this tree; the PyTorch peer; this tree with both CPU measures off,
#       FTSAM_JAX_XLA_OPTIONS=0 FTSAM_JAX_CONV_WGRAD=native), one after the other in each round
#   ftsam_epoch_w16_jax.json, ftsam_epoch_w16_jax_before.json   a whole FT-SAM epoch, width 16
#   detect.json                                    the detection rows
#   stages/{after,before}/{config,results}.json, metrics.jsonl   the `cpu` preset's stages
#   torch_peer.py                                  a copy of the peer that ran
#   commands.txt, env.json                         every command line as run (with its env
#       prefix), date, commit, versions, CPU model, cores, memory, load averages
#   logs/NAME.err                                  each command's stderr (where not empty)
# The PyTorch peer runs in a scratch virtualenv ($TORCH_PY, default /tmp/torchvenv/bin/python;
# made with `python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0+cpu`
# when missing), never in the project's.
# Settings (environment): ROUNDS (2), WIDTHS ("16 64"), STEPS (unset: 5 at width 16, 3 at 64, 3
# for the epoch and detection rows), WARMUP (1), PARTS ("vs_torch ftsam_epoch detect stages"),
# STAGE_PRESET (cpu), STAGE_EPOCHS (3), DATA (../shared/data/cifar10-subset), PEER
# (../shared/bench/torch_peer.py), PYTHON (python). A rehearsal, seconds to a few minutes:
#   ROUNDS=1 WIDTHS=16 STEPS=1 WARMUP=0 STAGE_PRESET=smoke STAGE_EPOCHS=1 \
#       bash experiments/studies/bench_cpu.sh /tmp/bench_cpu_rehearsal
# After committing the folder as results/bench_cpu_2026-12-06/, BENCHMARKS.md's CPU sections
# become generated ones (experiments/studies/bench_cpu_section.md, then removed):
#   python -c "from pathlib import Path as P; d, n = P('BENCHMARKS.md'), P('experiments/studies/bench_cpu_section.md'); t = d.read_text(); a, b = t.index('## CPU: JAX against PyTorch'), t.index('## GPU: '); d.write_text(t[:a] + n.read_text().split('-->\n\n', 1)[1] + t[b:])" && git rm -q experiments/studies/bench_cpu_section.md && python -m experiments.report --write
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: bash experiments/studies/bench_cpu.sh OUTDIR" >&2; exit 2; fi
if [ -e "$1" ] && [ -n "$(ls -A "$1")" ]; then
  echo "error: $1 is not empty: give a new folder" >&2; exit 2
fi
mkdir -p "$1/logs"; OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
ROUNDS=${ROUNDS:-2}; WIDTHS=${WIDTHS:-"16 64"}; WARMUP=${WARMUP:-1}
PARTS=${PARTS:-"vs_torch ftsam_epoch detect stages"}
STAGE_PRESET=${STAGE_PRESET:-cpu}; STAGE_EPOCHS=${STAGE_EPOCHS:-3}
DATA=${DATA:-../shared/data/cifar10-subset}; PEER=${PEER:-../shared/bench/torch_peer.py}
TORCH_PY=${TORCH_PY:-/tmp/torchvenv/bin/python}
BEFORE=(env FTSAM_JAX_XLA_OPTIONS=0 FTSAM_JAX_CONV_WGRAD=native)
START=$(date +%s)
steps_for() { if [ -n "${STEPS:-}" ]; then echo "$STEPS"; elif [ "$1" = 16 ]; then echo 5; else echo 3; fi; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
record() {  # record NAME COMMAND...: run it, stdout to $OUT/NAME, stderr to logs/, the line to commands.txt
  local name=$1; shift
  printf '%s\t%s\t%s\n' "$name" "$(cut -d' ' -f1-3 /proc/loadavg)" "$*" >>"$OUT/commands.txt"
  echo "== $name ($(( $(date +%s) - START )) s): $*"
  "$@" >"$OUT/$name" 2>"$OUT/logs/${name%.*}.err" || {
    echo "error: $name failed; its stderr: $OUT/logs/${name%.*}.err" >&2; tail -5 "$OUT/logs/${name%.*}.err" >&2; exit 1; }
}

if has vs_torch && [ ! -x "$TORCH_PY" ]; then
  python3 -m venv "$(dirname "$(dirname "$TORCH_PY")")"
  "$TORCH_PY" -m pip install -q torch==2.13.0+cpu
fi
[ -f "$PEER" ] && cp "$PEER" "$OUT/torch_peer.py"

ROWS=train_step,sam_step,eval_step
if has vs_torch; then
  for W in $WIDTHS; do
    S=$(steps_for "$W")
    for ((R = 1; R <= ROUNDS; R++)); do
      BENCH=("$PYTHON" -m experiments.bench --width="$W" --batch_size=128 --steps="$S"
             --warmup="$WARMUP" --rows=$ROWS --json)
      record "w${W}_r${R}_jax.json" "${BENCH[@]}"
      record "w${W}_r${R}_torch.json" "$TORCH_PY" "$PEER" --width="$W" --batch_size=128 \
        --steps="$S" --warmup="$WARMUP" --rows=$ROWS
      record "w${W}_r${R}_jax_before.json" "${BEFORE[@]}" "${BENCH[@]}"
    done
  done
fi
if has ftsam_epoch; then
  EPOCH=("$PYTHON" -m experiments.bench --width=16 --rows=ftsam_epoch --steps="${STEPS:-3}"
         --warmup="$WARMUP" --json)
  record ftsam_epoch_w16_jax.json "${EPOCH[@]}"
  record ftsam_epoch_w16_jax_before.json "${BEFORE[@]}" "${EPOCH[@]}"
fi
if has detect; then
  record detect.json "$PYTHON" -m experiments.bench --rows=detect_train_step,detect_distill_step \
    --detect_batch_size=32 --steps="${STEPS:-3}" --warmup="$WARMUP" --json
fi
if has stages; then
  SCRATCH=$(mktemp -d /tmp/bench_cpu_stages.XXXXXX)
  for V in after before; do
    PREFIX=(); [ "$V" = before ] && PREFIX=("${BEFORE[@]}")
    record "stages_$V.out" "${PREFIX[@]}" "$PYTHON" -m experiments.ftsam --dataset=cifar10 \
      --data_dir="$DATA" --attack=blended --preset="$STAGE_PRESET" --epochs="$STAGE_EPOCHS" \
      --defenses=ftsam --defense_epochs="$STAGE_EPOCHS" --progress=false --workdir="$SCRATCH/$V"
    mkdir -p "$OUT/stages/$V"
    cp "$SCRATCH/$V"/{config.json,results.json,metrics.jsonl} "$OUT/stages/$V/"
    mv "$OUT/stages_$V.out" "$OUT/stages/$V/stdout.txt"
  done
  rm -rf "$SCRATCH"
fi

find "$OUT/logs" -type f -empty -delete; rmdir "$OUT/logs" 2>/dev/null || true

# The sitting's record: machine, versions, commands (their order and the load average before each).
END_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
TORCH_VERSION=$([ -x "$TORCH_PY" ] && "$TORCH_PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)
"$PYTHON" - "$OUT" "$START" "$END_LOAD" "$TORCH_VERSION" <<'EOF'
import datetime, json, os, platform, subprocess, sys
from pathlib import Path
out, start, end_load, torch_version = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import flax, jax, jaxlib, numpy, optax
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
lscpu = dict(line.split(":", 1) for line in sh("lscpu").splitlines() if ":" in line)
mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
commands = [dict(zip(("output", "load_before", "command"), line.rstrip("\n").split("\t")))
            for line in (out / "commands.txt").read_text().splitlines()]
env = {
    "date": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat(),
    "wall_s": int(datetime.datetime.now().timestamp()) - start,
    "commit": sh("git", "rev-parse", "HEAD"),
    "dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
    "machine": {"cpu_model": lscpu.get("Model name", "").strip(), "nproc": os.cpu_count(),
                "flags_avx512f": "avx512f" in lscpu.get("Flags", ""),
                "hypervisor": lscpu.get("Hypervisor vendor", "").strip(),
                "mem_gib": round(mem_kib / 2**20, 1), "load_end": end_load},
    "versions": {"python": platform.python_version(), "jax": jax.__version__,
                 "jaxlib": jaxlib.__version__, "numpy": numpy.__version__,
                 "flax": flax.__version__, "optax": optax.__version__, "torch": torch_version,
                 "jax_devices": [str(d) for d in jax.devices()]},
    "settings": {k: os.environ.get(k) for k in ("ROUNDS", "WIDTHS", "STEPS", "WARMUP", "PARTS",
                                                 "STAGE_PRESET", "STAGE_EPOCHS")},
    "commands": commands,
}
(out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
print(f"{out}: {len(commands)} commands in {env['wall_s']} s; env.json written")
EOF
