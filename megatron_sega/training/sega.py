"""Stage B: cognitive filtering + SEGA, on-policy (METHOD.md, GEM Eq. 1 and Eq. 2).

One step, top to bottom (:func:`sega_step`):
  1. sample k candidates for each of this DP rank's prompts (the whole group on one rank);
  2. score every candidate from the entropies of the policy's own distributions (Eq. 1);
  3. scores -> rewards -> group-mean-centred advantages (optional filters);
  4. build the batch (prompt + response, loss on the response incl. its stop token);
  5. forward/backward with the SEGA loss (Eq. 2), normalised by the global number of groups
     (or response tokens), through Megatron's schedule; optimizer step(s);
  6. metrics; every ``sega.eval_interval`` steps, preference (and with ``eval.answer_samples``
     answer) accuracy on ``data.eval`` (``answers.training_eval_metrics``).
"""

from __future__ import annotations

import math
import time

import torch

from megatron_sega import ops
from megatron_sega.logging import attention_span, mfu
from megatron_sega.config import ConfigError, check_sega_group, token_budget
from megatron_sega.data import Batch, GlobalBatchIterator, TokenizedExample, collate
from megatron_sega.data.packing import PackedBatch
from megatron_sega.sampling import Rollout, Sampler
from megatron_sega.sega import sega_loss
from megatron_sega.runtime import any_rank
from megatron_sega.training.answers import load_answer_prompts, training_eval_metrics
from megatron_sega.training.engine import (
    BadSteps, check_microbatch_count, forward_backward, nonfinite_loss, optimizer_step,
)
from megatron_sega.training.microbatch import (
    dp_rebalance, pack_for_schedule, split_microbatches,
)
from megatron_sega.training.rollouts import (
    Scored, load_prompts, make_sampler, sampling_params, score_rollout,
)
from megatron_sega.training.session import (
    Session, announce, checkpoint_manager, dp_all_reduce, dp_sum, load_reference, open_session,
    preflight, stage_logger,
)
from megatron_sega.training.teacher_forced import token_stats, vocab_shard_info


def _rollout_examples(rollout: Rollout) -> list[TokenizedExample]:
    return [TokenizedExample(str(int(i)), p, r[: int(n)].tolist())
            for i, p, r, n in zip(rollout.sample_ids, rollout.prompt_ids,
                                  rollout.response_ids, rollout.lengths)]


def rollout_batch(session: Session, rollout: Rollout) -> Batch:
    """The rollout's rows as prompt+response sequences (one collate for the whole step)."""
    return collate(_rollout_examples(rollout), session.tokenizer.pad_id)


def packed_rollout_batch(session: Session, rollout: Rollout, advantage: torch.Tensor
                         ) -> tuple[PackedBatch, torch.Tensor]:
    """The candidates of the data-parallel replicas' rollouts, shared out by tokens
    (``microbatch.dp_rebalance``: one collective over DP), this rank's share packed into rows of
    ``sega.max_tokens_per_microbatch`` tokens (``data.packing``); and their advantages in the
    batch's sequence order. The loss normalisers are global, so the share changes nothing."""
    examples = _rollout_examples(rollout)
    mine = dp_rebalance(list(zip(examples, advantage.tolist())),
                        [ex.length for ex in examples], session.runtime)
    batch = pack_for_schedule(session.chunks, session.runtime, [ex for ex, _ in mine],
                              session.tokenizer.pad_id, token_budget(session.config, "sega"),
                              stage="sega")
    return batch, torch.tensor([a for _, a in mine], dtype=advantage.dtype)


def at_label_positions(batch: Batch, rollout: Rollout, values: torch.Tensor) -> torch.Tensor:
    """Per-response-token values [N, T] moved to the batch's label positions [N, S]: response
    token t of row i is the label at position prompt_len - 1 + t."""
    out = torch.zeros(batch.tokens.shape)
    for i, plen in enumerate(batch.prompt_lengths.tolist()):
        length = int(rollout.lengths[i])
        out[i, plen - 1: plen - 1 + length] = values[i, :length].float()
    return out


def training_microbatches(session: Session, batch: Batch, adv: torch.Tensor,
                          per_token: dict[str, torch.Tensor]) -> list[dict]:
    """Microbatches of the step's batch with per-row advantages and label-aligned per-token
    tensors (padding rows: zero advantage and loss mask). A packed batch gives one microbatch per
    row, each candidate's advantage spread over its own tokens."""
    if isinstance(batch, PackedBatch):
        return batch.microbatches({"advantage": batch.per_token(adv.float()), **per_token})
    rows = {"tokens": batch.tokens, "labels": batch.labels, "loss_mask": batch.loss_mask,
            "advantage": adv.float(), **per_token}
    return split_microbatches(rows, session.config.sega.micro_batch_size)


def check_sega_microbatches(config, dp: int) -> None:
    """Refuse an update split that the pipeline schedule cannot run (see check_microbatch_count);
    the rows of a step are padded up to whole microbatches (training_microbatches)."""
    cfg = config.sega
    if config.data.packing:  # packed steps pad their own count (agreed_shape)
        return
    rows = cfg.prompts_per_step // dp * cfg.k
    check_microbatch_count(
        -(-rows // cfg.micro_batch_size), config.parallel.pp, config.parallel.vpp,
        f"sega.prompts_per_step({cfg.prompts_per_step}) / dp({dp}) * sega.k({cfg.k}) / "
        f"sega.micro_batch_size({cfg.micro_batch_size}), rounded up,")


def sega_loss_fn(session: Session, normaliser: float, use_old: bool, use_ref: bool,
                 normalization: str | None = None):
    """The SEGA loss of one microbatch. With ``use_old`` the microbatch carries ``old_logp``
    (the trainer's log-probs of the first update, see :func:`sega_step`) and the loss is the
    clipped surrogate. Besides the loss metrics it returns the per-token ``logp`` and
    ``ratio_dev_sum`` (the sum of |ratio - 1| over response tokens)."""
    cfg = session.config.sega
    normalization = normalization or cfg.normalization

    def loss_fn(logits: torch.Tensor, mb: dict):
        start, group = vocab_shard_info(logits, session.runtime)
        labels = mb["labels"].to(logits.device)
        mask = mb["loss_mask"].to(logits.device) > 0
        try:
            logp = ops.log_probs(logits, labels, start, session.vocab_size, group)
        except ops.NonFiniteLogitsError:
            loss, metrics = nonfinite_loss(logits, ("loss_sum", "ratio_dev_sum", "kl_mean",
                                                    "clip_fraction"))
            return loss, {**metrics, "num_tokens": mask.sum().float(),
                          "logp": torch.full_like(mask, math.nan, dtype=torch.float32)}
        old = mb["old_logp"].to(logits.device) if use_old else None
        loss, metrics = sega_loss(
            logp, mask, mb["advantage"].to(logits.device), normalization=normalization,
            normaliser=normaliser,
            ref_logp_tokens=mb["ref_logp"].to(logits.device) if use_ref else None,
            kl_coef=cfg.kl_coef, old_logp_tokens=old, clip_eps=cfg.clip_eps or 0.2)
        metrics = {k: v.detach() for k, v in metrics.items()}
        metrics["loss_sum"] = loss.detach()
        metrics["logp"] = logp.detach().float()
        metrics["ratio_dev_sum"] = (torch.where(mask, (logp.detach() - old).exp() - 1, 0.0)
                                    .abs().sum() if old is not None else logits.new_zeros(()))
        return loss, metrics

    return loss_fn


def sega_step(session: Session, sampler: Sampler, prompts: list[TokenizedExample],
              global_index: list[int], step: int, reference=None) -> dict:
    cfg, rt = session.config.sega, session.runtime
    k = cfg.k
    timer = {"t0": time.time()}
    try:
        # 1. sample: row g*k + j is candidate j of prompt g; ids are unique across steps/layouts.
        rows = [ex.prompt_ids for ex in prompts for _ in range(k)]
        ids = [((step * 1_000_003 + g) * k + j) for g in global_index for j in range(k)]
        rollout = sampler.generate(rows, sampling_params(session), ids, session.tokenizer.decode)
        timer["sample"] = time.time()
        # 2-3. score, filter, advantages.
        scored = score_rollout(session, rollout, k)
        timer["score"] = time.time()
        # 4. batch (the old log-probs of a reused rollout come from the first update, below).
        # Packed, the replicas first agree that sampling went through: the batch is shared out
        # over them (packed_rollout_batch), a collective every replica must reach.
        packing, advantage = session.config.data.packing, scored.advantage
        batch = None if packing else rollout_batch(session, rollout)
        per_token, failure = _reference_logps(session, reference, batch), None
    except ops.NonFiniteLogitsError as err:  # raised on every rank of this replica together
        failure = err
    if not _agree_finite(session, failure, step):
        return {"loss": float("nan"), "skipped_update": True}
    if packing:
        batch, advantage = packed_rollout_batch(session, rollout, advantage)
        try:
            per_token, failure = _reference_logps(session, reference, batch), None
        except ops.NonFiniteLogitsError as err:
            failure = err
        if not _agree_finite(session, failure, step):
            return {"loss": float("nan"), "skipped_update": True}
    micro = training_microbatches(session, batch, advantage, per_token)
    tokens_here = float(rollout.response_mask.sum())
    n_groups, n_tokens = dp_all_reduce([len(prompts), tokens_here], session)
    normaliser = n_groups if cfg.normalization == "sequence_sum" else max(n_tokens, 1.0)
    # 5. update(s). A reused rollout (clip_eps > 0) is clipped against the trainer's own
    # teacher-forced log-probs of the first update, taken at the weights that sampled it: the
    # sampler's KV-cached values differ from them in bf16, and the ratio would not start at 1.
    reuse = cfg.updates_per_rollout > 1 and cfg.clip_eps > 0
    results = []
    for update in range(cfg.updates_per_rollout):
        loss_fn = sega_loss_fn(session, normaliser, use_old=update > 0 and reuse,
                               use_ref=reference is not None)
        outputs = forward_backward(session.chunks, rt, micro, loss_fn)
        if update == 0 and reuse:
            for mb, out in zip(micro, outputs):  # outputs exist on the last stage only
                mb["old_logp"] = out["logp"][:, :mb["tokens"].shape[1]]
        loss, = dp_all_reduce([sum(float(o["loss_sum"]) for o in outputs)], session)
        sums = _update_sums(outputs)  # reduced with the step's other statistics
        # The losses live on the last stage: optimizer_step agrees over the world.
        step_result = optimizer_step(session.optimizer, session.scheduler, device=rt.device,
                                     loss_finite=math.isfinite(loss))
        results.append({"loss": loss, "sums": sums, **step_result})
        if step_result["skipped_update"]:
            break
    timer["train"] = time.time()
    return _metrics(session, rollout, scored, batch, results, timer)


def _reference_logps(session: Session, reference, batch) -> dict[str, torch.Tensor]:
    """The frozen reference's per-token log-probs of ``batch`` for the KL (none without a
    reference or a batch)."""
    if reference is None or batch is None:
        return {}
    return {"ref_logp": token_stats(reference, session.runtime, batch, session.vocab_size,
                                    micro_batch_size=session.config.sega.micro_batch_size)["logp"]}


def _agree_finite(session: Session, failure, step: int) -> bool:
    """False on every rank when any rank's logits were non-finite (in sampling or the
    reference): the step is skipped on all ranks at once (a replica that skipped alone would
    wait in other collectives than the rest)."""
    if any_rank(failure is not None, session.runtime.device):
        session.print(f"step {step + 1}: non-finite logits in sampling or in the reference; "
                      f"step skipped on all ranks{f' ({failure})' if failure else ''}")
        return False
    return True


def _update_sums(outputs: list[dict]) -> dict[str, float]:
    """Token sums of one update's loss metrics on this rank (the last stage holds them)."""
    tokens = [float(o["num_tokens"]) for o in outputs]
    return {"update_tokens": sum(tokens),
            "kl_sum": sum(float(o["kl_mean"]) * n for o, n in zip(outputs, tokens)),
            "clipped_tokens": sum(float(o["clip_fraction"]) * n for o, n in zip(outputs, tokens)),
            "ratio_dev_sum": sum(float(o.get("ratio_dev_sum", 0.0)) for o in outputs)}


def step_sums(rollout: Rollout, scored: Scored, batch: Batch) -> dict[str, float]:
    """This rank's additive statistics of a step, by name (summed over DP by the caller)."""
    valid = scored.valid
    k = rollout.num_samples // max(len(scored.group_used), 1)
    # The candidates whose advantage enters the loss: valid members of used groups.
    active = valid & scored.group_used.repeat_interleave(k)
    adv = scored.advantage.double()[active]
    empty = (rollout.lengths == 0) | (rollout.content_mask.sum(1) == 0)
    return {
        "samples": float(rollout.num_samples),
        "valid": float(valid.sum()),
        "score_sum": float(scored.score[valid].sum()),
        "score_sq_sum": float((scored.score[valid] ** 2).sum()),
        "h_final_sum": float(scored.h_final[valid].sum()),
        "fork_sum": float(scored.fork[valid].sum()),
        "reward_sum": float(scored.reward[valid].sum()),
        "active": float(active.sum()),
        "advantage_sum": float(adv.sum()),
        "advantage_abs_sum": float(adv.abs().sum()),
        "advantage_sq_sum": float((adv ** 2).sum()),
        "length_sum": float(rollout.lengths.float().sum()),
        "groups": float(len(scored.group_used)),
        "groups_skipped": float((~scored.group_used).sum()),
        "truncated": float(sum(r == "length" for r in rollout.finish_reason)),
        "empty": float(empty.sum()),
        "response_tokens": float(rollout.response_mask.sum()),
        # What the update trains on: prompt + response tokens, in sequences this wide.
        "train_tokens": float(batch.lengths.sum()),
        "train_tokens_sq": float((batch.lengths.double() ** 2).sum()),
        "seq_len_sum": float(batch.tokens.shape[1]),
        "ranks": 1.0,
    }


def step_metrics(s: dict[str, float]) -> dict[str, float]:
    """The logged statistics from DP-summed :func:`step_sums` (and the last update's sums)."""
    n, n_valid, n_active = max(s["samples"], 1.0), max(s["valid"], 1.0), max(s["active"], 1.0)
    score_mean = s["score_sum"] / n_valid
    adv_mean = s["advantage_sum"] / n_active  # 0 up to rounding: advantages are group-centred
    return {
        "score_mean": score_mean,
        "score_std": math.sqrt(max(s["score_sq_sum"] / n_valid - score_mean ** 2, 0.0)),
        "h_final_mean": s["h_final_sum"] / n_valid,
        "fork_entropy_mean": s["fork_sum"] / n_valid,
        "reward_mean": s["reward_sum"] / n_valid,
        # Over the candidates in the update (skipped groups and invalid members have A = 0).
        "advantage_abs_mean": s["advantage_abs_sum"] / n_active,
        "advantage_std": math.sqrt(max(s["advantage_sq_sum"] / n_active - adv_mean ** 2, 0.0)),
        "response_length_mean": s["length_sum"] / n,
        "valid_fraction": s["valid"] / n,
        "groups_skipped_fraction": s["groups_skipped"] / max(s["groups"], 1.0),
        "truncated_fraction": s["truncated"] / n,
        "empty_responses": s["empty"],
        "seq_len": s["seq_len_sum"] / max(s["ranks"], 1.0),
        "attention_span": attention_span(s["train_tokens"], s["train_tokens_sq"]),
        "kl_mean": s.get("kl_sum", 0.0) / max(s.get("update_tokens", 0.0), 1.0),
        "clip_fraction": s.get("clipped_tokens", 0.0) / max(s.get("update_tokens", 0.0), 1.0),
        # On a reused rollout: mean |ratio - 1| per response token (0 without reuse).
        "ratio_abs_dev": s.get("ratio_dev_sum", 0.0) / max(s.get("update_tokens", 0.0), 1.0),
    }


def _metrics(session, rollout: Rollout, scored: Scored, batch: Batch, results: list[dict],
             timer: dict) -> dict:
    last = results[-1]
    s = dp_sum({**step_sums(rollout, scored, batch), **last["sums"]}, session)
    elapsed = timer["train"] - timer["t0"]
    train_time = timer["train"] - timer["score"]
    stats = step_metrics(s)
    return {
        "loss": last.get("loss"),
        **stats,
        "grad_norm": last.get("grad_norm"),
        "lr": last.get("lr"),
        "skipped_update": bool(last.get("skipped_update", False)),
        "time_sample": timer["sample"] - timer["t0"],
        "time_score": timer["score"] - timer["sample"],
        "time_train": train_time,
        "tokens_per_s": s["response_tokens"] / max(elapsed, 1e-9),
        # Training FLOPs only: forward/backward over prompt + response tokens, per update.
        "mfu": mfu(session.spec, stats["attention_span"], s["train_tokens"] * len(results),
                   train_time, session.runtime.world_size),
    }


def _eval_data(session: Session) -> tuple[list, list]:
    """``sega.eval_interval``'s held-out pairs, and its answer prompts with
    ``eval.answer_samples``."""
    from megatron_sega.training.evaluate import load_eval_pairs

    data = session.config.data
    pairs = load_eval_pairs(session, data.eval, data.eval_split)
    prompts = (load_answer_prompts(session, data.eval, data.eval_split)
               if session.config.eval.answer_samples else [])
    return pairs, prompts


def run_sega(config, args) -> int:
    """``megatron-sega sega``: the on-policy SEGA loop."""

    if not config.data.train:
        raise ConfigError("sega needs data.train (prompts; chosen/rejected are not used)")
    check_sega_group(config)  # a config error before any launch-size error
    check_sega_microbatches(config, preflight(config, "sega"))  # before any model is built
    cfg = config.sega
    session = open_session(config, train=True, total_steps=cfg.steps * cfg.updates_per_rollout,
                           lr_override=cfg.lr)
    announce(session, "sega")
    rt = session.runtime
    prompts = load_prompts(session, config.data.train, config.data.train_split)
    iterator = GlobalBatchIterator(list(range(len(prompts))), cfg.prompts_per_step,
                                   dp_rank=rt.dp_rank, dp_size=rt.dp, seed=config.data.seed,
                                   name="sega.prompts_per_step")
    # Before any resume: without sega.reference, the KL's reference is the starting weights.
    use_reference = cfg.kl_coef > 0 or cfg.reference is not None
    reference = load_reference(session, cfg.reference) if use_reference else None
    eval_pairs, answer_prompts = _eval_data(session) if cfg.eval_interval else ([], [])
    ckpt = checkpoint_manager(session, "sega", iterator)
    start = ckpt.resume()
    sampler = make_sampler(session)
    logger = stage_logger(session, "sega", start, cfg.steps)
    step, batches = start, iter(iterator)
    bad = BadSteps(config, "sega")
    for step in range(start, cfg.steps):
        index = next(batches)
        # A non-finite step is skipped by every rank together (sega_step), so the count of bad
        # steps is the same on all ranks and they stop at the same step.
        metrics = sega_step(session, sampler, [prompts[i] for i in index], index, step, reference)
        if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0:
            metrics.update(training_eval_metrics(session, eval_pairs, answer_prompts,
                                                 config.eval.answer_samples))
        stop = bad.count(metrics)
        logger.log(step + 1, metrics, progress_keys=("loss", "score_mean"))
        if stop:
            session.print(bad.reason())
            logger.close()
            return 1
        if ckpt.should_stop(step + 1, cfg.steps):
            break
    ckpt.finalize(step + 1 if cfg.steps > start else start)
    logger.close()
    return 0
