"""Multi-turn prompts through the chat template: a one-turn conversation is the flat string
token for token, the reflective system prompt goes first in a conversation's own system turn,
template ``none`` refuses conversations, and only the final assistant turn is a response."""

from __future__ import annotations

import pytest

from megatron_sega.data import (
    REFLECTIVE_SYSTEM_PROMPT, TINY_TOKENIZER_DIR, DataError, Message, PreferencePair,
    PromptFormatter, Tokenizer, collate, tokenize_pairs, tokenize_prompts, tokenize_sft,
)

TWO_TURN = (Message("system", "Be brief."), Message("user", "What is 2+2?"),
            Message("assistant", "4."), Message("user", "Times 3?"))


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_path(TINY_TOKENIZER_DIR)


def _pair(prompt, subset=None) -> PreferencePair:
    return PreferencePair("a", prompt, "12. Final Answer: 12", "Final Answer: 7", "f.jsonl:3",
                          subset)


@pytest.mark.parametrize("template", ["chat", "none"])
def test_one_turn_conversation_is_the_flat_string(tiny: Tokenizer, template: str) -> None:
    fmt = PromptFormatter(tiny, template)
    flat, conv = _pair(" What is 2+2? "), _pair((Message("user", " What is 2+2? "),))
    assert tokenize_sft([flat], fmt) == tokenize_sft([conv], fmt)
    assert tokenize_pairs([flat], fmt) == tokenize_pairs([conv], fmt)
    assert tokenize_prompts([flat], fmt) == tokenize_prompts([conv], fmt)


def _hf_ids(messages: list[dict]) -> list[int]:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_conversation_matches_transformers_with_the_system_prompt_first(tiny: Tokenizer) -> None:
    """The reflective prompt and the conversation's own system text share one system turn,
    the reflective one first; earlier turns are rendered as the template renders them."""
    merged = [{"role": "system", "content": f"{REFLECTIVE_SYSTEM_PROMPT}\n\nBe brief."},
              *({"role": m.role, "content": m.content} for m in TWO_TURN[1:])]
    assert PromptFormatter(tiny, "chat").encode_prompt(TWO_TURN) == _hf_ids(merged)
    own_only = [{"role": m.role, "content": m.content} for m in TWO_TURN]
    assert PromptFormatter(tiny, "chat", system_prompt=None).encode_prompt(TWO_TURN) == \
        _hf_ids(own_only)
    no_system = TWO_TURN[1:]
    assert PromptFormatter(tiny, "chat").encode_prompt(no_system) == _hf_ids(
        [{"role": "system", "content": REFLECTIVE_SYSTEM_PROMPT},
         *({"role": m.role, "content": m.content} for m in no_system)])


def test_only_the_final_assistant_turn_is_a_target(tiny: Tokenizer) -> None:
    fmt = PromptFormatter(tiny, "chat")
    (example,) = tokenize_sft([_pair(TWO_TURN)], fmt)
    assert example.prompt_ids == fmt.encode_prompt(TWO_TURN)  # holds the earlier "4." turn
    assert example.response_ids == fmt.encode_response("12. Final Answer: 12", append_eos=True)
    batch = collate([example], tiny.pad_id)
    targets = batch.labels[0][batch.loss_mask[0].bool()].tolist()
    assert targets == example.response_ids


def test_template_none_refuses_a_conversation(tiny: Tokenizer) -> None:
    fmt = PromptFormatter(tiny, "none")
    with pytest.raises(DataError, match=r"^f.jsonl:3: field 'prompt' is a conversation of 4 "
                                        r"turns \(system, user, assistant, user\), which "
                                        r"data.template=none cannot render; use data.template=chat"):
        tokenize_sft([_pair(TWO_TURN)], fmt)
    with pytest.raises(DataError, match="conversation of 2 turns"):
        tokenize_prompts([_pair((Message("system", "s"), Message("user", "q")))], fmt)


def test_subset_travels_to_the_tokenized_pair(tiny: Tokenizer) -> None:
    (pair,) = tokenize_pairs([_pair("q", subset="hep-cpp")], PromptFormatter(tiny, "chat"))
    assert pair.subset == "hep-cpp"
