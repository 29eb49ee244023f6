"""megatron-sega: GEM/SEGA preference alignment of Llama models on Megatron-Core."""

from megatron_sega import _eager_fusions

_eager_fusions.install()

__version__ = "0.1.0"
