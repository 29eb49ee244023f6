"""Virtual pipelining end to end through the CLI (torchrun, 2 processes, PP=2 x VPP=2, CPU, tiny
model): SFT with checkpoints -> a resume from the first checkpoint (model chunks and distributed
optimizer state at VPP) repeats the last step bit for bit -> SEGA with KL to a frozen reference
(its chunks loaded from the SFT checkpoint) -> eval at PP=2 x VPP=2 equals eval of the same
checkpoint in one process (PP=1)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_run import REPO, Run

CONFIG = """\
model: {preset: tiny, dtype: fp32, init_seed: 1234}
parallel: {tp: 1, pp: 2, vpp: 2, device: cpu}
data: {train: examples/demo_data/train.jsonl, eval: EVAL, template: chat, max_seq_len: 64}
sft: {steps: 3, global_batch_size: 8, micro_batch_size: 2, eval_interval: 0}
sampling: {temperature: 1.0, top_p: 0.95, max_new_tokens: 12}
sega: {k: 4, steps: 2, prompts_per_step: 2, micro_batch_size: 4}
optim: {lr: 3.0e-3, warmup_steps: 1}
eval: {micro_batch_size: 8}
logging: {progress: false, tensorboard: false}
checkpoint: {save_interval: 2}
"""
TIMING_KEYS = {"time", "step_time", "tokens_per_s", "mfu"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sft_resume_sega_eval_at_pp2_vpp2(tmp_path):
    eval_data = tmp_path / "eval.jsonl"
    lines = (REPO / "examples/demo_data/eval.jsonl").read_text().splitlines()
    eval_data.write_text("\n".join(lines[:12]) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("EVAL", str(eval_data)))
    sft, resumed, sega = tmp_path / "sft", tmp_path / "sft_resumed", tmp_path / "sega"

    Run("sft", tmp_path, "sft", config, f"logging.dir={sft}", f"checkpoint.save_dir={sft / 'ckpt'}",
        nproc=2).wait()
    again = Run("sft_resumed", tmp_path, "sft", config, f"logging.dir={resumed}",
                f"checkpoint.save_dir={resumed / 'ckpt'}",
                f"checkpoint.resume={sft / 'ckpt' / 'step_00000002'}", nproc=2)
    policy = Run("sega", tmp_path, "sega", config, f"model.load={sft / 'ckpt'}",
                 f"logging.dir={sega}", f"checkpoint.save_dir={sega / 'ckpt'}", "sega.kl_coef=0.1",
                 f"sega.reference={sft / 'ckpt'}", nproc=2)
    assert "resumed from" in again.wait()
    policy.wait()
    vpp_eval = Run("eval_vpp", tmp_path, "eval", config, f"model.load={sega / 'ckpt'}",
                   f"eval.out={tmp_path / 'eval_vpp'}", nproc=2)
    Run("eval_pp1", tmp_path, "eval", config, f"model.load={sega / 'ckpt'}", "parallel.pp=1",
        "parallel.vpp=null", f"eval.out={tmp_path / 'eval_pp1'}").wait()
    vpp_eval.wait()

    # The resumed run (weights, Adam state, schedule and data position from step 2) logs the
    # same step 3 as the uninterrupted run.
    full, tail = _jsonl(sft / "sft_metrics.jsonl"), _jsonl(resumed / "sft_metrics.jsonl")
    assert [r["step"] for r in full] == [1, 2, 3] and [r["step"] for r in tail] == [3]
    assert {k: v for k, v in tail[0].items() if k not in TIMING_KEYS} == \
        {k: v for k, v in full[2].items() if k not in TIMING_KEYS}
    assert full[2]["loss"] < full[0]["loss"]

    rows = _jsonl(sega / "sega_metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and not r["skipped_update"] for r in rows), rows

    # A checkpoint written by PP=2 x VPP=2 ranks evaluates the same at PP=1 in one process.
    got, ref = (_jsonl(tmp_path / name / "pairs.jsonl") for name in ("eval_vpp", "eval_pp1"))
    assert [r["id"] for r in got] == [r["id"] for r in ref] and len(ref) == 12
    for a, b in zip(got, ref):
        for key in ("logp_chosen", "logp_rejected"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (a, b)
        assert a["n_tokens_chosen"] == b["n_tokens_chosen"] > 0
