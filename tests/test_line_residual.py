"""Rule 23's line residual: what no long horizontal or vertical run of a Manhattan layer explains, its scale, its
choice on the held-out support frames, and how a checkpoint stores it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from semclip_batch.fewshot import grey_memory_fit as fit
from semclip_batch.fewshot import residual_fit
from semclip_batch.methods.scoring import grey_memory_from
from semclip_batch.model.grey_memory import GreyMemory
from semclip_batch.model.line_residual import LINE, line_residual, smoothed


def _manhattan(size: int = 128) -> np.ndarray:
    """Wires of 6 and 10 px on a dark field: a long horizontal run, a vertical one leaving it (a T-junction), an
    L-corner, and line ends; levels in [0, 1]."""
    frame = np.full((size, size), 0.2, np.float32)
    frame[20:26, 10:110] = 0.8  # a horizontal wire, both ends in the frame
    frame[26:100, 60:66] = 0.8  # a vertical stub below it (T-junction), ending at row 100
    frame[70:80, 90:120] = 0.8  # a wide wire ...
    frame[40:80, 110:120] = 0.8  # ... turning up at an L-corner
    return frame


def test_the_interior_matches_an_opening_and_closing_by_lines_in_scipy():
    frame = np.random.default_rng(0).random((64, 80)).astype(np.float32)
    x = ndimage.gaussian_filter(frame, 1.0, truncate=4.0)
    opened = np.maximum(ndimage.grey_opening(x, size=(1, LINE)), ndimage.grey_opening(x, size=(LINE, 1)))
    closed = np.minimum(ndimage.grey_closing(x, size=(1, LINE)), ndimage.grey_closing(x, size=(LINE, 1)))
    expected = np.maximum(x - opened, closed - x)
    got = line_residual(torch.from_numpy(frame)).numpy()
    inner = (slice(LINE + 5, -LINE - 5),) * 2  # the border differs by how each pads
    assert np.abs(got[inner] - expected[inner]).max() < 1e-5
    assert np.abs(smoothed(torch.from_numpy(frame)).numpy()[8:-8, 8:-8] - x[8:-8, 8:-8]).max() < 1e-5


def test_wires_corners_and_line_ends_leave_no_residual_and_small_defects_do():
    frame = _manhattan()
    clean = line_residual(torch.from_numpy(frame))
    # every structure pixel lies on a run of 15 px or more; the smoothing rounds a concave corner (a T-junction's,
    # an L's inner one): under a quarter of the wires' 0.6 contrast there
    assert float(clean.max()) < 0.15 and float((clean > 0.02).float().mean()) < 0.005
    hit = frame.copy()
    hit[45:50, 30:35] = 0.8  # a 5-px particle on the field
    hit[72:76, 96:100] = 0.2  # a 4-px hole in the wide wire
    hit[26:34, 40:44] = 0.8  # a short bridge hanging off the horizontal wire (8 px: no run of 15)
    residual = line_residual(torch.from_numpy(hit)).numpy()
    for window in ((slice(45, 50), slice(30, 35)), (slice(72, 76), slice(96, 100)), (slice(28, 34), slice(40, 44))):
        assert residual[window].max() > 2 * float(clean.max())
    assert float(residual.max()) == pytest.approx(float(residual[40:80, 25:105].max()))


def test_a_defect_longer_than_the_line_along_a_row_is_structure():
    frame = _manhattan()
    frame[45:49, 20:20 + LINE + 4] = 0.8  # a bar longer than the line: kept by the horizontal opening
    assert float(line_residual(torch.from_numpy(frame))[45:49, 20:39].max()) < 0.02


@pytest.mark.parametrize("length", [1, 2, 14])
def test_an_even_or_too_short_line_is_refused(length):
    with pytest.raises(ValueError, match="odd and at least 3"):
        line_residual(torch.zeros(32, 32), length)


def test_tiny_frames_get_a_residual_of_their_shape():
    for shape in ((3, 3), (5, 40), (40, 5)):
        assert line_residual(torch.rand(*shape)).shape == shape


def test_the_scale_is_read_on_clean_pixels_only():
    frames = [(torch.from_numpy(_manhattan()) + 0.01 * torch.randn(128, 128, generator=torch.Generator().manual_seed(k)),
               None) for k in range(3)]
    plain = residual_fit.fit_line_scale(frames)
    marked = []
    for levels, _ in frames:
        hit, mask = levels.clone(), np.zeros((128, 128), bool)
        hit[44:52, 28:36] = 0.9  # a defect, masked: its residual stays out of the scale
        mask[44:52, 28:36] = True
        marked.append((hit, mask))
    assert residual_fit.fit_line_scale(marked) == pytest.approx(plain, rel=0.05)
    unmasked = [(levels, None) for levels, _ in marked]
    assert residual_fit.fit_line_scale(unmasked) > plain


def _held_out(defect_frames: int, layout, defect) -> tuple[GreyMemory, list, dict, list]:
    """A fitted memory, held-out maps (the model's map blind: all 0.5), frames and the fitting frames: every other
    held-out frame carries ``defect(frame, mask, k)``."""
    rng = np.random.default_rng(3)
    fitting = [(torch.from_numpy(np.clip(layout() + rng.normal(0, 0.02, (128, 128)), 0, 1).astype(np.float32)), None)
               for _ in range(6)]
    memory = fit.fit_grey_memory(fitting, seed=0, entries=256)
    frames, maps = {}, []
    for k in range(2 * defect_frames):
        frame, mask = layout(), np.zeros((128, 128), bool)
        if k % 2:
            defect(frame, mask, k)
        frame = np.clip(frame + rng.normal(0, 0.02, (128, 128)), 0, 1).astype(np.float32)
        frames[k] = fit.NativeFrame(np.rint(frame * 255).astype(np.uint8), mask, normal=not k % 2)
        maps.append(fit.FrameMap(k, torch.full((128, 128), 0.5), 0.5, bool(k % 2)))
    return memory, maps, frames, fitting


def _dots() -> np.ndarray:
    """A contact array: 6-px squares every 12 px, nothing a long run."""
    frame = np.full((128, 128), 0.2, np.float32)
    for y in range(4, 124, 12):
        for x in range(4, 124, 12):
            frame[y:y + 6, x:x + 6] = 0.8
    return frame


def _particle(frame: np.ndarray, mask: np.ndarray, k: int) -> None:
    y, x = 42 + k, 30 + 2 * k  # on the routing's field
    frame[y:y + 5, x:x + 5], mask[y:y + 5, x:x + 5] = 0.8, True


def _missing_contact(frame: np.ndarray, mask: np.ndarray, k: int) -> None:
    y, x = 4 + 12 * (2 + k), 4 + 12 * (3 + k)
    frame[y:y + 6, x:x + 6], mask[y:y + 6, x:x + 6] = 0.2, True


def test_the_residual_is_kept_on_routing_and_not_on_a_contact_array():
    memory, maps, frames, fitting = _held_out(4, _manhattan, _particle)
    record = fit.choose_lines(memory, maps, frames, fit.memory_maps(memory, frames), fitting)
    assert record["kept"] and int(memory.lines) == LINE
    assert float(memory.line_scale) == pytest.approx(record["scale"], abs=1e-5)  # the record rounds to 5 places
    gain = record["figures"]["with"]["F1max"] - record["figures"]["without"]["F1max"]
    assert gain >= fit.RESIDUAL_MIN_GAIN
    memory, maps, frames, fitting = _held_out(4, _dots, _missing_contact)
    record = fit.choose_lines(memory, maps, frames, fit.memory_maps(memory, frames), fitting)
    assert not record["kept"] and int(memory.lines) == 0 and float(memory.line_scale) == 1.0
    # every contact leaves a residual: the missing one ranks below them and the pixel AUROC falls
    assert record["figures"]["with"]["pAUROC"] < record["figures"]["without"]["pAUROC"] - fit.RESIDUAL_MAX_LOSS


def test_a_memory_without_the_residual_writes_and_loads_the_tensors_it_did_before():
    memory = fit.fit_grey_memory([(torch.from_numpy(_manhattan()), None)] * 3, seed=0, entries=16)
    memory.weight.fill_(0.5)
    before = memory.checkpoint_tensors()
    assert set(before) == {"mean", "axes", "entries", "scale", "weight"}  # what a memory wrote before rules 18 and 23
    loaded = grey_memory_from({f"grey_memory.{k}": v for k, v in before.items()}, [])
    assert loaded is not None and int(loaded.lines) == 0
    levels = torch.from_numpy(_manhattan())
    assert torch.equal(loaded.frame_map(levels), loaded.neighbourhood_map(levels))
    memory.lines.fill_(LINE)
    memory.line_scale.fill_(0.05)
    stored = memory.checkpoint_tensors()
    assert int(stored["lines"]) == LINE
    loaded = grey_memory_from({f"grey_memory.{k}": v for k, v in stored.items()}, [])
    assert loaded is not None
    expected = 0.5 * (loaded.neighbourhood_map(levels) + torch.clamp(line_residual(levels) / 0.1, 0, 1))
    assert torch.allclose(loaded.frame_map(levels), expected)


@pytest.mark.parametrize(("lines", "scale"), [(14, 0.05), (1, 0.05), (257, 0.05), (LINE, 0.0), (LINE, float("inf")),
                                              (LINE, float("nan"))])
def test_a_checkpoints_residual_that_cannot_score_is_refused(lines, scale):
    memory = fit.fit_grey_memory([(torch.from_numpy(_manhattan()), None)] * 3, seed=0, entries=16)
    memory.weight.fill_(0.5)
    tensors = {f"grey_memory.{k}": v for k, v in memory.state_dict().items()}
    tensors |= {"grey_memory.lines": torch.tensor(lines), "grey_memory.line_scale": torch.tensor(scale)}
    problems: list[str] = []
    assert grey_memory_from(tensors, problems) is None
    assert "needs lines 0, or odd from 3 to 255" in problems[0]


@pytest.mark.parametrize("length", [3, 5, 7, 15, 31, 33])
def test_the_running_maximum_is_a_max_pooling_of_the_same_window(length):
    import torch.nn.functional as F

    from semclip_batch.model.line_residual import window_max

    x = torch.rand(37, 50, generator=torch.Generator().manual_seed(length))
    for dim, size in ((1, (1, length)), (0, (length, 1))):
        pooled = F.max_pool2d(x[None, None], size, 1, (size[0] // 2, size[1] // 2))[0, 0]
        assert torch.equal(window_max(x, length, dim), pooled)


def test_clean_pixels_grown_in_the_defects_box_equal_the_whole_mask_grown():
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(5, 120, 2))
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 4))):
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            mask[y:y + int(rng.integers(1, 9)), x:x + int(rng.integers(1, 9))] = True
        side = 2 * fit.MASK_MARGIN + 1
        whole = F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], side, 1, fit.MASK_MARGIN)[0, 0] == 0
        assert torch.equal(residual_fit.clean_pixels(mask, (h, w)), whole)
    assert bool(residual_fit.clean_pixels(None, (4, 6)).all()) and residual_fit.clean_pixels(np.zeros((4, 6), bool), (4, 6)).all()


def _residual_by_hand(x: np.ndarray, length: int) -> np.ndarray:
    """The residual of already smoothed ``x`` from its definition: each pixel's opening is the largest, over the
    windows of ``length`` inside the frame along a row or a column that hold it, of the window's least value."""
    h, w = x.shape
    half = length // 2
    erode_r = np.array([[x[i, max(j - half, 0):j + half + 1].min() for j in range(w)] for i in range(h)])
    erode_c = np.array([[x[max(i - half, 0):i + half + 1, j].min() for j in range(w)] for i in range(h)])
    dilate_r = np.array([[x[i, max(j - half, 0):j + half + 1].max() for j in range(w)] for i in range(h)])
    dilate_c = np.array([[x[max(i - half, 0):i + half + 1, j].max() for j in range(w)] for i in range(h)])
    open_r = np.array([[erode_r[i, max(j - half, 0):j + half + 1].max() for j in range(w)] for i in range(h)])
    open_c = np.array([[erode_c[max(i - half, 0):i + half + 1, j].max() for j in range(w)] for i in range(h)])
    close_r = np.array([[dilate_r[i, max(j - half, 0):j + half + 1].min() for j in range(w)] for i in range(h)])
    close_c = np.array([[dilate_c[max(i - half, 0):i + half + 1, j].min() for j in range(w)] for i in range(h)])
    return np.maximum(x - np.maximum(open_r, open_c), np.minimum(close_r, close_c) - x)


@pytest.mark.parametrize(("shape", "length"), [((12, 30), 15), ((9, 9), 15), ((20, 7), 5), ((4, 4), 3)])
def test_borders_and_frames_shorter_than_the_line_match_the_definition(shape, length):
    from semclip_batch.model import line_residual as module

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = _residual_by_hand(module.smoothed(x).double().numpy(), length)
    assert np.abs(line_residual(x, length).double().numpy() - expected).max() < 1e-6


def test_each_frames_residual_map_is_computed_once_per_setting(monkeypatch):
    memory = fit.fit_grey_memory([(torch.from_numpy(_manhattan()), None)] * 3, seed=0, entries=16)
    calls = {"neighbourhoods": 0, "lines": 0}
    plain, residual = memory.neighbourhood_map, memory.line_map
    monkeypatch.setattr(memory, "neighbourhood_map", lambda levels: calls.__setitem__(
        "neighbourhoods", calls["neighbourhoods"] + 1) or plain(levels))
    monkeypatch.setattr(memory, "line_map", lambda levels: calls.__setitem__("lines", calls["lines"] + 1)
                        or residual(levels))
    frames = {0: fit.NativeFrame(np.rint(_manhattan() * 255).astype(np.uint8), None, normal=True)}
    grey = fit.memory_maps(memory, frames)
    without = grey(0)
    memory.lines.fill_(LINE)
    memory.line_scale.fill_(0.05)
    first = grey(0)
    assert grey(0) is first and calls == {"neighbourhoods": 1, "lines": 1}
    assert torch.allclose(first, 0.5 * (without + residual(frames[0].as_levels())))
    memory.line_scale.fill_(0.1)  # another setting: the residual again, never a stale map
    assert not torch.equal(grey(0), first) and calls["lines"] == 2
    memory.lines.fill_(0)
    assert grey(0) is without and calls["neighbourhoods"] == 1  # the residual's choice read it: not computed again


def test_no_held_out_defect_pixel_leaves_the_residual_out_without_fitting_it(monkeypatch):
    memory, maps, frames, fitting = _held_out(2, _manhattan, _particle)
    normal = {k: f for k, f in frames.items() if f.normal}
    monkeypatch.setattr(fit, "fit_line_scale", lambda *a: pytest.fail("fitted with nothing to choose on"))
    record = fit.choose_lines(memory, [m for m in maps if m.position in normal], normal,
                              fit.memory_maps(memory, normal), fitting)
    assert not record["kept"] and "no defect pixel" in record["note"] and int(memory.lines) == 0


def test_a_checkpoints_lines_without_their_scale_are_refused():
    memory = fit.fit_grey_memory([(torch.from_numpy(_manhattan()), None)] * 3, seed=0, entries=16)
    memory.weight.fill_(0.5)
    tensors = {f"grey_memory.{k}": v for k, v in memory.checkpoint_tensors().items()}
    problems: list[str] = []
    assert grey_memory_from(tensors | {"grey_memory.lines": torch.tensor(LINE)}, problems) is None
    assert "line_scale" in problems[0]


def test_train_says_when_the_residual_was_chosen_for_a_memory_it_did_not_keep():
    record = {"entries": 16, "fitted_on": 5, "weight": 0.0, "figures": {"0": {"pAUROC": 0.9, "F1max": 0.2},
                                                                     "0.5": {"pAUROC": 0.9, "F1max": 0.3}},
              "lines": {"length": LINE, "kept": True, "figures": {"without": {"pAUROC": 0.9, "F1max": 0.2},
                                                                  "with": {"pAUROC": 0.9, "F1max": 0.3}}}}
    lines = fit.grey_memory_lines({"grey_memory": record})
    assert "chosen, but the memory is not kept" in lines[1]
    record["weight"] = 0.5
    assert "kept in the memory's map" in fit.grey_memory_lines({"grey_memory": record})[1]
