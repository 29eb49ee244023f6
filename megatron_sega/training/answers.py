"""Answer accuracy: does the policy write the right final answer (the paper's Table 3 metric)?

For every record with a reference answer (its ``answer`` field, else the text after the last
answer marker, ``scoring.marker``, in ``chosen``) the policy writes one greedy answer and ``n``
sampled ones (``eval.answer_samples``) at the training temperature (the ``sampling`` section),
each scored with Eq. 1 as a SEGA step scores it (``rollouts.score_rollout``). A candidate's final
answer is the text after its last marker, up to the end of that line, normalised
(:func:`normalize_answer`); it is right when it equals the normalised reference.

Reported (:func:`summarize_answers`), with 95% intervals:
- greedy accuracy (Wilson, over prompts) and the mean sampled accuracy (the mean over prompts of
  each prompt's fraction right, Student-t over prompts: a prompt's samples are not independent,
  so a binomial interval over all samples would be too narrow), and the fraction of prompts with
  at least one right sample (what SEGA could amplify);
- the fraction of candidates with no final answer (no marker, or nothing after it);
- the Eq. 1 statistics of the samples (score, H_final, fork term; the score of right and of
  wrong samples);
- the ranking figures (:func:`ranking_figures`): over the prompts whose valid samples are both
  right and wrong, how often the top Eq. 1 score, the top ``-H_final`` alone and the top fork
  term alone fall on a right sample, beside the chance of a random pick.

Prompts are sharded over data-parallel ranks; every sample's noise is seeded by its global id
(``prompt_index * n + j``), so the records do not depend on the TP/PP/DP layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_sega import ops
from megatron_sega.data import DataError, PreferencePair, TokenizedExample
from megatron_sega.errors import NonFiniteEvalError
from megatron_sega.sampling import Rollout
from megatron_sega.training.rollouts import (
    Scored, load_prompts, make_sampler, sampling_params, score_rollout,
)
from megatron_sega.training.evaluate import agree_finite
from megatron_sega.training.session import Session, read_records
from megatron_sega.training.stats import CONFIDENCE, mean_interval, wilson_interval

ANSWERS_FILE = "answers.jsonl"

_WRAPPERS = "*_`\"'"  # markdown emphasis and quotes around an answer
_TRAILING = ".,;:!?"
_BOXED = re.compile(r"^\\boxed\{(.*)\}$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)$")


# ------------------------------------------------------------------ extraction and normalisation

def extract_final_answer(text: str, marker: str) -> Optional[str]:
    """The text after the last ``marker`` (case-insensitive) up to the end of its line (or of
    the next non-empty line when the marker ends its line), stripped; None when the marker is
    absent or nothing follows it."""
    at = text.lower().rfind(marker.lower())
    if at < 0:
        return None
    rest = text[at + len(marker):].strip()
    answer = rest.split("\n", 1)[0].strip() if rest else ""
    return answer or None


def normalize_answer(answer: str) -> str:
    """Lower case, whitespace collapsed, wrapping ``**``/quotes/backticks and ``\\boxed{}``
    removed, trailing ``.,;:!?`` removed; a number (``$``, thousands commas allowed) becomes its
    canonical decimal: ``"1,000"``, ``"1000.0"``, ``"$1000"`` and ``"1000."`` are all ``"1000"``."""
    s = " ".join(answer.lower().split())
    previous = None
    while s != previous:
        previous = s
        s = s.strip().strip(_WRAPPERS).rstrip(_TRAILING).strip()
        boxed = _BOXED.match(s)
        if boxed:
            s = boxed.group(1)
    number = s.replace("$", "").strip()
    if _THOUSANDS.match(number):
        number = number.replace(",", "")
    if _NUMBER.match(number):
        try:
            value = Decimal(number).normalize()
        except InvalidOperation:
            return s
        return format(value, "f") if value != 0 else "0"
    return s


def reference_answer(pair: PreferencePair, marker: Optional[str]) -> Optional[str]:
    """The record's ``answer`` field, else the final answer of its ``chosen`` response."""
    if pair.answer is not None:
        return pair.answer
    return extract_final_answer(pair.chosen, marker) if marker else None


# ------------------------------------------------------------------ statistics (pure)

def _top_is_right(candidates: Sequence[dict], key) -> float:
    """1 when the candidate with the largest ``key`` is right, 0 when wrong; a tie for the top
    counts the fraction right among the tied (a random pick among them)."""
    values = [key(c) for c in candidates]
    top = max(values)
    tied = [c for c, v in zip(candidates, values) if v == top]
    return sum(c["correct"] for c in tied) / len(tied)


# name -> what the candidate with the largest value is picked by.
RANKERS = {
    "eq1_top_right": lambda c: c["score"],
    "neg_h_final_top_right": lambda c: -c["h_final"],
    "fork_top_right": lambda c: c["fork_entropy"],
}


def ranking_figures(groups: Sequence[Sequence[dict]]) -> dict:
    """Over the groups whose valid candidates (``valid``: Eq. 1 scored them) are both right
    and wrong: the fraction where the top Eq. 1 score (``score``), the top ``-h_final`` and the
    top ``fork_entropy`` pick a right candidate (ties: see :func:`_top_is_right`), each with its
    95% Wilson interval, and ``chance``, the mean fraction right in those groups (a random
    pick). ``groups_mixed`` counts them."""
    mixed = []
    for group in groups:
        valid = [c for c in group if c["valid"]]
        right = sum(bool(c["correct"]) for c in valid)
        if 0 < right < len(valid):
            mixed.append(valid)
    out: dict = {"groups": len(groups), "groups_mixed": len(mixed)}
    if not mixed:
        return out
    for name, key in RANKERS.items():
        hits = sum(_top_is_right(g, key) for g in mixed)
        out[name] = hits / len(mixed)
        out[f"{name}_ci95"] = list(wilson_interval(hits, len(mixed)))
    out["chance"] = sum(sum(c["correct"] for c in g) / len(g) for g in mixed) / len(mixed)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def score_statistics(samples: Sequence[dict]) -> dict:
    """Eq. 1 over the valid samples: the mean and std of the score, the means of H_final and of
    the fork term, and the mean score of the right and of the wrong ones."""
    valid = [c for c in samples if c["valid"]]
    out: dict = {"valid_fraction": len(valid) / len(samples) if samples else 0.0}
    if not valid:
        return out
    scores = [c["score"] for c in valid]
    mean = sum(scores) / len(scores)
    out.update(
        score_mean=mean,
        score_std=math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)),
        h_final_mean=_mean([c["h_final"] for c in valid]),
        fork_entropy_mean=_mean([c["fork_entropy"] for c in valid]),
        score_mean_right=_mean([c["score"] for c in valid if c["correct"]]),
        score_mean_wrong=_mean([c["score"] for c in valid if not c["correct"]]))
    return out


def summarize_answers(records: Sequence[dict]) -> dict:
    """``summary.json``'s ``answers`` section from the per-prompt records (see module doc)."""
    n = len(records)
    if n == 0:
        return {"prompts": 0}
    samples = [c for r in records for c in r["samples"]]
    per_prompt = [r["sample_accuracy"] for r in records]
    greedy_right = sum(r["greedy"]["correct"] for r in records)
    any_right = sum(any(c["correct"] for c in r["samples"]) for r in records)
    mean_ci = mean_interval(per_prompt)
    return {
        "prompts": n,
        "samples_per_prompt": len(records[0]["samples"]),
        "interval": f"{CONFIDENCE:.0%}: Wilson score over prompts (greedy, any right, ranking); "
                    "Student t over prompts of the per-prompt fractions (sampled)",
        "greedy_accuracy": greedy_right / n,
        "greedy_accuracy_ci95": list(wilson_interval(greedy_right, n)),
        "sampled_accuracy": sum(per_prompt) / n,
        "sampled_accuracy_ci95": None if math.isnan(mean_ci[0]) else list(mean_ci),
        "any_sample_right": any_right / n,
        "any_sample_right_ci95": list(wilson_interval(any_right, n)),
        "greedy_no_answer_fraction": sum(r["greedy"]["answer"] is None for r in records) / n,
        "sampled_no_answer_fraction": (sum(c["answer"] is None for c in samples)
                                       / max(len(samples), 1)),
        "greedy_scores": score_statistics([r["greedy"] for r in records]),
        "sampled_scores": score_statistics(samples),
        "ranking": ranking_figures([r["samples"] for r in records]),
    }


# ------------------------------------------------------------------ sampling (on the model)

@dataclasses.dataclass(frozen=True)
class AnswerPrompt:
    prompt: TokenizedExample
    index: int  # position among the prompts evaluated (seeds its samples)
    reference: str


def load_answer_prompts(session: Session, path: str, split: Optional[str] = None
                        ) -> list[AnswerPrompt]:
    """The prompts of ``path`` that have a reference answer and leave room for
    ``sampling.max_new_tokens``; a file with none is a ``DataError``."""
    marker = session.config.scoring.marker
    pairs = read_records(session, path, split)
    references = {p.id: reference_answer(p, marker) for p in pairs}
    prompts = load_prompts(session, path, split, pairs=pairs)
    kept = [p for p in prompts if references[p.id] is not None]
    if len(kept) < len(prompts):
        session.print(f"{path}: {len(prompts) - len(kept)} of {len(prompts)} prompts have no "
                      f"reference answer (no 'answer' field, no {marker!r} in chosen); "
                      "answer accuracy leaves them out")
    if not kept:
        raise DataError(f"{path}: no record has a reference answer for eval.answer_samples: "
                        f"give each an 'answer' field or end its chosen response with "
                        f"'{marker} ...'")
    return [AnswerPrompt(p, i, references[p.id]) for i, p in enumerate(kept)]


def _candidates(session: Session, rollout: Rollout, scored: Scored, reference: list[str]
                ) -> list[dict]:
    """One record per rollout row; ``reference`` is the normalised reference of each row."""
    marker = session.config.scoring.marker
    out = []
    for i in range(rollout.num_samples):
        content = rollout.response_ids[i][rollout.content_mask[i]].tolist()
        text = session.tokenizer.decode(content)
        answer = extract_final_answer(text, marker)
        normalized = normalize_answer(answer) if answer is not None else None
        out.append({"text": text, "answer": answer, "normalized": normalized,
                    "correct": normalized is not None and normalized == reference[i],
                    "finish_reason": rollout.finish_reason[i],
                    "n_tokens": int(rollout.lengths[i]), "valid": bool(scored.valid[i]),
                    "score": float(scored.score[i]), "h_final": float(scored.h_final[i]),
                    "fork_entropy": float(scored.fork[i])})
    return out


def _replica_records(session: Session, mine: Sequence[AnswerPrompt], n: int) -> list[dict]:
    """:func:`answer_records` of this replica's prompts ``mine``."""
    sampler, params = make_sampler(session), sampling_params(session)
    refs = [normalize_answer(p.reference) for p in mine]
    greedy = sampler.generate([p.prompt.prompt_ids for p in mine],
                              dataclasses.replace(params, temperature=0.0),
                              [p.index for p in mine], session.tokenizer.decode)
    first = _candidates(session, greedy, score_rollout(session, greedy, 1), refs)
    rollout = sampler.generate([p.prompt.prompt_ids for p in mine for _ in range(n)], params,
                               [p.index * n + j for p in mine for j in range(n)],
                               session.tokenizer.decode)
    sampled = _candidates(session, rollout, score_rollout(session, rollout, n),
                          [r for r in refs for _ in range(n)])
    records = []
    for g, p in enumerate(mine):
        samples = sampled[g * n:(g + 1) * n]
        records.append({"id": p.prompt.id, "prompt_index": p.index,
                        "reference": p.reference, "reference_normalized": refs[g],
                        "greedy": first[g], "samples": samples,
                        "sample_accuracy": sum(c["correct"] for c in samples) / n})
    return records


def answer_records(session: Session, prompts: Sequence[AnswerPrompt], n: int) -> list[dict]:
    """Per prompt: the reference, the greedy candidate and ``n`` sampled candidates, each with
    its extracted answer, whether it is right, and its Eq. 1 parts; gathered over DP (the same
    list on every rank), in prompt order. NaN/Inf logits on any replica: a
    :class:`NonFiniteEvalError` on every rank."""
    rt = session.runtime
    mine = list(prompts[rt.dp_rank::rt.dp])
    records: list[dict] = []
    failed: Optional[str] = "the model"  # until its logits prove finite
    try:
        records = _replica_records(session, mine, n) if mine else []
        failed = None
    except ops.NonFiniteLogitsError:  # on one replica's ranks only: agree before the gather
        pass
    agree_finite(session, failed, "the answer prompts")
    if rt.dp > 1:
        gathered: list = [None] * rt.dp
        dist.all_gather_object(gathered, records, group=rt.dp_group)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: r["prompt_index"])
    return records


def evaluate_answers(session: Session, prompts: Sequence[AnswerPrompt], n: int
                     ) -> tuple[list[dict], dict]:
    records = answer_records(session, prompts, n)
    return records, summarize_answers(records)


def write_answers(directory: str | Path, records: Sequence[dict]) -> Path:
    path = Path(directory) / ANSWERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


# ------------------------------------------------------------------ evaluation during training

def training_eval_metrics(session: Session, pairs: Sequence, prompts: Sequence[AnswerPrompt],
                          n: int) -> dict:
    """The held-out figures a training loop logs every ``eval_interval`` steps (``sega``):
    preference accuracy on ``pairs`` (summed and length-normalised, ``eval.*`` settings) and,
    with ``n`` = ``eval.answer_samples`` > 0, answer accuracy on ``prompts``: greedy, sampled,
    the fraction of samples without a final answer and how often Eq. 1's top-scored sample is
    right (None without mixed groups). ``time_eval``: its wall seconds."""
    import time

    from megatron_sega.training.evaluate import held_out_summary

    ev = session.config.eval
    t0 = time.time()
    summary = held_out_summary(session, pairs, beta=ev.beta, micro_batch_size=ev.micro_batch_size,
                               ties=ev.ties, bootstrap_samples=ev.bootstrap_samples)
    out = {"eval_accuracy": summary["accuracy"],
           "eval_accuracy_length_normalized": summary["accuracy_length_normalized"]}
    if n and prompts and math.isfinite(summary["accuracy"]):  # NaN: the logits are not finite
        try:
            _, answers = evaluate_answers(session, prompts, n)
        except NonFiniteEvalError as err:
            session.print(f"held-out answers skipped: {err}")
            answers = {"ranking": {}, **{key: float("nan") for key in (
                "greedy_accuracy", "sampled_accuracy", "sampled_no_answer_fraction")}}
        out.update(eval_answer_accuracy_greedy=answers["greedy_accuracy"],
                   eval_answer_accuracy_sampled=answers["sampled_accuracy"],
                   eval_no_answer_fraction=answers["sampled_no_answer_fraction"],
                   eval_eq1_top_right=answers["ranking"].get("eq1_top_right"))
    out["time_eval"] = time.time() - t0
    return out
