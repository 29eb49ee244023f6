"""The public preference datasets' layouts, written by Hugging Face ``datasets`` as they ship
(``DatasetDict.save_to_disk`` with the real split names, hub-style Parquet, JSONL), read into
the same pairs; implicit and conversational prompts checked against TRL's own extraction; the
options (``data.format``, ``data.columns``, ``data.preference``, splits) and every bad-record
kind of the new layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sega.config import load_config
from megatron_sega.data import DataError, Message, ReadOptions, detect_formats, read_pairs
from megatron_sega.training.session import read_options

datasets = pytest.importorskip("datasets")
trl_data = pytest.importorskip("trl.data_utils")


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _user(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)


# allenai/reward-bench (split "filtered"): strings, an int id and a subset.
REWARDBENCH = {"filtered": [
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Green.",
     "subset": "alpacaeval-easy", "id": 30},
    {"prompt": "Write hello in C++.", "chosen": "std::cout << \"hello\";", "rejected": "print(1)",
     "subset": "hep-cpp", "id": 4012},
]}
# TRL conversational with an explicit prompt: message lists, one-message responses.
CONVERSATIONAL = {"train": [
    {"prompt": [_m("system", "Be brief."), _m("user", "Sky colour?")],
     "chosen": [_m("assistant", "Blue.")], "rejected": [_m("assistant", "Green.")]},
    {"prompt": [_m("user", "2+2?"), _m("assistant", "4."), _m("user", "Times 3?")],
     "chosen": [_m("assistant", "12.")], "rejected": [_m("assistant", "7.")]},
]}
# Skywork-Reward-Preference-80K: whole conversations, the prompt is their common prefix.
SKYWORK = {"train": [
    {"chosen": [_m("user", "Sky colour?"), _m("assistant", "Blue.")],
     "rejected": [_m("user", "Sky colour?"), _m("assistant", "Green.")]},
    {"chosen": [_m("user", "2+2?"), _m("assistant", "4."), _m("user", "Times 3?"),
                _m("assistant", "12.")],
     "rejected": [_m("user", "2+2?"), _m("assistant", "4."), _m("user", "Times 3?"),
                  _m("assistant", "7.")]},
]}
# HuggingFaceH4/ultrafeedback_binarized: a string prompt next to conversations repeating it.
ULTRAFEEDBACK = {
    split: [{"prompt": q, "prompt_id": f"{split}-{i}",
             "chosen": [_m("user", q), _m("assistant", good)],
             "rejected": [_m("user", q), _m("assistant", bad)],
             "score_chosen": 8.0, "score_rejected": 3.0}
            for i, (q, good, bad) in enumerate(rows)]
    for split, rows in (("train_prefs", [("Sky colour?", "Blue.", "Green."),
                                         ("2+2?", "4.", "5.")]),
                        ("test_prefs", [("Capital of France?", "Paris.", "Rome.")]))
}
# Anthropic/hh-rlhf: transcripts.
HH = {"train": [
    {"chosen": "\n\nHuman: Sky colour?\n\nAssistant: Blue.",
     "rejected": "\n\nHuman: Sky colour?\n\nAssistant: Green."},
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: Times 3?\n\nAssistant: 12.",
     "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: Times 3?\n\nAssistant: Seven."},
]}
# PKU-Alignment/PKU-SafeRLHF: two responses and the ids of the better and the safer one.
PKU = {"train": [
    {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench and a pick.",
     "response_1": "I can't help with that.", "is_response_0_safe": False,
     "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1},
    {"prompt": "Sky colour?", "response_0": "Green.", "response_1": "Blue.",
     "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1,
     "safer_response_id": 1},
]}

TWO_TURN = (Message("user", "2+2?"), Message("assistant", "4."), Message("user", "Times 3?"))
# (format, the dataset's splits, the split read, [(prompt, chosen, rejected, subset), ...])
SCHEMAS = {
    "rewardbench": ("standard", REWARDBENCH, "filtered", [
        ("Name a primary colour.", "Red.", "Green.", "alpacaeval-easy"),
        ("Write hello in C++.", "std::cout << \"hello\";", "print(1)", "hep-cpp")]),
    "conversational": ("conversational", CONVERSATIONAL, "train", [
        ((Message("system", "Be brief."), Message("user", "Sky colour?")), "Blue.", "Green.", None),
        (TWO_TURN, "12.", "7.", None)]),
    "skywork": ("implicit", SKYWORK, "train", [
        (_user("Sky colour?"), "Blue.", "Green.", None), (TWO_TURN, "12.", "7.", None)]),
    "ultrafeedback": ("implicit", ULTRAFEEDBACK, "test_prefs", [
        (_user("Capital of France?"), "Paris.", "Rome.", None)]),
    "hh": ("hh", HH, "train", [
        (_user("Sky colour?"), "Blue.", "Green.", None), (TWO_TURN, "12.", "Seven.", None)]),
    "pku": ("pku", PKU, "train", [
        ("How do I pick a lock?", "Use a tension wrench and a pick.", "I can't help with that.", None),
        ("Sky colour?", "Blue.", "Green.", None)]),
}


def write_layouts(root: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """The dataset in the three layouts, written by ``datasets``: a DatasetDict directory, a
    hub-style folder ``data/<split>-00000-of-00001.parquet``, one ``<split>.jsonl`` per split
    (in a folder, as a hub JSONL repository)."""
    dd = datasets.DatasetDict({name: datasets.Dataset.from_list(rows)
                               for name, rows in splits.items()})
    dd.save_to_disk(str(root / "saved"))
    for name, ds in dd.items():
        (root / "hub" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "hub" / "data" / f"{name}-00000-of-00001.parquet"))
        (root / "jsonl").mkdir(exist_ok=True)
        ds.to_json(str(root / "jsonl" / f"{name}.jsonl"))
    return {"saved": root / "saved", "hub": root / "hub", "jsonl": root / "jsonl"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("public")
    return {name: write_layouts(root / name, splits)
            for name, (_, splits, _, _) in SCHEMAS.items()}


@pytest.mark.parametrize("layout", ["saved", "hub", "jsonl"])
@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_each_public_layout_reads_the_same_pairs(layouts, schema: str, layout: str) -> None:
    fmt, _, split, expected = SCHEMAS[schema]
    path = layouts[schema][layout]
    pairs, report = read_pairs(path, split=split)
    assert [(p.prompt, p.chosen, p.rejected, p.subset) for p in pairs] == expected
    assert set(report.formats.values()) == {fmt} and len(report.formats) == 1
    assert split in next(iter(report.formats))  # the split's file, and only it
    if schema == "rewardbench":
        assert [p.id for p in pairs] == ["30", "4012"]


def test_the_format_line_names_the_detected_format(layouts) -> None:
    path = layouts["ultrafeedback"]["hub"]
    line = detect_formats(path, "train_prefs")
    assert "\n" not in line
    assert line == (f"implicit (chosen/rejected conversations, prompt = their common prefix): "
                    f"{path / 'data' / 'train_prefs-00000-of-00001.parquet'}")


def _trl_reference(row: dict) -> tuple:
    """What TRL's own utilities make of a record: (prompt messages, chosen, rejected)."""
    out = trl_data.maybe_extract_prompt(dict(row))
    replies = []
    for name in ("chosen", "rejected"):
        (reply,) = out[name]  # TRL leaves exactly the final assistant turn
        assert reply["role"] == "assistant"
        replies.append(reply["content"])
    prompt = tuple(Message(m["role"], m["content"]) for m in out["prompt"])
    return (prompt, *replies)


@pytest.mark.parametrize("schema", ["conversational", "skywork", "ultrafeedback"])
def test_implicit_and_conversational_prompts_match_trl(layouts, schema: str) -> None:
    _, splits, split, _ = SCHEMAS[schema]
    for layout in ("saved", "jsonl"):
        pairs, _ = read_pairs(layouts[schema][layout], split=split)
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == \
            [_trl_reference(row) for row in splits[split]]


def test_hh_transcripts_agree_with_trl_string_extraction(tmp_path: Path) -> None:
    """TRL cuts a transcript at the common character prefix (less the space before the
    responses): that prefix is our prompt's transcript up to the last 'Assistant:'."""
    pairs, _ = read_pairs(write_layouts(tmp_path, HH)["jsonl"])
    for pair, row in zip(pairs, HH["train"]):
        ref = trl_data.extract_prompt(dict(row))
        turns = "".join(f"\n\n{'Human' if m.role == 'user' else 'Assistant'}: {m.content}"
                        for m in pair.prompt)
        assert ref["prompt"] == turns + "\n\nAssistant:"
        assert (ref["chosen"], ref["rejected"]) == (" " + pair.chosen, " " + pair.rejected)


def test_pku_preference_picks_the_id(layouts) -> None:
    path = layouts["pku"]["hub"]
    better, _ = read_pairs(path, split="train")
    safer, _ = read_pairs(path, split="train", options=ReadOptions(preference="safer"))
    assert better[0].chosen == "Use a tension wrench and a pick."
    assert safer[0].chosen == "I can't help with that."
    assert safer[0].rejected == "Use a tension wrench and a pick."


def test_columns_format_and_splits_from_the_config(tmp_path: Path) -> None:
    rows = [{"question": "Sky colour?", "good": "Blue.", "bad": "Green.", "category": "chat"}]
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(overrides=["data.columns.prompt=question", "data.columns.chosen=good",
                                    "data.columns.rejected=bad", "data.format=standard",
                                    "data.train_split=train_prefs", "data.eval_split=test_prefs"])
    assert (config.data.train_split, config.data.eval_split) == ("train_prefs", "test_prefs")
    (pair,), report = read_pairs(path, options=read_options(config.data))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Sky colour?", "Blue.", "Green.")
    assert report.formats == {str(path): "standard"}
    with pytest.raises(DataError, match="field 'prompt' is missing"):
        read_pairs(path)  # without the renaming
    from megatron_sega.errors import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'data.columns.prompt'"):
        load_config(overrides=["data.columns.promt=question"])
    with pytest.raises(ConfigError, match="data.format = 'sharegpt' is not one of"):
        load_config(overrides=["data.format=sharegpt"])


def test_format_forces_the_reader(tmp_path: Path) -> None:
    """A file whose first record looks standard, forced to hh, is read (and fails) as hh."""
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "Human: hi\n\nAssistant: a",
                                "rejected": "Human: hi\n\nAssistant: b"}) + "\n")
    assert read_pairs(path)[0][0].chosen.startswith("Human:")  # auto: standard
    (pair,), report = read_pairs(path, options=ReadOptions(format="hh"))
    assert (pair.prompt, pair.chosen, report.formats[str(path)]) == (_user("hi"), "a", "hh")
    with pytest.raises(DataError, match=r"x.jsonl:1: field 'chosen' must be a list of"):
        read_pairs(path, options=ReadOptions(format="implicit"))


def test_dataset_dict_needs_an_existing_split(layouts) -> None:
    with pytest.raises(DataError, match=r"split 'train' not found; available splits: "
                                        r"\['train_prefs', 'test_prefs'\]"):
        read_pairs(layouts["ultrafeedback"]["saved"])


# --------------------------------------------------------------------------------------------
# Bad records of the new layouts
# --------------------------------------------------------------------------------------------

BAD = {
    "prompt_not_ending_with_user": (
        {"prompt": [_m("user", "q"), _m("assistant", "a")], "chosen": "x", "rejected": "y"},
        "field 'prompt' ends with a 'assistant' turn; a prompt must end with the user's turn"),
    "unknown_role": (
        {"prompt": [_m("human", "q")], "chosen": "x", "rejected": "y"},
        "field 'prompt[0].role' is 'human'; roles must be one of system, user, assistant"),
    "no_common_prefix": (
        {"chosen": [_m("user", "q1"), _m("assistant", "a")],
         "rejected": [_m("user", "q2"), _m("assistant", "b")]},
        "field 'chosen' and field 'rejected' share no first turn"),
    "bad_response_id": (
        {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 2},
        "field 'better_response_id' is 2; it must be 0 or 1"),
    "no_assistant_turn": (
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q only"},
        "field 'rejected' has no final Assistant turn"),
}
GOOD_OF = {  # a good first record that makes each file detect the layout of its bad one
    "prompt_not_ending_with_user": {"prompt": [_m("user", "q")], "chosen": "x", "rejected": "y"},
    "unknown_role": {"prompt": [_m("user", "q")], "chosen": "x", "rejected": "y"},
    "no_common_prefix": SKYWORK["train"][0],
    "bad_response_id": PKU["train"][0],
    "no_assistant_turn": HH["train"][0],
}


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_record_names_file_row_and_field(tmp_path: Path, reason: str) -> None:
    record, message = BAD[reason]
    path = tmp_path / f"{reason}.jsonl"
    path.write_text(json.dumps(GOOD_OF[reason]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        read_pairs(path)
    assert str(info.value).startswith(f"{path}:2: {message}")
    assert info.value.reason == reason


def test_skip_counts_each_reason(tmp_path: Path) -> None:
    paths = []
    for reason, (record, _) in BAD.items():
        path = tmp_path / f"{reason}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in (GOOD_OF[reason], record, record)))
        paths.append(path)
    pairs, report = read_pairs(paths, on_bad_record="skip")
    assert len(pairs) == len(BAD)
    assert report.dropped == {reason: 2 for reason in BAD}
    assert report.summary().endswith(
        "dropped 10 (bad_response_id: 2, no_assistant_turn: 2, no_common_prefix: 2, "
        "prompt_not_ending_with_user: 2, unknown_role: 2)")


def test_bad_row_of_a_table_names_its_row(tmp_path: Path) -> None:
    rows = [PKU["train"][1], {**PKU["train"][1], "better_response_id": -1}]
    path = tmp_path / "train-00000-of-00001.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"^{path}:row 2: field 'better_response_id' is -1"):
        read_pairs(path)
    with pytest.raises(DataError, match=r"column\(s\) \['safer_response_id'\] missing for format pku"):
        datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "safer_response_id"}
                                    for r in rows]).to_parquet(str(path))
        read_pairs(path, options=ReadOptions(preference="safer"))


def test_hh_rlhf_as_it_ships_gzipped_jsonl_per_subset(tmp_path: Path) -> None:
    """Anthropic/hh-rlhf's repository: ``<subset>/{train,test}.jsonl.gz``."""
    import gzip

    for subset in ("harmless-base", "helpful-base"):
        for split, rows in (("train", HH["train"]), ("test", HH["train"][:1])):
            (tmp_path / subset).mkdir(exist_ok=True)
            with gzip.open(tmp_path / subset / f"{split}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    pairs, report = read_pairs(tmp_path, split="train")
    assert [p.chosen for p in pairs] == ["Blue.", "12."] * 2
    assert sorted(report.formats) == [str(tmp_path / s / "train.jsonl.gz")
                                      for s in ("harmless-base", "helpful-base")]
    assert set(report.formats.values()) == {"hh"}


def test_the_config_offers_exactly_the_readers_formats() -> None:
    import typing

    from megatron_sega.config import DataConfig
    from megatron_sega.data import FORMATS

    assert typing.get_args(typing.get_type_hints(DataConfig)["format"]) == FORMATS
