"""Test 2: the single-node launcher stops on ``kill -USR1`` to its workers and resumes on a rerun.

``bash examples/sega_llama3_8b_single_node.sh`` (NPROC_PER_NODE=2, CPU overrides) runs the whole
pipeline on the tiny HF model. Right after SFT's first checkpoint the two workers (the children of
torchrun, not torchrun) get USR1. Asserted: the launcher exits 75 ("stopped, resume me") with a
complete checkpoint and the STOPPED marker, SFT not marked done; the same command run again skips
convert, resumes SFT from that checkpoint and finishes every stage; metrics, weights, exported
weights and evaluation records are bitwise equal to the uninterrupted reference run's.
Printed: USR1 -> complete checkpoint, rerun -> first new SFT step.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

from tests.cluster import pipeline_run as pr


def test_kill_usr1_on_workers_then_rerun_resumes_bitwise(inputs, reference, tmp_path):
    ref_work, ref_kind = reference
    work, log = tmp_path / "work", tmp_path / "run.log"
    save_dir = work / "sft" / "ckpt"
    command = ["bash", "examples/sega_llama3_8b_single_node.sh", *pr.pipeline_args(inputs, work)]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=pr.REPO, env=pr.launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    alive = lambda: proc.poll() is None  # noqa: E731
    pr.wait_for(lambda: (save_dir / "latest").is_file(), "SFT's first checkpoint", alive, log,
                poll=0.005)
    workers = pr.worker_pids(str(work))
    assert len(workers) == pr.NPROC, workers
    sent = time.time()
    pr.signal_pids(workers, signal.SIGUSR1)
    marker = save_dir / "STOPPED"
    saved = pr.wait_for(marker.is_file, "the STOPPED marker", alive, log, poll=0.005)
    rc = proc.wait(timeout=pr.TIMEOUT)
    first = log.read_text(errors="replace")

    assert rc == pr.RESUME_EXIT_CODE, first[-4000:]
    stop = json.loads(marker.read_text())
    step = stop["step"]
    assert stop["stage"] == "sft" and pr.SAVE_INTERVAL <= step < pr.SFT_STEPS
    assert (save_dir / f"step_{step:08d}" / "COMPLETE").is_file()
    assert (work / ".done_convert").is_file() and not (work / ".done_sft").exists()
    assert "== sft: stopped" in first and "== sega" not in first
    pr.assert_no_abort(first, "the stopped run")

    # The same command again: convert skipped, SFT resumed, every stage finished.
    rows_at_stop = pr.metrics_rows(work, "sft")
    rerun_log = tmp_path / "rerun.log"
    with open(rerun_log, "w") as out:
        started = time.time()
        proc = subprocess.Popen(command, cwd=pr.REPO, env=pr.launcher_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    resumed = pr.wait_for(lambda: pr.metrics_rows(work, "sft") > rows_at_stop,
                          "the first step of the rerun", alive, rerun_log, poll=0.01)
    assert proc.wait(timeout=pr.TIMEOUT) == 0, pr.tail(rerun_log)
    rerun = rerun_log.read_text(errors="replace")
    assert "== convert: done earlier, skipped" in rerun
    assert f"resumed from {save_dir / f'step_{step:08d}'} at step {step}" in rerun
    pr.assert_all_stages_done(work)
    pr.assert_same_results(work, ref_work)
    pr.assert_no_abort(rerun, "the rerun")
    print(f"\n[single node, tiny model] USR1 -> complete checkpoint: {saved - sent:.2f} s; "
          f"rerun -> first new SFT step: {resumed - started:.2f} s (stopped at step {step}; "
          f"reference: {ref_kind})")
