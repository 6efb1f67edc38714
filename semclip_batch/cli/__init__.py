"""``semclip-batch``: the click CLI (``commands``) and its shared options (``options``), a thin layer over the
library. User mistakes end in one line, exit != 0."""

from semclip_batch.cli.commands import main

__all__ = ["main"]
