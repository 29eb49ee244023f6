"""Overlong policy, deterministic resumable DP-sharded batches, and collation masks."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sega.data.batching import (
    GlobalBatchIterator,
    TokenizedExample,
    TokenizedPair,
    apply_overlong_policy,
    collate,
    collate_pairs,
    padded_length,
)
from megatron_sega.errors import CheckpointError

PAD = 0
BOS = 1


def _ex(i: int, prompt_len: int, response_len: int) -> TokenizedExample:
    prompt = [BOS] + [10 + k for k in range(prompt_len - 1)]
    return TokenizedExample(f"e{i}", prompt, [100 + k for k in range(response_len)])


# --------------------------------------------------------------------------------------------
# Overlong policy
# --------------------------------------------------------------------------------------------


def test_drop_counts_and_keeps_fitting(caplog: pytest.LogCaptureFixture) -> None:
    examples = [_ex(0, 4, 4), _ex(1, 6, 5), _ex(2, 2, 6)]
    with caplog.at_level(logging.WARNING):
        kept, report = apply_overlong_policy(examples, 8, "drop", bos_id=BOS)
    assert [e.id for e in kept] == ["e0", "e2"]
    assert (report.total, report.kept, report.truncated, report.dropped) == (3, 2, 0, 1)
    assert report.dropped_ids == ["e1"]
    assert "dropped 1 as too long" in caplog.text


def test_truncate_prompt_left_keeps_bos_and_prompt_end() -> None:
    ex = TokenizedExample("x", [BOS, 11, 12, 13, 14, 15], [100, 101, 102])
    (kept,), report = apply_overlong_policy([ex], 6, "truncate_prompt_left", bos_id=BOS)
    assert kept.prompt_ids == [BOS, 14, 15] and kept.response_ids == [100, 101, 102]
    assert report.truncated == 1 and report.dropped == 0
    (no_bos,), _ = apply_overlong_policy([ex], 6, "truncate_prompt_left", bos_id=None)
    assert no_bos.prompt_ids == [13, 14, 15]


def test_truncate_drops_when_response_leaves_no_room() -> None:
    ex = TokenizedExample("x", [BOS, 11, 12], [100, 101, 102, 103, 104])
    kept, report = apply_overlong_policy([ex], 6, "truncate_prompt_left", bos_id=BOS)
    assert kept == [] and report.dropped == 1  # would leave only BOS: no prompt token to condition on
    (kept1,), _ = apply_overlong_policy([ex], 7, "truncate_prompt_left", bos_id=BOS)
    assert kept1.prompt_ids == [BOS, 12]


def test_pairs_use_the_longer_response() -> None:
    pair = TokenizedPair("p", [BOS, 11, 12, 13], [100], [100, 101, 102])
    (kept,), report = apply_overlong_policy([pair], 6, "truncate_prompt_left", bos_id=BOS)
    assert kept.prompt_ids == [BOS, 12, 13] and kept.rejected_ids == [100, 101, 102]
    assert apply_overlong_policy([pair], 6, "drop")[1].dropped == 1


def test_overlong_bad_arguments() -> None:
    with pytest.raises(ValueError, match="overlong policy must be one of"):
        apply_overlong_policy([], 8, "truncate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_seq_len must be at least 2"):
        apply_overlong_policy([], 1, "drop")


# --------------------------------------------------------------------------------------------
# Global batches, DP shards, resume
# --------------------------------------------------------------------------------------------


def _take(it: GlobalBatchIterator, n: int) -> list[list[int]]:
    return [next(it) for _ in range(n)]


def test_epochs_are_permutations_and_deterministic() -> None:
    data = list(range(23))
    it = GlobalBatchIterator(data, 5, seed=3)
    assert it.batches_per_epoch == 4
    epoch0 = _take(it, 4)
    flat = [i for b in epoch0 for i in b]
    assert len(set(flat)) == 20 and set(flat) <= set(data)
    assert epoch0 == _take(GlobalBatchIterator(data, 5, seed=3), 4)
    assert epoch0 != _take(GlobalBatchIterator(data, 5, seed=4), 4)
    epoch1 = _take(it, 4)
    assert it.epoch == 1 and epoch1 != epoch0
    assert _take(GlobalBatchIterator(data, 5, shuffle=False), 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@given(
    n=st.integers(8, 60),
    dp_size=st.sampled_from([1, 2, 4]),
    per_rank=st.integers(1, 3),
    seed=st.integers(0, 10),
)
@settings(max_examples=40, deadline=None)
def test_dp_shards_are_disjoint_and_cover_the_global_batch(n: int, dp_size: int, per_rank: int, seed: int) -> None:
    gbs = dp_size * per_rank
    if n < gbs:
        return
    data = list(range(n))
    full = GlobalBatchIterator(data, gbs, seed=seed)
    ranks = [GlobalBatchIterator(data, gbs, dp_rank=r, dp_size=dp_size, seed=seed) for r in range(dp_size)]
    for _ in range(full.batches_per_epoch + 2):  # crosses an epoch boundary
        shards = [next(it) for it in ranks]
        assert all(len(s) == per_rank for s in shards)
        assert len({i for s in shards for i in s}) == gbs  # disjoint
        assert [i for s in shards for i in s] == next(full)  # and they cover the global batch


def test_state_dict_resume_continues_identically() -> None:
    data = [f"x{i}" for i in range(30)]
    reference = GlobalBatchIterator(data, 8, dp_rank=1, dp_size=2, seed=7)
    expected = _take(reference, 12)  # 3 batches per epoch: crosses several epochs

    it = GlobalBatchIterator(data, 8, dp_rank=1, dp_size=2, seed=7)
    head = _take(it, 5)
    state = it.state_dict()
    assert state["epoch"] == 1 and state["batch_index"] == 2
    resumed = GlobalBatchIterator(data, 8, dp_rank=1, dp_size=2, seed=7)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 7) == expected

    # At the end of an epoch, and restored at another DP size: the global batches are the same.
    it3 = GlobalBatchIterator(data, 8, seed=7)
    _take(it3, 3)
    single = GlobalBatchIterator(data, 8, seed=7)
    single.load_state_dict(it3.state_dict())
    assert [b[4:] for b in _take(single, 3)] == expected[3:6]


def test_load_state_dict_rejects_changed_settings() -> None:
    state = GlobalBatchIterator(list(range(20)), 4, seed=1).state_dict()
    # A user error (one line from the CLI), not a traceback.
    with pytest.raises(CheckpointError, match="saved num_examples=20 but this run has num_examples=21"):
        GlobalBatchIterator(list(range(21)), 4, seed=1).load_state_dict(state)
    with pytest.raises(CheckpointError, match="saved seed=1 but this run has seed=2"):
        GlobalBatchIterator(list(range(20)), 4, seed=2).load_state_dict(state)


def test_num_epochs_stops() -> None:
    it = GlobalBatchIterator(list(range(10)), 4, num_epochs=2)
    assert len(list(it)) == 4


def test_iterator_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) must be a positive multiple of the data-parallel size \(4\)"):
        GlobalBatchIterator(list(range(10)), 6, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchIterator(list(range(10)), 4, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchIterator(list(range(3)), 4)


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def test_collate_shapes_labels_and_mask() -> None:
    a = TokenizedExample("a", [BOS, 11, 12], [100, 101])
    b = TokenizedExample("b", [BOS, 11], [100, 101, 102, 103])
    batch = collate([a, b], PAD)
    assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == (2, 6)
    assert batch.tokens.tolist() == [[1, 11, 12, 100, 101, PAD], [1, 11, 100, 101, 102, 103]]
    assert batch.labels.tolist() == [[11, 12, 100, 101, PAD, PAD], [11, 100, 101, 102, 103, PAD]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]
    assert batch.loss_mask.dtype == torch.float32 and batch.tokens.dtype == torch.long
    assert batch.prompt_lengths.tolist() == [3, 2] and batch.lengths.tolist() == [5, 6]
    assert batch.ids == ["a", "b"] and batch.size == 2


@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=5),
    st.integers(1, 4),
)
@settings(max_examples=50, deadline=None)
def test_loss_mask_is_one_exactly_on_response_targets(shapes: list[tuple[int, int]], multiple: int) -> None:
    examples = [_ex(i, p, r) for i, (p, r) in enumerate(shapes)]
    batch = collate(examples, PAD, pad_to_multiple_of=multiple)
    assert batch.tokens.shape[1] % multiple == 0
    for b, ex in enumerate(examples):
        for t in range(batch.tokens.shape[1]):
            is_response_target = t + 1 < ex.length and t + 1 >= len(ex.prompt_ids)
            assert batch.loss_mask[b, t].item() == float(is_response_target)
            if is_response_target:
                assert batch.labels[b, t].item() == ex.response_ids[t + 1 - len(ex.prompt_ids)]
        assert batch.loss_mask[b].sum().item() == len(ex.response_ids)


def test_collate_pairs_share_length_and_concat() -> None:
    pair = TokenizedPair("p", [BOS, 11], [100], [100, 101, 102])
    other = TokenizedPair("q", [BOS, 11, 12], [100, 101], [100])
    batch = collate_pairs([pair, other], PAD)
    assert batch.chosen.tokens.shape == batch.rejected.tokens.shape == (2, 5)
    assert batch.chosen.loss_mask.sum(1).tolist() == [1, 2]
    assert batch.rejected.loss_mask.sum(1).tolist() == [3, 1]
    stacked = batch.concat()
    assert stacked.tokens.shape == (4, 5) and stacked.ids == ["p", "q", "p", "q"]
    assert torch.equal(stacked.tokens[2:], batch.rejected.tokens)
    assert batch.ids == ["p", "q"]


def test_padding_options() -> None:
    ex = _ex(0, 2, 3)
    assert collate([ex], PAD, pad_to=8).tokens.shape == (1, 8)
    assert padded_length(5, pad_to_multiple_of=4) == 8
    with pytest.raises(ValueError, match="more than pad_to=4"):
        collate([ex], PAD, pad_to=4)
    with pytest.raises(ValueError, match="empty"):
        collate([], PAD)
