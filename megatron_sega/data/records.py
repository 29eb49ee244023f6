"""Read and validate preference pairs ``{"prompt", "chosen", "rejected", optional "id",
optional "subset", optional "answer"}``, in any of the record layouts of
:mod:`megatron_sega.data.formats` (detected per file, or forced with ``ReadOptions.format``).

Sources:
- a JSON Lines file (``.jsonl`` or ``.json`` holding one object per line), always supported;
- a Parquet file or an Arrow IPC file (stream or file format, as written by Hugging Face
  ``datasets``), which need ``pyarrow``;
- a directory in a Hugging Face ``datasets`` layout: the output of ``Dataset.save_to_disk``
  (``state.json`` + ``*.arrow``), of ``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one
  folder per split), or a hub-style folder of ``*.parquet`` / ``*.arrow`` / ``*.jsonl`` files
  (``split`` selects files named ``<split>-*``/``<split>_*``/``<split>.*`` or under a folder
  named ``<split>``).

Every bad record is reported with its file, its 1-based line (JSONL) or row (Parquet/Arrow) and
the offending field. With ``on_bad_record="error"`` the first one raises ``DataError``; with
``"skip"`` each is logged as a warning and counted per reason in the returned ``ReadReport``,
so that dropping data is never silent. Blank lines in JSONL are not records and are ignored.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_sega.data.errors import DataError
from megatron_sega.data.formats import (
    FIX_HINT, BadRecord, BadRecordReason, Preference, Prompt, ReadOptions, describe,
    detect_format, parse_record, rename_columns, required_columns, type_name,
)

logger = logging.getLogger(__name__)

OnBadRecord = Literal["error", "skip"]

_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")  # .gz: as hh-rlhf ships


def _kind(path: Path) -> str | None:
    """``jsonl``, ``parquet``, ``arrow``, or None for a file type we do not read."""
    if path.name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    return {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """One validated preference pair.

    ``id`` is the record's own id (as a string) or, when it has none, ``"<file>:<line>"``, which
    is deterministic for a given input path. ``source`` is where the record came from, for
    messages. ``prompt`` is a string (one user turn) or a conversation ending with the user's
    turn; ``chosen`` and ``rejected`` are the final assistant turns. ``subset`` is the record's
    ``subset`` column (e.g. RewardBench's), kept for per-subset evaluation. ``answer`` is the
    record's reference final answer (an ``answer`` column, a string or a number), for answer
    accuracy (``eval.answer_samples``).
    """

    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    source: str
    subset: str | None = None
    answer: str | None = None


@dataclass
class ReadReport:
    """What ``read_pairs`` kept and dropped; ``dropped`` maps a ``BadRecordReason`` value to a count."""

    files: list[str] = field(default_factory=list)
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # file -> the format it was read in

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def format_line(self) -> str:
        """The format each file was read in, on one line."""
        by_format: dict[str, list[str]] = {}
        for file, fmt in self.formats.items():
            by_format.setdefault(fmt, []).append(file)
        return "; ".join(f"{describe(fmt)}: {', '.join(files)}"
                         for fmt, files in by_format.items())

    def summary(self) -> str:
        """One line for the training log, e.g. ``kept 798 pairs, dropped 2 (empty_field: 2)``."""
        if not self.dropped:
            return f"kept {self.kept} pairs from {len(self.files)} file(s), dropped 0"
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items()))
        return (
            f"kept {self.kept} pairs from {len(self.files)} file(s), "
            f"dropped {self.total_dropped} ({parts})"
        )


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def read_pairs(
    paths: str | Path | Sequence[str | Path],
    *,
    on_bad_record: OnBadRecord = "error",
    split: str | None = None,
    options: ReadOptions | None = None,
) -> tuple[list[PreferencePair], ReadReport]:
    """Read and validate preference pairs from one or more files or dataset directories.

    ``options`` says how the records are laid out (default: detected per file, no renaming,
    PKU-SafeRLHF's ``better_response_id``). Ids must be unique across all inputs (a duplicate
    is a bad record, reported at its second occurrence). Returns the pairs in file order and a
    report of what was dropped and of the format each file was read in.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    options = options or ReadOptions()
    inputs = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not inputs:
        raise DataError("no data files given; pass at least one JSONL/Parquet/Arrow file or directory")
    files: list[Path] = []
    for p in inputs:
        files.extend(resolve_data_files(Path(p), split))

    report = ReadReport(files=[str(f) for f in files])
    pairs: list[PreferencePair] = []
    first_seen: dict[str, str] = {}
    for path in files:
        for location, row in _iter_records(path, options, report):
            try:
                if isinstance(row, BadRecord):
                    raise row
                fmt = report.formats.get(str(path), "standard")  # set by the first object
                pair = validate_record(row, location, fmt, options.preference)
                if pair.id in first_seen:
                    raise BadRecord(
                        BadRecordReason.DUPLICATE_ID,
                        f"{location}: field 'id' duplicates id {pair.id!r} first seen at "
                        f"{first_seen[pair.id]}; ids must be unique across all input files",
                    )
            except BadRecord as bad:
                if on_bad_record == "error":
                    raise DataError(bad.message, reason=bad.reason.value) from None
                _record_skip(report, bad)
                continue
            first_seen[pair.id] = location
            pairs.append(pair)
    report.kept = len(pairs)
    if report.dropped:
        logger.warning("data: %s", report.summary())
    return pairs, report


def detect_formats(path: str | Path, split: str | None = None,
                   options: ReadOptions | None = None) -> str:
    """One line naming the format each file behind ``path`` is read in (``data.format`` or
    detected from its first record), e.g. ``implicit (...): d/train.parquet, d/extra.jsonl``;
    reads no further than each file's first record."""
    options = options or ReadOptions()
    report = ReadReport()
    for file in resolve_data_files(Path(path), split):
        records = _iter_records(file, options, report)
        try:
            next(records, None)
        finally:
            records.close()
    return report.format_line()


def _iter_records(path: Path, options: ReadOptions,
                  report: ReadReport) -> Iterator[tuple[str, Any]]:
    """The rows of one file under our column names, after fixing the file's format (in
    ``report.formats``) from its first object; a table missing a column that format needs is a
    file error, not one bad record per row."""
    for location, row in _iter_rows(path):
        if isinstance(row, dict):
            row = rename_columns(row, options.columns)
            if str(path) not in report.formats:
                fmt = detect_format(row) if options.format == "auto" else options.format
                report.formats[str(path)] = fmt
                if _kind(path) != "jsonl":
                    _check_columns(path, list(row), fmt, options)
        yield location, row


def _check_columns(path: Path, names: list[str], fmt: str, options: ReadOptions) -> None:
    missing = [c for c in required_columns(fmt, options.preference) if c not in names]
    if missing:
        renamed = f"; data.columns renames {dict(options.columns)}" if options.columns else ""
        raise DataError(
            f"{path}: column(s) {missing} missing for format {fmt} (found {names}{renamed}); "
            f"{FIX_HINT}, or name the columns with data.columns"
        )


def _record_skip(report: ReadReport, bad: BadRecord) -> None:
    key = bad.reason.value
    report.dropped[key] = report.dropped.get(key, 0) + 1
    report.messages.append(bad.message)
    logger.warning("skipping bad record: %s", bad.message)


# --------------------------------------------------------------------------------------------
# Validation of one record
# --------------------------------------------------------------------------------------------


def validate_record(row: Any, location: str, fmt: str = "standard",
                    preference: Preference = "better") -> PreferencePair:
    """Turn one decoded row (under our column names) into a ``PreferencePair`` or raise
    ``BadRecord`` naming the field."""
    if not isinstance(row, dict):
        raise BadRecord(
            BadRecordReason.NOT_AN_OBJECT,
            f"{location}: expected a JSON object, got {type_name(row)}; "
            f"each line must be one object like "
            '{"prompt": "...", "chosen": "...", "rejected": "..."}',
        )
    triple = parse_record(row, fmt, location, preference)
    return PreferencePair(id=_record_id(row, location), prompt=triple.prompt,
                          chosen=triple.chosen, rejected=triple.rejected, source=location,
                          subset=_subset(row, location), answer=_answer(row, location))


def _subset(row: dict[str, Any], location: str) -> str | None:
    raw = row.get("subset")
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise BadRecord(BadRecordReason.WRONG_TYPE,
                        f"{location}: field 'subset' must be a string, got {type_name(raw)}")
    return raw


def _answer(row: dict[str, Any], location: str) -> str | None:
    raw = row.get("answer")
    if raw is None or raw == "":
        return None
    # bool is an int subclass; a true/false answer is written as a string.
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise BadRecord(BadRecordReason.WRONG_TYPE,
                        f"{location}: field 'answer' must be a string or a number, got "
                        f"{type_name(raw)}")
    return str(raw)


def _record_id(row: dict[str, Any], location: str) -> str:
    raw = row.get("id")
    if raw is None:
        return location
    # bool is an int subclass, but True/False as ids are almost surely a data bug.
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise BadRecord(
            BadRecordReason.WRONG_TYPE,
            f"{location}: field 'id' must be a string or an integer, got {type_name(raw)}; "
            "omit 'id' to get the generated id '<file>:<line>'",
        )
    text = str(raw)
    if not text.strip():
        raise BadRecord(
            BadRecordReason.EMPTY_FIELD,
            f"{location}: field 'id' is empty; omit 'id' to get the generated id '<file>:<line>'",
        )
    return text


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------


def resolve_data_files(path: Path, split: str | None = None) -> list[Path]:
    """Expand a file or a ``datasets``-style directory into the ordered list of data files."""
    if path.is_file():
        _check_suffix(path)
        return [path]
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if (path / "dataset_dict.json").is_file():
        return _resolve_dataset_dict(path, split)
    if (path / "state.json").is_file():
        return _resolve_saved_dataset(path)
    candidates = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and _is_data_file(p)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if split is not None:
        candidates = [p for p in candidates if _matches_split(p.relative_to(path), split)]
    if not candidates:
        wanted = f" for split '{split}'" if split else ""
        raise DataError(
            f"{path}: no .jsonl/.json/.parquet/.arrow data files found{wanted}; "
            "point to a data file or a Hugging Face datasets directory"
        )
    return candidates


def require_pairs(path: str | Path, pairs: Sequence[PreferencePair], report: ReadReport) -> None:
    """A ``DataError`` naming ``path`` when reading it left no pair to use: an empty file, or a
    file whose every record was bad (skipped under ``data.on_bad_record = skip``)."""
    if pairs:
        return
    if report.total_dropped:
        raise DataError(f"{path}: every record is bad ({report.summary()}); fix the records "
                        "(data.on_bad_record=error names the first bad one)")
    raise DataError(f"{path}: holds no records (an empty file); point it at a file of "
                    "prompt/chosen/rejected records")


def has_records(path: str | Path, split: str | None = None) -> bool:
    """Whether the data behind ``path`` (as ``read_pairs`` resolves it) holds at least one
    record, valid or not; blank lines are not records. Reads no further than the first one."""
    for file in resolve_data_files(Path(path), split):
        rows = _iter_rows(file)
        try:
            if next(rows, None) is not None:
                return True
        finally:
            rows.close()
    return False


def _resolve_dataset_dict(path: Path, split: str | None) -> list[Path]:
    split = split or "train"
    sub = path / split
    if not sub.is_dir():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text("utf-8")).get("splits", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(f"{path}: split '{split}' not found; available splits: {splits}")
    return resolve_data_files(sub, None)


def _resolve_saved_dataset(path: Path) -> list[Path]:
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text("utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"{state_file}: not a valid datasets state.json ({e}); "
            "re-save the dataset with Dataset.save_to_disk"
        ) from None
    files = [path / name for name in names]
    for f in files:
        if not f.is_file():
            raise DataError(f"{state_file}: lists data file '{f.name}', which does not exist")
    return files


def _is_data_file(p: Path) -> bool:
    return _kind(p) is not None and p.name not in (
        "state.json",
        "dataset_info.json",
        "dataset_dict.json",
    )


def _check_suffix(path: Path) -> None:
    if _kind(path) is None:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix}'; "
            "use .jsonl (or .json with one object per line, either gzipped), .parquet or .arrow"
        )


def _matches_split(rel: Path, split: str) -> bool:
    if split in rel.parts[:-1]:
        return True
    name = rel.name
    return any(name.startswith(split + sep) for sep in ("-", "_", "."))


# --------------------------------------------------------------------------------------------
# Row sources: each yields (location, decoded row or BadRecord)
# --------------------------------------------------------------------------------------------


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    kind = _kind(path)
    if kind == "jsonl":
        yield from _iter_jsonl(path)
    elif kind == "parquet":
        yield from _iter_parquet(path)
    elif kind == "arrow":
        yield from _iter_arrow(path)
    else:
        _check_suffix(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    opened: Any = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    with opened as f:
        for lineno, raw in enumerate(f, start=1):
            location = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark written by some editors
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield location, BadRecord(
                    BadRecordReason.INVALID_UTF8,
                    f"{location}: invalid UTF-8 at byte {e.start + 1} of the line; "
                    "re-save the file as UTF-8",
                )
                continue
            if not text.strip():
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as e:
                yield location, BadRecord(
                    BadRecordReason.MALFORMED_JSON,
                    f"{location}: malformed JSON ({e.msg} at column {e.colno}); "
                    "each line must be one complete JSON object",
                )


def _require_pyarrow(path: Path) -> Any:
    try:
        import pyarrow  # noqa: F401  (imported for its submodules)
    except ImportError:
        raise DataError(
            f"{path}: reading {path.suffix} files needs pyarrow, which is not installed; "
            "install it with `pip install pyarrow`, or convert the data to JSONL"
        ) from None
    import pyarrow as pa

    return pa


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    _require_pyarrow(path)
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    yield from _iter_batches(path, pfile.iter_batches())


def _iter_arrow(path: Path) -> Iterator[tuple[str, Any]]:
    pa = _require_pyarrow(path)
    import pyarrow.ipc as ipc

    # `datasets` writes the IPC *stream* format; other tools write the IPC *file* format.
    with pa.memory_map(str(path), "r") as source:
        try:
            reader: Any = ipc.open_stream(source)
            batches: Any = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise DataError(f"{path}: not a readable Arrow IPC file ({e})") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from _iter_batches(path, batches)


def _iter_batches(path: Path, batches: Any) -> Iterator[tuple[str, Any]]:
    row_number = 0
    for batch in batches:
        for row in batch.to_pylist():
            row_number += 1
            yield f"{path}:row {row_number}", row
