"""Training checkpoints that survive preemption: atomic save, exact resume, resharding.

Layout of ``checkpoint.save_dir``::

    step_00000040/            one complete checkpoint
        model_optim/          torch_dist: model + optimizer (fully reshardable) + megatron_sega.json
        rng/rank_00003.pt     this rank's RNG states (python, numpy, torch, CUDA, Megatron tracker)
        train_state.json      stage, step, LR scheduler, data-iterator position, resolved config
        COMPLETE              written last, before the rename
    latest                    name of the newest complete checkpoint (written after the rename)

A checkpoint is written into ``.tmp_step_…`` and renamed when every rank has finished; a directory
without ``COMPLETE`` is never chosen (a warning names it). Only tensors and JSON are read back
(``torch.load(weights_only=True)``); nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_sega.checkpoint.mcore import (
    CheckpointError, CheckpointInfo, check_compatible, read_info, unwrap, write_info,
)
from megatron_sega.checkpoint.hf_io import dtype_name

COMPLETE = "COMPLETE"
LATEST = "latest"
_OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def find_latest(save_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint in ``save_dir`` (skipping incomplete ones, with a warning)."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    for path in candidates:
        if (path / COMPLETE).is_file():
            return path
        warnings.warn(f"checkpoint {path} has no {COMPLETE} marker (interrupted save?); "
                      "skipping it in favour of an older one", stacklevel=2)
    return None


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np.random.get_state()[2], dtype=torch.int64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, value in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = value
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32),
                         int(state["numpy_pos"]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


class CheckpointManager:
    """Save/resume for one training stage ('sft' or 'sega') of a session."""

    def __init__(self, session, config, stage: str):
        self.session = session
        self.config = config
        self.stage = stage
        self.save_dir = Path(config.save_dir) if config.save_dir else None
        self._signal = None
        if self.save_dir is not None:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    # ------------------------------------------------------------------ saving
    def save(self, step: int, iterator=None, extra: Optional[dict] = None) -> Optional[Path]:
        """Collective: write a complete checkpoint of ``step`` atomically."""
        if self.save_dir is None:
            return None
        from megatron.core import dist_checkpointing

        s = self.session
        final = self.save_dir / _step_name(step)
        tmp = self.save_dir / f".tmp_{_step_name(step)}"
        if s.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "model_optim").mkdir(parents=True)
            (tmp / "rng").mkdir()
        dist.barrier()
        model = unwrap(s.model)
        state = {"model": model.sharded_state_dict()}
        if s.optimizer is not None:
            state["optimizer"] = s.optimizer.sharded_state_dict(state["model"],
                                                                metadata=_OPTIM_SHARDING)
        dist_checkpointing.save(state, str(tmp / "model_optim"), content_metadata=_OPTIM_SHARDING)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{s.runtime.rank:05d}.pt")
        dist.barrier()
        if s.is_main:
            write_info(tmp / "model_optim", CheckpointInfo(
                spec=s.spec, padded_vocab_size=int(model.vocab_size),
                dtype=dtype_name(model.config.params_dtype)))
            train_state = {
                "stage": self.stage, "step": step,
                "scheduler": s.scheduler.state_dict() if s.scheduler is not None else None,
                "iterator": iterator.state_dict() if iterator is not None else None,
                "world_size": s.runtime.world_size, "tp": s.runtime.tp, "pp": s.runtime.pp,
                "config": s.config.to_dict(), **(extra or {}),
            }
            (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
            s.tokenizer.save(tmp / "model_optim" / "tokenizer")
            (tmp / COMPLETE).write_text("ok\n")
            os.replace(tmp, final) if not final.exists() else _replace_dir(tmp, final)
            pointer = self.save_dir / f".{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.save_dir / LATEST)
            self._prune()
        dist.barrier()
        s.print(f"saved checkpoint {final}")
        return final

    def _prune(self) -> None:
        keep = max(self.config.keep_last, 1)
        complete = sorted(p for p in self.save_dir.glob("step_*") if (p / COMPLETE).is_file())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def _resume_path(self) -> Optional[Path]:
        resume = self.config.resume
        if resume in (None, "none"):
            return None
        if resume == "auto":
            return find_latest(self.save_dir) if self.save_dir else None
        path = Path(resume)
        if (path / LATEST).is_file():
            path = path / (path / LATEST).read_text().strip()
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"checkpoint.resume = {resume}: {path} is not a complete "
                                  f"checkpoint (no {COMPLETE} marker)")
        return path

    def resume(self, iterator=None) -> int:
        """Load the checkpoint chosen by ``checkpoint.resume``; return the step to start from."""
        path = self._resume_path()
        if path is None:
            return 0
        from megatron.core import dist_checkpointing

        s = self.session
        train_state = json.loads((path / "train_state.json").read_text())
        if train_state.get("stage") != self.stage:
            raise CheckpointError(f"{path} is a '{train_state.get('stage')}' checkpoint; this is "
                                  f"the '{self.stage}' stage (use model.load to start from it)")
        model = unwrap(s.model)
        check_compatible(read_info(path / "model_optim"), s.spec, int(model.vocab_size), str(path))
        same_layout = (train_state["tp"], train_state["pp"], train_state["world_size"]) == (
            s.runtime.tp, s.runtime.pp, s.runtime.world_size)
        state = {"model": model.sharded_state_dict()}
        load_optim = self.config.load_optim and s.optimizer is not None
        if load_optim:
            _ensure_optimizer_state(s.optimizer)
            state["optimizer"] = s.optimizer.sharded_state_dict(state["model"], is_loading=True,
                                                                metadata=_OPTIM_SHARDING)
        loaded = dist_checkpointing.load(state, str(path / "model_optim"))
        model.load_state_dict(loaded["model"], strict=True)
        if load_optim:
            with torch.no_grad():  # fp32 main params are views of the (grad-requiring) params
                s.optimizer.load_state_dict(loaded["optimizer"])
        elif s.optimizer is not None:
            s.optimizer.reload_model_params()
        if s.scheduler is not None and train_state.get("scheduler"):
            s.scheduler.load_state_dict(train_state["scheduler"])
        if iterator is not None and train_state.get("iterator"):
            iterator.load_state_dict(train_state["iterator"])
        rng_file = path / "rng" / f"rank_{s.runtime.rank:05d}.pt"
        if same_layout and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        elif not same_layout:
            s.print(f"note: resuming {path} at another layout (tp/pp/world "
                    f"{train_state['tp']}/{train_state['pp']}/{train_state['world_size']} -> "
                    f"{s.runtime.tp}/{s.runtime.pp}/{s.runtime.world_size}); RNG states restart")
        s.print(f"resumed from {path} at step {train_state['step']}")
        self.extra = {k: v for k, v in train_state.items()
                      if k not in ("scheduler", "iterator", "config")}
        return int(train_state["step"])

    # ------------------------------------------------------------------ loop hooks
    def should_stop(self, step: int, total: int, iterator=None) -> bool:
        """Save on the interval; on SIGTERM/SIGUSR1 save and tell the loop to stop."""
        if self.save_dir is None:
            return False
        stop = torch.tensor([1 if self._signal is not None else 0], device=self.session.runtime.device)
        dist.all_reduce(stop)  # every rank must agree to save together
        if int(stop.item()):
            self.session.print(f"signal received: saving step {step} and stopping")
            self.save(step, iterator)
            self.stopped = True
            return True
        interval = self.config.save_interval
        if interval and step % interval == 0 and step < total:
            self.save(step, iterator)
        return False

    def finalize(self, step: int, iterator=None) -> None:
        if self.save_dir is None or getattr(self, "stopped", False):
            return
        if find_latest(self.save_dir) != self.save_dir / _step_name(step):
            self.save(step, iterator)


def _ensure_optimizer_state(optimizer) -> None:
    """The distributed optimizer can describe its state for loading only once that state exists
    (Adam creates it lazily): fill it with placeholders that the load overwrites, as
    Megatron-Core itself does for its other checkpoint formats."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _replace_dir(tmp: Path, final: Path) -> None:
    shutil.rmtree(final)
    os.replace(tmp, final)
