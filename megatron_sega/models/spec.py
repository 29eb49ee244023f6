"""The Llama architecture as data: presets, HF ``config.json`` import/export, vocab padding.

``LlamaSpec`` is the one place where model shapes live; the builder turns it into Megatron-Core's
``TransformerConfig`` and the converter into a HF ``config.json``. Shell scripts never repeat shapes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_sega.errors import ModelConfigError


# A layer's norm weights as the TE layout names them (fused into the next linear layer) and as
# the local layout does; the converters' canonical names are the local ones.
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (HF ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaSpec:
    """Shapes and numerics of a Llama model (Llama 2, 3, 3.1)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # the model's rows before TP padding; >= the tokenizer's (Session.vocab_size)
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    head_dim: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # an int or a list of ints, as in HF configs
    init_std: float = 0.02

    def __post_init__(self) -> None:
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ModelConfigError(
                f"num_attention_heads({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ModelConfigError(
                f"hidden_size({self.hidden_size}) is not divisible by "
                f"num_attention_heads({self.num_attention_heads}); set head_dim explicitly"
            )

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int, multiple: int = 128) -> int:
        """Vocab rounded up to a multiple of lcm(multiple, tp): every TP rank gets an equal shard,
        and for power-of-two TP <= ``multiple`` the padded size does not depend on TP, so a
        checkpoint reshards across TP layouts without changing shapes."""
        step = math.lcm(multiple, tp)
        return math.ceil(self.vocab_size / step) * step

    def replace(self, **changes: Any) -> "LlamaSpec":
        return dataclasses.replace(self, **changes)


_LLAMA3_ROPE = RopeScaling(8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, LlamaSpec] = {
    "llama2-7b": LlamaSpec(32, 4096, 11008, 32, 32, 32000, 4096, 10000.0, None, 1e-5,
                           bos_token_id=1, eos_token_id=2),
    "llama3-8b": LlamaSpec(32, 4096, 14336, 32, 8, 128256, 8192, 500000.0, None, 1e-5,
                           bos_token_id=128000, eos_token_id=128001),
    "llama3.1-8b": LlamaSpec(32, 4096, 14336, 32, 8, 128256, 131072, 500000.0, _LLAMA3_ROPE,
                             1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "llama3-70b": LlamaSpec(80, 8192, 28672, 64, 8, 128256, 8192, 500000.0, None, 1e-5,
                            bos_token_id=128000, eos_token_id=128001),
    "llama3.1-70b": LlamaSpec(80, 8192, 28672, 64, 8, 128256, 131072, 500000.0, _LLAMA3_ROPE,
                              1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    # A few layers that run in seconds on a CPU; GQA and an untied head like the real ones.
    "tiny": LlamaSpec(4, 64, 176, 4, 2, 512, 256, 10000.0, None, 1e-5,
                      bos_token_id=1, eos_token_id=2),
}


def preset(name: str, **overrides: Any) -> LlamaSpec:
    """A preset by name, optionally with fields replaced (e.g. ``vocab_size`` of a tokenizer)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelConfigError(
            f"unknown model preset '{name}'{hint}; valid presets: {', '.join(sorted(PRESETS))}"
        )
    spec = PRESETS[name]
    return spec.replace(**overrides) if overrides else spec


def _rope_scaling_from_hf(raw: Optional[dict], path: str) -> Optional[RopeScaling]:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ModelConfigError(
            f"{path}: rope_scaling type '{kind}' is not supported (only Llama 3.1's 'llama3'); "
            "remove rope_scaling or convert a supported Llama checkpoint"
        )
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )


def from_hf_config(config: dict | str | Path) -> LlamaSpec:
    """A ``LlamaSpec`` from a HF Llama ``config.json`` (a path, a directory or a dict)."""
    path = "<dict>"
    if not isinstance(config, dict):
        path = str(config)
        file = Path(config)
        if file.is_dir():
            file = file / "config.json"
        if not file.is_file():
            raise ModelConfigError(f"{file}: no such file; pass a HF model directory with config.json")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ModelConfigError(f"{file}: not valid JSON ({err}); is this a HF config.json?")
        path = str(file)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        raise ModelConfigError(
            f"{path}: model_type '{model_type}' (architectures {archs}) is not a Llama model; "
            "megatron-sega converts LlamaForCausalLM checkpoints (Llama 2, 3, 3.1) only"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{path}: hidden_act '{config['hidden_act']}' is not Llama's 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ModelConfigError(f"{path}: {flag}=true is not supported (Llama has no biases)")
    required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise ModelConfigError(f"{path}: missing required field(s) {missing}")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim == config["hidden_size"] // heads:
        head_dim = None  # the default: keep one canonical spec for one architecture
    rope_theta = config.get("rope_theta")
    if rope_theta is None:  # newer transformers nest it in rope_parameters
        rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    rope_raw = config.get("rope_scaling") or config.get("rope_parameters")
    return LlamaSpec(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling_from_hf(rope_raw, path),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=head_dim,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        init_std=float(config.get("initializer_range", 0.02)),
    )


def to_hf_config(spec: LlamaSpec, torch_dtype: str = "bfloat16") -> dict:
    """The HF ``config.json`` dict for a spec (inverse of :func:`from_hf_config`)."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "num_hidden_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.kv_channels,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "initializer_range": spec.init_std,
        "torch_dtype": torch_dtype,
        "rope_scaling": None,
    }
    if spec.rope_scaling is not None:
        config["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(spec.rope_scaling)}
    return config


def spec_to_dict(spec: LlamaSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(data: dict) -> LlamaSpec:
    data = dict(data)
    if data.get("rope_scaling") is not None:
        data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    return LlamaSpec(**data)
