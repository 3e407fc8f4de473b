"""The parameters of each attention method for a model, validated when built: :class:`MSConfig`,
:class:`SelfExtendConfig`, :class:`InfiniConfig`. The type of the config passed to
``msattn.hf.patch`` picks the method."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ConfigError", "InfiniConfig", "MSConfig", "SelfExtendConfig"]

ROPE_MODES = ("inputs", "selected")
SCORE_CHANNELS = ("all", "slow")
# the kernels' limits (MSATTN_MAX_SPAN, MSATTN_MAX_BLOCK, MSATTN_MAX_HEAD_DIM in csrc/msattn.h), checked
# here too so that a config or a model that no call could run is refused when it is built or patched
MAX_SPAN = 1 << 24
MAX_BLOCK = 1 << 20
MAX_HEAD_DIM = 256  # MSATTN_MAX_HEAD_DIM


class ConfigError(ValueError):
    """A key of a command's config (YAML or flag) with a wrong value; the message names the key."""


@dataclass(frozen=True)
class MSConfig:
    """MS attention parameters for a patched model (DESIGN section 1; defaults are the authors').

    Attributes:
        block_q: query region size CQ (tokens).
        block_k: key region size CK (tokens); ``(merge * block_q) % block_k == 0``.
        merge: query regions per group; a group spans ``merge * block_q`` tokens.
        topk: key regions each group selects besides its own tokens.
        local: of these, how many are always the regions just before the group (``0 <= local <=
            topk``; see :func:`msattn.ms_select`): with small groups, the first tokens of each group
            otherwise lose their nearest context whenever ranking does not pick it. 0: the authors' rule.
        coarse_regions, coarse_topk: multi-scale selection (see :func:`msattn.ms_select`): each group
            ranks coarse regions of ``coarse_regions`` key regions by its mean query, keeps the best
            ``coarse_topk``, and its query regions rank only the key regions inside them. ``0, 0``:
            exact selection (the authors'). CPU and CUDA, the same index on both.
        rope: ``"inputs"``: the model rotates q and k before attention (fine-tuning a pretrained
            model; selection sees rotated vectors). ``"selected"``: q and k reach the kernel
            un-rotated; selection uses un-rotated means and the kernel rotates selected tokens with
            compact positions, so no distance beyond ``topk*block_k + merge*block_q`` ever occurs.
        score_channels: which of q's and k's channels the selection scores with. ``"all"`` (the
            authors'). ``"slow"`` (``rope="selected"`` only): the rotary pairs whose wavelength exceeds
            the model's window (``max_position_embeddings``), and any channel RoPE leaves alone. Those
            pairs barely turn at any distance the model was trained on, so their un-rotated ``q . k`` is
            what the model's attention computed; a fast pair turns through every angle within the window
            and its un-rotated product is noise to the ranking (``msattn.rope.slow_rotary_channels``).
        layers: indices of the decoder layers that use MS attention; the others stay dense
            (PyTorch SDPA). ``None``: every layer.
    """

    block_q: int = 16
    block_k: int = 16
    merge: int = 64
    topk: int = 448
    local: int = 0
    coarse_regions: int = 0
    coarse_topk: int = 0
    rope: str = "inputs"
    score_channels: str = "all"
    layers: Sequence[int] | None = field(default=None)

    def __post_init__(self):
        for name in ("block_q", "block_k", "merge", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MSConfig.{name} must be a positive int, got {value!r}")
        for name, limit in (("block_q", MAX_SPAN), ("merge", MAX_SPAN), ("block_k", MAX_BLOCK), ("topk", MAX_BLOCK)):
            if getattr(self, name) > limit:
                raise ValueError(f"MSConfig.{name} must be at most {limit}, got {getattr(self, name)}")
        if self.block_q * self.merge > MAX_SPAN:
            raise ValueError(f"MSConfig: a group (block_q * merge tokens) may hold at most {MAX_SPAN} tokens, got "
                             f"{self.block_q} * {self.merge}")
        if not isinstance(self.local, int) or isinstance(self.local, bool) or not 0 <= self.local <= self.topk:
            raise ValueError(f"MSConfig.local must be an int in [0, topk = {self.topk}], got {self.local!r}")
        for name in ("coarse_regions", "coarse_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BLOCK:
                raise ValueError(f"MSConfig.{name} must be an int in [0, {MAX_BLOCK}], got {value!r}")
        if (self.coarse_regions == 0) != (self.coarse_topk == 0):
            raise ValueError("MSConfig: coarse_regions and coarse_topk are both 0 (exact selection) or both >= 1 "
                             f"(multi-scale), got {self.coarse_regions} and {self.coarse_topk}")
        if (self.merge * self.block_q) % self.block_k != 0:
            raise ValueError(f"MSConfig: merge * block_q must be a multiple of block_k, got "
                             f"{self.merge} * {self.block_q} and {self.block_k}")
        if self.rope not in ROPE_MODES:
            raise ValueError(f"MSConfig.rope must be one of {ROPE_MODES}, got {self.rope!r}")
        if self.score_channels not in SCORE_CHANNELS:
            raise ValueError(f"MSConfig.score_channels must be one of {SCORE_CHANNELS}, got {self.score_channels!r}")
        if self.score_channels == "slow" and self.rope != "selected":
            raise ValueError("MSConfig.score_channels='slow' needs rope='selected' (un-rotated q and k to score); "
                             f"got rope={self.rope!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"MSConfig.layers must be non-negative layer indices, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)

    @property
    def span(self) -> int:
        """Tokens per query group, ``merge * block_q``."""
        return self.merge * self.block_q

    def covers(self, n: int) -> bool:
        """True when ``topk`` reaches every key region of ``n`` tokens: attention is then exactly dense."""
        return self.topk * self.block_k >= n


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SelfExtendConfig:
    """SelfExtend parameters (training-free; arXiv 2401.01325, DESIGN section 3).

    Attributes:
        group_size: ``G >= 1``, positions per group beyond the neighbour window (the paper's G).
        window: ``W >= 0``, the neighbour window (the paper's w_n): neighbours within it keep their
            distance, farther keys get ``floor(i/G) - floor(j/G) + W - floor(W/G)``. A window at least
            the sequence length reproduces the unpatched model.
    """

    group_size: int = 8
    window: int = 128

    def __post_init__(self):
        _check_int("SelfExtendConfig", "group_size", self.group_size, 1)
        _check_int("SelfExtendConfig", "window", self.window, 0)


@dataclass(frozen=True)
class InfiniConfig:
    """Infini-attention parameters (arXiv 2404.07143, DESIGN section 3).

    Attributes:
        segment_len: positions per segment; local attention stays within a segment, earlier segments
            are read through the compressive memory.
        delta_rule: write the memory with the delta rule instead of the linear update.
        gate_init: the initial gate logit ``beta`` of every head (-3: ``sigmoid(-3) = 0.047``, mostly
            local attention, so a pretrained model starts from a working state while the memory path
            still gets gradient).
        unrotated_memory: False: the memory stores and retrieves q and k as the model hands them,
            rotated at their absolute positions. True: q and k reach the kernel un-rotated; the local
            attention rotates them with their positions inside the segment (the same relative angles)
            and the memory stores and retrieves them un-rotated, so that a retrieval does not depend on
            the absolute position at which a key was written.
    """

    segment_len: int = 256
    delta_rule: bool = False
    gate_init: float = -3.0
    unrotated_memory: bool = False

    def __post_init__(self):
        _check_int("InfiniConfig", "segment_len", self.segment_len, 1)
        if not isinstance(self.delta_rule, bool):
            raise ValueError(f"InfiniConfig.delta_rule must be a bool, got {self.delta_rule!r}")
        if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)) \
                or not math.isfinite(self.gate_init):
            raise ValueError(f"InfiniConfig.gate_init must be a finite number, got {self.gate_init!r}")
        if not isinstance(self.unrotated_memory, bool):
            raise ValueError(f"InfiniConfig.unrotated_memory must be a bool, got {self.unrotated_memory!r}")
