"""Public functions of msattn. Layout ``(B, H, N, D)`` as in ``scaled_dot_product_attention``."""

from __future__ import annotations

import math

import torch

from .ops import ops

__all__ = ["infini_attention", "ms_attention", "ms_select", "self_extend_attention"]


def _scale(q: torch.Tensor, scale: float | None) -> float:
    """``scale``, or the default ``1 / sqrt(D)``; for a q the ops refuse (not 4-D, D outside 1..256)
    any value: the op's shape check then names the problem."""
    if scale is not None:
        return float(scale)
    d = q.shape[-1] if q.dim() == 4 else 0
    return 1.0 / math.sqrt(d) if d >= 1 else 1.0


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The q, k, v an op should see inside ``torch.autocast``: cast to the autocast dtype of their device
    when it is on there (as ``scaled_dot_product_attention`` is), else as given. Under autocast a
    model's projections give 16-bit tensors while un-rotated q and k pass through float32 cos = 1, so
    they reach the attention function in mixed dtypes; float64 is left alone (autocast ignores it)."""
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):  # e.g. meta
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in tensors)


def _weigh(who: str, q: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    """``q`` with its channels scaled by ``channels`` ``(D,)``, for selection's scores only."""
    if channels is None:
        return q
    if not isinstance(channels, torch.Tensor) or channels.dim() != 1 or channels.shape[0] != q.shape[-1] \
            or not channels.is_floating_point():
        got = f"{channels.dtype} {tuple(channels.shape)}" if isinstance(channels, torch.Tensor) else repr(channels)
        raise ValueError(f"{who}: score_channels must be a floating tensor of shape (D,) = ({q.shape[-1]},), "
                         f"got {got}")
    return q * channels.to(device=q.device, dtype=q.dtype)


def _offsets(who: str, cu_seqlens_q, cu_seqlens_k):
    """Packed sequences' offsets for the ops: ``cu_seqlens_k`` defaults to ``cu_seqlens_q`` (queries and
    keys are the same tokens); keys' offsets alone are an error."""
    if cu_seqlens_q is None and cu_seqlens_k is not None:
        raise ValueError(f"{who}: cu_seqlens_k needs cu_seqlens_q (the queries' offsets), got only cu_seqlens_k")
    return cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k


def _int(who: str, name: str, value) -> int:
    """``value`` if it is an int (the ops check its range); a float or bool is refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{who}: {name} must be an int, got {value!r}")
    return value


def ms_select(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 16,
    block_k: int = 16,
    merge: int = 64,
    topk: int = 448,
    causal: bool = True,
    local: int = 0,
    coarse_regions: int = 0,
    coarse_topk: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    key_sums: torch.Tensor | None = None,
    key_counts: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    score_channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The key regions each query group of MS attention attends to (DESIGN section 1, steps 1-5).

    Query region ``a`` holds positions ``[a*block_q, (a+1)*block_q)``, key region ``j`` positions
    ``[j*block_k, (j+1)*block_k)``, query group ``g`` the regions ``[g*merge, (g+1)*merge)``. Each
    region is represented by the mean of its vectors (valid ones only under a padding mask); the
    score of key region ``j`` for query region ``a`` of KV head ``h`` is the sum over ``h``'s query
    heads of ``qbar_a . kbar_j``. A group whose candidates (causal: regions ending before the group;
    non-causal: regions outside it) number at most ``topk`` takes them all; otherwise each of its query
    regions ranks the candidates (descending, ties to the lower ``j``), keeps ``topk``, and the lists
    are interleaved rank by rank, skipping duplicates, until ``topk`` regions are collected. With
    ``local > 0`` such a group first takes the ``local`` regions just before its own tokens (those
    holding a valid key), then interleaves for the rest.

    Args:
        q: ``(B, Hq, Nq, D)``, the queries at the last ``Nq`` of the ``N`` positions.
        k: ``(B, Hkv, N, D)``, ``Hq % Hkv == 0`` (GQA/MQA: one selection per KV head).
        block_q, block_k: query and key region sizes; ``(merge * block_q) % block_k == 0``.
        merge: query regions per group.
        topk: key regions selected per group besides its own tokens.
        causal: candidates lie before the group (else anywhere outside it).
        local: ``0 <= local <= topk`` key regions right before each ranking group that it always
            selects (counted in ``topk``): the tokens at the start of a group keep their nearest
            context, which ranking by region means cannot tell from any other region. 0 (default):
            DESIGN section 1's rule.
        coarse_regions: 0 (default): exact ranking. ``s >= 1``: multi-scale ranking: coarse region
            ``J`` holds key regions ``[J*s, (J+1)*s)``, summarised by the mean of their valid keys. A
            ranking group ranks the coarse regions holding one of its candidates by its mean query
            (the mean of its query regions' means; same rule: descending, ties to the lower ``J``),
            keeps the best ``coarse_topk``, and its query regions rank only the candidates inside
            them (a list may then hold fewer than ``topk`` regions). Scores per group:
            ``N/(block_k*s) + merge*coarse_topk*s`` instead of ``merge*N/block_k``: the ranking of
            fine regions no longer grows with ``N``. Keeping every coarse region gives the exact
            selection. CPU and CUDA, the same index on both.
        coarse_topk: coarse regions each ranking group keeps (``>= 1`` with ``coarse_regions``).
        key_padding_mask: bool ``(B, N)``, True for real tokens (HF's ``attention_mask``). Padded
            keys do not count in means; padded queries do not rank; empty regions are never chosen.
        key_sums, key_counts: a cache's region summaries of all ``N`` keys (float32
            ``(B, Hkv, >= N/block_k, D)`` and int32 ``(B, Hkv, >= N/block_k)``, see
            :class:`msattn.hf.MSCache`), used instead of reading ``k``: selection then costs
            ``O(N/block_k * D)`` per query region. The result is the same, bit for bit.
        cu_seqlens_q, cu_seqlens_k: packed sequences, see :func:`ms_attention`.
        score_channels: ``(D,)`` weights of the channels in the scores, which become
            ``sum_d w_d qbar_a[d] kbar_j[d]`` (e.g. 0/1 from :func:`msattn.rope.slow_rotary_channels`);
            None: every channel, weight 1.

    Returns:
        int32 ``(B, Hkv, G, topk)``: for each group holding a query of the call (first to last), its
        regions ascending, padded with -1. Packed: ``(1, Hkv, sum of G_s, topk)``, the groups of each
        sequence after those of the one before.
    """
    cu_q, cu_k = _offsets("msattn.ms_select", cu_seqlens_q, cu_seqlens_k)
    q, k = _autocast(q, k)
    q = _weigh("msattn.ms_select", q, score_channels)
    return ops.ms_select(q, k, key_padding_mask, key_sums, key_counts, block_q, block_k, merge, topk, causal, local,
                         coarse_regions, coarse_topk, cu_q, cu_k)


def ms_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_q: int = 16,
    block_k: int = 16,
    merge: int = 64,
    topk: int = 448,
    causal: bool = True,
    local: int = 0,
    coarse_regions: int = 0,
    coarse_topk: int = 0,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    index: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    score_channels: torch.Tensor | None = None,
):
    """Correlation-aware select-and-merge (MS) sparse attention (DESIGN section 1).

    Each query group (``merge * block_q`` consecutive queries) attends to the ``topk`` key regions of
    ``block_k`` tokens that :func:`ms_select` chose for it, plus its own tokens under the usual causal
    mask. Short sequences, and every group with at most ``topk`` candidate regions, are exactly dense.
    Softmax over exactly that key set, flash-style; differentiable in ``q``, ``k``, ``v``; GQA without
    copying K/V; deterministic (the same call gives bit-identical outputs and gradients).

    Args:
        q: ``(B, Hq, Nq, D)``. The queries are the **last** ``Nq`` of the ``N`` key positions (causal
            mask aligned bottom-right, as in FlashAttention): ``Nq < N`` is chunked prefill or decoding
            against a cache. Any strides; float32, float64, bfloat16 or float16 (16-bit inputs
            accumulate in float32); head dim 1..256.
        k, v: ``(B, Hkv, N, D)`` with ``Hq % Hkv == 0``.
        block_q, block_k, merge, topk, causal, local, coarse_regions, coarse_topk: see :func:`ms_select`
            (defaults: the authors').
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: bool ``(B, N)``, True for real tokens. Padded keys are never attended; a
            query with no visible key outputs zeros (and lse ``-inf``).
        return_lse: also return the log-sum-exp of each query's scaled scores.
        rotary: ``(cos, sin)``, each float32 ``(L, rotary_dim / 2)`` with
            ``L >= topk * block_k + merge * block_q``: RoPE on selected tokens only
            (``rope="selected"``, DESIGN section 3). ``q`` and ``k`` are then un-rotated; selection uses
            the un-rotated means and the kernel rotates with compact positions (the i-th selected
            region's tokens at ``i*block_k + t``, the group's own tokens after them), pairs
            ``(x[i], x[i + rotary_dim/2])`` as in HuggingFace.
        index: a selection from :func:`ms_select` for these shapes, to reuse instead of recomputing.
        cu_seqlens_q: packed sequences (FlashAttention's varlen convention): int32 ``(S + 1,)`` offsets,
            0 first and ``Nq`` last, of ``S`` sequences laid back to back along the tokens of a batch of
            one (``B = 1``). Regions, groups, causality and positions restart at each sequence and no
            sequence sees another's keys: the result equals ``S`` separate calls (forward, gradients,
            selection). Sequence ``s`` holds queries ``cu_seqlens_q[s]:cu_seqlens_q[s+1]``.
        cu_seqlens_k: the sequences' key offsets (0 first, ``N`` last), default ``cu_seqlens_q``. Each
            sequence's queries are the last of its keys: one query per sequence against longer keys is
            batched decoding. The offsets are read on the host (a device sync on CUDA).
        score_channels: ``(D,)`` weights of the channels in selection's scores (see :func:`ms_select`);
            the attention itself uses every channel.

    Returns:
        ``out (B, Hq, Nq, D)`` in q's dtype, and with ``return_lse`` also ``lse (B, Hq, Nq)`` in
        float32 (float64 for float64 inputs).
    """
    scale = _scale(q, scale)
    cos, sin = rotary if rotary is not None else (None, None)
    cu_q, cu_k = _offsets("msattn.ms_attention", cu_seqlens_q, cu_seqlens_k)
    q, k, v = _autocast(q, k, v)
    if index is None:
        index = ops.ms_select(_weigh("msattn.ms_attention", q, score_channels), k, key_padding_mask, None, None,
                              block_q, block_k, merge, topk, causal, local, coarse_regions, coarse_topk, cu_q, cu_k)
    out, lse = ops.ms_fwd(q, k, v, index, key_padding_mask, cos, sin, block_q, block_k, merge, causal, scale,
                          cu_q, cu_k)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# [SelfExtend]

def self_extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    window: int,
    rotary: tuple[torch.Tensor, torch.Tensor],
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
):
    """SelfExtend attention (training-free context extension, arXiv 2401.01325; DESIGN section 3).

    Dense softmax attention whose RoPE positions are remapped per score: a key within the neighbour
    window keeps its relative distance ``i - j``; beyond it the distance becomes
    ``floor(i/G) - floor(j/G) + W - floor(W/G)`` (``G = group_size``, ``W = window``), so a model
    never sees a distance much larger than it was trained on. ``q`` and ``k`` are passed
    **un-rotated**; the kernel rotates each score's pair itself from ``rotary``:

    - ``i - j < W``: q rotated at ``i``, k at ``j`` (ordinary RoPE);
    - ``i - j >= W``: q rotated at ``floor(i/G) + W - floor(W/G)``, k at ``floor(j/G)``;
    - non-causal only, ``j - i >= max(W, 1)``: the mirror image (q at ``floor(i/G) - W + floor(W/G)``,
      k at ``floor(j/G)``), so a grouped distance keeps its sign.

    With ``group_size=1`` or ``window >= N`` it is ordinary RoPE attention. Flash-style (scores never
    leave a tile, online softmax), differentiable in ``q``, ``k``, ``v``, GQA without copying K/V,
    deterministic (the same call gives bit-identical outputs and gradients).

    Args:
        q: ``(B, Hq, Nq, D)``, un-rotated. The queries are the **last** ``Nq`` of the ``N`` key
            positions (causal mask aligned bottom-right, as in FlashAttention): ``Nq < N`` is chunked
            prefill or decoding against a cache of un-rotated keys. Any strides; float32, float64,
            bfloat16 or float16 (16-bit inputs accumulate in float32); head dim 1..256.
        k, v: ``(B, Hkv, N, D)`` with ``Hq % Hkv == 0``; ``k`` un-rotated.
        group_size: ``G >= 1``, positions per group beyond the window.
        window: ``W >= 0``, the neighbour window (distances below it keep their positions).
        rotary: ``(cos, sin)``, each float32 ``(L, rotary_dim / 2)`` with ``L >= N``, row ``t`` the
            angles of position ``t``; pairs ``(x[i], x[i + rotary_dim/2])`` as in HuggingFace's
            ``rotate_half``, dims past ``rotary_dim`` pass through. :func:`msattn.rope.compact_rope_tables`
            builds them from an HF rotary module.
        causal: bottom-right causal mask (default). Non-causal attends to every key.
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: bool ``(B, N)``, True for real tokens. Padded keys are never attended; a
            query with no visible key outputs zeros (and lse ``-inf``). Positions are slots
            ``0..N-1`` whatever the padding.
        sliding_window: also hide keys with ``|i - j| >= sliding_window`` (Mistral's window); None or 0:
            no window.
        return_lse: also return the log-sum-exp of each query's scaled scores.

    Returns:
        ``out (B, Hq, Nq, D)`` in q's dtype, and with ``return_lse`` also ``lse (B, Hq, Nq)`` in
        float32 (float64 for float64 inputs).
    """
    who = "msattn.self_extend_attention"
    scale = _scale(q, scale)
    _int(who, "group_size", group_size)
    _int(who, "window", window)
    if sliding_window is not None:  # 0, like None: no window
        _int(who, "sliding_window", sliding_window)
    if rotary is None or len(rotary) != 2:
        raise ValueError(f"{who}: rotary must be a (cos, sin) pair of float32 tables")
    cos, sin = rotary
    q, k, v = _autocast(q, k, v)
    out, lse = ops.self_extend_fwd(q, k, v, cos, sin, key_padding_mask, group_size, window, sliding_window or 0,
                                   causal, scale)
    return (out, lse) if return_lse else out
# [/SelfExtend]


# ---------------------------------------------------------------------------------------------
# [Infini-attention]

def infini_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    memory: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    *,
    delta_rule: bool = False,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    update_memory: bool = True,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Infini-attention over one segment with a compressive memory (arXiv 2404.07143, DESIGN section 3).

    With ``sigma(x) = ELU(x) + 1`` and ``g = sigmoid(beta)`` per query head, each query mixes the memory
    retrieval and the local softmax attention inside the segment::

        out = g * sigma(q) M / (sigma(q) . z + 1e-6) + (1 - g) * softmax(q k^T * scale) v

    and the segment's valid keys are written to the memory, which is returned for the next segment::

        M' = M + sigma(K)^T V                                              (delta_rule=False)
        M' = M + sigma(K)^T (V - sigma(K) M / (sigma(K) z + 1e-6))         (delta_rule=True)
        z' = z + sum_t sigma(K_t)

    The ``1e-6`` keeps an empty memory (``M = 0, z = 0``, the first segment) retrieving exactly 0; any
    memory built by this function has ``z > 0`` where a key was written, so it rarely matters beyond that.
    One memory per key/value head, read by each of its query heads with their own ``sigma(q)`` (GQA
    without copying). Differentiable in ``q, k, v, beta, memory, norm``: feed ``(memory', norm')`` to the
    next segment's call and backpropagate through the segments. Deterministic; float32 accumulation for
    16-bit inputs.

    Args:
        q: ``(B, Hq, Nq, D)``, the queries at the **last** ``Nq`` positions of the segment (``Nq < N``:
            decoding or a chunk against keys already in the segment; causal mask aligned bottom-right).
            Any strides; float32, float64, bfloat16 or float16; head dim 1..256.
        k, v: ``(B, Hkv, N, D)``, the segment's keys and values, ``Hq % Hkv == 0``.
        beta: ``(Hq,)`` gate logits (any floating dtype; the gradient comes back in it).
        memory: ``(B, Hkv, D, D)`` float32 (float64 for float64 inputs), the memory ``M`` carried from the
            previous segments; None: zeros.
        norm: ``(B, Hkv, D)``, the normaliser ``z``, same dtype; None: zeros. Give both or neither.
        delta_rule: write with the delta rule (only what the memory does not already retrieve).
        causal: causal local attention inside the segment (the memory always holds earlier segments).
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: bool ``(B, N)``, True for real tokens. Padded keys are neither attended nor
            written to memory; a query with no visible key gets zero local attention (its output is then
            ``g * A_mem``).
        update_memory: False leaves the memory as it is (``memory' = memory``): decoding inside a segment
            that is not yet complete.
        rotary: ``(cos, sin)`` float32 ``(L, rotary_dim / 2)`` each, ``L >= N`` (from
            ``msattn.rope.compact_rope_tables``), or None. Given, ``q`` and ``k`` arrive un-rotated: the
            local attention rotates them with their positions inside the segment (key ``t`` at ``t``,
            query ``i`` at ``N - Nq + i``; the same relative angles as absolute positions), and the memory
            reads and writes them un-rotated, so that what it stores does not depend on where in the
            sequence it was written (``InfiniConfig(unrotated_memory=True)``). None: q and k are used as given.

    Returns:
        ``(out, (memory', norm'))``: ``out (B, Hq, Nq, D)`` in q's dtype, the updated memory
        ``(B, Hkv, D, D)`` and normaliser ``(B, Hkv, D)``.
    """
    scale = _scale(q, scale)
    if (memory is None) != (norm is None):
        raise ValueError("infini_attention: give memory and norm together (or neither, for an empty memory)")
    q, k, v = _autocast(q, k, v)
    if memory is None:
        B, Hkv, D = k.shape[0], k.shape[1], q.shape[-1]
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        memory = q.new_zeros((B, Hkv, D, D), dtype=dtype)
        norm = q.new_zeros((B, Hkv, D), dtype=dtype)
    cos, sin = (None, None) if rotary is None else rotary
    out, _, _, memory, norm = ops.infini_fwd(q, k, v, beta, memory, norm, key_padding_mask, cos, sin, delta_rule,
                                             causal, scale, update_memory)
    return out, (memory, norm)
# [/Infini-attention]
