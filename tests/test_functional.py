"""msattn.ms_attention and msattn.ms_select against independent references (tests/reference.py)."""

import math

import pytest
import torch

import msattn
from conftest import RUNNABLE_ISAS
from reference import make_mask, ms_attention_ref, rel_err, sdpa_ref, select_ref


def make_qkv(B, Hq, Hkv, Nq, N, D, dtype=torch.float64, requires_grad=False):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, Hkv, N, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, Hkv, N, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# 1. topk covering every region: exactly dense attention

DENSE_SHAPES = [  # (B, Hq, Hkv, Nq, N, D)
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 97, 97, 59),
    (1, 4, 1, 33, 97, 8),
    (2, 2, 2, 1, 130, 16),
    (1, 2, 1, 1025, 1025, 128),
]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_covering_topk_equals_sdpa(shape, causal, pad, dtype):
    B, Hq, Hkv, Nq, N, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, dtype)
    mask = make_mask(B, N, pad)
    block_q, block_k, merge = (16, 16, 4) if N > 200 else (4, 8, 4)
    topk = math.ceil(N / block_k)
    out = msattn.ms_attention(q, k, v, block_q=block_q, block_k=block_k, merge=merge, topk=topk,
                              causal=causal, key_padding_mask=mask)
    ref, _ = sdpa_ref(q, k, v, causal=causal, key_padding_mask=mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_default_parameters_equal_sdpa_up_to_topk_regions():
    # with the authors' defaults (topk=448, block_k=16), 1500 tokens are far below 448 regions: dense
    q, k, v = make_qkv(1, 2, 1, 1500, 1500, 32, torch.float32)
    ref, _ = sdpa_ref(q, k, v)
    assert rel_err(msattn.ms_attention(q, k, v), ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 2. the selection equals the reference of DESIGN 1.5, exactly

SELECT_CASES = [  # (B, Hq, Hkv, Nq, N, D, block_q, block_k, merge, topk, causal)
    (2, 4, 2, 200, 200, 16, 4, 4, 2, 3, True),
    (1, 2, 2, 97, 97, 59, 4, 8, 4, 2, True),
    (1, 4, 1, 57, 301, 8, 8, 4, 3, 5, True),
    (2, 2, 1, 1, 257, 16, 16, 16, 4, 4, True),
    (1, 3, 3, 130, 130, 12, 4, 8, 2, 4, False),
    (1, 2, 1, 40, 321, 8, 8, 8, 2, 6, False),
]


@pytest.mark.parametrize("case", SELECT_CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_select_score_channels_weigh_the_scores(case):
    B, Hq, Hkv, Nq, N, D, bq, bk, merge, topk, causal = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float64)
    kw = dict(block_q=bq, block_k=bk, merge=merge, topk=topk, causal=causal)
    weights = torch.rand(D, dtype=torch.float64).round()  # 0/1: which channels count
    weights[0] = 1.0
    got = msattn.ms_select(q, k, score_channels=weights, **kw)
    # sum_d w_d qbar[d] kbar[d]: the reference's selection of q with its channels weighed, k as it is
    assert torch.equal(got, select_ref(q * weights, k, **kw))
    assert torch.equal(msattn.ms_select(q, k, score_channels=torch.ones(D, dtype=torch.float32), **kw),
                       msattn.ms_select(q, k, **kw))
    # the attention selects with them and attends with every channel
    out = msattn.ms_attention(q, k, v, score_channels=weights, **kw)
    assert torch.equal(out, msattn.ms_attention(q, k, v, index=got, **kw))
    for bad in (torch.ones(D + 1), torch.ones(D, dtype=torch.int64), [1.0] * D):
        with pytest.raises(ValueError, match=rf"msattn.ms_select: score_channels must be a floating tensor of "
                                             rf"shape \(D,\) = \({D},\)"):
            msattn.ms_select(q, k, score_channels=bad, **kw)


@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("local", [0, 1, 2])
def test_select_equals_reference(case, pad, dtype, local):
    B, Hq, Hkv, Nq, N, D, bq, bk, merge, topk, causal = case
    q, k, _ = make_qkv(B, Hq, Hkv, Nq, N, D, dtype)
    mask = make_mask(B, N, pad)
    kw = dict(block_q=bq, block_k=bk, merge=merge, topk=topk, causal=causal, local=local, key_padding_mask=mask)
    got = msattn.ms_select(q, k, **kw)
    want = select_ref(q, k, **kw)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want)


MULTISCALE_CASES = [  # SELECT_CASES' shapes with (coarse_regions, coarse_topk): partial last coarse regions,
    # coarse regions straddling a group's own span (non-causal), lists shorter than topk, s = 1
    (*SELECT_CASES[0], 4, 2), (*SELECT_CASES[0], 3, 1), (*SELECT_CASES[1], 2, 1), (*SELECT_CASES[2], 5, 2),
    (*SELECT_CASES[3], 3, 2), (*SELECT_CASES[4], 3, 2), (*SELECT_CASES[5], 4, 3), (*SELECT_CASES[5], 1, 7),
]


@pytest.mark.parametrize("case", MULTISCALE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("pad", [None, "left"])
@pytest.mark.parametrize("local", [0, 1])
def test_multiscale_select_equals_reference_on_every_isa(case, pad, local, isa):
    B, Hq, Hkv, Nq, N, D, bq, bk, merge, topk, causal, coarse, coarse_topk = case
    q, k, _ = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float32)
    mask = make_mask(B, N, pad)
    kw = dict(block_q=bq, block_k=bk, merge=merge, topk=topk, causal=causal, local=local, key_padding_mask=mask,
              coarse_regions=coarse, coarse_topk=coarse_topk)
    assert torch.equal(msattn.ms_select(q, k, **kw), select_ref(q, k, **kw))


@pytest.mark.parametrize("causal", [True, False])
def test_multiscale_select_keeping_every_coarse_region_is_exact(causal):
    q, k, _ = make_qkv(2, 4, 2, 700, 700, 16, torch.float32)
    mask = make_mask(2, 700, "left")
    kw = dict(block_q=4, block_k=4, merge=4, topk=6, causal=causal, key_padding_mask=mask)
    exact = msattn.ms_select(q, k, **kw)
    assert torch.equal(msattn.ms_select(q, k, coarse_regions=8, coarse_topk=22, **kw), exact)  # 22 = cdiv(175, 8)
    assert torch.equal(msattn.ms_select(q, k, coarse_regions=1, coarse_topk=175, **kw), exact)
    coarse = msattn.ms_select(q, k, coarse_regions=8, coarse_topk=2, **kw)
    assert not torch.equal(coarse, exact)
    # every group that ranks still selects topk regions (2 coarse regions hold 16 candidates >= 6)
    assert ((coarse >= 0).sum(-1) == (exact >= 0).sum(-1)).all()


def test_multiscale_select_from_a_cache_equals_from_keys():
    q, k, _ = make_qkv(1, 4, 2, 1, 600, 16, torch.float32)
    kw = dict(block_q=4, block_k=4, merge=2, topk=5, coarse_regions=6, coarse_topk=3)
    sums = torch.zeros(1, 2, 150, 16)
    counts = torch.zeros(1, 2, 150, dtype=torch.int32)
    torch.ops.msattn.ms_region_sums_append_(sums, counts, k, None, 0, 4)
    assert torch.equal(msattn.ms_select(q, k, key_sums=sums, key_counts=counts, **kw), msattn.ms_select(q, k, **kw))


@pytest.mark.parametrize("coarse_regions,coarse_topk,message", [
    (-1, 1, r"coarse_regions must lie in \[0, "),
    (0, 2, "coarse_topk needs coarse_regions >= 1"),
    (4, 0, r"coarse_topk must lie in \[1, "),
])
def test_multiscale_select_rejects_bad_parameters(coarse_regions, coarse_topk, message):
    q, k, _ = make_qkv(1, 2, 1, 64, 64, 8, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        msattn.ms_select(q, k, block_q=4, block_k=4, merge=2, topk=3, coarse_regions=coarse_regions,
                         coarse_topk=coarse_topk)


def test_select_local_regions():
    # every ranking group holds the `local` regions just before it, and local = topk selects only them
    q, k, _ = make_qkv(1, 4, 2, 256, 256, 8, torch.float32)
    kw = dict(block_q=4, block_k=4, merge=2, topk=3)
    plain = msattn.ms_select(q, k, **kw)
    for local in (1, 2, 3):
        got = msattn.ms_select(q, k, local=local, **kw)
        for g in range(2, 32):  # the groups with more than topk candidates (2g regions before group g)
            near = set(range(2 * g - local, 2 * g))
            assert near <= set(got[0, 0, g].tolist()), (local, g)
            if local == 3:
                assert got[0, 0, g].tolist() == sorted(near)
        assert torch.equal(got[:, :, :2], plain[:, :, :2])  # dense groups: unchanged
    assert not torch.equal(msattn.ms_select(q, k, local=1, **kw), plain)


@pytest.mark.parametrize("local", [-1, 4])
def test_select_rejects_local_outside_topk(local):
    q, k, _ = make_qkv(1, 2, 1, 64, 64, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"local must lie in \[0, topk = 3\], got " + str(local)):
        msattn.ms_select(q, k, block_q=4, block_k=4, merge=2, topk=3, local=local)


@pytest.mark.parametrize("D", [32, 13])
def test_select_is_the_same_on_every_isa(D):
    # many candidates per group (blocks of candidates, vector loops and their scalar tails), tiles of
    # groups that mix dense and ranking groups, Nq < N and padding: one selection, bit for bit
    q, k, _ = make_qkv(1, 4, 2, 900, 1000, D, torch.float32)
    mask = make_mask(1, 1000, "left")
    kw = dict(block_q=4, block_k=4, merge=2, topk=5, key_padding_mask=mask)
    got = {}
    for name in RUNNABLE_ISAS:
        msattn.set_isa(name)
        try:
            got[name] = msattn.ms_select(q, k, **kw)
        finally:
            msattn.set_isa("auto")
    first = next(iter(got.values()))
    for name, index in got.items():
        assert torch.equal(index, first), name
    assert torch.equal(first, select_ref(q, k, **kw))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1e-21, 1e15])
def test_select_blocked_screen_equals_reference_on_every_isa(causal, scale):
    # enough query regions per tile for the blocked screen (AMX or float score tiles) and several
    # panels of 64 candidates, D not a multiple of 32 (the bf16 panels pad it); scores below float's
    # normal range (1e-21: AMX flushes them; without the margins' absolute terms the AMX selection
    # differed at every scale from 1e-20 to 1e-22) and large sums (1e15)
    q, k, _ = make_qkv(1, 4, 2, 1200, 1200, 40, torch.float32)
    q, k = q * scale, k * scale
    kw = dict(block_q=4, block_k=4, merge=4, topk=6, causal=causal)
    want = select_ref(q, k, **kw)
    for name in RUNNABLE_ISAS:
        msattn.set_isa(name)
        try:
            assert torch.equal(msattn.ms_select(q, k, **kw), want), name
        finally:
            msattn.set_isa("auto")


def test_select_screening_keeps_near_ties():
    # key regions whose scores differ by about 1e-6 of their size, below what float32 resolves: the
    # float screen that tiles of many query regions use must keep every candidate that can still
    # reach a heap. A group selected on its own (two query regions: exact scores only) must agree with
    # the same group selected inside a tile of the whole sequence
    # (with no margin in the screen, 3-7 groups of these differ on seeds 1 and 2)
    torch.manual_seed(2)
    D, bq, bk, merge, topk, N = 32, 4, 4, 2, 3, 2048
    u = torch.randn(D, dtype=torch.float64)
    k = (u + 1e-6 * torch.randn(1, 1, N, D, dtype=torch.float64)).float()
    q = (u + 1e-6 * torch.randn(1, 2, N, D, dtype=torch.float64)).float()
    kw = dict(block_q=bq, block_k=bk, merge=merge, topk=topk)
    span = bq * merge
    for name in RUNNABLE_ISAS:
        msattn.set_isa(name)
        try:
            whole = msattn.ms_select(q, k, **kw)
            for g in range(topk * bk // span + 1, N // span):  # every group that ranks
                e = (g + 1) * span
                alone = msattn.ms_select(q[:, :, e - span:e], k[:, :, :e], **kw)
                assert torch.equal(alone[:, :, 0], whole[:, :, g]), (name, g)
        finally:
            msattn.set_isa("auto")


def test_select_breaks_ties_to_the_lower_region():
    # key regions 0..7 in pairs of identical content: every score ties with its twin
    bk, D = 4, 8
    base = torch.randn(1, 1, 4, bk, D).repeat_interleave(2, dim=2).reshape(1, 1, 8 * bk, D)
    k = torch.cat([base, torch.randn(1, 1, 32, D)], dim=2)  # 64 tokens
    q = torch.randn(1, 1, 64, D)
    got = msattn.ms_select(q, k, block_q=4, block_k=bk, merge=8, topk=3)
    assert torch.equal(got, select_ref(q, k, block_q=4, block_k=bk, merge=8, topk=3))
    assert (got[0, 0, 1] >= 0).all()
    # group 1 sees regions 0..7: whatever it picks, it never takes a twin without the lower one
    picked = set(got[0, 0, 1].tolist())
    for j in picked:
        if j % 2 == 1 and j < 8:
            assert j - 1 in picked


def test_select_small_groups_take_every_candidate():
    q, k, _ = make_qkv(1, 2, 1, 64, 64, 8)
    got = msattn.ms_select(q, k, block_q=4, block_k=4, merge=2, topk=4)
    # group g (8 tokens) has 2g candidate regions: all taken while 2g <= 4
    assert got[0, 0, 0].tolist() == [-1] * 4
    assert got[0, 0, 1].tolist() == [0, 1, -1, -1]
    assert got[0, 0, 2].tolist() == [0, 1, 2, 3]


def test_select_never_chooses_an_empty_region():
    q, k, _ = make_qkv(1, 2, 1, 128, 128, 8)
    mask = torch.ones(1, 128, dtype=torch.bool)
    mask[0, 8:40] = False  # key regions 1..4 (block_k 8) fully padded
    got = msattn.ms_select(q, k, block_q=8, block_k=8, merge=2, topk=3, key_padding_mask=mask)
    assert not any(j in (1, 2, 3, 4) for j in got.flatten().tolist())


# ---------------------------------------------------------------------------------------------
# 3. sparse configurations equal the gather reference

SPARSE_CASES = [  # (B, Hq, Hkv, Nq, N, D, block_q, block_k, merge, topk, causal)
    (2, 4, 2, 200, 200, 16, 4, 4, 2, 3, True),
    (1, 2, 1, 97, 97, 59, 4, 8, 4, 2, True),
    (1, 4, 1, 57, 301, 8, 8, 4, 3, 5, True),   # chunked prefill
    (2, 2, 1, 1, 257, 16, 16, 16, 4, 4, True),  # decode
    (1, 3, 3, 130, 130, 12, 4, 8, 2, 4, False),
    (1, 2, 1, 40, 321, 8, 8, 8, 2, 6, False),
    (1, 2, 2, 300, 300, 64, 16, 16, 1, 3, True),  # merge 1, D 64
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_sparse_equals_gather_reference(case, pad, dtype):
    B, Hq, Hkv, Nq, N, D, bq, bk, merge, topk, causal = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, dtype)
    mask = make_mask(B, N, pad)
    kw = dict(block_q=bq, block_k=bk, merge=merge, causal=causal, key_padding_mask=mask)
    index = msattn.ms_select(q, k, topk=topk, **kw)
    out, lse = msattn.ms_attention(q, k, v, topk=topk, return_lse=True, **kw)
    ref, ref_lse = ms_attention_ref(q, k, v, index, **kw)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(out, ref) <= tol
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    assert (lse.double() - ref_lse)[finite].abs().max() <= tol * 10


@pytest.mark.parametrize("case", SPARSE_CASES[:3] + SPARSE_CASES[4:5], ids=lambda c: "-".join(map(str, c)))
def test_fast_kernels_on_every_isa(case, isa):
    B, Hq, Hkv, Nq, N, D, bq, bk, merge, topk, causal = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float32, requires_grad=True)
    mask = make_mask(B, N, "left")
    kw = dict(block_q=bq, block_k=bk, merge=merge, causal=causal, key_padding_mask=mask)
    index = msattn.ms_select(q, k, topk=topk, **kw)
    out = msattn.ms_attention(q, k, v, topk=topk, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = ms_attention_ref(q, k, v, index, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 4. gradients

GRAD_CASES = [  # (B, Hq, Hkv, Nq, N, D, block_q, block_k, merge, topk, causal, pad)
    (1, 2, 1, 23, 23, 5, 2, 2, 2, 2, True, None),       # sparse, GQA, partial regions
    (2, 2, 2, 19, 19, 4, 2, 4, 2, 1, True, "left"),      # padding
    (1, 2, 1, 7, 21, 3, 2, 2, 3, 2, True, "right"),      # Nq < N
    (1, 2, 1, 17, 17, 4, 2, 2, 2, 2, False, None),      # non-causal
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradcheck_float64(case):
    B, Hq, Hkv, Nq, N, D, bq, bk, merge, topk, causal, pad = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float64, requires_grad=True)
    mask = make_mask(B, N, pad)
    # fix the selection so finite differences do not cross a selection boundary
    index = msattn.ms_select(q, k, block_q=bq, block_k=bk, merge=merge, topk=topk, causal=causal,
                             key_padding_mask=mask)

    def f(q, k, v):
        out, lse = msattn.ms_attention(q, k, v, block_q=bq, block_k=bk, merge=merge, topk=topk, causal=causal,
                                       key_padding_mask=mask, index=index, return_lse=True)
        return out, lse.masked_fill(lse.isinf(), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("pad", [None, "right"])
def test_float32_gradients_equal_reference(case, pad):
    B, Hq, Hkv, Nq, N, D, bq, bk, merge, topk, causal = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float32, requires_grad=True)
    mask = make_mask(B, N, pad)
    kw = dict(block_q=bq, block_k=bk, merge=merge, causal=causal, key_padding_mask=mask)
    index = msattn.ms_select(q, k, topk=topk, **kw)
    out, lse = msattn.ms_attention(q, k, v, topk=topk, return_lse=True, **kw)
    ref, ref_lse = ms_attention_ref(q, k, v, index, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    finite = ref_lse.isfinite()
    loss = (out * dout).sum() + (lse * dlse).masked_fill(~finite, 0.0).sum()
    ref_loss = (ref * dout.double()).sum() + (ref_lse * dlse.double()).masked_fill(~finite, 0.0).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 2e-5


# ---------------------------------------------------------------------------------------------
# 6. 16-bit inputs: error at most twice SDPA's own in the same dtype

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_half_precision_error_within_twice_sdpa(dtype, causal):
    B, Hq, Hkv, N, D = 2, 4, 2, 257, 64
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, torch.float32)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    ref, _ = sdpa_ref(qh, kh, vh, causal=causal)  # the reference sees the same rounded inputs
    topk = math.ceil(N / 16)
    out = msattn.ms_attention(qh, kh, vh, block_q=16, block_k=16, merge=4, topk=topk, causal=causal)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        qh, kh.repeat_interleave(2, 1), vh.repeat_interleave(2, 1), is_causal=causal)
    assert out.dtype == dtype
    ours, theirs = (out.double() - ref).abs().max().item(), (sdpa.double() - ref).abs().max().item()
    assert ours <= 2 * theirs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_gradients(dtype):
    B, Hq, Hkv, N, D = 1, 4, 2, 200, 32
    q, k, v = (t.to(dtype).requires_grad_() for t in make_qkv(B, Hq, Hkv, N, N, D, torch.float32))
    kw = dict(block_q=4, block_k=8, merge=4, topk=3)
    index = msattn.ms_select(q, k, **kw)
    out = msattn.ms_attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _ = ms_attention_ref(q, k, v, index, block_q=4, block_k=8, merge=4)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    # 16-bit outputs: judged against the precision of the dtype itself
    eps = torch.finfo(dtype).eps
    assert rel_err(out, ref) <= 4 * eps
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and rel_err(g, r) <= 8 * eps


def _tables(n, d):
    angles = torch.arange(n, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(d // 2) / (d // 2))
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("method", ["ms", "ms_selected", "self_extend", "infini"])
def test_autocast_casts_q_k_v_like_sdpa(method):
    # a model under torch.autocast hands the attention mixed dtypes (bf16 projections, float32 q and k
    # after RoPE): every method computes in the autocast dtype, as SDPA does, gradients in the inputs' dtype
    B, Hq, Hkv, N, D = 1, 4, 2, 100, 32
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, torch.float32)
    v = v.bfloat16()
    kw = dict(block_q=4, block_k=8, merge=4, topk=3)
    call = {"ms": lambda q, k, v: msattn.ms_attention(q, k, v, **kw),
            "ms_selected": lambda q, k, v: msattn.ms_attention(q, k, v, rotary=_tables(256, D), **kw),
            "self_extend": lambda q, k, v: msattn.self_extend_attention(q, k, v, group_size=4, window=16,
                                                                        rotary=_tables(N, D)),
            "infini": lambda q, k, v: msattn.infini_attention(q, k, v, torch.zeros(Hq))[0]}[method]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(*leaves)
    ref = call(*(t.bfloat16() for t in (q, k, v)))
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.float32, torch.float32, torch.bfloat16]
    with pytest.raises(RuntimeError, match="dtype"):  # outside autocast mixed dtypes are still refused
        call(q, k, v)


# ---------------------------------------------------------------------------------------------
# padding, strides, determinism, rope

def test_padded_keys_never_change_the_result():
    B, Hq, Hkv, N, D = 2, 4, 2, 150, 16
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, torch.float32, requires_grad=True)
    mask = make_mask(B, N, "left")
    kw = dict(block_q=4, block_k=8, merge=2, topk=3, key_padding_mask=mask)
    out = msattn.ms_attention(q, k, v, **kw)
    dq, = torch.autograd.grad(out.sum(), q)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~mask[:, None, :].expand_as(k2[..., 0])] = 1e4
    v2[~mask[:, None, :].expand_as(v2[..., 0])] = -7.0
    out2 = msattn.ms_attention(q, k2, v2, **kw)
    dq2, = torch.autograd.grad(out2.sum(), q)
    assert torch.equal(out, out2) and torch.equal(dq, dq2)


def test_any_strides():
    B, Hq, Hkv, N, D = 2, 4, 2, 100, 24
    base = torch.randn(B, N, Hq + 2 * Hkv, D)  # a fused qkv projection, (B, N, H, D) layout
    q, k, v = (x.transpose(1, 2) for x in base.split([Hq, Hkv, Hkv], dim=2))
    assert not q.is_contiguous()
    kw = dict(block_q=4, block_k=4, merge=2, topk=3)
    out = msattn.ms_attention(q, k, v, **kw)
    contiguous = msattn.ms_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert torch.equal(out, contiguous)
    # a head dim that is not unit-stride
    wide = torch.randn(B, Hq, N, 2 * D)[..., ::2]
    out = msattn.ms_attention(wide, k, v, **kw)
    assert torch.equal(out, msattn.ms_attention(wide.contiguous(), k, v, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_deterministic_forward_and_backward(dtype):
    B, Hq, Hkv, N, D = 2, 8, 2, 700, 32
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype, requires_grad=True)
    kw = dict(block_q=8, block_k=8, merge=4, topk=6)
    runs = []
    for threads in (torch.get_num_threads(), 1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        out = msattn.ms_attention(q, k, v, **kw)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def rope_tables(length, rotary_dim, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rotary_dim", [16, 12])
def test_rope_on_selected_tokens_equals_reference(dtype, rotary_dim):
    B, Hq, Hkv, N, D = 1, 4, 2, 160, 16
    bq, bk, merge, topk = 4, 8, 2, 3
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype, requires_grad=True)
    rotary = rope_tables(topk * bk + merge * bq, rotary_dim)
    kw = dict(block_q=bq, block_k=bk, merge=merge)
    index = msattn.ms_select(q, k, topk=topk, **kw)
    out = msattn.ms_attention(q, k, v, topk=topk, rotary=rotary, **kw)
    ref, _ = ms_attention_ref(q, k, v, index, rotary=rotary, **kw)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(out, ref) <= tol
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout.double())):
        assert rel_err(g, r) <= 10 * tol


def test_rope_tables_too_short_is_an_error():
    q, k, v = make_qkv(1, 2, 1, 64, 64, 8)
    with pytest.raises(RuntimeError, match="rope tables must cover"):
        msattn.ms_attention(q, k, v, block_q=4, block_k=4, merge=2, topk=3, rotary=rope_tables(10, 8))


# ---------------------------------------------------------------------------------------------
# 6b. packed sequences (cu_seqlens): equal to separate calls, bit for bit

def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


PACKED_CASES = [  # (queries per sequence, keys per sequence): empty sequences, lengths off the blocks, decoding
    ([70, 0, 333, 129, 5], [70, 0, 333, 129, 5]),
    ([1, 1, 1, 1], [1, 97, 250, 33]),
    ([0, 40, 17], [64, 300, 17]),
]


@pytest.mark.parametrize("lengths", PACKED_CASES, ids=["prefill", "decode", "chunks"])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_packed_sequences_equal_separate_calls(lengths, rope, dtype):
    nq, nk = lengths
    Hq, Hkv, D = 4, 2, 24
    kw = dict(block_q=4, block_k=8, merge=4, topk=3, local=1)
    if rope:
        kw["rotary"] = rope_tables(3 * 8 + 16, D)
    qs = [torch.randn(1, Hq, n, D, dtype=dtype, requires_grad=True) for n in nq]
    ks = [torch.randn(1, Hkv, n, D, dtype=dtype, requires_grad=True) for n in nk]
    vs = [torch.randn(1, Hkv, n, D, dtype=dtype, requires_grad=True) for n in nk]
    q, k, v = (torch.cat([x.detach() for x in xs], 2).requires_grad_() for xs in (qs, ks, vs))
    cu_q, cu_k = _offsets(nq), _offsets(nk)
    out, lse = msattn.ms_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
    parts = [msattn.ms_attention(*x, return_lse=True, **kw) for x in zip(qs, ks, vs)]
    assert torch.equal(out, torch.cat([o for o, _ in parts], 2))
    assert torch.equal(lse, torch.cat([l for _, l in parts], 2))
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    for (o, _), d in zip(parts, dout.split(nq, dim=2)):
        (o * d).sum().backward()
    for packed, xs in ((q, qs), (k, ks), (v, vs)):
        assert torch.equal(packed.grad, torch.cat([x.grad for x in xs], 2))
    sel = {name: kw[name] for name in ("block_q", "block_k", "merge", "topk", "local")}
    index = msattn.ms_select(q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **sel)
    assert torch.equal(index, torch.cat([msattn.ms_select(a, b, **sel) for a, b in zip(qs, ks)], 2))


def test_packed_sequences_never_see_each_other():
    """Changing one sequence's keys changes no other sequence's output, while selection really is
    sparse (topk below the candidates) and the packed call differs from the unpacked one."""
    q, k, v = make_qkv(1, 2, 1, 300, 300, 16, torch.float32)
    cu = _offsets([120, 180])
    kw = dict(block_q=4, block_k=4, merge=2, topk=3, cu_seqlens_q=cu)
    out = msattn.ms_attention(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :120] = torch.randn_like(k2[:, :, :120])
    v2[:, :, :120] = torch.randn_like(v2[:, :, :120])
    out2 = msattn.ms_attention(q, k2, v2, **kw)
    assert torch.equal(out[:, :, 120:], out2[:, :, 120:])
    assert not torch.equal(out[:, :, :120], out2[:, :, :120])
    whole = msattn.ms_attention(q, k, v, block_q=4, block_k=4, merge=2, topk=3)
    assert torch.equal(out[:, :, :120], whole[:, :, :120]) and not torch.equal(out[:, :, 120:], whole[:, :, 120:])


def test_packed_sequences_with_a_padding_mask():
    q, k, v = make_qkv(1, 2, 1, 90, 90, 8, torch.float32)
    mask = torch.rand(1, 90) > 0.3
    kw = dict(block_q=4, block_k=4, merge=2, topk=3)
    out = msattn.ms_attention(q, k, v, key_padding_mask=mask, cu_seqlens_q=_offsets([50, 40]), **kw)
    first = msattn.ms_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], key_padding_mask=mask[:, :50], **kw)
    second = msattn.ms_attention(q[:, :, 50:], k[:, :, 50:], v[:, :, 50:], key_padding_mask=mask[:, 50:], **kw)
    assert torch.equal(out, torch.cat([first, second], 2))


def _packed(q, k, v, cu_q, cu_k=None, **kw):
    return msattn.ms_attention(q[:1], k[:1], v[:1], block_q=4, block_k=4, merge=2, topk=3, cu_seqlens_q=cu_q,
                               cu_seqlens_k=cu_k, **kw)


BAD_PACKED = [
    ("cu_seqlens_q must be int32 of shape", lambda q, k, v: _packed(q, k, v, _offsets([20, 20]).long())),
    ("cu_seqlens_q must be int32 of shape", lambda q, k, v: _packed(q, k, v, torch.zeros(1, dtype=torch.int32))),
    ("cu_seqlens_q must start at 0", lambda q, k, v: _packed(q, k, v, torch.tensor([1, 40], dtype=torch.int32))),
    ("cu_seqlens_q must be non-decreasing", lambda q, k, v: _packed(q, k, v, torch.tensor([0, 30, 20, 40],
                                                                                         dtype=torch.int32))),
    ("cu_seqlens_q must end at q's token axis's length 40", lambda q, k, v: _packed(q, k, v, _offsets([20, 10]))),
    ("cu_seqlens_k must end at k's token axis's length 40", lambda q, k, v: _packed(q, k, v, _offsets([20, 20]),
                                                                                    _offsets([20, 30]))),
    ("as many sequences", lambda q, k, v: _packed(q, k, v, _offsets([20, 20]), _offsets([40]))),
    ("sequence 1 has 30 queries but 20 keys", lambda q, k, v: _packed(q, k, v, _offsets([10, 30]),
                                                                        _offsets([20, 20]))),
    ("batch of one", lambda q, k, v: msattn.ms_attention(q, k, v, cu_seqlens_q=_offsets([20, 20]))),
    ("key_sums cannot serve packed sequences", lambda q, k, v: msattn.ms_select(
        q[:1], k[:1], block_q=4, block_k=4, merge=2, topk=3, cu_seqlens_q=_offsets([20, 20]),
        key_sums=torch.zeros(1, 2, 10, 8), key_counts=torch.zeros(1, 2, 10, dtype=torch.int32))),
    ("a packed index must hold the 6 groups", lambda q, k, v: _packed(
        q, k, v, _offsets([20, 20]), index=torch.full((1, 2, 5, 3), -1, dtype=torch.int32))),
]


def test_keys_offsets_alone_are_refused():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 8, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_k needs cu_seqlens_q"):
        msattn.ms_attention(q, k, v, cu_seqlens_k=_offsets([20, 20]))


# ---------------------------------------------------------------------------------------------
# 7. bad input: the message names the argument and what was expected

BAD = [
    ("q must be 4-D", lambda q, k, v: msattn.ms_attention(q[0], k, v)),
    ("multiple of k heads", lambda q, k, v: msattn.ms_attention(q[:, :3], k, v)),
    ("v must have k's shape", lambda q, k, v: msattn.ms_attention(q, k, v[:, :, :5])),
    ("k must have q's head dim", lambda q, k, v: msattn.ms_attention(q, k[..., :4], v[..., :4])),
    ("k must have q's dtype", lambda q, k, v: msattn.ms_attention(q, k.double(), v)),
    ("v must have q's dtype", lambda q, k, v: msattn.ms_attention(q, k, v.double())),
    ("q may not be longer than k", lambda q, k, v: msattn.ms_attention(q, k[:, :, :10], v[:, :, :10])),
    ("block_q must be >= 1", lambda q, k, v: msattn.ms_attention(q, k, v, block_q=0)),
    ("block_k must be >= 1", lambda q, k, v: msattn.ms_attention(q, k, v, block_k=-2)),
    ("merge must be >= 1", lambda q, k, v: msattn.ms_attention(q, k, v, merge=0)),
    ("topk must be >= 1", lambda q, k, v: msattn.ms_attention(q, k, v, topk=0)),
    ("multiple of block_k", lambda q, k, v: msattn.ms_attention(q, k, v, block_q=3, block_k=8, merge=1)),
    ("key_padding_mask must be bool", lambda q, k, v: msattn.ms_attention(
        q, k, v, key_padding_mask=torch.ones(2, 40))),
    ("key_padding_mask must have shape", lambda q, k, v: msattn.ms_attention(
        q, k, v, key_padding_mask=torch.ones(2, 39, dtype=torch.bool))),
    ("must be float32, float64, bfloat16 or float16", lambda q, k, v: msattn.ms_attention(
        q.int(), k.int(), v.int())),
    ("head dim must be in", lambda q, k, v: msattn.ms_attention(
        torch.randn(2, 4, 40, 300), torch.randn(2, 2, 40, 300), torch.randn(2, 2, 40, 300))),
    ("k must have q's batch size", lambda q, k, v: msattn.ms_attention(q[:1], k, v)),
    ("index must have shape", lambda q, k, v: msattn.ms_attention(
        q, k, v, index=torch.zeros(2, 2, 3, 4, dtype=torch.int32))),
    ("index must be int32", lambda q, k, v: msattn.ms_attention(
        q, k, v, block_q=4, block_k=4, merge=2, index=torch.zeros(2, 2, 5, 4, dtype=torch.int64))),
    ("strictly ascending", lambda q, k, v: msattn.ms_attention(
        q, k, v, block_q=4, block_k=4, merge=2,
        index=torch.tensor([[-1] * 4] * 4 + [[3, 1, -1, -1]], dtype=torch.int32).expand(2, 2, 5, 4).contiguous())),
    ("may not attend", lambda q, k, v: msattn.ms_attention(
        q, k, v, block_q=4, block_k=4, merge=2,
        index=torch.tensor([5, -1, -1, -1], dtype=torch.int32).expand(2, 2, 5, 4).contiguous())),
    *BAD_PACKED,
]


@pytest.mark.parametrize("message,call", BAD, ids=[m for m, _ in BAD])
def test_bad_input_is_a_clear_error(message, call):
    q, k, v = make_qkv(2, 4, 2, 40, 40, 8, torch.float32)
    with pytest.raises(RuntimeError, match=message):
        call(q, k, v)


def test_empty_inputs():
    q, k, v = make_qkv(2, 4, 2, 0, 0, 8, torch.float32, requires_grad=True)
    out = msattn.ms_attention(q, k, v)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_nan_in_nan_out():
    q, k, v = make_qkv(1, 2, 1, 64, 64, 8, torch.float32)
    q[0, 0, 10, 3] = math.nan
    out = msattn.ms_attention(q, k, v, block_q=4, block_k=4, merge=2, topk=2)
    assert out[0, 0, 10].isnan().all()
    assert out[0, 1].isfinite().all()


def test_bad_head_dim_and_non_integer_parameters_are_refused_by_name():
    q0, k0 = torch.randn(1, 2, 8, 0), torch.randn(1, 1, 8, 0)
    cos = sin = torch.ones(8, 2)
    for call in (lambda: msattn.ms_attention(q0, k0, k0), lambda: msattn.infini_attention(q0, k0, k0, torch.zeros(2)),
                 lambda: msattn.self_extend_attention(q0, k0, k0, group_size=2, window=4, rotary=(cos, sin))):
        with pytest.raises(RuntimeError, match=r"head dim must be in \[1, 256\]"):  # not a ZeroDivisionError
            call()
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4)
    for name, value in (("group_size", 2.7), ("group_size", True), ("window", 3.0), ("sliding_window", 8.0)):
        kw = dict(group_size=2, window=4, rotary=(cos, sin))
        kw[name] = value
        with pytest.raises(ValueError, match=f"self_extend_attention: {name} must be an int, got {value!r}"):
            msattn.self_extend_attention(q, k, k, **kw)


def test_double_backward_is_an_error_not_a_silent_zero():
    q = torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 40, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 40, 8, dtype=torch.float64, requires_grad=True)
    ang = torch.arange(40, dtype=torch.float32)[:, None] / 100 ** (torch.arange(4) / 4)
    calls = {
        "ms_bwd": lambda: msattn.ms_attention(q, k, v, block_q=4, block_k=4, merge=2, topk=3),
        "self_extend_bwd": lambda: msattn.self_extend_attention(q, k, v, group_size=2, window=8,
                                                                rotary=(ang.cos(), ang.sin())),
        "infini_bwd": lambda: msattn.infini_attention(q, k, v, torch.zeros(2, dtype=torch.float64))[0],
    }
    for name, call in calls.items():
        (gq,) = torch.autograd.grad(call().pow(2).sum(), q, create_graph=True)  # the first derivative works
        with pytest.raises(RuntimeError, match=f"msattn: {name} has no derivative"):
            torch.autograd.grad(gq.pow(2).sum(), (q, k, v))
