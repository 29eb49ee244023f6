"""One tokenizer interface over Hugging Face ``tokenizer.json`` and SentencePiece ``.model`` files.

Llama 3 ships a ``tokenizers`` (byte-level BPE) ``tokenizer.json``; Llama 2 ships a SentencePiece
``tokenizer.model`` (and often a converted ``tokenizer.json`` too, which is preferred when both
exist). Either way the rest of the code sees the same small API.

Two encoding entry points, on purpose:
- ``encode(text)`` is for *untrusted* text (prompts, responses from data files): special-token
  strings such as ``"<|eot_id|>"`` or ``"</s>"`` in it are encoded as ordinary text, never as
  special ids, so a data record cannot end a turn or inject a header.
- ``encode_trusted(text)`` is for text that *our* code produced, i.e. a rendered chat template:
  there, special-token strings are meant as special tokens.

Neither adds BOS implicitly (the ``tokenizers`` post-processor is bypassed); ``encode(...,
add_bos=True)`` adds exactly one, and the templates add it only when the chat template did not.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from megatron_sega.data.errors import TokenizerError

# Files that make up a tokenizer; `save` copies the ones that were loaded.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Tried in order when the config names no BOS/EOS (a bare tokenizer.json).
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_GUESSES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
# Text that two different vocabularies all but surely split into different ids (words, digits,
# code, whitespace runs, accents, CJK, an emoji): see Tokenizer.difference.
_PROBE = ("The quick brown fox jumps over 13 lazy dogs; 2024-11-30 = 3.14159?\n\tdef f(x): "
          "return x ** 2  # Überprüfung, naïve café, 東京タワー, 🙂 réponse.")
# End-of-turn tokens of common chat formats: generation must stop on them as well as on EOS.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """A loaded tokenizer; build it with ``Tokenizer.from_path``.

    Attributes: ``bos_id`` (``None`` if the tokenizer has no BOS), ``eos_id``, ``pad_id`` (the
    config's pad token, else EOS: padded positions are always masked, so its value never
    matters), ``vocab_size`` (the tokenizer's, before any padding of the embedding table),
    ``stop_ids`` (EOS, generation-config EOS ids and end-of-turn tokens such as ``<|eot_id|>``),
    ``chat_template`` (Jinja source or ``None``), ``bos_token``/``eos_token`` (strings).
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None,
        eos_token: str,
        pad_token: str | None,
        chat_template: str | None,
        extra_stop_ids: list[int],
        files: dict[str, Path],
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = None if bos_token is None else self._require_id(bos_token, "bos_token")
        self.eos_id = self._require_id(eos_token, "eos_token")
        self.pad_id = self.eos_id if pad_token is None else self._require_id(pad_token, "pad_token")
        self.chat_template = chat_template
        self.vocab_size = backend.vocab_size
        self._files = files

        specials = dict(backend.special_tokens)
        for tok in (bos_token, eos_token, pad_token):
            if tok is not None:
                specials[tok] = self._require_id(tok, "special token")
        self.special_tokens: dict[str, int] = specials
        # Longest first so that e.g. "<|end|>" never shadows "<|end_of_text|>".
        pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if pattern else None

        stops = [self.eos_id, *extra_stop_ids]
        stops += [specials[t] for t in _END_OF_TURN_TOKENS if t in specials]
        self.stop_ids: list[int] = list(dict.fromkeys(stops))

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load from a directory, a ``tokenizer.json`` file or a SentencePiece ``.model`` file.

        Config files (``tokenizer_config.json``, ``special_tokens_map.json``,
        ``chat_template.jinja``, ``generation_config.json``) are read from the same directory.
        """
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"{path}: tokenizer path does not exist")
        directory = path if path.is_dir() else path.parent
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                model_file = path / "tokenizer.json"
            elif (path / "tokenizer.model").is_file():
                model_file = path / "tokenizer.model"
            else:
                raise TokenizerError(
                    f"{path}: no tokenizer.json or tokenizer.model in this directory"
                )
        else:
            model_file = path
        files = {f: directory / f for f in _TOKENIZER_FILES if (directory / f).is_file()}
        files.pop("tokenizer.json" if model_file.suffix == ".model" else "tokenizer.model", None)
        files[_canonical_name(model_file)] = model_file

        config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        backend: _Backend
        if model_file.suffix == ".json":
            backend = _HFBackend(model_file)
        elif model_file.suffix == ".model":
            backend = _SentencePieceBackend(model_file)
        else:
            raise TokenizerError(
                f"{model_file}: unsupported tokenizer file; expected tokenizer.json or a "
                "SentencePiece .model"
            )

        def token(name: str, guesses: tuple[str, ...]) -> str | None:
            value = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if value is not None:
                return value
            return backend.default_token(name) or next(
                (g for g in guesses if backend.piece_to_id(g) is not None), None
            )

        eos = token("eos_token", _EOS_GUESSES)
        if eos is None:
            raise TokenizerError(
                f"{directory}: cannot determine the EOS token; set 'eos_token' in "
                "tokenizer_config.json"
            )
        return cls(
            backend,
            bos_token=token("bos_token", _BOS_GUESSES),
            eos_token=eos,
            pad_token=token("pad_token", ()),
            chat_template=_load_chat_template(directory, config),
            extra_stop_ids=_generation_eos_ids(directory),
            files=files,
        )

    # ----------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Encode untrusted text: special-token strings in it stay ordinary text."""
        ids = self._backend.encode_plain(text)
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def encode_trusted(self, text: str) -> list[int]:
        """Encode text our code wrote (a rendered template): special-token strings become ids."""
        ids: list[int] = []
        for part in self.split_specials(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._backend.encode_plain(part))
        return ids

    def split_specials(self, text: str) -> list[str | int]:
        """Split text into non-empty plain-text pieces and the ids of special-token strings."""
        if self._special_re is None:
            return [text] if text else []
        out: list[str | int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2 == 1:  # re.split puts the captured separators at odd indices
                out.append(self.special_tokens[part])
            elif part:
                out.append(part)
        return out

    def marker_variants(self, marker: str) -> list[list[int]]:
        """Distinct tokenisations of ``marker`` at the start of a text, after a space and after
        a newline (e.g. ``"Final Answer:"`` vs ``" Final Answer:"`` in a byte-level BPE), for
        finding the marker in generated ids. A leading whitespace-only token is not included.
        """
        variants: list[list[int]] = []
        for prefix in ("", " ", "\n"):
            ids = self.encode(prefix + marker)
            head = self.encode(prefix) if prefix else []
            if head and ids[: len(head)] == head:
                ids = ids[len(head) :]
            if ids and ids not in variants:
                variants.append(ids)
        return variants

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.piece_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_piece(token_id)

    def difference(self, other: Tokenizer) -> str | None:
        """How this tokenizer and ``other`` differ as a model sees them (vocabulary size, BOS
        and EOS ids, the ids of a probe text), or None when they agree. Chat templates and the
        file format (``tokenizer.json`` vs SentencePiece) may differ."""
        for what, mine, theirs in (("vocab_size", self.vocab_size, other.vocab_size),
                                   ("bos id", self.bos_id, other.bos_id),
                                   ("eos id", self.eos_id, other.eos_id)):
            if mine != theirs:
                return f"{what} {mine} != {theirs}"
        if self.encode(_PROBE) != other.encode(_PROBE):
            return "the same text encodes to different ids"
        return None

    def save(self, directory: str | Path) -> None:
        """Copy the tokenizer files that were loaded into ``directory`` (created if needed)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, src in self._files.items():
            dst = out / name
            if dst.resolve() != src.resolve():
                shutil.copyfile(src, dst)

    def _require_id(self, token: str, what: str) -> int:
        tid = self._backend.piece_to_id(token)
        if tid is None:
            raise TokenizerError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return tid

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self._backend.kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, stop_ids={self.stop_ids}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class _Backend:
    """The few operations the two tokenizer libraries must provide."""

    kind = "abstract"
    vocab_size: int
    special_tokens: dict[str, int]

    def encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str | None:
        raise NotImplementedError

    def default_token(self, name: str) -> str | None:
        return None


class _HFBackend(_Backend):
    kind = "tokenizer.json"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on parse errors
            raise TokenizerError(f"{path}: cannot load tokenizer.json ({e})") from None
        tok.no_truncation()
        tok.no_padding()
        # Special-token strings in input text are encoded as text; encode_trusted handles them.
        tok.encode_special_tokens = True
        self._tok = tok
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    def encode_plain(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def id_to_piece(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class _SentencePieceBackend(_Backend):
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: cannot load SentencePiece model ({e})") from None
        self._sp = sp
        self.vocab_size = sp.GetPieceSize()
        # Control symbols (<s>, </s>, ...) are never produced from text by SentencePiece itself,
        # which is exactly the "untrusted text" behaviour encode_plain needs.
        self.special_tokens = {
            sp.IdToPiece(i): i for i in range(self.vocab_size) if sp.IsControl(i)
        }

    def encode_plain(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self._sp.DecodeIds([i for i in ids if not self._sp.IsControl(i)])
        # SentencePiece drops control ids when decoding; keep them visible as their pieces.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if self._sp.IsControl(i):
                out.append(self._sp.DecodeIds(run))
                out.append(self._sp.IdToPiece(i))
                run = []
            else:
                run.append(i)
        out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def piece_to_id(self, piece: str) -> int | None:
        tid = self._sp.PieceToId(piece)
        # PieceToId returns the unk id for unknown pieces; only accept a real match.
        return tid if self._sp.IdToPiece(tid) == piece else None

    def id_to_piece(self, token_id: int) -> str | None:
        if 0 <= token_id < self.vocab_size:
            return self._sp.IdToPiece(token_id)
        return None

    def default_token(self, name: str) -> str | None:
        tid = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(),
               "pad_token": self._sp.pad_id()}.get(name, -1)
        return self._sp.IdToPiece(tid) if tid >= 0 else None


# --------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------


def _canonical_name(model_file: Path) -> str:
    return "tokenizer.json" if model_file.suffix == ".json" else "tokenizer.model"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """Config tokens are either a string or a serialised AddedToken ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The chat template from tokenizer_config.json, chat_template.jinja or chat_template.json."""
    template: Any = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text("utf-8")
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{directory}: chat_template must be a string")
    return template


def _generation_eos_ids(directory: Path) -> list[int]:
    value = _read_json(directory / "generation_config.json").get("eos_token_id")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []
