"""megatron_sega.ops in one process (TP = 1) against float64 full-vocab math.

The vocabulary is padded (1000 true ids in 1024 columns, padding logits huge) so that every test
also checks that padding is ignored. Tolerances: 1e-6 absolute plus 2**-24 relative (the rounding
of an fp32 result). TP = 2 and 4 are in tests/distributed/test_ops_tp.py.
"""

import math

import pytest
import torch

from megatron_sega.ops import entropy, log_probs, log_probs_and_entropy, sample
from megatron_sega.ops.sampling import SampleStats, _support, gumbel_noise, row_keys

V, V_PAD = 1000, 1024


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see tests/conftest.py."""


def reference_support(z: torch.Tensor, temperature: float, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """Single-process float64 top-k then nucleus mask of ``z [n, V]`` (order: w desc, id asc)."""
    w = z.double() / temperature
    vals, idx = torch.sort(w, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    if 0 < top_k < w.shape[-1]:
        keep[:, top_k:] = False
    if top_p < 1:
        e = torch.where(keep, (vals - vals[:, :1]).exp(), 0.0)
        q = e / e.sum(-1, keepdim=True)
        keep &= q.cumsum(-1) - q < top_p
    return torch.zeros_like(keep).scatter(1, idx, keep)


def _logits(*lead: int, scale: float = 2.5, seed: int = 0) -> torch.Tensor:
    z = torch.randn(*lead, V_PAD, generator=torch.Generator().manual_seed(seed)) * scale
    z[..., V:] = 1e4  # padding that would dominate every result if it were not ignored
    return z


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=1e-6, rtol=2.0 ** -24)


@pytest.mark.parametrize("scale", [0.5, 2.5, 8.0])
def test_log_probs_entropy_and_gradients_match_fp64(scale):
    z = _logits(4, 33, scale=scale)
    t = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(1))
    x = z.clone().requires_grad_()
    lp, ent = log_probs_and_entropy(x, t, 0, V, None, chunk_size=10)
    (lp.sum() * 0.4 + (ent * torch.linspace(-1, 1, 33)).sum()).backward()

    zr = z.double().requires_grad_()
    ref_all = torch.log_softmax(zr[..., :V], -1)
    ref_lp = ref_all.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    (ref_lp.sum() * 0.4 + (ref_ent * torch.linspace(-1, 1, 33)).sum()).backward()

    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == (4, 33)
    _assert_close(lp, ref_lp)
    _assert_close(ent, ref_ent)
    _assert_close(x.grad, zr.grad)
    assert torch.count_nonzero(x.grad[..., V:]) == 0
    assert torch.equal(x.detach(), z)  # input untouched
    _assert_close(log_probs(z, t, 0, V, None), ref_lp)
    _assert_close(entropy(z, 0, V, None), ref_ent)


def test_chunking_is_invisible_and_bf16_is_computed_in_fp32():
    z = _logits(50)
    t = torch.randint(0, V, (50,), generator=torch.Generator().manual_seed(2))
    a = log_probs_and_entropy(z, t, 0, V, None, chunk_size=1)
    b = log_probs_and_entropy(z, t, 0, V, None, chunk_size=1000)
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    zb = z.bfloat16().requires_grad_()
    lp, ent = log_probs_and_entropy(zb, t, 0, V, None, chunk_size=7)
    ref = torch.log_softmax(zb.detach()[..., :V].double(), -1)
    _assert_close(lp, ref.gather(-1, t.unsqueeze(-1)).squeeze(-1))
    _assert_close(ent, -(ref.exp() * ref).sum(-1))
    lp.sum().backward()
    assert zb.grad.dtype == torch.bfloat16
    expected = torch.nn.functional.one_hot(t, V) - ref.exp()
    torch.testing.assert_close(zb.grad[:, :V].double(), expected, atol=4e-3, rtol=0)


def test_greedy_is_argmax_with_smallest_id_on_ties():
    z = _logits(8, 5)
    z[1, 2, [3, 7]] = 50.0
    s = sample(z, 0, V, None, temperature=0)
    assert torch.equal(s.tokens, z[..., :V].argmax(-1)) and s.tokens[1, 2] == 3
    assert torch.count_nonzero(s.logp_sampling) == 0
    ref = torch.log_softmax(z[..., :V].double(), -1).gather(-1, s.tokens.unsqueeze(-1))
    _assert_close(s.logp_untempered, ref.squeeze(-1))


SUPPORT_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=1.3, top_k=100, top_p=0.8),
    dict(temperature=1.0, top_k=5, top_p=0.5),
    dict(temperature=0.5, top_k=1),
    dict(temperature=1.0, top_p=1e-3),
    dict(temperature=2.0, top_k=V + 5, top_p=0.99),
]


@pytest.mark.parametrize("quantise", [False, True], ids=["fp32", "bf16-ties"])
@pytest.mark.parametrize("cfg", SUPPORT_CASES, ids=str)
def test_support_and_log_probs_match_reference(cfg, quantise):
    z = _logits(64, seed=3)
    z[:, 10] = z[:, 500]
    if quantise:  # bf16 logits: many ties, also at the top-k / top-p boundary
        z = z.bfloat16().float()
    w = z[:, :V] / cfg["temperature"]
    kept = _support(w, w.amax(-1), w.amin(-1), cfg.get("top_k", 0), cfg.get("top_p", 1.0), V, 0,
                    None)
    expected = reference_support(z[:, :V], **cfg)
    assert torch.equal(torch.ones_like(expected) if kept is None else kept, expected)

    s = sample(z, 0, V, None, seed=11, step=4, **cfg)
    assert expected.gather(1, s.tokens.unsqueeze(1)).all()
    wq = torch.where(expected, z[:, :V].double() / cfg["temperature"], -math.inf)
    _assert_close(s.logp_sampling, torch.log_softmax(wq, -1).gather(1, s.tokens[:, None])[:, 0])
    ref = torch.log_softmax(z[:, :V].double(), -1).gather(1, s.tokens[:, None])[:, 0]
    _assert_close(s.logp_untempered, ref)


def test_noise_is_a_function_of_seed_row_step_and_global_id():
    lead = torch.Size([3, 4])
    keys = row_keys(5, 2, lead)
    ids = torch.arange(V_PAD)
    full = gumbel_noise(keys, ids)
    assert torch.equal(gumbel_noise(keys, ids[300:700]), full[:, 300:700])  # any shard
    assert torch.equal(gumbel_noise(row_keys(5, 2, lead), ids), full)
    assert not torch.equal(gumbel_noise(row_keys(6, 2, lead), ids), full)
    assert not torch.equal(gumbel_noise(row_keys(5, 3, lead), ids), full)
    assert len(set(keys.tolist())) == 12
    per_row = torch.tensor([9, 8, 7])
    assert torch.equal(row_keys(per_row.flip(0), 2, torch.Size([3])),
                       row_keys(per_row, 2, torch.Size([3])).flip(0))  # follows the row's seed
    g = gumbel_noise(row_keys(0, 0, torch.Size([400])), ids).flatten()  # ~4e5 draws
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni; sd of mean ~2e-3
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.03  # sd of var ~6e-3


def _bernstein_halfwidth(n: int, q: torch.Tensor, delta: float) -> torch.Tensor:
    """t with P(|Binomial(n, q) - nq| >= t) <= delta (Bernstein's inequality)."""
    log_term = math.log(2 / delta)
    var = n * q * (1 - q)
    return log_term / 3 + torch.sqrt(log_term ** 2 / 9 + 2 * log_term * var)


@pytest.mark.parametrize("cfg", [dict(temperature=0.8, top_k=5), dict(temperature=1.0, top_p=0.7),
                                 dict(temperature=1.5, top_k=9, top_p=0.9)], ids=str)
def test_samples_follow_the_filtered_distribution(cfg):
    """200k draws per configuration over 12 true ids (padded to 16).

    Tokens outside the support must never appear; each count must lie within the Bernstein
    bound for failure probability 1e-7 / 12 (union bound: < 1e-7 false failures per test, for
    ideal noise). The bounds are ~0.3% of n wide, while e.g. forgetting the temperature or the
    renormalisation shifts some probability by several %.
    """
    n, vocab = 200_000, 12
    z = torch.full((n, 16), 1e4)
    z[:, :vocab] = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, 1.2, 0.1, -2.0])
    s = sample(z, 0, vocab, None, seed=2024, step=1, chunk_size=n, **cfg)
    counts = torch.bincount(s.tokens, minlength=16).double()
    keep = reference_support(z[:1, :vocab], **cfg)[0]
    q = torch.softmax(torch.where(keep, z[0, :vocab].double() / cfg["temperature"], -math.inf), 0)
    assert counts[vocab:].sum() == 0 and counts[:vocab][~keep].sum() == 0
    bound = _bernstein_halfwidth(n, q, 1e-7 / vocab)
    assert ((counts[:vocab] - n * q).abs() <= bound).all(), (counts[:vocab], n * q, bound)
    # The reported sampling log-prob is the one of this distribution.
    _assert_close(s.logp_sampling[:50], q.log()[s.tokens[:50]])


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    z = _logits(16, 4)
    a = sample(z, 0, V, None, temperature=1.0, top_p=0.95, seed=1, step=0)
    assert torch.equal(a.tokens, sample(z, 0, V, None, temperature=1.0, top_p=0.95, seed=1,
                                        step=0, chunk_size=5).tokens)
    b = sample(z, 0, V, None, temperature=1.0, top_p=0.95, seed=2, step=0)
    c = sample(z, 0, V, None, temperature=1.0, top_p=0.95, seed=1, step=1)
    assert not torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def _bad_logits(value: float) -> torch.Tensor:
    z = _logits(2, 3)
    z[1, 2, 17] = value
    return z


@pytest.mark.parametrize("call, match", [
    (lambda: entropy(_bad_logits(math.nan), 0, V, None), "NaN or Inf"),
    (lambda: log_probs(_bad_logits(math.inf), torch.zeros(2, 3, dtype=torch.long), 0, V, None),
     "NaN or Inf"),
    (lambda: sample(_bad_logits(-math.inf), 0, V, None, temperature=1.0), "NaN or Inf"),
    (lambda: entropy(torch.zeros(4, 0), 0, 10, None), "empty vocab dimension"),
    (lambda: sample(_logits(2), 0, V, None, temperature=-0.5), "temperature=-0.5"),
    (lambda: sample(_logits(2), 0, V, None, temperature=math.nan), "temperature=nan"),
    (lambda: sample(_logits(2), 0, V, None, temperature=1.0, top_p=0.0), "top_p=0.0"),
    (lambda: sample(_logits(2), 0, V, None, temperature=1.0, top_p=1.5), "top_p=1.5"),
    (lambda: sample(_logits(2), 0, V, None, temperature=1.0, top_k=-1), "top_k=-1"),
    (lambda: sample(_logits(2), 0, V, None, temperature=1.0, seed=torch.zeros(3)), "seed"),
    (lambda: log_probs(_logits(2), torch.tensor([0, V]), 0, V, None), "targets"),
    (lambda: log_probs(_logits(2), torch.tensor([0]), 0, V, None), "targets shape"),
    (lambda: entropy(_logits(2), 0, V_PAD + 1, None), "whole vocabulary"),
    (lambda: entropy(_logits(2), -1, V, None), "vocab_start=-1"),
    (lambda: entropy(_logits(2), 0, V, None, chunk_size=0), "chunk_size=0"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nan_in_padding_is_ignored():
    z = _logits(2, 3)
    z[..., V + 3] = math.nan
    assert torch.isfinite(entropy(z, 0, V, None)).all()
    assert sample(z, 0, V, None, temperature=1.0, top_k=3).tokens.max() < V


def test_strided_inputs_are_read_chunk_by_chunk_with_the_same_results():
    z = _logits(3, 9)
    t = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(4))
    sliced = z[:, :-1]  # leading dims that do not flatten into a view
    x = sliced.clone().requires_grad_()
    y = z.clone().requires_grad_()
    lp_view = log_probs(y[:, :-1], t, 0, V, None, chunk_size=5)
    lp_copy = log_probs(x, t, 0, V, None, chunk_size=5)
    assert torch.equal(lp_view, lp_copy)
    lp_view.sum().backward()
    lp_copy.sum().backward()
    assert torch.equal(y.grad[:, :-1], x.grad) and torch.count_nonzero(y.grad[:, -1]) == 0
    kwargs = dict(temperature=0.9, top_k=20, top_p=0.9, seed=3, chunk_size=4)
    assert torch.equal(sample(z[:, :-1], 0, V, None, **kwargs).tokens,
                       sample(sliced.contiguous(), 0, V, None, **kwargs).tokens)


def test_temperature_too_small_for_fp32_is_an_error():
    with pytest.raises(ValueError, match="temperature=1e-40"):
        sample(_logits(2), 0, V, None, temperature=1e-40)


def test_sample_returns_the_untempered_entropy():
    """The entropy computed in the sampling pass equals the standalone op and float64 math."""
    from megatron_sega.ops import entropy

    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 300, generator=g) * 3
    for kwargs in (dict(temperature=0), dict(temperature=0.7, top_k=20, top_p=0.9)):
        s = sample(z, 0, 300, None, seed=3, **kwargs)
        torch.testing.assert_close(s.entropy, entropy(z, 0, 300, None), rtol=0, atol=1e-6)
        p = torch.softmax(z.double(), -1)
        torch.testing.assert_close(s.entropy.double(), -(p * p.log()).sum(-1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The one-collective path: candidates, the fallback, ties at the candidate boundary
# ---------------------------------------------------------------------------------------------


def reference_tokens(z: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, step: int = 0) -> torch.Tensor:
    """The exact draw: Gumbel-max with the op's noise over the float64 reference support of
    ``z [n, V]`` (``w`` rounded to fp32 as the op does; the first id among equal scores)."""
    keep = reference_support(z, temperature, top_k, top_p)
    g = gumbel_noise(row_keys(seed, step, torch.Size([z.shape[0]])), torch.arange(z.shape[1]))
    return torch.where(keep, (z / temperature).double() + g, -math.inf).argmax(-1)


def _peaked(n: int, seed: int = 0) -> torch.Tensor:
    """Rows shaped like a trained model's: a few likely tokens, a long flat tail; the peak
    width varies by row so that some nuclei fit in a few candidates and some do not."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V_PAD, generator=g)
    width = torch.randint(1, 40, (n, 1), generator=g)
    rank = torch.argsort(torch.rand(n, V_PAD, generator=g), -1).argsort(-1)
    z = z + torch.where(rank < width, 9.0, 0.0)
    z[:, V:] = 1e4
    return z


@pytest.mark.parametrize("cfg", SUPPORT_CASES[1:] + [dict(temperature=1.0, top_p=0.95)], ids=str)
def test_candidates_change_only_how_often_the_fallback_runs(cfg):
    """Every row's token is the exact draw whatever C: the rows the candidates settle, the rows
    left to the bisection (small C), and calls with both."""
    z = torch.cat([_peaked(24, seed=1), _logits(8, seed=2)])
    expected = reference_tokens(z[:, :V], seed=5, step=2, **cfg)
    base = None
    for candidates in (1, 3, 16, 64, V):
        stats = SampleStats()
        s = sample(z, 0, V, None, seed=5, step=2, candidates=candidates, stats=stats, **cfg)
        assert torch.equal(s.tokens, expected), (cfg, candidates)
        if base is None:
            base = s
        for name in ("logp_sampling", "logp_untempered", "entropy"):
            _assert_close(getattr(s, name), getattr(base, name))
        assert stats.calls == 1 and stats.rows == 32
        if candidates == V:  # every logit is a candidate: nothing is left open
            assert stats.fallback_rows == 0, cfg
        if candidates == 1 and cfg.get("top_k", 0) != 1:
            assert stats.fallback_rows > 0, cfg
    if cfg == dict(temperature=1.0, top_p=0.95):  # peaked rows fit in 64, flat ones do not
        stats = SampleStats()
        sample(z, 0, V, None, seed=5, step=2, stats=stats, **cfg)
        assert 8 <= stats.fallback_rows < 32, stats


@pytest.mark.parametrize("cfg, settled", [
    (dict(temperature=1.0, top_k=3), True), (dict(temperature=1.0, top_k=4), False),
    (dict(temperature=1.0, top_k=6), False), (dict(temperature=0.5, top_p=0.6), True),
    (dict(temperature=1.0, top_p=0.97), False), (dict(temperature=1.0, top_k=5, top_p=0.9), False),
], ids=str)
def test_ties_at_the_candidate_boundary(cfg, settled):
    """Equal logits across the C-th candidate: the support takes tied tokens in id order, on
    the candidates when they settle it and through the fallback when the tie straddles c*."""
    n = 64
    z = torch.full((n, V_PAD), -3.0)
    g = torch.Generator().manual_seed(9)
    for row in range(n):  # three tied at 6, then five tied at 5 (C = 4 cuts through them)
        ids = torch.randperm(V, generator=g)[:8]
        z[row, ids[:3]], z[row, ids[3:]] = 6.0, 5.0
    z[:, V:] = 1e4
    expected = reference_tokens(z[:, :V], seed=1, step=0, **cfg)
    for candidates in (2, 4, 8, 16):
        stats = SampleStats()
        s = sample(z, 0, V, None, seed=1, step=0, candidates=candidates, stats=stats, **cfg)
        assert torch.equal(s.tokens, expected), (cfg, candidates)
        keep = reference_support(z[:, :V], **cfg)
        wq = torch.where(keep, z[:, :V].double() / cfg["temperature"], -math.inf)
        _assert_close(s.logp_sampling, torch.log_softmax(wq, -1).gather(1, s.tokens[:, None])[:, 0])
        if candidates == 4:  # c* = 5: only the three 6s are known; a support in them is settled
            assert stats.fallback_rows == (0 if settled else n), (cfg, stats)


def test_the_fallback_draws_the_filtered_distribution():
    """The bisection path alone (1 candidate cannot hold these nuclei) over 12 true ids."""
    n, vocab = 100_000, 12
    z = torch.full((n, 16), 1e4)
    z[:, :vocab] = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, 1.2, 0.1, -2.0])
    cfg = dict(temperature=1.0, top_p=0.7)
    stats = SampleStats()
    s = sample(z, 0, vocab, None, seed=77, step=3, chunk_size=n, candidates=1, stats=stats, **cfg)
    assert stats.fallback_rows == n
    counts = torch.bincount(s.tokens, minlength=16).double()
    keep = reference_support(z[:1, :vocab], **cfg)[0]
    q = torch.softmax(torch.where(keep, z[0, :vocab].double(), -math.inf), 0)
    assert counts[vocab:].sum() == 0 and counts[:vocab][~keep].sum() == 0
    bound = _bernstein_halfwidth(n, q, 1e-7 / vocab)
    assert ((counts[:vocab] - n * q).abs() <= bound).all(), (counts[:vocab], n * q, bound)
