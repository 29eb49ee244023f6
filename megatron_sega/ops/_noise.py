"""Counter-based Gumbel noise: a pure function of (seed, row, step, global token id).

``U_j`` is a SplitMix64 hash of the row's key and the global id j, in int64 torch ops, so the
noise of a token does not depend on which rank holds it (the same seed gives the same tokens at
any TP) and each rank hashes only the ids it needs: its own shard, or a few gathered candidates.
U has 52 random bits; G = -log(-log U) is fp64.
"""

from __future__ import annotations

import torch
from torch import Tensor

# SplitMix64 constants (Steele, Lea, Flood 2014), as signed int64.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix64_(x: Tensor) -> Tensor:
    """SplitMix64's finaliser, in place on an int64 tensor (multiplication wraps mod 2**64)."""
    x ^= _srl(x, 30)
    x *= _MIX1
    x ^= _srl(x, 27)
    x *= _MIX2
    x ^= _srl(x, 31)
    return x


def _to_int64(value: int) -> int:
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _per_row(value: int | Tensor, name: str, lead: torch.Size, device) -> Tensor:
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.is_complex() or value.shape != lead:
            raise ValueError(f"{name} must be an int or an integer tensor of shape {tuple(lead)} "
                             f"(one per row), got {value.dtype} {tuple(value.shape)}")
        return value.reshape(-1).to(device=device, dtype=torch.long)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an int or an integer tensor")
    return torch.full((lead.numel(),), _to_int64(value), dtype=torch.long, device=device)


def row_keys(seed: int | Tensor, step: int | Tensor, lead: torch.Size, device=None) -> Tensor:
    """One int64 key per row: hash of (seed, row, step).

    An int ``seed`` is combined with the row's index in the flattened batch; a tensor of per-row
    seeds (shape ``lead``) is used as is, so that a row keeps its noise wherever it sits in the
    batch. ``step`` (the decoding position) is an int or a per-row tensor.
    """
    keys = _mix64_(_per_row(seed, "seed", lead, device) + _GOLDEN)
    if not isinstance(seed, Tensor):
        keys = _mix64_(keys ^ (torch.arange(lead.numel(), device=device) + _to_int64(2 * _GOLDEN)))
    return _mix64_(keys ^ (_per_row(step, "step", lead, device) + _to_int64(3 * _GOLDEN)))


def gumbel_noise(keys: Tensor, ids: Tensor) -> Tensor:
    """``[rows, n]`` fp64 standard Gumbel noise, a pure function of (row key, global id).

    ``ids`` is ``[n]`` (the same ids for every row: a shard's columns) or ``[rows, n]`` (each
    row's own ids: gathered candidates). ``U = (h >> 12 + 0.5) / 2**52`` with
    ``h = SplitMix64(key + (id + 1) * golden)`` (the j-th output of Java's SplittableRandom
    seeded with ``key``), so ``U`` lies in ``(0, 1)`` exactly.
    """
    per_id = (ids + 1) * _GOLDEN
    h = _mix64_(keys.unsqueeze(1) + (per_id.unsqueeze(0) if ids.dim() == 1 else per_id))
    u = h.bitwise_right_shift_(12).bitwise_and_((1 << 52) - 1).double()  # top 52 bits
    del h
    return u.add_(0.5).mul_(2.0 ** -52).log_().neg_().log_().neg_()
