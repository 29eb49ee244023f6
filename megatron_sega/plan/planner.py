"""``megatron-sega plan``: does a config fit a cluster, at which layout, and how long it takes.

Memory per GPU comes from :mod:`megatron_sega.plan.memory` (each part checked on CPU against the
objects the code builds); times are estimates: training steps from their FLOPs at a stated MFU,
decoding from the bytes each step reads (weights and KV cache) over the HBM bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_sega.errors import ConfigError
from megatron_sega.logging.metrics import training_flops_per_token
from megatron_sega.models.spec import LlamaSpec
from megatron_sega.plan import memory as mem
from megatron_sega.plan.hardware import GPU, GPUS

# The paper's scale (METHOD.md): 3,000 preference pairs, k = 4 candidates of up to 256 tokens.
PAPER_PAIRS, PAPER_K, PAPER_NEW_TOKENS = 3000, 4, 256
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """What one training stage runs per microbatch and per step on one DP rank."""

    rows: int  # sequences per microbatch
    microbatches: int  # per step, on one DP rank
    seq: int
    reference: bool  # a frozen reference model is resident


def stage_shape(config, stage: str, dp: int, micro: Optional[int] = None) -> Shape:
    """Rows and microbatches of ``stage`` (``micro`` replaces the configured micro-batch)."""
    seq = config.data.max_seq_len
    if stage == "sft":
        m = micro or config.sft.micro_batch_size
        return Shape(m, max(config.sft.global_batch_size // (m * dp), 1), seq, False)
    if stage == "dpo":
        m = micro or config.dpo.micro_batch_size
        return Shape(2 * m, max(config.dpo.global_batch_size // (m * dp), 1), seq, True)
    m = micro or config.sega.micro_batch_size
    rows = config.sega.prompts_per_step * config.sega.k
    return Shape(m, max(rows // (m * dp), 1), seq, config.sega.kl_coef > 0)


def sampler_rows(config, spec: LlamaSpec, layout: mem.Layout, free: int, bf16: bool
                 ) -> tuple[int, int]:
    """(rows per generation batch, batches per step) of SEGA's sampler on one DP replica, as
    ``Sampler._plan`` sizes them: half the free memory, or ``sampling.max_batch_tokens``."""
    positions = config.data.max_seq_len
    rows = config.sega.prompts_per_step * config.sega.k // layout.dp
    per_row = (mem.kv_cache_bytes(spec, layout.tp, layout.pp, 1, positions, bf16)
               + mem.prefill_bytes(spec, 1, positions, bf16))
    if config.sampling.max_batch_tokens:
        fit = config.sampling.max_batch_tokens // positions
    else:
        fit = int(max(free, 0) * mem.SAMPLER_MEMORY_FRACTION) // per_row
    fit = min(fit, rows)
    return fit, (math.ceil(rows / fit) if fit else 0)


def stage_memory(config, spec: LlamaSpec, layout: mem.Layout, gpu: GPU, stage: str,
                 micro: Optional[int] = None) -> mem.StageMemory:
    """Per-GPU bytes of ``stage`` on its fullest pipeline stage (the first or the last)."""
    bf16 = config.model.dtype != "fp32"
    shape = stage_shape(config, stage, layout.dp, micro)
    recompute = config.model.recompute
    best: Optional[mem.StageMemory] = None
    lora = config.lora
    adapters = (mem.adapter_parameters(spec, layout.tp, layout.pp, lora.rank, tuple(lora.targets))
                if lora.rank else 0)
    for index in sorted({0, layout.pp - 1}):
        first = index == 0
        params = mem.stage_parameters(spec, layout.tp, layout.pp, index)
        out = mem.StageMemory(stage, dict(mem.static_bytes(
            params + adapters, bf16=bf16, dp=layout.dp, trainable=adapters or None,
            distributed_optimizer=config.parallel.distributed_optimizer)))
        explicit = getattr(getattr(config, stage, None), "reference", None)
        if shape.reference and (not lora.rank or explicit):  # LoRA: the base, adapters off
            out.parts["reference"] = params * (2 if bf16 else 4)
        if lora.rank:
            out.notes.append(f"LoRA rank {lora.rank}: {adapters:,} trainable elements a GPU")
        train = mem.training_activation_bytes(spec, layout, shape.rows, shape.seq,
                                              shape.microbatches, bf16=bf16,
                                              recompute=recompute, first=first)
        logits = mem.logits_bytes(spec, layout.tp, shape.rows, shape.seq) \
            if index == layout.pp - 1 else 0
        if stage == "sega":  # the sampler's cache is freed before the update (issue 20 item 7)
            free = gpu.memory_bytes - mem.RESERVE_BYTES - out.total
            rows, batches = sampler_rows(config, spec, layout, free, bf16)
            kv = mem.kv_cache_bytes(spec, layout.tp, layout.pp, rows, shape.seq, bf16) \
                + mem.prefill_bytes(spec, rows, shape.seq, bf16)
            out.sampler_rows = rows
            out.notes.append(f"sampler: {rows} rows a batch, {batches} batches a step")
            if kv > train + logits:
                out.parts["kv_cache"] = kv
                out.notes.append("peak while sampling (the update needs less)")
            else:
                out.parts.update(activations=train, logits=logits)
                out.notes.append(f"peak in the update (the sampler's cache, "
                                 f"{kv / GIB:.1f} GiB, is freed first)")
        else:
            out.parts.update(activations=train, logits=logits)
        out.notes.insert(0, f"pipeline stage {index} ({'first' if first else 'last'})"
                         if layout.pp > 1 else "one pipeline stage")
        if best is None or out.total > best.total:
            best = out
    return best


def usable_bytes(gpu: GPU) -> int:
    return gpu.memory_bytes - mem.RESERVE_BYTES


def largest_micro_batch(config, spec, layout, gpu, stage: str, limit: int = 256) -> int:
    """The largest micro-batch (rows for SFT and SEGA, pairs for DPO) that fits; 0 if none."""
    fits = 0
    for micro in range(1, limit + 1):
        if stage_memory(config, spec, layout, gpu, stage, micro).total > usable_bytes(gpu):
            break
        fits = micro
    return fits


def candidate_layouts(spec: LlamaSpec, world: int, gpus_per_node: int) -> list[mem.Layout]:
    """TP within a node (dividing the heads and KV groups), PP dividing the layers."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or spec.num_attention_heads % tp or spec.num_query_groups % tp:
            continue
        for pp in range(1, spec.num_layers + 1):
            if spec.num_layers % pp == 0 and world % (tp * pp) == 0:
                out.append(mem.Layout(tp, pp, world // (tp * pp)))
    return sorted(out, key=lambda lay: (lay.tp * lay.pp, lay.pp))


def step_seconds(config, spec: LlamaSpec, layout: mem.Layout, gpu: GPU, stage: str,
                 mfu: float) -> dict[str, float]:
    """Estimated seconds of one step of ``stage`` (SEGA: split into sample and train)."""
    world = layout.tp * layout.pp * layout.dp
    rate = world * gpu.bf16_tflops * 1e12 * mfu
    seq = config.data.max_seq_len
    forward = training_flops_per_token(spec, seq) / 3  # per token
    # forward + backward (2 forwards' worth); full recompute runs each layer's forward again
    update = forward * (4 if config.model.recompute == "full" else 3)
    if stage == "sft":
        return {"train": config.sft.global_batch_size * seq * update / rate}
    if stage == "dpo":  # the policy's update and the reference's forward
        return {"train": 2 * config.dpo.global_batch_size * seq * (update + forward) / rate}
    new = config.sampling.max_new_tokens
    rows = config.sega.prompts_per_step * config.sega.k
    # the updates, the old log-probs' forward, the KL reference's forward
    flops = update * config.sega.updates_per_rollout + forward * (2 if config.sega.kl_coef else 1)
    train = rows * seq * flops / rate
    # Sampling on one replica: its rows in batches; each decode step reads every stage's
    # weights and KV cache once (the stages run one after another), at the HBM bandwidth.
    bf16 = config.model.dtype != "fp32"
    per_replica = rows // layout.dp
    fit = max(min(stage_memory(config, spec, layout, gpu, "sega").sampler_rows, per_replica), 1)
    batches = math.ceil(per_replica / fit)
    weights = sum(mem.stage_parameters(spec, layout.tp, layout.pp, s) for s in range(layout.pp))
    e = 2 if bf16 else 4
    kv = mem.kv_cache_bytes(spec, layout.tp, 1, fit, seq, bf16)  # all layers of one TP rank
    decode = batches * new * (weights * e + kv) / (gpu.hbm_gbps * 1e9)
    prompt = max(seq - new, 1)
    prefill = per_replica * prompt * forward / (layout.tp * layout.pp * gpu.bf16_tflops
                                                      * 1e12 * mfu)
    return {"sample": decode + prefill, "train": train}


def paper_scale_steps(config, stage: str) -> int:
    if stage == "sft":
        return math.ceil(PAPER_PAIRS / config.sft.global_batch_size)
    if stage == "dpo":
        return math.ceil(PAPER_PAIRS / config.dpo.global_batch_size)
    return math.ceil(PAPER_PAIRS / config.sega.prompts_per_step)


def check_gpu(kind: str) -> GPU:
    if kind not in GPUS:
        raise ConfigError(f"--gpu {kind!r} is not a GPU kind the planner knows; use one of "
                          f"{', '.join(GPUS)}")
    return GPUS[kind]
