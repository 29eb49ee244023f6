"""Microbatches of equal shape for Megatron's schedule, the one way every loop cuts a batch."""

from __future__ import annotations

import torch


def split_microbatches(rows: dict[str, torch.Tensor], micro_batch_size: int
                       ) -> list[dict[str, torch.Tensor]]:
    """Cut a batch of ``n`` rows (every tensor [n, ...]) into microbatches of exactly
    ``micro_batch_size`` rows: the pipeline sends fixed-size activations, so a short last
    microbatch is padded.

    Padding rows weigh nothing: ``tokens`` are copies of the batch's first rows (a forward pass
    over real sequences; no all-padding attention row), every other tensor is zero (``loss_mask``,
    ``advantage``, per-token statistics), so a loss masked by ``loss_mask`` or weighted by a
    per-row value ignores them. Callers that read per-row outputs keep the first ``n`` rows."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if "tokens" not in rows:
        raise ValueError("a batch needs 'tokens' [n, seq]")
    n = rows["tokens"].shape[0]
    if n == 0:
        raise ValueError("cannot split an empty batch into microbatches")
    pad = (-n) % micro_batch_size
    if pad:
        filler = torch.arange(pad) % n  # the first rows, repeated if the batch is tiny
        rows = {k: torch.cat([v, v[filler] if k == "tokens" else v.new_zeros(pad, *v.shape[1:])])
                for k, v in rows.items()}
    return [{k: v[i:i + micro_batch_size] for k, v in rows.items()}
            for i in range(0, n + pad, micro_batch_size)]
