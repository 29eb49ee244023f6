"""DPO and IPO losses against hand-computed values (float64), their gradients, split invariance,
and the ``dpo`` config section's validation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from megatron_sega.config import ConfigError, load_config
from megatron_sega.dpo import preference_loss, sequence_logps

BETA = 0.5


def _pairs():
    """Two pairs. d(chosen) = [0.5, -1.0], d(rejected) = [-1.0, 0.5], so h = [1.5, -1.5]."""
    pc = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-4.0, -2.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-3.5, -4.0], dtype=torch.float64)
    rr = torch.tensor([-3.0, -2.5], dtype=torch.float64)
    return pc, pr, rc, rr


def test_dpo_value_gradient_and_metrics():
    pc, pr, rc, rr = _pairs()
    loss, m = preference_loss(pc, pr, rc, rr, loss="sigmoid", beta=BETA)
    # beta * h = [0.75, -0.75]; -log sigmoid(x) = log(1 + exp(-x))
    expected = (math.log(1 + math.exp(-0.75)) + math.log(1 + math.exp(0.75))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-15)
    assert loss.item() == pytest.approx(0.761871, abs=1e-6)
    loss.backward()
    # d l / d logp(chosen) = -beta * sigmoid(-beta h) / Z, the opposite for the rejected one
    sig = [1 / (1 + math.exp(0.75)), 1 / (1 + math.exp(-0.75))]
    assert pc.grad.tolist() == pytest.approx([-BETA * s / 2 for s in sig], rel=1e-14)
    assert pr.grad.tolist() == pytest.approx([BETA * s / 2 for s in sig], rel=1e-14)
    # rewards beta * d: chosen [0.25, -0.5], rejected [-0.5, 0.25]; only pair 0 is correct
    assert m["chosen_reward_sum"].item() == pytest.approx(-0.25)
    assert m["rejected_reward_sum"].item() == pytest.approx(-0.25)
    assert m["margin_sum"].item() == pytest.approx(0.0)
    assert m["correct"].item() == 1 and m["pairs"].item() == 2
    assert m["loss_sum"].item() == pytest.approx(2 * expected)
    assert all(not v.requires_grad for v in m.values())


def test_ipo_value_and_gradient():
    pc, pr, rc, rr = _pairs()
    loss, _ = preference_loss(pc, pr, rc, rr, loss="ipo", beta=BETA)
    # target margin 1 / (2 beta) = 1: ((1.5 - 1)^2 + (-1.5 - 1)^2) / 2 = (0.25 + 6.25) / 2
    assert loss.item() == 3.25
    loss.backward()
    # d l / d logp(chosen) = 2 (h - 1) / Z
    assert pc.grad.tolist() == [0.5, -2.5]
    assert pr.grad.tolist() == [-0.5, 2.5]


def test_policy_equal_to_reference_gives_log2_and_the_ipo_target():
    logp = torch.tensor([-7.25, -1.5, -30.0], dtype=torch.float64)
    other = torch.tensor([-2.0, -9.0, -0.125], dtype=torch.float64)
    for beta in (0.1, 0.5, 2.0):
        dpo, m = preference_loss(logp, other, logp, other, loss="sigmoid", beta=beta)
        assert dpo.item() == math.log(2)
        assert m["correct"].item() == 0  # ties are not correct
        ipo, _ = preference_loss(logp, other, logp, other, loss="ipo", beta=beta)
        assert ipo.item() == pytest.approx(1 / (4 * beta ** 2), rel=1e-15)


def test_reference_gets_no_gradient_and_is_a_constant():
    pc, pr, rc, rr = _pairs()
    rc.requires_grad_()
    loss, _ = preference_loss(pc, pr, rc, rr, beta=BETA)
    loss.backward()
    assert rc.grad is None


def test_split_with_the_global_normaliser_sums_to_the_whole():
    g = torch.Generator().manual_seed(0)
    vecs = [-torch.rand(6, generator=g, dtype=torch.float64) * 20 for _ in range(4)]
    for kind in ("sigmoid", "ipo"):
        whole, _ = preference_loss(*vecs, loss=kind, beta=0.1)
        parts = [preference_loss(*(v[s] for v in vecs), loss=kind, beta=0.1, normaliser=6)[0]
                 for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
        assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-14)


def test_large_margins_stay_finite():
    big = torch.tensor([1000.0, -1000.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    loss, _ = preference_loss(big, zero, zero, zero, beta=1.0, normaliser=1)
    assert loss.item() == pytest.approx(1000.0)  # -log sigmoid(-1000) = 1000, log sigmoid(1000) = 0


def test_float32_inputs_are_computed_in_float32():
    v = torch.tensor([-1.0, -2.0])
    loss, _ = preference_loss(v, v - 1, v, v, beta=0.1)
    assert loss.dtype == torch.float32


def test_sequence_logps_masks_garbage_out_of_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, 55.0, float("inf")]],
                        dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    seq = sequence_logps(logp, mask)
    assert seq.tolist() == [-3.0, -0.5]
    seq.sum().backward()
    assert logp.grad.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_bad_arguments_are_refused():
    v = torch.zeros(3)
    with pytest.raises(ValueError, match="loss='kto' is unknown"):
        preference_loss(v, v, v, v, loss="kto")
    with pytest.raises(ValueError, match="beta=0.0 must be a finite number > 0"):
        preference_loss(v, v, v, v, beta=0.0)
    with pytest.raises(ValueError, match="share one shape"):
        preference_loss(v, v, v, torch.zeros(2))
    with pytest.raises(ValueError, match="normaliser=0 must be"):
        preference_loss(v, v, v, v, normaliser=0)


def test_dpo_config_section():
    config = load_config(None, ["dpo.loss=ipo", "dpo.beta=0.5", "dpo.global_batch_size=8",
                                "dpo.micro_batch_size=2", "dpo.lr=5e-7"])
    assert (config.dpo.loss, config.dpo.beta, config.dpo.lr) == ("ipo", 0.5, 5e-7)
    assert load_config().dpo.reference is None  # the starting weights
    for override, message in (
        ("dpo.loss=kto", r"dpo.loss = 'kto' is not one of 'sigmoid', 'ipo'"),
        ("dpo.beta=0", r"dpo.beta must be > 0, got 0.0"),
        ("dpo.steps=0", r"dpo.steps must be >= 1"),
        ("dpo.micro_batch_size=3", r"dpo.global_batch_size\(16\) must be a positive multiple "
                                   r"of dpo.micro_batch_size\(3\)"),
        ("dpo.lr=0", r"dpo.lr must be > 0"),
        ("dpo.bta=1", r"unknown key 'dpo.bta'; did you mean 'dpo.beta'\?"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_dpo_cli_errors_are_one_line():
    for args, expected in (
        (("dpo", "dpo.beta=-1"), "dpo.beta must be > 0, got -1.0"),
        (("dpo", "parallel.device=cpu"), "dpo needs data.train"),
    ):
        result = subprocess.run([sys.executable, "-m", "megatron_sega.cli", *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and expected in lines[-1] and "Traceback" not in result.stderr, args
