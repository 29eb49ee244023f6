"""Does SEGA improve SmolLM2-135M-Instruct's answers? Issue 26's experiment, resumable.

    bash scripts/env.sh; OMP_NUM_THREADS=1 .venv/bin/python scripts/answer_experiment.py \
        [--budget-minutes M] [--only NAME,...] [--plan] [--work DIR]

One SFT run of the real-model demo (``examples/configs/demo_smollm2.yaml``), then from that one
SFT checkpoint: SEGA at the paper's defaults, DPO and IPO, each with seeds 1-3 (``data.seed`` and
``sampling.seed``), and SEGA's variants with seed 1: the original brief's settings (lambda 0.4,
softmax reward), the authors' code's (z-scored advantages, token-mean normalisation), the control
lambda = 0 (only the answer's confidence) and LoRA adapters. Every stage runs as its CLI command
under ``torchrun`` with 2 processes (DP=2), as the demo does.

Every model is evaluated alike on the 64 held-out prompts and pairs (``megatron-sega eval``,
``eval.answer_samples``, the same sampling seed for every model): answer accuracy greedy and
sampled, preference accuracy; each against SFT with paired tests (``compare``'s functions).

Each finished run is recorded in ``docs/answer-experiment/<run>.json`` (its figures and its
per-prompt and per-pair outcomes, so the paired tests need no checkpoint) and the tables between
the markers of ``docs/answer-experiment.md`` are rewritten. A recorded run is skipped: a stopped
experiment resumes where it stopped. When the SFT checkpoint is gone (a fresh machine), SFT runs
again and must give the recorded SFT log-probs (to 1e-4), or the script stops: runs from two
different SFT checkpoints are not paired. ``--budget-minutes`` starts no run after that much time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Optional
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "examples/configs/demo_smollm2.yaml"
DPO_SETTINGS = REPO / "examples/configs/demo_smollm2_dpo.yaml"
RESULTS = REPO / "docs/answer-experiment"
DOC = REPO / "docs/answer-experiment.md"
START, END = "<!-- experiment-table:start -->", "<!-- experiment-table:end -->"
SEEDS = (1, 2, 3)
SEGA_STEPS = 40
ANSWER_SAMPLES = 4
# Every stage and eval: room for the reasoning and the final answer, as the eval measures them.
COMMON = ["sampling.max_new_tokens=64", "logging.progress=false", "checkpoint.resume=none",
          "checkpoint.keep_last=1"]
EVAL = [f"eval.answer_samples={ANSWER_SAMPLES}"]
CURVES = [f"sega.eval_interval={SEGA_STEPS // 4}", "eval.answer_samples=2"]
TRAINED = "train_seconds"  # in a run's directory once its training stage has finished
LORA = ["lora.rank=16", "lora.alpha=32", "sega.lr=1.0e-4"]  # the demo's --lora settings


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    method: str  # sft, sega, dpo, ipo
    seed: int
    overrides: tuple[str, ...] = ()
    variant: str = "default"

    @property
    def command(self) -> str:
        return {"sft": "sft", "sega": "sega", "dpo": "dpo", "ipo": "dpo"}[self.method]


def plan() -> list[Run]:
    """SFT, then seed by seed the default and the baselines, then the variants (seed 1), then
    the lambda = 0 control's other seeds."""
    runs = [Run("sft", "sft", 1234)]
    for seed in SEEDS:
        curves = CURVES if seed == SEEDS[0] else []
        runs += [Run(f"sega-s{seed}", "sega", seed, tuple(curves)),
                 Run(f"dpo-s{seed}", "dpo", seed, dpo_overrides("sigmoid")),
                 Run(f"ipo-s{seed}", "ipo", seed, dpo_overrides("ipo"))]
    runs += [Run("sega-brief-s1", "sega", 1, ("scoring.lam=0.4", "scoring.reward=softmax"),
                 "brief: lambda 0.4, softmax reward"),
             Run("sega-authors-s1", "sega", 1, ("sega.normalize_std=true",
                                                "sega.normalization=token_mean"),
                 "authors' code: z-scored, token mean"),
             Run("sega-lam0-s1", "sega", 1, ("scoring.lam=0.0",), "control: lambda 0"),
             Run("sega-lora-s1", "sega", 1, tuple(LORA), "LoRA rank 16")]
    # The control's seeds 2 and 3 last: seed 1 alone left its gain within the noise.
    runs += [Run(f"sega-lam0-s{seed}", "sega", seed, ("scoring.lam=0.0",), "control: lambda 0")
             for seed in SEEDS[1:]]
    return runs


def dpo_overrides(loss: str) -> tuple[str, ...]:
    """The demo's DPO settings (``demo_smollm2_dpo.yaml``) with this loss."""
    section = yaml.safe_load(DPO_SETTINGS.read_text(encoding="utf-8"))["dpo"]
    section["loss"] = loss
    return tuple(f"dpo.{key}={value}" for key, value in section.items())


# ------------------------------------------------------------------ running the stages

def torchrun(args: list[str], log: Path) -> float:
    """One CLI command under torchrun (2 processes); its wall seconds. Output goes to ``log``;
    a failure stops the experiment with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               "--nproc-per-node", "2", "-m", "megatron_sega.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        status = subprocess.run(command, cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT).returncode
    if status:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        sys.exit(f"error: `{' '.join(args[:1])}` failed (exit {status}); the end of {log}:\n"
                 + "\n".join(tail))
    return time.monotonic() - start


def base_model(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a Megatron checkpoint (fetched and converted once, as the demo)."""
    models = Path(os.environ.get("MODEL_DIR", REPO / "outputs/models/smollm2-135m"))
    if not (models / "mcore").is_dir():
        for args in (["tools/fetch_model.py", "smollm2-135m-instruct", "--out",
                      str(models / "hf")],
                     ["tools/convert.py", "hf-to-mcore", "--hf-dir", str(models / "hf"),
                      "--out", str(models / "mcore")]):
            subprocess.run([sys.executable, *args], cwd=REPO, check=True)
    return models / "mcore"


def train(run: Run, work: Path, base: Path) -> tuple[Path, float]:
    """The run's training stage; its checkpoint and wall seconds."""
    directory = work / run.name
    start = base if run.method == "sft" else work / "sft" / "ckpt"
    args = [run.command, "--config", str(CONFIG), f"model.load={start}", *COMMON,
            f"logging.dir={directory}", f"checkpoint.save_dir={directory / 'ckpt'}",
            f"data.seed={run.seed}", f"sampling.seed={run.seed}"]
    if run.method == "sega":
        args.append(f"sega.steps={SEGA_STEPS}")
    seconds = torchrun([*args, *run.overrides], directory / "train.log")
    (directory / TRAINED).write_text(f"{seconds:.1f}\n", encoding="utf-8")
    return directory / "ckpt", seconds


def trained(run: Run, work: Path) -> Optional[tuple[Path, float]]:
    """The checkpoint and wall seconds of a training stage that finished but was not recorded
    (its evaluation failed or was stopped): evaluated again, not trained again."""
    done, checkpoint = work / run.name / TRAINED, work / run.name / "ckpt"
    if not (done.is_file() and checkpoint.is_dir()):
        return None
    return checkpoint, float(done.read_text(encoding="utf-8"))


def evaluate(run: Run, work: Path, checkpoint: Path) -> tuple[Path, float]:
    out = work / run.name / "eval"
    model = [o for o in run.overrides if o.startswith("lora.")]  # the trained model's shape
    seconds = torchrun(["eval", "--config", str(CONFIG), f"model.load={checkpoint}", *COMMON,
                        *model, *EVAL, f"eval.out={out}"], work / run.name / "eval.log")
    return out, seconds


# ------------------------------------------------------------------ records

def compact_answers(records: list[dict]) -> list[dict]:
    """What the paired tests and the tables need of ``answers.jsonl``, per prompt."""
    keep = ("correct", "answer", "valid", "score", "h_final", "fork_entropy", "n_tokens")
    return [{"id": r["id"], "reference": r["reference"],
             "greedy": {k: r["greedy"][k] for k in keep},
             "samples": [{k: c[k] for k in keep} for c in r["samples"]],
             "sample_accuracy": r["sample_accuracy"]} for r in records]


def curve(directory: Path) -> list[dict]:
    """The held-out figures a SEGA run logged every ``sega.eval_interval`` steps."""
    path = directory / "sega_metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    keys = ("step", "eval_accuracy", "eval_answer_accuracy_greedy",
            "eval_answer_accuracy_sampled", "eval_no_answer_fraction", "eval_eq1_top_right")
    return [{k: r.get(k) for k in keys} for r in rows if "eval_accuracy" in r]


def make_record(run: Run, eval_dir: Path, seconds: dict) -> dict:
    from megatron_sega.training.compare import read_answers, read_eval_dir

    pairs, summary = read_eval_dir(eval_dir)
    keep = ("id", "logp_chosen", "logp_rejected", "n_tokens_chosen", "n_tokens_rejected")
    return {"name": run.name, "method": run.method, "variant": run.variant, "seed": run.seed,
            "overrides": list(run.overrides), "sega_steps": SEGA_STEPS
            if run.method == "sega" else None, "seconds": seconds, "summary": summary,
            "curve": curve(eval_dir.parent), "pairs": [{k: p[k] for k in keep} for p in pairs],
            "answers": compact_answers(read_answers(eval_dir))}


def check_same_sft(recorded: dict, new: dict) -> None:
    """A rerun SFT must be the recorded one: the held-out log-probs agree to 1e-4."""
    worst = max(abs(a[key] - b[key]) for a, b in zip(recorded["pairs"], new["pairs"])
                for key in ("logp_chosen", "logp_rejected"))
    if len(recorded["pairs"]) != len(new["pairs"]) or worst > 1e-4:
        sys.exit(f"error: the SFT run again differs from {RESULTS / 'sft.json'} (held-out "
                 f"log-probs up to {worst:.3g} apart); its runs are not paired with a new SFT. "
                 f"Move {RESULTS} away to start the experiment afresh.")


def load_records() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(RESULTS.glob("*.json"))}


# ------------------------------------------------------------------ tables

def _ci(bounds) -> str:
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds and None not in bounds else ""


def _signed(value: float, bounds, p: float) -> str:
    return f"{value:+.3f} [{bounds[0]:+.3f}, {bounds[1]:+.3f}], p {p:.2g}"


def comparison(sft: dict, record: dict, samples: int = 2000) -> dict:
    """Paired against SFT: preference accuracy by pair, answer accuracy by prompt."""
    from megatron_sega.training.compare import align, compare_answers, compare_records

    a, b = align(sft["pairs"], record["pairs"], "sft", record["name"])
    beta = sft["summary"]["beta"]
    out = {"preference": compare_records(a, b, beta_a=beta, beta_b=record["summary"]["beta"],
                                         ties="wrong", samples=samples)["accuracy"]}
    a, b = align(sft["answers"], record["answers"], "sft", record["name"], unit="prompt",
                 file="answers")
    out.update(compare_answers(a, b, samples=samples))
    return out


def pooled(base: list[dict], records: list[dict]) -> dict:
    """Seeds pooled: each prompt's (pair's) mean outcome over ``records``' seeds against its mean
    over ``base``'s (SFT: its one run), paired t over prompts (pairs); ``difference``:
    ``records`` minus ``base``."""
    from megatron_sega.training.evaluate import pair_outcomes
    from megatron_sega.training.stats import paired_t_test

    def per_item(record, kind):
        if kind == "preference":
            return pair_outcomes(record["pairs"], "accuracy", beta=record["summary"]["beta"],
                                 ties="wrong")
        if kind == "greedy":
            return [float(r["greedy"]["correct"]) for r in record["answers"]]
        return [r["sample_accuracy"] for r in record["answers"]]

    def seed_mean(group, kind):
        return [sum(v) / len(v) for v in zip(*(per_item(r, kind) for r in group))]

    out = {}
    for kind in ("greedy", "sampled", "preference"):
        mean = seed_mean(records, kind)
        out[kind] = paired_t_test(seed_mean(base, kind), mean)
        out[kind]["accuracy"] = sum(mean) / len(mean)
    return out


# Pooled method against pooled method, paired by prompt: (method, against, what it isolates).
HEAD_TO_HEAD = [("sega", "sega-lam0", "the fork term: lambda 1 against 0")]


def tables(records: dict[str, dict]) -> str:
    sft = records.get("sft")
    if sft is None:
        return "(no run recorded yet)"
    lines = ["Each run against SFT, paired: answer accuracy over the 64 held-out prompts "
             "(greedy: paired bootstrap interval, McNemar exact p; sampled, mean of "
             f"{ANSWER_SAMPLES}: paired t interval and p), preference accuracy over the 64 "
             "held-out pairs (paired bootstrap, McNemar exact p). Ranking: over the prompts "
             "whose samples are both right and wrong, how often the top Eq. 1 score / the top "
             "-H_final / the top fork term is "
             "right, and the chance of a random pick.", "",
             "| run | greedy [95% CI] | greedy - SFT | sampled [95% CI] | sampled - SFT | "
             "no answer (sampled) | ranking: Eq. 1 / -H_final / fork / chance (groups) | "
             "preference [95% CI] | preference - SFT | wall (train + eval) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_method: dict[str, list[dict]] = {}
    for name, record in records.items():
        answers, summary = record["summary"]["answers"], record["summary"]
        rank = answers["ranking"]
        ranking = (f"{rank['eq1_top_right']:.2f} / {rank['neg_h_final_top_right']:.2f} / "
                   f"{rank['fork_top_right']:.2f} / {rank['chance']:.2f} "
                   f"({rank['groups_mixed']})" if rank.get("groups_mixed") else "no mixed group")
        wall = sum(record["seconds"].values()) / 60
        if name == "sft":
            diffs = ["", "", ""]
        else:
            c = comparison(sft, record)
            diffs = [_signed(c["greedy"]["difference"], c["greedy"]["ci95"],
                             c["greedy"]["p_mcnemar"]),
                     _signed(c["sampled"]["difference"], c["sampled"]["ci95"],
                             c["sampled"]["p_t"]),
                     _signed(c["preference"]["difference"], c["preference"]["ci95"],
                             c["preference"]["p_mcnemar"])]
            by_method.setdefault(record["method"] if record["variant"] == "default"
                                 else re.sub(r"-s\d+$", "", name), []).append(record)
        lines.append(
            f"| {name} | {answers['greedy_accuracy']:.3f} {_ci(answers['greedy_accuracy_ci95'])}"
            f" | {diffs[0]} | {answers['sampled_accuracy']:.3f} "
            f"{_ci(answers['sampled_accuracy_ci95'])} | {diffs[1]} | "
            f"{answers['sampled_no_answer_fraction']:.2f} | {ranking} | "
            f"{summary['accuracy']:.3f} {_ci(summary['accuracy_ci95'])} | {diffs[2]} | "
            f"{wall:.1f} min |")
    lines += ["", "Seeds pooled: each prompt's (pair's) outcome averaged over a method's seeds, "
              "against SFT, paired t over the 64 prompts (pairs).", "",
              "| method | seeds | greedy (- SFT [95% CI], p) | sampled (- SFT [95% CI], p) | "
              "preference (- SFT [95% CI], p) |", "|---|---|---|---|---|"]
    for method, group in by_method.items():
        if len(group) < 2:
            continue
        p = pooled([sft], group)
        cells = [f"{p[k]['accuracy']:.3f} ({_signed(p[k]['difference'], p[k]['ci95'], p[k]['p'])})"
                 for k in ("greedy", "sampled", "preference")]
        seeds = ", ".join(str(r["seed"]) for r in group)
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    pairs = [(a, b, what) for a, b, what in HEAD_TO_HEAD
             if len(by_method.get(a, [])) > 1 and len(by_method.get(b, [])) > 1]
    if pairs:
        lines += ["", "Head to head, seeds pooled: the first method against the second, each "
                  "prompt's (pair's) outcome averaged over each method's seeds, paired t.", "",
                  "| method | against | isolates | greedy (difference [95% CI], p) | "
                  "sampled (difference [95% CI], p) | preference (difference [95% CI], p) |",
                  "|---|---|---|---|---|---|"]
        for a, b, what in pairs:
            p = pooled(by_method[b], by_method[a])
            cells = [_signed(p[k]["difference"], p[k]["ci95"], p[k]["p"])
                     for k in ("greedy", "sampled", "preference")]
            lines.append(f"| {a} | {b} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(records: dict[str, dict]) -> None:
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else f"{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{START}\n{tables(records)}\n{END}{tail}", encoding="utf-8")


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "outputs/answer_experiment",
                        help="checkpoints and logs (not in the repository)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no run after this many minutes")
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--plan", action="store_true", help="print the runs and exit")
    args = parser.parse_args(argv)
    runs = plan()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.name for r in runs}
        if unknown:
            parser.error(f"--only: no run named {sorted(unknown)}; see --plan")
        runs = [r for r in runs if r.name in wanted or r.method == "sft"]
    records = load_records()
    if args.plan:
        for run in runs:
            state = "recorded" if run.name in records else "to run"
            print(f"{run.name:18} {state:9} {run.command} {' '.join(run.overrides)}")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base = base_model(args.work)
    pending = [r for r in runs if r.name not in records]
    if records.get("sft") and not (args.work / "sft" / "ckpt").is_dir() and pending:
        pending.insert(0, runs[0])  # the SFT checkpoint again, checked against its record
    for run in pending:
        if args.budget_minutes is not None and (time.monotonic() - started) / 60 > \
                args.budget_minutes:
            print(f"budget of {args.budget_minutes} min spent; rerun to continue")
            break
        done = trained(run, args.work) if run.method != "sft" else None
        if done is None:
            print(f"[{time.strftime('%H:%M:%S')}] {run.name}: training", flush=True)
        checkpoint, train_seconds = done or train(run, args.work, base)
        print(f"[{time.strftime('%H:%M:%S')}] {run.name}: evaluating", flush=True)
        eval_dir, eval_seconds = evaluate(run, args.work, checkpoint)
        record = make_record(run, eval_dir, {"train": train_seconds, "eval": eval_seconds})
        if run.name in records:  # SFT again on a fresh machine
            check_same_sft(records[run.name], record)
            continue
        (RESULTS / f"{run.name}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
        records[run.name] = record
        write_doc(records)
        if run.method != "sft":
            shutil.rmtree(checkpoint, ignore_errors=True)  # only SFT's is needed again
        print(f"[{time.strftime('%H:%M:%S')}] {run.name}: recorded "
              f"({(train_seconds + eval_seconds) / 60:.1f} min)", flush=True)
    write_doc(load_records())
    return 0


if __name__ == "__main__":
    sys.exit(main())
