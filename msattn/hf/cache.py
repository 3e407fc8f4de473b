"""The caches of msattn's methods, and chunked prefill (DESIGN section 2): the one home of the cache
contract (transformers' ``Cache``/``CacheLayerMixin``: ``update``, ``get_seq_length``, ``crop`` with a
positive length to keep or a negative number of tokens to drop, ``reset``, ``reorder_cache`` and the
batch operations of beam search and contrastive search).

``MSCache`` is a transformers ``Cache`` whose layers keep K and V (in buffers that grow by doubling, so
appending is amortised O(1); in memory, or with ``kv_dir`` in files mapped into memory) plus, per key
region of ``block_k`` tokens, the float32 sum of its valid keys and their count: ``1 / (2 * block_k)``
of a float32 KV cache, ``1 / block_k`` of a 16-bit one.
A decode step then scores the query against every region from the sums (``N / block_k`` dot products)
and reads K and V only for the regions it selects and its own group: ``O(N/CK * D + (topk*CK + window)
* D)`` instead of ``O(N * D)``. The sums are appended token by token in position order by the same
C (or CUDA) arithmetic that computes them from scratch, so a decode step's selection
equals the op's on the whole sequence, bit for bit. Patched models use it in ``generate()``.

``prefill(model, input_ids, chunk_size=...)`` runs a prompt of any length chunk by chunk against the
cache: activation memory is bounded by the chunk, and with chunk boundaries on group boundaries the
result equals a single call. It runs any model, patched or not, with the cache of its method
(:func:`new_cache`).

``InfiniCache`` keeps, per layer, only the keys and values of the current segment plus the compressive
memory of all complete segments (O(segment_len + D^2) per layer whatever the length).
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import weakref
from collections.abc import Callable
from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..ops import ops
from .common import base_model, cache_argument, decoder, record

__all__ = ["InfiniCache", "InfiniLayer", "LOGITS_BYTES", "MSCache", "MSLayer", "mapped_empty", "memory_only",
           "new_cache", "prefill"]

LOGITS_BYTES = 64 * 2 ** 20  # prefill's on_logits slices: about this much float32 logits at a time


class _RowLayer(DynamicLayer):
    """A cache layer whose batch operations (beam search's reordering, contrastive search's selection
    and repetition) all go through ``_select_batch(index)``, which keeps every per-row tensor in step."""

    def _select_batch(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None and self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype, directory: str) -> tuple[torch.Tensor, mmap.mmap]:
    """An uninitialised CPU tensor of at least one element whose memory is a file in ``directory`` mapped
    into the process (shared mapping), and the mapping. The file's blocks are reserved at once (a full disk
    raises here, not as a crash at a later write) and its name is unlinked at once: it lives as long as the
    tensor. The mapping is advised random access (``MADV_RANDOM``): MS attention reads a few 4 KiB
    regions here and there, and a fault on a page no longer in the page cache would otherwise read the
    pages around it too (the device's read-ahead: 8 MiB on the development machine's disk, where 2,000
    random pages of an evicted 2 GiB file read 2,004 MiB by default and 8 MiB advised random)."""
    nbytes = math.prod(shape) * dtype.itemsize
    fd, path = tempfile.mkstemp(prefix="msattn-kv-", dir=directory)
    try:
        os.unlink(path)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise OSError(e.errno, f"MSCache: cannot reserve {nbytes:,} bytes of keys and values in kv_dir "
                                   f"{directory!r}: {e.strerror}") from None
        mapping = mmap.mmap(fd, nbytes)
        mapping.madvise(mmap.MADV_RANDOM)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=dtype, count=math.prod(shape)).view(shape), mapping


class MSLayer(_RowLayer):
    """One layer of an :class:`MSCache`.

    Holds ``keys``/``values`` ``(B, Hkv, length, D)`` (views of larger buffers: in memory, or with
    ``kv_dir`` in files mapped into memory) and the region sums of the first ``summed`` keys, always in
    memory: float32 ``(B, Hkv, NKcap, D)`` and int32 counts ``(B, Hkv, NKcap)``.
    """

    def __init__(self, block_k: int = 16, capacity: int = 0, kv_dir: str | None = None):
        super().__init__()
        self.block_k = block_k
        self.capacity = capacity
        self.kv_dir = kv_dir
        self.length = 0
        self.summed = 0
        self._k = self._v = self._sums = self._counts = None
        self._mappings: tuple[mmap.mmap, ...] = ()

    def _empty(self, shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, tuple[mmap.mmap, ...]]:
        """An uninitialised K or V buffer of ``like``'s dtype and device, and the mappings it lives in."""
        if self.kv_dir is None or math.prod(shape) == 0:  # (an empty batch: nothing to map)
            return like.new_empty(shape), ()
        if like.device.type != "cpu":
            raise ValueError(f"MSCache: kv_dir keeps keys and values in files mapped into CPU memory, but this "
                             f"model's keys are on {like.device}; use kv_dir=None on an accelerator")
        tensor, mapping = mapped_empty(shape, like.dtype, self.kv_dir)
        return tensor, (mapping,)

    def release(self) -> None:
        """Unmap the pages of a ``kv_dir`` layer's keys and values from the process (their data stays in the
        files and the page cache, which the kernel writes back and evicts as it needs): what bounds the
        resident memory of a long cache to the layers in use. A no-op in memory."""
        for mapping in self._mappings:
            mapping.madvise(mmap.MADV_DONTNEED)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, n: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = 0 if self._k is None else self._k.shape[2]
        if n <= cap:
            return
        # the first allocation takes the cache's capacity when it suffices; beyond it, doubling
        cap = max(n, 256, self.capacity if n <= self.capacity else 2 * cap)
        B, H, _, D = like_k.shape
        k, k_map = self._empty((B, H, cap, D), like_k)
        v, v_map = self._empty((B, H, cap, like_v.shape[3]), like_v)
        nk = math.ceil(cap / self.block_k)
        sums = torch.zeros((B, H, nk, D), dtype=torch.float32, device=like_k.device)
        counts = torch.zeros((B, H, nk), dtype=torch.int32, device=like_k.device)
        if self._k is not None:
            k[:, :, :self.length] = self._k[:, :, :self.length]
            v[:, :, :self.length] = self._v[:, :, :self.length]
            sums[:, :, :self._sums.shape[2]] = self._sums
            counts[:, :, :self._counts.shape[2]] = self._counts
        self._k, self._v, self._sums, self._counts = k, v, sums, counts
        self._mappings = k_map + v_map

    def _publish(self) -> None:
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]
        # lets msattn's attention function find the region sums; a weak reference, so that the cache is
        # freed as soon as it is dropped (a strong one would make a cycle that only the cyclic GC frees)
        self.keys._msattn_layer = weakref.ref(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(B, Hkv, n, D)`` keys and values; returns all ``length`` of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._reserve(self.length + n, key_states, value_states)
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._publish()
        return self.keys, self.values

    def region_sums(self, key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums and counts of all ``length`` keys, appending those not yet summed.

        Args:
            key_padding_mask: bool ``(B, length)`` (True = real token) or None. Padding never changes
                once seen, so each key is summed once, with the mask of the call that first sees it.
        """
        if self.summed < self.length:
            mask = None if key_padding_mask is None else key_padding_mask[:, self.summed:self.length].contiguous()
            ops.ms_region_sums_append_(self._sums, self._counts, self._k[:, :, self.summed:self.length], mask,
                                       self.summed, self.block_k)
            self.summed = self.length
        return self._sums, self._counts

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = self.summed = 0
        self._k = self._v = self._sums = self._counts = None
        self._mappings = ()
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative ``max_length`` drops the last ``-max_length``."""
        if not self.is_initialized:
            return
        if max_length < 0:
            max_length = max(0, self.length + max_length)
        if max_length >= self.length:
            return
        self.length = max_length
        # the region holding the new end is summed again from its start
        self.summed = min(self.summed, self.length // self.block_k * self.block_k)
        self._publish()

    def _select_batch(self, index: torch.Tensor) -> None:
        if self._k is None:
            return
        index = index.to(self._k.device)
        (k, k_map), (v, v_map) = (self._empty((len(index), *x.shape[1:]), x) for x in (self._k, self._v))
        self._k = torch.index_select(self._k, 0, index, out=k)
        self._v = torch.index_select(self._v, 0, index, out=v)
        self._sums, self._counts = self._sums.index_select(0, index), self._counts.index_select(0, index)
        self._mappings = k_map + v_map
        self._publish()


class MSCache(Cache):
    """A transformers ``Cache`` of :class:`MSLayer` s, one per decoder layer, created as layers first write.

    Args:
        block_k: the key region size of the model's MS attention (``MSConfig.block_k``).
        capacity: the number of tokens the cache will hold when known (a prompt and the tokens to be
            generated), or 0: each layer allocates it at its first write, so a cache that stays within it
            is never copied into a larger buffer (doubling just past the end of a prompt holds twice its
            size, and three times a layer's while copying it). Beyond it the buffers grow by doubling.
        kv_dir: None (keys and values in memory), or an existing directory: each layer's keys and values
            then live in unlinked files there, mapped into memory (CPU only), and a layer's pages are
            unmapped from the process (:meth:`MSLayer.release`) when the next layer writes. The process
            then holds the region sums (``1 / block_k`` of a 16-bit cache) and the pages of about one layer;
            the rest is the kernel's page cache, written back to the disk and evicted under memory pressure.
            A decode step reads the regions it selects; a prefill chunk reads those its groups select.
            For caches larger than the memory: SmolLM2-135M's 1M tokens are 22.5 GiB of bfloat16.
    """

    def __init__(self, block_k: int = 16, capacity: int = 0, kv_dir: str | os.PathLike | None = None):
        if not isinstance(block_k, int) or block_k < 1:
            raise ValueError(f"MSCache: block_k must be a positive int, got {block_k!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"MSCache: capacity must be a non-negative int (tokens), got {capacity!r}")
        if kv_dir is not None:
            if not isinstance(kv_dir, (str, os.PathLike)) or not os.path.isdir(kv_dir):
                raise ValueError(f"MSCache: kv_dir must be an existing directory or None, got {kv_dir!r}")
            kv_dir = os.fspath(kv_dir)
        super().__init__(layer_class_to_replicate=partial(MSLayer, block_k=block_k, capacity=capacity,
                                                          kv_dir=kv_dir))
        self.block_k = block_k
        self.capacity = capacity
        self.kv_dir = kv_dir
        self._in_use: int | None = None  # the layer whose mapped pages the process holds (kv_dir)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append to layer ``layer_idx`` (transformers' contract); with ``kv_dir``, first release the pages of
        the layer that wrote before it: its attention is done."""
        if self.kv_dir is not None:
            if self._in_use is not None and self._in_use != layer_idx:
                self.layers[self._in_use].release()
            self._in_use = layer_idx
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class InfiniLayer(_RowLayer):
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
        self._publish()
        return self.keys, self.values

    def _publish(self) -> None:
        """How the attention function finds the memory: a weak reference (no cycle) on the key tensor."""
        if self.keys is not None:
            self.keys._infini_layer = weakref.ref(self)

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

    STATE = ("keys", "values", "memory", "norm")

    def detach_(self) -> None:
        """Cut the autograd graph here: later calls read the same values, but no gradient flows back
        through them into the calls before (truncated backpropagation through the memory)."""
        for name in self.STATE:
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x.detach())
        self._publish()

    def state_dict(self) -> dict:
        """``start``, ``length``, ``folded`` and the (detached) keys, values, memory and norm."""
        tensors = {name: getattr(self, name) for name in self.STATE}
        return {"start": self.start, "length": self.length, "folded": self.folded,
                **{name: None if x is None else x.detach() for name, x in tensors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.length, self.folded = int(state["start"]), int(state["length"]), int(state["folded"])
        for name in self.STATE:
            setattr(self, name, state[name])
        self.is_initialized = self.keys is not None
        if self.is_initialized:
            self.dtype, self.device = self.keys.dtype, self.keys.device
        self._publish()


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

    def detach_(self) -> None:
        """Cut the autograd graph of every layer (:meth:`InfiniLayer.detach_`): the boundary of a window
        of truncated backpropagation (:func:`msattn.hf.infini.train_by_segments`)."""
        for layer in self.layers:
            layer.detach_()

    def state_dict(self) -> dict:
        """Everything the cache holds, as tensors and ints (``torch.save`` it): per layer the current
        segment's keys and values and the compressive memory. :meth:`from_state_dict` continues from it
        exactly as the uninterrupted cache would."""
        return {"segment_len": self.segment_len, "layers": [layer.state_dict() for layer in self.layers]}

    @classmethod
    def from_state_dict(cls, state: dict) -> InfiniCache:
        """The cache :meth:`state_dict` described (tensors on the device they were saved from or loaded to)."""
        cache = cls(state["segment_len"])
        for saved in state["layers"]:
            layer = InfiniLayer(cache.segment_len)
            layer.load_state_dict(saved)
            cache.layers.append(layer)
        return cache


# ---------------------------------------------------------------------------------------------
# chunked prefill

def new_cache(model, capacity: int = 0, kv_dir: str | os.PathLike | None = None) -> Cache:
    """The cache of the model's method: an :class:`MSCache` for MS attention, an :class:`InfiniCache` for
    Infini-attention, a full ``DynamicCache`` for SelfExtend (it needs every key's slot, also under a
    sliding window), and transformers' ``DynamicCache`` for the model's config when it is not patched.
    ``capacity``: the tokens it will hold when known, or 0 (a hint; see :class:`MSCache`). ``kv_dir``: keep
    the keys and values in files mapped into memory (MS attention only; see :class:`MSCache`)."""
    rec = record(model)
    if rec is None:
        memory_only("an unpatched model's DynamicCache", kv_dir)
        return DynamicCache(config=base_model(model).config)
    return rec.method.new_cache(rec.config, capacity, kv_dir)


def memory_only(cache: str, kv_dir) -> None:
    """Raise for a ``kv_dir`` given to a cache that keeps its keys and values in memory."""
    if kv_dir is not None:
        raise ValueError(f"kv_dir: only MS attention's cache (MSCache) keeps keys and values in mapped files; "
                         f"{cache} keeps them in memory: pass kv_dir=None, got {kv_dir!r}")


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, *, chunk_size: int | None = 16384,
            attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
            on_logits: Callable[[int, torch.Tensor], None] | None = None,
            on_chunk: Callable[[int, int], None] | None = None):
    """Run a prompt of any length through a causal LM in chunks against a cache.

    Args:
        model: a causal LM, patched with :func:`msattn.hf.patch` or not.
        input_ids: ``(B, N)`` token ids.
        chunk_size: tokens per forward (None: one chunk). For MS attention a multiple of the group span
            ``merge * block_q``, so that chunking does not change the selection.
        attention_mask: padding mask (1 = real token) of every token in the cache and in ``input_ids``,
            ``(B, past + N)`` (``(B, N)`` for a new cache, as generate() takes it), or None.
        cache: a cache to extend (a prompt continued in several calls), or None for :func:`new_cache`
            with room for the ``N`` tokens.
        on_logits: called as ``on_logits(start, logits)`` with logits ``(B, n, V)`` for positions
            ``start..start+n-1`` (for example to accumulate a loss) before they are freed; ``n`` is small
            enough that the slice holds about ``LOGITS_BYTES`` of float32 (the LM head runs on the
            decoder's hidden states one slice at a time), so no chunk's full logits ever exist.
        on_chunk: called as ``on_chunk(start, end)`` when the chunk of positions ``[start, end)`` is done.

    Returns:
        ``(cache, last_logits)``: the cache holding all positions, and the logits of the last position
        ``(B, V)``.
    """
    from ..config import MSConfig

    if input_ids.dim() != 2:
        raise ValueError(f"prefill: input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    rec = record(model)
    span = rec.config.span if rec is not None and isinstance(rec.config, MSConfig) else 1
    n = input_ids.shape[1]
    if chunk_size is None:
        chunk_size = math.ceil(max(n, 1) / span) * span
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"prefill: chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size % span != 0:
        raise ValueError(f"prefill: chunk_size must be a positive multiple of the group span merge * block_q = "
                         f"{span}, so that chunking does not change the selection; got {chunk_size}")
    cache = new_cache(model, capacity=n) if cache is None else cache
    past = cache.get_seq_length()
    want = (input_ids.shape[0], past + n)
    if attention_mask is not None and tuple(attention_mask.shape) != want:
        raise ValueError(f"prefill: attention_mask must cover the {past} cached tokens and the {n} of input_ids, "
                         f"shape {want}, got {tuple(attention_mask.shape)}")
    name = cache_argument(model)
    if on_logits is not None:
        head = base_model(model).get_output_embeddings()  # (under PEFT, possibly a wrapper of the Linear)
        if head is None or getattr(base_model(model).config, "final_logit_softcapping", None):
            raise ValueError(f"prefill: on_logits needs a causal LM whose logits are its output embeddings applied "
                             f"to the decoder's hidden states; {type(base_model(model)).__name__} is not one")
        vocab = base_model(model).config.vocab_size
    last = None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        kwargs = {name: cache}
        if attention_mask is not None:  # positions count the real tokens before each one, cache included
            kwargs["attention_mask"] = attention_mask[:, :past + end]
            positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)[:, past + start:past + end]
        else:
            positions = torch.arange(past + start, past + end, device=input_ids.device)[None]
        if on_logits is None:  # only the last position's logits are wanted: do not compute (B, n, V)
            last = model(input_ids[:, start:end], use_cache=True, position_ids=positions, logits_to_keep=1,
                         **kwargs).logits[:, -1]
        else:  # the decoder's hidden states, then the LM head a slice at a time (logits of ~LOGITS_BYTES)
            hidden = decoder(model)(input_ids[:, start:end], use_cache=True, position_ids=positions,
                                    **kwargs).last_hidden_state
            step = max(1, LOGITS_BYTES // (4 * hidden.shape[0] * vocab))
            for s in range(0, hidden.shape[1], step):
                logits = head(hidden[:, s:s + step])
                on_logits(past + start + s, logits)
            last = logits[:, -1]
            del hidden, logits
        if on_chunk is not None:
            on_chunk(past + start, past + end)
    return cache, last
