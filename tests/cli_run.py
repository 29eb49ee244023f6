"""Run the ``megatron-sega`` CLI in real processes from tests (one process or a torchrun group),
with its output in ``workdir/<name>.log``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one CLI process (tens of seconds of work; slack for a loaded machine)
# A worker that aborts at exit after its work is done ("terminate called without an active
# exception", SIGABRT): the C++ runtime's message, the shell's, torchrun's for SIGABRT. Checked
# in every run that succeeds.
ABORT = re.compile(r"terminate called|Aborted|core dumped|exitcode\s*:\s*-6|Signal 6")


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


class Run:
    """``megatron-sega COMMAND --config CONFIG ARGS...`` started now, in its own session."""

    def __init__(self, name: str, workdir: Path, command: str, config: Path, *args: str,
                 nproc: int = 1):
        self.name, self.log = name, workdir / f"{name}.log"
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable])
        cmd = [*launcher, "-m", "megatron_sega.cli", command, "--config", str(config), *args]
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, expect: int | None = 0) -> str:
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.name} timed out:\n{self.output()[-3000:]}")
        self._out.close()
        if expect is not None and rc != expect:
            pytest.fail(f"{self.name} exited with {rc}, expected {expect}:\n"
                        f"{self.output()[-4000:]}")
        self.rc = rc
        output = self.output()
        abort = ABORT.search(output) if rc == 0 else None
        if abort:
            pytest.fail(f"{self.name}: a process aborted ({abort.group(0)!r}):\n{output[-3000:]}")
        return output

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_when(self, ready, what: str) -> None:
        """SIGKILL the process (group) as soon as ``ready()``; fail if it ends first."""
        deadline = time.time() + TIMEOUT
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} ended (rc {self.proc.returncode}) before {what}:\n"
                            f"{self.output()[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                pytest.fail(f"{self.name}: timed out waiting for {what}")
            time.sleep(0.01)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait(expect=None)
