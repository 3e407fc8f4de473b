"""What the benchmarks share: timing, a median after warm-up, and the attention shape flags (memory:
``msattn.eval.loading``'s ``reset_peak_rss``, ``rss_mb``, ``peak_rss_mb``).

Imported by the scripts beside it (``python benchmarks/bench_*.py`` puts this folder on sys.path).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_attention_args(ap: argparse.ArgumentParser, lengths: str, dtype: str) -> None:
    """The flags of one MS attention shape: lengths, heads, head dim, dtype and MS parameters."""
    ap.add_argument("--lengths", default=lengths, help="comma-separated sequence lengths")
    ap.add_argument("--heads", type=int, default=8, help="query heads Hq")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads Hkv")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=dtype)
    ap.add_argument("--block-q", type=int, default=16)
    ap.add_argument("--block-k", type=int, default=16)
    ap.add_argument("--merge", type=int, default=16)
    ap.add_argument("--topk", type=int, default=64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, warmup: int, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` calls."""
    return interleaved_median_ms({"fn": fn}, warmup, repeats, device)["fn"]


def interleaved_median_ms(fns: dict, warmup: int, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """``{name: median ms}`` of each ``fns[name]()``, the calls taken in turn (one of each per round), so
    that a machine whose speed drifts during the run slows every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
