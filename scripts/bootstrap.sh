# Sourced by scripts/quickstart and scripts/test: makes sure .venv holds fedq.
# torch goes in first, pinned to the CPU build 2.13.0, so that installing the
# project (torch>=2.2,<3) never pulls a multi-gigabyte CUDA build.
# Override with FEDQ_VENV (where), PYTHON (which interpreter), FEDQ_TORCH (torch spec),
# FEDQ_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu on a Linux laptop),
# FEDQ_EXTRAS (the project's extras, default all,dev; the Dockerfile's image: all).
set -euo pipefail
FEDQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FEDQ_VENV=${FEDQ_VENV:-$FEDQ_ROOT/.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "fedq needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$FEDQ_VENV/bin/python" ]; then
  echo "creating $FEDQ_VENV" >&2
  "$PYTHON" -m venv "$FEDQ_VENV"
fi
stamp="$FEDQ_VENV/.fedq-installed"
if [ ! -f "$stamp" ] || [ "$FEDQ_ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "installing fedq and its dependencies into $FEDQ_VENV" >&2
  pip_args=(-q --disable-pip-version-check)
  "$FEDQ_VENV/bin/python" -m pip install "${pip_args[@]}" --upgrade pip
  if ! "$FEDQ_VENV/bin/python" -c 'import torch' 2>/dev/null; then
    torch_args=("${FEDQ_TORCH:-torch==2.13.0}")
    if [ -n "${FEDQ_TORCH_INDEX:-}" ]; then torch_args+=(--index-url "$FEDQ_TORCH_INDEX"); fi
    "$FEDQ_VENV/bin/python" -m pip install "${pip_args[@]}" "${torch_args[@]}"
  fi
  # all: the aggregator, simulation and participant extras (a bank alone needs only
  # `pip install "fedq[participant]"`); dev: the test, lint and type-check tools.
  "$FEDQ_VENV/bin/python" -m pip install "${pip_args[@]}" -e "$FEDQ_ROOT[${FEDQ_EXTRAS:-all,dev}]"
  touch "$stamp"
fi
export PATH="$FEDQ_VENV/bin:$PATH"
