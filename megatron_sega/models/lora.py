"""LoRA adapters on Megatron-Core's tensor-parallel linear layers (``lora:`` in the config).

Each adapted layer adds ``scale * B(A(dropout(x)))`` to its output, ``scale = alpha / rank``, A
``[rank, in]`` and B ``[out, rank]``, B zero at the start (so the model starts as its base,
bitwise). The base weights are frozen; only A and B train.

Sharding (docs/design-notes.md, "LoRA under tensor parallelism"), so that any layout computes
what TP = 1 computes:

- column-parallel layers (``linear_qkv``, ``linear_fc1``: the output split over TP): A is
  replicated, B is split by output rows exactly as the base weight (``linear_fc1``: gate and up
  halves per rank). Forward: no collective. Backward: ``x A^T`` goes through
  ``copy_to_tensor_model_parallel_region``, whose backward all-reduces its ``[tokens, rank]``
  gradient, which A's gradient needs (each rank only sees its rows of B);
- row-parallel layers (``linear_proj``, ``linear_fc2``: the input split over TP): A is split by
  input columns as the base weight, B is replicated. Forward: the partial ``x_t A_t^T`` is
  summed over TP (``[tokens, rank]``) before B; B's gradient is then the same on every rank.

The collectives carry ``rank`` values per token against the base layer's ``hidden``; the
sampler's decode forward, which needs no gradient, adds the row-parallel adapter's partial
output to the base layer's own all-reduce instead (``sampling.decode``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
)

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (``….lora_a`` / ``….lora_b``)."""
    return name.endswith((".lora_a", ".lora_b"))


class _Adapter:
    """What both adapted layers share: the settings, the switch, dropout."""

    lora: LoraSettings
    lora_enabled: bool
    lora_frozen: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (A, B) used instead

    def _make_adapter(self, a_shape: tuple[int, int], b_shape: tuple[int, int],
                      a_split: Optional[int], b_split: Optional[int]) -> None:
        device = self.weight.device
        dtype = self.config.params_dtype
        self.lora_a = torch.nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        for param, dim in ((self.lora_a, a_split), (self.lora_b, b_split)):
            set_tensor_model_parallel_attributes(param, dim is not None, dim or 0, 1)
        self.lora_enabled = True

    def _add_delta(self, out: torch.Tensor, x: torch.Tensor, collective) -> torch.Tensor:
        """``out + scale * B(collective(A(dropout(x))))``, or ``out`` with the adapter off;
        ``collective`` is the TP mapping of the ``[tokens, rank]`` intermediate."""
        if not self.lora_enabled:
            return out
        if self.lora.dropout:
            x = F.dropout(x, self.lora.dropout, self.training)
        a, b = self.lora_frozen or (self.lora_a, self.lora_b)
        h = collective(F.linear(x, a), group=self.tp_group)
        return out + self.lora.scale * F.linear(h, b)

    def _sharded(self, prefix: str, axes: dict[str, int], sharded_offsets, metadata):
        """The layer's sharded state dict, the adapters with their TP axes (``axes``)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axes, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


class LoRAColumnParallelLinear(_Adapter, ColumnParallelLinear):
    """``ColumnParallelLinear`` + an adapter: A replicated, B split by output rows.
    ``gate_up``: the layer is a gated ``linear_fc1`` whose rows are ``[gate; up]`` per rank."""

    def __init__(self, input_size: int, output_size: int, *, lora: LoraSettings,
                 gate_up: bool = False, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self.lora = lora
        self.gate_up = gate_up and self.config.gated_linear_unit
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self._make_adapter((lora.rank, input_size), (output_size // tp, lora.rank),
                           None, 0)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight, runtime_gather_output)
        return self._add_delta(out, input_, copy_to_tensor_model_parallel_region), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self._sharded(prefix, {"weight": 0, "bias": 0, "lora_b": 0}, sharded_offsets,
                              metadata)
        if self.gate_up:
            # B's rows are [gate_t; up_t] on rank t: stored as the weight is (Megatron's MLP
            # wraps only weight and bias), the checkpoint's global B is [gate; up] at any TP.
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}lora_b"
            state[key] = apply_swiglu_sharded_factory(
                state[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False),
                tp_group=self.tp_group, dp_group=metadata["dp_cp_group"])
        return state


class LoRARowParallelLinear(_Adapter, RowParallelLinear):
    """``RowParallelLinear`` + an adapter: A split by input columns, B replicated."""

    def __init__(self, input_size: int, output_size: int, *, lora: LoraSettings, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self.lora = lora
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self._make_adapter((lora.rank, input_size // tp), (output_size, lora.rank),
                           1, None)

    def forward(self, input_):
        out, bias = super().forward(input_)
        return self._add_delta(out, input_, reduce_from_tensor_model_parallel_region), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded(prefix, {"weight": 1, "lora_a": 1}, sharded_offsets, metadata)


def adapt_layer_spec(spec, lora: LoraSettings):
    """The local layer spec ``spec`` with the targeted linear layers adapted (in place)."""
    import dataclasses
    import functools

    from megatron.core.transformer.spec_utils import ModuleSpec

    def adapted(name: str, base):
        if name not in lora.targets:
            return base
        module = LoRAColumnParallelLinear if name in COLUMN_TARGETS else LoRARowParallelLinear
        if base is not (ColumnParallelLinear if name in COLUMN_TARGETS else RowParallelLinear):
            raise ValueError(f"LoRA adapts Megatron's local linear layers, not {base}")
        params = {"lora": lora, **({"gate_up": True} if name == "linear_fc1" else {})}
        return ModuleSpec(module=module, params=params)

    attention = spec.submodules.self_attention.submodules
    attention.linear_qkv = adapted("linear_qkv", attention.linear_qkv)
    attention.linear_proj = adapted("linear_proj", attention.linear_proj)
    mlp = spec.submodules.mlp
    sub = mlp.keywords["submodules"]
    sub = dataclasses.replace(sub, linear_fc1=adapted("linear_fc1", sub.linear_fc1),
                              linear_fc2=adapted("linear_fc2", sub.linear_fc2))
    spec.submodules.mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords,
                                                                    "submodules": sub})
    return spec


def adapters(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every adapted layer of ``model`` (one chunk)."""
    for name, module in model.named_modules():
        if isinstance(module, _Adapter):
            yield name, module


def init_adapters(model, seed: int, tp: int, tp_rank: int) -> None:
    """A as PEFT initialises it (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) over the layer's full input), B zero. A is drawn whole from a generator
    seeded by (seed, global layer, target) and this rank takes its shard, so every layout
    starts from the same adapters."""
    from megatron_sega.convert.layout import canonical_name, shift_layer, tp_shard
    from megatron_sega.models.builder import unwrap_model

    model = unwrap_model(model)
    layers = model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    with torch.no_grad():
        for name, module in adapters(model):
            key = shift_layer(canonical_name(f"{name}.lora_a"), offset)
            digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            fan_in = module.lora_a.shape[1] * (1 if key.endswith(COLUMN_A) else tp)
            full = (torch.rand(module.lora.rank, fan_in, generator=g, dtype=torch.float64)
                    * 2 - 1) / math.sqrt(fan_in)
            module.lora_a.copy_(tp_shard(key, full, tp, tp_rank).to(module.lora_a.dtype))
            module.lora_b.zero_()


COLUMN_A = tuple(f"{t}.lora_a" for t in COLUMN_TARGETS)


def freeze_base(model) -> int:
    """Only the adapters train: every other parameter of ``model`` (a chunk, unwrapped) stops
    requiring a gradient, so DDP gives it no grad buffer and the optimizer no state. Returns
    the number of trainable elements on this rank."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
        trainable += param.numel() if is_adapter(name) else 0
    return trainable


def parameter_counts(chunks, runtime) -> tuple[float, float]:
    """(trainable, frozen) parameters of the whole model: this rank's chunks summed over the
    model-parallel group, a tensor replicated over TP counted once."""
    import torch.distributed as dist

    from megatron_sega.convert.layout import tp_dim
    from megatron_sega.models.builder import unwrap_model

    counts = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for chunk in chunks:
        for name, p in unwrap_model(chunk).named_parameters():
            shared = runtime.tp if tp_dim(name) is None and runtime.tp > 1 else 1
            counts[0 if is_adapter(name) else 1] += p.numel() / shared
    if dist.is_initialized() and runtime.tp * runtime.pp > 1:
        dist.all_reduce(counts, group=runtime.mp_group)
    trainable, frozen = counts.tolist()
    return trainable, frozen


@contextlib.contextmanager
def adapters_disabled(chunks) -> Iterator[None]:
    """The base model: every adapter of ``chunks`` switched off for the duration (the
    reference model of DPO and of SEGA's KL, without a second copy of the weights)."""
    modules = _modules(chunks)
    for module in modules:
        module.lora_enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.lora_enabled = True


def _modules(chunks) -> list:
    from megatron_sega.models.builder import unwrap_model

    return [m for chunk in chunks for _, m in adapters(unwrap_model(chunk))]


def snapshot_adapters(chunks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A frozen copy of every adapter's (A, B) of ``chunks``, in :func:`adapters` order."""
    return [(m.lora_a.detach().clone(), m.lora_b.detach().clone()) for m in _modules(chunks)]


@contextlib.contextmanager
def frozen_adapters(chunks, frozen: list) -> Iterator[None]:
    """Every adapter of ``chunks`` computes with its copy in ``frozen`` (from
    :func:`snapshot_adapters`) instead of its trained A and B, for the duration."""
    modules = _modules(chunks)
    for module, pair in zip(modules, frozen, strict=True):
        module.lora_frozen = pair
    try:
        yield
    finally:
        for module in modules:
            module.lora_frozen = None


class BaseModel(list):
    """The chunks of a LoRA model, used as its reference: the forward passes that take model
    chunks (``training.teacher_forced.token_stats``) run them with every adapter off, or with
    ``frozen`` adapters (a run that started from a LoRA checkpoint: the adapters it started
    from). DPO's and SEGA's default reference under LoRA: the same base weights, no copy."""

    def __init__(self, chunks, frozen: Optional[list] = None):
        super().__init__(chunks)
        self.frozen = frozen


def as_run(chunks):
    """The context a forward of ``chunks`` runs in: for a :class:`BaseModel`, adapters off or
    its frozen ones."""
    if not isinstance(chunks, BaseModel):
        return contextlib.nullcontext()
    return adapters_disabled(chunks) if chunks.frozen is None else frozen_adapters(
        chunks, chunks.frozen)
