"""Peak memory and wall time of HF <-> Megatron conversion on a random Llama of a few GB.

    python benchmarks/convert.py [--hidden 2048 --layers 12 --vocab 32000 --dtype fp32]

Writes a random HF checkpoint (streamed, sharded at 1 GB) to a temp dir, converts it
HF -> torch_dist (--tp/--pp target) -> HF, checks the round trip tensor by tensor (bit-exact),
and records for each direction, measured in a fresh subprocess:

    wall_s/cpu_s  the conversion's wall time, and the CPU time (user+sys) of its whole process
                  (imports included: meaningful on a loaded machine);
    baseline_rss  VmRSS after importing torch, megatron.core and the converter (the interpreter's
                  fixed cost, independent of the model);
    peak_rss      VmHWM (the kernel's high-water mark of resident memory, file-backed mmap pages
                  included) at the end of the conversion;
    ratio         (peak_rss - baseline_rss) / checkpoint size (sum of the source weight files).

Results go to benchmarks/results/convert.json; a markdown row is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CHILD = r"""
import json, resource, sys, time
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
import torch, megatron.core  # noqa: F401
from megatron_sega.convert.hf_mcore import hf_to_mcore, mcore_to_hf
baseline = status("VmRSS")
direction, src, dst, tp, pp = sys.argv[1:6]
start = time.time()
if direction == "hf-to-mcore":
    hf_to_mcore(src, dst, tp=int(tp), pp=int(pp))
else:
    mcore_to_hf(src, dst, max_shard_bytes=10**9)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": time.time() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "baseline_rss": baseline, "peak_rss": status("VmHWM")}))
"""


def write_random_hf(directory: Path, spec, dtype) -> int:
    """A random HF checkpoint written tensor by tensor; returns the weight bytes."""
    import torch

    from megatron_sega.convert import hf
    from megatron_sega.convert.hf_io import ShardedSafetensorsWriter
    from megatron_sega.models.spec import to_hf_config

    shapes = hf.hf_shapes(spec)
    writer = ShardedSafetensorsWriter(directory, [(n, s, dtype) for n, s in shapes.items()],
                                      max_shard_bytes=10**9)
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, (0.02 * torch.randn(shape, generator=generator)).to(dtype))
    writer.close()
    config = to_hf_config(spec, torch_dtype=str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return writer.total_size


def measure(direction: str, src: Path, dst: Path, tp: int, pp: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, direction, str(src), str(dst),
                             str(tp), str(pp)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{direction} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_weights(a: Path, b: Path) -> bool:
    import torch

    from megatron_sega.convert.hf_io import HFCheckpoint

    left, right = HFCheckpoint(a), HFCheckpoint(b)
    if set(left.names) != set(right.names):
        return False
    return all(torch.equal(left.read([n])[n], right.read([n])[n]) for n in left.names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/convert.json")
    args = p.parse_args()

    import torch

    from megatron_sega.models.spec import LlamaSpec

    spec = LlamaSpec(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                     num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                     vocab_size=args.vocab, max_position_embeddings=4096)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="convert_bench_"))
    try:
        size = write_random_hf(work / "hf", spec, dtype)
        runs = {
            "hf_to_mcore": measure("hf-to-mcore", work / "hf", work / "mcore", args.tp, args.pp),
            "mcore_to_hf": measure("mcore-to-hf", work / "mcore", work / "hf_back", 1, 1),
        }
        exact = same_weights(work / "hf", work / "hf_back")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for run in runs.values():
        run["ratio"] = (run["peak_rss"] - run["baseline_rss"]) / size
    result = {
        "model": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers,
                  "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab,
                  "dtype": args.dtype, "target_tp": args.tp, "target_pp": args.pp},
        "checkpoint_bytes": size,
        "ratio_definition": "(VmHWM at end - VmRSS after importing torch+megatron+converter) "
                            "/ checkpoint bytes; each direction in a fresh subprocess",
        "round_trip_bit_exact": exact,
        "runs": runs,
        "host": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                 "python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    gb = 1e9
    print("| direction | checkpoint | wall | CPU (process) | baseline RSS | peak RSS | "
          "(peak-baseline)/size |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {size / gb:.2f} GB {args.dtype} | {run['wall_s']:.1f} s | "
              f"{run['cpu_s']:.1f} s | "
              f"{run['baseline_rss'] / gb:.2f} GB | {run['peak_rss'] / gb:.2f} GB | "
              f"{run['ratio']:.3f} |")
    print(f"round trip bit-exact: {exact}")


if __name__ == "__main__":
    main()
