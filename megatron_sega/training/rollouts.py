"""Sampling a policy's candidates and scoring them with Eq. 1, as every command does it.

Shared by the SEGA loop (``training.sega``), ``generate`` and the demo's evaluations, so that
none of them imports another's module: the prompts of a data file, the sampler of a session and
its sampling parameters, the scores, rewards and advantages of a rollout (METHOD.md, GEM Eq. 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sega.data import (
    DataError, PreferencePair, TokenizedExample, tokenize_prompts,
)
from megatron_sega.sampling import Rollout, Sampler, SamplingParams
from megatron_sega.sega import (
    advantages, answer_span_mask, entropy_scores, rewards, top_bottom_pairs, trim_outliers,
)
from megatron_sega.training.session import Session, dp_all_reduce, read_records


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


def load_prompts(session: Session, path: str, split: str | None = None,
                 pairs: list[PreferencePair] | None = None) -> list[TokenizedExample]:
    """The generation prompts of ``path`` (its ``split``; or of its records ``pairs``, already
    read), those that leave room for ``sampling.max_new_tokens`` within ``data.max_seq_len``."""
    data = session.config.data
    if pairs is None:
        pairs = read_records(session, path, split)
    prompts = tokenize_prompts(pairs, session.formatter)
    limit = data.max_seq_len - session.config.sampling.max_new_tokens
    kept = [p for p in prompts if len(p.prompt_ids) <= limit]
    if len(kept) < len(prompts):
        session.print(f"{path}: dropped {len(prompts) - len(kept)} prompts longer than "
                      f"data.max_seq_len - sampling.max_new_tokens = {limit} tokens")
    if not kept:
        shortest = min(len(p.prompt_ids) for p in prompts)
        raise DataError(f"{path}: no prompt fits data.max_seq_len({data.max_seq_len}) - "
                        f"sampling.max_new_tokens({session.config.sampling.max_new_tokens}) = "
                        f"{limit} tokens (the shortest has {shortest}); raise data.max_seq_len "
                        f"or lower sampling.max_new_tokens")
    return kept


def make_sampler(session: Session) -> Sampler:
    from megatron_sega.models.builder import unwrap_model

    return Sampler(session.chunks, session.runtime, session.vocab_size,
                   session.tokenizer.pad_id,
                   max_batch_tokens=session.config.sampling.max_batch_tokens,
                   bucket_by_length=unwrap_model(session.model).uses_transformer_engine)
