"""Which Ray the pipeline runs on: a private local one unless an address is given (README "Architecture").

A private local Ray is tagged and watched (:mod:`semclip_batch.pipeline.ray_watchdog`) so that none of its processes
outlives the driver, however the driver ends.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

from semclip_batch.errors import ConfigError, OutputError, shorten
from semclip_batch.pipeline.native_stderr import native_stderr_to
from semclip_batch.pipeline.ray_watchdog import Watchdog, start_watchdog, tagged_environment

log = logging.getLogger(__name__)
NATIVE_LOG = "semclip-driver-native.err"  # the driver's native stderr while a private Ray runs quietly
# Ray kills idle workers above one per CPU after 1 s; the pipeline's stages (plan read, decode, write, finalise)
# take fractions of a CPU, so their workers idle between blocks and would be killed and started again (each start
# imports torch: seconds of CPU). Keep a few warm.
LOCAL_SYSTEM_CONFIG = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 60_000}


@dataclass(frozen=True)
class ClusterShape:
    cpus: float
    gpus: float
    nodes: int
    private: bool = False  # a local Ray this run started: it never grows, so what it lacks never comes


@contextmanager
def ray_session(address: str | None = None) -> Iterator[ClusterShape]:
    """Attach to ``address`` (or RAY_ADDRESS), else start a private local Ray; shut down only what we started.

    An already initialised Ray in this process (a test's shared cluster, a job's driver) is used as it is. A
    private Ray is watched: none of its processes outlives this process by more than about a second.
    """
    import ray

    started = private = False
    watchdog: Watchdog | None = None
    quiet = ExitStack()
    try:
        if not ray.is_initialized():
            target = address or os.environ.get("RAY_ADDRESS") or None
            try:
                if target and target != "local":
                    ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
                else:
                    private = True
                    token = secrets.token_hex(16)
                    watchdog = start_watchdog(token)
                    # Ray's own warnings (e.g. that it turned token auth on) go to its session logs, and to the
                    # terminal only with -v
                    with tagged_environment(token):
                        ray.init(address="local", include_dashboard=False, logging_level=ray_log_level(),
                                 log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
                    if watchdog is not None:
                        watchdog.nudge()
                    if ray_log_level() > logging.WARNING:  # its core worker's lines too (README "Progress")
                        quiet.enter_context(native_stderr_to(os.path.join(session_logs_dir(), NATIVE_LOG)))
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot attach to Ray at {target or 'local'}: "
                                  f"{shorten(str(exc), 200)}") from None
            started = True
        try:
            yield replace(cluster_shape(), private=private)
        finally:
            if started:
                ray.shutdown()
    finally:
        quiet.close()
        if watchdog is not None:
            watchdog.release()


def session_logs_dir() -> str:
    """The running local Ray session's log folder (where its own processes log)."""
    from ray._private import worker  # no public accessor in Ray 2.60

    node = getattr(worker, "_global_node", None)
    return str(node.get_logs_dir_path()) if node is not None else os.path.join(os.sep, "tmp", "ray")


def ray_log_level() -> int:
    """Ray's own log level on the terminal: its warnings only when the user asked for more (-v)."""
    return logging.WARNING if logging.getLogger().getEffectiveLevel() <= logging.INFO else logging.ERROR


def cluster_shape() -> ClusterShape:
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterShape(cpus=float(res.get("CPU", 0.0)), gpus=float(res.get("GPU", 0.0)), nodes=nodes)


def placeable_actors(num_gpus: float, gpus: float) -> int:
    """How many actors of ``num_gpus`` each ``gpus`` whole devices hold: a fraction cannot span two devices (3 x 0.6
    fit on 3 GPUs, not on 2), more than one takes whole devices."""
    if num_gpus <= 1:
        return math.floor(gpus + 1e-9) * math.floor(1 / num_gpus + 1e-9)
    return math.floor(gpus / math.ceil(num_gpus - 1e-9) + 1e-9)


def check_accelerators(num_gpus: float, actors: int, shape: ClusterShape) -> None:
    """Model actors that ask for more GPUs than the Ray can place would wait for them without a word: refused on a
    private local Ray (it never grows), logged on an attached cluster (an autoscaler may add them)."""
    if num_gpus <= 0:
        return
    placeable = placeable_actors(num_gpus, shape.gpus)
    if actors <= placeable:
        return
    what = f"--actors {actors} x --num-gpus {num_gpus:g}: the Ray cluster's {shape.gpus:g} GPU(s) hold {placeable} such actor(s)"
    if shape.private:
        raise ConfigError(f"{what} on this machine: give fewer --actors or --num-gpus (0: score on CPU)")
    log.warning("%s now: the run waits until they are added", what)


def check_output_reachable(out: str, shape: ClusterShape) -> None:
    """A local OUT on a multi-node cluster would scatter outputs over nodes: refuse it."""
    from semclip_batch.io.storage import protocol_of

    if shape.nodes > 1 and protocol_of(out) in ("file", "local"):
        raise OutputError(f"--out {out} is a local path but the Ray cluster has {shape.nodes} nodes; "
                          "give a shared location (s3://..., a network filesystem URL)")
