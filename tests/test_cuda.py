"""The CUDA kernels: they compile cleanly everywhere nvcc is (sm_80 and sm_90, no warnings, no register
spills, no local memory), and where a GPU and a CUDA build of msattn are present they agree with the CPU op: the
selection bit for bit (against the CPU's scalar instruction set, whose summation order the GPU
reproduces), attention and its gradients up to fp32 rounding, dense cases equal to SDPA, and the same
call twice gives bit-identical results."""

from __future__ import annotations

import glob
import math
import os
import shutil
import subprocess

import pytest
import torch

import msattn
from msattn.ops import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc")

# ----------------------------------------------------------------------------------------------
# (a) compilation: needs nvcc only


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not CU_SOURCES, reason="no csrc/cuda/*.cu sources")
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_cleanly(source, tmp_path):
    # the flags of the extension build (setup.py, plus torch's half/bfloat16 defines), every
    # warning an error, and register spills and local memory (a per-thread array indexed at run time)
    # reported by ptxas as warnings
    cmd = [NVCC, "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++17", "-O3", "--use_fast_math",
           "-I", os.path.join(ROOT, "csrc"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra", "-Xptxas", "-warn-spills,-warn-lmem-usage",
           "--threads", "0"]  # the two architectures in parallel
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed:\n{res.stderr}"
    assert "warning" not in (res.stdout + res.stderr).lower(), f"nvcc warned:\n{res.stdout}{res.stderr}"


def _cuda_include():
    """The CUDA toolkit's include directory (cuda_runtime.h): $CUDA_HOME's, else /usr/local/cuda's, or None."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers beside nvcc")
def test_cuda_glue_compiles_cleanly(tmp_path):
    """csrc/torch/ms_attention_cuda.cpp against this torch's headers and the toolkit's, syntax and types
    only, every warning of -Wall -Wextra an error (torch's headers are system headers). A CPU build of
    torch lacks c10/cuda's generated config header: an empty one stands in for it."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    import sysconfig

    system = [str(tmp_path), *include_paths(), _cuda_include(), sysconfig.get_paths()["include"]]
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           *[a for d in system for a in ("-isystem", d)], os.path.join(ROOT, "csrc", "torch", "ms_attention_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"the CUDA glue does not compile:\n{res.stderr[-4000:]}"


# ----------------------------------------------------------------------------------------------
# (b) behaviour: needs a GPU and an extension built with the CUDA kernels


def _has_cuda_kernels() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("msattn::ms_fwd", "CUDA")
    except Exception:  # noqa: BLE001
        return False


needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _has_cuda_kernels()),
                               reason="needs a CUDA GPU and msattn built with its CUDA kernels")
DEV = "cuda"


def _tensors(B, Hq, Hkv, N, Nq, D, dtype=torch.float32, pad=0):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, dtype=dtype)
    mask = None
    if pad:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[-1, :pad] = False  # left padding of the last sequence, as HF batches it
        mask[0, N // 2] = False  # and one hole
    return q, k, v, mask


def _cuda(*xs):
    return [x.to(DEV) if isinstance(x, torch.Tensor) else x for x in xs]


def _select_cpu_scalar(q, k, mask, *params, sums=None, counts=None):
    """The CPU selection on the scalar instruction set: the summation order the GPU reproduces."""
    msattn.set_isa("scalar")
    try:
        return ops.ms_select(q, k, mask, sums, counts, *params)
    finally:
        msattn.set_isa("auto")


# the shapes: GQA, a head dim that is not a multiple of 4 or 32, partial last regions, queries
# that are a suffix of the keys, a partial first group, topk large (dense) and small (ranking)
SELECT_CASES = [
    # B, Hq, Hkv, N, Nq, D, block_q, block_k, merge, topk, causal, pad
    (2, 4, 2, 70, 70, 16, 4, 4, 2, 3, True, 0),
    (2, 4, 2, 70, 13, 13, 4, 4, 2, 3, True, 9),
    (1, 2, 1, 97, 97, 59, 3, 3, 4, 2, False, 0),
    (2, 6, 3, 130, 51, 32, 4, 8, 4, 5, True, 5),
    (1, 1, 1, 200, 200, 64, 16, 16, 2, 64, True, 0),  # dense: every group takes all its candidates
    (1, 8, 2, 1025, 1025, 64, 16, 16, 4, 7, True, 0),
]


@needs_gpu
@pytest.mark.parametrize("case", SELECT_CASES)
@pytest.mark.parametrize("local", [0, 1, 2])
def test_select_matches_cpu_bit_for_bit(case, local):
    B, Hq, Hkv, N, Nq, D, bq, bk, merge, topk, causal, pad = case
    q, k, _, mask = _tensors(B, Hq, Hkv, N, Nq, D, pad=pad)
    params = (bq, bk, merge, topk, causal, min(local, topk))
    want = _select_cpu_scalar(q, k, mask, *params)
    got = ops.ms_select(*_cuda(q, k, mask), None, None, *params)
    assert got.dtype == torch.int32 and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@needs_gpu
def test_select_ties_go_to_the_lower_region():
    # identical key regions score identically: the lower region must win every tie, as on the CPU
    B, Hq, Hkv, N, D = 1, 2, 1, 256, 8
    q = torch.randn(B, Hq, N, D)
    k = torch.randn(B, Hkv, 4, D).repeat_interleave(4, 2).repeat(1, 1, N // 16, 1)  # regions repeat
    params = (4, 4, 4, 3, True)
    want = _select_cpu_scalar(q, k, None, *params)
    got = ops.ms_select(*_cuda(q, k), None, None, None, *params)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


# the screened selection (at least four ranking query regions, tensor-core bounds, exact scores for the
# survivors): the bounds decide only who is scored exactly, so the index must still be the CPU's bit for bit
SCREEN_CASES = {
    # name: (B, Hq, Hkv, N, Nq, D, block_q, block_k, merge, topk, pad, keys)
    "the benchmark's": (1, 8, 2, 8192, 8192, 64, 16, 16, 16, 64, 0, "random"),
    "odd dims, two batches of regions": (1, 6, 2, 4096, 4096, 59, 8, 8, 20, 9, 0, "random"),
    "queries a suffix, padding": (2, 8, 2, 6000, 1500, 64, 16, 16, 16, 32, 37, "random"),
    "near-ties below bf16": (1, 4, 1, 4096, 4096, 64, 8, 8, 8, 16, 0, "near-ties"),
    "all tied: more survivors than a warp ranks": (1, 2, 1, 12288, 12288, 16, 4, 4, 4, 3, 0, "tied"),
}


@needs_gpu
@pytest.mark.parametrize("case", SCREEN_CASES.values(), ids=SCREEN_CASES.keys())
@pytest.mark.parametrize("local", [0, 2])
def test_screened_select_matches_cpu_bit_for_bit(case, local):
    B, Hq, Hkv, N, Nq, D, bq, bk, merge, topk, pad, keys = case
    q, k, _, mask = _tensors(B, Hq, Hkv, N, Nq, D, pad=pad)
    if keys == "near-ties":  # every key region the same up to a relative 1e-6: bounds overlap, scores decide
        k = k[:, :, :bk].repeat(1, 1, N // bk, 1) * (1 + 1e-6 * torch.randn(B, Hkv, N, D))
    elif keys == "tied":
        k = k[:, :, :bk].repeat(1, 1, N // bk, 1)
    params = (bq, bk, merge, topk, True, local)
    want = _select_cpu_scalar(q, k, mask, *params)
    got = ops.ms_select(*_cuda(q, k, mask), None, None, *params)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


# multi-scale selection (coarse_regions, coarse_topk): the coarse ranking by the group's mean query, the
# fine ranking inside the kept coarse regions, lists shorter than topk, local regions outside them
MULTISCALE_CASES = {
    # name: (B, Hq, Hkv, N, Nq, D, block_q, block_k, merge, topk, causal, pad, coarse_regions, coarse_topk)
    "the benchmark's shape": (1, 8, 2, 8192, 8192, 64, 16, 16, 16, 64, True, 0, 8, 16),
    "lists shorter than topk": (1, 4, 2, 2048, 2048, 32, 8, 8, 8, 24, True, 0, 4, 3),
    "partial coarse regions, padding, a suffix": (2, 6, 3, 1500, 700, 24, 4, 8, 4, 10, True, 29, 5, 4),
    "non-causal": (1, 4, 2, 1024, 1024, 16, 8, 8, 4, 12, False, 0, 4, 5),
}


@needs_gpu
@pytest.mark.parametrize("case", MULTISCALE_CASES.values(), ids=MULTISCALE_CASES.keys())
@pytest.mark.parametrize("local", [0, 2])
def test_multiscale_select_matches_cpu_bit_for_bit(case, local):
    B, Hq, Hkv, N, Nq, D, bq, bk, merge, topk, causal, pad, cr, ct = case
    q, k, _, mask = _tensors(B, Hq, Hkv, N, Nq, D, pad=pad)
    params = (bq, bk, merge, topk, causal, local, cr, ct)
    want = _select_cpu_scalar(q, k, mask, *params)
    got = ops.ms_select(*_cuda(q, k, mask), None, None, *params)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["f16", "bf16", "f64"])
def test_select_dtypes_match_cpu(dtype):
    q, k, _, mask = _tensors(2, 4, 2, 150, 150, 24, dtype=dtype, pad=7)
    params = (4, 4, 4, 4, True)
    want = _select_cpu_scalar(q, k, mask, *params)
    got = ops.ms_select(*_cuda(q, k, mask), None, None, *params)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("coarse", [(0, 0), (2, 1)], ids=["exact", "multi-scale"])
def test_select_with_region_sums_given(coarse):
    # a cache's sums (float64 (B, Hkv, NKcap, D), int32 counts), here computed on the CPU; multi-scale
    # takes its coarse sums from them (a decode step's path)
    q, k, _, _ = _tensors(1, 4, 2, 96, 20, 16)
    NK = 96 // 8
    sums = k.view(1, 2, NK, 8, 16).sum(3)  # float32, like a cache's; both devices get the same sums
    counts = torch.full((1, 2, NK), 8, dtype=torch.int32)
    params = (4, 8, 4, 3, True, 0, *coarse)
    want = _select_cpu_scalar(q, k, None, *params, sums=sums, counts=counts)
    got = ops.ms_select(*_cuda(q, k), None, *_cuda(sums, counts), *params)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_region_sums_appended_on_the_gpu_equal_the_cpu_bit_for_bit(dtype):
    # a cache's sums grown by a prompt, then pieces that start and end inside regions, with padding
    B, Hkv, N, D, bk = 2, 2, 75, 24, 8
    k = torch.randn(B, Hkv, N, D, dtype=dtype)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :11] = False
    mask[0, 40] = False
    cuts = [0, 21, 22, 30, 47, 48, N]
    nk = -(-N // bk)
    got = [torch.zeros(B, Hkv, nk, D, device=DEV), torch.zeros(B, Hkv, nk, dtype=torch.int32, device=DEV)]
    want = [torch.zeros(B, Hkv, nk, D), torch.zeros(B, Hkv, nk, dtype=torch.int32)]
    for t0, t1 in zip(cuts, cuts[1:]):
        piece, m = k[:, :, t0:t1].contiguous(), mask[:, t0:t1].contiguous()
        ops.ms_region_sums_append_(*got, *_cuda(piece, m), t0, bk)
        ops.ms_region_sums_append_(*want, piece, m, t0, bk)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=0, atol=0)


@needs_gpu
def test_ms_cache_decodes_on_the_gpu_like_on_the_cpu():
    # generate() of a patched model on the GPU uses MSCache (region sums appended by the GPU kernel);
    # greedy tokens agree unless two logits of the random model tie within fp32 rounding
    from transformers import LlamaConfig, LlamaForCausalLM

    import msattn.hf

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    msattn.hf.patch(model, msattn.MSConfig(block_q=4, block_k=4, merge=2, topk=3))
    ids = torch.randint(3, 97, (2, 90))
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    got = model.to(DEV).generate(ids.to(DEV), max_new_tokens=12, do_sample=False)
    assert torch.equal(got.cpu(), want)


def _sdpa_bottom_right(q, k, v, mask=None, causal=True):
    """fp64 SDPA with the causal mask aligned bottom-right (queries = the last Nq positions)."""
    Nq, N = q.shape[2], k.shape[2]
    hg = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(hg, 1), v.repeat_interleave(hg, 1)
    allowed = torch.ones(Nq, N, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.arange(N, device=q.device)[None, :] <= torch.arange(N - Nq, N, device=q.device)[:, None]
    allowed = allowed[None, None].expand(q.shape[0], 1, Nq, N)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)


@needs_gpu
@pytest.mark.parametrize("D", [16, 59, 128, 256])
@pytest.mark.parametrize("nq", [97, 30])
def test_dense_equals_sdpa(D, nq):
    # topk >= number of regions: every group takes every candidate, so MS attention is dense
    B, Hq, Hkv, N = 2, 4, 2, 97
    q, k, v, _ = _tensors(B, Hq, Hkv, N, nq, D)
    qc, kc, vc = [x.to(DEV).requires_grad_() for x in (q, k, v)]
    out = msattn.ms_attention(qc, kc, vc, block_q=4, block_k=4, merge=4, topk=64)
    ref = _sdpa_bottom_right(*[x.double().to(DEV) for x in (q, k, v)])
    sdpa32 = _sdpa_bottom_right(*[x.to(DEV) for x in (q, k, v)])
    # flash-attention's rule: our error against fp64 at most twice PyTorch's own fp32 error (+ slack)
    err, base = (out.double() - ref).abs().max().item(), (sdpa32.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-5, (err, base)
    dout = torch.randn_like(out)
    out.backward(dout)
    qd, kd, vd = [x.double().to(DEV).requires_grad_() for x in (q, k, v)]
    _sdpa_bottom_right(qd, kd, vd).backward(dout.double())
    for got, want in ((qc.grad, qd.grad), (kc.grad, kd.grad), (vc.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


ATTN_CASES = [
    # B, Hq, Hkv, N, Nq, D, block_q, block_k, merge, topk, causal, pad, rotary
    (2, 4, 2, 70, 70, 16, 4, 4, 2, 3, True, 0, False),
    (2, 4, 2, 70, 13, 40, 4, 4, 2, 3, True, 9, False),
    (1, 2, 1, 97, 97, 59, 3, 3, 4, 2, False, 0, False),
    (2, 6, 3, 130, 51, 64, 4, 8, 4, 5, True, 5, True),
    (1, 4, 4, 300, 300, 128, 8, 16, 4, 3, True, 0, True),
    (1, 2, 1, 200, 1, 96, 4, 4, 8, 6, True, 3, False),  # decoding: one query
    (1, 2, 2, 160, 160, 256, 16, 48, 6, 2, False, 0, True),  # regions larger than a key tile
    # 16-bit inputs with D in {16, 32, 64, 128} take the tensor-core kernels (cases 0, 3, 4 too): four
    # query heads per KV head share a block's rows, groups span several row tiles
    (2, 8, 2, 300, 300, 32, 16, 16, 4, 3, True, 7, True),
    (1, 4, 1, 150, 150, 128, 8, 8, 4, 4, False, 0, False),
]


def _rotary(topk, block_k, span, dim, device="cpu"):
    length = topk * block_k + span
    ang = torch.arange(length, dtype=torch.float64)[:, None] * (10000.0 ** (-torch.arange(dim // 2) / (dim // 2)))
    return ang.cos().float().to(device), ang.sin().float().to(device)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_and_gradients_match_cpu(case, dtype):
    B, Hq, Hkv, N, Nq, D, bq, bk, merge, topk, causal, pad, rotary = case
    q, k, v, mask = _tensors(B, Hq, Hkv, N, Nq, D, dtype=dtype, pad=pad)
    rot = _rotary(topk, bk, bq * merge, D if D % 2 == 0 else D - 1) if rotary else None
    index = ops.ms_select(q, k, mask, None, None, bq, bk, merge, topk, causal)
    kw = dict(block_q=bq, block_k=bk, merge=merge, topk=topk, causal=causal, return_lse=True)

    # the reference: the CPU op in fp32 on the same (rounded) inputs and the same index
    q32, k32, v32 = [x.float().requires_grad_() for x in (q, k, v)]
    out_c, lse_c = msattn.ms_attention(q32, k32, v32, key_padding_mask=mask, rotary=rot, index=index, **kw)
    dout = torch.randn_like(out_c)
    (out_c * dout).sum().backward()

    qg, kg, vg = [x.detach().to(DEV).requires_grad_() for x in (q, k, v)]
    rot_g = tuple(x.to(DEV) for x in rot) if rot else None
    mask_g = mask.to(DEV) if mask is not None else None
    out_g, lse_g = msattn.ms_attention(qg, kg, vg, key_padding_mask=mask_g, rotary=rot_g, index=index.to(DEV), **kw)
    (out_g.float() * dout.to(DEV)).sum().backward()

    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_g.float().cpu(), out_c, **tol)
    # 16-bit: the tensor-core kernels round rotated q and k to the input dtype before their product
    ltol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse_g.cpu(), lse_c, **ltol)
    gtol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for got, want in ((qg.grad, q32.grad), (kg.grad, k32.grad), (vg.grad, v32.grad)):
        torch.testing.assert_close(got.float().cpu(), want, **gtol)


@needs_gpu
def test_padded_queries_and_keys():
    # a fully padded sequence: outputs 0, lse -inf, gradients 0; padded keys get no gradient
    q, k, v, _ = _tensors(2, 2, 1, 64, 64, 32)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1] = False
    mask[0, 5:9] = False
    qg, kg, vg = [x.to(DEV).requires_grad_() for x in (q, k, v)]
    out, lse = msattn.ms_attention(qg, kg, vg, block_q=4, block_k=4, merge=2, topk=2, key_padding_mask=mask.to(DEV),
                                   return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()
    out.sum().backward()
    assert (kg.grad[1] == 0).all() and (vg.grad[1] == 0).all() and (qg.grad[1] == 0).all()
    assert (kg.grad[0, :, 5:9] == 0).all() and (vg.grad[0, :, 5:9] == 0).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_packed_sequences_equal_separate_calls(dtype):
    """cu_seqlens on the GPU: prefill sequences and decoding (one query against longer keys), bit for bit
    the separate calls, and the selection the CPU's."""
    nq, nk = [70, 0, 333, 1, 129], [70, 0, 333, 97, 200]
    qs = [torch.randn(1, 4, n, 32, dtype=dtype, device=DEV, requires_grad=True) for n in nq]
    ks = [torch.randn(1, 2, n, 32, dtype=dtype, device=DEV, requires_grad=True) for n in nk]
    vs = [torch.randn(1, 2, n, 32, dtype=dtype, device=DEV, requires_grad=True) for n in nk]
    q, k, v = (torch.cat([x.detach() for x in xs], 2).requires_grad_() for xs in (qs, ks, vs))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
                  for n in (nq, nk))
    kw = dict(block_q=4, block_k=8, merge=4, topk=3)
    out = msattn.ms_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    parts = [msattn.ms_attention(*x, **kw) for x in zip(qs, ks, vs)]
    assert torch.equal(out, torch.cat(parts, 2))
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    for o, d in zip(parts, dout.split(nq, dim=2)):
        (o * d).sum().backward()
    for packed, xs in ((q, qs), (k, ks), (v, vs)):
        assert torch.equal(packed.grad, torch.cat([x.grad for x in xs], 2))
    index = msattn.ms_select(q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    msattn.set_isa("scalar")
    try:
        want = msattn.ms_select(q.cpu(), k.cpu(), cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu(), **kw)
    finally:
        msattn.set_isa("auto")
    assert torch.equal(index.cpu(), want)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_deterministic(dtype):
    q, k, v, mask = _tensors(2, 8, 2, 700, 700, 64, dtype=dtype, pad=11)
    kw = dict(block_q=8, block_k=8, merge=4, topk=6, key_padding_mask=mask.to(DEV))

    def run():
        qg, kg, vg = [x.to(DEV).requires_grad_() for x in (q, k, v)]
        out = msattn.ms_attention(qg, kg, vg, **kw)
        out.backward(torch.ones_like(out))
        return out, qg.grad, kg.grad, vg.grad, msattn.ms_select(qg, kg, block_q=8, block_k=8, merge=4, topk=6,
                                                               key_padding_mask=kw["key_padding_mask"])

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
def test_float64_is_refused_with_a_clear_error():
    q, k, v, _ = _tensors(1, 2, 1, 32, 32, 16, dtype=torch.float64)
    index = ops.ms_select(*_cuda(q, k), None, None, None, 4, 4, 2, 2, True)
    with pytest.raises(RuntimeError, match="float64 is not supported on CUDA"):
        ops.ms_fwd(*_cuda(q, k, v), index, None, None, None, 4, 4, 2, True, 0.25)


@needs_gpu
def test_opcheck_cuda():
    q, k, v, mask = _cuda(*_tensors(2, 4, 2, 70, 70, 16, pad=9))
    params = (4, 4, 2)
    torch.library.opcheck(ops.ms_select, (q, k, mask, None, None, *params, 3, True))
    index = ops.ms_select(q, k, mask, None, None, *params, 3, True)
    fwd_args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), index, mask, None, None, *params, True,
                0.25)
    torch.library.opcheck(ops.ms_fwd, fwd_args)
