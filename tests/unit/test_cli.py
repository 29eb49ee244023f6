"""The CLI's shape: each subcommand has its own flags, user errors are one class, and under
torchrun an error is printed once (by the first rank that reports it), not once per rank."""

from __future__ import annotations

import contextlib
import io

import pytest

from megatron_sega import cli
from megatron_sega.errors import (
    CheckpointError, ConfigError, DataError, ModelConfigError, ParallelConfigError, UserError,
)
from tests.dist import run_distributed


def _flags(command: str) -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for action in sub._actions for opt in action.option_strings}


def test_each_subcommand_has_its_own_flags():
    common = {"-h", "--help", "--config"}
    assert _flags("sft") == _flags("sega") == common | {"--dry-run", "--resume", "--no-load-optim"}
    assert _flags("eval") == common | {"--dry-run"}
    assert _flags("generate") == common | {"--dry-run", "--out"}
    assert _flags("demo") == common | {"--out", "--quick"}
    assert _flags("check") == common | {"--world-size"}


def test_a_flag_of_another_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["sega", "--quick"])
    assert exit_.value.code == 2 and "unrecognized arguments: --quick" in capsys.readouterr().err


def test_user_errors_share_one_base_class():
    from megatron_sega.errors import ConversionError, LayoutError
    from megatron_sega.data import TokenizerError
    from megatron_sega.sampling import SamplerMemoryError

    for kind in (ConfigError, DataError, CheckpointError, ModelConfigError, ParallelConfigError,
                 ConversionError, LayoutError, TokenizerError, SamplerMemoryError):
        assert issubclass(kind, UserError), kind
    assert not issubclass(FileNotFoundError, UserError)  # the CLI no longer swallows those


def _report_both_ways() -> list[str]:
    """Both ranks report one error, then rank 1 alone another; what this rank printed."""
    import torch.distributed as dist

    printed = []
    for ranks, message in (([0, 1], "data.train: no such file"), ([1], "rank 1 only\nline 2")):
        err = io.StringIO()
        if dist.get_rank() in ranks:
            with contextlib.redirect_stderr(err):
                cli.report_error("sega", DataError(message))
        dist.barrier()
        printed.append(err.getvalue())
    return printed


@pytest.mark.distributed
def test_an_error_is_printed_once_across_ranks_and_never_lost():
    (same0, alone0), (same1, alone1) = run_distributed(_report_both_ways, 2)
    # The same error on both ranks: one line in all (whichever rank came first).
    assert sorted([same0, same1]) == ["", "megatron-sega sega: error: data.train: no such file\n"]
    # An error on rank 1 only: rank 1 prints it, on one line.
    assert (alone0, alone1) == ("", "megatron-sega sega: error: rank 1 only line 2\n")


@pytest.mark.distributed
def test_torchrun_prints_a_config_error_once(tmp_path):
    """Before the process group exists (the config is checked first), through torchrun's store."""
    import subprocess
    import sys

    from tests.cli_run import REPO, cli_env

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "megatron_sega.cli", "sega", "data.train=examples/demo_data/train.jsonl",
         "data.max_seq_len=64", "parallel.device=cpu"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    line = ("megatron-sega sega: error: data.max_seq_len(64) must exceed "
            "sampling.max_new_tokens(256)")
    assert (result.stdout + result.stderr).count(line) == 1, result.stderr[-3000:]
    # No traceback through our code (torchrun then reports the failed group in its own words).
    assert "megatron_sega/" not in result.stderr, result.stderr[-3000:]
