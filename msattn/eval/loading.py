"""Models for the evaluations: loading, setting up a method, and the chunked forward they all share.

Sources (``load``):

- an HF model directory (``model=``): ``AutoModelForCausalLM`` and ``AutoTokenizer`` from local files;
- a llama2.c checkpoint (``llama2c=`` with ``tokenizer=`` a ``tok*.bin``);
- a checkpoint directory (``save_checkpoint``: the demo's models, ``msattn pretrain``'s output): an HF
  model directory that also holds ``msattn.json`` = ``{"method": "dense" | "ms" | "self_extend" |
  "infini", "ms_config": {MSConfig fields} | null, "infini": {"segment_len", "delta_rule",
  "unrotated_memory", "gates": [per layer, per head beta]} | null, "tokenizer": PasskeyTokenizer.to_dict() | {"type":
  "Llama2cTokenizer", "path"} | null (the directory's own HF tokenizer)}``;
- a fine-tuned run (``msattn finetune``'s output): a PEFT adapter directory whose ``msattn.json`` also
  holds ``"base_model": {"model" | "llama2c", "tokenizer"}`` (what ``load`` takes) and ``"crd_ntk":
  {CRDNTK fields} | null``: the base model is loaded, given the run's CRD NTK rotary embedding
  (:func:`install_rope`, the inference base) and the adapter merged in.

Methods (``method_names``, ``prepare``): ``"dense"`` = the unpatched model on PyTorch SDPA, and every
method of ``msattn.hf.METHODS`` (the one registry) = ``msattn.hf.patch(model, config)`` with that
method's config in a :class:`Settings`.

Runtime: peak-memory bookkeeping; chunked prefill is ``msattn.prefill`` (each method's cache).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource

import torch

from ..config import InfiniConfig, MSConfig, SelfExtendConfig

__all__ = ["DENSE", "CHECKPOINT_META", "DTYPES", "HFTokenizer", "fast_dtype", "parse_dtype", "install_rope", "load",
           "method_meta", "write_checkpoint_meta", "load_tokenizer", "method_names", "read_checkpoint_meta",
           "ms_config_from_dict", "settings_from_meta", "save_checkpoint", "Settings", "prepare", "is_patched",
           "model_device", "auto_batch_size", "reset_peak_rss", "rss_mb", "peak_rss_mb"]

CHECKPOINT_META = "msattn.json"
INFINI_SAVED = ("segment_len", "delta_rule", "unrotated_memory")  # the InfiniConfig fields msattn.json keeps


# ---------------------------------------------------------------------------------------------
# parameter dtypes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has AMX with bf16 (Linux: the kernel's ``amx_bf16`` flag; elsewhere: no)."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def fast_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The faster parameter dtype of a model on ``device``: bfloat16 on CUDA and on CPUs with AMX (oneDNN
    runs bf16 products on the tiles), float32 on other CPUs: with AVX-512 BF16 but no AMX, a bf16 matrix
    product of this project's shapes runs at about half the fp32 speed (benchmarks/RESULTS.md, "The
    fine-tune again, in float32")."""
    if torch.device(device).type == "cuda" or _cpu_has_amx():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` (:func:`fast_dtype` for ``device``) or a name of :data:`DTYPES`."""
    if name == "auto":
        return fast_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


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
    ``msattn.json``. ``tokenizer``: an :class:`HFTokenizer` (saved into the directory with
    ``save_pretrained``) or one with ``to_dict()`` (a PasskeyTokenizer, a Llama2cTokenizer: recorded
    in ``msattn.json``).

    ``method`` is what the model was trained with; ``settings`` its parameters (``settings.ms`` is
    recorded for ``"ms"``, the segment length, memory rule and trained gates for ``"infini"``, whose
    model must still be patched). The weights saved are the plain model's, loadable by any HF code.
    """
    from ..hf import decoder, patched_config
    from ..hf.common import attention_modules

    if method not in method_names():
        raise ValueError(f"save_checkpoint: unknown method {method!r}; known: {', '.join(method_names())}")
    settings = Settings() if settings is None else settings
    directory = os.fspath(directory)
    if not (isinstance(tokenizer, HFTokenizer) or hasattr(tokenizer, "to_dict")):
        raise TypeError(f"save_checkpoint: tokenizer must be an HFTokenizer or have to_dict(), got "
                        f"{type(tokenizer).__name__}")
    meta = {**method_meta(method, settings),
            "tokenizer": None if isinstance(tokenizer, HFTokenizer) else tokenizer.to_dict()}
    if method == "infini":
        if not isinstance(patched_config(model), InfiniConfig):
            raise ValueError("save_checkpoint: method='infini' needs the model still patched with Infini-attention "
                             "(its gates are saved)")
        gates = [attn.infini_gate.beta.detach().float().cpu().tolist() for attn in attention_modules(decoder(model))]
        meta["infini"] = {**{name: getattr(settings.infini, name) for name in INFINI_SAVED}, "gates": gates}
    # the plain model: its weights without the gates, its config without msattn.hf's patch record (the
    # method and its parameters are in msattn.json)
    from ..hf import SAVED, base_model

    state = {k: v for k, v in model.state_dict().items() if ".infini_gate." not in k}
    config = base_model(model).config
    record = config.__dict__.pop(SAVED, None)
    try:
        model.save_pretrained(directory, state_dict=state)
    finally:
        if record is not None:
            setattr(config, SAVED, record)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tokenizer.save_pretrained(directory)
    write_checkpoint_meta(directory, meta)


def method_meta(method: str, settings: Settings) -> dict:
    """The method part of ``msattn.json``: ``{"method", "ms_config", "infini": None}`` (the Infini gates,
    which need the patched model, are added by :func:`save_checkpoint`)."""
    return {"method": method, "ms_config": dataclasses.asdict(settings.ms) if method == "ms" else None,
            "infini": None}


def write_checkpoint_meta(directory, meta: dict) -> None:
    """Write ``meta`` as the directory's ``msattn.json`` (the module docstring gives its keys)."""
    with open(os.path.join(os.fspath(directory), CHECKPOINT_META), "w") as f:
        json.dump(meta, f, indent=2)


def _meta_tokenizer(data: dict):
    """The tokenizer a checkpoint's ``msattn.json`` records (see the module docstring)."""
    from ..models.llama2c import Llama2cTokenizer
    from .passkey import PasskeyTokenizer

    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "Llama2cTokenizer":
        return Llama2cTokenizer(_need(data.get("path", ""), "llama2.c tokenizer named by msattn.json"))
    return PasskeyTokenizer.from_dict(data)


def install_rope(model, crd) -> None:
    """Give ``model`` (unpatched) CRD NTK rotary positions: ``crd`` a ``msattn.rope.CRDNTK`` or its
    fields as a dict. The module replaces the decoder's rotary embedding, so every method (dense
    included) and ``msattn.hf.patch`` use it; in eval mode it rotates with the inference base."""
    from ..hf import decoder
    from ..rope import CRDNTK, CRDNTKRotaryEmbedding

    crd = crd if isinstance(crd, CRDNTK) else CRDNTK(**crd)
    decoder(model).rotary_emb = CRDNTKRotaryEmbedding(crd, model.config).to(next(model.parameters()).device)


def _load_finetuned(path: str, meta: dict, tokenizer, dtype: torch.dtype):
    """A fine-tuned run: its base model, its CRD NTK positions, its adapter merged in."""
    from peft import PeftModel

    base = meta["base_model"]
    if not isinstance(base, dict) or not ({"model", "llama2c"} & set(base)):
        raise ValueError(f"{path}: {CHECKPOINT_META}'s base_model must hold 'model' or 'llama2c', got {base!r}")
    net, tok = load(model=base.get("model"), llama2c=base.get("llama2c"),
                    tokenizer=tokenizer if tokenizer is not None else base.get("tokenizer"), dtype=dtype)
    if meta.get("crd_ntk") is not None:
        install_rope(net, meta["crd_ntk"])
    net = PeftModel.from_pretrained(net, path).merge_and_unload()
    return net.eval(), tok


def settings_from_meta(meta: dict | None, **overrides) -> Settings:
    """The :class:`Settings` a checkpoint was trained with (``meta`` from :func:`read_checkpoint_meta`;
    None: the defaults), with ``overrides`` by field name, each routed to the config that has it
    (``block_q=``.., ``rope=`` for MS, ``group_size=``, ``window=`` for SelfExtend, ``segment_len=``,
    ``delta_rule=``, ``unrotated_memory=`` for Infini-attention; None values ignored)."""
    meta = meta or {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    ms_fields = {f.name for f in dataclasses.fields(MSConfig)}
    ms = ms_config_from_dict(meta.get("ms_config"), **{k: v for k, v in overrides.items() if k in ms_fields})
    configs = {}
    for name, cls, saved in (("self_extend", SelfExtendConfig, {}),
                             ("infini", InfiniConfig, {k: v for k, v in (meta.get("infini") or {}).items()
                                                       if k in INFINI_SAVED})):
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(saved)
        values.update({k: v for k, v in overrides.items() if k in fields})
        configs[name] = cls(**values)
    known = ms_fields.union(*({f.name for f in dataclasses.fields(c)} for c in (SelfExtendConfig, InfiniConfig)))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"no method has the field(s) {', '.join(unknown)}")
    return Settings(ms=ms, **configs)


def load(model=None, llama2c=None, tokenizer=None, *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` for evaluation, the model in eval mode on SDPA attention.

    Args:
        model: an HF model directory (a checkpoint directory or fine-tuned run included, see the module
            docstring), a ``.gguf`` file or a named model such as ``"smollm2-135m"``
            (``msattn.models.gguf``: converted once, then cached).
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

        from ..models.gguf import resolve

        path = resolve(model)
        meta = read_checkpoint_meta(path)
        if meta is not None and meta.get("base_model") is not None:
            return _load_finetuned(path, meta, tokenizer, dtype)
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        elif meta is not None and meta.get("tokenizer") is not None:
            tok = _meta_tokenizer(meta["tokenizer"])
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

DENSE = "dense"


def method_names() -> tuple[str, ...]:
    """``"dense"`` (the unpatched model on PyTorch SDPA) and the methods of ``msattn.hf.METHODS``."""
    from ..hf import METHODS

    return (DENSE, *METHODS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The parameters of every method, for :func:`prepare`: one config per method of ``msattn.hf.METHODS``.

    A model trained with Infini-attention (a demo checkpoint) keeps its trained gates; any other model
    starts from ``InfiniConfig.gate_init`` (mostly local attention).
    """

    ms: MSConfig = dataclasses.field(default_factory=MSConfig)
    self_extend: SelfExtendConfig = dataclasses.field(default_factory=SelfExtendConfig)
    infini: InfiniConfig = dataclasses.field(default_factory=InfiniConfig)

    def config(self, method: str):
        """The config of ``method`` (None for ``"dense"``)."""
        if method not in method_names():
            raise ValueError(f"unknown method {method!r}; known methods: {', '.join(method_names())}")
        return None if method == DENSE else getattr(self, method)


def is_patched(model) -> bool:
    """True when ``msattn.hf.patch`` switched the model to MS attention."""
    from ..hf import patched_config

    return isinstance(patched_config(model), MSConfig)


def prepare(model, method: str, settings: Settings | MSConfig | None = None):
    """The model set up for ``method`` (in place, undoing a previous method's setup): ``"dense"`` is the
    unpatched model on SDPA, every other name the model patched by ``msattn.hf.patch`` with that
    method's config in ``settings`` (default ``Settings()``; an MSConfig alone stands for
    ``Settings(ms=config)``)."""
    from ..hf import base_model, decoder, patch, patched_config, unpatch
    from ..hf.common import attention_modules

    if settings is None or isinstance(settings, MSConfig):
        settings = Settings() if settings is None else Settings(ms=settings)
    if not isinstance(settings, Settings):
        raise TypeError(f"prepare: settings must be a loading.Settings or an MSConfig, got {type(settings).__name__}")
    config = settings.config(method)
    if patched_config(model) is not None:
        unpatch(model)
    if config is None:
        base_model(model).set_attn_implementation("sdpa")
        return model.eval()
    patch(model, config)
    gates = getattr(base_model(model), "_msattn_trained_gates", None)  # an Infini checkpoint's trained gates
    if method == "infini" and gates is not None:
        with torch.no_grad():
            for attn, beta in zip(attention_modules(decoder(model)), gates):
                attn.infini_gate.beta.copy_(beta)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# runtime

def model_device(model) -> torch.device:
    return next(model.parameters()).device


def auto_batch_size(length: int, count: int, tokens: int = 32768) -> int:
    """Sequences of ``length`` tokens per batch: about ``tokens`` tokens, at least 1, at most ``count``."""
    return max(1, min(count, tokens // max(1, length)))


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
