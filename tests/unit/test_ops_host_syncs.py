"""Issue 20 item 9: the log-prob / entropy ops read nothing on the host inside their chunk loops.

Every host read (``bool``/``int``/``float``/``.item()``/``.tolist()`` of a tensor, ``nonzero``,
boolean-mask indexing) is a device sync on a GPU. A ``TorchFunctionMode`` sees each of them on
CPU too, so the count per call is checked here without a GPU."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_sega import ops

_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero",
          "masked_select"}


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "index_put_", "index_put") else None
        bool_mask = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                        for i in (index if isinstance(index, (tuple, list)) else (index,)))
        self.count += name in _READS or bool_mask
        return func(*args, **(kwargs or {}))


def _inputs(rows=1024, vocab=50):
    logits = torch.randn(rows, vocab, requires_grad=True)
    return logits, torch.randint(0, vocab, (rows,))


@pytest.mark.parametrize("op", ["log_probs", "log_probs_and_entropy", "entropy"])
def test_one_host_read_per_forward_and_none_per_backward(op):
    """16 chunks of 64 tokens: the base commit read ~3 flags per chunk in the forward, a
    ``nonzero`` and boolean indexing per chunk in the backward, and the targets' min and max."""
    logits, targets = _inputs()
    call = {"log_probs": lambda: ops.log_probs(logits, targets, 0, 50, None, chunk_size=64),
            "log_probs_and_entropy": lambda: sum(ops.log_probs_and_entropy(
                logits, targets, 0, 50, None, chunk_size=64)),
            "entropy": lambda: ops.entropy(logits, 0, 50, None, chunk_size=64)}[op]
    with HostReads() as forward:
        out = call()
    with HostReads() as backward:
        out.sum().backward()
    assert forward.count <= 1 and backward.count == 0, (forward.count, backward.count)


def test_the_checks_still_raise_after_the_loop():
    logits, targets = _inputs(rows=256)
    bad = logits.detach().clone()
    bad[200, 3] = float("nan")  # in the last chunk
    with pytest.raises(ops.NonFiniteLogitsError, match="TP rank 0"):
        ops.log_probs(bad, targets, 0, 50, None, chunk_size=64)
    with pytest.raises(ops.NonFiniteLogitsError):
        ops.entropy(bad.new_full((3, 50), float("inf")), 0, 50, None)
    out_of_range = targets.clone()
    out_of_range[100] = 50
    with pytest.raises(ValueError, match=r"targets must be ids in \[0, vocab_size=50\): got "
                                         r"\[\d+, 50\]"):
        ops.log_probs(logits, out_of_range, 0, 50, None, chunk_size=64)
    out_of_range[100] = -1
    with pytest.raises(ValueError, match=r"got \[-1, "):
        ops.log_probs_and_entropy(logits, out_of_range, 0, 50, None, chunk_size=64)
