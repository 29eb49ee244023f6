"""Every public preference layout through ``sft``, ``dpo``, ``eval`` and ``sega`` end to end
(CPU, tiny model, one step each): one directory holds a file of each layout, written by
Hugging Face ``datasets``; each run prints the format of every file on one line and reads all
of their pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_run import Run
from tests.unit.test_data_formats import CONVERSATIONAL, HH, PKU, REWARDBENCH, SKYWORK, ULTRAFEEDBACK

datasets = pytest.importorskip("datasets")

CONFIG = """\
model: {preset: tiny, dtype: fp32}
parallel: {device: cpu}
data: {train: DIR, eval: DIR, max_seq_len: 96}
sft: {steps: 1, global_batch_size: 4, micro_batch_size: 2}
dpo: {steps: 1, global_batch_size: 4, micro_batch_size: 2}
sampling: {max_new_tokens: 8}
sega: {k: 2, steps: 1, prompts_per_step: 2, micro_batch_size: 4}
logging: {progress: false, tensorboard: false}
"""
FILES = {  # file name -> (rows, the format it is detected in)
    "rewardbench.jsonl": (REWARDBENCH["filtered"], "standard"),
    "conversational.parquet": (CONVERSATIONAL["train"], "conversational"),
    "skywork.arrow": (SKYWORK["train"], "implicit"),
    "ultrafeedback.parquet": (ULTRAFEEDBACK["train_prefs"], "implicit"),
    "hh.jsonl": (HH["train"], "hh"),
    "pku.parquet": (PKU["train"], "pku"),
}
N_PAIRS = sum(len(rows) for rows, _ in FILES.values())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    data = root / "data"
    data.mkdir()
    for name, (rows, _) in FILES.items():
        ds = datasets.Dataset.from_list(rows)
        if name.endswith(".jsonl"):
            ds.to_json(str(data / name))
        elif name.endswith(".parquet"):
            ds.to_parquet(str(data / name))
        else:  # the Arrow stream a Dataset.save_to_disk writes, as a lone file
            ds.save_to_disk(str(root / "saved"))
            (root / "saved" / "data-00000-of-00001.arrow").rename(data / name)
    (root / "run.yaml").write_text(CONFIG.replace("DIR", str(data)))
    return root


@pytest.mark.parametrize("stage", ["sft", "dpo", "eval", "sega"])
def test_every_layout_runs_through_each_stage(mixed: Path, stage: str) -> None:
    out = mixed / stage
    output = Run(stage, mixed, stage, mixed / "run.yaml", f"logging.dir={out}",
                 f"checkpoint.save_dir={out / 'ckpt'}").wait()
    option = "data.eval" if stage == "eval" else "data.train"
    (line,) = [ln for ln in output.splitlines() if ln.startswith(f"{option}: format ")]
    for name, (_, fmt) in FILES.items():
        assert f"{fmt} (" in line and name in line
    if stage == "eval":
        records = [json.loads(r) for r in (out / "eval" / "pairs.jsonl").read_text().splitlines()]
        assert len(records) == N_PAIRS


def test_eval_and_dpo_read_renamed_columns_from_their_splits(tmp_path: Path) -> None:
    """``data.columns`` and ``data.train_split`` / ``data.eval_split`` reach DPO's training
    pairs and ``eval`` (their pairs go through evaluate.load_eval_pairs): a DatasetDict with the
    UltraFeedback split names and renamed columns, its test split one pair shorter."""
    rows = [{"question": f"Q{i}?", "good": f"yes {i}.", "bad": f"no {i}."} for i in range(6)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows),
                          "test_prefs": datasets.Dataset.from_list(rows[:5])}
                         ).save_to_disk(str(tmp_path / "dd"))
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("DIR", str(tmp_path / "dd")))
    options = ["data.columns.prompt=question", "data.columns.chosen=good",
               "data.columns.rejected=bad", "data.train_split=train_prefs",
               "data.eval_split=test_prefs"]
    for stage in ("eval", "dpo"):
        out = tmp_path / stage
        Run(stage, tmp_path, stage, config, *options, f"logging.dir={out}",
            f"checkpoint.save_dir={out / 'ckpt'}", f"eval.out={out / 'eval'}").wait()
    records = (tmp_path / "eval" / "eval" / "pairs.jsonl").read_text().splitlines()
    assert len(records) == 5
    assert json.loads(records[0])["id"]  # read from the test split, through the renaming
