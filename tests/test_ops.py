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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_opcheck_packed_sequences(dtype):
    q, k, v, _ = _inputs(dtype, N=90, Nq=90, requires_grad=True)
    q, k, v = (x[:1].detach().requires_grad_() for x in (q, k, v))
    cu_q = torch.tensor([0, 30, 30, 90], dtype=torch.int32)
    cu_k = cu_q.clone()
    params = (4, 4, 2)
    torch.library.opcheck(ops.ms_select, (q, k, None, None, None, *params, 3, True, 1, 0, 0, cu_q, cu_k))
    index = ops.ms_select(q, k, None, None, None, *params, 3, True, 1, 0, 0, cu_q, cu_k)
    fwd_args = (q, k, v, index, None, None, None, *params, True, 0.25, cu_q, cu_k)
    torch.library.opcheck(ops.ms_fwd, fwd_args)
    out, lse = ops.ms_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out.detach(),
                lse.detach(), index, None, None, None, *params, True, 0.25, cu_q, cu_k)
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


def test_compile_fullgraph_packed_sequences():
    """The packed selection's group count depends on the offsets' values (a dynamic size in the fake kernel)."""
    q, k, v = (torch.randn(1, h, 90, 16, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, 30, 90], dtype=torch.int32)

    def f(q, k, v, cu):
        out = msattn.ms_attention(q, k, v, block_q=4, block_k=4, merge=2, topk=3, cu_seqlens_q=cu)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True)
    eager = f(q, k, v, cu)
    torch.testing.assert_close(compiled(q, k, v, cu), eager, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(eager, (q, k, v)), torch.autograd.grad(compiled(q, k, v, cu), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_isa_switch():
    assert msattn.isa() in ("amx", "avx512", "avx2", "scalar")
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


@pytest.mark.parametrize("value,message", [("bogus", "MSATTN_ISA must be one of auto, amx, avx512, avx2, scalar, got 'bogus'"),
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


def test_region_sums_append_refuses_what_would_overflow():
    """D above the kernels' row buffers, block_k that a cast to int would wrap or that is too large
    for the buffers, and start + n past int32 positions: each refused by name."""
    sums, counts = torch.zeros(1, 1, 4, 300), torch.zeros(1, 1, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"head dim must be in \[1, 256\], got k of shape \(1, 1, 5, 300\)"):
        ops.ms_region_sums_append_(sums, counts, torch.randn(1, 1, 5, 300), None, 0, 16)
    sums, k = torch.zeros(1, 1, 4, 8), torch.randn(1, 1, 5, 8)
    for block_k in (2 ** 31, 2 ** 32 + 16, 0):
        with pytest.raises(RuntimeError, match=rf"block_k must be in \[1, 1048576\], got {block_k}"):
            ops.ms_region_sums_append_(sums, counts, k, None, 0, block_k)
    with pytest.raises(RuntimeError, match=r"start must be >= 0 and start \+ n below 2\^31"):
        ops.ms_region_sums_append_(sums, counts, k, None, 2 ** 63 - 10, 16)


def test_block_sizes_that_would_overflow_are_refused_by_name():
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 16, 8)
    with pytest.raises(RuntimeError, match=r"a group \(block_q \* merge tokens\) may hold at most 16777216 tokens, "
                                           r"got 1099511627776 \* 1099511627776"):
        msattn.ms_attention(q, k, k, block_q=2 ** 40, block_k=16, merge=2 ** 40, topk=4)
    with pytest.raises(RuntimeError, match="a group .* got 4096 \\* 8192"):
        msattn.ms_select(q, k, block_q=4096, block_k=16, merge=8192, topk=4)
    with pytest.raises(RuntimeError, match="topk must be <= 1048576"):
        msattn.ms_select(q, k, block_q=4, block_k=4, merge=2, topk=2 ** 40)
    from msattn.config import MAX_BLOCK, MAX_SPAN

    with pytest.raises(ValueError, match="MSConfig.block_q must be at most 16777216"):  # the config refuses them too
        msattn.MSConfig(block_q=2 ** 40, merge=2 ** 40)
    with pytest.raises(ValueError, match=r"a group \(block_q \* merge tokens\) may hold at most 16777216"):
        msattn.MSConfig(block_q=4096, block_k=16, merge=8192)
    # the config's limits are the kernels': the largest config it accepts runs
    config = msattn.MSConfig(block_q=MAX_SPAN, block_k=16, merge=1, topk=MAX_BLOCK)
    out = msattn.ms_attention(q, k, k, block_q=config.block_q, block_k=config.block_k, merge=config.merge,
                              topk=config.topk)
    assert out.shape == q.shape


def test_a_tensor_on_the_meta_device_is_refused_not_returned_as_garbage():
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    meta = k.to("meta")
    with pytest.raises(RuntimeError, match="msattn: k must be on q's device cpu, got meta"):
        msattn.ms_attention(q, meta, v, block_q=4, block_k=4, merge=2, topk=2)
    mask = torch.ones(1, 16, dtype=torch.bool, device="meta")
    with pytest.raises(RuntimeError, match="msattn: key_padding_mask must be on q's device cpu, got meta"):
        msattn.ms_attention(q, k, v, block_q=4, block_k=4, merge=2, topk=2, key_padding_mask=mask)
    with pytest.raises(RuntimeError, match="msattn: beta must be on q's device cpu, got meta"):
        msattn.infini_attention(q, k, v, torch.zeros(2, device="meta"))
    ang = torch.ones(16, 4)
    with pytest.raises(RuntimeError, match="msattn: v must be on q's device cpu, got meta"):
        msattn.self_extend_attention(q, k, v.to("meta"), group_size=2, window=4, rotary=(ang, ang))
    # all on meta: shapes only, as torch.compile traces them
    out = msattn.ms_attention(q.to("meta"), meta, v.to("meta"), block_q=4, block_k=4, merge=2, topk=2)
    assert out.device.type == "meta" and out.shape == q.shape
