"""Hugging Face Llama <-> Megatron-Core parameter mapping (names, layouts, vocab padding).

Pure tensor functions, no I/O and no process groups. Megatron names are the canonical names of
``convert.layout`` (local spec, global layer ids). The map, per layer ``i``:

    HF (model.layers.i. prefix on layer names)   Megatron (decoder.layers.i. prefix)
    model.embed_tokens.weight                    embedding.word_embeddings.weight (rows padded)
    input_layernorm.weight                       input_layernorm.weight
    self_attn.{q,k,v}_proj.weight                self_attention.linear_qkv.weight
    self_attn.o_proj.weight                      self_attention.linear_proj.weight
    post_attention_layernorm.weight              pre_mlp_layernorm.weight
    mlp.{gate,up}_proj.weight                    mlp.linear_fc1.weight  [gate; up]
    mlp.down_proj.weight                         mlp.linear_fc2.weight
    model.norm.weight                            decoder.final_layernorm.weight
    lm_head.weight                               output_layer.weight (absent when tied; padded)

``linear_qkv`` rows are grouped per query group (GQA): ``[q_1..q_r, k, v]`` for each of the
``num_query_groups`` groups, ``r = heads / groups``, every block ``head_dim`` rows.

Rotary: transformers stores Llama q/k in the rotate-half (non-interleaved) convention, which is
also Megatron-Core's default (``rotary_interleaved=False``): no permutation is applied. The logit
parity tests against ``LlamaForCausalLM`` check this.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from megatron_sega.convert.layout import full_shapes
from megatron_sega.errors import ConversionError
from megatron_sega.models.spec import LlamaSpec


EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

_GLOBAL = {
    EMBEDDING: ("model.embed_tokens.weight",),
    FINAL_NORM: ("model.norm.weight",),
    OUTPUT: ("lm_head.weight",),
}
# Megatron layer suffix -> HF layer suffixes, in the order they are concatenated.
_LAYER = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
_MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Derived buffers some older HF checkpoints carry; they are recomputed, never converted.
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def megatron_names(spec: LlamaSpec) -> list[str]:
    """Canonical Megatron names of a spec, in checkpoint order (embedding, layers, head)."""
    return list(full_shapes(spec, spec.vocab_size))


def hf_sources(name: str) -> tuple[str, ...]:
    """The HF tensor names that make up a canonical Megatron tensor, in concatenation order."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = _MEGATRON_LAYER.match(name)
    if match and match.group(2) in _LAYER:
        return tuple(f"model.layers.{match.group(1)}.{s}" for s in _LAYER[match.group(2)])
    raise ConversionError(f"unknown Megatron tensor '{name}': not part of the Llama layout")


def _layer_shapes(spec: LlamaSpec) -> dict[str, tuple[int, ...]]:
    h, d, ffn = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    heads, groups = spec.num_attention_heads, spec.num_query_groups
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * d, h),
        "self_attn.k_proj.weight": (groups * d, h),
        "self_attn.v_proj.weight": (groups * d, h),
        "self_attn.o_proj.weight": (h, heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }


def hf_shapes(spec: LlamaSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of a spec with its shape (true vocab rows), in checkpoint order."""
    h = spec.hidden_size
    per_layer = _layer_shapes(spec)
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def hf_shape(name: str, spec: LlamaSpec) -> tuple[int, ...]:
    """The expected shape of one HF tensor."""
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _layer_shapes(spec) and int(match.group(1)) < spec.num_layers:
        return _layer_shapes(spec)[match.group(2)]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (spec.vocab_size, spec.hidden_size)
    if name == "model.norm.weight":
        return (spec.hidden_size,)
    raise ConversionError(f"unknown HF tensor '{name}' for a {spec.num_layers}-layer Llama")


def is_ignored_hf_name(name: str) -> bool:
    return bool(_IGNORED_HF.search(name))


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(f"'{n}'" for n in names[:limit]) + more


def check_hf_tensors(shapes: Mapping[str, tuple[int, ...]], spec: LlamaSpec,
                     where: str = "checkpoint") -> None:
    """Raise ``ConversionError`` naming every unexpected or missing tensor, or a wrong shape."""
    expected = hf_shapes(spec)
    present = {n: tuple(s) for n, s in shapes.items() if not is_ignored_hf_name(n)}
    unexpected = set(present) - set(expected)
    if unexpected:
        hint = ""
        if "lm_head.weight" in unexpected and spec.tie_word_embeddings:
            hint = " (config.json says tie_word_embeddings=true, so there must be no lm_head)"
        raise ConversionError(f"{where}: unexpected tensor(s) {_listing(unexpected)} for a "
                              f"{spec.num_layers}-layer Llama{hint}")
    missing = set(expected) - set(present)
    if missing:
        raise ConversionError(f"{where}: missing tensor(s) {_listing(missing)}")
    for name, shape in expected.items():
        if present[name] != shape:
            raise ConversionError(f"{where}: tensor '{name}' has shape {present[name]}, "
                                  f"expected {shape} from config.json")


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(shape)}")


def pad_vocab(tensor: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Append zero rows up to ``padded_vocab`` (padding columns are never scored)."""
    extra = padded_vocab - tensor.shape[0]
    if extra < 0:
        raise ConversionError(f"vocab rows {tensor.shape[0]} exceed the padded size {padded_vocab}")
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra else tensor


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    spec: LlamaSpec) -> torch.Tensor:
    """Stack HF q/k/v projections into Megatron's per-group ``[q_1..q_r, k, v]`` rows."""
    groups, d = spec.num_query_groups, spec.kv_channels
    r = spec.num_attention_heads // groups
    h = q.shape[-1]
    blocks = [q.reshape(groups, r * d, h), k.reshape(groups, d, h), v.reshape(groups, d, h)]
    return torch.cat(blocks, dim=1).reshape(-1, h)


def qkv_to_hf(qkv: torch.Tensor, spec: LlamaSpec) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`qkv_to_megatron`: (q, k, v), contiguous."""
    groups, d = spec.num_query_groups, spec.kv_channels
    r = spec.num_attention_heads // groups
    h = qkv.shape[-1]
    q, k, v = qkv.reshape(groups, (r + 2) * d, h).split([r * d, d, d], dim=1)
    return tuple(t.reshape(-1, h).contiguous() for t in (q, k, v))


def to_megatron(name: str, tensors: Mapping[str, torch.Tensor], spec: LlamaSpec,
                padded_vocab: int) -> torch.Tensor:
    """The canonical Megatron tensor ``name`` from its HF sources (see :func:`hf_sources`)."""
    sources = hf_sources(name)
    for source in sources:
        if source not in tensors:
            raise ConversionError(f"missing tensor '{source}' (needed for '{name}')")
        _check_shape(source, tensors[source], hf_shape(source, spec))
    parts = [tensors[s] for s in sources]
    if name in (EMBEDDING, OUTPUT):
        return pad_vocab(parts[0], padded_vocab)
    if name.endswith("linear_qkv.weight"):
        return qkv_to_megatron(*parts, spec)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(parts, dim=0)
    return parts[0]


def to_hf(name: str, tensor: torch.Tensor, spec: LlamaSpec) -> dict[str, torch.Tensor]:
    """The HF tensors of the canonical Megatron tensor ``name`` (vocab rows truncated).
    Results may be views of ``tensor``; clone them before ``torch.save``."""
    sources = hf_sources(name)
    if name in (EMBEDDING, OUTPUT):
        if tensor.shape[0] < spec.vocab_size:
            raise ConversionError(f"tensor '{name}' has {tensor.shape[0]} vocab rows, fewer than "
                                  f"vocab_size {spec.vocab_size}")
        parts: tuple[torch.Tensor, ...] = (tensor[: spec.vocab_size],)  # a view: no copy
    elif name.endswith("linear_qkv.weight"):
        parts = qkv_to_hf(tensor, spec)
    elif name.endswith("linear_fc1.weight"):
        parts = tuple(t.contiguous() for t in tensor.chunk(2, dim=0))
    else:
        parts = (tensor,)
    out = dict(zip(sources, parts))
    for source, part in out.items():
        _check_shape(source, part, hf_shape(source, spec))
    return out


def hf_to_megatron_state_dict(hf: Mapping[str, torch.Tensor], spec: LlamaSpec,
                              padded_vocab: int) -> dict[str, torch.Tensor]:
    """A whole HF state dict to the canonical Megatron layout (small models and tests; the
    converter streams tensor by tensor instead)."""
    check_hf_tensors({k: tuple(v.shape) for k, v in hf.items()}, spec, "state dict")
    return {n: to_megatron(n, hf, spec, padded_vocab) for n in megatron_names(spec)}


def megatron_to_hf_state_dict(full: Mapping[str, torch.Tensor],
                              spec: LlamaSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_megatron_state_dict`; every expected name must be present."""
    expected = megatron_names(spec)
    unexpected = set(full) - set(expected)
    if unexpected:
        raise ConversionError(f"unexpected Megatron tensor(s) {_listing(unexpected)}")
    missing = set(expected) - set(full)
    if missing:
        raise ConversionError(f"missing Megatron tensor(s) {_listing(missing)}")
    out: dict[str, torch.Tensor] = {}
    for name in expected:
        out.update(to_hf(name, full[name], spec))
    return out
