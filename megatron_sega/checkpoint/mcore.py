"""Megatron-Core ``torch_dist`` checkpoints of a Llama model, plus our small metadata file.

A checkpoint directory holds what ``megatron.core.dist_checkpointing.save`` writes for the
model's ``sharded_state_dict()`` (``metadata.json``, ``.metadata``, ``__*_*.distcp``) and
``megatron_sega.json``: the ``LlamaSpec``, the padded vocabulary, the dtype and a format version,
so a loader can refuse a mismatched model with a clear message before reading a byte.
``dist_checkpointing`` stores global tensors, so a checkpoint written at one TP/PP loads at any
other whose padded vocabulary is the same (``LlamaSpec.padded_vocab_size``).

Streaming writes (:func:`save_streaming`): the converter describes the whole model with a
*skeleton*, the TP=1/PP=1 ``GPTModel`` built on the meta device (no memory), whose
``sharded_state_dict()`` fixes names, global shapes and shard offsets exactly as a real model
would. Its tensors are produced one at a time by a callback while ``torch.distributed.checkpoint``
writes them: a save planner resolves each write item lazily and a storage writer writes and drops
each tensor before asking for the next (Megatron's own writer first resolves every tensor of a
rank, which would hold the whole model). Streaming reads use ``dist_checkpointing.load`` with
part of the skeleton's sharded state dict (one layer at a time).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_sega.checkpoint.hf import ConversionError
from megatron_sega.checkpoint.hf_io import DTYPES, dtype_name
from megatron_sega.errors import CheckpointError
from megatron_sega.models.builder import unwrap_model as unwrap
from megatron_sega.models.spec import LlamaSpec, spec_from_dict, spec_to_dict

METADATA_FILE = "megatron_sega.json"
FORMAT = "megatron_sega.torch_dist"
FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"  # tokenizer files travel inside the checkpoint, in this subdir
# LlamaSpec fields that do not change the computation: a mismatch is not an error.
_NON_ARCH_FIELDS = ("bos_token_id", "eos_token_id", "init_std", "max_position_embeddings")


@dataclass(frozen=True)
class CheckpointInfo:
    """Contents of ``megatron_sega.json``."""

    spec: LlamaSpec
    padded_vocab_size: int
    dtype: str  # 'float32' | 'bfloat16' | 'float16'
    format_version: int = FORMAT_VERSION
    tokenizer_files: tuple[str, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def write_info(directory: str | Path, info: CheckpointInfo) -> None:
    data = {
        "format": FORMAT,
        "format_version": info.format_version,
        "spec": spec_to_dict(info.spec),
        "padded_vocab_size": info.padded_vocab_size,
        "dtype": info.dtype,
        "tokenizer_files": list(info.tokenizer_files),
    }
    path = Path(directory) / METADATA_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_info(directory: str | Path) -> CheckpointInfo:
    """``megatron_sega.json`` of a checkpoint directory; errors name the file and the fix."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a megatron-sega checkpoint "
                              "(write one with tools/convert.py hf-to-mcore)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format '{data.get('format')}' is not '{FORMAT}'")
        version = int(data["format_version"])
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version} is newer than this code "
                                  f"({FORMAT_VERSION}); update megatron-sega")
        return CheckpointInfo(
            spec=spec_from_dict(data["spec"]),
            padded_vocab_size=int(data["padded_vocab_size"]),
            dtype=dtype_name(DTYPES[data["dtype"]]),
            format_version=version,
            tokenizer_files=tuple(data.get("tokenizer_files", ())),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed ({type(err).__name__}: {err})") from None


def check_compatible(info: CheckpointInfo, spec: LlamaSpec, padded_vocab: int,
                     where: str = "checkpoint") -> None:
    """Raise if a model built from ``spec`` with ``padded_vocab`` rows cannot load ``info``."""
    ours, theirs = spec_to_dict(spec), spec_to_dict(info.spec)
    diffs = [f"{k}: checkpoint {theirs[k]!r} != model {ours[k]!r}" for k in ours
             if k not in _NON_ARCH_FIELDS and ours[k] != theirs[k]]
    if diffs:
        raise CheckpointError(f"{where}: model does not match the checkpoint: " + "; ".join(diffs))
    if padded_vocab != info.padded_vocab_size:
        raise CheckpointError(
            f"{where}: padded vocab {info.padded_vocab_size} in the checkpoint != {padded_vocab} "
            "for this model's TP; the padding is lcm(128, tp)-aligned, so pick a TP that gives "
            "the same padded size or re-convert with --tp set to the target TP")


def _model_padded_vocab(model) -> int:
    return int(model.vocab_size)


def model_chunks(model) -> list:
    """The bare ``GPTModel`` chunks of ``model``: one (possibly wrapped) model or a list of them."""
    return [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def sharded_model_state(model) -> dict:
    """The sharded state dict of this rank's chunks, keyed as Megatron-LM's checkpoints are:
    ``{"model": ...}`` for one chunk, ``{"model0": ..., "model1": ...}`` under virtual
    pipelining. The stored tensors carry global keys and offsets either way, so a checkpoint
    loads at any TP/PP/VPP whatever nesting it was saved with."""
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model_state(model, wanted: dict, loaded: dict) -> None:
    """Copy what ``dist_checkpointing.load(wanted)`` returned into the chunks, keeping only the
    model's own entries (a training checkpoint's common state also holds other objects)."""
    for chunk, key in zip(model_chunks(model), wanted):
        chunk.load_state_dict({k: v for k, v in loaded[key].items() if k in wanted[key]},
                              strict=True)


def save_model_checkpoint(model, directory: str | Path, *,
                          tokenizer_files: tuple[str, ...] = ()) -> None:
    """Collective over all ranks: save this model (every stage, every TP shard, every chunk) as
    ``torch_dist`` plus ``megatron_sega.json``. ``model``: one model from
    ``models.builder.build_model`` or this rank's chunks."""
    from megatron.core import dist_checkpointing

    first = model_chunks(model)[0]
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_model_state(model), str(directory))
    if dist.get_rank() == 0:
        write_info(directory, CheckpointInfo(
            spec=first.llama_spec, padded_vocab_size=_model_padded_vocab(first),
            dtype=dtype_name(first.config.params_dtype), tokenizer_files=tuple(tokenizer_files)))
    dist.barrier()


def load_model_checkpoint(model, directory: str | Path) -> CheckpointInfo:
    """Collective over all ranks: load a checkpoint into this rank's stage/shard of ``model``
    (one model or this rank's chunks; saved at any TP/PP/VPP: the tensors are resharded on load
    and cast to the model's dtype)."""
    from megatron.core import dist_checkpointing

    first = model_chunks(model)[0]
    info = read_info(directory)
    check_compatible(info, first.llama_spec, _model_padded_vocab(first), str(directory))
    from megatron_sega.checkpoint.manager import safe_loading  # (manager imports this module)

    wanted = sharded_model_state(model)
    with safe_loading(directory):  # checkpoints from elsewhere: metadata types only
        state = dist_checkpointing.load(wanted, str(directory))
    load_model_state(model, wanted, state)
    return info


# ----------------------------------------------------------------------------- streaming

def single_process_runtime():
    """TP=1/PP=1 Megatron groups in this (single) process, for the converters."""
    from megatron_sega import runtime

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ConversionError(
            f"the converter runs in one process, not {dist.get_world_size()}; launch it with "
            "python, not torchrun (it streams the model and needs no parallelism)")
    return runtime.setup(1, 1)


def build_skeleton(spec: LlamaSpec, dtype: torch.dtype, padded_vocab: int, rt):
    """The whole model (TP=1, PP=1) on the meta device: shapes and sharding, no memory."""
    from megatron_sega.models.builder import build_model

    meta_rt = dataclasses.replace(rt, device=torch.device("meta"))
    with torch.device("meta"):  # at TP=1, vocab_multiple=padded_vocab pads to exactly that
        skeleton = build_model(spec, meta_rt, dtype=dtype, use_te=False, attention="local",
                               vocab_multiple=padded_vocab)
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
    from megatron_sega.checkpoint.layout import layer_index

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
    from megatron_sega.checkpoint.manager import safe_loading

    with safe_loading(directory):
        loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    for key, target in targets.items():
        value = loaded.pop(key)
        if value.data_ptr() != target.data_ptr():  # not read in place
            target.copy_(value.reshape(target.shape))
    return full
