"""Metrics sinks (JSONL, TensorBoard, optional W&B), progress bars, throughput and MFU."""

from megatron_sega.logging.metrics import (
    MetricsLogger, gpu_peak_tflops, mfu, training_flops_per_token,
)

__all__ = ["MetricsLogger", "gpu_peak_tflops", "mfu", "training_flops_per_token"]
