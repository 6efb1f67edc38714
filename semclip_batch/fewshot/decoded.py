"""Support rows decoded once while one ``train`` runs.

``train`` loads its support frames up to seven times: the fit's views at whole, the scale check's at four policies
(the frames it holds out), the maps' views at the policy chosen, the grey-level memory's native frames. Each load
read, decoded and built the row's reference again (a registered reference file, or a cell reference from the frame's
own repeats: ~40 ms a 1024 px frame here, more than its decoding). Within :func:`rows_kept`, a row's frame and mask
(and, separately, each kind of reference it was asked for) are kept after their first load and handed to every
later one: the same arrays, so the same views, features and checkpoint. A byte budget bounds what is kept (2 GiB,
at most a quarter of the memory free when ``train`` starts); rows past it are decoded each time, as before. Where
``train``'s estimate says the views at a policy would not fit in memory, everything kept is released and the
estimate taken again before any step down, so its choices are those it made before rows were kept. A row that
fails to decode, or a reference file that fails, is not kept: every load fails it again, with the same warning.

Held by a context variable the loading functions read on the calling thread (``load_trainset`` hands the store to
its decoding threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

DEFAULT_BUDGET_BYTES = 2 << 30  # 70 frames of 1024 px: ~0.6 GiB with masks and cell references

FrameAndMask = tuple[np.ndarray, "np.ndarray | None"]


class DecodedRows:
    """Decoded frames with their masks, and references, by key, up to ``budget`` bytes in all."""

    def __init__(self, budget: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget = budget
        self.used = 0
        self._frames: dict[Hashable, FrameAndMask] = {}
        self._refs: dict[Hashable, np.ndarray | None] = {}
        self._lock = threading.Lock()

    def frame(self, key: Hashable, decode: Callable[[], FrameAndMask]) -> FrameAndMask:
        """The frame and mask kept under ``key``, or ``decode()``'s (kept while the budget allows)."""
        return self._kept(self._frames, key, decode, lambda value: _nbytes(*value))

    def reference(self, key: Hashable, make: Callable[[], np.ndarray | None]) -> np.ndarray | None:
        """The reference kept under ``key`` (None: the row has none usable), or ``make()``'s."""
        return self._kept(self._refs, key, make, _nbytes)

    def release(self) -> int:
        """Drop everything kept and keep nothing more (memory is short: ``train``'s estimate of what its views need
        counts what is kept as free, as it was before rows were kept); the bytes released."""
        with self._lock:
            freed, self.used, self.budget = self.used, 0, 0
            self._frames.clear()
            self._refs.clear()
        return freed

    def _kept(self, store: dict[Hashable, Any], key: Hashable, make: Callable[[], Any],
              size: Callable[[Any], int]) -> Any:
        """``store[key]``, or ``make()``'s value, kept there when ``size`` of it fits the budget left."""
        with self._lock:
            if key in store:
                return store[key]
        value = make()  # outside the lock: the decoding threads decode side by side
        with self._lock:
            if key not in store and self.used + size(value) <= self.budget:
                store[key] = value
                self.used += size(value)
        return value


def _nbytes(*arrays: np.ndarray | None) -> int:
    return sum(a.nbytes for a in arrays if a is not None)


def kept_budget(available: int | None) -> int:
    """What :func:`rows_kept` may keep: :data:`DEFAULT_BUDGET_BYTES`, at most a quarter of ``available`` (None:
    unknown, the default)."""
    return DEFAULT_BUDGET_BYTES if available is None else min(DEFAULT_BUDGET_BYTES, available // 4)


_ACTIVE: ContextVar[DecodedRows | None] = ContextVar("semclip_decoded_rows", default=None)


def active_rows() -> DecodedRows | None:
    """The store of the enclosing :func:`rows_kept`, or None (every load decodes)."""
    return _ACTIVE.get()


@contextmanager
def rows_kept(budget: int = DEFAULT_BUDGET_BYTES) -> Iterator[DecodedRows]:
    """Loads inside the block decode each row once (up to ``budget`` bytes kept); freed when it ends."""
    store = DecodedRows(budget)
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)
