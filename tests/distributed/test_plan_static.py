"""The planner's weights, gradients and optimizer state (issue 23) against what the built model
and Megatron's distributed optimizer hold on each rank, at TP/PP/DP 1 and 2, fp32 and bf16; and
its activation count at TP=2 against the bytes a forward saves (the split between replicated
and TP-sharded tensors).

Weights equal exactly. Gradients and optimizer state live in DDP's buffers, which Megatron pads
per bucket (to a multiple of lcm(DP, 128) elements) so that every DP rank owns an equal shard of
it: the gradients may exceed the plan by that padding, and a rank's optimizer shard holds the
real elements of its share of the padded buffer, up to that padding more or fewer than an even
split of the parameters."""

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS_2 = [(2, 1), (1, 2), (1, 1)]  # (tp, pp) on 2 ranks: DP = 2 / (tp * pp)


def _static(layouts) -> list[dict]:
    import torch.distributed as dist

    from megatron_sega import runtime
    from megatron_sega.config import OptimConfig
    from megatron_sega.models import preset
    from megatron_sega.plan import memory as mem
    from megatron_sega.training.engine import (
        build_optimizer, build_training_model, optimizer_state_bytes,
    )

    spec = preset("tiny", vocab_size=300)
    out = []
    for tp, pp in layouts:
        for dtype in (torch.float32, torch.bfloat16):
            world = dist.get_world_size() if dist.is_initialized() else 1
            rt = runtime.setup(tp, pp)
            dp = world // (tp * pp)
            chunks = build_training_model(spec, rt, dtype)
            optimizer, _ = build_optimizer(chunks, OptimConfig(), total_steps=10, dtype=dtype)
            bf16 = dtype == torch.bfloat16
            params = mem.stage_parameters(spec, tp, pp, rt.pp_rank)
            plan = mem.static_bytes(params, bf16=bf16, dp=dp)
            real = {
                "weights": sum(p.numel() * p.element_size() for c in chunks for p in c.parameters()),
                "grads": sum(b.grad_data.numel() * b.grad_data.element_size()
                             for c in chunks for b in c.buffers),
                "optimizer": optimizer_state_bytes(optimizer),
            }
            out.append({"layout": (tp, pp, dp, str(dtype)), "plan": plan, "real": real,
                        "pad": 2 * (128 * dp) * (12 if bf16 else 8)})
    return out


def _activations_tp2() -> dict:
    from megatron_sega import runtime
    from megatron_sega.models import preset
    from megatron_sega.models.builder import build_model
    from megatron_sega.plan import Layout
    from megatron_sega.plan import memory as mem
    from tests.unit.test_plan import _saved_bytes

    rt = runtime.setup(2, 1)
    out = {}
    for name, spec in (("tiny", preset("tiny", vocab_size=300)),
                       ("8b-cut", preset("llama3-8b", num_layers=1, vocab_size=512))):
        model = build_model(spec, rt, use_te=False).train()
        rows, seq = (4, 64) if name == "tiny" else (1, 32)
        out[name] = (_saved_bytes(model, rows, seq),
                     mem.saved_activation_bytes(spec, Layout(2, 1, 1), rows, seq, bf16=False,
                                                recompute="none", last=True))
    return out


def _all_on_two_ranks() -> dict:
    return {"static": _static(LAYOUTS_2), "activations": _activations_tp2()}


def _check(rows: list[dict]) -> None:
    for row in rows:
        plan, real = row["plan"], row["real"]
        assert real["weights"] == plan["weights"], row
        for part in ("grads", "optimizer"):
            assert abs(real[part] - plan[part]) <= row["pad"], (part, row)


def test_static_bytes_equal_the_built_objects_at_tp_pp_dp_1_and_2():
    _check(_static([(1, 1)]))  # TP = PP = DP = 1, in this process
    results = run_distributed(_all_on_two_ranks, 2)
    for rank_result in results:
        _check(rank_result["static"])
        for name, (measured, planned) in rank_result["activations"].items():
            assert abs(planned - measured) <= 0.15 * measured, (name, measured, planned)
