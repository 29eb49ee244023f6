"""One SEGA step split into its phases: sample / score / train seconds and the peak memory of each.

    python -m benchmarks.sega_step                        (CPU: the tiny preset)
    python -m benchmarks.sega_step --preset llama3-8b --layers 4 --prompts 8 --k 4 \
        --prompt 128 --new 256 --micro-batch 4 --dtype bf16   (GPU: 8B-shaped, a few layers)

One process, TP=PP=DP=1: a ``Session`` built as a run builds it (``benchmarks.train_step.
bench_session``: bf16, the distributed optimizer, the tokenizer padded to the model's
vocabulary), the run's own sampler (``make_sampler``) and ``sega_step`` itself, on ``--prompts``
random prompts of ``--prompt`` ids with ``--k`` candidates each and ``--new`` new tokens (T = 1,
top-p = 0.95; random weights rarely stop early). Step 1 warms up; the figures are step 2's.

Seconds: ``sega_step``'s own ``time_sample`` / ``time_score`` / ``time_train`` (host wall clock;
sampling and the update each end in a host read of their results, so the device's work is in
them). Peak memory (``torch.cuda.max_memory_allocated``, reset per phase; None on CPU): sample =
the sampler's ``generate`` (KV cache included); train = from the end of sampling to the end of
the step (scoring, the batch and the update: what is still held from sampling shows here);
score = ``score_rollout`` on the same rollout again, alone. Printed on one ``figure:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import PeakMemory, bench_session, model_spec, random_rows  # noqa: E402


class PhaseSampler:
    """The session's sampler, its ``generate`` taken as the sample phase of ``peaks``: a phase
    named 'train' starts when it returns. Keeps the last rollout; anything else is the
    sampler's own."""

    def __init__(self, sampler, peaks: PeakMemory):
        self.sampler, self.peaks, self.rollout = sampler, peaks, None

    def generate(self, *args, **kwargs):
        self.peaks.start()
        self.rollout = self.sampler.generate(*args, **kwargs)
        self.peaks.stop("sample")
        self.peaks.start()
        return self.rollout

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def sega_phases(session, prompts, steps: int = 2) -> dict:
    """The last of ``steps`` SEGA steps: its metrics' phase times and the peak memory per phase."""
    from megatron_sega.training.rollouts import make_sampler, score_rollout
    from megatron_sega.training.sega import sega_step

    peaks = PeakMemory(session.runtime.device.type)
    sampler = PhaseSampler(make_sampler(session), peaks)
    index = list(range(len(prompts)))
    for step in range(steps):
        metrics = sega_step(session, sampler, prompts, index, step)
        peaks.stop("train")
    peaks.start()
    score_rollout(session, sampler.rollout, session.config.sega.k)
    peaks.stop("score")
    return {"seconds": {p: metrics[f"time_{p}"] for p in ("sample", "score", "train")},
            "peak_memory_gib": {p: peaks.gib[p] for p in ("sample", "score", "train")},
            "response_length_mean": metrics["response_length_mean"],
            "tokens_per_s": metrics["tokens_per_s"], "mfu": metrics["mfu"],
            "skipped_update": metrics["skipped_update"]}


def phase_line(r: dict, where: str) -> str:
    """One readable line of the split."""
    s, m = r["seconds"], r["peak_memory_gib"]
    mem = " / ".join("n/a" if m[p] is None else f"{m[p]:.1f}" for p in ("sample", "score", "train"))
    return (f"figure: SEGA step ({where}): sample {s['sample']:.3f} s / score {s['score']:.3f} s "
            f"/ train {s['train']:.3f} s; peak memory sample / score / train {mem} GiB")


def main(argv=None) -> dict:
    from megatron_sega.data import TokenizedExample
    from megatron_sega.runtime import teardown

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument("--hidden", type=int, default=256, help="(tiny only) hidden size")
    p.add_argument("--vocab", type=int, default=8000, help="(tiny only) vocabulary")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--k", type=int, default=4, help="candidates per prompt")
    p.add_argument("--prompt", type=int, default=32, help="prompt length (ids)")
    p.add_argument("--new", type=int, default=32, help="new tokens per candidate")
    p.add_argument("--micro-batch", type=int, default=4, help="candidates per update microbatch")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/sega_step.json")
    args = p.parse_args(argv)
    args.seq = args.prompt + args.new
    spec = model_spec(args)
    sections = {"data": {"max_seq_len": args.seq}, "sampling": {"max_new_tokens": args.new},
                "sega": {"k": args.k, "prompts_per_step": args.prompts,
                         "micro_batch_size": args.micro_batch}}
    with tempfile.TemporaryDirectory(prefix="msega_bench_") as workdir:
        session = bench_session(spec, args.dtype, Path(workdir), sections)
    prompts = [TokenizedExample(str(i), ids, []) for i, (ids, _) in
               enumerate(random_rows(args.prompts, args.prompt, args.prompt, session.vocab_size))]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": name, "preset": args.preset, "layers": spec.num_layers,
              "hidden": spec.hidden_size, "vocab": spec.vocab_size, "dtype": args.dtype,
              "prompts": args.prompts, "k": args.k, "prompt": args.prompt, "new": args.new,
              "micro_batch": args.micro_batch, **sega_phases(session, prompts)}
    teardown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    where = (f"{name}, {args.preset} cut to {spec.num_layers} layers, {args.prompts} prompts x "
             f"{args.k}, {args.prompt} + {args.new} tokens, {args.dtype}")
    print(phase_line(result, where), flush=True)
    return result


if __name__ == "__main__":
    main()
