"""The paper's baselines, DPO and IPO, as pure loss functions (see ``loss``)."""

from megatron_sega.dpo.loss import PreferenceLoss, preference_loss, sequence_logps

__all__ = ["PreferenceLoss", "preference_loss", "sequence_logps"]
