"""Issue 25, item 7: a non-finite SFT or DPO step is skipped by every rank together, and
non-finite weights are never saved. PP=2 on gloo (2 processes), one spawn.

The real loops (``run_sft``, then ``run_dpo``) run 4 steps each with ``max_bad_steps=2``, with
NaN/Inf injected on ONE pipeline stage: the policy's logits (last stage, training forward), the
DPO reference's logits (last stage) and a gradient (first stage only, the loss stays finite).
SFT runs the fp32 optimizer (``parallel.distributed_optimizer=false``), DPO the distributed
optimizer in bf16. On every rank: the same steps skipped and the same bad-step counts, the
weights of a skipped step unchanged and finite, the LR scheduler not advanced, exit code 1 after
two bad steps in a row, no hang. Then a checkpoint of finite weights is saved and one with a NaN
weight on one stage is refused on both ranks, before anything is written or pruned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_sega.checkpoint.names import LATEST_FILE, step_dir_name
from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
# step -> what turns non-finite on one stage (logits, ref: last stage; grad: first stage)
INJECT = {"sft": {1: "logits", 3: "grad", 4: "logits"},
          "dpo": {1: "ref", 3: "grad", 4: "logits"}}
EXPECTED = [(1, True, 1), (2, False, 0), (3, True, 1), (4, True, 2)]


def _flat(chunks) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for c in chunks for p in c.parameters()])


def _same_as_megatron_step(dtype: str, distributed_optimizer: bool) -> bool:
    """Two finite, clipped steps of ``optimizer_step`` give the weights of Megatron's own
    ``optimizer.step()`` bit for bit (its step, taken apart, is the same step)."""
    from megatron_sega.config import load_config
    from megatron_sega.training.engine import forward_backward, optimizer_step
    from megatron_sega.training.session import open_session
    from megatron_sega.training.sft import sft_loss_fn

    config = load_config(None, [
        "model.preset=tiny", f"model.dtype={dtype}", "parallel.device=cpu", "parallel.pp=2",
        f"parallel.distributed_optimizer={str(distributed_optimizer).lower()}",
        "optim.clip_grad=0.05", "optim.lr=1e-2"])  # the grad norm is ~2: clipped
    weights = []
    for ours in (False, True):
        session = open_session(config, train=True, total_steps=2)
        tokens = torch.randint(0, 300, (2, 2, 16), generator=torch.Generator().manual_seed(0))
        for step in range(2):
            micro = [{"tokens": tokens[step], "labels": tokens[step],
                      "loss_mask": torch.ones(2, 16)}]
            forward_backward(session.chunks, session.runtime, micro,
                             sft_loss_fn(session.vocab_size, 32.0, session.runtime))
            if ours:
                assert not optimizer_step(session.optimizer, session.scheduler)["skipped_update"]
            else:
                assert session.optimizer.step()[0]
                session.scheduler.step(increment=1)
        weights.append(_flat(session.chunks))
    return bool(torch.equal(*weights))


def _run_both(workdir: str) -> dict:
    import megatron_sega.training.dpo as dpo
    import megatron_sega.training.sft as sft
    from megatron_sega.config import load_config
    from megatron_sega.errors import CheckpointError
    from megatron_sega.logging import MetricsLogger
    from megatron_sega.models.builder import unwrap_model
    from megatron_sega.training.session import checkpoint_manager

    state = {"stage": None, "step": 0, "sessions": {}}
    out: dict = {"seen": {"sft": [], "dpo": []}, "steps": {"sft": [], "dpo": []}}

    def injected(what: str) -> bool:
        return INJECT[state["stage"]].get(state["step"]) == what

    def poison_logits(what: str):
        def hook(module, args, output):
            if injected(what) and (what == "ref" or module.training):
                logits, bias = output
                return logits * float("nan"), bias
            return output
        return hook

    def opening(module, real):
        def open_session(*args, **kwargs):
            session = real(*args, **kwargs)
            state["sessions"][state["stage"]] = session
            if session.runtime.is_last_stage:
                unwrap_model(session.model).output_layer.register_forward_hook(
                    poison_logits("logits"))
            return session
        return open_session

    def referencing(real):
        def load_reference(session, path=None):
            chunks = real(session, path)
            if session.runtime.is_last_stage:
                unwrap_model(chunks[-1]).output_layer.register_forward_hook(poison_logits("ref"))
            return chunks
        return load_reference

    def backward(real):
        def forward_backward(chunks, runtime, *args, **kwargs):
            outputs = real(chunks, runtime, *args, **kwargs)
            if injected("grad") and runtime.pp_rank == 0:  # after the backward, before the step
                param = next(p for p in chunks[0].parameters() if p.requires_grad)
                param.main_grad.view(-1)[0] = float("inf")
            return outputs
        return forward_backward

    def stepping(stage, real):
        def step(session, *args):
            state["step"] += 1
            before, sched = _flat(session.chunks), session.scheduler.num_steps
            metrics = real(session, *args)
            after = _flat(session.chunks)
            out["steps"][stage].append((
                state["step"], bool(metrics["skipped_update"]), bool(torch.equal(before, after)),
                bool(torch.isfinite(after).all()), session.scheduler.num_steps - sched))
            return metrics
        return step

    log = MetricsLogger.log

    def logging(self, step, metrics, **kwargs):
        out["seen"][state["stage"]].append(
            (step, bool(metrics["skipped_update"]), metrics["bad_steps_in_a_row"]))
        return log(self, step, metrics, **kwargs)

    MetricsLogger.log = logging
    sft.open_session, dpo.open_session = opening(sft, sft.open_session), opening(
        dpo, dpo.open_session)
    dpo.load_reference = referencing(dpo.load_reference)
    sft.forward_backward = backward(sft.forward_backward)
    dpo.forward_backward = backward(dpo.forward_backward)
    sft.sft_step, dpo.dpo_step = stepping("sft", sft.sft_step), stepping("dpo", dpo.dpo_step)
    common = ["model.preset=tiny", "model.init_seed=3", "parallel.tp=1", "parallel.pp=2",
              "parallel.device=cpu", f"data.train={REPO}/examples/demo_data/train.jsonl",
              "data.max_seq_len=64", "optim.lr=1e-3",
              "logging.progress=false", "logging.tensorboard=false"]
    for stage, run, overrides in (
            ("sft", sft.run_sft, ["model.dtype=fp32", "parallel.distributed_optimizer=false",
                                  "sft.steps=4", "sft.global_batch_size=4",
                                  "sft.micro_batch_size=2", "sft.max_bad_steps=2"]),
            ("dpo", dpo.run_dpo, ["model.dtype=bf16", "dpo.steps=4", "dpo.global_batch_size=2",
                                  "dpo.micro_batch_size=1", "dpo.max_bad_steps=2"])):
        state["stage"], state["step"] = stage, 0
        config = load_config(None, common + overrides + [f"logging.dir={workdir}/{stage}"])
        out[f"rc_{stage}"] = run(config, None)

    # Non-finite weights are never saved: a finite checkpoint first, then a NaN weight on the
    # first stage only; keep_last=1 would prune the good checkpoint if the bad one were written.
    session = state["sessions"]["dpo"]
    save_dir = Path(workdir) / "ckpt"
    session = dataclasses.replace(session, config=session.config.with_overrides(
        f"checkpoint.save_dir={save_dir}", "checkpoint.keep_last=1"))
    ckpt = checkpoint_manager(session, "dpo")
    ckpt.save(4)
    if session.runtime.pp_rank == 0:
        with torch.no_grad():
            next(session.model.parameters()).view(-1)[0] = float("nan")
    try:
        ckpt.save(5)
        out["refused"] = None
    except CheckpointError as err:
        out["refused"] = str(err)
    torch.distributed.barrier()
    out["saved"] = sorted(p.name for p in save_dir.iterdir())
    out["pp_rank"] = session.runtime.pp_rank
    out["same_as_megatron"] = [_same_as_megatron_step("fp32", False),
                               _same_as_megatron_step("bf16", True)]
    return out


def test_nonfinite_sft_and_dpo_steps_are_skipped_by_all_and_never_saved(tmp_path):
    results = run_distributed(_run_both, 2, str(tmp_path), deadline=420)
    assert sorted(r["pp_rank"] for r in results) == [0, 1]
    for r in results:
        for stage in ("sft", "dpo"):
            assert r[f"rc_{stage}"] == 1, (stage, r)  # stopped after max_bad_steps=2 in a row
            assert r["seen"][stage] == EXPECTED, (stage, r)
            for step, skipped, unchanged, finite, scheduled in r["steps"][stage]:
                # skipped: weights untouched and the LR schedule not advanced; else one step
                assert (unchanged, finite, scheduled) == (skipped, True, int(not skipped)), (
                    stage, step, r)
        assert r["refused"] and "refusing to save the checkpoint of step 5" in r["refused"], r
        assert r["saved"] == sorted([LATEST_FILE, step_dir_name(4)]), r
        assert r["same_as_megatron"] == [True, True], r
