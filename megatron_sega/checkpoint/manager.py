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

Ownership and agreement (rules in :mod:`megatron_sega.checkpoint.retention`). Each checkpoint
records its run's ``run_id`` (new at a fresh start, carried on by a resume): ``keep_last`` prunes
only this run's checkpoints, and a start that would collide with another run's checkpoint is
refused. Rank 0 alone decides where the run starts and whether the final step still needs a
save, and broadcasts it; a save directory that some rank cannot see is refused. On resume the
current config's LR schedule wins over the checkpoint's (the differences are printed).

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
import queue
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_sega.checkpoint import stop
from megatron_sega.checkpoint.finite import refuse_nonfinite_weights
from megatron_sega.checkpoint.mcore import (
    CheckpointInfo, adapter_state, check_adapters, check_base, check_compatible, dtype_name,
    load_model_state, lora_base, lora_info, read_info, sharded_model_state, unwrap, write_info,
)
from megatron_sega.checkpoint.names import (
    COMPLETE_MARKER, MODEL_OPTIM_DIR, RNG_DIR, STEP_GLOB, STOP_MARKER, TMP_PREFIX,
    TOKENIZER_DIR, TRAIN_STATE_FILE, rng_file_name, step_dir_name,
)
from megatron_sega.checkpoint.retention import (
    conflicting_checkpoints, find_latest, is_complete, mark_owner,
    point_latest, prune, publish, run_id_of, write_synced,
)
from megatron_sega.checkpoint.safe_loading import safe_loading
from megatron_sega.checkpoint.stop import RESUME_EXIT_CODE
from megatron_sega.errors import CheckpointError

_OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


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
    section (save_dir, resume, save_interval, keep_last, load_optim).

    ``lora_base``: for a LoRA run, the record of its frozen base (``path``, ``fingerprint``: see
    ``checkpoint.fingerprint``). Its checkpoints then hold the adapters and their optimizer
    state only, and point at that base; resume refuses a base whose fingerprint changed."""

    def __init__(self, config, stage: str, *, chunks: list, optimizer, scheduler, iterator,
                 runtime, spec, tokenizer, run_config: dict, distributed_optimizer: bool,
                 lora_base: Optional[dict] = None):
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
        self.lora_base = lora_base
        self.save_dir = Path(config.save_dir) if config.save_dir else None
        self.stopped = False
        self.extra: dict = {}
        # This run's identity (see checkpoint.retention): set by resume(), new or inherited.
        self.run_id: Optional[str] = None
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

        refuse_nonfinite_weights(self.chunks, step, self.runtime.device)
        optimizer, iterator = self.optimizer, self.iterator
        final = self.save_dir / step_dir_name(step)
        tmp = self.save_dir / f"{TMP_PREFIX}{step_dir_name(step)}"
        model_dir = tmp / MODEL_OPTIM_DIR
        if self.run_id is None:  # a library caller that saves without resume()
            self.run_id = _broadcast_from_main(uuid.uuid4().hex, self.runtime)
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            model_dir.mkdir(parents=True)
            (tmp / RNG_DIR).mkdir()
            mark_owner(tmp, self.run_id)
        dist.barrier()
        _in_process_write_results()
        model = unwrap(self.chunks[0])
        state = sharded_model_state(self.chunks)  # 'model', or 'model0', 'model1'... under VPP
        if self.lora_base is not None:  # the frozen base is in its own checkpoint already
            state = adapter_state(state)
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
                dtype=dtype_name(model.config.params_dtype), lora=self._lora_record(model)))
            train_state = {
                "stage": self.stage, "step": step, "run_id": self.run_id,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "iterator": iterator.state_dict() if iterator is not None else None,
                "optimizer_state": with_optim, **self._layout(), "config": self.run_config,
                **(extra or {}),
            }
            write_synced(tmp / TRAIN_STATE_FILE, json.dumps(train_state, indent=1))
            self.tokenizer.save(model_dir / TOKENIZER_DIR)
            write_synced(tmp / COMPLETE_MARKER, "ok\n")
            publish(tmp, final)
            prune(self.save_dir, self.run_id, self.config.keep_last, final)
            if stopping:
                write_synced(self.save_dir / STOP_MARKER, json.dumps(
                    {"stage": self.stage, "step": step, "checkpoint": str(final)}) + "\n")
        dist.barrier()
        self.print(f"saved checkpoint {final}")
        return final

    def _lora_record(self, model) -> Optional[dict]:
        lora = lora_info(model)
        if lora is not None and self.lora_base is not None:
            lora["base"] = self.lora_base
        return lora

    # ------------------------------------------------------------------ loading
    def _resume_path(self) -> Optional[Path]:
        resume = self.config.resume
        if resume in (None, "none"):
            return None
        if resume == "auto":
            return find_latest(self.save_dir) if self.save_dir else None
        path = Path(resume)
        if not is_complete(path) and any(path.glob(STEP_GLOB)):
            path = find_latest(path) or path  # a save directory: its newest complete checkpoint
        if not is_complete(path):
            raise CheckpointError(f"checkpoint.resume = {resume}: {path} is not a complete "
                                  f"checkpoint (no {COMPLETE_MARKER} marker)")
        return path

    def _decide_start(self) -> dict:
        """Rank 0's choice of where this run starts (checked here, on rank 0 only): the checkpoint
        to resume (or None), this run's ``run_id`` and a ``probe`` file that every rank must see.
        A user error becomes ``{"error": message}``, raised by every rank together."""
        try:
            path = self._resume_path()
            start = int(_read_train_state(path)["step"]) if path is not None else 0
            run_id = (run_id_of(path) if path is not None else None) or uuid.uuid4().hex
            probe = None
            if self.save_dir is not None:
                clashes = conflicting_checkpoints(self.save_dir, start, path)
                if clashes:
                    where = f"from {path}" if path is not None else "without resume"
                    raise CheckpointError(
                        f"checkpoint.save_dir = {self.save_dir} holds {clashes[-1].name}, a "
                        f"checkpoint of another run at or after this run's start (step {start}, "
                        f"{where}); its saves would replace that run's. Use a new "
                        "checkpoint.save_dir, or checkpoint.resume=auto to continue the latest")
                self.save_dir.mkdir(parents=True, exist_ok=True)
                probe = f".probe_{uuid.uuid4().hex}"
                write_synced(self.save_dir / probe, run_id + "\n")
            return {"path": None if path is None else str(path), "run_id": run_id,
                    "probe": probe, "error": None}
        except (CheckpointError, OSError) as err:
            return {"error": str(err)}

    def _agree_on_start(self) -> Optional[Path]:
        """Collective: every rank takes rank 0's decision (``_decide_start``), so that a save
        directory listed differently on different nodes cannot split the run; a save directory
        that some rank cannot see (node-local scratch) is refused on every rank."""
        decision = _broadcast_from_main(self._decide_start() if self.is_main else None,
                                        self.runtime)
        if decision["error"]:
            raise CheckpointError(decision["error"])
        self.run_id = decision["run_id"]
        if decision["probe"] is not None:
            probe = self.save_dir / decision["probe"]
            try:
                seen = probe.read_text().strip() == self.run_id
            except OSError:
                seen = False
            blind = _ranks_where(not seen, self.runtime)
            if self.is_main:
                probe.unlink(missing_ok=True)
            if blind:
                raise CheckpointError(
                    f"checkpoint.save_dir = {self.save_dir} is not the same directory on every "
                    f"rank (rank(s) {', '.join(map(str, blind[:8]))} cannot see a file that rank 0 "
                    "wrote there: node-local scratch?); put checkpoint.save_dir on a file system "
                    "that every node shares")
        return Path(decision["path"]) if decision["path"] is not None else None

    def resume(self) -> int:
        """Collective: agree on where this run starts (rank 0 decides, see ``_agree_on_start``),
        load the checkpoint chosen by ``checkpoint.resume`` if any; return the step to start
        from. The current config's LR schedule wins over the checkpoint's."""
        path = self._agree_on_start()
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
        info = read_info(model_dir)
        check_compatible(info, self.spec, int(model.vocab_size), str(path))
        check_adapters(self.chunks, model_dir, info)
        base = lora_base(info)
        if base is not None:  # adapters only: they must meet the base they trained on
            check_base(self.chunks, base, path, fingerprint=(self.lora_base or {}).get(
                "fingerprint"))
        load_optim = self.config.load_optim and optimizer is not None
        if load_optim and not train_state.get("optimizer_state", True):
            load_optim = False
            self.print(f"note: {path} holds no optimizer state (saved before the first step)")
        elif load_optim:
            self._check_optimizer_layout(path, train_state)
        wanted = sharded_model_state(self.chunks, loading_from=model_dir)
        if base is not None:
            wanted = adapter_state(wanted)
        state = dict(wanted)
        if load_optim:
            _ensure_optimizer_state(optimizer)
            state["optimizer"] = optimizer.sharded_state_dict(wanted, is_loading=True,
                                                              metadata=_OPTIM_SHARDING)
        with safe_loading(model_dir):
            loaded = dist_checkpointing.load(state, str(model_dir))
        load_model_state(self.chunks, wanted, loaded, adapters_only=base is not None)
        if load_optim:
            _retarget_lr_bounds(loaded["optimizer"], optimizer)
            with torch.no_grad():  # fp32 main params are views of the (grad-requiring) params
                optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer)
        elif optimizer is not None:
            optimizer.reload_model_params()  # fresh optimizer state around the loaded weights
            if not self.config.load_optim:
                self.print(f"note: {path}: optimizer state not loaded "
                           "(checkpoint.load_optim=false); Adam moments restart from zero")
        if self.scheduler is not None and train_state.get("scheduler"):
            self._load_schedule(path, train_state["scheduler"])
        if self.iterator is not None and train_state.get("iterator"):
            self.iterator.load_state_dict(train_state["iterator"])
        self._restore_rng(path, train_state)
        self.print(f"resumed from {path} at step {train_state['step']}")
        self.extra = {k: v for k, v in train_state.items()
                      if k not in ("scheduler", "iterator", "config")}
        return int(train_state["step"])

    def _load_schedule(self, path: Path, saved: dict) -> None:
        """The checkpoint's position in the LR schedule (its step count) on this run's schedule:
        the config wins (lr, min_lr, warmup, total steps), and each value that differs from the
        checkpoint's is printed."""
        current = self.scheduler.state_dict()
        changed = [f"{key} {saved[key]} -> {value}" for key, value in current.items()
                   if key != "num_steps" and key in saved and saved[key] != value]
        if changed:
            self.print(f"note: {path}: the LR schedule of this run's config replaces the "
                       f"checkpoint's: {'; '.join(changed)}")
        self.scheduler.load_state_dict({**saved, **current, "num_steps": saved["num_steps"]})

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
        """Collective: make ``latest`` name a complete checkpoint of ``step``, this run's final
        step: save it, unless this run already has (or a signal saved). Rank 0 decides."""
        if self.save_dir is None or self.stopped:
            return
        final = self.save_dir / step_dir_name(step)
        have = self.is_main and is_complete(final) and run_id_of(final) == self.run_id
        if _broadcast_from_main(have, self.runtime):
            if self.is_main:
                point_latest(self.save_dir, final)
            dist.barrier()
        else:
            self.save(step)


def _read_train_state(path: Path) -> dict:
    try:
        state = json.loads((path / TRAIN_STATE_FILE).read_text())
        int(state["step"])
        return state
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}/{TRAIN_STATE_FILE}: unreadable "
                              f"({type(err).__name__}: {err})") from None


def _retarget_lr_bounds(state: dict, optimizer) -> None:
    """Give the saved param groups this run's ``max_lr`` / ``min_lr`` (the config's schedule
    wins). Megatron's optimizers keep both per group, match saved groups to their own by them,
    and a load would otherwise bring the checkpoint's back. Every group shares one pair here (no
    per-group learning rates are configured); anything else is left to Megatron's matching."""
    bounds = {(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups}
    if len(bounds) != 1:
        return
    (max_lr, min_lr), = bounds

    def walk(node) -> None:
        if isinstance(node, dict):
            groups = node.get("param_groups")
            for group in groups if isinstance(groups, list) else ():
                if isinstance(group, dict) and "max_lr" in group:
                    group.update(max_lr=max_lr, min_lr=min_lr)
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            return
        for child in children:
            walk(child)

    walk(state)


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


def _broadcast_from_main(value, runtime):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, device=torch.device(runtime.device))
    return box[0]


def _ranks_where(condition: bool, runtime) -> list[int]:
    """The global ranks where ``condition`` holds (one all-gather of a flag)."""
    flags = [torch.zeros(1, dtype=torch.int32, device=runtime.device)
             for _ in range(dist.get_world_size())]
    dist.all_gather(flags, torch.tensor([int(condition)], dtype=torch.int32,
                                        device=runtime.device))
    return [rank for rank, flag in enumerate(flags) if int(flag.item())]
