"""Which checkpoints of a save directory exist, which belong to this run, and how a new one
replaces an old one: pure file-system logic, no torch, no process groups (the manager decides
on rank 0 and tells the others).

A *run* is a fresh start of a stage and every resume of it: the first save of a fresh start
records a new ``run_id`` in ``train_state.json``, and a run that resumes a checkpoint carries
that checkpoint's ``run_id`` on. The rules that follow from it:

- ``checkpoint.keep_last`` prunes only this run's own checkpoints; what another run wrote stays;
- a run never starts in a directory that holds a checkpoint at or after its starting step other
  than the one it resumes (its saves would collide with another run's, and ``latest`` would name
  the wrong one): :func:`conflicting_checkpoints`;
- ``latest`` is written only after the checkpoint it names is complete, and a reader that finds it
  naming a missing or incomplete directory falls back to the newest complete one
  (``checkpoint.mcore.resolve_checkpoint_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

from megatron_sega.checkpoint.names import (
    COMPLETE_MARKER, LATEST_FILE, STEP_GLOB, STEP_PREFIX, TMP_PREFIX, TRAIN_STATE_FILE,
)

OWNER_FILE = "OWNER"  # in a save in progress: the run_id of the run writing it
_REPLACED_PREFIX = ".replaced_"  # a complete checkpoint being replaced by a re-save of its step


class CheckpointWarning(RuntimeWarning):
    """A checkpoint was skipped (its own category: the CLI silences library UserWarnings)."""


def checkpoint_step(path: Path) -> int:
    """The step of a ``step_00000040`` directory (-1 for a name that is not one)."""
    try:
        return int(path.name.removeprefix(STEP_PREFIX))
    except ValueError:
        return -1


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(save_dir: Path) -> list[Path]:
    """The complete checkpoints of ``save_dir``, oldest step first."""
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.glob(STEP_GLOB) if p.is_dir() and is_complete(p)
             and checkpoint_step(p) >= 0]
    return sorted(found, key=checkpoint_step)


def find_latest(save_dir: str | Path, warn: bool = True) -> Optional[Path]:
    """The newest complete checkpoint in ``save_dir``, skipping incomplete ones with a warning
    that names them."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob(STEP_GLOB) if p.is_dir()), reverse=True)
    for path in candidates:
        if is_complete(path):
            return path
        if warn:
            warnings.warn(f"checkpoint {path} has no {COMPLETE_MARKER} marker (interrupted save?); "
                          "skipping it in favour of an older one", CheckpointWarning, stacklevel=2)
    return None


def run_id_of(path: Path) -> Optional[str]:
    """The ``run_id`` recorded in a checkpoint (None: unreadable, or written before run ids)."""
    try:
        value = json.loads((path / TRAIN_STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def conflicting_checkpoints(save_dir: Path, start: int, resumed: Optional[Path]) -> list[Path]:
    """The complete checkpoints of ``save_dir`` that a run starting at step ``start`` (from
    ``resumed``, or from scratch) would collide with: any at step >= ``start`` but ``resumed``."""
    here = resumed.resolve() if resumed is not None else None
    return [p for p in complete_checkpoints(save_dir)
            if checkpoint_step(p) >= start and p.resolve() != here]


def point_latest(save_dir: Path, checkpoint: Path) -> None:
    """Make ``latest`` name ``checkpoint`` (atomically: a crash leaves the old or the new name)."""
    pointer = save_dir / f".{LATEST_FILE}.tmp"
    write_synced(pointer, checkpoint.name + "\n")
    os.replace(pointer, save_dir / LATEST_FILE)


def publish(tmp: Path, final: Path) -> None:
    """Move the complete save ``tmp`` to ``final`` and point ``latest`` at it. A re-save of a step
    first moves the old checkpoint aside, so that at every instant ``final`` is either the old or
    the new complete checkpoint (``latest`` never names a deleted directory)."""
    replaced = final.with_name(_REPLACED_PREFIX + final.name)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    point_latest(final.parent, final)
    shutil.rmtree(replaced, ignore_errors=True)


def mark_owner(tmp: Path, run_id: str) -> None:
    (tmp / OWNER_FILE).write_text(run_id + "\n")


def prune(save_dir: Path, run_id: str, keep: int, current: Path) -> list[Path]:
    """Delete this run's complete checkpoints beyond the newest ``keep`` (never ``current``),
    and this run's leftovers of killed saves. Returns what was deleted."""
    own = [p for p in complete_checkpoints(save_dir) if run_id_of(p) == run_id]
    doomed = [p for p in own[:-max(keep, 1)] if p != current]
    for path in save_dir.glob(TMP_PREFIX + STEP_GLOB):
        owner = path / OWNER_FILE
        if (path.name != TMP_PREFIX + current.name and owner.is_file()
                and owner.read_text().strip() == run_id):
            doomed.append(path)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def write_synced(path: Path, text: str) -> None:
    """Write a small file and fsync it, so a marker never survives a crash that its data did not."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
