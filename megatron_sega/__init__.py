"""megatron-sega: GEM/SEGA preference alignment of Llama models on Megatron-Core."""

__version__ = "0.1.0"
