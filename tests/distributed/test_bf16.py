"""bf16 on Megatron's mixed-precision path (as on GPU), at TP=2, PP=2 and DP=2 on CPU.

One spawn of 2 gloo processes runs every layout; at each one, from the same weights (exactly
representable in bf16, so only the arithmetic differs):

- the bf16 model is Megatron's ``Float16Module`` (every parameter, norm weights included, in
  bf16; fp32 logits), its DDP gradients are fp32 and the optimizer (Megatron's mixed-precision
  one, and its distributed optimizer at DP=2) holds fp32 main parameters; after a step the
  bf16 parameters are the rounding of the fp32 main ones;
- the SFT loss and the SEGA loss (a fixed rollout) and their gradients in bf16 are close to fp32;
- a SEGA step that reuses its rollout (2 updates, clipping) compares its ratio with the trainer's
  own log-probs of the first update: with a learning rate too small to move any bf16 weight, the
  second update's ratio is exactly 1 and nothing is clipped, although the sampler's KV-cached
  log-probs of the same tokens differ from the trainer's in bf16.

Tolerances. bf16 keeps 8 significant bits: unit roundoff u = 2**-8 = 3.9e-3. Every matmul input
is rounded once (relative error <= u per element, random in sign), so a forward through the 4
layers of the tiny model changes each logit by a few u of its scale, and the log-softmax, done in
fp32, adds little. Measured (CPU, torch 2.14): the losses differ by <= 4.4e-4 relative (u/9)
and the gradients by <= 1.6e-2 relative in L2 (4u: the backward rounds the incoming gradients
once more per matmul). The bounds are 2u = 7.8e-3 on the loss and 8u = 3.1e-2 on every gradient
tensor (relative L2 norm of the difference); a gradient that is wrong rather than rounded (a lost
shard, a norm weight left out) is off by O(1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
U = 2.0 ** -8  # bf16 unit roundoff
LOSS_TOL, GRAD_TOL = 2 * U, 8 * U
LAYOUTS = (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1))


def _session(tp: int, pp: int, dtype: str, *overrides: str):
    from megatron_sega.config import load_config
    from megatron_sega.training.session import open_session

    config = load_config(None, [
        f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.device=cpu", f"model.dtype={dtype}",
        "model.preset=tiny", "model.init_seed=5", "optim.clip_grad=0.0", "optim.lr=1e-3",
        "sega.k=4", "sega.micro_batch_size=4", "data.template=chat", "data.max_seq_len=112",
        f"data.train={REPO}/examples/demo_data/train.jsonl", *overrides])
    return open_session(config, train=True, total_steps=10)


def _load_bf16_representable(session) -> None:
    """The same weights in either dtype: the init rounded to bf16 (then exact in fp32 too)."""
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict

    spec, rt = session.spec, session.runtime
    full = random_full_state_dict(spec, spec.padded_vocab_size(rt.tp), seed=5, std=0.08)
    full = {k: v.bfloat16().float() for k, v in full.items()}
    load_full_state_dict(session.chunks[0].module, full, rt.tp, rt.tp_rank)
    session.optimizer.reload_model_params()


def _sft_loss_and_grads(session) -> tuple[float, dict]:
    from megatron_sega.convert.layout import gather_tp
    from megatron_sega.data import collate
    from megatron_sega.training.engine import forward_backward
    from megatron_sega.training.session import dp_all_reduce
    from megatron_sega.training.sft import load_sft_examples, sft_loss_fn, sft_microbatches

    rt = session.runtime
    examples = load_sft_examples(session, session.config.data.train)[:8]
    batch = collate(examples[rt.dp_rank::rt.dp], session.tokenizer.pad_id)
    tokens, = dp_all_reduce([float(batch.loss_mask.sum())], session)
    outputs = forward_backward(session.chunks, rt, sft_microbatches(batch, 2),
                               sft_loss_fn(session.spec.vocab_size, tokens, rt))
    nll, = dp_all_reduce([sum(float(o["nll_sum"]) for o in outputs)], session)
    loss = nll / tokens if rt.is_last_stage else None  # the loss lives on the last stage
    return loss, gather_tp(session.chunks[0].module, rt.tp_group, "grad")


def _sega_loss_and_grads(session) -> tuple[float, dict]:
    from megatron_sega.convert.layout import gather_tp
    from megatron_sega.training.engine import forward_backward
    from megatron_sega.training.sega import rollout_batch, sega_loss_fn, training_microbatches
    from megatron_sega.training.rollouts import score_rollout
    from megatron_sega.training.session import dp_all_reduce
    from tests.distributed.test_sega_update import GROUPS, K, _rollout, _rows

    rt = session.runtime
    per_rank = GROUPS // rt.dp
    mine = _rows(_rollout(), [g * K + j for g in range(rt.dp_rank * per_rank,
                                                        (rt.dp_rank + 1) * per_rank)
                              for j in range(K)])
    scored = score_rollout(session, mine, K)
    batch = rollout_batch(session, mine)
    micro = training_microbatches(session, batch, scored.advantage, {})
    outputs = forward_backward(session.chunks, rt, micro,
                               sega_loss_fn(session, float(GROUPS), False, False))
    loss, = dp_all_reduce([sum(float(o["loss_sum"]) for o in outputs)], session)
    loss = loss if rt.is_last_stage else None
    return loss, gather_tp(session.chunks[0].module, rt.tp_group, "grad")


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _mixed_precision_layout(session) -> dict:
    """What Megatron's GPU path holds in bf16 and in fp32, checked on this rank."""
    from megatron.core.transformer.module import Float16Module

    ddp = session.chunks[0]
    params = list(ddp.module.parameters())
    main = [p for opt in _sub_optimizers(session.optimizer)
            for group in opt.optimizer.param_groups for p in group["params"]]
    norms = [n for n, _ in ddp.module.named_parameters() if "layernorm" in n]
    return {
        "float16_module": isinstance(ddp.module, Float16Module),
        "params_bf16": all(p.dtype == torch.bfloat16 for p in params),
        "norm_params": len(norms),
        "main_grads_fp32": all(p.main_grad.dtype == torch.float32 for p in params),
        "main_params_fp32": bool(main) and all(p.dtype == torch.float32 for p in main),
        "main_params_separate": not ({id(p) for p in main} & {id(p) for p in params}),
    }


def _step_rounds_main_params(session) -> dict:
    """One optimizer step: every fp32 main parameter moves; the bf16 params are the rounding of the fp32
    main params (Megatron's mixed-precision optimizer), or, under the distributed optimizer
    (fp32 main params sharded over DP), the same on every DP replica."""
    import torch.distributed as dist

    from megatron_sega.training.engine import optimizer_step

    params = list(session.chunks[0].module.parameters())
    main = [p for opt in _sub_optimizers(session.optimizer)
            for group in opt.optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in main]
    result = optimizer_step(session.optimizer, session.scheduler)
    # (an lr-sized step need not move a bf16 norm weight near 1: its spacing there is 2**-8)
    moved = sum(int(not torch.equal(b, p)) for b, p in zip(before, main))
    mismatched = 0
    for opt in _sub_optimizers(session.optimizer):
        for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                           getattr(opt, "fp32_from_float16_groups", [])):
            mismatched += sum(int(not torch.equal(m.bfloat16(), p))
                              for p, m in zip(model_group, main_group))
    rt = session.runtime
    if rt.dp > 1:
        flat = torch.cat([p.detach().float().flatten() for p in params])
        spread = flat.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=rt.dp_group)
        mismatched += int((spread != flat).sum())
    return {"ok": result["update_successful"], "moved": moved,
            "total": len(before), "mismatched": mismatched}


def _reuse_ratio(tp: int, pp: int) -> dict:
    """A bf16 SEGA step reusing its rollout, at a learning rate that moves no bf16 weight."""
    from megatron_sega.training.sega import at_label_positions, rollout_batch, sega_step
    from megatron_sega.training.rollouts import load_prompts, make_sampler, sampling_params
    from megatron_sega.training.teacher_forced import token_stats

    session = _session(tp, pp, "bf16", "sega.updates_per_rollout=2", "sega.clip_eps=0.2",
                       "optim.lr=1e-12", "sampling.max_new_tokens=12")
    rt = session.runtime
    prompts = load_prompts(session, session.config.data.train)[:2]
    index = [rt.dp_rank * 2 + i for i in range(2)]
    sampler = make_sampler(session)
    # The sampler's log-probs against the trainer's forward, on the same tokens and weights
    # (the rows and ids sega_step uses for step 0, so the rollout is the same one).
    k = session.config.sega.k
    rows = [ex.prompt_ids for ex in prompts for _ in range(k)]
    ids = [(g * k + j) for g in index for j in range(k)]
    rollout = sampler.generate(rows, sampling_params(session), ids)
    batch = rollout_batch(session, rollout)
    trainer = token_stats(session.chunks, rt, batch, session.spec.vocab_size,
                          micro_batch_size=4)["logp"]
    sampler_logp = at_label_positions(batch, rollout, rollout.logp)
    before = [p.detach().clone() for p in session.chunks[0].module.parameters()]
    metrics = sega_step(session, sampler, prompts, index, 0)
    unchanged = all(torch.equal(b, p) for b, p in
                    zip(before, session.chunks[0].module.parameters()))
    return {"sampler_vs_trainer": float((sampler_logp - trainer).abs().max()),
            "ratio_abs_dev": metrics["ratio_abs_dev"], "clip_fraction": metrics["clip_fraction"],
            "skipped": metrics["skipped_update"], "grad_norm": metrics["grad_norm"],
            "bf16_params_unchanged": unchanged}


def _all_layouts() -> dict:
    out = {}
    for name, tp, pp in LAYOUTS:
        result = {}
        for dtype in ("fp32", "bf16"):
            # The non-distributed optimizer keeps whole all-reduced gradients to compare.
            session = _session(tp, pp, dtype, "parallel.distributed_optimizer=false")
            _load_bf16_representable(session)
            result[f"{dtype}_sft"] = _sft_loss_and_grads(session)
            result[f"{dtype}_sega"] = _sega_loss_and_grads(session)
        result["layout"] = _mixed_precision_layout(session)
        result["step"] = _step_rounds_main_params(session)
        if name == "dp2":  # the distributed optimizer with bf16=True, fp32 main shards
            session = _session(tp, pp, "bf16", "parallel.distributed_optimizer=true")
            _load_bf16_representable(session)
            _sft_loss_and_grads(session)
            result["dist_layout"] = _mixed_precision_layout(session)
            result["dist_step"] = _step_rounds_main_params(session)
        else:
            result["reuse"] = _reuse_ratio(tp, pp)
        out[name] = result
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_layouts, 2)


def _check_mixed_precision(layout: dict, step: dict) -> None:
    assert layout["float16_module"] and layout["params_bf16"] and layout["norm_params"] > 0
    assert layout["main_grads_fp32"] and layout["main_params_fp32"]
    assert layout["main_params_separate"]
    assert step["ok"] and step["moved"] == step["total"] and step["mismatched"] == 0, step


@pytest.mark.parametrize("name", [n for n, _, _ in LAYOUTS])
def test_bf16_matches_fp32(results, name):
    worst = {}
    for rank_result in results:
        r = rank_result[name]
        _check_mixed_precision(r["layout"], r["step"])
        if name == "dp2":
            _check_mixed_precision(r["dist_layout"], r["dist_step"])
        for what in ("sft", "sega"):
            (loss32, grads32), (loss16, grads16) = r[f"fp32_{what}"], r[f"bf16_{what}"]
            if loss32 is not None:
                assert loss32 != 0 and abs(loss16 - loss32) <= LOSS_TOL * abs(loss32), \
                    (what, loss16, loss32)
                worst[f"{what}_loss"] = max(worst.get(f"{what}_loss", 0.0),
                                            abs(loss16 - loss32) / abs(loss32))
            assert grads16.keys() == grads32.keys() and grads32
            for key, g32 in grads32.items():
                err = _rel(grads16[key], g32)
                assert err <= GRAD_TOL, f"{what} grad {key}: relative error {err:.3g}"
                worst[what] = max(worst.get(what, 0.0), err)
    # Only last-stage ranks see the loss; some rank of every layout must have compared it.
    assert "sft_loss" in worst and "sega_loss" in worst, (name, sorted(worst))
    print(f"{name}: bf16 vs fp32 worst relative errors", {k: f"{v:.2e}" for k, v in worst.items()})


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_reused_rollout_starts_at_ratio_one_in_bf16(results, name):
    for rank_result in results:
        r = rank_result[name]["reuse"]
        assert r["bf16_params_unchanged"] and not r["skipped"] and r["grad_norm"] > 0, r
        assert r["ratio_abs_dev"] == 0.0 and r["clip_fraction"] == 0.0, r
    # Not vacuous: the sampler's own log-probs of these tokens differ in bf16 (seen where the
    # logits live: the last stage).
    assert max(rr[name]["reuse"]["sampler_vs_trainer"] for rr in results) > 1e-4

