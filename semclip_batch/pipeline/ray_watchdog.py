"""The watchdog of a private local Ray: none of its processes outlives the driver (SIGKILL included).

A private local Ray must not outlive its driver, however the driver ends (SIGKILL included). Ray alone does
not guarantee that (measured with Ray 2.60 on Linux): it ties gcs_server, raylet, monitor, dashboard and log
monitor to the driver with PR_SET_PDEATHSIG, and workers exit a few seconds after their raylet (one still
starting lived 15-30 s), but the dashboard agent and runtime-env agent (children of the raylet) then block up
to 60 s publishing "raylet died" to the dead GCS before they exit.

So a private start is tagged and watched:

- a random token is put into the environment of ``ray.init`` (``SEMCLIP_PRIVATE_RAY=<token>``); every
  process of that Ray inherits it: gcs_server, raylet, monitors, and the workers the raylet starts later;
- a watchdog process, started before ``ray.init`` in its own session (a SIGKILL of the driver's process
  group does not reach it), holds the read end of a pipe whose only write end is the driver's. While the
  pipe is open it records, four times a second, the processes that carry the token and their descendants,
  by pid and start time (the agents overwrite their environment with their process title, so they are
  known as children of the tagged raylet). End of file means the driver is gone or has left the session:
  the watchdog SIGKILLs everything recorded or tagged until nothing is left, then exits.

Only processes proven to belong to this Ray are signalled: they carry this run's 128-bit token, or were seen
as descendants of one that did, and still have the start time seen then. Another user's or another test's
Ray never qualifies. A signal goes through a pidfd opened *before* that check, so a recycled pid can never
redirect it to another process. A cluster given by ``--address`` / RAY_ADDRESS, or a Ray already initialised
in this process, is never tagged, watched or stopped.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_RAY_ENV = "SEMCLIP_PRIVATE_RAY"
SWEEP_LIMIT_S = 30.0  # the watchdog gives up after this long (Ray's own fate-sharing still ends the rest)
SWEEP_PAUSE_S = 0.2
OBSERVE_EVERY_S = 0.25
WATCHDOG_EXIT_WAIT_S = 10.0
_WATCHDOG_CODE = "import sys; from semclip_batch.pipeline.ray_watchdog import watch; sys.exit(watch(sys.argv[1:]))"

_OPEN_WATCH_FDS: set[int] = set()  # write ends held by this process, closed in forked children


# --- the driver's side of the watchdog ----------------------------------------------------------------------


@contextmanager
def tagged_environment(token: str) -> Iterator[None]:
    """Put ``PRIVATE_RAY_ENV=token`` into this process's environment while the block runs (``ray.init``).

    Ray copies the environment into the processes it starts, and the raylet into its workers, so the tag
    stays on every process of that Ray after it is removed here.
    """
    previous = os.environ.get(PRIVATE_RAY_ENV)
    os.environ[PRIVATE_RAY_ENV] = token
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PRIVATE_RAY_ENV, None)
        else:
            os.environ[PRIVATE_RAY_ENV] = previous


@dataclass
class Watchdog:
    """A running watchdog process and the write end of its pipe (held by this process only)."""

    process: subprocess.Popen[bytes]
    write_fd: int

    def nudge(self) -> None:
        """Ask for a look at the process table now (Ray has just started its processes)."""
        if self.process.poll() is not None:
            log.warning("the Ray watchdog exited early (code %s); the private Ray is left to Ray's own "
                        "fate-sharing", self.process.returncode)
            return
        with suppress(OSError):
            os.write(self.write_fd, b".")

    def release(self) -> None:
        """Close the pipe (the watchdog then removes what is left of the private Ray) and wait for it briefly."""
        _close_watch_fd(self.write_fd)
        try:
            self.process.wait(timeout=WATCHDOG_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            log.warning("Ray watchdog %s still sweeping after %.0f s; leaving it to finish", self.process.pid,
                        WATCHDOG_EXIT_WAIT_S)


def watch_supported() -> bool:
    """Tagging needs Linux's /proc (environments of other processes) and signals."""
    return sys.platform.startswith("linux") and Path("/proc/self/environ").exists()


def start_watchdog(token: str) -> Watchdog | None:
    """Start the watchdog for ``token`` in a new session; None where /proc is missing (Ray alone is left)."""
    if not watch_supported():
        log.debug("no /proc: the private Ray is left to Ray's own fate-sharing")
        return None
    read_fd, write_fd = os.pipe()  # both non-inheritable: no process Ray starts holds the write end
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding semclip_batch/
    env = {k: v for k, v in os.environ.items() if k != PRIVATE_RAY_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    try:
        process = subprocess.Popen([sys.executable, "-c", _WATCHDOG_CODE, token], stdin=read_fd,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                   start_new_session=True, close_fds=True)
    except OSError as exc:
        os.close(write_fd)
        log.warning("could not start the Ray watchdog (%s); the private Ray is left to Ray's own fate-sharing", exc)
        return None
    finally:
        os.close(read_fd)
    _OPEN_WATCH_FDS.add(write_fd)
    return Watchdog(process=process, write_fd=write_fd)


def _close_watch_fd(fd: int) -> None:
    if fd in _OPEN_WATCH_FDS:
        _OPEN_WATCH_FDS.discard(fd)
        with suppress(OSError):
            os.close(fd)


def _close_watch_fds_in_child() -> None:
    """A forked child must not hold a write end: it would hide the driver's death from the watchdog."""
    for fd in list(_OPEN_WATCH_FDS):
        _close_watch_fd(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_watch_fds_in_child)


# --- the watchdog process -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcId:
    """A process as the kernel names it for life: pid plus start time (clock ticks since boot)."""

    pid: int
    start: int


def watch(argv: list[str]) -> int:
    """Watchdog entry point, ``argv = [token]``.

    Until end of file on stdin, every ``OBSERVE_EVERY_S`` (and whenever the driver writes a byte), record the
    processes that carry the token and all their descendants: the raylet's agents overwrite their environment
    with their process title, so they are known as children of the (tagged) raylet, by pid and start time.
    Then sweep: SIGKILL everything recorded or tagged, until nothing is left.
    """
    token = argv[0]
    born = start_time(os.getpid()) or 0  # the private Ray starts after its watchdog: older processes are not ours
    known: set[ProcId] = set()
    while True:
        readable, _, _ = select.select([0], [], [], OBSERVE_EVERY_S)
        if readable:
            try:
                if not os.read(0, 4096):
                    break
            except OSError:
                break
        known = observe(token, known, born)
    sweep(token, known, born)
    return 0


def proc_table() -> dict[int, tuple[int, int]]:
    """``pid -> (ppid, start)`` for every living (not zombie) process of this user except this one."""
    me, uid = os.getpid(), os.getuid()
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with suppress(OSError, ValueError, IndexError):
            if entry.stat().st_uid == uid:
                stat = Path(entry.path, "stat").read_text()
                if _state(stat) not in ("Z", "X"):
                    table[int(entry.name)] = _ppid_start(stat)
    return table


def _fields(stat: str) -> list[str]:
    """``/proc/<pid>/stat`` from field 3 (state) on; field 2, the name, may hold spaces and parentheses."""
    return stat[stat.rindex(")") + 2:].split()


def _state(stat: str) -> str:
    return _fields(stat)[0]


def _ppid_start(stat: str) -> tuple[int, int]:
    fields = _fields(stat)
    return int(fields[1]), int(fields[19])


def observe(token: str, known: set[ProcId], born: int = 0) -> set[ProcId]:
    """Living processes started at or after ``born`` (clock ticks since boot) that carry ``token``, were
    ``known`` already, or descend from one of those.

    Processes that have ended drop out; a pid reused by a newcomer has another start time.
    """
    table = {pid: row for pid, row in proc_table().items() if row[1] >= born}
    alive = {ProcId(pid, start) for pid, (_, start) in table.items()}
    result = {p for p in alive if p in known or is_tagged(p.pid, token)}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = [p.pid for p in result]
    while todo:
        for child in children.get(todo.pop(), []):
            cid = ProcId(child, table[child][1])
            if cid not in result:
                result.add(cid)
                todo.append(child)
    return result


def sweep(token: str, known: set[ProcId], born: int = 0, limit_s: float = SWEEP_LIMIT_S) -> int:
    """SIGKILL what ``known`` names and whatever carries ``token`` (with descendants), until two rounds in a row
    find nothing. Returns the number of signals delivered.

    The first round takes the raylet, so no new worker appears after it; later rounds catch what it started
    while the first round ran.
    """
    killed = 0
    quiet_rounds = 0
    deadline = time.monotonic() + limit_s
    while quiet_rounds < 2 and time.monotonic() < deadline:
        known = observe(token, known, born)
        hits = sum(kill_verified(p, token) for p in known)
        killed += hits
        quiet_rounds = 0 if hits else quiet_rounds + 1
        time.sleep(SWEEP_PAUSE_S)
    return killed


def is_tagged(pid: int, token: str) -> bool:
    """Whether ``pid``'s environment holds ``PRIVATE_RAY_ENV=token`` (False if unreadable or gone)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{PRIVATE_RAY_ENV}={token}".encode() in environ.split(b"\0")


def start_time(pid: int) -> int | None:
    """``pid``'s start time in clock ticks since boot, or None when it is gone."""
    try:
        return _ppid_start(Path(f"/proc/{pid}/stat").read_text())[1]
    except (OSError, ValueError, IndexError):
        return None


def kill_verified(p: ProcId, token: str) -> bool:
    """SIGKILL ``p`` if it is still the process recorded (same start time) or carries ``token``; True if a
    signal was delivered.

    The pidfd is opened before the check: if the process ends and its pid is reused in between, the check
    fails (another start time, no token) or the signal goes to the dead process the pidfd names, never to
    the newcomer.
    """
    try:
        pidfd = os.pidfd_open(p.pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        return _kill_without_pidfd(p, token)
    try:
        if start_time(p.pid) != p.start and not is_tagged(p.pid, token):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _kill_without_pidfd(p: ProcId, token: str) -> bool:
    """Kernels before 5.3: check, then signal at once (a pid recycled in between is the only, tiny, gap)."""
    if start_time(p.pid) != p.start and not is_tagged(p.pid, token):
        return False
    try:
        os.kill(p.pid, signal.SIGKILL)
    except OSError:
        return False
    return True
