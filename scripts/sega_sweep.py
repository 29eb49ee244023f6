"""Why SEGA lowers preference accuracy on the tiny demo: a seeded, one-factor-at-a-time sweep.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/sega_sweep.py [--out DIR] [--only a,b]

One SFT run of the demo (``examples/configs/demo_tiny.yaml``, in this one process, TP=1), then one
SEGA run per variant below, each from that same SFT checkpoint. The SFT checkpoint and every SEGA
result are evaluated alike on the held-out pairs: preference accuracy (summed and length-normalised
log-probs), the mean log-probs of chosen and rejected, and, from k samples for each of the first
``--prompts`` held-out prompts (same seeds for every model), the mean Eq. 1 score with lambda = 1
and its two parts, -H_final and the fork term (score_lambda = -H_final + lambda * fork, for any
lambda). Also: where the top fork token of each sample sits (the digits computed after '=', or
elsewhere), which explains the fork term's effect on this task.

Finished runs are cached in ``DIR/runs/NAME.json`` (a stopped sweep continues); the table goes
between the markers of ``docs/sega-sweep.md`` (the prose around it is kept).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, overrides of the SEGA stage, what it tests); one factor at a time around the demo.
VARIANTS: list[tuple[str, list[str], str]] = [
    ("base", [], "the demo as shipped before this sweep: lam 1.0, identity, no z-score, "
                 "sequence_sum, lr 3e-4"),
    ("base, seed 2", ["sampling.seed=4321"], "the same with other sampling seeds (noise)"),
    ("lam 0.4", ["scoring.lam=0.4"], "the seed brief's fork weight"),
    ("lam 0", ["scoring.lam=0.0"], "control: no fork term (-H_final only)"),
    ("softmax", ["scoring.reward=softmax"], "softmax reward over the group (tau 1)"),
    ("z-score", ["sega.normalize_std=true"], "advantages divided by the group std"),
    ("token_mean", ["sega.normalization=token_mean"], "loss / response tokens, not / groups"),
    ("lr 1e-4", ["sega.lr=1.0e-4"], "smaller step"),
    ("lr 1e-3", ["sega.lr=1.0e-3"], "larger step"),
    ("seed brief", ["scoring.lam=0.4", "scoring.reward=softmax"], "lam 0.4 + softmax"),
    ("authors' code", ["sega.normalize_std=true", "sega.normalization=token_mean"],
     "z-score + per-token normaliser"),
]
START, END = "<!-- sweep-table:start -->", "<!-- sweep-table:end -->"
_AFTER_EQUALS = re.compile(r"=\s*-?\d*$")


def base_config(extra: list[str]):
    from megatron_sega.config import load_config

    return load_config(REPO / "examples/configs/demo_tiny.yaml", [
        "parallel.tp=1", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.resume=none", f"data.train={REPO / 'examples/demo_data/train.jsonl'}",
        f"data.eval={REPO / 'examples/demo_data/eval.jsonl'}", *extra])


def fork_token_kinds(session, rollout, k: int) -> dict[str, float]:
    """Where each valid sample's highest-entropy reasoning token sits: in the number computed
    right after an '=' (the token that decides whether the answer is right) or elsewhere."""
    from megatron_sega.sega import answer_span_mask

    sc = session.config.scoring
    markers = session.tokenizer.marker_variants(sc.marker)
    answer, reasoning = answer_span_mask(rollout.response_ids, rollout.content_mask, markers,
                                         final_fraction=sc.final_fraction)
    at_result = total = 0
    for i in range(rollout.num_samples):
        if not reasoning[i].any() or not answer[i].any():
            continue
        t = int(torch.where(reasoning[i], rollout.entropy[i].double(), -1.0).argmax())
        ids = rollout.response_ids[i].tolist()
        token = session.tokenizer.decode(ids[t:t + 1]).strip()
        # a digit (or sign) of the number that follows the last '=' before it
        after_equals = _AFTER_EQUALS.search(session.tokenizer.decode(ids[:t])) is not None
        at_result += bool(token) and all(c.isdigit() or c == "-" for c in token) and after_equals
        total += 1
    return {"fork_at_result": at_result / max(total, 1)}


def evaluate(config, checkpoint: Path, prompts: int) -> dict:
    from megatron_sega.training.evaluate import evaluate_pairs, load_eval_pairs
    from megatron_sega.training.sega import load_prompts, make_sampler, sampling_params, score_rollout
    from megatron_sega.training.session import open_session

    session = open_session(config.with_overrides(f"model.load={checkpoint}"), train=False)
    _, summary = evaluate_pairs(session, load_eval_pairs(session, config.data.eval),
                                beta=config.eval.beta,
                                micro_batch_size=config.eval.micro_batch_size)
    k = config.sega.k
    chosen = load_prompts(session, config.data.eval)[:prompts]
    # the ids of training.sega.mean_entropy_score: the demo's score of the same prompts
    rollout = make_sampler(session).generate(
        [p.prompt_ids for p in chosen for _ in range(k)], sampling_params(session),
        [g * k + j for g in range(len(chosen)) for j in range(k)], session.tokenizer.decode)
    scored = score_rollout(session, rollout, k)
    v = scored.valid
    return {"accuracy": summary["accuracy"],
            "accuracy_length_normalized": summary["accuracy_length_normalized"],
            "logp_chosen": summary["mean_logp_chosen"],
            "logp_rejected": summary["mean_logp_rejected"],
            "score": float(scored.score[v].mean()), "neg_h_final": float(-scored.h_final[v].mean()),
            "fork": float(scored.fork[v].mean()), "valid": float(v.float().mean()),
            "response_length": float(rollout.lengths.float().mean()),
            **fork_token_kinds(session, rollout, k)}


def cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_sft(config, out: Path, prompts: int) -> dict:
    from megatron_sega.training.sft import run_sft as sft

    def make():
        t0 = time.time()
        sft(config.with_overrides(f"logging.dir={out / 'sft'}",
                                  f"checkpoint.save_dir={out / 'sft' / 'ckpt'}"), None)
        return {"name": "SFT", "overrides": [], "wall_s": time.time() - t0,
                **evaluate(config, out / "sft" / "ckpt", prompts)}

    return cached(out / "runs" / "SFT.json", make)


def run_variant(config, out: Path, prompts: int, name: str, overrides: list[str]) -> dict:
    from megatron_sega.training.sega import run_sega

    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")

    def make():
        directory = out / slug
        t0 = time.time()
        status = run_sega(config.with_overrides(
            f"model.load={out / 'sft' / 'ckpt'}", f"logging.dir={directory}",
            f"checkpoint.save_dir={directory / 'ckpt'}", *overrides), None)
        wall = time.time() - t0
        rows = [json.loads(line) for line in
                (directory / "sega_metrics.jsonl").read_text().splitlines()]
        last = rows[-5:]
        return {"name": name, "overrides": overrides, "wall_s": wall, "status": status,
                "train_score_last5": sum(r["score_mean"] for r in last) / len(last),
                **evaluate(config, directory / "ckpt", prompts)}

    return cached(out / "runs" / f"{slug}.json", make)


def table(sft: dict, runs: list[dict]) -> str:
    lines = ["| run | change (SEGA stage) | accuracy (vs SFT) | length-normalised (vs SFT) | "
             "logp chosen / rejected | score (lam 1) | -H_final | fork | fork at result | "
             "length | wall s |", "|" + "---|" * 11]

    def row(r: dict, change: str, delta: bool) -> str:
        def acc(key):
            d = f" ({r[key] - sft[key]:+.3f})" if delta else ""
            return f"{r[key]:.3f}{d}"

        return (f"| {r['name']} | {change} | {acc('accuracy')} | "
                f"{acc('accuracy_length_normalized')} | {r['logp_chosen']:.2f} / "
                f"{r['logp_rejected']:.2f} | {r['score']:.3f} | {r['neg_h_final']:.3f} | "
                f"{r['fork']:.3f} | {r['fork_at_result']:.2f} | {r['response_length']:.1f} | "
                f"{r['wall_s']:.0f} |")

    lines.append(row(sft, "(the start of every run)", False))
    for r in runs:
        lines.append(row(r, ", ".join(f"`{o}`" for o in r["overrides"]) or "none", True))
    return "\n".join(lines)


def write_doc(doc: Path, text: str) -> None:
    block = f"{START}\n{text}\n{END}"
    if doc.is_file() and START in doc.read_text():
        old = doc.read_text()
        doc.write_text(old[:old.index(START)] + block + old[old.index(END) + len(END):])
    else:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(f"# SEGA sweep on the tiny demo\n\n{block}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "outputs" / "sega_sweep"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "sega-sweep.md"))
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to sample")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="for every stage (e.g. sega.steps=3 for a rehearsal)")
    args = parser.parse_args(argv)
    from megatron_sega.cli import _quiet_megatron

    _quiet_megatron()
    config, prompts = base_config(args.overrides), args.prompts
    out = Path(args.out)
    sft = run_sft(config, out, prompts)
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    runs = []
    for name, overrides, _ in VARIANTS:
        if wanted and name not in wanted:
            continue
        runs.append(run_variant(config, out, prompts, name, overrides))
        print(f"[{name}] accuracy {runs[-1]['accuracy']:.3f} (SFT {sft['accuracy']:.3f}), "
              f"score {runs[-1]['score']:.3f}", flush=True)
    text = table(sft, runs)
    write_doc(Path(args.doc), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
