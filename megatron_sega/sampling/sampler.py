"""KV-cached batched generation on the training model itself, under its TP/PP layout.

One generation batch:
1. prompts are left-padded to a common length; pad keys are masked (RoPE is relative, so a
   uniform left shift does not change attention between real tokens);
2. prefill runs the prompts through the pipeline once, filling the KV cache; each decode step
   then feeds one token per row (``decode.py``: a lean forward on the model's own parameters
   for the local layer spec, Megatron-Core's forward and ``StaticInferenceContext`` otherwise);
3. pipeline stages exchange activations with point-to-point send/recv every step; the last stage
   samples with the vocab-parallel ops (no vocabulary gather: the output layer gives this rank's
   vocabulary shard, of the last position only) and broadcasts the new tokens to the other
   stages, which apply the same stopping rules;
4. finished rows are dropped from the batch (and their KV cache) once enough have finished.

Round trips per decode step: one collective in ``ops.sample`` (TP) in the common case, plus the
token broadcast over PP, and one host synchronisation (inside ``ops.sample``). The stopping
state reaches the host through a non-blocking copy that is read one step later (``_HostLag``),
so finishing rows are dropped, and stop strings checked on the decoded tail of each row, one
step late; the tokens and lengths are the same as with an immediate check.

The KV-cache size is computed up front from a budget agreed over the model-parallel group (the
smallest of its ranks'), so every rank plans the same batches; a request larger than the budget
is split into smaller batches, and one that cannot fit a single row is refused with a clear
message.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_sega import ops
from megatron_sega.errors import SamplerMemoryError
from megatron_sega.models.builder import sequence_parallel_off, unwrap_model
from megatron_sega.runtime import Runtime
from megatron_sega.runtime.stages import broadcast_from_last_stage
from megatron_sega.sampling.decode import LeanForward, MegatronForward, lean_unsupported
from megatron_sega.sampling.pipeline import pipeline_forward
from megatron_sega.sampling.rollout import Rollout, SamplingParams

# Fraction of free memory the KV cache may use when no explicit budget is given.
_MEMORY_FRACTION = 0.5
# Compact the batch when at least this fraction of its rows has finished.
_COMPACT_FRACTION = 0.25


@dataclass
class SamplerStats:
    """What the sampler did, accumulated over ``generate`` calls (``reset()`` to start over).

    Times are host wall seconds, split per decode step into the model forward, the sampling
    (``ops.sample`` and the PP token broadcast) and the bookkeeping (stopping, compaction, the
    step's inputs). On a GPU the host runs ahead of the device until the one synchronisation
    in ``ops.sample``, so there the device time shows up under sampling."""

    prefill_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    bookkeeping_s: float = 0.0
    decode_steps: int = 0  # sampling steps (the first samples from the prefill's logits)
    sampled_rows: int = 0
    fallback_rows: int = 0  # rows whose support the candidates left open (ops.sample)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.decode_steps, 1)
        return {"forward": 1e3 * self.forward_s / n, "sampling": 1e3 * self.sample_s / n,
                "bookkeeping": 1e3 * self.bookkeeping_s / n}


def _available_memory(device: torch.device) -> int:
    """Bytes this process could still allocate: on CUDA the device's free memory plus what the
    caching allocator holds reserved but unused (it hands that out before asking the device)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
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
        lean: Optional[bool] = None,
    ):
        """``bucket_by_length``: the model's own forward ignores the padding mask while
        decoding (Transformer Engine's layers), so batches hold prompts of one length where that
        forward runs; the lean forward masks padding itself and ignores it. ``lean``: None =
        the lean forward where it supports the model, True = required, False = never."""
        chunks = model if isinstance(model, (list, tuple)) else [model]
        self.chunks = [unwrap_model(m) for m in chunks]
        self.model = self.chunks[-1]  # the chunk that holds the output layer on the last stage
        self.rt = runtime
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.memory_budget_bytes = memory_budget_bytes
        self.max_batch_tokens = max_batch_tokens
        config = self.model.config
        self.hidden_size = config.hidden_size
        self.dtype = config.params_dtype
        self.layers_here = sum(len(c.decoder.layers) for c in self.chunks)
        kv_per_tp = config.num_query_groups // runtime.tp * config.kv_channels
        self.kv_bytes_per_token = 2 * self.layers_here * kv_per_tp * self.dtype.itemsize
        self.stats = SamplerStats()
        # The forward of each chunk: the lean one where the layer spec allows (decode.py),
        # else Megatron-Core's own. ``lean``: None = when supported, True = required.
        reasons = [lean_unsupported(c) for c in self.chunks] if lean is not False else ["lean=False"]
        reason = next((r for r in reasons if r), None)
        if lean and reason:
            raise ValueError(f"Sampler(lean=True): the lean forward cannot run this model ({reason})")
        self.forwards = [MegatronForward(c) if reason else LeanForward(c, runtime.tp_group)
                         for c in self.chunks]
        # The lean forward masks padding itself, so TE's layers batch any prompt lengths there.
        self.bucket_by_length = bucket_by_length and reason is not None

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

    def _agreed(self, budget: int) -> int:
        """The smallest budget of the model-parallel group (TP x PP): the ranks of one model
        replica must plan the same batches, whatever memory each of them has free."""
        if self.rt is None or self.rt.tp * self.rt.pp == 1:
            return budget
        value = torch.tensor([budget], dtype=torch.int64,
                             device=self.rt.device if self.rt.device.type == "cuda" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.rt.mp_group)
        return int(value.item())

    def _plan(self, lengths: list[int], max_new: int) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        budget = None if self.max_batch_tokens else self._agreed(self._budget())
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
            for forward in self.forwards:  # the KV cache is not held through a training step
                forward.release()
            for chunk in self.chunks:
                chunk.train(was_training)
        merged = Rollout.concat(parts, self.pad_id)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return _select(merged, inverse)

    # ----------------------------------------------------------------------------- internals
    def _forward(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """One pass of the next positions ``tokens [B, s]`` through every chunk of the
        pipeline; returns the last-position logits shard [B, V/TP] on the last stage."""
        return pipeline_forward(self.forwards, self.rt, tokens, hidden_size=self.hidden_size,
                                dtype=self.dtype)

    def _generate_batch(self, prompts: list[list[int]], ids: list[int], params: SamplingParams,
                        decode) -> Rollout:
        device, stats = self.rt.device, self.stats
        start = time.perf_counter()
        batch = len(prompts)
        prompt_len = max(len(p) for p in prompts)
        total = prompt_len + params.max_new_tokens
        # Left-padded on the host, then one copy each (not one per row). RoPE is relative, so
        # the shift does not change attention between real tokens; pad keys are masked.
        tokens = torch.full((batch, prompt_len), self.pad_id, dtype=torch.long)
        is_pad = torch.zeros(batch, total, dtype=torch.bool)
        for row, p in enumerate(prompts):
            tokens[row, prompt_len - len(p):] = torch.tensor(p, dtype=torch.long)
            is_pad[row, : prompt_len - len(p)] = True
        state = _DecodeState(batch, params, ids, device, decode)
        is_pad = is_pad.to(device)
        for forward in self.forwards:
            forward.start(is_pad, total)
        logits = self._forward(tokens.to(device))
        stats.prefill_s += time.perf_counter() - start
        active = list(range(batch))  # batch rows still in the KV cache (host)
        active_t = torch.arange(batch, device=device)  # the same, on the device
        for step in range(params.max_new_tokens):
            t0 = time.perf_counter()
            new_tokens = self._sample_and_share(logits, state, active_t, step)
            t1 = time.perf_counter()
            stats.sample_s += t1 - t0
            stats.decode_steps += 1
            finished = state.catch_up()  # the previous step's stops (its copy has arrived)
            if all(row in finished for row in active):
                break
            state.advance(active_t, step, new_tokens)
            if step == params.max_new_tokens - 1:
                stats.bookkeeping_s += time.perf_counter() - t1
                break
            if sum(row in finished for row in active) >= _COMPACT_FRACTION * len(active):
                keep = [i for i, row in enumerate(active) if row not in finished]
                index = _device_index(keep, device)
                _compact(self.forwards, index)
                active = [active[i] for i in keep]
                active_t, new_tokens = active_t[index], new_tokens[index]
            t2 = time.perf_counter()
            stats.bookkeeping_s += t2 - t1
            logits = self._forward(new_tokens.unsqueeze(1))
            stats.forward_s += time.perf_counter() - t2
        state.catch_up()  # the last step's stop strings
        return state.to_rollout(prompts, self.pad_id, self._broadcast_from_last)

    def _sample_and_share(self, logits, state: "_DecodeState", active: torch.Tensor,
                          step: int) -> torch.Tensor:
        """Sample on the last stage and broadcast the tokens; stats stay on the last stage."""
        if self.rt.is_last_stage:
            start = self.rt.tp_rank * logits.shape[-1]
            tp_group = self.rt.tp_group if self.rt.tp > 1 else None
            params = state.params
            counts = ops.SampleStats()
            # One pass over the logits: the token, both log-probs and the untempered entropy.
            try:
                drawn = ops.sample(
                    logits, start, self.vocab_size, tp_group, temperature=params.temperature,
                    top_k=params.top_k, top_p=params.top_p, seed=state.noise_keys[active],
                    step=step, stats=counts)
            except ops.NonFiniteLogitsError:
                if self.rt.pp == 1:  # every rank of the replica raised together
                    raise
                # The other stages wait in the broadcast: send them -1 (stop), then raise.
                self._broadcast_from_last(torch.full((len(active),), -1, dtype=torch.long,
                                                     device=self.rt.device))
                raise
            self.stats.sampled_rows += counts.rows
            self.stats.fallback_rows += counts.fallback_rows
            token = drawn.tokens
            state.stats[:, active, step] = torch.stack(
                [drawn.logp_untempered, drawn.logp_sampling, drawn.entropy])
            return self._broadcast_from_last(token)
        token = self._broadcast_from_last(
            torch.empty(len(active), dtype=torch.long, device=self.rt.device))
        if bool(token[0] < 0):  # this stage's one host read of the step
            raise ops.NonFiniteLogitsError("the last pipeline stage met NaN or Inf logits while "
                                           "sampling")
        return token

    def _broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        return broadcast_from_last_stage(tensor, self.rt)


def _compact(forwards: list, keep: torch.Tensor) -> None:
    """Drop finished rows from every chunk's KV cache (``keep``: the rows to keep, an index)."""
    for forward in forwards:
        forward.compact(keep)


def _device_index(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as a device index, copied without waiting for the device (pinned memory)."""
    index = torch.tensor(values, dtype=torch.long)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index


class _HostLag:
    """A small device tensor on its way to the host without blocking; read a step later.

    On CUDA the copy goes to pinned memory behind an event; by the time it is read, the next
    step's ``ops.sample`` has synchronised with the device, so the wait costs nothing."""

    def __init__(self, value: torch.Tensor):
        if value.is_cuda:
            self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = value, None  # a fresh tensor: nothing writes to it later

    def read(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _stop_window(stop_strings: Sequence[str]) -> int:
    """Tokens of a row's tail to decode for its stop strings: a string of L characters spans at
    most 4 L tokens when every token decodes to at least one byte (UTF-8: <= 4 bytes a
    character); 2 more give the first of them its left context (leading spaces, split bytes)."""
    return 4 * max(len(s) for s in stop_strings) + 2


class _DecodeState:
    """Per-row outputs and stopping logic of one generation batch (same on every stage).

    Rows that finished but are still in the KV cache (not compacted yet) keep being written at
    later steps; ``lengths`` stops counting for them and ``to_rollout`` masks those positions.
    Stop tokens are checked on the device at once; the host learns about the stops one step
    later (``catch_up``), and checks stop strings then, before the next step is recorded."""

    def __init__(self, batch: int, params: SamplingParams, ids: list[int], device, decode=None):
        self.params, self.decode = params, decode
        width = params.max_new_tokens
        self.seeds = torch.tensor(ids, dtype=torch.long).to(device)
        # Per-row noise keys: (run seed, sample id); ops.sample hashes them with the position.
        self.noise_keys = self.seeds * 1_000_000_007 + params.seed
        self.response = torch.zeros(batch, width, dtype=torch.long, device=device)
        # (logp, logp_sampling, entropy) per position; filled on the last stage only.
        self.stats = torch.zeros(3, batch, width, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stopped_by_string = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stopped_by_token = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop_ids = (torch.tensor(params.stop_token_ids, dtype=torch.long).to(device)
                         if params.stop_token_ids else None)
        self.window = _stop_window(params.stop_strings) if params.stop_strings else 0
        self.host_ids: list[list[int]] = [[] for _ in range(batch)]  # for stop strings only
        self.finished: set[int] = set()  # rows the host knows have finished
        self._pending: Optional[tuple[int, _HostLag]] = None

    def advance(self, rows: torch.Tensor, step: int, token: torch.Tensor) -> None:
        """Record position ``step`` of ``rows`` (the batch rows in the KV cache), stop rows whose
        token is a stop token, and send the state towards the host. No host synchronisation."""
        self.response[rows, step] = token
        live = ~self.done[rows]
        self.lengths[rows] += live
        if self.stop_ids is not None:
            hit = live & torch.isin(token, self.stop_ids)
            self.stopped_by_token[rows] |= hit
            self.done[rows] |= hit
        parts = [self.done.long(), self.lengths]
        if self.window:
            parts.append(self.response[:, step])
        self._pending = (step, _HostLag(torch.stack(parts)))

    def catch_up(self) -> set[int]:
        """Apply what the last ``advance`` sent: stop strings on the decoded tails of the rows
        it recorded. Returns the rows known to have finished."""
        if self._pending is None:
            return self.finished
        step, lag = self._pending
        self._pending = None
        values = lag.read()
        done, lengths = values[0], values[1]
        hits = []
        for row, length in enumerate(lengths):
            if self.window and length == step + 1:  # recorded at this step
                self.host_ids[row].append(values[2][row])
                if not done[row]:
                    tail = self.decode(self.host_ids[row][-self.window:])
                    if any(s in tail for s in self.params.stop_strings):
                        hits.append(row)
            if done[row]:
                self.finished.add(row)
        if hits:
            index = _device_index(hits, self.done.device)
            self.stopped_by_string[index] = True
            self.done[index] = True
            self.finished.update(hits)
        return self.finished

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

