"""Packed and padded batches give the same results (issue 22), at TP=2, PP=2, DP=2 and
PP=2 x VPP=2 (fp32, CPU, two processes, one spawn):

- eval records: per-pair log pi(chosen|q), log pi(rejected|q) (within 1e-4 absolute, as the
  evaluation test against transformers) and token counts (equal);
- one DPO step: loss, margin, rewards and summed log-probs (within 1e-5 relative) and the
  gradients (max error within 1e-5 of the largest gradient);
- one SFT step: loss and gradients (the same tolerances);
- one SEGA update from a fixed rollout (Eq. 2, sequence_sum): gradients (the same tolerance);
  packed, the candidates are shared out over DP by tokens.

Each layout builds a session padded, then packed (``data.packing=true``), from the same seeded
weights, and runs the real loop pieces: ``evaluate_pairs``, ``dpo_step``, ``sft_step``, the
SEGA microbatches and loss through Megatron's schedule. Packed runs take their DP share of each
global batch by tokens (``dp_share``), padded ones the contiguous share, as the loops do; the
global loss and the DP-reduced gradients do not depend on the split. The learning rate is small
(1e-5) so that the DPO step before the SFT step moves both runs alike."""

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp2": (2, 1, None), "pp2": (1, 2, None), "dp2": (1, 1, None), "pp2xvpp2": (1, 2, 2)}
PAIRS, EVAL_PAIRS = 8, 11
TOL_LOGP, TOL_REL = 1e-4, 1e-5


def _share(batch, sizes, rt, packing):
    from megatron_sega.training.microbatch import dp_share

    return dp_share(batch, sizes, rt) if packing else batch


def _iterator(items, rt, packing):
    from megatron_sega.data import GlobalBatchIterator

    return GlobalBatchIterator(items, PAIRS, dp_rank=0 if packing else rt.dp_rank,
                               dp_size=1 if packing else rt.dp, seed=3)


def _one_layout(tp: int, pp: int, vpp, packing: bool) -> dict:
    from megatron_sega.config import load_config
    from megatron_sega.convert.layout import gather_tp
    from megatron_sega.training.dpo import dpo_step
    from megatron_sega.training.engine import forward_backward
    from megatron_sega.training.evaluate import evaluate_pairs, load_eval_pairs
    from megatron_sega.training.rollouts import score_rollout
    from megatron_sega.training.sega import (
        packed_rollout_batch, rollout_batch, sega_loss_fn, training_microbatches,
    )
    from megatron_sega.training.session import load_reference, open_session
    from megatron_sega.training.sft import sft_step
    from tests.distributed.test_sega_update import GROUPS, K, _rollout, _rows

    config = load_config(None, [
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vpp={vpp or 'null'}",
        "parallel.device=cpu", "model.preset=tiny", "model.init_seed=5", "optim.lr=1e-5",
        "optim.clip_grad=0.0", "optim.adam_eps=1e-4", "parallel.distributed_optimizer=false",
        "data.max_seq_len=128", f"data.packing={str(packing).lower()}",
        f"dpo.global_batch_size={PAIRS}", "dpo.micro_batch_size=2", "dpo.beta=0.5",
        "dpo.max_tokens_per_microbatch=384", f"sft.global_batch_size={PAIRS}",
        "sft.micro_batch_size=2", "sft.max_tokens_per_microbatch=200",
        "eval.max_tokens_per_microbatch=160", f"sega.k={K}", "sega.micro_batch_size=2",
        "sega.max_tokens_per_microbatch=48"])
    session = open_session(config, train=True, total_steps=10)
    rt = session.runtime
    pairs = load_eval_pairs(session, "examples/demo_data/train.jsonl", append_eos=True)[:2 * PAIRS]
    out: dict = {}
    records, _ = evaluate_pairs(session, pairs[:EVAL_PAIRS], beta=0.1, micro_batch_size=3)
    out["eval"] = records
    reference = load_reference(session)
    shard = _share(next(_iterator(pairs, rt, packing)),
                   [p.chosen.length + p.rejected.length for p in pairs[:PAIRS]], rt, packing)
    out["dpo"] = dpo_step(session, reference, shard)
    out["dpo_grads"] = gather_tp(session.chunks, rt.tp_group, "grad")
    examples = [p.chosen for p in pairs]
    shard = next(_iterator(examples, rt, packing))
    out["sft"] = sft_step(session, _share(shard, [ex.length for ex in shard], rt, packing))
    out["sft_grads"] = gather_tp(session.chunks, rt.tp_group, "grad")
    # SEGA: the groups split over DP as the loop splits prompts (whole groups per rank).
    full = _rollout()
    per_rank = GROUPS // rt.dp
    mine = _rows(full, [g * K + j for g in range(rt.dp_rank * per_rank,
                                                 (rt.dp_rank + 1) * per_rank) for j in range(K)])
    scored = score_rollout(session, mine, K)
    if packing:  # the candidates shared out over DP by tokens (dp_rebalance)
        batch, advantage = packed_rollout_batch(session, mine, scored.advantage)
    else:
        batch, advantage = rollout_batch(session, mine), scored.advantage
    micro = training_microbatches(session, batch, advantage, {})
    if packing:
        out["sega_rows"] = len(micro)
    forward_backward(session.chunks, rt, micro,
                     sega_loss_fn(session, GROUPS, False, False, "sequence_sum"))
    out["sega_grads"] = gather_tp(session.chunks, rt.tp_group, "grad")
    if rt.tp_rank != 0 or rt.dp_rank != 0:
        return {}
    if not rt.is_last_stage:  # metrics live on the last stage; gradients on every stage
        out = {k: v for k, v in out.items() if k.endswith("_grads")}
    return out


def _layouts() -> dict:
    return {(name, packing): _one_layout(*layout, packing)
            for name, layout in LAYOUTS.items() for packing in (False, True)}


def _merge(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if key.endswith("_grads"):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    return merged


@pytest.fixture(scope="module")
def runs():
    per_rank = run_distributed(_layouts, 2)
    keys = per_rank[0].keys()
    return {key: _merge([r[key] for r in per_rank]) for key in keys}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL_REL * max(abs(a), abs(b), 1.0)


def _grads_equal(padded: dict, packed: dict, what: str) -> None:
    assert padded.keys() == packed.keys() and padded, what
    for name, ref in padded.items():
        err = (packed[name] - ref).abs().max().item()
        assert err <= TOL_REL * max(ref.abs().max().item(), 1e-12), f"{what} {name}: {err:.3g}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_equals_padded(runs, layout):
    padded, packed = runs[layout, False], runs[layout, True]
    assert len(packed["eval"]) == EVAL_PAIRS
    for a, b in zip(padded["eval"], packed["eval"]):
        assert a["id"] == b["id"]
        assert a["n_tokens_chosen"] == b["n_tokens_chosen"]
        assert a["n_tokens_rejected"] == b["n_tokens_rejected"]
        for key in ("logp_chosen", "logp_rejected"):
            assert abs(a[key] - b[key]) <= TOL_LOGP, (layout, a["id"], key, a[key], b[key])
    for key in ("loss", "margin", "chosen_reward", "rejected_reward", "logp_chosen",
                "logp_rejected", "reward_accuracy", "tokens", "train_tokens", "attention_span"):
        assert _close(padded["dpo"][key], packed["dpo"][key]), (layout, "dpo", key)
    for key in ("loss", "tokens", "train_tokens", "attention_span"):
        assert _close(padded["sft"][key], packed["sft"][key]), (layout, "sft", key)
    # MFU's FLOPs do not count the packed rows' width: their sequences are shorter than the rows
    assert packed["sft"]["attention_span"] < packed["sft"]["seq_len"], layout
    # the packed rows are fewer and wider; the SEGA rollout needs several rows of 48 tokens
    assert packed["sega_rows"] >= 2
    for what in ("dpo_grads", "sft_grads", "sega_grads"):
        _grads_equal(padded[what], packed[what], f"{layout} {what}")
