"""The known, harmless library messages are silenced in one place (``logging/noise.py``), and
nothing else is: a library warning that may call for action still reaches the user."""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest

from megatron_sega.logging.noise import KNOWN_MESSAGES, silence_known_messages


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _isolated(names):
    """Warnings caught and shown always; the named loggers recorded and their filters restored."""
    loggers = {name: logging.getLogger(name) for name in names}
    saved = {name: list(logger.filters) for name, logger in loggers.items()}
    handler = _Records()
    for logger in loggers.values():
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, handler.messages
    finally:
        for name, logger in loggers.items():
            logger.removeHandler(handler)
            logger.filters[:] = saved[name]


def _emit_all(extra_logger: str) -> None:
    for known in KNOWN_MESSAGES:
        if known.source == "warnings":
            warnings.warn(known.start + " (rest of the message)", UserWarning)
        else:
            logging.getLogger(known.source).warning("%s (rest of the message)", known.start)
    # Messages of the same sources that are not on the list: they may call for action.
    warnings.warn("Megatron-Core: this setting is ignored; set it in another way", UserWarning)
    warnings.warn("some API is deprecated", FutureWarning)
    logging.getLogger("megatron.core.models.gpt.gpt_model").warning("check your layer spec")
    logging.getLogger(extra_logger).warning("the checkpoint format is old; re-save it")


@pytest.mark.parametrize("on_gpu", [False, True])
def test_only_the_listed_messages_are_silenced(on_gpu):
    extra = "megatron.core.dist_checkpointing.validation"
    names = {k.source for k in KNOWN_MESSAGES if k.source != "warnings"} | {extra}
    with _isolated(names) as (caught, logged):
        silence_known_messages(on_gpu=on_gpu)
        silence_known_messages(on_gpu=on_gpu)  # idempotent
        _emit_all(extra)
    shown = [str(w.message) for w in caught] + logged
    for known in KNOWN_MESSAGES:
        visible = any(text.startswith(known.start) for text in shown)
        assert visible == (on_gpu and known.cpu_only), known.start
    for kept in ("Megatron-Core: this setting is ignored", "some API is deprecated",
                 "check your layer spec", "the checkpoint format is old"):
        assert any(text.startswith(kept) for text in shown), kept


def test_the_cli_installs_the_list_and_nothing_broader(monkeypatch):
    """``cli._quiet_megatron`` once ignored every UserWarning, FutureWarning and
    DeprecationWarning and every Megatron log below ERROR."""
    import torch

    from megatron_sega import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    megatron = logging.getLogger("megatron")
    level = megatron.level
    extra = "megatron.core.dist_checkpointing.validation"
    names = {k.source for k in KNOWN_MESSAGES if k.source != "warnings"} | {extra}
    try:
        with _isolated(names) as (caught, logged):
            cli._quiet_megatron()
            _emit_all(extra)
    finally:
        megatron.setLevel(level)
    shown = [str(w.message) for w in caught] + logged
    assert not any(text.startswith(k.start) for k in KNOWN_MESSAGES for text in shown)
    assert len(shown) == 4, shown
