"""Issue 20 items 6 and 7, checked on CPU through the calls a CUDA run would make.

Item 6: which SDPA kernel a GPU can use depends on the call: flash attention takes
``is_causal`` with ``enable_gqa`` but no explicit mask; the memory-efficient kernel takes a mask
but not ``enable_gqa``; the math kernel takes anything, at O(s^2) memory. These tests record
every ``scaled_dot_product_attention`` call of a training forward and of the sampler's prefill
and decode steps on a GQA model (4 query heads, 2 key/value heads) and check its form.
``tests/unit/test_gpu.py`` runs the same paths on a GPU with the math kernel disabled.

Item 7: the sampler's KV cache is dropped when a request is done (not held through the
training step that follows) and before the next batch's cache is allocated."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from megatron_sega import runtime
from megatron_sega.convert.layout import load_full_state_dict
from megatron_sega.models import preset
from megatron_sega.models.builder import build_model
from megatron_sega.models.init import random_full_state_dict
from megatron_sega.sampling import Sampler, SamplingParams
from megatron_sega.sampling.decode import LeanForward, MegatronForward


@pytest.fixture()
def rt():
    return runtime.setup(1, 1, device="cpu")


def _model(rt, attention="sdpa"):
    spec = preset("tiny", vocab_size=300)
    model = build_model(spec, rt, use_te=False, attention=attention)
    load_full_state_dict(model, random_full_state_dict(spec, spec.padded_vocab_size(1), seed=4),
                         1, 0)
    assert spec.num_attention_heads == 4 and spec.num_query_groups == 2
    return model


@pytest.fixture()
def sdpa_calls(monkeypatch):
    """Every SDPA call: the shapes of q and k and the keyword arguments."""
    calls = []
    real = F.scaled_dot_product_attention

    def record(q, k, v, *args, **kwargs):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape),
                      "mask": kwargs.get("attn_mask") is not None,
                      "is_causal": kwargs.get("is_causal", False),
                      "enable_gqa": kwargs.get("enable_gqa", False)})
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    return calls


def test_training_forward_calls_causal_sdpa_with_gqa(rt, sdpa_calls):
    """The engine passes no mask to SDPA layers, so each call is ``is_causal`` + ``enable_gqa``
    (flash's form); Megatron's local attention still gets the explicit mask it needs."""
    from megatron_sega.training.engine import forward_backward, training_mask

    model = _model(rt)
    tokens = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    seen = []

    def loss_fn(logits, microbatch):
        seen.append(logits.detach().clone())
        return logits.float().sum() * 0.0, {}

    forward_backward([model], rt, [{"tokens": tokens}], loss_fn, forward_only=True)
    assert len(sdpa_calls) == 4  # one per layer
    assert all(c["is_causal"] and c["enable_gqa"] and not c["mask"] for c in sdpa_calls), sdpa_calls
    with torch.no_grad():  # the same logits as with Megatron's explicit causal mask
        explicit = model(tokens, torch.arange(12).unsqueeze(0).expand(2, -1),
                         torch.ones(1, 1, 12, 12, dtype=torch.bool).triu(1))
    assert (seen[0] - explicit).abs().max().item() <= 1e-5
    assert training_mask([model], 12, "cpu") is None
    local = training_mask([_model(rt, "local")], 12, "cpu")
    assert local is not None and local.shape == (1, 1, 12, 12)


@pytest.mark.parametrize("padded", [False, True])
def test_sampler_prefill_and_decode_calls(rt, sdpa_calls, padded):
    """Prefill of unpadded rows: ``is_causal`` + ``enable_gqa`` (flash). Padded rows: the mask,
    with keys and values repeated to every head (memory-efficient: no ``enable_gqa``). Decode:
    each query group folded onto its key/value head, a mask, no ``enable_gqa``. The logits equal
    Megatron's forward either way."""
    model = _model(rt).eval()
    batch, prompt, new = 3, 6, 3
    tokens = torch.randint(3, 300, (batch, prompt), generator=torch.Generator().manual_seed(1))
    is_pad = torch.zeros(batch, prompt + new, dtype=torch.bool)
    if padded:
        is_pad[1, :2] = True
    out = {}
    for name, forward in (("lean", LeanForward(model, None)), ("megatron", MegatronForward(model))):
        forward.start(is_pad, prompt + new)
        sdpa_calls.clear()
        logits = [forward(tokens)]
        calls = len(sdpa_calls)
        for i in range(new):
            logits.append(forward(tokens[:, i:i + 1]))
        out[name] = logits
        if name == "lean":
            prefill, decode = sdpa_calls[:calls], sdpa_calls[calls:]
    assert len(prefill) == 4 and len(decode) == 4 * new
    for c in prefill:
        if padded:
            assert c["mask"] and not c["is_causal"] and not c["enable_gqa"], c
            assert c["k"][1] == c["q"][1] == 4, c  # keys repeated to the 4 query heads
        else:
            assert c["is_causal"] and c["enable_gqa"] and not c["mask"], c
            assert c["k"][1] == 2, c
    for c in decode:
        assert c["mask"] and not c["enable_gqa"] and c["q"][1] == c["k"][1] == 2, c
    for a, b in zip(out["lean"], out["megatron"]):
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lean", [True, False])
def test_kv_cache_freed_after_generate_and_before_the_next_batch(rt, monkeypatch, lean):
    """Item 7: nothing of the cache outlives ``generate`` (the training step that follows gets
    that memory), and a request split into two batches allocates the second batch's cache only
    after the first one's is gone (the lean forward allocates it in ``start``; Megatron's
    forward, in its inference context at the first call, after ``start`` dropped the old one)."""
    model = _model(rt)
    sampler = Sampler(model, rt, 300, pad_id=0, lean=lean, max_batch_tokens=3 * 14)
    forward = sampler.forwards[0]
    assert isinstance(forward, LeanForward) == lean
    alive_at_allocation = []
    previous: list = []

    def cache_tensors(f):
        if isinstance(f, LeanForward):
            return [t for pair in f.cache for t in pair]
        return [] if f.ctx is None else [t for pair in f.ctx.key_value_memory_dict.values()
                                        for t in pair]

    def alive() -> int:
        gc.collect()
        return sum(r() is not None for r in previous)

    cls = type(forward)
    real_call = cls.__call__

    def call(self, tokens, hidden=None):
        if not lean and not self.ctx.key_value_memory_dict:  # about to allocate
            alive_at_allocation.append(alive())
        out = real_call(self, tokens, hidden)
        previous[:] = [weakref.ref(t) for t in cache_tensors(self)]
        return out

    monkeypatch.setattr(cls, "__call__", call)
    if lean:
        real_allocate = cls._allocate

        def allocate(self, shape, device):  # one layer's cache
            alive_at_allocation.append(alive())
            return real_allocate(self, shape, device)

        monkeypatch.setattr(cls, "_allocate", allocate)
    prompts = [[5, 6, 7, 8]] * 6  # 6 rows of 4 + 10 positions, 3 rows a batch
    sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10))
    batches = 2 * (4 if lean else 1)  # the lean forward allocates layer by layer
    assert len(alive_at_allocation) == batches and previous, alive_at_allocation
    assert not any(alive_at_allocation), alive_at_allocation
    assert alive() == 0
    assert cache_tensors(forward) == []
