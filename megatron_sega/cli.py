"""``megatron-sega {sft,sega,eval,generate,demo,check}``: run under torchrun (or alone on CPU).

Every subcommand takes ``--config FILE`` and dotted overrides (``sega.k=8``). User errors (bad
config, bad data, bad parallel sizes, missing files) print one line naming the problem and exit 2.
``sft`` and ``sega`` stopped by SIGTERM/SIGUSR1 save a checkpoint and exit 75 ("resume me", see
megatron_sega/checkpoint/manager.py). Every command destroys its process groups before it exits,
on error paths too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Optional

from megatron_sega.checkpoint import stop

# subcommand -> (module, function, one-line help). The function takes (Config, argparse.Namespace).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("megatron_sega.training.sft", "run_sft", "reflective SFT on prompt -> chosen"),
    "sega": ("megatron_sega.training.sega", "run_sega",
             "SEGA: sample k candidates, entropy-score them, update the policy"),
    "eval": ("megatron_sega.training.evaluate", "run_eval",
             "preference accuracy with the implicit reward beta * log pi(a|q)"),
    "generate": ("megatron_sega.training.generate", "run_generate",
                 "print samples (with entropy scores) for a few prompts"),
    "demo": ("megatron_sega.demo", "run_demo",
             "the whole pipeline on the tiny model and shipped data (CPU, TP=2)"),
    "check": ("megatron_sega.cli", "run_check",
              "dry run: validate a config against a world size, without GPUs"),
}


class UserError(Exception):
    """An error whose message is the whole story (printed without a traceback)."""


def _user_error_types() -> tuple[type, ...]:
    from megatron_sega.config import ConfigError
    from megatron_sega.models.spec import ModelConfigError
    from megatron_sega.runtime import ParallelConfigError

    types_: list[type] = [UserError, ConfigError, ModelConfigError, ParallelConfigError,
                          FileNotFoundError]
    for module, name in (("megatron_sega.data", "DataError"),
                         ("megatron_sega.data", "TokenizerError"),
                         ("megatron_sega.checkpoint.layout", "LayoutError"),
                         ("megatron_sega.checkpoint.mcore", "CheckpointError"),
                         ("megatron_sega.checkpoint.hf", "ConversionError"),
                         ("megatron_sega.sampling", "SamplerMemoryError")):
        try:
            types_.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types_)


def run_check(config, args) -> int:
    """Validate the config, the model shape and the parallel layout for ``--world-size``."""
    from megatron_sega.models.resolve import resolve_spec
    from megatron_sega.runtime import validate_parallel_sizes

    if config.model.load and not os.path.exists(config.model.load):
        # A pipeline's later stages load what earlier stages will write: check the shape from
        # the preset / HF config instead.
        print(f"note: model.load = {config.model.load} does not exist yet; checking "
              f"model.preset={config.model.preset} / model.hf_config={config.model.hf_config}")
        config = config.with_overrides("model.load=null")
    spec = resolve_spec(config)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_parallel_sizes(
        config.parallel.tp, config.parallel.pp, world, num_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
        vpp=config.parallel.vpp, sequence_parallel=config.parallel.sequence_parallel,
        on_gpu=config.parallel.device != "cpu",
    )
    if config.sega.prompts_per_step % dp != 0:
        raise UserError(f"sega.prompts_per_step({config.sega.prompts_per_step}) is not divisible "
                        f"by the data-parallel size dp({dp}); make it a multiple of {dp}")
    if config.sft.global_batch_size % dp != 0:
        raise UserError(f"sft.global_batch_size({config.sft.global_batch_size}) is not divisible "
                        f"by dp({dp}); make it a multiple of {dp}")
    for option in ("data.train", "data.eval", "model.load", "model.tokenizer"):
        section, key = option.split(".")
        value = getattr(getattr(config, section), key)
        if value and not os.path.exists(value) and "$" not in value:
            print(f"note: {option} = {value} does not exist on this machine (yet)")
    print(f"ok: tp={config.parallel.tp} pp={config.parallel.pp} dp={dp} world={world}; "
          f"model {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sega",
        description="GEM/SEGA preference alignment of Llama models on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file (see examples/configs/)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="dotted overrides, e.g. sega.k=8 parallel.tp=2")
        p.add_argument("--world-size", type=int, default=None,
                       help="(check) the world size to validate against")
        p.add_argument("--dry-run", action="store_true",
                       help="validate the config and the world size, then exit")
        p.add_argument("--resume", default=None, help="auto | none | a checkpoint directory")
        p.add_argument("--no-load-optim", action="store_true",
                       help="resume the model only (e.g. at another TP/PP)")
        p.add_argument("--out", default=None, help="(demo) output directory")
        p.add_argument("--quick", action="store_true", help="(demo) a shortened run")
    return parser


def _load(args):
    from megatron_sega.config import load_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.no_load_optim:
        overrides.append("checkpoint.load_optim=false")
    return load_config(args.config, overrides)


def _quiet_megatron() -> None:
    """Megatron-Core warns at import about optional GPU kernels (Apex, TE) and deprecations;
    those say nothing to a user of this tool."""
    import logging
    import warnings

    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_megatron()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module_name, func_name, _ = COMMANDS[args.command]
    owns_groups = not _groups_exist()  # a caller's process group is the caller's to destroy
    stoppable = args.command in ("sft", "sega")
    if stoppable:  # at once: a stop signal during the imports and the model load is not fatal
        stop.install_handlers(fresh=True)
    errors = _user_error_types()
    try:
        config = _load(args)
        if args.dry_run and args.command != "check":
            return run_check(config, args)
        if stoppable and not config.checkpoint.save_dir:
            stoppable = False
            stop.release_handlers()  # nowhere to save: signals act as usual
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            print(f"megatron-sega {args.command}: not built yet in this version", file=sys.stderr)
            return 3
        func: Callable = getattr(module, func_name)
        rc = int(func(config, args) or 0)
        return stop.exit_code(rc) if stoppable else rc
    except errors as err:
        print(f"megatron-sega {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        # Left to interpreter exit, the groups' threads can abort the process ("terminate
        # called without an active exception") after the work is done.
        if owns_groups and _groups_exist():
            from megatron_sega.runtime import teardown

            teardown()


def _groups_exist() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported (`check`): no groups
    return dist is not None and dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
