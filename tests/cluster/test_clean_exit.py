"""Every CLI command destroys its process groups and exits without an abort, on error paths too.

Left to interpreter exit, the groups' threads can abort a worker after its work is done
("terminate called without an active exception", SIGABRT), which fails a torchrun stage that
succeeded. Every CLI run of the suite that succeeds is checked for an abort (``tests/cli_run.py``:
about twenty torchrun groups); here four more runs of ``eval`` under torchrun (2 processes, TP=2,
the tiny model), back to back, exit 0 with no abort; a run that fails after the groups exist (a
malformed eval file, read after setup) exits with the user-error code on every worker, prints
one line, and does not abort either.
"""

from __future__ import annotations

import re

from tests.cli_run import REPO, Run
from tests.cluster.pipeline_run import assert_no_abort

CONFIG = REPO / "examples/configs/demo_tiny.yaml"
REPEATS, AT_ONCE = 4, 2  # two runs at a time keep both cores busy (torchrun starts serially)


def test_torchrun_runs_exit_without_abort(tmp_path):
    pairs = tmp_path / "eval.jsonl"
    pairs.write_text("".join((REPO / "examples/demo_data/eval.jsonl").read_text()
                             .splitlines(keepends=True)[:2]))
    for first in range(0, REPEATS, AT_ONCE):
        runs = [Run(f"eval{i}", tmp_path, "eval", CONFIG, f"data.eval={pairs}",
                    f"eval.out={tmp_path / f'out{i}'}", "logging.progress=false", nproc=2)
                for i in range(first, min(first + AT_ONCE, REPEATS))]
        for i, run in enumerate(runs, start=first):
            output = run.wait()
            assert f"wrote {tmp_path / f'out{i}'}/pairs.jsonl" in output
            assert_no_abort(output, f"run {i + 1} of {REPEATS}")


def test_an_error_after_setup_exits_cleanly_on_every_rank(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen"\n')
    run = Run("bad_eval", tmp_path, "eval", CONFIG, f"data.eval={bad}", "logging.progress=false",
              nproc=2)
    output = run.wait(expect=None)
    assert run.rc == 1  # torchrun's code for failed workers
    assert_no_abort(output, "the failing run")
    # The user error is printed once, in one line (rank 0), and both workers exit 2.
    errors = re.findall(r"megatron-sega eval: error: (.*)", output)
    assert len(errors) == 1 and f"{bad}:2" in errors[0], output[-3000:]
    # torchrun's failure table, one entry per worker: the worker that failed first exits 2; the
    # agent then SIGTERMs any worker still running, so the other exits 2 or -15, never an abort.
    table = dict(re.findall(r"rank\s+:\s+(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s+:\s+(-?\d+)",
                            output))
    assert set(table) == {"0", "1"} and "2" in table.values(), output[-3000:]
    assert set(table.values()) <= {"2", "-15"}, output[-3000:]
    assert not re.search(r'File ".*megatron_sega/', output)  # no worker traceback
