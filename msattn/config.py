"""MSConfig: the parameters of MS attention for a model, validated when built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["MSConfig"]

ROPE_MODES = ("inputs", "selected")


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
        rope: ``"inputs"``: the model rotates q and k before attention (fine-tuning a pretrained
            model; selection sees rotated vectors). ``"selected"``: q and k reach the kernel
            un-rotated; selection uses un-rotated means and the kernel rotates selected tokens with
            compact positions, so no distance beyond ``topk*block_k + merge*block_q`` ever occurs.
        layers: indices of the decoder layers that use MS attention; the others stay dense
            (PyTorch SDPA). ``None``: every layer.
    """

    block_q: int = 16
    block_k: int = 16
    merge: int = 64
    topk: int = 448
    local: int = 0
    rope: str = "inputs"
    layers: Sequence[int] | None = field(default=None)

    def __post_init__(self):
        for name in ("block_q", "block_k", "merge", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MSConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.local, int) or isinstance(self.local, bool) or not 0 <= self.local <= self.topk:
            raise ValueError(f"MSConfig.local must be an int in [0, topk = {self.topk}], got {self.local!r}")
        if (self.merge * self.block_q) % self.block_k != 0:
            raise ValueError(f"MSConfig: merge * block_q must be a multiple of block_k, got "
                             f"{self.merge} * {self.block_q} and {self.block_k}")
        if self.rope not in ROPE_MODES:
            raise ValueError(f"MSConfig.rope must be one of {ROPE_MODES}, got {self.rope!r}")
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
