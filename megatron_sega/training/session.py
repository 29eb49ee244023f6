"""Everything a run needs, built once from the Config: runtime, tokenizer, model, optimizer, and
the parts built from a session: a frozen reference model, the checkpoint manager."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sega.config import Config, ConfigError, DataConfig, check_stages, torch_dtype
from megatron_sega.data import (
    DataError, PreferencePair, PromptFormatter, ReadOptions, Tokenizer, TINY_TOKENIZER_DIR,
    detect_formats, has_records, read_pairs, require_pairs,
)
from megatron_sega.checkpoint.mcore import (
    checkpoint_spec, checkpoint_tokenizer_dir, load_model_checkpoint, resolve_checkpoint_dir,
)
from megatron_sega.models.init import random_init
from megatron_sega.models.resolve import resolve_spec
from megatron_sega.models.spec import LlamaSpec
from megatron_sega.runtime import Runtime, choose_device, launch_info, setup, validate_parallel_sizes
from megatron_sega.training.engine import build_optimizer, build_training_model


@dataclass
class Session:
    config: Config
    runtime: Runtime
    spec: LlamaSpec
    tokenizer: Tokenizer
    formatter: PromptFormatter
    chunks: list
    dtype: torch.dtype
    optimizer: object = None
    scheduler: object = None
    # LoRA: the frozen base's record (checkpoint.fingerprint), which the run's checkpoints point
    # at, and the adapters the run started from (a LoRA checkpoint's; None: B = 0).
    lora_base: Optional[dict] = None
    start_adapters: Optional[list] = None

    @property
    def model(self):
        return self.chunks[0]

    @property
    def vocab_size(self) -> int:
        """The true vocabulary: the ids the tokenizer can produce. Entropies, log-probs and
        sampling run over these columns only; the model's rows beyond them (a model vocabulary
        larger than its tokenizer's, which no token reaches) and the TP padding never enter."""
        return min(self.spec.vocab_size, self.tokenizer.vocab_size)

    @property
    def is_metrics_rank(self) -> bool:
        """The rank that holds the DP-reduced metrics: last stage, TP rank 0, DP rank 0."""
        rt = self.runtime
        return rt.is_last_stage and rt.tp_rank == 0 and rt.dp_rank == 0

    @property
    def is_main(self) -> bool:
        return self.runtime.rank == 0

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)


def load_tokenizer(config: Config) -> Tokenizer:
    """``model.tokenizer``, else the tokenizer that ``model.load``'s checkpoint carries, else
    (preset 'tiny') the shipped tiny one. A ``model.tokenizer`` that is not the checkpoint's
    model's (``check_checkpoint_tokenizer``) is a ConfigError."""
    load = config.model.load if config.model.load and Path(config.model.load).exists() else None
    own = checkpoint_tokenizer_dir(load) if load else None
    path = config.model.tokenizer or (str(own) if own is not None else None)
    if path is None:
        if config.model.preset != "tiny":
            raise ConfigError(
                "no tokenizer: set model.tokenizer to a directory with tokenizer.json or "
                "tokenizer.model (a converted checkpoint carries one in its 'tokenizer' subdir)")
        path = str(TINY_TOKENIZER_DIR)
    tokenizer = Tokenizer.from_path(path)
    if config.model.tokenizer and load:
        check_checkpoint_tokenizer(tokenizer, config, own)
    return tokenizer


def check_checkpoint_tokenizer(tokenizer: Tokenizer, config: Config, own: Optional[Path]) -> None:
    """``model.tokenizer`` must be the tokenizer of ``model.load``'s checkpoint: the one it
    carries (``own``), else the BOS/EOS ids its spec records. A wrong one (a Llama-2 tokenizer on
    a Llama-3 checkpoint) would train on ids that mean other tokens to the model."""
    given, load = config.model.tokenizer, config.model.load
    fix = ("drop model.tokenizer to use the checkpoint's own, or point it at the tokenizer the "
           "checkpoint was trained with")
    if own is not None:
        difference = tokenizer.difference(Tokenizer.from_path(own))
        if difference:
            raise ConfigError(f"model.tokenizer = {given} is not the tokenizer of model.load = "
                              f"{load} ({own}): {difference}; {fix}")
        return
    spec = checkpoint_spec(load)
    if spec is None:
        return
    recorded = spec.eos_token_id
    eos = [i for i in (recorded if isinstance(recorded, (list, tuple)) else [recorded])
           if i is not None]
    if spec.bos_token_id is not None and tokenizer.bos_id not in (None, spec.bos_token_id):
        difference = f"bos id {tokenizer.bos_id} != {spec.bos_token_id}"
    elif eos and not set(eos) & set(tokenizer.stop_ids):
        difference = f"eos id {tokenizer.eos_id} not in {eos}"
    else:
        return
    raise ConfigError(f"model.tokenizer = {given} does not match the special tokens that "
                      f"model.load = {load} records: {difference}; point model.tokenizer at the "
                      "tokenizer the checkpoint was trained with")


def model_spec(config: Config, tokenizer_vocab: Optional[int] = None) -> LlamaSpec:
    """The run's model spec (``models.resolve.resolve_spec``), with the spec that ``model.load``'s
    checkpoint records, if it records one."""
    load = config.model.load
    recorded = checkpoint_spec(load) if load else None
    return resolve_spec(config, tokenizer_vocab, checkpoint_spec=recorded)


def read_options(data: DataConfig) -> ReadOptions:
    """How ``data.format``, ``data.columns`` and ``data.preference`` say records are laid out."""
    columns = {ours: theirs for ours, theirs in vars(data.columns).items() if ours != theirs}
    return ReadOptions(format=data.format, columns=columns, preference=data.preference)


def read_records(session: Session, path: str, split: Optional[str]) -> list[PreferencePair]:
    """The preference pairs of ``path`` (its ``split`` when it is a DatasetDict or a folder of
    split files) read as ``data.*`` says; bad records skipped are counted on the log, and a
    file that leaves none is a ``DataError``."""
    data = session.config.data
    pairs, report = read_pairs(path, on_bad_record=data.on_bad_record, split=split,
                               options=read_options(data))
    if report.total_dropped:
        session.print(report.summary())
    require_pairs(path, pairs, report)
    return pairs


def data_inputs(config: Config, stages: tuple[str, ...]) -> list[tuple[str, str]]:
    """The data options (name, path) that ``stages`` read: SFT, SEGA and DPO train on
    ``data.train`` (its split ``data.train_split``); eval scores ``data.eval``
    (``data.eval_split``), as SFT and DPO do when it is set; generate takes its prompts from
    ``data.eval``, else ``data.train``."""
    data = config.data
    wanted = []
    for stage in stages:
        if stage in ("sft", "sega", "dpo"):
            wanted.append("train")
        if stage in ("sft", "dpo", "eval") or stage == "sega" and config.sega.eval_interval:
            wanted.append("eval")
        if stage == "generate":
            wanted.append("eval" if data.eval else "train")
    return [(f"data.{key}", getattr(data, key)) for key in dict.fromkeys(wanted)
            if getattr(data, key)]


def check_data_inputs(config: Config, stages: tuple[str, ...]) -> None:
    """Each data path the ``stages`` read exists and holds at least one record; the format
    each file will be read in is printed, one line per option (on the first rank)."""
    for option, path in data_inputs(config, stages):
        split = getattr(config.data, f"{option.removeprefix('data.')}_split")
        if not Path(path).exists():
            raise DataError(f"{option} = {path} does not exist (relative paths start at "
                            f"{Path.cwd()}); point {option} at a JSONL/Parquet/Arrow file "
                            "or a datasets directory")
        if not has_records(path, split):
            raise DataError(f"{option} = {path} holds no records (an empty file); point "
                            f"{option} at a file of prompt/chosen/rejected records")
        if launch_info()[0] == 0:
            line = detect_formats(path, split, read_options(config.data))
            print(f"{option}: format {line}", flush=True)


def preflight(config: Config, *stages: str) -> int:
    """What a run can check before it builds anything: the parallel sizes against this launch's
    world size, the cross-section rules of its ``stages`` (``config.check_stages``), the data
    files they read (present, not empty), the device and the optional packages the config asks
    for. Returns the data-parallel size."""
    import importlib.util

    world = dist.get_world_size() if dist.is_initialized() else launch_info()[1]
    par = config.parallel
    dp = validate_parallel_sizes(par.tp, par.pp, world)
    check_stages(config, dp, stages)
    check_data_inputs(config, stages)
    choose_device(par.device)
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb = true but the wandb package is not installed; "
                          "pip install wandb, or set logging.wandb=false")
    return dp


def open_session(config: Config, *, train: bool, total_steps: int = 1,
                 lr_override: Optional[float] = None) -> Session:
    """Build the runtime, tokenizer and model (loaded from ``model.load`` or randomly
    initialised, identically at every layout) and, when training, the optimizer."""
    tokenizer = load_tokenizer(config)
    spec = model_spec(config, tokenizer_vocab=tokenizer.vocab_size)
    par = config.parallel
    device = choose_device(par.device)
    runtime = setup(par.tp, par.pp, device=device, vpp=par.vpp,
                    sequence_parallel=par.sequence_parallel, num_layers=spec.num_layers,
                    num_attention_heads=spec.num_attention_heads,
                    num_query_groups=spec.num_query_groups, seed=config.model.init_seed)
    if tokenizer.vocab_size < spec.vocab_size and runtime.rank == 0:
        print(f"note: the model has {spec.vocab_size} vocabulary rows but the tokenizer "
              f"{tokenizer.vocab_size} tokens; rows {tokenizer.vocab_size}..{spec.vocab_size - 1} "
              "are unreachable and are left out of entropies, log-probs and sampling", flush=True)
    dtype = torch_dtype(config, device)
    chunks = build_training_model(spec, runtime, dtype, attention=config.model.attention,
                                  use_distributed_optimizer=par.distributed_optimizer,
                                  sequence_parallel=par.sequence_parallel,
                                  recompute=config.model.recompute if train else "none",
                                  lora=config.lora.settings(), lora_seed=config.model.init_seed)
    info = None
    if config.model.load:
        info = load_model_checkpoint(chunks, resolve_checkpoint_dir(config.model.load))
    else:
        random_init(chunks, spec, runtime.tp, runtime.tp_rank, config.model.init_seed)
    session = Session(config, runtime, spec, tokenizer,
                      PromptFormatter(tokenizer, template=config.data.template), chunks, dtype)
    if config.lora.rank:
        _announce_lora(session)
        if train:
            _record_lora_base(session, info)
    if train:
        session.optimizer, session.scheduler = build_optimizer(
            chunks, config.optim, total_steps=total_steps, lr=lr_override, dtype=dtype,
            use_distributed_optimizer=par.distributed_optimizer)
        session.optimizer.reload_model_params()
    return session


def _announce_lora(session: Session) -> None:
    """One line: the adapters and how many parameters train, over the whole model."""
    from megatron_sega.models.lora import parameter_counts

    lora = session.config.lora
    trainable, frozen = parameter_counts(session.chunks, session.runtime)
    session.print(f"lora: rank {lora.rank}, alpha {lora.alpha:g}, on {', '.join(lora.targets)}: "
                  f"{trainable:,.0f} trainable parameters, {frozen:,.0f} frozen "
                  f"({100 * trainable / (trainable + frozen):.2f}% train)")


def _record_lora_base(session: Session, info) -> None:
    """The base the run's adapter checkpoints point at: ``model.load``'s own base when it is a
    LoRA adapter checkpoint (the run continues those adapters on it), else ``model.load``
    itself, or the random weights of ``model.init_seed``. A run that starts from adapters keeps
    a frozen copy of them: its default reference (see :func:`load_reference`)."""
    from megatron_sega.checkpoint.fingerprint import base_record, model_fingerprint
    from megatron_sega.checkpoint.mcore import lora_base
    from megatron_sega.models.lora import snapshot_adapters

    config = session.config
    base = lora_base(info) if info is not None else None
    if base is None:
        path = str(resolve_checkpoint_dir(config.model.load).resolve()) if info else None
        base = base_record(path, model_fingerprint(session.chunks, session.spec.vocab_size),
                           init_seed=config.model.init_seed)
    session.lora_base = base
    if info is not None and info.lora is not None:
        session.start_adapters = snapshot_adapters(session.chunks)


def load_reference(session: Session, path: Optional[str] = None) -> list:
    """A frozen model (same layout and chunks as the policy) loaded from ``path``, or without a
    path a copy of the policy's current weights (DPO's default reference: its starting weights);
    under LoRA without a path, the policy itself with its adapters off (no copy of the weights),
    or, for a run that started from a LoRA checkpoint, with the adapters it started from (a
    frozen copy of the adapters only)."""
    if path is None and session.config.lora.rank:
        from megatron_sega.models.lora import BaseModel

        return BaseModel(session.chunks, session.start_adapters)
    from megatron_sega.models.builder import build_model_chunks, unwrap_model, wrap_mixed_precision

    chunks = build_model_chunks(session.spec, session.runtime, dtype=session.dtype,
                                attention=session.config.model.attention)
    if path is None:
        for model, policy in zip(chunks, session.chunks):
            model.load_state_dict(unwrap_model(policy).state_dict(), strict=True)
    else:
        load_model_checkpoint(chunks, resolve_checkpoint_dir(path))
    # Wrapped like the policy (bf16 norms, fp32 logits), so both log-probs are alike.
    chunks = [wrap_mixed_precision(model) for model in chunks]
    for model in chunks:
        model.config.calculate_per_token_loss = True
    for p in (p for model in chunks for p in model.parameters()):
        p.requires_grad_(False)
    return chunks


def checkpoint_manager(session: Session, stage: str, iterator=None):
    """The ``CheckpointManager`` of a training stage, given this session's parts explicitly."""
    from megatron_sega.checkpoint.manager import CheckpointManager

    config = session.config
    return CheckpointManager(
        config.checkpoint, stage, chunks=session.chunks, optimizer=session.optimizer,
        scheduler=session.scheduler, iterator=iterator, runtime=session.runtime,
        spec=session.spec, tokenizer=session.tokenizer, run_config=config.to_dict(),
        distributed_optimizer=config.parallel.distributed_optimizer, lora_base=session.lora_base)


def stage_logger(session: Session, stage: str, start: int, steps: int):
    """The ``MetricsLogger`` of a training stage that runs steps ``start + 1 .. steps``: the
    ``logging`` section's sinks and interval, written by the metrics rank only, with a progress
    bar over the steps left. Records past ``start`` in the stage's JSONL (logged by a crashed
    run after the checkpoint it resumes from) are dropped, so each step appears once."""
    from megatron_sega.logging import MetricsLogger

    log = session.config.logging
    return MetricsLogger(log.dir, enabled=session.is_metrics_rank, tensorboard=log.tensorboard,
                         jsonl=log.jsonl, wandb=log.wandb, name=stage,
                         progress_total=steps - start, progress=log.progress,
                         run_config=session.config.to_dict(), interval=log.interval,
                         start_step=start)


def announce(session: Session, stage: str) -> None:
    """Keep the resolved config in the run's directory (``logging.dir``, else
    ``checkpoint.save_dir``) as ``<stage>_config.yaml`` and print one line naming it (rank 0).
    The whole config on stdout would bury the lines that matter."""
    if not session.is_main:
        return
    config = session.config
    directory = config.logging.dir or config.checkpoint.save_dir
    if not directory:
        print(f"== {stage}: resolved config not kept (set logging.dir to keep a copy)", flush=True)
        return
    path = Path(directory) / f"{stage}_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml())
    print(f"== {stage}: resolved config -> {path}", flush=True)


def dp_all_reduce(values: list[float], session: Session) -> list[float]:
    """Sum a few scalars over the data-parallel group (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=session.runtime.device)
    if session.runtime.dp > 1:
        dist.all_reduce(t, group=session.runtime.dp_group)
    return t.tolist()


def dp_sum(values: dict[str, float], session: Session) -> dict[str, float]:
    """Sum named scalars over the data-parallel group: one collective over the sorted keys
    (every rank passes the same names), float64."""
    keys = sorted(values)
    return dict(zip(keys, dp_all_reduce([float(values[k]) for k in keys], session)))
