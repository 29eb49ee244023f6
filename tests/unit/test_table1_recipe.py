"""The 8B recipe's Table 1 datasets (``examples/table1_datasets.yaml``): each repository's file
layout, written by ``datasets`` with its real split and file names, is read by the options the
file names, with the 8B config, in the format it states and from the right split only; the
pipeline's ``--eval-name`` keeps one evaluation per set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sega.config import load_config
from megatron_sega.data import read_pairs
from megatron_sega.training.session import check_data_inputs, read_options
from tests.unit.test_data_formats import PKU, REWARDBENCH, SKYWORK, ULTRAFEEDBACK

datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
RECIPE = yaml.safe_load((REPO / "examples/table1_datasets.yaml").read_text())
CONFIG_8B = REPO / "examples/configs/sega_llama3_8b.yaml"


def _parquet(root: Path, files: dict[str, list[dict]]) -> None:
    for name, rows in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(root / name))


def _jsonl(root: Path, files: dict[str, list[dict]]) -> None:
    for name, rows in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_json(str(root / name))


def _skywork(root: Path) -> int:
    _parquet(root, {"data/train-00000-of-00001.parquet": SKYWORK["train"]})
    return len(SKYWORK["train"])


def _ultrafeedback(root: Path) -> int:
    sft = [{**r, "messages": r["chosen"]} for r in ULTRAFEEDBACK["train_prefs"]]
    _parquet(root, {"data/train_prefs-00000-of-00001.parquet": ULTRAFEEDBACK["train_prefs"],
                    "data/test_prefs-00000-of-00001.parquet": ULTRAFEEDBACK["test_prefs"],
                    "data/train_sft-00000-of-00001.parquet": sft,
                    "data/test_sft-00000-of-00001.parquet": sft})
    return len(ULTRAFEEDBACK["test_prefs"])


def _pku(root: Path) -> int:
    rows = PKU["train"]
    _jsonl(root, {f"data/{model}/{split}.jsonl": rows for model in ("Alpaca-7B", "Alpaca2-7B")
                  for split in ("train", "test")})
    return 2 * len(rows)


def _rewardbench(root: Path) -> int:
    rows = REWARDBENCH["filtered"]
    _parquet(root, {"data/raw-00000-of-00001.parquet": rows + rows[:1],
                    "data/filtered-00000-of-00001.parquet": rows})
    return len(rows)


LAYOUTS = {"skywork": _skywork, "ultrafeedback": _ultrafeedback, "pku-saferlhf": _pku,
           "rewardbench": _rewardbench}
ENTRIES = [(role, name) for role in ("train", "eval") for name in RECIPE[role]]


def test_the_recipe_names_every_table1_set() -> None:
    assert sorted(name for _, name in ENTRIES) == sorted(LAYOUTS)
    assert {RECIPE["eval"][n]["repo"] for n in RECIPE["eval"]} == {
        "HuggingFaceH4/ultrafeedback_binarized", "PKU-Alignment/PKU-SafeRLHF",
        "allenai/reward-bench"}


@pytest.mark.parametrize("role,name", ENTRIES)
def test_each_table1_set_reads_with_its_options(tmp_path: Path, capsys, role: str,
                                                name: str) -> None:
    entry = RECIPE[role][name]
    root = tmp_path / entry["repo"].split("/")[1]
    expected = LAYOUTS[name](root)
    config = load_config(CONFIG_8B, [*entry["options"], f"data.{role}={root}"])
    stage = "sega" if role == "train" else "eval"
    check_data_inputs(config, (stage,))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"data.{role}: format {entry['format']} (")
    pairs, report = read_pairs(root, split=getattr(config.data, f"{role}_split"),
                               options=read_options(config.data))
    assert len(pairs) == expected
    assert set(report.formats.values()) == {entry["format"]}
    if name == "rewardbench":
        assert {p.subset for p in pairs} == {"alpacaeval-easy", "hep-cpp"}


def _pipeline(work: Path, *args: str) -> str:
    """``pipeline_main`` with the launchers stubbed: each launch is written to work/calls."""
    script = f"""
        REPO={REPO}; PYTHON={sys.executable}
        source {REPO}/examples/pipeline.sh
        launch() {{ echo "launch $*" >> {work}/calls; }}
        run1() {{ echo "run1 $*" >> {work}/calls; }}
        signal_workers() {{ :; }}
        pipeline_main --hf-dir {work}/hf --work-dir {work} --train T --eval E "$@"
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(["bash", "-c", script, "pipeline", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_eval_name_keeps_one_evaluation_per_set(tmp_path: Path) -> None:
    (tmp_path / "sft" / "ckpt").mkdir(parents=True)
    _pipeline(tmp_path, "--stages", "eval", "--eval-name", "pku", "data.eval_split=test")
    assert "eval.out=" + str(tmp_path / "eval_sft_pku") in (tmp_path / "calls").read_text()
    assert (tmp_path / ".done_eval_pku").exists()
    assert "== eval_pku: done earlier, skipped" in _pipeline(
        tmp_path, "--stages", "eval", "--eval-name", "pku")
    _pipeline(tmp_path, "--stages", "eval", "--eval-name", "rewardbench")
    _pipeline(tmp_path, "--stages", "eval")  # no name: as before
    calls = (tmp_path / "calls").read_text().split()
    assert f"eval.out={tmp_path / 'eval_sft_rewardbench'}" in calls
    assert f"eval.out={tmp_path / 'eval_sft'}" in calls
    assert (tmp_path / ".done_eval").exists()
