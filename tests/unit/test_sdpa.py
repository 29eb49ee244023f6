"""The SDPA core attention equals Megatron-Core's local attention (fp32, CPU, within 1e-5)."""

import torch

from megatron_sega import runtime
from megatron_sega.convert.layout import load_full_state_dict
from megatron_sega.models.init import random_full_state_dict
from megatron_sega.models import preset
from megatron_sega.models.builder import build_model, layer_spec
from megatron_sega.models.sdpa import SDPAttention


def test_sdpa_matches_local_attention():
    spec = preset("tiny", vocab_size=300)
    rt = runtime.setup(1, 1, device="cpu")
    full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=3)
    logits = {}
    for attention in ("local", "sdpa"):
        model = build_model(spec, rt, attention=attention, use_te=False)
        core = model.decoder.layers[0].self_attention.core_attention
        assert isinstance(core, SDPAttention) == (attention == "sdpa")
        load_full_state_dict(model, full, 1, 0)
        tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(24).unsqueeze(0).expand(2, -1)
        causal = torch.ones(1, 1, 24, 24, dtype=torch.bool).triu(1)
        with torch.no_grad():
            logits[attention, "mask"] = model(tokens, positions, causal)
            logits[attention, "causal"] = model(tokens, positions, None) if attention == "sdpa" \
                else logits[attention, "mask"]
    for case in ("mask", "causal"):
        diff = (logits["sdpa", case] - logits["local", "mask"]).abs().max().item()
        assert diff <= 1e-5, (case, diff)


def test_auto_attention_is_sdpa_without_te():
    auto = layer_spec(use_te=False, attention="auto")
    assert auto.submodules.self_attention.submodules.core_attention is SDPAttention
    local = layer_spec(use_te=False, attention="local")
    assert local.submodules.self_attention.submodules.core_attention is not SDPAttention
