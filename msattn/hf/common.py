"""What every method of :mod:`msattn.hf` shares: the method contract, the one record a patched model
carries, model lookup and checks, the key padding mask, the un-rotated rotary wrapper, and the name of
transformers' cache argument.

This is the only module that knows how transformers spells things that moved between the releases
msattn supports (see :func:`cache_argument`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.masking_utils import causal_mask_function

from ..config import MAX_HEAD_DIM
from ..rope import compact_rope_tables

__all__ = ["Method", "PatchRecord", "UnrotatedRotary", "attention_modules", "base_model", "cache_argument",
           "call_record", "check_model", "check_queries_are_last", "decoder", "packed_or_padding_mask", "padding_mask",
           "record"]

RECORD = "_msattn"  # the attribute that holds a PatchRecord, on the base model and on each attention module


@dataclasses.dataclass(frozen=True)
class Method:
    """One attention method of :mod:`msattn.hf` (an entry of ``msattn.hf.METHODS``).

    Attributes:
        name: the method's name in the registry, the evaluation harness and the demo (``"ms"``, ...).
        config: its config class; ``patch(model, config)`` picks the method by the config's type.
        attn_implementation: its name in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.
        attention: the attention function (AttentionInterface contract).
        mask: the mask function (AttentionMaskInterface contract).
        model_types: the HF ``model_type`` s it supports.
        sliding_window: whether it enforces a model's sliding window itself (else patching such a model raises).
        unrotated: ``unrotated(config)``: whether the kernel applies RoPE itself, so the attention layers
            must receive un-rotated q and k (the model's rotary embedding is then wrapped).
        new_cache: ``new_cache(config, capacity, kv_dir)``: the cache ``generate()`` and ``prefill`` use for a
            patched model; ``capacity`` is the number of tokens it will hold when known, else 0 (a hint);
            ``kv_dir`` a directory for keys and values in mapped files, or None (a cache that keeps them
            in memory raises for a directory: :func:`msattn.hf.cache.memory_only`).
        install: ``install(attention_module, config)`` adds what the method trains per layer (Infini's
            gate), or None; ``uninstall(attention_module)`` removes it.
    """

    name: str
    config: type
    attn_implementation: str
    attention: Callable
    mask: Callable
    model_types: tuple[str, ...]
    sliding_window: bool
    unrotated: Callable[[object], bool]
    new_cache: Callable[[object, int, object], object]
    install: Callable | None = None
    uninstall: Callable | None = None

    def __reduce__(self):
        # pickled and deep-copied by name: a patched model's record keeps pointing at the registered method
        return _registered_method, (self.name,)


def _registered_method(name: str) -> Method:
    from . import METHODS

    return METHODS[name]


@dataclasses.dataclass
class PatchRecord:
    """What ``msattn.hf.patch`` changed on a model and needs at every call: the one record of a patched
    model, on its base model and on each of its attention modules (the same object).

    Attributes:
        method: the :class:`Method`.
        config: its config (an ``MSConfig``, ``SelfExtendConfig`` or ``InfiniConfig``).
        saved_attn_implementation: the model's attention implementation before patching.
        saved_rotary: the decoder's rotary embedding before patching.
        rotary: the :class:`UnrotatedRotary` the kernel takes its tables from, or None when the model
            rotates q and k itself.
    """

    method: Method
    config: object
    saved_attn_implementation: str
    saved_rotary: nn.Module
    rotary: UnrotatedRotary | None


def base_model(model):
    """The transformers PreTrainedModel inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model):
    """The decoder module that owns ``layers`` and ``rotary_emb`` (LlamaModel and friends)."""
    for module in base_model(model).modules():
        if hasattr(module, "layers") and hasattr(module, "rotary_emb"):
            return module
    raise ValueError(f"msattn: cannot find a decoder with `layers` and `rotary_emb` in {type(model).__name__}")


def attention_modules(dec) -> list[nn.Module]:
    """The attention module of each decoder layer, in layer order."""
    return [layer.self_attn for layer in dec.layers]


def record(model) -> PatchRecord | None:
    """The :class:`PatchRecord` of a patched model (or PEFT model), or None."""
    return getattr(base_model(model), RECORD, None)


def check_model(model, who: str, method: Method) -> tuple[nn.Module, int]:
    """``(base model, head dim)`` after the checks every ``patch`` makes of a model: a type the method
    supports, query heads a multiple of the key/value heads, a head dim the kernels take, and no
    sliding window unless the method enforces it. ``who`` opens the error messages."""
    base = base_model(model)
    mconf = base.config
    model_type = getattr(mconf, "model_type", None)
    if model_type not in method.model_types:
        raise ValueError(f"{who}: model type {model_type!r} is not supported by {method.name}; supported: "
                         f"{', '.join(method.model_types)}")
    if (not method.sliding_window and getattr(mconf, "sliding_window", None) is not None
            and getattr(mconf, "use_sliding_window", True)):
        raise ValueError(f"{who}: the model attends within a sliding window of {mconf.sliding_window} tokens, which "
                         f"{method.name} does not implement (it bounds the work otherwise); set "
                         "model.config.sliding_window = None to patch it")
    heads = mconf.num_attention_heads
    kv_heads = getattr(mconf, "num_key_value_heads", None) or heads
    head_dim = getattr(mconf, "head_dim", None) or mconf.hidden_size // heads
    if heads % kv_heads != 0:
        raise ValueError(f"{who}: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{who}: head dim {head_dim} is outside the kernels' range 1..{MAX_HEAD_DIM}")
    return base, head_dim


def cache_argument(model) -> str:
    """The keyword under which the model's ``forward`` and ``generate`` take a cache: ``"cache"`` from
    transformers 5.24 on, ``"past_key_values"`` before (5.25 still accepts the old name, with a
    deprecation warning, until 5.40). Read from the model class's ``forward`` signature, so a release
    that renames it again fails loudly in ``tests/test_hf.py`` instead of silently dropping the cache."""
    params = inspect.signature(type(base_model(model)).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    import transformers

    raise RuntimeError(f"msattn: {type(base_model(model)).__name__}.forward of transformers {transformers.__version__} "
                       "takes neither `cache` nor `past_key_values`; msattn does not know how to pass it a cache")


# ---------------------------------------------------------------------------------------------
# the calls

def check_queries_are_last(q_offset, q_length: int, kv_length: int, kv_offset: int = 0) -> None:
    """msattn's kernels take a call's queries as the last of its keys. A cache with slots past the last
    query (a static or preallocated one) would shift every position: refuse it."""
    end = q_offset + q_length
    end = end if isinstance(end, int) else int(end)  # a tensor for static caches
    if kv_offset + kv_length > end:
        raise NotImplementedError(
            f"msattn: the cache holds {kv_offset + kv_length} key slots for queries ending at {end} (a static or "
            "preallocated cache, e.g. cache_implementation='static'); msattn's kernels take the queries as the "
            "last keys: use the method's own cache (msattn.hf.new_cache(model), what generate() of a patched "
            "model uses) or a DynamicCache")


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                 attention_mask=None, **kwargs):
    """The mask function of MS attention and Infini-attention: the key padding mask, bool
    ``(B, kv_length)`` (True = real token), or None. Causality is the kernel's own; any other mask
    pattern raises."""
    check_queries_are_last(q_offset, q_length, kv_length, kv_offset)
    if mask_function is not causal_mask_function:
        raise NotImplementedError(
            "msattn implements causal attention with a key padding mask; this model asked for another mask "
            "pattern (a sliding window, packed sequences in position_ids, or a custom mask function), which "
            "it cannot honour. For Mistral set model.config.sliding_window = None before patching.")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"msattn: attention_mask must be 2-D (batch, keys), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.to(torch.bool)[:, -kv_length:]
    return mask.contiguous()


def _block_causal_offsets(mask_function, batch_size: int, length: int, device) -> torch.Tensor | None:
    """The sequences of a padding-free batch: int32 ``(S + 1,)`` offsets over the ``batch_size * length``
    tokens taken row after row (each row starts a sequence), or None when ``mask_function`` is not
    block-causal. transformers builds such a mask function from ``position_ids`` that restart per
    sequence; it is probed here with index tensors in O(length) calls, as its own mask builders call it:
    a new sequence starts where a token does not see the one before it, and then every token must see
    the first token of its sequence and neither the last token of the sequence before nor the next
    token (a sliding window shorter than a sequence, or any other pattern, fails)."""
    b = torch.arange(batch_size, device=device)[:, None]
    i = torch.arange(length, device=device)[None, :]

    def seen(q_idx, kv_idx):  # (B, len) bool: does query q_idx see key kv_idx
        allowed = torch.as_tensor(mask_function(b, 0, q_idx, kv_idx), device=device)
        return allowed.expand(batch_size, q_idx.shape[-1]).bool()

    starts = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    if length > 1:
        starts[:, 1:] = ~seen(i[:, 1:], i[:, :-1])
    first = torch.where(starts, i, 0).cummax(dim=1).values  # each token's sequence start
    if not seen(i.expand(batch_size, -1), first).all():
        return None
    later = first > 0
    if later.any() and seen(i.expand(batch_size, -1), (first - 1).clamp(min=0))[later].any():
        return None
    if length > 1 and seen(i[:, :-1], i[:, 1:]).any():
        return None
    flat = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.tensor([batch_size * length], device=device)
    return torch.cat([flat, end]).to(torch.int32)


def packed_or_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                           mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """The mask function of MS attention: :func:`padding_mask`, and for transformers' padding-free
    batches (``position_ids`` restarting per sequence, no attention mask and no cache, e.g. from
    ``DataCollatorWithFlattening``) the sequences' offsets instead: int32 ``(S + 1,)`` over the
    ``B * L`` tokens row after row, which the attention function passes to the kernels as
    ``cu_seqlens``."""
    if (mask_function is not causal_mask_function and attention_mask is None and q_length == kv_length
            and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0):
        offsets = _block_causal_offsets(mask_function, batch_size, q_length, kwargs.get("device") or "cpu")
        if offsets is not None:
            return offsets
    return padding_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)


def call_record(module, method: Method, attention_mask, dropout, sliding_window=None, *,
                unpatched_ok: bool = False, packed_ok: bool = False) -> PatchRecord | None:
    """The record ``patch`` left on an attention module, after the checks every msattn attention
    function makes of its call: no dropout, the mask is msattn's 2-D key padding mask (bool ``(B, N)``),
    None, or with ``packed_ok`` the int32 ``(S + 1,)`` offsets of :func:`packed_or_padding_mask`, no
    sliding window (pass None where the method enforces one), and the module is patched for ``method``.
    With ``unpatched_ok`` a module ``patch`` never saw gives None (``attn_implementation=`` alone);
    otherwise it is an error."""
    if sliding_window is not None:
        raise NotImplementedError(f"msattn: the model uses a sliding window of {sliding_window} tokens, which "
                                  f"{method.name} does not implement; set model.config.sliding_window = None")
    if dropout:
        raise ValueError(f"msattn: attention dropout is not supported, got dropout={dropout}")
    if attention_mask is not None and attention_mask.dim() == 1 and not packed_ok:
        raise NotImplementedError(f"msattn: {method.name} does not take packed sequences (a padding-free batch); "
                                  "pad the batch instead")
    if attention_mask is not None and attention_mask.dim() not in ((1, 2) if packed_ok else (2,)):
        raise ValueError("msattn: expected the 2-D key padding mask of msattn's mask function, got a mask of "
                         f"shape {tuple(attention_mask.shape)}; was the model patched with msattn.hf.patch?")
    rec = getattr(module, RECORD, None)
    if rec is None and not unpatched_ok:
        raise RuntimeError(f"msattn: this attention module is not patched for {method.name}; call "
                           f"msattn.hf.patch(model, msattn.{method.config.__name__}(...)) instead of setting "
                           f"attn_implementation='{method.attn_implementation}' alone")
    if rec is not None and rec.method is not method:
        raise RuntimeError(f"msattn: this attention module is patched for {rec.method.name}, not {method.name}")
    return rec


# ---------------------------------------------------------------------------------------------
# RoPE inside the kernel: the model's rotary embedding hands out identity rotations

class UnrotatedRotary(nn.Module):
    """Wraps a rotary embedding for methods whose kernel applies RoPE itself (MS attention with
    ``rope="selected"``, SelfExtend).

    ``forward(x, position_ids)`` returns cos = 1, sin = 0 of shape ``(B, L, head_dim)``, so the
    attention layers keep q and k un-rotated (and the cache stores un-rotated keys); ``tables(n,
    device)`` gives the kernel the wrapped embedding's ``(cos, sin)`` for positions ``0..n-1``, float32
    ``(n, rotary_dim / 2)`` each, recomputed after every forward (the wrapped base may change during
    training, e.g. CRD NTK's growing scale).
    """

    def __init__(self, inner: nn.Module, head_dim: int):
        super().__init__()
        self.inner = inner
        self.head_dim = head_dim
        self._tables = None

    def forward(self, x, position_ids):
        self._tables = None
        shape = (position_ids.shape[0], position_ids.shape[-1], self.head_dim)
        ones = torch.ones(shape, dtype=x.dtype, device=x.device)
        return ones, torch.zeros_like(ones)

    def tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None or self._tables[0].shape[0] < n or self._tables[0].device != device:
            length = max(n, 0 if self._tables is None else self._tables[0].shape[0])
            self._tables = compact_rope_tables(self.inner, length, device=device)
        return self._tables
