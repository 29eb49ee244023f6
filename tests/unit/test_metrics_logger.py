"""Where metrics go: every step in the JSONL file; TensorBoard event files with every
``logging.interval``-th step and the last one; nothing from a rank that does not own them."""

from __future__ import annotations

import importlib.util
import json

import pytest

from megatron_sega.errors import ConfigError
from megatron_sega.logging import MetricsLogger


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_jsonl_is_complete_and_tensorboard_follows_the_interval(tmp_path):
    logger = MetricsLogger(str(tmp_path), name="sega", interval=2, progress=False)
    for step in range(1, 6):
        logger.log(step, {"loss": 0.5 * step, "score_mean": -step, "mfu": None,
                          "grad_norm": float("nan") if step == 4 else 1.0})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "sega_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] == 1.5
    files = list((tmp_path / "tensorboard" / "sega").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    scalars = _scalars(tmp_path / "tensorboard" / "sega")
    assert scalars["sega/loss"] == [(2, 1.0), (4, 2.0), (5, 2.5)]  # step 5: flushed by close()
    assert scalars["sega/score_mean"] == [(2, -2.0), (4, -4.0), (5, -5.0)]
    assert [s for s, _ in scalars["sega/grad_norm"]] == [2, 5]  # NaN is not a point
    assert "sega/mfu" not in scalars  # None (CPU) is not a number


def test_a_rank_that_does_not_own_the_metrics_writes_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "logs"), enabled=False, name="sft")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="logging.wandb = true but the wandb package is not "
                                          "installed; pip install wandb, or set logging.wandb=false"):
        MetricsLogger(str(tmp_path), wandb=True, tensorboard=False, progress=False)


def test_every_training_stage_logs_through_the_config_interval(tmp_path):
    """SFT, SEGA and DPO build their logger with ``session.stage_logger``, which takes the
    ``logging`` section's interval (DPO once ignored it)."""
    import ast
    from pathlib import Path
    from types import SimpleNamespace

    import megatron_sega.training as training
    from megatron_sega.config import load_config
    from megatron_sega.training.session import stage_logger

    for stage in ("sft", "sega", "dpo"):
        tree = ast.parse((Path(training.__file__).parent / f"{stage}.py").read_text())
        calls = {node.func.id for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert "stage_logger" in calls and "MetricsLogger" not in calls, stage
    config = load_config(None, [f"logging.dir={tmp_path}", "logging.interval=3",
                                "logging.progress=false"])
    logger = stage_logger(SimpleNamespace(config=config, is_metrics_rank=True), "dpo", 0, 7)
    for step in range(1, 8):
        logger.log(step, {"loss": float(step)})
    logger.close()
    assert _scalars(tmp_path / "tensorboard" / "dpo")["dpo/loss"] == [(3, 3.0), (6, 6.0),
                                                                     (7, 7.0)]


def test_a_run_from_step_n_drops_the_records_logged_past_it(tmp_path):
    """A run that crashed after its step-3 checkpoint had logged steps 4 and 5 (and half of 6);
    the run resumed from step 3 logs 4 and 5 again: each step appears once, in order."""
    path = tmp_path / "sft_metrics.jsonl"
    crashed = [json.dumps({"step": s, "loss": 10.0 + s}) for s in range(1, 6)]
    path.write_text("\n".join(crashed) + '\n{"step": 6, "lo')
    logger = MetricsLogger(str(tmp_path), name="sft", tensorboard=False, progress=False,
                           start_step=3)
    for step in (4, 5):
        logger.log(step, {"loss": float(step)})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [11.0, 12.0, 13.0, 4.0, 5.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft_metrics.jsonl"]  # no temp file
