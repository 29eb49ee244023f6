"""One way to cut a batch into microbatches (SFT, SEGA, teacher-forced statistics): equal shapes,
padding rows that weigh nothing, so an uneven batch gives the loss of the unpadded one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_sega.training.microbatch import split_microbatches
from megatron_sega.training.sft import sft_loss_fn


def _rows(n: int, seq: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {"tokens": torch.randint(3, 50, (n, seq), generator=g),
            "labels": torch.randint(3, 50, (n, seq), generator=g),
            "loss_mask": (torch.rand(n, seq, generator=g) > 0.3).float(),
            "advantage": torch.randn(n, generator=g)}


def test_padding_rows_copy_tokens_and_zero_everything_else():
    rows = _rows(5)
    micro = split_microbatches(rows, 2)
    assert [mb["tokens"].shape[0] for mb in micro] == [2, 2, 2]
    last = micro[-1]
    assert torch.equal(last["tokens"], torch.stack([rows["tokens"][4], rows["tokens"][0]]))
    assert torch.equal(last["labels"][0], rows["labels"][4]) and not last["labels"][1].any()
    assert not last["loss_mask"][1].any() and last["advantage"][1] == 0
    kept = {k: torch.cat([mb[k] for mb in micro])[:5] for k in rows}
    assert all(torch.equal(kept[k], rows[k]) for k in rows)
    # A batch smaller than one microbatch repeats its rows as filler.
    tiny = split_microbatches(_rows(2), 5)
    assert len(tiny) == 1 and torch.equal(tiny[0]["tokens"][2:4], _rows(2)["tokens"])


def test_an_uneven_sft_batch_gives_the_loss_of_the_whole_batch():
    """(SFT used to refuse a per-rank batch that is not a multiple of sft.micro_batch_size.)"""
    rows = _rows(5)
    rows.pop("advantage")
    vocab = 64
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, vocab, generator=g, dtype=torch.float64)  # row 5: padding
    tokens = float(rows["loss_mask"].sum())
    loss_fn = sft_loss_fn(vocab, tokens, SimpleNamespace(tp=1, tp_rank=0, tp_group=None))
    micro = split_microbatches(rows, 3)
    split = sum(loss_fn(logits[3 * i:3 * (i + 1)], mb)[0] for i, mb in enumerate(micro))
    whole, _ = loss_fn(logits[:5], rows)
    assert float(split) == pytest.approx(float(whole), rel=1e-6)
    logp = torch.log_softmax(logits[:5], -1).gather(-1, rows["labels"][..., None])[..., 0]
    reference = -(logp * rows["loss_mask"]).sum() / tokens  # float64; the op computes in fp32
    assert float(whole) == pytest.approx(float(reference), rel=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        split_microbatches(_rows(2), 0)
    with pytest.raises(ValueError, match="empty batch"):
        split_microbatches({"tokens": torch.zeros(0, 3, dtype=torch.long)}, 2)
