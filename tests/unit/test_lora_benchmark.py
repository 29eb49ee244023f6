"""benchmarks/lora.py (issue 21 item 9): its counts extrapolated from cut builds equal those of
the whole model built directly, LoRA's trainable parameters are the planner's adapter count and
its base has no gradients or optimizer state; the RESULTS table shows its rows."""


import pytest

from benchmarks import lora as bench
from benchmarks.__main__ import table
from megatron_sega.models import preset
from megatron_sega.models.lora import LoraSettings
from megatron_sega.plan import memory as mem

PAD = 2 * 128 * 12  # DDP pads each bucket to a multiple of 128 elements (fp32 grads + Adam)


@pytest.fixture(scope="module")
def counted():
    target = preset("tiny", num_layers=4, vocab_size=512)
    lora = LoraSettings(4, 8.0)
    return target, {name: (bench.training_state(target, 128, settings),
                           bench.built_counts(target, settings))
                    for name, settings in (("full", None), ("lora", lora))}


def test_extrapolated_counts_equal_the_whole_model_built(counted):
    _, runs = counted
    for name, (extrapolated, direct) in runs.items():
        assert extrapolated["trainable_parameters"] == direct["trainable_parameters"], name
        assert extrapolated["weights_bytes"] == direct["weights_bytes"], name
        for key in ("grads_bytes", "optimizer_bytes"):
            assert abs(extrapolated[key] - direct[key]) <= PAD, (name, key)


def test_lora_trains_only_the_adapters(counted):
    target, runs = counted
    full, lora = runs["full"][1], runs["lora"][1]
    adapters = mem.adapter_parameters(target, 1, 1, 4, LoraSettings(4, 8.0).targets)
    assert lora["trainable_parameters"] == adapters
    assert lora["weights_bytes"] == full["weights_bytes"] + 2 * adapters  # bf16 adapters
    assert lora["grads_bytes"] <= 4 * adapters + PAD < full["grads_bytes"] / 10
    assert lora["optimizer_bytes"] <= 12 * adapters + PAD


def test_results_table_has_the_lora_rows(counted):
    _, runs = counted
    full, lora = runs["full"][0], runs["lora"][0]
    for c in (full, lora):
        c.setdefault("training_state_bytes", sum(c[k] for k in bench.COUNTS[1:]))
    result = {"lora": {"rank": 4}, "full": full, "lora_counts": lora,
              "ratios_lora_over_full": {k: lora[k] / full[k] for k in full if k != "built"},
              "step_time": {"device": "cpu", "model": "tiny", "ratio_lora_over_full": 0.8,
                            "seconds_per_step": {"full": 1.0, "lora": 0.8}}}
    markdown = table({"lora": result})
    assert "| LoRA rank 4, Llama-3-8B shape, bf16, one rank | training state" in markdown
    assert "(0.80 of full) | full 1.000 |" in markdown
