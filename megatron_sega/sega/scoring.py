"""Eq. 1 of GEM / SEGA and the path from scores to group advantages.

Source: "GEM: Generative Entropy-Guided Preference Modeling for Few-shot Alignment of LLMs",
arXiv 2511.13007 (AAAI 2026), Eq. 1 (entropy-guided score) and the advantage of Eq. 2.

Pure functions of tensors: no globals, no process groups, no config objects. A caller with
G prompts and k candidates each (N = G * k rows, row ``g * k + j`` is candidate j of prompt g)
runs::

    answer, reasoning = answer_span_mask(ids, mask, marker_ids, eos_id=eos)
    parts = entropy_scores(entropies, answer, reasoning, top_m=0.1, lam=1.0)
    scores, valid = parts.score.view(G, k), parts.valid.view(G, k)
    valid = trim_outliers(scores, valid)        # optional filter
    valid = top_bottom_pairs(scores, valid)     # optional filter
    r = rewards(scores, valid, "identity")
    adv, group_used = advantages(r, valid)      # adv.view(N) goes to sega_loss

Filters are applied to the scores before the reward mapping, so that a softmax reward is
normalised over the members that are kept.

Deviations from / choices beyond the paper (METHOD.md lists them as open):
- the answer span starts after the LAST occurrence of the marker (the paper says "after the
  marker"); the marker tokens themselves belong to neither span;
- a marker followed by no token gives an empty answer span: the candidate is not valid and
  takes no part in its group (the paper does not say);
- fraction -> count conversions use ``ceil`` with a 1e-9 tolerance, so that float error
  (``0.14 * 50 = 7.000000000000001``) does not add a token;
- ``advantages`` does not divide by the group std by default (the paper's Eq. 2 as printed);
  the authors' code z-scores, available with ``normalize_std=True``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RewardMode = Literal["identity", "softmax"]
TrimMethod = Literal["zscore", "lowest_fraction"]

# Float tolerance of the fraction -> count conversions (0.14 * 50 = 7.000000000000001 -> 7).
_COUNT_TOL = 1e-9


@dataclass(frozen=True)
class ScoreParts:
    """The terms of Eq. 1 per candidate, float64, shape [N] each.

    score:   S = -h_final + lam * fork (0 where not valid).
    h_final: mean entropy over the answer span (0 where the span is empty).
    fork:    mean of the top-m entropies of the reasoning span (0 where the span is empty).
    valid:   True when the candidate has at least one answer token.
    """

    score: Tensor
    h_final: Tensor
    fork: Tensor
    valid: Tensor


# ---------------------------------------------------------------------------------------------
# Answer / reasoning spans
# ---------------------------------------------------------------------------------------------


def _as_ids(seq: object) -> list[int] | None:
    """The sequence as a list of token ids, or None if it is not a non-empty sequence of integers."""
    try:
        ids = [operator.index(t) for t in seq]  # type: ignore[attr-defined]
    except TypeError:
        return None
    return ids or None


def _marker_variants(marker_ids: Sequence[int] | Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Accept one token sequence or several alternative tokenisations of the marker."""
    if marker_ids is None or len(marker_ids) == 0:
        return []
    single = _as_ids(marker_ids)
    if single is not None:
        return [single]
    variants = [_as_ids(v) for v in marker_ids]
    if any(v is None for v in variants):
        raise TypeError(
            f"marker_ids must be a list of token ids or a list of non-empty lists of token ids, "
            f"got {marker_ids!r}; pass e.g. tokenizer.encode('Final Answer:', add_special_tokens=False)"
        )
    return variants  # type: ignore[return-value]


def _last_marker(tokens: Tensor, markers: list[Tensor]) -> tuple[int, int] | None:
    """(start, end) of the occurrence of any marker variant that ends last; among variants that
    end at the same token, the longest (so that all marker tokens are excluded)."""
    best: tuple[int, int] | None = None
    for marker in markers:
        m = marker.numel()
        if tokens.numel() < m:
            continue
        hits = (tokens.unfold(0, m, 1) == marker).all(dim=1).nonzero()
        if hits.numel() == 0:
            continue
        start = int(hits[-1])
        end = start + m
        if best is None or end > best[1] or (end == best[1] and start < best[0]):
            best = (start, end)
    return best


def answer_span_mask(
    response_ids: Tensor,
    response_mask: Tensor,
    marker_ids: Sequence[int] | Sequence[Sequence[int]] | None,
    final_fraction: float = 0.2,
    eos_id: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Split each response into its answer span and its reasoning span (GEM Eq. 1).

    Args:
        response_ids: [N, T] token ids of the generated responses.
        response_mask: [N, T] bool, True on the response tokens. The caller passes a mask that
            already EXCLUDES EOS and padding (METHOD.md: "EOS and padding never enter any term").
            The response tokens need not start at column 0 (left padding is fine).
        marker_ids: token ids of the answer marker (e.g. the tokenisation of "Final Answer:"),
            or a list of alternative tokenisations (a marker after a space or a newline often
            tokenises differently), or None / [] for "no marker".
        final_fraction: with no marker, the answer span is the last ceil(final_fraction * L)
            response tokens (at least 1 when L >= 1); 0 < final_fraction <= 1.
        eos_id: optional, defensive: the first EOS inside the mask and every masked token after
            it are removed from the response (covers pad == EOS, as in Llama).

    Returns:
        (answer_mask, reasoning_mask), bool [N, T], disjoint, both inside the response mask.

    Rule: the answer span is the response tokens after the LAST occurrence of the marker (a model
    may mention the marker while reasoning, or restate its answer; the last one concludes), up to
    the end of the response. The marker tokens belong to neither span: they are the same tokens
    in every candidate and carry no information about the candidate's confidence. The reasoning
    span is the response before the marker. If the marker ends the response, the answer span is
    empty and ``entropy_scores`` marks the candidate not valid. If the marker is absent, the last
    ceil(final_fraction * L) tokens are the answer and the rest is the reasoning.
    An empty response (L = 0) gives two empty spans.
    """
    if response_ids.dim() != 2 or response_ids.shape != response_mask.shape:
        raise ValueError(
            f"response_ids {tuple(response_ids.shape)} and response_mask {tuple(response_mask.shape)} "
            f"must both be [N, T] with the same shape"
        )
    if response_mask.dtype != torch.bool:
        raise TypeError(f"response_mask must be bool, got {response_mask.dtype}; pass mask.bool()")
    if response_ids.is_floating_point() or response_ids.is_complex():
        raise TypeError(f"response_ids must hold integer token ids, got {response_ids.dtype}")
    if not 0.0 < final_fraction <= 1.0:
        raise ValueError(f"final_fraction={final_fraction} must lie in (0, 1]; the default is 0.2")

    mask = response_mask
    if eos_id is not None:
        is_eos = (response_ids == eos_id) & mask
        mask = mask & ~(is_eos.cumsum(dim=1) > 0)  # drop the first EOS and everything after it

    markers = [torch.tensor(v, dtype=response_ids.dtype, device=response_ids.device)
               for v in _marker_variants(marker_ids)]
    answer = torch.zeros_like(mask)
    reasoning = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        pos = mask[i].nonzero().squeeze(1)  # response positions in order
        length = pos.numel()
        if length == 0:
            continue
        found = _last_marker(response_ids[i, pos], markers) if markers else None
        if found is not None:
            start, end = found
        else:
            n_answer = min(max(math.ceil(final_fraction * length - _COUNT_TOL), 1), length)
            start = end = length - n_answer
        reasoning[i, pos[:start]] = True
        answer[i, pos[end:]] = True
    return answer, reasoning


# ---------------------------------------------------------------------------------------------
# Eq. 1
# ---------------------------------------------------------------------------------------------


def _check_top_m(top_m: float) -> None:
    if not (math.isfinite(top_m) and top_m > 0):
        raise ValueError(f"top_m={top_m} must be > 0: a fraction (< 1, e.g. 0.1) or a count (>= 1)")
    if top_m >= 1 and top_m != int(top_m):
        raise ValueError(f"top_m={top_m} >= 1 is a token count and must be a whole number; "
                         f"use {int(top_m)} or a fraction < 1")


def entropy_scores(
    entropies: Tensor,
    answer_mask: Tensor,
    reasoning_mask: Tensor,
    top_m: float,
    lam: float,
) -> ScoreParts:
    """Entropy-guided score of each candidate, GEM Eq. 1 (arXiv 2511.13007)::

        S(a) = -H_final(a) + lam * (1/m) * sum_{t in top-m(reasoning span)} H_t

    H_final is the mean token entropy over the answer span; the fork term is the mean of the m
    largest entropies of the reasoning span. ``top_m`` < 1 is a fraction of the reasoning length
    (m = ceil(top_m * R), at least 1); ``top_m`` >= 1 is a count, capped at R.

    Args:
        entropies: [N, T] per-token entropies H_t (float, any precision); values outside the two
            masks are ignored, NaN or inf included.
        answer_mask, reasoning_mask: [N, T] bool, disjoint (from ``answer_span_mask``).
        top_m: fraction (< 1) or count (>= 1) of reasoning tokens in the fork term.
        lam: weight lambda of the fork term (reference: 1.0 in the authors' code, 0.4 in a demo).

    Returns:
        ScoreParts in float64. A candidate is valid when it has >= 1 answer token; invalid ones get
        score 0 and should be left out of their group. An empty reasoning span (e.g. the marker
        is the first token) gives fork = 0, so S = -H_final. No term is ever NaN.
    """
    if entropies.dim() != 2 or not (entropies.shape == answer_mask.shape == reasoning_mask.shape):
        raise ValueError(
            f"entropies {tuple(entropies.shape)}, answer_mask {tuple(answer_mask.shape)} and "
            f"reasoning_mask {tuple(reasoning_mask.shape)} must all be [N, T]"
        )
    if answer_mask.dtype != torch.bool or reasoning_mask.dtype != torch.bool:
        raise TypeError("answer_mask and reasoning_mask must be bool; pass the output of answer_span_mask")
    if not entropies.is_floating_point():
        raise TypeError(f"entropies must be floating point, got {entropies.dtype}")
    _check_top_m(top_m)
    if not math.isfinite(lam):
        raise ValueError(f"lam={lam} must be finite")
    if bool((answer_mask & reasoning_mask).any()):
        raise ValueError("answer_mask and reasoning_mask overlap; a token belongs to at most one span")

    n, t = entropies.shape
    h = entropies.detach().to(torch.float64)
    n_answer = answer_mask.sum(dim=1)
    n_reason = reasoning_mask.sum(dim=1)
    valid = n_answer > 0
    if t == 0:
        zeros = h.new_zeros(n)
        return ScoreParts(score=zeros, h_final=zeros, fork=zeros, valid=valid)

    h_final = torch.where(answer_mask, h, 0.0).sum(dim=1) / n_answer.clamp(min=1)

    if top_m < 1:
        m = torch.ceil(top_m * n_reason.to(torch.float64) - _COUNT_TOL).long().clamp(min=1)
    else:
        m = torch.full_like(n_reason, int(top_m))
    m = torch.minimum(m, n_reason)  # 0 exactly when the reasoning span is empty

    # Largest entropies first; the sorted prefix of length R holds exactly the reasoning tokens.
    ordered = torch.where(reasoning_mask, h, -math.inf).sort(dim=1, descending=True).values
    prefix = torch.where(torch.isfinite(ordered), ordered, 0.0).cumsum(dim=1)
    top_sum = prefix.gather(1, (m - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    fork = torch.where(m > 0, top_sum / m.clamp(min=1), 0.0)

    score = torch.where(valid, -h_final + lam * fork, 0.0)
    h_final = torch.where(valid, h_final, 0.0)
    return ScoreParts(score=score, h_final=h_final, fork=fork, valid=valid)


# ---------------------------------------------------------------------------------------------
# Score -> reward -> (filters) -> advantage
# ---------------------------------------------------------------------------------------------


def _check_group(values: Tensor, valid: Tensor, name: str) -> None:
    if values.dim() != 2 or values.shape != valid.shape:
        raise ValueError(
            f"{name} {tuple(values.shape)} and valid {tuple(valid.shape)} must both be [G, k] "
            f"(groups x candidates); reshape with .view(G, k)"
        )
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be bool, got {valid.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {values.dtype}")


def rewards(scores: Tensor, valid: Tensor, mode: RewardMode = "identity", tau: float = 1.0) -> Tensor:
    """Map Eq. 1 scores to rewards within each group (GEM, arXiv 2511.13007, "score -> reward").

    ``identity``: r = S. ``softmax``: r_j = exp(S_j / tau) / sum_{valid l} exp(S_l / tau), over the
    group's valid members only (rewards in [0, 1] summing to 1 per group; with the group-mean
    baseline the advantages are then r_j - 1/n_valid). Invalid members get 0; a group with no
    valid member gets all zeros (no NaN).

    Args:
        scores: [G, k] float. valid: [G, k] bool. tau: softmax temperature, > 0.
    """
    _check_group(scores, valid, "scores")
    if mode == "identity":
        return torch.where(valid, scores, 0.0)
    if mode == "softmax":
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau={tau} must be a finite number > 0 for softmax rewards, e.g. 1.0")
        logits = torch.where(valid, scores / tau, -math.inf)
        logits = torch.where(valid.any(dim=1, keepdim=True), logits, 0.0)  # all-invalid row: no NaN
        return torch.where(valid, torch.softmax(logits, dim=1), 0.0)
    raise ValueError(f"mode={mode!r} is not a reward mode; use 'identity' or 'softmax'")


def _group_mean_std(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group count, mean and sample std (Bessel, n - 1; 0 when n < 2) over valid members."""
    count = valid.sum(dim=1)
    mean = torch.where(valid, values, 0.0).sum(dim=1) / count.clamp(min=1)
    centred = torch.where(valid, values - mean.unsqueeze(1), 0.0)
    var = centred.square().sum(dim=1) / (count - 1).clamp(min=1)
    return count, mean, var.sqrt()


def trim_outliers(
    rewards: Tensor,
    valid: Tensor,
    method: TrimMethod = "zscore",
    z: float = 1.0,
    fraction: float = 0.25,
    min_keep: int = 2,
) -> Tensor:
    """Drop low-scoring outliers from each group (optional filter of GEM's cognitive filtering).

    Rules (over the group's valid members; works on scores or rewards alike):
    - ``zscore``: drop members with value < mean - z * std (sample std, n - 1); nothing is dropped
      from a group whose values are all equal.
    - ``lowest_fraction``: drop the floor(fraction * n_valid) lowest members.
    Never leaves fewer than ``min_keep`` members in a group that had at least that many (the
    lowest go first; ties are broken by position, earlier first). The paper names the filter but
    not the rule; both rules here are this project's choice.

    Returns:
        the new valid mask [G, k] (a subset of ``valid``).
    """
    _check_group(rewards, valid, "rewards")
    if min_keep < 0:
        raise ValueError(f"min_keep={min_keep} must be >= 0; the default 2 keeps groups usable")
    values = rewards.detach().to(torch.float64)
    count, mean, std = _group_mean_std(values, valid)
    if method == "zscore":
        if not (math.isfinite(z) and z >= 0):
            raise ValueError(f"z={z} must be a finite number >= 0, e.g. 1.0")
        low = valid & (values < (mean - z * std).unsqueeze(1)) & (std > 0).unsqueeze(1)
        n_drop = low.sum(dim=1)
    elif method == "lowest_fraction":
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction={fraction} must lie in [0, 1), e.g. 0.25")
        n_drop = torch.floor(fraction * count.to(torch.float64) + _COUNT_TOL).long()
    else:
        raise ValueError(f"method={method!r} is not a trim rule; use 'zscore' or 'lowest_fraction'")
    n_drop = torch.minimum(n_drop, (count - min_keep).clamp(min=0))

    # Rank valid members from lowest to highest (stable: ties keep their order).
    key = torch.where(valid, values, math.inf)
    rank = key.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return valid & (rank >= n_drop.unsqueeze(1))


def top_bottom_pairs(rewards: Tensor, valid: Tensor) -> Tensor:
    """Keep only the best and the worst valid candidate of each group (optional GEM filter).

    Ties: the best is the first maximal member, the worst the last minimal member, so that two
    distinct members are kept whenever a group has >= 2 valid members (an all-equal group keeps
    its first and last valid member, and later gets zero advantage). Groups with < 2 valid
    members are returned unchanged.

    Returns:
        the new valid mask [G, k] (a subset of ``valid``).
    """
    _check_group(rewards, valid, "rewards")
    g, k = valid.shape
    if k == 0:
        return valid.clone()
    values = rewards.detach()
    best = torch.where(valid, values, -math.inf).argmax(dim=1)  # first maximum
    worst = k - 1 - torch.where(valid, values, math.inf).flip(1).argmin(dim=1)  # last minimum
    cols = torch.arange(k, device=valid.device).unsqueeze(0)
    keep = (cols == best.unsqueeze(1)) | (cols == worst.unsqueeze(1))
    pairable = (valid.sum(dim=1) >= 2).unsqueeze(1)
    return torch.where(pairable, valid & keep, valid)


def advantages(
    rewards: Tensor,
    valid: Tensor,
    normalize_std: bool = False,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Group-mean-centred advantages of GEM Eq. 2 (arXiv 2511.13007)::

        A_i = r_i - mean_{valid j in group}(r_j)        [/ (std_group + eps) if normalize_std]

    A group is used when it has >= 2 valid members whose rewards are not all equal; every other
    group (and every invalid member) gets advantage exactly 0 and is reported as not used.

    Default ``normalize_std=False``: Eq. 2 as printed in the paper has no std division. Entropy
    scores of near-identical candidates differ by tiny amounts; z-scoring would blow such noise
    up to unit-size advantages, while the raw difference keeps the signal proportional to how
    much more confident one candidate is than another. ``True`` reproduces the authors' code
    (sample std, n - 1, as ``torch.Tensor.std``; ``eps`` is added to the std).

    Args:
        rewards: [G, k] float. valid: [G, k] bool.

    Returns:
        (adv [G, k] in the dtype of ``rewards``, group_used [G] bool).
    """
    _check_group(rewards, valid, "rewards")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={eps} must be a finite number >= 0, e.g. 1e-6")
    g, k = rewards.shape
    if k == 0:
        return rewards.new_zeros(g, 0), torch.zeros(g, dtype=torch.bool, device=rewards.device)
    values = rewards.detach().to(torch.float64)
    count, mean, std = _group_mean_std(values, valid)
    spread = torch.where(valid, values, -math.inf).amax(dim=1) - torch.where(valid, values, math.inf).amin(dim=1)
    used = (count >= 2) & (spread > 0)
    adv = torch.where(valid, values - mean.unsqueeze(1), 0.0)
    if normalize_std:
        adv = adv / (std + eps).unsqueeze(1)
    adv = torch.where(used.unsqueeze(1), adv, 0.0)
    return adv.to(rewards.dtype), used
