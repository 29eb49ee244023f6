"""SmolLM2-135M-Instruct, a real trained Llama (30 layers, hidden 576, 9 heads / 3 KV groups,
tied embeddings, ChatML template, transformers v5 config), against transformers (fp32, CPU).

Two spawns, each grouping every check of its layout:
- PP=2 (2 processes): logits; chat-template eval; greedy ``generate --out`` with k=1; the
  sampler's log-probs and entropies of sampled tokens; one SFT step; one SEGA step.
- TP=3 (3 processes; 3 KV groups allow TP 1 or 3): logits; chat-template eval; greedy generate.

The references come from transformers' ``LlamaForCausalLM`` in this process, on token ids
built independently with the HF tokenizer's ``apply_chat_template``; the ids our templates
produce must equal them. Tolerances (fp32; different kernels and reduction orders):
- logits: max abs difference <= LOGIT_TOL over every position and the whole vocabulary;
- summed response log-probs (eval) and SFT loss: <= LOGP_TOL;
- per-token log-probs and entropies of the sampler: <= STAT_TOL;
- greedy generation: token ids and text identical, stopping at ``<|im_end|>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.dist import run_distributed

pytestmark = [pytest.mark.realmodel, pytest.mark.distributed]

# Measured on the 2-core CPU machine: logits 0 at PP=2 and 1.0e-4 at TP=3; summed log-probs
# 1.3e-5 (PP=2) and 6.2e-5 (TP=3); per-token statistics and Eq. 1 parts <= 1.2e-5.
LOGIT_TOL = 1e-3
LOGP_TOL = 3e-4
STAT_TOL = 1e-4
GREEDY_NEW = 40
SAMPLED_NEW = 12
EOS = 2  # <|im_end|>: SmolLM2's eos and ChatML end of turn

# (prompt, chosen, rejected): eval pairs, SFT examples (prompt -> chosen) and SEGA prompts.
PAIRS = [
    ("What is 12 + 7?", "12 + 7 = 19.\nFinal Answer: 19", "12 + 7 = 21.\nFinal Answer: 21"),
    ("Which is heavier, a kilogram of iron or a kilogram of feathers?",
     "Both weigh one kilogram, so neither is heavier.\nFinal Answer: neither",
     "Iron is heavier than feathers.\nFinal Answer: iron"),
    ("Spell the word 'cat' backwards.", "The letters c, a, t reversed are t, a, c.\n"
     "Final Answer: tac", "Final Answer: cat"),
    ("Anna has 3 apples and buys 5 more. How many apples does she have?",
     "She has 3 + 5 = 8 apples.\nFinal Answer: 8", "She has 3 * 5 = 15 apples.\nFinal Answer: 15"),
]
# Greedy prompts: three of them end with <|im_end|> within GREEDY_NEW tokens, one does not.
GREEDY = ["What is the capital of France? Answer in one word.",
          "What is 15 + 27? Think step by step.",
          "Name three primary colours.",
          "Write one sentence about the sea."]


def _messages(prompt: str, response: str | None = None) -> list[dict]:
    from megatron_sega.data import REFLECTIVE_SYSTEM_PROMPT

    messages = [{"role": "system", "content": REFLECTIVE_SYSTEM_PROMPT},
                {"role": "user", "content": prompt}]
    return messages + ([{"role": "assistant", "content": response}] if response else [])


def _hf_ids(tok, prompt: str, response: str | None = None) -> list[int]:
    ids = tok.apply_chat_template(_messages(prompt, response), tokenize=True,
                                  add_generation_prompt=response is None, return_dict=True)
    return list(ids["input_ids"])


def _hf_response_ids(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids without the end of turn) from the whole conversation."""
    prompt_ids = _hf_ids(tok, prompt)
    full = _hf_ids(tok, prompt, response)
    assert full[:len(prompt_ids)] == prompt_ids and full[-2:] == [EOS, 198], full[-4:]
    return prompt_ids, full[len(prompt_ids):-2]


def _token_stats(model, prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' per-token log-probs and entropies of ``response`` after ``prompt``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1: -1], dim=-1)
    token_logp = logp.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return token_logp, entropy


def _write_pairs(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w") as f:
        for i, (prompt, chosen, rejected) in enumerate(rows):
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "chosen": chosen,
                                "rejected": rejected}) + "\n")


@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory):
    return build_reference(smollm2.hf_dir, tmp_path_factory.mktemp("smollm2_work"))


def build_reference(hf_dir: Path, work: Path) -> SimpleNamespace:
    """transformers' model and tokenizer, the data files and the reference values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _write_pairs(work / "pairs.jsonl", PAIRS)
    _write_pairs(work / "greedy.jsonl", [(p, "unused", "unused") for p in GREEDY])
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref = SimpleNamespace(work=work, hf_dir=hf_dir, tok=tok, model=model, pairs=[],
                          eval_logp=[], greedy=[])
    for prompt, chosen, rejected in PAIRS:
        prompt_ids, chosen_ids = _hf_response_ids(tok, prompt, chosen)
        _, rejected_ids = _hf_response_ids(tok, prompt, rejected)
        ref.pairs.append([prompt_ids, chosen_ids, rejected_ids])
        # Eval scores each response with its end of turn, as SFT and SEGA train it.
        ref.eval_logp.append([float(_token_stats(model, prompt_ids, r + [EOS])[0].sum())
                              for r in (chosen_ids, rejected_ids)])
    # Logits on two real sequences (prompt + chosen), cut to a common length.
    seqs = [p + c for p, c, _ in ref.pairs[:2]]
    length = min(map(len, seqs))
    ref.tokens = torch.tensor([s[:length] for s in seqs])
    with torch.no_grad():
        ref.logits = model(ref.tokens).logits.float()
    # SFT: the mean NLL per response token (chosen + <|im_end|>) of the first two pairs.
    nll = [-_token_stats(model, p, c + [EOS])[0] for p, c, _ in ref.pairs[:2]]
    ref.sft_loss = float(torch.cat(nll).mean())
    for prompt in GREEDY:
        ids = _hf_ids(tok, prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=GREEDY_NEW,
                                 eos_token_id=EOS, pad_token_id=EOS)
        ref.greedy.append((ids, out[0, len(ids):].tolist()))
    return ref


# ------------------------------------------------------------------------------ in the spawns

def _full_logits(session, tokens: torch.Tensor):
    """Full-vocab logits [b, s, V] on the last stage's TP rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from megatron_sega.training.engine import forward_backward

    rt, stash = session.runtime, []

    def loss_fn(logits, microbatch):
        shards = [torch.empty_like(logits) for _ in range(rt.tp)]
        dist.all_gather(shards, logits.contiguous(), group=rt.tp_group)
        stash.append(torch.cat(shards, dim=-1)[..., : session.spec.vocab_size].detach().clone())
        return logits.sum() * 0.0, {}

    for chunk in session.chunks:
        chunk.eval()
    with torch.no_grad():
        forward_backward(session.chunks, rt, [{"tokens": tokens}], loss_fn, forward_only=True)
    for chunk in session.chunks:
        chunk.train()
    return stash[0] if stash and rt.tp_rank == 0 else None


def _train_checks(session, work: str) -> dict:
    """The sampler's statistics of sampled tokens, one SFT step and one SEGA step."""
    from megatron_sega.data import collate
    from megatron_sega.sampling import SamplingParams
    from megatron_sega.training.rollouts import load_prompts, make_sampler
    from megatron_sega.training.sega import sega_step
    from megatron_sega.training.sft import load_sft_examples, sft_step
    from megatron_sega.training.teacher_forced import token_stats

    out = {}
    prompts = load_prompts(session, f"{work}/pairs.jsonl")[:2]
    sampled = make_sampler(session).generate(
        [p.prompt_ids for p in prompts for _ in range(2)],
        SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=SAMPLED_NEW,
                       stop_token_ids=(EOS,), seed=7))
    out["sampled"] = {"prompt_ids": sampled.prompt_ids, "response_ids": sampled.response_ids,
                      "lengths": sampled.lengths, "logp": sampled.logp,
                      "entropy": sampled.entropy}

    examples = load_sft_examples(session, f"{work}/pairs.jsonl")[:2]
    out["sft_ids"] = [[e.prompt_ids, e.response_ids] for e in examples]
    first = next(p for p in session.chunks[0].parameters()).detach().clone()
    out["sft"] = sft_step(session, examples)
    batch = collate(examples, session.tokenizer.pad_id)
    logp = token_stats(session.chunks, session.runtime, batch, session.spec.vocab_size,
                       micro_batch_size=2)["logp"]
    out["sft_loss_after"] = float(-logp.double().sum() / batch.loss_mask.sum())
    after_sft = next(p for p in session.chunks[0].parameters()).detach().clone()
    out["sft_param_change"] = float((after_sft - first).abs().max())

    out["sega"] = sega_step(session, make_sampler(session), prompts, [0, 1], step=0)
    after_sega = next(p for p in session.chunks[0].parameters()).detach()
    out["sega_param_change"] = float((after_sega - after_sft).abs().max())
    return out


def _layout_checks(work: str, mcore: str, tp: int, pp: int, tokens: torch.Tensor,
                   train: bool) -> dict:
    from megatron_sega.config import load_config
    from megatron_sega.training.evaluate import evaluate_pairs, load_eval_pairs
    from megatron_sega.training.generate import run_generate
    from megatron_sega.training.session import open_session

    base = load_config(None, [
        f"model.load={mcore}", f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.device=cpu",
        f"data.train={work}/pairs.jsonl", f"data.eval={work}/pairs.jsonl",
        "data.max_seq_len=256", "logging.progress=false", "checkpoint.resume=none",
        "sft.global_batch_size=2", "sft.micro_batch_size=1", "optim.lr=1e-5",
        "sega.k=2", "sega.prompts_per_step=2", "sega.micro_batch_size=2",
        f"sampling.max_new_tokens={SAMPLED_NEW}"])
    gen_dir = f"{work}/generate_tp{tp}_pp{pp}"
    run_generate(base.with_overrides(f"data.eval={work}/greedy.jsonl", "sega.k=1",
                                     "sampling.temperature=0",
                                     f"sampling.max_new_tokens={GREEDY_NEW}"),
                 SimpleNamespace(out=gen_dir))
    session = open_session(base, train=train, total_steps=2)
    out = {"logits": _full_logits(session, tokens), "generate_dir": gen_dir}
    pairs = load_eval_pairs(session, base.data.eval)
    records, _ = evaluate_pairs(session, pairs, beta=0.1, micro_batch_size=2)
    out["eval_ids"] = [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs]
    out["eval_logp"] = [[r["logp_chosen"], r["logp_rejected"]] for r in records]
    if train:
        out.update(_train_checks(session, work))
    return out


# ------------------------------------------------------------------------------ the tests

def _spawn(reference, mcore_dir: Path, tp: int, pp: int, train: bool) -> dict:
    results = run_distributed(_layout_checks, tp * pp, str(reference.work), str(mcore_dir),
                              tp, pp, reference.tokens, train)
    merged = dict(results[-1])  # the last stage holds the training metrics
    merged["logits"] = next(r["logits"] for r in results if r["logits"] is not None)
    return merged


@pytest.fixture(scope="module")
def pp2(reference, smollm2):
    return _spawn(reference, smollm2.mcore_dir, tp=1, pp=2, train=True)


@pytest.fixture(scope="module")
def tp3(reference, smollm2):
    return _spawn(reference, smollm2.mcore_dir, tp=3, pp=1, train=False)


def _check_logits(got, reference, layout: str) -> None:
    assert got.shape == reference.logits.shape
    err = (got - reference.logits).abs().max().item()
    assert err <= LOGIT_TOL, f"{layout}: max abs logit difference {err:.3g} > {LOGIT_TOL}"
    # The logits are O(10): the bound is not met by accident.
    assert reference.logits.abs().max() > 10


def _check_eval(result, reference, layout: str) -> None:
    expected = [[p, c + [EOS], r + [EOS]] for p, c, r in reference.pairs]
    assert result["eval_ids"] == expected, f"{layout}: chat-template token ids differ"
    for i, (got, ref) in enumerate(zip(result["eval_logp"], reference.eval_logp)):
        for side, g, r in zip(("chosen", "rejected"), got, ref):
            assert abs(g - r) <= LOGP_TOL, f"{layout} pair {i} {side}: {g} vs {r}"


def _check_greedy(result, reference, layout: str) -> None:
    """``generate --out`` (k=1, temperature 0) equals transformers' greedy ``generate``."""
    lines = (Path(result["generate_dir"]) / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["prompt_index"], r["candidate"]) for r in records] == [(i, 0) for i in
                                                                      range(len(GREEDY))]
    reasons = []
    for record, (prompt_ids, hf_new) in zip(records, reference.greedy):
        assert record["token_ids"] == hf_new, f"{layout}: {record['prompt_id']} differs"
        stopped = hf_new[-1] == EOS
        assert record["finish_reason"] == ("stop" if stopped else "length")
        content = hf_new[:-1] if stopped else hf_new
        assert record["text"] == reference.tok.decode(content)
        reasons.append(record["finish_reason"])
        # The Eq. 1 parts: recomputed from transformers' entropies of the same tokens.
        _, entropy = _token_stats(reference.model, prompt_ids, hf_new)
        parts = _eq1_parts(reference, hf_new, entropy, stopped)
        for key in ("h_final", "fork_entropy", "score"):
            assert abs(record[key] - parts[key]) <= STAT_TOL, (layout, key, record, parts)
    assert "stop" in reasons and "length" in reasons  # both endings are exercised


def _eq1_parts(reference, ids: list[int], entropy: torch.Tensor, stopped: bool) -> dict:
    """Eq. 1 with the scorer's pure functions (unit-tested) on transformers' entropies."""
    from megatron_sega.config import ScoringConfig
    from megatron_sega.data import Tokenizer
    from megatron_sega.sega import answer_span_mask, entropy_scores

    sc = ScoringConfig()  # the defaults, as in the spawn's config
    tok = Tokenizer.from_path(str(reference.hf_dir))
    content = torch.ones(1, len(ids), dtype=torch.bool)
    if stopped:
        content[0, -1] = False
    answer, reasoning = answer_span_mask(torch.tensor([ids]), content,
                                         tok.marker_variants(sc.marker),
                                         final_fraction=sc.final_fraction)
    parts = entropy_scores(entropy.unsqueeze(0), answer, reasoning, top_m=sc.top_m, lam=sc.lam)
    return {"h_final": float(parts.h_final[0]), "fork_entropy": float(parts.fork[0]),
            "score": float(parts.score[0])}


def test_pp2_logits_equal_transformers(pp2, reference):
    _check_logits(pp2["logits"], reference, "pp=2")


def test_pp2_chat_eval_equals_transformers_logprobs(pp2, reference):
    _check_eval(pp2, reference, "pp=2")


def test_pp2_greedy_generate_equals_transformers(pp2, reference):
    _check_greedy(pp2, reference, "pp=2")


def test_pp2_sampler_statistics_equal_transformers(pp2, reference):
    """log pi and H_t of sampled tokens, as the sampler hands them to Eq. 1 and Eq. 2."""
    s = pp2["sampled"]
    for i, prompt in enumerate(s["prompt_ids"]):
        n = int(s["lengths"][i])
        ids = s["response_ids"][i, :n].tolist()
        assert n > 0
        logp, entropy = _token_stats(reference.model, prompt, ids)
        assert (s["logp"][i, :n].double() - logp).abs().max() <= STAT_TOL
        assert (s["entropy"][i, :n].double() - entropy).abs().max() <= STAT_TOL
    # Two candidates per prompt at temperature 1 differ (the samples are not all greedy).
    assert not torch.equal(s["response_ids"][0], s["response_ids"][1])


def test_pp2_one_sft_step(pp2, reference):
    assert pp2["sft_ids"] == [[p, c + [EOS]] for p, c, _ in reference.pairs[:2]]
    sft = pp2["sft"]
    assert abs(sft["loss"] - reference.sft_loss) <= LOGP_TOL, (sft["loss"], reference.sft_loss)
    assert sft["update_successful"] and sft["lr"] > 0 and 0 < sft["grad_norm"] < 1e3
    assert pp2["sft_param_change"] > 0
    assert pp2["sft_loss_after"] < sft["loss"], "one step on the batch did not lower its loss"


def test_pp2_one_sega_step(pp2):
    m = pp2["sega"]
    import math

    assert not m["skipped_update"] and math.isfinite(m["loss"])
    assert m["valid_fraction"] > 0 and m["response_length_mean"] > 0
    assert m["groups_skipped_fraction"] < 1, "no group had distinct scores: nothing was trained"
    assert 0 < m["grad_norm"] < 1e3 and pp2["sega_param_change"] > 0
    assert math.isfinite(m["score_mean"]) and m["h_final_mean"] >= 0


def test_tp3_logits_equal_transformers(tp3, reference):
    _check_logits(tp3["logits"], reference, "tp=3")


def test_tp3_chat_eval_equals_transformers_logprobs(tp3, reference):
    _check_eval(tp3, reference, "tp=3")


def test_tp3_greedy_generate_equals_transformers(tp3, reference):
    _check_greedy(tp3, reference, "tp=3")
