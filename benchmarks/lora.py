"""LoRA against full-parameter training (issue 21): trainable parameters and bytes of training
state on the Llama-3-8B shape, counted from the built objects; and the CPU step-time ratio.

    python -m benchmarks.lora                  (CPU, about 3 minutes and 14 GB of memory)

Training state: what ``build_training_model`` + ``build_optimizer`` hold in bf16 on one rank
(TP = PP = DP = 1, Megatron's distributed optimizer), as a run builds them: the weights (every
parameter, frozen base included), the gradient buffers (DDP's fp32 ``grad_data``) and the
optimizer state (Adam's moments and the fp32 main copies: ``optimizer_state_bytes``). Each count
is read off the objects, never computed from a formula.

The 8B shape does not fit this machine for full training (about 16 bytes a parameter), so the
objects are built at the real widths (hidden 4096, FFN 14336, 32 heads, 8 KV groups) with few
layers and a cut vocabulary: 1 layer and ``V`` rows, 2 layers and ``V`` rows, 1 layer and ``2V``
rows. Every count is then ``fixed + per_layer * layers + per_row * rows`` (per_layer from the
first two builds, per_row from the first and the third), extrapolated to 32 layers and 128,256
rows. DDP pads each gradient bucket to a multiple of 128 elements, so the extrapolation may be
off by that padding, a few hundred bytes against gigabytes.

Step time: one SFT step of the project (``benchmarks.train_step``'s stage steps, fp32 on CPU) on
a small model with and without rank-16 adapters, same run, best of 3 alternating rounds; the
ratio LoRA / full.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COUNTS = ("trainable_parameters", "weights_bytes", "grads_bytes", "optimizer_bytes")


def built_counts(spec, lora) -> dict[str, int]:
    """The trainable parameters and the bytes of weights, gradients and optimizer state of
    ``spec`` as built for bf16 training on one CPU rank, with ``lora`` adapters (or none)."""
    from megatron_sega import runtime
    from megatron_sega.config import OptimConfig
    from megatron_sega.training.engine import (
        build_optimizer, build_training_model, optimizer_state_bytes,
    )

    rt = runtime.setup(1, 1, device="cpu")
    chunks = build_training_model(spec, rt, torch.bfloat16, lora=lora)
    optimizer, _ = build_optimizer(chunks, OptimConfig(), total_steps=10, dtype=torch.bfloat16)
    params = [p for c in chunks for p in c.parameters()]
    counts = {
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        "grads_bytes": sum(b.grad_data.numel() * b.grad_data.element_size()
                           for c in chunks for b in c.buffers),
        "optimizer_bytes": optimizer_state_bytes(optimizer),
    }
    del chunks, optimizer, params
    runtime.teardown()
    gc.collect()
    return counts


def extrapolate(one: dict, two: dict, wide: dict, rows: int, layers: int, vocab: int) -> dict:
    """Each count at ``layers`` layers and ``vocab`` rows from builds of (1 layer, ``rows``),
    (2 layers, ``rows``) and (1 layer, 2 ``rows``): linear in both."""
    out = {}
    for key in COUNTS:
        per_layer = two[key] - one[key]
        per_row = (wide[key] - one[key]) / rows
        out[key] = round(one[key] + per_layer * (layers - 1) + per_row * (vocab - rows))
    return out


def training_state(target, rows: int, lora) -> dict:
    """The counts of the ``target`` shape (LoRA ``lora`` or full) from three cut builds."""
    from dataclasses import replace

    builds = [built_counts(replace(target, num_layers=n, vocab_size=v), lora)
              for n, v in ((1, rows), (2, rows), (1, 2 * rows))]
    counts = extrapolate(*builds, rows, target.num_layers, target.padded_vocab_size(1))
    counts["training_state_bytes"] = sum(counts[k] for k in COUNTS[1:])
    counts["built"] = dict(zip(("1_layer", "2_layers", "1_layer_2x_rows"), builds))
    return counts


def step_times(args) -> dict:
    """Seconds per SFT step on the small model, full and LoRA: the best of ``--rounds`` rounds
    that alternate the two (each round a fresh session, one warm-up step, then ``--steps``), so
    that a slow spell of this shared machine does not land on one side only."""
    from benchmarks.train_step import model_spec, run_stages

    seen: dict[str, list[float]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for rank in (0, args.rank):
            ns = argparse.Namespace(preset="tiny", layers=args.small_layers,
                                    hidden=args.small_hidden, vocab=8000, seq=args.seq,
                                    batch=args.batch, micro_batch=args.batch, steps=args.steps,
                                    dtype="fp32", stage=["sft"], lora_rank=rank)
            sec = run_stages(model_spec(ns), ns)["sft"]["seconds_per_step"]
            seen["lora" if rank else "full"].append(sec)
    return {"best": {k: min(v) for k, v in seen.items()}, "all": seen}


def main(argv=None) -> dict:
    from megatron_sega.models import preset
    from megatron_sega.models.lora import LoraSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rows", type=int, default=4096, help="vocabulary rows of the cut builds")
    p.add_argument("--small-layers", type=int, default=4, help="step-time model: layers")
    p.add_argument("--small-hidden", type=int, default=512, help="step-time model: hidden size")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="step-time rounds (best of)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/lora.json")
    args = p.parse_args(argv)

    target = preset("llama3-8b")
    lora = LoraSettings(args.rank, 2.0 * args.rank)
    full = training_state(target, args.rows, None)
    adapters = training_state(target, args.rows, lora)
    times = step_times(args)
    result = {
        "shape": "llama3-8b (32 layers, hidden 4096, ffn 14336, vocab 128256), bf16, "
                 "tp=pp=dp=1, distributed optimizer",
        "lora": {"rank": args.rank, "alpha": 2.0 * args.rank, "targets": list(lora.targets)},
        "method": f"built at 1 and 2 layers x {args.rows} rows and 1 layer x {2 * args.rows} "
                  "rows at the real widths, extrapolated linearly to 32 layers, 128256 rows",
        "full": full, "lora_counts": adapters,
        "ratios_lora_over_full": {k: adapters[k] / full[k]
                                  for k in (*COUNTS, "training_state_bytes")},
        "step_time": {"model": f"tiny preset, {args.small_layers} layers, hidden "
                               f"{args.small_hidden}, fp32, seq {args.seq}, batch {args.batch}",
                      "seconds_per_step": times["best"], "every_round": times["all"],
                      "ratio_lora_over_full": times["best"]["lora"] / times["best"]["full"],
                      "device": "cpu", "threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    for name, c in (("full", full), (f"LoRA rank {args.rank}", adapters)):
        print(f"figure: 8B training state, {name}: {c['trainable_parameters']:,} trainable "
              f"parameters; weights {c['weights_bytes'] / gib:.2f} GiB, grads "
              f"{c['grads_bytes'] / gib:.3f} GiB, optimizer {c['optimizer_bytes'] / gib:.3f} GiB, "
              f"total {c['training_state_bytes'] / gib:.2f} GiB", flush=True)
    print(f"figure: LoRA / full: training state {result['ratios_lora_over_full']['training_state_bytes']:.3f}"
          f", trainable parameters {result['ratios_lora_over_full']['trainable_parameters']:.4f}; "
          f"CPU SFT step time {result['step_time']['ratio_lora_over_full']:.2f}", flush=True)
    return result


if __name__ == "__main__":
    main()
