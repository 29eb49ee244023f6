"""Where step metrics go: a JSONL file, TensorBoard, optionally W&B, and a progress bar.

Only the rank that owns the metrics writes (the caller passes ``enabled``). The JSONL file gets
every step (the complete record, flushed each step so a crash loses nothing already logged; a run
that starts at ``start_step``, e.g. resumed from that checkpoint, first drops the records past it,
which a crashed run logged after its last checkpoint, so that each step appears once);
TensorBoard, W&B and the progress bar's figures get every ``interval``-th step
(``logging.interval``) and the last one logged before ``close``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

from megatron_sega.errors import ConfigError
from megatron_sega.models.spec import LlamaSpec


def training_flops_per_token(spec: LlamaSpec, seq_len: float) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward), counting matmuls only:
    per layer 2*(qkv + proj + 3 MLP matrices) weights + 4*s*h attention (QK^T and AV, 2*s*h each;
    the causal half is *not* taken off, following Megatron's ``num_floating_point_operations``),
    plus the output layer."""
    h, d = spec.hidden_size, spec.kv_channels
    qkv = h * (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    proj = spec.num_attention_heads * d * h
    mlp = 3 * h * spec.ffn_hidden_size
    attention = 4 * seq_len * spec.num_attention_heads * d
    per_layer = 2 * (qkv + proj + mlp) + attention
    forward = spec.num_layers * per_layer + 2 * h * spec.vocab_size
    return 3.0 * forward


# Dense bf16 peaks (TFLOP/s): half the "with sparsity" figures of NVIDIA's data sheets. The H100
# parts differ by clock and SM count: SXM 1979/2, PCIe 1513/2, NVL 1671/2. Matched in this order
# against torch.cuda.get_device_name() (e.g. "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA H100 80GB HBM3" for SXM), so the variants come before the bare "H100".
PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0}


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the GPU called ``device_name``, or None when not in the table."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in device_name), None)


def gpu_peak_tflops() -> Optional[float]:
    """This GPU's dense bf16 peak, or None (CPU, or a GPU not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_for(torch.cuda.get_device_name())


def attention_span(length_sum: float, length_sq_sum: float) -> float:
    """The attention context of a step's mean trained token, the ``seq_len`` that
    :func:`training_flops_per_token` counts for a step: sum(L^2) / sum(L) over its sequences
    (lengths L, prompt + response). Each token's model FLOPs attend over its own sequence, not
    over the row that holds it: a packed row's other sequences and a padded row's padding are
    not the model's work, so packing and padding the same sequences give the same FLOPs."""
    return length_sq_sum / length_sum if length_sum > 0 else 0.0


def mfu(spec: LlamaSpec, seq_len: float, tokens: float, seconds: float, world_size: int
        ) -> Optional[float]:
    """Model FLOPs utilisation of a training step on GPUs (None on CPU); ``seq_len``: the
    step's :func:`attention_span`."""
    peak = gpu_peak_tflops()
    if peak is None or seconds <= 0:
        return None
    return training_flops_per_token(spec, seq_len) * tokens / seconds / (peak * 1e12 * world_size)


class MetricsLogger:
    def __init__(self, directory: Optional[str], *, enabled: bool = True, tensorboard: bool = True,
                 jsonl: bool = True, wandb: bool = False, progress_total: Optional[int] = None,
                 progress: bool = True, name: str = "train", run_config: Optional[dict] = None,
                 interval: int = 1, start_step: int = 0):
        self.enabled = enabled
        self.name = name
        self.interval = max(int(interval), 1)
        self._unsent: Optional[tuple] = None  # the last step the interval skipped
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        self._start = time.time()
        if not enabled:
            return
        if directory:
            path = Path(directory)
            path.mkdir(parents=True, exist_ok=True)
            if jsonl:
                keep_steps_up_to(path / f"{name}_metrics.jsonl", start_step)
                self._jsonl = open(path / f"{name}_metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(path / "tensorboard" / name))
                except ImportError:
                    print("note: tensorboard is not installed; TensorBoard logging is off")
            if wandb:
                try:
                    import wandb as wandb_module  # optional dependency, asked for explicitly
                except ImportError:
                    raise ConfigError("logging.wandb = true but the wandb package is not "
                                      "installed; pip install wandb, or set logging.wandb=false"
                                      ) from None
                self._wandb = wandb_module.init(project="megatron-sega", name=name,
                                                config=run_config or {}, dir=str(path))
        if progress and progress_total:
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, desc=name, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, progress_keys: tuple[str, ...] = ("loss",)) -> None:
        if not self.enabled:
            return
        clean = {k: _number(v) for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time() - self._start, 3), **clean}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if step % self.interval == 0:
            self._send(step, clean, progress_keys)
            self._unsent = None
        else:
            self._unsent = (step, clean, progress_keys)
        if self._bar is not None:
            self._bar.update(1)

    def _send(self, step: int, clean: dict, progress_keys: tuple[str, ...]) -> None:
        if self._tb:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{self.name}/{key}", value, step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            shown = {k: f"{clean[k]:.4g}" for k in progress_keys
                     if isinstance(clean.get(k), (int, float))}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.enabled and self._unsent is not None:  # the last step reaches every sink
            self._send(*self._unsent)
            self._unsent = None
        if self._bar is not None:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the records of ``path`` (a metrics JSONL) past ``step``, and a torn last line, by an
    atomic rewrite (a crash during it leaves the old file). Nothing changes when nothing is
    dropped."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (at := _step_of(line)) is not None and at <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _step_of(line: str) -> Optional[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _number(value):
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.item() if value.numel() == 1 else value.tolist()
    except ImportError:
        pass
    return value
