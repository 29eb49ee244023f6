"""GPU checks (skipped without CUDA; run by tools/gpu_check.sh): the CUDA path needs no bridge,
bf16 training runs, SDPA matches local attention, and KV-cached greedy decoding matches a
no-cache recompute."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_runtime():
    from megatron_sega import runtime
    from megatron_sega.runtime import cpu_bridge

    rt = runtime.setup(1, 1, device="cuda")
    assert not cpu_bridge.is_applied()
    return rt


def _model(rt, attention, dtype=torch.bfloat16):
    from megatron_sega.checkpoint.layout import load_full_state_dict, random_full_state_dict
    from megatron_sega.models import preset
    from megatron_sega.models.builder import build_model

    spec = preset("tiny", vocab_size=1000, hidden_size=256, ffn_hidden_size=704,
                  num_attention_heads=8, num_query_groups=4)
    model = build_model(spec, rt, dtype=dtype, attention=attention, use_te=False)
    full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=0, dtype=dtype)
    load_full_state_dict(model, {k: v.cuda() for k, v in full.items()}, 1, 0)
    return spec, model


def test_sdpa_matches_local_on_gpu(gpu_runtime):
    tokens = torch.randint(0, 1000, (2, 128), device="cuda")
    positions = torch.arange(128, device="cuda").unsqueeze(0).expand(2, -1)
    mask = torch.ones(1, 1, 128, 128, dtype=torch.bool, device="cuda").triu(1)
    out = {}
    for attention in ("local", "sdpa"):
        _, model = _model(gpu_runtime, attention, torch.float32)
        with torch.no_grad():
            out[attention] = model(tokens, positions, mask)
    assert (out["local"] - out["sdpa"]).abs().max().item() < 1e-3


def test_bf16_training_step_and_greedy_decoding(gpu_runtime):
    from megatron_sega.sampling import Sampler, SamplingParams

    spec, model = _model(gpu_runtime, "auto")
    sampler = Sampler(model, gpu_runtime, spec.vocab_size, pad_id=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    rollout = sampler.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    model.eval()
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(8):
            tok = torch.tensor([seq], device="cuda")
            n = tok.shape[1]
            mask = torch.ones(1, 1, n, n, dtype=torch.bool, device="cuda").triu(1)
            with torch.no_grad():
                logits = model(tok, torch.arange(n, device="cuda")[None], mask)
            seq.append(int(logits[0, -1, : spec.vocab_size].float().argmax()))
        assert rollout.response_ids[row].tolist() == seq[len(prompt):]
    model.train()
    tokens = torch.randint(0, 1000, (2, 64), device="cuda")
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool, device="cuda").triu(1)
    loss = model(tokens, torch.arange(64, device="cuda")[None].expand(2, -1), mask).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
