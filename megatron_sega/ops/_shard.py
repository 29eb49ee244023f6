"""Plumbing shared by the vocab-parallel ops: argument checks, token chunks and collectives.

A *shard* is this rank's contiguous block of vocabulary columns, ``logits_shard[..., j]`` being
the logit of global token id ``vocab_start + j``. Ids ``>= vocab_size`` are padding (Megatron pads
the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``). Because padding sits at the
end of the vocabulary, the true columns of a shard are always a prefix ``[:width]`` of it, so the
ops slice instead of masking.

Every collective goes through :func:`all_reduce` / :func:`all_gather` below, so that tests and
benchmarks can count what is sent, and ``tp_group=None`` (one process) sends nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

# Rows (tokens) processed at once: temporaries are O(chunk_size x V_shard) floats.
DEFAULT_CHUNK_SIZE = 256

# The largest vocabulary whose ids and counts float32 carries exactly (2**24).
_MAX_VOCAB = 1 << 24


class NonFiniteLogitsError(ValueError):
    """NaN or Inf in the logits (raised on every TP rank of the group together)."""


def check_shard(logits_shard: Tensor, vocab_start: int, vocab_size: int, tp_group,
                chunk_size: int) -> int:
    """Validate the shard arguments; return ``width``, the number of true-vocab columns here."""
    if not isinstance(logits_shard, Tensor) or not logits_shard.is_floating_point():
        raise ValueError(f"logits_shard must be a floating-point tensor [..., V_shard], got "
                         f"{type(logits_shard).__name__} {getattr(logits_shard, 'dtype', '')}")
    if logits_shard.dim() == 0 or logits_shard.shape[-1] == 0:
        raise ValueError(f"logits_shard has an empty vocab dimension (shape "
                         f"{tuple(logits_shard.shape)}): every tensor-parallel rank must hold at "
                         f"least one vocab column; pad the vocabulary to a multiple of TP")
    if not isinstance(vocab_size, int) or not 1 <= vocab_size <= _MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int in [1, 2**24]: pass the true "
                         f"(unpadded) vocabulary size")
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start={vocab_start!r} must be an int >= 0: pass the global id of "
                         f"this shard's first column (tp_rank * V_shard)")
    if tp_group is None and (vocab_start != 0 or logits_shard.shape[-1] < vocab_size):
        raise ValueError(f"with tp_group=None the shard must be the whole vocabulary: got "
                         f"vocab_start={vocab_start}, V_shard={logits_shard.shape[-1]}, "
                         f"vocab_size={vocab_size}; pass tp_group for a vocab-parallel shard")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1")
    return max(0, min(logits_shard.shape[-1], vocab_size - vocab_start))


def sum64(x: Tensor, block: int = 128) -> Tensor:
    """Row sums ``[c]`` in fp64 of an fp32 ``[c, w]``: fp32 within blocks, fp64 across them.

    A plain fp32 sum of ``w`` terms loses ~1e-7 relatively (enough to move an entropy of 8 by
    1e-6); ``x.sum(dtype=torch.float64)`` copies the whole chunk to fp64 and is ~50x slower on
    CPU. Blocks of 128 keep the fp32 part short without any copy (the reshape is a view).
    """
    c, w = x.shape
    if c * w <= 1 << 16:  # small: one fp64 sum costs less than the ops that avoid it
        return x.sum(-1, dtype=torch.float64)
    full = w - w % block
    out = x[:, :full].reshape(c, full // block, block).sum(-1).double().sum(-1)
    if full < w:
        out += x[:, full:].sum(-1).double()
    return out


def row_reader(t: Tensor) -> Callable[[slice | Tensor], Tensor]:
    """``read(rows) -> [len(rows), V]`` for a slice (or an index tensor) of the flattened leading
    dims of ``t [..., V]``.

    A view for a slice when the leading dims flatten without a copy; otherwise (e.g.
    ``logits[:, :-1]``) each chunk of rows is gathered on its own, so that no full copy of ``t``
    is ever made.
    """
    try:
        flat = t.view(-1, t.shape[-1])
        return flat.__getitem__
    except RuntimeError:
        lead = t.shape[:-1]

        def read(rows: slice | Tensor) -> Tensor:
            index = rows if isinstance(rows, Tensor) else \
                torch.arange(rows.start, rows.stop, device=t.device)
            return t[torch.unravel_index(index, lead)]

        return read


def row_chunks(n_rows: int, chunk_size: int) -> Iterator[slice]:
    """Row slices of at most ``chunk_size`` rows (the same on every rank)."""
    for start in range(0, n_rows, chunk_size):
        yield slice(start, min(start + chunk_size, n_rows))


def group_size(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def all_reduce(tensor: Tensor, tp_group, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of a tensor the op owns; identity when ``tp_group`` is None."""
    if tp_group is not None:
        dist.all_reduce(tensor, op=op, group=tp_group)
    return tensor


def all_gather(tensor: Tensor, tp_group) -> Tensor:
    """``[TP, *tensor.shape]``: every rank's tensor, in group-rank order."""
    if tp_group is None:
        return tensor.unsqueeze(0)
    size = dist.get_world_size(tp_group)
    out = tensor.new_empty(size * tensor.numel())  # gloo wants the flat (concatenated) form
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor.reshape(-1).contiguous(), group=tp_group)
    return out.view(size, *tensor.shape)


def global_max(z: Tensor, vocab_start: int, vocab_size: int, tp_group, *, with_min: bool = False,
               extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Row maxima of the true vocab over all ranks, and the flags of the checks that need every
    rank.

    ``z`` is a chunk ``[c, width]`` of true-vocab columns in fp32. One MAX all-reduce carries the
    row maxima, optionally the negated row minima (``with_min``) and ``extra [c, n]`` columns
    (also max-reduced), a NaN/Inf flag (1 + the highest bad rank) and the end of the covered
    vocabulary. Returns ``(max [c], other columns [c, n'], flags [2])``: ``-min`` first.

    Nothing here reads a tensor on the host (a device sync each): the flags are computed and
    reduced on the device, and the caller max-combines them over its chunks and hands them to
    :func:`raise_for_flags` once per call, so that every rank raises the same error together
    instead of one rank raising and the others waiting forever in the next collective.

    The finiteness check reads the row max and min (NaN propagates through both, +Inf shows in
    the max, -Inf in the min): no extra pass and no temporary, unlike ``torch.isfinite(z)``.
    """
    c, width = z.shape
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    if width:
        local_max, local_min = z.amax(-1), z.amin(-1)
        finite = torch.isfinite(local_max).all() & torch.isfinite(local_min).all()
        bad = torch.where(finite, 0.0, float(rank + 1)).to(z.dtype)
    else:
        local_max = local_min = z.new_full((c,), -math.inf)
        bad = z.new_zeros(())
    flags = torch.stack([bad, bad.new_tensor(float(vocab_start + width if width else 0))])
    cols = [local_max] + ([-local_min if width else local_min] if with_min else [])
    table = torch.stack(cols, 1) if extra is None else torch.cat([torch.stack(cols, 1), extra], 1)
    packed = all_reduce(torch.cat([table.reshape(-1), flags]), tp_group, dist.ReduceOp.MAX)
    table = packed[:-2].view(c, -1)
    return table[:, 0], table[:, 1:], packed[-2:]


def raise_for_flags(nonfinite: float, covered: float, vocab_size: int) -> None:
    """Raise what :func:`global_max`'s reduced flags (read on the host) say is wrong."""
    if nonfinite > 0:
        raise NonFiniteLogitsError(f"logits_shard contains NaN or Inf in the true vocabulary (TP rank "
                         f"{int(nonfinite) - 1}): fix the model output (overflow in fp16/bf16? a "
                         f"-inf mask?) before computing entropies, log-probs or samples")
    if covered < vocab_size:
        raise ValueError(f"the shards cover ids [0, {int(covered)}) but vocab_size="
                         f"{vocab_size}: check vocab_start on each rank and vocab_size")
