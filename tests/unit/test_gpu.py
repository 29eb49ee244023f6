"""GPU checks (skipped without CUDA; run by tools/gpu_check.sh): the CUDA path needs no bridge,
bf16 training runs, SDPA matches local attention, and KV-cached greedy decoding matches a
no-cache recompute."""

import pytest
import torch

from megatron_sega.runtime import have_transformer_engine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_runtime():
    from megatron_sega import runtime
    from megatron_sega.runtime import cpu_bridge

    rt = runtime.setup(1, 1, device="cuda")
    assert not cpu_bridge.is_applied()
    return rt


def _model(rt, attention, dtype=torch.bfloat16):
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict
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


def _gpu_session(*overrides: str):
    from pathlib import Path

    from megatron_sega.config import load_config
    from megatron_sega.training.session import open_session

    repo = Path(__file__).resolve().parents[2]
    config = load_config(None, [
        "model.preset=tiny", "model.dtype=bf16", "parallel.device=cuda", "optim.lr=1e-3",
        f"data.train={repo}/examples/demo_data/train.jsonl", "data.max_seq_len=112",
        "sampling.max_new_tokens=16", "sega.k=4", "sega.micro_batch_size=8", *overrides])
    return open_session(config, train=True, total_steps=4)


def test_bf16_sft_and_sega_steps_on_megatrons_mixed_precision_path(gpu_runtime):
    """bf16 on the GPU as on CPU (tests/distributed/test_bf16.py): Float16Module, fp32 main
    params, an SFT step, then a SEGA step reusing its rollout whose second update starts at
    ratio 1 (an lr too small to move a bf16 weight). GPU only, not yet verified."""
    from megatron.core.transformer.module import Float16Module

    from megatron_sega.training.rollouts import load_prompts, make_sampler
    from megatron_sega.training.sega import sega_step
    from megatron_sega.training.sft import load_sft_examples, sft_step

    session = _gpu_session("sft.micro_batch_size=4")
    assert isinstance(session.chunks[0].module, Float16Module)
    assert all(p.dtype == torch.bfloat16 for p in session.chunks[0].parameters())
    examples = load_sft_examples(session, session.config.data.train)[:8]
    first = sft_step(session, examples)
    second = sft_step(session, examples)
    assert first["update_successful"] and second["loss"] < first["loss"], (first, second)

    session = _gpu_session("sega.updates_per_rollout=2", "sega.clip_eps=0.2", "optim.lr=1e-12")
    prompts = load_prompts(session, session.config.data.train)[:2]
    metrics = sega_step(session, make_sampler(session), prompts, [0, 1], 0)
    assert not metrics["skipped_update"] and metrics["grad_norm"] > 0, metrics
    assert metrics["ratio_abs_dev"] == 0.0 and metrics["clip_fraction"] == 0.0, metrics


def test_bf16_sampler_against_transformers(gpu_runtime):
    """The sampler in bf16 (the training model's Float16Module path) against transformers on
    the same weights: greedy tokens are HF's argmax wherever HF's top-2 margin is above bf16
    noise, its log-probs match HF's teacher-forced ones, and HF ``generate`` agrees on most
    tokens. GPU only, not yet verified."""
    from benchmarks.sampler import hf_model, megatron_model, prompts_for, run_hf
    from megatron_sega.sampling import Sampler, SamplingParams

    hf = hf_model(256, 4, 2000).to("cuda", torch.bfloat16)
    model, spec = megatron_model(hf, gpu_runtime, dtype=torch.bfloat16)
    prompts = prompts_for(8, 24, 2000)
    rollout = Sampler(model, gpu_runtime, spec.vocab_size, pad_id=0).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    worst, checked = 0.0, 0
    for row, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + rollout.response_ids[row].tolist()], device="cuda")
        with torch.no_grad():
            logp = torch.log_softmax(hf(seq).logits[0].float(), -1)[len(prompt) - 1:-1]
        top2 = logp.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1
        chosen = rollout.response_ids[row].cuda()
        assert torch.equal(logp.argmax(-1)[clear], chosen[clear]), row
        checked += int(clear.sum())
        mine = rollout.logp[row].cuda()
        worst = max(worst, float((logp.gather(1, chosen[:, None]).squeeze(1) - mine).abs().max()))
    assert checked > 0.5 * 8 * 16 and worst < 0.15, (checked, worst)
    agree = float((run_hf(hf, prompts, 16).cpu() == rollout.response_ids).float().mean())
    print(f"bf16 sampler vs transformers: max |dlogp| {worst:.3g}, generate agreement {agree:.2f}")
    assert agree >= 0.5


@pytest.mark.skipif(not have_transformer_engine(), reason="Transformer Engine is not installed")
def test_transformer_engine_layers_match_sdpa(gpu_runtime):
    """TE's layer spec (model.attention: auto with TE) against the local SDPA layers, same
    weights, bf16: the same logits; the sampler runs TE's layers through the lean forward
    (mixed prompt lengths in one batch) and agrees with Megatron's length-bucketed forward and
    with the SDPA model. GPU only, not yet verified (TE cannot be installed here)."""
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict
    from megatron_sega.models import preset
    from megatron_sega.models.builder import build_model, wrap_mixed_precision
    from megatron_sega.sampling import Sampler, SamplingParams
    from megatron_sega.sampling.decode import LeanForward

    spec = preset("tiny", vocab_size=1000, hidden_size=256, ffn_hidden_size=704,
                  num_attention_heads=8, num_query_groups=4)
    full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=0)
    models = {}
    for attention in ("auto", "sdpa"):
        model = wrap_mixed_precision(build_model(spec, gpu_runtime, dtype=torch.bfloat16,
                                                 attention=attention))
        load_full_state_dict(model, {k: v.cuda() for k, v in full.items()}, 1, 0)
        models[attention] = model.eval()
    assert models["auto"].module.uses_transformer_engine
    tokens = torch.randint(0, 1000, (2, 64), device="cuda")
    positions = torch.arange(64, device="cuda")[None].expand(2, -1)
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool, device="cuda").triu(1)
    with torch.no_grad():
        out = {a: m(tokens, positions, mask) for a, m in models.items()}
    assert (out["auto"] - out["sdpa"]).abs().max() < 0.1
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [3, 4]]
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    te = Sampler(models["auto"], gpu_runtime, spec.vocab_size, pad_id=0, bucket_by_length=True)
    assert isinstance(te.forwards[0], LeanForward) and len(te._plan([4, 4, 2], 8)) == 1
    te_megatron = Sampler(models["auto"], gpu_runtime, spec.vocab_size, pad_id=0,
                          bucket_by_length=True, lean=False)
    ref = Sampler(models["sdpa"], gpu_runtime, spec.vocab_size, pad_id=0)
    tokens = te.generate(prompts, params).response_ids
    for other in (te_megatron, ref):
        agree = (tokens == other.generate(prompts, params).response_ids).float().mean()
        assert agree >= 0.75
