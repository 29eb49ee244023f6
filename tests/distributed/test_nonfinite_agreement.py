"""A non-finite SEGA step is skipped by every rank together: DP=2 x PP=2 on gloo (4 processes).

The real ``megatron-sega sega`` loop (``run_sega``) runs 4 steps with ``sega.max_bad_steps=2``.
A forward hook on the output layer of ONE data-parallel replica's last stage turns its logits
into NaN: while sampling at step 1 (replica 1) and step 4 (replica 0), and in the training
forward at step 3 (replica 0). Every rank must skip steps 1, 3 and 4 together, step 2 must
update, the bad-step counters must match on all ranks (1, 0, 1, 2), every rank must stop at
step 4 with exit code 1, the replicas' weights must stay equal, and none of it may hang
(the ranks are killed after a deadline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
# step -> (where the NaN appears, the DP replica it appears on)
INJECT = {1: ("sample", 1), 3: ("train", 0), 4: ("sample", 0)}


def _run_with_injected_nans(logdir: str) -> dict:
    import torch.distributed as dist

    import megatron_sega.training.sega as sega
    from megatron_sega.config import load_config
    from megatron_sega.logging import MetricsLogger
    from megatron_sega.models.builder import unwrap_model

    current = {"step": 0}
    seen: list[tuple] = []
    sessions = []

    def hook(module, args, output):
        where, replica = INJECT.get(current["step"], (None, None))
        mode = "train" if module.training else "sample"
        if where == mode and sessions[0].runtime.dp_rank == replica:
            logits, bias = output
            return logits * float("nan"), bias
        return output

    open_session, sega_step, log = sega.open_session, sega.sega_step, MetricsLogger.log

    def opening(*args, **kwargs):
        session = open_session(*args, **kwargs)
        sessions.append(session)
        gpt = unwrap_model(session.model)
        if session.runtime.is_last_stage:
            gpt.output_layer.register_forward_hook(hook)
        return session

    def stepping(session, sampler, prompts, index, step, reference=None):
        current["step"] = step + 1
        return sega_step(session, sampler, prompts, index, step, reference)

    def logging(self, step, metrics, **kwargs):
        seen.append((step, bool(metrics["skipped_update"]), metrics["bad_steps_in_a_row"]))
        return log(self, step, metrics, **kwargs)

    # The sampler decodes through its lean forward (sampling/decode.py), which reads the output
    # layer's weight without calling the module: inject there too.
    from megatron_sega.sampling import decode

    lean_call = decode.LeanForward.__call__

    def lean_forward(self, tokens, hidden=None):
        out = lean_call(self, tokens, hidden)
        where, replica = INJECT.get(current["step"], (None, None))
        if (self.model.post_process and where == "sample"
                and sessions[0].runtime.dp_rank == replica):
            return out * float("nan")
        return out

    decode.LeanForward.__call__ = lean_forward
    sega.open_session, sega.sega_step, MetricsLogger.log = opening, stepping, logging
    config = load_config(None, [
        "model.preset=tiny", "model.dtype=bf16", "model.init_seed=3", "parallel.tp=1",
        "parallel.pp=2", "parallel.device=cpu", f"data.train={REPO}/examples/demo_data/train.jsonl",
        "data.max_seq_len=112", "sampling.max_new_tokens=8", "sega.k=2", "sega.steps=4",
        "sega.prompts_per_step=2", "sega.micro_batch_size=2", "sega.max_bad_steps=2",
        "optim.lr=1e-3", f"logging.dir={logdir}", "logging.progress=false",
        "logging.tensorboard=false"])
    rc = sega.run_sega(config, None)
    session = sessions[0]
    rt = session.runtime
    flat = torch.cat([p.detach().float().flatten() for p in session.model.module.parameters()])
    other = flat.clone()
    dist.all_reduce(other, op=dist.ReduceOp.MAX, group=rt.dp_group)
    return {"rc": rc, "seen": seen, "replicas_equal": bool(torch.equal(flat, other)),
            "dp_rank": rt.dp_rank, "pp_rank": rt.pp_rank}


def test_nan_on_one_replica_is_skipped_by_all(tmp_path):
    results = run_distributed(_run_with_injected_nans, 4, str(tmp_path), deadline=420)
    assert sorted((r["dp_rank"], r["pp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0),
                                                                     (1, 1)]
    expected = [(1, True, 1), (2, False, 0), (3, True, 1), (4, True, 2)]
    for r in results:
        assert r["rc"] == 1, r  # stopped after max_bad_steps=2 in a row
        assert r["seen"] == expected, r
        assert r["replicas_equal"], r


def _eval_with_nan_on_one_replica(_: str) -> dict:
    """DP=2: replica 1's logits are NaN while the held-out pairs are scored, then (pairs
    finite) while the answer prompts are sampled."""
    import math

    from megatron_sega.config import load_config
    from megatron_sega.errors import NonFiniteEvalError
    from megatron_sega.models.builder import unwrap_model
    from megatron_sega.sampling import decode
    from megatron_sega.training.answers import (
        answer_records, load_answer_prompts, training_eval_metrics,
    )
    from megatron_sega.training.evaluate import evaluate_pairs, held_out_summary, load_eval_pairs
    from megatron_sega.training.session import open_session

    config = load_config(None, [
        "model.preset=tiny", "model.init_seed=3", "parallel.device=cpu",
        f"data.eval={REPO}/examples/demo_data/eval.jsonl", "data.max_seq_len=112",
        "sampling.max_new_tokens=6", "logging.progress=false", "logging.tensorboard=false"])
    session = open_session(config, train=False)
    pairs = load_eval_pairs(session, config.data.eval)
    prompts = load_answer_prompts(session, config.data.eval)[:4]
    broken = session.runtime.dp_rank == 1
    out: dict = {"dp_rank": session.runtime.dp_rank}

    def raised(fn) -> str | None:
        try:
            fn()
        except NonFiniteEvalError as err:
            return str(err)
        return None

    hook = unwrap_model(session.model).output_layer.register_forward_hook(
        lambda module, args, output: (output[0] * float("nan"), output[1]) if broken else output)
    out["pairs_error"] = raised(lambda: evaluate_pairs(session, pairs, beta=0.1))
    summary = held_out_summary(session, pairs, beta=0.1)
    out["held_out_nan"] = sorted(k for k, v in summary.items() if math.isnan(v))
    hook.remove()

    lean_call = decode.LeanForward.__call__  # the sampler's decode skips the module's hooks

    def lean_forward(self, tokens, hidden=None):
        logits = lean_call(self, tokens, hidden)
        return logits * float("nan") if broken and self.model.post_process else logits

    decode.LeanForward.__call__ = lean_forward
    out["answers_error"] = raised(lambda: answer_records(session, prompts, 2))
    metrics = training_eval_metrics(session, pairs, prompts, 2)
    out["metrics_nan"] = sorted(k for k, v in metrics.items()
                                if isinstance(v, float) and math.isnan(v))
    return out


def test_nan_eval_on_one_replica_stops_every_replica(tmp_path):
    """The replicas agree before gathering what they evaluated: every rank raises the user
    error (no rank waits in the gather for the replica that failed), and a training loop's
    periodic evaluation logs NaN for what could not be evaluated and goes on."""
    results = run_distributed(_eval_with_nan_on_one_replica, 2, str(tmp_path), deadline=300)
    assert [r["dp_rank"] for r in results] == [0, 1]
    for r in results:
        for key, what in (("pairs_error", "the evaluation pairs"),
                          ("answers_error", "the answer prompts")):
            assert r[key] is not None, r
            assert f"NaN or Inf logits on {what} (" in r[key] and "eval.jsonl" in r[key], r
            assert "model.dtype=fp32" in r[key], r
        assert r["held_out_nan"] == ["accuracy", "accuracy_length_normalized",
                                     "accuracy_vs_reference"], r
        # the pairs were finite this time; the answers were not
        assert r["metrics_nan"] == ["eval_answer_accuracy_greedy", "eval_answer_accuracy_sampled",
                                    "eval_no_answer_fraction"], r
    for key in ("pairs_error", "answers_error"):
        assert results[0][key].startswith("a model, on another data-parallel replica,")
        assert results[1][key].startswith("the model gives")
