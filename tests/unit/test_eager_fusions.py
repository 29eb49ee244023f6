"""Without CUDA, Megatron-Core is imported without building torch.compile wrappers (the start-up
cost of every CPU process); with CUDA its fusions compile as usual. Each case runs in a fresh
interpreter, since the hook acts on the first import of megatron.core."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli_run import REPO

PROBE = """
import json, sys, torch
real_compile = torch.compile
if {cuda}:
    torch.cuda.is_available = lambda: True  # what the hook asks; nothing here touches a GPU
import megatron_sega
import megatron.core.tensor_parallel, megatron.core.models.gpt
from megatron.core import jit
from megatron.core.fusions import fused_bias_swiglu
print(json.dumps({{
    "compile_restored": torch.compile is real_compile,
    "jit_fuser": jit.jit_fuser.__name__,
    "inductor_compile_imported": "torch._inductor.compile_fx" in sys.modules,
    "swiglu_compiled": hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable"),
}}))
"""


def _probe(cuda: bool) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE.format(cuda=cuda)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
                                 "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_cuda_the_fusions_stay_eager_and_torch_compile_is_restored():
    got = _probe(cuda=False)
    assert got == {"compile_restored": True, "jit_fuser": "noop_decorator",
                   "inductor_compile_imported": False, "swiglu_compiled": False}, got


def test_with_cuda_megatron_compiles_its_fusions_as_usual():
    got = _probe(cuda=True)
    assert got["compile_restored"] and got["jit_fuser"] == "compile", got
    assert got["inductor_compile_imported"] and got["swiglu_compiled"], got
