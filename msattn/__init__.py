"""msattn: correlation-aware select-and-merge attention for long contexts.

The ops and the method configs are imported here; the HuggingFace integration (``msattn.hf``), the
positions (``msattn.rope``), reduced LoRA (``msattn.lora``) and the models (``msattn.models``) are
imported on use, so that the ops need nothing beyond torch.
"""

from .config import InfiniConfig, MSConfig, SelfExtendConfig
from .functional import infini_attention, ms_attention, ms_select, self_extend_attention
from .ops import isa, set_isa

__version__ = "0.1.0"
__all__ = ["InfiniConfig", "MSConfig", "SelfExtendConfig", "infini_attention", "isa", "ms_attention", "ms_select",
           "prefill", "self_extend_attention", "set_isa"]


def __getattr__(name):
    # msattn.prefill needs transformers: imported on first use
    if name == "prefill":
        from .hf.cache import prefill

        return prefill
    raise AttributeError(f"module 'msattn' has no attribute {name!r}")
