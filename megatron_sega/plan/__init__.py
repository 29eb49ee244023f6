"""Plan a run before launching it: per-GPU memory, the layouts that fit, and time estimates."""

from megatron_sega.plan.hardware import GPU, GPUS
from megatron_sega.plan.memory import Layout, StageMemory

__all__ = ["GPU", "GPUS", "Layout", "StageMemory"]
