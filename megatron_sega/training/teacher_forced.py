"""Teacher-forced per-token log-probs and entropies of given sequences (any TP/PP/DP).

Used by evaluation (log pi(a|q) of chosen/rejected), by SEGA's optional reference model, and by
the tests that check the sampler's statistics against a plain forward pass.
"""

from __future__ import annotations

import torch

from megatron_sega import ops
from megatron_sega.data import Batch
from megatron_sega.data.packing import PackedBatch
from megatron_sega.runtime import Runtime
from megatron_sega.runtime.stages import broadcast_from_last_stage
from megatron_sega.training.engine import forward_backward
from megatron_sega.training.microbatch import split_microbatches


def vocab_shard_info(logits: torch.Tensor, runtime: Runtime):
    shard = logits.shape[-1]
    return runtime.tp_rank * shard, (runtime.tp_group if runtime.tp > 1 else None)


@torch.no_grad()
def token_stats(model_chunks: list, runtime: Runtime, batch: Batch | PackedBatch, vocab_size: int,
                micro_batch_size: int) -> dict[str, torch.Tensor]:
    """Per-token ``logp`` (of the labels) and ``entropy`` [N, S] of a collated batch, zero
    outside its ``loss_mask`` (the response targets). A packed batch (``data.packing``) runs one
    row per microbatch and gives [R, S] in its own layout.

    Returned on every rank of the model-parallel group (broadcast from the last stage)."""
    mask = batch.loss_mask
    n, seq = batch.tokens.shape
    if isinstance(batch, PackedBatch):
        micro_batch_size = 1
        micro = [{k: v for k, v in mb.items() if k != "loss_mask"} for mb in batch.microbatches()]
    else:
        micro = split_microbatches({"tokens": batch.tokens, "labels": batch.labels},
                                   micro_batch_size)

    def loss_fn(logits, mb):
        start, group = vocab_shard_info(logits, runtime)
        labels = mb["labels"].to(logits.device)
        try:
            logp, entropy = ops.log_probs_and_entropy(logits, labels, start, vocab_size, group)
        except ops.NonFiniteLogitsError:  # raised below on every stage at once, not mid-pipeline
            logp = entropy = torch.full(labels.shape, float("nan"), device=logits.device)
        return logits.new_zeros(()), {"logp": logp.detach(), "entropy": entropy.detach()}

    from megatron_sega.models.lora import as_run

    for chunk in model_chunks:
        chunk.eval()
    try:
        with as_run(model_chunks):  # a LoRA model's base: its adapters off
            outputs = forward_backward(model_chunks, runtime, micro, loss_fn, forward_only=True)
    finally:
        for chunk in model_chunks:
            chunk.train()
    stats = torch.zeros(2, len(micro) * micro_batch_size, seq, dtype=torch.float32,
                        device=runtime.device)
    if runtime.is_last_stage:
        stats[0] = torch.cat([o["logp"] for o in outputs]).float()
        stats[1] = torch.cat([o["entropy"] for o in outputs]).float()
    stats = broadcast_from_last_stage(stats, runtime)[:, :n, :seq].cpu()
    if torch.isnan(stats).any():  # the same on every rank of the model-parallel group
        raise ops.NonFiniteLogitsError("NaN or Inf logits in a teacher-forced forward pass")
    stats = stats * mask.float()
    return {"logp": stats[0], "entropy": stats[1]}
