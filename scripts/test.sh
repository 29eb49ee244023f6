#!/usr/bin/env bash
# The test suite (unit, distributed on gloo processes, end-to-end), on CPU. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
# Two workers (pytest-xdist) keep both cores busy: many tests run one process at a time, or wait
# on a scheduler. Whole modules go to a worker (tests/conftest.py groups them);
# TEST_WORKERS=0 runs one process.
exec "$VENV_PY" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder "$@"
