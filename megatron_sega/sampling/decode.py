"""The sampler's forward passes: one pipeline stage, one batch, a KV cache that grows by steps.

Two implementations of one small interface (``start`` a batch, ``__call__`` on the next positions,
``compact`` the batch to some rows, ``release`` the batch's cache):

- :class:`LeanForward`, for the Llama layers ``models.builder`` makes, under the local spec
  (RMSNorm modules, any core attention) or Transformer Engine's (the norms fused into
  ``linear_qkv``/``linear_fc1``, TE's final RMSNorm): the same math as Megatron-Core's forward
  on the same parameters and in the same op order, without its per-call machinery. It exists
  because decoding on CPU is bound by that machinery, not by arithmetic (docs/design-notes.md,
  "Decoding"); on TE's layers it also masks left padding, which TE's attention ignores while
  decoding, so TE models sample prompts of mixed lengths in one batch ("Sampling on TE's
  layers"). Its KV cache is ``[batch, kv_heads, positions, head_dim]`` per layer, written in
  place, so attention reads a contiguous prefix; the attention mask is one additive row per
  sequence made at ``start`` and sliced per step; RoPE's cos/sin are computed once per batch; a
  decode step folds each query group onto its key/value head (one SDPA call without GQA
  broadcasting); the output layer sees the last position only. The SDPA calls take the forms
  the fused CUDA kernels accept (``models.attend``).
- :class:`MegatronForward`: Megatron-Core's own forward with its ``StaticInferenceContext``, for
  any other model (FP8, other norms) and as the reference the lean one is tested against.

Both return, on the last pipeline stage, the vocab-parallel logits of the last position
``[batch, V/TP]``; on other stages the hidden states ``[s, batch, hidden]`` to send on.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_sega.models.attend import attend


def lean_unsupported(model) -> Optional[str]:
    """Why :class:`LeanForward` cannot run ``model`` (None: it can)."""
    from megatron_sega.models.sdpa import CachedRotarySelfAttention

    c = model.config
    checks = {
        "not the RMSNorm/SwiGLU Llama layer": c.normalization == "RMSNorm" and c.gated_linear_unit
        and c.activation_func is F.silu and not c.add_bias_linear and not c.add_qkv_bias,
        "a feature it does not implement": not (
            c.qk_layernorm or c.num_moe_experts or c.multi_latent_attention or c.rotary_interleaved
            or c.sequence_parallel or c.context_parallel_size != 1 or c.fp32_residual_connection
            or c.apply_residual_connection_post_layernorm or c.layernorm_zero_centered_gamma
            or c.fp8 or getattr(c, "fp8_param", False) or getattr(c, "fp4", None)
            or getattr(c, "window_size", None) or getattr(c, "softmax_type", "vanilla") != "vanilla"
            or getattr(c, "use_mup", False) or getattr(c, "attention_output_gate", False)
            or getattr(c, "rotary_percent", 1.0) != 1.0),
        "not RoPE": getattr(model, "position_embedding_type", None) == "rope",
    }
    for layer in model.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        why = (_pre_norm_unsupported(layer.input_layernorm, attention.linear_qkv)
               or _pre_norm_unsupported(layer.pre_mlp_layernorm, mlp.linear_fc1))
        checks[f"a layer it cannot run ({why})"] = why is None
        checks["a self-attention other than models.builder's CachedRotarySelfAttention"] = (
            isinstance(attention, CachedRotarySelfAttention))
        plain = all(_plain_weight(m) for m in (attention.linear_qkv, attention.linear_proj,
                                               mlp.linear_fc1, mlp.linear_fc2))
        checks["linear weights that are not plain tensors (FP8)"] = plain
    # Megatron-Core builds the final norm with TE's RMSNorm whenever TE imports, even under the
    # local layer spec (transformer_block.LayerNormImpl): it is checked on its own terms.
    final = getattr(model.decoder, "final_layernorm", None) if model.post_process else None
    if final is not None:
        why = _norm_unsupported(final)
        checks[f"a final norm it cannot run ({why})"] = why is None
    for reason, ok in checks.items():
        if not ok:
            return reason
    return None


def _norm_unsupported(norm) -> Optional[str]:
    """Why :func:`_rms_norm` cannot run ``norm`` (None: it can). It reads only what torch's
    ``nn.RMSNorm`` and Transformer Engine's ``RMSNorm`` both have, ``weight`` and ``eps`` (TE's
    has no ``normalized_shape``); TE's ``zero_centered_gamma`` scales by ``1 + weight``, which
    the lean forward does not implement, and a bias means a LayerNorm, not an RMSNorm."""
    weight = getattr(norm, "weight", None)
    if "RMSNorm" not in type(norm).__name__:
        return f"{type(norm).__name__} is not an RMSNorm"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return f"{type(norm).__name__} without a 1-D weight"
    if not hasattr(norm, "eps"):
        return f"{type(norm).__name__} without eps"
    if getattr(norm, "zero_centered_gamma", False):
        return f"{type(norm).__name__} with zero_centered_gamma"
    if getattr(norm, "bias", None) is not None:
        return f"{type(norm).__name__} with a bias"
    return None


def _pre_norm_unsupported(norm, linear) -> Optional[str]:
    """Why the RMSNorm in front of ``linear`` cannot run (None: it can). Under the local spec
    it is its own module (``norm``); under TE's spec ``norm`` is an ``IdentityOp`` and the
    norm is fused into the linear (TE's ``LayerNormLinear``: ``layer_norm_weight``, ``eps``,
    ``normalization``, ``zero_centered_gamma``, a ``layer_norm_bias`` only for LayerNorm)."""
    if not hasattr(linear, "layer_norm_weight"):
        return _norm_unsupported(norm)
    name = type(linear).__name__
    if type(norm).__name__ != "IdentityOp":
        return f"{type(norm).__name__} in front of the fused norm of {name}"
    if getattr(linear, "normalization", None) != "RMSNorm":
        return f"{name} normalises with {getattr(linear, 'normalization', None)}, not RMSNorm"
    if getattr(linear, "zero_centered_gamma", False):
        return f"{name} with zero_centered_gamma"
    if getattr(linear, "layer_norm_bias", None) is not None:
        return f"{name} with a norm bias"
    if not hasattr(linear, "eps"):
        return f"{name} without eps"
    return None


def _plain_weight(linear) -> bool:
    weight = getattr(linear, "weight", None)
    return type(weight) in (torch.Tensor, torch.nn.Parameter)


class _Norm(NamedTuple):
    """An RMSNorm's parameters, wherever the layer spec keeps them."""

    weight: Tensor
    eps: float


def _pre_norm(norm, linear) -> _Norm:
    """The RMSNorm in front of ``linear`` (see :func:`_pre_norm_unsupported`)."""
    if hasattr(linear, "layer_norm_weight"):
        return _Norm(linear.layer_norm_weight, linear.eps)
    return _Norm(norm.weight, norm.eps)


def _rms_norm(norm: _Norm, x: Tensor) -> Tensor:
    """RMSNorm over the weight's shape, which is what torch's, TE's and TE's fused norms all
    normalise over (TE's modules have no ``normalized_shape``)."""
    return torch.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)


def _softmax_scale(attention) -> float:
    """The attention's softmax scale: the core attention's own where it keeps one (Megatron's
    local modules, TE's ``DotProductAttention``), else the config's, else 1/sqrt(head_dim), as
    TE defaults it."""
    core = attention.core_attention
    scale = getattr(core, "softmax_scale", None)
    if scale is None:
        scale = attention.config.softmax_scale
    return float(scale) if scale is not None else attention.hidden_size_per_attention_head ** -0.5


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Megatron's non-interleaved RoPE (``rope_utils._apply_rotary_pos_emb_bshd``): the same
    elementwise ops, so the same values."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return (t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)


class _Linear(NamedTuple):
    """A linear layer's weight transposed (a view) for matmul, and its LoRA adapter when it
    has one on: ``A^T [in, rank]``, ``B^T [rank, out]`` (this rank's shards) and the scale."""

    weight_t: Tensor
    a_t: Optional[Tensor] = None
    b_t: Optional[Tensor] = None
    scale: float = 0.0

    def __call__(self, x: Tensor) -> Tensor:
        """``x W^T`` (+ the adapter). A row-parallel layer's result is this rank's partial sum
        of both, which the caller's one all-reduce completes."""
        out = torch.matmul(x, self.weight_t)
        if self.a_t is not None:
            out = out + self.scale * torch.matmul(torch.matmul(x, self.a_t), self.b_t)
        return out


def _linear(module) -> _Linear:
    if getattr(module, "lora_enabled", False):
        return _Linear(module.weight.t(), module.lora_a.t(), module.lora_b.t(), module.lora.scale)
    return _Linear(module.weight.t())


class _Layer(NamedTuple):
    """One decoder layer's parameters."""

    norm1: _Norm
    qkv: _Linear
    proj: _Linear
    norm2: _Norm
    fc1: _Linear
    fc2: _Linear


def _layer_parts(layer) -> _Layer:
    """A decoder layer's parameters under the local spec or TE's (see :func:`_pre_norm`)."""
    attention, mlp = layer.self_attention, layer.mlp
    return _Layer(_pre_norm(layer.input_layernorm, attention.linear_qkv),
                  _linear(attention.linear_qkv), _linear(attention.linear_proj),
                  _pre_norm(layer.pre_mlp_layernorm, mlp.linear_fc1),
                  _linear(mlp.linear_fc1), _linear(mlp.linear_fc2))


class LeanForward:
    """Megatron-Core's Llama forward on its own parameters, for decoding (see the module doc)."""

    def __init__(self, model, tp_group):
        self.model = model
        self.tp_group = tp_group if dist.is_initialized() and dist.get_world_size(tp_group) > 1 \
            else None
        first = model.decoder.layers[0].self_attention
        self.groups = first.num_query_groups_per_partition
        self.heads = first.num_attention_heads_per_partition
        self.head_dim = first.hidden_size_per_attention_head
        self.scale = _softmax_scale(first)
        self.dtype = model.config.params_dtype
        self.cache: list[tuple[Tensor, Tensor]] = []
        self.offset = 0

    # ------------------------------------------------------------------ batch state
    def start(self, is_pad: Tensor, total: int) -> None:
        """A new batch of ``is_pad [B, total]`` (True: a left-padding position)."""
        self.release()  # the last batch's cache goes before this one's is allocated
        batch, device = is_pad.shape[0], is_pad.device
        shape = (batch, self.groups, total, self.head_dim)
        self.cache = [self._allocate(shape, device) for _ in self.model.decoder.layers]
        self.is_pad = is_pad
        # Prefill attention: plain causal when no row is padded (one read of the host per
        # batch), which a fused kernel takes with GQA; else the per-row mask (models.sdpa.attend).
        self.padded = bool(is_pad.any())
        # Additive key mask per row (0 or -inf), sliced at every step: no per-step allocation.
        self.key_mask = torch.zeros(batch, 1, 1, total, dtype=self.dtype, device=device) \
            .masked_fill_(is_pad[:, None, None, :], -math.inf)
        # Parameters are read at every batch: training updates them in place between batches.
        self.layers = [_layer_parts(layer) for layer in self.model.decoder.layers]
        freqs = self.model.rotary_pos_emb(total)  # [total, 1, 1, head_dim]
        self.cos = torch.cos(freqs).to(self.dtype)
        self.sin = torch.sin(freqs).to(self.dtype)
        self.offset = 0

    def _allocate(self, shape: tuple, device) -> tuple[Tensor, Tensor]:
        """One layer's key and value cache."""
        return (torch.empty(shape, dtype=self.dtype, device=device),
                torch.empty(shape, dtype=self.dtype, device=device))

    def release(self) -> None:
        """Drop the batch's KV cache, masks and tables (the sampler calls it when a request is
        done, so that the training step that follows has the memory)."""
        self.cache, self.layers = [], []
        self.is_pad = self.key_mask = self.cos = self.sin = None
        self.offset = 0

    def compact(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (an index tensor) of the KV cache and the masks. Layer
        by layer, so that at most one layer's old and new cache coexist."""
        for i, (k, v) in enumerate(self.cache):
            self.cache[i] = (k.index_select(0, index), v.index_select(0, index))
        self.key_mask, self.is_pad = self.key_mask[index], self.is_pad[index]

    # ------------------------------------------------------------------ forward
    def _mask(self, s: int, end: int) -> Optional[Tensor]:
        """``[B, 1, s, end]`` additive mask of positions ``[end - s, end)`` over keys ``[0, end)``
        (a decode step: ``[B, 1, 1, end]``, a view of the per-row mask); None for a prefill of
        unpadded rows, which is plain causal attention."""
        keys = self.key_mask[..., :end]
        if s == 1:
            return keys
        if not self.padded and end == s:
            return None
        causal = torch.ones(s, end, dtype=torch.bool, device=keys.device).triu(end - s + 1)
        mask = keys.expand(-1, -1, s, -1).masked_fill(causal, -math.inf)
        # Every query attends to itself, so that no row is empty (padding queries: NaN in SDPA).
        diag = torch.arange(s, device=keys.device)
        mask[:, :, diag, diag + end - s] = 0.0
        return mask

    def _all_reduce(self, x: Tensor) -> Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _embed(self, tokens: Tensor) -> Tensor:
        """``[B, s]`` ids -> ``[s, B, hidden]`` (Megatron's VocabParallelEmbedding)."""
        emb = self.model.embedding.word_embeddings
        if self.tp_group is None:
            out = F.embedding(tokens, emb.weight)
        else:
            outside = (tokens < emb.vocab_start_index) | (tokens >= emb.vocab_end_index)
            out = F.embedding((tokens - emb.vocab_start_index).masked_fill_(outside, 0), emb.weight)
            out[outside, :] = 0.0
            self._all_reduce(out)
        return out.transpose(0, 1).contiguous()

    def _attention(self, layer: _Layer, x: Tensor, k_cache: Tensor, v_cache: Tensor,
                   mask: Tensor) -> Tensor:
        s, b, _ = x.shape
        start, end = self.offset, self.offset + s
        per_group, d = self.heads // self.groups, self.head_dim
        # Megatron's fused layout: per query group, its queries, then its key and its value.
        qkv = layer.qkv(_rms_norm(layer.norm1, x))
        qkv = qkv.view(s, b, self.groups, per_group + 2, d)
        qk = _rotate(qkv[:, :, :, :per_group + 1], self.cos[start:end, None], self.sin[start:end, None])
        k_cache[:, :, start:end] = qk[:, :, :, per_group].permute(1, 2, 0, 3)
        v_cache[:, :, start:end] = qkv[:, :, :, per_group + 1].permute(1, 2, 0, 3)
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        q = qk[:, :, :, :per_group]  # [s, b, groups, per_group, d]
        if s == 1:  # one query per head: a group's queries are a sequence on its kv head
            out = F.scaled_dot_product_attention(q[0], keys, values, attn_mask=mask,
                                                 scale=self.scale)
            out = out.reshape(1, b, self.heads * d)
        else:
            q = q.reshape(s, b, self.heads, d).permute(1, 2, 0, 3)
            out = attend(q, keys, values, mask, scale=self.scale)
            out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * d)
        return self._all_reduce(layer.proj(out))

    def _mlp(self, layer: _Layer, x: Tensor) -> Tensor:
        gate, up = torch.chunk(layer.fc1(_rms_norm(layer.norm2, x)), 2, dim=-1)
        return self._all_reduce(layer.fc2(F.silu(gate) * up))

    @torch.no_grad()
    def __call__(self, tokens: Tensor, hidden: Optional[Tensor] = None) -> Tensor:
        """The next ``s`` positions of every row: ``tokens [B, s]`` on the first stage, else
        ``hidden [s, B, hidden]`` from the previous one."""
        model = self.model
        x = self._embed(tokens) if model.pre_process else hidden
        s = x.shape[0]
        mask = self._mask(s, self.offset + s)
        for layer, (k_cache, v_cache) in zip(self.layers, self.cache):
            x = x + self._attention(layer, x, k_cache, v_cache, mask)
            x = x + self._mlp(layer, x)
        self.offset += s
        if not model.post_process:
            return x
        final = model.decoder.final_layernorm
        last = _rms_norm(_Norm(final.weight, final.eps), x[-1:])
        weight = model.shared_embedding_or_output_weight() \
            if model.share_embeddings_and_output_weights else model.output_layer.weight
        return torch.matmul(last, weight.t())[0]  # [B, V/TP]


class MegatronForward:
    """Megatron-Core's forward with a ``StaticInferenceContext`` (the same interface)."""

    def __init__(self, model):
        self.model = model
        self.ctx = None

    def start(self, is_pad: Tensor, total: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.release()  # the last batch's cache goes before this one's is allocated
        self.ctx = StaticInferenceContext(is_pad.shape[0], total)
        self.is_pad = is_pad

    def release(self) -> None:
        """Drop the batch's KV cache (Megatron's context holds it)."""
        self.ctx = self.is_pad = None

    def compact(self, index: Tensor) -> None:
        memory = self.ctx.key_value_memory_dict
        for layer, (k, v) in list(memory.items()):
            memory[layer] = (k.index_select(1, index), v.index_select(1, index))
        self.ctx.max_batch_size = len(index)
        self.is_pad = self.is_pad[index]

    @torch.no_grad()
    def __call__(self, tokens: Tensor, hidden: Optional[Tensor] = None) -> Tensor:
        start = self.ctx.sequence_len_offset
        batch, s = tokens.shape
        device = tokens.device
        end = start + s
        if s == 1:
            mask = self.is_pad[:, None, None, :end]
        else:
            causal = torch.ones(s, end, dtype=torch.bool, device=device).triu(end - s + 1)
            mask = causal.unsqueeze(0) | self.is_pad[:, None, :end]
            # Pad queries attend to themselves so no attention row is empty (NaN under SDPA).
            eye = torch.zeros(s, end, dtype=torch.bool, device=device)
            eye[:, end - s:] = torch.eye(s, dtype=torch.bool, device=device)
            mask = (mask & ~eye).unsqueeze(1)
        if hidden is not None:
            self.model.set_input_tensor(hidden)
        positions = torch.arange(start, end, device=device).unsqueeze(0).expand(batch, -1)
        out = self.model(tokens, positions, mask, inference_context=self.ctx)
        self.ctx.sequence_len_offset += s
        return out[:, -1, :] if self.model.post_process else out
