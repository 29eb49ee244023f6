"""RewardBench's section scores against hand-computed numbers, the tie rule, per-subset
accuracies with their intervals in ``summary.json``, and the ``subset`` column carried from the
data file to the per-pair records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_sega.config import ConfigError, load_config
from megatron_sega.data import read_pairs
from megatron_sega.training import evaluate
from megatron_sega.training.rewardbench import EXAMPLE_COUNTS, SECTIONS, section_scores
from megatron_sega.training.stats import wilson_interval


def _records(subset: str, right: int, wrong: int, ties: int = 0) -> list[dict]:
    """Pairs of one subset: ``right`` won, ``wrong`` lost, ``ties`` tied (summed log-probs)."""
    rows = [(-1.0, -2.0)] * right + [(-2.0, -1.0)] * wrong + [(-1.5, -1.5)] * ties
    return [{"id": f"{subset}/{i}", "subset": subset, "logp_chosen": c, "logp_rejected": r,
             "n_tokens_chosen": 1, "n_tokens_rejected": 1} for i, (c, r) in enumerate(rows)]


# Subset accuracies chosen so that every section's weighting matters.
ACCURACY = {
    "alpacaeval-easy": (1, 0), "alpacaeval-length": (1, 1), "alpacaeval-hard": (0, 1),
    "mt-bench-easy": (1, 0), "mt-bench-med": (1, 1),
    "mt-bench-hard": (1, 0), "llmbar-natural": (0, 1), "llmbar-adver-neighbor": (1, 1),
    "llmbar-adver-GPTInst": (1, 0), "llmbar-adver-GPTOut": (0, 1), "llmbar-adver-manual": (1, 3),
    "refusals-dangerous": (1, 0), "refusals-offensive": (1, 0), "xstest-should-refuse": (0, 1),
    "xstest-should-respond": (1, 0), "donotanswer": (1, 1),
    "math-prm": (1, 3), "hep-cpp": (1, 0), "hep-go": (1, 0), "hep-java": (1, 0),
    "hep-js": (1, 0), "hep-python": (1, 0), "hep-rust": (1, 0),
}
# By hand, with RewardBench's weights (EXAMPLE_COUNTS):
CHAT = (100 * 1 + 95 * 0.5 + 95 * 0 + 28 * 1 + 40 * 0.5) / (100 + 95 + 95 + 28 + 40)  # 195.5/358
CHAT_HARD = (37 * 1 + 100 * 0 + 134 * 0.5 + 92 * 1 + 47 * 0 + 46 * 0.25) / (37 + 100 + 134 + 92
                                                                           + 47 + 46)  # 207.5/456
SAFETY = (100 + 100 + 250 * 0 + 154 + 136 * 0.5) / (100 + 100 + 250 + 154 + 136)  # 422/740
REASONING = (984 * 0.25 + 6 * 164 * 1) / (984 + 6 * 164)  # math-prm weighs as all code: 0.625


def _all_records() -> list[dict]:
    return [r for name, (right, wrong) in ACCURACY.items() for r in _records(name, right, wrong)]


def test_rewardbench_tables_are_rewardbench_s():
    assert sorted(EXAMPLE_COUNTS) == sorted(n for names in SECTIONS.values() for n in names)
    assert EXAMPLE_COUNTS["math-prm"] == sum(EXAMPLE_COUNTS[f"hep-{x}"]
                                             for x in ("cpp", "go", "java", "js", "python",
                                                       "rust"))
    assert sum(EXAMPLE_COUNTS.values()) - 984 + 447 == 2985  # the `filtered` split's size


def test_section_scores_against_hand_computed_numbers():
    s = evaluate.summarize(_all_records(), beta=0.1, bootstrap_samples=400)
    sections = s["rewardbench"]["accuracy"]
    assert CHAT == pytest.approx(195.5 / 358) and REASONING == pytest.approx(0.625)
    for name, expected in (("Chat", CHAT), ("Chat Hard", CHAT_HARD), ("Safety", SAFETY),
                           ("Reasoning", REASONING)):
        assert sections[name]["score"] == pytest.approx(expected), name
        low, high = sections[name]["ci95"]
        assert 0 <= low <= expected <= high <= 1, name
    mean = (CHAT + CHAT_HARD + SAFETY + REASONING) / 4
    assert sections["mean"]["score"] == pytest.approx(mean)
    assert sections["missing_subsets"] == []
    # Not the plain accuracy over all pairs: the weights are RewardBench's, not the file's.
    assert s["accuracy"] == pytest.approx(19 / 33) and abs(mean - 19 / 33) > 0.01


def test_a_tie_is_wrong_by_default_and_half_on_request():
    records = _records("hep-go", 1, 0, ties=1) + _records("hep-cpp", 1, 1)
    wrong = evaluate.summarize(records, beta=0.1, bootstrap_samples=400)
    half = evaluate.summarize(records, beta=0.1, ties="half", bootstrap_samples=400)
    assert wrong["tie_rule"] == "wrong" and half["tie_rule"] == "half"
    assert wrong["accuracy"] == pytest.approx(2 / 4) and half["accuracy"] == pytest.approx(2.5 / 4)
    assert wrong["subsets"]["hep-go"]["accuracy"]["accuracy"] == pytest.approx(0.5)
    assert half["subsets"]["hep-go"]["accuracy"]["accuracy"] == pytest.approx(0.75)
    # Only Reasoning is present: its score is over the present subsets, and there is no mean.
    reasoning = wrong["rewardbench"]["accuracy"]
    assert set(reasoning) == {"Reasoning", "missing_subsets"}
    assert reasoning["Reasoning"]["score"] == pytest.approx(0.5)
    assert "math-prm" in reasoning["missing_subsets"]
    with pytest.raises(ValueError, match="ties"):
        evaluate.pair_outcomes(records, "accuracy", beta=0.1, ties="coin")


def test_section_scores_skip_absent_subsets_and_foreign_names():
    scores = section_scores({"hep-go": 1.0, "math-prm": 0.0, "my-own-subset": 1.0})
    assert scores == {"Reasoning": pytest.approx(164 / (164 + 984))}


def test_every_accuracy_carries_its_wilson_interval_overall_and_per_subset():
    records = _records("a", 3, 1) + _records("b", 0, 2) + [
        {**r, "subset": None} for r in _records("x", 2, 0)]
    for r in records:
        r.update(ref_logp_chosen=-1.5, ref_logp_rejected=-1.5)
    s = evaluate.summarize(records, beta=0.1, bootstrap_samples=400)
    assert "Wilson" in s["interval"]
    for name in ("accuracy", "accuracy_length_normalized", "accuracy_vs_reference"):
        assert s[f"{name}_ci95"] == pytest.approx(list(wilson_interval(5, 8))), name
    assert s["subsets"]["a"]["pairs"] == 4
    assert s["subsets"]["a"]["accuracy"]["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert s["subsets"]["b"]["accuracy_vs_reference"]["accuracy"] == 0.0
    assert s["subsets"][evaluate.NO_SUBSET]["pairs"] == 2
    assert "rewardbench" not in s  # no RewardBench subset among a, b
    json.dumps(s)  # summary.json must serialise


def test_subset_column_reaches_the_per_pair_records(tmp_path, monkeypatch):
    data = tmp_path / "rb.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "id": 1, "subset": "hep-go"},
            {"prompt": "q", "chosen": "a", "rejected": "b", "id": 2, "subset": "math-prm"},
            {"prompt": "q", "chosen": "a", "rejected": "b", "id": 3}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = read_pairs(data)
    assert [p.subset for p in pairs] == ["hep-go", "math-prm", None]

    tokenized = [SimpleNamespace(id=p.id, subset=p.subset) for p in pairs]
    # Per pair: logp_chosen, logp_rejected, n_tokens_chosen, n_tokens_rejected.
    values = torch.tensor([[-1.0, -2.0, 2, 2], [-3.0, -2.0, 2, 2], [-1.0, -1.0, 2, 2]],
                          dtype=torch.float64)
    monkeypatch.setattr(evaluate, "_pair_logps", lambda chunks, session, mine, micro: values)
    session = SimpleNamespace(runtime=SimpleNamespace(dp=1, dp_rank=0, device="cpu"), chunks=None,
                              config=SimpleNamespace(data=SimpleNamespace(packing=False)))
    records, summary = evaluate.evaluate_pairs(session, tokenized, beta=0.1,
                                               bootstrap_samples=400)
    assert [r.get("subset") for r in records] == ["hep-go", "math-prm", None]
    assert summary["rewardbench"]["accuracy"]["Reasoning"]["score"] == pytest.approx(
        164 / (164 + 984))


def test_eval_options_are_checked():
    config = load_config(None, ["eval.ties=half", "eval.bootstrap_samples=500"])
    assert config.eval.ties == "half" and config.eval.bootstrap_samples == 500
    assert load_config(None, []).eval.ties == "wrong"
    with pytest.raises(ConfigError, match="eval.ties"):
        load_config(None, ["eval.ties=coin"])
    with pytest.raises(ConfigError, match="eval.bootstrap_samples"):
        load_config(None, ["eval.bootstrap_samples=50"])
