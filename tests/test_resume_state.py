"""Resume state without Ray: exact listings per lot, whole-object writes, damaged files never trusted."""

from __future__ import annotations

import json
import os
import stat
import uuid

import pytest

from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.pipeline.shards import clear_partial, done_shards, read_json, write_marker

LOTS = ("LA", "LA x", "L(A)", "L{A}", "LA-2", "ü#:1")


def _populate(layout: OutLayout) -> None:
    """What a killed attempt can leave of a shard: its parts, and a final file and Zarr group half made."""
    for lot in LOTS:
        for shard in ("s00000", "s00001", "s00010"):
            storage.write_bytes(layout.part_file(lot, shard, "abc"), b"x", {})
            storage.write_bytes(layout.prediction_file(lot, shard), b"x", {})
            storage.write_bytes(storage.join(layout.masks, lot, shard, "zarr.json"), b"{}", {})


@pytest.mark.parametrize("lot", LOTS)
def test_clear_partial_touches_only_its_own_lot_and_shards(tmp_path, lot):
    layout = OutLayout(str(tmp_path))
    _populate(layout)
    removed = clear_partial(layout, {(lot, "s00001")}, {})
    assert removed == 3
    for other in LOTS:
        for shard in ("s00000", "s00001", "s00010"):
            gone = other == lot and shard == "s00001"
            assert os.path.exists(layout.shard_parts(other, shard)) is not gone
            assert os.path.exists(layout.prediction_file(other, shard)) is not gone
            assert os.path.exists(storage.join(layout.masks, other, shard)) is not gone


def test_markers_listed_per_lot_and_checked_on_read(tmp_path):
    layout = OutLayout(str(tmp_path))
    for lot in LOTS:
        write_marker(layout, (lot, "s00000"), {"ok": 3, "decode_error": 1}, {})
    write_marker(layout, ("LA", "s00001"), {"ok": 2}, {})
    damaged = layout.marker("LA", "s00001")
    with open(damaged, "r+b") as fh:
        fh.truncate(9)
    storage.write_bytes(layout.marker("LA x", "s00009"), json.dumps({"lot_id": "LA", "shard": "s00009",
                                                                     "rows": 1, "counts": {"ok": 1}}).encode(), {})
    done = done_shards(layout, ["LA", "LA x"], {})
    assert done == {("LA", "s00000"): {"ok": 3, "decode_error": 1}, ("LA x", "s00000"): {"ok": 3, "decode_error": 1}}
    assert read_json(damaged, {}) is None


def test_an_object_store_out_named_like_a_glob_is_read_and_removed_as_named():
    """On an object store ``cat`` and ``rm`` expand ``*``, ``?`` and ``[``: an OUT named ``o*x`` must neither read
    ``oZx``'s markers nor remove its files (in-memory store; S3 behaves alike)."""
    base = f"memory://globs-{uuid.uuid4().hex}"
    mine, theirs = OutLayout(f"{base}/o*x"), OutLayout(f"{base}/oZx")
    write_marker(mine, ("LA", "s00000"), {"ok": 3}, {})
    write_marker(mine, ("LA", "s00001"), {"ok": 1}, {})
    write_marker(theirs, ("LA", "s00000"), {"ok": 9}, {})
    write_marker(theirs, ("LA", "s00002"), {"ok": 9}, {})
    assert done_shards(mine, ["LA"], {}) == {("LA", "s00000"): {"ok": 3}, ("LA", "s00001"): {"ok": 1}}
    storage.remove(mine.markers, {})
    assert done_shards(mine, ["LA"], {}) == {}
    assert done_shards(theirs, ["LA"], {}) == {("LA", "s00000"): {"ok": 9}, ("LA", "s00002"): {"ok": 9}}


def test_whole_object_writes_leave_no_temporary_files(tmp_path):
    url = str(tmp_path / "a" / "b.json")
    storage.write_bytes(url, b"1", {})
    storage.write_bytes(url, b"22", {})
    assert open(url, "rb").read() == b"22"
    assert os.listdir(tmp_path / "a") == ["b.json"]
    assert storage.create_exclusive(str(tmp_path / "a" / "c.json"), b"first", {})
    assert not storage.create_exclusive(str(tmp_path / "a" / "c.json"), b"second", {})
    assert open(tmp_path / "a" / "c.json", "rb").read() == b"first"
    assert sorted(os.listdir(tmp_path / "a")) == ["b.json", "c.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_file_written_whole_takes_the_umask_like_any_new_file(tmp_path, umask):
    """``storage.write_bytes`` and ``create_exclusive`` write a temporary file and rename or link it into place; the
    file is readable as any file the process creates (0644 under umask 022), not the temporary file's 0600."""
    old = os.umask(umask)
    try:
        storage.write_bytes(str(tmp_path / "a" / "weights.safetensors"), b"x")
        assert storage.create_exclusive(str(tmp_path / "a" / "marker.json"), b"x", {})
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a" / "weights.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "a" / "marker.json").stat().st_mode) == mode


@pytest.mark.s3
def test_exclusive_create_on_s3(s3_endpoint):
    from conftest import BUCKET

    url = f"s3://{BUCKET}/excl/attempt-1.json"
    assert storage.create_exclusive(url, b"first", {})
    assert not storage.create_exclusive(url, b"second", {})
    assert storage.read_bytes(url, {}) == b"first"
    assert storage.list_names(f"s3://{BUCKET}/excl", {}) == ["attempt-1.json"]
