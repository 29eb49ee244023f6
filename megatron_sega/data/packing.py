"""Padding-free batches (issue 22): whole sequences packed into rows of a fixed token budget.

A packed row holds several prompt+response sequences back to back, then padding up to the
budget (``*.max_tokens_per_microbatch``), so that every microbatch has one shape ``[1, budget]``
(the pipeline's point-to-point sends are fixed-size). Each row carries:

- ``tokens``, ``labels``, ``loss_mask``: as :class:`~megatron_sega.data.batching.Batch`, per
  sequence: ``labels[t] = tokens[t + 1]`` inside a sequence, never across two; the loss mask covers
  each sequence's response targets;
- ``position_ids``: restart at 0 at each sequence;
- ``segment_ids``: the index of the sequence (into ``ids`` / ``lengths``) at each position, -1 on
  the row's padding; per-sequence sums (log pi(a|q), DPO margins, Eq. 2 weights) come from it
  (:func:`segment_sums`);
- ``cu_seqlens``: the cumulative offsets of the row's segments, Megatron's ``PackedSeqParams``
  (THD): attention stays inside each segment (block-diagonal causal) and RoPE restarts there. The
  row's padding is a last segment of its own.

With ``align > 1`` each sequence's slot is padded to a multiple of ``align`` (the TP size for
Transformer Engine's THD kernels); the slot's padding belongs to its sequence's segment, after
its last token, so causal attention keeps it away from the real tokens.

Rows are filled first-fit decreasing. ``groups`` keeps sequences together in one row (a DPO pair's
chosen and rejected). :func:`balance` splits a global batch over data-parallel ranks by tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_sega.data.batching import TokenizedExample
from megatron_sega.errors import DataError


def _slot(length: int, align: int) -> int:
    return -(-length // align) * align


def pack_rows(lengths: Sequence[int], budget: int, *, groups: Sequence[Sequence[int]] | None = None,
              align: int = 1, option: str = "max_tokens_per_microbatch",
              length_option: str = "data.max_seq_len", ids: Sequence[str] | None = None
              ) -> list[list[int]]:
    """The sequences (indices into ``lengths``) of each row, first-fit decreasing by size.

    ``groups``: items whose sequences share a row (default: every sequence alone). An item larger
    than ``budget`` is a ``DataError`` naming ``option`` (the budget) and ``length_option`` (the
    sequence length limit)."""
    if budget < 1 or align < 1:
        raise ValueError(f"need budget >= 1 and align >= 1, got {budget}, {align}")
    items = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(lengths))]
    sizes = [sum(_slot(lengths[i], align) for i in item) for item in items]
    for item, size in zip(items, sizes):
        if size > budget:
            what = "a sequence" if len(item) == 1 else f"a group of {len(item)} sequences (a pair)"
            name = f" ({ids[item[0]]})" if ids is not None else ""
            raise DataError(
                f"{what}{name} has {size} tokens, more than {option} = {budget}; raise {option} "
                f"to at least {size}, or lower {length_option}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(items)), key=lambda j: (-sizes[j], j)):
        for r, free in enumerate(room):
            if sizes[index] <= free:
                rows[r].extend(items[index])
                room[r] -= sizes[index]
                break
        else:
            rows.append(list(items[index]))
            room.append(budget - sizes[index])
    return rows


@dataclass
class PackedBatch:
    """Sequences packed into R rows of S = budget tokens (see the module docstring).

    ``tokens``, ``labels``, ``position_ids``, ``segment_ids`` [R, S] int64, ``loss_mask`` [R, S]
    float32; ``cu_seqlens``: per row an int32 tensor of segment offsets, from 0 to S.
    ``lengths``, ``prompt_lengths`` [N] and ``ids`` per sequence, in the caller's order;
    ``rows``: the sequences of each row."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: list[torch.Tensor]
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    ids: list[str]
    rows: list[list[int]]

    @property
    def size(self) -> int:
        """The number of sequences."""
        return len(self.ids)

    def microbatches(self, extra: dict[str, torch.Tensor] | None = None) -> list[dict]:
        """One microbatch per row: the row's [1, S] tensors (and ``extra`` ones [R, S]), its
        ``cu_seqlens`` and ``max_seqlen`` (what ``training.engine`` turns into
        ``PackedSeqParams``)."""
        rows = {"tokens": self.tokens, "labels": self.labels, "loss_mask": self.loss_mask,
                "position_ids": self.position_ids, "segment_ids": self.segment_ids,
                **(extra or {})}
        out = []
        for r, cu in enumerate(self.cu_seqlens):
            mb = {k: v[r:r + 1] for k, v in rows.items()}
            mb["cu_seqlens"] = cu
            mb["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
            out.append(mb)
        return out

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """[N] sums of the [R, S] ``values`` over each sequence's positions (float64)."""
        return segment_sums(values.double(), self.segment_ids, self.size)

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """A per-sequence [N] value spread over each sequence's positions [R, S] (0 on padding)."""
        seg = self.segment_ids
        return torch.where(seg >= 0, values[seg.clamp(min=0)], 0).to(values.dtype)


def segment_sums(values: torch.Tensor, segment_ids: torch.Tensor, n: int) -> torch.Tensor:
    """``out[i] = sum of values where segment_ids == i`` for i < n; positions with a segment id
    of -1 (padding) or outside [0, n) are left out. Differentiable in ``values``."""
    if values.shape != segment_ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and segment_ids "
                         f"{tuple(segment_ids.shape)} must have one shape")
    seg = segment_ids.to(values.device).reshape(-1)
    keep = (seg >= 0) & (seg < n)
    flat = values.reshape(-1)
    return values.new_zeros(n).index_add(0, seg[keep], flat[keep])


def pack(examples: Sequence[TokenizedExample], pad_id: int, budget: int, *,
         groups: Sequence[Sequence[int]] | None = None, align: int = 1, min_rows: int = 0,
         row_multiple: int = 1, option: str = "max_tokens_per_microbatch",
         length_option: str = "data.max_seq_len") -> PackedBatch:
    """Pack ``examples`` into rows of ``budget`` tokens (:func:`pack_rows`), at least
    ``min_rows`` rows and a multiple of ``row_multiple`` (empty rows: all padding, no loss)."""
    lengths = [ex.length for ex in examples]
    rows = pack_rows(lengths, budget, groups=groups, align=align, option=option,
                     length_option=length_option, ids=[ex.id for ex in examples])
    target = max(len(rows), min_rows, 1)
    target = -(-target // row_multiple) * row_multiple
    rows += [[] for _ in range(target - len(rows))]
    shape = (len(rows), budget)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    cu_seqlens = []
    for r, row in enumerate(rows):
        cursor, bounds = 0, [0]
        for i in row:
            ex = examples[i]
            seq = torch.tensor(ex.prompt_ids + ex.response_ids, dtype=torch.long)
            n, p, slot = len(seq), len(ex.prompt_ids), _slot(len(seq), align)
            tokens[r, cursor:cursor + n] = seq
            labels[r, cursor:cursor + n - 1] = seq[1:]
            loss_mask[r, cursor + max(p - 1, 0):cursor + n - 1] = 1.0
            position_ids[r, cursor:cursor + slot] = torch.arange(slot)
            segment_ids[r, cursor:cursor + slot] = i
            cursor += slot
            bounds.append(cursor)
        if cursor < budget:  # the row's padding: a segment of its own
            position_ids[r, cursor:] = torch.arange(budget - cursor)
            bounds.append(budget)
        cu_seqlens.append(torch.tensor(bounds, dtype=torch.int32))
    return PackedBatch(tokens, labels, loss_mask, position_ids, segment_ids, cu_seqlens,
                       torch.tensor(lengths, dtype=torch.long),
                       torch.tensor([len(ex.prompt_ids) for ex in examples], dtype=torch.long),
                       [ex.id for ex in examples], rows)


def balance(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Split items of token ``sizes`` into ``parts`` (data-parallel ranks) of similar total
    tokens: longest first, each to the lightest part so far (ties: the lower part). Every rank
    computes the same split from the same global batch; each part's indices are ascending."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    loads = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        out[part].append(index)
        loads[part] += sizes[index]
    return [sorted(part) for part in out]
