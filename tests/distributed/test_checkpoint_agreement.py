"""Where a run starts is decided once, by rank 0, and every rank follows (issue: per-rank
``find_latest`` on node-local scratch split a multi-node job into ranks resuming at different
steps). Two gloo processes, no model (the decisions tested here come before any load):

- a run without resume in a save directory holding another run's later checkpoint is refused on
  every rank, even on a rank whose own listing of the directory is empty;
- a save directory that is not the same directory on every rank (here: a different one per rank,
  as node-local scratch is) is refused on every rank, naming the ranks that cannot see it;
- a shared, empty save directory: both ranks start at step 0 with the same run id, and the probe
  file is gone afterwards.
One spawn."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed


def _manager(save_dir: Path, resume: str):
    import torch.distributed as dist

    from megatron_sega.checkpoint.manager import CheckpointManager

    config = SimpleNamespace(save_dir=str(save_dir), resume=resume, keep_last=2, load_optim=True)
    runtime = SimpleNamespace(rank=dist.get_rank(), world_size=dist.get_world_size(),
                              device="cpu")
    return CheckpointManager(config, "sft", chunks=[], optimizer=None, scheduler=None,
                             iterator=None, runtime=runtime, spec=None, tokenizer=None,
                             run_config={}, distributed_optimizer=False)


def _outcome(save_dir: Path, resume: str) -> dict:
    from megatron_sega.errors import CheckpointError

    manager = _manager(save_dir, resume)
    try:
        return {"start": manager.resume(), "run_id": manager.run_id}
    except CheckpointError as err:
        return {"error": str(err)}


def _cases(root: str) -> dict:
    import torch.distributed as dist

    from megatron_sega.checkpoint import manager as m
    from megatron_sega.checkpoint import retention
    from megatron_sega.checkpoint.names import COMPLETE_MARKER, TRAIN_STATE_FILE, step_dir_name

    rank, root = dist.get_rank(), Path(root)
    out = {}
    # 1. Another run's step 600 in the directory; this rank 1 lists nothing there.
    other = root / "other"
    if rank == 0:
        path = other / step_dir_name(600)
        path.mkdir(parents=True)
        (path / TRAIN_STATE_FILE).write_text(json.dumps({"stage": "sft", "step": 600,
                                                         "run_id": "another"}))
        (path / COMPLETE_MARKER).write_text("ok\n")
    else:
        m.find_latest = lambda *a, **k: None
        m.conflicting_checkpoints = retention.conflicting_checkpoints = lambda *a, **k: []
    dist.barrier()
    out["later"] = _outcome(other, "none")
    # 2. A save directory per rank (node-local scratch).
    out["local"] = _outcome(root / f"scratch_rank{rank}", "auto")
    # 3. A shared, empty directory.
    shared = root / "shared"
    out["shared"] = _outcome(shared, "auto")
    dist.barrier()
    out["shared_files"] = sorted(p.name for p in shared.iterdir())
    return out


def test_rank_zero_decides_and_every_rank_follows(tmp_path):
    results = run_distributed(_cases, 2, str(tmp_path), deadline=300)
    for rank, res in enumerate(results):
        later = res["later"].get("error", "")
        assert "checkpoint.save_dir" in later and "step_00000600" in later, (rank, res["later"])
        assert "checkpoint.resume=auto" in later and "new checkpoint.save_dir" in later
        local = res["local"].get("error", "")
        assert "not the same directory on every rank" in local and "rank(s) 1 " in local, \
            (rank, res["local"])
        assert res["shared"]["start"] == 0, (rank, res["shared"])
        assert res["shared_files"] == []  # the probe is removed
    assert results[0]["shared"]["run_id"] == results[1]["shared"]["run_id"]
    assert (tmp_path / "other" / "step_00000600" / "COMPLETE").is_file()  # nothing deleted
