"""Entropy and log-probabilities of vocab-parallel logits, without gathering the vocabulary.

For one token with logits ``z_j`` over the true vocabulary ``j < V`` (temperature 1)::

    m       = max_j z_j                              (MAX all-reduce)
    S       = sum_j exp(z_j - m)                     (SUM all-reduce, with the two below)
    A       = sum_j exp(z_j - m) (z_j - m)
    z_t - m = the target's shifted logit, contributed by the rank that owns t, 0 elsewhere

    log p(t) = (z_t - m) - log S
    H        = -sum_j p_j log p_j = log S - A / S

Communication per token: 1 fp32 in a MAX all-reduce and 1 to 3 fp64 in a SUM all-reduce
(plus two flags per chunk), independent of V. Gradients need no communication at all::

    d log p(t) / d z_j = 1[j = t] - p_j
    d H        / d z_j = -p_j (log p_j + H)

computed in the backward pass from the saved per-token ``m``, ``log S`` and ``H``, for this shard's
columns only (which is what the vocab-parallel output layer's backward expects); padding columns
get zero gradient. The elementwise work is fp32 whatever the input dtype (the per-token sums and
scalars are fp64: O(tokens)), one chunk of tokens at a time, so temporaries are
``O(chunk_size x V_shard)``; the input is never modified nor copied whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_sega.ops._shard import (
    DEFAULT_CHUNK_SIZE, all_reduce, check_shard, global_max, raise_for_flags, row_chunks,
    row_reader, sum64,
)


def _forward_chunk(z: Tensor, local_t: Tensor | None, want_entropy: bool, vocab_start: int,
                   vocab_size: int, tp_group
                   ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """(m, log S, log p(target) or None, H or None, check flags) for one chunk ``z [c, width]``
    in fp32 (the flags: see ``global_max``; nothing is read on the host here).

    The per-token scalars are summed and combined in fp64 (cheap: O(c)); only the bulk
    elementwise work is fp32.
    """
    m, _, flags = global_max(z, vocab_start, vocab_size, tp_group)
    shifted = z - m.unsqueeze(1)
    if want_entropy:
        e = shifted.exp()
        sums = [sum64(e), sum64(e.mul_(shifted))]  # in place: these temporaries are ours
        del e
    else:
        sums = [sum64(shifted.exp_())]
    del shifted
    if local_t is not None:
        width = z.shape[1]
        owned = (local_t >= 0) & (local_t < width)
        if width:
            z_t = z.gather(1, local_t.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
        else:
            z_t = torch.zeros_like(m)
        sums.append(torch.where(owned, z_t.double() - m.double(), 0.0))  # exact in fp64
    total = all_reduce(torch.stack(sums), tp_group)
    log_s = total[0].log()
    ent = log_s - total[1] / total[0] if want_entropy else None
    logp = total[-1] - log_s if local_t is not None else None
    return m, log_s.float(), logp, ent, flags


class _VocabParallelLogProbs(torch.autograd.Function):
    """(log p(targets), H) of a logits shard; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor | None, vocab_start: int, vocab_size: int,
                tp_group, chunk_size: int, want_entropy: bool):
        width = check_shard(logits, vocab_start, vocab_size, tp_group, chunk_size)
        lead = logits.shape[:-1]
        rows, n = row_reader(logits), lead.numel()
        stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)  # (m, log S)
        logp = stats.new_empty(n) if targets is not None else stats.new_empty(0)
        ent = stats.new_empty(n) if want_entropy else stats.new_empty(0)
        local_t = None
        # (targets out of range, NaN/Inf rank + 1, covered vocab end), max-combined over the
        # chunks on the device and read once, after the loop: one host sync per call.
        flags = stats.new_zeros(3)
        if targets is not None:
            local_t = targets.reshape(-1).to(device=logits.device, dtype=torch.long) - vocab_start
            flags[0] = ((local_t < -vocab_start) | (local_t >= vocab_size - vocab_start)).any()
        for sl in row_chunks(n, chunk_size):
            z = rows(sl)[:, :width].float()
            m, log_s, lp, h, chunk_flags = _forward_chunk(
                z, None if local_t is None else local_t[sl], want_entropy, vocab_start,
                vocab_size, tp_group)
            flags[1:] = torch.maximum(flags[1:], chunk_flags)
            stats[sl, 0], stats[sl, 1] = m, log_s
            if lp is not None:
                logp[sl] = lp
            if h is not None:
                ent[sl] = h
        if n:
            bad_targets, nonfinite, covered = flags.tolist()
            if bad_targets:
                _raise_for_targets(targets, vocab_size)
            raise_for_flags(nonfinite, covered, vocab_size)
        ctx.save_for_backward(logits, local_t if local_t is not None else stats.new_empty(0), stats,
                              ent)
        ctx.meta = (width, chunk_size, targets is not None, want_entropy)
        if targets is None:
            ctx.mark_non_differentiable(logp)
        else:
            logp = logp.view(lead)
        if want_entropy:
            ent = ent.view(lead)
        else:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_ent: Tensor | None):
        logits, local_t, stats, ent = ctx.saved_tensors
        width, chunk_size, has_targets, want_entropy = ctx.meta
        g_lp = grad_logp.reshape(-1).float() if has_targets and grad_logp is not None else None
        g_h = grad_ent.reshape(-1).float() if want_entropy and grad_ent is not None else None
        rows = row_reader(logits)
        grad = logits.new_zeros(logits.shape)  # padding columns keep a zero gradient
        flat_grad = grad.view(-1, logits.shape[-1])
        if width and (g_lp is not None or g_h is not None):
            for sl in row_chunks(flat_grad.shape[0], chunk_size):
                # (z - m) - log S in fp32: both terms are small where p is not negligible.
                # In place from here on: two chunk-sized temporaries in all.
                log_p = rows(sl)[:, :width].float() - stats[sl, :1]
                log_p -= stats[sl, 1:]
                p = log_p.exp()
                g = None
                if g_h is not None:  # dH/dz_j = -p_j (log p_j + H)
                    g = log_p.add_(ent[sl].unsqueeze(1)).mul_(p).mul_(-g_h[sl].unsqueeze(1))
                if g_lp is not None:  # d log p(t)/dz_j = 1[j = t] - p_j
                    p.mul_(-g_lp[sl].unsqueeze(1))
                    g = p if g is None else g.add_(p)
                    # + g on the target's column where this shard owns it; elsewhere + 0 on a
                    # clamped column: no nonzero / boolean indexing (each a host sync).
                    t = local_t[sl]
                    owned = (t >= 0) & (t < width)
                    g.scatter_add_(1, t.clamp(0, width - 1).unsqueeze(1),
                                   torch.where(owned, g_lp[sl], 0.0).unsqueeze(1))
                flat_grad[sl, :width] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


def _check_targets(logits_shard: Tensor, targets: Tensor, vocab_size: int) -> None:
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.is_complex():
        raise ValueError("targets must be an integer tensor of token ids")
    if targets.shape != logits_shard.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits_shard's leading "
                         f"shape {tuple(logits_shard.shape[:-1])}")
    # The range of the ids is checked in the forward, with the other checks, in one host read.


def _raise_for_targets(targets: Tensor, vocab_size: int) -> None:
    raise ValueError(f"targets must be ids in [0, vocab_size={vocab_size}): got "
                     f"[{int(targets.min())}, {int(targets.max())}]; padding ids are not "
                     f"valid targets (mask those positions instead)")


def log_probs_and_entropy(logits_shard: Tensor, targets: Tensor, vocab_start: int,
                          vocab_size: int, tp_group, *,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """``(log p(targets), H)``, both ``[...]`` fp32 and differentiable, in one pass.

    ``logits_shard [..., V_shard]`` holds global ids ``[vocab_start, vocab_start + V_shard)``;
    ids ``>= vocab_size`` are padding and ignored. ``targets [...]`` are global ids
    ``< vocab_size``. ``tp_group`` is the tensor-parallel group the vocabulary is split over
    (None: one process holding the whole vocabulary). See the module docstring for the math.
    """
    _check_targets(logits_shard, targets, vocab_size)
    return _VocabParallelLogProbs.apply(logits_shard, targets, vocab_start, vocab_size, tp_group,
                                        chunk_size, True)


def log_probs(logits_shard: Tensor, targets: Tensor, vocab_start: int, vocab_size: int,
              tp_group, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``log softmax(z)[target]`` over the true vocabulary, ``[...]`` fp32, differentiable.

    Arguments as :func:`log_probs_and_entropy`; the gradient wrt the shard is
    ``g * (onehot(target) - softmax(z))`` on this shard's true columns and 0 on padding.
    """
    _check_targets(logits_shard, targets, vocab_size)
    return _VocabParallelLogProbs.apply(logits_shard, targets, vocab_start, vocab_size, tp_group,
                                        chunk_size, False)[0]


def entropy(logits_shard: Tensor, vocab_start: int, vocab_size: int, tp_group, *,
            chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Per-token entropy ``H = -sum_j p_j log p_j`` of softmax over the true vocab, ``[...]`` fp32.

    Differentiable (``dH/dz_j = -p_j (log p_j + H)``). Arguments as :func:`log_probs_and_entropy`.
    """
    return _VocabParallelLogProbs.apply(logits_shard, None, vocab_start, vocab_size, tp_group,
                                        chunk_size, True)[1]
