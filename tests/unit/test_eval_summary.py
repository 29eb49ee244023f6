"""Preference accuracy from per-pair log-probs, against values computed by hand: summed,
length-normalised (mean per scored token) and against a reference (beta * (logp - logp_ref))
each pick a different winner on some pair. (The log-probs themselves are checked against
transformers in tests/distributed/test_sft_eval.py.)"""

from __future__ import annotations

import pytest

from megatron_sega.training.evaluate import summarize


def _record(i, lc, lr, nc, nr, rc, rr):
    return {"id": str(i), "logp_chosen": lc, "logp_rejected": lr, "n_tokens_chosen": nc,
            "n_tokens_rejected": nr, "ref_logp_chosen": rc, "ref_logp_rejected": rr}


RECORDS = [
    # summed: -10 < -6 (wrong); per token: -1.0 > -2.0 (right); vs ref: 4 > -1 (right)
    _record(0, -10.0, -6.0, 10, 3, -14.0, -5.0),
    # summed: -4 > -5 (right); per token: -2.0 < -0.5 (wrong); vs ref: -3 < 1 (wrong)
    _record(1, -4.0, -5.0, 2, 10, -1.0, -6.0),
    # a tie (wrong for the summed and per-token rules); vs ref: 1 > -1 (right)
    _record(2, -3.0, -3.0, 3, 3, -4.0, -2.0),
]


def test_accuracies_against_hand_computed_values():
    s = summarize(RECORDS, beta=0.1)
    assert s["pairs"] == 3 and s["ties"] == 1
    assert s["accuracy"] == pytest.approx(1 / 3)
    assert s["accuracy_length_normalized"] == pytest.approx(1 / 3)
    assert s["accuracy_vs_reference"] == pytest.approx(2 / 3)
    assert s["mean_reward_margin"] == pytest.approx(0.1 * (-4.0 + 1.0 + 0.0) / 3)
    assert s["mean_logp_chosen"] == pytest.approx(-17 / 3)


def test_without_a_reference_there_is_no_reference_accuracy():
    plain = [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in RECORDS]
    assert "accuracy_vs_reference" not in summarize(plain, beta=0.1)
    assert summarize([], beta=0.1) == {"pairs": 0}


def test_the_demo_table_shows_each_accuracy_with_its_interval():
    from megatron_sega.demo import summary_table
    from megatron_sega.training.stats import wilson_interval

    s = summarize(RECORDS, beta=0.1)
    s.update(entropy_score=1.0, eval_time_s=3.0)
    table = summary_table({"after SFT": s})
    low, high = wilson_interval(1, 3)
    assert "| preference accuracy [95% CI] | length-normalised [95% CI] |" in table
    assert f"| after SFT | 0.333 [{low:.3f}, {high:.3f}] | 0.333 [{low:.3f}, {high:.3f}] |" in table
