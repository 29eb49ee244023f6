"""Vocab-parallel math on logits shards: entropy, log-probs, exact top-k/top-p sampling.

Pure functions of a logits shard ``[..., V_shard]`` (this rank's contiguous vocabulary columns,
starting at global id ``vocab_start``), the true ``vocab_size`` (larger ids are padding and are
ignored) and an explicit ``tp_group`` (None: one process holding the whole vocabulary, no
communication). The vocabulary is never gathered: ranks exchange a few scalars per token.

    log_probs(logits_shard, targets, vocab_start, vocab_size, tp_group)             -> [...]
    entropy(logits_shard, vocab_start, vocab_size, tp_group)                        -> [...]
    log_probs_and_entropy(logits_shard, targets, vocab_start, vocab_size, tp_group) -> (lp, H)
    sample(logits_shard, vocab_start, vocab_size, tp_group, *, temperature, top_k=0, top_p=1.0,
           seed=0, step=0, candidates=CANDIDATES, stats=None)
        -> Sample(tokens, logp_sampling, logp_untempered, entropy)   (one all-gather per call in
           the common case; see ops/sampling.py)

All take ``chunk_size=`` (rows per chunk; temporaries are O(chunk_size x V_shard) fp32), compute in
fp32 whatever the input dtype, never modify their input and raise ValueError on NaN/Inf logits
(on every rank at once). log-probs and entropy are differentiable.
"""

from megatron_sega.ops._shard import DEFAULT_CHUNK_SIZE, NonFiniteLogitsError
from megatron_sega.ops.logprobs import entropy, log_probs, log_probs_and_entropy
from megatron_sega.ops.sampling import CANDIDATES, SAMPLE_CHUNK_SIZE, Sample, SampleStats, sample

__all__ = [
    "NonFiniteLogitsError",
    "CANDIDATES", "DEFAULT_CHUNK_SIZE", "SAMPLE_CHUNK_SIZE", "Sample", "SampleStats", "entropy",
    "log_probs",
    "log_probs_and_entropy", "sample",
]
