"""Temporary paths that another local user cannot take over: the wheel directory of
``tools/gpu_check.sh --wheels`` and the rendezvous store of a lone process."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Stands in for Python: `-m pip install ... --target DIR` writes down DIR and the mode of its
# parent (installing nothing); the next call (the script's first Python step) writes down
# PYTHONPATH and fails, ending the script.
_FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2 $3" = "-m pip install" ]; then
  while [ "$1" != "--target" ]; do shift; done
  echo "$2" > "$LOG/target"
  stat -c %a "$(dirname "$2")" > "$LOG/parent_mode"
  exit 0
fi
echo "$PYTHONPATH" > "$LOG/pythonpath"
exit 3
"""


def test_gpu_check_installs_wheels_into_a_private_directory_removed_on_exit(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "megatron_core-0.19.2-py3-none-any.whl").write_bytes(b"")
    log = tmp_path / "log"
    log.mkdir()
    env = dict(os.environ, PYTHON=str(fake), LOG=str(log))
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--wheels", str(wheels)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr  # stopped by the fake Python
    target = Path((log / "target").read_text().strip())
    assert target != Path("/tmp/site")
    # A directory made for this run that only its user can enter, first on PYTHONPATH...
    assert (log / "parent_mode").read_text().strip() == "700"
    assert (log / "pythonpath").read_text().split(":")[0] == str(target)
    # ...and removed when the script exits, even on an error.
    assert not target.parent.exists()


def test_a_lone_process_rendezvous_store_lies_in_a_private_directory(monkeypatch):
    """The store's file name is never a freed ``mkstemp`` name in the shared temp directory
    (which another user could create in between), but a name inside a fresh 0700 directory."""
    import torch.distributed as dist

    from megatron_sega.runtime import distributed

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, init_method, **kwargs: seen.update(url=init_method))
    distributed.init_distributed("cpu")
    assert seen["url"].startswith("file://")
    path = Path(seen["url"][len("file://"):])
    assert path.parent != Path(tempfile.gettempdir())
    assert path.parent.name.startswith("megatron_sega_store_")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.exists()  # created by the store itself, where no one else can
