#!/usr/bin/env bash
# One check for a single-GPU machine, in under 8 minutes: the GPU tests, then the benchmarks with a
# Llama-3-8B-shaped model cut to a few layers (bf16): training-step MFU, sampler tokens/s at
# batch 1, 8 and 64, entropy-op throughput. Results land in benchmarks/results/gpu_*.json.
#
#   bash tools/gpu_check.sh              # on the GPU machine
#   bash tools/gpu_check.sh --dry-run    # the same steps at tiny sizes on CPU (a rehearsal)
#
# A machine without registry access: on a connected machine of the same Python (3.12) run
#   pip download megatron-core==0.19.2 --no-deps -d wheels/
# (plus any other missing wheel), carry wheels/ over, then
#   pip install --no-index --find-links wheels/ megatron-core==0.19.2 && pip install --no-deps -e .
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="$ROOT/benchmarks/results"
[ "$DRY" = 1 ] && OUT="$(mktemp -d)"  # rehearsal figures are not GPU figures: keep them out
mkdir -p "$OUT"
start=$(date +%s)

"$PY" - <<'PY'
import torch, megatron.core
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
print(f"device: {name}; torch {torch.__version__}; megatron-core {megatron.core.__version__}")
PY

echo "== gpu tests"
if [ "$DRY" = 1 ]; then
  "$PY" -m pytest -q -m gpu tests/unit/test_gpu.py -p no:cacheprovider | tail -n 2
else
  "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
fi

if [ "$DRY" = 1 ]; then
  TRAIN=(--preset tiny --layers 2 --seq 128 --batch 2 --micro-batch 1 --steps 1 --no-baseline)
  SAMPLE=(--hidden 128 --layers 2 --vocab 1000 --prompt 16 --new 16 --repeats 1)
  ENTROPY=(--tokens 64 --vocab 128256 --repeats 1)
  BATCHES=(1 8)
else
  TRAIN=(--preset llama3-8b --layers 4 --seq 4096 --batch 4 --micro-batch 1 --steps 3 --dtype bf16 --no-baseline)
  SAMPLE=(--hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --layers 4 --vocab 128256 --prompt 128 --new 256 --repeats 1 --dtype bf16 --skip no_cache sampler_local)
  ENTROPY=(--tokens 8192 --vocab 128256 --dtype bf16 --repeats 5)
  BATCHES=(1 8 64)
fi

echo "== training step (MFU)"
"$PY" -m benchmarks.train_step "${TRAIN[@]}" --out "$OUT/gpu_train_step.json"
echo "== sampler tokens/s"
for b in "${BATCHES[@]}"; do
  "$PY" -m benchmarks.sampler "${SAMPLE[@]}" --batch "$b" --out "$OUT/gpu_sampler_b$b.json"
done
echo "== entropy op"
"$PY" -m benchmarks.entropy_op "${ENTROPY[@]}" --out "$OUT/gpu_entropy_op.json"
echo "gpu check done in $(( $(date +%s) - start )) s; results in $OUT/gpu_*.json"
