"""Test 1: the SLURM launcher under a real scheduler survives the time-limit warning.

``sbatch examples/sega_llama3_8b.sh`` (the real script; CPU overrides on the command line) runs
the whole pipeline on the tiny HF model. After SFT's first checkpoint the batch shell gets USR1,
as ``#SBATCH --signal=B:USR1@600`` would send it (``scancel --signal=USR1 --batch``). Asserted:
only the workers are signalled and they save a complete checkpoint and mark the stop; the job
requeues itself (Restarts=1); the requeued run skips convert and resumes SFT from that
checkpoint; every stage finishes; the per-step SFT (and SEGA) metrics, the final weights and
optimizer state, the exported HF weights and the evaluation records are bitwise equal to those of
an uninterrupted job. Measured and printed: USR1 -> complete checkpoint, requeue -> first new
SFT step.

To place the signal mid-SFT whatever the machine's speed, the workers are paused (SIGSTOP) from
the first checkpoint until the trap has signalled them; they then continue and act on it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

from tests.cluster import pipeline_run as pr
from tests.cluster.slurm import run_job

FIRST_CHECKPOINT = pr.SAVE_INTERVAL  # the stop comes after it


def test_usr1_checkpoints_requeues_and_resumes_bitwise(slurm, inputs, reference, tmp_path):
    ref_work, ref_kind = reference
    work = tmp_path / "work"
    job = run_job(inputs, work, tmp_path / "job.log")
    try:
        _stop_requeue_resume(job, work, ref_work, ref_kind)
    finally:
        job.cancel_if_running()


def _stop_requeue_resume(job, work, ref_work, ref_kind) -> None:
    log, save_dir = job.log, work / "sft" / "ckpt"
    pr.wait_for(lambda: (save_dir / "latest").is_file(), "SFT's first checkpoint", job.running,
                log)
    workers = pr.worker_pids(str(work))
    assert len(workers) == pr.NPROC, workers
    pr.signal_pids(workers, signal.SIGSTOP)
    try:
        sent = time.time()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=60)
        pr.wait_for(lambda: "USR1: workers signalled" in job.log_text(), "the trap", job.running,
                    log)
    finally:
        pr.signal_pids(workers, signal.SIGCONT)
    marker = save_dir / "STOPPED"
    saved = pr.wait_for(marker.is_file, "the STOPPED marker", job.running, log, poll=0.005)
    stop = json.loads(marker.read_text())
    step = stop["step"]
    # A complete checkpoint of the step it stopped at (before later saves may prune it).
    assert (save_dir / f"step_{step:08d}" / "COMPLETE").is_file()
    rows_at_stop = pr.metrics_rows(work, "sft")
    resumed = pr.wait_for(lambda: pr.metrics_rows(work, "sft") > rows_at_stop,
                          "the first step after the requeue", job.running, log, poll=0.01)
    job.wait_done()
    text = job.log_text()

    assert job.state() == ("COMPLETED", 0), text[-4000:]
    assert job.restarts() == 1
    # The stop: at the next step boundary after the signal, not at the end.
    assert stop["stage"] == "sft" and FIRST_CHECKPOINT <= step < pr.SFT_STEPS
    assert "User defined signal 1" not in text  # torchrun's agent was not hit
    assert text.count("requeueing job") == 1
    # The requeued run skipped convert, resumed SFT where it stopped and finished everything.
    after = text[text.index("requeueing job"):]
    assert "== convert: done earlier, skipped" in after
    assert f"resumed from {save_dir / f'step_{step:08d}'} at step {step}" in after
    assert "pipeline finished" in after
    pr.assert_all_stages_done(work)
    pr.assert_same_results(work, ref_work)
    pr.assert_no_abort(text, "the requeued job")
    requeued = float(re.search(r"requeueing job \S+ \(restart 1\) at (\S+)", text).group(1))
    print(f"\n[slurm, tiny model] USR1 -> complete checkpoint: {saved - sent:.2f} s; "
          f"requeue -> first new SFT step: {resumed - requeued:.2f} s (stopped at step {step}; "
          f"reference: {ref_kind})")


def test_a_failed_stage_fails_the_job_and_is_not_requeued(slurm, inputs, tmp_path):
    """SFT without its converted checkpoint fails: the job ends FAILED, Restarts=0, and the
    stage is not marked done."""
    work, log = tmp_path / "work", tmp_path / "job.log"
    job = run_job(inputs, work, log, "--stages", "sft")
    try:
        job.wait_done()
    finally:
        job.cancel_if_running()
    text = job.log_text()
    state, code = job.state()
    assert state == "FAILED" and code not in (0, pr.RESUME_EXIT_CODE), (state, code, text[-3000:])
    assert job.restarts() == 0 and "requeueing" not in text
    assert "== sft failed" in text and not (work / ".done_sft").exists()
    pr.assert_no_abort(text, "the failing job")
