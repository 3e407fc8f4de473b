"""msattn.self_extend_attention (SelfExtend, DESIGN section 3) against PyTorch references built from the
distance formula, its ops, its gradients, and the HuggingFace integration (msattn.hf with a SelfExtendConfig)."""

import math

import pytest
import torch

import msattn
from msattn.ops import ops
from reference import make_mask, rel_err, rotate, sdpa_ref


def make_qkv(B, Hq, Hkv, Nq, N, D, dtype=torch.float64, requires_grad=False):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, Hkv, N, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, Hkv, N, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def inv_freq(rotary_dim, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def rope_tables(length, rotary_dim, theta=10000.0):
    """float32 (length, rotary_dim / 2) cos and sin, computed in float64."""
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq(rotary_dim, theta)[None, :]
    return ang.cos().float(), ang.sin().float()


# ---------------------------------------------------------------------------------------------
# references, written from DESIGN section 3

def self_extend_distance(i, j, group_size, window, causal=True):
    """DESIGN 3: i - j inside the window, else floor(i/G) - floor(j/G) + W - floor(W/G); for a key after
    the query (non-causal) the mirror image, negative. i (Nq, 1), j (1, N) -> (Nq, N) int64."""
    d = i - j
    grouped = i // group_size - j // group_size + window - window // group_size
    mirrored = -(j // group_size - i // group_size + window - window // group_size)
    return torch.where(d.abs() < window, d, torch.where(d >= 0, grouped, mirrored))


def rotate_at(x, cos, sin, pos):
    """RoPE of x (..., L, D) at positions pos (L,), negative positions rotating backwards."""
    sign = torch.where(pos < 0, -1.0, 1.0).double()[:, None]
    c, s = cos[pos.abs()].double(), sin[pos.abs()].double() * sign
    half = cos.shape[1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half:]], dim=-1)


def self_extend_ref(q, k, v, *, group_size, window, rotary, causal=True, scale=None, key_padding_mask=None,
                    sliding_window=None):
    """The full (Nq, N) score matrix in float64, each score from the rotated pair whose positions
    differ by DESIGN's distance: q at i / floor(i/G) + W - floor(W/G) / (non-causal, key after)
    floor(i/G) - W + floor(W/G), k at j / floor(j/G); the same float32 tables as the kernel.
    -> (out, lse), differentiable."""
    cos, sin = rotary
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G, W = group_size, window
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    i, j = torch.arange(N - Nq, N), torch.arange(N)
    d = i[:, None] - j[None, :]
    near, past = d.abs() < W, (d.abs() >= W) & (d >= 0)
    # rows that never use a rotation get position 0 there (their tables may not reach)
    q_past = torch.where(i >= W, i // G + W - W // G, 0)
    q_future = torch.where(i + max(W, 1) <= N - 1, i // G - W + W // G, 0)
    kn, kg = rotate_at(k, cos, sin, j), rotate_at(k, cos, sin, j // G)
    s_near = rotate_at(q, cos, sin, i) @ kn.transpose(-1, -2)
    s_past = rotate_at(q, cos, sin, q_past) @ kg.transpose(-1, -2)
    s_future = rotate_at(q, cos, sin, q_future) @ kg.transpose(-1, -2)
    S = torch.where(near, s_near, torch.where(past, s_past, s_future)) * scale
    allowed = torch.ones(B, 1, Nq, N, dtype=torch.bool)
    if causal:
        allowed = allowed & (d >= 0)
    if sliding_window:
        allowed = allowed & (d.abs() < sliding_window)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    S = S.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(S, dim=-1)
    P = torch.exp(S - lse[..., None]).nan_to_num(0.0)
    return P @ v, lse


def check_out_lse(out, lse, ref, ref_lse, tol):
    assert rel_err(out, ref) <= tol
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    if finite.any():
        assert (lse.double() - ref_lse)[finite].abs().max() <= 10 * tol


# ---------------------------------------------------------------------------------------------
# 1. a window covering every distance, or group size 1: ordinary RoPE attention

COVER_SHAPES = [  # (B, Hq, Hkv, Nq, N, D)
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 97, 97, 64),
    (1, 4, 1, 33, 97, 8),
    (2, 2, 2, 1, 130, 16),
    (1, 2, 1, 300, 300, 64),
]


@pytest.mark.parametrize("shape", COVER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pad", [None, "left"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_covering_window_equals_rope_sdpa(shape, pad, dtype):
    B, Hq, Hkv, Nq, N, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, dtype)
    mask = make_mask(B, N, pad)
    cos, sin = rope_tables(N, D)
    out = msattn.self_extend_attention(q, k, v, group_size=3, window=N, rotary=(cos, sin), key_padding_mask=mask)
    # HF-style RoPE on the inputs, then dense causal attention
    qr, kr = rotate(q.double(), cos, sin, torch.arange(N - Nq, N)), rotate(k.double(), cos, sin, torch.arange(N))
    ref, _ = sdpa_ref(qr, kr, v, key_padding_mask=mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) <= (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_group_size_one_is_ordinary_rope(causal):
    q, k, v = make_qkv(2, 4, 2, 97, 97, 16)
    cos, sin = rope_tables(97, 12)  # partial rotary: dims 12..15 pass through
    out = msattn.self_extend_attention(q, k, v, group_size=1, window=5, rotary=(cos, sin), causal=causal)
    qr, kr = rotate(q, cos, sin, torch.arange(97)), rotate(k, cos, sin, torch.arange(97))
    ref, _ = sdpa_ref(qr, kr, v, causal=causal)
    assert rel_err(out, ref) <= 1e-10


# ---------------------------------------------------------------------------------------------
# 2. the reference realises DESIGN's distances, and the kernel equals the reference

def test_reference_positions_realise_the_distance_formula():
    N = 120
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    for G, W in [(2, 5), (3, 7), (4, 0), (5, 33), (1, 9)]:
        want = self_extend_distance(i, j, G, W)
        ii, jj = i.expand(N, N), j.expand(N, N)
        d = ii - jj
        qpos = torch.where(d.abs() < W, ii, torch.where(d >= 0, ii // G + W - W // G, ii // G - W + W // G))
        kpos = torch.where(d.abs() < W, jj, jj // G)
        assert torch.equal(qpos - kpos, want)


def test_scores_follow_the_distance_formula_directly():
    # an independent check: rotate q by DESIGN's distance itself, in float64 angles (no tables); the
    # kernel's float32 tables differ from it by their rounding only
    B, Hq, Hkv, N, D, G, W = 1, 2, 1, 150, 16, 3, 10
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D)
    out = msattn.self_extend_attention(q, k, v, group_size=G, window=W, rotary=rope_tables(N, D))
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    dist = self_extend_distance(i, j, G, W).double()
    ang = dist[..., None] * inv_freq(D)  # (N, N, D/2)
    c, s = ang.cos(), ang.sin()
    h = D // 2
    qq = q[0][:, :, None, :]  # (Hq, N, 1, D)
    q1, q2 = qq[..., :h], qq[..., h:]
    # R(dist) q paired with unrotated k: q1 c - q2 s, q2 c + q1 s
    rq = torch.cat([q1 * c - q2 * s, q2 * c + q1 * s], -1)  # (Hq, N, N, D)
    S = (rq * k[0, 0][None, None]).sum(-1) / math.sqrt(D)
    S = S.masked_fill(j > i, -math.inf)
    ref = torch.softmax(S, -1) @ v[0, 0]
    assert rel_err(out[0], ref) <= 1e-5


CASES = [  # (B, Hq, Hkv, Nq, N, D, group_size, window, causal, sliding_window)
    (1, 1, 1, 1, 1, 8, 2, 1, True, 0),          # a single token
    (2, 4, 2, 97, 97, 8, 3, 7, True, 0),        # GQA, odd G and W
    (1, 2, 1, 1, 97, 64, 4, 6, True, 0),        # decode
    (2, 2, 1, 1, 300, 8, 5, 11, True, 0),       # decode, GQA, long
    (1, 4, 2, 23, 130, 16, 3, 9, True, 0),      # chunked prefill, Nq < N
    (1, 2, 2, 300, 300, 64, 5, 33, True, 0),    # D 64
    (1, 12, 1, 40, 70, 16, 2, 9, True, 0),      # many query heads per KV head
    (1, 2, 1, 60, 60, 8, 3, 0, True, 0),        # window 0: every score grouped
    (2, 2, 1, 80, 80, 8, 3, 9, False, 0),       # non-causal
    (1, 2, 2, 50, 90, 8, 2, 4, True, 20),       # sliding window (Mistral)
    (1, 2, 1, 70, 70, 16, 2, 9, False, 25),     # non-causal with a sliding window
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_equals_distance_reference(case, pad, dtype):
    B, Hq, Hkv, Nq, N, D, G, W, causal, sw = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, dtype)
    mask = make_mask(B, N, pad)
    kw = dict(group_size=G, window=W, rotary=rope_tables(N + 3, D), causal=causal, key_padding_mask=mask,
              sliding_window=sw)
    out, lse = msattn.self_extend_attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = self_extend_ref(q, k, v, **kw)
    check_out_lse(out, lse, ref, ref_lse, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[8], CASES[9]],
                         ids=lambda c: "-".join(map(str, c)))
def test_fast_kernels_on_every_isa(case, isa):
    B, Hq, Hkv, Nq, N, D, G, W, causal, sw = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float32, requires_grad=True)
    mask = make_mask(B, N, "left")
    kw = dict(group_size=G, window=W, rotary=rope_tables(N, D), causal=causal, key_padding_mask=mask,
              sliding_window=sw)
    out = msattn.self_extend_attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = self_extend_ref(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


def test_decode_equals_the_last_rows_of_prefill():
    B, Hq, Hkv, N, D = 2, 4, 2, 130, 32
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, torch.float32)
    kw = dict(group_size=4, window=16, rotary=rope_tables(N, D), key_padding_mask=make_mask(B, N, "left"))
    full = msattn.self_extend_attention(q, k, v, **kw)
    for nq in (1, 7):
        part = msattn.self_extend_attention(q[:, :, -nq:], k, v, **kw)
        assert rel_err(part, full[:, :, -nq:].double()) <= 1e-6


# ---------------------------------------------------------------------------------------------
# 3. gradients

GRAD_CASES = [  # (B, Hq, Hkv, Nq, N, D, group_size, window, causal, sliding_window, pad)
    (1, 2, 1, 13, 13, 4, 2, 3, True, 0, None),
    (2, 2, 2, 9, 9, 4, 3, 4, True, 0, "left"),
    (1, 2, 1, 5, 17, 4, 3, 5, True, 0, "right"),
    (1, 2, 1, 12, 12, 4, 2, 3, False, 0, None),
    (1, 2, 1, 11, 11, 4, 2, 3, True, 5, None),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_float64(case):
    B, Hq, Hkv, Nq, N, D, G, W, causal, sw, pad = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, requires_grad=True)
    mask = make_mask(B, N, pad)
    kw = dict(group_size=G, window=W, rotary=rope_tables(N, D), causal=causal, key_padding_mask=mask,
              sliding_window=sw)

    def f(q, k, v):
        out, lse = msattn.self_extend_attention(q, k, v, return_lse=True, **kw)
        return out, lse.masked_fill(lse.isinf(), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("pad", [None, "right"])
def test_float32_gradients_equal_reference(case, pad):
    B, Hq, Hkv, Nq, N, D, G, W, causal, sw = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float32, requires_grad=True)
    mask = make_mask(B, N, pad)
    kw = dict(group_size=G, window=W, rotary=rope_tables(N, D), causal=causal, key_padding_mask=mask,
              sliding_window=sw)
    out, lse = msattn.self_extend_attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = self_extend_ref(q, k, v, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    finite = ref_lse.isfinite()
    loss = (out * dout).sum() + (lse * dlse).masked_fill(~finite, 0.0).sum()
    ref_loss = (ref * dout.double()).sum() + (ref_lse * dlse.double()).masked_fill(~finite, 0.0).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision(dtype):
    B, Hq, Hkv, N, D = 1, 4, 2, 200, 32
    q, k, v = (t.to(dtype).requires_grad_() for t in make_qkv(B, Hq, Hkv, N, N, D, torch.float32))
    kw = dict(group_size=3, window=20, rotary=rope_tables(N, D))
    out = msattn.self_extend_attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = self_extend_ref(q, k, v, **kw)  # the reference sees the same rounded inputs
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype and rel_err(out, ref) <= 4 * eps
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and rel_err(g, r) <= 8 * eps


# ---------------------------------------------------------------------------------------------
# padding, strides, determinism

def test_padded_keys_never_change_the_result():
    B, Hq, Hkv, N, D = 2, 4, 2, 150, 16
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, torch.float32, requires_grad=True)
    mask = make_mask(B, N, "left")
    kw = dict(group_size=4, window=12, rotary=rope_tables(N, D), key_padding_mask=mask)
    out = msattn.self_extend_attention(q, k, v, **kw)
    dq, = torch.autograd.grad(out.sum(), q)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~mask[:, None, :].expand_as(k2[..., 0])] = 1e4
    v2[~mask[:, None, :].expand_as(v2[..., 0])] = -7.0
    out2 = msattn.self_extend_attention(q, k2, v2, **kw)
    dq2, = torch.autograd.grad(out2.sum(), q)
    assert torch.equal(out, out2) and torch.equal(dq, dq2)


def test_query_without_keys_gives_zeros():
    q, k, v = make_qkv(2, 2, 1, 20, 20, 8, torch.float32, requires_grad=True)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :10] = False  # row 1: queries 0..9 see no real key
    out, lse = msattn.self_extend_attention(q, k, v, group_size=2, window=3, rotary=rope_tables(20, 8),
                                            key_padding_mask=mask, return_lse=True)
    assert (out[1, :, :10] == 0).all() and (lse[1, :, :10] == -math.inf).all()
    assert lse[1, :, 10:].isfinite().all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.isfinite().all() for g in grads)
    assert (grads[0][1, :, :10] == 0).all()
    assert (grads[1][1, :, :10] == 0).all() and (grads[2][1, :, :10] == 0).all()


def test_any_strides():
    B, Hq, Hkv, N, D = 2, 4, 2, 100, 24
    base = torch.randn(B, N, Hq + 2 * Hkv, D)  # a fused qkv projection, (B, N, H, D) layout
    q, k, v = (x.transpose(1, 2) for x in base.split([Hq, Hkv, Hkv], dim=2))
    assert not q.is_contiguous()
    kw = dict(group_size=3, window=10, rotary=rope_tables(N, D))
    out = msattn.self_extend_attention(q, k, v, **kw)
    assert torch.equal(out, msattn.self_extend_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw))
    wide = torch.randn(B, Hq, N, 2 * D)[..., ::2]  # head dim not unit-strided
    assert torch.equal(msattn.self_extend_attention(wide, k, v, **kw),
                       msattn.self_extend_attention(wide.contiguous(), k, v, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_deterministic_forward_and_backward(dtype):
    B, Hq, Hkv, N, D = 2, 8, 2, 400, 32
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype, requires_grad=True)
    kw = dict(group_size=4, window=40, rotary=rope_tables(N, D))
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out = msattn.self_extend_attention(q, k, v, **kw)
            runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_empty_inputs():
    q, k, v = make_qkv(2, 4, 2, 0, 0, 8, torch.float32, requires_grad=True)
    out = msattn.self_extend_attention(q, k, v, group_size=2, window=4, rotary=rope_tables(1, 8))
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ---------------------------------------------------------------------------------------------
# ops: schemas, fake kernels, autograd registration

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("nq", [70, 13])
def test_opcheck(dtype, nq):
    q, k, v = make_qkv(2, 4, 2, nq, 70, 16, dtype, requires_grad=True)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[1, :9] = False
    cos, sin = rope_tables(70, 16)
    fwd_args = (q, k, v, cos, sin, mask, 3, 7, 0, True, 0.25)
    torch.library.opcheck(ops.self_extend_fwd, fwd_args)
    torch.library.opcheck(ops.self_extend_fwd, (q, k, v, cos, sin, None, 2, 5, 30, False, 0.25))
    out, lse = ops.self_extend_fwd(*fwd_args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    bwd_args = (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cos, sin, mask,
                3, 7, 0, True, 0.25)
    torch.library.opcheck(ops.self_extend_bwd, bwd_args)


def test_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(2, 4, 2, 60, 60, 16, torch.float32, requires_grad=True)
    rotary = rope_tables(60, 16)

    def f(q, k, v):
        out = msattn.self_extend_attention(q, k, v, group_size=3, window=8, rotary=rotary)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# bad input: the message names the argument and what was expected

def _call(q, k, v, **kw):
    args = dict(group_size=2, window=4, rotary=rope_tables(40, 8))
    args.update(kw)
    return msattn.self_extend_attention(q, k, v, **args)


BAD = [
    ("group_size must be in", lambda q, k, v: _call(q, k, v, group_size=0)),
    ("window must be in", lambda q, k, v: _call(q, k, v, window=-1)),
    ("sliding_window must be in", lambda q, k, v: _call(q, k, v, sliding_window=-3)),
    ("rotary tables too short", lambda q, k, v: _call(q, k, v, rotary=rope_tables(39, 8))),
    ("must be float32", lambda q, k, v: _call(q, k, v, rotary=tuple(t.double() for t in rope_tables(40, 8)))),
    ("of one shape", lambda q, k, v: _call(q, k, v, rotary=(rope_tables(40, 8)[0], rope_tables(41, 8)[1]))),
    ("rotary dim", lambda q, k, v: _call(q, k, v, rotary=rope_tables(40, 10))),
    ("q must be 4-D", lambda q, k, v: _call(q[0], k, v)),
    ("multiple of k heads", lambda q, k, v: _call(q[:, :3], k, v)),
    ("v must have k's shape", lambda q, k, v: _call(q, k, v[:, :, :5])),
    ("k must have q's head dim", lambda q, k, v: _call(q, k[..., :4], v[..., :4])),
    ("k must have q's dtype", lambda q, k, v: _call(q, k.double(), v)),
    ("q may not be longer than k", lambda q, k, v: _call(q, k[:, :, :10], v[:, :, :10])),
    ("key_padding_mask must be bool", lambda q, k, v: _call(q, k, v, key_padding_mask=torch.ones(2, 40))),
    ("key_padding_mask must have shape", lambda q, k, v: _call(
        q, k, v, key_padding_mask=torch.ones(2, 39, dtype=torch.bool))),
]


@pytest.mark.parametrize("message,call", BAD, ids=[m for m, _ in BAD])
def test_bad_input_is_a_clear_error(message, call):
    q, k, v = make_qkv(2, 4, 2, 40, 40, 8, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        call(q, k, v)


# ---------------------------------------------------------------------------------------------
# HuggingFace: msattn.hf with a SelfExtendConfig

transformers = pytest.importorskip("transformers")
import msattn.hf  # noqa: E402
from hf_compat import output_cache, with_cache  # noqa: E402

def tiny(kind="llama", layers=2, sliding_window=None, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096, attn_implementation="sdpa")
    common.update(kw)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common)).eval()


def batch(B, N, pad=None):
    ids = torch.randint(3, 97, (B, N))
    mask = torch.ones(B, N, dtype=torch.long)
    if pad == "left":
        mask[1, :N // 3] = 0
    elif pad == "right":
        mask[1, N - N // 3:] = 0
    return ids, mask


@pytest.mark.parametrize("kind,sliding_window", [("llama", None), ("mistral", None), ("mistral", 32)])
@pytest.mark.parametrize("pad", [None, "left"])
def test_hf_huge_window_equals_unpatched(kind, sliding_window, pad):

    model = tiny(kind, sliding_window=sliding_window)
    ids, mask = batch(2, 120, pad)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        msattn.hf.patch(model, msattn.SelfExtendConfig(group_size=4, window=4096))
        assert model.config._attn_implementation == "msattn_self_extend"
        got = model(ids, attention_mask=mask).logits
        msattn.hf.unpatch(model)
        assert model.config._attn_implementation == "sdpa"
        again = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], ref[valid], rtol=0, atol=1e-5 * ref.abs().max())
    assert torch.equal(again, ref)


@pytest.mark.parametrize("kind,sliding_window", [("llama", None), ("mistral", 24)])
def test_hf_generate_same_greedy_tokens_with_huge_window(kind, sliding_window):

    model = tiny(kind, sliding_window=sliding_window)
    ids, mask = batch(2, 40, "left")
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    msattn.hf.patch(model, msattn.SelfExtendConfig(group_size=4, window=4096))
    assert torch.equal(model.generate(ids, **kw), ref)


def test_hf_cached_decoding_equals_a_full_forward():
    # a small window: decoding against a cache of un-rotated keys gives the full forward's last rows

    model = msattn.hf.patch(tiny(), msattn.SelfExtendConfig(group_size=3, window=8))
    ids, _ = batch(1, 60)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :50], use_cache=True)
        cache, steps = output_cache(out), [out.logits[:, -1]]
        for t in range(50, 59):
            out = model(ids[:, t:t + 1], use_cache=True, **with_cache(model, cache))
            steps.append(out.logits[:, -1])
        ref = model.generate(ids[:, :50], max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert ref.shape == (1, 80)
    got = torch.stack(steps, 1)
    assert torch.allclose(got, full[:, 49:59], rtol=0, atol=1e-5 * full.abs().max())


def test_hf_small_window_changes_far_logits_only():

    model = tiny()
    ids, _ = batch(1, 100)
    with torch.no_grad():
        ref = model(ids).logits
        msattn.hf.patch(model, msattn.SelfExtendConfig(group_size=4, window=16))
        got = model(ids).logits
    scale = ref.abs().max()
    # the first 16 positions only see neighbours
    assert torch.allclose(got[:, :16], ref[:, :16], rtol=0, atol=1e-5 * scale)
    assert not torch.allclose(got[:, -20:], ref[:, -20:], rtol=0, atol=1e-3 * scale)


def test_hf_backward_through_patched_model():

    model = msattn.hf.patch(tiny().train(), msattn.SelfExtendConfig(group_size=2, window=10))
    ids, mask = batch(2, 64, "right")
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


def test_hf_bad_input():
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        msattn.SelfExtendConfig(group_size=0, window=4)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        msattn.SelfExtendConfig(group_size=2, window=-1)
    model = msattn.hf.patch(tiny(), msattn.SelfExtendConfig(group_size=2, window=4))
    with pytest.raises(RuntimeError, match="already patched"):
        msattn.hf.patch(model, msattn.SelfExtendConfig(group_size=2, window=4))
    # a sliding-window cache drops keys whose slots SelfExtend needs
    mistral = tiny("mistral", sliding_window=16)
    msattn.hf.patch(mistral, msattn.SelfExtendConfig(group_size=2, window=4))
    ids, _ = batch(1, 30)
    cache = DynamicCache(config=mistral.config)
    with torch.no_grad():
        mistral(ids[:, :20], use_cache=True, **with_cache(mistral, cache))
        with pytest.raises(NotImplementedError, match="dropped its first"):
            mistral(ids[:, 20:21], use_cache=True, **with_cache(mistral, cache))
    plain = tiny()
    plain.set_attn_implementation("msattn_self_extend")
    with pytest.raises(RuntimeError, match="not patched"):
        plain(torch.randint(0, 97, (1, 10)))
