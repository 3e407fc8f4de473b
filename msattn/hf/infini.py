"""HuggingFace integration of Infini-attention (arXiv 2404.07143, DESIGN section 3).

``msattn.hf.patch(model, InfiniConfig(segment_len=...))`` switches a Llama / Mistral / Qwen2 causal LM
to Infini-attention through transformers' attention registry (``"msattn_infini"``; no attention class
is patched) and gives every attention module a learned gate; ``msattn.hf.unpatch(model)`` restores
the model and drops the gates.

What a patched layer computes. The sequence is cut into segments of ``segment_len`` positions (absolute
positions, from 0). Each segment attends causally to itself and retrieves from a compressive memory of
all the segments before it, mixed by ``sigmoid(beta)`` per query head (:func:`msattn.infini_attention`).
The attention function walks the segments in order, carrying the memory ``(M, z)`` from one to the
next inside the forward: activation memory is O(segment_len) per segment (the kernel is flash-style;
no (N, N) or even (segment, segment) score matrix exists), and backpropagation runs through the
memory across segments. The memory is per key/value head (shared by its query heads under GQA),
float32, and holds the keys as the model hands them to attention (see Positions).

Positions. By default the attention function receives q and k rotated at their absolute positions,
and the memory holds them so. With ``InfiniConfig(unrotated_memory=True)`` the model's rotary
embedding is wrapped (:class:`msattn.hf.common.UnrotatedRotary`): q and k arrive un-rotated, the kernel
rotates them with their positions inside the segment for the local attention (the same relative
angles, so the local attention is unchanged) and the memory stores and retrieves them un-rotated: a
key written 10 or 10,000 segments back is retrieved alike, and no position beyond ``segment_len`` is
ever used, whatever the length.

The gate. ``attn.infini_gate`` is a tiny module holding ``beta`` ``(num_attention_heads,)`` as an
``nn.Parameter``, so it is part of ``model.parameters()`` (the HF Trainer trains it) and can be named
in PEFT's ``LoraConfig(modules_to_save=["infini_gate"])`` (PEFT then trains and saves a copy; a bare
parameter on the attention module could only be saved by wrapping the whole attention module). It
starts at ``InfiniConfig.gate_init = -3`` (``sigmoid(-3) = 0.047``): a pretrained model patched this way behaves almost
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

import torch
import torch.nn.functional as F
from torch import nn

from ..config import InfiniConfig
from ..functional import infini_attention
from .cache import InfiniCache, memory_only
from .common import Method, cache_argument, call_record, padding_mask, record

__all__ = ["METHOD", "InfiniGate", "attention_forward", "train_by_segments"]


class InfiniGate(nn.Module):
    """The gate logits ``beta`` ``(heads,)`` of one attention layer; ``forward()`` returns them.

    A module of its own so that PEFT's ``modules_to_save=["infini_gate"]`` can train and save it; the
    attention function calls it (through PEFT's wrapper when there is one) to read the active copy.
    """

    def __init__(self, heads: int, init: float = InfiniConfig.gate_init, dtype=None, device=None):
        super().__init__()
        self.beta = nn.Parameter(torch.full((heads,), float(init), dtype=dtype or torch.float32, device=device))

    def forward(self) -> torch.Tensor:
        return self.beta

    def extra_repr(self) -> str:
        return f"heads={self.beta.shape[0]}"


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
    rec = call_record(module, METHOD, attention_mask, dropout, kwargs.get("sliding_window"))
    state = rec.config
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
    if rec.rotary is not None:  # unrotated_memory: the local attention's positions are 0..seg-1
        kw["rotary"] = rec.rotary.tables(seg, query.device)

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


def train_by_segments(model, input_ids: torch.Tensor, labels: torch.Tensor, *,
                      horizon: int | None = None) -> torch.Tensor:
    """One training step's forward and backward, ``horizon`` segments at a time (truncated
    backpropagation through the compressive memory).

    The sequence is fed to the model in windows of ``horizon * segment_len`` tokens against one
    :class:`InfiniCache`, which carries the memory from window to window; each window's loss is
    backpropagated at once (gradients accumulate in ``.grad``, as under gradient accumulation), so
    activations are held for one window only, and the memory is then detached
    (:meth:`InfiniCache.detach_`): gradients flow through the memory across the segments of a window and
    stop at its start. ``horizon=None`` (or at least the number of segments) is one window: the loss
    and gradients of ``model(input_ids, labels=labels)`` (up to rounding); ``horizon=1`` writes
    each segment's memory with no gradient from later segments.

    Args:
        model: a causal LM patched with Infini-attention (``msattn.hf.patch``), in train mode.
        input_ids: ``(B, N)`` token ids; batches of unequal lengths are right-padded (padding only
            follows real tokens, so it changes none of their results) with labels -100 there.
        labels: ``(B, N)``, transformers' convention: position ``t``'s logits are scored against
            ``labels[:, t + 1]``, -100 is ignored; the loss is the mean over all scored positions.
        horizon: segments per window, a positive int, or None for the whole sequence.
    Returns:
        the loss of the whole sequence (detached, a 0-dim float32 tensor).
    """
    rec = record(model)
    if rec is None or rec.method is not METHOD:
        raise ValueError("train_by_segments: the model must be patched with Infini-attention "
                         "(msattn.hf.patch(model, InfiniConfig(...)))")
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"train_by_segments: input_ids and labels must be (batch, tokens) of one shape, got "
                         f"{tuple(input_ids.shape)} and {tuple(labels.shape)}")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"train_by_segments: horizon must be a positive int (segments) or None, got {horizon!r}")
    n = input_ids.shape[1]
    window = n if horizon is None else horizon * rec.config.segment_len
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
    count = (targets != -100).sum().clamp_min(1)
    cache, name = InfiniCache(rec.config.segment_len), cache_argument(model)
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, n, window):
        end = min(start + window, n)
        positions = torch.arange(start, end, device=input_ids.device)[None]
        logits = model(input_ids[:, start:end], position_ids=positions, use_cache=True, **{name: cache}).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, start:end].flatten(), ignore_index=-100,
                               reduction="sum") / count
        loss.backward()
        total += loss.detach().cpu()
        cache.detach_()
    return total


def _install(attn: nn.Module, config: InfiniConfig) -> None:
    weight = attn.q_proj.weight
    attn.infini_gate = InfiniGate(attn.config.num_attention_heads, config.gate_init, dtype=weight.dtype, device=weight.device)


def _uninstall(attn: nn.Module) -> None:
    del attn.infini_gate


def _unrotated(config: InfiniConfig) -> bool:
    return config.unrotated_memory


def _new_cache(config: InfiniConfig, capacity: int = 0, kv_dir=None) -> InfiniCache:  # one segment: no capacity
    memory_only("Infini-attention's InfiniCache", kv_dir)
    return InfiniCache(config.segment_len)


METHOD = Method(
    name="infini",
    config=InfiniConfig,
    attn_implementation="msattn_infini",
    attention=attention_forward,
    mask=padding_mask,
    model_types=("llama", "mistral", "qwen2"),
    sliding_window=False,
    unrotated=_unrotated,
    new_cache=_new_cache,
    install=_install,
    uninstall=_uninstall,
)
