"""Backbone weights: build an open_clip model by name, load weights from any fsspec URL, checksum them.

Weights are read into memory through fsspec (never from a hub): ``.safetensors`` via safetensors, ``.pt`` /
``.pth`` / ``.bin`` only via ``torch.load(weights_only=True)``. ``none`` means seeded random weights,
identical in every process. The canonical checksum is sha256 over the state_dict (sorted names, dtype,
shape, bytes), plus the seed for random weights.

open_clip is imported where a whole CLIP model is built or text is tokenised (:func:`open_clip_module`), never at
import: a model that only scores images, as ``run``'s actors and a checkpoint run's driver build, is the vision tower
alone, in torch (:func:`load_vision_only`, :mod:`semclip_batch.model.vit`), wherever the weights allow it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from types import ModuleType
from typing import Any, BinaryIO

import torch
from torch import nn

from semclip_batch.config import SCALE_POLICY_KEY, PreprocessConfig, parse_scale_policy, tile_overlap_for
from semclip_batch.errors import ConfigError, MissingWeightsError, WeightsError
from semclip_batch.io import storage
from semclip_batch.methods.backbone_configs import OPENAI_MEAN, OPENAI_STD, model_config, vision_config
from semclip_batch.methods.shipped import SHIPPED, shipped_path, shipped_weights
from semclip_batch.model.vit import VisionBackbone

log = logging.getLogger(__name__)
RANDOM = "none"
HUB_PROTOCOLS = ("hf", "hf-hub", "huggingface")  # fsspec's Hugging Face filesystem: a hub, never read at run time
PRETRAIN_FORMAT = "semclip-batch/pretrain"  # the metadata `format` of weights `pretrain` (and `train`'s adaptation) writes
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
BACKBONE_PREFIXES = ("visual.", "logit_scale")  # what a scorer holds of a CLIP model: the vision tower, the logit scale


@dataclass(frozen=True)
class LoadedBackbone:
    """A CLIP model plus where its weights came from: open_clip's whole model, or (:func:`load_backbone`'s
    ``vision_only``) a :class:`~semclip_batch.model.vit.VisionBackbone`, its vision tower and logit scale alone."""

    clip: nn.Module
    name: str
    source: str
    sha256: str


def open_clip_module() -> ModuleType:
    """open_clip, imported here (not at this module's import: ~3.7 s), with the project's own configs
    (``data/backbones/``: the ``semclip-tiny`` test backbone) known to it. Idempotent."""
    import open_clip

    if "semclip-tiny" not in open_clip.list_models():
        with resources.as_file(resources.files("semclip_batch") / "data" / "backbones") as folder:
            open_clip.add_model_config(folder)
    return open_clip


def check_backbone(name: str) -> dict[str, Any]:
    """Backbone ``name``'s model config; :class:`ConfigError` for a name no config knows."""
    config = model_config(name)
    if config is None:
        raise ConfigError(f"unknown backbone {name!r} (e.g. ViT-B-16-plus-240 or semclip-tiny; "
                          "see open_clip.list_models())")
    return config


def preprocess_config(name: str, *, tile_above: int, image_size: int | None = None,
                      scale_policy: float | None = None, defect_view: bool = False,
                      tile_overlap: float | None = None, frame_levels: bool = False) -> PreprocessConfig:
    """The backbone's own input size and mean/std, without building the model; the tiles' least overlap is
    ``tile_overlap`` where given (a checkpoint's own), else the policy's (:func:`~semclip_batch.config.tile_overlap_for`)."""
    vision = check_backbone(name)["vision_cfg"]
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    mean = _rgb(vision.get("image_mean", OPENAI_MEAN))
    std = _rgb(vision.get("image_std", OPENAI_STD))
    return PreprocessConfig(image_size=image_size or size, mean=mean, std=std, tile_above=tile_above,
                            tile_overlap=tile_overlap_for(scale_policy) if tile_overlap is None else tile_overlap,
                            scale_policy=scale_policy, defect_view=defect_view, frame_levels=frame_levels)


def _rgb(values: Iterable[float]) -> tuple[float, float, float]:
    """Per-channel (R, G, B) values of a model config; the views are always 3-channel."""
    r, g, b = (float(v) for v in values)
    return r, g, b


def canonical_sha256(state: Mapping[str, torch.Tensor], seed: int | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) in sorted name order, plus ``seed`` when given."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if seed is not None:
        h.update(f"seed={seed}".encode())
    return h.hexdigest()


def load_backbone(name: str, pretrained: str, *, seed: int = 0, expected_sha256: str | None = None,
                  storage_options: Mapping[str, Any] | None = None, vision_only: bool = False) -> LoadedBackbone:
    """Build backbone ``name`` with weights from ``pretrained`` (a URL, ``none`` for seeded random, or
    ``shipped`` for the package's own, checksum pinned: :mod:`semclip_batch.methods.shipped`).

    ``vision_only`` (for models that score images and never embed text): where ``expected_sha256`` is the canonical
    checksum of the weights and the tower is the plain ViT, only the vision tower and logit scale are built, in torch
    alone (:func:`load_vision_only`); otherwise (random weights, another tower, another checksum) the whole model is
    built as without it."""
    check_backbone(name)
    if pretrained == SHIPPED:
        loaded = load_backbone(name, shipped_path(name), expected_sha256=expected_sha256 or shipped_weights(name).sha256,
                               vision_only=vision_only)
        return LoadedBackbone(clip=loaded.clip, name=name, source=SHIPPED, sha256=loaded.sha256)
    if vision_only and expected_sha256:
        alone = load_vision_only(name, pretrained, expected_sha256, storage_options)
        if alone is not None:
            return alone
    torch.manual_seed(seed)
    with _quiet_root_logger():  # open_clip warns "no pretrained weights" on the root logger; we load them below
        clip = open_clip_module().create_model(name, pretrained=None)
    clip.eval()
    if pretrained == RANDOM:
        log.warning("backbone %s uses seeded random weights (seed %d): predictions carry no learned meaning",
                    name, seed)
        digest = canonical_sha256(clip.state_dict(), seed)
        _check_expected(expected_sha256, digest, None, f"random weights (seed {seed})")
        return LoadedBackbone(clip=clip, name=name, source=f"random:seed={seed}", sha256=digest)
    data = _read_weights(pretrained, storage_options)
    file_sha = hashlib.sha256(data).hexdigest()
    state = _state_dict_from_bytes(data, pretrained)
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise WeightsError(f"weights {pretrained!r} do not fit backbone {name}: {first[0].strip()}") from None
    _refuse_non_finite(state, pretrained)
    digest = canonical_sha256(clip.state_dict())
    _check_expected(expected_sha256, digest, file_sha, pretrained)
    _check_recorded(data, pretrained, digest)
    return LoadedBackbone(clip=clip, name=name, source=pretrained, sha256=digest)


def load_vision_only(name: str, pretrained: str, expected_sha256: str,
                     storage_options: Mapping[str, Any] | None) -> LoadedBackbone | None:
    """Backbone ``name``'s vision tower and logit scale (:class:`~semclip_batch.model.vit.VisionBackbone`) from the
    weights ``pretrained`` (a file or URL, or ``shipped``), or None where that cannot stand for the whole model: random
    weights, a tower other than the plain ViT, or weights whose canonical checksum (every tensor, in the whole model's
    float32) is not ``expected_sha256``.

    An equal checksum means the same tensors under the same names as weights the whole model once loaded under that
    checksum: ``run``'s driver, which ships it to its actors, or the ``train`` that recorded it in a checkpoint. What
    the whole model refuses of a file is refused here too (unreadable, NaN or inf values, a ``pretrain`` file whose
    tensors do not match the checksum its header records). The tower is built on the meta device and the tensors are
    assigned to it: nothing is initialised only to be overwritten."""
    cfg = vision_config(name)
    if cfg is None or pretrained == RANDOM:
        return None
    url = shipped_path(name) if pretrained == SHIPPED else pretrained
    data = _read_weights(url, storage_options)
    state = {k: v.float() if v.is_floating_point() else v for k, v in _state_dict_from_bytes(data, url).items()}
    digest = canonical_sha256(state)
    if digest != expected_sha256.strip().lower():
        return None
    _refuse_non_finite(state, url)  # as the whole model's load did when it took this checksum
    _check_recorded(data, url, digest)
    with torch.device("meta"):
        backbone = VisionBackbone(cfg)
    try:
        backbone.load_state_dict({k: v.contiguous() for k, v in state.items() if k.startswith(BACKBONE_PREFIXES)}, assign=True)
    except RuntimeError as exc:  # the tower does not take weights the whole model took: say so, build that instead
        log.warning("backbone %s: the vision tower alone does not take %s (%s); building the whole model",
                    name, storage.redact(url), str(exc).splitlines()[0][:160])
        return None
    return LoadedBackbone(clip=backbone.eval(), name=name, source=pretrained, sha256=digest)


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding NaN or inf, or None."""
    return next((k for k, v in tensors if v.is_floating_point() and not bool(torch.isfinite(v.detach()).all())), None)


def _refuse_non_finite(state: Mapping[str, torch.Tensor], url: str) -> None:
    """Weights holding NaN or inf (damaged, or saved after training diverged) score NaN everywhere: refused before
    any work (a run scored every frame, then failed each shard in its writer)."""
    bad = first_non_finite(state.items())
    if bad is not None:
        raise WeightsError(f"weights {url!r}: tensor {bad} holds NaN or inf values (damaged, or saved after training "
                           "diverged)")


def _check_recorded(data: bytes, url: str, digest: str) -> None:
    """A ``pretrain`` output records its tensors' checksum in its metadata: a file whose tensors no longer match it
    (a flipped byte) is refused, as a mismatch with ``--pretrained-sha256`` is."""
    if not url.lower().split("?", 1)[0].endswith(".safetensors"):
        return
    try:
        meta = safetensors_metadata(io.BytesIO(data))
    except ValueError:
        return
    recorded = meta.get("sha256")
    if meta.get("format") == PRETRAIN_FORMAT and recorded and recorded != digest:
        raise WeightsError(f"weights {url!r} do not match the checksum they record ({recorded}): their tensors "
                           f"hash to {digest}: the file is damaged or was replaced after it was written")


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _check_expected(expected: str | None, canonical: str, file_sha: str | None, what: str) -> None:
    if expected is None:
        return
    want = expected.strip().lower()
    if want not in {canonical, file_sha}:
        raise WeightsError(f"checksum mismatch for {what}: expected {want}, got canonical {canonical}"
                           + (f" / file {file_sha}" if file_sha else ""))


def weights_metadata(backbone: str, pretrained: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` weights file (``pretrain`` writes its recipe, held-out and scale
    checks there), read from its header alone; empty for random, ``.pt`` or unreadable weights (loading them
    reports the error)."""
    try:
        url = shipped_path(backbone) if pretrained == SHIPPED else pretrained
        if pretrained == RANDOM or not url.lower().split("?", 1)[0].endswith(".safetensors"):
            return {}
        return storage.read_with(url, storage_options, safetensors_metadata)
    except Exception as exc:  # noqa: BLE001 - best effort (e.g. botocore's own errors): loading the weights reports it
        log.debug("no metadata read from %s: %s", pretrained, exc)
        return {}


def recommended_scale_policy(backbone: str, pretrained: str,
                             storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The scale policy ``pretrain``'s scale check recommends for these weights (``--scale-policy``'s spelling),
    or None (no check recorded, or an unreadable record: warned)."""
    name = weights_metadata(backbone, pretrained, storage_options).get(SCALE_POLICY_KEY)
    if name is None:
        return None
    try:
        parse_scale_policy(name)
    except ConfigError:
        log.warning("weights %s recommend an unknown scale policy %r; ignored", pretrained, name)
        return None
    return name


def safetensors_metadata(fh: BinaryIO) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file open at its start (8 bytes of header length, the JSON header)."""
    size = int.from_bytes(fh.read(8), "little")
    if not 0 < size <= MAX_HEADER_BYTES:
        raise ValueError(f"not a safetensors header ({size} bytes)")
    header = json.loads(fh.read(size))
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _read_weights(url: str, storage_options: Mapping[str, Any] | None) -> bytes:
    if storage.protocol_of(url).lower() in HUB_PROTOCOLS:
        raise WeightsError(f"weights {url!r}: a model hub is never read at run time (DESIGN); download the file "
                           "once, check its sha256, and give its path or object-store URL")
    try:
        return storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise MissingWeightsError(f"--pretrained weights not found: {url!r} (give a local path or URL, or 'none')") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read weights {url!r}: {exc}") from None


def _state_dict_from_bytes(data: bytes, url: str) -> dict[str, torch.Tensor]:
    lower = url.lower().split("?", 1)[0]
    try:
        if lower.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state: Any = load_safetensors(data)
        elif lower.endswith((".pt", ".pth", ".bin")):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"weights {url!r}: expected a .safetensors or .pt file")
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad weights file
        raise WeightsError(f"cannot parse weights {url!r}: {' '.join(str(exc).split())[:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights {url!r} do not hold a plain tensor state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}
