"""Orchestration, in one place: manifest -> plan -> decode -> SEM-CLIP -> write parts -> finalise shards ->
markers -> run record.

The CLI and ``jobs/`` are thin wrappers around :func:`run`.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, DataContext

from semclip_batch.config import (
    ModelSpec,
    PreprocessConfig,
    Progress,
    RunConfig,
)
from semclip_batch.errors import MODEL_ERROR, OK, WRITE_ERROR, RunFailed, one_line
from semclip_batch.io import storage, targets
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import content_digest, read_manifest_table
from semclip_batch.io.runrecord import now_iso, start_record, write_record
from semclip_batch.methods.decisions import class_scores_kind
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.pipeline.identity import ModelIdentity, compute_run_id, identify_model, output_config
from semclip_batch.pipeline.inference import Predictor, PredictorSetup, StandIn
from semclip_batch.pipeline.ray_session import (
    ClusterShape,
    check_accelerators,
    check_output_reachable,
    ray_log_level,
    ray_session,
)
from semclip_batch.pipeline.reader import SHARD_KEY_SEP, decode_batch, read_plan
from semclip_batch.pipeline.receipts import Collected, collect_receipts
from semclip_batch.pipeline.shards import (
    Plan,
    ShardKey,
    claim_out,
    clear_partial,
    create_mask_groups,
    done_shards,
    store_plan,
)
from semclip_batch.pipeline.writer import WriterSetup, write_batch

log = logging.getLogger(__name__)
# Blocks of at most this many bytes between stages (Ray's default is 128 MiB): a worker then holds a few
# dozen decoded frames at a time, not hundreds, so memory does not grow with the run.
MAX_BLOCK_BYTES = 32 << 20
DECODE_CPUS = 0.5
# The plan read asks for less than decode, so Ray Data keeps it a stage of its own: fused into decode, its input (one
# row per plan file) took decode's batch size as its bundle size, and each task read and decoded 4 plan files, all of
# a run of up to 1,024 rows in one task (README "Pipeline throughput benchmark"). Keep the two CPU asks different.
READ_PLAN_CPUS = 0.25
ACTOR_CPUS_FLOOR = 0.25  # CPU model actors take in all where the cluster has no more than 1 CPU beside them
STUB_CPUS = 0.1  # a stand-in model actor (benchmarks): its device time is slept, not computed
# Retries, on purpose (README "Faults"): a plan-read, decode or write task whose worker dies is retried up to
# TASK_RETRIES times, and so is a model-actor task; a dead model actor is restarted without limit (node loss,
# preemption). Exceptions inside a row never reach Ray: they become error rows.
TASK_RETRIES = 5
ACTOR_RESTARTS = -1


@dataclass
class RunResult:
    out: str
    run_id: str
    record: dict[str, Any]
    record_url: str


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 3)


def actor_resources(cfg: RunConfig, shape: ClusterShape) -> tuple[float, int]:
    """CPUs per model actor and torch threads. On CPU, leave 1 CPU so decode, write and finalise always
    progress: the actors share what is left (at least :data:`ACTOR_CPUS_FLOOR` in all, at most 1 each), so
    ``--actors 8`` on 2 cores takes 1/8 CPU each instead of asking for every core and waiting forever."""
    if cfg.model_stub is not None:  # stands in for an accelerator: takes no core from decode and write
        return STUB_CPUS, 1
    if cfg.num_gpus > 0:
        return 1.0, max(1, int(shape.cpus // max(1, cfg.actors)) - 1)
    cpus = min(1.0, max(shape.cpus - 1.0, ACTOR_CPUS_FLOOR) / cfg.actors)
    return cpus, max(1, int(shape.cpus // cfg.actors))


def run(cfg: RunConfig, progress: Progress | None = None) -> RunResult:
    """Score every manifest row into OUT; resume-safe and idempotent."""
    timer = _Timer()
    started_at = now_iso()
    launched = time.perf_counter()
    layout = OutLayout(storage.normalize_root(cfg.out))
    so = cfg.storage_options
    targets.check_target(layout.root, "folder", "--out (the output root)", so)
    targets.refuse_out_inside_input_folder(cfg.input, layout.root, so)
    with timer.stage("manifest"):
        manifest = read_manifest_table(cfg.input, pattern=cfg.pattern, storage_options=so)
    with timer.stage("model_load"):
        cfg, spec, ident = identify_model(cfg)
        prep = preprocess_config(spec.backbone, tile_above=cfg.tile_above, scale_policy=spec.scale_policy,
                                 defect_view=spec.defect_view, tile_overlap=spec.tile_overlap,
                                 frame_levels=spec.grey_memory or spec.region_classes)
    with timer.stage("run_id"):
        run_id = compute_run_id(content_digest(manifest),
                                output_config(spec, cfg.thresholds, prep, ident, cfg.model_stub), ident.sha256)
        shard_size = claim_out(layout, run_id=run_id, shard_size=cfg.shard_size, overwrite=cfg.overwrite,
                               storage_options=so)
    lots = pc.unique(manifest.column("lot_id")).to_pylist()
    record: dict[str, Any] = {
        "run_id": run_id, "attempt": 0, "started_at": started_at, "finished_at": None, "status": "running",
        "mode": ident.mode, "model_id": ident.model_id, "classes": list(ident.prompts.classes),
        "thresholds": cfg.thresholds.as_record(), "class_scores": class_scores_kind(cfg.thresholds),
        "preprocessing": prep.as_record(), "shard_size": shard_size,
        "shards": {}, "rows": {"total": manifest.num_rows, "sent_to_model": 0}, "counts": {},
        "timings_s": timer.timings, "throughput_img_s": None, "config": cfg.public_record(),
    }
    if spec.use_reference or spec.reference_levels:
        record["rows"]["without_reference"] = pc.sum(pc.equal(manifest.column("reference_url"), "")).as_py() or 0
    url = start_record(layout, record, so)
    try:
        # the plan is stored while Ray starts (Arrow and storage release the GIL); then the driver holds
        # per-shard counts only, not the manifest
        with ThreadPoolExecutor(1, thread_name_prefix="plan") as pool:
            planned = pool.submit(_store_plan, layout, manifest, run_id, shard_size, so, timer)
            del manifest
            with ray_session(cfg.address) as shape:
                check_output_reachable(layout.root, shape)
                check_accelerators(cfg.num_gpus, cfg.actors, shape)
                work = _Work(cfg=cfg, spec=spec, layout=layout, plan=planned.result(), ident=ident, prep=prep,
                             shape=shape, record=record, timer=timer, launched=launched)
                _execute(work, lots, progress)
        record["status"] = "complete" if not record.get("failed_shards") else "failed"
    except BaseException as exc:
        record["status"], record["error"] = "failed", one_line(exc)
        raise
    finally:
        record["finished_at"] = now_iso()
        write_record(url, record, so)
    if record["status"] != "complete":
        failed = record["failed_shards"]
        stored = record["shards"]["total"] - len(failed)
        raise RunFailed(f"{len(failed)} shard(s) could not be stored, e.g. {failed[0]}: {record['error']}; "
                        f"{stored} of {record['shards']['total']} shards are done (record {url}); fix the cause "
                        "and rerun the same command to redo the others")
    return RunResult(out=layout.root, run_id=run_id, record=record, record_url=url)


def _store_plan(layout: OutLayout, manifest: pa.Table, run_id: str, shard_size: int, so: dict[str, Any],
                timer: _Timer) -> Plan:
    with timer.stage("plan"):
        _store_lot_times(layout, manifest, so)
        return store_plan(layout, manifest, run_id=run_id, shard_size=shard_size, storage_options=so)


def _store_lot_times(layout: OutLayout, manifest: pa.Table, so: dict[str, Any]) -> None:
    """Each lot's earliest ``lot_time`` (when the manifest has any) for ``aggregate``'s excursion limits."""
    times = manifest.select(["lot_id", "lot_time"]).filter(pc.not_equal(manifest.column("lot_time"), ""))
    if not times.num_rows:
        storage.remove(layout.lot_times, so)
        return
    df = times.to_pandas()
    df["t"] = pd.to_datetime(df["lot_time"], format="ISO8601", utc=True)
    first = df.loc[df.groupby("lot_id")["t"].idxmin()]
    kept = pa.table({"lot_id": first["lot_id"].tolist(), "lot_time": [t.isoformat() for t in first["t"]]})
    sink = io.BytesIO()
    pq.write_table(kept, sink)
    storage.write_bytes(layout.lot_times, sink.getvalue(), so)


@dataclass
class _Work:
    """One attempt's settings and state, as the stages below share them."""

    cfg: RunConfig
    spec: ModelSpec
    layout: OutLayout
    plan: Plan
    ident: ModelIdentity
    prep: PreprocessConfig
    shape: ClusterShape
    record: dict[str, Any]
    timer: _Timer
    launched: float

    @property
    def so(self) -> dict[str, Any]:
        return self.cfg.storage_options


def _execute(work: _Work, lots: list[str], progress: Progress | None) -> None:
    so, layout, record, timer = work.so, work.layout, work.record, work.timer
    all_shards = set(work.plan.rows)
    done = {k: v for k, v in done_shards(layout, lots, so).items() if k in all_shards}
    todo = all_shards - set(done)
    record["shards"] = {"total": len(all_shards), "skipped": len(done), "run": len(todo)}
    with timer.stage("prepare_outputs"):
        clear_partial(layout, todo, so)
        create_mask_groups(layout, lots, so)
    counts: Counter[str] = Counter()
    for shard_counts in done.values():
        counts.update(shard_counts)
    if todo:
        n_todo = sum(work.plan.rows[k] for k in todo)
        with timer.stage("pipeline"):
            collected = _stream(work, todo, progress)
        received, failed = collected.received, collected.failed
        counts.update(collected.stored)
        record["rows"]["sent_to_model"] = sum(n for status, n in received.items()
                                              if status in (OK, MODEL_ERROR, WRITE_ERROR))
        if work.spec.self_reference:
            record["rows"]["with_cell_reference"] = collected.cell_references
        if failed:
            record["failed_shards"] = [f"{lot}/{shard}" for lot, shard in sorted(failed)]
            record["error"] = failed[min(failed)]
        record["throughput_img_s"] = round(n_todo / max(timer.timings["pipeline"], 1e-9), 3)
    record["counts"] = dict(sorted(counts.items()))


def _plan_dataset(work: _Work, todo: set[ShardKey]) -> ray.data.Dataset:
    """The rows still to do, read by Ray from the stored plan: one read task, then one decode task, per plan file
    holding rows to do (see shards.PLAN_FILES; :data:`READ_PLAN_CPUS` keeps the two apart). A file that also
    holds rows of done shards names the shards to keep, and only their rows are read on."""
    keep: dict[int, set[ShardKey]] = defaultdict(set)
    for key in todo:
        for k in work.plan.shard_files[key]:
            keep[k].add(key)
    held: dict[int, int] = Counter(k for files in work.plan.shard_files.values() for k in files)
    items = [{"plan_file": work.plan.files[k],
              "keep": None if len(keys) == held[k] else [f"{lot}{SHARD_KEY_SEP}{shard}" for lot, shard in sorted(keys)]}
             for k, keys in sorted(keep.items())]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(read_plan,  # type: ignore[arg-type]  # keyword-only args come from fn_kwargs
                          fn_kwargs={"storage_options": work.so}, batch_size=1, batch_format="pyarrow",
                          num_cpus=READ_PLAN_CPUS, max_retries=TASK_RETRIES)


def _stream(work: _Work, todo: set[ShardKey],
            progress: Progress | None) -> Collected:
    cfg, spec, ident = work.cfg, work.spec, work.ident
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = MAX_BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(ray_log_level())
    actor_cpus, threads = actor_resources(cfg, work.shape)
    setup = PredictorSetup(spec=spec, prep=work.prep, text_embeddings=ident.text, weights_sha256=ident.weights_sha256,
                           batch_size=cfg.batch_size, threads=threads, use_gpu=cfg.num_gpus > 0,
                           stub_rate=cfg.model_stub)
    wsetup = WriterSetup(out=work.layout.root, run_id=work.record["run_id"], model_id=ident.model_id,
                         classes=ident.prompts.classes, thresholds=cfg.thresholds, storage_options=work.so)
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for task / actor retries yet; ray_remote_args is the only way to set them
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = _plan_dataset(work, todo)
        # Ray types a map function as taking the batch alone; decode_batch and write_batch also take keyword-only
        # arguments, which fn_kwargs supplies: hence the two ignores below
        ds = ds.map_batches(decode_batch,  # type: ignore[arg-type]  # keyword-only args come from fn_kwargs
                            fn_kwargs={"prep": work.prep, "storage_options": work.so,
                                       "references": spec.use_reference, "register": spec.register_reference,
                                       "self_reference": spec.self_reference,
                                       "reference_levels": spec.reference_levels},
                            batch_size=4, num_cpus=DECODE_CPUS, batch_format="numpy", max_retries=TASK_RETRIES)
        model_stage = Predictor if cfg.model_stub is None else StandIn
        ds = ds.map_batches(model_stage, fn_constructor_kwargs={"setup": setup}, batch_size=cfg.batch_size,
                            compute=ActorPoolStrategy(size=cfg.actors), num_cpus=actor_cpus,
                            num_gpus=cfg.num_gpus or None, batch_format="numpy",
                            max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES)
        ds = ds.map_batches(write_batch,  # type: ignore[arg-type]  # keyword-only args come from fn_kwargs
                            fn_kwargs={"setup": wsetup}, batch_size=None, num_cpus=0.25,
                            batch_format="numpy", max_retries=TASK_RETRIES)
    expected = {k: work.plan.rows[k] for k in todo}
    timings, launched = work.timer.timings, work.launched

    def shard_done() -> None:  # the first one sets the timing
        timings.setdefault("first_shard_done", round(time.perf_counter() - launched, 3))

    collected = collect_receipts(ds, work.layout, work.so, expected, progress=progress, retries=TASK_RETRIES,
                                 on_shard_done=shard_done)
    work.record["stages"] = stage_stats(ds, origin=launched)
    return collected


def stage_stats(ds: ray.data.Dataset, origin: float = 0.0) -> list[dict[str, Any]]:
    """Per Ray Data operator (fused stages as Ray names them), from its own stats once the run is done: the time
    its tasks ran (``busy_s``, summed over tasks), their CPU time, its first start and last end in seconds after
    ``origin`` (the run's start on ``time.perf_counter``'s clock, the one Ray stamps tasks with: meaningful on the
    driver's node) and the span between them (where a stage was busy less than its span times its parallelism,
    it waited), its input rows and the bytes of the blocks it put into the object store, in pipeline order. []
    when Ray keeps none."""
    try:
        summary = ds.get_stats_summary()
    except Exception:  # stats are a report, never a reason to fail a finished run
        log.debug("no Ray Data stats", exc_info=True)
        return []
    out, pending = [], [summary]
    while pending:
        node = pending.pop()
        pending.extend(node.parents)
        for op in node.operators_stats:
            if op.is_sub_operator:
                continue
            span = (op.latest_end_time - op.earliest_start_time
                    if op.latest_end_time is not None and op.earliest_start_time is not None else None)
            out.append({"stage": op.operator_name,
                        "tasks": op.wall_time.count if op.wall_time else 0,
                        "busy_s": round(op.wall_time.sum, 3) if op.wall_time else None,
                        "cpu_s": round(op.cpu_time.sum, 3) if op.cpu_time else None,
                        "span_s": round(span, 3) if span is not None else None,
                        "start_s": _after(op.earliest_start_time, origin),
                        "end_s": _after(op.latest_end_time, origin),
                        "rows": op.total_input_num_rows,
                        "out_bytes": int(op.output_size_bytes.sum) if op.output_size_bytes else None})
    return out[::-1]  # from the plan read to the writer


def _after(moment: float | None, origin: float) -> float | None:
    return None if moment is None else round(moment - origin, 3)
