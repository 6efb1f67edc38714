"""benchmarks/train_kernels.py: the two kernels against the way before them print their figures and agree (their
behaviour is tested in tests/test_grey_memory.py and tests/test_model.py)."""

from __future__ import annotations

import re
import sys

from benchmark_module import load_benchmark

bench = load_benchmark("train_kernels")


def test_it_times_both_kernels_and_they_agree_with_the_way_before(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_kernels.py", "--side", "300", "--entries", "1024", "--batch", "4",
                                      "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert re.search(r"300 px, 1024 entries: blocked \d+\.\d{3} s, one block \d+\.\d{3} s, maps equal to the bit: True",
                     out), out
    gap = float(re.search(r"largest difference (\S+)", out).group(1))
    assert 0.0 <= gap < 1e-4, out
    for sigma in ("4", "1"):  # 300 px: past 2 * BLUR_BLOCK, so in blocks: the same sums up to float rounding
        found = re.search(rf"gaussian blur, 300 px, sigma {sigma}: band blocks \d+\.\d ms, whole products \d+\.\d ms, "
                          r"largest difference (\S+)$", out, re.M)
        assert found and 0.0 <= float(found.group(1)) < 1e-6, out
