"""``megatron-sega plan --config CFG --world-size N --gpu KIND [--nodes M] [--mfu F]``."""

from __future__ import annotations

import os

from megatron_sega.errors import ConfigError
from megatron_sega.plan import memory as mem
from megatron_sega.plan import planner
from megatron_sega.plan.planner import GIB, PAPER_K, PAPER_NEW_TOKENS, PAPER_PAIRS

STAGES = ("sft", "sega", "dpo")
_PARTS = ("weights", "grads", "optimizer", "reference", "activations", "logits", "kv_cache")


def _gib(n: float) -> str:
    return f"{n / GIB:6.1f}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def run_plan(config, args) -> int:
    from megatron_sega.cli import shape_config
    from megatron_sega.runtime import validate_parallel_sizes
    from megatron_sega.training.session import model_spec

    if not args.gpu:
        raise ConfigError("plan needs --gpu KIND (a100-40g, a100-80g, h100-80g or h200)")
    gpu = planner.check_gpu(args.gpu)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    nodes = args.nodes or 1
    if world % nodes:
        raise ConfigError(f"--world-size {world} is not a multiple of --nodes {nodes}; give "
                          "the total number of GPUs over all nodes")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu} must be in (0, 1], e.g. 0.4")
    config = shape_config(config)
    spec = model_spec(config)
    par = config.parallel
    dp = validate_parallel_sizes(par.tp, par.pp, world, num_layers=spec.num_layers,
                                 num_attention_heads=spec.num_attention_heads,
                                 num_query_groups=spec.num_query_groups, vpp=par.vpp)
    layout = mem.Layout(par.tp, par.pp, dp, par.vpp)
    usable = planner.usable_bytes(gpu)
    print(f"plan: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}, "
          f"{config.model.dtype}, recompute={config.model.recompute} on {world} x {gpu.name} "
          f"({gpu.memory_bytes / GIB:.0f} GiB; {usable / GIB:.0f} GiB usable after a "
          f"{mem.RESERVE_BYTES / GIB:.0f} GiB reserve), {layout}")
    print("per-GPU memory (GiB), on the fullest pipeline stage:")
    print("  stage " + " ".join(f"{p:>11}" for p in _PARTS) + "       total  verdict")
    failed = []
    for stage in STAGES:
        m = planner.stage_memory(config, spec, layout, gpu, stage)
        cells = " ".join(f"{_gib(m.parts.get(p, 0)):>11}" for p in _PARTS)
        fits = m.total <= usable
        largest = planner.largest_micro_batch(config, spec, layout, gpu, stage)
        unit = "pairs" if stage == "dpo" else "rows"
        verdict = (f"fits, {(usable - m.total) / GIB:.1f} GiB headroom" if fits
                   else f"does NOT fit, {(m.total - usable) / GIB:.1f} GiB over")
        print(f"  {stage:>5} {cells} {_gib(m.total):>11}  {verdict}; largest micro-batch that "
              f"fits: {largest} {unit}" + "".join(f"; {n}" for n in m.notes))
        if not fits:
            failed.append(stage)
    if failed:
        fitting = [lay for lay in planner.candidate_layouts(spec, world, world // nodes)
                   if all(planner.stage_memory(config, spec, lay, gpu, s, 1).total <= usable
                          for s in STAGES)]
        print("layouts that fit every stage at micro-batch 1: "
              + (", ".join(str(lay) for lay in fitting[:6]) or "none on this many GPUs"))
    print(f"time (estimates: training at {args.mfu:.0%} MFU, decoding at the full HBM "
          f"bandwidth of {gpu.hbm_gbps / 1000:.2f} TB/s):")
    for stage in STAGES:
        parts = planner.step_seconds(config, spec, layout, gpu, stage, args.mfu)
        steps = getattr(config, stage).steps
        split = " + ".join(f"{k} {v:.2f} s" for k, v in parts.items())
        print(f"  {stage:>5}: {sum(parts.values()):.2f} s a step ({split}); "
              f"{steps} steps {_hours(steps * sum(parts.values()))}")
    paper = config.with_overrides(f"sega.k={PAPER_K}", f"sampling.max_new_tokens={PAPER_NEW_TOKENS}")
    total = 0.0
    for stage in STAGES:
        steps = planner.paper_scale_steps(paper, stage)
        total += steps * sum(planner.step_seconds(paper, spec, layout, gpu, stage,
                                                  args.mfu).values())
    print(f"  the paper's scale ({PAPER_PAIRS:,} pairs; SFT and DPO one epoch, SEGA every prompt "
          f"once with k={PAPER_K} and {PAPER_NEW_TOKENS} new tokens): {_hours(total)} in all")
    return 0 if not failed else 1
