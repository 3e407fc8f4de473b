"""Models for the evaluations: loading, setting up a method, and the chunked forward they all share.

Sources (``load``):

- an HF model directory (``model=``): ``AutoModelForCausalLM`` and ``AutoTokenizer`` from local files;
- a llama2.c checkpoint (``llama2c=`` with ``tokenizer=`` a ``tok*.bin``);
- a checkpoint directory saved by the demo (``save_checkpoint``): an HF model directory that also holds
  ``msattn.json`` = ``{"method": "dense" | "ms" | "infini", "ms_config": {MSConfig fields} | null,
  "infini": {"segment_len", "delta_rule", "gates": [per layer, per head beta]} | null,
  "tokenizer": PasskeyTokenizer.to_dict()}``.

Methods (``METHODS``, ``prepare``): ``"dense"`` = the unpatched model on PyTorch SDPA, ``"ms"``,
``"self_extend"`` and ``"infini"`` = ``msattn.hf.patch(model, ...)`` with the parameters of a
:class:`Settings`. A new method is one entry ``name: prepare_fn(model, settings)``.

Runtime (``prefill``): a prompt of any length in chunks against a cache (``msattn.prefill`` with an
MSCache for MS attention, an ``InfiniCache`` for Infini-attention, a ``DynamicCache`` otherwise), and
peak-memory bookkeeping.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import resource
from collections.abc import Callable

import torch

from ..config import MSConfig

__all__ = ["METHODS", "CHECKPOINT_META", "HFTokenizer", "load", "load_tokenizer", "read_checkpoint_meta",
           "ms_config_from_dict", "settings_from_meta", "save_checkpoint", "Settings", "prepare", "is_patched",
           "prefill", "model_device", "auto_batch_size", "reset_peak_rss", "rss_mb", "peak_rss_mb"]

CHECKPOINT_META = "msattn.json"


# ---------------------------------------------------------------------------------------------
# tokenizers

class HFTokenizer:
    """A transformers tokenizer behind the ``encode(text, bos=True)`` / ``decode(ids)`` protocol.

    ``encode(text, bos=False)`` encodes text that continues a document: byte-level BPE tokenizers that
    add no prefix space of their own (GPT-2 style) get one, sentencepiece ones already add it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        first = tokenizer.convert_ids_to_tokens(tokenizer("x", add_special_tokens=False)["input_ids"][:1])
        self._prefix_space = not (first and first[0][:1] in ("▁", "Ġ"))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        if not bos and self._prefix_space and text and not text[0].isspace():
            text = " " + text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _need(path, what: str, *, directory: bool = False) -> str:
    path = os.fspath(path)
    if not (os.path.isdir(path) if directory else os.path.exists(path)):
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def load_tokenizer(path):
    """A tokenizer from a path: a directory (AutoTokenizer, local files), a ``.json`` file (a saved
    PasskeyTokenizer, or a ``tokenizers`` file), or anything else as a llama2.c ``tok*.bin``."""
    from ..models.llama2c import Llama2cTokenizer
    from .passkey import PasskeyTokenizer

    path = _need(path, "tokenizer")
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("type") == "PasskeyTokenizer":
            return PasskeyTokenizer.from_dict(data)
        from transformers import PreTrainedTokenizerFast

        return HFTokenizer(PreTrainedTokenizerFast(tokenizer_file=path))
    return Llama2cTokenizer(path)


# ---------------------------------------------------------------------------------------------
# checkpoints

def read_checkpoint_meta(directory) -> dict | None:
    """The ``msattn.json`` of a demo checkpoint directory, or None when there is none."""
    path = os.path.join(os.fspath(directory), CHECKPOINT_META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object with 'method', 'ms_config' and 'tokenizer'")
    return meta


def ms_config_from_dict(data: dict | None, **overrides) -> MSConfig:
    """An MSConfig from saved fields (None: the defaults) with ``overrides`` (None values ignored)."""
    fields = {f.name for f in dataclasses.fields(MSConfig)}
    values = dict(data or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"MSConfig has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
    return MSConfig(**values)


def save_checkpoint(model, tokenizer, directory, *, method: str, settings: Settings | None = None) -> None:
    """Save a model the way ``load(model=directory)`` reads it back: ``save_pretrained`` plus
    ``msattn.json`` (``tokenizer`` needs ``to_dict()``, e.g. a PasskeyTokenizer).

    ``method`` is what the model was trained with; ``settings`` its parameters (``settings.ms`` is
    recorded for ``"ms"``, the segment length, memory rule and trained gates for ``"infini"``, whose
    model must still be patched). The weights saved are the plain model's, loadable by any HF code.
    """
    from ..hf import _attention_modules, _decoder, patched_method

    if method not in METHODS:
        raise ValueError(f"save_checkpoint: unknown method {method!r}; known: {', '.join(METHODS)}")
    settings = Settings() if settings is None else settings
    directory = os.fspath(directory)
    meta = {"method": method, "ms_config": dataclasses.asdict(settings.ms) if method == "ms" else None,
            "infini": None, "tokenizer": tokenizer.to_dict()}
    if method == "infini":
        if patched_method(model) != "infini":
            raise ValueError("save_checkpoint: method='infini' needs the model still patched with Infini-attention "
                             "(its gates are saved)")
        gates = [attn.infini_gate.beta.detach().float().cpu().tolist() for attn in _attention_modules(_decoder(model))]
        meta["infini"] = {"segment_len": settings.segment_len, "delta_rule": settings.delta_rule, "gates": gates}
    state = {k: v for k, v in model.state_dict().items() if ".infini_gate." not in k}
    model.save_pretrained(directory, state_dict=state)
    with open(os.path.join(directory, CHECKPOINT_META), "w") as f:
        json.dump(meta, f, indent=2)


def settings_from_meta(meta: dict | None, **overrides) -> Settings:
    """The :class:`Settings` a checkpoint was trained with (``meta`` from :func:`read_checkpoint_meta`;
    None: the defaults), with ``overrides`` (``block_q=``.., ``rope=`` for MS, ``group_size=``,
    ``window=``, ``segment_len=``, ``delta_rule=``; None values ignored)."""
    meta = meta or {}
    ms_fields = {f.name for f in dataclasses.fields(MSConfig)}
    ms = ms_config_from_dict(meta.get("ms_config"), **{k: v for k, v in overrides.items() if k in ms_fields})
    values = {k: v for k, v in (meta.get("infini") or {}).items() if k in ("segment_len", "delta_rule")}
    values.update({k: v for k, v in overrides.items() if k not in ms_fields and v is not None})
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        raise ValueError(f"Settings has no field(s) {', '.join(unknown)}")
    return Settings(ms=ms, **values)


def load(model=None, llama2c=None, tokenizer=None, *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` for evaluation, the model in eval mode on SDPA attention.

    Args:
        model: an HF model directory (a demo checkpoint directory included).
        llama2c: a llama2.c checkpoint (``.bin``); needs ``tokenizer``.
        tokenizer: a tokenizer path (see :func:`load_tokenizer`); default for ``model``: the checkpoint's
            ``msattn.json`` tokenizer, else the directory's own HF tokenizer.
        dtype: parameter dtype.
    """
    if (model is None) == (llama2c is None):
        raise ValueError("load: give exactly one of model= (an HF model directory) or llama2c= (a checkpoint)")
    if llama2c is not None:
        from ..models.llama2c import load_llama2c

        _need(llama2c, "llama2.c checkpoint")
        if tokenizer is None:
            raise ValueError(f"{os.fspath(llama2c)}: a llama2.c checkpoint needs a tokenizer (--tokenizer tok*.bin)")
        tok = load_tokenizer(tokenizer)
        net, _ = load_llama2c(llama2c, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        path = _need(model, "model directory", directory=True)
        meta = read_checkpoint_meta(path)
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        elif meta is not None and meta.get("tokenizer") is not None:
            from .passkey import PasskeyTokenizer

            tok = PasskeyTokenizer.from_dict(meta["tokenizer"])
        else:
            try:
                tok = load_tokenizer(path)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: no tokenizer found in the model directory ({e}); pass --tokenizer") from e
        net = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                   attn_implementation="sdpa")
        gates = ((meta or {}).get("infini") or {}).get("gates")
        if gates is not None:  # an Infini-attention checkpoint: prepare(net, "infini") restores its gates
            if len(gates) != net.config.num_hidden_layers:
                raise ValueError(f"{path}: {CHECKPOINT_META} holds Infini gates for {len(gates)} layers, the model has "
                                 f"{net.config.num_hidden_layers}")
            net._msattn_trained_gates = [torch.tensor(g, dtype=dtype) for g in gates]
    if tok.vocab_size > net.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                         f"{net.config.vocab_size}: they do not belong together")
    return net.eval(), tok


# ---------------------------------------------------------------------------------------------
# methods

def is_patched(model) -> bool:
    """True when ``msattn.hf.patch`` switched the model to MS attention."""
    from ..hf import patched_method

    return patched_method(model) == "ms"


def _undo(model):
    """Undo whatever method ``msattn.hf.patch`` set up; returns the base model."""
    from ..hf import _base_model, patched_method, unpatch

    if patched_method(model) is not None:
        unpatch(model)
    return _base_model(model)


def _prepare_dense(model, settings):
    _undo(model).set_attn_implementation("sdpa")
    return model.eval()


def _prepare_ms(model, settings):
    from ..hf import patch

    _undo(model)
    return patch(model, settings.ms).eval()


def _prepare_self_extend(model, settings):
    from ..hf import patch

    _undo(model)
    return patch(model, method="self_extend", group_size=settings.group_size, window=settings.window).eval()


def _prepare_infini(model, settings):
    from ..hf import _attention_modules, _decoder, patch

    base = _undo(model)
    patch(model, method="infini", segment_len=settings.segment_len, delta_rule=settings.delta_rule)
    gates = getattr(base, "_msattn_trained_gates", None)  # an Infini checkpoint's trained gates
    if gates is not None:
        with torch.no_grad():
            for attn, beta in zip(_attention_modules(_decoder(model)), gates):
                attn.infini_gate.beta.copy_(beta)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Settings:
    """The parameters of every method, for :func:`prepare`.

    Attributes:
        ms: MS attention's parameters (``"ms"``).
        group_size, window: SelfExtend's group size ``G`` and neighbour window ``W`` (``"self_extend"``).
        segment_len, delta_rule: Infini-attention's segment length and memory update (``"infini"``).
            A model trained with Infini-attention (a demo checkpoint) keeps its trained gates; any other
            model starts from the untrained gate of :mod:`msattn.infini_hf` (mostly local attention).
    """

    ms: MSConfig = dataclasses.field(default_factory=MSConfig)
    group_size: int = 8
    window: int = 128
    segment_len: int = 256
    delta_rule: bool = False


METHODS: dict[str, Callable] = {
    "dense": _prepare_dense,
    "ms": _prepare_ms,
    "self_extend": _prepare_self_extend,
    "infini": _prepare_infini,
}


def prepare(model, method: str, settings: Settings | MSConfig | None = None):
    """The model set up for ``method`` (in place, undoing a previous method's setup): ``"dense"`` is the
    unpatched model on SDPA, ``"ms"``, ``"self_extend"`` and ``"infini"`` the model patched by
    ``msattn.hf.patch`` with the parameters in ``settings`` (default ``Settings()``; an MSConfig alone
    stands for ``Settings(ms=config)``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if settings is None or isinstance(settings, MSConfig):
        settings = Settings() if settings is None else Settings(ms=settings)
    if not isinstance(settings, Settings):
        raise TypeError(f"prepare: settings must be a loading.Settings or an MSConfig, got {type(settings).__name__}")
    return METHODS[method](model, settings)


# ---------------------------------------------------------------------------------------------
# runtime

def model_device(model) -> torch.device:
    return next(model.parameters()).device


def auto_batch_size(length: int, count: int, tokens: int = 32768) -> int:
    """Sequences of ``length`` tokens per batch: about ``tokens`` tokens, at least 1, at most ``count``."""
    return max(1, min(count, tokens // max(1, length)))


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _new_cache(model):
    """The cache a prefill of ``model`` keeps: an InfiniCache (memory plus one segment) for a model
    patched with Infini-attention, a DynamicCache otherwise."""
    from ..hf import _attention_modules, _decoder, patched_method

    if patched_method(model) == "infini":
        from ..infini_hf import InfiniCache

        return InfiniCache(_attention_modules(_decoder(model))[0]._msattn_infini.segment_len)
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def _dense_prefill(model, input_ids, chunk_size, on_logits, on_chunk):
    n = input_ids.shape[1]
    chunked = _accepts(model, "past_key_values")
    size = chunk_size if chunk_size and chunked else n
    cache = _new_cache(model) if chunked else None
    kwargs = {"past_key_values": cache, "use_cache": True} if chunked else {}
    if on_logits is None and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # only the last position's logits are needed
    last = None
    for start in range(0, n, size):
        end = min(start + size, n)
        positions = torch.arange(start, end, device=input_ids.device)[None]
        logits = model(input_ids[:, start:end], position_ids=positions, **kwargs).logits
        if on_logits is not None:
            on_logits(start, logits)
        if on_chunk is not None:
            on_chunk(start, end)
        last = logits[:, -1]
        del logits
    return cache, last


def prefill(model, input_ids: torch.Tensor, *, chunk_size: int | None = 16384,
            on_logits: Callable[[int, torch.Tensor], None] | None = None,
            on_chunk: Callable[[int, int], None] | None = None):
    """Run ``(B, N)`` prompts through a prepared model chunk by chunk; returns ``(cache, last_logits (B, V))``.

    A model patched with MS attention goes through :func:`msattn.prefill` (MSCache; ``chunk_size`` must be a
    multiple of the group span), any other through its forward with a cache (``InfiniCache`` for
    Infini-attention, ``DynamicCache`` otherwise). ``chunk_size`` None: one chunk.
    ``on_logits(start, logits (B, n, V))`` sees every chunk's logits before they are freed;
    ``on_chunk(start, end)`` is told when a chunk is done (progress).
    """
    if not is_patched(model):
        return _dense_prefill(model, input_ids, chunk_size, on_logits, on_chunk)
    from ..cache import prefill as ms_prefill
    from ..hf import model_config

    span = model_config(model).span
    n = input_ids.shape[1]
    size = chunk_size or math.ceil(n / span) * span
    cache, last = None, None
    for start in range(0, n, size):  # chunk by chunk here, so progress needs no logits
        end = min(start + size, n)
        # msattn.prefill reports absolute start positions (the cache holds [0, start) already)
        cache, last = ms_prefill(model, input_ids[:, start:end], chunk_size=size, cache=cache, on_logits=on_logits)
        if on_chunk is not None:
            on_chunk(start, end)
    return cache, last


_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def reset_peak_rss(device: torch.device | None = None) -> bool:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs`` 5) and, on CUDA, the
    allocator's peak. Returns False when the RSS peak cannot be reset (it then covers the whole run)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not os.access(_CLEAR_REFS, os.W_OK):
        return False
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB since the last :func:`reset_peak_rss` (VmHWM)."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2 ** 20 if os.uname().sysname == "Darwin" else peak / 1024
