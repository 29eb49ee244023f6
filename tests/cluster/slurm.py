"""Submitting examples/sega_llama3_8b.sh to the local SLURM and watching the job."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests.cluster import pipeline_run as pr

# The script asks for 2 nodes x 8 GPUs x 96 CPUs, exclusively: one CPU node of this machine.
SBATCH_OVERRIDES = ["--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={pr.NPROC}"]


class Job:
    def __init__(self, job_id: str, log: Optional[Path]):
        self.id, self.log = job_id, log

    def fields(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True,
                             text=True, timeout=60).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def state(self) -> tuple[str, int]:
        """(JobState, exit code of the batch script)."""
        f = self.fields()
        return f.get("JobState", "UNKNOWN"), int(f.get("ExitCode", "0:0").split(":")[0])

    def restarts(self) -> int:
        return int(self.fields().get("Restarts", "0"))

    def running(self) -> bool:
        return self.state()[0] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                   "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")

    def wait_done(self, timeout: float = 3 * pr.TIMEOUT) -> None:
        deadline = time.time() + timeout
        while self.running():
            if time.time() > deadline:
                subprocess.run(["scancel", self.id])
                raise AssertionError(f"job {self.id} did not finish:\n{pr.tail(self.log)}")
            time.sleep(0.5)

    def cancel_if_running(self) -> None:
        if self.running():
            subprocess.run(["scancel", self.id], timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.is_file() else ""


def run_job(inputs: dict, work: Path, log: Optional[Path], *extra: str,
            repo: Path = pr.REPO) -> Job:
    """sbatch the real SLURM launcher from the root of ``repo`` (this checkout, or a clone of it)
    on the tiny model. ``log`` None: no ``--output``, the script's own ``#SBATCH --output``
    (then ``Job.log`` is None: the test knows where that is)."""
    output = [] if log is None else [f"--output={log}"]
    out = subprocess.run(
        ["sbatch", "--parsable", *SBATCH_OVERRIDES, *output,
         "examples/sega_llama3_8b.sh", *pr.pipeline_args(inputs, work, *extra)],
        cwd=repo, env=pr.launcher_env(PYTHONPATH=str(repo)), capture_output=True, text=True,
        timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return Job(out.stdout.strip().split(";")[0], log)
