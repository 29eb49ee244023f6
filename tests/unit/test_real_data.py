"""The real-model demo's preference set: valid, disjoint, in the shape the method needs, and
exactly what its shipped generator writes."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path

from megatron_sega.data.records import read_pairs

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "real_data"
FINAL = re.compile(r"\nFinal Answer: (\S+)$")


def _generator():
    spec = importlib.util.spec_from_file_location("make_real_data", DATA / "make_real_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_files_are_the_generators_output(tmp_path):
    _generator().generate(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_pairs_are_valid_disjoint_and_fit_the_method():
    train, report = read_pairs(DATA / "train.jsonl")
    evaluation, _ = read_pairs(DATA / "eval.jsonl")
    assert (len(train), len(evaluation), report.total_dropped) == (320, 64, 0)
    assert not {p.prompt for p in train} & {p.prompt for p in evaluation}
    assert len({p.prompt for p in train}) == len(train)
    styles = Counter()
    for p in train + evaluation:
        chosen = FINAL.search(p.chosen)
        assert chosen is not None and p.chosen != p.rejected and len(p.chosen) < 300
        assert chosen.start() > 20  # the chosen response reasons before its answer
        assert p.rejected.rsplit("Final Answer: ", 1)[-1] != chosen.group(1) or \
            p.rejected == f"Final Answer: {chosen.group(1)}"
        if p.rejected.startswith("Final Answer:"):
            styles["correct, no reasoning" if p.rejected.endswith(f" {chosen.group(1)}")
                   else "wrong, no reasoning"] += 1
        else:
            styles["wrong, with reasoning"] += 1
    total = len(train) + len(evaluation)
    assert styles["wrong, with reasoning"] == total // 2
    assert styles["wrong, no reasoning"] == styles["correct, no reasoning"] == total // 4
