"""SEM-CLIP in pure torch on top of an open_clip backbone (no files, URLs or Ray in here).

Importing this package registers the ``semclip-tiny`` test backbone with open_clip, so every process that
imports the model (the driver and each Ray worker) can build it by name.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

from .semclip import SemClip, SemClipConfig, SemClipOutput, default_taps

_CONFIGS = Path(__file__).with_name("configs")
if "semclip-tiny" not in open_clip.list_models():
    open_clip.add_model_config(_CONFIGS)

__all__ = ["SemClip", "SemClipConfig", "SemClipOutput", "default_taps"]
