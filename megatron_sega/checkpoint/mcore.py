"""Megatron-Core ``torch_dist`` checkpoints of a Llama model, plus our small metadata file.

A checkpoint directory holds what ``megatron.core.dist_checkpointing.save`` writes for the
model's ``sharded_state_dict()`` (``metadata.json``, ``.metadata``, ``__*_*.distcp``) and
``megatron_sega.json``: the ``LlamaSpec``, the padded vocabulary, the dtype and a format version,
so a loader can refuse a mismatched model with a clear message before reading a byte.
``dist_checkpointing`` stores global tensors, so a checkpoint written at one TP/PP loads at any
other whose padded vocabulary is the same (``LlamaSpec.padded_vocab_size``).

The converters (``megatron_sega.convert``) write and read this same format one tensor at a
time; training checkpoints (``checkpoint.manager``) hold one in their ``model_optim`` directory.
File names: ``checkpoint.names``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sega.checkpoint.names import (
    LATEST_FILE, METADATA_FILE, MODEL_OPTIM_DIR, TOKENIZER_DIR,
)
from megatron_sega.checkpoint.retention import find_latest, is_complete
from megatron_sega.checkpoint.safe_loading import safe_loading
from megatron_sega.errors import CheckpointError
from megatron_sega.models.builder import unwrap_model as unwrap
from megatron_sega.models.spec import LlamaSpec, spec_from_dict, spec_to_dict

FORMAT = "megatron_sega.torch_dist"
FORMAT_VERSION = 1
# LlamaSpec fields that do not change the computation: a mismatch is not an error.
_NON_ARCH_FIELDS = ("bos_token_id", "eos_token_id", "init_std", "max_position_embeddings")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' | 'bfloat16' | 'float16' (the HF config.json spelling)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CheckpointInfo:
    """Contents of ``megatron_sega.json``."""

    spec: LlamaSpec
    padded_vocab_size: int
    dtype: str  # 'float32' | 'bfloat16' | 'float16'
    format_version: int = FORMAT_VERSION
    tokenizer_files: tuple[str, ...] = ()
    # LoRA adapters the checkpoint holds ({rank, alpha, dropout, targets}), or None.
    lora: Optional[dict] = None

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
    if info.lora:
        data["lora"] = info.lora
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
            lora=data.get("lora"),
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


def sharded_model_state(model, loading_from: Optional[str | Path] = None) -> dict:
    """The sharded state dict of this rank's chunks, keyed as Megatron-LM's checkpoints are:
    ``{"model": ...}`` for one chunk, ``{"model0": ..., "model1": ...}`` under virtual
    pipelining. The stored tensors carry global keys and offsets either way, so a checkpoint
    loads at any TP/PP/VPP whatever nesting it was saved with.

    ``loading_from``: the checkpoint directory this state is to be loaded from; its absent
    ``_extra_state`` entries are kept local (:func:`keep_absent_extra_state_local`)."""
    chunks = model_chunks(model)
    if len(chunks) == 1:
        state = {"model": chunks[0].sharded_state_dict()}
    else:
        state = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    if loading_from is not None:
        keep_absent_extra_state_local(state, loading_from)
    return state


def keep_absent_extra_state_local(state: dict, directory: str | Path) -> list[str]:
    """Turn the entries of ``state`` that the checkpoint in ``directory`` may lack and does
    lack into ``LocalNonpersistentObject``s, in place; return their keys. Two kinds:

    - ``*._extra_state`` objects. Transformer Engine modules (and Megatron-Core's final norm
      whenever TE imports, whatever the layer spec) add one (their FP8 metadata); a checkpoint
      written where TE does not import (``tools/convert.py`` on a login node, a CPU run) has
      none, and DCP would raise "Missing key";
    - LoRA adapters (``*.lora_a``, ``*.lora_b``): a LoRA run starting from a base checkpoint
      keeps the adapters it initialised.

    Kept local, the module's own value is loaded back, so the strict ``load_state_dict`` that
    follows still sees every key. Other weights are never dropped: a missing tensor still fails
    the load. The reverse direction needs nothing: a checkpoint's extra entries are not read."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject, ShardedObject, ShardedTensor, ShardedTensorFactory,
    )
    stored = stored_keys(directory)
    kept: list[str] = []

    def optional(x) -> bool:  # (a gated fc1's B is stored through a factory, as its weight)
        return (isinstance(x, ShardedObject) and x.key.endswith("_extra_state")) or (
            isinstance(x, (ShardedTensor, ShardedTensorFactory))
            and x.key.endswith((".lora_a", ".lora_b")))

    def local(x):
        if optional(x) and x.key not in stored:
            kept.append(x.key)
            return LocalNonpersistentObject(x.data)
        return x

    dict_list_map_inplace(local, state)
    return kept


def stored_keys(directory: str | Path) -> set[str]:
    """The keys of the tensors and objects a ``torch_dist`` checkpoint holds."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    with safe_loading(directory):
        return {obj.key for obj in load_sharded_metadata(str(directory)).values()}


def lora_info(model) -> Optional[dict]:
    """The LoRA settings of ``model``'s adapters (what ``megatron_sega.json`` records), or
    None without adapters."""
    from megatron_sega.models.lora import adapters

    module = next((m for chunk in model_chunks(model) for _, m in adapters(chunk)), None)
    if module is None:
        return None
    lora = module.lora
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
            "targets": list(lora.targets)}


def check_adapters(model, directory: str | Path, info: CheckpointInfo) -> None:
    """The model's adapters can take the checkpoint's: a LoRA checkpoint loaded without
    ``lora.rank`` would silently be its base, and one of another rank, scale or targets would
    not load or would mean other weights. Errors name the options to set."""
    from megatron_sega.models.lora import is_adapter

    saved = info.lora
    if saved is None and any(is_adapter(k) for k in stored_keys(directory)):
        saved = {}  # adapters written before megatron_sega.json recorded them
    if saved is None:
        return
    ours = lora_info(model)
    wanted = " ".join(f"lora.{k}=" + (f"[{','.join(v)}]" if k == "targets" else f"{v:g}")
                      for k, v in saved.items() if k in ("rank", "alpha", "targets"))
    if ours is None:
        raise CheckpointError(
            f"{directory} holds LoRA adapters but lora.rank is 0, so they would be ignored; "
            f"load it with the run's LoRA settings: {wanted or 'lora.rank=R'}")
    mismatch = [k for k in ("rank", "alpha", "targets") if k in saved and saved[k] != ours[k]]
    if mismatch:
        raise CheckpointError(
            f"{directory} holds LoRA adapters with other {', '.join(mismatch)} than this run's "
            f"({', '.join(f'{k}={ours[k]}' for k in mismatch)}); set {wanted}")


def load_model_state(model, wanted: dict, loaded: dict, *, adapters_only: bool = False) -> None:
    """Copy what ``dist_checkpointing.load(wanted)`` returned into the chunks, keeping only the
    model's own entries (a training checkpoint's common state also holds other objects).
    ``adapters_only``: ``wanted`` holds the adapters only (:func:`adapter_state`); the base
    weights already in the chunks stay."""
    for chunk, key in zip(model_chunks(model), wanted):
        chunk.load_state_dict({k: v for k, v in loaded[key].items() if k in wanted[key]},
                              strict=not adapters_only)


def adapter_state(state: dict) -> dict:
    """``state`` (:func:`sharded_model_state`) reduced to the LoRA adapters: what a LoRA
    training checkpoint stores, and what is read back from one."""
    from megatron_sega.models.lora import is_adapter

    return {chunk: {k: v for k, v in entries.items() if is_adapter(k)}
            for chunk, entries in state.items()}


def lora_base(info: CheckpointInfo) -> Optional[dict]:
    """The base record of a LoRA checkpoint that holds only its adapters (``path``,
    ``fingerprint``; ``init_seed`` for a randomly initialised base), or None."""
    return (info.lora or {}).get("base")


def check_base(model, base: dict, directory: str | Path,
               fingerprint: Optional[dict] = None) -> None:
    """The base weights in ``model`` (or given by their ``fingerprint``) are those the
    adapters of ``directory`` trained on (collective when the fingerprint is computed)."""
    from megatron_sega.checkpoint.fingerprint import describe_difference, differing, \
        model_fingerprint

    if fingerprint is None:
        chunks = model_chunks(model)
        fingerprint = model_fingerprint(chunks, chunks[0].llama_spec.vocab_size)
    changed = differing(base["fingerprint"], fingerprint)
    if changed:
        where = base.get("path") or f"random weights (model.init_seed = {base.get('init_seed')})"
        raise CheckpointError(
            f"{directory} holds LoRA adapters trained on the base {where}, and the base weights "
            f"loaded now differ ({describe_difference(changed)}); adapters mean nothing on "
            "other weights: restore that base, or train new adapters from this one")


def load_base(model, base: dict, directory: str | Path) -> None:
    """Collective: load the base a LoRA adapter checkpoint points at into ``model`` (its
    recorded checkpoint, or the random weights of its seed) and check its fingerprint."""
    path = base.get("path")
    if path is None:
        from megatron.core import parallel_state as ps

        from megatron_sega.models.init import random_init

        first = model_chunks(model)[0]
        random_init(model_chunks(model), first.llama_spec, ps.get_tensor_model_parallel_world_size(),
                    ps.get_tensor_model_parallel_rank(), int(base["init_seed"]))
    elif not (Path(path) / METADATA_FILE).is_file():
        raise CheckpointError(
            f"{directory} holds LoRA adapters only; their base checkpoint {path} is missing. "
            f"Put the base back at {path} (the adapters were trained on it)")
    else:
        load_model_checkpoint(model, path)
    check_base(model, base, directory)


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
            dtype=dtype_name(first.config.params_dtype), tokenizer_files=tuple(tokenizer_files),
            lora=lora_info(first)))
    dist.barrier()


def load_model_checkpoint(model, directory: str | Path) -> CheckpointInfo:
    """Collective over all ranks: load a checkpoint into this rank's stage/shard of ``model``
    (one model or this rank's chunks; saved at any TP/PP/VPP: the tensors are resharded on load
    and cast to the model's dtype). A LoRA checkpoint of adapters only (a training run's, see
    ``checkpoint.manager``) loads its base first, from the checkpoint it points at, and refuses
    a base whose fingerprint changed."""
    from megatron.core import dist_checkpointing

    first = model_chunks(model)[0]
    info = read_info(directory)
    check_compatible(info, first.llama_spec, _model_padded_vocab(first), str(directory))
    check_adapters(model, directory, info)
    base = lora_base(info)
    if base is not None:  # a LoRA checkpoint of adapters only: its base first
        load_base(model, base, directory)
    wanted = sharded_model_state(model, loading_from=directory)
    if base is not None:
        wanted = adapter_state(wanted)
    with safe_loading(directory):  # checkpoints from elsewhere: metadata types only
        state = dist_checkpointing.load(wanted, str(directory))
    load_model_state(model, wanted, state, adapters_only=base is not None)
    return info


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The torch_dist model directory behind ``path``: a converted checkpoint itself, a training
    checkpoint's ``model_optim``, or the latest checkpoint of a save directory. ``latest`` is
    followed only to a complete checkpoint; when it names a missing or incomplete one (a crash
    between a save and its pointer), the newest complete checkpoint is taken instead."""
    directory = Path(path)
    latest = directory / LATEST_FILE
    if latest.is_file():
        named = directory / latest.read_text().strip()
        if is_complete(named):
            directory = named
        else:
            found = find_latest(directory, warn=False)
            if found is None:
                raise CheckpointError(
                    f"{latest} names {named.name}, which is missing or incomplete, and "
                    f"{directory} holds no complete checkpoint; point the path at a complete "
                    "checkpoint (a step_* directory with a COMPLETE file)")
            directory = found
    if (directory / MODEL_OPTIM_DIR).is_dir():
        directory = directory / MODEL_OPTIM_DIR
    return directory


def checkpoint_spec(path: str | Path) -> Optional[LlamaSpec]:
    """The LlamaSpec recorded in the checkpoint behind ``path`` (see
    :func:`resolve_checkpoint_dir`), or None when ``path`` holds no megatron-sega checkpoint."""
    directory = resolve_checkpoint_dir(path)
    if not (directory / METADATA_FILE).is_file():
        return None
    return read_info(directory).spec


def checkpoint_tokenizer_dir(path: str | Path) -> Optional[Path]:
    """The tokenizer directory that travels inside the checkpoint behind ``path``, if any."""
    candidate = resolve_checkpoint_dir(path) / TOKENIZER_DIR
    return candidate if candidate.is_dir() else None
