"""Progress on the user's terminal: a tqdm bar with rate and ETA when the stream (stderr) is a terminal, the plain
lines of before otherwise (logs, pipes, CI keep ``scored N/M images`` and ``step N/M  loss L``).

Both adapt the library's callback types (:data:`~semclip_batch.config.Progress`: rows just done, rows in all;
:data:`~semclip_batch.config.LossProgress`: step, steps, loss). A bar is made on the first call, when the total
is known, and closed when the context ends, whatever happened; meanwhile the package's log lines are written
above the bar instead of through it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import click
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from semclip_batch.config import LossProgress, Progress

BAR_REFRESH_S = 0.2


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


class _Bar:
    """A tqdm bar started on the first update, when its total is known."""

    def __init__(self, stream: TextIO, desc: str, unit: str) -> None:
        self.stream, self.desc, self.unit = stream, desc, unit
        self.bar: Any = None

    @property
    def done(self) -> int:
        return int(self.bar.n) if self.bar is not None else 0

    def update(self, n: int, total: int, **postfix: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream, dynamic_ncols=True,
                            mininterval=BAR_REFRESH_S, leave=True)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # a second close does nothing


def row_printer(stream: TextIO | None = None) -> Progress:
    """``scored N/M images`` rewritten in place on one line (the plain form)."""
    state = {"done": 0}

    def update(n: int, total: int) -> None:
        state["done"] += n
        click.echo(f"\rscored {state['done']}/{total} images", nl=state["done"] >= total, err=True, file=stream)

    return update


def loss_printer(what: str, stream: TextIO | None = None) -> LossProgress:
    """``<what> N/M  loss L``, a line per call (the plain form)."""

    def show(step: int, total: int, loss: float) -> None:
        click.echo(f"{what} {step}/{total}  loss {loss:.4f}", err=True, file=stream)

    return show


@contextmanager
def row_progress(desc: str = "scored", unit: str = "img", *, plain: bool = True,
                 stream: TextIO | None = None) -> Iterator[Progress | None]:
    """A :data:`Progress` for rows: a bar on a terminal; elsewhere :func:`row_printer`, or nothing unless
    ``plain``. ``stream`` defaults to stderr."""
    out = stream if stream is not None else sys.stderr
    if not is_terminal(out):
        yield row_printer(stream) if plain else None
        return
    bar = _Bar(out, desc, unit)
    try:
        with logging_redirect_tqdm():
            yield bar.update
    finally:
        bar.close()


@contextmanager
def loss_progress(what: str, desc: str, stream: TextIO | None = None, unit: str | None = None) -> Iterator[LossProgress]:
    """A :data:`LossProgress`: a bar of ``unit`` (default ``what``: step, epoch) with the latest loss on a terminal,
    else :func:`loss_printer` (its lines name ``what``). ``stream`` defaults to stderr. The bar is closed when it
    reaches its total, so a second one opened meanwhile (``train``: the adaptation's steps, then the fit's epochs)
    is drawn below a finished first one."""
    out = stream if stream is not None else sys.stderr
    if not is_terminal(out):
        yield loss_printer(what, stream)
        return
    bar = _Bar(out, desc, unit or what)

    def show(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.done, total, loss=f"{loss:.4f}")
        if step >= total:
            bar.close()

    try:
        with logging_redirect_tqdm():
            yield show
    finally:
        bar.close()
