"""Megatron-Core imports without building ``torch.compile`` wrappers on a machine without CUDA.

Megatron-Core decorates about ten functions with ``torch.compile`` at import time: its fused
kernels through ``megatron.core.jit.jit_fuser`` (bias-GeLU, bias-SwiGLU, ...), and a few more
directly (the MoE router's top-k). Building those wrappers, before any of them runs, costs about
2.5 s of import time and 4.5 s of CPU per process here, in every test, demo and CPU run. They
are CUDA fusions: on CPU they would compile C++ through Inductor on their first call.

So when ``megatron.core`` is first imported and CUDA is not available, this hook imports it with
``torch.compile`` standing in as a decorator that returns the function unchanged, puts the real
``torch.compile`` back right after, and calls Megatron's own ``disable_jit_fuser()`` so that later
imports agree. The functions are the same and run eagerly; the math does not change. With CUDA the
hook does nothing and the fusions compile as usual.

``install()`` runs from ``megatron_sega/__init__.py``; it does nothing once Megatron-Core is
imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

PACKAGE = "megatron.core"


def _eager(fn=None, /, **_options):
    """``torch.compile``'s two call forms, ``@torch.compile`` and ``@torch.compile(...)``."""
    return fn if fn is not None else (lambda f: f)


class _EagerWithoutCuda(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != PACKAGE:
            return None
        sys.meta_path.remove(self)  # once: the normal finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_package = spec.loader.exec_module

        def run_eagerly(module):
            import torch

            if torch.cuda.is_available():
                return run_package(module)
            compile_ = torch.compile
            torch.compile = _eager
            try:
                run_package(module)
            finally:
                torch.compile = compile_
            jit = sys.modules.get(PACKAGE + ".jit")
            if jit is not None and hasattr(jit, "disable_jit_fuser"):
                jit.disable_jit_fuser()

        spec.loader.exec_module = run_eagerly
        return spec


def install() -> None:
    if PACKAGE in sys.modules or any(isinstance(f, _EagerWithoutCuda) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _EagerWithoutCuda())
