"""``data.packing`` through the CLI (issue 22), CPU, tiny model:

- ``megatron-sega dpo`` packed on 2 processes (DP = 2: each rank's share of a global batch by
  tokens), with an evaluation at step 2: the first step starts from policy == reference, so its
  loss is exactly log 2 and its margin 0, as padded;
- a pair longer than ``dpo.max_tokens_per_microbatch`` is one line naming both options and
  exit 2, no traceback."""

from __future__ import annotations

import math

from tests.cli_run import Run
from tests.e2e.test_resume import DATA, _metrics, _write

YAML = f"""\
model: {{preset: tiny}}
data: {{{DATA}, max_seq_len: 64, packing: true}}
dpo: {{steps: 2, global_batch_size: 8, micro_batch_size: 2, eval_interval: 2,
       max_tokens_per_microbatch: 160}}
eval: {{max_tokens_per_microbatch: 128}}
optim: {{lr: 1.0e-3}}
logging: {{progress: false, tensorboard: false}}
"""


def test_packed_dpo_on_two_ranks_starts_at_log2(tmp_path):
    config = _write(tmp_path / "dpo.yaml", YAML)
    Run("dpo", tmp_path, "dpo", config, f"logging.dir={tmp_path}", nproc=2).wait()
    steps = _metrics(tmp_path / "dpo_metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and steps[0]["margin"] == 0.0
    assert steps[1]["loss"] != steps[0]["loss"]
    assert 0.0 <= steps[1]["eval_accuracy"] <= 1.0
    assert steps[0]["seq_len"] <= 160  # packed rows, at most the budget


def test_a_pair_over_the_budget_names_both_options(tmp_path, capsys):
    from megatron_sega import cli

    rc = cli.main(["dpo", "model.preset=tiny", "parallel.device=cpu",
                   "data.train=examples/demo_data/train.jsonl", "data.packing=true",
                   "data.max_seq_len=64", "dpo.max_tokens_per_microbatch=64", "dpo.steps=1",
                   "dpo.global_batch_size=4", "dpo.micro_batch_size=2",
                   f"logging.dir={tmp_path}", "logging.progress=false",
                   "logging.tensorboard=false"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert "dpo.max_tokens_per_microbatch = 64" in line and "data.max_seq_len" in line, line
    assert "a group of 2 sequences (a pair)" in line, line


SEGA_YAML = """\
model: {preset: tiny}
data: {train: examples/demo_data/train.jsonl, max_seq_len: 112, packing: true}
sampling: {max_new_tokens: 24}
sega: {k: 4, steps: 2, prompts_per_step: 4, micro_batch_size: 4, kl_coef: 0.1,
       updates_per_rollout: 2, clip_eps: 0.2, max_tokens_per_microbatch: 128}
optim: {lr: 1.0e-3}
logging: {progress: false, tensorboard: false}
"""


def test_packed_sega_on_two_ranks(tmp_path):
    """``megatron-sega sega`` packed at DP = 2: the candidates shared out over the replicas by
    tokens, the KL's reference and the clipped second update on the packed rows."""
    config = _write(tmp_path / "sega.yaml", SEGA_YAML)
    Run("sega", tmp_path, "sega", config, f"logging.dir={tmp_path}", nproc=2).wait()
    steps = _metrics(tmp_path / "sega_metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert not s["skipped_update"] and math.isfinite(s["loss"]), s
        assert s["kl_mean"] >= 0.0 and s["seq_len"] <= 128
    assert steps[1]["kl_mean"] > 0.0  # the policy moved away from its reference
