"""The paper's baselines, DPO and IPO (METHOD.md, Baselines), on the SFT/SEGA machinery.

One step, top to bottom (:func:`dpo_step`):
  1. take this DP rank's share of a global batch of pairs; collate chosen and rejected to one
     length, rows in microbatch order (each microbatch: its m chosen rows, then their m
     rejected rows, so that a pair never straddles two microbatches);
  2. the frozen reference's summed log-probs of every row, teacher-forced once, under no_grad;
  3. forward/backward with the DPO/IPO loss (``megatron_sega.dpo``), normalised by the global
     number of pairs, through Megatron's schedule; optimizer step;
  4. metrics: sums by name, reduced over DP in one collective.

The reference defaults to the starting weights (``model.load``, or the seeded random init),
copied before any resume, so a resumed run keeps the reference it started with.
"""

from __future__ import annotations

import math
import time

import torch

from megatron_sega import ops
from megatron_sega.config import ConfigError, token_budget
from megatron_sega.data import Batch, GlobalBatchIterator, PairBatch, TokenizedPair, collate_pairs
from megatron_sega.data.packing import segment_sums
from megatron_sega.dpo import preference_loss, sequence_logps
from megatron_sega.logging import attention_span
from megatron_sega.training.engine import (
    BadSteps, check_microbatch_count, forward_backward, nonfinite_loss, optimizer_step,
)
from megatron_sega.training.session import (
    Session, announce, checkpoint_manager, dp_all_reduce, load_reference, open_session, preflight,
    stage_logger,
)
from megatron_sega.training.microbatch import dp_share, pack_for_schedule
from megatron_sega.training.sft import sft_microbatches
from megatron_sega.training.teacher_forced import token_stats, vocab_shard_info


def microbatch_order(pairs: PairBatch, micro_batch_size: int) -> Batch:
    """The pair batch's 2P rows reordered so that consecutive blocks of ``2 * m`` rows are
    microbatches: the chosen rows of m pairs, then the rejected rows of the same pairs."""
    n = len(pairs.ids)
    order: list[int] = []
    for start in range(0, n, micro_batch_size):
        block = list(range(start, min(start + micro_batch_size, n)))
        order += block + [n + i for i in block]
    both, index = pairs.concat(), torch.tensor(order)
    return Batch(both.tokens[index], both.labels[index], both.loss_mask[index],
                 both.prompt_lengths[index], both.lengths[index], [both.ids[i] for i in order])


def dpo_loss_fn(session: Session, global_pairs: float):
    """Per microbatch: the DPO/IPO loss of its pairs over the global pair count, with the
    reference's sequence log-probs from ``mb['ref_logp']``. A padded microbatch is
    ``[chosen m; rejected m]`` rows; a packed row (``mb['pairs']``) holds whole pairs, each
    sequence's log-prob summed over its segment (``mb['segment_ids']``: chosen of pair i is
    sequence 2i, rejected 2i + 1)."""
    cfg = session.config.dpo

    def loss_fn(logits: torch.Tensor, mb: dict):
        start, group = vocab_shard_info(logits, session.runtime)
        labels = mb["labels"].to(logits.device)
        try:
            logp = ops.log_probs(logits, labels, start, session.vocab_size, group)
        except ops.NonFiniteLogitsError:
            return nonfinite_loss(logits, SUMS)
        mask = mb["loss_mask"].to(logits.device) > 0
        ref = mb["ref_logp"].to(logits.device)
        if "pairs" in mb:
            seq = segment_sums(torch.where(mask, logp, 0.0), mb["segment_ids"], ref.shape[0])
            chosen = 2 * mb["pairs"].to(logits.device)
            rejected = chosen + 1
            seq_c, seq_r, ref_c, ref_r = seq[chosen], seq[rejected], ref[chosen], ref[rejected]
        else:
            seq = sequence_logps(logp, mask)
            m = seq.shape[0] // 2
            seq_c, seq_r, ref_c, ref_r = seq[:m], seq[m:], ref[:m], ref[m:]
        loss, sums = preference_loss(seq_c, seq_r, ref_c, ref_r, loss=cfg.loss,
                                     beta=cfg.beta, normaliser=global_pairs)
        sums["logp_chosen_sum"] = seq_c.detach().sum()
        sums["logp_rejected_sum"] = seq_r.detach().sum()
        return loss, sums

    return loss_fn


# The named sums of a microbatch (dpo_loss_fn), reduced over DP in sorted order.
SUMS = ("chosen_reward_sum", "correct", "logp_chosen_sum", "logp_rejected_sum", "loss_sum",
        "margin_sum", "pairs", "rejected_reward_sum")


def _local_sums(outputs: list[dict]) -> dict[str, float]:
    """This rank's sums of the microbatches' named sums (zeros on stages other than the last)."""
    return {k: sum(float(o[k]) for o in outputs) for k in SUMS}


def _reduce_sums(local: dict[str, float], session: Session) -> dict[str, float]:
    """``local`` summed over DP (one collective, sorted keys)."""
    return dict(zip(SUMS, dp_all_reduce([local[k] for k in SUMS], session)))


def dpo_step(session: Session, reference: list, shard: list[TokenizedPair]) -> dict:
    """One optimizer step on this rank's share of a global batch of pairs."""
    rt, m = session.runtime, session.config.dpo.micro_batch_size
    packing = session.config.data.packing
    if packing:  # pair i: sequences 2i (chosen) and 2i + 1 (rejected), in one row
        batch = pack_for_schedule(
            session.chunks, rt, [ex for p in shard for ex in (p.chosen, p.rejected)],
            session.tokenizer.pad_id, token_budget(session.config, "dpo"), stage="dpo",
            groups=[[2 * i, 2 * i + 1] for i in range(len(shard))])
    else:
        batch = microbatch_order(collate_pairs(shard, session.tokenizer.pad_id), m)
    # The reference runs on the same microbatches as the policy, so that at the first step
    # (policy == reference) both give the same log-probs and the loss is exactly DPO's log 2.
    try:
        ref_tokens = token_stats(reference, rt, batch, session.vocab_size,
                                 micro_batch_size=2 * m)["logp"]
    except ops.NonFiniteLogitsError:  # on this whole replica: a NaN loss, skipped by all below
        ref_tokens = torch.full(batch.tokens.shape, float("nan"))
    if packing:
        ref_seq = segment_sums(torch.where(batch.loss_mask > 0, ref_tokens, 0.0),
                               batch.segment_ids, batch.size)
        micro = batch.microbatches()
        for mb, row in zip(micro, batch.rows):
            mb["ref_logp"] = ref_seq
            mb["pairs"] = torch.tensor(sorted({i // 2 for i in row}), dtype=torch.long)
    else:
        ref_seq = sequence_logps(ref_tokens, batch.loss_mask > 0)
        micro = sft_microbatches(batch, 2 * m)
        for i, mb in enumerate(micro):
            mb["ref_logp"] = ref_seq[2 * m * i: 2 * m * (i + 1)]
    global_pairs, global_tokens, train_tokens, train_tokens_sq = dp_all_reduce(
        [len(shard), float(batch.loss_mask.sum()), float(batch.lengths.sum()),
         float((batch.lengths.double() ** 2).sum())], session)
    outputs = forward_backward(session.chunks, rt, micro, dpo_loss_fn(session, global_pairs))
    local = _local_sums(outputs)
    step = optimizer_step(session.optimizer, session.scheduler, device=rt.device,
                          loss_finite=math.isfinite(local["loss_sum"]))
    s = _reduce_sums(local, session)
    n = max(s["pairs"], 1.0)
    return {"loss": s["loss_sum"] / n, "reward_accuracy": s["correct"] / n,
            "chosen_reward": s["chosen_reward_sum"] / n,
            "rejected_reward": s["rejected_reward_sum"] / n, "margin": s["margin_sum"] / n,
            "logp_chosen": s["logp_chosen_sum"] / n, "logp_rejected": s["logp_rejected_sum"] / n,
            "tokens": global_tokens, "train_tokens": train_tokens,
            "seq_len": batch.tokens.shape[1],
            "attention_span": attention_span(train_tokens, train_tokens_sq), **step}


def check_dpo_microbatches(config, dp: int) -> None:
    """Refuse a batch split that the loop (every DP rank's share a whole number of microbatches,
    a pair never split) or the pipeline schedule (see check_microbatch_count) cannot run."""
    cfg, par = config.dpo, config.parallel
    if config.data.packing:  # packed steps pad their own count (agreed_shape)
        return
    if cfg.global_batch_size % dp or (cfg.global_batch_size // dp) % cfg.micro_batch_size:
        raise ConfigError(
            f"dpo.global_batch_size({cfg.global_batch_size}) must split into dp({dp}) equal "
            f"shares that are multiples of dpo.micro_batch_size({cfg.micro_batch_size}); "
            f"use a multiple of {dp * cfg.micro_batch_size}")
    check_microbatch_count(
        cfg.global_batch_size // dp // cfg.micro_batch_size, par.pp, par.vpp,
        f"dpo.global_batch_size({cfg.global_batch_size}) / dp({dp}) / "
        f"dpo.micro_batch_size({cfg.micro_batch_size})")


def run_dpo(config, args) -> int:
    """``megatron-sega dpo``: the DPO / IPO loop with evaluation, logging and checkpoints."""
    from megatron_sega.logging import mfu
    from megatron_sega.training.evaluate import held_out_summary, load_eval_pairs

    if not config.data.train:
        raise ConfigError("dpo needs data.train (a JSONL of prompt/chosen/rejected pairs)")
    check_dpo_microbatches(config, preflight(config, "dpo"))  # before any model is built
    cfg = config.dpo
    session = open_session(config, train=True, total_steps=cfg.steps, lr_override=cfg.lr)
    announce(session, "dpo")
    rt = session.runtime
    # Before any resume: without dpo.reference the reference is the starting weights.
    reference = load_reference(session, cfg.reference)
    pairs = load_eval_pairs(session, config.data.train, config.data.train_split, append_eos=True)
    # Packed: every rank reads the whole global batch and takes its share by tokens (dp_share).
    packing = config.data.packing
    iterator = GlobalBatchIterator(pairs, cfg.global_batch_size,
                                   dp_rank=0 if packing else rt.dp_rank,
                                   dp_size=1 if packing else rt.dp, seed=config.data.seed)
    eval_pairs = load_eval_pairs(session, config.data.eval, config.data.eval_split) if config.data.eval else []
    ckpt = checkpoint_manager(session, "dpo", iterator)
    start = ckpt.resume()
    logger = stage_logger(session, "dpo", start, cfg.steps)
    batches, bad = iter(iterator), BadSteps(config, "dpo")
    for step in range(start, cfg.steps):
        t0 = time.time()
        shard = next(batches)
        if packing:
            shard = dp_share(shard, [p.chosen.length + p.rejected.length for p in shard], rt)
        metrics = dpo_step(session, reference, shard)
        metrics["step_time"] = time.time() - t0
        metrics["tokens_per_s"] = metrics["train_tokens"] / metrics["step_time"]
        # Training FLOPs of the policy only (the reference's forward is not counted), over
        # prompt + response tokens as SEGA counts them.
        metrics["mfu"] = mfu(session.spec, metrics["attention_span"], metrics["train_tokens"],
                             metrics["step_time"], rt.world_size)
        if cfg.eval_interval and eval_pairs and (step + 1) % cfg.eval_interval == 0:
            summary = held_out_summary(session, eval_pairs, beta=cfg.beta,
                                       reference_chunks=reference,
                                       micro_batch_size=config.eval.micro_batch_size)
            metrics["eval_accuracy"] = summary["accuracy"]
            metrics["eval_reward_accuracy"] = summary["accuracy_vs_reference"]
        stop = bad.count(metrics)
        logger.log(step + 1, metrics, progress_keys=("loss", "reward_accuracy"))
        if stop:
            session.print(bad.reason())
            logger.close()
            return 1
        if ckpt.should_stop(step + 1, cfg.steps):
            break
    ckpt.finalize(step + 1 if cfg.steps > start else start)
    logger.close()
    return 0
