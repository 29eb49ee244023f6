"""Shared step machinery: the DDP-wrapped model, Megatron's optimizer, one forward/backward.

Loss normalisation contract (exact under any TP/PP/DP and microbatch split):
every loss function returns ``sum over its microbatch / global_normaliser``, where the global
normaliser (tokens, sequences or groups of the *whole* global batch) is computed before the step.
We set ``calculate_per_token_loss=True`` so Megatron neither divides by the number of microbatches
nor averages gradients over DP, and report a token count of 1 for the whole global batch (first
microbatch of DP rank 0) so that ``finalize_model_grads`` divides by exactly 1.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch

from megatron_sega.config import OptimConfig
from megatron_sega.models.builder import build_model_chunks, unwrap_model, wrap_mixed_precision
from megatron_sega.models.spec import LlamaSpec
from megatron_sega.runtime import Runtime, any_rank

# A loss function gets this rank's vocab-parallel logits shard [b, s, V_pad/TP] and the
# microbatch dict, and returns (loss already divided by the global normaliser, metrics).
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """Megatron's convention: True where attention is forbidden. Passing it explicitly avoids the
    default mask that Megatron builds on ``cuda``."""
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


def training_mask(model_chunks, seq_len: int, device) -> Optional[torch.Tensor]:
    """The attention mask a training forward passes: None where every layer's core attention
    applies causal masking itself (``models.sdpa.SDPAttention``: ``is_causal``, which reaches
    flash attention with GQA; Transformer Engine's, which ignores a mask of its causal type),
    else the explicit causal mask (Megatron's local ``DotProductAttention``). Batches are
    right-padded, so causal attention alone keeps real tokens off the padding."""
    from megatron_sega.models.sdpa import SDPAttention

    def masks_itself(core) -> bool:
        return isinstance(core, SDPAttention) or type(core).__name__ == "TEDotProductAttention"

    if all(masks_itself(layer.self_attention.core_attention)
           for chunk in model_chunks for layer in unwrap_model(chunk).decoder.layers):
        return None
    return causal_mask(seq_len, device)


def build_training_model(spec: LlamaSpec, runtime: Runtime, dtype=torch.float32, *,
                         use_distributed_optimizer: bool = True, **kwargs):
    """This stage's model chunks (one, or ``runtime.vpp`` under virtual pipelining), each
    wrapped as Megatron does on GPU: ``Float16Module`` when bf16 (see ``wrap_mixed_precision``),
    then DDP (grads in fp32 buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )
    wrapped = []
    for i, model in enumerate(build_model_chunks(spec, runtime, dtype=dtype, **kwargs)):
        model = wrap_mixed_precision(model)
        model.config.calculate_per_token_loss = True
        # As Megatron's own get_model: only the first chunk's buffer is split into buckets.
        wrapped.append(DistributedDataParallel(config=model.config, ddp_config=ddp_config,
                                               module=model, disable_bucketing=i > 0))
    return wrapped


def build_optimizer(model_chunks: list, optim: OptimConfig, *, total_steps: int,
                    use_distributed_optimizer: bool = True, lr: Optional[float] = None,
                    dtype=torch.float32):
    """Megatron's Adam (distributed over DP when asked) and a warmup + cosine LR scheduler
    over ``total_steps``; ``lr`` overrides ``optim.lr`` (per-stage learning rates)."""
    lr = lr or optim.lr
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks,
                                       use_gloo_process_groups=torch.cuda.is_available())
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else lr,
        max_lr=lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    for chunk in model_chunks:
        _wire_config(chunk, model_chunks)
    return optimizer, scheduler


def optimizer_state_bytes(optimizer) -> int:
    """The bytes of optimizer state this rank holds: Adam's two moments and, in bf16, the fp32
    main copies of its parameter shard (the step counters left out). States Megatron creates at
    the first step are made now with dummy values, so the count holds before any step."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
        for state in opt.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for k, t in state.items()
                         if isinstance(t, torch.Tensor) and k != "step")
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):  # bf16: fp32 mains
            total += sum(p.numel() * p.element_size() for p in group)
    return total


def _wire_config(chunk, model_chunks: list) -> None:
    from megatron.core.distributed import finalize_model_grads

    config = chunk.config
    config.finalize_model_grads_func = finalize_model_grads
    # The interleaved schedule reads the first chunk's config and wants one no_sync per chunk.
    config.no_sync_func = (chunk.no_sync if len(model_chunks) == 1
                           else [c.no_sync for c in model_chunks])
    config.grad_sync_func = None


def _unit_count(runtime: Runtime, first: bool, device) -> torch.Tensor:
    value = 1 if (first and runtime.dp_rank == 0) else 0
    return torch.tensor(value, dtype=torch.int, device=device)


def check_microbatch_count(count: int, pp: int, vpp: Optional[int], what: str) -> None:
    """Megatron's interleaved schedule (virtual pipelining) runs the microbatches in groups of
    ``pp`` per model chunk: their number must be a multiple of ``pp``. ``what`` names the
    options that set it."""
    if vpp is not None and count % pp != 0:
        from megatron_sega.runtime import ParallelConfigError

        raise ParallelConfigError(
            f"{what} gives {count} microbatches per rank, not a multiple of pp({pp}), which "
            f"parallel.vpp={vpp} (the interleaved schedule) needs; change the batch or micro "
            "batch size, or unset parallel.vpp")


def forward_backward(
    model_chunks: list,
    runtime: Runtime,
    microbatches: list[dict],
    loss_fn: LossFn,
    *,
    forward_only: bool = False,
) -> list[dict]:
    """Run Megatron's schedule (no pipelining, 1F1B for PP > 1, interleaved 1F1B over the model
    chunks under virtual pipelining) over this rank's microbatches.

    Each microbatch is a dict with ``tokens`` [b, s] (plus whatever ``loss_fn`` reads); all
    microbatches of a step share one shape (the pipeline sends fixed-size activations).
    Returns the per-microbatch metrics dicts on the last stage (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("forward_backward needs at least one microbatch")
    seq = microbatches[0]["tokens"].shape[1]
    if model_chunks[0].config.sequence_parallel:  # TP ranks split the sequence: pad it
        microbatches = [_pad_positions(mb, seq, (-seq) % runtime.tp) for mb in microbatches]
    n_real = len(microbatches)
    if len(model_chunks) > 1 and forward_only and n_real % runtime.pp:
        # A forward pass may repeat a microbatch to fill the interleaved schedule's groups; its
        # outputs are dropped below. (Training steps are sized by the config instead.)
        microbatches = microbatches + [microbatches[-1]] * (-n_real % runtime.pp)
    if len(model_chunks) > 1:
        check_microbatch_count(len(microbatches), runtime.pp, runtime.vpp, "this step")
    batch, seq_len = microbatches[0]["tokens"].shape
    device = runtime.device
    mask = training_mask(model_chunks, seq_len, device)
    position_ids = torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1)

    def loss_wrapper(microbatch: dict, first: bool, logits: torch.Tensor):
        loss, metrics = loss_fn(logits, microbatch)
        return loss, _unit_count(runtime, first, device), metrics

    def forward_step(data_iterator, model):
        # Every chunk walks the microbatches in order; only the last one computes the loss.
        index, microbatch = next(data_iterator)
        tokens = microbatch["tokens"].to(device)
        if "cu_seqlens" in microbatch:  # a packed row (data.packing): THD, one row
            output = model(tokens, microbatch["position_ids"].to(device), None,
                           packed_seq_params=packed_seq_params(microbatch, device))
        else:
            output = model(tokens, position_ids, mask)
        return output, partial(loss_wrapper, microbatch, index == 0)

    if not forward_only:
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
            # Megatron's non-distributed optimizer leaves param.grad aliasing main_grad; autograd
            # would then accumulate into it *and* DDP's hook would add it again (double grads).
            for param in chunk.parameters():
                param.grad = None
    data = [iter(enumerate(microbatches)) for _ in model_chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data if len(model_chunks) > 1 else data[0],
        model=model_chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=batch,
        forward_only=forward_only,
    )
    outputs = outputs[:n_real]
    if seq_len != seq:  # per-position metrics back to the caller's length
        outputs = [_pad_positions(out, seq_len, seq - seq_len) for out in outputs]
    return outputs


def packed_seq_params(microbatch: dict, device):
    """Megatron's ``PackedSeqParams`` (THD) of a packed row (``data.packing.PackedBatch``): its
    segments' offsets. Attention stays inside each segment (``models.sdpa.SDPAttention``, or
    Transformer Engine's varlen kernels: GPU only, not yet verified) and Megatron's THD RoPE
    restarts the positions at each one. The offsets already include each sequence's alignment
    padding, so the padded and unpadded offsets are the same."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = microbatch["cu_seqlens"].to(device=device, dtype=torch.int32)
    longest = int(microbatch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _pad_positions(values: dict, seq: int, extra: int) -> dict:
    """``values`` with every tensor of positions (dim 1 of size ``seq``) zero-padded by ``extra``
    positions at the end (or cut, when ``extra < 0``). Right padding with a zero loss mask
    changes nothing at the real positions under causal attention."""
    if extra == 0:
        return values
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq:
            value = (torch.nn.functional.pad(value, (0, 0) * (value.dim() - 2) + (0, extra))
                     if extra > 0 else value[:, :seq + extra])
        out[key] = value
    return out


def optimizer_step(optimizer, scheduler, *, device=None, loss_finite: bool = True,
                   increment: int = 1) -> dict:
    """One optimizer step, or none on every rank together: the step is skipped when any rank's
    loss (``loss_finite``: this rank's, only the last stage's counts) or the grad norm is NaN/Inf.

    Megatron's ``optimizer.step()`` checks for inf/NaN only under a grad scaler (fp16); without
    one, Adam would write NaN into the weights and its moments. So its step is taken apart here
    (Megatron-Core 0.19 ``MixedPrecisionOptimizer``/``FP32Optimizer``/``ChainedOptimizer.step``):
    grads to the main grads, the norm (and clipping, which only touches the grads), then one
    agreement over the world (``any_rank``), and only then the update and the LR schedule.
    ``device``: where the agreement's tensor lives (default: the optimizer's parameters').
    Returns {'update_successful', 'skipped_update', 'grad_norm', 'lr'}."""
    if device is None:
        device = next(p.device for group in optimizer.param_groups for p in group["params"])
    found_inf = optimizer.prepare_grads()  # True only under a grad scaler
    clip = optimizer.config.clip_grad
    grad_norm = float(optimizer.clip_grad_norm(clip) if clip > 0 else optimizer.get_grad_norm())
    skip = any_rank(found_inf or not loss_finite or not math.isfinite(grad_norm), device)
    ok = False if skip else optimizer.step_with_ready_grads()
    if ok:
        scheduler.step(increment=increment)
    lr = optimizer.param_groups[0]["lr"]
    return {"update_successful": bool(ok), "skipped_update": skip, "grad_norm": grad_norm,
            "lr": float(lr)}


def nonfinite_loss(logits: torch.Tensor, names) -> tuple[torch.Tensor, dict]:
    """What a loss function returns for logits with NaN/Inf (``ops.NonFiniteLogitsError``, raised
    on every TP rank together): a NaN loss still connected to the graph, so that the pipeline's
    schedule and its backward stay the same as on the other ranks, and NaN metrics ``names``.
    :func:`optimizer_step` then skips the step on all ranks."""
    nan = logits.sum() * float("nan")
    return nan, {name: nan.detach() for name in names}


class BadSteps:
    """Consecutive skipped steps (see :func:`optimizer_step`) of the training ``stage`` ('sft',
    'sega' or 'dpo'), stopping after its ``max_bad_steps``. Every rank skips together, so the
    count, and the decision to stop, is the same on all."""

    def __init__(self, config, stage: str):
        section = getattr(config, stage)
        self.limit, self.option, self.in_a_row = section.max_bad_steps, f"{stage}.max_bad_steps", 0
        # The learning rate this stage runs at: its own option when set, else optim.lr.
        self.lr_option = f"{stage}.lr" if section.lr is not None else "optim.lr"

    def count(self, metrics: dict) -> bool:
        """Count a step's ``skipped_update`` into ``metrics``; True: stop the run."""
        self.in_a_row = self.in_a_row + 1 if metrics["skipped_update"] else 0
        metrics["bad_steps_in_a_row"] = self.in_a_row
        return self.in_a_row >= self.limit

    def reason(self) -> str:
        return (f"stopping: {self.in_a_row} consecutive steps skipped for a NaN/Inf loss or grad "
                f"norm ({self.option}={self.limit}); lower {self.lr_option} or check the data")
