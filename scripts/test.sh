#!/usr/bin/env bash
# The test suite (unit, distributed on gloo processes, end-to-end), on CPU. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$VENV_PY" -m pytest -q "$@"
