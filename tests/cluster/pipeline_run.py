"""What the cluster tests share: the tiny HF Llama they start from, the launchers' command lines
and environment (CPU, 2 processes per node), finding the training workers of a run, and the
comparisons of two runs (per-step metrics and final weights, bit for bit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from tests.cli_run import ABORT

REPO = Path(__file__).resolve().parents[2]
RESUME_EXIT_CODE = 75
NPROC = 2
SFT_STEPS, SAVE_INTERVAL, SEGA_STEPS, DPO_STEPS = 6, 2, 2, 4
# The reference runs every stage, the optional DPO baseline too (the DPO stop test's reference).
ALL_STAGES = "convert,sft,sega,dpo,eval,export"
EVAL_PAIRS = 8
TIMEOUT = 600  # seconds for one pipeline (about a minute of work on an idle 2-core machine)
# Wall-clock fields of the metrics: everything else must match exactly.
TIMING_KEYS = {"time", "step_time", "tokens_per_s", "mfu", "time_sample", "time_score",
               "time_train"}

# The 8B config cut down to the tiny model on CPU: TP=2 over the 2 processes, a few steps.
OVERRIDES = [
    "parallel.device=cpu", "parallel.tp=2", "model.dtype=fp32", "data.max_seq_len=96",
    f"sft.steps={SFT_STEPS}", "sft.global_batch_size=4", "sft.micro_batch_size=2",
    "sft.eval_interval=0", "sft.lr=1.0e-3", f"checkpoint.save_interval={SAVE_INTERVAL}",
    f"sega.steps={SEGA_STEPS}", "sega.k=2", "sega.prompts_per_step=2", "sega.micro_batch_size=4",
    "sega.lr=1.0e-4", "sampling.max_new_tokens=8", "optim.warmup_steps=1",
    f"dpo.steps={DPO_STEPS}", "dpo.global_batch_size=4", "dpo.micro_batch_size=2",
    "dpo.lr=1.0e-4",
    "logging.tensorboard=false", "logging.progress=false",
]


def make_inputs(root: Path) -> dict[str, Path]:
    """A tiny random ``LlamaForCausalLM`` (2 layers, hidden 64) saved with ``save_pretrained``
    plus the shipped tiny tokenizer's files, the demo training pairs, and a few eval pairs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_sega.data import TINY_TOKENIZER_DIR, Tokenizer

    hf = root / "hf"
    config = LlamaConfig(vocab_size=Tokenizer.from_path(TINY_TOKENIZER_DIR).vocab_size,
                         hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(hf)
    for file in TINY_TOKENIZER_DIR.iterdir():
        (hf / file.name).write_bytes(file.read_bytes())
    eval_pairs = root / "eval.jsonl"
    lines = (REPO / "examples/demo_data/eval.jsonl").read_text().splitlines()[:EVAL_PAIRS]
    eval_pairs.write_text("\n".join(lines) + "\n")
    return {"hf": hf, "train": REPO / "examples/demo_data/train.jsonl", "eval": eval_pairs}


def pipeline_args(inputs: dict[str, Path], work: Path, *extra: str) -> list[str]:
    return ["--hf-dir", str(inputs["hf"]), "--work-dir", str(work), "--train",
            str(inputs["train"]), "--eval", str(inputs["eval"]), *OVERRIDES, *extra]


def launcher_env(**extra: str) -> dict[str, str]:
    """The launchers on CPU: this interpreter, NPROC_PER_NODE processes, one thread each."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
           and not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, NPROC_PER_NODE=str(NPROC), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    env.update(extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def fresh_clone(dest: Path) -> Path:
    """``git clone`` of this checkout (its committed HEAD) into ``dest``: what a user starts from,
    without the ignored files (logs, .venv) that this checkout has gathered. Skips outside git."""
    import pytest

    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: nothing to clone")
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True,
                   capture_output=True, timeout=120)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- processes

def worker_pids(needle: str) -> list[int]:
    """The training workers (``python -u -m megatron_sega.cli ...``, as torchrun starts them)
    whose command line contains ``needle``; not torchrun, srun or the launcher."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if args[1:4] == ["-u", "-m", "megatron_sega.cli"] and any(needle in a for a in args):
            pids.append(int(entry.name))
    return sorted(pids)


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_for(ready: Callable[[], bool], what: str, alive: Callable[[], bool],
             log: Optional[Path] = None, timeout: float = TIMEOUT, poll: float = 0.02) -> float:
    """Poll ``ready()`` every ``poll`` seconds; fail when ``alive()`` (asked every half second:
    it may be slow) turns false first, or on timeout. Returns the time.time() at which
    ``ready()`` was first seen true."""
    deadline = time.time() + timeout
    next_alive = 0.0
    while not ready():
        now = time.time()
        if now >= next_alive:
            if not alive():
                if ready():
                    break
                raise AssertionError(f"the run ended before {what}:\n{tail(log)}")
            next_alive = now + 0.5
        if now > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(poll)
    return time.time()


def tail(log: Optional[Path], n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log is not None and log.is_file() else ""


def run_logged(args: list[str], log: Path, env: dict, timeout: float = TIMEOUT) -> int:
    with open(log, "a") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{args[:3]} timed out:\n{tail(log)}") from None


# ----------------------------------------------------------------------------- results

def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_rows(work: Path, stage: str) -> int:
    path = work / stage / f"{stage}_metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def assert_same_metrics(run: Path, reference: Path, stage: str, steps: int) -> None:
    """Every logged step of ``stage`` equals the reference's, timings aside; every step once."""
    rows = metrics(run / stage / f"{stage}_metrics.jsonl")
    ref = {row["step"]: row for row in metrics(reference / stage / f"{stage}_metrics.jsonl")}
    assert sorted(ref) == list(range(1, steps + 1))
    assert [row["step"] for row in rows] == list(range(1, steps + 1)), [r["step"] for r in rows]
    for row in rows:
        a = {k: v for k, v in row.items() if k not in TIMING_KEYS}
        b = {k: v for k, v in ref[row["step"]].items() if k not in TIMING_KEYS}
        assert a == b, f"{stage} step {row['step']} differs:\n run       {a}\n reference {b}"


def _checkpoint(work: Path, stage: str) -> Path:
    save_dir = work / stage / "ckpt"
    return save_dir / (save_dir / "latest").read_text().strip()


def _assert_same_tensors(ta: dict, tb: dict) -> int:
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs"
    return len(ta)


def assert_same_checkpoint(run: Path, reference: Path, stage: str) -> int:
    """The final checkpoints of ``stage`` (model and optimizer tensors) are bitwise equal.
    Returns the number of tensors compared."""
    from megatron_sega.checkpoint.manager import read_tensors

    a, b = _checkpoint(run, stage), _checkpoint(reference, stage)
    assert a.name == b.name
    return _assert_same_tensors(read_tensors(a / "model_optim"), read_tensors(b / "model_optim"))


def assert_same_weights(run: Path, reference: Path) -> int:
    """The final SFT and SEGA checkpoints (model and optimizer tensors) and the exported HF
    weights are bitwise equal. Returns the number of tensors compared."""
    from safetensors.torch import load_file

    count = sum(assert_same_checkpoint(run, reference, stage) for stage in ("sft", "sega"))
    return count + _assert_same_tensors(load_file(run / "hf_sega" / "model.safetensors"),
                                        load_file(reference / "hf_sega" / "model.safetensors"))


def assert_same_results(run: Path, reference: Path) -> None:
    """Two runs of the whole pipeline agree bit for bit: SFT and SEGA per-step metrics, final
    weights and optimizer state, exported HF weights, evaluation records."""
    assert_same_metrics(run, reference, "sft", SFT_STEPS)
    assert_same_metrics(run, reference, "sega", SEGA_STEPS)
    assert assert_same_weights(run, reference) > 20
    for name in ("sft", "sega"):
        for file in ("pairs.jsonl", "summary.json"):
            assert ((run / f"eval_{name}" / file).read_text()
                    == (reference / f"eval_{name}" / file).read_text()), f"eval_{name}/{file}"


def assert_all_stages_done(work: Path) -> None:
    for stage in ("convert", "sft", "sega", "eval", "export"):
        assert (work / f".done_{stage}").is_file(), f"stage {stage} not marked done"
    assert not (work / "sft" / "ckpt" / "STOPPED").exists()


def assert_no_abort(text: str, what: str) -> None:
    match = ABORT.search(text)
    assert match is None, f"{what}: a process aborted ({match.group(0)!r}):\n{text[-3000:]}"
