"""Convert Llama checkpoints between Hugging Face and Megatron-Core ``torch_dist``.

    python tools/convert.py hf-to-mcore --hf-dir DIR --out DIR --tp N --pp M [--dtype bf16|fp32]
    python tools/convert.py mcore-to-hf --mcore-dir DIR --out DIR [--dtype bf16|fp32]
                                        [--max-shard-size 5GB]
                                        [--peft-adapter] [--lora-alpha A]

Runs in one process (``python``, not ``torchrun``) and streams tensor by tensor: peak memory is
about the largest tensor twice, whatever the model size. The Megatron checkpoint loads at any
TP/PP with the same padded vocabulary; --tp/--pp are validated and fix that padding. Tokenizer
files are copied along in both directions. See megatron_sega/convert/hf_mcore.py.

A LoRA checkpoint (base + adapters) exports merged HF weights (W + alpha / rank * B A), or with
--peft-adapter a PEFT adapter directory for the HF base. Its alpha is the one the checkpoint
records (megatron_sega.json); --lora-alpha gives it for one written before alpha was recorded (the
rank is read from the tensors). A flag that does not fit the checkpoint is a usage error: one
line, exit 2.

The output appears whole or not at all, with a record of what was converted (conversion.json).
Rerunning the same command over it does nothing and exits 0 (a job killed after the conversion
but before its launcher noted it); any other existing, non-empty --out is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def shard_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron torch_dist")
    to_mcore.add_argument("--hf-dir", required=True, type=Path)
    to_mcore.add_argument("--out", required=True, type=Path)
    to_mcore.add_argument("--tp", type=int, default=1, help="target tensor parallel size")
    to_mcore.add_argument("--pp", type=int, default=1, help="target pipeline parallel size")
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron torch_dist -> HF safetensors")
    to_hf.add_argument("--mcore-dir", required=True, type=Path)
    to_hf.add_argument("--out", required=True, type=Path)
    to_hf.add_argument("--max-shard-size", type=shard_size, default=shard_size("5GB"))
    to_hf.add_argument("--lora-alpha", type=float, default=None,
                       help="the run's lora.alpha (required for a checkpoint with LoRA adapters)")
    to_hf.add_argument("--peft-adapter", action="store_true",
                       help="write a HF PEFT adapter directory instead of merged weights")
    for command in (to_mcore, to_hf):
        command.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                             help="dtype of the written weights (default: as in the source)")
    return p


def _lora_usage_error(args) -> str | None:
    """Why --lora-alpha / --peft-adapter do not fit the checkpoint, or None."""
    from megatron_sega.checkpoint.mcore import read_info, resolve_checkpoint_dir
    from megatron_sega.convert.lora_export import check_export, export_alpha, stored_adapters
    from megatron_sega.errors import UserError

    try:
        directory = resolve_checkpoint_dir(str(args.mcore_dir))
        adapters = stored_adapters(directory)
        recorded = read_info(directory).lora
    except UserError:
        return None  # not a checkpoint: the converter says so
    try:
        alpha = export_alpha(args.lora_alpha, recorded, str(directory))
        check_export(adapters, args.peft_adapter, alpha, str(directory))
    except UserError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    source = args.hf_dir if args.command == "hf-to-mcore" else args.mcore_dir
    if not source.is_dir():
        print(f"error: {source}: no such directory", file=sys.stderr)
        return 2
    from megatron_sega.logging.noise import silence_known_messages

    silence_known_messages()
    from megatron_sega.convert.hf_mcore import hf_to_mcore, mcore_to_hf
    from megatron_sega.convert.record import RECORD_FILE
    from megatron_sega.errors import UserError

    if args.command == "mcore-to-hf":
        usage = _lora_usage_error(args)
        if usage:
            print(f"error: {usage}", file=sys.stderr)
            return 2
    # The converters never overwrite: a record there before a success means nothing was done.
    earlier = (args.out / RECORD_FILE).is_file()
    start = time.time()
    try:
        if args.command == "hf-to-mcore":
            info = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype)
            what = (f"{info.spec.num_layers} layers, padded vocab {info.padded_vocab_size}, "
                    f"{info.dtype}, for tp={args.tp} pp={args.pp}")
        else:
            mcore_to_hf(args.mcore_dir, args.out, dtype=args.dtype,
                        max_shard_bytes=args.max_shard_size, lora_alpha=args.lora_alpha,
                        peft_adapter=args.peft_adapter)
            what = ("PEFT adapter" if args.peft_adapter else "HF safetensors + config.json")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            from megatron_sega.runtime import teardown

            teardown()
    if earlier:
        print(f"{args.out} already holds this conversion ({what}); nothing to do")
    else:
        print(f"wrote {args.out} ({what}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
