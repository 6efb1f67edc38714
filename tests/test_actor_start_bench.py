"""benchmarks/actor_start.py: both ways of starting a model actor are timed in fresh interpreters, and only the
whole model imports open_clip (the equality of the two models is tested in tests/test_vision_tower.py)."""

from __future__ import annotations

import re
import sys

from benchmark_module import load_benchmark

bench = load_benchmark("actor_start")


def test_it_times_both_ways_in_fresh_processes(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["actor_start.py", "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    start, imported = r"\d+\.\d\d s, peak \d+ MiB", "of open_clip / torchvision / timm imported"
    assert re.search(rf"whole open_clip model: {start}, built CLIP, {imported}: open_clip, timm, torchvision$", out, re.M), out
    assert re.search(rf"vision tower alone: {start}, built VisionBackbone, {imported}: none$", out, re.M), out
