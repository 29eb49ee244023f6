"""Two DPO steps and two IPO steps at TP=2, PP=2, DP=2 and PP=2 x VPP=2 against TP=PP=DP=1
(fp32, CPU): the
same metrics (loss, reward accuracy, chosen/rejected rewards, margin), gradients and weights.

Each run goes through the real loop pieces (``open_session``, the default reference = a frozen
copy of the starting weights, ``GlobalBatchIterator``, ``dpo_step``: microbatch order, reference
log-probs, the loss through Megatron's schedule, the optimizer). Step 1 starts from
policy == reference (loss log 2); step 2 has a policy that moved. At TP=PP=DP=1 the step-2 loss
is also recomputed here in float64 from teacher-forced log-probs of the policy and the reference.
Two spawns: 1/1/1 (1 process), then TP=2, PP=2, DP=2, PP=2 x VPP=2 in turn (2 processes)."""

import math

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

PAIRS, MICRO, BETA = 8, 2, 0.5
METRICS = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")


def _expected_loss(session, reference, shard, kind: str) -> float:
    """The DPO/IPO loss of ``shard`` by hand in float64, chosen and rejected forwarded apart."""
    from megatron_sega.data import collate_pairs
    from megatron_sega.training.teacher_forced import token_stats

    pairs = collate_pairs(shard, session.tokenizer.pad_id)
    logps = {}
    for name, chunks in (("policy", session.chunks), ("ref", reference)):
        for side in ("chosen", "rejected"):
            batch = getattr(pairs, side)
            stats = token_stats(chunks, session.runtime, batch, session.spec.vocab_size, 3)
            logps[name, side] = stats["logp"].double().sum(1).tolist()
    total = 0.0
    for i in range(len(shard)):
        h = (logps["policy", "chosen"][i] - logps["ref", "chosen"][i]
             - logps["policy", "rejected"][i] + logps["ref", "rejected"][i])
        total += (math.log1p(math.exp(-BETA * h)) if kind == "sigmoid"
                  else (h - 1 / (2 * BETA)) ** 2)
    return total / len(shard)


def _dpo_two_steps(tp: int, pp: int, vpp: int | None, kind: str) -> dict:
    from megatron_sega.convert.layout import gather_tp
    from megatron_sega.config import load_config
    from megatron_sega.data import GlobalBatchIterator
    from megatron_sega.training.dpo import dpo_step
    from megatron_sega.training.evaluate import load_eval_pairs
    from megatron_sega.training.session import load_reference
    from megatron_sega.training.session import open_session

    config = load_config(None, [
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp or 'null'}",
        "parallel.device=cpu", "model.preset=tiny",
        "model.init_seed=5", "optim.lr=1e-3", "optim.clip_grad=0.0", "optim.adam_eps=1e-4",
        f"dpo.loss={kind}", f"dpo.beta={BETA}", f"dpo.global_batch_size={PAIRS}",
        f"dpo.micro_batch_size={MICRO}", "data.max_seq_len=64",
        # (gradients are compared too: the non-distributed optimizer keeps them all-reduced)
        "parallel.distributed_optimizer=false"])
    session = open_session(config, train=True, total_steps=10)
    rt = session.runtime
    assert len(session.chunks) == (vpp or 1)
    reference = load_reference(session)
    pairs = load_eval_pairs(session, "examples/demo_data/train.jsonl", append_eos=True)[:4 * PAIRS]
    batches = iter(GlobalBatchIterator(pairs, PAIRS, dp_rank=rt.dp_rank, dp_size=rt.dp, seed=3))
    before = gather_tp(session.chunks, rt.tp_group, "param")
    steps, expected = [], None
    for step in range(2):
        shard = next(batches)
        if step == 1 and rt.world_size == 1:
            expected = _expected_loss(session, reference, shard, kind)
        steps.append({k: v for k, v in dpo_step(session, reference, shard).items()
                      if k in METRICS})
    grads = gather_tp(session.chunks, rt.tp_group, "grad")  # step 2's
    after = gather_tp(session.chunks, rt.tp_group, "param")
    if rt.tp_rank != 0 or rt.dp_rank != 0:
        return {}
    return {"steps": steps if rt.is_last_stage else None, "expected": expected, "grads": grads,
            "update": {k: after[k] - before[k] for k in after}}


def _both_losses(tp: int, pp: int, vpp: int | None = None) -> dict:
    return {kind: _dpo_two_steps(tp, pp, vpp, kind) for kind in ("sigmoid", "ipo")}


LAYOUTS = {"tp2": (2, 1, None), "pp2": (1, 2, None), "dp2": (1, 1, None), "pp2xvpp2": (1, 2, 2)}


def _layouts() -> dict:
    return {name: _both_losses(*layout) for name, layout in LAYOUTS.items()}


def _merge(per_rank: list[dict]) -> dict:
    """{kind: {'steps', 'expected', 'grads', 'update'}} from the ranks' partial results."""
    merged = {}
    for result in per_rank:
        for kind, part in result.items():
            into = merged.setdefault(kind, {"steps": None, "expected": None, "grads": {},
                                            "update": {}})
            if not part:
                continue
            into["grads"].update(part["grads"])
            into["update"].update(part["update"])
            for key in ("steps", "expected"):
                if part[key] is not None:
                    into[key] = part[key]
    return merged


@pytest.fixture(scope="module")
def runs():
    reference = _merge(run_distributed(_both_losses, 1, 1, 1))
    per_rank = run_distributed(_layouts, 2)
    layouts = {name: _merge([r[name] for r in per_rank]) for name in per_rank[0]}
    return reference, layouts


def test_single_process_dpo_and_ipo_losses_are_right(runs):
    reference, _ = runs
    sigmoid, ipo = reference["sigmoid"], reference["ipo"]
    assert sigmoid["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ipo["steps"][0]["loss"] == pytest.approx(1 / (4 * BETA ** 2), abs=1e-5)
    for run in (sigmoid, ipo):
        first = run["steps"][0]
        assert first["reward_accuracy"] == 0 and first["margin"] == 0
        assert run["steps"][1]["loss"] == pytest.approx(run["expected"], rel=1e-5)
        assert run["steps"][1]["margin"] != 0
    # the expectation is not the step-1 value: the policy moved
    assert abs(sigmoid["expected"] - math.log(2)) > 1e-3


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_steps_match_single_process(runs, layout, kind):
    reference, layouts = runs
    ref, got = reference[kind], layouts[layout][kind]
    for step, (a, b) in enumerate(zip(got["steps"], ref["steps"]), start=1):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (step, key)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, ref_grad in ref["grads"].items():
        err = (got["grads"][name] - ref_grad).abs().max().item()
        assert err <= 1e-5 * ref_grad.abs().max().item(), f"grad {name}: {err:.3g}"
    moved = 0
    for name, ref_update in ref["update"].items():
        scale = ref_update.abs().max().item()
        err = (got["update"][name] - ref_update).abs().max().item()
        # Adam's early steps are ~lr * g / (|g| + eps): compared to 1e-3 of the update's size
        assert err <= 1e-3 * scale + 1e-9, f"{name}: {err:.3g} vs update scale {scale:.3g}"
        moved += scale > 0
    assert moved == len(ref["update"]), "every parameter should move in two steps"
