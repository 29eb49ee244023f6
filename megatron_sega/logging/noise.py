"""The one place that silences library messages which ask nothing of a user of this tool.

Each entry below is one known message, matched by its start and by where it comes from (a
``warnings`` warning or a named logger), with the reason it is harmless. Everything else stays
visible: other library warnings may call for action, and this project's own warnings
(``CheckpointWarning``, the notes it prints) always do. ``megatron_sega.cli.main`` installs the
filters in every process it runs in (each torchrun worker runs ``main``), and so does
``tools/convert.py``.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class KnownMessage:
    source: str     # "warnings" or the name of the logger that emits it
    start: str      # the start of the message text
    cpu_only: bool  # harmless only without a GPU (with one it may call for action)
    why: str


_NOT_OURS = ("addressed to Megatron-Core's developers, about its own defaults or calls; a user "
             "cannot act on it")

KNOWN_MESSAGES: tuple[KnownMessage, ...] = (
    # GPU kernel packages: without a GPU there is nothing to install.
    KnownMessage("warnings", "Transformer Engine and Apex are not installed", True,
                 "Megatron-Core falls back to torch's optimizer and its own multi-tensor "
                 "kernels, which a CPU run uses anyway (one warning per module that looks)"),
    KnownMessage("warnings", "Apex is not installed. Falling back to Torch Norm", True,
                 "the torch norm is the CPU norm"),
    KnownMessage("torch.utils.cpp_extension", "No CUDA runtime is found", True,
                 "torch looks for a CUDA toolkit when Megatron-Core imports its extension "
                 "helpers; a CPU run compiles no CUDA extension"),
    KnownMessage("warnings", "When using async grad allreduce it is recommended to set the "
                 "environment variable CUDA_DEVICE_MAX_CONNECTIONS", True,
                 "a CUDA stream setting; on CPU there are no streams"),
    # Deprecations and notices inside Megatron-Core: harmless on any device.
    KnownMessage("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED", False,
                 "this project builds GPTModel on purpose (models/builder.py)"),
    KnownMessage("warnings", "full scope is deprecated. Use empty cuda_graph_modules", False,
                 _NOT_OURS + " (TransformerConfig's default CUDA-graph scope; no graphs here)"),
    KnownMessage("warnings", "MimoModelConfig is experimental", False,
                 _NOT_OURS + " (emitted when the package is imported; MIMO is not used)"),
    KnownMessage("warnings", "`torch.distributed.reduce_scatter_tensor` is deprecated", False,
                 _NOT_OURS + " (its distributed optimizer calls the older torch name)"),
    KnownMessage("warnings", "`torch.distributed.all_gather_into_tensor` is deprecated", False,
                 _NOT_OURS + " (its distributed optimizer calls the older torch name)"),
    KnownMessage("warnings", "torch.distributed is disabled, unavailable or uninitialized, "
                 "assuming the intent is to load in a single process", False,
                 "Megatron-Core's checkpoint loader asks torch for a per-rank read "
                 "(no_dist=True) on purpose; every rank reads its own shards"),
    KnownMessage("warnings", "The argument order of load has been changed", False,
                 _NOT_OURS + " (its loader calls torch's load with positional arguments)"),
    KnownMessage("warnings", "Please use DTensor instead and we are deprecating ShardedTensor",
                 False, _NOT_OURS + " (its checkpoints are built on torch's ShardedTensor)"),
    KnownMessage("megatron.core.distributed.distributed_data_parallel",
                 "DistributedDataParallel: full_param_layout not provided", False,
                 "DDP computes the distributed optimizer's layout itself, as it did before "
                 "the argument existed; nothing differs for the run"),
    KnownMessage("megatron.core.dist_checkpointing.strategies.torch",
                 "MCore's async save is deprecated", False,
                 _NOT_OURS + " (its default save strategy; checkpoints are saved synchronously)"),
)


class _DropKnown(logging.Filter):
    """Drops a logger's records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def silence_known_messages(on_gpu: Optional[bool] = None) -> None:
    """Install the filters for :data:`KNOWN_MESSAGES` that are harmless here: ``on_gpu``
    (default: whether torch sees a GPU) or on CPU. Idempotent; call it before Megatron-Core is
    imported (its warnings come at import)."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    by_logger: dict[str, list[str]] = {k.source: [] for k in KNOWN_MESSAGES
                                        if k.source != "warnings"}
    for known in KNOWN_MESSAGES:
        if on_gpu and known.cpu_only:
            continue
        if known.source == "warnings":
            warnings.filterwarnings("ignore", message=re.escape(known.start))
        else:
            by_logger[known.source].append(known.start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)  # created now if its module is not imported yet
        for old in [f for f in logger.filters if isinstance(f, _DropKnown)]:
            logger.removeFilter(old)
        if starts:
            logger.addFilter(_DropKnown(tuple(starts)))
