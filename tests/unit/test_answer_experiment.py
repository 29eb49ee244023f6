"""scripts/answer_experiment.py without the models: the plan, the records, the paired tables
(against scipy and statsmodels) and the resumption, with its training and eval commands replaced
by ones that write synthetic evaluations."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats as scipy_stats
import statsmodels.stats.contingency_tables as contingency

from megatron_sega.training.answers import summarize_answers, write_answers
from megatron_sega.training.evaluate import summarize, write_eval_outputs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "answer_experiment.py"


@pytest.fixture()
def experiment(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("answer_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "answer_experiment", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "DOC", tmp_path / "doc.md")
    return module


def _candidate(correct: bool, score: float) -> dict:
    return {"text": "x", "answer": "1" if correct else "2", "normalized": "1" if correct else "2",
            "correct": correct, "finish_reason": "stop", "n_tokens": 5, "valid": True,
            "score": score, "h_final": -score, "fork_entropy": 0.5}


def synthetic_eval(directory: Path, seed: int, skill: float) -> None:
    """64 pairs and 64 prompts whose outcomes are drawn with probability ``skill``."""
    rng = np.random.default_rng(seed)
    pairs = [{"id": f"p{i}", "logp_chosen": -1.0, "logp_rejected": -1.0 - (
        1 if rng.random() < skill else -1), "n_tokens_chosen": 3, "n_tokens_rejected": 3}
        for i in range(64)]
    write_eval_outputs(directory, pairs, summarize(pairs, 0.1, bootstrap_samples=100))
    answers = []
    for i in range(64):
        samples = [_candidate(bool(rng.random() < skill), float(rng.random())) for _ in range(4)]
        answers.append({"id": f"q{i}", "prompt_index": i, "reference": "1",
                        "reference_normalized": "1",
                        "greedy": _candidate(bool(rng.random() < skill), 0.0),
                        "samples": samples,
                        "sample_accuracy": sum(c["correct"] for c in samples) / 4})
    write_answers(directory, answers)
    summary = json.loads((directory / "summary.json").read_text())
    summary["answers"] = summarize_answers(answers)
    (directory / "summary.json").write_text(json.dumps(summary))


def test_plan_has_three_seeds_of_the_default_and_the_baselines(experiment):
    runs = experiment.plan()
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) and names[0] == "sft"
    for method in ("sega", "dpo", "ipo"):
        assert sorted(r.seed for r in runs if r.method == method and r.variant == "default") \
            == [1, 2, 3]
    assert {r.variant for r in runs if r.variant != "default"} == {
        "brief: lambda 0.4, softmax reward", "authors' code: z-scored, token mean",
        "control: lambda 0", "LoRA rank 16"}
    ipo = next(r for r in runs if r.method == "ipo")
    assert ipo.command == "dpo" and "dpo.loss=ipo" in ipo.overrides
    assert "scoring.lam=0.0" in next(r for r in runs if r.name == "sega-lam0-s1").overrides
    # The control has three seeds too; the other variants one.
    assert sorted(r.seed for r in runs if r.variant == "control: lambda 0") == [1, 2, 3]


def test_tables_are_paired_against_sft(experiment, tmp_path):
    records = {}
    for name, seed, skill in (("sft", 0, 0.4), ("sega-s1", 1, 0.6), ("sega-s2", 2, 0.6),
                              ("sega-lam0-s1", 1, 0.5), ("sega-lam0-s2", 2, 0.5)):
        synthetic_eval(tmp_path / name, seed, skill)
        run = experiment.Run(name, "sft" if name == "sft" else "sega", seed,
                             variant="control" if "lam0" in name else "default")
        records[name] = experiment.make_record(run, tmp_path / name,
                                               {"train": 60.0, "eval": 30.0})
    sft, sega = records["sft"], records["sega-s1"]
    c = experiment.comparison(sft, sega)
    a = np.array([r["greedy"]["correct"] for r in sft["answers"]], float)
    b = np.array([r["greedy"]["correct"] for r in sega["answers"]], float)
    table = [[int(np.sum((a == 1) & (b == 1))), int(np.sum((a == 1) & (b == 0)))],
             [int(np.sum((a == 0) & (b == 1))), int(np.sum((a == 0) & (b == 0)))]]
    assert c["greedy"]["p_mcnemar"] == pytest.approx(
        contingency.mcnemar(table, exact=True).pvalue)
    fa = [r["sample_accuracy"] for r in sft["answers"]]
    fb = [r["sample_accuracy"] for r in sega["answers"]]
    assert c["sampled"]["p_t"] == pytest.approx(scipy_stats.ttest_rel(fb, fa).pvalue, rel=1e-9)

    pooled = experiment.pooled([sft], [records["sega-s1"], records["sega-s2"]])
    fb2 = [r["sample_accuracy"] for r in records["sega-s2"]["answers"]]
    mean = (np.array(fb) + np.array(fb2)) / 2
    assert pooled["sampled"]["p"] == pytest.approx(scipy_stats.ttest_rel(mean, fa).pvalue,
                                                   rel=1e-9)
    assert pooled["sampled"]["accuracy"] == pytest.approx(mean.mean())

    text = experiment.tables(records)
    assert text.count("\n| sega-s") == 2 and text.count("\n| sega-lam0-s") == 2 \
        and "| sft | " in text
    assert f"{sega['summary']['answers']['greedy_accuracy']:.3f}" in text
    assert f"p {c['sampled']['p_t']:.2g}" in text and "1.5 min" in text
    assert "| sega | 1, 2 | " in text  # the pooled rows: a method's default, a variant's seeds
    assert "| sega-lam0 | 1, 2 | " in text

    # head to head: the default's seed means against the control's, paired by prompt
    lam0 = [np.array([r["sample_accuracy"] for r in records[f"sega-lam0-s{i}"]["answers"]])
            for i in (1, 2)]
    control = (lam0[0] + lam0[1]) / 2
    p = experiment.pooled([records["sega-lam0-s1"], records["sega-lam0-s2"]],
                          [records["sega-s1"], records["sega-s2"]])
    assert p["sampled"]["difference"] == pytest.approx((mean - control).mean())
    assert p["sampled"]["p"] == pytest.approx(scipy_stats.ttest_rel(mean, control).pvalue,
                                              rel=1e-9)
    row = next(line for line in text.splitlines() if line.startswith("| sega | sega-lam0 | "))
    assert f"p {p['sampled']['p']:.2g}" in row and "lambda 1 against 0" in row


def test_resumes_where_it_stopped_and_checks_a_rerun_sft(experiment, tmp_path, monkeypatch,
                                                         capsys):
    trained: list[str] = []

    def train(run, work, base):
        trained.append(run.name)
        (work / run.name / "ckpt").mkdir(parents=True, exist_ok=True)
        return work / run.name / "ckpt", 1.0

    def evaluate(run, work, checkpoint):
        skill = 0.4 if run.method == "sft" else 0.5
        synthetic_eval(work / run.name / "eval", run.seed + len(run.name), skill)
        return work / run.name / "eval", 1.0

    monkeypatch.setattr(experiment, "train", train)
    monkeypatch.setattr(experiment, "evaluate", evaluate)
    monkeypatch.setattr(experiment, "base_model", lambda work: work / "base")
    work = tmp_path / "work"
    only = "sega-s1,dpo-s1"
    assert experiment.main(["--work", str(work), "--only", only]) == 0
    assert trained == ["sft", "sega-s1", "dpo-s1"]
    assert sorted(p.stem for p in (tmp_path / "results").glob("*.json")) == [
        "dpo-s1", "sega-s1", "sft"]
    assert not (work / "sega-s1" / "ckpt").exists() and (work / "sft" / "ckpt").is_dir()
    doc = (tmp_path / "doc.md").read_text()
    assert experiment.START in doc and "| dpo-s1 | " in doc

    trained.clear()  # everything recorded: nothing runs
    assert experiment.main(["--work", str(work), "--only", only]) == 0 and trained == []

    # A fresh machine: no SFT checkpoint, one run left. SFT runs again and must match.
    (tmp_path / "results" / "dpo-s1.json").unlink()
    shutil.rmtree(work)
    assert experiment.main(["--work", str(work), "--only", only]) == 0
    assert trained == ["sft", "dpo-s1"]
    assert json.loads((tmp_path / "results" / "sft.json").read_text())["name"] == "sft"

    trained.clear()  # a different SFT is refused
    (tmp_path / "results" / "dpo-s1.json").unlink()
    shutil.rmtree(work)
    monkeypatch.setattr(experiment, "evaluate", lambda run, work, checkpoint: (
        synthetic_eval(work / run.name / "eval", 99, 0.3), (work / run.name / "eval", 1.0))[1])
    with pytest.raises(SystemExit, match="the SFT run again differs"):
        experiment.main(["--work", str(work), "--only", only])
    assert trained == ["sft"]

    assert experiment.main(["--plan", "--only", "sega-s1"]) == 0
    printed = capsys.readouterr().out
    assert "sft " in printed and "recorded" in printed
    with pytest.raises(SystemExit):
        experiment.main(["--only", "nope"])
    assert "no run named ['nope']" in capsys.readouterr().err


def test_a_lora_run_is_evaluated_as_trained_and_not_trained_again(experiment, tmp_path,
                                                                  monkeypatch):
    """The eval of a LoRA run loads its adapters (the run's ``lora.*`` settings; the base model's
    settings would be refused); a run whose training finished but whose evaluation failed is
    evaluated again, with its recorded training time, and not trained again."""
    commands: list[list[str]] = []

    def torchrun(args, log):
        commands.append(args)
        log.parent.mkdir(parents=True, exist_ok=True)
        if args[0] != "eval":
            (log.parent / "ckpt").mkdir(exist_ok=True)
            return 7.0
        if len(commands) == 2:  # the first evaluation fails, as the script's torchrun does
            raise SystemExit("error: `eval` failed")
        out = Path(next(a for a in args if a.startswith("eval.out=")).split("=", 1)[1])
        synthetic_eval(out, 1, 0.5)
        return 2.0

    monkeypatch.setattr(experiment, "torchrun", torchrun)
    monkeypatch.setattr(experiment, "base_model", lambda work: work / "base")
    run = next(r for r in experiment.plan() if r.name == "sega-lora-s1")
    work = tmp_path / "work"
    experiment.train(run, work, work / "base")
    with pytest.raises(SystemExit):
        experiment.evaluate(run, work, work / run.name / "ckpt")
    assert experiment.trained(run, work) == (work / run.name / "ckpt", 7.0)
    experiment.evaluate(run, work, work / run.name / "ckpt")
    train_args, eval_args = commands[0], commands[2]
    lora = [a for a in train_args if a.startswith("lora.")]
    assert lora == ["lora.rank=16", "lora.alpha=32"]
    assert [a for a in eval_args if a.startswith("lora.")] == lora
    assert not any(a.startswith("sega.") for a in eval_args)
    # the default run's eval has no LoRA settings; an unfinished training is trained again
    default = next(r for r in experiment.plan() if r.name == "sega-s1")
    assert experiment.trained(default, work) is None
    experiment.evaluate(default, work, work / "x")
    assert not any(a.startswith("lora.") for a in commands[-1])
