"""NPROC_PER_NODE sets the processes per node of both launchers and wins over SLURM's GPU count
(checked by the dry run, which validates every stage's config against the world size)."""

from __future__ import annotations

import subprocess

import pytest

from tests.cluster import pipeline_run as pr


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
