"""KLARF in (`manifest from-klarf`) and out (`export klarf`): files written here in the standard KLARF 1.2
layout, multi-page TIFF image lists, a run on the pages, and the export read back through klarf-reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from semclip_batch.cli import main
from semclip_batch.io.klarf import layout, read_klarf
from semclip_batch.io.klarf_write import render
from semclip_batch.io.manifest import default_image_id, read_manifest

SPEC_17 = ("DEFECTID XREL YREL XINDEX YINDEX XSIZE YSIZE DEFECTAREA DSIZE CLASSNUMBER TEST CLUSTERNUMBER "
           "ROUGHBINNUMBER FINEBINNUMBER REVIEWSAMPLE IMAGECOUNT IMAGELIST")
# (defect id, xindex, yindex, class number, [(image number, image type), ...]) per wafer
WAFERS = {
    "W01": [(1, 2, -3, 11, [(1, 0)]), (2, 2, -3, 12, [(2, 0), (3, 1)]), (3, -1, 4, 11, []), (4, 0, 0, 99, [(4, 0)])],
    "W02": [(1, 5, 5, 12, [(2, 0)]), (7, -2, 1, 13, [(1, 0)])],
}
PAGE_SHAPES = [(256, 256), (200, 240), (160, 320), (240, 200)]  # a page's size tells which page was decoded
CLASS_MAP = "class_number,label\n11,particle\n12,scratch\n13,bridge\n"


def defect_lines(defects) -> list[str]:
    """Defect records as review tools write them: the image list on continuation lines, 1 image per line."""
    lines = []
    for d, x, y, c, images in defects:
        head = f" {d} {100.5 * d:.3f} {50.25 * d:.3f} {x} {y} 1.200 1.300 1.560 1.250 {c} 1 0 0 0 1 {len(images)} {len(images)}"
        lines.append(head)
        lines += [f" {n} {t}" for n, t in images]
    lines[-1] += ";"
    return lines


def write_klarf(path: Path, lot: str = "LOT-K1") -> Path:
    lines = ["FileVersion 1 2;", "FileTimestamp 03-14-24 08:30:00;", 'InspectionStationID "KLA" "eDR7380" "SEM01";',
             "SampleType WAFER;", "ResultTimestamp 03-14-24 09:15:42;", f'LotID "{lot}";', "SampleSize 1 300;",
             'DeviceID "DEV7";', 'SetupID "M1_REVIEW" 03-14-24 08:00:00;', 'StepID "M1";',
             "SampleOrientationMarkType NOTCH;", "OrientationMarkLocation DOWN;", "TiffSpec 6.0 G R;",
             "DiePitch 1.0000000000e+04 1.2000000000e+04;", "DieOrigin 0.0 0.0;",
             "ClassLookup 3", ' 11 "PARTICLE"', ' 12 "SCRATCH"', ' 13 "BRIDGE";']
    for slot, (wafer, defects) in enumerate(WAFERS.items(), start=1):
        lines += [f'WaferID "{wafer}";', f"Slot {slot};", "SampleCenterLocation 1.5e+05 1.5e+05;"]
        tiff = f"TiffFileName {lot}_{wafer}.tif;"
        if wafer == "W01":
            lines.append(tiff)  # before the defect list here, after it on the next wafer
        lines += ["InspectionTest 1;", "SampleTestPlan 2", " 2 -3", " 5 5;", "AreaPerTest 1.0e+10;",
                  f"DefectRecordSpec 17 {SPEC_17} ;", "DefectList", *defect_lines(defects),
                  "SummarySpec 5", " TESTNO NDEFECT DEFDENSITY NDIE NDEFDIE ;", "SummaryList",
                  f" 1 {len(defects)} 1.0e-03 2 2;"]
        if wafer != "W01":
            lines.append(tiff)
    lines.append("EndOfFile;")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tiffs(folder: Path, lot: str = "LOT-K1") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for wafer in WAFERS:
        with tifffile.TiffWriter(folder / f"{lot}_{wafer}.tif") as tif:
            for h, w in PAGE_SHAPES:
                xx = np.mgrid[0:h, 0:w][1]
                frame = 90 + 60 * ((xx // 12) % 2) + rng.normal(0, 8, (h, w))
                tif.write(np.clip(frame, 0, 255).astype(np.uint8))


@pytest.fixture
def klarf_lot(tmp_path) -> tuple[Path, Path]:
    write_tiffs(tmp_path / "images")
    (tmp_path / "classes.csv").write_text(CLASS_MAP)
    return write_klarf(tmp_path / "LOT-K1.001"), tmp_path


def test_from_klarf_rows_match_the_defects_and_their_pages(klarf_lot):
    klarf, root = klarf_lot
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), "--images", str(root / "images"),
                                    "--class-map", str(root / "classes.csv"), "--out", str(root / "m.csv")])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "5 rows from 6 defects on 2 wafer(s)" in res.output
    assert "skipped 1 defect(s) without an image" in res.output and "99 (1)" in res.output
    m = read_manifest(str(root / "m.csv"))
    expected = [(w, d, x, y, images[0][0] - 1) for w, defects in WAFERS.items() for d, x, y, _, images in defects if images]
    got = sorted(zip(m["wafer_id"], m["defect_id"].astype(int), m["die_x"], m["die_y"], m["page"], strict=True))
    assert got == sorted(expected)
    assert set(m["lot_id"]) == {"LOT-K1"} and set(m["lot_time"]) == {"2024-03-14T09:15:42"}
    by_defect = m.set_index(["wafer_id", m["defect_id"].astype(int)])
    assert by_defect.loc[("W01", 1), "label"] == "particle" and by_defect.loc[("W02", 7), "label"] == "bridge"
    assert by_defect.loc[("W01", 4), "label"] == ""  # class 99 is not in the map
    assert by_defect.loc[("W02", 1), "url"] == str(root / "images" / "LOT-K1_W02.tif")  # TiffFileName after the list
    row = by_defect.loc[("W01", 2)]
    assert row["image_id"] == default_image_id(row["uri"], "2", 1)
    raw = pd.read_csv(root / "m.csv", dtype=str, keep_default_na=False)
    assert raw.set_index("defect_id").loc["4", "klarf_class"] == "99"


def _rows_of(manifest: Path) -> list[tuple]:
    m = read_manifest(str(manifest))
    return sorted(zip(m["lot_id"], m["wafer_id"], m["defect_id"], m["die_x"], m["die_y"], m["page"],
                      [u.rsplit("/", 1)[-1] for u in m["url"]], m["label"], strict=True))


def _tiff_before_each_wafer(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("TiffFileName")]
    out = []
    for line in lines:
        if line.startswith("WaferID"):
            out.append(f"TiffFileName LOT-K1_{line.split(chr(34))[1]}.tif;")
        out.append(line)
    return "\n".join(out) + "\n"


VARIANTS = {  # how other tools write the same lot
    "crlf": lambda t: t.replace("\n", "\r\n"),
    "bom and a blank first line": lambda t: "\ufeff\n" + t,
    "tabs, runs of spaces, trailing blanks": lambda t: t.replace("Slot 1;", "Slot\t1;  ").replace(
        "FileVersion 1 2;", "FileVersion  1  2 ;").replace("SampleSize 1 300;", "SampleSize 1 300;\t"),
    "indented records": lambda t: "\n".join("  " + ln if ln[:1].isalpha() and not ln.startswith("FileVersion")
                                            else ln for ln in t.splitlines()) + "\n",
    "unquoted ids": lambda t: t.replace('WaferID "W01";', "WaferID W01;").replace('StepID "M1";', "StepID M1;"),
    "TiffFileName before each WaferID": _tiff_before_each_wafer,
    "Windows paths": lambda t: t.replace("TiffFileName LOT-K1_W01.tif;", r"TiffFileName C:\Review\LOT-K1_W01.tif;"),
    "vendor records named like the reader's": lambda t: t.replace("Slot 1;", 'Slot 1;\nWaferIDAlias "X9";\n'
                                                                  'LotIDSuffix "A";\nSlotMap 1 2;'),
    "a clean wafer": lambda t: t.replace("EndOfFile;", 'WaferID "W03";\nSlot 3;\nSampleCenterLocation 0 0;\n'
                                         f"DefectRecordSpec 17 {SPEC_17};\nDefectList;\nEndOfFile;"),
    "a record after the list's ';'": lambda t: t.replace(" 4 0;\nSummarySpec 5", " 4 0; SummarySpec 5"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_same_lot_written_other_ways_gives_the_same_rows(klarf_lot, tmp_path, variant):
    klarf, root = klarf_lot
    args = ["--images", str(root / "images"), "--class-map", str(root / "classes.csv")]
    assert CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), *args, "--out",
                                     str(tmp_path / "a.csv")]).exit_code == 0
    (tmp_path / "v.001").write_bytes(VARIANTS[variant](klarf.read_text()).encode())
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(tmp_path / "v.001"), *args, "--out",
                                    str(tmp_path / "b.csv")])
    assert res.exit_code == 0, res.output
    assert _rows_of(tmp_path / "b.csv") == _rows_of(tmp_path / "a.csv")


def test_all_images_gives_a_row_per_listed_image(klarf_lot, tmp_path):
    klarf, root = klarf_lot
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), "--images", str(root / "images"),
                                    "--all-images", "--out", str(tmp_path / "all.parquet")])
    assert res.exit_code == 0, res.output
    m = read_manifest(str(tmp_path / "all.parquet"))
    pages = m[(m["wafer_id"] == "W01") & (m["defect_id"] == "2")]["page"].tolist()
    assert sorted(pages) == [1, 2] and len(m) == 6 and m["image_id"].is_unique
    assert set(m["label"]) == {""}  # no class map: labels left for people


def test_layout_keeps_every_value_and_reads_back(klarf_lot):
    klarf, _ = klarf_lot
    text = klarf.read_text()
    laid = layout(text, str(klarf))
    again = layout(render(laid), "rendered")
    assert [(f.wafer_id, f.records, f.images, f.tiff_file) for f in again.lists] == \
           [(f.wafer_id, f.records, f.images, f.tiff_file) for f in laid.lists]
    assert laid.lists[0].images[1] == [(2, 0), (3, 1)] and laid.lists[1].tiff_file == "LOT-K1_W02.tif"


def test_one_image_read_by_two_defects_is_refused_naming_them(klarf_lot, tmp_path):
    klarf, root = klarf_lot
    (tmp_path / "rescan.001").write_text(klarf.read_text())
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), str(tmp_path / "rescan.001"), "--images",
                                    str(root / "images"), "--out", str(tmp_path / "m.csv")])
    assert res.exit_code != 0 and "reads the image" in res.output and "LOT-K1.001 wafer W01 defect 1" in res.output
    two_lots = klarf.read_text().replace('Slot 2;', 'Slot 2;\nLotID "LOT-K9";')
    (tmp_path / "two.001").write_text(two_lots)
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(tmp_path / "two.001"), "--images", str(root),
                                    "--out", str(tmp_path / "m.csv")])
    assert res.exit_code != 0 and "holds several lots ('LOT-K1', 'LOT-K9')" in res.output


def test_images_template_and_padded_image_names(klarf_lot, tmp_path):
    klarf, _ = klarf_lot
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), "--images", "s3://fab/{lot_id}/review",
                                    "--image-name", "{wafer_id}/{defect_id:05d}.png", "--out", str(tmp_path / "m.csv")])
    assert res.exit_code == 0, res.output
    urls = set(read_manifest(str(tmp_path / "m.csv"))["url"])
    assert "s3://fab/LOT-K1/review/LOT-K1_W01.tif" in urls and "s3://fab/LOT-K1/review/W01/00003.png" in urls


def test_a_reader_style_file_without_images_and_one_file_per_defect(tmp_path):
    """The layout of klarfio's own example (no image list, a defect id repeated, the wafer id record over two
    lines, a test plan over two lines, the list's ';' on its own line), read with --image-name naming one file
    per defect by its position."""
    text = "\n".join([
        "FileVersion 1 2;", "FileTimeStamp 12-04-23 11:06:21;", 'InspectionStationID "VND" "1000" "TOOL41";',
        "SampleType WAFER;", "ResultTimestamp 12-04-23 11:07:26;", 'LotID "A 17";', "SampleSize 1 300;",
        'DeviceID "6527";', 'SetupID "SETUP_1" 12-04-23 10:00:00;', 'StepID "STEP_1";',
        "SampleOrientationMarkType NOTCH;", "OrientationMarkLocation DOWN;",
        "DiePitch 1.5196202529E+005 1.4927226241E+005;", "DieOrigin 0.0000000000E+000 0.0000000000E+000;",
        'WaferID "EJ-59-50" ', " Lrt 1;", "Slot 0;", "SampleCenterLocation 1.1155190315E+004 9.3489813130E+004;",
        "InspectionTest 1;", "SampleTestPlan 0 ", " 0 0;", "AreaPerTest 2.5993025260E+010;",
        f"DefectRecordSpec 17 {SPEC_17};", "DefectList ",
        " 0 99987.06 7257.76 0 0 1588.45 106.00 2150202.89 0.0 0 0 0 1469 0 0 0 0",
        " 0 9894.07 2429.43 0 0 1256.41 70.66 455963.20 0.0 0 1 1 1777 0 0 0 0",
        " 9 19410.75 708.84 1 -2 1217.85 128.85 2706582.63 0.0 5 0 1 1548 0 0 0 0", ";",
        "SummarySpec 6 ", " TESTNO NDEFECT DEFDENSITY NDIE NDEFDIE;", "SummaryList", " 0 2 5.3E-001 383 392;",
        "EndOfFile;"])
    (tmp_path / "a17.klarf").write_text(text)
    found = read_klarf(str(tmp_path / "a17.klarf"))
    assert [(d.wafer_id, d.defect_id, d.die_x, d.die_y, d.class_number, d.index) for d in found] == \
           [("EJ-59-50", 0, 0, 0, 0, 1), ("EJ-59-50", 0, 0, 0, 0, 2), ("EJ-59-50", 9, 1, -2, 5, 3)]
    args = ["manifest", "from-klarf", str(tmp_path / "a17.klarf"), "--images", str(tmp_path / "img"), "--out",
            str(tmp_path / "m.csv")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "give --image-name" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, [*args, "--image-name", "{wafer_id}/{defect_id}.png"])
    assert res.exit_code != 0 and "defect 0 (#2) reads the image" in res.output  # the id repeats in this file
    res = CliRunner().invoke(main, [*args, "--image-name", "{wafer_id}/{index:03d}.png"])
    assert res.exit_code == 0, res.output
    m = read_manifest(str(tmp_path / "m.csv"))
    assert m["url"].tolist() == [str(tmp_path / "img" / "EJ-59-50" / f"{k:03d}.png") for k in (1, 2, 3)]
    assert m["defect_id"].tolist() == ["0", "0", "9"] and m["die_x"].tolist() == [0, 0, 1]
    assert m["lot_id"].tolist() == ["A 17"] * 3 and m["page"].tolist() == [None] * 3


@pytest.mark.parametrize("text, message", [
    ('Record FileRecord "1.8"\n{\n}\n', "is KLARF 1.8"),
    ("hello;\n", "is not a KLARF file"),
    ("FileVersion 1 2;\nDefectRecordSpec 3 DEFECTID IMAGECOUNT IMAGELIST;\nDefectList\n 1 1 2 1 0;\nEndOfFile;\n",
     "IMAGELIST of 2 images is cut short"),
    ("FileVersion 1 2;\nDefectRecordSpec 2 DEFECTID CLASSNUMBER;\nDefectList\n 1 0;\nEndOfFile;\n",
     "could not be parsed by klarf-reader"),
    ("FileVersion 1 2;\nDefectRecordSpec 2 DEFECTID CLASSNUMBER;\nDefectList\n 1 0\n", "never ends"),
])
def test_broken_klarfs_are_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "bad.klarf").write_text(text)
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(tmp_path / "bad.klarf"), "--images", str(tmp_path),
                                    "--out", str(tmp_path / "m.csv")])
    assert res.exit_code != 0 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("extra, message", [
    (["--image-name", "{wafer}/{defect_id}.tif"], "unknown field {wafer}"),
    (["--image-name", "../{defect_id}.tif"], "must be a path below --images"),
    (["--image-name", "{defect_id!r}.tif"], "no !r / !s / !a conversions"),
    (["--image-name", "{wafer_id:05d}/{defect_id}.tif"], "Unknown format code"),
    (["--class-map", "missing.csv"], "does not exist"),
    (["--class-map", "nulls.json"], "give a JSON object of class number -> class name"),
])
def test_bad_options_are_refused_in_one_line(klarf_lot, extra, message):
    klarf, root = klarf_lot
    (root / "nulls.json").write_text('{"11": null}')
    extra = [str(root / e) if e.endswith((".csv", ".json")) else e for e in extra]
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), "--images", str(root / "images"), *extra,
                                    "--out", str(root / "m.csv")])
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_scores_the_listed_pages_and_export_reads_back(ray_cluster, klarf_lot, tmp_path):
    from klarf_reader.klarf import Klarf

    from semclip_batch.analysis.results import read_predictions
    from semclip_batch.io.masks import mask_array

    klarf, root = klarf_lot
    manifest, out = tmp_path / "m.csv", tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(main, ["manifest", "from-klarf", str(klarf), "--images", str(root / "images"),
                               "--class-map", str(root / "classes.csv"), "--out", str(manifest)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["run", str(manifest), "--out", str(out), "--backbone", "semclip-tiny", "--pretrained",
                               "none", "--batch-size", "4", "--threshold", "0.0"])
    assert res.exit_code == 0, res.output
    pred = read_predictions(str(out)).to_pandas()
    m = read_manifest(str(manifest)).set_index("image_id")
    assert len(pred) == len(m) and set(pred["status"]) == {"ok"}
    root_group = zarr.open_group(str(out / "masks.zarr"), mode="r")
    for row in pred.itertuples():
        shape = mask_array(root_group, row.mask_path)[row.mask_index].shape
        assert shape == PAGE_SHAPES[m.loc[row.image_id, "page"]]  # each defect's own page was scored

    from semclip_batch.analysis.report import write_report
    from semclip_batch.analysis.report_frames import plan_pages
    from semclip_batch.io.layout import OutLayout

    assert plan_pages(OutLayout(str(out)), {}) == m["page"].to_dict()  # overlays read each defect's page
    index = Path(write_report(str(out), top_n=5))
    assert "not readable" not in (index.parent / "lot-LOT-K1.html").read_text()

    ours = {(m.loc[r.image_id, "wafer_id"], int(m.loc[r.image_id, "defect_id"])): r.defect_class for r in pred.itertuples()}
    numbers = {"particle": 11, "scratch": 12, "bridge": 13}
    res = runner.invoke(main, ["export", "klarf", str(out), "--lot", "LOT-K1", "--klarf", str(klarf), "--class-map",
                               str(root / "classes.csv"), "--out", str(tmp_path / "back.001")])
    assert res.exit_code == 0, res.output
    assert "5 defect(s) classified; 1 defect(s) not scored kept their class" in res.output
    back, before = Klarf.load_from_file(tmp_path / "back.001"), read_klarf(str(klarf))
    original = {(d.wafer_id, d.defect_id): d for d in before}
    for wafer in back.wafers:
        for d in wafer.defects:
            key, old = (wafer.id, d.id), original[(wafer.id, d.id)]
            want = numbers.get(ours[key], 0) if key in ours else old.class_number
            assert d.class_number == want, key
            assert (d.x_index, d.y_index) == (old.die_x, old.die_y)
    assert [d.images for d in read_klarf(str(tmp_path / "back.001"))] == [d.images for d in before]
    defect_lines = ("DefectList", " ")
    kept = [ln for ln in klarf.read_text().splitlines() if not ln.startswith(defect_lines)]
    assert [ln for ln in (tmp_path / "back.001").read_text().splitlines() if not ln.startswith(defect_lines)] == kept

    other = klarf.read_text().replace(" 2 -3 1.200", " 9 9 1.200")  # another step's KLARF of the lot
    (tmp_path / "other.001").write_text(other)
    for extra, message in ((["--klarf", str(tmp_path / "other.001")], "is on die (9, 9), the run scored it on die"),
                           (["--klarf", str(klarf), "--out", str(klarf)], "is the --klarf source"),
                           (["--out", str(out / "predictions" / "x.001")], "is inside OUT")):
        res = runner.invoke(main, ["export", "klarf", str(out), "--lot", "LOT-K1", "--out", str(tmp_path / "x.001"),
                                   *extra])
        assert res.exit_code != 0 and message in res.output, res.output
    assert not (tmp_path / "x.001").exists() and not (out / "predictions" / "x.001").exists()

    res = runner.invoke(main, ["export", "klarf", str(out), "--lot", "LOT-K1", "--out", str(tmp_path / "new.001")])
    assert res.exit_code == 0, res.output
    fresh = Klarf.load_from_file(tmp_path / "new.001")
    assert fresh.lot_id == "LOT-K1" and sorted(w.id for w in fresh.wafers) == ["W01", "W02"]
    assert sorted((w.id, d.id) for w in fresh.wafers for d in w.defects) == sorted(ours)
    res = runner.invoke(main, ["export", "klarf", str(out), "--lot", "NOPE", "--out", str(tmp_path / "x.001")])
    assert res.exit_code != 0 and "no predictions for lot 'NOPE'" in res.output and "LOT-K1" in res.output


@pytest.mark.s3
def test_klarf_and_multi_page_tiffs_on_s3(s3_endpoint, klarf_lot):
    import fsspec
    from conftest import BUCKET

    from semclip_batch.io.frames import load_frame

    klarf, root = klarf_lot
    fs = fsspec.filesystem("s3")
    prefix = f"{BUCKET}/klarf-test"
    fs.put(str(klarf), f"{prefix}/LOT-K1.001")
    for tif in (root / "images").iterdir():
        fs.put(str(tif), f"{prefix}/images/{tif.name}")
    res = CliRunner().invoke(main, ["manifest", "from-klarf", f"s3://{prefix}/LOT-K1.001", "--images",
                                    f"s3://{prefix}/images", "--out", f"s3://{prefix}/m.parquet"])
    assert res.exit_code == 0, res.output
    m = read_manifest(f"s3://{prefix}/m.parquet")
    assert m["url"].str.startswith(f"s3://{prefix}/images/LOT-K1_W0").all() and len(m) == 5
    for row in m.itertuples():
        assert load_frame(row.url, page=row.page).shape == PAGE_SHAPES[row.page]


def _scored_out(out: Path) -> Path:
    """A minimal OUT as `run` leaves it for one lot (no Ray): W01 defect 1 scored as a particle, its plan row
    recording the defect id."""
    lot = out / "predictions" / "lot_id=LOT-K1"
    lot.mkdir(parents=True)
    pd.DataFrame({"image_id": ["i1"], "uri": ["/x/LOT-K1_W01.tif"], "wafer_id": ["W01"], "die_x": [2], "die_y": [-3],
                  "status": ["ok"], "is_defect": [True], "defect_class": ["particle"], "anomaly_score": [0.99]}
                 ).to_parquet(lot / "s00000.parquet")
    (out / "_state" / "plan").mkdir(parents=True)
    pd.DataFrame({"image_id": ["i1"], "lot_id": ["LOT-K1"], "defect_id": ["1"]}).to_parquet(
        out / "_state" / "plan" / "p00000.parquet")
    return out


def test_export_never_writes_over_the_class_map_or_the_klarf_it_reads(klarf_lot, tmp_path):
    klarf, root = klarf_lot
    out, class_map = _scored_out(tmp_path / "out"), root / "classes.csv"
    runner = CliRunner()
    res = runner.invoke(main, ["export", "klarf", str(out), "--lot", "LOT-K1", "--class-map", str(class_map),
                               "--out", str(tmp_path / "ok.001")])
    assert res.exit_code == 0 and "1 defect(s) classified" in res.output, res.output  # the OUT is a usable one
    (tmp_path / "link.csv").symlink_to(class_map)
    for extra, message in (
            (["--class-map", str(class_map), "--out", str(class_map)], "is the --class-map file this command reads"),
            (["--class-map", str(tmp_path / "link.csv"), "--out", str(class_map)], "is the --class-map file"),
            (["--class-map", str(class_map), "--klarf", str(klarf), "--out", str(root / "." / klarf.name)],
             "is the --klarf source")):
        res = runner.invoke(main, ["export", "klarf", str(out), "--lot", "LOT-K1", *extra])
        assert res.exit_code != 0 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert class_map.read_text() == CLASS_MAP and klarf.read_text().startswith("FileVersion")


def test_export_out_inside_out_is_refused_through_a_link_or_a_file_url(tmp_path):
    out = _scored_out(tmp_path / "out")
    (tmp_path / "link").symlink_to(out)
    runner = CliRunner()
    for root, dest in ((str(out), f"file://{out}/x.001"), (str(out), str(tmp_path / "link" / "x.001")),
                       (str(tmp_path / "link"), str(out / "x.001")), (f"file://{out}", str(out / "lot.001"))):
        res = runner.invoke(main, ["export", "klarf", root, "--lot", "LOT-K1", "--out", dest])
        assert res.exit_code != 0 and "is inside OUT" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert sorted(p.name for p in out.iterdir()) == ["_state", "predictions"]
    res = runner.invoke(main, ["export", "klarf", str(tmp_path / "link"), "--lot", "LOT-K1",
                               "--out", f"file://{tmp_path}/outside.001"])
    assert res.exit_code == 0 and (tmp_path / "outside.001").exists(), res.output


def test_export_of_a_lot_the_run_has_not_finished_is_refused(tmp_path):
    """A run killed (or a shard not stored) leaves some of a lot's planned rows without predictions: a KLARF of it
    would lack their defects without a word."""
    out = _scored_out(tmp_path / "out")
    pd.DataFrame({"image_id": ["i2", "j1"], "lot_id": ["LOT-K1", "LOT-K2"], "defect_id": ["2", "1"]}).to_parquet(
        out / "_state" / "plan" / "p00001.parquet")
    runner = CliRunner()
    for lot, stored in (("LOT-K1", "1 of its 2 rows are stored"), ("LOT-K2", "0 of its 1 rows are stored")):
        res = runner.invoke(main, ["export", "klarf", str(out), "--lot", lot, "--out", str(tmp_path / "k.001")])
        assert res.exit_code != 0 and f"is not finished in {out}: {stored}" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "k.001").exists()


@pytest.mark.parametrize(("wafer", "kept"), [('W"1', False), ("W\n1", False), ("W\r1", False), ("W\t1", True)])
def test_ids_a_klarf_string_cannot_carry_are_refused_naming_them(tmp_path, wafer, kept):
    out = _scored_out(tmp_path / "out")
    part = out / "predictions" / "lot_id=LOT-K1" / "s00000.parquet"
    pd.read_parquet(part).assign(wafer_id=[wafer]).to_parquet(part)
    res = CliRunner().invoke(main, ["export", "klarf", str(out), "--lot", "LOT-K1", "--out", str(tmp_path / "k.001")])
    if kept:  # a tab reads back as written (klarf-reader, another project's reader)
        from klarf_reader.klarf import Klarf

        assert res.exit_code == 0, res.output
        assert [w.id for w in Klarf.load_from_file(tmp_path / "k.001").wafers] == [wafer]
        return
    assert res.exit_code != 0 and f"the wafer id {wafer!r} holds a double quote or a control character" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "k.001").exists()


def test_from_klarf_never_writes_over_the_class_map_or_a_klarf_it_reads(klarf_lot):
    klarf, root = klarf_lot
    (root / "k.csv").write_text(klarf.read_text())  # a KLARF named like a manifest
    for out, klarfs, message in ((root / "classes.csv", [klarf], "is the --class-map file this command reads"),
                                 (root / "k.csv", [klarf, root / "k.csv"], "is the KLARF")):
        res = CliRunner().invoke(main, ["manifest", "from-klarf", *map(str, klarfs), "--images", str(root / "images"),
                                        "--class-map", str(root / "classes.csv"), "--out", str(out)])
        assert res.exit_code != 0 and message in res.output, res.output
    assert (root / "classes.csv").read_text() == CLASS_MAP and (root / "k.csv").read_text() == klarf.read_text()


@pytest.mark.parametrize("name", ["../../data/x.tif", "sub/../../x.tif", ".."])
def test_a_tiff_file_name_leaving_images_is_refused_naming_the_defect(klarf_lot, name):
    klarf, root = klarf_lot
    klarf.write_text(klarf.read_text().replace("TiffFileName LOT-K1_W01.tif;", f'TiffFileName "{name}";'))
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), "--images", str(root / "images"),
                                    "--out", str(root / "m.csv")])
    assert res.exit_code != 0, res.output
    assert "wafer W01 defect 1 (#1): TiffFileName" in res.output and "leaves --images" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (root / "m.csv").exists()


@pytest.mark.parametrize("name, below", [("/review/LOT-K1_W01.tif", "review/LOT-K1_W01.tif"),
                                         ("..\\..\\LOT-K1_W01.tif", "LOT-K1_W01.tif")])
def test_absolute_and_windows_tiff_file_names_stay_below_images(klarf_lot, name, below):
    klarf, root = klarf_lot
    klarf.write_text(klarf.read_text().replace("TiffFileName LOT-K1_W01.tif;", f'TiffFileName "{name}";'))
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), "--images", str(root / "images"),
                                    "--out", str(root / "m.csv")])
    assert res.exit_code == 0, res.output
    assert f"{root / 'images'}/{below}" in set(read_manifest(str(root / "m.csv"))["url"])


def test_ids_that_lead_out_of_images_are_refused(klarf_lot):
    klarf, root = klarf_lot
    klarf.write_text(klarf.read_text().replace('WaferID "W01";', 'WaferID "..";'))
    for extra in (["--images", str(root / "images" / "{wafer_id}")],
                  ["--images", str(root / "images"), "--image-name", "{wafer_id}/{defect_id}.tif"]):
        res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), *extra, "--out", str(root / "m.csv")])
        assert res.exit_code != 0 and "which leaves --images" in res.output, res.output


def test_images_that_is_a_file_is_refused(klarf_lot):
    klarf, root = klarf_lot
    res = CliRunner().invoke(main, ["manifest", "from-klarf", str(klarf), "--images", str(klarf),
                                    "--out", str(root / "m.csv")])
    assert res.exit_code != 0 and "--images" in res.output and "is a file" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (root / "m.csv").exists()
