"""Processes of a Ray run as Linux's /proc shows them (no psutil): snapshots, survivors after a kill.
Used by benchmarks/chaos.py and tests/test_kill.py."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

PRIVATE_RAY_ENV = "SEMCLIP_PRIVATE_RAY"  # semclip_batch.pipeline.ray_watchdog tags every process of a private Ray with it
SESSION_DIR = re.compile(r"(/\S*?/session_\d{4}-[^/\s]+)")


@dataclass(frozen=True)
class Proc:
    """One process, identified by (pid, start time in clock ticks since boot) so a recycled pid never matches."""

    pid: int
    ppid: int
    start: int
    state: str
    cmdline: str


def read_proc(pid: int) -> Proc | None:
    """The process ``pid`` as /proc shows it now, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces or parens
    return Proc(pid=pid, ppid=int(rest[1]), start=int(rest[19]), state=rest[0],
                cmdline=raw.replace(b"\0", b" ").decode(errors="replace").strip())


def all_procs() -> list[Proc]:
    """Every process that is alive and not a zombie."""
    procs = (read_proc(int(e.name)) for e in os.scandir("/proc") if e.name.isdigit())
    return [p for p in procs if p is not None and p.state not in ("Z", "X")]


def descendants(pid: int) -> list[Proc]:
    """``pid``'s living descendants (children, their children, ...)."""
    procs = all_procs()
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def environ_value(pid: int, name: str) -> str | None:
    """One variable of ``pid``'s environment, or None (unset, unreadable, gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{name}=".encode()
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


@dataclass
class RaySnapshot:
    """What identifies one run's Ray: the processes seen at the kill, its session folder and its token."""

    procs: list[Proc]
    session_dir: str | None
    token: str | None

    def belongs(self, p: Proc) -> bool:
        if any(p.pid == q.pid and p.start == q.start for q in self.procs):
            return True
        if self.session_dir and self.session_dir in p.cmdline:
            return True
        return bool(self.token) and environ_value(p.pid, PRIVATE_RAY_ENV) == self.token


def snapshot(pid: int) -> RaySnapshot:
    """The descendants of the CLI process ``pid``, with the Ray session folder and token they reveal."""
    procs = descendants(pid)
    found = (SESSION_DIR.search(p.cmdline) for p in procs)
    session_dir = next((m.group(1) for m in found if m), None)
    token = next((t for t in (environ_value(p.pid, PRIVATE_RAY_ENV) for p in procs) if t), None)
    return RaySnapshot(procs=procs, session_dir=session_dir, token=token)


def survivors(snap: RaySnapshot) -> list[Proc]:
    """Processes of that Ray still alive (zombies not counted: they hold no resources but a pid)."""
    return [p for p in all_procs() if p.pid != os.getpid() and snap.belongs(p)]


def wait_gone(snap: RaySnapshot, limit_s: float, mark_s: float = 1.0) -> tuple[float | None, int, list[Proc]]:
    """Poll from now: seconds until no survivor is left (None if some remain after ``limit_s``), how many were
    left ``mark_s`` seconds in, and the last survivors seen."""
    t0 = time.monotonic()
    at_mark: int | None = None
    while True:
        left = survivors(snap)
        elapsed = time.monotonic() - t0
        if at_mark is None and (elapsed >= mark_s or not left):
            at_mark = len(left)
        if not left:
            return round(elapsed, 2), at_mark or 0, []
        if elapsed > limit_s:
            return None, at_mark or 0, left
        time.sleep(0.05)


# --- runs ----------------------------------------------------------------------------------------------------
