"""Fixtures of the cluster tests: the tiny inputs, a real one-node SLURM (started through
scripts/local_slurm.sh, stopped again if this session started it) and the uninterrupted
reference run that the stopped-and-resumed runs must reproduce bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cluster import pipeline_run as pr
from tests.cluster.slurm import run_job


def _slurm_impossible() -> str | None:
    """Why a local SLURM cannot be had here, or None."""
    have = all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged"))
    if os.geteuid() != 0:
        return ("a local SLURM needs root (scripts/local_slurm.sh installs slurm-wlm/munge and "
                "starts slurmctld/slurmd as root); this is uid %d" % os.geteuid())
    if not have and not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get to install them"
    return None


@pytest.fixture(scope="session")
def slurm():
    """A running one-node SLURM; skips only where one cannot be started."""
    reason = _slurm_impossible()
    if reason:
        pytest.skip(reason)
    script = pr.REPO / "scripts/local_slurm.sh"
    was_up = subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"scripts/local_slurm.sh failed:\n{result.stdout}{result.stderr}"
    yield
    if not was_up:
        subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return pr.make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="session")
def reference(request, tmp_path_factory, inputs) -> tuple[Path, str]:
    """The whole pipeline, never interrupted, the DPO baseline included: an sbatch job of
    examples/sega_llama3_8b.sh when a SLURM can run here, else the single-node launcher (same
    stages, world size and config)."""
    root = tmp_path_factory.mktemp("reference")
    work = root / "work"
    stages = ("--stages", pr.ALL_STAGES)
    try:
        request.getfixturevalue("slurm")
    except pytest.skip.Exception:
        log = root / "run.log"
        rc = pr.run_logged(["bash", "examples/sega_llama3_8b_single_node.sh",
                            *pr.pipeline_args(inputs, work, *stages)], log, pr.launcher_env())
        assert rc == 0, pr.tail(log)
        kind = "single-node launcher"
    else:
        job = run_job(inputs, work, root / "job.log", *stages)
        job.wait_done()
        assert job.state() == ("COMPLETED", 0), pr.tail(job.log)
        log, kind = job.log, "sbatch job"
    pr.assert_all_stages_done(work)
    assert (work / ".done_dpo").is_file()
    pr.assert_no_abort(log.read_text(errors="replace"), f"reference ({kind})")
    return work, kind
