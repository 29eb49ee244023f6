"""Core attention through PyTorch ``scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` score matrix.
Without Transformer Engine on a GPU that is slow and memory-hungry at long sequences; SDPA
dispatches to flash / memory-efficient kernels. Same interface and numerics (within kernel
tolerance) as the local module; used automatically on GPU when TE is absent.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_sega.models.attend import attend


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` whose forward is a single SDPA call (no dropout support needed:
    Llama trains with attention dropout 0)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support an attention bias")
        if self.config.attention_dropout and self.training:
            raise NotImplementedError("SDPAttention is for attention_dropout = 0 (Llama)")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        # Megatron layout [s, b, heads, dim] -> SDPA layout [b, heads, s, dim].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is None and q.shape[2] != k.shape[2]:
            raise ValueError("SDPAttention needs an explicit mask when query and key lengths "
                             f"differ ({q.shape[2]} vs {k.shape[2]})")
        # Megatron's masks are True where attention is *forbidden*; SDPA's where allowed.
        out = attend(q, k, v, None if attention_mask is None else ~attention_mask,
                     scale=self.softmax_scale)
        # [b, heads, s, dim] -> [s, b, heads * dim]
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _packed(self, query, key, value, params) -> torch.Tensor:
        """Packed sequences (THD: ``[t, heads, dim]``, ``data.packing``): causal attention within
        each segment of ``cu_seqlens``, one SDPA call per segment (variable length: the cost is
        the sum of the squared segment lengths, not the square of the row)."""
        if params.qkv_format != "thd":
            raise NotImplementedError(f"SDPAttention packs THD only, got {params.qkv_format!r}")
        bounds = params.cu_seqlens_q.tolist()
        if bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens end at {bounds[-1]}, the packed row has "
                             f"{query.shape[0]} tokens")
        out = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # [t, heads, dim] -> [1, heads, t, dim]
            q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            out.append(attend(q, k, v, None, scale=self.softmax_scale)[0].transpose(0, 1))
        t, h, d = query.shape
        return torch.cat(out).reshape(t, h * d)


class CachedRotarySelfAttention(SelfAttention):
    """Megatron-Core ``SelfAttention`` whose static KV cache holds keys *after* RoPE.

    Megatron's static-batching path stores raw keys and re-applies the rotary embedding to the
    whole cache at every decode step (O(sequence) extra work per layer per token). Here the new
    keys are rotated once, at their own positions, before they are cached, and the forward is told
    that the keys are done. Identical results; training (no inference context) is untouched."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        rotary_pos_emb, *args, **kwargs):
        rotate_here = (inference_context is not None and inference_context.is_static_batching()
                       and isinstance(rotary_pos_emb, tuple) and rotary_pos_emb[1] is not None
                       and not self.config.flash_decode)
        if rotate_here:
            start = inference_context.sequence_len_offset
            key = apply_rotary_pos_emb(key, rotary_pos_emb[1][start:start + key.shape[0]],
                                       config=self.config, cp_group=self.pg_collection.cp)
        out = super()._adjust_key_value_for_inference(inference_context, query, key, value,
                                                      rotary_pos_emb, *args, **kwargs)
        if rotate_here:
            query, key, value, rope, mask_type, block_table = out
            out = (query, key, value, (rope[0], None), mask_type, block_table)
        return out


class LlamaGPTModel(GPTModel):
    """Megatron-Core's ``GPTModel`` with RoPE on packed rows (THD, ``data.packing``) looked up
    once per forward at each token's own position (``position_ids``, restarting at every
    sequence): ``[t, 1, 1, dim]``, which Megatron's unfused THD RoPE takes whole
    (``_apply_rotary_pos_emb_thd`` with one frequency per token: one rotation per layer) instead of
    rotating segment by segment (measured on CPU: 2.8 ms against 7.8 ms per call at 528 tokens
    in 5 segments). Identical values. Not with the fused TE kernel (``apply_rope_fusion``), which
    restarts the positions itself and wants the table by position; nor outside packed rows."""

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        params, positions = kwargs.get("packed_seq_params"), kwargs.get("position_ids")
        rope = out[1]
        if (params is not None and params.qkv_format == "thd" and positions is not None
                and isinstance(rope, torch.Tensor) and not self.config.apply_rope_fusion
                and kwargs.get("inference_context") is None):
            out = (out[0], rope[positions.reshape(-1).to(rope.device)], *out[2:])
        return out
