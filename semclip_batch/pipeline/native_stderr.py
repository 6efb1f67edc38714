"""Keep native (C++) log lines off the user's terminal while a private local Ray runs.

Ray's core worker in the driver writes its ERROR lines straight to file descriptor 2, whatever Python's logging
says; on a private local Ray the only one users see is about Ray Data's own actor set-up ("constructor arguments in
the object store"), which they cannot act on. The CLI first moves Python's ``sys.stderr`` onto a duplicate of
descriptor 2 (:func:`split_stderr`); then, while the private Ray runs, descriptor 2 itself points at a file in
Ray's session logs (:func:`native_stderr_to`). Python's own output (progress bars, one-line errors, tracebacks)
still reaches the terminal; ``-v`` keeps everything on the terminal.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

STDERR_FD = 2


def python_stderr_on_fd2() -> bool:
    """Whether Python's ``sys.stderr`` writes to descriptor 2 (then moving descriptor 2 would move it too)."""
    try:
        return sys.stderr is not None and sys.stderr.fileno() == STDERR_FD
    except (AttributeError, OSError, ValueError):  # a captured or replaced stream (tests, notebooks)
        return False


def split_stderr() -> None:
    """Point ``sys.stderr`` at a duplicate of descriptor 2, so that descriptor 2 can later be sent elsewhere
    without moving Python's output. Call before any logging handler or progress bar binds ``sys.stderr``."""
    if not python_stderr_on_fd2():
        return
    old = sys.stderr
    old.flush()
    raw = io.FileIO(os.dup(STDERR_FD), "w", closefd=True)
    sys.stderr = io.TextIOWrapper(raw, encoding=old.encoding, errors="backslashreplace", line_buffering=True,
                                  write_through=True)


@contextmanager
def native_stderr_to(path: str) -> Iterator[None]:
    """Descriptor 2 appends to ``path`` inside the block and is restored after it. A no-op when Python's
    ``sys.stderr`` still writes to descriptor 2 (:func:`split_stderr` not called), when ``path`` cannot be opened
    (native lines are then shown rather than lost) or when descriptor 2 is closed."""
    if python_stderr_on_fd2():
        yield
        return
    try:
        saved = os.dup(STDERR_FD)  # fails when descriptor 2 is closed (`2>&-`): nothing to keep off a terminal
    except OSError:
        yield
        return
    try:
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        os.close(saved)
        yield
        return
    try:
        os.dup2(target, STDERR_FD)
    finally:
        os.close(target)
    try:
        yield
    finally:
        os.dup2(saved, STDERR_FD)
        os.close(saved)
