"""Training-step throughput: our Megatron-Core step vs a plain ``transformers`` step, same run.

    python -m benchmarks.train_step                       (CPU: tiny-ish model, fp32)
    python -m benchmarks.train_step --preset llama3-8b --layers 2 --seq 4096 --dtype bf16 \
        --micro-batch 1 --no-baseline                     (GPU: 8B-shaped, a few layers)

One process, TP=PP=DP=1. Both sides train the same architecture on the same random tokens with
Adam (ours: Megatron's DDP + distributed optimizer + our loss through ``forward_backward``;
baseline: ``LlamaForCausalLM`` + ``torch.optim.AdamW``). Reported: tokens/s of each and their
ratio; on a GPU also model TFLOP/s and MFU against the chip's dense bf16 peak, with the FLOP count
of ``megatron_sega.logging.training_flops_per_token`` (matmul FLOPs, forward + backward = 3x
forward, attention scores included without causal halving).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def timed(step, steps: int, device: str) -> float:
    """Seconds per step, after one warm-up step."""
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> dict:
    from megatron_sega.logging import training_flops_per_token
    from megatron_sega.models import preset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument("--hidden", type=int, default=256, help="(tiny only) hidden size")
    p.add_argument("--vocab", type=int, default=8000, help="(tiny only) vocabulary")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers step")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/train_step.json")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    changes = {}
    if args.preset == "tiny":
        changes = dict(hidden_size=args.hidden, ffn_hidden_size=args.hidden * 11 // 4,
                       num_attention_heads=8, num_query_groups=4, vocab_size=args.vocab,
                       max_position_embeddings=max(args.seq, 256))
    if args.layers:
        changes["num_layers"] = args.layers
    spec = preset(args.preset, **changes)
    tokens = args.batch * args.seq
    result = {"device": gpu_peak()[0], "preset": args.preset, "layers": spec.num_layers,
              "hidden": spec.hidden_size, "seq": args.seq, "batch": args.batch,
              "micro_batch": args.micro_batch, "dtype": args.dtype}
    sec = ours(spec, dtype, args.batch, args.micro_batch, args.seq, args.steps, device)
    result["ours_tokens_per_s"] = tokens / sec
    if not args.no_baseline:
        base = baseline(spec, dtype, args.batch, args.micro_batch, args.seq, args.steps, device)
        result["transformers_tokens_per_s"] = tokens / base
        result["ratio_vs_transformers"] = base / sec
    name, peak = gpu_peak()
    flops = training_flops_per_token(spec, args.seq) * tokens / sec
    result["model_tflops_per_s"] = flops / 1e12
    if peak:
        result["mfu"] = flops / 1e12 / peak
        result["peak_tflops"] = peak
    result["flops_formula"] = "megatron_sega.logging.training_flops_per_token (3 x forward matmuls)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| train step | {name} | ours {result['ours_tokens_per_s']:.0f} tok/s | "
          + (f"transformers {result['transformers_tokens_per_s']:.0f} tok/s | ratio "
             f"{result['ratio_vs_transformers']:.2f}x |" if not args.no_baseline else "")
          + (f" MFU {result['mfu']:.1%} |" if peak else ""))
    from megatron_sega.runtime import teardown

    teardown()
    return result


if __name__ == "__main__":
    main()
