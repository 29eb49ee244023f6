"""Score -> reward -> filters -> advantage, against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sega.sega import advantages, rewards, top_bottom_pairs, trim_outliers

T, F = True, False


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _b(rows: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ------------------------------------------------------------------------------ rewards


def test_identity_rewards_zero_invalid():
    r = rewards(_t([[1.5, -2.0, 7.0]]), _b([[T, T, F]]), "identity")
    assert r.tolist() == [[1.5, -2.0, 0.0]]


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_softmax_rewards_over_valid_members(tau: float):
    r = rewards(_t([[1.0, 2.0, 3.0, 100.0], [0.0, 0.0, 0.0, 0.0]]), _b([[T, T, T, F], [F, F, F, F]]),
                "softmax", tau=tau)
    e = [math.exp(1.0 / tau), math.exp(2.0 / tau), math.exp(3.0 / tau)]
    assert r[0].tolist() == pytest.approx([e[0] / sum(e), e[1] / sum(e), e[2] / sum(e), 0.0])
    assert r[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # no valid member: zeros, not NaN


def test_reward_errors():
    with pytest.raises(ValueError, match="tau"):
        rewards(_t([[1.0]]), _b([[T]]), "softmax", tau=0.0)
    with pytest.raises(ValueError, match="identity"):
        rewards(_t([[1.0]]), _b([[T]]), "rank")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[G, k\]"):
        rewards(torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.bool))


# ------------------------------------------------------------------------------ advantages


def test_advantages_group_mean_baseline():
    r = _t([[1.0, 2.0, 3.0, 6.0], [1.0, 100.0, 3.0, 5.0]])
    valid = _b([[T, T, T, T], [T, F, T, T]])
    adv, used = advantages(r, valid)
    assert adv.tolist() == [[-2.0, -1.0, 0.0, 3.0], [-2.0, 0.0, 0.0, 2.0]]
    assert used.tolist() == [True, True]


def test_advantages_std_normalisation():
    r = _t([[1.0, 2.0, 3.0, 6.0]])
    adv, _ = advantages(r, _b([[T] * 4]), normalize_std=True, eps=0.0)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # sample std, n - 1
    assert adv.tolist()[0] == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])
    adv_eps, _ = advantages(r, _b([[T] * 4]), normalize_std=True, eps=0.5)
    assert adv_eps.tolist()[0] == pytest.approx([-2 / (std + 0.5), -1 / (std + 0.5), 0.0, 3 / (std + 0.5)])


@pytest.mark.parametrize("normalize_std", [False, True])
def test_unusable_groups_get_zero_advantage_without_nan(normalize_std: bool):
    r = _t([[0.7, 0.7, 0.7, 0.7], [5.0, 1.0, 2.0, 3.0], [5.0, 1.0, 2.0, 3.0], [1.0, 3.0, 3.0, 9.0]])
    valid = _b([[T, T, T, T], [F, T, F, F], [F, F, F, F], [F, T, T, F]])
    adv, used = advantages(r, valid, normalize_std=normalize_std, eps=0.0)
    assert used.tolist() == [False, False, False, False]  # all equal / 1 valid / 0 valid / equal valid
    assert adv.tolist() == [[0.0] * 4] * 4


def test_advantages_float32_dtype_preserved():
    adv, used = advantages(torch.tensor([[1.0, 3.0]]), _b([[T, T]]))
    assert adv.dtype == torch.float32 and adv.tolist() == [[-1.0, 1.0]] and used.tolist() == [True]


# Multiples of 1/64: sums and shifts are exact in float64, so a shift can neither create nor
# remove a tie within a group, and which groups are used cannot change.
_GRID = st.integers(-3200, 3200).map(lambda i: i / 64)


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(_GRID, min_size=8, max_size=8),
    valid_bits=st.lists(st.booleans(), min_size=8, max_size=8),
    shift=st.integers(-640, 640).map(lambda i: i / 64),
    normalize_std=st.booleans(),
)
def test_advantage_properties(values, valid_bits, shift, normalize_std):
    """Advantages sum to zero in used groups, vanish on invalid members and are invariant to
    shifting every reward of a group by a constant."""
    r = _t([values[:4], values[4:]])
    valid = _b([valid_bits[:4], valid_bits[4:]])
    adv, used = advantages(r, valid, normalize_std=normalize_std)
    adv_shift, used_shift = advantages(r + shift, valid, normalize_std=normalize_std)
    assert torch.isfinite(adv).all()
    assert (adv[~valid] == 0).all()
    for g in range(2):
        if used[g]:
            assert adv[g].sum().item() == pytest.approx(0.0, abs=1e-9)
        else:
            assert (adv[g] == 0).all()
    assert used.equal(used_shift)
    assert torch.allclose(adv, adv_shift, atol=1e-6)


# ------------------------------------------------------------------------------ filters


def test_trim_zscore_drops_low_outlier():
    # mean 7.5, sample std sqrt((3 * 2.5^2 + 7.5^2) / 3) = 5, threshold 7.5 - 1 * 5 = 2.5
    values = _t([[10.0, 10.0, 10.0, 0.0]])
    assert trim_outliers(values, _b([[T] * 4]), "zscore", z=1.0).tolist() == [[T, T, T, F]]
    # z = 2: threshold -2.5, nothing dropped
    assert trim_outliers(values, _b([[T] * 4]), "zscore", z=2.0).tolist() == [[T, T, T, T]]


def test_trim_zscore_ignores_invalid_and_equal_groups():
    values = _t([[10.0, -1000.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]])
    valid = _b([[T, F, T, T], [T, T, T, T]])
    assert trim_outliers(values, valid, "zscore", z=0.0).tolist() == [[T, F, T, T], [T, T, T, T]]


def test_trim_lowest_fraction_and_min_keep():
    values = _t([[3.0, 1.0, 2.0, 4.0], [3.0, 1.0, 2.0, 4.0], [0.0, 9.0, 0.0, 0.0]])
    valid = _b([[T, T, T, T], [T, T, F, T], [T, T, T, F]])
    out = trim_outliers(values, valid, "lowest_fraction", fraction=0.5)
    # row 0: drop 2 lowest (1, 2); row 1: n=3, floor(1.5)=1 -> drop 1;
    # row 2: n=3, drop 1 of the tied zeros: the earlier one.
    assert out.tolist() == [[T, F, F, T], [T, F, F, T], [F, T, T, F]]
    # min_keep: a 2-member group is never trimmed further.
    two = trim_outliers(_t([[0.0, 1.0]]), _b([[T, T]]), "lowest_fraction", fraction=0.9)
    assert two.tolist() == [[T, T]]


def test_trim_errors():
    with pytest.raises(ValueError, match="method"):
        trim_outliers(_t([[1.0]]), _b([[T]]), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction"):
        trim_outliers(_t([[1.0]]), _b([[T]]), "lowest_fraction", fraction=1.0)


def test_top_bottom_pairs():
    values = _t([[3.0, 1.0, 2.0, 4.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 2.0, 1.0], [1.0, 7.0, 0.0, 0.0]])
    valid = _b([[T, T, T, T], [T, T, T, T], [F, T, T, T], [F, T, F, F]])
    out = top_bottom_pairs(values, valid)
    assert out.tolist() == [
        [F, T, F, T],  # best 4 (idx 3), worst 1 (idx 1)
        [T, F, F, T],  # all equal: first and last
        [F, F, T, T],  # invalid 5 ignored; best 2 (idx 2), worst last 1 (idx 3)
        [F, T, F, F],  # one valid member: unchanged
    ]
    adv, used = advantages(values, out)
    assert adv[0].tolist() == [0.0, -1.5, 0.0, 1.5]
    assert used.tolist() == [True, False, True, False]
