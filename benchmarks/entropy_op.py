"""Throughput of the fused log-prob + entropy op vs a plain full-vocabulary torch computation.

    python -m benchmarks.entropy_op [--tokens 4096] [--vocab 128256] [--dtype bf16]

One process (TP=1), the same logits for both: ours is ``ops.log_probs_and_entropy`` (chunked,
fp32 math); the baseline upcasts the whole ``[tokens, V]`` block and uses ``log_softmax``.
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


def _rate(fn, tokens: int, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens * repeats / (time.perf_counter() - start)


def main(argv=None) -> dict:
    from megatron_sega import ops

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/entropy_op.json")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab, generator=g, device=device).to(dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g, device=device)

    def ours():
        ops.log_probs_and_entropy(logits, targets, 0, args.vocab, None)

    def baseline():
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp.gather(-1, targets[:, None])
        -(logp.exp() * logp).sum(-1)

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype,
              "ours_tokens_per_s": _rate(ours, args.tokens, args.repeats, device),
              "baseline_tokens_per_s": _rate(baseline, args.tokens, args.repeats, device)}
    result["ratio"] = result["ours_tokens_per_s"] / result["baseline_tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| entropy+logprob op | {result['device']} | ours {result['ours_tokens_per_s']:.0f} "
          f"tok/s | full log_softmax {result['baseline_tokens_per_s']:.0f} tok/s | "
          f"{result['ratio']:.2f}x |")
    print(f"figure: entropy+logprob op ({result['device']}, {args.tokens} tokens x vocab "
          f"{args.vocab}, {args.dtype}): {result['ours_tokens_per_s']:.0f} tokens/s vs full "
          f"log_softmax {result['baseline_tokens_per_s']:.0f} tokens/s ({result['ratio']:.2f}x)",
          flush=True)
    return result


if __name__ == "__main__":
    main()
