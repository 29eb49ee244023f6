"""HF Llama <-> Megatron-Core ``torch_dist`` conversion that streams tensor by tensor.

Process model: one process, whatever the target TP/PP. A ``torch_dist`` checkpoint stores
*global* tensors (each rank writes its shards at their global offsets, loaders reshard), so the
file written by one process for the TP=1/PP=1 skeleton is the checkpoint that TP=t/PP=p ranks
would have written together; the target layout only fixes the padded vocabulary and is
validated up front. N processes (one per target rank) would each hold a whole stage, N
stages together the whole model on one node; here peak memory is about the largest tensor
(the embedding, or one layer's ``linear_fc1``) twice, whatever the model size.

    hf-to-mcore: for each Megatron tensor, in checkpoint order: read its HF sources from the
                 safetensors files, re-layout (qkv groups, [gate; up], vocab padding), cast,
                 write, drop (see ``convert.streaming.save_streaming``).
    mcore-to-hf: for each group (embedding, layer i, final norm + head): load its full tensors
                 with ``dist_checkpointing.load``, split into HF tensors, truncate the vocab,
                 append to pre-planned safetensors shards, drop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from megatron_sega.checkpoint.fingerprint import combine, describe_difference, differing, \
    tensors_fingerprint
from megatron_sega.checkpoint.mcore import (
    CheckpointInfo, dtype_name, lora_base, read_info, resolve_checkpoint_dir, write_info,
)
from megatron_sega.checkpoint.names import TOKENIZER_DIR
from megatron_sega.convert import hf
from megatron_sega.convert import lora_export
from megatron_sega.convert.hf_io import (
    HFCheckpoint, ShardedSafetensorsWriter, copy_tokenizer_files, parse_dtype,
)
from megatron_sega.convert.record import already_converted, conversion_record, write_record
from megatron_sega.convert.streaming import (
    build_skeleton, load_streaming, save_streaming, single_process_runtime, stream_groups,
)
from megatron_sega.errors import ConversionError
from megatron_sega.models.lora import is_adapter
from megatron_sega.models.spec import from_hf_config, to_hf_config
from megatron_sega.runtime import validate_parallel_sizes

DEFAULT_SHARD_BYTES = 5 * 10**9


def _partial(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


@contextlib.contextmanager
def _output_dir(path: Path, record: dict) -> Iterator[Path]:
    """A fresh ``.name.partial`` sibling to write into, renamed to ``path`` on success and
    removed on failure: an interrupted conversion never leaves a checkpoint that looks whole.
    The caller has found ``path`` free (``already_converted``). The conversion's ``record`` goes
    in last, so a rerun finds it only in a whole output."""
    partial = _partial(path)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        write_record(partial, record)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        path.rmdir()
    os.replace(partial, path)


def _check_skeleton_names(skeleton, spec) -> None:
    names = {n for n in skeleton.state_dict() if not n.endswith("_extra_state") and
             not is_adapter(n)}
    expected = set(hf.megatron_names(spec))
    if names != expected:
        raise ConversionError(f"internal: model tensors differ from the Llama layout: "
                              f"{sorted(names ^ expected)[:5]}")


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1,
                dtype: Optional[str] = None, vocab_multiple: int = 128) -> CheckpointInfo:
    """Convert a HF Llama safetensors checkpoint to a ``torch_dist`` checkpoint for TP=``tp``,
    PP=``pp`` (loadable at any layout with the same padded vocab). ``dtype``: 'bf16' | 'fp32' |
    None (keep the checkpoint's). Single process; tokenizer files are copied along."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    spec = from_hf_config(hf_dir)
    validate_parallel_sizes(tp, pp, tp * pp, num_layers=spec.num_layers,
                            num_attention_heads=spec.num_attention_heads,
                            num_query_groups=spec.num_query_groups)
    source = HFCheckpoint(hf_dir)
    hf.check_hf_tensors(source.shapes, spec, str(hf_dir))
    target = parse_dtype(dtype) or source.dtypes["model.embed_tokens.weight"]
    padded = spec.padded_vocab_size(tp, vocab_multiple)
    record = conversion_record("hf-to-mcore", hf_dir, (out_dir, _partial(out_dir)), tp=tp, pp=pp, dtype=dtype_name(target),
                               vocab_multiple=vocab_multiple)
    if already_converted(out_dir, record):  # a rerun after the rename: nothing to do
        return read_info(out_dir)
    skeleton = build_skeleton(spec, target, padded, single_process_runtime())
    _check_skeleton_names(skeleton, spec)
    used: set[str] = set()

    def fetch(name: str):
        sources = hf.hf_sources(name)
        used.update(sources)
        return hf.to_megatron(name, source.read(sources), spec, padded).to(target)

    with _output_dir(out_dir, record) as tmp:
        save_streaming(skeleton, tmp, fetch)
        unused = set(hf.hf_shapes(spec)) - used
        if unused:
            raise ConversionError(f"internal: HF tensors not converted: {sorted(unused)[:5]}")
        tokenizer = copy_tokenizer_files(hf_dir, tmp / TOKENIZER_DIR)
        info = CheckpointInfo(spec=spec, padded_vocab_size=padded, dtype=dtype_name(target),
                              tokenizer_files=tuple(tokenizer))
        write_info(tmp, info)
    return info


def _export_group(writer: ShardedSafetensorsWriter, tensors: dict, spec, target) -> None:
    """Write one group's HF tensors; a function so that no reference (e.g. a loop variable
    holding a view of the embedding) outlives the group and doubles the next group's peak."""
    for name in list(tensors):
        for hf_name, tensor in hf.to_hf(name, tensors.pop(name), spec).items():
            writer.write(hf_name, tensor.to(target))


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, *, dtype: Optional[str] = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, lora_alpha: Optional[float] = None,
                peft_adapter: bool = False) -> Path:
    """Convert a megatron-sega ``torch_dist`` checkpoint (any TP/PP it was saved at) to a HF
    Llama directory: ``config.json``, safetensors (sharded above ``max_shard_bytes``, with
    ``model.safetensors.index.json``) and the tokenizer files. Single process.

    A checkpoint with LoRA adapters (base + ``*.lora_a``/``*.lora_b``) takes its alpha from
    ``megatron_sega.json`` (or ``lora_alpha`` where an older one does not record it); its adapters are merged into the weights (``W + alpha / rank * B A``), or,
    with ``peft_adapter``, written instead as a PEFT adapter directory for the HF base
    (see ``convert.lora_export``). A LoRA training checkpoint holds its adapters only: the base
    weights come from the checkpoint it points at, whose fingerprint must not have changed."""
    # A converted checkpoint, a training checkpoint (step_*/model_optim) or a save directory.
    mcore_dir, out_dir = resolve_checkpoint_dir(str(mcore_dir)), Path(out_dir)
    info = read_info(mcore_dir)
    spec = info.spec
    adapters = lora_export.stored_adapters(mcore_dir)
    lora_alpha = lora_export.export_alpha(lora_alpha, info.lora, str(mcore_dir))
    lora_export.check_export(adapters, peft_adapter, lora_alpha, str(mcore_dir))
    target = parse_dtype(dtype) or info.torch_dtype
    record = conversion_record("mcore-to-hf", mcore_dir, (out_dir, _partial(out_dir)),
                               dtype=dtype_name(target), max_shard_bytes=max_shard_bytes,
                               **({} if adapters is None else
                                  {"lora_alpha": lora_alpha, "peft_adapter": peft_adapter}))
    if already_converted(out_dir, record):  # a rerun after the rename: nothing to do
        return out_dir
    lora = None if adapters is None else adapters.settings(lora_alpha)
    skeleton = build_skeleton(spec, info.torch_dtype, info.padded_vocab_size,
                              single_process_runtime(), lora=lora)
    _check_skeleton_names(skeleton, spec)
    groups = list(stream_groups(skeleton))
    source = _Source(skeleton, mcore_dir, _adapter_base(info, mcore_dir))
    with _output_dir(out_dir, record) as tmp:
        if peft_adapter:
            _export_peft(tmp, source, groups, adapters, lora_alpha, spec, target)
        else:
            _export_weights(tmp, source, groups, lora, spec, target, max_shard_bytes)
        copy_tokenizer_files(mcore_dir / TOKENIZER_DIR, tmp)
    return out_dir


class _Source:
    """Where the tensors of an export come from: ``mcore_dir`` (read through ``skeleton``), or,
    for a LoRA checkpoint of adapters only, the base weights from ``base`` (its directory, its
    skeleton and its recorded fingerprint, checked against what was read)."""

    def __init__(self, skeleton, mcore_dir: Path, base: Optional[tuple] = None):
        self.skeleton, self.mcore_dir, self.base = skeleton, mcore_dir, base
        self.fingerprint: dict = {}

    def read(self, names: list[str]) -> dict:
        if self.base is None:
            return load_streaming(self.skeleton, self.mcore_dir, names)
        base_dir, base_skeleton, _ = self.base
        weights = [n for n in names if not is_adapter(n)]
        tensors = load_streaming(base_skeleton, base_dir, weights) if weights else {}
        self.fingerprint = combine(self.fingerprint, tensors_fingerprint(
            tensors.items(), self.skeleton.llama_spec.vocab_size))
        adapters = [n for n in names if is_adapter(n)]
        if adapters:
            tensors.update(load_streaming(self.skeleton, self.mcore_dir, adapters))
        return tensors

    def check_base(self) -> None:
        """After every base weight was read: they are those the adapters trained on."""
        if self.base is None:
            return
        base_dir, _, recorded = self.base
        changed = differing(recorded, self.fingerprint)
        if changed:
            raise ConversionError(
                f"{self.mcore_dir} holds LoRA adapters trained on the base {base_dir}, whose "
                f"weights have changed since ({describe_difference(changed)}); restore that base "
                "to export these adapters merged, or export them with --peft-adapter")


def _adapter_base(info: CheckpointInfo, mcore_dir: Path) -> Optional[tuple]:
    """(directory, skeleton, fingerprint) of the base of a LoRA adapter checkpoint, or None for
    a checkpoint that holds its own weights."""
    base = lora_base(info)
    if base is None:
        return None
    if base.get("path") is None:
        raise ConversionError(
            f"{mcore_dir} holds LoRA adapters on random weights (model.init_seed = "
            f"{base.get('init_seed')}), which the converter does not rebuild; train from a "
            "converted checkpoint (model.load) to export")
    base_dir = Path(base["path"])
    if not base_dir.is_dir():
        raise ConversionError(f"{mcore_dir} holds LoRA adapters only; their base checkpoint "
                              f"{base_dir} is missing. Put the base back at {base_dir}")
    base_info = read_info(base_dir)
    skeleton = build_skeleton(base_info.spec, base_info.torch_dtype, base_info.padded_vocab_size,
                              single_process_runtime())
    return base_dir, skeleton, base["fingerprint"]


def _export_weights(tmp: Path, source: _Source, groups: list[list[str]], lora,
                    spec, target, max_shard_bytes: int) -> None:
    """HF weights and config.json, the adapters (if any) merged, one load group at a time."""
    entries = [(n, hf.hf_shape(n, spec), target) for group in groups for name in group
               if not is_adapter(name) for n in hf.hf_sources(name)]
    writer = ShardedSafetensorsWriter(tmp, entries, max_shard_bytes)
    for group in groups:
        tensors = source.read(group)
        if lora is not None:
            tensors = lora_export.merge_group(tensors, lora.scale)
        _export_group(writer, tensors, spec, target)
    source.check_base()
    writer.close()
    config = to_hf_config(spec, torch_dtype=dtype_name(target))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _export_peft(tmp: Path, source: _Source, groups: list[list[str]], adapters,
                 alpha: float, spec, target) -> None:
    """The PEFT adapter directory: only the adapter tensors are read."""
    out: dict = {}
    for group in groups:
        names = [n for n in group if is_adapter(n)]
        tensors = source.read(names) if names else {}
        for name in names:
            if name.endswith(".lora_a"):
                b = tensors[name.removesuffix("_a") + "_b"]
                out.update(lora_export.peft_tensors(name, tensors[name], b, spec))
    lora_export.write_peft_adapter(tmp, out, lora_export.peft_config(adapters, alpha), target)
