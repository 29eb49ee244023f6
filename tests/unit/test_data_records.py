"""Reading and validating preference pairs: every bad-record kind, skip reports, file layouts."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from megatron_sega.data.errors import DataError
from megatron_sega.data.records import read_pairs

HINT = "every record needs non-empty 'prompt', 'chosen' and 'rejected' strings"
GOOD = {"prompt": "What is 1 + 1?", "chosen": "1 + 1 = 2. Final Answer: 2", "rejected": "3"}


def _write(path: Path, lines: list[str | bytes | dict]) -> Path:
    chunks = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        chunks.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def _expect_error(path: Path, message: str, reason: str) -> None:
    with pytest.raises(DataError) as info:
        read_pairs(path)
    assert str(info.value) == message
    assert info.value.reason == reason


def test_reads_valid_file_with_and_without_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", [GOOD, {**GOOD, "id": "abc"}, "", {**GOOD, "id": 7}])
    pairs, report = read_pairs(path)
    assert [p.id for p in pairs] == [f"{path}:1", "abc", "7"]
    assert pairs[0].prompt == GOOD["prompt"] and pairs[0].chosen == GOOD["chosen"]
    assert pairs[1].source == f"{path}:2"
    assert report.kept == 3 and report.total_dropped == 0 and report.files == [str(path)]


def test_generated_ids_are_deterministic(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [GOOD, GOOD])
    assert [p.id for p in read_pairs(path)[0]] == [p.id for p in read_pairs(path)[0]]


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode())
    pairs, _ = read_pairs(path)
    assert len(pairs) == 2


def test_malformed_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, '{"prompt": "a", "chosen": }'])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON (Expecting value at column 27)")) as info:
        read_pairs(path)
    assert info.value.reason == "malformed_json"


def test_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: expected a JSON object, got array")):
        read_pairs(path)


def test_missing_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, {"prompt": "p", "chosen": "c"}])
    _expect_error(path, f"{path}:3: field 'rejected' is missing; {HINT}", "missing_field")


def test_null_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{**GOOD, "prompt": None}])
    _expect_error(path, f"{path}:1: field 'prompt' is null; {HINT}", "missing_field")


@pytest.mark.parametrize("value", ["", "   \n"])
def test_empty_field(tmp_path: Path, value: str) -> None:
    path = _write(tmp_path / "data.jsonl", [GOOD] * 16 + [{**GOOD, "chosen": value}])
    _expect_error(path, f"{path}:17: field 'chosen' is empty; {HINT}", "empty_field")


def test_wrong_type(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{**GOOD, "rejected": 5}])
    _expect_error(path, f"{path}:1: field 'rejected' must be a string, got int; {HINT}", "wrong_type")


@pytest.mark.parametrize("bad_id, shown", [([1], "array"), (True, "boolean"), (1.5, "float")])
def test_wrong_id_type(tmp_path: Path, bad_id: object, shown: str) -> None:
    path = _write(tmp_path / "d.jsonl", [{**GOOD, "id": bad_id}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'id' must be a string or an integer, got {shown}")):
        read_pairs(path)


def test_duplicate_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{**GOOD, "id": "x"}, {**GOOD, "id": "y"}, {**GOOD, "id": "x"}])
    _expect_error(
        path,
        f"{path}:3: field 'id' duplicates id 'x' first seen at {path}:1; "
        "ids must be unique across all input files",
        "duplicate_id",
    )


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", [{**GOOD, "id": 1}])
    b = _write(tmp_path / "b.jsonl", [{**GOOD, "id": "1"}])
    with pytest.raises(DataError, match=re.escape(f"{b}:1: field 'id' duplicates id '1' first seen at {a}:1")):
        read_pairs([a, b])


def test_invalid_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD, b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}'])
    _expect_error(
        path, f"{path}:2: invalid UTF-8 at byte 16 of the line; re-save the file as UTF-8", "invalid_utf8"
    )


def test_skip_reports_every_dropped_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        [
            GOOD,
            "{not json",
            {**GOOD, "chosen": ""},
            {**GOOD, "rejected": ""},
            b"\xff\xfe",
            {"prompt": "p"},
            {**GOOD, "id": "a"},
            {**GOOD, "id": "a"},
            {**GOOD, "prompt": 3},
            "42",
            GOOD,
        ],
    )
    with caplog.at_level(logging.WARNING, logger="megatron_sega.data.records"):
        pairs, report = read_pairs(path, on_bad_record="skip")
    assert [p.id for p in pairs] == [f"{path}:1", "a", f"{path}:11"]
    assert report.kept == 3
    assert report.dropped == {
        "malformed_json": 1,
        "empty_field": 2,
        "invalid_utf8": 1,
        "missing_field": 1,
        "duplicate_id": 1,
        "wrong_type": 1,
        "not_an_object": 1,
    }
    assert report.total_dropped == 8 and len(report.messages) == 8
    per_record = [r for r in caplog.records if r.getMessage().startswith("skipping bad record")]
    assert len(per_record) == 8
    assert f"{path}:3: field 'chosen' is empty" in per_record[1].getMessage()
    assert "dropped 8" in report.summary()


def test_bad_option_and_missing_paths(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match="on_bad_record"):
        read_pairs(path, on_bad_record="ignore")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no such file or directory"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_pairs(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no data files given"):
        read_pairs([])


def test_directory_with_splits(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    (data / "data").mkdir(parents=True)
    _write(data / "data" / "train-00000-of-00002.jsonl", [{**GOOD, "id": "t0"}])
    _write(data / "data" / "train-00001-of-00002.jsonl", [{**GOOD, "id": "t1"}])
    _write(data / "data" / "test-00000-of-00001.jsonl", [{**GOOD, "id": "e0"}])
    assert [p.id for p in read_pairs(data, split="train")[0]] == ["t0", "t1"]
    assert [p.id for p in read_pairs(data, split="test")[0]] == ["e0"]
    assert len(read_pairs(data)[0]) == 3
    with pytest.raises(DataError, match="no .jsonl/.json/.parquet/.arrow data files found for split 'dev'"):
        read_pairs(data, split="dev")


def test_dataset_dict_layout(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    for split in ("train", "validation"):
        (root / split).mkdir(parents=True)
        _write(root / split / "data.jsonl", [{**GOOD, "id": split}])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    assert [p.id for p in read_pairs(root)[0]] == ["train"]
    assert [p.id for p in read_pairs(root, split="validation")[0]] == ["validation"]
    with pytest.raises(DataError, match=r"split 'test' not found; available splits: \['train', 'validation'\]"):
        read_pairs(root, split="test")


def test_pyarrow_missing_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(DataError, match=re.escape("needs pyarrow, which is not installed; install it with `pip install pyarrow`")):
        read_pairs(path)


# --------------------------------------------------------------------------------------------
# Columnar formats (need pyarrow; skipped without it)
# --------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> object:
    pa = pytest.importorskip("pyarrow")
    return pa.Table.from_pylist(rows)


def test_parquet(tmp_path: Path) -> None:
    table = _table([GOOD, {**GOOD, "chosen": ""}, {**GOOD, "prompt": None}])
    import pyarrow.parquet as pq

    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=re.escape(f"{path}:row 2: field 'chosen' is empty")):
        read_pairs(path)
    pairs, report = read_pairs(tmp_path, on_bad_record="skip", split="train")
    assert [p.id for p in pairs] == [f"{path}:row 1"]
    assert report.dropped == {"empty_field": 1, "missing_field": 1}


def test_parquet_missing_column_is_a_file_error(tmp_path: Path) -> None:
    table = _table([{"prompt": "p", "chosen": "c"}])
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=re.escape(f"{path}: column(s) ['rejected'] missing")):
        read_pairs(path, on_bad_record="skip")


def test_arrow_stream_saved_dataset_layout(tmp_path: Path) -> None:
    """`Dataset.save_to_disk` writes Arrow IPC streams listed in state.json."""
    table = _table([{**GOOD, "id": "s0", "extra": 1}, {**GOOD, "id": "s1", "extra": 2}])
    import pyarrow as pa

    root = tmp_path / "saved"
    root.mkdir()
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:  # type: ignore[attr-defined]
            writer.write_table(table)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "dataset_info.json").write_text("{}")
    assert [p.id for p in read_pairs(root)[0]] == ["s0", "s1"]


def test_arrow_file_format(tmp_path: Path) -> None:
    table = _table([GOOD])
    import pyarrow as pa

    path = tmp_path / "x.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:  # type: ignore[attr-defined]
            writer.write_table(table)
    assert [p.id for p in read_pairs(path)[0]] == [f"{path}:row 1"]
