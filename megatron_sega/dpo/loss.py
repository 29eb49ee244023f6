"""The paper's preference-optimisation baselines: DPO (sigmoid) and IPO (METHOD.md, Baselines).

With the implicit log-ratio of a response, summed over its tokens,

    d(a) = log pi_theta(a | q) - log pi_ref(a | q),      h = d(chosen) - d(rejected),

the per-pair losses are

    DPO (Rafailov et al. 2023):   l = -log sigmoid(beta * h)          (log 2 when pi == pi_ref)
    IPO (Azar et al. 2023):       l = (h - 1 / (2 * beta))^2          (1 / (4 beta^2) then)

and the batch loss is ``sum_pairs l / Z``, with ``Z`` the number of pairs in the GLOBAL batch, so
that a batch split over microbatches and data-parallel ranks sums to exactly the loss (and the
gradient) of the whole batch. The implicit rewards are ``beta * d(a)``; a pair is counted
correct when ``beta * d(chosen) > beta * d(rejected)`` (strictly: a tie, e.g. the first step from
the reference, is not correct).

Both use log-probs SUMMED over the response tokens, as METHOD.md states (some libraries average
them per token for IPO; we do not). Pure functions of tensors; the reference log-probs are
constants (no gradient).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PreferenceLoss = Literal["sigmoid", "ipo"]


def sequence_logps(logp_tokens: Tensor, mask: Tensor) -> Tensor:
    """``log pi(a|q)`` per row: the masked sum of token log-probs ``[N, T] -> [N]``.

    The mask is applied with ``where`` (not a product), so that garbage at masked positions
    (padding) never reaches the sum or its gradient."""
    if logp_tokens.shape != mask.shape or logp_tokens.dim() != 2:
        raise ValueError(f"logp_tokens {tuple(logp_tokens.shape)} and mask {tuple(mask.shape)} "
                         "must both be [N, T]")
    return torch.where(mask.bool(), logp_tokens, 0.0).sum(dim=1)


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    loss: PreferenceLoss = "sigmoid",
    beta: float = 0.1,
    normaliser: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO or IPO loss of P pairs (see the module docstring for the formulas).

    Args:
        policy_chosen, policy_rejected: [P] ``log pi_theta(a|q)`` summed over each response's
            tokens (differentiable).
        ref_chosen, ref_rejected: [P] the same under the frozen reference (treated as constants).
        loss: ``sigmoid`` (DPO) or ``ipo``.
        beta: > 0; DPO's inverse temperature, IPO's regulariser (target margin ``1/(2 beta)``).
        normaliser: Z, the number of pairs in the global batch; default: P (right only when the
            batch is not split).

    Returns:
        (loss, metrics): ``sum_pairs l / Z`` and detached SUMS over this call's pairs, to be
        summed across splits and divided by the global pair count for logging: ``loss_sum``,
        ``correct`` (pairs whose chosen reward beats the rejected one), ``chosen_reward_sum``
        and ``rejected_reward_sum`` (``beta * d``), ``margin_sum`` (``beta * h``), ``pairs``.
        Float64 inputs are computed in float64, anything else in float32.
    """
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"the four log-prob vectors must share one shape [P]; got "
                         f"{sorted(tuple(s) for s in shapes)}")
    if loss not in ("sigmoid", "ipo"):
        raise ValueError(f"loss={loss!r} is unknown; use 'sigmoid' (DPO) or 'ipo'")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta} must be a finite number > 0")
    pairs = policy_chosen.shape[0]
    z = float(pairs if normaliser is None else normaliser)
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"normaliser={normaliser} must be a finite number > 0 (global pairs)")

    dtype = torch.float64 if policy_chosen.dtype == torch.float64 else torch.float32
    d_chosen = policy_chosen.to(dtype) - ref_chosen.detach().to(dtype)
    d_rejected = policy_rejected.to(dtype) - ref_rejected.detach().to(dtype)
    h = d_chosen - d_rejected
    if loss == "sigmoid":
        per_pair = -F.logsigmoid(beta * h)  # stable for large |h|, unlike log(sigmoid(.))
    else:
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    loss_sum = per_pair.sum()
    chosen_reward = beta * d_chosen.detach()
    rejected_reward = beta * d_rejected.detach()
    metrics = {
        "loss_sum": loss_sum.detach(),
        "correct": (chosen_reward > rejected_reward).sum().to(dtype),
        "chosen_reward_sum": chosen_reward.sum(),
        "rejected_reward_sum": rejected_reward.sum(),
        "margin_sum": (chosen_reward - rejected_reward).sum(),
        "pairs": torch.tensor(float(pairs), dtype=dtype, device=h.device),
    }
    return loss_sum / z, metrics
