"""The KV-cached sampler at TP=1, TP=2, PP=2, PP=2 x VPP=2 and TP=2 x PP=2 against references nobody
here wrote.

The model is a tiny random ``transformers`` LlamaForCausalLM (GQA, vocab 500: not a multiple of
the padding, so padded columns exist) converted with ``convert.hf``: the same full weights at
every layout. References:

- greedy tokens: a no-cache full recompute (TP=1, each prompt alone, a plain causal forward per
  step); other layouts must give the same tokens;
- ``logp`` / ``entropy``: the teacher-forced forward of the final sequences at the same layout
  (``training.teacher_forced.token_stats``, 1e-5) and Hugging Face's log-softmax over the true
  vocabulary (float64, 1e-4);
- mixed prompt lengths: each prompt alone; seeded sampling: another batch order (and TP=2);
- stops, stop strings, max_new_tokens, an empty response, KV-cache splits and finished-row
  compaction: the expectations derived from the uninterrupted greedy rollout.

Two spawns: 2 processes (TP=1 as DP=2, then TP=2, PP=2, PP=2 x VPP=2) and 4 processes (TP=2 x PP=2).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, PAD, NEW = 500, 0, 10
# Mixed lengths (left padding up to 10 positions); ids >= 3 (0 pad, 1 bos, 2 eos).
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [400, 17, 23],
           [250], [99, 98, 97, 96, 95, 94, 93]]
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, seed=77)
SAMPLE_IDS = [10, 11, 12, 13, 14, 15]
TF_TOL, HF_TOL = 1e-5, 1e-4


def _hf_config() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-5, initializer_range=0.08, attn_implementation="eager",
                bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_hf_config())).float().eval()
    with torch.no_grad():  # norms away from 1 so that a misplaced norm weight would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def results(hf_model, tmp_path_factory):
    """Every layout's rollouts (rank 0 of each, plus the per-rank copies for consistency)."""
    path = tmp_path_factory.mktemp("sampler") / "hf.pt"
    torch.save(hf_model.state_dict(), path)
    config = hf_model.config.to_dict()
    two = run_distributed(_two_process_suite, 2, str(path), config)
    four = run_distributed(_layout_suite, 4, str(path), config, 2, 2)
    return {"two": two, "four": four}


# ------------------------------------------------------------------------------ child side


def _load(path: str, config: dict, tp: int, pp: int, vpp: int | None = None):
    from megatron_sega import runtime
    from megatron_sega.convert.hf import hf_to_megatron_state_dict
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.spec import from_hf_config
    from megatron_sega.training.engine import build_training_model

    rt = runtime.setup(tp, pp, vpp=vpp)
    spec = from_hf_config(config)
    chunks = build_training_model(spec, rt)
    full = hf_to_megatron_state_dict(torch.load(path, weights_only=True), spec,
                                     spec.padded_vocab_size(tp))
    load_full_state_dict(chunks, full, rt.tp, rt.tp_rank)
    return rt, chunks


def _as_dict(rollout) -> dict:
    out = dict(rollout.tensors())
    out["finish_reason"] = list(rollout.finish_reason)
    out["prompt_ids"] = [list(p) for p in rollout.prompt_ids]
    return out


def _teacher_forced(chunks, rt, rollout) -> dict:
    """Teacher-forced logp/entropy of the rollout's sequences, at the response positions."""
    from megatron_sega.data import collate
    from megatron_sega.data.batching import TokenizedExample
    from megatron_sega.training.teacher_forced import token_stats

    n = rollout.lengths.tolist()
    examples = [TokenizedExample(str(i), list(p), rollout.response_ids[i, : n[i]].tolist())
                for i, p in enumerate(rollout.prompt_ids)]
    stats = token_stats(chunks, rt, collate(examples, PAD), VOCAB, micro_batch_size=len(examples))
    out = {k: torch.zeros_like(rollout.logp) for k in ("logp", "entropy")}
    for i, p in enumerate(rollout.prompt_ids):
        for k in out:
            out[k][i, : n[i]] = stats[k][i, len(p) - 1: len(p) - 1 + n[i]]
    return out


def _first_tokens(response_ids: torch.Tensor) -> list[int]:
    """First tokens of rows 0-2: as stop ids, those rows finish at once (>25% of the batch)."""
    return sorted({int(response_ids[r, 0]) for r in range(3)})


class _CompactionSpy:
    """Counts finished-row compactions of the sampler's KV cache."""

    def __init__(self):
        from megatron_sega.sampling import sampler as module

        self.module, self.original, self.calls = module, module._compact, 0

    def __enter__(self):
        def counting(ctx, keep):
            self.calls += 1
            return self.original(ctx, keep)

        self.module._compact = counting
        return self

    def __exit__(self, *exc):
        self.module._compact = self.original


def _layout_rollouts(sampler, chunks, rt) -> dict:
    """What every layout computes: greedy, seeded sampling, early stops with compaction, and
    their teacher-forced statistics at this layout."""
    from megatron_sega.sampling import Sampler, SamplingParams

    assert all(type(f).__name__ == "LeanForward" for f in sampler.forwards)
    greedy = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    sampled = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, **SAMPLED),
                               sample_ids=SAMPLE_IDS)
    with _CompactionSpy() as spy:
        stopped = sampler.generate(PROMPTS, SamplingParams(
            temperature=0.0, max_new_tokens=NEW, stop_token_ids=tuple(_first_tokens(greedy.response_ids))))
    out = {"greedy": greedy, "sampled": sampled, "stopped": stopped}
    # The same through Megatron-Core's own forward (the lean one is the default here).
    reference = Sampler(chunks, rt, VOCAB, PAD, lean=False)
    result = {name: _as_dict(r) for name, r in out.items()}
    result["megatron_forward"] = {
        "greedy": _as_dict(reference.generate(PROMPTS, SamplingParams(temperature=0.0,
                                                                      max_new_tokens=NEW))),
        "sampled": _as_dict(reference.generate(PROMPTS, SamplingParams(max_new_tokens=NEW,
                                                                       **SAMPLED),
                                               sample_ids=SAMPLE_IDS))}
    for name, r in out.items():
        result[name]["teacher"] = _teacher_forced(chunks, rt, r)
    result["compactions"] = spy.calls
    return result


def _no_cache_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with a full causal forward of the whole sequence at every step (TP=1)."""
    from megatron_sega.training.engine import causal_mask

    seq = list(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.tensor([seq])
            logits = model(tokens, torch.arange(len(seq)).unsqueeze(0), causal_mask(len(seq), "cpu"))
            seq.append(int(logits[0, -1, :VOCAB].argmax()))
    model.train()
    return seq[len(prompt):]


def _tp1_suite(path: str, config: dict) -> dict:
    """Single-model-replica checks (every rank runs them alone, as DP replicas)."""
    from megatron_sega.sampling import Sampler, SamplerMemoryError, SamplingParams

    rt, chunks = _load(path, config, 1, 1)
    sampler = Sampler(chunks[0], rt, VOCAB, PAD)
    out = _layout_rollouts(sampler, chunks, rt)
    greedy = out["greedy"]

    out["no_cache"] = [_no_cache_greedy(chunks[0].module, p, NEW) for p in PROMPTS]
    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    out["alone"] = [_as_dict(sampler.generate([p], greedy_params)) for p in PROMPTS]

    # Seeded sampling depends on a row's sample id only: not on the other rows of the request
    # nor on where the row sits in its batch (here: a subset, in another order).
    order = [3, 0, 5]
    out["sampled_subset"] = _as_dict(sampler.generate(
        [PROMPTS[i] for i in order], SamplingParams(max_new_tokens=NEW, **SAMPLED),
        sample_ids=[SAMPLE_IDS[i] for i in order]))
    out["permutation"] = order

    # Stop strings over a decode function (a single-token and a two-token string).
    tokens = greedy["response_ids"]
    one = f"<{int(tokens[2, 4])}>"
    two = f"<{int(tokens[5, 2])}><{int(tokens[5, 3])}>"
    out["stop_strings"] = (one, two)
    out["stopped_by_string"] = _as_dict(sampler.generate(
        PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW, stop_strings=(one, two)),
        decode=lambda ids: "".join(f"<{i}>" for i in ids)))

    # Sampling with early stops: compaction must not change the surviving rows' draws.
    stop_sampled = _first_tokens(out["sampled"]["response_ids"])
    out["stop_sampled_ids"] = stop_sampled
    with _CompactionSpy() as spy:
        out["sampled_stopped"] = _as_dict(sampler.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_token_ids=tuple(stop_sampled),
                                    **SAMPLED), sample_ids=SAMPLE_IDS))
    out["sampled_compactions"] = spy.calls

    # KV-cache planning: a budget of 2 longest rows per batch splits the request.
    budget = 2 * (max(len(p) for p in PROMPTS) + NEW)
    split = Sampler(chunks[0], rt, VOCAB, PAD, max_batch_tokens=budget)
    out["plan"] = split._plan([len(p) for p in PROMPTS], NEW)
    out["split_greedy"] = _as_dict(split.generate(PROMPTS, greedy_params))
    out["split_sampled"] = _as_dict(split.generate(
        PROMPTS, SamplingParams(max_new_tokens=NEW, **SAMPLED), sample_ids=SAMPLE_IDS))

    errors = {}
    too_small = Sampler(chunks[0], rt, VOCAB, PAD, max_batch_tokens=len(PROMPTS[2]) + NEW - 1)
    tiny_budget = Sampler(chunks[0], rt, VOCAB, PAD, memory_budget_bytes=1000)
    for name, s in (("max_batch_tokens", too_small), ("memory_budget", tiny_budget)):
        try:
            s.generate(PROMPTS, greedy_params)
            errors[name] = None
        except SamplerMemoryError as err:
            errors[name] = str(err)
    for name, call in (
            ("empty_prompt", lambda: sampler.generate([[5], []], greedy_params)),
            ("no_prompts", lambda: sampler.generate([], greedy_params)),
            ("stop_strings_without_decode", lambda: sampler.generate(
                PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=2, stop_strings=("x",))))):
        try:
            call()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors
    out["training_mode_restored"] = bool(chunks[0].module.training)

    # Host reads per decode step: the difference between 4 and NEW steps (stop strings on).
    reads = {}
    for steps in (4, NEW):
        with _HostReads() as counter:
            sampler.stats.reset()
            sampler.generate(PROMPTS, SamplingParams(max_new_tokens=steps, stop_strings=("<none>",),
                                                     **SAMPLED), sample_ids=SAMPLE_IDS,
                             decode=lambda ids: "".join(f"<{i}>" for i in ids))
        reads[steps] = (counter.lists, counter.scalars, sampler.stats.decode_steps)
    out["host_reads"] = reads
    return out


class _HostReads:
    """Counts ``Tensor.tolist`` calls and scalar reads (``item``, ``int``, ``bool``) while active:
    the host reads that synchronise with a GPU."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.lists = self.scalars = 0
        self.tolist, outer = torch.Tensor.tolist, self

        def tolist(t, *args, **kwargs):
            outer.lists += 1
            return outer.tolist(t, *args, **kwargs)

        class Scalars(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    outer.scalars += 1
                return func(*args, **(kwargs or {}))

        torch.Tensor.tolist = tolist
        self.mode = Scalars()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self.tolist


def _agreement_suite(path: str, config: dict) -> dict:
    """TP=2 ranks with different memory budgets (2 rows vs all rows per batch) plan alike."""
    from megatron_sega.sampling import Sampler, SamplingParams

    rt, chunks = _load(path, config, 2, 1)
    probe = Sampler(chunks[0], rt, VOCAB, PAD)
    total = max(len(p) for p in PROMPTS) + NEW
    per_row = total * (probe.kv_bytes_per_token + 8 * probe.hidden_size * probe.dtype.itemsize)
    budget = 2 * per_row if rt.tp_rank == 0 else 100 * per_row
    sampler = Sampler(chunks[0], rt, VOCAB, PAD, memory_budget_bytes=budget)
    plan = sampler._plan([len(p) for p in PROMPTS], NEW)
    rollout = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    return {"plan": plan, "greedy": _as_dict(rollout)}


def _layout_suite(path: str, config: dict, tp: int, pp: int, vpp: int | None = None) -> dict:
    from megatron_sega.sampling import Sampler

    rt, chunks = _load(path, config, tp, pp, vpp)
    return _layout_rollouts(Sampler(chunks, rt, VOCAB, PAD), chunks, rt)


def _two_process_suite(path: str, config: dict) -> dict:
    return {"tp1": _tp1_suite(path, config), "tp2": _layout_suite(path, config, 2, 1),
            "pp2": _layout_suite(path, config, 1, 2),
            "pp2vpp2": _layout_suite(path, config, 1, 2, 2), "agreed": _agreement_suite(path, config)}


# ------------------------------------------------------------------------------ parent side


def _hf_stats(hf_model, rollout: dict) -> dict:
    """HF log-softmax over the true vocabulary (float64) at the response positions."""
    out = {k: torch.zeros_like(rollout["logp"], dtype=torch.float64)
           for k in ("logp", "entropy", "best")}
    with torch.no_grad():
        for i, prompt in enumerate(rollout["prompt_ids"]):
            n, p = int(rollout["lengths"][i]), len(prompt)
            response = rollout["response_ids"][i, :n]
            logits = hf_model(torch.tensor([prompt + response.tolist()])).logits[0, p - 1: p - 1 + n]
            logp = torch.log_softmax(logits[:, :VOCAB].double(), -1)
            out["logp"][i, :n] = logp.gather(1, response.unsqueeze(1)).squeeze(1)
            out["entropy"][i, :n] = -(logp.exp() * logp).sum(-1)
            out["best"][i, :n] = logp.max(-1).values
    return out


def _close(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, tol: float, what: str):
    err = ((got.double() - ref.double()).abs() * mask).max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol}"


def _same_rollout(got: dict, ref: dict, what: str, tol: float = TF_TOL):
    """Same tokens, masks, lengths and reasons; statistics within ``tol``."""
    for key in ("response_ids", "response_mask", "content_mask", "lengths", "sample_ids"):
        assert torch.equal(got[key], ref[key]), f"{what}: {key} differ\n{got[key]}\n{ref[key]}"
    assert got["finish_reason"] == ref["finish_reason"], what
    assert got["prompt_ids"] == ref["prompt_ids"], what
    for key in ("logp", "logp_sampling", "entropy"):
        _close(got[key], ref[key], got["response_mask"], tol, f"{what}: {key}")


def _check_masks(r: dict, what: str):
    """Masks and padding follow the lengths; the stop token is in response, not content."""
    n, width = r["lengths"], r["response_ids"].shape[1]
    mask = torch.arange(width).unsqueeze(0) < n.unsqueeze(1)
    assert torch.equal(r["response_mask"], mask), what
    content = mask.clone()
    for i, reason in enumerate(r["finish_reason"]):
        if reason == "stop":
            content[i, n[i] - 1] = False
    assert torch.equal(r["content_mask"], content), what
    assert (r["response_ids"][~mask] == PAD).all(), what
    for key in ("logp", "logp_sampling", "entropy"):
        assert (r[key][~mask] == 0).all(), f"{what}: {key} nonzero outside the response"
    assert (r["logp"][mask] <= 0).all() and (r["entropy"][mask] >= 0).all(), what


def _expected_stops(full: dict, stop: list[int]) -> tuple[list[int], list[str]]:
    """Lengths and reasons when ``full``'s rows stop at the first token in ``stop``."""
    lengths, reasons = [], []
    for row in full["response_ids"].tolist():
        hit = next((j for j, t in enumerate(row) if t in stop), None)
        lengths.append(NEW if hit is None else hit + 1)
        reasons.append("length" if hit is None else "stop")
    return lengths, reasons


def _check_truncation(got: dict, full: dict, lengths: list[int], reasons: list[str], what: str):
    """``got`` is ``full`` cut at ``lengths`` (tokens exact, statistics within 1e-5)."""
    assert got["lengths"].tolist() == lengths, (what, got["lengths"].tolist(), lengths)
    assert got["finish_reason"] == reasons, (what, got["finish_reason"], reasons)
    _check_masks(got, what)
    for i, n in enumerate(lengths):
        assert got["response_ids"][i, :n].tolist() == full["response_ids"][i, :n].tolist(), what
        for key in ("logp", "logp_sampling", "entropy"):
            err = (got[key][i, :n] - full[key][i, :n]).abs().max().item()
            assert err <= TF_TOL, f"{what}: row {i} {key} differs by {err:.3g}"


def _check_layout(r: dict, what: str):
    """Per-layout checks: masks, teacher-forced statistics, early stops with compaction."""
    for name in ("greedy", "sampled", "stopped"):
        roll = r[name]
        _check_masks(roll, f"{what} {name}")
        for key in ("logp", "entropy"):
            _close(roll[key], roll["teacher"][key], roll["response_mask"], TF_TOL,
                   f"{what} {name}: {key} vs teacher-forced forward")
    greedy = r["greedy"]
    assert greedy["finish_reason"] == ["length"] * len(PROMPTS), what
    assert (greedy["lengths"] == NEW).all(), what
    assert (greedy["logp_sampling"] == 0).all(), f"{what}: greedy logp_sampling must be 0"
    # Rows finishing early, then compaction: the rest goes on exactly as without the stops.
    stop = _first_tokens(greedy["response_ids"])
    lengths, reasons = _expected_stops(greedy, stop)
    assert lengths[:3] == [1, 1, 1] and max(lengths) > 1, (what, lengths)
    _check_truncation(r["stopped"], greedy, lengths, reasons, f"{what} stopped")
    assert r["compactions"] >= 1, f"{what}: the finished rows were never compacted away"
    # Empty responses: only the stop token, nothing in content.
    assert not r["stopped"]["content_mask"][:3].any(), what
    assert r["stopped"]["response_mask"][:3].sum(1).tolist() == [1, 1, 1], what


# ------------------------------------------------------------------------------ tests


def test_every_rank_agrees(results):
    """All ranks of a layout return the same rollout (the TP=1 replicas too)."""
    two, four = results["two"], results["four"]
    for key in ("tp1", "tp2", "pp2", "pp2vpp2"):
        for name in ("greedy", "sampled", "stopped"):
            _same_rollout(two[1][key][name], two[0][key][name], f"{key} rank 1 vs 0", tol=0.0)
    for rank in range(1, 4):
        for name in ("greedy", "sampled", "stopped"):
            _same_rollout(four[rank][name], four[0][name], f"tp2pp2 rank {rank} vs 0", tol=0.0)


def test_greedy_equals_no_cache_recompute(results):
    tp1 = results["two"][0]["tp1"]
    for i, tokens in enumerate(tp1["no_cache"]):
        assert tp1["greedy"]["response_ids"][i].tolist() == tokens, f"prompt {i}"


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "pp2vpp2", "tp2pp2"])
def test_layout(results, layout):
    """Statistics vs teacher forcing, masks, stops and compaction at every layout; tokens and
    statistics equal to TP=1 (greedy and seeded sampling)."""
    r = results["four"][0] if layout == "tp2pp2" else results["two"][0][layout]
    _check_layout(r, layout)
    tp1 = results["two"][0]["tp1"]
    for name in ("greedy", "sampled", "stopped"):
        _same_rollout(r[name], tp1[name], f"{layout} vs tp1 {name}")
    for name in ("greedy", "sampled"):  # the lean forward vs Megatron-Core's
        _same_rollout(r["megatron_forward"][name], r[name], f"{layout} Megatron forward {name}")


def test_statistics_equal_hugging_face(results, hf_model):
    tp1 = results["two"][0]["tp1"]
    for name in ("greedy", "sampled"):
        roll = tp1[name]
        ref = _hf_stats(hf_model, roll)
        mask = roll["response_mask"]
        _close(roll["logp"], ref["logp"], mask, HF_TOL, f"{name}: logp vs HF")
        _close(roll["entropy"], ref["entropy"], mask, HF_TOL, f"{name}: entropy vs HF")
    # Greedy picked HF's argmax at every step (up to the parity tolerance).
    greedy = tp1["greedy"]
    ref = _hf_stats(hf_model, greedy)
    _close(ref["logp"], ref["best"], greedy["response_mask"], HF_TOL, "greedy vs HF argmax")


def test_mixed_lengths_equal_alone(results):
    tp1 = results["two"][0]["tp1"]
    greedy = tp1["greedy"]
    for i, alone in enumerate(tp1["alone"]):
        row = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v[i:i + 1])
               for k, v in greedy.items() if k != "teacher"}
        row["sample_ids"] = alone["sample_ids"]  # ids default to the position in the call
        _same_rollout(alone, row, f"prompt {i} alone vs in the batch")


def test_seeded_sampling_is_reproducible(results):
    tp1 = results["two"][0]["tp1"]
    sampled = tp1["sampled"]
    order = tp1["permutation"]
    rows = {k: (v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order])
            for k, v in sampled.items() if k != "teacher"}
    subset = tp1["sampled_subset"]
    width = int(subset["lengths"].max())
    rows = {k: (v[:, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
            for k, v in rows.items()}
    _same_rollout(subset, rows, "a subset of the rows, in another order")
    assert sampled["sample_ids"].tolist() == SAMPLE_IDS
    # Actually random, and a real tempered/filtered distribution.
    assert not torch.equal(sampled["response_ids"], tp1["greedy"]["response_ids"])
    mask = sampled["response_mask"]
    assert (sampled["logp_sampling"][mask] <= 0).all()
    assert (sampled["logp_sampling"][mask] != sampled["logp"][mask]).any()


def test_stop_strings(results):
    tp1 = results["two"][0]["tp1"]
    greedy, got = tp1["greedy"], tp1["stopped_by_string"]
    one, two = tp1["stop_strings"]
    lengths, reasons = [], []
    for row in greedy["response_ids"].tolist():
        text = [f"<{t}>" for t in row]
        hit = next((j for j in range(NEW) if one in "".join(text[: j + 1])
                    or two in "".join(text[: j + 1])), None)
        lengths.append(NEW if hit is None else hit + 1)
        reasons.append("length" if hit is None else "stop_string")
    assert reasons[2] == "stop_string" and reasons[5] == "stop_string", reasons
    _check_truncation(got, greedy, lengths, reasons, "stop strings")
    # A stop string is content: only a stop *token* leaves content_mask.
    assert torch.equal(got["content_mask"], got["response_mask"])


def test_sampled_rows_unchanged_by_early_stops(results):
    tp1 = results["two"][0]["tp1"]
    sampled, got = tp1["sampled"], tp1["sampled_stopped"]
    lengths, reasons = _expected_stops(sampled, tp1["stop_sampled_ids"])
    assert lengths[:3] == [1, 1, 1] and max(lengths) > 1, lengths
    _check_truncation(got, sampled, lengths, reasons, "sampled with stops")
    assert tp1["sampled_compactions"] >= 1


def test_kv_cache_planning_splits_and_refuses(results):
    tp1 = results["two"][0]["tp1"]
    plan = tp1["plan"]
    assert len(plan) == 3 and sorted(i for rows in plan for i in rows) == list(range(len(PROMPTS)))
    _same_rollout(tp1["split_greedy"], tp1["greedy"], "greedy split over 3 batches")
    _same_rollout(tp1["split_sampled"], tp1["sampled"], "sampled split over 3 batches")
    errors = tp1["errors"]
    for name in ("max_batch_tokens", "memory_budget"):
        message = errors[name]
        assert message is not None, f"{name}: a row that cannot fit was not refused"
        assert f"{len(PROMPTS[2])} prompt + {NEW} new tokens" in message, message
        assert "max_new_tokens" in message, message
    assert "prompt 1 is empty" in errors["empty_prompt"]
    assert "at least one prompt" in errors["no_prompts"]
    assert "decode" in errors["stop_strings_without_decode"]
    assert tp1["training_mode_restored"]


def test_one_host_synchronisation_per_decode_step(results):
    """Per decode step: the one read in ops.sample and the one of the lagged stop state (a
    host buffer: no synchronisation on a GPU); no scalar reads. Per batch: a few constants."""
    reads = results["two"][0]["tp1"]["host_reads"]
    (lists4, scalars4, steps4), (lists, scalars, steps) = reads[4], reads[NEW]
    assert steps - steps4 == NEW - 4, reads
    assert lists - lists4 <= 2 * (NEW - 4), reads
    assert scalars == scalars4, reads


def test_ranks_with_different_budgets_agree_on_one_plan(results):
    """The smallest budget of the model-parallel group wins: same plan, no hang."""
    agreed = [r["agreed"] for r in results["two"]]
    assert agreed[0]["plan"] == agreed[1]["plan"], [a["plan"] for a in agreed]
    assert len(agreed[0]["plan"]) == 3, agreed[0]["plan"]  # 2 rows per batch: rank 0's budget
    _same_rollout(agreed[0]["greedy"], results["two"][0]["tp2"]["greedy"], "agreed plan, TP=2")
    _same_rollout(agreed[1]["greedy"], agreed[0]["greedy"], "agreed plan, rank 1", tol=0.0)
