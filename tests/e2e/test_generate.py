"""``megatron-sega generate`` through the CLI (tiny model, CPU): ``--out DIR`` writes one JSONL
record per candidate with its tokens and the parts of its Eq. 1 score; the samples do not depend
on the layout (1 process vs DP=2 vs TP=2); ``sega.k: 1`` is accepted by generate and refused by
the SEGA stage with a one-line message. (The real-model tests check greedy ``generate --out``
token for token against transformers.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sega.data import TINY_TOKENIZER_DIR, Tokenizer
from tests.cli_run import Run

ROOT = Path(__file__).resolve().parents[2]
NEW = 16
CONFIG = f"""\
model: {{preset: tiny, dtype: fp32, init_seed: 1234}}
parallel: {{tp: 1, pp: 1, device: cpu}}
data: {{template: chat, max_seq_len: 112}}
sampling: {{temperature: 1.0, top_p: 0.95, max_new_tokens: {NEW}, stop_strings: ["7"]}}
sega: {{k: 2}}
logging: {{progress: false}}
"""
FIELDS = {"prompt_id", "prompt_index", "candidate", "text", "token_ids", "n_tokens",
          "finish_reason", "h_final", "fork_entropy", "lam", "score", "valid", "reward",
          "advantage"}


def _records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate")
    prompts = (ROOT / "examples/demo_data/eval.jsonl").read_text().splitlines()[:5]
    (work / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    config = work / "run.yaml"
    config.write_text(CONFIG)
    data = f"data.eval={work / 'prompts.jsonl'}"
    procs = {
        "single": Run("single", work, "generate", config, data, "--out", str(work / "single")),
        "dp2": Run("dp2", work, "generate", config, data, "--out", str(work / "dp2"), nproc=2),
    }
    logs = {name: run.wait() for name, run in procs.items()}
    # Overrides may follow an option.
    greedy = Run("greedy_tp2", work, "generate", config, data, "--out", str(work / "greedy"),
                 "parallel.tp=2", "sega.k=1", "sampling.temperature=0", nproc=2)
    logs["greedy"] = greedy.wait()
    return work, logs


def test_out_writes_every_candidate_with_its_eq1_parts(runs):
    work, logs = runs
    tok = Tokenizer.from_path(TINY_TOKENIZER_DIR)
    records = _records(work / "single")
    assert [(r["prompt_index"], r["candidate"]) for r in records] == [
        (g, j) for g in range(5) for j in range(2)]
    assert f"wrote 10 samples (5 prompts x k=2) to {work / 'single' / 'samples.jsonl'}" \
        in logs["single"]
    for r in records:
        assert set(r) == FIELDS
        ids = r["token_ids"]
        assert r["n_tokens"] == len(ids) and 1 <= len(ids) <= NEW
        if r["finish_reason"] == "stop":
            assert ids[-1] in tok.stop_ids and r["text"] == tok.decode(ids[:-1])
        else:
            assert r["text"] == tok.decode(ids)
            assert r["finish_reason"] == "stop_string" and "7" in r["text"] or \
                r["finish_reason"] == "length" and len(ids) == NEW
        if r["valid"]:
            assert r["score"] == pytest.approx(-r["h_final"] + r["lam"] * r["fork_entropy"])
            assert r["h_final"] > 0 and r["reward"] == r["score"]  # identity reward
        else:
            assert r["score"] == 0 and r["advantage"] == 0
    # Group-mean-centred advantages: they sum to zero within each prompt's group.
    scored_groups = 0
    for g in range(5):
        group = [r for r in records if r["prompt_index"] == g]
        assert sum(r["advantage"] for r in group) == pytest.approx(0, abs=1e-9)
        if all(r["valid"] for r in group) and group[0]["score"] != group[1]["score"]:
            assert group[0]["advantage"] != 0
            scored_groups += 1
    assert scored_groups >= 1, "no prompt had two valid candidates with different scores"
    assert "length" in {r["finish_reason"] for r in records}
    assert len({r["finish_reason"] for r in records}) >= 2  # and some stop early
    assert "=== " in logs["single"] and "score" in logs["single"]


def test_samples_do_not_depend_on_the_layout(runs):
    work, _ = runs
    single, dp2 = _records(work / "single"), _records(work / "dp2")
    assert [r["token_ids"] for r in dp2] == [r["token_ids"] for r in single]
    for a, b in zip(single, dp2):
        assert a["prompt_id"] == b["prompt_id"] and a["finish_reason"] == b["finish_reason"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_k1_greedy_at_tp2(runs):
    work, _ = runs
    records = _records(work / "greedy")
    assert [(r["prompt_index"], r["candidate"]) for r in records] == [(g, 0) for g in range(5)]
    assert all(r["advantage"] == 0 for r in records)  # a group of one is never used


def test_sega_refuses_k1(tmp_path, capsys):
    from megatron_sega.cli import main

    assert main(["sega", "--config", str(ROOT / "examples/configs/demo_tiny.yaml"),
                 "sega.k=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("megatron-sega sega: error: sega.k = 1: SEGA needs k >= 2 candidates per "
                   "prompt (group-mean advantages need a group); set sega.k=4")
