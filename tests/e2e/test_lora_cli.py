"""LoRA through the CLI (CPU, tiny model, real processes), from a full-parameter SFT checkpoint:

- DPO with ``lora.rank=4`` and no ``dpo.reference``: the reference is the policy with its
  adapters off, so step 1 logs exactly log 2 (B starts at zero); killed after its first
  checkpoint and resumed, it logs the same metrics and ends with the same weights and Adam
  state, bit for bit, as an uninterrupted run;
- SEGA with LoRA and a KL term runs from the same checkpoint;
- bad ``lora`` options are one line and exit 2.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_run import Run
from tests.e2e.test_dpo_cli import DPO_STEPS, DPO_YAML, sft_checkpoint  # noqa: F401
from tests.e2e.test_resume import (
    _assert_same_checkpoint, _assert_same_metrics, _assert_same_train_state, _kill_and_resume,
    _latest, _metrics, _write,
)

LORA = "lora: {rank: 4, alpha: 8.0}\n"
REPO = Path(__file__).resolve().parents[2]


def test_lora_dpo_starts_at_log2_and_resumes_bitwise(sft_checkpoint, tmp_path):  # noqa: F811
    config = _write(tmp_path / "dpo.yaml", DPO_YAML.replace("LOAD", str(sft_checkpoint)) + LORA)
    sega = Run("sega", tmp_path, "sega", config, f"logging.dir={tmp_path / 'sega'}",
               "sega.kl_coef=0.1", "sega.steps=1", "sega.prompts_per_step=4", "sega.k=2",
               "sega.micro_batch_size=4", "sampling.max_new_tokens=8")
    resumed = _kill_and_resume(tmp_path, "dpo", config, DPO_STEPS)
    assert "lora: rank 4, alpha 8" in resumed and "trainable parameters" in resumed
    sega_out = sega.wait()
    assert "lora: rank 4" in sega_out
    (row,) = _metrics(tmp_path / "sega/sega_metrics.jsonl")
    assert math.isfinite(row["loss"]) and math.isfinite(row["kl_mean"])

    continuous = _metrics(tmp_path / "cont/dpo_metrics.jsonl")
    assert continuous[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(abs(r["loss"] - math.log(2)) > 1e-5 for r in continuous[1:])
    _assert_same_metrics(tmp_path / "cont/dpo_metrics.jsonl",
                         tmp_path / "kill/dpo_metrics.jsonl", DPO_STEPS)
    final_a, final_b = _latest(tmp_path / "cont/ckpt"), _latest(tmp_path / "kill/ckpt")
    _assert_same_checkpoint(final_a, final_b)
    _assert_same_train_state(final_a, final_b)
    # Evaluating the LoRA checkpoint without lora.rank would score the base: refused.
    bad = subprocess.run([sys.executable, "-m", "megatron_sega.cli", "eval", "--config",
                          str(config), "lora.rank=0", f"model.load={final_a}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in bad.stderr.splitlines() if "error" in line]
    assert bad.returncode == 2 and len(errors) == 1, bad.stderr
    assert "lora.rank=4 lora.alpha=8 lora.targets=[linear_qkv,linear_proj,linear_fc1,linear_fc2]" \
        in errors[0], errors
    other = subprocess.run([sys.executable, "-m", "megatron_sega.cli", "eval", "--config",
                            str(config), "lora.rank=8", f"model.load={final_a}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "with other rank than this run's (rank=8)" in other.stderr, \
        other.stderr
    info = json.loads((final_a / "model_optim" / "megatron_sega.json").read_text())
    assert info["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                            "targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    Run("eval", tmp_path, "eval", config, f"model.load={final_a}",
        f"eval.out={tmp_path / 'eval'}").wait()  # with the config's lora: the adapters load
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert 0 <= summary["accuracy"] <= 1 and summary["pairs"] > 0


@pytest.mark.parametrize("override,words", [
    ("lora.rank=-1", "lora.rank must be >= 0"),
    ("lora.alpha=0", "lora.alpha must be > 0"),
    ("lora.targets=[linear_qkv,q_proj]", "unknown target(s) ['q_proj']"),
])
def test_bad_lora_options_are_one_line(override, words):
    run = subprocess.run([sys.executable, "-m", "megatron_sega.cli", "check", override],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert run.returncode == 2 and len(errors) == 1 and words in errors[0], run.stderr
    assert "Traceback" not in run.stderr
