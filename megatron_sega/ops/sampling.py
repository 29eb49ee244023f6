"""Exact vocab-parallel sampling (greedy, temperature, top-k, top-p) in one collective per call.

The distribution. For one row with logits ``z_j`` over the true vocabulary and temperature T > 0
(the order of Hugging Face and vLLM: temperature, then top-k, then top-p on the result)::

    w_j = z_j / T
    K   = the k largest w (all ids when k = 0 or k >= V)
    P   = the nucleus of softmax(w) renormalised on K: walking K in the order (w desc, id asc),
          keep a token while the mass strictly before it is < p (the first is always kept)
    q_j = exp(w_j) / sum_{i in P} exp(w_i)   for j in P, 0 elsewhere

T = 0 is greedy: the largest logit (the smallest id among equal ones); top-k/top-p are moot.

The draw. Gumbel-max: ``token = argmax_{j in P} (w_j + G_j)`` (the first id among equal
scores), distributed exactly as q. ``G_j`` is a hash of (seed, row, step, global id j)
(``_noise.py``): any rank can compute the noise of any token, so the same seed gives the same
tokens at TP = 1, 2, 4, ...

One all-gather. Each rank reads its shard ``[rows, V/TP]`` once, a chunk of rows at a time, and
contributes per row (4-byte words):

    m_r             its largest logit                                              1
    min_r           its smallest logit (the NaN/Inf check and the fallback's range)  1
    s0_r, s1_r      sum exp(z - m_r) and sum exp(z - m_r)(z - m_r), fp64             4
    t_r             sum exp(w - m_r / T), fp64 (top-p without top-k, T != 1; plain T)  2
    b_r             its C-th largest logit (-inf if it sent all its logits)           1
    C candidates    its C largest logits (fp32) and their global ids (int32)          2C

for all the rows of the call in a single all-gather. From that table every rank computes, alike:

- the normaliser and the untempered entropy, exactly: ``M = max_r m_r``,
  ``S0 = sum_r s0_r e^{m_r - M}``, ``S1 = sum_r e^{m_r - M} (s1_r + (m_r - M) s0_r)``,
  ``H = log S0 - S1 / S0`` and ``log p(token) = z_token - M - log S0``;
- the support: every token with ``w > c* = max_r b_r / T`` is a candidate (rank r sent all of
  its logits above ``b_r``, and w is monotone in z), so the candidates sorted by (w desc, id asc)
  are the true order up to the first token that was not sent. Top-k (k <= C) is the first k if
  they all lie above c*; top-p is the prefix of K whose mass before each token is < p Z_K (Z_K:
  the mass of the first k, or the whole vocabulary from the t_r), known whenever the known
  candidates' mass reaches p Z_K. Ties are split in id order, as the definition says;
- the draw: argmax (w + G) over the support, from the candidates alone (G from their ids).

Rows whose support the candidates do not determine (a nucleus longer than the known candidates,
ties across the boundary, top_k > C) fall back to the exact search of ``_bisect.py`` (64-way:
8 more collectives for top-p, 15 with top-k > C as well, for all such rows of the call
together); :class:`SampleStats` counts them. Greedy sends one candidate (the argmax); plain temperature sends each rank's best Gumbel
score over its whole shard instead of candidates. Neither ever falls back.

Cost. ``8 + 4 (2C + 1..3)`` bytes per row and rank (~550 B at C = 64) against ``4 V / TP`` for an
all-gather of the logits (128 kB at V = 128k, TP = 4); one collective and one host
synchronisation (the error flags and the fallback rows, read together) per call in the common
case. Temporaries: two ``chunk x V/TP`` fp32 buffers in the local pass (one more for T != 1
without top-k), the candidates ``[rows, TP x C]``, and the fallback's ~20 bytes per logit of a
chunk. The chosen support equals the single-process one except where a cumulative mass is
within rounding of p (fp64 sums of the candidates' masses; fp32 in the fallback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_sega.ops._bisect import (  # noqa: F401 (_support: the tests check it directly)
    _gumbel_argmax, _kth_largest, _support, _to_key, exact_rows,
)
from megatron_sega.ops._noise import gumbel_noise, row_keys
from megatron_sega.ops._shard import (
    DEFAULT_CHUNK_SIZE, NonFiniteLogitsError, all_gather, check_shard, group_size, row_chunks,
    row_reader, sum64,
)

# Rows per chunk of the local pass (two fp32 temporaries per logit); the fallback reads half as
# many at a time (~32 bytes of temporaries per logit: the masked weights, their fp64 copy, the
# histogram bins), so that both stay below 1/TP of an all-gather's memory.
SAMPLE_CHUNK_SIZE = DEFAULT_CHUNK_SIZE // 4

# Candidates per rank and row, chosen from the fallback rates measured on SmolLM2-135M-Instruct's
# logit profiles mapped onto a 128k vocabulary (benchmarks/logit_profiles.py, RESULTS.md). At the
# paper's T = 1, top-p = 0.95 this small model's nucleus is wide (median 12 tokens, 29% of rows
# above 64): C = 32 / 64 / 128 leave 31 / 21 / 12% of the rows open at TP = 2 and 23 / 13 / 9% at
# TP = 4 (the known prefix grows with TP x C). T = 0.7, top-k = 50 never falls back at C >= 50.
# 64 keeps the bytes >= 100x below an all-gather up to TP = 8 (8 C + ~36 B per row and rank).
CANDIDATES = 64
_WHOLE_SHARD = 4


class Sample(NamedTuple):
    """One sampled token per row, ``[...]`` each."""

    tokens: Tensor  # int64 global ids < vocab_size
    logp_sampling: Tensor  # fp32 log q(token): tempered, renormalised on the support (0 if greedy)
    logp_untempered: Tensor  # fp32 log softmax(z)[token] over the full true vocabulary, T = 1
    entropy: Tensor  # fp32 entropy of softmax(z) over the true vocabulary, T = 1 (same pass)


@dataclass
class SampleStats:
    """Counters that :func:`sample` adds to when given one (the same on every rank)."""

    calls: int = 0
    rows: int = 0
    fallback_rows: int = 0  # rows whose support needed the exact search

    @property
    def fallback_rate(self) -> float:
        return self.fallback_rows / max(self.rows, 1)


def _check_sampling_args(temperature: float, top_k: int, top_p: float, candidates: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 "
                         f"(0 = greedy, 1 = the model's distribution)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 = no top-k filter)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus filter)")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates={candidates!r} must be an int >= 1")


@dataclass(frozen=True)
class _Mode:
    """What one call sends: derived from the arguments alone, so the same on every rank."""

    temperature: float
    top_k: int  # 0: no top-k filter (also for k >= V)
    top_p: float
    candidates: int  # per rank and row: C, or 1 (greedy: the argmax; plain: the best score)
    tp: int

    @staticmethod
    def of(temperature: float, top_k: int, top_p: float, candidates: int, vocab_size: int,
           shard_width: int, tp: int) -> "_Mode":
        k = top_k if 0 < top_k < vocab_size else 0
        if temperature == 0:
            return _Mode(0.0, 0, 1.0, 1, tp)
        if not k and top_p == 1:
            return _Mode(temperature, 0, 1.0, 1, tp)
        # A shard of at most 4 C logits is sent whole: the candidates would be most of it, and
        # then no row ever falls back (small vocabularies). The padded width is the same on
        # every rank, so the choice is too.
        if shard_width <= _WHOLE_SHARD * candidates:
            candidates = shard_width
        return _Mode(temperature, k, top_p, 0 if k > candidates else candidates, tp)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:  # temperature only: the support is the whole vocabulary
        return not self.greedy and not self.top_k and self.top_p == 1

    @property
    def filtered(self) -> bool:  # top-k / top-p from the candidates (0 candidates: k > C)
        return not self.greedy and not self.plain

    @property
    def wants_tempered_mass(self) -> bool:  # Z over the whole vocabulary
        return not self.greedy and not self.top_k


class _Layout:
    """The words each rank sends per row, in three blocks: fp64 fields, fp32 fields, then the
    candidates (fp32 logits, int32 ids), bit-cast to one int32 ``[rows, words]`` tensor (an even
    number of words, so that the fp64 block views back without a copy)."""

    def __init__(self, mode: _Mode):
        self.f64 = ["s0", "s1"] + (["t"] if mode.wants_tempered_mass else []) \
            + (["score"] if mode.plain else [])
        self.f32 = ["max", "min"] + (["bound"] if mode.filtered and mode.candidates else []) \
            + (["kth_hi", "kth_lo"] if mode.filtered and not mode.candidates else [])
        self.candidates = mode.candidates
        self.start32 = 2 * len(self.f64)
        self.start_cand = self.start32 + len(self.f32)
        used = self.start_cand + 2 * self.candidates
        self.pad = used % 2
        self.words = used + self.pad

    def pack(self, f64: dict[str, Tensor], f32: dict[str, Tensor], cand_z: Tensor | None,
             cand_id: Tensor | None) -> Tensor:
        parts = [torch.stack([f64[k].double() for k in self.f64], 1).view(torch.int32),
                 torch.stack([f32[k].float() for k in self.f32], 1).view(torch.int32)]
        if self.candidates:
            parts += [cand_z.view(torch.int32), cand_id.int()]
        if self.pad:
            parts.append(parts[0].new_zeros(parts[0].shape[0], 1))
        return torch.cat(parts, 1)

    def unpack(self, table: Tensor) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """``{field: [TP, rows]}``, candidate logits and ids ``[TP, rows, C]`` (views)."""
        f64 = table[..., :self.start32].view(torch.float64)
        f32 = table[..., self.start32:self.start_cand].view(torch.float32)
        fields = {k: f64[..., i] for i, k in enumerate(self.f64)}
        fields.update({k: f32[..., i] for i, k in enumerate(self.f32)})
        if not self.candidates:
            return fields, None, None
        c = self.start_cand
        return (fields, table[..., c:c + self.candidates].view(torch.float32),
                table[..., c + self.candidates:c + 2 * self.candidates])


def _local_chunk(z: Tensor, ids: Tensor, keys: Tensor | None, mode: _Mode, layout: _Layout,
                 vocab_start: int) -> tuple[Tensor, Tensor]:
    """This rank's ``[c, words]`` for a chunk ``z [c, width]``, and a device bool: all its
    logits finite. No communication."""
    c, width = z.shape
    if not width:  # a rank of padding only: contributes nothing
        ninf, zero = z.new_full((c,), -math.inf), z.new_zeros((c,), dtype=torch.float64)
        f64 = dict(s0=zero, s1=zero, t=zero, score=ninf)
        f32 = dict(max=ninf, min=-ninf, bound=ninf, kth_hi=ninf, kth_lo=ninf)
        cand = z.new_full((c, mode.candidates), -math.inf)
        ok = torch.ones((), dtype=torch.bool, device=z.device)
        return layout.pack(f64, f32, cand, torch.zeros_like(cand, dtype=torch.int32)), ok
    t, idx = mode.temperature, None
    if mode.greedy:  # argmax: the first of equal maxima, i.e. the smallest id
        idx = z.argmax(-1, keepdim=True)
        vals = z.gather(1, idx)
    elif mode.filtered and mode.candidates:
        vals, idx = z.topk(min(mode.candidates, width), -1)  # sorted; which of equal values
    else:                                                    # it picks does not matter
        vals = z.amax(-1, keepdim=True)
    m, low = vals[:, 0], z.amin(-1)
    finite = torch.isfinite(m).all() & torch.isfinite(low).all()
    # The untempered entropy in the same pass: H = log S0 - S1 / S0.
    shifted = z - m.unsqueeze(1)
    p0 = shifted.exp()
    f64 = dict(s0=sum64(p0), s1=sum64(p0.mul_(shifted)))
    del shifted, p0
    f32 = dict(max=m, min=low)
    w = z / t if t not in (0.0, 1.0) and (mode.plain or mode.wants_tempered_mass) else z
    if mode.wants_tempered_mass:
        f64["t"] = f64["s0"] if t == 1 else sum64((w - (m / t).unsqueeze(1)).exp_())
    if mode.plain:  # each rank's best Gumbel score over its whole shard, as its one candidate
        score, idx = _gumbel_argmax(w, None, keys, ids)
        vals, f64["score"] = z.gather(1, idx), score[:, 0]
    del w
    cand_z = cand_id = None
    if mode.candidates:
        pad = mode.candidates - vals.shape[1]
        cand_z = torch.nn.functional.pad(vals, (0, pad), value=-math.inf) if pad else vals
        cand_id = (idx + vocab_start).int()
        cand_id = torch.nn.functional.pad(cand_id, (0, pad)) if pad else cand_id
    if "bound" in layout.f32:  # -inf: this rank sent all its logits
        f32["bound"] = vals[:, -1] if width > mode.candidates else torch.full_like(m, -math.inf)
    if "kth_hi" in layout.f32:  # top_k > C: the fallback's bracket of the k-th largest logit
        f32["kth_hi"] = _kth_largest(z, mode.top_k)[:, 0]
        f32["kth_lo"] = _kth_largest(z, -(-mode.top_k // mode.tp))[:, 0]
    return layout.pack(f64, f32, cand_z, cand_id), finite


def _merge_masses(shift: Tensor, mass: Tensor, extra: Tensor | None = None) -> Tensor:
    """``sum_r mass_r e^{shift_r}`` (``+ extra_r``-weighted, see the entropy) over ranks, fp64;
    ranks without columns (mass 0, shift -inf) contribute 0."""
    present = mass > 0
    value = mass if extra is None else extra + shift * mass
    return torch.where(present, value * shift.exp(), 0.0).sum(0)


def _first_best(score: Tensor, ids: Tensor, dim: int) -> Tensor:
    """Index along ``dim`` of the largest score, the smallest id among equal ones."""
    best = score.amax(dim, keepdim=True)
    return torch.where(score == best, ids.double(), math.inf).argmin(dim, keepdim=True)


def _from_candidates(cand_z: Tensor, cand_id: Tensor, bound: Tensor, mode: _Mode, keys: Tensor,
                     m_w: Tensor, z_mass: Tensor | None) -> tuple[Tensor, ...]:
    """(tokens, z_token, w_token, log support mass, determined) of every row, from the gathered
    candidates ``[TP, rows, C]`` and bounds ``[TP, rows]``."""
    tp, n, _ = cand_z.shape
    t = mode.temperature
    cand_z = cand_z.permute(1, 0, 2).reshape(n, -1)
    cand_id = cand_id.permute(1, 0, 2).reshape(n, -1).long()
    cand_w = cand_z / t if t != 1 else cand_z
    c_star = (bound / t if t != 1 else bound).amax(0)
    # Sort by (w desc, id asc): one int64 key, the fp32 order key above the id.
    order = (((_to_key(cand_w) + (1 << 31)) << 24) | ((1 << 24) - 1 - cand_id)).argsort(
        -1, descending=True)
    cand_z, cand_w, cand_id = (x.gather(1, order) for x in (cand_z, cand_w, cand_id))
    known = cand_w > c_star.unsqueeze(1)  # a prefix: every token above c* was sent
    mass = torch.where(known, (cand_w.double() - m_w.double().unsqueeze(1)).exp(), 0.0)
    support = known
    determined = torch.ones(n, dtype=torch.bool, device=cand_z.device)
    if mode.top_k:
        determined &= known.sum(-1) >= mode.top_k
        support = support & (torch.arange(support.shape[1], device=cand_z.device) < mode.top_k)
        z_mass = torch.where(support, mass, 0.0).sum(-1)
    if mode.top_p < 1:
        target = mode.top_p * z_mass
        cum = torch.where(support, mass, 0.0).cumsum(-1)
        before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # mass strictly before
        if not mode.top_k:  # the first token not sent would be kept: the nucleus is longer
            determined &= cum[:, -1] >= target
        support = support & (before < target.unsqueeze(1))
    score = torch.where(support, cand_w.double() + gumbel_noise(keys, cand_id), -math.inf)
    pick = _first_best(score, cand_id, 1)
    log_mass = torch.where(support, mass, 0.0).sum(-1).log()
    return (cand_id.gather(1, pick)[:, 0], cand_z.gather(1, pick)[:, 0],
            cand_w.gather(1, pick)[:, 0], log_mass, determined)


def _combine(layout: _Layout, table: Tensor, mode: _Mode, keys: Tensor | None
             ) -> dict[str, Tensor]:
    """Every row's results from the gathered ``[TP, rows, words]`` table (same on every rank)."""
    t = mode.temperature
    f, cand_z, cand_id = layout.unpack(table)
    m_r = f["max"]
    m0 = m_r.amax(0)
    shift = m_r.double() - m0.double().unsqueeze(0)
    s0 = _merge_masses(shift, f["s0"])
    s1 = _merge_masses(shift, f["s0"], f["s1"])
    log_s0 = s0.log()
    out = dict(m0=m0, log_s0=log_s0, entropy=(log_s0 - s1 / s0).float(),
               w_min=f["min"].amin(0) / (t or 1.0))
    if mode.greedy:
        pick = _first_best(cand_z[..., 0].double(), cand_id[..., 0], 0)
        out["tokens"] = cand_id[..., 0].gather(0, pick)[0].long()
        out["logp_sampling"] = torch.zeros_like(m0)
        z_token = cand_z[..., 0].gather(0, pick)[0]
        out["logp_untempered"] = (z_token.double() - m0.double() - log_s0).float()
        return out
    m_w = m0 / t if t != 1 else m0  # = max(w): division by T > 0 is monotone, also rounded
    out["overflow"] = ~(torch.isfinite(m_w).all() & torch.isfinite(out["w_min"]).all())
    z_mass = None
    if mode.wants_tempered_mass:
        mw_r = m_r / t if t != 1 else m_r
        z_mass = _merge_masses(mw_r.double() - m_w.double().unsqueeze(0), f["t"])
    if mode.plain:
        pick = _first_best(f["score"], cand_id[..., 0], 0)
        tokens = cand_id[..., 0].gather(0, pick)[0].long()
        z_token = cand_z[..., 0].gather(0, pick)[0]
        w_token = z_token / t if t != 1 else z_token
        log_mass = z_mass.log()
    elif not mode.candidates:  # top_k > C: every row takes the fallback
        out["k_bracket"] = (f["kth_hi"].amax(0) / t, f["kth_lo"].amax(0) / t)
        out["determined"] = torch.zeros_like(m0, dtype=torch.bool)
        tokens = torch.zeros_like(m0, dtype=torch.long)
        z_token = w_token = m0
        log_mass = s0
    else:
        tokens, z_token, w_token, log_mass, out["determined"] = _from_candidates(
            cand_z, cand_id, f["bound"], mode, keys, m_w, z_mass)
        if mode.top_k:  # the fallback's top-k bracket, from the sorted per-rank candidates
            k_hi = cand_z[..., mode.top_k - 1].amax(0)
            k_lo = cand_z[..., -(-mode.top_k // mode.tp) - 1].amax(0)
            out["k_bracket"] = (k_hi / t if t != 1 else k_hi, k_lo / t if t != 1 else k_lo)
    out.update(tokens=tokens,
               logp_sampling=(w_token.double() - m_w.double() - log_mass).float(),
               logp_untempered=(z_token.double() - m0.double() - log_s0).float())
    return out


def _read_flags(flags: Tensor, out: dict[str, Tensor], temperature: float, vocab_size: int
               ) -> list[int]:
    """The call's one host synchronisation: raise the errors every rank sees in the gathered
    flags, and return the rows the candidates left open."""
    head = [flags.amax(0)]
    if "overflow" in out:
        head.append(out["overflow"].int().view(1))
    if "determined" in out:
        head.append((~out["determined"]).int())
    host = torch.cat(head).tolist()
    if host[0] > 0:
        raise NonFiniteLogitsError(
            f"logits_shard contains NaN or Inf in the true vocabulary (TP rank {host[0] - 1}): "
            f"fix the model output (overflow in fp16/bf16? a -inf mask?) before computing "
            f"entropies, log-probs or samples")
    if host[1] < vocab_size:
        raise ValueError(f"the shards cover ids [0, {host[1]}) but vocab_size={vocab_size}: "
                         f"check vocab_start on each rank and vocab_size")
    if "overflow" in out and host[2]:
        # Non-finite tempered logits: like NaN/Inf logits, an error every caller (a training
        # step, every rank of a pipeline together) can skip. The config keeps the temperature at
        # least config.MIN_TEMPERATURE, so that this takes logits beyond 3.4e32.
        raise NonFiniteLogitsError(f"temperature={temperature!r}: logits / temperature "
                                   f"overflows fp32; use temperature=0 (greedy) or a larger one")
    return [i for i, flag in enumerate(host[3:]) if flag] if "determined" in out else []


def sample(logits_shard: Tensor, vocab_start: int, vocab_size: int, tp_group, *,
           temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int | Tensor = 0,
           step: int | Tensor = 0, chunk_size: int = SAMPLE_CHUNK_SIZE,
           candidates: int = CANDIDATES, stats: SampleStats | None = None) -> Sample:
    """Draw one token per row of vocab-parallel logits; see the module docstring for the method.

    ``logits_shard [..., V_shard]`` holds global ids ``[vocab_start, vocab_start + V_shard)``;
    ids ``>= vocab_size`` are padding and never drawn. ``tp_group``: the group the vocabulary is
    split over (None: one process holding all of it); every rank gets the same result.
    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable the filters. The noise is a
    function of ``(seed, row, step, token id)``: an int ``seed`` identifies rows by their index in
    the flattened batch, a per-row seed tensor ``[...]`` by the seed alone; ``step`` (int or
    ``[...]``) is the decoding position. ``candidates``: per rank and row in the one all-gather
    (the result does not depend on it, only how often the fallback runs); ``stats`` counts rows
    and fallback rows. Not differentiable.
    """
    width = check_shard(logits_shard, vocab_start, vocab_size, tp_group, chunk_size)
    _check_sampling_args(temperature, top_k, top_p, candidates)
    lead, device = logits_shard.shape[:-1], logits_shard.device
    temperature, top_p = float(temperature), float(top_p)
    mode = _Mode.of(temperature, top_k, top_p, candidates, vocab_size,
                    logits_shard.shape[-1], group_size(tp_group))
    tp = mode.tp
    keys = row_keys(seed, step, lead, device) if temperature > 0 else None
    rows, n = row_reader(logits_shard.detach()), lead.numel()
    ids = torch.arange(vocab_start, vocab_start + width, device=device)
    layout = _Layout(mode)
    parts, finite = [], []
    for sl in row_chunks(n, chunk_size):
        part, ok = _local_chunk(rows(sl)[:, :width].float(), ids,
                                None if keys is None else keys[sl], mode, layout, vocab_start)
        parts.append(part)
        finite.append(ok)
    rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    finite = finite[0] if len(finite) == 1 else torch.stack(finite).all()
    covered = vocab_start + width if width else 0
    flags = torch.stack([torch.where(finite, 0, rank + 1).int(),
                         finite.new_full((), covered, dtype=torch.int32)])
    local = parts[0] if len(parts) == 1 else torch.cat(parts)
    table = all_gather(torch.cat([local.reshape(-1), flags]), tp_group)  # the one collective
    flags, table = table[:, -2:], table[:, :-2].view(tp, n, layout.words)
    out = _combine(layout, table, mode, keys)
    open_rows = _read_flags(flags, out, temperature, vocab_size)
    tokens, logp_sampling = out["tokens"], out["logp_sampling"]
    logp_untempered = out["logp_untempered"]
    if open_rows:
        index = torch.tensor(open_rows, device=device)

        def chunks():  # the open rows, re-read at every stage of the fallback
            for sl in row_chunks(len(open_rows), max(chunk_size // 2, 1)):
                z = rows(index[sl])[:, :width].float()
                yield sl, z, (z / temperature if temperature != 1 else z)

        bracket = out.get("k_bracket")
        tok, lp, shifted = exact_rows(
            chunks, len(open_rows), ids, keys[index], temperature, mode.top_k, top_p,
            vocab_start, vocab_size, tp_group, out["m0"][index], out["w_min"][index],
            None if bracket is None else (bracket[0][index], bracket[1][index]))
        tokens[index], logp_sampling[index] = tok, lp
        logp_untempered[index] = (shifted - out["log_s0"][index]).float()
    if stats is not None:
        stats.calls += 1
        stats.rows += n
        stats.fallback_rows += len(open_rows)
    return Sample(tokens.view(lead), logp_sampling.view(lead), logp_untempered.view(lead),
                  out["entropy"].view(lead))
