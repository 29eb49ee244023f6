"""The sampler's lean forward equals Megatron-Core's forward (TP=1, fp32, CPU, within 1e-5):
prefill of a left-padded batch, decode steps, and a compaction of the batch in between. The
TP / PP layouts run it in tests/distributed/test_sampler.py."""

import pytest
import torch

from megatron_sega import runtime
from megatron_sega.convert.layout import load_full_state_dict
from megatron_sega.models.init import random_full_state_dict
from megatron_sega.models import preset
from megatron_sega.models.builder import build_model
from megatron_sega.sampling.decode import LeanForward, MegatronForward, lean_unsupported


@pytest.fixture(scope="module")
def model():
    spec = preset("tiny", vocab_size=300)
    rt = runtime.setup(1, 1, device="cpu")
    m = build_model(spec, rt, use_te=False)
    load_full_state_dict(m, random_full_state_dict(spec, spec.padded_vocab_size(1), seed=4), 1, 0)
    return m.eval(), rt


def test_lean_forward_equals_megatron(model):
    m, rt = model
    assert lean_unsupported(m) is None
    batch, prompt, new = 3, 7, 5
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 300, (batch, prompt), generator=g)
    is_pad = torch.zeros(batch, prompt + new, dtype=torch.bool)
    is_pad[1, :3] = is_pad[2, :6] = True  # left padding of 3 and 6 positions
    steps = torch.randint(3, 300, (new, batch), generator=g)
    out = {}
    for name, forward in (("lean", LeanForward(m, rt.tp_group)), ("megatron", MegatronForward(m))):
        forward.start(is_pad, prompt + new)
        logits = [forward(tokens)]
        for i in range(new):
            if i == 2:  # drop row 0: both caches keep rows 1 and 2
                forward.compact(torch.tensor([1, 2]))
            rows = steps[i] if i < 2 else steps[i, 1:]
            logits.append(forward(rows.unsqueeze(1)))
        out[name] = logits
    for step, (a, b) in enumerate(zip(out["lean"], out["megatron"])):
        assert a.shape == b.shape, step
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, (step, diff)


def lean_vs_megatron(model, rt, is_pad: torch.Tensor, steps: int) -> float:
    """Largest |logit| difference between the lean forward and Megatron's over a prefill of
    ``is_pad``'s rows (6 tokens) and ``steps`` decode steps."""
    tokens = torch.randint(3, 300, (is_pad.shape[0], 6), generator=torch.Generator().manual_seed(0))
    out = []
    for forward in (LeanForward(model, rt.tp_group), MegatronForward(model)):
        forward.start(is_pad, is_pad.shape[1])
        out.append([forward(tokens)] + [forward(tokens[:, i:i + 1]) for i in range(steps)])
    return max((a - b).abs().max().item() for a, b in zip(*out))


def test_lean_forward_runs_megatrons_local_core_attention():
    """The lean forward computes softmax attention through SDPA whatever module the model
    trains with: Megatron's local DotProductAttention too (it was refused before issue 20)."""
    spec = preset("tiny", vocab_size=300)
    rt = runtime.setup(1, 1, device="cpu")
    local = build_model(spec, rt, use_te=False, attention="local").eval()
    load_full_state_dict(local, random_full_state_dict(spec, spec.padded_vocab_size(1), seed=4),
                         1, 0)
    assert lean_unsupported(local) is None
    is_pad = torch.zeros(2, 8, dtype=torch.bool)
    is_pad[0, :2] = True
    assert lean_vs_megatron(local, rt, is_pad, steps=2) <= 1e-5
