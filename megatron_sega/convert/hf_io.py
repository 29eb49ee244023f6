"""Hugging Face checkpoint directories, read and written one tensor at a time.

Reading: names, shapes and dtypes come from the safetensors headers; a tensor is read by opening
its file with ``safetensors.safe_open`` just for that read. safetensors memory-maps the file and
every page touched stays resident (and counted in RSS) while the handle lives, so a handle held
across the whole conversion would grow to the size of the checkpoint; per-read handles keep only
the tensors in use mapped. Pickled ``pytorch_model.bin`` checkpoints are refused, never unpickled.

Writing: the shard plan (which tensor goes in which file, at which offset) is fixed before the
first byte, so each safetensors header is written up front and tensors are streamed in order
(``safetensors.torch.save_file`` would need a whole shard in memory).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from megatron_sega.checkpoint.mcore import DTYPES
from megatron_sega.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files that travel with the weights: tokenizer, chat template, generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype '{name}'; choose one of bf16, fp32, fp16")
    return DTYPES[name]


class HFCheckpoint:
    """A HF safetensors checkpoint directory: tensor names, shapes and dtypes, and lazy reads."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"{self.directory}: no such directory")
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConversionError(f"{index}: not a safetensors index ({err})") from None
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = None
        elif any(self.directory.glob("pytorch_model*.bin")):
            raise ConversionError(
                f"{self.directory}: only pickled pytorch_model*.bin weights found; they are not "
                "loaded (unpickling runs code). Re-save the model with safetensors "
                "(save_pretrained(..., safe_serialization=True))")
        else:
            raise ConversionError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for file in files:
            path = self.directory / file
            if not path.is_file():
                raise ConversionError(f"{index}: names shard '{file}', which does not exist")
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.file_of[name] = path
                    self.shapes[name] = tuple(view.get_shape())
                    self.dtypes[name] = _torch_dtype(view.get_dtype(), name)
        if weight_map:
            listed_only = set(weight_map) - set(self.file_of)
            if listed_only:
                raise ConversionError(f"{index}: tensor(s) {sorted(listed_only)[:5]} are listed "
                                      "but not in their shard")

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors; each file is opened for this read only (see module docstring)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.file_of:
                raise ConversionError(f"{self.directory}: missing tensor '{name}'")
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with safe_open(path, framework="pt") as handle:
                for name in file_names:
                    out[name] = handle.get_tensor(name)
        return out


def _torch_dtype(st_dtype: str, name: str) -> torch.dtype:
    for dtype, code in _ST_DTYPES.items():
        if code == st_dtype:
            return dtype
    raise ConversionError(f"tensor '{name}' has dtype {st_dtype}; expected F32, BF16 or F16")


class ShardedSafetensorsWriter:
    """Writes known tensors, in a known order, into ``model.safetensors`` or size-capped shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""

    def __init__(self, directory: str | Path,
                 entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 10**9):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        count = len(shards)
        self._files = [SINGLE_FILE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._shards = shards
        self._queue = [(i, e) for i, shard in enumerate(shards) for e in shard]
        self._next = 0
        self._stream = None
        self._open_shard = -1
        self.total_size = sum(entry[3] for _, entry in self._queue)

    def _open(self, shard: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self._shards[shard]:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
        self._stream = open(self.directory / self._files[shard], "wb")
        self._stream.write(struct.pack("<Q", len(raw)))
        self._stream.write(raw)
        self._open_shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan (names must come in plan order)."""
        if self._next >= len(self._queue):
            raise ConversionError(f"tensor '{name}' written after the last planned tensor")
        shard, (expected, shape, dtype, _) = self._queue[self._next]
        if name != expected:
            raise ConversionError(f"tensor '{name}' written out of order; expected '{expected}'")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"tensor '{name}': {tuple(tensor.shape)} {tensor.dtype}, planned "
                                  f"{shape} {dtype}")
        if shard != self._open_shard:
            self._close_stream()
            self._open(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._stream.write(memoryview(data.numpy()))
        self._next += 1

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Finish the last shard and write the index (sharded checkpoints only)."""
        self._close_stream()
        if self._next != len(self._queue):
            missing = [entry[0] for _, entry in self._queue[self._next:]]
            raise ConversionError(f"safetensors export incomplete; not written: {missing[:5]}")
        if len(self._files) > 1:
            weight_map = {e[0]: self._files[i] for i, e in self._queue}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n",
                                                     encoding="utf-8")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_tokenizer_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copy the tokenizer (and generation config) files present in ``source``; return their
    names."""
    source, destination = Path(source), Path(destination)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied
