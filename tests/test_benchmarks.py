"""The GPU check's benchmark scripts run on the CPU too: a tiny shape keeps them from rotting between
the rare sessions that have a GPU (benchmarks/gpu_check.sh runs them at full size there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=BENCH)


def test_bench_ops_times_exact_and_multiscale_selection():
    res = _run("bench_ops.py", "--lengths", "512", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
               "--block-q", "8", "--block-k", "8", "--merge", "2", "--topk", "4", "--dtype", "float32",
               "--warmup", "0", "--repeats", "1", "--coarse-regions", "4", "--coarse-topk", "2")
    assert res.returncode == 0, res.stderr
    header, row = res.stdout.strip().splitlines()[-2:]
    assert "s4,c2 ms" in header
    cells = [c.strip() for c in row.split("|")]
    assert cells[0] == "512" and all(float(c) > 0 for c in cells[1:]) and len(cells) == 5


@pytest.mark.parametrize("args", [["--coarse-regions", "4"], ["--coarse-topk", "2"]])
def test_bench_ops_wants_both_multiscale_flags(args):
    res = _run("bench_ops.py", "--lengths", "64", *args)
    assert res.returncode == 2 and "--coarse-regions and --coarse-topk go together" in res.stderr
