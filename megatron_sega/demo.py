"""``megatron-sega demo``: the whole pipeline on the tiny model and the shipped data.

eval (initial weights) -> SFT -> eval -> SEGA -> eval, each stage a real run of the same code
the CLI runs (checkpoints, metrics, progress bars), ending in a summary table and a PNG of the
training curves under ``--out`` (default ``outputs/demo``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_sega.config import Config


def _evaluate(config: Config, out: Path, name: str, score_prompts: int) -> dict:
    """Preference accuracy of the configured model, plus the mean Eq. 1 score of samples."""
    from megatron_sega.training.evaluate import evaluate_pairs, load_eval_pairs, write_eval_outputs
    from megatron_sega.training.sega import load_prompts, mean_entropy_score
    from megatron_sega.training.session import open_session

    session = open_session(config, train=False)
    pairs = load_eval_pairs(session, config.data.eval)
    records, summary = evaluate_pairs(session, pairs, beta=config.eval.beta,
                                      micro_batch_size=config.eval.micro_batch_size)
    prompts = load_prompts(session, config.data.eval)[:score_prompts]
    summary["entropy_score"] = mean_entropy_score(session, prompts)
    if session.is_main:
        write_eval_outputs(out / f"eval_{name}", records, summary)
        print(f"[{name}] preference accuracy {summary['accuracy']:.3f} "
              f"(length-normalised {summary['accuracy_length_normalized']:.3f}), "
              f"mean entropy score {summary['entropy_score']:.3f}", flush=True)
    return summary


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = _read_jsonl(out / "sft" / "sft_metrics.jsonl")
    sega = _read_jsonl(out / "sega" / "sega_metrics.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[0].set(title="SFT loss (response NLL / token)", xlabel="step")
    axes[1].plot([r["step"] for r in sega], [r["score_mean"] for r in sega], label="score (Eq. 1)")
    axes[1].plot([r["step"] for r in sega], [-r["h_final_mean"] for r in sega], label="-H_final")
    axes[1].set(title="SEGA entropy score", xlabel="step")
    axes[1].legend()
    axes[2].plot([r["step"] for r in sega], [r["loss"] for r in sega])
    axes[2].set(title="SEGA loss (Eq. 2)", xlabel="step")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_table(results: dict[str, dict]) -> str:
    lines = ["| stage | preference accuracy | length-normalised | mean entropy score |",
             "|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['accuracy']:.3f} | {s['accuracy_length_normalized']:.3f} | "
                     f"{s['entropy_score']:.3f} |")
    return "\n".join(lines)


def run_demo(config: Config, args) -> int:
    from megatron_sega.training.sega import run_sega
    from megatron_sega.training.sft import run_sft

    from megatron_sega.config import STAGES
    from megatron_sega.training.session import preflight

    preflight(config, *STAGES)
    out = Path(args.out or "outputs/demo")
    quick = bool(args.quick)
    base = config.with_overrides("checkpoint.resume=none")
    if quick:
        base = base.with_overrides("sft.steps=20", "sft.eval_interval=0", "sega.steps=3",
                      "sampling.max_new_tokens=24")
    score_prompts = 8 if quick else 32
    start = time.time()
    results = {"initial": _evaluate(base, out, "initial", score_prompts)}

    sft_dir = out / "sft"
    sft_cfg = base.with_overrides(f"logging.dir={sft_dir}", f"checkpoint.save_dir={sft_dir / 'ckpt'}")
    run_sft(sft_cfg, args)
    after_sft = base.with_overrides(f"model.load={sft_dir / 'ckpt'}")
    results["after SFT"] = _evaluate(after_sft, out, "sft", score_prompts)

    sega_dir = out / "sega"
    sega_cfg = after_sft.with_overrides(f"logging.dir={sega_dir}",
                      f"checkpoint.save_dir={sega_dir / 'ckpt'}")
    status = run_sega(sega_cfg, args)
    if status:
        return status
    results["after SEGA"] = _evaluate(base.with_overrides(f"model.load={sega_dir / 'ckpt'}"), out,
                                      "sega", score_prompts)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        png = plot_curves(out)
        table = summary_table(results)
        (out / "summary.md").write_text(table + "\n")
        (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
        print("\n" + table)
        print(f"\ncurves: {png}\noutputs: {out} ({time.time() - start:.0f} s)", flush=True)
    return 0
