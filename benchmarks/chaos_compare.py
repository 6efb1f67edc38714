"""Two OUTs compared as DESIGN.md's resume rule asks (same rows, numbers within 1e-4, masks within one grey
level) and the orphans of one. Used by benchmarks/chaos.py and tests/test_kill.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

from semclip_batch.io.masks import mask_array

SCORE_TOL = 1e-4
MASK_TOL = 1


def files_under(folder: Path, suffix: str) -> list[Path]:
    return [Path(d) / f for d, _, names in os.walk(folder) for f in names
            if f.endswith(suffix) and not f.startswith(".")]


def read_quietly(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def read_predictions(out: Path) -> pd.DataFrame:
    """Every row of every Parquet file under predictions/, with lot_id from its folder and the file's name."""
    frames = []
    for path in sorted(files_under(out / "predictions", ".parquet")):
        df = pq.read_table(path).to_pandas()
        df["lot_id"] = path.parent.name.split("=", 1)[1]
        df["_file"] = str(path.relative_to(out))
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id", "status", "_file"])


def compare(baseline: Path, out: Path) -> list[str]:
    """Differences between two OUTs (empty when equal within the tolerances of README "Archives as they are")."""
    a, b = read_predictions(baseline), read_predictions(out)
    problems = [f"{name}: image_id {i} appears {n} times"
                for name, df in (("baseline", a), ("rerun", b))
                for i, n in df["image_id"].value_counts().items() if n > 1]
    if problems:
        return problems[:10]
    rows_a = set(zip(a["image_id"], a["status"], strict=True))
    rows_b = set(zip(b["image_id"], b["status"], strict=True))
    if rows_a != rows_b:
        return [f"(image_id, status) differ: {len(rows_a - rows_b)} only in baseline, {len(rows_b - rows_a)} only "
                f"in rerun, e.g. {sorted(rows_a ^ rows_b)[:3]}"]
    merged = a.merge(b, on="image_id", suffixes=("_a", "_b"))
    masks_a, masks_b = _open_masks(baseline), _open_masks(out)
    for r in merged.itertuples(index=False):
        problems += _compare_row(r._asdict(), masks_a, masks_b)
    return problems[:10]


def _open_masks(out: Path) -> zarr.Group | None:
    return zarr.open_group(str(out / "masks.zarr"), mode="r") if (out / "masks.zarr").exists() else None


def _compare_row(r: dict, masks_a: zarr.Group | None, masks_b: zarr.Group | None) -> list[str]:
    iid = r["image_id"]
    sa, sb = r["anomaly_score_a"], r["anomaly_score_b"]
    if pd.isna(sa) != pd.isna(sb) or (not pd.isna(sa) and abs(float(sa) - float(sb)) > SCORE_TOL):
        return [f"{iid}: anomaly_score {sa} vs {sb}"]
    ca, cb = r["class_scores_a"], r["class_scores_b"]
    if (ca is None) != (cb is None) or (ca is not None and np.max(np.abs(np.asarray(ca) - np.asarray(cb))) > SCORE_TOL):
        return [f"{iid}: class_scores differ"]
    if pd.isna(r["mask_path_a"]) != pd.isna(r["mask_path_b"]):
        return [f"{iid}: a mask on one side only"]
    if pd.isna(r["mask_path_a"]) or masks_a is None or masks_b is None:
        return []
    ma = np.asarray(mask_array(masks_a, r["mask_path_a"])[int(r["mask_index_a"])], dtype=np.int16)
    mb = np.asarray(mask_array(masks_b, r["mask_path_b"])[int(r["mask_index_b"])], dtype=np.int16)
    if ma.shape != mb.shape or int(np.abs(ma - mb).max()) > MASK_TOL:
        return [f"{iid}: masks differ ({ma.shape} vs {mb.shape})"]
    return []


def orphans(out: Path) -> list[str]:
    """Stored objects no row refers to: Parquet files without rows of their own (empty, duplicating another
    file's image_ids, or of a shard without a done marker), parts of done shards, Zarr arrays no row's
    mask_path names, shard groups holding no referenced array, and leftover temporary files."""
    found = [str(p.relative_to(out)) for d in ("predictions", "masks.zarr", "_state")
             for p in (out / d).rglob(".tmp-*")]
    df = read_predictions(out)
    done = {(p.parent.name, p.stem) for p in files_under(out / "_state" / "done", ".json")}
    dup_ids = set(df["image_id"][df["image_id"].duplicated()])
    for path in sorted(files_under(out / "predictions", ".parquet")):
        rel = str(path.relative_to(out))
        rows = df[df["_file"] == rel]
        lot, shard = path.parent.name.split("=", 1)[1], path.stem
        if rows.empty or set(rows["image_id"]) & dup_ids or (lot, shard) not in done:
            found.append(rel)
    found += [str(p.relative_to(out)) for p in files_under(out / "_state" / "parts", ".parquet")
              if (p.parent.parent.name, p.parent.name) in done]
    referenced = set(df["mask_path"].dropna()) if "mask_path" in df else set()
    masks = out / "masks.zarr"
    for doc in files_under(masks, "zarr.json"):
        node = doc.parent.relative_to(masks)
        if node == Path("."):
            continue
        key = node.as_posix()
        if b'"array"' in read_quietly(doc):
            if key not in referenced:
                found.append(f"masks.zarr/{key} (array)")
        elif len(node.parts) >= 2 and not any(m == key or m.startswith(key + "/") for m in referenced):
            found.append(f"masks.zarr/{key} (group)")
    return sorted(found)


def attempt_records(out: Path) -> list[dict]:
    """Every attempt record in OUT, oldest attempt first."""
    recs = [json.loads(p.read_text()) for p in (out / "runs").glob("*/attempt-*.json")]
    return sorted(recs, key=lambda r: int(r.get("attempt", 0)))


# --- the benchmark -------------------------------------------------------------------------------------------
