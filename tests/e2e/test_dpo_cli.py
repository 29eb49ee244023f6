"""``megatron-sega dpo`` end to end through the CLI in real processes (CPU, tiny model), from an
SFT checkpoint, as the pipeline runs it.

- Step 1 starts with policy == reference (the default reference is ``model.load``): the logged
  DPO loss is log 2, the IPO loss ``1 / (4 beta^2)`` (there with ``dpo.reference`` given
  explicitly), with zero margin and zero reward accuracy; later steps move away from them.
- A DPO run SIGKILLed after its first checkpoint and resumed with ``--resume auto`` logs the same
  per-step metrics and ends with the same weights and Adam state, bit for bit, as an
  uninterrupted run (the resumed run's reference is the starting checkpoint, not the resumed
  weights: otherwise its losses would differ).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_sega.checkpoint.manager import read_tensors
from tests.cli_run import Run
from tests.e2e.test_resume import (
    DATA, _assert_same_checkpoint, _assert_same_metrics, _assert_same_train_state,
    _kill_and_resume, _latest, _metrics, _write,
)

DPO_STEPS, DPO_INTERVAL, BETA = 8, 2, 0.1
SFT_YAML = f"""\
model: {{preset: tiny}}
data: {{{DATA}, max_seq_len: 64}}
sft: {{steps: 3, global_batch_size: 16, micro_batch_size: 8}}
optim: {{lr: 3.0e-3}}
logging: {{progress: false, tensorboard: false}}
"""
DPO_YAML = f"""\
model: {{preset: tiny, load: LOAD}}
data: {{{DATA}, max_seq_len: 64}}
dpo: {{steps: {DPO_STEPS}, global_batch_size: 16, micro_batch_size: 4, beta: {BETA}}}
optim: {{lr: 1.0e-3}}
logging: {{progress: false, tensorboard: false}}
checkpoint: {{save_interval: {DPO_INTERVAL}}}
"""


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo_sft")
    config = _write(root / "sft.yaml", SFT_YAML)
    Run("sft", root, "sft", config, f"logging.dir={root}",
        f"checkpoint.save_dir={root / 'ckpt'}").wait()
    return root / "ckpt"


def test_dpo_starts_at_log2_and_resumes_bitwise(sft_checkpoint, tmp_path):
    config = _write(tmp_path / "dpo.yaml", DPO_YAML.replace("LOAD", str(sft_checkpoint)))
    ipo = Run("ipo", tmp_path, "dpo", config, f"logging.dir={tmp_path / 'ipo'}",
              "dpo.loss=ipo", "dpo.steps=2", f"dpo.reference={sft_checkpoint}")
    _kill_and_resume(tmp_path, "dpo", config, DPO_STEPS)
    ipo.wait()

    continuous = _metrics(tmp_path / "cont/dpo_metrics.jsonl")
    first = continuous[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_accuracy"] == 0 and first["margin"] == 0
    assert first["chosen_reward"] == first["rejected_reward"] == 0
    assert {"loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin",
            "grad_norm", "lr", "tokens_per_s"} <= set(first)
    assert all(abs(row["loss"] - math.log(2)) > 1e-4 for row in continuous[1:])
    assert continuous[-1]["reward_accuracy"] > 0
    ipo_first = _metrics(tmp_path / "ipo/dpo_metrics.jsonl")[0]
    assert ipo_first["loss"] == pytest.approx(1 / (4 * BETA ** 2), rel=1e-6)

    _assert_same_metrics(tmp_path / "cont/dpo_metrics.jsonl",
                         tmp_path / "kill/dpo_metrics.jsonl", DPO_STEPS)
    final_a, final_b = _latest(tmp_path / "cont/ckpt"), _latest(tmp_path / "kill/ckpt")
    assert final_a.name == final_b.name == f"step_{DPO_STEPS:08d}"
    _assert_same_checkpoint(final_a, final_b)
    _assert_same_train_state(final_a, final_b)
    state = json.loads((final_a / "train_state.json").read_text())
    assert state["stage"] == "dpo"
    # The updates did something: the weights moved away from the SFT start.
    start = read_tensors(_latest(sft_checkpoint) / "model_optim", "output_layer")
    end = read_tensors(final_a / "model_optim", "output_layer")
    assert not torch.equal(start["output_layer.weight"], end["output_layer.weight"])
