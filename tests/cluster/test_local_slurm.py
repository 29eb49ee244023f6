"""``scripts/local_slurm.sh stop`` signals only the daemons it started (issue 25, item 11).

No SLURM needed: the script runs with ``LOCAL_SLURM_DIR`` set to a temporary directory, whose pid
files point at processes of this test. Stand-ins for the daemons are copies of ``sleep`` named
``slurmd``, ``slurmctld`` and ``munged`` (a process's name is its executable's). Asserted: a
pid file pointing at an unrelated ``sleep``, or at a daemon-named process younger than the pid
file (a reused pid), or at a ``munged`` not started with the script's pid file (the system's),
leaves that process running; the system's ``/run/munge/munged.pid`` is not read (checked by
planting one, only where none exists); a stand-in that did write its pid file is stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.cluster import pipeline_run as pr

SYSTEM_MUNGED_PID = Path("/run/munge/munged.pid")


def _start(executable: Path | str, pid_file: Path | None = None) -> int:
    """``executable 300`` (a ``sleep``), detached as a daemon is (not this process's child, which
    would linger as a zombie once killed); with ``pid_file``, its pid written there after it
    started, as a daemon writes its own. Returns the pid."""
    out = subprocess.run(["bash", "-c", f"'{executable}' 300 >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True, timeout=10)
    pid = int(out.stdout)
    if pid_file is not None:
        pid_file.write_text(f"{pid}\n")
    return pid


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _stop(directory: Path) -> str:
    result = subprocess.run(["bash", str(pr.REPO / "scripts/local_slurm.sh"), "stop"],
                            env={**os.environ, "LOCAL_SLURM_DIR": str(directory)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_stop_kills_only_the_daemons_it_started(tmp_path):
    state, bin_dir = tmp_path / "state", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    for name in ("slurmd", "slurmctld", "munged"):
        shutil.copy(shutil.which("sleep"), bin_dir / name)
    bystander = _start(shutil.which("sleep"))
    plant_system = os.geteuid() == 0 and not SYSTEM_MUNGED_PID.exists()
    pids = [bystander]
    try:
        for name in ("slurmd", "slurmctld", "munged"):  # stale pid files: an unrelated process
            (state / f"{name}.pid").write_text(f"{bystander}\n")
        if plant_system:
            SYSTEM_MUNGED_PID.parent.mkdir(parents=True, exist_ok=True)
            SYSTEM_MUNGED_PID.write_text(f"{bystander}\n")
        _stop(state)
        assert _alive(bystander), "stop killed a process that is no daemon of the script"

        # A munged that the script did not start (no --pid-file of its own), and a slurmctld
        # younger than its pid file (the pid was reused): left running. A slurmd that wrote its
        # pid file: stopped.
        munged = _start(bin_dir / "munged", state / "munged.pid")
        reused = _start(bin_dir / "slurmctld", state / "slurmctld.pid")
        hour_ago = time.time() - 3600
        os.utime(state / "slurmctld.pid", (hour_ago, hour_ago))
        slurmd = _start(bin_dir / "slurmd", state / "slurmd.pid")
        pids += [munged, reused, slurmd]
        assert "local_slurm: stopped" in _stop(state)
        assert _gone(slurmd), "stop left the slurmd it started running"
        assert _alive(munged) and _alive(reused) and _alive(bystander)
    finally:
        if plant_system:
            SYSTEM_MUNGED_PID.unlink(missing_ok=True)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
