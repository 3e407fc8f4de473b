"""What the benchmarks share: timing (median after warm-up) and the process's memory on Linux.

Imported by the scripts beside it (``python benchmarks/bench_*.py`` puts this folder on sys.path).
"""

from __future__ import annotations

import os
import re
import statistics
import time

import torch


def rss_kb() -> int:
    """Resident memory of this process now, KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_kb() -> int:
    """Peak resident memory of this process since start or the last reset_peak(), KiB (VmHWM)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (clear_refs 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
