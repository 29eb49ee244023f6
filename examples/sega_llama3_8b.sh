#!/usr/bin/env bash
# GEM/SEGA on Llama-3-8B-Instruct across A100/H100 nodes (8 GPUs each):
# convert HF -> SFT -> SEGA -> eval -> convert back, each stage skippable and resumable.
#
#   sbatch examples/sega_llama3_8b.sh --hf-dir /models/Meta-Llama-3-8B-Instruct \
#       --work-dir /scratch/$USER/sega-8b --train data/train.jsonl --eval data/eval.jsonl
#   bash examples/sega_llama3_8b.sh --dry-run --hf-dir X --work-dir Y --train A --eval B
#
# Preemption: SLURM signals the batch shell (USR1) 10 minutes before the end; the trap asks every
# worker to checkpoint and exit; --requeue restarts the job, which resumes from the latest
# complete checkpoint (checkpoint.resume=auto) and skips finished stages.
#SBATCH --job-name=sega-llama3-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

REPO="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
NODES="${SLURM_NNODES:-1}"
WORLD_SIZE=$((NODES * GPUS_PER_NODE))

# Rendezvous on the first node of the allocation.
HEAD_NODE="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || hostname)"
export MASTER_ADDR="$HEAD_NODE" MASTER_PORT="${MASTER_PORT:-29500}"
# NCCL over InfiniBand; adjust the interface names to the cluster.
export NCCL_IB_DISABLE=0 NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}" \
       NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 CUDA_DEVICE_MAX_CONNECTIONS=1 \
       OMP_NUM_THREADS=8

launch() {  # all nodes, one torchrun per node, c10d rendezvous on the head node
  srun --kill-on-bad-exit=1 "$REPO/.venv/bin/torchrun" --nnodes "$NODES" \
    --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d --rdzv-id "${SLURM_JOB_ID:-local}" \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" "$@" &
  local pid=$!
  wait "$pid" || wait "$pid"  # a trapped signal interrupts the first wait
}
run1() { srun --nodes=1 --ntasks=1 "$PYTHON" "$@"; }

checkpoint_now() {
  echo "USR1: asking the workers to checkpoint and stop"
  srun --overlap --ntasks-per-node=1 pkill -USR1 -f "megatron_sega.cli" || true
}
trap checkpoint_now USR1

source "$REPO/examples/pipeline.sh"
mkdir -p "$REPO/logs"
pipeline_main "$@"
