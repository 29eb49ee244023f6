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


def packing_align(model_chunks, runtime) -> int:
    """Each packed sequence's slot is a multiple of this: the TP size under Transformer Engine
    (its THD kernels split sequences over TP ranks; GPU only, not yet verified), else 1."""
    from megatron_sega.models.builder import unwrap_model

    uses_te = getattr(unwrap_model(model_chunks[0]), "uses_transformer_engine", False)
    return runtime.tp if uses_te else 1


def agreed_row_count(rows: int, runtime) -> int:
    """The number of packed rows (microbatches) every rank running one schedule (the model-parallel
    group: TP x PP of a replica) uses: the largest of theirs, as a multiple of ``pp`` under
    virtual pipelining (the interleaved schedule runs them in groups of ``pp``). The ranks pack
    the same data the same way, so this only guards the schedule; data-parallel replicas run
    their own schedules and may differ."""
    import torch.distributed as dist

    if runtime.tp * runtime.pp > 1:
        count = torch.tensor(rows, dtype=torch.long, device=runtime.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=runtime.mp_group)
        rows = int(count)
    if runtime.vpp is not None:
        rows = -(-rows // runtime.pp) * runtime.pp
    return rows


def pack_for_schedule(model_chunks, runtime, examples, pad_id: int, budget: int, *, stage: str,
                      groups=None):
    """``examples`` packed into rows of ``budget`` tokens (``data.packing.pack``), padded with
    empty rows to the count the schedule's ranks agree on (:func:`agreed_row_count`). ``stage``
    names the budget's option in errors."""
    from megatron_sega.data.packing import pack, pack_rows

    align = packing_align(model_chunks, runtime)
    option = f"{stage}.max_tokens_per_microbatch"
    rows = pack_rows([ex.length for ex in examples], budget, groups=groups, align=align,
                     option=option, ids=[ex.id for ex in examples])
    return pack(examples, pad_id, budget, groups=groups, align=align, option=option,
                min_rows=agreed_row_count(len(rows), runtime))


def dp_share(items: list, sizes: list[int], runtime) -> list:
    """This data-parallel rank's items of a global batch, split by tokens (``sizes``) so that the
    replicas get similar loads (``data.packing.balance``); every rank computes the same split."""
    from megatron_sega.data.packing import balance

    return [items[i] for i in balance(sizes, runtime.dp)[runtime.dp_rank]]
