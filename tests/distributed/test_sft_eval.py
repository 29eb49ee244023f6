"""Evaluation log-probs against transformers: ``log pi(a|q)`` per pair, at every layout.

A tiny random ``LlamaForCausalLM`` (vocab = the tiny tokenizer's 460 tokens) is saved with the
tokenizer files and converted with ``hf_to_mcore``. Its summed response log-probs (the response
and its end-of-turn token, as training sees them), computed here
by transformers on each unpadded ``prompt + response`` (template ``none``, fp32), are the
reference for what evaluation reports per pair:

- TP=1 (one process) through the ``megatron-sega eval`` CLI, which writes ``pairs.jsonl``;
- DP=2, TP=2 and PP=2 (two processes) through ``open_session`` + ``evaluate_pairs``.

The pairs mix responses of different lengths and an eval micro-batch size that leaves a short
last microbatch, so padding, DP sharding/gathering and the PP broadcast all take part.
Two spawns: convert + TP=1 (1 process) -> DP=2, TP=2, PP=2 (2 processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4
N_PAIRS, EVAL_MICRO = 11, 3
BETA = 0.1


def _hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_sega.data import TINY_TOKENIZER_DIR, Tokenizer

    config = LlamaConfig(vocab_size=Tokenizer.from_path(TINY_TOKENIZER_DIR).vocab_size,
                         hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5,
                         initializer_range=0.08,  # O(1) logits: log-probs far from uniform
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _eval_pairs(path: Path) -> None:
    """The first held-out demo pairs plus one with long responses (a spread of lengths)."""
    lines = (REPO / "examples/demo_data/eval.jsonl").read_text().splitlines()[:N_PAIRS - 1]
    lines.append(json.dumps({
        "id": "long", "prompt": "Explain, step by step, what 12 + 30 is.",
        "chosen": " 12 + 30: first 10 + 30 = 40, then 40 + 2 = 42. Final Answer: 42",
        "rejected": " It is 43."}))
    path.write_text("\n".join(lines) + "\n")


def _hf_reference(model, data: Path) -> dict[str, tuple[float, float, int, int]]:
    """id -> (logp_chosen, logp_rejected, n_chosen, n_rejected), summed over response tokens."""
    from megatron_sega.data import TINY_TOKENIZER_DIR, PromptFormatter, Tokenizer, read_pairs

    fmt = PromptFormatter(Tokenizer.from_path(TINY_TOKENIZER_DIR), template="none")
    pairs, _ = read_pairs(data)
    out = {}
    for pair in pairs:
        values = []
        for response in (pair.chosen, pair.rejected):
            # Scored with the end-of-turn token that closes the response, as training sees it.
            prompt_ids, response_ids = fmt.encode_pair(pair.prompt, response, append_eos=True)
            ids = torch.tensor([prompt_ids + response_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            p = len(prompt_ids)
            # position t predicts token t + 1: response token j sits at p + j
            targets = ids[0, p:]
            values.append((float(logp[p - 1:-1].gather(1, targets[:, None]).sum()),
                           len(response_ids)))
        (lc, nc), (lr, nr) = values
        out[pair.id] = (lc, lr, nc, nr)
    return out


def _overrides(root: str, tp: int, pp: int) -> list[str]:
    return [f"model.load={root}/mcore", "model.dtype=fp32", "parallel.device=cpu",
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"data.eval={root}/eval.jsonl",
            "data.template=none", f"eval.beta={BETA}", f"eval.micro_batch_size={EVAL_MICRO}",
            f"eval.out={root}/eval_tp1", "logging.progress=false"]


def _convert_and_eval_cli(root: str) -> None:
    from megatron_sega import cli
    from megatron_sega.convert.hf_mcore import hf_to_mcore

    hf_to_mcore(f"{root}/hf", f"{root}/mcore", tp=2, pp=2, dtype="fp32")
    assert cli.main(["eval", *_overrides(root, 1, 1)]) == 0


def _eval_layouts(root: str) -> dict:
    """Records and summary at DP=2 (TP=1), TP=2 and PP=2, from rank 0."""
    from megatron_sega.config import load_config
    from megatron_sega.training.evaluate import evaluate_pairs, load_eval_pairs
    from megatron_sega.training.session import open_session

    out = {}
    for name, tp, pp in (("dp2", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)):
        config = load_config(None, _overrides(root, tp, pp))
        session = open_session(config, train=False)
        pairs = load_eval_pairs(session, config.data.eval)
        records, summary = evaluate_pairs(session, pairs, beta=BETA,
                                          micro_batch_size=config.eval.micro_batch_size)
        out[name] = {"records": records, "summary": summary,
                     "layout": [session.runtime.tp, session.runtime.pp, session.runtime.dp]}
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """HF model + tokenizer on disk, the eval pairs, and the transformers reference."""
    from megatron_sega.data import TINY_TOKENIZER_DIR

    root = tmp_path_factory.mktemp("sft_eval")
    model = _hf_model()
    model.save_pretrained(root / "hf")
    for file in TINY_TOKENIZER_DIR.iterdir():
        (root / "hf" / file.name).write_bytes(file.read_bytes())
    _eval_pairs(root / "eval.jsonl")
    return root, _hf_reference(model, root / "eval.jsonl")


def _max_diff(records: list[dict], ref: dict) -> float:
    assert [r["id"] for r in records] == list(ref), "records out of order or missing"
    worst = 0.0
    for r in records:
        lc, lr, nc, nr = ref[r["id"]]
        assert (r["n_tokens_chosen"], r["n_tokens_rejected"]) == (nc, nr), r["id"]
        worst = max(worst, abs(r["logp_chosen"] - lc), abs(r["logp_rejected"] - lr))
    return worst


def test_eval_logps_match_transformers(checkpoint):
    root, ref = checkpoint
    run_distributed(_convert_and_eval_cli, 1, str(root))
    layouts = run_distributed(_eval_layouts, 2, str(root))[0]

    records = [json.loads(line) for line in
               (root / "eval_tp1" / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((root / "eval_tp1" / "summary.json").read_text())
    results = {"tp1 (cli)": (records, summary)}
    for name, got in layouts.items():
        results[name] = (got["records"], got["summary"])
    assert layouts["dp2"]["layout"] == [1, 1, 2]
    assert layouts["tp2"]["layout"] == [2, 1, 1]
    assert layouts["pp2"]["layout"] == [1, 2, 1]

    diffs = {}
    for name, (records, summary) in results.items():
        diffs[name] = _max_diff(records, ref)
        assert diffs[name] <= TOL, f"{name}: max |logp - HF logp| = {diffs[name]:.3g}"
        expected = sum(lc > lr for lc, lr, _, _ in ref.values()) / len(ref)
        assert summary["pairs"] == N_PAIRS and summary["accuracy"] == expected, name
        per_token = sum(lc / nc > lr / nr for lc, lr, nc, nr in ref.values()) / len(ref)
        assert summary["accuracy_length_normalized"] == per_token, name
    print("max abs diff of summed log-probs vs transformers:",
          {k: f"{v:.2e}" for k, v in diffs.items()})

    # Not vacuous: the log-probs are far from uniform and chosen/rejected differ, and the
    # length-normalised winner differs from the summed one on some pair.
    assert any((lc > lr) != (lc / nc > lr / nr) for lc, lr, nc, nr in ref.values())
    values = [v for lc, lr, _, _ in ref.values() for v in (lc, lr)]
    assert max(values) - min(values) > 10
    assert len({round(v, 3) for v in values}) == len(values)
