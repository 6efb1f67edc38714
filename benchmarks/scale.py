"""Archive scale: planning a million rows, stored objects per 1,000 frames, DuckDB over predictions, and memory
that does not grow with the number of frames.

    .venv/bin/python benchmarks/scale.py                           # every phase (about 15 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --phases plan --rows 1000000,2000000
    .venv/bin/python benchmarks/scale.py --phases memory --frames 1000,10000

Every run is `semclip-batch run` as a user starts it (a subprocess with its own private Ray; semclip-tiny with
seeded random weights, whose speed does not depend on the weights; local OUT), watched from outside:

- plan: a manifest of ``--rows`` local paths that do not exist (every row a quick read_error). Seconds from
  launch until the attempt record appears (manifest read and validated, model loaded, run id), until the plan
  is stored (``_state/run.json``; the plan is stored while Ray starts), until the first shard's done marker,
  and the driver's peak RSS over that time; the run is then killed (its private Ray goes with it).
- objects: one lot of ``--object-frames`` synthetic frames of one size (256x256) at shard size 256: objects and
  bytes stored under predictions/ + masks.zarr/, per 1,000 frames.
- query: a full run over ``--query-rows`` missing files, then the seconds DuckDB takes for a group-by over
  predictions/ (hive partitioning, lot_id as VARCHAR), best of 3.
- memory: the same 256x256 frames (each file listed several times, as distinct defects) for each ``--frames``:
  the peak of the memory of the driver and all its descendants (Ray's GCS, raylet, workers), each process's PSS
  summed, so the object store's shared memory is counted once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

CLI = str(Path(sys.executable).with_name("semclip-batch"))
TINY = ["--backbone", "semclip-tiny", "--pretrained", "none"]


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return env


def missing_files_manifest(path: Path, rows: int, lots: int) -> Path:
    """``rows`` rows of local paths that do not exist, spread over ``lots`` lots, 25 wafers each."""
    k = pa.array(range(rows), pa.int64())
    lot = pc.cast(pc.divide(k, max(1, rows // lots)), pa.string())
    table = pa.table({
        "uri": pc.binary_join_element_wise("/nonexistent/semclip-scale/img", pc.cast(k, pa.string()),
                                                   ".tif", ""),
        "lot_id": pc.binary_join_element_wise("LOT", lot, ""),
        "wafer_id": pc.cast(pc.bit_wise_and(k, 15), pa.string()),
        "die_x": pc.bit_wise_and(k, 31), "die_y": pc.bit_wise_and(pc.shift_right(k, 5), 31),
    })
    pacsv.write_csv(table, path)
    return path


def frames_manifest(folder: Path, frames: int, unique: int) -> Path:
    """``frames`` rows over ``unique`` synthetic 256x256 frames of one lot (a frame listed again is another
    defect of it, so every row has its own image_id)."""
    import pandas as pd

    from semclip_batch.synth.generate import SynthConfig, synth

    source = folder / "frames"
    if not (source / "manifest.csv").exists():
        synth(str(source), SynthConfig(seed=11, lots=1, per_class=max(1, -(-unique // 7)), sizes=((256, 256),),
                                       formats=("png",), bits=(8,), banner_frac=0.0))
    base = pd.read_csv(source / "manifest.csv", dtype=str)[["uri", "lot_id", "wafer_id", "die_x", "die_y"]]
    base = base.head(unique)
    rows = pd.concat([base.assign(defect_id=str(k)) for k in range(-(-frames // len(base)))]).head(frames)
    rows["uri"] = [str(source / u) for u in rows["uri"]]
    rows["lot_id"] = "L1"
    path = folder / f"frames-{frames}.csv"
    rows.to_csv(path, index=False)
    return path


@dataclass
class Watch:
    """A CLI run watched from outside: peak driver RSS, peak PSS of the whole tree, when files appeared."""

    proc: subprocess.Popen[bytes]
    started: float
    driver_peak: int = 0
    tree_peak: int = 0
    seen: dict[str, float] = field(default_factory=dict)

    def sample(self, tree: bool) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            self.driver_peak = max(self.driver_peak, root.memory_info().rss)
            if tree:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        continue
                self.tree_peak = max(self.tree_peak, total)
        except psutil.Error:
            return


def start(manifest: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`semclip-batch run` into a fresh ``out``, in its own session."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [CLI, "run", str(manifest), "--out", str(out), *TINY, "--shard-size", "256", *extra]
    with log.open("ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=run_env(), start_new_session=True)


def watch(proc: subprocess.Popen[bytes], *, tree: bool, period: float, until: Callable[[Watch], bool] | None = None,
          limit_s: float = 3600) -> Watch:
    """Sample until the run ends, ``until(watch)`` is true, or ``limit_s`` passes."""
    w = Watch(proc=proc, started=time.monotonic())
    while proc.poll() is None and time.monotonic() - w.started < limit_s:
        w.sample(tree)
        if until is not None and until(w):
            break
        time.sleep(period)
    return w


def first_file(folder: Path, suffix: str) -> bool:
    for _, _, names in os.walk(folder):
        if any(n.endswith(suffix) for n in names):
            return True
    return False


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the private Ray's watchdog removes the rest


def phase_plan(work: Path, rows: int) -> dict[str, float]:
    manifest = missing_files_manifest(work / f"missing-{rows}.csv", rows, lots=max(1, rows // 10_000))
    out = work / f"plan-out-{rows}"
    proc = start(manifest, out, work / f"plan-{rows}.log")

    def progress(w: Watch) -> bool:
        now = time.monotonic() - w.started
        if "record" not in w.seen and first_file(out / "runs", ".json"):
            w.seen["record"] = now
        if "plan" not in w.seen and (out / "_state" / "run.json").exists():
            w.seen["plan"] = now
        if first_file(out / "_state" / "done", ".json"):
            w.seen["marker"] = now
            return True
        return False

    w = watch(proc, tree=False, period=0.1, until=progress, limit_s=600)
    kill(proc)
    record = json.loads(next((out / "runs").rglob("attempt-*.json")).read_text()) if (out / "runs").exists() else {}
    timings = record.get("timings_s", {})
    return {"rows": rows, "manifest_s": timings.get("manifest"), "run_id_s": timings.get("run_id"),
            "record_at_s": round(w.seen.get("record", float("nan")), 1),
            "plan_stored_at_s": round(w.seen.get("plan", float("nan")), 1),
            "first_marker_s": round(w.seen.get("marker", float("nan")), 1),
            "driver_peak_rss_gb": round(w.driver_peak / 2**30, 2)}


def stored(out: Path) -> tuple[int, int]:
    """Objects and bytes under predictions/ and masks.zarr/."""
    n = size = 0
    for d in ("predictions", "masks.zarr"):
        for folder, _, names in os.walk(out / d):
            for name in names:
                n += 1
                size += (Path(folder) / name).stat().st_size
    return n, size


def phase_objects(work: Path, frames: int) -> dict[str, float]:
    manifest = frames_manifest(work, frames, unique=frames)
    out = work / "objects-out"
    proc = start(manifest, out, work / "objects.log")
    watch(proc, tree=False, period=1.0)
    if proc.returncode != 0:
        raise SystemExit(f"objects run failed ({proc.returncode}); see {work / 'objects.log'}")
    n, size = stored(out)
    return {"frames": frames, "objects": n, "objects_per_1000": round(n * 1000 / frames, 1),
            "mb_per_1000": round(size * 1000 / frames / 2**20, 2)}


def phase_query(work: Path, rows: int) -> dict[str, float]:
    import duckdb

    manifest = missing_files_manifest(work / f"missing-{rows}.csv", rows, lots=max(1, rows // 10_000))
    out = work / "query-out"
    proc = start(manifest, out, work / "query.log")
    t0 = time.monotonic()
    watch(proc, tree=False, period=1.0)
    run_s = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"query run failed ({proc.returncode}); see {work / 'query.log'}")
    sql = (f"select lot_id, status, count(*) as n from read_parquet('{out}/predictions/*/*.parquet', "
           "hive_partitioning=true, hive_types={'lot_id': VARCHAR}) group by 1, 2 order by 1, 2")
    best, n = float("inf"), 0
    for _ in range(3):
        t = time.perf_counter()
        result = duckdb.connect().execute(sql).fetchall()
        best = min(best, time.perf_counter() - t)
        n = sum(r[2] for r in result)
    objects, _ = stored(out)
    return {"rows": rows, "rows_read": n, "run_s": round(run_s, 1), "duckdb_query_s": round(best, 3),
            "objects": objects}


def phase_memory(work: Path, frames: list[int], unique: int) -> list[dict[str, float]]:
    results = []
    for n in frames:
        manifest = frames_manifest(work, n, unique=min(unique, n))
        out = work / f"memory-out-{n}"
        proc = start(manifest, out, work / f"memory-{n}.log")
        t0 = time.monotonic()
        w = watch(proc, tree=True, period=1.0)
        if proc.returncode != 0:
            raise SystemExit(f"memory run failed ({proc.returncode}); see {work / f'memory-{n}.log'}")
        results.append({"frames": n, "run_s": round(time.monotonic() - t0, 1),
                        "peak_pss_gb": round(w.tree_peak / 2**30, 2), "driver_peak_rss_gb": round(w.driver_peak / 2**30, 2)})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="plan,objects,query,memory")
    ap.add_argument("--rows", default="250000,1000000", help="rows of the plan phase's manifests (the growth "
                    "between them projects 10 M)")
    ap.add_argument("--object-frames", type=int, default=1024)
    ap.add_argument("--query-rows", type=int, default=100_000)
    ap.add_argument("--frames", default="1000,10000", help="frame counts of the memory phase")
    ap.add_argument("--unique", type=int, default=1000, help="distinct frame files behind the memory phase")
    ap.add_argument("--work", default=None, help="working folder, kept (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    results: dict[str, object] = {"machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "plan" in phases:
            plans = [phase_plan(work, int(n)) for n in args.rows.split(",")]
            results["plan"] = plans
            for p in plans:
                print("plan", json.dumps(p), flush=True)
        if "objects" in phases:
            results["objects"] = phase_objects(work, args.object_frames)
            print("objects", json.dumps(results["objects"]), flush=True)
        if "query" in phases:
            results["query"] = phase_query(work, args.query_rows)
            print("query", json.dumps(results["query"]), flush=True)
        if "memory" in phases:
            results["memory"] = phase_memory(work, [int(n) for n in args.frames.split(",")], args.unique)
            print("memory", json.dumps(results["memory"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
