"""LoRA adapters of a Megatron checkpoint as Hugging Face tensors: merged into the base weights,
or as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Pure tensor functions plus the two small readers the converter needs. An adapter on a fused
Megatron layer becomes per-projection adapters *exactly*: the delta ``B A`` of ``linear_qkv``
has rows grouped per query group like its weight, so q, k and v each take the same A and
their rows of B (``hf.qkv_to_hf`` on B, as on the weight); ``linear_fc1``'s rows are
``[gate; up]``, so gate and up take the same A and B's halves. Then each projection's ``B_p A``
is the fused delta's rows for ``p``, and ``W_p + scale * B_p A`` is the merged weight's rows.
PEFT scales by ``lora_alpha / r`` as Megatron does (``use_rslora`` off).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from megatron_sega.convert import hf
from megatron_sega.errors import ConversionError
from megatron_sega.models.lora import TARGETS, LoraSettings, is_adapter
from megatron_sega.models.spec import LlamaSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Megatron target -> the HF modules it becomes (PEFT's target_modules).
HF_MODULES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
_ADAPTER = re.compile(r"^decoder\.layers\.\d+\.\w+\.(\w+)\.lora_[ab]$")


@dataclass(frozen=True)
class StoredAdapters:
    """What a checkpoint's adapter tensors tell: their rank (from A's shape) and targets."""

    rank: int
    targets: tuple[str, ...]

    def settings(self, alpha: float) -> LoraSettings:
        return LoraSettings(self.rank, alpha, 0.0, self.targets)


def stored_adapters(directory: str | Path) -> Optional[StoredAdapters]:
    """The LoRA adapters a ``torch_dist`` checkpoint holds, or None when it holds none. The
    checkpoint does not record alpha (only the tensors), so the caller must be told it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_sega.checkpoint.safe_loading import safe_loading

    with safe_loading(directory):
        meta = load_sharded_metadata(str(directory))
    a = [v for v in meta.values() if isinstance(v, ShardedTensor) and v.key.endswith(".lora_a")]
    if not a:
        return None
    ranks = {v.global_shape[-2] for v in a}
    if len(ranks) != 1:
        raise ConversionError(f"{directory}: LoRA adapters of different ranks {sorted(ranks)}")
    targets = tuple(t for t in TARGETS if any(f".{t}.lora_a" in v.key for v in a))
    return StoredAdapters(ranks.pop(), targets)


def export_alpha(given: Optional[float], recorded: Optional[dict], where: str
                 ) -> Optional[float]:
    """The adapters' alpha: the one ``megatron_sega.json`` records (``lora``), or
    ``--lora-alpha`` for a checkpoint that records none; a different ``--lora-alpha`` than the
    recorded one is refused (it would export other weights than the run trained)."""
    saved = (recorded or {}).get("alpha")
    if saved is not None and given is not None and float(given) != float(saved):
        raise ConversionError(f"--lora-alpha {given:g}: {where} records lora.alpha = {saved:g}; "
                              "drop --lora-alpha")
    return given if saved is None else float(saved)


def check_export(adapters: Optional[StoredAdapters], peft_adapter: bool,
                 lora_alpha: Optional[float], where: str) -> None:
    """Refuse an export the checkpoint cannot give: a PEFT adapter without adapters, or
    adapters without their alpha (a checkpoint written before ``megatron_sega.json`` recorded
    it: see :func:`export_alpha`)."""
    if adapters is None:
        if peft_adapter:
            raise ConversionError(f"{where} holds no LoRA adapters, so there is no PEFT adapter "
                                  "to export; drop --peft-adapter to export its weights")
        return
    if lora_alpha is None:
        raise ConversionError(f"{where} holds LoRA adapters (rank {adapters.rank}) and does not "
                              "record their alpha; pass the run's lora.alpha as --lora-alpha")
    if not lora_alpha > 0:
        raise ConversionError(f"--lora-alpha {lora_alpha}: must be > 0")


def adapter_target(name: str) -> str:
    """The adapted layer (``linear_qkv``, …) of an adapter's canonical name."""
    match = _ADAPTER.match(name)
    if not match:
        raise ConversionError(f"'{name}' is not a LoRA adapter name")
    return match.group(1)


def delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B A`` in fp32 (whatever the stored dtype), the adapter's weight update."""
    return scale * (b.float() @ a.float())


def merge_group(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """One load group's tensors with every adapter merged into its layer's weight,
    ``W + scale * B A`` (added in fp32, cast back), and the adapters dropped."""
    out = {}
    for name, tensor in tensors.items():
        if is_adapter(name):
            continue
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_a" in tensors:
            update = delta(tensors[f"{layer}.lora_a"], tensors[f"{layer}.lora_b"], scale)
            tensor = (tensor.float() + update).to(tensor.dtype)
        out[name] = tensor
    return out


def peft_tensors(name_a: str, a: torch.Tensor, b: torch.Tensor,
                 spec: LlamaSpec) -> dict[str, torch.Tensor]:
    """PEFT's tensors for one Megatron adapter (``name_a`` is its ``….lora_a``): per HF
    projection, ``lora_A`` (shared by a fused layer's projections) and its rows of ``lora_B``."""
    target = adapter_target(name_a)
    weight = name_a.removesuffix(".lora_a") + ".weight"
    if target == "linear_qkv":
        b_parts = hf.qkv_to_hf(b, spec)
    elif target == "linear_fc1":
        b_parts = tuple(t.contiguous() for t in b.chunk(2, dim=0))
    else:
        b_parts = (b,)
    out = {}
    for source, b_part in zip(hf.hf_sources(weight), b_parts):
        module = PEFT_PREFIX + source.removesuffix(".weight")
        out[f"{module}.lora_A.weight"] = a.clone()  # a copy each: safetensors refuses aliases
        out[f"{module}.lora_B.weight"] = b_part.contiguous()
    return out


def peft_config(adapters: StoredAdapters, alpha: float,
                base_model: Optional[str] = None) -> dict:
    """``adapter_config.json`` for ``peft.PeftModel.from_pretrained`` (LoRA, causal LM)."""
    modules = [m for t in adapters.targets for m in HF_MODULES[t]]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": adapters.rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": modules, "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }


def write_peft_adapter(directory: Path, tensors: Mapping[str, torch.Tensor], config: dict,
                       dtype: torch.dtype) -> None:
    """The adapter directory: config and weights (small: written in one piece)."""
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()},
              str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n",
                                            encoding="utf-8")
