"""The SEGA loss, GEM Eq. 2 (arXiv 2511.13007), with optional KL and PPO-style clipping.

Eq. 2 is REINFORCE with a group-mean baseline::

    loss = - sum_groups sum_i A_i * log pi_theta(a_i | q) / Z,     log pi(a|q) = sum_t log pi(a_t | q, a_<t)

Pure function of tensors. The normaliser Z is an argument so that a batch split over
microbatches and data-parallel ranks gives, once the per-split losses are summed, exactly the
loss and gradient of the whole batch: every split passes the same GLOBAL Z.

Deviations from the paper (all off by default; the paper has no ratio, no clipping, no KL):
- ``token_mean`` normalisation (divide by the number of response tokens instead of groups);
- a k3 KL penalty to a frozen reference model;
- a PPO clipped surrogate, for reusing one rollout batch for several optimizer steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["sequence_sum", "token_mean"]


def _resolve_normaliser(
    normalization: str,
    normaliser: float | Tensor | None,
    num_groups: int | None,
    response_mask: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    if normalization not in ("sequence_sum", "token_mean"):
        raise ValueError(f"normalization={normalization!r} is unknown; use 'sequence_sum' or 'token_mean'")
    if normaliser is not None and num_groups is not None:
        raise ValueError("pass either normaliser= (the global divisor) or num_groups=, not both")
    if normaliser is None and num_groups is not None:
        if normalization != "sequence_sum":
            raise ValueError("num_groups= only applies to normalization='sequence_sum'; for 'token_mean' "
                             "pass normaliser= the global number of response tokens")
        normaliser = num_groups
    if normaliser is None:
        if normalization == "sequence_sum":
            raise ValueError("normalization='sequence_sum' needs num_groups= (or normaliser=): the number "
                             "of prompt groups in the GLOBAL batch, over all microbatches and DP ranks")
        # Local token count: right only when the batch is not split; documented in sega_loss.
        return response_mask.sum().clamp(min=1).to(dtype)
    if isinstance(normaliser, Tensor):
        if normaliser.numel() != 1:
            raise ValueError(f"normaliser must be a scalar, got shape {tuple(normaliser.shape)}")
        return normaliser.detach().reshape(()).to(device=response_mask.device, dtype=dtype)
    if not (math.isfinite(normaliser) and normaliser > 0):
        raise ValueError(f"normaliser={normaliser} must be a finite number > 0 (number of groups or tokens)")
    return torch.tensor(float(normaliser), dtype=dtype, device=response_mask.device)


def _check_like(name: str, other: Tensor | None, ref: Tensor) -> None:
    if other is not None and other.shape != ref.shape:
        raise ValueError(f"{name} {tuple(other.shape)} must have the shape of logp_tokens {tuple(ref.shape)}")


def sega_loss(
    logp_tokens: Tensor,
    response_mask: Tensor,
    advantages: Tensor,
    *,
    normalization: Normalization = "sequence_sum",
    normaliser: float | Tensor | None = None,
    num_groups: int | None = None,
    ref_logp_tokens: Tensor | None = None,
    kl_coef: float = 0.0,
    old_logp_tokens: Tensor | None = None,
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SEGA policy-gradient loss, GEM Eq. 2 (arXiv 2511.13007)::

        loss = - sum_i sum_t m_it * A_i * log pi(a_it) / Z  +  kl_coef * sum_i sum_t m_it * k3_it / Z

    which equals - sum_i A_i * log pi(a_i | q) / Z with the sequence log-prob summed over the
    masked response tokens. Gradient: d loss / d logp_it = -A_i / Z on response tokens, 0 elsewhere.

    Normalisation (Z):
    - ``sequence_sum`` (default, the paper): Z = number of prompt groups in the global batch. Pass
      ``num_groups=`` (or ``normaliser=``). We recommend counting every group, skipped ones
      included, so that the step size does not depend on how many groups were skipped.
    - ``token_mean``: Z = number of response tokens in the global batch, passed as ``normaliser=``.
      If omitted, the local count ``response_mask.sum()`` is used, which is right only when the
      batch is not split across microbatches or ranks.
    When the caller splits the N rows over microbatches and DP ranks and sums the losses (and
    gradients), it must pass the same global Z to every split; the sum then equals the loss of
    the whole batch. Computing Z (an all-reduce over DP) is the caller's job.

    Optional extras, off by default:
    - KL: with ``ref_logp_tokens``, the k3 estimator per token,
      k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, summed over response tokens and divided by the
      same Z, added with weight ``kl_coef``. With ``kl_coef == 0`` the KL is only reported.
    - Clipping: with ``old_logp_tokens`` (the log-probs when the rollout was sampled, detached),
      the per-token ratio rho = exp(logp - old) enters the PPO surrogate
      min(rho * A_i, clip(rho, 1 - clip_eps, 1 + clip_eps) * A_i) in place of A_i * logp. When
      old == logp the loss VALUE differs (sum of A instead of A * logp) but the gradient equals
      the unclipped one.

    Args:
        logp_tokens: [N, T] log pi_theta of each response token (requires grad; bf16/fp16 are
            computed in float32).
        response_mask: [N, T] bool, True on response tokens (EOS-terminated, padding excluded).
        advantages: [N] from ``scoring.advantages`` (0 for skipped candidates); not differentiated.
            Or [N, T], each candidate's A_i on its own tokens: packed rows (``data.packing``),
            where one row holds several candidates; Eq. 2 is then still weighted per sequence.
        ref_logp_tokens, old_logp_tokens: [N, T] or None; treated as constants.

    Returns:
        (loss, metrics): the scalar loss and detached scalar tensors ``loss``, ``pg_loss``,
        ``kl_loss`` (the KL term before kl_coef), ``kl_mean`` (k3 per token), ``clip_fraction``
        (tokens whose gradient the clip removed), ``num_tokens`` and ``logp_mean``. The token
        means are over this call's tokens only; reduce them across splits for logging.
    """
    if logp_tokens.dim() != 2 or logp_tokens.shape != response_mask.shape:
        raise ValueError(f"logp_tokens {tuple(logp_tokens.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must both be [N, T]")
    if response_mask.dtype != torch.bool:
        raise TypeError(f"response_mask must be bool, got {response_mask.dtype}; pass mask.bool()")
    if advantages.shape not in (logp_tokens.shape[:1], logp_tokens.shape):
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [N] = [{logp_tokens.shape[0]}] "
                         f"(or per token, [N, T]); flatten the [G, k] advantages with .reshape(-1)")
    _check_like("ref_logp_tokens", ref_logp_tokens, logp_tokens)
    _check_like("old_logp_tokens", old_logp_tokens, logp_tokens)
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef={kl_coef} must be a finite number >= 0")
    if kl_coef > 0 and ref_logp_tokens is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logp_tokens (log-probs of the frozen reference)")
    if old_logp_tokens is not None and not (math.isfinite(clip_eps) and 0 < clip_eps < 1):
        raise ValueError(f"clip_eps={clip_eps} must lie in (0, 1), e.g. 0.2")

    dtype = logp_tokens.dtype if logp_tokens.dtype == torch.float64 else torch.float32
    mask = response_mask
    logp = logp_tokens.to(dtype)
    adv = advantages.detach().to(device=logp.device, dtype=dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    z = _resolve_normaliser(normalization, normaliser, num_groups, mask, dtype)
    num_tokens = mask.sum().to(dtype)
    token_den = num_tokens.clamp(min=1)
    zero = logp.new_zeros(())

    if old_logp_tokens is None:
        surrogate = torch.where(mask, adv * logp, 0.0)
        clip_fraction = zero
    else:
        # Mask the log-ratio before exp: a masked position must not overflow and poison backward.
        log_ratio = torch.where(mask, logp - old_logp_tokens.detach().to(dtype), 0.0)
        ratio = torch.exp(log_ratio)
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
        surrogate = torch.where(mask, torch.minimum(unclipped, clipped), 0.0)
        clip_fraction = (mask & (clipped < unclipped)).sum().to(dtype) / token_den
    pg_loss = -surrogate.sum() / z

    if ref_logp_tokens is None:
        kl_loss, kl_sum = zero, zero
    else:
        delta = torch.where(mask, ref_logp_tokens.detach().to(dtype) - logp, 0.0)
        k3 = torch.exp(delta) - delta - 1.0  # 0 at masked positions, since delta = 0 there
        kl_sum = k3.sum()
        kl_loss = kl_sum / z
    loss = pg_loss + kl_coef * kl_loss if kl_coef > 0 else pg_loss

    metrics = {
        "loss": loss.detach(),
        "pg_loss": pg_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "kl_mean": kl_sum.detach() / token_den,
        "clip_fraction": clip_fraction.detach(),
        "num_tokens": num_tokens.detach(),
        "logp_mean": torch.where(mask, logp.detach(), 0.0).sum() / token_den,
    }
    return loss, metrics
