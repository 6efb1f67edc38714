"""SEM-CLIP in pure torch on top of an open_clip backbone (no files, URLs or Ray in here)."""

from __future__ import annotations

from .semclip import SemClip, SemClipConfig, SemClipOutput, default_taps

__all__ = ["SemClip", "SemClipConfig", "SemClipOutput", "default_taps"]
