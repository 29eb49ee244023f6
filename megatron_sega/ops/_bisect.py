"""The exact fallback: the top-k / top-p support by bisection, then a Gumbel-max draw on the shard.

Used for the rows whose support the gathered candidates do not determine (see ``sampling.py``).
K and P are prefixes of the order (w desc, id asc), so each is ``{w > v*}`` plus the first
``n_keep`` of the ties ``{w == v*}`` in id order, where v* is the largest t with
``F(t) >= target``::

    top-k: F(t) = #{j : w_j >= t},                   target = k
    top-p: F(t) = sum_{j in K, w_j >= t} exp(w_j - m),  target = p * sum_{j in K} exp(w_j - m)

F is a non-increasing step function of t, and fp32 values map monotonically onto int32 keys, so
a bisection over the keys between the row's smallest and largest logit finds v* exactly in at
most 32 rounds; each round is a SUM all-reduce of one scalar per row (an int32 count or an fp32
mass). One all-gather of (#ties, F strictly above v*) per rank then gives n_keep and, with the
ranks' vocab_start, which rank's ties come first. The chosen support equals the single-process
one except where an fp32 cumulative mass is within rounding of p.

Per row: <= 32 SUM all-reduces of 4 B (~20 for top-k on a 128k vocabulary thanks to a bracket
of the k-th largest logit), 1 SUM all-reduce of the top-p target, 1 all-gather of 2 fp32 per
filter, and the final all-gather of the ranks' best Gumbel scores (24 B): ~35 to ~70 dependent
collectives for the rows of a chunk together, which is why the caller batches its fallback rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_sega.ops._noise import gumbel_noise
from megatron_sega.ops._shard import all_gather, all_reduce, sum64


def _to_key(x: Tensor) -> Tensor:
    """Monotone map fp32 -> int64 (int32 range): x < y iff key(x) < key(y); -0.0 -> +0.0 first."""
    bits = (x + 0.0).contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(k: Tensor) -> Tensor:
    return torch.where(k < 0, k ^ 0x7FFFFFFF, k).int().view(torch.float32)


def _mass_above(w: Tensor, t: Tensor, weight: Tensor | None, strict: bool = False) -> Tensor:
    """Per row, the count (weight None, int32) or fp32 mass of ``w >= t`` (``w > t`` if strict)."""
    above = w > t.unsqueeze(1) if strict else w >= t.unsqueeze(1)
    if weight is None:
        return above.sum(-1, dtype=torch.int32)  # count_nonzero would make an int64 copy on CPU
    return sum64(torch.where(above, weight, 0.0)).float()


def _bisect(w: Tensor, weight: Tensor | None, target: Tensor, lo: Tensor, hi: Tensor,
            tp_group) -> Tensor:
    """Per row, the largest fp32 t with all-reduced ``F(t) >= target``, ``key(t)`` in [lo, hi).

    Invariant: F(lo) >= target > F(hi). ``lo``/``hi`` come from all-reduced values, so every
    rank runs the same number of rounds.
    """
    span = int((hi - lo).max()) if lo.numel() else 1
    for _ in range((span - 1).bit_length()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        ok = all_reduce(_mass_above(w, _from_key(mid), weight), tp_group) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return _from_key(lo)


def _keep_prefix(w: Tensor, v: Tensor, weight: Tensor | None, target: Tensor, m: Tensor,
                 vocab_start: int, tp_group) -> Tensor:
    """Mask of ``{w > v}`` plus the ties ``{w == v}`` that the prefix rule keeps, in id order."""
    tie = w == v.unsqueeze(1)
    local = torch.stack([tie.sum(-1, dtype=torch.int32).float(),
                         _mass_above(w, v, weight, strict=True).float()], 1)
    table = all_gather(torch.cat([local.reshape(-1), local.new_tensor([vocab_start])]), tp_group)
    starts, table = table[:, -1], table[:, :-1].view(table.shape[0], -1, 2)
    n_ties, above = table[..., 0].sum(0), table[..., 1].sum(0)
    ties_before = table[starts < vocab_start, :, 0].sum(0)  # ranks holding smaller ids
    if weight is None:  # top-k: exactly k tokens
        n_keep = target - above
    else:  # top-p: tie i is kept while above + i * p_tie < target
        per_tie = (v - m).exp()  # the same fp32 op that made weight
        n_keep = torch.ceil((target - above) / per_tie).clamp(min=1.0)
    n_keep = torch.minimum(n_keep.float(), n_ties)
    order = tie.int().cumsum_(-1).add_(ties_before.int().unsqueeze(1))  # 1-based global tie rank
    return (w > v.unsqueeze(1)) | (tie & (order <= n_keep.unsqueeze(1)))


def _kth_largest(z: Tensor, k: int) -> Tensor:
    """``[c, 1]``: each row's k-th largest value on this shard (-inf if it has fewer than k)."""
    if z.shape[1] < k:
        return z.new_full((z.shape[0], 1), -math.inf)
    return z.topk(k, -1).values[:, -1:]


def _support(w: Tensor, m_w: Tensor, w_min: Tensor, top_k: int, top_p: float, vocab_size: int,
             vocab_start: int, tp_group, k_bracket: tuple[Tensor, Tensor] | None = None
             ) -> Tensor | None:
    """Mask of the top-k / top-p support on this shard (None: every true-vocab column).

    ``k_bracket``: the max over ranks of each rank's k-th and ceil(k/TP)-th largest w. The
    global k-th largest lies between them (one rank alone has k values >= the first; above the
    second every rank has < k/TP values), which saves ~10 bisection rounds on a 128k vocab.
    """
    kept = None
    lo, hi = _to_key(w_min), _to_key(m_w) + 1
    if 0 < top_k < vocab_size:
        target = torch.full_like(m_w, top_k, dtype=torch.int32)
        lo_k, hi_k = lo, hi
        if k_bracket is not None:
            lo_k = torch.maximum(lo, _to_key(k_bracket[0]))
            hi_k = torch.where(k_bracket[1] > -math.inf,
                               torch.minimum(hi, _to_key(k_bracket[1]) + 1), hi)
        v = _bisect(w, None, target, lo_k, hi_k, tp_group)
        kept = _keep_prefix(w, v, None, target, m_w, vocab_start, tp_group)
        lo = _to_key(v)
    if top_p < 1:
        wk = w if kept is None else torch.where(kept, w, -math.inf)
        e = (wk - m_w.unsqueeze(1)).exp_()
        target = all_reduce(sum64(e).float(), tp_group) * top_p
        v = _bisect(wk, e, target, lo, hi, tp_group)
        kept = _keep_prefix(wk, v, e, target, m_w, vocab_start, tp_group)
    return kept


def _gumbel_argmax(w: Tensor, kept: Tensor | None, keys: Tensor, ids: Tensor,
                   block: int = 4096) -> tuple[Tensor, Tensor]:
    """``(max score [c, 1] fp64, its column [c, 1])`` of ``w + Gumbel`` over the kept columns.

    Column blocks bound the int64/fp64 noise temporaries to ``c x block``; ties go to the
    smallest column (strict ``>`` across blocks, first index within one).
    """
    c, width = w.shape
    best_score = w.new_full((c, 1), -math.inf, dtype=torch.float64)
    best = torch.zeros((c, 1), dtype=torch.long, device=w.device)
    for start in range(0, width, block):
        cols = slice(start, min(start + block, width))
        score = gumbel_noise(keys, ids[cols]).add_(w[:, cols])
        if kept is not None:
            score.masked_fill_(~kept[:, cols], -math.inf)
        index = score.argmax(-1, keepdim=True)  # the first of equal maxima
        value = score.gather(1, index)
        better = value > best_score
        best_score = torch.where(better, value, best_score)
        best = torch.where(better, index + start, best)
    return best_score, best


def exact_rows(z: Tensor, ids: Tensor, keys: Tensor, temperature: float, top_k: int,
               top_p: float, vocab_start: int, vocab_size: int, tp_group, m0: Tensor,
               w_min: Tensor, k_bracket: tuple[Tensor, Tensor] | None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, logp_sampling, shifted logit ``z_token - m0`` in fp64) of rows ``z [c, width]``.

    ``m0``: the rows' global max logit, ``w_min``: their global min of ``z / T`` (both known
    from the caller's all-gather); the support comes from the bisection, the draw is the
    Gumbel-max over it on each shard, and one all-gather picks the best rank (largest score,
    then smallest id) and sums the support normalisers.
    """
    c, width = z.shape
    w = z / temperature if temperature != 1 else z
    m_w = m0 / temperature  # = max(w): division by T > 0 is monotone, also after rounding
    kept = _support(w, m_w, w_min, top_k, top_p, vocab_size, vocab_start, tp_group, k_bracket)
    if width:
        e = (w - m_w.unsqueeze(1)).exp_()
        s_supp = sum64(e if kept is None else e.masked_fill_(~kept, 0.0))
        del e
        best_score, best = _gumbel_argmax(w, kept, keys, ids)
        local = [best_score, ids[best].double(), z.gather(1, best).double(), s_supp.unsqueeze(1)]
    else:
        local = [z.new_full((c, 1), -math.inf).double(), z.new_full((c, 1), vocab_size).double(),
                 z.new_zeros((c, 2)).double()]
    table = all_gather(torch.cat(local, 1), tp_group)  # [TP, c, 4]
    best_score = table[..., 0].amax(0)
    contender_ids = torch.where(table[..., 0] == best_score, table[..., 1], math.inf)
    winner = table.gather(0, contender_ids.argmin(0).view(1, c, 1).expand(1, c, 4))[0]
    z_token = winner[:, 2].float()
    w_token = (z_token / temperature if temperature != 1 else z_token).double()
    logp_sampling = w_token - m_w.double() - table[..., 3].sum(0).log()
    return winner[:, 1].long(), logp_sampling.float(), winner[:, 2] - m0.double()
