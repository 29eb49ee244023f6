"""Training checkpoints that survive preemption: atomic save, exact resume, model resharding.

Layout of ``checkpoint.save_dir`` (the names: :mod:`megatron_sega.checkpoint.names`)::

    step_00000040/            one complete checkpoint
        model_optim/          torch_dist: model + distributed optimizer + megatron_sega.json
        rng/rank_00003.pt     this rank's RNG states (python, numpy, torch, CUDA, Megatron tracker)
        train_state.json      stage, step, LR scheduler, data-iterator position, resolved config
        COMPLETE              written last, before the rename
    latest                    name of the newest complete checkpoint (written after the rename)
    STOPPED                   present while the stage is stopped, not finished (see below)

A checkpoint is written into ``.tmp_step_…`` and renamed when every rank has finished; a directory
without ``COMPLETE`` is never chosen (a warning names it). Resuming at the same layout is exact:
the loss trajectory and the weights equal those of an uninterrupted run, bit for bit.

Stop and resume (protocol in :mod:`megatron_sega.checkpoint.stop`). On a recorded SIGTERM or
SIGUSR1 the loop saves the step it just finished, writes ``STOPPED`` (stage, step, checkpoint)
before the last barrier of that save, and the CLI exits 75 ("stopped, resume me"). A stage whose
last step is done just finishes. The marker of an earlier stop goes when the stage starts again.

Resharding. The model weights are stored as global tensors and load at any TP/PP. The optimizer
state uses Megatron's ``dp_reshardable`` layout (``fully_reshardable`` breaks with torch Adam and
``fully_sharded_model_space`` fails validation on CPU), which reshards across data parallelism
only; resuming at another TP/PP therefore needs ``--no-load-optim`` (a clear error says so) and
continues with the saved weights, LR schedule and data position and a fresh Adam state.

Safe loading. Nothing is unpickled: JSON for our files, ``torch.load(weights_only=True)`` for the
RNG tensors, and :func:`megatron_sega.checkpoint.safe_loading.safe_loading` around
``dist_checkpointing.load``.

Parts. The manager is given everything it saves and restores in its constructor (model chunks,
optimizer, scheduler, data iterator, runtime, spec, tokenizer); ``training.session``'s
``checkpoint_manager`` wires them from a session.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_sega.checkpoint import stop
from megatron_sega.checkpoint.mcore import (
    CheckpointInfo, check_compatible, dtype_name, load_model_state, read_info,
    sharded_model_state, unwrap, write_info,
)
from megatron_sega.checkpoint.names import (
    COMPLETE_MARKER, LATEST_FILE, MODEL_OPTIM_DIR, RNG_DIR, STEP_GLOB, STOP_MARKER, TMP_PREFIX,
    TOKENIZER_DIR, TRAIN_STATE_FILE, rng_file_name, step_dir_name,
)
from megatron_sega.checkpoint.safe_loading import safe_loading
from megatron_sega.checkpoint.stop import RESUME_EXIT_CODE
from megatron_sega.errors import CheckpointError

_OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointWarning(RuntimeWarning):
    """A checkpoint was skipped (its own category: the CLI silences library UserWarnings)."""


def find_latest(save_dir: str | Path, warn: bool = True) -> Optional[Path]:
    """The newest complete checkpoint in ``save_dir``, skipping incomplete ones with a warning
    that names them."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob(STEP_GLOB) if p.is_dir()), reverse=True)
    for path in candidates:
        if (path / COMPLETE_MARKER).is_file():
            return path
        if warn:
            warnings.warn(f"checkpoint {path} has no {COMPLETE_MARKER} marker (interrupted save?); "
                          "skipping it in favour of an older one", CheckpointWarning, stacklevel=2)
    return None


def read_tensors(directory: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The global tensors of a torch_dist checkpoint whose keys start with ``prefix``, read in one
    process without Megatron (inspection and tests; e.g. ``prefix='decoder.'``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with safe_loading(directory), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized": intended
        reader = dcp.FileSystemReader(str(directory))
        metadata = reader.read_metadata()
        out = {key: torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in metadata.state_dict_metadata.items()
               if isinstance(m, TensorStorageMetadata) and key.startswith(prefix)}
        dcp.load(out, storage_reader=reader, no_dist=True)
    return out


# ----------------------------------------------------------------------------- RNG states

def _rng_state() -> dict[str, torch.Tensor]:
    """Every RNG state of this rank, as tensors only (so ``weights_only`` loading suffices)."""
    from megatron.core import tensor_parallel

    _, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_keys, dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": torch.tensor(np_pos, dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_has_gauss, np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, value in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker/{name}"] = value
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    has_gauss, gauss = state.get("python_gauss", torch.zeros(2, dtype=torch.float64)).tolist()
    random.setstate((3, tuple(int(x) for x in state["python"]), gauss if has_gauss else None))
    np_has_gauss, np_gauss = state.get("numpy_gauss", torch.zeros(2, dtype=torch.float64)).tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         int(state["numpy_pos"]), int(np_has_gauss), float(np_gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


# ----------------------------------------------------------------------------- the manager

class CheckpointManager:
    """Save/resume for one training stage ('sft', 'sega' or 'dpo'), with every part it saves and
    restores given here: the model ``chunks`` of this rank, the ``optimizer`` and ``scheduler``
    (None when not training), the data ``iterator`` (its position; None for none), the
    ``runtime`` (ranks, groups, device), the model ``spec`` and ``tokenizer`` (written into each
    checkpoint), the resolved ``run_config`` (a dict, recorded for the record) and whether the
    optimizer is ``distributed_optimizer`` (its state layout). ``config``: the ``checkpoint``
    section (save_dir, resume, save_interval, keep_last, load_optim)."""

    def __init__(self, config, stage: str, *, chunks: list, optimizer, scheduler, iterator,
                 runtime, spec, tokenizer, run_config: dict, distributed_optimizer: bool):
        self.config = config
        self.stage = stage
        self.chunks = chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.iterator = iterator
        self.runtime = runtime
        self.spec = spec
        self.tokenizer = tokenizer
        self.run_config = run_config
        self.distributed_optimizer = distributed_optimizer
        self.save_dir = Path(config.save_dir) if config.save_dir else None
        self.stopped = False
        self.extra: dict = {}
        if self.save_dir is not None:
            stop.install_handlers()  # the CLI did already; library callers need it here
            if self.is_main:  # the stop of an earlier run: this one starts the stage again
                (self.save_dir / STOP_MARKER).unlink(missing_ok=True)

    @property
    def is_main(self) -> bool:
        return self.runtime.rank == 0

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

    def _layout(self) -> dict:
        rt = self.runtime
        return {"world_size": rt.world_size, "tp": rt.tp, "pp": rt.pp, "vpp": rt.vpp,
                "distributed_optimizer": self.distributed_optimizer}

    # ------------------------------------------------------------------ saving
    def save(self, step: int, extra: Optional[dict] = None,
             stopping: bool = False) -> Optional[Path]:
        """Collective: write a complete checkpoint of ``step`` atomically; with ``stopping``,
        also the ``STOPPED`` marker, before the last barrier (no rank exits before it exists)."""
        if self.save_dir is None:
            return None
        from megatron.core import dist_checkpointing

        from megatron_sega.checkpoint.finite import refuse_nonfinite_weights

        refuse_nonfinite_weights(self.chunks, step, self.runtime.device)

        optimizer, iterator = self.optimizer, self.iterator
        final = self.save_dir / step_dir_name(step)
        tmp = self.save_dir / f"{TMP_PREFIX}{step_dir_name(step)}"
        model_dir = tmp / MODEL_OPTIM_DIR
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            model_dir.mkdir(parents=True)
            (tmp / RNG_DIR).mkdir()
        dist.barrier()
        _in_process_write_results()
        model = unwrap(self.chunks[0])
        state = sharded_model_state(self.chunks)  # 'model', or 'model0', 'model1'... under VPP
        # Adam's state exists from the first step on; a checkpoint taken before it (e.g. right
        # after a --no-load-optim resume) holds the model only.
        with_optim = torch.tensor([int(optimizer is not None and _has_state(optimizer))],
                                  device=self.runtime.device)
        dist.all_reduce(with_optim, op=dist.ReduceOp.MAX)  # every rank saves the same entries
        with_optim = bool(with_optim.item())
        if with_optim:
            state["optimizer"] = optimizer.sharded_state_dict(dict(state),
                                                              metadata=_OPTIM_SHARDING)
        dist_checkpointing.save(state, str(model_dir), content_metadata=_OPTIM_SHARDING)
        torch.save(_rng_state(), tmp / RNG_DIR / rng_file_name(self.runtime.rank))
        dist.barrier()
        if self.is_main:
            write_info(model_dir, CheckpointInfo(
                spec=self.spec, padded_vocab_size=int(model.vocab_size),
                dtype=dtype_name(model.config.params_dtype)))
            train_state = {
                "stage": self.stage, "step": step,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "iterator": iterator.state_dict() if iterator is not None else None,
                "optimizer_state": with_optim, **self._layout(), "config": self.run_config,
                **(extra or {}),
            }
            _write_synced(tmp / TRAIN_STATE_FILE, json.dumps(train_state, indent=1))
            self.tokenizer.save(model_dir / TOKENIZER_DIR)
            _write_synced(tmp / COMPLETE_MARKER, "ok\n")
            if final.exists():  # a re-save of this step: the previous checkpoint still exists
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.save_dir / f".{LATEST_FILE}.tmp"
            _write_synced(pointer, final.name + "\n")
            os.replace(pointer, self.save_dir / LATEST_FILE)
            self._prune(final)
            if stopping:
                _write_synced(self.save_dir / STOP_MARKER, json.dumps(
                    {"stage": self.stage, "step": step, "checkpoint": str(final)}) + "\n")
        dist.barrier()
        self.print(f"saved checkpoint {final}")
        return final

    def _prune(self, current: Path) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of killed saves."""
        keep = max(self.config.keep_last, 1)
        complete = sorted(p for p in self.save_dir.glob(STEP_GLOB)
                          if (p / COMPLETE_MARKER).is_file())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.save_dir.glob(TMP_PREFIX + STEP_GLOB):
            if stale.name != f"{TMP_PREFIX}{current.name}":
                shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    def _resume_path(self) -> Optional[Path]:
        resume = self.config.resume
        if resume in (None, "none"):
            return None
        if resume == "auto":
            return find_latest(self.save_dir) if self.save_dir else None
        path = Path(resume)
        if not (path / COMPLETE_MARKER).is_file() and any(path.glob(STEP_GLOB)):
            path = find_latest(path) or path  # a save directory: its newest complete checkpoint
        if not (path / COMPLETE_MARKER).is_file():
            raise CheckpointError(f"checkpoint.resume = {resume}: {path} is not a complete "
                                  f"checkpoint (no {COMPLETE_MARKER} marker)")
        return path

    def resume(self) -> int:
        """Load the checkpoint chosen by ``checkpoint.resume``; return the step to start from."""
        path = self._resume_path()
        if path is None:
            return 0
        from megatron.core import dist_checkpointing

        optimizer = self.optimizer
        model_dir = path / MODEL_OPTIM_DIR
        train_state = _read_train_state(path)
        if train_state.get("stage") != self.stage:
            raise CheckpointError(f"{path} is a '{train_state.get('stage')}' checkpoint; this is "
                                  f"the '{self.stage}' stage (use model.load to start from it)")
        model = unwrap(self.chunks[0])
        check_compatible(read_info(model_dir), self.spec, int(model.vocab_size), str(path))
        load_optim = self.config.load_optim and optimizer is not None
        if load_optim and not train_state.get("optimizer_state", True):
            load_optim = False
            self.print(f"note: {path} holds no optimizer state (saved before the first step)")
        elif load_optim:
            self._check_optimizer_layout(path, train_state)
        wanted = sharded_model_state(self.chunks)
        state = dict(wanted)
        if load_optim:
            _ensure_optimizer_state(optimizer)
            state["optimizer"] = optimizer.sharded_state_dict(wanted, is_loading=True,
                                                              metadata=_OPTIM_SHARDING)
        with safe_loading(model_dir):
            loaded = dist_checkpointing.load(state, str(model_dir))
        load_model_state(self.chunks, wanted, loaded)
        if load_optim:
            with torch.no_grad():  # fp32 main params are views of the (grad-requiring) params
                optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer)
        elif optimizer is not None:
            optimizer.reload_model_params()  # fresh optimizer state around the loaded weights
            if not self.config.load_optim:
                self.print(f"note: {path}: optimizer state not loaded "
                           "(checkpoint.load_optim=false); Adam moments restart from zero")
        if self.scheduler is not None and train_state.get("scheduler"):
            self.scheduler.load_state_dict(train_state["scheduler"])
        if self.iterator is not None and train_state.get("iterator"):
            self.iterator.load_state_dict(train_state["iterator"])
        self._restore_rng(path, train_state)
        self.print(f"resumed from {path} at step {train_state['step']}")
        self.extra = {k: v for k, v in train_state.items()
                      if k not in ("scheduler", "iterator", "config")}
        return int(train_state["step"])

    def _check_optimizer_layout(self, path: Path, train_state: dict) -> None:
        here = self._layout()
        saved_tp_pp = (train_state.get("tp"), train_state.get("pp"), train_state.get("vpp"))
        if saved_tp_pp != (here["tp"], here["pp"], here["vpp"]):
            raise CheckpointError(
                f"{path}: the optimizer state was saved at tp={saved_tp_pp[0]} pp={saved_tp_pp[1]} "
                f"vpp={saved_tp_pp[2]} and cannot be loaded at tp={here['tp']} pp={here['pp']} "
                f"vpp={here['vpp']} (the distributed optimizer's checkpoint format reshards "
                "across data parallelism only). Resume with --no-load-optim "
                "(checkpoint.load_optim=false) to load the model weights, LR schedule and data "
                "position with a fresh optimizer state, or keep the same parallel.tp / "
                "parallel.pp / parallel.vpp")
        saved_dist = train_state.get("distributed_optimizer", here["distributed_optimizer"])
        if saved_dist != here["distributed_optimizer"]:
            raise CheckpointError(
                f"{path}: the optimizer state was saved with parallel.distributed_optimizer="
                f"{saved_dist}; this run has {here['distributed_optimizer']}. Use the same "
                "setting or resume with --no-load-optim (checkpoint.load_optim=false)")

    def _restore_rng(self, path: Path, train_state: dict) -> None:
        here = self._layout()
        same = all(train_state.get(k) == here[k] for k in ("world_size", "tp", "pp"))
        rng_file = path / RNG_DIR / rng_file_name(self.runtime.rank)
        if same and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            self.print(f"note: resuming {path} at another layout (tp/pp/world "
                       f"{train_state.get('tp')}/{train_state.get('pp')}/"
                       f"{train_state.get('world_size')} -> {here['tp']}/{here['pp']}/"
                       f"{here['world_size']}); RNG states restart")

    # ------------------------------------------------------------------ loop hooks
    def should_stop(self, step: int, total: int) -> bool:
        """Save on the interval; on SIGTERM/SIGUSR1 save, mark the stop and tell the loop to
        stop (unless ``step`` is the last one: then the stage just finishes)."""
        if self.save_dir is None:
            return False
        flag = torch.tensor([int(stop.requested())], device=self.runtime.device)
        dist.all_reduce(flag)  # every rank must agree to save together
        if int(flag.item()) and step < total:
            self.print(f"signal received: saving step {step} and stopping")
            stop.mark_stopped(self.save(step, stopping=True))
            self.stopped = True
            self.print(f"stopped at step {step} of {total}; run the same command "
                       f"again to resume (exit code {RESUME_EXIT_CODE})")
            return True
        interval = self.config.save_interval
        if interval and step % interval == 0 and step < total:
            self.save(step)
        return False

    def finalize(self, step: int) -> None:
        """Save the final step unless it is already the newest checkpoint (or a signal saved)."""
        if self.save_dir is None or self.stopped:
            return
        if find_latest(self.save_dir, warn=False) != self.save_dir / step_dir_name(step):
            self.save(step)


def _read_train_state(path: Path) -> dict:
    try:
        state = json.loads((path / TRAIN_STATE_FILE).read_text())
        int(state["step"])
        return state
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}/{TRAIN_STATE_FILE}: unreadable "
                              f"({type(err).__name__}: {err})") from None


def _has_state(optimizer) -> bool:
    return any(getattr(getattr(opt, "optimizer", None), "state", None)
               for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def _ensure_optimizer_state(optimizer) -> None:
    """The distributed optimizer can describe its state for loading only once that state exists
    (Adam creates it lazily): fill it with placeholders that the load overwrites, as
    Megatron-Core itself does for its other checkpoint formats."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own torch-Adam ``step`` tensor holding the saved step count.

    Megatron's distributed optimizer (``dp_reshardable``, torch Adam) stores the step count in
    the param groups; on load it first sets one step tensor *shared* by all parameters, then
    overwrites it with the loading optimizer's own (placeholder) step, which is not part of the
    checkpoint. Left alone, Adam's bias correction after a resume would use the placeholder step
    and, the tensor being shared, advance it once per parameter per iteration."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    old = state["step"]
                    state["step"] = torch.tensor(float(group["step"]), dtype=old.dtype,
                                                 device=old.device)


def _in_process_write_results() -> None:
    """Megatron's synchronous torch_dist save passes its write results through a
    ``multiprocessing.Manager`` queue: a helper *process*, spawned at the first save, in our
    process group. A preemption SIGTERM sent to the group (SLURM, a terminal) kills it, and the
    emergency save then dies with BrokenPipeError. The writes run in this process's threads, so
    an ordinary queue serves (and no process is spawned)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", queue.Queue()) is None:
        filesystem_async._results_queue = queue.Queue()


def _write_synced(path: Path, text: str) -> None:
    """Write a small file and fsync it, so a marker never survives a crash that its data did not."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
