"""``megatron-sega compare EVAL_A EVAL_B``: are two evaluations of the same pairs different?

Reads the ``pairs.jsonl`` of two ``megatron-sega eval`` output directories (their
``summary.json`` gives each one's beta), matches the pairs by id, and for every accuracy both
support prints accuracy A and B with their 95% Wilson intervals, the paired difference B - A
with its paired percentile-bootstrap 95% interval (``eval.bootstrap_samples``, seed 0), and
McNemar's exact two-sided p-value on the discordant pairs (right in one, wrong in the other).

Outcomes follow ``eval.ties``. Under ``half`` a tied pair scores 1/2 in the difference and its
interval, but is never discordant for McNemar (which needs right or wrong on both sides): the
test then counts only the pairs decided on both sides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from megatron_sega.errors import DataError
from megatron_sega.training.evaluate import (
    BOOTSTRAP_SEED, TieRule, accuracy_names, pair_outcomes,
)
from megatron_sega.training.stats import (
    mcnemar_exact_p, paired_bootstrap_difference, wilson_interval,
)


def read_eval_dir(directory: str | Path) -> tuple[list[dict], dict]:
    """The per-pair records and the summary of one ``eval`` output directory."""
    root = Path(directory)
    pairs_file = root / "pairs.jsonl"
    if not pairs_file.is_file():
        raise DataError(f"{root}: no pairs.jsonl; pass a directory written by `megatron-sega "
                        "eval` (its eval.out)")
    records = []
    with pairs_file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{pairs_file}:{lineno}: malformed JSON ({e.msg}); rerun "
                                "`megatron-sega eval` to rewrite it") from None
    summary_file = root / "summary.json"
    try:
        summary = json.loads(summary_file.read_text("utf-8")) if summary_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise DataError(f"{summary_file}: malformed JSON ({e.msg}); rerun `megatron-sega eval` "
                        "to rewrite it") from None
    if not records:
        raise DataError(f"{pairs_file}: holds no pairs; nothing to compare")
    return records, summary


def align(records_a: Sequence[dict], records_b: Sequence[dict], name_a: str,
          name_b: str) -> tuple[list[dict], list[dict]]:
    """B's records in A's order. The two must hold the same pair ids, each once: a comparison of
    different pairs is not paired, and its difference would mean nothing."""
    by_id = {}
    for name, records in ((name_a, records_a), (name_b, records_b)):
        ids = [str(r["id"]) for r in records]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{name}: pair id {dup!r} occurs more than once in pairs.jsonl")
        by_id[name] = dict(zip(ids, records))
    only_a = [i for i in by_id[name_a] if i not in by_id[name_b]]
    only_b = [i for i in by_id[name_b] if i not in by_id[name_a]]
    if only_a or only_b:
        raise DataError(
            f"{name_a} ({len(records_a)} pairs) and {name_b} ({len(records_b)} pairs) are not "
            f"evaluations of the same pairs: {len(only_a)} id(s) only in the first "
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
        difference, interval = paired_bootstrap_difference(a, b, samples, seed)
        only_a = sum(x == 1.0 and y == 0.0 for x, y in zip(a, b))
        only_b = sum(x == 0.0 and y == 1.0 for x, y in zip(a, b))
        out[name] = {
            "pairs": len(a),
            "accuracy_a": sum(a) / len(a), "ci95_a": list(wilson_interval(sum(a), len(a))),
            "accuracy_b": sum(b) / len(b), "ci95_b": list(wilson_interval(sum(b), len(b))),
            "difference": difference, "ci95": list(interval),
            "only_a": only_a, "only_b": only_b, "p_mcnemar": mcnemar_exact_p(only_a, only_b),
        }
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
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
