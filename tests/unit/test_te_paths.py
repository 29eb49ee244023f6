"""Transformer Engine paths checked on CPU (issue 20, items 1, 2, 4) with a fake of TE's RMSNorm.

Megatron-Core builds the final norm with TE's RMSNorm whenever TE imports, even under the local
layer spec. The fake has what TE's module has (``weight``, ``eps``, ``zero_centered_gamma``, an
``_extra_state`` for its FP8 metadata, no ``normalized_shape``), so a model whose
``final_layernorm`` is swapped for it is the model a TE node builds with ``attention: sdpa``."""

import pytest
import torch

from megatron_sega import runtime
from megatron_sega.convert.layout import load_full_state_dict
from megatron_sega.models import preset
from megatron_sega.models.builder import build_model
from megatron_sega.models.init import random_full_state_dict
from megatron_sega.sampling import Sampler
from megatron_sega.sampling.decode import LeanForward, MegatronForward, lean_unsupported
from tests.unit.test_decode import lean_vs_megatron


class RMSNorm(torch.nn.Module):
    """TE's ``transformer_engine.pytorch.RMSNorm`` as far as our code can see it."""

    def __init__(self, hidden: int, eps: float, zero_centered_gamma: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma

    def forward(self, x):
        gamma = self.weight + 1 if self.zero_centered_gamma else self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * gamma

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)  # TE 2.x's FP8 metadata outside FP8 training

    def set_extra_state(self, state):
        pass


def te_final_norm(model, zero_centered_gamma: bool = False):
    """``model`` with its final norm swapped for the fake TE RMSNorm (same weight and eps)."""
    old = model.decoder.final_layernorm
    new = RMSNorm(old.weight.shape[0], old.eps, zero_centered_gamma)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.decoder.final_layernorm = new
    return model


class LayerNormLinear(torch.nn.Module):
    """TE's ``LayerNormLinear`` (Megatron's ``TELayerNormColumnParallelLinear``) as far as our
    code can see it: the RMSNorm fused in front of the linear, its weight ``layer_norm_weight``,
    ``eps``, ``normalization``, ``zero_centered_gamma``, no ``layer_norm_bias`` for RMSNorm."""

    def __init__(self, weight, norm):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.layer_norm_weight = torch.nn.Parameter(norm.weight.detach().clone())
        self.layer_norm_bias = None
        self.eps, self.normalization, self.zero_centered_gamma = norm.eps, "RMSNorm", False


def te_layers(model):
    """``model`` rebuilt as TE's layer spec lays it out (same weights): each layer's two norms
    fused into ``linear_qkv`` and ``linear_fc1``, ``IdentityOp`` in their place, TE's final
    norm. Only the sampler's lean forward runs it (the fakes have no forward)."""
    from megatron.core.transformer.identity_op import IdentityOp

    for layer in model.decoder.layers:
        for norm, owner, linear in (("input_layernorm", layer.self_attention, "linear_qkv"),
                                    ("pre_mlp_layernorm", layer.mlp, "linear_fc1")):
            setattr(owner, linear, LayerNormLinear(getattr(owner, linear).weight,
                                                   getattr(layer, norm)))
            setattr(layer, norm, IdentityOp())
    return te_final_norm(model)


@pytest.fixture()
def model():
    spec = preset("tiny", vocab_size=300)
    rt = runtime.setup(1, 1, device="cpu")
    m = build_model(spec, rt, use_te=False)
    load_full_state_dict(m, random_full_state_dict(spec, spec.padded_vocab_size(1), seed=4), 1, 0)
    return m.eval(), rt, spec


def test_lean_forward_runs_a_te_final_norm(model):
    m, rt, _ = model
    te_final_norm(m)
    assert not hasattr(m.decoder.final_layernorm, "normalized_shape")
    assert lean_unsupported(m) is None
    is_pad = torch.zeros(2, 7, dtype=torch.bool)
    is_pad[1, :2] = True
    assert lean_vs_megatron(m, rt, is_pad, steps=1) <= 1e-5


def test_lean_refuses_a_zero_centered_final_norm(model):
    m, rt, spec = model
    te_final_norm(m, zero_centered_gamma=True)
    assert "zero_centered_gamma" in lean_unsupported(m)
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        Sampler(m, rt, spec.vocab_size, pad_id=0, lean=True)
    forwards = Sampler(m, rt, spec.vocab_size, pad_id=0).forwards
    assert all(isinstance(f, MegatronForward) for f in forwards)


def test_benchmark_asks_for_lean_only_where_supported(monkeypatch, model):
    """benchmarks/sampler.py times a model the lean forward runs wherever TE imports (the local
    SDPA layers, a TE final norm), and leaves the lean sampler out, instead of raising, on a
    model it cannot run (here one with a zero-centred final norm)."""
    import benchmarks.sampler as bench
    from megatron_sega.models import builder

    monkeypatch.setattr(builder, "have_transformer_engine", lambda: True)
    assert not builder.uses_transformer_engine(bench.LEAN_ATTENTION)
    m, rt, spec = model
    local = build_model(spec, rt, use_te=False, attention="local").eval()
    te_final_norm(m)
    samplers = bench.sampler_variants(m, local, rt, spec.vocab_size)
    assert list(samplers) == ["sampler", "sampler_megatron", "sampler_local"]
    assert isinstance(samplers["sampler"].forwards[0], LeanForward)
    unsupported = te_final_norm(build_model(spec, rt, use_te=False).eval(),
                                zero_centered_gamma=True)
    assert "sampler" not in bench.sampler_variants(unsupported, local, rt, spec.vocab_size)
    assert not isinstance(samplers["sampler_local"].forwards[0], LeanForward)


def _checkpoints_across_te(root: str) -> dict:
    """One gloo rank: a checkpoint written without TE (no ``_extra_state``) loads into a model
    with TE's final norm, and one written with it loads into both kinds of model."""
    from megatron_sega.checkpoint.mcore import (
        keep_absent_extra_state_local, load_model_checkpoint, save_model_checkpoint,
        sharded_model_state)

    spec = preset("tiny", vocab_size=300)
    rt = runtime.setup(1, 1, device="cpu")

    def fresh(seed: int, te: bool):
        m = build_model(spec, rt, use_te=False)
        full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=seed)
        load_full_state_dict(m, full, 1, 0)
        return te_final_norm(m) if te else m

    plain, te = fresh(4, te=False), fresh(5, te=True)
    save_model_checkpoint(plain, f"{root}/plain")
    save_model_checkpoint(te, f"{root}/te")
    wanted = sharded_model_state(fresh(6, te=True))
    kept = keep_absent_extra_state_local(wanted, f"{root}/plain")
    out = {"asked": "decoder.final_layernorm._extra_state" in wanted["model"], "kept": kept}
    for source, te_model in (("plain", True), ("te", False), ("te", True)):
        into = fresh(7, te=te_model)
        load_model_checkpoint(into, f"{root}/{source}")
        want = (plain if source == "plain" else te).state_dict()
        out[f"{source}->{'te' if te_model else 'plain'}"] = all(
            torch.equal(v, want[k]) for k, v in into.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"))
    return out


def test_checkpoints_load_across_te_and_no_te(tmp_path):
    """Issue 20 item 4: DCP raised "Missing key ... final_layernorm._extra_state" before."""
    from tests.dist import run_distributed

    out = run_distributed(_checkpoints_across_te, 1, str(tmp_path))[0]
    assert out["asked"] and out["kept"] == ["decoder.final_layernorm._extra_state"], out
    assert out["plain->te"] and out["te->plain"] and out["te->te"], out


def test_lean_forward_runs_te_layers_and_batches_any_prompt_lengths(model):
    """Issue 20 item 5: TE's attention ignores the padding mask while decoding, so the sampler
    used to batch equal prompt lengths only on TE (about 32 sequential batches of 4 rows for 128
    rows). The lean forward now runs TE's layer layout on the same weights, masking padding
    itself: one batch for mixed lengths, the same logits as the local layers."""
    m, rt, spec = model
    te = build_model(spec, rt, use_te=False).eval()
    te.load_state_dict(m.state_dict())
    te = te_layers(te)
    assert lean_unsupported(te) is None
    tokens = torch.randint(3, 300, (3, 6), generator=torch.Generator().manual_seed(0))
    is_pad = torch.zeros(3, 9, dtype=torch.bool)
    is_pad[1, :2] = is_pad[2, :5] = True
    out = []
    for forward in (LeanForward(te, rt.tp_group), LeanForward(m, rt.tp_group)):
        forward.start(is_pad, 9)
        out.append([forward(tokens)] + [forward(tokens[:, i:i + 1]) for i in range(3)])
    for a, b in zip(*out):
        assert torch.equal(a, b)
    lengths = [6, 4, 1, 6, 3]
    lean = Sampler(te, rt, spec.vocab_size, pad_id=0, bucket_by_length=True)
    assert isinstance(lean.forwards[0], LeanForward) and not lean.bucket_by_length
    assert lean._plan(lengths, 3) == [[0, 3, 1, 4, 2]]
    megatron = Sampler(m, rt, spec.vocab_size, pad_id=0, bucket_by_length=True, lean=False)
    assert len(megatron._plan(lengths, 3)) == 4  # one batch per prompt length
    te.config.fp8 = "hybrid"
    assert "feature" in lean_unsupported(te)


def test_lean_refuses_te_layers_it_cannot_run(model):
    m, _, _ = model
    te = te_layers(m)
    te.decoder.layers[1].mlp.linear_fc1.zero_centered_gamma = True
    assert "zero_centered_gamma" in lean_unsupported(te)
    te.decoder.layers[1].mlp.linear_fc1.zero_centered_gamma = False
    te.decoder.layers[0].self_attention.linear_qkv.normalization = "LayerNorm"
    assert "LayerNorm" in lean_unsupported(te)
