"""Streaming writes and reads of a whole ``torch_dist`` model checkpoint, one tensor at a time.

The converter describes the whole model with a *skeleton*, the TP=1/PP=1 ``GPTModel`` built on
the meta device (no memory), whose ``sharded_state_dict()`` fixes names, global shapes and shard
offsets exactly as a real model would. The checkpoint format is ``checkpoint.mcore``'s.

Writes (:func:`save_streaming`): the skeleton's tensors are produced one at a time by a callback
while ``torch.distributed.checkpoint`` writes them: a save planner resolves each write item lazily
and a storage writer writes and drops each tensor before asking for the next (Megatron's own
writer first resolves every tensor of a rank, which would hold the whole model). Reads
(:func:`load_streaming`) use ``dist_checkpointing.load`` with part of the skeleton's sharded state
dict (one layer at a time).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_sega.checkpoint.safe_loading import safe_loading
from megatron_sega.convert.layout import layer_index
from megatron_sega.errors import ConversionError
from megatron_sega.models.spec import LlamaSpec


def single_process_runtime():
    """TP=1/PP=1 Megatron groups in this (single) process, for the converters."""
    from megatron_sega import runtime

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ConversionError(
            f"the converter runs in one process, not {dist.get_world_size()}; launch it with "
            "python, not torchrun (it streams the model and needs no parallelism)")
    return runtime.setup(1, 1)


def build_skeleton(spec: LlamaSpec, dtype: torch.dtype, padded_vocab: int, rt, lora=None):
    """The whole model (TP=1, PP=1) on the meta device: shapes and sharding, no memory; with
    ``lora`` (``models.lora.LoraSettings``) its adapters too."""
    from megatron_sega.models.builder import build_model

    meta_rt = dataclasses.replace(rt, device=torch.device("meta"))
    with torch.device("meta"):  # at TP=1, vocab_multiple=padded_vocab pads to exactly that
        skeleton = build_model(spec, meta_rt, dtype=dtype, use_te=False, attention="local",
                               vocab_multiple=padded_vocab, lora=lora)
    if skeleton.vocab_size != padded_vocab:
        raise ConversionError(f"internal: skeleton vocab {skeleton.vocab_size} != {padded_vocab}")
    # Megatron's norms keep fp32 params under bf16 ``params_dtype`` until a Float16Module casts
    # them; a converted checkpoint holds every tensor in the one dtype asked for.
    return skeleton.to(dtype)


def _walk(value: Any, name: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, key)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item, name)
    else:
        yield name, value


def _param_slices(sh) -> tuple[slice, ...]:
    """Where a TP=1 shard sits in its parameter: the global offset minus prepended axes."""
    if sh.flattened_range is not None:
        raise ConversionError(f"'{sh.key}': flattened shards are not supported")
    p = sh.prepend_axis_num
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))


def _make_streaming_strategy(fetch: Callable[[str], torch.Tensor]):
    """A ``TorchDistSaveShardedStrategy`` (so ``dist_checkpointing.save`` accepts it) whose tensor
    data comes from ``fetch(state_dict_name) -> full tensor``, one tensor at a time."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    class LazyPlanner(MCoreSavePlanner):
        """Resolves a write item by slicing ``fetch(name)``; keeps the last fetched tensor so
        the gate and up halves of one ``linear_fc1`` cost one fetch."""

        def __init__(self, sources, **kwargs):
            super().__init__(**kwargs)
            self.sources = sources  # (sharded key, global offset) -> (name, slices)
            self.cached: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            index = write_item.index
            name, slices = self.sources[(index.fqn, tuple(index.offset))]
            if self.cached[0] != name:
                self.cached = (None, None)  # drop the previous tensor before fetching
                self.cached = (name, fetch(name))
            full = self.cached[1]
            chunk = full[slices]
            # DCP chunks carry the prepended (layer) axes as leading dims of size 1.
            expected = tuple(write_item.tensor_data.chunk.sizes)
            dtype = write_item.tensor_data.properties.dtype
            if tuple(chunk.shape) != expected[len(expected) - chunk.dim():] or \
                    chunk.dtype != dtype:
                raise ConversionError(f"'{name}': produced {tuple(chunk.shape)} {chunk.dtype}, "
                                      f"the checkpoint expects {expected} {dtype}")
            if chunk.numel() != full.numel() or not chunk.is_contiguous():
                chunk = chunk.clone()  # torch.save writes whole storages: keep it minimal
            return chunk.reshape(expected)

    class StreamingWriter(FileSystemWriter):
        """Writes each item as soon as it is resolved and drops it; one file per layer."""

        def write_data(self, plan, planner) -> torch.futures.Future:
            groups: dict[Any, list] = {}
            for item in plan.items:
                layered = (item.index.fqn.startswith("decoder.layers.")
                           and item.index.offset is not None)
                key = int(item.index.offset[0]) if layered else "rest"
                groups.setdefault(key, []).append(item)
            results = []
            for n, items in enumerate(groups.values()):
                file_name = f"{plan.storage_data.prefix}{n}{DEFAULT_SUFFIX}"
                with open(Path(self.path) / file_name, "wb") as stream:
                    for item in items:
                        data = planner.resolve_data(item)
                        offset = stream.tell()
                        if item.type == WriteItemType.BYTE_IO:
                            stream.write(data.getbuffer())
                        else:
                            torch.save(data, stream)
                        del data
                        length = stream.tell() - offset
                        results.append(WriteResult(index=item.index, size_in_bytes=length,
                                                   storage_data=_StorageInfo(file_name, offset,
                                                                             length)))
                    if self.sync_files:
                        stream.flush()
                        os.fsync(stream.fileno())
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(results)
            return future

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sources = {}
            for name, sh in _walk(sharded_state_dict, ""):
                if isinstance(sh, ShardedTensor):
                    sources[(sh.key, tuple(sh.global_offset))] = (name, _param_slices(sh))
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
            planner = LazyPlanner(sources, dedup_replicated_tensors=False,
                                  flatten_state_dict=False, flatten_sharded_tensors=False)
            dcp_save(pyt_state_dict, storage_writer=StreamingWriter(str(checkpoint_dir)),
                     planner=planner)

    return StreamingStrategy()


def save_streaming(skeleton, directory: str | Path,
                   fetch: Callable[[str], torch.Tensor]) -> None:
    """Write a ``torch_dist`` checkpoint of ``skeleton`` (TP=1/PP=1, meta device) whose tensor
    ``name`` (a key of ``skeleton.state_dict()``, i.e. a canonical name) is ``fetch(name)``.
    Peak memory: about the largest tensor, twice."""
    from megatron.core import dist_checkpointing

    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(skeleton.sharded_state_dict(), str(directory),
                            sharded_strategy=_make_streaming_strategy(fetch))


def stream_groups(skeleton) -> Iterator[list[str]]:
    """The skeleton's tensor names in load groups: embedding, each layer, final norm + head."""
    names = [n for n in skeleton.state_dict() if not n.endswith("_extra_state")]
    groups: dict[Any, list[str]] = {}
    for name in names:
        index = layer_index(name)
        key = index if index is not None else ("first" if name.startswith("embedding") else "last")
        groups.setdefault(key, []).append(name)
    order = ["first"] + sorted(k for k in groups if isinstance(k, int)) + ["last"]
    for key in order:
        if key in groups:
            yield groups[key]


def load_streaming(skeleton, directory: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the full tensors ``names`` (keys of ``skeleton.state_dict()``) from a checkpoint.

    Each shard of the skeleton is requested with its prepended (layer) axes made explicit
    dims of size 1: Megatron converts prepended-axis shards of one process into a PyT
    ShardedTensor that must hold *every* layer, which a partial (one-layer) read does not."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    sharded = skeleton.sharded_state_dict()
    full = {name: torch.empty(sharded[name].data.shape, dtype=sharded[name].data.dtype)
            for name in names}
    request, targets = {}, {}
    for name in names:
        entry = sharded[name]
        shards = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
        for j, (_, sh) in enumerate(_walk(shards, name)):
            local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            target = full[name][_param_slices(sh)]  # TP=1: a contiguous block of rows
            data = target.view(local) if target.is_contiguous() else torch.empty(local,
                                                                                  dtype=sh.dtype)
            request[f"{name}/{j}"] = dataclasses.replace(sh, data=data, local_shape=local,
                                                         prepend_axis_num=0)
            targets[f"{name}/{j}"] = target
    with safe_loading(directory):
        loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    for key, target in targets.items():
        value = loaded.pop(key)
        if value.data_ptr() != target.data_ptr():  # not read in place
            target.copy_(value.reshape(target.shape))
    return full
