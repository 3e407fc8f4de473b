"""msattn: correlation-aware select-and-merge attention for long contexts."""

from .functional import ms_attention, ms_select
from .ops import isa, set_isa

__version__ = "0.1.0"
__all__ = ["isa", "ms_attention", "ms_select", "set_isa"]
