"""benchmarks/packing.py (issue 22) in its tiny mode: one run measures SFT, DPO and the SEGA
update packed and padded on the shipped real data and a sampled rollout, and packing removes
padding in each; the RESULTS table shows its rows. (Timings at this size mean nothing.)"""

from benchmarks import packing as bench
from benchmarks.__main__ import table


def test_tiny_benchmark_runs_and_packing_removes_padding(tmp_path):
    out = tmp_path / "packing.json"
    result = bench.main(["--tiny", "--out", str(out)])
    assert out.is_file()
    for stage in bench.STAGES:
        run = result[stage]
        padded, packed = run["padded"], run["packed"]
        assert padded["real_tokens_per_step"] == packed["real_tokens_per_step"] > 0
        assert packed["computed_tokens_per_step"] < padded["computed_tokens_per_step"], stage
        assert packed["padding_fraction"] < padded["padding_fraction"], stage
        assert 0 < run["padding_removed"] <= 1
        assert run["tokens_per_s_ratio"] > 0 and run["step_time_ratio"] > 0
    markdown = table({"packing": result})
    assert "| packing, SFT step (cpu, real data) | tokens per CPU-second packed" in markdown
    assert "| packing, SEGA update (cpu, real data, SEGA rollout) |" in markdown
