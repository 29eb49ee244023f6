#!/usr/bin/env bash
# GEM/SEGA on Llama-3-8B-Instruct on one 8-GPU node with plain torchrun:
# convert HF -> SFT -> SEGA -> eval -> convert back, each stage skippable and resumable.
#
#   bash examples/sega_llama3_8b_single_node.sh --hf-dir /models/Meta-Llama-3-8B-Instruct \
#       --work-dir runs/sega-8b --train data/train.jsonl --eval data/eval.jsonl
#   bash examples/sega_llama3_8b_single_node.sh --dry-run ...     (no GPU needed)
#
# The paper's Table 1 datasets (Skywork, UltraFeedback, PKU-SafeRLHF, RewardBench) as the hub ships
# them, with the options that read them: examples/table1_datasets.yaml.
#
# Processes: NPROC_PER_NODE (or GPUS), default 8; with parallel.device=cpu it runs on CPUs.
#
# Stop a stage with `kill -USR1` (or SIGTERM) on its workers, the children of torchrun
# (`pkill -USR1 -P <torchrun pid>`), or with `kill -USR1` on this script: the workers save a
# complete checkpoint and exit, and this script exits 75 without marking the stage done. Rerun the
# same command to resume it (checkpoint.resume=auto) and skip the finished stages.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${GPUS:-8}}"
WORLD_SIZE="$NPROC_PER_NODE"
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

launch() {
  run_and_wait "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node "$NPROC_PER_NODE" "$@"
}
run1() { "$PYTHON" "$@"; }
signal_workers() { pkill -USR1 -P "$LAUNCH_PID" || true; }  # the workers, not torchrun
trap request_stop USR1

source "$REPO/examples/pipeline.sh"
pipeline_main "$@"
