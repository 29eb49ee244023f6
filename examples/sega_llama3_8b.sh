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
source "$REPO/examples/slurm_job.sh"
