#!/usr/bin/env bash
# GEM/SEGA on Llama-3-8B-Instruct with LoRA on ONE GPU (the brief's small-scale path, issue 21):
# convert HF -> SFT (adapters) -> SEGA (the same adapters, continued) -> eval -> export the
# adapter as a Hugging Face PEFT directory. The stages are examples/pipeline.sh's; the config is
# examples/configs/sega_llama3_8b_lora.yaml (rank 16, bf16 frozen base, sdpa attention, tp=pp=1).
#
#   bash examples/sega_llama3_8b_lora.sh --hf-dir /models/Meta-Llama-3-8B-Instruct \
#       --work-dir runs/sega-8b-lora --train data/train.jsonl --eval data/eval.jsonl
#   bash examples/sega_llama3_8b_lora.sh --dry-run ...     (no GPU needed)
#
# Every option of examples/pipeline.sh applies (--stages, --config, KEY=VALUE overrides).
# Export: `tools/convert.py mcore-to-hf --peft-adapter` writes adapter_config.json +
# adapter_model.safetensors for `peft.PeftModel.from_pretrained` on the HF base (empty
# EXPORT_FLAGS: merged HF weights instead).
# Stop with `kill -USR1` on this script; rerun the same command to resume (see pipeline.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
NPROC_PER_NODE=1
WORLD_SIZE=1
PIPELINE_CONFIG="${PIPELINE_CONFIG:-$REPO/examples/configs/sega_llama3_8b_lora.yaml}"
EXPORT_FLAGS=(--peft-adapter)  # pipeline.sh's export stage: the adapter, not merged weights
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

launch() {
  run_and_wait "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 "$@"
}
run1() { "$PYTHON" "$@"; }
signal_workers() { pkill -USR1 -P "$LAUNCH_PID" || true; }  # the worker, not torchrun
trap request_stop USR1

source "$REPO/examples/pipeline.sh"
pipeline_main "$@"
