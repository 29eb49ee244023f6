#!/usr/bin/env bash
# GEM/SEGA on Llama-3-8B-Instruct across A100/H100 nodes (8 GPUs each):
# convert HF -> SFT -> SEGA -> eval -> convert back, each stage skippable and resumable.
# Submit from the repository root (the job finds the code through $SLURM_SUBMIT_DIR):
#
#   sbatch examples/sega_llama3_8b.sh --hf-dir /models/Meta-Llama-3-8B-Instruct \
#       --work-dir /scratch/$USER/sega-8b --train data/train.jsonl --eval data/eval.jsonl
#   bash examples/sega_llama3_8b.sh --dry-run --hf-dir X --work-dir Y --train A --eval B
#
# The paper's Table 1 datasets (Skywork, UltraFeedback, PKU-SafeRLHF, RewardBench) as the hub ships
# them, with the options that read them: examples/table1_datasets.yaml.
#
# Processes per node: NPROC_PER_NODE if set (e.g. CPU nodes with parallel.device=cpu), else
# SLURM_GPUS_ON_NODE, else 8.
#
# Stop and requeue. SLURM sends USR1 to this batch shell 10 minutes before the time limit (or
# `scancel --signal=USR1 --batch JOB`). The trap signals the training processes only (the
# children of each node's torchrun agent, found by this job's rendezvous id; the agent itself has
# no USR1 handler and would die): they save a complete checkpoint, write STOPPED into the stage's
# checkpoint directory and exit. The job then requeues itself with `scontrol requeue`; the new
# run skips the finished stages and resumes the stopped one (checkpoint.resume=auto). Outside
# sft/sega/dpo the running stage finishes and the job requeues before the next one. A stage that
# fails fails the job (no requeue); at most MAX_REQUEUES (default 20) requeues per job.
#SBATCH --job-name=sega-llama3-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# (logs/ is part of the repository: SLURM opens this file before the script runs, in the directory
# sbatch was called from, and a job whose output cannot be opened dies without a log.)
set -euo pipefail

REPO="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ ! -f "$REPO/examples/pipeline.sh" ]; then
  echo "error: $REPO is not the megatron-sega repository; run sbatch from its root" >&2; exit 2
fi
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
NODES="${SLURM_NNODES:-1}"
WORLD_SIZE=$((NODES * NPROC_PER_NODE))
MAX_REQUEUES="${MAX_REQUEUES:-20}"
RDZV_ID="${SLURM_JOB_ID:-local}"

# Rendezvous on the first node of the allocation; a port per job, so that jobs sharing a head
# node do not collide.
HEAD_NODE="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || hostname)"
export MASTER_ADDR="$HEAD_NODE" MASTER_PORT="${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}"
# NCCL over InfiniBand; adjust the interface names to the cluster.
export NCCL_IB_DISABLE=0 NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}" \
       NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 CUDA_DEVICE_MAX_CONNECTIONS=1 \
       OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# A preemption SIGTERM reaches the agent too, which forwards it and SIGKILLs the workers after
# this many seconds: leave them the time to save an 8B checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

launch() {  # all nodes, one torchrun per node, c10d rendezvous on the head node
  run_and_wait srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run --nnodes "$NODES" \
    --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d --rdzv-id "$RDZV_ID" \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" "$@"
}
run1() { srun --nodes=1 --ntasks=1 "$PYTHON" "$@"; }

signal_workers() {  # USR1 to the children of this job's torchrun agent on every node
  echo "USR1: asking the workers to checkpoint and stop"
  # The pattern matches an agent's command line (`python -m torch.distributed.run ... --rdzv-id
  # JOB `), not srun's, the workers' (`python -u -m megatron_sega.cli`) or this bash -c.
  local agent="^[^ ]+ -m torch[.]distributed[.]run .*--rdzv-id ${RDZV_ID} "
  srun --overlap --nodes="$NODES" --ntasks-per-node=1 bash -c \
    "agents=\$(pgrep -d, -f '$agent') && pkill -USR1 -P \"\$agents\"" || true
  echo "USR1: workers signalled at $(date +%s.%N)"
}
trap request_stop USR1

on_stopped() {  # a stage stopped with a complete checkpoint: requeue this job to resume it
  if [ -z "${SLURM_JOB_ID:-}" ]; then return 0; fi
  local count="${SLURM_RESTART_COUNT:-0}"
  if [ "$count" -ge "$MAX_REQUEUES" ]; then
    echo "not requeueing: job $SLURM_JOB_ID was requeued $count times (MAX_REQUEUES=$MAX_REQUEUES)"
    return 0
  fi
  echo "requeueing job $SLURM_JOB_ID (restart $((count + 1))) at $(date +%s.%N)"
  scontrol requeue "$SLURM_JOB_ID"  # SLURM ends this run; the job waits in the queue again
}

source "$REPO/examples/pipeline.sh"
pipeline_main "$@"
