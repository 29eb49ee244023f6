"""The stop-signal protocol's process side (megatron_sega/checkpoint/stop.py), in fresh
interpreters: recorded signals do not kill, the resume exit code, and releasing the handlers."""

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_signals_are_recorded_and_a_stop_exits_with_the_resume_code():
    result = _python(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from megatron_sega.checkpoint import stop\n"
        "stop.install_handlers(fresh=True)\n"
        "assert not stop.requested() and stop.exit_code(0) == 0\n"
        "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert stop.requested()\n"
        "assert stop.exit_code(0) == 0  # a signal alone: nothing was saved, nothing stopped\n"
        "stop.mark_stopped(Path('ckpt/step_00000003'))\n"
        "assert stop.exit_code(1) == 1  # a failure stays a failure\n"
        "stop.install_handlers(fresh=True)\n"
        "assert not stop.requested() and stop.exit_code(0) == 0\n"
        "stop.mark_stopped(Path('ckpt/step_00000003'))\n"
        "sys.exit(stop.exit_code(0))\n")
    assert result.returncode == 75, result.stderr
    assert "torch" not in _python(
        "import sys; import megatron_sega.checkpoint.stop; print(sorted(sys.modules))").stdout


def test_released_handlers_deliver_a_pending_signal():
    result = _python(
        "import os, signal\n"
        "from megatron_sega.checkpoint import stop\n"
        "stop.install_handlers(fresh=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('survived the signal', flush=True)\n"
        "stop.release_handlers()\n"
        "print('not reached')\n")
    assert result.returncode == -signal.SIGTERM
    assert "survived the signal" in result.stdout and "not reached" not in result.stdout
