"""Retention rules of a save directory (megatron_sega.checkpoint.retention), on directories laid
out as the manager writes them, without a training run: what keep_last may delete (this run's
own checkpoints only), which existing checkpoints a starting run collides with, re-saving a step
without a window where ``latest`` dangles, and readers that never follow ``latest`` to a missing
or incomplete checkpoint. The collective parts (rank 0 decides) are in
tests/distributed/test_checkpoint_agreement.py; the CLI runs in tests/e2e/test_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sega.checkpoint import retention as r
from megatron_sega.checkpoint.mcore import resolve_checkpoint_dir
from megatron_sega.checkpoint.names import (
    COMPLETE_MARKER, LATEST_FILE, MODEL_OPTIM_DIR, TRAIN_STATE_FILE, step_dir_name,
)
from megatron_sega.errors import CheckpointError


def _ckpt(root: Path, step: int, run_id: str | None, complete: bool = True) -> Path:
    path = root / step_dir_name(step)
    (path / MODEL_OPTIM_DIR).mkdir(parents=True)
    state = {"stage": "sft", "step": step, **({"run_id": run_id} if run_id else {})}
    (path / TRAIN_STATE_FILE).write_text(json.dumps(state))
    if complete:
        (path / COMPLETE_MARKER).write_text("ok\n")
    return path


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_prune_deletes_only_this_runs_own_checkpoints_and_leftovers(tmp_path):
    # Another run's (newer and older) and a checkpoint written before run ids: never ours.
    _ckpt(tmp_path, 550, "other")
    _ckpt(tmp_path, 600, "other")
    _ckpt(tmp_path, 5, None)
    mine = [_ckpt(tmp_path, s, "mine") for s in (10, 20, 30)]
    ours_tmp, theirs_tmp = tmp_path / ".tmp_step_00000040", tmp_path / ".tmp_step_00000045"
    for path, owner in ((ours_tmp, "mine"), (theirs_tmp, "other")):
        path.mkdir()
        r.mark_owner(path, owner)
    deleted = r.prune(tmp_path, "mine", keep=2, current=mine[-1])
    assert sorted(p.name for p in deleted) == [ours_tmp.name, mine[0].name]
    assert _names(tmp_path) == sorted([theirs_tmp.name, *(step_dir_name(s) for s in
                                                          (5, 20, 30, 550, 600))])


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    # Not reachable through the manager (a start below an existing checkpoint is refused),
    # but the guard holds: the newest by step stays, and so does the one just written.
    newest = _ckpt(tmp_path, 30, "mine")
    current = _ckpt(tmp_path, 12, "mine")
    assert r.prune(tmp_path, "mine", keep=1, current=current) == []
    assert current.is_dir() and newest.is_dir()


def test_conflicting_checkpoints_at_or_after_the_start(tmp_path):
    _ckpt(tmp_path, 550, "a")
    latest = _ckpt(tmp_path, 600, "a")
    _ckpt(tmp_path, 700, "a", complete=False)  # a killed save: never a checkpoint
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(r.conflicting_checkpoints(tmp_path, 0, None)) == [step_dir_name(550),
                                                                   step_dir_name(600)]
    assert r.conflicting_checkpoints(tmp_path, 600, latest) == []  # resume: auto
    older = tmp_path / step_dir_name(550)
    assert names(r.conflicting_checkpoints(tmp_path, 550, older)) == [step_dir_name(600)]
    assert r.conflicting_checkpoints(tmp_path / "missing", 0, None) == []


def test_publish_replaces_a_step_without_a_dangling_latest(tmp_path):
    old = _ckpt(tmp_path, 8, "a")
    (old / "old_only").write_text("x")
    r.point_latest(tmp_path, old)
    tmp = tmp_path / ".tmp_step_00000008"
    tmp.mkdir()
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    r.publish(tmp, old)
    assert not tmp.exists() and not (old / "old_only").exists() and r.is_complete(old)
    assert (tmp_path / LATEST_FILE).read_text().strip() == old.name
    assert _names(tmp_path) == [LATEST_FILE, old.name]  # no leftovers


@pytest.mark.parametrize("named", ["deleted", "incomplete"])
def test_latest_is_never_followed_to_a_missing_or_incomplete_checkpoint(tmp_path, named):
    good = _ckpt(tmp_path, 4, "a")
    if named == "incomplete":
        _ckpt(tmp_path, 8, "a", complete=False)
    (tmp_path / LATEST_FILE).write_text(step_dir_name(8) + "\n")
    assert resolve_checkpoint_dir(tmp_path) == good / MODEL_OPTIM_DIR


def test_latest_with_no_complete_checkpoint_is_a_clear_error(tmp_path):
    _ckpt(tmp_path, 8, "a", complete=False)
    (tmp_path / LATEST_FILE).write_text(step_dir_name(8) + "\n")
    with pytest.raises(CheckpointError, match="missing or incomplete.*COMPLETE"):
        resolve_checkpoint_dir(tmp_path)


def test_run_id_of_reads_the_train_state(tmp_path):
    assert r.run_id_of(_ckpt(tmp_path, 1, "abc")) == "abc"
    assert r.run_id_of(_ckpt(tmp_path, 2, None)) is None
    assert r.run_id_of(tmp_path / "missing") is None
