"""SIGKILL of `semclip-batch run` mid-run: nothing of its private Ray survives, and a rerun ends as an
uninterrupted run does (README "Architecture": Done markers and resume).

The killed and resumed runs are the CLI as a subprocess in its own session with its own private Ray; only the
uninterrupted baseline runs the same command in this process on the session's shared Ray. Helpers are shared with
benchmarks/chaos.py, which holds them (see there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

GONE_WITHIN_S = 15.0


def _load_chaos():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"
    spec = importlib.util.spec_from_file_location("semclip_chaos", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


@pytest.fixture(scope="module")
def kill_lot(tmp_path_factory, ray_cluster):
    """28 frames, shards of 4, model batches of 2 (two parts per shard), and one uninterrupted baseline run: the
    same ``run`` command in this process, on the session's shared Ray (a subprocess would start a private Ray of
    its own first, ~30 s more; the kills below run the CLI as a subprocess on its private Ray)."""
    from click.testing import CliRunner

    from semclip_batch.cli import main

    work = tmp_path_factory.mktemp("kill")
    spec = chaos.RunSpec(manifest=chaos.make_lot(work / "lot", 28, seed=5), shard_size=4, batch_size=2)
    baseline = work / "baseline"
    result = CliRunner().invoke(main, chaos.cli_args(spec, baseline)[1:])
    assert result.exit_code == 0, result.output[-3000:]
    assert len(chaos.read_predictions(baseline)) == 28
    return work, spec, baseline


def _assert_rays_own_warnings_stay_off_the_terminal(text: str) -> None:
    """A CLI run (no -v) on its private Ray: Ray's Python warnings are not on stderr, nor its core worker's native
    lines (Ray Data's actors always have constructor arguments in the object store)."""
    assert "Token authentication" not in text and "Progress bars disabled" not in text, text[-2000:]
    assert "core_worker" not in text and "constructor arguments" not in text, text[-2000:]


def _assert_killed_mid_run(kill, shards: int, log: Path) -> None:
    assert not kill.exited_first, f"the run ended before the {kill.moment} kill:\n{log.read_text()[-2000:]}"
    assert kill.markers_at_kill < shards, kill
    left = "\n".join(f"  {p.pid} {p.cmdline[:120]}" for p in kill.left)
    assert kill.gone_after_s is not None, f"{kill.moment}: still alive {GONE_WITHIN_S:.0f} s after SIGKILL:\n{left}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_shard_and_while_finalising_then_resume(kill_lot):
    """Kill 1: the whole process group, mid-shard (a part written, its shard not done). Kill 2, during the rerun
    (chained to keep this file short, and a resume of a resume is worth covering): the driver alone, while a
    shard is being finalised (its Zarr group or Parquet file made, its marker not yet) (Ray's own fate-sharing leaves the raylet's
    agents alive ~60 s there; the private-Ray watchdog must not). After each kill, no process of that run's Ray
    may be left after 15 s. A third run completes and must equal the uninterrupted baseline, with no orphaned
    Parquet file or Zarr node."""
    work, spec, baseline = kill_lot
    out, log = work / "out", work / "killed.log"
    shards = chaos.expected_shards(spec.manifest, spec.shard_size)

    first = chaos.kill_at(spec, out, "first_part", log, group=True, gone_limit_s=GONE_WITHIN_S)
    _assert_killed_mid_run(first, shards, log)
    assert first.hit and first.parts_at_kill >= 1, first
    second = chaos.kill_at(spec, out, "finalising", log, group=False, gone_limit_s=GONE_WITHIN_S)
    _assert_killed_mid_run(second, shards, log)
    for k in (first, second):  # shown with -s; "hit" False for finalising: the fallback (half the shards) fired
        print(f"{k.moment}: killed at {k.killed_at_s} s (hit={k.hit}), parts/markers {k.parts_at_kill}/"
              f"{k.markers_at_kill} of {shards}, all gone after {k.gone_after_s} s")

    final = work / "final.log"  # the completing run's own log: Ray's warnings stay off it
    assert chaos.run_cli(spec, out, final) == 0, final.read_text()[-3000:]
    _assert_rays_own_warnings_stay_off_the_terminal(final.read_text())
    last = chaos.attempt_records(out)[-1]
    assert last["status"] == "complete", last
    assert last["shards"]["skipped"] >= second.markers_at_kill and last["shards"]["run"] >= 1, last["shards"]
    assert chaos.compare(baseline, out) == []
    assert chaos.orphans(out) == []
    assert chaos.orphans(baseline) == []


# A stand-in driver without Ray: it starts a watchdog, then, tagged as ray.init would be, a process that starts
# a child with a clean environment (as the raylet's agents end up), and, untagged, a child of its own.
FAKE_DRIVER = """
import json, os, subprocess, sys, time
from semclip_batch.pipeline.ray_watchdog import start_watchdog, tagged_environment
token = sys.argv[1]
dog = start_watchdog(token)
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
parent = [sys.executable, "-c", "import os, subprocess, sys, time; "
          "c = subprocess.Popen(sys.argv[1:], env={'PATH': os.environ.get('PATH', '')}); time.sleep(120)"]
with tagged_environment(token):
    tagged = subprocess.Popen(parent + sleeper)
untagged = subprocess.Popen(sleeper)
dog.nudge()
print(json.dumps({"watchdog": dog.process.pid, "tagged": tagged.pid, "untagged": untagged.pid}), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.timeout(60)
def test_watchdog_kills_exactly_its_tagged_tree():
    """SIGKILL of a driver: its watchdog kills the tagged process and the child that lost the tag, and leaves
    alone the driver's untagged child and an unrelated process started meanwhile (same user, later start)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER, "feedc0de" * 4], stdout=subprocess.PIPE,
                              env=env, start_new_session=True)
    pids = json.loads(driver.stdout.readline())
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # after the watchdog
    spared = [bystander.pid, pids["untagged"]]
    try:
        deadline = time.monotonic() + 10
        while not chaos.descendants(pids["tagged"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = chaos.descendants(pids["tagged"])[0].pid
        time.sleep(0.6)  # two looks at the process table (every 0.25 s): the grandchild is known now
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        doomed = [pids["tagged"], grandchild, pids["watchdog"]]
        deadline = time.monotonic() + 5
        while any(map(_alive, doomed)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, doomed)), [p for p in doomed if _alive(p)]
        assert all(map(_alive, spared))
    finally:
        for pid in spared:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        bystander.wait()
