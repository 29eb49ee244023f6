"""Transformer Engine and sequence parallelism, as far as a CPU without TE can check them.

- Sequence parallelism is refused with one line where it cannot run: on CPU (through the CLI)
  and on a GPU without TE; with TE present but ``model.attention: sdpa|local`` (local layers,
  whose torch norms refuse it) the builder refuses it too.
- ``model.attention`` is honoured when TE imports: 'sdpa' and 'local' build the local layers
  (a real model, run forward), only 'auto' asks for TE's layer spec. TE's presence is simulated
  by answering the import check; TE's spec itself cannot be built without TE, so for 'auto' the
  test records which spec function was asked for.
- The sequence-parallel padding of training microbatches (to a multiple of TP, at the end, with
  a zero loss mask) leaves the loss and the gradients unchanged: checked on a real model.
- The sampler's ``sequence_parallel_off`` switch restores every flag it turned off.
What stays GPU-only and unverified: training and sampling with TE and sequence parallelism.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sega import runtime
from megatron_sega.convert.layout import load_full_state_dict
from megatron_sega.models.init import random_full_state_dict
from megatron_sega.models import ModelConfigError, preset
from megatron_sega.models import builder
from megatron_sega.models.sdpa import CachedRotarySelfAttention, SDPAttention
from megatron_sega.runtime import ParallelConfigError, validate_parallel_sizes


@pytest.fixture(scope="module")
def rt():
    return runtime.setup(1, 1, device="cpu")


def test_sequence_parallel_refused_on_cpu_with_one_line(capsys):
    from megatron_sega import cli

    code = cli.main(["sft", "parallel.sequence_parallel=true", "parallel.device=cpu",
                     "data.train=examples/demo_data/train.jsonl"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("megatron-sega sft: error: parallel.sequence_parallel is supported on GPU "
                   "only; set it to false for CPU runs")


def test_sequence_parallel_refused_on_gpu_without_te():
    with pytest.raises(ParallelConfigError, match=r"needs Transformer Engine .* not installed"):
        validate_parallel_sizes(2, 1, 2, sequence_parallel=True, on_gpu=True,
                                transformer_engine=False)
    assert validate_parallel_sizes(2, 1, 2, sequence_parallel=True, on_gpu=True,
                                   transformer_engine=True) == 1


def test_setup_checks_for_te_before_anything_is_allocated(monkeypatch):
    from megatron_sega.runtime import distributed

    monkeypatch.setattr(distributed, "choose_device", lambda device=None: "cuda")
    with pytest.raises(ParallelConfigError, match="needs Transformer Engine"):
        distributed.setup(1, 1, sequence_parallel=True)


def test_attention_is_honoured_when_te_imports(rt, monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    monkeypatch.setattr(builder, "have_transformer_engine", lambda: True)
    asked = []
    local = gpt_layer_specs.get_gpt_layer_local_spec
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda *a, **k: asked.append("te") or local(normalization="RMSNorm"))
    assert builder.uses_transformer_engine("auto")
    assert not builder.uses_transformer_engine("sdpa")
    assert not builder.uses_transformer_engine("local")

    spec = preset("tiny", vocab_size=300)
    full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=1)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).unsqueeze(0).expand(2, -1)
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool).triu(1)
    logits = {}
    for attention, core_type in (("sdpa", SDPAttention), ("local", DotProductAttention)):
        model = builder.build_model(spec, rt, attention=attention)
        attn = model.decoder.layers[0].self_attention
        assert type(attn.core_attention) is core_type and not model.uses_transformer_engine
        assert isinstance(attn, CachedRotarySelfAttention)
        load_full_state_dict(model, full, 1, 0)
        with torch.no_grad():
            logits[attention] = model(tokens, positions, mask)
    assert asked == []  # neither asked for TE's layers
    assert (logits["sdpa"] - logits["local"]).abs().max() < 1e-5

    te_spec = builder.layer_spec(attention="auto")
    assert asked == ["te"]
    # The cached-rotary attention applies under TE's spec as well (GPU only, not yet verified).
    assert te_spec.submodules.self_attention.module is CachedRotarySelfAttention
    # Sequence parallelism with TE installed but the local layers chosen: refused, one line.
    with pytest.raises(ModelConfigError, match=r"model.attention=sdpa builds the local layers"):
        builder.build_model(spec, rt, attention="sdpa", sequence_parallel=True)


def test_sequence_parallel_padding_changes_no_loss_or_gradient(rt):
    """Right padding by 3 positions with a zero loss mask (what forward_backward does under
    sequence parallelism) against the unpadded batch, same model."""
    from megatron_sega.training.engine import (
        _pad_positions, build_training_model, forward_backward,
    )
    from megatron_sega.training.sft import sft_loss_fn

    spec = preset("tiny", vocab_size=300)
    chunks = build_training_model(spec, rt, use_distributed_optimizer=False)
    load_full_state_dict(chunks[0].module, random_full_state_dict(spec, 384, seed=2), 1, 0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (2, 14), generator=g)
    mb = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
          "loss_mask": (torch.rand(2, 13, generator=g) > 0.3).float(), "advantage": torch.ones(2)}
    padded = _pad_positions(mb, 13, 3)
    assert padded["tokens"].shape == (2, 16) and padded["advantage"].shape == (2,)
    assert padded["loss_mask"][:, 13:].abs().sum() == 0
    assert torch.equal(_pad_positions(padded, 16, -3)["labels"], mb["labels"])
    out = {}
    for name, batch in (("plain", mb), ("padded", padded)):
        outputs = forward_backward(chunks, rt, [batch], sft_loss_fn(300, 10.0, rt))
        out[name] = (float(outputs[0]["nll_sum"]),
                     [p.main_grad.clone() for p in chunks[0].module.parameters()])
    assert abs(out["plain"][0] - out["padded"][0]) < 1e-5
    for a, b in zip(out["plain"][1], out["padded"][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_sequence_parallel_off_restores_every_flag(rt):
    spec = preset("tiny", vocab_size=300)
    model = builder.build_model(spec, rt)
    flagged = [m for m in model.modules() if hasattr(m, "sequence_parallel")]
    assert flagged
    model.config.sequence_parallel = True  # as a TE model built with sequence parallelism
    for m in flagged:
        m.sequence_parallel = True
    with builder.sequence_parallel_off(model):
        assert not model.config.sequence_parallel
        assert not any(m.sequence_parallel for m in flagged)
    assert model.config.sequence_parallel and all(m.sequence_parallel for m in flagged)
