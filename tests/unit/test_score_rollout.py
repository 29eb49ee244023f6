"""The optional scoring extras wired through ``score_rollout`` end to end (config -> rollout ->
advantages), against values computed here by hand: softmax rewards, z-score and lowest-fraction
trimming, top/bottom pairing and std-normalised advantages.

One group of k = 4 candidates, 5 content tokens each, no marker: the answer span is the last
token (final_fraction 0.2) and the fork term the largest reasoning entropy (top_m = 1), so
S = -H_last + max(H_0..H_3) = [2.0, 1.0, 0.5, -3.0]. A second group of identical candidates
is never used."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_sega.config import load_config
from megatron_sega.data import TINY_TOKENIZER_DIR, Tokenizer
from megatron_sega.sampling import Rollout
from megatron_sega.training.rollouts import score_rollout

K = 4
FORK, H_LAST = [2.5, 1.5, 1.0, 0.0], [0.5, 0.5, 0.5, 3.0]
SCORES = [f - h for f, h in zip(FORK, H_LAST)]  # [2.0, 1.0, 0.5, -3.0]


def _rollout() -> Rollout:
    n, width = 2 * K, 5
    entropy = torch.zeros(n, width)
    for j in range(K):
        entropy[j, 0], entropy[j, -1] = FORK[j], H_LAST[j]
    entropy[K:] = 1.0  # group 2: four identical candidates
    mask = torch.ones(n, width, dtype=torch.bool)
    zeros = torch.zeros(n, width)
    return Rollout(prompt_ids=[[1, 5, 6]] * n, response_ids=torch.arange(10, 15).repeat(n, 1),
                   response_mask=mask, content_mask=mask, logp=zeros, logp_sampling=zeros,
                   entropy=entropy, lengths=torch.full((n,), width), finish_reason=["length"] * n,
                   sample_ids=torch.arange(n))


def _scored(*overrides: str):
    config = load_config(None, ["scoring.marker=", "scoring.top_m=1", "scoring.lam=1.0",
                                f"sega.k={K}", *overrides])
    session = SimpleNamespace(config=config, tokenizer=Tokenizer.from_path(TINY_TOKENIZER_DIR))
    return score_rollout(session, _rollout(), K)


def _centred(values: list[float], keep: list[bool]) -> list[float]:
    kept = [v for v, k in zip(values, keep) if k]
    mean = sum(kept) / len(kept)
    return [v - mean if k else 0.0 for v, k in zip(values, keep)]


def _check(scored, expected: list[float], keep: list[bool], rest: list[bool] = [True] * K
           ) -> None:
    assert scored.score[:K].tolist() == pytest.approx(SCORES)
    assert scored.valid[:K].tolist() == keep and scored.valid[K:].tolist() == rest
    assert scored.group_used.tolist() == [True, False]  # group 2: all equal
    assert scored.advantage[:K].tolist() == pytest.approx(expected, abs=1e-6)
    assert not scored.advantage[K:].any()


def test_identity_rewards_give_centred_scores():
    _check(_scored(), _centred(SCORES, [True] * 4), [True] * 4)


def test_softmax_rewards():
    tau = 0.5
    e = [math.exp(s / tau) for s in SCORES]
    softmax = [x / sum(e) for x in e]
    scored = _scored("scoring.reward=softmax", f"scoring.tau={tau}")
    assert scored.reward[:K].tolist() == pytest.approx(softmax)
    _check(scored, [p - 0.25 for p in softmax], [True] * 4)


def test_zscore_trimming_drops_the_low_outlier():
    # mean 0.125, sample std sqrt(14.1875 / 3) = 2.175: only -3.0 lies below mean - 1 * std.
    mean = sum(SCORES) / 4
    std = math.sqrt(sum((s - mean) ** 2 for s in SCORES) / 3)
    keep = [s >= mean - std for s in SCORES]
    assert keep == [True, True, True, False]
    _check(_scored("scoring.trim=zscore", "scoring.trim_z=1.0"), _centred(SCORES, keep), keep)


def test_lowest_fraction_trimming():
    keep = [True, True, False, False]  # floor(0.5 * 4) = 2 lowest dropped
    # In the all-equal group, ties go by position: the first two are dropped.
    _check(_scored("scoring.trim=lowest_fraction", "scoring.trim_fraction=0.5"),
           _centred(SCORES, keep), keep, rest=[False, False, True, True])


def test_top_bottom_pairing_keeps_best_and_worst():
    keep = [True, False, False, True]
    # The all-equal group keeps its first and last member (and is still not used).
    _check(_scored("scoring.top_bottom_pairs=true"), [2.5, 0.0, 0.0, -2.5], keep,
           rest=[True, False, False, True])


def test_trimming_then_pairing():
    keep = [True, False, True, False]  # -3.0 trimmed, then the best (2.0) and worst (0.5) left
    _check(_scored("scoring.trim=zscore", "scoring.top_bottom_pairs=true"), [0.75, 0, -0.75, 0],
           keep, rest=[True, False, False, True])


def test_std_normalised_advantages():
    mean = sum(SCORES) / 4
    std = math.sqrt(sum((s - mean) ** 2 for s in SCORES) / 3)  # sample std, as the authors' code
    expected = [(s - mean) / (std + 1e-6) for s in SCORES]
    _check(_scored("sega.normalize_std=true"), expected, [True] * 4)
    plain = _scored()
    assert plain.advantage[:K].abs().max() > 2.5  # not unit scale without the division
