"""Exact vocab-parallel sampling (greedy, temperature, top-k, top-p), reproducible across TP.

The distribution. For one row with logits ``z_j`` over the true vocabulary and temperature T > 0
(the order of Hugging Face and vLLM: temperature, then top-k, then top-p on the result)::

    w_j = z_j / T
    K   = the k largest w (all ids when k = 0 or k >= V)
    P   = the nucleus of softmax(w) renormalised on K: walking K in the order (w desc, id asc),
          keep a token while the mass strictly before it is < p (the first is always kept)
    q_j = exp(w_j) / sum_{i in P} exp(w_i)   for j in P, 0 elsewhere

T = 0 is greedy: the largest logit (the smallest id among equal ones); top-k/top-p are moot.

The draw. Gumbel-max: ``token = argmax_{j in P} (w_j + G_j)``, ``G_j = -log(-log U_j)``, which is
distributed exactly as q. ``U_j`` is a counter-based hash (SplitMix64) of (seed, row, step, global
id j) in int64 torch ops: the noise of a token does not depend on which rank holds it, so the
same seed gives the same tokens at TP = 1, 2, 4, ..., and each rank hashes only its own ids (no
V-long generator stream per rank). U has 52 random bits, G is fp64.

The support, without gathering the vocabulary. K and P are prefixes of the order (w desc,
id asc), so each is ``{w > v*}`` plus the first ``n_keep`` of the ties ``{w == v*}`` in id order,
where v* is the largest t with ``F(t) >= target``::

    top-k: F(t) = #{j : w_j >= t},                   target = k
    top-p: F(t) = sum_{j in K, w_j >= t} exp(w_j - m),  target = p * sum_{j in K} exp(w_j - m)

F is a non-increasing step function of t, and fp32 values map monotonically onto int32 keys, so
a bisection over the keys between the row's smallest and largest candidate finds v* exactly in
at most 32 rounds; each round is a SUM all-reduce of one scalar per row (an int32 count or an
fp32 mass). One all-gather of (#ties, F strictly above v*) per rank then gives n_keep and, with
the ranks' vocab_start, which rank's ties come first. The chosen support equals the
single-process one except where an fp32 cumulative mass is within rounding of p.

Communication per row (bytes each rank contributes; the rows of a chunk share each collective):

    always:  1 MAX all-reduce of 2 fp32 (max, -min), a final all-gather of 6 fp64 (best
             Gumbel score, its id, its two shifted logits, the two local normalisers)   8 + 48 B
    top-k:   2 more fp32 in the MAX all-reduce (each rank's k-th and ceil(k/TP)-th largest
             logit: they bracket the global k-th largest), <= 32 SUM all-reduces of an int32
             (~20 on a 128k vocabulary thanks to the bracket), 1 all-gather of 2 fp32   <= 144 B
    top-p:   1 + <= 32 SUM all-reduces of an fp32, 1 all-gather of 2 fp32             <= 140 B

independent of V (the all-gather baseline sends V/TP x 4 B: 128 kB at V = 128k, TP = 4). Latency:
2 collectives per chunk for greedy or plain temperature, up to ~70 with both filters (the
bisection rounds), which is why rows are processed a whole chunk at a time.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_sega.ops._shard import (
    DEFAULT_CHUNK_SIZE, all_gather, all_reduce, check_shard, global_max, group_size, row_chunks,
    row_reader, sum64,
)

# Rows per chunk: the top-p search keeps ~20 bytes of temporaries per logit (masks, the exp
# weights, a masked copy), ~2.5x the log-prob path, and every chunk costs the same number of
# collectives whatever its size; 64 rows keep both the memory and the latency modest.
SAMPLE_CHUNK_SIZE = DEFAULT_CHUNK_SIZE // 4

# SplitMix64 constants (Steele, Lea, Flood 2014), as signed int64.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


class Sample(NamedTuple):
    """One sampled token per row, ``[...]`` each."""

    tokens: Tensor  # int64 global ids < vocab_size
    logp_sampling: Tensor  # fp32 log q(token): tempered, renormalised on the support (0 if greedy)
    logp_untempered: Tensor  # fp32 log softmax(z)[token] over the full true vocabulary, T = 1
    entropy: Tensor  # fp32 entropy of softmax(z) over the true vocabulary, T = 1 (same pass)


# ---------------------------------------------------------------------------------------------
# Counter-based noise
# ---------------------------------------------------------------------------------------------


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix64_(x: Tensor) -> Tensor:
    """SplitMix64's finaliser, in place on an int64 tensor (multiplication wraps mod 2**64)."""
    x ^= _srl(x, 30)
    x *= _MIX1
    x ^= _srl(x, 27)
    x *= _MIX2
    x ^= _srl(x, 31)
    return x


def _to_int64(value: int) -> int:
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _per_row(value: int | Tensor, name: str, lead: torch.Size, device) -> Tensor:
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.is_complex() or value.shape != lead:
            raise ValueError(f"{name} must be an int or an integer tensor of shape {tuple(lead)} "
                             f"(one per row), got {value.dtype} {tuple(value.shape)}")
        return value.reshape(-1).to(device=device, dtype=torch.long)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an int or an integer tensor")
    return torch.full((lead.numel(),), _to_int64(value), dtype=torch.long, device=device)


def row_keys(seed: int | Tensor, step: int | Tensor, lead: torch.Size, device=None) -> Tensor:
    """One int64 key per row: hash of (seed, row, step).

    An int ``seed`` is combined with the row's index in the flattened batch; a tensor of per-row
    seeds (shape ``lead``) is used as is, so that a row keeps its noise wherever it sits in the
    batch. ``step`` (the decoding position) is an int or a per-row tensor.
    """
    keys = _mix64_(_per_row(seed, "seed", lead, device) + _GOLDEN)
    if not isinstance(seed, Tensor):
        keys = _mix64_(keys ^ (torch.arange(lead.numel(), device=device) + _to_int64(2 * _GOLDEN)))
    return _mix64_(keys ^ (_per_row(step, "step", lead, device) + _to_int64(3 * _GOLDEN)))


def gumbel_noise(keys: Tensor, ids: Tensor) -> Tensor:
    """``[rows, len(ids)]`` fp64 standard Gumbel noise, a pure function of (row key, global id).

    ``U = (h >> 12 + 0.5) / 2**52`` with ``h = SplitMix64(key + (id + 1) * golden)`` (the j-th
    output of Java's SplittableRandom seeded with ``key``), so ``U`` lies in ``(0, 1)`` exactly.
    """
    h = _mix64_(keys.unsqueeze(1) + ((ids + 1) * _GOLDEN).unsqueeze(0))
    u = h.bitwise_right_shift_(12).bitwise_and_((1 << 52) - 1).double()  # top 52 bits
    del h
    return u.add_(0.5).mul_(2.0 ** -52).log_().neg_().log_().neg_()


# ---------------------------------------------------------------------------------------------
# Exact support: bisection over fp32 keys, then ties
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 "
                         f"(0 = greedy, 1 = the model's distribution)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 = no top-k filter)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus filter)")


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


def _sample_chunk(z: Tensor, ids: Tensor, keys: Tensor | None, temperature: float, top_k: int,
                  top_p: float, vocab_start: int, vocab_size: int, tp_group) -> tuple[Tensor, ...]:
    """(tokens, logp_sampling, logp_untempered, entropy) of one chunk ``z [c, width]``."""
    c, width = z.shape
    k_cols = None
    if temperature > 0 and 0 < top_k < vocab_size:
        k_cols = torch.cat([_kth_largest(z, top_k),
                            _kth_largest(z, -(-top_k // group_size(tp_group)))], 1)
    m0, extra = global_max(z, vocab_start, vocab_size, tp_group, with_min=True, extra=k_cols)
    shifted = z - m0.unsqueeze(1)
    p0 = shifted.exp()
    # Untempered entropy in the same pass: H = log s0 - s1 / s0 with s1 = sum exp(z - m) (z - m).
    s0, s1 = sum64(p0), sum64(p0.mul_(shifted))
    del shifted, p0
    kept = None
    if temperature == 0:
        w, m_w, s_supp = z, m0, torch.zeros_like(s0)
    else:
        w = z / temperature if temperature != 1 else z
        m_w = m0 / temperature  # = max(w): division by T > 0 is monotone, also after rounding
        w_min = -extra[:, 0] / temperature
        if not bool(torch.isfinite(m_w).all() & torch.isfinite(w_min).all()):  # same on all ranks
            raise ValueError(f"temperature={temperature!r} is so small that logits / temperature "
                             f"overflows fp32: use temperature=0 (greedy) instead")
        k_bracket = (extra[:, 1] / temperature, extra[:, 2] / temperature) \
            if extra.shape[1] == 3 else None
        kept = _support(w, m_w, w_min, top_k, top_p, vocab_size,
                        vocab_start, tp_group, k_bracket)
        e = (w - m_w.unsqueeze(1)).exp_()
        s_supp = sum64(e if kept is None else e.masked_fill_(~kept, 0.0))
        del e
    # Each rank's best candidate, then the best of all: largest score, then smallest id.
    if width:
        if temperature == 0:
            best = z.argmax(-1, keepdim=True)  # the first of equal maxima: the smallest id
            best_score = z.gather(1, best).double()
        else:
            best_score, best = _gumbel_argmax(w, kept, keys, ids)
        local = [best_score, ids[best].double(),
                 z.gather(1, best).double() - m0.double().unsqueeze(1),
                 w.gather(1, best).double() - m_w.double().unsqueeze(1)]
    else:
        local = [z.new_full((c, 1), -math.inf).double(), z.new_full((c, 1), vocab_size).double(),
                 z.new_zeros((c, 2)).double()]
    local += [s0.unsqueeze(1), s_supp.unsqueeze(1), s1.unsqueeze(1)]
    table = all_gather(torch.cat(local, 1), tp_group)  # [TP, c, 7]
    best_score = table[..., 0].amax(0)
    contender_ids = torch.where(table[..., 0] == best_score, table[..., 1], math.inf)
    winner = table.gather(0, contender_ids.argmin(0).view(1, c, 1).expand(1, c, 7))[0]
    s0, s_supp, s1 = table[..., 4].sum(0), table[..., 5].sum(0), table[..., 6].sum(0)
    logp_untempered = winner[:, 2] - s0.log()
    logp_sampling = winner[:, 3] - s_supp.log() if temperature else torch.zeros_like(s0)
    entropy = s0.log() - s1 / s0
    return (winner[:, 1].long(), logp_sampling.float(), logp_untempered.float(),
            entropy.float())


def sample(logits_shard: Tensor, vocab_start: int, vocab_size: int, tp_group, *,
           temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int | Tensor = 0,
           step: int | Tensor = 0, chunk_size: int = SAMPLE_CHUNK_SIZE) -> Sample:
    """Draw one token per row of vocab-parallel logits; see the module docstring for the method.

    ``logits_shard [..., V_shard]`` holds global ids ``[vocab_start, vocab_start + V_shard)``;
    ids ``>= vocab_size`` are padding and never drawn. ``tp_group``: the group the vocabulary is
    split over (None: one process holding all of it); every rank gets the same result.
    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable the filters. The noise is a
    function of ``(seed, row, step, token id)``: an int ``seed`` identifies rows by their index in
    the flattened batch, a per-row seed tensor ``[...]`` by the seed alone; ``step`` (int or
    ``[...]``) is the decoding position. Not differentiable.
    """
    width = check_shard(logits_shard, vocab_start, vocab_size, tp_group, chunk_size)
    _check_sampling_args(temperature, top_k, top_p)
    lead, device = logits_shard.shape[:-1], logits_shard.device
    keys = row_keys(seed, step, lead, device) if temperature > 0 else None
    rows, n = row_reader(logits_shard.detach()), lead.numel()
    ids = torch.arange(vocab_start, vocab_start + width, device=device)
    tokens = torch.empty(n, dtype=torch.long, device=device)
    logp_sampling = torch.empty(n, dtype=torch.float32, device=device)
    logp_untempered = torch.empty_like(logp_sampling)
    entropy = torch.empty_like(logp_sampling)
    for sl in row_chunks(n, chunk_size):
        tokens[sl], logp_sampling[sl], logp_untempered[sl], entropy[sl] = _sample_chunk(
            rows(sl)[:, :width].float(), ids, None if keys is None else keys[sl],
            float(temperature), top_k, float(top_p), vocab_start, vocab_size, tp_group)
    return Sample(tokens.view(lead), logp_sampling.view(lead), logp_untempered.view(lead),
                  entropy.view(lead))
