"""The driver's side of the stream: receipts counted once per row, and each complete shard's finaliser started
and its done marker written (README "Architecture": finalised shards, done markers and resume)."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from semclip_batch.config import Progress
from semclip_batch.errors import OK, RunFailed, one_line
from semclip_batch.io.layout import OutLayout
from semclip_batch.pipeline.finalise import Finalised, FinaliseSetup, finalise_shard, finaliser_ready
from semclip_batch.pipeline.shards import ShardKey, write_marker

MAX_FINALISING = 4
MARKER_POLL_S = 0.5


@dataclass(frozen=True)
class Collected:
    """What came back: the rows by status (what the model saw), the rows stored by status (from the finalised
    shards), the shards that could not be stored (with why) and the ok rows scored against a cell reference."""

    received: Counter[str]
    stored: Counter[str]
    failed: dict[ShardKey, str]
    cell_references: int


class Finalisers:
    """The finalise task of each complete shard (one per shard, at most MAX_FINALISING at a time), and the done
    markers written after them, by a thread of their own: a marker is written as soon as its shard is
    finalised, not when the next receipts arrive.

    Finalisers ask for no CPU: they mostly wait on storage, and a CPU request would queue them behind the decode
    tasks that keep every CPU busy until the end of the run; the cap on tasks in flight bounds their memory."""

    def __init__(self, layout: OutLayout, storage_options: dict[str, Any], *, retries: int,
                 on_shard_done: Callable[[], None]) -> None:
        self.layout, self.so, self.on_shard_done = layout, storage_options, on_shard_done
        self.setup = FinaliseSetup(out=layout.root, storage_options=storage_options)
        self.task = ray.remote(finalise_shard).options(num_cpus=0, max_retries=retries)
        # start a worker with the finaliser's modules imported now, not when the first shard is complete
        self.warm_up = ray.remote(finaliser_ready).options(num_cpus=0).remote()
        self.waiting: deque[tuple[ShardKey, int]] = deque()
        self.pending: dict[ray.ObjectRef, ShardKey] = {}
        self.failed: dict[ShardKey, str] = {}
        self.counts: Counter[str] = Counter()  # rows stored, by status, of the shards finalised
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._markers, name="finalisers", daemon=True)
        self.thread.start()

    def start(self, key: ShardKey, rows: int) -> None:
        with self.lock:
            self.waiting.append((key, rows))
            self._launch()

    def close(self) -> None:
        """Wait for every finaliser started or queued, and its marker."""
        self.closing.set()
        self.thread.join()

    def _launch(self) -> None:
        while self.waiting and len(self.pending) < MAX_FINALISING:
            (lot, shard), rows = self.waiting.popleft()
            self.pending[self.task.remote(self.setup, lot, shard, rows)] = (lot, shard)

    def _markers(self) -> None:
        while True:
            with self.lock:
                refs = list(self.pending)
                if not refs and not self.waiting and self.closing.is_set():
                    return
            if not refs:
                self.closing.wait(MARKER_POLL_S)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=MARKER_POLL_S)
            for ref in ready:
                self._finished(ref)
            with self.lock:
                self._launch()

    def _finished(self, ref: ray.ObjectRef) -> None:
        with self.lock:
            key = self.pending.pop(ref)
        try:
            result: Finalised = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - its worker died more often than it may be retried: the shard fails
            self.failed[key] = one_line(exc)
            return
        if result.error is not None:
            self.failed[key] = result.error
            return
        try:
            write_marker(self.layout, key, result.counts, self.so)
        except OSError as exc:
            self.failed[key] = f"its done marker could not be stored: {one_line(exc)}"
            return
        self.counts.update(result.counts)
        self.on_shard_done()


def collect_receipts(ds: ray.data.Dataset, layout: OutLayout, storage_options: dict[str, Any],
                     expected: dict[ShardKey, int], *, progress: Progress | None, retries: int,
                     on_shard_done: Callable[[], None]) -> Collected:
    """Count each row once (a retried task can repeat receipts); once all of a shard's rows are stored, start
    its finaliser, whose success the shard's marker records. Returns what came back (:class:`Collected`).
    Finalisers already started are always waited for, even when the stream fails."""
    seen: dict[ShardKey, set[str]] = defaultdict(set)
    complete: set[ShardKey] = set()
    received: Counter[str] = Counter()
    cell_refs = 0
    unwritten: dict[ShardKey, str] = {}
    finalisers = Finalisers(layout, storage_options, retries=retries, on_shard_done=on_shard_done)
    n_rows = sum(expected.values())
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            receipts = zip(batch["lot_id"], batch["shard"], batch["image_id"], batch["status"], batch["written"],
                           batch["error"], batch["cell_ref"], strict=True)
            for lot, shard, image_id, status, written, error, cell_ref in receipts:
                key = (str(lot), str(shard))
                if key in complete:
                    continue
                if not written:
                    unwritten.setdefault(key, str(error))
                    continue
                ids = seen[key]
                if str(image_id) in ids:
                    continue
                ids.add(str(image_id))
                received[str(status)] += 1
                cell_refs += bool(cell_ref) and status == OK
                if len(ids) == expected[key]:
                    complete.add(key)
                    del seen[key]
                    finalisers.start(key, expected[key])
            if progress is not None:
                progress(len(batch["image_id"]), n_rows)
    finally:
        finalisers.close()
    failed = {k: why for k, why in unwritten.items() if k not in complete}  # a retry may have stored it
    failed.update(finalisers.failed)
    missing = set(expected) - complete - set(failed)
    if missing:
        raise RunFailed(f"{len(missing)} shard(s) came back with rows missing, e.g. {'/'.join(min(missing))}; "
                        "rerun the same command to complete them")
    return Collected(received, finalisers.counts, failed, cell_refs)
