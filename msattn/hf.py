"""HuggingFace integration: MS attention through transformers' attention registry.

``register()`` adds ``"msattn"`` to ``AttentionInterface`` and its mask function to
``AttentionMaskInterface``; no attention class is patched, so upgrades of transformers keep working.
``patch(model, config, rope)`` switches a Llama / Mistral / Qwen2 causal LM to it (all layers or a
subset, the others dense), optionally replacing the rotary embedding; ``unpatch(model)`` restores
what was there. Padding masks from HF collators and ``generate()`` reach the kernel as a key padding
mask; a mask the kernel cannot honour (sliding windows, packed sequences, custom patterns) raises.
``generate()`` of a patched model uses an :class:`msattn.cache.MSCache`, whose region sums make a
decode step read only the regions it selects.

With ``MSConfig(rope="selected")`` the model's rotary embedding is wrapped so that it hands the
attention layers un-rotated q and k (cos 1, sin 0), and the kernel rotates the selected tokens with
compact positions from the wrapped embedding's tables (DESIGN section 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
from transformers.modeling_utils import AttentionInterface

from transformers.cache_utils import DynamicCache

from .cache import MSCache
from .config import MSConfig
from .functional import ms_attention, ms_select
from .rope import compact_rope_tables

__all__ = ["register", "patch", "unpatch", "patched_method", "model_config", "SUPPORTED_MODEL_TYPES"]

NAME = "msattn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------------------------------------
# the registry entries

def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                 attention_mask=None, **kwargs):
    """The mask function of ``"msattn"``: the key padding mask, bool ``(B, kv_length)`` (True = real
    token), or None. Causality is the kernel's own; any other mask pattern raises."""
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
    if mask.shape[1] < kv_length:  # a static cache: slots past the mask hold no token yet
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[1]), value=False)
    return mask.contiguous()


def patched_state(module, attr: str, method: str, name: str, patch_call: str, attention_mask, dropout,
                  sliding_window=None):
    """The state ``patch`` left on an attention module as ``attr``, after the checks every msattn attention
    function makes of its call: the module is patched, no dropout, the mask is msattn's 2-D key padding
    mask (bool ``(B, N)``) or None, and no sliding window (pass None where the method handles one)."""
    state = getattr(module, attr, None)
    if state is None:
        raise RuntimeError(f"msattn: this attention module is not patched for {method}; call {patch_call} instead "
                           f"of setting attn_implementation='{name}' alone")
    if sliding_window is not None:
        raise NotImplementedError(f"msattn: the model uses a sliding window of {sliding_window} tokens, which "
                                  f"{method} does not implement; set model.config.sliding_window = None")
    if dropout:
        raise ValueError(f"msattn: attention dropout is not supported, got dropout={dropout}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("msattn: expected the 2-D key padding mask of msattn's mask function, got a mask of "
                         f"shape {tuple(attention_mask.shape)}; was the model patched with {patch_call}?")
    return state


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """The attention function of ``"msattn"`` (transformers' AttentionInterface contract).

    Args:
        query: ``(B, Hq, Nq, D)``; key, value: ``(B, Hkv, N, D)`` (not repeated for GQA).
        attention_mask: from :func:`padding_mask`, bool ``(B, N)`` or None.
    Returns:
        ``(out (B, Nq, Hq, D), None)``.
    """
    state = patched_state(module, "_msattn", "MS attention", NAME, "msattn.hf.patch(model)", attention_mask, dropout,
                          kwargs.get("sliding_window"))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    n = key.shape[2]
    cfg = state.config
    if state.dense:  # a layer left dense: the same kernel with every region selected is exact attention
        cfg = MSConfig(block_q=cfg.block_q, block_k=cfg.block_k, merge=cfg.merge,
                       topk=max(1, math.ceil(n / cfg.block_k)))
    rotary = None
    if state.rotary is not None:  # compact positions stay below topk * block_k + span, whatever n is
        rotary = state.rotary.tables(cfg.topk * cfg.block_k + cfg.span, query.device)
    kw = dict(block_q=cfg.block_q, block_k=cfg.block_k, merge=cfg.merge, topk=cfg.topk, local=cfg.local,
              causal=causal, key_padding_mask=attention_mask)
    index = None
    layer = getattr(key, "_msattn_layer", None)  # an MSCache layer (weak reference): select from its region sums
    layer = layer() if layer is not None else None
    if layer is not None and layer.block_k == cfg.block_k and layer.length == n:
        sums, counts = layer.region_sums(attention_mask)
        index = ms_select(query, key, key_sums=sums, key_counts=counts, **kw)
    out = ms_attention(query, key, value, scale=scaling, rotary=rotary, index=index, **kw)
    return out.transpose(1, 2), None


def register() -> None:
    """Add ``"msattn"`` to transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


# ---------------------------------------------------------------------------------------------
# RoPE on selected tokens: the model's rotary embedding hands out identity rotations

class SelectedRotary(nn.Module):
    """Wraps a rotary embedding for ``rope="selected"``.

    ``forward(x, position_ids)`` returns cos = 1, sin = 0 of shape ``(B, L, head_dim)`` so the
    attention layers keep q and k un-rotated (and the cache stores un-rotated keys); ``tables(n)``
    gives the kernel the wrapped embedding's ``(cos, sin)`` for positions ``0..n-1``, float32
    ``(n, rotary_dim / 2)`` each, recomputed after every forward (the wrapped base may change during
    training, e.g. CRD NTK's growing scale).
    """

    def __init__(self, inner: nn.Module, config: MSConfig, head_dim: int):
        super().__init__()
        self.inner = inner
        self.config = config
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


# ---------------------------------------------------------------------------------------------
# patching

class _LayerState:
    """What a patched attention module carries: the model's MSConfig, whether this layer stays dense,
    and the rotary wrapper of rope="selected" (or None)."""

    def __init__(self, config: MSConfig, dense: bool, rotary: SelectedRotary | None):
        self.config = config
        self.dense = dense
        self.rotary = rotary


def _base_model(model):
    """The transformers PreTrainedModel inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model):
    """The decoder module that owns ``layers`` and ``rotary_emb`` (LlamaModel and friends)."""
    for module in _base_model(model).modules():
        if hasattr(module, "layers") and hasattr(module, "rotary_emb"):
            return module
    raise ValueError(f"msattn: cannot find a decoder with `layers` and `rotary_emb` in {type(model).__name__}")


def _attention_modules(decoder):
    return [layer.self_attn for layer in decoder.layers]


def model_config(model) -> MSConfig:
    """The MSConfig a model was patched with; raises if it is not patched."""
    for module in _base_model(model).modules():
        state = getattr(module, "_msattn", None)
        if state is not None:
            return state.config
    raise ValueError("msattn: the model is not patched; call msattn.hf.patch(model) first")


def _prepare_cache_with_ms(base, block_k):
    """generate()'s cache preparation, giving a new MSCache where it would give a DynamicCache."""
    original = type(base)._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get("past_key_values")
        result = original(base, generation_config, model_kwargs, *args, **kwargs)
        if user_cache is None and type(model_kwargs.get("past_key_values")) is DynamicCache:
            model_kwargs["past_key_values"] = MSCache(block_k=block_k)
        return result

    return prepare


def check_model(model, who: str, method: str | None,
                supported: tuple[str, ...] = SUPPORTED_MODEL_TYPES) -> tuple[nn.Module, int]:
    """``(base model, head dim)`` after the checks every ``patch`` makes of a model: a type in ``supported``,
    query heads a multiple of the key/value heads, a head dim the kernels take, and (unless ``method``
    is None: it handles them) no sliding window. ``who`` opens the error messages."""
    base = _base_model(model)
    mconf = base.config
    model_type = getattr(mconf, "model_type", None)
    if model_type not in supported:
        raise ValueError(f"{who}: model type {model_type!r} is not supported; supported: {', '.join(supported)}")
    if (method is not None and getattr(mconf, "sliding_window", None) is not None
            and getattr(mconf, "use_sliding_window", True)):
        raise ValueError(f"{who}: the model attends within a sliding window of {mconf.sliding_window} tokens, which "
                         f"{method} does not implement (it bounds the work otherwise); set "
                         "model.config.sliding_window = None to patch it")
    heads = mconf.num_attention_heads
    kv_heads = getattr(mconf, "num_key_value_heads", None) or heads
    head_dim = getattr(mconf, "head_dim", None) or mconf.hidden_size // heads
    if heads % kv_heads != 0:
        raise ValueError(f"{who}: {heads} query heads are not a multiple of {kv_heads} key/value heads")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"{who}: head dim {head_dim} is outside the kernels' range 1..256")
    return base, head_dim


def patch(model, config: MSConfig | None = None, rope: nn.Module | None = None, *, method: str = "ms", **options):
    """Switch a causal LM to MS attention (or a peer method), in place.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``, or a PEFT
            model wrapping one (patching before or after PEFT both work).
        config: the MS parameters and the layers that use them (default ``MSConfig()``).
        rope: a rotary embedding module to install in place of the model's (HF's
            ``forward(x, position_ids) -> (cos, sin)`` contract), e.g. ``msattn.rope.CRDNTKRotaryEmbedding``.
        method: ``"ms"``; or ``"self_extend"`` with ``group_size=``, ``window=`` (training-free
            SelfExtend, :mod:`msattn.self_extend_hf`); or ``"infini"`` with ``segment_len=`` and
            optionally ``delta_rule=`` (Infini-attention, :mod:`msattn.infini_hf`).
    Returns:
        the same model, patched. ``msattn.hf.unpatch(model)`` restores it.
    """
    if method in PEER_METHODS:
        if config is not None or rope is not None:
            raise ValueError(f"msattn.hf.patch: method={method!r} takes its own options, not an MSConfig or rope")
        return PEER_METHODS[method][0](model, **options)
    if method != "ms":
        raise ValueError(f"msattn.hf.patch: unknown method {method!r}; known: ms, {', '.join(PEER_METHODS)}")
    if options:
        raise TypeError(f"msattn.hf.patch: unexpected options for method='ms': {', '.join(options)}")
    config = MSConfig() if config is None else config
    if not isinstance(config, MSConfig):
        raise TypeError(f"msattn.hf.patch: config must be an msattn.MSConfig, got {type(config).__name__}")
    base, head_dim = check_model(model, "msattn.hf.patch", "MS attention")
    mconf = base.config
    if getattr(base, "_msattn_saved", None) is not None:
        raise RuntimeError("msattn.hf.patch: the model is already patched; call msattn.hf.unpatch(model) first")
    decoder = _decoder(model)
    n_layers = len(decoder.layers)
    if config.layers is not None and any(i >= n_layers for i in config.layers):
        raise ValueError(f"msattn.hf.patch: MSConfig.layers {list(config.layers)} names layers beyond the "
                         f"model's {n_layers}")

    register()
    base._msattn_saved = (mconf._attn_implementation, decoder.rotary_emb)
    rotary = rope if rope is not None else decoder.rotary_emb
    selected = None
    if config.rope == "selected":
        selected = SelectedRotary(rotary, config, head_dim)
        rotary = selected
    decoder.rotary_emb = rotary
    for i, attn in enumerate(_attention_modules(decoder)):
        dense = config.layers is not None and i not in config.layers
        attn._msattn = _LayerState(config, dense, selected)
    base._prepare_cache_for_generation = _prepare_cache_with_ms(base, config.block_k)
    base.set_attn_implementation(NAME)
    return model


def patched_method(model) -> str | None:
    """The method ``patch`` switched the model to (``"ms"`` or a peer method's name), or None."""
    base = _base_model(model)
    for name, (_, _, marker) in PEER_METHODS.items():
        if getattr(base, marker, None) is not None:
            return name
    return "ms" if getattr(base, "_msattn_saved", None) is not None else None


def unpatch(model):
    """Restore the attention implementation and rotary embedding that ``patch`` replaced (any method)."""
    method = patched_method(model)
    if method is None:
        raise RuntimeError("msattn.hf.unpatch: the model is not patched")
    if method != "ms":
        return PEER_METHODS[method][1](model)
    base = _base_model(model)
    impl, rotary = base._msattn_saved
    decoder = _decoder(model)
    decoder.rotary_emb = rotary
    for attn in _attention_modules(decoder):
        if hasattr(attn, "_msattn"):
            del attn._msattn
    base.set_attn_implementation(impl)
    base._msattn_saved = None
    del base._prepare_cache_for_generation
    return model


def _self_extend_patch(model, **options):
    from .self_extend_hf import patch_self_extend

    return patch_self_extend(model, **options)


def _self_extend_unpatch(model):
    from .self_extend_hf import unpatch_self_extend

    return unpatch_self_extend(model)


def _infini_patch(model, **options):
    from .infini_hf import patch_infini

    return patch_infini(model, **options)


def _infini_unpatch(model):
    from .infini_hf import unpatch_infini

    return unpatch_infini(model)


# method -> (patch, unpatch, the attribute a patched base model carries)
PEER_METHODS = {
    "self_extend": (_self_extend_patch, _self_extend_unpatch, "_msattn_self_extend_saved"),
    "infini": (_infini_patch, _infini_unpatch, "_msattn_infini_saved"),
}
