"""Random initial weights that are the same model at every TP/PP/VPP layout.

The full (unsharded) state dict is drawn once from a seeded generator, in Megatron's full layout
(``convert.layout.full_shapes``), and each rank copies its own shards of it: a run at TP=2/PP=2
starts from exactly the weights of a TP=1/PP=1 run with the same seed (tests, benchmarks, the
tiny demo). The whole model is held once per process, so this is for small models only.
"""

from __future__ import annotations

import torch

from megatron_sega.errors import ConfigError
from megatron_sega.convert.layout import full_shapes, load_full_state_dict
from megatron_sega.models.spec import LlamaSpec

# Beyond this size a run must start from a converted checkpoint instead.
MAX_RANDOM_INIT_PARAMS = 2_000_000_000


def random_full_state_dict(spec, padded_vocab: int, seed: int = 0, std: float = 0.02,
                           dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the full layout: norms ``1 + 0.1 N(0, 1)``, matrices
    ``std * N(0, 1)`` (``std``: the spec's ``init_std`` in a run)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in full_shapes(spec, padded_vocab).items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
        else:
            out[name] = (std * torch.randn(shape, generator=generator)).to(dtype)
    return out


def random_init(chunks: list, spec: LlamaSpec, tp: int, tp_rank: int, seed: int) -> None:
    """Fill this rank's model ``chunks`` with its shards of :func:`random_full_state_dict`."""
    padded = spec.padded_vocab_size(tp)
    n_params = sum(torch.Size(s).numel() for s in full_shapes(spec, padded).values())
    if n_params > MAX_RANDOM_INIT_PARAMS:
        raise ConfigError(
            f"a {n_params / 1e9:.1f}B-parameter model cannot start from random weights here; "
            "convert a HF checkpoint with tools/convert.py and set model.load")
    full = random_full_state_dict(spec, padded, seed=seed, std=spec.init_std)
    load_full_state_dict(chunks, full, tp, tp_rank)
