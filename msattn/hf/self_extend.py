"""SelfExtend as a transformers attention implementation, ``"msattn_self_extend"`` (Llama, Mistral).

The model's rotary embedding is wrapped (:class:`UnrotatedRotary`) so the attention layers receive
**un-rotated** q and k (the cache stores un-rotated keys); the kernel (:func:`msattn.self_extend_attention`)
rotates every score's pair itself with SelfExtend positions (DESIGN section 3): neighbours within
``window`` keep their distance, farther keys get ``floor(i/G) - floor(j/G) + window - floor(window/G)``.

Prefill and cached decoding both work: the queries of a call are the last ``Nq`` of the ``N`` cached
positions. Positions are cache slots ``0..N-1``; position_ids passed to the model are not used (with
left padding the groups are aligned to slots, not to each row's first real token). Mistral's sliding
window is enforced by the kernel (keys with ``i - j >= sliding_window`` are hidden); because the kernel
needs every key's slot, ``generate()`` of a patched model uses a full ``DynamicCache`` instead of a
sliding-window one, and a cache that dropped keys raises.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import causal_mask_function

from ..config import SelfExtendConfig
from ..functional import self_extend_attention
from .cache import memory_only
from .common import Method, call_record, padding_mask

__all__ = ["METHOD", "attention_forward", "mask_function"]


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


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                  attention_mask=None, local_size=None, config=None, **kwargs):
    """The mask function of ``"msattn_self_extend"``: the key padding mask, bool ``(B, kv_length)``
    (True = real token), or None. Causality and Mistral's sliding window are the kernel's own; any
    other mask pattern, or a cache that dropped its oldest keys, raises."""
    if kv_offset:
        raise NotImplementedError(
            f"msattn SelfExtend: the cache dropped its first {kv_offset} keys (a sliding-window cache); SelfExtend "
            "positions are cache slots, so it needs every key: use msattn.hf.new_cache(model) or a transformers "
            "DynamicCache() without a config")
    if mask_function is not causal_mask_function:
        window = local_size if local_size is not None else getattr(config, "sliding_window", None)
        if not _is_sliding_causal(mask_function, window):
            raise NotImplementedError(
                "msattn SelfExtend implements causal attention with a key padding mask and an optional sliding "
                "window; this model asked for another mask pattern (packed sequences in position_ids, or a custom "
                "mask function), which it cannot honour")
    return padding_mask(batch_size, q_length, kv_length, q_offset, kv_offset, causal_mask_function, attention_mask)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, **kwargs):
    """The attention function of ``"msattn_self_extend"`` (transformers' AttentionInterface contract).

    Args:
        query: ``(B, Hq, Nq, D)`` un-rotated; key, value: ``(B, Hkv, N, D)`` (not repeated for GQA),
            key un-rotated.
        attention_mask: from :func:`mask_function`, bool ``(B, N)`` or None.
        sliding_window: Mistral's window (passed by its attention layer), or None.
    Returns:
        ``(out (B, Nq, Hq, D), None)``.
    """
    rec = call_record(module, METHOD, attention_mask, dropout)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cfg = rec.config
    out = self_extend_attention(query, key, value, group_size=cfg.group_size, window=cfg.window,
                                rotary=rec.rotary.tables(key.shape[2], query.device), causal=causal, scale=scaling,
                                key_padding_mask=attention_mask, sliding_window=sliding_window)
    return out.transpose(1, 2), None


def _unrotated(config: SelfExtendConfig) -> bool:
    return True


def _new_cache(config: SelfExtendConfig, capacity: int = 0, kv_dir=None) -> DynamicCache:  # appends by concatenation
    memory_only("SelfExtend's DynamicCache", kv_dir)
    return DynamicCache()  # no config: no sliding-window layers, every key keeps its slot


METHOD = Method(
    name="self_extend",
    config=SelfExtendConfig,
    attn_implementation="msattn_self_extend",
    attention=attention_forward,
    mask=mask_function,
    model_types=("llama", "mistral"),
    sliding_window=True,
    unrotated=_unrotated,
    new_cache=_new_cache,
)
