"""The model stage: a Ray Data actor that builds SEM-CLIP once in ``__init__`` and scores batches.

Input rows carry the preprocessed views; output rows carry the uint8 mask at the frame's H x W, the class
scores and the image score. A failing batch becomes ``model_error`` rows (traceback logged), never a crash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import TRAINED_PREFIXES, load_checkpoint
from .config import ModelSpec, PreprocessConfig
from .errors import MODEL_ERROR, OK, WeightsError, one_line
from .model import SemClip, SemClipConfig, default_taps
from .preprocess import maps_to_frame, tile_grid
from .scoring import anomaly_score, to_mask
from .weights import LoadedBackbone, load_backbone

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


def build_model(spec: ModelSpec, text_embeddings: np.ndarray, expected_sha256: str | None = None,
                backbone: LoadedBackbone | None = None) -> SemClip:
    """Load the backbone (unless given) and wrap it as SEM-CLIP with the given class embeddings; with a
    checkpoint in the spec, its trained tensors are loaded too (eval mode, fp32, CPU)."""
    if backbone is None:
        backbone = load_backbone(spec.backbone, spec.pretrained, seed=spec.seed, expected_sha256=expected_sha256,
                                 storage_options=spec.storage_options)
    depth = len(backbone.clip.visual.transformer.resblocks)
    taps = spec.taps or default_taps(depth)
    cfg = SemClipConfig(taps=tuple(taps), use_vv=spec.use_vv, vv_from=spec.vv_from, surgery=spec.surgery,
                        surgery_weights=spec.surgery_weights, sigma=spec.sigma, cls=spec.cls)
    model = SemClip(backbone.clip, cfg, n_classes=text_embeddings.shape[0])
    model.set_text_embeddings(torch.from_numpy(np.asarray(text_embeddings, dtype=np.float32)))
    if spec.checkpoint is not None:
        tensors = load_checkpoint(spec.checkpoint, spec.storage_options).tensors
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        trained_missing = [k for k in missing if k.startswith(TRAINED_PREFIXES)]
        if unexpected or trained_missing:
            raise WeightsError(f"checkpoint {spec.checkpoint!r} does not fit this model "
                               f"(unexpected {unexpected[:2]}, missing {trained_missing[:2]})")
    return model.eval().requires_grad_(False)


class Predictor:
    """Callable class for ``map_batches(compute=ActorPoolStrategy(...))``."""

    def __init__(self, setup: PredictorSetup) -> None:
        torch.set_num_threads(max(1, setup.threads))
        self.setup = setup
        self.device = torch.device("cuda" if setup.use_gpu and torch.cuda.is_available() else "cpu")
        self.dtype = DTYPES[setup.spec.precision]
        model = build_model(setup.spec, setup.text_embeddings, setup.weights_sha256)
        self.model = model.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def _forward(self, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, 3, S, S)`` -> maps ``(V, S, S)`` and class probabilities ``(V, C)`` on the CPU."""
        maps, probs = [], []
        for start in range(0, views.shape[0], self.setup.batch_size):
            x = torch.from_numpy(views[start:start + self.setup.batch_size]).to(self.device, self.dtype)
            out = self.model(x)
            maps.append(out.maps.float().cpu())
            probs.append(out.class_probs.float().cpu())
        return torch.cat(maps), torch.cat(probs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        out = {k: v for k, v in batch.items() if k != "pixels"}
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
        out.update(mask=masks, anomaly_score=scores, class_scores=class_scores)
        return out

    def _score(self, batch: dict[str, np.ndarray], ok: list[int], masks: np.ndarray, scores: np.ndarray,
               class_scores: np.ndarray) -> None:
        if not ok:
            return
        size = self.setup.prep.image_size
        counts = [int(batch["n_views"][i]) for i in ok]
        views = np.concatenate([np.frombuffer(batch["pixels"][i], dtype=np.float32).reshape(c, 3, size, size)
                                for i, c in zip(ok, counts, strict=False)])
        maps, probs = self._forward(views)
        start = 0
        for i, count in zip(ok, counts, strict=False):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            tiles = tile_grid(h, w, self.setup.prep.tile_above, self.setup.prep.tile_overlap)
            frame = maps_to_frame(maps[start:start + count], h, w, tiles).numpy()
            p = probs[start].numpy().astype(np.float32)
            masks[i] = to_mask(frame).tobytes()
            scores[i] = anomaly_score(float(p[0]), float(frame.max()), self.setup.spec.score_mode)
            class_scores[i] = p
            start += count
