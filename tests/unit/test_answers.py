"""Answer accuracy's pure parts (training/answers.py, training/stats.py): final-answer extraction
and normalisation on hand-written cases, the intervals against scipy and statsmodels, and the
ranking figures and summary on hand-made groups."""

from __future__ import annotations

import json
import math

import pytest

from megatron_sega.data import read_pairs
from megatron_sega.training.answers import (
    extract_final_answer, normalize_answer, ranking_figures, reference_answer, summarize_answers,
)
from megatron_sega.training.stats import mean_interval, student_t_quantile, wilson_interval

MARKER = "Final Answer:"


@pytest.mark.parametrize("text, expected", [
    ("12 + 7 = 19.\nFinal Answer: 19", "19"),
    ("Final Answer: 3\nwait.\nFinal Answer: 4", "4"),  # the last marker
    ("final answer: Noah", "Noah"),  # case-insensitive marker
    ("**Final Answer:** 405 minutes\nThat is all.", "** 405 minutes"),  # up to the line's end
    ("Final Answer:\n\n  even  \nmore", "even"),  # marker ending its line: the next line
    ("The answer is 19.", None),  # no marker
    ("Step 1.\nFinal Answer:   ", None),  # nothing after it
    ("", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text, MARKER) == expected


@pytest.mark.parametrize("raw, expected", [
    ("1,000", "1000"), ("1000.0", "1000"), ("$1000", "1000"), ("$1,000.00", "1000"),
    ("1000.", "1000"), ("1000", "1000"), ("-3.50", "-3.5"), ("0.0", "0"), ("-0", "0"),
    (".5", "0.5"), ("+7", "7"), ("\\boxed{42}", "42"), ("**42**", "42"), ("`42`.", "42"),
    ("  Wednesday. ", "wednesday"), ("NEW   York!", "new york"), ('"tac"', "tac"),
    ("even?!", "even"), ("12,34", "12,34"),  # not a thousands grouping: kept as text
    ("1,0000", "1,0000"), ("3/4", "3/4"), ("405 minutes", "405 minutes"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_equal_answers_normalise_equal_and_different_ones_do_not():
    same = ["1,000", "1000.0", "$1000", "1000", " 1000. ", "**1,000**"]
    assert len({normalize_answer(s) for s in same}) == 1
    assert normalize_answer("100") != normalize_answer("1000")
    assert normalize_answer("Noah") == normalize_answer("noah.")
    assert normalize_answer("Noah") != normalize_answer("Noa")


def test_reference_from_the_answer_field_else_the_chosen_marker(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"id": "a", "prompt": "q", "chosen": "x\nFinal Answer: 5", "rejected": "y"},
            {"id": "b", "prompt": "q", "chosen": "Final Answer: 5", "rejected": "y",
             "answer": 1000},
            {"id": "c", "prompt": "q", "chosen": "no marker", "rejected": "y"},
            {"id": "d", "prompt": "q", "chosen": "no marker", "rejected": "y", "answer": "six"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = read_pairs(path)
    assert [reference_answer(p, MARKER) for p in pairs] == ["5", "1000", None, "six"]
    assert reference_answer(pairs[0], "") is None


def test_an_answer_that_is_no_string_or_number_is_a_bad_record(tmp_path):
    from megatron_sega.data import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "c", "rejected": "r",
                                "answer": [1]}) + "\n")
    with pytest.raises(DataError, match="field 'answer' must be a string or a number"):
        read_pairs(path)


# ------------------------------------------------------------------ intervals

@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 31, 63, 64, 199, 1000])
def test_t_quantile_equals_scipy(df):
    from scipy import stats

    assert student_t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


@pytest.mark.parametrize("values", [
    [0.0, 0.5, 1.0], [0.25, 0.75, 0.5, 0.5, 1.0, 0.0, 0.25],
    [i / 4 for i in (0, 1, 1, 2, 4, 3, 0, 0, 1, 2, 2, 4, 4, 1, 0, 3)] * 4,
])
def test_mean_interval_equals_scipy_and_statsmodels(values):
    import numpy as np
    from scipy import stats
    from statsmodels.stats.weightstats import DescrStatsW

    lo, hi = mean_interval(values)
    x = np.asarray(values)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (lo, hi) == pytest.approx(ref, abs=1e-10)
    assert (lo, hi) == pytest.approx(DescrStatsW(x).tconfint_mean(alpha=0.05), abs=1e-10)


def test_mean_interval_needs_two_values():
    assert all(math.isnan(v) for v in mean_interval([0.5]))


def _candidate(correct: bool, score: float, h_final: float, fork: float, valid: bool = True,
               answer: str | None = "x") -> dict:
    return {"correct": correct, "score": score, "h_final": h_final, "fork_entropy": fork,
            "valid": valid, "answer": answer}


def test_ranking_figures_on_hand_made_groups():
    # score = -h_final + 1.0 * fork in each candidate.
    groups = [
        # mixed: top score (1.5) right; top -H_final (h 0.1) wrong; top fork (2.0) right.
        [_candidate(True, 1.5, 0.5, 2.0), _candidate(False, 0.8, 0.1, 0.9),
         _candidate(False, -0.2, 1.2, 1.0)],
        # mixed: top score wrong; top -H_final right; top fork wrong.
        [_candidate(False, 2.0, 0.5, 2.5), _candidate(True, 1.0, 0.2, 1.2)],
        # mixed, with a tie for the top score between a right and a wrong one: half a hit;
        # the top-scored invalid candidate does not count.
        [_candidate(True, 1.0, 0.3, 1.3), _candidate(False, 1.0, 0.4, 1.4),
         _candidate(True, 9.0, 0.0, 9.0, valid=False)],
        # all right, all wrong, and right only among the invalid: not mixed.
        [_candidate(True, 1.0, 0.3, 1.3), _candidate(True, 0.0, 0.3, 0.3)],
        [_candidate(False, 1.0, 0.3, 1.3), _candidate(False, 0.0, 0.3, 0.3)],
        [_candidate(False, 1.0, 0.3, 1.3), _candidate(True, 0.0, 0.3, 0.3, valid=False)],
    ]
    r = ranking_figures(groups)
    assert r["groups"] == 6 and r["groups_mixed"] == 3
    assert r["eq1_top_right"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert r["neg_h_final_top_right"] == pytest.approx((0 + 1 + 1) / 3)
    assert r["fork_top_right"] == pytest.approx((1 + 0 + 0) / 3)
    assert r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert r["eq1_top_right_ci95"] == pytest.approx(list(wilson_interval(1.5, 3)))


def test_ranking_without_mixed_groups_has_no_figures():
    r = ranking_figures([[_candidate(True, 1.0, 0.1, 1.1)], [_candidate(False, 1.0, 0.1, 1.1)]])
    assert r == {"groups": 2, "groups_mixed": 0}


def test_summary_on_hand_made_records():
    from scipy import stats
    from statsmodels.stats.proportion import proportion_confint

    def record(greedy: bool, right: list[bool], no_answer: int = 0) -> dict:
        samples = [_candidate(c, 1.0 if c else 0.0, 0.5, 1.5 if c else 0.5) for c in right]
        for c in samples[:no_answer]:
            c["answer"] = None
        return {"greedy": _candidate(greedy, 0.2, 0.3, 0.5),
                "samples": samples, "sample_accuracy": sum(right) / len(right)}

    records = [record(True, [True, False]), record(False, [False, False], no_answer=2),
               record(True, [True, True]), record(False, [True, False], no_answer=1),
               record(False, [False, False])]
    s = summarize_answers(records)
    assert s["prompts"] == 5 and s["samples_per_prompt"] == 2
    assert s["greedy_accuracy"] == pytest.approx(2 / 5)
    assert s["greedy_accuracy_ci95"] == pytest.approx(
        list(proportion_confint(2, 5, alpha=0.05, method="wilson")), abs=1e-12)
    fractions = [0.5, 0.0, 1.0, 0.5, 0.0]
    assert s["sampled_accuracy"] == pytest.approx(0.4)
    ref = stats.t.interval(0.95, 4, loc=0.4, scale=stats.sem(fractions))
    assert s["sampled_accuracy_ci95"] == pytest.approx(list(ref), abs=1e-10)
    assert s["any_sample_right"] == pytest.approx(3 / 5)
    assert s["sampled_no_answer_fraction"] == pytest.approx(3 / 10)
    assert s["greedy_no_answer_fraction"] == 0
    assert s["sampled_scores"]["score_mean_right"] == 1.0
    assert s["sampled_scores"]["score_mean_wrong"] == 0.0
    assert s["sampled_scores"]["score_mean"] == pytest.approx(0.4)
    assert s["ranking"]["groups_mixed"] == 2 and s["ranking"]["eq1_top_right"] == 1.0


def test_the_answer_field_is_read_from_parquet_and_hh_records_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["c"], "rejected": ["r"],
                             "answer": ["42"]}), tmp_path / "x.parquet")
    (tmp_path / "hh.jsonl").write_text(json.dumps({
        "chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b",
        "answer": 7}) + "\n")
    assert read_pairs(tmp_path / "x.parquet")[0][0].answer == "42"
    assert read_pairs(tmp_path / "hh.jsonl")[0][0].answer == "7"


def test_answer_samples_without_a_marker_and_eval_interval_without_eval_data_are_refused():
    from megatron_sega.config import ConfigError, check_stages, load_config

    config = load_config(None, ["eval.answer_samples=2", "scoring.marker="])
    with pytest.raises(ConfigError, match="eval.answer_samples = 2 finds each final answer "
                                          "after scoring.marker, which is empty"):
        check_stages(config, 1, ("eval",))
    check_stages(config, 1, ("sft",))  # no stage of these answers
    with pytest.raises(ConfigError, match="sega.eval_interval = 3 evaluates on data.eval"):
        check_stages(load_config(None, ["sega.eval_interval=3"]), 1, ("sega",))
    with pytest.raises(ConfigError, match="eval.answer_samples must be >= 0"):
        load_config(None, ["eval.answer_samples=-1"])
