"""Which Llama a run uses: from a checkpoint's metadata, a HF config.json, or a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_sega.models.spec import LlamaSpec, ModelConfigError, from_hf_config, preset


def resolve_spec(config, tokenizer_vocab: Optional[int] = None, *,
                 checkpoint_spec: Optional[LlamaSpec] = None) -> LlamaSpec:
    """The model spec of a run. ``checkpoint_spec``: the spec recorded in ``model.load``'s
    checkpoint, read by the caller (``checkpoint.mcore.checkpoint_spec``; None when it records
    none), which wins; a preset may be resized to its tokenizer ('tiny' only). A tokenizer larger
    than the model is an error; a smaller one is allowed (models pad their vocabulary): the
    session scores the tokenizer's ids only."""
    model = config.model
    spec, from_preset = None, False
    if model.load:
        if not Path(model.load).exists():
            raise ModelConfigError(f"model.load = {model.load} does not exist; convert a HF model "
                                   "with tools/convert.py or point to a saved checkpoint")
        spec = checkpoint_spec
    if spec is None and model.hf_config:
        spec = from_hf_config(model.hf_config)
    if spec is None:
        if not model.preset:
            raise ModelConfigError("no model given: set model.preset, model.hf_config or model.load")
        spec, from_preset = preset(model.preset), True
    if tokenizer_vocab is not None and tokenizer_vocab != spec.vocab_size:
        if from_preset and model.preset == "tiny":
            spec = spec.replace(vocab_size=tokenizer_vocab)
        elif tokenizer_vocab > spec.vocab_size:
            raise ModelConfigError(
                f"the tokenizer has {tokenizer_vocab} tokens but the model's vocab_size is "
                f"{spec.vocab_size}; use the tokenizer that belongs to the model"
            )
    return spec
