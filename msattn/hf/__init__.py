"""HuggingFace integration: msattn's attention methods through transformers' public extension points.

``patch(model, config)`` switches a causal LM to the method that the type of ``config`` names
(:class:`msattn.MSConfig`, :class:`msattn.SelfExtendConfig`, :class:`msattn.InfiniConfig`; the
registry is :data:`METHODS`), in place, before or after PEFT; ``unpatch(model)`` restores it bit for
bit. Each method is an attention function and a mask function registered in transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` (no attention class is patched), a rotary wrapper
where its kernel applies RoPE itself, and a cache class (:mod:`msattn.hf.cache`). A patched model
carries one :class:`~msattn.hf.common.PatchRecord`; patching a patched model raises, whatever the two
methods are.

Importing this module registers the methods, so ``AutoModelForCausalLM.from_pretrained(path,
attn_implementation="msattn")`` gives a model with MS attention and the default ``MSConfig()``
(``patch`` is for other configs, RoPE on selected tokens, the peer methods, and generation with the
region-sum cache).

``generate()`` of a patched model uses its method's cache (:func:`msattn.hf.cache.new_cache`) unless
the caller passes one: ``patch`` wraps the model's public ``generate`` to pass it, and ``unpatch``
removes the wrapper. Padding masks from HF collators and ``generate()`` reach the kernels as a key
padding mask; a mask a kernel cannot honour (packed sequences, custom patterns, a sliding window the
method does not enforce) raises.
"""

from __future__ import annotations

import functools

from torch import nn
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from ..config import InfiniConfig, MSConfig, SelfExtendConfig
from . import infini, ms, self_extend
from .cache import InfiniCache, MSCache, new_cache, prefill
from .common import RECORD, Method, PatchRecord, UnrotatedRotary, base_model, cache_argument, check_model, decoder

__all__ = ["METHODS", "InfiniCache", "InfiniConfig", "MSCache", "MSConfig", "Method", "SelfExtendConfig",
           "UnrotatedRotary", "cache_argument", "new_cache", "patch", "patched_config", "prefill", "register",
           "unpatch"]

#: The one method registry: name -> :class:`Method`. The evaluation harness, the demo and the examples
#: read it; ``"dense"`` (the unpatched model) is not a method here.
METHODS: dict[str, Method] = {m.name: m for m in (ms.METHOD, self_extend.METHOD, infini.METHOD)}


def register() -> None:
    """Add every method's attention and mask functions to transformers' registries (idempotent; done
    when this module is imported)."""
    for method in METHODS.values():
        AttentionInterface.register(method.attn_implementation, method.attention)
        AttentionMaskInterface.register(method.attn_implementation, method.mask)


register()


def _method_of(config) -> Method:
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise TypeError(f"msattn.hf.patch: config must be one of {', '.join(m.config.__name__ for m in METHODS.values())}"
                    f" (it picks the method), got {type(config).__name__}")


def _generate(model, *args, **kwargs):
    """``model.generate`` of a patched model: the method's cache unless the caller passes one or turns
    caching off (``generate``'s own ``use_cache`` or the generation config's)."""
    rec = getattr(model, RECORD)
    name = cache_argument(model)
    config = kwargs.get("generation_config") or model.generation_config
    use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
    if use_cache is not False and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
        kwargs[name] = rec.method.new_cache(rec.config)
    return type(model).generate(model, *args, **kwargs)


def patch(model, config=None, rope: nn.Module | None = None):
    """Switch a causal LM to an msattn attention method, in place.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (SelfExtend: Llama
            and Mistral), or a PEFT model wrapping one (patching before or after PEFT both work).
        config: ``MSConfig`` (default ``MSConfig()``), ``SelfExtendConfig`` or ``InfiniConfig``: its
            type picks the method.
        rope: a rotary embedding module to install in place of the model's (HF's
            ``forward(x, position_ids) -> (cos, sin)`` contract), e.g. ``msattn.rope.CRDNTKRotaryEmbedding``.
    Returns:
        the same model, patched. :func:`unpatch` restores it.
    """
    config = MSConfig() if config is None else config
    method = _method_of(config)
    base, head_dim = check_model(model, "msattn.hf.patch", method)
    existing = getattr(base, RECORD, None)
    if existing is not None:
        raise RuntimeError(f"msattn.hf.patch: the model is already patched with {existing.method.name}; call "
                           "msattn.hf.unpatch(model) first")
    dec = decoder(model)
    modules = [layer.self_attn for layer in dec.layers]
    layers = getattr(config, "layers", None)
    if layers is not None and any(i >= len(modules) for i in layers):
        raise ValueError(f"msattn.hf.patch: MSConfig.layers {list(layers)} names layers beyond the model's "
                         f"{len(modules)}")
    for i, attn in enumerate(modules):
        if getattr(attn, "layer_idx", i) != i:
            raise ValueError(f"msattn.hf.patch: decoder layer {i} holds the attention module of layer "
                             f"{attn.layer_idx}")

    rotary = rope if rope is not None else dec.rotary_emb
    unrotated = UnrotatedRotary(rotary, head_dim) if method.unrotated(config) else None
    rec = PatchRecord(method, config, base.config._attn_implementation, dec.rotary_emb, unrotated)
    dec.rotary_emb = unrotated if unrotated is not None else rotary
    for attn in modules:
        if method.install is not None:
            method.install(attn, config)
        setattr(attn, RECORD, rec)
    setattr(base, RECORD, rec)
    base.generate = functools.partial(_generate, base)
    base.set_attn_implementation(method.attn_implementation)
    return model


def patched_config(model):
    """The config a model (or PEFT model) was patched with (``MSConfig``, ``SelfExtendConfig`` or
    ``InfiniConfig``), or None when it is not patched."""
    rec = getattr(base_model(model), RECORD, None)
    return None if rec is None else rec.config


def unpatch(model):
    """Restore the attention implementation and rotary embedding that :func:`patch` replaced, and
    remove what the method added (Infini-attention's gates, the ``generate`` wrapper)."""
    base = base_model(model)
    rec = getattr(base, RECORD, None)
    if rec is None:
        raise RuntimeError("msattn.hf.unpatch: the model is not patched")
    dec = decoder(model)
    dec.rotary_emb = rec.saved_rotary
    for layer in dec.layers:
        attn = layer.self_attn
        if getattr(attn, RECORD, None) is rec:
            delattr(attn, RECORD)
            if rec.method.uninstall is not None:
                rec.method.uninstall(attn)
    delattr(base, RECORD)
    del base.generate
    base.set_attn_implementation(rec.saved_attn_implementation)
    return model
