"""Llama presets, HF config.json import/export, the per-stage model builder and random init."""

from megatron_sega.models.spec import (
    PRESETS,
    LlamaSpec,
    ModelConfigError,
    RopeScaling,
    from_hf_config,
    preset,
    spec_from_dict,
    spec_to_dict,
    to_hf_config,
)

__all__ = [
    "PRESETS",
    "LlamaSpec",
    "ModelConfigError",
    "RopeScaling",
    "from_hf_config",
    "preset",
    "spec_from_dict",
    "spec_to_dict",
    "to_hf_config",
]
