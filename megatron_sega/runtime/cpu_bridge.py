"""Run Megatron-Core on a machine without a GPU.

Megatron-Core assumes CUDA in a handful of places (see DESIGN.md, "Running Megatron-Core without a
GPU"). This module bridges exactly those places so that the model, the pipeline schedules, DDP, the
distributed optimizer, ``dist_checkpointing`` and the KV cache run on CPU with gloo:

* ``torch.cuda.current_device()`` used as a ``device=`` argument  -> returns ``"cpu"``;
* CUDA RNG get/set/seed (the tensor-parallel RNG tracker)         -> the CPU default generator;
* ``torch.cuda.synchronize`` / streams / events                    -> no-ops;
* literal ``device="cuda"`` in a few Megatron modules              -> a ``torch`` proxy in those
  modules that maps ``cuda`` to ``cpu`` for factory functions;
* ``tensor.cuda()``                                              -> the tensor itself;
* ``tensor.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers -> answered as if on CUDA,
  only while Megatron's optimizer builds its parameter groups.

It is applied only when no GPU is in use (``apply()`` refuses to run when CUDA is available),
and it is idempotent: calling ``apply()`` twice patches once. Nothing is patched on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any

import torch

_APPLIED = False

# Megatron modules that write a literal device="cuda" (or 'cuda') into tensor factories.
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.utils",
    "megatron.core.inference.contexts.static_context",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.validation",
)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "as_tensor",
              "zeros_like", "ones_like", "empty_like", "full_like")


def _cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):
        return "cpu"
    return device


class _TorchOnCPU(types.ModuleType):
    """A stand-in for the ``torch`` module inside one Megatron module: identical except that tensor
    factories given ``device='cuda'`` allocate on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)
            return factory
        return attr


class _NullStream:
    """Enough of ``torch.cuda.Stream``/``Event`` for Megatron's DDP on CPU: work is synchronous."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args) -> None:
        pass

    def wait_event(self, *args) -> None:
        pass

    def record_event(self, *args) -> "_NullStream":
        return _NullStream()

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _tensor_types_read_as_cuda():
    """While active, ``cpu_tensor.type()`` reports the CUDA type name (Megatron's optimizers
    dispatch on those names)."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not args and not kwargs:
            return _CUDA_TYPE_NAMES.get(result, result)
        return result

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _wrap_with_cuda_type_names(owner: Any, name: str) -> None:
    original = owner.__dict__.get(name, getattr(owner, name))
    func = original.__func__ if isinstance(original, (classmethod, types.MethodType)) else original

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _tensor_types_read_as_cuda():
            return func(*args, **kwargs)

    if isinstance(original, classmethod):
        setattr(owner, name, classmethod(wrapper))
    else:
        setattr(owner, name, wrapper)


def is_applied() -> bool:
    return _APPLIED


def apply() -> None:
    """Patch the CUDA-only spots of Megatron-Core so that it runs on CPU. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "cpu_bridge.apply() was called on a machine with a CUDA GPU; the bridge is for CPU runs "
            "only. Use runtime.setup(device='cuda') (the default when a GPU is visible)."
        )

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # Megatron moves buffers with tensor.cuda() (e.g. gathering the distributed optimizer's state
    # for a reshardable checkpoint); without a GPU the tensor stays where it is.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    proxy = _TorchOnCPU()
    for module_name in _MODULES_WITH_CUDA_LITERALS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = proxy

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    _wrap_with_cuda_type_names(DistributedOptimizer, "_build_model_and_main_param_groups")
    _wrap_with_cuda_type_names(DistributedOptimizer, "__init__")
    _wrap_with_cuda_type_names(Float16OptimizerWithFloat16Params, "__init__")

    # Gradient clipping asserts 'torch.cuda.FloatTensor' grads; it is imported by name.
    from megatron.core.optimizer import clip_grads, optimizer as optimizer_module

    for module in (clip_grads, optimizer_module):
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            _wrap_with_cuda_type_names(module, "clip_grad_by_total_norm_fp32")

    _APPLIED = True
