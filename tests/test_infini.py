"""msattn.infini_attention (Infini-attention over one segment) and its HF integration, msattn.hf.infini.

The reference below is written from the formulas of arXiv 2404.07143 (DESIGN section 3) in float64,
independently of the C code, and is differentiable: gradients through several segments come from
PyTorch's autograd of it.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import msattn
from msattn.ops import ops
from reference import make_mask, rel_err, rotate

EPS = 1e-6


def infini_ref(q, k, v, beta, memory=None, norm=None, *, delta_rule=False, causal=True, scale=None,
               key_padding_mask=None, update_memory=True, rotary=None):
    """-> (out, (memory', norm')) in float64, from the formulas. ``rotary``: the local attention scores q
    and k rotated with their positions in the segment; the memory uses them as given."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    ql, kl = q, k
    if rotary is not None:
        ql, kl = rotate(q, *rotary, torch.arange(N - Nq, N)), rotate(k, *rotary, torch.arange(N))
    hg = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    M = q.new_zeros(B, Hkv, D, D) if memory is None else memory.double()
    z = q.new_zeros(B, Hkv, D) if norm is None else norm.double()

    def sigma(x):
        return F.elu(x) + 1.0

    # local: causal softmax attention inside the segment (bottom-right), padded keys masked
    kk, vv = kl.repeat_interleave(hg, 1), v.repeat_interleave(hg, 1)
    allowed = torch.ones(B, 1, Nq, N, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(N)[None, :] <= torch.arange(N - Nq, N)[:, None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    S = (ql @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    m = S.amax(-1, keepdim=True)
    m = torch.where(m.isfinite(), m, torch.zeros_like(m))
    E = torch.exp(S - m)
    A_loc = (E / E.sum(-1, keepdim=True).clamp_min(1e-300)) @ vv  # no visible key: 0
    # memory retrieval: one memory per KV head, read by each of its query heads
    sq = sigma(q)
    Mq, zq = M.repeat_interleave(hg, 1), z.repeat_interleave(hg, 1)
    A_mem = (sq @ Mq) / ((sq * zq[:, :, None, :]).sum(-1, keepdim=True) + EPS)
    g = torch.sigmoid(beta.double())[None, :, None, None]
    out = g * A_mem + (1 - g) * A_loc
    if not update_memory:
        return out, (M, z)
    sk = sigma(k)
    valid = torch.ones(B, N, dtype=torch.float64) if key_padding_mask is None else key_padding_mask.double()
    u = v
    if delta_rule:
        u = v - (sk @ M) / ((sk * z[:, :, None, :]).sum(-1, keepdim=True) + EPS)
    skw = sk * valid[:, None, :, None]
    return out, (M + skw.transpose(-1, -2) @ u, z + skw.sum(2))


def make_inputs(B, Hq, Hkv, Nq, N, D, dtype=torch.float32, requires_grad=False, memory=True):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, dtype=dtype)
    beta = torch.randn(Hq, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    mdt = torch.float64 if dtype == torch.float64 else torch.float32
    # a memory as earlier segments leave it: z > 0, M of the size of sum sigma(k) v^T
    M = torch.randn(B, Hkv, D, D, dtype=mdt) * 4 if memory else None
    z = (torch.rand(B, Hkv, D, dtype=mdt) * 8 + 1) if memory else None
    ts = [q, k, v, beta, M, z]
    if requires_grad:
        ts = [t.requires_grad_() if t is not None else None for t in ts]
    return ts


def sdpa_local(q, k, v, mask=None, causal=True):
    """causal SDPA on the segment in float64 (bottom-right), zeros for rows without a key"""
    q, k, v = q.double(), k.double(), v.double()
    hg = q.shape[1] // k.shape[1]
    Nq, N = q.shape[2], k.shape[2]
    allowed = torch.ones(q.shape[0], 1, Nq, N, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(N)[None, :] <= torch.arange(N - Nq, N)[:, None])
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(hg, 1), v.repeat_interleave(hg, 1), attn_mask=allowed)
    return out.nan_to_num(0.0) * allowed.any(-1)[..., None]


SHAPES = [  # (B, Hq, Hkv, Nq, N, D)
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 97, 97, 59),
    (1, 4, 1, 33, 150, 16),   # queries are the last 33 of 150 positions
    (2, 2, 2, 1, 70, 64),     # decoding
    (1, 2, 1, 200, 200, 128),
]
ids = lambda s: "x".join(map(str, s))  # noqa: E731


# ---------------------------------------------------------------------------------------------
# 1. an empty memory, or a shut gate: exactly local causal attention

@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pad", [None, "left"])
def test_shut_gate_equals_local_sdpa(shape, dtype, pad):
    B, Hq, Hkv, Nq, N, D = shape
    q, k, v, _, M, z = make_inputs(B, Hq, Hkv, Nq, N, D, dtype)
    mask = make_mask(B, N, pad)
    shut = torch.full((Hq,), -1e4)
    ref = sdpa_local(q, k, v, mask)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for memory, norm in ((None, None), (M, z)):  # an empty memory, and a full one the gate shuts out
        out, _ = msattn.infini_attention(q, k, v, shut, memory, norm, key_padding_mask=mask)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, ref) <= tol


def test_empty_memory_retrieves_zero():
    q, k, v, _, _, _ = make_inputs(1, 2, 1, 40, 40, 16)
    open_gate = torch.full((2,), 1e4)  # g = 1: the output is the retrieval alone
    out, (M, z) = msattn.infini_attention(q, k, v, open_gate)
    assert torch.equal(out, torch.zeros_like(out))
    assert M.dtype == torch.float32 and M.shape == (1, 1, 16, 16) and z.shape == (1, 1, 16)


# ---------------------------------------------------------------------------------------------
# 2. memory carried over segments equals the reference of the update rule

@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pad", [None, "right"])
def test_two_segments_equal_reference(delta_rule, dtype, pad):
    B, Hq, Hkv, S, D = 2, 4, 2, 45, 24
    q, k, v, beta, _, _ = make_inputs(B, Hq, Hkv, 2 * S, 2 * S, D, dtype)
    mask = make_mask(B, 2 * S, pad)
    kw = dict(delta_rule=delta_rule)
    seg = [slice(0, S), slice(S, 2 * S)]
    memory = norm = None
    ref_memory = ref_norm = None
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for s in seg:
        m = None if mask is None else mask[:, s]
        out, (memory, norm) = msattn.infini_attention(q[:, :, s], k[:, :, s], v[:, :, s], beta, memory, norm,
                                                      key_padding_mask=m, **kw)
        ref, (ref_memory, ref_norm) = infini_ref(q[:, :, s], k[:, :, s], v[:, :, s], beta, ref_memory, ref_norm,
                                                 key_padding_mask=m, **kw)
        assert rel_err(out, ref) <= tol
        assert rel_err(memory, ref_memory) <= tol and rel_err(norm, ref_norm) <= tol
    # the second segment really used the memory: it differs from local attention alone
    assert rel_err(out, sdpa_local(q[:, :, seg[1]], k[:, :, seg[1]], v[:, :, seg[1]],
                                   None if mask is None else mask[:, seg[1]])) > 1e-2


@pytest.mark.parametrize("shape", SHAPES[1:], ids=ids)
@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_one_segment_with_a_memory_equals_reference(shape, delta_rule, causal):
    B, Hq, Hkv, Nq, N, D = shape
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, Nq, N, D)
    mask = make_mask(B, N, "left")
    kw = dict(delta_rule=delta_rule, causal=causal, key_padding_mask=mask, scale=0.3)
    out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, **kw)
    ref, (rM2, rz2) = infini_ref(q, k, v, beta, M, z, **kw)
    assert rel_err(out, ref) <= 2e-6
    assert rel_err(M2, rM2) <= 2e-6 and rel_err(z2, rz2) <= 2e-6


def rope_tables(n, half, base=100.0):
    """(cos, sin) float32 (n, half) of RoPE at positions 0..n-1 (a short base: large angles within a segment)."""
    angles = torch.arange(n, dtype=torch.float64)[:, None] * base ** (-torch.arange(half, dtype=torch.float64) / half)
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("partial", [False, True], ids=["full-rotary", "partial-rotary"])
def test_rope_in_the_segment_equals_reference(shape, delta_rule, dtype, partial):
    """rotary tables: the local attention rotates q and k with their positions in the segment, the memory
    reads and writes them un-rotated; outputs, memory and every gradient against the reference."""
    B, Hq, Hkv, Nq, N, D = shape
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, Nq, N, D, dtype, requires_grad=True)
    half = max(1, D // 4) if partial else D // 2
    if half == 0:
        pytest.skip("head dim 1 has no rotary pair")
    rotary = rope_tables(N + 3, half)
    mask = make_mask(B, N, "left")
    kw = dict(delta_rule=delta_rule, key_padding_mask=mask, scale=0.3)
    out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, rotary=rotary, **kw)
    ref, (rM2, rz2) = infini_ref(q, k, v, beta, M, z, rotary=rotary, **kw)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out, ref) <= tol and rel_err(M2, rM2) <= tol and rel_err(z2, rz2) <= tol
    if Nq > 1 and N > 1:  # the rotation changes the local attention
        plain, _ = msattn.infini_attention(q, k, v, beta, M, z, **kw)
        assert rel_err(plain, ref) > 1e-3
    if dtype == torch.bfloat16:
        return
    g = [torch.randn_like(t) for t in (out, M2, z2)]
    got = torch.autograd.grad((out * g[0]).sum() + (M2 * g[1]).sum() + (z2 * g[2]).sum(), (q, k, v, beta, M, z))
    want = torch.autograd.grad((ref * g[0]).sum() + (rM2 * g[1]).sum() + (rz2 * g[2]).sum(), (q, k, v, beta, M, z))
    for name, a, b in zip("q k v beta M z".split(), got, want):
        assert rel_err(a, b) <= 10 * tol, name


def test_rope_in_the_segment_gradcheck_float64():
    q, k, v, beta, M, z = make_inputs(1, 2, 1, 5, 9, 6, torch.float64, requires_grad=True)
    rotary = rope_tables(9, 3)
    mask = torch.tensor([[False, True, True, True, True, False, True, True, True]])

    def f(q, k, v, beta, M, z):
        out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, rotary=rotary, delta_rule=True,
                                                key_padding_mask=mask)
        return out, M2, z2

    assert torch.autograd.gradcheck(f, (q, k, v, beta, M, z))


def test_update_memory_false_keeps_the_memory():
    q, k, v, beta, M, z = make_inputs(2, 4, 2, 30, 30, 16)
    out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=True)
    out_keep, (M3, z3) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=True, update_memory=False)
    assert torch.equal(out, out_keep) and torch.equal(M3, M) and torch.equal(z3, z)
    assert not torch.equal(M2, M)


def test_chunks_of_a_segment_equal_one_call():
    # decoding / chunked prefill inside a segment: queries are the last Nq of the keys so far
    q, k, v, beta, M, z = make_inputs(1, 4, 2, 64, 64, 16)
    full, _ = msattn.infini_attention(q, k, v, beta, M, z)
    for n in (40, 63, 64):
        part, _ = msattn.infini_attention(q[:, :, n - 7:n], k[:, :, :n], v[:, :, :n], beta, M, z, update_memory=False)
        torch.testing.assert_close(part, full[:, :, n - 7:n], rtol=0, atol=1e-6)
    # no queries at all: a pure memory write
    _, (M2, z2) = msattn.infini_attention(q[:, :, :0], k, v, beta, M, z)
    _, (rM2, rz2) = infini_ref(q[:, :, :0], k, v, beta, M, z)
    assert rel_err(M2, rM2) <= 2e-6 and rel_err(z2, rz2) <= 2e-6


# ---------------------------------------------------------------------------------------------
# 3. GQA: one memory per KV head, shared by its query heads

def test_gqa_equals_repeated_kv_heads():
    B, Hq, Hkv, N, D = 2, 6, 2, 50, 16
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, N, N, D)
    hg = Hq // Hkv
    for delta_rule in (False, True):
        out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=delta_rule)
        rep = [t.repeat_interleave(hg, 1) for t in (k, v, M, z)]
        out_rep, (M2_rep, z2_rep) = msattn.infini_attention(q, *rep[:2], beta, *rep[2:], delta_rule=delta_rule)
        torch.testing.assert_close(out, out_rep, rtol=0, atol=1e-6)
        torch.testing.assert_close(M2.repeat_interleave(hg, 1), M2_rep, rtol=0, atol=1e-5)
        torch.testing.assert_close(z2.repeat_interleave(hg, 1), z2_rep, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. gradients

GRAD_CASES = [  # (B, Hq, Hkv, Nq, N, D, causal, pad, delta_rule, update_memory)
    (1, 2, 1, 9, 9, 5, True, None, False, True),
    (2, 2, 2, 7, 11, 4, True, "left", True, True),
    (1, 4, 2, 6, 6, 3, False, "right", True, True),
    (2, 2, 1, 5, 8, 4, True, "right", False, False),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_float64(case):
    B, Hq, Hkv, Nq, N, D, causal, pad, delta_rule, update = case
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, Nq, N, D, torch.float64, requires_grad=True)
    mask = make_mask(B, N, pad)

    def f(q, k, v, beta, M, z):
        out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=delta_rule, causal=causal,
                                                key_padding_mask=mask, update_memory=update)
        return out, M2, z2

    assert torch.autograd.gradcheck(f, (q, k, v, beta, M, z))


@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 70, 24), (1, 2, 1, 130, 130, 64)], ids=ids)
def test_float32_gradients_through_segments_equal_reference(delta_rule, shape, isa):
    # three segments, the memory carried over: backprop through segments against the reference's autograd
    B, Hq, Hkv, _, N, D = shape
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, N, N, D, requires_grad=True)
    mask = make_mask(B, N, "right")
    cuts = [0, N // 3, 2 * N // 3 + 5, N]

    def run(fn):
        memory, norm, outs = M, z, []
        for a, e in zip(cuts[:-1], cuts[1:]):
            out, (memory, norm) = fn(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], beta, memory, norm,
                                     delta_rule=delta_rule, key_padding_mask=mask[:, a:e])
            outs.append(out)
        return torch.cat(outs, 2), memory, norm

    got, ref = run(msattn.infini_attention), run(infini_ref)
    for a, r in zip(got, ref):
        assert rel_err(a, r) <= 5e-6
    seeds = [torch.randn_like(r) for r in ref]
    loss = sum((a * s.to(a.dtype)).sum() for a, s in zip(got, seeds))
    ref_loss = sum((r * s).sum() for r, s in zip(ref, seeds))
    grads = torch.autograd.grad(loss, (q, k, v, beta, M, z))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, beta, M, z))
    for name, g, r in zip("q k v beta M z".split(), grads, ref_grads):
        assert g.dtype == r.dtype or g.dtype == torch.float32
        assert rel_err(g, r) <= 2e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision(dtype):
    B, Hq, Hkv, N, D = 1, 4, 2, 150, 32
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, N, N, D)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    beta.requires_grad_()
    out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=True)
    ref, (rM2, rz2) = infini_ref(q, k, v, beta, M, z, delta_rule=True)  # same rounded inputs
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype and M2.dtype == torch.float32
    assert rel_err(out, ref) <= 4 * eps
    assert rel_err(M2, rM2) <= 1e-6 and rel_err(z2, rz2) <= 1e-6  # float32 accumulation
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, beta), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v, beta), dout.double())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 8 * eps


# ---------------------------------------------------------------------------------------------
# 5. padding, determinism, strides

def test_padded_keys_never_change_the_result():
    B, Hq, Hkv, N, D = 2, 4, 2, 90, 16
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, N, N, D, requires_grad=True)
    mask = make_mask(B, N, "left")

    def run(k, v):
        out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=True, key_padding_mask=mask)
        loss = out.sum() + M2.sum() + z2.sum()
        return (out, M2, z2, *torch.autograd.grad(loss, (q, beta, M, z)))

    k2, v2 = k.detach().clone(), v.detach().clone()
    pad = ~mask[:, None, :].expand_as(k2[..., 0])
    k2[pad], v2[pad] = 1e3, -7.0
    for a, b in zip(run(k, v), run(k2, v2)):
        assert torch.equal(a, b)
    # and padded keys get zero gradients
    out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, key_padding_mask=mask)
    dk, dv = torch.autograd.grad(out.sum() + M2.sum() + z2.sum(), (k, v))
    assert (dk[pad] == 0).all() and (dv[pad] == 0).all() and dk[~pad].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_deterministic_forward_and_backward(dtype):
    B, Hq, Hkv, N, D = 2, 8, 2, 300, 32
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, N, N, D, dtype, requires_grad=True)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=True)
            loss = (out * out).sum() + M2.sum() + z2.sum()
            runs.append((out, M2, z2, *torch.autograd.grad(loss, (q, k, v, beta, M, z))))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_any_strides():
    B, Hq, Hkv, N, D = 2, 4, 2, 60, 24
    base = torch.randn(B, N, Hq + 2 * Hkv, D)  # a fused qkv projection, (B, N, H, D) layout
    q, k, v = (x.transpose(1, 2) for x in base.split([Hq, Hkv, Hkv], dim=2))
    _, _, _, beta, M, z = make_inputs(B, Hq, Hkv, N, N, D)
    assert not q.is_contiguous()
    got = msattn.infini_attention(q, k, v, beta, M.transpose(-1, -2), z)
    want = msattn.infini_attention(q.contiguous(), k.contiguous(), v.contiguous(), beta,
                                   M.transpose(-1, -2).contiguous(), z)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0])


# ---------------------------------------------------------------------------------------------
# 6. the ops: opcheck (schemas, fake kernels, autograd registration)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("nq", [37, 5])
@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
def test_opcheck_every_op(dtype, nq, rope):
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 16
    q, k, v, beta, M, z = make_inputs(B, Hq, Hkv, nq, N, D, dtype, requires_grad=True)
    mask = make_mask(B, N, "left")
    cos, sin = rope_tables(N, 8) if rope else (None, None)
    args = (q, k, v, beta, M, z, mask, cos, sin, True, True, 0.25, True)
    torch.library.opcheck(ops.infini_fwd, args)
    out, out_local, lse, M2, z2 = ops.infini_fwd(*args)
    grads = [torch.randn_like(t) for t in (out, out_local, lse, M2, z2)]
    bwd = (*grads, *(t.detach() for t in (q, k, v, beta, M, z)), out_local.detach(), lse.detach(), mask,
           cos, sin, True, True, 0.25, True)
    torch.library.opcheck(ops.infini_bwd, bwd)
    # optional gradients absent
    torch.library.opcheck(ops.infini_bwd, (grads[0], None, None, None, None, *bwd[5:]))


def test_gradients_of_out_local_and_lse():
    # the auxiliary outputs are differentiable too (gradcheck of the raw op)
    q, k, v, beta, M, z = make_inputs(1, 2, 1, 6, 6, 4, torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True, True, True, False, True]])

    def f(q, k, v, beta, M, z):
        out, out_local, lse, M2, z2 = ops.infini_fwd(q, k, v, beta, M, z, mask, None, None, True, True, 0.5, True)
        return out, out_local, lse.masked_fill(lse.isinf(), 0.0), M2, z2

    assert torch.autograd.gradcheck(f, (q, k, v, beta, M, z))


def test_compile_fullgraph_matches_eager():
    q, k, v, beta, M, z = make_inputs(1, 4, 2, 40, 40, 16, requires_grad=True)

    def f(q, k, v, beta, M, z):
        out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z, delta_rule=True)
        return (out * out).sum() + M2.sum()

    eager = f(q, k, v, beta, M, z)
    got = torch.compile(f, fullgraph=True)(q, k, v, beta, M, z)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# 7. bad input: the message names the argument and what was expected

def _call(q, k, v, beta=None, M=None, z=None, **kw):
    beta = torch.zeros(q.shape[1]) if beta is None else beta
    return msattn.infini_attention(q, k, v, beta, M, z, **kw)


BAD = [
    ("beta must be 1-D", lambda q, k, v, M, z: _call(q, k, v, torch.zeros(3))),
    ("beta must be a floating", lambda q, k, v, M, z: _call(q, k, v, torch.zeros(4, dtype=torch.long))),
    ("memory must have shape", lambda q, k, v, M, z: _call(q, k, v, None, M[:, :1], z)),
    ("memory must be Float", lambda q, k, v, M, z: _call(q, k, v, None, M.double(), z)),
    ("norm must have shape", lambda q, k, v, M, z: _call(q, k, v, None, M, z[..., :3])),
    ("norm must be Float", lambda q, k, v, M, z: _call(q, k, v, None, M, z.half())),
    ("give memory and norm together", lambda q, k, v, M, z: _call(q, k, v, None, M, None)),
    ("multiple of k heads", lambda q, k, v, M, z: _call(q[:, :3], k, v, torch.zeros(3))),
    ("v must have k's shape", lambda q, k, v, M, z: _call(q, k, v[:, :, :5])),
    ("k must have q's dtype", lambda q, k, v, M, z: _call(q, k.double(), v)),
    ("q may not be longer than k", lambda q, k, v, M, z: _call(q, k[:, :, :10], v[:, :, :10])),
    ("key_padding_mask must be bool", lambda q, k, v, M, z: _call(q, k, v, key_padding_mask=torch.ones(2, 40))),
    ("key_padding_mask must have shape", lambda q, k, v, M, z: _call(
        q, k, v, key_padding_mask=torch.ones(2, 39, dtype=torch.bool))),
    ("scale must be finite", lambda q, k, v, M, z: _call(q, k, v, scale=math.inf)),
    ("rope tables must cover the segment's positions 0..39", lambda q, k, v, M, z: _call(
        q, k, v, rotary=rope_tables(39, 4))),
    ("rotary dim 2 \\* 5 exceeds head dim 8", lambda q, k, v, M, z: _call(q, k, v, rotary=rope_tables(40, 5))),
    ("rope_cos and rope_sin must be float32", lambda q, k, v, M, z: _call(
        q, k, v, rotary=tuple(t.double() for t in rope_tables(40, 4)))),
]


@pytest.mark.parametrize("message,call", BAD, ids=[m for m, _ in BAD])
def test_bad_input_is_a_clear_error(message, call):
    q, k, v, _, M, z = make_inputs(2, 4, 2, 40, 40, 8)
    with pytest.raises((RuntimeError, ValueError), match=message):
        call(q, k, v, M, z)


def test_empty_inputs():
    q, k, v, beta, M, z = make_inputs(2, 4, 2, 0, 0, 8, requires_grad=True)
    out, (M2, z2) = msattn.infini_attention(q, k, v, beta, M, z)
    assert out.shape == q.shape and torch.equal(M2, M) and torch.equal(z2, z)
    (out.sum() + M2.sum() + z2.sum()).backward()
    assert torch.equal(M.grad, torch.ones_like(M)) and k.grad.shape == k.shape


# ---------------------------------------------------------------------------------------------
# 8. HuggingFace: a tiny Llama patched with Infini-attention

transformers = pytest.importorskip("transformers")
import msattn.hf  # noqa: E402
from hf_compat import output_cache, with_cache  # noqa: E402
from msattn.hf.infini import InfiniGate, attention_forward  # noqa: E402


def tiny(layers=2, **kw):
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096, attn_implementation="sdpa")
    common.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def set_gates(model, value):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, InfiniGate):
                module.beta.fill_(value)


@pytest.mark.parametrize("pad", [None, "left"])
def test_hf_shut_gate_one_segment_equals_unpatched(pad):
    model = tiny()
    ids = torch.randint(3, 97, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.long)
    if pad:
        mask[1, :30] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        msattn.hf.patch(model, msattn.InfiniConfig(segment_len=128))
        assert model.config._attn_implementation == "msattn_infini"
        set_gates(model, -1e4)
        got = model(ids, attention_mask=mask).logits
        msattn.hf.unpatch(model)
        again = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], rtol=0, atol=1e-5 * ref.abs().max())
    assert torch.equal(again, ref)
    assert not any(isinstance(m, InfiniGate) for m in model.modules())


def test_hf_forward_backward_over_segments():
    model = tiny().train()
    msattn.hf.patch(model, msattn.InfiniConfig(segment_len=32, delta_rule=True))
    gates = [m.beta for m in model.modules() if isinstance(m, InfiniGate)]
    assert len(gates) == 2 and all(g.shape == (4,) and (g == msattn.InfiniConfig().gate_init).all() for g in gates)
    assert all(any(g is p for p in model.parameters()) for g in gates)  # the Trainer sees them
    ids = torch.randint(3, 97, (2, 128))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert all(g.grad.abs().sum() > 0 for g in gates)
    # the segments are not independent: a token of segment 0 changes the logits of segment 3
    model.eval()
    with torch.no_grad():
        a = model(ids).logits
        ids2 = ids.clone()
        ids2[:, 5] = (ids2[:, 5] + 1) % 97
        b = model(ids2).logits
    assert (a[:, 96:] - b[:, 96:]).abs().max() > 1e-6


def test_hf_segmented_forward_equals_op_reference():
    # the attention function walks segments and carries the memory like the op's own loop
    model = tiny(layers=1)
    msattn.hf.patch(model, msattn.InfiniConfig(segment_len=16))
    set_gates(model, 0.5)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 40, 16)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    got, _ = attention_forward(attn, q, k, v, None, scaling=0.25)
    memory = norm = None
    outs = []
    for a in (0, 16, 32):
        out, (memory, norm) = infini_ref(q[:, :, a:a + 16], k[:, :, a:a + 16], v[:, :, a:a + 16], attn.infini_gate(),
                                         memory, norm, scale=0.25)
        outs.append(out)
    assert rel_err(got.transpose(1, 2), torch.cat(outs, 2)) <= 2e-6


def test_hf_generate_with_the_infini_cache_equals_full_forwards():
    model = tiny()
    msattn.hf.patch(model, msattn.InfiniConfig(segment_len=16))
    set_gates(model, 0.0)
    ids = torch.randint(3, 97, (2, 21))
    out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert out.sequences.shape == (2, 51)
    cache = output_cache(out)
    assert isinstance(cache, msattn.hf.InfiniCache)
    layer = cache.layers[0]
    assert layer.keys.shape[2] <= 16 and layer.start == 48 and layer.memory is not None  # O(segment) cache
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits
    steps = torch.stack(out.logits, 1)  # (B, 30, V): the logits that chose tokens 21..50
    assert torch.allclose(steps, full[:, 20:50], rtol=0, atol=1e-4 * full.abs().max())


def test_hf_dynamic_cache_continuation_rebuilds_the_memory():
    model = tiny()
    msattn.hf.patch(model, msattn.InfiniConfig(segment_len=16))
    set_gates(model, 0.0)
    ids = torch.randint(3, 97, (1, 60))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :37], use_cache=True)
        assert type(output_cache(first)) is transformers.DynamicCache
        rest = model(ids[:, 37:], **with_cache(model, output_cache(first))).logits
    assert torch.allclose(rest, full[:, 37:], rtol=0, atol=1e-4 * full.abs().max())


def test_hf_gates_train_under_peft_modules_to_save():
    peft = pytest.importorskip("peft")
    model = msattn.hf.patch(tiny().train(), msattn.InfiniConfig(segment_len=32))
    cfg = peft.LoraConfig(r=4, target_modules=["k_proj"], modules_to_save=["infini_gate"], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, cfg)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad and "infini_gate" in n]
    assert trainable
    ids = torch.randint(3, 97, (1, 80))
    wrapped(ids, labels=ids).loss.backward()
    for n, p in wrapped.named_parameters():
        if p.requires_grad and "infini_gate" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_hf_patch_errors():
    model = tiny()
    with pytest.raises(ValueError, match="segment_len must be an int >= 1"):
        msattn.InfiniConfig(segment_len=0)
    with pytest.raises(ValueError, match="InfiniConfig.unrotated_memory must be a bool, got 'yes'"):
        msattn.InfiniConfig(unrotated_memory="yes")
    msattn.hf.patch(model, msattn.InfiniConfig(segment_len=8))
    with pytest.raises(RuntimeError, match="already patched"):
        msattn.hf.patch(model, msattn.InfiniConfig(segment_len=8))
    msattn.hf.unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        msattn.hf.unpatch(model)


def test_hf_beam_search_reorders_the_infini_cache():
    model = tiny()
    msattn.hf.patch(model, msattn.InfiniConfig(segment_len=16))
    set_gates(model, 0.0)
    ids = torch.randint(3, 97, (1, 21))
    kw = dict(max_new_tokens=20, min_new_tokens=20, num_beams=3, do_sample=False)
    out = model.generate(ids, **kw)  # InfiniCache: crosses segment boundaries at 32
    ref = model.generate(ids, **kw, **with_cache(model, transformers.DynamicCache()))
    assert torch.equal(out, ref)


# 9. Training segment by segment (truncated backpropagation through the memory), and the memory saved


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("delta_rule", [False, True])
def test_train_by_segments_equals_the_whole_sequence_forward(delta_rule):
    from msattn.hf.infini import train_by_segments

    torch.manual_seed(0)
    model = msattn.hf.patch(tiny().double().train(), msattn.InfiniConfig(segment_len=16, delta_rule=delta_rule,
                                                                        gate_init=0.0))
    ids = torch.randint(3, 97, (2, 72))  # 4.5 segments: the last window is partial
    labels = ids.clone()
    labels[0, :10] = -100
    loss = model(ids, labels=labels).loss
    loss.backward()
    whole = _grads(model)
    assert any("infini_gate" in n for n in whole)
    for horizon in (None, 5, 2, 1):
        model.zero_grad()
        got = train_by_segments(model, ids, labels, horizon=horizon)
        assert abs(got.item() - loss.item()) <= 1e-6 * loss.item()  # the forward never changes
        err = max(rel_err(p.grad, whole[n]) for n, p in model.named_parameters() if n in whole)
        if horizon in (None, 5):  # one window holds every segment: exactly the whole-sequence step
            assert err <= 1e-12, horizon
        else:  # truncated: later segments' losses no longer reach the earlier segments' memory writes
            assert err > 1e-3, horizon


def test_train_by_segments_bad_input():
    from msattn.hf.infini import train_by_segments

    ids = torch.randint(3, 97, (1, 20))
    with pytest.raises(ValueError, match="patched with Infini-attention"):
        train_by_segments(tiny(), ids, ids)
    model = msattn.hf.patch(tiny().train(), msattn.InfiniConfig(segment_len=8))
    with pytest.raises(ValueError, match="horizon must be a positive int"):
        train_by_segments(model, ids, ids, horizon=0)
    with pytest.raises(ValueError, match="of one shape"):
        train_by_segments(model, ids, ids[:, :10])


def test_infini_cache_saved_and_reloaded_continues_the_uninterrupted_run(tmp_path):
    model = tiny()
    msattn.hf.patch(model, msattn.InfiniConfig(segment_len=16, delta_rule=True))
    set_gates(model, 0.0)
    ids = torch.randint(3, 97, (2, 90))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache, _ = msattn.hf.prefill(model, ids[:, :53], chunk_size=None)  # 3 segments in memory, 5 keys held
        torch.save(cache.state_dict(), tmp_path / "memory.pt")
        del cache
        cache = msattn.hf.InfiniCache.from_state_dict(torch.load(tmp_path / "memory.pt"))
        assert cache.get_seq_length() == 53 and cache.layers[0].folded == 48
        rest = model(ids[:, 53:], position_ids=torch.arange(53, 90)[None], **with_cache(model, cache)).logits
    assert torch.allclose(rest, whole[:, 53:], rtol=0, atol=1e-5 * whole.abs().max())


# 10. unrotated_memory: the memory stores and retrieves un-rotated keys


def test_hf_unrotated_memory_local_attention_is_unchanged_and_memory_is_position_free():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(3, 97, (2, 80))
    shifted = torch.arange(1000, 1080)[None].expand(2, -1)
    logits = {}
    with torch.no_grad():
        for rope in ("inputs", "segment"):
            msattn.hf.patch(model, msattn.InfiniConfig(segment_len=16, unrotated_memory=rope == "segment"))
            assert model.model.rotary_emb.__class__.__name__ == (
                "UnrotatedRotary" if rope == "segment" else "LlamaRotaryEmbedding")
            set_gates(model, -1e4)  # local attention alone: RoPE is relative, both modes agree
            logits[rope, "shut"] = model(ids).logits
            set_gates(model, 0.0)
            logits[rope] = model(ids).logits
            logits[rope, "shifted"] = model(ids, position_ids=shifted).logits
            msattn.hf.unpatch(model)
    scale = logits["inputs", "shut"].abs().max()
    assert torch.allclose(logits["segment", "shut"], logits["inputs", "shut"], rtol=0, atol=1e-5 * scale)
    # with the memory open: un-rotated keys make the model blind to where the sequence starts
    assert torch.allclose(logits["segment", "shifted"], logits["segment"], rtol=0, atol=1e-5 * scale)
    assert not torch.allclose(logits["inputs", "shifted"], logits["inputs"], rtol=0, atol=1e-3 * scale)
    assert not torch.allclose(logits["segment"][:, 16:], logits["inputs"][:, 16:], rtol=0, atol=1e-3 * scale)


def test_hf_unrotated_memory_generate_and_train_by_segments():
    from msattn.hf.infini import train_by_segments

    torch.manual_seed(0)
    model = msattn.hf.patch(tiny(), msattn.InfiniConfig(segment_len=16, unrotated_memory=True, delta_rule=True))
    set_gates(model, 0.0)
    ids = torch.randint(3, 97, (2, 21))
    out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits
    assert torch.allclose(torch.stack(out.logits, 1), full[:, 20:50], rtol=0, atol=1e-4 * full.abs().max())
    model = model.double().train()
    ids = torch.randint(3, 97, (2, 50))
    loss = model(ids, labels=ids).loss
    loss.backward()
    whole = _grads(model)
    model.zero_grad()
    assert abs(train_by_segments(model, ids, ids).item() - loss.item()) <= 1e-6 * loss.item()
    assert max(rel_err(p.grad, whole[n]) for n, p in model.named_parameters() if n in whole) <= 1e-12
