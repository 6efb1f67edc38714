"""The one home of the library's exceptions.

Everything a user can cause derives from :class:`SemclipError`; the CLI turns those into one clear line and a
non-zero exit. Per-image failures inside a batch never raise: they become rows whose ``status`` is one of the
``*_ERROR`` kinds below.
"""

from __future__ import annotations

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


class OutputError(SemclipError):
    """The output root cannot be used as asked (different run inside, local OUT on a multi-node cluster...)."""


class ImageError(Exception):
    """One image cannot be used; ``kind`` is the row status it turns into."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def one_line(exc: BaseException) -> str:
    """The exception as a single line: ``Type: message`` with newlines folded."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    if isinstance(exc, (SemclipError, ImageError)):
        return text
    return f"{exc.__class__.__name__}: {text}"
