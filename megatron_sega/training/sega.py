"""Stage B: cognitive filtering + SEGA, on-policy (METHOD.md, GEM Eq. 1 and Eq. 2).

One step, top to bottom (:func:`sega_step`):
  1. sample k candidates for each of this DP rank's prompts (the whole group on one rank);
  2. score every candidate from the entropies of the policy's own distributions (Eq. 1);
  3. scores -> rewards -> group-mean-centred advantages (optional filters);
  4. build the batch (prompt + response, loss on the response incl. its stop token);
  5. forward/backward with the SEGA loss (Eq. 2), normalised by the global number of groups
     (or response tokens), through Megatron's schedule; optimizer step(s);
  6. metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from megatron_sega import ops
from megatron_sega.logging import mfu
from megatron_sega.data import (
    Batch, GlobalBatchIterator, TokenizedExample, collate, read_pairs, tokenize_prompts,
)
from megatron_sega.sampling import Rollout, Sampler, SamplingParams
from megatron_sega.sega import (
    advantages, answer_span_mask, entropy_scores, rewards, sega_loss, top_bottom_pairs, trim_outliers,
)
from megatron_sega.training.engine import forward_backward, optimizer_step
from megatron_sega.training.session import Session, announce, dp_all_reduce, open_session
from megatron_sega.training.teacher_forced import token_stats, vocab_shard_info


@dataclass
class Scored:
    """Per-candidate results of steps 2-3, rows ordered [group, candidate]."""

    score: torch.Tensor  # [N]
    h_final: torch.Tensor
    fork: torch.Tensor
    valid: torch.Tensor  # [N] bool: usable for the group statistics
    advantage: torch.Tensor  # [N]
    group_used: torch.Tensor  # [G] bool
    reward: torch.Tensor  # [N]


def sampling_params(session: Session) -> SamplingParams:
    s = session.config.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_new_tokens=s.max_new_tokens,
                          stop_token_ids=tuple(session.tokenizer.stop_ids),
                          stop_strings=tuple(s.stop_strings), seed=s.seed)


def score_rollout(session: Session, rollout: Rollout, k: int) -> Scored:
    """Eq. 1 scores, rewards and advantages for a rollout of whole groups of k candidates."""
    sc = session.config.scoring
    markers = session.tokenizer.marker_variants(sc.marker) if sc.marker else None
    answer, reasoning = answer_span_mask(rollout.response_ids, rollout.content_mask, markers,
                                         final_fraction=sc.final_fraction)
    parts = entropy_scores(rollout.entropy, answer, reasoning, top_m=sc.top_m, lam=sc.lam)
    groups = rollout.num_samples // k
    score = parts.score.view(groups, k)
    valid = parts.valid.view(groups, k)
    if sc.trim != "none":
        valid = trim_outliers(score, valid, method=sc.trim, z=sc.trim_z, fraction=sc.trim_fraction)
    if sc.top_bottom_pairs:
        valid = top_bottom_pairs(score, valid)
    reward = rewards(score, valid, mode=sc.reward, tau=sc.tau)
    adv, used = advantages(reward, valid, normalize_std=session.config.sega.normalize_std)
    return Scored(parts.score, parts.h_final, parts.fork, valid.flatten(), adv.flatten().float(),
                  used, reward.flatten())


def rollout_batch(session: Session, rollout: Rollout) -> Batch:
    """The rollout's rows as prompt+response sequences (one collate for the whole step)."""
    examples = [TokenizedExample(str(int(i)), p, r[: int(n)].tolist())
                for i, p, r, n in zip(rollout.sample_ids, rollout.prompt_ids,
                                      rollout.response_ids, rollout.lengths)]
    return collate(examples, session.tokenizer.pad_id)


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
    tensors. Rows are padded to a multiple of the micro batch size with zero-weight copies."""
    mbs = session.config.sega.micro_batch_size
    n = batch.tokens.shape[0]
    rows = {"tokens": batch.tokens, "labels": batch.labels, "loss_mask": batch.loss_mask,
            "advantage": adv.float(), **per_token}
    pad = (-n) % mbs
    if pad:
        rows = {k: torch.cat([v, torch.zeros_like(v[:pad])]) if k != "tokens"
                else torch.cat([v, v[:pad]]) for k, v in rows.items()}
    total = n + pad
    return [{k: v[i:i + mbs] for k, v in rows.items()} for i in range(0, total, mbs)]


def sega_loss_fn(session: Session, normaliser: float, use_old: bool, use_ref: bool,
                 normalization: str | None = None):
    cfg = session.config.sega
    normalization = normalization or cfg.normalization

    def loss_fn(logits: torch.Tensor, mb: dict):
        start, group = vocab_shard_info(logits, session.runtime)
        labels = mb["labels"].to(logits.device)
        logp = ops.log_probs(logits, labels, start, session.spec.vocab_size, group)
        mask = mb["loss_mask"].to(logits.device) > 0
        loss, metrics = sega_loss(
            logp, mask, mb["advantage"].to(logits.device), normalization=normalization,
            normaliser=normaliser,
            ref_logp_tokens=mb["ref_logp"].to(logits.device) if use_ref else None,
            kl_coef=cfg.kl_coef,
            old_logp_tokens=mb["old_logp"].to(logits.device) if use_old else None,
            clip_eps=cfg.clip_eps or 0.2)
        metrics = {k: v.detach() for k, v in metrics.items()}
        metrics["loss_sum"] = loss.detach()
        return loss, metrics

    return loss_fn


def sega_step(session: Session, sampler: Sampler, prompts: list[TokenizedExample],
              global_index: list[int], step: int, reference=None) -> dict:
    cfg, rt = session.config.sega, session.runtime
    k = cfg.k
    timer = {"t0": time.time()}
    # 1. sample: row g*k + j is candidate j of prompt g; ids are unique across steps and layouts.
    rows = [ex.prompt_ids for ex in prompts for _ in range(k)]
    ids = [((step * 1_000_003 + g) * k + j) for g in global_index for j in range(k)]
    rollout = sampler.generate(rows, sampling_params(session), ids, session.tokenizer.decode)
    timer["sample"] = time.time()
    # 2-3. score, filter, advantages.
    scored = score_rollout(session, rollout, k)
    timer["score"] = time.time()
    # 4. batch; the old log-probs are the sampler's untempered ones (ratio 1 on the first update).
    batch = rollout_batch(session, rollout)
    per_token = {"old_logp": at_label_positions(batch, rollout, rollout.logp)}
    if reference is not None:
        per_token["ref_logp"] = token_stats(reference, rt, batch, session.spec.vocab_size,
                                            micro_batch_size=cfg.micro_batch_size)["logp"]
    micro = training_microbatches(session, batch, scored.advantage, per_token)
    tokens_here = float(rollout.response_mask.sum())
    n_groups, n_tokens = dp_all_reduce([len(prompts), tokens_here], session)
    normaliser = n_groups if cfg.normalization == "sequence_sum" else max(n_tokens, 1.0)
    # 5. update(s).
    results = []
    for update in range(cfg.updates_per_rollout):
        loss_fn = sega_loss_fn(session, normaliser, use_old=update > 0 and cfg.clip_eps > 0,
                               use_ref=reference is not None)
        outputs = forward_backward(session.chunks, rt, micro, loss_fn)
        loss = sum(float(o["loss_sum"]) for o in outputs) if outputs else 0.0
        loss, = dp_all_reduce([loss], session)
        loss_t = torch.tensor([loss], device=rt.device)
        if rt.pp > 1:  # the loss lives on the last stage; every stage must agree to skip
            torch.distributed.broadcast(
                loss_t, src=torch.distributed.get_global_rank(rt.pp_group, rt.pp - 1),
                group=rt.pp_group)
        if not math.isfinite(float(loss_t)):
            results.append({"loss": float("nan"), "skipped": True})
            continue
        results.append({"loss": float(loss_t), **optimizer_step(session.optimizer,
                                                                 session.scheduler)})
    timer["train"] = time.time()
    return _metrics(session, rollout, scored, results, timer, n_tokens)


def _metrics(session, rollout: Rollout, scored: Scored, results: list[dict], timer: dict,
             global_tokens: float) -> dict:
    valid = scored.valid
    n_valid = max(int(valid.sum()), 1)
    local = [
        float(scored.score[valid].sum()), float((scored.score[valid] ** 2).sum()),
        float(scored.h_final[valid].sum()), float(scored.fork[valid].sum()), float(valid.sum()),
        float(rollout.lengths.float().sum()), float(rollout.num_samples),
        float((~scored.group_used).sum()), float(len(scored.group_used)),
        float(scored.advantage.abs().sum()), float((scored.advantage ** 2).sum()),
        float(sum(r == "length" for r in rollout.finish_reason)),
        float((rollout.lengths == 0).sum() + (rollout.content_mask.sum(1) == 0).sum()),
        float(scored.reward[valid].sum()),
    ]
    s = dp_all_reduce(local, session)
    n_valid = max(s[4], 1.0)
    mean = s[0] / n_valid
    last = results[-1]
    elapsed = timer["train"] - timer["t0"]
    return {
        "loss": last.get("loss"),
        "score_mean": mean,
        "score_std": math.sqrt(max(s[1] / n_valid - mean ** 2, 0.0)),
        "h_final_mean": s[2] / n_valid,
        "fork_entropy_mean": s[3] / n_valid,
        "reward_mean": s[13] / n_valid,
        "advantage_abs_mean": s[9] / max(s[6], 1.0),
        "advantage_std": math.sqrt(s[10] / max(s[6], 1.0)),
        "response_length_mean": s[5] / max(s[6], 1.0),
        "valid_fraction": s[4] / max(s[6], 1.0),
        "groups_skipped_fraction": s[7] / max(s[8], 1.0),
        "truncated_fraction": s[11] / max(s[6], 1.0),
        "empty_responses": s[12],
        "grad_norm": last.get("grad_norm"),
        "lr": last.get("lr"),
        "skipped_update": bool(last.get("skipped", False)),
        "time_sample": timer["sample"] - timer["t0"],
        "time_score": timer["score"] - timer["sample"],
        "time_train": timer["train"] - timer["score"],
        "tokens_per_s": global_tokens / max(elapsed, 1e-9),
        # Training FLOPs only (the update's forward/backward over the response tokens).
        "mfu": mfu(session.spec, int(rollout.response_ids.shape[1]), global_tokens,
                   timer["train"] - timer["score"], session.runtime.world_size),
    }


def mean_entropy_score(session: Session, prompts: list[TokenizedExample], seed_offset: int = 0
                       ) -> float:
    """Mean Eq. 1 score of k sampled candidates per prompt (prompts sharded over DP ranks)."""
    rt, k = session.runtime, session.config.sega.k
    mine = list(range(rt.dp_rank, len(prompts), rt.dp))
    total = [0.0, 0.0]
    if mine:
        rows = [prompts[g].prompt_ids for g in mine for _ in range(k)]
        ids = [(seed_offset + g) * k + j for g in mine for j in range(k)]
        rollout = make_sampler(session).generate(rows, sampling_params(session), ids,
                                                 session.tokenizer.decode)
        scored = score_rollout(session, rollout, k)
        total = [float(scored.score[scored.valid].sum()), float(scored.valid.sum())]
    score_sum, count = dp_all_reduce(total, session)
    return score_sum / max(count, 1.0)


def load_prompts(session: Session, path: str) -> list[TokenizedExample]:
    data = session.config.data
    pairs, report = read_pairs(path, on_bad_record=data.on_bad_record)
    if report.total_dropped:
        session.print(report.summary())
    prompts = tokenize_prompts(pairs, session.formatter)
    limit = data.max_seq_len - session.config.sampling.max_new_tokens
    kept = [p for p in prompts if len(p.prompt_ids) <= limit]
    if len(kept) < len(prompts):
        session.print(f"{path}: dropped {len(prompts) - len(kept)} prompts longer than "
                      f"data.max_seq_len - sampling.max_new_tokens = {limit} tokens")
    if not kept:
        raise FileNotFoundError(f"{path}: no prompt fits data.max_seq_len={data.max_seq_len} with "
                                f"sampling.max_new_tokens={session.config.sampling.max_new_tokens}")
    return kept


def make_sampler(session: Session) -> Sampler:
    from megatron_sega.models.builder import have_transformer_engine

    return Sampler(session.model, session.runtime, session.spec.vocab_size,
                   session.tokenizer.pad_id,
                   max_batch_tokens=session.config.sampling.max_batch_tokens,
                   bucket_by_length=have_transformer_engine())


def run_sega(config, args) -> int:
    """``megatron-sega sega``: the on-policy SEGA loop."""
    from megatron_sega.checkpoint.manager import CheckpointManager
    from megatron_sega.logging import MetricsLogger
    from megatron_sega.training.evaluate import load_reference

    if not config.data.train:
        raise FileNotFoundError("sega needs data.train (prompts; chosen/rejected are not used)")
    cfg = config.sega
    if cfg.k < 2:
        from megatron_sega.config import ConfigError

        raise ConfigError(f"sega.k = {cfg.k}: SEGA needs k >= 2 candidates per prompt "
                          "(group-mean advantages need a group); set sega.k=4")
    session = open_session(config, train=True, total_steps=cfg.steps * cfg.updates_per_rollout,
                           lr_override=cfg.lr)
    announce(session, "sega")
    rt = session.runtime
    prompts = load_prompts(session, config.data.train)
    iterator = GlobalBatchIterator(list(range(len(prompts))), cfg.prompts_per_step,
                                   dp_rank=rt.dp_rank, dp_size=rt.dp, seed=config.data.seed)
    reference = load_reference(session, cfg.reference) if cfg.reference else None
    ckpt = CheckpointManager(session, config.checkpoint, stage="sega")
    start = ckpt.resume(iterator)
    sampler = make_sampler(session)
    logger = MetricsLogger(config.logging.dir, enabled=session.is_metrics_rank,
                           tensorboard=config.logging.tensorboard, jsonl=config.logging.jsonl,
                           wandb=config.logging.wandb, name="sega",
                           progress_total=cfg.steps - start, progress=config.logging.progress,
                           run_config=config.to_dict())
    bad_in_a_row, step = 0, start
    batches = iter(iterator)
    for step in range(start, cfg.steps):
        index = next(batches)
        try:
            metrics = sega_step(session, sampler, [prompts[i] for i in index], index, step,
                                reference)
        except ops.NonFiniteLogitsError as err:
            if rt.pp > 1:  # the other stages cannot know; torchrun stops them when this exits
                raise
            # Every rank of the replica raised together (the ops agree over TP); the weights
            # are broken, so this counts as a bad step and the run stops after max_bad_steps.
            session.print(f"step {step + 1}: {err}")
            metrics = {"loss": float("nan"), "skipped_update": True}
        bad_in_a_row = bad_in_a_row + 1 if metrics["skipped_update"] else 0
        metrics["bad_steps_in_a_row"] = bad_in_a_row
        logger.log(step + 1, metrics, progress_keys=("loss", "score_mean"))
        if bad_in_a_row >= cfg.max_bad_steps:
            session.print(f"stopping: {bad_in_a_row} consecutive steps with a NaN/Inf loss "
                          f"(sega.max_bad_steps={cfg.max_bad_steps}); lower optim.lr")
            logger.close()
            return 1
        if ckpt.should_stop(step + 1, cfg.steps, iterator):
            break
    ckpt.finalize(step + 1 if cfg.steps > start else start, iterator)
    logger.close()
    return 0
