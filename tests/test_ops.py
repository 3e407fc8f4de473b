"""torch.ops.msattn: schemas, fake kernels and autograd registration (opcheck), torch.compile."""

import pytest
import torch

import msattn
from msattn.ops import ops


def _inputs(dtype=torch.float32, N=70, Nq=70, requires_grad=False):
    q = torch.randn(2, 4, Nq, 16, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, N, 16, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, N, 16, dtype=dtype, requires_grad=requires_grad)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, :9] = False
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("nq", [70, 13])
def test_opcheck_every_op(dtype, nq):
    q, k, v, mask = _inputs(dtype, Nq=nq, requires_grad=True)
    params = (4, 4, 2)  # block_q, block_k, merge
    torch.library.opcheck(ops.ms_select, (q, k, mask, None, None, *params, 3, True))
    index = ops.ms_select(q, k, mask, None, None, *params, 3, True)
    fwd_args = (q, k, v, index, mask, None, None, *params, True, 0.25)
    torch.library.opcheck(ops.ms_fwd, fwd_args)
    out, lse = ops.ms_fwd(*fwd_args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    bwd_args = (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), index, mask, None, None,
                *params, True, 0.25)
    torch.library.opcheck(ops.ms_bwd, bwd_args)


def test_opcheck_with_rotary():
    q, k, v, mask = _inputs(requires_grad=True)
    ang = torch.arange(64, dtype=torch.float32)[:, None] * torch.rand(8)[None, :]
    index = ops.ms_select(q, k, mask, None, None, 4, 4, 2, 3, True)
    torch.library.opcheck(ops.ms_fwd, (q, k, v, index, mask, ang.cos(), ang.sin(), 4, 4, 2, True, 0.25))


def test_compile_fullgraph_matches_eager():
    q, k, v, mask = _inputs(requires_grad=True)

    def f(q, k, v, mask):
        out = msattn.ms_attention(q, k, v, block_q=4, block_k=4, merge=2, topk=3, key_padding_mask=mask)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True)
    eager = f(q, k, v, mask)
    got = compiled(q, k, v, mask)
    # inductor fuses the surrounding arithmetic differently: equal up to fp32 rounding
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=0)
    g_eager = torch.autograd.grad(eager, (q, k, v))
    g_comp = torch.autograd.grad(compiled(q, k, v, mask), (q, k, v))
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_isa_switch():
    assert msattn.isa() in ("avx512", "avx2", "scalar")
    msattn.set_isa("scalar")
    assert msattn.isa() == "scalar"
    msattn.set_isa("auto")
    with pytest.raises(RuntimeError, match="set_isa"):
        msattn.set_isa("sse9")


def test_set_isa_from_another_thread_never_lands_inside_a_call():
    """Four threads compute while a fifth switches instruction sets: every result is bit for bit the
    result of one instruction set (the switch waits for running calls)."""
    import threading

    from conftest import RUNNABLE_ISAS

    if len(RUNNABLE_ISAS) < 2:
        pytest.skip("one instruction set on this CPU")
    q, k, v = torch.randn(1, 4, 512, 32), torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    kw = dict(block_q=8, block_k=8, merge=2, topk=6)
    want = []
    for name in RUNNABLE_ISAS:
        msattn.set_isa(name)
        want.append(msattn.ms_attention(q, k, v, **kw))
    msattn.set_isa("auto")
    assert not torch.equal(want[0], want[-1])  # the instruction sets round differently: the test can tell them apart
    results, stop = [], threading.Event()

    def compute():
        for _ in range(10):
            results.append(msattn.ms_attention(q, k, v, **kw))

    def switch():
        while not stop.is_set():
            for name in RUNNABLE_ISAS:
                msattn.set_isa(name)

    switcher = threading.Thread(target=switch)
    workers = [threading.Thread(target=compute) for _ in range(4)]
    switcher.start()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        switcher.join()
        msattn.set_isa("auto")
    assert len(results) == 40
    assert all(any(torch.equal(r, w) for w in want) for r in results)


@pytest.mark.parametrize("value,message", [("bogus", "MSATTN_ISA must be one of auto, avx512, avx2, scalar, got 'bogus'"),
                                           ("AVX2", "MSATTN_ISA must be one of")])
def test_an_unknown_msattn_isa_is_an_error(value, message):
    import os
    import subprocess
    import sys

    env = dict(os.environ, MSATTN_ISA=value)
    run = subprocess.run([sys.executable, "-c", "import msattn"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and message in run.stderr
    env["MSATTN_ISA"] = "scalar"
    run = subprocess.run([sys.executable, "-c", "import msattn; print(msattn.isa())"], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0 and run.stdout.strip() == "scalar"
