"""Strict typed config: unknown keys, wrong types, overrides, cross-field rules, one-line CLI errors."""

import dataclasses
import subprocess
import sys

import pytest

from megatron_sega.config import ConfigError, check_stages, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_dotted_overrides():
    config = load_config(None, ["sega.k=8", "parallel.tp=2", "sampling.stop_strings=[END, STOP]"])
    assert config.sega.k == 8 and config.parallel.tp == 2
    assert config.sampling.stop_strings == ("END", "STOP")
    assert config.scoring.top_m == 0.1


def test_paper_defaults():
    config = load_config()
    assert (config.sega.k, config.scoring.top_m, config.scoring.lam) == (4, 0.1, 1.0)
    assert (config.sampling.temperature, config.sampling.top_p) == (1.0, 0.95)
    assert config.sega.normalize_std is False and config.sega.kl_coef == 0.0


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'sega.kk'; did you mean 'sega.k'\?"):
        load_config(_write(tmp_path, "sega:\n  kk: 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'smapling'; did you mean 'sampling'"):
        load_config(None, ["smapling.top_p=0.5"])


def test_wrong_type_names_option_value_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.tp = 'two' should be an integer"):
        load_config(_write(tmp_path, "parallel: {tp: two}\n"))
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel = 1 should be true or false"):
        load_config(None, ["parallel.sequence_parallel=1"])
    with pytest.raises(ConfigError, match=r"data.template = 'jinja' is not one of 'chat', 'none'"):
        load_config(None, ["data.template=jinja"])


def test_yaml_scientific_notation_is_a_float(tmp_path):
    assert load_config(_write(tmp_path, "optim: {lr: 1e-5}\n")).optim.lr == 1e-5


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"sega.k must be >= 1"):
        load_config(None, ["sega.k=0"])
    assert load_config(None, ["sega.k=1"]).sega.k == 1  # generate; run_sega asks for k >= 2
    with pytest.raises(ConfigError, match=r"sampling.top_p must be in \(0, 1\]"):
        load_config(None, ["sampling.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"sega.kl_coef must be >= 0"):
        load_config(None, ["sega.kl_coef=-0.1"])


# Each value used to be accepted and to fail mid-run, or to give a silently wrong result.
@pytest.mark.parametrize("overrides,message", [
    (["eval.beta=0"], r"eval.beta must be > 0, got 0.0"),
    (["eval.beta=-0.1"], r"eval.beta must be > 0, got -0.1"),
    (["eval.micro_batch_size=0"], r"eval.micro_batch_size must be >= 1"),
    (["sega.clip_eps=1.0"], r"sega.clip_eps must be in \[0, 1\), got 1.0"),
    (["sega.clip_eps=-0.2"], r"sega.clip_eps must be in \[0, 1\)"),
    (["sega.updates_per_rollout=2"], r"sega.updates_per_rollout = 2 reuses each rollout.*"
                                     r"set sega.clip_eps > 0"),
    (["sega.micro_batch_size=0"], r"sega.micro_batch_size must be >= 1, got 0"),
    (["sega.prompts_per_step=0"], r"sega.prompts_per_step must be >= 1, got 0"),
    (["sega.lr=0"], r"sega.lr must be > 0, got 0.0"),
    (["sega.kl_coef=-1", "sega.reference=x"], r"sega.kl_coef must be >= 0"),
    (["sft.global_batch_size=0"], r"sft.global_batch_size must be >= 1, got 0"),
    (["sft.micro_batch_size=-4"], r"sft.micro_batch_size must be >= 1, got -4"),
    (["sft.lr=-1e-5"], r"sft.lr must be > 0"),
    (["optim.lr=.nan"], r"optim.lr must be > 0, got nan"),
    (["scoring.trim_z=-1"], r"scoring.trim_z must be >= 0"),
    (["scoring.trim_fraction=1.0"], r"scoring.trim_fraction must be in \[0, 1\), got 1.0"),
    (["scoring.lam=-0.4"], r"scoring.lam must be >= 0"),
    (["scoring.top_m=2.5"], r"scoring.top_m = 2.5 >= 1 is a token count and must be whole"),
    (["logging.interval=0"], r"logging.interval must be >= 1, got 0"),
    (["checkpoint.keep_last=0"], r"checkpoint.keep_last must be >= 1, got 0"),
])
def test_option_ranges_are_checked_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_option_ranges_accept_their_bounds():
    config = load_config(None, ["sega.clip_eps=0.0", "scoring.lam=0", "scoring.trim_z=0",
                                "scoring.trim_fraction=0", "scoring.top_m=3",
                                "sega.updates_per_rollout=2", "sega.clip_eps=0.2"])
    assert config.sega.updates_per_rollout == 2 and config.scoring.top_m == 3


def test_stage_rules_join_sections_and_the_data_parallel_size():
    config = load_config(None, ["sft.global_batch_size=12", "sega.prompts_per_step=6",
                                "dpo.global_batch_size=12", "dpo.micro_batch_size=2",
                                "data.max_seq_len=64"])  # sampling.max_new_tokens: 256
    check_stages(config, 3, ("sft", "eval"))  # SFT and eval do not sample: no length rule
    with pytest.raises(ConfigError, match=r"sft.global_batch_size\(12\) is not divisible by "
                                          r"the data-parallel size dp\(8\)"):
        check_stages(config, 8, ("sft",))
    with pytest.raises(ConfigError, match=r"sega.prompts_per_step\(6\) is not divisible by the "
                                          r"data-parallel size dp\(4\)"):
        check_stages(config, 4, ("sega",))
    with pytest.raises(ConfigError, match=r"dpo.global_batch_size\(12\) is not divisible by the "
                                          r"data-parallel size dp\(8\)"):
        check_stages(config, 8, ("dpo",))
    for stage in ("sega", "generate"):
        with pytest.raises(ConfigError, match=r"data.max_seq_len\(64\) must exceed "
                                              r"sampling.max_new_tokens\(256\)"):
            check_stages(config, 1, (stage,))
    check_stages(config.with_overrides("sampling.max_new_tokens=48"), 3)  # every stage


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(_write(tmp_path, "sega:\n  k: [1\n"))


def test_config_is_frozen_and_round_trips():
    config = load_config(None, ["sega.k=6"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sega.k = 3
    again = load_config(None, [], base=config.to_dict())
    assert again == config
    assert config.with_overrides("sega.k=5").sega.k == 5 and config.sega.k == 6


def _cli(*args):
    from tests.cli_run import REPO, cli_env

    return subprocess.run([sys.executable, "-m", "megatron_sega.cli", *args], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    import importlib.util

    train = "data.train=examples/demo_data/train.jsonl"
    cases = [
        (("check", "sega.kk=3"), "unknown key 'sega.kk'"),
        (("check", "parallel.tp=x"), "parallel.tp = 'x' should be an integer"),
        (("check", "--config", str(tmp_path / "missing.yaml")), "does not exist"),
        (("check", "--world-size", "6", "parallel.tp=2", "parallel.pp=2"),
         "tp(2) * pp(2) = 4 does not divide WORLD_SIZE(6)"),
        (("check", "model.preset=llama4-8b"), "valid presets: llama2-7b"),
        (("check", "--world-size", "2", "parallel.pp=2", "parallel.vpp=2",
          "sft.global_batch_size=6", "sft.micro_batch_size=2", "data.packing=false"),
         "sft.global_batch_size(6) / dp(1) / sft.micro_batch_size(2) gives 3 microbatches per "
         "rank, not a multiple of pp(2)"),
        (("check", "--world-size", "4", "dpo.global_batch_size=24", "dpo.micro_batch_size=4",
          "data.packing=false"),
         "dpo.global_batch_size(24) must split into dp(4) equal shares"),
        (("sft", "data.train=" + str(tmp_path / "none.jsonl"), "parallel.device=cpu"),
         "none.jsonl"),
        # Checked before any model is built (these used to be tracebacks, some after loading).
        (("sega", train, "data.max_seq_len=64", "parallel.device=cpu"),
         "data.max_seq_len(64) must exceed sampling.max_new_tokens(256)"),
        (("sft", train, "parallel.device=cuda"), "parallel.device = cuda but no GPU is visible"),
        (("sft", train, "parallel.device=cpu", "sft.global_batch_size=4096"),
         "fewer than one global batch (sft.global_batch_size = 4096)"),
    ]
    if importlib.util.find_spec("wandb") is None:
        cases.append((("sft", train, "parallel.device=cpu", "logging.wandb=true"),
                      "logging.wandb = true but the wandb package is not installed"))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # one process per core: each is one thread
        results = list(pool.map(lambda case: _cli(*case[0]), cases))
    for (args, expected), result in zip(cases, results):
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and expected in lines[-1], (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])


def test_cli_help_lists_subcommands():
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("sft", "sega", "dpo", "eval", "generate", "demo", "check"):
        assert command in result.stdout


def test_vpp_needs_whole_microbatch_groups():
    """The interleaved schedule runs microbatches in groups of pp: SFT and SEGA splits that
    give another count are refused before a model is built (padded SEGA rows count whole)."""
    from megatron_sega.runtime import ParallelConfigError
    from megatron_sega.training.sega import check_sega_microbatches
    from megatron_sega.training.sft import check_sft_microbatches

    config = load_config(None, ["parallel.pp=2", "parallel.vpp=2", "sft.global_batch_size=8",
                                "sft.micro_batch_size=2", "sega.prompts_per_step=2", "sega.k=3",
                                "sega.micro_batch_size=2", "data.packing=false"])
    check_sft_microbatches(config, 1)  # 4 microbatches
    with pytest.raises(ParallelConfigError, match=r"gives 1 microbatches per rank, not a multi"):
        check_sft_microbatches(config, 4)
    with pytest.raises(ParallelConfigError, match=r"sega.k\(3\) / sega.micro_batch_size\(2\), "
                                                  r"rounded up, gives 3 microbatches"):
        check_sega_microbatches(config, 1)  # 6 rows -> 3 microbatches
    check_sega_microbatches(config.with_overrides("sega.k=4"), 1)  # 8 rows -> 4
    check_sega_microbatches(config.with_overrides("parallel.vpp=null", "sega.k=3"), 1)


def test_sega_refuses_sampling_that_makes_the_candidates_identical():
    """Issue 25, item 6: greedy decoding (temperature 0 or top_k 1) gives k identical candidates,
    so every group was skipped and the stage exited 0 without an update; a temperature too small
    for fp32 passed the config and failed in the sampler, on the last pipeline stage only."""
    from megatron_sega.config import MIN_TEMPERATURE, check_sega_group

    for override, option in (("sampling.temperature=0", "sampling.temperature = 0"),
                              ("sampling.top_k=1", "sampling.top_k = 1")):
        config = load_config(None, [override])  # generate (k = 1) may decode greedily
        with pytest.raises(ConfigError, match=rf"{option} decodes greedily: the sega.k\(4\) "
                                              r"candidates of a prompt would be identical"):
            check_sega_group(config)
        with pytest.raises(ConfigError, match=option):
            check_stages(config, 1, ("sega",))
        check_stages(config.with_overrides("sega.k=1"), 1, ("generate",))
    check_sega_group(load_config(None, ["sampling.top_k=2", "sampling.temperature=0.5"]))
    for tiny in ("1e-40", "1e-7"):
        with pytest.raises(ConfigError, match=r"sampling.temperature must be 0 \(greedy\) or >= "
                                              rf"1e-06 .*got {float(tiny)}"):
            load_config(None, [f"sampling.temperature={tiny}"])
    assert load_config(None, [f"sampling.temperature={MIN_TEMPERATURE}"]).sampling.temperature


def test_the_sampler_overflow_is_a_nonfinite_logits_error():
    """Below the config's minimum, logits / temperature overflows fp32: the sampler's error is a
    NonFiniteLogitsError (which the sampler hands to the other pipeline stages and a SEGA step
    skips on all ranks together), not a plain ValueError on the last stage only. At the minimum,
    logits far larger than a model's are still sampled."""
    import torch

    from megatron_sega import ops
    from megatron_sega.config import MIN_TEMPERATURE

    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 1e4
    with pytest.raises(ops.NonFiniteLogitsError, match=r"temperature=1e-40"):
        ops.sample(z, 0, 50, None, temperature=1e-40)
    drawn = ops.sample(z, 0, 50, None, temperature=MIN_TEMPERATURE, seed=1)
    assert torch.equal(drawn.tokens, z.argmax(-1))


def test_dpo_batch_split_is_checked_before_any_model_is_built():
    """Issue 25, item 8: `check` printed "ok" for a DPO split the run refused only after loading
    the model; the VPP microbatch count of DPO was not checked at all."""
    from megatron_sega.runtime import ParallelConfigError
    from megatron_sega.training.dpo import check_dpo_microbatches

    config = load_config(None, ["dpo.global_batch_size=24", "dpo.micro_batch_size=4",
                                "data.packing=false"])  # packed batches are split by tokens
    check_dpo_microbatches(config, 1)  # 6 microbatches of 4 pairs
    with pytest.raises(ConfigError, match=r"dpo.global_batch_size\(24\) must split into dp\(4\) "
                                          r"equal shares .* use a multiple of 16"):
        check_dpo_microbatches(config, 4)
    vpp = config.with_overrides("parallel.pp=4", "parallel.vpp=2")
    with pytest.raises(ParallelConfigError, match=r"dpo.micro_batch_size\(4\) gives 6 "
                                                  r"microbatches per rank, not a multiple of pp\(4\)"):
        check_dpo_microbatches(vpp, 1)
    check_dpo_microbatches(vpp.with_overrides("dpo.global_batch_size=32"), 1)


def test_sft_and_dpo_have_max_bad_steps_like_sega():
    config = load_config(None, ["sft.max_bad_steps=1", "dpo.max_bad_steps=5"])
    assert (config.sft.max_bad_steps, config.dpo.max_bad_steps, config.sega.max_bad_steps) == (
        1, 5, 3)
    for section in ("sft", "dpo"):
        with pytest.raises(ConfigError, match=rf"{section}.max_bad_steps must be >= 1, got 0"):
            load_config(None, [f"{section}.max_bad_steps=0"])


def test_bad_steps_stop_message_names_the_learning_rate_in_effect():
    """Issue 25 item 2: with sega.lr set, optim.lr is not used; the advice names sega.lr."""
    from megatron_sega.training.engine import BadSteps

    bad = BadSteps(load_config(None, ["sega.lr=1.0e-6", "sega.max_bad_steps=2"]), "sega")
    assert bad.count({"skipped_update": True}) is False
    assert bad.count({"skipped_update": True}) is True
    assert "sega.max_bad_steps=2" in bad.reason() and "lower sega.lr " in bad.reason()
    assert "lower optim.lr " in BadSteps(load_config(None, []), "sft").reason()
    assert "lower dpo.lr " in BadSteps(load_config(None, ["dpo.lr=1.0e-6"]), "dpo").reason()
