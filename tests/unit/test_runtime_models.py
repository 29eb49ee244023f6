"""Parallel-size validation, the CPU bridge, Llama specs from presets and HF configs, SDPA."""

import json
import subprocess
import sys

import pytest
import torch

from megatron_sega.models import ModelConfigError, from_hf_config, preset, to_hf_config
from megatron_sega.runtime import ParallelConfigError, validate_parallel_sizes


@pytest.mark.parametrize("kwargs,message", [
    (dict(tp=2, pp=2, world_size=6), r"tp\(2\) \* pp\(2\) = 4 does not divide WORLD_SIZE\(6\)"),
    (dict(tp=3, pp=1, world_size=3, num_attention_heads=32),
     r"num_attention_heads\(32\) is not divisible by tp\(3\)"),
    (dict(tp=4, pp=1, world_size=4, num_attention_heads=32, num_query_groups=2),
     r"num_query_groups\(2\) .* is not divisible by tp\(4\)"),
    (dict(tp=1, pp=3, world_size=3, num_layers=32), r"num_layers\(32\) is not divisible by pp\(3\)"),
    (dict(tp=1, pp=2, world_size=2, num_layers=6, vpp=2),
     r"num_layers\(6\) is not divisible by pp\(2\) \* vpp\(2\) = 4"),
    (dict(tp=1, pp=1, world_size=1, vpp=2), r"parallel.vpp=2 needs pp >= 2"),
    (dict(tp=1, pp=2, world_size=2, vpp=1), r"parallel.vpp must be an integer >= 2"),
    (dict(tp=2, pp=1, world_size=2, sequence_parallel=True, on_gpu=False), r"GPU only"),
    (dict(tp=0, pp=1, world_size=1), r"parallel.tp must be a positive integer"),
])
def test_bad_parallel_sizes_name_the_fix(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        validate_parallel_sizes(**kwargs)


def test_valid_sizes_give_dp():
    assert validate_parallel_sizes(2, 2, 16, num_layers=32, num_attention_heads=32,
                                   num_query_groups=8) == 4
    assert validate_parallel_sizes(2, 2, 8, num_layers=32, vpp=4, on_gpu=True) == 2
    assert validate_parallel_sizes(1, 2, 2, num_layers=4, vpp=2, on_gpu=False) == 1


def test_cpu_bridge_is_idempotent_and_refuses_a_gpu():
    code = (
        "import torch\n"
        "from megatron_sega.runtime import cpu_bridge\n"
        "cpu_bridge.apply(); first = torch.cuda.current_device; cpu_bridge.apply()\n"
        "assert cpu_bridge.is_applied() and torch.cuda.current_device is first\n"
        "assert torch.cuda.current_device() == 'cpu'\n"
        "x = torch.zeros(2); assert x.cuda() is x\n"
        "from megatron.core.pipeline_parallel import schedules\n"
        "assert schedules.torch.zeros([], device='cuda').device.type == 'cpu'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    refuse = ("import torch\ntorch.cuda.is_available = lambda: True\n"
              "from megatron_sega.runtime import cpu_bridge\n"
              "try:\n    cpu_bridge.apply()\nexcept RuntimeError as e:\n    print('refused', e)\n")
    result = subprocess.run([sys.executable, "-c", refuse], capture_output=True, text=True,
                            timeout=120)
    assert "refused" in result.stdout and "CPU runs only" in result.stdout, result.stderr[-3000:]


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ModelConfigError, match=r"unknown model preset 'llama3-8c' \(did you mean "
                                               r"'llama3-8b'\?\); valid presets: llama2-7b, "):
        preset("llama3-8c")


def test_presets_have_the_published_shapes():
    assert (preset("llama3-8b").num_query_groups, preset("llama3-8b").ffn_hidden_size) == (8, 14336)
    assert preset("llama3.1-70b").rope_scaling.factor == 8.0
    assert preset("llama2-7b").num_query_groups == 32 and preset("llama2-7b").vocab_size == 32000


def _hf_config(**changes):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "rms_norm_eps": 1e-6,
              "rope_theta": 500000.0, "max_position_embeddings": 4096,
              "tie_word_embeddings": True}
    config.update(changes)
    return config


def test_hf_config_round_trip(tmp_path):
    raw = _hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 1024})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    spec = from_hf_config(tmp_path)
    assert (spec.num_query_groups, spec.kv_channels, spec.rms_norm_eps) == (2, 16, 1e-6)
    assert spec.tie_word_embeddings and spec.rope_scaling.original_max_position_embeddings == 1024
    assert from_hf_config(to_hf_config(spec)) == spec
    assert spec.padded_vocab_size(1) == spec.padded_vocab_size(8) == 1024


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "is not a Llama model"),
    ({"hidden_act": "gelu"}, "is not Llama's 'silu'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
])
def test_non_llama_configs_are_refused(tmp_path, changes, message):
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(**changes)))
    with pytest.raises(ModelConfigError, match=message):
        from_hf_config(tmp_path / "config.json")


def test_llama31_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_sega.models.builder import llama3_scaled_inv_freq
    from megatron_sega.models.spec import RopeScaling

    scaling = RopeScaling(8.0, 1.0, 4.0, 1024)
    raw = _hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**raw), "cpu")
    dim = 16
    base = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ours = llama3_scaled_inv_freq(base, scaling)
    torch.testing.assert_close(ours, hf_inv.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, base)  # the scaling did something at these sizes
