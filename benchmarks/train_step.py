"""Training-step throughput: our Megatron-Core step vs a plain ``transformers`` step, same run;
and the MFU of the project's own SFT, DPO and SEGA update steps.

    python -m benchmarks.train_step                       (CPU: tiny-ish model, fp32)
    python -m benchmarks.train_step --preset llama3-8b --layers 4 --seq 4096 --dtype bf16 \
        --micro-batch 1 --stage sft dpo sega              (GPU: 8B-shaped, a few layers)

One process, TP=PP=DP=1. ``--stage lm`` (the default): both sides train the same architecture on
the same random tokens with Adam (ours: Megatron's DDP + distributed optimizer + a plain LM loss
through ``forward_backward``; baseline: ``LlamaForCausalLM`` + ``torch.optim.AdamW``). Reported:
tokens/s of each and their ratio.

``--stage sft dpo sega``: one ``Session`` (``open_session``: the model, the distributed optimizer,
bf16 on Megatron's mixed-precision path, as a run builds it), then the stages' own steps on random
full-length rows of ``--seq`` tokens: ``sft_step``; ``dpo_step`` (``--batch / 2`` pairs, the
reference's forward included in the time as in ``run_dpo``, not in the FLOPs); the SEGA update
(``training_microbatches`` + ``sega_loss_fn`` + ``forward_backward`` + ``optimizer_step``, what
``sega_step`` runs after sampling). The tokenizer is the shipped tiny one padded to the model's
vocabulary, so the loss ops run over all of it, as with Llama 3's own. ``--lora-rank R``: the same
steps with rank-R LoRA adapters (alpha 2R) on the four linear layers and the base frozen, on
PyTorch SDPA attention (LoRA does not wrap Transformer Engine's layers); DPO's reference is then
the policy with its adapters off, as in a LoRA run.

Timing: one warm-up step, then ``--steps`` steps between two CUDA events on a GPU
(``time.perf_counter`` on CPU). MFU against the chip's dense bf16 peak with
``megatron_sega.logging.mfu`` (FLOPs: ``training_flops_per_token``, Megatron's formula, over
prompt + response tokens); peak memory per stage from ``torch.cuda.max_memory_allocated`` (None
on CPU). Every stage's figures are also printed on one ``figure:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("lm", "sft", "dpo", "sega")


def gpu_peak() -> tuple[str, float | None]:
    from megatron_sega.logging import gpu_peak_tflops

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name, gpu_peak_tflops()


def ours(spec, dtype, batch, micro, seq, steps, device):
    from megatron_sega import ops, runtime
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict
    from megatron_sega.config import OptimConfig
    from megatron_sega.training.engine import (
        build_optimizer, build_training_model, forward_backward, optimizer_step,
    )

    rt = runtime.setup(1, 1, device=device)
    chunks = build_training_model(spec, rt, dtype)
    if spec.num_layers * spec.hidden_size ** 2 < 5e8:  # small: identical init to the baseline
        full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=0)
        load_full_state_dict(chunks[0].module, full, 1, 0)
    optimizer, scheduler = build_optimizer(chunks, OptimConfig(lr=1e-5), total_steps=1000,
                                           dtype=dtype)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq + 1), generator=g).to(rt.device)

    def loss_fn(logits, mb):
        logp = ops.log_probs(logits, mb["labels"], 0, spec.vocab_size, None)
        return -logp.sum() / (batch * seq), {}

    micro_batches = [{"tokens": tokens[i:i + micro, :-1], "labels": tokens[i:i + micro, 1:]}
                     for i in range(0, batch, micro)]

    def step():
        forward_backward(chunks, rt, micro_batches, loss_fn)
        optimizer_step(optimizer, scheduler)

    return timed(step, steps, device)


def baseline(spec, dtype, batch, micro, seq, steps, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_sega.models.spec import to_hf_config

    config = LlamaConfig(**{k: v for k, v in to_hf_config(spec).items()
                            if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq + 1), generator=g).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, batch, micro):
            logits = model(tokens[i:i + micro, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tokens[i:i + micro, 1:].reshape(-1),
                reduction="sum") / (batch * seq)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return timed(step, steps, device)


def timed(step: Callable[[], object], steps: int, device: str) -> float:
    """Seconds per step, after one warm-up step: between two CUDA events on a GPU (the device's
    own clock, recorded in the stream after the queued work), ``time.perf_counter`` on CPU."""
    step()
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / steps
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


class PeakMemory:
    """The peak of ``torch.cuda.max_memory_allocated`` in GiB per named phase, reset at each
    phase's start; None for every phase on CPU (no allocator statistics)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.gib: dict[str, Optional[float]] = {}

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def stop(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.gib[phase] = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def padded_tokenizer(directory: Path, vocab_size: int) -> Path:
    """The shipped tiny tokenizer with placeholder tokens appended up to ``vocab_size`` ids, so
    that a benchmark's losses, entropies and sampling run over the model's whole vocabulary."""
    from megatron_sega.data import TINY_TOKENIZER_DIR

    directory.mkdir(parents=True, exist_ok=True)
    data = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused_{i}>"] = i
    (directory / "tokenizer.json").write_text(json.dumps(data))
    config = TINY_TOKENIZER_DIR / "tokenizer_config.json"
    (directory / "tokenizer_config.json").write_text(config.read_text())
    return directory


def bench_session(spec, dtype: str, workdir: Path, sections: dict):
    """A training ``Session`` for ``spec`` built as a run builds it (``open_session``): the spec
    through a HF config.json, the padded tiny tokenizer, ``sections`` merged into the config."""
    from megatron_sega.config import load_config
    from megatron_sega.models.spec import to_hf_config
    from megatron_sega.training.session import open_session

    hf_config = workdir / "config.json"
    hf_config.write_text(json.dumps(to_hf_config(spec)))
    tokenizer = padded_tokenizer(workdir / "tokenizer", spec.vocab_size)
    model = {"hf_config": str(hf_config), "tokenizer": str(tokenizer), "dtype": dtype,
             **sections.get("model", {})}
    base = {"logging": {"progress": False, "tensorboard": False}, **sections, "model": model}
    return open_session(load_config(base=base), train=True, total_steps=1000, lr_override=1e-5)


def random_rows(n: int, length: int, prompt: int, vocab: int, seed: int = 0
                ) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt, response) id lists of ``prompt`` + ``length - prompt`` random ids."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, vocab, (n, length), generator=g).tolist()
    return [(row[:prompt], row[prompt:]) for row in rows]


def stage_steps(session, stages: list[str], batch: int, seq: int):
    """(stage, one training step of it) in turn, on fixed random full-length rows (a quarter
    prompt). A generator: DPO's reference is built when its turn comes and dropped after it, so
    each stage's peak memory holds only what that stage holds."""
    from megatron_sega.data import TokenizedExample, collate
    from megatron_sega.data.batching import TokenizedPair
    from megatron_sega.training.dpo import dpo_step
    from megatron_sega.training.engine import forward_backward, optimizer_step
    from megatron_sega.training.sega import sega_loss_fn, training_microbatches
    from megatron_sega.training.session import load_reference
    from megatron_sega.training.sft import sft_step

    rows = random_rows(batch, seq, seq // 4, session.vocab_size)
    examples = [TokenizedExample(str(i), p, r) for i, (p, r) in enumerate(rows)]
    if "sft" in stages:
        yield "sft", lambda: sft_step(session, examples)
    if "dpo" in stages:
        pairs = [TokenizedPair(str(j), rows[2 * j][0], rows[2 * j][1], rows[2 * j + 1][1])
                 for j in range(batch // 2)]
        reference = load_reference(session)
        yield "dpo", lambda: dpo_step(session, reference, pairs)
        del reference
    if "sega" in stages:
        sega_batch = collate(examples, session.tokenizer.pad_id)
        advantage = torch.randn(batch, generator=torch.Generator().manual_seed(1))
        micro = training_microbatches(session, sega_batch, advantage, {})
        loss_fn = sega_loss_fn(session, float(batch), use_old=False, use_ref=False)

        def sega_update():
            forward_backward(session.chunks, session.runtime, micro, loss_fn)
            return optimizer_step(session.optimizer, session.scheduler,
                                  device=session.runtime.device)

        yield "sega", sega_update


def run_stages(spec, args) -> dict:
    """Seconds, tokens/s, TFLOP/s, MFU and peak memory of each stage's step (see the doc)."""
    from megatron_sega.logging import mfu, training_flops_per_token
    from megatron_sega.runtime import teardown

    micro = args.micro_batch
    sections = {"data": {"max_seq_len": args.seq}, "sft": {"micro_batch_size": micro},
                "dpo": {"micro_batch_size": max(micro // 2, 1)},
                "sega": {"micro_batch_size": micro}}
    if args.lora_rank:
        sections["lora"] = {"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank}
        sections["model"] = {"attention": "sdpa"}
    with tempfile.TemporaryDirectory(prefix="msega_bench_") as workdir:
        session = bench_session(spec, args.dtype, Path(workdir), sections)
    device = session.runtime.device.type
    tokens = args.batch * args.seq  # every row full length: prompt + response tokens
    results, peaks = {}, PeakMemory(device)
    for stage, step in stage_steps(session, args.stage, args.batch, args.seq):
        peaks.start()
        sec = timed(step, args.steps, device)
        del step  # DPO's step holds its reference
        peaks.stop(stage)
        flops = training_flops_per_token(session.spec, args.seq) * tokens / sec
        results[stage] = {"seconds_per_step": sec, "tokens_per_s": tokens / sec,
                          "model_tflops_per_s": flops / 1e12,
                          "mfu": mfu(session.spec, args.seq, tokens, sec, 1),
                          "peak_memory_gib": peaks.gib[stage]}
    teardown()
    return results


def stage_line(stage: str, r: dict, where: str, lora_rank: int = 0) -> str:
    """One readable line of a stage's figures."""
    mfu = "n/a (no GPU peak)" if r["mfu"] is None else f"{r['mfu']:.1%}"
    mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
    label = {"sft": "SFT step", "dpo": "DPO step", "sega": "SEGA update step"}[stage]
    label = f"LoRA {label}" if lora_rank else label
    if lora_rank:  # the frozen base computes no weight gradients: fewer FLOPs than counted
        mfu += " (FLOPs counted as full training)"
    return (f"figure: {label} ({where}): {r['seconds_per_step']:.3f} s/step, "
            f"{r['tokens_per_s']:.0f} tokens/s, {r['model_tflops_per_s']:.3g} TFLOP/s, MFU {mfu}, "
            f"peak memory {mem}")


def model_spec(args):
    """The preset, with the tiny one resized by --hidden/--vocab and any one cut to --layers."""
    from megatron_sega.models import preset

    changes = {}
    if args.preset == "tiny":
        changes = dict(hidden_size=args.hidden, ffn_hidden_size=args.hidden * 11 // 4,
                       num_attention_heads=8, num_query_groups=4, vocab_size=args.vocab,
                       max_position_embeddings=max(args.seq, 256))
    if args.layers:
        changes["num_layers"] = args.layers
    return preset(args.preset, **changes)


def main(argv=None) -> dict:
    from megatron_sega.logging import training_flops_per_token

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", nargs="+", choices=STAGES, default=["lm"],
                   help="lm: ours vs transformers; sft/dpo/sega: the project's own steps")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument("--hidden", type=int, default=256, help="(tiny only) hidden size")
    p.add_argument("--vocab", type=int, default=8000, help="(tiny only) vocabulary")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="(--stage sft/dpo/sega) train rank-R LoRA adapters, the base frozen")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers step")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/train_step.json")
    args = p.parse_args(argv)
    if "lm" in args.stage and len(args.stage) > 1:
        p.error("--stage lm runs alone (it builds its own model and the transformers baseline)")
    if args.lora_rank < 0 or (args.lora_rank and args.stage == ["lm"]):
        p.error("--lora-rank R (R >= 1) applies to --stage sft/dpo/sega")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    spec = model_spec(args)
    tokens = args.batch * args.seq
    name, peak = gpu_peak()
    result = {"device": name, "preset": args.preset, "layers": spec.num_layers,
              "hidden": spec.hidden_size, "vocab": spec.vocab_size, "seq": args.seq,
              "batch": args.batch, "micro_batch": args.micro_batch, "dtype": args.dtype,
              "steps": args.steps, "lora_rank": args.lora_rank}
    if args.stage != ["lm"]:
        result["stages"] = run_stages(spec, args)
        result["peak_tflops"] = peak
        result["timer"] = "CUDA events" if device == "cuda" else "time.perf_counter"
        where = (f"{name}, {args.preset} cut to {spec.num_layers} layers, seq {args.seq}, "
                 f"batch {args.batch}, {args.dtype}"
                 + (f", LoRA rank {args.lora_rank}" if args.lora_rank else ""))
        lines = [stage_line(s, r, where, args.lora_rank) for s, r in result["stages"].items()]
    else:
        sec = ours(spec, dtype, args.batch, args.micro_batch, args.seq, args.steps, device)
        result["ours_tokens_per_s"] = tokens / sec
        if not args.no_baseline:
            base = baseline(spec, dtype, args.batch, args.micro_batch, args.seq, args.steps,
                            device)
            result["transformers_tokens_per_s"] = tokens / base
            result["ratio_vs_transformers"] = base / sec
        flops = training_flops_per_token(spec, args.seq) * tokens / sec
        result["model_tflops_per_s"] = flops / 1e12
        if peak:
            result["mfu"] = flops / 1e12 / peak
            result["peak_tflops"] = peak
        lines = [f"| train step | {name} | ours {result['ours_tokens_per_s']:.0f} tok/s | "
                 + (f"transformers {result['transformers_tokens_per_s']:.0f} tok/s | ratio "
                    f"{result['ratio_vs_transformers']:.2f}x |" if not args.no_baseline else "")
                 + (f" MFU {result['mfu']:.1%} |" if peak else "")]
        from megatron_sega.runtime import teardown

        teardown()
    result["flops_formula"] = "megatron_sega.logging.training_flops_per_token (3 x forward matmuls)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main()
