"""Build this rank's pipeline stage of a Megatron-Core Llama model."""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_sega.models.spec import LlamaSpec, ModelConfigError, RopeScaling
from megatron_sega.runtime import Runtime, have_transformer_engine


def unwrap_model(model):
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def wrap_mixed_precision(model):
    """Megatron's ``Float16Module`` around a bf16/fp16 model, as Megatron builds it on GPU:
    every parameter (norm weights included) in the model dtype, float inputs cast on the first
    stage, logits upcast to fp32 on the last. An fp32 model is returned as it is."""
    config = model.config
    if not (config.bf16 or config.fp16):
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(config, model)


@contextlib.contextmanager
def sequence_parallel_off(model):
    """Run ``model`` without sequence parallelism for the duration (the sampler: a decode step
    has one position, which TP ranks cannot split). Megatron's and TE's layers read their own
    ``sequence_parallel`` attribute at forward time, the embedding and the block the config's."""
    config = model.config
    if not config.sequence_parallel:
        yield
        return
    switched = [m for m in model.modules() if getattr(m, "sequence_parallel", False) is True]
    for module in switched:
        module.sequence_parallel = False
    config.sequence_parallel = False
    try:
        yield
    finally:
        config.sequence_parallel = True
        for module in switched:
            module.sequence_parallel = True


def have_fused_wgrad_kernel() -> bool:
    """Whether Apex's ``fused_weight_gradient_mlp_cuda`` imports: Megatron-Core's own
    ``ColumnParallelLinear`` (our output layer, with or without TE) refuses
    ``gradient_accumulation_fusion`` without it, even when TE's linears could fuse on their own."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def speed_flags(on_gpu: bool, have_te: bool, have_fused_wgrad: bool) -> dict[str, bool]:
    """The ``TransformerConfig`` fusions and memory savers, each on where Megatron-Core 0.19 can
    run it here (all off on CPU, where the fused kernels do not exist or do not pay):

    - ``bias_activation_fusion``: SwiGLU through Megatron's own ``bias_swiglu_impl``
      (``jit_fuser``, no TE/Apex needed): on every GPU;
    - ``gradient_accumulation_fusion``: wgrad GEMMs accumulate into DDP's fp32 ``main_grad``;
      Megatron's ``ColumnParallelLinear`` needs Apex's fused kernel (see
      :func:`have_fused_wgrad_kernel`), so GPU + that kernel;
    - ``apply_rope_fusion``: Megatron 0.19 takes the fused rotary kernel from TE only
      (``rope_utils.fused_apply_rotary_pos_emb``; the config refuses it without TE), so GPU + TE;
    - ``deallocate_pipeline_outputs``: frees each stage's sent activations (only the autograd
      graph is kept), which lowers activation memory under PP; on every GPU, as Megatron-LM does.
    """
    return {
        "bias_activation_fusion": on_gpu,
        "gradient_accumulation_fusion": on_gpu and have_fused_wgrad,
        "apply_rope_fusion": on_gpu and have_te,
        "deallocate_pipeline_outputs": on_gpu,
    }


def transformer_config(
    spec: LlamaSpec,
    runtime: Runtime,
    *,
    dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: str = "none",
):
    """Megatron-Core ``TransformerConfig`` for a Llama spec under this runtime's TP/PP.
    ``recompute`` (``model.recompute``): "full" runs each layer again in backward and keeps
    only its input (Megatron's full, uniform, one layer at a time); "selective" recomputes the
    core attention (Megatron's default selective module, ``core_attn``); "none"."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = runtime.device.type == "cuda"
    extra = speed_flags(on_gpu, on_gpu and have_transformer_engine(),
                        on_gpu and have_fused_wgrad_kernel())
    if recompute == "full":
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    elif recompute == "selective":
        extra.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif recompute != "none":
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    if runtime.vpp is not None:
        # The interleaved schedule sends and receives in both directions at once; at pp=2 both
        # peers are the same rank, and batched p2p would pair a gradient with an activation
        # (seen on gloo: wrong losses at pp=2 x vpp=2). Megatron's unbatched p2p keeps the two
        # directions in two process groups; overlapping it with compute is Megatron-LM's default.
        extra.update(batch_p2p_comm=False, overlap_p2p_comm=True)
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_std,
        tensor_model_parallel_size=runtime.tp,
        pipeline_model_parallel_size=runtime.pp,
        virtual_pipeline_model_parallel_size=runtime.vpp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        cross_entropy_loss_fusion=False,
        **extra,
    )


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 RoPE scaling: divide low frequencies by ``factor``, keep high ones, blend between.

    Megatron-Core hard-codes the 8192/1/4 constants; configs may set others, so we apply it here."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def uses_transformer_engine(attention: str = "auto") -> bool:
    """The TE layer spec is used for ``model.attention: auto`` when TE imports; 'sdpa' and
    'local' always build the local spec."""
    return attention == "auto" and have_transformer_engine()


def layer_spec(use_te: Optional[bool] = None, attention: str = "auto", lora=None):
    """TE layer spec for ``attention='auto'`` when transformer_engine imports, else the local spec.

    ``attention``: 'auto' | 'local' | 'sdpa'. Without TE, 'auto' swaps the local spec's core
    attention for PyTorch SDPA (flash / memory-efficient kernels on GPU; on CPU it is also faster
    than materialising the s x s scores: 1.24 s vs 1.58 s per training step of a 4-layer,
    hidden-256 model at 8 x 256 tokens, measured on the 2-core CI machine)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_sega.models.sdpa import CachedRotarySelfAttention, SDPAttention

    if use_te is None:
        use_te = uses_transformer_engine(attention)
    if use_te:
        # (megatron-core 0.19 takes no 'normalization' here: TE's norms read config.normalization)
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # Decoding: keys enter the KV cache already rotated (see CachedRotarySelfAttention; it only
    # changes what SelfAttention caches, so it applies to TE's spec too: GPU only, not verified).
    spec.submodules.self_attention.module = CachedRotarySelfAttention
    if not use_te and attention in ("sdpa", "auto"):
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if lora is not None:
        from megatron_sega.models.lora import adapt_layer_spec

        spec = adapt_layer_spec(spec, lora)
    return spec


def build_model(
    spec: LlamaSpec,
    runtime: Runtime,
    *,
    dtype: torch.dtype = torch.float32,
    use_te: Optional[bool] = None,
    attention: str = "auto",
    sequence_parallel: bool = False,
    recompute: str = "none",
    vocab_multiple: int = 128,
    vp_stage: Optional[int] = None,
    lora=None,
    lora_seed: int = 0,
):
    """The ``GPTModel`` chunk of this rank's pipeline stage, on ``runtime.device``.

    The embedding is built on the first stage, the output layer on the last; the vocabulary is
    padded (see ``LlamaSpec.padded_vocab_size``) and the true size stays in ``spec``. With
    virtual pipelining (``runtime.vpp``) this is model chunk ``vp_stage`` of this rank: its
    layers, and with them its embedding/output layer, come from Megatron's interleaved
    assignment (:func:`build_model_chunks` builds them all)."""
    from megatron_sega.models.sdpa import LlamaGPTModel

    if (runtime.vpp is None) != (vp_stage is None):
        raise ValueError(f"vp_stage={vp_stage} does not fit parallel.vpp={runtime.vpp}: pass "
                         "vp_stage in range(vpp) exactly when virtual pipelining is on")
    first_chunk = vp_stage is None or vp_stage == 0
    last_chunk = vp_stage is None or vp_stage == runtime.vpp - 1

    if use_te is None:
        use_te = uses_transformer_engine(attention)
    if sequence_parallel and not use_te:
        raise ModelConfigError(
            f"parallel.sequence_parallel needs Transformer Engine's layers (Megatron's torch norms "
            f"refuse it), but model.attention={attention} builds the local layers; set "
            f"model.attention=auto with Transformer Engine installed, or sequence_parallel=false")
    if lora is not None and (use_te or sequence_parallel):
        raise ModelConfigError(
            "lora.rank > 0 adapts Megatron's local linear layers: set model.attention=sdpa (or "
            "local) and parallel.sequence_parallel=false (Transformer Engine's fused norm + "
            "linear layers are not adapted yet)")
    config = transformer_config(spec, runtime, dtype=dtype, sequence_parallel=sequence_parallel,
                                recompute=recompute)
    model = LlamaGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_te, attention, lora),
        vocab_size=spec.padded_vocab_size(runtime.tp, vocab_multiple),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=runtime.is_first_stage and first_chunk,
        post_process=runtime.is_last_stage and last_chunk,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta),
        rope_scaling=False,
        vp_stage=vp_stage,
    )
    if spec.rope_scaling is not None:
        rope = model.rotary_pos_emb
        rope.inv_freq = llama3_scaled_inv_freq(rope.inv_freq, spec.rope_scaling)
    model.llama_spec = spec
    model.uses_transformer_engine = use_te
    model = model.to(runtime.device)
    if lora is not None:
        from megatron_sega.models.lora import freeze_base, init_adapters

        init_adapters(model, lora_seed, runtime.tp, runtime.tp_rank)
        model.lora_trainable = freeze_base(model)
    return model


def build_model_chunks(spec: LlamaSpec, runtime: Runtime, **kwargs) -> list:
    """This rank's model chunks in pipeline order: one ``GPTModel``, or ``runtime.vpp`` of them
    under virtual pipelining (chunk ``i`` holds Megatron's virtual stage ``i`` of this rank)."""
    if runtime.vpp is None:
        return [build_model(spec, runtime, **kwargs)]
    return [build_model(spec, runtime, vp_stage=i, **kwargs) for i in range(runtime.vpp)]
