"""Stage B end to end through the CLI (CPU, fp32, tiny model, shipped demo data): an SFT
checkpoint -> SEGA -> eval -> export. SEGA completes, the mean entropy score (Eq. 1) of its
samples rises over training, every promised metric is logged, checkpoint.keep_last prunes; the
SFT model's preference accuracy is above chance, the eval against the SFT reference reuses the
SFT eval's log-probs, and transformers on the mcore-to-hf export of the training save directory
reproduces the eval's log-probs. With KL to a reference and a clipped reused rollout, the KL and
the clipped fraction are positive. A checkpoint with a hostile .metadata is refused in one line."""

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
           "time_train", "tokens_per_s", "empty_responses", "truncated_fraction", "kl_mean",
           "clip_fraction", "seq_len", "attention_span", "valid_fraction"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval(directory: Path) -> tuple[list[dict], dict]:
    records = _jsonl(directory / "pairs.jsonl")
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["pairs"] == len(records) == 160
    # The summary is computed from the records it was written with.
    won = sum(r["logp_chosen"] > r["logp_rejected"] for r in records) / len(records)
    assert summary["accuracy"] == won
    return records, summary


def test_sft_then_sega_then_eval(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    sft, sega = tmp_path / "sft", tmp_path / "sega"
    Run("sft", tmp_path, "sft", config, f"logging.dir={sft}",
        f"checkpoint.save_dir={sft / 'ckpt'}").wait()
    before = Run("eval_sft", tmp_path, "eval", config, f"model.load={sft / 'ckpt'}",
                 f"eval.out={tmp_path / 'eval_sft'}")
    Run("sega", tmp_path, "sega", config, f"model.load={sft / 'ckpt'}", f"logging.dir={sega}",
        f"checkpoint.save_dir={sega / 'ckpt'}", "checkpoint.save_interval=4",
        "checkpoint.keep_last=2").wait()
    before.wait()
    Run("eval_sega", tmp_path, "eval", config, f"model.load={sega / 'ckpt'}",
        f"eval.reference={sft / 'ckpt'}", f"eval.out={tmp_path / 'eval_sega'}").wait()

    rows = _jsonl(sega / "sega_metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert METRICS <= set(rows[0]), METRICS - set(rows[0])
    first = sum(r["score_mean"] for r in rows[:5]) / 5
    last = sum(r["score_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert not any(r["skipped_update"] for r in rows)
    # Saved at steps 4, 8, 12 and 16; checkpoint.keep_last=2 pruned the older two.
    assert sorted(p.name for p in (sega / "ckpt").iterdir()) == [
        "latest", "step_00000012", "step_00000016"]
    assert (sega / "ckpt" / "latest").read_text().strip() == "step_00000016"

    sft_records, sft_summary = _eval(tmp_path / "eval_sft")
    sega_records, sega_summary = _eval(tmp_path / "eval_sega")
    # SFT taught the preference (chance is 0.5). After these 80 steps the summed log-prob still
    # favours the shorter rejected answers (accuracy ~0.3); per token it prefers the chosen ones.
    assert sft_summary["accuracy_length_normalized"] >= 0.7
    # eval.reference = the SFT checkpoint: its log-probs are the ones the SFT eval reported, and
    # the reference accuracy is beta * (logp - logp_ref) compared per pair.
    for r, ref in zip(sega_records, sft_records):
        assert r["id"] == ref["id"]
        assert abs(r["ref_logp_chosen"] - ref["logp_chosen"]) < 1e-3
        assert abs(r["ref_logp_rejected"] - ref["logp_rejected"]) < 1e-3
    vs_ref = sum(r["logp_chosen"] - r["ref_logp_chosen"] > r["logp_rejected"] - r["ref_logp_rejected"]
                 for r in sega_records) / len(sega_records)
    assert sega_summary["accuracy_vs_reference"] == vs_ref
    moved = sum(abs(r["logp_chosen"] - r["ref_logp_chosen"]) > 1e-2 for r in sega_records)
    assert moved > 150, "SEGA changed the policy's log-probs on (nearly) every pair"

    _check_export(tmp_path, sega / "ckpt", sega_records)
    _check_hostile_checkpoint(tmp_path, config, sft / "ckpt")

    # The optional extras: KL to a frozen reference and a rollout reused for two clipped updates.
    extras = tmp_path / "sega_kl"
    Run("sega_kl", tmp_path, "sega", config, f"model.load={sft / 'ckpt'}", f"logging.dir={extras}",
        "sega.steps=2", "sega.kl_coef=0.1", f"sega.reference={sft / 'ckpt'}",
        "sega.updates_per_rollout=2", "sega.clip_eps=0.2", "optim.warmup_steps=0").wait()
    rows = _jsonl(extras / "sega_metrics.jsonl")
    assert len(rows) == 2 and not any(r["skipped_update"] for r in rows)
    # Logged for each step's last update, the reuse, which follows an optimizer step (no warmup:
    # Megatron's schedule gives the first step lr 0): the policy has left the reference (KL > 0)
    # and moved enough for the clip to bite on some tokens.
    for r in rows:
        assert r["kl_mean"] > 0 and r["clip_fraction"] > 0, r


def _check_export(tmp_path: Path, save_dir: Path, records: list[dict]) -> None:
    """mcore-to-hf of the training save directory, as examples/pipeline.sh's export stage runs
    it: transformers on the exported model gives the log-probs the eval reported."""
    import subprocess
    import sys

    import torch
    from transformers import LlamaForCausalLM

    from megatron_sega.data import PromptFormatter, Tokenizer, read_pairs
    from tests.cli_run import REPO, cli_env

    out = tmp_path / "hf_sega"
    subprocess.run([sys.executable, "tools/convert.py", "mcore-to-hf", "--mcore-dir", str(save_dir),
                    "--out", str(out), "--dtype", "fp32"], cwd=REPO, env=cli_env(), check=True,
                   capture_output=True, timeout=300)
    model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()
    fmt = PromptFormatter(Tokenizer.from_path(out), template="chat")  # the exported tokenizer
    pairs, _ = read_pairs(REPO / "examples/demo_data/eval.jsonl")
    by_id = {r["id"]: r for r in records}
    for pair in pairs[:4]:
        prompt, response = fmt.encode_pair(pair.prompt, pair.chosen, append_eos=True)
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        got = float(logp[len(prompt) - 1:-1].gather(1, ids[0, len(prompt):, None]).sum())
        assert abs(got - by_id[pair.id]["logp_chosen"]) < 1e-3, (pair.id, got)


def _check_hostile_checkpoint(tmp_path: Path, config: Path, ckpt: Path) -> None:
    """A checkpoint whose .metadata pickle names a foreign callable: one line naming the file,
    and nothing ran."""
    import os
    import pickle
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(ckpt / (ckpt / "latest").read_text().strip() / "model_optim", hostile)
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (hostile / ".metadata").write_bytes(pickle.dumps(Boom()))
    output = Run("hostile", tmp_path, "eval", config, f"model.load={hostile}").wait(expect=2)
    assert output.splitlines()[-1] == (
        f"megatron-sega eval: error: {hostile / '.metadata'} names 'posix.system', which is not "
        "a checkpoint metadata type; refused to unpickle it (untrusted or unsupported checkpoint)")
    assert "Traceback" not in output and not marker.exists()


def test_broken_weights_skip_steps_then_stop(tmp_path):
    """An absurd learning rate turns the weights into Inf/NaN: the steps are skipped and logged,
    and the run stops after sega.max_bad_steps of them in a row (exit code 1, a clear line)."""
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    run = Run("sega_nan", tmp_path, "sega", config, f"logging.dir={tmp_path}", "sega.lr=1e30",
              "optim.clip_grad=0.0", "sega.steps=8", "sega.max_bad_steps=2",
              "sampling.max_new_tokens=8")
    output = run.wait(expect=1)
    assert "consecutive steps skipped for a NaN/Inf loss or grad norm (sega.max_bad_steps=2)" \
        in output
    rows = _jsonl(tmp_path / "sega_metrics.jsonl")
    assert rows[0]["skipped_update"] is False
    assert [r["skipped_update"] for r in rows[-2:]] == [True, True] and len(rows) < 8
