"""The record layouts of the public preference datasets, turned into one ``(prompt, chosen,
rejected)`` triple.

Formats (``data.format``; ``auto`` detects one per file from its first record):

``standard``
    ``prompt``, ``chosen``, ``rejected`` strings (TRL's standard format with an explicit prompt;
    RewardBench).
``conversational``
    ``prompt`` a message list ``[{role, content}, ...]`` ending with the user's turn, ``chosen``
    and ``rejected`` one assistant message (a one-element list) or a string (TRL's
    conversational format with an explicit prompt). A string ``prompt`` with one-message
    responses is read as a single user turn.
``implicit``
    ``chosen`` and ``rejected`` whole conversations sharing their first turns (TRL's implicit
    prompt; Skywork-Reward-Preference). The prompt is their longest common prefix of messages,
    as ``trl.data_utils.extract_prompt`` takes it, and each response is the one assistant turn
    after it. A string ``prompt`` column next to them is ignored, as TRL's
    ``maybe_extract_prompt`` ignores it (HuggingFaceH4/ultrafeedback_binarized).
``hh``
    ``chosen`` and ``rejected`` transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
    (Anthropic/hh-rlhf). The turns before the last ``Assistant:`` are the prompt.
``pku``
    ``prompt``, ``response_0``, ``response_1`` and ``better_response_id`` /
    ``safer_response_id`` (PKU-Alignment/PKU-SafeRLHF); ``data.preference`` picks the id.

``data.columns`` renames the file's columns to these names first (OpenRLHF's
``prompt_key``/``chosen_key``/``rejected_key``). Every format keeps an optional ``id`` and an
optional ``subset`` column. Only the final assistant turn is a response: SFT, DPO, evaluation
and SEGA score it and nothing of the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, NamedTuple

FORMATS: tuple[str, ...] = ("auto", "standard", "conversational", "implicit", "hh", "pku")
Preference = Literal["better", "safer"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
FIX_HINT = "every record needs non-empty 'prompt', 'chosen' and 'rejected' strings"

_DESCRIPTIONS = {
    "standard": "prompt/chosen/rejected strings",
    "conversational": "prompt messages, chosen/rejected assistant replies",
    "implicit": "chosen/rejected conversations, prompt = their common prefix",
    "hh": "Human/Assistant transcripts, prompt = the turns before the last Assistant",
    "pku": "prompt, response_0/1 and a *_response_id",
}
# Human:/Assistant: at the start of a transcript or after a blank line, as hh-rlhf writes them.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


class BadRecordReason(str, Enum):
    """Why a record was rejected; the value is the key used in ``ReadReport.dropped``."""

    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    EMPTY_FIELD = "empty_field"
    WRONG_TYPE = "wrong_type"
    DUPLICATE_ID = "duplicate_id"
    INVALID_UTF8 = "invalid_utf8"
    PROMPT_NOT_USER_LAST = "prompt_not_ending_with_user"
    UNKNOWN_ROLE = "unknown_role"
    NO_COMMON_PREFIX = "no_common_prefix"
    BAD_RESPONSE_ID = "bad_response_id"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    NOT_ONE_ASSISTANT_TURN = "response_not_one_assistant_turn"


class BadRecord(Exception):
    """Signal from the per-record parsers; ``read_pairs`` turns it into DataError or a skip."""

    def __init__(self, reason: BadRecordReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Message(NamedTuple):
    """One conversation turn; ``role`` is one of ``ROLES``."""

    role: str
    content: str


Prompt = str | tuple[Message, ...]
"""A flat prompt (one user turn) or a conversation ending with the user's turn."""


@dataclass(frozen=True)
class ReadOptions:
    """How to read the records of a file: ``format`` (one of ``FORMATS``), ``columns`` (our
    name -> the file's column, e.g. ``{"prompt": "question"}``) and, for ``pku``, which
    response id is the preferred one."""

    format: str = "auto"
    columns: Mapping[str, str] = field(default_factory=dict)
    preference: Preference = "better"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.preference not in ("better", "safer"):
            raise ValueError(f"preference must be 'better' or 'safer', got {self.preference!r}")


@dataclass(frozen=True)
class Triple:
    """What a parser makes of one record."""

    prompt: Prompt
    chosen: str
    rejected: str


def describe(fmt: str) -> str:
    """``fmt`` and what it reads, for the one-line format report."""
    return f"{fmt} ({_DESCRIPTIONS[fmt]})"


def rename_columns(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The row with the file's column names replaced by ours (``columns``: ours -> theirs)."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


def detect_format(row: Mapping[str, Any]) -> str:
    """The format of a file, from its first record (after renaming). A record that fits none
    is read as ``standard``, whose checks then name what is missing."""
    if "response_0" in row and "response_1" in row:
        return "pku"
    if isinstance(row.get("prompt"), list):
        return "conversational"
    chosen = row.get("chosen")
    if isinstance(chosen, list):
        first = chosen[0] if chosen else None
        if "prompt" in row and isinstance(first, dict) and first.get("role") == "assistant":
            return "conversational"
        return "implicit"
    if isinstance(chosen, str) and "prompt" not in row and chosen.lstrip().startswith("Human:"):
        return "hh"
    return "standard"


def required_columns(fmt: str, preference: Preference) -> tuple[str, ...]:
    """The columns a table in ``fmt`` must have (a missing one is a file error)."""
    return {
        "standard": ("prompt", "chosen", "rejected"),
        "conversational": ("prompt", "chosen", "rejected"),
        "implicit": ("chosen", "rejected"),
        "hh": ("chosen", "rejected"),
        "pku": ("prompt", "response_0", "response_1", f"{preference}_response_id"),
    }[fmt]


def parse_record(row: dict[str, Any], fmt: str, location: str,
                 preference: Preference = "better") -> Triple:
    """One record of format ``fmt`` as a ``Triple``, or ``BadRecord`` naming the field."""
    if fmt == "standard":
        return Triple(*(_text(row, name, location) for name in ("prompt", "chosen", "rejected")))
    if fmt == "conversational":
        prompt = _prompt(row, location)
        return Triple(prompt, _reply(row, "chosen", location), _reply(row, "rejected", location))
    if fmt == "implicit":
        return _split_implicit(row, location)
    if fmt == "hh":
        return _split_transcripts(row, location)
    if fmt == "pku":
        return _pku(row, location, preference)
    raise ValueError(f"unknown format {fmt!r}")


# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------


def _present(row: dict[str, Any], name: str, location: str) -> Any:
    if name not in row or row[name] is None:
        what = "is missing" if name not in row else "is null"
        raise BadRecord(BadRecordReason.MISSING_FIELD,
                        f"{location}: field '{name}' {what}; {FIX_HINT}")
    return row[name]


def _check_text(value: Any, where: str, location: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(BadRecordReason.WRONG_TYPE, f"{location}: field {where} must be a "
                        f"string, got {type_name(value)}; {FIX_HINT}")
    if not value.strip():
        raise BadRecord(BadRecordReason.EMPTY_FIELD,
                        f"{location}: field {where} is empty; {FIX_HINT}")
    return value


def _text(row: dict[str, Any], name: str, location: str) -> str:
    return _check_text(_present(row, name, location), f"'{name}'", location)


def _messages(value: Any, name: str, location: str) -> tuple[Message, ...]:
    """A list of ``{role, content}`` dicts as ``Message``s; roles and contents checked."""
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type_name(value)
        raise BadRecord(BadRecordReason.WRONG_TYPE,
                        f"{location}: field '{name}' must be a list of {{role, content}} "
                        f"messages, got {what}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord(BadRecordReason.WRONG_TYPE,
                            f"{location}: field '{name}[{i}]' must be a {{role, content}} "
                            f"message, got {type_name(m)}")
        if m["role"] not in ROLES:
            raise BadRecord(BadRecordReason.UNKNOWN_ROLE,
                            f"{location}: field '{name}[{i}].role' is {m['role']!r}; roles "
                            f"must be one of {', '.join(ROLES)} (rename the others first)")
        content = _check_text(m["content"], f"'{name}[{i}].content'", location)
        out.append(Message(m["role"], content))
    return tuple(out)


def _ends_with_user(prompt: tuple[Message, ...], name: str, location: str) -> tuple[Message, ...]:
    if prompt[-1].role != "user":
        raise BadRecord(BadRecordReason.PROMPT_NOT_USER_LAST,
                        f"{location}: field '{name}' ends with a '{prompt[-1].role}' turn; a "
                        "prompt must end with the user's turn, which the response answers")
    return prompt


def _prompt(row: dict[str, Any], location: str) -> Prompt:
    value = _present(row, "prompt", location)
    if isinstance(value, str):
        return _check_text(value, "'prompt'", location)
    return _ends_with_user(_messages(value, "prompt", location), "prompt", location)


def _reply(row: dict[str, Any], name: str, location: str) -> str:
    """A response given as a string or as one assistant message."""
    value = _present(row, name, location)
    if isinstance(value, str):
        return _check_text(value, f"'{name}'", location)
    messages = _messages(value, name, location)
    if len(messages) != 1 or messages[0].role != "assistant":
        raise BadRecord(BadRecordReason.NOT_ONE_ASSISTANT_TURN,
                        f"{location}: field '{name}' must be one assistant message, got the "
                        f"turns {[m.role for m in messages]}; put earlier turns in 'prompt'")
    return messages[0].content


def _split_implicit(row: dict[str, Any], location: str) -> Triple:
    chosen = _messages(_present(row, "chosen", location), "chosen", location)
    rejected = _messages(_present(row, "rejected", location), "rejected", location)
    n = 0  # the longest common prefix of turns, as trl.data_utils.extract_prompt takes it
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadRecord(BadRecordReason.NO_COMMON_PREFIX,
                        f"{location}: field 'chosen' and field 'rejected' share no first turn, "
                        "so there is no implicit prompt; give the prompt in a 'prompt' column "
                        "of messages (data.format=conversational)")
    prompt = _ends_with_user(chosen[:n], "chosen", location)
    replies = []
    for name, turns in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if len(turns) != 1 or turns[0].role != "assistant":
            raise BadRecord(BadRecordReason.NOT_ONE_ASSISTANT_TURN,
                            f"{location}: field '{name}' continues the shared prompt with the "
                            f"turns {[m.role for m in turns]}; it must end with exactly one "
                            "assistant turn, the response")
        replies.append(turns[0].content)
    return Triple(prompt, *replies)


def parse_transcript(text: str, name: str, location: str) -> tuple[Message, ...]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` as ``(user a, assistant b)``."""
    marks = list(_HH_TURN.finditer(text))
    if not marks or marks[0].start() != 0 and text[: marks[0].start()].strip():
        raise BadRecord(BadRecordReason.WRONG_TYPE,
                        f"{location}: field '{name}' is not a Human/Assistant transcript "
                        "(it must start with 'Human:')")
    turns = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "user" if mark.group(1) == "Human" else "assistant"
        turns.append(Message(role, text[mark.end():end]))
    return tuple(turns)


def _split_transcripts(row: dict[str, Any], location: str) -> Triple:
    parsed = {}
    for name in ("chosen", "rejected"):
        turns = parse_transcript(_text(row, name, location), name, location)
        if turns[-1].role != "assistant":
            raise BadRecord(BadRecordReason.NO_ASSISTANT_TURN,
                            f"{location}: field '{name}' has no final Assistant turn; an "
                            "hh-rlhf transcript ends with '\\n\\nAssistant: <response>'")
        parsed[name] = turns
    chosen, rejected = parsed["chosen"], parsed["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord(BadRecordReason.NO_COMMON_PREFIX,
                        f"{location}: field 'chosen' and field 'rejected' differ before their "
                        "last Assistant turn, so they do not share one prompt")
    if len(chosen) == 1:
        raise BadRecord(BadRecordReason.PROMPT_NOT_USER_LAST,
                        f"{location}: field 'chosen' has no Human turn before its Assistant turn")
    prompt = _ends_with_user(chosen[:-1], "chosen", location)
    for name, turns in parsed.items():
        _check_text(turns[-1].content, f"'{name}' (its last Assistant turn)", location)
        for i, m in enumerate(prompt):
            _check_text(m.content, f"'{name}' (turn {i + 1})", location)
    return Triple(prompt, chosen[-1].content, rejected[-1].content)


def _pku(row: dict[str, Any], location: str, preference: Preference) -> Triple:
    prompt = _text(row, "prompt", location)
    responses = [_text(row, f"response_{i}", location) for i in (0, 1)]
    key = f"{preference}_response_id"
    better = _present(row, key, location)
    if isinstance(better, bool) or not isinstance(better, int) or better not in (0, 1):
        raise BadRecord(BadRecordReason.BAD_RESPONSE_ID,
                        f"{location}: field '{key}' is {better!r}; it must be 0 or 1 "
                        "(the index of the preferred of response_0 and response_1)")
    return Triple(prompt, responses[better], responses[1 - better])


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )
