"""benchmarks/pixel_memory.py: the grey-level memory alone on a lot, through the package's own fit and map (the
memory's behaviour is tested in tests/test_grey_memory.py)."""

from __future__ import annotations

import re
import sys

from benchmark_module import load_benchmark

bench = load_benchmark("pixel_memory")


def test_it_scores_the_memory_on_a_test_lot(tmp_path, monkeypatch, capsys):
    from routing_fixture import write_routing_lot

    lot = write_routing_lot(tmp_path, n_support=4, n_test=3, seed=8)
    monkeypatch.setattr(sys, "argv", ["pixel_memory.py", str(lot["support"]), str(lot["test"]), "--bank", "512"])
    bench.main()
    out = capsys.readouterr().out
    assert re.search(r"memory \(greedy\): 512 neighbourhoods, own 0, scale 0\.\d+", out), out
    assert "3 test frames" in out
    auroc = float(re.search(r"pixel memory\s+pAUROC (\d\.\d+)", out).group(1))
    assert 0.8 < auroc <= 1.0, out
