#!/usr/bin/env bash
# The stages of a GEM/SEGA run, shared by the SLURM and single-node launchers.
# Sourced, not run: the launcher defines `launch` (how to start N GPU processes) and `run1`
# (how to run one process), then calls `pipeline_main "$@"`.
#
#   --hf-dir DIR       HF Llama checkpoint to start from (config.json, *.safetensors, tokenizer)
#   --work-dir DIR     where every stage writes (checkpoints, logs, eval, HF export)
#   --train FILE       preference pairs for SFT and SEGA prompts (JSONL / HF datasets dir)
#   --eval FILE        held-out preference pairs
#   --config FILE      (default examples/configs/sega_llama3_8b.yaml)
#   --stages LIST      subset of convert,sft,sega,dpo,eval,export (default: all but dpo, in
#                      order); dpo (the DPO/IPO baseline) starts from the SFT checkpoint too
#   --dry-run          validate the config for each stage against the world size; no GPU needed
#   extra KEY=VALUE    dotted config overrides for every stage (e.g. sega.k=8)
set -euo pipefail

pipeline_main() {
  local hf_dir="" work="" train="" eval="" stages="convert,sft,sega,eval,export" dry=0
  local config="${REPO}/examples/configs/sega_llama3_8b.yaml"
  local overrides=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --hf-dir) hf_dir="$2"; shift 2 ;;
      --work-dir) work="$2"; shift 2 ;;
      --train) train="$2"; shift 2 ;;
      --eval) eval="$2"; shift 2 ;;
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
  tp="$(config_value "$config" parallel.tp "${overrides[@]}")"
  pp="$(config_value "$config" parallel.pp "${overrides[@]}")"
  local common=(--config "$config" "data.train=$train" "data.eval=$eval" "${overrides[@]}")
  local mcore="$work/mcore" sft="$work/sft" sega="$work/sega"

  stage() {  # stage NAME: true when NAME is selected and not already done
    [[ ",$stages," == *",$1,"* ]] || return 1
    if [ -f "$work/.done_$1" ] && [ "$dry" = 0 ]; then echo "== $1: done earlier, skipped"; return 1; fi
    echo "== $1"
  }
  done_stage() { [ "$dry" = 1 ] || touch "$work/.done_$1"; }
  megatron() {  # megatron SUBCOMMAND ARGS...: the dry run validates instead of running
    if [ "$dry" = 1 ]; then  # shapes from the HF config when it is here, else the 8B preset
      local shape="model.preset=llama3-8b"
      [ -f "$hf_dir/config.json" ] && shape="model.hf_config=$hf_dir/config.json"
      "$PYTHON" -m megatron_sega.cli check --world-size "$WORLD_SIZE" "${@:2}" "$shape"
    else
      launch -m megatron_sega.cli "$@"
    fi
  }
  [ "$dry" = 1 ] || mkdir -p "$work"

  if stage convert; then
    [ "$dry" = 1 ] || run1 "$REPO/tools/convert.py" hf-to-mcore --hf-dir "$hf_dir" --out "$mcore" \
      --tp "$tp" --pp "$pp" --dtype bf16
    done_stage convert
  fi
  if stage sft; then
    megatron sft "${common[@]}" "model.load=$mcore" "logging.dir=$sft" "checkpoint.save_dir=$sft/ckpt"
    done_stage sft
  fi
  if stage sega; then
    megatron sega "${common[@]}" "model.load=$sft/ckpt" "logging.dir=$sega" "checkpoint.save_dir=$sega/ckpt"
    done_stage sega
  fi
  if stage dpo; then
    megatron dpo "${common[@]}" "model.load=$sft/ckpt" "logging.dir=$work/dpo" "checkpoint.save_dir=$work/dpo/ckpt"
    done_stage dpo
  fi
  if stage eval; then
    for name in sft sega dpo; do  # what this run trains or an earlier one left
      [[ ",$stages," == *",$name,"* ]] || [ -d "$work/$name/ckpt" ] || continue
      megatron eval "${common[@]}" "model.load=$work/$name/ckpt" "eval.out=$work/eval_$name" \
        "eval.reference=$mcore"
    done
    done_stage eval
  fi
  if stage export; then
    [ "$dry" = 1 ] || run1 "$REPO/tools/convert.py" mcore-to-hf --mcore-dir "$sega/ckpt" \
      --out "$work/hf_sega" --dtype bf16
    done_stage export
  fi
  if [ "$dry" = 1 ]; then echo "dry run ok: world size $WORLD_SIZE"; else echo "pipeline finished: $work"; fi
}

config_value() {  # config_value FILE KEY [OVERRIDES...]: a resolved config value
  "$PYTHON" - "$@" <<'PY'
import sys
from megatron_sega.config import load_config
path, key, *overrides = sys.argv[1:]
value = load_config(path, [o for o in overrides if "=" in o])
for part in key.split("."):
    value = getattr(value, part)
print(value)
PY
}
