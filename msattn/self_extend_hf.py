"""SelfExtend for HuggingFace Llama and Mistral models, through transformers' attention registry.

``patch_self_extend(model, group_size, window)`` registers ``"msattn_self_extend"`` in
``AttentionInterface`` (and its mask function in ``AttentionMaskInterface``), wraps the model's rotary
embedding so that the attention layers receive **un-rotated** q and k (the cache then stores
un-rotated keys), and switches the model to it; no attention class is patched.
``unpatch_self_extend(model)`` restores what was there. The kernel (:func:`msattn.self_extend_attention`)
rotates every score's pair itself from the wrapped embedding's tables, with SelfExtend positions
(DESIGN section 3): neighbours within ``window`` keep their distance, farther keys get
``floor(i/G) - floor(j/G) + window - floor(window/G)``.

Prefill and cached decoding both work: the queries of a call are the last ``Nq`` of the ``N`` cached
positions. Positions are cache slots ``0..N-1``; position_ids passed to the model are not used (with
left padding the groups are aligned to slots, not to each row's first real token). Mistral's sliding
window is enforced by the kernel (keys with ``i - j >= sliding_window`` are hidden); because the
kernel needs every key's slot, ``generate()`` of a patched model uses a full ``DynamicCache`` instead
of a sliding-window one, and a cache that dropped keys raises.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
from transformers.modeling_utils import AttentionInterface

from . import hf
from .functional import self_extend_attention

__all__ = ["NAME", "SUPPORTED_MODEL_TYPES", "patch_self_extend", "register", "unpatch_self_extend"]

NAME = "msattn_self_extend"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


# ---------------------------------------------------------------------------------------------
# the registry entries

def _is_sliding_causal(mask_function, sliding_window) -> bool:
    """Whether mask_function is transformers' plain sliding-window causal mask of this window (probed on
    a few index pairs; a packed-sequence or custom mask fails the probe)."""
    if not isinstance(sliding_window, int) or sliding_window < 1:
        return False
    t = torch.tensor

    def visible(q_idx, kv_idx):
        return bool(mask_function(t(0), t(0), t(q_idx), t(kv_idx)))

    sw = sliding_window
    try:
        return (visible(sw, 1) and visible(sw - 1, 0) and not visible(sw, 0) and not visible(0, 1)
                and visible(0, 0))
    except Exception:  # a mask that indexes tensors of its own (packed sequences, block ids)
        return False


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                 attention_mask=None, local_size=None, config=None, **kwargs):
    """The mask function of ``"msattn_self_extend"``: the key padding mask, bool ``(B, kv_length)``
    (True = real token), or None. Causality and Mistral's sliding window are the kernel's own; any
    other mask pattern, or a cache that dropped its oldest keys, raises."""
    if kv_offset:
        raise NotImplementedError(
            f"msattn SelfExtend: the cache dropped its first {kv_offset} keys (a sliding-window cache); SelfExtend "
            "positions are cache slots, so it needs every key: use a plain transformers DynamicCache() (no config)")
    if mask_function is not causal_mask_function:
        window = local_size if local_size is not None else getattr(config, "sliding_window", None)
        if not _is_sliding_causal(mask_function, window):
            raise NotImplementedError(
                "msattn SelfExtend implements causal attention with a key padding mask and an optional sliding "
                "window; this model asked for another mask pattern (packed sequences in position_ids, or a custom "
                "mask function), which it cannot honour")
    return hf.padding_mask(batch_size, q_length, kv_length, q_offset, kv_offset, causal_mask_function, attention_mask)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, **kwargs):
    """The attention function of ``"msattn_self_extend"`` (transformers' AttentionInterface contract).

    Args:
        query: ``(B, Hq, Nq, D)`` un-rotated; key, value: ``(B, Hkv, N, D)`` (not repeated for GQA),
            key un-rotated (the patched rotary embedding hands out identity rotations).
        attention_mask: from :func:`padding_mask`, bool ``(B, N)`` or None.
        sliding_window: Mistral's window (passed by its attention layer), or None.
    Returns:
        ``(out (B, Nq, Hq, D), None)``.
    """
    state = hf.patched_state(module, "_msattn_self_extend", "SelfExtend", NAME,
                             "msattn.self_extend_hf.patch_self_extend(model, ...)", attention_mask, dropout)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    rotary = state.rotary.tables(key.shape[2], query.device)
    out = self_extend_attention(query, key, value, group_size=state.group_size, window=state.window, rotary=rotary,
                                causal=causal, scale=scaling, key_padding_mask=attention_mask,
                                sliding_window=sliding_window)
    return out.transpose(1, 2), None


def register() -> None:
    """Add ``"msattn_self_extend"`` to transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


# ---------------------------------------------------------------------------------------------
# patching

class UnrotatedRotary(hf.SelectedRotary):
    """Wraps a rotary embedding for SelfExtend: ``forward`` hands the attention layers cos = 1, sin = 0
    (so q, k and the cache stay un-rotated), ``tables(n, device)`` gives the kernel the wrapped
    embedding's ``(cos, sin)`` for positions ``0..n-1``, float32 ``(n, rotary_dim / 2)`` each."""

    def __init__(self, inner: nn.Module, head_dim: int):
        super().__init__(inner, None, head_dim)


class _LayerState:
    """What a patched attention module carries."""

    def __init__(self, group_size: int, window: int, rotary: UnrotatedRotary):
        self.group_size = group_size
        self.window = window
        self.rotary = rotary


def _prepare_full_cache(base):
    """generate()'s cache preparation, giving a full DynamicCache where it would give one with
    sliding-window layers (they drop keys whose slots SelfExtend needs)."""
    original = type(base)._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get("past_key_values")
        result = original(base, generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if user_cache is None and type(cache) is DynamicCache and any(getattr(cache, "is_sliding", ())):
            model_kwargs["past_key_values"] = DynamicCache()
        return result

    return prepare


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"msattn.self_extend_hf.patch_self_extend: {name} must be an int >= {minimum}, got {value!r}")


def patch_self_extend(model, group_size: int, window: int):
    """Switch a causal LM to SelfExtend attention, in place.

    Args:
        model: a ``LlamaForCausalLM`` or ``MistralForCausalLM``, or a PEFT model wrapping one.
        group_size: ``G >= 1``, positions per group beyond the neighbour window (the paper's G).
        window: ``W >= 0``, the neighbour window (the paper's w_n); ``window >= `` the sequence length
            reproduces the unpatched model.
    Returns:
        the same model, patched. :func:`unpatch_self_extend` restores it.
    """
    _check_int("group_size", group_size, 1)
    _check_int("window", window, 0)
    base, head_dim = hf.check_model(model, "msattn.self_extend_hf.patch_self_extend", None,
                                    SUPPORTED_MODEL_TYPES)
    mconf = base.config
    if getattr(base, "_msattn_self_extend_saved", None) is not None:
        raise RuntimeError("msattn.self_extend_hf.patch_self_extend: the model is already patched with SelfExtend; "
                           "call unpatch_self_extend(model) first")
    if getattr(base, "_msattn_saved", None) is not None:
        raise RuntimeError("msattn.self_extend_hf.patch_self_extend: the model is patched with MS attention; call "
                           "msattn.hf.unpatch(model) first")
    decoder = hf._decoder(model)

    register()
    base._msattn_self_extend_saved = (mconf._attn_implementation, decoder.rotary_emb)
    rotary = UnrotatedRotary(decoder.rotary_emb, head_dim)
    decoder.rotary_emb = rotary
    for attn in hf._attention_modules(decoder):
        attn._msattn_self_extend = _LayerState(group_size, window, rotary)
    base._prepare_cache_for_generation = _prepare_full_cache(base)
    base.set_attn_implementation(NAME)
    return model


def unpatch_self_extend(model):
    """Restore the attention implementation and rotary embedding that :func:`patch_self_extend` replaced."""
    base = hf._base_model(model)
    saved = getattr(base, "_msattn_self_extend_saved", None)
    if saved is None:
        raise RuntimeError("msattn.self_extend_hf.unpatch_self_extend: the model is not patched with SelfExtend")
    impl, rotary = saved
    decoder = hf._decoder(model)
    decoder.rotary_emb = rotary
    for attn in hf._attention_modules(decoder):
        if hasattr(attn, "_msattn_self_extend"):
            del attn._msattn_self_extend
    base.set_attn_implementation(impl)
    base._msattn_self_extend_saved = None
    del base._prepare_cache_for_generation
    return model
