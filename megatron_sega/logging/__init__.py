"""Metrics sinks (JSONL, TensorBoard, optional W&B), progress bars, throughput and MFU; and, in
``noise.py``, the known library messages that ask nothing of a user, silenced in one place."""

from megatron_sega.logging.metrics import (
    MetricsLogger, attention_span, gpu_peak_tflops, mfu, training_flops_per_token,
)

__all__ = ["MetricsLogger", "attention_span", "gpu_peak_tflops", "mfu", "training_flops_per_token"]
