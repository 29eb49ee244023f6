"""Answer accuracy on the real model: ``megatron-sega eval`` with ``eval.answer_samples: 2`` on
SmolLM2-135M-Instruct at PP=2 (2 processes), four hand-picked prompts, 24 new tokens.

Untrained, the model never writes ``Final Answer:``; it does write "The capital of France is
Paris." So this test sets ``scoring.marker: " is "`` and gives each record an ``answer`` field:
the greedy answers are then right (Paris, Mars), wrong (the odd/even question, cut off
mid-sentence) and absent (no " is " in "A dog has four legs."), which exercises every verdict on
the real model's own text. The greedy candidates are checked token for token against
transformers' greedy ``generate``, with their Eq. 1 parts against transformers' entropies; the
summary against the records it was computed from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli_run import Run

pytestmark = [pytest.mark.realmodel, pytest.mark.distributed]

NEW = 24
EOS = 2  # <|im_end|>
MARKER = " is "
STAT_TOL = 1e-4  # Eq. 1 parts against transformers' entropies, fp32 (as in test_smollm2.py)
# (prompt, reference answer, the greedy candidate's verdict: True right, False wrong, None no
# final answer), read off transformers' greedy output.
PROMPTS = [
    ("What is the capital of France?", "Paris", True),
    ("Which planet is known as the Red Planet?", "mars", True),
    ("Is 7 an even or an odd number?", "odd", False),
    ("How many legs does a dog have?", "4", None),
]
CONFIG = f"""\
model: {{dtype: fp32}}
parallel: {{tp: 1, pp: 2, device: cpu}}
data: {{template: chat, max_seq_len: 160}}
sampling: {{temperature: 1.0, top_p: 0.95, max_new_tokens: {NEW}}}
scoring: {{marker: "{MARKER}"}}
eval: {{answer_samples: 2, micro_batch_size: 4}}
logging: {{progress: false}}
"""


def _hf_greedy(hf_dir: Path) -> list[dict]:
    """transformers' greedy text of each prompt and the Eq. 1 parts of its tokens, from
    transformers' entropies and the scorer's pure (unit-tested) functions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sega.data import REFLECTIVE_SYSTEM_PROMPT, Tokenizer
    from megatron_sega.sega import answer_span_mask, entropy_scores

    tok = AutoTokenizer.from_pretrained(hf_dir)
    markers = Tokenizer.from_path(str(hf_dir)).marker_variants(MARKER)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for prompt, _, _ in PROMPTS:
        messages = [{"role": "system", "content": REFLECTIVE_SYSTEM_PROMPT},
                    {"role": "user", "content": prompt}]
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True,
                                           return_dict=True)["input_ids"])
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=NEW,
                                 eos_token_id=EOS, pad_token_id=EOS)
            new = gen[0, len(ids):].tolist()
            logp = torch.log_softmax(model(gen).logits[0, len(ids) - 1:-1].double(), dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        stopped = new[-1] == EOS
        content = torch.ones(1, len(new), dtype=torch.bool)
        content[0, -1] = not stopped
        answer, reasoning = answer_span_mask(torch.tensor([new]), content, markers,
                                             final_fraction=0.2)
        parts = entropy_scores(entropy.unsqueeze(0), answer, reasoning, top_m=0.1, lam=1.0)
        out.append({"text": tok.decode(new[:-1] if stopped else new),
                    "h_final": float(parts.h_final[0]), "fork_entropy": float(parts.fork[0]),
                    "score": float(parts.score[0])})
    return out


@pytest.fixture(scope="module")
def answers(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("answers_smollm2")
    with open(work / "eval.jsonl", "w") as f:
        for i, (prompt, answer, _) in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "prompt": prompt, "chosen": f"It is {answer}.",
                                "rejected": "I do not know.", "answer": answer}) + "\n")
    config = work / "run.yaml"
    config.write_text(CONFIG)
    run = Run("eval", work, "eval", config, f"model.load={smollm2.mcore_dir}",
              f"data.eval={work / 'eval.jsonl'}", f"eval.out={work / 'out'}", nproc=2)
    log = run.wait()
    records = [json.loads(line) for line in (work / "out" / "answers.jsonl").read_text()
               .splitlines()]
    summary = json.loads((work / "out" / "summary.json").read_text())
    return records, summary, log


def test_greedy_answers_equal_transformers_and_are_judged(answers, smollm2):
    records, summary, _ = answers
    reference = _hf_greedy(smollm2.hf_dir)
    assert [r["greedy"]["text"] for r in records] == [g["text"] for g in reference]
    for record, ref in zip(records, reference):
        for key in ("h_final", "fork_entropy", "score"):
            assert abs(record["greedy"][key] - ref[key]) <= STAT_TOL, (record["id"], key)
        assert record["greedy"]["h_final"] > 0
    verdicts = [None if r["greedy"]["answer"] is None else r["greedy"]["correct"]
                for r in records]
    assert verdicts == [expected for _, _, expected in PROMPTS], [
        r["greedy"]["text"] for r in records]
    s = summary["answers"]
    assert s["prompts"] == 4 and s["samples_per_prompt"] == 2
    assert s["greedy_accuracy"] == 0.5 and s["greedy_no_answer_fraction"] == 0.25


def test_sampled_answers_and_the_summary(answers):
    from megatron_sega.training.answers import (
        extract_final_answer, normalize_answer, summarize_answers,
    )

    records, summary, _ = answers
    for record, (_, answer, _) in zip(records, PROMPTS):
        assert record["reference"] == answer
        assert len(record["samples"]) == 2
        for c in record["samples"]:
            found = extract_final_answer(c["text"], MARKER)
            assert c["answer"] == found
            assert c["correct"] == (found is not None and
                                    normalize_answer(found) == normalize_answer(answer))
            assert c["valid"] and c["h_final"] > 0
            assert c["score"] == pytest.approx(-c["h_final"] + c["fork_entropy"])
            assert 1 <= c["n_tokens"] <= NEW
    # Temperature 1 samples are not all the greedy text.
    assert any(c["text"] != r["greedy"]["text"] for r in records for c in r["samples"])
    assert summary["answers"] == summarize_answers(records)
