#!/usr/bin/env bash
# One check for a single-GPU machine, in under 8 minutes:
#   0. preflight: every package setup.py asks for (install_requires + the test extra) is
#      installed, and every module the steps below run imports (a missing one names the fix);
#   1. the GPU tests (pytest -m gpu on the modules that declare GPU tests, found by their marker:
#      the rest of the tree is never imported, so a module importing a package this machine
#      lacks cannot stop the check): the CUDA path needs no bridge; bf16 SFT + SEGA steps on
#      Megatron's mixed-precision path; the sampler in bf16 against transformers; SDPA vs local
#      attention; KV-cached vs no-cache decoding; where Transformer Engine imports, TE's layers
#      against SDPA;
#   2. bf16 SFT + SEGA (2 clipped updates of one rollout, KL to a reference) + eval through the
#      CLI, tiny model, one process on the GPU;
#   3. VPP: not run here (it needs pp >= 2 ranks, NCCL refuses two ranks on one GPU; CI runs it on gloo);
#   4. the figures, Llama-3-8B-shaped model cut to 4 layers, bf16: MFU of an SFT, a DPO and a
#      SEGA update step (CUDA events after a warm-up step); one SEGA step split into sample /
#      score / train seconds with the peak memory of each phase; sampler tokens/s at batch 1, 8
#      and 64 against transformers generate (synchronized wall time); entropy-op throughput.
#      packed against padded SFT, DPO and SEGA update steps on the shipped real data
#      (benchmarks/packing.py: tokens/s, padding fraction, step-time ratio);
#      the same SFT and SEGA update steps with rank-16 LoRA (the base frozen, SDPA attention: the
#      single-GPU recipe, examples/sega_llama3_8b_lora.sh) with their peak memory;
#      JSON lands in benchmarks/results/gpu_*.json; every figure is also printed on one
#      "figure:" line, and all of them again at the end.
#
#   bash tools/gpu_check.sh                    # on the GPU machine
#   bash tools/gpu_check.sh --wheels DIR       # first install the wheels in DIR (no registry)
#   bash tools/gpu_check.sh --dry-run          # the same steps at tiny sizes (a rehearsal on CPU)
#   bash tools/gpu_check.sh --make-wheels DIR  # on a connected machine: fill DIR for --wheels
#
# The dry run is the real run with other sizes (the SIZES block below is its only branch): the
# same preflight, the same pytest command over the same modules, the same CLI and benchmark
# modules. tests/e2e/test_demo_and_launchers.py checks that its pytest command is the real one.
#
# What travels (--make-wheels): the packages of setup.py's install_requires and test extra that
# the target machine (torch, transformers, accelerate, peft, pytest, hypothesis, numpy, scipy,
# pyarrow, pyyaml, safetensors, tokenizers, sentencepiece, tensorboard, matplotlib, psutil, tqdm,
# jinja2 with torch) lacks: megatron-core (the only one the steps import; its own requirements
# torch, numpy and packaging are there), and from the test extra gguf, pytest-timeout,
# pytest-xdist (scripts/test.sh's workers; this script runs pytest without them) with its
# execnet, datasets and trl, with the two requirements of datasets the target lacks (dill,
# multiprocess; all pure Python). Wheels for CPython 3.12 on x86-64 Linux, --no-deps, pinned to
# the versions CI runs, 4.3 MB in all (megatron-core 2.37 MB, trl 0.95 MB, datasets 0.61 MB),
# far under the 64 MiB a transfer may carry. `--wheels DIR` installs every wheel in DIR with
# --no-index --no-deps into a fresh private directory (mktemp -d, removed on exit; a fixed /tmp
# path is one another local user could fill first, e.g. with a sitecustomize.py) and puts it on
# PYTHONPATH; the checkout runs from the source tree (no install).
# Transformer Engine cannot travel: it is built against the machine's CUDA toolkit and is far
# larger than a transfer may carry. Without it the TE test is skipped and the TE and
# sequence-parallel paths stay "GPU only, not yet verified" (sequence parallelism also needs
# TP > 1, so two GPUs: NCCL refuses two ranks on one GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
WHEELS_FOR_TARGET=(megatron-core==0.19.2 gguf==0.19.0 pytest-timeout==2.4.0 pytest-xdist==3.8.0
                   execnet==2.1.2 datasets==5.2.0 trl==1.16.0 dill==0.4.1 multiprocess==0.70.19)
DRY=0
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --make-wheels)
      mkdir -p "$2"
      "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$2" "${WHEELS_FOR_TARGET[@]}"
      ls -l "$2"; du -sh "$2"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (use --dry-run, --wheels DIR, --make-wheels DIR)" >&2
       exit 2 ;;
  esac
  shift
done
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [ -n "$WHEELS" ]; then
  SITE="$WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="$ROOT/benchmarks/results"
[ "$DRY" = 1 ] && OUT="$WORK/results"  # rehearsal figures are not GPU figures: removed on exit
mkdir -p "$OUT"
start=$(date +%s)

# SIZES: the dry run's only difference. Real: the 8B shape cut to 4 layers; dry: the tiny preset.
if [ "$DRY" = 1 ]; then
  MODEL=(--preset tiny --layers 2 --vocab 1000)
  TRAIN=(--seq 64 --batch 2 --micro-batch 1 --steps 1)
  SEGA=(--prompts 2 --k 2 --prompt 12 --new 8 --micro-batch 2)
  SAMPLE=(--hidden 128 --layers 2 --vocab 1000 --prompt 16 --new 16)
  ENTROPY=(--tokens 64 --vocab 128256 --repeats 1)
  PACK=(--tiny)
else
  MODEL=(--preset llama3-8b --layers 4)
  TRAIN=(--seq 4096 --batch 4 --micro-batch 1 --steps 3)
  SEGA=(--prompts 8 --k 4 --prompt 128 --new 256 --micro-batch 4)
  SAMPLE=(--hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --layers 4 --vocab 128256 --prompt 128 --new 256)
  ENTROPY=(--tokens 8192 --vocab 128256 --repeats 5)
  PACK=(--hidden 1024 --layers 8 --vocab 32000 --rounds 2 --steps 3)
fi
FIGURES="$WORK/figures.log"
: > "$FIGURES"
step() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }  # where the 8 minutes go

step "preflight"
"$PY" - <<'PY'
import ast, importlib, importlib.metadata as md, re, sys
from pathlib import Path

def requirements(*extras):
    """setup.py's install_requires and the named extras, as distribution names."""
    call = next(n for n in ast.walk(ast.parse(Path("setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in
          ("install_requires", "extras_require")}
    reqs = kw["install_requires"] + [r for e in extras for r in kw["extras_require"][e]]
    return [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in reqs]

def missing(names):
    out = []
    for name in names:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            out.append(name)
    return out

fix = "carry them: --make-wheels DIR on a connected machine, then --wheels DIR here"
if missing(requirements()):
    sys.exit(f"gpu_check: setup.py's requirements not installed: {missing(requirements())}; {fix}")
if missing(requirements("test")):
    print(f"note: test extras not installed (the check does not need them): "
          f"{missing(requirements('test'))}")
# Every module the steps below run (pytest imports the GPU test modules itself).
for name in ("megatron.core", "transformers", "megatron_sega.cli", "benchmarks.train_step",
             "benchmarks.sega_step", "benchmarks.sampler", "benchmarks.entropy_op",
             "benchmarks.packing"):
    try:
        importlib.import_module(name)
    except ImportError as err:
        sys.exit(f"gpu_check: importing {name} failed: {err}; {fix}")
import torch, megatron.core
from megatron_sega.runtime import have_transformer_engine
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
te = "installed" if have_transformer_engine() else "not installed (TE test skipped)"
print(f"device: {name}; torch {torch.__version__}; megatron-core {megatron.core.__version__}; "
      f"Transformer Engine {te}")
PY

step "gpu tests"
# The modules that declare GPU tests (a module-level pytestmark or a test decorated with the gpu
# marker): pytest collects only these, so no other module's imports can stop the check.
mapfile -t GPU_TESTS < <(grep -rlE --include='test_*.py' \
  '^(pytestmark = .*|[[:space:]]*@)pytest\.mark\.gpu([^_[:alnum:]]|$)' tests | sort)
PYTEST=(-m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}")
echo "pytest command: ${PYTEST[*]}"
"$PY" "${PYTEST[@]}"

step "bf16 SFT + SEGA + eval (CLI)"
cat > "$WORK/bf16.yaml" <<'YAML'
model: {preset: tiny, dtype: bf16}
data: {train: examples/demo_data/train.jsonl, eval: examples/demo_data/eval.jsonl,
       template: chat, max_seq_len: 112}
sft: {steps: 4, global_batch_size: 16, micro_batch_size: 8}
sampling: {max_new_tokens: 24}
sega: {k: 4, steps: 2, prompts_per_step: 4, micro_batch_size: 8, lr: 3.0e-4,
       updates_per_rollout: 2, clip_eps: 0.2}
optim: {lr: 3.0e-3, clip_grad: 1.0}
eval: {micro_batch_size: 16}
logging: {progress: false, tensorboard: false}
parallel: {device: auto}
YAML
CLI=("$PY" -m megatron_sega.cli)
"${CLI[@]}" sft --config "$WORK/bf16.yaml" logging.dir="$WORK/sft" \
  checkpoint.save_dir="$WORK/sft/ckpt" > "$WORK/sft.log" 2>&1 || { tail -n 30 "$WORK/sft.log"; exit 1; }
"${CLI[@]}" sega --config "$WORK/bf16.yaml" model.load="$WORK/sft/ckpt" \
  sega.kl_coef=0.1 sega.reference="$WORK/sft/ckpt" logging.dir="$WORK/sega" checkpoint.save_dir="$WORK/sega/ckpt" \
  > "$WORK/sega.log" 2>&1 || { tail -n 30 "$WORK/sega.log"; exit 1; }
"${CLI[@]}" eval --config "$WORK/bf16.yaml" model.load="$WORK/sega/ckpt" \
  eval.out="$WORK/eval" > "$WORK/eval.log" 2>&1 || { tail -n 30 "$WORK/eval.log"; exit 1; }
"$PY" - "$WORK" <<'PY'
import json, math, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = {s: [json.loads(l) for l in (work / s / f"{s}_metrics.jsonl").read_text().splitlines()]
        for s in ("sft", "sega")}
summary = json.loads((work / "eval" / "summary.json").read_text())
assert all(r["update_successful"] for r in rows["sft"]), rows["sft"]
assert all(not r["skipped_update"] and math.isfinite(r["loss"]) for r in rows["sega"]), rows["sega"]
print(f"bf16 ok: SFT loss {rows['sft'][0]['loss']:.3f} -> {rows['sft'][-1]['loss']:.3f}; SEGA "
      f"clip_fraction {[r['clip_fraction'] for r in rows['sega']]}; eval accuracy "
      f"{summary['accuracy']:.3f} on {summary['pairs']} pairs")
PY

step "vpp tests"
# The interleaved schedule needs pp >= 2, i.e. two ranks, and NCCL refuses two ranks on one GPU,
# so this one-GPU check cannot run VPP. Its CPU/gloo tests (tests/e2e/test_vpp_e2e.py and the
# pp2xvpp2 layouts of the distributed tests) run in CI; on GPUs VPP stays "not yet verified".
echo "vpp: not run (needs 2 GPUs with NCCL); verified on CPU/gloo only, in CI"

step "training steps: SFT, DPO, SEGA update (MFU)"
"$PY" -m benchmarks.train_step --stage sft dpo sega "${MODEL[@]}" "${TRAIN[@]}" --dtype bf16 \
  --out "$OUT/gpu_train_step.json" | tee -a "$FIGURES"
step "LoRA steps: SFT, SEGA update (rank 16, peak memory)"
"$PY" -m benchmarks.train_step --stage sft sega --lora-rank 16 "${MODEL[@]}" "${TRAIN[@]}" \
  --dtype bf16 --out "$OUT/gpu_train_step_lora.json" | tee -a "$FIGURES"
step "SEGA step: sample / score / train, peak memory per phase"
"$PY" -m benchmarks.sega_step "${MODEL[@]}" "${SEGA[@]}" --dtype bf16 \
  --out "$OUT/gpu_sega_step.json" | tee -a "$FIGURES"
step "sampler tokens/s"
for b in 1 8 64; do
  "$PY" -m benchmarks.sampler "${SAMPLE[@]}" --batch "$b" --repeats 1 --dtype bf16 \
    --skip no_cache sampler_local --no-tp2-demo --out "$OUT/gpu_sampler_b$b.json" | tee -a "$FIGURES"
done
step "entropy op"
"$PY" -m benchmarks.entropy_op "${ENTROPY[@]}" --dtype bf16 --out "$OUT/gpu_entropy_op.json" \
  | tee -a "$FIGURES"
step "packing: SFT, DPO, SEGA update packed vs padded (real data)"
"$PY" -m benchmarks.packing "${PACK[@]}" --dtype bf16 --attention auto \
  --out "$OUT/gpu_packing.json" | tee -a "$FIGURES"
step "figures"
grep '^figure: ' "$FIGURES"
where="results in $OUT/gpu_*.json"
[ "$DRY" = 1 ] && where="rehearsal: its JSON files are removed on exit"
echo "gpu check done in $(( $(date +%s) - start )) s; $where"
