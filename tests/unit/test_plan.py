"""The planner (issue 23) against the real objects, on CPU.

- Activations: what a training forward saves for backward, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters left out), within
  15% of ``plan.memory.saved_activation_bytes``, on the tiny model and an 8B-shaped one (the real
  widths, layers cut), without recompute, with selective and with full recompute.
- The KV cache: the planner's bytes equal what the sampler's lean forward allocates.
- ``model.recompute``: equal losses and gradients with and without it.
- The command: the shipped 8B and 70B configs fit; bad input is one line and exit 2.
(Weights, gradients and optimizer state at TP/PP/DP 1 and 2: tests/distributed/test_plan_static.py.)
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sega import runtime
from megatron_sega.models import preset
from megatron_sega.models.builder import build_model
from megatron_sega.plan import Layout
from megatron_sega.plan import memory as mem

REPO = Path(__file__).resolve().parents[2]
LLAMA3_8B_CUT = dict(num_layers=2, vocab_size=512)  # real widths: 4096 / 14336 / 32 / 8 heads


def _saved_bytes(model, rows: int, seq: int) -> int:
    """Bytes a training forward saves for backward, each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(3, 300, (rows, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq).unsqueeze(0).expand(rows, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None)
    return sum(storages.values())


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("shape", ["tiny", "llama3-8b-cut"])
def test_activation_bytes_within_15_percent(shape, recompute):
    rt = runtime.setup(1, 1, device="cpu")
    spec = preset("tiny", vocab_size=300) if shape == "tiny" else \
        preset("llama3-8b", **LLAMA3_8B_CUT)
    rows, seq = (4, 64) if shape == "tiny" else (1, 32)
    model = build_model(spec, rt, use_te=False, recompute=recompute).train()
    measured = _saved_bytes(model, rows, seq)
    planned = mem.saved_activation_bytes(spec, Layout(1, 1, 1), rows, seq, bf16=False,
                                         recompute=recompute, last=True)
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


def test_recompute_drops_activations_as_planned():
    """Full recompute keeps about one hidden vector per layer and token; the planner says so."""
    spec = preset("llama3-8b", **LLAMA3_8B_CUT)
    none, full = (mem.layer_activation_elements(spec, 1, r) for r in ("none", "full"))
    assert full == spec.hidden_size and none > 20 * full


def test_kv_cache_bytes_equal_the_samplers_allocation():
    from megatron_sega.sampling.decode import LeanForward

    rt = runtime.setup(1, 1, device="cpu")
    spec = preset("tiny", vocab_size=300)
    for dtype in (torch.float32, torch.bfloat16):
        forward = LeanForward(build_model(spec, rt, use_te=False, dtype=dtype).eval(), None)
        forward.start(torch.zeros(3, 40, dtype=torch.bool), 40)
        allocated = sum(t.numel() * t.element_size() for pair in forward.cache for t in pair)
        assert allocated == mem.kv_cache_bytes(spec, 1, 1, 3, 40, dtype == torch.bfloat16)


def _loss_and_grads(recompute: str):
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict

    rt = runtime.setup(1, 1, device="cpu")
    spec = preset("tiny", vocab_size=300)
    model = build_model(spec, rt, use_te=False, recompute=recompute).train()
    load_full_state_dict(model, random_full_state_dict(spec, spec.padded_vocab_size(1), seed=2),
                         1, 0)
    tokens = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    logits = model(tokens, torch.arange(48).unsqueeze(0).expand(2, -1), None)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_gives_equal_losses_and_gradients():
    """fp32: recomputed layers redo the same ops on the same inputs, so the loss is bitwise
    equal and the gradients equal within 1e-6 (summation order in backward may differ)."""
    loss, grads = _loss_and_grads("none")
    for recompute in ("selective", "full"):
        other, other_grads = _loss_and_grads(recompute)
        assert other == loss, recompute
        for name, g in grads.items():
            assert (other_grads[name] - g).abs().max().item() <= 1e-6, (recompute, name)


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "megatron_sega.cli", "plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_plan_command_on_the_shipped_configs_and_bad_input():
    runs = {
        "8b": _plan("--config", "examples/configs/sega_llama3_8b.yaml", "--world-size", "8",
                    "--gpu", "a100-80g"),
        "70b": _plan("--config", "examples/configs/sega_llama3_70b.yaml", "--world-size", "32",
                     "--nodes", "4", "--gpu", "a100-80g"),
    }
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stdout, run.stderr)
        verdicts = [line for line in run.stdout.splitlines() if "headroom" in line]
        assert len(verdicts) == 3 and "NOT" not in run.stdout, (name, run.stdout)
    bad = {
        "kind": _plan("--config", "examples/configs/sega_llama3_8b.yaml", "--world-size", "8",
                      "--gpu", "v100"),
        "world": _plan("--config", "examples/configs/sega_llama3_8b.yaml", "--world-size", "12",
                       "--gpu", "h200"),
    }
    for name, run in bad.items():
        errors = [line for line in run.stderr.splitlines() if "error" in line]
        assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, \
            (name, run.stderr)
    assert "v100" in bad["kind"].stderr and "h100-80g" in bad["kind"].stderr
    assert "WORLD_SIZE(12)" in bad["world"].stderr
