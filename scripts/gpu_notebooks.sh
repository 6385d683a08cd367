#!/usr/bin/env bash
# Execute every notebook of the book on a lent GPU machine, with random weights of a real Qwen2.5 config.
#
# That machine has python3 with torch and transformers but no network and no Jupyter tooling, so the notebooks
# run through scripts/run_notebooks.py, and the packages it lacks travel as wheels in .whl/ (made here by
# scripts/gpu_wheels.sh; name .whl in the device tool's carry). Usage, on that machine, from the repository root:
#
#   bash scripts/gpu_notebooks.sh "$OUT"                                   # random:0.5B on cuda
#   MINQWEN_MODEL=random:1.5B bash scripts/gpu_notebooks.sh "$OUT" book/notebooks/ch3/*.py
#
# It writes OUT/gpu-runs.md (card, versions, one row per notebook) and OUT/gpu-runs.log (output of failures).
# The weights are random, so golden-file checks do not apply; every check of minqwen against HF does.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu_notebooks.sh OUT_DIR [NOTEBOOK.py ...]}"
shift
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/book${PYTHONPATH:+:$PYTHONPATH}"
export MINQWEN_MODEL="${MINQWEN_MODEL:-random:0.5B}" MINQWEN_DEVICE="${MINQWEN_DEVICE:-cuda}"
export MINQWEN_CACHE="${MINQWEN_CACHE:-/tmp/minqwen-cache}" MPLBACKEND=Agg HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m minqwen fetch "$MINQWEN_MODEL"
python3 scripts/run_notebooks.py --out "$out" "$@"
