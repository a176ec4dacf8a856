#!/usr/bin/env bash
# Create (or update) the project's virtual environment: torch 2.14.1 + torchvision 0.29.1, the pack's
# requirements and the test requirements. No dependency may replace torch (constraint file below).
#   usage: bash scripts/setup_venv.sh [VENV_DIR]    (default: .venv in the repository)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
# No wheel cache: the torch build alone is ~5.5 GB installed, and a cached copy of every wheel beside it
# has filled small CI disks before (ENOSPC during the install).
export PIP_NO_CACHE_DIR=1
NEED_GB=8
FREE_KB=$(df -Pk "$(dirname "$VENV")" 2>/dev/null | awk 'NR==2 {print $4}')
if [ -n "${FREE_KB:-}" ] && [ "$FREE_KB" -lt $((NEED_GB * 1024 * 1024)) ]; then
  echo "setup_venv: only $((FREE_KB / 1024)) MiB free at $(dirname "$VENV"); the venv needs about ${NEED_GB} GiB (torch 2.14.1 is a CUDA build)." >&2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -U pip
CONSTRAINTS="$(mktemp)"; trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" -c "$CONSTRAINTS"
"$VENV/bin/python" -c "import torch, torchvision, diffusers; print('venv ready:', torch.__version__, torchvision.__version__, 'diffusers', diffusers.__version__)"
