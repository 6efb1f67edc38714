"""The pipeline benchmark's FLOP count (benchmarks/flops.py ``count_flops``): what torch's counter misses on CPU
(its fused attention) is counted, against hand-computed products."""

from __future__ import annotations

import torch
from benchmark_module import load_benchmark

bench = load_benchmark("flops")


def test_attention_is_counted_through_the_fast_path():
    b, n, w, heads = 2, 50, 64, 4
    attn = torch.nn.MultiheadAttention(w, heads, batch_first=True).eval()
    x = torch.randn(b, n, w)
    expected = 2 * b * n * w * 3 * w + 2 * 2 * b * n * n * w + 2 * b * n * w * w  # in_proj, QK^T and AV, out_proj
    assert bench.count_flops(lambda: attn(x, x, x, need_weights=False)) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the timed runs
    q = torch.randn(b, heads, n, w // heads)
    assert bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) == 2 * 2 * b * n * n * w
