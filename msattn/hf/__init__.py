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
padding mask; MS attention also takes transformers' padding-free batches (``position_ids`` restarting
per sequence, ``DataCollatorWithFlattening``) as packed sequences. A mask a kernel cannot honour
(packed sequences for SelfExtend and Infini-attention, custom patterns, a sliding window the method
does not enforce) raises.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import torch
from torch import nn
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from ..config import InfiniConfig, MSConfig, SelfExtendConfig
from . import infini, ms, self_extend
from .cache import InfiniCache, MSCache, new_cache, prefill
from .common import (RECORD, Method, PatchRecord, UnrotatedRotary, attention_modules, base_model, cache_argument,
                     check_model, decoder, record)

__all__ = ["METHODS", "InfiniCache", "InfiniConfig", "MSCache", "MSConfig", "Method", "SelfExtendConfig",
           "UnrotatedRotary", "cache_argument", "from_pretrained", "new_cache", "patch", "patched_config", "prefill",
           "register", "unpatch"]

#: The attribute of a patched model's HF config that names its method and config, so that
#: ``save_pretrained`` writes them to config.json and :func:`from_pretrained` patches the model again.
SAVED = "msattn"

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
    """``model.generate`` of a patched model: the method's cache unless the caller passes one, asks for
    one by name (``cache_implementation``) or turns caching off (``use_cache``; each as an argument or
    in the generation config), sized for the prompt and ``max_new_tokens`` when both are given."""
    rec = record(model)
    name = cache_argument(model)
    config = kwargs.get("generation_config") or model.generation_config
    use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
    named = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if (use_cache is not False and named is None and kwargs.get("cache") is None
            and kwargs.get("past_key_values") is None):
        ids = args[0] if args else kwargs.get("input_ids")
        new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        known = isinstance(ids, torch.Tensor) and isinstance(new, int)  # else the cache grows as it goes
        kwargs[name] = rec.method.new_cache(rec.config, ids.shape[-1] + new if known else 0)
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
    existing = record(base)
    if existing is not None:
        raise RuntimeError(f"msattn.hf.patch: the model is already patched with {existing.method.name}; call "
                           "msattn.hf.unpatch(model) first")
    dec = decoder(model)
    modules = attention_modules(dec)
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
    setattr(base.config, SAVED, {"method": method.name, "config": dataclasses.asdict(config)})
    base.generate = functools.partial(_generate, base)
    base.set_attn_implementation(method.attn_implementation)
    return model


def patched_config(model):
    """The config a model (or PEFT model) was patched with (``MSConfig``, ``SelfExtendConfig`` or
    ``InfiniConfig``), or None when it is not patched."""
    rec = record(model)
    return None if rec is None else rec.config


def unpatch(model):
    """Restore the attention implementation and rotary embedding that :func:`patch` replaced, and
    remove what the method added (Infini-attention's gates, the ``generate`` wrapper)."""
    base = base_model(model)
    rec = record(base)
    if rec is None:
        raise RuntimeError("msattn.hf.unpatch: the model is not patched")
    dec = decoder(model)
    dec.rotary_emb = rec.saved_rotary
    for attn in attention_modules(dec):
        if getattr(attn, RECORD, None) is rec:
            delattr(attn, RECORD)
            if rec.method.uninstall is not None:
                rec.method.uninstall(attn)
    delattr(base, RECORD)
    if hasattr(base.config, SAVED):
        delattr(base.config, SAVED)
    del base.generate
    base.set_attn_implementation(rec.saved_attn_implementation)
    return model


def from_pretrained(path, **kwargs):
    """Load a model saved with ``save_pretrained`` while patched, patched again as it was saved.

    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` loads the plain model; the method and
    config that ``patch`` wrote to config.json (the ``msattn`` entry) are applied again, and the weights
    the method added (Infini-attention's trained gates), which the plain model does not have, are read
    from the checkpoint's safetensors files. A model saved unpatched is returned as it loads. A rotary
    embedding passed to ``patch(..., rope=)`` is not saved: pass it to ``patch`` again.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    saved = getattr(model.config, SAVED, None)
    if saved is None:
        return model
    delattr(model.config, SAVED)
    if not isinstance(saved, dict) or saved.get("method") not in METHODS:
        raise ValueError(f"msattn.hf.from_pretrained: {path}: config.json's {SAVED!r} entry must name one of "
                         f"{', '.join(METHODS)}, got {saved!r}")
    method = METHODS[saved["method"]]
    plain = set(model.state_dict())
    patch(model, method.config(**saved.get("config", {})))
    added = set(model.state_dict()) - plain
    if added:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        weights = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"msattn.hf.from_pretrained: {file} not found; the model's {method.name} "
                                        "weights are read from safetensors files (save_pretrained's default)")
            with safe_open(file, framework="pt") as f:  # only the added tensors, not the whole model again
                weights.update({k: f.get_tensor(k) for k in f.keys() if k in added})
        lost = sorted(added - set(weights))
        if lost:
            raise ValueError(f"msattn.hf.from_pretrained: {path} lacks the {method.name} weights {', '.join(lost[:4])}"
                             f"{' ...' if len(lost) > 4 else ''}; was it saved while patched?")
        model.load_state_dict(weights, strict=False)
    return model
