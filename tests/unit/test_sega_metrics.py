"""SEGA's logged statistics say what they measure, on a hand-built step (values by hand):
the advantage std over the candidates in the update (not an RMS over every row), an empty
response counted once, the trained sequence length (prompt + response), and the KL and clipped
fraction of the update, token-weighted over its microbatches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_sega.sampling import Rollout
from megatron_sega.training.rollouts import Scored
from megatron_sega.training.sega import _update_sums, rollout_batch, step_metrics, step_sums

T, F = True, False
EOS = 2


def _step():
    """Two groups of three; group 1 is skipped. Row 1 is empty (length 0); row 4 is only its
    stop token (no content). Prompts have 5 tokens; responses at most 4."""
    lengths = torch.tensor([3, 0, 2, 4, 1, 2])
    response = torch.tensor([[7, 8, EOS, 0], [0, 0, 0, 0], [9, 9, 0, 0],
                             [5, 6, 7, 8], [EOS, 0, 0, 0], [4, EOS, 0, 0]])
    mask = torch.arange(4)[None] < lengths[:, None]
    content = mask & (response != EOS)
    zeros = torch.zeros(6, 4)
    rollout = Rollout(prompt_ids=[[1, 3, 4, 5, 6]] * 6, response_ids=response,
                      response_mask=mask, content_mask=content, logp=zeros, logp_sampling=zeros,
                      entropy=zeros, lengths=lengths,
                      finish_reason=["stop", "stop", "length", "length", "stop", "stop"],
                      sample_ids=torch.arange(6))
    scored = Scored(score=torch.tensor([1.0, 0.0, 2.0, 3.0, 0.0, 3.0], dtype=torch.float64),
                    h_final=torch.zeros(6, dtype=torch.float64),
                    fork=torch.zeros(6, dtype=torch.float64),
                    valid=torch.tensor([T, F, T, T, F, T]),
                    advantage=torch.tensor([-0.5, 0.0, 0.5, 0.0, 0.0, 0.0]),
                    group_used=torch.tensor([T, F]),
                    reward=torch.tensor([1.0, 0.0, 2.0, 3.0, 0.0, 3.0], dtype=torch.float64))
    batch = rollout_batch(SimpleNamespace(tokenizer=SimpleNamespace(pad_id=0)), rollout)
    return rollout, scored, batch


def test_step_statistics_by_hand():
    rollout, scored, batch = _step()
    got = step_metrics(step_sums(rollout, scored, batch))
    # In the update: rows 0 and 2 (A = -0.5, +0.5): std 0.5; the old RMS over all six rows
    # was sqrt(0.5 / 6) = 0.289.
    assert got["advantage_std"] == pytest.approx(0.5)
    assert got["advantage_abs_mean"] == pytest.approx(0.5)
    assert got["empty_responses"] == 2  # rows 1 and 4 (row 1 was counted twice)
    assert got["seq_len"] == 9 == batch.tokens.shape[1]  # 5 + 4, not the response width 4
    assert got["score_mean"] == pytest.approx(9 / 4) and got["valid_fraction"] == 4 / 6
    assert got["groups_skipped_fraction"] == 0.5 and got["truncated_fraction"] == 2 / 6
    assert got["response_length_mean"] == 2.0
    assert (got["kl_mean"], got["clip_fraction"]) == (0.0, 0.0)  # no update logged yet


def test_kl_and_clip_fraction_are_token_weighted_over_microbatches():
    outputs = [{"num_tokens": torch.tensor(4.0), "kl_mean": torch.tensor(0.5),
                "clip_fraction": torch.tensor(0.25)},
               {"num_tokens": torch.tensor(2.0), "kl_mean": torch.tensor(0.2),
                "clip_fraction": torch.tensor(0.0)}]
    rollout, scored, batch = _step()
    got = step_metrics({**step_sums(rollout, scored, batch), **_update_sums(outputs)})
    assert got["kl_mean"] == pytest.approx((4 * 0.5 + 2 * 0.2) / 6)
    assert got["clip_fraction"] == pytest.approx(1 / 6)


def test_mfu_counts_prompt_plus_response_tokens_over_their_own_lengths(monkeypatch):
    """The step's MFU gets the attention span of the trained sequences (prompt + response:
    sum(L^2) / sum(L), not the padded width 9 nor the response width 4), every prompt + response
    token of each update, and the training time only; and ``mfu`` is training FLOPs per token x
    tokens / seconds / (peak x world size)."""
    from megatron_sega.logging import metrics
    from megatron_sega.models import preset
    from megatron_sega.training import sega

    calls = []
    monkeypatch.setattr(sega, "mfu", lambda *args: calls.append(args) or 0.5)
    monkeypatch.setattr(sega, "dp_sum", lambda sums, session: sums)
    rollout, scored, batch = _step()
    spec = preset("tiny")
    session = SimpleNamespace(spec=spec, runtime=SimpleNamespace(world_size=4))
    updates = [{"sums": {}}, {"sums": {}, "loss": 1.0, "grad_norm": 2.0, "lr": 1e-3}]
    timer = {"t0": 0.0, "sample": 3.0, "score": 3.5, "train": 5.5}
    got = sega._metrics(session, rollout, scored, batch, updates, timer)
    train_tokens = float(batch.lengths.sum())
    assert train_tokens > float(rollout.response_mask.sum())  # the prompts count too
    lengths = batch.lengths.tolist()
    span = sum(n * n for n in lengths) / sum(lengths)
    assert min(lengths) < span < max(lengths) <= 9, lengths  # rows of several lengths
    assert calls == [(spec, pytest.approx(span), 2 * train_tokens, 2.0, 4)]
    assert got["mfu"] == 0.5 and got["attention_span"] == pytest.approx(span)
    assert got["time_train"] == 2.0 and got["time_sample"] == 3.0

    monkeypatch.setattr(metrics, "gpu_peak_tflops", lambda: 989.0)
    per_token = metrics.training_flops_per_token(spec, 9)
    assert per_token > metrics.training_flops_per_token(spec, 4)  # attention grows with length
    assert metrics.mfu(spec, 9, 1000.0, 2.0, 4) == pytest.approx(
        per_token * 1000.0 / 2.0 / (989e12 * 4))
    monkeypatch.setattr(metrics, "gpu_peak_tflops", lambda: None)
    assert metrics.mfu(spec, 9, 1000.0, 2.0, 4) is None  # CPU: no peak to compare with
