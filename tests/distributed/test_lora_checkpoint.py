"""The fingerprint of a LoRA checkpoint's base (issue 21, item 5): the same for the same weights
at TP=1, TP=2 and PP=2, loaded at fp32 or bf16, and as the converter computes it from whole
tensors; a single changed weight changes its key's fingerprint. Tolerance: ``RTOL`` = 1e-9
relative on float64 sums (their order differs between layouts)."""

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed


def _spec():
    from megatron_sega.models import preset

    return preset("tiny", vocab_size=500)


def _full(tp: int, changed: bool = False) -> dict:
    from megatron_sega.models.init import random_full_state_dict

    spec = _spec()
    full = random_full_state_dict(spec, spec.padded_vocab_size(tp), seed=0)
    if changed:  # one element of one layer, by more than bf16's resolution there
        full["decoder.layers.1.mlp.linear_fc2.weight"][3, 5] += 0.25
    return full


def _fingerprint(tp: int, pp: int, dtype: torch.dtype = torch.float32,
                 changed: bool = False) -> dict:
    from megatron_sega import runtime
    from megatron_sega.checkpoint.fingerprint import model_fingerprint
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.lora import LoraSettings
    from megatron_sega.training.engine import build_training_model

    spec = _spec()
    rt = runtime.setup(tp, pp)
    chunks = build_training_model(spec, rt, dtype, lora=LoraSettings(4, 8.0), lora_seed=7)
    load_full_state_dict(chunks, _full(tp, changed), rt.tp, rt.tp_rank)
    for chunk in chunks:  # trained adapters are no part of the base
        for name, p in chunk.named_parameters():
            if name.endswith(".lora_b"):
                p.data.normal_()
    return model_fingerprint(chunks, spec.vocab_size)


def test_the_base_fingerprint_is_layout_and_dtype_free_and_sees_a_changed_weight():
    from megatron_sega.checkpoint.fingerprint import differing, tensors_fingerprint

    tp2 = run_distributed(_fingerprint, 2, 2, 1)
    pp2 = run_distributed(_fingerprint, 2, 1, 2)
    assert tp2[0] == tp2[1] and pp2[0] == pp2[1]  # every rank gets the whole fingerprint
    one = _fingerprint(1, 1)
    assert len(one) >= 9 and "embedding.word_embeddings.weight" in one
    assert "decoder.layers.mlp.linear_fc1.weight" in one
    assert not any(k.endswith((".lora_a", ".lora_b")) for k in one)
    for other in (tp2[0], pp2[0], _fingerprint(1, 1, torch.bfloat16),
                  tensors_fingerprint(_full(1).items(), _spec().vocab_size),
                  tensors_fingerprint(_full(2).items(), _spec().vocab_size)):
        assert differing(one, other) == []
    assert differing(one, _fingerprint(1, 1, changed=True)) == \
        ["decoder.layers.mlp.linear_fc2.weight"]
    # The padded vocabulary rows (TP=1 and TP=2 pad differently) are no part of it.
    full = _full(1)
    full["embedding.word_embeddings.weight"][_spec().vocab_size:] += 1.0
    assert differing(one, tensors_fingerprint(full.items(), _spec().vocab_size)) == []
