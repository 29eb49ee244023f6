"""The shipped demo data and tiny tokenizer: valid, short, fit the method, and reproducible."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from megatron_sega.data import TINY_TOKENIZER_DIR
from megatron_sega.data.records import read_pairs
from megatron_sega.data.templates import PromptFormatter, tokenize_pairs
from megatron_sega.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo_data"
FINAL = re.compile(r"Final Answer: (\S+)$")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_data", DEMO / "make_demo_data.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_files_are_valid_and_fit_the_method() -> None:
    train, report = read_pairs(DEMO / "train.jsonl")
    evaluation, _ = read_pairs(DEMO / "eval.jsonl")
    assert 400 <= len(train) <= 800 and 100 <= len(evaluation) <= 200 and report.total_dropped == 0
    assert not {p.prompt for p in train} & {p.prompt for p in evaluation}
    assert len({p.prompt for p in train}) == len(train)
    for p in train + evaluation:
        chosen = FINAL.search(p.chosen)
        assert chosen is not None and p.chosen != p.rejected
        assert not p.chosen.startswith("Final Answer:")  # chosen always reasons first
        rejected = FINAL.search(p.rejected)
        assert rejected is not None
        # Rejected: a wrong answer, or no reasoning at all.
        assert rejected.group(1) != chosen.group(1) or p.rejected.startswith("Final Answer:")


def test_tiny_tokenizer_and_sequence_lengths() -> None:
    tok = Tokenizer.from_path(TINY_TOKENIZER_DIR)
    assert 256 < tok.vocab_size < 1000 and tok.vocab_size % 128 != 0
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>") and tok.pad_id != tok.eos_id
    pairs, _ = read_pairs([DEMO / "train.jsonl", DEMO / "eval.jsonl"])
    for template in ("chat", "none"):
        fmt = PromptFormatter(tok, template)
        for pair in tokenize_pairs(pairs, fmt, append_eos=True):
            assert pair.length < 64


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl"])
def test_demo_data_is_reproducible(name: str, tmp_path: Path) -> None:
    gen = _generator()
    train, evaluation = gen.make_splits()
    gen._write_jsonl(tmp_path / name, train if name == "train.jsonl" else evaluation)
    assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes()


def test_tiny_tokenizer_is_reproducible(tmp_path: Path) -> None:
    gen = _generator()
    gen.generate(tmp_path / "data", tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes()
