"""Where we run: device and backend choice, the CPU bridge for Megatron-Core, process groups."""

from megatron_sega.runtime.distributed import (
    ParallelConfigError,
    Runtime,
    any_rank,
    choose_device,
    have_transformer_engine,
    launch_info,
    setup,
    teardown,
    validate_parallel_sizes,
)

__all__ = [
    "ParallelConfigError",
    "Runtime",
    "any_rank",
    "choose_device",
    "have_transformer_engine",
    "launch_info",
    "setup",
    "teardown",
    "validate_parallel_sizes",
]
