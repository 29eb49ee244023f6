"""The SFT loss sees response targets only (METHOD.md, stage A: "loss on response tokens only").

Microbatches are built the way ``sft_step`` builds them (``tokenize_sft`` -> ``collate`` ->
``sft_microbatches``) from the shipped demo data and the tiny tokenizer (chat template), and
``sft_loss_fn`` runs on fixed random logits with padded vocabulary columns, as a TP=1 rank sees
them. Rewriting every target the mask excludes (prompt targets and padding) leaves the loss and
its gradient bitwise unchanged; rewriting one response target changes the loss. The loss also
equals a float64 reference, ``-sum(response log-probs) / global response tokens``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_sega.data import (
    TINY_TOKENIZER_DIR, PromptFormatter, Tokenizer, collate, read_pairs, tokenize_sft,
)
from megatron_sega.training.sft import sft_loss_fn, sft_microbatches

REPO = Path(__file__).resolve().parents[2]
N_EXAMPLES, MICRO = 6, 2
TP1 = SimpleNamespace(tp=1, tp_rank=0, tp_group=None)  # what vocab_shard_info reads


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.from_path(TINY_TOKENIZER_DIR)
    pairs, _ = read_pairs(REPO / "examples/demo_data/train.jsonl")
    examples = tokenize_sft(pairs[:N_EXAMPLES], PromptFormatter(tok, template="chat"))
    batch = collate(examples, tok.pad_id)
    vocab = tok.vocab_size
    padded = 512  # > vocab: the padding columns must not enter the softmax
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(batch.size, batch.tokens.shape[1], padded, generator=g)
    logits[..., vocab:] = 50.0  # would dominate the softmax if they were not excluded
    return SimpleNamespace(tok=tok, examples=examples, batch=batch, vocab=vocab, logits=logits)


def _loss_and_grad(s, labels: torch.Tensor):
    """Summed SFT loss over the microbatches of ``s.batch`` (with ``labels``) and d loss/d logits."""
    batch = s.batch
    global_tokens = float(batch.loss_mask.sum())
    loss_fn = sft_loss_fn(s.vocab, global_tokens, TP1)
    batch = type(batch)(batch.tokens, labels, batch.loss_mask, batch.prompt_lengths,
                        batch.lengths, batch.ids)
    logits = s.logits.clone().requires_grad_(True)
    total = torch.zeros(())
    for i, mb in enumerate(sft_microbatches(batch, MICRO)):
        loss, metrics = loss_fn(logits[i * MICRO:(i + 1) * MICRO], mb)
        assert float(metrics["tokens"]) == float(mb["loss_mask"].sum())
        total = total + loss
    total.backward()
    return total.detach(), logits.grad


def test_mask_is_exactly_the_response_targets(setup):
    """Position t predicts token t+1: the mask is 1 on [p-1, n-1), and the targets there are the
    response ids (ending with the end-of-turn token that SFT appends)."""
    batch = setup.batch
    for b, ex in enumerate(setup.examples):
        p, n = len(ex.prompt_ids), ex.length
        expected = torch.zeros(batch.tokens.shape[1])
        expected[p - 1:n - 1] = 1.0
        assert torch.equal(batch.loss_mask[b], expected), ex.id
        assert batch.labels[b, p - 1:n - 1].tolist() == ex.response_ids
        assert ex.response_ids[-1] == PromptFormatter(setup.tok, "chat").end_of_turn_id
    # not vacuous: prompts are long, and rows are padded to different lengths
    assert (batch.loss_mask == 0).sum() > batch.loss_mask.sum()
    assert len(set(batch.lengths.tolist())) > 1


def test_prompt_targets_never_change_the_loss(setup):
    batch = setup.batch
    loss, grad = _loss_and_grad(setup, batch.labels)

    # float64 reference over the true vocabulary
    logp = torch.log_softmax(setup.logits[..., :setup.vocab].double(), dim=-1)
    token_logp = logp.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    ref = -(token_logp * batch.loss_mask.double()).sum() / batch.loss_mask.double().sum()
    assert float(loss) == pytest.approx(float(ref), rel=1e-6, abs=0)

    masked = batch.loss_mask == 0
    g = torch.Generator().manual_seed(1)
    for trial in range(3):  # prompt and padding targets rewritten with random token ids
        labels = batch.labels.clone()
        labels[masked] = torch.randint(0, setup.vocab, (int(masked.sum()),), generator=g)
        assert (labels != batch.labels).sum() > 0.9 * masked.sum()
        loss2, grad2 = _loss_and_grad(setup, labels)
        assert torch.equal(loss2, loss), (trial, float(loss2), float(loss))
        assert torch.equal(grad2, grad), trial
    # the gradient never reaches a masked position
    assert torch.count_nonzero(grad[masked]) == 0
    assert torch.count_nonzero(grad[~masked]) > 0


def test_a_response_target_does_change_the_loss(setup):
    batch = setup.batch
    loss, _ = _loss_and_grad(setup, batch.labels)
    row = 3
    t = int(batch.prompt_lengths[row]) + 1  # a response target of row 3
    assert batch.loss_mask[row, t] == 1
    labels = batch.labels.clone()
    labels[row, t] = (labels[row, t] + 7) % setup.vocab
    loss2, _ = _loss_and_grad(setup, labels)
    assert float(loss2) != float(loss)
    # by exactly the change in that target's log-prob, over the global token count
    logp = torch.log_softmax(setup.logits[row, t, :setup.vocab].double(), dim=-1)
    delta = (logp[batch.labels[row, t]] - logp[labels[row, t]]) / batch.loss_mask.sum()
    assert float(loss2 - loss) == pytest.approx(float(delta), rel=1e-4)
