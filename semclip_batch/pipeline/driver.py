"""Orchestration, in one place: manifest -> shards -> decode -> SEM-CLIP -> write -> markers -> run record.

The CLI and ``jobs/`` are thin wrappers around :func:`run`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext

from semclip_batch.config import CheckpointRequest, ModelSpec, PreprocessConfig, Progress, RunConfig, Thresholds
from semclip_batch.errors import MODEL_ERROR, OK, WRITE_ERROR, ConfigError, RunFailed, WeightsError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import content_digest, read_manifest
from semclip_batch.io.runrecord import now_iso, start_record, write_record
from semclip_batch.io.schema import INPUT, to_table
from semclip_batch.methods.checkpoint import CheckpointMeta, load_checkpoint, model_checksum
from semclip_batch.methods.prompts import PromptSet, load_prompts, text_embeddings
from semclip_batch.methods.registry import get_method
from semclip_batch.methods.weights import load_backbone, preprocess_config
from semclip_batch.pipeline.inference import Predictor, PredictorSetup, build_model
from semclip_batch.pipeline.ray_session import ClusterShape, check_output_reachable, ray_session
from semclip_batch.pipeline.reader import decode_batch
from semclip_batch.pipeline.shards import ShardKey, clear_partial, create_mask_groups, done_shards, prepare_plan, write_marker
from semclip_batch.pipeline.writer import WriterSetup, write_batch

log = logging.getLogger(__name__)
INPUT_BLOCK_ROWS = 32
# Retries, on purpose (README "Faults"): a decode or write task whose worker dies is retried up to
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


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    sha256: str
    weights_sha256: str
    text: np.ndarray
    prompts: PromptSet
    mode: str


def _identify_model(cfg: RunConfig) -> tuple[RunConfig, ModelSpec, ModelIdentity]:
    """Load what identifies the model (weights checksum, class embeddings) once in the driver, and resolve the
    run's model into a full :class:`ModelSpec`.

    With a checkpoint, its backbone, options, classes and thresholds apply (thresholds given as flags win).
    """
    if isinstance(cfg.model, CheckpointRequest):
        return _identify_checkpoint(cfg, cfg.model)
    spec = cfg.model
    get_method(spec.method)  # an unknown method is refused here (one line), before any weights load or actor starts
    prompts = load_prompts(spec.prompts, cfg.storage_options)
    backbone = load_backbone(spec.backbone, spec.pretrained, seed=spec.seed, expected_sha256=spec.pretrained_sha256,
                             storage_options=cfg.storage_options)
    ident = ModelIdentity(model_id=f"zero-shot:{spec.backbone}:{backbone.sha256[:12]}", sha256=backbone.sha256,
                          weights_sha256=backbone.sha256, text=text_embeddings(backbone, prompts), prompts=prompts,
                          mode="zero-shot")
    return cfg, spec, ident


def _identify_checkpoint(cfg: RunConfig, req: CheckpointRequest) -> tuple[RunConfig, ModelSpec, ModelIdentity]:
    ckpt = load_checkpoint(req.url, cfg.storage_options)
    meta = ckpt.meta
    if req.backbone not in (None, meta.backbone):
        raise ConfigError(f"--backbone {req.backbone} differs from the checkpoint's {meta.backbone}; omit it")
    pretrained = req.pretrained or meta.weights.pretrained
    backbone = load_backbone(meta.backbone, pretrained, seed=meta.weights.seed,
                             expected_sha256=req.pretrained_sha256, storage_options=cfg.storage_options)
    if backbone.sha256 != meta.weights.sha256:
        raise WeightsError(f"--pretrained {pretrained} has checksum {backbone.sha256[:12]}, but the checkpoint was "
                           f"trained on {meta.weights.sha256[:12]} ({meta.weights.source})")
    spec = ModelSpec(backbone=meta.backbone, pretrained=pretrained, pretrained_sha256=req.pretrained_sha256,
                     seed=meta.weights.seed, precision=req.precision, taps=meta.taps, use_vv=meta.use_vv,
                     surgery=meta.surgery, cls=meta.cls, method=meta.method, use_reference=meta.use_reference,
                     score_mode=meta.score_mode, sigma=meta.sigma, checkpoint=req.url,
                     storage_options=req.storage_options)
    get_method(spec.method)
    thresholds = _checkpoint_thresholds(cfg.thresholds, meta)
    prompts = PromptSet(classes=meta.classes, prompts=tuple(meta.prompts[c] for c in meta.classes))
    # refuse a misfit here, once, with the tensors already read and verified
    build_model(spec, ckpt.tensors["text_embeddings"].numpy(), backbone=backbone, tensors=ckpt.tensors)
    checksum = model_checksum(ckpt)
    ident = ModelIdentity(model_id=f"{ckpt.method}:{meta.backbone}:{checksum[:12]}", sha256=checksum,
                          weights_sha256=meta.weights.sha256, text=ckpt.tensors["text_embeddings"].numpy(),
                          prompts=prompts, mode="checkpoint")
    return replace(cfg, model=spec, thresholds=thresholds), spec, ident


def _checkpoint_thresholds(given: Thresholds, meta: CheckpointMeta) -> Thresholds:
    """The checkpoint's calibrated thresholds, except those given as flags."""
    flag = {k for k, v in given.source.items() if v == "flag"}
    return Thresholds(image=given.image if "image" in flag else meta.thresholds.image,
                      pixel=given.pixel if "pixel" in flag else meta.thresholds.pixel,
                      min_region_px=given.min_region_px if "min_region_px" in flag else meta.thresholds.min_region_px,
                      source={k: "flag" if k in flag else "checkpoint" for k in ("image", "pixel", "min_region_px")})


def compute_run_id(manifest_digest: str, output_config: dict[str, Any], weights_sha256: str) -> str:
    """Short hash of (manifest content, output-affecting config, model checksum)."""
    blob = json.dumps({"manifest": manifest_digest, "config": output_config, "weights": weights_sha256},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def output_config(spec: ModelSpec, thresholds: Thresholds, prep: PreprocessConfig,
                  ident: ModelIdentity) -> dict[str, Any]:
    return {"model": spec.output_affecting(), "classes": list(ident.prompts.classes),
            "prompts": ident.prompts.as_record(), "preprocessing": prep.as_record(),
            "thresholds": {k: v for k, v in thresholds.as_record().items() if k != "source"}}


def actor_resources(cfg: RunConfig, shape: ClusterShape) -> tuple[float, int]:
    """CPUs per model actor and torch threads. On CPU, leave 0.75 CPU so decode and write always progress."""
    if cfg.num_gpus > 0:
        return 1.0, max(1, int(shape.cpus // max(1, cfg.actors)) - 1)
    cpus = max(0.25, min(1.0, (shape.cpus - 0.75) / cfg.actors))
    return cpus, max(1, int(shape.cpus // cfg.actors))


def run(cfg: RunConfig, progress: Progress | None = None) -> RunResult:
    """Score every manifest row into OUT; resume-safe and idempotent."""
    timer = _Timer()
    started_at = now_iso()
    layout = OutLayout(storage.normalize_root(cfg.out))
    so = cfg.storage_options
    with timer.stage("manifest"):
        df = read_manifest(cfg.input, pattern=cfg.pattern, storage_options=so)
    with timer.stage("model_load"):
        cfg, spec, ident = _identify_model(cfg)
        prep = preprocess_config(spec.backbone, tile_above=cfg.tile_above)
    run_id = compute_run_id(content_digest(df), output_config(spec, cfg.thresholds, prep, ident), ident.sha256)
    plan, shard_size = prepare_plan(layout, df, run_id=run_id, shard_size=cfg.shard_size,
                                    overwrite=cfg.overwrite, storage_options=so)
    rows = df.merge(plan[["image_id", "shard"]], on="image_id", how="left")
    record: dict[str, Any] = {
        "run_id": run_id, "attempt": 0, "started_at": started_at, "finished_at": None, "status": "running",
        "mode": ident.mode, "model_id": ident.model_id, "classes": list(ident.prompts.classes),
        "thresholds": cfg.thresholds.as_record(), "preprocessing": prep.as_record(), "shard_size": shard_size,
        "shards": {}, "rows": {"total": len(df), "sent_to_model": 0}, "counts": {}, "timings_s": timer.timings,
        "throughput_img_s": None, "config": cfg.public_record(),
    }
    url = start_record(layout, record, so)
    try:
        with ray_session(cfg.address) as shape:
            check_output_reachable(layout.root, shape)
            _execute(cfg, spec, layout, rows, record, ident, prep, shape, timer, progress)
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


def _execute(cfg: RunConfig, spec: ModelSpec, layout: OutLayout, rows: pd.DataFrame, record: dict[str, Any], ident: ModelIdentity,
             prep: PreprocessConfig, shape: ClusterShape, timer: _Timer, progress: Progress | None) -> None:
    so = cfg.storage_options
    all_shards = {(str(a), str(b)) for a, b in rows[["lot_id", "shard"]].drop_duplicates().itertuples(index=False)}
    done = {k: v for k, v in done_shards(layout, rows["lot_id"].unique(), so).items() if k in all_shards}
    todo = all_shards - set(done)
    record["shards"] = {"total": len(all_shards), "skipped": len(done), "run": len(todo)}
    with timer.stage("prepare_outputs"):
        clear_partial(layout, todo, so)
        create_mask_groups(layout, rows["lot_id"].unique(), todo, so)
    todo_rows = rows[[(lot, shard) in todo for lot, shard in zip(rows["lot_id"], rows["shard"], strict=False)]]
    counts: Counter[str] = Counter()
    for shard_counts in done.values():
        counts.update(shard_counts)
    if len(todo_rows):
        with timer.stage("pipeline"):
            new_counts, failed = _stream(cfg, spec, layout, todo_rows, ident, prep, shape, record, progress)
        counts.update(new_counts)
        sent = sum(n for status, n in new_counts.items() if status in (OK, MODEL_ERROR, WRITE_ERROR))
        record["rows"]["sent_to_model"] = sent
        if failed:
            record["failed_shards"] = [f"{lot}/{shard}" for lot, shard in sorted(failed)]
            record["error"] = failed[min(failed)]
        if spec.use_reference:
            record["rows"]["without_reference"] = int((todo_rows["reference_url"] == "").sum())
        record["throughput_img_s"] = round(len(todo_rows) / max(timer.timings["pipeline"], 1e-9), 3)
    record["counts"] = dict(sorted(counts.items()))


def _input_blocks(todo_rows: pd.DataFrame, block_rows: int = INPUT_BLOCK_ROWS) -> list[pa.Table]:
    """Small Arrow blocks in shard order (never mixing shards), so decode, model and write overlap."""
    blocks = []
    for _, part in todo_rows.groupby(["lot_id", "shard"], sort=True):
        for start in range(0, len(part), block_rows):
            chunk = part.iloc[start:start + block_rows]
            blocks.append(to_table({c: chunk[c].tolist() for c in INPUT.names}, INPUT))
    return blocks


def _stream(cfg: RunConfig, spec: ModelSpec, layout: OutLayout, todo_rows: pd.DataFrame, ident: ModelIdentity,
            prep: PreprocessConfig, shape: ClusterShape, record: dict[str, Any],
            progress: Progress | None) -> tuple[Counter[str], dict[ShardKey, str]]:
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    actor_cpus, threads = actor_resources(cfg, shape)
    setup = PredictorSetup(spec=spec, prep=prep, text_embeddings=ident.text, weights_sha256=ident.weights_sha256,
                           batch_size=cfg.batch_size, threads=threads, use_gpu=cfg.num_gpus > 0)
    wsetup = WriterSetup(out=layout.root, run_id=record["run_id"], model_id=ident.model_id,
                         classes=ident.prompts.classes, thresholds=cfg.thresholds, storage_options=cfg.storage_options)
    ds: ray.data.Dataset = ray.data.from_arrow(_input_blocks(todo_rows))
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for task / actor retries yet; ray_remote_args is the only way to set them
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        # Ray types a map function as taking the batch alone; decode_batch and write_batch also take keyword-only
        # arguments, which fn_kwargs supplies: hence the two ignores below
        ds = ds.map_batches(decode_batch,  # type: ignore[arg-type]  # keyword-only args come from fn_kwargs
                            fn_kwargs={"prep": prep, "storage_options": cfg.storage_options,
                                       "references": spec.use_reference},
                            batch_size=4, num_cpus=0.5, batch_format="numpy", max_retries=TASK_RETRIES)
        ds = ds.map_batches(Predictor, fn_constructor_kwargs={"setup": setup}, batch_size=cfg.batch_size,
                            compute=ActorPoolStrategy(size=cfg.actors), num_cpus=actor_cpus,
                            num_gpus=cfg.num_gpus or None, batch_format="numpy",
                            max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES)
        ds = ds.map_batches(write_batch,  # type: ignore[arg-type]  # keyword-only args come from fn_kwargs
                            fn_kwargs={"setup": wsetup}, batch_size=None, num_cpus=0.25,
                            batch_format="numpy", max_retries=TASK_RETRIES)
    return _collect_receipts(ds, layout, todo_rows, cfg.storage_options, progress)


def _collect_receipts(ds: ray.data.Dataset, layout: OutLayout, todo_rows: pd.DataFrame, so: dict[str, Any],
                      progress: Progress | None) -> tuple[Counter[str], dict[ShardKey, str]]:
    """Count each row once (a retried task can repeat receipts), write a shard's marker once all its rows are
    stored, and return the status counts and the shards that had a part that could not be stored (with why)."""
    expected = todo_rows.groupby(["lot_id", "shard"]).size().to_dict()
    seen: dict[ShardKey, set[str]] = defaultdict(set)
    shard_counts: dict[ShardKey, Counter[str]] = defaultdict(Counter)
    total: Counter[str] = Counter()
    failed: dict[ShardKey, str] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        receipts = zip(batch["lot_id"], batch["shard"], batch["image_id"], batch["status"], batch["written"],
                       batch["error"], strict=True)
        for lot, shard, image_id, status, written, error in receipts:
            key = (str(lot), str(shard))
            if not written:
                failed.setdefault(key, str(error))
                continue
            if str(image_id) in seen[key]:
                continue
            seen[key].add(str(image_id))
            shard_counts[key][str(status)] += 1
            total[str(status)] += 1
            if len(seen[key]) == expected[key]:
                write_marker(layout, key, shard_counts[key], so)
        if progress is not None:
            progress(len(batch["image_id"]), len(todo_rows))
    failed = {k: why for k, why in failed.items() if len(seen[k]) < expected[k]}  # a retry may have stored it
    missing = {k for k in expected if len(seen[k]) < expected[k]} - set(failed)
    if missing:
        raise RunFailed(f"{len(missing)} shard(s) came back with rows missing, e.g. {'/'.join(min(missing))}; "
                        "rerun the same command to complete them")
    return total, failed
