"""The backbones' model configs, read as files: open_clip's own (``open_clip/model_configs/*.json``) and the
package's (``data/backbones/``: semclip-tiny), found without importing open_clip.

Importing open_clip pulls in torchvision (and with it ``torch._dynamo``) and timm: ~3.7 s of a fresh process on this
machine's CPU. The checks a backbone name needs (is it known, what input size and mean / std) and ``run``'s model
actors, which build the plain ViT tower in torch alone (:mod:`semclip_batch.model.vit`), read the configs here.
A config counts as open_clip counts it: a ``.json`` file holding ``embed_dim``, ``vision_cfg`` and ``text_cfg``,
named by its stem; the package's own override open_clip's of the same name, as ``open_clip.add_model_config`` does.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from semclip_batch.model.vit import VisionConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults where a config names no image_mean / _std
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")
# top-level config keys that leave the vision tower and its logit scale as the plain tower has them (others, such as
# ``nonscalar_logit_scale``, change them)
PLAIN_TOP_KEYS = frozenset({*REQUIRED, "quick_gelu", "custom_text", "multimodal_cfg", "init_logit_scale", "init_logit_bias"})
# vision_cfg keys the plain tower reads or may ignore (patch dropout: training only), with the values it takes
# (None: any value, read below); a key outside this set, or at a value outside its tuple, is not the plain tower
PLAIN_VISION_KEYS: dict[str, tuple[Any, ...] | None] = {
    "image_size": None, "patch_size": None, "width": None, "layers": None, "head_width": None, "mlp_ratio": None,
    "ls_init_value": None, "no_ln_pre": None, "image_mean": None, "image_std": None, "patch_dropout": None,
    "output_tokens": None, "pos_embed_type": ("learnable",), "pool_type": ("tok",), "attentional_pool": (False,),
    "final_ln_after_pool": (False,), "block_type": (None, "default"), "act_kwargs": (None,), "norm_kwargs": (None,),
    "timm_model_name": (None, ""), "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
    "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,)}


def config_folders() -> list[Path]:
    """open_clip's config folder (where it is installed), then the package's own."""
    folders: list[Path] = []
    spec = importlib.util.find_spec("open_clip")  # finds a top-level package without running it
    if spec is not None and spec.submodule_search_locations:
        folders.extend(Path(p) / "model_configs" for p in spec.submodule_search_locations)
    folders.append(Path(str(resources.files("semclip_batch") / "data" / "backbones")))
    return folders


@cache
def _configs() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for folder in config_folders():
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            config = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(config, dict) and all(key in config for key in REQUIRED):
                found[path.stem] = config
    return found


def backbone_names() -> tuple[str, ...]:
    """Every backbone a config names, sorted."""
    return tuple(sorted(_configs()))


def model_config(name: str) -> dict[str, Any] | None:
    """Backbone ``name``'s config (a fresh copy), or None where no config names it. Where this process has imported
    open_clip already, a config registered with it at run time (``open_clip.add_model_config``) counts too."""
    config = _configs().get(name)
    if config is None and "open_clip" in sys.modules:
        config = sys.modules["open_clip"].get_model_config(name)
    return None if config is None else json.loads(json.dumps(config))


def vision_config(name: str) -> VisionConfig | None:
    """Backbone ``name``'s vision tower as :class:`~semclip_batch.model.vit.VisionConfig`, or None where it is not
    the plain ViT that module rebuilds (or ``name`` is unknown): any top-level key outside :data:`PLAIN_TOP_KEYS`, any
    ``vision_cfg`` key outside the plain set, or a plain key at another value, leaves the tower to open_clip."""
    config = model_config(name)
    if config is None or not set(config) <= PLAIN_TOP_KEYS:
        return None
    vision: dict[str, Any] = config["vision_cfg"]
    if not all(_plain(key, value) for key, value in vision.items()):
        return None
    image, patch, layers = (_side(vision.get("image_size", 224)), _side(vision.get("patch_size", 16)),
                            vision.get("layers", 12))
    if image is None or patch is None or not isinstance(layers, int):
        return None
    width = int(vision.get("width", 768))
    ls = vision.get("ls_init_value")
    return VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers,
                        heads=width // int(vision.get("head_width", 64)), mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
                        output_dim=int(config["embed_dim"]), quick_gelu=bool(config.get("quick_gelu", False)),
                        ls_init_value=None if ls is None else float(ls), ln_pre=not vision.get("no_ln_pre", False))


def _plain(key: str, value: Any) -> bool:
    """Whether ``vision_cfg[key] = value`` is within the plain tower."""
    if key not in PLAIN_VISION_KEYS:
        return False
    taken = PLAIN_VISION_KEYS[key]
    return taken is None or value in taken


def _side(value: Any) -> int | None:
    """A square size (an int, or a pair of equal ints), or None."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(value) == 2 and value[0] == value[1] else None
    return int(value) if isinstance(value, int) else None
