"""``megatron-sega compare EVAL_A EVAL_B``: are two evaluations of the same pairs different?

Reads the ``pairs.jsonl`` of two ``megatron-sega eval`` output directories (their
``summary.json`` gives each one's beta), matches the pairs by id, and for every accuracy both
support prints accuracy A and B with their 95% Wilson intervals, the paired difference B - A
with its paired percentile-bootstrap 95% interval (``eval.bootstrap_samples``, seed 0), and
McNemar's exact two-sided p-value on the discordant pairs (right in one, wrong in the other).

When both directories hold ``answers.jsonl`` (``eval.answer_samples``), it compares answer
accuracy over the prompts too, matched by id: greedy as the pairs above (Wilson, bootstrap,
McNemar), the mean sampled accuracy with the paired t test over the prompts' fractions (a
prompt's samples are not independent).

Outcomes follow ``eval.ties``. Under ``half`` a tied pair scores 1/2 in the difference and its
interval, but is never discordant for McNemar (which needs right or wrong on both sides): the
test then counts only the pairs decided on both sides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from megatron_sega.errors import DataError
from megatron_sega.training.answers import ANSWERS_FILE
from megatron_sega.training.evaluate import (
    BOOTSTRAP_SEED, TieRule, accuracy_names, pair_outcomes,
)
from megatron_sega.training.stats import (
    mean_interval, mcnemar_exact_p, paired_bootstrap_difference, paired_t_test, wilson_interval,
)


def read_eval_dir(directory: str | Path) -> tuple[list[dict], dict]:
    """The per-pair records and the summary of one ``eval`` output directory."""
    root = Path(directory)
    pairs_file = root / "pairs.jsonl"
    if not pairs_file.is_file():
        raise DataError(f"{root}: no pairs.jsonl; pass a directory written by `megatron-sega "
                        "eval` (its eval.out)")
    records = _read_jsonl(pairs_file)
    summary_file = root / "summary.json"
    try:
        summary = json.loads(summary_file.read_text("utf-8")) if summary_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise DataError(f"{summary_file}: malformed JSON ({e.msg}); rerun `megatron-sega eval` "
                        "to rewrite it") from None
    if not records:
        raise DataError(f"{pairs_file}: holds no pairs; nothing to compare")
    return records, summary


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); rerun "
                                "`megatron-sega eval` to rewrite it") from None
    return records


def read_answers(directory: str | Path) -> list[dict] | None:
    """The per-prompt answer records of one ``eval`` output directory (None without
    ``answers.jsonl``)."""
    path = Path(directory) / ANSWERS_FILE
    return _read_jsonl(path) if path.is_file() else None


def align(records_a: Sequence[dict], records_b: Sequence[dict], name_a: str,
          name_b: str, unit: str = "pair", file: str = "pairs.jsonl"
          ) -> tuple[list[dict], list[dict]]:
    """B's records in A's order. The two must hold the same ids (of pairs, or of prompts for
    answers), each once: a comparison of different pairs is not paired, and its difference would
    mean nothing."""
    by_id = {}
    for name, records in ((name_a, records_a), (name_b, records_b)):
        ids = [str(r["id"]) for r in records]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{name}: {unit} id {dup!r} occurs more than once in {file}")
        by_id[name] = dict(zip(ids, records))
    only_a = [i for i in by_id[name_a] if i not in by_id[name_b]]
    only_b = [i for i in by_id[name_b] if i not in by_id[name_a]]
    if only_a or only_b:
        raise DataError(
            f"{name_a} ({len(records_a)} {unit}s) and {name_b} ({len(records_b)} {unit}s) are "
            f"not evaluations of the same {unit}s: {len(only_a)} id(s) only in the first "
            f"{only_a[:3]}, {len(only_b)} only in the second {only_b[:3]}; evaluate both models "
            "on the same data.eval")
    return list(records_a), [by_id[name_b][str(r["id"])] for r in records_a]


def compare_records(records_a: Sequence[dict], records_b: Sequence[dict], *, beta_a: float,
                    beta_b: float, ties: TieRule, samples: int,
                    seed: int = BOOTSTRAP_SEED) -> dict:
    """{accuracy name: {accuracy_a, ci95_a, accuracy_b, ci95_b, difference, ci95, only_a,
    only_b, p_mcnemar}} for the accuracies both sides support; records already aligned."""
    names = [n for n in accuracy_names(records_a) if n in accuracy_names(records_b)]
    out = {}
    for name in names:
        a = pair_outcomes(records_a, name, beta=beta_a, ties=ties)
        b = pair_outcomes(records_b, name, beta=beta_b, ties=ties)
        out[name] = {"pairs": len(a), **_binary_comparison(a, b, samples, seed)}
    return out


def _binary_comparison(a: Sequence[float], b: Sequence[float], samples: int, seed: int) -> dict:
    """Right (1) / wrong (0) / half (0.5) outcomes of the same items under A and B."""
    difference, interval = paired_bootstrap_difference(a, b, samples, seed)
    only_a = sum(x == 1.0 and y == 0.0 for x, y in zip(a, b))
    only_b = sum(x == 0.0 and y == 1.0 for x, y in zip(a, b))
    return {"accuracy_a": sum(a) / len(a), "ci95_a": list(wilson_interval(sum(a), len(a))),
            "accuracy_b": sum(b) / len(b), "ci95_b": list(wilson_interval(sum(b), len(b))),
            "difference": difference, "ci95": list(interval),
            "only_a": only_a, "only_b": only_b, "p_mcnemar": mcnemar_exact_p(only_a, only_b)}


def compare_answers(answers_a: Sequence[dict], answers_b: Sequence[dict], *, samples: int,
                    seed: int = BOOTSTRAP_SEED) -> dict:
    """{"greedy": as :func:`compare_records`' entries, over prompts; "sampled": {accuracy_a,
    ci95_a, accuracy_b, ci95_b (Student t), difference, ci95, p_t (paired t test)}}; records
    already aligned."""
    a = [float(r["greedy"]["correct"]) for r in answers_a]
    b = [float(r["greedy"]["correct"]) for r in answers_b]
    out = {"greedy": {"prompts": len(a), **_binary_comparison(a, b, samples, seed)}}
    fa = [float(r["sample_accuracy"]) for r in answers_a]
    fb = [float(r["sample_accuracy"]) for r in answers_b]
    if len(fa) >= 2:
        test = paired_t_test(fa, fb)
        out["sampled"] = {"prompts": len(fa), "samples_a": len(answers_a[0]["samples"]),
                          "samples_b": len(answers_b[0]["samples"]),
                          "accuracy_a": sum(fa) / len(fa), "ci95_a": list(mean_interval(fa)),
                          "accuracy_b": sum(fb) / len(fb), "ci95_b": list(mean_interval(fb)),
                          "difference": test["difference"], "ci95": test["ci95"],
                          "p_t": test["p"]}
    return out


def format_comparison(result: dict, name_a: str, name_b: str, ties: TieRule,
                      samples: int) -> str:
    """The table ``compare`` prints."""
    lines = [f"A = {name_a}", f"B = {name_b}",
             "| accuracy | pairs | A [95% CI] | B [95% CI] | B - A [paired bootstrap 95% CI] | "
             "right only in A / only in B | McNemar exact p |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        lines.append(
            f"| {name} | {r['pairs']} | {r['accuracy_a']:.3f} {_interval(r['ci95_a'])} | "
            f"{r['accuracy_b']:.3f} {_interval(r['ci95_b'])} | {r['difference']:+.3f} "
            f"{_interval(r['ci95'], signed=True)} | {r['only_a']} / {r['only_b']} | "
            f"{r['p_mcnemar']:.3g} |")
    lines.append(f"ties count as {'wrong' if ties == 'wrong' else 'half right'} "
                 f"(eval.ties={ties}); Wilson intervals for A and B; {samples} bootstrap "
                 f"samples, seed {BOOTSTRAP_SEED}")
    return "\n".join(lines)


def format_answer_comparison(result: dict) -> str:
    """The answer-accuracy table ``compare`` prints when both sides have answers.jsonl."""
    lines = ["| answer accuracy | prompts | A [95% CI] | B [95% CI] | B - A [95% CI] | "
             "right only in A / only in B | test, p |", "|---|---|---|---|---|---|---|"]
    g = result["greedy"]
    lines.append(f"| greedy | {g['prompts']} | {g['accuracy_a']:.3f} {_interval(g['ci95_a'])} | "
                 f"{g['accuracy_b']:.3f} {_interval(g['ci95_b'])} | {g['difference']:+.3f} "
                 f"{_interval(g['ci95'], signed=True)} (bootstrap) | {g['only_a']} / "
                 f"{g['only_b']} | McNemar exact, {g['p_mcnemar']:.3g} |")
    if "sampled" in result:
        s = result["sampled"]
        lines.append(f"| sampled (mean of {s['samples_a']} / {s['samples_b']}) | {s['prompts']} | "
                     f"{s['accuracy_a']:.3f} {_interval(s['ci95_a'])} | {s['accuracy_b']:.3f} "
                     f"{_interval(s['ci95_b'])} | {s['difference']:+.3f} "
                     f"{_interval(s['ci95'], signed=True)} (t) | - | paired t, {s['p_t']:.3g} |")
    lines.append("greedy: Wilson intervals over prompts; sampled: Student t over the prompts' "
                 "fractions right")
    return "\n".join(lines)


def _interval(bounds: Sequence[float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return "[" + fmt.format(bounds[0]) + ", " + fmt.format(bounds[1]) + "]"


def run_compare(config, args) -> int:
    """``megatron-sega compare EVAL_A EVAL_B``: print the paired comparison, and with ``--json
    FILE`` also write it."""
    records_a, summary_a = read_eval_dir(args.eval_a)
    records_b, summary_b = read_eval_dir(args.eval_b)
    records_a, records_b = align(records_a, records_b, args.eval_a, args.eval_b)
    ties, samples = config.eval.ties, config.eval.bootstrap_samples
    result = compare_records(records_a, records_b,
                             beta_a=summary_a.get("beta", config.eval.beta),
                             beta_b=summary_b.get("beta", config.eval.beta),
                             ties=ties, samples=samples)
    print(format_comparison(result, args.eval_a, args.eval_b, ties, samples))
    answers = [read_answers(args.eval_a), read_answers(args.eval_b)]
    if all(a is not None for a in answers):
        answers_a, answers_b = align(*answers, args.eval_a, args.eval_b, unit="prompt",
                                     file=ANSWERS_FILE)
        result["answers"] = compare_answers(answers_a, answers_b, samples=samples)
        print(format_answer_comparison(result["answers"]))
    elif any(a is not None for a in answers):
        have = args.eval_a if answers[0] is not None else args.eval_b
        print(f"answer accuracy: only {have} has {ANSWERS_FILE}; evaluate both with "
              "eval.answer_samples > 0 to compare it")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
