"""Support rows decoded once within ``rows_kept`` (``train``'s seven loads of its support frames): the same views
as decoding every time, each file read once, failures never kept, a byte budget."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import semclip_batch.fewshot.trainset as trainset
from semclip_batch.fewshot import decoded
from semclip_batch.fewshot.decoded import DecodedRows, active_rows, rows_kept
from semclip_batch.fewshot.grey_memory_fit import native_frames
from semclip_batch.fewshot.trainset import load_trainset
from semclip_batch.io.manifest import read_manifest
from semclip_batch.methods.prompts import load_prompts
from semclip_batch.methods.weights import preprocess_config
from semclip_batch.synth.generate import SynthConfig, synth


@pytest.fixture(scope="module")
def lot(tmp_path_factory):
    """7 `contacts` frames of 512 and 640 x 480 px (a repeating pattern: cell references), one a class."""
    root = tmp_path_factory.mktemp("decoded")
    synth(str(root), SynthConfig(seed=61, lots=1, per_class=1, family="contacts", sizes=((512, 512), (640, 480))))
    return root / "manifest.csv"


@pytest.fixture
def reads(monkeypatch):
    """Every file ``trainset`` decodes, in order, and every cell reference it builds (the frame's shape)."""
    files: list[str] = []
    cells: list[tuple[int, int]] = []
    real_load, real_cell = trainset.load_frame, trainset.cell_reference

    def load_spy(url, *args, **kwargs):
        files.append(url)
        return real_load(url, *args, **kwargs)

    def cell_spy(gray):
        cells.append(gray.shape)
        return real_cell(gray)

    monkeypatch.setattr(trainset, "load_frame", load_spy)
    monkeypatch.setattr(trainset, "cell_reference", cell_spy)
    return files, cells


def _loads(df, policies):
    classes = load_prompts(None).classes
    return [load_trainset(df, classes, preprocess_config("semclip-tiny", tile_above=10**9, scale_policy=p),
                          self_reference=True) for p in policies]


def test_kept_rows_give_the_views_of_decoding_every_time_from_one_read(lot, reads):
    files, cells = reads
    df = read_manifest(str(lot))
    policies = (None, 0.5, 1.0, None)
    fresh = _loads(df, policies)
    assert len(files) == 4 * 2 * len(df) and len(cells) == 4 * len(df)  # frame and mask, every load
    files.clear(), cells.clear()
    with rows_kept() as store:
        kept = _loads(df, policies)
        grey = native_frames(df, None)
    assert sorted(files) == sorted([*df["url"], *df["mask_url"]]) and len(cells) == len(df)  # once each
    assert store.used > 0 and active_rows() is None  # released with the block
    for a, b in zip(fresh, kept, strict=True):
        assert torch.equal(a.views, b.views) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
        assert a.refs is not None and b.refs is not None and torch.equal(a.refs, b.refs)
        assert torch.equal(a.has_ref, b.has_ref)
    assert len(fresh[1]) > len(df) and torch.equal(fresh[0].views, fresh[3].views)  # 0.5 tiles; whole twice alike
    assert grey.keys() == native_frames(df, None).keys()
    assert all(np.array_equal(grey[p].levels, f.levels) for p, f in native_frames(df, None).items())


def test_a_row_that_fails_is_never_kept(lot, reads, caplog):
    files, _ = reads
    df = read_manifest(str(lot))
    broken = df.iloc[2]["url"]
    with open(broken, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
    try:
        with caplog.at_level(logging.WARNING), rows_kept():
            first, second = _loads(df, (None, None))
        assert first.skipped == second.skipped == 1 and len(first) == len(second) == len(df) - 1
        assert files.count(broken) == 2  # tried again, failed again
        assert sum(f"skipping {df.iloc[2]['uri']}" in r.getMessage() for r in caplog.records) == 2
    finally:
        synth(str(lot.parent), SynthConfig(seed=61, lots=1, per_class=1, family="contacts",
                                           sizes=((512, 512), (640, 480))))


def test_the_budget_bounds_what_is_kept():
    store = DecodedRows(budget=3000)
    calls: list[int] = []

    def frame(n: int):
        def decode():
            calls.append(n)
            return np.zeros(250, np.float32), None  # 1000 bytes
        return decode

    for _ in range(2):
        for n in range(5):
            gray, mask = store.frame(n, frame(n))
            assert gray.nbytes == 1000 and mask is None
    assert calls == [0, 1, 2, 3, 4, 3, 4] and store.used == 3000  # three kept, two decoded each time
    assert store.reference("r", lambda: None) is None and store.reference("r", lambda: np.ones(1)) is None  # kept
    assert DecodedRows(budget=0).frame(0, frame(9))[0].nbytes == 1000 and calls[-1] == 9


def test_no_store_outside_the_block():
    assert active_rows() is None
    with rows_kept(budget=10) as outer:
        assert active_rows() is outer and outer.budget == 10
        with rows_kept() as inner:
            assert active_rows() is inner and inner.budget == decoded.DEFAULT_BUDGET_BYTES
        assert active_rows() is outer
    assert active_rows() is None


def test_a_reference_file_that_fails_is_tried_again_and_the_cell_reference_stands_in(lot, reads, caplog,
                                                                                     monkeypatch):
    """A row whose reference file is broken: warned on every load (never kept), scored against its cell reference
    where the recipe asks for one; the good rows' registered references are read once."""
    _, cells = reads
    files: list[str] = []
    real_reference = trainset.load_reference

    def reference_spy(url, *args, **kwargs):
        files.append(url)
        return real_reference(url, *args, **kwargs)

    monkeypatch.setattr(trainset, "load_reference", reference_spy)
    df = read_manifest(str(lot))
    assert df["reference_url"].astype(bool).all()
    broken = df.iloc[1]["reference_url"]
    original = Path(broken).read_bytes()  # restored below
    with open(broken, "wb") as fh:
        fh.write(b"II*\x00 not a tiff")
    classes, prep = load_prompts(None).classes, preprocess_config("semclip-tiny", tile_above=10**9)
    try:
        with caplog.at_level(logging.WARNING), rows_kept():
            sets = [load_trainset(df, classes, prep, references=True, self_reference=True) for _ in range(2)]
        warned = [r for r in caplog.records if "trained without its reference" in r.getMessage()]
        assert len(warned) == 2 and all(df.iloc[1]["uri"] in r.getMessage() for r in warned)
        assert files.count(broken) == 2 and all(files.count(u) == 1 for u in df["reference_url"] if u != broken)
        assert cells == [cells[0]] * 2  # the broken row's cell reference, each time it was needed
        fresh = load_trainset(df, classes, prep, references=True, self_reference=True)
        for data in sets:
            assert data.refs is not None and torch.equal(data.refs, fresh.refs) and bool(data.has_ref.all())
    finally:
        with open(broken, "wb") as fh:
            fh.write(original)


def test_release_drops_what_is_kept_and_keeps_nothing_more():
    store = DecodedRows()
    store.frame("a", lambda: (np.zeros(10, np.float32), None))
    assert store.used == 40 and store.release() == 40 and store.used == 0 and store.budget == 0
    calls: list[int] = []
    for _ in range(2):
        store.frame("a", lambda: (calls.append(1), (np.zeros(10, np.float32), None))[1])
    assert calls == [1, 1] and store.release() == 0
    assert decoded.kept_budget(None) == decoded.DEFAULT_BUDGET_BYTES
    assert decoded.kept_budget(4 << 30) == 1 << 30 and decoded.kept_budget(64 << 30) == decoded.DEFAULT_BUDGET_BYTES


def test_the_fit_counts_kept_rows_as_free_before_it_steps_down(lot, monkeypatch):
    """Views at a policy that fit only once the kept rows are released: released, and the policy kept (not a step
    down to a coarser one, as before rows were kept)."""
    import semclip_batch.fewshot.support_set as support_set
    from semclip_batch.config import ModelSpec
    from semclip_batch.fewshot.fit_memory import needed_bytes
    from semclip_batch.fewshot.support_set import TrainConfig, support_that_fits

    df = read_manifest(str(lot))
    cfg = TrainConfig(support=str(lot), out="unused", check_scale=True,
                      model=ModelSpec(backbone="semclip-tiny", pretrained="shipped", cls="fused", scale_policy=0.5))
    with rows_kept() as store:
        _loads(df, (None,))
        held = store.used
        free = iter([needed_bytes(1), needed_bytes(10_000)])  # short while rows are kept, enough once released
        monkeypatch.setattr(support_set, "available_bytes", lambda: next(free))
        at, _, data = support_that_fits(cfg, df, load_prompts(None).classes)
        assert held > 0 and store.used == 0 and at.model.scale_policy == 0.5 and len(data) > len(df)
