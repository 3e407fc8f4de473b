"""MS attention as a transformers attention implementation, ``"msattn"``.

The attention function receives ``(B, H, N, D)`` q, k, v from the model's attention layers (k and v not
repeated for GQA) and the key padding mask from :func:`msattn.hf.common.packed_or_padding_mask`, or for
transformers' padding-free batches (``DataCollatorWithFlattening``) the sequences' offsets, which reach
the kernels as ``cu_seqlens``; with
``MSConfig(rope="selected")`` the model's rotary embedding is wrapped (:class:`UnrotatedRotary`) and
the kernel rotates the selected tokens with compact positions (DESIGN section 3). Layers outside
``MSConfig.layers`` run the same kernel with every region selected: exact dense attention. An
:class:`msattn.hf.cache.MSCache` hands the function its region sums, so a decode step reads only the
regions it selects.

``AutoModelForCausalLM.from_pretrained(path, attn_implementation="msattn")`` after ``import msattn.hf``
runs this function on modules that ``patch`` never saw: they use the default ``MSConfig()``.
"""

from __future__ import annotations

import math

from ..config import MSConfig
from ..functional import ms_attention, ms_select
from ..rope import slow_rotary_channels
from .cache import MSCache
from .common import Method, call_record, packed_or_padding_mask

__all__ = ["METHOD", "attention_forward"]

DEFAULT = MSConfig()


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """The attention function of ``"msattn"`` (transformers' AttentionInterface contract).

    Args:
        query: ``(B, Hq, Nq, D)``, the last ``Nq`` of ``N`` positions; key, value: ``(B, Hkv, N, D)``.
        attention_mask: from :func:`msattn.hf.common.packed_or_padding_mask`: bool ``(B, N)``, None, or
            for a padding-free batch the sequences' int32 ``(S + 1,)`` offsets over the ``B * N`` tokens.
    Returns:
        ``(out (B, Nq, Hq, D), None)``.
    """
    rec = call_record(module, METHOD, attention_mask, dropout, kwargs.get("sliding_window"), unpatched_ok=True,
                      packed_ok=True)
    cfg, rotary = (DEFAULT, None) if rec is None else (rec.config, rec.rotary)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    n = key.shape[2]
    if cfg.layers is not None and module.layer_idx not in cfg.layers:
        # a layer left dense: the same kernel with every region selected is exact attention
        cfg = MSConfig(block_q=cfg.block_q, block_k=cfg.block_k, merge=cfg.merge,
                       topk=max(1, math.ceil(n / cfg.block_k)))
    tables = channels = None
    if rotary is not None:  # compact positions stay below topk * block_k + span, whatever n is
        tables = rotary.tables(cfg.topk * cfg.block_k + cfg.span, query.device)
        if cfg.score_channels == "slow":
            channels = slow_rotary_channels(tables, query.shape[-1], module.config.max_position_embeddings)
    kw = dict(block_q=cfg.block_q, block_k=cfg.block_k, merge=cfg.merge, topk=cfg.topk, local=cfg.local,
              coarse_regions=cfg.coarse_regions, coarse_topk=cfg.coarse_topk, causal=causal,
              score_channels=channels)
    if attention_mask is not None and attention_mask.dim() == 1:  # packed: the B rows' tokens as one batch row
        b, nq = query.shape[0], query.shape[2]

        def flat(x):
            return x.transpose(1, 2).reshape(1, -1, x.shape[1], x.shape[3]).transpose(1, 2)

        out = ms_attention(flat(query), flat(key), flat(value), scale=scaling, rotary=tables,
                           cu_seqlens_q=attention_mask, **kw)
        return out.transpose(1, 2).reshape(b, nq, out.shape[1], out.shape[3]), None
    kw["key_padding_mask"] = attention_mask
    index = None
    layer = getattr(key, "_msattn_layer", None)  # an MSCache layer (weak reference): select from its region sums
    layer = layer() if layer is not None else None
    if layer is not None and layer.block_k == cfg.block_k and layer.length == n:
        sums, counts = layer.region_sums(attention_mask)
        index = ms_select(query, key, key_sums=sums, key_counts=counts, **kw)
    out = ms_attention(query, key, value, scale=scaling, rotary=tables, index=index, **kw)
    return out.transpose(1, 2), None


def _unrotated(config: MSConfig) -> bool:
    return config.rope == "selected"


def _new_cache(config: MSConfig, capacity: int = 0, kv_dir=None) -> MSCache:
    return MSCache(block_k=config.block_k, capacity=capacity, kv_dir=kv_dir)


METHOD = Method(
    name="ms",
    config=MSConfig,
    attn_implementation="msattn",
    attention=attention_forward,
    mask=packed_or_padding_mask,
    model_types=("llama", "mistral", "qwen2"),
    sliding_window=False,
    unrotated=_unrotated,
    new_cache=_new_cache,
)
