"""From the same rollouts, one SEGA update at TP=2, PP=2, DP=2 and PP=2 x VPP=2 gives the same new
weights as at TP=PP=DP=1 (fp32, CPU). The update goes through the real loop pieces: scoring of the rollout,
advantages, microbatching, the SEGA loss through Megatron's schedule and the optimizer."""

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

GROUPS, K = 4, 4
LR, ADAM_EPS = 1e-3, 1e-4


def _rollout():
    """A deterministic rollout of GROUPS x K candidates with varied lengths and stop tokens."""
    from megatron_sega.sampling import Rollout

    g = torch.Generator().manual_seed(7)
    n, width = GROUPS * K, 12
    prompts = []
    for group in range(GROUPS):
        prompt = torch.randint(3, 400, (3 + group,), generator=g).tolist()
        prompts += [prompt] * K
    lengths = torch.randint(4, width + 1, (n,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    response = torch.randint(3, 400, (n, width), generator=g).masked_fill(~mask, 0)
    stopped = torch.rand(n, generator=g) > 0.5
    response[stopped, lengths[stopped] - 1] = 2  # EOS of the tiny tokenizer
    content = mask.clone()
    content[stopped, lengths[stopped] - 1] = False
    entropy = (torch.rand(n, width, generator=g) * 3).masked_fill(~mask, 0)
    logp = (-torch.rand(n, width, generator=g) * 4).masked_fill(~mask, 0)
    return Rollout(prompt_ids=prompts, response_ids=response, response_mask=mask,
                   content_mask=content, logp=logp, logp_sampling=logp, entropy=entropy,
                   lengths=lengths, finish_reason=["stop" if s else "length" for s in stopped],
                   sample_ids=torch.arange(n))


def _rows(rollout, rows):
    from megatron_sega.sampling.sampler import _select

    return _select(rollout, torch.as_tensor(rows))


def _sega_update(tp: int, pp: int, vpp: int | None = None) -> dict:
    """Gradients under both normalisations, then one optimizer step (sequence_sum)."""
    from megatron_sega.convert.layout import gather_tp
    from megatron_sega.config import load_config
    from megatron_sega.training.engine import forward_backward, optimizer_step
    from megatron_sega.training.sega import (
        at_label_positions, rollout_batch, sega_loss_fn, training_microbatches,
    )
    from megatron_sega.training.rollouts import score_rollout
    from megatron_sega.training.session import open_session

    config = load_config(None, [
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp or 'null'}",
        "parallel.device=cpu", f"optim.lr={LR}",
        "optim.clip_grad=0.0", f"optim.adam_eps={ADAM_EPS}", f"sega.k={K}", "sega.micro_batch_size=2",
        "model.preset=tiny", "model.init_seed=5",
        # (the gradients are compared too: the non-distributed optimizer keeps them all-reduced)
        "parallel.distributed_optimizer=false"])
    session = open_session(config, train=True, total_steps=10)
    rt = session.runtime
    full = _rollout()
    per_rank = GROUPS // rt.dp
    groups = range(rt.dp_rank * per_rank, (rt.dp_rank + 1) * per_rank)
    mine = _rows(full, [g * K + j for g in groups for j in range(K)])
    scored = score_rollout(session, mine, K)
    batch = rollout_batch(session, mine)
    micro = training_microbatches(session, batch, scored.advantage,
                                  {"old_logp": at_label_positions(batch, mine, mine.logp)})
    assert len(session.chunks) == (vpp or 1)
    before = gather_tp(session.chunks, rt.tp_group, "param")
    grads = {}
    for norm in ("token_mean", "sequence_sum"):  # the last one's gradients feed the step
        normaliser = GROUPS if norm == "sequence_sum" else float(full.response_mask.sum())
        forward_backward(session.chunks, rt, micro, sega_loss_fn(session, normaliser, False, False, norm))
        grads[norm] = gather_tp(session.chunks, rt.tp_group, "grad")
    optimizer_step(session.optimizer, session.scheduler)
    after = gather_tp(session.chunks, rt.tp_group, "param")
    if rt.tp_rank != 0 or rt.dp_rank != 0:
        return {}
    return {"update": {k: after[k] - before[k] for k in after},
            "weight_max": {k: before[k].abs().max().item() for k in before}, **grads}


def _merge(results):
    merged = {"update": {}, "weight_max": {}, "token_mean": {}, "sequence_sum": {}}
    for r in results:
        for key in merged:
            merged[key].update(r.get(key, {}))
    return merged


@pytest.fixture(scope="module")
def reference():
    return _merge(run_distributed(_sega_update, 1, 1, 1))


@pytest.mark.parametrize("world,tp,pp,vpp", [(2, 2, 1, None), (2, 1, 2, None), (2, 1, 1, None),
                                             (2, 1, 2, 2)],
                         ids=["tp2", "pp2", "dp2", "pp2xvpp2"])
def test_sega_update_matches_single_process(reference, world, tp, pp, vpp):
    got_all = _merge(run_distributed(_sega_update, world, tp, pp, vpp))
    ref, got = reference["update"], got_all["update"]
    assert got.keys() == ref.keys()
    for norm in ("token_mean", "sequence_sum"):
        for name, ref_grad in reference[norm].items():
            err = (got_all[norm][name] - ref_grad).abs().max().item()
            assert err <= 1e-5 * ref_grad.abs().max().item(), f"{norm} grad {name}: {err:.3g}"
    moved = 0
    for name, ref_update in ref.items():
        scale = ref_update.abs().max().item()
        err = (got[name] - ref_update).abs().max().item()
        # Adam's first step is lr * g / (|g| + eps) per element, whose slope in g is at most lr / eps:
        # the update can differ by no more than lr / eps times the gradient's difference (measured
        # above, within reduction-order noise), plus the fp32 rounding of the new weights (an ulp of
        # the largest weight on each side: a norm weight near 1 moves by ~1e-3 in steps of 1.2e-7).
        grad_err = (got_all["sequence_sum"][name] - reference["sequence_sum"][name]).abs().max().item()
        rounding = 2 * torch.finfo(torch.float32).eps * reference["weight_max"][name]
        bound = LR / ADAM_EPS * grad_err + rounding + 1e-12
        assert err <= bound, f"{name}: {err:.3g} vs bound {bound:.3g} (update scale {scale:.3g})"
        moved += scale > 0
    assert moved == len(ref), "every parameter should move in one SEGA update"
