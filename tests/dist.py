"""Run a function in N gloo processes (the distributed tests' only launcher).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` fresh interpreters, rendezvous
through a file store in a temporary directory (no guessed port), calls ``fn(*args)`` in each with
RANK/WORLD_SIZE/LOCAL_RANK set and torch.distributed initialised, and returns the per-rank results
(anything ``torch.save`` can write and ``torch.load(weights_only=True)`` can read: tensors, numbers,
strings, lists, dicts). A failure in any rank raises with that rank's traceback.

Spawning costs a few seconds (importing megatron.core): group many checks into one call.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp

INIT_FILE_ENV = "MEGATRON_SEGA_TEST_INIT_FILE"


def init_method() -> str:
    """The file-store rendezvous of the current test process group."""
    return "file://" + os.environ[INIT_FILE_ENV]


def _child(rank: int, world_size: int, workdir: str, module: str, name: str, args: tuple,
           sys_path: list[str]) -> None:
    sys.path[:] = sys_path
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      **{INIT_FILE_ENV: os.path.join(workdir, "store")})
    os.environ.pop("MASTER_ADDR", None)
    torch.set_num_threads(1)
    out = Path(workdir) / f"result_{rank}.pt"
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init_method(), rank=rank,
                                world_size=world_size)
        fn = getattr(importlib.import_module(module), name)
        result = fn(*args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # report every failure, including SystemExit, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        from megatron_sega.runtime import teardown

        teardown()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600,
                    deadline: Optional[float] = None) -> list:
    """Call ``fn(*args)`` in ``world_size`` gloo processes; return the results by rank.

    With ``deadline`` (seconds), ranks still running after it are killed and the call fails
    (a test that must prove the ranks do not hang)."""
    with tempfile.TemporaryDirectory(prefix="msega_dist_") as workdir:
        context = mp.start_processes(
            _child,
            args=(world_size, workdir, fn.__module__, fn.__name__, args, list(sys.path)),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        errors = []
        start = time.time()
        try:
            while not context.join(timeout=5 if deadline else timeout):
                if deadline and time.time() - start > deadline:
                    for process in context.processes:
                        process.kill()
                    raise AssertionError(f"the ranks were still running after {deadline:.0f} s "
                                         "(a hang?); killed")
        except Exception as exc:  # a rank died: collect every rank's story below
            errors.append(str(exc))
        results = []
        for rank in range(world_size):
            path = Path(workdir) / f"result_{rank}.pt"
            if not path.exists():
                errors.append(f"rank {rank} wrote no result")
                continue
            payload = torch.load(path, weights_only=True)
            if not payload["ok"]:
                errors.append(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload.get("result"))
        if errors:
            raise AssertionError("\n".join(errors))
        return results
