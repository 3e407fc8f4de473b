"""Property tests: hypothesis draws shapes, memory layouts (contiguous, transposed, expanded and strided
views), parameters and padding masks, and each op must equal its reference from tests/reference.py,
tests/test_self_extend.py and tests/test_infini.py. Small sizes and a bounded number of examples;
``derandomize=True`` makes every run (CI's included) draw the same examples."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import msattn  # noqa: E402
from reference import ms_attention_ref, rel_err, select_ref  # noqa: E402
from test_infini import infini_ref  # noqa: E402
from test_self_extend import rope_tables, self_extend_ref  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None)
LAYOUTS = ("contiguous", "transposed", "expanded", "strided")


def laid_out(shape, dtype, layout, seed):
    """A (B, H, N, D) tensor of random values in the given memory layout (values independent of it)."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = shape
    if layout == "expanded":  # one batch row shared by all: stride 0 along B
        return torch.randn((1, H, N, D), generator=g, dtype=torch.float64).to(dtype).expand(B, H, N, D)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "transposed":  # (B, N, H, D) in memory, as a model's projections give it
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # every other element of a wider last dim
        wide = torch.zeros((B, H, N, 2 * D), dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@st.composite
def attention_case(draw, same_length=False):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 2))
    N = draw(st.integers(1, 70))
    Nq = N if same_length else draw(st.integers(1, N))
    D = draw(st.integers(2, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    pad = draw(st.sampled_from([None, "left", "right"]))
    pads = [draw(st.integers(0, N - 1)) for _ in range(B)] if pad else None
    seed = draw(st.integers(0, 2 ** 31 - 1))
    q = laid_out((B, Hq, Nq, D), dtype, layouts[0], seed)
    k = laid_out((B, Hkv, N, D), dtype, layouts[1], seed + 1)
    v = laid_out((B, Hkv, N, D), dtype, layouts[2], seed + 2)
    mask = None
    if pad:
        mask = torch.ones(B, N, dtype=torch.bool)
        for b, p in enumerate(pads):
            if pad == "left":
                mask[b, :p] = False
            else:
                mask[b, N - p:] = False
    return q, k, v, mask


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


@FUZZ
@given(case=attention_case(), data=st.data())
def test_ms_attention_equals_the_reference(case, data):
    q, k, v, mask = case
    block_q = data.draw(st.integers(1, 8), "block_q")
    merge = data.draw(st.integers(1, 4), "merge")
    span = block_q * merge
    block_k = data.draw(st.sampled_from([d for d in range(1, span + 1) if span % d == 0]), "block_k")
    topk = data.draw(st.integers(1, 8), "topk")
    local = data.draw(st.integers(0, topk), "local")
    causal = data.draw(st.booleans(), "causal")
    kw = dict(block_q=block_q, block_k=block_k, merge=merge, topk=topk, causal=causal, key_padding_mask=mask)
    index = msattn.ms_select(q, k, local=local, **kw)
    assert torch.equal(index, select_ref(q, k, local=local, **kw))
    out, lse = msattn.ms_attention(q, k, v, local=local, return_lse=True, **kw)
    ref, ref_lse = ms_attention_ref(q, k, v, index, **{n: kw[n] for n in ("block_q", "block_k", "merge", "causal",
                                                                         "key_padding_mask")})
    assert rel_err(out, ref) <= tolerance(q.dtype)
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)


@FUZZ
@given(case=attention_case(), data=st.data())
def test_self_extend_attention_equals_the_reference(case, data):
    q, k, v, mask = case
    N, D = k.shape[2], q.shape[3]
    kw = dict(group_size=data.draw(st.integers(1, 4), "group_size"), window=data.draw(st.integers(0, 20), "window"),
              rotary=rope_tables(N + 3, 2 * data.draw(st.integers(1, D // 2), "rotary pairs")),
              causal=data.draw(st.booleans(), "causal"), key_padding_mask=mask,
              sliding_window=data.draw(st.sampled_from([None, 1, 7, 30]), "sliding_window"))
    out = msattn.self_extend_attention(q, k, v, **kw)
    ref, _ = self_extend_ref(q, k, v, **kw)
    assert rel_err(out, ref) <= tolerance(q.dtype)


@FUZZ
@given(case=attention_case(same_length=True), data=st.data())
def test_infini_attention_equals_the_reference(case, data):
    q, k, v, mask = case
    beta = torch.linspace(-2.0, 2.0, q.shape[1], dtype=q.dtype)
    kw = dict(delta_rule=data.draw(st.booleans(), "delta_rule"), causal=data.draw(st.booleans(), "causal"),
              key_padding_mask=mask)
    out, (memory, norm) = msattn.infini_attention(q, k, v, beta, **kw)
    ref, (ref_memory, ref_norm) = infini_ref(q, k, v, beta, **kw)
    tol = tolerance(q.dtype)
    assert rel_err(out, ref) <= tol
    assert rel_err(memory, ref_memory) <= tol and rel_err(norm, ref_norm) <= tol
    assert not math.isnan(out.double().sum().item())
