"""bf16 end to end through the CLI on CPU (tiny model, shipped demo data), on Megatron's
mixed-precision path: SFT at TP=2 -> SEGA at PP=2 (a rollout reused for 2 clipped updates, KL
to the SFT model as reference) -> eval in bf16 at TP=2 and in fp32 in one process.

The bf16 eval of the SEGA checkpoint must be within 0.05 nat per response token of its fp32
eval, pair by pair (chosen and rejected)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_run import Run

CONFIG = """\
model: {preset: tiny, dtype: bf16, init_seed: 1234}
parallel: {tp: 1, pp: 1, device: cpu}
data: {train: examples/demo_data/train.jsonl, eval: examples/demo_data/eval.jsonl,
       template: chat, max_seq_len: 112}
sft: {steps: 20, global_batch_size: 16, micro_batch_size: 8}
sampling: {temperature: 1.0, top_p: 0.95, max_new_tokens: 24}
sega: {k: 4, steps: 2, prompts_per_step: 4, micro_batch_size: 8, lr: 3.0e-4}
optim: {lr: 3.0e-3, warmup_steps: 2, clip_grad: 1.0}
eval: {beta: 0.1, micro_batch_size: 16}
logging: {progress: false, tensorboard: false}
"""
TOL_NAT_PER_TOKEN = 0.05


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bf16_sft_sega_eval(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    sft, sega = tmp_path / "sft", tmp_path / "sega"
    Run("sft", tmp_path, "sft", config, "parallel.tp=2", f"logging.dir={sft}",
        f"checkpoint.save_dir={sft / 'ckpt'}", nproc=2).wait()
    Run("sega", tmp_path, "sega", config, "parallel.pp=2", f"model.load={sft / 'ckpt'}",
        f"logging.dir={sega}", f"checkpoint.save_dir={sega / 'ckpt'}", "sega.kl_coef=0.1",
        f"sega.reference={sft / 'ckpt'}", "sega.updates_per_rollout=2", "sega.clip_eps=0.2",
        nproc=2).wait()
    bf16 = Run("eval_bf16", tmp_path, "eval", config, "parallel.tp=2",
               f"model.load={sega / 'ckpt'}", f"eval.out={tmp_path / 'eval_bf16'}", nproc=2)
    Run("eval_fp32", tmp_path, "eval", config, "model.dtype=fp32", f"model.load={sega / 'ckpt'}",
        f"eval.out={tmp_path / 'eval_fp32'}").wait()
    bf16.wait()

    rows = _jsonl(sft / "sft_metrics.jsonl")
    assert len(rows) == 20 and rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
    rows = _jsonl(sega / "sega_metrics.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["loss"] == row["loss"] and not row["skipped_update"], row
    # Each step's last update reuses its rollout. Step 1's first update ran at lr 0 (Megatron's
    # warm-up starts there), so its reuse sees ratios of exactly 1; by step 2 the policy has
    # moved: the ratios leave 1 and the policy has left the SFT reference.
    assert rows[0]["ratio_abs_dev"] == 0.0 and rows[0]["clip_fraction"] == 0.0, rows[0]
    assert rows[1]["ratio_abs_dev"] > 0.0 and rows[1]["kl_mean"] > 0.0, rows[1]
    latest = sega / "ckpt" / (sega / "ckpt" / "latest").read_text().strip()
    assert json.loads((latest / "model_optim" / "megatron_sega.json").read_text())["dtype"] \
        == "bfloat16"

    pairs = {name: _jsonl(tmp_path / f"eval_{name}" / "pairs.jsonl") for name in ("bf16", "fp32")}
    assert [p["id"] for p in pairs["bf16"]] == [p["id"] for p in pairs["fp32"]]
    worst = 0.0
    for low, ref in zip(pairs["bf16"], pairs["fp32"]):
        for side in ("chosen", "rejected"):
            n = ref[f"n_tokens_{side}"]
            assert low[f"n_tokens_{side}"] == n
            worst = max(worst, abs(low[f"logp_{side}"] - ref[f"logp_{side}"]) / n)
    print(f"bf16 vs fp32 eval: worst |delta log p| per response token = {worst:.4f} nat")
    assert worst <= TOL_NAT_PER_TOKEN, worst
    # Not vacuous: the model is far from uniform over the 460-token vocabulary (log 460 = 6.1).
    mean = sum(p["logp_chosen"] / p["n_tokens_chosen"] for p in pairs["fp32"]) / len(pairs["fp32"])
    assert mean > -4.0, mean
