"""Kill `semclip-batch run` with SIGKILL at chosen moments, then check what survives and how the rerun ends.

    .venv/bin/python benchmarks/chaos.py                      # 5 moments on a 70-image synthetic lot
    .venv/bin/python benchmarks/chaos.py --kill driver        # SIGKILL the driver alone (as the OOM killer does)
    .venv/bin/python benchmarks/chaos.py --images 140 --seed 3 --moments first_part,first_marker

For each moment: a fresh OUT, the CLI started in its own session (so its process group is the CLI plus
everything that inherits it), polled until the moment, its descendants listed, SIGKILL of the whole group (or
of the driver alone), then the seconds until no process of that run's Ray is left (descendants seen at the
kill, anything whose command line names its Ray session folder, anything whose environment carries its
private-Ray token), then a
rerun to completion compared with one uninterrupted baseline run (same (image_id, status) rows each once,
numbers within 1e-4, masks within ±1 grey level) and a search for orphans (Parquet files or Zarr nodes no row
refers to, leftover temporary files).

This file is also the one home of these helpers: tests/test_kill.py imports it by path. They live here, not in
the package (they are test tooling, not a feature) and not in tests/ (a runnable benchmark must not import a
pytest module, whose import pulls in fixtures and pytest itself).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # chaos_procs / chaos_compare beside this file

from chaos_compare import attempt_records, compare, files_under, orphans, read_predictions
from chaos_procs import PRIVATE_RAY_ENV, Proc, descendants, snapshot, wait_gone

CLI = str(Path(sys.executable).with_name("semclip-batch"))
POLL_S = {"model_load": 0.1}  # seconds between checks; listing every process costs more than a folder walk



def make_lot(folder: Path, images: int, seed: int) -> Path:
    """A synthetic data set of about ``images`` frames (2 lots x 7 classes), small mixed sizes; its manifest."""
    from semclip_batch.synth.generate import SynthConfig, synth

    per_class = max(1, round(images / 14))
    synth(str(folder), SynthConfig(seed=seed, lots=2, per_class=per_class, sizes=((128, 128), (96, 160))))
    return folder / "manifest.csv"


def expected_shards(manifest: Path, shard_size: int) -> int:
    """How many work shards the plan has (lot-local, fixed size)."""
    lots = pd.read_csv(manifest, dtype=str)["lot_id"].value_counts()
    return int(sum(math.ceil(n / shard_size) for n in lots))


def run_env() -> dict[str, str]:
    """The CLI's environment: never RAY_ADDRESS (each run starts its own private Ray)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", PRIVATE_RAY_ENV)}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return env


@dataclass(frozen=True)
class RunSpec:
    """What every run of one comparison shares. ``batch_size`` below ``shard_size`` gives several parts per
    shard (the writer gets the model's batches), so a kill can land between two parts of one shard."""

    manifest: Path
    shard_size: int
    batch_size: int


def cli_args(spec: RunSpec, out: Path) -> list[str]:
    """The command line of one run: the CLI, then its arguments."""
    return [CLI, "run", str(spec.manifest), "--out", str(out), "--backbone", "semclip-tiny", "--pretrained", "none",
            "--shard-size", str(spec.shard_size), "--batch-size", str(spec.batch_size)]


def start_cli(spec: RunSpec, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """`semclip-batch run` in a new session: its pid is also its process group id."""
    cmd = cli_args(spec, out)
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=run_env(), start_new_session=True)


def run_cli(spec: RunSpec, out: Path, log: Path, timeout_s: float = 240) -> int:
    """One run to its end; the exit status."""
    proc = start_cli(spec, out, log)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


# --- moments: predicates on OUT (and the CLI's process tree) ------------------------------------------------


@dataclass(frozen=True)
class Watch:
    """What a moment looks at: one attempt's OUT and process, and what was there before it started."""

    out: Path
    pid: int
    shards: int
    since: float  # wall-clock start of the attempt: older files are a killed attempt's leftovers
    markers_before: int


Moment = Callable[[Watch], bool]


def _newer(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def parts(out: Path) -> list[Path]:
    """Writers' parts (``_state/parts/<lot>/<shard>/<part>.parquet``) not yet finalised."""
    return files_under(out / "_state" / "parts", ".parquet")


def markers(out: Path) -> set[tuple[str, str]]:
    """(lot_id, shard) of every done marker written so far."""
    return {(p.parent.name, p.stem) for p in files_under(out / "_state" / "done", ".json")}


def model_loading(w: Watch) -> bool:
    """The model actor exists (it is loading SEM-CLIP) and this attempt has written nothing yet."""
    fresh = [p for p in parts(w.out) if _newer(p, w.since)]
    return not fresh and any("Predictor" in p.cmdline for p in descendants(w.pid))


def first_part(w: Watch) -> bool:
    """Mid-shard: this attempt wrote a part whose shard has no done marker yet."""
    done = markers(w.out)
    return any(_newer(p, w.since) and (p.parent.parent.name, p.parent.name) not in done for p in parts(w.out))


def finalising(w: Watch) -> bool:
    """A finaliser of this attempt has begun a shard (its Zarr group or final Parquet file exists) whose done
    marker is not written yet."""
    done = markers(w.out)
    masks = w.out / "masks.zarr"
    for doc in files_under(masks, "zarr.json"):
        rel = doc.parent.relative_to(masks).parts  # <lot>/<shard>
        if len(rel) == 2 and _newer(doc, w.since) and tuple(rel) not in done:
            return True
    return any(_newer(p, w.since) and (p.parent.name.split("=", 1)[1], p.stem) not in done
               for p in files_under(w.out / "predictions", ".parquet"))


def first_marker(w: Watch) -> bool:
    """This attempt's first done marker exists."""
    return len(markers(w.out)) > w.markers_before


def half_done(w: Watch) -> bool:
    """Half of this attempt's shards are done (the fallback when a short moment was not caught by polling)."""
    return len(markers(w.out)) >= w.markers_before + max(1, (w.shards - w.markers_before) // 2)


def all_markers(w: Watch) -> bool:
    """Every shard is done: the driver is shutting Ray down and writing the final run record."""
    return len(markers(w.out)) >= w.shards


MOMENTS: dict[str, Moment] = {"model_load": model_loading, "first_part": first_part, "finalising": finalising,
                              "first_marker": first_marker, "final_record": all_markers}
FALLBACKS: dict[str, Moment] = {"finalising": half_done}


@dataclass
class KillReport:
    moment: str
    hit: bool  # the moment itself was seen (False: the fallback fired, or the run ended first)
    exited_first: bool  # the run ended before anything fired
    killed_at_s: float
    parts_at_kill: int
    markers_at_kill: int
    survivors_1s: int
    gone_after_s: float | None  # None: survivors were left after the limit
    left: list[Proc] = field(default_factory=list)


def kill_at(spec: RunSpec, out: Path, moment: str, log: Path, *, group: bool = True, limit_s: float = 180,
            gone_limit_s: float = 15) -> KillReport:
    """Start a run, SIGKILL it when ``moment`` (or its fallback) is reached, and watch its Ray disappear.

    ``group``: kill the whole process group (as a terminal's kill -9 -PGID or a job runner would); otherwise the
    driver alone (as the OOM killer would).
    """
    check, fallback = MOMENTS[moment], FALLBACKS.get(moment)
    shards = expected_shards(spec.manifest, spec.shard_size)
    since, before = time.time() - 0.05, len(markers(out))
    proc = start_cli(spec, out, log)
    watch = Watch(out=out, pid=proc.pid, shards=shards, since=since, markers_before=before)
    t0 = time.monotonic()
    hit = fired = False
    while proc.poll() is None and time.monotonic() - t0 < limit_s:
        hit = check(watch)
        fired = hit or (fallback is not None and fallback(watch))
        if fired:
            break
        time.sleep(POLL_S.get(moment, 0.01))
    killed_at = round(time.monotonic() - t0, 2)
    n_parts, n_markers = len(parts(out)), len(markers(out))
    if proc.poll() is not None:
        return KillReport(moment, False, True, killed_at, n_parts, n_markers, 0, 0.0)
    snap = snapshot(proc.pid)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, at_1s, left = wait_gone(snap, gone_limit_s)
    return KillReport(moment, hit, False, killed_at, n_parts, n_markers, at_1s, gone, left)


# --- results -------------------------------------------------------------------------------------------------


@dataclass
class ChaosRow:
    kill: KillReport
    rerun_rc: int
    rerun_sent: int | None
    rows: int
    equal: bool
    orphans: list[str]
    problems: list[str]


def chaos_moment(work: Path, spec: RunSpec, baseline: Path, moment: str, group: bool = True) -> ChaosRow:
    """Kill at ``moment``, rerun to completion, compare with the baseline."""
    out, log = work / f"out-{moment}", work / f"{moment}.log"
    kill = kill_at(spec, out, moment, log, group=group)
    rc = run_cli(spec, out, log)
    recs = attempt_records(out)
    sent = recs[-1].get("rows", {}).get("sent_to_model") if recs else None
    problems = compare(baseline, out) if rc == 0 else [f"rerun exited {rc}; see {log}"]
    return ChaosRow(kill=kill, rerun_rc=rc, rerun_sent=sent, rows=len(read_predictions(out)),
                    equal=rc == 0 and not problems, orphans=orphans(out), problems=problems)


def print_table(rows: list[ChaosRow], shards: int) -> None:
    head = ("moment", "killed at (s)", "parts/markers at kill", "left after 1 s", "all gone after (s)",
            "rerun sent", "rows", "equal to baseline", "orphans")
    lines = [head]
    for r in rows:
        k = r.kill
        at = f"{k.killed_at_s}" + ("" if k.hit else (" (ran to end)" if k.exited_first else " (fallback)"))
        gone = "-" if k.exited_first else (f"{k.gone_after_s}" if k.gone_after_s is not None else ">15")
        lines.append((k.moment, at, f"{k.parts_at_kill}/{k.markers_at_kill} of {shards}", str(k.survivors_1s), gone,
                      str(r.rerun_sent), str(r.rows), "yes" if r.equal else "no", str(len(r.orphans))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for n, line in enumerate(lines):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        for text in r.problems + r.orphans + [f"survivor {p.pid}: {p.cmdline[:100]}" for p in r.kill.left]:
            print(f"  {r.kill.moment}: {text}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=70, help="about this many frames (2 lots x 7 classes)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4, help="below --shard-size: several parts per shard")
    ap.add_argument("--moments", default=",".join(MOMENTS), help=f"comma-separated, from {', '.join(MOMENTS)}")
    ap.add_argument("--kill", choices=("group", "driver"), default="group",
                    help="SIGKILL the CLI's whole process group, or the driver process alone")
    ap.add_argument("--work", default=None, help="working folder, kept (default: a temporary one)")
    args = ap.parse_args(argv)
    moments = [m for m in args.moments.split(",") if m]
    if unknown := set(moments) - set(MOMENTS):
        ap.error(f"unknown moments: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        spec = RunSpec(manifest=make_lot(work / "lot", args.images, args.seed), shard_size=args.shard_size,
                       batch_size=args.batch_size)
        baseline = work / "baseline"
        rc = run_cli(spec, baseline, work / "baseline.log")
        if rc != 0:
            print(f"baseline run failed ({rc}); see {work / 'baseline.log'}")
            return 1
        shards = expected_shards(spec.manifest, spec.shard_size)
        print(f"{len(read_predictions(baseline))} images, {shards} shards of {spec.shard_size}, batch size "
              f"{spec.batch_size}, SIGKILL to the {args.kill}; baseline run {time.monotonic() - t0:.0f} s")
        rows = [chaos_moment(work, spec, baseline, m, group=args.kill == "group") for m in moments]
        print_table(rows, shards)
        print(f"total {time.monotonic() - t0:.0f} s")
        ok = all(r.equal and not r.orphans and r.kill.gone_after_s is not None for r in rows)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
