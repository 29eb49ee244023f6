"""Preference-pair data: readers and validation, tokenizers, prompt templates, batching.

Typical use::

    pairs, report = read_pairs("examples/demo_data/train.jsonl", on_bad_record="skip")
    tok = Tokenizer.from_path(TINY_TOKENIZER_DIR)
    fmt = PromptFormatter(tok, template="chat")
    examples, overlong = apply_overlong_policy(
        tokenize_sft(pairs, fmt), max_seq_len=64, policy="drop", bos_id=tok.bos_id)
    for shard in GlobalBatchIterator(examples, 32, dp_rank=r, dp_size=d, seed=1234):
        batch = collate(shard, tok.pad_id)
"""

from pathlib import Path

from megatron_sega.data.batching import (
    Batch,
    GlobalBatchIterator,
    OverlongReport,
    PairBatch,
    TokenizedExample,
    TokenizedPair,
    apply_overlong_policy,
    collate,
    collate_pairs,
)
from megatron_sega.data.errors import DataError, TokenizerError
from megatron_sega.data.formats import FORMATS, BadRecordReason, Message, ReadOptions
from megatron_sega.data.records import (
    PreferencePair, ReadReport, detect_formats, has_records, read_pairs, require_pairs,
)
from megatron_sega.data.templates import (
    REFLECTIVE_SYSTEM_PROMPT,
    PromptFormatter,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)
from megatron_sega.data.tokenizer import Tokenizer

TINY_TOKENIZER_DIR: Path = Path(__file__).parent / "assets" / "tiny_tokenizer"
"""A few-hundred-token byte-level BPE with a chat template, for the demo and the tests."""

__all__ = [
    "FORMATS",
    "Message",
    "ReadOptions",
    "detect_formats",
    "TINY_TOKENIZER_DIR",
    "REFLECTIVE_SYSTEM_PROMPT",
    "BadRecordReason",
    "Batch",
    "DataError",
    "GlobalBatchIterator",
    "OverlongReport",
    "PairBatch",
    "PreferencePair",
    "PromptFormatter",
    "ReadReport",
    "TokenizedExample",
    "TokenizedPair",
    "Tokenizer",
    "TokenizerError",
    "apply_overlong_policy",
    "collate",
    "collate_pairs",
    "has_records",
    "read_pairs",
    "require_pairs",
    "tokenize_pairs",
    "tokenize_prompts",
    "tokenize_sft",
]
