"""How a full Megatron Llama state dict is laid out across TP ranks and PP stages.

Names are Megatron-Core's local-spec parameter names with *global* layer numbers
(``decoder.layers.{i}.…``). On a pipeline stage the model numbers its layers locally from 0; the
offset of stage ``p`` is ``p * num_layers / pp``. Under virtual pipelining a rank holds several
model chunks, each with its own offset (Megatron's interleaved assignment); the functions below
that take ``model`` accept one module or the list of this rank's chunks.

Tensor-parallel partitioning (Megatron-Core's layers):
- ``word_embeddings`` and ``output_layer``: vocab rows, dim 0 (VocabParallelEmbedding,
  ColumnParallelLinear);
- ``linear_qkv``: dim 0; the rows are grouped per query group ``[q_1..q_r, k, v]`` so a plain
  split gives each rank whole groups;
- ``linear_fc1``: dim 0 *per projection*: rows are ``[gate; up]`` and rank ``t`` holds
  ``[gate_t; up_t]``;
- ``linear_proj``, ``linear_fc2``: dim 1 (RowParallelLinear);
- norms: replicated.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from megatron_sega.errors import LayoutError
from megatron_sega.models.spec import TE_NORM_NAMES

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_TO_LOCAL = TE_NORM_NAMES
_LOCAL_TO_TE = {v: k for k, v in _TE_TO_LOCAL.items()}

_ROW_DIM0 = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")
_COL_DIM1 = ("linear_proj.weight", "linear_fc2.weight")


def canonical_name(name: str) -> str:
    """Local-spec name for a (possibly TE-spec) parameter name; drops ``module.`` wrappers."""
    while name.startswith("module."):
        name = name[len("module."):]
    match = _LAYER.match(name)
    if match and match.group(2) in _TE_TO_LOCAL:
        return f"decoder.layers.{match.group(1)}.{_TE_TO_LOCAL[match.group(2)]}"
    return name


def model_name(canonical: str, te_names: bool) -> str:
    """Inverse of :func:`canonical_name` for a model built with (or without) the TE spec."""
    match = _LAYER.match(canonical)
    if te_names and match and match.group(2) in _LOCAL_TO_TE:
        return f"decoder.layers.{match.group(1)}.{_LOCAL_TO_TE[match.group(2)]}"
    return canonical


def shift_layer(name: str, offset: int) -> str:
    """Add ``offset`` to the layer number of a name (local <-> global numbering)."""
    match = _LAYER.match(name)
    if not match:
        return name
    return f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"


def layer_index(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def stage_layer_range(num_layers: int, pp: int, pp_rank: int) -> range:
    per_stage = num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


# LoRA adapters (models/lora.py): B of a column-parallel layer is split as its weight's rows,
# A of a row-parallel layer as its weight's columns; the other factor is replicated.
_LORA_DIM0 = ("linear_qkv.lora_b", "linear_fc1.lora_b")
_LORA_DIM1 = ("linear_proj.lora_a", "linear_fc2.lora_a")
_LORA_REPLICATED = ("linear_qkv.lora_a", "linear_fc1.lora_a", "linear_proj.lora_b",
                    "linear_fc2.lora_b")
_GATE_UP = ("linear_fc1.weight", "linear_fc1.lora_b")  # rows [gate; up], split per half


def tp_dim(name: str) -> int | None:
    """The partition dim of a parameter, or None when it is replicated across TP."""
    if name.endswith(_ROW_DIM0) or name.endswith("linear_fc1.weight") or name.endswith(_LORA_DIM0):
        return 0
    if name.endswith(_COL_DIM1) or name.endswith(_LORA_DIM1):
        return 1
    if name.endswith(_LORA_REPLICATED):
        return None
    if name.endswith(("layernorm.weight", "final_layernorm.weight", "layer_norm_weight")):
        return None
    raise LayoutError(f"unknown parameter '{name}': not part of the Llama layout")


def tp_shard(name: str, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    """This rank's shard of a full tensor."""
    dim = tp_dim(name)
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp != 0:
        raise LayoutError(f"'{name}' has size {full.shape[dim]} on dim {dim}, not divisible by "
                          f"tp={tp}")
    if name.endswith(_GATE_UP):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def tp_unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from the shards of all TP ranks (rank order)."""
    dim = tp_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith(_GATE_UP):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def named_stage_tensors(model, what: str = "param") -> Iterable[tuple[str, torch.Tensor]]:
    """(canonical global name, tensor) for this stage's parameters (every chunk). ``what``:
    'param' or 'grad' ('grad' reads Megatron DDP's ``main_grad`` when present, else ``.grad``)."""
    for chunk in _chunks(model):
        offset = stage_offset(chunk)
        for name, param in chunk.named_parameters():
            name = shift_layer(canonical_name(name), offset)
            if what == "param":
                yield name, param.data
            else:
                grad = getattr(param, "main_grad", None)
                if grad is None:
                    grad = param.grad
                yield name, grad if grad is not None else torch.zeros_like(param)


def stage_offset(model) -> int:
    """Global index of this stage's first layer."""
    from megatron_sega.models.builder import unwrap_model

    layers = unwrap_model(model).decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def load_full_state_dict(model, full: dict[str, torch.Tensor], tp: int, tp_rank: int,
                         strict: bool = True) -> None:
    """Copy this rank's shards of a full (canonical, global-name) state dict into ``model``
    (one module or this rank's chunks)."""
    with torch.no_grad():
        for key, param in named_stage_tensors(model, "param"):
            if key not in full:
                if strict and not key.endswith((".lora_a", ".lora_b")):  # adapters: optional
                    raise LayoutError(f"the state dict has no tensor '{key}' for a parameter "
                                      "of this stage")
                continue
            shard = tp_shard(key, full[key], tp, tp_rank)
            if shard.shape != param.shape:
                raise LayoutError(f"'{key}': shard shape {tuple(shard.shape)} != parameter shape "
                                  f"{tuple(param.shape)}")
            param.copy_(shard)


def gather_tp(model, tp_group, what: str = "param") -> dict[str, torch.Tensor]:
    """This stage's tensors as full (TP-gathered) tensors with canonical global names."""
    import torch.distributed as dist

    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    out = {}
    for name, tensor in named_stage_tensors(model, what):
        tensor = tensor.detach().contiguous()
        if tp_dim(name) is None or tp == 1:
            out[name] = tensor.clone()
            continue
        shards = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(shards, tensor, group=tp_group)
        out[name] = tp_unshard(name, shards)
    return out


def full_shapes(spec, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Canonical global names and full shapes of a Llama model in Megatron's layout."""
    h, d = spec.hidden_size, spec.kv_channels
    qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (padded_vocab, h)}
    for i in range(spec.num_layers):
        prefix = f"decoder.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (h,)
        shapes[prefix + "self_attention.linear_qkv.weight"] = (qkv_rows, h)
        shapes[prefix + "self_attention.linear_proj.weight"] = (h, spec.num_attention_heads * d)
        shapes[prefix + "pre_mlp_layernorm.weight"] = (h,)
        shapes[prefix + "mlp.linear_fc1.weight"] = (2 * spec.ffn_hidden_size, h)
        shapes[prefix + "mlp.linear_fc2.weight"] = (h, spec.ffn_hidden_size)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["output_layer.weight"] = (padded_vocab, h)
    return shapes
