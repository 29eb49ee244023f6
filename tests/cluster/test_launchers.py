"""NPROC_PER_NODE sets the processes per node of both launchers and wins over SLURM's GPU count
(checked by the dry run, which validates every stage's config against the world size).

``sbatch examples/sega_llama3_8b.sh`` works from a fresh clone with the script's own
``#SBATCH --output`` (issue 25, item 5): SLURM opens that file before the script runs, so its
directory must be in the repository. Checked in a ``git clone`` of this checkout, without SLURM
(the directory is there) and with it (a job submitted without ``--output`` writes its log there).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.cluster import pipeline_run as pr
from tests.cluster.slurm import run_job

SLURM_SCRIPT = "examples/sega_llama3_8b.sh"


@pytest.mark.parametrize("script", ["examples/sega_llama3_8b.sh",
                                    "examples/sega_llama3_8b_single_node.sh"])
def test_nproc_per_node_wins_over_slurm_gpus_on_node(script, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    env = pr.launcher_env(SLURM_GPUS_ON_NODE="8", SLURM_NNODES="1", GPUS="8")
    result = subprocess.run(
        ["bash", script, "--dry-run", "--hf-dir", str(tmp_path / "hf"), "--work-dir",
         str(tmp_path / "work"), "--train", str(data), "--eval", str(data), "parallel.tp=2",
         "parallel.device=cpu"],
        cwd=pr.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dry run ok: world size 2" in result.stdout
    assert result.stdout.count("ok: tp=2 pp=1 dp=1 world=2") == 4  # sft, sega, eval x2


def _sbatch_outputs(script: Path) -> list[str]:
    return re.findall(r"^#SBATCH --(?:output|error)=(\S+)", script.read_text(), re.M)


def test_the_scripts_own_output_directory_exists_in_a_fresh_clone(tmp_path):
    clone = pr.fresh_clone(tmp_path / "clone")
    outputs = _sbatch_outputs(clone / SLURM_SCRIPT)
    assert outputs == ["logs/%x-%j.out"]
    for output in outputs:
        assert (clone / output).parent.is_dir(), f"{output}: no such directory in a fresh clone"


def test_sbatch_from_a_fresh_clone_logs_to_the_scripts_own_output(slurm, inputs, tmp_path):
    """A dry run of one stage, submitted from the clone's root without ``--output``."""
    clone = pr.fresh_clone(tmp_path / "clone")
    job = run_job(inputs, tmp_path / "work", None, "--dry-run", "--stages", "sft", repo=clone)
    try:
        job.wait_done()
    finally:
        job.cancel_if_running()
    name = re.search(r"^#SBATCH --job-name=(\S+)", (clone / SLURM_SCRIPT).read_text(),
                     re.M).group(1)
    log = clone / "logs" / f"{name}-{job.id}.out"
    assert log.is_file(), sorted(p.name for p in (clone / "logs").iterdir())
    text = log.read_text(errors="replace")
    assert job.state() == ("COMPLETED", 0), text[-3000:]
    assert "dry run ok: world size 2" in text, text[-3000:]


def test_a_convert_stage_killed_before_it_was_marked_done_reruns_as_a_no_op(inputs, tmp_path):
    """Issue 25, item 9, through the launcher: the conversion finished (renamed into place) but
    the job died before ``.done_convert``; the same command again succeeds without converting."""
    work = tmp_path / "work"
    command = ["bash", "examples/sega_llama3_8b_single_node.sh",
               *pr.pipeline_args(inputs, work, "--stages", "convert")]
    first = subprocess.run(command, cwd=pr.REPO, env=pr.launcher_env(), capture_output=True,
                           text=True, timeout=pr.TIMEOUT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (work / ".done_convert").unlink()
    rerun = subprocess.run(command, cwd=pr.REPO, env=pr.launcher_env(), capture_output=True,
                           text=True, timeout=pr.TIMEOUT)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{work / 'mcore'} already holds this conversion" in rerun.stdout
    assert (work / ".done_convert").is_file() and "pipeline finished" in rerun.stdout
