"""Preemption and resume, end to end through the CLI in real processes (CPU, tiny model).

- SFT and SEGA: a run SIGKILLed after its first checkpoint and resumed with ``--resume auto``
  logs the same per-step metrics and ends with the same weights and Adam state, bit for bit
  (fp32), as an uninterrupted run (SEGA: sampling included).
- SIGTERM mid-run: a complete checkpoint of the last finished step, the STOPPED marker naming
  it, and exit code 75 ("stopped, resume me"), not 0.
- Interrupted saves (no COMPLETE, a truncated .distcp, a leftover .tmp_step_*) are skipped, with
  a warning naming them, in favour of the previous checkpoint.
- A TP=2 checkpoint (torchrun, 2 processes) resumes at TP=1: the optimizer state cannot be
  resharded across TP (a clear error names --no-load-optim); with --no-load-optim the model
  weights are the saved ones, bit for bit, and training continues from them.
- Resuming into a model of another shape fails with a message naming the field.
- Resuming with another schedule (more steps, a lower lr): the config's schedule wins, each
  changed value is printed; keep_last prunes only this run's checkpoints; a fresh start in a
  directory holding a later checkpoint is refused with one line.

Runs that do not depend on each other are started together (the continuous and the killed run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.cli_run import REPO, TIMEOUT, Run

from megatron_sega.checkpoint.manager import read_tensors
from megatron_sega.checkpoint.names import STOP_MARKER
from megatron_sega.checkpoint.stop import RESUME_EXIT_CODE

TINY_TOKENIZER = REPO / "megatron_sega/data/assets/tiny_tokenizer"
# Wall-clock fields of the metrics: everything else must match exactly.
TIMING_KEYS = {"time", "step_time", "tokens_per_s", "time_sample", "time_score", "time_train"}

DATA = "train: examples/demo_data/train.jsonl, eval: examples/demo_data/eval.jsonl"
SFT_STEPS, SFT_INTERVAL = 12, 4
SFT_YAML = f"""\
model: {{preset: tiny}}
data: {{{DATA}, max_seq_len: 64}}
sft: {{steps: {SFT_STEPS}, global_batch_size: 16, micro_batch_size: 8, eval_interval: 0}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
logging: {{progress: false, tensorboard: false}}
checkpoint: {{save_interval: {SFT_INTERVAL}, keep_last: 3}}
"""

SEGA_STEPS, SEGA_INTERVAL = 4, 2
SEGA_YAML = f"""\
model: {{preset: tiny, load: LOAD}}
data: {{{DATA}, max_seq_len: 96}}
sampling: {{max_new_tokens: 16, temperature: 1.0, top_p: 0.95}}
sega: {{k: 4, steps: {SEGA_STEPS}, prompts_per_step: 8, micro_batch_size: 8}}
optim: {{lr: 1.0e-3}}
logging: {{progress: false, tensorboard: false}}
checkpoint: {{save_interval: {SEGA_INTERVAL}}}
"""


# ----------------------------------------------------------------------------- helpers

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _dirs(root: Path, name: str) -> list[str]:
    return [f"logging.dir={root / name}", f"checkpoint.save_dir={root / name / 'ckpt'}"]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _same(a: dict, b: dict) -> bool:
    keys = (set(a) | set(b)) - TIMING_KEYS
    return all(a.get(k) == b.get(k) or (isinstance(a.get(k), float) and math.isnan(a[k])
                                        and math.isnan(b.get(k, 0.0))) for k in keys)


def _assert_same_metrics(continuous: Path, resumed: Path, steps: int) -> None:
    """Every row of the interrupted+resumed log (the killed run's rows, then the resumed run's
    appended ones) equals the continuous run's row of that step, timings aside."""
    reference = {row["step"]: row for row in _metrics(continuous)}
    assert sorted(reference) == list(range(1, steps + 1))
    rows = _metrics(resumed)
    assert {row["step"] for row in rows} == set(reference)
    for row in rows:
        ref = reference[row["step"]]
        assert _same(row, ref), (f"step {row['step']} differs:\n resumed    {row}\n"
                                 f" continuous {ref}")


def _assert_same_checkpoint(a: Path, b: Path, prefix: str = "") -> int:
    """Bitwise-equal tensors: the model and, without a prefix, the optimizer state (Adam moments
    and main params). Returns the number of tensors compared."""
    ta, tb = read_tensors(a / "model_optim", prefix), read_tensors(b / "model_optim", prefix)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        diff = (ta[key] - tb[key]).abs().max()
        assert torch.equal(ta[key], tb[key]), f"{key}: max abs diff {diff}"
    return len(ta)


def _assert_same_train_state(a: Path, b: Path) -> None:
    """Same step, LR schedule, data position and torch RNG states (incl. Megatron's tracker).
    Python's and numpy's generators are seeded per process from the OS and unused: skipped."""
    sa, sb = (json.loads((p / "train_state.json").read_text()) for p in (a, b))
    for key in ("step", "scheduler", "iterator"):
        assert sa[key] == sb[key], key
    for rank_file in sorted((a / "rng").iterdir()):
        ra = torch.load(rank_file, weights_only=True)
        rb = torch.load(b / "rng" / rank_file.name, weights_only=True)
        assert ra.keys() == rb.keys()
        for key in ra:
            if key == "torch" or key.startswith("tracker/"):
                assert torch.equal(ra[key], rb[key]), f"{rank_file.name}: {key}"


def _latest(save_dir: Path) -> Path:
    return save_dir / (save_dir / "latest").read_text().strip()


def _kill_and_resume(root: Path, command: str, config: Path, steps: int, extra=()) -> str:
    """Start the continuous and the to-be-killed run together; SIGKILL the latter right after
    its first checkpoint; resume it with --resume auto. Returns the resumed run's output."""
    cont = Run(f"{command}_continuous", root, command, config, *_dirs(root, "cont"), *extra)
    killed = Run(f"{command}_killed", root, command, config, *_dirs(root, "kill"), *extra)
    save_dir = root / "kill" / "ckpt"
    killed.kill_when(lambda: (save_dir / "latest").is_file(), "its first checkpoint")
    assert killed.rc == -signal.SIGKILL
    done = [p.name for p in save_dir.glob("step_*") if (p / "COMPLETE").is_file()]
    assert f"step_{steps:08d}" not in done, f"the run finished before the kill: {done}"
    resumed = Run(f"{command}_resumed", root, command, config, *_dirs(root, "kill"), *extra,
                  "--resume", "auto").wait()
    cont.wait()
    assert "resumed from" in resumed and f"at step {steps}" not in resumed
    return resumed


# ----------------------------------------------------------------------------- SFT + SEGA

@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """The continuous and the killed+resumed SFT runs (shared with the SEGA test)."""
    root = tmp_path_factory.mktemp("sft")
    config = _write(root / "sft.yaml", SFT_YAML)
    resumed = _kill_and_resume(root, "sft", config, SFT_STEPS)
    return root, resumed


def test_sft_kill_and_resume_is_bitwise_exact(sft_runs):
    root, resumed = sft_runs
    _assert_same_metrics(root / "cont/sft_metrics.jsonl", root / "kill/sft_metrics.jsonl",
                         SFT_STEPS)
    final_a, final_b = _latest(root / "cont/ckpt"), _latest(root / "kill/ckpt")
    assert final_a.name == final_b.name == f"step_{SFT_STEPS:08d}"
    n = _assert_same_checkpoint(final_a, final_b)
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg_sq")
               for k in read_tensors(final_a / "model_optim", "optimizer."))
    assert n > 9  # model tensors and the Adam state
    _assert_same_train_state(final_a, final_b)
    # Every RNG state was restored, python's and numpy's too: unused since the checkpoint of
    # step 4 was written by the killed process, they are still that process's states.
    first = torch.load(root / "kill/ckpt/step_00000004/rng/rank_00000.pt", weights_only=True)
    last = torch.load(final_b / "rng/rank_00000.pt", weights_only=True)
    assert first.keys() == last.keys()
    assert all(torch.equal(first[k], last[k]) for k in first if k != "torch")


def test_sega_kill_and_resume_is_bitwise_exact(sft_runs, tmp_path):
    sft_root, _ = sft_runs
    config = _write(tmp_path / "sega.yaml",
                    SEGA_YAML.replace("LOAD", str(sft_root / "cont" / "ckpt")))
    _kill_and_resume(tmp_path, "sega", config, SEGA_STEPS)
    _assert_same_metrics(tmp_path / "cont/sega_metrics.jsonl",
                         tmp_path / "kill/sega_metrics.jsonl", SEGA_STEPS)
    final_a, final_b = _latest(tmp_path / "cont/ckpt"), _latest(tmp_path / "kill/ckpt")
    assert final_a.name == final_b.name == f"step_{SEGA_STEPS:08d}"
    _assert_same_checkpoint(final_a, final_b)
    _assert_same_train_state(final_a, final_b)
    # The updates did something: the weights moved away from the SFT start.
    start = read_tensors(_latest(sft_root / "cont/ckpt") / "model_optim", "output_layer")
    end = read_tensors(final_a / "model_optim", "output_layer")
    assert not torch.equal(start["output_layer.weight"], end["output_layer.weight"])


def _cosine_lr(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The LR after ``step`` optimizer steps of a linear-warmup + cosine schedule (independent
    of Megatron's implementation)."""
    if step <= warmup:
        return max_lr * step / warmup
    ratio = min((step - warmup) / (total - warmup), 1.0)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


def test_resume_takes_this_configs_schedule_and_never_touches_another_runs_checkpoints(
        sft_runs, tmp_path):
    """Extending a finished run (12 -> 14 steps) with a lower lr: the config's schedule wins and
    each changed value is printed. keep_last prunes only this run's saves: another run's
    checkpoint in the directory stays. A later start there without resume is refused."""
    root, _ = sft_runs
    save_dir = tmp_path / "ckpt"
    foreign = save_dir / "step_00000004"
    shutil.copytree(root / "cont/ckpt/step_00000004", foreign)
    state = json.loads((foreign / "train_state.json").read_text())
    (foreign / "train_state.json").write_text(json.dumps({**state, "run_id": "another run"}))
    config = _write(tmp_path / "sft.yaml", SFT_YAML)
    extended = Run("extended", tmp_path, "sft", config, f"logging.dir={tmp_path}",
                   f"checkpoint.save_dir={save_dir}", "--resume",
                   str(root / "cont/ckpt/step_00000012"), "sft.steps=14", "optim.lr=1.0e-3",
                   "optim.min_lr=1.0e-4", "checkpoint.save_interval=1",
                   "checkpoint.keep_last=1").wait()
    assert "the LR schedule of this run's config replaces the checkpoint's" in extended
    for change in ("max_lr 0.003 -> 0.001", "min_lr 0.0 -> 0.0001", "lr_decay_steps 12 -> 14"):
        assert change in extended, change
    rows = _metrics(tmp_path / "sft_metrics.jsonl")
    assert [r["step"] for r in rows] == [13, 14]
    for row in rows:
        assert row["lr"] == pytest.approx(_cosine_lr(row["step"], 1e-3, 1e-4, 2, 14), rel=1e-9)
    assert rows[0]["lr"] > 1e-4  # not the finished schedule's min_lr (0.0)
    # Only this run's step 13 was pruned; the other run's checkpoint is untouched.
    assert sorted(p.name for p in save_dir.glob("step_*")) == ["step_00000004", "step_00000014"]
    assert json.loads((foreign / "train_state.json").read_text())["run_id"] == "another run"
    assert _latest(save_dir).name == "step_00000014"
    assert (_latest(save_dir) / "COMPLETE").is_file()
    # A fresh start in this directory would replace that run's checkpoints: refused, one line.
    fresh = Run("fresh", tmp_path, "sft", config, f"logging.dir={tmp_path / 'fresh'}",
                f"checkpoint.save_dir={save_dir}", "--resume", "none", "sft.steps=2")
    out = fresh.wait(expect=2)
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out[-2000:]
    for words in (f"checkpoint.save_dir = {save_dir}", "step_00000014", "new checkpoint.save_dir",
                  "checkpoint.resume=auto"):
        assert words in errors[0], words
    assert sorted(p.name for p in save_dir.glob("step_*")) == ["step_00000004", "step_00000014"]
    assert _latest(save_dir).name == "step_00000014"


# ----------------------------------------------------------------------------- SIGTERM, damage

@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """An SFT run told to stop by SIGTERM after a few steps: (root, save_dir, output)."""
    root = tmp_path_factory.mktemp("sigterm")
    config = _write(root / "sft.yaml", SFT_YAML)
    run = Run("sigterm", root, "sft", config, *_dirs(root, "run"),
              "sft.steps=100000", "checkpoint.save_interval=0")
    metrics = root / "run" / "sft_metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert run.proc.poll() is None, run.output()[-3000:]
        assert time.time() < deadline, "no metrics"
        time.sleep(0.05)
    # To the whole process group, as SLURM and a terminal do: no helper process of the save
    # (Megatron's would be one) may die of it.
    os.killpg(run.proc.pid, signal.SIGTERM)
    output = run.wait(expect=RESUME_EXIT_CODE)
    return root, root / "run" / "ckpt", output


def test_sigterm_saves_a_complete_checkpoint_and_exits_with_the_resume_code(sigterm_run):
    root, save_dir, output = sigterm_run
    last_logged = _metrics(root / "run" / "sft_metrics.jsonl")[-1]["step"]
    latest = _latest(save_dir)
    assert latest.name == f"step_{last_logged:08d}"
    assert (latest / "COMPLETE").is_file()
    assert json.loads((latest / "train_state.json").read_text())["step"] == last_logged
    assert "signal received" in output
    assert json.loads((save_dir / STOP_MARKER).read_text()) == {
        "stage": "sft", "step": last_logged, "checkpoint": str(latest)}
    assert not list(save_dir.glob(".tmp_*"))
    assert read_tensors(latest / "model_optim", "output_layer")


def test_interrupted_saves_are_skipped_with_a_warning(sigterm_run, tmp_path):
    _, source, _ = sigterm_run
    good = _latest(source)
    step = int(good.name.split("_")[1])
    save_dir = tmp_path / "ckpt"
    shutil.copytree(source, save_dir)
    good = save_dir / good.name
    # step+1: fully written but truncated mid-file, no marker (killed during the .distcp write).
    truncated = save_dir / f"step_{step + 1:08d}"
    shutil.copytree(good, truncated)
    (truncated / "COMPLETE").unlink()
    for distcp in (truncated / "model_optim").glob("*.distcp"):
        with open(distcp, "r+b") as f:
            f.truncate(distcp.stat().st_size // 2)
    # step+2: a directory with no marker at all; step+3: a leftover temporary directory that
    # even carries a marker (it must never be used: only renamed directories count).
    (save_dir / f"step_{step + 2:08d}" / "model_optim").mkdir(parents=True)
    shutil.copytree(good, save_dir / f".tmp_step_{step + 3:08d}")
    config = _write(tmp_path / "sft.yaml", SFT_YAML)
    output = Run("damaged", tmp_path, "sft", config, f"logging.dir={tmp_path}",
                 f"checkpoint.save_dir={save_dir}", f"sft.steps={step + 1}",
                 "checkpoint.save_interval=0", "--resume", "auto").wait()
    assert f"resumed from {good} at step {step}" in output
    for bad in (truncated, save_dir / f"step_{step + 2:08d}"):
        assert f"checkpoint {bad} has no COMPLETE marker" in output
    rows = _metrics(tmp_path / "sft_metrics.jsonl")
    assert [r["step"] for r in rows] == [step + 1]
    # The new step+1 replaced the damaged one; the leftover temporary directory was pruned.
    assert _latest(save_dir) == truncated and (truncated / "COMPLETE").is_file()
    assert read_tensors(truncated / "model_optim", "output_layer")
    assert not list(save_dir.glob(".tmp_*"))


def test_resume_into_another_model_shape_fails_clearly(sigterm_run, tmp_path):
    _, save_dir, _ = sigterm_run
    hf = _write(tmp_path / "config.json", json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 176,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    config = _write(tmp_path / "sft.yaml", SFT_YAML)
    run = Run("mismatch", tmp_path, "sft", config, "model.preset=null", f"model.hf_config={hf}",
              f"model.tokenizer={TINY_TOKENIZER}", f"logging.dir={tmp_path}",
              f"checkpoint.save_dir={tmp_path / 'new'}", "--resume", str(save_dir))
    output = run.wait(expect=None)
    assert run.rc != 0
    assert "model does not match the checkpoint" in output
    assert "hidden_size: checkpoint 64 != model 128" in output


# ----------------------------------------------------------------------------- TP=2 -> TP=1

def test_tp2_checkpoint_resumes_at_tp1(tmp_path):
    config = _write(tmp_path / "sft.yaml", SFT_YAML)
    Run("tp2", tmp_path, "sft", config, *_dirs(tmp_path, "tp2"), "parallel.tp=2", "sft.steps=3",
        "checkpoint.save_interval=2", nproc=2).wait()
    tp2_dir = tmp_path / "tp2" / "ckpt"
    saved = tp2_dir / "step_00000002"
    assert json.loads((saved / "train_state.json").read_text())["tp"] == 2
    common = ["sft.steps=2", "--resume", str(saved)]
    refused = Run("tp1_optim", tmp_path, "sft", config, *_dirs(tmp_path, "refused"), *common)
    roundtrip = Run("tp1_roundtrip", tmp_path, "sft", config, *_dirs(tmp_path, "tp1"), *common,
                    "--no-load-optim")
    trained = Run("tp1_train", tmp_path, "sft", config, *_dirs(tmp_path, "train"),
                  "sft.steps=3", "--resume", str(saved), "--no-load-optim")
    # 1. Loading the optimizer at another TP is refused, naming the way out.
    out = refused.wait(expect=None)
    assert refused.rc != 0 and "--no-load-optim" in out and "tp=2 pp=1" in out
    assert not list((tmp_path / "refused").glob("ckpt/step_*"))
    # 2. With --no-load-optim the loaded weights are the saved ones, bit for bit (re-saved at
    #    TP=1 without training a step).
    out = roundtrip.wait()
    assert "optimizer state not loaded" in out
    resaved = tmp_path / "tp1" / "ckpt" / "step_00000002"
    assert json.loads((resaved / "train_state.json").read_text())["tp"] == 1
    for prefix in ("embedding.", "decoder.", "output_layer."):
        _assert_same_checkpoint(saved, resaved, prefix)
    # 3. Training continues from them: step 3 (loss computed with the loaded weights on the
    #    restored data position) matches the TP=2 run's step 3 to rounding.
    trained.wait()
    tp2_step3 = _metrics(tmp_path / "tp2" / "sft_metrics.jsonl")[-1]
    tp1_step3 = _metrics(tmp_path / "train" / "sft_metrics.jsonl")[-1]
    assert tp2_step3["step"] == tp1_step3["step"] == 3
    assert tp1_step3["tokens"] == tp2_step3["tokens"]
    assert tp1_step3["loss"] == pytest.approx(tp2_step3["loss"], rel=1e-5)
