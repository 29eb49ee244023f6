"""One inference forward through the whole pipeline, over this rank's model chunks.

Without virtual pipelining each rank holds one chunk and activations go stage by stage. With it
(``parallel.vpp = v``) rank ``r`` holds chunks ``0..v-1`` and the model's layers run in the order
rank 0 chunk 0 -> rank 1 chunk 0 -> ... -> rank pp-1 chunk 0 -> rank 0 chunk 1 -> ... -> rank pp-1
chunk v-1: every chunk receives from the previous pipeline rank (wrapping from the last rank to
the first between chunks) and sends to the next. Generation is latency-bound and runs one
sequence of passes, so the chunks simply run in that order with blocking point-to-point
transfers. Each chunk has its own forward (``sampling/decode.py``) holding that chunk's KV cache.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_sega.runtime import Runtime


def pipeline_forward(forwards: list[Callable], runtime: Runtime, tokens: torch.Tensor, *,
                     hidden_size: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Run the next positions ``tokens [B, S]`` through every chunk of every stage
    (``forwards[i](tokens, hidden)``: chunk i's forward, in pipeline order). Returns the last
    chunk's output (the last-position logits [B, V/TP]) on the last stage, None elsewhere.
    Every rank of the pipeline must call it with the same shapes."""
    rt = runtime
    prev_rank = next_rank = None
    if rt.pp > 1:
        prev_rank = dist.get_global_rank(rt.pp_group, (rt.pp_rank - 1) % rt.pp)
        next_rank = dist.get_global_rank(rt.pp_group, (rt.pp_rank + 1) % rt.pp)
    batch, seq = tokens.shape
    out = None
    for index, forward in enumerate(forwards):
        first = rt.is_first_stage and index == 0
        last = rt.is_last_stage and index == len(forwards) - 1
        hidden = None
        if not first:
            hidden = torch.empty(seq, batch, hidden_size, dtype=dtype, device=rt.device)
            dist.recv(hidden, src=prev_rank)
        out = forward(tokens, hidden)
        if not last:
            dist.send(out.contiguous(), dst=next_rank)
    return out if rt.is_last_stage else None
