"""Eq. 2 SEGA loss: values, gradients, split invariance, clipping and KL, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sega.sega import sega_loss

T, F = True, False


def _small():
    # row 0: 2 response tokens (-1, -2), row 1: 1 token (-0.5); padding values are garbage.
    logp = torch.tensor([[-1.0, -2.0, 55.0], [-0.5, float("nan"), -9.0]], dtype=torch.float64,
                        requires_grad=True)
    mask = torch.tensor([[T, T, F], [T, F, F]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    return logp, mask, adv


def test_sequence_sum_value_and_gradient():
    logp, mask, adv = _small()
    loss, metrics = sega_loss(logp, mask, adv, num_groups=2)
    # -(2 * (-1 - 2) + (-1) * (-0.5)) / 2 = -(-6 + 0.5) / 2 = 2.75
    assert loss.item() == pytest.approx(2.75)
    loss.backward()
    assert logp.grad.tolist() == [[-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]  # -A_i / Z on response tokens
    assert metrics["num_tokens"].item() == 3
    assert metrics["logp_mean"].item() == pytest.approx(-3.5 / 3)
    assert metrics["kl_mean"].item() == 0.0 and metrics["clip_fraction"].item() == 0.0
    assert all(not v.requires_grad for v in metrics.values())


def test_token_mean_value_and_explicit_normaliser():
    logp, mask, adv = _small()
    loss, _ = sega_loss(logp, mask, adv, normalization="token_mean")  # local count 3
    assert loss.item() == pytest.approx(5.5 / 3)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 0.0, 1 / 3, 0.0, 0.0])
    loss10, _ = sega_loss(logp, mask, adv, normalization="token_mean", normaliser=torch.tensor(10.0))
    assert loss10.item() == pytest.approx(0.55)


def test_gradcheck_float64():
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.tensor([[T, T, T, F, F], [T, T, T, T, T], [F, F, F, F, F]])
    adv = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    old = (logp.detach() + 0.1 * torch.randn(3, 5, dtype=torch.float64))
    ref = (logp.detach() + 0.2 * torch.randn(3, 5, dtype=torch.float64))
    for kwargs in (
        {"num_groups": 2},
        {"normalization": "token_mean", "normaliser": 8.0},
        {"num_groups": 2, "ref_logp_tokens": ref, "kl_coef": 0.3, "old_logp_tokens": old, "clip_eps": 0.2},
    ):
        assert torch.autograd.gradcheck(lambda x: sega_loss(x, mask, adv, **kwargs)[0], (logp,))


@pytest.mark.parametrize("normalization", ["sequence_sum", "token_mean"])
def test_microbatch_split_invariance(normalization: str):
    torch.manual_seed(1)
    n, width, k = 8, 7, 4
    logp_full = -torch.rand(n, width, dtype=torch.float64) * 4
    lengths = torch.tensor([7, 3, 0, 5, 1, 7, 6, 2])
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(n, dtype=torch.float64)
    old = logp_full + 0.3 * torch.randn(n, width, dtype=torch.float64)
    ref = logp_full + 0.3 * torch.randn(n, width, dtype=torch.float64)
    z = float(n // k) if normalization == "sequence_sum" else float(mask.sum())
    extra = {"old_logp_tokens": old, "ref_logp_tokens": ref, "kl_coef": 0.1}

    whole = logp_full.clone().requires_grad_()
    loss_whole, _ = sega_loss(whole, mask, adv, normalization=normalization, normaliser=z, **extra)
    loss_whole.backward()

    parts = logp_full.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):  # uneven microbatches / ranks
        loss_part, _ = sega_loss(parts[rows], mask[rows], adv[rows], normalization=normalization,
                                 normaliser=z, old_logp_tokens=old[rows], ref_logp_tokens=ref[rows],
                                 kl_coef=0.1)
        total = total + loss_part
    total.backward()
    assert total.item() == pytest.approx(loss_whole.item(), rel=1e-12)
    assert torch.allclose(parts.grad, whole.grad, rtol=1e-12, atol=1e-15)


def test_clip_with_old_equal_new_matches_unclipped_gradient():
    torch.manual_seed(2)
    logp0 = -torch.rand(4, 6, dtype=torch.float64) * 2
    mask = torch.rand(4, 6) > 0.3
    adv = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    plain = logp0.clone().requires_grad_()
    sega_loss(plain, mask, adv, num_groups=1)[0].backward()
    clipped = logp0.clone().requires_grad_()
    loss, metrics = sega_loss(clipped, mask, adv, num_groups=1, old_logp_tokens=logp0.clone(), clip_eps=0.2)
    loss.backward()
    assert torch.allclose(clipped.grad, plain.grad, atol=1e-15)
    assert metrics["clip_fraction"].item() == 0.0
    # With ratio 1 the value is - sum_i A_i * L_i / Z (not A * logp).
    lengths = mask.sum(dim=1).to(torch.float64)
    assert loss.item() == pytest.approx(-(adv * lengths).sum().item())


def test_clipping_hand_computed():
    # Two one-token sequences, ratio 1.5 each, eps 0.2, Z = 1.
    # A = +1: min(1.5, 1.2) = 1.2, clipped -> gradient 0.
    # A = -1: min(-1.5, -1.2) = -1.5, unclipped -> d loss / d logp = -A * ratio = 1.5.
    old = torch.tensor([[-1.0], [-1.0]], dtype=torch.float64)
    logp = (old + math.log(1.5)).requires_grad_()
    mask = torch.tensor([[T], [T]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, metrics = sega_loss(logp, mask, adv, num_groups=1, old_logp_tokens=old, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 1.5))
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 1.5])
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)


def test_kl_zero_when_reference_equals_policy():
    logp, mask, adv = _small()
    base, _ = sega_loss(logp, mask, adv, num_groups=2)
    (g_base,) = torch.autograd.grad(base, logp)
    loss, metrics = sega_loss(logp, mask, adv, num_groups=2, ref_logp_tokens=logp.detach().clone(), kl_coef=0.5)
    (g,) = torch.autograd.grad(loss, logp)
    assert metrics["kl_mean"].item() == 0.0 and metrics["kl_loss"].item() == 0.0
    assert loss.item() == pytest.approx(base.item())
    assert torch.equal(g, g_base)


def test_kl_hand_computed():
    # logp = -1, ref = -2: d = ref - logp = -1, k3 = e^-1 + 1 - 1 = e^-1; d k3 / d logp = 1 - e^-1.
    logp = torch.tensor([[-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[T, F]])
    ref = torch.tensor([[-2.0, 3.0]], dtype=torch.float64)
    adv = torch.zeros(1, dtype=torch.float64)
    loss, metrics = sega_loss(logp, mask, adv, num_groups=2, ref_logp_tokens=ref, kl_coef=0.5)
    assert metrics["kl_mean"].item() == pytest.approx(math.exp(-1))
    assert loss.item() == pytest.approx(0.5 * math.exp(-1) / 2)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.5 * (1 - math.exp(-1)) / 2, 0.0])
    # kl_coef = 0 reports the KL without adding it.
    loss0, metrics0 = sega_loss(logp, mask, adv, num_groups=2, ref_logp_tokens=ref)
    assert loss0.item() == 0.0 and metrics0["kl_mean"].item() == pytest.approx(math.exp(-1))


def test_bf16_input_computed_in_float32():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = sega_loss(logp, torch.tensor([[T, T]]), torch.tensor([0.5]), num_groups=1)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.5)
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16 and logp.grad.tolist() == [[-0.5, -0.5]]


def test_loss_argument_errors():
    logp, mask, adv = _small()
    with pytest.raises(ValueError, match="num_groups"):
        sega_loss(logp, mask, adv)
    with pytest.raises(ValueError, match="normalization"):
        sega_loss(logp, mask, adv, normalization="group_mean", num_groups=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        sega_loss(logp, mask, adv, num_groups=1, normaliser=2.0)
    with pytest.raises(ValueError, match="normaliser"):
        sega_loss(logp, mask, adv, normaliser=0.0)
    with pytest.raises(ValueError, match="ref_logp_tokens"):
        sega_loss(logp, mask, adv, num_groups=1, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_eps"):
        sega_loss(logp, mask, adv, num_groups=1, old_logp_tokens=logp.detach(), clip_eps=0.0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        sega_loss(logp, mask, adv.view(2, 1), num_groups=1)
    with pytest.raises(TypeError, match="bool"):
        sega_loss(logp, mask.float(), adv, num_groups=1)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-3, 3, allow_nan=False), st.lists(st.floats(-8, 0, allow_nan=False), max_size=5)),
        min_size=1,
        max_size=5,
    ),
    z=st.floats(0.5, 20),
)
def test_gradient_property(data, z):
    """d loss / d logp_t = -A_i / Z on response tokens and 0 elsewhere, against a float64 loop."""
    width = 5
    logp = torch.full((len(data), width), -0.1, dtype=torch.float64)
    mask = torch.zeros(len(data), width, dtype=torch.bool)
    for i, (_, toks) in enumerate(data):
        logp[i, : len(toks)] = torch.tensor(toks, dtype=torch.float64)
        mask[i, : len(toks)] = True
    adv = torch.tensor([a for a, _ in data], dtype=torch.float64)
    logp.requires_grad_()
    loss, _ = sega_loss(logp, mask, adv, normaliser=z)
    loss.backward()
    expected_loss = -sum(a * sum(toks) for a, toks in data) / z
    assert loss.item() == pytest.approx(expected_loss, abs=1e-9)
    for i, (a, toks) in enumerate(data):
        for t in range(width):
            assert logp.grad[i, t].item() == pytest.approx(-a / z if t < len(toks) else 0.0, abs=1e-12)
