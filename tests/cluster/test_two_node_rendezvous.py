"""Test 3: multi-node rendezvous. Two torchrun agents on this machine, ``--nnodes 2``, one
process each, c10d rendezvous on 127.0.0.1 (a free port), run the pipeline's SFT stage (TP=2
across the two "nodes"). Its per-step metrics and its final model and optimizer state equal, bit
for bit, those of the single-node run of the same world size (the reference pipeline's SFT)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from megatron_sega.checkpoint.manager import read_tensors
from tests.cluster import pipeline_run as pr


def test_two_agents_c10d_match_a_single_node_run(inputs, reference, tmp_path):
    ref_work, _ = reference
    work = tmp_path / "work"
    port = pr.free_port()
    sft = ["-m", "megatron_sega.cli", "sft", "--config", "examples/configs/sega_llama3_8b.yaml",
           f"data.train={inputs['train']}", f"data.eval={inputs['eval']}", *pr.OVERRIDES,
           f"model.load={ref_work / 'mcore'}", f"logging.dir={work / 'sft'}",
           f"checkpoint.save_dir={work / 'sft' / 'ckpt'}"]
    agents, logs = [], []
    for node in range(2):
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "w") as out:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                 "--nproc-per-node", str(pr.NPROC // 2), "--rdzv-backend", "c10d",
                 "--rdzv-id", "two-node-test", "--rdzv-endpoint", f"127.0.0.1:{port}", *sft],
                cwd=pr.REPO, env=pr.launcher_env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))
    codes = [agent.wait(timeout=pr.TIMEOUT) for agent in agents]
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    # One world of 2 ranks across the two agents: rank 0 (which prints) ran under one of them.
    assert [("== sft: resolved config" in t) for t in texts].count(True) == 1
    final = f"step_{pr.SFT_STEPS:08d}"
    state = json.loads((work / "sft" / "ckpt" / final / "train_state.json").read_text())
    assert (state["world_size"], state["tp"]) == (2, 2)
    pr.assert_same_metrics(work, ref_work, "sft", pr.SFT_STEPS)
    a = read_tensors(work / "sft" / "ckpt" / final / "model_optim")
    b = read_tensors(ref_work / "sft" / "ckpt" / final / "model_optim")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for i, text in enumerate(texts):
        pr.assert_no_abort(text, f"agent {i}")
