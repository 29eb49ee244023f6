"""LoRA through the CLI (CPU, tiny model, real processes), from a full-parameter SFT checkpoint:

- DPO with ``lora.rank=4`` and no ``dpo.reference``: the reference is the policy with its
  adapters off, so step 1 logs exactly log 2 (B starts at zero); killed after its first
  checkpoint and resumed, it logs the same metrics and ends with the same weights and Adam
  state, bit for bit, as an uninterrupted run;
- SEGA with LoRA and a KL term runs from the same checkpoint;
- the LoRA checkpoints hold the adapters only and point at their base (with its fingerprint);
  the next stage starts from one by continuing its adapters, with the adapters it started from
  as its reference (DPO from the LoRA DPO checkpoint starts at log 2 again); a base that moved
  or changed is refused with one line, by ``eval`` and by the converter;
- bad ``lora`` options are one line and exit 2.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sega.checkpoint.mcore import stored_keys
from tests.cli_run import Run
from tests.e2e.test_dpo_cli import DPO_STEPS, DPO_YAML, sft_checkpoint  # noqa: F401
from tests.e2e.test_resume import (
    _assert_same_checkpoint, _assert_same_metrics, _assert_same_train_state, _kill_and_resume,
    _latest, _metrics, _write,
)

LORA = "lora: {rank: 4, alpha: 8.0}\n"
REPO = Path(__file__).resolve().parents[2]


def test_lora_dpo_starts_at_log2_and_resumes_bitwise(sft_checkpoint, tmp_path):  # noqa: F811
    config = _write(tmp_path / "dpo.yaml", DPO_YAML.replace("LOAD", str(sft_checkpoint)) + LORA)
    sega = Run("sega", tmp_path, "sega", config, f"logging.dir={tmp_path / 'sega'}",
               "sega.kl_coef=0.1", "sega.steps=1", "sega.prompts_per_step=4", "sega.k=2",
               "sega.micro_batch_size=4", "sampling.max_new_tokens=8")
    resumed = _kill_and_resume(tmp_path, "dpo", config, DPO_STEPS)
    assert "lora: rank 4, alpha 8" in resumed and "trainable parameters" in resumed
    sega_out = sega.wait()
    assert "lora: rank 4" in sega_out
    (row,) = _metrics(tmp_path / "sega/sega_metrics.jsonl")
    assert math.isfinite(row["loss"]) and math.isfinite(row["kl_mean"])

    continuous = _metrics(tmp_path / "cont/dpo_metrics.jsonl")
    assert continuous[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(abs(r["loss"] - math.log(2)) > 1e-5 for r in continuous[1:])
    _assert_same_metrics(tmp_path / "cont/dpo_metrics.jsonl",
                         tmp_path / "kill/dpo_metrics.jsonl", DPO_STEPS)
    final_a, final_b = _latest(tmp_path / "cont/ckpt"), _latest(tmp_path / "kill/ckpt")
    _assert_same_checkpoint(final_a, final_b)
    _assert_same_train_state(final_a, final_b)
    # Evaluating the LoRA checkpoint without lora.rank would score the base: refused.
    bad = subprocess.run([sys.executable, "-m", "megatron_sega.cli", "eval", "--config",
                          str(config), "lora.rank=0", f"model.load={final_a}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in bad.stderr.splitlines() if "error" in line]
    assert bad.returncode == 2 and len(errors) == 1, bad.stderr
    assert "lora.rank=4 lora.alpha=8 lora.targets=[linear_qkv,linear_proj,linear_fc1,linear_fc2]" \
        in errors[0], errors
    other = subprocess.run([sys.executable, "-m", "megatron_sega.cli", "eval", "--config",
                            str(config), "lora.rank=8", f"model.load={final_a}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "with other rank than this run's (rank=8)" in other.stderr, \
        other.stderr
    info = json.loads((final_a / "model_optim" / "megatron_sega.json").read_text())
    base = info["lora"].pop("base")
    assert info["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                            "targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    assert base["path"] == str((_latest(sft_checkpoint) / "model_optim").resolve())
    assert "decoder.layers.mlp.linear_fc1.weight" in base["fingerprint"]
    model_keys = {k for k in stored_keys(final_a / "model_optim")
                  if "optimizer" not in k and k != "common_state"}
    assert model_keys and all(k.endswith((".lora_a", ".lora_b")) for k in model_keys), model_keys
    assert sum(f.stat().st_size for f in (final_a / "model_optim").glob("*.distcp")) < \
        sum(f.stat().st_size for f in base_files(Path(base["path"])))
    Run("eval", tmp_path, "eval", config, f"model.load={final_a}",
        f"eval.out={tmp_path / 'eval'}").wait()  # with the config's lora: the adapters load
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert 0 <= summary["accuracy"] <= 1 and summary["pairs"] > 0
    _next_stage_and_bad_bases(config, final_a, base, tmp_path)


def base_files(directory: Path) -> list[Path]:
    return list(directory.glob("*.distcp"))


def _one_line_error(args: list[str], words: str, rc: int = 2) -> None:
    run = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert run.returncode == rc and len(errors) == 1 and words in errors[0], run.stderr
    assert "Traceback" not in run.stderr


def _next_stage_and_bad_bases(config: Path, lora_ckpt: Path, base: dict, tmp_path: Path) -> None:
    # The next stage continues the adapters; its reference is the adapters it started from, so
    # DPO's first loss is log 2 again (with the adapters off it would not be).
    Run("dpo_next", tmp_path, "dpo", config, f"model.load={lora_ckpt}", "dpo.steps=1",
        f"logging.dir={tmp_path / 'next'}", f"checkpoint.save_dir={tmp_path / 'next' / 'ckpt'}"
        ).wait()
    (first,) = _metrics(tmp_path / "next/dpo_metrics.jsonl")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["margin"] == 0
    nxt = json.loads((_latest(tmp_path / "next/ckpt") / "model_optim" / "megatron_sega.json")
                     .read_text())
    assert nxt["lora"]["base"] == base  # still the SFT base: the adapters go on training on it

    # A base that changed (its fingerprint no longer matches), or that is gone.
    changed = tmp_path / "changed"
    shutil.copytree(lora_ckpt, changed)
    meta = changed / "model_optim" / "megatron_sega.json"
    info = json.loads(meta.read_text())
    info["lora"]["base"]["fingerprint"]["decoder.layers.mlp.linear_fc2.weight"][1] *= 1.001
    meta.write_text(json.dumps(info))
    cli = ["-m", "megatron_sega.cli", "eval", "--config", str(config)]
    _one_line_error([*cli, f"model.load={changed}", f"eval.out={tmp_path / 'e1'}"],
                    "the base weights loaded now differ (decoder.layers.mlp.linear_fc2.weight)")
    convert = [str(REPO / "tools" / "convert.py"), "mcore-to-hf", "--mcore-dir", str(changed)]
    _one_line_error([*convert, "--out", str(tmp_path / "hf_changed")],
                    "whose weights have changed since (decoder.layers.mlp.linear_fc2.weight)",
                    rc=1)  # the converter's exit status for what it finds while converting
    info["lora"]["base"]["path"] = str(tmp_path / "gone")
    meta.write_text(json.dumps(info))
    _one_line_error([*cli, f"model.load={changed}", f"eval.out={tmp_path / 'e2'}"],
                    f"their base checkpoint {tmp_path / 'gone'} is missing")
    # The untouched checkpoint exports merged (base from its pointer) and as a PEFT adapter.
    for extra in ([], ["--peft-adapter"]):
        out = tmp_path / f"hf{len(extra)}"
        done = subprocess.run([sys.executable, *convert[:2], "--mcore-dir", str(lora_ckpt),
                               "--out", str(out), *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert (out / ("adapter_config.json" if extra else "config.json")).is_file()


@pytest.mark.parametrize("override,words", [
    ("lora.rank=-1", "lora.rank must be >= 0"),
    ("lora.alpha=0", "lora.alpha must be > 0"),
    ("lora.targets=[linear_qkv,q_proj]", "unknown target(s) ['q_proj']"),
])
def test_bad_lora_options_are_one_line(override, words):
    run = subprocess.run([sys.executable, "-m", "megatron_sega.cli", "check", override],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert run.returncode == 2 and len(errors) == 1 and words in errors[0], run.stderr
    assert "Traceback" not in run.stderr
