#!/usr/bin/env bash
# Create .venv on Python 3.12 with the pinned stack (constraints.txt) and jaxllm installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."
py=""
for cand in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 python3; do
  if PYENV_VERSION=$(ls /root/.pyenv/versions 2>/dev/null | grep '^3\.12' | head -n1) "$cand" -c \
      'import sys; assert sys.version_info[:2] >= (3, 11)' 2>/dev/null; then py=$cand; break; fi
done
[ -n "$py" ] || { echo "setup: no Python >= 3.11 found; install Python 3.12" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  PYENV_VERSION=$(ls /root/.pyenv/versions 2>/dev/null | grep '^3\.12' | head -n1) "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import jaxllm, jax; print("jaxllm ready: jax", jax.__version__)'
