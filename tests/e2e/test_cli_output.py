"""What a user sees from a CLI run (tiny model, one CPU process): no known library noise, the
warnings that call for action, one line naming the resolved config's file; and after a crash
and a resume, each step once in the metrics JSONL.

One scenario, two runs: SFT to step 4 with checkpoints at 2 and 4; the step-4 checkpoint then
loses its COMPLETE marker (the run died while saving it, after logging steps 3 and 4). The
resumed run warns about the incomplete checkpoint, resumes from step 2 and logs 3 and 4 again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from megatron_sega.checkpoint.names import COMPLETE_MARKER, step_dir_name
from tests.cli_run import REPO, Run, cli_env

SFT_YAML = """\
model: {preset: tiny}
data: {train: examples/demo_data/train.jsonl, max_seq_len: 64}
sft: {steps: 4, global_batch_size: 8, micro_batch_size: 8, eval_interval: 0}
logging: {progress: false, tensorboard: false}
checkpoint: {save_interval: 2, keep_last: 3}
"""
NOISE = ("No CUDA runtime is found", "Transformer Engine and Apex are not installed",
         "GPTModel IS DEPRECATED", "Apex is not installed", "is deprecated")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli_output")
    config = work / "sft.yaml"
    config.write_text(SFT_YAML)
    dirs = [f"logging.dir={work / 'logs'}", f"checkpoint.save_dir={work / 'ckpt'}"]
    first = Run("first", work, "sft", config, *dirs).wait()
    (work / "ckpt" / step_dir_name(4) / COMPLETE_MARKER).unlink()
    resumed = Run("resumed", work, "sft", config, *dirs, "--resume", "auto").wait()
    return work, first, resumed


def test_known_library_noise_is_silenced_and_actionable_warnings_stay(runs):
    _, first, resumed = runs
    for text in NOISE:
        assert text not in first + resumed, text
    assert "has no COMPLETE marker (interrupted save?)" in resumed
    assert "resumed from" in resumed


def test_the_converter_is_as_quiet(runs):
    """``scripts/demo.sh --model smollm2-135m`` runs tools/convert.py before the demo: the
    Apex/TE warnings (four), GPTModel's deprecation and the CUDA-runtime line came from it."""
    work, _, _ = runs
    result = subprocess.run([sys.executable, "tools/convert.py", "mcore-to-hf", "--mcore-dir",
                             str(work / "ckpt"), "--out", str(work / "hf")], cwd=REPO,
                            env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "" and result.stdout.startswith(f"wrote {work / 'hf'} ("), \
        result.stdout + result.stderr


def test_the_resolved_config_is_a_file_named_in_one_line(runs):
    work, first, _ = runs
    path = work / "logs" / "sft_config.yaml"
    assert f"== sft: resolved config -> {path}\n" in first
    assert "\nmodel:\n" not in first and "preset: tiny" not in first
    assert yaml.safe_load(path.read_text())["sft"]["steps"] == 4


def test_a_resumed_run_logs_each_step_once(runs):
    work, _, _ = runs
    rows = [json.loads(line) for line in (work / "logs" / "sft_metrics.jsonl").read_text()
            .splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
