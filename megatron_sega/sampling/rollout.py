"""What the sampler hands to the scorer and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings (see METHOD.md: reference k=4, temperature 0.9-1.0, top_p 0.95)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 1234

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Rollout:
    """N sampled responses (rows), right-padded to T generated positions.

    - ``response_mask``: generated tokens, including the terminating stop token (it is part of
      ``log pi(a|q)``: the model learns to stop);
    - ``content_mask``: ``response_mask`` without the stop token (what entropy scoring sees:
      EOS and padding never enter a score);
    - ``logp``/``entropy``: untempered distribution (temperature 1, full true vocabulary);
      ``logp_sampling``: the distribution actually sampled from (tempered, top-k/top-p support).
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor  # [N, T] long, pad_id where ~response_mask
    response_mask: torch.Tensor  # [N, T] bool
    content_mask: torch.Tensor  # [N, T] bool
    logp: torch.Tensor  # [N, T] float32
    logp_sampling: torch.Tensor  # [N, T] float32
    entropy: torch.Tensor  # [N, T] float32
    lengths: torch.Tensor  # [N] long: generated tokens incl. the stop token
    finish_reason: list[str]  # 'stop' | 'stop_string' | 'length'
    sample_ids: torch.Tensor  # [N] long: global ids that seed each row's noise
    extras: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.response_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    @staticmethod
    def concat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """Concatenate rollouts (rows), padding to the longest response."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.response_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        return Rollout(
            prompt_ids=[ids for p in parts for ids in p.prompt_ids],
            response_ids=torch.cat([pad(p.response_ids, pad_id) for p in parts]),
            response_mask=torch.cat([pad(p.response_mask, False) for p in parts]),
            content_mask=torch.cat([pad(p.content_mask, False) for p in parts]),
            logp=torch.cat([pad(p.logp, 0.0) for p in parts]),
            logp_sampling=torch.cat([pad(p.logp_sampling, 0.0) for p in parts]),
            entropy=torch.cat([pad(p.entropy, 0.0) for p in parts]),
            lengths=torch.cat([p.lengths for p in parts]),
            finish_reason=[r for p in parts for r in p.finish_reason],
            sample_ids=torch.cat([p.sample_ids for p in parts]),
        )
