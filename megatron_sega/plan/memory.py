"""Per-GPU memory of a training stage, from the model shape and the layout (estimates).

Every figure models what this code base builds (``models.builder``, ``training.engine``), not a
generic transformer, and the tests check it against the built objects on CPU
(tests/unit/test_plan.py, tests/distributed/test_plan_static.py):

- parameters per rank: the layers of one pipeline stage split over TP, the (padded) embedding on
  the first stage and the output layer and final norm on the last one, norms replicated;
- weights in the model dtype; gradients in fp32 (DDP reduces in fp32); Adam's two moments, plus
  an fp32 main copy of bf16 weights, divided over DP by the distributed optimizer;
- activations saved for backward per token, counted from the ops the local layers with SDPA run
  (:func:`layer_activation_elements`), times the microbatches 1F1B keeps in flight on the first
  stage (and the interleaved schedule's penalty under VPP);
- the vocab-parallel logits in fp32 on the last stage;
- the sampler's KV cache (``sampling.decode.LeanForward``: keys and values per layer of the
  stage, ``[rows, kv_heads / TP, positions, head_dim]`` in the model dtype) and the
  activations of its prefill;
- a frozen reference model's weights where DPO or SEGA's KL needs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_sega.models.spec import LlamaSpec

# Bytes the planner keeps off each GPU for what it does not model: the CUDA context and
# kernels, NCCL's buffers and the caching allocator's fragmentation.
RESERVE_BYTES = 4 * 2**30
# The sampler's KV cache may take this share of free memory (sampling/sampler.py).
SAMPLER_MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class Layout:
    """A parallel layout of one run: ``dp`` follows from the world size."""

    tp: int
    pp: int
    dp: int
    vpp: Optional[int] = None

    def __str__(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return f"tp={self.tp} pp={self.pp}{vpp} dp={self.dp}"


def layer_parameters(spec: LlamaSpec, tp: int) -> int:
    """Elements of one decoder layer on one TP rank: the fused QKV, the output projection and
    the two MLP matrices split over TP; the two RMSNorm weights replicated."""
    h, d = spec.hidden_size, spec.kv_channels
    split = (h * (spec.num_attention_heads + 2 * spec.num_query_groups) * d
             + spec.num_attention_heads * d * h + 3 * h * spec.ffn_hidden_size)
    return split // tp + 2 * h


def stage_parameters(spec: LlamaSpec, tp: int, pp: int, stage: int,
                     vocab_multiple: int = 128) -> int:
    """Elements one TP rank of pipeline stage ``stage`` holds (all its model chunks under VPP,
    which spread the same layers over the same ranks)."""
    h = spec.hidden_size
    vocab = spec.padded_vocab_size(tp, vocab_multiple) * h // tp
    n = spec.num_layers // pp * layer_parameters(spec, tp)
    if stage == 0:
        n += vocab
    if stage == pp - 1:
        n += h  # the final norm
        if not spec.tie_word_embeddings or pp > 1:
            n += vocab  # tied embeddings keep a synchronised copy on the last stage under PP
    return n


def adapter_parameters(spec: LlamaSpec, tp: int, pp: int, rank: int,
                       targets: tuple[str, ...]) -> int:
    """LoRA elements one TP rank of a pipeline stage holds (``models/lora.py``): per adapted
    column-parallel layer A ``[rank, in]`` replicated and B ``[out / TP, rank]``; per
    row-parallel layer A ``[rank, in / TP]`` and B ``[out, rank]`` replicated."""
    h, d, ffn = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    shapes = {"linear_qkv": (h, q + 2 * kv, "column"), "linear_fc1": (h, 2 * ffn, "column"),
              "linear_proj": (q, h, "row"), "linear_fc2": (ffn, h, "row")}
    per_layer = 0
    for target in targets:
        fan_in, fan_out, kind = shapes[target]
        per_layer += rank * (fan_in + fan_out // tp if kind == "column" else fan_in // tp + fan_out)
    return spec.num_layers // pp * per_layer


def static_bytes(params: int, *, bf16: bool, dp: int, distributed_optimizer: bool = True,
                 trainable: Optional[int] = None) -> dict[str, int]:
    """Weights, gradients and optimizer state of ``params`` elements on one rank, of which
    ``trainable`` (default all; LoRA: the adapters, counted in ``params``) have gradients and
    optimizer state."""
    trainable = params if trainable is None else trainable
    weights = params * (2 if bf16 else 4)
    grads = trainable * 4  # DDP's fp32 grad buffer (grad_reduce_in_fp32)
    state = trainable * ((4 if bf16 else 0) + 8)  # [fp32 main copy] + Adam's two moments
    return {"weights": weights, "grads": grads,
            "optimizer": math.ceil(state / dp) if distributed_optimizer else state}


def layer_activation_elements(spec: LlamaSpec, tp: int, recompute: str = "none") -> float:
    """Elements one decoder layer saves for backward per token, on one TP rank.

    Counted from the local layers with SDPA (measured per op with saved-tensor hooks):
    each RMSNorm keeps its input, its normalised output and 1/rms (2h + 1, replicated over TP);
    the QKV and FC1 matmuls keep their inputs (2h); SDPA keeps q, k, v, its output and one
    log-sum-exp per head; RoPE's rotation keeps the key before it (kv) and the cos/sin rows
    (2 head_dim); the output projection keeps its input (h); the SwiGLU MLP keeps the FC1
    output, the SiLU output, the product and a copy of the gate (5 ffn). Transformer Engine's
    layers keep about the same set (their fused norm+linear saves the norm's input and output).

    ``recompute``: "full" keeps only the layer's input (h; the layer runs again in backward);
    "selective" recomputes the core attention, dropping SDPA's output and log-sum-exp."""
    h, d, t = spec.hidden_size, spec.kv_channels, tp
    q, kv, ffn = spec.num_attention_heads * d, spec.num_query_groups * d, spec.ffn_hidden_size
    if recompute == "full":
        return float(h)
    replicated = 6 * h + 2 + 2 * d
    split = 3 * q + 3 * kv + spec.num_attention_heads + 5 * ffn
    if recompute == "selective":
        split -= q + spec.num_attention_heads
    return replicated + split / t


def last_stage_activation_elements(spec: LlamaSpec) -> float:
    """Per token on the last stage, besides its layers: the final norm (2h + 1) and the output
    layer's input (h), + 1 for the position bookkeeping the measurement finds."""
    return 3 * spec.hidden_size + 2


def in_flight_microbatches(pp: int, microbatches: int, vpp: Optional[int] = None) -> float:
    """Microbatches whose activations the first stage holds at once under 1F1B: pp (at most the
    step's count); the interleaved schedule adds (pp - 1) / (pp * vpp) of that (Megatron-LM's
    theoretical memory estimate)."""
    held = min(pp, microbatches)
    if vpp:
        held *= 1 + (pp - 1) / (pp * vpp)
    return held


def kv_cache_bytes(spec: LlamaSpec, tp: int, pp: int, rows: int, positions: int, bf16: bool
                   ) -> int:
    """The sampler's KV cache on one rank: keys and values of the stage's layers."""
    per_token = 2 * (spec.num_layers // pp) * (spec.num_query_groups // tp) * spec.kv_channels
    return rows * positions * per_token * (2 if bf16 else 4)


def prefill_bytes(spec: LlamaSpec, rows: int, positions: int, bf16: bool) -> int:
    """What the sampler reserves besides the cache for one prefill (hidden x 8 per position,
    ``Sampler.max_rows``)."""
    return rows * positions * 8 * spec.hidden_size * (2 if bf16 else 4)


@dataclass
class StageMemory:
    """One stage's per-GPU bytes on its fullest pipeline stage, by part."""

    stage: str
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sampler_rows: int = 0  # SEGA: rows per generation batch on one replica

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def saved_activation_bytes(spec: LlamaSpec, layout: Layout, rows: int, seq: int, *, bf16: bool,
                           recompute: str, last: bool) -> int:
    """What one microbatch's forward on one pipeline stage saves for backward (the figure the
    tests measure with saved-tensor hooks)."""
    elements = layer_activation_elements(spec, layout.tp, recompute) * (spec.num_layers // layout.pp)
    if last:
        elements += last_stage_activation_elements(spec)
    return int(rows * seq * elements * (2 if bf16 else 4))


def training_activation_bytes(spec: LlamaSpec, layout: Layout, rows: int, seq: int,
                              microbatches: int, *, bf16: bool, recompute: str,
                              first: bool) -> int:
    """Activations of a training step at their peak on the first (``first``) or last pipeline
    stage: the microbatches in flight, and under full recompute the one layer that runs again
    during backward."""
    last = not first or layout.pp == 1
    held = in_flight_microbatches(layout.pp, microbatches, layout.vpp) if first else 1
    total = held * saved_activation_bytes(spec, layout, rows, seq, bf16=bf16,
                                          recompute=recompute, last=last)
    if recompute == "full":
        total += rows * seq * layer_activation_elements(spec, layout.tp) * (2 if bf16 else 4)
    return int(total)


def logits_bytes(spec: LlamaSpec, tp: int, rows: int, seq: int) -> int:
    """The vocab-parallel logits of one microbatch, fp32 (the loss ops keep them)."""
    return rows * seq * spec.padded_vocab_size(tp) // tp * 4
