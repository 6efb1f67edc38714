"""Weights shipped with the package (``--pretrained shipped``): ``semclip-tiny`` pretrained by this project's own
``pretrain`` with its fixed default schedule (1,500 steps, no time budget) on ``synth`` lots (family ``classic``,
seed 1000, 29 lots x 70 frames), seeds disjoint from every demo and benchmark test lot. Stored in fp16 (8.4 MB
instead of 16.8; the model loads them into fp32), checksum pinned here: the canonical sha256 of the loaded model,
which checkpoints record.

Rebuild them whenever ``pretrain``'s defaults change (``tests/test_shipped.py`` compares the recipe recorded
in the file with today's defaults)::

    .venv/bin/python jobs/ship_weights.py --work /tmp/ship      # ~10 min here; prints the sha256 to pin here
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from safetensors import safe_open
from safetensors.torch import save_file

from semclip_batch.errors import WeightsError

SHIPPED = "shipped"


@dataclass(frozen=True)
class ShippedWeights:
    backbone: str
    file: str  # inside semclip_batch/data/weights/
    sha256: str  # canonical, of the loaded model
    synth: dict[str, object]  # the synth config of the pretraining lots


WEIGHTS = {
    "semclip-tiny": ShippedWeights(
        backbone="semclip-tiny", file="semclip-tiny.safetensors",
        sha256="7949e3505958c06047f21b4ef82a31f32abc742c727ad7f48a3dfff95f89ac8c",
        synth={"family": "classic", "seed": 1000, "lots": 29, "per_class": 10},
    ),
}


def shipped_weights(backbone: str) -> ShippedWeights:
    if backbone not in WEIGHTS:
        raise WeightsError(f"--pretrained shipped: no weights ship for backbone {backbone} "
                           f"(shipped: {', '.join(WEIGHTS)}); give a weights path or URL")
    return WEIGHTS[backbone]


def shipped_path(backbone: str) -> str:
    """The local path of the shipped weights file of ``backbone``."""
    return str(resources.files("semclip_batch") / "data" / "weights" / shipped_weights(backbone).file)


def recorded_metadata(backbone: str) -> dict[str, str]:
    with safe_open(shipped_path(backbone), "pt") as f:
        return dict(f.metadata() or {})


def to_fp16_file(src: str, dst: str, extra: dict[str, str]) -> None:
    """Copy a pretrain weights file as fp16 (floating tensors only), keeping its metadata plus ``extra``."""
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    meta.pop("sha256", None)  # the fp32 file's; the loaded model's canonical checksum is pinned in WEIGHTS
    save_file(half, dst, metadata={**meta, **extra, "stored": "fp16"})
