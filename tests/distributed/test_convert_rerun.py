"""Conversion is idempotent (issue 25, item 9): a job killed after the converter renamed its
output into place, but before the pipeline marked the stage done, reruns the same command; that
rerun must find its own finished work and do nothing, for ``hf-to-mcore`` (convert) and
``mcore-to-hf`` (export) alike. Any other non-empty output (other options, another source, the
source changed since) stays an error that names the difference.

One process (the converters run alone), spawned once: the CLI ``main`` and the library calls."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

REPO = Path(__file__).parents[2]


def _cli(*argv: str) -> tuple[int, str]:
    """tools/convert.py's main in this process: (exit code, its output lines)."""
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "tools" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()  # libraries warn on stderr: keep the "error:" lines
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = module.main(list(argv))
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    return rc, out.getvalue() + "\n".join(errors)


def _files(directory: Path) -> dict[str, int]:
    return {p.relative_to(directory).as_posix(): p.stat().st_mtime_ns
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _reruns(root: str) -> None:
    from megatron_sega.convert.hf_mcore import hf_to_mcore, mcore_to_hf
    from megatron_sega.errors import ConversionError
    from tests.unit.test_convert_mapping import SPEC, _random_hf, _write_hf_dir

    root = Path(root)
    hf_dir = _write_hf_dir(root / "hf", SPEC, _random_hf(SPEC))
    mcore, back = root / "mcore", root / "hf_back"
    convert = ("hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(mcore), "--tp", "2")
    export = ("mcore-to-hf", "--mcore-dir", str(mcore), "--out", str(back))
    for argv, out in ((convert, mcore), (export, back)):
        rc, text = _cli(*argv)
        assert rc == 0 and text.startswith(f"wrote {out}"), text
        written = _files(out)
        # The rerun of a finished conversion: exit 0, nothing rewritten.
        rc, text = _cli(*argv)
        assert rc == 0 and "already holds this conversion" in text, text
        assert _files(out) == written
    from megatron_sega.convert.record import RECORD_FILE

    for argv, out in ((convert, mcore), (export, back)):
        record = json.loads((out / RECORD_FILE).read_text())
        assert record["command"] == argv[0] and record["source"] == str(Path(argv[2]).resolve())

    # The library calls are no-ops too and return what a conversion returns.
    assert hf_to_mcore(hf_dir, mcore, tp=2).padded_vocab_size == 128
    assert mcore_to_hf(mcore, back) == back
    # Anything else stays an error that names what differs, and writes nothing.
    before = _files(mcore)
    with pytest.raises(ConversionError, match=r"mcore: holds another conversion \(dtype "
                                              r"'float32', now 'bfloat16'\)"):
        hf_to_mcore(hf_dir, mcore, tp=2, dtype="bf16")
    with pytest.raises(ConversionError, match=r"\(pp 1, now 2\)"):
        hf_to_mcore(hf_dir, mcore, tp=2, pp=2, dtype="fp32")
    with pytest.raises(ConversionError, match=r"max_shard_bytes 5000000000, now 1000\)"):
        mcore_to_hf(mcore, back, max_shard_bytes=1000)
    copy = root / "hf_copy"
    shutil.copytree(hf_dir, copy)
    with pytest.raises(ConversionError, match=f"source '{hf_dir}', now '{copy}'"):
        hf_to_mcore(copy, mcore, tp=2)
    stat = (hf_dir / "model.safetensors").stat()
    os.utime(hf_dir / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ConversionError, match="source files changed since: model.safetensors"):
        hf_to_mcore(hf_dir, mcore, tp=2)
    rc, text = _cli(*convert)
    assert rc == 1 and "source files changed since" in text, text
    (mcore / RECORD_FILE).unlink()  # an output of an older converter, or someone else's
    with pytest.raises(ConversionError, match="exists and is not empty"):
        hf_to_mcore(copy, mcore, tp=2)
    assert _files(mcore) == {k: v for k, v in before.items() if k != RECORD_FILE}
    # An output inside its own source does not count as a change of the source.
    inside = hf_to_mcore(copy, copy / "mcore", tp=2)
    assert hf_to_mcore(copy, copy / "mcore", tp=2) == inside


def test_a_rerun_over_a_finished_conversion_is_a_no_op_anything_else_an_error(tmp_path):
    run_distributed(_reruns, 1, str(tmp_path))
