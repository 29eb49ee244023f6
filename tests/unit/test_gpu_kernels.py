"""GPU checks of issue 20 items 5-7 (skipped without CUDA; run by tools/gpu_check.sh): training
and the sampler reach fused SDPA kernels with GQA (the math kernel disabled, a call that needs it
raises), and the sampler's KV cache is freed when ``generate`` returns. The CPU tests of the
same logic: tests/unit/test_attention_kernels.py."""

import pytest
import torch

pytestmark = pytest.mark.gpu

FUSED = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


@pytest.fixture(scope="module")
def gpu_runtime():
    from megatron_sega import runtime

    return runtime.setup(1, 1, device="cuda")


def _sdpa_model(rt):
    """bf16, local layers with SDPA, GQA 8 query / 4 key-value heads of 64 dims."""
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models import preset
    from megatron_sega.models.builder import build_model
    from megatron_sega.models.init import random_full_state_dict

    spec = preset("tiny", vocab_size=1000, hidden_size=512, ffn_hidden_size=1408,
                  num_attention_heads=8, num_query_groups=4)
    model = build_model(spec, rt, dtype=torch.bfloat16, attention="sdpa", use_te=False)
    full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=0, dtype=torch.bfloat16)
    load_full_state_dict(model, {k: v.cuda() for k, v in full.items()}, 1, 0)
    return spec, model


def _only(*names):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def test_training_forward_and_backward_run_on_flash_with_gqa(gpu_runtime):
    from megatron_sega.training.engine import training_mask

    _, model = _sdpa_model(gpu_runtime)
    tokens = torch.randint(0, 1000, (2, 512), device="cuda")
    positions = torch.arange(512, device="cuda")[None].expand(2, -1)
    mask = training_mask([model], 512, "cuda")
    assert mask is None
    core = model.decoder.layers[0].self_attention.core_attention
    q, k, v = (torch.randn(512, 2, heads, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for heads in (8, 4, 4))
    with _only("FLASH_ATTENTION"):
        with torch.no_grad():
            logits = model(tokens, positions, mask)
        core(q, k, v, mask).float().square().mean().backward()  # [s, b, heads * dim]
    assert torch.isfinite(logits).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_sampler_prefill_and_decode_avoid_the_math_kernel(gpu_runtime):
    from megatron_sega.sampling import Sampler, SamplingParams
    from megatron_sega.sampling.decode import LeanForward

    spec, model = _sdpa_model(gpu_runtime)
    sampler = Sampler(model, gpu_runtime, spec.vocab_size, pad_id=0)
    assert isinstance(sampler.forwards[0], LeanForward)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    with _only(*FUSED):
        equal = sampler.generate([[5, 6, 7, 8]] * 4, params)  # unpadded prefill: flash
        mixed = sampler.generate([[5, 6, 7, 8], [9, 10], [11], [12, 13, 14]], params)
    assert equal.lengths.min() >= 1 and mixed.lengths.min() >= 1


def test_kv_cache_is_freed_when_generate_returns(gpu_runtime):
    from megatron_sega.sampling import Sampler, SamplingParams

    spec, model = _sdpa_model(gpu_runtime)
    sampler = Sampler(model, gpu_runtime, spec.vocab_size, pad_id=0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sampler.generate([[5, 6, 7, 8]] * 64, SamplingParams(temperature=0.0, max_new_tokens=64))
    torch.cuda.synchronize()
    cache = 64 * 68 * sampler.kv_bytes_per_token
    assert torch.cuda.max_memory_allocated() - before >= cache  # it was allocated
    assert torch.cuda.memory_allocated() - before < cache / 8, "the KV cache outlived generate"
