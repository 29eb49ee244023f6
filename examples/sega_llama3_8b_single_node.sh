#!/usr/bin/env bash
# GEM/SEGA on Llama-3-8B-Instruct on one 8-GPU node with plain torchrun:
# convert HF -> SFT -> SEGA -> eval -> convert back, each stage skippable and resumable.
#
#   bash examples/sega_llama3_8b_single_node.sh --hf-dir /models/Meta-Llama-3-8B-Instruct \
#       --work-dir runs/sega-8b --train data/train.jsonl --eval data/eval.jsonl
#   bash examples/sega_llama3_8b_single_node.sh --dry-run ...     (no GPU needed)
#
# Stop a stage with `kill -USR1` on its workers (or SIGTERM): it checkpoints and exits; rerun the
# same command to resume (checkpoint.resume=auto) and skip finished stages.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
GPUS="${GPUS:-8}"
WORLD_SIZE="$GPUS"
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=8

launch() { "$REPO/.venv/bin/torchrun" --standalone --nproc-per-node "$GPUS" "$@"; }
run1() { "$PYTHON" "$@"; }

source "$REPO/examples/pipeline.sh"
pipeline_main "$@"
