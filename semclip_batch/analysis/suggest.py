"""``suggest``: the frames of a finished run whose labels would teach the model most, as a manifest to label.

The rule (README "Label suggestions"), over the run's ok rows that nobody has labelled yet:

1. *Informativeness* ``u`` per row, the weighted mean of three terms, each turned into its rank in [0, 1] among
   the candidates (rank, not raw value: the three live on different scales, and thresholds calibrated by
   ``train`` sit anywhere in [0, 1]):
   - class uncertainty: ``1 - (p1 - p2)``, the margin between the two highest class scores;
   - image threshold: how close ``anomaly_score`` is to the run's image threshold;
   - pixel threshold: how close the map's peak ``max A`` is to the run's pixel threshold (:mod:`.map_peaks`: from
     ``anomaly_score`` and ``p(normal)`` where the class scores' normal entry is the whole view's, read from the
     stored mask where the frame took a defect view and that entry is the mean of two views', or the run's class
     scores weigh the image decision).
2. *Pick* (``shortlist`` 1, the default, chosen on the validation family): the ``n`` highest ``u``, walking down
   the ranking and skipping a frame within cosine distance :data:`DUPLICATE` of one taken, in the run's own
   backbone image embedding (only the frames walked over are read and embedded). ``shortlist`` K > 1: among the
   K x n highest ``u``, the most informative first, then greedily the row maximising ``u x d``, ``d`` = cosine
   distance to the nearest pick. Where the backbone cannot be loaded from the run record, the square roots of
   the class scores stand in (logged; no near-duplicate test then).

Ties are broken by a permutation drawn from ``seed``: the result is a pure function of OUT and the seed. The rule
itself is :mod:`.suggest_rule` (pure functions of arrays); this module reads OUT into it, embeds the frames it walks
over and writes the pick as a manifest.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from semclip_batch.analysis.map_peaks import map_peaks, preprocess_of
from semclip_batch.analysis.results import read_predictions
from semclip_batch.analysis.suggest_rule import DUPLICATE, Scores, Weights, reason, select, terms
from semclip_batch.errors import OK, ConfigError, ImageError, OutputError, SemclipError, one_line
from semclip_batch.io import storage, targets
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest import read_manifest_table
from semclip_batch.io.plan import read_plan_columns

log = logging.getLogger(__name__)
SUFFIXES = (".csv", ".parquet", ".pq")
EMBED_BATCH = 16


@dataclass(frozen=True)
class SuggestConfig:
    out: str
    dest: str
    n: int
    seed: int = 0
    overwrite: bool = False
    weights: Weights = field(default_factory=Weights)
    shortlist: int = 1  # 1: the n most informative, near-duplicates skipped; K > 1: diverse pick among K x n
    exclude: tuple[str, ...] = ()  # manifests of frames labelled already
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"--n must be >= 1, got {self.n}")
        if self.shortlist < 1:
            raise ConfigError(f"--shortlist must be >= 1, got {self.shortlist}")
        if not self.dest.lower().split("?", 1)[0].endswith(SUFFIXES):
            raise ConfigError(f"--out {storage.redact(self.dest)}: give a .csv or .parquet file name")


@dataclass(frozen=True)
class Suggestion:
    rows: pd.DataFrame  # the manifest written, in rank order
    candidates: int
    excluded: int
    diversity: str  # what the distances were measured in


# ---- reading OUT ------------------------------------------------------------------------------------------------------

def finished_record(layout: OutLayout, so: Mapping[str, Any]) -> dict[str, Any]:
    """The latest attempt record of the run whose outputs OUT holds, which must be ``complete``."""
    try:
        info = json.loads(storage.read_bytes(layout.run_info, so))
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        info = None
    run_id = info.get("run_id") if isinstance(info, dict) else None
    if not run_id:
        raise OutputError(f"{layout.root} is not a finished run (no _state/run.json); run `semclip-batch run ... "
                          f"--out {layout.root}` first")
    records = []
    for name in storage.list_names(storage.join(layout.runs, run_id), so):
        try:
            body = json.loads(storage.read_bytes(storage.join(layout.runs, run_id, name), so))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(body, dict):
            records.append(body)
    latest = max(records, key=lambda r: (str(r.get("started_at") or ""), int(r.get("attempt") or 0)), default=None)
    if latest is None or latest.get("status") != "complete":
        state = "no record" if latest is None else f"attempt {latest.get('attempt')} is {latest.get('status')!r}"
        raise OutputError(f"run {run_id} in {layout.root} has not finished ({state}); rerun `semclip-batch run` "
                          "into it, then suggest")
    return latest


PLAN_COLUMNS = ["url", "reference_url", "lot_id", "wafer_id", "die_x", "die_y", "page", "defect_id"]


def read_plan(layout: OutLayout, so: Mapping[str, Any]) -> pa.Table:
    """The stored plan's ``image_id`` and :data:`PLAN_COLUMNS` (``page`` / ``defect_id`` null in older plans)."""
    plan = read_plan_columns(layout, PLAN_COLUMNS, so)
    if plan.num_rows == 0:
        raise OutputError(f"{layout.root} has no stored plan (_state/plan/); rerun `semclip-batch run` into it")
    return plan


def candidates(out: str, record: Mapping[str, Any], so: Mapping[str, Any]) -> pd.DataFrame:
    """This run's ok prediction rows joined with their plan rows (one row per frame, sorted by image_id)."""
    layout = OutLayout(storage.normalize_root(out))
    preds = read_predictions(out, so)
    keep = pc.and_(pc.equal(preds.column("status"), OK), pc.equal(preds.column("run_id"), record["run_id"]))
    preds = preds.filter(keep).select(["image_id", "anomaly_score", "class_scores", "mask_path", "mask_index"])
    plan = read_plan(layout, so)
    joined = preds.to_pandas().merge(plan.to_pandas(), on="image_id", how="inner", validate="one_to_one")
    return joined.sort_values("image_id", kind="stable").reset_index(drop=True)


def labelled_keys(record: Mapping[str, Any], exclude: Sequence[str], so: Mapping[str, Any],
                  support: str | None) -> set[str]:
    """image_ids and URLs of frames labelled already: rows of the run's input manifest with a label or mask, every
    row of ``support`` (the manifest the run's checkpoint was trained on: :func:`_support_manifest`), and every row
    of ``exclude``."""
    keys: set[str] = set()
    config = record.get("config") or {}
    sources = [(str(config["input"]), config.get("pattern"), True)] if config.get("input") else []
    sources += [(support, None, False)] if support else []
    for source, pattern, only_labelled in sources:
        try:
            keys |= _manifest_keys(source, pattern, only_labelled, so)
        except (SemclipError, OSError) as exc:
            log.warning("cannot read %s to skip frames labelled there: %s", storage.redact(source), one_line(exc))
    for source in exclude:
        keys |= _manifest_keys(source, None, False, so)  # named by the user: an unreadable one is refused
    return keys


def _manifest_keys(source: str, pattern: str | None, only_labelled: bool, so: Mapping[str, Any]) -> set[str]:
    table = read_manifest_table(source, pattern=pattern, storage_options=so)
    if only_labelled:
        has = pc.or_(pc.not_equal(table.column("label"), ""), pc.not_equal(table.column("mask_uri"), ""))
        table = table.filter(has)
    return set(table.column("image_id").to_pylist()) | set(table.column("url").to_pylist())


def _support_manifest(checkpoint: str | None, so: Mapping[str, Any]) -> str | None:
    if not checkpoint:
        return None
    try:
        body = json.loads(storage.read_bytes(storage.join(checkpoint, "checkpoint.json"), so))
        support = body["training"]["config"]["support"]
    except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("cannot read the support manifest of checkpoint %s: %s", storage.redact(checkpoint), one_line(exc))
        return None
    return str(support) if support else None


def scores_of(rows: pd.DataFrame, record: Mapping[str, Any], layout: OutLayout, so: Mapping[str, Any]) -> Scores:
    """The candidates' :class:`Scores`; their map peaks from :func:`~semclip_batch.analysis.map_peaks.map_peaks`."""
    probs = np.stack([np.asarray(v, dtype=np.float64) for v in rows["class_scores"]])
    score = rows["anomaly_score"].to_numpy(dtype=np.float64)
    peaks = map_peaks(layout, rows, score, probs[:, 0], record, so)
    thresholds = record.get("thresholds") or {}
    return Scores(probs, score, peaks, float(thresholds.get("image", 0.5)), float(thresholds.get("pixel", 0.5)))


# ---- embeddings -------------------------------------------------------------------------------------------------------

def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def image_embeddings(clip: torch.nn.Module, views: torch.Tensor) -> np.ndarray:
    """The backbone's unit image embeddings of whole-frame views ``(N, 3, S, S)`` -> ``(N, E)``."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(views), EMBED_BATCH):
            out.append(clip.encode_image(views[start:start + EMBED_BATCH]).float().numpy())  # type: ignore[operator]
    return unit(np.concatenate(out)) if out else np.zeros((0, 1))


class Embedder:
    """Embeds candidate frames with the run's backbone (loaded once, on first use); remembers what it measured in.
    Where the backbone cannot be loaded, the square roots of the class scores stand in, and nothing counts as a
    near-duplicate (distinct frames often score alike)."""

    def __init__(self, rows: pd.DataFrame, record: Mapping[str, Any], scores: Scores, so: Mapping[str, Any]) -> None:
        self.rows, self.record, self.scores, self.so = rows, record, scores, so
        self.kind = ""
        self.duplicate = DUPLICATE
        self.unreadable: list[int] = []
        self._backbone: Any = None

    def _load(self) -> Any:
        from semclip_batch.methods.weights import load_backbone

        if self._backbone is None and not self.kind:
            model = dict((self.record.get("config") or {}).get("model") or {})
            try:
                self._backbone = load_backbone(str(model["backbone"]), str(model["pretrained"]),
                                               seed=int(model.get("seed") or 0), storage_options=self.so)
                self.kind = f"image embeddings of backbone {self._backbone.name}"
            except (SemclipError, OSError, KeyError, ValueError, RuntimeError) as exc:
                self.kind = f"class scores (the run's backbone could not be loaded: {one_line(exc)})"
                self.duplicate = 0.0
                log.warning("frames compared by %s", self.kind)
        return self._backbone

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        from semclip_batch.io.frames import load_frame
        from semclip_batch.io.preprocess import grey_views, normalize

        backbone = self._load()
        if backbone is None:
            return unit(np.sqrt(np.clip(self.scores.probs[idx], 0.0, None)))
        prep = preprocess_of(self.record, backbone.name)
        views, gone = [], []
        for k, i in enumerate(idx):
            row = self.rows.iloc[int(i)]
            page = int(row["page"]) if "page" in row and pd.notna(row["page"]) else None
            try:
                gray = load_frame(str(row["url"]), self.so, page)
            except ImageError as exc:  # readable at run time, gone since: nobody can label it now
                log.warning("skipping %s: %s", row["image_id"], one_line(exc))
                self.unreadable.append(int(i))
                gone.append(k)
                gray = np.zeros((16, 16), np.float32)
            views.append(normalize(grey_views(gray, prep, []), prep))
        emb = image_embeddings(backbone.clip, torch.cat(views))
        emb[gone] = np.nan
        return emb


# ---- orchestration ----------------------------------------------------------------------------------------------------

def suggest(cfg: SuggestConfig) -> Suggestion:
    """Choose ``cfg.n`` frames of the finished run in ``cfg.out`` and write them to ``cfg.dest`` as a manifest."""
    so = storage.check_storage_options(cfg.storage_options)
    layout = OutLayout(storage.normalize_root(cfg.out))
    targets.refuse_inside_out(cfg.dest, layout.root, "--out (the manifest to write)")
    targets.check_target(cfg.dest, "file", "--out (the manifest to write)", so)
    if storage.exists(cfg.dest, so) and not cfg.overwrite:
        raise OutputError(f"{storage.redact(cfg.dest)} exists; pass --overwrite to replace it")
    record = finished_record(layout, so)
    config = record.get("config") or {}
    read = {f"--exclude manifest {k + 1}": source for k, source in enumerate(cfg.exclude)}
    support = _support_manifest((config.get("model") or {}).get("checkpoint"), so)
    targets.refuse_overwriting_inputs(cfg.dest, {"run's manifest": config.get("input"),
                                                 "checkpoint's support manifest": support, **read})
    rows = candidates(cfg.out, record, so)
    labelled = labelled_keys(record, cfg.exclude, so, support)
    fresh = ~(rows["image_id"].isin(labelled) | rows["url"].isin(labelled))
    excluded = int((~fresh).sum())
    rows = rows[fresh].reset_index(drop=True)
    if rows.empty:
        raise OutputError(f"{layout.root} has no unlabelled ok frames to suggest ({excluded} labelled already: in the "
                          "run's manifest, its checkpoint's support manifest or --exclude)")
    s = scores_of(rows, record, layout, so)
    embedder = Embedder(rows, record, s, so)
    picked, _ = select(s, embedder, cfg.n, cfg.weights, cfg.shortlist, cfg.seed)
    out = manifest_rows(rows, s, picked, [str(c) for c in record.get("classes") or []])
    write_manifest(out, cfg.dest, so)
    return Suggestion(out, len(rows), excluded, embedder.kind)


def manifest_rows(rows: pd.DataFrame, s: Scores, picked: Sequence[int], classes: Sequence[str]) -> pd.DataFrame:
    """The picked rows as manifest rows for ``train`` (``label`` and ``mask_uri`` empty), in rank order."""
    t = terms(s)
    names = list(classes) if len(classes) == s.probs.shape[1] else [f"class {k}" for k in range(s.probs.shape[1])]
    sel = rows.iloc[list(picked)]
    out = pd.DataFrame({
        "uri": sel["url"].to_numpy(), "lot_id": sel["lot_id"].to_numpy(), "wafer_id": sel["wafer_id"].to_numpy(),
        "image_id": sel["image_id"].to_numpy(), "die_x": sel["die_x"].astype("Int64").to_numpy(),
        "die_y": sel["die_y"].astype("Int64").to_numpy(), "reference_uri": sel["reference_url"].fillna("").to_numpy(),
    })
    if sel["defect_id"].fillna("").astype(bool).any():  # ids from the manifest (KLARF's DEFECTID)
        out["defect_id"] = sel["defect_id"].fillna("").to_numpy()
    if sel["page"].notna().any():  # one of these frames sets a TIFF page
        out["page"] = sel["page"].astype("Int64").to_numpy()
    out["label"] = ""  # for the labeller to fill, and mask_uri where they draw a mask
    out["mask_uri"] = ""
    out["suggest_rank"] = np.arange(1, len(out) + 1)
    out["suggest_reason"] = [reason(s, t, int(i), names) for i in picked]
    return out


def write_manifest(rows: pd.DataFrame, dest: str, so: Mapping[str, Any]) -> None:
    """CSV or Parquet by ``dest``'s extension, one whole-object write through storage."""
    if posixpath.splitext(dest.lower().split("?", 1)[0])[1] == ".csv":
        data = rows.to_csv(index=False).encode()
    else:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), buf)
        data = buf.getvalue()
    try:
        storage.write_bytes(dest, data, so)
    except OSError as exc:
        raise OutputError(f"cannot write {storage.redact(dest)}: {one_line(exc)}") from None

