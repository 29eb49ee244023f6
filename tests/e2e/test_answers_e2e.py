"""Answer accuracy through the CLI (CPU, fp32, tiny model, shipped demo prompts):

- ``eval`` with ``eval.answer_samples: 2`` writes ``answers.jsonl`` (greedy + 2 samples a prompt,
  each with its extracted answer, verdict and Eq. 1 parts) and the ``answers`` section of
  ``summary.json``, computed from those records; the records are the same at TP=2 (2 processes)
  as in one process (texts and verdicts equal; Eq. 1 parts within 1e-5, fp32);
- ``sega`` with ``sega.eval_interval: 2`` logs the held-out preference and answer accuracies at
  steps 2 and 4 (and only there) into the metrics JSONL and TensorBoard, and the curves PNG
  gets their panel;
- ``sega.eval_interval`` without ``data.eval`` is refused in one line.

The random-init tiny model writes no final answer, so its accuracies are 0: the real-model test
(tests/realmodel/test_answers_smollm2.py) is where answers are found and judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sega.training.answers import (
    extract_final_answer, normalize_answer, summarize_answers,
)
from tests.cli_run import Run

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = 6
SCORE_TOL = 1e-5  # fp32, TP=2 against one process: different reduction orders
CONFIG = """\
model: {preset: tiny, dtype: fp32, init_seed: 1234}
parallel: {tp: 1, pp: 1, device: cpu}
data: {template: chat, max_seq_len: 112}
sampling: {temperature: 1.0, top_p: 0.95, max_new_tokens: 16}
sega: {k: 2, steps: 4, prompts_per_step: 2, micro_batch_size: 4, lr: 1.0e-4}
eval: {answer_samples: 2, micro_batch_size: 8}
logging: {progress: false, tensorboard: true}
"""
EVAL_KEYS = {"eval_accuracy", "eval_accuracy_length_normalized", "eval_answer_accuracy_greedy",
             "eval_answer_accuracy_sampled", "eval_no_answer_fraction", "eval_eq1_top_right",
             "time_eval"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("answers")
    lines = (ROOT / "examples/demo_data/eval.jsonl").read_text().splitlines()[:PROMPTS]
    (work / "eval.jsonl").write_text("\n".join(lines) + "\n")
    config = work / "run.yaml"
    config.write_text(CONFIG)
    data = [f"data.eval={work / 'eval.jsonl'}", f"data.train={work / 'eval.jsonl'}"]
    procs = [
        Run("eval1", work, "eval", config, *data, f"eval.out={work / 'eval1'}"),
        Run("eval_tp2", work, "eval", config, *data, f"eval.out={work / 'eval_tp2'}",
            "parallel.tp=2", nproc=2),
    ]
    logs = [p.wait() for p in procs]
    Run("sega", work, "sega", config, *data, "sega.eval_interval=2",
        f"logging.dir={work / 'sega'}", f"checkpoint.save_dir={work / 'sega' / 'ckpt'}").wait()
    return work, logs


def test_eval_writes_answer_records_and_their_summary(runs):
    work, logs = runs
    records = _jsonl(work / "eval1" / "answers.jsonl")
    assert f"wrote {work / 'eval1' / 'answers.jsonl'}" in logs[0]
    assert [r["prompt_index"] for r in records] == list(range(PROMPTS))
    source = _jsonl(work / "eval.jsonl")
    for record, row in zip(records, source):
        assert record["id"] == row["id"]
        assert record["reference"] == extract_final_answer(row["chosen"], "Final Answer:")
        assert len(record["samples"]) == 2
        for c in [record["greedy"], *record["samples"]]:
            answer = extract_final_answer(c["text"], "Final Answer:")
            assert c["answer"] == answer
            assert c["correct"] == (answer is not None and
                                    normalize_answer(answer) == normalize_answer(row["chosen"]
                                                                                 .split(": ")[-1]))
            assert 1 <= c["n_tokens"] <= 16
            if c["valid"]:
                assert c["score"] == pytest.approx(-c["h_final"] + c["fork_entropy"])
                assert c["h_final"] > 0 and c["fork_entropy"] > 0
    # The two samples of a prompt differ from each other somewhere (temperature 1).
    assert any(r["samples"][0]["text"] != r["samples"][1]["text"] for r in records)
    summary = json.loads((work / "eval1" / "summary.json").read_text())
    assert summary["pairs"] == PROMPTS  # the preference accuracy is still there
    assert summary["answers"] == summarize_answers(records)


def test_answer_records_do_not_depend_on_the_layout(runs):
    work, _ = runs
    one, tp2 = _jsonl(work / "eval1" / "answers.jsonl"), _jsonl(work / "eval_tp2" / "answers.jsonl")
    assert len(one) == len(tp2) == PROMPTS
    for a, b in zip(one, tp2):
        for ca, cb in zip([a["greedy"], *a["samples"]], [b["greedy"], *b["samples"]]):
            for key in ("text", "answer", "correct", "finish_reason", "n_tokens", "valid"):
                assert ca[key] == cb[key], (a["id"], key)
            for key in ("score", "h_final", "fork_entropy"):
                assert abs(ca[key] - cb[key]) <= SCORE_TOL, (a["id"], key, ca[key], cb[key])


def test_sega_logs_held_out_accuracies_every_eval_interval(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_sega.demo import plot_curves

    work, _ = runs
    rows = _jsonl(work / "sega" / "sega_metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        if r["step"] % 2:
            assert not EVAL_KEYS & set(r), r
        else:
            assert EVAL_KEYS <= set(r), EVAL_KEYS - set(r)
            assert 0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_answer_accuracy_sampled"] <= 1
            assert r["eval_no_answer_fraction"] == 1.0  # the random-init model writes none
    events = EventAccumulator(str(work / "sega" / "tensorboard" / "sega"))
    events.Reload()
    for key in ("eval_accuracy", "eval_answer_accuracy_greedy", "eval_answer_accuracy_sampled"):
        assert [e.step for e in events.Scalars(f"sega/{key}")] == [2, 4], key
    # The curves PNG of a run directory with this SEGA stage has the held-out panel.
    (tmp_path / "sega").mkdir()
    (tmp_path / "sega" / "sega_metrics.jsonl").write_text(
        (work / "sega" / "sega_metrics.jsonl").read_text())
    png = plot_curves(tmp_path)
    assert png.stat().st_size > 0


def test_sega_eval_interval_needs_eval_data(runs):
    work, _ = runs
    run = Run("no_eval", work, "sega", work / "run.yaml", f"data.train={work / 'eval.jsonl'}",
              "sega.eval_interval=2")
    log = run.wait(expect=2)
    assert "sega.eval_interval = 2 evaluates on data.eval, which is not set" in log
    assert "Traceback" not in log
