"""From tokenised examples to model batches: length policy, shuffling, DP sharding, collation.

The pieces, in the order a training loop uses them:

1. ``apply_overlong_policy``: sequences longer than ``max_seq_len`` are either dropped or have
   their prompt cut from the left (the response, which carries the loss, is never cut); the
   counts come back in an ``OverlongReport`` and are logged.
2. ``GlobalBatchIterator``: one deterministic permutation per epoch (from ``seed`` and the epoch
   number), cut into global batches; DP rank ``r`` of ``d`` gets the contiguous ``r``-th
   ``1/d`` of every global batch, so the global batch sequence does not depend on ``d`` and a
   run can resume at another DP size. Its position is ``(epoch, batch_index)``.
3. ``collate`` / ``collate_pairs``: right-padded tensors (shapes below). Right padding plus the
   causal mask means real tokens never attend to padding, so no extra attention mask is needed
   for correctness; padded positions have ``loss_mask == 0``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, TypeVar

import torch

from megatron_sega.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

OverlongPolicy = Literal["truncate_prompt_left", "drop"]
OVERLONG_POLICIES: tuple[str, ...] = ("truncate_prompt_left", "drop")


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """A prompt and one response as token ids; the training sequence is their concatenation."""

    id: str
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """A prompt with its chosen and rejected responses, sharing one prompt encoding;
    ``subset`` is the record's ``subset`` column, for per-subset evaluation."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    subset: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def chosen(self) -> TokenizedExample:
        return TokenizedExample(self.id, self.prompt_ids, self.chosen_ids)

    @property
    def rejected(self) -> TokenizedExample:
        return TokenizedExample(self.id, self.prompt_ids, self.rejected_ids)


E = TypeVar("E", TokenizedExample, TokenizedPair)
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Overlong policy
# --------------------------------------------------------------------------------------------


@dataclass
class OverlongReport:
    """Counts from ``apply_overlong_policy``; ``dropped_ids`` lists what was dropped."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.total} examples: kept {self.kept} ({self.truncated} with the prompt "
            f"truncated on the left), dropped {self.dropped} as too long"
        )


def apply_overlong_policy(
    examples: Sequence[E],
    max_seq_len: int,
    policy: OverlongPolicy,
    bos_id: int | None = None,
) -> tuple[list[E], OverlongReport]:
    """Make every example fit ``max_seq_len`` tokens (prompt + longest response).

    ``truncate_prompt_left`` keeps the end of the prompt (the question is usually at the end,
    right before the assistant header) and keeps a leading ``bos_id``; an example whose response
    alone leaves no room for at least one prompt token is dropped even then, because the first
    response token needs a position to be predicted from.
    """
    if policy not in OVERLONG_POLICIES:
        raise ValueError(f"overlong policy must be one of {OVERLONG_POLICIES}, got {policy!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    report = OverlongReport(total=len(examples))
    kept: list[E] = []
    for ex in examples:
        if ex.length <= max_seq_len:
            kept.append(ex)
            continue
        truncated = _truncate_prompt(ex, max_seq_len, bos_id) if policy != "drop" else None
        if truncated is None:
            report.dropped += 1
            report.dropped_ids.append(ex.id)
            logger.debug("dropping overlong example %s (%d tokens)", ex.id, ex.length)
        else:
            report.truncated += 1
            kept.append(truncated)
    report.kept = len(kept)
    if report.dropped or report.truncated:
        logger.warning("max_seq_len=%d, policy=%s: %s", max_seq_len, policy, report.summary())
    return kept, report


def _truncate_prompt(ex: E, max_seq_len: int, bos_id: int | None) -> E | None:
    room = max_seq_len - (ex.length - len(ex.prompt_ids))  # tokens left for the prompt
    prompt = ex.prompt_ids
    keep_bos = bos_id is not None and prompt[:1] == [bos_id]
    if room < (2 if keep_bos else 1):
        return None
    tail = room - 1 if keep_bos else room
    new_prompt = ([bos_id] if keep_bos else []) + prompt[len(prompt) - tail :]
    return replace(ex, prompt_ids=new_prompt)  # type: ignore[type-var]


# --------------------------------------------------------------------------------------------
# Shuffling and DP sharding
# --------------------------------------------------------------------------------------------


class GlobalBatchIterator(Generic[T]):
    """Yields this DP rank's share of each global batch, epoch after epoch, resumably.

    Each epoch is a permutation of ``range(len(dataset))`` seeded by ``(seed, epoch)``
    (identity order if ``shuffle=False``), cut into ``len(dataset) // global_batch_size``
    global batches; the incomplete remainder of an epoch is not used in that epoch (the next
    epoch's permutation reaches it). Rank ``r`` gets items ``[r*m, (r+1)*m)`` of each global
    batch, ``m = global_batch_size // dp_size``. ``num_epochs=None`` iterates forever.
    """

    def __init__(
        self,
        dataset: Sequence[T],
        global_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        name: str = "global_batch_size",
    ) -> None:
        # ``name``: the option that sets the global batch size (e.g. 'sft.global_batch_size'),
        # so that a too-small dataset is reported in the user's terms.
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of the "
                f"data-parallel size ({dp_size})"
            )
        if len(dataset) < global_batch_size:
            raise DataError(
                f"the dataset has {len(dataset)} usable examples, fewer than one global batch "
                f"({name} = {global_batch_size}); lower {name} or add data"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.batches_per_epoch = len(dataset) // global_batch_size
        self.epoch = 0
        self.batch_index = 0  # global batches already consumed in the current epoch
        self._order: list[int] | None = None
        self._order_epoch = -1

    def __iter__(self) -> Iterator[list[T]]:
        return self

    def __next__(self) -> list[T]:
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        indices = self.global_indices(self.epoch, self.batch_index)
        self.batch_index += 1
        share = self.global_batch_size // self.dp_size
        mine = indices[self.dp_rank * share : (self.dp_rank + 1) * share]
        return [self.dataset[i] for i in mine]

    def global_indices(self, epoch: int, batch_index: int) -> list[int]:
        """Dataset indices of global batch ``batch_index`` of ``epoch`` (all ranks' shares)."""
        order = self._order
        if order is None or self._order_epoch != epoch:
            order = self._order = self._permutation(epoch)
            self._order_epoch = epoch
        start = batch_index * self.global_batch_size
        return order[start : start + self.global_batch_size]

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # A string seed is hashed with SHA-512 by `random`, stable across runs and platforms.
            random.Random(f"megatron-sega:{self.seed}:{epoch}").shuffle(order)
        return order

    def state_dict(self) -> dict[str, Any]:
        """The position, plus what must match on restore for the position to mean the same."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": len(self.dataset),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the data and batch settings must be unchanged.

        ``dp_size`` may differ from the saved run: global batches do not depend on it.
        """
        for key in ("seed", "shuffle", "num_examples", "global_batch_size"):
            current = getattr(self, key) if key != "num_examples" else len(self.dataset)
            if state.get(key) != current:
                raise CheckpointError(
                    f"cannot resume the data iterator: saved {key}={state.get(key)!r} but this "
                    f"run has {key}={current!r}; resume with the same data and batch settings, "
                    f"or start afresh in another checkpoint.save_dir"
                )
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise CheckpointError(f"the checkpoint's data iterator position epoch={epoch}, "
                                  f"batch_index={index} is invalid for {self.batches_per_epoch} "
                                  f"batches per epoch; the checkpoint is damaged or foreign")
        self.epoch, self.batch_index = epoch, index


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A right-padded batch of prompt+response sequences. B = batch size, S = padded length.

    - ``tokens``   [B, S] int64: prompt then response ids, then ``pad_id``.
    - ``labels``   [B, S] int64: next-token targets, ``labels[b, t] = tokens[b, t + 1]``;
      ``pad_id`` where there is no next token.
    - ``loss_mask``[B, S] float32: 1 exactly where ``labels[b, t]`` is a response token, i.e.
      ``prompt_lengths[b] - 1 <= t < lengths[b] - 1``; 0 on prompt targets and padding.
    - ``prompt_lengths`` [B] int64, ``lengths`` [B] int64 (prompt + response, unpadded).
    - ``ids``: the example ids, for logs and per-example metrics.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    lengths: torch.Tensor
    ids: list[str]

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class PairBatch:
    """Chosen and rejected sequences of the same pairs, padded to one common length S.

    ``chosen`` and ``rejected`` are ``Batch`` es with the same B and S and the same row order;
    ``concat()`` stacks them into one ``[2B, S]`` batch (chosen rows first) for a single forward.
    """

    chosen: Batch
    rejected: Batch

    @property
    def ids(self) -> list[str]:
        return self.chosen.ids

    def concat(self) -> Batch:
        c, r = self.chosen, self.rejected
        return Batch(
            tokens=torch.cat([c.tokens, r.tokens]),
            labels=torch.cat([c.labels, r.labels]),
            loss_mask=torch.cat([c.loss_mask, r.loss_mask]),
            prompt_lengths=torch.cat([c.prompt_lengths, r.prompt_lengths]),
            lengths=torch.cat([c.lengths, r.lengths]),
            ids=c.ids + r.ids,
        )


def padded_length(longest: int, pad_to: int | None = None, pad_to_multiple_of: int = 1) -> int:
    """S for a batch whose longest sequence is ``longest``.

    ``pad_to`` fixes S (static shapes, e.g. for CUDA graphs or pipeline parallelism, where all
    micro-batches must have one shape); ``pad_to_multiple_of`` rounds up, e.g. to the TP size
    for sequence parallelism.
    """
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if pad_to is not None:
        if longest > pad_to:
            raise ValueError(
                f"a sequence has {longest} tokens, more than pad_to={pad_to}; apply the overlong "
                "policy with max_seq_len <= pad_to first"
            )
        longest = pad_to
    return -(-max(longest, 1) // pad_to_multiple_of) * pad_to_multiple_of


def collate(
    examples: Sequence[TokenizedExample],
    pad_id: int,
    *,
    pad_to: int | None = None,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """Right-pad examples into a ``Batch`` (see its docstring for shapes and masks)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    seq_len = padded_length(max(ex.length for ex in examples), pad_to, pad_to_multiple_of)
    return _collate_to(examples, pad_id, seq_len)


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    *,
    pad_to: int | None = None,
    pad_to_multiple_of: int = 1,
) -> PairBatch:
    """Collate pairs into a ``PairBatch``; both sides share one S so they can be stacked."""
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    seq_len = padded_length(max(p.length for p in pairs), pad_to, pad_to_multiple_of)
    return PairBatch(
        chosen=_collate_to([p.chosen for p in pairs], pad_id, seq_len),
        rejected=_collate_to([p.rejected for p in pairs], pad_id, seq_len),
    )


def _collate_to(examples: Sequence[TokenizedExample], pad_id: int, seq_len: int) -> Batch:
    batch = len(examples)
    tokens = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((batch, seq_len), dtype=torch.float32)
    prompt_lengths = torch.empty(batch, dtype=torch.long)
    lengths = torch.empty(batch, dtype=torch.long)
    for b, ex in enumerate(examples):
        seq = torch.tensor(ex.prompt_ids + ex.response_ids, dtype=torch.long)
        n, p = len(seq), len(ex.prompt_ids)
        tokens[b, :n] = seq
        labels[b, : n - 1] = seq[1:]
        # Target position t predicts token t+1; response tokens sit at [p, n), so their
        # predictions sit at [p-1, n-1). With an empty prompt the first response token has no
        # position to be predicted from.
        loss_mask[b, max(p - 1, 0) : n - 1] = 1.0
        prompt_lengths[b] = p
        lengths[b] = n
    return Batch(tokens, labels, loss_mask, prompt_lengths, lengths, [ex.id for ex in examples])
