"""The fields of ``msattn pretrain|finetune|infer|losscurve`` as dataclasses for transformers'
``HfArgumentParser``: every field is a key of the YAML config and a flag (``--block_q`` or
``--block-q``) that overrides it. Training phases add the Trainer's own ``TrainingArguments``.

The attention fields default to None: the value the model was saved with (its ``msattn.json``),
else the method config's default (``msattn.MSConfig`` etc.).
"""

from dataclasses import dataclass, field, fields
from typing import Literal

from ..config import ConfigError
from ..eval.loading import Settings, settings_from_meta

__all__ = ["ArchitectureArguments", "AttentionArguments", "BaseModelArguments", "CRDArguments",
           "DataArguments", "InferArguments", "LoraArguments", "LossCurveArguments"]


Method = Literal["dense", "ms", "self_extend", "infini"]


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class AttentionArguments:
    """The attention method and its parameters (None: as saved with the model, else the default)."""

    attention: Method | None = _help("dense (PyTorch SDPA), ms, self_extend or infini", default=None)
    block_q: int | None = _help("MS: query region size (tokens)", default=None)
    block_k: int | None = _help("MS: key region size (tokens)", default=None)
    merge: int | None = _help("MS: query regions per group", default=None)
    topk: int | None = _help("MS: key regions each group selects", default=None)
    local: int | None = _help("MS: of these, the regions just before the group, always kept", default=None)
    coarse_regions: int | None = _help("MS: multi-scale selection, key regions per coarse region (0: exact)",
                                       default=None)
    coarse_topk: int | None = _help("MS: multi-scale selection, coarse regions each group keeps", default=None)
    rope: Literal["inputs", "selected"] | None = _help("MS: RoPE on the inputs or on the selected tokens",
                                                       default=None)
    score_channels: Literal["all", "slow"] | None = _help("MS: channels the selection scores with: all, or "
                                                          "(rope selected) the rotary pairs slower than the "
                                                          "model's window", default=None)
    group_size: int | None = _help("SelfExtend: positions per group", default=None)
    window: int | None = _help("SelfExtend: neighbour window", default=None)
    segment_len: int | None = _help("Infini-attention: tokens per segment", default=None)
    delta_rule: bool | None = _help("Infini-attention: write the memory with the delta rule", default=None)
    unrotated_memory: bool | None = _help("Infini-attention: the memory stores un-rotated keys", default=None)

    def method(self, meta: dict | None, default: str = "ms") -> str:
        """The method: this config's, else the saved model's, else ``default``."""
        return self.attention or (meta or {}).get("method") or default

    def settings(self, meta: dict | None = None) -> Settings:
        """Every method's config: the saved ones (``meta``, an ``msattn.json``) with this config's values
        over them. Errors name the field (``MSConfig.topk must be ...``)."""
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "attention"}
        try:
            return settings_from_meta(meta, **overrides)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class ArchitectureArguments:
    """The Llama that ``pretrain`` builds from scratch (its window is ``seq_len``)."""

    tokenizer: str = _help("'bytes' (259 byte ids, nothing downloaded), an HF tokenizer directory or "
                           "tokenizer.json, or a llama2.c tok*.bin", default="bytes")
    hidden_size: int = _help("model width", default=128)
    num_hidden_layers: int = _help("decoder layers", default=4)
    num_attention_heads: int = _help("query heads", default=4)
    num_key_value_heads: int = _help("key/value heads (GQA when fewer than query heads)", default=2)
    intermediate_size: int = _help("MLP width", default=384)
    rope_theta: float = _help("RoPE base", default=10000.0)


@dataclass
class BaseModelArguments:
    """The model ``finetune`` starts from."""

    model: str | None = _help("HF model directory (a pretrain or finetune output included), .gguf file or "
                              "named model (smollm2-135m)", default=None)
    llama2c: str | None = _help("a llama2.c checkpoint (.bin) instead of model; needs tokenizer", default=None)
    tokenizer: str | None = _help("tokenizer path (default: the model's own)", default=None)


@dataclass
class DataArguments:
    """The training text."""

    text: list[str] = _help("training text files (default: the Austen novels but persuasion.txt)",
                            default_factory=list)
    seq_len: int = _help("training sequence length (tokens)", default=512)
    max_tokens: int | None = _help("use at most this many tokens of the text", default=None)
    passkey_share: float = _help("share of the sequences that are pass-key prompts hidden in the same text, "
                                 "trained on the key's tokens only (teaches retrieval; 0: text only)", default=0.0)


@dataclass
class CRDArguments:
    """CRD NTK RoPE while fine-tuning (``msattn.rope.CRDNTK``)."""

    crd_ntk: bool = _help("train with CRD NTK positions (--no_crd_ntk keeps the model's RoPE)", default=True)
    cycle: int | None = _help("position cycle (default: max(seq_len, the model's window))", default=None)
    max_shift: int | None = _help("random shift bound (default: the cycle)", default=None)
    scale_start: float = _help("training scale at step 0", default=16.0)
    growth: float = _help("scale factor per growth", default=2.0)
    grow_every: int = _help("optimizer steps per growth", default=2000)
    scale_max: float = _help("largest training scale", default=64.0)
    inference_scale: float | None = _help("S of the inference base (default: the last training base)",
                                          default=None)


@dataclass
class LoraArguments:
    """Reduced LoRA (``msattn.lora``): LoRA on k_proj and o_proj, embeddings and norms trained in full."""

    lora_r: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA alpha", default=16)


@dataclass
class InferArguments:
    """Long-context generation: a prompt file, or a pass key hidden in filler text."""

    model: str | None = _help("HF model directory (a pretrain or finetune output included), .gguf file or "
                              "named model", default=None)
    tokenizer: str | None = _help("tokenizer path (default: the model's own)", default=None)
    dtype: Literal["auto", "float32", "bfloat16"] = _help("parameter dtype; auto: bfloat16 on CUDA and on CPUs "
                                                          "with AMX, else float32", default="float32")
    prompt_file: str | None = _help("a text file: its text is the prompt", default=None)
    passkey_length: int | None = _help("instead of a prompt file: a pass-key prompt of this many tokens",
                                       default=None)
    passkey_depth: float = _help("where the key sits, 0 (start) to 1 (end)", default=0.5)
    filler: str = _help("pass-key filler: auto, austen, repeated or FILE[,FILE...]", default="auto")
    max_new_tokens: int = _help("tokens to generate", default=16)
    chunk_size: int = _help("prefill chunk (tokens; MS: a multiple of merge * block_q)", default=8192)
    seed: int = _help("seed of the pass key", default=0)
    report: str | None = _help("write the measurements as JSON to this file", default=None)


@dataclass
class LossCurveArguments:
    """The loss curve: the same pretraining under several selection budgets."""

    budgets: list[str] = _help("each 'dense' or 'key=value,...' of attention fields, e.g. 'topk=4' or "
                               "'block_k=64,topk=1'", default_factory=lambda: ["dense", "topk=1", "topk=4"])
    eval_text: str | None = _help("held-out text (default: the Austen novel persuasion.txt)", default=None)
    eval_tokens: int = _help("held-out tokens scored (in seq_len windows)", default=32768)

