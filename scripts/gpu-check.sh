#!/usr/bin/env bash
# One command for the first GPU session: writes gpu-check.md with every figure and the card's name (about 5-7
# minutes on one H100). `scripts/gpu-check.sh --cpu --quick` runs the same sections tiny on the CPU (CI does).
#
# The lent GPU machines run their own image (Python 3.12, torch 2.11, timm, typer, rich, pandas, matplotlib) without
# fvcore or ffcv. Bring fvcore and what it needs as wheels, from the repository root on a machine with PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       fvcore iopath yacs termcolor portalocker tabulate pyyaml safetensors
#   (fvcore and iopath ship as source only: also `python3 -m pip wheel --no-deps -w .whl fvcore iopath`)
# then carry `.whl` (git-ignored) to the GPU machine; this script installs whatever lies in .whl/ into .whl/site first. FFCV needs
# OpenCV and libjpeg-turbo built in: without it the check trains from JPEG folders and says so.
#   --out FILE   where the report goes (default: gpu-check.md, or $OUT/gpu-check.md where $OUT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.whl/site" .whl/*.whl
  export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
args=("$@")
if [[ " $* " != *" --out "* ]]; then args+=(--out "${OUT:+$OUT/}gpu-check.md"); fi
exec "$PY" scripts/gpu_check.py "${args[@]}"
