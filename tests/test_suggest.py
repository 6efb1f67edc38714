"""``suggest``: the rule on hand-made scores, and the command on an OUT written by the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from semclip_batch.analysis.results import read_predictions
from semclip_batch.analysis.suggest import SuggestConfig, manifest_rows, suggest, write_manifest
from semclip_batch.analysis.suggest_rule import (
    FixedEmbeddings,
    Scores,
    Weights,
    class_uncertainty,
    diverse_pick,
    informativeness,
    map_peak,
    reason,
    select,
    terms,
)
from semclip_batch.cli import main
from semclip_batch.config import ModelSpec, RunConfig
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.decisions import anomaly_score
from semclip_batch.pipeline.driver import run

LABELLED = 2  # rows of the run's manifest that keep their label: never suggested


def scored(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Candidate rows' anomaly scores and class scores' normal entries, as suggest hands them to map_peaks."""
    return rows["anomaly_score"].to_numpy(dtype=np.float64), np.array([float(v[0]) for v in rows["class_scores"]])


def scores(probs: list[list[float]], score: list[float], peak: list[float]) -> Scores:
    return Scores(np.array(probs), np.array(score), np.array(peak), 0.9, 0.9)


# ---- the rule ---------------------------------------------------------------------------------------------------------

def test_class_uncertainty_is_one_minus_the_top_two_margin():
    u = class_uncertainty(np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(u, [1.0, 0.15, 0.8, 0.0])


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_map_peak_inverts_anomaly_score(mode):
    for p_normal, peak in [(0.1, 0.93), (0.8, 0.2), (0.0, 1.0), (1.0, 0.0)]:
        s = anomaly_score(p_normal, peak, mode)
        assert map_peak(np.array([s]), np.array([p_normal]), mode)[0] == pytest.approx(peak)


def test_uncertain_rows_rank_above_confident_ones():
    confident = [0.97, 0.01, 0.01, 0.01]
    torn = [0.40, 0.38, 0.12, 0.10]
    s = scores([confident, torn, confident, torn], score=[0.2, 0.88, 0.99, 0.91], peak=[0.1, 0.91, 0.5, 0.89])
    u = informativeness(s, Weights())
    assert min(u[1], u[3]) > max(u[0], u[2])
    for shortlist in (1, 4):
        picked, _ = select(s, FixedEmbeddings(np.eye(4)), 2, Weights(), shortlist, seed=0)
        assert sorted(picked) == [1, 3]
    # each term alone orders the rows by its own quantity
    assert np.argmax(informativeness(s, Weights(0, 1, 0))) == 3  # score 0.91 is nearest the threshold 0.9
    assert np.argmax(informativeness(s, Weights(0, 0, 1))) in (1, 3)  # peaks 0.91 and 0.89, both 0.01 away


def test_near_duplicates_are_never_both_chosen():
    emb = np.eye(5)
    emb[1] = emb[0]  # frame 1 is frame 0 again (the most informative pair)
    u = np.array([1.0, 0.99, 0.5, 0.4, 0.3])
    assert diverse_pick(u, emb, 3) == [0, 2, 3]
    assert diverse_pick(u, emb, 5) == [0, 2, 3, 4]  # fewer than asked rather than a frame twice
    emb[2] = np.nan  # a frame that cannot be read any more is never picked
    assert 2 not in diverse_pick(u, emb, 5)


def test_default_takes_the_most_informative_and_skips_their_twins():
    probs = [[0.40, 0.38, 0.22], [0.40, 0.38, 0.22], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.98, 0.01, 0.01]]
    s = scores(probs, score=[0.5] * 5, peak=[0.5] * 5)
    emb = np.eye(5)
    emb[1] = emb[0]
    seen: list[list[int]] = []

    def embed(idx):
        seen.append(list(idx))
        return emb[idx]

    embed.duplicate = 1e-3  # type: ignore[attr-defined]
    picked, _ = select(s, embed, 3, Weights(1, 0, 0), 1, seed=0)
    assert picked[0] in (0, 1) and picked[1:] == [2, 3]  # one of the twins, then the next most uncertain
    assert seen[0] == sorted(seen[0], key=lambda i: -class_uncertainty(np.array(probs))[i])  # most informative first
    assert select(s, FixedEmbeddings(emb), 3, Weights(1, 0, 0), 1, seed=0)[0] == picked


def test_page_and_defect_id_are_carried_when_the_plan_sets_them(tmp_path):
    rows = pd.DataFrame({"image_id": ["a", "b"], "url": ["/x/a.tif", "/x/b.tif"], "reference_url": ["", "/x/r.tif"],
                         "lot_id": ["001", "001"], "wafer_id": ["W1", "W1"], "die_x": [3, None], "die_y": [4, None],
                         "page": [None, 2], "defect_id": ["", "17"]})
    s = scores([[0.5, 0.5], [0.9, 0.1]], score=[0.5, 0.9], peak=[0.3, 0.9])
    write_manifest(manifest_rows(rows, s, [1, 0], ["normal", "particle"]), str(tmp_path / "m.csv"), {})
    back = read_manifest(str(tmp_path / "m.csv"))
    assert list(back["image_id"]) == ["b", "a"] and list(back["page"]) == [2, None]
    assert list(back["lot_id"]) == ["001", "001"] and list(back["die_x"]) == [None, 3]
    assert list(back["reference_uri"]) == ["/x/r.tif", ""] and list(back["defect_id"]) == ["17", ""]
    no_pages = manifest_rows(rows.assign(page=None, defect_id=None), s, [0], ["normal", "particle"])
    assert "page" not in no_pages.columns and "defect_id" not in no_pages.columns


def test_weights_must_be_usable():
    with pytest.raises(Exception, match="weights"):
        Weights(0, 0, 0)


# ---- the command on a real OUT -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(ray_cluster, synth_lot, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A run of the synthetic lots (labels dropped but on LABELLED rows), three frames listed twice (same file,
    other defect_id: near-duplicates) and a missing file (a read_error row)."""
    root = tmp_path_factory.mktemp("suggest")
    m = pd.read_csv(synth_lot / "manifest.csv", dtype=str, keep_default_na=False)
    for col in ("uri", "mask_uri", "reference_uri"):
        m[col] = [str(synth_lot / u) for u in m[col]]
    m.loc[LABELLED:, ["label", "mask_uri"]] = ""
    twins = m.iloc[LABELLED:LABELLED + 3].assign(defect_id="again")
    missing = pd.DataFrame([{"uri": str(root / "gone.png"), "lot_id": m["lot_id"][0], "wafer_id": "W9"}])
    manifest = pd.concat([m, twins, missing], ignore_index=True).fillna("")
    manifest.to_csv(root / "manifest.csv", index=False)
    out = root / "out"
    run(RunConfig(input=str(root / "manifest.csv"), out=str(out), shard_size=8, batch_size=8,
                  model=ModelSpec(backbone="semclip-tiny", pretrained="none", seed=0)))
    return out, read_predictions(str(out)).to_pandas()


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and fragment in lines[0], result.output


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_suggested_manifest_is_ready_for_train(finished, tmp_path):
    out, preds = finished
    dest = tmp_path / "to-label.csv"
    result = invoke("suggest", str(out), "--n", "6", "--out", str(dest))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "image embeddings of backbone semclip-tiny" in result.output
    rows = read_manifest(str(dest))
    raw = pd.read_csv(dest, dtype=str, keep_default_na=False)
    assert len(rows) == 6 and list(raw["suggest_rank"]) == [str(k) for k in range(1, 7)]
    assert (raw["label"] == "").all() and (raw["mask_uri"] == "").all() and (raw["suggest_reason"] != "").all()
    assert {"uri", "lot_id", "wafer_id", "image_id", "die_x", "die_y", "reference_uri"} <= set(raw.columns)
    assert "page" not in raw.columns  # no frame of this manifest names a page
    by_id = preds.set_index("image_id")
    assert set(by_id.loc[rows["image_id"], "status"]) == {"ok"}  # never an error row
    assert all(Path(u).is_absolute() and Path(u).exists() for u in rows["uri"])
    assert list(rows["lot_id"]) == list(by_id.loc[rows["image_id"], "lot_id"])
    labelled = set(pd.read_csv(out.parent / "manifest.csv", dtype=str, keep_default_na=False)["uri"][:LABELLED])
    assert not labelled & set(rows["uri"])  # frames labelled in the run's manifest are skipped
    assert rows["uri"].is_unique  # 12 distinct unlabelled frames exist: a frame and its twin never both


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_labelled_suggestions_train(finished, synth_lot, tmp_path):
    """The labelling loop: suggest, fill label (here from the synthetic truth), train on it."""
    out, _ = finished
    suggest(SuggestConfig(out=str(out), dest=str(tmp_path / "s.csv"), n=6))
    truth = pd.read_csv(synth_lot / "manifest.csv", dtype=str, keep_default_na=False)
    label_of = {str(synth_lot / u): lab for u, lab in zip(truth["uri"], truth["label"], strict=True)}
    filled = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    filled["label"] = [label_of[u] for u in filled["uri"]]
    filled.to_csv(tmp_path / "filled.csv", index=False)
    result = invoke("train", "--adapt-steps", "0", str(tmp_path / "filled.csv"), "--out", str(tmp_path / "ckpt"), "--backbone",
                    "semclip-tiny", "--pretrained", "none", "--epochs", "1", "--recipe", "paper")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["training"]["support_rows"] == 6


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deterministic_and_parquet_reads_back(finished, tmp_path):
    out, _ = finished
    cfg = SuggestConfig(out=str(out), dest=str(tmp_path / "a.parquet"), n=5, seed=3)
    first = suggest(cfg)
    again = suggest(SuggestConfig(out=str(out), dest=str(tmp_path / "b.parquet"), n=5, seed=3))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert list(read_manifest(str(tmp_path / "a.parquet"))["image_id"]) == list(first.rows["image_id"])
    assert list(again.rows["suggest_reason"]) == list(first.rows["suggest_reason"])
    diverse = suggest(SuggestConfig(out=str(out), dest=str(tmp_path / "c.parquet"), n=5, seed=3, shortlist=4))
    assert len(diverse.rows) == 5 and diverse.rows["uri"].is_unique


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_class_uncertainty_alone_picks_the_smallest_margins(finished, tmp_path):
    out, preds = finished
    ok = preds[preds["status"] == "ok"].copy()
    labelled = set(pd.read_csv(out.parent / "manifest.csv", dtype=str, keep_default_na=False)["uri"][:LABELLED])
    ok = ok[~ok["uri"].isin(labelled)].drop_duplicates("uri")  # a frame listed twice is suggested once
    top2 = np.sort(np.stack(ok["class_scores"].to_numpy()), axis=1)[:, -2:]
    ok["margin"] = top2[:, 1] - top2[:, 0]
    got = suggest(SuggestConfig(out=str(out), dest=str(tmp_path / "m.csv"), n=4, weights=Weights(1, 0, 0)))
    margins = preds.set_index("image_id").loc[got.rows["image_id"], "class_scores"]
    got_margins = [float(np.diff(np.sort(m)[-2:])[0]) for m in margins]
    assert sorted(ok.nsmallest(4, "margin")["margin"]) == pytest.approx(sorted(got_margins), abs=1e-6)  # near-ties


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_pixel_term_reads_each_frames_peak_from_its_stored_mask(finished, tmp_path):
    """Where a frame took no defect view its peak follows from anomaly_score and p(normal); where it took one (its
    class scores' normal entry is then two views' mean) it is read from masks.zarr; either way it is the stored
    mask's peak to 1/255. Frames whose masks cannot be read rank last on the term, the rest keep their peaks, and
    with none readable every peak is NaN."""
    import shutil

    import zarr

    from semclip_batch.analysis.map_peaks import map_peaks, mask_peaks
    from semclip_batch.analysis.suggest import candidates, finished_record
    from semclip_batch.io.layout import OutLayout

    out, _ = finished
    layout = OutLayout(str(out))
    record = finished_record(layout, {})
    rows = candidates(str(out), record, {})
    root = zarr.open_group(str(out / "masks.zarr"), mode="r")
    truth = np.array([root[r.mask_path][int(r.mask_index)].max() / 255.0 for r in rows.itertuples()])
    assert np.array_equal(mask_peaks(layout, rows, {}), truth)
    assert not record["preprocessing"].get("defect_view")  # the library's ModelSpec: no defect view, no mask read
    formula = map_peaks(layout, rows, *scored(rows), record, {})
    assert np.abs(formula - truth).max() <= 0.5 / 255 + 1e-6 and not np.array_equal(formula, truth)
    # as if the model input were 150 px: frames of 300 px or more (these lots' are 200-320 px) took a defect view
    viewed = {**record, "preprocessing": {**record["preprocessing"], "defect_view": True, "image_size": 150}}
    big = np.array([max(map(int, str(p).rsplit("/", 1)[-1].split("x"))) >= 300 for p in rows["mask_path"]])
    assert big.any() and not big.all()
    read = map_peaks(layout, rows, *scored(rows), viewed, {})
    assert np.array_equal(read[big], truth[big]) and np.array_equal(read[~big], formula[~big])

    got = suggest(SuggestConfig(out=str(out), dest=str(tmp_path / "m.csv"), n=3, weights=Weights(0, 0, 1)))
    labelled = set(pd.read_csv(out.parent / "manifest.csv", dtype=str, keep_default_na=False)["uri"][:LABELLED])
    fresh = ~rows["url"].isin(labelled).to_numpy()
    distance = pd.Series(np.abs(formula - record["thresholds"]["pixel"]), index=rows["image_id"])[fresh]
    assert distance.loc[got.rows["image_id"].iloc[0]] == distance.min()  # the first pick: the peak nearest it

    broken = tmp_path / "copy"
    shutil.copytree(out, broken)
    first = str(rows["mask_path"].iloc[0])
    shutil.rmtree(broken / "masks.zarr" / first)
    peaks = mask_peaks(OutLayout(str(broken)), rows, {})
    gone = (rows["mask_path"] == first).to_numpy()
    assert np.isnan(peaks[gone]).all() and np.array_equal(peaks[~gone], truth[~gone])
    shutil.rmtree(broken / "masks.zarr")
    assert np.isnan(mask_peaks(OutLayout(str(broken)), rows, {})).all()  # logged, not raised


def test_an_unread_peak_ranks_last_and_is_never_given_as_a_reason():
    s = scores([[0.5, 0.5]] * 3, score=[0.5] * 3, peak=[float("nan"), 0.85, 0.2])
    t = terms(s)
    assert t["pixel"].tolist() == [0.0, 1.0, 0.5]
    nothing = scores([[0.5, 0.5]] * 2, score=[0.5, 0.5], peak=[float("nan")] * 2)  # no mask read at all
    assert "map peak" not in reason(nothing, terms(nothing), 0, ["normal", "particle"])


def _stored_masks(tmp_path: Path) -> tuple[object, pd.DataFrame, np.ndarray]:
    """A plain masks.zarr of 6 masks of 8 x 8 (one chunk each) and candidate rows pointing at them."""
    import zarr

    from semclip_batch.io.layout import OutLayout

    layout = OutLayout(str(tmp_path / "out"))
    masks = np.zeros((6, 8, 8), np.uint8)
    for k in range(6):
        masks[k, k, k] = 40 * k + 10
    root = zarr.open_group(layout.masks, mode="w", zarr_format=3)
    root.create_array("L1/s00000/8x8", data=masks, chunks=(1, 8, 8))
    rows = pd.DataFrame({"mask_path": ["L1/s00000/8x8"] * 6, "mask_index": [5, 0, 3, 3, 1, 2]})
    return layout, rows, masks.reshape(6, -1).max(axis=1)[rows["mask_index"]] / 255.0


def test_mask_peaks_read_each_rows_mask_and_survive_a_bad_block(tmp_path, monkeypatch, caplog):
    from semclip_batch.analysis import map_peaks as module

    layout, rows, truth = _stored_masks(tmp_path)
    assert np.array_equal(module.mask_peaks(layout, rows, {}), truth)
    monkeypatch.setattr(module, "MASK_BLOCK_BYTES", 2 * 64)  # blocks of 2 masks
    assert np.array_equal(module.mask_peaks(layout, rows, {}), truth)

    past = pd.concat([rows, pd.DataFrame({"mask_path": ["L1/s00000/8x8"] * 2, "mask_index": [6, -1]})],
                     ignore_index=True)
    peaks = module.mask_peaks(layout, past, {})
    assert np.array_equal(peaks[:6], truth) and np.isnan(peaks[6:]).all()  # -1 does not wrap to the last mask
    assert "2 rows index past it" in caplog.text

    import zarr

    class Flaky:  # the block read fails; each mask alone reads, but for mask 3
        def __init__(self, array: zarr.Array) -> None:
            self.array, self.oindex = array, self

        def __getitem__(self, key):
            if isinstance(key, np.ndarray):
                raise RuntimeError("Zstd decompression error")
            if int(key) == 3:
                raise RuntimeError("bad stored shard")
            return self.array[key]

        @property
        def shape(self):
            return self.array.shape

    monkeypatch.setattr(module, "mask_array", lambda root, path: Flaky(root[path]))
    peaks = module.mask_peaks(layout, rows, {})
    three = (rows["mask_index"] == 3).to_numpy()
    assert np.isnan(peaks[three]).all() and np.array_equal(peaks[~three], truth[~three])
    assert "cannot read mask 3 of masks.zarr/L1/s00000/8x8" in caplog.text


def test_map_peaks_read_masks_only_where_the_formula_is_not_exact(tmp_path):
    from semclip_batch.analysis.map_peaks import map_peaks

    layout, rows, truth = _stored_masks(tmp_path)
    p_normal = np.linspace(0.1, 0.6, 6)
    rows = rows.assign(anomaly_score=[anomaly_score(float(p), 0.3) for p in p_normal],
                       class_scores=[[float(p), 1 - float(p)] for p in p_normal])
    config = {"model": {"backbone": "semclip-tiny", "score_mode": "mean"}}
    prep = {"image_size": 4, "mean": [0.5] * 3, "std": [0.5] * 3}  # an 8 px frame is two model inputs
    plain = map_peaks(layout, rows, *scored(rows), {"config": config, "preprocessing": prep}, {})
    assert plain == pytest.approx(np.full(6, 0.3))  # from the scores: nothing read
    viewed = map_peaks(layout, rows, *scored(rows), {"config": config, "preprocessing": {**prep, "defect_view": True}}, {})
    assert np.array_equal(viewed, truth)  # from the masks
    assert np.array_equal(map_peaks(layout, rows, *scored(rows), {"config": config}, {}), truth)  # a record that cannot say: read
    weighed = {"config": config, "preprocessing": prep, "class_scores": "weighed"}  # rule 29: normal's entry is not p(normal)
    assert np.array_equal(map_peaks(layout, rows, *scored(rows), weighed, {}), truth)
    maxed = {"config": {"model": {**config["model"], "score_mode": "max"}}, "preprocessing": {**prep, "defect_view": True}}
    assert np.array_equal(map_peaks(layout, rows, *scored(rows), maxed, {}), rows["anomaly_score"].to_numpy())


def test_which_frames_took_a_defect_view_follows_the_record_and_the_frame_size():
    from semclip_batch.analysis.map_peaks import took_defect_view

    paths = pd.Series(["L/s00000/480x640", "L/s00000/256x256", "L/s00000/4096x8192", "L/s00000/p1/700x300", "odd"])
    record = {"preprocessing": {"image_size": 240, "mean": [0.5] * 3, "std": [0.5] * 3, "defect_view": True},
              "config": {"model": {"backbone": "semclip-tiny"}}}
    assert took_defect_view(paths, record).tolist() == [True, False, False, True, True]
    del record["preprocessing"]["defect_view"]
    assert not took_defect_view(paths, record).any()
    assert took_defect_view(paths, {"config": record["config"]}).all()  # no preprocessing recorded: read them
    odd = {"preprocessing": {"defect_view": True}, "config": {"model": {"backbone": "no-such-backbone"}}}
    assert took_defect_view(paths, odd).all()  # no size recorded, no backbone to ask: read them


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exclude_skips_frames_labelled_since(finished, tmp_path):
    out, _ = finished
    first = suggest(SuggestConfig(out=str(out), dest=str(tmp_path / "1.csv"), n=3))
    done = first.rows.assign(label="particle")
    done.to_csv(tmp_path / "labelled.csv", index=False)
    second = suggest(SuggestConfig(out=str(out), dest=str(tmp_path / "2.csv"), n=3,
                                   exclude=(str(tmp_path / "labelled.csv"),)))
    assert not set(first.rows["image_id"]) & set(second.rows["image_id"])
    assert second.excluded >= first.excluded + 3  # by image_id, and by URL (a twin of a pick goes too)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mistakes_end_in_one_line(finished, tmp_path):
    out, _ = finished
    dest = tmp_path / "s.csv"
    one_line_error(invoke("suggest", str(out), "--n", "0", "--out", str(dest)), "--n must be >= 1")
    one_line_error(invoke("suggest", str(out), "--out", str(tmp_path / "s.txt")), ".csv or .parquet")
    one_line_error(invoke("suggest", str(tmp_path / "nothing"), "--out", str(dest)), "is not a finished run")
    dest.write_text("keep me")
    one_line_error(invoke("suggest", str(out), "--out", str(dest)), "exists; pass --overwrite")
    assert dest.read_text() == "keep me"
    assert invoke("suggest", str(out), "--n", "2", "--out", str(dest), "--overwrite").exit_code == 0
    one_line_error(invoke("suggest", str(out), "--out", str(tmp_path / "x.csv"), "--exclude", str(tmp_path / "no.csv")),
                   "does not exist")
    # never inside OUT (a manifest dropped in predictions/ became rows of the run), nor over what it reads
    (tmp_path / "link").symlink_to(out)
    for inside in (out / "predictions" / "lot_id=x" / "s.parquet", tmp_path / "link" / "s.csv"):
        one_line_error(invoke("suggest", str(out), "--out", str(inside)), "is inside OUT")
        assert not inside.exists()
    manifest = out.parent / "manifest.csv"
    before = manifest.read_text()
    one_line_error(invoke("suggest", str(out), "--out", str(manifest), "--overwrite"), "is the run's manifest")
    one_line_error(invoke("suggest", str(out), "--out", str(dest), "--exclude", str(dest), "--overwrite"),
                   "is the --exclude manifest 1")
    assert manifest.read_text() == before and dest.exists()


def test_unfinished_run_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "_state").mkdir(parents=True)
    (out / "_state" / "run.json").write_text(json.dumps({"run_id": "abc"}))
    (out / "runs" / "abc").mkdir(parents=True)
    (out / "runs" / "abc" / "attempt-1.json").write_text(json.dumps({"run_id": "abc", "attempt": 1,
                                                                      "status": "failed"}))
    result = invoke("suggest", str(out), "--out", str(tmp_path / "s.csv"))
    one_line_error(result, "has not finished (attempt 1 is 'failed')")


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("uri\na.png\n")
    one_line_error(invoke("suggest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s.csv")), "is not a finished run")


def test_help_has_an_example():
    result = invoke("suggest", "--help")
    assert result.exit_code == 0 and "Example" in result.output and "--storage-option" in result.output
