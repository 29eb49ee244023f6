"""Strict typed config: unknown keys, wrong types, overrides, cross-field rules, one-line CLI errors."""

import subprocess
import sys

import pytest

from megatron_sega.config import ConfigError, load_config


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
    with pytest.raises(ConfigError, match=r"sega.kl_coef > 0 needs sega.reference"):
        load_config(None, ["sega.kl_coef=0.1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(_write(tmp_path, "sega:\n  k: [1\n"))


def test_config_is_frozen_and_round_trips():
    config = load_config(None, ["sega.k=6"])
    with pytest.raises(Exception):
        config.sega.k = 3
    again = load_config(None, [], base=config.to_dict())
    assert again == config
    assert config.with_overrides("sega.k=5").sega.k == 5 and config.sega.k == 6


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_sega.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (("check", "sega.kk=3"), "unknown key 'sega.kk'"),
        (("check", "parallel.tp=x"), "parallel.tp = 'x' should be an integer"),
        (("check", "--config", str(tmp_path / "missing.yaml")), "does not exist"),
        (("check", "--world-size", "6", "parallel.tp=2", "parallel.pp=2"),
         "tp(2) * pp(2) = 4 does not divide WORLD_SIZE(6)"),
        (("check", "model.preset=llama4-8b"), "valid presets: llama2-7b"),
        (("sft", "data.train=" + str(tmp_path / "none.jsonl"), "parallel.device=cpu"),
         "none.jsonl"),
    ]
    for args, expected in cases:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines and expected in lines[-1], (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])


def test_cli_help_lists_subcommands():
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("sft", "sega", "eval", "generate", "demo", "check"):
        assert command in result.stdout
