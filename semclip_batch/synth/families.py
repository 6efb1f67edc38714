"""Data *families* for ``synth``: one layout style, defect scale, contrast and noise regime each.

A family is a kind of SEM data as one fab / tool / layer produces it. The six defect classes keep their defining
look in every family (see :mod:`semclip_batch.synth.render`); shapes, sizes and imaging vary, so a model
pretrained on one family can be tested on another. ``classic`` is the original generator, byte for byte.

Light module (no numpy): the CLI imports it for its ``--family`` choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from semclip_batch.errors import ConfigError


@dataclass(frozen=True)
class Regime:
    """How a frame is imaged. Intensities are in [0, 1] before the 12-bit window and detector gain / offset.

    ``material``: conductor-minus-background level (negative: conductors darker); ``edge_gain``: bright SEM edge
    effect; ``noise``: shot-noise level (scaled by sqrt(signal)); ``blur``: beam blur sigma (px); ``texture``:
    grainy low-frequency mottling (metal grain); ``streak_prob`` / ``streak_strength``: charging (bright tails to
    the right of bright edges along scan rows); ``jitter`` / ``drift``: scan drift, row-wise horizontal jitter and
    a slow horizontal distortion (px); ``window_lo`` / ``window_span``: the 12-bit window (fractions of 4095) that
    a 16-bit frame's signal occupies; ``gain`` / ``offset``: per-site detector variation.
    """

    base: float
    material: float
    edge_gain: float
    noise: float
    blur: float
    texture: float = 0.0
    streak_prob: float = 0.0
    streak_strength: float = 0.0
    jitter: float = 0.0
    drift: float = 0.0
    window_lo: tuple[float, float] = (0.0, 0.0)
    window_span: tuple[float, float] = (1.0, 1.0)
    gain: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Family:
    """One kind of SEM data. ``layouts``: (kind, probability) pairs; ``pitch`` in px; ``defect_px``: the range of
    a defect's characteristic size (diameter / run length) in px at frame resolution; ``members``: for a mixed
    family, the families one of which is drawn per frame (its layouts, pitch, regime and defect scale are used;
    the mix's own fields only summarise them)."""

    name: str
    description: str
    sizes: tuple[tuple[int, int], ...]
    bits: tuple[int, ...]
    banner_frac: float
    layouts: tuple[tuple[str, float], ...]
    pitch: tuple[int, int]
    defect_px: tuple[float, float]
    regime: Regime
    members: tuple[str, ...] = ()


CLASSIC = Family(
    name="classic",
    description="the original generator: vertical line/space or square contact grid, 200-320 px, defects ~10-60 px",
    sizes=((256, 256), (240, 320), (300, 200)),
    bits=(8, 16),
    banner_frac=0.3,
    layouts=(("lines", 0.6), ("contacts", 0.4)),
    pitch=(18, 29),
    defect_px=(8.0, 60.0),
    regime=Regime(base=0.28, material=0.22, edge_gain=0.38, noise=0.045, blur=0.6),
)

LOGIC = Family(
    name="logic",
    description="Manhattan routing (corners, T-junctions, wide/narrow wires, line ends, vias), 512-1024 px, "
                "small defects 3-10 px, charging streaks, 12-bit window",
    sizes=((512, 512), (768, 768), (1024, 1024), (600, 800)),
    bits=(16,),
    banner_frac=0.3,
    layouts=(("routing", 1.0),),
    pitch=(16, 30),
    defect_px=(3.0, 10.0),
    regime=Regime(base=0.22, material=0.2, edge_gain=0.45, noise=0.04, blur=0.7, streak_prob=0.7,
                  streak_strength=0.25, jitter=0.4, window_lo=(0.08, 0.2), window_span=(0.45, 0.7),
                  gain=(0.9, 1.1), offset=(-0.03, 0.03)),
)

CONTACTS = Family(
    name="contacts",
    description="dense contact/via hole arrays (square or staggered, round or elliptical), 480-640 px, defects "
                "8-30 px, strong scan drift, heavy shot noise, dark low contrast, no banner",
    sizes=((480, 480), (512, 512), (480, 640), (640, 640)),
    bits=(8, 16),
    banner_frac=0.0,
    layouts=(("holes", 1.0),),
    pitch=(22, 40),
    defect_px=(8.0, 30.0),
    regime=Regime(base=0.16, material=-0.07, edge_gain=0.2, noise=0.085, blur=0.9, jitter=1.3, drift=5.0,
                  window_lo=(0.02, 0.1), window_span=(0.3, 0.5), gain=(0.8, 1.05), offset=(-0.04, 0.02)),
)

METAL = Family(
    name="metal",
    description="wide metal line/space, varied pitch, vertical or horizontal, grainy texture, 400-900 px, "
                "large defects 20-60 px, blur, bright high-contrast edges, banner in ~50%",
    sizes=((400, 400), (512, 512), (600, 800), (900, 900)),
    bits=(8, 16),
    banner_frac=0.5,
    layouts=(("metal", 1.0),),
    pitch=(44, 110),
    defect_px=(20.0, 60.0),
    regime=Regime(base=0.2, material=0.3, edge_gain=0.5, noise=0.035, blur=1.5, texture=0.09, jitter=0.3,
                  window_lo=(0.0, 0.12), window_span=(0.6, 0.9), gain=(0.9, 1.15), offset=(-0.05, 0.05)),
)

MIXED = Family(
    name="mixed",
    description="per frame one of logic, contacts or metal (its layout, imaging and defect scale), 256-1024 px",
    sizes=((256, 256), (512, 512), (384, 512), (768, 768), (1024, 1024), (640, 480)),
    bits=(8, 16),
    banner_frac=0.3,
    layouts=(("routing", 1 / 3), ("holes", 1 / 3), ("metal", 1 / 3)),
    pitch=(16, 110),
    defect_px=(3.0, 60.0),
    regime=LOGIC.regime,
    members=("logic", "contacts", "metal"),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (CLASSIC, LOGIC, CONTACTS, METAL, MIXED)}


def get_family(name: str) -> Family:
    """The registered family ``name``; unknown names raise :class:`ConfigError` (one line with the choices)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"--family {name!r}: choose from {', '.join(FAMILIES)}") from None
