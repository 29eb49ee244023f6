"""A fingerprint of a model's frozen base weights, the same at every layout and load dtype.

A LoRA training checkpoint stores only the adapters and points at its base checkpoint
(``megatron_sega.json``: ``lora.base``). What it trained on is identified by this fingerprint:
per stored tensor key (``decoder.layers.mlp.linear_fc1.weight``: every layer together, as the
checkpoint keys them), the float64 sum and sum of squares of the weights rounded to bf16.

- Layout: each element is counted once: a rank adds its local shard only where it holds the
  main replica (Megatron's ``replica_id``), and the sums are added over all ranks. The padded
  vocabulary rows (their number depends on TP) are left out. Float64 sums in another order
  differ by ~1e-16 relative; :func:`differing` allows 1e-9.
- dtype: bf16 values of an fp32 weight are those of the same weight loaded at bf16, so a run
  resumed at another ``model.dtype`` sees the same fingerprint.

A changed base (another fine-tune, a reconversion of another model) moves these sums by far more
than the tolerance; a change smaller than bf16's resolution is not seen.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_sega.models.lora import is_adapter
from megatron_sega.models.spec import TE_NORM_NAMES

_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER_INDEX = re.compile(r"^decoder\.layers\.\d+\.")
RTOL = 1e-9
_CHUNK = 1 << 22


def _sums(t: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares] of ``t`` rounded to bf16, in float64, a slice at a time."""
    flat = t.detach().reshape(-1)
    out = torch.zeros(2, dtype=torch.float64)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK].to(torch.bfloat16).double()
        out += torch.stack([part.sum(), (part * part).sum()]).cpu()
    return out


def _true_rows(key: str, t: torch.Tensor, first_row: int, vocab_size: int) -> torch.Tensor:
    """``t`` without its padded vocabulary rows (``first_row``: its first row's global index)."""
    if key not in _VOCAB_KEYS:
        return t
    return t[: max(0, min(t.shape[0], vocab_size - first_row))]


def _key(key: str) -> str:
    """A stored key under its local-layout name (the TE layout fuses the norms into the next
    linear layer), so that both layouts fingerprint alike."""
    rest = key.removeprefix("decoder.layers.")
    return f"decoder.layers.{TE_NORM_NAMES[rest]}" if rest in TE_NORM_NAMES else key


def _add(table: dict[str, torch.Tensor], key: str, sums: torch.Tensor) -> None:
    table[key] = table.get(key, torch.zeros(2, dtype=torch.float64)) + sums


def model_fingerprint(chunks, vocab_size: int) -> dict[str, list[float]]:
    """Collective over every rank: the fingerprint of the base weights of ``chunks`` (this
    rank's model chunks; adapters and non-tensor state left out)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor, ShardedTensorFactory, is_main_replica,
    )

    from megatron_sega.checkpoint.mcore import sharded_model_state

    local: dict[str, torch.Tensor] = {}
    for item in nested_values(sharded_model_state(chunks)):
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)) or is_adapter(item.key):
            continue
        if not is_main_replica(item.replica_id):
            continue
        data = item.data
        if isinstance(item, ShardedTensor) and item.key in _VOCAB_KEYS:
            row_axis = item.prepend_axis_num
            data = _true_rows(item.key, data, item.global_offset[row_axis], vocab_size)
        _add(local, _key(item.key), _sums(data))
    gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(gathered, local)
    return combine(*gathered)


def combine(*parts: Mapping) -> dict[str, list[float]]:
    """The fingerprint of weights whose parts (disjoint elements) have fingerprints ``parts``."""
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, sums in part.items():
            _add(total, key, torch.as_tensor(sums, dtype=torch.float64))
    return {key: total[key].tolist() for key in sorted(total)}


def tensors_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]],
                        vocab_size: int) -> dict[str, list[float]]:
    """The fingerprint of whole tensors by canonical name (``decoder.layers.3.….weight``, as the
    converter reads a checkpoint), keyed as :func:`model_fingerprint` keys it."""
    total: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if is_adapter(name):
            continue
        key = _LAYER_INDEX.sub("decoder.layers.", name)
        _add(total, key, _sums(_true_rows(key, tensor, 0, vocab_size)))
    return combine(total)


def differing(recorded: Mapping[str, list[float]], ours: Mapping[str, list[float]]
              ) -> list[str]:
    """The keys whose fingerprints disagree (or that only one side has)."""
    keys = sorted(set(recorded) | set(ours))
    out = []
    for key in keys:
        a, b = recorded.get(key), ours.get(key)
        if a is None or b is None or any(
                abs(x - y) > RTOL * max(abs(x), abs(y), 1e-30) for x, y in zip(a, b)):
            out.append(key)
    return out


def describe_difference(keys: list[str], limit: int = 3) -> str:
    """``keys`` for an error message: the first few and a count."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def base_record(path: Optional[str], fingerprint: dict, init_seed: Optional[int] = None) -> dict:
    """What ``megatron_sega.json`` records of a LoRA checkpoint's base (``lora.base``)."""
    record = {"path": path, "fingerprint": fingerprint}
    if path is None:
        record["init_seed"] = init_seed
    return record
