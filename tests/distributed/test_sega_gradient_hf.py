"""An independent check of the SEGA gradient, and of the true vocabulary, against transformers.

A tiny random ``LlamaForCausalLM`` whose vocabulary (512 rows) is larger than its tokenizer's
(the tiny tokenizer's 460 tokens; rows 460..511 are unreachable and made large, so that they
would dominate every distribution they entered) is loaded into a session through the project's
HF mapping (``hf_to_megatron_state_dict``). The session samples k candidates per prompt with its
sampler, scores them (Eq. 1), builds the batch and runs one update's forward/backward through
Megatron's schedule (``sega_loss_fn``, ``sequence_sum``). Reference, float64 transformers on the
same weights and the same token sequences, over the tokenizer's 460 columns:

    loss = -sum_i A_i * sum_t log pi(a_it | q, a_<t) / G,

its autograd gradient mapped to Megatron's names. Also checked: the sampler's entropies and the
teacher-forced log-probs equal transformers' over the 460 columns (not over all 512 rows), no
sampled id is unreachable, and the session says that the two vocabularies differ."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

MODEL_VOCAB, GROUPS, K, NEW = 512, 2, 4, 8
PROMPTS = ["What is 2 + 3?", "Add 10 and 7."]


def _hf_model(tokens: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.08,
                         tie_word_embeddings=False, attn_implementation="eager",
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
        model.lm_head.weight[tokens:] *= 20.0  # unreachable rows: large logits if scored
    return model


def _hf_logp_and_entropy(model, rows: list[list[int]], vocab: int):
    """Per row: log-softmax over the first ``vocab`` columns at every position [L, vocab]."""
    out = []
    for ids in rows:
        logits = model(torch.tensor([ids])).logits[0].double()[:, :vocab]
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def _update(root: str) -> dict:
    from megatron_sega.convert.hf import hf_to_megatron_state_dict, megatron_to_hf_state_dict
    from megatron_sega.convert.layout import gather_tp, load_full_state_dict
    from megatron_sega.config import load_config
    from megatron_sega.data import TINY_TOKENIZER_DIR
    from megatron_sega.training.engine import forward_backward
    from megatron_sega.training.sega import (
        at_label_positions, rollout_batch, sega_loss_fn, training_microbatches,
    )
    from megatron_sega.training.rollouts import make_sampler, sampling_params, score_rollout
    from megatron_sega.training.session import open_session
    from megatron_sega.training.teacher_forced import token_stats

    config = load_config(None, [
        f"model.hf_config={root}/hf", f"model.tokenizer={TINY_TOKENIZER_DIR}", "model.dtype=fp32",
        "parallel.device=cpu", "parallel.distributed_optimizer=false", "data.template=none",
        f"sega.k={K}", "sega.micro_batch_size=3", f"sampling.max_new_tokens={NEW}",
        "sampling.top_p=1.0", "sampling.seed=3", "scoring.marker=", "scoring.top_m=2"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        session = open_session(config, train=True)
    hf = _hf_model(session.tokenizer.vocab_size)
    padded = session.spec.padded_vocab_size(1)
    full = hf_to_megatron_state_dict(hf.state_dict(), session.spec, padded)
    load_full_state_dict(session.chunks[0].module, full, 1, 0)
    session.optimizer.reload_model_params()

    prompts = [session.formatter.encode_prompt(p) for p in PROMPTS]
    rows = [p for p in prompts for _ in range(K)]
    rollout = make_sampler(session).generate(rows, sampling_params(session), list(range(len(rows))),
                                             session.tokenizer.decode)
    scored = score_rollout(session, rollout, K)
    batch = rollout_batch(session, rollout)
    stats = token_stats(session.chunks, session.runtime, batch, session.vocab_size,
                        micro_batch_size=3)
    micro = training_microbatches(session, batch, scored.advantage,
                                  {"old_logp": at_label_positions(batch, rollout, rollout.logp)})
    forward_backward(session.chunks, session.runtime, micro,
                     sega_loss_fn(session, float(GROUPS), use_old=False, use_ref=False))
    grads = megatron_to_hf_state_dict(gather_tp(session.chunks[0].module, None, "grad"),
                                      session.spec)
    return {"printed": printed.getvalue(), "vocab": [session.vocab_size, session.spec.vocab_size],
            "sequences": [row + rollout.response_ids[i, :int(n)].tolist()
                          for i, (row, n) in enumerate(zip(rows, rollout.lengths))],
            "prompt_lengths": [len(r) for r in rows], "lengths": rollout.lengths,
            "entropy": rollout.entropy, "logp": rollout.logp, "tf_logp": stats["logp"],
            "advantage": scored.advantage, "grads": grads}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from megatron_sega.data import TINY_TOKENIZER_DIR, Tokenizer

    root = tmp_path_factory.mktemp("sega_grad")
    tokens = Tokenizer.from_path(TINY_TOKENIZER_DIR).vocab_size
    _hf_model(tokens).save_pretrained(root / "hf")
    return run_distributed(_update, 1, str(root))[0], _hf_model(tokens).double(), tokens


def test_true_vocabulary_is_the_tokenizers(result):
    got, hf, tokens = result
    assert got["vocab"] == [tokens, MODEL_VOCAB] == [460, 512]
    assert f"the model has {MODEL_VOCAB} vocabulary rows but the tokenizer {tokens} tokens" \
        in got["printed"]
    seqs = got["sequences"]
    assert max(max(s) for s in seqs) < tokens
    with torch.no_grad():
        true = _hf_logp_and_entropy(hf, seqs, tokens)
        every_row = _hf_logp_and_entropy(hf, seqs, MODEL_VOCAB)
    worst = {"entropy": 0.0, "logp": 0.0, "tf_logp": 0.0}
    gap = 0.0
    for i, (seq, p, n) in enumerate(zip(seqs, got["prompt_lengths"], got["lengths"].tolist())):
        positions = torch.arange(p - 1, p - 1 + n)  # position t predicts token t + 1
        targets = torch.tensor(seq[p:])
        logp = true[i][positions].gather(1, targets[:, None])[:, 0]
        entropy = -(true[i][positions].exp() * true[i][positions]).sum(-1)
        wide = -(every_row[i][positions].exp() * every_row[i][positions]).sum(-1)
        worst["entropy"] = max(worst["entropy"], float((got["entropy"][i, :n] - entropy).abs().max()))
        worst["logp"] = max(worst["logp"], float((got["logp"][i, :n] - logp).abs().max()))
        tf = got["tf_logp"][i, p - 1:p - 1 + n]
        worst["tf_logp"] = max(worst["tf_logp"], float((tf - logp).abs().max()))
        gap = max(gap, float((wide - entropy).abs().max()))
    assert all(v < 1e-4 for v in worst.values()), worst
    assert gap > 0.5, "the unreachable rows would change the entropies: the check has teeth"


def test_one_update_gradient_matches_autograd_through_transformers(result):
    got, hf, tokens = result
    adv = got["advantage"].double()
    assert (adv != 0).sum() >= 4 and adv.abs().max() > 1e-3  # both groups take part
    hf.zero_grad()
    logps = _hf_logp_and_entropy(hf, got["sequences"], tokens)
    loss = 0.0
    for i, (seq, p) in enumerate(zip(got["sequences"], got["prompt_lengths"])):
        targets = torch.tensor(seq[p:])
        logp = logps[i][p - 1:len(seq) - 1].gather(1, targets[:, None]).sum()
        loss = loss - adv[i] * logp / GROUPS
    loss.backward()
    ref = {name: param.grad.float() for name, param in hf.named_parameters()}
    assert set(ref) == set(got["grads"])
    for name, want in ref.items():
        err = float((got["grads"][name] - want).abs().max())
        assert err <= 1e-4 * float(want.abs().max()) + 1e-9, f"{name}: {err:.3g}"
    # The unreachable output rows get no gradient; with all 512 rows in the softmax they would.
    assert not got["grads"]["lm_head.weight"][tokens:].any()
    assert float(ref["lm_head.weight"].abs().max()) > 0
