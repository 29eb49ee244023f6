"""Non-finite weights are never saved (issue 25).

A training step with a NaN/Inf loss or grad norm is skipped on every rank
(``training.engine.optimizer_step``), so the weights stay finite. This is the last guard: a
checkpoint of NaN weights would become ``latest`` and ``checkpoint.keep_last`` would prune the
good ones it replaces, so a save refuses them before it writes anything.
"""

from __future__ import annotations

import torch

from megatron_sega.errors import CheckpointError
from megatron_sega.runtime import any_rank


def refuse_nonfinite_weights(chunks: list, step: int, device) -> None:
    """Raise :class:`CheckpointError` on every rank when any rank's weights hold NaN/Inf
    (agreed over the world, so that no rank enters the save's collectives alone)."""
    with torch.no_grad():
        finite = torch.ones((), dtype=torch.bool, device=device)
        for chunk in chunks:
            for param in chunk.parameters():
                finite &= torch.isfinite(param).all()
    if any_rank(not bool(finite), device):
        raise CheckpointError(
            f"refusing to save the checkpoint of step {step}: the model's weights hold NaN or "
            "Inf; the earlier checkpoints are kept: resume from the latest with a lower optim.lr")
