"""Where we run: device and backend choice, the CPU bridge for Megatron-Core, process groups."""

from megatron_sega.runtime.distributed import (
    ParallelConfigError,
    Runtime,
    choose_device,
    launch_info,
    setup,
    teardown,
    validate_parallel_sizes,
)

__all__ = [
    "ParallelConfigError",
    "Runtime",
    "choose_device",
    "launch_info",
    "setup",
    "teardown",
    "validate_parallel_sizes",
]
