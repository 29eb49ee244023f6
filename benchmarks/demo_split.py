"""The CPU demo's SEGA step time split, this tree against another checkout, in one run.

    python -m benchmarks.demo_split --baseline-tree /path/to/old/checkout

Runs ``bash scripts/demo.sh`` (the tiny model, TP=2, 30 SEGA steps) in the baseline tree, then
in this one, each into a fresh output folder, one after the other, and reads the SEGA stage's
``sega_metrics.jsonl``: per step, ``time_sample`` (rollout generation), ``time_score`` (Eq. 1
scoring) and ``time_train`` (the update), mean and median over the 30 steps. It also records
the final preference accuracies of both, which must agree when the sampler's tokens do.
Not part of ``python -m benchmarks`` (it needs a second checkout)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("time_sample", "time_score", "time_train")  # per step ("time" is cumulative)


def run_demo(tree: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    start = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/demo.sh", "--out", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"demo in {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "sega/sega_metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"tree": str(tree), "wall_s": wall, "steps": len(rows),
            "mean_s": {k: statistics.mean(r[k] for r in rows) for k in PARTS},
            "median_s": {k: statistics.median(r[k] for r in rows) for k in PARTS},
            "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", required=True, type=Path)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/demo_split.json"))
    args = parser.parse_args()
    git = ["git", "rev-parse", "--short", "HEAD"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, tree in (("baseline", args.baseline_tree.resolve()), ("ours", REPO)):
            result = run_demo(tree, Path(tmp) / name)
            result["commit"] = subprocess.run(git, cwd=tree, capture_output=True,
                                              text=True).stdout.strip()
            runs[name] = result
    ratio = runs["baseline"]["mean_s"]["time_sample"] / runs["ours"]["mean_s"]["time_sample"]
    record = {"meta": {"note": __doc__, "cpus": os.cpu_count()}, "runs": runs,
              "time_sample_baseline_over_ours": ratio}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    for name, run in runs.items():
        m = run["mean_s"]
        print(f"{name} ({run['commit']}): sample {m['time_sample']:.3f} s, score "
              f"{m['time_score']:.4f} s, train {m['time_train']:.3f} s (means per SEGA step)")
    print(f"time_sample: {ratio:.2f}x lower than the baseline")


if __name__ == "__main__":
    main()
