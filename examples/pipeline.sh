#!/usr/bin/env bash
# The stages of a GEM/SEGA run, shared by the SLURM and single-node launchers.
# Sourced, not run: the launcher defines `launch` (how to start N GPU processes), `run1` (how to
# run one process) and `signal_workers` (send USR1 to the training processes, not to torchrun),
# optionally `on_stopped` and the array EXPORT_FLAGS (extra flags of the export stage's
# `tools/convert.py mcore-to-hf`, e.g. --peft-adapter), then calls `pipeline_main "$@"`.
#
#   --hf-dir DIR       HF Llama checkpoint to start from (config.json, *.safetensors, tokenizer)
#   --work-dir DIR     where every stage writes (checkpoints, logs, eval, HF export)
#   --train FILE       preference pairs for SFT and SEGA prompts (JSONL / HF datasets dir)
#   --eval FILE        held-out preference pairs
#   --eval-name NAME   names this evaluation set: eval writes eval_<model>_NAME and is done once
#                      per name, so `--stages eval` with another --eval and name adds a set
#                      (examples/table1_datasets.yaml: the paper's Table 1 sets)
#   --config FILE      (default $PIPELINE_CONFIG, else examples/configs/sega_llama3_8b.yaml)
#   --stages LIST      subset of convert,sft,sega,dpo,eval,export (default: all but dpo, in
#                      order); dpo (the DPO/IPO baseline) starts from the SFT checkpoint too
#   --dry-run          validate the config for each stage against the world size; no GPU needed
#   extra KEY=VALUE    dotted config overrides for every stage (e.g. sega.k=8)
#
# Stop and resume. `request_stop` (the launchers trap USR1 with it) asks the running sft, sega or
# dpo workers to checkpoint and stop; during another stage (convert, eval, export) it lets that
# stage finish and stops before the next. A worker that stops writes checkpoint.save_dir/STOPPED
# once its checkpoint is complete and exits 75; torchrun reports any worker exit as 1, so a stage
# counts as stopped when that marker exists, whatever the exit code. A stopped stage is never
# marked done: the pipeline calls `on_stopped` (the SLURM launcher requeues the job there) and
# exits 75 (RESUME_EXIT_CODE); run the same command again to skip the finished stages and resume
# the stopped one from its checkpoint (checkpoint.resume=auto). Any other non-zero exit of a stage
# fails the pipeline with that code.
# The converters are idempotent (tools/convert.py): a job killed after a conversion finished but
# before its stage was marked done reruns it as a no-op.
set -euo pipefail

RESUME_EXIT_CODE=75   # = megatron_sega.checkpoint.stop.RESUME_EXIT_CODE
STOP_MARKER=STOPPED   # = megatron_sega.checkpoint.names.STOP_MARKER
STOP_REQUESTED=0
TRAPPED=0
CURRENT_STAGE=""
LAUNCH_PID=""

request_stop() {  # trap handler: checkpoint-and-stop the training stage, or stop after this stage
  STOP_REQUESTED=1
  TRAPPED=1
  echo "stop requested at $(date +%s.%N) during stage '${CURRENT_STAGE:-none}'"
  case "$CURRENT_STAGE" in
    sft|sega|dpo)  # the training stages: they checkpoint on USR1
      if [ -n "$LAUNCH_PID" ]; then
        signal_workers
        # Again every 10 s while the stage runs: workers that torchrun had not started yet
        # (rendezvous) must get it too; a worker that already stops just ignores it.
        (i=0; while sleep 1 && kill -0 "$LAUNCH_PID" 2>/dev/null; do
           i=$((i + 1)); [ $((i % 10)) != 0 ] || signal_workers >/dev/null; done) &
      fi ;;
    *) echo "the current stage does not checkpoint: it finishes, the pipeline stops after it" ;;
  esac
}

run_and_wait() {  # run_and_wait CMD...: run CMD in the background and return its exit code, so
  # that a trapped signal runs its handler at once (bash defers traps during a foreground child)
  "$@" &
  LAUNCH_PID=$!
  local rc
  while :; do
    TRAPPED=0 rc=0
    wait "$LAUNCH_PID" || rc=$?
    [ "$TRAPPED" = 1 ] && [ "$rc" -gt 128 ] || break  # a trap interrupted the wait: wait on
  done
  LAUNCH_PID=""
  return "$rc"
}

pipeline_main() {
  local hf_dir="" work="" train="" eval="" eval_name="" stages="convert,sft,sega,eval,export" dry=0
  local config="${PIPELINE_CONFIG:-${REPO}/examples/configs/sega_llama3_8b.yaml}"
  local overrides=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --hf-dir) hf_dir="$2"; shift 2 ;;
      --work-dir) work="$2"; shift 2 ;;
      --train) train="$2"; shift 2 ;;
      --eval) eval="$2"; shift 2 ;;
      --eval-name) eval_name="_$2"; shift 2 ;;
      --config) config="$2"; shift 2 ;;
      --stages) stages="$2"; shift 2 ;;
      --dry-run) dry=1; shift ;;
      *=*) overrides+=("$1"); shift ;;
      *) echo "error: unknown argument '$1' (see the header of examples/pipeline.sh)" >&2; return 2 ;;
    esac
  done
  if [ -z "$work" ] || [ -z "$train" ] || [ -z "$eval" ] || [ -z "$hf_dir" ]; then
    echo "error: --hf-dir, --work-dir, --train and --eval are required" >&2; return 2
  fi
  local tp pp
  tp="$(config_value "$config" parallel.tp "${overrides[@]}")" || return 2
  pp="$(config_value "$config" parallel.pp "${overrides[@]}")" || return 2
  local common=(--config "$config" "data.train=$train" "data.eval=$eval" "${overrides[@]}")
  local mcore="$work/mcore" sft="$work/sft" sega="$work/sega"

  stopped() {  # stopped NAME: NAME is unfinished; exit with the resume code, never marking it done
    echo "== $1: stopped at $(date +%s.%N); rerun the same command to resume it"
    if declare -F on_stopped >/dev/null; then on_stopped "$1"; fi
    exit "$RESUME_EXIT_CODE"
  }
  stage() {  # stage NAME [MARKER]: true when NAME is selected and not already done (as MARKER)
    [[ ",$stages," == *",$1,"* ]] || return 1
    local marker="${2:-$1}"
    if [ -f "$work/.done_$marker" ] && [ "$dry" = 0 ]; then echo "== $marker: done earlier, skipped"; return 1; fi
    if [ "$STOP_REQUESTED" = 1 ]; then stopped "$1"; fi
    CURRENT_STAGE="$1"
    echo "== $1 (started at $(date +%s.%N))"
  }
  done_stage() { CURRENT_STAGE=""; [ "$dry" = 1 ] || touch "$work/.done_$1"; }
  megatron() {  # megatron SUBCOMMAND ARGS...: the dry run validates instead of running
    if [ "$dry" = 1 ]; then  # shapes from the HF config when it is here, else the config's preset
      local shape=()
      [ -f "$hf_dir/config.json" ] && shape=("model.hf_config=$hf_dir/config.json")
      "$PYTHON" -m megatron_sega.cli check --world-size "$WORLD_SIZE" "${@:2}" "${shape[@]}"
    else
      launch -m megatron_sega.cli "$@"
    fi
  }
  train() {  # train NAME DIR ARGS...: an sft/sega/dpo stage writing DIR; stopped, failed or done
    local name="$1" dir="$2" rc=0
    shift 2
    [ "$dry" = 1 ] || rm -f "$dir/ckpt/$STOP_MARKER"
    if [ "$STOP_REQUESTED" = 1 ]; then stopped "$name"; fi  # asked before the launch
    megatron "$name" "$@" "logging.dir=$dir" "checkpoint.save_dir=$dir/ckpt" || rc=$?
    if [ "$dry" = 0 ] && [ -f "$dir/ckpt/$STOP_MARKER" ]; then stopped "$name"; fi
    if [ "$rc" != 0 ]; then
      echo "== $name failed (exit $rc)" >&2
      [ "$rc" != "$RESUME_EXIT_CODE" ] || rc=1  # no marker: not a stop
      exit "$rc"
    fi
  }
  [ "$dry" = 1 ] || mkdir -p "$work"

  if stage convert; then
    [ "$dry" = 1 ] || run1 "$REPO/tools/convert.py" hf-to-mcore --hf-dir "$hf_dir" --out "$mcore" \
      --tp "$tp" --pp "$pp" --dtype bf16
    done_stage convert
  fi
  if stage sft; then
    train sft "$sft" "${common[@]}" "model.load=$mcore"
    done_stage sft
  fi
  if stage sega; then
    train sega "$sega" "${common[@]}" "model.load=$sft/ckpt"
    done_stage sega
  fi
  if stage dpo; then
    train dpo "$work/dpo" "${common[@]}" "model.load=$sft/ckpt"
    done_stage dpo
  fi
  if stage eval "eval$eval_name"; then
    for name in sft sega dpo; do  # what this run trains or an earlier one left
      [[ ",$stages," == *",$name,"* ]] || [ -d "$work/$name/ckpt" ] || continue
      megatron eval "${common[@]}" "model.load=$work/$name/ckpt" \
        "eval.out=$work/eval_$name$eval_name" "eval.reference=$mcore"
    done
    done_stage "eval$eval_name"
  fi
  if stage export; then
    [ "$dry" = 1 ] || run1 "$REPO/tools/convert.py" mcore-to-hf --mcore-dir "$sega/ckpt" \
      --out "$work/hf_sega" --dtype bf16 ${EXPORT_FLAGS[@]+"${EXPORT_FLAGS[@]}"}
    done_stage export
  fi
  if [ "$dry" = 1 ]; then echo "dry run ok: world size $WORLD_SIZE"; else echo "pipeline finished: $work"; fi
}

config_value() {  # config_value FILE KEY [OVERRIDES...]: a resolved config value
  "$PYTHON" - "$@" <<'PY'
import sys
from megatron_sega.config import load_config
from megatron_sega.errors import UserError
path, key, *overrides = sys.argv[1:]
try:
    value = load_config(path, [o for o in overrides if "=" in o])
except UserError as err:  # a bad config or override: one line, as the CLI prints it
    sys.exit(f"error: {err}")
for part in key.split("."):
    value = getattr(value, part)
print(value)
PY
}
