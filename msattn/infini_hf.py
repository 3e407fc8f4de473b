"""HuggingFace integration of Infini-attention (arXiv 2404.07143, DESIGN section 3).

``patch_infini(model, segment_len)`` switches a Llama / Mistral / Qwen2 causal LM to Infini-attention
through transformers' attention registry (``"msattn_infini"`` in ``AttentionInterface`` and
``AttentionMaskInterface``; no attention class is patched) and gives every attention module a learned
gate; ``unpatch_infini(model)`` restores the model.

What a patched layer computes. The sequence is cut into segments of ``segment_len`` positions (absolute
positions, from 0). Each segment attends causally to itself and retrieves from a compressive memory of
all the segments before it, mixed by ``sigmoid(beta)`` per query head (:func:`msattn.infini_attention`).
The attention function walks the segments in order, carrying the memory ``(M, z)`` from one to the
next inside the forward: activation memory is O(segment_len) per segment (the kernel is flash-style;
no (N, N) or even (segment, segment) score matrix exists), and backpropagation runs through the
memory across segments. The memory is per key/value head (shared by its query heads under GQA),
float32, and holds the keys as the model hands them to attention (after RoPE).

The gate. ``attn.infini_gate`` is a tiny module holding ``beta`` ``(num_attention_heads,)`` as an
``nn.Parameter``, so it is part of ``model.parameters()`` (the HF Trainer trains it) and can be named
in PEFT's ``LoraConfig(modules_to_save=["infini_gate"])`` (PEFT then trains and saves a copy; a bare
parameter on the attention module could only be saved by wrapping the whole attention module). It
starts at ``beta = -3`` (``sigmoid(-3) = 0.047``): a pretrained model patched this way behaves almost
as its own attention restricted to the segment, so fine-tuning starts from a working model, while the
memory path still gets ``g * (1 - g) = 0.045`` of the gradient and can grow as it becomes useful.
``beta = 0`` would mix in half of an untrained memory at step 0; ``beta = -10`` would starve the gate
of gradient.

Generation. ``generate()`` of a patched model uses an :class:`InfiniCache`: each layer keeps only the
keys and values of the current, incomplete segment plus the memory of all complete segments, so the
cache is O(segment_len + D^2) per layer whatever the length. A decoding step attends locally within
the current segment and retrieves from the memory; when a segment completes, the call that completes
it writes it to the memory and the next step drops its keys. The layer passes its state to the
attention function on the key tensor it returns (``key._infini_layer``). With any other cache (for
example the ``DynamicCache`` that ``model(..., use_cache=True)`` creates), the attention function sees
all past keys and rebuilds the memory of the complete past segments from them on every call: correct,
but O(N) per step.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from .functional import infini_attention
from .hf import _attention_modules, _base_model, _decoder, check_model, padding_mask, patched_state

__all__ = ["GATE_INIT", "InfiniCache", "InfiniGate", "InfiniLayer", "patch_infini", "register", "unpatch_infini"]

NAME = "msattn_infini"
GATE_INIT = -3.0


class InfiniGate(nn.Module):
    """The gate logits ``beta`` ``(heads,)`` of one attention layer; ``forward()`` returns them.

    A module of its own so that PEFT's ``modules_to_save=["infini_gate"]`` can train and save it; the
    attention function calls it (through PEFT's wrapper when there is one) to read the active copy.
    """

    def __init__(self, heads: int, init: float = GATE_INIT, dtype=None, device=None):
        super().__init__()
        self.beta = nn.Parameter(torch.full((heads,), float(init), dtype=dtype or torch.float32, device=device))

    def forward(self) -> torch.Tensor:
        return self.beta

    def extra_repr(self) -> str:
        return f"heads={self.beta.shape[0]}"


class _InfiniState:
    """What a patched attention module carries besides its gate."""

    def __init__(self, segment_len: int, delta_rule: bool):
        self.segment_len = segment_len
        self.delta_rule = delta_rule


# ---------------------------------------------------------------------------------------------
# the cache

class InfiniLayer(DynamicLayer):
    """One layer of an :class:`InfiniCache`.

    ``keys``/``values`` ``(B, Hkv, length - start, D)`` hold positions ``[start, length)``: the current
    segment (``start`` is a multiple of ``segment_len``), plus the tokens of the latest call when they
    run past it. ``memory`` ``(B, Hkv, D, D)`` and ``norm`` ``(B, Hkv, D)`` (float32, or None before the
    first complete segment) hold positions ``[0, folded)``, written by the attention function.
    """

    def __init__(self, segment_len: int):
        super().__init__()
        self.segment_len = segment_len
        self.start = self.length = self.folded = 0
        self.memory = self.norm = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, Hkv, n, D)`` keys and values; returns those of ``[start, length)``, ``start``
        being the beginning of the segment that holds the first new token."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keep = self.length // self.segment_len * self.segment_len
        if keep > self.start:  # complete segments already in the memory: drop their keys
            self.keys = self.keys[:, :, keep - self.start:]
            self.values = self.values[:, :, keep - self.start:]
            self.start = keep
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.length += key_states.shape[-2]
        self.keys._infini_layer = weakref.ref(self)  # how the attention function finds the memory (weak: no cycle)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        self.start = self.length = self.folded = 0
        self.memory = self.norm = None

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        if max_length >= self.length:
            return
        if max_length < self.start:
            raise ValueError(f"InfiniLayer.crop: cannot go back to {max_length} tokens: the segments before "
                             f"{self.start} are already written to the compressive memory")
        self.keys = self.keys[:, :, :max_length - self.start]
        self.values = self.values[:, :, :max_length - self.start]
        self.length = max_length

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.keys is None or not self.is_initialized:
            return
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        if self.memory is not None:
            self.memory, self.norm = self.memory.index_select(0, index), self.norm.index_select(0, index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None and self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))


class InfiniCache(Cache):
    """A transformers ``Cache`` of :class:`InfiniLayer` s: per layer, the current segment's keys and
    values and the compressive memory of the segments before it.

    Args:
        segment_len: the segment length of the patched model.
    """

    def __init__(self, segment_len: int):
        if not isinstance(segment_len, int) or segment_len < 1:
            raise ValueError(f"InfiniCache: segment_len must be a positive int, got {segment_len!r}")
        super().__init__(layer_class_to_replicate=partial(InfiniLayer, segment_len=segment_len))
        self.segment_len = segment_len


# ---------------------------------------------------------------------------------------------
# the registry entries

def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """The attention function of ``"msattn_infini"`` (transformers' AttentionInterface contract).

    Args:
        query: ``(B, Hq, Nq, D)``, the last ``Nq`` positions; key, value: ``(B, Hkv, n, D)``: all
            positions, or those from ``layer.start`` on for an :class:`InfiniLayer`.
        attention_mask: bool ``(B, N)`` key padding mask over all ``N`` positions, or None.
    Returns:
        ``(out (B, Nq, Hq, D), None)``.
    """
    state = patched_state(module, "_msattn_infini", "Infini-attention", NAME,
                          "msattn.infini_hf.patch_infini(model, segment_len)", attention_mask, dropout,
                          kwargs.get("sliding_window"))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    seg, nq, nk = state.segment_len, query.shape[2], key.shape[2]
    beta = module.infini_gate()
    layer = getattr(key, "_infini_layer", None)
    layer = layer() if layer is not None else None
    if layer is not None:
        start, total, memory, norm = layer.start, layer.length, layer.memory, layer.norm
        if layer.folded != start:
            raise RuntimeError(f"msattn: the Infini cache layer holds a memory of {layer.folded} tokens but its keys "
                               f"start at {start}; was a call skipped?")
    else:
        start, total, memory, norm = 0, nk, None, None
    if total - start != nk:
        raise RuntimeError(f"msattn: got {nk} keys for positions [{start}, {total})")
    mask = None if attention_mask is None else attention_mask[:, -nk:]
    first = total - nq  # absolute position of the first query
    kw = dict(delta_rule=state.delta_rule, causal=causal, scale=scaling)

    def piece(x, a, e):
        return x[:, :, a - start:e - start]

    def segment_mask(a, e):
        return None if mask is None else mask[:, a - start:e - start]

    # a cache without memory (DynamicCache): rebuild it from the past keys it holds
    for a in range(start, first // seg * seg, seg):
        _, (memory, norm) = infini_attention(query[:, :, :0], piece(key, a, a + seg), piece(value, a, a + seg), beta,
                                             memory, norm, key_padding_mask=segment_mask(a, a + seg), **kw)
    outs = []
    for a in range(first // seg * seg, total, seg):
        e = min(a + seg, total)
        complete = e == a + seg
        out, (new_memory, new_norm) = infini_attention(
            query[:, :, max(a, first) - first:e - first], piece(key, a, e), piece(value, a, e), beta, memory, norm,
            key_padding_mask=segment_mask(a, e), update_memory=complete, **kw)
        outs.append(out)
        if complete:
            memory, norm = new_memory, new_norm
    if layer is not None:
        layer.memory, layer.norm, layer.folded = memory, norm, total // seg * seg
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2), None


def register() -> None:
    """Add ``"msattn_infini"`` to transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


# ---------------------------------------------------------------------------------------------
# patching

def _prepare_cache_with_infini(base, segment_len):
    """generate()'s cache preparation, giving a new InfiniCache where it would give a DynamicCache."""
    original = type(base)._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get("past_key_values")
        result = original(base, generation_config, model_kwargs, *args, **kwargs)
        if user_cache is None and type(model_kwargs.get("past_key_values")) is DynamicCache:
            model_kwargs["past_key_values"] = InfiniCache(segment_len)
        return result

    return prepare


def patch_infini(model, segment_len: int, delta_rule: bool = False, gate_init: float = GATE_INIT):
    """Switch a causal LM to Infini-attention, in place.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``, or a PEFT model
            wrapping one (to train the gates under PEFT, patch first and pass
            ``modules_to_save=["infini_gate"]`` to ``LoraConfig``).
        segment_len: positions per segment; local attention stays within a segment.
        delta_rule: write the memory with the delta rule instead of the linear update.
        gate_init: the initial gate logit of every head (default -3: mostly local, see the module doc).
    Returns:
        the same model, patched: every attention module has an ``infini_gate`` (trainable ``beta`` per
        query head). ``unpatch_infini(model)`` restores it (and drops the gates).
    """
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"patch_infini: segment_len must be a positive int, got {segment_len!r}")
    base, _ = check_model(model, "patch_infini", "Infini-attention")
    mconf = base.config
    heads = mconf.num_attention_heads
    if getattr(base, "_msattn_infini_saved", None) is not None or getattr(base, "_msattn_saved", None) is not None:
        raise RuntimeError("patch_infini: the model is already patched; unpatch it first")

    register()
    base._msattn_infini_saved = mconf._attn_implementation
    for attn in _attention_modules(_decoder(model)):
        weight = attn.q_proj.weight
        attn.infini_gate = InfiniGate(heads, gate_init, dtype=weight.dtype, device=weight.device)
        attn._msattn_infini = _InfiniState(segment_len, bool(delta_rule))
    base._prepare_cache_for_generation = _prepare_cache_with_infini(base, segment_len)
    base.set_attn_implementation(NAME)
    return model


def unpatch_infini(model):
    """Restore the attention implementation that ``patch_infini`` replaced and remove the gates."""
    base = _base_model(model)
    saved = getattr(base, "_msattn_infini_saved", None)
    if saved is None:
        raise RuntimeError("unpatch_infini: the model is not patched with patch_infini")
    for attn in _attention_modules(_decoder(model)):
        for name in ("infini_gate", "_msattn_infini"):
            if hasattr(attn, name):
                delattr(attn, name)
    base.set_attn_implementation(saved)
    base._msattn_infini_saved = None
    del base._prepare_cache_for_generation
    return model
