"""Model FLOPs per view against the matmul peak (``benchmarks/pipeline.py --flops-only``): torch's FLOP counter,
with what it misses on CPU counted (its fused attention; checked against a hand count in
``tests/test_flop_count.py``), and the best-of-3 time of the same forward pass."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import cast

import numpy as np
import torch

from semclip_batch.config import DEFAULT_SELF_SIMILARITY, ModelSpec
from semclip_batch.io.preprocess import normalize, unpack_views
from semclip_batch.methods.prompts import load_prompts, text_embeddings
from semclip_batch.methods.weights import load_backbone, preprocess_config
from semclip_batch.model.towers import vision_tower
from semclip_batch.pipeline.inference import Predictor, PredictorSetup


def matmul_peak(dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` 4096 x 4096 ``torch.mm`` on the current threads."""
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * 4096 ** 3 / best


def _timed(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def bench_flops(name: str, batch: int, precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[dict[str, float | str]]:
    """The model stage's forward pass (all taps, both paths, maps and class scores) on ``batch`` views: FLOPs per
    view counted by ``torch.utils.flop_counter``, best of 3 times, and the rate against the matmul peak of the
    same dtype on the same threads; open_clip's plain image tower alongside."""
    backbone = load_backbone(name, "none")
    text = text_embeddings(backbone, load_prompts())
    prep = preprocess_config(name, tile_above=1024)
    views = np.random.default_rng(0).integers(0, 1 << 16, size=(batch, prep.image_size, prep.image_size),
                                              dtype=np.uint16)  # packed grey views, as the decode stage ships them
    rows: list[dict[str, float | str]] = []
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        peak = matmul_peak(dtype)
        predictor = Predictor(PredictorSetup(spec=ModelSpec(backbone=name, pretrained="none", precision=precision,
                                                            self_similarity=DEFAULT_SELF_SIMILARITY),
                                             prep=prep, text_embeddings=text, weights_sha256=backbone.sha256,
                                             batch_size=batch, threads=torch.get_num_threads(), use_gpu=False))
        tower = cast(torch.nn.Module, vision_tower(backbone.clip)).to(dtype)
        x = normalize(unpack_views(torch.from_numpy(views)), prep).to(dtype)
        rows.append(_forward_row(name, "SEM-CLIP model stage", precision, batch, peak,
                                 functools.partial(predictor._forward, views, None, None)))
        rows.append(_forward_row(name, "open_clip image tower", precision, batch, peak, functools.partial(tower, x)))
        tower.float()
    return rows


def _cpu_sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: object,
                    out_shape: object = None, **kwargs: object) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of ``call`` by ``torch.utils.flop_counter``, with what it misses on CPU counted: it knows no formula
    for the CPU flash-attention kernel, nor for ``nn.MultiheadAttention``'s fused inference fast path (projections,
    attention and output in one op). So the count runs with the fast path off (the same matrix products, as
    separate ops) and with the CPU kernel mapped to the SDPA formula. Timing runs keep the fast path."""
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            call()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops())


def _forward_row(name: str, path: str, precision: str, batch: int, peak: float,
                 call: Callable[[], object]) -> dict[str, float | str]:
    with torch.inference_mode():
        call()
        seconds = min(_timed(call) for _ in range(3))
    flops = count_flops(call)
    return {"backbone": name, "path": path, "precision": precision, "batch": batch,
            "gflop_per_view": round(flops / batch / 1e9, 2), "ms_per_batch": round(seconds * 1e3),
            "gflop_s": round(flops / seconds / 1e9, 1), "peak_gflop_s": round(peak / 1e9, 1),
            "of_peak": round(flops / seconds / peak, 2)}


def print_flops(rows: list[dict[str, float | str]]) -> None:
    header = (f"{'forward (batch ' + str(rows[0]['batch']) + ')':<24} {'prec':>5} {'GFLOP/view':>10} {'ms':>6} "
              f"{'GFLOP/s':>8} {'mm peak':>8} {'of peak':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['path']:<24} {r['precision']:>5} {r['gflop_per_view']:>10} {r['ms_per_batch']:>6} {r['gflop_s']:>8} "
              f"{r['peak_gflop_s']:>8} {r['of_peak']:>7}")
