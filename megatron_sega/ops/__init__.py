"""Vocab-parallel math on logits shards: entropy, log-probs, exact top-k/top-p sampling.

Pure functions of a logits shard ``[..., V_shard]`` (this rank's contiguous vocabulary columns,
starting at global id ``vocab_start``), the true ``vocab_size`` (larger ids are padding) and an
explicit ``tp_group`` (None: one process, no communication). The vocabulary is never gathered.
"""

from megatron_sega.ops._shard import DEFAULT_CHUNK_SIZE
from megatron_sega.ops.logprobs import entropy, log_probs, log_probs_and_entropy
from megatron_sega.ops.sampling import Sample, sample

__all__ = [
    "DEFAULT_CHUNK_SIZE", "Sample", "entropy", "log_probs", "log_probs_and_entropy", "sample",
]
