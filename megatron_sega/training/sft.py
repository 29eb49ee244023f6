"""Stage A, reflective SFT: supervised fine-tuning on ``prompt -> chosen`` (METHOD.md).

One step: take this DP rank's share of the global batch, collate, count the global number of
response tokens, run Megatron's forward/backward over microbatches with the loss
``-sum(log p(response token)) / global_tokens``, take an optimizer step, log, checkpoint.
"""

from __future__ import annotations

import math
import time

import torch

from megatron_sega import ops
from megatron_sega.config import ConfigError, token_budget
from megatron_sega.data import GlobalBatchIterator, apply_overlong_policy, collate, tokenize_sft
from megatron_sega.logging import attention_span
from megatron_sega.training.engine import (
    BadSteps, check_microbatch_count, forward_backward, nonfinite_loss, optimizer_step,
)
from megatron_sega.training.microbatch import dp_share, pack_for_schedule, split_microbatches
from megatron_sega.training.session import (
    Session, announce, checkpoint_manager, dp_all_reduce, open_session, preflight, read_records,
    stage_logger,
)
from megatron_sega.training.teacher_forced import vocab_shard_info


def sft_loss_fn(vocab_size: int, global_tokens: float, runtime):
    """Token-level NLL on response targets, normalised by the *global* response-token count."""

    def loss_fn(logits: torch.Tensor, mb: dict):
        start, group = vocab_shard_info(logits, runtime)
        labels = mb["labels"].to(logits.device)
        mask = mb["loss_mask"].to(logits.device)
        try:
            logp = ops.log_probs(logits, labels, start, vocab_size, group)
        except ops.NonFiniteLogitsError:
            return nonfinite_loss(logits, ("nll_sum", "tokens"))
        nll_sum = -(logp * mask).sum()
        loss = nll_sum / global_tokens
        return loss, {"nll_sum": nll_sum.detach(), "tokens": mask.sum().detach()}

    return loss_fn


def sft_microbatches(batch, micro_batch_size: int) -> list[dict]:
    """The batch's rows in microbatches; padding rows have a zero loss mask."""
    return split_microbatches({"tokens": batch.tokens, "labels": batch.labels,
                               "loss_mask": batch.loss_mask}, micro_batch_size)


def check_sft_microbatches(config, dp: int) -> None:
    """Refuse a batch split that the pipeline schedule cannot run (see check_microbatch_count);
    packed steps pad their own count (``training.microbatch.agreed_shape``)."""
    sft = config.sft
    if config.data.packing:
        return
    check_microbatch_count(
        -(-(sft.global_batch_size // dp) // sft.micro_batch_size), config.parallel.pp,
        config.parallel.vpp, f"sft.global_batch_size({sft.global_batch_size}) / dp({dp}) / "
        f"sft.micro_batch_size({sft.micro_batch_size})")


def load_sft_examples(session: Session, path: str, split: str | None = None):
    data = session.config.data
    examples = tokenize_sft(read_records(session, path, split), session.formatter)
    kept, overlong = apply_overlong_policy(examples, data.max_seq_len, data.overlong,
                                           bos_id=session.tokenizer.bos_id)
    if overlong.truncated or overlong.dropped:
        session.print(f"train data {path}: {overlong}")
    return kept


def sft_batch(session: Session, shard):
    """This rank's share as the microbatches of one step: packed rows (``data.packing``) or
    padded rows; and the batch they come from."""
    sft, rt = session.config.sft, session.runtime
    if session.config.data.packing:
        batch = pack_for_schedule(session.chunks, rt, shard, session.tokenizer.pad_id,
                                  token_budget(session.config, "sft"), stage="sft")
        return batch, batch.microbatches()
    batch = collate(shard, session.tokenizer.pad_id)
    return batch, sft_microbatches(batch, sft.micro_batch_size)


def sft_step(session: Session, shard) -> dict:
    """One optimizer step on this rank's share of a global batch."""
    batch, micro = sft_batch(session, shard)
    # train_tokens (prompt + response of every row, SEGA's definition) feeds MFU and tokens/s;
    # global_tokens (the loss's response tokens) normalises the loss.
    global_tokens, train_tokens, train_tokens_sq = dp_all_reduce(
        [float(batch.loss_mask.sum()), float(batch.lengths.sum()),
         float((batch.lengths.double() ** 2).sum())], session)
    loss_fn = sft_loss_fn(session.vocab_size, max(global_tokens, 1.0), session.runtime)
    outputs = forward_backward(session.chunks, session.runtime, micro, loss_fn)
    nll = sum(float(o["nll_sum"]) for o in outputs)
    step = optimizer_step(session.optimizer, session.scheduler, device=session.runtime.device,
                          loss_finite=math.isfinite(nll))
    nll, = dp_all_reduce([nll], session)
    return {"loss": nll / max(global_tokens, 1.0), "tokens": global_tokens,
            "train_tokens": train_tokens, "seq_len": batch.tokens.shape[1],
            "attention_span": attention_span(train_tokens, train_tokens_sq), **step}


def run_sft(config, args) -> int:
    """``megatron-sega sft``: the SFT loop with evaluation, logging and checkpoints."""
    from megatron_sega.logging import mfu
    from megatron_sega.training.evaluate import held_out_summary, load_eval_pairs

    if not config.data.train:
        raise ConfigError("sft needs data.train (a JSONL of prompt/chosen/rejected pairs)")
    check_sft_microbatches(config, preflight(config, "sft"))  # before any model is built
    sft = config.sft
    session = open_session(config, train=True, total_steps=sft.steps, lr_override=sft.lr)
    announce(session, "sft")
    rt = session.runtime
    examples = load_sft_examples(session, config.data.train, config.data.train_split)
    # Packed: every rank reads the whole global batch and takes its share by tokens (dp_share).
    packing = config.data.packing
    iterator = GlobalBatchIterator(examples, sft.global_batch_size,
                                   dp_rank=0 if packing else rt.dp_rank,
                                   dp_size=1 if packing else rt.dp, seed=config.data.seed,
                                   name="sft.global_batch_size")
    eval_pairs = load_eval_pairs(session, config.data.eval, config.data.eval_split) if config.data.eval else []
    ckpt = checkpoint_manager(session, "sft", iterator)
    start = ckpt.resume()
    logger = stage_logger(session, "sft", start, sft.steps)
    batches, bad = iter(iterator), BadSteps(config, "sft")
    for step in range(start, sft.steps):
        t0 = time.time()
        shard = next(batches)
        if packing:
            shard = dp_share(shard, [ex.length for ex in shard], rt)
        metrics = sft_step(session, shard)
        metrics["step_time"] = time.time() - t0
        metrics["tokens_per_s"] = metrics["train_tokens"] / metrics["step_time"]
        metrics["mfu"] = mfu(session.spec, metrics["attention_span"], metrics["train_tokens"],
                             metrics["step_time"], rt.world_size)
        if sft.eval_interval and eval_pairs and (step + 1) % sft.eval_interval == 0:
            summary = held_out_summary(session, eval_pairs, beta=config.eval.beta)
            metrics["eval_accuracy"] = summary["accuracy"]
        stop = bad.count(metrics)
        logger.log(step + 1, metrics)
        if stop:
            session.print(bad.reason())
            logger.close()
            return 1
        if ckpt.should_stop(step + 1, sft.steps):
            break
    ckpt.finalize(step + 1 if sft.steps > start else start)
    logger.close()
    return 0
