"""``megatron-sega generate``: what the policy writes, with the parts of its Eq. 1 score.

Prompts come from ``data.eval`` (else ``data.train``); each gets ``sega.k`` candidates (``k: 1``
is allowed here) sampled with the ``sampling`` section (``temperature: 0`` is greedy) and scored
with the ``scoring`` section, exactly as a SEGA step scores them.

- Without ``--out``: the first few prompts, printed.
- With ``--out DIR``: every prompt of the file; rank 0 writes ``DIR/samples.jsonl``, one line per
  candidate (fields in :func:`sample_records`), and prints the first few.

Prompts are sharded over data-parallel ranks and every candidate's noise is seeded by its global
id (``prompt_index * k + j``), so the samples do not depend on the TP/PP/DP layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from megatron_sega.config import ConfigError
from megatron_sega.data import TokenizedExample
from megatron_sega.sampling import Rollout
from megatron_sega.training.rollouts import (
    Scored, load_prompts, make_sampler, sampling_params, score_rollout,
)
from megatron_sega.training.session import Session, open_session, preflight

_SHOWN = 4  # prompts printed (and, without --out, the only ones sampled)
SAMPLES_FILE = "samples.jsonl"


def sample_records(session: Session, prompts: list[TokenizedExample], indices: list[int],
                   rollout: Rollout, scored: Scored, k: int) -> list[dict]:
    """One record per candidate (rows ordered [prompt, candidate]):

    ``prompt_id``, ``prompt_index`` (position in the file), ``candidate`` (0..k-1), ``text`` (the
    response without its stop token), ``token_ids`` (every generated token, the stop token
    included: what ``log pi(a|q)`` sums over), ``finish_reason`` (stop | stop_string | length),
    and Eq. 1: ``h_final`` (mean entropy of the answer span), ``fork_entropy`` (mean of the top-m
    reasoning entropies), ``lam``, ``score`` = -h_final + lam * fork_entropy, ``valid`` (the
    candidate has an answer span; else score 0), ``reward`` and ``advantage`` (within the
    prompt's group of k; advantage 0 when the group is not used, always when k = 1)."""
    decode = session.tokenizer.decode
    lam = session.config.scoring.lam
    records = []
    for g, (prompt, index) in enumerate(zip(prompts, indices)):
        for j in range(k):
            i = g * k + j
            ids = rollout.response_ids[i, : int(rollout.lengths[i])].tolist()
            content = rollout.response_ids[i][rollout.content_mask[i]].tolist()
            records.append({
                "prompt_id": prompt.id, "prompt_index": index, "candidate": j,
                "text": decode(content), "token_ids": ids, "n_tokens": len(ids),
                "finish_reason": rollout.finish_reason[i],
                "h_final": float(scored.h_final[i]), "fork_entropy": float(scored.fork[i]),
                "lam": lam, "score": float(scored.score[i]), "valid": bool(scored.valid[i]),
                "reward": float(scored.reward[i]), "advantage": float(scored.advantage[i]),
            })
    return records


def generate_samples(session: Session, prompts: list[TokenizedExample], k: int) -> list[dict]:
    """Records of every prompt's k candidates, gathered over DP (identical on every rank)."""
    rt = session.runtime
    mine = list(range(rt.dp_rank, len(prompts), rt.dp))
    records: list[dict] = []
    if mine:
        rows = [prompts[g].prompt_ids for g in mine for _ in range(k)]
        ids = [g * k + j for g in mine for j in range(k)]
        rollout = make_sampler(session).generate(rows, sampling_params(session), ids,
                                                 session.tokenizer.decode)
        scored = score_rollout(session, rollout, k)
        records = sample_records(session, [prompts[g] for g in mine], mine, rollout, scored, k)
    if rt.dp > 1:
        gathered: list = [None] * rt.dp
        dist.all_gather_object(gathered, records, group=rt.dp_group)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: (r["prompt_index"], r["candidate"]))
    return records


def _show(session: Session, prompts: list[TokenizedExample], records: list[dict]) -> None:
    shown = {p.id: p for p in prompts[:_SHOWN]}
    current = None
    for r in records:
        if r["prompt_id"] not in shown:
            continue
        if r["prompt_id"] != current:
            current = r["prompt_id"]
            print(f"=== {current}: {session.tokenizer.decode(shown[current].prompt_ids)!r}")
        print(f"  [{r['candidate']}] score {r['score']:+.3f} (H_final {r['h_final']:.3f}, "
              f"fork {r['fork_entropy']:.3f}, {r['finish_reason']}) {r['text']!r}", flush=True)


def run_generate(config, args) -> int:
    source = config.data.eval or config.data.train
    split = config.data.eval_split if config.data.eval else config.data.train_split
    if not source:
        raise ConfigError("generate needs prompts: set data.eval or data.train")
    preflight(config, "generate")
    out = getattr(args, "out", None)
    session = open_session(config, train=False)
    prompts: list[TokenizedExample] = load_prompts(session, source, split)
    if not out:
        prompts = prompts[:_SHOWN]
    records = generate_samples(session, prompts, config.sega.k)
    if session.is_main:
        _show(session, prompts, records)
        if out:
            directory = Path(out)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / SAMPLES_FILE
            with open(path, "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
            print(f"wrote {len(records)} samples ({len(prompts)} prompts x k={config.sega.k}) "
                  f"to {path}", flush=True)
    return 0
