"""Shared fixtures: a reproducible seed per test (change all with MSATTN_TEST_SEED), and the
instruction sets of the CPU kernels that this machine can run."""

import os
import zlib

import pytest
import torch

import msattn

def _runnable_isas():
    names = []
    for name in ("amx", "avx512", "avx2", "scalar"):
        try:
            msattn.set_isa(name)
            names.append(name)
        except RuntimeError:
            pass
    msattn.set_isa("auto")
    return names


RUNNABLE_ISAS = _runnable_isas()


@pytest.fixture(autouse=True)
def _seed(request):
    base = int(os.environ.get("MSATTN_TEST_SEED", "0"))
    torch.manual_seed(base + zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=RUNNABLE_ISAS)
def isa(request):
    """Run the test once per instruction set this CPU supports, then restore the automatic choice."""
    msattn.set_isa(request.param)
    yield request.param
    msattn.set_isa("auto")
