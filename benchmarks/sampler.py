"""Decode throughput of the KV-cached sampler vs transformers ``generate`` and a no-cache loop.

    python benchmarks/sampler.py [--hidden 256 --layers 4 --vocab 2000 --batch 8 --prompt 32
                                  --new 256 --repeats 3 --threads 1]

One process, TP=1/PP=1, CPU (or the GPU when one is visible), fp32. A random Hugging Face
``LlamaForCausalLM`` is converted to Megatron (``convert.hf``) so that every decoder runs the
same weights, greedily, on the same prompts (random ids, lengths from ``prompt/2`` to
``prompt``), for exactly ``--new`` tokens (no stop token; HF with ``min_new_tokens``):

    sampler        ``Sampler.generate`` on the model ``build_model`` makes with
                   ``attention="sdpa"`` (the local layers, SDPA core attention, with or without
                   Transformer Engine installed): prefill + KV-cached decode through
                   the sampler's lean forward (``sampling/decode.py``) and the vocab-parallel
                   ops, which also compute the untempered log-prob and the entropy of every
                   token;
    sampler_megatron  the same through Megatron-Core's own forward and StaticInferenceContext
                   (``Sampler(lean=False)``, what the sampler ran before);
    sampler_local  Megatron's forward with its local core attention (``attention="local"``);
    hf_generate    ``model.generate(..., use_cache=True, do_sample=False)``, SDPA attention,
                   left-padded batch (argmax only: no log-probs, no entropies);
    no_cache       the Megatron model on the whole sequence at every step (a sampler without a
                   KV cache), output layer on the last position only, argmax only.

Each decoder is called once for 4 tokens first (its one-off costs are reported as
``first_call_s``), then timed ``--repeats`` times, interleaved. Two clocks: wall time and the
process's CPU time. On CPU, on a shared machine the wall clock mostly measures the neighbours, so
the speed-ups are taken from the best CPU time (with one thread, CPU time = the work done); on a
GPU they are taken from the best wall time, the device synchronized around each call
(``speedup_clock``, recorded as ``speedup_clock``). Both times are reported. tokens/s counts the generated tokens of the whole batch.
The greedy outputs are compared with the sampler's (fp32 rounding may flip a near-tie after a
few hundred steps).

Then ``tp2_demo``: the demo's model (the ``tiny`` preset, 460-token vocabulary, random weights)
at TP = 2 in two gloo processes, generating as a demo SEGA step does (32 rows = 8 prompts x 4
candidates of 12-24 tokens, 40 new tokens, T = 1, top-p = 0.95, no stop token), with both
forwards: the time per decode step split into forward / sampling / bookkeeping
(``SamplerStats``), the collectives per decode step (sampling and forward apart) and the rows
left to the sampling fallback. Results go to benchmarks/results/sampler.json; a markdown table
is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def hf_model(hidden: int, layers: int, vocab: int, seed: int = 0, heads: int = 0,
             kv_heads: int = 0, ffn: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn or hidden * 11 // 4,
                         num_hidden_layers=layers,
                         num_attention_heads=heads or max(hidden // 64, 1),
                         num_key_value_heads=kv_heads or max(hidden // 128, 1), vocab_size=vocab,
                         max_position_embeddings=2048, rms_norm_eps=1e-5,
                         initializer_range=0.05, attn_implementation="sdpa",
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def megatron_model(hf, rt, attention: str = "auto", dtype=None):
    from megatron_sega.convert.hf import hf_to_megatron_state_dict
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.builder import build_model, wrap_mixed_precision
    from megatron_sega.models.spec import from_hf_config

    spec = from_hf_config(hf.config.to_dict())
    # bf16: Megatron's Float16Module, as the training model the sampler runs on (bf16 norms)
    model = wrap_mixed_precision(build_model(spec, rt, attention=attention,
                                             **({"dtype": dtype} if dtype else {})))
    full = hf_to_megatron_state_dict(hf.state_dict(), spec, spec.padded_vocab_size(rt.tp))
    load_full_state_dict(model, full, rt.tp, rt.tp_rank)
    return model.eval(), spec


# The timed model: the local layers with SDPA core attention, on any machine (the lean forward
# runs TE's layers too, but ``attention="auto"`` would time another training model wherever TE
# imports).
LEAN_ATTENTION = "sdpa"


def sampler_variants(model, local_model, rt, vocab: int) -> dict:
    """The samplers to time, by name. ``sampler`` asks for the lean forward (``lean=True``, so a
    silent fallback cannot be timed under its name) only where the model supports it; elsewhere
    it is left out with the reason printed, instead of aborting the whole benchmark."""
    from megatron_sega.models.builder import unwrap_model
    from megatron_sega.sampling import Sampler
    from megatron_sega.sampling.decode import lean_unsupported

    samplers = {}
    reason = lean_unsupported(unwrap_model(model))
    if reason is None:
        samplers["sampler"] = Sampler(model, rt, vocab, pad_id=0, lean=True)
    else:
        print(f"sampler (lean forward) skipped: {reason}", file=sys.stderr)
    samplers["sampler_megatron"] = Sampler(model, rt, vocab, pad_id=0, lean=False)
    if local_model is not None:  # None: left out (--skip sampler_local)
        samplers["sampler_local"] = Sampler(local_model, rt, vocab, pad_id=0, lean=False)
    return samplers


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
    ids, attn = ids.to(hf.device), attn.to(hf.device)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0,
                          eos_token_id=2)
    return out[:, width:]


def run_no_cache(model, prompts, new: int, vocab: int):
    """Greedy decoding with a full forward of the (left-padded) batch at every step."""
    import torch

    from megatron_sega.models.builder import unwrap_model
    from megatron_sega.sampling.sampler import _last_position_logits

    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    is_pad = torch.zeros(len(prompts), width + new, dtype=torch.bool)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = torch.tensor(p)
        is_pad[row, : width - len(p)] = True
    device = next(model.parameters()).device
    tokens, is_pad = tokens.to(device), is_pad.to(device)
    out = []
    with torch.no_grad(), _last_position_logits(unwrap_model(model)):
        for _ in range(new):
            n = tokens.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=device).triu(1) | is_pad[:, None, :n]
            mask &= ~torch.eye(n, dtype=torch.bool, device=device)
            positions = torch.arange(n, device=device).unsqueeze(0).expand(len(prompts), -1)
            logits = model(tokens, positions, mask.unsqueeze(1))
            nxt = logits[:, -1, :vocab].argmax(-1)
            out.append(nxt)
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], 1)
    return torch.stack(out, 1)


def _tp2_rank(rank: int, workdir: str, rows: int, new: int, repeats: int) -> None:
    """One rank of the TP=2 demo-model run (see the module docstring)."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from megatron_sega import runtime
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict
    from megatron_sega.models import preset
    from megatron_sega.models.builder import build_model
    from megatron_sega.sampling import Sampler, SamplingParams

    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank,
                            world_size=2)
    rt = runtime.setup(2, 1)
    spec = preset("tiny", vocab_size=460)
    model = build_model(spec, rt, use_te=False)
    load_full_state_dict(model, random_full_state_dict(spec, spec.padded_vocab_size(2), seed=7),
                         rt.tp, rt.tp_rank)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 460, (int(n),), generator=g).tolist()
               for n in torch.randint(12, 25, (rows // 4,), generator=g) for _ in range(4)]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=new)
    calls = {"n": 0}
    originals = {name: getattr(dist, name) for name in
                 ("all_reduce", "all_gather_single", "all_gather_into_tensor", "broadcast")
                 if hasattr(dist, name)}

    def counted(fn):
        def wrapper(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)
        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counted(fn))
    runs = {}
    for name, lean in (("lean (default)", True), ("megatron", False)):
        sampler = Sampler(model, rt, spec.vocab_size, pad_id=0, lean=lean)
        split = {"forward": 0, "sampling": 0}
        for part, method in (("forward", "_forward"), ("sampling", "_sample_and_share")):
            original = getattr(sampler, method)

            def tally(*a, _part=part, _original=original, **k):
                before = calls["n"]
                out = _original(*a, **k)
                split[_part] += calls["n"] - before
                return out

            setattr(sampler, method, tally)
        sampler.generate(prompts[:4], SamplingParams(max_new_tokens=4))  # warm-up
        best = None
        for _ in range(repeats):
            sampler.stats.reset()
            split.update(forward=0, sampling=0)
            sampler.generate(prompts, params, sample_ids=list(range(len(prompts))))
            st = sampler.stats
            per = st.per_step_ms()
            run = dict(forward_ms=per["forward"], sampling_ms=per["sampling"],
                       bookkeeping_ms=per["bookkeeping"], decode_steps=st.decode_steps,
                       prefill_s=st.prefill_s,
                       sampling_collectives_per_step=split["sampling"] / st.decode_steps,
                       # steps forwards in all (the prefill and steps - 1 decodes)
                       forward_collectives_per_step=split["forward"] / st.decode_steps,
                       fallback_rate=st.fallback_rows / max(st.sampled_rows, 1),
                       total_ms=sum(per.values()))
            if best is None or run["total_ms"] < best["total_ms"]:
                best = run
        runs[name] = best
    for name, fn in originals.items():
        setattr(dist, name, fn)
    if rank == 0:
        torch.save({"runs": runs, "rows": len(prompts), "new": new},
                   Path(workdir) / "tp2.pt")
    runtime.teardown()


def run_tp2_demo(rows: int = 32, new: int = 40, repeats: int = 3) -> dict:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="msega_tp2_") as workdir:
        mp.start_processes(_tp2_rank, args=(workdir, rows, new, repeats), nprocs=2,
                           start_method="spawn")
        return torch.load(Path(workdir) / "tp2.pt", weights_only=True)


def timed(fn, *args):
    """(wall seconds, CPU seconds, result). On a GPU the kernels run asynchronously: the device is
    synchronized before the clocks start (earlier work is not billed here) and before they stop
    (this call's kernels are)."""
    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def speedup_clock(device_type: str) -> str:
    """The clock the speed-ups are taken from: on CPU with one thread the process's CPU time is
    the work done (and immune to neighbours); on a GPU the work is the device's, which the CPU
    time does not see (the host mostly waits or queues kernels), so the synchronized wall time."""
    return "wall" if device_type == "cuda" else "cpu"


def speedups(seconds: dict, baseline: str = "sampler") -> dict:
    """Each decoder's time over the baseline's (how many times faster the baseline is), or None
    for every decoder when the baseline was skipped."""
    return {name: (t / seconds[baseline] if baseline in seconds else None)
            for name, t in seconds.items()}


def figure_line(rows: list[dict], where: str) -> str:
    """One readable line: every decoder's tokens/s on the speed-up clock, and how many times
    faster the sampler is than each other decoder."""
    parts = []
    for r in rows:
        faster = r["sampler_speedup"]
        vs = f" (sampler {faster:.2f}x faster)" if faster and r["decoder"] != "sampler" else ""
        parts.append(f"{r['decoder']} {r['tokens_per_s']:.0f} tokens/s{vs}")
    clock = rows[0]["speedup_clock"] if rows else "-"
    return f"figure: sampler ({where}; {clock} clock): " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--skip", nargs="*", default=[], help="decoders to leave out")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--heads", type=int, default=0, help="0: hidden / 64")
    parser.add_argument("--kv-heads", type=int, default=0, help="0: hidden / 128")
    parser.add_argument("--ffn", type=int, default=0, help="0: 11/4 hidden")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/sampler.json"))
    parser.add_argument("--no-tp2-demo", action="store_true", help="skip the TP=2 demo-model run")
    args = parser.parse_args()

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_sega import runtime
    rt = runtime.setup(1, 1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(rt.device):  # drawn where it runs: an 8B-wide init on CPU takes minutes
        hf = hf_model(args.hidden, args.layers, args.vocab, heads=args.heads,
                      kv_heads=args.kv_heads, ffn=args.ffn).to(dtype=dtype)
    model, spec = megatron_model(hf, rt, attention=LEAN_ATTENTION, dtype=dtype)
    local_model = (None if "sampler_local" in args.skip
                   else megatron_model(hf, rt, attention="local", dtype=dtype)[0])
    prompts = prompts_for(args.batch, args.prompt, args.vocab)
    samplers = sampler_variants(model, local_model, rt, spec.vocab_size)
    runners = {
        **{name: (lambda n, s=sampler: run_sampler(s, prompts, n))
           for name, sampler in samplers.items()},
        "hf_generate": lambda n: run_hf(hf, prompts, n),
        "no_cache": lambda n: run_no_cache(model, prompts, n, spec.vocab_size),
    }
    runners = {name: fn for name, fn in runners.items() if name not in args.skip}
    first_call = {name: timed(fn, 4)[0] for name, fn in runners.items()}
    wall = {name: float("inf") for name in runners}
    cpu = dict(wall)
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            w, c, outputs[name] = timed(fn, args.new)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)

    generated = args.batch * args.new
    ref = outputs[next(iter(runners))].cpu()
    clock = speedup_clock(rt.device.type)
    speedup = speedups(wall if clock == "wall" else cpu)
    rows = []
    for name in runners:
        rows.append({
            "decoder": name, "wall_s": wall[name], "cpu_s": cpu[name],
            "tokens_per_s_wall": generated / wall[name], "tokens_per_cpu_s": generated / cpu[name],
            # on the speed-up's clock: what the README and benchmarks/__main__ quote
            "tokens_per_s": generated / (wall[name] if clock == "wall" else cpu[name]),
            "sampler_speedup": speedup[name], "speedup_clock": clock,
            "first_call_s": first_call[name],
            "token_agreement": float((outputs[name].cpu() == ref).float().mean()),
        })
    runtime.teardown()
    tp2 = None if args.no_tp2_demo else run_tp2_demo()
    record = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model_params": sum(p.numel() for p in hf.parameters()),
        "device": str(rt.device), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows, "tp2_demo": tp2,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\nhidden {args.hidden}, {args.layers} layers, vocab {args.vocab} "
          f"({record['model_params'] / 1e6:.1f}M params), batch {args.batch}, prompts <= "
          f"{args.prompt}, {args.new} new tokens, {rt.device}, {torch.get_num_threads()} "
          f"thread(s), best of {args.repeats}, load average {os.getloadavg()[0]:.1f}\n")
    print(f"| decoder | CPU s | tokens / CPU-s | sampler speed-up ({clock}) | wall s | tokens/s (wall) "
          "| first call s | same tokens as sampler |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        times = f"{r['sampler_speedup']:.2f}x" if r["sampler_speedup"] else "-"
        print(f"| {r['decoder']} | {r['cpu_s']:.2f} | {r['tokens_per_cpu_s']:.0f} | {times} | "
              f"{r['wall_s']:.2f} | {r['tokens_per_s_wall']:.0f} | {r['first_call_s']:.2f} | "
              f"{r['token_agreement']:.3f} |")
    print(figure_line(rows, f"{rt.device}, hidden {args.hidden}, {args.layers} layers, batch "
                      f"{args.batch}, prompts <= {args.prompt}, {args.new} new tokens, "
                      f"{args.dtype}"), flush=True)
    if tp2:
        print(f"\nTP=2, demo model, {tp2['rows']} rows x {tp2['new']} new tokens, "
              f"T=1 p=0.95, per decode step (ms, host wall):\n")
        print("| forward | ms forward | ms sampling | ms bookkeeping | collectives: sampling | "
              "forward | sampling fallback rows |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in tp2["runs"].items():
            print(f"| {name} | {r['forward_ms']:.2f} | {r['sampling_ms']:.2f} | "
                  f"{r['bookkeeping_ms']:.2f} | {r['sampling_collectives_per_step']:.2f} | "
                  f"{r['forward_collectives_per_step']:.2f} | {r['fallback_rate']:.1%} |")


if __name__ == "__main__":
    main()
