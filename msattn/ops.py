"""Thin wrappers over ``torch.ops.msattn``: fake kernels for tracing and the autograd formula.

The schemas and the device kernels live in C++ (``csrc/torch``); this module registers what
``torch.compile`` and autograd need: a fake (meta) implementation of every op, and the backward of
``ms_fwd``, which is itself the custom op ``ms_bwd``. The selection is piecewise constant and passes
no gradient.
"""

from __future__ import annotations

import os

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.msattn.*)

ops = torch.ops.msattn
ISAS = ("auto", "amx", "avx512", "avx2", "scalar")


def _isa_from_environment() -> None:
    name = os.environ.get("MSATTN_ISA", "")
    if not name:
        return
    if name not in ISAS:
        raise ValueError(f"MSATTN_ISA must be one of {', '.join(ISAS)}, got {name!r}")
    try:
        ops.set_isa(name)
    except RuntimeError:
        raise ValueError(f"MSATTN_ISA={name}: this CPU cannot run the {name} kernels; use one of "
                         f"{', '.join(ISAS)} that it can") from None


_isa_from_environment()


def _same_device(ref: str, tensors: dict) -> None:
    """The fake kernels' device check. A call mixing the meta device with a real one dispatches to the
    fake kernel, which would return an empty tensor of the real device: refuse it by name instead."""
    device = tensors[ref].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"msattn: {name} must be on {ref}'s device {device}, got {t.device}")


def num_groups(n: int, nq: int, span: int) -> int:
    """Query groups of span tokens holding at least one of the last ``nq`` of ``n`` positions."""
    return 0 if nq == 0 else (n - 1) // span - (n - nq) // span + 1


@torch.library.register_fake("msattn::ms_select")
def _ms_select_fake(q, k, key_padding_mask, key_sums, key_counts, block_q, block_k, merge, topk, causal, local=0,
                    coarse_regions=0, coarse_topk=0, cu_seqlens_q=None, cu_seqlens_k=None):
    _same_device("q", dict(q=q, k=k, key_padding_mask=key_padding_mask, key_sums=key_sums, key_counts=key_counts,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
    if cu_seqlens_q is None:
        g = num_groups(k.shape[2], q.shape[2], block_q * merge)
    else:  # the groups of packed sequences depend on the offsets' values
        g = torch.library.get_ctx().new_dynamic_size()
    return q.new_empty((k.shape[0], k.shape[1], g, topk), dtype=torch.int32)


@torch.library.register_fake("msattn::ms_region_sums_append_")
def _ms_region_sums_append_fake(key_sums, key_counts, k, key_padding_mask, start, block_k):
    _same_device("k", dict(k=k, key_sums=key_sums, key_counts=key_counts, key_padding_mask=key_padding_mask))
    return None


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("msattn::ms_fwd")
def _ms_fwd_fake(q, k, v, index, key_padding_mask, rope_cos, rope_sin, block_q, block_k, merge, causal, scale,
                 cu_seqlens_q=None, cu_seqlens_k=None):
    _same_device("q", dict(q=q, k=k, v=v, index=index, key_padding_mask=key_padding_mask, rope_cos=rope_cos,
                           rope_sin=rope_sin, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.register_fake("msattn::ms_bwd")
def _ms_bwd_fake(dout, dlse, q, k, v, out, lse, index, key_padding_mask, rope_cos, rope_sin, block_q, block_k,
                 merge, causal, scale, cu_seqlens_q=None, cu_seqlens_k=None):
    _same_device("q", dict(q=q, dout=dout, dlse=dlse, k=k, v=v, out=out, lse=lse, index=index,
                           key_padding_mask=key_padding_mask, rope_cos=rope_cos, rope_sin=rope_sin,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _ms_fwd_setup(ctx, inputs, output):
    q, k, v, index, mask, rope_cos, rope_sin, block_q, block_k, merge, causal, scale, cu_q, cu_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, index, mask, rope_cos, rope_sin, out, lse, cu_q, cu_k)
    ctx.params = (block_q, block_k, merge, causal, scale)


def _ms_fwd_backward(ctx, dout, dlse):
    q, k, v, index, mask, rope_cos, rope_sin, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = ops.ms_bwd(dout, dlse, q, k, v, out, lse, index, mask, rope_cos, rope_sin, *ctx.params, cu_q, cu_k)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("msattn::ms_fwd", _ms_fwd_backward, setup_context=_ms_fwd_setup)


# ---------------------------------------------------------------------------------------------
# [SelfExtend] self_extend_fwd / self_extend_bwd (DESIGN section 3); the rotary tables get no gradient

@torch.library.register_fake("msattn::self_extend_fwd")
def _self_extend_fwd_fake(q, k, v, rope_cos, rope_sin, key_padding_mask, group_size, window, sliding_window, causal,
                          scale):
    _same_device("q", dict(q=q, k=k, v=v, rope_cos=rope_cos, rope_sin=rope_sin, key_padding_mask=key_padding_mask))
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.register_fake("msattn::self_extend_bwd")
def _self_extend_bwd_fake(dout, dlse, q, k, v, out, lse, rope_cos, rope_sin, key_padding_mask, group_size, window,
                          sliding_window, causal, scale):
    _same_device("q", dict(q=q, dout=dout, dlse=dlse, k=k, v=v, out=out, lse=lse, rope_cos=rope_cos,
                           rope_sin=rope_sin, key_padding_mask=key_padding_mask))
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _self_extend_fwd_setup(ctx, inputs, output):
    q, k, v, rope_cos, rope_sin, mask, group_size, window, sliding_window, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rope_cos, rope_sin, mask, out, lse)
    ctx.params = (group_size, window, sliding_window, causal, scale)


def _self_extend_fwd_backward(ctx, dout, dlse):
    q, k, v, rope_cos, rope_sin, mask, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = ops.self_extend_bwd(dout, dlse, q, k, v, out, lse, rope_cos, rope_sin, mask, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("msattn::self_extend_fwd", _self_extend_fwd_backward,
                                setup_context=_self_extend_fwd_setup)
# [/SelfExtend]


def isa() -> str:
    """The instruction set the CPU kernels use: ``"amx"`` (AVX-512, and AMX tiles for the selection's
    screen), ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    return ops.isa()


def set_isa(name: str) -> None:
    """Force the CPU kernels' instruction set (``"auto"``, ``"amx"``, ``"avx512"``, ``"avx2"``,
    ``"scalar"``) for the whole process (also at start-up: ``MSATTN_ISA``). Thread-safe: it waits for the CPU ops running
    now, so every call computes with one instruction set."""
    ops.set_isa(name)


# ---------------------------------------------------------------------------------------------
# [Infini-attention] infini_fwd / infini_bwd (csrc/torch/infini_cpu.cpp)

@torch.library.register_fake("msattn::infini_fwd")
def _infini_fwd_fake(q, k, v, beta, memory, norm, key_padding_mask, rope_cos, rope_sin, delta_rule, causal, scale,
                     update_memory):
    _same_device("q", dict(q=q, k=k, v=v, beta=beta, memory=memory, norm=norm, key_padding_mask=key_padding_mask,
                           rope_cos=rope_cos, rope_sin=rope_sin))
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(q), like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q)), like(memory), like(norm)


@torch.library.register_fake("msattn::infini_bwd")
def _infini_bwd_fake(dout, dout_local, dlse, dmemory, dnorm, q, k, v, beta, memory, norm, out_local, lse,
                     key_padding_mask, rope_cos, rope_sin, delta_rule, causal, scale, update_memory):
    _same_device("q", dict(q=q, dout=dout, dout_local=dout_local, dlse=dlse, dmemory=dmemory, dnorm=dnorm, k=k, v=v,
                           beta=beta, memory=memory, norm=norm, out_local=out_local, lse=lse,
                           key_padding_mask=key_padding_mask, rope_cos=rope_cos, rope_sin=rope_sin))
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(q), like(k), like(v), like(beta), like(memory), like(norm)


def _infini_fwd_setup(ctx, inputs, output):
    q, k, v, beta, memory, norm, mask, cos, sin, delta_rule, causal, scale, update_memory = inputs
    _, out_local, lse, _, _ = output
    ctx.save_for_backward(q, k, v, beta, memory, norm, mask, cos, sin, out_local, lse)
    ctx.params = (delta_rule, causal, scale, update_memory)


def _infini_fwd_backward(ctx, dout, dout_local, dlse, dmemory, dnorm):
    q, k, v, beta, memory, norm, mask, cos, sin, out_local, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out_local)
    grads = ops.infini_bwd(dout, dout_local, dlse, dmemory, dnorm, q, k, v, beta, memory, norm, out_local, lse,
                           mask, cos, sin, *ctx.params)
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("msattn::infini_fwd", _infini_fwd_backward, setup_context=_infini_fwd_setup)
# [/Infini-attention]


# ---------------------------------------------------------------------------------------------
# the backward ops have no derivative of their own: a second derivative is an error, not a silent zero

def _refuse_double_backward(name: str) -> None:
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"msattn: {name} has no derivative, so msattn's attention has no second derivative "
                           "(double backward, e.g. a gradient penalty through torch.autograd.grad(create_graph=True)); "
                           "use first-order gradients, or PyTorch SDPA where a second derivative is needed")

    torch.library.register_autograd(f"msattn::{name}", backward, setup_context=setup_context)


for _name in ("ms_bwd", "self_extend_bwd", "infini_bwd"):
    _refuse_double_backward(_name)
