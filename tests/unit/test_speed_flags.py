"""Issue 20 item 8: the GPU fusions and ``deallocate_pipeline_outputs`` follow the device and the
kernels present; on CPU every flag stays off, as before."""

from types import SimpleNamespace

import pytest
import torch

from megatron_sega.models import builder, preset

FLAGS = ("bias_activation_fusion", "gradient_accumulation_fusion", "apply_rope_fusion",
         "deallocate_pipeline_outputs")


@pytest.mark.parametrize("on_gpu, te, wgrad, expected", [
    (False, True, True, (False, False, False, False)),  # CPU: nothing, whatever imports
    (True, False, False, (True, False, False, True)),   # bare GPU: Megatron's own SwiGLU kernel
    (True, True, False, (True, False, True, True)),     # + TE: fused RoPE
    (True, False, True, (True, True, False, True)),     # + Apex wgrad kernel
    (True, True, True, (True, True, True, True)),
])
def test_decision_table(on_gpu, te, wgrad, expected):
    assert builder.speed_flags(on_gpu, te, wgrad) == dict(zip(FLAGS, expected))


def _config(monkeypatch, device: str, te: bool, wgrad: bool):
    monkeypatch.setattr(builder, "have_transformer_engine", lambda: te)
    monkeypatch.setattr(builder, "have_fused_wgrad_kernel", lambda: wgrad)
    runtime = SimpleNamespace(device=torch.device(device), tp=1, pp=1, vpp=None)
    return builder.transformer_config(preset("tiny"), runtime)


def test_transformer_config_sets_the_flags_by_device(monkeypatch):
    cpu = _config(monkeypatch, "cpu", te=True, wgrad=True)
    assert not any(getattr(cpu, flag) for flag in FLAGS)
    gpu = _config(monkeypatch, "cuda", te=False, wgrad=True)  # TE left out: it is not installed
    assert (gpu.bias_activation_fusion and gpu.gradient_accumulation_fusion
            and gpu.deallocate_pipeline_outputs and not gpu.apply_rope_fusion)


def test_fused_wgrad_probe_is_megatrons_own_check():
    from megatron.core.tensor_parallel import layers

    assert builder.have_fused_wgrad_kernel() == layers._grad_accum_fusion_available
