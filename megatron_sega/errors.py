"""The errors a user can fix, in one place.

Every exception here derives from :class:`UserError`: its message is the whole story (the input,
the problem and the fix) and the CLI prints it as one line, without a traceback, and exits 2.
Anything else that escapes a command is a bug and keeps its traceback.

Each class also derives from the builtin its callers caught before (``ValueError`` mostly), so
code that only knows "bad input" keeps working. The modules that raise them re-export them under
their old names (``megatron_sega.config.ConfigError``, ``megatron_sega.data.DataError``, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or machine, worded for the user (input, problem, fix)."""


class ConfigError(UserError, ValueError):
    """A configuration problem: the option, its value and the fix."""


class ModelConfigError(UserError, ValueError):
    """A model preset or ``config.json`` this project cannot build."""


class ParallelConfigError(UserError, ValueError):
    """A parallel layout (TP/PP/VPP/DP, device) that cannot run."""


class DataError(UserError, ValueError):
    """A data file (or one record in it) is unusable.

    The message starts with the location (``file:line`` or ``file:row N``) when there is one and
    says how to fix the input. ``reason`` is the machine-readable kind of problem (one of
    ``records.BadRecordReason``'s values) when the error concerns one record, else ``None``.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class TokenizerError(UserError, ValueError):
    """A tokenizer directory or chat template cannot be loaded or used as this package needs."""


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that is missing, malformed, unsafe or does not fit the model."""


class LayoutError(UserError, ValueError):
    """A state dict whose names or shapes do not fit the Megatron layout of a model."""


class ConversionError(UserError, ValueError):
    """A HF checkpoint that cannot be converted (unknown or missing tensors, bad shapes)."""


class SamplerMemoryError(UserError, RuntimeError):
    """The sampler's KV cache does not fit the memory it was given."""


class NonFiniteEvalError(UserError, ValueError):
    """The evaluated model's logits are NaN or Inf (raised on every rank together)."""
