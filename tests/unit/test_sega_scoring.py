"""Eq. 1 scoring: answer/reasoning spans and entropy scores, against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sega.sega import answer_span_mask, entropy_scores

MARKER = [1, 2]  # stands for the tokenisation of "Final Answer:"
T, F = True, False


def _masks(ids: list[list[int]], mask: list[list[bool]], **kw):
    answer, reasoning = answer_span_mask(torch.tensor(ids), torch.tensor(mask), **kw)
    return answer.tolist(), reasoning.tolist()


# ------------------------------------------------------------------------------ spans


def test_marker_present_splits_reasoning_and_answer_marker_in_neither():
    ids = [[5, 6, 7, 1, 2, 8, 9, 0, 0]]
    mask = [[T, T, T, T, T, T, T, F, F]]
    answer, reasoning = _masks(ids, mask, marker_ids=MARKER)
    assert reasoning == [[T, T, T, F, F, F, F, F, F]]
    assert answer == [[F, F, F, F, F, T, T, F, F]]


def test_last_marker_occurrence_wins():
    ids = [[1, 2, 5, 1, 2, 9, 0]]
    mask = [[T, T, T, T, T, T, F]]
    answer, reasoning = _masks(ids, mask, marker_ids=MARKER)
    assert reasoning == [[T, T, T, F, F, F, F]]  # the first marker is part of the reasoning
    assert answer == [[F, F, F, F, F, T, F]]


def test_marker_alternatives_and_overlapping_variants():
    # Variant [4, 1, 2] ends where [1, 2] ends; the longer one is excluded whole.
    ids = [[5, 4, 1, 2, 8], [5, 7, 3, 8, 9]]
    mask = [[T] * 5, [T] * 5]
    answer, reasoning = _masks(ids, mask, marker_ids=[[1, 2], [4, 1, 2], [7, 3]])
    assert reasoning == [[T, F, F, F, F], [T, F, F, F, F]]
    assert answer == [[F, F, F, F, T], [F, F, F, T, T]]


def test_marker_at_end_gives_empty_answer_and_invalid_candidate():
    ids = [[5, 6, 1, 2, 0]]
    mask = [[T, T, T, T, F]]
    answer, reasoning = answer_span_mask(torch.tensor(ids), torch.tensor(mask), MARKER)
    assert reasoning.tolist() == [[T, T, F, F, F]]
    assert not answer.any()
    parts = entropy_scores(torch.ones(1, 5), answer, reasoning, top_m=1, lam=1.0)
    assert parts.valid.tolist() == [False]
    assert parts.score.tolist() == [0.0]


@pytest.mark.parametrize(
    "length, fraction, n_answer",
    [(10, 0.2, 2), (3, 0.2, 1), (1, 0.2, 1), (2, 0.2, 1), (5, 1.0, 5), (50, 0.14, 7), (51, 0.14, 8)],
)
def test_marker_absent_uses_final_fraction(length: int, fraction: float, n_answer: int):
    # 0.14 * 50 = 7.000000000000001 in floating point: 7 tokens, not 8.
    pad = 3
    ids = [[10 + i for i in range(length)] + [0] * pad]
    mask = [[T] * length + [F] * pad]
    answer, reasoning = _masks(ids, mask, marker_ids=MARKER, final_fraction=fraction)
    expected_answer = [F] * (length - n_answer) + [T] * n_answer + [F] * pad
    expected_reasoning = [T] * (length - n_answer) + [F] * n_answer + [F] * pad
    assert answer == [expected_answer]
    assert reasoning == [expected_reasoning]


def test_no_marker_given_uses_fraction():
    for marker in (None, []):
        answer, reasoning = _masks([[3, 1, 2, 4, 5]], [[T] * 5], marker_ids=marker, final_fraction=0.4)
        assert answer == [[F, F, F, T, T]]
        assert reasoning == [[T, T, T, F, F]]


def test_left_padded_response_positions():
    ids = [[0, 0, 5, 6, 1, 2, 7, 8]]
    mask = [[F, F, T, T, T, T, T, T]]
    answer, reasoning = _masks(ids, mask, marker_ids=MARKER)
    assert reasoning == [[F, F, T, T, F, F, F, F]]
    assert answer == [[F, F, F, F, F, F, T, T]]


def test_eos_and_everything_after_it_excluded_defensively():
    eos = 3
    # The caller's mask wrongly covers EOS and the pad (= EOS) after it.
    ids = [[5, 1, 2, 9, eos, eos], [5, 6, 7, 8, 9, eos]]
    mask = [[T] * 6, [T] * 6]
    answer, reasoning = _masks(ids, mask, marker_ids=MARKER, eos_id=eos, final_fraction=0.2)
    assert answer == [[F, F, F, T, F, F], [F, F, F, F, T, F]]  # row 2: L = 5, ceil(1.0) = 1
    assert reasoning == [[T, F, F, F, F, F], [T, T, T, T, F, F]]


def test_empty_response_gives_empty_spans_and_no_nan():
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[F, F, F, F], [T, T, F, F]])
    answer, reasoning = answer_span_mask(ids, mask, MARKER)
    assert not answer[0].any() and not reasoning[0].any()
    ent = torch.tensor([[float("nan")] * 4, [1.0, 2.0, float("nan"), float("inf")]])
    parts = entropy_scores(ent, answer, reasoning, top_m=0.1, lam=1.0)
    assert parts.valid.tolist() == [False, True]
    for field in (parts.score, parts.h_final, parts.fork):
        assert torch.isfinite(field).all()
    assert parts.score[0].item() == 0.0


def test_span_argument_errors():
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="final_fraction"):
        answer_span_mask(ids, torch.ones(1, 3, dtype=torch.bool), MARKER, final_fraction=0.0)
    with pytest.raises(TypeError, match="bool"):
        answer_span_mask(ids, torch.ones(1, 3), MARKER)
    with pytest.raises(ValueError, match="same shape"):
        answer_span_mask(ids, torch.ones(1, 4, dtype=torch.bool), MARKER)
    with pytest.raises(TypeError, match="marker_ids"):
        answer_span_mask(ids, torch.ones(1, 3, dtype=torch.bool), [[1, 2], []])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.lists(st.integers(0, 4), min_size=0, max_size=12), st.integers(0, 3)),
        min_size=1,
        max_size=4,
    ),
    fraction=st.floats(0.05, 1.0),
)
def test_spans_partition_response_minus_marker(rows, fraction):
    """Both spans lie in the mask, are disjoint, reasoning precedes answer, and without a
    marker they cover the response exactly."""
    width = 16
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (toks, offset) in enumerate(rows):
        ids[i, offset:offset + len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, offset:offset + len(toks)] = True
    answer, reasoning = answer_span_mask(ids, mask, MARKER, final_fraction=fraction)
    assert not (answer & reasoning).any()
    assert not (answer & ~mask).any() and not (reasoning & ~mask).any()
    for i, (toks, _) in enumerate(rows):
        a_pos = answer[i].nonzero().flatten().tolist()
        r_pos = reasoning[i].nonzero().flatten().tolist()
        if a_pos and r_pos:
            assert max(r_pos) < min(a_pos)
        has_marker = any(toks[j:j + 2] == MARKER for j in range(len(toks) - 1))
        if not has_marker:
            assert len(a_pos) + len(r_pos) == len(toks)
            if toks:
                assert len(a_pos) == max(1, math.ceil(fraction * len(toks) - 1e-9))
        else:
            assert len(a_pos) + len(r_pos) == len(toks) - 2


# ------------------------------------------------------------------------------ Eq. 1


def _one_row():
    # positions: 0-3 reasoning, 4 marker, 5-6 answer, 7 padding (NaN must not leak)
    ent = torch.tensor([[0.5, 2.0, 1.0, 3.0, 9.9, 0.2, 0.4, float("nan")]])
    reasoning = torch.tensor([[T, T, T, T, F, F, F, F]])
    answer = torch.tensor([[F, F, F, F, F, T, T, F]])
    return ent, answer, reasoning


@pytest.mark.parametrize(
    "top_m, fork",
    [
        (0.5, (3.0 + 2.0) / 2),  # ceil(0.5 * 4) = 2
        (2, (3.0 + 2.0) / 2),  # count
        (0.1, 3.0),  # ceil(0.4) = 1
        (1, 3.0),
        (10, (3.0 + 2.0 + 1.0 + 0.5) / 4),  # count capped at R = 4
        (0.99, (3.0 + 2.0 + 1.0 + 0.5) / 4),  # ceil(3.96) = 4
    ],
)
def test_entropy_score_hand_computed(top_m: float, fork: float):
    ent, answer, reasoning = _one_row()
    parts = entropy_scores(ent, answer, reasoning, top_m=top_m, lam=0.4)
    h_final = (0.2 + 0.4) / 2
    assert parts.h_final.item() == pytest.approx(h_final, abs=1e-7)
    assert parts.fork.item() == pytest.approx(fork, abs=1e-7)
    assert parts.score.item() == pytest.approx(-h_final + 0.4 * fork, abs=1e-7)
    assert parts.valid.tolist() == [True]
    assert parts.score.dtype == torch.float64


def test_top_m_fraction_rounding_and_batch_of_rows():
    # Row 0: R = 50 entropies 1..50, top_m 0.14 -> m = 7 (0.14 * 50 = 7.000000000000001),
    # top-7 mean = (50 + ... + 44) / 7 = 47. Row 1: R = 3 -> m = ceil(0.42) = 1 -> fork 6.
    width = 52
    ent = torch.zeros(2, width, dtype=torch.float64)
    ent[0, :50] = torch.arange(1, 51, dtype=torch.float64)
    ent[0, 50:] = torch.tensor([0.25, 0.75])
    ent[1, :4] = torch.tensor([4.0, 6.0, 5.0, 2.0])
    reasoning = torch.zeros(2, width, dtype=torch.bool)
    answer = torch.zeros(2, width, dtype=torch.bool)
    reasoning[0, :50] = True
    answer[0, 50:] = True
    reasoning[1, :3] = True
    answer[1, 3] = True
    parts = entropy_scores(ent, answer, reasoning, top_m=0.14, lam=1.0)
    assert parts.fork.tolist() == pytest.approx([47.0, 6.0])
    assert parts.h_final.tolist() == pytest.approx([0.5, 2.0])
    assert parts.score.tolist() == pytest.approx([-0.5 + 47.0, -2.0 + 6.0])


def test_empty_reasoning_span_fork_is_zero():
    ent = torch.tensor([[0.3, 0.9, 7.0]])
    answer = torch.tensor([[T, T, F]])
    reasoning = torch.zeros(1, 3, dtype=torch.bool)
    parts = entropy_scores(ent, answer, reasoning, top_m=0.1, lam=1.0)
    assert parts.fork.item() == 0.0
    assert parts.score.item() == pytest.approx(-0.6)


def test_scoring_matches_float64_loop_reference():
    torch.manual_seed(0)
    n, width = 6, 20
    ent = torch.rand(n, width) * 5
    lengths = [0, 1, 5, 12, 20, 17]
    ids = torch.randint(3, 9, (n, width))
    ids[3, 6:8] = torch.tensor(MARKER)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    answer, reasoning = answer_span_mask(ids, mask, MARKER, final_fraction=0.2)
    parts = entropy_scores(ent, answer, reasoning, top_m=0.3, lam=0.7)
    for i in range(n):
        a = [float(ent[i, t]) for t in range(width) if answer[i, t]]
        r = sorted((float(ent[i, t]) for t in range(width) if reasoning[i, t]), reverse=True)
        if not a:
            assert not parts.valid[i] and parts.score[i] == 0.0
            continue
        m = min(max(math.ceil(0.3 * len(r) - 1e-9), 1), len(r))
        fork = sum(r[:m]) / m if m else 0.0
        assert parts.score[i].item() == pytest.approx(-sum(a) / len(a) + 0.7 * fork, rel=1e-6)
    # Row 3: marker at 6-7, reasoning 0-5, answer 8-11.
    assert reasoning[3].nonzero().flatten().tolist() == list(range(6))
    assert answer[3].nonzero().flatten().tolist() == [8, 9, 10, 11]


def test_entropy_score_argument_errors():
    ent, answer, reasoning = _one_row()
    for bad in (0, -1, 2.5, float("nan")):
        with pytest.raises(ValueError, match="top_m"):
            entropy_scores(ent, answer, reasoning, top_m=bad, lam=1.0)
    with pytest.raises(ValueError, match="overlap"):
        entropy_scores(ent, answer, answer | reasoning, top_m=0.1, lam=1.0)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        entropy_scores(ent[:, :4], answer, reasoning, top_m=0.1, lam=1.0)
