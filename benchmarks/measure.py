"""What the benchmarks share: timing, a median after warm-up (memory: ``msattn.eval.loading``'s
``reset_peak_rss``, ``rss_mb``, ``peak_rss_mb``).

Imported by the scripts beside it (``python benchmarks/bench_*.py`` puts this folder on sys.path).
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, warmup: int, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
