#!/usr/bin/env bash
# One command that records an accelerator's figures, within 8 minutes:
#
#   bash benchmarks/device_check.sh                # writes runs/device_check/device_check.json and .log
#   OUT=/some/dir bash benchmarks/device_check.sh  # or into $OUT
#   QUICK=1 bash benchmarks/device_check.sh        # tiny sizes: a smoke test of the script (CPU, ~2 min)
#   ONLY=minilm,gemma bash benchmarks/device_check.sh   # some of the steps below
#
# It runs, each under its own time limit, with every figure measured in this one run:
#   layer    benchmarks/layer_bench.py            routed layers vs LoRA: fwd+bwd time, XLA temp memory, FLOPs
#   minilm   benchmarks/model_step.py             one MiniLM training step per method, as a ratio to LoRA
#                                                 (--random-weights: MiniLM's shapes, no download needed)
#   gemma    benchmarks/gemma_step.py             Gemma 3 step ratios and generation tokens/s (if present)
#   sweep    benchmarks/sweep_bench.py            a 32-entry sweep vectorised vs one entry at a time
#   svd      launch.py configs/svd_simulation.py  the paper's Table 1, wall time of the whole run
# then gathers the JSON each writes (and the wall time of each) into device_check.json. A step that fails
# or runs out of time is recorded as such; the others still run. Needs: jax with the accelerator's plugin,
# flax, optax, orbax-checkpoint, chex, ml_collections, tensorboardX (and gguf for Gemma).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/device_check}
mkdir -p "$out"
work=$(mktemp -d)
log="$out/device_check.log"
: > "$log"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
declare -A wall rc

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  case ",${ONLY:-$name}," in *",$name,"*) ;; *) return;; esac
  echo "== $name ($limit s limit): $*" | tee -a "$log"
  local start=$(date +%s%N)
  local before=$(wc -l < "$log")
  timeout "$limit" "$@" >> "$log" 2>&1
  rc[$name]=$?
  wall[$name]=$(( ($(date +%s%N) - start) / 1000000 ))
  echo "== $name: exit ${rc[$name]} after ${wall[$name]} ms" | tee -a "$log"
  tail -n +"$((before + 1))" "$log" | tail -n 12
}

quick=${QUICK:-0}
q() { [ "$quick" = 1 ] && echo "$@"; }   # extra arguments in the QUICK smoke test only

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; } >> "$log"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" >> "$log" 2>&1

step layer 60 python3 benchmarks/layer_bench.py $(q --quick) --json "$work/layer.json"
step minilm 180 python3 benchmarks/model_step.py --random-weights \
  --methods lora,localized_lora,blockwise_moe,cellwise_moe,per_task_lora $(q --quick) --json "$work/minilm.json"
if [ -f benchmarks/gemma_step.py ]; then
  step gemma 120 python3 benchmarks/gemma_step.py --random-weights $(q --quick) --json "$work/gemma.json"
fi
step sweep 60 python3 benchmarks/sweep_bench.py --sequential 4 $(q --epochs 1 --samples 500)
step svd 75 python3 launch.py --config "configs/svd_simulation.py$(q :quick)" --workdir "$work/svd"
cp "$work/svd/results.md" "$out/svd_results.md" 2>/dev/null || true

python3 - "$work" "$out" <<PY
import json, os, sys, re
work, out = sys.argv[1], sys.argv[2]
figures = {"wall_ms": {$(for k in "${!wall[@]}"; do printf '"%s": %s, ' "$k" "${wall[$k]}"; done)},
           "exit": {$(for k in "${!rc[@]}"; do printf '"%s": %s, ' "$k" "${rc[$k]}"; done)}}
for name in ("layer", "minilm", "gemma"):
  path = os.path.join(work, name + ".json")
  if os.path.exists(path):
    figures[name] = json.load(open(path))
text = open(os.path.join(out, "device_check.log")).read()
figures["sweep_lines"] = [l for l in text.splitlines() if re.search(r"per entry|devices vs 1", l)]
try:
  import jax
  figures["devices"] = [str(d) for d in jax.devices()]
  figures["jax"] = jax.__version__
except Exception as e:  # pylint: disable=broad-except
  figures["devices"] = repr(e)
json.dump(figures, open(os.path.join(out, "device_check.json"), "w"), indent=1, default=str)
print("wrote", os.path.join(out, "device_check.json"))
PY
