"""Issue 21 item 6: a LoRA checkpoint exported as merged HF weights and as a PEFT adapter gives,
loaded by ``transformers`` (+ ``peft``), the logits and log-probs of our model's forward.

Tolerance (fp32): 1e-4 absolute on logits and log-probs. The tiny model has GQA (4 heads, 2
groups) and untied embeddings; SmolLM2-135M (tests/realmodel) has GQA and tied embeddings."""

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_sega import runtime
from megatron_sega.models import preset
from megatron_sega.models.builder import build_model
from megatron_sega.models.lora import LoraSettings
from tests.dist import run_distributed

REPO = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 8.0
TOL = 1e-4


def _convert_cli():
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "tools" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))


def save_lora_checkpoint(out: str, spec, tokens: torch.Tensor, base_dir: str | None = None,
                         base_out: str | None = None) -> torch.Tensor:
    """One gloo rank: a LoRA model on random (or ``base_dir``'s) weights with B drawn from a
    seeded normal so the adapters matter, saved to ``out`` (and, without its adapters, to
    ``base_out``); returns our forward's logits on ``tokens`` (true vocab)."""
    from megatron_sega.checkpoint.mcore import load_model_checkpoint, save_model_checkpoint
    from megatron_sega.convert.layout import load_full_state_dict
    from megatron_sega.models.init import random_full_state_dict

    rt = runtime.setup(1, 1, device="cpu")
    model = build_model(spec, rt, use_te=False, lora=LoraSettings(RANK, ALPHA), lora_seed=1)
    if base_dir is None:
        full = random_full_state_dict(spec, spec.padded_vocab_size(1), seed=3)
        load_full_state_dict(model, full, 1, 0)
    else:
        load_model_checkpoint(model, base_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_b"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_model_checkpoint(model, out)
    if base_out is not None:
        base = build_model(spec, rt, use_te=False)
        load_full_state_dict(base, full, 1, 0)
        save_model_checkpoint(base, base_out)
    model.eval()
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    return logits[..., : spec.vocab_size].float()


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def check_exports(lora_dir: Path, hf_base: Path, out: Path, tokens: torch.Tensor,
                  ours: torch.Tensor) -> dict[str, float]:
    """Export ``lora_dir`` merged and as a PEFT adapter with the CLI; the max |difference| of
    each HF load's logits and log-probs against ``ours``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli = _convert_cli()
    for name, extra in (("merged", []), ("peft", ["--peft-adapter"])):
        rc = cli.main(["mcore-to-hf", "--mcore-dir", str(lora_dir), "--out", str(out / name),
                       "--lora-alpha", str(ALPHA), *extra])
        assert rc == 0, name
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, out / "peft").eval()
    errors = {}
    for name, model in (("merged", merged), ("peft", peft)):
        theirs = _hf_logits(model, tokens)
        errors[f"{name}_logits"] = (theirs - ours).abs().max().item()
        logprobs = theirs.log_softmax(-1) - ours.log_softmax(-1)
        errors[f"{name}_logprobs"] = logprobs.abs().max().item()
    return errors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LoRA checkpoint and its base (one spawn for the module): (root, tokens, ours)."""
    root = tmp_path_factory.mktemp("lora_export")
    tokens = _tokens(300)
    ours = run_distributed(save_lora_checkpoint, 1, str(root / "lora"),
                           preset("tiny", vocab_size=300), tokens, None, str(root / "base"))[0]
    return root, tokens, ours


def test_lora_exports_match_our_forward_on_the_tiny_model(tiny, tmp_path):
    root, tokens, ours = tiny
    cli = _convert_cli()
    assert cli.main(["mcore-to-hf", "--mcore-dir", str(root / "base"),
                     "--out", str(tmp_path / "hf_base")]) == 0
    errors = check_exports(root / "lora", tmp_path / "hf_base", tmp_path, tokens, ours)
    assert max(errors.values()) <= TOL, errors
    # The adapters matter: the base alone is far from our LoRA logits.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base", dtype=torch.float32)
    assert (_hf_logits(base, tokens) - ours).abs().max() > 100 * TOL


def test_peft_adapter_is_exact_per_projection_split(tiny, tmp_path):
    """B_p A of each HF projection equals the fused delta's rows (qkv grouped per query group,
    fc1 [gate; up]), checked on the exported tensors against the merged weights."""
    from safetensors.torch import load_file

    root = tiny[0]
    cli = _convert_cli()
    for name, src, extra in (("merged", "lora", []),  # alpha: as megatron_sega.json records it
                             ("peft", "lora", ["--lora-alpha", str(ALPHA), "--peft-adapter"]),
                             ("hf_base", "base", [])):
        assert cli.main(["mcore-to-hf", "--mcore-dir", str(root / src),
                         "--out", str(tmp_path / name), *extra]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(tmp_path / "hf_base" / "model.safetensors")
    adapter = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    modules = {k.removesuffix(".lora_A.weight") for k in adapter if k.endswith("lora_A.weight")}
    assert len(modules) == 7 * preset("tiny").num_layers
    for module in modules:
        hf_name = module.removeprefix("base_model.model.") + ".weight"
        update = (ALPHA / RANK) * adapter[f"{module}.lora_B.weight"] @ adapter[
            f"{module}.lora_A.weight"]
        assert torch.allclose(base[hf_name] + update, merged[hf_name], atol=1e-6), module


def test_export_flags_that_do_not_fit_are_one_line_exit_2(tiny, tmp_path, capsys):
    import json
    import shutil

    root = tiny[0]
    cli = _convert_cli()
    # A LoRA checkpoint whose megatron_sega.json does not record the adapters (older ones).
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(root / "lora", unrecorded)
    info = json.loads((unrecorded / "megatron_sega.json").read_text())
    del info["lora"]
    (unrecorded / "megatron_sega.json").write_text(json.dumps(info))
    cases = [
        ([str(root / "base"), "--peft-adapter"], "holds no LoRA adapters"),
        ([str(unrecorded)], "pass the run's lora.alpha as --lora-alpha"),
        ([str(unrecorded), "--lora-alpha", "0"], "--lora-alpha 0.0: must be > 0"),
        ([str(root / "lora"), "--lora-alpha", "3"], "records lora.alpha = 8"),
    ]
    for n, (args, message) in enumerate(cases):
        capsys.readouterr()
        rc = cli.main(["mcore-to-hf", "--out", str(tmp_path / f"out{n}"), "--mcore-dir", *args])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"out{n}").exists()


def test_stored_adapters_reads_rank_and_targets(tiny):
    from megatron_sega.convert.lora_export import stored_adapters

    root = tiny[0]
    found = stored_adapters(root / "lora")
    assert found.rank == RANK and found.targets == ("linear_qkv", "linear_proj", "linear_fc1",
                                                    "linear_fc2")
    assert stored_adapters(root / "base") is None


def _full_lora_state(spec, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Random base weights and adapters (B nonzero) in the full layout: the same model at any
    TP once each rank takes its shards."""
    from megatron_sega.convert.layout import full_shapes
    from megatron_sega.models.init import random_full_state_dict

    full = random_full_state_dict(spec, padded_vocab, seed=3)
    g = torch.Generator().manual_seed(11)
    for name, shape in full_shapes(spec, padded_vocab).items():
        if name.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                          "linear_fc2.weight")):
            layer = name.removesuffix(".weight")
            full[f"{layer}.lora_a"] = torch.randn(RANK, shape[1], generator=g) * 0.1
            full[f"{layer}.lora_b"] = torch.randn(shape[0], RANK, generator=g) * 0.05
    return full


def save_at_tp(out: str, tp: int) -> None:
    """``tp`` gloo ranks: the same LoRA model saved at TP=``tp``."""
    import torch.distributed as dist

    from megatron_sega.checkpoint.mcore import save_model_checkpoint
    from megatron_sega.convert.layout import load_full_state_dict

    spec = preset("tiny", vocab_size=300)
    rt = runtime.setup(tp, 1, device="cpu")
    model = build_model(spec, rt, use_te=False, lora=LoraSettings(RANK, ALPHA))
    full = _full_lora_state(spec, spec.padded_vocab_size(tp))
    load_full_state_dict(model, full, tp, dist.get_rank())
    save_model_checkpoint(model, out)


def test_a_tp2_lora_checkpoint_exports_as_the_tp1_one(tmp_path):
    """The checkpoint stores global tensors; fc1's B keeps its [gate; up] rows across TP (it is
    stored through Megatron's swiglu factory, as the weight; a plain axis-0 shard would hold
    [gate_0; up_0; gate_1; up_1] at TP=2)."""
    from safetensors.torch import load_file

    run_distributed(save_at_tp, 1, str(tmp_path / "tp1"), 1)
    run_distributed(save_at_tp, 2, str(tmp_path / "tp2"), 2)
    cli = _convert_cli()
    for tp in (1, 2):
        for name, extra in (("merged", []), ("peft", ["--peft-adapter"])):
            assert cli.main(["mcore-to-hf", "--mcore-dir", str(tmp_path / f"tp{tp}"), "--out",
                             str(tmp_path / f"{name}{tp}"), "--lora-alpha", str(ALPHA),
                             *extra]) == 0
    for file in ("merged{}/model.safetensors", "peft{}/adapter_model.safetensors"):
        one, two = (load_file(tmp_path / file.format(tp)) for tp in (1, 2))
        assert one.keys() == two.keys()
        unequal = sorted(k for k in one if not torch.equal(one[k], two[k]))
        assert not unequal, unequal[:4]
