"""KV-cached batched generation on the training model itself, under its TP/PP layout.

One generation batch:
1. prompts are left-padded to a common length; pad keys are masked (RoPE is relative, so a
   uniform left shift does not change attention between real tokens);
2. prefill runs the prompts through the pipeline once, filling Megatron-Core's
   ``StaticInferenceContext`` KV cache; each decode step then feeds one token per row;
3. pipeline stages exchange activations with point-to-point send/recv every step; the last stage
   samples with the vocab-parallel ops (no vocabulary gather: Megatron's output layer runs with
   ``parallel_output=True`` outside its inference mode, and only on the last position) and
   broadcasts the new tokens to the other stages, which apply the same stopping rules;
4. finished rows are dropped from the batch (and their KV cache) once enough have finished.

The KV-cache size is computed up front; a request larger than the memory budget is split into
smaller batches, and one that cannot fit a single row is refused with a clear message.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sega import ops
from megatron_sega.errors import SamplerMemoryError
from megatron_sega.models.builder import sequence_parallel_off, unwrap_model
from megatron_sega.runtime import Runtime
from megatron_sega.sampling.pipeline import pipeline_forward
from megatron_sega.sampling.rollout import Rollout, SamplingParams

# Fraction of free memory the KV cache may use when no explicit budget is given.
_MEMORY_FRACTION = 0.5
# Compact the batch when at least this fraction of its rows has finished.
_COMPACT_FRACTION = 0.25


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


@contextlib.contextmanager
def _last_position_logits(model):
    """Make the output layer project only the last position (sampling needs nothing else)."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        yield
        return

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input_")
        return (hidden[-1:],) + tuple(args[1:]), kwargs

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Sampler:
    """Generate from a (DDP-wrapped or bare) Megatron GPTModel stage, or from this rank's list
    of model chunks under virtual pipelining."""

    def __init__(
        self,
        model,
        runtime: Runtime,
        vocab_size: int,
        pad_id: int,
        *,
        memory_budget_bytes: Optional[int] = None,
        max_batch_tokens: int = 0,
        bucket_by_length: bool = False,
    ):
        chunks = model if isinstance(model, (list, tuple)) else [model]
        self.chunks = [unwrap_model(m) for m in chunks]
        self.model = self.chunks[-1]  # the chunk that holds the output layer on the last stage
        self.rt = runtime
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.memory_budget_bytes = memory_budget_bytes
        self.max_batch_tokens = max_batch_tokens
        # Transformer Engine ignores the attention mask while decoding: batch equal lengths only.
        self.bucket_by_length = bucket_by_length
        config = self.model.config
        self.hidden_size = config.hidden_size
        self.dtype = config.params_dtype
        self.layers_here = sum(len(c.decoder.layers) for c in self.chunks)
        kv_per_tp = config.num_query_groups // runtime.tp * config.kv_channels
        self.kv_bytes_per_token = 2 * self.layers_here * kv_per_tp * self.dtype.itemsize
        self._last_rank = self._last_pp_rank()

    # ----------------------------------------------------------------------------- planning
    def _budget(self) -> int:
        """KV-cache bytes this request may use (free memory is read once per request)."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        return int(_available_memory(self.rt.device) * _MEMORY_FRACTION)

    def max_rows(self, total_len: int, budget: Optional[int] = None) -> int:
        """How many rows of ``total_len`` positions fit the KV-cache budget."""
        if self.max_batch_tokens:
            return max(self.max_batch_tokens // total_len, 0)
        budget = self._budget() if budget is None else budget
        # The KV cache plus the activations of one prefill (hidden x a few buffers).
        per_row = total_len * (self.kv_bytes_per_token + 8 * self.hidden_size * self.dtype.itemsize)
        return budget // per_row

    def _plan(self, lengths: list[int], max_new: int) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        budget = None if self.max_batch_tokens else self._budget()
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = lengths[current[0]] if current else lengths[i]
            fits = len(current) + 1 <= self.max_rows(longest + max_new, budget)
            same = not self.bucket_by_length or not current or lengths[i] == longest
            if current and (not fits or not same):
                batches.append(current)
                current = []
            if not current and self.max_rows(lengths[i] + max_new, budget) < 1:
                need = (lengths[i] + max_new) * self.kv_bytes_per_token
                raise SamplerMemoryError(
                    f"one sequence of {lengths[i]} prompt + {max_new} new tokens needs "
                    f"{need / 2**20:.1f} MiB of KV cache per rank, more than the budget allows; "
                    "lower sampling.max_new_tokens, shorten prompts (data.max_seq_len) or raise "
                    "sampling.max_batch_tokens / tensor parallelism"
                )
            current.append(i)
        if current:
            batches.append(current)
        return batches

    # ----------------------------------------------------------------------------- public
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        sample_ids: Optional[Sequence[int]] = None,
        decode: Optional[Callable[[list[int]], str]] = None,
    ) -> Rollout:
        """Sample one response per prompt (repeat prompts for k candidates).

        ``sample_ids`` (default 0..N-1) seed each row's noise: give globally unique ids (e.g.
        ``global_prompt_index * k + j``) and the samples do not depend on batching, DP or TP.
        ``decode`` turns token ids into text for ``params.stop_strings``."""
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if params.stop_strings and decode is None:
            raise ValueError("stop_strings need a decode function (token ids -> text)")
        ids = list(range(len(prompts))) if sample_ids is None else list(sample_ids)
        plan = self._plan([len(p) for p in prompts], params.max_new_tokens)
        was_training = self.model.training
        for chunk in self.chunks:
            chunk.eval()
        try:
            parts, order = [], []
            # Decoding feeds one position per step: TP ranks cannot split it (GPU only, not
            # yet verified: sequence parallelism needs Transformer Engine).
            with _last_position_logits(self.model), sequence_parallel_off(self.model):
                for rows in plan:
                    parts.append(self._generate_batch([list(prompts[i]) for i in rows],
                                                      [ids[i] for i in rows], params, decode))
                    order.extend(rows)
        finally:
            for chunk in self.chunks:
                chunk.train(was_training)
        merged = Rollout.concat(parts, self.pad_id)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return _select(merged, inverse)

    # ----------------------------------------------------------------------------- internals
    def _last_pp_rank(self) -> int:
        """Global rank of the last pipeline stage (which samples)."""
        if self.rt.pp == 1:
            return self.rt.rank
        return dist.get_global_rank(self.rt.pp_group, self.rt.pp - 1)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, ctx):
        """One pipeline pass; returns the last-position logits shard [B, V/TP] on the last stage."""
        out = pipeline_forward(self.chunks, self.rt, tokens, positions, mask, ctx,
                               hidden_size=self.hidden_size, dtype=self.dtype)
        return None if out is None else out[:, -1, :]  # [B, 1, V/TP] -> [B, V/TP]

    def _generate_batch(self, prompts: list[list[int]], ids: list[int], params: SamplingParams,
                        decode) -> Rollout:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = self.rt.device
        batch = len(prompts)
        prompt_len = max(len(p) for p in prompts)
        total = prompt_len + params.max_new_tokens
        tokens = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long, device=device)
        is_pad = torch.zeros(batch, total, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            tokens[row, prompt_len - len(p):] = torch.tensor(p, dtype=torch.long)
            is_pad[row, : prompt_len - len(p)] = True
        ctx = StaticInferenceContext(batch, total)
        positions = torch.arange(prompt_len, device=device).unsqueeze(0).expand(batch, -1)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).triu(1)
        mask = causal.unsqueeze(0) | is_pad[:, None, :prompt_len]
        # Pad queries attend to themselves so no attention row is empty (NaN under SDPA).
        mask = mask & ~torch.eye(prompt_len, dtype=torch.bool, device=device)
        state = _DecodeState(batch, params, ids, device)
        logits = self._forward(tokens, positions, mask.unsqueeze(1), ctx)
        ctx.sequence_len_offset += prompt_len
        active = torch.arange(batch, device=device)  # rows (of this batch) still in the KV cache
        for step in range(params.max_new_tokens):
            new_tokens = self._sample_and_share(logits, state, active, step, decode)
            if step == params.max_new_tokens - 1:
                break
            keep = ~state.done[active]
            n_keep = int(keep.sum())  # the step's one host sync
            if n_keep == 0:
                break
            if len(active) - n_keep >= _COMPACT_FRACTION * len(active):
                _compact(ctx, keep)
                active, new_tokens, is_pad = active[keep], new_tokens[keep], is_pad[keep]
            cur = ctx.sequence_len_offset
            step_mask = is_pad[:, None, None, : cur + 1]
            pos = torch.full((len(active), 1), cur, dtype=torch.long, device=device)
            logits = self._forward(new_tokens.unsqueeze(1), pos, step_mask, ctx)
            ctx.sequence_len_offset += 1
        return state.to_rollout(prompts, self.pad_id, self._broadcast_from_last)

    def _sample_and_share(self, logits, state: "_DecodeState", active: torch.Tensor, step: int,
                          decode) -> torch.Tensor:
        """Sample on the last stage, broadcast the tokens, update every stage's state alike."""
        stats = None
        if self.rt.is_last_stage:
            start = self.rt.tp_rank * logits.shape[-1]
            tp_group = self.rt.tp_group if self.rt.tp > 1 else None
            params = state.params
            # One pass over the logits: the token, both log-probs and the untempered entropy.
            try:
                drawn = ops.sample(
                    logits, start, self.vocab_size, tp_group, temperature=params.temperature,
                    top_k=params.top_k, top_p=params.top_p, seed=state.noise_keys[active],
                    step=step)
            except ops.NonFiniteLogitsError:
                if self.rt.pp == 1:  # every rank of the replica raised together
                    raise
                # The other stages wait in the broadcast below: send them -1 (stop), then
                # every stage raises at the same point.
                token = torch.full((len(active),), -1, dtype=torch.long, device=self.rt.device)
            else:
                token = drawn.tokens
                stats = torch.stack([drawn.logp_untempered, drawn.logp_sampling, drawn.entropy])
        else:
            token = torch.empty(len(active), dtype=torch.long, device=self.rt.device)
        token = self._broadcast_from_last(token)
        if self.rt.pp > 1 and bool(token[0] < 0):
            raise ops.NonFiniteLogitsError("the last pipeline stage met NaN or Inf logits while "
                                           "sampling")
        state.advance(active, step, token, stats, decode)
        return token

    def _broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.rt.pp == 1:
            return tensor
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=self._last_rank, group=self.rt.pp_group)
        return tensor


def _compact(ctx, keep: torch.Tensor) -> None:
    """Drop finished rows from every layer's KV cache."""
    for layer, (k, v) in list(ctx.key_value_memory_dict.items()):
        ctx.key_value_memory_dict[layer] = (k[:, keep].contiguous(), v[:, keep].contiguous())
    ctx.max_batch_size = int(keep.sum())


class _DecodeState:
    """Per-row outputs and stopping logic of one generation batch (same on every stage).

    Rows that finished but are still in the KV cache (not compacted yet) keep being written at
    later steps; ``lengths`` stops counting for them and ``to_rollout`` masks those positions."""

    def __init__(self, batch: int, params: SamplingParams, ids: list[int], device):
        self.params = params
        width = params.max_new_tokens
        self.seeds = torch.tensor(ids, dtype=torch.long, device=device)
        # Per-row noise keys: (run seed, sample id); ops.sample hashes them with the position.
        self.noise_keys = self.seeds * 1_000_000_007 + params.seed
        self.response = torch.zeros(batch, width, dtype=torch.long, device=device)
        # (logp, logp_sampling, entropy) per position; filled on the last stage only.
        self.stats = torch.zeros(3, batch, width, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stopped_by_string = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stopped_by_token = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop_ids = (torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
                         if params.stop_token_ids else None)

    def advance(self, rows: torch.Tensor, step: int, token: torch.Tensor,
                stats: Optional[torch.Tensor], decode) -> None:
        """Record position ``step`` of ``rows`` (the batch rows in the KV cache) and stop rows
        whose token is a stop token or whose text now contains a stop string."""
        self.response[rows, step] = token
        if stats is not None:
            self.stats[:, rows, step] = stats
        live = ~self.done[rows]
        self.lengths[rows] += live
        finished = ~live
        if self.stop_ids is not None:
            hit = live & torch.isin(token, self.stop_ids)
            self.stopped_by_token[rows] |= hit
            finished |= hit
            live &= ~hit
        if self.params.stop_strings:
            for i in rows[live].tolist():
                text = decode(self.response[i, : self.lengths[i]].tolist())
                if any(s in text for s in self.params.stop_strings):
                    self.stopped_by_string[i] = True
            finished |= self.stopped_by_string[rows]
        self.done[rows] = finished

    def to_rollout(self, prompts, pad_id: int, broadcast) -> Rollout:
        width = int(self.lengths.max()) if len(self.lengths) else 0
        positions = torch.arange(width, device=self.lengths.device)
        response_mask = positions.unsqueeze(0) < self.lengths.unsqueeze(1)
        last = (self.lengths - 1).clamp(min=0)
        content_mask = response_mask.clone()
        rows = torch.nonzero(self.stopped_by_token).flatten()
        content_mask[rows, last[rows]] = False
        stats = broadcast(self.stats[:, :, :width].contiguous())  # only the last stage has them
        response = self.response[:, :width].masked_fill(~response_mask, pad_id)
        reasons = ["stop" if t else "stop_string" if s else "length"
                   for t, s in zip(self.stopped_by_token.tolist(), self.stopped_by_string.tolist())]
        zero = torch.zeros((), device=stats.device)
        return Rollout(
            prompt_ids=[list(p) for p in prompts],
            response_ids=response.cpu(),
            response_mask=response_mask.cpu(),
            content_mask=content_mask.cpu(),
            logp=torch.where(response_mask, stats[0], zero).cpu(),
            logp_sampling=torch.where(response_mask, stats[1], zero).cpu(),
            entropy=torch.where(response_mask, stats[2], zero).cpu(),
            lengths=self.lengths.cpu(),
            finish_reason=reasons,
            sample_ids=self.seeds.cpu(),
        )


def _select(rollout: Rollout, index: torch.Tensor) -> Rollout:
    """Rows of a rollout in the order ``index``."""
    tensors = {name: t[index] for name, t in rollout.tensors().items()}
    idx = index.tolist()
    return Rollout(prompt_ids=[rollout.prompt_ids[i] for i in idx],
                   finish_reason=[rollout.finish_reason[i] for i in idx], **tensors)

