"""Stage B end to end through the CLI (CPU, fp32, tiny model, shipped demo data): an SFT
checkpoint -> SEGA -> eval. SEGA completes, the mean entropy score (Eq. 1) of its samples rises
over training, every promised metric is logged, and preference accuracy is reported before and
after."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_run import Run

CONFIG = """\
model: {preset: tiny, dtype: fp32, init_seed: 1234}
parallel: {tp: 1, pp: 1, device: cpu}
data: {train: examples/demo_data/train.jsonl, eval: examples/demo_data/eval.jsonl,
       template: chat, max_seq_len: 112}
sft: {steps: 80, global_batch_size: 16, micro_batch_size: 8}
sampling: {temperature: 1.0, top_p: 0.95, max_new_tokens: 40}
sega: {k: 4, steps: 16, prompts_per_step: 8, micro_batch_size: 16, lr: 3.0e-4}
optim: {lr: 3.0e-3, warmup_steps: 2, clip_grad: 1.0}
eval: {beta: 0.1, micro_batch_size: 16}
logging: {progress: false, tensorboard: false}
"""

METRICS = {"loss", "score_mean", "score_std", "h_final_mean", "fork_entropy_mean", "reward_mean",
           "advantage_abs_mean", "advantage_std", "response_length_mean",
           "groups_skipped_fraction", "grad_norm", "lr", "time_sample", "time_score",
           "time_train", "tokens_per_s", "empty_responses", "truncated_fraction"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sft_then_sega_then_eval(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    sft, sega = tmp_path / "sft", tmp_path / "sega"
    Run("sft", tmp_path, "sft", config, f"logging.dir={sft}",
        f"checkpoint.save_dir={sft / 'ckpt'}").wait()
    before = Run("eval_sft", tmp_path, "eval", config, f"model.load={sft / 'ckpt'}",
                 f"eval.out={tmp_path / 'eval_sft'}")
    Run("sega", tmp_path, "sega", config, f"model.load={sft / 'ckpt'}", f"logging.dir={sega}",
        f"checkpoint.save_dir={sega / 'ckpt'}").wait()
    before.wait()
    Run("eval_sega", tmp_path, "eval", config, f"model.load={sega / 'ckpt'}",
        f"eval.out={tmp_path / 'eval_sega'}").wait()

    rows = _jsonl(sega / "sega_metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert METRICS <= set(rows[0]), METRICS - set(rows[0])
    first = sum(r["score_mean"] for r in rows[:5]) / 5
    last = sum(r["score_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert not any(r["skipped_update"] for r in rows)
    for name in ("eval_sft", "eval_sega"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["pairs"] == 160 and 0.0 <= summary["accuracy"] <= 1.0

    # The optional extras: KL to a frozen reference and a rollout reused for two clipped updates.
    extras = tmp_path / "sega_kl"
    Run("sega_kl", tmp_path, "sega", config, f"model.load={sft / 'ckpt'}", f"logging.dir={extras}",
        "sega.steps=2", "sega.kl_coef=0.1", f"sega.reference={sft / 'ckpt'}",
        "sega.updates_per_rollout=2", "sega.clip_eps=0.2").wait()
    rows = _jsonl(extras / "sega_metrics.jsonl")
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and not r["skipped_update"] for r in rows)


def test_broken_weights_skip_steps_then_stop(tmp_path):
    """An absurd learning rate turns the weights into Inf/NaN: the steps are skipped and logged,
    and the run stops after sega.max_bad_steps of them in a row (exit code 1, a clear line)."""
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    run = Run("sega_nan", tmp_path, "sega", config, f"logging.dir={tmp_path}", "sega.lr=1e30",
              "optim.clip_grad=0.0", "sega.steps=8", "sega.max_bad_steps=2",
              "sampling.max_new_tokens=8")
    output = run.wait(expect=1)
    assert "consecutive steps with a NaN/Inf loss (sega.max_bad_steps=2)" in output
    rows = _jsonl(tmp_path / "sega_metrics.jsonl")
    assert rows[0]["skipped_update"] is False
    assert [r["skipped_update"] for r in rows[-2:]] == [True, True] and len(rows) < 8
