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

The same for DPO (issue 25, item 3: DPO follows the same protocol): a job of the DPO stage alone,
from the reference's SFT checkpoint, gets USR1 after DPO's first checkpoint; it requeues, resumes
DPO and its per-step metrics and final state equal the reference's DPO stage bit for bit.

To place the signal mid-stage whatever the machine's speed, the workers are paused (SIGSTOP) from
the stage's first checkpoint until the trap has signalled them; they then continue and act on it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time

from tests.cluster import pipeline_run as pr
from tests.cluster.slurm import run_job

FIRST_CHECKPOINT = pr.SAVE_INTERVAL  # the stop comes after it
TRAPPED = r"USR1: workers signalled|the current stage does not checkpoint"


def test_usr1_checkpoints_requeues_and_resumes_bitwise(slurm, inputs, reference, tmp_path):
    ref_work, ref_kind = reference
    work = tmp_path / "work"
    job = run_job(inputs, work, tmp_path / "job.log")
    try:
        _stop_requeue_resume(job, work, ref_work, ref_kind)
    finally:
        job.cancel_if_running()


def _stop_mid_stage(job, work, stage: str) -> tuple[dict, float, float]:
    """USR1 to the job's batch shell right after ``stage``'s first checkpoint (its workers paused
    until the trap has signalled them). Returns the STOPPED marker, the times of the signal and
    of the marker."""
    log, save_dir = job.log, work / stage / "ckpt"
    pr.wait_for(lambda: (save_dir / "latest").is_file(), f"{stage}'s first checkpoint",
                job.running, log)
    workers = pr.worker_pids(str(work))
    assert len(workers) == pr.NPROC, workers
    pr.signal_pids(workers, signal.SIGSTOP)
    try:
        sent = time.time()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=60)
        # The trap either signals the workers or says that this stage does not checkpoint.
        pr.wait_for(lambda: re.search(TRAPPED, job.log_text()), "the trap", job.running, log)
    finally:
        pr.signal_pids(workers, signal.SIGCONT)
    assert "USR1: workers signalled" in job.log_text(), job.log_text()[-3000:]
    marker = save_dir / "STOPPED"
    saved = pr.wait_for(marker.is_file, "the STOPPED marker", job.running, log, poll=0.005)
    stop = json.loads(marker.read_text())
    # A complete checkpoint of the step it stopped at (before later saves may prune it).
    assert (save_dir / f"step_{stop['step']:08d}" / "COMPLETE").is_file()
    return stop, sent, saved


def _assert_requeued_and_resumed(job, work, stop: dict, stage: str, steps: int) -> str:
    """The job stopped ``stage`` at a step boundary after the signal, requeued itself once and
    the new run resumed ``stage`` from that checkpoint and finished. Returns the log."""
    text, step = job.log_text(), stop["step"]
    assert job.state() == ("COMPLETED", 0), text[-4000:]
    assert job.restarts() == 1
    # The stop: at the next step boundary after the signal, not at the end.
    assert stop["stage"] == stage and FIRST_CHECKPOINT <= step < steps
    assert "User defined signal 1" not in text  # torchrun's agent was not hit
    assert text.count("requeueing job") == 1
    after = text[text.index("requeueing job"):]
    save_dir = work / stage / "ckpt"
    assert f"resumed from {save_dir / f'step_{step:08d}'} at step {step}" in after
    assert "pipeline finished" in after
    assert (work / f".done_{stage}").is_file() and not (save_dir / "STOPPED").exists()
    pr.assert_no_abort(text, "the requeued job")
    return text


def _requeued_at(text: str) -> float:
    return float(re.search(r"requeueing job \S+ \(restart 1\) at (\S+)", text).group(1))


def _stop_requeue_resume(job, work, ref_work, ref_kind) -> None:
    stop, sent, saved = _stop_mid_stage(job, work, "sft")
    rows_at_stop = pr.metrics_rows(work, "sft")
    resumed = pr.wait_for(lambda: pr.metrics_rows(work, "sft") > rows_at_stop,
                          "the first step after the requeue", job.running, job.log, poll=0.01)
    job.wait_done()
    text = _assert_requeued_and_resumed(job, work, stop, "sft", pr.SFT_STEPS)
    # The requeued run skipped convert, resumed SFT where it stopped and finished everything.
    assert "== convert: done earlier, skipped" in text[text.index("requeueing job"):]
    pr.assert_all_stages_done(work)
    pr.assert_same_results(work, ref_work)
    print(f"\n[slurm, tiny model] USR1 -> complete checkpoint: {saved - sent:.2f} s; "
          f"requeue -> first new SFT step: {resumed - _requeued_at(text):.2f} s (stopped at step "
          f"{stop['step']}; reference: {ref_kind})")


def test_usr1_mid_dpo_checkpoints_requeues_and_resumes_bitwise(slurm, inputs, reference,
                                                               tmp_path):
    ref_work, ref_kind = reference
    work = tmp_path / "work"
    # DPO alone, from (a copy of) the reference's SFT checkpoint, as the reference's DPO started.
    shutil.copytree(ref_work / "sft" / "ckpt", work / "sft" / "ckpt")
    job = run_job(inputs, work, tmp_path / "job.log", "--stages", "dpo")
    try:
        stop, sent, saved = _stop_mid_stage(job, work, "dpo")
        job.wait_done()
    finally:
        job.cancel_if_running()
    text = _assert_requeued_and_resumed(job, work, stop, "dpo", pr.DPO_STEPS)
    pr.assert_same_metrics(work, ref_work, "dpo", pr.DPO_STEPS)
    pr.assert_same_checkpoint(work, ref_work, "dpo")
    print(f"\n[slurm, tiny model] DPO: USR1 -> complete checkpoint: {saved - sent:.2f} s; "
          f"requeue at {_requeued_at(text) - saved:.2f} s after it (stopped at step "
          f"{stop['step']}; reference: {ref_kind})")


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
