"""Real-shaped logits: sorted log-probability profiles of SmolLM2-135M-Instruct, and their mapping
onto a Llama-3-sized vocabulary.

    python -m benchmarks.logit_profiles [--model DIR] [--out benchmarks/data/smollm2_profiles.pt]

Writes the fixture the sampling benchmarks read. ``--model`` is a Hugging Face checkpoint of
SmolLM2-135M-Instruct (default: fetched into a temporary directory with
``tools/fetch_model.py smollm2-135m-instruct``). Two kinds of rows, both what a sampler sees:

- ``generated``: the model's own responses to the chat prompts below, sampled at the paper's
  T = 1, top-p = 0.95 (``transformers`` ``generate``, seeded); one row per generated position,
  the logits the next token was drawn from;
- ``teacher_forced``: positions of human-written English text (the Apache-2.0 licence text and
  the Zen of Python), one row per position.

Per row the file keeps the ``TOP`` largest log-probabilities (sorted, fp32), a ``SKETCH``-point
quantile sketch of the remaining ``V - TOP`` log-probabilities (ascending) and the log of their
total mass, plus the nucleus sizes of the full 49,152-token distribution for the benchmark
settings (what the mapped rows should reproduce). :func:`expand` turns a row into logits over
any larger vocabulary: the top values at random ids, the tail interpolated from the sketch to
the larger count and shifted so that its total mass is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "benchmarks" / "data" / "smollm2_profiles.pt"
TOP, SKETCH = 256, 64
SETTINGS = {"T=1 p=0.95": dict(temperature=1.0, top_k=0, top_p=0.95),
            "T=0.7 k=50 p=0.9": dict(temperature=0.7, top_k=50, top_p=0.9)}

PROMPTS = [
    "Explain why the sky is blue in a few sentences.",
    "Write a short poem about autumn leaves.",
    "What is the difference between a list and a tuple in Python?",
    "Give me three tips for studying for an exam.",
    "Summarise the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "What causes the seasons on Earth?",
    "Write a haiku about the ocean.",
    "If a train travels 60 km in 45 minutes, what is its average speed in km/h?",
    "Describe a cat to someone who has never seen one.",
    "What are the main causes of climate change?",
    "Translate 'good morning, how are you?' into French and explain each word.",
    "Write a Python function that reverses a string.",
    "What is photosynthesis?",
    "Tell me a fun fact about octopuses.",
    "Why do we need sleep?",
]
GENERATED_TOKENS = 16  # per prompt: 16 x 16 = 256 rows
TEACHER_ROWS = 128


def _human_text() -> str:
    import codecs

    with contextlib.redirect_stdout(io.StringIO()):  # importing it prints the Zen of Python
        zen = codecs.decode(importlib.import_module("this").s, "rot13")
    licence = Path("/usr/share/common-licenses/Apache-2.0")
    text = licence.read_text()[:6000] if licence.is_file() else ""
    return zen + "\n\n" + text


def _profile(logits: torch.Tensor) -> dict:
    """Sorted top log-probs, tail sketch and tail mass of ``logits [n, V]`` (fp64 math)."""
    logp = torch.log_softmax(logits.double(), -1)
    values = logp.sort(-1, descending=True).values
    tail = values[:, TOP:].flip(-1)  # ascending
    q = torch.linspace(0, 1, SKETCH, dtype=torch.float64)
    sketch = torch.quantile(tail, q, dim=-1).T
    nucleus = {}
    for name, cfg in SETTINGS.items():
        w = logits.double() / cfg["temperature"]
        v = w.sort(-1, descending=True).values
        if cfg["top_k"]:
            v = v[:, :cfg["top_k"]]
        p = torch.softmax(v, -1)
        nucleus[name] = ((p.cumsum(-1) - p) < cfg["top_p"]).sum(-1)
    return dict(top=values[:, :TOP].float(), sketch=sketch.float(),
                tail_logmass=torch.logsumexp(tail, -1).float(),
                entropy=-(logp.exp() * logp).sum(-1).float(), nucleus=nucleus)


def build(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows, kinds = [], []
    torch.manual_seed(2025)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                          add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
            out = model.generate(ids, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                 max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS,
                                 return_dict_in_generate=True, output_logits=True)
            rows.append(torch.cat(out.logits, 0))
            kinds += ["generated"] * len(out.logits)
        text_ids = tok(_human_text(), return_tensors="pt").input_ids[:, :TEACHER_ROWS + 1]
        rows.append(model(text_ids).logits[0, :TEACHER_ROWS])
        kinds += ["teacher_forced"] * TEACHER_ROWS
    logits = torch.cat(rows, 0)
    weights = Path(model_dir) / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    import transformers

    profile = _profile(logits)
    return dict(profile, kinds=kinds, meta=dict(
        model="SmolLM2-135M-Instruct (tools/fetch_model.py smollm2-135m-instruct)",
        weights_sha256=sha, vocab=int(logits.shape[-1]), top=TOP, sketch=SKETCH,
        generated=dict(prompts=PROMPTS, tokens_per_prompt=GENERATED_TOKENS, temperature=1.0,
                       top_p=0.95, seed=2025, chat_template=True),
        teacher_forced="Zen of Python + the first 6000 characters of the Apache-2.0 licence "
                       "(/usr/share/common-licenses/Apache-2.0)",
        transformers=str(transformers.__version__), torch=str(torch.__version__),
        script="python -m benchmarks.logit_profiles"))


def load(path: Path = FIXTURE) -> dict:
    return torch.load(path, weights_only=True)


def expand(profiles: dict, rows: torch.Tensor, vocab: int, seed: int = 0) -> torch.Tensor:
    """``[len(rows), vocab]`` fp32 logits: row ``rows[i]``'s profile at random ids.

    The top ``TOP`` log-probs keep their values; the ``vocab - TOP`` others follow the tail's
    quantile sketch (linear interpolation) shifted by a constant so that their total mass equals
    the recorded tail mass. Each row gets its own random permutation of the ids.
    """
    top, sketch = profiles["top"][rows].double(), profiles["sketch"][rows].double()
    n_tail = vocab - top.shape[1]
    pos = torch.linspace(0, sketch.shape[1] - 1, n_tail, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=sketch.shape[1] - 2)
    frac = pos - lo
    tail = sketch[:, lo] * (1 - frac) + sketch[:, lo + 1] * frac
    tail += (profiles["tail_logmass"][rows].double() - torch.logsumexp(tail, -1)).unsqueeze(1)
    values = torch.cat([top, tail.flip(-1)], 1).float()
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(vocab, generator=g) for _ in range(len(rows))])
    return torch.empty_like(values).scatter_(1, perm, values)


def nucleus_sizes(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                  ) -> torch.Tensor:
    """Per row, the size of the top-k-then-top-p support (fp64 reference)."""
    v = (logits.double() / temperature).sort(-1, descending=True).values
    if top_k:
        v = v[:, :top_k]
    p = torch.softmax(v, -1)
    return ((p.cumsum(-1) - p) < top_p).sum(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="SmolLM2-135M-Instruct HF checkpoint directory")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from megatron_sega.models.fetch import fetch

        args.model = Path(tempfile.mkdtemp(prefix="smollm2_")) / "hf"
        fetch("smollm2-135m-instruct", args.model)
    fixture = build(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    n = len(fixture["kinds"])
    print(f"{n} rows -> {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    for name, sizes in fixture["nucleus"].items():
        qs = torch.quantile(sizes.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
        print(f"  {name}: nucleus size median {qs[0]:.0f}, p90 {qs[1]:.0f}, p99 {qs[2]:.0f}, "
              f"max {int(sizes.max())}; rows > 64: {(sizes > 64).float().mean():.1%}, "
              f"> 128: {(sizes > 128).float().mean():.1%}")
    print(f"  entropy mean {fixture['entropy'].mean():.2f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
