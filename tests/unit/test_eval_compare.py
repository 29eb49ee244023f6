"""``megatron-sega compare EVAL_A EVAL_B``: the paired difference, its bootstrap interval and
McNemar's exact p-value (against statsmodels), and the errors for evaluations of different
pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats as scipy_stats
import statsmodels.stats.contingency_tables as contingency

from megatron_sega import cli
from megatron_sega.errors import DataError
from megatron_sega.training.answers import write_answers
from megatron_sega.training.compare import align, compare_answers, compare_records
from megatron_sega.training.evaluate import summarize, write_eval_outputs


def _records(outcomes, prefix="p"):
    """One record per outcome: 1 right (chosen wins), 0 wrong, 0.5 a tie."""
    logps = {1: (-1.0, -2.0), 0: (-2.0, -1.0), 0.5: (-1.5, -1.5)}
    return [{"id": f"{prefix}{i}", "logp_chosen": logps[o][0], "logp_rejected": logps[o][1],
             "n_tokens_chosen": 1, "n_tokens_rejected": 1} for i, o in enumerate(outcomes)]


# 64 pairs, as the real-model demo: both right on 48, both wrong on 8, A only 1, B only 7.
A = [1] * 48 + [0] * 8 + [1] * 1 + [0] * 7
B = [1] * 48 + [0] * 8 + [0] * 1 + [1] * 7


def _write(directory, records, beta=0.1):
    write_eval_outputs(directory, records, summarize(records, beta, bootstrap_samples=200))


def test_difference_interval_and_mcnemar_against_statsmodels():
    result = compare_records(_records(A), _records(B), beta_a=0.1, beta_b=0.1, ties="wrong",
                             samples=4000)
    r = result["accuracy"]
    assert r["accuracy_a"] == pytest.approx(49 / 64) and r["accuracy_b"] == pytest.approx(55 / 64)
    assert r["difference"] == pytest.approx(6 / 64)
    assert (r["only_a"], r["only_b"]) == (1, 7)
    expected = contingency.mcnemar([[48, 1], [7, 8]], exact=True).pvalue
    assert r["p_mcnemar"] == pytest.approx(expected) and r["p_mcnemar"] == pytest.approx(
        18 / 256)  # 2 * P[Bin(8, 1/2) <= 1] = 2 * 9 / 256
    low, high = r["ci95"]
    assert low < 6 / 64 < high
    # The pairs agree on 56 of 64: the paired interval spans about +-2 sd of the mean of the
    # per-pair differences, not of two independent accuracies.
    diffs = np.array(B, float) - np.array(A, float)
    sd = diffs.std() / np.sqrt(64)
    assert high - low == pytest.approx(2 * 1.96 * sd, rel=0.25)
    assert set(result) == {"accuracy", "accuracy_length_normalized"}


def test_ties_are_discordant_for_mcnemar_only_when_decided():
    a, b = _records([0.5, 1, 0]), _records([1, 0.5, 1])
    wrong = compare_records(a, b, beta_a=0.1, beta_b=0.1, ties="wrong", samples=200)["accuracy"]
    half = compare_records(a, b, beta_a=0.1, beta_b=0.1, ties="half", samples=200)["accuracy"]
    assert (wrong["only_a"], wrong["only_b"]) == (1, 2)  # a tie is wrong: (0,1) (1,0) (0,1)
    assert (half["only_a"], half["only_b"]) == (0, 1)  # only the third pair is decided twice
    assert half["difference"] == pytest.approx((0.5 - 0.5 + 1) / 3)


def test_pairs_are_matched_by_id_and_different_pairs_are_refused():
    a = _records([1, 0, 1])
    b = list(reversed(_records([1, 0, 0])))
    _, aligned = align(a, b, "A", "B")
    assert [r["id"] for r in aligned] == ["p0", "p1", "p2"]
    with pytest.raises(DataError, match=r"not evaluations of the same pairs: 1 id\(s\) only in "
                                        r"the first \['p2'\], 0 only in the second"):
        align(a, _records([1, 0]), "A", "B")
    with pytest.raises(DataError, match="'p0' occurs more than once"):
        align(a, a[:2] + a[:1], "A", "B")


def test_cli_prints_the_comparison_and_names_the_problem(tmp_path, capsys):
    _write(tmp_path / "a", _records(A))
    _write(tmp_path / "b", _records(B))
    out = tmp_path / "cmp.json"
    rc = cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out),
                   "eval.bootstrap_samples=500"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "B - A [paired bootstrap 95% CI]" in printed and "McNemar exact p" in printed
    assert "| accuracy | 64 | 0.766 [" in printed and "| +0.094 [" in printed
    assert "1 / 7 | 0.0703 |" in printed and "500 bootstrap samples" in printed
    assert json.loads(out.read_text())["accuracy"]["only_b"] == 7

    _write(tmp_path / "c", _records(B, prefix="q"))
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "compare: error:" in err and "not evaluations of the same pairs" in err
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "none")]) == 2
    assert "no pairs.jsonl" in capsys.readouterr().err


def _answers(greedy, fractions, prefix="q", n=4):
    """Answer records: greedy right or wrong, and round(fraction * n) of n samples right."""
    out = []
    for i, (g, f) in enumerate(zip(greedy, fractions)):
        right = round(f * n)
        out.append({"id": f"{prefix}{i}", "prompt_index": i, "greedy": {"correct": bool(g)},
                    "samples": [{"correct": j < right} for j in range(n)],
                    "sample_accuracy": right / n})
    return out


# 64 prompts: greedy as A/B above; the sampled fractions shift up by a quarter on 12 prompts.
FRACTIONS_A = [(i % 5) / 4 for i in range(64)]
FRACTIONS_B = [min(1.0, f + 0.25) if i % 5 == 1 else f for i, f in enumerate(FRACTIONS_A)]


def test_answer_accuracy_compared_by_prompt_against_statsmodels_and_scipy():
    result = compare_answers(_answers(A, FRACTIONS_A), _answers(B, FRACTIONS_B), samples=2000)
    g = result["greedy"]
    assert (g["prompts"], g["only_a"], g["only_b"]) == (64, 1, 7)
    assert g["p_mcnemar"] == pytest.approx(
        contingency.mcnemar([[48, 1], [7, 8]], exact=True).pvalue)
    s = result["sampled"]
    ref = scipy_stats.ttest_rel(FRACTIONS_B, FRACTIONS_A)
    assert s["difference"] == pytest.approx(np.mean(FRACTIONS_B) - np.mean(FRACTIONS_A))
    assert s["p_t"] == pytest.approx(ref.pvalue, rel=1e-9)
    interval = ref.confidence_interval(0.95)
    assert s["ci95"] == pytest.approx([interval.low, interval.high], rel=1e-9)
    low, high = scipy_stats.t.interval(0.95, 63, loc=np.mean(FRACTIONS_A),
                                       scale=scipy_stats.sem(FRACTIONS_A))
    assert s["ci95_a"] == pytest.approx([low, high], rel=1e-9)


def test_cli_compares_answers_when_both_sides_have_them(tmp_path, capsys):
    for name, outcomes, fractions in (("a", A, FRACTIONS_A), ("b", B, FRACTIONS_B)):
        _write(tmp_path / name, _records(outcomes))
        write_answers(tmp_path / name, _answers(outcomes, fractions))
    _write(tmp_path / "c", _records(B))
    out = tmp_path / "cmp.json"
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out),
                     "eval.bootstrap_samples=500"]) == 0
    printed = capsys.readouterr().out
    assert "| greedy | 64 | 0.766 [" in printed and "McNemar exact, 0.0703 |" in printed
    assert "| sampled (mean of 4 / 4) | 64 |" in printed and "paired t, " in printed
    assert json.loads(out.read_text())["answers"]["greedy"]["only_b"] == 7

    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    assert f"only {tmp_path / 'a'} has answers.jsonl" in capsys.readouterr().out
    write_answers(tmp_path / "c", _answers(B, FRACTIONS_B, prefix="r"))
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "not evaluations of the same prompts" in capsys.readouterr().err
