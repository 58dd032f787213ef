#!/usr/bin/env bash
# On a CUDA machine: measured peak memory (torch.cuda.max_memory_allocated) and step time of the BENCHMARKS
# memory rows beside their simulated figures, in a few minutes (see benchmarks/gpu_check.py). Without CUDA it
# says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results
#
# Needs torch (a CUDA build), transformers and peft, as a GPU machine usually has them. What else the engine
# imports (opacus and its scipy / opt_einsum) is installed when missing: from wheels in $GPU_CHECK_WHEELS
# (default benchmarks/.wheels: `pip download --no-deps -d benchmarks/.wheels opacus opt_einsum scipy` on a
# machine with the index, then carry the folder), else from the package index. dpmemarc runs from this
# checkout (PYTHONPATH), nothing of it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU (or no torch) here: skipped"
  exit 0
fi

missing=$("$python" - <<'PY'
import importlib.util
print(" ".join(m for m in ("transformers", "peft", "opacus", "scipy", "opt_einsum", "safetensors", "tqdm")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  wheels="${GPU_CHECK_WHEELS:-benchmarks/.wheels}"
  echo "gpu_check: installing $missing"
  if [ -d "$wheels" ]; then
    "$python" -m pip install --quiet --no-index --find-links "$wheels" $missing
  else
    "$python" -m pip install --quiet $missing
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu_check.py --out "$out"
