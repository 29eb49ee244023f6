"""Typed, frozen, strict configuration.

A run is configured by one YAML file of sections (model, parallel, data, sampling, scoring, sega,
sft, dpo, optim, eval, checkpoint, logging) plus dotted command-line overrides (``sega.k=8``).
Unknown keys fail and name the closest valid key; wrong types fail naming the option, its value
and the expected type; cross-field rules are checked once, at construction. The object is
read-only afterwards.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megatron_sega.errors import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive(value: float, option: str) -> None:
    _check(math.isfinite(value) and value > 0, f"{option} must be > 0, got {value}")


def _budget(value: int, stage: str) -> None:
    _check(value >= 0, f"{stage}.max_tokens_per_microbatch must be >= 0 (0 = micro_batch_size "
                       f"rows of data.max_seq_len), got {value}")


# The sampler divides fp32 logits by the temperature and refuses a quotient that overflows fp32
# (3.4e38, megatron_sega/ops/sampling.py). From this temperature on, that takes a logit beyond
# 3.4e32, which no working model produces; at T = 1e-40, any logit above 0.034 does.
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    # Which model: model.load (a checkpoint's own metadata) > model.hf_config > model.preset.
    preset: Optional[str] = "tiny"  # a name from megatron_sega.models.PRESETS
    hf_config: Optional[str] = None  # a HF config.json (or directory) describing the architecture
    load: Optional[str] = None  # a megatron-sega checkpoint to start from (converted or trained)
    tokenizer: Optional[str] = None  # a directory with tokenizer.json / tokenizer.model
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attention: Literal["auto", "local", "sdpa"] = "auto"
    # Activation recomputation in training: none | selective (core attention) | full (each
    # layer runs again in backward; only its input is kept). `megatron-sega plan` shows the cost.
    recompute: Literal["none", "selective", "full"] = "none"
    init_seed: int = 1234  # weights of a model that is not loaded from a checkpoint


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the base model's linear layers (``models/lora.py``); rank 0 = off.
    The base weights are frozen; only the adapters train (SFT, SEGA, DPO)."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        _check(self.rank >= 0, f"lora.rank must be >= 0 (0 = off), got {self.rank}")
        _check(math.isfinite(self.alpha) and self.alpha > 0,
               f"lora.alpha must be > 0 (the update is scaled by alpha / rank), got {self.alpha}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not unknown and len(self.targets) > 0,
               f"lora.targets {list(self.targets)}: "
               + (f"unknown target(s) {unknown}; " if unknown else "none given; ")
               + f"choose among {', '.join(LORA_TARGETS)}")

    def settings(self):
        """The adapters to build (``models.lora.LoraSettings``), or None when LoRA is off."""
        if not self.rank:
            return None
        from megatron_sega.models.lora import LoraSettings

        return LoraSettings(self.rank, self.alpha, self.dropout, tuple(self.targets))


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed_optimizer: bool = True

    def __post_init__(self):
        _check(self.tp >= 1, f"parallel.tp must be >= 1, got {self.tp}")
        _check(self.pp >= 1, f"parallel.pp must be >= 1, got {self.pp}")


@dataclass(frozen=True)
class ColumnsConfig:
    # The file's column names for ours (OpenRLHF's prompt_key/chosen_key/rejected_key).
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass(frozen=True)
class DataConfig:
    train: Optional[str] = None
    eval: Optional[str] = None
    # Record layout (megatron_sega/data/formats.py); auto: detected per file from its first record.
    format: Literal["auto", "standard", "conversational", "implicit", "hh", "pku"] = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    preference: Literal["better", "safer"] = "better"  # pku: better_ or safer_response_id
    # The split of a DatasetDict directory (dataset_dict.json), or of a folder of split files
    # (<split>-*.parquet, ...), to read, e.g. train_prefs / test_prefs. None: a DatasetDict's
    # 'train', every file of a folder.
    train_split: Optional[str] = None
    eval_split: Optional[str] = None
    template: Literal["chat", "none"] = "chat"
    max_seq_len: int = 1024
    overlong: Literal["truncate_prompt_left", "drop"] = "truncate_prompt_left"
    on_bad_record: Literal["error", "skip"] = "error"
    seed: int = 1234
    # Padding-free batches (data/packing.py): whole sequences packed into rows of
    # <stage>.max_tokens_per_microbatch tokens, for sft, dpo, eval and the SEGA update.
    # auto: on with the project's SDPA attention (tested exact and faster), off with Transformer
    # Engine (its THD path is GPU only, not yet verified) and with Megatron's local attention.
    packing: Union[bool, Literal["auto"]] = "auto"

    def __post_init__(self):
        _check(self.max_seq_len >= 2, f"data.max_seq_len must be >= 2, got {self.max_seq_len}")


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    seed: int = 1234
    max_batch_tokens: int = 0  # 0: derive the KV-cache budget from free memory

    def __post_init__(self):
        _check(self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
               f"sampling.temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g} (smaller "
               f"ones overflow fp32 in logits / temperature), got {self.temperature}")
        _check(0 < self.top_p <= 1, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(self.max_new_tokens >= 1,
               f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class ScoringConfig:
    marker: str = "Final Answer:"
    final_fraction: float = 0.2
    top_m: float = 0.1
    lam: float = 1.0
    reward: Literal["identity", "softmax"] = "identity"
    tau: float = 1.0
    trim: Literal["none", "zscore", "lowest_fraction"] = "none"
    trim_z: float = 1.0
    trim_fraction: float = 0.25
    top_bottom_pairs: bool = False

    def __post_init__(self):
        _check(0 < self.final_fraction <= 1,
               f"scoring.final_fraction must be in (0, 1], got {self.final_fraction}")
        _check(self.top_m > 0, f"scoring.top_m must be > 0 (a fraction < 1 or a count), got "
                               f"{self.top_m}")
        _check(self.top_m < 1 or self.top_m == int(self.top_m),
               f"scoring.top_m = {self.top_m} >= 1 is a token count and must be whole; use "
               f"{int(self.top_m)} or a fraction < 1")
        _positive(self.tau, "scoring.tau")
        _check(math.isfinite(self.lam) and self.lam >= 0,
               f"scoring.lam must be >= 0 (the weight of the fork term; 0 turns it off), got "
               f"{self.lam}")
        _check(math.isfinite(self.trim_z) and self.trim_z >= 0,
               f"scoring.trim_z must be >= 0 (drop members below mean - trim_z * std), got "
               f"{self.trim_z}")
        _check(0 <= self.trim_fraction < 1,
               f"scoring.trim_fraction must be in [0, 1), got {self.trim_fraction}")


@dataclass(frozen=True)
class SegaConfig:
    k: int = 4
    steps: int = 100
    prompts_per_step: int = 8  # global, across data-parallel ranks
    micro_batch_size: int = 4  # candidates per microbatch in the update
    # With data.packing: the tokens of one packed microbatch (0: micro_batch_size * data.max_seq_len).
    max_tokens_per_microbatch: int = 0
    normalize_std: bool = False
    normalization: Literal["sequence_sum", "token_mean"] = "sequence_sum"
    updates_per_rollout: int = 1
    kl_coef: float = 0.0
    reference: Optional[str] = None  # frozen reference of the KL (default: the starting weights)
    clip_eps: float = 0.0  # > 0: PPO-style clipping when a rollout is reused
    max_bad_steps: int = 3  # consecutive NaN/Inf losses before the run stops
    lr: Optional[float] = None  # this stage's learning rate (default: optim.lr)
    eval_interval: int = 0  # evaluate on data.eval every this many steps (0 = off)

    def __post_init__(self):
        # k = 1 is fine for `generate`; the SEGA stage itself checks for k >= 2 (run_sega).
        _check(self.k >= 1, f"sega.k must be >= 1, got {self.k}")
        _check(self.steps >= 1, f"sega.steps must be >= 1, got {self.steps}")
        _check(self.prompts_per_step >= 1,
               f"sega.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        _check(self.micro_batch_size >= 1,
               f"sega.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _budget(self.max_tokens_per_microbatch, "sega")
        _check(self.updates_per_rollout >= 1,
               f"sega.updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
        _check(0 <= self.clip_eps < 1, f"sega.clip_eps must be in [0, 1), got {self.clip_eps}")
        _check(self.updates_per_rollout == 1 or self.clip_eps > 0,
               f"sega.updates_per_rollout = {self.updates_per_rollout} reuses each rollout, which "
               "is off-policy after the first update: set sega.clip_eps > 0 (e.g. 0.2) or "
               "sega.updates_per_rollout = 1")
        _check(math.isfinite(self.kl_coef) and self.kl_coef >= 0,
               f"sega.kl_coef must be >= 0, got {self.kl_coef}")
        _check(self.max_bad_steps >= 1, f"sega.max_bad_steps must be >= 1, got "
                                        f"{self.max_bad_steps}")
        _check(self.eval_interval >= 0,
               f"sega.eval_interval must be >= 0 (0 = off), got {self.eval_interval}")
        if self.lr is not None:
            _positive(self.lr, "sega.lr")


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    # With data.packing: the tokens of one packed microbatch (0: micro_batch_size * data.max_seq_len).
    max_tokens_per_microbatch: int = 0
    eval_interval: int = 0
    max_bad_steps: int = 3  # consecutive skipped steps (NaN/Inf loss or grad norm) before stopping
    lr: Optional[float] = None  # this stage's learning rate (default: optim.lr)

    def __post_init__(self):
        _check(self.steps >= 1, f"sft.steps must be >= 1, got {self.steps}")
        _check(self.max_bad_steps >= 1,
               f"sft.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        _check(self.global_batch_size >= 1,
               f"sft.global_batch_size must be >= 1, got {self.global_batch_size}")
        _check(self.micro_batch_size >= 1,
               f"sft.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _budget(self.max_tokens_per_microbatch, "sft")
        _check(self.eval_interval >= 0,
               f"sft.eval_interval must be >= 0 (0 = off), got {self.eval_interval}")
        if self.lr is not None:
            _positive(self.lr, "sft.lr")


@dataclass(frozen=True)
class DPOConfig:
    """The DPO / IPO baselines (``megatron-sega dpo``) on preference pairs."""

    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO; ipo: IPO
    beta: float = 0.1
    steps: int = 100
    global_batch_size: int = 16  # pairs, across data-parallel ranks
    micro_batch_size: int = 4  # pairs per microbatch (its chosen and rejected rows: 2x rows)
    # With data.packing: the tokens of one packed microbatch (0: 2 * micro_batch_size * data.max_seq_len).
    max_tokens_per_microbatch: int = 0
    eval_interval: int = 0
    max_bad_steps: int = 3  # consecutive skipped steps (NaN/Inf loss or grad norm) before stopping
    lr: Optional[float] = None  # this stage's learning rate (default: optim.lr)
    reference: Optional[str] = None  # frozen reference checkpoint (default: the starting weights)

    def __post_init__(self):
        _check(math.isfinite(self.beta) and self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        _check(self.steps >= 1, f"dpo.steps must be >= 1, got {self.steps}")
        _check(self.micro_batch_size >= 1,
               f"dpo.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _budget(self.max_tokens_per_microbatch, "dpo")
        _check(self.global_batch_size >= 1 and
               self.global_batch_size % self.micro_batch_size == 0,
               f"dpo.global_batch_size({self.global_batch_size}) must be a positive multiple of "
               f"dpo.micro_batch_size({self.micro_batch_size})")
        _check(self.eval_interval >= 0,
               f"dpo.eval_interval must be >= 0 (0 = off), got {self.eval_interval}")
        _check(self.max_bad_steps >= 1,
               f"dpo.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        _check(self.lr is None or self.lr > 0, f"dpo.lr must be > 0 (or null), got {self.lr}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8

    def __post_init__(self):
        _positive(self.lr, "optim.lr")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, lr], got {self.min_lr}")


@dataclass(frozen=True)
class EvalConfig:
    beta: float = 0.1
    reference: Optional[str] = None
    out: Optional[str] = None  # directory for pairs.jsonl and summary.json
    micro_batch_size: int = 8
    # With data.packing: the tokens of one packed microbatch (0: 2 * micro_batch_size * data.max_seq_len).
    max_tokens_per_microbatch: int = 0
    ties: Literal["wrong", "half"] = "wrong"  # wrong: RewardBench's rule; half: a tie is 1/2
    bootstrap_samples: int = 2000  # for the section intervals and `compare`
    answer_samples: int = 0  # > 0: answer accuracy, greedy + this many samples a prompt

    def __post_init__(self):
        # beta scales the implicit reward; <= 0 would invert or tie every comparison.
        _positive(self.beta, "eval.beta")
        _check(self.micro_batch_size >= 1,
               f"eval.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _budget(self.max_tokens_per_microbatch, "eval")
        # Fewer replicates leave the 2.5% tails resting on a handful of draws.
        _check(self.bootstrap_samples >= 200,
               f"eval.bootstrap_samples must be >= 200 for a 95% interval, got "
               f"{self.bootstrap_samples}; 2000 is the default")
        _check(self.answer_samples >= 0,
               f"eval.answer_samples must be >= 0 (0 = off), got {self.answer_samples}")


@dataclass(frozen=True)
class CheckpointConfig:
    save_dir: Optional[str] = None
    save_interval: int = 0  # 0: only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 2
    resume: str = "auto"  # auto | none | a checkpoint directory
    load_optim: bool = True

    def __post_init__(self):
        _check(self.save_interval >= 0,
               f"checkpoint.save_interval must be >= 0 (0 = at the end only), got "
               f"{self.save_interval}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class LoggingConfig:
    dir: Optional[str] = None
    tensorboard: bool = True
    jsonl: bool = True
    wandb: bool = False
    # TensorBoard, W&B and the progress bar's figures every `interval` steps (and at the last
    # step); the JSONL file keeps every step, the complete record.
    interval: int = 1
    progress: bool = True

    def __post_init__(self):
        _check(self.interval >= 1, f"logging.interval must be >= 1, got {self.interval}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    sega: SegaConfig = field(default_factory=SegaConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        # Resolved once, so every stage reads a bool; with_overrides resolves it again.
        object.__setattr__(self, "_packing_auto", self.data.packing == "auto")
        if self._packing_auto:
            object.__setattr__(self, "data", dataclasses.replace(
                self.data, packing=packing_default(self.model.attention)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, *overrides: str) -> "Config":
        """A copy with dotted overrides applied, validated like the command line's."""
        base = self.to_dict()
        if getattr(self, "_packing_auto", False):
            base["data"]["packing"] = "auto"
        return load_config(None, list(overrides), base=base)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


STAGES = ("sft", "sega", "dpo", "eval", "generate")


def packing_default(attention: str) -> bool:
    """``data.packing: auto``: packed batches with the project's SDPA attention (``sdpa``, or
    ``auto`` where Transformer Engine does not import), where they are tested equal to padded
    batches and faster; padded ones with TE and with Megatron's local attention."""
    if attention == "auto":
        from megatron_sega.runtime.distributed import have_transformer_engine
        return not have_transformer_engine()
    return attention == "sdpa"


PACKED_STAGES = ("sft", "dpo", "eval", "sega")


def token_budget(config: Config, stage: str) -> int:
    """The tokens of one packed microbatch of ``stage`` (sft, dpo, eval, sega):
    ``<stage>.max_tokens_per_microbatch``, or by default as many as its padded microbatch holds
    at most (``micro_batch_size`` rows of ``data.max_seq_len``; pairs count two rows)."""
    section = getattr(config, stage)
    if section.max_tokens_per_microbatch:
        return section.max_tokens_per_microbatch
    rows = section.micro_batch_size * (2 if stage in ("dpo", "eval") else 1)
    return rows * config.data.max_seq_len


def check_packing(config: Config, stages: tuple[str, ...]) -> None:
    """With ``data.packing``: an attention that takes packed sequences, and a budget that holds
    the longest sequence ``data.max_seq_len`` allows (a pair's two sequences are checked on the
    data, ``data.packing.pack_rows``)."""
    if not config.data.packing:
        return
    _check(config.model.attention != "local",
           "data.packing = true needs model.attention sdpa or auto (Megatron's local attention "
           "takes no packed sequences); set model.attention=sdpa or data.packing=false")
    seq = config.data.max_seq_len
    for stage in (s for s in PACKED_STAGES if s in stages):
        budget = token_budget(config, stage)
        _check(budget >= seq, f"{stage}.max_tokens_per_microbatch({budget}) is less than "
                              f"data.max_seq_len({seq}): a sequence of that length cannot be "
                              f"packed; raise {stage}.max_tokens_per_microbatch to at least "
                              f"{seq} or lower data.max_seq_len")


def check_sega_group(config: Config) -> None:
    """SEGA's advantages are centred on each prompt's group mean: one candidate has none, and
    k identical candidates (greedy decoding: temperature 0 or top-k 1) have all-zero advantages,
    so every group would be skipped and no step would ever update the policy."""
    k, sampling = config.sega.k, config.sampling
    _check(k >= 2, f"sega.k = {k}: SEGA needs k >= 2 candidates per prompt "
                   "(group-mean advantages need a group); set sega.k=4")
    greedy = ("sampling.temperature = 0" if sampling.temperature == 0
              else "sampling.top_k = 1" if sampling.top_k == 1 else None)
    _check(greedy is None,
           f"{greedy} decodes greedily: the sega.k({k}) candidates of a prompt would be identical "
           "and SEGA would never update; sample (e.g. sampling.temperature=1.0, "
           "sampling.top_k=0), or use `megatron-sega generate` with sega.k=1 for greedy output")


def check_stages(config: Config, dp: int, stages: tuple[str, ...] = STAGES) -> None:
    """The rules that join two sections or depend on the data-parallel size ``dp``, for the
    ``stages`` a command runs. Every run checks its own before it builds anything
    (``training.session.preflight``); ``megatron-sega check`` checks them all."""
    check_packing(config, stages)
    if "sft" in stages:
        gbs = config.sft.global_batch_size
        _check(gbs % dp == 0, f"sft.global_batch_size({gbs}) is not divisible by the "
                              f"data-parallel size dp({dp}); make it a multiple of {dp}")
    if "dpo" in stages:
        gbs = config.dpo.global_batch_size
        _check(gbs % dp == 0, f"dpo.global_batch_size({gbs}) is not divisible by the "
                              f"data-parallel size dp({dp}); make it a multiple of {dp}")
    if "sega" in stages:
        check_sega_group(config)
        prompts = config.sega.prompts_per_step
        _check(prompts % dp == 0, f"sega.prompts_per_step({prompts}) is not divisible by the "
                                  f"data-parallel size dp({dp}); make it a multiple of {dp}")
    if "sega" in stages and config.sega.eval_interval:
        _check(bool(config.data.eval), f"sega.eval_interval = {config.sega.eval_interval} "
               "evaluates on data.eval, which is not set; set data.eval or sega.eval_interval=0")
    answers = "eval" in stages or "sega" in stages and config.sega.eval_interval
    if config.eval.answer_samples and answers:
        _check(bool(config.scoring.marker),
               f"eval.answer_samples = {config.eval.answer_samples} finds each final answer "
               "after scoring.marker, which is empty; set scoring.marker (e.g. 'Final Answer:')")
    if "sega" in stages or "generate" in stages:
        seq, new = config.data.max_seq_len, config.sampling.max_new_tokens
        _check(seq > new, f"data.max_seq_len({seq}) must exceed sampling.max_new_tokens({new}) "
                          f"by the prompt length; raise data.max_seq_len or lower "
                          f"sampling.max_new_tokens")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _expected(tp: Any) -> str:
    if tp is bool:
        return "true/false"
    if typing.get_origin(tp) is Literal:
        return "/".join(map(str, typing.get_args(tp)))
    return _type_name(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples from lists)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) > 1:  # e.g. data.packing: true, false or auto
            expected = " or ".join(_expected(arg) for arg in args if arg is not type(None))
            raise ConfigError(f"{where} = {value!r} should be {expected}")
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} should be a list")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} should be a number (float)")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r} should be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r} should be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r} should be a string")
        return value
    raise ConfigError(f"{where}: unsupported option type {_type_name(tp)}")


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown key '{where}{key}'{hint}")


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"section '{where.rstrip('.')}' should be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(str(key), names, where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``sega.k=8`` -> ('sega.k', 8); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' should look like section.key=value (e.g. sega.k=8)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = (),
                base: Optional[dict] = None) -> Config:
    """Load a YAML config (or start from ``base`` / defaults) and apply dotted overrides."""
    data: dict = dict(base or {})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file '{file}' does not exist")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{file}{line}: invalid YAML ({getattr(err, 'problem', err)})")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level should be a mapping of sections")
        data = _deep_merge(data, loaded)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    try:
        return _build(Config, data, "")
    except TypeError as err:  # a section given as a scalar, etc.
        raise ConfigError(f"invalid configuration: {err}")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def torch_dtype(config: Config, device: str):
    import torch

    if config.model.dtype == "fp32" or (config.model.dtype == "auto" and device == "cpu"):
        return torch.float32
    return torch.bfloat16
