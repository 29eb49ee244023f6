"""Run every benchmark and collect the figures.

    python -m benchmarks                 # all, CPU-sized (about 10 minutes on 2 cores)
    python -m benchmarks --only sampler  # one of: vocab_parallel, sampler, convert, train_step, lora,
                                         # packing

Each benchmark runs in a fresh subprocess (so memory figures are its own) and writes
``benchmarks/results/NAME.json``; this collects them into ``benchmarks/results.json`` and a
markdown table in ``benchmarks/RESULTS.md``, which the README's performance section quotes.
Every figure is a ratio against a baseline measured in the same run (or, on a GPU, an absolute
rate on the named device).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

BENCHMARKS = {
    "vocab_parallel": ["-m", "benchmarks.vocab_parallel"],
    "sampler": ["-m", "benchmarks.sampler"],
    "convert": ["-m", "benchmarks.convert"],
    "train_step": ["-m", "benchmarks.train_step"],
    "lora": ["-m", "benchmarks.lora"],
    "packing": ["-m", "benchmarks.packing"],
}


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def sampler_rate(row: dict) -> tuple[float, str]:
    """A sampler-benchmark decoder's tokens/s on the clock its speed-ups use (``speedup_clock``),
    and that figure's name: process CPU time on CPU, synchronized wall time on a GPU, where the
    process CPU time only sees the host queueing kernels. Rows written before the clock was
    recorded are CPU figures."""
    if row.get("speedup_clock", "cpu") == "wall":
        return row["tokens_per_s_wall"], "tokens per second (wall, synchronized)"
    return row["tokens_per_cpu_s"], "tokens per CPU-second"


def table(results: dict) -> str:
    rows = ["| benchmark | figure | value | baseline (same run) |", "|---|---|---|---|"]
    vp = results.get("vocab_parallel") or {}
    by = {(r["op"], r["method"], r["tp"]): r for r in vp.get("results", [])}
    for (op, method, tp), ours in sorted(by.items()):
        if method != "ours" or (op, "gather", tp) not in by:
            continue
        gather = by[(op, "gather", tp)]
        rows.append(f"| vocab-parallel {op}, TP={tp} | bytes sent per token | "
                    f"{_fmt(ours['sent_bytes_per_token'])} "
                    f"({gather['sent_bytes_per_token'] / max(ours['sent_bytes_per_token'], 1e-9):.0f}x"
                    f" fewer) | all-gather {_fmt(gather['sent_bytes_per_token'])} |")
        rows.append(f"| vocab-parallel {op}, TP={tp} | peak temporary memory | "
                    f"{ours['peak_temp_bytes'] / 2**20:.1f} MiB "
                    f"({ours['peak_temp_bytes'] / gather['peak_temp_bytes']:.2f} of gather) | "
                    f"{gather['peak_temp_bytes'] / 2**20:.1f} MiB |")
        if "collectives" in ours:
            fallback = ours.get("fallback_rate")
            rows.append(f"| vocab-parallel {op}, TP={tp} | wall time (best of 3), collectives"
                        f"{', fallback rows' if fallback is not None else ''} | "
                        f"{ours['seconds']:.3f} s "
                        f"({gather['seconds'] / max(ours['seconds'], 1e-9):.2f}x faster), "
                        f"{ours['collectives']}"
                        f"{'' if fallback is None else f', {fallback:.1%}'} | "
                        f"all-gather {gather['seconds']:.3f} s, {gather['collectives']} |")
    sampler = results.get("sampler") or {}
    decoders = {r["decoder"]: r for r in sampler.get("results", [])}
    ours = decoders.get("sampler")
    cfg = sampler.get("config", {})
    for name, label in (("hf_generate", "transformers generate (KV cache)"),
                        ("sampler_megatron", "the sampler on Megatron-Core's forward"),
                        ("no_cache", "no-cache recompute")):
        if ours and name in decoders:
            (rate, unit), (base, _) = sampler_rate(ours), sampler_rate(decoders[name])
            rows.append(
                f"| sampler ({sampler.get('device')}, batch {cfg.get('batch')}, "
                f"{cfg.get('new')} new tokens) | {unit} vs {label} | "
                f"{rate:.0f} ({rate / base:.2f}x) | {base:.0f} |")
    tp2 = sampler.get("tp2_demo") or {}
    for name, run in (tp2.get("runs") or {}).items():
        rows.append(
            f"| sampler TP=2, demo model, {tp2['rows']} rows, T=1 p=0.95 ({name}) | per decode "
            f"step: forward / sampling / bookkeeping | {run['forward_ms']:.1f} / "
            f"{run['sampling_ms']:.1f} / {run['bookkeeping_ms']:.2f} ms; collectives "
            f"{run['sampling_collectives_per_step']:.2f} sampling + "
            f"{run['forward_collectives_per_step']:.0f} forward; fallback "
            f"{run['fallback_rate']:.1%} | host wall time |")
    conv = results.get("convert") or {}
    for direction, run in (conv.get("runs") or {}).items():
        rows.append(f"| convert {direction} ({conv.get('checkpoint_bytes', 0) / 1e9:.2f} GB) | "
                    f"peak RSS / checkpoint size | {_fmt(run.get('ratio'), '.2f')} "
                    f"({_fmt(run.get('wall_s'), '.1f')} s) | interpreter baseline subtracted |")
    train = results.get("train_step") or {}
    if train:
        rows.append(f"| training step ({train.get('device')}, {train.get('layers')} layers, hidden "
                    f"{train.get('hidden')}, seq {train.get('seq')}) | tokens/s | "
                    f"{_fmt(train.get('ours_tokens_per_s'), '.0f')} "
                    f"({_fmt(train.get('ratio_vs_transformers'), '.2f')}x) | transformers "
                    f"{_fmt(train.get('transformers_tokens_per_s'), '.0f')} |")
        if train.get("mfu") is not None:
            rows.append(f"| training step ({train['device']}) | MFU | {train['mfu']:.1%} | "
                        f"peak {train['peak_tflops']} TFLOP/s |")
    rows.extend(lora_rows(results.get("lora") or {}))
    rows.extend(packing_rows(results.get("packing") or {}))
    return "\n".join(rows)


def packing_rows(packing: dict) -> list[str]:
    """The packing benchmark's rows: per stage, packed against padded tokens/s, with the padding
    fraction of each and the step-time ratio."""
    rows = []
    for stage, label in (("sft", "SFT step"), ("dpo", "DPO step"), ("sega", "SEGA update")):
        run = packing.get(stage)
        if not run:
            continue
        padded, packed = run["padded"], run["packed"]
        cpu = run.get("clock") == "cpu"
        rate = "tokens_per_cpu_s" if cpu else "tokens_per_s"
        unit = "tokens per CPU-second" if cpu else "tokens/s"
        where = f"{packing['device']}, real data{', SEGA rollout' if stage == 'sega' else ''}"
        rows.append(
            f"| packing, {label} ({where}) | {unit} packed; padding fraction; step time | "
            f"{packed[rate]:.0f} ({run['tokens_per_s_ratio']:.2f}x); "
            f"{packed['padding_fraction']:.1%} (was {padded['padding_fraction']:.1%}); "
            f"{run['step_time_ratio']:.2f} of padded | padded {padded[rate]:.0f} |")
    return rows


def lora_rows(lora: dict) -> list[str]:
    """The LoRA benchmark's rows: training state and trainable parameters of the 8B shape, and
    the CPU step time, each LoRA against full training."""
    if not lora:
        return []
    full, ours, ratio = lora["full"], lora["lora_counts"], lora["ratios_lora_over_full"]
    name = f"LoRA rank {lora['lora']['rank']}, Llama-3-8B shape, bf16, one rank"
    gib = 2**30
    step = lora["step_time"]
    return [
        f"| {name} | training state (weights + grads + optimizer), counted from the built "
        f"objects | {ours['training_state_bytes'] / gib:.1f} GiB "
        f"({ratio['training_state_bytes']:.3f} of full) | full "
        f"{full['training_state_bytes'] / gib:.1f} GiB |",
        f"| {name} | grads + optimizer state | "
        f"{(ours['grads_bytes'] + ours['optimizer_bytes']) / gib:.2f} GiB | full "
        f"{(full['grads_bytes'] + full['optimizer_bytes']) / gib:.1f} GiB |",
        f"| {name} | trainable parameters | {ours['trainable_parameters'] / 1e6:.1f} M "
        f"({ratio['trainable_parameters']:.2%}) | full {full['trainable_parameters'] / 1e9:.2f} B |",
        f"| LoRA SFT step ({step['device']}, {step['model']}) | seconds per step | "
        f"{step['seconds_per_step']['lora']:.3f} ({step['ratio_lora_over_full']:.2f} of full) | "
        f"full {step['seconds_per_step']['full']:.3f} |",
    ]


def update_readme(markdown: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    marker = "<!-- results -->"
    if marker in text:
        head = text.split(marker)[0]
        readme.write_text(head + marker + "\n" + markdown + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per benchmark")
    args = parser.parse_args(argv)
    status = {}
    for name in args.only or BENCHMARKS:
        start = time.time()
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, *BENCHMARKS[name]], cwd=REPO,
                              timeout=args.timeout)
        status[name] = {"returncode": proc.returncode, "wall_s": round(time.time() - start, 1)}
    results = {name: _load(name) for name in BENCHMARKS}
    summary = {"status": status, "results": results}
    (REPO / "benchmarks" / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = table(results)
    (REPO / "benchmarks" / "RESULTS.md").write_text(
        "# Benchmark results\n\nWritten by `python -m benchmarks`; see the scripts for methods.\n\n"
        + markdown + "\n")
    update_readme(markdown)
    print(markdown)
    return 0 if all(s["returncode"] == 0 for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
