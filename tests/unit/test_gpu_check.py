"""tools/gpu_check.sh and its benchmarks, on CPU (issue 20 item 3 and the GPU figures): what
``--make-wheels`` carries, the clocks the figures are taken on, the per-phase peak memory."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# What the GPU machine has (issue 20's brief: an H200, Python 3.12, no registry), by distribution.
TARGET_HAS = {"torch", "transformers", "accelerate", "peft", "pytest", "hypothesis", "numpy",
              "scipy", "statsmodels", "pyarrow", "pyyaml", "safetensors", "tokenizers",
              "sentencepiece", "tensorboard", "matplotlib", "psutil", "tqdm", "rich",
              "jinja2"}  # jinja2: a requirement of torch itself

# Stands in for Python: `-m pip ...` writes its arguments down and succeeds.
_FAKE_PIP = """#!/usr/bin/env bash
echo "$@" > "$LOG/pip"
exit 0
"""


def _setup_requirements(*extras: str) -> list[str]:
    call = next(n for n in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("install_requires", "extras_require")}
    reqs = kw["install_requires"] + [r for e in extras for r in kw["extras_require"][e]]
    return [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs]


def test_make_wheels_carries_every_requirement_the_target_lacks_at_the_tested_version(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(_FAKE_PIP)
    fake.chmod(0o755)
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--make-wheels", str(tmp_path / "w")],
                            cwd=REPO, env=dict(os.environ, PYTHON=str(fake), LOG=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "pip").read_text().split()
    assert args[:4] == ["-m", "pip", "download", "--no-deps"] and "--only-binary=:all:" in args
    assert {"--python-version", "3.12", "--abi", "cp312", "manylinux_2_28_x86_64"} <= set(args)
    pinned = dict(a.split("==") for a in args if "==" in a)
    needed = set(_setup_requirements("test")) - TARGET_HAS
    # megatron-core, gguf, pytest-timeout, pytest-xdist, datasets, trl; and the needs of
    # datasets and pytest-xdist the target lacks
    assert needed | {"dill", "multiprocess", "execnet"} == set(pinned), (needed, pinned)
    for name, version in pinned.items():  # the versions CI runs
        assert md.version(name) == version, name


def test_the_benchmark_table_quotes_the_sampler_on_its_speedup_clock():
    """On a GPU the sampler benchmark's speed-ups come from synchronized wall time; the table
    must quote those, not tokens per CPU-second (the host only queues kernels)."""
    from benchmarks.__main__ import table

    def row(decoder, wall, cpu):
        return {"decoder": decoder, "tokens_per_s_wall": wall, "tokens_per_cpu_s": cpu,
                "speedup_clock": "wall"}

    gpu = {"device": "cuda", "config": {"batch": 8, "new": 256},
           "results": [row("sampler", 4000.0, 90000.0), row("hf_generate", 1000.0, 3000.0)]}
    text = table({"sampler": gpu})
    assert "| tokens per second (wall, synchronized) vs transformers generate (KV cache) | " \
           "4000 (4.00x) | 1000 |" in text
    cpu = {"device": "cpu", "config": {"batch": 8, "new": 256},
           "results": [{"decoder": "sampler", "tokens_per_cpu_s": 600.0, "tokens_per_s_wall": 1.0},
                       {"decoder": "hf_generate", "tokens_per_cpu_s": 200.0,
                        "tokens_per_s_wall": 1.0}]}  # written before the clock was recorded
    assert "| tokens per CPU-second vs transformers generate (KV cache) | 600 (3.00x) | 200 |" \
        in table({"sampler": cpu})


class _FakeEvent:
    """torch.cuda.Event on a machine without CUDA: 1.5 s of device time between two records."""
    clock = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing

    def record(self):
        _FakeEvent.clock += 1500.0
        self.at = _FakeEvent.clock

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


def test_training_steps_are_timed_with_cuda_events_after_a_warm_up(monkeypatch):
    from benchmarks import train_step

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(train_step.time, "perf_counter", lambda: pytest.fail("host clock"))
    calls = []
    assert train_step.timed(lambda: calls.append(1), 3, "cuda") == pytest.approx(0.5)
    assert len(calls) == 4  # one warm-up step, untimed


def test_sega_phases_take_the_sampler_apart_and_report_no_memory_on_cpu():
    from benchmarks.sega_step import PhaseSampler
    from benchmarks.train_step import PeakMemory

    order = []

    class Peaks(PeakMemory):
        def start(self):
            order.append("start")

        def stop(self, phase):
            order.append(phase)
            super().stop(phase)

    class Sampler:
        max_batch_tokens = 7

        def generate(self, prompts, params):
            order.append("generate")
            return prompts

    peaks = Peaks("cpu")
    sampler = PhaseSampler(Sampler(), peaks)
    assert sampler.generate([[1]], None) == [[1]] and sampler.rollout == [[1]]
    assert sampler.max_batch_tokens == 7  # the rest is the sampler's own
    # the sample phase is generate alone; the train phase starts as it returns
    assert order == ["start", "generate", "sample", "start"]
    assert peaks.gib == {"sample": None}
