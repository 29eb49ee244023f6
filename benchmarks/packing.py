"""Padding-free packing against padded batches (issue 22), on CPU, in one run.

    python -m benchmarks.packing            (CPU, a few minutes on 2 cores)
    python -m benchmarks.packing --tiny     (seconds: the test's mode, figures meaningless)

On a GPU (``tools/gpu_check.sh``: bf16, ``--attention auto``, Transformer Engine's THD kernels
where TE is installed): GPU only, not yet verified.

One training ``Session`` (``open_session``, fp32, TP = PP = DP = 1, SDPA attention) of a small
Llama (the tiny preset at hidden 256, 4 layers) with the shipped tiny tokenizer, and the same
global batches run padded (``data.packing=false``: each microbatch padded to the longest row of
the step's batch) and packed (``data.packing=true``: rows of ``*.max_tokens_per_microbatch``
tokens), alternating, best of ``--rounds`` rounds:

- SFT and DPO steps (``sft_step``, ``dpo_step``: the loops' own steps, optimizer included) on the
  shipped real data (``examples/real_data/train.jsonl``);
- the SEGA update (the microbatches and the Eq. 2 loss through Megatron's schedule, then the
  optimizer) on a SEGA rollout: k candidates per real prompt sampled by the project's sampler
  from the model after a short SFT warm-up on the same data (so that candidates stop at
  different points, as a trained policy's do).

Figures per stage: tokens per second (the real prompt + response tokens of the step over its
time), the padding fraction (1 - real tokens / tokens the model computed on) of each mode, and
the step-time ratio packed / padded. Time is taken on two clocks, wall and this process's CPU
time; on CPU the headline figures use the CPU clock (``clock``), which other jobs on a shared
machine disturb less, on a GPU the wall clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO / "examples" / "real_data" / "train.jsonl"
STAGES = ("sft", "dpo", "sega")


def make_session(args, workdir: Path):
    """The benchmark's session: the tiny preset resized, the padded tiny tokenizer."""
    from benchmarks.train_step import padded_tokenizer
    from megatron_sega.config import load_config
    from megatron_sega.models import preset
    from megatron_sega.models.spec import to_hf_config
    from megatron_sega.training.session import open_session

    spec = preset("tiny", hidden_size=args.hidden, ffn_hidden_size=args.hidden * 11 // 4,
                  num_attention_heads=8, num_query_groups=4, vocab_size=args.vocab,
                  num_layers=args.layers, max_position_embeddings=max(args.seq, 256))
    hf_config = workdir / "config.json"
    hf_config.write_text(json.dumps(to_hf_config(spec)))
    tokenizer = padded_tokenizer(workdir / "tokenizer", spec.vocab_size)
    base = {
        "model": {"hf_config": str(hf_config), "tokenizer": str(tokenizer), "dtype": args.dtype,
                  "attention": args.attention},
        "logging": {"progress": False, "tensorboard": False},
        "data": {"max_seq_len": args.seq, "packing": False},
        "sft": {"micro_batch_size": args.micro, "max_tokens_per_microbatch": args.budget},
        "dpo": {"micro_batch_size": args.micro // 2,
                "max_tokens_per_microbatch": args.budget},
        "sega": {"k": args.k, "micro_batch_size": args.micro,
                 "max_tokens_per_microbatch": args.budget},
        "sampling": {"max_new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 1.0},
    }
    return open_session(load_config(base=base), train=True, total_steps=10_000,
                        lr_override=args.lr)


def set_packing(session, on: bool) -> None:
    session.config = session.config.with_overrides(f"data.packing={str(on).lower()}")


def computed_tokens(micro: list[dict]) -> int:
    """The token positions the model runs over: every microbatch's rows, padding included."""
    return sum(int(mb["tokens"].numel()) for mb in micro)


def stage_runs(session, args, examples, pairs, rollout, advantage):
    """(stage, mode) -> (a step of it on batch i, its real tokens, its computed tokens)."""
    from megatron_sega.training.dpo import dpo_step, microbatch_order
    from megatron_sega.training.engine import forward_backward, optimizer_step
    from megatron_sega.training.sega import (
        packed_rollout_batch, rollout_batch, sega_loss_fn, training_microbatches,
    )
    from megatron_sega.training.session import load_reference
    from megatron_sega.training.sft import sft_batch, sft_step
    from megatron_sega.data import collate_pairs
    from megatron_sega.config import token_budget
    from megatron_sega.training.microbatch import pack_for_schedule

    gbs = args.batch
    sft_batches = [examples[i * gbs:(i + 1) * gbs] for i in range(args.steps)]
    pair_batches = [pairs[i * gbs:(i + 1) * gbs] for i in range(args.steps)]
    reference = load_reference(session)
    n_groups = rollout.num_samples // args.k

    def sft(i):
        return sft_step(session, sft_batches[i])

    def dpo(i):
        return dpo_step(session, reference, pair_batches[i])

    def sega(i):
        packed = session.config.data.packing
        batch, adv = (packed_rollout_batch(session, rollout, advantage) if packed
                      else (rollout_batch(session, rollout), advantage))
        micro = training_microbatches(session, batch, adv, {})
        forward_backward(session.chunks, session.runtime, micro,
                         sega_loss_fn(session, float(n_groups), False, False))
        return optimizer_step(session.optimizer, session.scheduler)

    def sizes(stage: str, packed: bool) -> tuple[int, int]:
        """(real tokens, computed tokens) of all the stage's steps in this mode."""
        set_packing(session, packed)
        if stage == "sft":
            parts = [sft_batch(session, b) for b in sft_batches]
            return (sum(int(b.lengths.sum()) for b, _ in parts),
                    sum(computed_tokens(m) for _, m in parts))
        if stage == "dpo":
            real = computed = 0
            for shard in pair_batches:
                real += sum(p.chosen.length + p.rejected.length for p in shard)
                if packed:
                    batch = pack_for_schedule(
                        session.chunks, session.runtime,
                        [ex for p in shard for ex in (p.chosen, p.rejected)],
                        session.tokenizer.pad_id, token_budget(session.config, "dpo"),
                        stage="dpo",
                        groups=[[2 * j, 2 * j + 1] for j in range(len(shard))])
                    computed += int(batch.tokens.numel())
                else:
                    m = session.config.dpo.micro_batch_size
                    batch = microbatch_order(collate_pairs(shard, session.tokenizer.pad_id), m)
                    computed += -(-batch.tokens.shape[0] // (2 * m)) * 2 * m * batch.tokens.shape[1]
            return real, computed
        batch, adv = (packed_rollout_batch(session, rollout, advantage) if packed
                      else (rollout_batch(session, rollout), advantage))
        micro = training_microbatches(session, batch, adv, {})
        return int(batch.lengths.sum()) * args.steps, computed_tokens(micro) * args.steps

    return {"sft": sft, "dpo": dpo, "sega": sega}, sizes


def sample_rollout(session, args, prompts):
    """A SEGA rollout: k candidates for each of ``args.prompts`` real prompts, sampled by the
    project's sampler (as ``sega_step`` samples), and the candidates' group-centred advantages."""
    from megatron_sega.training.rollouts import make_sampler, sampling_params, score_rollout

    rows = [p.prompt_ids for p in prompts[:args.prompts] for _ in range(args.k)]
    sampler = make_sampler(session)
    rollout = sampler.generate(rows, sampling_params(session), list(range(len(rows))),
                               session.tokenizer.decode)
    scored = score_rollout(session, rollout, args.k)
    return rollout, scored.advantage


def warm_up(session, examples, args) -> None:
    """A short SFT on the real data, so that sampled candidates learn to stop."""
    from megatron_sega.training.sft import sft_step

    set_packing(session, True)
    for step in range(args.warmup_steps):
        start = (step * args.batch) % max(len(examples) - args.batch, 1)
        sft_step(session, examples[start:start + args.batch])


def main(argv=None) -> dict:
    from megatron_sega.config import token_budget
    from megatron_sega.training.evaluate import load_eval_pairs
    from megatron_sega.training.rollouts import load_prompts
    from megatron_sega.training.sft import load_sft_examples

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256, help="data.max_seq_len")
    p.add_argument("--budget", type=int, default=0,
                   help="*.max_tokens_per_microbatch (0: the config's default, micro_batch_size "
                        "rows of max_seq_len)")
    p.add_argument("--micro", type=int, default=4, help="padded rows per microbatch")
    p.add_argument("--batch", type=int, default=16, help="global batch (examples or pairs)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="best of")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="prompts of the SEGA rollout")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--warmup-steps", type=int, default=40, help="SFT steps before sampling")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--attention", choices=("sdpa", "auto"), default="sdpa",
                   help="auto: Transformer Engine's THD kernels where TE is installed (GPU)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/packing.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.steps, args.rounds = 64, 2, 1, 1
        args.prompts, args.new_tokens, args.warmup_steps, args.batch = 2, 16, 1, 4
    with tempfile.TemporaryDirectory(prefix="msega_pack_") as workdir:
        session = make_session(args, Path(workdir))
        examples = load_sft_examples(session, str(DATA))
        pairs = load_eval_pairs(session, str(DATA), append_eos=True)
        prompts = load_prompts(session, str(DATA))
    warm_up(session, examples, args)
    rollout, advantage = sample_rollout(session, args, prompts)
    steps, sizes = stage_runs(session, args, examples, pairs, rollout, advantage)
    # Wall time and process CPU time: on a shared CPU machine other jobs stretch the wall clock
    # of either mode; the CPU seconds this process spent are the steadier figure there.
    seconds: dict = {stage: {"padded": [], "packed": []} for stage in STAGES}
    cpu_seconds: dict = {stage: {"padded": [], "packed": []} for stage in STAGES}
    for _ in range(args.rounds):
        for stage in STAGES:
            for mode in ("padded", "packed"):
                set_packing(session, mode == "packed")
                steps[stage](0)  # warm-up (and the first packing's allocations)
                start, cpu = time.perf_counter(), time.process_time()
                for i in range(args.steps):
                    steps[stage](i)
                seconds[stage][mode].append((time.perf_counter() - start) / args.steps)
                cpu_seconds[stage][mode].append((time.process_time() - cpu) / args.steps)
    result: dict = {
        "device": session.runtime.device.type, "threads": torch.get_num_threads(),
        "model": f"tiny preset, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
                 f"{args.dtype}, attention {args.attention}, TP=PP=DP=1",
        "data": "examples/real_data/train.jsonl (shipped real data), tiny tokenizer",
        "settings": {"data.max_seq_len": args.seq,
                     "max_tokens_per_microbatch": {s: token_budget(session.config, s)
                                                   for s in STAGES},
                     "padded micro_batch_size (rows; DPO pairs)": args.micro,
                     "global_batch": args.batch, "steps_per_round": args.steps,
                     "rounds": args.rounds, "sega_k": args.k, "sega_prompts": args.prompts,
                     "sampling.max_new_tokens": args.new_tokens,
                     "sft_warmup_steps_before_sampling": args.warmup_steps},
        "rollout_response_lengths": {
            "min": int(rollout.lengths.min()), "mean": float(rollout.lengths.float().mean()),
            "max": int(rollout.lengths.max()),
            "stopped_fraction": sum(r == "stop" for r in rollout.finish_reason)
            / rollout.num_samples},
    }
    for stage in STAGES:
        row: dict = {}
        for mode in ("padded", "packed"):
            real, computed = sizes(stage, mode == "packed")
            sec, cpu = min(seconds[stage][mode]), min(cpu_seconds[stage][mode])
            row[mode] = {"seconds_per_step": sec, "tokens_per_s": real / args.steps / sec,
                         "cpu_seconds_per_step": cpu,
                         "tokens_per_cpu_s": real / args.steps / cpu,
                         "real_tokens_per_step": real / args.steps,
                         "computed_tokens_per_step": computed / args.steps,
                         "padding_fraction": 1 - real / computed,
                         "every_round_s": seconds[stage][mode],
                         "every_round_cpu_s": cpu_seconds[stage][mode]}
        # The headline clock: process CPU time on CPU (a shared machine), wall time on a GPU.
        clock = "cpu" if result["device"] == "cpu" else "wall"
        rate = "tokens_per_cpu_s" if clock == "cpu" else "tokens_per_s"
        step = "cpu_seconds_per_step" if clock == "cpu" else "seconds_per_step"
        row["clock"] = clock
        row["tokens_per_s_ratio"] = row["packed"][rate] / row["padded"][rate]
        row["step_time_ratio"] = row["packed"][step] / row["padded"][step]
        row["wall_tokens_per_s_ratio"] = (row["packed"]["tokens_per_s"]
                                          / row["padded"]["tokens_per_s"])
        pad, packed = row["padded"]["padding_fraction"], row["packed"]["padding_fraction"]
        row["padding_removed"] = (pad - packed) / pad if pad > 0 else 0.0
        result[stage] = row
        label = {"sft": "SFT step", "dpo": "DPO step", "sega": "SEGA update"}[stage]
        print(f"figure: packing, {label} ({result['device']}, {args.dtype}): packed "
              f"{row['packed'][rate]:.0f} vs padded {row['padded'][rate]:.0f} "
              f"{rate.replace('_', ' ')} ({row['tokens_per_s_ratio']:.2f}x; wall clock "
              f"{row['wall_tokens_per_s_ratio']:.2f}x); padding "
              f"{pad:.1%} -> {packed:.1%} ({row['padding_removed']:.0%} removed); step time "
              f"ratio {row['step_time_ratio']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
