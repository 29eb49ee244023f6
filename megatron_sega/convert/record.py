"""The record a conversion leaves in its output, which makes a rerun of it a no-op.

The converters write into a hidden sibling and rename it into place (``hf_mcore._output_dir``),
so an output directory that exists is whole. A job killed after that rename but before its
launcher marked the stage done runs the same command again; conversion never overwrites, so
without a record that rerun would refuse its own finished work and fail the pipeline.

The record (``conversion.json``, written last, before the rename) holds the command, the source
directory, the size and mtime of each of its files and the options that shape the output. A rerun
that would write the same record finds the conversion done and does nothing; any other non-empty
output directory (another source, a source changed since, other options, no record) stays the
error it always was. Sizes and mtimes, not hashes: hashing the 16 GB of an 8B checkpoint would
cost minutes on every rerun, and a source rewritten with the same sizes within one mtime tick is
not something a rerun meets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from megatron_sega.errors import ConversionError

RECORD_FILE = "conversion.json"
RECORD_VERSION = 1


def source_files(directory: Path, skip: Iterable[Path] = ()) -> list[list]:
    """``[relative path, size, mtime_ns]`` of every file under ``directory``, sorted, except
    those under ``skip`` (an output written inside its own source)."""
    root = Path(directory).resolve()
    skipped = [Path(s).resolve() for s in skip]
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(path.is_relative_to(s) for s in skipped):
            stat = path.stat()
            files.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return files


def conversion_record(command: str, source: str | Path, outputs: Iterable[Path],
                      **options: Any) -> dict:
    """What converting ``source`` with ``command`` and ``options`` (JSON values) into
    ``outputs`` (the output directory and its partial sibling) records."""
    source = Path(source).resolve()
    return {"version": RECORD_VERSION, "command": command, "source": str(source),
            "source_files": source_files(source, outputs), "options": options}


def write_record(directory: Path, record: dict) -> None:
    (Path(directory) / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n",
                                               encoding="utf-8")


def _read_record(directory: Path) -> Optional[dict]:
    try:
        record = json.loads((directory / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _differences(found: dict, wanted: dict) -> list[str]:
    """How an earlier conversion's record differs from this one's, in words."""
    out = [f"{key} {found.get(key)!r}, now {wanted[key]!r}"
           for key in ("version", "command", "source") if found.get(key) != wanted[key]]
    had, has = found.get("options", {}), wanted["options"]
    out += [f"{key} {had.get(key)!r}, now {has.get(key)!r}"
            for key in sorted(set(had) | set(has)) if had.get(key) != has.get(key)]
    if not out and found.get("source_files") != wanted["source_files"]:
        before = {f[0]: f[1:] for f in found.get("source_files", [])}
        now = {f[0]: f[1:] for f in wanted["source_files"]}
        changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
        out.append(f"source files changed since: {', '.join(changed[:3])}"
                   + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
    return out


def already_converted(out_dir: str | Path, record: dict) -> bool:
    """True when ``out_dir`` holds this very conversion (nothing to do); False when it is free
    (absent or an empty directory). Anything else raises :class:`ConversionError`."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    found = _read_record(out_dir) if out_dir.is_dir() else None
    if found is None:
        raise ConversionError(f"{out_dir}: output directory exists and is not empty (and holds "
                              f"no {RECORD_FILE}); choose a new directory (conversion never "
                              "overwrites)")
    differences = _differences(found, record)
    if differences:
        raise ConversionError(f"{out_dir}: holds another conversion ({'; '.join(differences)});"
                              " choose a new directory or remove it (conversion never "
                              "overwrites)")
    return True
