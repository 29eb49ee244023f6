"""The sampler's pure parts in one process: parameters, batch planning, per-row stopping and
masks, rollout concatenation. The model-driven checks are in tests/distributed/test_sampler.py."""

from __future__ import annotations

import pytest
import torch

from megatron_sega.sampling import Rollout, Sampler, SamplerMemoryError, SamplingParams
from megatron_sega.sampling.sampler import _DecodeState, _select

PAD = 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_sampling_params_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def _planner(max_batch_tokens: int = 0, budget: int | None = None, bucket: bool = False,
             kv_bytes_per_token: int = 1000) -> Sampler:
    """A Sampler with only what planning reads (no model, no process group)."""
    sampler = object.__new__(Sampler)
    sampler.max_batch_tokens = max_batch_tokens
    sampler.memory_budget_bytes = budget
    sampler.bucket_by_length = bucket
    sampler.kv_bytes_per_token = kv_bytes_per_token
    sampler.hidden_size = 8
    sampler.dtype = torch.float32
    sampler.rt = None  # no model-parallel group to agree the budget with
    return sampler


def test_plan_splits_longest_first_within_the_token_budget():
    lengths = [3, 9, 1, 5, 7]
    plan = _planner(max_batch_tokens=2 * (9 + 4))._plan(lengths, 4)
    assert plan == [[1, 4], [3, 0], [2]]
    assert _planner(max_batch_tokens=1000)._plan(lengths, 4) == [[1, 4, 3, 0, 2]]
    # Equal lengths only, when bucketing (attention backends that ignore the padding mask).
    assert _planner(max_batch_tokens=1000, bucket=True)._plan([2, 3, 2, 3], 4) == \
        [[1, 3], [0, 2]]


def test_plan_uses_the_memory_budget():
    per_token = 1000 + 8 * 8 * 4  # KV cache + prefill activations
    sampler = _planner(budget=3 * 10 * per_token)
    assert sampler.max_rows(10) == 3
    assert sampler._plan([6, 6, 6, 6], 4) == [[0, 1, 2], [3]]


@pytest.mark.parametrize("sampler", [_planner(max_batch_tokens=12), _planner(budget=5000)])
def test_a_row_that_cannot_fit_is_refused(sampler):
    with pytest.raises(SamplerMemoryError, match=r"9 prompt \+ 4 new tokens needs .* MiB") as err:
        sampler._plan([2, 9], 4)
    assert "max_new_tokens" in str(err.value)


def _run(state: _DecodeState, steps: list[list[int]], rows=None) -> Rollout:
    """Drive the state as the decode loop does: the host catches up one step late."""
    for step, tokens in enumerate(steps):
        active = torch.arange(len(tokens)) if rows is None else rows[step]
        state.catch_up()
        state.stats[:, active, step] = torch.tensor(
            [[-1.0 - step] * len(tokens), [-2.0] * len(tokens), [0.5] * len(tokens)])
        state.advance(active, step, torch.tensor(tokens))
    state.catch_up()
    return state.to_rollout([[7]] * len(state.lengths), PAD, lambda t: t)


def test_stop_tokens_lengths_and_masks():
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(2, 9))
    # row 0 stops on its first token (an empty response), row 1 at step 2, row 2 never.
    rollout = _run(_DecodeState(3, params, [5, 6, 7], "cpu"),
                   [[2, 4, 4], [3, 5, 4], [3, 9, 4], [3, 3, 4]])
    assert rollout.lengths.tolist() == [1, 3, 4]
    assert rollout.finish_reason == ["stop", "stop", "length"]
    assert rollout.response_ids.tolist() == [[2, PAD, PAD, PAD], [4, 5, 9, PAD], [4, 4, 4, 4]]
    assert rollout.response_mask.sum(1).tolist() == [1, 3, 4]
    assert rollout.content_mask.tolist() == [[False] * 4, [True, True, False, False],
                                             [True] * 4]
    # Statistics of finished rows' later steps are masked out.
    assert rollout.logp.tolist() == [[-1, 0, 0, 0], [-1, -2, -3, 0], [-1, -2, -3, -4]]
    assert rollout.entropy.sum().item() == 0.5 * 8
    assert rollout.sample_ids.tolist() == [5, 6, 7]


def test_stop_strings_see_the_text_so_far():
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(2,), stop_strings=("ab",))
    text = {3: "a", 4: "b", 5: "x", 2: "</s>"}
    decode = lambda ids: "".join(text[i] for i in ids)  # noqa: E731
    rollout = _run(_DecodeState(3, params, [0, 1, 2], "cpu", decode),
                   [[3, 5, 3], [4, 3, 2], [5, 4, 5]])
    assert rollout.finish_reason == ["stop_string", "stop_string", "stop"]
    assert rollout.lengths.tolist() == [2, 3, 2]
    # A stop string is content; a stop token is not.
    assert rollout.content_mask.sum(1).tolist() == [2, 3, 1]


def test_compacted_rows_keep_their_positions():
    """After compaction only some batch rows are written; the others keep their outputs."""
    params = SamplingParams(max_new_tokens=3, stop_token_ids=(2,))
    all_rows, kept = torch.arange(3), torch.tensor([1, 2])
    rollout = _run(_DecodeState(3, params, [0, 1, 2], "cpu"), [[2, 4, 5], [4, 5], [6, 2]],
                   rows=[all_rows, kept, kept])
    assert rollout.response_ids.tolist() == [[2, PAD, PAD], [4, 4, 6], [5, 5, 2]]
    assert rollout.finish_reason == ["stop", "length", "stop"]


def test_concat_pads_and_select_reorders():
    params = SamplingParams(max_new_tokens=3)
    a = _run(_DecodeState(1, params, [0], "cpu"), [[4], [5], [6]])
    b = _run(_DecodeState(2, SamplingParams(max_new_tokens=1), [1, 2], "cpu"), [[7, 8]])
    merged = Rollout.concat([a, b], PAD)
    assert merged.response_ids.tolist() == [[4, 5, 6], [7, PAD, PAD], [8, PAD, PAD]]
    assert merged.response_mask.sum(1).tolist() == [3, 1, 1]
    back = _select(merged, torch.tensor([2, 0, 1]))
    assert back.sample_ids.tolist() == [2, 0, 1]
    assert back.response_ids[1].tolist() == [4, 5, 6]


def test_cuda_budget_counts_the_allocators_reserved_but_free_memory(monkeypatch):
    """The KV budget on CUDA: the device's free bytes plus what the caching allocator holds
    reserved but unallocated (``mem_get_info`` alone misses it), never less than the free bytes."""
    import torch

    from megatron_sega.sampling import sampler

    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * gib)
    assert sampler._available_memory(torch.device("cuda", 0)) == 9 * gib
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    assert sampler._available_memory(torch.device("cuda", 0)) == 3 * gib
