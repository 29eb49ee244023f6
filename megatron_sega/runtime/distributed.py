"""torch.distributed and Megatron-Core model-parallel initialisation.

One entry point, :func:`setup`, chooses the device (CUDA+NCCL when a GPU is visible, else
CPU+gloo with the CPU bridge), initialises torch.distributed from torchrun or SLURM variables
(a single process needs neither), validates the parallel sizes *before* anything is allocated and
initialises Megatron-Core's TP/PP/DP groups. The groups are returned in a :class:`Runtime` that the
rest of the code receives as an argument.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sega.errors import ParallelConfigError
from megatron_sega.runtime import cpu_bridge


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and the process groups it talks through."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    # Ranks holding the same model shard across all data-parallel replicas (DP x CP).
    mp_group: dist.ProcessGroup
    vpp: Optional[int] = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


def validate_parallel_sizes(
    tp: int,
    pp: int,
    world_size: int,
    *,
    num_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    vpp: Optional[int] = None,
    sequence_parallel: bool = False,
    on_gpu: bool = True,
    transformer_engine: bool = True,
) -> int:
    """Check TP/PP against the world size and the model; return the data-parallel size.

    Every error names the numbers involved and the fix."""
    for name, value in (("tp", tp), ("pp", pp), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ParallelConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp) != 0:
        raise ParallelConfigError(
            f"tp({tp}) * pp({pp}) = {tp * pp} does not divide WORLD_SIZE({world_size}); "
            f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp"
        )
    if num_attention_heads is not None and num_attention_heads % tp != 0:
        raise ParallelConfigError(
            f"num_attention_heads({num_attention_heads}) is not divisible by tp({tp}); "
            f"choose a tp that divides {num_attention_heads}"
        )
    if num_query_groups is not None and num_query_groups % tp != 0:
        raise ParallelConfigError(
            f"num_query_groups({num_query_groups}) (key/value heads) is not divisible by tp({tp}); "
            f"choose a tp that divides {num_query_groups}"
        )
    stages = pp * (vpp or 1)
    if num_layers is not None and num_layers % stages != 0:
        what = f"pp({pp})" if not vpp else f"pp({pp}) * vpp({vpp}) = {stages}"
        raise ParallelConfigError(
            f"num_layers({num_layers}) is not divisible by {what}; "
            f"choose a pipeline size that divides the number of layers"
        )
    if vpp is not None:
        if not isinstance(vpp, int) or vpp < 2:
            raise ParallelConfigError(
                f"parallel.vpp must be an integer >= 2 (model chunks per pipeline stage), got "
                f"{vpp!r}; unset it for no virtual pipelining"
            )
        if pp < 2:
            raise ParallelConfigError(
                f"parallel.vpp={vpp} needs pp >= 2 (got pp={pp}); unset vpp or raise pp"
            )
    if sequence_parallel and not on_gpu:
        raise ParallelConfigError(
            "parallel.sequence_parallel is supported on GPU only; set it to false for CPU runs"
        )
    if sequence_parallel and not transformer_engine:
        raise ParallelConfigError(
            "parallel.sequence_parallel needs Transformer Engine (Megatron's torch norms refuse "
            "it), which is not installed; install it (pip install -e .[gpu]) or set it to false"
        )
    if sequence_parallel and tp == 1:
        raise ParallelConfigError("parallel.sequence_parallel needs tp > 1; set it to false")
    return world_size // (tp * pp)


def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports here."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def launch_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else SLURM (srun without torchrun), else 1."""
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    if rank is None or world is None:
        return 0, 1, 0
    return rank, world, local if local is not None else 0


def choose_device(device: Optional[str] = None) -> str:
    """'cuda' when a GPU is visible (or asked for), else 'cpu'."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParallelConfigError(
            "parallel.device = cuda but no GPU is visible on this machine; set "
            "parallel.device=cpu (or auto), or run where a GPU is visible"
        )
    if device not in ("cuda", "cpu"):
        raise ParallelConfigError(f"parallel.device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    return device


def _private_store_path() -> str:
    """A not-yet-existing file name for a lone process's rendezvous store, inside a fresh
    directory only this user can enter (``mkdtemp``: mode 0700), removed at exit. A name made
    by ``mkstemp`` and deleted for the store to recreate could be taken by another local user
    in between; a name inside a private directory cannot."""
    directory = tempfile.mkdtemp(prefix="megatron_sega_store_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return os.path.join(directory, "store")


def init_distributed(device: str, init_method: Optional[str] = None, timeout_minutes: int = 30):
    """Initialise torch.distributed once (no-op when already initialised)."""
    if dist.is_initialized():
        return
    rank, world, local_rank = launch_info()
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if init_method is None and world == 1 and "MASTER_ADDR" not in os.environ:
        init_method = f"file://{_private_store_path()}"
    if init_method is None and "MASTER_ADDR" in os.environ:
        init_method = "env://"
    if init_method is None:
        raise RuntimeError(
            f"RANK/WORLD_SIZE say this is rank {rank} of {world}, but MASTER_ADDR/MASTER_PORT are "
            "not set; launch with torchrun, or export MASTER_ADDR and MASTER_PORT for srun"
        )
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timeout)


def setup(
    tp: int = 1,
    pp: int = 1,
    *,
    device: Optional[str] = None,
    vpp: Optional[int] = None,
    sequence_parallel: bool = False,
    num_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    seed: int = 1234,
    init_method: Optional[str] = None,
) -> Runtime:
    """Validate sizes, initialise torch.distributed and Megatron's groups; return the Runtime."""
    from megatron.core import parallel_state, tensor_parallel

    device = choose_device(device)
    _, world, _ = (
        launch_info() if not dist.is_initialized() else (0, dist.get_world_size(), 0)
    )
    validate_parallel_sizes(
        tp, pp, world, num_layers=num_layers, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups, vpp=vpp, sequence_parallel=sequence_parallel,
        on_gpu=device == "cuda", transformer_engine=have_transformer_engine(),
    )
    if device == "cpu":
        cpu_bridge.apply()
    init_distributed(device, init_method)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        create_gloo_process_groups=device == "cuda",
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    local_rank = launch_info()[2]
    return Runtime(
        device=torch.device("cuda", torch.cuda.current_device()) if device == "cuda"
        else torch.device("cpu"),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        dp=dist.get_world_size() // (tp * pp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        mp_group=parallel_state.get_model_parallel_group(),
        vpp=vpp,
    )


def teardown() -> None:
    """Destroy Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank of ``group`` (default: the world) when ``flag`` is True on any of them.

    A decision that changes which collectives a rank runs next (skipping a step) must be taken
    by all ranks together, or the ranks that went on wait forever for the ones that did not."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item() > 0)
