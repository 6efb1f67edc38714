"""The model stage: a Ray Data actor that builds the model (SEM-CLIP or a baseline) once in ``__init__`` and scores batches.

Input rows carry the preprocessed views (one grey channel in uint16, expanded and normalised here, on the
device) and, for frames that take a defect view or whose model holds a grey-level memory, the frame's uint8 levels;
output rows carry the uint8 mask at the frame's H x W (with a grey-level memory, fused with its map at the frame's
resolution before anything reads it), the class scores (with a defect view: the mean of the whole view's and those
of a native crop at the fused map's maximum) and the image score. A failing batch becomes ``model_error`` rows (traceback logged),
never a crash.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from semclip_batch.config import ModelSpec, PreprocessConfig
from semclip_batch.errors import MODEL_ERROR, OK, one_line
from semclip_batch.io.preprocess import (
    FRAME_LEVELS,
    defect_view,
    frame_tiles,
    fuses_levels,
    maps_to_frame,
    needs_defect_view,
    normalize,
    unpack_frame,
    unpack_views,
)
from semclip_batch.io.schema import SCORED, SHIPPED_PIXELS, missing, to_table
from semclip_batch.methods.decisions import anomaly_score, to_mask_tensor, with_defect_view, with_region_classes
from semclip_batch.methods.region_attributes import frame_attributes
from semclip_batch.methods.scoring import build_model
from semclip_batch.model.region_classes import RegionClasses

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PredictorSetup:
    """Everything an actor needs, small and picklable: the driver ships this, not a model."""

    spec: ModelSpec
    prep: PreprocessConfig
    text_embeddings: np.ndarray  # (C, E) float32, class 0 = normal
    weights_sha256: str
    batch_size: int
    threads: int
    use_gpu: bool
    stub_rate: float | None = None  # StandIn's img/s


def shipped_frames(batch: dict[str, np.ndarray], column: str = "frame_pixels") -> np.ndarray:
    """The batch's ``frame_pixels`` (per row the frame's uint8 levels, for its defect view, its grey-level memory) or
    ``ref_frame_pixels`` (its registered reference's, for the memory's die-to-die residual), or empty bytes (every
    row of a batch that lacks the column)."""
    if column in batch:
        return batch[column]
    return np.full(len(batch["image_id"]), b"", dtype=object)


class Predictor:
    """Callable class for ``map_batches(compute=ActorPoolStrategy(...))``."""

    def __init__(self, setup: PredictorSetup) -> None:
        torch.set_num_threads(max(1, setup.threads))
        self.setup = setup
        self.device = torch.device("cuda" if setup.use_gpu and torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[setup.spec.precision]
        self.scoring = build_model(setup.spec, setup.text_embeddings, setup.weights_sha256).to(self.device, self.dtype)

    @torch.inference_mode()
    def _forward(self, views: np.ndarray, refs: np.ndarray | None,
                 has_ref: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed views ``(V, S, S)`` uint16 (and the reference views, same shape, with a ``(V,)`` flag) -> maps
        ``(V, S, S)`` left on the device (resized, averaged and quantised there: only uint8 masks leave it) and
        class probabilities ``(V, C)`` on the CPU."""
        maps, probs = [], []
        step = self.setup.batch_size
        for start in range(0, views.shape[0], step):
            x = self._model_input(views[start:start + step])
            r = flag = None
            if refs is not None and has_ref is not None:
                r = self._model_input(refs[start:start + step])
                flag = torch.from_numpy(has_ref[start:start + step]).to(self.device)
            out = self.scoring(x, r, flag)
            maps.append(out.maps.float())
            probs.append(out.class_probs.float().cpu())
        return torch.cat(maps), torch.cat(probs)

    def _model_input(self, packed: np.ndarray) -> torch.Tensor:
        """Packed uint16 views -> the model's normalised 3-channel input in its dtype, converted on the device
        (2 bytes a pixel cross to it, not 12). On a GPU the levels are first copied into pinned host memory (a
        host memcpy; PyTorch's caching host allocator reuses the pinned blocks), so the transfer is one DMA
        instead of the driver's own staging through pageable memory. Not measured: no GPU was lent here."""
        levels = torch.from_numpy(np.ascontiguousarray(packed))
        if self.device.type == "cuda":
            levels = levels.pin_memory()
        levels = levels.to(self.device, non_blocking=True)
        return normalize(unpack_views(levels), self.setup.prep).to(self.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Score a batch of :data:`~semclip_batch.io.schema.DECODED` rows -> a table of
        :data:`~semclip_batch.io.schema.SCORED` (a failing forward pass makes its rows ``model_error``)."""
        n = len(batch["image_id"])
        out: dict[str, np.ndarray | list[np.ndarray]] = {k: v for k, v in batch.items()
                                                         if k not in SHIPPED_PIXELS}
        masks = np.full(n, b"", dtype=object)
        scores = np.full(n, np.nan)
        class_scores = np.full((n, self.setup.text_embeddings.shape[0]), np.nan, dtype=np.float32)
        ok = [i for i in range(n) if batch["status"][i] == OK]
        try:
            self._score(batch, ok, masks, scores, class_scores)
        except Exception as exc:
            log.exception("model failed on a batch of %d images", len(ok))
            status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
            status[ok], error[ok] = MODEL_ERROR, one_line(exc)
            out.update(status=status, error=error)
            masks[:], scores[:], class_scores[:] = b"", np.nan, np.nan
        out.update(mask=masks, anomaly_score=scores, class_scores=list(class_scores))
        return to_table(out, SCORED)

    @torch.inference_mode()
    def _score(self, batch: dict[str, np.ndarray], ok: list[int], masks: np.ndarray, scores: np.ndarray,
               class_scores: np.ndarray) -> None:
        if not ok:
            return
        size = self.setup.prep.image_size
        counts = [int(batch["n_views"][i]) for i in ok]
        views = np.concatenate([np.frombuffer(batch["pixels"][i], dtype=np.uint16).reshape(c, size, size)
                                for i, c in zip(ok, counts, strict=False)])
        refs = has_ref = None
        if bool(np.any(batch["has_ref"][ok])):
            refs = np.concatenate([np.frombuffer(batch["ref_pixels"][i], dtype=np.uint16).reshape(c, size, size)
                                   if batch["has_ref"][i] else np.zeros((c, size, size), np.uint16)
                                   for i, c in zip(ok, counts, strict=False)])
            has_ref = np.concatenate([np.full(c, bool(batch["has_ref"][i])) for i, c in zip(ok, counts, strict=False)])
        maps, probs = self._forward(views, refs, has_ref)
        start = 0
        frame_levels, reference_levels = shipped_frames(batch), shipped_frames(batch, "ref_frame_pixels")
        crops: dict[int, torch.Tensor] = {}
        regions: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # levels and stored mask, for the region's classes
        grey, region_model = self.scoring.grey, self.scoring.regions
        for i, count in zip(ok, counts, strict=False):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            tiles = frame_tiles(h, w, self.setup.prep)
            frame = maps_to_frame(maps[start:start + count], h, w, tiles)
            levels = self._frame(frame_levels[i], h, w) if frame_levels[i] else None
            if grey is not None and fuses_levels(h, w):
                if levels is None:
                    raise ValueError("the model's grey-level memory needs every frame's levels; the decode stage "
                                     "shipped none (its preprocessing lacks frame_levels)")
                reference = self._frame(reference_levels[i], h, w) if reference_levels[i] else None
                if reference is None and int(grey.reference) and not missing(batch["reference_url"][i]) \
                        and str(batch["reference_url"][i]):
                    raise ValueError("the model's grey-level memory compares each frame with its reference_uri frame; "
                                     "the decode stage shipped none for a row that lists one (reference_levels off)")
                frame = grey.fuse(frame, levels.float() / FRAME_LEVELS,
                                  None if reference is None else reference.float() / FRAME_LEVELS)
            p = probs[start].numpy().astype(np.float32)
            stored = to_mask_tensor(frame).cpu().numpy()
            masks[i] = stored.tobytes()
            if levels is not None and region_model is not None:
                regions[i] = (levels.cpu().numpy(), stored)
            # the whole view's p(normal), as train calibrated the image threshold on it
            scores[i] = anomaly_score(float(p[0]), float(frame.max()), self.setup.spec.score_mode)
            class_scores[i] = p
            if levels is not None and needs_defect_view(h, w, self.setup.prep):
                crops[i] = defect_view(levels, frame, size)
            start += count
        if crops:  # class scores: the mean of the whole view's and the defect view's
            crop_probs = self._class_probs(torch.stack(list(crops.values())))
            for i, p in zip(crops, crop_probs.numpy(), strict=True):
                class_scores[i] = with_defect_view(class_scores[i], p.astype(np.float32))
        if regions and region_model is not None:
            region_classes(region_model, regions, class_scores)

    def _class_probs(self, views: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(V, C)`` on the CPU of grey views ``(V, S, S)`` in [0, 1] on the device."""
        step = self.setup.batch_size
        return torch.cat([self.scoring.class_probs(normalize(views[k:k + step], self.setup.prep).to(self.dtype))
                          .float().cpu() for k in range(0, views.shape[0], step)])

    def _frame(self, packed: bytes, height: int, width: int) -> torch.Tensor:
        """A frame's uint8 levels (:func:`~semclip_batch.io.preprocess.pack_frame`) on the device."""
        return unpack_frame(packed, height, width).to(self.device)


def region_classes(model: RegionClasses, frames: dict[int, tuple[np.ndarray, np.ndarray]],
                   class_scores: np.ndarray) -> None:
    """The defect classes' share of each row's class scores given out anew with the region at its stored mask's
    maximum (``frames``: by row, its uint8 levels and stored mask; ``class_scores`` written in place)."""
    share, blend, seen = float(model.share), float(model.blend), model.seen().numpy()
    attrs = np.stack([frame_attributes(levels, mask, share) for levels, mask in frames.values()])
    probs = model.probs(torch.from_numpy(attrs)).numpy()
    for i, p in zip(frames, probs, strict=True):
        class_scores[i] = with_region_classes(class_scores[i], p, blend, seen)


class StandIn:
    """The model stage's stand-in for benchmarks (``RunConfig.model_stub``): an accelerator that scores
    ``setup.stub_rate`` model views a second (a frame is one view, or 1 + its tiles, + its defect view) and costs
    the host nothing but the rows it returns. Same input and output as :class:`Predictor`: an all-zero uint8 mask at each ok
    frame's H x W, anomaly score 0, every class score on ``normal``; the time a batch would take on the device
    is slept (the device is busy until the last batch it took is done), so decode, Ray and writes are measured
    against a fixed model rate."""

    def __init__(self, setup: PredictorSetup) -> None:
        if not setup.stub_rate:
            raise ValueError("StandIn needs setup.stub_rate")
        self.seconds_per_view = 1.0 / setup.stub_rate
        self.classes = int(setup.text_embeddings.shape[0])
        self.prep = setup.prep
        self.busy_until = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        ok = [i for i in range(n) if batch["status"][i] == OK]
        now = time.perf_counter()
        views = sum(int(batch["n_views"][i])  # + defect views
                    + needs_defect_view(int(batch["height"][i]), int(batch["width"][i]), self.prep) for i in ok)
        self.busy_until = max(now, self.busy_until) + views * self.seconds_per_view
        time.sleep(max(0.0, self.busy_until - now))
        masks = np.full(n, b"", dtype=object)
        scores = np.full(n, np.nan)
        class_scores = np.full((n, self.classes), np.nan, dtype=np.float32)
        for i in ok:
            masks[i] = bytes(int(batch["height"][i]) * int(batch["width"][i]))
            scores[i] = 0.0
            class_scores[i] = np.eye(self.classes, dtype=np.float32)[0]
        out: dict[str, np.ndarray | list[np.ndarray]] = {k: v for k, v in batch.items()
                                                          if k not in SHIPPED_PIXELS}
        out.update(mask=masks, anomaly_score=scores, class_scores=list(class_scores))
        return to_table(out, SCORED)
