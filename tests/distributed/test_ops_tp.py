"""Vocab-parallel ops at TP = 2 and 4 against a float64 single-process full-vocab reference.

One spawn of 4 gloo processes computes everything (entropy, log-probs and their gradients, greedy
and seeded samples, the top-k/top-p supports, the error paths) twice: at TP = 2 in the groups
{0, 1} and {2, 3}, and at TP = 4 in {0, 1, 2, 3}. The tests compare the gathered results with
float64 math on the full logits and with the same ops at TP = 1 (in the test process).

Tolerances: 1e-6 absolute plus 2**-24 relative, i.e. the rounding of an fp32 result (a log-prob
of -20 is only representable to ~1e-6).
"""

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: see tests/conftest.py."""

V_PAD = 1024
ROWS = (3, 20)
# (true vocab size, logits quantised to bf16 so that the top-k/top-p boundaries have ties)
CASES = {"v1000": (1000, False), "v700_bf16": (700, True)}  # v700 at TP=4: rank 3 is all padding
CONFIGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=1.3, top_k=100, top_p=0.8),
]  # more filter settings (k = 1, tiny p, ...) are in the single-process tests
SEED, STEP = 7, 3
FEW = 4  # candidates per rank that cannot hold these nuclei: most rows take the fallback


def peaked_logits(case: str) -> torch.Tensor:
    """Rows shaped like a trained model's, with ties across ranks: three ids at 6, five at 5
    (spread over the shards), the rest well below; padding as in ``full_logits``."""
    vocab, _ = CASES[case]
    g = torch.Generator().manual_seed(4321)
    z = torch.randn(*ROWS, V_PAD, generator=g) * 0.5 - 3.0
    for idx in range(ROWS[0] * ROWS[1]):
        ids = torch.randperm(vocab, generator=g)[:8]
        z.view(-1, V_PAD)[idx, ids[:3]] = 6.0
        z.view(-1, V_PAD)[idx, ids[3:]] = 5.0
    z[..., vocab:] = 1e4
    return z


PEAKED = [dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=5),
          dict(temperature=1.0, top_k=4, top_p=0.95)]


def full_logits(case: str) -> torch.Tensor:
    vocab, quantise = CASES[case]
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(*ROWS, V_PAD, generator=g) * 2.5
    z[..., 10] = z[..., vocab - 5]  # equal logits on different ranks
    z[0, 1, [100, vocab - 1]] = z[0, 1].max() + 1.0  # greedy tie across ranks: smallest id wins
    z[..., vocab:] = 1e4  # padding logits that would dominate if they were not ignored
    return z.bfloat16().float() if quantise else z


def targets(case: str) -> torch.Tensor:
    vocab, _ = CASES[case]
    t = torch.randint(0, vocab, ROWS, generator=torch.Generator().manual_seed(5))
    t[0, :4] = torch.tensor([0, vocab - 1, 255, 256])  # shard edges
    return t


WORLD = 4


def _worker() -> dict:
    import torch.distributed as dist

    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])],
              4: [dist.new_group(list(range(WORLD)))]}
    rank = dist.get_rank()
    out = {}
    for tp, options in groups.items():
        group = options[rank // tp]
        out.update({f"tp{tp}/{k}": v for k, v in _checks(group, tp).items()})
    return out


def _checks(group, world: int) -> dict:
    import torch.distributed as dist

    from megatron_sega.ops import SampleStats, entropy, log_probs, log_probs_and_entropy, sample
    from megatron_sega.ops.sampling import _support

    rank, shard = dist.get_rank(group), V_PAD // world
    start = rank * shard
    out: dict = {}
    for case, (vocab, _) in CASES.items():
        z = full_logits(case)
        local = z[..., start:start + shard].clone().requires_grad_()
        t = targets(case)
        lp, ent = log_probs_and_entropy(local, t, start, vocab, group, chunk_size=7)
        ((lp * 0.3).sum() + (ent * 0.7).sum()).backward()
        out[f"{case}/logp"], out[f"{case}/entropy"] = lp.detach(), ent.detach()
        out[f"{case}/grad"] = local.grad
        out[f"{case}/logp_only"] = log_probs(local.detach(), t, start, vocab, group)
        out[f"{case}/entropy_only"] = entropy(local.detach(), start, vocab, group)
        out[f"{case}/unchanged"] = torch.equal(local.detach(), z[..., start:start + shard])
        bf = local.detach().bfloat16().requires_grad_()
        log_probs(bf, t, start, vocab, group, chunk_size=16).sum().backward()
        out[f"{case}/bf16_grad"] = bf.grad.float()
        for i, cfg in enumerate(CONFIGS):
            chunk = 25 if i == len(CONFIGS) - 1 else 64  # one chunked run: collectives cost
            s = sample(local.detach(), start, vocab, group, seed=SEED, step=STEP, chunk_size=chunk,
                       **cfg)
            for name, value in s._asdict().items():
                out[f"{case}/sample{i}/{name}"] = value
            if cfg["temperature"] > 0:
                w_full = z[..., :vocab].reshape(-1, vocab) / cfg["temperature"]
                width = max(0, min(shard, vocab - start))
                w = local.detach().reshape(-1, shard)[:, :width] / cfg["temperature"]
                kept = _support(w, w_full.amax(-1), w_full.amin(-1), cfg.get("top_k", 0),
                                cfg.get("top_p", 1.0), vocab, start, group)
                out[f"{case}/support{i}"] = torch.ones_like(w, dtype=torch.bool) \
                    if kept is None else kept
        seeds = torch.arange(ROWS[0] * ROWS[1]).view(ROWS) * 11 + 1
        out[f"{case}/row_seeds"] = sample(local.detach(), start, vocab, group, temperature=1.0,
                                          top_p=0.95, seed=seeds, step=STEP).tokens
        # Few candidates: the rows left open go through the fallback, in one call with the rest.
        for i, cfg in enumerate(CONFIGS):
            if cfg["temperature"] > 0:
                stats = SampleStats()
                s = sample(local.detach(), start, vocab, group, seed=SEED, step=STEP,
                           candidates=FEW, stats=stats, **cfg)
                out[f"{case}/few{i}/tokens"], out[f"{case}/few{i}/lp"] = s.tokens, s.logp_sampling
                out[f"{case}/few{i}/open"] = stats.fallback_rows
        # Peaked rows with ties across ranks: settled by the one all-gather (default C), and
        # through the fallback (2 candidates); count the collectives of each.
        peaked = peaked_logits(case)[..., start:start + shard]
        for i, cfg in enumerate(PEAKED):
            for c in (None, 2):
                stats, calls = SampleStats(), _count_collectives()
                with calls:
                    s = sample(peaked, start, vocab, group, seed=SEED, step=STEP, stats=stats,
                               **({} if c is None else dict(candidates=c)), **cfg)
                key = f"{case}/peaked{i}/c{c}"
                out[f"{key}/tokens"], out[f"{key}/lp"] = s.tokens, s.logp_sampling
                out[f"{key}/open"], out[f"{key}/collectives"] = stats.fallback_rows, calls.n
    # Errors that only one rank can see must raise on every rank (not hang the others).
    z = full_logits("v1000")[..., start:start + shard].clone()
    if rank == world - 1:
        z[1, 2, 3] = float("nan")
    errors = []
    for call in (lambda: entropy(z, start, 1000, group),
                 lambda: sample(z, start, 1000, group, temperature=1.0, top_k=5),
                 lambda: entropy(z.nan_to_num(), start, V_PAD + 1, group)):
        try:
            call()
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


class _count_collectives:
    """Counts torch.distributed all_reduce / all-gather calls while active."""

    def __enter__(self):
        import torch.distributed as dist

        self.n, self.saved = 0, {}
        for name in ("all_reduce", "all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                self.saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(self.saved[name]))
        return self

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            self.n += 1
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=1e-6, rtol=2.0 ** -24)


@pytest.fixture(scope="module")
def spawned() -> list[dict]:
    return run_distributed(_worker, WORLD)


@pytest.fixture(params=[2, 4], ids=lambda w: f"tp{w}")
def tp_run(request, spawned):
    """(TP, the results of one TP group by group rank); TP = 2 also checks the second pair."""
    tp = request.param
    results = [{k[len(f"tp{tp}/"):]: v for k, v in r.items() if k.startswith(f"tp{tp}/")}
               for r in spawned]
    for rank in range(tp, WORLD):  # the other TP = 2 pair computed the same thing
        for key, value in results[rank].items():
            expected = results[rank % tp][key]
            assert torch.equal(value, expected) if isinstance(value, torch.Tensor) \
                else value == expected, key
    return tp, results[:tp]


def _reference(case: str) -> dict:
    vocab, _ = CASES[case]
    z = full_logits(case).double().requires_grad_()
    logp_all = torch.log_softmax(z[..., :vocab], -1)
    lp = logp_all.gather(-1, targets(case).unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    ((lp * 0.3).sum() + (ent * 0.7).sum()).backward()
    return {"logp": lp.detach(), "entropy": ent.detach(), "grad": z.grad}


@pytest.mark.parametrize("case", list(CASES))
def test_log_probs_entropy_and_gradients_match_fp64(tp_run, case):
    world, results = tp_run
    ref = _reference(case)
    for rank_out in results:
        assert rank_out[f"{case}/unchanged"]
        for key in ("logp", "entropy"):
            _assert_close(rank_out[f"{case}/{key}"], ref[key])
        _assert_close(rank_out[f"{case}/logp_only"], ref["logp"])
        _assert_close(rank_out[f"{case}/entropy_only"], ref["entropy"])
    grad = torch.cat([r[f"{case}/grad"] for r in results], -1)
    _assert_close(grad, ref["grad"])
    vocab, _ = CASES[case]
    assert torch.count_nonzero(grad[..., vocab:]) == 0
    bf16_grad = torch.cat([r[f"{case}/bf16_grad"] for r in results], -1)
    assert torch.count_nonzero(bf16_grad[..., vocab:]) == 0
    z = full_logits(case)[..., :vocab].bfloat16().double()
    expected = torch.nn.functional.one_hot(targets(case), vocab) - torch.softmax(z, -1)
    torch.testing.assert_close(bf16_grad[..., :vocab].double(), expected, atol=4e-3, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_samples_identical_to_tp1_and_supports_exact(tp_run, case):
    from megatron_sega.ops import sample

    from tests.unit.test_ops_vocab_parallel import reference_support

    world, results = tp_run
    vocab, _ = CASES[case]
    z = full_logits(case)
    for i, cfg in enumerate(CONFIGS):
        single = sample(z, 0, vocab, None, seed=SEED, step=STEP, **cfg)
        for rank_out in results:
            for name, value in single._asdict().items():
                got = rank_out[f"{case}/sample{i}/{name}"]
                if name == "tokens":
                    assert torch.equal(got, value), (cfg, world)
                else:
                    _assert_close(got, value)
        if cfg["temperature"] == 0:
            assert torch.equal(single.tokens, z[..., :vocab].argmax(-1))
            assert single.tokens[0, 1] == 100
        else:
            support = torch.cat([r[f"{case}/support{i}"] for r in results], -1)
            expected = reference_support(z[..., :vocab].reshape(-1, vocab), **cfg)
            assert torch.equal(support, expected), (cfg, world)
    seeds = torch.arange(ROWS[0] * ROWS[1]).view(ROWS) * 11 + 1
    single = sample(z, 0, vocab, None, temperature=1.0, top_p=0.95, seed=seeds, step=STEP)
    for rank_out in results:
        assert torch.equal(rank_out[f"{case}/row_seeds"], single.tokens)


def test_errors_seen_by_one_rank_raise_on_every_rank(tp_run):
    world, results = tp_run
    for rank_out in results:
        nan_entropy, nan_sample, too_big = rank_out["errors"]
        assert "NaN or Inf" in nan_entropy and f"TP rank {world - 1}" in nan_entropy
        assert "NaN or Inf" in nan_sample
        assert "vocab_size=1025" in too_big


@pytest.mark.parametrize("case", list(CASES))
def test_the_fallback_rows_are_exact_and_tp_invariant(tp_run, case):
    """With 4 candidates most rows are open; they and the settled ones give the tokens and
    sampling log-probs of TP=1 with the default candidates, i.e. of the exact draw."""
    from megatron_sega.ops import sample

    from tests.unit.test_ops_vocab_parallel import reference_tokens

    world, results = tp_run
    vocab, _ = CASES[case]
    z = full_logits(case)
    for i, cfg in enumerate(CONFIGS):
        if cfg["temperature"] == 0:
            continue
        single = sample(z, 0, vocab, None, seed=SEED, step=STEP, **cfg)
        expected = reference_tokens(z[..., :vocab].reshape(-1, vocab), seed=SEED, step=STEP, **cfg)
        assert torch.equal(single.tokens.flatten(), expected), cfg
        for rank_out in results:
            assert torch.equal(rank_out[f"{case}/few{i}/tokens"], single.tokens), (cfg, world)
            _assert_close(rank_out[f"{case}/few{i}/lp"], single.logp_sampling)
        if cfg.get("top_p", 1) < 1 or 0 < cfg.get("top_k", 0) > FEW:
            assert results[0][f"{case}/few{i}/open"] > 0, cfg  # the fallback did run


@pytest.mark.parametrize("case", list(CASES))
def test_peaked_rows_take_one_collective_and_split_ties_by_id(tp_run, case):
    from megatron_sega.ops import sample

    from tests.unit.test_ops_vocab_parallel import reference_tokens

    world, results = tp_run
    vocab, _ = CASES[case]
    z = peaked_logits(case)
    for i, cfg in enumerate(PEAKED):
        single = sample(z, 0, vocab, None, seed=SEED, step=STEP, **cfg)
        expected = reference_tokens(z[..., :vocab].reshape(-1, vocab), seed=SEED, step=STEP, **cfg)
        assert torch.equal(single.tokens.flatten(), expected), cfg
        for rank_out in results:
            for c in (None, 2):
                key = f"{case}/peaked{i}/c{c}"
                assert torch.equal(rank_out[f"{key}/tokens"], single.tokens), (cfg, c, world)
                _assert_close(rank_out[f"{key}/lp"], single.logp_sampling)
        assert results[0][f"{case}/peaked{i}/cNone/open"] == 0, cfg
        assert results[0][f"{case}/peaked{i}/cNone/collectives"] == 1, cfg
        assert results[0][f"{case}/peaked{i}/c2/open"] > 0, cfg
        assert results[0][f"{case}/peaked{i}/c2/collectives"] > 1, cfg
