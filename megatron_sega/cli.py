"""``megatron-sega {sft,sega,dpo,eval,compare,generate,demo,check}``: run under torchrun (or
alone on CPU).

Every subcommand takes ``--config FILE`` and dotted overrides (``sega.k=8``), plus its own flags
(:data:`FLAGS`; ``compare`` takes its two eval directories before the overrides). A user error
(:class:`megatron_sega.errors.UserError`: bad config, data, checkpoint, parallel sizes, missing
files) prints one line naming the problem and exits 2; under torchrun it is printed once, not
once per rank. ``sft``, ``sega`` and ``dpo`` stopped by
SIGTERM/SIGUSR1 save a checkpoint and exit 75 ("resume me", see
megatron_sega/checkpoint/stop.py). Every command destroys its process groups before it exits,
on error paths too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import os
import sys
from typing import Callable, Optional

from megatron_sega.checkpoint import stop
from megatron_sega.errors import UserError

# subcommand -> (module, function, one-line help). The function takes (Config, argparse.Namespace).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("megatron_sega.training.sft", "run_sft", "reflective SFT on prompt -> chosen"),
    "sega": ("megatron_sega.training.sega", "run_sega",
             "SEGA: sample k candidates, entropy-score them, update the policy"),
    "dpo": ("megatron_sega.training.dpo", "run_dpo",
            "the DPO / IPO baselines on preference pairs, from a frozen reference"),
    "eval": ("megatron_sega.training.evaluate", "run_eval",
             "preference accuracy with the implicit reward beta * log pi(a|q)"),
    "compare": ("megatron_sega.training.compare", "run_compare",
                "paired difference of two evals of the same pairs: bootstrap CI, McNemar p"),
    "generate": ("megatron_sega.training.generate", "run_generate",
                 "print samples (with entropy scores) for a few prompts"),
    "demo": ("megatron_sega.demo", "run_demo",
             "the whole pipeline on the tiny model and shipped data (CPU, TP=2)"),
    "check": ("megatron_sega.cli", "run_check",
              "dry run: validate a config against a world size, without GPUs"),
    "plan": ("megatron_sega.plan.command", "run_plan",
             "per-GPU memory, the layouts that fit and time estimates for a cluster"),
}


def run_check(config, args) -> int:
    """Validate the config, the model shape and the parallel layout for ``--world-size``: the
    rules of every stage (``check``), or of the one a ``--dry-run`` names."""
    from megatron_sega.config import STAGES, check_stages
    from megatron_sega.runtime import validate_parallel_sizes
    from megatron_sega.training.session import model_spec

    config = shape_config(config)

    spec = model_spec(config)
    world = getattr(args, "world_size", None) or int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_parallel_sizes(
        config.parallel.tp, config.parallel.pp, world, num_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
        vpp=config.parallel.vpp, sequence_parallel=config.parallel.sequence_parallel,
        on_gpu=config.parallel.device != "cpu",
    )
    check_stages(config, dp, (args.command,) if args.command in STAGES else STAGES)
    from megatron_sega.training.dpo import check_dpo_microbatches
    from megatron_sega.training.sega import check_sega_microbatches
    from megatron_sega.training.sft import check_sft_microbatches

    check_sft_microbatches(config, dp)
    check_sega_microbatches(config, dp)
    check_dpo_microbatches(config, dp)
    for option in ("data.train", "data.eval", "model.load", "model.tokenizer"):
        section, key = option.split(".")
        value = getattr(getattr(config, section), key)
        if value and not os.path.exists(value) and "$" not in value:
            print(f"note: {option} = {value} does not exist on this machine (yet)")
    vpp = f" vpp={config.parallel.vpp}" if config.parallel.vpp else ""
    print(f"ok: tp={config.parallel.tp} pp={config.parallel.pp}{vpp} dp={dp} world={world}; "
          f"model {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}")
    return 0


def shape_config(config):
    """``config`` with a ``model.load`` that does not exist yet left out: a pipeline's later
    stages load what earlier stages will write, so the shape comes from the preset / HF config."""
    if config.model.load and not os.path.exists(config.model.load):
        print(f"note: model.load = {config.model.load} does not exist yet; using "
              f"model.preset={config.model.preset} / model.hf_config={config.model.hf_config}")
        config = config.with_overrides("model.load=null")
    return config


# ----------------------------------------------------------------------------- flags

def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and the world size, then exit")


def _training_flags(p: argparse.ArgumentParser) -> None:
    _dry_run(p)
    p.add_argument("--resume", default=None, help="auto | none | a checkpoint directory")
    p.add_argument("--no-load-optim", action="store_true",
                   help="resume the model only (e.g. at another TP/PP)")


def _generate_flags(p: argparse.ArgumentParser) -> None:
    _dry_run(p)
    p.add_argument("--out", default=None, help="directory to write the samples to")


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default outputs/demo)")
    p.add_argument("--quick", action="store_true", help="a shortened run")


def _compare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("eval_a", metavar="EVAL_A", help="an eval output directory (pairs.jsonl)")
    p.add_argument("eval_b", metavar="EVAL_B", help="the other one, of the same pairs")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")


def _check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=None,
                   help="the world size to validate against (default $WORLD_SIZE or 1)")


def _plan_flags(p: argparse.ArgumentParser) -> None:
    _check_flags(p)
    p.add_argument("--gpu", default=None, help="a100-40g | a100-80g | h100-80g | h200")
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes the world size spans (TP stays within a node; default 1)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation the time estimates assume (default 0.4)")


# subcommand -> the function that adds its own flags (besides --config and the overrides).
FLAGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "sft": _training_flags,
    "sega": _training_flags,
    "dpo": _training_flags,
    "eval": _dry_run,
    "compare": _compare_flags,
    "generate": _generate_flags,
    "demo": _demo_flags,
    "check": _check_flags,
    "plan": _plan_flags,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sega",
        description="GEM/SEGA preference alignment of Llama models on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file (see examples/configs/)")
        FLAGS.get(name, _dry_run)(p)  # first: `compare`'s positionals precede the overrides
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="dotted overrides, e.g. sega.k=8 parallel.tp=2")
    return parser


def _load(args):
    from megatron_sega.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if getattr(args, "no_load_optim", False):
        overrides.append("checkpoint.load_optim=false")
    return load_config(args.config, overrides)


def _quiet_megatron() -> None:
    """Silence the known library messages that ask nothing of a user: the list, and why each is
    harmless, is ``megatron_sega/logging/noise.py``; every other warning stays visible. It asks
    torch whether a GPU is visible (some are harmless on CPU only), so it runs after the stop
    handlers are installed, and before Megatron-Core is imported."""
    from megatron_sega.logging.noise import silence_known_messages

    silence_known_messages()


# ----------------------------------------------------------------------------- errors

def _launcher_store():
    """The key-value store every rank of this launch can reach, or None: the process group's
    once it exists, else torchrun's agent store (the errors of config loading come before the
    process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(addr, int(port), is_master=False,
                             timeout=datetime.timedelta(seconds=10))
    return None


def report_error(command: str, err: UserError) -> None:
    """Print a user error as one line, once per launch.

    Ranks that fail together (a bad config, a bad data file) raise the same message: the first
    to report it (counted in the launcher's store) prints it, the others wait until it has been
    printed, so that torchrun, which stops the group when one rank exits, cannot kill the printer
    first. An error only one rank raises is printed by that rank, and different errors are each
    printed. Without a store (one process, or srun without torchrun before the process group
    exists) every rank prints."""
    line = f"megatron-sega {command}: error: " + " ".join(str(err).split())
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"megatron_sega/error/{restart}/" + hashlib.sha1(line.encode()).hexdigest()
    store = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            store = _launcher_store()
            if store is not None and store.add(key, 1) > 1:
                store.wait([key + "/printed"], datetime.timedelta(seconds=30))
                return
        except Exception:  # noqa: BLE001 - no store, its host is gone, or the first printer
            store = None   # died before printing: print here rather than lose the message
    print(line, file=sys.stderr, flush=True)
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(key + "/printed", "1")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides after an option (`--out DIR sega.k=8`) are left over by argparse: keep them.
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    if not args.command:
        parser.print_help()
        return 0
    module_name, func_name, _ = COMMANDS[args.command]
    owns_groups = not _groups_exist()  # a caller's process group is the caller's to destroy
    stoppable = args.command in ("sft", "sega", "dpo")
    if stoppable:  # at once: a stop signal during the imports and the model load is not fatal
        stop.install_handlers(fresh=True)
    _quiet_megatron()
    try:
        config = _load(args)
        if getattr(args, "dry_run", False):
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
    except UserError as err:
        report_error(args.command, err)
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
