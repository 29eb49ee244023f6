"""The HF <-> Megatron mapping library, the streaming safetensors writer and the converter's input
checks (single process; nothing here initialises torch.distributed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_sega.checkpoint.mcore import CheckpointInfo, check_compatible
from megatron_sega.convert import hf
from megatron_sega.convert.hf_io import HFCheckpoint, ShardedSafetensorsWriter
from megatron_sega.errors import CheckpointError, ConversionError
from megatron_sega.models.spec import LlamaSpec, ModelConfigError, to_hf_config

REPO = Path(__file__).parents[2]
SPEC = LlamaSpec(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                 num_query_groups=2, vocab_size=100, max_position_embeddings=64, head_dim=8)


def _random_hf(spec: LlamaSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in hf.hf_shapes(spec).items()}


def test_round_trip_is_bit_exact_and_layouts_are_megatrons():
    tensors = _random_hf(SPEC)
    full = hf.hf_to_megatron_state_dict(tensors, SPEC, padded_vocab=128)
    assert set(full) == set(hf.megatron_names(SPEC))
    back = hf.megatron_to_hf_state_dict(full, SPEC)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)

    # vocab padded with zero rows, truncated on export
    emb = full["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 32) and not emb[100:].any()
    # qkv: per query group g, rows [q heads 2g, 2g+1 ; k_g ; v_g], 8 rows per head
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"]
    q, k, v = (tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    for g in range(2):
        block = qkv[g * 32:(g + 1) * 32]
        assert torch.equal(block[:16], q[g * 16:(g + 1) * 16])
        assert torch.equal(block[16:24], k[g * 8:(g + 1) * 8])
        assert torch.equal(block[24:], v[g * 8:(g + 1) * 8])
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:48], tensors["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[48:], tensors["model.layers.0.mlp.up_proj.weight"])


def test_tied_embeddings_have_no_head():
    spec = SPEC.replace(tie_word_embeddings=True)
    assert "lm_head.weight" not in hf.hf_shapes(spec)
    assert "output_layer.weight" not in hf.megatron_names(spec)
    with pytest.raises(ConversionError, match="'lm_head.weight'.*tie_word_embeddings"):
        hf.check_hf_tensors(hf.hf_shapes(SPEC), spec)


def test_name_and_shape_errors_name_the_tensor():
    shapes = dict(hf.hf_shapes(SPEC))
    shapes["model.layers.0.self_attn.rotary_emb.inv_freq"] = (4,)  # derived buffer: ignored
    hf.check_hf_tensors(shapes, SPEC)

    with pytest.raises(ConversionError, match="unexpected.*'model.layers.2.mlp.up_proj.weight'"):
        hf.check_hf_tensors({**shapes, "model.layers.2.mlp.up_proj.weight": (48, 32)}, SPEC)
    missing = {k: v for k, v in shapes.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ConversionError, match="missing.*'model.layers.1.mlp.down_proj.weight'"):
        hf.check_hf_tensors(missing, SPEC)
    with pytest.raises(ConversionError, match=r"'model.norm.weight' has shape \(31,\), "
                                              r"expected \(32,\)"):
        hf.check_hf_tensors({**shapes, "model.norm.weight": (31,)}, SPEC)
    with pytest.raises(ConversionError, match="unknown Megatron tensor 'decoder.layers.0.foo'"):
        hf.hf_sources("decoder.layers.0.foo")
    tensors = _random_hf(SPEC)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(ConversionError, match=r"k_proj.weight' has shape \(8, 32\), expected "
                                              r"\(16, 32\)"):
        hf.to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", tensors, SPEC, 128)
    with pytest.raises(ConversionError, match="unexpected Megatron tensor.*'extra'"):
        hf.megatron_to_hf_state_dict({"extra": torch.zeros(1)}, SPEC)


def test_sharded_writer_streams_valid_safetensors(tmp_path):
    tensors = {"a": torch.randn(10, 4), "b": torch.randn(3).to(torch.bfloat16),
               "c": torch.randn(50, 4)}
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path / "sharded", entries, max_shard_bytes=200)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == 160 + 6 + 800
    loaded = {}
    for file in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(tmp_path / "sharded" / file))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    single = ShardedSafetensorsWriter(tmp_path / "single", entries)
    with pytest.raises(ConversionError, match="'b' written out of order; expected 'a'"):
        single.write("b", tensors["b"])
    single.write("a", tensors["a"])
    with pytest.raises(ConversionError, match="not written: \\['b', 'c'\\]"):
        single.close()


def _write_hf_dir(directory: Path, spec: LlamaSpec, tensors: dict, config: dict | None = None):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config or to_hf_config(spec, "float32")))
    save_file(tensors, directory / "model.safetensors")
    return directory


def test_converter_rejects_bad_inputs_before_writing(tmp_path):
    from megatron_sega.convert.hf_mcore import hf_to_mcore, mcore_to_hf

    good = _random_hf(SPEC)
    cases = {
        "unknown": ({**good, "model.layers.0.mlp.extra.weight": torch.zeros(2)},
                    "unexpected tensor.*'model.layers.0.mlp.extra.weight'"),
        "missing": ({k: v for k, v in good.items() if k != "lm_head.weight"},
                    "missing tensor.*'lm_head.weight'"),
        "shape": ({**good, "model.layers.1.self_attn.o_proj.weight": torch.zeros(32, 16)},
                  r"'model.layers.1.self_attn.o_proj.weight' has shape \(32, 16\), "
                  r"expected \(32, 32\)"),
    }
    for name, (tensors, message) in cases.items():
        source = _write_hf_dir(tmp_path / name, SPEC, tensors)
        with pytest.raises(ConversionError, match=message):
            hf_to_mcore(source, tmp_path / f"{name}_out")
        assert not (tmp_path / f"{name}_out").exists()

    good_dir = _write_hf_dir(tmp_path / "good", SPEC, good)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConversionError, match="taken: output directory exists and is not empty"):
        hf_to_mcore(good_dir, tmp_path / "taken")

    gpt2 = _write_hf_dir(tmp_path / "gpt2", SPEC, good, {"model_type": "gpt2"})
    with pytest.raises(ModelConfigError, match="not a Llama model"):
        hf_to_mcore(gpt2, tmp_path / "gpt2_out")
    with pytest.raises(ValueError, match=r"num_query_groups\(2\).*not divisible by tp\(4\)"):
        hf_to_mcore(tmp_path / "unknown", tmp_path / "x", tp=4)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(to_hf_config(SPEC)))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="not loaded"):
        HFCheckpoint(pickled)
    with pytest.raises(CheckpointError, match="not a megatron-sega checkpoint"):
        mcore_to_hf(pickled, tmp_path / "y")


def test_checkpoint_compatibility_errors_name_fields():
    info = CheckpointInfo(spec=SPEC, padded_vocab_size=128, dtype="float32")
    check_compatible(info, SPEC.replace(eos_token_id=[2, 3]), 128)  # non-architectural
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 32 != model 64"):
        check_compatible(info, SPEC.replace(hidden_size=64), 128)
    with pytest.raises(CheckpointError, match="padded vocab 128 in the checkpoint != 384"):
        check_compatible(info, SPEC, 384)


def test_cli_reports_one_line_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert.py"), "hf-to-mcore", "--hf-dir",
         str(tmp_path), "--out", str(tmp_path / "out"), "--tp", "2", "--pp", "2"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a Llama model" in errors[0]
