"""The one home of the library's exceptions.

Everything a user can cause derives from :class:`SemclipError`; the CLI turns those into one clear line and a
non-zero exit. Per-image failures inside a batch never raise: they become rows whose ``status`` is one of the
``*_ERROR`` kinds below.
"""

from __future__ import annotations

import re

READ_ERROR = "read_error"
DECODE_ERROR = "decode_error"
REFERENCE_ERROR = "reference_error"
MODEL_ERROR = "model_error"
WRITE_ERROR = "write_error"
OK = "ok"


class SemclipError(Exception):
    """A user-facing error: the message names the offending value and, where possible, the fix."""


class ManifestError(SemclipError):
    """The manifest or input folder cannot be used (missing column, duplicate id, pattern mismatch...)."""


class ConfigError(SemclipError):
    """An option or combination of options is invalid."""


class WeightsError(SemclipError):
    """Backbone weights or a checkpoint cannot be loaded or do not match their checksum."""


class MissingWeightsError(WeightsError):
    """The backbone weights file named is not there."""


class OutputError(SemclipError):
    """The output root cannot be used as asked (different run inside, local OUT on a multi-node cluster...)."""


class RunFailed(SemclipError):
    """A run ended without every shard stored (named in the run record); rerunning the command retries it."""


class ImageError(Exception):
    """One image cannot be used; ``kind`` is the row status it turns into."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


MAX_MESSAGE = 500
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line, object reprs (``<... object at 0x...>``) removed, at most ``limit`` characters."""
    flat = " ".join(_OBJECT_REPR.sub("", text).split())
    if len(flat) <= limit:
        return flat
    tail = f"… ({len(flat)} characters)"
    return flat[: limit - len(tail)] + tail


def show(value: object, limit: int = 60) -> str:
    """A user-supplied value quoted for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}…' ({len(str(value))} characters)"


def one_line(exc: BaseException) -> str:
    """The exception as a single line of at most 500 characters: ``Type: message`` (the bare message for the
    project's own errors), newlines folded, object reprs dropped."""
    text = shorten(str(exc)) or exc.__class__.__name__
    if isinstance(exc, (SemclipError, ImageError)):
        return text
    return shorten(f"{exc.__class__.__name__}: {text}")
