"""The README's first command (shortened) end to end, and the launchers' dry runs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    return env


def test_quick_demo_runs_the_whole_pipeline_at_tp2(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
         "megatron_sega.cli", "demo", "--config", "examples/configs/demo_tiny.yaml",
         "--out", str(out), "--quick", "logging.progress=false"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert ("| stage | preference accuracy [95% CI] | length-normalised [95% CI] | "
            "mean entropy score |") in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["initial", "after SFT", "after SEGA"]
    for stage, name in zip(summary.values(), ("initial", "sft", "sega")):
        # Each row of the table is the stage's own eval, computed from its per-pair records.
        records = [json.loads(line) for line in
                   (out / f"eval_{name}" / "pairs.jsonl").read_text().splitlines()]
        assert stage["pairs"] == len(records) == 160
        won = sum(r["logp_chosen"] > r["logp_rejected"] for r in records) / len(records)
        assert stage["accuracy"] == won
        # Each accuracy in the table carries its 95% Wilson interval.
        low, high = stage["accuracy_ci95"]
        assert low <= won <= high and f"{won:.3f} [{low:.3f}, {high:.3f}]" in result.stdout
        # The table adds the stage's own training wall time to the eval's summary.
        assert {k: v for k, v in stage.items() if k != "train_time_s"} == \
            json.loads((out / f"eval_{name}" / "summary.json").read_text())
    initial, after_sft, after_sega = summary.values()
    # SFT on the chosen responses raises their log-probability by a wide margin; SEGA then moves
    # the weights again (3 quick steps: a small change).
    assert after_sft["mean_logp_chosen"] > initial["mean_logp_chosen"] + 20
    # 20 quick steps: the chosen (reasoned, longer) responses win per token first; the summed
    # accuracy follows with more steps (0.194 -> 0.2 here, 0.750 in the full demo).
    assert after_sft["accuracy_length_normalized"] > initial["accuracy_length_normalized"] + 0.2
    assert after_sft["mean_reward_margin"] > initial["mean_reward_margin"] + 1.0
    assert abs(after_sega["mean_logp_chosen"] - after_sft["mean_logp_chosen"]) > 1e-3
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "sft" / "ckpt" / "latest").is_file() and (out / "sega" / "ckpt" / "latest").is_file()
    sega = [json.loads(line) for line in (out / "sega" / "sega_metrics.jsonl").read_text().splitlines()]
    assert len(sega) == 3 and all("score_mean" in row and "time_sample" in row for row in sega)
    pairs = (out / "eval_sega" / "pairs.jsonl").read_text().splitlines()
    assert set(json.loads(pairs[0])) >= {"id", "logp_chosen", "logp_rejected", "n_tokens_chosen",
                                         "n_tokens_rejected"}


LAUNCHERS = ["examples/sega_llama3_8b.sh", "examples/sega_llama3_8b_single_node.sh",
             "examples/sega_llama3_8b_lora.sh",
             "examples/sega_llama3_70b.sh", "examples/slurm_job.sh",
             "examples/pipeline.sh", "scripts/demo.sh", "scripts/test.sh", "scripts/env.sh",
             "tools/gpu_check.sh"]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_scripts_are_bash_n_clean(script):
    if not (ROOT / script).exists():
        pytest.skip(f"{script} not present")
    result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script,nodes,layout", [
    ("examples/sega_llama3_8b.sh", 1, "tp=8 pp=1 dp=1 world=8"),
    ("examples/sega_llama3_8b_single_node.sh", 1, "tp=8 pp=1 dp=1 world=8"),
    ("examples/sega_llama3_70b.sh", 4, "tp=8 pp=4 dp=1 world=32"),  # its own config by default
    ("examples/sega_llama3_8b_lora.sh", 1, "tp=1 pp=1 dp=1 world=1"),  # one GPU, its own config
])
def test_launcher_dry_run_validates_config_and_world_size(script, nodes, layout, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    args = ["bash", script, "--dry-run", "--hf-dir", str(tmp_path / "hf"), "--work-dir",
            str(tmp_path / "work"), "--train", str(data), "--eval", str(data)]
    env = {**_env(), "SLURM_NNODES": str(nodes)}
    # The refused layout runs beside the good one (one process each, two cores).
    bad_args = [str(tmp_path / "work_bad") if a == str(tmp_path / "work") else a for a in args]
    bad = subprocess.Popen(bad_args + ["parallel.tp=3"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    ok = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _, bad_err = bad.communicate(timeout=300)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    world = int(layout.split("world=")[1])
    assert f"dry run ok: world size {world}" in ok.stdout
    assert ok.stdout.count(f"ok: {layout}") == 4  # sft, sega, eval x2
    if nodes == 4:
        assert "model 80 layers, hidden 8192" in ok.stdout
    assert bad.returncode != 0
    assert f"does not divide WORLD_SIZE({world})" in bad_err


def test_a_bad_override_stops_a_launcher_with_one_line(tmp_path):
    """The launcher reads the layout (parallel.tp/pp) before any stage: a bad override is the
    config's one-line error there, not a traceback, and nothing is created."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    result = subprocess.run(
        ["bash", "examples/sega_llama3_8b.sh", "--hf-dir", str(tmp_path / "hf"), "--work-dir",
         str(tmp_path / "work"), "--train", str(data), "--eval", str(data), "model.attention=bad"],
        cwd=ROOT, env={**_env(), "SLURM_NNODES": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == ("error: model.attention = 'bad' is not one of 'auto', "
                                     "'local', 'sdpa'"), result.stderr
    assert not (tmp_path / "work").exists()


# Stands in for Python in a real (not dry) run of gpu_check.sh: every step before the GPU tests
# passes; `-m pytest ...` writes its arguments down and stops the script.
_FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m pytest" ]; then shift 2; echo "$@" > "$LOG/pytest"; exit 3; fi
exit 0
"""


def _gpu_tests_pytest_selects(env) -> set[str]:
    """The modules of the GPU tests pytest itself selects over the whole tree (-m gpu)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                          "tests", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    return {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}


def test_gpu_check_dry_run_is_the_real_run_at_tiny_sizes(tmp_path):
    """The rehearsal runs the real run's steps: its pytest command is the one a real run
    executes (captured with a stand-in Python), over exactly the modules that hold GPU tests
    (pytest's own -m gpu selection over the whole tree), and it collects them without an error
    (a module that fails to import fails the dry run); then every figure is printed."""
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("== preflight", "device: ", "== gpu tests", "== bf16 SFT + SEGA + eval (CLI)",
                 "bf16 ok: SFT loss", "== vpp tests", "vpp: not run (needs 2 GPUs",
                 "== training steps: SFT, DPO, SEGA update (MFU)",
                 "== LoRA steps: SFT, SEGA update (rank 16, peak memory)", "== SEGA step",
                 "== sampler tokens/s", "== entropy op", "== packing: SFT, DPO, SEGA update",
                 "== figures", "gpu check done"):
        assert step in out, step
    dry_command = next(line for line in out.splitlines() if line.startswith("pytest command: "))
    dry_args = dry_command[len("pytest command: -m pytest "):].split()

    fake = tmp_path / "python"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    real = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=dict(_env(), PYTHON=str(fake), LOG=str(tmp_path)))
    assert real.returncode == 3, real.stdout + real.stderr  # stopped at the GPU tests
    assert (tmp_path / "pytest").read_text().split() == dry_args

    modules = {a for a in dry_args if a.endswith(".py")}
    assert modules == _gpu_tests_pytest_selects(_env())
    summary = out.split("== gpu tests")[1].split("== bf16")[0]
    assert re.search(r"\b\d+ skipped", summary) and "error" not in summary.lower(), summary

    figures = [line for line in out.split("== figures")[1].splitlines()
               if line.startswith("figure: ")]
    for kind in ("SFT step", "DPO step", "SEGA update step", "SEGA step", "entropy+logprob op",
                 "LoRA SFT step", "LoRA SEGA update step"):
        assert any(f"figure: {kind} (" in line for line in figures), kind
    # The LoRA steps train adapters on all four linear layers, the base frozen.
    assert "lora: rank 16, alpha 32, on linear_qkv, linear_proj, linear_fc1, linear_fc2: " in out
    lora = [line for line in figures if line.startswith("figure: LoRA ")]
    assert len(lora) == 2 and all("LoRA rank 16" in line and "peak memory " in line
                                  for line in lora), lora
    assert sum("figure: sampler (" in line and "hf_generate" in line for line in figures) == 3
    assert sum(line.startswith("figure: packing, ") for line in figures) == 3


# Stands in for Python in the LoRA launcher's export stage: `convert.py mcore-to-hf --help` lists
# --peft-adapter when HELP says so; a conversion writes its arguments down.
_FAKE_CONVERT = """#!/usr/bin/env bash
[ "${2:-}" = mcore-to-hf ] && echo "$@" > "$LOG/convert"
exit 0
"""


def test_lora_launcher_exports_a_peft_adapter(tmp_path):
    """The LoRA recipe's export stage asks tools/convert.py for the PEFT adapter."""
    fake = tmp_path / "python"
    fake.write_text(_FAKE_CONVERT)
    fake.chmod(0o755)
    work = tmp_path / "work"
    env = dict(_env(), PYTHON=str(fake), LOG=str(tmp_path))
    result = subprocess.run(
        ["bash", "examples/sega_llama3_8b_lora.sh", "--hf-dir", str(tmp_path / "hf"), "--work-dir",
         str(work), "--train", "t.jsonl", "--eval", "e.jsonl", "--stages", "export"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "convert").read_text().split()[1:] == [
        "mcore-to-hf", "--mcore-dir", f"{work}/sega/ckpt", "--out", f"{work}/hf_sega",
        "--dtype", "bf16", "--peft-adapter"]
