"""HF <-> Megatron conversion end to end: logit parity with transformers at TP/PP 1/1, 2/1, 1/2,
2/2 and TP/PP/VPP 2/2/2 (two model chunks per stage); resharding (a checkpoint saved by
TP=2/PP=2/VPP=2 model chunks loads at TP=1/PP=1 and at PP=2 without VPP); and the round trip
HF -> torch_dist -> TP=2/PP=2/VPP=2 model -> torch_dist -> HF, bit-exact.

Reference: transformers ``LlamaForCausalLM`` (fp32, eager attention) on the same tokens. The
vocab-parallel logits are gathered over TP here, in the test only, and cut to the true vocab.

Four spawns: convert + TP1/PP1 (1 process) -> TP2/PP2, TP2/PP2/VPP2 + re-save (4) -> TP2/PP1,
TP1/PP2, the re-saved one at TP1/PP2 (2) -> export the re-saved checkpoint + load it at TP1/PP1 (1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

BATCH, SEQ = 2, 24
TOL = 1e-4
# (a) GQA; (b) Llama 3.1 rope scaling with a short original context, so that it matters at
# SEQ tokens, and an explicit head_dim != hidden/heads; (c) tied embeddings, vocab 1000.
CONFIGS = {
    "gqa": dict(vocab_size=500, num_key_value_heads=2),
    "llama31": dict(vocab_size=512, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 16}),
    "tied": dict(vocab_size=1000, num_key_value_heads=2, tie_word_embeddings=True),
}
TINY_TOKENIZER = Path(__file__).parents[2] / "megatron_sega/data/assets/tiny_tokenizer"


def _hf_config(name: str):
    from transformers import LlamaConfig

    base = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                initializer_range=0.08,  # logits of O(1): parity at 1e-4 is a real test
                attn_implementation="eager")
    return LlamaConfig(**{**base, **CONFIGS[name]})


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _hf_model(name: str, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_hf_config(name)).float().eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Three HF checkpoints on disk and their reference logits."""
    root = tmp_path_factory.mktemp("convert")
    refs = {}
    for name in CONFIGS:
        model = _hf_model(name)
        # the GQA model is saved in several shards with an index; the others in one file
        shard = "200KB" if name == "gqa" else "5GB"
        model.save_pretrained(root / name / "hf", max_shard_size=shard)
        with torch.no_grad():
            refs[name] = model(_tokens(model.config.vocab_size)).logits.float()
    for file in TINY_TOKENIZER.iterdir():
        (root / "gqa" / "hf" / file.name).write_bytes(file.read_bytes())
    return root, refs


def _logits(spec, rt, ckpt_dir: str) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last stage's TP rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from megatron_sega.checkpoint.mcore import load_model_checkpoint
    from megatron_sega.models.builder import build_model_chunks
    from megatron_sega.training.engine import forward_backward

    chunks = build_model_chunks(spec, rt)
    load_model_checkpoint(chunks, ckpt_dir)
    for chunk in chunks:
        chunk.eval()
    stash = []

    def loss_fn(logits, microbatch):
        shards = [torch.empty_like(logits) for _ in range(rt.tp)]
        dist.all_gather(shards, logits.contiguous(), group=rt.tp_group)
        stash.append(torch.cat(shards, dim=-1)[..., : spec.vocab_size].detach().clone())
        return logits.sum() * 0.0, {}

    with torch.no_grad():
        forward_backward(chunks, rt, [{"tokens": _tokens(spec.vocab_size)}], loss_fn,
                         forward_only=True)
    return stash[0] if stash and rt.tp_rank == 0 else None


def _layouts(root: str, layouts: list, source: str = "mcore") -> dict:
    """Logits of every model at every (tp, pp[, vpp]) in ``layouts``, keyed 'name@tp,pp[,vpp]'
    (prefixed 'source:' unless the source is the converted checkpoint)."""
    from megatron_sega import runtime
    from megatron_sega.checkpoint.mcore import read_info

    out = {}
    for layout in layouts:
        rt = runtime.setup(*layout[:2], vpp=layout[2] if len(layout) > 2 else None)
        for name in CONFIGS:
            ckpt = f"{root}/{name}/{source}"
            logits = _logits(read_info(ckpt).spec, rt, ckpt)
            if logits is not None:
                prefix = "" if source == "mcore" else f"{source}:"
                out[f"{prefix}{name}@{','.join(map(str, layout))}"] = logits
    return out


def _convert_and_run_tp1pp1(root: str) -> dict:
    from megatron_sega.convert.hf_mcore import hf_to_mcore

    for name in CONFIGS:
        hf_to_mcore(f"{root}/{name}/hf", f"{root}/{name}/mcore", tp=2, pp=2)
    return _layouts(root, [(1, 1)])


def _run_tp2pp2_and_resave(root: str) -> dict:
    """Logits at TP2/PP2 and TP2/PP2/VPP2; the VPP model chunks re-save the checkpoint."""
    from megatron_sega import runtime
    from megatron_sega.checkpoint.mcore import load_model_checkpoint, save_model_checkpoint
    from megatron_sega.models.builder import build_model_chunks
    from megatron_sega.checkpoint.mcore import read_info

    out = _layouts(root, [(2, 2), (2, 2, 2)])
    rt = runtime.setup(2, 2, vpp=2)
    for name in CONFIGS:
        info = read_info(f"{root}/{name}/mcore")
        chunks = build_model_chunks(info.spec, rt)
        load_model_checkpoint(chunks, f"{root}/{name}/mcore")
        save_model_checkpoint(chunks, f"{root}/{name}/resaved", tokenizer_files=info.tokenizer_files)
    return out


def _two_process_layouts(root: str) -> dict:
    return {**_layouts(root, [(2, 1), (1, 2)]), **_layouts(root, [(1, 2)], source="resaved")}


def _export_resaved_and_run_tp1pp1(root: str) -> dict:
    from megatron_sega.convert.hf_mcore import mcore_to_hf

    out = _layouts(root, [(1, 1)], source="resaved")
    for name in CONFIGS:
        mcore_to_hf(f"{root}/{name}/mcore", f"{root}/{name}/hf_direct", max_shard_bytes=150_000)
        mcore_to_hf(f"{root}/{name}/resaved", f"{root}/{name}/hf_back")
    # The CLI, with a bf16 round trip (last: the CLI tears the process group down).
    cli = _load_cli()
    assert cli.main(["hf-to-mcore", "--hf-dir", f"{root}/gqa/hf", "--out",
                     f"{root}/gqa/mcore_bf16", "--tp", "2", "--pp", "2", "--dtype", "bf16"]) == 0
    assert cli.main(["mcore-to-hf", "--mcore-dir", f"{root}/gqa/mcore_bf16", "--out",
                     f"{root}/gqa/hf_bf16"]) == 0
    return out


def _load_cli():
    import importlib.util

    path = Path(__file__).parents[2] / "tools" / "convert.py"
    spec = importlib.util.spec_from_file_location("convert_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _merge(results: list[dict]) -> dict:
    merged = {}
    for result in results:
        merged.update(result)
    return merged


def _read_hf(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_conversion_end_to_end(hf_models):
    from megatron_sega.models.spec import from_hf_config

    root, refs = hf_models
    logits = _merge(run_distributed(_convert_and_run_tp1pp1, 1, str(root)))
    logits.update(_merge(run_distributed(_run_tp2pp2_and_resave, 4, str(root))))
    logits.update(_merge(run_distributed(_two_process_layouts, 2, str(root))))
    resaved = _merge(run_distributed(_export_resaved_and_run_tp1pp1, 1, str(root)))

    # Logit parity with transformers at every layout.
    for name, ref in refs.items():
        for layout in ("1,1", "2,1", "1,2", "2,2", "2,2,2"):
            got = logits[f"{name}@{layout}"]
            assert got.shape == ref.shape, (name, layout)
            err = (got - ref).abs().max().item()
            assert err <= TOL, f"{name} at tp,pp={layout}: max abs logit diff {err:.3g}"
        # A checkpoint written by TP=2/PP=2/VPP=2 ranks loads at TP=1/PP=1 and at PP=2 without
        # VPP with the same logits.
        for layout, got in (("1,1", resaved["resaved:" + name + "@1,1"]),
                            ("1,2", logits["resaved:" + name + "@1,2"])):
            err = (got - logits[f"{name}@{layout}"]).abs().max().item()
            assert err <= 1e-5, f"{name}: re-saved VPP checkpoint at tp,pp={layout}: {err:.3g}"

    # Round trip HF -> Megatron (TP2/PP2/VPP2 chunks) -> HF: every tensor bit-exact, same config.
    for name in CONFIGS:
        original = _read_hf(root / name / "hf")
        for exported in ("hf_back", "hf_direct"):
            back = _read_hf(root / name / exported)
            assert back.keys() == original.keys(), (name, exported, set(back) ^ set(original))
            for key, tensor in original.items():
                assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), \
                    (name, exported, key)
            assert from_hf_config(root / name / exported) == from_hf_config(root / name / "hf")
    # bf16 through the CLI: the weights are the original ones rounded to bf16, config says so.
    bf16 = _read_hf(root / "gqa" / "hf_bf16")
    assert all(torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in _read_hf(
        root / "gqa" / "hf").items())
    assert json.loads((root / "gqa" / "hf_bf16" / "config.json").read_text())["torch_dtype"] \
        == "bfloat16"
    # Sharded export writes an index that covers every tensor; tokenizer files travel along.
    index = json.loads((root / "gqa" / "hf_direct" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_read_hf(root / "gqa" / "hf"))
    for file in TINY_TOKENIZER.iterdir():
        assert (root / "gqa" / "hf_direct" / file.name).read_bytes() == file.read_bytes()


def test_rope_scaling_config_is_not_vacuous():
    """Removing the Llama 3.1 scaling changes the reference logits at SEQ tokens, so parity for
    the 'llama31' config checks the scaled frequencies."""
    from transformers import LlamaForCausalLM

    scaled = _hf_model("llama31")
    config = _hf_config("llama31")
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = LlamaForCausalLM(config).float().eval()
    plain.load_state_dict(scaled.state_dict())
    tokens = _tokens(config.vocab_size)
    with torch.no_grad():
        diff = (scaled(tokens).logits - plain(tokens).logits).abs().max().item()
    assert diff > 100 * TOL
