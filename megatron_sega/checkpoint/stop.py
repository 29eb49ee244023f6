"""Stop signals of a training stage: record SIGTERM/SIGUSR1, exit with "stopped, resume me".

The protocol (what a launcher can rely on):

- a stage (``sft``, ``sega``) with a ``checkpoint.save_dir`` records SIGTERM and SIGUSR1 from the
  start of the process on; the training loop acts on them at the next step boundary (every rank
  agreeing): it saves a complete checkpoint and writes the ``STOPPED`` marker
  (``checkpoint.names.STOP_MARKER``) into the save directory (JSON: stage, step, checkpoint)
  before the save's last barrier;
- the process then exits with :data:`RESUME_EXIT_CODE` (75, sysexits ``EX_TEMPFAIL``), distinct
  from 0 (finished) and from failures (1; 2 for user errors);
- torchrun turns any non-zero worker exit into its own exit code 1, so a launcher recognises a stop
  by the marker (examples/pipeline.sh does), not by torchrun's code. Once one worker has exited,
  torchrun sends SIGTERM to the others, and one still in interpreter shutdown (handlers gone) may
  end by it: it has nothing left to lose, since no rank passes the save's last barrier before the
  checkpoint and the marker exist;
- a stage whose last step is done finishes normally (exit 0, no marker) even if a signal came in.

No torch here: the CLI installs the handlers before its heavy imports.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

RESUME_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_state: dict = {"signal": None, "checkpoint": None, "installed": False}


def _record(signum, frame) -> None:
    _state["signal"] = signum


def install_handlers(fresh: bool = False) -> None:
    """From now on SIGTERM/SIGUSR1 are recorded for the training loop instead of ending the
    process; ``fresh`` forgets an earlier command's stop (a new command in this process)."""
    if fresh:
        _state.update(signal=None, checkpoint=None)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    _state["installed"] = True


def release_handlers() -> None:
    """Back to the default actions (the command has nowhere to save); a signal that came in
    meanwhile takes effect now."""
    if not _state["installed"]:
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    _state["installed"] = False
    if _state["signal"] is not None:
        signal.raise_signal(_state["signal"])


def requested() -> bool:
    """A stop signal came in (on this rank)."""
    return _state["signal"] is not None


def mark_stopped(checkpoint: Path) -> None:
    _state["checkpoint"] = checkpoint


def stopped_checkpoint() -> Optional[Path]:
    """The checkpoint this process saved on a stop signal before leaving its loop, else None."""
    return _state["checkpoint"]


def exit_code(rc: int) -> int:
    """The exit code of a command that returned ``rc``: a stopped stage is neither finished nor
    failed."""
    return RESUME_EXIT_CODE if rc == 0 and stopped_checkpoint() is not None else rc
