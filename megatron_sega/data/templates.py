"""Prompt templates: how a (prompt, response) pair becomes ``(prompt_ids, response_ids)``.

Two templates:

``chat``
    The tokenizer's own chat template (Jinja, as in ``tokenizer_config.json``), rendered with a
    system message (default: the paper's reflective prompt, ``REFLECTIVE_SYSTEM_PROMPT``) and the
    user prompt, with ``add_generation_prompt=True``. The response is encoded on its own after it;
    with ``append_eos=True`` the template's end-of-turn token (``<|eot_id|>`` for Llama 3,
    ``</s>`` for Llama 2) is appended, which SFT targets want and generation prompts never get.
    Tokenizers without a chat template use ``FALLBACK_CHAT_TEMPLATE``::

        <bos>{system}\\n\\nUser: {prompt}\\nAssistant:\\n{response}<eos>

    Message contents are stripped, as the Llama chat templates do.

    A prompt is a string (one user turn) or a conversation (``Message``s ending with the
    user's turn); a one-turn conversation and the same text as a string give the same ids.
    Earlier assistant turns are rendered by the template as context; the response is always
    the final assistant turn only, the one every loss scores. The system prompt joins a
    conversation that has its own system turn by going first: one system message,
    ``system_prompt + "\n\n" + the conversation's system text``, so the reflective
    instruction (which SEGA's answer marker relies on) is never lost and the dataset's
    instruction is kept, in one system turn as the Llama templates expect.

``none``
    Raw text: ``[BOS] + encode(prompt)`` then ``encode(response)``, nothing added in between or
    to the response, except EOS when ``append_eos=True``. The system prompt is not used. A
    conversation is accepted only when it is a single user turn (it cannot be rendered
    without a template): anything longer is a ``DataError`` naming the record.

User text is always encoded as untrusted (special-token strings in it stay text); only the
template's own text is encoded with special tokens. To tell the two apart the template is
rendered once with placeholder strings in place of the message contents; the result must equal
the rendering with the real contents, else the template transforms content in a way we cannot
follow and ``TokenizerError`` is raised. BOS appears exactly once: from the template if it
writes ``bos_token``, else prepended. Rendering is deterministic: ``strftime_now`` is not
provided, so templates that print today's date fall back to their fixed default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from megatron_sega.data.batching import TokenizedExample, TokenizedPair
from megatron_sega.data.errors import DataError, TokenizerError
from megatron_sega.data.formats import Message, Prompt
from megatron_sega.data.records import PreferencePair
from megatron_sega.data.tokenizer import Tokenizer

TemplateName = Literal["chat", "none"]
TEMPLATE_NAMES: tuple[str, ...] = ("chat", "none")

REFLECTIVE_SYSTEM_PROMPT = (
    "You are a helpful assistant. Think step-by-step and then provide your Final Answer."
)

FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] | trim + '\\n' }}"
    "{% else %}{{ 'Assistant:\\n' + message['content'] | trim + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)

# Private-use code points: cannot collide with real data unless the data is adversarial, and
# then the render/compare check below catches it.
_PLACEHOLDER = "\ue000SEGA-CONTENT-{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000SEGA-CONTENT-(\\d+)\ue001")


class PromptFormatter:
    """Encodes prompts and responses for one tokenizer, template and system prompt.

    ``encode_prompt(prompt)`` gives the generation prompt; ``encode_pair(prompt, response,
    append_eos)`` gives ``(prompt_ids, response_ids)`` whose concatenation is the training
    sequence; ``encode_response`` gives the second half alone.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: TemplateName = "chat",
        system_prompt: str | None = REFLECTIVE_SYSTEM_PROMPT,
    ) -> None:
        if template not in TEMPLATE_NAMES:
            raise ValueError(f"template must be one of {TEMPLATE_NAMES}, got {template!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt.strip() if system_prompt else None
        self.uses_fallback_chat_template = tokenizer.chat_template is None
        self._jinja: Any = None
        self._end_of_turn_id = tokenizer.eos_id
        if template == "chat":
            self._jinja = compile_chat_template(tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE)
            self._end_of_turn_id = self._find_end_of_turn()

    @property
    def end_of_turn_id(self) -> int:
        """The id appended to responses when ``append_eos=True``."""
        return self._end_of_turn_id

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of the prompt as the model sees it before generating; starts with BOS once."""
        if self.template == "none":
            return self.tokenizer.encode(_plain_prompt(prompt), add_bos=True)
        ids = self._encode_messages(self._messages(prompt), add_generation_prompt=True)
        bos = self.tokenizer.bos_id
        if bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def encode_pair(
        self, prompt: Prompt, response: str, append_eos: bool = False
    ) -> tuple[list[int], list[int]]:
        """``(prompt_ids, response_ids)``; the end-of-turn/EOS id is appended only if asked."""
        return self.encode_prompt(prompt), self.encode_response(response, append_eos)

    def encode_response(self, response: str, append_eos: bool = False) -> list[int]:
        """Response ids as they follow the prompt (stripped under ``chat``, raw under ``none``)."""
        text = response if self.template == "none" else response.strip()
        ids = self.tokenizer.encode(text, add_bos=False)
        if append_eos:
            ids.append(self._end_of_turn_id)
        return ids

    # ----------------------------------------------------------------------------------------
    def _messages(self, prompt: Prompt) -> list[dict[str, str]]:
        turns = [Message("user", prompt)] if isinstance(prompt, str) else list(prompt)
        messages = [{"role": m.role, "content": m.content.strip()} for m in turns]
        if self.system_prompt:
            if messages[0]["role"] == "system":
                own = messages.pop(0)["content"]
                messages.insert(0, {"role": "system", "content": f"{self.system_prompt}\n\n{own}"})
            else:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        return self._jinja.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token,
        )

    def _render_segments(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, trusted)`` segments; contents are untrusted."""
        masked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        rendered = self._render(masked, add_generation_prompt)
        segments: list[tuple[str, bool]] = []
        pos = 0
        for match in _PLACEHOLDER_RE.finditer(rendered):
            segments.append((rendered[pos : match.start()], True))
            index = int(match.group(1))
            if index >= len(messages):
                raise TokenizerError("chat template produced an unknown content placeholder")
            segments.append((messages[index]["content"], False))
            pos = match.end()
        segments.append((rendered[pos:], True))
        expected = self._render(messages, add_generation_prompt)
        if "".join(text for text, _ in segments) != expected:
            raise TokenizerError(
                "the chat template changes message contents beyond stripping whitespace, so "
                "template tokens cannot be told apart from user text; use template 'none' or a "
                "template that inserts message['content'] (optionally | trim) unchanged"
            )
        return segments

    def _encode_messages(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        # Plain text is buffered across segment boundaries and encoded in one piece between
        # special tokens, which is how `tokenizers` itself splits text around added tokens, so
        # benign inputs tokenise exactly as a plain apply_chat_template would.
        tok = self.tokenizer
        ids: list[int] = []
        buffer: list[str] = []

        def flush() -> None:
            if buffer:
                ids.extend(tok.encode("".join(buffer)))
                buffer.clear()

        for text, trusted in self._render_segments(messages, add_generation_prompt):
            if not trusted:
                buffer.append(text)
                continue
            for part in tok.split_specials(text):
                if isinstance(part, int):
                    flush()
                    ids.append(part)
                else:
                    buffer.append(part)
        flush()
        return ids

    def _find_end_of_turn(self) -> int:
        """The first stop token the template writes after an assistant message (else EOS)."""
        messages = [*self._messages("q"), {"role": "assistant", "content": "a"}]
        segments = self._render_segments(messages, add_generation_prompt=False)
        # The last untrusted segment is the assistant content; what follows ends the turn.
        last = max(i for i, (_, trusted) in enumerate(segments) if not trusted)
        suffix = "".join(text for text, _ in segments[last + 1 :])
        for token_id in self.tokenizer.encode_trusted(suffix):
            if token_id in self.tokenizer.stop_ids:
                return token_id
        return self.tokenizer.eos_id


def compile_chat_template(source: str) -> Any:
    """Compile a Hugging Face chat template with the environment transformers uses.

    Same options and helpers as ``transformers`` (sandboxed, ``trim_blocks``, ``lstrip_blocks``,
    ``loopcontrols``, ``raise_exception``, ``tojson`` without HTML escaping), without importing
    transformers.
    """
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template error: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


# --------------------------------------------------------------------------------------------
# Whole-dataset helpers
# --------------------------------------------------------------------------------------------


def tokenize_sft(
    pairs: Sequence[PreferencePair], formatter: PromptFormatter
) -> list[TokenizedExample]:
    """Stage A examples: ``prompt -> chosen``, with the end-of-turn token as the last target."""
    return [TokenizedExample(p.id, _prompt_ids(formatter, p),
                             formatter.encode_response(p.chosen, append_eos=True))
            for p in pairs]


def tokenize_pairs(
    pairs: Sequence[PreferencePair], formatter: PromptFormatter, append_eos: bool = False
) -> list[TokenizedPair]:
    """Evaluation pairs: one prompt encoding shared by the chosen and the rejected response."""
    out = []
    for p in pairs:
        out.append(
            TokenizedPair(
                p.id,
                _prompt_ids(formatter, p),
                formatter.encode_response(p.chosen, append_eos),
                formatter.encode_response(p.rejected, append_eos),
                subset=p.subset,
            )
        )
    return out


def tokenize_prompts(
    pairs: Sequence[PreferencePair], formatter: PromptFormatter
) -> list[TokenizedExample]:
    """Generation prompts (stage B); ``response_ids`` is empty."""
    return [TokenizedExample(p.id, _prompt_ids(formatter, p), []) for p in pairs]


class _ConversationWithoutTemplate(DataError):
    """A conversation under template ``none``; ``tokenize_*`` add the record's location."""


def _prompt_ids(formatter: PromptFormatter, pair: PreferencePair) -> list[int]:
    """``formatter.encode_prompt``, with a conversation that template ``none`` cannot render
    reported at its record."""
    try:
        return formatter.encode_prompt(pair.prompt)
    except _ConversationWithoutTemplate as e:
        raise DataError(f"{pair.source}: field 'prompt' is {e}") from None


def _plain_prompt(prompt: Prompt) -> str:
    """The text of a prompt under template ``none``: a string, or a single user turn."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    raise _ConversationWithoutTemplate(
        f"a conversation of {len(prompt)} turns ({', '.join(m.role for m in prompt)}), which "
        "data.template=none cannot render; use data.template=chat (the tokenizer's chat "
        "template renders every turn) or give single-turn prompts")
