"""One SDPA call in the form the fused CUDA kernels take, shared by training
(``models.sdpa.SDPAttention``) and the sampler's lean forward (``sampling.decode``). No
Megatron-Core import, so that the sampler's module stays light."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], *,
           scale: float) -> torch.Tensor:
    """SDPA of ``q [b, heads, s, d]`` over ``k, v [b, groups, t, d]`` (GQA when groups < heads),
    called in the form a fused CUDA kernel takes (docs/design-notes.md, "Attention kernels"):

    - no ``mask``: causal attention as ``is_causal`` with ``enable_gqa``. Flash attention
      takes both (fp16/bf16, head_dim <= 256); an explicit causal mask would rule it out and
      leave the O(s^2)-memory math kernel;
    - a ``mask`` (bool, True = may attend, or additive) with GQA: keys and values repeated to
      every head first. The memory-efficient kernel takes any mask but refuses ``enable_gqa``;
      the copy costs as much memory as the queries.
    """
    heads, groups = q.shape[1], k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=groups != heads)
    if groups != heads:
        k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
