"""Issue 20 item 10: the MFU figures (Megatron's FLOPs formula, the H100 variants' peaks, one
token definition for SFT, DPO and SEGA)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_sega.data import TokenizedExample
from megatron_sega.data.batching import TokenizedPair
from megatron_sega.logging import metrics
from megatron_sega.models import preset


def test_attention_term_is_megatrons_4sh_per_layer():
    """Per token and layer the forward does QK^T and AV, 2*s*h FLOPs each: 4*s*h, times 3 for
    forward + backward (Megatron's num_floating_point_operations)."""
    spec = preset("tiny")
    h = spec.num_attention_heads * spec.kv_channels
    grow = metrics.training_flops_per_token(spec, 9) - metrics.training_flops_per_token(spec, 8)
    assert grow == pytest.approx(3 * spec.num_layers * 4 * h)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", None)])
def test_peak_per_gpu_variant(name, peak):
    assert metrics.peak_tflops_for(name) == peak


def _session():
    runtime = SimpleNamespace(dp=1, device=torch.device("cpu"))
    return SimpleNamespace(runtime=runtime, vocab_size=32, chunks=[], optimizer=None,
                           scheduler=None,
                           tokenizer=SimpleNamespace(pad_id=0),
                           config=SimpleNamespace(sft=SimpleNamespace(micro_batch_size=1),
                                                  dpo=SimpleNamespace(micro_batch_size=1),
                                                  data=SimpleNamespace(packing=False)))


def _fake_engine(monkeypatch, module, outputs):
    monkeypatch.setattr(module, "forward_backward", lambda *a, **k: outputs)
    monkeypatch.setattr(module, "optimizer_step", lambda *a, **k: {})


def test_sft_step_counts_prompt_plus_response_tokens(monkeypatch):
    """``train_tokens`` (what MFU and tokens/s use) is every prompt + response token, as SEGA
    counts them; ``tokens`` stays the loss's response tokens."""
    from megatron_sega.training import sft

    _fake_engine(monkeypatch, sft, [{"nll_sum": torch.tensor(1.0)}])
    shard = [TokenizedExample("a", [1, 2, 3, 4], [5, 6]), TokenizedExample("b", [1, 2], [7])]
    got = sft.sft_step(_session(), shard)
    assert got["train_tokens"] == 9.0 and got["tokens"] == 3.0 and got["seq_len"] == 6
    # MFU's attention FLOPs: each token over its own sequence, (6^2 + 3^2) / 9, not the row's 6
    assert got["attention_span"] == pytest.approx(5.0)


def test_dpo_step_counts_prompt_plus_response_tokens(monkeypatch):
    from megatron_sega.training import dpo

    _fake_engine(monkeypatch, dpo, [])
    monkeypatch.setattr(dpo, "token_stats",
                        lambda ref, rt, batch, *a, **k: {"logp": torch.zeros(batch.tokens.shape)})
    monkeypatch.setattr(dpo, "dpo_loss_fn", lambda *a: None)
    monkeypatch.setattr(dpo, "_local_sums", lambda outputs: {"loss_sum": 0.0})
    monkeypatch.setattr(dpo, "_reduce_sums", lambda local, session: {
        k: 0.0 for k in ("pairs", "loss_sum", "correct", "chosen_reward_sum",
                         "rejected_reward_sum", "margin_sum", "logp_chosen_sum",
                         "logp_rejected_sum")})
    pair = TokenizedPair("p", [1, 2, 3], [4, 5], [6])
    got = dpo.dpo_step(_session(), [], [pair])
    assert got["train_tokens"] == 5.0 + 4.0 and got["tokens"] == 3.0
    assert got["attention_span"] == pytest.approx((5 * 5 + 4 * 4) / 9)


def test_sampler_benchmark_times_gpu_work_by_the_synchronized_wall_clock(monkeypatch):
    """On a GPU the speed-ups come from the wall clock with the device synchronized before and
    after the timed call (the process's CPU time does not see the kernels); on CPU from CPU
    time, as before."""
    from benchmarks import sampler

    assert sampler.speedup_clock("cuda") == "wall" and sampler.speedup_clock("cpu") == "cpu"
    assert sampler.speedups({"sampler": 2.0, "hf_generate": 5.0}) == {
        "sampler": 1.0, "hf_generate": 2.5}
    assert sampler.speedups({"hf_generate": 5.0}) == {"hf_generate": None}
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: events.append("sync"))
    wall, cpu, result = sampler.timed(lambda n: events.append("run") or n, 3)
    assert events == ["sync", "run", "sync"] and result == 3 and wall >= 0
