"""``megatron-sega demo``: the whole pipeline on shipped data, each stage a real run of the code
the CLI runs (checkpoints, metrics, progress bars), ending in a side-by-side table and a PNG of
the training curves under ``--out`` (default ``outputs/demo``).

    eval (start) -> SFT -> eval -> SEGA (from SFT) -> eval [-> DPO (from SFT) -> eval]

Two configs ship: ``examples/configs/demo_tiny.yaml`` (the tiny random-init model, ``bash
scripts/demo.sh``) and ``examples/configs/demo_smollm2.yaml`` (SmolLM2-135M-Instruct,
``bash scripts/demo.sh --model smollm2-135m``). The DPO stage runs when this version has the
``megatron-sega dpo`` command and the demo config sets DPO up: a top-level ``dpo:`` section in
the config file, or a ``<config>_dpo.yaml`` next to it holding that section. Without the
command it is skipped with a message, and the table has no DPO row.

Every evaluation reports preference accuracy on the held-out pairs (summed and length-normalised
log-probs, each with its 95% Wilson interval) and the mean Eq. 1 score of ``sega.k`` samples for
the first eval prompts (as many as four SEGA steps see, at most 32); the table also gives the
wall time of each training stage and of each evaluation.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import yaml

from megatron_sega.config import Config, load_config


def _evaluate(config: Config, out: Path, name: str, score_prompts: int) -> dict:
    """Preference accuracy of the configured model, plus the mean Eq. 1 score of samples."""
    from megatron_sega.training.evaluate import evaluate_pairs, load_eval_pairs, write_eval_outputs
    from megatron_sega.training.rollouts import load_prompts, mean_entropy_score
    from megatron_sega.training.session import open_session

    start = time.time()
    session = open_session(config, train=False)
    pairs = load_eval_pairs(session, config.data.eval, config.data.eval_split)
    records, summary = evaluate_pairs(session, pairs, beta=config.eval.beta,
                                      micro_batch_size=config.eval.micro_batch_size,
                                      ties=config.eval.ties,
                                      bootstrap_samples=config.eval.bootstrap_samples)
    prompts = load_prompts(session, config.data.eval, config.data.eval_split)[:score_prompts]
    summary["entropy_score"] = mean_entropy_score(session, prompts)
    summary["eval_time_s"] = time.time() - start
    if session.is_main:
        write_eval_outputs(out / f"eval_{name}", records, summary)
        print(f"[{name}] preference accuracy {accuracy_cell(summary, 'accuracy')} "
              f"(length-normalised {accuracy_cell(summary, 'accuracy_length_normalized')}), "
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
    dpo = _read_jsonl(out / "dpo" / "dpo_metrics.jsonl")
    evals = [r for r in sega if "eval_accuracy" in r]  # sega.eval_interval's steps
    panels = 3 + bool(dpo) + bool(evals)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4))
    axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[0].set(title="SFT loss (response NLL / token)", xlabel="step")
    steps = [r["step"] for r in sega]
    axes[1].plot(steps, [r["score_mean"] for r in sega], label="score (Eq. 1)")
    axes[1].plot(steps, [-r["h_final_mean"] for r in sega], label="-H_final")
    axes[1].plot(steps, [r["fork_entropy_mean"] for r in sega], label="fork entropy")
    axes[1].set(title="SEGA: Eq. 1 score of the samples", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, [r["loss"] for r in sega])
    axes[2].set(title="SEGA loss (Eq. 2)", xlabel="step")
    if dpo:
        axes[3].plot([r["step"] for r in dpo], [r["loss"] for r in dpo])
        axes[3].set(title="DPO loss", xlabel="step")
    if evals:
        plot_eval_curves(axes[-1], evals)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# metrics key -> label of the held-out curves (sega.eval_interval; answers with eval.answer_samples)
EVAL_CURVES = {"eval_accuracy": "preference accuracy",
               "eval_answer_accuracy_greedy": "answer accuracy, greedy",
               "eval_answer_accuracy_sampled": "answer accuracy, sampled"}


def plot_eval_curves(ax, rows: list[dict]) -> None:
    """The held-out accuracies a stage logged at its evaluation steps, on one axis."""
    steps = [r["step"] for r in rows]
    for key, label in EVAL_CURVES.items():
        if any(r.get(key) is not None for r in rows):
            ax.plot(steps, [r.get(key) for r in rows], marker="o", label=label)
    ax.set(title="SEGA: held-out accuracy (data.eval)", xlabel="step", ylim=(0, 1))
    ax.legend()


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def accuracy_cell(summary: dict, name: str) -> str:
    """``0.750 [0.678, 0.811]``: an accuracy and its 95% interval (none in an older summary)."""
    interval = summary.get(f"{name}_ci95")
    cell = f"{summary[name]:.3f}"
    return cell if interval is None else cell + f" [{interval[0]:.3f}, {interval[1]:.3f}]"


def summary_table(results: dict[str, dict]) -> str:
    lines = ["| stage | preference accuracy [95% CI] | length-normalised [95% CI] | "
             "mean entropy score | training wall time (s) | eval wall time (s) |",
             "|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {accuracy_cell(s, 'accuracy')} | "
                     f"{accuracy_cell(s, 'accuracy_length_normalized')} | "
                     f"{s['entropy_score']:.3f} | {_cell(s.get('train_time_s'))} | "
                     f"{_cell(s.get('eval_time_s'))} |")
    return "\n".join(lines)


def dpo_settings(config_path: Optional[str]) -> Optional[Path]:
    """The file holding the demo's ``dpo:`` section (the config itself or ``<config>_dpo.yaml``),
    or None when this demo has no DPO stage."""
    if not config_path:
        return None
    path = Path(config_path)
    overlay = path.with_name(f"{path.stem}_dpo.yaml")
    if overlay.is_file():
        return overlay
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    return path if isinstance(loaded, dict) and "dpo" in loaded else None


def _command(name: str):
    """The function of CLI subcommand ``name`` (the demo runs each stage as its command), or
    None when this version has no such command."""
    from megatron_sega.cli import COMMANDS

    if name not in COMMANDS:
        return None
    module, function, _ = COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        return None


class _StageFailed(Exception):
    """A training stage returned a non-zero status (it has printed why)."""


def _run_dpo(after_sft: Config, args, out: Path, log) -> Optional[Path]:
    """DPO from the SFT checkpoint (reference: the SFT weights); the checkpoint, or None."""
    settings = dpo_settings(getattr(args, "config", None))
    if settings is None:
        return None
    run_dpo = _command("dpo")
    if run_dpo is None:
        log("[dpo] skipped: this version has no `megatron-sega dpo` command; the table has no "
            "DPO row (rerun the demo on a version that has it)")
        return None
    # The file's dpo: section, then the command line's dpo.* overrides on top of it.
    overrides = [o for o in getattr(args, "overrides", []) if o.startswith("dpo.")]
    config = load_config(settings, overrides, base=after_sft.to_dict())
    directory = out / "dpo"
    status = run_dpo(config.with_overrides(f"logging.dir={directory}",
                                           f"checkpoint.save_dir={directory / 'ckpt'}"), args)
    if status:
        raise _StageFailed(status)
    return directory / "ckpt"


def run_demo(config: Config, args) -> int:
    import torch.distributed as dist

    from megatron_sega.config import STAGES
    from megatron_sega.training.session import preflight

    preflight(config, *STAGES)
    run_sft, run_sega = _command("sft"), _command("sega")
    out = Path(args.out or "outputs/demo")
    quick = bool(args.quick)
    base = config.with_overrides("checkpoint.resume=none")
    if quick:
        base = base.with_overrides("sft.steps=20", "sft.eval_interval=0", "sega.steps=3",
                                   "sampling.max_new_tokens=24")
    # The Eq. 1 score of an evaluation samples k candidates for as many prompts as four SEGA
    # steps see (at most 32): its cost stays a small multiple of a SEGA step's rollout.
    score_prompts = 8 if quick else min(32, 4 * base.sega.prompts_per_step)
    start = time.time()

    def log(text: str) -> None:
        if dist.get_rank() == 0:
            print(text, flush=True)

    def stage(name: str, train, ckpt: Path) -> dict:
        """Run a training stage (timed), then evaluate its checkpoint."""
        t0 = time.time()
        status = train()
        if status:
            raise _StageFailed(status)
        seconds = time.time() - t0
        summary = _evaluate(base.with_overrides(f"model.load={ckpt}"), out, name, score_prompts)
        summary["train_time_s"] = seconds
        return summary

    results = {"initial": _evaluate(base, out, "initial", score_prompts)}
    sft_dir, sega_dir = out / "sft", out / "sega"
    after_sft = base.with_overrides(f"model.load={sft_dir / 'ckpt'}")
    # Every demo starts from scratch (checkpoint.resume=none): a rerun replaces the previous
    # demo's checkpoints under --out, which a fresh start would otherwise refuse to overwrite.
    if dist.get_rank() == 0:
        for stage_dir in (sft_dir, sega_dir, out / "dpo"):
            shutil.rmtree(stage_dir / "ckpt", ignore_errors=True)
    dist.barrier()
    try:
        results["after SFT"] = stage("sft", lambda: run_sft(base.with_overrides(
            f"logging.dir={sft_dir}", f"checkpoint.save_dir={sft_dir / 'ckpt'}"), args),
            sft_dir / "ckpt")
        results["after SEGA"] = stage("sega", lambda: run_sega(after_sft.with_overrides(
            f"logging.dir={sega_dir}", f"checkpoint.save_dir={sega_dir / 'ckpt'}"), args),
            sega_dir / "ckpt")
        t0 = time.time()
        dpo_ckpt = _run_dpo(after_sft, args, out, log)
        if dpo_ckpt is not None:
            seconds = time.time() - t0
            results["after DPO"] = _evaluate(base.with_overrides(f"model.load={dpo_ckpt}"), out,
                                             "dpo", score_prompts)
            results["after DPO"]["train_time_s"] = seconds
    except _StageFailed as failed:
        return int(failed.args[0])

    if dist.get_rank() == 0:
        png = plot_curves(out)
        table = summary_table(results)
        total = time.time() - start
        (out / "summary.md").write_text(table + f"\n\ntotal wall time {total:.0f} s\n")
        (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
        print("\n" + table)
        print(f"\ncurves: {png}\noutputs: {out} ({total:.0f} s)", flush=True)
    return 0
