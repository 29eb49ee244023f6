"""The exact fallback: the top-k / top-p support by a 64-way search, then a Gumbel-max draw.

Used for the rows whose support the gathered candidates do not determine (see ``sampling.py``).
K and P are prefixes of the order (w desc, id asc), so each is ``{w > v*}`` plus the first
``n_keep`` of the ties ``{w == v*}`` in id order, where v* is the largest t with
``F(t) >= target``::

    top-k: F(t) = #{j : w_j >= t},                   target = k
    top-p: F(t) = sum_{j in K, w_j >= t} exp(w_j - m),  target = p * sum_{j in K} exp(w_j - m)

F is a non-increasing step function of t, and fp32 values map monotonically onto int32 keys, so
a search over the keys between the row's smallest and largest logit finds v* exactly. Each round
evaluates F at 63 thresholds splitting the current key interval into 64 (one ``searchsorted``
and a histogram per shard, summed in fp64, sent as fp32) in one SUM all-reduce, so 6 rounds
cover the 2**32 keys. One all-gather of (#ties, F strictly above v*) per rank then gives n_keep
and, with the ranks' vocab_start, which rank's ties come first. The chosen support equals the
single-process one except where an fp32 cumulative mass is within rounding of p.

The open rows of a call go through every stage together, a chunk of rows at a time inside each
stage, so the collectives do not grow with their number: 6 rounds + 1 tie gather per filter,
and one final all-gather of each rank's best Gumbel score over its part of the support (hashing
only the kept tokens), with the support normalisers. Top-p alone: 8 collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_sega.ops._noise import gumbel_noise
from megatron_sega.ops._shard import all_gather, all_reduce, sum64

# Thresholds per search round + 1, and the rounds that shrink any span of keys (<= 2**32) to 1.
ARITY = 64
_ROUNDS = 6  # ceil(log_64(2**32))
# Kept tokens hashed at once by the sparse Gumbel-max (bounds its int64/fp64 temporaries).
_PAIR_BLOCK = 1 << 20

# ``chunks()`` yields (rows of the open set, z [c, width], w = z / T [c, width]) every time.
Chunks = Callable[[], Iterator[tuple[slice, Tensor, Tensor]]]


def _to_key(x: Tensor) -> Tensor:
    """Monotone map fp32 -> int64 (int32 range): x < y iff key(x) < key(y); -0.0 -> +0.0 first."""
    bits = (x + 0.0).contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(k: Tensor) -> Tensor:
    return torch.where(k < 0, k ^ 0x7FFFFFFF, k).int().view(torch.float32)


class _Prefix(NamedTuple):
    """A prefix of the order (w desc, id asc), per row: ``{w > v}`` plus the first ``n_keep``
    ties ``{w == v}`` overall, of which ``ties_before`` lie on ranks holding smaller ids."""

    v: Tensor
    n_keep: Tensor
    ties_before: Tensor

    def mask(self, w: Tensor, rows: slice) -> Tensor:
        v = self.v[rows].unsqueeze(1)
        tie = w == v
        order = tie.int().cumsum_(-1).add_(self.ties_before[rows].int().unsqueeze(1))
        return (w > v) | (tie & (order <= self.n_keep[rows].unsqueeze(1)))


def _above(w: Tensor, th: Tensor, weight: Tensor | None) -> Tensor:
    """``[c, B-1]``: per row, the count (weight None, int32) or fp32 mass of ``w >= th_i``."""
    c = w.shape[0]
    # (contiguous inputs: torch copies otherwise, with a warning)
    bins = torch.searchsorted(th.contiguous(), w.contiguous(), right=True)  # thresholds <= w
    if weight is None:
        hist = torch.zeros(c, th.shape[1] + 1, dtype=torch.int32, device=w.device)
        hist.scatter_add_(1, bins, torch.ones_like(bins, dtype=torch.int32))
    else:  # fp64: a boundary decision must not move by an fp32 rounding of the sum
        hist = torch.zeros(c, th.shape[1] + 1, dtype=torch.float64, device=w.device)
        hist.scatter_add_(1, bins, weight.double())
    above = hist.flip(-1).cumsum(-1).flip(-1)[:, 1:]
    return above if weight is None else above.float()


def _search(chunks: Chunks, weighting, target: Tensor | float, lo: Tensor, hi: Tensor,
            tp_group) -> tuple[Tensor, Tensor]:
    """Per row, the largest fp32 t with all-reduced ``F(t) >= target``, ``key(t)`` in [lo, hi).

    Invariant: F(lo) >= target > F(hi). ``weighting(rows, w) -> (w', weight | None)`` gives
    the values searched and their weights (None: counts). A float ``target`` is ``p``: the
    target is ``p`` times the all-reduced total weight, summed with the first round (top-p).
    Returns ``(t, target)``.
    """
    n = lo.shape[0]
    steps = torch.arange(1, ARITY, device=lo.device)
    for round_ in range(_ROUNDS):
        th = lo.unsqueeze(1) + ((hi - lo).unsqueeze(1) * steps + ARITY - 1) // ARITY
        th_f = _from_key(th)
        with_total = round_ == 0 and not isinstance(target, Tensor)
        local = None
        for rows, _, w in chunks():
            wk, weight = weighting(rows, w)
            f = _above(wk, th_f[rows], weight)
            if with_total:
                f = torch.cat([f, sum64(weight).float().unsqueeze(1)], 1)
            if local is None:
                local = f.new_empty(n, f.shape[1])
            local[rows] = f
        f = all_reduce(local, tp_group)
        if with_total:
            f, target = f[:, :-1], f[:, -1] * target
        n_ok = (f >= target.unsqueeze(1)).sum(-1)  # F is non-increasing in i: a prefix
        lo = torch.where(n_ok > 0, th.gather(1, (n_ok - 1).clamp(min=0).unsqueeze(1))[:, 0], lo)
        hi = torch.where(n_ok < ARITY - 1,
                         th.gather(1, n_ok.clamp(max=ARITY - 2).unsqueeze(1))[:, 0], hi)
    return _from_key(lo), target


def _keep_prefix(chunks: Chunks, weighting, v: Tensor, target: Tensor, m: Tensor,
                 vocab_start: int, tp_group) -> tuple[_Prefix, Tensor]:
    """The prefix ``{w > v}`` + the ties the rule keeps, and its total weight (counts: k)."""
    local = torch.empty(v.shape[0], 2, dtype=torch.float32, device=v.device)
    for rows, _, w in chunks():
        wk, weight = weighting(rows, w)
        above = wk > v[rows].unsqueeze(1)
        local[rows, 0] = (wk == v[rows].unsqueeze(1)).sum(-1, dtype=torch.int32).float()
        local[rows, 1] = above.sum(-1, dtype=torch.int32).float() if weight is None \
            else sum64(torch.where(above, weight, 0.0)).float()
    table = all_gather(torch.cat([local.reshape(-1), local.new_tensor([vocab_start])]), tp_group)
    starts, table = table[:, -1], table[:, :-1].view(table.shape[0], -1, 2)
    n_ties, above = table[..., 0].sum(0), table[..., 1].sum(0)
    ties_before = table[starts < vocab_start, :, 0].sum(0)  # ranks holding smaller ids
    per_tie = (v - m).exp()  # the same fp32 op that made the weights
    if isinstance(target, Tensor) and target.dtype == torch.int32:  # top-k: exactly k tokens
        n_keep = target - above
    else:  # top-p: tie i is kept while above + i * p_tie < target
        n_keep = torch.ceil((target - above) / per_tie).clamp(min=1.0)
    n_keep = torch.minimum(n_keep.float(), n_ties)
    return _Prefix(v, n_keep, ties_before), above.double() + n_keep.double() * per_tie.double()


def _kth_largest(z: Tensor, k: int) -> Tensor:
    """``[c, 1]``: each row's k-th largest value on this shard (-inf if it has fewer than k)."""
    if z.shape[1] < k:
        return z.new_full((z.shape[0], 1), -math.inf)
    return z.topk(k, -1).values[:, -1:]


def _open_support(chunks: Chunks, n: int, m_w: Tensor, w_min: Tensor, top_k: int,
                  top_p: float, vocab_size: int, vocab_start: int, tp_group,
                  k_bracket: tuple[Tensor, Tensor] | None = None
                  ) -> Callable[[slice, Tensor], Tensor | None]:
    """The top-k / top-p support of the open rows, as ``mask(rows, w)`` for any chunk (None:
    every true-vocab column).

    ``k_bracket``: the max over ranks of each rank's k-th and ceil(k/TP)-th largest w. The
    global k-th largest lies between them (one rank alone has k values >= the first; above the
    second every rank has < k/TP values), which narrows the top-k search.
    """
    lo, hi = _to_key(w_min), _to_key(m_w) + 1
    top_k_prefix = None
    if 0 < top_k < vocab_size:
        lo_k, hi_k = lo, hi
        if k_bracket is not None:
            lo_k = torch.maximum(lo, _to_key(k_bracket[0]))
            hi_k = torch.where(k_bracket[1] > -math.inf,
                               torch.minimum(hi, _to_key(k_bracket[1]) + 1), hi)
        target = torch.full((n,), top_k, dtype=torch.int32, device=m_w.device)

        def counts(rows, w):
            return w, None

        v, _ = _search(chunks, counts, target, lo_k, hi_k, tp_group)
        top_k_prefix, _ = _keep_prefix(chunks, counts, v, target, m_w, vocab_start, tp_group)
        lo = _to_key(v)
    if top_p == 1:
        return lambda rows, w: None if top_k_prefix is None else top_k_prefix.mask(w, rows)

    def in_k(rows, w):  # w on K, -inf elsewhere
        return w if top_k_prefix is None else w.masked_fill(~top_k_prefix.mask(w, rows), -math.inf)

    def masses(rows, w):
        wk = in_k(rows, w)
        return wk, (wk - m_w[rows].unsqueeze(1)).exp_()

    v, target = _search(chunks, masses, float(top_p), lo, hi, tp_group)
    prefix, _ = _keep_prefix(chunks, masses, v, target, m_w, vocab_start, tp_group)
    return lambda rows, w: prefix.mask(in_k(rows, w), rows)


def _support(w: Tensor, m_w: Tensor, w_min: Tensor, top_k: int, top_p: float, vocab_size: int,
             vocab_start: int, tp_group, k_bracket: tuple[Tensor, Tensor] | None = None
             ) -> Tensor | None:
    """Mask of the top-k / top-p support of the rows ``w [c, width]`` on this shard (None: every
    true-vocab column); ``m_w`` / ``w_min``: the rows' global max / min of w."""
    rows = slice(0, w.shape[0])
    mask = _open_support(lambda: iter([(rows, w, w)]), w.shape[0], m_w, w_min, top_k, top_p,
                         vocab_size, vocab_start, tp_group, k_bracket)
    return mask(rows, w)


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


def _sparse_gumbel_argmax(w: Tensor, kept: Tensor, keys: Tensor, ids: Tensor
                          ) -> tuple[Tensor, Tensor]:
    """As :func:`_gumbel_argmax`, hashing only the kept columns (a nucleus is a few hundred
    tokens of a 128k vocabulary). A row with nothing kept here gets score -inf, column 0."""
    c, width = w.shape
    best_score = torch.full((c,), -math.inf, dtype=torch.float64, device=w.device)
    best = torch.full((c,), width, dtype=torch.long, device=w.device)
    row, col = kept.nonzero(as_tuple=True)
    scores = []
    for start in range(0, row.numel(), _PAIR_BLOCK):
        r, j = row[start:start + _PAIR_BLOCK], col[start:start + _PAIR_BLOCK]
        score = gumbel_noise(keys[r], ids[j].unsqueeze(1))[:, 0].add_(w[r, j])
        best_score.scatter_reduce_(0, r, score, "amax")
        scores.append(score)
    for start, score in zip(range(0, row.numel(), _PAIR_BLOCK), scores):
        r, j = row[start:start + _PAIR_BLOCK], col[start:start + _PAIR_BLOCK]
        best.scatter_reduce_(0, r, torch.where(score == best_score[r], j, width), "amin")
    return best_score.unsqueeze(1), best.clamp(max=max(width - 1, 0)).unsqueeze(1)


def exact_rows(chunks: Chunks, n: int, ids: Tensor, keys: Tensor, temperature: float,
               top_k: int, top_p: float, vocab_start: int, vocab_size: int, tp_group,
               m0: Tensor, w_min: Tensor, k_bracket: tuple[Tensor, Tensor] | None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, logp_sampling, shifted logit ``z_token - m0`` in fp64) of the ``n`` open rows.

    ``m0``: the rows' global max logit, ``w_min``: their global min of ``z / T`` (both known
    from the caller's all-gather); the support comes from the search, the draw is the
    Gumbel-max over it on each shard, and one all-gather picks the best rank (largest score,
    then smallest id) and sums the support normalisers.
    """
    m_w = m0 / temperature if temperature != 1 else m0  # = max(w): / T > 0 is monotone
    support = _open_support(chunks, n, m_w, w_min, top_k, top_p, vocab_size, vocab_start,
                            tp_group, k_bracket)
    local = torch.empty(n, 4, dtype=torch.float64, device=m0.device)
    for rows, z, w in chunks():
        if not w.shape[1]:
            local[rows] = local.new_tensor([-math.inf, vocab_size, 0.0, 0.0])
            continue
        kept = support(rows, w)
        e = (w - m_w[rows].unsqueeze(1)).exp_()
        s_supp = sum64(e if kept is None else e.masked_fill_(~kept, 0.0))
        del e
        if kept is None:
            best_score, best = _gumbel_argmax(w, None, keys[rows], ids)
        else:
            best_score, best = _sparse_gumbel_argmax(w, kept, keys[rows], ids)
        local[rows] = torch.cat([best_score, ids[best].double(), z.gather(1, best).double(),
                                 s_supp.unsqueeze(1)], 1)
    table = all_gather(local, tp_group)  # [TP, n, 4]
    best_score = table[..., 0].amax(0)
    contender_ids = torch.where(table[..., 0] == best_score, table[..., 1], math.inf)
    winner = table.gather(0, contender_ids.argmin(0).view(1, n, 1).expand(1, n, 4))[0]
    z_token = winner[:, 2].float()
    w_token = (z_token / temperature if temperature != 1 else z_token).double()
    logp_sampling = w_token - m_w.double() - table[..., 3].sum(0).log()
    return winner[:, 1].long(), logp_sampling.float(), winner[:, 2] - m0.double()
