"""GEM / SEGA math (arXiv 2511.13007): Eq. 1 scoring, reward mapping, filters, advantages, Eq. 2 loss.

Pure functions of tensors; see ``scoring`` and ``loss`` for the equations and the choices made.
"""

from megatron_sega.sega.loss import Normalization, sega_loss
from megatron_sega.sega.scoring import (
    RewardMode,
    ScoreParts,
    TrimMethod,
    advantages,
    answer_span_mask,
    entropy_scores,
    rewards,
    top_bottom_pairs,
    trim_outliers,
)

__all__ = [
    "Normalization",
    "RewardMode",
    "ScoreParts",
    "TrimMethod",
    "advantages",
    "answer_span_mask",
    "entropy_scores",
    "rewards",
    "sega_loss",
    "top_bottom_pairs",
    "trim_outliers",
]
