#!/usr/bin/env bash
# The CPU demo: eval -> SFT -> eval -> SEGA -> eval on the tiny model and shipped data, TP=2.
# Extra args are passed on (e.g. --out DIR, --quick, sega.steps=10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m megatron_sega.cli demo \
  --config examples/configs/demo_tiny.yaml "$@"
