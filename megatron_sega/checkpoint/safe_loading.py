"""Reading a torch_dist checkpoint without unpickling anything arbitrary.

Nothing in a checkpoint is trusted: our own files are JSON, RNG tensors are read with
``torch.load(weights_only=True)``, and :func:`safe_loading` wraps every ``dist_checkpointing.load``
(training checkpoints, model checkpoints and the converters' streaming reads alike). It restricts
the pickled DCP ``.metadata`` to checkpoint-metadata types and forces ``weights_only`` on the
objects that torch's DCP planner would otherwise unpickle in full.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Iterator

import torch

from megatron_sega.errors import CheckpointError

# What a torch DCP ``.metadata`` pickle may name: plain data classes of the checkpoint format.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, refused: list[str]):
        super().__init__(file)
        self.refused = refused

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            message = (f"names '{module}.{name}', which is not a checkpoint metadata type; "
                       "refused to unpickle it (untrusted or unsupported checkpoint)")
            self.refused.append(message)
            raise pickle.UnpicklingError(f"checkpoint metadata {message}")
        return super().find_class(module, name)


class _RestrictedPickle:
    """Stands in for the ``pickle`` module inside torch's DCP file-system reader."""

    def __init__(self):
        self.refused: list[str] = []  # what the unpickler refused (DCP rewraps its errors)

    def __getattr__(self, name: str):
        return getattr(pickle, name)

    def load(self, file, **_ignored):
        return _MetadataUnpickler(file, self.refused).load()


def _vet_metadata(path: Path) -> None:
    """Unpickle a DCP ``.metadata`` file with the allow-list unpickler; raise on a refusal."""
    if not path.is_file():
        return  # not a DCP checkpoint, or a layout DCP reports itself
    refused: list[str] = []
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f, refused).load()
    except Exception as err:  # noqa: BLE001 - any unreadable pickle is a bad checkpoint
        detail = refused[0] if refused else f"is unreadable ({type(err).__name__}: {err})"
        raise CheckpointError(f"{path} {detail}") from None


@contextlib.contextmanager
def safe_loading(directory: str | Path | None = None) -> Iterator[None]:
    """Within this context, reading a torch_dist checkpoint unpickles nothing arbitrary: the DCP
    ``.metadata`` file goes through an allow-list unpickler and every ``torch.load`` (DCP's
    planner loads byte objects with ``weights_only=False``) is forced to ``weights_only=True``.

    With ``directory``, its ``.metadata`` is vetted before anything reads it: a refused one is a
    :class:`CheckpointError` naming the file (inside DCP, the refusal would be logged with two
    tracebacks and rewrapped on its way up)."""
    from torch.distributed.checkpoint import filesystem

    if directory is not None:
        _vet_metadata(Path(directory) / ".metadata")

    env_key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    saved_env = os.environ.get(env_key)
    saved_pickle = getattr(filesystem, "pickle", None)
    os.environ[env_key] = "1"
    restricted = _RestrictedPickle()
    filesystem.pickle = restricted
    try:
        yield
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        if not restricted.refused or isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        where = Path(directory) / ".metadata" if directory is not None else "checkpoint .metadata"
        raise CheckpointError(f"{where} {restricted.refused[0]}") from None
    finally:
        filesystem.pickle = saved_pickle
        if saved_env is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = saved_env

