"""Pipeline-stage collectives shared by the loops (training, evaluation)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sega.runtime.distributed import Runtime


def broadcast_from_last_stage(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The last pipeline stage's ``tensor`` on every stage of this rank's pipeline.

    Only the last stage holds logits, losses and per-token statistics; the other stages pass a
    tensor of the same shape and dtype to receive into. Returns the (contiguous) tensor, filled
    in place; without pipelining it is returned as given."""
    if runtime.pp == 1:
        return tensor
    tensor = tensor.contiguous()
    last = dist.get_global_rank(runtime.pp_group, runtime.pp - 1)
    dist.broadcast(tensor, src=last, group=runtime.pp_group)
    return tensor
