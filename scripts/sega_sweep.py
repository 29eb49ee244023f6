"""Why SEGA lowers preference accuracy on the tiny demo: a seeded, one-factor-at-a-time sweep.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/sega_sweep.py [--out DIR] [--only a,b]

One SFT run of the demo (``examples/configs/demo_tiny.yaml``, in this one process, TP=1), then,
for each variant below and each sampling seed, one SEGA run from that same SFT checkpoint. The SFT
checkpoint and every SEGA result are evaluated alike, on the held-out pairs and with the same
sampling seeds for every model:

- preference accuracy (summed and length-normalised log-probs), overall and by the kind of
  rejected answer (the demo data has four, in equal shares: (a) reasoning with a wrong result,
  (b) right reasoning but another final answer, (c) only a wrong final answer, (d) only the
  right final answer, no reasoning), and the mean log-probs of chosen and rejected;
- from k samples for each of the first ``--prompts`` held-out prompts: the mean Eq. 1 score
  with lambda = 1 and its parts, -H_final and the fork term (score_lambda = -H_final +
  lambda * fork, for any lambda); how often a sample's final answer is right; how often the
  candidate that Eq. 1 (or one of its parts alone) ranks first in its group is right; and how
  often the top fork token is a digit of the result computed after '='.

Finished runs are cached in ``DIR/runs/*.json`` (a stopped sweep continues); the tables go
between the markers of ``docs/sega-sweep.md`` (the prose around them is kept).
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

SEEDS = (1234, 4321)  # sampling.seed of the SEGA stage
# (name, overrides of the SEGA stage; {sft} is the SFT checkpoint), one factor at a time.
VARIANTS: list[tuple[str, list[str]]] = [
    ("base", []),  # the demo before this sweep: lam 1.0, identity, no z-score, sequence_sum, 3e-4
    ("lam 0.4", ["scoring.lam=0.4"]),
    ("lam 0 (control)", ["scoring.lam=0.0"]),
    ("softmax reward", ["scoring.reward=softmax"]),
    ("z-scored", ["sega.normalize_std=true"]),
    ("token_mean", ["sega.normalization=token_mean"]),
    ("lr 1e-4", ["sega.lr=1.0e-4"]),
    ("lr 1e-3", ["sega.lr=1.0e-3"]),
    ("seed brief", ["scoring.lam=0.4", "scoring.reward=softmax"]),
    ("authors' code", ["sega.normalize_std=true", "sega.normalization=token_mean"]),
    ("KL 0.1", ["sega.kl_coef=0.1", "sega.reference={sft}"]),
    ("KL 1.0", ["sega.kl_coef=1.0", "sega.reference={sft}"]),
    # second round, around the best of the first (KL 0.1)
    ("KL 0.03", ["sega.kl_coef=0.03", "sega.reference={sft}"]),
    ("KL 0.1, lam 0.4", ["sega.kl_coef=0.1", "sega.reference={sft}", "scoring.lam=0.4"]),
    ("KL 0.1, z-scored", ["sega.kl_coef=0.1", "sega.reference={sft}", "sega.normalize_std=true"]),
    ("KL 0.1, lr 1e-3", ["sega.kl_coef=0.1", "sega.reference={sft}", "sega.lr=1.0e-3"]),
]
START, END = "<!-- sweep-table:start -->", "<!-- sweep-table:end -->"
MARKER = "Final Answer:"
_AFTER_EQUALS = re.compile(r"=\s*-?\d*$")


def base_config(extra: list[str]):
    from megatron_sega.config import load_config

    return load_config(REPO / "examples/configs/demo_tiny.yaml", [
        "parallel.tp=1", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.resume=none", f"data.train={REPO / 'examples/demo_data/train.jsonl'}",
        f"data.eval={REPO / 'examples/demo_data/eval.jsonl'}", *extra])


def final_answer(text: str) -> str | None:
    return text.rsplit(MARKER, 1)[1].strip() if MARKER in text else None


def rejected_kind(chosen: str, rejected: str) -> str:
    """Which of the demo generator's four kinds of rejected answer this is (a-d)."""
    if rejected.startswith(MARKER):
        return "d" if final_answer(rejected) == final_answer(chosen) else "c"
    return "b" if rejected.split(MARKER)[0] == chosen.split(MARKER)[0] else "a"


def accuracy_by_kind(records: list[dict], pairs) -> dict[str, float]:
    kinds = {p.id: rejected_kind(p.chosen, p.rejected) for p in pairs}
    out = {}
    for kind in "abcd":
        rows = [r for r in records if kinds[r["id"]] == kind]
        out[f"accuracy_{kind}"] = sum(r["logp_chosen"] > r["logp_rejected"] for r in rows) / max(
            len(rows), 1)
    return out


def sample_diagnostics(session, rollout, scored, answers: list[str], k: int) -> dict:
    """Right final answers among the samples; rightness of each group's top candidate by the
    Eq. 1 score, by -H_final alone and by the fork term alone; the top fork token's place."""
    from megatron_sega.sega import answer_span_mask

    tok, n = session.tokenizer, rollout.num_samples
    texts = [tok.decode(rollout.response_ids[i][rollout.content_mask[i]].tolist())
             for i in range(n)]
    right = torch.tensor([final_answer(t) == answers[i // k] for i, t in enumerate(texts)])
    valid = scored.valid
    out = {"samples_right": float(right[valid].float().mean())}
    for name, key in (("score", scored.score), ("neg_h_final", -scored.h_final),
                      ("fork", scored.fork)):
        hits = groups = 0
        for g in range(n // k):
            rows = [g * k + j for j in range(k) if valid[g * k + j]]
            if len(rows) >= 2:
                hits += bool(right[max(rows, key=lambda i: float(key[i]))])
                groups += 1
        out[f"top_by_{name}_right"] = hits / max(groups, 1)
    markers = tok.marker_variants(session.config.scoring.marker)
    _, reasoning = answer_span_mask(rollout.response_ids, rollout.content_mask, markers,
                                    final_fraction=session.config.scoring.final_fraction)
    at_result = total = 0
    for i in range(n):
        if not (valid[i] and reasoning[i].any()):
            continue
        t = int(torch.where(reasoning[i], rollout.entropy[i].double(), -1.0).argmax())
        ids = rollout.response_ids[i].tolist()
        token = tok.decode(ids[t:t + 1]).strip()
        digit = bool(token) and all(c.isdigit() or c == "-" for c in token)
        at_result += digit and _AFTER_EQUALS.search(tok.decode(ids[:t])) is not None
        total += 1
    out["fork_at_result"] = at_result / max(total, 1)
    return out


def evaluate(config, checkpoint: Path, prompts: int) -> dict:
    from megatron_sega.data import read_pairs
    from megatron_sega.training.evaluate import evaluate_pairs, load_eval_pairs
    from megatron_sega.training.rollouts import (
        load_prompts, make_sampler, sampling_params, score_rollout,
    )
    from megatron_sega.training.session import open_session

    session = open_session(config.with_overrides(f"model.load={checkpoint}"), train=False)
    records, summary = evaluate_pairs(session, load_eval_pairs(session, config.data.eval),
                                      beta=config.eval.beta,
                                      micro_batch_size=config.eval.micro_batch_size)
    raw, _ = read_pairs(config.data.eval)
    k = config.sega.k
    chosen = load_prompts(session, config.data.eval)[:prompts]
    # the sample ids of training.sega.mean_entropy_score: the demo's score of these prompts
    rollout = make_sampler(session).generate(
        [p.prompt_ids for p in chosen for _ in range(k)], sampling_params(session),
        [g * k + j for g in range(len(chosen)) for j in range(k)], session.tokenizer.decode)
    scored = score_rollout(session, rollout, k)
    v = scored.valid
    by_id = {p.id: p for p in raw}
    answers = [final_answer(by_id[p.id].chosen) for p in chosen]
    return {"accuracy": summary["accuracy"],
            "accuracy_length_normalized": summary["accuracy_length_normalized"],
            "logp_chosen": summary["mean_logp_chosen"],
            "logp_rejected": summary["mean_logp_rejected"],
            **accuracy_by_kind(records, raw),
            "score": float(scored.score[v].mean()), "neg_h_final": float(-scored.h_final[v].mean()),
            "fork": float(scored.fork[v].mean()), "valid": float(v.float().mean()),
            "response_length": float(rollout.lengths.float().mean()),
            **sample_diagnostics(session, rollout, scored, answers, k)}


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
        wall = time.time() - t0
        return {"wall_s": wall, **evaluate(config, out / "sft" / "ckpt", prompts)}

    return cached(out / "runs" / "sft.json", make)


def run_sega_variant(config, out: Path, prompts: int, name: str, overrides: list[str],
                     seed: int) -> dict:
    from megatron_sega.training.sega import run_sega

    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + f"_seed{seed}"
    sft_ckpt = out / "sft" / "ckpt"

    def make():
        directory = out / slug
        t0 = time.time()
        status = run_sega(config.with_overrides(
            f"model.load={sft_ckpt}", f"logging.dir={directory}",
            f"checkpoint.save_dir={directory / 'ckpt'}", f"sampling.seed={seed}",
            *(o.format(sft=sft_ckpt) for o in overrides)), None)
        wall = time.time() - t0
        return {"status": status, "wall_s": wall,
                **evaluate(config, directory / "ckpt", prompts)}

    return cached(out / "runs" / f"{slug}.json", make)


def _mean(runs: list[dict]) -> dict:
    return {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]
            if isinstance(runs[0][key], (int, float))}


def tables(sft: dict, variants: list[tuple[str, list[str], list[dict]]]) -> str:
    main = ["| run | change (SEGA stage) | accuracy: mean (per seed), vs SFT | length-normalised "
            "(vs SFT) | logp chosen / rejected | score (lam 1) | -H_final | fork | "
            "response length | wall s |", "|" + "---|" * 10]
    why = ["| run | accuracy (a) wrong result / (b) wrong final / (c) only wrong final / "
           "(d) only right final | samples right | top by score / -H_final / fork right | "
           "top fork token at the result |", "|---|---|---|---|---|"]

    def rows(name, change, r, per_seed):
        acc = f"{r['accuracy']:.3f}"
        if per_seed:
            acc += " (" + ", ".join(f"{p['accuracy']:.3f}" for p in per_seed) + ")"
            acc += f", {r['accuracy'] - sft['accuracy']:+.3f}"
        norm = f"{r['accuracy_length_normalized']:.3f}"
        if per_seed:
            norm += f" ({r['accuracy_length_normalized'] - sft['accuracy_length_normalized']:+.3f})"
        main.append(f"| {name} | {change} | {acc} | {norm} | {r['logp_chosen']:.2f} / "
                    f"{r['logp_rejected']:.2f} | {r['score']:.3f} | {r['neg_h_final']:.3f} | "
                    f"{r['fork']:.3f} | {r['response_length']:.1f} | {r['wall_s']:.0f} |")
        kinds = " / ".join(f"{r[f'accuracy_{k}']:.2f}" for k in "abcd")
        tops = " / ".join(f"{r[f'top_by_{k}_right']:.2f}" for k in ("score", "neg_h_final",
                                                                     "fork"))
        why.append(f"| {name} | {kinds} | {r['samples_right']:.2f} | {tops} | "
                   f"{r['fork_at_result']:.2f} |")

    rows("SFT", "(the start of every run)", sft, None)
    for name, overrides, per_seed in variants:
        change = ", ".join(f"`{o.replace('{sft}', 'SFT')}`" for o in overrides) or "none"
        rows(name, change, _mean(per_seed), per_seed)
    return "\n".join(main) + "\n\n" + "\n".join(why)


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
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="sampling seeds per variant")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="for every stage (e.g. sega.steps=3 for a rehearsal)")
    args = parser.parse_args(argv)
    from megatron_sega.cli import _quiet_megatron

    _quiet_megatron()
    config, out = base_config(args.overrides), Path(args.out)
    sft = run_sft(config, out, args.prompts)
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    done = []
    for name, overrides in VARIANTS:
        if wanted and name not in wanted:
            continue
        per_seed = [run_sega_variant(config, out, args.prompts, name, overrides, seed)
                    for seed in SEEDS[:args.seeds]]
        done.append((name, overrides, per_seed))
        print(f"[{name}] accuracy {_mean(per_seed)['accuracy']:.3f} "
              f"(SFT {sft['accuracy']:.3f}), score {_mean(per_seed)['score']:.3f}", flush=True)
    text = tables(sft, done)
    write_doc(Path(args.doc), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
