"""LoRA on one process (issue 21): the adapted model starts as its base, bitwise; only the
adapters train; switching them off gives the base again; the sampler's lean forward applies
them as Megatron's forward does; the reference under LoRA is the policy itself, adapters off."""

import torch

from megatron_sega import runtime
from megatron_sega.convert.layout import load_full_state_dict
from megatron_sega.models import preset
from megatron_sega.models.builder import build_model
from megatron_sega.models.init import random_full_state_dict
from megatron_sega.models.lora import LoraSettings, adapters_disabled
from tests.unit.test_decode import lean_vs_megatron


def _models(rank: int = 4):
    rt = runtime.setup(1, 1, device="cpu")
    spec = preset("tiny", vocab_size=300)
    full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=3)
    base = build_model(spec, rt, use_te=False)
    lora = build_model(spec, rt, use_te=False, lora=LoraSettings(rank, 2.0 * rank), lora_seed=1)
    for m in (base, lora):
        load_full_state_dict(m, full, 1, 0)
    return rt, base, lora


def test_lora_starts_as_the_base_bitwise_and_only_adapters_train():
    rt, base, lora = _models()
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)[None].expand(2, -1)
    assert torch.equal(base(tokens, positions, None), lora(tokens, positions, None))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * 4 * 2 and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert lora.lora_trainable == sum(p.numel() for n, p in lora.named_parameters()
                                      if n in trainable)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith(".lora_b"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    adapted = lora(tokens, positions, None)
    assert (adapted - base(tokens, positions, None)).abs().max() > 1e-3
    with adapters_disabled([lora]):
        assert torch.equal(lora(tokens, positions, None), base(tokens, positions, None))
    # The sampler's lean forward applies the adapters (and their switch) as Megatron's does.
    lora.eval()
    is_pad = torch.zeros(2, 9, dtype=torch.bool)
    is_pad[0, :2] = True
    assert lean_vs_megatron(lora, rt, is_pad, steps=3) <= 1e-5
    with adapters_disabled([lora]):
        off = lean_vs_megatron(lora, rt, is_pad, steps=1)
    assert off <= 1e-5


def test_the_lora_reference_is_the_policy_with_adapters_off():
    """DPO's and SEGA's default reference under LoRA builds no second model."""
    from megatron_sega.config import load_config
    from megatron_sega.models.lora import BaseModel
    from megatron_sega.training.session import load_reference, open_session

    config = load_config(None, ["lora.rank=4", "parallel.device=cpu", "model.dtype=fp32"])
    session = open_session(config, train=False)
    reference = load_reference(session)
    assert isinstance(reference, BaseModel)
    assert len(reference) == len(session.chunks)
    assert all(a is b for a, b in zip(reference, session.chunks))


def test_the_planner_counts_the_adapters_the_model_holds():
    from megatron_sega.plan import memory as mem

    _, _, lora = _models(rank=8)
    spec = lora.llama_spec
    assert mem.adapter_parameters(spec, 1, 1, 8, ("linear_qkv", "linear_proj", "linear_fc1",
                                                  "linear_fc2")) == lora.lora_trainable
