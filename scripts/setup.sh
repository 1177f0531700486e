#!/usr/bin/env bash
# Create .venv with jaxllm installed editable: the pinned stack (constraints.txt) where it installs (Python 3.12),
# else the package's own looser bounds. The last line says which. PYTHON=/path/to/python picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

version_of() {  # "3.12" for an interpreter >= 3.11, nothing otherwise
  "$@" -c 'import sys; v = sys.version_info; print(f"{v[0]}.{v[1]}") if v >= (3, 11) else None' 2>/dev/null
}

rank() {  # lower is better: 3.12 (what the pins and the GPU machines use), then newer, then 3.11
  case "$1" in 3.12) echo 0;; 3.11) echo 2;; *) echo 1;; esac
}

find_python() {  # $PYTHON if given, else the best of python3.x on PATH and pyenv's installed versions
  if [ -n "${PYTHON:-}" ]; then
    [ -n "$(version_of "$PYTHON")" ] && echo "$PYTHON"
    return 0
  fi
  local best="" best_rank=9 v cand cands=()
  for name in python3.12 python3.13 python3.11 python3 python; do
    cand=$(command -v "$name" 2>/dev/null) && cands+=("$cand")
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[1-9]'); do
      cands+=("$(pyenv root)/versions/$v/bin/python3")
    done
  fi
  for cand in "${cands[@]}"; do
    v=$(version_of "$cand") || continue
    [ -n "$v" ] && [ "$(rank "$v")" -lt "$best_rank" ] && best=$cand best_rank=$(rank "$v")
  done
  echo "$best"
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  if [ -z "$py" ]; then
    echo "setup: no Python >= 3.11 found (looked at \$PYTHON, python3.x on PATH and pyenv); install Python 3.12" >&2
    exit 1
  fi
  "$py" -m venv .venv
fi
quiet() { grep -v -e '^WARNING: Location' -e '^$' || true; }
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
if .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" 2>/tmp/jaxllm-setup-$$.log; then
  pins="the pinned stack (constraints.txt)"
else
  quiet </tmp/jaxllm-setup-$$.log | tail -n 3 >&2
  echo "setup: the pinned stack does not install on Python $(version_of .venv/bin/python); using looser bounds" >&2
  .venv/bin/python -m pip install -q -e ".[dev]" >/tmp/jaxllm-setup-$$.log 2>&1 || {
    quiet </tmp/jaxllm-setup-$$.log | tail -n 5 >&2; echo "setup: pip failed (above)" >&2; exit 1; }
  pins="the looser bounds of pyproject.toml (constraints.txt needs Python 3.12)"
fi
rm -f /tmp/jaxllm-setup-$$.log
.venv/bin/python -c 'import sys, jax, jaxllm; print(f"jaxllm ready: Python {sys.version.split()[0]}, jax {jax.__version__}, ", end="")'
echo "$pins"
