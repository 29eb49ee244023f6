"""One concern per folder (issue 17): what each package may import, where the on-disk names of a
checkpoint live, and what the checkpoint manager is given. Read from the sources with ``ast``,
so a forbidden import hidden inside a function counts too."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "megatron_sega"

# Every literal file or directory name of a checkpoint on disk (see checkpoint/names.py).
ON_DISK_NAMES = ("megatron_sega.json", "tokenizer", "model_optim", "rng", "train_state.json",
                 "COMPLETE", "latest", "STOPPED", "step_", ".tmp_")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from m import x`` counts as ``m`` and ``m.x``), at any
    depth, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _modules(folder: str) -> list[Path]:
    files = sorted((PACKAGE / folder).glob("*.py"))
    assert files, folder
    return files


def _ours(imports: set[str], prefix: str) -> set[str]:
    return {m for m in imports if m == prefix or m.startswith(prefix + ".")}


def test_training_checkpoints_import_nothing_from_the_hf_mapping():
    """checkpoint/ holds training and model checkpoints only: no HF files (safetensors), no
    HF <-> Megatron re-layout, nothing from convert/."""
    for path in _modules("checkpoint"):
        imports = _imports(path)
        assert not _ours(imports, "megatron_sega.convert"), path
        assert not _ours(imports, "safetensors"), path
        hf_mapping = {m for m in _ours(imports, "megatron_sega.checkpoint")
                      if m.split(".")[2:3] in (["hf"], ["hf_io"], ["layout"], ["convert"])}
        assert not hf_mapping, f"{path}: {sorted(hf_mapping)}"


def test_the_hf_mapping_uses_only_the_checkpoint_format_of_checkpoint():
    """convert/ writes and reads the torch_dist model format (mcore, names, safe loading, the
    fingerprint of a LoRA checkpoint's base); the training checkpoint manager and the stop
    protocol are none of its business."""
    allowed = {"megatron_sega.checkpoint.mcore", "megatron_sega.checkpoint.names",
               "megatron_sega.checkpoint.fingerprint",
               "megatron_sega.checkpoint.safe_loading"}
    for path in _modules("convert"):
        used = {m for m in _ours(_imports(path), "megatron_sega.checkpoint")
                if m.count(".") >= 2}  # the modules, not the names imported from them
        modules = {m for m in used if any(m == a or m.startswith(a + ".") for a in allowed)}
        assert used == modules, f"{path}: {sorted(used - modules)}"


def test_manager_and_model_checkpoints_do_not_import_each_other():
    mcore = _imports(PACKAGE / "checkpoint" / "mcore.py")
    assert not _ours(mcore, "megatron_sega.checkpoint.manager")
    safe = _imports(PACKAGE / "checkpoint" / "safe_loading.py")
    assert not _ours(safe, "megatron_sega.checkpoint.manager")
    assert not _ours(safe, "megatron_sega.checkpoint.mcore")
    assert "megatron_sega.checkpoint.safe_loading.safe_loading" in mcore


def test_models_import_nothing_from_checkpoint_but_the_names():
    for path in _modules("models"):
        imports = _imports(path)
        forbidden = {m for m in _ours(imports, "megatron_sega.checkpoint")
                     if not m.startswith("megatron_sega.checkpoint.names")
                     and m != "megatron_sega.checkpoint"}
        assert not forbidden, f"{path}: {sorted(forbidden)}"
        assert not _ours(imports, "megatron_sega.training"), path


def _string_constants(path: Path):
    """(line, value) of the string constants of ``path``, docstrings left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node.lineno, node.value


def test_on_disk_names_are_spelled_only_in_the_names_module():
    """A literal such as ``"model_optim"`` or ``f"{d}/latest"`` anywhere but checkpoint/names.py
    is a second definition of the layout."""
    names_file = PACKAGE / "checkpoint" / "names.py"
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == names_file:
            continue
        for line, value in _string_constants(path):
            # path parts; a glob or a prefix ('step_*', f'step_{n}') counts as its name
            parts = {part.rstrip("*") for part in value.split("/")}
            if parts & set(ON_DISK_NAMES) or any(p.startswith(".tmp_") for p in parts):
                found.append(f"{path.relative_to(PACKAGE)}:{line}: {value!r}")
    assert not found, "\n".join(found)
    defined = {value for _, value in _string_constants(names_file)}
    assert set(ON_DISK_NAMES) <= defined


def test_checkpoint_manager_is_given_its_parts():
    from megatron_sega.checkpoint.manager import CheckpointManager

    params = inspect.signature(CheckpointManager.__init__).parameters
    for part in ("chunks", "optimizer", "scheduler", "iterator", "runtime", "spec", "tokenizer"):
        assert part in params, part
        assert params[part].kind is inspect.Parameter.KEYWORD_ONLY, part
    assert "session" not in params
    # ... and reads nothing it was not given: no session anywhere in the module.
    tree = ast.parse((PACKAGE / "checkpoint" / "manager.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "session" not in names | attributes


@pytest.mark.parametrize("module, forbidden", [
    ("training/generate.py", ("megatron_sega.training.sega", "megatron_sega.training.evaluate")),
    ("demo.py", ("megatron_sega.training.sega",)),
])
def test_generate_and_demo_do_not_use_the_sega_loop_as_a_library(module, forbidden):
    imports = _imports(PACKAGE / module)
    for name in forbidden:
        assert not _ours(imports, name), f"{module} imports {name}"


def test_sampler_and_reference_live_outside_the_sega_and_eval_modules():
    def defined(module: str) -> set[str]:
        tree = ast.parse((PACKAGE / module).read_text())
        return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    sega, evaluate = defined("training/sega.py"), defined("training/evaluate.py")
    for name in ("make_sampler", "load_reference", "score_rollout", "load_prompts"):
        assert name not in sega | evaluate, name


def test_random_init_lives_in_models():
    from megatron_sega.models import init

    assert callable(init.random_init) and callable(init.random_full_state_dict)
    session = _imports(PACKAGE / "training" / "session.py")
    assert "megatron_sega.models.init.random_init" in session
    assert not _ours(session, "megatron_sega.convert")  # no layout code left in the session


def test_broadcast_from_the_last_stage_is_written_once():
    """Every loop (training, eval, the sampler) broadcasts the last pipeline stage's tensors
    through ``runtime.stages.broadcast_from_last_stage``: ``dist.broadcast`` appears nowhere
    else."""
    callers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(node, ast.Attribute) and node.attr == "broadcast"
               and isinstance(node.value, ast.Name) and node.value.id == "dist"
               for node in ast.walk(tree)):
            callers.append(path.relative_to(PACKAGE).as_posix())
    assert callers == ["runtime/stages.py"]
