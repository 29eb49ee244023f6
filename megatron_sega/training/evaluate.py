"""Preference accuracy with the implicit reward ``r(q, a) = beta * log pi(a|q)`` (METHOD.md).

A pair is correct when ``r(q, chosen) > r(q, rejected)`` with log-probs summed over the response
tokens and the end-of-turn token that closes them, as SFT and SEGA train on it (beta does not
change the winner). Also reported: the length-normalised variant
(mean token log-prob) and, with a reference model, ``beta * (log pi - log pi_ref)``.
Pairs are sharded over data-parallel ranks; the per-pair records are gathered on rank 0.

The tie rule (``eval.ties``): ``wrong`` (the default) is RewardBench's, a tie is a wrong pair;
``half`` counts a tie as half a right pair (a coin flip's expected outcome). Every accuracy
carries a 95% Wilson interval; with a ``subset`` column the summary has per-subset accuracies,
and with RewardBench's subsets its four section scores and their mean (``rewardbench.py``),
with stratified-bootstrap intervals (``stats.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sega import ops
from megatron_sega.data import (
    DataError, TokenizedPair, apply_overlong_policy, collate_pairs, tokenize_pairs,
)
from megatron_sega.errors import NonFiniteEvalError
from megatron_sega.runtime.distributed import any_rank
from megatron_sega.training.rewardbench import is_rewardbench, section_report
from megatron_sega.training.stats import CONFIDENCE, wilson_interval
from megatron_sega.training.teacher_forced import token_stats

TieRule = Literal["wrong", "half"]
BOOTSTRAP_SEED = 0
NO_SUBSET = "(no subset)"

# summary key -> the per-side score whose comparison decides a pair (beta > 0 keeps the winner).
SCORES: dict[str, Callable[[dict, str, float], float]] = {
    "accuracy": lambda r, side, beta: beta * r[f"logp_{side}"],
    "accuracy_length_normalized": lambda r, side, beta: (
        r[f"logp_{side}"] / max(r[f"n_tokens_{side}"], 1)),
    "accuracy_vs_reference": lambda r, side, beta: (
        beta * (r[f"logp_{side}"] - r[f"ref_logp_{side}"])),
}


def load_eval_pairs(session, path: str, split: Optional[str] = None, *,
                    append_eos: bool = True) -> list[TokenizedPair]:
    """Read (as ``data.*`` says: format, columns, preference; ``split`` of a DatasetDict or a
    folder of split files), validate and tokenise preference pairs (template
    ``data.template``); each response ends with the template's end-of-turn token as its last
    target, as in training (SFT, SEGA and DPO score it too). A file that leaves no pair (empty,
    all bad, all too long) is a ``DataError``: an accuracy over zero pairs is not a result."""
    from megatron_sega.training.session import read_records

    data = session.config.data
    pairs = read_records(session, path, split)
    tokenized = tokenize_pairs(pairs, session.formatter, append_eos=append_eos)
    kept, overlong = apply_overlong_policy(tokenized, data.max_seq_len, data.overlong,
                                           bos_id=session.tokenizer.bos_id)
    if overlong.truncated or overlong.dropped:
        session.print(f"{'train' if append_eos else 'eval'} data {path}: {overlong}")
    if not kept:
        raise DataError(f"{path}: none of its {overlong.total} pairs fits data.max_seq_len"
                        f"({data.max_seq_len}) with data.overlong = {data.overlong}; raise "
                        "data.max_seq_len")
    return kept


def _pair_logps(chunks, session, pairs: Sequence[TokenizedPair], micro: int) -> torch.Tensor:
    """[n, 4]: logp_chosen, logp_rejected, n_tokens_chosen, n_tokens_rejected."""
    if session.config.data.packing:
        return _packed_pair_logps(chunks, session, pairs)
    rows = []
    for start in range(0, len(pairs), micro):
        part = collate_pairs(pairs[start:start + micro], session.tokenizer.pad_id)
        both = part.concat()
        stats = token_stats(chunks, session.runtime, both, session.vocab_size,
                            micro_batch_size=min(2 * micro, both.tokens.shape[0]))
        logp = stats["logp"].double().sum(dim=1)
        count = both.loss_mask.sum(dim=1).double()
        n = len(part.chosen.ids)
        rows.append(torch.stack([logp[:n], logp[n:], count[:n], count[n:]], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64)


def _packed_pair_logps(chunks, session, pairs: Sequence[TokenizedPair]) -> torch.Tensor:
    """``_pair_logps`` from packed rows of ``eval.max_tokens_per_microbatch`` tokens
    (``data.packing``): sequence 2i is pair i's chosen response, 2i + 1 its rejected one."""
    from megatron_sega.config import token_budget
    from megatron_sega.training.microbatch import pack_for_schedule

    examples = [ex for p in pairs for ex in (p.chosen, p.rejected)]
    batch = pack_for_schedule(chunks, session.runtime, examples, session.tokenizer.pad_id,
                              token_budget(session.config, "eval"), stage="eval")
    stats = token_stats(chunks, session.runtime, batch, session.vocab_size, micro_batch_size=1)
    logp = batch.per_sequence(stats["logp"])
    count = batch.per_sequence(batch.loss_mask)
    return torch.stack([logp[0::2], logp[1::2], count[0::2], count[1::2]], dim=1)


def evaluate_pairs(session, pairs: Sequence[TokenizedPair], *, beta: float,
                   reference_chunks: Optional[list] = None,
                   micro_batch_size: int = 8, ties: TieRule = "wrong",
                   bootstrap_samples: int = 2000) -> tuple[list[dict], dict]:
    """Per-pair records and a summary (on every rank; identical)."""
    rt = session.runtime
    if session.config.data.packing:  # shares of similar tokens (data.packing.balance)
        from megatron_sega.training.microbatch import dp_share

        mine = dp_share(list(pairs), [p.chosen.length + p.rejected.length for p in pairs], rt)
    else:
        mine = list(pairs[rt.dp_rank::rt.dp])
    failed: Optional[str] = "the model"  # whose logits, until they prove finite
    try:
        values = _pair_logps(session.chunks, session, mine, micro_batch_size)
        if reference_chunks is not None:
            failed = "the reference model"
            ref = _pair_logps(reference_chunks, session, mine, micro_batch_size)
            values = torch.cat([values, ref[:, :2]], dim=1)
        failed = None
    except ops.NonFiniteLogitsError:  # on one replica's ranks only: agree before the gather
        pass
    agree_finite(session, failed, "the evaluation pairs")
    local = [(p.id, v.tolist()) for p, v in zip(mine, values)]
    if rt.dp > 1:
        gathered: list = [None] * rt.dp
        dist.all_gather_object(gathered, local, group=rt.dp_group)
        local = [item for part in gathered for item in part]
    order = {p.id: i for i, p in enumerate(pairs)}
    local.sort(key=lambda item: order[item[0]])
    subset_of = {p.id: p.subset for p in pairs}
    records = []
    for pair_id, v in local:
        record = {"id": pair_id, "logp_chosen": v[0], "logp_rejected": v[1],
                  "n_tokens_chosen": int(v[2]), "n_tokens_rejected": int(v[3])}
        if reference_chunks is not None:
            record.update(ref_logp_chosen=v[4], ref_logp_rejected=v[5])
        if subset_of[pair_id] is not None:
            record["subset"] = subset_of[pair_id]
        records.append(record)
    return records, summarize(records, beta, ties=ties, bootstrap_samples=bootstrap_samples)


def agree_finite(session, failed: Optional[str], what: str) -> None:
    """Raise :class:`NonFiniteEvalError` on every rank when any rank's model (``failed`` names it
    there, else None) gave NaN or Inf logits on ``what``. A replica that stopped alone would
    leave the others waiting in the gather that follows."""
    if any_rank(failed is not None, session.runtime.device):
        where = failed or "a model, on another data-parallel replica,"
        raise NonFiniteEvalError(
            f"{where} gives NaN or Inf logits on {what} "
            f"({session.config.data.eval or 'data.eval'}): its weights are not finite or "
            f"overflow (model.dtype={session.config.model.dtype}); evaluate an earlier "
            "checkpoint, or in fp32 (model.dtype=fp32)")


def held_out_summary(session, pairs: Sequence[TokenizedPair], **kwargs) -> dict:
    """:func:`evaluate_pairs`' summary, for a training loop's periodic evaluation: when the
    model's logits are not finite (on any rank: all ranks agree) the accuracies are NaN, the
    loop is told once and trains on; its own bad-step rule decides whether to stop."""
    try:
        return evaluate_pairs(session, pairs, **kwargs)[1]
    except NonFiniteEvalError as err:
        session.print(f"held-out evaluation skipped: {err}")
        return {name: float("nan") for name in SCORES}


def accuracy_names(records: Sequence[dict]) -> list[str]:
    """The accuracies the records support: summed and length-normalised, and against the
    reference when the records carry its log-probs."""
    names = ["accuracy", "accuracy_length_normalized"]
    if records and "ref_logp_chosen" in records[0]:
        names.append("accuracy_vs_reference")
    return names


def pair_outcomes(records: Sequence[dict], name: str, *, beta: float,
                  ties: TieRule = "wrong") -> list[float]:
    """Per pair, 1.0 when the chosen response scores higher under accuracy ``name``, 0.0 when
    lower, and for a tie 0.0 (``wrong``, RewardBench's rule) or 0.5 (``half``)."""
    if ties not in ("wrong", "half"):
        raise ValueError(f"ties must be 'wrong' or 'half', got {ties!r}")
    score = SCORES[name]
    tie = 0.5 if ties == "half" else 0.0
    out = []
    for r in records:
        chosen, rejected = score(r, "chosen", beta), score(r, "rejected", beta)
        out.append(1.0 if chosen > rejected else tie if chosen == rejected else 0.0)
    return out


def _accuracy(outcomes: Sequence[float]) -> dict:
    """An accuracy, its pair count and its 95% Wilson interval."""
    right = sum(outcomes)
    return {"pairs": len(outcomes), "accuracy": right / len(outcomes),
            "ci95": list(wilson_interval(right, len(outcomes)))}


def summarize(records: list[dict], beta: float, *, ties: TieRule = "wrong",
              bootstrap_samples: int = 2000) -> dict:
    """``summary.json``: each accuracy of :func:`accuracy_names` with its 95% interval
    (``<name>_ci95``), the tie rule, log-prob means; with a ``subset`` on the records, every
    accuracy per subset (``subsets``) and, for RewardBench's subsets, its section scores
    (``rewardbench``, per accuracy)."""
    n = len(records)
    if n == 0:
        return {"pairs": 0}
    summary: dict = {"pairs": n, "beta": beta, "tie_rule": ties,
                     "interval": f"{CONFIDENCE:.0%} Wilson score interval (sections: stratified "
                                 f"percentile bootstrap, {bootstrap_samples} samples, "
                                 f"seed {BOOTSTRAP_SEED})"}
    outcomes = {name: pair_outcomes(records, name, beta=beta, ties=ties)
                for name in accuracy_names(records)}
    for name, values in outcomes.items():
        result = _accuracy(values)
        summary[name], summary[f"{name}_ci95"] = result["accuracy"], result["ci95"]
    summary.update({
        "ties": sum(r["logp_chosen"] == r["logp_rejected"] for r in records),
        "mean_logp_chosen": sum(r["logp_chosen"] for r in records) / n,
        "mean_logp_rejected": sum(r["logp_rejected"] for r in records) / n,
        "mean_reward_margin": beta * sum(r["logp_chosen"] - r["logp_rejected"]
                                         for r in records) / n,
    })
    subsets = [r.get("subset") for r in records]
    if any(s is not None for s in subsets):
        summary["subsets"] = _per_subset(outcomes, subsets)
    if is_rewardbench(subsets):
        summary["rewardbench"] = {
            name: section_report(values, subsets, samples=bootstrap_samples,
                                 seed=BOOTSTRAP_SEED)
            for name, values in outcomes.items()}
    return summary


def _per_subset(outcomes: dict[str, list[float]], subsets: list[Optional[str]]) -> dict:
    """{subset: {"pairs", accuracy name: {"accuracy", "ci95"}}}, subsets sorted by name."""
    names = sorted({s if s is not None else NO_SUBSET for s in subsets})
    out: dict = {}
    for subset in names:
        rows = [i for i, s in enumerate(subsets) if (s if s is not None else NO_SUBSET) == subset]
        entry: dict = {"pairs": len(rows)}
        for name, values in outcomes.items():
            result = _accuracy([values[i] for i in rows])
            entry[name] = {"accuracy": result["accuracy"], "ci95": result["ci95"]}
        out[subset] = entry
    return out


def write_eval_outputs(directory: str | Path, records: list[dict], summary: dict) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def run_eval(config, args) -> int:
    """``megatron-sega eval``: preference accuracy of ``model.load`` on ``data.eval``; with
    ``eval.answer_samples``, answer accuracy too (``answers.py``: ``summary.json``'s
    ``answers`` section and ``answers.jsonl``)."""
    from megatron_sega.config import ConfigError
    from megatron_sega.training.session import announce, load_reference, open_session, preflight

    if not config.data.eval:
        raise ConfigError("eval needs data.eval (a JSONL of prompt/chosen/rejected pairs)")
    preflight(config, "eval")
    session = open_session(config, train=False)
    announce(session, "eval")
    pairs = load_eval_pairs(session, config.data.eval, config.data.eval_split)
    reference = None
    if config.eval.reference:
        reference = load_reference(session, config.eval.reference)
    records, summary = evaluate_pairs(session, pairs, beta=config.eval.beta,
                                      reference_chunks=reference,
                                      micro_batch_size=config.eval.micro_batch_size,
                                      ties=config.eval.ties,
                                      bootstrap_samples=config.eval.bootstrap_samples)
    answers = None
    if config.eval.answer_samples:
        from megatron_sega.training.answers import (
            evaluate_answers, load_answer_prompts, write_answers,
        )
        prompts = load_answer_prompts(session, config.data.eval, config.data.eval_split)
        answers, summary["answers"] = evaluate_answers(session, prompts,
                                                       config.eval.answer_samples)
    if session.is_main:
        out = config.eval.out or str(Path(config.logging.dir or ".") / "eval")
        write_eval_outputs(out, records, summary)
        print(json.dumps(summary, indent=2))
        print(f"wrote {out}/pairs.jsonl and {out}/summary.json")
        if answers is not None:
            print(f"wrote {write_answers(out, answers)}")
    return 0
