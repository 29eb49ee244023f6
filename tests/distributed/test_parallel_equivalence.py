"""TP=2, PP=2, DP=2, TP=2 x PP=2 and PP=2 x VPP=2 (the interleaved schedule over two model chunks
per stage) against TP=PP=DP=1: same loss, gradients and Adam steps.

Every layout starts from the same full weights, sees the same global batches and is compared on
full (gathered) tensors in fp32."""

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 3


def _spec():
    from megatron_sega.models import preset

    return preset("tiny", vocab_size=500)  # not a multiple of 128: exercises vocab padding


def _batch(step: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.3).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def train_step_loss(chunks, rt, batch: dict) -> torch.Tensor:
    """Forward and backward of this DP rank's rows of ``batch``, one row a microbatch, loss =
    token-mean NLL over the global batch; returns the global loss (fp64)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sega.training.engine import forward_backward

    n_tokens = batch["loss_mask"].sum()
    per_rank = GLOBAL_BATCH // rt.dp
    micro = [{k: v[i:i + 1] for k, v in batch.items()}
             for i in range(rt.dp_rank * per_rank, (rt.dp_rank + 1) * per_rank)]

    def loss_fn(logits, mb):
        nll = vocab_parallel_cross_entropy(logits.float().clone(), mb["labels"])
        loss = (nll * mb["loss_mask"]).sum() / n_tokens
        return loss, {"loss": loss.detach().clone()}

    metrics = forward_backward(chunks, rt, micro, loss_fn)
    loss = torch.tensor(sum(float(m["loss"]) for m in metrics), dtype=torch.float64)
    torch.distributed.all_reduce(loss, group=rt.dp_group)
    return loss


def _misplace_fc2_shards(model, full, tp, tp_rank) -> None:
    """Negative control: give every TP rank its neighbour's linear_fc2 shard."""
    from megatron_sega.convert.layout import canonical_name, shift_layer, stage_offset, tp_shard

    with torch.no_grad():
        for name, param in model.named_parameters():
            key = shift_layer(canonical_name(name), stage_offset(model))
            if key.endswith("linear_fc2.weight"):
                param.copy_(tp_shard(key, full[key], tp, (tp_rank + 1) % tp))


def _run_layout(tp: int, pp: int, use_distributed_optimizer: bool, misplace: bool = False,
                vpp: int | None = None) -> dict:
    from megatron_sega import runtime
    from megatron_sega.convert.layout import gather_tp, load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict
    from megatron_sega.config import OptimConfig
    from megatron_sega.training.engine import (
        build_optimizer, build_training_model, optimizer_step,
    )

    spec = _spec()
    rt = runtime.setup(tp, pp, vpp=vpp)
    chunks = build_training_model(spec, rt, use_distributed_optimizer=use_distributed_optimizer)
    assert len(chunks) == (vpp or 1)
    full = random_full_state_dict(spec, spec.padded_vocab_size(tp), seed=0)
    load_full_state_dict(chunks, full, rt.tp, rt.tp_rank)
    if misplace:
        _misplace_fc2_shards(chunks[0].module, full, rt.tp, rt.tp_rank)
    optimizer, scheduler = build_optimizer(
        chunks, OptimConfig(lr=1e-3, clip_grad=0.0, adam_eps=1e-6), total_steps=1000,
        use_distributed_optimizer=use_distributed_optimizer)
    optimizer.reload_model_params()  # fp32 main params from the loaded weights

    result = {"losses": [], "grads": None}
    for step in range(STEPS):
        loss = train_step_loss(chunks, rt, _batch(step, spec.vocab_size))
        if step == 0 and not use_distributed_optimizer:
            # (the distributed optimizer's buffers hold reduced grads only for this DP shard)
            result["grads"] = gather_tp(chunks, rt.tp_group, "grad")
        optimizer_step(optimizer, scheduler)
        result["losses"].append(float(loss) if rt.is_last_stage else None)
    result["params"] = gather_tp(chunks, rt.tp_group, "param")
    if rt.tp_rank != 0 or rt.dp_rank != 0:
        return {}
    return result


def _initial_full() -> dict:
    from megatron_sega.models.init import random_full_state_dict

    spec = _spec()
    return random_full_state_dict(spec, spec.padded_vocab_size(1), seed=0)


def _merge(results: list[dict]) -> dict:
    merged = {"grads": {}, "params": {}, "losses": None}
    for r in results:
        if not r:
            continue
        merged["grads"].update(r["grads"] or {})
        merged["params"].update(r["params"])
        if r["losses"][0] is not None:
            merged["losses"] = r["losses"]
    return merged


@pytest.fixture(scope="module")
def reference():
    return _merge(run_distributed(_run_layout, 1, 1, 1, False))


def _assert_close(got: dict, ref: dict, what: str, rel=1e-5):
    """Per tensor: max |got - ref| <= rel * max |ref| (fp32 reductions run in another order)."""
    assert got.keys() == ref.keys(), (what, sorted(set(got) ^ set(ref)))
    for name in ref:
        assert got[name].shape == ref[name].shape, (what, name)
        err = (got[name] - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        assert err <= rel * scale, f"{what} {name}: max abs diff {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize(
    "world,tp,pp,distopt,vpp",
    [(2, 2, 1, False, None), (2, 1, 2, False, None), (2, 1, 1, False, None),
     (2, 1, 1, True, None), (4, 2, 2, False, None), (4, 2, 2, True, None), (2, 1, 2, False, 2),
     (4, 1, 2, True, 2)],
    ids=["tp2", "pp2", "dp2", "dp2-distopt", "tp2xpp2", "tp2xpp2-distopt", "pp2xvpp2",
         "pp2xvpp2xdp2-distopt"],
)
def test_layout_matches_single_process(reference, world, tp, pp, distopt, vpp):
    got = _merge(run_distributed(_run_layout, world, tp, pp, distopt, False, vpp))
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    if not distopt:
        _assert_close(got["grads"], reference["grads"], "grad")
    # Adam divides by sqrt(v): elements whose gradients are ~1e-9 amplify fp32 reduction-order
    # noise, so the weights are compared through their *updates*, to 1e-3 of the update size
    # (a misplaced shard or a wrong DP average changes updates by O(1)).
    initial = _initial_full()
    updates = {k: got["params"][k] - initial[k] for k in initial}
    ref_updates = {k: reference["params"][k] - initial[k] for k in initial}
    _assert_close(updates, ref_updates, "update after 3 Adam steps", rel=1e-3)
    # The comparison is not vacuous: the weights moved and the gradients are not zero.
    assert any(g.abs().max() > 0 for g in reference["grads"].values())


def test_misplaced_tp_shard_is_detected(reference):
    """The comparison above has teeth: a swapped TP shard changes loss and gradients."""
    got = _merge(run_distributed(_run_layout, 2, 2, 1, False, True))
    assert got["losses"][0] != pytest.approx(reference["losses"][0], rel=1e-5)
    with pytest.raises(AssertionError):
        _assert_close(got["grads"], reference["grads"], "grad")
