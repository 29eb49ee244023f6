"""Bad input is a one-line user error before anything is built: a tokenizer that is not the
checkpoint's, missing or empty data files, an eval or SEGA file that leaves nothing to use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_sega.checkpoint.mcore import CheckpointInfo, write_info
from megatron_sega.checkpoint.names import TOKENIZER_DIR
from megatron_sega.config import load_config
from megatron_sega.data import TINY_TOKENIZER_DIR, PromptFormatter, Tokenizer
from megatron_sega.errors import ConfigError, DataError, ModelConfigError
from megatron_sega.models import preset

REPO = Path(__file__).resolve().parents[2]
PAIR = {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4. Final Answer: 4",
        "rejected": "Final Answer: 5"}


def _tokenizer_variant(directory: Path, *, extra_tokens: int = 0, swap: bool = False) -> Path:
    """The tiny tokenizer with ``extra_tokens`` appended, or with two ordinary tokens' ids
    swapped (same size and special ids, another vocabulary)."""
    shutil.copytree(TINY_TOKENIZER_DIR, directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), len(vocab) + extra_tokens):
        vocab[f"<unused_{i}>"] = i
    if swap:
        a, b = "e", "t"
        vocab[a], vocab[b] = vocab[b], vocab[a]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def _checkpoint(directory: Path, spec, tokenizer_dir: Path | None) -> Path:
    """A converted-checkpoint directory: the recorded spec and, optionally, its tokenizer."""
    directory.mkdir(parents=True)
    write_info(directory, CheckpointInfo(spec=spec, padded_vocab_size=512, dtype="float32"))
    if tokenizer_dir is not None:
        Tokenizer.from_path(tokenizer_dir).save(directory / TOKENIZER_DIR)
    return directory


def _config(*overrides: str):
    return load_config(None, ["model.preset=tiny", *overrides])


# ----------------------------------------------------------------------------- tokenizer

def test_a_tokenizer_other_than_the_checkpoints_own_is_refused(tmp_path):
    from megatron_sega.training.session import load_tokenizer

    tiny = Tokenizer.from_path(TINY_TOKENIZER_DIR)
    ckpt = _checkpoint(tmp_path / "ckpt", preset("tiny").replace(vocab_size=512),
                       TINY_TOKENIZER_DIR)
    # The checkpoint's own tokenizer, or a copy of it elsewhere: accepted.
    assert load_tokenizer(_config(f"model.load={ckpt}")).vocab_size == tiny.vocab_size
    copy = shutil.copytree(TINY_TOKENIZER_DIR, tmp_path / "copy")
    assert load_tokenizer(_config(f"model.load={ckpt}", f"model.tokenizer={copy}")) \
        .vocab_size == tiny.vocab_size
    # A smaller vocabulary (a Llama-2 tokenizer on a Llama-3 checkpoint) once got only a note.
    for name, variant in (("bigger", dict(extra_tokens=20)), ("swapped", dict(swap=True))):
        other = _tokenizer_variant(tmp_path / name, **variant)
        with pytest.raises(ConfigError, match=rf"model.tokenizer = {other} is not the tokenizer "
                                              rf"of model.load = {ckpt} .*drop model.tokenizer"):
            load_tokenizer(_config(f"model.load={ckpt}", f"model.tokenizer={other}"))
    with pytest.raises(ConfigError, match="vocab_size 480 != 460"):
        load_tokenizer(_config(f"model.load={ckpt}",
                               f"model.tokenizer={tmp_path / 'bigger'}"))


def test_without_its_own_tokenizer_the_checkpoints_special_ids_decide(tmp_path):
    from megatron_sega.training.session import load_tokenizer

    llama3 = _checkpoint(tmp_path / "llama3", preset("llama3-8b"), None)
    with pytest.raises(ConfigError, match=r"does not match the special tokens that model.load = "
                                          rf"{llama3} records: bos id 1 != 128000"):
        load_tokenizer(_config(f"model.load={llama3}", f"model.tokenizer={TINY_TOKENIZER_DIR}"))
    llama31 = _checkpoint(tmp_path / "llama31", preset("tiny").replace(
        bos_token_id=None, eos_token_id=[7, 8]), None)
    with pytest.raises(ConfigError, match=r"eos id 2 not in \[7, 8\]"):
        load_tokenizer(_config(f"model.load={llama31}", f"model.tokenizer={TINY_TOKENIZER_DIR}"))
    same_ids = _checkpoint(tmp_path / "tiny", preset("tiny").replace(eos_token_id=[9, 2]), None)
    load_tokenizer(_config(f"model.load={same_ids}", f"model.tokenizer={TINY_TOKENIZER_DIR}"))


def test_legitimate_vocabularies_still_load(tmp_path):
    """The tiny preset resizes to any tokenizer; a model vocabulary padded beyond its
    tokenizer's (HF checkpoints) is allowed; a tokenizer larger than the model is not."""
    from megatron_sega.training.session import load_tokenizer, model_spec

    bigger = _tokenizer_variant(tmp_path / "bigger", extra_tokens=20)
    config = _config(f"model.tokenizer={bigger}")
    assert model_spec(config, load_tokenizer(config).vocab_size).vocab_size == 480
    padded = _checkpoint(tmp_path / "padded", preset("tiny").replace(vocab_size=512),
                         TINY_TOKENIZER_DIR)
    config = _config(f"model.load={padded}", f"model.tokenizer={TINY_TOKENIZER_DIR}")
    assert model_spec(config, load_tokenizer(config).vocab_size).vocab_size == 512
    small = _checkpoint(tmp_path / "small", preset("tiny").replace(vocab_size=256), None)
    with pytest.raises(ModelConfigError, match="the tokenizer has 460 tokens but the model's "
                                               "vocab_size is 256"):
        config = _config(f"model.load={small}", f"model.tokenizer={TINY_TOKENIZER_DIR}")
        model_spec(config, load_tokenizer(config).vocab_size)


# ----------------------------------------------------------------------------- data files

def _jsonl(path: Path, rows: list[dict], blank_lines: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n" * blank_lines)
    return path


def test_preflight_checks_the_data_files_of_its_stages_before_any_model(tmp_path):
    from megatron_sega.training.session import data_inputs, preflight

    good = _jsonl(tmp_path / "good.jsonl", [PAIR])
    empty = _jsonl(tmp_path / "empty.jsonl", [], blank_lines=3)
    missing = tmp_path / "missing.jsonl"
    base = ["parallel.device=cpu", "logging.wandb=false"]
    assert preflight(_config(*base, f"data.train={good}", f"data.eval={good}"), "sft") == 1
    cases = [
        ("sft", [f"data.train={missing}"], rf"data.train = {missing} does not exist"),
        ("sft", [f"data.train={good}", f"data.eval={empty}"],
         rf"data.eval = {empty} holds no records \(an empty file\)"),
        ("sega", [f"data.train={empty}"], rf"data.train = {empty} holds no records"),
        ("eval", [f"data.eval={missing}"], rf"data.eval = {missing} does not exist"),
        ("generate", [f"data.train={good}", f"data.eval={empty}"], "data.eval"),
    ]
    for stage, overrides, message in cases:
        with pytest.raises(DataError, match=message):
            preflight(_config(*base, *overrides), stage)
    # What each stage reads: eval and generate never read data.train when data.eval is set.
    config = _config(f"data.train={good}", f"data.eval={empty}")
    assert data_inputs(config, ("sega",)) == [("data.train", str(good))]
    assert data_inputs(config, ("eval", "generate")) == [("data.eval", str(empty))]
    assert data_inputs(_config(f"data.train={good}"), ("generate", "sft")) == \
        [("data.train", str(good))]


def _session(**data):
    tokenizer = Tokenizer.from_path(TINY_TOKENIZER_DIR)
    config = _config(*[f"data.{k}={v}" for k, v in data.items()], "sampling.max_new_tokens=8")
    return SimpleNamespace(config=config, tokenizer=tokenizer, print=lambda *a: None,
                           formatter=PromptFormatter(tokenizer, template=config.data.template))


def test_an_eval_or_sega_file_that_leaves_nothing_to_use_is_a_data_error(tmp_path):
    """Once an empty eval file gave ``{"pairs": 0}`` and exit 0, and an empty SEGA file "no
    prompt fits ... the shortest has 0"."""
    from megatron_sega.training.evaluate import load_eval_pairs
    from megatron_sega.training.rollouts import load_prompts

    empty = _jsonl(tmp_path / "empty.jsonl", [], blank_lines=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\nnot json\n')
    good = _jsonl(tmp_path / "good.jsonl", [PAIR])
    for load in (load_eval_pairs, load_prompts):
        with pytest.raises(DataError, match=rf"{empty}: holds no records \(an empty file\)"):
            load(_session(), str(empty))
        with pytest.raises(DataError, match=rf"{bad}: every record is bad \(kept 0 pairs"):
            load(_session(on_bad_record="skip"), str(bad))
    with pytest.raises(DataError, match=rf"{good}: none of its 1 pairs fits "
                                        r"data.max_seq_len\(12\) with data.overlong = drop"):
        load_eval_pairs(_session(max_seq_len=12, overlong="drop"), str(good))
    assert len(load_eval_pairs(_session(), str(good))) == len(load_prompts(_session(), str(good)))


def test_the_cli_refuses_an_empty_eval_or_sega_file_before_building_a_model(tmp_path, capsys):
    from megatron_sega import cli

    empty = _jsonl(tmp_path / "empty.jsonl", [])
    for command, option in (("eval", "data.eval"), ("sega", "data.train")):
        rc = cli.main([command, "model.preset=tiny", "parallel.device=cpu", f"{option}={empty}",
                       f"logging.dir={tmp_path / command}"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err == (f"megatron-sega {command}: error: {option} = {empty} holds no records "
                       f"(an empty file); point {option} at a file of prompt/chosen/rejected "
                       "records\n")
        assert not (tmp_path / command).exists()  # nothing was started
