"""``manifest from-prefix``: an archive prefix listed once into a manifest that ``run`` reads, locally and on
s3://, written in batches; stray and hidden keys skipped and counted; one-line refusals."""

from __future__ import annotations

import uuid

import boto3
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import BUCKET

from semclip_batch.cli import main
from semclip_batch.io import listing
from semclip_batch.io.manifest import read_manifest

PATTERN = "{lot_id}/{wafer_id}/die{die_x}_{die_y}.{ext}"


def _archive(root) -> list[str]:
    keys = [f"LOT{lot}/W{w}/die{x}_{y}.png" for lot in (1, 2) for w in (1, 2) for x in range(2) for y in range(2)]
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png bytes")
    (root / "LOT1" / "W1" / ".DS_Store").write_bytes(b"")
    (root / "LOT1" / ".snapshot" / "die0_0.png").parent.mkdir()  # a hidden folder: its files are hidden too
    (root / "LOT1" / ".snapshot" / "die0_0.png").write_bytes(b"png bytes")
    (root / "LOT1" / "notes.txt").write_text("not a frame")
    return keys


def test_local_prefix_to_csv_that_read_manifest_accepts(tmp_path):
    keys = _archive(tmp_path / "archive")
    out = tmp_path / "m" / "manifest.csv"
    out.parent.mkdir()
    res = CliRunner().invoke(main, ["manifest", "from-prefix", str(tmp_path / "archive"), "--pattern", PATTERN,
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{len(keys)} rows" in res.output and "1 key(s) not matching" in res.output and "LOT1/notes.txt" in res.output
    assert "2 hidden file" in res.output
    df = read_manifest(str(out))
    assert len(df) == len(keys)
    assert sorted(df["lot_id"].unique()) == ["LOT1", "LOT2"] and set(df["die_x"]) == {0, 1}
    assert df["uri"].iloc[0].startswith(str(tmp_path / "archive"))  # absolute: the manifest can live anywhere
    assert (df["url"].map(lambda u: (tmp_path / "archive").as_posix() in u)).all()


def test_relative_prefix_gives_absolute_uris_and_a_failed_listing_leaves_no_file(tmp_path, monkeypatch):
    _archive(tmp_path / "archive")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    listing.from_prefix("archive", PATTERN, "elsewhere/m.csv")
    df = read_manifest(str(tmp_path / "elsewhere" / "m.csv"))
    assert df["url"].iloc[0].startswith(str(tmp_path / "archive"))
    (tmp_path / "elsewhere" / "m.csv").write_text("the earlier manifest\n")

    def broken(*args, **kwargs):
        yield "LOT1/W1/die0_0.png"
        raise OSError("listing interrupted")

    monkeypatch.setattr(listing, "_keys", broken)
    with pytest.raises(OSError, match="interrupted"):
        listing.from_prefix("archive", PATTERN, "elsewhere/m.csv")
    assert (tmp_path / "elsewhere" / "m.csv").read_text() == "the earlier manifest\n"  # untouched
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["m.csv"]  # no partial file left


def test_a_folder_input_skips_hidden_files_and_folders(tmp_path):
    """``run``'s folder input and ``from-prefix`` skip the same keys: a dot-file, and every file below a dot-folder
    (``.snapshot/``, ``.Trash-1000/``), which would otherwise become a wafer called ``.snapshot``."""
    from semclip_batch.io.manifest_files import from_folder

    keys = _archive(tmp_path / "archive")
    (tmp_path / "archive" / "LOT1" / "notes.txt").unlink()  # run refuses a file its pattern does not match
    table = from_folder(str(tmp_path / "archive"), PATTERN, None)
    assert sorted(table.column("wafer_id").to_pylist()) == sorted(k.split("/")[1] for k in keys)


def test_batches_become_row_groups(tmp_path, monkeypatch):
    keys = _archive(tmp_path / "archive")
    monkeypatch.setattr(listing, "BATCH_ROWS", 5)
    listed = listing.from_prefix(str(tmp_path / "archive"), PATTERN, str(tmp_path / "m.parquet"))
    assert listed.rows == len(keys) and listed.unmatched == 1 and listed.hidden == 2
    meta = pq.ParquetFile(tmp_path / "m.parquet").metadata
    assert meta.num_rows == len(keys) and meta.num_row_groups == 4  # 16 rows in batches of 5


@pytest.mark.s3
def test_s3_prefix_to_parquet_on_s3(s3_endpoint):
    s3 = boto3.client("s3")
    keys = [f"listing/raw/LOTA/W0{w}/die{x}_0.png" for w in (1, 2) for x in range(3)]
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    out = f"s3://{BUCKET}/listing/manifests/all.parquet"
    res = CliRunner().invoke(main, ["manifest", "from-prefix", f"s3://{BUCKET}/listing/raw/", "--pattern", PATTERN,
                                    "--out", out])
    assert res.exit_code == 0, res.output
    df = read_manifest(out)
    assert len(df) == len(keys) and set(df["wafer_id"]) == {"W01", "W02"}
    assert set(df["uri"]) == {f"s3://{BUCKET}/{k}" for k in keys}


@pytest.mark.parametrize(("args", "message"), [
    (["--pattern", "{lot_id}/{wafer_id}/{name}.tif"], "nothing listed (17 key(s) do not match"),
    (["--pattern", "{lot_id}/{name}.{ext}"], "must use {lot_id} and {wafer_id}"),
    (["--out-name", "manifest.txt"], "name the manifest .csv or .parquet"),
    (["--prefix", "missing"], "does not exist"),
])
def test_refusals_are_one_line(tmp_path, args, message):
    _archive(tmp_path / "archive")
    prefix, out_name, extra = str(tmp_path / "archive"), "m.csv", list(args)
    if extra[0] == "--out-name":
        out_name, extra = extra[1], []
    elif extra[0] == "--prefix":
        prefix, extra = str(tmp_path / extra[1]), []
    res = CliRunner().invoke(main, ["manifest", "from-prefix", prefix, *extra, "--out", str(tmp_path / out_name)])
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / out_name).exists()


def test_an_object_store_manifest_named_like_a_glob_is_written_as_named(tmp_path):
    """The listing goes to ``OUT.partial`` and is moved onto ``OUT``: by name, not as a pattern (``mv`` and ``rm``
    glob on object stores: ``m[1].csv.partial`` matched ``m1.csv.partial``)."""
    import fsspec

    keys = _archive(tmp_path / "archive")
    base = f"memory://listing-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/m1.csv.partial".removeprefix("memory://"), b"someone else's file")
    listed = listing.from_prefix(str(tmp_path / "archive"), PATTERN, f"{base}/m[1].csv")
    assert listed.rows == len(keys) and len(read_manifest(f"{base}/m[1].csv")) == len(keys)
    assert fs.cat(f"{base}/m1.csv.partial".removeprefix("memory://")) == b"someone else's file"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base.removeprefix("memory://"), detail=False)) == [
        "m1.csv.partial", "m[1].csv"]
