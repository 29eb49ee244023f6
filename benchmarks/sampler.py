"""Decode throughput of the KV-cached sampler vs transformers ``generate`` and a no-cache loop.

    python benchmarks/sampler.py [--hidden 256 --layers 4 --vocab 2000 --batch 8 --prompt 32
                                  --new 256 --repeats 3 --threads 2]

One process, TP=1/PP=1, CPU (or the GPU when one is visible), fp32. A random Hugging Face
``LlamaForCausalLM`` is converted to Megatron (``checkpoint.hf``) so that all three decoders run
the same weights, greedily, on the same prompts (random ids, lengths from ``prompt/2`` to
``prompt``), for exactly ``--new`` tokens (no stop token; HF with ``min_new_tokens``):

    sampler      ``Sampler.generate`` (prefill + KV-cached decode, vocab-parallel sampling ops;
                 also computes the untempered log-prob and the entropy of every token);
    hf_generate  ``model.generate(..., use_cache=True, do_sample=False)`` (left-padded batch);
    no_cache     the Megatron model on the whole sequence at every step (what a sampler without
                 a KV cache costs), greedy on the last position.

Each is warmed up once (a short call), then timed ``--repeats`` times, interleaved; the best
run is kept (the machine is shared: the minimum is the least disturbed). tokens/s counts the
generated tokens of the whole batch. The greedy outputs of the three are compared and the
token agreement reported (fp32 rounding may flip a near-tie after a few hundred steps).
Results go to benchmarks/results/sampler.json; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def hf_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 128, 1), vocab_size=vocab,
                         max_position_embeddings=2048, rms_norm_eps=1e-5,
                         initializer_range=0.05, attn_implementation="sdpa",
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def megatron_model(hf, rt):
    from megatron_sega.checkpoint.hf import hf_to_megatron_state_dict
    from megatron_sega.checkpoint.layout import load_full_state_dict
    from megatron_sega.models.builder import build_model
    from megatron_sega.models.spec import from_hf_config

    spec = from_hf_config(hf.config.to_dict())
    model = build_model(spec, rt)
    full = hf_to_megatron_state_dict(hf.state_dict(), spec, spec.padded_vocab_size(rt.tp))
    load_full_state_dict(model, full, rt.tp, rt.tp_rank)
    return model.eval(), spec


def prompts_for(batch: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(length // 2, 1), length + 1, (batch,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def run_sampler(sampler, prompts, new: int):
    from megatron_sega.sampling import SamplingParams

    rollout = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=new))
    return rollout.response_ids


def run_hf(hf, prompts, new: int):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        attn[row, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0,
                          eos_token_id=2)
    return out[:, width:]


def run_no_cache(model, prompts, new: int, vocab: int):
    """Greedy decoding with a full forward of the (left-padded) batch at every step."""
    import torch

    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    is_pad = torch.zeros(len(prompts), width + new, dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = torch.tensor(p)
        is_pad[row, : width - len(p)] = True
    out = []
    with torch.no_grad():
        for _ in range(new):
            n = tokens.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool).triu(1) | is_pad[:, None, :n]
            mask &= ~torch.eye(n, dtype=torch.bool)
            positions = torch.arange(n).unsqueeze(0).expand(len(prompts), -1)
            logits = model(tokens, positions, mask.unsqueeze(1))
            nxt = logits[:, -1, :vocab].argmax(-1)
            out.append(nxt)
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], 1)
    return torch.stack(out, 1)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-baseline-cache", action="store_true",
                        help="skip the (slow) no-cache loop")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/sampler.json"))
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_sega import runtime
    from megatron_sega.sampling import Sampler

    rt = runtime.setup(1, 1)
    hf = hf_model(args.hidden, args.layers, args.vocab).to(rt.device)
    model, spec = megatron_model(hf, rt)
    sampler = Sampler(model, rt, spec.vocab_size, pad_id=0)
    prompts = prompts_for(args.batch, args.prompt, args.vocab)

    runners = {
        "sampler": lambda n: run_sampler(sampler, prompts, n),
        "hf_generate": lambda n: run_hf(hf, prompts, n),
        "no_cache": lambda n: run_no_cache(model, prompts, n, spec.vocab_size),
    }
    if args.no_baseline_cache:
        runners.pop("no_cache")
    first_call = {}
    for name, fn in runners.items():  # first calls: one-off costs, reported separately
        first_call[name], _ = timed(fn, 4)
    best = {name: float("inf") for name in runners}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            seconds, outputs[name] = timed(fn, args.new)
            best[name] = min(best[name], seconds)

    generated = args.batch * args.new
    ref = outputs["sampler"].cpu()
    rows = []
    for name in runners:
        agree = float((outputs[name].cpu() == ref).float().mean())
        rows.append({"decoder": name, "seconds": best[name], "tokens_per_s": generated / best[name],
                     "speedup_of_sampler": best[name] / best["sampler"],
                     "first_call_s_4_tokens": first_call[name], "token_agreement": agree})
    record = {
        "config": vars(args) | {"out": None},
        "model_params": sum(p.numel() for p in hf.parameters()),
        "device": str(rt.device), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\nhidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, "
          f"prompts <= {args.prompt}, {args.new} new tokens, {rt.device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| decoder | seconds | tokens/s | sampler speed-up | agreement with sampler |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['decoder']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['speedup_of_sampler']:.2f}x | {r['token_agreement']:.3f} |")
    runtime.teardown()


if __name__ == "__main__":
    main()
