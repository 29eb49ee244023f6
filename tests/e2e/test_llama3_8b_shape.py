"""The 8B config's defaults run their first SFT and SEGA step on CPU: a shape test.

``examples/configs/sega_llama3_8b.yaml`` through the CLI's entry point (bf16, TP=8, distributed
optimizer, the TE-or-SDPA attention choice), on 8 gloo processes, with the Llama-3-8B layout cut
to 2 layers, hidden 256 and FFN 896 (the 8B's 3.5x): the same 32 attention heads and 8 KV groups
(head_dim 8; 4 query heads and 1 KV group per TP rank) and the same 128,256-token vocabulary
(16,032 columns per rank). The architecture comes from the 8B preset through the project's own
``to_hf_config``; the CPU-only overrides are the device, the data, the step counts and batch
sizes (8 processes share 2 cores: one microbatch of 4 rows per step, as bf16 matmuls are slow on
CPU) and the tokenizer: the shipped tiny one, its vocabulary padded with unused tokens to the 8B's
128,256, so that losses, entropies and sampling run over the whole vocabulary on every TP rank, as
with Llama 3's own tokenizer. The time of each stage is printed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from megatron_sega.data import TINY_TOKENIZER_DIR
from megatron_sega.models import preset, to_hf_config
from tests.dist import run_distributed

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples/configs/sega_llama3_8b.yaml"

pytestmark = pytest.mark.distributed


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tokenizer_128k(directory: Path) -> Path:
    """The tiny tokenizer with placeholder tokens appended up to 128,256 ids."""
    directory.mkdir()
    data = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), 128256):
        vocab[f"<unused_{i}>"] = i
    (directory / "tokenizer.json").write_text(json.dumps(data))
    config = TINY_TOKENIZER_DIR / "tokenizer_config.json"
    (directory / "tokenizer_config.json").write_text(config.read_text())
    return directory


def _sft_then_sega(root: str, hf_config: str, tokenizer: str) -> dict:
    """Both stages through the CLI's entry point in the same 8 processes (one start-up)."""
    from megatron_sega import cli

    common = [f"model.hf_config={hf_config}", f"model.tokenizer={tokenizer}",
              "parallel.device=cpu", f"data.train={REPO}/examples/demo_data/train.jsonl",
              "data.max_seq_len=64", "logging.progress=false", "logging.tensorboard=false"]
    times, codes = {}, {}
    start = time.time()
    codes["sft"] = cli.main(["sft", "--config", str(CONFIG), *common, "sft.steps=1",
                             "sft.global_batch_size=4", "sft.micro_batch_size=4",
                             f"logging.dir={root}/sft", f"checkpoint.save_dir={root}/sft/ckpt"])
    times["sft"] = time.time() - start
    start = time.time()
    codes["sega"] = cli.main(["sega", "--config", str(CONFIG), *common,
                              f"model.load={root}/sft/ckpt", "sega.steps=1",
                              "sega.prompts_per_step=1", "sampling.max_new_tokens=8",
                              f"logging.dir={root}/sega"])
    times["sega"] = time.time() - start
    return {"codes": codes, "times": times}


def test_8b_defaults_first_sft_and_sega_step(tmp_path):
    spec = preset("llama3-8b").replace(num_layers=2, hidden_size=256, ffn_hidden_size=896)
    assert (spec.num_attention_heads, spec.num_query_groups, spec.vocab_size,
            spec.kv_channels) == (32, 8, 128256, 8)
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps(to_hf_config(spec)))
    start = time.time()
    tokenizer = _tokenizer_128k(tmp_path / "tokenizer")
    results = run_distributed(_sft_then_sega, 8, str(tmp_path), str(hf), str(tokenizer))
    print(f"8B-shaped (2 layers, hidden 256) at TP=8, 8 gloo processes: "
          f"{time.time() - start:.0f} s in all (start-up included); per stage on rank 0:",
          {k: round(v, 1) for k, v in results[0]["times"].items()})
    assert all(r["codes"] == {"sft": 0, "sega": 0} for r in results), results

    sft, sega = tmp_path / "sft", tmp_path / "sega"
    resolved = (sega / "sega_config.yaml").read_text()
    for line in ("dtype: bf16", "tp: 8", "distributed_optimizer: true"):
        assert line in resolved, line
    sft_row, = _jsonl(sft / "sft_metrics.jsonl")
    sega_row, = _jsonl(sega / "sega_metrics.jsonl")
    # A random model over 128,256 tokens: the first loss is near log(128256) = 11.76.
    assert sft_row["update_successful"] and abs(sft_row["loss"] - 11.76) < 1.0, sft_row
    assert not sega_row["skipped_update"] and sega_row["loss"] == sega_row["loss"], sega_row
    # The checkpoint records the 8B head layout and vocabulary.
    latest = sft / "ckpt" / (sft / "ckpt" / "latest").read_text().strip()
    info = json.loads((latest / "model_optim" / "megatron_sega.json").read_text())
    assert info["dtype"] == "bfloat16" and info["padded_vocab_size"] == 128256
    saved = info["spec"]
    assert (saved["num_attention_heads"], saved["num_query_groups"], saved["vocab_size"],
            saved["hidden_size"], saved["num_layers"]) == (32, 8, 128256, 256, 2)
