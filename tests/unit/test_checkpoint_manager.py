"""CheckpointManager pieces that need no training run: choosing the checkpoint to resume, safe
loading (no arbitrary unpickling), the RNG file, the Adam step repair. The end-to-end behaviour
(kill/resume bitwise, SIGTERM, resharding) is tested in tests/e2e/test_resume.py."""

from __future__ import annotations

import io
import os
import pickle
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sega.checkpoint import manager as m
from megatron_sega.checkpoint.retention import CheckpointWarning
from megatron_sega.checkpoint.names import COMPLETE_MARKER, MODEL_OPTIM_DIR
from megatron_sega.checkpoint.safe_loading import safe_loading
from megatron_sega.errors import CheckpointError


def _checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    path = root / name
    (path / MODEL_OPTIM_DIR).mkdir(parents=True)
    if complete:
        (path / COMPLETE_MARKER).write_text("ok\n")
    return path


def test_find_latest_skips_incomplete_and_temporary_dirs_with_a_warning(tmp_path):
    good = _checkpoint(tmp_path, "step_00000004")
    _checkpoint(tmp_path, "step_00000002")
    bad = _checkpoint(tmp_path, "step_00000008", complete=False)
    _checkpoint(tmp_path, ".tmp_step_00000012")  # complete-looking, but never renamed
    with pytest.warns(CheckpointWarning, match=str(bad)):
        assert m.find_latest(tmp_path) == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.find_latest(tmp_path, warn=False) == good
    assert m.find_latest(tmp_path / "missing") is None
    assert m.find_latest(bad) is None


def test_resume_path_explicit_directory(tmp_path):
    good = _checkpoint(tmp_path, "step_00000004")
    _checkpoint(tmp_path, "step_00000008", complete=False)

    def manager(resume):
        config = SimpleNamespace(save_dir=None, resume=resume)
        return m.CheckpointManager(config, "sft", chunks=[], optimizer=None, scheduler=None,
                                   iterator=None, runtime=SimpleNamespace(rank=0), spec=None,
                                   tokenizer=None, run_config={}, distributed_optimizer=False)

    assert manager(str(good))._resume_path() == good
    with pytest.warns(CheckpointWarning):  # a save directory: its newest complete checkpoint
        assert manager(str(tmp_path))._resume_path() == good
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager(str(tmp_path / "step_00000008"))._resume_path()
    assert manager("none")._resume_path() is None
    assert manager("auto")._resume_path() is None  # no save_dir


class _Boom:
    """Unpickling this runs a command: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dcp_save(directory: Path, state: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)


def test_read_tensors_round_trip(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float64)}
    _dcp_save(tmp_path, state)
    loaded = m.read_tensors(tmp_path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert list(m.read_tensors(tmp_path, prefix="a.")) == ["a.weight"]


def test_safe_loading_refuses_a_hostile_metadata_file(tmp_path):
    _dcp_save(tmp_path, {"w": torch.ones(2)})
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    # One user error naming the file (the CLI prints it as one line), and no code ran.
    with pytest.raises(CheckpointError, match=r"\.metadata names '(posix|os|nt)\.system'") as info:
        m.read_tensors(tmp_path)
    assert str(tmp_path / ".metadata") in str(info.value)
    assert not marker.exists()
    # Without a directory to vet, the refusal inside DCP still ends as a CheckpointError.
    with pytest.raises(CheckpointError, match=r"checkpoint \.metadata names"):
        with safe_loading(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.FileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


def test_safe_loading_refuses_hostile_byte_objects(tmp_path):
    marker = tmp_path / "pwned"
    _dcp_save(tmp_path, {"w": torch.ones(2), "obj": _Boom(marker)})
    target = {"w": torch.empty(2), "obj": io.BytesIO()}
    with safe_loading(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = dcp.FileSystemReader(str(tmp_path))
        # torch.load(weights_only=True) refuses the byte object; DCP wraps the refusal.
        with pytest.raises(CheckpointException) as info:
            dcp.load(target, storage_reader=reader, no_dist=True)
    assert "system" in str(info.value.failures)
    assert not marker.exists()


def test_safe_loading_restores_what_it_changed():
    from torch.distributed.checkpoint import filesystem

    before = (filesystem.pickle, os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"))
    with safe_loading():
        assert filesystem.pickle is not pickle
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert (filesystem.pickle, os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")) == before


def test_rng_file_holds_tensors_only_and_restores_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second gaussian in python's and numpy's generators
    np.random.standard_normal()
    path = tmp_path / "rank_00000.pt"
    torch.save(m._rng_state(), path)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(),
                np.random.rand(), torch.rand(3))
    state = torch.load(path, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    m._set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(),
           torch.rand(3))
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4])


def test_restore_adam_steps_unshares_and_sets_the_saved_count():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    adam = torch.optim.Adam(params)
    shared = torch.tensor(1.0)
    for p in params:  # what Megatron's load leaves behind: one placeholder tensor for all
        adam.state[p] = {"step": shared, "exp_avg": torch.zeros_like(p),
                         "exp_avg_sq": torch.zeros_like(p)}
    adam.param_groups[0]["step"] = 4.0
    m._restore_adam_steps(SimpleNamespace(optimizer=adam))
    steps = [adam.state[p]["step"] for p in params]
    assert steps[0] is not steps[1]
    assert [float(s) for s in steps] == [4.0, 4.0] and steps[0].dtype == shared.dtype


def test_model_load_of_a_save_directory_resolves_its_latest_model_spec_and_tokenizer(tmp_path):
    """``model.load`` may name a save directory: its ``latest`` checkpoint's ``model_optim``
    holds the spec (which wins over the preset) and the tokenizer the run uses."""
    from megatron_sega.checkpoint.mcore import CheckpointInfo, resolve_checkpoint_dir, write_info
    from megatron_sega.checkpoint.names import LATEST_FILE, TOKENIZER_DIR, step_dir_name
    from megatron_sega.config import ConfigError, load_config
    from megatron_sega.data import TINY_TOKENIZER_DIR, Tokenizer
    from megatron_sega.models import preset
    from megatron_sega.training.session import load_tokenizer, model_spec

    recorded = preset("tiny").replace(num_layers=3)
    older = _checkpoint(tmp_path, step_dir_name(2)) / MODEL_OPTIM_DIR
    newest = _checkpoint(tmp_path, step_dir_name(4)) / MODEL_OPTIM_DIR
    write_info(older, CheckpointInfo(spec=preset("tiny"), padded_vocab_size=512, dtype="float32"))
    write_info(newest, CheckpointInfo(spec=recorded, padded_vocab_size=512, dtype="float32"))
    Tokenizer.from_path(str(TINY_TOKENIZER_DIR)).save(newest / TOKENIZER_DIR)
    (tmp_path / LATEST_FILE).write_text(step_dir_name(4) + "\n")

    assert resolve_checkpoint_dir(tmp_path) == newest
    assert resolve_checkpoint_dir(tmp_path / step_dir_name(2)) == older
    # A preset other than 'tiny' has no tokenizer of its own: the checkpoint's must be found.
    config = load_config(None, ["model.preset=llama3-8b", f"model.load={tmp_path}"])
    assert model_spec(config) == recorded
    assert model_spec(load_config(None, ["model.preset=llama3-8b"])) == preset("llama3-8b")
    tokenizer = load_tokenizer(config)
    assert tokenizer.vocab_size == Tokenizer.from_path(str(TINY_TOKENIZER_DIR)).vocab_size
    (tmp_path / LATEST_FILE).write_text(step_dir_name(2) + "\n")  # no tokenizer in that one
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_tokenizer(config)
