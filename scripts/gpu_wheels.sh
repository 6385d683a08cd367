#!/usr/bin/env bash
# Download, here, the wheels the book needs on a lent GPU machine beyond what it has (torch, transformers,
# accelerate, safetensors, tokenizers, huggingface_hub, numpy): the same versions as .venv, built for that
# machine's Python 3.12 on x86-64. They land in .whl/, which git ignores; scripts/gpu_notebooks.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(pandas python-dateutil six tzdata matplotlib contourpy cycler fonttools kiwisolver pyparsing pillow
          packaging ipython ipython-pygments-lexers jedi parso matplotlib-inline pexpect ptyprocess
          prompt-toolkit wcwidth pygments stack-data executing asttokens pure-eval traitlets psutil regex tqdm)
pins=$(.venv/bin/python - "${packages[@]}" <<'PY'
import importlib.metadata as metadata, sys
print(" ".join(f"{name}=={metadata.version(name)}" for name in sys.argv[1:]))
PY
)
rm -rf .whl
# shellcheck disable=SC2086
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
du -sh .whl
