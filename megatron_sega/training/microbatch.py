"""Microbatches of equal shape for Megatron's schedule, the one way every loop cuts a batch."""

from __future__ import annotations

import math

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


def agreed_shape(rows: int, length: int, runtime) -> tuple[int, int]:
    """The packed rows (microbatches) and their length that every rank running one schedule (the
    model-parallel group: TP x PP of a replica) uses: the largest of theirs, the row count a
    multiple of ``pp`` under virtual pipelining (the interleaved schedule runs them in groups of
    ``pp``). The ranks pack the same data the same way, so this only guards the schedule;
    data-parallel replicas run their own schedules and may differ."""
    import torch.distributed as dist

    if runtime.tp * runtime.pp > 1:
        shape = torch.tensor([rows, length], dtype=torch.long, device=runtime.device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=runtime.mp_group)
        rows, length = (int(v) for v in shape.tolist())
    if runtime.vpp is not None:
        rows = -(-rows // runtime.pp) * runtime.pp
    return rows, length


ROW_MULTIPLE = 16  # packed rows are a multiple of this many tokens (kernel-friendly)


def fitted_length(lengths: list[int], budget: int, rows: int, *, align: int = 1,
                  groups=None) -> int:
    """The shortest row length, a multiple of ``ROW_MULTIPLE`` and of ``align``, into which the
    sequences pack in ``rows`` rows, at most ``budget`` rounded up to that multiple: a step's
    rows need one shape, not the budget's, so the last row's empty tail shrinks as a padded
    batch's longest row does. (Under sequence parallelism the multiple of ``align`` = TP is what
    splits the row over the TP ranks.)"""
    from megatron_sega.data.packing import pack_rows

    unit = math.lcm(ROW_MULTIPLE, align)
    top = -(-budget // unit) * unit
    items = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(lengths))]
    slots = [sum(-(-lengths[i] // align) * align for i in item) for item in items]
    if not slots:
        return unit
    lo = max(max(slots), -(-sum(slots) // rows))
    candidates = list(range(-(-lo // unit) * unit, top + 1, unit)) or [top]
    first, last = 0, len(candidates) - 1  # the last holds them in `rows` rows (the budget's)
    while first < last:  # the smallest that packs into `rows` rows
        mid = (first + last) // 2
        if len(pack_rows(lengths, candidates[mid], groups=groups, align=align)) <= rows:
            last = mid
        else:
            first = mid + 1
    return candidates[last]


def pack_for_schedule(model_chunks, runtime, examples, pad_id: int, budget: int, *, stage: str,
                      groups=None):
    """``examples`` packed into the fewest rows of at most ``budget`` tokens
    (``data.packing.pack``), the rows cut to the shortest length that still holds them
    (:func:`fitted_length`), padded with empty rows to the shape the schedule's ranks agree on
    (:func:`agreed_shape`). ``stage`` names the budget's option in errors."""
    from megatron_sega.data.packing import pack, pack_rows

    align = packing_align(model_chunks, runtime)
    option = f"{stage}.max_tokens_per_microbatch"
    lengths = [ex.length for ex in examples]
    rows = len(pack_rows(lengths, budget, groups=groups, align=align, option=option,
                         ids=[ex.id for ex in examples]))
    length = fitted_length(lengths, budget, max(rows, 1), align=align, groups=groups)
    rows = len(pack_rows(lengths, length, groups=groups, align=align))
    rows, length = agreed_shape(rows, length, runtime)
    return pack(examples, pad_id, length, groups=groups, align=align, option=option,
                min_rows=rows)


def dp_share(items: list, sizes: list[int], runtime) -> list:
    """This data-parallel rank's items of a global batch, split by tokens (``sizes``) so that the
    replicas get similar loads (``data.packing.balance``); every rank computes the same split."""
    from megatron_sega.data.packing import balance

    return [items[i] for i in balance(sizes, runtime.dp)[runtime.dp_rank]]


def dp_rebalance(items: list, sizes: list[int], runtime) -> list:
    """Items that each data-parallel rank holds (its own ``items`` of token ``sizes``, e.g. the
    candidates it sampled) shared out again by tokens: one ``all_gather_object`` over DP, then
    :func:`dp_share` of the whole, in rank order (every rank computes the same split)."""
    import torch.distributed as dist

    if runtime.dp == 1:
        return list(items)
    gathered: list = [None] * runtime.dp
    dist.all_gather_object(gathered, list(zip(items, sizes)), group=runtime.dp_group)
    everything = [pair for part in gathered for pair in part]
    return dp_share([item for item, _ in everything], [size for _, size in everything], runtime)
