#!/usr/bin/env python
"""Generate the CPU demo's preference data and its tiny tokenizer, deterministically.

Writes ``examples/demo_data/{train,eval}.jsonl`` and
``megatron_sega/data/assets/tiny_tokenizer/{tokenizer.json,tokenizer_config.json}``.
Running it again gives byte-identical files (a unit test checks that the shipped files match).

The task is built to fit GEM/SEGA and to be learnable by a 2-4 layer, 64-128 wide transformer in
minutes on a CPU: short questions from five templated task families (addition, subtraction,
comparison, successor, first/last letter of a word). The chosen response reasons in one short
step and ends with ``Final Answer: X`` (X correct); the rejected one is, in equal shares,
(a) the same reasoning with a wrong result, (b) correct reasoning but a different final answer,
(c) only a wrong ``Final Answer``, or (d) only the correct ``Final Answer`` with no reasoning.
Train and eval prompts are disjoint and unique within each file.

The tokenizer is a byte-level BPE (every string encodes; decoding is exact) with single-digit
number tokens (so arithmetic is learnable), trained on the demo texts, with special tokens
``<pad> <s> </s> <|system|> <|user|> <|assistant|>`` and a small chat template.

Usage: python examples/demo_data/make_demo_data.py [--data-dir DIR] [--tokenizer-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 20251113  # arXiv 2511.13007
N_TRAIN = 640
N_EVAL = 160
VOCAB_SIZE = 460  # 460 % 128 != 0 on purpose: the model code must pad the vocabulary itself
MAX_TOKENS = 64
SYSTEM_PROMPT = "You are a helpful assistant. Think step-by-step and then provide your Final Answer."
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
WORDS = (
    "apple bread cloud dance eagle field grape house island jelly kite lemon music night "
    "ocean piano queen river stone tiger uncle violin water yellow zebra basket candle "
    "garden honey jacket forest marble pencil rocket silver window orange button letter summer"
).split()

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO / "examples" / "demo_data"
DEFAULT_TOKENIZER_DIR = REPO / "megatron_sega" / "data" / "assets" / "tiny_tokenizer"

# A task item: (prompt, reasoning template with {r} for a result, correct answer as text).
Item = tuple[str, str, str]


def _addition() -> list[Item]:
    return [
        (f"What is {a} + {b}?", f"{a} + {b} = {{r}}.", str(a + b))
        for a in range(20)
        for b in range(20)
    ]


def _subtraction() -> list[Item]:
    return [
        (f"What is {a} - {b}?", f"{a} - {b} = {{r}}.", str(a - b))
        for a in range(1, 31)
        for b in range(a + 1)
    ]


def _comparison() -> list[Item]:
    items = []
    for a in range(60):
        for b in range(60):
            if a != b:
                big = max(a, b)
                items.append((f"Which is larger, {a} or {b}?", f"{big} > {min(a, b)}, so {{r}} is larger.", str(big)))
    return items


def _successor() -> list[Item]:
    return [(f"What number comes after {n}?", f"{n} + 1 = {{r}}.", str(n + 1)) for n in range(199)]


def _letters() -> list[Item]:
    items = []
    for w in WORDS:
        spelled = " ".join(w)
        items.append((f"What is the first letter of {w}?", f"{w} = {spelled}. The first letter is {{r}}.", w[0]))
        items.append((f"What is the last letter of {w}?", f"{w} = {spelled}. The last letter is {{r}}.", w[-1]))
    return items


# (name, pool builder, train count, eval count)
TASKS: list[tuple[str, Callable[[], list[Item]], int, int]] = [
    ("addition", _addition, 190, 48),
    ("subtraction", _subtraction, 160, 40),
    ("comparison", _comparison, 130, 32),
    ("successor", _successor, 100, 25),
    ("letters", _letters, 60, 15),
]


def _wrong_answer(answer: str, rng: random.Random) -> str:
    if answer.isdigit():
        value = int(answer)
        choices = [value + d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
        return str(rng.choice(choices))
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != answer]
    return rng.choice(letters)


def _make_pair(item: Item, rng: random.Random) -> dict[str, str]:
    prompt, reasoning, answer = item
    chosen = f"{reasoning.format(r=answer)} Final Answer: {answer}"
    wrong = _wrong_answer(answer, rng)
    kind = rng.randrange(4)
    if kind == 0:  # plausible reasoning, wrong result, consistent final answer
        rejected = f"{reasoning.format(r=wrong)} Final Answer: {wrong}"
    elif kind == 1:  # right reasoning, final answer contradicts it
        rejected = f"{reasoning.format(r=answer)} Final Answer: {wrong}"
    elif kind == 2:  # no reasoning, wrong answer
        rejected = f"Final Answer: {wrong}"
    else:  # no reasoning at all, even though the answer is right
        rejected = f"Final Answer: {answer}"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def make_splits(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and eval records; prompts are unique and the two splits are disjoint."""
    rng = random.Random(seed)
    train: list[dict[str, str]] = []
    evaluation: list[dict[str, str]] = []
    for _name, build, n_train, n_eval in TASKS:
        pool = build()
        if len(pool) < n_train + n_eval:
            raise ValueError(f"task pool too small: {len(pool)} < {n_train + n_eval}")
        picked = rng.sample(pool, n_train + n_eval)
        train.extend(_make_pair(item, rng) for item in picked[:n_train])
        evaluation.extend(_make_pair(item, rng) for item in picked[n_train:])
    rng.shuffle(train)
    rng.shuffle(evaluation)
    for split, records in (("train", train), ("eval", evaluation)):
        for i, record in enumerate(records):
            record["id"] = f"demo-{split}-{i:04d}"
    return train, evaluation


def train_tokenizer(texts: list[str]) -> object:
    """A byte-level BPE with single-digit tokens, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    size = tok.get_vocab_size(with_added_tokens=True)
    if size % 128 == 0:
        raise ValueError(f"vocab size {size} is a multiple of 128; change VOCAB_SIZE")
    return tok


def tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _check_lengths(tokenizer_dir: Path, records: list[dict[str, str]]) -> int:
    """Longest chat-formatted sequence, in tokens; must stay under MAX_TOKENS."""
    if str(REPO) not in sys.path:  # run as a script from a checkout without installing
        sys.path.insert(0, str(REPO))
    from megatron_sega.data.templates import PromptFormatter
    from megatron_sega.data.tokenizer import Tokenizer

    fmt = PromptFormatter(Tokenizer.from_path(tokenizer_dir), "chat", SYSTEM_PROMPT)
    longest = 0
    for r in records:
        for response in (r["chosen"], r["rejected"]):
            prompt_ids, response_ids = fmt.encode_pair(r["prompt"], response, append_eos=True)
            longest = max(longest, len(prompt_ids) + len(response_ids))
    if longest >= MAX_TOKENS:
        raise ValueError(f"longest demo sequence has {longest} tokens; keep it under {MAX_TOKENS}")
    return longest


def generate(data_dir: Path, tokenizer_dir: Path) -> None:
    train, evaluation = make_splits()
    records = train + evaluation
    # The system prompt opens every chat-formatted sequence: weight it like one text per record
    # so that BPE merges its words and the sequences stay short.
    texts = [SYSTEM_PROMPT] * len(records) + [
        r[k] for r in records for k in ("prompt", "chosen", "rejected")
    ]
    tok = train_tokenizer(texts)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(data_dir / "train.jsonl", train)
    _write_jsonl(data_dir / "eval.jsonl", evaluation)
    tok.save(str(tokenizer_dir / "tokenizer.json"), pretty=True)  # type: ignore[attr-defined]
    (tokenizer_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8"
    )
    longest = _check_lengths(tokenizer_dir, train + evaluation)
    size = tok.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]
    print(f"wrote {len(train)} train / {len(evaluation)} eval pairs to {data_dir}")
    print(f"wrote tokenizer (vocab {size}) to {tokenizer_dir}; longest sequence {longest} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    args = parser.parse_args()
    generate(args.data_dir, args.tokenizer_dir)


if __name__ == "__main__":
    main()
