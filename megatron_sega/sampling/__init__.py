"""KV-cached batched generation on the Megatron Llama model -> Rollout."""

from megatron_sega.sampling.rollout import Rollout, SamplingParams
from megatron_sega.sampling.sampler import Sampler, SamplerMemoryError

__all__ = ["Rollout", "Sampler", "SamplerMemoryError", "SamplingParams"]
