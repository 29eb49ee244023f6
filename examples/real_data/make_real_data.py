#!/usr/bin/env python
"""Generate the real-model demo's preference set, deterministically (no downloads).

Writes ``examples/real_data/{train,eval}.jsonl``: short English questions from eight templated
families (word problems with addition, subtraction and multiplication; hours to minutes; days of
the week; letters in a word; even or odd; who is the youngest/oldest of three people). The
chosen response reasons step by step and ends with ``Final Answer: X`` (X correct); the rejected
one is, in equal shares,
(a) the same reasoning with a wrong result and that wrong final answer,
(b) correct reasoning followed by a different final answer,
(c) only a wrong ``Final Answer``, no reasoning,
(d) only the correct ``Final Answer``, no reasoning (sloppy rather than wrong).
Train and eval prompts are disjoint and unique within each file. Running the script again gives
byte-identical files (a unit test checks the shipped files).

Usage: python examples/real_data/make_real_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 2511_13007  # arXiv 2511.13007
N_TRAIN = 320
N_EVAL = 64
OUT = Path(__file__).resolve().parent

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kemal", "Lena", "Maya", "Noah", "Olga", "Pedro", "Rosa", "Sami", "Tara", "Yusuf"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "shells", "coins",
         "stamps", "cards"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["garden", "window", "river", "pencil", "orange", "planet", "bridge", "candle",
         "forest", "guitar", "island", "rocket", "silver", "tiger", "violin", "yellow",
         "basket", "cloud", "dragon", "lemon", "marble", "ocean", "piano", "summer", "winter",
         "button", "kitchen", "mountain", "letter", "jacket", "apple", "bread", "chair",
         "desert", "engine", "flower", "hammer", "helmet", "lantern", "meadow", "needle",
         "paper", "puzzle", "rabbit", "saddle", "tomato", "umbrella", "valley", "wagon",
         "zipper", "anchor", "blanket", "carpet", "dolphin", "feather", "harbor"]

# An item: (prompt, reasoning with {r} where the result goes, correct answer, wrong answers).
Item = tuple[str, str, str, list[str]]


def _near(value: int) -> list[str]:
    return [str(value + d) for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]


def _addition(rng: random.Random) -> Item:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    return (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            f"{name} starts with {a} {item}.\nGetting {b} more gives {a} + {b} = {{r}}.",
            str(a + b), _near(a + b))


def _subtraction(rng: random.Random) -> Item:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?",
            f"{name} had {a} {item} and gave away {b}.\nThat leaves {a} - {b} = {{r}}.",
            str(a - b), _near(a - b))


def _multiplication(rng: random.Random) -> Item:
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"Each box holds {a} {item}. How many {item} are in {b} boxes?",
            f"There are {b} boxes with {a} {item} each.\nSo the total is {b} x {a} = {{r}}.",
            str(a * b), _near(a * b) + [str(a + b)])


def _minutes(rng: random.Random) -> Item:
    h, m = rng.randint(1, 9), rng.choice([5, 10, 15, 20, 25, 30, 40, 45, 50])
    total = 60 * h + m
    return (f"How many minutes are there in {h} hours and {m} minutes?",
            f"One hour has 60 minutes, so {h} hours have {h} x 60 = {60 * h} minutes.\n"
            f"Adding {m} minutes gives {60 * h} + {m} = {{r}}.",
            str(total), [str(total + d) for d in (-60, 60, -10, 10)] + [str(100 * h + m)])


def _days(rng: random.Random) -> Item:
    start, n = rng.randrange(7), rng.randint(2, 6)
    sign, question, way = ((1, f"What day of the week will it be in {n} days?", "forward")
                           if rng.random() < 0.5 else
                           (-1, f"What day of the week was it {n} days ago?", "back"))
    steps = ", ".join(DAYS[(start + sign * i) % 7] for i in range(1, n))
    target = DAYS[(start + sign * n) % 7]
    wrong = [DAYS[(start + sign * n + d) % 7] for d in (-1, 1, 2)]
    return (f"Today is {DAYS[start]}. {question}",
            f"Counting {n} days {way} from {DAYS[start]}: {steps}, then {{r}}.",
            target, wrong)


def _letters(rng: random.Random) -> Item:
    word = rng.choice(WORDS)
    n = len(word)
    return (f"How many letters are in the word '{word}'?",
            f"Spelling it out: {'-'.join(word)}.\nThat is {{r}} letters.",
            str(n), [str(n + d) for d in (-2, -1, 1, 2)])


def _parity(rng: random.Random) -> Item:
    n = rng.randint(11, 199)
    answer = "even" if n % 2 == 0 else "odd"
    return (f"Is {n} an even or an odd number?",
            f"{n} divided by 2 leaves a remainder of {n % 2}.\nSo {n} is {{r}}.",
            answer, ["odd" if answer == "even" else "even"])


def _ordering(rng: random.Random) -> Item:
    a, b, c = rng.sample(NAMES, 3)
    if rng.random() < 0.5:
        return (f"{a} is older than {b}, and {b} is older than {c}. Who is the youngest?",
                f"From oldest to youngest the order is {a}, {b}, {c}.\nThe last one, {{r}}, is "
                "the youngest.", c, [a, b])
    return (f"{a} is younger than {b}, and {b} is younger than {c}. Who is the oldest?",
            f"From youngest to oldest the order is {a}, {b}, {c}.\nThe last one, {{r}}, is the "
            "oldest.", c, [a, b])


FAMILIES: list[Callable[[random.Random], Item]] = [
    _addition, _subtraction, _multiplication, _minutes, _days, _letters, _parity, _ordering]


def _pair(item: Item, style: int, rng: random.Random) -> tuple[str, str]:
    _, reasoning, answer, wrongs = item
    wrong = rng.choice([w for w in wrongs if w != answer])
    chosen = f"{reasoning.format(r=answer)}\nFinal Answer: {answer}"
    if style == 0:
        rejected = f"{reasoning.format(r=wrong)}\nFinal Answer: {wrong}"
    elif style == 1:
        rejected = f"{reasoning.format(r=answer)}\nFinal Answer: {wrong}"
    elif style == 2:
        rejected = f"Final Answer: {wrong}"
    else:
        rejected = f"Final Answer: {answer}"
    return chosen, rejected


def generate(out: Path = OUT) -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    rows: list[dict] = []
    for _ in range(100 * (N_TRAIN + N_EVAL)):  # bounded: a family may run out of prompts
        if len(rows) == N_TRAIN + N_EVAL:
            break
        family = FAMILIES[len(rows) % len(FAMILIES)]
        item = family(rng)
        if item[0] in seen:
            continue
        seen.add(item[0])
        chosen, rejected = _pair(item, len(rows) // len(FAMILIES) % 4, rng)
        rows.append({"prompt": item[0], "chosen": chosen, "rejected": rejected})
    else:
        raise RuntimeError(f"only {len(rows)} distinct prompts; widen the families")
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:N_TRAIN]), ("eval", rows[N_TRAIN:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for i, row in enumerate(part):
                f.write(json.dumps({**row, "id": f"real-{name}-{i:04d}"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
