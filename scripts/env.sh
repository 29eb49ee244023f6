#!/usr/bin/env bash
# Source me: makes sure .venv exists with the project installed, then exports VENV_PY.
# Finds Python 3.12+ on PATH or through pyenv; re-installs only when setup.py changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
  local candidate
  for candidate in python3.12 python3.13 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version
    version="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.|$)' | sort -V | head -n 1 || true)"
    if [ -n "$version" ]; then
      echo "$(pyenv root)/versions/$version/bin/python"; return 0
    fi
  fi
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)" || { echo "error: Python 3.12+ not found on PATH or in pyenv; install Python 3.12" >&2; exit 1; }
  echo "creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(cat "$ROOT/setup.py" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "installing megatron-sega and its test dependencies into $VENV (about 2 minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import megatron.core, megatron_sega" \
    || { echo "error: installation failed; see the pip output above" >&2; exit 1; }
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
export VENV_PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
