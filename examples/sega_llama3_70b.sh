#!/usr/bin/env bash
# GEM/SEGA on Llama-3-70B-Instruct (or 3.1) across 4 A100-80GB/H100 nodes (8 GPUs each: TP=8 within
# a node, PP=4 across nodes, examples/configs/sega_llama3_70b.yaml; see its memory per GPU with
# `python -m megatron_sega.cli plan --config examples/configs/sega_llama3_70b.yaml --world-size 32
# --nodes 4 --gpu a100-80g`). More nodes add data parallelism (8 nodes: DP=2).
# convert HF -> SFT -> SEGA -> eval -> convert back, each stage skippable and resumable.
# Submit from the repository root (the job finds the code through $SLURM_SUBMIT_DIR):
#
#   sbatch examples/sega_llama3_70b.sh --hf-dir /models/Meta-Llama-3-70B-Instruct \
#       --work-dir /scratch/$USER/sega-70b --train data/train.jsonl --eval data/eval.jsonl
#   bash examples/sega_llama3_70b.sh --dry-run --hf-dir X --work-dir Y --train A --eval B
#
# Processes per node: NPROC_PER_NODE if set (e.g. CPU nodes with parallel.device=cpu), else
# SLURM_GPUS_ON_NODE, else 8.
#
# Stop and requeue. SLURM sends USR1 to this batch shell 15 minutes before the time limit (or
# `scancel --signal=USR1 --batch JOB`). The trap signals the training processes only (the
# children of each node's torchrun agent, found by this job's rendezvous id; the agent itself has
# no USR1 handler and would die): they save a complete checkpoint, write STOPPED into the stage's
# checkpoint directory and exit. The job then requeues itself with `scontrol requeue`; the new
# run skips the finished stages and resumes the stopped one (checkpoint.resume=auto). Outside
# sft/sega/dpo the running stage finishes and the job requeues before the next one. A stage that
# fails fails the job (no requeue); at most MAX_REQUEUES (default 20) requeues per job.
#SBATCH --job-name=sega-llama3-70b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900
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
# A 70B checkpoint takes longer to save: the USR1 warning comes 15 minutes ahead, and torchrun's
# agent waits 10 minutes after a SIGTERM before it kills the workers.
export PIPELINE_CONFIG="${PIPELINE_CONFIG:-$REPO/examples/configs/sega_llama3_70b.yaml}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
source "$REPO/examples/slurm_job.sh"
